//! Plans and charges: tiers, charge models, usage rounding, billing cycles and periods, and
//! [`rate`], which prices a period's usage under a plan, every line explained.

#[allow(unused_imports)]
use super::*;

/// One tier: usage up to `up_to_units` (cumulative, in the plan's unit; `None` = no end) at
/// `unit_price_micros` per unit, plus `flat_amount_micros` once when usage reaches the tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tier {
    /// Upper bound of the tier in units, inclusive; `None` only on the last tier.
    pub up_to_units: Option<u64>,
    /// Price per unit in micro-units.
    pub unit_price_micros: u64,
    /// Charged once per period when the tier applies (Lago's per-range `flat_amount`): a
    /// graduated tier applies when usage is above the previous tier's bound (the first tier
    /// always, even at zero usage, as in Lago); a volume tier when it prices the usage.
    pub flat_amount_micros: u64,
}

/// Whose pricing rules a plan follows (`semantics` in the plan file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Semantics {
    /// Countersign's own (the default): each line rounded half up to the micro, and
    /// `included_bytes` deducted before every model prices.
    Countersign,
    /// Lago's, so a period's charge equals Lago's for the same plan and usage to the minor unit
    /// (see [`crate::pricing`], "Lago semantics"): the usage fee is summed exactly and rounded
    /// once, half up, to the currency's exponent; `included_bytes` are Lago's package
    /// `free_units`, or for graduated and per-unit plans a zero-priced start of the first tier.
    Lago {
        /// Fraction digits of the currency's minor unit (ISO 4217; 2 for USD, 0 for JPY).
        exponent: u32,
    },
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
    /// Whose rounding and free-unit rules apply.
    pub semantics: Semantics,
    /// Least usage charge per period (Lago's charge `min_amount_cents`), micro-units; 0 = none.
    /// A lower usage charge (the model's lines, not the flat fee) is raised to it by a
    /// `minimum` true-up line.
    pub minimum_micros: u64,
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
    /// `flat_fee`, `per_unit`, `tier`, `tier_flat`, `volume`, `package`, `minimum`; under
    /// Lago semantics also `included` (usage priced at zero) and `rounding` (the fee's one
    /// rounding to the currency's minor unit).
    pub kind: &'static str,
    /// Human explanation, e.g. "tier 2: 100 GB < usage ≤ 500 GB".
    pub description: String,
    /// Bytes priced on this line.
    pub quantity_bytes: u64,
    /// The pricing unit's name ("GB"), or "package"/"period"/"tier" (a tier's flat amount), or
    /// the currency (a `rounding` line, whose unit price is the minor unit in micro-units).
    pub unit: String,
    /// Bytes per unit.
    pub unit_bytes: u64,
    /// Price per unit in micro-units.
    pub unit_price_micros: u64,
    /// Amount in micro-units. Only a `rounding` line may be negative (a fee rounded down).
    pub amount_micros: i64,
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

/// `num / den` rounded half up (`den` ≥ 1).
fn div_half_up(num: u128, den: u128) -> u128 {
    num / den + u128::from(2 * (num % den) >= den)
}

/// Micro-units as an `i64` line amount.
fn line_micros(micros: u128) -> Result<i64, PricingError> {
    i64::try_from(micros).map_err(|_| PricingError::Overflow("line amount"))
}

pub(super) fn tier_bound_bytes(tier: &Tier, unit_bytes: u64) -> Result<Option<u64>, PricingError> {
    tier.up_to_units
        .map(|u| u.checked_mul(unit_bytes).ok_or(PricingError::Overflow("tier bound")))
        .transpose()
}

/// One priced part of the usage charge before any fee rounding: its exact amount is
/// `exact_num / plan unit bytes` micro-units, so every part shares one denominator and the
/// parts add up exactly.
struct Part {
    kind: &'static str,
    description: String,
    quantity_bytes: u64,
    unit: String,
    unit_bytes: u64,
    unit_price_micros: u64,
    exact_num: u128,
    money_rounding: &'static str,
}

