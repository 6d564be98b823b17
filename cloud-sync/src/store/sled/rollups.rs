//! Rollups on sled: usage per SIM and quarter-hour bucket, kept in the same atomic write as
//! the records, so reads cost what they return (see [`countersign_rating::rollup`] for the
//! rule and its proof against the full derivation).
//!
//! # Layout
//!
//! | tree            | key                                 | value                                  |
//! | --------------- | ----------------------------------- | -------------------------------------- |
//! | `records`       | record id (16 bytes)                | version 2: the record and its epoch's running maximum through it |
//! | `rollup_days`   | ICCID (8) · UTC day (4) · meter (8), big-endian | version 1, then postcard of the day's non-empty quarter hours: (slot, up, down, records) in slot order |
//! | `rollup_faulty` | ICCID (8) · record id (16)          | empty                                  |
//! | `rollup_meta`   | `version`                           | [`ROLLUP_VERSION`] (4 bytes BE) once built |
//! | `rollup_meta`   | `changes_before_bucket`             | the ledger's mark (u64 BE): changes to earlier buckets are marked |
//! | `rollup_changed`| ICCID (8) · UTC day (4)             | the mark's unique id (u64 BE): a row changed after the ledger closed its day |
//!
//! One row per SIM, UTC day and meter that has records (a SIM is almost always reported by
//! one meter): a SIM's usage over a range is a range scan of its rows, in proportion to the
//! days in the answer and never to history. A row is written only by batches of its meter. A day in any
//! zone whose offsets are whole quarter hours (every zone since 1972) is a set of whole
//! buckets of at most three rows. A faulty record (see
//! [`countersign_rating::usage::record_fault`]) adds to no row; its SIM is listed in
//! `rollup_faulty` and is underivable, as in the derivation.
//!
//! # Writing
//!
//! A batch is planned without locks, in record id order: a record after everything stored of
//! its epoch (the common case) needs no read at all, because the store remembers each
//! meter's latest epoch tail (its last seq and running maximum, `Meters`); a late record
//! reads its predecessor and, lazily, the later records it changes (the tree's, overlaid by
//! what the batch itself plans). The plan — record values, signed changes per row and slot,
//! faulty entries — is committed in one sled transaction over the three trees. sled runs a
//! transaction under its global write lock; inside it the commit checks that no other
//! commit touched the batch's meters since planning began (per-meter generations, bumped by
//! every commit, with the new tails) and plans again when one did, at most
//! [`INGEST_REPLANS_MAX`] times. Rows are keyed by their meter too, so they are read while
//! planning and only written inside the lock: the lock holds blind writes alone.
//!
//! Limits: the per-meter state is one small entry per meter that wrote since the store
//! opened (bounded by the registered meters); a batch plans in memory proportional to its
//! records plus, for late records, the later records of their epochs that they change.
//!
//! # Rebuild and check
//!
//! [`Store::rebuild_rollups`] derives everything again from the records (one pass in key
//! order, epoch by epoch) and [`Store::check_rollups`] derives into scratch trees and
//! compares them with the stored rollups key by key. A store opened without built rollups
//! (written by an older version) is built at open, with progress logged.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Mutex;

use bytes::Bytes;
use countersign_meter::{RecordId, Report, Totals, RECORD_KEY_BYTES};
use countersign_rating::rollup::{bucket_date, plan_insert, Booked, EpochEntry, InsertPlan, BUCKET_S};
use countersign_rating::usage::{
    record_fault, DateRange, Derived, FaultReason, SimFault, TimeZone, UsageRecord,
};
use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError, TransactionalTree,
};
use sled::{IVec, Transactional};
use time::Date;

use super::records::{decode_value, encode_value};
use super::Store;
use crate::store::rollups::{rows_of_range, rows_on_buckets, RollupCheck, SimPage, UsagePage};
use crate::store::{InsertOutcome, NewRecord, StoreError};

/// Version of the rollup layout; a store whose `rollup_meta` holds another is rebuilt.
pub const ROLLUP_VERSION: u32 = 1;
/// Bytes of a `rollup_faulty` key.
pub const FAULTY_KEY_BYTES: usize = 8 + RECORD_KEY_BYTES;
/// Times a batch is planned again because another commit touched its meters meanwhile,
/// before the store answers [`StoreError::Contended`] (the gateway retries the batch).
pub const INGEST_REPLANS_MAX: u32 = 16;
/// Shards of the per-meter state.
const METER_SHARDS: usize = 64;
/// Records whose rollup changes a rebuild gathers in memory before writing them.
const REBUILD_BATCH_RECORDS: u64 = 10_000;
/// Scratch trees of [`Store::check_rollups`], dropped when it ends.
const CHECK_DAYS_TREE: &str = "rollup_check_days";
const CHECK_FAULTY_TREE: &str = "rollup_check_faulty";
/// Records between progress lines of a rebuild.
const REBUILD_PROGRESS_RECORDS: u64 = 1_000_000;

const META_VERSION_KEY: &[u8] = b"version";
/// `rollup_meta` key of the bucket before which changes are marked for the ledger.
const META_CHANGES_BEFORE_KEY: &[u8] = b"changes_before_bucket";
/// A SIM's rows marked as changed for the ledger: its ICCID and each row's UTC day and mark.
pub(crate) type ChangedRows = (u64, Vec<(u32, u64)>);
/// Bytes of a `rollup_changed` key: ICCID (8) · UTC day (4).
pub const CHANGED_KEY_BYTES: usize = 12;

/// The bucket before which changes are marked, as stored (0: none).
pub(crate) fn stored_changes_before(meta: &sled::Tree) -> Result<u64, StoreError> {
    match meta.get(META_CHANGES_BEFORE_KEY)? {
        None => Ok(0),
        Some(v) => <[u8; 8]>::try_from(&v[..]).map(u64::from_be_bytes).map_err(|_| {
            StoreError::Corrupt(format!("rollup meta changes_before_bucket of {} bytes", v.len()))
        }),
    }
}

/// Which SIMs a rollup read answers for.
#[derive(Clone, Copy, Debug)]
enum Scope {
    /// One SIM.
    Sim(u64),
    /// Every SIM.
    All,
    /// A page of SIMs in ICCID order.
    Page(SimPage),
}

/// The last stored record of an epoch: its seq (`None` for an epoch with no record yet) and
/// the epoch's running maximum through it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tail {
    epoch: u32,
    seq: Option<u32>,
    max: Totals,
}

/// What the store remembers of a meter between batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct MeterState {
    /// Commits that touched the meter since the store opened.
    generation: u64,
    /// The tail of the meter's latest epoch written since the store opened.
    tail: Option<Tail>,
}

/// Per-meter state (see the module docs), in shards so that planners rarely wait on each
/// other. Changed only by commits, under sled's write lock, together with the trees. One
/// entry per meter that wrote since the store opened (about 48 bytes): bounded by the
/// registered meters.
#[derive(Debug)]
pub(crate) struct Meters(Box<[Mutex<HashMap<u64, MeterState>>]>);

impl Default for Meters {
    fn default() -> Self {
        Self((0..METER_SHARDS).map(|_| Mutex::new(HashMap::new())).collect())
    }
}

