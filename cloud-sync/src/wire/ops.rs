//! Operations on the wire: the health answer and the paths of health and metrics (the
//! metrics are Prometheus text, not JSON). Knows nothing of axum or the store.

use serde::{Deserialize, Serialize};

/// Path of the health check.
pub const HEALTH_PATH: &str = "/health";
/// Path of the Prometheus metrics.
pub const METRICS_PATH: &str = "/metrics";

/// Answer of `GET /health`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReply {
    /// Always `ok` when the process answers.
    pub status: String,
}
