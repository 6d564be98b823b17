//! Billing tables of the PostgreSQL store (migration 4,
//! [`PG_BILLING_MIGRATION_SQL`](super::migrations::PG_BILLING_MIGRATION_SQL)): every table's key
//! starts with `customer`, and one transaction only touches one customer's rows.
//!
//! One transaction per wallet change: the wallet row is created if absent (`INSERT … ON
//! CONFLICT DO NOTHING`) and locked with `SELECT … FOR UPDATE`; the book is read, the decision
//! made, its rows written, and the transaction committed. Two endpoint processes billing one
//! wallet at once queue on the row lock: the second reads the book the first committed, so it
//! debits only what is still missing (usually nothing). A top-up takes the same lock.

use time::Date;

use countersign_rating::billing::{
    AlertRecord, BillingError as Refusal, BookedDebit, Topup, WalletBook, WalletWrite,
};
use countersign_rating::pricing::BillingPeriod;
use countersign_rating::text::{format_date, parse_date};
use countersign_rating::usage::{derive_daily_in, DateRange, Derived, TimeZone};

use super::rollups::rollup_daily_tx;
use super::{db_error, for_each_meter, pool_error, read_snapshot, PgStore};
use crate::store::billing::{active_keys, corrupt, currency_changed, parse_active, AlertValue};
use crate::store::rollups::{rows_of_range, rows_on_buckets};
use crate::store::StoreError;

impl PgStore {
    /// See [`StoreBackend::billing_daily_usage`](crate::store::StoreBackend::billing_daily_usage).
    pub(crate) async fn billing_daily_usage(
        &self,
        tz: &TimeZone,
        iccid: Option<u64>,
    ) -> Result<(Derived, i64), StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        // REPEATABLE READ: one snapshot for the whole scan, taken by the first statement, which
        // also reads the database's clock: "usage as of" is the same instant for every process.
        let tx = read_snapshot(&mut client).await?;
        let as_of: i64 = tx
            .query_one("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint", &[])
            .await
            .map_err(db_error)?
            .try_get(0)
            .map_err(db_error)?;
        // From the rollups, inside the same snapshot as the clock reading. A zone whose day
        // boundaries are not on quarter hours is derived from the records (exact, O(records)).
        let (first_row, last_row) = rows_of_range(tz, DateRange::default());
        let total = if rows_on_buckets(tz, first_row, last_row) {
            rollup_daily_tx(&tx, iccid, tz, DateRange::default(), (first_row, last_row)).await?
        } else {
            let mut total = Derived::default();
            for_each_meter(&tx, iccid, |meter| {
                total.absorb(derive_daily_in(meter, tz)?);
                Ok(())
            })
            .await?;
            if let Some(sim) = iccid {
                total.retain_sim(sim);
            }
            total
        };
        tx.commit().await.map_err(db_error)?;
        Ok((total, as_of))
    }

    /// See [`StoreBackend::wallet_book`](crate::store::StoreBackend::wallet_book).
    pub(crate) async fn wallet_book(&self, customer: &str) -> Result<WalletBook, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = read_snapshot(&mut client).await?;
        let book = pg_book(&tx, customer, false).await?.map(|(_, b)| b).unwrap_or_default();
        tx.commit().await.map_err(db_error)?;
        Ok(book)
    }

    /// See [`StoreBackend::wallet_alerts`](crate::store::StoreBackend::wallet_alerts).
    pub(crate) async fn wallet_alerts(
        &self,
        customer: &str,
        limit: usize,
    ) -> Result<Vec<AlertRecord>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(
                "SELECT seq, kind, threshold_micros, balance_micros, overdraft_limit_micros, raised_at_s
                 FROM billing_alerts WHERE customer = $1 ORDER BY seq DESC LIMIT $2",
                &[&customer, &limit],
            )
            .await
            .map_err(db_error)?;
        let mut out = rows
            .iter()
            .map(|r| {
                let g = |e| db_error(e);
                let seq: i64 = r.try_get(0).map_err(g)?;
                let v = AlertValue {
                    kind: r.try_get(1).map_err(g)?,
                    threshold_micros: r.try_get(2).map_err(g)?,
                    balance_micros: r.try_get(3).map_err(g)?,
                    overdraft_limit_micros: r.try_get(4).map_err(g)?,
                    raised_at_s: r.try_get(5).map_err(g)?,
                };
                v.record(u64::try_from(seq).map_err(|_| corrupt("alert seq"))?)
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.reverse();
        Ok(out)
    }

    /// See [`StoreBackend::with_wallet`](crate::store::StoreBackend::with_wallet).
    pub(crate) async fn with_wallet<T: Send, E: From<StoreError> + From<Refusal> + Send>(
        &self,
        customer: &str,
        currency: &str,
        decide: impl FnOnce(&WalletBook) -> Result<(Option<WalletWrite>, T), E> + Send,
    ) -> Result<T, E> {
        let g = |e: tokio_postgres::Error| E::from(db_error(e));
        let mut client = self.pool.get().await.map_err(|e| E::from(pool_error(e)))?;
        let tx = client.transaction().await.map_err(g)?;
        // Created if absent, then locked: a second process waits here until the first commits.
        tx.execute(
            "INSERT INTO billing_wallets (customer, currency) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&customer, &currency],
        )
        .await
        .map_err(g)?;
        let (stored_currency, book) =
            pg_book(&tx, customer, true).await?.ok_or_else(|| corrupt("wallet row created but absent"))?;
        if stored_currency != currency {
            return Err(currency_changed(customer, &stored_currency, currency).into());
        }
        let (write, out) = decide(&book)?;
        let Some(w) = write else {
            // Nothing to store; ending the transaction releases the lock.
            tx.commit().await.map_err(g)?;
            return Ok(out);
        };
        if !w.debits.is_empty() {
            let groups: Vec<&str> = w.debits.iter().map(|d| d.group.as_str()).collect();
            let starts: Vec<String> = w.debits.iter().map(|d| format_date(d.period.start)).collect();
            let ends: Vec<String> = w.debits.iter().map(|d| format_date(d.period.end)).collect();
            let plans: Vec<&str> = w.debits.iter().map(|d| d.plan_id.as_str()).collect();
            let amounts: Vec<i64> = w.debits.iter().map(|d| d.debited_micros).collect();
            let counts: Vec<i64> = w.debits.iter().map(|d| i64::from(d.debits)).collect();
            let updated: Vec<i64> = w.debits.iter().map(|d| d.updated_at_s).collect();
            tx.execute(
                "INSERT INTO billing_debits
                     (customer, grp, period_start, period_end, plan_id, debited_micros, debits, updated_at_s)
                 SELECT $1, u.grp, u.ps::date, u.pe::date, u.plan, u.amount, u.n, u.at
                 FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::int8[], $8::int8[])
                      AS u(grp, ps, pe, plan, amount, n, at)
                 ON CONFLICT (customer, grp, period_start) DO UPDATE SET
                     period_end = EXCLUDED.period_end, plan_id = EXCLUDED.plan_id,
                     debited_micros = EXCLUDED.debited_micros, debits = EXCLUDED.debits,
                     updated_at_s = EXCLUDED.updated_at_s",
                &[&customer, &groups, &starts, &ends, &plans, &amounts, &counts, &updated],
            )
            .await
            .map_err(g)?;
        }
        if let Some((id, t)) = &w.topup {
            tx.execute(
                "INSERT INTO billing_topups (customer, topup_id, amount_micros, booked_at_s) VALUES ($1, $2, $3, $4)",
                &[&customer, id, &t.amount_micros, &t.at_s],
            )
            .await
            .map_err(g)?;
        }
        for a in &w.alerts {
            let v = AlertValue::of(a);
            let seq = i64::try_from(a.seq).map_err(|_| Refusal::Overflow("alert sequence"))?;
            tx.execute(
                "INSERT INTO billing_alerts
                     (customer, seq, kind, threshold_micros, balance_micros, overdraft_limit_micros, raised_at_s)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &customer,
                    &seq,
                    &v.kind,
                    &v.threshold_micros,
                    &v.balance_micros,
                    &v.overdraft_limit_micros,
                    &v.raised_at_s,
                ],
            )
            .await
            .map_err(g)?;
        }
        let seq = i64::try_from(w.alert_seq).map_err(|_| Refusal::Overflow("alert sequence"))?;
        tx.execute(
            "UPDATE billing_wallets SET active_alerts = $2, alert_seq = $3, usage_as_of_ms = $4 WHERE customer = $1",
            &[&customer, &active_keys(&w.active), &seq, &w.usage_as_of_ms],
        )
        .await
        .map_err(g)?;
        tx.commit().await.map_err(g)?;
        Ok(out)
    }
}

