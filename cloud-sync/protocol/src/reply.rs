//! The endpoint's answer to a batch: one outcome per record, in batch order.
//!
//! JSON, so that an installer can read it with curl:
//!
//! ```json
//! {"gateway_id":7,"batch_seq":300,"results":[{"status":"stored"},{"status":"duplicate"},
//!  {"status":"rejected","reason":"bad_tag","detail":"report tag does not verify under the meter key"}]}
//! ```

use serde::{Deserialize, Serialize};

/// The endpoint's answer to an accepted batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchReply {
    /// Echo of the batch's gateway.
    pub gateway_id: u64,
    /// Echo of the batch's sequence number.
    pub batch_seq: u64,
    /// One outcome per record, in the order of the batch.
    pub results: Vec<RecordOutcome>,
}

/// What happened to one record. Every outcome is final: the gateway may forget the record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum RecordOutcome {
    /// Verified and durably stored now.
    Stored,
    /// The same record (same id, same bytes) was stored before.
    Duplicate,
    /// Refused; resending the same bytes will be refused again.
    Rejected {
        /// Why, as a stable code.
        reason: RejectReason,
        /// Why, for people.
        detail: String,
    },
}

/// Why a record was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The bytes are not a report.
    Malformed,
    /// No key is registered for the report's meter.
    UnknownMeter,
    /// The tag does not verify under the meter's key.
    BadTag,
    /// A different report with the same record id is already stored.
    Conflict,
    /// A counter exceeds a physical ceiling (bytes per epoch or per second of device time,
    /// events per second, …) or could make a later sum overflow.
    CounterCeiling,
    /// The gateway's receive time is outside the window the endpoint accepts around its own
    /// clock.
    ReceiveTime,
    /// The device's network time is outside the window the endpoint accepts around its own
    /// clock.
    DeviceTime,
    /// A reason this version does not know (sent by a newer endpoint). Still final: the
    /// record is refused.
    #[serde(other)]
    Unknown,
}

impl RejectReason {
    /// The stable snake_case code.
    pub fn code(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::UnknownMeter => "unknown_meter",
            RejectReason::BadTag => "bad_tag",
            RejectReason::Conflict => "conflict",
            RejectReason::CounterCeiling => "counter_ceiling",
            RejectReason::ReceiveTime => "receive_time",
            RejectReason::DeviceTime => "device_time",
            RejectReason::Unknown => "unknown",
        }
    }
}

/// The body of every error response of the endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable snake_case code, e.g. `bad_signature`.
    pub code: String,
    /// What was wrong, for people.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_json() {
        let r = BatchReply {
            gateway_id: 7,
            batch_seq: 300,
            results: vec![
                RecordOutcome::Stored,
                RecordOutcome::Duplicate,
                RecordOutcome::Rejected { reason: RejectReason::BadTag, detail: "x".into() },
            ],
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"gateway_id":7,"batch_seq":300,"results":[{"status":"stored"},{"status":"duplicate"},{"status":"rejected","reason":"bad_tag","detail":"x"}]}"#
        );
        assert_eq!(serde_json::from_str::<BatchReply>(&s).unwrap(), r);
    }

    #[test]
    fn every_reason_code_is_pinned_and_round_trips() {
        let all = [
            (RejectReason::Malformed, "malformed"),
            (RejectReason::UnknownMeter, "unknown_meter"),
            (RejectReason::BadTag, "bad_tag"),
            (RejectReason::Conflict, "conflict"),
            (RejectReason::CounterCeiling, "counter_ceiling"),
            (RejectReason::ReceiveTime, "receive_time"),
            (RejectReason::DeviceTime, "device_time"),
            (RejectReason::Unknown, "unknown"),
        ];
        for (reason, code) in all {
            assert_eq!(reason.code(), code);
            let json = serde_json::to_string(&reason).unwrap();
            assert_eq!(json, format!("\"{code}\""));
            assert_eq!(serde_json::from_str::<RejectReason>(&json).unwrap(), reason);
        }
        let r = RecordOutcome::Rejected { reason: RejectReason::ReceiveTime, detail: "d".into() };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"status":"rejected","reason":"receive_time","detail":"d"}"#
        );
    }

    #[test]
    fn a_reason_from_a_newer_endpoint_still_parses() {
        let s = r#"{"gateway_id":7,"batch_seq":1,"results":[{"status":"rejected","reason":"from_the_future","detail":"x"}]}"#;
        let r: BatchReply = serde_json::from_str(s).unwrap();
        assert_eq!(
            r.results,
            vec![RecordOutcome::Rejected { reason: RejectReason::Unknown, detail: "x".into() }]
        );
    }
}
