//! The settlement ledger on PostgreSQL: the same semantics as the sled
//! [`Ledger`](crate::store::sled::ledger::Ledger), with the same pure decision ([`usage::settle`](countersign_rating::usage::settle)); only
//! the IO differs.
//!
//! | table                | key                      | value                                     |
//! | -------------------- | ------------------------ | ----------------------------------------- |
//! | `ledger_meta`        | `name`                   | `tz`: the ledger's zone; `closed_through`: the last day booked from every SIM's rollups (julian day); `changes_before_bucket`: ingest marks changes to earlier buckets |
//! | `ledger_settled`     | `(iccid, day)`           | up, down bytes, `settled_at_s`            |
//! | `ledger_adjustments` | `(iccid, day, seq)`      | delta up, delta down bytes, `made_at_s`   |
//! | `rollup_changed`     | `(iccid, day)` (UTC day) | `mark`: unique (sequence `rollup_changed_mark`) |
//!
//! **Incremental runs.** A run first raises `changes_before_bucket` to the end of the last
//! day closed now, in a transaction of its own holding the exclusive side of the advisory
//! lock [`PG_CHANGES_LOCK_KEY`]; every ingest transaction that writes buckets holds its
//! shared side to commit and reads the mark under it, and marks each SIM and UTC day it
//! changed before the mark in `rollup_changed` (in-order ingest changes only open days and
//! marks nothing). So every change either committed before the raise, and the run's reads
//! see it, or is marked. The run then books the days closed since `closed_through` for every
//! SIM (pages of [`PG_SETTLE_PAGE_SIMS`] from the rollups) and re-settles only the marked
//! SIM-days, deleting each mark only if it still holds the value read (a newer mark stays
//! for the next run). It reads nothing else: its cost follows the days that closed and the
//! SIM-days that late data changed, not history. Equal to a run over the whole history at
//! the same instants (property-tested).
//!
//! **Concurrency: one settlement at a time, under a transaction-level advisory lock.** A run
//! is one READ COMMITTED transaction that first takes `pg_advisory_xact_lock`
//! ([`PG_LEDGER_LOCK_KEY`]), then reads the zone, what closed and what was marked, reads
//! what is booked for those SIM-days, decides with [`usage::settle`](countersign_rating::usage::settle), inserts, and commits, which releases the lock. The
//! lock comes first so that every later statement, each with a fresh snapshot, sees all a
//! previous run committed: two endpoint processes settling at the same moment run one after
//! the other, and the second books only what the first left (usually nothing). Without it
//! both would compute the same adjustment number for a changed day.
//!
//! The primary keys are the backstop: a settled day is inserted with a plain `INSERT`, never
//! upserted, so it is written once, and `(iccid, day, seq)` cannot hold an adjustment number
//! twice. Should two runs ever overlap anyway (an advisory lock is per PostgreSQL node: on
//! Citus every endpoint must talk to the same coordinator), the later insert fails with a
//! unique violation, the whole run rolls back and is run again from the start
//! ([`PG_TRANSACTION_ATTEMPTS_MAX`]), seeing the other run's bookings; a number computed
//! as booked + 1 under one snapshot leaves no gap.
//!
//! A run waits for the lock at most `lock_timeout` ([`PG_STATEMENT_TIMEOUT_MS`](super::PG_STATEMENT_TIMEOUT_MS)); past it
//! the caller gets a recoverable "database unavailable" (HTTP 503) and may retry: the run
//! holding the lock books what there is to book.
//!
//! Unlike on sled, the zone of a run that fails is not kept: it is written in the run's
//! transaction.
//!
//! Bytes are stored as the same 64 bits in `BIGINT` (see the parent module), days as `DATE`
//! (passed as julian day numbers, so no date type crosses the wire).

use std::collections::BTreeMap;

use countersign_meter::Totals;
use jiff::Timestamp;
use time::Date;

