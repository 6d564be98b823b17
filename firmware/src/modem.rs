//! Modem data counters: per-modem profiles, their response parsers, and the UART driver.
//!
//! | profile | query → information line |
//! | --- | --- |
//! | [`ModemProfile::QUECTEL`] | `AT+QGDCNT?` → `+QGDCNT: <sent>,<recv>` |
//! | [`ModemProfile::QUECTEL_UNISOC`] | same, received first |
//! | [`ModemProfile::UBLOX`] | `AT+UGCNTRD` → `+UGCNTRD: <cid>,<tx_sess>,<rx_sess>,<tx_total>,<rx_total>` per context |
//! | [`ModemProfile::TELIT`] | `AT#GDATAVOL=1` → `#GDATAVOL: <cid>,<tot>,<sent>,<received>` per context |
//! | [`ModemProfile::NORDIC`] | `AT%XCONNSTAT?` → `%XCONNSTAT: <sms_tx>,<sms_rx>,<tx_kB>,<rx_kB>,<pkt_max>,<pkt_avg>` |
//!
//! A profile also says how the counters behave: units ([`ModemProfile::unit_bytes`]), width,
//! and whether they survive a modem power loss (reloaded from NVM). The latter decides what a
//! modem restart (`RDY`) means to the meter: a counter reloaded from NVM comes back at an
//! *older, non-zero* value, which must not be taken for a reset-to-zero whose reading is new
//! traffic ([`crate::Meter::modem_restarted`] rebases instead).
//!
//! [`parse_response`] is the pure parser the driver runs, exposed for transcripts and fuzzing.

use embedded_hal::delay::DelayNs;
use embedded_io::{Read, ReadReady, Write};

use crate::at::{
    AtClient, AtError, Event, Exchange, Fields, ModemEvents, LINE_BYTES_MAX, RESPONSE_TIMEOUT_MS,
};
use crate::counter::CounterWidth;

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

/// The AT dialect of a modem family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModemFamily {
    /// Quectel LTE modules: `AT+QGDCNT?`.
    Quectel,
    /// u-blox cellular modules: `AT+UGCNTRD`.
    Ublox,
    /// Telit modules: `AT#GDATAVOL=1`.
    Telit,
    /// Nordic nRF91: `AT%XCONNSTAT?` (after `AT%XCONNSTAT=1`).
    Nordic,
}

/// Which of a pair of byte counters the modem prints first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldOrder {
    /// Sent (uplink) first, as documented by the vendors.
    SentFirst,
    /// Received first, as some Unisoc-based Quectel firmware does.
    ReceivedFirst,
}

/// How one modem model reports its data counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModemProfile {
    /// AT dialect.
    pub family: ModemFamily,
    /// Order of the sent/received pair.
    pub order: FieldOrder,
    /// Bytes per counter unit: 1 for byte counters, 1024 for the nRF91's kB counters.
    pub unit_bytes: u32,
    /// Width of the raw counter, for wrap detection.
    pub width: CounterWidth,
    /// Whether the counters are reloaded from NVM after a modem power loss (true) or
    /// restart at zero (false).
    pub counters_survive_power_loss: bool,
    /// PDP context whose counters are read (u-blox, Telit: one line per context).
    pub cid: u8,
}

