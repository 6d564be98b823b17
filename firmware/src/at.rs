//! AT command transport: a bounded line reader, line classification and a UART client.
//!
//! A modem's answer to one command is a stream of lines: maybe the echo of the command,
//! information lines (`+QGDCNT: 10,20`), unsolicited result codes interleaved at any moment
//! (`RDY`, `+CPIN: READY`, `+QIURC: "pdpdeact",1`), and exactly one final result (`OK`,
//! `ERROR`, `+CME ERROR: <n>`). Noise on the line (a modem booting, a baud-rate glitch) shows
//! up as bytes that are not printable ASCII.
//!
//! The pure part ([`LineReader`], [`Exchange`]) turns bytes into [`Event`]s without I/O, so
//! recorded transcripts and fuzzers drive exactly the code the firmware runs.
//! [`AtClient`] adds the UART (`embedded-io` 0.7) and timeouts counted on the board's
//! [`DelayNs`]. Nothing here panics or allocates; every loop is bounded by a named limit.

use embedded_hal::delay::DelayNs;
use embedded_io::{Read, ReadReady, Write};

/// Longest line kept, in bytes; longer lines are dropped whole and reported once.
pub const LINE_BYTES_MAX: usize = 128;
/// How long a command may take to reach its final result, in milliseconds. Quectel documents
/// 300 ms for most queries; the margin covers a modem busy with a network procedure.
pub const RESPONSE_TIMEOUT_MS: u32 = 5_000;
/// How long an MQTT publish may take until its `+QMTPUB` result, in milliseconds: Quectel's
/// default packet timeout (5 s) times its three attempts, plus a margin.
pub const PUBLISH_TIMEOUT_MS: u32 = 20_000;
/// How long to wait for the `>` prompt of a data-mode command, in milliseconds.
pub const PROMPT_TIMEOUT_MS: u32 = 2_000;
/// Poll step while the UART has nothing to read, in microseconds.
pub const POLL_STEP_US: u32 = 500;
/// Bytes accepted for one command before it is given up as runaway output.
pub const RESPONSE_BYTES_MAX: usize = 2_048;
/// Lines that are neither ours nor final (echo, URCs, garbage) tolerated within one command.
pub const FOREIGN_LINES_MAX: u16 = 32;
/// Longest command line this client builds, in bytes (topic included for `AT+QMTPUB`).
pub const COMMAND_BYTES_MAX: usize = 160;
/// Bytes read from the UART in one call: one, so that nothing after an exchange's final line
/// (the next URC, a result code) is consumed and lost with the exchange.
const READ_CHUNK_BYTES: usize = 1;

/// Why an AT exchange failed. Small and `Copy`: it travels up a `no_std` call stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtError {
    /// No final result within the timeout.
    Timeout,
    /// The modem answered `ERROR`.
    Error,
    /// The modem answered `+CME ERROR: <n>` (or `+CMS ERROR`), with its code.
    Cme(u16),
    /// A line exceeded [`LINE_BYTES_MAX`].
    LineTooLong,
    /// More than [`RESPONSE_BYTES_MAX`] bytes or [`FOREIGN_LINES_MAX`] foreign lines without
    /// a final result: the modem is talking, but not to us.
    Runaway,
    /// An information line had our prefix but not the documented fields.
    Malformed,
    /// The command ended `OK` without the information line it should carry.
    Missing,
    /// A counter does not fit 64 bits once scaled to bytes.
    Overflow,
    /// The UART reported an error.
    Io,
    /// The command would exceed [`COMMAND_BYTES_MAX`].
    CommandTooLong,
    /// The modem reported the MQTT publish failed (`+QMTPUB: …,2`).
    PublishFailed,
}

