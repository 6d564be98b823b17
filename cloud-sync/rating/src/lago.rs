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
//! - [`explain_refusal`]: a refusal → a stable code (`too_many_events`, `unauthorized`, …) and
//!   what the operator should change, for health, metrics and the CLI.
//! - [`check_metric`] → [`MetricCheck`]: Lago's answer to `GET /api/v1/billable_metrics/{code}`
//!   → whether the metric exists and sums the configured field. Lago accepts events of an
//!   unknown code, or without the metric's field, and then bills nothing for them, so the
//!   exporter sends only while this says [`MetricCheck::Ok`].
//!
//! Lago's contract, as read from its source: `getlago/lago-api` commit
//! `1b1c24a6a6c321d7900b05906bf1b20f706c97c2` (`app/services/events/create_batch_service.rb`:
//! `LAGO_EVENTS_BATCH_MAX_LENGTH`, default 100, else 422 `too_many_events` on `events`;
//! `app/controllers/concerns/api_errors.rb` and `api_responses.rb`: the error bodies, 404
//! `{resource}_not_found`; `app/serializers/v1/billable_metric_serializer.rb`), and its
//! OpenAPI, `getlago/lago-openapi` commit `120da1213306145141d3dd34022dd47a3216c911`
//! (`src/resources/billable_metric.yaml`, `src/schemas/BillableMetricObject.yaml`).

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

/// Events per batch call unless configured: Lago's default `LAGO_EVENTS_BATCH_MAX_LENGTH`
/// (the most a Lago Cloud or default self-hosted Lago accepts).
pub const LAGO_EVENTS_PER_CALL_DEFAULT: usize = 100;

/// Most events per batch call the exporter accepts as configuration: a self-hosted Lago may
/// raise `LAGO_EVENTS_BATCH_MAX_LENGTH`. Bounds the request (~200 bytes an event) and Lago's
/// answer, which echoes every event (~500 bytes each), well under `LAGO_RESPONSE_BYTES_MAX`.
pub const LAGO_EVENTS_PER_CALL_MAX: usize = 1000;

/// The billable metric code unless configured.
pub const LAGO_METRIC_CODE_DEFAULT: &str = "data_bytes";

/// The event property carrying the bytes unless configured.
pub const LAGO_METRIC_FIELD_DEFAULT: &str = "bytes";

/// The aggregation the metric must have: the events carry increments, so Lago must add them.
pub const LAGO_AGGREGATION_EXPECTED: &str = "sum_agg";

/// Longest excerpt of a Lago answer kept in a refusal or mismatch description, bytes.
pub const LAGO_ANSWER_EXCERPT_BYTES_MAX: usize = 512;

/// Which billable metric the events feed: its code, and the event property Lago sums.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LagoMetric {
    /// The billable metric code, e.g. `data_bytes`.
    pub code: String,
    /// The property carrying the bytes, the metric's `field_name`, e.g. `bytes`.
    pub field: String,
}

