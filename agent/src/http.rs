//! The agent's local HTTP listener: `/health`, `/metrics` (Prometheus text) and `/status`.
//!
//! Bound to loopback by default; it exposes counts, never keys or report contents.
//!
//! It reads `status` only (live counters, the current buffer's counts, the health judgement)
//! and knows nothing about the pipeline's tasks.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::watch;

use crate::status::{now_ms, AgentStatus, BufferSlot, Health, StatusSnapshot};

/// What the listener needs to answer.
#[derive(Clone)]
pub struct StatusCtx {
    /// This gateway.
    pub gateway_id: u64,
    /// The configured buffer quota.
    pub quota_bytes: u64,
    /// Live state.
    pub status: Arc<AgentStatus>,
    /// The current buffer (absent while the store is being reopened).
    pub buffer: BufferSlot,
}

impl StatusCtx {
    fn snapshot(&self, with_oldest: bool) -> StatusSnapshot {
        let buffer = self.buffer.lock().ok().and_then(|g| g.clone());
        let (pending, oldest) = match &buffer {
            Some(b) => {
                (b.pending_count(), if with_oldest { b.oldest_pending_ms().ok().flatten() } else { None })
            }
            None => (0, None),
        };
        self.status.snapshot(self.gateway_id, pending, oldest, now_ms())
    }
}

/// The listener's routes.
pub fn router(ctx: StatusCtx) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(ctx)
}

/// Serves until `stop` turns true.
pub async fn serve(listener: tokio::net::TcpListener, ctx: StatusCtx, mut stop: watch::Receiver<bool>) {
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, router(ctx)).with_graceful_shutdown(shutdown).await {
        tracing::error!(error = %e, "status listener failed");
    }
}

async fn health(State(ctx): State<StatusCtx>) -> Response {
    let h = Health::of(&ctx.snapshot(false));
    let code = if h.healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(h)).into_response()
}

async fn status(State(ctx): State<StatusCtx>) -> Json<StatusSnapshot> {
    // The oldest-age scan walks every buffered chunk: fine on demand, kept off /metrics.
    let ctx2 = ctx.clone();
    match tokio::task::spawn_blocking(move || ctx2.snapshot(true)).await {
        Ok(s) => Json(s),
        Err(_) => Json(ctx.snapshot(false)),
    }
}

async fn metrics(State(ctx): State<StatusCtx>) -> Response {
    let s = ctx.snapshot(false);
    let healthy = Health::of(&s).healthy;
    let text = render_metrics(&s, ctx.quota_bytes, healthy, ctx.status.subscribed.load(Ordering::Relaxed));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Prometheus text exposition of a snapshot. Pure.
pub fn render_metrics(s: &StatusSnapshot, quota_bytes: u64, healthy: bool, subscribed: bool) -> String {
    let b = |v: bool| u64::from(v);
    let rows: [(&str, &str, &str, u64); 20] = [
        ("buffered_reports", "gauge", "Reports waiting for the endpoint.", s.buffered_reports),
        ("buffer_bytes", "gauge", "Logical bytes in the buffer.", s.buffer_bytes),
        ("quota_bytes", "gauge", "Configured buffer quota.", quota_bytes),
        ("reports_committed_total", "counter", "Reports made durable and acked.", s.reports_committed),
        ("quarantined_total", "counter", "Payloads quarantined.", s.quarantined),
        ("records_delivered_total", "counter", "Records the endpoint answered for.", s.records_delivered),
        ("batches_delivered_total", "counter", "Batches the endpoint answered for.", s.batches_delivered),
        ("upload_failures_total", "counter", "Failed upload attempts.", s.upload_failures),
        ("commits_held_total", "counter", "Commit groups held by quota or store failure.", s.commits_held),
        (
            "last_sync_timestamp_seconds",
            "gauge",
            "When the endpoint last answered.",
            s.last_sync_ms.unwrap_or(0) / 1000,
        ),
        ("broker_connected", "gauge", "1 when connected to the broker.", b(s.broker_connected && subscribed)),
        ("store_failing", "gauge", "1 when the database refuses writes.", b(s.store_failing)),
        ("over_quota", "gauge", "1 when the buffer is at its quota.", b(s.over_quota)),
        ("disk_low", "gauge", "1 when free disk space is below the reserve.", b(s.disk_low)),
        ("healthy", "gauge", "1 when /health answers 200.", b(healthy)),
        (
            "oversized_publishes_total",
            "counter",
            "Publishes over the MQTT packet limit, acked and quarantined as too_large.",
            s.oversized_publishes,
        ),
        (
            "oversized_bytes_max",
            "gauge",
            "True size of the largest oversized publish.",
            s.oversized_bytes_max,
        ),
        (
            "quarantine_dropped_total",
            "counter",
            "Oldest quarantine entries dropped to make room.",
            s.quarantine_dropped,
        ),
        (
            "rejected_dropped_total",
            "counter",
            "Oldest rejected entries dropped to make room.",
            s.rejected_dropped,
        ),
        (
            "reply_mismatches_total",
            "counter",
            "Endpoint replies not matching the batch sent (nothing settled).",
            s.reply_mismatches,
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in rows {
        out.push_str(&format!(
            "# HELP countersign_agent_{name} {help}\n# TYPE countersign_agent_{name} {kind}\ncountersign_agent_{name} {value}\n"
        ));
    }
    let name = "countersign_agent_quarantined_by_reason_total";
    out.push_str(&format!("# HELP {name} Payloads quarantined, by reason.\n# TYPE {name} counter\n"));
    for (reason, n) in &s.quarantined_by_reason {
        // Reasons are the classifier's own codes; escaped anyway, as label values must be.
        let reason = reason.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        out.push_str(&format!("{name}{{reason=\"{reason}\"}} {n}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text_is_well_formed() {
        let st = AgentStatus::default();
        st.reports_committed.store(7, Ordering::Relaxed);
        let text = render_metrics(&st.snapshot(3, 5, None, 0), 1024, false, false);
        assert!(text.contains("# TYPE countersign_agent_reports_committed_total counter\ncountersign_agent_reports_committed_total 7\n"));
        assert!(text.contains("countersign_agent_buffered_reports 5\n"));
        st.count_quarantined(&std::collections::BTreeMap::from([("too_large", 2)]));
        st.oversized_publishes.store(2, Ordering::Relaxed);
        let text = render_metrics(&st.snapshot(3, 5, None, 0), 1024, false, false);
        assert!(
            text.contains("countersign_agent_quarantined_by_reason_total{reason=\"too_large\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("countersign_agent_oversized_publishes_total 2\n"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let mut parts = line.split(' ');
            assert!(parts.next().is_some_and(|n| n.starts_with("countersign_agent_")));
            assert!(parts.next().is_some_and(|v| v.parse::<u64>().is_ok()), "{line}");
        }
    }
}