impl core::fmt::Display for AtError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AtError::Timeout => f.write_str("modem did not answer in time"),
            AtError::Error => f.write_str("modem answered ERROR"),
            AtError::Cme(n) => write!(f, "modem answered +CME ERROR: {n}"),
            AtError::LineTooLong => f.write_str("modem line too long"),
            AtError::Runaway => f.write_str("modem output without a final result"),
            AtError::Malformed => f.write_str("malformed modem response"),
            AtError::Missing => f.write_str("modem response lacks the expected line"),
            AtError::Overflow => f.write_str("modem counter overflows 64 bits"),
            AtError::Io => f.write_str("UART error"),
            AtError::CommandTooLong => f.write_str("AT command too long"),
            AtError::PublishFailed => f.write_str("modem reported the MQTT publish failed"),
        }
    }
}

/// What the line reader made of one byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineEvent {
    /// Nothing complete yet.
    Pending,
    /// A non-empty line is complete: read it with [`LineReader::line`].
    Line,
    /// A line longer than the buffer ended; its bytes were dropped.
    TooLong,
    /// The data prompt `>` arrived at the start of a line (it has no line end).
    Prompt,
}

/// Splits a byte stream into lines of at most `N` bytes. CR, LF or both end a line; empty
/// lines are skipped, as modems frame every answer in CR LF pairs.
#[derive(Clone, Debug)]
pub struct LineReader<const N: usize> {
    buf: heapless::Vec<u8, N>,
    overflowed: bool,
    /// Set once [`LineEvent::Line`] was returned, so the next byte starts a new line.
    complete: bool,
}

impl<const N: usize> Default for LineReader<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> LineReader<N> {
    /// An empty reader.
    pub const fn new() -> Self {
        Self { buf: heapless::Vec::new(), overflowed: false, complete: false }
    }

    /// Feeds one byte.
    pub fn push(&mut self, b: u8) -> LineEvent {
        if self.complete {
            self.buf.clear();
            self.complete = false;
        }
        match b {
            b'\r' | b'\n' => {
                if self.overflowed {
                    self.overflowed = false;
                    self.buf.clear();
                    LineEvent::TooLong
                } else if self.buf.is_empty() {
                    LineEvent::Pending
                } else {
                    self.complete = true;
                    LineEvent::Line
                }
            }
            b'>' if self.buf.is_empty() && !self.overflowed => LineEvent::Prompt,
            _ => {
                if !self.overflowed && self.buf.push(b).is_err() {
                    // Keep reading until the line ends, so the rest is not taken for a new line.
                    self.overflowed = true;
                }
                LineEvent::Pending
            }
        }
    }

    /// The line completed by the last [`LineEvent::Line`].
    pub fn line(&self) -> &[u8] {
        &self.buf
    }

    /// Drops a partial line, e.g. before a new command.
    pub fn reset(&mut self) {
        self.buf.clear();
        self.overflowed = false;
        self.complete = false;
    }
}

/// Unsolicited result codes the meter acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Urc {
    /// `RDY`: the modem (re)started. Its counters may have been reloaded from NVM.
    Ready,
    /// `+QIURC: "pdpdeact",<cid>` or `+CGEV: … DEACT`: the data context is going down; report
    /// now, the next chance may be far away.
    PdpDeactivated,
    /// `+QMTPUB: <client>,<msg_id>,<result>[,<retries>]`: outcome of an MQTT publish.
    Published {
        /// Message id the publish was sent with.
        msg_id: u16,
        /// 0 sent and acknowledged, 1 retransmitted and acknowledged, 2 failed.
        result: u8,
    },
    /// Any other unsolicited line (`+CPIN: READY`, `+QIURC: …`): ignored.
    Other,
}

/// One step of an exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// Nothing complete yet.
    Pending,
    /// An information line with the expected prefix; the slice is what follows the prefix
    /// (leading spaces removed).
    Info(&'a [u8]),
    /// An unsolicited line.
    Urc(Urc),
    /// The `>` prompt of a data-mode command.
    Prompt,
    /// The final result: `Ok(())` for `OK`, the error for `ERROR` / `+CME ERROR: n`.
    Final(Result<(), AtError>),
    /// The exchange gave up (too long a line, runaway output).
    Failed(AtError),
}