impl Part {
    fn line(self, ub: u64, money_rounding: Option<&'static str>) -> Result<ChargeLine, PricingError> {
        Ok(ChargeLine {
            kind: self.kind,
            description: self.description,
            quantity_bytes: self.quantity_bytes,
            unit: self.unit,
            unit_bytes: self.unit_bytes,
            unit_price_micros: self.unit_price_micros,
            amount_micros: line_micros(div_half_up(self.exact_num, u128::from(ub.max(1))))?,
            money_rounding: money_rounding.unwrap_or(self.money_rounding),
        })
    }
}

/// The parts of the usage charge for `usage` bytes under `plan`'s model. `free_start` bytes
/// at the start of the scale are priced at zero inside the first tier (Lago semantics'
/// `included_bytes` for graduated and per-unit plans; 0 otherwise).
fn model_parts(plan: &Plan, usage: u64, free_start: u64) -> Result<Vec<Part>, PricingError> {
    let ub = plan.unit.bytes();
    let unit = plan.unit.name();
    let ovf = || PricingError::Overflow("line amount");
    let per_unit = |kind, description: String, q: u64, price: u64| Part {
        kind,
        description,
        quantity_bytes: q,
        unit: unit.to_owned(),
        unit_bytes: ub,
        unit_price_micros: price,
        exact_num: u128::from(q) * u128::from(price),
        money_rounding: MONEY_ROUNDING,
    };
    let flat = |i: usize, micros: u64| Part {
        kind: "tier_flat",
        description: format!("tier {} flat amount", i + 1),
        quantity_bytes: 0,
        unit: "tier".to_owned(),
        unit_bytes: 0,
        unit_price_micros: micros,
        exact_num: u128::from(micros) * u128::from(ub),
        money_rounding: "none",
    };
    let included = |q: u64| {
        let mut p = per_unit("included", format!("included: the first {free_start} bytes at zero"), q, 0);
        p.money_rounding = "none";
        p
    };
    let range_text = |lo: Option<u64>, hi: Option<u64>| match (lo, hi) {
        (None, Some(h)) => format!("usage ≤ {h} {unit}"),
        (Some(l), Some(h)) => format!("{l} {unit} < usage ≤ {h} {unit}"),
        (Some(l), None) => format!("usage > {l} {unit}"),
        (None, None) => "all usage".to_owned(),
    };
    let mut out = Vec::new();
    match &plan.model {
        ChargeModel::PerUnit { unit_price_micros } => {
            let free = usage.min(free_start);
            if free_start > 0 {
                out.push(included(free));
            }
            out.push(per_unit("per_unit", format!("per {unit}"), usage - free, *unit_price_micros));
        }
        ChargeModel::Graduated { tiers } => {
            let mut lower = 0u64;
            let mut lower_units = None;
            for (i, t) in tiers.iter().enumerate() {
                let upper = tier_bound_bytes(t, ub)?.unwrap_or(u64::MAX);
                let q = usage.min(upper).saturating_sub(lower);
                let description = format!("tier {}: {}", i + 1, range_text(lower_units, t.up_to_units));
                let free = if i == 0 { q.min(free_start) } else { 0 };
                if i == 0 && free_start > 0 {
                    out.push(included(free));
                }
                out.push(per_unit("tier", description, q - free, t.unit_price_micros));
                if t.flat_amount_micros > 0 {
                    out.push(flat(i, t.flat_amount_micros));
                }
                if usage <= upper {
                    break;
                }
                lower = upper;
                lower_units = t.up_to_units;
            }
        }
        ChargeModel::Volume { tiers } => {
            let mut lower_units = None;
            let mut matched = false;
            for (i, t) in tiers.iter().enumerate() {
                let upper = tier_bound_bytes(t, ub)?;
                if upper.is_none_or(|u| usage <= u) {
                    let range = range_text(lower_units, t.up_to_units);
                    let d = format!("tier {} ({range}) prices all usage", i + 1);
                    out.push(per_unit("volume", d, usage, t.unit_price_micros));
                    if t.flat_amount_micros > 0 {
                        out.push(flat(i, t.flat_amount_micros));
                    }
                    matched = true;
                    break;
                }
                lower_units = t.up_to_units;
            }
            if !matched {
                return Err(invalid("tiers", "the last tier must be open (no up_to)"));
            }
        }
        ChargeModel::Package { package_bytes, package_price_micros } => {
            let packages = usage.div_ceil((*package_bytes).max(1));
            let micros = packages
                .checked_mul(*package_price_micros)
                .ok_or(PricingError::Overflow("package amount"))?;
            out.push(Part {
                kind: "package",
                description: format!("{packages} started package(s) of {package_bytes} bytes"),
                quantity_bytes: usage,
                unit: "package".to_owned(),
                unit_bytes: *package_bytes,
                unit_price_micros: *package_price_micros,
                exact_num: u128::from(micros).checked_mul(u128::from(ub)).ok_or_else(ovf)?,
                money_rounding: "each started package charged in full",
            });
        }
    }
    Ok(out)
}

