//! The device report: what a meter sends, byte for byte.
//!
//! # Wire format, version 1
//!
//! ```text
//! report = body ‖ tag
//! body   = version:u8 (=1)
//!          meter_id:varint u64   epoch:varint u32   seq:varint u32
//!          iccid:u64 little-endian (8 bytes)
//!          time:u32 little-endian  = (seconds since 2020-01-01T00:00Z or since boot) << 2 | quality
//!          base_up:varint u64  base_down:varint u64  used_up:varint u64  used_down:varint u64
//!          extra*  (until the tag; none at all when the meter has no extra counters)
//! extra  = kind:u8  base:varint u64  used:varint u64   (kinds strictly increasing)
//! tag    = HMAC-SHA256(meter key, body), first 16 bytes
//! ```
//!
//! Varints and fixed integers are postcard's encodings, so `postcard` decodes every field.
//! The counters travel as `base` (the meter's lifetime totals restored at the start of the
//! epoch) and `used` (bytes counted since then), which is the same information as base and
//! cumulative totals (`cumulative = base + used`) but a few bytes shorter on the air.
//!
//! Every report is self-contained: the usage of an epoch is the `used` of its highest-`seq`
//! report, so a lost, duplicated or reordered report changes nothing but how fresh the
//! figures are.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The version byte this crate writes and the only one it reads.
pub const REPORT_VERSION: u8 = 1;
/// Length of the truncated HMAC-SHA256 tag: 128 bits, the floor the design allows.
pub const TAG_BYTES: usize = 16;
/// Extra (non-byte) counters one report can carry.
pub const EXTRA_COUNTERS_MAX: usize = 6;
/// Largest possible encoded report: every varint at its widest, every extra counter present.
pub const REPORT_BYTES_MAX: usize = 1 + 10 + 5 + 5 + 8 + 4 + 4 * 10 + EXTRA_COUNTERS_MAX * 21 + TAG_BYTES;
/// Smallest possible encoded report, used to reject truncated input before parsing.
pub const REPORT_BYTES_MIN: usize = 1 + 1 + 1 + 1 + 8 + 4 + 4 + TAG_BYTES;
/// Length of a meter's HMAC key.
pub const METER_KEY_BYTES: usize = 32;
/// Unix time of 2020-01-01T00:00:00Z, the origin of wall-clock device times.
pub const DEVICE_TIME_ORIGIN_UNIX_S: u64 = 1_577_836_800;
/// Largest seconds value a device time can carry (30 bits: until 2054 for wall clocks).
pub const DEVICE_TIME_SECS_MAX: u32 = (1 << 30) - 1;

type HmacSha256 = Hmac<Sha256>;

/// How much the device's clock can be trusted for attributing usage to a day.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TimeQuality {
    /// Seconds since boot: no wall clock at all.
    Uptime = 0,
    /// A free-running real-time clock, set at some point but possibly drifted.
    Rtc = 1,
    /// Network time (NITZ, NTP or GNSS) obtained during this boot.
    Network = 2,
}

/// The device's notion of when a report was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceTime {
    quality: TimeQuality,
    secs: u32,
}

impl DeviceTime {
    /// Seconds since boot.
    pub fn uptime(secs: u32) -> Result<Self, ReportError> {
        Self::new(TimeQuality::Uptime, secs)
    }

    /// A wall-clock time in Unix seconds, from the RTC or the network.
    pub fn wall_clock(quality: TimeQuality, unix_s: u64) -> Result<Self, ReportError> {
        if quality == TimeQuality::Uptime {
            return Err(ReportError::TimeOutOfRange);
        }
        let secs = unix_s
            .checked_sub(DEVICE_TIME_ORIGIN_UNIX_S)
            .and_then(|s| u32::try_from(s).ok())
            .ok_or(ReportError::TimeOutOfRange)?;
        Self::new(quality, secs)
    }

