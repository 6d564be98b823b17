//! The settlement ledger on PostgreSQL: the same semantics as the sled
//! [`Ledger`](crate::store::sled::ledger::Ledger), with the same pure decision ([`usage::settle`](countersign_rating::usage::settle)); only
//! the IO differs.
//!
//! | table                | key                      | value                                     |
//! | -------------------- | ------------------------ | ----------------------------------------- |
//! | `ledger_meta`        | `name` (`tz`)            | the ledger's time zone                    |
//! | `ledger_settled`     | `(iccid, day)`           | up, down bytes, `settled_at_s`            |
//! | `ledger_adjustments` | `(iccid, day, seq)`      | delta up, delta down bytes, `made_at_s`   |
//!
//! **Concurrency: one settlement at a time, under a transaction-level advisory lock.** A run
//! is one READ COMMITTED transaction that first takes `pg_advisory_xact_lock`
//! ([`PG_LEDGER_LOCK_KEY`]), then reads the zone, derives every record, reads what is
//! booked, decides with [`usage::settle`](countersign_rating::usage::settle), inserts, and commits, which releases the lock. The
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

use super::{
    db_error, for_each_meter, is_retryable_abort, pool_error, u32_from_sql, u64_from_sql, u64_to_sql,
    PgStore, PG_TRANSACTION_ATTEMPTS_MAX,
};
use crate::store::ledger::{LedgerDay, LedgerError};
use crate::store::StoreError;
use countersign_rating::usage::{
    apply_settlement, derive_daily_in, settle, time_zone, Adjustment, Booked, DateRange, Derived, SettledDay,
    Settlement, TimeZone,
};

/// Key of the transaction advisory lock a settlement run holds (arbitrary, stable: "ledger").
pub const PG_LEDGER_LOCK_KEY: i64 = 0x6c65_6467_6572_0001;

/// Julian day number of 2000-01-01: dates cross the wire as julian day numbers and become
/// `DATE '2000-01-01' + (jd - JD_2000)` in SQL.
const JD_2000: i32 = 2_451_545;
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
    iccid: Option<u64>,
    range: DateRange,
) -> Result<Vec<LedgerDay>, StoreError> {
    let iccid_param = iccid.map(u64_to_sql);
    let from_param = range.from.map(julian);
    let to_param = range.to.map(julian);
    let mut conditions = Vec::new();
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
    if let Some(sim) = &iccid_param {
        params.push(sim);
        conditions.push(format!("iccid = ${}", params.len()));
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
        let days = read_days(&tx, iccid, range).await?;
        tx.commit().await.map_err(db_error)?;
        Ok((zone, days))
    }

    /// Derives usage in `tz_name` from every stored record, books days closed by `now`
    /// (`settlement_hours` after their end) and adjusts closed days that changed; committed
    /// when it returns. Safe to call from any number of processes at once (see the module
    /// docs). O(records + booked days).
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
        let mut fresh = Derived::default();
        for_each_meter(&tx, None, |meter| {
            fresh.absorb(derive_daily_in(meter, tz)?);
            Ok(())
        })
        .await
        .map_err(fail)?;
        let mut booked = BTreeMap::<(u64, Date), Booked>::new();
        for day in read_days(&tx, None, DateRange::default()).await.map_err(fail)? {
            let s =
                Settlement { settled: vec![day.settled], adjustments: day.adjustments, ..Default::default() };
            apply_settlement(&mut booked, &s).map_err(fail)?;
        }
        let settlement = settle(&fresh, &booked, tz, settlement_hours, now).map_err(fail)?;
        if !settlement.settled.is_empty() {
            let s = &settlement.settled;
            let iccid: Vec<i64> = s.iter().map(|d| u64_to_sql(d.iccid)).collect();
            let day: Vec<i32> = s.iter().map(|d| julian(d.date)).collect();
            let up: Vec<i64> = s.iter().map(|d| u64_to_sql(d.totals.up)).collect();
            let down: Vec<i64> = s.iter().map(|d| u64_to_sql(d.totals.down)).collect();
            let at: Vec<i64> = s.iter().map(|d| d.settled_at_s).collect();
            // A plain INSERT: a day settled before is a unique violation, never an overwrite.
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
        tx.commit().await?;
        Ok(settlement)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    #[test]
    fn julian_days_match_postgres_day_arithmetic() {
        assert_eq!(julian(date!(2000 - 01 - 01)), JD_2000);
        assert_eq!(date_of(JD_2000 + 31).unwrap(), date!(2000 - 02 - 01));
    }
}
