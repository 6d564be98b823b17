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
//!
//! One file per feature beside this one, as on PostgreSQL: `records`, `registry`, `ledger`,
//! `billing`, `lago`; each opens its own trees in this database.

use std::path::Path;

use super::StoreError;

pub mod billing;
pub mod lago;
pub mod ledger;
pub mod records;
pub mod registry;
pub mod rollups;

/// Name of the sled directory inside the configured `data_dir`.
pub const STORE_DIR_NAME: &str = "sled";

const RECORDS_TREE: &str = "records";
const METERS_TREE: &str = "meters";
const GATEWAYS_TREE: &str = "gateways";
const TOKENS_TREE: &str = "api_tokens";
const ROLLUP_DAYS_TREE: &str = "rollup_days";
const ROLLUP_FAULTY_TREE: &str = "rollup_faulty";
const ROLLUP_META_TREE: &str = "rollup_meta";
const ROLLUP_CHANGED_TREE: &str = "rollup_changed";
const LAGO_PENDING_TREE: &str = "lago_pending";

/// The endpoint's store. Cheap to clone: clones share one `sled::Db`.
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    records: sled::Tree,
    meters: sled::Tree,
    gateways: sled::Tree,
    tokens: sled::Tree,
    rollup_days: sled::Tree,
    rollup_faulty: sled::Tree,
    rollup_meta: sled::Tree,
    rollup_changed: sled::Tree,
    /// Records the Lago planner has not planned yet (see [`lago`]); written by ingest while
    /// `lago_pending_on`.
    lago_pending: sled::Tree,
    /// Whether ingest queues new records for the Lago planner; changed only under
    /// `settle_gate`'s write lock.
    lago_pending_on: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Changes to buckets before this one are marked in `rollup_changed` for the settlement
    /// ledger (see [`rollups`]); 0 until the ledger has closed a day. Raised only under
    /// `settle_gate`'s write lock.
    changes_before_bucket: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Held (read) by every rollup commit across reading `changes_before_bucket` and
    /// committing, and (write) by a settlement run while it raises the mark: so once it is
    /// raised, every commit either is visible to the run's reads or marks what it changed.
    settle_gate: std::sync::Arc<std::sync::RwLock<()>>,
    /// What the store remembers of each meter between batches, shared by clones (see
    /// [`rollups`]).
    meter_state: std::sync::Arc<rollups::Meters>,
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
        let rollup_days = db.open_tree(ROLLUP_DAYS_TREE).map_err(open_err)?;
        let rollup_faulty = db.open_tree(ROLLUP_FAULTY_TREE).map_err(open_err)?;
        let rollup_meta = db.open_tree(ROLLUP_META_TREE).map_err(open_err)?;
        let rollup_changed = db.open_tree(ROLLUP_CHANGED_TREE).map_err(open_err)?;
        let lago_pending = db.open_tree(LAGO_PENDING_TREE).map_err(open_err)?;
        let pending_on = lago::pending_state(&rollup_meta)?.is_some();
        let changes_before = rollups::stored_changes_before(&rollup_meta)?;
        let store = Self {
            db,
            records,
            meters,
            gateways,
            tokens,
            rollup_days,
            rollup_faulty,
            rollup_meta,
            rollup_changed,
            lago_pending,
            lago_pending_on: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(pending_on)),
            changes_before_bucket: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(changes_before)),
            settle_gate: Default::default(),
            meter_state: Default::default(),
            token_lock: Default::default(),
            ledger_lock: Default::default(),
            lookups: Default::default(),
        };
        store.ensure_rollups()?;
        Ok(store)
    }

    /// Blocks until everything written so far is on disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// The negative caches of gateway and token lookups ([`StoreBackend`](crate::StoreBackend)
    /// consults them).
    pub(crate) fn lookup_caches(&self) -> &crate::negcache::LookupCaches {
        &self.lookups
    }

    /// The sled database, for multi-tree transactions of the modules that own extra trees.
    pub(crate) fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Held for a whole settlement run (see [`crate::store::ledger`]).
    pub(crate) fn ledger_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // A run that panicked wrote nothing or whole entries: the ledger is still valid.
        self.ledger_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
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
    use crate::store::{InsertOutcome, Registration, StoredRecord};
    use countersign_meter::{RecordId, Totals};
    use countersign_testkit::report::{network_time, ReportBuilder};
    use ed25519_dalek::SigningKey;

    const KEY: [u8; 32] = [5u8; 32];
    const SIM: u64 = 8_988_280_666_000_000_007;

    fn report(seq: u32, up: u64) -> (RecordId, Vec<u8>) {
        let r = ReportBuilder::new(3, seq, SIM, network_time(1_795_521_600)).used(up, 2 * up);
        (r.id(), r.encode(&KEY))
    }

    fn open(dir: &Path) -> Store {
        Store::open(&dir.join("data"), crate::config::CACHE_CAPACITY_BYTES_MIN).unwrap()
    }

    #[test]
    fn insert_dedupes_and_refuses_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (id, bytes) = report(0, 100);
        assert_eq!(store.insert_one(1, 10, &bytes).unwrap(), InsertOutcome::Stored);
        // The same bytes via another gateway or at another time: still the same record.
        assert_eq!(store.insert_one(2, 20, &bytes).unwrap(), InsertOutcome::Duplicate);
        let (_, other) = report(0, 999);
        assert_eq!(store.insert_one(1, 10, &other).unwrap(), InsertOutcome::Conflict);
        // The first copy is kept, as evidence.
        let kept = store.record(id).unwrap().unwrap();
        assert_eq!(kept, StoredRecord { gateway_id: 1, received_ms: 10, report: bytes });
        assert_eq!(store.record_count(), 1);
    }

    /// Opens the store again after a handle was dropped: sled's flusher thread may hold the
    /// directory lock for a moment after the drop.
    fn reopen(dir: &Path) -> Store {
        for _ in 0..100 {
            match Store::open(&dir.join("data"), crate::config::CACHE_CAPACITY_BYTES_MIN) {
                Ok(s) => return s,
                Err(StoreError::Open { .. }) => std::thread::sleep(std::time::Duration::from_millis(20)),
                Err(e) => panic!("{e}"),
            }
        }
        open(dir)
    }

    #[test]
    fn records_survive_reopen_and_derive_usage() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            for (seq, up) in [(0, 0), (2, 300), (1, 100)] {
                let (_, bytes) = report(seq, up);
                store.insert_one(1, 0, &bytes).unwrap();
            }
            store.flush().unwrap();
        }
        let store = reopen(dir.path());
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
