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
//! Each charge line computes `bytes × unit price / unit bytes` exactly in `u128` and rounds
//! **half up to the micro** once per line ([`MONEY_ROUNDING`]); the rule is stated on every
//! line. Lines add up exactly to the charge's total.
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
//! minus the included allowance → priced by the model (per unit, graduated, volume, package)
//! → plus the flat fee.
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
//! quota forecasts), `[[assign]]` (customer, group, plan, ICCIDs, optional `active_since`) and
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

/// Parses a non-negative decimal amount ("0.10", "12", "0.000001") into micro-units, exactly.
pub fn parse_money_micros(text: &str) -> Result<u64, PricingError> {
    let bad = || PricingError::BadAmount(text.to_owned());
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    if int.is_empty()
        || int.len() > MONEY_INTEGER_DIGITS_MAX
        || frac.len() > MONEY_FRACTION_DIGITS_MAX
        || (text.contains('.') && frac.is_empty())
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let int: u64 = int.parse().map_err(|_| bad())?;
    let mut frac_micros: u64 = 0;
    for b in frac.bytes().chain(std::iter::repeat(b'0')).take(MONEY_FRACTION_DIGITS_MAX) {
        frac_micros = frac_micros * 10 + u64::from(b - b'0');
    }
    int.checked_mul(MICROS_PER_UNIT).and_then(|m| m.checked_add(frac_micros)).ok_or_else(bad)
}

/// Formats micro-units as a decimal amount with six fraction digits ("48.000000").
pub fn format_micros(micros: i128) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let m = micros.unsigned_abs();
    let per = u128::from(MICROS_PER_UNIT);
    format!("{sign}{}.{:06}", m / per, m % per)
}

/// The unit a price is quoted per. Decimal and binary units have distinct names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Unit {
    /// 1 byte.
    #[serde(rename = "B")]
    Byte,
    /// 10³ bytes.
    #[serde(rename = "KB")]
    Kb,
    /// 10⁶ bytes.
    #[serde(rename = "MB")]
    Mb,
    /// 10⁹ bytes.
    #[serde(rename = "GB")]
    Gb,
    /// 2¹⁰ bytes.
    #[serde(rename = "KiB")]
    Kib,
    /// 2²⁰ bytes.
    #[serde(rename = "MiB")]
    Mib,
    /// 2³⁰ bytes.
    #[serde(rename = "GiB")]
    Gib,
}

impl Unit {
    /// Bytes in one unit.
    pub fn bytes(self) -> u64 {
        match self {
            Unit::Byte => 1,
            Unit::Kb => 1_000,
            Unit::Mb => 1_000_000,
            Unit::Gb => 1_000_000_000,
            Unit::Kib => 1 << 10,
            Unit::Mib => 1 << 20,
            Unit::Gib => 1 << 30,
        }
    }

    /// The unit's name as configured ("GB", "GiB", …).
    pub fn name(self) -> &'static str {
        match self {
            Unit::Byte => "B",
            Unit::Kb => "KB",
            Unit::Mb => "MB",
            Unit::Gb => "GB",
            Unit::Kib => "KiB",
            Unit::Mib => "MiB",
            Unit::Gib => "GiB",
        }
    }
}

/// One tier: usage up to `up_to_units` (cumulative, in the plan's unit; `None` = no end) at
/// `unit_price_micros` per unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tier {
    /// Upper bound of the tier in units, inclusive; `None` only on the last tier.
    pub up_to_units: Option<u64>,
    /// Price per unit in micro-units.
    pub unit_price_micros: u64,
}

/// How billable usage is turned into money.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChargeModel {
    /// Every unit at one price.
    PerUnit {
        /// Price per unit in micro-units.
        unit_price_micros: u64,
    },
    /// Each tier prices the usage that falls inside it.
    Graduated {
        /// Ascending tiers, the last one open.
        tiers: Vec<Tier>,
    },
    /// All usage at the price of the tier the total falls in.
    Volume {
        /// Ascending tiers, the last one open.
        tiers: Vec<Tier>,
    },
    /// Usage in whole packages of `package_bytes`, each started package charged in full.
    Package {
        /// Bytes per package.
        package_bytes: u64,
        /// Price per package in micro-units.
        package_price_micros: u64,
    },
}

/// Which usage is rounded up to the increment as one unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundingScope {
    /// Each usage item (a carrier data session) on its own.
    Session,
    /// Each SIM's usage of one day.
    SimDay,
    /// Each SIM's usage of the whole billing period.
    SimPeriod,
}

/// Usage rounding rule: round up to a multiple of `increment_bytes` per `scope`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rounding {
    /// The increment; 1 means no rounding.
    pub increment_bytes: u64,
    /// What is rounded as one unit.
    pub scope: RoundingScope,
}

/// How billing periods are cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BillingCycle {
    /// One period per day.
    Daily,
    /// Calendar months starting on `anchor_day` (1–28, so every month has it).
    Monthly {
        /// Day of month periods start on.
        anchor_day: u8,
    },
}

/// A billing period: `start` inclusive, `end` exclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BillingPeriod {
    /// First day.
    #[serde(serialize_with = "ser_date")]
    pub start: Date,
    /// First day after the period.
    #[serde(serialize_with = "ser_date")]
    pub end: Date,
}

fn ser_date<S: serde::Serializer>(d: &Date, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::server::format_date(*d))
}

impl BillingCycle {
    /// The period containing `date`; `None` at the ends of the calendar.
    pub fn period_of(self, date: Date) -> Option<BillingPeriod> {
        match self {
            BillingCycle::Daily => Some(BillingPeriod { start: date, end: date.next_day()? }),
            BillingCycle::Monthly { anchor_day } => {
                let this = date.replace_day(anchor_day).ok()?;
                let start = if date.day() >= anchor_day { this } else { add_months(this, -1)? };
                Some(BillingPeriod { start, end: add_months(start, 1)? })
            }
        }
    }
}

/// `date` moved by `months`; the day must exist in the target month (anchor days are ≤ 28).
fn add_months(date: Date, months: i32) -> Option<Date> {
    let index = date.year().checked_mul(12)?.checked_add(i32::from(u8::from(date.month())) - 1)?;
    let target = index.checked_add(months)?;
    let month = time::Month::try_from(u8::try_from(target.rem_euclid(12) + 1).ok()?).ok()?;
    Date::from_calendar_date(target.div_euclid(12), month, date.day()).ok()
}

/// A validated plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The plan's id, as referenced by assignments and stated on charges.
    pub id: String,
    /// ISO currency code, stated on charges; money is in its micro-units.
    pub currency: String,
    /// Unit prices are quoted per.
    pub unit: Unit,
    /// The charge model.
    pub model: ChargeModel,
    /// Flat fee per billing period, micro-units.
    pub flat_fee_micros: u64,
    /// Bytes per period included in the flat fee, priced at zero.
    pub included_bytes: u64,
    /// Usage rounding.
    pub rounding: Rounding,
    /// Billing periods.
    pub cycle: BillingCycle,
    /// A lifetime quota (e.g. 500 MB over 10 years) the plan's SIMs are forecast against.
    pub lifetime: Option<LifetimeQuota>,
}

/// A lifetime data quota: `quota_bytes` over `years` from a SIM's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LifetimeQuota {
    /// Bytes the SIM may use over the whole lifetime.
    pub quota_bytes: u64,
    /// Years the quota is valid for.
    pub years: u32,
}

impl LifetimeQuota {
    /// The last day of a lifetime that starts on `since`; `None` beyond the calendar.
    pub fn last_day(self, since: Date) -> Option<Date> {
        let months = i32::try_from(self.years).ok()?.checked_mul(12)?;
        add_months_clamped(since, months)?.previous_day()
    }
}

/// `date` moved by `months`, the day clamped to the target month's length (29 February plus
/// a year is 28 February).
pub fn add_months_clamped(date: Date, months: i32) -> Option<Date> {
    let index = date.year().checked_mul(12)?.checked_add(i32::from(u8::from(date.month())) - 1)?;
    let target = index.checked_add(months)?;
    let month = time::Month::try_from(u8::try_from(target.rem_euclid(12) + 1).ok()?).ok()?;
    let year = target.div_euclid(12);
    let day = date.day().min(month.length(year));
    Date::from_calendar_date(year, month, day).ok()
}

/// One usage item to price: a session or a day of one SIM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsageItem {
    /// The SIM.
    pub iccid: u64,
    /// The day it is attributed to.
    pub date: Date,
    /// Bytes, both directions.
    pub bytes: u64,
}

/// The rounding a charge applied, stated on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RoundingApplied {
    /// The increment usage was rounded up to.
    pub increment_bytes: u64,
    /// What was rounded as one unit.
    pub scope: RoundingScope,
    /// How many rounding units there were.
    pub rounding_units: u64,
    /// Usage before rounding.
    pub raw_bytes: u64,
    /// Usage after rounding.
    pub rounded_bytes: u64,
}

