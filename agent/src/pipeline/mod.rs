//! The agent's tasks, the channels between them, and the supervisor that restarts them.
//!
//! ```text
//!  MQTT event loop ──(bounded queue)──► committer ──notify──► uploader ──HTTPS──► endpoint
//!   receive QoS 1                        quota check           read pending
//!   (manual acks)  ◄──────── ack ─────── write, flush, ack      sign, POST, settle
//! ```
//!
//! Invariants:
//! - A report is acked only after the sled flush that covers it returned, in receive order.
//! - A report leaves sled only after the endpoint answered for it.
//! - While the buffer is at its quota or the store fails, nothing is acked: the broker keeps
//!   the reports (and stops sending once its in-flight window is full).
//! - Acks never wait: the request channel holds more acks than a broker can have unacked
//!   messages in flight to one client (16-bit packet ids), so the committer always drains the
//!   ingest queue and the MQTT event loop is never starved.
//! - A store failure ends the pipeline without acking; the supervisor reopens the database
//!   and starts a new pipeline, and the broker redelivers what was not acked.
//! - No publish the broker accepts stops the intake: one larger than
//!   [`MQTT_PACKET_BYTES_MAX`] is cut by the (patched) MQTT client to its topic and an
//!   excerpt, the rest discarded unread, then acked and quarantined as `too_large` like any
//!   other non-report. Quarantine never counts against the quota.
//! - The ingest queue is bounded in count and in bytes ([`INGEST_QUEUE_BYTES_MAX`]): when it
//!   is full the event loop stops reading, whatever the QoS.
//! - A reply settles only the batch it names, for this gateway, with one result per record
//!   ([`check_reply`]); anything else is a failed upload.
//!
//! One module per concern, each importing only the shared ones (`ingest`, `reserve`, `wait`),
//! never another task:
//! - `supervisor`: [`run`], [`run_observed`], one incarnation of the pipeline at a time, restarts.
//! - `mqtt`: the broker connection and event loop, feeding the ingest queue.
//! - `ingest`: the queue between the event loop and the committer, bounded in count and bytes.
//! - `commit`: the committer (quota and reserve hold, write, flush, ack).
//! - `upload`: the uploader (sign, POST, [`check_reply`], settle).
//! - `uplink`: the task metering the gateway's own SIM into the buffer.
//! - `reserve`: [`hold_reason`] (pure) and the free space of the buffer's filesystem.
//! - `open`: [`open_buffer`], moving a corrupt database aside.
//! - `wait`: stop flags and retry jitter.

mod commit;
mod ingest;
mod mqtt;
mod open;
mod reserve;
mod supervisor;
mod uplink;
mod upload;
mod wait;

pub use ingest::{INGEST_ITEM_OVERHEAD_BYTES, INGEST_QUEUE_BYTES_MAX, INGEST_QUEUE_REPORTS_MAX};
pub use mqtt::MQTT_PACKET_BYTES_MAX;
pub use open::{moved_aside_path, open_buffer};
pub use reserve::{hold_reason, reusable_bytes, Hold, REOPEN_FREE_BYTES_MIN};
pub use supervisor::{run, run_observed, AgentError};
pub use upload::{check_reply, ReplyMismatch, REPLY_BYTES_MAX};

// Their home is `status` (the status listener reads them without the pipeline); kept here
// at their old paths.
pub use crate::status::{now_ms, BufferSlot};
