//! Where the Lago export stands, shared between the exporter (which moves it) and the API
//! (which reports it on `/health` and `/metrics`). The transitions are a pure state machine,
//! [`ExportStatus`], with the time passed in; [`LagoStatus`] is its shared, locked copy.
//!
//! ```text
//!   starting ──metric ok──► running ⇄ standby (PostgreSQL: another process holds the lock)
//!      │  ▲                   │
//!      │  └──metric ok────────┤ metric missing / wrong ──► metric_mismatch (re-checked each round)
//!      └─ lago unreachable ──► unverified (re-checked each round; a running export stays running)
//!   running ── every call failing for LAGO_UNAVAILABLE_DEGRADED_S ──► unavailable ── a call accepted ──► running
//!   any ── refusal (too_many_events, 401, …) or a store fault that does not pass ──► stopped
//! ```
//!
//! `stopped` is final for the process: a refusal means a person must change something
//! (the batch size, the key, an event), and the fix takes a restart. Nothing planned is
//! dropped in any state: the outbox keeps every event until Lago accepted it.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use countersign_rating::lago::{MetricCheck, MetricMismatch, RefusalExplained};

use crate::wire::ops::{LagoHealth, LagoState};

/// Seconds between two checks of the billable metric while it matches. While it does not
/// (or could not be checked), it is checked every export round.
pub const LAGO_METRIC_CHECK_INTERVAL_S: u64 = 600;

/// Seconds of failing calls (5xx, 429, transport errors, retried with backoff) after which a
/// sending export reports `unavailable`: long enough that a Lago deploy or a burst of rate
/// limiting does not page anyone.
pub const LAGO_UNAVAILABLE_DEGRADED_S: u64 = 900;

/// Distinct refusal codes counted separately; more are counted as `other` (the codes come
/// from Lago's answers, so their number is bounded here, not by Lago).
pub const LAGO_REFUSAL_CODES_MAX: usize = 32;

/// The export's state and counters (pure: every transition takes the time as Unix seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportStatus {
    state: LagoState,
    problem: Option<Problem>,
    /// Whether the metric matched at the last check (a running export keeps running when a
    /// later check cannot reach Lago).
    metric_ok: bool,
    backlog: Option<u64>,
    /// When the current run of failing calls began.
    failing_since_unix_s: Option<u64>,
    delivered: u64,
    refusals: BTreeMap<String, u64>,
    metric_code: String,
    events_per_call: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Problem {
    code: String,
    what: String,
    hint: String,
    since_unix_s: u64,
}

impl ExportStatus {
    /// A status before the first metric check.
    pub fn new(metric_code: &str, events_per_call: usize) -> Self {
        Self {
            state: LagoState::Starting,
            problem: None,
            metric_ok: false,
            backlog: None,
            failing_since_unix_s: None,
            delivered: 0,
            refusals: BTreeMap::new(),
            metric_code: metric_code.to_owned(),
            events_per_call: u64::try_from(events_per_call).unwrap_or(u64::MAX),
        }
    }

    /// The state.
    pub fn state(&self) -> LagoState {
        self.state
    }

    /// Whether the exporter may plan and send: only once the metric matched and while
    /// nothing stopped it.
    pub fn may_send(&self) -> bool {
        matches!(self.state, LagoState::Running | LagoState::Standby | LagoState::Unavailable)
    }

    /// How long until the metric should be checked again.
    pub fn metric_check_in(&self) -> Option<Duration> {
        match self.state {
            LagoState::Stopped => None,
            LagoState::Running | LagoState::Standby | LagoState::Unavailable => {
                Some(Duration::from_secs(LAGO_METRIC_CHECK_INTERVAL_S))
            }
            LagoState::Starting | LagoState::Unverified | LagoState::MetricMismatch => Some(Duration::ZERO),
        }
    }

    fn set_problem(&mut self, state: LagoState, code: &str, what: String, hint: String, now_unix_s: u64) {
        // The same problem keeps its first time: "since" is when it began.
        let since_unix_s = match &self.problem {
            Some(p) if self.state == state && p.code == code => p.since_unix_s,
            _ => now_unix_s,
        };
        self.state = state;
        self.problem = Some(Problem { code: code.to_owned(), what, hint, since_unix_s });
    }

    /// The answer of a metric check.
    pub fn metric_checked(
        &mut self,
        check: &MetricCheck,
        refusal: Option<&RefusalExplained>,
        now_unix_s: u64,
    ) {
        if self.state == LagoState::Stopped {
            return;
        }
        match check {
            MetricCheck::Ok => {
                self.metric_ok = true;
                if !self.may_send() {
                    self.state = LagoState::Running;
                }
                if self.state != LagoState::Unavailable {
                    self.problem = None;
                }
            }
            MetricCheck::Mismatch(m) => {
                self.metric_ok = false;
                self.set_problem(LagoState::MetricMismatch, mismatch_code(m), m.to_string(), mismatch_hint(m), now_unix_s);
            }
            MetricCheck::Unavailable if self.metric_ok => {}
            MetricCheck::Unavailable => self.set_problem(
                LagoState::Unverified,
                "lago_unavailable",
                format!("the billable metric {} could not be checked: lago did not answer", self.metric_code),
                "check that lago is up and [lago] base_url reaches it; nothing is sent until the metric is checked"
                    .into(),
                now_unix_s,
            ),
            MetricCheck::Refused(status, body) => {
                let (code, hint) = match refusal {
                    Some(r) => (r.code.clone(), r.hint.clone()),
                    None => (format!("http_{status}"), String::new()),
                };
                self.stop(&code, format!("lago refused the metric check: {status} {body}"), hint, now_unix_s);
            }
        }
    }