    fn new(quality: TimeQuality, secs: u32) -> Result<Self, ReportError> {
        if secs > DEVICE_TIME_SECS_MAX {
            return Err(ReportError::TimeOutOfRange);
        }
        Ok(Self { quality, secs })
    }

    /// The clock this time came from.
    pub fn quality(&self) -> TimeQuality {
        self.quality
    }

    /// Unix seconds if this is a wall-clock time, `None` for uptime.
    pub fn unix_s(&self) -> Option<u64> {
        match self.quality {
            TimeQuality::Uptime => None,
            _ => Some(DEVICE_TIME_ORIGIN_UNIX_S + u64::from(self.secs)),
        }
    }

    /// Raw seconds: since boot for uptime, since 2020-01-01 for wall clocks.
    pub fn secs(&self) -> u32 {
        self.secs
    }

    fn packed(&self) -> u32 {
        (self.secs << 2) | self.quality as u32
    }

    fn unpack(v: u32) -> Result<Self, DecodeError> {
        let quality = match v & 0b11 {
            0 => TimeQuality::Uptime,
            1 => TimeQuality::Rtc,
            2 => TimeQuality::Network,
            _ => return Err(DecodeError::BadTimeQuality),
        };
        Ok(Self { quality, secs: v >> 2 })
    }
}

/// What an extra counter counts. Byte counters are not extras: every report has them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CounterKind {
    /// SMS sent by the device.
    SmsSent,
    /// SMS received by the device.
    SmsReceived,
    /// Data sessions (PDP contexts) opened.
    DataSessions,
    /// Seconds attached to the network.
    AttachedSeconds,
    /// An operator-defined application counter (e.g. readings delivered), numbered 0..=127.
    App(u8),
}

impl CounterKind {
    /// The one-byte code on the wire.
    pub fn code(self) -> u8 {
        match self {
            CounterKind::SmsSent => 1,
            CounterKind::SmsReceived => 2,
            CounterKind::DataSessions => 3,
            CounterKind::AttachedSeconds => 4,
            CounterKind::App(n) => 0x80 | (n & 0x7f),
        }
    }

    /// The kind for a wire code, `None` for codes this version does not know.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(CounterKind::SmsSent),
            2 => Some(CounterKind::SmsReceived),
            3 => Some(CounterKind::DataSessions),
            4 => Some(CounterKind::AttachedSeconds),
            0x80..=0xff => Some(CounterKind::App(code & 0x7f)),
            _ => None,
        }
    }

    /// A stable lowercase name, for logs and JSON.
    pub fn name(self) -> &'static str {
        match self {
            CounterKind::SmsSent => "sms_sent",
            CounterKind::SmsReceived => "sms_received",
            CounterKind::DataSessions => "data_sessions",
            CounterKind::AttachedSeconds => "attached_seconds",
            CounterKind::App(_) => "app",
        }
    }
}

/// Uplink and downlink byte counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Totals {
    /// Bytes sent by the device.
    pub up: u64,
    /// Bytes received by the device.
    pub down: u64,
}

impl Totals {
    /// `up + down`, `None` on overflow.
    pub fn sum(&self) -> Option<u64> {
        self.up.checked_add(self.down)
    }

    /// Component-wise checked addition.
    pub fn checked_add(&self, other: &Totals) -> Option<Totals> {
        Some(Totals { up: self.up.checked_add(other.up)?, down: self.down.checked_add(other.down)? })
    }
}

/// One extra counter of a report: its base at the start of the epoch and its use since.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExtraCounter {
    /// What is counted.
    pub kind: CounterKind,
    /// Lifetime value restored at the start of the epoch.
    pub base: u64,
    /// Counted since the start of the epoch.
    pub used: u64,
}

