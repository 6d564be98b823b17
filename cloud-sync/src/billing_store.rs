//! Billing state in the store, on both backends: wallets (alert state), the amount debited
//! per (customer, group, period), top-ups, recorded alerts. Also usage in the billing zone on
//! both backends. The decisions are [`crate::billing`]'s; this module only reads a wallet's
//! book under its lock and writes what was decided, atomically.
//!
//! # Locking
//!
//! [`StoreBackend::with_wallet`] runs a decision under the wallet's lock and stores its
//! outcome in the same atomic step:
//!
//! - **PostgreSQL**: one transaction per wallet. The wallet row is created if absent
//!   (`INSERT … ON CONFLICT DO NOTHING`) and locked with `SELECT … FOR UPDATE`; the book is
//!   read, the decision made, its rows written, and the transaction committed. Two endpoint
//!   processes billing one wallet at once queue on the row lock: the second reads the book
//!   the first committed, so it debits only what is still missing (usually nothing). A top-up
//!   takes the same lock.
//! - **sled**: one process owns the store; a process-wide async mutex serialises every
//!   wallet change, and the rows of one change are one multi-tree sled transaction, flushed
//!   before the call returns.
//!
//! Debits are stored as the absolute amount debited per period (not as deltas), so a
//! replayed write cannot make a period count twice.
//!
//! # Schema
//!
//! PostgreSQL (migration 4, [`crate::postgres::PG_BILLING_MIGRATION_SQL`]): every table's key starts with
//! `customer`, and one transaction only touches one customer's rows. On Citus, distribute all
//! four by `customer`, co-located, so each wallet transaction is a single-shard one (the
//! statements are in [`crate::postgres::CITUS_DISTRIBUTION_SQL`]).
//!
//! sled trees (keys big-endian; `c` is the customer as one length byte then its bytes):
//!
//! | tree              | key                                   | value (version 1, postcard)       |
//! | ----------------- | ------------------------------------- | --------------------------------- |
//! | `billing_wallets` | customer                              | currency, active alert conditions, alert count, usage as-of |
//! | `billing_debits`  | `c` ‖ group (length byte) ‖ period start (julian day, sign flipped) | plan, period end, debited micros, debits, updated |
//! | `billing_topups`  | `c` ‖ top-up id                       | amount micros, booked at          |
//! | `billing_alerts`  | `c` ‖ seq u64                         | kind, threshold, balance, limit, raised at |

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use time::Date;

use crate::backend::StoreBackend;
use crate::billing::{AlertRecord, BillingError, BookedDebit, Refusal, Topup, WalletBook, WalletWrite};
use crate::postgres::{billing_db_error, billing_pool_error, PgStore};
use crate::pricing::{AlertCondition, BillingPeriod, WalletAlert};
use crate::store::{blocking, Store, StoreError};
use crate::usage::{derive_daily_in, Derived, TimeZone};

const WALLETS_TREE: &str = "billing_wallets";
const DEBITS_TREE: &str = "billing_debits";
const TOPUPS_TREE: &str = "billing_topups";
const ALERTS_TREE: &str = "billing_alerts";
const VALUE_VERSION: u8 = 1;

/// Serialises wallet changes on the embedded store. One process owns a sled store, so a
/// process-wide lock is the wallet lock (several sled stores in one process, as in tests,
/// only wait for each other).
static SLED_WALLET_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Why a wallet's currency can no longer be used: it was created in another one.
fn currency_changed(customer: &str, stored: &str, configured: &str) -> BillingError {
    Refusal::BadRequest(format!(
        "customer '{customer}': the wallet was opened in {stored}; the plans now say {configured}"
    ))
    .into()
}

fn now_ms() -> i64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    i64::try_from(ms).unwrap_or(i64::MAX)
}

