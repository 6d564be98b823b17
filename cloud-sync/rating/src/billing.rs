//! Billing: the plans of [`crate::pricing`] applied to the usage the store derives, and
//! prepaid wallets debited by what is priced. Pure: no IO, no clock, no store; the endpoint
//! reads and writes books in its store and serves them over HTTP. Every error here is a
//! decision refused, none is recoverable by retrying.
//!
//! # Which usage feeds a period
//!
//! Usage is derived with [`crate::usage::derive_daily_in`] in the plan file's `time_zone`
//! (default UTC): a SIM-day is a local day of that zone, and a billing period
//! `[start, end)` takes every SIM-day whose date is inside it. Every stored record counts,
//! open days included: a period in progress is charged for what is known so far, and a day
//! that still changes (late reports, within or after the settlement window) changes its
//! period's charge. The settlement ledger is not consulted: the charge of a period is always
//! the charge of the current derivation, and a wallet follows it (see below).
//!
//! # Wallets
//!
//! A wallet's book holds, per (group, period), the amount debited so far. A billing run
//! prices every period of every group of the customer up to today and debits the
//! **difference** between the charge now and what was debited for that period before, so
//!
//! - a run is idempotent (a second run with the same usage debits 0),
//! - repeated runs as usage grows debit only the increase,
//! - the amount debited for (customer, group, period) always equals that period's charge as
//!   of the last run, and the balance is `opening credit + top-ups − Σ debited`.
//!
//! A difference can be negative (bytes of a late report moved into an earlier period, a plan
//! was corrected, a group removed): the period is then credited back, so the invariant holds
//! whatever changed. The store keeps the per-period amount (not only the deltas), so even two
//! writers that raced could not make a period count twice.
//!
//! Alerts are level conditions with memory ([`AlertCondition`]): a run fires the conditions
//! that hold after it and did not hold (in the book) before, and stores the set; a top-up
//! drops from the set what no longer holds, so the next crossing alerts again.

use std::collections::{BTreeMap, BTreeSet};

use time::Date;

use crate::pricing::{
    rate, AlertCondition, Assignment, BillingPeriod, Charge, Plan, PricingConfig, PricingError, UsageItem,
    WalletAlert, WalletConfig,
};
use crate::usage::{DailyUsage, SimFault, UsageError};

/// Billing periods one run may price for one group (27 years of daily periods): a bound on
/// the work, not a limit anyone should meet.
pub const BILLING_PERIODS_PER_GROUP_MAX: usize = 10_000;
/// Top-ups one wallet may hold.
pub const TOPUPS_PER_WALLET_MAX: usize = 100_000;
/// Alerts returned per wallet by a query (the newest).
pub const WALLET_ALERTS_LISTED_MAX: usize = 1_000;
/// Days averaged for a quota forecast when the caller names none.
pub const FORECAST_WINDOW_DAYS_DEFAULT: u32 = 30;
/// Lifetime of a quota given as a parameter without a plan: the 1NCE lifetime plan's 10 years.
pub const FORECAST_LIFETIME_YEARS_DEFAULT: u32 = 10;

