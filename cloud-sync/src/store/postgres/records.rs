//! Tables `records` and `record_ids`: verified reports stored once by record id (claimed in
//! `record_ids`, then stored in `records`, in one transaction), and usage derived from them
//! meter by meter.

use std::collections::{HashMap, HashSet};

use countersign_meter::{RecordId, Report};
use tokio_postgres::Row;

use super::{
    db_error, is_retryable_abort, pool_error, read_snapshot, u32_from_sql, u64_from_sql, u64_to_sql, PgStore,
    PG_TRANSACTION_ATTEMPTS_MAX,
};
use crate::store::{InsertOutcome, NewRecord, StoreError, StoredRecord};
use countersign_rating::usage::{derive_daily_in, DateRange, Derived, TimeZone, UsageError, UsageRecord};

/// Rows fetched per round trip while streaming records for a usage query.
pub const PG_USAGE_FETCH_ROWS: i32 = 10_000;

/// A row to claim in `record_ids` and, if claimed, store in `records`.
struct Input<'a> {
    index: usize,
    record: &'a NewRecord,
}

impl PgStore {
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
            // The rollups first: locks the epochs' tails and plans every new record.
            let new_records: Vec<&NewRecord> = new.iter().map(|i| i.record).collect();
            let rollups = super::rollups::plan_batch(&tx, &new_records).await?;
            let store = tx
                .prepare_cached(
                    "INSERT INTO records
                         (iccid, meter_id, epoch, seq, gateway_id, received_ms, report, max_up, max_down)
                     SELECT u.iccid, u.meter_id, u.epoch, u.seq, $5, u.received_ms, u.report, u.mu, u.md
                     FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[], $6::int8[], $7::bytea[],
                                 $8::int8[], $9::int8[])
                          AS u(iccid, meter_id, epoch, seq, received_ms, report, mu, md)",
                )
                .await
                .map_err(Retry::from)?;
            let iccid: Vec<i64> = new.iter().map(|i| u64_to_sql(i.record.iccid)).collect();
            let meter: Vec<i64> = new.iter().map(|i| u64_to_sql(i.record.id.meter_id)).collect();
            let epoch: Vec<i64> = new.iter().map(|i| i64::from(i.record.id.epoch)).collect();
            let seq: Vec<i64> = new.iter().map(|i| i64::from(i.record.id.seq)).collect();
            let received: Vec<i64> = new.iter().map(|i| u64_to_sql(i.record.received_ms)).collect();
            let report: Vec<&[u8]> = new.iter().map(|i| &i.record.report[..]).collect();
            let mut max_up = Vec::with_capacity(new.len());
            let mut max_down = Vec::with_capacity(new.len());
            for i in &new {
                let m = rollups.max.get(&i.record.id).ok_or_else(|| {
                    Retry::Fail(StoreError::Corrupt(format!("record {}: not planned", i.record.id)))
                })?;
                max_up.push(u64_to_sql(m.up));
                max_down.push(u64_to_sql(m.down));
            }
            let n = tx
                .execute(
                    &store,
                    &[
                        &iccid,
                        &meter,
                        &epoch,
                        &seq,
                        &u64_to_sql(gateway_id),
                        &received,
                        &report,
                        &max_up,
                        &max_down,
                    ],
                )
                .await
                .map_err(Retry::from)?;
            if usize::try_from(n).ok() != Some(new.len()) {
                return Err(Retry::Fail(StoreError::Corrupt(format!(
                    "stored {n} records for {} claimed ids",
                    new.len()
                ))));
            }
            let gate = super::rollups::ingest_gate(&tx).await?;
            super::rollups::write_plan(&tx, &rollups, &gate).await?;
            if gate.lago_pending {
                // Queued for the Lago planner in the records' own transaction.
                tx.execute(
                    "INSERT INTO lago_pending (iccid, meter_id, epoch, seq)
                     SELECT * FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[])",
                    &[&iccid, &meter, &epoch, &seq],
                )
                .await
                .map_err(Retry::from)?;
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

    /// Bytes per (ICCID, UTC day) from the rollups, of one SIM or of all, only the days in
    /// `range` (see [`PgStore::rollup_daily_in`]).
    pub async fn daily_usage(&self, iccid: Option<u64>, range: DateRange) -> Result<Derived, StoreError> {
        self.rollup_daily_in(iccid, &TimeZone::UTC, range).await
    }

    /// Bytes per (ICCID, day in `tz`) from the rollups, of one SIM or of all, only the days
    /// in `range` (see [`PgStore::rollup_daily_in`]).
    pub async fn daily_usage_in(
        &self,
        iccid: Option<u64>,
        tz: &TimeZone,
        range: DateRange,
    ) -> Result<Derived, StoreError> {
        self.rollup_daily_in(iccid, tz, range).await
    }

    /// Bytes per (ICCID, day in `tz`) derived with [`derive_daily_in`] from the stored
    /// reports in record id order: O(records). The model the rollups are tested against,
    /// and the answer for zones whose days are not whole quarter hours. With `iccid`, only
    /// the meters that ever reported that SIM are read (all of their records: an epoch's
    /// running maximum may span a SIM swap), and only that SIM's days are returned. Streams
    /// the records meter by meter, so memory is bounded by the largest meter's history.
    pub async fn derive_from_records_in(
        &self,
        iccid: Option<u64>,
        tz: &TimeZone,
    ) -> Result<Derived, StoreError> {
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
}

pub(super) enum Retry {
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

pub(crate) fn usage_record(row: &Row) -> Result<UsageRecord, StoreError> {
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
pub(super) async fn for_each_meter(
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