/// Prices `billable` bytes under `plan`'s model with Countersign's rounding (each line half up
/// to the micro): the lines, without flat fee, allowance and minimum.
pub fn model_lines(plan: &Plan, billable: u64) -> Result<Vec<ChargeLine>, PricingError> {
    let ub = plan.unit.bytes();
    model_parts(plan, billable, 0)?.into_iter().map(|p| p.line(ub, None)).collect()
}

/// How a Lago-semantics part line states its amount: the exact amount shown to the micro,
/// with the fee rounded once on the `rounding` line.
pub const LAGO_PART_ROUNDING: &str = "exact_shown_to_1_micro_fee_rounded_once";
/// How a Lago-semantics fee is rounded, as stated on its `rounding` line.
pub const LAGO_FEE_ROUNDING: &str = "half_up_to_currency_exponent_once_per_fee";
/// Largest currency exponent a plan may have: money is in micro-units.
pub const CURRENCY_EXPONENT_MAX: u32 = 6;
/// Fraction digits an exact amount is written with at most in a `rounding` line.
const EXACT_DIGITS_MAX: usize = 40;

/// `num / den` currency units written exactly (or to [`EXACT_DIGITS_MAX`] digits).
fn exact_decimal(num: u128, den: u128) -> String {
    let mut out = format!("{}", num / den);
    let mut rem = num % den;
    if rem != 0 {
        out.push('.');
    }
    for _ in 0..EXACT_DIGITS_MAX {
        if rem == 0 {
            break;
        }
        // rem < den ≤ 2^30 × 10^6, so ×10 cannot overflow.
        rem *= 10;
        out.push(char::from(b'0' + (rem / den) as u8));
        rem %= den;
    }
    out
}

/// The usage charge's lines for `usage` (rounded) bytes, and their sum in micro-units.
fn usage_lines(plan: &Plan, usage: u64) -> Result<(Vec<ChargeLine>, u64), PricingError> {
    let ub = plan.unit.bytes();
    let sum = |lines: &[ChargeLine]| {
        lines
            .iter()
            .try_fold(0i64, |a, l| a.checked_add(l.amount_micros))
            .and_then(|t| u64::try_from(t).ok())
            .ok_or(PricingError::Overflow("usage charge"))
    };
    let exponent = match plan.semantics {
        Semantics::Countersign => {
            let lines = model_lines(plan, usage.saturating_sub(plan.included_bytes))?;
            let total = sum(&lines)?;
            return Ok((lines, total));
        }
        Semantics::Lago { exponent } => exponent.min(CURRENCY_EXPONENT_MAX),
    };
    // Lago: package free units are deducted before packaging (package_service.rb); for
    // graduated and per-unit plans the allowance is a zero-priced start of the first range,
    // so tier bounds stay where the plan puts them; volume plans have none (refused when
    // the plan is read).
    let parts = match plan.model {
        ChargeModel::Package { .. } => {
            let free = usage.min(plan.included_bytes);
            let mut parts = model_parts(plan, usage - free, 0)?;
            if plan.included_bytes > 0 {
                let description =
                    format!("included: {} free bytes (Lago package free_units)", plan.included_bytes);
                parts.insert(
                    0,
                    Part {
                        kind: "included",
                        description,
                        quantity_bytes: free,
                        unit: plan.unit.name().to_owned(),
                        unit_bytes: ub,
                        unit_price_micros: 0,
                        exact_num: 0,
                        money_rounding: "none",
                    },
                );
            }
            parts
        }
        _ => model_parts(plan, usage, plan.included_bytes)?,
    };
    let ovf = || PricingError::Overflow("usage charge");
    let exact_num = parts.iter().try_fold(0u128, |a, p| a.checked_add(p.exact_num)).ok_or_else(ovf)?;
    let minor_micros = 10u64.pow(CURRENCY_EXPONENT_MAX - exponent);
    let den = u128::from(ub) * u128::from(minor_micros);
    let fee_micros = div_half_up(exact_num, den).checked_mul(u128::from(minor_micros)).ok_or_else(ovf)?;
    let mut lines =
        parts.into_iter().map(|p| p.line(ub, Some(LAGO_PART_ROUNDING))).collect::<Result<Vec<_>, _>>()?;
    let shown = lines.iter().try_fold(0i64, |a, l| a.checked_add(l.amount_micros)).ok_or_else(ovf)?;
    let fee = line_micros(fee_micros)?;
    let exact = exact_decimal(exact_num, u128::from(ub) * u128::from(MICROS_PER_UNIT));
    lines.push(ChargeLine {
        kind: "rounding",
        description: format!(
            "usage fee {exact} {cur} rounded once, half up, to {exponent} decimal(s): {}",
            format_micros(fee.into()),
            cur = plan.currency
        ),
        quantity_bytes: 0,
        unit: plan.currency.clone(),
        unit_bytes: 0,
        unit_price_micros: minor_micros,
        amount_micros: fee.checked_sub(shown).ok_or_else(ovf)?,
        money_rounding: LAGO_FEE_ROUNDING,
    });
    let total = sum(&lines)?;
    debug_assert_eq!(u128::from(total), fee_micros);
    Ok((lines, total))
}

