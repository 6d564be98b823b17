//! The admin routes (admin token): meter and gateway registrations, API tokens, settlement
//! runs, the list of SIMs whose usage cannot be derived. Answers are
//! [`crate::wire::admin`]'s.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use countersign_meter::METER_KEY_BYTES;
use countersign_protocol::keys::parse_public_key;

use crate::api::error::{ledger_error, ApiError};
use crate::api::params::json_body;
use crate::api::{AppState, Routes};
use crate::auth::{check_token_name, Role};
use crate::store::{Registration, StoreError};
use crate::wire::admin::{
    FaultsReply, GatewayRegistration, MeterRegistration, RegistrationReply, SettleReply, SettleRequest,
    TokenInfo, TokenList, TokenRegistration, ADMIN_FAULTS_PATH, ADMIN_GATEWAYS_PATH, ADMIN_METERS_PATH,
    ADMIN_SETTLE_PATH, ADMIN_TOKENS_PATH, ADMIN_TOKEN_PATH,
};
use crate::wire::usage::{underivable, UnderivableSim};

/// Routes that need an admin token.
pub(super) fn admin_routes() -> Routes {
    Routes::new()
        .add("post", ADMIN_METERS_PATH, post_meter)
        .add("post", ADMIN_GATEWAYS_PATH, post_gateway)
        .add("get", ADMIN_TOKENS_PATH, get_tokens)
        .add("post", ADMIN_TOKENS_PATH, post_token)
        .add("delete", ADMIN_TOKEN_PATH, delete_token)
        .add("post", ADMIN_SETTLE_PATH, post_settle)
        .add("get", ADMIN_FAULTS_PATH, get_faults)
}

fn registered(r: Registration) -> (StatusCode, Json<RegistrationReply>) {
    let status = match r {
        Registration::Created => StatusCode::CREATED,
        Registration::AlreadyRegistered => StatusCode::OK,
    };
    (status, Json(RegistrationReply { status: r }))
}

async fn post_meter(
    State(state): State<AppState>,
    body: Result<Json<MeterRegistration>, JsonRejection>,
) -> Result<(StatusCode, Json<RegistrationReply>), ApiError> {
    let body = json_body(body)?;
    let mut key = [0u8; METER_KEY_BYTES];
    hex::decode_to_slice(body.key_hex.trim(), &mut key).map_err(|_| {
        ApiError::bad_request(format!("key_hex: expected {} hex digits", 2 * METER_KEY_BYTES))
    })?;
    let meter_id = body.meter_id;
    let r = state.store.add_meter(meter_id, key).await?;
    tracing::info!(meter_id, outcome = ?r, "meter registration");
    Ok(registered(r))
}

async fn post_gateway(
    State(state): State<AppState>,
    body: Result<Json<GatewayRegistration>, JsonRejection>,
) -> Result<(StatusCode, Json<RegistrationReply>), ApiError> {
    let body = json_body(body)?;
    let key = parse_public_key(&body.public_key_hex)
        .map_err(|e| ApiError::bad_request(format!("public_key_hex: {e}")))?;
    let gateway_id = body.gateway_id;
    let r = state.store.add_gateway(gateway_id, key).await?;
    tracing::info!(gateway_id, outcome = ?r, "gateway registration");
    Ok(registered(r))
}

async fn post_settle(
    State(state): State<AppState>,
    body: Result<Json<SettleRequest>, JsonRejection>,
) -> Result<Json<SettleReply>, ApiError> {
    let body = json_body(body)?;
    let s = state
        .store
        .settle(body.tz, body.settlement_hours, jiff::Timestamp::now())
        .await
        .map_err(ledger_error)?;
    Ok(Json(SettleReply {
        settled: s.settled.len(),
        adjustments: s.adjustments.len(),
        underivable: s.underivable.iter().map(UnderivableSim::from).collect(),
    }))
}

async fn get_faults(State(state): State<AppState>) -> Result<Json<FaultsReply>, ApiError> {
    // Which SIMs are faulty does not depend on the zone days are cut in.
    let derived = state.store.daily_usage(None, Default::default()).await?;
    Ok(Json(FaultsReply { underivable: underivable(&derived) }))
}

async fn get_tokens(State(state): State<AppState>) -> Result<Json<TokenList>, ApiError> {
    let mut tokens = Vec::new();
    for (name, role) in state.store.tokens().await? {
        let role = Role::parse(&role)
            .ok_or_else(|| StoreError::Corrupt(format!("token {name}: unknown role '{role}'")))?;
        tokens.push(TokenInfo { name, role });
    }
    Ok(Json(TokenList { tokens }))
}

async fn post_token(
    State(state): State<AppState>,
    body: Result<Json<TokenRegistration>, JsonRejection>,
) -> Result<(StatusCode, Json<RegistrationReply>), ApiError> {
    let body = json_body(body)?;
    check_token_name(&body.name).map_err(|e| ApiError::bad_request(format!("name: {e}")))?;
    let mut sha256 = [0u8; 32];
    hex::decode_to_slice(body.token_sha256_hex.trim(), &mut sha256)
        .map_err(|_| ApiError::bad_request("token_sha256_hex: expected 64 hex digits"))?;
    let r = state.store.add_token(body.name.clone(), body.role.as_str(), sha256).await?;
    tracing::info!(token = %body.name, role = body.role.as_str(), outcome = ?r, "api token registration");
    Ok(registered(r))
}

async fn delete_token(
    State(state): State<AppState>,
    name: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<StatusCode, ApiError> {
    let Path(name) = name.map_err(|r| ApiError::bad_request(format!("name: {}", r.body_text())))?;
    check_token_name(&name).map_err(|e| ApiError::bad_request(format!("name: {e}")))?;
    if state.store.revoke_token(name.clone()).await? {
        tracing::info!(token = %name, "api token revoked");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no token named '{name}'")))
    }
}