/// Why a billing decision was refused. None is recoverable by retrying: data or
/// configuration must change.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    /// A plan refused the input (overflow, bad configuration). Not recoverable by retrying.
    #[error(transparent)]
    Pricing(#[from] PricingError),
    /// Usage could not be derived. Not recoverable by retrying.
    #[error(transparent)]
    Usage(#[from] UsageError),
    /// The plan file could not be read or is invalid; the message names the file and the key.
    /// Not recoverable without editing the file.
    #[error("plans file {path}: {reason}")]
    PlansFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong, naming the key.
        reason: String,
    },
    /// A group would need more than [`BILLING_PERIODS_PER_GROUP_MAX`] periods. Not
    /// recoverable by retrying: set the group's `active_since`, or check device clocks.
    #[error("customer '{customer}' group '{group}': {periods} billing periods exceed {BILLING_PERIODS_PER_GROUP_MAX}")]
    TooManyPeriods {
        /// The customer.
        customer: String,
        /// The group.
        group: String,
        /// Periods it would need.
        periods: usize,
    },
    /// Money left its integer type. Not recoverable by retrying.
    #[error("arithmetic overflow computing {0}")]
    Overflow(&'static str),
    /// No plan file is configured. Not recoverable without configuration.
    #[error("no plans are configured (set [billing] plans_file)")]
    NotConfigured,
    /// The customer has no `[[wallet]]`. Not recoverable by retrying.
    #[error("customer '{0}' has no prepaid wallet")]
    NoWallet(String),
    /// The customer is not in the plan file. Not recoverable by retrying.
    #[error("no customer '{0}' in the plans")]
    UnknownCustomer(String),
    /// A top-up id was used before with another amount. Not recoverable by retrying: top-up
    /// ids are idempotency keys, pick a new one.
    #[error("top-up '{topup_id}' of customer '{customer}' was booked before with {booked_micros} micros, not {asked_micros}")]
    TopupConflict {
        /// The customer.
        customer: String,
        /// The top-up id.
        topup_id: String,
        /// Amount booked under it.
        booked_micros: i64,
        /// Amount asked now.
        asked_micros: i64,
    },
    /// The wallet holds [`TOPUPS_PER_WALLET_MAX`] top-ups. Not recoverable by retrying.
    #[error("customer '{0}' holds {TOPUPS_PER_WALLET_MAX} top-ups already")]
    TooManyTopups(String),
    /// A request is not valid (the message names the parameter). Not recoverable by retrying.
    #[error("{0}")]
    BadRequest(String),
    /// The SIM asked about has usage that cannot be derived (see [`crate::usage::SimFault`]).
    /// Not recoverable by retrying: its records must be examined.
    #[error("usage cannot be derived: {0}")]
    Underivable(SimFault),
}

/// The SIMs of `customer`'s groups whose usage cannot be derived, by ICCID. A wallet with
/// any is not billed by a run (neither debited nor credited) until they can be derived
/// again: its charge would silently drop their usage and credit back what was debited
/// for it.
pub fn customer_faulty_sims<'a>(
    config: &PricingConfig,
    customer: &str,
    faults: &'a BTreeMap<u64, SimFault>,
) -> Vec<&'a SimFault> {
    let mut out: Vec<&SimFault> = config
        .assignments
        .iter()
        .filter(|a| a.customer == customer)
        .flat_map(|a| a.iccids.iter().filter_map(|i| faults.get(i)))
        .collect();
    out.sort_by_key(|f| f.iccid);
    out.dedup_by_key(|f| f.iccid);
    out
}

/// The usage items of each assignment (index as in [`PricingConfig::assignments`]): one item
/// per SIM-day, both directions. SIMs without an assignment are left out (and counted).
pub fn items_by_assignment(
    config: &PricingConfig,
    daily: &DailyUsage,
) -> Result<(Vec<Vec<UsageItem>>, usize), BillingError> {
    let mut out: Vec<Vec<UsageItem>> = vec![Vec::new(); config.assignments.len()];
    let mut unassigned = BTreeSet::new();
    for ((iccid, date), t) in daily {
        let bytes = t.sum().ok_or(UsageError::Overflow { iccid: *iccid })?;
        match config.assignment_index_of(*iccid).and_then(|i| out.get_mut(i)) {
            Some(items) => items.push(UsageItem { iccid: *iccid, date: *date, bytes }),
            None => {
                unassigned.insert(*iccid);
            }
        }
    }
    Ok((out, unassigned.len()))
}

fn plan_of<'a>(config: &'a PricingConfig, a: &Assignment) -> Result<&'a Plan, BillingError> {
    config.plans.get(&a.plan).ok_or_else(|| {
        PricingError::Invalid { key: "assign.plan".into(), reason: format!("no plan '{}'", a.plan) }.into()
    })
}

fn period_of(plan: &Plan, date: Date) -> Result<BillingPeriod, BillingError> {
    plan.cycle.period_of(date).ok_or(BillingError::Overflow("billing period"))
}

/// Which period a charges query prices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeriodSelector {
    /// For each group, its plan's billing period containing this day.
    Containing(Date),
    /// One period from `from` to `to` (both included) for every group, whatever the plans'
    /// cycles: flat fee and allowance apply once, tiers over the whole range.
    Range {
        /// First day.
        from: Date,
        /// Last day.
        to: Date,
    },
}

/// The charge of one group for one period.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupCharge {
    /// The customer.
    pub customer: String,
    /// The group.
    pub group: String,
    /// SIMs assigned to the group.
    pub sims: usize,
    /// The explained charge (plan, period, rounding, lines, total).
    pub charge: Charge,
}

