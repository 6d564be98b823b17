//! The Lago outbox in the sled store: trees `lago_outbox` (export sequence → event JSON),
//! `lago_planned` (record id → export sequence), `lago_epoch_max` (meter ‖ epoch → the
//! highest `used` exported) and `lago_meta` (the next export sequence). Planning writes all
//! four in one sled transaction; see [`crate::service::lago`] for why that makes the export exactly
//! once.
//!
//! # The queue of unplanned records
//!
//! `lago_pending` (record id → empty) holds the records the planner has not planned yet, so
//! a round reads the new records and those held back for want of a subscription, never
//! history. Ingest adds each new record in the transaction that stores it, while the queue
//! is on (`rollup_meta` `lago_pending`: `filling`, then `on`); planning removes a record in
//! the transaction that plans it (or when it can never be planned). The first round of an
//! export turns the queue on under the store's settle gate (so every commit either queues
//! its records or is stored before the scan) and queues every stored record not planned
//! yet, once. An endpoint started without an export turns it off and empties it, since
//! nothing would take records off it.

use std::collections::BTreeMap;

use countersign_meter::{RecordId, Totals};
use countersign_rating::lago::{plan_event, plannable, LagoMetric, LAGO_EVENTS_PER_CALL_MAX};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::records::usage_record;
use super::Store;
use crate::store::lago::LAGO_PLAN_RECORDS_PER_FLUSH_MAX;
use crate::store::StoreError;

const OUTBOX_TREE: &str = "lago_outbox";
const PLANNED_TREE: &str = "lago_planned";
const EPOCH_MAX_TREE: &str = "lago_epoch_max";
const META_TREE: &str = "lago_meta";
const NEXT_SEQ_KEY: &[u8] = b"next_seq";

fn epoch_key(id: RecordId) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&id.meter_id.to_be_bytes());
    k[8..].copy_from_slice(&id.epoch.to_be_bytes());
    k
}

fn totals_bytes(t: Totals) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&t.up.to_be_bytes());
    b[8..].copy_from_slice(&t.down.to_be_bytes());
    b
}

fn totals_from(b: &[u8]) -> Result<Totals, StoreError> {
    let (up, down) = b.split_at_checked(8).ok_or_else(|| StoreError::Corrupt("lago epoch max".into()))?;
    let arr = |s: &[u8]| <[u8; 8]>::try_from(s).map_err(|_| StoreError::Corrupt("lago epoch max".into()));
    Ok(Totals { up: u64::from_be_bytes(arr(up)?), down: u64::from_be_bytes(arr(down)?) })
}

fn u64_from(b: &[u8]) -> Result<u64, StoreError> {
    Ok(u64::from_be_bytes(<[u8; 8]>::try_from(b).map_err(|_| StoreError::Corrupt("lago sequence".into()))?))
}

/// `rollup_meta` key of the queue of unplanned records' state.
const PENDING_STATE_KEY: &[u8] = b"lago_pending";
const PENDING_FILLING: &[u8] = b"filling";
const PENDING_ON: &[u8] = b"on";

/// Whether ingest queues new records for the Lago planner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PendingState {
    /// Queueing; the stored records from before are being queued.
    Filling,
    /// Queueing; every unplanned record is in the queue.
    On,
}

/// The queue's state as stored (`None`: off).
pub(crate) fn pending_state(meta: &sled::Tree) -> Result<Option<PendingState>, StoreError> {
    match meta.get(PENDING_STATE_KEY)?.as_deref() {
        None => Ok(None),
        Some(PENDING_FILLING) => Ok(Some(PendingState::Filling)),
        Some(PENDING_ON) => Ok(Some(PendingState::On)),
        Some(other) => Err(StoreError::Corrupt(format!("lago pending state {}", hex::encode(other)))),
    }
}

impl Store {
    /// Stops queueing records for the Lago planner and empties the queue (no export is
    /// configured: nothing would ever take them off). A later export queues what is
    /// unplanned again.
    pub(crate) fn lago_pending_off(&self) -> Result<(), StoreError> {
        {
            let _gate = self.settle_gate.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            if pending_state(&self.rollup_meta)?.is_none() {
                return Ok(());
            }
            self.lago_pending_on.store(false, std::sync::atomic::Ordering::SeqCst);
            self.rollup_meta.remove(PENDING_STATE_KEY)?;
            self.rollup_meta.flush()?;
        }
        self.lago_pending.clear()?;
        self.flush()?;
        tracing::info!("lago: no export configured; records are no longer queued for it");
        Ok(())
    }
}

/// The Lago outbox in the sled store: planning and settling, no network.
#[derive(Clone, Debug)]
pub struct Outbox {
    store: Store,
    outbox: sled::Tree,
    planned: sled::Tree,
    epoch_max: sled::Tree,
    meta: sled::Tree,
}