use super::rollups::{rollup_page_tx, rollup_sim_tx};
use super::{
    db_error, is_retryable_abort, pool_error, u32_from_sql, u64_from_sql, u64_to_sql, PgStore,
    PG_TRANSACTION_ATTEMPTS_MAX,
};
use crate::store::ledger::{LedgerDay, LedgerError};
use crate::store::rollups::SimPage;
use crate::store::StoreError;
use countersign_rating::rollup::{bucket_date, BUCKET_S};
use countersign_rating::usage::{
    apply_settlement, day_start, settle, time_zone, zone_date, Adjustment, Booked, DateRange, SettledDay,
    Settlement, TimeZone, UsageError, SETTLEMENT_HOURS_MAX,
};

/// Key of the transaction advisory lock a settlement run holds (arbitrary, stable: "ledger").
pub const PG_LEDGER_LOCK_KEY: i64 = 0x6c65_6467_6572_0001;
/// Key of the advisory lock over the ledger's change mark: shared by every ingest
/// transaction that writes buckets, exclusive while a run raises the mark.
pub const PG_CHANGES_LOCK_KEY: i64 = 0x6c65_6467_6572_0002;
/// SIMs whose newly closed days one step of a run reads and books.
pub const PG_SETTLE_PAGE_SIMS: usize = 10_000;
/// Marks a run reads per statement.
const PG_SETTLE_MARKS_PER_READ: i64 = 10_000;

/// Julian day number of 2000-01-01: dates cross the wire as julian day numbers and become
/// `DATE '2000-01-01' + (jd - JD_2000)` in SQL.
const JD_2000: i32 = 2_451_545;
/// Julian day number of 9999-12-31: the open end of a range, inside PostgreSQL's dates.
const JD_9999_12_31: i32 = 5_373_484;
/// The `day` column as a julian day number.
const DAY_JD: &str = "(day - DATE '2000-01-01' + 2451545)";

fn julian(date: Date) -> i32 {
    date.to_julian_day()
}

fn date_of(jd: i32) -> Result<Date, StoreError> {
    Date::from_julian_day(jd).map_err(|_| StoreError::Corrupt(format!("ledger day {jd} is not a date")))
}

/// Why one settlement attempt stopped.
enum Attempt {
    /// Aborted for a deadlock, serialization failure or unique violation: run it again.
    Again(tokio_postgres::Error),
    /// Anything else.
    Fail(LedgerError),
}

impl From<tokio_postgres::Error> for Attempt {
    fn from(e: tokio_postgres::Error) -> Self {
        let unique = e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION);
        if unique || is_retryable_abort(&e) {
            Attempt::Again(e)
        } else {
            Attempt::Fail(db_error(e).into())
        }
    }
}

fn fail(e: impl Into<LedgerError>) -> Attempt {
    Attempt::Fail(e.into())
}