impl Meters {
    fn shard(&self, meter_id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, MeterState>> {
        // Fibonacci hashing: consecutive meter ids (a factory batch) spread over all shards.
        let i = (meter_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize % METER_SHARDS;
        // A holder that panicked changed no entry half way: the map is still valid.
        self.0[i].lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, meter_id: u64) -> MeterState {
        self.shard(meter_id).get(&meter_id).copied().unwrap_or_default()
    }

    /// Records a commit to the meter, with the tail it leaves (`None`: forget the tail).
    fn committed(&self, meter_id: u64, tail: Option<Tail>) {
        let mut shard = self.shard(meter_id);
        let state = shard.entry(meter_id).or_default();
        state.generation = state.generation.wrapping_add(1);
        match (tail, state.tail) {
            (Some(t), Some(old)) if t.epoch < old.epoch => {}
            _ => state.tail = tail,
        }
    }

    /// Forgets every tail (the trees changed under them, e.g. a rebuild).
    fn forget(&self) {
        for shard in self.0.iter() {
            let mut shard = shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for state in shard.values_mut() {
                state.generation = state.generation.wrapping_add(1);
                state.tail = None;
            }
        }
    }
}

/// Buckets per `rollup_days` row: the quarter hours of a UTC day.
pub const BUCKETS_PER_ROW: u64 = 86_400 / BUCKET_S;
/// Bytes of a `rollup_days` key.
pub const DAY_KEY_BYTES: usize = 8 + 4 + 8;
/// Version byte that starts every `rollup_days` value.
pub const DAY_ROW_VERSION: u8 = 1;

/// The `rollup_days` key of what one meter reported for a SIM on a UTC day (`day`: days
/// since 1970-01-01). The meter is last so that a SIM's day is one key range, and so that a
/// row is written only by batches of its meter (see the module docs).
pub fn day_key(iccid: u64, day: u32, meter_id: u64) -> [u8; DAY_KEY_BYTES] {
    let mut k = [0u8; DAY_KEY_BYTES];
    k[..8].copy_from_slice(&iccid.to_be_bytes());
    k[8..12].copy_from_slice(&day.to_be_bytes());
    k[12..].copy_from_slice(&meter_id.to_be_bytes());
    k
}

/// The first key of a SIM's UTC day: a range bound below every meter's row of that day.
fn day_bound(iccid: u64, day: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&iccid.to_be_bytes());
    k[8..].copy_from_slice(&day.to_be_bytes());
    k
}

/// The bound just above every row of a SIM's UTC day `day` (exclusive): the first key of the
/// next day, or of the next SIM after the last day.
fn day_bound_after(iccid: u64, day: u32) -> Vec<u8> {
    match day.checked_add(1) {
        Some(next) => day_bound(iccid, next).to_vec(),
        None => match iccid.checked_add(1) {
            Some(n) => day_bound(n, 0).to_vec(),
            None => vec![0xff; DAY_KEY_BYTES + 1],
        },
    }
}

/// A `rollup_days` key split into ICCID, UTC day and meter.
pub fn parse_day_key(k: &[u8]) -> Option<(u64, u32, u64)> {
    if k.len() != DAY_KEY_BYTES {
        return None;
    }
    Some((
        u64::from_be_bytes(k[..8].try_into().ok()?),
        u32::from_be_bytes(k[8..12].try_into().ok()?),
        u64::from_be_bytes(k[12..].try_into().ok()?),
    ))
}

/// The row (UTC day) and slot (quarter hour in it) of a bucket.
fn row_of(bucket: u64) -> Option<(u32, u8)> {
    let day = u32::try_from(bucket / BUCKETS_PER_ROW).ok()?;
    let slot = u8::try_from(bucket % BUCKETS_PER_ROW).ok()?;
    Some((day, slot))
}

/// One quarter hour of a SIM: bytes attributed there and how many records were. Bytes are
/// 128-bit so that a SIM whose usage leaves 64 bits (legacy data: 2^13 epochs at the counter
/// ceiling) is stored as it is and read as an overflow fault of that SIM, never refused at
/// ingest; postcard's varints make small values the same bytes as 64-bit ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Slot {
    /// Bytes up.
    pub up: u128,
    /// Bytes down.
    pub down: u128,
    /// Records attributed to it (a SIM that reported and used nothing still shows).
    pub records: u32,
}

/// A `rollup_days` value: the SIM's non-empty quarter hours of one UTC day, by slot.
pub type DayRow = BTreeMap<u8, Slot>;

/// Encodes a row: the version byte, then postcard of its (slot, up, down, records) in slot
/// order.
pub fn encode_day_row(row: &DayRow) -> Result<Vec<u8>, StoreError> {
    let entries: Vec<(u8, Slot)> = row.iter().map(|(k, v)| (*k, *v)).collect();
    let mut out = vec![DAY_ROW_VERSION];
    out.extend(
        postcard::to_stdvec(&entries)
            .map_err(|e| StoreError::Corrupt(format!("rollup row does not encode: {e}")))?,
    );
    Ok(out)
}

/// Inverse of [`encode_day_row`]; refuses unknown versions, slots beyond the day, slots out
/// of order and trailing bytes.
pub fn decode_day_row(bytes: &[u8]) -> Result<DayRow, StoreError> {
    let bad = |what: String| StoreError::Corrupt(format!("rollup row {what}"));
    match bytes.split_first() {
        Some((&DAY_ROW_VERSION, rest)) => {
            let (entries, tail): (Vec<(u8, Slot)>, &[u8]) =
                postcard::take_from_bytes(rest).map_err(|e| bad(format!("does not decode: {e}")))?;
            if !tail.is_empty() {
                return Err(bad("has trailing bytes".into()));
            }
            let mut row = DayRow::new();
            for (slot, v) in entries {
                if u64::from(slot) >= BUCKETS_PER_ROW || row.last_key_value().is_some_and(|(k, _)| *k >= slot)
                {
                    return Err(bad(format!("has slot {slot} out of place")));
                }
                row.insert(slot, v);
            }
            Ok(row)
        }
        Some((v, _)) => Err(bad(format!("has unknown version {v}"))),
        None => Err(bad("is empty".into())),
    }
}

/// Signed changes to one slot, summed over a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SlotDelta {
    up: i128,
    down: i128,
    records: i64,
}

/// Applies a batch's deltas to a stored row; `None` when a slot would leave its range
/// (stored state contradicts the records).
fn apply_deltas(mut row: DayRow, deltas: &BTreeMap<u8, SlotDelta>) -> Option<DayRow> {
    for (slot, d) in deltas {
        let s = row.entry(*slot).or_default();
        s.up = s.up.checked_add_signed(d.up)?;
        s.down = s.down.checked_add_signed(d.down)?;
        s.records = u32::try_from(i64::from(s.records).checked_add(d.records)?).ok()?;
        if s.records == 0 {
            if (s.up, s.down) != (0, 0) {
                return None;
            }
            row.remove(slot);
        }
    }
    Some(row)
}

/// The `rollup_faulty` key of a faulty record.
pub fn faulty_key(iccid: u64, id: RecordId) -> [u8; FAULTY_KEY_BYTES] {
    let mut k = [0u8; FAULTY_KEY_BYTES];
    k[..8].copy_from_slice(&iccid.to_be_bytes());
    k[8..].copy_from_slice(&id.to_key());
    k
}

/// The first and last possible record keys of an epoch.
fn epoch_bounds(id: RecordId) -> ([u8; RECORD_KEY_BYTES], [u8; RECORD_KEY_BYTES]) {
    let lo = RecordId { seq: 0, ..id }.to_key();
    let hi = RecordId { seq: u32::MAX, ..id }.to_key();
    (lo, hi)
}

/// A record whose value the batch writes: a new one, or a stored one whose running maximum
/// a late record raised.
#[derive(Clone, Debug)]
struct Planned {
    gateway_id: u64,
    received_ms: u64,
    report: Bytes,
    entry: EpochEntry,
    max_through: Totals,
}