    /// Lago refused a call for good (or the store failed for good): the export stops.
    pub fn stop(&mut self, code: &str, what: String, hint: String, now_unix_s: u64) {
        let key = if self.refusals.len() < LAGO_REFUSAL_CODES_MAX || self.refusals.contains_key(code) {
            code.to_owned()
        } else {
            "other".to_owned()
        };
        let n = self.refusals.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        self.set_problem(LagoState::Stopped, code, what, hint, now_unix_s);
    }

    /// An export round ended: `standby` when another process held the lock.
    pub fn round_done(&mut self, standby: bool) {
        if self.may_send() {
            if self.state == LagoState::Unavailable {
                self.problem = None;
            }
            self.state = if standby { LagoState::Standby } else { LagoState::Running };
        }
    }

    /// A batch call failed in a way the exporter retries (5xx, 429, transport): after
    /// [`LAGO_UNAVAILABLE_DEGRADED_S`] of nothing but failures, the export is `unavailable`.
    pub fn call_failed(&mut self, now_unix_s: u64) {
        if !self.may_send() {
            return;
        }
        let since = *self.failing_since_unix_s.get_or_insert(now_unix_s);
        if now_unix_s.saturating_sub(since) >= LAGO_UNAVAILABLE_DEGRADED_S {
            let what = format!("every lago call has failed since {since} (5xx, 429 or no answer); retrying");
            let hint =
                "check lago and the network path from the endpoint to [lago] base_url; nothing is lost";
            self.set_problem(LagoState::Unavailable, "lago_unavailable", what, hint.into(), since);
        }
    }

    /// Lago accepted a call: a run of failures is over.
    pub fn call_ok(&mut self) {
        self.failing_since_unix_s = None;
        if self.state == LagoState::Unavailable {
            self.state = LagoState::Running;
            self.problem = None;
        }
    }

    /// Lago accepted `n` more events.
    pub fn delivered(&mut self, n: usize) {
        self.delivered = self.delivered.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
    }

    /// The outbox holds `n` events.
    pub fn backlog(&mut self, n: u64) {
        self.backlog = Some(n);
    }

    /// Refusals so far, by code.
    pub fn refusals(&self) -> &BTreeMap<String, u64> {
        &self.refusals
    }

    /// The health answer's part.
    pub fn health(&self) -> LagoHealth {
        let p = self.problem.as_ref();
        LagoHealth {
            state: self.state,
            code: p.map(|p| p.code.clone()),
            problem: p.map(|p| p.what.clone()),
            hint: p.map(|p| p.hint.clone()).filter(|h| !h.is_empty()),
            since_unix_s: p.map(|p| p.since_unix_s),
            backlog: self.backlog,
            delivered: self.delivered,
            metric_code: self.metric_code.clone(),
            events_per_call: self.events_per_call,
        }
    }
}

fn mismatch_code(m: &MetricMismatch) -> &'static str {
    match m {
        MetricMismatch::NotFound { .. } => "metric_not_found",
        MetricMismatch::Aggregation { .. } => "metric_aggregation",
        MetricMismatch::Field { .. } => "metric_field",
        MetricMismatch::Expression { .. } => "metric_expression",
        MetricMismatch::Recurring { .. } => "metric_recurring",
        MetricMismatch::Unreadable { .. } => "metric_unreadable",
    }
}

fn mismatch_hint(m: &MetricMismatch) -> String {
    match m {
        MetricMismatch::NotFound { code } => format!(
            "create the billable metric {code} in lago (aggregation sum, field as [lago] field), or set [lago] code \
             to the metric's code and restart; nothing is sent until it exists"
        ),
        MetricMismatch::Field { .. } => "set the metric's field_name in lago to [lago] field, or [lago] field to \
                                         the metric's field_name and restart (with an empty backlog)"
            .into(),
        MetricMismatch::Unreadable { .. } => "check that [lago] base_url is lago's api root".into(),
        _ => "change the billable metric in lago to a non-recurring sum over [lago] field without expression; \
              nothing is sent until it matches"
            .into(),
    }
}

/// The export status shared by the exporter and the API.
#[derive(Debug)]
pub struct LagoStatus(Mutex<ExportStatus>);