/// One line of a charge: what, how much, at what price, how it was rounded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChargeLine {
    /// `flat_fee`, `allowance`, `per_unit`, `tier`, `volume` or `package`.
    pub kind: &'static str,
    /// Human explanation, e.g. "tier 2: 100 GB < usage ≤ 500 GB".
    pub description: String,
    /// Bytes priced on this line.
    pub quantity_bytes: u64,
    /// The pricing unit's name ("GB"), or "package"/"period".
    pub unit: String,
    /// Bytes per unit.
    pub unit_bytes: u64,
    /// Price per unit in micro-units.
    pub unit_price_micros: u64,
    /// Amount in micro-units.
    pub amount_micros: u64,
    /// How the amount was rounded.
    pub money_rounding: &'static str,
}

/// A priced billing period for one customer or SIM group under one plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Charge {
    /// The plan.
    pub plan_id: String,
    /// The currency.
    pub currency: String,
    /// The billing period.
    pub period: BillingPeriod,
    /// Usage rounding applied.
    pub rounding: RoundingApplied,
    /// Included allowance deducted before pricing.
    pub included_bytes: u64,
    /// Bytes priced after the allowance.
    pub billable_bytes: u64,
    /// The lines; their amounts add up to `total_micros`.
    pub lines: Vec<ChargeLine>,
    /// Total in micro-units.
    pub total_micros: u64,
}

/// `bytes` rounded up to a multiple of `increment` (≥ 1).
pub fn round_up(bytes: u64, increment: u64) -> Result<u64, PricingError> {
    let increment = increment.max(1);
    let rem = bytes % increment;
    if rem == 0 {
        return Ok(bytes);
    }
    bytes.checked_add(increment - rem).ok_or(PricingError::Overflow("rounded usage"))
}

/// Rounds and pools the items of one period per the rule; returns (raw, rounded, units).
pub fn apply_rounding(rule: Rounding, items: &[UsageItem]) -> Result<RoundingApplied, PricingError> {
    if items.len() > USAGE_ITEMS_MAX {
        return Err(PricingError::TooManyItems(items.len()));
    }
    let ovf = || PricingError::Overflow("usage total");
    let mut groups = BTreeMap::<(u64, Option<Date>, usize), u64>::new();
    for (i, it) in items.iter().enumerate() {
        let key = match rule.scope {
            RoundingScope::Session => (it.iccid, Some(it.date), i),
            RoundingScope::SimDay => (it.iccid, Some(it.date), 0),
            RoundingScope::SimPeriod => (it.iccid, None, 0),
        };
        let e = groups.entry(key).or_default();
        *e = e.checked_add(it.bytes).ok_or_else(ovf)?;
    }
    let (mut raw, mut rounded) = (0u64, 0u64);
    for bytes in groups.values() {
        raw = raw.checked_add(*bytes).ok_or_else(ovf)?;
        rounded = rounded.checked_add(round_up(*bytes, rule.increment_bytes)?).ok_or_else(ovf)?;
    }
    Ok(RoundingApplied {
        increment_bytes: rule.increment_bytes,
        scope: rule.scope,
        rounding_units: groups.len() as u64,
        raw_bytes: raw,
        rounded_bytes: rounded,
    })
}

/// `bytes × price / unit_bytes`, rounded half up to the micro.
fn amount(bytes: u64, price_micros: u64, unit_bytes: u64) -> Result<u64, PricingError> {
    let num = u128::from(bytes) * u128::from(price_micros);
    let den = u128::from(unit_bytes.max(1));
    let q = num / den + u128::from(2 * (num % den) >= den);
    u64::try_from(q).map_err(|_| PricingError::Overflow("line amount"))
}

fn tier_bound_bytes(tier: &Tier, unit_bytes: u64) -> Result<Option<u64>, PricingError> {
    tier.up_to_units
        .map(|u| u.checked_mul(unit_bytes).ok_or(PricingError::Overflow("tier bound")))
        .transpose()
}

/// Prices `billable` bytes under `plan`'s model: the lines, without flat fee and allowance.
pub fn model_lines(plan: &Plan, billable: u64) -> Result<Vec<ChargeLine>, PricingError> {
    let ub = plan.unit.bytes();
    let unit = plan.unit.name();
    let line = |kind, description: String, q: u64, price: u64| -> Result<ChargeLine, PricingError> {
        Ok(ChargeLine {
            kind,
            description,
            quantity_bytes: q,
            unit: unit.to_owned(),
            unit_bytes: ub,
            unit_price_micros: price,
            amount_micros: amount(q, price, ub)?,
            money_rounding: MONEY_ROUNDING,
        })
    };
    let range_text = |lo: Option<u64>, hi: Option<u64>| match (lo, hi) {
        (None, Some(h)) => format!("usage ≤ {h} {unit}"),
        (Some(l), Some(h)) => format!("{l} {unit} < usage ≤ {h} {unit}"),
        (Some(l), None) => format!("usage > {l} {unit}"),
        (None, None) => "all usage".to_owned(),
    };
    match &plan.model {
        ChargeModel::PerUnit { unit_price_micros } => {
            Ok(vec![line("per_unit", format!("per {unit}"), billable, *unit_price_micros)?])
        }
        ChargeModel::Graduated { tiers } => {
            let mut out = Vec::new();
            let mut lower = 0u64;
            let mut lower_units = None;
            for (i, t) in tiers.iter().enumerate() {
                let upper = tier_bound_bytes(t, ub)?.unwrap_or(u64::MAX);
                let q = billable.min(upper).saturating_sub(lower);
                out.push(line(
                    "tier",
                    format!("tier {}: {}", i + 1, range_text(lower_units, t.up_to_units)),
                    q,
                    t.unit_price_micros,
                )?);
                if billable <= upper {
                    break;
                }
                lower = upper;
                lower_units = t.up_to_units;
            }
            Ok(out)
        }
        ChargeModel::Volume { tiers } => {
            let mut lower_units = None;
            for (i, t) in tiers.iter().enumerate() {
                let upper = tier_bound_bytes(t, ub)?;
                if upper.is_none_or(|u| billable <= u) {
                    return Ok(vec![line(
                        "volume",
                        format!(
                            "tier {} ({}) prices all usage",
                            i + 1,
                            range_text(lower_units, t.up_to_units)
                        ),
                        billable,
                        t.unit_price_micros,
                    )?]);
                }
                lower_units = t.up_to_units;
            }
            Err(invalid("tiers", "the last tier must be open (no up_to)"))
        }
        ChargeModel::Package { package_bytes, package_price_micros } => {
            let packages = billable.div_ceil((*package_bytes).max(1));
            let amount_micros = packages
                .checked_mul(*package_price_micros)
                .ok_or(PricingError::Overflow("package amount"))?;
            Ok(vec![ChargeLine {
                kind: "package",
                description: format!("{packages} started package(s) of {package_bytes} bytes"),
                quantity_bytes: billable,
                unit: "package".to_owned(),
                unit_bytes: *package_bytes,
                unit_price_micros: *package_price_micros,
                amount_micros,
                money_rounding: "each started package charged in full",
            }])
        }
    }
}

/// Prices one billing period's usage items (of the SIMs sharing this plan) under `plan`.
pub fn rate(plan: &Plan, period: BillingPeriod, items: &[UsageItem]) -> Result<Charge, PricingError> {
    let in_period: Vec<UsageItem> =
        items.iter().filter(|i| i.date >= period.start && i.date < period.end).copied().collect();
    let rounding = apply_rounding(plan.rounding, &in_period)?;
    let billable = rounding.rounded_bytes.saturating_sub(plan.included_bytes);
    let mut lines = Vec::new();
    if plan.flat_fee_micros > 0 || plan.included_bytes > 0 {
        lines.push(ChargeLine {
            kind: "flat_fee",
            description: format!("flat fee, {} bytes included", plan.included_bytes),
            quantity_bytes: rounding.rounded_bytes.min(plan.included_bytes),
            unit: "period".to_owned(),
            unit_bytes: 0,
            unit_price_micros: plan.flat_fee_micros,
            amount_micros: plan.flat_fee_micros,
            money_rounding: "none",
        });
    }
    lines.extend(model_lines(plan, billable)?);
    let total_micros = lines
        .iter()
        .try_fold(0u64, |a, l| a.checked_add(l.amount_micros))
        .ok_or(PricingError::Overflow("charge total"))?;
    tracing::debug!(plan = %plan.id, total_micros, billable, "period rated");
    Ok(Charge {
        plan_id: plan.id.clone(),
        currency: plan.currency.clone(),
        period,
        rounding,
        included_bytes: plan.included_bytes,
        billable_bytes: billable,
        lines,
        total_micros,
    })
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// Plans and who they apply to, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PricingConfig {
    /// Plans by id.
    pub plans: BTreeMap<String, Plan>,
    /// Assignments, in file order.
    pub assignments: Vec<Assignment>,
    /// Prepaid wallets by customer.
    pub wallets: BTreeMap<String, WalletConfig>,
    /// IANA zone billing days are cut in (`time_zone`, default UTC), checked to exist.
    pub time_zone: String,
    by_iccid: BTreeMap<u64, usize>,
}

/// A customer's prepaid credit wallet, as configured (`[[wallet]]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalletConfig {
    /// The customer whose charges it pays.
    pub customer: String,
    /// Its currency: the currency of every plan of the customer.
    pub currency: String,
    /// Credit before any top-up, micro-units (`opening_credit`).
    pub opening_micros: i64,
    /// Balances at or below which an alert fires (`alert_thresholds`), micro-units.
    pub thresholds_micros: Vec<i64>,
    /// How far below zero the balance may go before the SIMs should be barred
    /// (`overdraft_limit`), micro-units.
    pub overdraft_limit_micros: i64,
}