/// A decoded device report (without its tag).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The meter (device) that made it.
    pub meter_id: u64,
    /// Boot epoch of the meter.
    pub epoch: u32,
    /// Sequence number within the epoch, strictly increasing.
    pub seq: u32,
    /// ICCID of the SIM in use, as a number (19 digits without the Luhn check digit).
    pub iccid: u64,
    /// When the device made the report.
    pub time: DeviceTime,
    /// Lifetime byte totals restored from the checkpoint at the start of the epoch.
    pub base: Totals,
    /// Bytes counted since the start of the epoch.
    pub used: Totals,
    /// Connectivity and application counters, kinds strictly increasing.
    pub extras: heapless::Vec<ExtraCounter, EXTRA_COUNTERS_MAX>,
}

/// The record id: the idempotency key at every hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordId {
    /// Meter id.
    pub meter_id: u64,
    /// Boot epoch.
    pub epoch: u32,
    /// Sequence within the epoch.
    pub seq: u32,
}

/// Length of [`RecordId::to_key`].
pub const RECORD_KEY_BYTES: usize = 16;

impl RecordId {
    /// Big-endian key: byte order equals (meter, epoch, seq) order, for ordered scans.
    pub fn to_key(&self) -> [u8; RECORD_KEY_BYTES] {
        let mut k = [0u8; RECORD_KEY_BYTES];
        k[..8].copy_from_slice(&self.meter_id.to_be_bytes());
        k[8..12].copy_from_slice(&self.epoch.to_be_bytes());
        k[12..].copy_from_slice(&self.seq.to_be_bytes());
        k
    }

    /// Inverse of [`RecordId::to_key`]; `None` unless `k` is exactly 16 bytes.
    pub fn from_key(k: &[u8]) -> Option<Self> {
        if k.len() != RECORD_KEY_BYTES {
            return None;
        }
        let mut m = [0u8; 8];
        m.copy_from_slice(&k[..8]);
        let mut e = [0u8; 4];
        e.copy_from_slice(&k[8..12]);
        let mut s = [0u8; 4];
        s.copy_from_slice(&k[12..]);
        Some(Self {
            meter_id: u64::from_be_bytes(m),
            epoch: u32::from_be_bytes(e),
            seq: u32::from_be_bytes(s),
        })
    }
}

impl core::fmt::Display for RecordId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}-{}-{}", self.meter_id, self.epoch, self.seq)
    }
}

/// Why a report could not be built or encoded. All are caller errors, none recoverable by retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportError {
    /// The time does not fit the 30-bit field (before 2020, after 2054, or uptime above 34 years).
    TimeOutOfRange,
    /// The output buffer is shorter than the encoded report.
    BufferTooSmall,
    /// Extra counters are not in strictly increasing kind order.
    ExtrasUnordered,
}

impl core::fmt::Display for ReportError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            ReportError::TimeOutOfRange => "device time out of range for the report format",
            ReportError::BufferTooSmall => "output buffer too small for the report",
            ReportError::ExtrasUnordered => "extra counters not in strictly increasing kind order",
        })
    }
}

/// Why bytes are not a well-formed report. Never recoverable: the bytes are what they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than the smallest possible report.
    TooShort,
    /// Longer than [`REPORT_BYTES_MAX`].
    TooLong,
    /// The version byte is not one this decoder reads.
    UnknownVersion(u8),
    /// A field is malformed (bad varint, out of range for its type).
    Malformed,
    /// The time field names a clock quality that does not exist.
    BadTimeQuality,
    /// An extra counter has a kind code this version does not know.
    UnknownCounter(u8),
    /// Extra counters repeat or are out of order, or there are too many.
    BadExtras,
    /// The fields decode, but not from their one canonical encoding (an overlong varint,
    /// say): a meter never writes that, and accepting it would give one report many byte
    /// strings.
    NonCanonical,
}

