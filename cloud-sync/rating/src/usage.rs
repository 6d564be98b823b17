//! Usage derivation: stored reports in, bytes per SIM per day out. Pure: no IO, no clock.
//!
//! # The rule
//!
//! Records come in record id order, (meter, epoch, seq). Within one epoch of one meter a
//! running maximum of `used` is kept per direction, and each report contributes
//! `max(0, used − running maximum before it)` per direction. The contributions of an epoch
//! therefore add up to the highest `used` seen in it, whichever of its reports were lost,
//! duplicated or delivered out of order, and usage is never negative. Epochs add up
//! independently: each starts counting from zero, and an epoch's `base` (the lifetime total
//! restored at boot) is never counted again.
//!
//! A counter that goes backwards inside an epoch contributes nothing until it passes its old
//! maximum again. The meter widens and re-bases modem counters itself (see
//! `countersign_meter::counter`), so a decrease inside an epoch is not something a correct
//! meter reports; taking the maximum makes sure it can never subtract.
//!
//! # Which day
//!
//! A contribution is attributed to the ICCID the report names and to the UTC day of the
//! report's time: the device's own time when it is network time
//! ([`TimeQuality::Network`]), otherwise the gateway's receive time, because RTC and uptime
//! clocks cannot be trusted to put bytes on the right day. Bytes used late on one day and
//! first reported the next are billed on the next day; carriers do the same with their
//! session records. A SIM that reported on a day but used nothing shows as a zero day, which
//! tells "heard from, idle" apart from "not heard from".

use std::collections::BTreeMap;

use countersign_meter::{DeviceTime, RecordId, Report, TimeQuality, Totals};
pub use jiff::tz::TimeZone;
use jiff::Timestamp;
use time::Date;

/// Longest time zone name accepted (the longest IANA name is about 30 bytes).
pub const TIME_ZONE_NAME_BYTES_MAX: usize = 64;

/// Bytes per (ICCID, day): UTC days from [`derive_daily`], zone days from [`derive_daily_in`].
pub type DailyUsage = BTreeMap<(u64, Date), Totals>;

/// What the derivation needs of one stored record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsageRecord {
    /// Record id: (meter, epoch, seq).
    pub id: RecordId,
    /// SIM the report names.
    pub iccid: u64,
    /// Bytes counted in the epoch up to this report.
    pub used: Totals,
    /// When the device says it made the report.
    pub time: DeviceTime,
    /// When the gateway received it, Unix milliseconds.
    pub received_ms: u64,
}

impl UsageRecord {
    /// The usage-relevant part of a decoded report.
    pub fn from_report(report: &Report, received_ms: u64) -> Self {
        Self { id: report.id(), iccid: report.iccid, used: report.used, time: report.time, received_ms }
    }
}

/// Most bytes one epoch of a meter may count per direction: 1 PiB (2^50 bytes). The fastest
/// cellular categories (5G NR, IMT-2020 peak 20 Gbit/s down, 10 Gbit/s up) need 5.2 days of
/// uninterrupted peak rate for it, far beyond any SIM's fair use; and 2^13 such epochs on one
/// SIM are needed before its total of both directions leaves 64 bits, so no realistic history
/// overflows a sum that derivation, billing or the Lago export computes.
pub const USED_BYTES_PER_EPOCH_MAX: u64 = 1 << 50;

/// Most bytes per second of device uptime per direction, for reports clocked by uptime (whose
/// epoch began at boot): 2.5 GB/s, i.e. 20 Gbit/s, the IMT-2020 peak rate of 5G NR, which no
/// cellular category exceeds.
pub const BYTES_PER_DEVICE_SECOND_MAX: u64 = 2_500_000_000;

/// Latest attribution instant the derivation accepts: 3000-01-01T00:00:00Z, in Unix seconds.
/// Far beyond any real clock (device wall clocks end in 2054), and every day before it is a
/// date in every time zone for both jiff and `time`, so an accepted instant never fails later.
pub const ATTRIBUTION_UNIX_S_MAX: u64 = 32_503_680_000;

/// Why usage could not be derived at all. None is recoverable by retrying: the input must
/// change. A fault confined to one SIM is not an error but a [`SimFault`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UsageError {
    /// The records are not in record id order.
    #[error("records out of order: {next} after {previous}")]
    Unordered {
        /// The record before.
        previous: RecordId,
        /// The record that should have come first.
        next: RecordId,
    },
    /// A total exceeds u64 bytes.
    #[error("usage of iccid {iccid} overflows 64 bits")]
    Overflow {
        /// The SIM whose total overflowed.
        iccid: u64,
    },
    /// The total over several SIMs exceeds u64 bytes.
    #[error("usage over all SIMs overflows 64 bits")]
    TotalOverflow,
    /// The settlement window exceeds [`SETTLEMENT_HOURS_MAX`].
    #[error("settlement window of {0} h exceeds {SETTLEMENT_HOURS_MAX} h")]
    SettlementWindow(u32),
    /// The time zone name is not in the bundled tz database.
    #[error("unknown time zone '{0}'")]
    UnknownTimeZone(String),
    /// The receive time is outside what a calendar date can represent.
    #[error("record {id}: receive time {received_ms} ms is not a representable date")]
    TimeOutOfRange {
        /// The record.
        id: RecordId,
        /// Its receive time.
        received_ms: u64,
    },
}

/// Why one SIM's usage cannot be derived. The SIM is left out of every figure (usage,
/// settlement, billing) and listed instead; every other SIM is derived exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultReason {
    /// A record's attribution instant is later than [`ATTRIBUTION_UNIX_S_MAX`].
    TimeOutOfRange {
        /// The instant, Unix seconds.
        unix_s: u64,
    },
    /// A record's `used` exceeds [`USED_BYTES_PER_EPOCH_MAX`] in a direction.
    CounterCeiling {
        /// Its uplink `used`.
        up: u64,
        /// Its downlink `used`.
        down: u64,
    },
    /// The SIM's total over all its records leaves 64 bits (per direction or both together).
    Overflow,
}

impl FaultReason {
    /// A stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            FaultReason::TimeOutOfRange { .. } => "time_out_of_range",
            FaultReason::CounterCeiling { .. } => "counter_ceiling",
            FaultReason::Overflow => "overflow",
        }
    }
}

