//! The HTTP endpoint: batch upload (authenticated by the gateway's signature), usage queries
//! (query or admin token), key registration and token management (admin token), health.
//! The contract is `cloud-sync/openapi.yaml`; a test checks the router against it.
//!
//! | route                             | auth             | answer                                 |
//! | --------------------------------- | ---------------- | -------------------------------------- |
//! | `POST /v1/batches`                | batch signature  | [`BatchReply`]; 429 over the rate limit |
//! | `GET /v1/usage`                   | query token      | [`SimUsage`] (`iccid`, `from`/`to`)    |
//! | `GET /v1/usage/sims`              | query token      | [`SimsUsage`] (optional `from`/`to`)   |
//! | `POST /v1/admin/meters`           | admin token      | [`RegistrationReply`], 201 or 200      |
//! | `POST /v1/admin/gateways`         | admin token      | [`RegistrationReply`], 201 or 200      |
//! | `GET /v1/admin/tokens`            | admin token      | [`TokenList`]                          |
//! | `POST /v1/admin/tokens`           | admin token      | [`RegistrationReply`], 201 or 200      |
//! | `DELETE /v1/admin/tokens/{name}`  | admin token      | 204, or 404                            |
//! | `GET /v1/usage/days`              | query token      | [`ZoneDays`] (`tz`, `iccid`/`from`/`to`) |
//! | `GET /v1/usage/ledger`            | query token      | [`LedgerReply`]: settled days + adjustments |
//! | `POST /v1/admin/settle`           | admin token      | [`SettleReply`] for a [`SettleRequest`] |
//! | `GET /health`                     | none             | `{"status":"ok"}`                      |
//! | `GET /metrics`                    | query token      | Prometheus text: refusals, timeouts    |
//!
//! Every route runs on either store ([`StoreBackend`]). Every error is an [`ErrorBody`] with a
//! stable `code`. Blocking work (signature checks, sled) runs on tokio's blocking pool so the
//! accept loop stays responsive. The listener's limits (connections, header and body
//! deadlines, caught panics) are in [`crate::listen`].
//!
//! `/metrics` needs a query token like the usage routes: its counters describe the fleet's
//! traffic, and a scraper holds a token as easily as a dashboard does (Prometheus:
//! `authorization: { credentials_file: ... }`).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::handler::Handler;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::{Json, Router};
use countersign_meter::{Totals, METER_KEY_BYTES};
use countersign_protocol::batch::BATCH_BYTES_MAX;
use countersign_protocol::keys::parse_public_key;
use countersign_protocol::{peek_header, BatchError, BatchReply, ErrorBody, BATCHES_PATH};
use serde::Deserialize;
use time::Date;

use crate::auth::{check_token_name, token_sha256, Role, TOKEN_BYTES};
use crate::backend::StoreBackend;
use crate::config::{AdminToken, CloudConfig, ConfigError, ServerLimits, StoreKind};
use crate::ingest::{ingest, IngestError, IngestSummary};
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::store::{Registration, Store, StoreError};
use crate::text::{format_date, parse_date, parse_iccid, ICCID_DIGITS_MAX};
use crate::usage::{days_of, per_sim, DateRange, SimFault, UsageError};
use crate::wire::admin::{
    FaultsReply, GatewayRegistration, MeterRegistration, RegistrationReply, SettleReply, SettleRequest,
    TokenInfo, TokenList, TokenRegistration, ADMIN_BODY_BYTES_MAX, ADMIN_FAULTS_PATH, ADMIN_GATEWAYS_PATH,
    ADMIN_METERS_PATH, ADMIN_SETTLE_PATH, ADMIN_TOKENS_PATH, ADMIN_TOKEN_PATH,
};
use crate::wire::ops::{HealthReply, HEALTH_PATH, METRICS_PATH};
use crate::wire::usage::{
    underivable, AdjustmentJson, DayUsage, LedgerDayJson, LedgerReply, SimTotal, SimUsage, SimsUsage,
    UnderivableSim, ZoneDay, ZoneDays, USAGE_DAYS_PATH, USAGE_LEDGER_PATH, USAGE_PATH, USAGE_SIMS_PATH,
};
use crate::wire::{QUERY_DATE_MAX, QUERY_DATE_MIN};
use crate::CloudError;

