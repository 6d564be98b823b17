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
//! | `GET /health`                     | none             | [`HealthReply`]: `ok` or `degraded` (Lago export) |
//! | `GET /metrics`                    | query token      | Prometheus text: refusals, timeouts    |
//! | `GET /v1/billing/charges`         | query token      | [`ChargesReply`]                       |
//! | `GET /v1/billing/wallets`         | query token      | [`WalletsReply`]                       |
//! | `GET /v1/billing/forecast`        | query token      | [`ForecastReply`]                      |
//! | `POST /v1/admin/billing/run`      | admin token      | [`RunReply`]                           |
//! | `POST /v1/admin/wallets/{customer}/topups` | admin token | [`TopupReply`], 201 or 200          |
//!
//! Every route runs on either store ([`StoreBackend`]). Every error is an [`ErrorBody`] with a
//! stable `code`. Blocking work (signature checks, sled) runs on tokio's blocking pool so the
//! accept loop stays responsive. The listener's limits (connections, header and body
//! deadlines, caught panics) are in [`crate::listen`].
//!
//! `/metrics` needs a query token like the usage routes: its counters describe the fleet's
//! traffic, and a scraper holds a token as easily as a dashboard does (Prometheus:
//! `authorization: { credentials_file: ... }`).
//!
//! One file per area (`usage.rs`, `admin.rs`, `billing.rs`, `batches.rs`, `ops.rs`) holds its
//! handlers and says which token its routes need; this module assembles them behind the token
//! checks of `auth.rs`, and every error answer is built in `error.rs`. The answers are
//! [`crate::wire`]'s shapes, the billing IO [`crate::service`]'s.
//!
//! Import direction: `api` → [`crate::wire`] (the shapes), `api` → [`crate::service`] (the
//! IO sequences), `api` → the store; nothing below imports `api`, and `api` imports neither
//! the client nor the CLI.
//!
//! [`BatchReply`]: countersign_protocol::BatchReply
//! [`ErrorBody`]: countersign_protocol::ErrorBody
//! [`SimUsage`]: crate::wire::usage::SimUsage
//! [`SimsUsage`]: crate::wire::usage::SimsUsage
//! [`ZoneDays`]: crate::wire::usage::ZoneDays
//! [`LedgerReply`]: crate::wire::usage::LedgerReply
//! [`RegistrationReply`]: crate::wire::admin::RegistrationReply
//! [`TokenList`]: crate::wire::admin::TokenList
//! [`SettleReply`]: crate::wire::admin::SettleReply
//! [`SettleRequest`]: crate::wire::admin::SettleRequest
//! [`ChargesReply`]: crate::wire::billing::ChargesReply
//! [`WalletsReply`]: crate::wire::billing::WalletsReply
//! [`ForecastReply`]: crate::wire::billing::ForecastReply
//! [`RunReply`]: crate::wire::billing::RunReply
//! [`TopupReply`]: crate::wire::billing::TopupReply
//! [`HealthReply`]: crate::wire::ops::HealthReply

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::middleware;
use axum::routing::{on, MethodFilter};
use axum::Router;
use countersign_protocol::batch::BATCH_BYTES_MAX;

use crate::config::{AdminToken, CloudConfig, ConfigError, ServerLimits};
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::service::billing::Billing;
use crate::service::lago_status::LagoStatus;
use crate::store::Store;
use crate::store::{StoreBackend, StoreKind};
use crate::wire::admin::ADMIN_BODY_BYTES_MAX;
use crate::CloudError;

mod admin;
mod auth;
mod batches;
mod billing;
mod error;
mod ops;
mod params;
mod usage;

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) store: StoreBackend,
    token: Arc<AdminToken>,
    limiter: Arc<RateLimiter>,
    metrics: Arc<Metrics>,
    /// Plans and wallets, when a plans file is configured.
    pub(crate) billing: Option<Arc<Billing>>,
    /// The endpoint's clock for ingest's time window.
    clock: crate::service::ingest::Clock,
    /// The Lago export's status, when this process runs one.
    lago: Option<Arc<LagoStatus>>,
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
    billing: Option<Arc<Billing>>,
    clock: crate::service::ingest::Clock,
    limits: ServerLimits,
    metrics: Arc<Metrics>,
    lago: Option<Arc<LagoStatus>>,
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
        let billing = Billing::from_cloud_config(config)?;
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
        let billing = Billing::from_cloud_config(config)?;
        let store =
            StoreBackend::open(config.store_kind(), config.data_dir(), config.cache_capacity_bytes()).await?;
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
            clock: crate::service::ingest::Clock::system(),
            limits: ServerLimits::default(),
            metrics: Arc::new(Metrics::new()),
            lago: None,
        }
    }

    /// The same endpoint reporting a Lago export's status on `/health` and `/metrics`
    /// ([`crate::service::lago::LagoExporter::status`]).
    pub fn with_lago_status(mut self, status: Arc<LagoStatus>) -> Endpoint {
        self.lago = Some(status);
        self
    }

    /// The same endpoint with another clock (ingest's time window; tests).
    pub fn with_clock(mut self, clock: crate::service::ingest::Clock) -> Endpoint {
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
    pub fn with_billing(mut self, billing: Option<Billing>) -> Endpoint {
        self.billing = billing.map(Arc::new);
        self
    }

    /// Plans and wallets, if configured (e.g. for the periodic billing run).
    pub fn billing(&self) -> Option<&Arc<Billing>> {
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
            lago: self.lago.clone(),
        };
        let mut query = usage::query_routes().merge(ops::query_routes()).merge(billing::query_routes());
        query.router =
            query.router.route_layer(middleware::from_fn_with_state(state.clone(), auth::require_query));
        let mut admin = admin::admin_routes().merge(billing::admin_routes());
        admin.router =
            admin.router.route_layer(middleware::from_fn_with_state(state.clone(), auth::require_admin));
        let mut batches = batches::routes();
        batches.router = batches.router.layer(DefaultBodyLimit::max(BATCH_BYTES_MAX));
        let mut other = Routes::new().merge(query).merge(admin);
        other.router = other.router.layer(DefaultBodyLimit::max(ADMIN_BODY_BYTES_MAX));
        let mut all = ops::open_routes().merge(batches).merge(other);
        all.router =
            all.router.fallback(error::not_found).method_not_allowed_fallback(error::method_not_allowed);
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
