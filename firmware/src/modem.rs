//! The seam between the meter and a modem.
//!
//! A driver reads the modem's cumulative data counters (e.g. Quectel `AT+QGDCNT?`) and hands
//! them to [`crate::Meter::observe`]. Drivers wait for the modem's answer with the board's
//! [`embedded_hal::delay::DelayNs`], so they need no clock of their own.

use embedded_hal::delay::DelayNs;

/// One reading of a modem's cumulative byte counters, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RawCounters {
    /// Bytes sent by the device since the modem's counter was last reset.
    pub sent: u64,
    /// Bytes received by the device since the modem's counter was last reset.
    pub received: u64,
}

/// Something that can read a modem's data counters.
pub trait CounterSource {
    /// The driver's error (timeouts, `ERROR` answers, garbage on the line).
    type Error: core::fmt::Debug;
    /// Reads the counters, waiting on `delay` for the answer.
    fn read_counters(&mut self, delay: &mut impl DelayNs) -> Result<RawCounters, Self::Error>;
}
