//! Rollups: usage per SIM and [`BUCKET_S`]-second bucket, kept up to date one record at a
//! time, so that reads cost what they return instead of re-deriving all history.
//!
//! # What is kept
//!
//! Per SIM and bucket: bytes up and down and how many records were attributed there (a SIM
//! that reported in a bucket but used nothing still shows, as in the full derivation). Per
//! record of an epoch, its **running maximum through it** (`max_through`: the highest `used`
//! of the epoch's records up to and including it, in seq order). The contribution of a record
//! is then `max_through − max_through of its predecessor`, per direction: exactly the
//! running-maximum rule of [`crate::usage`], written so that it telescopes.
//!
//! # Inserting a record
//!
//! [`plan_insert`] takes the new record, the `max_through` of its predecessor in the epoch
//! (zero for the first) and, lazily, the records after it in seq order. It reads later records
//! only while the new record raises their running maximum: in order arrival (the new record
//! has the highest seq) reads none and costs O(1); a late record costs the records it
//! changes. It returns the new record's `max_through`, the later records whose `max_through`
//! changed, and signed deltas for the buckets involved. Applying every plan, in any arrival
//! order, gives the same buckets as [`crate::usage::derive_daily_in`] over all records
//! (property-tested below against it as the model).
//!
//! # Days from buckets
//!
//! A day in a zone is the buckets from its first instant to the next day's. That is exact
//! when both instants fall on bucket boundaries, which holds for every offset that is a whole
//! number of quarter hours (all of today's zones, including +05:45, +08:45, +12:45 and −03:30,
//! and every DST change). [`day_on_buckets`] says whether it holds for a date; where it does
//! not (offsets of seconds, e.g. before 1972 in Africa/Monrovia), a reader derives that day
//! from the records. Faulty records (see [`crate::usage::record_fault`]) raise the running
//! maximum but are attributed to no bucket: their SIM is underivable, as in the derivation.

use countersign_meter::Totals;
use jiff::Timestamp;
use time::Date;

use crate::usage::{attribution_unix_s, day_start, record_fault, zone_date, TimeZone, UsageRecord};

/// Width of a rollup bucket, seconds: a quarter hour, the largest width on which every
/// current zone's midnight falls.
pub const BUCKET_S: u64 = 900;

/// The bucket of a Unix second.
pub fn bucket_of(unix_s: u64) -> u64 {
    unix_s / BUCKET_S
}

/// The first Unix second of a bucket.
pub fn bucket_start_s(bucket: u64) -> u64 {
    bucket.saturating_mul(BUCKET_S)
}

/// The date in `tz` of every second of `bucket`, when [`day_on_buckets`] holds for it.
pub fn bucket_date(bucket: u64, tz: &TimeZone) -> Option<Date> {
    let t = Timestamp::from_second(i64::try_from(bucket_start_s(bucket)).ok()?).ok()?;
    zone_date(t, tz)
}

/// The buckets of `date` in `tz` (from its first instant up to the next day's), when both
/// fall on bucket boundaries; `None` when they do not, or beyond the calendar.
pub fn day_on_buckets(date: Date, tz: &TimeZone) -> Option<std::ops::Range<u64>> {
    let start = u64::try_from(day_start(date, tz)?.as_second()).ok()?;
    let end = u64::try_from(day_start(date.next_day()?, tz)?.as_second()).ok()?;
    (start % BUCKET_S == 0 && end % BUCKET_S == 0).then(|| bucket_of(start)..bucket_of(end))
}

/// One record of an epoch, as the rollup sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochEntry {
    /// Its sequence number in the epoch.
    pub seq: u32,
    /// The SIM it names.
    pub iccid: u64,
    /// Bytes counted in the epoch up to it.
    pub used: Totals,
    /// The bucket its usage is attributed to; `None` for a faulty record, which raises the
    /// running maximum and is attributed nowhere.
    pub bucket: Option<u64>,
}

impl EpochEntry {
    /// The rollup's view of a stored record.
    pub fn of(r: &UsageRecord) -> Self {
        let bucket = record_fault(r).is_none().then(|| bucket_of(attribution_unix_s(&r.time, r.received_ms)));
        Self { seq: r.id.seq, iccid: r.iccid, used: r.used, bucket }
    }
}

