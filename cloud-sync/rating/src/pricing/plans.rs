//! Plans and charges: tiers, charge models, usage rounding, billing cycles and periods, and
//! [`rate`], which prices a period's usage under a plan, every line explained.

#[allow(unused_imports)]
use super::*;

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
    #[serde(serialize_with = "crate::text::json_date::serialize")]
    pub start: Date,
    /// First day after the period.
    #[serde(serialize_with = "crate::text::json_date::serialize")]
    pub end: Date,
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

pub(super) fn tier_bound_bytes(tier: &Tier, unit_bytes: u64) -> Result<Option<u64>, PricingError> {
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