impl Default for LagoMetric {
    fn default() -> Self {
        Self { code: LAGO_METRIC_CODE_DEFAULT.into(), field: LAGO_METRIC_FIELD_DEFAULT.into() }
    }
}

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
    /// One entry: the metric's field (e.g. `bytes`) → the usage this record contributed,
    /// both directions.
    pub properties: BTreeMap<String, u64>,
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
/// already exported in the record's epoch (zero for its first); `metric` names the code and
/// the property the bytes go in.
pub fn plan_event(
    record: &UsageRecord,
    exported_max: Totals,
    subscription: &str,
    metric: &LagoMetric,
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
        code: metric.code.clone(),
        timestamp,
        properties: BTreeMap::from([(metric.field.clone(), bytes)]),
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

/// Whether an event in the outbox was planned for `metric` (pure): its `code` and its one
/// property are the metric's code and field. Events are sent verbatim, so one planned before
/// `[lago] code` or `field` changed would go to the old metric: the exporter sends none
/// until the outbox holds only events of the configured metric (see
/// [`planned_for_other_metric`]).
pub fn planned_for(event_json: &[u8], metric: &LagoMetric) -> bool {
    serde_json::from_slice::<LagoEvent>(event_json).is_ok_and(|e| {
        e.code == metric.code && e.properties.len() == 1 && e.properties.contains_key(&metric.field)
    })
}

/// The first event (of those read from the outbox) not planned for `metric`, described for
/// the operator; `None` when every one was.
pub fn planned_for_other_metric(events: &[(u64, Vec<u8>)], metric: &LagoMetric) -> Option<String> {
    let (_, json) = events.iter().find(|(_, e)| !planned_for(e, metric))?;
    let planned = serde_json::from_slice::<LagoEvent>(json).ok().map(|e| {
        let fields: Vec<&str> = e.properties.keys().map(String::as_str).collect();
        format!("code {:?}, field {:?}", e.code, fields.join(","))
    });
    Some(format!(
        "the outbox holds events planned under {}, the config says code {:?}, field {:?}",
        planned.unwrap_or_else(|| "another shape".into()),
        metric.code,
        metric.field
    ))
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
    let refused = || CallOutcome::Refused(status, excerpt(body));
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

/// The start of an answer, as text, for a description.
fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(LAGO_ANSWER_EXCERPT_BYTES_MAX)]).into_owned()
}

/// Lago's error body (`api_errors.rb`): only the fields a decision reads.
#[derive(Deserialize)]
struct LagoErrorCode {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    error_details: Option<serde_json::Value>,
}

/// Longest code taken from Lago's answer, bytes; a longer one is not a code Lago sends.
const LAGO_ERROR_CODE_BYTES_MAX: usize = 64;

/// A refusal explained for people and dashboards (see [`explain_refusal`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusalExplained {
    /// A stable code: `too_many_events`, `unauthorized`, Lago's own `code` when it is a plain
    /// identifier (e.g. `validation_errors`), else `http_<status>`.
    pub code: String,
    /// What the operator should change.
    pub hint: String,
}

/// Names a refusal and says what to do (pure). `events_per_call` is the configured batch
/// size, quoted in the `too_many_events` hint. The code comes from a closed shape (a plain
/// lowercase identifier of at most 64 bytes), so it is safe as a metric label.
pub fn explain_refusal(status: u16, body: &[u8], events_per_call: usize) -> RefusalExplained {
    let parsed = serde_json::from_slice::<LagoErrorCode>(body).ok();
    let too_many = parsed
        .as_ref()
        .and_then(|b| b.error_details.as_ref())
        .and_then(|d| d.get("events"))
        .and_then(|e| e.as_array())
        .is_some_and(|a| a.iter().any(|v| v == "too_many_events"));
    if status == 422 && too_many {
        return RefusalExplained {
            code: "too_many_events".into(),
            hint: format!(
                "lago accepts fewer than {events_per_call} events per call (its LAGO_EVENTS_BATCH_MAX_LENGTH): \
                 lower [lago] events_per_call or raise that setting in lago, then restart the endpoint"
            ),
        };
    }
    if status == 401 {
        return RefusalExplained {
            code: "unauthorized".into(),
            hint: "lago does not accept the api key: put the organization's key in [lago] api_key_file, \
                   then restart the endpoint"
                .into(),
        };
    }
    let plain = |c: &str| {
        !c.is_empty()
            && c.len() <= LAGO_ERROR_CODE_BYTES_MAX
            && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    let code = parsed.and_then(|b| b.code).filter(|c| plain(c)).unwrap_or_else(|| format!("http_{status}"));
    let hint = match status {
        404 => "lago has no such route: check [lago] base_url (lago's api root, without /api/v1), \
                then restart the endpoint"
            .into(),
        422 => "lago refused an event of the batch (see the answer); the events stay in the outbox: \
                fix the cause, then restart the endpoint"
            .into(),
        _ => "lago refused the call (see the answer); the events stay in the outbox: fix the cause, \
              then restart the endpoint"
            .into(),
    };
    RefusalExplained { code, hint }
}

/// What Lago's answer to `GET /api/v1/billable_metrics/{code}` says about the configured
/// metric (see [`check_metric`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricCheck {
    /// The metric exists, sums the configured field and nothing else changes the units.
    Ok,
    /// The metric would not bill the events as sent: export must wait until it does.
    Mismatch(MetricMismatch),
    /// No answer that tells (5xx, 429, 408, a transport error): check again later.
    Unavailable,
    /// Lago refused the question (401, …): the status and the start of its answer.
    Refused(u16, String),
}