/// Prices one period per group, for every group (or one customer's, or one group).
pub fn charges(
    config: &PricingConfig,
    items: &[Vec<UsageItem>],
    selector: PeriodSelector,
    customer: Option<&str>,
    group: Option<&str>,
) -> Result<Vec<GroupCharge>, BillingError> {
    let mut out = Vec::new();
    for (i, a) in config.assignments.iter().enumerate() {
        if customer.is_some_and(|c| c != a.customer) || group.is_some_and(|g| g != a.group) {
            continue;
        }
        let plan = plan_of(config, a)?;
        let period = match selector {
            PeriodSelector::Containing(day) => period_of(plan, day)?,
            PeriodSelector::Range { from, to } => BillingPeriod {
                start: from,
                end: to.next_day().ok_or(BillingError::Overflow("billing period"))?,
            },
        };
        let group_items = items.get(i).map(Vec::as_slice).unwrap_or_default();
        out.push(GroupCharge {
            customer: a.customer.clone(),
            group: a.group.clone(),
            sims: a.iccids.len(),
            charge: rate(plan, period, group_items)?,
        });
    }
    Ok(out)
}

/// The charge of one (group, period) in a billing run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeriodCharge {
    /// The group.
    pub group: String,
    /// The plan that priced it.
    pub plan_id: String,
    /// The period.
    pub period: BillingPeriod,
    /// Its charge now, micro-units.
    pub total_micros: u64,
}

/// Prices every period of `assignment` a run bills up to `today`: from the group's
/// `active_since` (or its first day of usage) through the period containing `today`, plus
/// any later period with usage (a device clock ahead) and any period named in `also` (those
/// already debited, so that they are repriced).
pub fn group_period_charges(
    plan: &Plan,
    assignment: &Assignment,
    items: &[UsageItem],
    today: Date,
    also: &BTreeSet<Date>,
) -> Result<Vec<PeriodCharge>, BillingError> {
    let mut buckets: BTreeMap<Date, (BillingPeriod, Vec<UsageItem>)> = BTreeMap::new();
    for it in items {
        let p = period_of(plan, it.date)?;
        buckets.entry(p.start).or_insert_with(|| (p, Vec::new())).1.push(*it);
    }
    let first_usage = buckets.keys().next().copied();
    let start = match (assignment.active_since, first_usage) {
        (Some(a), Some(u)) => Some(a.min(u)),
        (a, u) => a.or(u),
    };
    let too_many = |periods| BillingError::TooManyPeriods {
        customer: assignment.customer.clone(),
        group: assignment.group.clone(),
        periods,
    };
    if let Some(start) = start {
        let mut p = period_of(plan, start)?;
        while p.start <= today {
            buckets.entry(p.start).or_insert_with(|| (p, Vec::new()));
            if buckets.len() > BILLING_PERIODS_PER_GROUP_MAX {
                return Err(too_many(buckets.len()));
            }
            p = period_of(plan, p.end)?;
        }
    }
    for d in also {
        // A booked period that is not a period of the current cycle (the cycle changed) is
        // not added: it is credited back, and the current periods carry its usage.
        let p = period_of(plan, *d)?;
        if p.start == *d {
            buckets.entry(p.start).or_insert_with(|| (p, Vec::new()));
        }
    }
    if buckets.len() > BILLING_PERIODS_PER_GROUP_MAX {
        return Err(too_many(buckets.len()));
    }
    let mut out = Vec::with_capacity(buckets.len());
    for (period, group_items) in buckets.into_values() {
        let c = rate(plan, period, &group_items)?;
        out.push(PeriodCharge {
            group: assignment.group.clone(),
            plan_id: plan.id.clone(),
            period,
            total_micros: c.total_micros,
        });
    }
    Ok(out)
}

/// Every period charge of `customer` a run bills up to `today` (see [`group_period_charges`]).
pub fn customer_period_charges(
    config: &PricingConfig,
    items: &[Vec<UsageItem>],
    customer: &str,
    today: Date,
    book: &WalletBook,
) -> Result<Vec<PeriodCharge>, BillingError> {
    let mut out = Vec::new();
    for (i, a) in config.assignments.iter().enumerate() {
        if a.customer != customer {
            continue;
        }
        let also: BTreeSet<Date> =
            book.debits.keys().filter(|(g, _)| *g == a.group).map(|(_, start)| *start).collect();
        let group_items = items.get(i).map(Vec::as_slice).unwrap_or_default();
        out.extend(group_period_charges(plan_of(config, a)?, a, group_items, today, &also)?);
    }
    Ok(out)
}

/// What a wallet's book holds for one (group, period).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BookedDebit {
    /// The group.
    pub group: String,
    /// The plan that priced it last.
    pub plan_id: String,
    /// The period.
    pub period: BillingPeriod,
    /// Debited so far (the period's charge at the last run that changed it), micro-units.
    pub debited_micros: i64,
    /// How many runs changed it.
    pub debits: u32,
    /// When it last changed, Unix seconds.
    pub updated_at_s: i64,
}

/// A booked top-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topup {
    /// Amount credited, micro-units (> 0).
    pub amount_micros: i64,
    /// When it was booked, Unix seconds.
    pub at_s: i64,
}