impl WalletConfig {
    /// The wallet at `balance_micros`, with this configuration's thresholds and limit.
    pub fn wallet(&self, balance_micros: i64) -> Wallet {
        Wallet {
            balance_micros,
            overdraft_limit_micros: self.overdraft_limit_micros,
            thresholds_micros: self.thresholds_micros.clone(),
        }
    }
}

/// A customer or SIM group under one plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// The customer billed.
    pub customer: String,
    /// The SIM group's name (usage of its SIMs is pooled per period).
    pub group: String,
    /// The plan's id.
    pub plan: String,
    /// The SIMs.
    pub iccids: Vec<u64>,
    /// The day the group's SIMs were activated (`active_since`): billing periods (and their
    /// flat fees) start there, and lifetime quotas are counted from it.
    pub active_since: Option<Date>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPricing {
    time_zone: Option<String>,
    #[serde(default)]
    plan: Vec<RawPlan>,
    #[serde(default)]
    assign: Vec<RawAssign>,
    #[serde(default)]
    wallet: Vec<RawWallet>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWallet {
    customer: String,
    currency: String,
    opening_credit: Option<String>,
    #[serde(default)]
    alert_thresholds: Vec<String>,
    overdraft_limit: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    id: String,
    currency: String,
    unit: Option<Unit>,
    model: String,
    price: Option<String>,
    tiers: Option<Vec<RawTier>>,
    package_bytes: Option<u64>,
    package_price: Option<String>,
    flat_fee: Option<String>,
    included_bytes: Option<u64>,
    rounding_increment_bytes: Option<u64>,
    rounding_scope: Option<RoundingScope>,
    billing_cycle: Option<String>,
    billing_anchor_day: Option<u8>,
    lifetime_quota_bytes: Option<u64>,
    lifetime_years: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    up_to: Option<u64>,
    price: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAssign {
    customer: String,
    group: String,
    plan: String,
    iccids: Vec<String>,
    active_since: Option<String>,
}

fn money_at(key: String, text: &str) -> Result<u64, PricingError> {
    parse_money_micros(text).map_err(|e| invalid(key, e.to_string()))
}

fn tiers_at(key: &str, raw: Option<Vec<RawTier>>) -> Result<Vec<Tier>, PricingError> {
    let raw = raw.ok_or_else(|| invalid(format!("{key}.tiers"), "required for this model"))?;
    if raw.is_empty() || raw.len() > TIERS_MAX {
        return Err(invalid(format!("{key}.tiers"), format!("expected 1 to {TIERS_MAX} tiers")));
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut previous = 0u64;
    for (i, t) in raw.iter().enumerate() {
        let k = format!("{key}.tiers[{i}]");
        let last = i + 1 == raw.len();
        match (t.up_to, last) {
            (None, false) => return Err(invalid(format!("{k}.up_to"), "required on all but the last tier")),
            (Some(_), true) => return Err(invalid(format!("{k}.up_to"), "the last tier must be open")),
            (Some(u), false) if u <= previous => {
                return Err(invalid(format!("{k}.up_to"), "tier bounds must increase and be above 0"))
            }
            (Some(u), false) => previous = u,
            (None, true) => {}
        }
        out.push(Tier { up_to_units: t.up_to, unit_price_micros: money_at(format!("{k}.price"), &t.price)? });
    }
    Ok(out)
}

fn plan_from_raw(i: usize, r: RawPlan) -> Result<Plan, PricingError> {
    let key = format!("plan[{i}]");
    if r.id.is_empty() || r.id.len() > 64 {
        return Err(invalid(format!("{key}.id"), "expected 1 to 64 characters"));
    }
    if r.currency.len() != 3 || !r.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(invalid(format!("{key}.currency"), "expected an ISO 4217 code such as USD"));
    }
    let unit = r.unit.unwrap_or(Unit::Gb);
    let reject = |name: &str, present: bool| {
        if present {
            Err(invalid(format!("{key}.{name}"), format!("not used by model '{}'", r.model)))
        } else {
            Ok(())
        }
    };
    let model = match r.model.as_str() {
        "per_unit" => {
            reject("tiers", r.tiers.is_some())?;
            let p = r.price.as_deref().ok_or_else(|| invalid(format!("{key}.price"), "required"))?;
            ChargeModel::PerUnit { unit_price_micros: money_at(format!("{key}.price"), p)? }
        }
        "graduated" | "volume" => {
            reject("price", r.price.is_some())?;
            let tiers = tiers_at(&key, r.tiers)?;
            for t in &tiers {
                tier_bound_bytes(t, unit.bytes())
                    .map_err(|_| invalid(format!("{key}.tiers"), "a bound overflows 64-bit bytes"))?;
            }
            if r.model == "graduated" {
                ChargeModel::Graduated { tiers }
            } else {
                ChargeModel::Volume { tiers }
            }
        }
        "package" => {
            let package_bytes = r
                .package_bytes
                .filter(|b| *b > 0)
                .ok_or_else(|| invalid(format!("{key}.package_bytes"), "required, above 0"))?;
            let p = r
                .package_price
                .as_deref()
                .ok_or_else(|| invalid(format!("{key}.package_price"), "required"))?;
            ChargeModel::Package {
                package_bytes,
                package_price_micros: money_at(format!("{key}.package_price"), p)?,
            }
        }
        other => {
            return Err(invalid(
                format!("{key}.model"),
                format!("'{other}' is not one of per_unit, graduated, volume, package"),
            ))
        }
    };
    let increment = r.rounding_increment_bytes.unwrap_or(1);
    if increment == 0 || increment > ROUNDING_INCREMENT_BYTES_MAX {
        return Err(invalid(
            format!("{key}.rounding_increment_bytes"),
            format!("expected 1 to {ROUNDING_INCREMENT_BYTES_MAX}"),
        ));
    }
    let cycle = match r.billing_cycle.as_deref().unwrap_or("monthly") {
        "daily" => {
            reject("billing_anchor_day", r.billing_anchor_day.is_some())?;
            BillingCycle::Daily
        }
        "monthly" => {
            let anchor_day = r.billing_anchor_day.unwrap_or(1);
            if !(1..=28).contains(&anchor_day) {
                return Err(invalid(format!("{key}.billing_anchor_day"), "expected 1 to 28"));
            }
            BillingCycle::Monthly { anchor_day }
        }
        other => {
            return Err(invalid(format!("{key}.billing_cycle"), format!("'{other}' is not daily or monthly")))
        }
    };
    let lifetime = match (r.lifetime_quota_bytes, r.lifetime_years) {
        (None, None) => None,
        (Some(quota_bytes), years) => {
            let years = years.unwrap_or(10);
            if quota_bytes == 0 {
                return Err(invalid(format!("{key}.lifetime_quota_bytes"), "must be above 0"));
            }
            if !(1..=LIFETIME_YEARS_MAX).contains(&years) {
                return Err(invalid(
                    format!("{key}.lifetime_years"),
                    format!("expected 1 to {LIFETIME_YEARS_MAX}"),
                ));
            }
            Some(LifetimeQuota { quota_bytes, years })
        }
        (None, Some(_)) => {
            return Err(invalid(format!("{key}.lifetime_years"), "needs lifetime_quota_bytes"))
        }
    };
    Ok(Plan {
        lifetime,
        id: r.id,
        currency: r.currency,
        unit,
        model,
        flat_fee_micros: r
            .flat_fee
            .as_deref()
            .map(|f| money_at(format!("{key}.flat_fee"), f))
            .transpose()?
            .unwrap_or(0),
        included_bytes: r.included_bytes.unwrap_or(0),
        rounding: Rounding {
            increment_bytes: increment,
            scope: r.rounding_scope.unwrap_or(RoundingScope::SimDay),
        },
        cycle,
    })
}

/// Checks a customer, group or top-up name: 1 to [`NAME_BYTES_MAX`] of `A-Z a-z 0-9 . _ -`
/// (names appear in URL paths and store keys).
pub fn check_name(key: &str, name: &str) -> Result<(), PricingError> {
    let ok = !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(key, format!("'{name}': expected 1 to {NAME_BYTES_MAX} of A-Z a-z 0-9 . _ -")))
    }
}

fn signed_money_at(key: String, text: &str) -> Result<i64, PricingError> {
    let micros = money_at(key.clone(), text)?;
    i64::try_from(micros).map_err(|_| invalid(key, "too large"))
}

