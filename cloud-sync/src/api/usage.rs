//! The usage routes (query token): one SIM day by day, every SIM's total, SIM-days in a time
//! zone, the settlement ledger. Usage is derived by the store; these routes check the
//! parameters and shape the answers ([`crate::wire::usage`]).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use countersign_meter::Totals;
use serde::Deserialize;

use crate::api::error::{ledger_error, underivable_error, ApiError};
use crate::api::params::date_param;
use crate::api::{AppState, Routes};
use crate::store::rollups::{SimPage, UsagePage, USAGE_PAGE_SIMS_DEFAULT, USAGE_PAGE_SIMS_MAX};
use crate::text::{format_date, iccid_from_text};
use crate::usage::{days_of, per_sim, DateRange, TimeZone, UsageError};
use crate::wire::usage::{
    underivable, AdjustmentJson, DayUsage, LedgerDayJson, LedgerReply, SimTotal, SimUsage, SimsUsage,
    ZoneDay, ZoneDays, USAGE_DAYS_PATH, USAGE_LEDGER_PATH, USAGE_PATH, USAGE_SIMS_PATH,
};

/// Routes that need a query token.
pub(super) fn query_routes() -> Routes {
    Routes::new()
        .add("get", USAGE_PATH, get_usage)
        .add("get", USAGE_SIMS_PATH, get_usage_sims)
        .add("get", USAGE_DAYS_PATH, get_usage_days)
        .add("get", USAGE_LEDGER_PATH, get_usage_ledger)
}

/// Query parameters of the usage routes; strings so that errors can name the parameter.
#[derive(Debug, Deserialize)]
struct UsageParams {
    iccid: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

/// The page asked for by `limit` (SIMs, default [`USAGE_PAGE_SIMS_DEFAULT`], at most
/// [`USAGE_PAGE_SIMS_MAX`]) and `after` (the previous page's `next_after`).
fn page_params(limit: Option<&str>, after: Option<&str>) -> Result<SimPage, ApiError> {
    let limit = match limit {
        None | Some("") => USAGE_PAGE_SIMS_DEFAULT,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=USAGE_PAGE_SIMS_MAX).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "limit: expected SIMs per page, 1 through {USAGE_PAGE_SIMS_MAX}, got '{s}'"
                )))
            }
        },
    };
    let after = match after {
        None | Some("") => None,
        Some(s) => Some(iccid_from_text(s).map_err(|e| ApiError::bad_request(format!("after: {e}")))?),
    };
    Ok(SimPage { after, limit })
}

/// Refuses paging parameters on an answer about one SIM.
fn no_page_params(limit: Option<&str>, after: Option<&str>) -> Result<(), ApiError> {
    if limit.is_some() || after.is_some() {
        let name = if limit.is_some() { "limit" } else { "after" };
        return Err(ApiError::bad_request(format!("{name}: pages are of SIMs; not with iccid")));
    }
    Ok(())
}

fn range_params(params: &UsageParams) -> Result<DateRange, ApiError> {
    let range = DateRange {
        from: date_param("from", params.from.as_deref())?,
        to: date_param("to", params.to.as_deref())?,
    };
    if let (Some(f), Some(t)) = (range.from, range.to) {
        if f > t {
            return Err(ApiError::bad_request(format!(
                "from: {} is after to {}",
                format_date(f),
                format_date(t)
            )));
        }
    }
    Ok(range)
}

fn query_params(query: Result<Query<UsageParams>, QueryRejection>) -> Result<UsageParams, ApiError> {
    query.map(|Query(p)| p).map_err(|r| ApiError::bad_request(r.body_text()))
}

fn total_bytes(iccid: u64, t: &Totals) -> Result<u64, UsageError> {
    t.sum().ok_or(UsageError::Overflow { iccid })
}

async fn get_usage(
    State(state): State<AppState>,
    query: Result<Query<UsageParams>, QueryRejection>,
) -> Result<Json<SimUsage>, ApiError> {
    let params = query_params(query)?;
    let iccid = match params.iccid.as_deref() {
        None | Some("") => return Err(ApiError::bad_request("iccid: required")),
        Some(s) => iccid_from_text(s).map_err(|e| ApiError::bad_request(format!("iccid: {e}")))?,
    };
    no_page_params(params.limit.as_deref(), params.after.as_deref())?;
    let range = range_params(&params)?;
    let derived = state.store.daily_usage(Some(iccid), range).await?;
    if let Some(f) = derived.fault_of(iccid) {
        return Err(underivable_error(f));
    }
    let mut sum = Totals::default();
    let mut days = Vec::new();
    for (date, t) in days_of(&derived.daily, iccid, range) {
        sum = sum.checked_add(&t).ok_or(UsageError::Overflow { iccid })?;
        days.push(DayUsage {
            date,
            up_bytes: t.up,
            down_bytes: t.down,
            total_bytes: total_bytes(iccid, &t)?,
        });
    }
    Ok(Json(SimUsage {
        iccid,
        from: range.from,
        to: range.to,
        days,
        up_bytes: sum.up,
        down_bytes: sum.down,
        total_bytes: total_bytes(iccid, &sum)?,
    }))
}