/// The pure state of one command's response: which lines are the echo, ours, unsolicited,
/// garbage or final. Feed it bytes; it never performs I/O.
#[derive(Clone, Debug)]
pub struct Exchange<const N: usize = LINE_BYTES_MAX> {
    reader: LineReader<N>,
    command: heapless::Vec<u8, COMMAND_BYTES_MAX>,
    prefix: &'static [u8],
    bytes: usize,
    foreign: u16,
}

impl<const N: usize> Exchange<N> {
    /// Starts classifying the response to `command` (without its CR; used to spot the echo),
    /// whose information lines start with `prefix` (e.g. `b"+QGDCNT:"`; empty for none).
    pub fn new(command: &[u8], prefix: &'static [u8]) -> Self {
        let mut cmd = heapless::Vec::new();
        // A command longer than the echo buffer only loses echo detection: its echo is then
        // skipped as a foreign line, which is still bounded.
        let keep = command.len().min(COMMAND_BYTES_MAX);
        let _ = cmd.extend_from_slice(command.get(..keep).unwrap_or_default());
        Self { reader: LineReader::new(), command: cmd, prefix, bytes: 0, foreign: 0 }
    }

    /// Feeds one byte of the modem's output.
    pub fn feed(&mut self, b: u8) -> Event<'_> {
        self.bytes = self.bytes.saturating_add(1);
        if self.bytes > RESPONSE_BYTES_MAX {
            return Event::Failed(AtError::Runaway);
        }
        match self.reader.push(b) {
            LineEvent::Pending => Event::Pending,
            LineEvent::Prompt => Event::Prompt,
            LineEvent::TooLong => Event::Failed(AtError::LineTooLong),
            LineEvent::Line => {
                let line = self.reader.line();
                let kind = classify(line, &self.command, self.prefix);
                if matches!(kind, Kind::Echo | Kind::Garbage | Kind::Urc(Urc::Other)) {
                    self.foreign = self.foreign.saturating_add(1);
                    if self.foreign > FOREIGN_LINES_MAX {
                        return Event::Failed(AtError::Runaway);
                    }
                }
                match kind {
                    Kind::Echo | Kind::Garbage => Event::Pending,
                    Kind::Final(r) => Event::Final(r),
                    Kind::Urc(u) => Event::Urc(u),
                    Kind::Info(start) => Event::Info(trim(trim(line).get(start..).unwrap_or_default())),
                }
            }
        }
    }
}

enum Kind {
    Echo,
    Garbage,
    Final(Result<(), AtError>),
    Urc(Urc),
    /// Information line; the payload starts at this index.
    Info(usize),
}

fn classify(line: &[u8], command: &[u8], prefix: &[u8]) -> Kind {
    // Modems send printable ASCII only; anything else is line noise, not an answer.
    if line.iter().any(|&b| !(0x20..0x7f).contains(&b)) {
        return Kind::Garbage;
    }
    let line = trim(line);
    if line == b"OK" {
        return Kind::Final(Ok(()));
    }
    if line == b"ERROR" {
        return Kind::Final(Err(AtError::Error));
    }
    for p in [&b"+CME ERROR:"[..], &b"+CMS ERROR:"[..]] {
        if let Some(rest) = line.strip_prefix(p) {
            // A verbose error text (AT+CMEE=2) has no number: still an error, code 0.
            let code = parse_u64(trim(rest)).ok().and_then(|n| u16::try_from(n).ok()).unwrap_or(0);
            return Kind::Final(Err(AtError::Cme(code)));
        }
    }
    if !command.is_empty() && line == trim(command) {
        return Kind::Echo;
    }
    if !prefix.is_empty() && line.starts_with(prefix) {
        // `Exchange::feed` slices the trimmed line after the prefix.
        return Kind::Info(prefix.len());
    }
    Kind::Urc(parse_urc(line))
}

