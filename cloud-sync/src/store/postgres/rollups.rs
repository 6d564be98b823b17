//! Usage rollups on PostgreSQL: usage per SIM and quarter-hour bucket, written in the same
//! transaction as the records, so that usage reads cost what they return (the rule and its
//! proof against the full derivation are [`countersign_rating::rollup`]; the sled store keeps
//! the same rollups, [`crate::store::sled::rollups`]).
//!
//! # Tables (migration 5)
//!
//! | table            | key                                  | value                                |
//! | ---------------- | ------------------------------------ | ------------------------------------ |
//! | `records`        | (unchanged)                          | + `max_up`, `max_down`: the epoch's running maximum through the record (NULL: not built) |
//! | `rollup_buckets` | `(iccid, bucket)`                    | `up`, `down` (`NUMERIC`), `records`  |
//! | `rollup_faulty`  | `(iccid, meter_id, epoch, seq)`      | —                                    |
//! | `epoch_tails`    | `(meter_id, epoch)`                  | `last_seq`, `max_up`, `max_down`     |
//! | `rollup_meta`    | `name` (`built`)                     | [`PG_ROLLUP_VERSION`]                |
//!
//! Bucket sums are `NUMERIC(40,0)`: a SIM whose usage leaves 64 bits is stored as it is and
//! read as an overflow fault of that SIM, never refused at ingest (as sled's 128-bit slots).
//! `rollup_buckets` has an index on `bucket` so that every SIM over a range reads only the
//! range's buckets.
//!
//! # Ingest
//!
//! In the ingest transaction, after the claim in `record_ids`: the tails of the batch's new
//! records' epochs are created if missing (`INSERT … ON CONFLICT DO NOTHING`) and locked
//! (`SELECT … FOR UPDATE`), both in key order. That serialises batches of the same epoch: the
//! tail a batch plans from is the committed state of the epoch. Each new record is then
//! planned with [`plan_insert`] in id order: after the tail (the common case) from the tail
//! alone, with no read; a late record reads its predecessor and, in growing chunks, the
//! later records of its epoch that it changes (ids from `record_ids`, then the records by
//! their full key), overlaid by what the batch itself planned. The writes are set-based
//! (unnest arrays): the records with their running maximum, the raised records' maxima,
//! bucket deltas merged per (iccid, bucket) and added with `ON CONFLICT DO UPDATE`, faulty
//! rows, new tails. Same transaction: a record's rollup never commits without the record.
//!
//! **No deadlock.** Every ingest transaction takes its row locks in the same phases, each in
//! key order: `record_ids` (the claim), `epoch_tails` (insert of missing tails, then the lock
//! of all), `records` (new rows are its own claimed ids; raised rows belong to epochs whose
//! tail it holds, so no other transaction writes them), `rollup_buckets` (sorted upsert),
//! `rollup_faulty` (keys of its own claimed ids). A transaction waits only on a lock of its
//! current phase at a key above every key it holds in that phase, and holds nothing of a
//! later phase; a cycle of waits would need one transaction to wait on an earlier phase or a
//! lower key. A tail inserted in the first step is locked before the `FOR UPDATE` of lower
//! keys, but another transaction can hold a lower tail and want that one only after its own
//! insert of it, which waits for this transaction to end: it cannot already hold the lower
//! one's `FOR UPDATE`. PostgreSQL's deadlock detector and the retry remain the backstop.
//!
//! # Reads
//!
//! [`PgStore::rollup_daily_in`] reads the faulty SIMs (with their first faulty record) and
//! the buckets of the range, of one SIM (primary key range) or of every SIM (the `bucket`
//! index), in one snapshot, and builds the same [`Derived`] as sled's reader. Zones whose day
//! boundaries in the range are not on quarter hours are answered by the full derivation
//! ([`PgStore::derive_from_records_in`]).
//!
//! # Build, rebuild and check
//!
//! [`PgStore::rebuild_rollups`] recomputes everything from the records in one transaction
//! (streamed in record id order; memory of one batch), holding `epoch_tails` in EXCLUSIVE
//! mode so that no ingest commits meanwhile; reads see the old rollups until it commits.
//! [`PgStore::ensure_rollups`] runs it at connect, under the migration advisory lock, when
//! `rollup_meta` does not say the rollups are built (a database written before migration 5).
//! [`PgStore::check_rollups`] derives into temporary tables and compares.

use std::collections::{BTreeMap, HashMap};

use countersign_meter::{RecordId, Totals};
use countersign_rating::rollup::{bucket_date, plan_insert, Booked, EpochEntry, BUCKET_S};
use countersign_rating::usage::{
    record_fault, DateRange, Derived, FaultReason, SimFault, TimeZone, UsageRecord,
};
use time::Date;
use tokio_postgres::Row;

use super::migrations::PG_MIGRATION_LOCK_KEY;
use super::records::{usage_record, Retry, PG_USAGE_FETCH_ROWS};
use super::{db_error, pool_error, read_snapshot, u32_from_sql, u64_from_sql, u64_to_sql, PgStore};
use crate::store::rollups::{rows_of_range, rows_on_buckets, RollupCheck, SimPage, UsagePage};
use crate::store::{NewRecord, StoreError};

/// Version of the rollup layout, written to `rollup_meta` once built.
pub const PG_ROLLUP_VERSION: &str = "1";
/// Later records a late record reads in its first chunk; each further chunk doubles.
pub const PG_LATE_READ_ROWS_FIRST: i64 = 64;
/// Records whose rollup a rebuild or check gathers in memory before writing them.
pub const PG_REBUILD_BATCH_RECORDS: u64 = 10_000;
/// Records between progress lines of a rebuild.
pub const PG_REBUILD_PROGRESS_RECORDS: u64 = 1_000_000;
/// Buckets per UTC day.
const BUCKETS_PER_DAY: u64 = 86_400 / BUCKET_S;
const META_BUILT: &str = "built";

/// Bucket changes per (iccid, bucket) as PostgreSQL orders them: up, down, records.
type BucketDeltas = BTreeMap<(i64, i64), (i128, i128, i64)>;

/// The last stored record of an epoch and the running maximum through it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Tail {
    last_seq: Option<u32>,
    max: Totals,
}

/// What a batch writes besides its records.
#[derive(Default)]
pub(super) struct RollupPlan {
    /// Each new record's running maximum.
    pub max: HashMap<RecordId, Totals>,
    /// Stored records whose running maximum rises, with their ICCID.
    raised: BTreeMap<(i64, i64, i64), (i64, Totals)>,
    buckets: BucketDeltas,
    faulty: Vec<(i64, i64, i64, i64)>,
    /// Tails the batch changes, by (meter, epoch) as PostgreSQL orders them.
    tails: BTreeMap<(i64, i64), Tail>,
}

fn sql_key(id: RecordId) -> (i64, i64, i64) {
    (u64_to_sql(id.meter_id), i64::from(id.epoch), i64::from(id.seq))
}

fn totals_from_sql(
    id: impl std::fmt::Display,
    up: Option<i64>,
    down: Option<i64>,
) -> Result<Totals, StoreError> {
    match (up, down) {
        (Some(up), Some(down)) => Ok(Totals { up: u64_from_sql(up), down: u64_from_sql(down) }),
        _ => Err(StoreError::Corrupt(format!("record {id}: no running maximum (rollups not built)"))),
    }
}

fn add_delta(
    buckets: &mut BucketDeltas,
    iccid: u64,
    bucket: u64,
    up: i128,
    down: i128,
    records: i64,
) -> Result<(), StoreError> {
    let b = i64::try_from(bucket)
        .map_err(|_| StoreError::Corrupt(format!("rollup bucket {bucket} beyond the calendar")))?;
    let d = buckets.entry((u64_to_sql(iccid), b)).or_default();
    match (d.0.checked_add(up), d.1.checked_add(down), d.2.checked_add(records)) {
        (Some(u), Some(w), Some(r)) => *d = (u, w, r),
        _ => return Err(StoreError::Corrupt(format!("rollup change of bucket {bucket} out of range"))),
    }
    Ok(())
}

