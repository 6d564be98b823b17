//! Billing as a service of the endpoint: [`Billing`] (a validated plan file) runs billing,
//! prices charges, shows wallets, books top-ups and forecasts lifetime quotas over the store;
//! the billing routes of `crate::api` expose it, `serve` runs it periodically. The decisions
//! are [`crate::billing`]'s, the persistence [`crate::store::billing`]'s, the answers
//! [`crate::wire::billing`]'s. Knows nothing of HTTP: a refusal is a [`BillingError`], which
//! the API maps to its status.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use time::Date;

use crate::billing::{
    charges, customer_faulty_sims, customer_period_charges, decide_run, decide_topup, items_by_assignment,
    run_write, topup_write, AlertRecord, BillingError, PeriodSelector, Refusal, RunDecision, Topup,
    TopupDecision, FORECAST_LIFETIME_YEARS_DEFAULT, FORECAST_WINDOW_DAYS_DEFAULT, WALLET_ALERTS_LISTED_MAX,
};
use crate::config::CloudConfig;
use crate::pricing::{
    check_name, forecast_quota, format_micros, LifetimeQuota, PricingConfig, PricingError, WalletAlert,
    PLAN_FILE_BYTES_MAX,
};
use crate::store::StoreBackend;
use crate::usage::{time_zone, zone_date, TimeZone};
use crate::wire::admin::ADMIN_FAULTS_PATH;
use crate::wire::billing::{
    alert_json, charge_json, run_json, ChargesReply, CustomerTotalJson, ForecastQuery, ForecastReply,
    PeriodDebitJson, PeriodJson, RunReply, TopupJson, TopupReply, TopupStatus, WalletJson, WalletRunJson,
    WalletsReply,
};
use crate::wire::usage::{underivable, UnderivableSim};

/// A validated plan file, ready to bill. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Billing {
    pricing: Arc<PricingConfig>,
    tz: TimeZone,
    plans_file: PathBuf,
    run_interval: Duration,
    /// One run at a time per process (the periodic one and those asked over HTTP); across
    /// processes the wallet locks keep runs apart.
    running: tokio::sync::Mutex<()>,
}

