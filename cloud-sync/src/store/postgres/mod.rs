//! The PostgreSQL store: the same contract as the sled [`Store`](crate::store::sled::Store), shared
//! by any number of stateless endpoint processes.
//!
//! # Schema (see [`MIGRATIONS`](migrations::MIGRATIONS))
//!
//! | table         | key                                   | distribution (Citus)      |
//! | ------------- | ------------------------------------- | ------------------------- |
//! | `records`     | `(iccid, meter_id, epoch, seq)`       | distributed by `iccid`    |
//! | `record_ids`  | `(meter_id, epoch, seq)` → `iccid`    | distributed by `meter_id` |
//! | `meters`      | `meter_id` → HMAC key                 | reference table           |
//! | `gateways`    | `gateway_id` → Ed25519 public key     | reference table           |
//! | `api_tokens`  | `token_sha256` → name, role           | reference table           |
//! | `ledger_meta` | `name` → value (the ledger's zone)    | reference table           |
//! | `ledger_settled` | `(iccid, day)`                     | distributed by `iccid`    |
//! | `ledger_adjustments` | `(iccid, day, seq)`            | distributed by `iccid`    |
//! | `lago_planned` | `(iccid, meter_id, epoch, seq)` → export seq | distributed by `iccid` |
//! | `lago_outbox` | `(iccid, export_seq)` → event JSON    | distributed by `iccid`    |
//! | `lago_epoch_max` | `(meter_id, epoch)` → exported max | distributed by `meter_id` |
//! | `rollup_buckets` | `(iccid, bucket)` → up, down, records | distributed by `iccid`   |
//! | `rollup_faulty` | `(iccid, meter_id, epoch, seq)`      | distributed by `iccid`    |
//! | `epoch_tails` | `(meter_id, epoch)` → last seq, running max | distributed by `meter_id` |
//! | `rollup_meta` | `name` → value (rollups built)        | reference table           |
//!
//! The usage rollups are [`rollups`] (migration 5): usage is read from them, maintained in
//! the ingest transaction.
//!
//! The ledger and the Lago outbox are [`ledger`] and [`lago`] (migration 3); each states how
//! it stays correct with several endpoint processes on one database: settlement runs one at
//! a time under a transaction advisory lock, and one Lago exporter at a time is active under
//! a session advisory lock, primary keys refusing a second booking or plan either way.
//! `lago_epoch_max` is distributed by meter, not SIM, because an epoch's running maximum spans
//! the SIM swaps inside it.
//!
//! **Why two record tables.** Usage is read per SIM, so `records` is distributed by ICCID;
//! Citus requires every unique constraint of a distributed table to include its distribution
//! column, so its primary key is `(iccid, meter_id, epoch, seq)`. That key alone does not
//! deduplicate by record id: a meter may name another ICCID under the same record id (a
//! buggy or replayed device, or a SIM swap racing a report). `record_ids` is the record id's
//! own primary key, distributed by `meter_id` (which its key contains): a batch first claims
//! its ids there with `INSERT … ON CONFLICT DO NOTHING RETURNING`, then stores only the
//! claimed records. An id claimed before is a duplicate when the stored bytes are the same,
//! and a conflict otherwise (a different ICCID means different signed bytes, so a conflict
//! without even reading `records`). Both inserts run in one transaction, committed before
//! the reply, so the two tables cannot disagree.
//!
//! **Concurrency.** Two processes ingesting the same batch: the second one's claim waits on
//! the first one's uncommitted rows, then sees them committed (READ COMMITTED takes a new
//! snapshot per statement) and answers `duplicate`; if the first rolls back, the second
//! stores. Rows are claimed in key order, so two batches with overlapping ids lock in the same
//! order and cannot deadlock; a deadlock or serialization failure reported anyway is retried
//! ([`PG_TRANSACTION_ATTEMPTS_MAX`]).
//!
//! **Durability.** Every connection runs with `synchronous_commit = on`, whatever the server
//! default: a commit has returned only once its WAL is flushed, and the endpoint replies after
//! the commit.
//!
//! **Unsigned ids.** PostgreSQL has no unsigned 64-bit type. Meter ids, gateway ids, ICCIDs
//! and receive times are stored in `BIGINT` as the same 64 bits (two's complement), so every
//! value below 2^63 — all ICCIDs, which start with 89 — reads naturally in `psql`, and the
//! mapping is lossless both ways. Epochs and sequence numbers (u32) are plain `BIGINT`s.
//! Record id order (what usage derivation needs) is `ORDER BY (meter_id < 0), meter_id,
//! epoch, seq`: meter ids of 2^63 and above are the negative ones, after all the others.
//!
//! # Running on Citus
//!
//! The endpoint applies the migrations on the coordinator at start. Then, once, as a
//! superuser on the coordinator, [`CITUS_DISTRIBUTION_SQL`] (`store/postgres/citus.sql`, the one
//! copy of the statements): registry tables as reference tables, `records` by `iccid`,
//! `record_ids` by `meter_id`, the ledger and Lago tables co-located with them, billing by
//! `customer`.
//!
//! `schema_migrations` stays a local coordinator table. Every statement the store issues keeps
//! to what Citus runs: no foreign keys between distributed tables, no joins between the two
//! record tables (an ingest reads them in separate statements), multi-shard transactions for
//! the two inserts of a batch. The only join is the Lago planner's anti-join of `records`
//! with `lago_planned`, on the full key including `iccid`: co-located, so it runs shard by
//! shard. A settlement writes `ledger_meta` (a reference table) before its multi-shard
//! inserts, as Citus requires. Advisory locks are per node: every endpoint process must reach
//! the same coordinator.
//!
//! # Layout
//!
//! One file per feature, as on sled: `records`, `rollups`, `registry`, `ledger`, `billing`, `lago`; and
//! `migrations`, the schema of all of them, which this backend owns.