fn wallet_from_raw(
    i: usize,
    w: RawWallet,
    plans: &BTreeMap<String, Plan>,
    assignments: &[Assignment],
) -> Result<WalletConfig, PricingError> {
    let key = format!("wallet[{i}]");
    check_name(&format!("{key}.customer"), &w.customer)?;
    let mine: Vec<&Assignment> = assignments.iter().filter(|a| a.customer == w.customer).collect();
    if mine.is_empty() {
        return Err(invalid(
            format!("{key}.customer"),
            format!("no [[assign]] names customer '{}': a wallet pays a customer's plans", w.customer),
        ));
    }
    for a in mine {
        let currency = plans.get(&a.plan).map(|p| p.currency.as_str()).unwrap_or_default();
        if currency != w.currency {
            return Err(invalid(
                format!("{key}.currency"),
                format!(
                    "'{}' differs from '{currency}' of plan '{}' (group '{}'): a wallet pays in one currency",
                    w.currency, a.plan, a.group
                ),
            ));
        }
    }
    let opening_micros = w
        .opening_credit
        .as_deref()
        .map(|t| signed_money_at(format!("{key}.opening_credit"), t))
        .transpose()?
        .unwrap_or(0);
    let overdraft_limit_micros = w
        .overdraft_limit
        .as_deref()
        .map(|t| signed_money_at(format!("{key}.overdraft_limit"), t))
        .transpose()?
        .unwrap_or(0);
    if w.alert_thresholds.len() > WALLET_THRESHOLDS_MAX {
        return Err(invalid(
            format!("{key}.alert_thresholds"),
            format!("at most {WALLET_THRESHOLDS_MAX} thresholds"),
        ));
    }
    let mut thresholds_micros = Vec::with_capacity(w.alert_thresholds.len());
    for (j, t) in w.alert_thresholds.iter().enumerate() {
        let t = signed_money_at(format!("{key}.alert_thresholds[{j}]"), t)?;
        if thresholds_micros.contains(&t) {
            return Err(invalid(format!("{key}.alert_thresholds[{j}]"), "listed twice"));
        }
        thresholds_micros.push(t);
    }
    Ok(WalletConfig {
        customer: w.customer,
        currency: w.currency,
        opening_micros,
        thresholds_micros,
        overdraft_limit_micros,
    })
}

impl PricingConfig {
    /// Parses and validates a plan file (see README, "Pricing"). Every error names its key.
    pub fn from_toml_str(text: &str) -> Result<Self, PricingError> {
        if text.len() > PLAN_FILE_BYTES_MAX {
            return Err(PricingError::Syntax(format!("larger than {PLAN_FILE_BYTES_MAX} bytes")));
        }
        let raw: RawPricing =
            toml::from_str(text).map_err(|e| PricingError::Syntax(e.message().to_owned()))?;
        if raw.plan.len() > PLANS_MAX {
            return Err(invalid("plan", format!("more than {PLANS_MAX} plans")));
        }
        if raw.assign.len() > ASSIGNMENTS_MAX {
            return Err(invalid("assign", format!("more than {ASSIGNMENTS_MAX} assignments")));
        }
        let mut plans = BTreeMap::new();
        for (i, r) in raw.plan.into_iter().enumerate() {
            let p = plan_from_raw(i, r)?;
            if plans.contains_key(&p.id) {
                return Err(invalid(format!("plan[{i}].id"), format!("'{}' is defined twice", p.id)));
            }
            plans.insert(p.id.clone(), p);
        }
        let time_zone = raw.time_zone.unwrap_or_else(|| BILLING_TIME_ZONE_DEFAULT.to_owned());
        crate::usage::time_zone(&time_zone).map_err(|e| invalid("time_zone", e.to_string()))?;
        let mut assignments: Vec<Assignment> = Vec::new();
        let mut by_iccid = BTreeMap::new();
        let mut count = 0usize;
        for (i, a) in raw.assign.into_iter().enumerate() {
            let key = format!("assign[{i}]");
            check_name(&format!("{key}.customer"), &a.customer)?;
            check_name(&format!("{key}.group"), &a.group)?;
            if !plans.contains_key(&a.plan) {
                return Err(invalid(format!("{key}.plan"), format!("no plan '{}'", a.plan)));
            }
            if let Some(j) = assignments.iter().position(|b| b.customer == a.customer && b.group == a.group) {
                return Err(invalid(
                    format!("{key}.group"),
                    format!("customer '{}' already has a group '{}' (assign[{j}])", a.customer, a.group),
                ));
            }
            let active_since = a
                .active_since
                .as_deref()
                .map(|s| {
                    crate::server::parse_date(s).ok_or_else(|| {
                        invalid(format!("{key}.active_since"), format!("'{s}' is not a date (YYYY-MM-DD)"))
                    })
                })
                .transpose()?;
            count = count.saturating_add(a.iccids.len());
            if count > ASSIGNED_ICCIDS_MAX {
                return Err(invalid(
                    format!("{key}.iccids"),
                    format!("more than {ASSIGNED_ICCIDS_MAX} in all"),
                ));
            }
            let mut iccids = Vec::with_capacity(a.iccids.len());
            for (j, s) in a.iccids.iter().enumerate() {
                let iccid = crate::server::parse_iccid(s)
                    .ok_or_else(|| invalid(format!("{key}.iccids[{j}]"), format!("'{s}' is not an ICCID")))?;
                if let Some(other) = by_iccid.insert(iccid, assignments.len()) {
                    let place = match assignments.get(other) {
                        Some(o) => {
                            format!("group '{}' of customer '{}' (assign[{other}])", o.group, o.customer)
                        }
                        None => "this group already".to_owned(),
                    };
                    return Err(invalid(format!("{key}.iccids[{j}]"), format!("{s} is already in {place}")));
                }
                iccids.push(iccid);
            }
            assignments.push(Assignment {
                customer: a.customer,
                group: a.group,
                plan: a.plan,
                iccids,
                active_since,
            });
        }
        if raw.wallet.len() > WALLETS_MAX {
            return Err(invalid("wallet", format!("more than {WALLETS_MAX} wallets")));
        }
        let mut wallets = BTreeMap::new();
        for (i, w) in raw.wallet.into_iter().enumerate() {
            let w = wallet_from_raw(i, w, &plans, &assignments)?;
            if wallets.contains_key(&w.customer) {
                return Err(invalid(
                    format!("wallet[{i}].customer"),
                    format!("customer '{}' has a wallet already", w.customer),
                ));
            }
            wallets.insert(w.customer.clone(), w);
        }
        Ok(Self { plans, assignments, wallets, time_zone, by_iccid })
    }

    /// The index in [`PricingConfig::assignments`] of the SIM's assignment.
    pub fn assignment_index_of(&self, iccid: u64) -> Option<usize> {
        self.by_iccid.get(&iccid).copied()
    }

    /// Every SIM assigned, over all assignments.
    pub fn assigned_sims(&self) -> usize {
        self.by_iccid.len()
    }

    /// The assignment (customer, group, plan) of a SIM.
    pub fn assignment_of(&self, iccid: u64) -> Result<&Assignment, PricingError> {
        self.by_iccid
            .get(&iccid)
            .and_then(|i| self.assignments.get(*i))
            .ok_or(PricingError::Unassigned(iccid))
    }

    /// Prices the period of `assignment` containing `day` from usage items of any SIMs; only
    /// the group's SIMs are counted.
    pub fn rate_group(
        &self,
        assignment: &Assignment,
        day: Date,
        items: &[UsageItem],
    ) -> Result<Charge, PricingError> {
        let plan = self
            .plans
            .get(&assignment.plan)
            .ok_or_else(|| invalid("assign.plan", format!("no plan '{}'", assignment.plan)))?;
        let period = plan.cycle.period_of(day).ok_or(PricingError::Overflow("billing period"))?;
        let mine: Vec<UsageItem> =
            items.iter().filter(|i| assignment.iccids.contains(&i.iccid)).copied().collect();
        rate(plan, period, &mine)
    }
}

// ---------------------------------------------------------------------------------------------
// Wallets

/// An alert a wallet debit raised.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "alert", rename_all = "snake_case")]
pub enum WalletAlert {
    /// The balance fell to or below a configured threshold.
    ThresholdCrossed {
        /// The threshold, micro-units.
        threshold_micros: i64,
        /// The balance after the debit.
        balance_micros: i64,
    },
    /// The balance went below zero: usage is now on credit.
    Overdrawn {
        /// The balance after the debit.
        balance_micros: i64,
    },
    /// The balance went below minus the overdraft limit: the SIMs should be barred.
    OverdraftLimitExceeded {
        /// The balance after the debit.
        balance_micros: i64,
        /// The limit.
        overdraft_limit_micros: i64,
    },
}

/// What a wallet alert is about; it holds while the balance stays on its side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AlertCondition {
    /// The balance is at or below this threshold, micro-units.
    Threshold(i64),
    /// The balance is below zero.
    Overdrawn,
    /// The balance is below minus the overdraft limit.
    OverdraftLimitExceeded,
}

impl AlertCondition {
    /// A stable text form for stores: `threshold:<micros>`, `overdrawn`, `overdraft_limit_exceeded`.
    pub fn key(self) -> String {
        match self {
            AlertCondition::Threshold(t) => format!("threshold:{t}"),
            AlertCondition::Overdrawn => "overdrawn".to_owned(),
            AlertCondition::OverdraftLimitExceeded => "overdraft_limit_exceeded".to_owned(),
        }
    }

    /// The inverse of [`AlertCondition::key`].
    pub fn from_key(key: &str) -> Option<Self> {
        match key {
            "overdrawn" => Some(AlertCondition::Overdrawn),
            "overdraft_limit_exceeded" => Some(AlertCondition::OverdraftLimitExceeded),
            other => other.strip_prefix("threshold:")?.parse().ok().map(AlertCondition::Threshold),
        }
    }
}

