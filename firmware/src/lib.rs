//! Countersign meter: a `no_std` SIM data usage meter.
//!
//! It turns a modem's raw data counters into cumulative, per-epoch usage and encodes it as
//! small reports authenticated with HMAC-SHA256 under the meter's own key, so that only the
//! meter and the rating endpoint can make or alter them.
//!
//! - [`counter`]: raw modem readings → monotone totals (resets, 32-bit wrap).
//! - [`meter`]: epochs, sequence numbers, checkpoints and the report policy.
//! - [`flash_log`]: power-fail-safe checkpoint log on NOR flash (`embedded-storage`).
//! - [`budget`]: what reports cost on the air, framing included.
//! - [`report`]: the versioned wire format, its tag, and decode-and-verify for the endpoint.
//! - [`at`]: bounded AT line reader and UART client (`embedded-io`).
//! - [`modem`]: per-modem counter profiles, parsers and the [`modem::CounterSource`] driver.
//!
//! The crate has no `std` and no `alloc` in its dependency tree; the `std` feature only adds
//! `std::error::Error` impls for hosts.
#![no_std]
#![deny(missing_docs)]

#[cfg(feature = "std")]
extern crate std;

pub mod at;
pub mod budget;
pub mod counter;
pub mod flash_log;
pub mod meter;
pub mod modem;
pub mod report;
#[cfg(test)]
mod sim_flash;

pub use counter::{Accumulator, CounterWidth, Step};
pub use flash_log::{FlashLog, FlashLogError};
pub use meter::{Checkpoint, CheckpointStore, MemoryStore, Meter, MeterConfig, MeterError, ReportPolicy};
pub use report::{
    check_tag, peek_meter_id, verify, CounterKind, DecodeError, DeviceTime, ExtraCounter, RecordId, Report,
    ReportError, TimeQuality, Totals, VerifyError, METER_KEY_BYTES, RECORD_KEY_BYTES, REPORT_BYTES_MAX,
    REPORT_VERSION, TAG_BYTES,
};

#[cfg(feature = "std")]
impl std::error::Error for DecodeError {}
#[cfg(feature = "std")]
impl std::error::Error for VerifyError {}
#[cfg(feature = "std")]
impl std::error::Error for ReportError {}
#[cfg(feature = "std")]
impl std::error::Error for MeterError {}
#[cfg(feature = "std")]
impl std::error::Error for at::AtError {}
#[cfg(feature = "std")]
impl std::error::Error for flash_log::FlashLogError {}