/// The statements that distribute the schema on Citus (see "Running on Citus"), run once by
/// an operator on the coordinator after the migrations.
pub const CITUS_DISTRIBUTION_SQL: &str = include_str!("citus.sql");

use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

pub mod billing;
pub mod lago;
pub mod ledger;
pub mod migrations;
pub mod records;
pub mod registry;
pub mod rollups;

use self::records::{for_each_meter, usage_record};
use self::registry::KeyCache;
use crate::store::StoreError;

/// Connections a pool opens at most when `store.postgres_pool_connections` is not given.
pub const PG_POOL_CONNECTIONS_DEFAULT: usize = 8;
/// Largest accepted pool: PostgreSQL's default `max_connections` is 100, shared by every
/// endpoint process.
pub const PG_POOL_CONNECTIONS_MAX: usize = 64;
/// How long a request waits for a free connection, or for a new one to open, before the
/// store answers "unavailable".
pub const PG_POOL_WAIT_S: u64 = 10;
/// How long opening one TCP connection may take.
pub const PG_CONNECT_TIMEOUT_S: u64 = 5;
/// Longest a single statement may run (PostgreSQL `statement_timeout`), in milliseconds: a
/// stuck query must not hold a pool connection forever.
pub const PG_STATEMENT_TIMEOUT_MS: u64 = 60_000;

/// Attempts of an ingest transaction that PostgreSQL aborted for a deadlock or a
/// serialization failure (both safe to retry from the start).
pub const PG_TRANSACTION_ATTEMPTS_MAX: u32 = 3;

/// Whether `url` is a connection string this store can use (libpq key/value or a
/// `postgresql://` URL), without connecting; the reason when it is not.
pub fn check_url(url: &str) -> Result<(), String> {
    url.parse::<tokio_postgres::Config>()
        .map(|_| ())
        .map_err(|e| format!("not a PostgreSQL connection string: {e}"))
}

