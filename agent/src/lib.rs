//! Countersign gateway agent.
//!
//! Takes device reports from an MQTT broker (QoS 1, persistent session, manual acks), keeps
//! each durably in sled before acknowledging it, and syncs signed batches to the rating
//! endpoint, deleting them only once the endpoint has answered for them.
//!
//! - [`config`]: the TOML configuration and its validation.
//! - [`classify`]: what a payload on the report topic is (pure).
//! - [`store`]: the durable buffer and its on-disk format.
//! - [`backoff`]: retry delays with jitter (pure).
//! - [`status`]: live state and what "healthy" means (pure).
//! - [`evidence`]: rate-limited logging of refusals and escaping of untrusted strings (pure).
//! - [`pipeline`]: the MQTT, commit and upload tasks and their supervisor.
//! - [`tls`]: HTTPS trust towards the endpoint (roots, private CA, pinned certificate).
//! - [`http`]: `/health`, `/metrics`, `/status`.
//! - [`uplink`]: metering the gateway's own cellular uplink as a local meter.
//! - [`salvage`]: recovering reports from a database moved aside as corrupt.

pub mod backoff;
pub mod classify;
pub mod config;
pub mod evidence;
pub mod http;
pub mod pipeline;
pub mod salvage;
pub mod status;
pub mod store;
pub mod tls;
pub mod uplink;

pub use config::AgentConfig;
pub use pipeline::{open_buffer, run, run_observed, AgentError};
pub use status::{AgentStatus, Health, StatusSnapshot};
pub use store::Buffer;