impl StoreBackend {
    /// Bytes per (ICCID, day in `tz`) over every stored record (with `iccid`: at least that
    /// SIM's days are exact), and when the records were read (Unix ms; on PostgreSQL the
    /// database's clock at the snapshot).
    pub async fn billing_daily_usage(
        &self,
        tz: &TimeZone,
        iccid: Option<u64>,
    ) -> Result<(Derived, i64), StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                let tz = tz.clone();
                blocking(move || {
                    let as_of = now_ms();
                    let mut failure = None;
                    let records = s.usage_records().map_while(|r| match r {
                        Ok(r) => Some(r),
                        Err(e) => {
                            failure = Some(e);
                            None
                        }
                    });
                    let mut daily = derive_daily_in(records, &tz);
                    if let Some(e) = failure {
                        return Err(e);
                    }
                    if let (Ok(d), Some(sim)) = (daily.as_mut(), iccid) {
                        d.retain_sim(sim);
                    }
                    Ok((daily?, as_of))
                })
                .await
            }
            Self::Postgres(p) => pg_daily_usage(p, tz, iccid).await,
        }
    }

    /// A wallet's book, read without taking its lock (for queries).
    pub async fn wallet_book(&self, customer: &str) -> Result<WalletBook, StoreError> {
        match self {
            Self::Sled(s) => {
                let _guard = SLED_WALLET_LOCK.lock().await;
                let s = s.clone();
                let c = customer.to_owned();
                blocking(move || Ok(SledBilling::open(&s)?.book(&c)?.map(|(_, b)| b).unwrap_or_default()))
                    .await
            }
            Self::Postgres(p) => {
                let mut client = p.billing_pool().get().await.map_err(billing_pool_error)?;
                let tx = crate::postgres::read_snapshot(&mut client).await?;
                let book = pg_book(&tx, customer, false).await?.map(|(_, b)| b).unwrap_or_default();
                tx.commit().await.map_err(billing_db_error)?;
                Ok(book)
            }
        }
    }

    /// The newest `limit` alerts of a wallet, oldest first.
    pub async fn wallet_alerts(&self, customer: &str, limit: usize) -> Result<Vec<AlertRecord>, StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                let c = customer.to_owned();
                blocking(move || SledBilling::open(&s)?.alerts(&c, limit)).await
            }
            Self::Postgres(p) => {
                let client = p.billing_pool().get().await.map_err(billing_pool_error)?;
                let limit = i64::try_from(limit).unwrap_or(i64::MAX);
                let rows = client
                    .query(
                        "SELECT seq, kind, threshold_micros, balance_micros, overdraft_limit_micros, raised_at_s
                         FROM billing_alerts WHERE customer = $1 ORDER BY seq DESC LIMIT $2",
                        &[&customer, &limit],
                    )
                    .await
                    .map_err(billing_db_error)?;
                let mut out = rows
                    .iter()
                    .map(|r| {
                        let g = |e| billing_db_error(e);
                        let seq: i64 = r.try_get(0).map_err(g)?;
                        let v = AlertValue {
                            kind: r.try_get(1).map_err(g)?,
                            threshold_micros: r.try_get(2).map_err(g)?,
                            balance_micros: r.try_get(3).map_err(g)?,
                            overdraft_limit_micros: r.try_get(4).map_err(g)?,
                            raised_at_s: r.try_get(5).map_err(g)?,
                        };
                        v.record(u64::try_from(seq).map_err(|_| corrupt("alert seq"))?)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                out.reverse();
                Ok(out)
            }
        }
    }

    /// Runs `decide` on the wallet's book under the wallet's lock and stores the write it
    /// returns (if any) atomically before the lock is released; returns what `decide` returned
    /// beside the write. The wallet is created (in `currency`) on first use; a wallet opened
    /// in another currency is refused.
    pub async fn with_wallet<T: Send>(
        &self,
        customer: &str,
        currency: &str,
        decide: impl FnOnce(&WalletBook) -> Result<(Option<WalletWrite>, T), BillingError> + Send,
    ) -> Result<T, BillingError> {
        match self {
            Self::Sled(s) => {
                let _guard = SLED_WALLET_LOCK.lock().await;
                let store = s.clone();
                let c = customer.to_owned();
                let (stored_currency, book) = blocking(move || -> Result<_, StoreError> {
                    Ok(SledBilling::open(&store)?
                        .book(&c)?
                        .map(|(cur, b)| (Some(cur), b))
                        .unwrap_or((None, WalletBook::default())))
                })
                .await?;
                if let Some(stored) = stored_currency.as_deref().filter(|s| *s != currency) {
                    return Err(currency_changed(customer, stored, currency));
                }
                let (write, out) = decide(&book)?;
                if let Some(write) = write {
                    let store = s.clone();
                    let (c, cur) = (customer.to_owned(), currency.to_owned());
                    blocking(move || -> Result<_, StoreError> {
                        SledBilling::open(&store)?.write(&c, &cur, &write)
                    })
                    .await?;
                }
                Ok(out)
            }
            Self::Postgres(p) => pg_with_wallet(p, customer, currency, decide).await,
        }
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("billing: {what} does not decode"))
}

