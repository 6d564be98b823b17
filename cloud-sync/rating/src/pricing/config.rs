//! The plan file: TOML → validated [`PricingConfig`] (plans, assignments, wallets); every
//! error names its key.

#[allow(unused_imports)]
use super::*;

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
    semantics: Option<String>,
    minimum_charge: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    up_to: Option<u64>,
    price: String,
    flat_amount: Option<String>,
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
        out.push(Tier {
            up_to_units: t.up_to,
            unit_price_micros: money_at(format!("{k}.price"), &t.price)?,
            flat_amount_micros: t
                .flat_amount
                .as_deref()
                .map(|f| money_at(format!("{k}.flat_amount"), f))
                .transpose()?
                .unwrap_or(0),
        });
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
    let flat_fee_micros =
        r.flat_fee.as_deref().map(|f| money_at(format!("{key}.flat_fee"), f)).transpose()?.unwrap_or(0);
    let minimum_micros = r
        .minimum_charge
        .as_deref()
        .map(|f| money_at(format!("{key}.minimum_charge"), f))
        .transpose()?
        .unwrap_or(0);
    let included_bytes = r.included_bytes.unwrap_or(0);
    let semantics = match r.semantics.as_deref().unwrap_or("countersign") {
        "countersign" => Semantics::Countersign,
        "lago" => {
            let exponent = lago_checks(&key, &r.currency, unit, &model, included_bytes)?;
            let minor_micros = 10u64.pow(CURRENCY_EXPONENT_MAX - exponent);
            for (name, micros) in [("flat_fee", flat_fee_micros), ("minimum_charge", minimum_micros)] {
                if micros % minor_micros != 0 {
                    return Err(invalid(
                        format!("{key}.{name}"),
                        format!(
                            "Lago keeps it in whole minor units of {} ({} {0}): {} is not a multiple",
                            r.currency,
                            format_micros(minor_micros.into()),
                            format_micros(micros.into())
                        ),
                    ));
                }
            }
            Semantics::Lago { exponent }
        }
        other => {
            return Err(invalid(format!("{key}.semantics"), format!("'{other}' is not countersign or lago")))
        }
    };
    Ok(Plan {
        lifetime,
        id: r.id,
        currency: r.currency,
        unit,
        model,
        semantics,
        minimum_micros,
        flat_fee_micros,
        included_bytes,
        rounding: Rounding {
            increment_bytes: increment,
            scope: r.rounding_scope.unwrap_or(RoundingScope::SimDay),
        },
        cycle,
    })
}

/// Checks what a plan under Lago semantics needs so that Lago can hold the same plan; returns
/// the currency's exponent. Lago's graduated, volume and standard charges have no free units
/// (getlago/lago-api at 1b1c24a6a6c321d7900b05906bf1b20f706c97c2,
/// app/services/charge_models/), so the allowance is a zero-priced start of the first range,
/// which a volume charge cannot express (one range prices all units). The metric is the
/// exporter's `bytes`, so package sizes and free units are whole bytes as Lago requires.
fn lago_checks(
    key: &str,
    currency: &str,
    unit: Unit,
    model: &ChargeModel,
    included: u64,
) -> Result<u32, PricingError> {
    let exponent = lago_currency_exponent(currency).ok_or_else(|| {
        let why = if LAGO_CURRENCIES_DISAGREEING.contains(&currency) {
            "Lago rounds it to another exponent than ISO 4217, so no charge can match both"
        } else {
            "not a currency Lago accepts"
        };
        invalid(format!("{key}.currency"), format!("'{currency}' under semantics = \"lago\": {why}"))
    })?;
    match model {
        ChargeModel::Volume { .. } if included > 0 => Err(invalid(
            format!("{key}.included_bytes"),
            "Lago's volume charges have no free units: use a graduated plan or no allowance",
        )),
        ChargeModel::Graduated { tiers } => {
            let first = tiers.first().map(|t| tier_bound_bytes(t, unit.bytes())).transpose()?.flatten();
            match first {
                Some(bound) if included > bound => Err(invalid(
                    format!("{key}.included_bytes"),
                    format!("under Lago semantics the allowance is the start of the first tier: at most {bound} bytes"),
                )),
                _ => Ok(exponent),
            }
        }
        _ => Ok(exponent),
    }
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
                    crate::text::parse_date(s).ok_or_else(|| {
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
                let iccid = crate::text::iccid_from_text(s)
                    .map_err(|e| invalid(format!("{key}.iccids[{j}]"), e.to_string()))?;
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
