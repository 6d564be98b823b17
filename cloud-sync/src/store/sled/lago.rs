//! The Lago outbox in the sled store: trees `lago_outbox` (export sequence → event JSON),
//! `lago_planned` (record id → export sequence), `lago_epoch_max` (meter ‖ epoch → the
//! highest `used` exported) and `lago_meta` (the next export sequence). Planning writes all
//! four in one sled transaction; see [`crate::service::lago`] for why that makes the export exactly
//! once.

use std::collections::BTreeMap;

use countersign_meter::{RecordId, Totals};
use countersign_rating::lago::{plan_event, plannable, LagoMetric, LAGO_EVENTS_PER_CALL_MAX};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

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
    /// durable when it returns. Returns how many were planned.
    pub fn plan(
        &self,
        subscriptions: &BTreeMap<u64, String>,
        metric: &LagoMetric,
    ) -> Result<usize, StoreError> {
        let mut planned = 0usize;
        let mut since_flush = 0usize;
        let mut unmapped = 0usize;
        for r in self.store.usage_records() {
            let r = r?;
            let key = r.id.to_key();
            if self.planned.contains_key(key)? {
                continue;
            }
            let Some(sub) = subscriptions.get(&r.iccid) else {
                unmapped += 1;
                continue;
            };
            if !plannable(&r) {
                continue;
            }
            let ekey = epoch_key(r.id);
            let result = (&self.outbox, &self.planned, &self.epoch_max, &self.meta).transaction(
                |(outbox, planned_t, epoch_max, meta)| {
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
