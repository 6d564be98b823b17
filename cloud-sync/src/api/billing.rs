//! The billing routes: charges, wallets and forecasts (query token), runs and top-ups (admin
//! token). Each checks its parameters and calls the billing service ([`Billing`]); without a
//! plans file they answer 404 `not_configured` (the forecast works without plans when the
//! quota is given).
//!
//! | route                                         | auth  | answer                        |
//! | --------------------------------------------- | ----- | ----------------------------- |
//! | `GET /v1/billing/charges`                     | query | [`ChargesReply`]              |
//! | `GET /v1/billing/wallets`                     | query | [`WalletsReply`]              |
//! | `GET /v1/billing/forecast`                    | query | [`ForecastReply`]             |
//! | `POST /v1/admin/billing/run`                  | admin | [`RunReply`]                  |
//! | `POST /v1/admin/wallets/{customer}/topups`    | admin | [`TopupReply`], 201 or 200    |

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use time::Date;

use crate::api::error::ApiError;
use crate::api::params::date_param;
use crate::api::{AppState, Routes};
use crate::billing::{PeriodSelector, Refusal};
use crate::pricing::{check_name, parse_money_micros};
use crate::service::billing::{forecast, Billing};
use crate::text::{format_date, iccid_from_text};
use crate::wire::billing::{
    ChargesReply, ForecastQuery, ForecastReply, RunReply, TopupReply, TopupRequest, TopupStatus,
    WalletsReply, ADMIN_BILLING_RUN_PATH, ADMIN_WALLET_TOPUPS_PATH, BILLING_CHARGES_PATH,
    BILLING_FORECAST_PATH, BILLING_WALLETS_PATH,
};

/// Routes that need a query token.
pub(super) fn query_routes() -> Routes {
    Routes::new()
        .add("get", BILLING_CHARGES_PATH, get_charges)
        .add("get", BILLING_WALLETS_PATH, get_wallets)
        .add("get", BILLING_FORECAST_PATH, get_forecast)
}

/// Routes that need an admin token.
pub(super) fn admin_routes() -> Routes {
    Routes::new().add("post", ADMIN_BILLING_RUN_PATH, post_run).add(
        "post",
        ADMIN_WALLET_TOPUPS_PATH,
        post_topup,
    )
}

fn billing_of(state: &AppState) -> Result<&Billing, ApiError> {
    state.billing.as_deref().ok_or_else(|| Refusal::NotConfigured.into())
}

fn opt_date(name: &str, v: Option<&str>) -> Result<Option<Date>, ApiError> {
    date_param(name, v)
}

fn opt_name(name: &str, v: Option<&str>) -> Result<Option<String>, ApiError> {
    match v {
        None | Some("") => Ok(None),
        Some(s) => {
            check_name(name, s).map_err(|e| ApiError::bad_request(e.to_string()))?;
            Ok(Some(s.to_owned()))
        }
    }
}

/// Query of `GET /v1/billing/charges`; strings so that errors can name the parameter.
#[derive(Debug, Deserialize)]
struct ChargesParams {
    customer: Option<String>,
    group: Option<String>,
    period: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

/// `period` (a day: each group's period containing it), or `from` and `to` together (one
/// range priced as one period), or neither (the periods containing today).
fn selector(p: &ChargesParams) -> Result<Option<PeriodSelector>, ApiError> {
    let period = opt_date("period", p.period.as_deref())?;
    let from = opt_date("from", p.from.as_deref())?;
    let to = opt_date("to", p.to.as_deref())?;
    match (period, from, to) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            Err(ApiError::bad_request("period: give either period or from and to, not both"))
        }
        (Some(d), None, None) => Ok(Some(PeriodSelector::Containing(d))),
        (None, Some(from), Some(to)) if from <= to => Ok(Some(PeriodSelector::Range { from, to })),
        (None, Some(f), Some(t)) => {
            Err(ApiError::bad_request(format!("from: {} is after to {}", format_date(f), format_date(t))))
        }
        (None, Some(_), None) => Err(ApiError::bad_request("to: required with from")),
        (None, None, Some(_)) => Err(ApiError::bad_request("from: required with to")),
        (None, None, None) => Ok(None),
    }
}

async fn get_charges(
    State(state): State<AppState>,
    query: Result<Query<ChargesParams>, QueryRejection>,
) -> Result<Json<ChargesReply>, ApiError> {
    let p = query.map(|Query(p)| p).map_err(|r| ApiError::bad_request(r.body_text()))?;
    let billing = billing_of(&state)?;
    let sel = selector(&p)?;
    let customer = opt_name("customer", p.customer.as_deref())?;
    let group = opt_name("group", p.group.as_deref())?;
    let reply = billing
        .charges(&state.store, sel, customer.as_deref(), group.as_deref(), jiff::Timestamp::now())
        .await?;
    Ok(Json(reply))
}

#[derive(Debug, Deserialize)]
struct WalletsParams {
    customer: Option<String>,
}

