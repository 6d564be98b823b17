//! Operations on the wire: the health answer and the paths of health and metrics (the
//! metrics are Prometheus text, not JSON). Knows nothing of axum or the store.

use serde::{Deserialize, Serialize};

/// Path of the health check.
pub const HEALTH_PATH: &str = "/health";
/// Path of the Prometheus metrics.
pub const METRICS_PATH: &str = "/metrics";

/// `status` when nothing is wrong.
pub const HEALTH_OK: &str = "ok";
/// `status` when the process serves but a part of it needs an operator (see `lago`).
pub const HEALTH_DEGRADED: &str = "degraded";

/// Answer of `GET /health`: always 200 while the process answers (a load balancer must not
/// take an endpoint out of service for a problem ingest does not have); `status` says
/// whether an operator is needed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReply {
    /// [`HEALTH_OK`], or [`HEALTH_DEGRADED`] when the Lago export needs an operator.
    pub status: String,
    /// The Lago export, when this process runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lago: Option<LagoHealth>,
}

/// Where the Lago export stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LagoState {
    /// The billable metric has not been checked yet.
    Starting,
    /// Checked, sending.
    Running,
    /// Checked; another process holds the export lock (PostgreSQL) and sends.
    Standby,
    /// Sending, but every call has failed (5xx, 429, transport) for a while (see
    /// `LAGO_UNAVAILABLE_DEGRADED_S`); the exporter keeps retrying with backoff and nothing
    /// is lost. Degraded.
    Unavailable,
    /// The billable metric could not be checked (Lago unreachable or failing): nothing is
    /// sent until it is; checked again every round. Degraded.
    Unverified,
    /// The billable metric would not bill the events (missing, wrong aggregation or field):
    /// nothing is sent until it is fixed in Lago; checked again every round. Degraded.
    MetricMismatch,
    /// Lago refused a call for a reason retrying cannot fix: nothing is sent until the
    /// endpoint is restarted with the cause fixed; nothing planned is dropped. Degraded.
    Stopped,
}

impl LagoState {
    /// Whether this state needs an operator (`/health` says `degraded`).
    pub fn degraded(self) -> bool {
        matches!(
            self,
            LagoState::Unavailable | LagoState::Unverified | LagoState::MetricMismatch | LagoState::Stopped
        )
    }

    /// The state's name on the wire and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            LagoState::Starting => "starting",
            LagoState::Running => "running",
            LagoState::Standby => "standby",
            LagoState::Unavailable => "unavailable",
            LagoState::Unverified => "unverified",
            LagoState::MetricMismatch => "metric_mismatch",
            LagoState::Stopped => "stopped",
        }
    }
}

/// The Lago export's part of the health answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LagoHealth {
    /// Where the export stands.
    pub state: LagoState,
    /// A stable name of the problem (`too_many_events`, `unauthorized`, `metric_not_found`,
    /// `metric_aggregation`, `metric_field`, …); `null` when there is none.
    pub code: Option<String>,
    /// What is wrong, in words; `null` when nothing is.
    pub problem: Option<String>,
    /// What the operator should do; `null` when nothing.
    pub hint: Option<String>,
    /// Unix seconds since when the problem holds; `null` when there is none.
    pub since_unix_s: Option<u64>,
    /// Events planned and not yet accepted by Lago, as last counted; `null` until counted.
    pub backlog: Option<u64>,
    /// Events Lago accepted since this process started.
    pub delivered: u64,
    /// The billable metric code the events are sent under.
    pub metric_code: String,
    /// Events per batch call.
    pub events_per_call: u64,
}