async fn get_usage_sims(
    State(state): State<AppState>,
    query: Result<Query<UsageParams>, QueryRejection>,
) -> Result<Json<SimsUsage>, ApiError> {
    let params = query_params(query)?;
    if params.iccid.is_some() {
        return Err(ApiError::bad_request(format!(
            "iccid: not a parameter of {USAGE_SIMS_PATH}; use {USAGE_PATH}"
        )));
    }
    let range = range_params(&params)?;
    let page = page_params(params.limit.as_deref(), params.after.as_deref())?;
    let UsagePage { derived, next_after } = state.store.usage_page(TimeZone::UTC, range, page).await?;
    let (mut up, mut down) = (0u128, 0u128);
    let mut sims = Vec::new();
    for (iccid, t) in per_sim(&derived.daily, range)? {
        // Cannot overflow: fewer than 2^64 SIMs of less than 2^64 bytes each.
        up = up.saturating_add(u128::from(t.up));
        down = down.saturating_add(u128::from(t.down));
        sims.push(SimTotal {
            iccid,
            up_bytes: t.up,
            down_bytes: t.down,
            total_bytes: total_bytes(iccid, &t)?,
        });
    }
    Ok(Json(SimsUsage {
        from: range.from,
        to: range.to,
        sims,
        up_bytes: up,
        down_bytes: down,
        total_bytes: up.saturating_add(down),
        underivable: underivable(&derived),
        next_after,
    }))
}

#[derive(Debug, Deserialize)]
struct ZoneParams {
    tz: Option<String>,
    iccid: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

fn zone_range(p: &ZoneParams) -> Result<(Option<u64>, DateRange), ApiError> {
    let iccid = match p.iccid.as_deref() {
        None | Some("") => None,
        Some(s) => Some(iccid_from_text(s).map_err(|e| ApiError::bad_request(format!("iccid: {e}")))?),
    };
    let range = range_params(&UsageParams {
        iccid: None,
        from: p.from.clone(),
        to: p.to.clone(),
        limit: None,
        after: None,
    })?;
    Ok((iccid, range))
}

async fn get_usage_days(
    State(state): State<AppState>,
    query: Result<Query<ZoneParams>, QueryRejection>,
) -> Result<Json<ZoneDays>, ApiError> {
    let p = query.map(|Query(p)| p).map_err(|r| ApiError::bad_request(r.body_text()))?;
    let tz_name =
        p.tz.clone().ok_or_else(|| ApiError::bad_request("tz: required, e.g. Europe/Berlin or UTC"))?;
    let tz = crate::usage::time_zone(&tz_name).map_err(|e| ApiError::bad_request(format!("tz: {e}")))?;
    let (iccid, range) = zone_range(&p)?;
    let (derived, next_after) = match iccid {
        Some(_) => {
            no_page_params(p.limit.as_deref(), p.after.as_deref())?;
            (state.store.daily_usage_in(iccid, tz, range).await?, None)
        }
        None => {
            let page = page_params(p.limit.as_deref(), p.after.as_deref())?;
            let UsagePage { derived, next_after } = state.store.usage_page(tz, range, page).await?;
            (derived, next_after)
        }
    };
    let mut days = Vec::new();
    for ((i, date), t) in &derived.daily {
        let (i, date) = (*i, *date);
        if iccid.is_none_or(|want| want == i) && range.contains(date) {
            days.push(ZoneDay {
                iccid: i,
                date,
                up_bytes: t.up,
                down_bytes: t.down,
                total_bytes: total_bytes(i, t)?,
            });
        }
    }
    Ok(Json(ZoneDays { tz: tz_name, days, underivable: underivable(&derived), next_after }))
}

async fn get_usage_ledger(
    State(state): State<AppState>,
    query: Result<Query<ZoneParams>, QueryRejection>,
) -> Result<Json<LedgerReply>, ApiError> {
    let p = query.map(|Query(p)| p).map_err(|r| ApiError::bad_request(r.body_text()))?;
    if p.tz.is_some() {
        return Err(ApiError::bad_request("tz: the ledger's zone is fixed; do not pass it"));
    }
    let (iccid, range) = zone_range(&p)?;
    let (tz, days, next_after) = match iccid {
        Some(_) => {
            no_page_params(p.limit.as_deref(), p.after.as_deref())?;
            let (tz, days) = state.store.ledger(iccid, range).await.map_err(ledger_error)?;
            (tz, days, None)
        }
        None => {
            let page = page_params(p.limit.as_deref(), p.after.as_deref())?;
            state.store.ledger_page(range, page).await.map_err(ledger_error)?
        }
    };
    let mut out = Vec::with_capacity(days.len());
    for d in days {
        let s = d.settled;
        let mut booked = i128::from(s.totals.up) + i128::from(s.totals.down);
        for a in &d.adjustments {
            booked += i128::from(a.delta_up) + i128::from(a.delta_down);
        }
        out.push(LedgerDayJson {
            iccid: s.iccid,
            date: s.date,
            settled_up_bytes: s.totals.up,
            settled_down_bytes: s.totals.down,
            settled_at_s: s.settled_at_s,
            adjustments: d
                .adjustments
                .iter()
                .map(|a| AdjustmentJson {
                    seq: a.seq,
                    delta_up_bytes: a.delta_up,
                    delta_down_bytes: a.delta_down,
                    made_at_s: a.made_at_s,
                })
                .collect(),
            booked_total_bytes: i64::try_from(booked).map_err(|_| UsageError::Overflow { iccid: s.iccid })?,
        });
    }
    Ok(Json(LedgerReply { tz, days: out, next_after }))
}
