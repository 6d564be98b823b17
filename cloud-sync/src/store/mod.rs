//! The store boundary: everything the endpoint keeps, behind one contract, on either of two
//! backends.
//!
//! - This module: the contract types ([`StoreError`], [`NewRecord`], [`InsertOutcome`],
//!   [`Registration`], [`StoredRecord`]), [`StoreKind`] (which backend, validated by the
//!   configuration), [`StoreBackend`] (whichever backend runs, every method async) and
//!   `blocking`, the one way async code runs sled work.
//! - One file per feature, the same on both backends: `records` (verified reports and the
//!   usage derived from them), `registry` (meter and gateway keys, API tokens), `ledger`
//!   (settled SIM-days), `billing` (wallets, debits, top-ups, alerts), `lago` (the Lago
//!   outbox). Each holds that feature's contract and its dispatch to the two backends.
//! - [`sled`] and [`postgres`]: the backends, each a folder with those same files. The
//!   PostgreSQL backend owns the schema migrations of every feature.
//!
//! # Invariants
//!
//! - **Only `store/` knows sled or SQL.** Nothing outside this folder names a tree, a table or
//!   a statement; callers see records, keys, ledger days and wallet books.
//! - **The store decides nothing.** What to book, debit or export is decided by the rating core
//!   (`countersign-rating`); the store reads the state a decision needs and writes its outcome
//!   atomically.
//! - **The store does not know the configuration file, HTTP or the services above it.**
//!   It depends on the rating core's types and on `negcache` (its lookup caches) only.
//! - **Both backends keep the same contract**: a record id is stored at most once, a second
//!   copy with the same bytes is a duplicate and with other bytes a conflict, registrations
//!   are idempotent and never overwritten, and a batch's records are durable when
//!   [`StoreBackend::insert_batch`] returns.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use countersign_rating::usage::UsageError;

use crate::negcache::{LookupCaches, LookupStats};

pub mod billing;
pub mod lago;
pub mod ledger;
pub mod postgres;
pub mod records;
pub mod registry;
pub mod rollups;
pub mod sled;

pub use self::postgres::PgStore;
pub use self::sled::Store;
/// The batch check (rating core) makes these; the store takes and answers them.
pub use countersign_rating::batch::{InsertOutcome, NewRecord};

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
        source: ::sled::Error,
    },
    /// Reading or writing failed (disk full, I/O error). Recoverable: retry once the fault
    /// clears; nothing unflushed was acknowledged.
    #[error("store unavailable: {0}")]
    Unavailable(::sled::Error),
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
    /// Concurrent writes to the same records kept invalidating each other's plans.
    /// Recoverable: retry the batch.
    #[error("store contended: {what} were written concurrently; retry")]
    Contended {
        /// What was contended.
        what: &'static str,
    },
    /// This store does not do what was asked. Not recoverable by retrying.
    #[error("not supported: {what}")]
    Unsupported {
        /// What is not supported.
        what: &'static str,
    },
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
            StoreError::Open { .. }
                | StoreError::Unavailable(_)
                | StoreError::DatabaseUnavailable(_)
                | StoreError::Contended { .. }
        )
    }
}

impl From<::sled::Error> for StoreError {
    fn from(e: ::sled::Error) -> Self {
        match e {
            ::sled::Error::Corruption { .. } => StoreError::Corrupt(e.to_string()),
            other => StoreError::Unavailable(other),
        }
    }
}

/// Most API tokens a store holds: each request may look one up, and the sled store finds
/// names by walking them.
pub const API_TOKENS_MAX: usize = 1024;

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

/// Which store the endpoint runs on.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// The embedded sled store in `data_dir/sled`.
    Sled,
    /// A PostgreSQL database shared by any number of endpoint processes.
    Postgres {
        /// libpq-style connection string.
        url: String,
        /// Connections this process opens at most.
        pool_connections: usize,
    },
}

impl std::fmt::Debug for StoreKind {
    // The connection string may hold a password: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreKind::Sled => f.write_str("Sled"),
            StoreKind::Postgres { pool_connections, .. } => f
                .debug_struct("Postgres")
                .field("url", &"..")
                .field("pool_connections", pool_connections)
                .finish(),
        }
    }
}

/// One of the two stores. Cheap to clone: clones share the underlying store.
#[derive(Clone, Debug)]
pub enum StoreBackend {
    /// The embedded sled store (one process).
    Sled(Store),
    /// The PostgreSQL store (any number of processes).
    Postgres(PgStore),
}

impl StoreBackend {
    /// Opens the store `kind` selects: sled in `data_dir` with a page cache of
    /// `cache_capacity_bytes`, or PostgreSQL, applying its migrations.
    pub async fn open(
        kind: &StoreKind,
        data_dir: &Path,
        cache_capacity_bytes: u64,
    ) -> Result<Self, StoreError> {
        match kind {
            StoreKind::Sled => {
                let dir = data_dir.to_owned();
                Ok(Self::Sled(blocking(move || Store::open(&dir, cache_capacity_bytes)).await?))
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
