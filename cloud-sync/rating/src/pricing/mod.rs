//! Pricing: usage in bytes → charges in integer money, every figure explained. Pure: no IO,
//! no clock.
//!
//! # Money
//!
//! Money is an integer number of **micro-units** of the plan's currency (1 USD =
//! 1 000 000 micros), `u64` for prices and charges, `i64` for wallet balances (which may go
//! negative by design, see [`Wallet`]). Decimal strings from configuration ("0.10") are parsed
//! exactly; more than [`MONEY_FRACTION_DIGITS_MAX`] fraction digits is an error, not a silent
//! rounding. Arithmetic is checked; an overflow is an error, never a wrap.
//!
//! Under the default [`Semantics::Countersign`] each charge line computes `bytes × unit price /
//! unit bytes` exactly in `u128` and rounds **half up to the micro** once per line
//! ([`MONEY_ROUNDING`]); the rule is stated on every line. Lines add up exactly to the
//! charge's total. Under [`Semantics::Lago`] the usage fee is rounded once instead (below).
//!
//! # Usage rounding
//!
//! Before pricing, usage is rounded **up** to a multiple of the plan's increment (e.g. 1 KiB)
//! per rounding unit: per session, per SIM-day or per SIM-period ([`RoundingScope`]), as
//! carriers do. The charge states the increment, the scope, and the bytes before and after.
//!
//! # Order of operations
//!
//! raw usage → rounded per rounding unit → pooled over the plan's SIMs for the period →
//! minus the included allowance → priced by the model (per unit, graduated, volume, package;
//! each tier's `flat_amount` once when the tier applies) → raised to the plan's
//! `minimum_charge` by a `minimum` true-up line → plus the flat fee (never part of the
//! minimum, as Lago's subscription fee is not part of a charge's).
//!
//! # Lago semantics
//!
//! `semantics = "lago"` makes a period's charge equal Lago's for the same plan and usage, to
//! the currency's minor unit, with Lago fed by the exporter's events (billable metric: sum of
//! `properties.bytes`, so Lago's units are bytes; a tier bound is `up_to × unit bytes`, a
//! price `price / unit bytes` as an exact decimal). The rules, from getlago/lago-api at
//! commit 1b1c24a6a6c321d7900b05906bf1b20f706c97c2:
//!
//! - The usage fee is the exact sum of the model's parts (app/services/charge_models/:
//!   `standard_service.rb` units × amount; `graduated_service.rb` with
//!   `amount_details/range_graduated_service.rb`, each range's units × per-unit amount plus
//!   its `flat_amount`, ranges taken until the first whose `to_value` is open or ≥ the units,
//!   so the first range's flat amount applies even at zero units; `volume_service.rb`, the
//!   matching range prices all units plus its flat amount; `package_service.rb`,
//!   `ceil((units − free_units) / package_size) × amount`), rounded **once, half up, to the
//!   currency's exponent** (`app/services/fees/charge_service.rb`:
//!   `amount_result.amount.round(currency.exponent)`, BigDecimal's default ROUND_HALF_UP;
//!   `config/initializers/money.rb` sets the same for Money). Part lines show their exact
//!   amount to the micro ([`LAGO_PART_ROUNDING`]); a `rounding` line (negative when the fee
//!   rounds down) brings them to the rounded fee ([`LAGO_FEE_ROUNDING`]).
//! - Free units exist only on package charges (`free_units`): `included_bytes` is deducted
//!   before packaging there. Graduated, volume and standard charges have none; the allowance
//!   of a graduated or per-unit plan is what a Lago user configures instead, a zero-priced
//!   start of the first range (tier bounds unchanged: 600 GB on $0.10/$0.08/$0.06 tiers with
//!   10 GB free is $47.00, where Countersign's deduction gives $47.40), stated by an
//!   `included` line; a volume plan with an allowance is refused. (Lago's percentage model
//!   prices a metric that is itself money; bytes are not, so it has no equivalent here.)
//! - `minimum_charge` is a charge's `min_amount_cents`: when the rounded fee is below it, a
//!   true-up of the difference (`app/services/fees/create_true_up_service.rb`; our periods
//!   are whole, so no proration). It and the flat fee (the plan's `amount_cents`) are whole
//!   minor units, as Lago stores them in cents.
//! - Exponents are ISO 4217's, for the currencies Lago accepts
//!   (`app/models/concerns/currencies.rb`); [`LAGO_CURRENCIES_DISAGREEING`], where Lago's
//!   money gem rounds otherwise, are refused.
//!
//! # Units
//!
//! Prices are per [`Unit`]; decimal and binary units are distinct names, so "GB" always means
//! 10⁹ bytes and "GiB" 2³⁰, and every line states its `unit_bytes`.
//!
//! # The plan file
//!
//! [`PricingConfig::from_toml_str`] reads `time_zone` (the IANA zone billing days are cut in,
//! default UTC), `[[plan]]` (optionally with `lifetime_quota_bytes` and `lifetime_years` for
//! quota forecasts, `semantics`, `minimum_charge`, and `flat_amount` on tiers), `[[assign]]` (customer, group, plan, ICCIDs, optional `active_since`) and
//! `[[wallet]]` (customer, currency, `opening_credit`, `alert_thresholds`, `overdraft_limit`).
//! Every error names its key (`wallet[0].currency`). Applying plans to stored usage and
//! debiting wallets is [`crate::billing`]'s.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::Date;

