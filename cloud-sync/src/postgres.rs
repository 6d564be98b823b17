//! The PostgreSQL store: the same contract as the sled [`Store`](crate::store::Store), shared
//! by any number of stateless endpoint processes.
//!
//! # Schema (see [`MIGRATIONS`])
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
//! superuser on the coordinator, [`CITUS_DISTRIBUTION_SQL`] (`postgres/citus.sql`, the one
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

/// The statements that distribute the schema on Citus (see "Running on Citus"), run once by
/// an operator on the coordinator after the migrations.
pub const CITUS_DISTRIBUTION_SQL: &str = include_str!("postgres/citus.sql");

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use countersign_meter::{RecordId, Report, METER_KEY_BYTES};
use countersign_protocol::keys::PUBLIC_KEY_BYTES;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use ed25519_dalek::VerifyingKey;
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Row};

pub mod lago;
pub mod ledger;

use crate::store::{InsertOutcome, NewRecord, Registration, StoreError, StoredRecord};
use crate::usage::{derive_daily, derive_daily_in, Derived, TimeZone, UsageError, UsageRecord};

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
/// Rows fetched per round trip while streaming records for a usage query.
pub const PG_USAGE_FETCH_ROWS: i32 = 10_000;
/// Meter and gateway keys cached per process. Registrations are never overwritten, so a
/// cached key can never be stale; the bound only limits memory (about 100 bytes an entry).
pub const PG_KEY_CACHE_ENTRIES_MAX: usize = 262_144;
/// Key of the advisory lock held while migrations run (arbitrary, stable: "cntrsign").
pub const PG_MIGRATION_LOCK_KEY: i64 = 0x636e_7472_7369_676e;

/// One schema migration: applied once, in version order, recorded in `schema_migrations`.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// Strictly increasing from 1.
    pub version: i32,
    /// What it does, for `schema_migrations` and logs.
    pub name: &'static str,
    /// The DDL, run in the migration transaction.
    pub sql: &'static str,
}

/// The PostgreSQL tables of billing, applied as migration 4 (independent of every other
/// migration after 2: it creates only `billing_*` tables and references none).
pub const PG_BILLING_MIGRATION_SQL: &str = "
CREATE TABLE billing_wallets (
    customer TEXT PRIMARY KEY,
    currency TEXT NOT NULL,
    active_alerts TEXT[] NOT NULL DEFAULT '{}',
    alert_seq BIGINT NOT NULL DEFAULT 0 CHECK (alert_seq >= 0),
    usage_as_of_ms BIGINT
);
CREATE TABLE billing_debits (
    customer TEXT NOT NULL,
    grp TEXT NOT NULL,
    period_start DATE NOT NULL,
    period_end DATE NOT NULL CHECK (period_end > period_start),
    plan_id TEXT NOT NULL,
    debited_micros BIGINT NOT NULL,
    debits BIGINT NOT NULL CHECK (debits >= 0),
    updated_at_s BIGINT NOT NULL,
    PRIMARY KEY (customer, grp, period_start)
);
CREATE TABLE billing_topups (
    customer TEXT NOT NULL,
    topup_id TEXT NOT NULL,
    amount_micros BIGINT NOT NULL CHECK (amount_micros > 0),
    booked_at_s BIGINT NOT NULL,
    PRIMARY KEY (customer, topup_id)
);
CREATE TABLE billing_alerts (
    customer TEXT NOT NULL,
    seq BIGINT NOT NULL CHECK (seq >= 1),
    kind TEXT NOT NULL CHECK (kind IN ('threshold_crossed', 'overdrawn', 'overdraft_limit_exceeded')),
    threshold_micros BIGINT,
    balance_micros BIGINT NOT NULL,
    overdraft_limit_micros BIGINT,
    raised_at_s BIGINT NOT NULL,
    PRIMARY KEY (customer, seq)
);
";

/// The schema, version by version. Never edit an applied migration: add a new one.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "records, record ids, meters, gateways",
        sql: "