/// Reads the booked SIM-days (with adjustments, in order) of one SIM or all, inside `range`.
async fn read_days(
    tx: &tokio_postgres::Transaction<'_>,
    sims: Option<&[u64]>,
    range: DateRange,
) -> Result<Vec<LedgerDay>, StoreError> {
    let iccid_param: Option<Vec<i64>> = sims.map(|s| s.iter().map(|i| u64_to_sql(*i)).collect());
    let from_param = range.from.map(julian);
    let to_param = range.to.map(julian);
    let mut conditions = Vec::new();
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
    if let Some(sim) = &iccid_param {
        params.push(sim);
        conditions.push(format!("iccid = ANY(${})", params.len()));
    }
    if let Some(from) = &from_param {
        params.push(from);
        conditions.push(format!("day >= DATE '2000-01-01' + (${}::int4 - {JD_2000})", params.len()));
    }
    if let Some(to) = &to_param {
        params.push(to);
        conditions.push(format!("day <= DATE '2000-01-01' + (${}::int4 - {JD_2000})", params.len()));
    }
    let filter =
        if conditions.is_empty() { String::new() } else { format!("WHERE {}", conditions.join(" AND ")) };
    let mut out = BTreeMap::<(u64, Date), LedgerDay>::new();
    // Two statements, no join: on Citus each is a plain multi-shard (or one-shard) read.
    let settled = tx
        .query(
            &format!(
                "SELECT iccid, {DAY_JD}, up_bytes, down_bytes, settled_at_s FROM ledger_settled {filter}"
            ),
            &params,
        )
        .await
        .map_err(db_error)?;
    for row in settled {
        let iccid = u64_from_sql(row.try_get(0).map_err(db_error)?);
        let date = date_of(row.try_get(1).map_err(db_error)?)?;
        let totals = Totals {
            up: u64_from_sql(row.try_get(2).map_err(db_error)?),
            down: u64_from_sql(row.try_get(3).map_err(db_error)?),
        };
        let settled_at_s = row.try_get(4).map_err(db_error)?;
        out.insert(
            (iccid, date),
            LedgerDay { settled: SettledDay { iccid, date, totals, settled_at_s }, adjustments: Vec::new() },
        );
    }
    let adjustments = tx
        .query(
            &format!(
                "SELECT iccid, {DAY_JD}, seq, delta_up_bytes, delta_down_bytes, made_at_s
                 FROM ledger_adjustments {filter} ORDER BY seq"
            ),
            &params,
        )
        .await
        .map_err(db_error)?;
    for row in adjustments {
        let iccid = u64_from_sql(row.try_get(0).map_err(db_error)?);
        let date = date_of(row.try_get(1).map_err(db_error)?)?;
        // An adjustment without its settled day cannot be written by a run; skip it as sled does.
        let Some(day) = out.get_mut(&(iccid, date)) else { continue };
        day.adjustments.push(Adjustment {
            iccid,
            date,
            seq: u32_from_sql("seq", row.try_get(2).map_err(db_error)?)?,
            delta_up: row.try_get(3).map_err(db_error)?,
            delta_down: row.try_get(4).map_err(db_error)?,
            made_at_s: row.try_get(5).map_err(db_error)?,
        });
    }
    Ok(out.into_values().collect())
}

async fn read_zone(tx: &tokio_postgres::Transaction<'_>) -> Result<Option<String>, StoreError> {
    let row = tx.query_opt("SELECT value FROM ledger_meta WHERE name = 'tz'", &[]).await.map_err(db_error)?;
    row.map(|r| r.try_get(0)).transpose().map_err(db_error)
}