fn pg_date(s: &str) -> Result<Date, StoreError> {
    parse_date(s).ok_or_else(|| corrupt("date"))
}

/// Reads a wallet's currency and book inside `tx`; with `lock`, locks the wallet row first.
async fn pg_book(
    tx: &deadpool_postgres::Transaction<'_>,
    customer: &str,
    lock: bool,
) -> Result<Option<(String, WalletBook)>, StoreError> {
    let g = |e| db_error(e);
    let select =
        "SELECT currency, active_alerts, alert_seq, usage_as_of_ms FROM billing_wallets WHERE customer = $1";
    let sql = if lock { format!("{select} FOR UPDATE") } else { select.to_owned() };
    let Some(w) = tx.query_opt(&sql, &[&customer]).await.map_err(g)? else { return Ok(None) };
    let currency: String = w.try_get(0).map_err(g)?;
    let active: Vec<String> = w.try_get(1).map_err(g)?;
    let alert_seq: i64 = w.try_get(2).map_err(g)?;
    let mut book = WalletBook {
        active: parse_active(&active)?,
        alert_seq: u64::try_from(alert_seq).map_err(|_| corrupt("alert seq"))?,
        usage_as_of_ms: w.try_get(3).map_err(g)?,
        ..WalletBook::default()
    };
    let rows = tx
        .query(
            "SELECT grp, period_start::text, period_end::text, plan_id, debited_micros, debits, updated_at_s
             FROM billing_debits WHERE customer = $1",
            &[&customer],
        )
        .await
        .map_err(g)?;
    for r in rows {
        let group: String = r.try_get(0).map_err(g)?;
        let start = pg_date(r.try_get(1).map_err(g)?)?;
        let period = BillingPeriod { start, end: pg_date(r.try_get(2).map_err(g)?)? };
        let debits: i64 = r.try_get(5).map_err(g)?;
        book.debits.insert(
            (group.clone(), start),
            BookedDebit {
                group,
                plan_id: r.try_get(3).map_err(g)?,
                period,
                debited_micros: r.try_get(4).map_err(g)?,
                debits: u32::try_from(debits).map_err(|_| corrupt("debit count"))?,
                updated_at_s: r.try_get(6).map_err(g)?,
            },
        );
    }
    let rows = tx
        .query(
            "SELECT topup_id, amount_micros, booked_at_s FROM billing_topups WHERE customer = $1",
            &[&customer],
        )
        .await
        .map_err(g)?;
    for r in rows {
        book.topups.insert(
            r.try_get(0).map_err(g)?,
            Topup { amount_micros: r.try_get(1).map_err(g)?, at_s: r.try_get(2).map_err(g)? },
        );
    }
    Ok(Some((currency, book)))
}