/// Creates the missing tails of `epochs` and locks them all, in key order.
async fn lock_tails(
    tx: &deadpool_postgres::Transaction<'_>,
    epochs: &[(i64, i64)],
) -> Result<HashMap<(i64, i64), Tail>, Retry> {
    let meter: Vec<i64> = epochs.iter().map(|e| e.0).collect();
    let epoch: Vec<i64> = epochs.iter().map(|e| e.1).collect();
    let create = tx
        .prepare_cached(
            "INSERT INTO epoch_tails (meter_id, epoch, last_seq, max_up, max_down)
             SELECT m, e, NULL, 0, 0 FROM unnest($1::int8[], $2::int8[]) AS u(m, e)
             ORDER BY 1, 2
             ON CONFLICT DO NOTHING",
        )
        .await?;
    tx.execute(&create, &[&meter, &epoch]).await?;
    let lock = tx
        .prepare_cached(
            "SELECT meter_id, epoch, last_seq, max_up, max_down FROM epoch_tails
             WHERE (meter_id, epoch) IN (SELECT * FROM unnest($1::int8[], $2::int8[]))
             ORDER BY meter_id, epoch
             FOR UPDATE",
        )
        .await?;
    let mut tails = HashMap::with_capacity(epochs.len());
    for row in tx.query(&lock, &[&meter, &epoch]).await? {
        let key: (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        let last_seq: Option<i64> = row.try_get(2)?;
        let last_seq = last_seq.map(|s| u32_from_sql("last_seq", s)).transpose().map_err(Retry::Fail)?;
        let max = Totals { up: u64_from_sql(row.try_get(3)?), down: u64_from_sql(row.try_get(4)?) };
        tails.insert(key, Tail { last_seq, max });
    }
    if tails.len() != epochs.len() {
        return Err(Retry::Fail(StoreError::Corrupt(format!(
            "locked {} epoch tails of {}",
            tails.len(),
            epochs.len()
        ))));
    }
    Ok(tails)
}

/// A stored record of an epoch, read by its full key, as the planner needs it.
async fn read_booked(
    tx: &deadpool_postgres::Transaction<'_>,
    meter_id: u64,
    epoch: u32,
    ids: &[(i64, i64)],
) -> Result<BTreeMap<u32, Booked>, Retry> {
    let seq: Vec<i64> = ids.iter().map(|i| i.0).collect();
    let iccid: Vec<i64> = ids.iter().map(|i| i.1).collect();
    let meter: Vec<i64> = vec![u64_to_sql(meter_id); ids.len()];
    let epochs: Vec<i64> = vec![i64::from(epoch); ids.len()];
    let read = tx
        .prepare_cached(
            "SELECT meter_id, epoch, seq, received_ms, report, max_up, max_down FROM records
             WHERE (iccid, meter_id, epoch, seq) IN
                   (SELECT * FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[]))",
        )
        .await?;
    let mut out = BTreeMap::new();
    for row in tx.query(&read, &[&iccid, &meter, &epochs, &seq]).await? {
        let r = usage_record(&row).map_err(Retry::Fail)?;
        let max = totals_from_sql(r.id, row.try_get(5)?, row.try_get(6)?).map_err(Retry::Fail)?;
        out.insert(r.id.seq, Booked { entry: EpochEntry::of(&r), max_through: max });
    }
    if out.len() != ids.len() {
        return Err(Retry::Fail(StoreError::Corrupt(format!(
            "meter {meter_id} epoch {epoch}: {} of {} claimed records stored",
            out.len(),
            ids.len()
        ))));
    }
    Ok(out)
}

/// Ids `(seq, iccid)` of an epoch's stored records before (`before`) or after `seq`, not
/// among the batch's own (`own`), nearest first, at most `limit`.
async fn epoch_ids(
    tx: &deadpool_postgres::Transaction<'_>,
    id: RecordId,
    own: &[i64],
    before: bool,
    limit: i64,
) -> Result<Vec<(i64, i64)>, Retry> {
    let sql = if before {
        "SELECT seq, iccid FROM record_ids WHERE meter_id = $1 AND epoch = $2 AND seq < $3
         AND seq <> ALL($4::int8[]) ORDER BY seq DESC LIMIT $5"
    } else {
        "SELECT seq, iccid FROM record_ids WHERE meter_id = $1 AND epoch = $2 AND seq > $3
         AND seq <> ALL($4::int8[]) ORDER BY seq LIMIT $5"
    };
    let stmt = tx.prepare_cached(sql).await?;
    let rows = tx
        .query(&stmt, &[&u64_to_sql(id.meter_id), &i64::from(id.epoch), &i64::from(id.seq), &own, &limit])
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        out.push((r.try_get(0)?, r.try_get(1)?));
    }
    Ok(out)
}

/// Plans the rollups of a batch's claimed records (`new`, in key order), locking their
/// epochs' tails. See the module docs.
pub(super) async fn plan_batch(
    tx: &deadpool_postgres::Transaction<'_>,
    new: &[&NewRecord],
) -> Result<RollupPlan, Retry> {
    let mut plan = RollupPlan::default();
    // By epoch, in seq order.
    let mut epochs: BTreeMap<(i64, i64), Vec<&NewRecord>> = BTreeMap::new();
    for r in new {
        epochs.entry((u64_to_sql(r.id.meter_id), i64::from(r.id.epoch))).or_default().push(r);
    }
    let keys: Vec<(i64, i64)> = epochs.keys().copied().collect();
    let tails = lock_tails(tx, &keys).await?;
    for (key, mut records) in epochs {
        records.sort_by_key(|r| r.id.seq);
        let locked = tails.get(&key).copied().unwrap_or_default();
        let mut tail = locked;
        let own: Vec<i64> = records.iter().map(|r| i64::from(r.id.seq)).collect();
        if locked.last_seq.is_none() {
            // A new epoch (one query per epoch, once): stored records without a tail would
            // be rollups planned from nothing, so refuse rather than count wrong.
            let stored = tx
                .prepare_cached(
                    "SELECT seq FROM record_ids WHERE meter_id = $1 AND epoch = $2
                     AND seq <> ALL($3::int8[]) LIMIT 1",
                )
                .await?;
            if tx.query_opt(&stored, &[&key.0, &key.1, &own]).await?.is_some() {
                return Err(Retry::Fail(StoreError::Corrupt(format!(
                    "meter {} epoch {}: stored records but no epoch tail (run rollups-rebuild)",
                    u64_from_sql(key.0),
                    key.1
                ))));
            }
        }
        // The batch's records of the epoch and the stored ones it raised, by seq.
        let mut overlay: BTreeMap<u32, Booked> = BTreeMap::new();
        for r in records {
            let usage = r.usage();
            let entry = EpochEntry::of(&usage);
            let made = if tail.last_seq.is_none_or(|s| r.id.seq > s) {
                // After everything stored of its epoch and after the batch's earlier records
                // (the tail follows them): no read.
                plan_insert(entry, tail.max, std::iter::empty())
                    .map_err(|e| Retry::Fail(StoreError::Corrupt(format!("record {}: {e}", r.id))))?
            } else {
                plan_late(tx, r.id, entry, &own, &mut overlay, &mut plan).await?
            };
            if tail.last_seq.is_none_or(|s| r.id.seq > s) {
                tail = Tail { last_seq: Some(r.id.seq), max: made.max_through };
            }
            for (seq, m) in &made.raised {
                if tail.last_seq == Some(*seq) {
                    tail.max = *m;
                }
            }
            overlay.insert(r.id.seq, Booked { entry, max_through: made.max_through });
            plan.max.insert(r.id, made.max_through);
            if entry.bucket.is_none() {
                let (m, e, s) = sql_key(r.id);
                plan.faulty.push((u64_to_sql(r.iccid), m, e, s));
            }
            for d in &made.deltas {
                add_delta(&mut plan.buckets, d.iccid, d.bucket, d.up.into(), d.down.into(), d.records.into())
                    .map_err(Retry::Fail)?;
            }
        }
        if tail != locked {
            plan.tails.insert(key, tail);
        }
    }
    Ok(plan)
}

