//! The settlement ledger in the store: settled SIM-days and their adjustments, in the trees
//! `ledger_settled`, `ledger_adjustments` and `ledger_meta`.
//!
//! | tree                 | key                                   | value                                  |
//! | -------------------- | ------------------------------------- | -------------------------------------- |
//! | `ledger_settled`     | iccid u64 ‖ julian day i32 (BE)       | version 1 ‖ up u64 ‖ down u64 ‖ settled_at_s i64 (BE) |
//! | `ledger_adjustments` | iccid ‖ julian day ‖ seq u32 (BE)     | version 1 ‖ delta_up i64 ‖ delta_down i64 ‖ made_at_s i64 (BE) |
//! | `ledger_meta`        | `tz`                                  | the ledger's time zone name            |
//! | `ledger_meta`        | `closed_through`                      | the last day booked from every SIM's rollups, julian day i32 (BE) |
//!
//! # Incremental runs
//!
//! A run reads only what changed: the days that closed since the last run (`closed_through`
//! up to the last day closed now), for every SIM, a page of [`SETTLE_PAGE_SIMS`] at a time
//! from the rollups; and the SIM-days ingest marked because a record changed them after
//! they closed (`rollup_changed`, see [`super::rollups`]). Before reading, the run raises the
//! bucket before which ingest marks changes to the end of the last closed day, waiting for
//! commits in flight, so that no change can fall between what a run reads and what it
//! marks. Marks are cleared after the entries they caused are flushed, and only if not
//! marked again meanwhile. A crash anywhere repeats work that compares equal: nothing is
//! booked twice.
//!
//! A settled entry is inserted with compare-and-swap against "absent" and never written again;
//! corrections are new adjustment entries. The ledger's time zone is fixed by its first
//! settlement: days cut in another zone would not be the same days. Runs of one process are
//! serialised by a lock of the store (sled allows one process per store); the PostgreSQL
//! ledger, for several processes, is [`crate::store::postgres::ledger`].
use std::collections::BTreeMap;

use countersign_meter::Totals;
use jiff::Timestamp;
use time::Date;

use super::Store;
use crate::store::ledger::{LedgerDay, LedgerError};
use crate::store::StoreError;
use countersign_rating::rollup::{bucket_date, BUCKET_S};
use countersign_rating::usage::{
    apply_settlement, day_start, settle, time_zone, zone_date, Adjustment, Booked, DateRange, SettledDay,
    Settlement, UsageError, SETTLEMENT_HOURS_MAX,
};

use super::rollups::BUCKETS_PER_ROW;
use crate::store::rollups::SimPage;

const SETTLED_TREE: &str = "ledger_settled";
const ADJUSTMENTS_TREE: &str = "ledger_adjustments";
const META_TREE: &str = "ledger_meta";
const TZ_KEY: &[u8] = b"tz";
/// `ledger_meta` key of the last day booked from every SIM's rollups (julian day, i32 BE).
const CLOSED_THROUGH_KEY: &[u8] = b"closed_through";
/// SIMs whose newly closed days one step of a settlement run reads and books.
pub const SETTLE_PAGE_SIMS: usize = 10_000;
/// Marks a settlement run clears at once, after flushing what they caused.
const SETTLE_MARKS_PER_FLUSH: usize = 10_000;
const VALUE_VERSION: u8 = 1;

fn day_key(iccid: u64, date: Date) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&iccid.to_be_bytes());
    // Flip the sign bit so that byte order is date order for negative julian days too.
    k[8..].copy_from_slice(&((date.to_julian_day() as u32) ^ 0x8000_0000).to_be_bytes());
    k
}

/// The key bounds `[from, to)` of one SIM's entries (settled or adjustments) inside `range`.
fn sim_range_keys(iccid: u64, range: DateRange) -> (Vec<u8>, Vec<u8>) {
    let from = range.from.map_or_else(|| iccid.to_be_bytes().to_vec(), |d| day_key(iccid, d).to_vec());
    let to = match range.to.and_then(|d| d.next_day()) {
        Some(d) => day_key(iccid, d).to_vec(),
        None => iccid.checked_add(1).map_or(vec![0xff; 13], |n| n.to_be_bytes().to_vec()),
    };
    (from, to)
}

