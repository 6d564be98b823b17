//! What ingest checks in each verified report before it stores it: everything the later
//! stages rely on (counter ceilings, receive and device times in a window around the
//! endpoint's clock). Pure: the clock is a parameter; the signature and tag checks and the
//! store are the endpoint's.

use countersign_meter::report::DEVICE_TIME_SECS_MAX;
use countersign_meter::{CounterKind, Report, TimeQuality};
use countersign_protocol::RejectReason;

use crate::usage::{
    attribution_unix_s, record_fault, FaultReason, UsageRecord, BYTES_PER_DEVICE_SECOND_MAX,
    USED_BYTES_PER_EPOCH_MAX,
};

/// How far a gateway's receive time (and a batch's creation time) may be ahead of the
/// endpoint's clock: 5 minutes. NTP keeps gateways within a second; this leaves room for a
/// drifting clock between syncs, and nothing later.
pub const RECEIVED_AHEAD_MS_MAX: u64 = 5 * 60 * 1000;
/// How old a receive time (and a batch's creation time, and a device's network time) may be:
/// 400 days. The agent has no offline deadline — it buffers up to its quota and the broker
/// holds the rest — so the window covers more than a year of outage and every billing period
/// that can still be open; older records are refused (and kept by the agent with the
/// reason), because they could only rewrite long-invoiced periods.
pub const RECEIVED_AGE_MS_MAX: u64 = 400 * 24 * 3600 * 1000;
/// Largest `base` (lifetime total restored at boot) of any counter: 2^62, so that
/// `base + used` (the cumulative value) always fits in 64 bits.
pub const BASE_MAX: u64 = 1 << 62;
/// Most any extra counter (SMS, sessions, attached seconds, application counters) may count
/// in one epoch: 2^40, a trillion, beyond any device; with it no sum over an epoch overflows.
pub const EXTRA_USED_PER_EPOCH_MAX: u64 = 1 << 40;
/// Most SMS or data sessions per second of device uptime: 10. A modem sends at most about
/// one SMS a second and a PDP activation takes longer than 100 ms.
pub const EVENTS_PER_DEVICE_SECOND_MAX: u64 = 10;
/// Seconds of slack added to a device's uptime for the rate ceilings: the modem may have
/// been attached and counting before the meter's clock started.
pub const UPTIME_SLACK_S: u64 = 60;
/// A stored record attributed more than this before the endpoint's clock is counted and
/// logged as late: it may fall in a settled day, which the ledger then adjusts (never
/// rewrites). 48 hours, the usual settlement window.
pub const LATE_ATTRIBUTION_MS: u64 = 48 * 3600 * 1000;

/// Why a time is outside the window around the endpoint's clock.
fn outside_window(what: &str, t_ms: u64, now_ms: u64) -> Option<String> {
    if t_ms > now_ms.saturating_add(RECEIVED_AHEAD_MS_MAX) {
        return Some(format!(
            "{what} {t_ms} ms is {} ms ahead of the endpoint clock ({now_ms} ms); at most {RECEIVED_AHEAD_MS_MAX} ms allowed",
            t_ms - now_ms
        ));
    }
    if t_ms < now_ms.saturating_sub(RECEIVED_AGE_MS_MAX) {
        return Some(format!(
            "{what} {t_ms} ms is {} ms before the endpoint clock ({now_ms} ms); at most {RECEIVED_AGE_MS_MAX} ms allowed",
            now_ms - t_ms
        ));
    }
    None
}

/// Whether a batch's creation time is inside the window around the endpoint's clock: the
/// refusal's text when it is not. A gateway whose clock is that wrong stamps wrong receive
/// times too, so the whole batch is refused and stays buffered at the gateway.
pub fn check_created(created_ms: u64, now_ms: u64) -> Result<(), String> {
    match outside_window("batch creation time", created_ms, now_ms) {
        Some(why) => Err(why),
        None => Ok(()),
    }
}

