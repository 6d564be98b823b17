//! `POST /v1/batches`: a signed batch in, per-record outcomes out. The gateway's rate limit
//! is checked before any signature work; the batch itself is [`crate::service::ingest`]'s. Answers
//! [`BatchReply`], or an error the gateway can act on (retry, back off, drop).

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use countersign_protocol::batch::BATCH_BYTES_MAX;
use countersign_protocol::{peek_header, BatchReply, BATCHES_PATH};

use crate::api::error::{ingest_error, ApiError};
use crate::api::{AppState, Routes};
use crate::metrics::Metrics;
use crate::service::ingest::{ingest, IngestError, IngestSummary};

/// The batch upload route (authenticated by the batch's signature, not a token).
pub(super) fn routes() -> Routes {
    Routes::new().add("post", BATCHES_PATH, post_batch)
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
