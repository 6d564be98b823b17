//! The endpoint's embedded store: sled 0.34.7 behind a narrow API.
//!
//! Three trees, keys big-endian so that byte order is numeric order:
//!
//! | tree       | key                              | value                                   |
//! | ---------- | -------------------------------- | --------------------------------------- |
//! | `records`  | `RecordId::to_key()` (16 bytes)  | version 1, then postcard (gateway_id, received_ms, report bytes) |
//! | `meters`   | meter id, u64                    | 32-byte HMAC key                        |
//! | `gateways` | gateway id, u64                  | 32-byte Ed25519 public key              |
//!
//! The record id is the primary key: a record is inserted with compare-and-swap against
//! "absent", so a second copy can never overwrite the first, and the original device bytes
//! are kept as evidence. Writes are acknowledged by callers only after [`Store::flush`].
//!
//! sled locks its directory, so one process owns a store; sharing between endpoint
//! processes is the PostgreSQL store's job.

use std::path::{Path, PathBuf};

use countersign_meter::{RecordId, Report, METER_KEY_BYTES};
use countersign_protocol::keys::PUBLIC_KEY_BYTES;
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::usage::{derive_daily, derive_daily_in, Derived, TimeZone, UsageError, UsageRecord};

/// Name of the sled directory inside the configured `data_dir`.
pub const STORE_DIR_NAME: &str = "sled";
/// Version byte that starts every value of the `records` tree.
pub const RECORD_VALUE_VERSION: u8 = 1;

const RECORDS_TREE: &str = "records";
const METERS_TREE: &str = "meters";
const GATEWAYS_TREE: &str = "gateways";
const TOKENS_TREE: &str = "api_tokens";

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be opened (locked by another process, no permission, disk
    /// error). Recoverable once the other process is gone or the fault is fixed.
    #[error("store at {path} could not be opened")]
    Open {
        /// The sled directory.
        path: PathBuf,
        /// sled's error.
        source: sled::Error,
    },
    /// Reading or writing failed (disk full, I/O error). Recoverable: retry once the fault
    /// clears; nothing unflushed was acknowledged.
    #[error("store unavailable: {0}")]
    Unavailable(sled::Error),
    /// Stored data does not decode. Not recoverable without operator attention.
    #[error("store is corrupt: {0}")]
    Corrupt(String),
    /// A different key is already registered for this id. Not recoverable by retrying:
    /// registrations are never overwritten, so a leaked key cannot be replaced by an attacker.
    #[error("{kind} {id} is already registered with a different key")]
    Conflict {
        /// "meter" or "gateway".
        kind: &'static str,
        /// The id.
        id: u64,
    },
    /// Stored records do not add up to usage (ordering or overflow). Not recoverable by
    /// retrying.
    #[error("usage derivation failed: {0}")]
    Usage(#[from] UsageError),
    /// PostgreSQL could not be reached or aborted the work (connection lost, pool exhausted,
    /// server shutting down, deadlock). Recoverable: retry later; nothing uncommitted was
    /// acknowledged.
    #[error("database unavailable: {0}")]
    DatabaseUnavailable(String),
    /// PostgreSQL refused a statement for a reason retrying cannot fix (schema mismatch,
    /// constraint, bad connection string). Not recoverable without operator action.
    #[error("database error: {0}")]
    Database(String),
    /// A schema migration failed or the database is newer than this binary. Not recoverable
    /// without operator action.
    #[error("schema migration {version} failed: {reason}")]
    Migration {
        /// The migration's version.
        version: i32,
        /// Why.
        reason: String,
    },
    /// An API token with this name, or this token under another name, exists. Not
    /// recoverable by retrying: pick another name, or revoke the old token first.
    #[error("an api token named '{name}' or with the same secret already exists")]
    TokenConflict {
        /// The name asked for.
        name: String,
    },
    /// The data directory exists and group or others may enter or read it; it holds every
    /// meter's HMAC key. Not recoverable without operator action (`chmod 700`).
    #[error("data_dir {path} is accessible to group or others (mode {mode:o}) and holds every meter key; run chmod 700 on it")]
    DataDirTooOpen {
        /// The data directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The store already holds [`API_TOKENS_MAX`] tokens. Not recoverable until one is
    /// revoked.
    #[error("the store already holds {API_TOKENS_MAX} api tokens; revoke one first")]
    TooManyTokens,
}

/// Runs blocking store work (sled calls, flushes) on tokio's blocking pool: the one helper
/// every async caller of the sled store uses. A task that panicked is a store failure.
pub(crate) async fn blocking<T: Send + 'static, E: From<StoreError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| E::from(StoreError::Corrupt(format!("store task failed: {e}"))))?
}

impl From<countersign_rating::lago::PlanError> for StoreError {
    /// A record whose event cannot be planned is stored data out of range.
    fn from(e: countersign_rating::lago::PlanError) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

impl StoreError {
    /// Whether retrying later may succeed without anyone changing data.
    pub fn is_recoverable(&self) -> bool {
        matches!(
            self,
            StoreError::Open { .. } | StoreError::Unavailable(_) | StoreError::DatabaseUnavailable(_)
        )
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Corruption { .. } => StoreError::Corrupt(e.to_string()),
            other => StoreError::Unavailable(other),
        }
    }
}

/// Most API tokens a store holds: each request may look one up, and the sled store finds
/// names by walking them.
pub const API_TOKENS_MAX: usize = 1024;

/// A verified record on its way into a store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRecord {
    /// Its record id (from the verified report).
    pub id: RecordId,
    /// The SIM the report names.
    pub iccid: u64,
    /// When the gateway received it, Unix milliseconds.
    pub received_ms: u64,
    /// The device's original bytes, tag included; a slice of the batch, not a copy.
    pub report: bytes::Bytes,
}

