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
//! | `lago_pending`   | `(iccid, meter_id, epoch, seq)`   | none: a record not planned yet (the queue a round reads) |
//!
//! **The queue.** Ingest inserts each new record's id into `lago_pending` in its own
//! transaction while `rollup_meta` `lago_pending` is set (read under the shared side of the
//! ingest gate, [`PG_CHANGES_LOCK_KEY`](super::ledger::PG_CHANGES_LOCK_KEY)); planning deletes it in the transaction that
//! plans it. The first round sets the state under the gate's exclusive side and queues every
//! stored record not planned yet, once. So a round reads what arrived and what waits for a
//! subscription, never history.
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
SELECT r.meter_id, r.epoch, r.seq, r.received_ms, r.report FROM lago_pending q
JOIN records r ON r.iccid = q.iccid AND r.meter_id = q.meter_id AND r.epoch = q.epoch AND r.seq = q.seq
WHERE NOT EXISTS (
    SELECT 1 FROM lago_planned p
    WHERE p.iccid = q.iccid AND p.meter_id = q.meter_id AND p.epoch = q.epoch AND p.seq = q.seq
)
ORDER BY (q.meter_id < 0), q.meter_id, q.epoch, q.seq";

/// Queues every stored record not planned yet (the queue's first fill).
const QUEUE_UNPLANNED_SQL: &str = "
INSERT INTO lago_pending (iccid, meter_id, epoch, seq)
SELECT r.iccid, r.meter_id, r.epoch, r.seq FROM records r
WHERE NOT EXISTS (
    SELECT 1 FROM lago_planned p
    WHERE p.iccid = r.iccid AND p.meter_id = r.meter_id AND p.epoch = r.epoch AND p.seq = r.seq
)
ON CONFLICT DO NOTHING";