CREATE TABLE meters (
    meter_id BIGINT PRIMARY KEY,
    hmac_key BYTEA NOT NULL CHECK (octet_length(hmac_key) = 32),
    registered_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE gateways (
    gateway_id BIGINT PRIMARY KEY,
    public_key BYTEA NOT NULL CHECK (octet_length(public_key) = 32),
    registered_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE record_ids (
    meter_id BIGINT NOT NULL,
    epoch BIGINT NOT NULL CHECK (epoch BETWEEN 0 AND 4294967295),
    seq BIGINT NOT NULL CHECK (seq BETWEEN 0 AND 4294967295),
    iccid BIGINT NOT NULL,
    PRIMARY KEY (meter_id, epoch, seq)
);
CREATE TABLE records (
    iccid BIGINT NOT NULL,
    meter_id BIGINT NOT NULL,
    epoch BIGINT NOT NULL CHECK (epoch BETWEEN 0 AND 4294967295),
    seq BIGINT NOT NULL CHECK (seq BETWEEN 0 AND 4294967295),
    gateway_id BIGINT NOT NULL,
    received_ms BIGINT NOT NULL,
    report BYTEA NOT NULL,
    PRIMARY KEY (iccid, meter_id, epoch, seq)
);
",
    },
    Migration {
        version: 2,
        name: "api tokens",
        sql: "
CREATE TABLE api_tokens (
    token_sha256 BYTEA PRIMARY KEY CHECK (octet_length(token_sha256) = 32),
    name TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL CHECK (role IN ('query', 'admin')),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
",
    },
    Migration {
        version: 3,
        name: "settlement ledger, lago outbox",
        sql: "
CREATE TABLE ledger_meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE ledger_settled (
    iccid BIGINT NOT NULL,
    day DATE NOT NULL,
    up_bytes BIGINT NOT NULL,
    down_bytes BIGINT NOT NULL,
    settled_at_s BIGINT NOT NULL,
    PRIMARY KEY (iccid, day)
);
CREATE TABLE ledger_adjustments (
    iccid BIGINT NOT NULL,
    day DATE NOT NULL,
    seq BIGINT NOT NULL CHECK (seq BETWEEN 1 AND 4294967295),
    delta_up_bytes BIGINT NOT NULL,
    delta_down_bytes BIGINT NOT NULL,
    made_at_s BIGINT NOT NULL,
    PRIMARY KEY (iccid, day, seq)
);
CREATE TABLE lago_planned (
    iccid BIGINT NOT NULL,
    meter_id BIGINT NOT NULL,
    epoch BIGINT NOT NULL CHECK (epoch BETWEEN 0 AND 4294967295),
    seq BIGINT NOT NULL CHECK (seq BETWEEN 0 AND 4294967295),
    export_seq BIGINT NOT NULL CHECK (export_seq >= 0),
    PRIMARY KEY (iccid, meter_id, epoch, seq)
);
CREATE INDEX lago_planned_export_seq ON lago_planned (export_seq);
CREATE TABLE lago_outbox (
    iccid BIGINT NOT NULL,
    export_seq BIGINT NOT NULL CHECK (export_seq >= 0),
    event BYTEA NOT NULL,
    PRIMARY KEY (iccid, export_seq)
);
CREATE INDEX lago_outbox_export_seq ON lago_outbox (export_seq);
CREATE TABLE lago_epoch_max (
    meter_id BIGINT NOT NULL,
    epoch BIGINT NOT NULL CHECK (epoch BETWEEN 0 AND 4294967295),
    up_bytes BIGINT NOT NULL,
    down_bytes BIGINT NOT NULL,
    PRIMARY KEY (meter_id, epoch)
);
",
    },
    Migration {
        version: 4,
        name: "billing wallets, debits per period, top-ups, alerts",
        sql: PG_BILLING_MIGRATION_SQL,
    },
];

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

#[derive(Debug, Default)]
struct KeyCache {
    meters: HashMap<u64, [u8; METER_KEY_BYTES]>,
    gateways: HashMap<u64, VerifyingKey>,
}

impl KeyCache {
    fn insert_meter(&mut self, id: u64, key: [u8; METER_KEY_BYTES]) {
        if self.meters.len() >= PG_KEY_CACHE_ENTRIES_MAX {
            // Clearing is crude but bounded; keys are read again from the database.
            self.meters.clear();
        }
        self.meters.insert(id, key);
    }

    fn insert_gateway(&mut self, id: u64, key: VerifyingKey) {
        if self.gateways.len() >= PG_KEY_CACHE_ENTRIES_MAX {
            self.gateways.clear();
        }
        self.gateways.insert(id, key);
    }
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

/// A row to claim in `record_ids` and, if claimed, store in `records`.
struct Input<'a> {
    index: usize,
    record: &'a NewRecord,
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
        Ok(store)
    }

    /// Applies every migration not yet recorded in `schema_migrations`, under a transaction
    /// advisory lock so that processes starting together apply each exactly once.
    pub async fn migrate(&self) -> Result<Vec<i32>, StoreError> {
        let span = tracing::info_span!("migrate", target = %self.target);
        let _entered = span.enter();
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(db_error)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PG_MIGRATION_LOCK_KEY]).await.map_err(db_error)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version INTEGER PRIMARY KEY,
                name TEXT NOT NULL,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
            )",
        )
        .await
        .map_err(db_error)?;
        let applied: HashSet<i32> = tx
            .query("SELECT version FROM schema_migrations", &[])
            .await
            .map_err(db_error)?
            .iter()
            .map(|r| r.try_get::<_, i32>(0))
            .collect::<Result<_, _>>()
            .map_err(db_error)?;
        let known_max = MIGRATIONS.iter().map(|m| m.version).max().unwrap_or(0);
        if let Some(newer) = applied.iter().copied().filter(|v| *v > known_max).max() {
            return Err(StoreError::Migration {
                version: newer,
                reason: format!(
                    "the database has schema version {newer}; this binary knows up to {known_max}"
                ),
            });
        }
        let mut done = Vec::new();
        for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
            tx.batch_execute(m.sql)
                .await
                .map_err(|e| StoreError::Migration { version: m.version, reason: e.to_string() })?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                &[&m.version, &m.name],
            )
            .await
            .map_err(db_error)?;
            tracing::info!(version = m.version, name = m.name, "migration applied");
            done.push(m.version);
        }
        tx.commit().await.map_err(db_error)?;
        Ok(done)
    }

    /// Stores a batch's verified records in one transaction, committed (WAL flushed) before
    /// this returns. One outcome per input, in input order.
    pub async fn insert_batch(
        &self,
        gateway_id: u64,
        records: &[NewRecord],
    ) -> Result<Vec<InsertOutcome>, StoreError> {
        let mut attempt = 1u32;
        loop {
            match self.try_insert_batch(gateway_id, records).await {
                Err(Retry::Abort(e)) if attempt < PG_TRANSACTION_ATTEMPTS_MAX => {
                    tracing::warn!(attempt, error = %e, "ingest transaction aborted, retrying");
                    attempt = attempt.saturating_add(1);
                }
                Err(Retry::Abort(e)) => return Err(db_error(e)),
                Err(Retry::Fail(e)) => return Err(e),
                Ok(outcomes) => return Ok(outcomes),
            }
        }
    }

    async fn try_insert_batch(
        &self,
        gateway_id: u64,
        records: &[NewRecord],
    ) -> Result<Vec<InsertOutcome>, Retry> {
        let mut outcomes: Vec<Option<InsertOutcome>> = vec![None; records.len()];
        // The first copy of an id within the batch goes to the database; later copies are
        // settled after it against whatever is then stored, as sled does one by one.
        let mut first: HashMap<RecordId, usize> = HashMap::with_capacity(records.len());
        let mut repeats = Vec::new();
        let mut inputs = Vec::with_capacity(records.len());
        for (index, record) in records.iter().enumerate() {
            match first.get(&record.id) {
                Some(&i) => repeats.push((index, i)),
                None => {
                    first.insert(record.id, index);
                    inputs.push(Input { index, record });
                }
            }
        }
        // Key order, as PostgreSQL compares the BIGINTs: every transaction locks ids in the
        // same order, so overlapping batches cannot deadlock.
        inputs.sort_by_key(|i| (u64_to_sql(i.record.id.meter_id), i.record.id.epoch, i.record.id.seq));

        let mut client = self.pool.get().await.map_err(|e| Retry::Fail(pool_error(e)))?;
        let tx = client.transaction().await.map_err(Retry::from)?;
        let meter: Vec<i64> = inputs.iter().map(|i| u64_to_sql(i.record.id.meter_id)).collect();
        let epoch: Vec<i64> = inputs.iter().map(|i| i64::from(i.record.id.epoch)).collect();
        let seq: Vec<i64> = inputs.iter().map(|i| i64::from(i.record.id.seq)).collect();
        let iccid: Vec<i64> = inputs.iter().map(|i| u64_to_sql(i.record.iccid)).collect();
        let claim = tx
            .prepare_cached(
                "INSERT INTO record_ids (meter_id, epoch, seq, iccid)
                 SELECT * FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[])
                 ORDER BY 1, 2, 3
                 ON CONFLICT DO NOTHING
                 RETURNING meter_id, epoch, seq",
            )
            .await
            .map_err(Retry::from)?;
        let claimed_rows = tx.query(&claim, &[&meter, &epoch, &seq, &iccid]).await.map_err(Retry::from)?;
        let claimed = id_set(&claimed_rows).map_err(Retry::Fail)?;

        let (new, old): (Vec<&Input<'_>>, Vec<&Input<'_>>) =
            inputs.iter().partition(|i| claimed.contains(&i.record.id));
        if !new.is_empty() {
            let store = tx
                .prepare_cached(
                    "INSERT INTO records (iccid, meter_id, epoch, seq, gateway_id, received_ms, report)
                     SELECT u.iccid, u.meter_id, u.epoch, u.seq, $5, u.received_ms, u.report
                     FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[], $6::int8[], $7::bytea[])
                          AS u(iccid, meter_id, epoch, seq, received_ms, report)",
                )
                .await
                .map_err(Retry::from)?;
            let iccid: Vec<i64> = new.iter().map(|i| u64_to_sql(i.record.iccid)).collect();
            let meter: Vec<i64> = new.iter().map(|i| u64_to_sql(i.record.id.meter_id)).collect();
            let epoch: Vec<i64> = new.iter().map(|i| i64::from(i.record.id.epoch)).collect();
            let seq: Vec<i64> = new.iter().map(|i| i64::from(i.record.id.seq)).collect();
            let received: Vec<i64> = new.iter().map(|i| u64_to_sql(i.record.received_ms)).collect();
            let report: Vec<&[u8]> = new.iter().map(|i| &i.record.report[..]).collect();
            let n = tx
                .execute(&store, &[&iccid, &meter, &epoch, &seq, &u64_to_sql(gateway_id), &received, &report])
                .await
                .map_err(Retry::from)?;
            if usize::try_from(n).ok() != Some(new.len()) {
                return Err(Retry::Fail(StoreError::Corrupt(format!(
                    "stored {n} records for {} claimed ids",
                    new.len()
                ))));
            }
            for i in &new {
                outcomes[i.index] = Some(InsertOutcome::Stored);
            }
        }
        if !old.is_empty() {
            settle_claimed_before(&tx, &old, &mut outcomes).await?;
        }
        for (index, first_index) in repeats {
            let (Some(record), Some(first)) = (records.get(index), records.get(first_index)) else {
                continue;
            };
            let stored_is_first = matches!(
                outcomes.get(first_index),
                Some(Some(InsertOutcome::Stored | InsertOutcome::Duplicate))
            );
            let same = if stored_is_first {
                first.report == record.report
            } else {
                // The first copy conflicted: compare with what is stored (rare, one query).
                stored_report(&tx, record.id).await?.as_deref() == Some(&record.report[..])
            };
            outcomes[index] = Some(if same { InsertOutcome::Duplicate } else { InsertOutcome::Conflict });
        }
        tx.commit().await.map_err(Retry::from)?;
        outcomes
            .into_iter()
            .enumerate()
            .map(|(i, o)| {
                o.ok_or_else(|| {
                    Retry::Fail(StoreError::Corrupt(format!("record {i} of the batch was not settled")))
                })
            })
            .collect()
    }

    /// Keys of the given meters that are registered (cached after the first read).
    pub async fn meter_keys(&self, ids: &[u64]) -> Result<HashMap<u64, [u8; METER_KEY_BYTES]>, StoreError> {
        let mut found = HashMap::with_capacity(ids.len());
        let mut missing = Vec::new();
        {
            let cache = self.lock_cache();
            for id in ids {
                match cache.meters.get(id) {
                    Some(k) => {
                        found.insert(*id, *k);
                    }
                    None => missing.push(u64_to_sql(*id)),
                }
            }
        }
        if missing.is_empty() {
            return Ok(found);
        }
        let client = self.pool.get().await.map_err(pool_error)?;
        let stmt = client
            .prepare_cached("SELECT meter_id, hmac_key FROM meters WHERE meter_id = ANY($1)")
            .await
            .map_err(db_error)?;
        let rows = client.query(&stmt, &[&missing]).await.map_err(db_error)?;
        let mut cache = self.lock_cache();
        for row in rows {
            let id = u64_from_sql(row.try_get(0).map_err(db_error)?);
            let key = meter_key_of(id, row.try_get(1).map_err(db_error)?)?;
            cache.insert_meter(id, key);
            found.insert(id, key);
        }
        Ok(found)
    }

    /// The HMAC key of a meter, if registered.
    pub async fn meter_key(&self, meter_id: u64) -> Result<Option<[u8; METER_KEY_BYTES]>, StoreError> {
        Ok(self.meter_keys(&[meter_id]).await?.remove(&meter_id))
    }

    /// The negative caches of gateway and token lookups ([`crate::StoreBackend`] consults
    /// them).
    pub(crate) fn lookup_caches(&self) -> &crate::negcache::LookupCaches {
        &self.lookups
    }

    /// The public key of a gateway, if registered (cached after the first read).
    pub async fn gateway_key(&self, gateway_id: u64) -> Result<Option<VerifyingKey>, StoreError> {
        if let Some(k) = self.lock_cache().gateways.get(&gateway_id) {
            return Ok(Some(*k));
        }
        self.lookups.gateway_store_lookup();
        let client = self.pool.get().await.map_err(pool_error)?;
        let stmt = client
            .prepare_cached("SELECT public_key FROM gateways WHERE gateway_id = $1")
            .await
            .map_err(db_error)?;
        let Some(row) = client.query_opt(&stmt, &[&u64_to_sql(gateway_id)]).await.map_err(db_error)? else {
            return Ok(None);
        };
        let bytes: &[u8] = row.try_get(0).map_err(db_error)?;
        let bytes = <[u8; PUBLIC_KEY_BYTES]>::try_from(bytes).map_err(|_| {
            StoreError::Corrupt(format!("gateway {gateway_id}: key is {} bytes", bytes.len()))
        })?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| StoreError::Corrupt(format!("gateway {gateway_id}: key is not an Ed25519 point")))?;
        self.lock_cache().insert_gateway(gateway_id, key);
        Ok(Some(key))
    }

    /// Registers a meter's HMAC key; committed when this returns. Idempotent for the same
    /// key, never overwritten.
    pub async fn add_meter(
        &self,
        meter_id: u64,
        key: &[u8; METER_KEY_BYTES],
    ) -> Result<Registration, StoreError> {
        self.register(
            "INSERT INTO meters (meter_id, hmac_key) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            "SELECT hmac_key FROM meters WHERE meter_id = $1",
            "meter",
            meter_id,
            key,
        )
        .await
    }

    /// Registers a gateway's public key; committed when this returns. Idempotent for the
    /// same key, never overwritten.
    pub async fn add_gateway(&self, gateway_id: u64, key: &VerifyingKey) -> Result<Registration, StoreError> {
        self.register(
            "INSERT INTO gateways (gateway_id, public_key) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            "SELECT public_key FROM gateways WHERE gateway_id = $1",
            "gateway",
            gateway_id,
            key.as_bytes(),
        )
        .await
    }

    async fn register(
        &self,
        insert: &str,
        select: &str,
        kind: &'static str,
        id: u64,
        key: &[u8; 32],
    ) -> Result<Registration, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let sql_id = u64_to_sql(id);
        let n = client.execute(insert, &[&sql_id, &&key[..]]).await.map_err(db_error)?;
        if n == 1 {
            return Ok(Registration::Created);
        }
        let row = client.query_one(select, &[&sql_id]).await.map_err(db_error)?;
        let current: &[u8] = row.try_get(0).map_err(db_error)?;
        if current == &key[..] {
            Ok(Registration::AlreadyRegistered)
        } else {
            Err(StoreError::Conflict { kind, id })
        }
    }

    /// The stored record with this id.
    pub async fn record(&self, id: RecordId) -> Result<Option<StoredRecord>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let key: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&u64_to_sql(id.meter_id), &i64::from(id.epoch), &i64::from(id.seq)];
        let Some(claim) = client
            .query_opt("SELECT iccid FROM record_ids WHERE meter_id = $1 AND epoch = $2 AND seq = $3", &key)
            .await
            .map_err(db_error)?
        else {
            return Ok(None);
        };
        let iccid: i64 = claim.try_get(0).map_err(db_error)?;
        let row = client
            .query_opt(
                "SELECT gateway_id, received_ms, report FROM records
                 WHERE iccid = $4 AND meter_id = $1 AND epoch = $2 AND seq = $3",
                &[key[0], key[1], key[2], &iccid],
            )
            .await
            .map_err(db_error)?
            .ok_or_else(|| StoreError::Corrupt(format!("record {id}: claimed but not stored")))?;
        Ok(Some(StoredRecord {
            gateway_id: u64_from_sql(row.try_get(0).map_err(db_error)?),
            received_ms: u64_from_sql(row.try_get(1).map_err(db_error)?),
            report: row.try_get(2).map_err(db_error)?,
        }))
    }

    /// Number of stored records (a `count(*)`: for tests and tools, not request paths).
    pub async fn record_count(&self) -> Result<u64, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let row = client.query_one("SELECT count(*) FROM records", &[]).await.map_err(db_error)?;
        let n: i64 = row.try_get(0).map_err(db_error)?;
        u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("record count {n}")))
    }

    /// Bytes per (ICCID, UTC day), derived with [`derive_daily`] from the stored reports in
    /// record id order. With `iccid`, only the meters that ever reported that SIM are read
    /// (all of their records: an epoch's running maximum may span a SIM swap), and only that
    /// SIM's days are returned.
    ///
    /// Streams the records meter by meter, so memory is bounded by the largest meter's
    /// history, not by the table.
    pub async fn daily_usage(&self, iccid: Option<u64>) -> Result<Derived, StoreError> {
        self.derive(iccid, derive_daily).await
    }

    /// Bytes per (ICCID, day in `tz`), derived with [`derive_daily_in`] exactly as
    /// [`PgStore::daily_usage`] derives UTC days (same streaming, same per-SIM filter).
    pub async fn daily_usage_in(&self, iccid: Option<u64>, tz: &TimeZone) -> Result<Derived, StoreError> {
        self.derive(iccid, |records| derive_daily_in(records, tz)).await
    }

    async fn derive(
        &self,
        iccid: Option<u64>,
        derive: impl Fn(Vec<UsageRecord>) -> Result<Derived, UsageError>,
    ) -> Result<Derived, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        // A portal needs a transaction; REPEATABLE READ gives the whole scan one snapshot.
        let tx = read_snapshot(&mut client).await?;
        let mut total = Derived::default();
        for_each_meter(&tx, iccid, |meter| {
            total.absorb(derive(meter)?);
            Ok(())
        })
        .await?;
        tx.commit().await.map_err(db_error)?;
        if let Some(sim) = iccid {
            total.retain_sim(sim);
        }
        Ok(total)
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

    /// Stores an API token's SHA-256 under a unique name; committed when this returns.
    pub async fn add_token(
        &self,
        name: &str,
        role: &str,
        sha256: &[u8; 32],
    ) -> Result<Registration, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let n = client
            .execute(
                "INSERT INTO api_tokens (token_sha256, name, role) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&&sha256[..], &name, &role],
            )
            .await
            .map_err(db_error)?;
        if n == 1 {
            return Ok(Registration::Created);
        }
        let row = client
            .query_opt("SELECT name, role FROM api_tokens WHERE token_sha256 = $1", &[&&sha256[..]])
            .await
            .map_err(db_error)?;
        match row {
            Some(r)
                if r.try_get::<_, &str>(0).map_err(db_error)? == name
                    && r.try_get::<_, &str>(1).map_err(db_error)? == role =>
            {
                Ok(Registration::AlreadyRegistered)
            }
            _ => Err(StoreError::TokenConflict { name: name.to_owned() }),
        }
    }

    /// The name and role of the token with this SHA-256, if any.
    pub async fn token(&self, sha256: &[u8; 32]) -> Result<Option<(String, String)>, StoreError> {
        self.lookups.token_store_lookup();
        let client = self.pool.get().await.map_err(pool_error)?;
        let stmt = client
            .prepare_cached("SELECT name, role FROM api_tokens WHERE token_sha256 = $1")
            .await
            .map_err(db_error)?;
        let Some(row) = client.query_opt(&stmt, &[&&sha256[..]]).await.map_err(db_error)? else {
            return Ok(None);
        };
        Ok(Some((row.try_get(0).map_err(db_error)?, row.try_get(1).map_err(db_error)?)))
    }

    /// Removes the token named `name`; whether one was there.
    pub async fn revoke_token(&self, name: &str) -> Result<bool, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let n = client.execute("DELETE FROM api_tokens WHERE name = $1", &[&name]).await.map_err(db_error)?;
        Ok(n > 0)
    }

    /// Names and roles of every token, by name.
    pub async fn tokens(&self) -> Result<Vec<(String, String)>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let rows =
            client.query("SELECT name, role FROM api_tokens ORDER BY name", &[]).await.map_err(db_error)?;
        rows.iter().map(|r| Ok((r.try_get(0).map_err(db_error)?, r.try_get(1).map_err(db_error)?))).collect()
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, KeyCache> {
        // A panic while holding the lock leaves only a cache behind; its content is still
        // valid (entries are inserted whole), so keep using it.
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

enum Retry {
    /// Aborted by PostgreSQL for a deadlock or serialization failure: run it again.
    Abort(tokio_postgres::Error),
    /// Anything else.
    Fail(StoreError),
}

impl From<tokio_postgres::Error> for Retry {
    fn from(e: tokio_postgres::Error) -> Self {
        if is_retryable_abort(&e) {
            Retry::Abort(e)
        } else {
            Retry::Fail(db_error(e))
        }
    }
}

/// Settles ids another batch claimed before: same ICCID and same bytes is a duplicate;
/// anything else a conflict.
async fn settle_claimed_before(
    tx: &deadpool_postgres::Transaction<'_>,
    old: &[&Input<'_>],
    outcomes: &mut [Option<InsertOutcome>],
) -> Result<(), Retry> {
    let meter: Vec<i64> = old.iter().map(|i| u64_to_sql(i.record.id.meter_id)).collect();
    let epoch: Vec<i64> = old.iter().map(|i| i64::from(i.record.id.epoch)).collect();
    let seq: Vec<i64> = old.iter().map(|i| i64::from(i.record.id.seq)).collect();
    let claims = tx
        .prepare_cached(
            "SELECT meter_id, epoch, seq, iccid FROM record_ids
             WHERE (meter_id, epoch, seq) IN (SELECT * FROM unnest($1::int8[], $2::int8[], $3::int8[]))",
        )
        .await
        .map_err(Retry::from)?;
    let mut claimed_iccid = HashMap::with_capacity(old.len());
    for row in tx.query(&claims, &[&meter, &epoch, &seq]).await.map_err(Retry::from)? {
        let id = row_id(&row).map_err(Retry::Fail)?;
        claimed_iccid.insert(id, u64_from_sql(row.try_get(3).map_err(Retry::from)?));
    }
    let mut same_sim = Vec::with_capacity(old.len());
    for i in old {
        match claimed_iccid.get(&i.record.id) {
            None => {
                return Err(Retry::Fail(StoreError::Corrupt(format!(
                    "record {}: insert refused but no claim present",
                    i.record.id
                ))))
            }
            // The ICCID is inside the signed bytes: another ICCID is another report.
            Some(&sim) if sim != i.record.iccid => outcomes[i.index] = Some(InsertOutcome::Conflict),
            Some(_) => same_sim.push(*i),
        }
    }
    if same_sim.is_empty() {
        return Ok(());
    }
    let iccid: Vec<i64> = same_sim.iter().map(|i| u64_to_sql(i.record.iccid)).collect();
    let meter: Vec<i64> = same_sim.iter().map(|i| u64_to_sql(i.record.id.meter_id)).collect();
    let epoch: Vec<i64> = same_sim.iter().map(|i| i64::from(i.record.id.epoch)).collect();
    let seq: Vec<i64> = same_sim.iter().map(|i| i64::from(i.record.id.seq)).collect();
    let stored = tx
        .prepare_cached(
            "SELECT meter_id, epoch, seq, report FROM records
             WHERE (iccid, meter_id, epoch, seq) IN
                   (SELECT * FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[]))",
        )
        .await
        .map_err(Retry::from)?;
    let mut reports: HashMap<RecordId, Vec<u8>> = HashMap::with_capacity(same_sim.len());
    for row in tx.query(&stored, &[&iccid, &meter, &epoch, &seq]).await.map_err(Retry::from)? {
        reports.insert(row_id(&row).map_err(Retry::Fail)?, row.try_get(3).map_err(Retry::from)?);
    }
    for i in same_sim {
        let Some(bytes) = reports.get(&i.record.id) else {
            return Err(Retry::Fail(StoreError::Corrupt(format!(
                "record {}: claimed but not stored",
                i.record.id
            ))));
        };
        outcomes[i.index] = Some(if bytes[..] == i.record.report[..] {
            InsertOutcome::Duplicate
        } else {
            InsertOutcome::Conflict
        });
    }
    Ok(())
}

/// The stored bytes of a record id, read inside the ingest transaction.
async fn stored_report(
    tx: &deadpool_postgres::Transaction<'_>,
    id: RecordId,
) -> Result<Option<Vec<u8>>, Retry> {
    let key: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
        [&u64_to_sql(id.meter_id), &i64::from(id.epoch), &i64::from(id.seq)];
    let Some(claim) = tx
        .query_opt("SELECT iccid FROM record_ids WHERE meter_id = $1 AND epoch = $2 AND seq = $3", &key)
        .await
        .map_err(Retry::from)?
    else {
        return Ok(None);
    };
    let iccid: i64 = claim.try_get(0).map_err(Retry::from)?;
    let row = tx
        .query_opt(
            "SELECT report FROM records WHERE iccid = $4 AND meter_id = $1 AND epoch = $2 AND seq = $3",
            &[key[0], key[1], key[2], &iccid],
        )
        .await
        .map_err(Retry::from)?;
    row.map(|r| r.try_get(0)).transpose().map_err(Retry::from)
}

fn row_id(row: &Row) -> Result<RecordId, StoreError> {
    let sql = |e| db_error(e);
    Ok(RecordId {
        meter_id: u64_from_sql(row.try_get(0).map_err(sql)?),
        epoch: u32_from_sql("epoch", row.try_get(1).map_err(sql)?)?,
        seq: u32_from_sql("seq", row.try_get(2).map_err(sql)?)?,
    })
}

fn id_set(rows: &[Row]) -> Result<HashSet<RecordId>, StoreError> {
    rows.iter().map(row_id).collect()
}

fn meter_key_of(id: u64, bytes: &[u8]) -> Result<[u8; METER_KEY_BYTES], StoreError> {
    <[u8; METER_KEY_BYTES]>::try_from(bytes)
        .map_err(|_| StoreError::Corrupt(format!("meter {id}: key is {} bytes", bytes.len())))
}

fn usage_record(row: &Row) -> Result<UsageRecord, StoreError> {
    let id = row_id(row)?;
    let received_ms = u64_from_sql(row.try_get(3).map_err(db_error)?);
    let bytes: &[u8] = row.try_get(4).map_err(db_error)?;
    // Verified on ingest, so only decoding is needed; the tag stays in the bytes as evidence.
    let (report, _) = Report::decode(bytes)
        .map_err(|e| StoreError::Corrupt(format!("record {id}: stored report does not decode: {e}")))?;
    if report.id() != id {
        return Err(StoreError::Corrupt(format!(
            "record {id}: stored under the id of report {}",
            report.id()
        )));
    }
    Ok(UsageRecord::from_report(&report, received_ms))
}

/// Streams the stored records in record id order to `each_meter`, one meter's records at a
/// time (the unit the derivation needs: an epoch never spans meters), inside `tx` (whose
/// isolation decides the snapshot). With `iccid`, only the meters that ever named that SIM,
/// all of their records. Memory: one fetch plus the largest meter's history.
async fn for_each_meter(
    tx: &tokio_postgres::Transaction<'_>,
    iccid: Option<u64>,
    mut each_meter: impl FnMut(Vec<UsageRecord>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let select = "SELECT meter_id, epoch, seq, received_ms, report FROM records";
    let order = "ORDER BY (meter_id < 0), meter_id, epoch, seq";
    let portal = match iccid {
        None => tx.bind(&format!("{select} {order}"), &[]).await,
        Some(sim) => {
            tx.bind(
                &format!(
                    "{select} WHERE meter_id IN (SELECT DISTINCT meter_id FROM records WHERE iccid = $1) {order}"
                ),
                &[&u64_to_sql(sim)],
            )
            .await
        }
    }
    .map_err(db_error)?;
    let mut meter: Vec<UsageRecord> = Vec::new();
    loop {
        let rows = tx.query_portal(&portal, PG_USAGE_FETCH_ROWS).await.map_err(db_error)?;
        let done = rows.is_empty();
        for row in &rows {
            let r = usage_record(row)?;
            if meter.last().is_some_and(|last| last.id.meter_id != r.id.meter_id) {
                each_meter(std::mem::take(&mut meter))?;
            }
            meter.push(r);
        }
        if done {
            break;
        }
    }
    if !meter.is_empty() {
        each_meter(meter)?;
    }
    Ok(())
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

// Access for the billing tables (`billing_store.rs`), kept apart from the core store above
// so that the two can change independently.
impl PgStore {
    /// The connection pool, for modules that own tables of their own.
    pub(crate) fn billing_pool(&self) -> &Pool {
        &self.pool
    }
}

/// [`db_error`] for the billing tables.
pub(crate) fn billing_db_error(e: tokio_postgres::Error) -> StoreError {
    db_error(e)
}

/// [`pool_error`] for the billing tables.
pub(crate) fn billing_pool_error(e: PoolError) -> StoreError {
    pool_error(e)
}

/// A read-only REPEATABLE READ transaction: one snapshot for every statement in it (a
/// portal scan, or reads that must agree with each other).
pub(crate) async fn read_snapshot(
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

/// [`for_each_meter`] for the billing store, inside its own snapshot.
pub(crate) async fn billing_for_each_meter(
    tx: &tokio_postgres::Transaction<'_>,
    iccid: Option<u64>,
    each_meter: impl FnMut(Vec<UsageRecord>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    for_each_meter(tx, iccid, each_meter).await
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every table a migration creates is distributed or referenced exactly once by the Citus
    /// statements, so the one copy of them cannot fall behind the schema.
    #[test]
    fn citus_statements_cover_every_table_once() {
        let mut tables = Vec::new();
        for m in MIGRATIONS {
            for part in m.sql.split("CREATE TABLE ").skip(1) {
                let name: String =
                    part.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                tables.push(name);
            }
        }
        assert!(tables.len() >= 15, "{tables:?}");
        for t in &tables {
            let needle = format!("_table('{t}'");
            assert_eq!(CITUS_DISTRIBUTION_SQL.matches(&needle).count(), 1, "{t} in citus.sql");
        }
        assert_eq!(
            CITUS_DISTRIBUTION_SQL.matches("_table('").count(),
            tables.len(),
            "no table citus.sql names is missing from the migrations"
        );
    }
}