impl PgStore {
    /// Raises the bucket before which ingest marks changed SIM-days (never lowers it), in a
    /// transaction of its own holding the exclusive side of [`PG_CHANGES_LOCK_KEY`]: it
    /// waits for ingest transactions in flight, and every later one reads the new mark.
    async fn raise_changes_before(&self, bucket: u64) -> Result<(), StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(db_error)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PG_CHANGES_LOCK_KEY]).await.map_err(db_error)?;
        let value = i64::try_from(bucket).unwrap_or(i64::MAX).to_string();
        tx.execute(
            "INSERT INTO ledger_meta (name, value) VALUES ('changes_before_bucket', $1)
             ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value
             WHERE ledger_meta.value::bigint < EXCLUDED.value::bigint",
            &[&value],
        )
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)
    }

    /// The ledger's time zone and its booked SIM-days (one SIM or all) inside `range`, read
    /// in one snapshot.
    pub async fn ledger_days(
        &self,
        iccid: Option<u64>,
        range: DateRange,
    ) -> Result<(Option<String>, Vec<LedgerDay>), LedgerError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = super::read_snapshot(&mut client).await?;
        let zone = read_zone(&tx).await?;
        let sims = iccid.map(|i| [i]);
        let days = read_days(&tx, sims.as_ref().map(|s| &s[..]), range).await?;
        tx.commit().await.map_err(db_error)?;
        Ok((zone, days))
    }

    /// The ledger's zone and the booked SIM-days of one page of SIMs (unsigned ICCID order,
    /// after `page.after`) inside `range`, with the next page's cursor, in one snapshot. The
    /// page's SIMs are found through the `(day, iccid)` index one day at a time, then their
    /// days by primary key: the cost follows the page's SIMs and days.
    pub async fn ledger_days_page(
        &self,
        range: DateRange,
        page: SimPage,
    ) -> Result<(Option<String>, Vec<LedgerDay>, Option<u64>), LedgerError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = super::read_snapshot(&mut client).await?;
        let zone = read_zone(&tx).await?;
        let Some(first) = page.first_iccid() else {
            tx.commit().await.map_err(db_error)?;
            return Ok((zone, Vec::new(), None));
        };
        let bounds = tx
            .query_one(
                &format!(
                    "SELECT min({DAY_JD}), max({DAY_JD}) FROM ledger_settled
                     WHERE day BETWEEN DATE '2000-01-01' + ($1::int4 - {JD_2000}) AND DATE '2000-01-01' + ($2::int4 - {JD_2000})"
                ),
                &[&range.from.map_or(0, julian), &range.to.map_or(JD_9999_12_31, julian)],
            )
            .await
            .map_err(db_error)?;
        let (lo, hi): (Option<i32>, Option<i32>) =
            (bounds.try_get(0).map_err(db_error)?, bounds.try_get(1).map_err(db_error)?);
        let (Some(lo), Some(hi)) = (lo, hi) else {
            tx.commit().await.map_err(db_error)?;
            return Ok((zone, Vec::new(), None));
        };
        let want = i64::try_from(page.limit.saturating_add(1)).unwrap_or(i64::MAX);
        let mut sims: Vec<u64> = Vec::new();
        for (a, b) in super::rollups::sql_spans(first, u64::MAX) {
            let need = want - sims.len() as i64;
            if need <= 0 {
                break;
            }
            let rows = tx
                .query(
                    &format!(
                        "SELECT DISTINCT s.iccid FROM generate_series($1::int4, $2::int4) AS d(jd),
                         LATERAL (SELECT iccid FROM ledger_settled
                                  WHERE day = DATE '2000-01-01' + (d.jd - {JD_2000}) AND iccid BETWEEN $3 AND $4
                                  ORDER BY iccid LIMIT $5) s
                         ORDER BY s.iccid LIMIT $5"
                    ),
                    &[&lo, &hi, &a, &b, &need],
                )
                .await
                .map_err(db_error)?;
            for r in rows {
                sims.push(u64_from_sql(r.try_get(0).map_err(db_error)?));
            }
        }
        let next_after = (sims.len() > page.limit).then(|| sims[page.limit - 1]);
        sims.truncate(page.limit);
        let days = if sims.is_empty() { Vec::new() } else { read_days(&tx, Some(&sims), range).await? };
        tx.commit().await.map_err(db_error)?;
        Ok((zone, days, next_after))
    }

    /// Books days closed by `now` (`settlement_hours` after their end) and adjusts closed
    /// days that changed; committed when it returns. Safe to call from any number of
    /// processes at once; incremental (see the module docs): costs the days that closed
    /// since the last run and the SIM-days marked as changed.
    pub async fn ledger_settle(
        &self,
        tz_name: &str,
        settlement_hours: u32,
        now: Timestamp,
    ) -> Result<Settlement, LedgerError> {
        let tz = time_zone(tz_name)?;
        let mut attempt = 1u32;
        loop {
            match self.try_settle(tz_name, &tz, settlement_hours, now).await {
                Ok(s) => {
                    tracing::info!(
                        settled = s.settled.len(),
                        adjustments = s.adjustments.len(),
                        tz = tz_name,
                        store = "postgres",
                        "settlement run"
                    );
                    return Ok(s);
                }
                Err(Attempt::Again(e)) if attempt < PG_TRANSACTION_ATTEMPTS_MAX => {
                    tracing::warn!(attempt, error = %e, "settlement run collided with another, running it again");
                    attempt = attempt.saturating_add(1);
                }
                Err(Attempt::Again(e)) => return Err(db_error(e).into()),
                Err(Attempt::Fail(e)) => return Err(e),
            }
        }
    }

    async fn try_settle(
        &self,
        tz_name: &str,
        tz: &TimeZone,
        settlement_hours: u32,
        now: Timestamp,
    ) -> Result<Settlement, Attempt> {
        if settlement_hours > SETTLEMENT_HOURS_MAX {
            return Err(fail(UsageError::SettlementWindow(settlement_hours)));
        }
        // The last day closed by `now`: the day before the one holding `now - window`.
        let last_closed = now
            .checked_sub(jiff::SignedDuration::from_hours(i64::from(settlement_hours)))
            .ok()
            .and_then(|t| zone_date(t, tz))
            .and_then(|d| d.previous_day());
        // From here on ingest marks every change to a day closed now (see the module docs).
        if let Some(start) = last_closed.and_then(|c| c.next_day()).and_then(|d| day_start(d, tz)) {
            let s = u64::try_from(start.as_second()).unwrap_or(0);
            self.raise_changes_before(s.div_ceil(BUCKET_S)).await.map_err(fail)?;
        }
        let mut client = self.pool.get().await.map_err(|e| fail(pool_error(e)))?;
        // READ COMMITTED: each statement after the lock sees what earlier runs committed.
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PG_LEDGER_LOCK_KEY]).await?;
        match read_zone(&tx).await.map_err(fail)? {
            Some(z) if z != tz_name => {
                return Err(fail(LedgerError::ZoneMismatch { ledger: z, asked: tz_name.into() }))
            }
            Some(_) => {}
            // Written first in the transaction: on Citus `ledger_meta` is a reference table,
            // which may not be modified after the multi-shard inserts below.
            None => {
                tx.execute("INSERT INTO ledger_meta (name, value) VALUES ('tz', $1)", &[&tz_name]).await?;
            }
        }
        let closed_through = read_closed_through(&tx).await.map_err(fail)?;
        let through = closed_through.max(last_closed);
        if through > closed_through {
            // Before any multi-shard write: on Citus `ledger_meta` is a reference table.
            let jd = through.map(julian).unwrap_or_default().to_string();
            tx.execute(
                "INSERT INTO ledger_meta (name, value) VALUES ('closed_through', $1)
                 ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                &[&jd],
            )
            .await?;
        }
        let mut out = Settlement::default();
        // 1. The days that closed since the last run, of every SIM, a page of SIMs at a time.
        if let Some(c) = last_closed.filter(|c| closed_through.is_none_or(|t| t < *c)) {
            let range = DateRange { from: closed_through.and_then(|t| t.next_day()), to: Some(c) };
            let mut page = SimPage { after: None, limit: PG_SETTLE_PAGE_SIMS };
            loop {
                let got = rollup_page_tx(&tx, tz, range, page).await.map_err(fail)?;
                let sims: Vec<u64> = got
                    .derived
                    .daily
                    .keys()
                    .map(|(i, _)| *i)
                    .collect::<std::collections::BTreeSet<u64>>()
                    .into_iter()
                    .collect();
                // Days after `closed_through` are never booked (a run books marked days only up
                // to the day it then records as closed through): after the first run there is
                // nothing to read; the first may meet a ledger settled before runs were
                // incremental.
                let booked = match closed_through {
                    Some(_) => BTreeMap::new(),
                    None => read_booked(&tx, &sims, range).await.map_err(fail)?,
                };
                let s = settle(&got.derived, &booked, tz, settlement_hours, now).map_err(fail)?;
                write_settlement(&tx, &s).await?;
                absorb(&mut out, s);
                match got.next_after {
                    Some(n) => page.after = Some(n),
                    None => break,
                }
            }
        }
        // 2. Days closed before that changed since: the rows ingest marked, SIM by SIM.
        let mut after: (i64, i32) = (i64::MIN, -1);
        loop {
            let marks = tx
                .query(
                    "SELECT iccid, day, mark FROM rollup_changed WHERE (iccid, day) > ($1, $2)
                     ORDER BY iccid, day LIMIT $3",
                    &[&after.0, &after.1, &PG_SETTLE_MARKS_PER_READ],
                )
                .await?;
            let Some(last) = marks.last() else { break };
            after = (last.try_get(0)?, last.try_get(1)?);
            let mut by_sim: BTreeMap<i64, Vec<(i32, i64)>> = BTreeMap::new();
            for m in &marks {
                by_sim.entry(m.try_get(0)?).or_default().push((m.try_get(1)?, m.try_get(2)?));
            }
            for (sql_sim, rows) in by_sim {
                let sim = u64_from_sql(sql_sim);
                if let Some(through) = through {
                    let first = rows.iter().map(|(d, _)| *d).min().unwrap_or(0);
                    let last = rows.iter().map(|(d, _)| *d).max().unwrap_or(0);
                    let day_of = |bucket: i64| {
                        u64::try_from(bucket).ok().and_then(|b| bucket_date(b, tz)).ok_or_else(|| {
                            fail(StoreError::Corrupt(format!("rollup bucket {bucket} has no date")))
                        })
                    };
                    let per_day = (86_400 / BUCKET_S) as i64;
                    let from = day_of(i64::from(first) * per_day)?;
                    let to = day_of(i64::from(last) * per_day + per_day - 1)?.min(through);
                    if from <= to {
                        let range = DateRange { from: Some(from), to: Some(to) };
                        let fresh = rollup_sim_tx(&tx, sim, tz, range).await.map_err(fail)?;
                        let booked = read_booked(&tx, &[sim], range).await.map_err(fail)?;
                        let s = settle(&fresh, &booked, tz, settlement_hours, now).map_err(fail)?;
                        write_settlement(&tx, &s).await?;
                        absorb(&mut out, s);
                    }
                }
                // Only marks not made again meanwhile: a newer mark stays for the next run.
                let days: Vec<i32> = rows.iter().map(|(d, _)| *d).collect();
                let ids: Vec<i64> = rows.iter().map(|(_, m)| *m).collect();
                tx.execute(
                    "DELETE FROM rollup_changed c USING unnest($2::int4[], $3::int8[]) AS u(day, mark)
                     WHERE c.iccid = $1 AND c.day = u.day AND c.mark = u.mark",
                    &[&sql_sim, &days, &ids],
                )
                .await?;
            }
        }
        out.underivable.sort_by_key(|f| f.iccid);
        out.underivable.dedup_by_key(|f| f.iccid);
        let settlement = out;
        tx.commit().await?;
        Ok(settlement)
    }
}