/// Plans a record that arrives before others of its epoch: its predecessor and the later
/// records it changes, read in chunks that double until the plan stops inside one.
async fn plan_late(
    tx: &deadpool_postgres::Transaction<'_>,
    id: RecordId,
    entry: EpochEntry,
    own: &[i64],
    overlay: &mut BTreeMap<u32, Booked>,
    plan: &mut RollupPlan,
) -> Result<countersign_rating::rollup::InsertPlan, Retry> {
    let corrupt = |e: countersign_rating::rollup::RollupError| {
        Retry::Fail(StoreError::Corrupt(format!("record {id}: {e}")))
    };
    // The predecessor: the later of the stored one and the batch's (the batch's copy of a
    // stored record is the newer one).
    let stored_pred = epoch_ids(tx, id, own, true, 1).await?;
    let batch_pred = overlay.range(..id.seq).next_back().map(|(s, b)| (*s, b.max_through));
    let before = match (stored_pred.first(), batch_pred) {
        (Some(&(s, _)), Some((bs, bm))) if i64::from(bs) >= s => bm,
        (Some(&(s, iccid)), _) => {
            let read = read_booked(tx, id.meter_id, id.epoch, &[(s, iccid)]).await?;
            read.values().next().map(|b| b.max_through).unwrap_or_default()
        }
        (None, Some((_, bm))) => bm,
        (None, None) => Totals::default(),
    };
    let mut limit = PG_LATE_READ_ROWS_FIRST;
    loop {
        let ids = epoch_ids(tx, id, own, false, limit).await?;
        let mut later = read_booked(tx, id.meter_id, id.epoch, &ids).await?;
        for (seq, b) in later.iter_mut() {
            if let Some(o) = overlay.get(seq) {
                *b = *o;
            }
        }
        let mut consumed = 0usize;
        let made = plan_insert(
            entry,
            before,
            later.values().copied().inspect(|_| consumed = consumed.saturating_add(1)),
        )
        .map_err(corrupt)?;
        let full = i64::try_from(ids.len()).unwrap_or(i64::MAX) >= limit;
        if full && consumed == later.len() {
            limit = limit.saturating_mul(2);
            continue;
        }
        for (seq, m) in &made.raised {
            let b = later.get(seq).ok_or_else(|| {
                Retry::Fail(StoreError::Corrupt(format!("record {id}: raised a record it did not read")))
            })?;
            let key = sql_key(RecordId { seq: *seq, ..id });
            plan.raised.insert(key, (u64_to_sql(b.entry.iccid), *m));
            // Later plans of the batch must see the raised maximum, not the stored one.
            overlay.insert(*seq, Booked { entry: b.entry, max_through: *m });
        }
        return Ok(made);
    }
}

/// What an ingest transaction reads under the shared side of [`PG_CHANGES_LOCK_KEY`](super::ledger::PG_CHANGES_LOCK_KEY),
/// held to commit: the ledger's change mark (0: none) and whether new records are queued for
/// the Lago planner. A settlement run raising the mark, or an exporter turning the queue on,
/// takes the exclusive side, so it waits for this transaction and every later one reads
/// what it wrote.
pub(super) struct IngestGate {
    /// Buckets before this one are marked when changed.
    pub changes_before: i64,
    /// New records go to `lago_pending`.
    pub lago_pending: bool,
}

/// Takes the shared side of the ingest gate and reads it (see [`IngestGate`]).
pub(super) async fn ingest_gate(tx: &deadpool_postgres::Transaction<'_>) -> Result<IngestGate, Retry> {
    tx.execute("SELECT pg_advisory_xact_lock_shared($1)", &[&super::ledger::PG_CHANGES_LOCK_KEY]).await?;
    let row = tx
        .query_one(
            "SELECT (SELECT value FROM ledger_meta WHERE name = 'changes_before_bucket'),
                    (SELECT value FROM rollup_meta WHERE name = 'lago_pending')",
            &[],
        )
        .await?;
    let before: Option<String> = row.try_get(0)?;
    let pending: Option<String> = row.try_get(1)?;
    let changes_before = match before {
        None => 0,
        Some(v) => v
            .parse()
            .map_err(|_| Retry::Fail(StoreError::Corrupt(format!("ledger changes_before_bucket '{v}'"))))?,
    };
    Ok(IngestGate { changes_before, lago_pending: pending.is_some() })
}

/// Writes a batch's rollups (after its records).
pub(super) async fn write_plan(
    tx: &deadpool_postgres::Transaction<'_>,
    plan: &RollupPlan,
    gate: &IngestGate,
) -> Result<(), Retry> {
    if !plan.raised.is_empty() {
        let rows: Vec<(i64, i64, i64, i64, Totals)> =
            plan.raised.iter().map(|(k, (iccid, m))| (*iccid, k.0, k.1, k.2, *m)).collect();
        update_max(tx, &rows).await?;
    }
    upsert_buckets(tx, "rollup_buckets", &plan.buckets).await?;
    mark_changes(tx, &plan.buckets, gate.changes_before).await?;
    insert_faulty(tx, "rollup_faulty", &plan.faulty).await?;
    let tails: Vec<((i64, i64), Tail)> = plan.tails.iter().map(|(k, t)| (*k, *t)).collect();
    upsert_tails(tx, "epoch_tails", &tails).await?;
    Ok(())
}

async fn update_max(
    tx: &deadpool_postgres::Transaction<'_>,
    rows: &[(i64, i64, i64, i64, Totals)],
) -> Result<(), tokio_postgres::Error> {
    let col = |f: fn(&(i64, i64, i64, i64, Totals)) -> i64| rows.iter().map(f).collect::<Vec<i64>>();
    let stmt = tx
        .prepare_cached(
            "UPDATE records SET max_up = u.mu, max_down = u.md
             FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::int8[])
                  AS u(iccid, meter_id, epoch, seq, mu, md)
             WHERE records.iccid = u.iccid AND records.meter_id = u.meter_id
               AND records.epoch = u.epoch AND records.seq = u.seq",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &col(|r| r.0),
            &col(|r| r.1),
            &col(|r| r.2),
            &col(|r| r.3),
            &col(|r| u64_to_sql(r.4.up)),
            &col(|r| u64_to_sql(r.4.down)),
        ],
    )
    .await?;
    Ok(())
}

/// Marks the SIM-days whose buckets a batch changed before the ledger's mark (see
/// [`super::ledger`]), read under the ingest gate. In-order ingest changes only open days
/// and writes nothing here.
async fn mark_changes(
    tx: &deadpool_postgres::Transaction<'_>,
    buckets: &BucketDeltas,
    before: i64,
) -> Result<(), Retry> {
    if buckets.is_empty() || before == 0 {
        return Ok(());
    }
    let per_day = BUCKETS_PER_DAY as i64;
    let (mut iccid, mut day): (Vec<i64>, Vec<i32>) = (Vec::new(), Vec::new());
    for &(i, b) in buckets.keys() {
        if b >= before {
            continue;
        }
        let d = i32::try_from(b / per_day).map_err(|_| {
            Retry::Fail(StoreError::Corrupt(format!("rollup bucket {b} beyond the calendar")))
        })?;
        if iccid.last() != Some(&i) || day.last() != Some(&d) {
            iccid.push(i);
            day.push(d);
        }
    }
    if iccid.is_empty() {
        return Ok(());
    }
    let stmt = tx
        .prepare_cached(
            "INSERT INTO rollup_changed (iccid, day, mark)
             SELECT u.i, u.d, m.v FROM unnest($1::int8[], $2::int4[]) AS u(i, d),
                  (SELECT nextval('rollup_changed_mark') AS v) AS m
             ORDER BY 1, 2
             ON CONFLICT (iccid, day) DO UPDATE SET mark = EXCLUDED.mark",
        )
        .await?;
    tx.execute(&stmt, &[&iccid, &day]).await?;
    Ok(())
}

async fn upsert_buckets(
    tx: &deadpool_postgres::Transaction<'_>,
    table: &str,
    buckets: &BucketDeltas,
) -> Result<(), Retry> {
    if buckets.is_empty() {
        return Ok(());
    }
    let iccid: Vec<i64> = buckets.keys().map(|k| k.0).collect();
    let bucket: Vec<i64> = buckets.keys().map(|k| k.1).collect();
    // NUMERIC travels as text: a merged change may leave 64 bits.
    let up: Vec<String> = buckets.values().map(|v| v.0.to_string()).collect();
    let down: Vec<String> = buckets.values().map(|v| v.1.to_string()).collect();
    let records = buckets
        .values()
        .map(|v| i32::try_from(v.2))
        .collect::<Result<Vec<i32>, _>>()
        .map_err(|_| Retry::Fail(StoreError::Corrupt("rollup record count out of range".into())))?;
    let stmt = tx
        .prepare_cached(&format!(
            "INSERT INTO {table} (iccid, bucket, up, down, records)
             SELECT i, b, u::numeric, d::numeric, r
             FROM unnest($1::int8[], $2::int8[], $3::text[], $4::text[], $5::int4[]) AS x(i, b, u, d, r)
             ORDER BY 1, 2
             ON CONFLICT (iccid, bucket) DO UPDATE SET
                 up = {table}.up + EXCLUDED.up,
                 down = {table}.down + EXCLUDED.down,
                 records = {table}.records + EXCLUDED.records"
        ))
        .await?;
    tx.execute(&stmt, &[&iccid, &bucket, &up, &down, &records]).await?;
    Ok(())
}