impl WalletAlert {
    /// The condition that raised it.
    pub fn condition(&self) -> AlertCondition {
        match self {
            WalletAlert::ThresholdCrossed { threshold_micros, .. } => {
                AlertCondition::Threshold(*threshold_micros)
            }
            WalletAlert::Overdrawn { .. } => AlertCondition::Overdrawn,
            WalletAlert::OverdraftLimitExceeded { .. } => AlertCondition::OverdraftLimitExceeded,
        }
    }

    /// `threshold_crossed`, `overdrawn` or `overdraft_limit_exceeded`.
    pub fn kind(&self) -> &'static str {
        match self {
            WalletAlert::ThresholdCrossed { .. } => "threshold_crossed",
            WalletAlert::Overdrawn { .. } => "overdrawn",
            WalletAlert::OverdraftLimitExceeded { .. } => "overdraft_limit_exceeded",
        }
    }

    /// The balance when it was raised.
    pub fn balance_micros(&self) -> i64 {
        match self {
            WalletAlert::ThresholdCrossed { balance_micros, .. }
            | WalletAlert::Overdrawn { balance_micros }
            | WalletAlert::OverdraftLimitExceeded { balance_micros, .. } => *balance_micros,
        }
    }
}

/// A prepaid credit wallet.
///
/// Usage has happened by the time it is priced, so a debit is never refused: refusing it would
/// lose revenue silently. Instead the balance may go negative, and every downward crossing of
/// a threshold, of zero and of the overdraft limit raises an alert; [`Wallet::overdrawn`]
/// and [`Wallet::limit_exceeded`] stay visible until a top-up lifts the balance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Wallet {
    /// Balance in micro-units.
    pub balance_micros: i64,
    /// How far below zero the balance may go before [`WalletAlert::OverdraftLimitExceeded`].
    pub overdraft_limit_micros: i64,
    /// Alert thresholds (≥ 0), micro-units.
    pub thresholds_micros: Vec<i64>,
}

impl Wallet {
    /// A wallet; thresholds beyond [`WALLET_THRESHOLDS_MAX`] or negative values are refused.
    pub fn new(
        balance_micros: i64,
        overdraft_limit_micros: i64,
        thresholds_micros: Vec<i64>,
    ) -> Result<Self, PricingError> {
        if thresholds_micros.len() > WALLET_THRESHOLDS_MAX || thresholds_micros.iter().any(|t| *t < 0) {
            return Err(invalid(
                "wallet.thresholds",
                format!("up to {WALLET_THRESHOLDS_MAX} non-negative amounts"),
            ));
        }
        if overdraft_limit_micros < 0 {
            return Err(invalid("wallet.overdraft_limit", "must not be negative"));
        }
        Ok(Self { balance_micros, overdraft_limit_micros, thresholds_micros })
    }

    /// Whether the balance is below zero.
    pub fn overdrawn(&self) -> bool {
        self.balance_micros < 0
    }

    /// Whether the balance is below minus the overdraft limit.
    pub fn limit_exceeded(&self) -> bool {
        self.balance_micros < -self.overdraft_limit_micros
    }

    /// Debits `amount_micros` (a charge's total) and returns the alerts the debit raised.
    pub fn debit(&mut self, amount_micros: u64) -> Result<Vec<WalletAlert>, PricingError> {
        let amount = i64::try_from(amount_micros).map_err(|_| PricingError::Overflow("wallet debit"))?;
        let before = self.balance_micros;
        let after = before.checked_sub(amount).ok_or(PricingError::Overflow("wallet balance"))?;
        self.balance_micros = after;
        let mut alerts: Vec<WalletAlert> = self
            .thresholds_micros
            .iter()
            .filter(|t| before > **t && after <= **t)
            .map(|t| WalletAlert::ThresholdCrossed { threshold_micros: *t, balance_micros: after })
            .collect();
        if before >= 0 && after < 0 {
            alerts.push(WalletAlert::Overdrawn { balance_micros: after });
        }
        let floor = -self.overdraft_limit_micros;
        if before >= floor && after < floor {
            alerts.push(WalletAlert::OverdraftLimitExceeded {
                balance_micros: after,
                overdraft_limit_micros: self.overdraft_limit_micros,
            });
        }
        for a in &alerts {
            tracing::warn!(alert = ?a, "wallet alert");
        }
        Ok(alerts)
    }

    /// The alert conditions that hold at the current balance: each threshold the balance is
    /// at or below, below zero, below minus the overdraft limit. An alert fires when its
    /// condition starts to hold (the same crossings [`Wallet::debit`] reports); a billing run
    /// keeps the set durably so that each crossing alerts once, and a top-up that lifts the
    /// balance re-arms what no longer holds.
    pub fn conditions(&self) -> std::collections::BTreeSet<AlertCondition> {
        let mut out: std::collections::BTreeSet<AlertCondition> = self
            .thresholds_micros
            .iter()
            .filter(|t| self.balance_micros <= **t)
            .map(|t| AlertCondition::Threshold(*t))
            .collect();
        if self.overdrawn() {
            out.insert(AlertCondition::Overdrawn);
        }
        if self.limit_exceeded() {
            out.insert(AlertCondition::OverdraftLimitExceeded);
        }
        out
    }

    /// The alert `condition` raises at the current balance.
    pub fn alert(&self, condition: AlertCondition) -> WalletAlert {
        let balance_micros = self.balance_micros;
        match condition {
            AlertCondition::Threshold(threshold_micros) => {
                WalletAlert::ThresholdCrossed { threshold_micros, balance_micros }
            }
            AlertCondition::Overdrawn => WalletAlert::Overdrawn { balance_micros },
            AlertCondition::OverdraftLimitExceeded => WalletAlert::OverdraftLimitExceeded {
                balance_micros,
                overdraft_limit_micros: self.overdraft_limit_micros,
            },
        }
    }

    /// Adds credit.
    pub fn top_up(&mut self, amount_micros: u64) -> Result<(), PricingError> {
        let amount = i64::try_from(amount_micros).map_err(|_| PricingError::Overflow("wallet top-up"))?;
        self.balance_micros =
            self.balance_micros.checked_add(amount).ok_or(PricingError::Overflow("wallet balance"))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Lifetime quota forecast

/// When a SIM's lifetime quota runs out at its recent rate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QuotaForecast {
    /// The quota, bytes.
    pub quota_bytes: u64,
    /// Used since the plan started, up to and including `today`.
    pub used_bytes: u64,
    /// Quota minus used, 0 when exhausted.
    pub remaining_bytes: u64,
    /// Days averaged for the rate.
    pub window_days: u32,
    /// Bytes used in the window.
    pub window_bytes: u64,
    /// Day the quota runs out at the window's average rate; `None` if the rate is 0 or that
    /// day lies past the last date the calendar holds (9999-12-31).
    #[serde(serialize_with = "ser_opt_date")]
    pub exhausted_on: Option<Date>,
    /// Last day of the plan.
    #[serde(serialize_with = "ser_date")]
    pub expires_on: Date,
    /// Whether the quota runs out before the plan expires at this rate.
    pub runs_out_before_expiry: bool,
    /// Average bytes per day that would last exactly until expiry.
    pub sustainable_bytes_per_day: u64,
}

fn ser_opt_date<S: serde::Serializer>(d: &Option<Date>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&crate::server::format_date(*d)),
        None => s.serialize_none(),
    }
}