/// Reads and validates a plan file; errors name the file and the key.
pub fn load_plans(path: &Path) -> Result<PricingConfig, BillingError> {
    let err = |reason: String| BillingError::from(Refusal::PlansFile { path: path.to_owned(), reason });
    let len = std::fs::metadata(path).map_err(|e| err(format!("cannot be read: {e}")))?.len();
    if len > PLAN_FILE_BYTES_MAX as u64 {
        return Err(err(format!("{len} bytes, more than the {PLAN_FILE_BYTES_MAX} a plan file may have")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot be read: {e}")))?;
    PricingConfig::from_toml_str(&text).map_err(|e| err(e.to_string()))
}

impl Billing {
    /// Billing over validated plans, running every `run_interval` inside `serve`.
    pub fn new(
        pricing: PricingConfig,
        plans_file: PathBuf,
        run_interval: Duration,
    ) -> Result<Self, BillingError> {
        let tz = time_zone(&pricing.time_zone)?;
        Ok(Self { pricing: Arc::new(pricing), tz, plans_file, run_interval, running: Default::default() })
    }

    /// Reads the plan file `config` names (`[billing] plans_file`), if any.
    pub fn from_cloud_config(config: &CloudConfig) -> Result<Option<Self>, BillingError> {
        let Some(b) = config.billing() else { return Ok(None) };
        let pricing = load_plans(&b.plans_file)?;
        tracing::info!(
            plans_file = %b.plans_file.display(),
            plans = pricing.plans.len(),
            groups = pricing.assignments.len(),
            sims = pricing.assigned_sims(),
            wallets = pricing.wallets.len(),
            time_zone = %pricing.time_zone,
            "plans loaded"
        );
        Ok(Some(Self::new(pricing, b.plans_file.clone(), Duration::from_secs(b.run_interval_s))?))
    }

    /// The plans.
    pub fn pricing(&self) -> &PricingConfig {
        &self.pricing
    }

    /// The plan file the plans were read from.
    pub fn plans_file(&self) -> &Path {
        &self.plans_file
    }

    /// Seconds between periodic runs.
    pub fn run_interval(&self) -> Duration {
        self.run_interval
    }

    fn today(&self, now: jiff::Timestamp) -> Result<Date, BillingError> {
        zone_date(now, &self.tz).ok_or(Refusal::Overflow("today's date").into())
    }

    /// Prices every period up to today of every prepaid customer and debits each wallet by
    /// the difference to what was debited before (see [`crate::billing`]). One transaction
    /// per wallet under its lock; alerts are recorded and logged once.
    pub async fn run(&self, store: &StoreBackend, now: jiff::Timestamp) -> Result<RunReply, BillingError> {
        let _one_at_a_time = self.running.lock().await;
        let today = self.today(now)?;
        let (derived, usage_as_of_ms) = store.billing_daily_usage(&self.tz, None).await?;
        let (items, _) = items_by_assignment(&self.pricing, &derived.daily)?;
        let now_s = now.as_second();
        let mut wallets = Vec::with_capacity(self.pricing.wallets.len());
        for w in self.pricing.wallets.values() {
            let faulty = customer_faulty_sims(&self.pricing, &w.customer, &derived.faults);
            if !faulty.is_empty() {
                let iccids: Vec<String> = faulty.iter().map(|f| f.iccid.to_string()).collect();
                tracing::warn!(
                    customer = %w.customer,
                    sims = %iccids.join(","),
                    "wallet not billed: usage of some of its SIMs cannot be derived"
                );
                let reason = format!(
                    "not billed: usage of SIM(s) {} cannot be derived; see {}",
                    iccids.join(", "),
                    ADMIN_FAULTS_PATH
                );
                let json =
                    skipped_json(store, w, reason, faulty.into_iter().map(Into::into).collect()).await?;
                wallets.push(json);
                continue;
            }
            let (pricing, items) = (&self.pricing, &items);
            let outcome = store
                .with_wallet::<_, BillingError>(&w.customer, &w.currency, |book| {
                    let balance = book.balance_micros(w)?;
                    if book.usage_as_of_ms.is_some_and(|t| t > usage_as_of_ms) {
                        // A run that read fresher usage billed this wallet already.
                        return Ok((None, RunOutcome::Skipped { balance_micros: balance }));
                    }
                    let charges = customer_period_charges(pricing, items, &w.customer, today, book)?;
                    let d = decide_run(w, book, &charges)?;
                    if d.changes.is_empty() && d.alerts.is_empty() && d.active_after == book.active {
                        return Ok((None, RunOutcome::Decided(d, Vec::new())));
                    }
                    let write = run_write(book, &d, usage_as_of_ms, now_s)?;
                    let alerts = write.alerts.clone();
                    Ok((Some(write), RunOutcome::Decided(d, alerts)))
                })
                .await;
            let outcome = match outcome {
                Ok(o) => o,
                // The store is down: every wallet would fail the same way.
                Err(e) if e.is_recoverable() => return Err(e),
                // This wallet's own data or plan: it alone is not billed, the others are.
                Err(e) => {
                    tracing::error!(customer = %w.customer, error = %e, "wallet not billed");
                    wallets.push(skipped_json(store, w, format!("not billed: {e}"), Vec::new()).await?);
                    continue;
                }
            };
            let json = match outcome {
                RunOutcome::Skipped { balance_micros } => {
                    tracing::info!(customer = %w.customer, "wallet billed by a fresher run already");
                    WalletRunJson {
                        customer: w.customer.clone(),
                        currency: w.currency.clone(),
                        skipped: true,
                        skipped_reason: Some("billed by a run that read fresher usage".into()),
                        underivable: Vec::new(),
                        balance_before_micros: balance_micros,
                        balance_after_micros: balance_micros,
                        balance_after: format_micros(balance_micros.into()),
                        debited_micros: 0,
                        changes: Vec::new(),
                        alerts: Vec::new(),
                    }
                }
                RunOutcome::Decided(d, alerts) => {
                    let debited_micros = d.debited_micros()?;
                    for a in &alerts {
                        log_alert(&w.customer, a);
                    }
                    if !d.changes.is_empty() {
                        tracing::info!(
                            customer = %w.customer,
                            periods = d.changes.len(),
                            debited_micros,
                            balance_micros = d.balance_after_micros,
                            "wallet debited"
                        );
                    }
                    run_json(&w.customer, &w.currency, &d, debited_micros, &alerts)
                }
            };
            wallets.push(json);
        }
        Ok(RunReply { as_of: today, usage_as_of_ms, wallets, underivable: underivable(&derived) })
    }

    /// Runs billing at once and then every [`Billing::run_interval`] until `stop` completes.
    /// A failed run is logged and retried at the next tick (a wallet is never debited twice,
    /// so retrying is always safe).
    pub async fn run_periodically(
        self: Arc<Self>,
        store: StoreBackend,
        stop: impl std::future::Future<Output = ()> + Send,
    ) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(self.run_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut stop => break,
                _ = tick.tick() => {}
            }
            match self.run(&store, jiff::Timestamp::now()).await {
                Ok(r) => tracing::debug!(wallets = r.wallets.len(), "billing run"),
                Err(e) => tracing::error!(error = %e, recoverable = e.is_recoverable(), "billing run failed"),
            }
        }
        tracing::info!("periodic billing stopped");
    }

    /// The charges of one period per group (all groups, or of one customer and/or group).
    pub async fn charges(
        &self,
        store: &StoreBackend,
        selector: Option<PeriodSelector>,
        customer: Option<&str>,
        group: Option<&str>,
        now: jiff::Timestamp,
    ) -> Result<ChargesReply, BillingError> {
        if let Some(c) = customer {
            if !self.pricing.assignments.iter().any(|a| a.customer == c) {
                return Err(Refusal::UnknownCustomer(c.to_owned()).into());
            }
        }
        let today = self.today(now)?;
        let selector = selector.unwrap_or(PeriodSelector::Containing(today));
        let (derived, _) = store.billing_daily_usage(&self.tz, None).await?;
        let (items, unassigned_sims) = items_by_assignment(&self.pricing, &derived.daily)?;
        let list = charges(&self.pricing, &items, selector, customer, group)?;
        let mut totals: Vec<CustomerTotalJson> = Vec::new();
        for c in &list {
            let t =
                match totals.iter_mut().find(|t| t.customer == c.customer && t.currency == c.charge.currency)
                {
                    Some(t) => t,
                    None => {
                        totals.push(CustomerTotalJson {
                            customer: c.customer.clone(),
                            currency: c.charge.currency.clone(),
                            total_micros: 0,
                            total: String::new(),
                        });
                        totals.last_mut().ok_or(Refusal::Overflow("totals"))?
                    }
                };
            t.total_micros = t
                .total_micros
                .checked_add(c.charge.total_micros)
                .ok_or(Refusal::Overflow("customer total"))?;
        }
        for t in &mut totals {
            t.total = format_micros(t.total_micros.into());
        }
        let (period, from, to) = match selector {
            PeriodSelector::Containing(d) => (Some(d), None, None),
            PeriodSelector::Range { from, to } => (None, Some(from), Some(to)),
        };
        Ok(ChargesReply {
            time_zone: self.pricing.time_zone.clone(),
            period,
            from,
            to,
            unassigned_sims,
            charges: list.iter().map(|c| charge_json(c, today)).collect(),
            totals,
            underivable: underivable(&derived),
        })
    }

    /// Every wallet (or one customer's): balance, debits per period, top-ups, recent alerts.
    pub async fn wallets(
        &self,
        store: &StoreBackend,
        customer: Option<&str>,
    ) -> Result<WalletsReply, BillingError> {
        if let Some(c) = customer {
            if !self.pricing.wallets.contains_key(c) {
                return Err(Refusal::NoWallet(c.to_owned()).into());
            }
        }
        let mut out = Vec::new();
        for w in self.pricing.wallets.values().filter(|w| customer.is_none_or(|c| c == w.customer)) {
            let book = store.wallet_book(&w.customer).await?;
            let alerts = store.wallet_alerts(&w.customer, WALLET_ALERTS_LISTED_MAX).await?;
            let balance_micros = book.balance_micros(w)?;
            let wallet = w.wallet(balance_micros);
            out.push(WalletJson {
                customer: w.customer.clone(),
                currency: w.currency.clone(),
                opening_credit_micros: w.opening_micros,
                topups_micros: book.topups_micros()?,
                debited_micros: book.debited_micros()?,
                balance_micros,
                balance: format_micros(balance_micros.into()),
                alert_thresholds_micros: w.thresholds_micros.clone(),
                overdraft_limit_micros: w.overdraft_limit_micros,
                overdrawn: wallet.overdrawn(),
                overdraft_limit_exceeded: wallet.limit_exceeded(),
                active_alerts: book.active.iter().map(|c| c.key()).collect(),
                usage_as_of_ms: book.usage_as_of_ms,
                debits: book
                    .debits
                    .values()
                    .map(|d| PeriodDebitJson {
                        group: d.group.clone(),
                        plan_id: d.plan_id.clone(),
                        period: PeriodJson { start: d.period.start, end: d.period.end },
                        debited_micros: d.debited_micros,
                        debited: format_micros(d.debited_micros.into()),
                        debits: d.debits,
                        updated_at_s: d.updated_at_s,
                    })
                    .collect(),
                topups: book
                    .topups
                    .iter()
                    .map(|(id, t)| TopupJson {
                        topup_id: id.clone(),
                        amount_micros: t.amount_micros,
                        booked_at_s: t.at_s,
                    })
                    .collect(),
                alerts: alerts.iter().map(alert_json).collect(),
            });
        }
        Ok(WalletsReply { wallets: out })
    }

    /// Books a top-up under the caller's id; the same id and amount again changes nothing.
    pub async fn top_up(
        &self,
        store: &StoreBackend,
        customer: &str,
        topup_id: &str,
        amount_micros: i64,
        now: jiff::Timestamp,
    ) -> Result<TopupReply, BillingError> {
        check_name("topup_id", topup_id).map_err(|e| Refusal::BadRequest(e.to_string()))?;
        let w = self.pricing.wallets.get(customer).ok_or_else(|| Refusal::NoWallet(customer.to_owned()))?;
        let at_s = now.as_second();
        let (status, balance_micros) = store
            .with_wallet::<_, BillingError>(customer, &w.currency, |book| {
                match decide_topup(w, book, topup_id, amount_micros)? {
                    TopupDecision::Book { balance_after_micros, active_after } => {
                        let write = topup_write(book, topup_id, Topup { amount_micros, at_s }, active_after);
                        Ok((Some(write), (TopupStatus::Booked, balance_after_micros)))
                    }
                    TopupDecision::AlreadyBooked { balance_micros } => {
                        Ok((None, (TopupStatus::AlreadyBooked, balance_micros)))
                    }
                }
            })
            .await?;
        tracing::info!(customer, topup_id, amount_micros, status = ?status, balance_micros, "wallet top-up");
        Ok(TopupReply {
            customer: customer.to_owned(),
            topup_id: topup_id.to_owned(),
            status,
            amount_micros,
            balance_micros,
            balance: format_micros(balance_micros.into()),
        })
    }
}

enum RunOutcome {
    Skipped { balance_micros: i64 },
    Decided(RunDecision, Vec<AlertRecord>),
}

fn log_alert(customer: &str, a: &AlertRecord) {
    let threshold_micros = match a.alert {
        WalletAlert::ThresholdCrossed { threshold_micros, .. } => Some(threshold_micros),
        _ => None,
    };
    tracing::warn!(
        customer,
        alert = a.alert.kind(),
        seq = a.seq,
        threshold_micros,
        balance_micros = a.alert.balance_micros(),
        "wallet alert"
    );
}
/// When the SIM's lifetime quota runs out at its recent rate ([`forecast_quota`]). Works
/// without plans when the quota is given (days are then UTC).
pub async fn forecast(
    billing: Option<&Billing>,
    store: &StoreBackend,
    q: ForecastQuery,
    now: jiff::Timestamp,
) -> Result<ForecastReply, BillingError> {
    let utc = TimeZone::UTC;
    let (tz, tz_name) = match billing {
        Some(b) => (&b.tz, b.pricing.time_zone.clone()),
        None => (&utc, "UTC".to_owned()),
    };
    let assignment = billing.and_then(|b| b.pricing.assignment_of(q.iccid).ok());
    let plan = billing.zip(assignment).and_then(|(b, a)| b.pricing.plans.get(&a.plan));
    let lifetime = plan.and_then(|p| p.lifetime);
    let (quota_bytes, quota_source) = match (q.quota_bytes, lifetime) {
        (Some(q), _) => (q, "parameter"),
        (None, Some(l)) => (l.quota_bytes, "plan"),
        (None, None) => {
            return Err(Refusal::BadRequest(format!(
                "quota_bytes: required, iccid {} has no plan with lifetime_quota_bytes",
                q.iccid
            ))
            .into())
        }
    };
    let (derived, _) = store.billing_daily_usage(tz, Some(q.iccid)).await?;
    if let Some(f) = derived.fault_of(q.iccid) {
        return Err(Refusal::Underivable(*f).into());
    }
    let mut days = Vec::with_capacity(derived.daily.len());
    for ((_, date), t) in &derived.daily {
        days.push((*date, t.sum().ok_or(Refusal::Overflow("daily usage"))?));
    }
    let since =
        q.since.or(assignment.and_then(|a| a.active_since)).or(days.first().map(|(d, _)| *d)).ok_or_else(
            || {
                Refusal::BadRequest(format!(
                    "since: required, iccid {} has no usage and no active_since",
                    q.iccid
                ))
            },
        )?;
    let years = lifetime.map_or(FORECAST_LIFETIME_YEARS_DEFAULT, |l| l.years);
    let expires = match q.expires {
        Some(e) => e,
        None => {
            LifetimeQuota { quota_bytes, years }.last_day(since).ok_or(Refusal::Overflow("lifetime end"))?
        }
    };
    let as_of = match q.as_of {
        Some(d) => d,
        None => zone_date(now, tz).ok_or(Refusal::Overflow("today's date"))?,
    };
    let window = q.window_days.unwrap_or(FORECAST_WINDOW_DAYS_DEFAULT);
    let f = forecast_quota(quota_bytes, since, expires, as_of, window, &days).map_err(|e| match e {
        PricingError::Forecast(m) => Refusal::BadRequest(m.to_owned()),
        other => other.into(),
    })?;
    Ok(ForecastReply {
        iccid: q.iccid,
        time_zone: tz_name,
        plan_id: plan.map(|p| p.id.clone()),
        quota_source: quota_source.to_owned(),
        quota_bytes: f.quota_bytes,
        since,
        as_of,
        used_bytes: f.used_bytes,
        remaining_bytes: f.remaining_bytes,
        window_days: f.window_days,
        window_bytes: f.window_bytes,
        exhausted_on: f.exhausted_on,
        expires_on: f.expires_on,
        runs_out_before_expiry: f.runs_out_before_expiry,
        sustainable_bytes_per_day: f.sustainable_bytes_per_day,
    })
}

/// The answer for a wallet a run left alone, with its balance as it stands.
async fn skipped_json(
    store: &StoreBackend,
    w: &crate::pricing::WalletConfig,
    reason: String,
    underivable: Vec<UnderivableSim>,
) -> Result<WalletRunJson, BillingError> {
    let balance = match store.wallet_book(&w.customer).await.map_err(BillingError::from) {
        Ok(book) => book.balance_micros(w).map_err(BillingError::from),
        Err(e) => Err(e),
    };
    let balance = match balance {
        Ok(b) => b,
        Err(e) if e.is_recoverable() => return Err(e),
        // The wallet's own book is unreadable: say so, and bill the others.
        Err(e) => {
            tracing::error!(customer = %w.customer, error = %e, "wallet book unreadable");
            0
        }
    };
    Ok(WalletRunJson {
        customer: w.customer.clone(),
        currency: w.currency.clone(),
        skipped: true,
        skipped_reason: Some(reason),
        balance_before_micros: balance,
        balance_after_micros: balance,
        balance_after: format_micros(balance.into()),
        debited_micros: 0,
        changes: Vec::new(),
        alerts: Vec::new(),
        underivable,
    })
}
