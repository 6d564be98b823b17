//! Operations: `GET /health` (no token: a load balancer probes it) and `GET /metrics`
//! (query token: its counters describe the fleet's traffic, and a scraper holds a token as
//! easily as a dashboard does; Prometheus: `authorization: { credentials_file: ... }`).

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::api::{AppState, Routes};
use crate::wire::ops::{HealthReply, HEALTH_PATH, METRICS_PATH};

/// Routes anyone may call.
pub(super) fn open_routes() -> Routes {
    Routes::new().add("get", HEALTH_PATH, health)
}

/// Routes that need a query token.
pub(super) fn query_routes() -> Routes {
    Routes::new().add("get", METRICS_PATH, get_metrics)
}

async fn get_metrics(State(state): State<AppState>) -> Response {
    let text = state.metrics.render(state.store.lookup_stats());
    ([(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"))], text)
        .into_response()
}

async fn health() -> Json<HealthReply> {
    Json(HealthReply { status: "ok".into() })
}