// ---------------------------------------------------------------------------------------------
// sled

#[derive(Serialize, Deserialize)]
struct WalletValue {
    currency: String,
    active: Vec<String>,
    alert_seq: u64,
    usage_as_of_ms: Option<i64>,
}

#[derive(Serialize, Deserialize)]
struct DebitValue {
    plan_id: String,
    period_end_julian: i32,
    debited_micros: i64,
    debits: u32,
    updated_at_s: i64,
}

#[derive(Serialize, Deserialize)]
struct TopupValue {
    amount_micros: i64,
    at_s: i64,
}

#[derive(Serialize, Deserialize)]
struct AlertValue {
    kind: String,
    threshold_micros: Option<i64>,
    balance_micros: i64,
    overdraft_limit_micros: Option<i64>,
    raised_at_s: i64,
}

impl AlertValue {
    fn of(a: &AlertRecord) -> Self {
        let (threshold_micros, overdraft_limit_micros) = match &a.alert {
            WalletAlert::ThresholdCrossed { threshold_micros, .. } => (Some(*threshold_micros), None),
            WalletAlert::Overdrawn { .. } => (None, None),
            WalletAlert::OverdraftLimitExceeded { overdraft_limit_micros, .. } => {
                (None, Some(*overdraft_limit_micros))
            }
        };
        Self {
            kind: a.alert.kind().to_owned(),
            threshold_micros,
            balance_micros: a.alert.balance_micros(),
            overdraft_limit_micros,
            raised_at_s: a.raised_at_s,
        }
    }

    fn record(self, seq: u64) -> Result<AlertRecord, StoreError> {
        let balance_micros = self.balance_micros;
        let alert = match (self.kind.as_str(), self.threshold_micros, self.overdraft_limit_micros) {
            ("threshold_crossed", Some(threshold_micros), _) => {
                WalletAlert::ThresholdCrossed { threshold_micros, balance_micros }
            }
            ("overdrawn", _, _) => WalletAlert::Overdrawn { balance_micros },
            ("overdraft_limit_exceeded", _, Some(overdraft_limit_micros)) => {
                WalletAlert::OverdraftLimitExceeded { balance_micros, overdraft_limit_micros }
            }
            _ => return Err(corrupt("alert")),
        };
        Ok(AlertRecord { seq, alert, raised_at_s: self.raised_at_s })
    }
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![VALUE_VERSION];
    out.extend(postcard::to_stdvec(v).map_err(|e| StoreError::Corrupt(format!("billing value: {e}")))?);
    Ok(out)
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&VALUE_VERSION, rest)) => postcard::from_bytes(rest).map_err(|_| corrupt(what)),
        _ => Err(corrupt(what)),
    }
}