async fn insert_faulty(
    tx: &deadpool_postgres::Transaction<'_>,
    table: &str,
    faulty: &[(i64, i64, i64, i64)],
) -> Result<(), tokio_postgres::Error> {
    if faulty.is_empty() {
        return Ok(());
    }
    let col = |f: fn(&(i64, i64, i64, i64)) -> i64| faulty.iter().map(f).collect::<Vec<i64>>();
    let stmt = tx
        .prepare_cached(&format!(
            "INSERT INTO {table} (iccid, meter_id, epoch, seq)
             SELECT * FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[]) ORDER BY 1, 2, 3, 4
             ON CONFLICT DO NOTHING"
        ))
        .await?;
    tx.execute(&stmt, &[&col(|r| r.0), &col(|r| r.1), &col(|r| r.2), &col(|r| r.3)]).await?;
    Ok(())
}

async fn upsert_tails(
    tx: &deadpool_postgres::Transaction<'_>,
    table: &str,
    tails: &[((i64, i64), Tail)],
) -> Result<(), tokio_postgres::Error> {
    if tails.is_empty() {
        return Ok(());
    }
    let meter: Vec<i64> = tails.iter().map(|t| t.0 .0).collect();
    let epoch: Vec<i64> = tails.iter().map(|t| t.0 .1).collect();
    let last: Vec<Option<i64>> = tails.iter().map(|t| t.1.last_seq.map(i64::from)).collect();
    let up: Vec<i64> = tails.iter().map(|t| u64_to_sql(t.1.max.up)).collect();
    let down: Vec<i64> = tails.iter().map(|t| u64_to_sql(t.1.max.down)).collect();
    let stmt = tx
        .prepare_cached(&format!(
            "INSERT INTO {table} (meter_id, epoch, last_seq, max_up, max_down)
             SELECT * FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::int8[]) ORDER BY 1, 2
             ON CONFLICT (meter_id, epoch) DO UPDATE SET
                 last_seq = EXCLUDED.last_seq, max_up = EXCLUDED.max_up, max_down = EXCLUDED.max_down"
        ))
        .await?;
    tx.execute(&stmt, &[&meter, &epoch, &last, &up, &down]).await?;
    Ok(())
}

/// What a derivation pass over the records does besides deriving.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Writes every record's running maximum where it differs.
    Rebuild,
    /// Compares every record's running maximum, noting differences.
    Check,
}

/// Buffers of one derivation pass, written every [`PG_REBUILD_BATCH_RECORDS`].
#[derive(Default)]
struct Derivation {
    buckets: BucketDeltas,
    faulty: Vec<(i64, i64, i64, i64)>,
    tails: Vec<((i64, i64), Tail)>,
    maxes: Vec<(i64, i64, i64, i64, Totals)>,
}

impl Derivation {
    async fn flush(
        &mut self,
        tx: &deadpool_postgres::Transaction<'_>,
        tables: (&str, &str, &str),
    ) -> Result<(), StoreError> {
        let retry = |e: Retry| match e {
            Retry::Abort(e) => db_error(e),
            Retry::Fail(e) => e,
        };
        upsert_buckets(tx, tables.0, &std::mem::take(&mut self.buckets)).await.map_err(retry)?;
        insert_faulty(tx, tables.1, &std::mem::take(&mut self.faulty)).await.map_err(db_error)?;
        upsert_tails(tx, tables.2, &std::mem::take(&mut self.tails)).await.map_err(db_error)?;
        let maxes = std::mem::take(&mut self.maxes);
        if !maxes.is_empty() {
            update_max(tx, &maxes).await.map_err(db_error)?;
        }
        Ok(())
    }
}

impl PgStore {
    /// Whether `rollup_meta` says the rollups are built.
    pub async fn rollups_built(&self) -> Result<bool, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        built(&client).await
    }

    /// Builds the rollups at connect when the database was written without them (before
    /// migration 5), under the migration advisory lock, logging progress.
    pub async fn ensure_rollups(&self) -> Result<(), StoreError> {
        if self.rollups_built().await? {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(db_error)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PG_MIGRATION_LOCK_KEY]).await.map_err(db_error)?;
        if built(&tx).await? {
            return Ok(());
        }
        tracing::info!("building rollups from the stored records");
        let records = rebuild_in(&tx).await?;
        tx.commit().await.map_err(db_error)?;
        tracing::info!(records, elapsed_ms = started.elapsed().as_millis() as u64, "rollups built");
        Ok(())
    }

    /// Derives the rollups again from the records, in one transaction (see the module docs).
    /// O(records) time, O(one batch) memory. Returns the records seen.
    pub async fn rebuild_rollups(&self) -> Result<u64, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(db_error)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PG_MIGRATION_LOCK_KEY]).await.map_err(db_error)?;
        let seen = rebuild_in(&tx).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(seen)
    }

    /// Compares the stored rollups with a derivation from the records (written to temporary
    /// tables): every record's running maximum, every bucket, the faulty records, the epoch
    /// tails. Returns what differs (at most `limit` described).
    pub async fn check_rollups(&self, limit: usize) -> Result<RollupCheck, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .start()
            .await
            .map_err(db_error)?;
        tx.batch_execute("SET LOCAL statement_timeout = 0").await.map_err(db_error)?;
        let mut out = RollupCheck::default();
        let note = |out: &mut RollupCheck, what: String| {
            out.differences = out.differences.saturating_add(1);
            if out.described.len() < limit {
                out.described.push(what);
            }
        };
        if !built(&tx).await? {
            note(&mut out, "rollups are not marked built".into());
        }
        tx.batch_execute(
            "CREATE TEMP TABLE rollup_check_buckets (LIKE rollup_buckets INCLUDING ALL) ON COMMIT DROP;
             CREATE TEMP TABLE rollup_check_faulty (LIKE rollup_faulty INCLUDING ALL) ON COMMIT DROP;
             CREATE TEMP TABLE rollup_check_tails (LIKE epoch_tails INCLUDING ALL) ON COMMIT DROP;",
        )
        .await
        .map_err(db_error)?;
        let tables = ("rollup_check_buckets", "rollup_check_faulty", "rollup_check_tails");
        let records = derive_into(&tx, tables, Pass::Check, &mut |d| note(&mut out, d)).await?;
        out.records = records;
        let comparisons = [
            (
                "bucket",
                "SELECT coalesce(s.iccid, d.iccid)::text || ' ' || coalesce(s.bucket, d.bucket)::text,
                        coalesce(s.up::text || '/' || s.down::text || '/' || s.records::text, 'none'),
                        coalesce(d.up::text || '/' || d.down::text || '/' || d.records::text, 'none')
                 FROM rollup_buckets s FULL OUTER JOIN rollup_check_buckets d
                      ON s.iccid = d.iccid AND s.bucket = d.bucket
                 WHERE s.iccid IS NULL OR d.iccid IS NULL
                    OR s.up <> d.up OR s.down <> d.down OR s.records <> d.records
                 ORDER BY 1",
            ),
            (
                "faulty",
                "SELECT concat_ws(' ', coalesce(s.iccid, d.iccid), coalesce(s.meter_id, d.meter_id),
                                  coalesce(s.epoch, d.epoch), coalesce(s.seq, d.seq)),
                        CASE WHEN s.iccid IS NULL THEN 'none' ELSE 'listed' END,
                        CASE WHEN d.iccid IS NULL THEN 'none' ELSE 'listed' END
                 FROM rollup_faulty s FULL OUTER JOIN rollup_check_faulty d
                      ON s.iccid = d.iccid AND s.meter_id = d.meter_id AND s.epoch = d.epoch AND s.seq = d.seq
                 WHERE s.iccid IS NULL OR d.iccid IS NULL
                 ORDER BY 1",
            ),
            (
                "tail",
                "SELECT coalesce(s.meter_id, d.meter_id)::text || ' ' || coalesce(s.epoch, d.epoch)::text,
                        coalesce(coalesce(s.last_seq::text, '-') || '/' || s.max_up::text || '/' || s.max_down::text, 'none'),
                        coalesce(coalesce(d.last_seq::text, '-') || '/' || d.max_up::text || '/' || d.max_down::text, 'none')
                 FROM epoch_tails s FULL OUTER JOIN rollup_check_tails d
                      ON s.meter_id = d.meter_id AND s.epoch = d.epoch
                 WHERE s.meter_id IS NULL OR d.meter_id IS NULL OR s.last_seq IS DISTINCT FROM d.last_seq
                    OR s.max_up <> d.max_up OR s.max_down <> d.max_down
                 ORDER BY 1",
            ),
        ];
        for (what, sql) in comparisons {
            let portal = tx.bind(sql, &[]).await.map_err(db_error)?;
            loop {
                let rows = tx.query_portal(&portal, PG_USAGE_FETCH_ROWS).await.map_err(db_error)?;
                if rows.is_empty() {
                    break;
                }
                for row in rows {
                    let key: String = row.try_get(0).map_err(db_error)?;
                    let stored: String = row.try_get(1).map_err(db_error)?;
                    let derived: String = row.try_get(2).map_err(db_error)?;
                    note(&mut out, format!("{what} {key}: stored {stored}, derived {derived}"));
                }
            }
        }
        tx.commit().await.map_err(db_error)?;
        Ok(out)
    }

    /// Bytes per (ICCID, day in `tz`) from the rollups: of one SIM or of all, only the days
    /// in `range`; the same [`Derived`] as the sled reader
    /// ([`crate::store::sled::Store::rollup_daily_in`]): faulty SIMs first (their first
    /// faulty record), a SIM whose bucket sums leave 64 bits an overflow fault, zones whose
    /// day boundaries are not on quarter hours answered by the full derivation.
    pub async fn rollup_daily_in(
        &self,
        iccid: Option<u64>,
        tz: &TimeZone,
        range: DateRange,
    ) -> Result<Derived, StoreError> {
        let (first_row, last_row) = rows_of_range(tz, range);
        if !rows_on_buckets(tz, first_row, last_row) {
            let mut all = self.derive_from_records_in(iccid, tz).await?;
            all.daily.retain(|(_, d), _| range.contains(*d));
            return Ok(all);
        }
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = read_snapshot(&mut client).await?;
        let out = rollup_daily_tx(&tx, iccid, tz, range, (first_row, last_row)).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(out)
    }

    /// One page of SIMs' usage per day in `tz` over `range` (see [`SimPage`]), as
    /// [`crate::store::sled::Store::rollup_page_in`]: the SIMs with buckets in the range after
    /// `page.after` in unsigned ICCID order, found through the `(bucket / 96, iccid)` index
    /// one UTC day at a time, then their buckets by primary key. Costs the page's SIMs times
    /// the days in the range, whatever the history and fleet size.
    pub async fn rollup_page_in(
        &self,
        tz: &TimeZone,
        range: DateRange,
        page: SimPage,
    ) -> Result<UsagePage, StoreError> {
        let (first_row, last_row) = rows_of_range(tz, range);
        if !rows_on_buckets(tz, first_row, last_row) {
            let mut all = self.derive_from_records_in(None, tz).await?;
            all.daily.retain(|(_, d), _| range.contains(*d));
            return Ok(UsagePage::cut(all, page));
        }
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = read_snapshot(&mut client).await?;
        let out = rollup_page_tx(&tx, tz, range, page).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(out)
    }
}