/// A wallet's durable state, as a run or a top-up reads it under the wallet's lock.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WalletBook {
    /// Debited so far per (group, period start).
    pub debits: BTreeMap<(String, Date), BookedDebit>,
    /// Top-ups by their caller-chosen id.
    pub topups: BTreeMap<String, Topup>,
    /// Alert conditions that held after the last run or top-up.
    pub active: BTreeSet<AlertCondition>,
    /// Alerts recorded so far (the next one gets this number plus 1).
    pub alert_seq: u64,
    /// When the usage the last run priced was read, Unix milliseconds: a run that read older
    /// usage leaves the wallet alone.
    pub usage_as_of_ms: Option<i64>,
}

impl WalletBook {
    /// Σ top-ups, micro-units.
    pub fn topups_micros(&self) -> Result<i64, BillingError> {
        self.topups
            .values()
            .try_fold(0i64, |a, t| a.checked_add(t.amount_micros))
            .ok_or(BillingError::Overflow("wallet top-ups"))
    }

    /// Σ debited, micro-units.
    pub fn debited_micros(&self) -> Result<i64, BillingError> {
        self.debits
            .values()
            .try_fold(0i64, |a, d| a.checked_add(d.debited_micros))
            .ok_or(BillingError::Overflow("wallet debits"))
    }

    /// `opening + top-ups − debited`.
    pub fn balance_micros(&self, wallet: &WalletConfig) -> Result<i64, BillingError> {
        wallet
            .opening_micros
            .checked_add(self.topups_micros()?)
            .and_then(|b| b.checked_sub(self.debited_micros().ok()?))
            .ok_or(BillingError::Overflow("wallet balance"))
    }
}

/// One (group, period) a run changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebitChange {
    /// The group.
    pub group: String,
    /// The plan that priced it.
    pub plan_id: String,
    /// The period.
    pub period: BillingPeriod,
    /// Its charge now (0 for a booked period no longer priced), micro-units.
    pub charge_micros: i64,
    /// Debited for it before this run.
    pub previously_micros: i64,
    /// Debited now: `charge − previously` (negative: credited back).
    pub delta_micros: i64,
}

/// What a billing run does to one wallet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunDecision {
    /// Periods whose debit changes, by group and period.
    pub changes: Vec<DebitChange>,
    /// Balance before the run.
    pub balance_before_micros: i64,
    /// Balance after it.
    pub balance_after_micros: i64,
    /// Alerts that fire (conditions that hold now and did not before).
    pub alerts: Vec<WalletAlert>,
    /// Conditions that hold after the run.
    pub active_after: BTreeSet<AlertCondition>,
}

impl RunDecision {
    /// Σ deltas: what this run debits in all (negative: credits).
    pub fn debited_micros(&self) -> Result<i64, BillingError> {
        self.changes
            .iter()
            .try_fold(0i64, |a, c| a.checked_add(c.delta_micros))
            .ok_or(BillingError::Overflow("run debits"))
    }
}

/// Decides a billing run for one wallet: the debit of each (group, period) whose charge
/// differs from what was debited, the balance, and the alerts (see the module docs). A
/// booked period absent from `charges` is credited back to 0.
pub fn decide_run(
    wallet: &WalletConfig,
    book: &WalletBook,
    charges: &[PeriodCharge],
) -> Result<RunDecision, BillingError> {
    let mut now: BTreeMap<(String, Date), &PeriodCharge> = BTreeMap::new();
    for c in charges {
        now.insert((c.group.clone(), c.period.start), c);
    }
    let keys: BTreeSet<&(String, Date)> = now.keys().chain(book.debits.keys()).collect();
    let balance_before_micros = book.balance_micros(wallet)?;
    let mut balance = balance_before_micros;
    let mut changes = Vec::new();
    for key in keys {
        let booked = book.debits.get(key);
        let previously_micros = booked.map_or(0, |b| b.debited_micros);
        let (charge_micros, plan_id, period) = match (now.get(key), booked) {
            (Some(c), _) => (
                i64::try_from(c.total_micros).map_err(|_| BillingError::Overflow("charge"))?,
                c.plan_id.clone(),
                c.period,
            ),
            (None, Some(b)) => (0, b.plan_id.clone(), b.period),
            (None, None) => continue,
        };
        let delta_micros =
            charge_micros.checked_sub(previously_micros).ok_or(BillingError::Overflow("debit"))?;
        if delta_micros == 0 {
            continue;
        }
        balance = balance.checked_sub(delta_micros).ok_or(BillingError::Overflow("wallet balance"))?;
        changes.push(DebitChange {
            group: key.0.clone(),
            plan_id,
            period,
            charge_micros,
            previously_micros,
            delta_micros,
        });
    }
    let after = wallet.wallet(balance);
    let active_after = after.conditions();
    let alerts = active_after.difference(&book.active).map(|c| after.alert(*c)).collect();
    Ok(RunDecision { changes, balance_before_micros, balance_after_micros: balance, alerts, active_after })
}

