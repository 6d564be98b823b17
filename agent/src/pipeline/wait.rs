//! How the pipeline's tasks wait: until a stop (or fault) flag turns true, and the random
//! jitter that spreads their retry delays.
//!
//! It knows nothing about the tasks, the store or the network.

use rand::Rng;
use tokio::sync::watch;

/// Resolves once the flag is true (or its sender is gone). Returns `()` rather than a watch
/// guard, which is not `Send` and must not live across an await.
pub(super) async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// A random factor in `[0, 1)` for [`Backoff::next_delay`](crate::backoff::Backoff::next_delay).
pub(super) fn jitter() -> f64 {
    rand::thread_rng().gen::<f64>()
}