/// [`PgStore::rollup_page_in`] inside the transaction `tx`, over the UTC days `rows` (whose
/// day boundaries in `tz` are on buckets).
pub(super) async fn rollup_page_tx(
    tx: &deadpool_postgres::Transaction<'_>,
    tz: &TimeZone,
    range: DateRange,
    page: SimPage,
) -> Result<UsagePage, StoreError> {
    let (first_row, last_row) = rows_of_range(tz, range);
    if !rows_on_buckets(tz, first_row, last_row) {
        // Days not on buckets (offsets of seconds, before 1972): exact from the records.
        let mut all = Derived::default();
        super::for_each_meter(tx, None, |meter| {
            all.absorb(countersign_rating::usage::derive_daily_in(meter, tz)?);
            Ok(())
        })
        .await?;
        all.daily.retain(|(_, d), _| range.contains(*d));
        return Ok(UsagePage::cut(all, page));
    }
    let Some(first) = page.first_iccid() else { return Ok(UsagePage::default()) };
    let (first_bucket, end_bucket) = buckets_of_rows(first_row, last_row);
    // The UTC days to probe: an unbounded end of the range is the first or last day with
    // buckets (min and max of the index's leading key: two index probes).
    let (mut d1, mut d2) = (i64::from(first_row), i64::from(last_row));
    if first_row == 0 || last_row == u32::MAX {
        let bounds = tx
            .query_one(
                &format!(
                    "SELECT min(bucket / {BUCKETS_PER_DAY}), max(bucket / {BUCKETS_PER_DAY}) FROM rollup_buckets
                     WHERE bucket / {BUCKETS_PER_DAY} BETWEEN $1 AND $2"
                ),
                &[&d1, &d2],
            )
            .await
            .map_err(db_error)?;
        match (bounds.try_get(0).map_err(db_error)?, bounds.try_get(1).map_err(db_error)?) {
            (Some(lo), Some(hi)) => (d1, d2) = (lo, hi),
            _ => {
                let faults = faults_in(tx, first, u64::MAX).await?;
                return Ok(UsagePage {
                    derived: faults_then_rows(faults, Derived::default()),
                    next_after: None,
                });
            }
        }
    }
    let want = i64::try_from(page.limit.saturating_add(1)).unwrap_or(i64::MAX);
    let mut sims: Vec<u64> = Vec::new();
    for (a, b) in sql_spans(first, u64::MAX) {
        let need = want - sims.len() as i64;
        if need <= 0 {
            break;
        }
        let rows = tx
            .query(
                &format!(
                    "SELECT DISTINCT s.iccid FROM generate_series($1::bigint, $2::bigint) AS d(day),
                     LATERAL (SELECT DISTINCT iccid FROM rollup_buckets
                              WHERE bucket / {BUCKETS_PER_DAY} = d.day AND iccid BETWEEN $3 AND $4
                                AND bucket >= $5 AND bucket < $6 AND records > 0
                              ORDER BY iccid LIMIT $7) s
                     ORDER BY s.iccid LIMIT $7"
                ),
                &[&d1, &d2, &a, &b, &first_bucket, &end_bucket, &need],
            )
            .await
            .map_err(db_error)?;
        for r in rows {
            sims.push(u64_from_sql(r.try_get(0).map_err(db_error)?));
        }
    }
    let next_after = (sims.len() > page.limit).then(|| sims[page.limit - 1]);
    sims.truncate(page.limit);
    let faults = faults_in(tx, first, next_after.unwrap_or(u64::MAX)).await?;
    let keys: Vec<i64> = sims.iter().map(|s| u64_to_sql(*s)).collect();
    let portal = tx
        .bind(
            "SELECT iccid, bucket, up::text, down::text FROM rollup_buckets
             WHERE iccid = ANY($1) AND bucket >= $2 AND bucket < $3 AND records > 0",
            &[&keys, &first_bucket, &end_bucket],
        )
        .await
        .map_err(db_error)?;
    let rows = read_buckets(tx, &portal, tz, range).await?;
    Ok(UsagePage { derived: faults_then_rows(faults, rows), next_after })
}

/// One SIM's usage per day in `tz` over `range` inside `tx` (from the records where the
/// zone's days are not whole quarter hours).
pub(super) async fn rollup_sim_tx(
    tx: &deadpool_postgres::Transaction<'_>,
    sim: u64,
    tz: &TimeZone,
    range: DateRange,
) -> Result<Derived, StoreError> {
    let rows = rows_of_range(tz, range);
    if rows_on_buckets(tz, rows.0, rows.1) {
        return rollup_daily_tx(tx, Some(sim), tz, range, rows).await;
    }
    let mut total = Derived::default();
    super::for_each_meter(tx, Some(sim), |meter| {
        total.absorb(countersign_rating::usage::derive_daily_in(meter, tz)?);
        Ok(())
    })
    .await?;
    total.retain_sim(sim);
    total.daily.retain(|(_, d), _| range.contains(*d));
    Ok(total)
}