/// What [`Store::insert_record`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsertOutcome {
    /// The record was new and is now stored (durable after the next flush).
    Stored,
    /// The same record, byte for byte, was stored before.
    Duplicate,
    /// A different report with the same record id is stored; the new one was not.
    Conflict,
}

/// What registering a key did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Registration {
    /// Newly registered.
    Created,
    /// The same key was registered before.
    AlreadyRegistered,
}

/// A stored record: who delivered it, when, and the device's original bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    /// The gateway whose batch first delivered it.
    pub gateway_id: u64,
    /// When that gateway received it, Unix milliseconds.
    pub received_ms: u64,
    /// The device's report, tag included, as received.
    pub report: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct WireValue<'a> {
    gateway_id: u64,
    received_ms: u64,
    #[serde(borrow)]
    report: &'a [u8],
}

fn encode_value(gateway_id: u64, received_ms: u64, report: &[u8]) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![RECORD_VALUE_VERSION];
    let body = postcard::to_stdvec(&WireValue { gateway_id, received_ms, report })
        .map_err(|e| StoreError::Corrupt(format!("record value does not encode: {e}")))?;
    out.extend_from_slice(&body);
    Ok(out)
}

fn decode_value(bytes: &[u8]) -> Result<WireValue<'_>, StoreError> {
    match bytes.split_first() {
        Some((&RECORD_VALUE_VERSION, rest)) => {
            let (v, tail): (WireValue<'_>, &[u8]) = postcard::take_from_bytes(rest)
                .map_err(|e| StoreError::Corrupt(format!("record value does not decode: {e}")))?;
            if !tail.is_empty() {
                return Err(StoreError::Corrupt("record value has trailing bytes".into()));
            }
            Ok(v)
        }
        Some((v, _)) => Err(StoreError::Corrupt(format!("record value has unknown version {v}"))),
        None => Err(StoreError::Corrupt("record value is empty".into())),
    }
}

/// The endpoint's store. Cheap to clone: clones share one `sled::Db`.
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    records: sled::Tree,
    meters: sled::Tree,
    gateways: sled::Tree,
    tokens: sled::Tree,
    /// Serialises token changes: a name must stay unique across the check and the write.
    token_lock: std::sync::Arc<std::sync::Mutex<()>>,
    /// Serialises settlement runs of this process (the only one that can open the store), as
    /// the advisory lock does on PostgreSQL: two runs at once would book the same day.
    ledger_lock: std::sync::Arc<std::sync::Mutex<()>>,
    /// Unknown gateway ids and tokens, shared by clones (see [`crate::negcache`]).
    lookups: std::sync::Arc<crate::negcache::LookupCaches>,
}

