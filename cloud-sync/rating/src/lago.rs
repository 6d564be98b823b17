//! Lago event planning and answer classification: which event a record becomes, what
//! Lago's answer to a batch call means, and what the exporter does next. Pure: the outbox,
//! the HTTP calls and the clock are the endpoint's.
//!
//! - [`plan_event`]: a record and its epoch's exported maximum → the event's JSON bytes (sent
//!   verbatim on every retry) and the new maximum; its bytes are `max(0, used − exported
//!   maximum)` per direction, so an epoch's events add up to its highest `used`.
//! - [`plannable`]: a record no derivation can count is held back, never planned.
//! - [`classify_answer`] → [`CallOutcome`] → [`next_step`] → [`Step`]: per Lago's batch
//!   events contract (2xx accepted; 422 `value_already_exist` per position delivered; 429
//!   wait `Retry-After` / `X-RateLimit-Reset`; 5xx and 408 back off; anything else refused).

use std::collections::BTreeMap;
use std::time::Duration;

use countersign_meter::{RecordId, Totals};
use serde::{Deserialize, Serialize};

use crate::usage::{attribution_instant, first_report_of, record_fault, UsageRecord};

/// Why a record's event could not be planned. Not recoverable by retrying: the stored record
/// itself is out of range (ingest refuses such records; only legacy data can hold them).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The record's attribution instant is outside what a Lago timestamp can hold.
    #[error("record {0}: time out of range")]
    TimeOutOfRange(RecordId),
    /// The record's bytes, up plus down, overflow 64 bits.
    #[error("record {0}: bytes overflow")]
    BytesOverflow(RecordId),
    /// The event did not serialize.
    #[error("event does not encode: {0}")]
    Encode(String),
}

/// Events per batch call: Lago's documented maximum.
pub const LAGO_EVENTS_PER_CALL_MAX: usize = 100;

/// First backoff delay after a 5xx or transport error.
pub const LAGO_RETRY_DELAY_MS_MIN: u64 = 100;

/// Largest backoff delay.
pub const LAGO_RETRY_DELAY_MS_MAX: u64 = 30_000;

/// Longest wait honoured from `Retry-After` / `X-RateLimit-Reset`, seconds.
pub const LAGO_RETRY_AFTER_S_MAX: u64 = 300;

/// One event as sent; its serialization is stored in the outbox and sent verbatim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LagoEvent {
    /// The record id, `meter-epoch-seq`.
    pub transaction_id: String,
    /// The SIM's Lago subscription.
    pub external_subscription_id: String,
    /// The billable metric code.
    pub code: String,
    /// Unix seconds.
    pub timestamp: u64,
    /// `{"bytes": n}`.
    pub properties: LagoProperties,
}

/// The event's properties.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LagoProperties {
    /// Usage this record contributed, both directions.
    pub bytes: u64,
}

/// The transaction id of a record: `meter-epoch-seq`.
pub fn transaction_id(id: RecordId) -> String {
    format!("{}-{}-{}", id.meter_id, id.epoch, id.seq)
}

/// One record's event as planned: what the outbox stores and the epoch's new exported
/// maximum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    /// The event's JSON, stored before the first send and sent verbatim on every retry.
    pub json: Vec<u8>,
    /// The epoch's highest `used` exported so far, this record included.
    pub exported_max: Totals,
}

/// Plans the event of one record (pure; see "The event" in the module docs): its bytes are
/// `max(0, used − exported_max)` per direction, summed. `exported_max` is the highest `used`
/// already exported in the record's epoch (zero for its first).
pub fn plan_event(
    record: &UsageRecord,
    exported_max: Totals,
    subscription: &str,
    code: &str,
) -> Result<PlannedEvent, PlanError> {
    let timestamp = attribution_instant(&record.time, record.received_ms)
        .and_then(|t| u64::try_from(t.as_second()).ok())
        .ok_or(PlanError::TimeOutOfRange(record.id))?;
    // Saturating on purpose: this is the rule's max(0, used − exported max).
    let added = Totals {
        up: record.used.up.saturating_sub(exported_max.up),
        down: record.used.down.saturating_sub(exported_max.down),
    };
    let bytes = added.sum().ok_or(PlanError::BytesOverflow(record.id))?;
    let event = LagoEvent {
        transaction_id: transaction_id(record.id),
        external_subscription_id: subscription.to_owned(),
        code: code.to_owned(),
        timestamp,
        properties: LagoProperties { bytes },
    };
    let json = serde_json::to_vec(&event).map_err(|e| PlanError::Encode(e.to_string()))?;
    let exported_max =
        Totals { up: exported_max.up.max(record.used.up), down: exported_max.down.max(record.used.down) };
    Ok(PlannedEvent { json, exported_max })
}

