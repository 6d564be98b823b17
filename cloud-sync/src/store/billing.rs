//! Billing state in the store, on both backends: wallets (alert state), the amount debited
//! per (customer, group, period), top-ups, recorded alerts. Also usage in the billing zone on
//! both backends. The decisions are the rating core's ([`countersign_rating::billing`]); this module only reads a wallet's
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
//! PostgreSQL (migration 4, [`PG_BILLING_MIGRATION_SQL`](crate::store::postgres::migrations::PG_BILLING_MIGRATION_SQL)): every table's key starts with
//! `customer`, and one transaction only touches one customer's rows. On Citus, distribute all
//! four by `customer`, co-located, so each wallet transaction is a single-shard one (the
//! statements are in [`CITUS_DISTRIBUTION_SQL`](crate::store::postgres::CITUS_DISTRIBUTION_SQL)).
//!
//! sled trees (keys big-endian; `c` is the customer as one length byte then its bytes):
//!
//! | tree              | key                                   | value (version 1, postcard)       |
//! | ----------------- | ------------------------------------- | --------------------------------- |
//! | `billing_wallets` | customer                              | currency, active alert conditions, alert count, usage as-of |
//! | `billing_debits`  | `c` ‖ group (length byte) ‖ period start (julian day, sign flipped) | plan, period end, debited micros, debits, updated |
//! | `billing_topups`  | `c` ‖ top-up id                       | amount micros, booked at          |
//! | `billing_alerts`  | `c` ‖ seq u64                         | kind, threshold, balance, limit, raised at |
//!
//! The layout on each backend is in `sled/billing.rs` and `postgres/billing.rs`.

use std::collections::BTreeSet;

use countersign_rating::billing::{AlertRecord, BillingError as Refusal, WalletBook, WalletWrite};
use countersign_rating::pricing::{AlertCondition, WalletAlert};
use countersign_rating::usage::{Derived, TimeZone};

use super::{StoreBackend, StoreError};

/// Why a wallet's currency can no longer be used: it was created in another one.
pub(super) fn currency_changed(customer: &str, stored: &str, configured: &str) -> Refusal {
    Refusal::BadRequest(format!(
        "customer '{customer}': the wallet was opened in {stored}; the plans now say {configured}"
    ))
}

pub(super) fn now_ms() -> i64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    i64::try_from(ms).unwrap_or(i64::MAX)
}

pub(super) fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("billing: {what} does not decode"))
}

/// An alert as both backends store it: a kind and the figures that kind carries.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct AlertValue {
    pub(super) kind: String,
    pub(super) threshold_micros: Option<i64>,
    pub(super) balance_micros: i64,
    pub(super) overdraft_limit_micros: Option<i64>,
    pub(super) raised_at_s: i64,
}

impl AlertValue {
    pub(super) fn of(a: &AlertRecord) -> Self {
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

    pub(super) fn record(self, seq: u64) -> Result<AlertRecord, StoreError> {
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

pub(super) fn active_keys(active: &BTreeSet<AlertCondition>) -> Vec<String> {
    active.iter().map(|c| c.key()).collect()
}

pub(super) fn parse_active(keys: &[String]) -> Result<BTreeSet<AlertCondition>, StoreError> {
    keys.iter().map(|k| AlertCondition::from_key(k).ok_or_else(|| corrupt("alert condition"))).collect()
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
            Self::Sled(s) => s.billing_daily_usage(tz, iccid).await,
            Self::Postgres(p) => p.billing_daily_usage(tz, iccid).await,
        }
    }

    /// A wallet's book, read without taking its lock (for queries).
    pub async fn wallet_book(&self, customer: &str) -> Result<WalletBook, StoreError> {
        match self {
            Self::Sled(s) => s.wallet_book(customer).await,
            Self::Postgres(p) => p.wallet_book(customer).await,
        }
    }

    /// The newest `limit` alerts of a wallet, oldest first.
    pub async fn wallet_alerts(&self, customer: &str, limit: usize) -> Result<Vec<AlertRecord>, StoreError> {
        match self {
            Self::Sled(s) => s.wallet_alerts(customer, limit).await,
            Self::Postgres(p) => p.wallet_alerts(customer, limit).await,
        }
    }

    /// Runs `decide` on the wallet's book under the wallet's lock and stores the write it
    /// returns (if any) atomically before the lock is released; returns what `decide` returned
    /// beside the write. The wallet is created (in `currency`) on first use; a wallet opened
    /// in another currency is refused. `E` is the caller's error: it takes the store's
    /// failures and the refusals of the rating core.
    pub async fn with_wallet<T: Send, E: From<StoreError> + From<Refusal> + Send>(
        &self,
        customer: &str,
        currency: &str,
        decide: impl FnOnce(&WalletBook) -> Result<(Option<WalletWrite>, T), E> + Send,
    ) -> Result<T, E> {
        match self {
            Self::Sled(s) => s.with_wallet(customer, currency, decide).await,
            Self::Postgres(p) => p.with_wallet(customer, currency, decide).await,
        }
    }
}