/// Adds one step's entries to a run's.
fn absorb(out: &mut Settlement, s: Settlement) {
    out.settled.extend(s.settled);
    out.adjustments.extend(s.adjustments);
    out.underivable.extend(s.underivable);
}

/// The last day a run booked from every SIM's rollups (`None` before the first run).
async fn read_closed_through(tx: &tokio_postgres::Transaction<'_>) -> Result<Option<Date>, StoreError> {
    let row = tx
        .query_opt("SELECT value FROM ledger_meta WHERE name = 'closed_through'", &[])
        .await
        .map_err(db_error)?;
    let Some(row) = row else { return Ok(None) };
    let v: String = row.try_get(0).map_err(db_error)?;
    let jd: i32 = v.parse().map_err(|_| StoreError::Corrupt(format!("ledger closed_through '{v}'")))?;
    Ok(Some(date_of(jd)?))
}

/// What is booked for the SIMs' days in `range`, as [`settle`] needs it.
async fn read_booked(
    tx: &tokio_postgres::Transaction<'_>,
    sims: &[u64],
    range: DateRange,
) -> Result<BTreeMap<(u64, Date), Booked>, LedgerError> {
    let mut booked = BTreeMap::new();
    if sims.is_empty() {
        return Ok(booked);
    }
    for day in read_days(tx, Some(sims), range).await? {
        let s = Settlement { settled: vec![day.settled], adjustments: day.adjustments, ..Default::default() };
        apply_settlement(&mut booked, &s)?;
    }
    Ok(booked)
}