/// How the billable metric differs from what the events need.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MetricMismatch {
    /// Lago has no metric of that code (404 `billable_metric_not_found`): events would be
    /// accepted and billed nowhere.
    #[error("billable metric {code} does not exist in lago")]
    NotFound {
        /// The configured code.
        code: String,
    },
    /// The metric does not add the events up: each event carries an increment.
    #[error("billable metric {code} aggregates with {found}, expected {LAGO_AGGREGATION_EXPECTED}")]
    Aggregation {
        /// The configured code.
        code: String,
        /// Lago's `aggregation_type`.
        found: String,
    },
    /// The metric sums another property than the one the events carry the bytes in.
    #[error("billable metric {code} sums field {found:?}, the events carry {expected:?}")]
    Field {
        /// The configured code.
        code: String,
        /// The configured field.
        expected: String,
        /// Lago's `field_name` (`None`: unset).
        found: Option<String>,
    },
    /// The metric computes its units from an expression, which replaces the field's value.
    #[error("billable metric {code} computes units from the expression {expression:?}")]
    Expression {
        /// The configured code.
        code: String,
        /// Lago's `expression`.
        expression: String,
    },
    /// The metric is recurring: usage would carry over from one billing period to the next
    /// instead of being billed in the period it happened.
    #[error("billable metric {code} is recurring; data usage is billed per period")]
    Recurring {
        /// The configured code.
        code: String,
    },
    /// Lago answered 200 with a body that is not a billable metric.
    #[error("lago's answer for billable metric {code} is not a billable metric: {excerpt}")]
    Unreadable {
        /// The configured code.
        code: String,
        /// The start of the answer.
        excerpt: String,
    },
}

/// Lago's `BillableMetricObject` (lago-openapi `src/schemas/BillableMetricObject.yaml`): the
/// fields the check reads. `field_name` and `expression` are nullable; `expression` may be
/// absent in older answers.
#[derive(Deserialize)]
struct BillableMetricBody {
    billable_metric: BillableMetricObject,
}

#[derive(Deserialize)]
struct BillableMetricObject {
    aggregation_type: String,
    recurring: bool,
    #[serde(default)]
    field_name: Option<String>,
    #[serde(default)]
    expression: Option<String>,
}