/// [`PgStore::rollup_daily_in`] inside the snapshot `tx`, over the UTC days `rows` (whose day
/// boundaries in `tz` are on buckets).
pub(super) async fn rollup_daily_tx(
    tx: &deadpool_postgres::Transaction<'_>,
    iccid: Option<u64>,
    tz: &TimeZone,
    range: DateRange,
    (first_row, last_row): (u32, u32),
) -> Result<Derived, StoreError> {
    let faults = match iccid {
        Some(sim) => faults_in(tx, sim, sim).await?,
        None => faults_in(tx, 0, u64::MAX).await?,
    };
    let (first_bucket, end_bucket) = buckets_of_rows(first_row, last_row);
    let buckets = "SELECT iccid, bucket, up::text, down::text FROM rollup_buckets
         WHERE bucket >= $1 AND bucket < $2 AND records > 0";
    let portal = match iccid {
        Some(sim) => {
            tx.bind(&format!("{buckets} AND iccid = $3"), &[&first_bucket, &end_bucket, &u64_to_sql(sim)])
                .await
        }
        // The day expression lets the range use the (day, iccid) index.
        None => {
            let (d1, d2) = (i64::from(first_row), i64::from(last_row));
            tx.bind(
                &format!("{buckets} AND bucket / {BUCKETS_PER_DAY} BETWEEN $3 AND $4"),
                &[&first_bucket, &end_bucket, &d1, &d2],
            )
            .await
        }
    }
    .map_err(db_error)?;
    let rows = read_buckets(tx, &portal, tz, range).await?;
    Ok(faults_then_rows(faults, rows))
}

/// The buckets `[first, end)` of UTC days `first_row` through `last_row`.
fn buckets_of_rows(first_row: u32, last_row: u32) -> (i64, i64) {
    let per_day = BUCKETS_PER_DAY as i64;
    (
        i64::from(first_row).saturating_mul(per_day),
        i64::from(last_row).saturating_add(1).saturating_mul(per_day),
    )
}

/// The unsigned ICCIDs `first..=last` as spans of the signed column, in unsigned order:
/// ICCIDs below 2^63 are the non-negative values, the rest follow as the negative ones.
pub(super) fn sql_spans(first: u64, last: u64) -> Vec<(i64, i64)> {
    const HIGH: u64 = 1 << 63;
    if first > last {
        Vec::new()
    } else if last < HIGH || first >= HIGH {
        vec![(u64_to_sql(first), u64_to_sql(last))]
    } else {
        vec![(u64_to_sql(first), i64::MAX), (i64::MIN, u64_to_sql(last))]
    }
}

/// The first faulty record of each faulty SIM among ICCIDs `first..=last`.
async fn faults_in(
    tx: &deadpool_postgres::Transaction<'_>,
    first: u64,
    last: u64,
) -> Result<Vec<SimFault>, StoreError> {
    let mut out = Vec::new();
    for (a, b) in sql_spans(first, last) {
        let rows = tx
            .query(
                "SELECT DISTINCT ON (f.iccid) f.meter_id, f.epoch, f.seq, r.received_ms, r.report, f.iccid
                 FROM rollup_faulty f LEFT JOIN records r
                      ON r.iccid = f.iccid AND r.meter_id = f.meter_id AND r.epoch = f.epoch AND r.seq = f.seq
                 WHERE f.iccid BETWEEN $1 AND $2
                 ORDER BY f.iccid, (f.meter_id < 0), f.meter_id, f.epoch, f.seq",
                &[&a, &b],
            )
            .await
            .map_err(db_error)?;
        for row in &rows {
            out.push(fault_row(row)?);
        }
    }
    Ok(out)
}

/// Reads bucket rows `(iccid, bucket, up, down)` from `portal` into per-day usage in `tz`,
/// keeping the days in `range`.
async fn read_buckets(
    tx: &deadpool_postgres::Transaction<'_>,
    portal: &tokio_postgres::Portal,
    tz: &TimeZone,
    range: DateRange,
) -> Result<Derived, StoreError> {
    let mut out = Derived::default();
    // The zone's date of each bucket, cached: most rows share a handful of days.
    let mut dates: HashMap<u64, Option<Date>> = HashMap::new();
    // Overflow of a SIM's total is blamed on no record: buckets do not keep record ids.
    let unnamed = RecordId { meter_id: 0, epoch: 0, seq: 0 };
    loop {
        let rows = tx.query_portal(portal, PG_USAGE_FETCH_ROWS).await.map_err(db_error)?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            let sim = u64_from_sql(row.try_get(0).map_err(db_error)?);
            let bucket: i64 = row.try_get(1).map_err(db_error)?;
            let up: String = row.try_get(2).map_err(db_error)?;
            let down: String = row.try_get(3).map_err(db_error)?;
            let bucket = u64::try_from(bucket)
                .map_err(|_| StoreError::Corrupt(format!("rollup bucket {bucket} is negative")))?;
            let date = *dates.entry(bucket).or_insert_with(|| bucket_date(bucket, tz));
            let date =
                date.ok_or_else(|| StoreError::Corrupt(format!("rollup bucket {bucket} has no date")))?;
            if !range.contains(date) {
                continue;
            }
            let parse = |s: &str| {
                s.parse::<u128>()
                    .map_err(|_| StoreError::Corrupt(format!("rollup bucket {bucket} of {sim}: bytes {s}")))
            };
            let (up, down) = (parse(&up)?, parse(&down)?);
            match (u64::try_from(up), u64::try_from(down)) {
                (Ok(up), Ok(down)) => out.add(sim, unnamed, date, Totals { up, down }),
                _ => out.fault(SimFault { iccid: sim, record: unnamed, reason: FaultReason::Overflow }),
            }
        }
    }
    Ok(out)
}

/// The answer of a read: faulty SIMs first (their first faulty record wins over an overflow
/// of their rows), then the rows of every other SIM.
fn faults_then_rows(faults: Vec<SimFault>, rows: Derived) -> Derived {
    let mut out = Derived::default();
    for f in faults {
        out.fault(f);
    }
    out.absorb(rows);
    out
}

async fn built(client: &impl deadpool_postgres::GenericClient) -> Result<bool, StoreError> {
    let row = client
        .query_opt("SELECT value FROM rollup_meta WHERE name = $1", &[&META_BUILT])
        .await
        .map_err(db_error)?;
    Ok(match row {
        Some(r) => r.try_get::<_, String>(0).map_err(db_error)? == PG_ROLLUP_VERSION,
        None => false,
    })
}

fn fault_row(row: &Row) -> Result<SimFault, StoreError> {
    let iccid = u64_from_sql(row.try_get(5).map_err(db_error)?);
    let report: Option<&[u8]> = row.try_get(4).map_err(db_error)?;
    let id = RecordId {
        meter_id: u64_from_sql(row.try_get(0).map_err(db_error)?),
        epoch: u32_from_sql("epoch", row.try_get(1).map_err(db_error)?)?,
        seq: u32_from_sql("seq", row.try_get(2).map_err(db_error)?)?,
    };
    if report.is_none() {
        return Err(StoreError::Corrupt(format!("record {id}: listed faulty but not stored")));
    }
    let usage = usage_record(row)?;
    let reason = record_fault(&usage)
        .ok_or_else(|| StoreError::Corrupt(format!("record {id}: listed faulty but counts")))?;
    Ok(SimFault { iccid, record: id, reason })
}

/// Clears the rollups and derives them again from the records, inside `tx` (which holds the
/// migration advisory lock). Holds `epoch_tails` in EXCLUSIVE mode first, so that no ingest
/// commits while the records are read.
async fn rebuild_in(tx: &deadpool_postgres::Transaction<'_>) -> Result<u64, StoreError> {
    // One pass over every record: no statement timeout (the sort of a large table alone can
    // take longer than a request's).
    tx.batch_execute(
        "SET LOCAL statement_timeout = 0;
         LOCK TABLE epoch_tails IN EXCLUSIVE MODE;
         DELETE FROM rollup_buckets;
         DELETE FROM rollup_faulty;
         DELETE FROM epoch_tails;
         DELETE FROM rollup_meta WHERE name = 'built';",
    )
    .await
    .map_err(db_error)?;
    let seen =
        derive_into(tx, ("rollup_buckets", "rollup_faulty", "epoch_tails"), Pass::Rebuild, &mut |_| {})
            .await?;
    tx.execute("INSERT INTO rollup_meta (name, value) VALUES ($1, $2)", &[&META_BUILT, &PG_ROLLUP_VERSION])
        .await
        .map_err(db_error)?;
    Ok(seen)
}