fn parse_urc(line: &[u8]) -> Urc {
    if line == b"RDY" {
        return Urc::Ready;
    }
    if let Some(rest) = line.strip_prefix(b"+QIURC:") {
        if trim(rest).starts_with(b"\"pdpdeact\"") {
            return Urc::PdpDeactivated;
        }
    }
    if let Some(rest) = line.strip_prefix(b"+CGEV:") {
        let rest = trim(rest);
        if rest.starts_with(b"NW DEACT") || rest.starts_with(b"ME DEACT") || rest.starts_with(b"NW PDN DEACT")
        {
            return Urc::PdpDeactivated;
        }
    }
    if let Some(rest) = line.strip_prefix(b"+QMTPUB:") {
        let mut f = Fields::new(trim(rest));
        let parsed = (|| {
            let _client = f.next_u64()?;
            let msg_id = u16::try_from(f.next_u64()?).ok()?;
            let result = u8::try_from(f.next_u64()?).ok()?;
            Some(Urc::Published { msg_id, result })
        })();
        return parsed.unwrap_or(Urc::Other);
    }
    Urc::Other
}

/// Strips spaces (and stray CR/LF) at both ends.
pub fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |i| i + 1);
    s.get(start..end).unwrap_or_default()
}

/// Longest decimal number accepted: `u64::MAX` has 20 digits.
const DECIMAL_DIGITS_MAX: usize = 20;

/// Parses an unsigned decimal, optionally in double quotes; never panics.
pub fn parse_u64(s: &[u8]) -> Result<u64, AtError> {
    let s = trim(s);
    let s = s.strip_prefix(b"\"").and_then(|s| s.strip_suffix(b"\"")).unwrap_or(s);
    if s.is_empty() || s.len() > DECIMAL_DIGITS_MAX {
        return Err(AtError::Malformed);
    }
    let mut v: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return Err(AtError::Malformed);
        }
        // Checked: 20 digits can exceed u64::MAX.
        v = v.checked_mul(10).and_then(|v| v.checked_add(u64::from(b - b'0'))).ok_or(AtError::Overflow)?;
    }
    Ok(v)
}

/// Comma-separated fields of an information line.
pub struct Fields<'a> {
    rest: Option<&'a [u8]>,
}

impl<'a> Fields<'a> {
    /// Fields of `s`.
    pub fn new(s: &'a [u8]) -> Self {
        Self { rest: Some(s) }
    }

    /// The next raw field, trimmed.
    pub fn next_field(&mut self) -> Option<&'a [u8]> {
        let s = self.rest?;
        match s.iter().position(|&b| b == b',') {
            Some(i) => {
                self.rest = s.get(i + 1..);
                s.get(..i).map(trim)
            }
            None => {
                self.rest = None;
                Some(trim(s))
            }
        }
    }

    /// The next field as an unsigned decimal.
    pub fn next_u64(&mut self) -> Option<u64> {
        self.next_field().and_then(|f| parse_u64(f).ok())
    }
}

/// Flags raised by unsolicited lines seen while talking to the modem.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModemEvents {
    /// `RDY` was seen: the modem restarted.
    pub restarted: bool,
    /// The data context went down: report on demand.
    pub pdp_deactivated: bool,
}

impl ModemEvents {
    fn note(&mut self, urc: Urc) {
        match urc {
            Urc::Ready => self.restarted = true,
            Urc::PdpDeactivated => self.pdp_deactivated = true,
            Urc::Published { .. } | Urc::Other => {}
        }
    }
}

/// An AT client on a UART: writes commands, reads answers with a timeout counted on the
/// board's delay, and remembers the unsolicited events it saw on the way.
pub struct AtClient<U> {
    uart: U,
    events: ModemEvents,
}

impl<U: Read + ReadReady + Write> AtClient<U> {
    /// A client on `uart`.
    pub fn new(uart: U) -> Self {
        Self { uart, events: ModemEvents::default() }
    }

