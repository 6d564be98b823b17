//! Evidence of what the endpoint refused: counters rendered as Prometheus text on
//! `GET /metrics`, and a log limiter so that a refusal is logged once per cause and then at
//! most once per [`LOG_REPEAT_INTERVAL_S`] with the number of repeats left out.
//!
//! Every label value comes from a closed set (an HTTP status, a reject reason's stable code,
//! a cause named in this crate), so the number of series is bounded whatever clients send.
//! Record outcomes are counted from the [`BatchReply`] itself, so a reject reason added to
//! the protocol is counted under its own code without a change here.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use countersign_protocol::{BatchReply, RecordOutcome};

use crate::negcache::LookupStats;
use crate::wire::ops::{LagoHealth, LagoState};

/// Seconds between two log lines of one refusal cause after its first.
pub const LOG_REPEAT_INTERVAL_S: u64 = 60;
/// Longest excerpt of an untrusted string written to a log line, in bytes (before escaping).
pub const LOG_EXCERPT_BYTES_MAX: usize = 120;

/// Decides which refusals are logged: the first of each cause at once, then one line per
/// [`LOG_REPEAT_INTERVAL_S`] carrying how many were left out. Pure: the caller passes the
/// time. Causes are `&'static str`, so the state is bounded by the causes the code names.
#[derive(Debug, Default)]
pub struct LogLimiter {
    causes: HashMap<&'static str, CauseLog>,
}

#[derive(Clone, Copy, Debug)]
struct CauseLog {
    last_logged: Instant,
    suppressed: u64,
}

impl LogLimiter {
    /// A limiter that has logged nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether to log an occurrence of `cause` at `now`: `Some(n)` with the number of
    /// occurrences left out since its last line, or `None` to stay silent.
    pub fn admit(&mut self, cause: &'static str, now: Instant) -> Option<u64> {
        let interval = Duration::from_secs(LOG_REPEAT_INTERVAL_S);
        match self.causes.get_mut(cause) {
            None => {
                self.causes.insert(cause, CauseLog { last_logged: now, suppressed: 0 });
                Some(0)
            }
            Some(c) if now.saturating_duration_since(c.last_logged) >= interval => {
                let left_out = c.suppressed;
                *c = CauseLog { last_logged: now, suppressed: 0 };
                Some(left_out)
            }
            Some(c) => {
                c.suppressed = c.suppressed.saturating_add(1);
                None
            }
        }
    }
}