impl ModemProfile {
    /// Quectel LTE (BG95/BG96/EG91…): bytes, sent first, reloaded from NVM at power-on
    /// (`AT+QGDCNT=1` / `AT+QAUGDCNT` save them).
    pub const QUECTEL: ModemProfile = ModemProfile {
        family: ModemFamily::Quectel,
        order: FieldOrder::SentFirst,
        unit_bytes: 1,
        width: CounterWidth::Bits64,
        counters_survive_power_loss: true,
        cid: 1,
    };
    /// Quectel on Unisoc-based firmware, which prints received first.
    pub const QUECTEL_UNISOC: ModemProfile =
        ModemProfile { order: FieldOrder::ReceivedFirst, ..Self::QUECTEL };
    /// u-blox (SARA/LARA): the total (not session) counters of context 1, which survive PDP
    /// re-activation. Taken to survive power loss too: when unsure, rebasing on `RDY`
    /// under-counts the seconds before the first reading, while the opposite choice could
    /// count a whole NVM-restored counter again.
    pub const UBLOX: ModemProfile = ModemProfile {
        family: ModemFamily::Ublox,
        order: FieldOrder::SentFirst,
        unit_bytes: 1,
        width: CounterWidth::Bits64,
        counters_survive_power_loss: true,
        cid: 1,
    };
    /// Telit (LE910/ME910): totals of context 1, kept in NVM across power-off.
    pub const TELIT: ModemProfile = ModemProfile {
        family: ModemFamily::Telit,
        order: FieldOrder::SentFirst,
        unit_bytes: 1,
        width: CounterWidth::Bits64,
        counters_survive_power_loss: true,
        cid: 1,
    };
    /// Nordic nRF91: counters in kB (1 kB resolution), volatile: they restart at zero with
    /// the modem and must be started again with `AT%XCONNSTAT=1`.
    pub const NORDIC: ModemProfile = ModemProfile {
        family: ModemFamily::Nordic,
        order: FieldOrder::SentFirst,
        unit_bytes: 1024,
        width: CounterWidth::Bits64,
        counters_survive_power_loss: false,
        cid: 0,
    };

    /// The query command (without CR).
    pub fn query(&self) -> &'static [u8] {
        match self.family {
            ModemFamily::Quectel => b"AT+QGDCNT?",
            ModemFamily::Ublox => b"AT+UGCNTRD",
            ModemFamily::Telit => b"AT#GDATAVOL=1",
            ModemFamily::Nordic => b"AT%XCONNSTAT?",
        }
    }

    /// The prefix of the query's information lines.
    pub fn prefix(&self) -> &'static [u8] {
        match self.family {
            ModemFamily::Quectel => b"+QGDCNT:",
            ModemFamily::Ublox => b"+UGCNTRD:",
            ModemFamily::Telit => b"#GDATAVOL:",
            ModemFamily::Nordic => b"%XCONNSTAT:",
        }
    }

    /// A command to run once after each modem start before the counters can be read.
    pub fn setup(&self) -> Option<&'static [u8]> {
        match self.family {
            ModemFamily::Nordic => Some(b"AT%XCONNSTAT=1"),
            ModemFamily::Quectel | ModemFamily::Ublox | ModemFamily::Telit => None,
        }
    }

    /// Parses one information line's payload (after the prefix). `Ok(None)` for a line about
    /// another context.
    pub fn parse_info(&self, payload: &[u8]) -> Result<Option<RawCounters>, AtError> {
        let mut f = Fields::new(payload);
        let mut next = || f.next_field().ok_or(AtError::Malformed).and_then(crate::at::parse_u64);
        let (first, second) = match self.family {
            ModemFamily::Quectel => (next()?, next()?),
            ModemFamily::Ublox => {
                let cid = next()?;
                let (_tx_sess, _rx_sess) = (next()?, next()?);
                let pair = (next()?, next()?);
                if cid != u64::from(self.cid) {
                    return Ok(None);
                }
                pair
            }
            ModemFamily::Telit => {
                let cid = next()?;
                let _total = next()?;
                let pair = (next()?, next()?);
                if cid != u64::from(self.cid) {
                    return Ok(None);
                }
                pair
            }
            ModemFamily::Nordic => {
                let (_sms_tx, _sms_rx) = (next()?, next()?);
                (next()?, next()?)
            }
        };
        let (sent, received) = match self.order {
            FieldOrder::SentFirst => (first, second),
            FieldOrder::ReceivedFirst => (second, first),
        };
        let unit = u64::from(self.unit_bytes);
        // Checked: a kB counter near u64::MAX / 1024 would wrap silently when scaled.
        Ok(Some(RawCounters {
            sent: sent.checked_mul(unit).ok_or(AtError::Overflow)?,
            received: received.checked_mul(unit).ok_or(AtError::Overflow)?,
        }))
    }
}

