//! The store the endpoint runs on, whichever it is: the embedded sled [`Store`] or the shared
//! PostgreSQL [`PgStore`]. Every method is async; sled calls, which block, run on tokio's
//! blocking pool.
//!
//! Both keep the same contract: a record id is stored at most once, a second copy with the
//! same bytes is a duplicate and with other bytes a conflict, registrations are idempotent and
//! never overwritten, and a batch's records are durable when [`StoreBackend::insert_batch`]
//! returns.

use std::collections::HashMap;

use countersign_meter::{RecordId, METER_KEY_BYTES};
use ed25519_dalek::VerifyingKey;

use crate::config::{CloudConfig, StoreKind};
use crate::ledger::{Ledger, LedgerDay, LedgerError};
use crate::negcache::{LookupCaches, LookupStats};
use crate::postgres::PgStore;
use crate::store::{blocking, InsertOutcome, NewRecord, Registration, Store, StoreError, StoredRecord};
use crate::usage::{DateRange, Derived, Settlement, TimeZone};
use jiff::Timestamp;

/// One of the two stores. Cheap to clone: clones share the underlying store.
#[derive(Clone, Debug)]
pub enum StoreBackend {
    /// The embedded sled store (one process).
    Sled(Store),
    /// The PostgreSQL store (any number of processes).
    Postgres(PgStore),
}

impl StoreBackend {
    /// Opens the store `config` selects (`[store] backend`), applying PostgreSQL migrations.
    pub async fn open(config: &CloudConfig) -> Result<Self, StoreError> {
        match config.store_kind() {
            StoreKind::Sled => {
                let dir = config.data_dir().to_owned();
                let cache = config.cache_capacity_bytes();
                Ok(Self::Sled(blocking(move || Store::open(&dir, cache)).await?))
            }
            StoreKind::Postgres { url, pool_connections } => {
                Ok(Self::Postgres(PgStore::connect(url, *pool_connections).await?))
            }
        }
    }

