//! Who may call a route: the bearer token of a request, checked against the bootstrap admin
//! token and the token hashes in the store, and the middleware that lets a request through
//! only with a role that allows it. The roles and hashing are [`crate::auth`]'s (shared with
//! the client and the CLI, which must not import the routes).

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::error::ApiError;
use crate::api::AppState;
use crate::auth::{token_sha256, Role, TOKEN_BYTES};
use crate::store::StoreError;

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

/// Lets a request through with a query or admin token.
pub(super) async fn require_query(State(state): State<AppState>, request: Request, next: Next) -> Response {
    require(state, request, next, Role::Query).await
}

/// Lets a request through with an admin token only.
pub(super) async fn require_admin(State(state): State<AppState>, request: Request, next: Next) -> Response {
    require(state, request, next, Role::Admin).await
}