/// Parses a complete response transcript (echo, URCs and noise allowed) to the profile's
/// query, exactly as the driver does on the UART. Never panics; input that ends before a
/// final result is [`AtError::Timeout`].
pub fn parse_response(profile: &ModemProfile, transcript: &[u8]) -> Result<RawCounters, AtError> {
    let mut ex: Exchange<LINE_BYTES_MAX> = Exchange::new(profile.query(), profile.prefix());
    let mut found: Option<Result<RawCounters, AtError>> = None;
    for &b in transcript {
        match ex.feed(b) {
            Event::Info(p) => {
                if found.is_none() {
                    found = profile.parse_info(p).transpose();
                }
            }
            Event::Final(Ok(())) => return found.unwrap_or(Err(AtError::Missing)),
            Event::Final(Err(e)) | Event::Failed(e) => return Err(e),
            Event::Urc(_) | Event::Prompt | Event::Pending => {}
        }
    }
    Err(AtError::Timeout)
}

/// A counter driver for any [`ModemProfile`] on an AT client.
pub struct AtModem<U> {
    at: AtClient<U>,
    profile: ModemProfile,
    set_up: bool,
}

impl<U: Read + ReadReady + Write> AtModem<U> {
    /// A driver for `profile` on `uart`.
    pub fn new(uart: U, profile: ModemProfile) -> Self {
        Self { at: AtClient::new(uart), profile, set_up: false }
    }

    /// The profile.
    pub fn profile(&self) -> &ModemProfile {
        &self.profile
    }

    /// The AT client, for other commands on the same UART (ICCID, time, MQTT).
    pub fn at(&mut self) -> &mut AtClient<U> {
        &mut self.at
    }

    /// Unsolicited events seen since the last call. A restart also re-arms the setup command.
    pub fn take_events(&mut self) -> ModemEvents {
        let ev = self.at.take_events();
        if ev.restarted {
            self.set_up = false;
        }
        ev
    }
}

impl<U: Read + ReadReady + Write> CounterSource for AtModem<U> {
    type Error = AtError;

