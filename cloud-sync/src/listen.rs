//! The endpoint's accept loop: what any client on the network can hold, bounded.
//!
//! - **Connections**: at most [`ServerLimits::connections_max`] are served at once. When every
//!   slot is taken the loop stops accepting, so new connections wait in the kernel's listen
//!   backlog in arrival order and are taken as slots free up (a client reconnecting in a loop
//!   goes to the back of that queue; it cannot keep a slot from a waiting gateway).
//! - **Request heads**: hyper closes a connection whose request line and headers do not
//!   arrive within [`ServerLimits::header_timeout`]; the same timer runs while a keep-alive
//!   connection sits idle between requests, so idle connections free their slot too. A head
//!   is at most [`REQUEST_HEAD_BYTES_MAX`].
//! - **Request bodies**: every body is read under one deadline, [`ServerLimits::body_timeout`]
//!   from the moment its head arrived ([`DeadlineBody`]); a body that trickles in answers 408
//!   and the connection is closed.
//! - **Panics** in a handler are caught: the request answers 500, the panic is counted, and the
//!   endpoint keeps serving.
//!
//! Responses are small for every route a client without a token can reach (a batch reply is
//! at most one line per record of its batch), so a client that stops reading cannot hold a
//! slot beyond the kernel's socket buffer; the routes with large answers need a token.
//!
//! Graceful shutdown: the loop stops accepting, every connection is told to finish its
//! request in flight and close, and the loop waits up to [`SHUTDOWN_GRACE_S`] for them.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body::{Frame, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::{watch, Semaphore};

use crate::config::ServerLimits;
use crate::metrics::{log_excerpt, Metrics};

/// Seconds the endpoint waits at shutdown for connections to finish their request in flight.
pub const SHUTDOWN_GRACE_S: u64 = 30;
/// Largest request head (request line and headers) read into memory, in bytes; hyper's
/// read buffer is capped at this, so a connection holds at most this much of a head (a
/// longer one answers 431). hyper refuses less than 8 KiB.
pub const REQUEST_HEAD_BYTES_MAX: usize = 64 * 1024;
/// Pause after an accept error that is not about one connection (out of file descriptors),
/// so the loop does not spin while the condition lasts.
pub const ACCEPT_ERROR_PAUSE_MS: u64 = 100;

/// Serves `router` on `listener` under `limits` until `shutdown` completes, then lets requests
/// in flight finish (up to [`SHUTDOWN_GRACE_S`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: ServerLimits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.connections_max));
    let (close_tx, close_rx) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    'accept: loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                metrics.connection_limit_reached();
                if let Some(left_out) = metrics.log_admit("connection_limit") {
                    tracing::warn!(
                        connections_max = limits.connections_max,
                        left_out,
                        "every connection slot is taken; new connections wait in the backlog"
                    );
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break 'accept,
                    },
                    () = &mut shutdown => break 'accept,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    if !is_connection_error(&e) {
                        if let Some(left_out) = metrics.log_admit("accept_error") {
                            tracing::error!(error = %e, left_out, "accept failed");
                        }
                        tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_PAUSE_MS)).await;
                    }
                    continue;
                }
            },
            () = &mut shutdown => break 'accept,
        };
        // Replies are small and latency matters more than packet count.
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let metrics = metrics.clone();
        let close = close_rx.clone();
        tokio::spawn(async move {
            metrics.connection_opened();
            serve_connection(stream, peer, router, limits, &metrics, close).await;
            metrics.connection_closed();
            drop(slot);
        });
    }
    drop(listener);
    let _ = close_tx.send(true);
    let all = u32::try_from(limits.connections_max).unwrap_or(u32::MAX);
    match tokio::time::timeout(Duration::from_secs(SHUTDOWN_GRACE_S), slots.acquire_many(all)).await {
        Ok(_) => {}
        Err(_) => tracing::warn!(
            grace_s = SHUTDOWN_GRACE_S,
            "connections still open after the shutdown grace; leaving them"
        ),
    }
    Ok(())
}