/// Prices one billing period's usage items (of the SIMs sharing this plan) under `plan`.
pub fn rate(plan: &Plan, period: BillingPeriod, items: &[UsageItem]) -> Result<Charge, PricingError> {
    let in_period: Vec<UsageItem> =
        items.iter().filter(|i| i.date >= period.start && i.date < period.end).copied().collect();
    let rounding = apply_rounding(plan.rounding, &in_period)?;
    let billable = rounding.rounded_bytes.saturating_sub(plan.included_bytes);
    let mut lines = Vec::new();
    let lago = matches!(plan.semantics, Semantics::Lago { .. });
    // Under Lago semantics the allowance has its own `included` line where it applies.
    if plan.flat_fee_micros > 0 || (plan.included_bytes > 0 && !lago) {
        lines.push(ChargeLine {
            kind: "flat_fee",
            description: if lago {
                "flat fee (Lago: the plan's own amount, a fee of its own)".to_owned()
            } else {
                format!("flat fee, {} bytes included", plan.included_bytes)
            },
            quantity_bytes: if lago { 0 } else { rounding.rounded_bytes.min(plan.included_bytes) },
            unit: "period".to_owned(),
            unit_bytes: 0,
            unit_price_micros: plan.flat_fee_micros,
            amount_micros: line_micros(plan.flat_fee_micros.into())?,
            money_rounding: "none",
        });
    }
    let (usage, usage_micros) = usage_lines(plan, rounding.rounded_bytes)?;
    lines.extend(usage);
    if usage_micros < plan.minimum_micros {
        // Lago's true-up fee (fees/create_true_up_service.rb): the minimum less the charge's
        // (rounded) fee, so the usage charge is exactly the minimum.
        let true_up = plan.minimum_micros - usage_micros;
        lines.push(ChargeLine {
            kind: "minimum",
            description: format!(
                "minimum usage charge {}: usage charge {} raised by a true-up of {}",
                format_micros(plan.minimum_micros.into()),
                format_micros(usage_micros.into()),
                format_micros(true_up.into())
            ),
            quantity_bytes: 0,
            unit: "period".to_owned(),
            unit_bytes: 0,
            unit_price_micros: plan.minimum_micros,
            amount_micros: line_micros(true_up.into())?,
            money_rounding: "none",
        });
    }
    let total_micros = lines
        .iter()
        .try_fold(0i64, |a, l| a.checked_add(l.amount_micros))
        .and_then(|t| u64::try_from(t).ok())
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