impl std::fmt::Display for FaultReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FaultReason::TimeOutOfRange { unix_s } => {
                write!(f, "attribution time {unix_s} s is after {ATTRIBUTION_UNIX_S_MAX} s (year 3000)")
            }
            FaultReason::CounterCeiling { up, down } => write!(
                f,
                "used {up} up / {down} down bytes exceeds {USED_BYTES_PER_EPOCH_MAX} bytes per epoch"
            ),
            FaultReason::Overflow => write!(f, "the SIM's total usage overflows 64 bits"),
        }
    }
}

/// A SIM whose usage cannot be derived, with the first record that made it so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimFault {
    /// The SIM.
    pub iccid: u64,
    /// The record (meter, epoch, seq) that made the SIM underivable.
    pub record: RecordId,
    /// Why.
    pub reason: FaultReason,
}

impl std::fmt::Display for SimFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "iccid {} record {}: {}", self.iccid, self.record, self.reason)
    }
}

/// Why one record cannot be counted whatever the rest of its SIM's history: its attribution
/// instant is beyond [`ATTRIBUTION_UNIX_S_MAX`], or a counter beyond
/// [`USED_BYTES_PER_EPOCH_MAX`]. Ingest refuses such records; stored ones (legacy data) make
/// their SIM underivable. Pure.
pub fn record_fault(r: &UsageRecord) -> Option<FaultReason> {
    let unix_s = attribution_unix_s(&r.time, r.received_ms);
    if unix_s > ATTRIBUTION_UNIX_S_MAX {
        return Some(FaultReason::TimeOutOfRange { unix_s });
    }
    if r.used.up > USED_BYTES_PER_EPOCH_MAX || r.used.down > USED_BYTES_PER_EPOCH_MAX {
        return Some(FaultReason::CounterCeiling { up: r.used.up, down: r.used.down });
    }
    None
}

/// Distinct faults remembered as logged: each is logged at `warn` once, then at `debug`, and
/// the memory starts over when full (so a lasting fault is repeated now and then, not on
/// every query).
pub const FAULTS_LOGGED_MAX: usize = 4096;

/// Whether `(iccid, record)` is logged for the first time (see [`FAULTS_LOGGED_MAX`]).
pub fn first_report_of(iccid: u64, record: RecordId) -> bool {
    static LOGGED: std::sync::Mutex<std::collections::BTreeSet<(u64, RecordId)>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    // A poisoned set only decides log levels.
    let mut logged = LOGGED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if logged.len() >= FAULTS_LOGGED_MAX {
        logged.clear();
    }
    logged.insert((iccid, record))
}

/// Usage of every derivable SIM, and the SIMs that are not derivable.
///
/// Invariant: no SIM in `faults` has a day in `daily`, and for every other SIM the sum of
/// all its days, per direction and of both directions together, fits in a u64 (so any range
/// of its days can be summed without overflow).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Derived {
    /// Bytes per (ICCID, day) of the derivable SIMs.
    pub daily: DailyUsage,
    /// The underivable SIMs, by ICCID (the first fault found for each).
    pub faults: BTreeMap<u64, SimFault>,
    /// Total per derivable SIM over all its days, and the last record that added to it.
    totals: BTreeMap<u64, (Totals, RecordId)>,
}

impl Derived {
    /// Marks `iccid` underivable and drops its days (the first fault of a SIM is kept).
    /// Public for readers that assemble a derivation from rollups.
    pub fn fault(&mut self, fault: SimFault) {
        let iccid = fault.iccid;
        if self.faults.contains_key(&iccid) {
            return;
        }
        if first_report_of(iccid, fault.record) {
            tracing::warn!(
                iccid,
                record = %fault.record,
                reason = fault.reason.code(),
                detail = %fault.reason,
                "usage of a SIM cannot be derived; it is left out and listed as faulty"
            );
        } else {
            tracing::debug!(iccid, record = %fault.record, reason = fault.reason.code(), "sim still underivable");
        }
        self.faults.insert(iccid, fault);
        self.totals.remove(&iccid);
        let days: Vec<(u64, Date)> =
            self.daily.range((iccid, Date::MIN)..=(iccid, Date::MAX)).map(|(k, _)| *k).collect();
        for k in days {
            self.daily.remove(&k);
        }
    }

    /// Adds `added` to `iccid` on `date`, or marks the SIM underivable when its total would
    /// leave 64 bits. Public for readers that assemble a derivation from rollups.
    pub fn add(&mut self, iccid: u64, record: RecordId, date: Date, added: Totals) {
        if self.faults.contains_key(&iccid) {
            return;
        }
        let total = self.totals.get(&iccid).map(|(t, _)| *t).unwrap_or_default();
        match total.checked_add(&added).filter(|t| t.sum().is_some()) {
            Some(t) => {
                self.totals.insert(iccid, (t, record));
                let entry = self.daily.entry((iccid, date)).or_default();
                // Cannot fail: a day is part of the SIM's total, which fits.
                *entry = entry.checked_add(&added).unwrap_or(t);
            }
            None => self.fault(SimFault { iccid, record, reason: FaultReason::Overflow }),
        }
    }

    /// Adds another derivation (e.g. of other meters) into this one; a SIM faulty in either,
    /// or whose total leaves 64 bits together, is faulty in the result.
    pub fn absorb(&mut self, other: Derived) {
        for f in other.faults.into_values() {
            self.fault(f);
        }
        for ((iccid, date), t) in other.daily {
            // The overflow is blamed on the other part's last record of the SIM.
            let record =
                other.totals.get(&iccid).map_or(RecordId { meter_id: 0, epoch: 0, seq: 0 }, |(_, r)| *r);
            self.add(iccid, record, date, t);
        }
    }

    /// Keeps only the days (and faults) of one SIM.
    pub fn retain_sim(&mut self, sim: u64) {
        self.daily.retain(|(i, _), _| *i == sim);
        self.faults.retain(|i, _| *i == sim);
        self.totals.retain(|i, _| *i == sim);
    }

    /// The fault of `iccid`, if it is underivable.
    pub fn fault_of(&self, iccid: u64) -> Option<&SimFault> {
        self.faults.get(&iccid)
    }
}

