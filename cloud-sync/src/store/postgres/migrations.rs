//! The PostgreSQL schema of every feature, version by version: applied once each, in
//! order, under an advisory lock, at connect. The backend owns every migration, the billing
//! tables' too, so that no feature module reaches into another to build the schema.

use std::collections::HashSet;

use super::{db_error, pool_error, PgStore};
use crate::store::StoreError;

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
    Migration {
        version: 5,
        name: "usage rollups: running maxima, buckets, faulty records, epoch tails",
        sql: PG_ROLLUP_MIGRATION_SQL,
    },
    Migration {
        version: 6,
        name: "usage rollups: SIMs by UTC day, for paged reads of every SIM",
        sql: PG_ROLLUP_DAY_INDEX_SQL,
    },
    Migration {
        version: 7,
        name: "settlement: SIM-days changed after they closed, for incremental runs",
        sql: PG_ROLLUP_CHANGED_SQL,
    },
    Migration {
        version: 8,
        name: "settlement ledger: SIMs by day, for paged reads of every SIM",
        sql: "CREATE INDEX ledger_settled_day_iccid ON ledger_settled (day, iccid);",
    },
    Migration {
        version: 9,
        name: "lago: the queue of records not planned yet",
        sql: "CREATE TABLE lago_pending (
    iccid BIGINT NOT NULL,
    meter_id BIGINT NOT NULL,
    epoch BIGINT NOT NULL CHECK (epoch BETWEEN 0 AND 4294967295),
    seq BIGINT NOT NULL CHECK (seq BETWEEN 0 AND 4294967295),
    PRIMARY KEY (iccid, meter_id, epoch, seq)
);",
    },
];

/// The tables of the usage rollups (see [`super::rollups`]), applied as migration 5. Bucket
/// sums are `NUMERIC` so that a SIM whose usage leaves 64 bits is stored as it is and read
/// as an overflow fault, never refused at ingest. The rollups of a database written before
/// are built at connect ([`PgStore::ensure_rollups`](super::PgStore::ensure_rollups)).
pub const PG_ROLLUP_MIGRATION_SQL: &str = "
ALTER TABLE records ADD COLUMN max_up BIGINT, ADD COLUMN max_down BIGINT;
CREATE TABLE rollup_buckets (
    iccid BIGINT NOT NULL,
    bucket BIGINT NOT NULL CHECK (bucket >= 0),
    up NUMERIC(40, 0) NOT NULL,
    down NUMERIC(40, 0) NOT NULL,
    records INTEGER NOT NULL CHECK (records >= 0),
    PRIMARY KEY (iccid, bucket)
);
CREATE INDEX rollup_buckets_bucket ON rollup_buckets (bucket);
CREATE TABLE rollup_faulty (
    iccid BIGINT NOT NULL,
    meter_id BIGINT NOT NULL,
    epoch BIGINT NOT NULL CHECK (epoch BETWEEN 0 AND 4294967295),
    seq BIGINT NOT NULL CHECK (seq BETWEEN 0 AND 4294967295),
    PRIMARY KEY (iccid, meter_id, epoch, seq)
);
CREATE TABLE epoch_tails (
    meter_id BIGINT NOT NULL,
    epoch BIGINT NOT NULL CHECK (epoch BETWEEN 0 AND 4294967295),
    last_seq BIGINT CHECK (last_seq BETWEEN 0 AND 4294967295),
    max_up BIGINT NOT NULL,
    max_down BIGINT NOT NULL,
    PRIMARY KEY (meter_id, epoch)
);
CREATE TABLE rollup_meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

/// Migration 6: the rollup buckets indexed by UTC day and ICCID (replacing the index by
/// bucket), so that a page of SIMs of a day is read in ICCID order from the index, and a
/// range of every SIM's days still is an index range.
pub const PG_ROLLUP_DAY_INDEX_SQL: &str = "
CREATE INDEX rollup_buckets_day_iccid ON rollup_buckets ((bucket / 96), iccid);
DROP INDEX rollup_buckets_bucket;
";

/// Migration 7: the SIM-days (ICCID, UTC day) ingest changed after the ledger closed them,
/// each with a unique mark, so that a settlement run reads only those and clears a mark only
/// if it was not made again meanwhile (see [`super::ledger`]).
pub const PG_ROLLUP_CHANGED_SQL: &str = "
CREATE TABLE rollup_changed (
    iccid BIGINT NOT NULL,
    day INTEGER NOT NULL CHECK (day >= 0),
    mark BIGINT NOT NULL,
    PRIMARY KEY (iccid, day)
);
CREATE SEQUENCE rollup_changed_mark;
";

impl PgStore {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::postgres::CITUS_DISTRIBUTION_SQL;

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