/// What a top-up does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TopupDecision {
    /// Book it: the balance after, and the conditions that still hold (a top-up re-arms,
    /// never fires).
    Book {
        /// Balance after the top-up.
        balance_after_micros: i64,
        /// Conditions still holding.
        active_after: BTreeSet<AlertCondition>,
    },
    /// The same id and amount were booked before: nothing to do.
    AlreadyBooked {
        /// The balance now.
        balance_micros: i64,
    },
}

/// Decides a top-up of `amount_micros` under the caller's idempotency key `topup_id`.
pub fn decide_topup(
    wallet: &WalletConfig,
    book: &WalletBook,
    topup_id: &str,
    amount_micros: i64,
) -> Result<TopupDecision, BillingError> {
    if amount_micros <= 0 {
        return Err(BillingError::BadRequest("amount: must be above 0".into()));
    }
    let balance = book.balance_micros(wallet)?;
    if let Some(t) = book.topups.get(topup_id) {
        if t.amount_micros == amount_micros {
            return Ok(TopupDecision::AlreadyBooked { balance_micros: balance });
        }
        return Err(BillingError::TopupConflict {
            customer: wallet.customer.clone(),
            topup_id: topup_id.to_owned(),
            booked_micros: t.amount_micros,
            asked_micros: amount_micros,
        });
    }
    if book.topups.len() >= TOPUPS_PER_WALLET_MAX {
        return Err(BillingError::TooManyTopups(wallet.customer.clone()));
    }
    let after = balance.checked_add(amount_micros).ok_or(BillingError::Overflow("wallet balance"))?;
    let holds = wallet.wallet(after).conditions();
    Ok(TopupDecision::Book {
        balance_after_micros: after,
        active_after: book.active.intersection(&holds).copied().collect(),
    })
}

/// A recorded alert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertRecord {
    /// 1, 2, … per wallet.
    pub seq: u64,
    /// What fired.
    pub alert: WalletAlert,
    /// When, Unix seconds.
    pub raised_at_s: i64,
}

/// What a store writes for one wallet, in one transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WalletWrite {
    /// (group, period) rows to insert or replace, with their new absolute amounts.
    pub debits: Vec<BookedDebit>,
    /// A top-up to insert under its id.
    pub topup: Option<(String, Topup)>,
    /// Alerts to record.
    pub alerts: Vec<AlertRecord>,
    /// The conditions that hold now.
    pub active: BTreeSet<AlertCondition>,
    /// The wallet's alert count after the write.
    pub alert_seq: u64,
    /// When the usage priced was read (kept as it was for a top-up).
    pub usage_as_of_ms: Option<i64>,
}

/// The write that stores `decision` (read under the lock, from `book`).
pub fn run_write(
    book: &WalletBook,
    decision: &RunDecision,
    usage_as_of_ms: i64,
    now_s: i64,
) -> Result<WalletWrite, BillingError> {
    let debits = decision
        .changes
        .iter()
        .map(|c| BookedDebit {
            group: c.group.clone(),
            plan_id: c.plan_id.clone(),
            period: c.period,
            debited_micros: c.charge_micros,
            debits: book
                .debits
                .get(&(c.group.clone(), c.period.start))
                .map_or(0, |b| b.debits)
                .saturating_add(1),
            updated_at_s: now_s,
        })
        .collect();
    let mut seq = book.alert_seq;
    let mut alerts = Vec::with_capacity(decision.alerts.len());
    for a in &decision.alerts {
        seq = seq.checked_add(1).ok_or(BillingError::Overflow("alert sequence"))?;
        alerts.push(AlertRecord { seq, alert: a.clone(), raised_at_s: now_s });
    }
    Ok(WalletWrite {
        debits,
        topup: None,
        alerts,
        active: decision.active_after.clone(),
        alert_seq: seq,
        usage_as_of_ms: Some(usage_as_of_ms),
    })
}

/// The write that books a top-up `decision` allowed.
pub fn topup_write(
    book: &WalletBook,
    topup_id: &str,
    topup: Topup,
    active_after: BTreeSet<AlertCondition>,
) -> WalletWrite {
    WalletWrite {
        debits: Vec::new(),
        topup: Some((topup_id.to_owned(), topup)),
        alerts: Vec::new(),
        active: active_after,
        alert_seq: book.alert_seq,
        usage_as_of_ms: book.usage_as_of_ms,
    }
}

