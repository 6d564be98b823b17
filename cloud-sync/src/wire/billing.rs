//! Billing on the wire: what the charges, wallets, run, top-up and forecast routes take and
//! answer, and the conversions of the rating core's results into those answers. Knows
//! nothing of axum, the store or the service that sequences the IO (`crate::service`).

use serde::{Deserialize, Serialize};
use time::Date;

use crate::pricing::{format_micros, WalletAlert};
use crate::text::{json_date, json_iccid, json_opt_date};
use crate::wire::usage::UnderivableSim;
use countersign_rating::billing::{AlertRecord, GroupCharge, RunDecision};

/// Path of the charges query.
pub const BILLING_CHARGES_PATH: &str = "/v1/billing/charges";
/// Path of the wallets query.
pub const BILLING_WALLETS_PATH: &str = "/v1/billing/wallets";
/// Path of the quota forecast.
pub const BILLING_FORECAST_PATH: &str = "/v1/billing/forecast";
/// Path of a billing run.
pub const ADMIN_BILLING_RUN_PATH: &str = "/v1/admin/billing/run";
/// Path of a wallet's top-ups, axum/OpenAPI template.
pub const ADMIN_WALLET_TOPUPS_PATH: &str = "/v1/admin/wallets/{customer}/topups";

/// Which charges to ask for: one customer and/or group, and `period` (each group's period
/// containing that day) or `from`/`to` (one range); neither: the periods containing today.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChargesQuery {
    /// One customer only.
    pub customer: Option<String>,
    /// One group only.
    pub group: Option<String>,
    /// A day inside the periods to price.
    pub period: Option<time::Date>,
    /// First day of an explicit range.
    pub from: Option<time::Date>,
    /// Last day of an explicit range (included).
    pub to: Option<time::Date>,
}

/// What a quota forecast is asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForecastQuery {
    /// The SIM.
    pub iccid: u64,
    /// The quota; default: the SIM's plan's `lifetime_quota_bytes`.
    pub quota_bytes: Option<u64>,
    /// First day of the lifetime; default: the group's `active_since`, else the SIM's first
    /// day of usage.
    pub since: Option<Date>,
    /// Last day of the lifetime; default: `since` plus the plan's `lifetime_years` (or
    /// [`countersign_rating::billing::FORECAST_LIFETIME_YEARS_DEFAULT`]) minus one day.
    pub expires: Option<Date>,
    /// Days the rate is averaged over; default [`countersign_rating::billing::FORECAST_WINDOW_DAYS_DEFAULT`].
    pub window_days: Option<u32>,
    /// The day the forecast is made on; default today in the billing zone.
    pub as_of: Option<Date>,
}

/// A billing period: `start` included, `end` excluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeriodJson {
    /// First day.
    #[serde(with = "json_date")]
    pub start: Date,
    /// First day after the period.
    #[serde(with = "json_date")]
    pub end: Date,
}

/// How usage was rounded before pricing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundingJson {
    /// Usage is rounded up to a multiple of this …
    pub increment_bytes: u64,
    /// … per `session`, `sim_day` or `sim_period` (device usage has no sessions: a SIM-day is
    /// its finest unit, so `session` rounds each SIM-day).
    pub scope: String,
    /// Rounding units.
    pub rounding_units: u64,
    /// Usage before rounding.
    pub raw_bytes: u64,
    /// Usage after rounding.
    pub rounded_bytes: u64,
}

/// One line of a charge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineJson {
    /// `flat_fee`, `per_unit`, `tier`, `volume` or `package`.
    pub kind: String,
    /// What the line prices, e.g. "tier 2: 100 GB < usage ≤ 500 GB".
    pub description: String,
    /// Bytes priced on the line.
    pub quantity_bytes: u64,
    /// The unit's name ("GB"), or "package"/"period"/"tier" (a tier's flat amount), or the
    /// currency (a `rounding` line, whose unit price is the minor unit in micro-units).
    pub unit: String,
    /// Bytes per unit.
    pub unit_bytes: u64,
    /// Price per unit, micro-units.
    pub unit_price_micros: u64,
    /// Amount, micro-units.
    pub amount_micros: i64,
    /// Amount as a decimal string with 6 fraction digits.
    pub amount: String,
    /// How the amount was rounded.
    pub money_rounding: String,
}