/// Whether a record can be planned: one that no derivation can count (see
/// [`crate::usage::record_fault`]; only legacy data stored before ingest refused such
/// records) is held back and logged, never planned, and never stops the others.
pub fn plannable(r: &UsageRecord) -> bool {
    match record_fault(r) {
        None => true,
        Some(reason) => {
            if first_report_of(r.iccid, r.id) {
                tracing::warn!(
                    iccid = r.iccid,
                    record = %r.id,
                    reason = reason.code(),
                    detail = %reason,
                    "record held back from the lago export: its usage cannot be counted"
                );
            }
            false
        }
    }
}

/// The body of a batch call: the stored event bytes, verbatim.
pub fn batch_body(events: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut body = b"{\"events\":[".to_vec();
    for (i, (_, e)) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(e);
    }
    body.extend_from_slice(b"]}");
    body
}

/// What Lago's answer to one call means for the exporter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallOutcome {
    /// All events accepted.
    Accepted,
    /// The batch failed only because these positions already exist: they are delivered,
    /// the rest must be re-sent.
    AlreadyExist(Vec<usize>),
    /// Rate limited: wait this long.
    RateLimited(Duration),
    /// Lago or the network failed: retry after backoff.
    Retry,
    /// Refused for good: the status and the start of Lago's answer.
    Refused(u16, String),
}

#[derive(Deserialize)]
struct LagoErrorBody {
    #[serde(default)]
    error_details: BTreeMap<String, BTreeMap<String, Vec<String>>>,
}

/// Interprets one answer (pure; see the module docs). `events` is how many were sent.
pub fn classify_answer(
    status: u16,
    header: impl Fn(&str) -> Option<String>,
    body: &[u8],
    events: usize,
) -> CallOutcome {
    let refused =
        || CallOutcome::Refused(status, String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned());
    match status {
        200..=299 => CallOutcome::Accepted,
        429 => {
            let secs = ["retry-after", "x-ratelimit-reset"]
                .iter()
                .find_map(|h| header(h).and_then(|v| v.trim().parse::<u64>().ok()))
                .map(|s| s.min(LAGO_RETRY_AFTER_S_MAX));
            match secs {
                Some(s) => CallOutcome::RateLimited(Duration::from_secs(s)),
                None => CallOutcome::RateLimited(Duration::from_millis(LAGO_RETRY_DELAY_MS_MAX / 10)),
            }
        }
        422 => {
            let Ok(b) = serde_json::from_slice::<LagoErrorBody>(body) else { return refused() };
            let mut positions = Vec::new();
            for (pos, fields) in &b.error_details {
                let only_dup = fields.len() == 1
                    && fields
                        .get("transaction_id")
                        .is_some_and(|v| v.iter().all(|e| e == "value_already_exist"));
                match pos.parse::<usize>() {
                    Ok(p) if only_dup && p < events => positions.push(p),
                    _ => return refused(),
                }
            }
            if positions.is_empty() {
                refused()
            } else {
                positions.sort_unstable();
                CallOutcome::AlreadyExist(positions)
            }
        }
        500..=599 | 408 => CallOutcome::Retry,
        _ => refused(),
    }
}