    /// The events seen since the last call, cleared.
    pub fn take_events(&mut self) -> ModemEvents {
        core::mem::take(&mut self.events)
    }

    /// The UART back.
    pub fn release(self) -> U {
        self.uart
    }

    /// Sends `command` (without CR) and waits for its final result, handing each information
    /// line starting with `prefix` to `on_info`. The first error from `on_info` is returned
    /// once the final result arrived, so the stream stays in step.
    pub fn command(
        &mut self,
        delay: &mut impl DelayNs,
        command: &[u8],
        prefix: &'static [u8],
        timeout_ms: u32,
        mut on_info: impl FnMut(&[u8]) -> Result<(), AtError>,
    ) -> Result<(), AtError> {
        self.send_line(command)?;
        let mut ex: Exchange<LINE_BYTES_MAX> = Exchange::new(command, prefix);
        let mut info_result = Ok(());
        let events = &mut self.events;
        let outcome = pump(&mut self.uart, delay, timeout_ms, &mut ex, |ev| match ev {
            Event::Info(payload) => {
                if info_result.is_ok() {
                    info_result = on_info(payload);
                }
                None
            }
            Event::Urc(u) => {
                events.note(u);
                None
            }
            Event::Final(r) => Some(r),
            Event::Failed(e) => Some(Err(e)),
            Event::Pending | Event::Prompt => None,
        });
        outcome?;
        info_result
    }

    /// Waits up to `timeout_ms` for the first line starting with `prefix` (a result URC such
    /// as `+QMTOPEN: 0,0`) and returns what `parse` makes of it; other lines are noted as
    /// events or skipped.
    pub fn wait_line<T>(
        &mut self,
        delay: &mut impl DelayNs,
        prefix: &'static [u8],
        timeout_ms: u32,
        mut parse: impl FnMut(&[u8]) -> Result<T, AtError>,
    ) -> Result<T, AtError> {
        let mut ex: Exchange<LINE_BYTES_MAX> = Exchange::new(b"", prefix);
        let mut out = None;
        let events = &mut self.events;
        pump(&mut self.uart, delay, timeout_ms, &mut ex, |ev| match ev {
            Event::Info(p) => Some(parse(p).map(|v| out = Some(v))),
            Event::Urc(u) => {
                events.note(u);
                None
            }
            Event::Final(Err(e)) | Event::Failed(e) => Some(Err(e)),
            Event::Final(Ok(())) | Event::Pending | Event::Prompt => None,
        })?;
        out.ok_or(AtError::Missing)
    }

    /// Waits up to `timeout_ms` for unsolicited lines only (no command), noting events, e.g.
    /// to catch `RDY` after power-on.
    pub fn drain(&mut self, delay: &mut impl DelayNs, timeout_ms: u32) -> Result<(), AtError> {
        let mut ex: Exchange<LINE_BYTES_MAX> = Exchange::new(b"", b"");
        let events = &mut self.events;
        match pump(&mut self.uart, delay, timeout_ms, &mut ex, |ev| match ev {
            Event::Urc(u) => {
                events.note(u);
                None
            }
            Event::Failed(e) => Some(Err(e)),
            _ => None,
        }) {
            Err(AtError::Timeout) => Ok(()),
            other => other,
        }
    }