/// The 64 bits of a u64 as an i64 (two's complement), for a `BIGINT` column.
pub fn u64_to_sql(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

/// The inverse of [`u64_to_sql`].
pub fn u64_from_sql(v: i64) -> u64 {
    u64::from_ne_bytes(v.to_ne_bytes())
}

fn u32_from_sql(column: &str, v: i64) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{column} {v} is outside u32")))
}

fn db_error(e: tokio_postgres::Error) -> StoreError {
    // Connection loss, resource exhaustion, shutdown, and aborted transactions go away by
    // themselves; a constraint or syntax error does not.
    // A lock wait past `lock_timeout` (55P03) is as transient: the holder finishes.
    let recoverable = match e.code() {
        None => true,
        Some(code) if *code == SqlState::LOCK_NOT_AVAILABLE => true,
        Some(code) => {
            let class = code.code().get(..2).unwrap_or("");
            matches!(class, "08" | "53" | "57" | "40" | "58")
        }
    };
    // The Display of a server error is only "db error": say what the server said.
    let message = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    };
    if recoverable {
        StoreError::DatabaseUnavailable(message)
    } else {
        StoreError::Database(message)
    }
}

fn pool_error(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => db_error(e),
        other => StoreError::DatabaseUnavailable(format!("connection pool: {other}")),
    }
}

fn is_retryable_abort(e: &tokio_postgres::Error) -> bool {
    matches!(e.code(), Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE)
}

/// A read-only REPEATABLE READ transaction: one snapshot for every statement in it (a
/// portal scan, or reads that must agree with each other).
async fn read_snapshot(
    client: &mut deadpool_postgres::Object,
) -> Result<deadpool_postgres::Transaction<'_>, StoreError> {
    client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(db_error)
}

/// The PostgreSQL store. Cheap to clone: clones share one pool and one key cache.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// The pool's connection settings, for the connections that must not come from the pool
    /// (one holding a session advisory lock).
    config: Arc<tokio_postgres::Config>,
    cache: Arc<Mutex<KeyCache>>,
    /// Unknown gateway ids and tokens (see [`crate::negcache`]).
    lookups: Arc<crate::negcache::LookupCaches>,
    /// Where it connects, without credentials, for logs and errors.
    target: Arc<str>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("target", &self.target).finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects with a libpq-style connection string (`host=127.0.0.1 user=postgres
    /// dbname=countersign`, or a `postgresql://` URL), opens a pool of at most
    /// `pool_connections`, and applies pending migrations.
    pub async fn connect(url: &str, pool_connections: usize) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e| StoreError::Database(format!("store.postgres_url: {e}")))?;
        let target = describe_target(&config);
        // Appended after the operator's own options, so these win: the reply promises
        // durability, and a stuck statement must not pin a connection.
        let forced = format!(
            "-c synchronous_commit=on -c statement_timeout={PG_STATEMENT_TIMEOUT_MS} -c lock_timeout={PG_STATEMENT_TIMEOUT_MS}"
        );
        let options = match config.get_options() {
            Some(o) if !o.trim().is_empty() => format!("{o} {forced}"),
            _ => forced,
        };
        config.options(&options);
        if config.get_application_name().is_none() {
            config.application_name("countersign-cloud");
        }
        config.connect_timeout(Duration::from_secs(PG_CONNECT_TIMEOUT_S));
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_connections.clamp(1, PG_POOL_CONNECTIONS_MAX))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(PG_POOL_WAIT_S)))
            .create_timeout(Some(Duration::from_secs(PG_POOL_WAIT_S)))
            .build()
            .map_err(|e| StoreError::Database(format!("connection pool: {e}")))?;
        let store = Self {
            pool,
            config: Arc::new(config),
            cache: Arc::default(),
            lookups: Arc::default(),
            target: target.into(),
        };
        store.migrate().await.map_err(|e| match e {
            StoreError::DatabaseUnavailable(m) => {
                StoreError::DatabaseUnavailable(format!("{}: {m}", store.target))
            }
            other => other,
        })?;
        // A database written before the rollups (migration 5) gets them now.
        store.ensure_rollups().await?;
        Ok(store)
    }

    /// The negative caches of gateway and token lookups ([`crate::StoreBackend`] consults
    /// them).
    pub(crate) fn lookup_caches(&self) -> &crate::negcache::LookupCaches {
        &self.lookups
    }

    /// A connection of its own, outside the pool, with the pool's settings: for a session
    /// advisory lock, which must end with the connection rather than go back to the pool.
    pub(crate) async fn dedicated_connection(&self) -> Result<tokio_postgres::Client, StoreError> {
        let (client, connection) = self.config.connect(NoTls).await.map_err(db_error)?;
        let target = self.target.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(target = %target, error = %e, "dedicated postgres connection ended");
            }
        });
        Ok(client)
    }
}