/// The error of a single-SIM answer for a SIM whose usage cannot be derived.
pub(crate) fn underivable_error(f: &SimFault) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "underivable_sim",
        format!("usage cannot be derived: {f}; see {ADMIN_FAULTS_PATH}"),
    )
}
/// An error answer: status, stable code, message.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    error: String,
    retry_after_s: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, error: impl Into<String>) -> Self {
        Self { status, code, error: error.into(), retry_after_s: None }
    }

    pub(crate) fn bad_request(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response =
            (self.status, Json(ErrorBody { code: self.code.to_owned(), error: self.error })).into_response();
        if self.status == StatusCode::UNAUTHORIZED && self.code == "unauthorized" {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(s) = self.retry_after_s {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::Conflict { .. } | StoreError::TokenConflict { .. } => {
                Self::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            StoreError::TooManyTokens => Self::new(StatusCode::CONFLICT, "too_many_tokens", e.to_string()),
            _ if e.is_recoverable() => {
                tracing::error!(error = %e, "store unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "store unavailable, retry later",
                )
            }
            StoreError::Usage(_) => {
                tracing::error!(error = %e, "usage derivation failed");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "usage_error", e.to_string())
            }
            _ => {
                tracing::error!(error = %e, "store corrupt");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "store_corrupt",
                    "store is corrupt; see the endpoint log",
                )
            }
        }
    }
}

impl From<UsageError> for ApiError {
    fn from(e: UsageError) -> Self {
        StoreError::Usage(e).into()
    }
}

fn ingest_error(e: IngestError) -> ApiError {
    match e {
        IngestError::Batch(b) => {
            let (status, code) = match b {
                BatchError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "batch_too_large"),
                BatchError::UnknownGateway(_) => (StatusCode::UNAUTHORIZED, "unknown_gateway"),
                BatchError::BadSignature(_) => (StatusCode::UNAUTHORIZED, "bad_signature"),
                _ => (StatusCode::BAD_REQUEST, "malformed_batch"),
            };
            ApiError::new(status, code, b.to_string())
        }
        IngestError::Clock(why) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "clock_skew", why),
        // Whatever the store's fault, the gateway keeps the batch and retries: nothing of it
        // was acknowledged.
        IngestError::Store(e) => {
            tracing::error!(error = %e, recoverable = e.is_recoverable(), "batch not stored");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "store unavailable, retry later",
            )
        }
    }
}

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) store: StoreBackend,
    token: Arc<AdminToken>,
    limiter: Arc<RateLimiter>,
    metrics: Arc<Metrics>,
    /// Plans and wallets, when a plans file is configured.
    pub(crate) billing: Option<Arc<crate::billing_api::Billing>>,
    /// The endpoint's clock for ingest's time window.
    clock: crate::ingest::Clock,
}

/// One route of the API, as `openapi.yaml` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiRoute {
    /// Lowercase HTTP method, as an OpenAPI operation key (`get`, `post`, `delete`).
    pub method: &'static str,
    /// Path template, `{param}` style.
    pub path: &'static str,
}

/// Builds a router and, from the same calls, the table of its routes, so the table cannot
/// drift from what is served.
pub(crate) struct Routes {
    router: Router<AppState>,
    table: Vec<ApiRoute>,
}

impl Routes {
    pub(crate) fn new() -> Self {
        Self { router: Router::new(), table: Vec::new() }
    }