    /// Publishes `payload` to `topic` at QoS 1 through the modem's MQTT client
    /// (`AT+QMTPUB`): command, `>` prompt, exactly `payload.len()` bytes, `OK`, then the
    /// `+QMTPUB` result. Returns the modem's retransmission flag (1 = retransmitted).
    pub fn qmtpub(
        &mut self,
        delay: &mut impl DelayNs,
        client_idx: u8,
        msg_id: u16,
        topic: &str,
        payload: &[u8],
    ) -> Result<u8, AtError> {
        use core::fmt::Write as _;
        let mut cmd: heapless::String<COMMAND_BYTES_MAX> = heapless::String::new();
        write!(cmd, "AT+QMTPUB={client_idx},{msg_id},1,0,\"{topic}\",{}", payload.len())
            .map_err(|_| AtError::CommandTooLong)?;
        self.send_line(cmd.as_bytes())?;
        let mut ex: Exchange<LINE_BYTES_MAX> = Exchange::new(cmd.as_bytes(), b"");
        let events = &mut self.events;
        pump(&mut self.uart, delay, PROMPT_TIMEOUT_MS, &mut ex, |ev| match ev {
            Event::Prompt => Some(Ok(())),
            // A final result before the prompt can only be a refusal.
            Event::Final(r) => Some(r.and(Err(AtError::Error))),
            Event::Failed(e) => Some(Err(e)),
            Event::Urc(u) => {
                events.note(u);
                None
            }
            Event::Info(_) | Event::Pending => None,
        })?;
        self.uart.write_all(payload).map_err(|_| AtError::Io)?;
        self.uart.flush().map_err(|_| AtError::Io)?;
        // `OK` acknowledges the bytes; the URC tells whether the broker acknowledged them.
        let mut ex: Exchange<LINE_BYTES_MAX> = Exchange::new(b"", b"");
        let mut accepted = false;
        let events = &mut self.events;
        let mut outcome: Option<u8> = None;
        pump(&mut self.uart, delay, PUBLISH_TIMEOUT_MS, &mut ex, |ev| match ev {
            Event::Final(Ok(())) => {
                accepted = true;
                outcome.map(|_| Ok(()))
            }
            Event::Final(Err(e)) | Event::Failed(e) => Some(Err(e)),
            Event::Urc(Urc::Published { msg_id: id, result }) if id == msg_id => {
                outcome = Some(result);
                accepted.then_some(Ok(()))
            }
            Event::Urc(u) => {
                events.note(u);
                None
            }
            Event::Info(_) | Event::Pending | Event::Prompt => None,
        })?;
        match outcome {
            Some(r @ (0 | 1)) => Ok(r),
            _ => Err(AtError::PublishFailed),
        }
    }

    fn send_line(&mut self, command: &[u8]) -> Result<(), AtError> {
        if command.len() > COMMAND_BYTES_MAX {
            return Err(AtError::CommandTooLong);
        }
        self.uart.write_all(command).map_err(|_| AtError::Io)?;
        self.uart.write_all(b"\r").map_err(|_| AtError::Io)?;
        self.uart.flush().map_err(|_| AtError::Io)
    }
}