impl Outbox {
    /// Opens the outbox trees of `store`.
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        let db = store.db();
        Ok(Self {
            store: store.clone(),
            outbox: db.open_tree(OUTBOX_TREE)?,
            planned: db.open_tree(PLANNED_TREE)?,
            epoch_max: db.open_tree(EPOCH_MAX_TREE)?,
            meta: db.open_tree(META_TREE)?,
        })
    }

    /// Plans an event for every stored record not planned yet whose SIM has a subscription;
    /// durable when it returns. Returns how many were planned. Reads only the records waiting
    /// in `lago_pending` (in record id order, the order a scan of every record would plan
    /// them in), so a round costs the new records and those held back for want of a
    /// subscription, not history.
    pub fn plan(
        &self,
        subscriptions: &BTreeMap<u64, String>,
        metric: &LagoMetric,
    ) -> Result<usize, StoreError> {
        self.ensure_pending()?;
        let mut planned = 0usize;
        let mut since_flush = 0usize;
        let mut unmapped = 0usize;
        let pending = &self.store.lago_pending;
        for item in pending.iter() {
            let (key, _) = item?;
            let Some(value) = self.store.records.get(&key)? else {
                return Err(StoreError::Corrupt(format!(
                    "lago pending record {} is not stored",
                    hex::encode(&key)
                )));
            };
            if self.planned.contains_key(&key)? {
                pending.remove(&key)?;
                continue;
            }
            let r = usage_record(Ok((key.clone(), value)))?;
            let Some(sub) = subscriptions.get(&r.iccid) else {
                unmapped += 1;
                continue;
            };
            if !plannable(&r) {
                pending.remove(&key)?;
                continue;
            }
            let ekey = epoch_key(r.id);
            let result = (&self.outbox, &self.planned, &self.epoch_max, &self.meta, pending).transaction(
                |(outbox, planned_t, epoch_max, meta, pending_t)| {
                    let abort = |e: StoreError| ConflictableTransactionError::Abort(e);
                    let max = match epoch_max.get(ekey)? {
                        Some(b) => totals_from(&b).map_err(abort)?,
                        None => Totals::default(),
                    };
                    let event = plan_event(&r, max, sub, metric).map_err(|e| abort(e.into()))?;
                    let seq = match meta.get(NEXT_SEQ_KEY)? {
                        Some(b) => u64_from(&b).map_err(abort)?,
                        None => 0,
                    };
                    let next = seq
                        .checked_add(1)
                        .ok_or_else(|| abort(StoreError::Corrupt("lago sequence exhausted".into())))?;
                    outbox.insert(&seq.to_be_bytes(), event.json)?;
                    planned_t.insert(&key, &seq.to_be_bytes())?;
                    epoch_max.insert(&ekey, &totals_bytes(event.exported_max))?;
                    meta.insert(NEXT_SEQ_KEY, &next.to_be_bytes())?;
                    pending_t.remove(&key)?;
                    Ok(())
                },
            );
            match result {
                Ok(()) => {}
                Err(TransactionError::Abort(e)) => return Err(e),
                Err(TransactionError::Storage(e)) => return Err(e.into()),
            }
            planned += 1;
            since_flush += 1;
            if since_flush >= LAGO_PLAN_RECORDS_PER_FLUSH_MAX {
                self.store.flush()?;
                since_flush = 0;
            }
        }
        self.store.flush()?;
        if unmapped > 0 {
            tracing::warn!(unmapped, "records of SIMs without a Lago subscription are held back");
        }
        Ok(planned)
    }

    /// Turns the queue of unplanned records on: from now on ingest queues every new record,
    /// and every stored record not planned yet is queued once (a store written before, or
    /// while no export was configured). Resumes a queueing cut short by a crash.
    fn ensure_pending(&self) -> Result<(), StoreError> {
        let meta = &self.store.rollup_meta;
        match pending_state(meta)? {
            Some(PendingState::On) => return Ok(()),
            Some(PendingState::Filling) => {}
            None => {
                // Under the gate's write lock: a commit either sees the queue on, or is
                // stored before the scan below begins.
                let _gate = self.store.settle_gate.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                meta.insert(PENDING_STATE_KEY, PENDING_FILLING)?;
                meta.flush()?;
                self.store.lago_pending_on.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let mut queued = 0u64;
        let mut batch = sled::Batch::default();
        for item in self.store.records.iter() {
            let (key, _) = item?;
            if !self.planned.contains_key(&key)? {
                batch.insert(key, &[][..]);
                queued += 1;
                if queued % LAGO_PLAN_RECORDS_PER_FLUSH_MAX as u64 == 0 {
                    self.store.lago_pending.apply_batch(std::mem::take(&mut batch))?;
                }
            }
        }
        self.store.lago_pending.apply_batch(batch)?;
        self.store.flush()?;
        meta.insert(PENDING_STATE_KEY, PENDING_ON)?;
        meta.flush()?;
        tracing::info!(queued, "lago: stored records not planned yet are queued for planning");
        Ok(())
    }

    /// The next events to send: up to `max` (key, JSON bytes) in plan order.
    pub fn peek(&self, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.outbox.iter().take(max.min(LAGO_EVENTS_PER_CALL_MAX)) {
            let (k, v) = item?;
            out.push((u64_from(&k)?, v.to_vec()));
        }
        Ok(out)
    }

    /// Removes delivered events; durable when it returns.
    pub fn settle(&self, delivered: &[u64]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for k in delivered {
            batch.remove(&k.to_be_bytes());
        }
        self.outbox.apply_batch(batch)?;
        self.store.flush()?;
        Ok(())
    }

    /// Events planned and not yet accepted by Lago.
    pub fn pending(&self) -> usize {
        self.outbox.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use countersign_testkit::report::{network_time, ReportBuilder};
    use proptest::prelude::*;

    /// 2026-11-24T12:00:00Z.
    const NOON_S: u64 = 1_795_521_600;
    const SIMS: [u64; 2] = [8_988_280_666_000_000_001, 8_988_280_666_000_000_002];

    /// (meter, seq, sim, used) of one record.
    type Spec = (u64, u32, usize, u64);

    fn batch(specs: &[Spec]) -> Vec<crate::store::NewRecord> {
        specs
            .iter()
            .map(|&(meter, seq, sim, used)| {
                let at = NOON_S + u64::from(seq) * 60;
                let r = ReportBuilder::new(meter, seq, SIMS[sim], network_time(at)).used(used, 0);
                crate::store::NewRecord::new(r.report(), at * 1000, r.encode(&[1u8; 32]).into())
            })
            .collect()
    }

    /// The events a planner that scans every record in id order, round by round, sends:
    /// the model the queue-driven planner must equal.
    fn scan_model(
        store: &Store,
        planned: &mut std::collections::BTreeSet<Vec<u8>>,
        max: &mut BTreeMap<[u8; 12], Totals>,
        subs: &BTreeMap<u64, String>,
        out: &mut Vec<Vec<u8>>,
    ) {
        for item in store.records.iter() {
            let (k, v) = item.unwrap();
            if planned.contains(&k.to_vec()) {
                continue;
            }
            let r = usage_record(Ok((k.clone(), v))).unwrap();
            let Some(sub) = subs.get(&r.iccid) else { continue };
            if !plannable(&r) {
                continue;
            }
            let e = max.get(&epoch_key(r.id)).copied().unwrap_or_default();
            let event = plan_event(&r, e, sub, &LagoMetric::default()).unwrap();
            max.insert(epoch_key(r.id), event.exported_max);
            planned.insert(k.to_vec());
            out.push(event.json);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Records arriving in any order and batching, some before the export was
        /// configured, one SIM mapped only later: the queue-driven planner sends exactly the
        /// events, in the same order, that scanning every record each round would.
        #[test]
        fn the_queue_plans_what_a_scan_of_every_record_would(
            specs in proptest::collection::vec((1u64..3, 0u32..30, 0usize..2, 0u64..10_000), 1..40),
            before in 0usize..10,
            cuts in proptest::collection::vec(1usize..8, 1..8),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("data"), crate::config::CACHE_CAPACITY_BYTES_MIN).unwrap();
            let before = before.min(specs.len());
            store.insert_batch(1, &batch(&specs[..before])).unwrap();
            let outbox = Outbox::open(&store).unwrap();
            let mut subs: BTreeMap<u64, String> = [(SIMS[0], "a".to_owned())].into();
            let (mut model_planned, mut model_max, mut want) = Default::default();
            let mut at = before;
            for (round, cut) in cuts.iter().cycle().enumerate() {
                if round > 0 && at >= specs.len() {
                    break;
                }
                if round == 2 {
                    subs.insert(SIMS[1], "b".to_owned());
                }
                outbox.plan(&subs, &LagoMetric::default()).unwrap();
                scan_model(&store, &mut model_planned, &mut model_max, &subs, &mut want);
                let end = (at + cut).min(specs.len());
                store.insert_batch(1, &batch(&specs[at..end])).unwrap();
                at = end;
            }
            subs.insert(SIMS[1], "b".to_owned());
            outbox.plan(&subs, &LagoMetric::default()).unwrap();
            scan_model(&store, &mut model_planned, &mut model_max, &subs, &mut want);
            let sent: Vec<Vec<u8>> = outbox.outbox.iter().map(|kv| kv.unwrap().1.to_vec()).collect();
            prop_assert_eq!(sent, want);
            prop_assert_eq!(store.lago_pending.len(), 0);
            // No export configured: the queue is emptied and ingest stops filling it.
            store.lago_pending_off().unwrap();
            store.insert_batch(1, &batch(&[(9, 0, 0, 1)])).unwrap();
            prop_assert_eq!(store.lago_pending.len(), 0);
        }
    }
}