impl Store {
    /// Opens (or creates) the store in `data_dir/sled`. A missing `data_dir` is created
    /// 0700, because the store holds the meters' HMAC keys; an existing one that group or
    /// others may access is refused ([`StoreError::DataDirTooOpen`]).
    pub fn open(data_dir: &Path, cache_capacity_bytes: u64) -> Result<Self, StoreError> {
        let path = data_dir.join(STORE_DIR_NAME);
        let open_err = |source| StoreError::Open { path: path.clone(), source };
        if let Some(mode) = create_private_dir(data_dir).map_err(|e| open_err(sled::Error::Io(e)))? {
            return Err(StoreError::DataDirTooOpen { path: data_dir.to_owned(), mode });
        }
        let db =
            sled::Config::new().path(&path).cache_capacity(cache_capacity_bytes).open().map_err(open_err)?;
        let records = db.open_tree(RECORDS_TREE).map_err(open_err)?;
        let meters = db.open_tree(METERS_TREE).map_err(open_err)?;
        let gateways = db.open_tree(GATEWAYS_TREE).map_err(open_err)?;
        let tokens = db.open_tree(TOKENS_TREE).map_err(open_err)?;
        Ok(Self {
            db,
            records,
            meters,
            gateways,
            tokens,
            token_lock: Default::default(),
            ledger_lock: Default::default(),
            lookups: Default::default(),
        })
    }

    /// Stores a verified report under its record id unless a record with that id exists.
    /// Not durable until [`Store::flush`] returns.
    pub fn insert_record(
        &self,
        id: RecordId,
        gateway_id: u64,
        received_ms: u64,
        report: &[u8],
    ) -> Result<InsertOutcome, StoreError> {
        let value = encode_value(gateway_id, received_ms, report)?;
        match self.records.compare_and_swap(id.to_key(), None::<&[u8]>, Some(value))? {
            Ok(()) => Ok(InsertOutcome::Stored),
            Err(cas) => {
                let current = cas.current.ok_or_else(|| {
                    StoreError::Corrupt(format!("record {id}: insert refused but no record present"))
                })?;
                if decode_value(&current)?.report == report {
                    Ok(InsertOutcome::Duplicate)
                } else {
                    Ok(InsertOutcome::Conflict)
                }
            }
        }
    }

    /// Stores a batch's verified records (see [`Store::insert_record`]) and flushes, so they
    /// are durable when this returns. One outcome per input, in input order; a second copy
    /// of an id inside the batch is settled against the first, as across batches.
    pub fn insert_batch(
        &self,
        gateway_id: u64,
        records: &[NewRecord],
    ) -> Result<Vec<InsertOutcome>, StoreError> {
        let mut outcomes = Vec::with_capacity(records.len());
        for r in records {
            outcomes.push(self.insert_record(r.id, gateway_id, r.received_ms, &r.report)?);
        }
        // Flush even when nothing was stored: a duplicate may be an earlier attempt's write
        // that was never flushed, and it is acknowledged now.
        self.flush()?;
        Ok(outcomes)
    }

    /// The stored record with this id.
    pub fn record(&self, id: RecordId) -> Result<Option<StoredRecord>, StoreError> {
        let Some(bytes) = self.records.get(id.to_key())? else { return Ok(None) };
        let v = decode_value(&bytes)?;
        Ok(Some(StoredRecord {
            gateway_id: v.gateway_id,
            received_ms: v.received_ms,
            report: v.report.to_vec(),
        }))
    }

    /// Number of stored records. sled counts by walking the tree: O(records), for tests and
    /// tools, not for request paths.
    pub fn record_count(&self) -> usize {
        self.records.len()
    }

    /// Blocks until everything written so far is on disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Registers a meter's HMAC key; durable when this returns. Idempotent for the same key.
    pub fn add_meter(&self, meter_id: u64, key: &[u8; METER_KEY_BYTES]) -> Result<Registration, StoreError> {
        self.register(&self.meters, "meter", meter_id, key)
    }

    /// The HMAC key of a meter, if registered.
    pub fn meter_key(&self, meter_id: u64) -> Result<Option<[u8; METER_KEY_BYTES]>, StoreError> {
        let Some(v) = self.meters.get(meter_id.to_be_bytes())? else { return Ok(None) };
        let key = <[u8; METER_KEY_BYTES]>::try_from(v.as_ref())
            .map_err(|_| StoreError::Corrupt(format!("meter {meter_id}: key is {} bytes", v.len())))?;
        Ok(Some(key))
    }

    /// Registers a gateway's public key; durable when this returns. Idempotent for the same key.
    pub fn add_gateway(&self, gateway_id: u64, key: &VerifyingKey) -> Result<Registration, StoreError> {
        self.register(&self.gateways, "gateway", gateway_id, key.as_bytes())
    }