/// The Unix second a report's usage is attributed to: network time if the device has it,
/// otherwise the gateway's receive time (whole seconds).
pub fn attribution_unix_s(time: &DeviceTime, received_ms: u64) -> u64 {
    match (time.quality(), time.unix_s()) {
        (TimeQuality::Network, Some(s)) => s,
        _ => received_ms / 1000,
    }
}

/// The UTC day a report's usage belongs to, through [`attribution_instant`] (the one
/// function every stage uses). `None` beyond the calendar's range.
pub fn attribution_date(time: &DeviceTime, received_ms: u64) -> Option<Date> {
    zone_date(attribution_instant(time, received_ms)?, &TimeZone::UTC)
}

/// Derives bytes per (ICCID, UTC day) from records in record id order (see the module docs).
/// Repeated ids are allowed and contribute nothing the second time. Only records out of order
/// fail the whole derivation; a SIM whose records cannot be counted is listed in
/// [`Derived::faults`] and every other SIM is derived exactly.
pub fn derive_daily(records: impl IntoIterator<Item = UsageRecord>) -> Result<Derived, UsageError> {
    derive_daily_in(records, &TimeZone::UTC)
}

/// Like [`derive_daily`], with days cut at midnight in `tz` instead of UTC (see "Time zones"
/// in the module docs). Which SIMs are faulty does not depend on `tz`.
pub fn derive_daily_in(
    records: impl IntoIterator<Item = UsageRecord>,
    tz: &TimeZone,
) -> Result<Derived, UsageError> {
    derive_by(records, |r| attribution_instant(&r.time, r.received_ms).and_then(|t| zone_date(t, tz)))
}

/// The running-maximum rule with days chosen by `attribute`.
fn derive_by(
    records: impl IntoIterator<Item = UsageRecord>,
    mut attribute: impl FnMut(&UsageRecord) -> Option<Date>,
) -> Result<Derived, UsageError> {
    let mut out = Derived::default();
    let mut previous: Option<RecordId> = None;
    let mut running_max = Totals::default();
    for r in records {
        match previous {
            Some(p) if r.id < p => return Err(UsageError::Unordered { previous: p, next: r.id }),
            Some(p) if (p.meter_id, p.epoch) == (r.id.meter_id, r.id.epoch) => {}
            // A new epoch (or the first record): its `used` counts from zero.
            _ => running_max = Totals::default(),
        }
        previous = Some(r.id);
        // Saturating on purpose: this is the rule's max(0, used - running max), not an
        // overflow being hidden.
        let added = Totals {
            up: r.used.up.saturating_sub(running_max.up),
            down: r.used.down.saturating_sub(running_max.down),
        };
        running_max = Totals { up: running_max.up.max(r.used.up), down: running_max.down.max(r.used.down) };
        if let Some(reason) = record_fault(&r) {
            out.fault(SimFault { iccid: r.iccid, record: r.id, reason });
            continue;
        }
        match attribute(&r) {
            Some(date) => out.add(r.iccid, r.id, date, added),
            // Unreachable below ATTRIBUTION_UNIX_S_MAX; kept a fault of the SIM, not a panic.
            None => out.fault(SimFault {
                iccid: r.iccid,
                record: r.id,
                reason: FaultReason::TimeOutOfRange { unix_s: attribution_unix_s(&r.time, r.received_ms) },
            }),
        }
    }
    Ok(out)
}

/// The instant a report's usage is attributed to: network time if the device has it,
/// otherwise the gateway's receive time (whole seconds). `None` beyond the calendar's range.
pub fn attribution_instant(time: &DeviceTime, received_ms: u64) -> Option<Timestamp> {
    let unix_s = attribution_unix_s(time, received_ms);
    Timestamp::from_second(i64::try_from(unix_s).ok()?).ok()
}

/// The civil date of `t` in `tz`, as a `time::Date`.
pub fn zone_date(t: Timestamp, tz: &TimeZone) -> Option<Date> {
    to_time_date(tz.to_datetime(t).date())
}

fn to_time_date(d: jiff::civil::Date) -> Option<Date> {
    let month = time::Month::try_from(u8::try_from(d.month()).ok()?).ok()?;
    Date::from_calendar_date(i32::from(d.year()), month, u8::try_from(d.day()).ok()?).ok()
}

fn to_civil_date(d: Date) -> Option<jiff::civil::Date> {
    let year = i16::try_from(d.year()).ok()?;
    jiff::civil::Date::new(year, i8::try_from(u8::from(d.month())).ok()?, i8::try_from(d.day()).ok()?).ok()
}

/// The first instant of `date` in `tz` (on a day whose midnight is skipped by a DST change,
/// the first instant that exists). `None` beyond the calendar's range.
pub fn day_start(date: Date, tz: &TimeZone) -> Option<Timestamp> {
    Some(to_civil_date(date)?.to_zoned(tz.clone()).ok()?.timestamp())
}

/// Resolves an IANA time zone name ("Europe/Berlin", "UTC") from the bundled tzdb.
pub fn time_zone(name: &str) -> Result<TimeZone, UsageError> {
    if name.len() > TIME_ZONE_NAME_BYTES_MAX {
        return Err(UsageError::UnknownTimeZone(format!("{} bytes", name.len())));
    }
    TimeZone::get(name).map_err(|_| UsageError::UnknownTimeZone(name.to_owned()))
}

/// An inclusive range of UTC days; an open end is unbounded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DateRange {
    /// First day included.
    pub from: Option<Date>,
    /// Last day included.
    pub to: Option<Date>,
}

impl DateRange {
    /// Whether `date` is inside the range.
    pub fn contains(&self, date: Date) -> bool {
        self.from.is_none_or(|f| date >= f) && self.to.is_none_or(|t| date <= t)
    }
}

/// The days of one SIM inside `range`, in date order.
pub fn days_of(daily: &DailyUsage, iccid: u64, range: DateRange) -> Vec<(Date, Totals)> {
    daily
        .range((iccid, Date::MIN)..=(iccid, Date::MAX))
        .filter(|((_, d), _)| range.contains(*d))
        .map(|((_, d), t)| (*d, *t))
        .collect()
}

/// Totals per SIM inside `range`, in ICCID order. SIMs with no day in the range are absent.
pub fn per_sim(daily: &DailyUsage, range: DateRange) -> Result<BTreeMap<u64, Totals>, UsageError> {
    let mut out = BTreeMap::<u64, Totals>::new();
    for ((iccid, date), t) in daily {
        if range.contains(*date) {
            let entry = out.entry(*iccid).or_default();
            *entry = entry.checked_add(t).ok_or(UsageError::Overflow { iccid: *iccid })?;
        }
    }
    Ok(out)
}

