//! Billing trees of the sled store (keys big-endian; `c` is the customer as one length byte
//! then its bytes; values are version 1 then postcard):
//!
//! | tree              | key                                   | value                             |
//! | ----------------- | ------------------------------------- | --------------------------------- |
//! | `billing_wallets` | customer                              | currency, active alert conditions, alert count, usage as-of |
//! | `billing_debits`  | `c` ‖ group (length byte) ‖ period start (julian day, sign flipped) | plan, period end, debited micros, debits, updated |
//! | `billing_topups`  | `c` ‖ top-up id                       | amount micros, booked at          |
//! | `billing_alerts`  | `c` ‖ seq u64                         | kind, threshold, balance, limit, raised at |
//!
//! One process owns a sled store: a process-wide async mutex serialises every wallet change,
//! and the rows of one change are one multi-tree sled transaction, flushed before the call
//! returns.

use serde::{Deserialize, Serialize};
use time::Date;

use countersign_rating::billing::{
    AlertRecord, BillingError as Refusal, BookedDebit, Topup, WalletBook, WalletWrite,
};
use countersign_rating::pricing::BillingPeriod;
use countersign_rating::usage::{Derived, TimeZone};

use super::Store;
use crate::store::billing::{active_keys, corrupt, currency_changed, now_ms, parse_active, AlertValue};
use crate::store::{blocking, StoreError};

const WALLETS_TREE: &str = "billing_wallets";
const DEBITS_TREE: &str = "billing_debits";
const TOPUPS_TREE: &str = "billing_topups";
const ALERTS_TREE: &str = "billing_alerts";
const VALUE_VERSION: u8 = 1;

/// Serialises wallet changes on the embedded store. One process owns a sled store, so a
/// process-wide lock is the wallet lock (several sled stores in one process, as in tests,
/// only wait for each other).
static SLED_WALLET_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

impl Store {
    /// See [`StoreBackend::billing_daily_usage`](crate::store::StoreBackend::billing_daily_usage).
    pub(crate) async fn billing_daily_usage(
        &self,
        tz: &TimeZone,
        iccid: Option<u64>,
    ) -> Result<(Derived, i64), StoreError> {
        let s = self.clone();
        let tz = tz.clone();
        blocking(move || {
            let as_of = now_ms();
            let mut daily = s.daily_usage_in(&tz)?;
            if let Some(sim) = iccid {
                daily.retain_sim(sim);
            }
            Ok((daily, as_of))
        })
        .await
    }

    /// See [`StoreBackend::wallet_book`](crate::store::StoreBackend::wallet_book).
    pub(crate) async fn wallet_book(&self, customer: &str) -> Result<WalletBook, StoreError> {
        let _guard = SLED_WALLET_LOCK.lock().await;
        let s = self.clone();
        let c = customer.to_owned();
        blocking(move || Ok(SledBilling::open(&s)?.book(&c)?.map(|(_, b)| b).unwrap_or_default())).await
    }

    /// See [`StoreBackend::wallet_alerts`](crate::store::StoreBackend::wallet_alerts).
    pub(crate) async fn wallet_alerts(
        &self,
        customer: &str,
        limit: usize,
    ) -> Result<Vec<AlertRecord>, StoreError> {
        let s = self.clone();
        let c = customer.to_owned();
        blocking(move || SledBilling::open(&s)?.alerts(&c, limit)).await
    }

    /// See [`StoreBackend::with_wallet`](crate::store::StoreBackend::with_wallet).
    pub(crate) async fn with_wallet<T: Send, E: From<StoreError> + From<Refusal> + Send>(
        &self,
        customer: &str,
        currency: &str,
        decide: impl FnOnce(&WalletBook) -> Result<(Option<WalletWrite>, T), E> + Send,
    ) -> Result<T, E> {
        let _guard = SLED_WALLET_LOCK.lock().await;
        let store = self.clone();
        let c = customer.to_owned();
        let (stored_currency, book) = blocking(move || -> Result<_, StoreError> {
            Ok(SledBilling::open(&store)?
                .book(&c)?
                .map(|(cur, b)| (Some(cur), b))
                .unwrap_or((None, WalletBook::default())))
        })
        .await?;
        if let Some(stored) = stored_currency.as_deref().filter(|s| *s != currency) {
            return Err(currency_changed(customer, stored, currency).into());
        }
        let (write, out) = decide(&book)?;
        if let Some(write) = write {
            let store = self.clone();
            let (c, cur) = (customer.to_owned(), currency.to_owned());
            blocking(move || -> Result<_, StoreError> { SledBilling::open(&store)?.write(&c, &cur, &write) })
                .await?;
        }
        Ok(out)
    }
}
