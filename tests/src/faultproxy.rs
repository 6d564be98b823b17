//! An HTTP proxy in front of the endpoint that can be told to misbehave: pass requests on,
//! answer 503 with `Retry-After`, answer 500, or hang past the client's timeout.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;

/// What the proxy does with the next requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Forward to the endpoint.
    Pass = 0,
    /// 503 with `Retry-After: 1`.
    Unavailable = 1,
    /// 500 with a JSON error body.
    ServerError = 2,
    /// Wait this long before answering 504: longer than the agent's request timeout.
    Hang = 3,
}

#[derive(Clone)]
struct Ctx {
    upstream: String,
    mode: Arc<AtomicU8>,
    http: reqwest::Client,
}

/// A running proxy.
pub struct FaultProxy {
    /// Its base URL.
    pub url: String,
    mode: Arc<AtomicU8>,
}

/// How long [`Mode::Hang`] waits.
const HANG_MS: u64 = 3000;

impl FaultProxy {
    /// Starts a proxy to `upstream` (base URL) on a free port.
    pub async fn start(upstream: &str) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let mode = Arc::new(AtomicU8::new(Mode::Pass as u8));
        let ctx = Ctx { upstream: upstream.to_owned(), mode: mode.clone(), http: reqwest::Client::new() };
        let app = Router::new().fallback(forward).with_state(ctx);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { url, mode })
    }

    /// Switches behaviour.
    pub fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }
}

async fn forward(State(ctx): State<Ctx>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    match ctx.mode.load(Ordering::SeqCst) {
        1 => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [("retry-after", "1")],
                "{\"code\":\"maintenance\",\"error\":\"down for maintenance\"}",
            )
                .into_response()
        }
        2 => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                "{\"code\":\"internal\",\"error\":\"injected fault\"}",
            )
                .into_response()
        }
        3 => {
            tokio::time::sleep(Duration::from_millis(HANG_MS)).await;
            return StatusCode::GATEWAY_TIMEOUT.into_response();
        }
        _ => {}
    }
    let mut req = ctx.http.post(format!("{}{}", ctx.upstream, uri.path())).body(body);
    if let Some(ct) = headers.get("content-type") {
        req = req.header("content-type", ct.as_bytes());
    }
    match req.send().await {
        Ok(r) => {
            let status = StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let bytes = r.bytes().await.unwrap_or_default();
            (status, [("content-type", "application/json")], bytes).into_response()
        }
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}