/// Reads bytes into `ex` until `on_event` returns a result or `timeout_ms` passes. Bounded:
/// at most `timeout_ms * 1000 / POLL_STEP_US` idle polls, and the exchange itself stops
/// after [`RESPONSE_BYTES_MAX`] bytes.
fn pump<U: Read + ReadReady, const N: usize>(
    uart: &mut U,
    delay: &mut impl DelayNs,
    timeout_ms: u32,
    ex: &mut Exchange<N>,
    mut on_event: impl FnMut(Event<'_>) -> Option<Result<(), AtError>>,
) -> Result<(), AtError> {
    let mut idle_polls_left = timeout_ms.saturating_mul(1000) / POLL_STEP_US;
    let mut chunk = [0u8; READ_CHUNK_BYTES];
    // Upper bound on reads: every read returns ≥ 1 byte and the exchange fails after
    // RESPONSE_BYTES_MAX + 1 bytes; idle polls are counted down separately.
    let mut reads_left = RESPONSE_BYTES_MAX + 1;
    loop {
        if !uart.read_ready().map_err(|_| AtError::Io)? {
            if idle_polls_left == 0 {
                return Err(AtError::Timeout);
            }
            idle_polls_left -= 1;
            delay.delay_us(POLL_STEP_US);
            continue;
        }
        if reads_left == 0 {
            return Err(AtError::Runaway);
        }
        reads_left -= 1;
        let n = uart.read(&mut chunk).map_err(|_| AtError::Io)?;
        for &b in chunk.get(..n).unwrap_or_default() {
            if let Some(r) = on_event(ex.feed(b)) {
                return r;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(transcript: &[u8], command: &[u8], prefix: &'static [u8]) -> heapless::Vec<String, 64> {
        let mut ex: Exchange = Exchange::new(command, prefix);
        let mut out = heapless::Vec::new();
        for &b in transcript {
            let e = ex.feed(b);
            if e != Event::Pending {
                let s = match e {
                    Event::Info(p) => format!("info:{}", core::str::from_utf8(p).unwrap()),
                    other => format!("{other:?}"),
                };
                out.push(s).unwrap();
            }
        }
        out
    }

    extern crate std;
    use std::format;
    use std::string::String;

    #[test]
    fn echo_urcs_and_final_are_told_apart() {
        let t = b"AT+QGDCNT?\r\r\nRDY\r\n\r\n+CPIN: READY\r\n\r\n+QGDCNT: 100,200\r\n\r\nOK\r\n";
        let ev = events(t, b"AT+QGDCNT?", b"+QGDCNT:");
        assert_eq!(ev.as_slice(), ["Urc(Ready)", "Urc(Other)", "info:100,200", "Final(Ok(()))"]);
    }

    #[test]
    fn errors_are_typed() {
        assert_eq!(events(b"\r\nERROR\r\n", b"AT", b"").as_slice(), ["Final(Err(Error))"]);
        assert_eq!(events(b"\r\n+CME ERROR: 10\r\n", b"AT", b"").as_slice(), ["Final(Err(Cme(10)))"]);
        assert_eq!(
            events(b"\r\n+CME ERROR: SIM not inserted\r\n", b"AT", b"").as_slice(),
            ["Final(Err(Cme(0)))"]
        );
    }

    #[test]
    fn long_lines_are_reported_once_and_resync() {
        let mut t = std::vec::Vec::new();
        t.extend_from_slice(&[b'x'; LINE_BYTES_MAX + 10]);
        t.extend_from_slice(b"\r\nOK\r\n");
        assert_eq!(events(&t, b"AT", b"").as_slice(), ["Failed(LineTooLong)", "Final(Ok(()))"]);
    }

    #[test]
    fn garbage_lines_are_skipped_then_bounded() {
        let ev = events(b"\xff\xfe\x00\r\nOK\r\n", b"AT", b"");
        assert_eq!(ev.as_slice(), ["Final(Ok(()))"]);
        let mut t = std::vec::Vec::new();
        for _ in 0..=FOREIGN_LINES_MAX {
            t.extend_from_slice(b"\x01\r\n");
        }
        assert_eq!(events(&t, b"AT", b"").last().map(String::as_str), Some("Failed(Runaway)"));
    }

    #[test]
    fn urcs_for_the_meter() {
        let ev = events(b"+QIURC: \"pdpdeact\",1\r\n+QMTPUB: 0,7,0\r\n+CGEV: NW DEACT 1\r\n", b"", b"");
        assert_eq!(
            ev.as_slice(),
            ["Urc(PdpDeactivated)", "Urc(Published { msg_id: 7, result: 0 })", "Urc(PdpDeactivated)"]
        );
    }

    #[test]
    fn prompt_has_no_line_end() {
        assert_eq!(
            events(b"AT+QMTPUB=0,1,1,0,\"t\",3\r\r\n> ", b"AT+QMTPUB=0,1,1,0,\"t\",3", b"").as_slice(),
            ["Prompt"]
        );
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_u64(b" 42 "), Ok(42));
        assert_eq!(parse_u64(b"\"7\""), Ok(7));
        assert_eq!(parse_u64(b"18446744073709551615"), Ok(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), Err(AtError::Overflow));
        assert_eq!(parse_u64(b"-1"), Err(AtError::Malformed));
        assert_eq!(parse_u64(b""), Err(AtError::Malformed));
    }
}