fn describe_target(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    format!(
        "postgres {} db {} user {}",
        hosts.join(","),
        config.get_dbname().unwrap_or("(default)"),
        config.get_user().unwrap_or("(default)")
    )
}

/// Throwaway databases for tests and benchmarks: `CREATE DATABASE cs_test_<random>` on the
/// server named by `COUNTERSIGN_PG_ADMIN_URL` (default [`testing::ADMIN_URL_DEFAULT`]),
/// dropped again when the handle drops.
pub mod testing {
    use rand_core::{OsRng, RngCore};

    /// Where test databases are created when `COUNTERSIGN_PG_ADMIN_URL` is not set: the local
    /// server, as user `postgres` (trust authentication on loopback, as `tests/run.sh` makes
    /// sure of).
    pub const ADMIN_URL_DEFAULT: &str = "host=127.0.0.1 port=5432 user=postgres dbname=postgres";
    /// The environment variable that overrides [`ADMIN_URL_DEFAULT`] (key=value form).
    pub const ADMIN_URL_ENV: &str = "COUNTERSIGN_PG_ADMIN_URL";

    /// Why a test database could not be made. Not recoverable here: start PostgreSQL (see
    /// `tests/run.sh`) or fix the admin URL.
    #[derive(Debug, thiserror::Error)]
    #[error("test database: {0}")]
    pub struct TestDbError(String);

    /// A freshly created, empty database; dropped (with its connections) on drop.
    #[derive(Debug)]
    pub struct TestDatabase {
        admin_url: String,
        name: String,
    }

    fn admin_url() -> String {
        std::env::var(ADMIN_URL_ENV).unwrap_or_else(|_| ADMIN_URL_DEFAULT.to_owned())
    }

    async fn admin_client(url: &str) -> Result<tokio_postgres::Client, TestDbError> {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(|e| TestDbError(format!("cannot connect with '{url}': {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "test admin connection ended");
            }
        });
        Ok(client)
    }

    impl TestDatabase {
        /// Creates `cs_test_<16 random hex digits>`.
        pub async fn create() -> Result<Self, TestDbError> {
            let admin_url = admin_url();
            let name = format!("cs_test_{:016x}", OsRng.next_u64());
            let client = admin_client(&admin_url).await?;
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .map_err(|e| TestDbError(format!("CREATE DATABASE {name}: {e}")))?;
            Ok(Self { admin_url, name })
        }

        /// The database's name.
        pub fn name(&self) -> &str {
            &self.name
        }

        /// A connection string for it (key=value form: the admin URL's, with `dbname`
        /// replaced, since the last value of a key wins).
        pub fn url(&self) -> String {
            format!("{} dbname={}", self.admin_url, self.name)
        }
    }

    impl Drop for TestDatabase {
        fn drop(&mut self) {
            let url = self.admin_url.clone();
            let name = self.name.clone();
            // Drop cannot await, and may run inside a runtime: drop from a thread of its own.
            let dropped = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
                rt.block_on(async {
                    let client = admin_client(&url).await.ok()?;
                    client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await.ok()
                })
            })
            .join();
            if !matches!(dropped, Ok(Some(()))) {
                eprintln!("test database {} was not dropped", self.name);
            }
        }
    }
}