fn parse_day_key(k: &[u8]) -> Result<(u64, Date), StoreError> {
    let bad = || StoreError::Corrupt(format!("ledger key of {} bytes", k.len()));
    let iccid = u64::from_be_bytes(k.get(..8).and_then(|s| s.try_into().ok()).ok_or_else(bad)?);
    let j = u32::from_be_bytes(k.get(8..12).and_then(|s| s.try_into().ok()).ok_or_else(bad)?) ^ 0x8000_0000;
    let date = Date::from_julian_day(j as i32).map_err(|_| bad())?;
    Ok((iccid, date))
}

fn three_words(v: &[u8]) -> Result<[i64; 3], StoreError> {
    let bad = || StoreError::Corrupt("ledger value".into());
    match v.split_first() {
        Some((&VALUE_VERSION, rest)) if rest.len() == 24 => {
            let w =
                |i: usize| rest.get(i * 8..i * 8 + 8).and_then(|s| s.try_into().ok()).map(i64::from_be_bytes);
            Ok([w(0).ok_or_else(bad)?, w(1).ok_or_else(bad)?, w(2).ok_or_else(bad)?])
        }
        _ => Err(bad()),
    }
}

fn encode_words(words: [i64; 3]) -> Vec<u8> {
    let mut v = vec![VALUE_VERSION];
    for w in words {
        v.extend_from_slice(&w.to_be_bytes());
    }
    v
}

/// The settlement ledger of a store.
#[derive(Clone, Debug)]
pub struct Ledger {
    store: Store,
    settled: sled::Tree,
    adjustments: sled::Tree,
    meta: sled::Tree,
}

impl Ledger {
    /// Opens the ledger trees of `store`.
    pub fn open(store: &Store) -> Result<Self, LedgerError> {
        let db = store.db();
        Ok(Self {
            store: store.clone(),
            settled: db.open_tree(SETTLED_TREE)?,
            adjustments: db.open_tree(ADJUSTMENTS_TREE)?,
            meta: db.open_tree(META_TREE)?,
        })
    }