    /// The public key of a gateway, if registered.
    pub fn gateway_key(&self, gateway_id: u64) -> Result<Option<VerifyingKey>, StoreError> {
        self.lookups.gateway_store_lookup();
        let Some(v) = self.gateways.get(gateway_id.to_be_bytes())? else { return Ok(None) };
        let bytes = <[u8; PUBLIC_KEY_BYTES]>::try_from(v.as_ref())
            .map_err(|_| StoreError::Corrupt(format!("gateway {gateway_id}: key is {} bytes", v.len())))?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| StoreError::Corrupt(format!("gateway {gateway_id}: key is not an Ed25519 point")))?;
        Ok(Some(key))
    }

    fn register(
        &self,
        tree: &sled::Tree,
        kind: &'static str,
        id: u64,
        key: &[u8; 32],
    ) -> Result<Registration, StoreError> {
        match tree.compare_and_swap(id.to_be_bytes(), None::<&[u8]>, Some(&key[..]))? {
            Ok(()) => {
                self.flush()?;
                Ok(Registration::Created)
            }
            Err(cas) if cas.current.as_deref() == Some(&key[..]) => {
                // Flushing here too covers a concurrent first registration still in flight.
                self.flush()?;
                Ok(Registration::AlreadyRegistered)
            }
            Err(_) => Err(StoreError::Conflict { kind, id }),
        }
    }

    /// Bytes per (ICCID, UTC day) over every stored record (see [`crate::usage`]).
    ///
    /// This scans the whole `records` tree in key order and decodes every report: O(records)
    /// per query, because an epoch's running maximum needs all its reports whatever range is
    /// asked for. Fine for the embedded store's scale; the PostgreSQL store keeps derived
    /// daily totals instead.
    pub fn daily_usage(&self) -> Result<Derived, StoreError> {
        let mut failure = None;
        let records = self.records.iter().map_while(|item| match usage_record(item) {
            Ok(r) => Some(r),
            Err(e) => {
                failure = Some(e);
                None
            }
        });
        let daily = derive_daily(records);
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(daily?)
    }
}

impl Store {
    /// Bytes per (ICCID, day in `tz`) over every stored record, streamed in key order
    /// through [`derive_daily_in`]: O(records), like [`Store::daily_usage`].
    pub fn daily_usage_in(&self, tz: &TimeZone) -> Result<Derived, StoreError> {
        let mut failure = None;
        let records = self.usage_records().map_while(|r| match r {
            Ok(r) => Some(r),
            Err(e) => {
                failure = Some(e);
                None
            }
        });
        let daily = derive_daily_in(records, tz);
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(daily?)
    }
}

/// Access for the modules that keep their own trees beside the records (settlement, Lago
/// outbox). Kept apart from the core API above so that store backends can differ here.
impl Store {
    /// The negative caches of gateway and token lookups ([`StoreBackend`](crate::StoreBackend)
    /// consults them).
    pub(crate) fn lookup_caches(&self) -> &crate::negcache::LookupCaches {
        &self.lookups
    }

    /// The sled database, for multi-tree transactions of the modules that own extra trees.
    pub(crate) fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Held for a whole settlement run (see [`crate::ledger`]).
    pub(crate) fn ledger_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // A run that panicked wrote nothing or whole entries: the ledger is still valid.
        self.ledger_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every stored record as the derivation sees it, in record id order. O(records).
    pub fn usage_records(&self) -> impl Iterator<Item = Result<UsageRecord, StoreError>> + '_ {
        self.records.iter().map(usage_record)
    }
}

impl Store {
    /// Stores an API token's SHA-256 under a unique name; durable when this returns.
    /// Idempotent for the same name, role and token.
    pub fn add_token(&self, name: &str, role: &str, sha256: &[u8; 32]) -> Result<Registration, StoreError> {
        let _guard = self.token_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let value = encode_token(name, role)?;
        if let Some(current) = self.tokens.get(sha256)? {
            return if current.as_ref() == value.as_slice() {
                Ok(Registration::AlreadyRegistered)
            } else {
                Err(StoreError::TokenConflict { name: name.to_owned() })
            };
        }
        let all = self.tokens()?;
        if all.iter().any(|(n, _)| n == name) {
            return Err(StoreError::TokenConflict { name: name.to_owned() });
        }
        if all.len() >= API_TOKENS_MAX {
            return Err(StoreError::TooManyTokens);
        }
        self.tokens.insert(sha256, value)?;
        self.flush()?;
        Ok(Registration::Created)
    }