/// Everything the later stages rely on, for one verified report: refused (with the reason
/// the gateway keeps) unless
///
/// - the receive time, and a network device time, are within [`RECEIVED_AGE_MS_MAX`] before
///   and [`RECEIVED_AHEAD_MS_MAX`] after `now_ms` (so the attribution instant every stage
///   computes with [`crate::usage::attribution_instant`] is a date in every zone);
/// - each byte counter is at most [`USED_BYTES_PER_EPOCH_MAX`] and, on an uptime clock, at
///   most [`BYTES_PER_DEVICE_SECOND_MAX`] per second of uptime (plus [`UPTIME_SLACK_S`]);
/// - each extra counter is at most [`EXTRA_USED_PER_EPOCH_MAX`], SMS and sessions at most
///   [`EVENTS_PER_DEVICE_SECOND_MAX`] per second of uptime, attached seconds at most the
///   uptime (plus slack) and never more than a device clock can count;
/// - every `base` is at most [`BASE_MAX`].
///
/// Pure: the clock is a parameter.
pub fn validate_report(report: &Report, received_ms: u64, now_ms: u64) -> Result<(), (RejectReason, String)> {
    if let Some(why) = outside_window("gateway receive time", received_ms, now_ms) {
        return Err((RejectReason::ReceiveTime, why));
    }
    if let (TimeQuality::Network, Some(s)) = (report.time.quality(), report.time.unix_s()) {
        if let Some(why) = outside_window("device network time", s.saturating_mul(1000), now_ms) {
            return Err((RejectReason::DeviceTime, why));
        }
    }
    let ceiling = |why: String| Err((RejectReason::CounterCeiling, why));
    match record_fault(&UsageRecord::from_report(report, received_ms)) {
        None => {}
        Some(FaultReason::CounterCeiling { .. }) => {
            return ceiling(format!(
                "used {} up / {} down bytes exceeds {USED_BYTES_PER_EPOCH_MAX} bytes per epoch",
                report.used.up, report.used.down
            ))
        }
        // Unreachable inside the window; refused all the same rather than stored.
        Some(other) => return Err((RejectReason::ReceiveTime, other.to_string())),
    }
    let uptime_s = match report.time.quality() {
        TimeQuality::Uptime => Some(u64::from(report.time.secs()).saturating_add(UPTIME_SLACK_S)),
        _ => None,
    };
    if let Some(s) = uptime_s {
        let max = BYTES_PER_DEVICE_SECOND_MAX.saturating_mul(s);
        if report.used.up > max || report.used.down > max {
            return ceiling(format!(
                "used {} up / {} down bytes in {} s of uptime exceeds {BYTES_PER_DEVICE_SECOND_MAX} bytes per second",
                report.used.up,
                report.used.down,
                report.time.secs()
            ));
        }
    }
    if report.base.up > BASE_MAX || report.base.down > BASE_MAX {
        return ceiling(format!(
            "base {} up / {} down bytes exceeds {BASE_MAX}",
            report.base.up, report.base.down
        ));
    }
    for x in &report.extras {
        let name = x.kind.name();
        if x.base > BASE_MAX {
            return ceiling(format!("{name} base {} exceeds {BASE_MAX}", x.base));
        }
        if x.used > EXTRA_USED_PER_EPOCH_MAX {
            return ceiling(format!("{name} used {} exceeds {EXTRA_USED_PER_EPOCH_MAX} per epoch", x.used));
        }
        let per_uptime = match x.kind {
            CounterKind::SmsSent | CounterKind::SmsReceived | CounterKind::DataSessions => {
                uptime_s.map(|s| (EVENTS_PER_DEVICE_SECOND_MAX.saturating_mul(s), "events per second"))
            }
            CounterKind::AttachedSeconds => Some(match uptime_s {
                Some(s) => (s, "seconds of uptime"),
                None => (
                    u64::from(DEVICE_TIME_SECS_MAX).saturating_add(UPTIME_SLACK_S),
                    "seconds a device clock counts",
                ),
            }),
            CounterKind::App(_) => None,
        };
        if let Some((max, unit)) = per_uptime {
            if x.used > max {
                return ceiling(format!("{name} used {} exceeds {max} ({unit})", x.used));
            }
        }
    }
    Ok(())
}

/// Unix milliseconds of a report's attribution instant (the same choice of time as
/// [`crate::usage::attribution_instant`]).
pub fn attribution_ms(report: &Report, received_ms: u64) -> u64 {
    attribution_unix_s(&report.time, received_ms).saturating_mul(1000)
}