/// Longest settlement window: a day closes at most 31 days after its end.
pub const SETTLEMENT_HOURS_MAX: u32 = 24 * 31;

/// When `date` (a day in `tz`) closes: the start of the next day in `tz` plus
/// `settlement_hours`. Until then late reports may still change it silently; after, only an
/// [`Adjustment`] can. `None` beyond the calendar's range.
pub fn day_closes_at(date: Date, tz: &TimeZone, settlement_hours: u32) -> Option<Timestamp> {
    let end = day_start(date.next_day()?, tz)?;
    end.checked_add(jiff::SignedDuration::from_hours(i64::from(settlement_hours))).ok()
}

/// What the ledger holds for one closed SIM-day.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Booked {
    /// The figure settled when the day closed; never changed afterwards.
    pub settled: Totals,
    /// `settled` plus every adjustment so far.
    pub current: Totals,
    /// Adjustments so far.
    pub adjustments: u32,
}

/// A SIM-day's figure at the moment it closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SettledDay {
    /// The SIM.
    pub iccid: u64,
    /// The day, in the ledger's time zone.
    pub date: Date,
    /// The usage settled.
    pub totals: Totals,
    /// When it was settled, Unix seconds.
    pub settled_at_s: i64,
}

/// A correction to a closed SIM-day: a new record, never a change to the settled one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Adjustment {
    /// The SIM.
    pub iccid: u64,
    /// The day corrected.
    pub date: Date,
    /// 1 for the day's first adjustment, then 2, …
    pub seq: u32,
    /// Bytes added to the uplink (negative: removed).
    pub delta_up: i64,
    /// Bytes added to the downlink.
    pub delta_down: i64,
    /// When it was made, Unix seconds.
    pub made_at_s: i64,
}

/// What one settlement run books.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settlement {
    /// Days that closed since the last run.
    pub settled: Vec<SettledDay>,
    /// Corrections to days closed before.
    pub adjustments: Vec<Adjustment>,
    /// SIMs left out because their usage cannot be derived: none of their days is settled or
    /// adjusted by this run.
    pub underivable: Vec<SimFault>,
}

fn delta(now: u64, before: u64) -> Result<i64, UsageError> {
    i64::try_from(i128::from(now) - i128::from(before)).map_err(|_| UsageError::TotalOverflow)
}

/// Books what changed: every day of `fresh` (a derivation in `tz`) closed by `now` and not yet
/// in `booked` is settled; every booked day whose fresh figure differs from its current one
/// gets an adjustment for the difference (a booked day absent from `fresh` is adjusted to 0).
/// Open days are not booked, nor any day of an underivable SIM (its booked figures stay as
/// they are until its data can be derived again). Pure: the caller stores the result.
pub fn settle(
    fresh: &Derived,
    booked: &BTreeMap<(u64, Date), Booked>,
    tz: &TimeZone,
    settlement_hours: u32,
    now: Timestamp,
) -> Result<Settlement, UsageError> {
    if settlement_hours > SETTLEMENT_HOURS_MAX {
        return Err(UsageError::SettlementWindow(settlement_hours));
    }
    let mut out = Settlement { underivable: fresh.faults.values().copied().collect(), ..Default::default() };
    let now_s = now.as_second();
    let mut keys: Vec<(u64, Date)> = fresh
        .daily
        .keys()
        .chain(booked.keys().filter(|(iccid, _)| !fresh.faults.contains_key(iccid)))
        .copied()
        .collect();
    keys.sort_unstable();
    keys.dedup();
    for key in keys {
        let (iccid, date) = key;
        let closed = day_closes_at(date, tz, settlement_hours).is_some_and(|c| c <= now);
        let figure = fresh.daily.get(&key).copied().unwrap_or_default();
        match booked.get(&key) {
            None if closed => {
                out.settled.push(SettledDay { iccid, date, totals: figure, settled_at_s: now_s })
            }
            None => {}
            Some(b) if b.current != figure => out.adjustments.push(Adjustment {
                iccid,
                date,
                seq: b.adjustments.checked_add(1).ok_or(UsageError::TotalOverflow)?,
                delta_up: delta(figure.up, b.current.up)?,
                delta_down: delta(figure.down, b.current.down)?,
                made_at_s: now_s,
            }),
            Some(_) => {}
        }
    }
    Ok(out)
}