/// `book` after `write` was stored: the same bookkeeping the stores do.
pub fn apply_write(book: &mut WalletBook, write: &WalletWrite) {
    for d in &write.debits {
        book.debits.insert((d.group.clone(), d.period.start), d.clone());
    }
    if let Some((id, t)) = &write.topup {
        book.topups.insert(id.clone(), t.clone());
    }
    book.active = write.active.clone();
    book.alert_seq = write.alert_seq;
    book.usage_as_of_ms = write.usage_as_of_ms;
}

#[cfg(test)]
mod tests {
    use super::*;
    use countersign_meter::Totals;
    use proptest::prelude::*;
    use time::macros::date;

    const GB: u64 = 1_000_000_000;
    const SIM: u64 = 8_988_280_666_000_000_001;
    const SIM2: u64 = 8_988_280_666_000_000_002;

    fn config(extra: &str) -> PricingConfig {
        PricingConfig::from_toml_str(&format!(
            r#"
[[plan]]
id = "field-example"
currency = "USD"
unit = "GB"
model = "graduated"
tiers = [{{ up_to = 100, price = "0.10" }}, {{ up_to = 500, price = "0.08" }}, {{ price = "0.06" }}]

[[assign]]
customer = "acme"
group = "fleet"
plan = "field-example"
iccids = ["{SIM}"]
{extra}
"#
        ))
        .unwrap()
    }

    fn wallet_cfg(cfg: &PricingConfig) -> WalletConfig {
        cfg.wallets["acme"].clone()
    }

    const WALLET: &str = r#"
[[wallet]]
customer = "acme"
currency = "USD"
opening_credit = "100.00"
alert_thresholds = ["60", "20"]
overdraft_limit = "10"
"#;

    fn daily(entries: &[(u64, Date, u64)]) -> DailyUsage {
        entries.iter().map(|(i, d, b)| ((*i, *d), Totals { up: *b, down: 0 })).collect()
    }

    fn run(cfg: &PricingConfig, book: &mut WalletBook, usage: &DailyUsage, today: Date) -> RunDecision {
        let (items, _) = items_by_assignment(cfg, usage).unwrap();
        let charges = customer_period_charges(cfg, &items, "acme", today, book).unwrap();
        let d = decide_run(&wallet_cfg(cfg), book, &charges).unwrap();
        let w = run_write(book, &d, 0, 0).unwrap();
        assert_eq!(w.alerts.len(), d.alerts.len());
        apply_write(book, &w);
        d
    }