    pub(crate) fn add<H, T>(mut self, method: &'static str, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let filter = match method {
            "get" => MethodFilter::GET,
            "post" => MethodFilter::POST,
            "delete" => MethodFilter::DELETE,
            // Only the methods above are used; an unknown one is a programming error that
            // the route-table test catches, so it answers nothing rather than panic.
            _ => MethodFilter::TRACE,
        };
        self.router = self.router.route(path, on(filter, handler));
        self.table.push(ApiRoute { method, path });
        self
    }

    fn merge(mut self, other: Routes) -> Self {
        self.router = self.router.merge(other.router);
        self.table.extend(other.table);
        self
    }
}

/// The rating endpoint: a store and the routes over it.
#[derive(Debug)]
pub struct Endpoint {
    store: StoreBackend,
    token: Arc<AdminToken>,
    limiter: Arc<RateLimiter>,
    billing: Option<Arc<crate::billing_api::Billing>>,
    clock: crate::ingest::Clock,
    limits: ServerLimits,
    metrics: Arc<Metrics>,
}

impl Endpoint {
    /// Reads the admin token and opens the sled store named by `config`. A configuration
    /// for PostgreSQL needs [`Endpoint::connect`].
    pub fn open(config: &CloudConfig) -> Result<Endpoint, CloudError> {
        if !matches!(config.store_kind(), StoreKind::Sled) {
            return Err(ConfigError::Invalid {
                key: "store.backend",
                reason: "postgres needs Endpoint::connect (async)".into(),
            }
            .into());
        }
        let token = config.read_admin_token()?;
        let billing = crate::billing_api::Billing::from_cloud_config(config)?;
        let store = Store::open(config.data_dir(), config.cache_capacity_bytes())?;
        Ok(Self::with_backend(StoreBackend::Sled(store), token)
            .with_rate_limiter(RateLimiter::new(config.rate_limit()))
            .with_server_limits(config.server_limits())
            .with_billing(billing))
    }

    /// Reads the admin token and opens or connects to the store `config` selects, applying
    /// PostgreSQL migrations.
    pub async fn connect(config: &CloudConfig) -> Result<Endpoint, CloudError> {
        let token = config.read_admin_token()?;
        let billing = crate::billing_api::Billing::from_cloud_config(config)?;
        let store = StoreBackend::open(config).await?;
        tracing::info!(store = store.kind(), "store open");
        Ok(Self::with_backend(store, token)
            .with_rate_limiter(RateLimiter::new(config.rate_limit()))
            .with_server_limits(config.server_limits())
            .with_billing(billing))
    }

    /// An endpoint over an already open sled store, with the default rate limit.
    pub fn with_store(store: Store, token: AdminToken) -> Endpoint {
        Self::with_backend(StoreBackend::Sled(store), token)
    }