    /// "sled" or "postgres", for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Sled(_) => "sled",
            Self::Postgres(_) => "postgres",
        }
    }

    /// Stores a batch's verified records; durable when this returns. One outcome per input.
    pub async fn insert_batch(
        &self,
        gateway_id: u64,
        records: Vec<NewRecord>,
    ) -> Result<Vec<InsertOutcome>, StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.insert_batch(gateway_id, &records)).await
            }
            Self::Postgres(p) => p.insert_batch(gateway_id, &records).await,
        }
    }

    /// The registered keys among `ids`.
    pub async fn meter_keys(&self, ids: Vec<u64>) -> Result<HashMap<u64, [u8; METER_KEY_BYTES]>, StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || {
                    let mut out = HashMap::with_capacity(ids.len());
                    for id in ids {
                        if let Some(k) = s.meter_key(id)? {
                            out.insert(id, k);
                        }
                    }
                    Ok(out)
                })
                .await
            }
            Self::Postgres(p) => p.meter_keys(&ids).await,
        }
    }

    fn lookup_caches(&self) -> &LookupCaches {
        match self {
            Self::Sled(s) => s.lookup_caches(),
            Self::Postgres(p) => p.lookup_caches(),
        }
    }

    /// How many gateway and token lookups reached the store, and how many the negative
    /// caches answered (for `/metrics` and tests).
    pub fn lookup_stats(&self) -> LookupStats {
        self.lookup_caches().stats()
    }

    /// The public key of a gateway, if registered. An id the store did not know is answered
    /// from a negative cache for [`NEGATIVE_CACHE_TTL_S`](crate::negcache::NEGATIVE_CACHE_TTL_S)
    /// (a header naming an unknown gateway costs no store lookup after the first).
    pub async fn gateway_key(&self, gateway_id: u64) -> Result<Option<VerifyingKey>, StoreError> {
        let caches = self.lookup_caches();
        if caches.gateway_known_unknown(gateway_id) {
            return Ok(None);
        }
        let key = match self {
            // A point read in sled's cache: not worth a trip to the blocking pool.
            Self::Sled(s) => s.gateway_key(gateway_id)?,
            Self::Postgres(p) => p.gateway_key(gateway_id).await?,
        };
        if key.is_none() {
            caches.gateway_unknown(gateway_id);
        }
        Ok(key)
    }

    /// Registers a meter's HMAC key; durable when this returns.
    pub async fn add_meter(
        &self,
        meter_id: u64,
        key: [u8; METER_KEY_BYTES],
    ) -> Result<Registration, StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.add_meter(meter_id, &key)).await
            }
            Self::Postgres(p) => p.add_meter(meter_id, &key).await,
        }
    }

    /// Registers a gateway's public key; durable when this returns. The gateway is no longer
    /// known unknown to this process.
    pub async fn add_gateway(&self, gateway_id: u64, key: VerifyingKey) -> Result<Registration, StoreError> {
        let r = match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.add_gateway(gateway_id, &key)).await
            }
            Self::Postgres(p) => p.add_gateway(gateway_id, &key).await,
        };
        // Whatever the answer: after a conflict the id is registered too.
        self.lookup_caches().gateway_registered(gateway_id);
        r
    }

    /// Bytes per (ICCID, UTC day); with `iccid`, at least that SIM's days are exact (others
    /// may be absent).
    pub async fn daily_usage(&self, iccid: Option<u64>) -> Result<Derived, StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.daily_usage()).await
            }
            Self::Postgres(p) => p.daily_usage(iccid).await,
        }
    }

    /// Bytes per (ICCID, day in `tz`); with `iccid`, only that SIM's days, exact (an epoch's
    /// running maximum spans SIM swaps, so its meters' other records are derived too).
    pub async fn daily_usage_in(&self, iccid: Option<u64>, tz: TimeZone) -> Result<Derived, StoreError> {
        let mut daily = match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.daily_usage_in(&tz)).await?
            }
            Self::Postgres(p) => p.daily_usage_in(iccid, &tz).await?,
        };
        if let Some(sim) = iccid {
            daily.retain_sim(sim);
        }
        Ok(daily)
    }

    /// The settlement ledger's zone (`None` before its first settlement) and its booked
    /// SIM-days, one SIM or all, inside `range`.
    pub async fn ledger(
        &self,
        iccid: Option<u64>,
        range: DateRange,
    ) -> Result<(Option<String>, Vec<LedgerDay>), LedgerError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                tokio::task::spawn_blocking(move || {
                    let ledger = Ledger::open(&s)?;
                    Ok((ledger.zone()?, ledger.days(iccid, range)?))
                })
                .await
                .map_err(|e| StoreError::Corrupt(format!("store task failed: {e}")))?
            }
            Self::Postgres(p) => p.ledger_days(iccid, range).await,
        }
    }

    /// A settlement run (see [`usage::settle`](crate::usage::settle)): days closed by `now`
    /// are booked once, changes to booked days become numbered adjustments; durable when it
    /// returns. On PostgreSQL safe from any number of processes at once.
    pub async fn settle(
        &self,
        tz_name: String,
        settlement_hours: u32,
        now: Timestamp,
    ) -> Result<Settlement, LedgerError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                tokio::task::spawn_blocking(move || Ledger::open(&s)?.settle(&tz_name, settlement_hours, now))
                    .await
                    .map_err(|e| StoreError::Corrupt(format!("store task failed: {e}")))?
            }
            Self::Postgres(p) => p.ledger_settle(&tz_name, settlement_hours, now).await,
        }
    }

    /// The stored record with this id.
    pub async fn record(&self, id: RecordId) -> Result<Option<StoredRecord>, StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.record(id)).await
            }
            Self::Postgres(p) => p.record(id).await,
        }
    }

    /// Number of stored records: O(records), for tests and tools.
    pub async fn record_count(&self) -> Result<u64, StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || {
                    u64::try_from(s.record_count()).map_err(|_| StoreError::Corrupt("record count".into()))
                })
                .await
            }
            Self::Postgres(p) => p.record_count().await,
        }
    }

    /// Stores an API token's SHA-256 under a unique name.
    pub async fn add_token(
        &self,
        name: String,
        role: &'static str,
        sha256: [u8; 32],
    ) -> Result<Registration, StoreError> {
        let r = match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.add_token(&name, role, &sha256)).await
            }
            Self::Postgres(p) => p.add_token(&name, role, &sha256).await,
        };
        self.lookup_caches().token_created(&sha256);
        r
    }

    /// The name and role of the token with this SHA-256. A hash the store did not know is
    /// answered from a negative cache like [`StoreBackend::gateway_key`].
    pub async fn token(&self, sha256: [u8; 32]) -> Result<Option<(String, String)>, StoreError> {
        let caches = self.lookup_caches();
        if caches.token_known_unknown(&sha256) {
            return Ok(None);
        }
        let token = match self {
            Self::Sled(s) => s.token(&sha256)?,
            Self::Postgres(p) => p.token(&sha256).await?,
        };
        if token.is_none() {
            caches.token_unknown(sha256);
        }
        Ok(token)
    }

    /// Removes the token named `name`; whether one was there.
    pub async fn revoke_token(&self, name: String) -> Result<bool, StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.revoke_token(&name)).await
            }
            Self::Postgres(p) => p.revoke_token(&name).await,
        }
    }

    /// Names and roles of every token.
    pub async fn tokens(&self) -> Result<Vec<(String, String)>, StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.tokens()).await
            }
            Self::Postgres(p) => p.tokens().await,
        }
    }

    /// Makes everything written durable (sled; PostgreSQL commits are durable already).
    pub async fn flush(&self) -> Result<(), StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.flush()).await
            }
            Self::Postgres(_) => Ok(()),
        }
    }
}