    /// The ledger's time zone, once it has settled anything.
    pub fn zone(&self) -> Result<Option<String>, LedgerError> {
        Ok(self.meta.get(TZ_KEY)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Every booked SIM-day of one SIM (or all with `None`) inside `range`, with adjustments.
    pub fn days(&self, iccid: Option<u64>, range: DateRange) -> Result<Vec<LedgerDay>, LedgerError> {
        let mut out = BTreeMap::<(u64, Date), LedgerDay>::new();
        // One SIM: only its keys inside the range; every SIM: the whole tree.
        let (from, to) = match iccid {
            Some(i) => sim_range_keys(i, range),
            None => (Vec::new(), vec![0xff; 17]),
        };
        for item in self.settled.range(from.clone()..to.clone()) {
            let (k, v) = item?;
            let (iccid, date) = parse_day_key(&k)?;
            if !range.contains(date) {
                continue;
            }
            let [up, down, at] = three_words(&v)?;
            let totals = Totals { up: up as u64, down: down as u64 };
            out.insert(
                (iccid, date),
                LedgerDay {
                    settled: SettledDay { iccid, date, totals, settled_at_s: at },
                    adjustments: Vec::new(),
                },
            );
        }
        for item in self.adjustments.range(from..to) {
            let (k, v) = item?;
            let (iccid, date) = parse_day_key(&k)?;
            let Some(day) = out.get_mut(&(iccid, date)) else { continue };
            let seq = k
                .get(12..16)
                .and_then(|s| s.try_into().ok())
                .map(u32::from_be_bytes)
                .ok_or_else(|| StoreError::Corrupt("adjustment key".into()))?;
            let [delta_up, delta_down, made_at_s] = three_words(&v)?;
            day.adjustments.push(Adjustment { iccid, date, seq, delta_up, delta_down, made_at_s });
        }
        Ok(out.into_values().collect())
    }

    /// Booked SIM-days of one page of SIMs (in ICCID order, after `page.after`) inside
    /// `range`, and the next page's cursor: seeks from SIM to SIM and reads each SIM's range,
    /// so it costs the page's SIMs and days, not the ledger's history.
    pub fn days_page(
        &self,
        range: DateRange,
        page: SimPage,
    ) -> Result<(Vec<LedgerDay>, Option<u64>), LedgerError> {
        let mut out = Vec::new();
        let Some(mut next_sim) = page.first_iccid() else { return Ok((out, None)) };
        let (mut sims, mut last_sim) = (0usize, None);
        loop {
            let start = match range.from {
                Some(d) => day_key(next_sim, d).to_vec(),
                None => next_sim.to_be_bytes().to_vec(),
            };
            let Some(first) = self.settled.range(start..).next() else { return Ok((out, None)) };
            let (sim, date) = parse_day_key(&first?.0)?;
            if range.from.is_some_and(|f| date < f) {
                // A later SIM's days before the range: seek to its range.
                next_sim = sim;
                continue;
            }
            if range.to.is_some_and(|t| date > t) {
                // Nothing of this SIM in the range.
                match sim.checked_add(1) {
                    Some(n) => next_sim = n,
                    None => return Ok((out, None)),
                }
                continue;
            }
            if sims == page.limit {
                return Ok((out, last_sim));
            }
            sims += 1;
            last_sim = Some(sim);
            out.extend(self.days(Some(sim), range)?);
            match sim.checked_add(1) {
                Some(n) => next_sim = n,
                None => return Ok((out, None)),
            }
        }
    }

    /// What is booked, as [`settle`] needs it.
    pub fn booked(&self) -> Result<BTreeMap<(u64, Date), Booked>, LedgerError> {
        let mut booked = BTreeMap::new();
        for day in self.days(None, DateRange::default())? {
            let s =
                Settlement { settled: vec![day.settled], adjustments: day.adjustments, ..Default::default() };
            apply_settlement(&mut booked, &s)?;
        }
        Ok(booked)
    }

    /// What is booked for one SIM's days in `range`: a range read of its entries.
    fn booked_in(&self, iccid: u64, range: DateRange) -> Result<BTreeMap<(u64, Date), Booked>, LedgerError> {
        let (from, to) = sim_range_keys(iccid, range);
        let mut booked = BTreeMap::new();
        for item in self.settled.range(from.clone()..to.clone()) {
            let (k, v) = item?;
            let (iccid, date) = parse_day_key(&k)?;
            let [up, down, _] = three_words(&v)?;
            let totals = Totals { up: up as u64, down: down as u64 };
            booked.insert((iccid, date), Booked { settled: totals, current: totals, adjustments: 0 });
        }
        for item in self.adjustments.range(from..to) {
            let (k, v) = item?;
            let (iccid, date) = parse_day_key(&k)?;
            let seq = k
                .get(12..16)
                .and_then(|s| s.try_into().ok())
                .map(u32::from_be_bytes)
                .ok_or_else(|| StoreError::Corrupt("adjustment key".into()))?;
            let [delta_up, delta_down, made_at_s] = three_words(&v)?;
            let a = Adjustment { iccid, date, seq, delta_up, delta_down, made_at_s };
            apply_settlement(&mut booked, &Settlement { adjustments: vec![a], ..Default::default() })?;
        }
        Ok(booked)
    }

    /// The last day the ledger booked from every SIM's rollups (`None` before the first run).
    fn closed_through(&self) -> Result<Option<Date>, LedgerError> {
        match self.meta.get(CLOSED_THROUGH_KEY)? {
            None => Ok(None),
            Some(v) => {
                let j = <[u8; 4]>::try_from(&v[..])
                    .map(i32::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt("ledger closed_through".into()))?;
                Ok(Some(
                    Date::from_julian_day(j)
                        .map_err(|_| StoreError::Corrupt("ledger closed_through".into()))?,
                ))
            }
        }
    }

    /// Stores a run's entries: settled days once (compare-and-swap against absent),
    /// adjustments under their number.
    fn write(&self, settlement: &Settlement) -> Result<(), LedgerError> {
        for s in &settlement.settled {
            let v = encode_words([s.totals.up as i64, s.totals.down as i64, s.settled_at_s]);
            // Never overwrite a settled day: a CAS failure means another run booked it first.
            if self.settled.compare_and_swap(day_key(s.iccid, s.date), None::<&[u8]>, Some(v))?.is_err() {
                return Err(
                    StoreError::Corrupt(format!("iccid {} {}: settled twice", s.iccid, s.date)).into()
                );
            }
        }
        for a in &settlement.adjustments {
            let mut k = day_key(a.iccid, a.date).to_vec();
            k.extend_from_slice(&a.seq.to_be_bytes());
            let v = encode_words([a.delta_up, a.delta_down, a.made_at_s]);
            if self.adjustments.compare_and_swap(k, None::<&[u8]>, Some(v))?.is_err() {
                return Err(StoreError::Corrupt(format!(
                    "iccid {} {}: adjustment {} twice",
                    a.iccid, a.date, a.seq
                ))
                .into());
            }
        }
        Ok(())
    }

    /// A settlement run: books the days closed by `now` (`settlement_hours` after their end)
    /// and adjusts closed days that changed; durable when it returns. Incremental: it reads
    /// the rollups of the days that closed since the last run (every SIM, a page at a time)
    /// and of the SIM-days that ingest marked as changed after they closed, and nothing
    /// else; the answer equals a run over the whole history (property-tested).
    pub fn settle(
        &self,
        tz_name: &str,
        settlement_hours: u32,
        now: Timestamp,
    ) -> Result<Settlement, LedgerError> {
        if settlement_hours > SETTLEMENT_HOURS_MAX {
            return Err(UsageError::SettlementWindow(settlement_hours).into());
        }
        let tz = time_zone(tz_name)?;
        let _one_run_at_a_time = self.store.ledger_lock();
        match self.zone()? {
            Some(z) if z != tz_name => {
                return Err(LedgerError::ZoneMismatch { ledger: z, asked: tz_name.into() })
            }
            Some(_) => {}
            None => {
                self.meta.insert(TZ_KEY, tz_name.as_bytes())?;
            }
        }
        let closed_through = self.closed_through()?;
        // The last day closed by `now`: the day before the one holding `now - window`.
        let last_closed = now
            .checked_sub(jiff::SignedDuration::from_hours(i64::from(settlement_hours)))
            .ok()
            .and_then(|t| zone_date(t, &tz))
            .and_then(|d| d.previous_day());
        // From here on ingest marks every change to a day closed now (the bucket holding the
        // next day's first instant counts as closed: marks may be too many, never too few).
        if let Some(start) = last_closed.and_then(|c| c.next_day()).and_then(|d| day_start(d, &tz)) {
            let s = u64::try_from(start.as_second()).unwrap_or(0);
            self.store.raise_changes_before(s.div_ceil(BUCKET_S))?;
        }
        let mut out = Settlement::default();
        let mut book = |s: Settlement| -> Result<(), LedgerError> {
            self.write(&s)?;
            out.settled.extend(s.settled);
            out.adjustments.extend(s.adjustments);
            out.underivable.extend(s.underivable);
            Ok(())
        };
        // 1. The days that closed since the last run, of every SIM, a page of SIMs at a time.
        if let Some(c) = last_closed.filter(|c| closed_through.is_none_or(|t| t < *c)) {
            let range = DateRange { from: closed_through.and_then(|t| t.next_day()), to: Some(c) };
            let mut page = SimPage { after: None, limit: SETTLE_PAGE_SIMS };
            loop {
                let got = self.store.rollup_page_in(&tz, range, page)?;
                // Days after `closed_through` are never booked (a run books marked days only
                // up to the day it then records as closed through), so after the first run
                // there is nothing to read; the first run may meet a ledger settled before
                // runs were incremental.
                let mut booked = BTreeMap::new();
                if closed_through.is_none() {
                    let sims: std::collections::BTreeSet<u64> =
                        got.derived.daily.keys().map(|(i, _)| *i).collect();
                    for sim in sims {
                        booked.extend(self.booked_in(sim, range)?);
                    }
                }
                book(settle(&got.derived, &booked, &tz, settlement_hours, now)?)?;
                match got.next_after {
                    Some(n) => page.after = Some(n),
                    None => break,
                }
            }
        }
        // 2. Days closed before that changed since: the rows ingest marked, SIM by SIM.
        let through = closed_through.max(last_closed);
        let mut from_sim = 0u64;
        let mut to_clear = Vec::new();
        while let Some((sim, rows)) = self.store.changed_rows_of_next_sim(from_sim)? {
            if let Some(through) = through {
                let first = rows.iter().map(|(d, _)| *d).min().unwrap_or(0);
                let last = rows.iter().map(|(d, _)| *d).max().unwrap_or(0);
                let day_of = |bucket: u64| {
                    bucket_date(bucket, &tz)
                        .ok_or_else(|| StoreError::Corrupt(format!("rollup bucket {bucket} has no date")))
                };
                let from = day_of(u64::from(first) * BUCKETS_PER_ROW)?;
                let to = day_of(u64::from(last) * BUCKETS_PER_ROW + BUCKETS_PER_ROW - 1)?.min(through);
                if from <= to {
                    let range = DateRange { from: Some(from), to: Some(to) };
                    let fresh = self.store.rollup_daily_in(Some(sim), &tz, range)?;
                    let booked = self.booked_in(sim, range)?;
                    book(settle(&fresh, &booked, &tz, settlement_hours, now)?)?;
                }
            }
            // A mark is cleared only once what it caused is on disk.
            to_clear.extend(rows.into_iter().map(|(day, mark)| (sim, day, mark)));
            if to_clear.len() >= SETTLE_MARKS_PER_FLUSH {
                self.store.flush()?;
                for (sim, day, mark) in to_clear.drain(..) {
                    self.store.clear_changed_row(sim, day, mark)?;
                }
            }
            match sim.checked_add(1) {
                Some(n) => from_sim = n,
                None => break,
            }
        }
        if let Some(t) = through {
            self.meta.insert(CLOSED_THROUGH_KEY, &t.to_julian_day().to_be_bytes()[..])?;
        }
        self.store.flush()?;
        for (sim, day, mark) in to_clear {
            self.store.clear_changed_row(sim, day, mark)?;
        }
        out.underivable.sort_by_key(|f| f.iccid);
        out.underivable.dedup_by_key(|f| f.iccid);
        tracing::info!(
            settled = out.settled.len(),
            adjustments = out.adjustments.len(),
            tz = tz_name,
            "settlement run"
        );
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use countersign_testkit::report::{network_time, ReportBuilder};

    const SIM: u64 = 8_988_280_666_000_000_001;
    /// 2026-11-24T12:00:00Z.
    const NOON_S: u64 = 1_795_521_600;
    const DAY_S: u64 = 86_400;

    fn insert(store: &Store, seq: u32, up: u64, at_s: u64) {
        let r = ReportBuilder::new(1, seq, SIM, network_time(at_s)).used(up, 0);
        store.insert_one(1, at_s * 1000, &r.encode(&[1u8; 32])).unwrap();
    }

    fn at(s: u64) -> Timestamp {
        Timestamp::from_second(i64::try_from(s).unwrap()).unwrap()
    }

    #[test]
    fn closed_days_survive_reopen_and_late_data_becomes_adjustments() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store =
                Store::open(&dir.path().join("data"), crate::config::CACHE_CAPACITY_BYTES_MIN).unwrap();
            insert(&store, 0, 100, NOON_S);
            insert(&store, 2, 300, NOON_S + DAY_S);
            let ledger = Ledger::open(&store).unwrap();
            let s = ledger.settle("Europe/Berlin", 24, at(NOON_S + 3 * DAY_S)).unwrap();
            assert_eq!(s.settled.len(), 2);
            assert!(matches!(
                ledger.settle("UTC", 24, at(NOON_S + 3 * DAY_S)),
                Err(LedgerError::ZoneMismatch { .. })
            ));
            store.flush().unwrap();
        }
        // sled's flusher thread may hold the old handle for a moment after the drop.
        let store = (0..100)
            .find_map(|_| {
                let s = Store::open(&dir.path().join("data"), crate::config::CACHE_CAPACITY_BYTES_MIN).ok();
                if s.is_none() {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                s
            })
            .unwrap();
        insert(&store, 1, 250, NOON_S);
        let ledger = Ledger::open(&store).unwrap();
        let s = ledger.settle("Europe/Berlin", 24, at(NOON_S + 4 * DAY_S)).unwrap();
        assert_eq!((s.settled.len(), s.adjustments.len()), (0, 2));
        let days = ledger.days(Some(SIM), DateRange::default()).unwrap();
        assert_eq!(days.len(), 2);
        // The settled figures are what they were; the late 150 bytes moved as adjustments.
        assert_eq!(days[0].settled.totals.up, 100);
        assert_eq!(days[0].adjustments[0].delta_up, 150);
        assert_eq!(days[1].settled.totals.up, 200);
        assert_eq!(days[1].adjustments[0].delta_up, -150);
        let booked = ledger.booked().unwrap();
        assert_eq!(booked.values().map(|b| b.current.up).sum::<u64>(), 300);
        assert_eq!(ledger.zone().unwrap().as_deref(), Some("Europe/Berlin"));
        // Settling again books nothing new.
        assert_eq!(
            ledger.settle("Europe/Berlin", 24, at(NOON_S + 5 * DAY_S)).unwrap(),
            Settlement::default()
        );
    }

    /// (sim, seq, up, down, seconds after NOON_S)
    type Spec = (usize, u32, u64, u64, u64);

    fn batch(specs: &[Spec]) -> Vec<crate::store::NewRecord> {
        const SIMS: [u64; 3] = [SIM, SIM + 1, 9_300_000_000_000_000_001];
        specs
            .iter()
            .map(|&(sim, seq, up, down, at)| {
                let at = NOON_S + at;
                let r = ReportBuilder::new(sim as u64 + 1, seq, SIMS[sim], network_time(at)).used(up, down);
                crate::store::NewRecord::new(r.report(), at * 1000, r.encode(&[1u8; 32]).into())
            })
            .collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(40))]

        /// Incremental settlement runs, interleaved with records arriving in any order and
        /// batching (late ones included), leave the ledger exactly as runs over the whole
        /// history at the same instants would (the rating core's `settle` as the model).
        #[test]
        fn incremental_runs_equal_runs_over_the_whole_history(
            specs in proptest::collection::vec((0usize..3, 0u32..20, 0u64..5_000, 0u64..5_000, 0u64..6 * DAY_S), 1..50),
            cuts in proptest::collection::vec(1usize..6, 1..10),
            mut runs in proptest::collection::vec(0u64..8 * DAY_S, 1..8),
            hours in 0u32..48,
            zone in proptest::sample::select(vec!["UTC", "Europe/Berlin", "Asia/Kathmandu", "Pacific/Chatham"]),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("data"), crate::config::CACHE_CAPACITY_BYTES_MIN).unwrap();
            let ledger = Ledger::open(&store).unwrap();
            let tz = time_zone(zone).unwrap();
            let mut model: BTreeMap<(u64, Date), Booked> = BTreeMap::new();
            runs.sort_unstable();
            runs.push(30 * DAY_S);
            let mut at = 0;
            let mut cut = cuts.iter().cycle();
            for (i, run) in runs.iter().enumerate() {
                if at < specs.len() {
                    let end = (at + cut.next().unwrap()).min(specs.len());
                    store.insert_batch(1, &batch(&specs[at..end])).unwrap();
                    at = end;
                }
                if i + 1 == runs.len() {
                    // Everything arrives before the last run.
                    store.insert_batch(1, &batch(&specs[at..])).unwrap();
                }
                let now = super::Timestamp::from_second((NOON_S + run) as i64).unwrap();
                ledger.settle(zone, hours, now).unwrap();
                let fresh = store.derive_from_records_in(&tz).unwrap();
                let s = settle(&fresh, &model, &tz, hours, now).unwrap();
                apply_settlement(&mut model, &s).unwrap();
                proptest::prop_assert_eq!(&ledger.booked().unwrap(), &model, "after run {} at +{} s", i, run);
                // Pages of the ledger, walked by their cursors, are the unpaged read.
                let first = time::macros::date!(2026 - 11 - 25);
                for range in [DateRange::default(), DateRange { from: Some(first), to: Some(first.saturating_add(time::Duration::days(1))) }] {
                    let mut walked = Vec::new();
                    let mut page = SimPage { after: None, limit: 1 + i % 2 };
                    for _ in 0..8 {
                        let (days, next) = ledger.days_page(range, page).unwrap();
                        walked.extend(days);
                        match next {
                            Some(n) => page.after = Some(n),
                            None => break,
                        }
                    }
                    proptest::prop_assert_eq!(walked, ledger.days(None, range).unwrap());
                }
            }
        }
    }

    #[test]
    fn day_keys_order_by_date() {
        let a = day_key(SIM, time::macros::date!(2026 - 01 - 31));
        let b = day_key(SIM, time::macros::date!(2026 - 02 - 01));
        assert!(a < b);
        assert_eq!(parse_day_key(&b).unwrap(), (SIM, time::macros::date!(2026 - 02 - 01)));
        assert_eq!(hex::encode(a), "7cbcc9a4ce71040180258d90");
    }
}