    /// An endpoint over an already open store, with the default rate limit.
    pub fn with_backend(store: StoreBackend, token: AdminToken) -> Endpoint {
        Self {
            store,
            token: Arc::new(token),
            limiter: Arc::new(RateLimiter::new(crate::config::RateLimit::default())),
            billing: None,
            clock: crate::ingest::Clock::system(),
            limits: ServerLimits::default(),
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// The same endpoint with another clock (ingest's time window; tests).
    pub fn with_clock(mut self, clock: crate::ingest::Clock) -> Endpoint {
        self.clock = clock;
        self
    }

    /// The same endpoint with other listener limits (connections, header and body deadlines).
    pub fn with_server_limits(mut self, limits: ServerLimits) -> Endpoint {
        self.limits = limits;
        self
    }

    /// The counters served on `/metrics`.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The same endpoint with plans and wallets (`None`: the billing routes answer 404).
    pub fn with_billing(mut self, billing: Option<crate::billing_api::Billing>) -> Endpoint {
        self.billing = billing.map(Arc::new);
        self
    }

    /// Plans and wallets, if configured (e.g. for the periodic billing run).
    pub fn billing(&self) -> Option<&Arc<crate::billing_api::Billing>> {
        self.billing.as_ref()
    }

    /// The same endpoint with another rate limiter.
    pub fn with_rate_limiter(mut self, limiter: RateLimiter) -> Endpoint {
        self.limiter = Arc::new(limiter);
        self
    }

    /// The store, e.g. for inspection in tests and tools.
    pub fn store(&self) -> &StoreBackend {
        &self.store
    }

    fn routes(&self) -> (Router, Vec<ApiRoute>) {
        let state = AppState {
            store: self.store.clone(),
            token: self.token.clone(),
            limiter: self.limiter.clone(),
            metrics: self.metrics.clone(),
            billing: self.billing.clone(),
            clock: self.clock.clone(),
        };
        let mut query = Routes::new()
            .add("get", USAGE_PATH, get_usage)
            .add("get", USAGE_SIMS_PATH, get_usage_sims)
            .add("get", USAGE_DAYS_PATH, get_usage_days)
            .add("get", USAGE_LEDGER_PATH, get_usage_ledger)
            .add("get", METRICS_PATH, get_metrics)
            .merge(crate::billing_api::query_routes());
        query.router = query.router.route_layer(middleware::from_fn_with_state(state.clone(), require_query));
        let mut admin = Routes::new()
            .add("post", ADMIN_METERS_PATH, post_meter)
            .add("post", ADMIN_GATEWAYS_PATH, post_gateway)
            .add("get", ADMIN_TOKENS_PATH, get_tokens)
            .add("post", ADMIN_TOKENS_PATH, post_token)
            .add("delete", ADMIN_TOKEN_PATH, delete_token)
            .add("post", ADMIN_SETTLE_PATH, post_settle)
            .add("get", ADMIN_FAULTS_PATH, get_faults)
            .merge(crate::billing_api::admin_routes());
        admin.router = admin.router.route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
        let mut batches = Routes::new().add("post", BATCHES_PATH, post_batch);
        batches.router = batches.router.layer(DefaultBodyLimit::max(BATCH_BYTES_MAX));
        let mut other = Routes::new().merge(query).merge(admin);
        other.router = other.router.layer(DefaultBodyLimit::max(ADMIN_BODY_BYTES_MAX));
        let mut all = Routes::new().add("get", HEALTH_PATH, health).merge(batches).merge(other);
        all.router = all.router.fallback(not_found).method_not_allowed_fallback(method_not_allowed);
        let guard =
            crate::listen::Guard { body_timeout: self.limits.body_timeout, metrics: self.metrics.clone() };
        let router =
            all.router.with_state(state).layer(middleware::from_fn_with_state(guard, crate::listen::guard));
        (router, all.table)
    }

    /// The routes, ready to serve.
    pub fn router(&self) -> Router {
        self.routes().0
    }

    /// Every route the router serves, sorted (compared with `openapi.yaml` by a test).
    pub fn route_table(&self) -> Vec<ApiRoute> {
        let mut t = self.routes().1;
        t.sort();
        t
    }

    /// Serves until `shutdown` completes, lets requests in flight finish, then flushes the
    /// store. Connections, request heads and bodies are bounded by the endpoint's
    /// [`ServerLimits`] (see [`crate::listen`]).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, store = self.store.kind(), "endpoint listening");
        }
        let router = self.router();
        let served =
            crate::listen::serve(listener, router, self.limits, self.metrics.clone(), shutdown).await;
        // Flush even when serving failed: every acknowledged batch is flushed already, but
        // registrations racing the failure may not be.
        let flushed = self.store.flush().await.map_err(std::io::Error::other);
        served?;
        flushed?;
        tracing::info!("endpoint stopped, store flushed");
        Ok(())
    }
}