/// Everything one batch writes, and its outcomes.
#[derive(Default)]
struct BatchPlan {
    outcomes: Vec<Option<InsertOutcome>>,
    records: BTreeMap<[u8; RECORD_KEY_BYTES], Planned>,
    /// Keys of the records this batch stores for the first time (not those it rewrites).
    new_keys: Vec<[u8; RECORD_KEY_BYTES]>,
    /// Changes to `rollup_days` rows, by row and slot; applied to the stored rows at commit.
    rows: BTreeMap<[u8; DAY_KEY_BYTES], BTreeMap<u8, SlotDelta>>,
    faulty: Vec<[u8; FAULTY_KEY_BYTES]>,
    /// Each meter's state when planning began (its generation must still hold at commit)
    /// and the tails of the epochs the batch touches, as stored before the batch.
    meters: BTreeMap<u64, MeterState>,
    tails: BTreeMap<(u64, u32), Tail>,
}

impl BatchPlan {
    /// The last record of an epoch once this batch is written: the later of the stored
    /// tail and the batch's own last record of the epoch.
    fn tail_after(&self, meter_id: u64, epoch: u32) -> Option<Tail> {
        let stored = *self.tails.get(&(meter_id, epoch))?;
        let (lo, hi) = epoch_bounds(RecordId { meter_id, epoch, seq: 0 });
        match self.records.range(lo..=hi).next_back() {
            Some((k, p)) if stored.seq.is_none_or(|s| p.entry.seq >= s) => {
                let _ = k;
                Some(Tail { epoch, seq: Some(p.entry.seq), max: p.max_through })
            }
            _ => Some(stored),
        }
    }
}

/// The running maximum a stored record's value carries.
fn running_max(id: RecordId, value: &[u8]) -> Result<Totals, StoreError> {
    decode_value(value)?
        .max_through
        .ok_or_else(|| StoreError::Corrupt(format!("record {id}: no running maximum (rollups not built)")))
}

/// A stored record as the planner reads it.
fn stored(key: &[u8], value: &[u8]) -> Result<Planned, StoreError> {
    let id = RecordId::from_key(key)
        .ok_or_else(|| StoreError::Corrupt(format!("record key of {} bytes", key.len())))?;
    let v = decode_value(value)?;
    let max_through = v
        .max_through
        .ok_or_else(|| StoreError::Corrupt(format!("record {id}: no running maximum (rollups not built)")))?;
    let usage = decode_usage(id, v.report, v.received_ms)?;
    Ok(Planned {
        gateway_id: v.gateway_id,
        received_ms: v.received_ms,
        report: Bytes::copy_from_slice(v.report),
        entry: EpochEntry::of(&usage),
        max_through,
    })
}

/// Why a commit did not happen.
enum CommitError {
    Replan,
    Store(StoreError),
}

impl Store {
    /// Stores a batch's verified records with their rollups and flushes, so both are durable
    /// when this returns. One outcome per input, in input order; a second copy of an id
    /// inside the batch is settled against the first, as across batches.
    pub fn insert_batch(
        &self,
        gateway_id: u64,
        records: &[NewRecord],
    ) -> Result<Vec<InsertOutcome>, StoreError> {
        for attempt in 0..INGEST_REPLANS_MAX {
            let plan = self.plan_batch(gateway_id, records)?;
            match self.commit(&plan) {
                Ok(()) => {
                    // Flush even when nothing was stored: a duplicate may be an earlier
                    // attempt's write that was never flushed, and it is acknowledged now.
                    self.flush()?;
                    return plan
                        .outcomes
                        .into_iter()
                        .map(|o| o.ok_or_else(|| StoreError::Corrupt("a record got no outcome".into())))
                        .collect();
                }
                Err(CommitError::Replan) => {
                    tracing::debug!(attempt, gateway_id, "batch planned again: its meters changed meanwhile");
                }
                Err(CommitError::Store(e)) => return Err(e),
            }
        }
        Err(StoreError::Contended { what: "records of the same meters" })
    }

    fn plan_batch(&self, gateway_id: u64, records: &[NewRecord]) -> Result<BatchPlan, StoreError> {
        let mut plan = BatchPlan { outcomes: vec![None; records.len()], ..BatchPlan::default() };
        // The meters' state first: a tail read from the tree below is only trusted because
        // the generation read before it must still hold at commit.
        for r in records {
            plan.meters.entry(r.id.meter_id).or_insert_with(|| self.meter_state.get(r.id.meter_id));
        }
        // In id order, so that a batch's own records of an epoch are planned as in-order
        // arrival; outcomes go back to input order.
        let mut order: Vec<usize> = (0..records.len()).collect();
        order.sort_by_key(|&i| records[i].id);
        for i in order {
            let outcome = self.plan_record(gateway_id, &records[i], &mut plan)?;
            plan.outcomes[i] = Some(outcome);
        }
        Ok(plan)
    }

    /// The stored tail of a record's epoch: from the meter's state when it is of that epoch,
    /// else read from the tree (once per epoch and batch).
    fn stored_tail(&self, id: RecordId, plan: &mut BatchPlan) -> Result<Tail, StoreError> {
        if let Some(t) = plan.tails.get(&(id.meter_id, id.epoch)) {
            return Ok(*t);
        }
        let cached = plan.meters.get(&id.meter_id).and_then(|m| m.tail).filter(|t| t.epoch == id.epoch);
        let tail = match cached {
            Some(t) => t,
            None => {
                let (lo, hi) = epoch_bounds(id);
                match self.records.range(lo..=hi).next_back() {
                    Some(kv) => {
                        let (k, v) = kv?;
                        let last = RecordId::from_key(&k)
                            .ok_or_else(|| StoreError::Corrupt(format!("record key of {} bytes", k.len())))?;
                        Tail { epoch: id.epoch, seq: Some(last.seq), max: running_max(last, &v)? }
                    }
                    None => Tail { epoch: id.epoch, seq: None, max: Totals::default() },
                }
            }
        };
        plan.tails.insert((id.meter_id, id.epoch), tail);
        Ok(tail)
    }

    fn plan_record(
        &self,
        gateway_id: u64,
        r: &NewRecord,
        plan: &mut BatchPlan,
    ) -> Result<InsertOutcome, StoreError> {
        let key = r.id.to_key();
        let same = |stored: &[u8]| {
            if stored == &r.report[..] {
                InsertOutcome::Duplicate
            } else {
                InsertOutcome::Conflict
            }
        };
        if let Some(p) = plan.records.get(&key) {
            return Ok(same(&p.report));
        }
        let tail = self.stored_tail(r.id, plan)?;
        let (lo, _) = epoch_bounds(r.id);
        let entry = EpochEntry::of(&r.usage());
        let in_order = tail.seq.is_none_or(|s| r.id.seq > s);
        let made = if in_order {
            // After everything stored of its epoch: nothing stored can have its id, its
            // predecessor is the tail or the batch's previous record of the epoch, and nothing
            // comes after it (the batch is planned in id order). No tree read.
            let before = match plan.records.range(lo..key).next_back() {
                Some((_, p)) if tail.seq.is_none_or(|s| p.entry.seq >= s) => p.max_through,
                _ => tail.max,
            };
            plan_insert(entry, before, std::iter::empty())
                .map_err(|e| StoreError::Corrupt(format!("record {}: {e}", r.id)))?
        } else {
            if let Some(v) = self.records.get(key)? {
                return Ok(same(decode_value(&v)?.report));
            }
            match self.plan_late(r, entry, plan)? {
                Some(made) => made,
                None => return Ok(InsertOutcome::Stored),
            }
        };
        self.apply_made(gateway_id, r, entry, made, plan)?;
        Ok(InsertOutcome::Stored)
    }