/// The charge of one group for one period.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupChargeJson {
    /// The customer.
    pub customer: String,
    /// The group.
    pub group: String,
    /// The plan.
    pub plan_id: String,
    /// ISO currency code.
    pub currency: String,
    /// SIMs in the group.
    pub sims: usize,
    /// The period priced.
    pub period: PeriodJson,
    /// Whether the period has not ended yet (the charge so far).
    pub in_progress: bool,
    /// Usage rounding.
    pub rounding: RoundingJson,
    /// Allowance deducted before pricing.
    pub included_bytes: u64,
    /// Bytes priced after the allowance.
    pub billable_bytes: u64,
    /// The lines; their amounts add up to `total_micros`.
    pub lines: Vec<LineJson>,
    /// Total, micro-units.
    pub total_micros: u64,
    /// Total as a decimal string.
    pub total: String,
}

/// One customer's total in one currency.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerTotalJson {
    /// The customer.
    pub customer: String,
    /// ISO currency code.
    pub currency: String,
    /// Σ of the customer's group totals, micro-units.
    pub total_micros: u64,
    /// The same as a decimal string.
    pub total: String,
}

/// Answer of `GET /v1/billing/charges`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargesReply {
    /// IANA zone the days were cut in.
    pub time_zone: String,
    /// The day whose period each group was priced for (`null` with `from`/`to`).
    #[serde(with = "json_opt_date")]
    pub period: Option<Date>,
    /// First day of an explicit range.
    #[serde(with = "json_opt_date")]
    pub from: Option<Date>,
    /// Last day of an explicit range (included).
    #[serde(with = "json_opt_date")]
    pub to: Option<Date>,
    /// SIMs with usage but no assignment (not charged).
    pub unassigned_sims: usize,
    /// Per customer and group.
    pub charges: Vec<GroupChargeJson>,
    /// Per customer and currency.
    pub totals: Vec<CustomerTotalJson>,
    /// SIMs whose usage cannot be derived: not in any charge above.
    #[serde(default)]
    pub underivable: Vec<UnderivableSim>,
}

/// One group's charge as answered; `in_progress` while its period has not ended by `today`.
pub(crate) fn charge_json(c: &GroupCharge, today: Date) -> GroupChargeJson {
    let ch = &c.charge;
    GroupChargeJson {
        customer: c.customer.clone(),
        group: c.group.clone(),
        plan_id: ch.plan_id.clone(),
        currency: ch.currency.clone(),
        sims: c.sims,
        period: PeriodJson { start: ch.period.start, end: ch.period.end },
        in_progress: ch.period.end > today,
        rounding: RoundingJson {
            increment_bytes: ch.rounding.increment_bytes,
            scope: match ch.rounding.scope {
                crate::pricing::RoundingScope::Session => "session",
                crate::pricing::RoundingScope::SimDay => "sim_day",
                crate::pricing::RoundingScope::SimPeriod => "sim_period",
            }
            .to_owned(),
            rounding_units: ch.rounding.rounding_units,
            raw_bytes: ch.rounding.raw_bytes,
            rounded_bytes: ch.rounding.rounded_bytes,
        },
        included_bytes: ch.included_bytes,
        billable_bytes: ch.billable_bytes,
        lines: ch
            .lines
            .iter()
            .map(|l| LineJson {
                kind: l.kind.to_owned(),
                description: l.description.clone(),
                quantity_bytes: l.quantity_bytes,
                unit: l.unit.clone(),
                unit_bytes: l.unit_bytes,
                unit_price_micros: l.unit_price_micros,
                amount_micros: l.amount_micros,
                amount: format_micros(l.amount_micros.into()),
                money_rounding: l.money_rounding.to_owned(),
            })
            .collect(),
        total_micros: ch.total_micros,
        total: format_micros(ch.total_micros.into()),
    }
}

/// One (group, period) a run changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebitChangeJson {
    /// The group.
    pub group: String,
    /// The plan.
    pub plan_id: String,
    /// The period.
    pub period: PeriodJson,
    /// The period's charge now, micro-units.
    pub charge_micros: i64,
    /// Debited for it before.
    pub previously_micros: i64,
    /// Debited by this run (negative: credited back).
    pub delta_micros: i64,
}