fn active_keys(active: &BTreeSet<AlertCondition>) -> Vec<String> {
    active.iter().map(|c| c.key()).collect()
}

fn parse_active(keys: &[String]) -> Result<BTreeSet<AlertCondition>, StoreError> {
    keys.iter().map(|k| AlertCondition::from_key(k).ok_or_else(|| corrupt("alert condition"))).collect()
}

/// `len ‖ bytes` of a name (names are at most 64 bytes, checked by the plan file).
fn push_name(key: &mut Vec<u8>, name: &str) -> Result<(), StoreError> {
    let len =
        u8::try_from(name.len()).map_err(|_| StoreError::Corrupt(format!("name of {} bytes", name.len())))?;
    key.push(len);
    key.extend_from_slice(name.as_bytes());
    Ok(())
}

fn customer_prefix(customer: &str) -> Result<Vec<u8>, StoreError> {
    let mut k = Vec::with_capacity(customer.len() + 1);
    push_name(&mut k, customer)?;
    Ok(k)
}

fn julian_bytes(d: Date) -> [u8; 4] {
    // Flipping the sign bit keeps byte order equal to date order for negative julian days.
    ((d.to_julian_day() as u32) ^ 0x8000_0000).to_be_bytes()
}

fn debit_key(customer: &str, group: &str, start: Date) -> Result<Vec<u8>, StoreError> {
    let mut k = customer_prefix(customer)?;
    push_name(&mut k, group)?;
    k.extend_from_slice(&julian_bytes(start));
    Ok(k)
}

/// Splits `len ‖ name ‖ rest` into (name, rest).
fn take_name(k: &[u8]) -> Option<(String, &[u8])> {
    let (len, rest) = k.split_first()?;
    let len = usize::from(*len);
    let name = std::str::from_utf8(rest.get(..len)?).ok()?.to_owned();
    Some((name, rest.get(len..)?))
}

fn date_of_julian(j: i32) -> Result<Date, StoreError> {
    Date::from_julian_day(j).map_err(|_| corrupt("date"))
}

struct SledBilling {
    db: sled::Db,
    wallets: sled::Tree,
    debits: sled::Tree,
    topups: sled::Tree,
    alerts: sled::Tree,
}

impl SledBilling {
    fn open(store: &Store) -> Result<Self, StoreError> {
        let db = store.db().clone();
        Ok(Self {
            wallets: db.open_tree(WALLETS_TREE)?,
            debits: db.open_tree(DEBITS_TREE)?,
            topups: db.open_tree(TOPUPS_TREE)?,
            alerts: db.open_tree(ALERTS_TREE)?,
            db,
        })
    }

    /// The wallet's currency and book, `None` before its first use.
    fn book(&self, customer: &str) -> Result<Option<(String, WalletBook)>, StoreError> {
        let Some(v) = self.wallets.get(customer.as_bytes())? else { return Ok(None) };
        let w: WalletValue = decode(&v, "wallet")?;
        let mut book = WalletBook {
            active: parse_active(&w.active)?,
            alert_seq: w.alert_seq,
            usage_as_of_ms: w.usage_as_of_ms,
            ..WalletBook::default()
        };
        let prefix = customer_prefix(customer)?;
        for item in self.debits.scan_prefix(&prefix) {
            let (k, v) = item?;
            let rest = k.get(prefix.len()..).ok_or_else(|| corrupt("debit key"))?;
            let (group, rest) = take_name(rest).ok_or_else(|| corrupt("debit key"))?;
            let start: [u8; 4] = rest.try_into().map_err(|_| corrupt("debit key"))?;
            let start = date_of_julian((u32::from_be_bytes(start) ^ 0x8000_0000) as i32)?;
            let d: DebitValue = decode(&v, "debit")?;
            let period = BillingPeriod { start, end: date_of_julian(d.period_end_julian)? };
            book.debits.insert(
                (group.clone(), start),
                BookedDebit {
                    group,
                    plan_id: d.plan_id,
                    period,
                    debited_micros: d.debited_micros,
                    debits: d.debits,
                    updated_at_s: d.updated_at_s,
                },
            );
        }
        for item in self.topups.scan_prefix(&prefix) {
            let (k, v) = item?;
            let id = k
                .get(prefix.len()..)
                .and_then(|b| std::str::from_utf8(b).ok())
                .ok_or_else(|| corrupt("top-up key"))?;
            let t: TopupValue = decode(&v, "top-up")?;
            book.topups.insert(id.to_owned(), Topup { amount_micros: t.amount_micros, at_s: t.at_s });
        }
        Ok(Some((w.currency, book)))
    }