impl LagoStatus {
    /// A shared status before the first metric check.
    pub fn new(metric_code: &str, events_per_call: usize) -> Self {
        Self(Mutex::new(ExportStatus::new(metric_code, events_per_call)))
    }

    /// Runs a transition under the lock.
    pub fn update<T>(&self, f: impl FnOnce(&mut ExportStatus) -> T) -> T {
        // Every transition leaves a whole state, so a poisoned lock still holds a valid one.
        f(&mut self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// A copy of the status now.
    pub fn snapshot(&self) -> ExportStatus {
        self.update(|s| s.clone())
    }
}

/// Unix seconds now, for the status's "since".
pub fn now_unix_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_export_sends_only_after_the_metric_matched_and_until_a_refusal() {
        let mut s = ExportStatus::new("data_bytes", 100);
        assert_eq!(
            (s.state(), s.may_send(), s.metric_check_in()),
            (LagoState::Starting, false, Some(Duration::ZERO))
        );
        // Lago unreachable at start: unverified, nothing sent, checked again at once.
        s.metric_checked(&MetricCheck::Unavailable, None, 10);
        assert_eq!((s.state(), s.may_send()), (LagoState::Unverified, false));
        assert!(s.state().degraded());
        s.metric_checked(&MetricCheck::Ok, None, 11);
        assert_eq!((s.state(), s.may_send()), (LagoState::Running, true));
        assert_eq!(s.health().problem, None);
        assert_eq!(s.metric_check_in(), Some(Duration::from_secs(LAGO_METRIC_CHECK_INTERVAL_S)));
        // A later blip does not stop a running export.
        s.metric_checked(&MetricCheck::Unavailable, None, 12);
        assert_eq!(s.state(), LagoState::Running);
        s.round_done(true);
        assert_eq!(s.state(), LagoState::Standby);
        s.round_done(false);
        // The metric is deleted in Lago: sending pauses, the problem keeps its first time.
        let gone = MetricCheck::Mismatch(MetricMismatch::NotFound { code: "data_bytes".into() });
        s.metric_checked(&gone, None, 20);
        s.metric_checked(&gone, None, 30);
        let h = s.health();
        assert_eq!(
            (h.state, h.code.as_deref(), h.since_unix_s),
            (LagoState::MetricMismatch, Some("metric_not_found"), Some(20))
        );
        assert!(!s.may_send());
        s.round_done(false);
        assert_eq!(s.state(), LagoState::MetricMismatch, "a round does not resume a paused export");
        s.metric_checked(&MetricCheck::Ok, None, 40);
        assert!(s.may_send());
        // A refusal stops it for good, whatever the metric says afterwards.
        s.backlog(7);
        s.stop("too_many_events", "lago refused the batch".into(), "lower it".into(), 50);
        s.metric_checked(&MetricCheck::Ok, None, 60);
        s.round_done(false);
        let h = s.health();
        assert_eq!(
            (h.state, h.code.as_deref(), h.backlog, h.since_unix_s),
            (LagoState::Stopped, Some("too_many_events"), Some(7), Some(50))
        );
        assert_eq!(s.metric_check_in(), None);
        assert_eq!(s.refusals()["too_many_events"], 1);
    }

    #[test]
    fn failing_calls_degrade_only_after_the_threshold_and_recover_on_the_first_success() {
        let mut s = ExportStatus::new("data_bytes", 100);
        // Before the metric matched nothing is sent, so nothing can fail.
        s.call_failed(0);
        assert_eq!(s.state(), LagoState::Starting);
        s.metric_checked(&MetricCheck::Ok, None, 0);
        s.call_failed(100);
        s.call_failed(100 + LAGO_UNAVAILABLE_DEGRADED_S - 1);
        assert_eq!(s.state(), LagoState::Running);
        s.call_failed(100 + LAGO_UNAVAILABLE_DEGRADED_S);
        let h = s.health();
        assert_eq!(
            (h.state, h.code.as_deref(), h.since_unix_s),
            (LagoState::Unavailable, Some("lago_unavailable"), Some(100))
        );
        assert!(s.may_send(), "the exporter keeps retrying");
        s.call_ok();
        assert_eq!((s.state(), s.health().problem), (LagoState::Running, None));
        // A new run of failures counts from its own start.
        s.call_failed(5000);
        s.call_failed(5000 + LAGO_UNAVAILABLE_DEGRADED_S - 1);
        assert_eq!(s.state(), LagoState::Running);
        s.call_failed(5000 + LAGO_UNAVAILABLE_DEGRADED_S);
        s.round_done(false);
        assert_eq!((s.state(), s.health().problem), (LagoState::Running, None));
    }

    #[test]
    fn refusal_codes_are_bounded() {
        let mut s = ExportStatus::new("c", 1);
        for i in 0..LAGO_REFUSAL_CODES_MAX + 10 {
            s.stop(&format!("code_{i}"), String::new(), String::new(), 0);
        }
        assert_eq!(s.refusals().len(), LAGO_REFUSAL_CODES_MAX + 1);
        assert_eq!(s.refusals()["other"], 10);
    }
}