/// Forecasts a lifetime quota (e.g. 500 MB over 10 years) from daily usage.
///
/// `daily` is the SIM's bytes per day (any order, days outside the plan ignored). The rate is
/// the average of the last `window_days` days up to `today` (fewer if the plan is younger);
/// the exhaustion day is the first day on which cumulative usage at that rate reaches the
/// quota, computed in integers: `today + ceil(remaining × window / window_bytes)`.
pub fn forecast_quota(
    quota_bytes: u64,
    plan_start: Date,
    expires_on: Date,
    today: Date,
    window_days: u32,
    daily: &[(Date, u64)],
) -> Result<QuotaForecast, PricingError> {
    if window_days == 0 || window_days > FORECAST_WINDOW_DAYS_MAX {
        return Err(PricingError::Forecast("window_days must be 1 to 366"));
    }
    if quota_bytes > FORECAST_QUOTA_BYTES_MAX {
        return Err(PricingError::Forecast("quota_bytes must be at most 1152921504606846976 (1 EiB)"));
    }
    if expires_on < plan_start {
        return Err(PricingError::Forecast("the plan expires before it starts"));
    }
    let age_days =
        u32::try_from((today - plan_start).whole_days().saturating_add(1).max(1)).unwrap_or(u32::MAX);
    let window = window_days.min(age_days);
    // Every date operation is checked: the parameters may name any day the calendar holds.
    let window_start =
        today.checked_sub(time::Duration::days(i64::from(window).saturating_sub(1))).unwrap_or(Date::MIN);
    let (mut used, mut window_bytes) = (0u64, 0u64);
    for (d, b) in daily {
        if *d >= plan_start && *d <= today {
            used = used.checked_add(*b).ok_or(PricingError::Overflow("quota usage"))?;
            if *d >= window_start {
                window_bytes = window_bytes.checked_add(*b).ok_or(PricingError::Overflow("quota usage"))?;
            }
        }
    }
    let remaining = quota_bytes.saturating_sub(used);
    let exhausted_on = if remaining == 0 {
        Some(today)
    } else if window_bytes == 0 {
        None
    } else {
        // remaining < 2^60 and window ≤ 366: the product fits a u128 with room to spare.
        let days = (u128::from(remaining) * u128::from(window)).div_ceil(u128::from(window_bytes));
        i64::try_from(days)
            .ok()
            .and_then(|d| d.checked_mul(86_400))
            .and_then(|s| today.checked_add(time::Duration::seconds(s)))
    };
    let days_to_expiry = u64::try_from((expires_on - today).whole_days()).unwrap_or(0);
    Ok(QuotaForecast {
        quota_bytes,
        used_bytes: used,
        remaining_bytes: remaining,
        window_days: window,
        window_bytes,
        exhausted_on,
        expires_on,
        runs_out_before_expiry: exhausted_on.is_some_and(|d| d <= expires_on),
        sustainable_bytes_per_day: remaining.checked_div(days_to_expiry).unwrap_or(remaining),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use time::macros::date;

    const GB: u64 = 1_000_000_000;
    const GIB: u64 = 1 << 30;

    fn worked(unit: &str, model: &str) -> Plan {
        let text = format!(
            r#"
[[plan]]
id = "field-example"
currency = "USD"
unit = "{unit}"
model = "{model}"
tiers = [{{ up_to = 100, price = "0.10" }}, {{ up_to = 500, price = "0.08" }}, {{ price = "0.06" }}]
"#
        );
        PricingConfig::from_toml_str(&text).unwrap().plans.remove("field-example").unwrap()
    }

    fn charge(plan: &Plan, bytes: u64) -> Charge {
        let period = plan.cycle.period_of(date!(2026 - 11 - 10)).unwrap();
        rate(plan, period, &[UsageItem { iccid: 1, date: date!(2026 - 11 - 10), bytes }]).unwrap()
    }

    #[test]
    fn worked_example_graduated_decimal_gb() {
        let p = worked("GB", "graduated");
        let c = charge(&p, 600 * GB);
        // $0.10 × 100 + $0.08 × 400 + $0.06 × 100 = $48.
        assert_eq!(c.total_micros, 48_000_000);
        let amounts: Vec<u64> = c.lines.iter().map(|l| l.amount_micros).collect();
        assert_eq!(amounts, vec![10_000_000, 32_000_000, 6_000_000]);
        assert_eq!(c.lines[1].description, "tier 2: 100 GB < usage ≤ 500 GB");
        assert_eq!(c.lines[2].quantity_bytes, 100 * GB);
        assert!(c.lines.iter().all(|l| l.unit_bytes == GB && l.money_rounding == MONEY_ROUNDING));
        assert_eq!(charge(&p, 100 * GB).total_micros, 10_000_000);
        assert_eq!(charge(&p, 100 * GB).lines.len(), 1);
        assert_eq!(charge(&p, 250 * GB).total_micros, 10_000_000 + 12_000_000);
        assert_eq!(charge(&p, 0).total_micros, 0);
        // One byte at $0.10/GB is 0.0000001 USD: half-up rounding to the micro gives 0.
        assert_eq!(charge(&p, 1).total_micros, 0);
        assert_eq!(charge(&p, 5_000).total_micros, 1);
    }

    #[test]
    fn worked_example_graduated_binary_gib() {
        let p = worked("GiB", "graduated");
        assert_eq!(charge(&p, 600 * GIB).total_micros, 48_000_000);
        // 600 GB decimal is 558.79 GiB: the last 63_129_088_000 bytes at $0.06/GiB are
        // 3_527_612.686 micros, rounded half up to 3_527_613.
        let c = charge(&p, 600 * GB);
        assert_eq!(c.lines[2].quantity_bytes, 600 * GB - 500 * GIB);
        assert_eq!(c.lines[2].amount_micros, 3_527_613);
        assert_eq!(c.total_micros, 45_527_613);
    }

    #[test]
    fn worked_example_volume() {
        let p = worked("GB", "volume");
        assert_eq!(charge(&p, 600 * GB).total_micros, 36_000_000);
        assert_eq!(charge(&p, 500 * GB).total_micros, 40_000_000);
        assert_eq!(charge(&p, 100 * GB).total_micros, 10_000_000);
        assert_eq!(charge(&p, 100 * GB + 1).total_micros, 8_000_000);
        assert_eq!(charge(&p, 600 * GB).lines[0].description, "tier 3 (usage > 500 GB) prices all usage");
    }

    #[test]
    fn flat_fee_allowance_package_and_rounding_are_stated() {
        let cfg = PricingConfig::from_toml_str(
            r#"
[[plan]]
id = "bundle"
currency = "EUR"
unit = "MiB"
model = "package"
package_bytes = 10485760
package_price = "1.50"
flat_fee = "2.00"
included_bytes = 52428800
rounding_increment_bytes = 1024
rounding_scope = "session"
billing_cycle = "monthly"
billing_anchor_day = 15

[[assign]]
customer = "acme"
group = "berlin"
plan = "bundle"
iccids = ["8988280666000000001", "8988280666000000002"]
"#,
        )
        .unwrap();
        let a = cfg.assignment_of(8_988_280_666_000_000_002).unwrap().clone();
        assert_eq!(a.customer, "acme");
        let day = date!(2026 - 11 - 10);
        let items = [
            UsageItem { iccid: 8_988_280_666_000_000_001, date: day, bytes: 50 * 1024 * 1024 },
            UsageItem { iccid: 8_988_280_666_000_000_002, date: day, bytes: 1 },
            UsageItem { iccid: 8_988_280_666_000_000_002, date: day, bytes: 10 * 1024 * 1024 },
            // Another SIM, and a day outside the period: neither counted.
            UsageItem { iccid: 7, date: day, bytes: 1 << 40 },
            UsageItem { iccid: 8_988_280_666_000_000_001, date: date!(2026 - 11 - 15), bytes: 1 << 40 },
        ];
        let c = cfg.rate_group(&a, day, &items).unwrap();
        assert_eq!(c.period, BillingPeriod { start: date!(2026 - 10 - 15), end: date!(2026 - 11 - 15) });
        assert_eq!(c.rounding.rounding_units, 3);
        assert_eq!(c.rounding.raw_bytes, 60 * 1024 * 1024 + 1);
        assert_eq!(c.rounding.rounded_bytes, 60 * 1024 * 1024 + 1024);
        assert_eq!(c.billable_bytes, 10 * 1024 * 1024 + 1024);
        // Flat 2.00 + two started packages of 10 MiB at 1.50.
        assert_eq!(c.total_micros, 5_000_000);
        assert_eq!(c.lines[0].kind, "flat_fee");
        assert_eq!(c.lines[1].description, "2 started package(s) of 10485760 bytes");
        let json = serde_json::to_string(&c.rounding).unwrap();
        assert_eq!(
            json,
            r#"{"increment_bytes":1024,"scope":"session","rounding_units":3,"raw_bytes":62914561,"rounded_bytes":62915584}"#
        );
        assert!(matches!(cfg.assignment_of(5), Err(PricingError::Unassigned(5))));
    }

    #[test]
    fn charge_json_is_pinned() {
        let p = worked("GB", "graduated");
        let c = charge(&p, 150 * GB);
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            concat!(
                r#"{"plan_id":"field-example","currency":"USD","period":{"start":"2026-11-01","end":"2026-12-01"},"#,
                r#""rounding":{"increment_bytes":1,"scope":"sim_day","rounding_units":1,"raw_bytes":150000000000,"rounded_bytes":150000000000},"#,
                r#""included_bytes":0,"billable_bytes":150000000000,"lines":["#,
                r#"{"kind":"tier","description":"tier 1: usage ≤ 100 GB","quantity_bytes":100000000000,"unit":"GB","unit_bytes":1000000000,"unit_price_micros":100000,"amount_micros":10000000,"money_rounding":"half_up_to_1_micro_per_line"},"#,
                r#"{"kind":"tier","description":"tier 2: 100 GB < usage ≤ 500 GB","quantity_bytes":50000000000,"unit":"GB","unit_bytes":1000000000,"unit_price_micros":80000,"amount_micros":4000000,"money_rounding":"half_up_to_1_micro_per_line"}],"#,
                r#""total_micros":14000000}"#
            )
        );
    }

    #[test]
    fn config_errors_name_the_key() {
        let cases = [
            (
                r#"[[plan]]
id = "a"
currency = "USD"
model = "graduated"
tiers = [{ up_to = 100, price = "0.10" }, { up_to = 50, price = "0.08" }, { price = "0.06" }]"#,
                "plan[0].tiers[1].up_to",
            ),
            (
                r#"[[plan]]
id = "a"
currency = "USD"
model = "graduated"
tiers = [{ up_to = 100, price = "0.1234567" }, { price = "0.06" }]"#,
                "plan[0].tiers[0].price",
            ),
            (
                r#"[[plan]]
id = "a"
currency = "usd"
model = "per_unit"
price = "1""#,
                "plan[0].currency",
            ),
            (
                r#"[[plan]]
id = "a"
currency = "USD"
model = "flat"
price = "1""#,
                "plan[0].model",
            ),
            (
                r#"[[plan]]
id = "a"
currency = "USD"
model = "per_unit"
price = "1"
rounding_increment_bytes = 0"#,
                "plan[0].rounding_increment_bytes",
            ),
            (
                r#"[[plan]]
id = "a"
currency = "USD"
model = "per_unit"
price = "1"
billing_anchor_day = 31"#,
                "plan[0].billing_anchor_day",
            ),
            (
                r#"[[assign]]
customer = "c"
group = "g"
plan = "nope"
iccids = []"#,
                "assign[0].plan",
            ),
        ];
        for (text, key) in cases {
            let e = PricingConfig::from_toml_str(text).unwrap_err();
            assert!(e.to_string().starts_with(&format!("{key}: ")), "{key}: got {e}");
        }
        let e = PricingConfig::from_toml_str("[[plan]]\nid = \"a\"\ncolour = 1").unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
    }

    #[test]
    fn wallets_time_zone_and_lifetime_quotas_parse_and_errors_name_the_key() {
        let base = r#"
time_zone = "Europe/Berlin"

[[plan]]
id = "usd"
currency = "USD"
model = "per_unit"
price = "1"
lifetime_quota_bytes = 524288000
lifetime_years = 10

[[plan]]
id = "eur"
currency = "EUR"
model = "per_unit"
price = "1"

[[assign]]
customer = "acme"
group = "a"
plan = "usd"
iccids = ["8988280666000000001"]
active_since = "2026-02-28"
"#;
        let wallet = "[[wallet]]\ncustomer = \"acme\"\ncurrency = \"USD\"\nopening_credit = \"100.50\"\nalert_thresholds = [\"50\", \"10\"]\noverdraft_limit = \"5\"\n";
        let cfg = PricingConfig::from_toml_str(&format!("{base}{wallet}")).unwrap();
        assert_eq!(cfg.time_zone, "Europe/Berlin");
        let w = &cfg.wallets["acme"];
        assert_eq!((w.opening_micros, w.overdraft_limit_micros), (100_500_000, 5_000_000));
        assert_eq!(w.thresholds_micros, vec![50_000_000, 10_000_000]);
        let a = cfg.assignment_of(8_988_280_666_000_000_001).unwrap();
        assert_eq!(a.active_since, Some(date!(2026 - 02 - 28)));
        let life = cfg.plans["usd"].lifetime.unwrap();
        assert_eq!(life, LifetimeQuota { quota_bytes: 500 * 1024 * 1024, years: 10 });
        assert_eq!(life.last_day(date!(2026 - 02 - 28)), Some(date!(2036 - 02 - 27)));
        assert_eq!(add_months_clamped(date!(2028 - 02 - 29), 12), Some(date!(2029 - 02 - 28)));
        assert_eq!(PricingConfig::from_toml_str(base).unwrap().time_zone, "Europe/Berlin");
        assert_eq!(PricingConfig::from_toml_str("").unwrap().time_zone, BILLING_TIME_ZONE_DEFAULT);

        let cases = [
            (format!("{base}[[wallet]]\ncustomer = \"acme\"\ncurrency = \"EUR\"\n"), "wallet[0].currency"),
            (format!("{base}[[wallet]]\ncustomer = \"nobody\"\ncurrency = \"USD\"\n"), "wallet[0].customer"),
            (format!("{base}{wallet}{wallet}"), "wallet[1].customer"),
            (format!("{base}[[wallet]]\ncustomer = \"acme\"\ncurrency = \"USD\"\nopening_credit = \"-1\"\n"), "wallet[0].opening_credit"),
            (format!("{base}[[wallet]]\ncustomer = \"acme\"\ncurrency = \"USD\"\nalert_thresholds = [\"1\", \"1\"]\n"), "wallet[0].alert_thresholds[1]"),
            (base.replace("Europe/Berlin", "Mars/Olympus"), "time_zone"),
            (base.replace("2026-02-28", "2026-02-30"), "assign[0].active_since"),
            (base.replace("lifetime_years = 10", "lifetime_years = 31"), "plan[0].lifetime_years"),
            (base.replace("lifetime_quota_bytes = 524288000", ""), "plan[0].lifetime_years"),
            (base.replace("customer = \"acme\"", "customer = \"a b\""), "assign[0].customer"),
            (
                format!("{base}[[assign]]\ncustomer = \"acme\"\ngroup = \"b\"\nplan = \"eur\"\niccids = [\"8988280666000000001\"]\n"),
                "assign[1].iccids[0]",
            ),
            (
                format!("{base}[[assign]]\ncustomer = \"acme\"\ngroup = \"a\"\nplan = \"eur\"\niccids = []\n"),
                "assign[1].group",
            ),
        ];
        for (text, key) in cases {
            let e = PricingConfig::from_toml_str(&text).unwrap_err();
            assert!(e.to_string().starts_with(&format!("{key}: ")), "{key}: got {e}");
        }
        let e = PricingConfig::from_toml_str(&format!(
            "{base}[[assign]]\ncustomer = \"other\"\ngroup = \"b\"\nplan = \"eur\"\niccids = [\"8988280666000000001\"]\n"
        ))
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "assign[1].iccids[0]: 8988280666000000001 is already in group 'a' of customer 'acme' (assign[0])"
        );
    }

    #[test]
    fn alert_conditions_round_trip_and_match_debit_crossings() {
        for c in
            [AlertCondition::Threshold(-3), AlertCondition::Overdrawn, AlertCondition::OverdraftLimitExceeded]
        {
            assert_eq!(AlertCondition::from_key(&c.key()), Some(c));
        }
        assert_eq!(AlertCondition::from_key("threshold:x"), None);
        let mut w = Wallet::new(10, 5, vec![8, 2]).unwrap();
        let before = w.conditions();
        let fired = w.debit(9).unwrap();
        let newly: std::collections::BTreeSet<AlertCondition> =
            w.conditions().difference(&before).copied().collect();
        assert_eq!(
            fired.iter().map(WalletAlert::condition).collect::<std::collections::BTreeSet<_>>(),
            newly
        );
        assert_eq!(newly.len(), 2);
        assert_eq!(w.alert(AlertCondition::Threshold(8)), fired[0]);
    }

    #[test]
    fn money_parses_exactly() {
        assert_eq!(parse_money_micros("0.10"), Ok(100_000));
        assert_eq!(parse_money_micros("12"), Ok(12_000_000));
        assert_eq!(parse_money_micros("0.000001"), Ok(1));
        for bad in ["", ".1", "1.", "-1", "1e3", "0.0000001", "1,5", " 1", "9999999999999"] {
            assert!(parse_money_micros(bad).is_err(), "{bad}");
        }
        assert_eq!(format_micros(48_000_000), "48.000000");
        assert_eq!(format_micros(-1), "-0.000001");
    }

    #[test]
    fn billing_periods() {
        let m = BillingCycle::Monthly { anchor_day: 1 };
        assert_eq!(
            m.period_of(date!(2026 - 12 - 31)),
            Some(BillingPeriod { start: date!(2026 - 12 - 01), end: date!(2027 - 01 - 01) })
        );
        let m = BillingCycle::Monthly { anchor_day: 28 };
        assert_eq!(
            m.period_of(date!(2027 - 01 - 05)),
            Some(BillingPeriod { start: date!(2026 - 12 - 28), end: date!(2027 - 01 - 28) })
        );
        assert_eq!(
            BillingCycle::Daily.period_of(date!(2028 - 02 - 28)),
            Some(BillingPeriod { start: date!(2028 - 02 - 28), end: date!(2028 - 02 - 29) })
        );
    }

    #[test]
    fn wallet_alerts_once_per_crossing() {
        let mut w = Wallet::new(10_000_000, 5_000_000, vec![5_000_000, 1_000_000]).unwrap();
        assert_eq!(w.debit(4_000_000).unwrap(), vec![]);
        assert_eq!(
            w.debit(1_000_000).unwrap(),
            vec![WalletAlert::ThresholdCrossed { threshold_micros: 5_000_000, balance_micros: 5_000_000 }]
        );
        assert_eq!(w.debit(1).unwrap(), vec![]);
        let a = w.debit(6_000_000).unwrap();
        assert_eq!(a.len(), 2, "{a:?}");
        assert!(w.overdrawn() && !w.limit_exceeded());
        let a = w.debit(5_000_000).unwrap();
        assert!(matches!(a[..], [WalletAlert::OverdraftLimitExceeded { .. }]), "{a:?}");
        assert!(w.limit_exceeded());
        w.top_up(20_000_000).unwrap();
        assert!(!w.overdrawn());
        assert!(w.debit(u64::MAX).is_err());
    }

    #[test]
    fn lifetime_quota_forecast() {
        const MB: u64 = 1024 * 1024;
        let start = date!(2026 - 01 - 01);
        let expires = date!(2035 - 12 - 31);
        let today = date!(2026 - 01 - 30);
        // 30 days at 1 MiB a day: 470 MiB remain, ⌈470⌉ more days at that rate.
        let daily: Vec<(Date, u64)> = (0..30).map(|i| (start + time::Duration::days(i), MB)).collect();
        let f = forecast_quota(500 * MB, start, expires, today, 30, &daily).unwrap();
        assert_eq!(f.used_bytes, 30 * MB);
        assert_eq!(f.exhausted_on, Some(today + time::Duration::days(470)));
        assert!(f.runs_out_before_expiry);
        // About 140 KiB a day lasts; at 10 KiB a day it does not run out before expiry.
        let slow: Vec<(Date, u64)> = (0..30).map(|i| (start + time::Duration::days(i), 10 * 1024)).collect();
        let f = forecast_quota(500 * MB, start, expires, today, 7, &slow).unwrap();
        assert!(!f.runs_out_before_expiry);
        assert_eq!(f.window_days, 7);
        assert_eq!(f.sustainable_bytes_per_day, (500 * MB - 300 * 1024) / 3622);
        let idle = forecast_quota(500 * MB, start, expires, today, 7, &[]).unwrap();
        assert_eq!(idle.exhausted_on, None);
        assert!(forecast_quota(1, start, expires, today, 0, &[]).is_err());
    }

    /// Regression: a huge quota at a tiny rate put the exhaustion day 10^17 days out and
    /// `Duration::days` panicked; the calendar's edges panicked in date subtraction.
    #[test]
    fn forecast_never_panics_at_the_edges() {
        let start = date!(2026 - 01 - 01);
        let today = date!(2026 - 01 - 30);
        let daily = [(today, 1u64)];
        let e = forecast_quota(u64::MAX, start, Date::MAX, today, 30, &daily).unwrap_err();
        assert!(e.to_string().contains("quota_bytes"), "{e}");
        let f = forecast_quota(FORECAST_QUOTA_BYTES_MAX, start, Date::MAX, today, 366, &daily).unwrap();
        assert_eq!((f.exhausted_on, f.runs_out_before_expiry), (None, false));
        let f = forecast_quota(10, Date::MIN, Date::MAX, Date::MIN, 366, &[(Date::MIN, 1)]).unwrap();
        assert_eq!(f.window_days, 1);
        let f = forecast_quota(10, Date::MIN, Date::MAX, Date::MAX, 366, &[(Date::MAX, 1)]).unwrap();
        assert_eq!(f.exhausted_on, None, "past 9999-12-31");
        proptest::proptest!(|(quota: u64, bytes: u64, window in 1u32..=366, a: i32, b: i32, c: i32)| {
            let day = |n: i32| Date::from_julian_day(n.rem_euclid(Date::MAX.to_julian_day() - Date::MIN.to_julian_day()) + Date::MIN.to_julian_day()).unwrap();
            let _ = forecast_quota(quota, day(a), day(b), day(c), window, &[(day(c), bytes)]);
        });
    }

    fn arb_tiers() -> impl Strategy<Value = Vec<Tier>> {
        (proptest::collection::vec((1u64..1000, 0u64..500_000), 0..5), 0u64..500_000).prop_map(|(v, last)| {
            let mut bound = 0;
            let mut tiers: Vec<Tier> = v
                .into_iter()
                .map(|(step, price)| {
                    bound += step;
                    Tier { up_to_units: Some(bound), unit_price_micros: price }
                })
                .collect();
            tiers.push(Tier { up_to_units: None, unit_price_micros: last });
            tiers
        })
    }

    fn plan_with(model: ChargeModel, unit: Unit) -> Plan {
        Plan {
            id: "p".into(),
            currency: "USD".into(),
            unit,
            model,
            flat_fee_micros: 0,
            included_bytes: 0,
            rounding: Rounding { increment_bytes: 1, scope: RoundingScope::SimDay },
            cycle: BillingCycle::Daily,
            lifetime: None,
        }
    }

    fn total(plan: &Plan, bytes: u64) -> u64 {
        model_lines(plan, bytes).unwrap().iter().map(|l| l.amount_micros).sum()
    }

    proptest! {
        #[test]
        fn graduated_total_is_monotone(tiers in arb_tiers(), a in 0u64..1 << 44, b in 0u64..1 << 44, binary: bool) {
            let p = plan_with(ChargeModel::Graduated { tiers }, if binary { Unit::Gib } else { Unit::Gb });
            let (lo, hi) = (a.min(b), a.max(b));
            prop_assert!(total(&p, lo) <= total(&p, hi));
            // Lines cover the usage exactly.
            let q: u64 = model_lines(&p, hi).unwrap().iter().map(|l| l.quantity_bytes).sum();
            prop_assert_eq!(q, hi);
        }

        #[test]
        fn volume_is_never_above_graduated_with_falling_prices(mut tiers in arb_tiers(), q in 0u64..1 << 44) {
            // Prices falling with usage, as in the field example.
            let mut prices: Vec<u64> = tiers.iter().map(|t| t.unit_price_micros).collect();
            prices.sort_unstable_by(|a, b| b.cmp(a));
            for (t, p) in tiers.iter_mut().zip(prices) { t.unit_price_micros = p; }
            let g = plan_with(ChargeModel::Graduated { tiers: tiers.clone() }, Unit::Gb);
            let v = plan_with(ChargeModel::Volume { tiers: tiers.clone() }, Unit::Gb);
            let lines = model_lines(&g, q).unwrap().len() as u64;
            // Exactly: volume ≤ graduated; each graduated line rounds by at most half a micro.
            prop_assert!(total(&v, q) <= total(&g, q) + lines);
            // Inside the first tier both are the same single price.
            let first = tiers[0].up_to_units.map_or(q, |u| q.min(u * Unit::Gb.bytes()));
            prop_assert_eq!(total(&v, first), total(&g, first));
            // One flat price: volume and graduated agree to rounding.
            let flat: Vec<Tier> = tiers.iter().map(|t| Tier { unit_price_micros: tiers[0].unit_price_micros, ..*t }).collect();
            let gf = total(&plan_with(ChargeModel::Graduated { tiers: flat.clone() }, Unit::Gb), q);
            let vf = total(&plan_with(ChargeModel::Volume { tiers: flat }, Unit::Gb), q);
            prop_assert!(vf.abs_diff(gf) <= lines);
        }

        #[test]
        fn rounding_never_undercharges_the_increment_rule(
            items in proptest::collection::vec((0u64..4, 0i64..3, 0u64..1 << 30), 0..40),
            increment in 1u64..1 << 20,
            scope in prop_oneof![Just(RoundingScope::Session), Just(RoundingScope::SimDay), Just(RoundingScope::SimPeriod)],
        ) {
            let items: Vec<UsageItem> = items.into_iter()
                .map(|(iccid, d, bytes)| UsageItem { iccid, date: date!(2026 - 11 - 01) + time::Duration::days(d), bytes })
                .collect();
            let r = apply_rounding(Rounding { increment_bytes: increment, scope }, &items).unwrap();
            let raw: u64 = items.iter().map(|i| i.bytes).sum();
            prop_assert_eq!(r.raw_bytes, raw);
            prop_assert!(r.rounded_bytes >= raw);
            prop_assert!(r.rounded_bytes - raw < increment * r.rounding_units.max(1));
            prop_assert_eq!(r.rounded_bytes % increment, 0);
            // Session rounding is the finest unit, so it never charges less than coarser ones.
            let coarse = apply_rounding(Rounding { increment_bytes: increment, scope: RoundingScope::SimPeriod }, &items).unwrap();
            let fine = apply_rounding(Rounding { increment_bytes: increment, scope: RoundingScope::Session }, &items).unwrap();
            prop_assert!(fine.rounded_bytes >= r.rounded_bytes && r.rounded_bytes >= coarse.rounded_bytes);
        }

        #[test]
        fn wallet_never_goes_negative_without_an_alert(
            start in 0i64..10_000_000, limit in 0i64..5_000_000,
            ops in proptest::collection::vec((any::<bool>(), 0u64..3_000_000), 0..40),
        ) {
            let mut w = Wallet::new(start, limit, vec![1_000_000]).unwrap();
            let mut overdrawn_alerted = false;
            let mut limit_alerted = false;
            for (top_up, amount) in ops {
                if top_up {
                    w.top_up(amount).unwrap();
                    if !w.overdrawn() { overdrawn_alerted = false; }
                    if !w.limit_exceeded() { limit_alerted = false; }
                    continue;
                }
                let before = w.balance_micros;
                let alerts = w.debit(amount).unwrap();
                prop_assert_eq!(w.balance_micros, before - amount as i64);
                overdrawn_alerted |= alerts.iter().any(|a| matches!(a, WalletAlert::Overdrawn { .. }));
                limit_alerted |= alerts.iter().any(|a| matches!(a, WalletAlert::OverdraftLimitExceeded { .. }));
                prop_assert!(!w.overdrawn() || overdrawn_alerted);
                prop_assert!(!w.limit_exceeded() || limit_alerted);
                if before > 1_000_000 && w.balance_micros <= 1_000_000 {
                    let crossed = alerts.iter().any(|a| matches!(a, WalletAlert::ThresholdCrossed { .. }));
                    prop_assert!(crossed);
                }
            }
        }
    }
}