impl DecodeError {
    /// A stable snake_case code, used in replies and quarantine records.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::TooShort => "too_short",
            DecodeError::TooLong => "too_long",
            DecodeError::UnknownVersion(_) => "unknown_version",
            DecodeError::Malformed => "malformed",
            DecodeError::BadTimeQuality => "bad_time_quality",
            DecodeError::UnknownCounter(_) => "unknown_counter",
            DecodeError::BadExtras => "bad_extras",
            DecodeError::NonCanonical => "non_canonical",
        }
    }
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DecodeError::TooShort => write!(f, "report shorter than {REPORT_BYTES_MIN} bytes"),
            DecodeError::TooLong => write!(f, "report longer than {REPORT_BYTES_MAX} bytes"),
            DecodeError::UnknownVersion(v) => write!(f, "unknown report version {v}"),
            DecodeError::Malformed => f.write_str("malformed report field"),
            DecodeError::BadTimeQuality => f.write_str("report time has an unknown clock quality"),
            DecodeError::UnknownCounter(c) => write!(f, "unknown extra counter kind {c}"),
            DecodeError::BadExtras => f.write_str("extra counters repeated, unordered or too many"),
            DecodeError::NonCanonical => f.write_str("report fields are not in their canonical encoding"),
        }
    }
}

/// Why a report was refused by [`verify`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifyError {
    /// The bytes are not a report.
    Decode(DecodeError),
    /// The tag does not match the body under the meter's key: forged, altered or wrong key.
    BadTag,
}

impl core::fmt::Display for VerifyError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            VerifyError::Decode(e) => e.fmt(f),
            VerifyError::BadTag => f.write_str("report tag does not verify under the meter key"),
        }
    }
}

impl From<DecodeError> for VerifyError {
    fn from(e: DecodeError) -> Self {
        VerifyError::Decode(e)
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    meter_id: u64,
    epoch: u32,
    seq: u32,
    #[serde(with = "postcard::fixint::le")]
    iccid: u64,
    #[serde(with = "postcard::fixint::le")]
    time: u32,
    base_up: u64,
    base_down: u64,
    used_up: u64,
    used_down: u64,
}

#[derive(Serialize, Deserialize)]
struct WireExtra {
    kind: u8,
    base: u64,
    used: u64,
}

impl Report {
    /// The record id of this report.
    pub fn id(&self) -> RecordId {
        RecordId { meter_id: self.meter_id, epoch: self.epoch, seq: self.seq }
    }

    /// Cumulative lifetime totals as the meter saw them: `base + used`, `None` on overflow.
    pub fn cumulative(&self) -> Option<Totals> {
        self.base.checked_add(&self.used)
    }

    /// Encodes the report and appends its tag; returns the number of bytes written.
    pub fn encode(&self, key: &[u8; METER_KEY_BYTES], out: &mut [u8]) -> Result<usize, ReportError> {
        let body_len = self.encode_body(out)?;
        let end = body_len.checked_add(TAG_BYTES).ok_or(ReportError::BufferTooSmall)?;
        if out.len() < end {
            return Err(ReportError::BufferTooSmall);
        }
        let (body, rest) = out.split_at_mut(body_len);
        rest[..TAG_BYTES].copy_from_slice(&tag(key, body));
        Ok(end)
    }

    fn encode_body(&self, out: &mut [u8]) -> Result<usize, ReportError> {
        let first = out.first_mut().ok_or(ReportError::BufferTooSmall)?;
        *first = REPORT_VERSION;
        let header = Header {
            meter_id: self.meter_id,
            epoch: self.epoch,
            seq: self.seq,
            iccid: self.iccid,
            time: self.time.packed(),
            base_up: self.base.up,
            base_down: self.base.down,
            used_up: self.used.up,
            used_down: self.used.down,
        };
        let mut pos = 1;
        pos += postcard::to_slice(&header, &mut out[pos..]).map_err(|_| ReportError::BufferTooSmall)?.len();
        let mut last_kind: Option<u8> = None;
        for e in &self.extras {
            let kind = e.kind.code();
            if last_kind.is_some_and(|k| k >= kind) {
                return Err(ReportError::ExtrasUnordered);
            }
            last_kind = Some(kind);
            let w = WireExtra { kind, base: e.base, used: e.used };
            pos += postcard::to_slice(&w, &mut out[pos..]).map_err(|_| ReportError::BufferTooSmall)?.len();
        }
        Ok(pos)
    }