/// A record of an epoch as stored beside the rollups: the entry and its running maximum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Booked {
    /// The record.
    pub entry: EpochEntry,
    /// The highest `used` of the epoch's records up to and including it, per direction.
    pub max_through: Totals,
}

/// A change to one SIM's bucket. Deltas are signed: a late record can take bytes from a later
/// record it precedes. Each side fits: a contribution is at most one record's `used`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketDelta {
    /// The record (of the epoch being planned) whose contribution changes.
    pub seq: u32,
    /// The SIM.
    pub iccid: u64,
    /// The bucket.
    pub bucket: u64,
    /// Bytes up to add (may be negative).
    pub up: i64,
    /// Bytes down to add (may be negative).
    pub down: i64,
    /// Records to add to the bucket's count (0 or 1).
    pub records: u32,
}

/// What inserting one record changes; the caller writes all of it atomically with the record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InsertPlan {
    /// The new record's running maximum.
    pub max_through: Totals,
    /// Later records of the epoch whose running maximum rises, with the new value.
    pub raised: Vec<(u32, Totals)>,
    /// Bucket changes, in the order found (one per affected record; the caller may merge).
    pub deltas: Vec<BucketDelta>,
}

/// Why a plan cannot be made: the inputs contradict the rollup's invariants (a later record
/// whose stored running maximum is below its own `used` or its predecessor's). Stored state
/// is corrupt; not recoverable by retrying.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("rollup state of seq {seq} is inconsistent with its epoch")]
pub struct RollupError {
    /// The record whose stored state is wrong.
    pub seq: u32,
}

fn raise(m: Totals, used: Totals) -> Totals {
    Totals { up: m.up.max(used.up), down: m.down.max(used.down) }
}

/// `(now − before) − (was − was_before)` per direction, each difference a contribution.
fn change(now: Totals, before: Totals, was: Totals, was_before: Totals) -> Option<(i64, i64)> {
    let side = |n: u64, b: u64, w: u64, wb: u64| -> Option<i64> {
        let new = i64::try_from(n.checked_sub(b)?).ok()?;
        let old = i64::try_from(w.checked_sub(wb)?).ok()?;
        new.checked_sub(old)
    };
    Some((
        side(now.up, before.up, was.up, was_before.up)?,
        side(now.down, before.down, was.down, was_before.down)?,
    ))
}