    /// Plans a record that arrives before others of its epoch: reads its predecessor and,
    /// lazily, the later records it changes (the tree's, overlaid by the batch's).
    fn plan_late(
        &self,
        r: &NewRecord,
        entry: EpochEntry,
        plan: &mut BatchPlan,
    ) -> Result<Option<InsertPlan>, StoreError> {
        let key = r.id.to_key();
        let (lo, hi) = epoch_bounds(r.id);
        // The predecessor: the later of the tree's and the batch's (the batch's copy of a
        // stored record is the newer one).
        let from_tree = match self.records.range(lo..key).next_back() {
            Some(kv) => {
                let (k, v) = kv?;
                let id = RecordId::from_key(&k)
                    .ok_or_else(|| StoreError::Corrupt(format!("record key of {} bytes", k.len())))?;
                Some((id.to_key(), running_max(id, &v)?))
            }
            None => None,
        };
        let from_batch = plan.records.range(lo..key).next_back().map(|(k, p)| (*k, p.max_through));
        let before = match (from_tree, from_batch) {
            (Some(t), Some(b)) if b.0 >= t.0 => b.1,
            (Some(t), _) => t.1,
            (None, Some(b)) => b.1,
            (None, None) => Totals::default(),
        };
        let mut failure = None;
        let mut read: Vec<([u8; RECORD_KEY_BYTES], Planned)> = Vec::new();
        let overlay: Vec<([u8; RECORD_KEY_BYTES], Planned)> = plan
            .records
            .range((Bound::Excluded(key), Bound::Included(hi)))
            .map(|(k, p)| (*k, p.clone()))
            .collect();
        let tree = self.records.range((Bound::Excluded(key), Bound::Included(hi))).map(|kv| {
            let (k, v) = kv?;
            let planned = stored(&k, &v)?;
            let k: [u8; RECORD_KEY_BYTES] = k.as_ref().try_into().unwrap_or([0; RECORD_KEY_BYTES]);
            Ok::<_, StoreError>((k, planned))
        });
        let after = merge_after(tree, overlay).map_while(|item| match item {
            Ok(kp) => Some(kp),
            Err(e) => {
                failure = Some(e);
                None
            }
        });
        let made = plan_insert(
            entry,
            before,
            after.map(|(k, p)| {
                let booked = Booked { entry: p.entry, max_through: p.max_through };
                read.push((k, p));
                booked
            }),
        );
        if let Some(e) = failure {
            return Err(e);
        }
        let made = made.map_err(|e| StoreError::Corrupt(format!("record {}: {e}", r.id)))?;
        for (seq, max) in &made.raised {
            let k = RecordId { seq: *seq, ..r.id }.to_key();
            let (_, p) = read.iter().find(|(rk, _)| *rk == k).ok_or_else(|| {
                StoreError::Corrupt(format!("record {}: raised a record it did not read", r.id))
            })?;
            plan.records.insert(k, Planned { max_through: *max, ..p.clone() });
        }
        Ok(Some(made))
    }

    /// Adds a planned record, its contribution and those it changes to the batch's writes.
    fn apply_made(
        &self,
        gateway_id: u64,
        r: &NewRecord,
        entry: EpochEntry,
        made: InsertPlan,
        plan: &mut BatchPlan,
    ) -> Result<(), StoreError> {
        plan.new_keys.push(r.id.to_key());
        plan.records.insert(
            r.id.to_key(),
            Planned {
                gateway_id,
                received_ms: r.received_ms,
                report: r.report.clone(),
                entry,
                max_through: made.max_through,
            },
        );
        if entry.bucket.is_none() {
            plan.faulty.push(faulty_key(r.iccid, r.id));
        }
        for d in &made.deltas {
            let (day, slot) = row_of(d.bucket).ok_or_else(|| {
                StoreError::Corrupt(format!("record {}: bucket {} beyond the calendar", r.id, d.bucket))
            })?;
            let s =
                plan.rows.entry(day_key(d.iccid, day, r.id.meter_id)).or_default().entry(slot).or_default();
            match (
                s.up.checked_add(i128::from(d.up)),
                s.down.checked_add(i128::from(d.down)),
                s.records.checked_add(i64::from(d.records)),
            ) {
                (Some(up), Some(down), Some(records)) => *s = SlotDelta { up, down, records },
                _ => return Err(StoreError::Corrupt(format!("record {}: rollup change out of range", r.id))),
            }
        }
        Ok(())
    }