    /// The name and role of the token with this SHA-256, if any.
    pub fn token(&self, sha256: &[u8; 32]) -> Result<Option<(String, String)>, StoreError> {
        self.lookups.token_store_lookup();
        self.tokens.get(sha256)?.map(|v| decode_token(&v)).transpose()
    }

    /// Removes the token named `name`; durable when this returns. Whether one was there.
    pub fn revoke_token(&self, name: &str) -> Result<bool, StoreError> {
        let _guard = self.token_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut found = None;
        for item in self.tokens.iter().take(API_TOKENS_MAX) {
            let (k, v) = item?;
            if decode_token(&v)?.0 == name {
                found = Some(k);
                break;
            }
        }
        let Some(key) = found else { return Ok(false) };
        self.tokens.remove(key)?;
        self.flush()?;
        Ok(true)
    }

    /// Names and roles of every token, by name.
    pub fn tokens(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tokens.iter().take(API_TOKENS_MAX) {
            let (_, v) = item?;
            out.push(decode_token(&v)?);
        }
        out.sort();
        Ok(out)
    }
}

fn encode_token(name: &str, role: &str) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(&(name, role)).map_err(|e| StoreError::Corrupt(format!("token does not encode: {e}")))
}

fn decode_token(bytes: &[u8]) -> Result<(String, String), StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("token entry does not decode: {e}")))
}

fn usage_record(item: sled::Result<(sled::IVec, sled::IVec)>) -> Result<UsageRecord, StoreError> {
    let (key, value) = item?;
    let id = RecordId::from_key(&key)
        .ok_or_else(|| StoreError::Corrupt(format!("record key of {} bytes", key.len())))?;
    let v = decode_value(&value)?;
    // Verified on ingest, so only decoding is needed; the tag stays in the bytes as evidence.
    let (report, _) = Report::decode(v.report)
        .map_err(|e| StoreError::Corrupt(format!("record {id}: stored report does not decode: {e}")))?;
    if report.id() != id {
        return Err(StoreError::Corrupt(format!(
            "record {id}: stored under the id of report {}",
            report.id()
        )));
    }
    Ok(UsageRecord::from_report(&report, v.received_ms))
}

/// Whether a data directory with these permission bits may hold meter keys: no access at all
/// for group and others.
pub fn data_dir_mode_is_private(mode: u32) -> bool {
    mode & 0o077 == 0
}

