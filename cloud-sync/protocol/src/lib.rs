//! The contract between a Countersign gateway and the rating endpoint.
//!
//! - [`batch`]: the signed batch format (postcard, Ed25519) and its verifier.
//! - [`reply`]: the endpoint's per-record answer (JSON).
//! - [`keys`]: key generation and key files (0600, refused when readable by others).
//!
//! It lives beside the endpoint because the endpoint owns the contract; the agent depends on
//! it, and so does anything else that wants to speak to an endpoint.

pub mod batch;
pub mod keys;
pub mod reply;

pub use batch::{open, peek_header, BatchBuilder, BatchError, BatchHeader, RecordRef, VerifiedBatch};
pub use reply::{BatchReply, ErrorBody, RecordOutcome, RejectReason};

/// Path of the batch upload route on the endpoint.
pub const BATCHES_PATH: &str = "/v1/batches";
/// MQTT topic filter device reports are published under; the last level is the meter id.
pub const REPORT_TOPIC_PREFIX: &str = "countersign/v1/reports/";