    /// Writes a plan in one transaction, unless a commit touched the batch's meters since
    /// planning began; then records the meters' new tails.
    fn commit(&self, plan: &BatchPlan) -> Result<(), CommitError> {
        let mut records = Vec::with_capacity(plan.records.len());
        for (k, p) in &plan.records {
            let v = encode_value(p.gateway_id, p.received_ms, &p.report, p.max_through)
                .map_err(CommitError::Store)?;
            records.push((IVec::from(&k[..]), IVec::from(v)));
        }
        // The newest epoch's tail of each meter, as the batch leaves it.
        let mut tails: BTreeMap<u64, Tail> = BTreeMap::new();
        for &(meter, epoch) in plan.tails.keys() {
            if let Some(t) = plan.tail_after(meter, epoch) {
                tails.insert(meter, t);
            }
        }
        // A row belongs to one meter (its key names it), so what is read here is still what
        // is stored at commit unless the generation check below sends the batch back.
        let mut rows: Vec<(IVec, Option<IVec>)> = Vec::with_capacity(plan.rows.len());
        for (k, deltas) in &plan.rows {
            let stored = match self.rollup_days.get(k).map_err(|e| CommitError::Store(e.into()))? {
                Some(v) => decode_day_row(&v).map_err(CommitError::Store)?,
                None => DayRow::new(),
            };
            let row = apply_deltas(stored, deltas).ok_or_else(|| {
                CommitError::Store(StoreError::Corrupt(format!(
                    "rollup row {}: a slot would leave its range",
                    hex::encode(k)
                )))
            })?;
            let value = match row.is_empty() {
                true => None,
                false => Some(IVec::from(encode_day_row(&row).map_err(CommitError::Store)?)),
            };
            rows.push((IVec::from(&k[..]), value));
        }
        if records.is_empty() && plan.rows.is_empty() && plan.faulty.is_empty() {
            // Only duplicates and conflicts: settled against records that never change.
            return Ok(());
        }
        // Rows changed before the ledger's mark are marked for the next settlement run;
        // in-order arrival changes only open days and marks nothing.
        let _gate = self.settle_gate.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = self.changes_before_bucket.load(std::sync::atomic::Ordering::SeqCst);
        let mut marks: Vec<[u8; CHANGED_KEY_BYTES]> = Vec::new();
        if before > 0 {
            for (k, deltas) in &plan.rows {
                let (Some((sim, day, _)), Some(first_slot)) = (parse_day_key(k), deltas.keys().next()) else {
                    continue;
                };
                if u64::from(day) * BUCKETS_PER_ROW + u64::from(*first_slot) < before {
                    marks.push(day_bound(sim, day));
                }
            }
            marks.dedup();
        }
        // Records wait in `lago_pending` for the Lago planner while an export is configured.
        let lago_pending = self.lago_pending_on.load(std::sync::atomic::Ordering::SeqCst);
        let mark = match marks.is_empty() {
            true => 0,
            false => self.db.generate_id().map_err(|e| CommitError::Store(e.into()))?,
        };
        // The records' own writes, under sled's write lock: no other commit runs until this
        // one is applied.
        let core = |rec: &TransactionalTree,
                    days: &TransactionalTree,
                    faulty: &TransactionalTree|
         -> ConflictableTransactionResult<(), ()> {
            if plan.meters.iter().any(|(m, s)| self.meter_state.get(*m).generation != s.generation) {
                return Err(ConflictableTransactionError::Abort(()));
            }
            for (k, v) in &records {
                rec.insert(k.clone(), v.clone())?;
            }
            for (k, v) in &rows {
                match v {
                    Some(v) => days.insert(k.clone(), v.clone())?,
                    None => days.remove(k.clone())?,
                };
            }
            for k in &plan.faulty {
                faulty.insert(&k[..], &[][..])?;
            }
            Ok(())
        };
        let committed = || {
            for m in plan.meters.keys() {
                self.meter_state.committed(*m, tails.get(m).copied());
            }
        };
        // Every tree a transaction names costs it time: the common batch (in order, no
        // export queue) names the three it writes.
        let result = if marks.is_empty() && !lago_pending {
            (&self.records, &self.rollup_days, &self.rollup_faulty).transaction(|(rec, days, faulty)| {
                core(rec, days, faulty)?;
                committed();
                Ok(())
            })
        } else {
            let trees = (
                &self.records,
                &self.rollup_days,
                &self.rollup_faulty,
                &self.rollup_changed,
                &self.lago_pending,
            );
            trees.transaction(|(rec, days, faulty, changed, pending)| {
                core(rec, days, faulty)?;
                for k in &marks {
                    changed.insert(&k[..], &mark.to_be_bytes()[..])?;
                }
                if lago_pending {
                    for k in &plan.new_keys {
                        pending.insert(&k[..], &[][..])?;
                    }
                }
                committed();
                Ok(())
            })
        };
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(())) => Err(CommitError::Replan),
            Err(TransactionError::Storage(e)) => {
                // The meters' state may be ahead of the trees now: forget it.
                for m in plan.meters.keys() {
                    self.meter_state.committed(*m, None);
                }
                Err(CommitError::Store(e.into()))
            }
        }
    }

    /// Raises the bucket before which ingest marks changed rows for the ledger (never
    /// lowers it); durable when it returns. Waits for commits in flight: every commit after
    /// it marks what it changes before `bucket`, every commit before it is visible to reads
    /// that follow.
    pub(crate) fn raise_changes_before(&self, bucket: u64) -> Result<(), StoreError> {
        let _gate = self.settle_gate.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if bucket <= self.changes_before_bucket.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        self.rollup_meta.insert(META_CHANGES_BEFORE_KEY, &bucket.to_be_bytes()[..])?;
        self.rollup_meta.flush()?;
        self.changes_before_bucket.store(bucket, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// The marked rows of the next SIM from `from_sim` on: its ICCID, and each mark's UTC day
    /// and the mark (a unique id, so that clearing it cannot clear a newer mark).
    pub(crate) fn changed_rows_of_next_sim(&self, from_sim: u64) -> Result<Option<ChangedRows>, StoreError> {
        let mut out: Option<ChangedRows> = None;
        for kv in self.rollup_changed.range(from_sim.to_be_bytes().to_vec()..) {
            let (k, v) = kv?;
            let bad = || StoreError::Corrupt(format!("rollup_changed entry {}", hex::encode(&k)));
            let (Ok(key), Ok(mark)) =
                (<[u8; CHANGED_KEY_BYTES]>::try_from(&k[..]), <[u8; 8]>::try_from(&v[..]))
            else {
                return Err(bad());
            };
            let sim = u64::from_be_bytes(key[..8].try_into().map_err(|_| bad())?);
            let day = u32::from_be_bytes(key[8..].try_into().map_err(|_| bad())?);
            match out.as_mut() {
                None => out = Some((sim, vec![(day, u64::from_be_bytes(mark))])),
                Some((s, rows)) if *s == sim => rows.push((day, u64::from_be_bytes(mark))),
                Some(_) => break,
            }
        }
        Ok(out)
    }

    /// Clears a mark unless the row was marked again since it was read.
    pub(crate) fn clear_changed_row(&self, sim: u64, day: u32, mark: u64) -> Result<(), StoreError> {
        let _ = self.rollup_changed.compare_and_swap(
            day_bound(sim, day),
            Some(&mark.to_be_bytes()[..]),
            None::<&[u8]>,
        )?;
        Ok(())
    }

    /// Whether the rollups match this version's layout (built, or written by it since).
    pub fn rollups_built(&self) -> Result<bool, StoreError> {
        Ok(self.rollup_meta.get(META_VERSION_KEY)?.as_deref() == Some(&ROLLUP_VERSION.to_be_bytes()[..]))
    }

    /// Derives the rollups again from the records: clears them, then walks the records in
    /// key order, epoch by epoch, writing each record's running maximum and adding its
    /// contribution to its row. O(records) time, O(one batch) memory; logs progress every
    /// `REBUILD_PROGRESS_RECORDS`. Ingest must not run meanwhile (the endpoint runs it at
    /// open, before it serves; the CLI command opens the store itself, so no endpoint can
    /// hold it). Interrupted, it starts again from the beginning at the next open. Returns
    /// the records seen.
    pub fn rebuild_rollups(&self) -> Result<u64, StoreError> {
        self.meter_state.forget();
        self.rollup_meta.remove(META_VERSION_KEY)?;
        self.rollup_days.clear()?;
        self.rollup_faulty.clear()?;
        let seen = self.derive_rollups(&self.rollup_days, &self.rollup_faulty, true, |_, _, _| {})?;
        self.rollup_meta.insert(META_VERSION_KEY, &ROLLUP_VERSION.to_be_bytes()[..])?;
        self.flush()?;
        Ok(seen)
    }

    /// Writes the rollups of every stored record into `days` and `faulty` (empty trees), and
    /// with `write_max` each record's running maximum into its value; `on_max` sees every
    /// record whose stored running maximum differs from the derived one. Returns the records.
    fn derive_rollups(
        &self,
        days: &sled::Tree,
        faulty: &sled::Tree,
        write_max: bool,
        mut on_max: impl FnMut(RecordId, Option<Totals>, Totals),
    ) -> Result<u64, StoreError> {
        let mut seen = 0u64;
        let mut epoch: Option<(u64, u32)> = None;
        let mut max = Totals::default();
        let mut rows: BTreeMap<[u8; DAY_KEY_BYTES], BTreeMap<u8, SlotDelta>> = BTreeMap::new();
        let mut values = sled::Batch::default();
        let flush_rows =
            |rows: &mut BTreeMap<[u8; DAY_KEY_BYTES], BTreeMap<u8, SlotDelta>>| -> Result<(), StoreError> {
                for (k, deltas) in std::mem::take(rows) {
                    let row = match days.get(k)? {
                        Some(v) => decode_day_row(&v)?,
                        None => DayRow::new(),
                    };
                    let row = apply_deltas(row, &deltas).ok_or_else(|| {
                        StoreError::Corrupt(format!("rollup row {}: out of range", hex::encode(k)))
                    })?;
                    days.insert(k, encode_day_row(&row)?)?;
                }
                Ok(())
            };
        for kv in self.records.iter() {
            let (k, v) = kv?;
            let id = RecordId::from_key(&k)
                .ok_or_else(|| StoreError::Corrupt(format!("record key of {} bytes", k.len())))?;
            let value = decode_value(&v)?;
            let usage = decode_usage(id, value.report, value.received_ms)?;
            if epoch != Some((id.meter_id, id.epoch)) {
                epoch = Some((id.meter_id, id.epoch));
                max = Totals::default();
            }
            let before = max;
            max = Totals { up: max.up.max(usage.used.up), down: max.down.max(usage.used.down) };
            match EpochEntry::of(&usage).bucket.and_then(row_of) {
                Some((day, slot)) => {
                    let d = rows
                        .entry(day_key(usage.iccid, day, id.meter_id))
                        .or_default()
                        .entry(slot)
                        .or_default();
                    // Cannot overflow: each side is at most one record's `used` (< 2^64).
                    let add = |a: i128, b: u64, c: u64| a.checked_add(i128::from(b - c));
                    match (add(d.up, max.up, before.up), add(d.down, max.down, before.down)) {
                        (Some(up), Some(down)) => *d = SlotDelta { up, down, records: d.records + 1 },
                        _ => {
                            return Err(StoreError::Corrupt(format!(
                                "record {id}: contribution out of range"
                            )))
                        }
                    }
                }
                None => {
                    faulty.insert(faulty_key(usage.iccid, id), &[][..])?;
                }
            }
            if value.max_through != Some(max) {
                on_max(id, value.max_through, max);
                if write_max {
                    values.insert(
                        &k[..],
                        encode_value(value.gateway_id, value.received_ms, value.report, max)?,
                    );
                }
            }
            seen += 1;
            if seen % REBUILD_BATCH_RECORDS == 0 {
                flush_rows(&mut rows)?;
                self.records.apply_batch(std::mem::take(&mut values))?;
            }
            if seen % REBUILD_PROGRESS_RECORDS == 0 {
                tracing::info!(records = seen, "deriving rollups");
            }
        }
        flush_rows(&mut rows)?;
        self.records.apply_batch(values)?;
        Ok(seen)
    }

    /// Compares the stored rollups with a derivation from the records, written to scratch
    /// trees and compared in key order: every record's running maximum, every row, the
    /// faulty list. O(records) time, O(one batch) memory. Returns what differs (at most
    /// `limit` described), nothing when they agree.
    pub fn check_rollups(&self, limit: usize) -> Result<RollupCheck, StoreError> {
        let mut out = RollupCheck::default();
        let note = |out: &mut RollupCheck, what: String| {
            out.differences += 1;
            if out.described.len() < limit {
                out.described.push(what);
            }
        };
        if !self.rollups_built()? {
            note(&mut out, "rollups are not marked built".into());
        }
        let days = self.db().open_tree(CHECK_DAYS_TREE)?;
        let faulty = self.db().open_tree(CHECK_FAULTY_TREE)?;
        days.clear()?;
        faulty.clear()?;
        out.records = self.derive_rollups(&days, &faulty, false, |id, stored, derived| {
            note(&mut out, format!("record {id}: running maximum {stored:?}, derived {derived:?}"))
        })?;
        for (what, stored, derived) in
            [("row", &self.rollup_days, &days), ("faulty", &self.rollup_faulty, &faulty)]
        {
            let mut a = stored.iter().peekable();
            let mut b = derived.iter().peekable();
            loop {
                let (x, y) = (a.peek().cloned().transpose()?, b.peek().cloned().transpose()?);
                match (x, y) {
                    (None, None) => break,
                    (Some((ka, va)), Some((kb, vb))) if ka == kb => {
                        if va != vb {
                            let (sa, sb) = (describe_row(&va), describe_row(&vb));
                            note(&mut out, format!("{what} {}: stored {sa}, derived {sb}", hex::encode(&ka)));
                        }
                        a.next();
                        b.next();
                    }
                    (Some((ka, _)), Some((kb, _))) if ka < kb => {
                        note(&mut out, format!("{what} {}: stored but not derived", hex::encode(&ka)));
                        a.next();
                    }
                    (Some((ka, _)), None) => {
                        note(&mut out, format!("{what} {}: stored but not derived", hex::encode(&ka)));
                        a.next();
                    }
                    (_, Some((kb, _))) => {
                        note(&mut out, format!("{what} {}: derived but not stored", hex::encode(&kb)));
                        b.next();
                    }
                }
            }
        }
        self.db().drop_tree(CHECK_DAYS_TREE)?;
        self.db().drop_tree(CHECK_FAULTY_TREE)?;
        Ok(out)
    }

    /// Builds the rollups when the store was written without them (an older version).
    pub(crate) fn ensure_rollups(&self) -> Result<(), StoreError> {
        if self.rollups_built()? {
            return Ok(());
        }
        let started = std::time::Instant::now();
        tracing::info!("building rollups from the stored records");
        let records = self.rebuild_rollups()?;
        tracing::info!(records, elapsed_ms = started.elapsed().as_millis() as u64, "rollups built");
        Ok(())
    }
}

fn describe_row(v: &[u8]) -> String {
    match decode_day_row(v) {
        Ok(row) => format!("{row:?}"),
        Err(_) => hex::encode(v),
    }
}

/// The usage view of a stored report.
pub(crate) fn decode_usage(id: RecordId, report: &[u8], received_ms: u64) -> Result<UsageRecord, StoreError> {
    let (report, _) = Report::decode(report)
        .map_err(|e| StoreError::Corrupt(format!("record {id}: stored report does not decode: {e}")))?;
    Ok(UsageRecord::from_report(&report, received_ms))
}

/// The tree's later records merged with the batch's, the batch's copy winning on equal keys.
fn merge_after<I>(
    tree: I,
    overlay: Vec<([u8; RECORD_KEY_BYTES], Planned)>,
) -> impl Iterator<Item = Result<([u8; RECORD_KEY_BYTES], Planned), StoreError>>
where
    I: Iterator<Item = Result<([u8; RECORD_KEY_BYTES], Planned), StoreError>>,
{
    let mut tree = tree.peekable();
    let mut overlay = overlay.into_iter().peekable();
    std::iter::from_fn(move || {
        let tree_key = match tree.peek() {
            Some(Ok((k, _))) => Some(*k),
            Some(Err(_)) => return tree.next(),
            None => None,
        };
        match (tree_key, overlay.peek().map(|(k, _)| *k)) {
            (Some(t), Some(o)) if o < t => overlay.next().map(Ok),
            (Some(t), Some(o)) if o == t => {
                tree.next();
                overlay.next().map(Ok)
            }
            (Some(_), _) => tree.next(),
            (None, Some(_)) => overlay.next().map(Ok),
            (None, None) => None,
        }
    })
}

impl Store {
    /// Bytes per (ICCID, day in `tz`) from the rollups: of one SIM (`iccid`) or of all, and
    /// only the days in `range`. Costs the rows of the SIMs and days asked for (one per SIM
    /// and UTC day with records), never the rest of history. Equal to the derivation over
    /// every record restricted the same way (property-tested). A zone whose day boundaries
    /// fall inside a quarter hour on a date asked for (offsets of seconds, before 1972) is
    /// answered by that derivation instead: exact, at the cost of history.
    pub fn rollup_daily_in(
        &self,
        iccid: Option<u64>,
        tz: &TimeZone,
        range: DateRange,
    ) -> Result<Derived, StoreError> {
        let scope = iccid.map_or(Scope::All, Scope::Sim);
        Ok(self.rollup_read(scope, tz, range)?.derived)
    }

    /// One page of SIMs' usage per day in `tz` over `range` (see [`SimPage`]): the SIMs with
    /// rollup rows in the range after `page.after`, in ICCID order. Costs the rows of the
    /// page's SIMs in the range plus two seeks per SIM, whatever the history and fleet size.
    pub fn rollup_page_in(
        &self,
        tz: &TimeZone,
        range: DateRange,
        page: SimPage,
    ) -> Result<UsagePage, StoreError> {
        self.rollup_read(Scope::Page(page), tz, range)
    }

    fn rollup_read(&self, scope: Scope, tz: &TimeZone, range: DateRange) -> Result<UsagePage, StoreError> {
        let (first_row, last_row) = rows_of_range(tz, range);
        if !rows_on_buckets(tz, first_row, last_row) {
            let mut all = self.derive_from_records_in(tz)?;
            all.daily.retain(|(_, d), _| range.contains(*d));
            return Ok(match scope {
                Scope::Sim(sim) => {
                    all.retain_sim(sim);
                    UsagePage { derived: all, next_after: None }
                }
                Scope::All => UsagePage { derived: all, next_after: None },
                Scope::Page(page) => UsagePage::cut(all, page),
            });
        }
        // Rows first (a page learns its last ICCID from them), faults after, and the faults
        // win: a faulty SIM's days are left out whatever its other records say.
        let mut rows_out = Derived::default();
        let from_sim = match scope {
            Scope::Sim(sim) => sim,
            Scope::All => 0,
            Scope::Page(page) => match page.first_iccid() {
                Some(first) => first,
                None => return Ok(UsagePage::default()),
            },
        };
        let rows = match scope {
            Scope::Sim(sim) => self.rows_in(Some(sim), 0, first_row, last_row),
            _ => self.rows_in(None, from_sim, first_row, last_row),
        };
        let limit = match scope {
            Scope::Page(page) => page.limit,
            _ => usize::MAX,
        };
        // The zone's date of each bucket, cached: most rows share a handful of days.
        let mut dates: HashMap<u64, Option<Date>> = HashMap::new();
        // Overflow of a SIM's total is blamed on no record: rows do not keep record ids.
        let unnamed = RecordId { meter_id: 0, epoch: 0, seq: 0 };
        let (mut sims, mut last_sim, mut next_after) = (0usize, None, None);
        for kv in rows {
            let (k, v) = kv?;
            let (sim, day, _) = parse_day_key(&k)
                .ok_or_else(|| StoreError::Corrupt(format!("rollup row key of {} bytes", k.len())))?;
            if !(first_row..=last_row).contains(&day) {
                continue;
            }
            if last_sim != Some(sim) {
                if sims == limit {
                    next_after = last_sim;
                    break;
                }
                sims += 1;
                last_sim = Some(sim);
            }
            for (slot, s) in decode_day_row(&v)? {
                let bucket = u64::from(day) * BUCKETS_PER_ROW + u64::from(slot);
                let date = *dates.entry(bucket).or_insert_with(|| bucket_date(bucket, tz));
                let date =
                    date.ok_or_else(|| StoreError::Corrupt(format!("rollup bucket {bucket} has no date")))?;
                if !range.contains(date) {
                    continue;
                }
                match (u64::try_from(s.up), u64::try_from(s.down)) {
                    (Ok(up), Ok(down)) => rows_out.add(sim, unnamed, date, Totals { up, down }),
                    _ => rows_out.fault(SimFault {
                        iccid: sim,
                        record: unnamed,
                        reason: FaultReason::Overflow,
                    }),
                }
            }
        }
        let mut out = Derived::default();
        let faulty = match (scope, next_after) {
            (Scope::Sim(sim), _) => self.rollup_faulty.scan_prefix(sim.to_be_bytes()),
            (_, Some(last)) => self.rollup_faulty.range(
                from_sim.to_be_bytes().to_vec()
                    ..last.checked_add(1).map_or(vec![0xff; 9], |n| n.to_be_bytes().to_vec()),
            ),
            (_, None) => self.rollup_faulty.range(from_sim.to_be_bytes().to_vec()..),
        };
        let mut last_faulty = None;
        for kv in faulty {
            let (k, _) = kv?;
            let parsed = (k.len() == FAULTY_KEY_BYTES)
                .then(|| Some((u64::from_be_bytes(k[..8].try_into().ok()?), RecordId::from_key(&k[8..])?)))
                .flatten();
            let (sim, id) = parsed
                .ok_or_else(|| StoreError::Corrupt(format!("rollup faulty key of {} bytes", k.len())))?;
            if last_faulty != Some(sim) {
                last_faulty = Some(sim);
                out.fault(self.fault_of(sim, id)?);
            }
        }
        out.absorb(rows_out);
        Ok(UsagePage { derived: out, next_after })
    }

    /// The `rollup_days` rows of one SIM or of every SIM from `from_sim` on, from UTC day
    /// `first_row` through `last_row`. For every SIM and a bounded span it seeks from SIM to
    /// SIM (two seeks per SIM with rows) instead of reading the SIMs' other days.
    fn rows_in(
        &self,
        iccid: Option<u64>,
        from_sim: u64,
        first_row: u32,
        last_row: u32,
    ) -> Box<dyn Iterator<Item = sled::Result<(IVec, IVec)>> + '_> {
        match iccid {
            Some(sim) => Box::new(
                self.rollup_days.range(day_bound(sim, first_row).to_vec()..day_bound_after(sim, last_row)),
            ),
            None if first_row == 0 && last_row == u32::MAX => {
                Box::new(self.rollup_days.range(day_bound(from_sim, 0).to_vec()..))
            }
            None => {
                let mut current: Option<sled::Iter> = None;
                let mut from = Some(day_bound(from_sim, first_row));
                Box::new(std::iter::from_fn(move || loop {
                    if let Some(rows) = current.as_mut() {
                        match rows.next() {
                            Some(row) => return Some(row),
                            None => current = None,
                        }
                    }
                    let (k, v) = match self.rollup_days.range(from?..).next()? {
                        Ok(kv) => kv,
                        Err(e) => {
                            from = None;
                            return Some(Err(e));
                        }
                    };
                    match parse_day_key(&k) {
                        // The reader refuses it as corrupt.
                        None => {
                            from = None;
                            return Some(Ok((k, v)));
                        }
                        Some((sim, day, _)) if day < first_row => from = Some(day_bound(sim, first_row)),
                        Some((sim, day, _)) if day > last_row => {
                            from = sim.checked_add(1).map(|n| day_bound(n, first_row))
                        }
                        Some((sim, _, _)) => {
                            current =
                                Some(self.rollup_days.range(
                                    day_bound(sim, first_row).to_vec()..day_bound_after(sim, last_row),
                                ));
                            from = sim.checked_add(1).map(|n| day_bound(n, first_row));
                        }
                    }
                }))
            }
        }
    }

    /// The fault of a SIM's first faulty record, read back from the record.
    fn fault_of(&self, iccid: u64, id: RecordId) -> Result<SimFault, StoreError> {
        let usage = self.stored_usage(id)?;
        let reason = record_fault(&usage)
            .ok_or_else(|| StoreError::Corrupt(format!("record {id}: listed faulty but counts")))?;
        Ok(SimFault { iccid, record: id, reason })
    }

    fn stored_usage(&self, id: RecordId) -> Result<UsageRecord, StoreError> {
        let v = self
            .records
            .get(id.to_key())?
            .ok_or_else(|| StoreError::Corrupt(format!("record {id}: in the rollups but not stored")))?;
        let value = decode_value(&v)?;
        decode_usage(id, value.report, value.received_ms)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use countersign_rating::usage::{time_zone, USED_BYTES_PER_EPOCH_MAX};
    use countersign_testkit::report::{network_time, ReportBuilder};
    use proptest::prelude::*;

    use super::*;

    const KEY: [u8; 32] = [9u8; 32];
    /// The last is above 2^63: PostgreSQL stores it as a negative BIGINT, pages still run in
    /// unsigned order.
    const SIMS: [u64; 4] = [
        8_988_280_666_000_000_001,
        8_988_280_666_000_000_002,
        8_988_280_666_000_000_003,
        9_300_000_000_000_000_001,
    ];
    /// 2026-03-29T00:00:00Z: Europe's spring DST change is in the first day.
    const START_S: u64 = 1_774_742_400;

    /// Opens (or, after a handle was dropped, reopens) the store: sled's flusher thread may
    /// hold the directory lock for a moment after the drop.
    fn open(dir: &Path) -> Store {
        for _ in 0..100 {
            match Store::open(&dir.join("data"), crate::config::CACHE_CAPACITY_BYTES_MIN) {
                Ok(s) => return s,
                Err(StoreError::Open { .. }) => std::thread::sleep(std::time::Duration::from_millis(20)),
                Err(e) => panic!("{e}"),
            }
        }
        Store::open(&dir.join("data"), crate::config::CACHE_CAPACITY_BYTES_MIN).unwrap()
    }

    /// (meter, epoch, seq, sim, up, down, seconds after START_S, faulty)
    type Spec = (u64, u32, u32, usize, u64, u64, u64, bool);

    fn new_record(s: Spec) -> NewRecord {
        let (meter, epoch, seq, sim, up, down, at, faulty) = s;
        let up = if faulty { USED_BYTES_PER_EPOCH_MAX + 1 } else { up };
        let r =
            ReportBuilder::new(meter, seq, SIMS[sim], network_time(START_S + at)).epoch(epoch).used(up, down);
        NewRecord::new(r.report(), (START_S + at) * 1000, r.encode(&KEY).into())
    }

    fn specs() -> impl Strategy<Value = Vec<Spec>> {
        prop::collection::vec(
            (
                1u64..4,
                0u32..2,
                0u32..25,
                0usize..4,
                0u64..5_000,
                0u64..5_000,
                0u64..3 * 86_400,
                prop::bool::weighted(0.02),
            ),
            1..60,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Records in any arrival order and batching, with duplicates and conflicting copies,
        /// give rollups equal to the full derivation over what was stored, in every zone and
        /// for any one SIM and range; the check finds nothing and a rebuild changes nothing.
        #[test]
        fn rollups_equal_the_derivation_for_any_arrival(
            specs in specs(),
            cuts in prop::collection::vec(1usize..8, 1..20),
            zone in prop::sample::select(vec!["UTC", "Europe/Berlin", "Asia/Kathmandu", "America/St_Johns", "Pacific/Chatham"]),
            from_day in 0u8..3,
            days in 0u8..3,
            page_limit in 1usize..4,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let store = open(dir.path());
            let records: Vec<NewRecord> = specs.into_iter().map(new_record).collect();
            let mut at = 0;
            for cut in cuts.iter().cycle() {
                if at >= records.len() {
                    break;
                }
                let end = (at + cut).min(records.len());
                store.insert_batch(1, &records[at..end]).unwrap();
                at = end;
            }
            let tz = time_zone(zone).unwrap();
            let model = store.derive_from_records_in(&tz).unwrap();
            let rolled = store.rollup_daily_in(None, &tz, DateRange::default()).unwrap();
            prop_assert_eq!(&rolled.daily, &model.daily);
            prop_assert_eq!(&rolled.faults, &model.faults);
            let first = time::macros::date!(2026 - 03 - 29).saturating_add(time::Duration::days(i64::from(from_day)));
            let range = DateRange { from: Some(first), to: Some(first.saturating_add(time::Duration::days(i64::from(days)))) };
            let every = store.rollup_daily_in(None, &tz, range).unwrap();
            let want: BTreeMap<_, _> =
                model.daily.iter().filter(|((_, d), _)| range.contains(*d)).map(|(k, v)| (*k, *v)).collect();
            prop_assert_eq!(&every.daily, &want);
            prop_assert_eq!(&every.faults, &model.faults);
            // Pages of any size, walked by their cursors, add up to the same answer, with
            // each SIM on exactly one page.
            for r in [range, DateRange::default()] {
                let (mut daily, mut faults) = (BTreeMap::new(), BTreeMap::new());
                let mut page = SimPage { after: None, limit: page_limit };
                for _ in 0..=SIMS.len() + 1 {
                    let got = store.rollup_page_in(&tz, r, page).unwrap();
                    let sims: std::collections::BTreeSet<u64> = got.derived.daily.keys().map(|(i, _)| *i).collect();
                    prop_assert!(sims.len() <= page_limit);
                    prop_assert!(sims.iter().all(|i| page.after.is_none_or(|a| *i > a)));
                    prop_assert!(got.next_after.is_none_or(|n| sims.iter().all(|i| *i <= n)));
                    daily.extend(got.derived.daily);
                    faults.extend(got.derived.faults);
                    match got.next_after {
                        Some(n) => page.after = Some(n),
                        None => break,
                    }
                }
                let whole = store.rollup_daily_in(None, &tz, r).unwrap();
                prop_assert_eq!(daily, whole.daily);
                prop_assert_eq!(faults, whole.faults);
            }
            for sim in SIMS {
                let one = store.rollup_daily_in(Some(sim), &tz, range).unwrap();
                let want: BTreeMap<_, _> = model.daily.iter()
                    .filter(|((s, d), _)| *s == sim && range.contains(*d))
                    .map(|(k, v)| (*k, *v))
                    .collect();
                prop_assert_eq!(one.daily, want);
                prop_assert_eq!(one.faults.contains_key(&sim), model.faults.contains_key(&sim));
            }
            let check = store.check_rollups(5).unwrap();
            prop_assert_eq!(check.differences, 0, "{:?}", check.described);
            store.rebuild_rollups().unwrap();
            let again = store.rollup_daily_in(None, &tz, DateRange::default()).unwrap();
            prop_assert_eq!(again.daily, rolled.daily);
        }
    }

    #[test]
    fn a_late_record_moves_usage_and_the_check_sees_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        // seq 0 (100) and seq 2 (300) a day apart; seq 1 (250) arrives last.
        let day = 86_400;
        let r = |seq, up, at| new_record((1, 0, seq, 0, up, 0, at, false));
        store.insert_batch(1, &[r(0, 100, 0), r(2, 300, 2 * day)]).unwrap();
        store.insert_batch(1, &[r(1, 250, day)]).unwrap();
        let got = store.rollup_daily_in(None, &TimeZone::UTC, DateRange::default()).unwrap();
        let ups: Vec<u64> = got.daily.values().map(|t| t.up).collect();
        assert_eq!(ups, [100, 150, 50]);
        assert_eq!(store.check_rollups(10).unwrap().differences, 0);
        // A contribution changed behind the store's back is found.
        let (k, v) = store.rollup_days.iter().next().unwrap().unwrap();
        let mut row = decode_day_row(&v).unwrap();
        row.values_mut().next().unwrap().up += 1;
        store.rollup_days.insert(k, encode_day_row(&row).unwrap()).unwrap();
        let check = store.check_rollups(10).unwrap();
        assert_eq!(check.differences, 1, "{check:?}");
        assert!(check.described[0].starts_with("row "), "{check:?}");
        store.rebuild_rollups().unwrap();
        assert_eq!(store.check_rollups(10).unwrap().differences, 0);
    }

    #[test]
    fn day_row_format_is_pinned_and_decoding_refuses_what_it_cannot_trust() {
        let mut row = DayRow::new();
        row.insert(3, Slot { up: 300, down: 5, records: 2 });
        row.insert(95, Slot { up: 0, down: 0, records: 1 });
        let v = encode_day_row(&row).unwrap();
        assert_eq!(hex::encode(&v), "010203ac0205025f000001");
        assert_eq!(decode_day_row(&v).unwrap(), row);
        assert_eq!(
            hex::encode(day_key(8_988_280_666_000_000_001, 20_000, 7)),
            "7cbcc9a4ce71040100004e200000000000000007"
        );
        for bad in
            ["", "02", "0101600000", "01020300000003000000", "010203ac020502", "010203ac0205025f00000100"]
        {
            assert!(decode_day_row(&hex::decode(bad).unwrap()).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_store_without_rollups_builds_them_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            let r = |seq, up| new_record((1, 0, seq, 0, up, 0, 60 * u64::from(seq), false));
            store.insert_batch(1, &[r(0, 10), r(1, 30)]).unwrap();
            // As an older version left it: no rollups and version 1 values.
            store.rollup_meta.clear().unwrap();
            store.rollup_days.clear().unwrap();
            for kv in store.records.iter() {
                let (k, v) = kv.unwrap();
                let value = decode_value(&v).unwrap();
                let mut v1 = vec![super::super::records::RECORD_VALUE_V1];
                v1.extend(postcard::to_stdvec(&(value.gateway_id, value.received_ms, value.report)).unwrap());
                store.records.insert(k, v1).unwrap();
            }
            store.flush().unwrap();
        }
        let store = open(dir.path());
        assert!(store.rollups_built().unwrap());
        assert_eq!(store.check_rollups(10).unwrap().differences, 0);
        let got = store.rollup_daily_in(None, &TimeZone::UTC, DateRange::default()).unwrap();
        assert_eq!(got.daily.values().map(|t| t.up).sum::<u64>(), 30);
    }
}