/// Decides whether the billable metric Lago answered with bills the events as the exporter
/// sends them (pure): it must exist, aggregate with `sum_agg` over `metric.field`, have no
/// expression and not be recurring.
pub fn check_metric(status: u16, body: &[u8], metric: &LagoMetric) -> MetricCheck {
    let code = metric.code.clone();
    match status {
        200 => {}
        404 => return MetricCheck::Mismatch(MetricMismatch::NotFound { code }),
        429 | 408 | 500..=599 => return MetricCheck::Unavailable,
        _ => return MetricCheck::Refused(status, excerpt(body)),
    }
    let Ok(BillableMetricBody { billable_metric: m }) = serde_json::from_slice(body) else {
        return MetricCheck::Mismatch(MetricMismatch::Unreadable { code, excerpt: excerpt(body) });
    };
    if m.aggregation_type != LAGO_AGGREGATION_EXPECTED {
        return MetricCheck::Mismatch(MetricMismatch::Aggregation { code, found: m.aggregation_type });
    }
    if m.field_name.as_deref() != Some(metric.field.as_str()) {
        return MetricCheck::Mismatch(MetricMismatch::Field {
            code,
            expected: metric.field.clone(),
            found: m.field_name,
        });
    }
    if let Some(expression) = m.expression.filter(|e| !e.trim().is_empty()) {
        return MetricCheck::Mismatch(MetricMismatch::Expression { code, expression });
    }
    if m.recurring {
        return MetricCheck::Mismatch(MetricMismatch::Recurring { code });
    }
    MetricCheck::Ok
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
            properties: BTreeMap::from([("bytes".to_owned(), 1536)]),
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
        let bytes =
            |p: &PlannedEvent| serde_json::from_slice::<LagoEvent>(&p.json).unwrap().properties["bytes"];
        let m = LagoMetric::default();
        let first = plan_event(&usage(0, 100, 1000), Totals::default(), "sub", &m).unwrap();
        assert_eq!((bytes(&first), first.exported_max), (1100, Totals { up: 100, down: 1000 }));
        // A later report adds only what is new, per direction.
        let second = plan_event(&usage(2, 150, 1000), first.exported_max, "sub", &m).unwrap();
        assert_eq!((bytes(&second), second.exported_max), (50, Totals { up: 150, down: 1000 }));
        // A report that arrives after a later one adds nothing and lowers nothing.
        let late = plan_event(&usage(1, 120, 900), second.exported_max, "sub", &m).unwrap();
        assert_eq!((bytes(&late), late.exported_max), (0, second.exported_max));
        // Up going backwards while down moves on counts only the down part.
        let mixed = plan_event(&usage(3, 10, 1500), late.exported_max, "sub", &m).unwrap();
        assert_eq!(bytes(&mixed), 500);
        let e = plan_event(&usage(0, u64::MAX, 1), Totals::default(), "sub", &m).unwrap_err();
        assert_eq!(e, PlanError::BytesOverflow(RecordId { meter_id: 10, epoch: 0, seq: 0 }));
        // The configured code and field name the event's metric and property.
        let other = LagoMetric { code: "sim_data".into(), field: "octets".into() };
        let e = plan_event(&usage(0, 1, 2), Totals::default(), "sub", &other).unwrap();
        assert_eq!(
            String::from_utf8(e.json).unwrap(),
            r#"{"transaction_id":"10-0-0","external_subscription_id":"sub","code":"sim_data","timestamp":1795521600,"properties":{"octets":3}}"#
        );
    }

    /// A billable metric as Lago serializes it (`app/serializers/v1/billable_metric_serializer.rb`
    /// at lago-api 1b1c24a6; lago-openapi 120da121 `BillableMetricObject.yaml`).
    fn metric_body(
        aggregation: &str,
        field: Option<&str>,
        expression: Option<&str>,
        recurring: bool,
    ) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"billable_metric": {
            "lago_id": "1a901a90-1a90-1a90-1a90-1a901a901a90", "name": "Data", "code": "data_bytes",
            "description": null, "aggregation_type": aggregation, "weighted_interval": null,
            "recurring": recurring, "rounding_function": null, "rounding_precision": null,
            "created_at": "2026-01-01T00:00:00Z", "field_name": field, "expression": expression,
            "filters": []
        }}))
        .unwrap()
    }

    #[test]
    fn the_metric_must_sum_the_configured_field() {
        let m = LagoMetric::default();
        let code = || "data_bytes".to_owned();
        assert_eq!(
            check_metric(200, &metric_body("sum_agg", Some("bytes"), None, false), &m),
            MetricCheck::Ok
        );
        assert_eq!(
            check_metric(200, &metric_body("sum_agg", Some("bytes"), Some(""), false), &m),
            MetricCheck::Ok
        );
        let not_found = br#"{"status":404,"error":"Not Found","code":"billable_metric_not_found"}"#;
        assert_eq!(
            check_metric(404, not_found, &m),
            MetricCheck::Mismatch(MetricMismatch::NotFound { code: code() })
        );
        assert_eq!(
            check_metric(200, &metric_body("max_agg", Some("bytes"), None, false), &m),
            MetricCheck::Mismatch(MetricMismatch::Aggregation { code: code(), found: "max_agg".into() })
        );
        assert_eq!(
            check_metric(200, &metric_body("sum_agg", Some("mb"), None, false), &m),
            MetricCheck::Mismatch(MetricMismatch::Field {
                code: code(),
                expected: "bytes".into(),
                found: Some("mb".into())
            })
        );
        assert!(matches!(
            check_metric(200, &metric_body("count_agg", None, None, false), &m),
            MetricCheck::Mismatch(MetricMismatch::Aggregation { .. })
        ));
        assert!(matches!(
            check_metric(200, &metric_body("sum_agg", Some("bytes"), Some("bytes / 1024"), false), &m),
            MetricCheck::Mismatch(MetricMismatch::Expression { .. })
        ));
        assert_eq!(
            check_metric(200, &metric_body("sum_agg", Some("bytes"), None, true), &m),
            MetricCheck::Mismatch(MetricMismatch::Recurring { code: code() })
        );
        let other = LagoMetric { code: "data_bytes".into(), field: "octets".into() };
        let e = check_metric(200, &metric_body("sum_agg", Some("bytes"), None, false), &other);
        assert_eq!(
            e,
            MetricCheck::Mismatch(MetricMismatch::Field {
                code: code(),
                expected: "octets".into(),
                found: Some("bytes".into())
            })
        );
        if let MetricCheck::Mismatch(what) = e {
            assert_eq!(
                what.to_string(),
                r#"billable metric data_bytes sums field Some("bytes"), the events carry "octets""#
            );
        }
        assert!(matches!(
            check_metric(200, b"<html>", &m),
            MetricCheck::Mismatch(MetricMismatch::Unreadable { .. })
        ));
        assert_eq!(check_metric(503, b"", &m), MetricCheck::Unavailable);
        assert_eq!(check_metric(429, b"", &m), MetricCheck::Unavailable);
        let unauthorized = br#"{"status":401,"error":"Unauthorized"}"#;
        assert!(matches!(check_metric(401, unauthorized, &m), MetricCheck::Refused(401, _)));
    }

    #[test]
    fn an_event_planned_for_another_metric_is_found() {
        let m = LagoMetric::default();
        let e = plan_event(&usage(0, 1, 2), Totals::default(), "sub", &m).unwrap().json;
        assert!(planned_for(&e, &m));
        let other_code = LagoMetric { code: "sim_data".into(), field: "bytes".into() };
        let other_field = LagoMetric { code: "data_bytes".into(), field: "octets".into() };
        assert!(!planned_for(&e, &other_code) && !planned_for(&e, &other_field));
        assert!(!planned_for(b"not json", &m));
        let later = plan_event(&usage(1, 1, 2), Totals::default(), "sub", &other_field).unwrap().json;
        assert_eq!(planned_for_other_metric(&[(0, e.clone()), (1, e.clone())], &m), None);
        let why = planned_for_other_metric(&[(0, e), (1, later)], &m).unwrap();
        assert!(why.contains(r#"field "octets""#) && why.contains(r#"field "bytes""#), "{why}");
    }

    #[test]
    fn refusals_are_named_with_what_to_change() {
        let many = br#"{"status":422,"error":"Unprocessable Entity","code":"validation_errors","error_details":{"events":["too_many_events"]}}"#;
        let r = explain_refusal(422, many, 100);
        assert_eq!(r.code, "too_many_events");
        assert!(r.hint.contains("events_per_call") && r.hint.contains("100"), "{}", r.hint);
        assert_eq!(
            explain_refusal(401, br#"{"status":401,"error":"Unauthorized"}"#, 100).code,
            "unauthorized"
        );
        let other = br#"{"status":422,"error":"Unprocessable Entity","code":"validation_errors","error_details":{"0":{"code":["invalid"]}}}"#;
        assert_eq!(explain_refusal(422, other, 100).code, "validation_errors");
        let forbidden = br#"{"status":403,"error":"Forbidden","code":"feature_unavailable"}"#;
        assert_eq!(explain_refusal(403, forbidden, 100).code, "feature_unavailable");
        // Anything that is not a plain identifier is not taken as a code (it becomes a label).
        assert_eq!(explain_refusal(403, br#"{"code":"x\"} evil"}"#, 100).code, "http_403");
        assert_eq!(explain_refusal(404, b"not json", 100).code, "http_404");
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