/// Plans the insert of `new` into its epoch (see the module docs). `before`: the running
/// maximum of its predecessor (zero when it has none); `after`: the epoch's later records in
/// seq order, read only as far as the insert changes them.
pub fn plan_insert(
    new: EpochEntry,
    before: Totals,
    after: impl IntoIterator<Item = Booked>,
) -> Result<InsertPlan, RollupError> {
    let max_through = raise(before, new.used);
    let mut plan = InsertPlan { max_through, ..InsertPlan::default() };
    if let Some(bucket) = new.bucket {
        let (up, down) = change(max_through, before, Totals::default(), Totals::default())
            .ok_or(RollupError { seq: new.seq })?;
        plan.deltas.push(BucketDelta { seq: new.seq, iccid: new.iccid, bucket, up, down, records: 1 });
    }
    // Walking forward: the predecessor's running maximum before and after the insert.
    let (mut old_prev, mut new_prev) = (before, max_through);
    let mut after = after.into_iter();
    // Once the predecessor's maximum is what it was, nothing later changes: stop reading.
    while old_prev != new_prev {
        let Some(later) = after.next() else { break };
        let old = later.max_through;
        if old != raise(old_prev, later.entry.used) {
            return Err(RollupError { seq: later.entry.seq });
        }
        let now = raise(new_prev, later.entry.used);
        if now != old {
            plan.raised.push((later.entry.seq, now));
        }
        if let Some(bucket) = later.entry.bucket {
            let (up, down) =
                change(now, new_prev, old, old_prev).ok_or(RollupError { seq: later.entry.seq })?;
            if (up, down) != (0, 0) {
                plan.deltas.push(BucketDelta {
                    seq: later.entry.seq,
                    iccid: later.entry.iccid,
                    bucket,
                    up,
                    down,
                    records: 0,
                });
            }
        }
        (old_prev, new_prev) = (old, now);
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use countersign_meter::{DeviceTime, RecordId, TimeQuality};
    use proptest::prelude::*;

    use super::*;
    use crate::usage::{derive_daily_in, time_zone};

    /// A store of one epoch's rollup state: the records with their running maxima, and the
    /// buckets. Applies plans exactly as a store would.
    #[derive(Default)]
    struct Model {
        epoch: BTreeMap<u32, Booked>,
        buckets: BTreeMap<(u64, u64), (i64, i64, u32)>,
        faulty: BTreeSet<u64>,
    }

    impl Model {
        fn insert(&mut self, e: EpochEntry) -> InsertPlan {
            if self.epoch.contains_key(&e.seq) {
                return InsertPlan::default(); // a duplicate: the store refuses it first
            }
            let before =
                self.epoch.range(..e.seq).next_back().map(|(_, b)| b.max_through).unwrap_or_default();
            let after: Vec<Booked> = self.epoch.range(e.seq + 1..).map(|(_, b)| *b).collect();
            let plan = plan_insert(e, before, after).unwrap();
            self.epoch.insert(e.seq, Booked { entry: e, max_through: plan.max_through });
            for (seq, m) in &plan.raised {
                self.epoch.get_mut(seq).unwrap().max_through = *m;
            }
            for d in &plan.deltas {
                let b = self.buckets.entry((d.iccid, d.bucket)).or_default();
                *b = (b.0 + d.up, b.1 + d.down, b.2 + d.records);
            }
            if e.bucket.is_none() {
                self.faulty.insert(e.iccid);
            }
            plan
        }

        fn days(&self, tz: &TimeZone) -> BTreeMap<(u64, Date), Totals> {
            let mut out: BTreeMap<(u64, Date), Totals> = BTreeMap::new();
            for ((iccid, bucket), (up, down, records)) in &self.buckets {
                assert!(*up >= 0 && *down >= 0, "a bucket went negative");
                if self.faulty.contains(iccid) || *records == 0 {
                    continue;
                }
                let day = out.entry((*iccid, bucket_date(*bucket, tz).unwrap())).or_default();
                day.up += *up as u64;
                day.down += *down as u64;
            }
            out
        }
    }

    const SIMS: [u64; 2] = [8_988_280_666_000_000_001, 8_988_280_666_000_000_002];
    /// 2026-03-29T00:00:00Z: Europe's spring DST change is in the first day.
    const START_S: u64 = 1_774_742_400;

    fn record(seq: u32, sim: usize, up: u64, down: u64, at_s: u64, faulty: bool) -> UsageRecord {
        let used = if faulty {
            Totals { up: crate::usage::USED_BYTES_PER_EPOCH_MAX + 1, down }
        } else {
            Totals { up, down }
        };
        UsageRecord {
            id: RecordId { meter_id: 7, epoch: 2, seq },
            iccid: SIMS[sim],
            used,
            time: DeviceTime::wall_clock(TimeQuality::Network, at_s).unwrap(),
            received_ms: at_s * 1000,
        }
    }

    fn records() -> impl Strategy<Value = Vec<UsageRecord>> {
        prop::collection::vec(
            (0u32..40, 0usize..2, 0u64..5_000, 0u64..5_000, 0u64..3 * 86_400, prop::bool::weighted(0.03)),
            1..40,
        )
        .prop_map(|v| {
            v.into_iter()
                .map(|(seq, sim, up, down, at, faulty)| record(seq, sim, up, down, START_S + at, faulty))
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// Any arrival order, with duplicates and late records, gives the full derivation's
        /// days in every zone, and the epoch's stored maxima are those of seq order.
        #[test]
        fn rollups_equal_the_derivation_in_any_order(
            arrivals in records(),
            zone in prop::sample::select(vec!["UTC", "Europe/Berlin", "Asia/Kathmandu", "America/St_Johns", "Australia/Eucla", "Pacific/Chatham"]),
        ) {
            let tz = time_zone(zone).unwrap();
            let mut model = Model::default();
            for r in &arrivals {
                model.insert(EpochEntry::of(r));
            }
            // The model of the model: the first copy of each seq, in record id order.
            let mut first: BTreeMap<u32, UsageRecord> = BTreeMap::new();
            for r in &arrivals {
                first.entry(r.id.seq).or_insert(*r);
            }
            let derived = derive_daily_in(first.values().copied(), &tz).unwrap();
            prop_assert_eq!(model.days(&tz), derived.daily.clone());
            prop_assert_eq!(model.faulty.clone(), derived.faults.keys().copied().collect::<BTreeSet<_>>());
            let mut m = Totals::default();
            for (seq, b) in &model.epoch {
                m = raise(m, first[seq].used);
                prop_assert_eq!(b.max_through, m);
            }
        }

        /// In order arrival reads no later record and changes one bucket.
        #[test]
        fn in_order_arrival_costs_one_bucket(arrivals in records()) {
            let mut model = Model::default();
            let mut seqs = BTreeSet::new();
            let mut ordered: Vec<UsageRecord> = arrivals.into_iter().filter(|r| seqs.insert(r.id.seq)).collect();
            ordered.sort_by_key(|r| r.id.seq);
            for r in ordered {
                let plan = model.insert(EpochEntry::of(&r));
                prop_assert!(plan.raised.is_empty());
                prop_assert!(plan.deltas.len() <= 1);
            }
        }
    }

    #[test]
    fn a_late_record_moves_bytes_between_buckets_and_stops_where_it_no_longer_matters() {
        let e = |seq, up, bucket| EpochEntry {
            seq,
            iccid: 1,
            used: Totals { up, down: 0 },
            bucket: Some(bucket),
        };
        let t = |up| Totals { up, down: 0 };
        // Stored: seq 0 (100), seq 2 (300), seq 3 (500); seq 1 (250) arrives late.
        let after = [
            Booked { entry: e(2, 300, 20), max_through: t(300) },
            Booked { entry: e(3, 500, 30), max_through: t(500) },
        ];
        let plan = plan_insert(e(1, 250, 10), t(100), after).unwrap();
        assert_eq!(plan.max_through, t(250));
        assert!(plan.raised.is_empty(), "seq 2's maximum was already above 250");
        assert_eq!(
            plan.deltas,
            [
                BucketDelta { seq: 1, iccid: 1, bucket: 10, up: 150, down: 0, records: 1 },
                BucketDelta { seq: 2, iccid: 1, bucket: 20, up: -150, down: 0, records: 0 },
            ]
        );
        // A late record above everything after it raises them all, and their contributions fall.
        let after = [
            Booked { entry: e(2, 300, 20), max_through: t(300) },
            Booked { entry: e(3, 200, 30), max_through: t(300) },
        ];
        let plan = plan_insert(e(1, 400, 10), t(100), after).unwrap();
        assert_eq!(plan.raised, [(2, t(400)), (3, t(400))]);
        assert_eq!(plan.deltas.iter().map(|d| d.up).collect::<Vec<_>>(), [300, -200]);
        // Stored state that contradicts itself is refused, not trusted.
        let bad = [Booked { entry: e(2, 300, 20), max_through: t(10) }];
        assert_eq!(plan_insert(e(1, 5, 10), t(0), bad), Err(RollupError { seq: 2 }));
    }

    #[test]
    fn quarter_hour_zones_cut_days_on_buckets_and_second_offsets_do_not() {
        let d = time::macros::date!(2026 - 03 - 29);
        for zone in ["UTC", "Europe/Berlin", "Asia/Kathmandu", "Australia/Eucla", "America/St_Johns"] {
            let tz = time_zone(zone).unwrap();
            let r = day_on_buckets(d, &tz).unwrap();
            assert!(r.start < r.end, "{zone}");
            assert_eq!(bucket_date(r.start, &tz), Some(d), "{zone}");
            assert_eq!(bucket_date(r.end - 1, &tz), Some(d), "{zone}");
        }
        // Europe/Berlin on its spring-forward day has 23 hours.
        let berlin = day_on_buckets(d, &time_zone("Europe/Berlin").unwrap()).unwrap();
        assert_eq!(berlin.end - berlin.start, 23 * 4);
        // Monrovia kept −00:44:30 until 1972: its days then are not whole buckets.
        assert_eq!(
            day_on_buckets(time::macros::date!(1971 - 06 - 01), &time_zone("Africa/Monrovia").unwrap()),
            None
        );
    }
}