/// What the exporter does after a call (see [`next_step`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Remove these outbox keys: Lago has their events.
    Settle {
        /// The delivered events' keys.
        keys: Vec<u64>,
        /// Lago had them already (`value_already_exist`); the rest of the call is resent.
        already_existed: bool,
    },
    /// Send the same events again after `wait`.
    Resend {
        /// How long to wait first.
        wait: Duration,
        /// Lago answered 429 (else it or the network failed).
        rate_limited: bool,
    },
    /// Lago refused for good; the events stay in the outbox.
    Stop {
        /// HTTP status.
        status: u16,
        /// The start of Lago's answer.
        body: String,
    },
}

/// Exponential backoff between failed calls: from [`LAGO_RETRY_DELAY_MS_MIN`], doubling to
/// [`LAGO_RETRY_DELAY_MS_MAX`], back to the start after an accepted call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    delay_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { delay_ms: LAGO_RETRY_DELAY_MS_MIN }
    }
}

/// Decides what follows a call that sent the events with keys `sent`, in order (pure).
pub fn next_step(outcome: CallOutcome, sent: &[u64], backoff: &mut Backoff) -> Step {
    match outcome {
        CallOutcome::Accepted => {
            *backoff = Backoff::default();
            Step::Settle { keys: sent.to_vec(), already_existed: false }
        }
        CallOutcome::AlreadyExist(positions) => Step::Settle {
            keys: positions.iter().filter_map(|p| sent.get(*p).copied()).collect(),
            already_existed: true,
        },
        CallOutcome::RateLimited(wait) => Step::Resend { wait, rate_limited: true },
        CallOutcome::Retry => {
            let wait = Duration::from_millis(backoff.delay_ms);
            backoff.delay_ms = backoff.delay_ms.saturating_mul(2).min(LAGO_RETRY_DELAY_MS_MAX);
            Step::Resend { wait, rate_limited: false }
        }
        CallOutcome::Refused(status, body) => Step::Stop { status, body },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_and_batch_bytes_are_pinned() {
        let e = LagoEvent {
            transaction_id: transaction_id(RecordId { meter_id: 10, epoch: 0, seq: 3 }),
            external_subscription_id: "sub_42".into(),
            code: "data_bytes".into(),
            timestamp: 1_795_521_600,
            properties: LagoProperties { bytes: 1536 },
        };
        let json = serde_json::to_vec(&e).unwrap();
        assert_eq!(
            String::from_utf8(json.clone()).unwrap(),
            r#"{"transaction_id":"10-0-3","external_subscription_id":"sub_42","code":"data_bytes","timestamp":1795521600,"properties":{"bytes":1536}}"#
        );
        let body = batch_body(&[(0, json.clone()), (1, json)]);
        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(doc["events"].as_array().unwrap().len(), 2);
        assert_eq!(batch_body(&[]), b"{\"events\":[]}");
    }

    #[test]
    fn answers_are_classified_per_the_contract() {
        let none = |_: &str| None;
        assert_eq!(classify_answer(200, none, b"{}", 3), CallOutcome::Accepted);
        let dup = br#"{"status":422,"error":"Unprocessable Entity","code":"validation_errors","error_details":{"0":{"transaction_id":["value_already_exist"]},"2":{"transaction_id":["value_already_exist"]}}}"#;
        assert_eq!(classify_answer(422, none, dup, 3), CallOutcome::AlreadyExist(vec![0, 2]));
        // A position beyond the batch, another error, or a batch-level error is a refusal.
        assert!(matches!(classify_answer(422, none, dup, 2), CallOutcome::Refused(422, _)));
        let other =
            br#"{"error_details":{"0":{"transaction_id":["value_already_exist"],"code":["invalid"]}}}"#;
        assert!(matches!(classify_answer(422, none, other, 3), CallOutcome::Refused(..)));
        let many = br#"{"status":422,"error_details":{"events":["too_many_events"]}}"#;
        assert!(matches!(classify_answer(422, none, many, 101), CallOutcome::Refused(..)));
        let reset = |h: &str| (h == "x-ratelimit-reset").then(|| "7".to_owned());
        assert_eq!(classify_answer(429, reset, b"", 1), CallOutcome::RateLimited(Duration::from_secs(7)));
        let both = |h: &str| match h {
            "retry-after" => Some("100000".to_owned()),
            "x-ratelimit-reset" => Some("7".to_owned()),
            _ => None,
        };
        assert_eq!(
            classify_answer(429, both, b"", 1),
            CallOutcome::RateLimited(Duration::from_secs(LAGO_RETRY_AFTER_S_MAX))
        );
        assert_eq!(classify_answer(503, none, b"", 1), CallOutcome::Retry);
        assert!(matches!(classify_answer(401, none, b"no", 1), CallOutcome::Refused(401, _)));
    }

    fn usage(seq: u32, up: u64, down: u64) -> UsageRecord {
        UsageRecord {
            id: RecordId { meter_id: 10, epoch: 0, seq },
            iccid: 8_988_280_666_000_000_001,
            used: Totals { up, down },
            time: countersign_meter::DeviceTime::wall_clock(
                countersign_meter::TimeQuality::Network,
                1_795_521_600,
            )
            .unwrap(),
            received_ms: 0,
        }
    }

    #[test]
    fn planned_bytes_are_the_increment_over_the_exported_maximum() {
        let bytes = |p: &PlannedEvent| serde_json::from_slice::<LagoEvent>(&p.json).unwrap().properties.bytes;
        let first = plan_event(&usage(0, 100, 1000), Totals::default(), "sub", "data_bytes").unwrap();
        assert_eq!((bytes(&first), first.exported_max), (1100, Totals { up: 100, down: 1000 }));
        // A later report adds only what is new, per direction.
        let second = plan_event(&usage(2, 150, 1000), first.exported_max, "sub", "data_bytes").unwrap();
        assert_eq!((bytes(&second), second.exported_max), (50, Totals { up: 150, down: 1000 }));
        // A report that arrives after a later one adds nothing and lowers nothing.
        let late = plan_event(&usage(1, 120, 900), second.exported_max, "sub", "data_bytes").unwrap();
        assert_eq!((bytes(&late), late.exported_max), (0, second.exported_max));
        // Up going backwards while down moves on counts only the down part.
        let mixed = plan_event(&usage(3, 10, 1500), late.exported_max, "sub", "data_bytes").unwrap();
        assert_eq!(bytes(&mixed), 500);
        let e = plan_event(&usage(0, u64::MAX, 1), Totals::default(), "sub", "c").unwrap_err();
        assert_eq!(e, PlanError::BytesOverflow(RecordId { meter_id: 10, epoch: 0, seq: 0 }));
    }

    #[test]
    fn steps_follow_the_answer() {
        let mut b = Backoff::default();
        let sent = [7, 8, 9];
        assert_eq!(
            next_step(CallOutcome::AlreadyExist(vec![0, 2]), &sent, &mut b),
            Step::Settle { keys: vec![7, 9], already_existed: true }
        );
        let waits: Vec<Duration> = (0..12)
            .map(|_| match next_step(CallOutcome::Retry, &sent, &mut b) {
                Step::Resend { wait, rate_limited: false } => wait,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(waits[0], Duration::from_millis(LAGO_RETRY_DELAY_MS_MIN));
        assert_eq!(waits[1], Duration::from_millis(2 * LAGO_RETRY_DELAY_MS_MIN));
        assert_eq!(waits[11], Duration::from_millis(LAGO_RETRY_DELAY_MS_MAX));
        assert_eq!(
            next_step(CallOutcome::RateLimited(Duration::from_secs(3)), &sent, &mut b),
            Step::Resend { wait: Duration::from_secs(3), rate_limited: true }
        );
        assert_eq!(
            next_step(CallOutcome::Accepted, &sent, &mut b),
            Step::Settle { keys: sent.to_vec(), already_existed: false }
        );
        assert_eq!(b, Backoff::default(), "an accepted call resets the backoff");
        assert_eq!(
            next_step(CallOutcome::Refused(401, "no".into()), &sent, &mut b),
            Step::Stop { status: 401, body: "no".into() }
        );
    }
}
