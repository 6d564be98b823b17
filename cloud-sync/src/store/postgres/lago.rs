//! The Lago outbox on PostgreSQL: the same outbox semantics as the sled
//! [`Outbox`](crate::store::sled::lago::Outbox), with the same pure decisions
//! ([`plan_event`], [`countersign_rating::lago::next_step`]); only the
//! IO differs.
//!
//! | table            | key                               | value                               |
//! | ---------------- | --------------------------------- | ----------------------------------- |
//! | `lago_planned`   | `(iccid, meter_id, epoch, seq)`   | `export_seq` (kept for good)        |
//! | `lago_outbox`    | `(iccid, export_seq)`             | the event's JSON bytes, until Lago has it |
//! | `lago_epoch_max` | `(meter_id, epoch)`               | highest `used` exported, up and down |
//!
//! **One active exporter, under a session advisory lock.** Every `serve --lago-config`
//! process runs an exporter; each round, one that is not active tries
//! `pg_try_advisory_lock` ([`PG_LAGO_EXPORT_LOCK_KEY`]) on a connection of its own, outside
//! the pool. The one that gets it is the active exporter and keeps the lock, and that
//! connection, for as long as it runs; the others stand by and try again next round. Every
//! write of the export (planning, removing delivered events) goes through the lock's
//! connection, so an exporter that loses its connection loses the lock and the ability to
//! write at the same moment; a failed round drops the connection on purpose, and a process
//! that dies frees the lock with its connection. Only the active exporter plans or sends.
//!
//! What a takeover can repeat is what a restart repeats on sled: events planned and sent
//! but not yet removed are sent again, byte for byte, and Lago answers
//! `value_already_exist`. Planning cannot be repeated: a record is planned in the same
//! transaction that stores its event and its epoch's new maximum, and the primary key of
//! `lago_planned` refuses a second plan of a record even if two planners ever overlapped.
//!
//! **Planning** reads the records not yet in `lago_planned` (an anti-join on the full
//! record key, which includes the distribution column, so on Citus it runs shard by shard)
//! in record id order, in one REPEATABLE READ snapshot on a pool connection, and writes
//! them in transactions of [`LAGO_PLAN_RECORDS_PER_FLUSH_MAX`] records on the lock's
//! connection, each committed (WAL flushed) before the next page: a crash loses at most an
//! uncommitted page, which the next round plans again. Records of SIMs without a
//! subscription stay unplanned.
//!
//! **Citus.** `lago_planned` and `lago_outbox` are distributed by `iccid` (co-located with
//! `records`); `lago_epoch_max` by `meter_id`, because an epoch's running maximum spans the
//! SIM swaps inside the epoch (co-located with `record_ids`). The export lock is per
//! PostgreSQL node: every endpoint must reach the same coordinator.

use std::collections::{BTreeMap, HashMap};

use countersign_meter::Totals;
use tokio::sync::Mutex;

use super::{db_error, pool_error, u64_from_sql, u64_to_sql, usage_record, PgStore};

use countersign_rating::lago::{plan_event, plannable, LagoMetric, LAGO_EVENTS_PER_CALL_MAX};

use crate::store::lago::LAGO_PLAN_RECORDS_PER_FLUSH_MAX;
use crate::store::StoreError;

/// Key of the session advisory lock the active exporter holds (arbitrary, stable: "lago").
pub const PG_LAGO_EXPORT_LOCK_KEY: i64 = 0x6c61_676f_0000_0001;

/// Stored records that have no planned event yet, in record id order.
const UNPLANNED_SQL: &str = "
SELECT r.meter_id, r.epoch, r.seq, r.received_ms, r.report FROM records r
WHERE NOT EXISTS (
    SELECT 1 FROM lago_planned p
    WHERE p.iccid = r.iccid AND p.meter_id = r.meter_id AND p.epoch = r.epoch AND p.seq = r.seq
)
ORDER BY (r.meter_id < 0), r.meter_id, r.epoch, r.seq";

/// The Lago outbox in the PostgreSQL store.
pub struct PgOutbox {
    store: PgStore,
    /// The connection holding the export lock, while this exporter is the active one.
    active: Mutex<Option<tokio_postgres::Client>>,
}

impl std::fmt::Debug for PgOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOutbox").field("store", &self.store).finish_non_exhaustive()
    }
}

fn not_active() -> StoreError {
    StoreError::DatabaseUnavailable("this exporter does not hold the lago export lock".into())
}

fn sql_seq(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("lago export sequence {v} is negative")))
}