    #[test]
    fn worked_example_is_charged_per_group_and_period() {
        let cfg = config("");
        let usage = daily(&[
            (SIM, date!(2026 - 11 - 03), 200 * GB),
            (SIM, date!(2026 - 11 - 20), 400 * GB),
            (SIM, date!(2026 - 12 - 01), 7 * GB),
            (SIM2, date!(2026 - 11 - 20), 999 * GB),
        ]);
        let (items, unassigned) = items_by_assignment(&cfg, &usage).unwrap();
        assert_eq!(unassigned, 1);
        let c = charges(&cfg, &items, PeriodSelector::Containing(date!(2026 - 11 - 10)), None, None).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].charge.total_micros, 48_000_000);
        assert_eq!(c[0].charge.period.start, date!(2026 - 11 - 01));
        let r = PeriodSelector::Range { from: date!(2026 - 11 - 20), to: date!(2026 - 12 - 01) };
        let c = charges(&cfg, &items, r, Some("acme"), None).unwrap();
        // 407 GB: $10 + $24.56.
        assert_eq!(c[0].charge.total_micros, 34_560_000);
        assert!(charges(&cfg, &items, r, Some("other"), None).unwrap().is_empty());
    }

    #[test]
    fn runs_debit_the_difference_and_alert_once_per_crossing() {
        let cfg = config(WALLET);
        let w = wallet_cfg(&cfg);
        let mut book = WalletBook::default();
        let nov = date!(2026 - 11 - 03);
        let today = date!(2026 - 11 - 30);
        // 300 GB: $26, balance 74 — no threshold yet.
        let d = run(&cfg, &mut book, &daily(&[(SIM, nov, 300 * GB)]), today);
        assert_eq!((d.debited_micros().unwrap(), d.balance_after_micros), (26_000_000, 74_000_000));
        assert!(d.alerts.is_empty());
        // The same usage again: nothing.
        let d = run(&cfg, &mut book, &daily(&[(SIM, nov, 300 * GB)]), today);
        assert!(d.changes.is_empty() && d.alerts.is_empty());
        // 600 GB: $48, debits only $22 more; balance 52 crosses 60.
        let d = run(&cfg, &mut book, &daily(&[(SIM, nov, 600 * GB)]), today);
        assert_eq!(d.debited_micros().unwrap(), 22_000_000);
        assert_eq!(
            d.alerts,
            vec![WalletAlert::ThresholdCrossed { threshold_micros: 60_000_000, balance_micros: 52_000_000 }]
        );
        // Still below 60 after more usage: no second alert for it.
        let usage = daily(&[(SIM, nov, 600 * GB), (SIM, date!(2026 - 12 - 01), 100 * GB)]);
        let d = run(&cfg, &mut book, &usage, date!(2026 - 12 - 01));
        assert_eq!(d.debited_micros().unwrap(), 10_000_000);
        assert!(d.alerts.is_empty(), "{:?}", d.alerts);
        // Usage of a new month past all thresholds, zero and the overdraft limit at once.
        let usage = daily(&[(SIM, nov, 600 * GB), (SIM, date!(2026 - 12 - 01), 700 * GB)]);
        let d = run(&cfg, &mut book, &usage, date!(2026 - 12 - 01));
        assert_eq!(d.balance_after_micros, 100_000_000 - 48_000_000 - 54_000_000);
        let kinds: Vec<&str> = d.alerts.iter().map(WalletAlert::kind).collect();
        assert_eq!(kinds, vec!["threshold_crossed", "overdrawn"]);
        assert!(!d.active_after.contains(&AlertCondition::OverdraftLimitExceeded));
        assert_eq!(book.balance_micros(&w).unwrap(), -2_000_000);
        // A top-up re-arms what no longer holds; the next crossing alerts again.
        let TopupDecision::Book { balance_after_micros, active_after } =
            decide_topup(&w, &book, "t1", 50_000_000).unwrap()
        else {
            panic!("booked");
        };
        assert_eq!(balance_after_micros, 48_000_000);
        assert_eq!(active_after, BTreeSet::from([AlertCondition::Threshold(60_000_000)]));
        book.topups.insert("t1".into(), Topup { amount_micros: 50_000_000, at_s: 0 });
        book.active = active_after;
        assert_eq!(
            decide_topup(&w, &book, "t1", 50_000_000).unwrap(),
            TopupDecision::AlreadyBooked { balance_micros: 48_000_000 }
        );
        assert!(matches!(decide_topup(&w, &book, "t1", 1), Err(BillingError::TopupConflict { .. })));
        assert!(decide_topup(&w, &book, "t2", 0).is_err());
        // December at 1700 GB costs $114: the balance goes from 48 to -12.
        let usage = daily(&[(SIM, nov, 600 * GB), (SIM, date!(2026 - 12 - 01), 1700 * GB)]);
        let d = run(&cfg, &mut book, &usage, date!(2026 - 12 - 01));
        assert_eq!(d.balance_after_micros, -12_000_000);
        let kinds: Vec<&str> = d.alerts.iter().map(WalletAlert::kind).collect();
        assert_eq!(kinds, vec!["threshold_crossed", "overdrawn", "overdraft_limit_exceeded"]);
        assert_eq!(d.alerts[0].condition(), AlertCondition::Threshold(20_000_000));
    }

    #[test]
    fn periods_run_from_active_since_with_flat_fees_and_moved_bytes_are_credited() {
        let cfg = PricingConfig::from_toml_str(&format!(
            r#"
[[plan]]
id = "flat"
currency = "EUR"
model = "per_unit"
unit = "MB"
price = "0.01"
flat_fee = "2"
included_bytes = 1000000

[[assign]]
customer = "acme"
group = "g"
plan = "flat"
iccids = ["{SIM}"]
active_since = "2026-09-15"

[[wallet]]
customer = "acme"
currency = "EUR"
"#
        ))
        .unwrap();
        let mut book = WalletBook::default();
        // September (from the 15th, the period is still the calendar month), October, November:
        // three flat fees, no usage.
        let d = run(&cfg, &mut book, &DailyUsage::new(), date!(2026 - 11 - 02));
        assert_eq!(d.changes.len(), 3);
        assert_eq!(d.debited_micros().unwrap(), 6_000_000);
        // 101 MB on 31 October: 100 MB over the allowance, $1.
        let oct = daily(&[(SIM, date!(2026 - 10 - 31), 101_000_000)]);
        let d = run(&cfg, &mut book, &oct, date!(2026 - 11 - 02));
        assert_eq!(d.debited_micros().unwrap(), 1_000_000);
        // A late report moves the bytes to 1 November: October is credited, November debited.
        let nov = daily(&[(SIM, date!(2026 - 11 - 01), 101_000_000)]);
        let d = run(&cfg, &mut book, &nov, date!(2026 - 11 - 02));
        let deltas: Vec<i64> = d.changes.iter().map(|c| c.delta_micros).collect();
        assert_eq!(deltas, vec![-1_000_000, 1_000_000]);
        assert_eq!(book.debited_micros().unwrap(), 7_000_000);
    }

    #[test]
    fn booked_periods_of_a_removed_group_are_credited_back() {
        let cfg = config(WALLET);
        let mut book = WalletBook::default();
        let usage = daily(&[(SIM, date!(2026 - 11 - 03), 600 * GB)]);
        run(&cfg, &mut book, &usage, date!(2026 - 11 - 30));
        let gone = BookedDebit {
            group: "gone".into(),
            plan_id: "field-example".into(),
            period: BillingPeriod { start: date!(2026 - 10 - 01), end: date!(2026 - 11 - 01) },
            debited_micros: 5,
            debits: 1,
            updated_at_s: 0,
        };
        book.debits.insert(("gone".into(), date!(2026 - 10 - 01)), gone);
        let d = run(&cfg, &mut book, &usage, date!(2026 - 11 - 30));
        assert_eq!(d.changes.len(), 1);
        assert_eq!((d.changes[0].group.as_str(), d.changes[0].delta_micros), ("gone", -5));
        assert_eq!(book.debited_micros().unwrap(), 48_000_000);
    }

    #[test]
    fn too_many_periods_is_an_error_naming_the_group() {
        let cfg = PricingConfig::from_toml_str(&format!(
            r#"
[[plan]]
id = "d"
currency = "USD"
model = "per_unit"
price = "1"
billing_cycle = "daily"
flat_fee = "1"

[[assign]]
customer = "acme"
group = "old"
plan = "d"
iccids = ["{SIM}"]
active_since = "1990-01-01"
"#
        ))
        .unwrap();
        let e =
            customer_period_charges(&cfg, &[vec![]], "acme", date!(2026 - 11 - 30), &WalletBook::default())
                .unwrap_err();
        assert!(matches!(&e, BillingError::TooManyPeriods { group, .. } if group == "old"), "{e}");
    }

    proptest! {
        /// Whatever the order of runs and usage increments (growing usage, bytes spread over
        /// days of several months, runs at any point), the debits add up to the charge of the
        /// final usage, a run right after another debits nothing, and each alert condition
        /// fires at most once without a top-up in between.
        #[test]
        fn debits_add_up_to_the_final_charge(
            steps in proptest::collection::vec((any::<bool>(), 0i64..75, 0u64..200 * GB), 1..30),
        ) {
            let cfg = config(WALLET);
            let w = wallet_cfg(&cfg);
            let mut usage = DailyUsage::new();
            let mut book = WalletBook::default();
            let mut debited = 0i64;
            let mut fired = BTreeMap::<AlertCondition, u32>::new();
            let base = date!(2026 - 10 - 01);
            let mut today = base;
            for (run_now, day, bytes) in steps {
                let date = base + time::Duration::days(day);
                let e = usage.entry((SIM, date)).or_default();
                e.up += bytes;
                today = today.max(date);
                if run_now {
                    let d = run(&cfg, &mut book, &usage, today);
                    debited += d.debited_micros().unwrap();
                    for a in &d.alerts {
                        *fired.entry(a.condition()).or_default() += 1;
                    }
                    let again = run(&cfg, &mut book, &usage, today);
                    prop_assert!(again.changes.is_empty() && again.alerts.is_empty());
                }
            }
            let d = run(&cfg, &mut book, &usage, today);
            debited += d.debited_micros().unwrap();
            for a in &d.alerts {
                *fired.entry(a.condition()).or_default() += 1;
            }
            let (items, _) = items_by_assignment(&cfg, &usage).unwrap();
            let expected: u64 = customer_period_charges(&cfg, &items, "acme", today, &WalletBook::default())
                .unwrap()
                .iter()
                .map(|c| c.total_micros)
                .sum();
            prop_assert_eq!(debited, i64::try_from(expected).unwrap());
            prop_assert_eq!(book.debited_micros().unwrap(), debited);
            prop_assert_eq!(book.balance_micros(&w).unwrap(), 100_000_000 - debited);
            // Usage only grows, so the balance only falls: every condition fires at most once.
            prop_assert!(fired.values().all(|n| *n == 1), "{:?}", fired);
            prop_assert_eq!(fired.keys().copied().collect::<BTreeSet<_>>(), book.active.clone());
        }
    }
}