/// Errors of one connection that the accept loop skips without pausing.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    router: Router,
    limits: ServerLimits,
    metrics: &Metrics,
    mut close: watch::Receiver<bool>,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(REQUEST_HEAD_BYTES_MAX)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router));
    let mut conn = pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = async { drop(close.wait_for(|c| *c).await) } => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            metrics.header_timeout();
            if let Some(left_out) = metrics.log_admit("header_timeout") {
                tracing::info!(%peer, left_out, "connection closed: no request head in time");
            }
        } else if !e.is_incomplete_message() && !e.is_canceled() {
            metrics.connection_error();
            if let Some(left_out) = metrics.log_admit("connection_error") {
                tracing::info!(%peer, left_out, error = %log_excerpt(&e.to_string()), "connection ended with an error");
            }
        }
    }
}

/// Why a request body was cut off.
#[derive(Debug, thiserror::Error)]
#[error("request body did not arrive within {0:?}")]
pub struct BodyTimeout(Duration);

/// A request body read under a deadline: once it passes, the next read fails with
/// [`BodyTimeout`] (whatever the client still sends) and `fired` is set.
pub struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    fired: Arc<AtomicBool>,
}

impl DeadlineBody {
    /// `inner` with `timeout` from now; `fired` is set if the deadline cuts it off.
    pub fn new(inner: Body, timeout: Duration, fired: Arc<AtomicBool>) -> Self {
        Self { inner, deadline: Box::pin(tokio::time::sleep(timeout)), timeout, fired }
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.fired.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(axum::Error::new(BodyTimeout(this.timeout)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What [`guard`] needs: the body deadline and the counters.
#[derive(Clone)]
pub(crate) struct Guard {
    pub(crate) body_timeout: Duration,
    pub(crate) metrics: Arc<Metrics>,
}

/// Middleware around every route: the body deadline, and a handler's panic turned into a 500
/// answer (counted and logged) instead of a dropped connection.
pub(crate) async fn guard(State(g): State<Guard>, request: Request, next: Next) -> Response {
    let fired = Arc::new(AtomicBool::new(false));
    let (parts, body) = request.into_parts();
    let body = Body::new(DeadlineBody::new(body, g.body_timeout, fired.clone()));
    let request = Request::from_parts(parts, body);
    // On a task of its own so that a panic is caught at the task boundary; a client that goes
    // away therefore no longer cancels its request half way (a batch is stored or not whole).
    let response = match tokio::spawn(next.run(request)).await {
        Ok(response) => response,
        Err(e) => {
            g.metrics.panic_caught();
            let message = e.try_into_panic().ok().map_or_else(String::new, |p| panic_message(&*p));
            if let Some(left_out) = g.metrics.log_admit("panic") {
                tracing::error!(panic = %log_excerpt(&message), left_out, "handler panicked; answered 500");
            }
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; see the endpoint log",
            );
        }
    };
    if fired.load(Ordering::Relaxed) {
        g.metrics.body_timeout();
        if let Some(left_out) = g.metrics.log_admit("body_timeout") {
            tracing::info!(
                left_out,
                timeout_s = g.body_timeout.as_secs(),
                "request body too slow; answered 408"
            );
        }
        let mut r = error(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            &format!("request body did not arrive within {} s", g.body_timeout.as_secs_f64()),
        );
        // The rest of the body may still be on its way: the connection cannot be reused.
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    response
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = countersign_protocol::ErrorBody { code: code.to_owned(), error: message.to_owned() };
    (status, axum::Json(body)).into_response()
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;

    async fn panics() -> &'static str {
        panic!("boom\nforged log line")
    }

    async fn ok() -> &'static str {
        "ok"
    }

    /// A panicking handler answers 500 and is counted; the next request is served.
    #[tokio::test]
    async fn a_handler_panic_is_caught_counted_and_answered() {
        let metrics = Arc::new(Metrics::new());
        let guard_state = Guard { body_timeout: Duration::from_secs(5), metrics: metrics.clone() };
        let router = Router::new()
            .route("/panic", get(panics))
            .route("/ok", get(ok))
            .layer(axum::middleware::from_fn_with_state(guard_state, guard));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let limits = ServerLimits { connections_max: 2, ..ServerLimits::default() };
        let server = tokio::spawn(serve(listener, router, limits, metrics.clone(), async {
            let _ = stopped.await;
        }));
        let http = reqwest::Client::new();
        let r = http.get(format!("http://{addr}/panic")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 500);
        assert!(r.text().await.unwrap().contains("\"code\":\"internal\""));
        let r = http.get(format!("http://{addr}/ok")).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "ok");
        let text = metrics.render(crate::negcache::LookupStats::default());
        assert!(text.lines().any(|l| l == "countersign_panics_total 1"), "{text}");
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }
}