fn bearer(request: &Request) -> Option<&str> {
    request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

/// The role of the presented token, or the refusal.
async fn authenticate(state: &AppState, presented: Option<String>) -> Result<Role, ApiError> {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
    let Some(presented) = presented.as_deref() else {
        return Err(unauthorized("missing 'Authorization: Bearer <token>'"));
    };
    if state.token.verify_hex(presented) {
        return Ok(Role::Admin);
    }
    let mut secret = [0u8; TOKEN_BYTES];
    if hex::decode_to_slice(presented, &mut secret).is_err() {
        return Err(unauthorized("token is not 64 hex digits"));
    }
    // The lookup is by hash: equal hashes mean equal tokens, and timing reveals nothing
    // about a token whose hash is unknown.
    match state.store.token(token_sha256(&secret)).await? {
        Some((name, role)) => {
            let role = Role::parse(&role)
                .ok_or_else(|| StoreError::Corrupt(format!("token {name}: unknown role '{role}'")))?;
            tracing::debug!(token = %name, role = role.as_str(), "token accepted");
            Ok(role)
        }
        None => Err(unauthorized("token does not match")),
    }
}

async fn require(state: AppState, request: Request, next: Next, needed: Role) -> Response {
    // Owned, so that no borrow of the request (whose body is not Sync) spans the await.
    let presented = bearer(&request).map(str::to_owned);
    match authenticate(&state, presented).await {
        Ok(role) if role.allows(needed) => next.run(request).await,
        Ok(role) => {
            state.metrics.auth_refused("forbidden");
            ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("a {} token may not do this; it needs an {} token", role.as_str(), needed.as_str()),
            )
            .into_response()
        }
        Err(e) => {
            state.metrics.auth_refused(e.code);
            if let Some(left_out) = state.metrics.log_admit(e.code) {
                tracing::info!(code = e.code, left_out, "request refused by the token check");
            }
            e.into_response()
        }
    }
}

async fn require_query(State(state): State<AppState>, request: Request, next: Next) -> Response {
    require(state, request, next, Role::Query).await
}

async fn require_admin(State(state): State<AppState>, request: Request, next: Next) -> Response {
    require(state, request, next, Role::Admin).await
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
}

