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
}

impl RejectReason {
    /// The stable snake_case code.
    pub fn code(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::UnknownMeter => "unknown_meter",
            RejectReason::BadTag => "bad_tag",
            RejectReason::Conflict => "conflict",
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
}