/// `booked` after `settlement` was stored: the same bookkeeping the ledger does.
pub fn apply_settlement(
    booked: &mut BTreeMap<(u64, Date), Booked>,
    settlement: &Settlement,
) -> Result<(), UsageError> {
    for s in &settlement.settled {
        booked.insert((s.iccid, s.date), Booked { settled: s.totals, current: s.totals, adjustments: 0 });
    }
    for a in &settlement.adjustments {
        let b = booked.entry((a.iccid, a.date)).or_default();
        let add = |v: u64, d: i64| u64::try_from(i128::from(v) + i128::from(d)).ok();
        b.current = Totals {
            up: add(b.current.up, a.delta_up).ok_or(UsageError::Overflow { iccid: a.iccid })?,
            down: add(b.current.down, a.delta_down).ok_or(UsageError::Overflow { iccid: a.iccid })?,
        };
        b.adjustments = a.seq;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use time::macros::date;

    const SIM_A: u64 = 8_988_280_666_000_000_001;
    const SIM_B: u64 = 8_988_280_666_000_000_002;
    /// 2026-11-24T12:00:00Z.
    const NOON_S: u64 = 1_795_521_600;
    const DAY_S: u64 = 86_400;

    fn rec(meter_id: u64, epoch: u32, seq: u32, iccid: u64, up: u64, down: u64, unix_s: u64) -> UsageRecord {
        UsageRecord {
            id: RecordId { meter_id, epoch, seq },
            iccid,
            used: Totals { up, down },
            time: DeviceTime::wall_clock(TimeQuality::Network, unix_s).unwrap(),
            received_ms: 0,
        }
    }

    /// A derivation expected to have no faulty SIM.
    fn daily(records: impl IntoIterator<Item = UsageRecord>) -> DailyUsage {
        let d = derive_daily(records).unwrap();
        assert!(d.faults.is_empty(), "{:?}", d.faults);
        d.daily
    }

    #[test]
    fn an_epoch_counts_its_highest_used_split_by_day() {
        let d = daily([
            rec(1, 0, 0, SIM_A, 0, 0, NOON_S),
            rec(1, 0, 1, SIM_A, 100, 1000, NOON_S + 60),
            rec(1, 0, 2, SIM_A, 150, 1600, NOON_S + DAY_S),
        ]);
        assert_eq!(d.len(), 2);
        assert_eq!(d[&(SIM_A, date!(2026 - 11 - 24))], Totals { up: 100, down: 1000 });
        assert_eq!(d[&(SIM_A, date!(2026 - 11 - 25))], Totals { up: 50, down: 600 });
    }

    #[test]
    fn epochs_add_up_and_base_is_not_counted() {
        // The second epoch's first report already shows 30 up: its earlier reports were lost.
        let d = daily([
            rec(1, 0, 0, SIM_A, 10, 20, NOON_S),
            rec(1, 0, 1, SIM_A, 40, 50, NOON_S),
            rec(1, 1, 0, SIM_A, 30, 5, NOON_S),
            rec(1, 1, 1, SIM_A, 35, 5, NOON_S),
        ]);
        assert_eq!(d[&(SIM_A, date!(2026 - 11 - 24))], Totals { up: 75, down: 55 });
    }

    #[test]
    fn backwards_counter_never_subtracts_and_directions_are_independent() {
        let d = daily([
            rec(1, 0, 0, SIM_A, 100, 0, NOON_S),
            rec(1, 0, 1, SIM_A, 20, 50, NOON_S),
            rec(1, 0, 2, SIM_A, 120, 40, NOON_S),
        ]);
        assert_eq!(d[&(SIM_A, date!(2026 - 11 - 24))], Totals { up: 120, down: 50 });
    }

    #[test]
    fn sim_swap_attributes_to_the_reporting_iccid_and_meters_are_separate() {
        let d = daily([
            rec(1, 0, 0, SIM_A, 10, 10, NOON_S),
            rec(1, 0, 1, SIM_B, 25, 10, NOON_S),
            rec(2, 0, 0, SIM_B, 7, 3, NOON_S),
        ]);
        assert_eq!(d[&(SIM_A, date!(2026 - 11 - 24))], Totals { up: 10, down: 10 });
        assert_eq!(d[&(SIM_B, date!(2026 - 11 - 24))], Totals { up: 22, down: 3 });
    }

    #[test]
    fn non_network_time_uses_the_receive_time() {
        let mut r = rec(1, 0, 0, SIM_A, 5, 5, NOON_S);
        r.received_ms = (NOON_S + 3 * DAY_S) * 1000;
        for time in
            [DeviceTime::uptime(17).unwrap(), DeviceTime::wall_clock(TimeQuality::Rtc, NOON_S).unwrap()]
        {
            r.time = time;
            let d = daily([r]);
            assert_eq!(d.keys().next(), Some(&(SIM_A, date!(2026 - 11 - 27))));
        }
        // A receive time beyond the calendar makes its SIM underivable, never the others.
        r.received_ms = u64::MAX;
        let other = rec(2, 0, 0, SIM_B, 1, 2, NOON_S);
        let d = derive_daily([r, other]).unwrap();
        assert_eq!(d.daily.keys().collect::<Vec<_>>(), vec![&(SIM_B, date!(2026 - 11 - 24))]);
        assert_eq!(d.faults[&SIM_A].reason, FaultReason::TimeOutOfRange { unix_s: u64::MAX / 1000 });
        assert_eq!(d.faults[&SIM_A].record, r.id);
        // Inside jiff's range but beyond the attribution ceiling: faulty as well, whatever zone.
        r.received_ms = (ATTRIBUTION_UNIX_S_MAX + 1) * 1000;
        let d = derive_daily_in([r, other], &time_zone("Pacific/Kiritimati").unwrap()).unwrap();
        assert!(d.fault_of(SIM_A).is_some());
        assert_eq!(d.daily.len(), 1);
    }

    #[test]
    fn idle_days_show_as_zero_and_duplicates_add_nothing() {
        let a = rec(1, 0, 3, SIM_A, 9, 9, NOON_S);
        let d = daily([a, a, rec(1, 0, 4, SIM_A, 9, 9, NOON_S + DAY_S)]);
        assert_eq!(d[&(SIM_A, date!(2026 - 11 - 24))], Totals { up: 9, down: 9 });
        assert_eq!(d[&(SIM_A, date!(2026 - 11 - 25))], Totals::default());
    }

    #[test]
    fn unordered_input_is_an_error_and_overflow_a_fault_of_its_sim() {
        let e = derive_daily([rec(1, 0, 1, SIM_A, 0, 0, NOON_S), rec(1, 0, 0, SIM_A, 0, 0, NOON_S)]);
        assert!(matches!(e, Err(UsageError::Unordered { .. })));
        // Above the per-epoch ceiling: the record alone makes its SIM underivable.
        let d = derive_daily([
            rec(1, 0, 0, SIM_A, u64::MAX, 0, NOON_S),
            rec(2, 0, 0, SIM_A, 1, 0, NOON_S),
            rec(3, 0, 0, SIM_B, 4, 4, NOON_S),
        ])
        .unwrap();
        assert_eq!(d.faults[&SIM_A].reason, FaultReason::CounterCeiling { up: u64::MAX, down: 0 });
        assert_eq!(d.daily.len(), 1);
        assert_eq!(d.daily[&(SIM_B, date!(2026 - 11 - 24))], Totals { up: 4, down: 4 });
        // Within the ceiling, but more epochs than 64 bits hold: the SIM's total overflows.
        let max = USED_BYTES_PER_EPOCH_MAX;
        let mut records: Vec<UsageRecord> =
            (0..1u32 << 14).map(|e| rec(1, e, 0, SIM_A, max, 0, NOON_S)).collect();
        records.push(rec(3, 0, 0, SIM_B, 4, 4, NOON_S));
        let d = derive_daily(records).unwrap();
        assert_eq!(d.faults[&SIM_A].reason, FaultReason::Overflow);
        assert_eq!(d.faults[&SIM_A].record, RecordId { meter_id: 1, epoch: (1 << 14) - 1, seq: 0 });
        assert_eq!(d.daily.keys().collect::<Vec<_>>(), vec![&(SIM_B, date!(2026 - 11 - 24))]);
        // Up and down that fit alone but not together.
        let half = (1u32 << 13) + 1;
        let d = derive_daily((0..half).map(|e| rec(1, e, 0, SIM_A, max, max, NOON_S))).unwrap();
        assert_eq!(d.faults[&SIM_A].reason, FaultReason::Overflow);
        assert!(d.daily.is_empty());
    }

    #[test]
    fn absorbing_parts_keeps_faults_and_sums() {
        let mut a = derive_daily([rec(1, 0, 0, SIM_A, 10, 10, NOON_S)]).unwrap();
        let b = derive_daily([rec(2, 0, 0, SIM_A, 5, 5, NOON_S), rec(2, 0, 1, SIM_B, u64::MAX, 0, NOON_S)])
            .unwrap();
        a.absorb(b);
        assert_eq!(a.daily[&(SIM_A, date!(2026 - 11 - 24))], Totals { up: 15, down: 15 });
        assert!(a.fault_of(SIM_B).is_some());
        // SIM A's days leave with it when another part makes it faulty.
        a.absorb(derive_daily([rec(3, 0, 0, SIM_A, u64::MAX, 0, NOON_S)]).unwrap());
        assert!(a.daily.is_empty());
        assert_eq!(a.faults.len(), 2);
    }

    #[test]
    fn ranges_and_per_sim_totals() {
        let d = daily([
            rec(1, 0, 0, SIM_A, 10, 1, NOON_S),
            rec(1, 0, 1, SIM_A, 30, 2, NOON_S + DAY_S),
            rec(1, 0, 2, SIM_A, 60, 3, NOON_S + 2 * DAY_S),
            rec(2, 0, 0, SIM_B, 5, 5, NOON_S + DAY_S),
        ]);
        let mid = DateRange { from: Some(date!(2026 - 11 - 25)), to: Some(date!(2026 - 11 - 25)) };
        assert_eq!(days_of(&d, SIM_A, mid), vec![(date!(2026 - 11 - 25), Totals { up: 20, down: 1 })]);
        assert_eq!(days_of(&d, SIM_A, DateRange::default()).len(), 3);
        let from = DateRange { from: Some(date!(2026 - 11 - 25)), to: None };
        let sims = per_sim(&d, from).unwrap();
        assert_eq!(sims[&SIM_A], Totals { up: 50, down: 2 });
        assert_eq!(sims[&SIM_B], Totals { up: 5, down: 5 });
        let before = DateRange { from: None, to: Some(date!(2026 - 11 - 23)) };
        assert!(per_sim(&d, before).unwrap().is_empty());
    }

    /// Distinct records across a few meters and epochs, with arbitrary (even decreasing) counters.
    fn arb_records() -> impl Strategy<Value = Vec<UsageRecord>> {
        proptest::collection::vec(
            (
                0u64..3,
                0u32..3,
                0u32..12,
                0u64..4,
                0u64..1 << 40,
                0u64..1 << 40,
                0u64..5 * DAY_S,
                any::<bool>(),
            ),
            0..60,
        )
        .prop_map(|v| {
            let mut by_id = BTreeMap::new();
            for (meter, epoch, seq, sim, up, down, offset_s, network) in v {
                let mut r = rec(meter, epoch, seq, SIM_A + sim, up, down, NOON_S + offset_s);
                if !network {
                    r.time = DeviceTime::uptime(u32::try_from(offset_s).unwrap()).unwrap();
                    r.received_ms = (NOON_S + offset_s) * 1000;
                }
                by_id.entry(r.id).or_insert(r);
            }
            by_id.into_values().collect()
        })
    }

    /// The model: the usage of an epoch is its highest `used`, per direction.
    fn model_total(records: &[UsageRecord]) -> Totals {
        let mut max = BTreeMap::<(u64, u32), Totals>::new();
        for r in records {
            let m = max.entry((r.id.meter_id, r.id.epoch)).or_default();
            *m = Totals { up: m.up.max(r.used.up), down: m.down.max(r.used.down) };
        }
        max.values().fold(Totals::default(), |a, t| a.checked_add(t).unwrap())
    }

    fn derived_total(records: &[UsageRecord]) -> Totals {
        let mut sorted = records.to_vec();
        sorted.sort_by_key(|r| r.id);
        let d = daily(sorted);
        d.values().fold(Totals::default(), |a, t| a.checked_add(t).unwrap())
    }

    fn berlin() -> TimeZone {
        time_zone("Europe/Berlin").unwrap()
    }

    #[test]
    fn zone_days_follow_dst_in_berlin() {
        // 2026-03-29 has 23 hours in Berlin, 2026-10-25 has 25.
        let at = |s: &str| {
            rec(1, 0, 0, SIM_A, 1, 1, u64::try_from(s.parse::<Timestamp>().unwrap().as_second()).unwrap())
        };
        let cases = [
            ("2026-03-28T22:59:59Z", date!(2026 - 03 - 28)),
            ("2026-03-28T23:00:00Z", date!(2026 - 03 - 29)),
            ("2026-03-29T21:59:59Z", date!(2026 - 03 - 29)),
            ("2026-03-29T22:00:00Z", date!(2026 - 03 - 30)),
            ("2026-10-24T22:00:00Z", date!(2026 - 10 - 25)),
            ("2026-10-25T22:59:59Z", date!(2026 - 10 - 25)),
            ("2026-10-25T23:00:00Z", date!(2026 - 10 - 26)),
        ];
        for (t, want) in cases {
            let d = derive_daily_in([at(t)], &berlin()).unwrap().daily;
            assert_eq!(d.keys().next(), Some(&(SIM_A, want)), "{t}");
        }
        let utc = derive_daily_in([at("2026-03-28T23:00:00Z")], &TimeZone::UTC).unwrap();
        assert_eq!(utc, derive_daily([at("2026-03-28T23:00:00Z")]).unwrap());
        let s = |d: Date| day_start(d, &berlin()).unwrap();
        assert_eq!(s(date!(2026 - 03 - 30)).as_second() - s(date!(2026 - 03 - 29)).as_second(), 23 * 3600);
        assert_eq!(s(date!(2026 - 10 - 26)).as_second() - s(date!(2026 - 10 - 25)).as_second(), 25 * 3600);
        assert_eq!(
            day_closes_at(date!(2026 - 03 - 29), &berlin(), 48).unwrap(),
            "2026-03-31T22:00:00Z".parse::<Timestamp>().unwrap()
        );
        assert!(matches!(time_zone("Mars/Olympus"), Err(UsageError::UnknownTimeZone(_))));
    }

    #[test]
    fn a_late_report_adjusts_closed_days_and_never_rewrites_them() {
        let tz = berlin();
        let day1 = NOON_S; // 2026-11-24
        let mut booked = BTreeMap::new();
        // seq 0 and seq 2 arrive; seq 1 (day 1) is late.
        let early = [rec(1, 0, 0, SIM_A, 100, 0, day1), rec(1, 0, 2, SIM_A, 300, 0, day1 + DAY_S)];
        let fresh = derive_daily_in(early, &tz).unwrap();
        let t = |s: u64| Timestamp::from_second(i64::try_from(s).unwrap()).unwrap();
        // Day 1 closes 48 h after its end in Berlin: at noon on day 3 nothing has closed.
        let s = settle(&fresh, &booked, &tz, 48, t(day1 + 2 * DAY_S)).unwrap();
        assert!(s.settled.is_empty());
        let s = settle(&fresh, &booked, &tz, 48, t(day1 + 4 * DAY_S)).unwrap();
        assert_eq!(s.settled.len(), 2);
        apply_settlement(&mut booked, &s).unwrap();
        let before = booked.clone();
        // The late report moves 100 bytes from day 2 to day 1 (the running maximum in id order).
        let all = [early[0], rec(1, 0, 1, SIM_A, 200, 0, day1), early[1]];
        let fresh = derive_daily_in(all, &tz).unwrap();
        let s = settle(&fresh, &booked, &tz, 48, t(day1 + 5 * DAY_S)).unwrap();
        assert!(s.settled.is_empty());
        let deltas: Vec<(Date, i64, u32)> =
            s.adjustments.iter().map(|a| (a.date, a.delta_up, a.seq)).collect();
        assert_eq!(deltas, vec![(date!(2026 - 11 - 24), 100, 1), (date!(2026 - 11 - 25), -100, 1)]);
        apply_settlement(&mut booked, &s).unwrap();
        for (k, b) in &booked {
            assert_eq!(b.settled, before[k].settled, "a settled figure changed");
            assert_eq!(b.current, fresh.daily[k]);
        }
        // Nothing new: nothing booked.
        assert_eq!(settle(&fresh, &booked, &tz, 48, t(day1 + 6 * DAY_S)).unwrap(), Settlement::default());
        assert!(matches!(
            settle(&fresh, &booked, &tz, SETTLEMENT_HOURS_MAX + 1, t(0)),
            Err(UsageError::SettlementWindow(_))
        ));
    }

    /// Normal records of four meters (meter m reports SIM_A + m only, so each SIM's figures
    /// come from its own records alone) mixed with adversarial ones: counters at, above and
    /// far above the ceiling, receive times at the edges of and beyond the calendar, and
    /// optionally one meter flooding thousands of epochs at the ceiling.
    fn arb_adversarial() -> impl Strategy<Value = Vec<UsageRecord>> {
        let normal =
            (0u64..4, 0u32..3, 0u32..8, 0u64..1 << 40, 0u64..1 << 40, 0u64..5 * DAY_S, any::<bool>());
        let counter = prop_oneof![
            0u64..1 << 40,
            Just(USED_BYTES_PER_EPOCH_MAX),
            Just(USED_BYTES_PER_EPOCH_MAX + 1),
            Just(u64::MAX),
        ];
        let received_ms = prop_oneof![
            NOON_S * 1000..(NOON_S + 5 * DAY_S) * 1000,
            Just(0),
            Just(ATTRIBUTION_UNIX_S_MAX * 1000 + 999),
            Just((ATTRIBUTION_UNIX_S_MAX + 1) * 1000),
            Just(253_402_300_799_000), // 9999-12-31T23:59:59Z, jiff's last UTC second
            Just(i64::MAX as u64),
            Just(u64::MAX),
        ];
        let adversarial = (0u64..4, 0u32..3, 0u32..8, counter.clone(), counter, received_ms);
        (
            proptest::collection::vec(normal, 0..40),
            proptest::collection::vec(adversarial, 0..4),
            proptest::option::of((0u64..4, (1u32 << 13) - 2..(1u32 << 13) + 2)),
        )
            .prop_map(|(normal, adversarial, flood)| {
                let mut by_id = BTreeMap::new();
                for (meter, epoch, seq, up, down, offset_s, network) in normal {
                    let mut r = rec(meter, epoch, seq, SIM_A + meter, up, down, NOON_S + offset_s);
                    if !network {
                        r.time = DeviceTime::uptime(u32::try_from(offset_s).unwrap()).unwrap();
                        r.received_ms = (NOON_S + offset_s) * 1000;
                    }
                    by_id.entry(r.id).or_insert(r);
                }
                for (meter, epoch, seq, up, down, received_ms) in adversarial {
                    let mut r = rec(meter, epoch, seq, SIM_A + meter, up, down, NOON_S);
                    r.time = DeviceTime::uptime(60).unwrap();
                    r.received_ms = received_ms;
                    by_id.insert(r.id, r);
                }
                if let Some((meter, epochs)) = flood {
                    let max = USED_BYTES_PER_EPOCH_MAX;
                    for e in 0..epochs {
                        let r = rec(meter, 100 + e, 0, SIM_A + meter, max, max, NOON_S);
                        by_id.insert(r.id, r);
                    }
                }
                by_id.into_values().collect()
            })
    }

    /// The model of one SIM from its own records alone, in 128-bit arithmetic and plain
    /// day numbers (no date library): its UTC days, or `None` when it is underivable.
    fn model_sim(records: &[UsageRecord]) -> Option<BTreeMap<Date, Totals>> {
        let mut max = BTreeMap::<(u64, u32), (u64, u64)>::new();
        let mut days = BTreeMap::<u64, (u128, u128)>::new();
        let (mut up, mut down) = (0u128, 0u128);
        for r in records {
            let unix_s = match (r.time.quality(), r.time.unix_s()) {
                (TimeQuality::Network, Some(s)) => s,
                _ => r.received_ms / 1000,
            };
            if unix_s > ATTRIBUTION_UNIX_S_MAX
                || r.used.up > USED_BYTES_PER_EPOCH_MAX
                || r.used.down > USED_BYTES_PER_EPOCH_MAX
            {
                return None;
            }
            let m = max.entry((r.id.meter_id, r.id.epoch)).or_default();
            let add =
                (u128::from(r.used.up.saturating_sub(m.0)), u128::from(r.used.down.saturating_sub(m.1)));
            *m = (m.0.max(r.used.up), m.1.max(r.used.down));
            let d = days.entry(unix_s / DAY_S).or_default();
            *d = (d.0 + add.0, d.1 + add.1);
            (up, down) = (up + add.0, down + add.1);
        }
        if up + down > u128::from(u64::MAX) {
            return None;
        }
        let date = |n: u64| Date::from_julian_day(2_440_588 + i32::try_from(n).unwrap()).unwrap();
        Some(
            days.into_iter()
                .map(|(n, (u, d))| {
                    (date(n), Totals { up: u64::try_from(u).unwrap(), down: u64::try_from(d).unwrap() })
                })
                .collect(),
        )
    }

    proptest! {
        #[test]
        fn total_is_the_sum_of_epoch_maxima_whatever_was_lost_duplicated_or_reordered(
            (records, received) in (
                arb_records(),
                proptest::collection::vec(any::<bool>(), 60),
                proptest::collection::vec(any::<proptest::sample::Index>(), 0..10),
            )
                .prop_flat_map(|(records, keep, dups)| {
                    // What reaches the endpoint: some reports lost, some repeated, in any order.
                    let mut received: Vec<UsageRecord> =
                        records.iter().zip(&keep).filter(|(_, k)| **k).map(|(r, _)| *r).collect();
                    if !records.is_empty() {
                        received.extend(dups.iter().map(|i| records[i.index(records.len())]));
                    }
                    (Just(records), Just(received).prop_shuffle())
                })
        ) {
            let all = derived_total(&records);
            prop_assert_eq!(all, model_total(&records));
            let got = derived_total(&received);
            prop_assert_eq!(got, model_total(&received));
            // Losing reports can only make the figures less fresh, never larger.
            prop_assert!(got.up <= all.up && got.down <= all.down);
        }

        #[test]
        fn every_derivable_sim_is_exact_and_the_others_are_listed(records in arb_adversarial()) {
            let d = derive_daily(records.clone()).unwrap();
            for sim in (0..4).map(|m| SIM_A + m) {
                let own: Vec<UsageRecord> = records.iter().filter(|r| r.iccid == sim).copied().collect();
                let got: BTreeMap<Date, Totals> =
                    days_of(&d.daily, sim, DateRange::default()).into_iter().collect();
                match model_sim(&own) {
                    Some(want) => {
                        prop_assert!(d.fault_of(sim).is_none(), "{:?}", d.fault_of(sim));
                        prop_assert_eq!(got, want);
                    }
                    None => {
                        prop_assert!(got.is_empty());
                        let f = d.fault_of(sim);
                        prop_assert!(f.is_some_and(|f| own.iter().any(|r| r.id == f.record)), "{:?}", f);
                    }
                }
            }
            // Which SIMs are faulty does not depend on the zone; every other SIM's total is
            // the same in any zone, and any range of its days sums without overflow.
            let berlin = derive_daily_in(records, &berlin()).unwrap();
            prop_assert_eq!(berlin.faults.keys().collect::<Vec<_>>(), d.faults.keys().collect::<Vec<_>>());
            prop_assert_eq!(per_sim(&berlin.daily, DateRange::default()).unwrap(), per_sim(&d.daily, DateRange::default()).unwrap());
            for t in per_sim(&d.daily, DateRange::default()).unwrap().values() {
                prop_assert!(t.sum().is_some());
            }
        }

        #[test]
        fn per_sim_totals_partition_the_total(records in arb_records()) {
            let d = daily(records.clone());
            let sims = per_sim(&d, DateRange::default()).unwrap();
            let sum = sims.values().fold(Totals::default(), |a, t| a.checked_add(t).unwrap());
            prop_assert_eq!(sum, model_total(&records));
            for (iccid, t) in &sims {
                let days = days_of(&d, *iccid, DateRange::default());
                let by_day = days.iter().fold(Totals::default(), |a, (_, t)| a.checked_add(t).unwrap());
                prop_assert_eq!(by_day, *t);
            }
        }

        #[test]
        fn settlement_books_every_change_as_an_adjustment_and_never_rewrites(
            records in arb_records(),
            cuts in proptest::collection::vec(0usize..60, 1..5),
            hours in 0u32..72,
        ) {
            let tz = berlin();
            let mut arrived = Vec::new();
            let mut booked = BTreeMap::<(u64, Date), Booked>::new();
            let mut cuts = cuts;
            cuts.sort_unstable();
            cuts.push(records.len());
            let mut start = 0;
            for (run, cut) in cuts.into_iter().enumerate() {
                let cut = cut.min(records.len()).max(start);
                // Records arrive in any order: a later batch may hold lower ids.
                arrived.extend(records[start..cut].iter().rev().copied());
                start = cut;
                let mut sorted = arrived.clone();
                sorted.sort_by_key(|r| r.id);
                let fresh = derive_daily_in(sorted, &tz).unwrap();
                let now = Timestamp::from_second(i64::try_from(NOON_S + (run as u64 + 1) * DAY_S).unwrap()).unwrap();
                let before = booked.clone();
                let s = settle(&fresh, &booked, &tz, hours, now).unwrap();
                apply_settlement(&mut booked, &s).unwrap();
                for (k, b) in &booked {
                    if let Some(old) = before.get(k) { prop_assert_eq!(b.settled, old.settled); }
                    prop_assert_eq!(b.current, fresh.daily.get(k).copied().unwrap_or_default());
                    prop_assert!(day_closes_at(k.1, &tz, hours).unwrap() <= now);
                }
                for k in fresh.daily.keys() {
                    let closed = day_closes_at(k.1, &tz, hours).unwrap() <= now;
                    prop_assert_eq!(closed, booked.contains_key(k));
                }
            }
        }
    }
}