/// An alert.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertJson {
    /// 1, 2, … per wallet.
    pub seq: u64,
    /// `threshold_crossed`, `overdrawn` or `overdraft_limit_exceeded`.
    pub alert: String,
    /// The threshold crossed (threshold alerts).
    pub threshold_micros: Option<i64>,
    /// The overdraft limit (limit alerts).
    pub overdraft_limit_micros: Option<i64>,
    /// The balance when it fired.
    pub balance_micros: i64,
    /// When, Unix seconds.
    pub raised_at_s: i64,
}

/// A wallet alert as answered: the threshold or limit it concerns in its own field.
pub(crate) fn alert_json(a: &AlertRecord) -> AlertJson {
    let (threshold_micros, overdraft_limit_micros) = match a.alert {
        WalletAlert::ThresholdCrossed { threshold_micros, .. } => (Some(threshold_micros), None),
        WalletAlert::Overdrawn { .. } => (None, None),
        WalletAlert::OverdraftLimitExceeded { overdraft_limit_micros, .. } => {
            (None, Some(overdraft_limit_micros))
        }
    };
    AlertJson {
        seq: a.seq,
        alert: a.alert.kind().to_owned(),
        threshold_micros,
        overdraft_limit_micros,
        balance_micros: a.alert.balance_micros(),
        raised_at_s: a.raised_at_s,
    }
}

/// What a run did to one wallet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalletRunJson {
    /// The customer.
    pub customer: String,
    /// The wallet's currency.
    pub currency: String,
    /// Nothing was done to this wallet (see `skipped_reason`).
    pub skipped: bool,
    /// Why it was skipped: a run that read fresher usage billed it already, some of its
    /// SIMs' usage cannot be derived, or its own data or plan failed; `null` when billed.
    #[serde(default)]
    pub skipped_reason: Option<String>,
    /// The customer's SIMs whose usage cannot be derived (the wallet is then skipped).
    #[serde(default)]
    pub underivable: Vec<UnderivableSim>,
    /// Balance before, micro-units.
    pub balance_before_micros: i64,
    /// Balance after, micro-units.
    pub balance_after_micros: i64,
    /// Balance after, decimal.
    pub balance_after: String,
    /// Σ of this run's deltas (negative: credited).
    pub debited_micros: i64,
    /// Periods whose debit changed.
    pub changes: Vec<DebitChangeJson>,
    /// Alerts this run recorded.
    pub alerts: Vec<AlertJson>,
}

/// What a run decided for one wallet, as answered.
pub(crate) fn run_json(
    customer: &str,
    currency: &str,
    d: &RunDecision,
    debited_micros: i64,
    alerts: &[AlertRecord],
) -> WalletRunJson {
    WalletRunJson {
        customer: customer.to_owned(),
        currency: currency.to_owned(),
        skipped: false,
        skipped_reason: None,
        underivable: Vec::new(),
        balance_before_micros: d.balance_before_micros,
        balance_after_micros: d.balance_after_micros,
        balance_after: format_micros(d.balance_after_micros.into()),
        debited_micros,
        changes: d
            .changes
            .iter()
            .map(|c| DebitChangeJson {
                group: c.group.clone(),
                plan_id: c.plan_id.clone(),
                period: PeriodJson { start: c.period.start, end: c.period.end },
                charge_micros: c.charge_micros,
                previously_micros: c.previously_micros,
                delta_micros: c.delta_micros,
            })
            .collect(),
        alerts: alerts.iter().map(alert_json).collect(),
    }
}

/// Answer of `POST /v1/admin/billing/run`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunReply {
    /// Today in the billing zone: periods up to the one containing it were priced.
    #[serde(with = "json_date")]
    pub as_of: Date,
    /// When the usage priced was read, Unix milliseconds.
    pub usage_as_of_ms: i64,
    /// Per prepaid customer.
    pub wallets: Vec<WalletRunJson>,
    /// Every SIM whose usage cannot be derived (assigned or not).
    #[serde(default)]
    pub underivable: Vec<UnderivableSim>,
}

