//! Every error answer of the API in one place: [`ApiError`] (status, stable `code`, message,
//! as an [`ErrorBody`]) and the mapping of each failure below the routes (store, usage,
//! ingest, ledger, billing) to its status and code. Knows nothing of the routes themselves.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use countersign_protocol::{BatchError, ErrorBody};

use crate::billing::{BillingError, Refusal};
use crate::service::ingest::IngestError;
use crate::store::ledger::LedgerError;
use crate::store::StoreError;
use crate::usage::{SimFault, UsageError};
use crate::wire::admin::ADMIN_FAULTS_PATH;

/// An error answer: status, stable code, message.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) code: &'static str,
    pub(super) error: String,
    pub(super) retry_after_s: Option<u64>,
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

impl From<Refusal> for ApiError {
    fn from(e: Refusal) -> Self {
        BillingError::from(e).into()
    }
}

impl From<BillingError> for ApiError {
    fn from(e: BillingError) -> Self {
        match e {
            BillingError::Store(s) => s.into(),
            BillingError::Refused(Refusal::NotConfigured) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_configured", e.to_string())
            }
            BillingError::Refused(Refusal::NoWallet(_) | Refusal::UnknownCustomer(_)) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            BillingError::Refused(Refusal::TopupConflict { .. }) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            BillingError::Refused(Refusal::TooManyTopups(_)) => {
                ApiError::new(StatusCode::CONFLICT, "too_many_topups", e.to_string())
            }
            BillingError::Refused(Refusal::BadRequest(m)) => ApiError::bad_request(m),
            BillingError::Refused(Refusal::Underivable(f)) => underivable_error(&f),
            other => {
                tracing::error!(error = %other, "billing failed");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "billing_error", other.to_string())
            }
        }
    }
}

/// A refused batch: what the gateway should do follows from the status (fix, back off, retry).
pub(super) fn ingest_error(e: IngestError) -> ApiError {
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

/// A refused settlement or ledger query: a bad zone or window is the caller's, a zone other
/// than the ledger's a conflict.
pub(super) fn ledger_error(e: LedgerError) -> ApiError {
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

/// The error of a single-SIM answer for a SIM whose usage cannot be derived.
pub(crate) fn underivable_error(f: &SimFault) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "underivable_sim",
        format!("usage cannot be derived: {f}; see {ADMIN_FAULTS_PATH}"),
    )
}

/// The answer of a path no route serves.
pub(super) async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

/// The answer of a served path asked with another method.
pub(super) async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
}
