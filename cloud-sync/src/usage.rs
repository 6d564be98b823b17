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
use time::{Date, OffsetDateTime};

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

/// Why usage could not be derived. None is recoverable by retrying: the input must change.
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

/// The UTC day a report's usage belongs to: network time if the device has it, otherwise the
/// gateway's receive time. `None` when the receive time is beyond the calendar's range.
pub fn attribution_date(time: &DeviceTime, received_ms: u64) -> Option<Date> {
    let unix_s = match (time.quality(), time.unix_s()) {
        (TimeQuality::Network, Some(s)) => s,
        _ => received_ms / 1000,
    };
    let unix_s = i64::try_from(unix_s).ok()?;
    OffsetDateTime::from_unix_timestamp(unix_s).ok().map(|t| t.date())
}

/// Derives bytes per (ICCID, day) from records in record id order (see the module docs).
/// Repeated ids are allowed and contribute nothing the second time.
pub fn derive_daily(records: impl IntoIterator<Item = UsageRecord>) -> Result<DailyUsage, UsageError> {
    derive_by(records, |r| attribution_date(&r.time, r.received_ms))
}

/// Like [`derive_daily`], with days cut at midnight in `tz` instead of UTC (see "Time zones"
/// in the module docs).
pub fn derive_daily_in(
    records: impl IntoIterator<Item = UsageRecord>,
    tz: &TimeZone,
) -> Result<DailyUsage, UsageError> {
    derive_by(records, |r| attribution_instant(&r.time, r.received_ms).and_then(|t| zone_date(t, tz)))
}

/// The running-maximum rule with days chosen by `attribute`.
fn derive_by(
    records: impl IntoIterator<Item = UsageRecord>,
    mut attribute: impl FnMut(&UsageRecord) -> Option<Date>,
) -> Result<DailyUsage, UsageError> {
    let mut out = DailyUsage::new();
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
        let date =
            attribute(&r).ok_or(UsageError::TimeOutOfRange { id: r.id, received_ms: r.received_ms })?;
        let entry = out.entry((r.iccid, date)).or_default();
        *entry = entry.checked_add(&added).ok_or(UsageError::Overflow { iccid: r.iccid })?;
    }
    Ok(out)
}

/// The instant a report's usage is attributed to: network time if the device has it,
/// otherwise the gateway's receive time (whole seconds). `None` beyond the calendar's range.
pub fn attribution_instant(time: &DeviceTime, received_ms: u64) -> Option<Timestamp> {
    let unix_s = match (time.quality(), time.unix_s()) {
        (TimeQuality::Network, Some(s)) => s,
        _ => received_ms / 1000,
    };
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

    #[test]
    fn an_epoch_counts_its_highest_used_split_by_day() {
        let d = derive_daily([
            rec(1, 0, 0, SIM_A, 0, 0, NOON_S),
            rec(1, 0, 1, SIM_A, 100, 1000, NOON_S + 60),
            rec(1, 0, 2, SIM_A, 150, 1600, NOON_S + DAY_S),
        ])
        .unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[&(SIM_A, date!(2026 - 11 - 24))], Totals { up: 100, down: 1000 });
        assert_eq!(d[&(SIM_A, date!(2026 - 11 - 25))], Totals { up: 50, down: 600 });
    }

    #[test]
    fn epochs_add_up_and_base_is_not_counted() {
        // The second epoch's first report already shows 30 up: its earlier reports were lost.
        let d = derive_daily([
            rec(1, 0, 0, SIM_A, 10, 20, NOON_S),
            rec(1, 0, 1, SIM_A, 40, 50, NOON_S),
            rec(1, 1, 0, SIM_A, 30, 5, NOON_S),
            rec(1, 1, 1, SIM_A, 35, 5, NOON_S),
        ])
        .unwrap();
        assert_eq!(d[&(SIM_A, date!(2026 - 11 - 24))], Totals { up: 75, down: 55 });
    }

    #[test]
    fn backwards_counter_never_subtracts_and_directions_are_independent() {
        let d = derive_daily([
            rec(1, 0, 0, SIM_A, 100, 0, NOON_S),
            rec(1, 0, 1, SIM_A, 20, 50, NOON_S),
            rec(1, 0, 2, SIM_A, 120, 40, NOON_S),
        ])
        .unwrap();
        assert_eq!(d[&(SIM_A, date!(2026 - 11 - 24))], Totals { up: 120, down: 50 });
    }

    #[test]
    fn sim_swap_attributes_to_the_reporting_iccid_and_meters_are_separate() {
        let d = derive_daily([
            rec(1, 0, 0, SIM_A, 10, 10, NOON_S),
            rec(1, 0, 1, SIM_B, 25, 10, NOON_S),
            rec(2, 0, 0, SIM_B, 7, 3, NOON_S),
        ])
        .unwrap();
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
            let d = derive_daily([r]).unwrap();
            assert_eq!(d.keys().next(), Some(&(SIM_A, date!(2026 - 11 - 27))));
        }
        r.received_ms = u64::MAX;
        assert!(matches!(derive_daily([r]), Err(UsageError::TimeOutOfRange { .. })));
    }

    #[test]
    fn idle_days_show_as_zero_and_duplicates_add_nothing() {
        let a = rec(1, 0, 3, SIM_A, 9, 9, NOON_S);
        let d = derive_daily([a, a, rec(1, 0, 4, SIM_A, 9, 9, NOON_S + DAY_S)]).unwrap();
        assert_eq!(d[&(SIM_A, date!(2026 - 11 - 24))], Totals { up: 9, down: 9 });
        assert_eq!(d[&(SIM_A, date!(2026 - 11 - 25))], Totals::default());
    }

    #[test]
    fn unordered_input_and_overflow_are_errors() {
        let e = derive_daily([rec(1, 0, 1, SIM_A, 0, 0, NOON_S), rec(1, 0, 0, SIM_A, 0, 0, NOON_S)]);
        assert!(matches!(e, Err(UsageError::Unordered { .. })));
        let e = derive_daily([rec(1, 0, 0, SIM_A, u64::MAX, 0, NOON_S), rec(2, 0, 0, SIM_A, 1, 0, NOON_S)]);
        assert_eq!(e, Err(UsageError::Overflow { iccid: SIM_A }));
    }

    #[test]
    fn ranges_and_per_sim_totals() {
        let d = derive_daily([
            rec(1, 0, 0, SIM_A, 10, 1, NOON_S),
            rec(1, 0, 1, SIM_A, 30, 2, NOON_S + DAY_S),
            rec(1, 0, 2, SIM_A, 60, 3, NOON_S + 2 * DAY_S),
            rec(2, 0, 0, SIM_B, 5, 5, NOON_S + DAY_S),
        ])
        .unwrap();
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
        let d = derive_daily(sorted).unwrap();
        d.values().fold(Totals::default(), |a, t| a.checked_add(t).unwrap())
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
        fn per_sim_totals_partition_the_total(records in arb_records()) {
            let d = derive_daily(records.clone()).unwrap();
            let sims = per_sim(&d, DateRange::default()).unwrap();
            let sum = sims.values().fold(Totals::default(), |a, t| a.checked_add(t).unwrap());
            prop_assert_eq!(sum, model_total(&records));
            for (iccid, t) in &sims {
                let days = days_of(&d, *iccid, DateRange::default());
                let by_day = days.iter().fold(Totals::default(), |a, (_, t)| a.checked_add(t).unwrap());
                prop_assert_eq!(by_day, *t);
            }
        }
    }
}
