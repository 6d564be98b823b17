//! Operations: `GET /health` (no token: a load balancer probes it) and `GET /metrics`
//! (query token: its counters describe the fleet's traffic, and a scraper holds a token as
//! easily as a dashboard does; Prometheus: `authorization: { credentials_file: ... }`).
//!
//! `/health` answers 200 whenever the process answers (liveness: ingest works whatever the
//! Lago export's state); `status` is `degraded` when the Lago export needs an operator, and
//! `lago` says why. Reading it costs no store access: the exporter keeps it current.

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::api::{AppState, Routes};
use crate::wire::ops::{HealthReply, HEALTH_DEGRADED, HEALTH_OK, HEALTH_PATH, METRICS_PATH};

/// Routes anyone may call.
pub(super) fn open_routes() -> Routes {
    Routes::new().add("get", HEALTH_PATH, health)
}

/// Routes that need a query token.
pub(super) fn query_routes() -> Routes {
    Routes::new().add("get", METRICS_PATH, get_metrics)
}

async fn get_metrics(State(state): State<AppState>) -> Response {
    let mut text = state.metrics.render(state.store.lookup_stats());
    if let Some(lago) = &state.lago {
        let status = lago.snapshot();
        crate::metrics::render_lago(&mut text, &status.health(), status.refusals());
    }
    ([(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"))], text)
        .into_response()
}

async fn health(State(state): State<AppState>) -> Json<HealthReply> {
    let lago = state.lago.as_ref().map(|l| l.snapshot().health());
    let degraded = lago.as_ref().is_some_and(|l| l.state.degraded());
    Json(HealthReply { status: if degraded { HEALTH_DEGRADED } else { HEALTH_OK }.into(), lago })
}