/// What is debited for one (group, period).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeriodDebitJson {
    /// The group.
    pub group: String,
    /// The plan that priced it last.
    pub plan_id: String,
    /// The period.
    pub period: PeriodJson,
    /// Debited so far (the period's charge at the last run), micro-units.
    pub debited_micros: i64,
    /// The same as a decimal string.
    pub debited: String,
    /// Runs that changed it.
    pub debits: u32,
    /// When it last changed, Unix seconds.
    pub updated_at_s: i64,
}

/// A booked top-up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopupJson {
    /// The caller's id.
    pub topup_id: String,
    /// Amount, micro-units.
    pub amount_micros: i64,
    /// When, Unix seconds.
    pub booked_at_s: i64,
}

/// One wallet in [`WalletsReply`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalletJson {
    /// The customer.
    pub customer: String,
    /// ISO currency code.
    pub currency: String,
    /// Configured opening credit, micro-units.
    pub opening_credit_micros: i64,
    /// Σ top-ups.
    pub topups_micros: i64,
    /// Σ debited over all periods.
    pub debited_micros: i64,
    /// `opening + top-ups − debited`.
    pub balance_micros: i64,
    /// The same as a decimal string.
    pub balance: String,
    /// Configured thresholds.
    pub alert_thresholds_micros: Vec<i64>,
    /// Configured overdraft limit.
    pub overdraft_limit_micros: i64,
    /// Balance below zero.
    pub overdrawn: bool,
    /// Balance below minus the overdraft limit: bar the SIMs.
    pub overdraft_limit_exceeded: bool,
    /// Alert conditions holding since the last run or top-up (`threshold:<micros>`,
    /// `overdrawn`, `overdraft_limit_exceeded`).
    pub active_alerts: Vec<String>,
    /// When the usage of the last run that changed the wallet was read, Unix ms.
    pub usage_as_of_ms: Option<i64>,
    /// Debited per (group, period).
    pub debits: Vec<PeriodDebitJson>,
    /// Top-ups by id.
    pub topups: Vec<TopupJson>,
    /// The newest alerts (up to 1000), oldest first.
    pub alerts: Vec<AlertJson>,
}

/// Answer of `GET /v1/billing/wallets`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalletsReply {
    /// By customer.
    pub wallets: Vec<WalletJson>,
}

/// Body of `POST /v1/admin/wallets/{customer}/topups`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopupRequest {
    /// The caller's idempotency key, 1 to 64 of `A-Z a-z 0-9 . _ -`.
    pub topup_id: String,
    /// Decimal amount in the wallet's currency ("25.00"), above 0.
    pub amount: String,
}

/// What a top-up did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopupStatus {
    /// Booked now (201).
    Booked,
    /// Booked before with the same amount (200).
    AlreadyBooked,
}

/// Answer of a top-up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopupReply {
    /// The customer.
    pub customer: String,
    /// The id.
    pub topup_id: String,
    /// What it did.
    pub status: TopupStatus,
    /// Amount, micro-units.
    pub amount_micros: i64,
    /// Balance after, micro-units.
    pub balance_micros: i64,
    /// The same as a decimal string.
    pub balance: String,
}

/// Answer of `GET /v1/billing/forecast`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForecastReply {
    /// The SIM.
    #[serde(with = "json_iccid")]
    pub iccid: u64,
    /// IANA zone the days were cut in.
    pub time_zone: String,
    /// The SIM's plan, if it has one.
    pub plan_id: Option<String>,
    /// `parameter` or `plan`.
    pub quota_source: String,
    /// The quota.
    pub quota_bytes: u64,
    /// First day of the lifetime.
    #[serde(with = "json_date")]
    pub since: Date,
    /// The day the forecast is made on.
    #[serde(with = "json_date")]
    pub as_of: Date,
    /// Used from `since` to `as_of`.
    pub used_bytes: u64,
    /// Quota minus used (0 when exhausted).
    pub remaining_bytes: u64,
    /// Days averaged.
    pub window_days: u32,
    /// Bytes in the window.
    pub window_bytes: u64,
    /// Day the quota runs out at the window's rate; `null` at rate 0.
    #[serde(with = "json_opt_date")]
    pub exhausted_on: Option<Date>,
    /// Last day of the lifetime.
    #[serde(with = "json_date")]
    pub expires_on: Date,
    /// Whether it runs out before it expires.
    pub runs_out_before_expiry: bool,
    /// Bytes a day that would last exactly until expiry.
    pub sustainable_bytes_per_day: u64,
}