    fn read_counters(&mut self, delay: &mut impl DelayNs) -> Result<RawCounters, AtError> {
        if !self.set_up {
            if let Some(cmd) = self.profile.setup() {
                self.at.command(delay, cmd, b"", RESPONSE_TIMEOUT_MS, |_| Ok(()))?;
            }
            self.set_up = true;
        }
        let profile = self.profile;
        let mut found: Option<RawCounters> = None;
        self.at.command(delay, profile.query(), profile.prefix(), RESPONSE_TIMEOUT_MS, |p| {
            if found.is_none() {
                found = profile.parse_info(p)?;
            }
            Ok(())
        })?;
        found.ok_or(AtError::Missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const fn rc(sent: u64, received: u64) -> Result<RawCounters, AtError> {
        Ok(RawCounters { sent, received })
    }

    /// Realistic transcripts: echo on, URCs between lines, CR LF framing as modems send it.
    #[test]
    fn transcripts() {
        use ModemProfile as P;
        type Case = (&'static str, ModemProfile, &'static [u8], Result<RawCounters, AtError>);
        let cases: &[Case] = &[
            ("quectel plain", P::QUECTEL, b"\r\n+QGDCNT: 3320,6152\r\n\r\nOK\r\n", rc(3320, 6152)),
            (
                "quectel echo + boot URCs",
                P::QUECTEL,
                b"AT+QGDCNT?\r\r\nRDY\r\n\r\n+CPIN: READY\r\n\r\n+QGDCNT: 3320,6152\r\n\r\nOK\r\n",
                rc(3320, 6152),
            ),
            (
                "quectel qiurc between info and OK",
                P::QUECTEL,
                b"\r\n+QGDCNT: 1,2\r\n\r\n+QIURC: \"recv\",0,12\r\n\r\nOK\r\n",
                rc(1, 2),
            ),
            ("quectel unisoc order", P::QUECTEL_UNISOC, b"\r\n+QGDCNT: 6152,3320\r\n\r\nOK\r\n", rc(3320, 6152)),
            ("quectel error", P::QUECTEL, b"AT+QGDCNT?\r\r\nERROR\r\n", Err(AtError::Error)),
            ("quectel cme", P::QUECTEL, b"\r\n+CME ERROR: 58\r\n", Err(AtError::Cme(58))),
            ("quectel ok without info", P::QUECTEL, b"\r\nOK\r\n", Err(AtError::Missing)),
            ("quectel truncated", P::QUECTEL, b"\r\n+QGDCNT: 1,2\r\n", Err(AtError::Timeout)),
            ("quectel garbled info", P::QUECTEL, b"\r\n+QGDCNT: 1x,2\r\n\r\nOK\r\n", Err(AtError::Malformed)),
            ("quectel one field", P::QUECTEL, b"\r\n+QGDCNT: 12\r\n\r\nOK\r\n", Err(AtError::Malformed)),
            (
                "quectel noise before answer",
                P::QUECTEL,
                b"\x00\xff\x13\r\n+QGDCNT: 10,20\r\n\r\nOK\r\n",
                rc(10, 20),
            ),
            (
                "ublox two contexts",
                P::UBLOX,
                b"AT+UGCNTRD\r\r\n+UGCNTRD: 31,2704,1819,2724,1839\r\n+UGCNTRD: 1,100,200,5000,9000\r\n\r\nOK\r\n",
                rc(5000, 9000),
            ),
            (
                "ublox other context only",
                P::UBLOX,
                b"\r\n+UGCNTRD: 31,2704,1819,2724,1839\r\n\r\nOK\r\n",
                Err(AtError::Missing),
            ),
            (
                "telit",
                P::TELIT,
                b"AT#GDATAVOL=1\r\r\n#GDATAVOL: 1,1500,500,1000\r\n#GDATAVOL: 2,0,0,0\r\n\r\nOK\r\n",
                rc(500, 1000),
            ),
            (
                "nordic kB",
                P::NORDIC,
                b"\r\n%XCONNSTAT: 2,3,45,60,708,225\r\n\r\nOK\r\n",
                rc(45 * 1024, 60 * 1024),
            ),
            (
                "nordic overflow when scaled",
                P::NORDIC,
                b"\r\n%XCONNSTAT: 0,0,18446744073709551615,1,0,0\r\n\r\nOK\r\n",
                Err(AtError::Overflow),
            ),
            ("nordic not started", P::NORDIC, b"\r\nERROR\r\n", Err(AtError::Error)),
        ];
        for (name, profile, transcript, want) in cases {
            assert_eq!(parse_response(profile, transcript), *want, "{name}");
        }
    }

    proptest! {
        /// The response parser never panics, whatever the modem or the line noise sends.
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), which in 0usize..5) {
            let profiles = [ModemProfile::QUECTEL, ModemProfile::QUECTEL_UNISOC, ModemProfile::UBLOX,
                ModemProfile::TELIT, ModemProfile::NORDIC];
            let _ = parse_response(&profiles[which], &bytes);
        }

        /// Valid answers round-trip through any interleaving of unsolicited lines.
        #[test]
        fn quectel_answers_survive_urcs(sent in any::<u64>(), recv in any::<u64>(),
                                        urcs in proptest::collection::vec(0usize..4, 0..6)) {
            let noise: [&[u8]; 4] = [b"\r\nRDY\r\n", b"\r\n+CPIN: READY\r\n", b"\r\n+QIURC: \"recv\",0,8\r\n", b"\r\n\xff\xfe\r\n"];
            let mut t = std::vec::Vec::new();
            t.extend_from_slice(b"AT+QGDCNT?\r");
            for &u in &urcs { t.extend_from_slice(noise[u]); }
            t.extend_from_slice(std::format!("\r\n+QGDCNT: {sent},{recv}\r\n").as_bytes());
            for &u in &urcs { t.extend_from_slice(noise[u]); }
            t.extend_from_slice(b"\r\nOK\r\n");
            prop_assert_eq!(parse_response(&ModemProfile::QUECTEL, &t), rc(sent, recv));
        }
    }

    extern crate std;
}