/// Creates `dir` 0700 when missing. An existing one is left as it is (an operator may have
/// reasons for its mode) and its mode returned when it is not private, for the caller to
/// refuse: the store would hand every meter key to whoever can read it.
fn create_private_dir(dir: &Path) -> std::io::Result<Option<u32>> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if dir.is_dir() {
        let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
        return Ok((!data_dir_mode_is_private(mode)).then_some(mode));
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use countersign_meter::{DeviceTime, TimeQuality, Totals};
    use ed25519_dalek::SigningKey;

    const KEY: [u8; 32] = [5u8; 32];
    const SIM: u64 = 8_988_280_666_000_000_007;

    fn report(seq: u32, up: u64) -> (RecordId, Vec<u8>) {
        let r = Report {
            meter_id: 3,
            epoch: 0,
            seq,
            iccid: SIM,
            time: DeviceTime::wall_clock(TimeQuality::Network, 1_795_521_600).unwrap(),
            base: Totals::default(),
            used: Totals { up, down: 2 * up },
            extras: Default::default(),
        };
        let mut buf = [0u8; countersign_meter::REPORT_BYTES_MAX];
        let n = r.encode(&KEY, &mut buf).unwrap();
        (r.id(), buf[..n].to_vec())
    }

    fn open(dir: &Path) -> Store {
        Store::open(&dir.join("data"), crate::config::CACHE_CAPACITY_BYTES_MIN).unwrap()
    }

    #[test]
    fn insert_dedupes_and_refuses_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (id, bytes) = report(0, 100);
        assert_eq!(store.insert_record(id, 1, 10, &bytes).unwrap(), InsertOutcome::Stored);
        // The same bytes via another gateway or at another time: still the same record.
        assert_eq!(store.insert_record(id, 2, 20, &bytes).unwrap(), InsertOutcome::Duplicate);
        let (_, other) = report(0, 999);
        assert_eq!(store.insert_record(id, 1, 10, &other).unwrap(), InsertOutcome::Conflict);
        // The first copy is kept, as evidence.
        let kept = store.record(id).unwrap().unwrap();
        assert_eq!(kept, StoredRecord { gateway_id: 1, received_ms: 10, report: bytes });
        assert_eq!(store.record_count(), 1);
    }

    #[test]
    fn records_survive_reopen_and_derive_usage() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            for (seq, up) in [(0, 0), (2, 300), (1, 100)] {
                let (id, bytes) = report(seq, up);
                store.insert_record(id, 1, 0, &bytes).unwrap();
            }
            store.flush().unwrap();
        }
        let store = open(dir.path());
        assert_eq!(store.record_count(), 3);
        let daily = store.daily_usage().unwrap();
        assert_eq!(daily.daily.values().copied().collect::<Vec<_>>(), vec![Totals { up: 300, down: 600 }]);
    }

    #[test]
    fn registry_is_idempotent_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        assert_eq!(store.meter_key(7).unwrap(), None);
        assert_eq!(store.add_meter(7, &KEY).unwrap(), Registration::Created);
        assert_eq!(store.add_meter(7, &KEY).unwrap(), Registration::AlreadyRegistered);
        let e = store.add_meter(7, &[6u8; 32]).unwrap_err();
        assert!(matches!(e, StoreError::Conflict { kind: "meter", id: 7 }), "{e}");
        assert!(!e.is_recoverable());
        assert_eq!(store.meter_key(7).unwrap(), Some(KEY));

        let gw = SigningKey::from_bytes(&[1u8; 32]).verifying_key();
        let other = SigningKey::from_bytes(&[2u8; 32]).verifying_key();
        assert_eq!(store.add_gateway(1, &gw).unwrap(), Registration::Created);
        assert_eq!(store.add_gateway(1, &gw).unwrap(), Registration::AlreadyRegistered);
        assert!(matches!(store.add_gateway(1, &other), Err(StoreError::Conflict { kind: "gateway", id: 1 })));
        assert_eq!(store.gateway_key(1).unwrap(), Some(gw));
        assert_eq!(store.gateway_key(2).unwrap(), None);
    }

    #[test]
    fn record_value_format_is_pinned() {
        let v = encode_value(7, 1_795_000_000_123, &[0xaa, 0xbb]).unwrap();
        assert_eq!(hex::encode(&v), "0107fbbcd9f29e3402aabb");
        let back = decode_value(&v).unwrap();
        assert_eq!(
            (back.gateway_id, back.received_ms, back.report),
            (7, 1_795_000_000_123, &[0xaa, 0xbb][..])
        );
        assert!(matches!(decode_value(&[2, 0]), Err(StoreError::Corrupt(_))));
        assert!(matches!(decode_value(&[]), Err(StoreError::Corrupt(_))));
        let mut trailing = v.clone();
        trailing.push(0);
        assert!(matches!(decode_value(&trailing), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn a_store_in_use_cannot_be_opened_twice() {
        let dir = tempfile::tempdir().unwrap();
        let _first = open(dir.path());
        // sled's lock is per process; a second open from the same process also fails on it.
        let e = Store::open(&dir.path().join("data"), crate::config::CACHE_CAPACITY_BYTES_MIN).unwrap_err();
        assert!(e.is_recoverable(), "{e}");
        assert!(e.to_string().starts_with("store at "), "{e}");
    }

    #[test]
    fn data_dir_is_created_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("a/b");
        let _s = open(&data);
        assert_eq!(std::fs::metadata(&data).unwrap().permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn a_data_dir_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        assert!(data_dir_mode_is_private(0o700));
        for open_mode in [0o750, 0o705, 0o701, 0o755, 0o710] {
            assert!(!data_dir_mode_is_private(open_mode), "{open_mode:o}");
        }
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o750)).unwrap();
        let e = Store::open(&data, crate::config::CACHE_CAPACITY_BYTES_MIN).unwrap_err();
        assert!(matches!(e, StoreError::DataDirTooOpen { mode: 0o750, .. }), "{e}");
        assert!(!e.is_recoverable());
        let text = e.to_string();
        assert!(text.contains(&data.display().to_string()) && text.contains("mode 750"), "{text}");
        assert!(!data.join(STORE_DIR_NAME).exists(), "nothing is created in a refused directory");
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        let _s = open(&data);
    }
}