/// Turns the queue of unplanned records on (see the module docs), on the export lock's
/// connection: the state is set to `filling` under the exclusive side of the ingest gate,
/// so every ingest transaction after it queues its records and every one before it is
/// committed when the stored records are queued; then `on`. Resumes a fill cut short.
async fn ensure_pending(writer: &mut tokio_postgres::Client) -> Result<(), StoreError> {
    let state: Option<String> = writer
        .query_opt("SELECT value FROM rollup_meta WHERE name = 'lago_pending'", &[])
        .await
        .map_err(db_error)?
        .map(|r| r.try_get(0))
        .transpose()
        .map_err(db_error)?;
    if state.as_deref() == Some("on") {
        return Ok(());
    }
    if state.is_none() {
        let tx = writer.transaction().await.map_err(db_error)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&super::ledger::PG_CHANGES_LOCK_KEY])
            .await
            .map_err(db_error)?;
        tx.execute(
            "INSERT INTO rollup_meta (name, value) VALUES ('lago_pending', 'filling') ON CONFLICT (name) DO NOTHING",
            &[],
        )
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
    }
    // One pass over the records: no statement timeout (a large table takes longer than a
    // request may).
    let tx = writer.transaction().await.map_err(db_error)?;
    tx.batch_execute("SET LOCAL statement_timeout = 0").await.map_err(db_error)?;
    let queued = tx.execute(QUEUE_UNPLANNED_SQL, &[]).await.map_err(db_error)?;
    tx.execute("UPDATE rollup_meta SET value = 'on' WHERE name = 'lago_pending'", &[])
        .await
        .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    tracing::info!(queued, "lago: stored records not planned yet are queued for planning");
    Ok(())
}

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
        ensure_pending(writer).await?;
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
            // Records that can never be planned leave the queue too.
            let mut dropped = Vec::new();
            for row in &rows {
                let r = usage_record(row)?;
                match subscriptions.get(&r.iccid) {
                    Some(_) if !plannable(&r) => dropped.push(r),
                    Some(sub) => page.push((r, sub.as_str())),
                    None => unmapped += 1,
                }
            }
            if page.is_empty() && dropped.is_empty() {
                continue;
            }
            let tx = writer.transaction().await.map_err(db_error)?;
            let leaving = page.iter().map(|(r, _)| r).chain(dropped.iter());
            let (q_iccid, q_meter, q_epoch, q_seq) = leaving.fold(
                (Vec::new(), Vec::new(), Vec::new(), Vec::new()),
                |(mut a, mut b, mut c, mut d), r| {
                    a.push(u64_to_sql(r.iccid));
                    b.push(u64_to_sql(r.id.meter_id));
                    c.push(i64::from(r.id.epoch));
                    d.push(i64::from(r.id.seq));
                    (a, b, c, d)
                },
            );
            tx.execute(
                "DELETE FROM lago_pending q USING unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[])
                     AS u(iccid, meter_id, epoch, seq)
                 WHERE q.iccid = u.iccid AND q.meter_id = u.meter_id AND q.epoch = u.epoch AND q.seq = u.seq",
                &[&q_iccid, &q_meter, &q_epoch, &q_seq],
            )
            .await
            .map_err(db_error)?;
            if page.is_empty() {
                tx.commit().await.map_err(db_error)?;
                continue;
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::postgres::testing::TestDatabase;
    use crate::store::sled::lago::Outbox;
    use crate::store::sled::Store;
    use countersign_testkit::report::{network_time, ReportBuilder};
    use proptest::prelude::*;
    use proptest::test_runner::{TestCaseError, TestRunner};

    /// 2026-11-24T12:00:00Z.
    const NOON_S: u64 = 1_795_521_600;
    /// The second is above 2^63 (a negative BIGINT).
    const SIMS: [u64; 2] = [8_988_280_666_000_000_001, 9_300_000_000_000_000_001];

    fn batch(specs: &[(u64, u32, usize, u64)]) -> Vec<crate::store::NewRecord> {
        specs
            .iter()
            .map(|&(meter, seq, sim, used)| {
                let at = NOON_S + u64::from(seq) * 60;
                let r = ReportBuilder::new(meter, seq, SIMS[sim], network_time(at)).used(used, 0);
                crate::store::NewRecord::new(r.report(), at * 1000, r.encode(&[1u8; 32]).into())
            })
            .collect()
    }

    /// The PostgreSQL planner's queue plans exactly what the sled one does (itself
    /// property-tested against a scan of every record) for the same arrivals and rounds:
    /// records from before the export, new ones queued at ingest, a SIM mapped later.
    #[test]
    fn the_queue_plans_what_the_sled_planner_does() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let mut runner = TestRunner::new(ProptestConfig::with_cases(8));
        let strategy = (
            proptest::collection::vec((1u64..3, 0u32..30, 0usize..2, 0u64..10_000), 1..30),
            0usize..10,
            proptest::collection::vec(1usize..8, 1..6),
        );
        runner
            .run(&strategy, |(specs, before, cuts)| {
                rt.block_on(async {
                    let db = TestDatabase::create().await.unwrap();
                    let pg = PgStore::connect(&db.url(), 4).await.unwrap();
                    let dir = tempfile::tempdir().unwrap();
                    let sled = Store::open(&dir.path().join("data"), crate::config::CACHE_CAPACITY_BYTES_MIN)
                        .unwrap();
                    let before = before.min(specs.len());
                    pg.insert_batch(1, &batch(&specs[..before])).await.unwrap();
                    sled.insert_batch(1, &batch(&specs[..before])).unwrap();
                    let pg_outbox = PgOutbox::new(&pg);
                    prop_assert!(pg_outbox.acquire().await.unwrap());
                    let sled_outbox = Outbox::open(&sled).unwrap();
                    let mut subs: BTreeMap<u64, String> = [(SIMS[0], "a".to_owned())].into();
                    let metric = LagoMetric::default();
                    let mut at = before;
                    for (round, cut) in cuts.iter().cycle().enumerate() {
                        if round > 0 && at >= specs.len() {
                            break;
                        }
                        if round == 2 {
                            subs.insert(SIMS[1], "b".to_owned());
                        }
                        let n = pg_outbox.plan(&subs, &metric).await.unwrap();
                        prop_assert_eq!(n, sled_outbox.plan(&subs, &metric).unwrap());
                        let end = (at + cut).min(specs.len());
                        pg.insert_batch(1, &batch(&specs[at..end])).await.unwrap();
                        sled.insert_batch(1, &batch(&specs[at..end])).unwrap();
                        at = end;
                    }
                    subs.insert(SIMS[1], "b".to_owned());
                    pg_outbox.plan(&subs, &metric).await.unwrap();
                    sled_outbox.plan(&subs, &metric).unwrap();
                    let events = |v: Vec<(u64, Vec<u8>)>| v.into_iter().map(|(_, e)| e).collect::<Vec<_>>();
                    let pg_events = events(pg_outbox.peek(1_000).await.unwrap());
                    prop_assert_eq!(pg_events, events(sled_outbox.peek(1_000).unwrap()));
                    let client = pg.pool.get().await.unwrap();
                    let left: i64 =
                        client.query_one("SELECT count(*) FROM lago_pending", &[]).await.unwrap().get(0);
                    prop_assert_eq!(left, 0);
                    drop(client);
                    pg_outbox.release().await;
                    Ok::<(), TestCaseError>(())
                })
            })
            .unwrap();
    }
}