async fn get_wallets(
    State(state): State<AppState>,
    query: Result<Query<WalletsParams>, QueryRejection>,
) -> Result<Json<WalletsReply>, ApiError> {
    let p = query.map(|Query(p)| p).map_err(|r| ApiError::bad_request(r.body_text()))?;
    let billing = billing_of(&state)?;
    let customer = opt_name("customer", p.customer.as_deref())?;
    Ok(Json(billing.wallets(&state.store, customer.as_deref()).await?))
}

#[derive(Debug, Deserialize)]
struct ForecastParams {
    iccid: Option<String>,
    quota_bytes: Option<String>,
    since: Option<String>,
    expires: Option<String>,
    window_days: Option<String>,
    as_of: Option<String>,
}

fn opt_number<T: std::str::FromStr>(name: &str, v: Option<&str>) -> Result<Option<T>, ApiError> {
    match v {
        None | Some("") => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| {
            ApiError::bad_request(format!("{name}: expected a non-negative integer, got '{s}'"))
        }),
    }
}

async fn get_forecast(
    State(state): State<AppState>,
    query: Result<Query<ForecastParams>, QueryRejection>,
) -> Result<Json<ForecastReply>, ApiError> {
    let p = query.map(|Query(p)| p).map_err(|r| ApiError::bad_request(r.body_text()))?;
    let iccid = match p.iccid.as_deref() {
        None | Some("") => return Err(ApiError::bad_request("iccid: required")),
        Some(s) => iccid_from_text(s).map_err(|e| ApiError::bad_request(format!("iccid: {e}")))?,
    };
    let q = ForecastQuery {
        iccid,
        quota_bytes: opt_number("quota_bytes", p.quota_bytes.as_deref())?,
        since: opt_date("since", p.since.as_deref())?,
        expires: opt_date("expires", p.expires.as_deref())?,
        window_days: opt_number("window_days", p.window_days.as_deref())?,
        as_of: opt_date("as_of", p.as_of.as_deref())?,
    };
    Ok(Json(forecast(state.billing.as_deref(), &state.store, q, jiff::Timestamp::now()).await?))
}

async fn post_run(State(state): State<AppState>) -> Result<Json<RunReply>, ApiError> {
    let billing = state.billing.clone().ok_or_else(|| ApiError::from(Refusal::NotConfigured))?;
    let store = state.store.clone();
    // On its own task: a client that goes away must not cancel a run between two wallets.
    let run = tokio::spawn(async move { billing.run(&store, jiff::Timestamp::now()).await });
    let reply = run.await.map_err(|e| {
        tracing::error!(error = %e, "billing run task failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "billing run task failed")
    })??;
    Ok(Json(reply))
}

async fn post_topup(
    State(state): State<AppState>,
    customer: Result<UrlPath<String>, PathRejection>,
    body: Result<Json<TopupRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<TopupReply>), ApiError> {
    let UrlPath(customer) =
        customer.map_err(|r| ApiError::bad_request(format!("customer: {}", r.body_text())))?;
    check_name("customer", &customer).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let body = body.map(|Json(b)| b).map_err(|r| ApiError::bad_request(r.body_text()))?;
    let amount =
        parse_money_micros(&body.amount).ok().and_then(|m| i64::try_from(m).ok()).ok_or_else(|| {
            ApiError::bad_request(format!("amount: '{}' is not a decimal amount above 0", body.amount))
        })?;
    let billing = billing_of(&state)?;
    let reply =
        billing.top_up(&state.store, &customer, &body.topup_id, amount, jiff::Timestamp::now()).await?;
    let status = match reply.status {
        TopupStatus::Booked => StatusCode::CREATED,
        TopupStatus::AlreadyBooked => StatusCode::OK,
    };
    Ok((status, Json(reply)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    #[test]
    fn charges_parameters_are_one_period_or_one_range() {
        let p = |period: Option<&str>, from: Option<&str>, to: Option<&str>| ChargesParams {
            customer: None,
            group: None,
            period: period.map(Into::into),
            from: from.map(Into::into),
            to: to.map(Into::into),
        };
        assert_eq!(selector(&p(None, None, None)).unwrap(), None);
        assert_eq!(
            selector(&p(Some("2026-11-10"), None, None)).unwrap(),
            Some(PeriodSelector::Containing(date!(2026 - 11 - 10)))
        );
        assert_eq!(
            selector(&p(None, Some("2026-11-01"), Some("2026-11-01"))).unwrap(),
            Some(PeriodSelector::Range { from: date!(2026 - 11 - 01), to: date!(2026 - 11 - 01) })
        );
        for bad in [
            p(Some("2026-11-10"), Some("2026-11-01"), None),
            p(None, Some("2026-11-01"), None),
            p(None, None, Some("2026-11-01")),
            p(None, Some("2026-11-02"), Some("2026-11-01")),
            p(Some("2026-13-01"), None, None),
        ] {
            assert!(selector(&bad).is_err());
        }
    }
}