    /// Parses a report without checking its tag. Returns the report and its body (the bytes
    /// the tag covers). Never panics, whatever the input.
    pub fn decode(bytes: &[u8]) -> Result<(Report, &[u8]), DecodeError> {
        if bytes.len() < REPORT_BYTES_MIN {
            return Err(DecodeError::TooShort);
        }
        if bytes.len() > REPORT_BYTES_MAX {
            return Err(DecodeError::TooLong);
        }
        let body = &bytes[..bytes.len() - TAG_BYTES];
        let (&version, rest) = body.split_first().ok_or(DecodeError::TooShort)?;
        if version != REPORT_VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        let (h, mut rest): (Header, &[u8]) =
            postcard::take_from_bytes(rest).map_err(|_| DecodeError::Malformed)?;
        let mut extras = heapless::Vec::new();
        let mut last_kind: Option<u8> = None;
        while !rest.is_empty() {
            let (w, r): (WireExtra, &[u8]) =
                postcard::take_from_bytes(rest).map_err(|_| DecodeError::Malformed)?;
            rest = r;
            if last_kind.is_some_and(|k| k >= w.kind) {
                return Err(DecodeError::BadExtras);
            }
            last_kind = Some(w.kind);
            let kind = CounterKind::from_code(w.kind).ok_or(DecodeError::UnknownCounter(w.kind))?;
            extras
                .push(ExtraCounter { kind, base: w.base, used: w.used })
                .map_err(|_| DecodeError::BadExtras)?;
        }
        let report = Report {
            meter_id: h.meter_id,
            epoch: h.epoch,
            seq: h.seq,
            iccid: h.iccid,
            time: DeviceTime::unpack(h.time)?,
            base: Totals { up: h.base_up, down: h.base_down },
            used: Totals { up: h.used_up, down: h.used_down },
            extras,
        };
        // One report, one byte string: re-encode and compare (found by the fuzz target
        // `report_decode`: postcard reads overlong varints).
        let mut again = [0u8; REPORT_BYTES_MAX];
        let n = report.encode_body(&mut again).map_err(|_| DecodeError::NonCanonical)?;
        if again.get(..n) != Some(body) {
            return Err(DecodeError::NonCanonical);
        }
        Ok((report, body))
    }
}

/// Reads the meter id of a report without decoding the rest, so a verifier can fetch the key.
pub fn peek_meter_id(bytes: &[u8]) -> Result<u64, DecodeError> {
    Report::decode(bytes).map(|(r, _)| r.meter_id)
}

/// Decodes `bytes` and checks its tag under `key` in constant time.
pub fn verify(bytes: &[u8], key: &[u8; METER_KEY_BYTES]) -> Result<Report, VerifyError> {
    let (report, body) = Report::decode(bytes)?;
    check_tag(body, &bytes[body.len()..], key)?;
    Ok(report)
}

/// Checks a report's tag over its body (the split [`Report::decode`] returns), for a caller
/// that decoded the report already and must not decode it twice. Constant time.
pub fn check_tag(body: &[u8], tag: &[u8], key: &[u8; METER_KEY_BYTES]) -> Result<(), VerifyError> {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).map_err(|_| VerifyError::BadTag)?;
    mac.update(body);
    mac.verify_truncated_left(tag).map_err(|_| VerifyError::BadTag)
}