/// An untrusted string made safe for one log line: cut to [`LOG_EXCERPT_BYTES_MAX`] bytes
/// (on a character boundary, marked with `…`) and escaped (control characters, quotes and
/// non-ASCII as Rust escapes), so it can neither forge a line nor flood the log.
pub fn log_excerpt(text: &str) -> String {
    let mut end = text.len().min(LOG_EXCERPT_BYTES_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut out: String = text[..end].escape_default().collect();
    if end < text.len() {
        out.push('…');
    }
    out
}

/// The endpoint's counters. Shared by the accept loop and the handlers; cheap to update.
#[derive(Debug, Default)]
pub struct Metrics {
    batches_by_status: Mutex<BTreeMap<u16, u64>>,
    records_by_outcome: Mutex<BTreeMap<&'static str, u64>>,
    rejected_by_reason: Mutex<BTreeMap<&'static str, u64>>,
    auth_refusals: Mutex<BTreeMap<&'static str, u64>>,
    rate_limited_batches: AtomicU64,
    connection_limit_waits: AtomicU64,
    header_timeouts: AtomicU64,
    body_timeouts: AtomicU64,
    connection_errors: AtomicU64,
    panics: AtomicU64,
    connections_open: AtomicU64,
    log: Mutex<LogLimiter>,
}

fn bump<K: Ord>(map: &Mutex<BTreeMap<K, u64>>, key: K, by: u64) {
    // A counter map is updated whole under its lock; a poisoned one is still consistent.
    let mut m = map.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let v = m.entry(key).or_insert(0);
    *v = v.saturating_add(by);
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    /// Counters at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// A batch answered with `status` (200 accepted, anything else refused as a whole).
    pub fn batch_answered(&self, status: u16) {
        bump(&self.batches_by_status, status, 1);
    }

    /// The per-record outcomes of an accepted batch.
    pub fn records(&self, reply: &BatchReply) {
        let (mut stored, mut duplicate, mut rejected) = (0u64, 0u64, 0u64);
        let mut reasons: BTreeMap<&'static str, u64> = BTreeMap::new();
        for r in &reply.results {
            match r {
                RecordOutcome::Stored => stored += 1,
                RecordOutcome::Duplicate => duplicate += 1,
                RecordOutcome::Rejected { reason, .. } => {
                    rejected += 1;
                    *reasons.entry(reason.code()).or_insert(0) += 1;
                }
            }
        }
        for (outcome, n) in [("stored", stored), ("duplicate", duplicate), ("rejected", rejected)] {
            if n > 0 {
                bump(&self.records_by_outcome, outcome, n);
            }
        }
        for (reason, n) in reasons {
            bump(&self.rejected_by_reason, reason, n);
        }
    }

    /// A request refused by the token check, by its error code (`unauthorized`, `forbidden`,
    /// `store_unavailable`).
    pub fn auth_refused(&self, code: &'static str) {
        bump(&self.auth_refusals, code, 1);
    }

    /// A batch turned away by its gateway's rate limit.
    pub fn rate_limited(&self) {
        inc(&self.rate_limited_batches);
    }

    /// The accept loop found every connection slot taken and waited for one.
    pub fn connection_limit_reached(&self) {
        inc(&self.connection_limit_waits);
    }

    /// A connection was closed because its request head did not arrive in time.
    pub fn header_timeout(&self) {
        inc(&self.header_timeouts);
    }

    /// A request was answered 408 because its body did not arrive in time.
    pub fn body_timeout(&self) {
        inc(&self.body_timeouts);
    }

    /// A connection ended with an error other than a timeout (reset, malformed HTTP).
    pub fn connection_error(&self) {
        inc(&self.connection_errors);
    }

    /// A handler panicked; the request was answered 500 and the endpoint kept serving.
    pub fn panic_caught(&self) {
        inc(&self.panics);
    }

    /// A connection was accepted (`+1`) or closed (`-1`).
    pub fn connection_opened(&self) {
        inc(&self.connections_open);
    }

    /// See [`Metrics::connection_opened`].
    pub fn connection_closed(&self) {
        // Never below zero, even if a close were counted twice.
        let _ =
            self.connections_open.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
    }

    /// Whether to log this occurrence of `cause` now (see [`LogLimiter::admit`]).
    pub fn log_admit(&self, cause: &'static str) -> Option<u64> {
        self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner).admit(cause, Instant::now())
    }

    /// The counters as Prometheus text exposition format (version 0.0.4), with the store's
    /// lookup counters.
    pub fn render(&self, lookups: LookupStats) -> String {
        let mut out = String::new();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let lock = |m: &Mutex<BTreeMap<u16, u64>>| {
            m.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
        };
        let lock_str = |m: &Mutex<BTreeMap<&'static str, u64>>| {
            m.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
        };
        header(&mut out, "countersign_batches_total", "counter", "Batches answered, by HTTP status.");
        for (status, n) in lock(&self.batches_by_status) {
            let _ = writeln!(out, "countersign_batches_total{{status=\"{status}\"}} {n}");
        }
        header(&mut out, "countersign_records_total", "counter", "Records of accepted batches, by outcome.");
        for (outcome, n) in lock_str(&self.records_by_outcome) {
            let _ = writeln!(out, "countersign_records_total{{outcome=\"{outcome}\"}} {n}");
        }
        header(
            &mut out,
            "countersign_records_rejected_total",
            "counter",
            "Rejected records, by reject reason code.",
        );
        for (reason, n) in lock_str(&self.rejected_by_reason) {
            let _ = writeln!(out, "countersign_records_rejected_total{{reason=\"{reason}\"}} {n}");
        }
        header(
            &mut out,
            "countersign_auth_refusals_total",
            "counter",
            "Requests refused by the operator token check, by error code.",
        );
        for (code, n) in lock_str(&self.auth_refusals) {
            let _ = writeln!(out, "countersign_auth_refusals_total{{code=\"{code}\"}} {n}");
        }
        let plain = [
            (
                "countersign_batches_rate_limited_total",
                "counter",
                "Batches turned away by their gateway's rate limit.",
                load(&self.rate_limited_batches),
            ),
            (
                "countersign_connection_limit_waits_total",
                "counter",
                "Times every connection slot was taken and new connections waited in the listen backlog.",
                load(&self.connection_limit_waits),
            ),
            (
                "countersign_header_timeouts_total",
                "counter",
                "Connections closed because a request head did not arrive in time.",
                load(&self.header_timeouts),
            ),
            (
                "countersign_body_timeouts_total",
                "counter",
                "Requests answered 408 because their body did not arrive in time.",
                load(&self.body_timeouts),
            ),
            (
                "countersign_connection_errors_total",
                "counter",
                "Connections that ended with an error other than a timeout.",
                load(&self.connection_errors),
            ),
            (
                "countersign_panics_total",
                "counter",
                "Handler panics caught (answered 500, the endpoint kept serving).",
                load(&self.panics),
            ),
            ("countersign_connections_open", "gauge", "Connections open now.", load(&self.connections_open)),
            (
                "countersign_gateway_lookups_total",
                "counter",
                "Gateway key lookups that reached the store.",
                lookups.gateway_store_lookups,
            ),
            (
                "countersign_gateway_negative_cache_hits_total",
                "counter",
                "Unknown gateway ids answered from the negative cache.",
                lookups.gateway_negative_hits,
            ),
            (
                "countersign_token_lookups_total",
                "counter",
                "API token lookups that reached the store.",
                lookups.token_store_lookups,
            ),
            (
                "countersign_token_negative_cache_hits_total",
                "counter",
                "Unknown API tokens answered from the negative cache.",
                lookups.token_negative_hits,
            ),
        ];
        for (name, kind, help, value) in plain {
            header(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
        out
    }
}

/// Appends the Lago export's series (only when this process runs an export): state gauges,
/// backlog, deliveries and refusals by code. Refusal codes are plain identifiers, bounded in
/// number by the export status (`LAGO_REFUSAL_CODES_MAX`).
pub fn render_lago(out: &mut String, h: &LagoHealth, refusals: &BTreeMap<String, u64>) {
    let flag = |b: bool| u64::from(b);
    for (name, help, value) in [
        (
            "countersign_lago_export_stopped",
            "1 when the Lago export stopped on a refusal (see /health lago.code); restart after the fix.",
            flag(h.state == LagoState::Stopped),
        ),
        (
            "countersign_lago_metric_mismatch",
            "1 when the Lago billable metric is missing or would not bill the events; nothing is sent.",
            flag(h.state == LagoState::MetricMismatch),
        ),
        (
            "countersign_lago_unavailable",
            "1 when every Lago call has failed for 15 minutes or more; the exporter keeps retrying.",
            flag(h.state == LagoState::Unavailable),
        ),
        (
            "countersign_lago_metric_unverified",
            "1 when the Lago billable metric could not be checked yet; nothing is sent.",
            flag(h.state == LagoState::Unverified),
        ),
    ] {
        header(out, name, "gauge", help);
        let _ = writeln!(out, "{name} {value}");
    }
    if let Some(backlog) = h.backlog {
        header(
            out,
            "countersign_lago_backlog_events",
            "gauge",
            "Events planned and not yet accepted by Lago.",
        );
        let _ = writeln!(out, "countersign_lago_backlog_events {backlog}");
    }
    header(
        out,
        "countersign_lago_events_delivered_total",
        "counter",
        "Events Lago accepted since the process started.",
    );
    let _ = writeln!(out, "countersign_lago_events_delivered_total {}", h.delivered);
    header(
        out,
        "countersign_lago_refusals_total",
        "counter",
        "Lago refusals that stopped the export, by code.",
    );
    for (code, n) in refusals {
        let _ = writeln!(out, "countersign_lago_refusals_total{{code=\"{code}\"}} {n}");
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use countersign_protocol::RejectReason;

    #[test]
    fn each_cause_logs_once_then_once_per_interval_with_the_count_left_out() {
        let mut l = LogLimiter::new();
        let t0 = Instant::now();
        assert_eq!(l.admit("bad_signature", t0), Some(0));
        assert_eq!(l.admit("bad_signature", t0 + Duration::from_secs(1)), None);
        assert_eq!(l.admit("bad_signature", t0 + Duration::from_secs(2)), None);
        // Another cause is logged at once, whatever the first did.
        assert_eq!(l.admit("rate_limited", t0 + Duration::from_secs(2)), Some(0));
        let next = t0 + Duration::from_secs(LOG_REPEAT_INTERVAL_S);
        assert_eq!(l.admit("bad_signature", next), Some(2));
        assert_eq!(l.admit("bad_signature", next + Duration::from_secs(1)), None);
        assert_eq!(l.admit("bad_signature", next + Duration::from_secs(LOG_REPEAT_INTERVAL_S)), Some(1));
        // A clock that goes back logs nothing new and does not panic.
        assert_eq!(l.admit("rate_limited", t0), None);
    }

    #[test]
    fn untrusted_text_is_escaped_and_cut() {
        assert_eq!(log_excerpt("plain"), "plain");
        assert_eq!(log_excerpt("a\nfake=1\u{1b}[31m\"q\""), "a\\nfake=1\\u{1b}[31m\\\"q\\\"");
        let long = "é".repeat(LOG_EXCERPT_BYTES_MAX);
        let cut = log_excerpt(&long);
        assert!(cut.ends_with('…'));
        assert_eq!(cut.matches("\\u{e9}").count(), LOG_EXCERPT_BYTES_MAX / 2);
    }

    #[test]
    fn records_are_counted_by_outcome_and_reason_code() {
        let m = Metrics::new();
        let rejected = |reason| RecordOutcome::Rejected { reason, detail: "x".into() };
        m.records(&BatchReply {
            gateway_id: 1,
            batch_seq: 1,
            results: vec![
                RecordOutcome::Stored,
                RecordOutcome::Stored,
                RecordOutcome::Duplicate,
                rejected(RejectReason::BadTag),
                rejected(RejectReason::BadTag),
                rejected(RejectReason::UnknownMeter),
            ],
        });
        m.batch_answered(200);
        m.batch_answered(401);
        m.batch_answered(200);
        m.rate_limited();
        let text = m.render(LookupStats { gateway_negative_hits: 3, ..LookupStats::default() });
        for line in [
            "countersign_batches_total{status=\"200\"} 2",
            "countersign_batches_total{status=\"401\"} 1",
            "countersign_records_total{outcome=\"stored\"} 2",
            "countersign_records_total{outcome=\"duplicate\"} 1",
            "countersign_records_total{outcome=\"rejected\"} 3",
            "countersign_records_rejected_total{reason=\"bad_tag\"} 2",
            "countersign_records_rejected_total{reason=\"unknown_meter\"} 1",
            "countersign_batches_rate_limited_total 1",
            "countersign_gateway_negative_cache_hits_total 3",
            "countersign_panics_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
        // Every sample has HELP and TYPE lines before it.
        assert_eq!(text.matches("# TYPE ").count(), text.matches("# HELP ").count());
    }
}