/// Streams every record in record id order, deriving each epoch's running maximum, the
/// buckets, the faulty records and the tails into `tables` (buckets, faulty, tails; empty).
/// With [`Pass::Rebuild`] writes each record's running maximum where it differs; with
/// [`Pass::Check`] describes the differences in `differences`. Returns the records seen.
async fn derive_into(
    tx: &deadpool_postgres::Transaction<'_>,
    tables: (&str, &str, &str),
    pass: Pass,
    differences: &mut (dyn FnMut(String) + Send),
) -> Result<u64, StoreError> {
    let portal = tx
        .bind(
            "SELECT meter_id, epoch, seq, received_ms, report, max_up, max_down FROM records
             ORDER BY (meter_id < 0), meter_id, epoch, seq",
            &[],
        )
        .await
        .map_err(db_error)?;
    let mut seen = 0u64;
    let mut epoch: Option<(u64, u32)> = None;
    let mut tail = Tail::default();
    let mut d = Derivation::default();
    let started = std::time::Instant::now();
    loop {
        let rows = tx.query_portal(&portal, PG_USAGE_FETCH_ROWS).await.map_err(db_error)?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            let r: UsageRecord = usage_record(&row)?;
            let stored_max: (Option<i64>, Option<i64>) =
                (row.try_get(5).map_err(db_error)?, row.try_get(6).map_err(db_error)?);
            if epoch != Some((r.id.meter_id, r.id.epoch)) {
                if let Some((m, e)) = epoch {
                    d.tails.push(((u64_to_sql(m), i64::from(e)), tail));
                }
                epoch = Some((r.id.meter_id, r.id.epoch));
                tail = Tail::default();
            }
            let before = tail.max;
            let max = Totals { up: before.up.max(r.used.up), down: before.down.max(r.used.down) };
            tail = Tail { last_seq: Some(r.id.seq), max };
            let entry = EpochEntry::of(&r);
            match entry.bucket {
                Some(bucket) => {
                    // Cannot underflow: the running maximum only rises.
                    let up = i128::from(max.up) - i128::from(before.up);
                    let down = i128::from(max.down) - i128::from(before.down);
                    add_delta(&mut d.buckets, r.iccid, bucket, up, down, 1)?;
                }
                None => {
                    let (m, e, s) = sql_key(r.id);
                    d.faulty.push((u64_to_sql(r.iccid), m, e, s));
                }
            }
            let stored = match stored_max {
                (Some(up), Some(down)) => Some(Totals { up: u64_from_sql(up), down: u64_from_sql(down) }),
                _ => None,
            };
            if stored != Some(max) {
                match pass {
                    Pass::Rebuild => {
                        let (m, e, s) = sql_key(r.id);
                        d.maxes.push((u64_to_sql(r.iccid), m, e, s, max));
                    }
                    Pass::Check => {
                        differences(format!("record {}: running maximum {stored:?}, derived {max:?}", r.id))
                    }
                }
            }
            seen = seen.saturating_add(1);
            if seen % PG_REBUILD_BATCH_RECORDS == 0 {
                d.flush(tx, tables).await?;
            }
            if seen % PG_REBUILD_PROGRESS_RECORDS == 0 {
                tracing::info!(
                    records = seen,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "deriving rollups"
                );
            }
        }
    }
    if let Some((m, e)) = epoch {
        d.tails.push(((u64_to_sql(m), i64::from(e)), tail));
    }
    d.flush(tx, tables).await?;
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use countersign_rating::usage::{time_zone, USED_BYTES_PER_EPOCH_MAX};
    use countersign_testkit::report::{network_time, ReportBuilder};
    use proptest::prelude::*;
    use proptest::test_runner::{TestCaseError, TestRunner};

    use super::*;
    use crate::store::postgres::testing::TestDatabase;

    const KEY: [u8; 32] = [9u8; 32];
    /// The last is above 2^63: PostgreSQL stores it as a negative BIGINT, pages still run in
    /// unsigned order.
    const SIMS: [u64; 4] = [
        8_988_280_666_000_000_001,
        8_988_280_666_000_000_002,
        8_988_280_666_000_000_003,
        9_300_000_000_000_000_001,
    ];
    /// 2026-03-29T00:00:00Z: Europe's spring DST change is in the first day.
    const START_S: u64 = 1_774_742_400;

    /// (meter, epoch, seq, sim, up, down, seconds after START_S, faulty)
    type Spec = (u64, u32, u32, usize, u64, u64, u64, bool);

    fn new_record(s: Spec) -> NewRecord {
        let (meter, epoch, seq, sim, up, down, at, faulty) = s;
        let up = if faulty { USED_BYTES_PER_EPOCH_MAX + 1 } else { up };
        let r =
            ReportBuilder::new(meter, seq, SIMS[sim], network_time(START_S + at)).epoch(epoch).used(up, down);
        NewRecord::new(r.report(), (START_S + at) * 1000, r.encode(&KEY).into())
    }

    fn specs() -> impl Strategy<Value = Vec<Spec>> {
        prop::collection::vec(
            (
                1u64..4,
                0u32..2,
                0u32..25,
                0usize..4,
                0u64..5_000,
                0u64..5_000,
                0u64..3 * 86_400,
                prop::bool::weighted(0.02),
            ),
            1..60,
        )
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    }

    async fn connect(db: &TestDatabase) -> PgStore {
        PgStore::connect(&db.url(), 4).await.unwrap()
    }

    async fn sql(store: &PgStore, statements: &str) {
        let client = store.pool.get().await.unwrap();
        client.batch_execute(statements).await.unwrap();
    }

    fn in_range(d: &Derived, sim: Option<u64>, range: DateRange) -> BTreeMap<(u64, Date), Totals> {
        d.daily
            .iter()
            .filter(|((s, day), _)| sim.is_none_or(|x| x == *s) && range.contains(*day))
            .map(|(k, v)| (*k, *v))
            .collect()
    }

    /// Records in any arrival order and batching, with duplicates and conflicting copies,
    /// give rollups equal to the full derivation over what was stored, in UTC and two zones
    /// and for any one SIM and range; the check finds nothing and a rebuild changes nothing.
    #[test]
    fn rollups_equal_the_derivation_for_any_arrival() {
        let rt = runtime();
        let db = rt.block_on(TestDatabase::create()).unwrap();
        let store = rt.block_on(connect(&db));
        let mut runner = TestRunner::new(ProptestConfig::with_cases(24));
        let strategy = (
            specs(),
            prop::collection::vec(1usize..8, 1..20),
            prop::sample::select(vec!["UTC", "Europe/Berlin", "Asia/Kathmandu"]),
            0u8..3,
            0u8..3,
            1usize..4,
        );
        runner
            .run(&strategy, |(specs, cuts, zone, from_day, days, page_limit)| {
                rt.block_on(async {
                    sql(&store, "TRUNCATE records, record_ids, rollup_buckets, rollup_faulty, epoch_tails")
                        .await;
                    let records: Vec<NewRecord> = specs.into_iter().map(new_record).collect();
                    let mut at = 0;
                    for cut in cuts.iter().cycle() {
                        if at >= records.len() {
                            break;
                        }
                        let end = (at + cut).min(records.len());
                        store.insert_batch(1, &records[at..end]).await.unwrap();
                        at = end;
                    }
                    let tz = time_zone(zone).unwrap();
                    let model = store.derive_from_records_in(None, &tz).await.unwrap();
                    let rolled = store.rollup_daily_in(None, &tz, DateRange::default()).await.unwrap();
                    prop_assert_eq!(&rolled.daily, &model.daily);
                    prop_assert_eq!(&rolled.faults, &model.faults);
                    let first = time::macros::date!(2026 - 03 - 29)
                        .saturating_add(time::Duration::days(i64::from(from_day)));
                    let range = DateRange {
                        from: Some(first),
                        to: Some(first.saturating_add(time::Duration::days(i64::from(days)))),
                    };
                    let every = store.rollup_daily_in(None, &tz, range).await.unwrap();
                    prop_assert_eq!(every.daily, in_range(&model, None, range));
                    prop_assert_eq!(&every.faults, &model.faults);
                    // Pages of any size, walked by their cursors in unsigned ICCID order, add
                    // up to the same answer, with each SIM on exactly one page.
                    for r in [range, DateRange::default()] {
                        let (mut daily, mut faults) = (BTreeMap::new(), BTreeMap::new());
                        let mut page = SimPage { after: None, limit: page_limit };
                        for _ in 0..=SIMS.len() + 1 {
                            let got = store.rollup_page_in(&tz, r, page).await.unwrap();
                            let sims: std::collections::BTreeSet<u64> =
                                got.derived.daily.keys().map(|(i, _)| *i).collect();
                            prop_assert!(sims.len() <= page_limit);
                            prop_assert!(sims.iter().all(|i| page.after.is_none_or(|a| *i > a)));
                            prop_assert!(got.next_after.is_none_or(|n| sims.iter().all(|i| *i <= n)));
                            daily.extend(got.derived.daily);
                            faults.extend(got.derived.faults);
                            match got.next_after {
                                Some(n) => page.after = Some(n),
                                None => break,
                            }
                        }
                        prop_assert_eq!(daily, in_range(&model, None, r));
                        prop_assert_eq!(&faults, &model.faults);
                    }
                    for sim in SIMS {
                        let one = store.rollup_daily_in(Some(sim), &tz, range).await.unwrap();
                        prop_assert_eq!(one.daily, in_range(&model, Some(sim), range));
                        prop_assert_eq!(one.faults.get(&sim), model.faults.get(&sim));
                    }
                    let check = store.check_rollups(5).await.unwrap();
                    prop_assert_eq!(check.differences, 0, "{:?}", check.described);
                    store.rebuild_rollups().await.unwrap();
                    let again = store.rollup_daily_in(None, &tz, DateRange::default()).await.unwrap();
                    prop_assert_eq!(again.daily, rolled.daily);
                    Ok::<(), TestCaseError>(())
                })
            })
            .unwrap();
    }

    #[test]
    fn a_late_record_moves_usage_and_the_check_sees_tampering() {
        let rt = runtime();
        let db = rt.block_on(TestDatabase::create()).unwrap();
        rt.block_on(async {
            let store = connect(&db).await;
            // seq 0 (100) and seq 2 (300) a day apart; seq 1 (250) arrives last.
            let day = 86_400;
            let r = |seq, up, at| new_record((1, 0, seq, 0, up, 0, at, false));
            store.insert_batch(1, &[r(0, 100, 0), r(2, 300, 2 * day)]).await.unwrap();
            store.insert_batch(1, &[r(1, 250, day)]).await.unwrap();
            let got = store.daily_usage(None, DateRange::default()).await.unwrap();
            let ups: Vec<u64> = got.daily.values().map(|t| t.up).collect();
            assert_eq!(ups, [100, 150, 50]);
            assert_eq!(store.check_rollups(10).await.unwrap().differences, 0);
            // A contribution changed behind the store's back is found, and a rebuild mends it.
            sql(&store, "UPDATE rollup_buckets SET up = up + 1 WHERE bucket = (SELECT min(bucket) FROM rollup_buckets)")
                .await;
            let check = store.check_rollups(10).await.unwrap();
            assert_eq!(check.differences, 1, "{check:?}");
            assert!(check.described[0].starts_with("bucket "), "{check:?}");
            store.rebuild_rollups().await.unwrap();
            assert_eq!(store.check_rollups(10).await.unwrap().differences, 0);
        });
    }

    /// Batches of the same epochs ingested concurrently, late records included, in any
    /// interleaving: the tails serialise them and the rollups equal the derivation.
    #[test]
    fn concurrent_batches_of_the_same_epochs_keep_the_rollups_exact() {
        let rt = runtime();
        let db = rt.block_on(TestDatabase::create()).unwrap();
        rt.block_on(async {
            let store = connect(&db).await;
            // Two meters, two epochs each, 60 seqs, dealt round-robin to 6 writers in
            // descending seq order (every writer's batches are late against the others').
            let mut specs: Vec<Spec> = Vec::new();
            for meter in 1..=2u64 {
                for epoch in 0..2u32 {
                    for seq in (0..60u32).rev() {
                        let (sim, at) = ((seq % 3) as usize, 700 * u64::from(seq));
                        let used = u64::from(seq.wrapping_mul(7919) % 5_000);
                        specs.push((meter, epoch, seq, sim, used, used / 2, at, seq == 41));
                    }
                }
            }
            let writers = 6;
            let mut tasks = Vec::new();
            for w in 0..writers {
                let mine: Vec<NewRecord> = specs
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i % writers == w)
                    .map(|(_, s)| new_record(*s))
                    .collect();
                let store = store.clone();
                tasks.push(tokio::spawn(async move {
                    for batch in mine.chunks(5) {
                        store.insert_batch(1, batch).await.unwrap();
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            assert_eq!(store.record_count().await.unwrap(), 240);
            for zone in ["UTC", "Asia/Kathmandu"] {
                let tz = time_zone(zone).unwrap();
                let model = store.derive_from_records_in(None, &tz).await.unwrap();
                let rolled = store.rollup_daily_in(None, &tz, DateRange::default()).await.unwrap();
                assert_eq!(rolled.daily, model.daily, "{zone}");
                assert_eq!(rolled.faults, model.faults, "{zone}");
            }
            let check = store.check_rollups(10).await.unwrap();
            assert_eq!(check.differences, 0, "{check:?}");
        });
    }

    /// A late record that raises more later records than one read chunk holds reads on.
    #[test]
    fn a_late_record_raising_a_long_epoch_reads_it_in_growing_chunks() {
        let rt = runtime();
        let db = rt.block_on(TestDatabase::create()).unwrap();
        rt.block_on(async {
            let store = connect(&db).await;
            let n = 3 * PG_LATE_READ_ROWS_FIRST as u32;
            let later: Vec<NewRecord> = (1..=n)
                .map(|seq| new_record((1, 0, seq, 0, u64::from(seq), 0, 60 * u64::from(seq), false)))
                .collect();
            store.insert_batch(1, &later).await.unwrap();
            store.insert_batch(1, &[new_record((1, 0, 0, 1, 10_000, 7, 0, false))]).await.unwrap();
            let model = store.derive_from_records_in(None, &TimeZone::UTC).await.unwrap();
            let rolled = store.daily_usage(None, DateRange::default()).await.unwrap();
            assert_eq!(rolled.daily, model.daily);
            assert_eq!(rolled.faults, model.faults);
            assert_eq!(store.check_rollups(10).await.unwrap().differences, 0);
        });
    }

    /// A database written before migration 5 (records without running maxima, no rollup
    /// tables) gets its rollups when a new version connects.
    #[test]
    fn a_database_without_rollups_builds_them_at_connect() {
        let rt = runtime();
        let db = rt.block_on(TestDatabase::create()).unwrap();
        rt.block_on(async {
            {
                let store = connect(&db).await;
                let r = |seq: u32, up, faulty| {
                    new_record((1, 0, seq, (seq % 2) as usize, up, 0, 600 * u64::from(seq), faulty))
                };
                store
                    .insert_batch(1, &[r(0, 10, false), r(1, 30, false), r(2, 45, false), r(3, 0, true)])
                    .await
                    .unwrap();
                // As the previous version left it.
                sql(
                    &store,
                    "ALTER TABLE records DROP COLUMN max_up, DROP COLUMN max_down;
                     DROP TABLE rollup_buckets, rollup_faulty, epoch_tails, rollup_meta;
                     DELETE FROM schema_migrations WHERE version = 5;",
                )
                .await;
            }
            let store = connect(&db).await;
            assert!(store.rollups_built().await.unwrap());
            assert_eq!(store.check_rollups(10).await.unwrap().differences, 0);
            let got = store.daily_usage(None, DateRange::default()).await.unwrap();
            let model = store.derive_from_records_in(None, &TimeZone::UTC).await.unwrap();
            assert_eq!(got.daily, model.daily);
            assert_eq!(got.faults, model.faults);
            assert_eq!(got.faults.len(), 1);
            assert_eq!(got.daily.values().map(|t| t.up).sum::<u64>(), 45 - 30 + 10);
            // Ingest goes on from the built tails.
            store.insert_batch(1, &[new_record((1, 0, 4, 0, 100, 0, 3_000, false))]).await.unwrap();
            assert_eq!(store.check_rollups(10).await.unwrap().differences, 0);
        });
    }
}