fn tag(key: &[u8; METER_KEY_BYTES], body: &[u8]) -> [u8; TAG_BYTES] {
    // HMAC accepts keys of any length, so this cannot fail for a 32-byte key.
    let mut mac = match <HmacSha256 as Mac>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("hmac takes keys of any length"),
    };
    mac.update(body);
    let full = mac.finalize().into_bytes();
    let mut t = [0u8; TAG_BYTES];
    t.copy_from_slice(&full[..TAG_BYTES]);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7u8; 32];

    /// A meter in its first year on a 500 MB / 10-year plan, a week into its third boot.
    fn typical() -> Report {
        Report {
            meter_id: 4711,
            epoch: 3,
            seq: 168,
            iccid: 8_988_280_666_000_001_234,
            time: DeviceTime::wall_clock(TimeQuality::Network, 1_795_000_000).unwrap(),
            base: Totals { up: 30 * 1024 * 1024, down: 12 * 1024 * 1024 },
            used: Totals { up: 700 * 1024, down: 280 * 1024 },
            extras: heapless::Vec::new(),
        }
    }

    fn encode(r: &Report) -> heapless::Vec<u8, REPORT_BYTES_MAX> {
        let mut buf = [0u8; REPORT_BYTES_MAX];
        let n = r.encode(&KEY, &mut buf).unwrap();
        heapless::Vec::from_slice(&buf[..n]).unwrap()
    }

    #[test]
    fn golden_bytes_v1() {
        let bytes = encode(&typical());
        // Cross-checked against an independent encoder (Python hmac + struct) when pinned.
        let expected: [u8; 48] = [
            0x01, // version
            0xe7, 0x24, // meter_id 4711
            0x03, // epoch
            0xa8, 0x01, // seq 168
            0xd2, 0x08, 0x71, 0xce, 0xa4, 0xc9, 0xbc, 0x7c, // iccid, u64 LE
            0x02, 0x97, 0xc6, 0x33, // time: (secs since 2020 << 2) | network, u32 LE
            0x80, 0x80, 0x80, 0x0f, // base_up 30 MiB
            0x80, 0x80, 0x80, 0x06, // base_down 12 MiB
            0x80, 0xe0, 0x2b, // used_up 700 KiB
            0x80, 0xc0, 0x11, // used_down 280 KiB
            0x15, 0x83, 0x31, 0xbd, 0xb0, 0x34, 0xfe, 0xf3, 0x57, 0x48, 0x7e, 0x91, 0x96, 0x01, 0xfd,
            0xc1, // tag
        ];
        assert_eq!(bytes.as_slice(), &expected[..], "got {:02x?}", bytes.as_slice());
    }

    #[test]
    fn typical_report_fits_the_air_budget() {
        let bytes = encode(&typical());
        assert!(bytes.len() <= 48, "typical report is {} bytes", bytes.len());
    }

    #[test]
    fn golden_bytes_with_extras() {
        let mut r = typical();
        r.extras.push(ExtraCounter { kind: CounterKind::SmsSent, base: 3, used: 1 }).unwrap();
        r.extras.push(ExtraCounter { kind: CounterKind::App(0), base: 1000, used: 24 }).unwrap();
        let bytes = encode(&r);
        // The extras add exactly their own bytes, between the counters and the tag.
        let plain = encode(&typical());
        assert_eq!(bytes.len(), plain.len() + 7);
        assert_eq!(&bytes[..32], &plain[..32]);
        assert_eq!(&bytes[32..39], &[0x01, 0x03, 0x01, 0x80, 0xe8, 0x07, 0x18]);
        let (back, _) = Report::decode(&bytes).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn roundtrip_and_verify() {
        let r = typical();
        let bytes = encode(&r);
        assert_eq!(verify(&bytes, &KEY).unwrap(), r);
        assert_eq!(peek_meter_id(&bytes).unwrap(), 4711);
    }

    #[test]
    fn wrong_key_or_flipped_bit_fails() {
        let bytes = encode(&typical());
        assert_eq!(verify(&bytes, &[8u8; 32]), Err(VerifyError::BadTag));
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(verify(&b, &KEY).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn decode_rejects_bad_lengths_and_versions() {
        assert_eq!(Report::decode(&[1u8; 3]).unwrap_err(), DecodeError::TooShort);
        assert_eq!(Report::decode(&[1u8; REPORT_BYTES_MAX + 1]).unwrap_err(), DecodeError::TooLong);
        let mut b = encode(&typical());
        b[0] = 2;
        assert_eq!(Report::decode(&b).unwrap_err(), DecodeError::UnknownVersion(2));
    }

    #[test]
    fn worst_case_fits_max() {
        let mut r = typical();
        r.meter_id = u64::MAX;
        r.epoch = u32::MAX;
        r.seq = u32::MAX;
        r.base = Totals { up: u64::MAX, down: u64::MAX };
        r.used = Totals { up: u64::MAX, down: u64::MAX };
        for kind in [
            CounterKind::SmsSent,
            CounterKind::SmsReceived,
            CounterKind::DataSessions,
            CounterKind::AttachedSeconds,
            CounterKind::App(0),
            CounterKind::App(127),
        ] {
            r.extras.push(ExtraCounter { kind, base: u64::MAX, used: u64::MAX }).unwrap();
        }
        let bytes = encode(&r);
        assert_eq!(bytes.len(), REPORT_BYTES_MAX);
        assert_eq!(verify(&bytes, &KEY).unwrap(), r);
    }

    #[test]
    fn unordered_extras_are_refused_both_ways() {
        let mut r = typical();
        r.extras.push(ExtraCounter { kind: CounterKind::SmsReceived, base: 0, used: 1 }).unwrap();
        r.extras.push(ExtraCounter { kind: CounterKind::SmsSent, base: 0, used: 1 }).unwrap();
        let mut buf = [0u8; REPORT_BYTES_MAX];
        assert_eq!(r.encode(&KEY, &mut buf), Err(ReportError::ExtrasUnordered));
    }

    #[test]
    fn overlong_varints_are_refused() {
        // Found by the fuzz target `report_decode`: meter_id 0x3fff written as ff ff 00
        // (overlong) instead of ff 7f.
        let mut buf = [0u8; REPORT_BYTES_MAX];
        let mut r = typical();
        r.meter_id = 0x3fff;
        let n = r.encode(&KEY, &mut buf).unwrap();
        assert_eq!(&buf[1..3], &[0xff, 0x7f]);
        let mut bad = [0u8; REPORT_BYTES_MAX + 1];
        bad[..2].copy_from_slice(&[buf[0], 0xff]);
        bad[2..4].copy_from_slice(&[0xff, 0x00]);
        bad[4..n + 1].copy_from_slice(&buf[3..n]);
        assert_eq!(Report::decode(&bad[..n + 1]).err(), Some(DecodeError::NonCanonical));
        assert!(Report::decode(&buf[..n]).is_ok());
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = Report::decode(&bytes);
            let _ = verify(&bytes, &KEY);
        }

        #[test]
        fn roundtrip_any(meter_id: u64, epoch: u32, seq: u32, iccid: u64, secs in 0u32..=DEVICE_TIME_SECS_MAX,
                         bu: u64, bd: u64, uu: u64, ud: u64, n in 0usize..=EXTRA_COUNTERS_MAX) {
            let mut r = typical();
            r.meter_id = meter_id; r.epoch = epoch; r.seq = seq; r.iccid = iccid;
            r.time = DeviceTime::uptime(secs).unwrap();
            r.base = Totals { up: bu, down: bd };
            r.used = Totals { up: uu, down: ud };
            for i in 0..n {
                r.extras.push(ExtraCounter { kind: CounterKind::App(i as u8), base: bu ^ i as u64, used: uu }).unwrap();
            }
            let bytes = encode(&r);
            proptest::prop_assert!(bytes.len() <= REPORT_BYTES_MAX);
            proptest::prop_assert_eq!(verify(&bytes, &KEY).unwrap(), r);
        }
    }
}