async fn get_metrics(State(state): State<AppState>) -> Response {
    let text = state.metrics.render(state.store.lookup_stats());
    ([(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"))], text)
        .into_response()
}

async fn health() -> Json<HealthReply> {
    Json(HealthReply { status: "ok".into() })
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn post_batch(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let answer = batch_answer(&state, body).await;
    let status = match &answer {
        Ok(_) => StatusCode::OK,
        Err(e) => e.status,
    };
    state.metrics.batch_answered(status.as_u16());
    match answer {
        Ok(reply) => {
            state.metrics.records(&reply);
            log_rejections(&state.metrics, &reply);
            Json(reply).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// Rejected records logged at warn once per reason (then once a minute with the count left
/// out): a gateway resending a batch of bad records must not flood the log.
fn log_rejections(metrics: &Metrics, reply: &BatchReply) {
    for outcome in &reply.results {
        if let countersign_protocol::RecordOutcome::Rejected { reason, detail } = outcome {
            if let Some(left_out) = metrics.log_admit(reason.code()) {
                tracing::warn!(
                    gateway_id = reply.gateway_id,
                    batch_seq = reply.batch_seq,
                    reason = reason.code(),
                    detail = %crate::metrics::log_excerpt(detail),
                    left_out,
                    "record rejected"
                );
            }
        }
    }
}

async fn batch_answer(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<BatchReply, ApiError> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "batch_too_large",
                format!("batch is larger than the {BATCH_BYTES_MAX} bytes allowed"),
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "malformed_batch", r.body_text())
        }
    })?;
    // Checked before any signature work (see `ratelimit`); charged once the batch verified.
    let header = peek_header(&body).map_err(|e| ingest_error(IngestError::Batch(e)))?;
    if let Err(wait) = state.limiter.check(header.gateway_id, Instant::now()) {
        let retry_after_s = wait.as_secs().saturating_add(u64::from(wait.subsec_nanos() > 0)).max(1);
        state.metrics.rate_limited();
        if let Some(left_out) = state.metrics.log_admit("rate_limited") {
            tracing::warn!(
                gateway_id = header.gateway_id,
                retry_after_s,
                left_out,
                "batch over the gateway's rate limit"
            );
        }
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("gateway {} is over its rate limit; retry in {retry_after_s} s", header.gateway_id),
        );
        e.retry_after_s = Some(retry_after_s);
        return Err(e);
    }
    let len = body.len();
    match ingest(&state.store, body, state.clock.now_ms()).await {
        Ok(reply) => {
            // Only what was stored costs credit: a duplicate or a refusal adds nothing to store.
            state.limiter.charge(header.gateway_id, IngestSummary::of(&reply).stored, Instant::now());
            Ok(reply)
        }
        Err(e) => {
            let e = ingest_error(e);
            if let Some(left_out) = state.metrics.log_admit(e.code) {
                tracing::warn!(gateway_id = header.gateway_id, bytes = len, error = %e.error, left_out, "batch refused");
            }
            Err(e)
        }
    }
}

/// Query parameters of the usage routes; strings so that errors can name the parameter.
#[derive(Debug, Deserialize)]
struct UsageParams {
    iccid: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

/// A date query parameter: absent, or `YYYY-MM-DD` inside
/// [`QUERY_DATE_MIN`]`..=`[`QUERY_DATE_MAX`]; errors name the parameter.
pub(crate) fn date_param(name: &str, value: Option<&str>) -> Result<Option<Date>, ApiError> {
    match value {
        None | Some("") => Ok(None),
        Some(s) => {
            let date = parse_date(s).ok_or_else(|| {
                ApiError::bad_request(format!("{name}: expected a date as YYYY-MM-DD, got '{s}'"))
            })?;
            if !(QUERY_DATE_MIN..=QUERY_DATE_MAX).contains(&date) {
                return Err(ApiError::bad_request(format!(
                    "{name}: {s} is outside {}..={}",
                    format_date(QUERY_DATE_MIN),
                    format_date(QUERY_DATE_MAX)
                )));
            }
            Ok(Some(date))
        }
    }
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
        Some(s) => parse_iccid(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "iccid: expected up to {ICCID_DIGITS_MAX} decimal digits, got '{s}'"
            ))
        })?,
    };
    let range = range_params(&params)?;
    let derived = state.store.daily_usage(Some(iccid)).await?;
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
    let derived = state.store.daily_usage(None).await?;
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
    }))
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(b)| b).map_err(|r| ApiError::bad_request(r.body_text()))
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

#[derive(Debug, Deserialize)]
struct ZoneParams {
    tz: Option<String>,
    iccid: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

fn zone_range(p: &ZoneParams) -> Result<(Option<u64>, DateRange), ApiError> {
    let iccid = match p.iccid.as_deref() {
        None | Some("") => None,
        Some(s) => Some(
            parse_iccid(s).ok_or_else(|| ApiError::bad_request(format!("iccid: '{s}' is not an ICCID")))?,
        ),
    };
    let range = range_params(&UsageParams { iccid: None, from: p.from.clone(), to: p.to.clone() })?;
    Ok((iccid, range))
}

fn ledger_error(e: crate::ledger::LedgerError) -> ApiError {
    use crate::ledger::LedgerError;
    match e {
        LedgerError::Store(s) => s.into(),
        LedgerError::Usage(u @ (UsageError::UnknownTimeZone(_) | UsageError::SettlementWindow(_))) => {
            ApiError::bad_request(u.to_string())
        }
        LedgerError::Usage(u) => u.into(),
        z @ LedgerError::ZoneMismatch { .. } => {
            ApiError::new(StatusCode::CONFLICT, "zone_mismatch", z.to_string())
        }
    }
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
    let derived = state.store.daily_usage_in(iccid, tz).await?;
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
    Ok(Json(ZoneDays { tz: tz_name, days, underivable: underivable(&derived) }))
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
    let (tz, days) = state.store.ledger(iccid, range).await.map_err(ledger_error)?;
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
    Ok(Json(LedgerReply { tz, days: out }))
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
    let derived = state.store.daily_usage(None).await?;
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