    fn alerts(&self, customer: &str, limit: usize) -> Result<Vec<AlertRecord>, StoreError> {
        let prefix = customer_prefix(customer)?;
        let mut out = Vec::new();
        for item in self.alerts.scan_prefix(&prefix).rev().take(limit) {
            let (k, v) = item?;
            let seq: [u8; 8] =
                k.get(prefix.len()..).and_then(|b| b.try_into().ok()).ok_or_else(|| corrupt("alert key"))?;
            out.push(decode::<AlertValue>(&v, "alert")?.record(u64::from_be_bytes(seq))?);
        }
        out.reverse();
        Ok(out)
    }

    /// Stores one wallet's write in one sled transaction and flushes.
    fn write(&self, customer: &str, currency: &str, w: &WalletWrite) -> Result<(), StoreError> {
        use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
        let wallet = encode(&WalletValue {
            currency: currency.to_owned(),
            active: active_keys(&w.active),
            alert_seq: w.alert_seq,
            usage_as_of_ms: w.usage_as_of_ms,
        })?;
        let mut debits = Vec::with_capacity(w.debits.len());
        for d in &w.debits {
            debits.push((
                debit_key(customer, &d.group, d.period.start)?,
                encode(&DebitValue {
                    plan_id: d.plan_id.clone(),
                    period_end_julian: d.period.end.to_julian_day(),
                    debited_micros: d.debited_micros,
                    debits: d.debits,
                    updated_at_s: d.updated_at_s,
                })?,
            ));
        }
        let topup = match &w.topup {
            Some((id, t)) => {
                let mut k = customer_prefix(customer)?;
                k.extend_from_slice(id.as_bytes());
                Some((k, encode(&TopupValue { amount_micros: t.amount_micros, at_s: t.at_s })?))
            }
            None => None,
        };
        let mut alerts = Vec::with_capacity(w.alerts.len());
        for a in &w.alerts {
            let mut k = customer_prefix(customer)?;
            k.extend_from_slice(&a.seq.to_be_bytes());
            alerts.push((k, encode(&AlertValue::of(a))?));
        }
        let result: Result<(), TransactionError<()>> =
            (&self.wallets, &self.debits, &self.topups, &self.alerts).transaction(|(tw, td, tt, ta)| {
                tw.insert(customer.as_bytes(), wallet.as_slice())?;
                for (k, v) in &debits {
                    td.insert(k.as_slice(), v.as_slice())?;
                }
                if let Some((k, v)) = &topup {
                    tt.insert(k.as_slice(), v.as_slice())?;
                }
                for (k, v) in &alerts {
                    ta.insert(k.as_slice(), v.as_slice())?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            });
        match result {
            Ok(()) => {}
            Err(TransactionError::Storage(e)) => return Err(e.into()),
            Err(TransactionError::Abort(())) => {
                return Err(StoreError::Corrupt("billing write aborted".into()))
            }
        }
        self.db.flush()?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

async fn pg_daily_usage(
    p: &PgStore,
    tz: &TimeZone,
    iccid: Option<u64>,
) -> Result<(Derived, i64), StoreError> {
    let mut client = p.billing_pool().get().await.map_err(billing_pool_error)?;
    // REPEATABLE READ: one snapshot for the whole scan, taken by the first statement, which
    // also reads the database's clock: "usage as of" is the same instant for every process.
    let tx = crate::postgres::read_snapshot(&mut client).await?;
    let as_of: i64 = tx
        .query_one("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint", &[])
        .await
        .map_err(billing_db_error)?
        .try_get(0)
        .map_err(billing_db_error)?;
    let mut total = Derived::default();
    // The same meter-by-meter stream as the usage routes, inside this snapshot.
    crate::postgres::billing_for_each_meter(&tx, iccid, |meter| {
        total.absorb(derive_daily_in(meter, tz)?);
        Ok(())
    })
    .await?;
    tx.commit().await.map_err(billing_db_error)?;
    if let Some(sim) = iccid {
        total.retain_sim(sim);
    }
    Ok((total, as_of))
}

fn pg_date(s: &str) -> Result<Date, StoreError> {
    crate::text::parse_date(s).ok_or_else(|| corrupt("date"))
}

/// Reads a wallet's currency and book inside `tx`; with `lock`, locks the wallet row first.
async fn pg_book(
    tx: &deadpool_postgres::Transaction<'_>,
    customer: &str,
    lock: bool,
) -> Result<Option<(String, WalletBook)>, StoreError> {
    let g = |e| billing_db_error(e);
    let select =
        "SELECT currency, active_alerts, alert_seq, usage_as_of_ms FROM billing_wallets WHERE customer = $1";
    let sql = if lock { format!("{select} FOR UPDATE") } else { select.to_owned() };
    let Some(w) = tx.query_opt(&sql, &[&customer]).await.map_err(g)? else { return Ok(None) };
    let currency: String = w.try_get(0).map_err(g)?;
    let active: Vec<String> = w.try_get(1).map_err(g)?;
    let alert_seq: i64 = w.try_get(2).map_err(g)?;
    let mut book = WalletBook {
        active: parse_active(&active)?,
        alert_seq: u64::try_from(alert_seq).map_err(|_| corrupt("alert seq"))?,
        usage_as_of_ms: w.try_get(3).map_err(g)?,
        ..WalletBook::default()
    };
    let rows = tx
        .query(
            "SELECT grp, period_start::text, period_end::text, plan_id, debited_micros, debits, updated_at_s
             FROM billing_debits WHERE customer = $1",
            &[&customer],
        )
        .await
        .map_err(g)?;
    for r in rows {
        let group: String = r.try_get(0).map_err(g)?;
        let start = pg_date(r.try_get(1).map_err(g)?)?;
        let period = BillingPeriod { start, end: pg_date(r.try_get(2).map_err(g)?)? };
        let debits: i64 = r.try_get(5).map_err(g)?;
        book.debits.insert(
            (group.clone(), start),
            BookedDebit {
                group,
                plan_id: r.try_get(3).map_err(g)?,
                period,
                debited_micros: r.try_get(4).map_err(g)?,
                debits: u32::try_from(debits).map_err(|_| corrupt("debit count"))?,
                updated_at_s: r.try_get(6).map_err(g)?,
            },
        );
    }
    let rows = tx
        .query(
            "SELECT topup_id, amount_micros, booked_at_s FROM billing_topups WHERE customer = $1",
            &[&customer],
        )
        .await
        .map_err(g)?;
    for r in rows {
        book.topups.insert(
            r.try_get(0).map_err(g)?,
            Topup { amount_micros: r.try_get(1).map_err(g)?, at_s: r.try_get(2).map_err(g)? },
        );
    }
    Ok(Some((currency, book)))
}

async fn pg_with_wallet<T: Send>(
    p: &PgStore,
    customer: &str,
    currency: &str,
    decide: impl FnOnce(&WalletBook) -> Result<(Option<WalletWrite>, T), BillingError> + Send,
) -> Result<T, BillingError> {
    let g = |e| BillingError::Store(billing_db_error(e));
    let mut client = p.billing_pool().get().await.map_err(|e| BillingError::Store(billing_pool_error(e)))?;
    let tx = client.transaction().await.map_err(g)?;
    // Created if absent, then locked: a second process waits here until the first commits.
    tx.execute(
        "INSERT INTO billing_wallets (customer, currency) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        &[&customer, &currency],
    )
    .await
    .map_err(g)?;
    let (stored_currency, book) =
        pg_book(&tx, customer, true).await?.ok_or_else(|| corrupt("wallet row created but absent"))?;
    if stored_currency != currency {
        return Err(currency_changed(customer, &stored_currency, currency));
    }
    let (write, out) = decide(&book)?;
    let Some(w) = write else {
        // Nothing to store; ending the transaction releases the lock.
        tx.commit().await.map_err(g)?;
        return Ok(out);
    };
    if !w.debits.is_empty() {
        let groups: Vec<&str> = w.debits.iter().map(|d| d.group.as_str()).collect();
        let starts: Vec<String> = w.debits.iter().map(|d| crate::text::format_date(d.period.start)).collect();
        let ends: Vec<String> = w.debits.iter().map(|d| crate::text::format_date(d.period.end)).collect();
        let plans: Vec<&str> = w.debits.iter().map(|d| d.plan_id.as_str()).collect();
        let amounts: Vec<i64> = w.debits.iter().map(|d| d.debited_micros).collect();
        let counts: Vec<i64> = w.debits.iter().map(|d| i64::from(d.debits)).collect();
        let updated: Vec<i64> = w.debits.iter().map(|d| d.updated_at_s).collect();
        tx.execute(
            "INSERT INTO billing_debits
                 (customer, grp, period_start, period_end, plan_id, debited_micros, debits, updated_at_s)
             SELECT $1, u.grp, u.ps::date, u.pe::date, u.plan, u.amount, u.n, u.at
             FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::int8[], $8::int8[])
                  AS u(grp, ps, pe, plan, amount, n, at)
             ON CONFLICT (customer, grp, period_start) DO UPDATE SET
                 period_end = EXCLUDED.period_end, plan_id = EXCLUDED.plan_id,
                 debited_micros = EXCLUDED.debited_micros, debits = EXCLUDED.debits,
                 updated_at_s = EXCLUDED.updated_at_s",
            &[&customer, &groups, &starts, &ends, &plans, &amounts, &counts, &updated],
        )
        .await
        .map_err(g)?;
    }
    if let Some((id, t)) = &w.topup {
        tx.execute(
            "INSERT INTO billing_topups (customer, topup_id, amount_micros, booked_at_s) VALUES ($1, $2, $3, $4)",
            &[&customer, id, &t.amount_micros, &t.at_s],
        )
        .await
        .map_err(g)?;
    }
    for a in &w.alerts {
        let v = AlertValue::of(a);
        let seq = i64::try_from(a.seq).map_err(|_| Refusal::Overflow("alert sequence"))?;
        tx.execute(
            "INSERT INTO billing_alerts
                 (customer, seq, kind, threshold_micros, balance_micros, overdraft_limit_micros, raised_at_s)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &customer,
                &seq,
                &v.kind,
                &v.threshold_micros,
                &v.balance_micros,
                &v.overdraft_limit_micros,
                &v.raised_at_s,
            ],
        )
        .await
        .map_err(g)?;
    }
    let seq = i64::try_from(w.alert_seq).map_err(|_| Refusal::Overflow("alert sequence"))?;
    tx.execute(
        "UPDATE billing_wallets SET active_alerts = $2, alert_seq = $3, usage_as_of_ms = $4 WHERE customer = $1",
        &[&customer, &active_keys(&w.active), &seq, &w.usage_as_of_ms],
    )
    .await
    .map_err(g)?;
    tx.commit().await.map_err(g)?;
    Ok(out)
}
