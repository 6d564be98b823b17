//! The settlement ledger in the store: settled SIM-days and their adjustments, in the trees
//! `ledger_settled`, `ledger_adjustments` and `ledger_meta`.
//!
//! | tree                 | key                                   | value                                  |
//! | -------------------- | ------------------------------------- | -------------------------------------- |
//! | `ledger_settled`     | iccid u64 ‖ julian day i32 (BE)       | version 1 ‖ up u64 ‖ down u64 ‖ settled_at_s i64 (BE) |
//! | `ledger_adjustments` | iccid ‖ julian day ‖ seq u32 (BE)     | version 1 ‖ delta_up i64 ‖ delta_down i64 ‖ made_at_s i64 (BE) |
//! | `ledger_meta`        | `tz`                                  | the ledger's time zone name            |
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
use countersign_rating::usage::{
    apply_settlement, derive_daily_in, settle, time_zone, Adjustment, Booked, DateRange, SettledDay,
    Settlement,
};

const SETTLED_TREE: &str = "ledger_settled";
const ADJUSTMENTS_TREE: &str = "ledger_adjustments";
const META_TREE: &str = "ledger_meta";
const TZ_KEY: &[u8] = b"tz";
const VALUE_VERSION: u8 = 1;

fn day_key(iccid: u64, date: Date) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&iccid.to_be_bytes());
    // Flip the sign bit so that byte order is date order for negative julian days too.
    k[8..].copy_from_slice(&((date.to_julian_day() as u32) ^ 0x8000_0000).to_be_bytes());
    k
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
        let prefix = iccid.map(|i| i.to_be_bytes().to_vec()).unwrap_or_default();
        for item in self.settled.scan_prefix(&prefix) {
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
        for item in self.adjustments.scan_prefix(&prefix) {
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

    /// Derives usage in `tz_name` from every stored record, books days closed by `now`
    /// (`settlement_hours` after their end) and adjusts closed days that changed; durable when
    /// it returns. O(records + booked days).
    pub fn settle(
        &self,
        tz_name: &str,
        settlement_hours: u32,
        now: Timestamp,
    ) -> Result<Settlement, LedgerError> {
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
        let mut failure = None;
        let records = self.store.usage_records().map_while(|r| match r {
            Ok(r) => Some(r),
            Err(e) => {
                failure = Some(e);
                None
            }
        });
        let fresh = derive_daily_in(records, &tz);
        if let Some(e) = failure {
            return Err(e.into());
        }
        let fresh = fresh?;
        let settlement = settle(&fresh, &self.booked()?, &tz, settlement_hours, now)?;
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
        self.store.flush()?;
        tracing::info!(
            settled = settlement.settled.len(),
            adjustments = settlement.adjustments.len(),
            tz = tz_name,
            "settlement run"
        );
        Ok(settlement)
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

    #[test]
    fn day_keys_order_by_date() {
        let a = day_key(SIM, time::macros::date!(2026 - 01 - 31));
        let b = day_key(SIM, time::macros::date!(2026 - 02 - 01));
        assert!(a < b);
        assert_eq!(parse_day_key(&b).unwrap(), (SIM, time::macros::date!(2026 - 02 - 01)));
        assert_eq!(hex::encode(a), "7cbcc9a4ce71040180258d90");
    }
}