/// Micro-units per currency unit.
pub const MICROS_PER_UNIT: u64 = 1_000_000;
/// Fraction digits a money string may have: micro-units are the resolution.
pub const MONEY_FRACTION_DIGITS_MAX: usize = 6;
/// Integer digits a money string may have (≤ 10¹² currency units: far beyond any bill).
pub const MONEY_INTEGER_DIGITS_MAX: usize = 12;
/// Tiers a graduated or volume plan may have.
pub const TIERS_MAX: usize = 32;
/// Plans one configuration may define.
pub const PLANS_MAX: usize = 1024;
/// Assignments one configuration may define.
pub const ASSIGNMENTS_MAX: usize = 4096;
/// ICCIDs one configuration may list, over all assignments.
pub const ASSIGNED_ICCIDS_MAX: usize = 1_000_000;
/// Largest usage rounding increment: 1 GiB (larger is a unit mistake).
pub const ROUNDING_INCREMENT_BYTES_MAX: u64 = 1 << 30;
/// Threshold alerts a wallet may have.
pub const WALLET_THRESHOLDS_MAX: usize = 16;
/// Plan files larger than this are refused before they are parsed.
pub const PLAN_FILE_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Usage items one charge may be computed from.
pub const USAGE_ITEMS_MAX: usize = 10_000_000;
/// Longest averaging window of the quota forecast, in days.
pub const FORECAST_WINDOW_DAYS_MAX: u32 = 366;
/// Largest lifetime quota a forecast accepts, in bytes (1 EiB): far beyond any SIM's
/// lifetime, so a larger one is a unit mistake, refused by name rather than forecast.
pub const FORECAST_QUOTA_BYTES_MAX: u64 = 1 << 60;
/// How each line's money is rounded, as stated on the line.
pub const MONEY_ROUNDING: &str = "half_up_to_1_micro_per_line";
/// Longest customer, group or top-up name, in bytes (they appear in URLs and store keys).
pub const NAME_BYTES_MAX: usize = 64;
/// Wallets one configuration may define.
pub const WALLETS_MAX: usize = 4096;
/// Longest lifetime a plan's quota may be valid for, in years.
pub const LIFETIME_YEARS_MAX: u32 = 30;
/// The time zone billing days are cut in when a plan file names none.
pub const BILLING_TIME_ZONE_DEFAULT: &str = "UTC";

/// Why pricing failed. None is recoverable by retrying: the plan or the input must change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    /// The plan file is not TOML or has an unknown key (the message names it).
    #[error("plan config is not valid: {0}")]
    Syntax(String),
    /// A plan configuration value is wrong; `key` is its dotted path, e.g. `plan[0].tiers[1].price`.
    #[error("{key}: {reason}")]
    Invalid {
        /// Dotted path of the key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A money string is not a non-negative decimal with at most 6 fraction digits.
    #[error("'{0}' is not an amount (digits, optional '.' and up to 6 fraction digits)")]
    BadAmount(String),
    /// An intermediate figure left its integer type.
    #[error("arithmetic overflow computing {0}")]
    Overflow(&'static str),
    /// More usage items than [`USAGE_ITEMS_MAX`].
    #[error("{0} usage items exceed the limit of {USAGE_ITEMS_MAX}")]
    TooManyItems(usize),
    /// No plan is assigned to the SIM.
    #[error("no plan assigned to iccid {0}")]
    Unassigned(u64),
    /// A forecast was asked with a window of 0 or more than [`FORECAST_WINDOW_DAYS_MAX`] days,
    /// or for a plan that ends before it starts.
    #[error("forecast: {0}")]
    Forecast(&'static str),
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> PricingError {
    PricingError::Invalid { key: key.into(), reason: reason.into() }
}

mod config;
mod forecast;
mod money;
mod plans;
mod units;
mod wallets;

pub use config::*;
pub use forecast::*;
pub use money::*;
pub use plans::*;
pub use units::*;
pub use wallets::*;

#[cfg(test)]
mod lago_tests;
#[cfg(test)]
mod tests;