impl PgOutbox {
    /// The outbox of `store`; connects only when it first tries to become active.
    pub fn new(store: &PgStore) -> Self {
        Self { store: store.clone(), active: Mutex::new(None) }
    }

    /// Whether this exporter holds the export lock, taking it if it is free.
    pub async fn acquire(&self) -> Result<bool, StoreError> {
        let mut active = self.active.lock().await;
        if let Some(c) = active.as_ref() {
            if !c.is_closed() {
                return Ok(true);
            }
            tracing::warn!("the lago export lock's connection closed; the lock is lost");
            *active = None;
        }
        let client = self.store.dedicated_connection().await?;
        let row = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&PG_LAGO_EXPORT_LOCK_KEY])
            .await
            .map_err(db_error)?;
        let taken: bool = row.try_get(0).map_err(db_error)?;
        if taken {
            tracing::info!(target = %self.store.target, "lago export lock taken: this process is the active exporter");
            *active = Some(client);
        }
        // Not taken: the connection is dropped here, and with it nothing is held.
        Ok(taken)
    }

    /// Gives up the lock: unlocks it, then closes its connection.
    pub async fn release(&self) {
        if let Some(client) = self.active.lock().await.take() {
            // Unlocked explicitly: dropping the connection frees the lock only once the
            // server notices, so another exporter trying at once would still find it held.
            // A broken connection fails here, and the server frees the lock with it.
            if let Err(e) = client.execute("SELECT pg_advisory_unlock($1)", &[&PG_LAGO_EXPORT_LOCK_KEY]).await
            {
                tracing::debug!(error = %e, "lago export lock: unlock on a broken connection");
            }
            tracing::info!("lago export lock released");
        }
    }

    /// Plans an event for every stored record not planned yet whose SIM has a subscription;
    /// committed when it returns. Needs the lock. Returns how many were planned.
    pub async fn plan(
        &self,
        subscriptions: &BTreeMap<u64, String>,
        metric: &LagoMetric,
    ) -> Result<usize, StoreError> {
        let mut active = self.active.lock().await;
        let writer = active.as_mut().ok_or_else(not_active)?;
        let next: i64 = writer
            .query_one("SELECT coalesce(max(export_seq) + 1, 0) FROM lago_planned", &[])
            .await
            .map_err(db_error)?
            .try_get(0)
            .map_err(db_error)?;
        let mut next_seq = sql_seq(next)?;
        let mut reader = self.store.pool.get().await.map_err(pool_error)?;
        let snapshot = super::read_snapshot(&mut reader).await?;
        let portal = snapshot.bind(UNPLANNED_SQL, &[]).await.map_err(db_error)?;
        let page_rows = i32::try_from(LAGO_PLAN_RECORDS_PER_FLUSH_MAX).unwrap_or(i32::MAX);
        let (mut planned, mut unmapped) = (0usize, 0usize);
        loop {
            let rows = snapshot.query_portal(&portal, page_rows).await.map_err(db_error)?;
            if rows.is_empty() {
                break;
            }
            let mut page = Vec::with_capacity(rows.len());
            for row in &rows {
                let r = usage_record(row)?;
                match subscriptions.get(&r.iccid) {
                    Some(_) if !plannable(&r) => {}
                    Some(sub) => page.push((r, sub.as_str())),
                    None => unmapped += 1,
                }
            }
            if page.is_empty() {
                continue;
            }
            let tx = writer.transaction().await.map_err(db_error)?;
            let mut epochs: Vec<(i64, i64)> =
                page.iter().map(|(r, _)| (u64_to_sql(r.id.meter_id), i64::from(r.id.epoch))).collect();
            epochs.dedup();
            let (e_meter, e_epoch): (Vec<i64>, Vec<i64>) = epochs.into_iter().unzip();
            let mut max = HashMap::<(u64, u32), Totals>::new();
            for row in tx
                .query(
                    "SELECT meter_id, epoch, up_bytes, down_bytes FROM lago_epoch_max
                     WHERE (meter_id, epoch) IN (SELECT * FROM unnest($1::int8[], $2::int8[]))",
                    &[&e_meter, &e_epoch],
                )
                .await
                .map_err(db_error)?
            {
                let meter = u64_from_sql(row.try_get(0).map_err(db_error)?);
                let epoch = super::u32_from_sql("epoch", row.try_get(1).map_err(db_error)?)?;
                let t = Totals {
                    up: u64_from_sql(row.try_get(2).map_err(db_error)?),
                    down: u64_from_sql(row.try_get(3).map_err(db_error)?),
                };
                max.insert((meter, epoch), t);
            }
            let n = page.len();
            let (mut iccid, mut meter, mut epoch, mut seq, mut export_seq, mut event) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            for (r, sub) in &page {
                let key = (r.id.meter_id, r.id.epoch);
                let planned_event = plan_event(r, max.get(&key).copied().unwrap_or_default(), sub, metric)
                    .map_err(StoreError::from)?;
                max.insert(key, planned_event.exported_max);
                iccid.push(u64_to_sql(r.iccid));
                meter.push(u64_to_sql(r.id.meter_id));
                epoch.push(i64::from(r.id.epoch));
                seq.push(i64::from(r.id.seq));
                export_seq.push(
                    i64::try_from(next_seq)
                        .map_err(|_| StoreError::Corrupt("lago export sequence exhausted".into()))?,
                );
                event.push(planned_event.json);
                next_seq = next_seq
                    .checked_add(1)
                    .ok_or_else(|| StoreError::Corrupt("lago export sequence exhausted".into()))?;
            }
            tx.execute(
                "INSERT INTO lago_planned (iccid, meter_id, epoch, seq, export_seq)
                 SELECT * FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::int8[])",
                &[&iccid, &meter, &epoch, &seq, &export_seq],
            )
            .await
            .map_err(db_error)?;
            tx.execute(
                "INSERT INTO lago_outbox (iccid, export_seq, event)
                 SELECT * FROM unnest($1::int8[], $2::int8[], $3::bytea[])",
                &[&iccid, &export_seq, &event],
            )
            .await
            .map_err(db_error)?;
            let (m_meter, m_epoch, m_up, m_down) = max.iter().fold(
                (Vec::new(), Vec::new(), Vec::new(), Vec::new()),
                |(mut a, mut b, mut c, mut d), ((m, e), t)| {
                    a.push(u64_to_sql(*m));
                    b.push(i64::from(*e));
                    c.push(u64_to_sql(t.up));
                    d.push(u64_to_sql(t.down));
                    (a, b, c, d)
                },
            );
            tx.execute(
                "INSERT INTO lago_epoch_max (meter_id, epoch, up_bytes, down_bytes)
                 SELECT * FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[])
                 ON CONFLICT (meter_id, epoch) DO UPDATE
                 SET up_bytes = EXCLUDED.up_bytes, down_bytes = EXCLUDED.down_bytes",
                &[&m_meter, &m_epoch, &m_up, &m_down],
            )
            .await
            .map_err(db_error)?;
            tx.commit().await.map_err(db_error)?;
            planned += n;
        }
        snapshot.commit().await.map_err(db_error)?;
        if unmapped > 0 {
            tracing::warn!(unmapped, "records of SIMs without a Lago subscription are held back");
        }
        Ok(planned)
    }

    /// The next events to send: up to `max` (export sequence, JSON bytes) in plan order.
    /// Needs the lock.
    pub async fn peek(&self, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let active = self.active.lock().await;
        let client = active.as_ref().ok_or_else(not_active)?;
        let limit = i64::try_from(max.min(LAGO_EVENTS_PER_CALL_MAX)).unwrap_or(0);
        let rows = client
            .query("SELECT export_seq, event FROM lago_outbox ORDER BY export_seq LIMIT $1", &[&limit])
            .await
            .map_err(db_error)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.push((sql_seq(row.try_get(0).map_err(db_error)?)?, row.try_get(1).map_err(db_error)?));
        }
        Ok(out)
    }

    /// Removes delivered events; committed when it returns. Needs the lock.
    pub async fn settle(&self, delivered: &[u64]) -> Result<(), StoreError> {
        if delivered.is_empty() {
            return Ok(());
        }
        let active = self.active.lock().await;
        let client = active.as_ref().ok_or_else(not_active)?;
        let keys: Vec<i64> = delivered.iter().map(|k| u64_to_sql(*k)).collect();
        client
            .execute("DELETE FROM lago_outbox WHERE export_seq = ANY($1)", &[&keys])
            .await
            .map_err(db_error)?;
        Ok(())
    }

    /// Events planned and not yet accepted by Lago, whoever planned them.
    pub async fn pending(&self) -> Result<u64, StoreError> {
        let client = self.store.pool.get().await.map_err(pool_error)?;
        let n: i64 = client
            .query_one("SELECT count(*) FROM lago_outbox", &[])
            .await
            .map_err(db_error)?
            .try_get(0)
            .map_err(db_error)?;
        sql_seq(n)
    }
}