/// Inserts a step's entries: settled days with a plain `INSERT` (a day settled before is a
/// unique violation, never an overwrite), adjustments under their number.
async fn write_settlement(
    tx: &tokio_postgres::Transaction<'_>,
    settlement: &Settlement,
) -> Result<(), Attempt> {
    if !settlement.settled.is_empty() {
        let s = &settlement.settled;
        let iccid: Vec<i64> = s.iter().map(|d| u64_to_sql(d.iccid)).collect();
        let day: Vec<i32> = s.iter().map(|d| julian(d.date)).collect();
        let up: Vec<i64> = s.iter().map(|d| u64_to_sql(d.totals.up)).collect();
        let down: Vec<i64> = s.iter().map(|d| u64_to_sql(d.totals.down)).collect();
        let at: Vec<i64> = s.iter().map(|d| d.settled_at_s).collect();
        tx.execute(
            &format!(
                "INSERT INTO ledger_settled (iccid, day, up_bytes, down_bytes, settled_at_s)
                 SELECT u.iccid, DATE '2000-01-01' + (u.jd - {JD_2000}), u.up, u.down, u.at
                 FROM unnest($1::int8[], $2::int4[], $3::int8[], $4::int8[], $5::int8[])
                      AS u(iccid, jd, up, down, at)"
            ),
            &[&iccid, &day, &up, &down, &at],
        )
        .await?;
    }
    if !settlement.adjustments.is_empty() {
        let a = &settlement.adjustments;
        let iccid: Vec<i64> = a.iter().map(|x| u64_to_sql(x.iccid)).collect();
        let day: Vec<i32> = a.iter().map(|x| julian(x.date)).collect();
        let seq: Vec<i64> = a.iter().map(|x| i64::from(x.seq)).collect();
        let up: Vec<i64> = a.iter().map(|x| x.delta_up).collect();
        let down: Vec<i64> = a.iter().map(|x| x.delta_down).collect();
        let at: Vec<i64> = a.iter().map(|x| x.made_at_s).collect();
        tx.execute(
            &format!(
                "INSERT INTO ledger_adjustments (iccid, day, seq, delta_up_bytes, delta_down_bytes, made_at_s)
                 SELECT u.iccid, DATE '2000-01-01' + (u.jd - {JD_2000}), u.seq, u.up, u.down, u.at
                 FROM unnest($1::int8[], $2::int4[], $3::int8[], $4::int8[], $5::int8[], $6::int8[])
                      AS u(iccid, jd, seq, up, down, at)"
            ),
            &[&iccid, &day, &seq, &up, &down, &at],
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    use crate::store::postgres::testing::TestDatabase;
    use countersign_testkit::report::{network_time, ReportBuilder};
    use proptest::prelude::*;
    use proptest::test_runner::{TestCaseError, TestRunner};

    /// 2026-11-24T12:00:00Z.
    const NOON_S: u64 = 1_795_521_600;
    const DAY_S: u64 = 86_400;
    /// The last is above 2^63 (a negative BIGINT).
    const SIMS: [u64; 3] = [8_988_280_666_000_000_001, 8_988_280_666_000_000_002, 9_300_000_000_000_000_001];

    /// (sim, seq, up, down, seconds after NOON_S)
    type Spec = (usize, u32, u64, u64, u64);

    fn batch(specs: &[Spec]) -> Vec<crate::store::NewRecord> {
        specs
            .iter()
            .map(|&(sim, seq, up, down, at)| {
                let at = NOON_S + at;
                let r = ReportBuilder::new(sim as u64 + 1, seq, SIMS[sim], network_time(at)).used(up, down);
                crate::store::NewRecord::new(r.report(), at * 1000, r.encode(&[1u8; 32]).into())
            })
            .collect()
    }

    async fn booked(store: &PgStore) -> BTreeMap<(u64, Date), Booked> {
        let mut booked = BTreeMap::new();
        for day in store.ledger_days(None, DateRange::default()).await.unwrap().1 {
            let s =
                Settlement { settled: vec![day.settled], adjustments: day.adjustments, ..Default::default() };
            apply_settlement(&mut booked, &s).unwrap();
        }
        booked
    }

    /// Incremental runs on PostgreSQL, interleaved with records arriving in any order and
    /// batching (late ones included), leave the ledger exactly as runs over the whole
    /// history at the same instants would (the rating core's `settle` as the model).
    #[test]
    fn incremental_runs_equal_runs_over_the_whole_history() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let db = rt.block_on(TestDatabase::create()).unwrap();
        let store = rt.block_on(PgStore::connect(&db.url(), 4)).unwrap();
        let mut runner = TestRunner::new(ProptestConfig::with_cases(16));
        let strategy = (
            proptest::collection::vec(
                (0usize..3, 0u32..20, 0u64..5_000, 0u64..5_000, 0u64..6 * DAY_S),
                1..40,
            ),
            proptest::collection::vec(1usize..6, 1..10),
            proptest::collection::vec(0u64..8 * DAY_S, 1..6),
            0u32..48,
            proptest::sample::select(vec!["UTC", "Europe/Berlin", "Asia/Kathmandu"]),
        );
        runner
            .run(&strategy, |(specs, cuts, mut runs, hours, zone)| {
                rt.block_on(async {
                    let client = store.pool.get().await.unwrap();
                    client
                        .batch_execute(
                            "TRUNCATE records, record_ids, rollup_buckets, rollup_faulty, epoch_tails,
                             ledger_settled, ledger_adjustments, ledger_meta, rollup_changed",
                        )
                        .await
                        .unwrap();
                    drop(client);
                    let tz = time_zone(zone).unwrap();
                    let mut model: BTreeMap<(u64, Date), Booked> = BTreeMap::new();
                    runs.sort_unstable();
                    runs.push(30 * DAY_S);
                    let mut at = 0;
                    let mut cut = cuts.iter().cycle();
                    for (i, run) in runs.iter().enumerate() {
                        if at < specs.len() {
                            let end = (at + cut.next().unwrap()).min(specs.len());
                            store.insert_batch(1, &batch(&specs[at..end])).await.unwrap();
                            at = end;
                        }
                        if i + 1 == runs.len() {
                            store.insert_batch(1, &batch(&specs[at..])).await.unwrap();
                        }
                        let now = Timestamp::from_second((NOON_S + run) as i64).unwrap();
                        store.ledger_settle(zone, hours, now).await.unwrap();
                        let fresh = store.derive_from_records_in(None, &tz).await.unwrap();
                        let s = settle(&fresh, &model, &tz, hours, now).unwrap();
                        apply_settlement(&mut model, &s).unwrap();
                        prop_assert_eq!(&booked(&store).await, &model, "after run {} at +{} s", i, run);
                        // Pages of the ledger, walked by their cursors, are the unpaged read,
                        // in unsigned ICCID order.
                        let first = time::macros::date!(2026 - 11 - 25);
                        let ranges = [
                            DateRange::default(),
                            DateRange {
                                from: Some(first),
                                to: Some(first.saturating_add(time::Duration::days(1))),
                            },
                        ];
                        for range in ranges {
                            let mut walked = Vec::new();
                            let mut page = SimPage { after: None, limit: 1 + i % 2 };
                            for _ in 0..8 {
                                let (_, days, next) = store.ledger_days_page(range, page).await.unwrap();
                                walked.extend(days);
                                match next {
                                    Some(n) => page.after = Some(n),
                                    None => break,
                                }
                            }
                            prop_assert_eq!(walked, store.ledger_days(None, range).await.unwrap().1);
                        }
                    }
                    Ok::<(), TestCaseError>(())
                })
            })
            .unwrap();
    }

    #[test]
    fn julian_days_match_postgres_day_arithmetic() {
        assert_eq!(julian(date!(2000 - 01 - 01)), JD_2000);
        assert_eq!(date_of(JD_2000 + 31).unwrap(), date!(2000 - 02 - 01));
        assert_eq!(date_of(JD_9999_12_31).unwrap(), date!(9999 - 12 - 31));
    }
}
