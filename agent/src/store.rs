//! The agent's durable buffer, on sled 0.34.7.
//!
//! # Durability contract
//!
//! A report is acknowledged to the broker only after [`Buffer::flush`] returned for a flush
//! that started after the report was written. A report leaves the buffer only after the
//! endpoint answered for it ([`Buffer::settle`]). Between those two points it survives
//! crashes, kill -9 and power loss (sled fsyncs on flush).
//!
//! # On-disk format (trees of one sled `Db`)
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `pending` | record id, 16 bytes big-endian (meter, epoch, seq) | received_ms u64 BE ‖ original report bytes |
//! | `quarantine` | sled-generated u64 BE | JSON [`Quarantined`] |
//! | `rejected` | record id, 16 bytes BE | JSON [`Rejected`] |
//! | `meta` | `b"batch_seq"` | next batch sequence, u64 BE |
//!
//! Keying `pending` by record id makes a redelivered report overwrite itself: duplicates from
//! the broker cost nothing, and batches go out in (meter, epoch, seq) order.
//!
//! # Limits
//!
//! The page cache is bounded by `store.cache_capacity_bytes`. sled's space amplification is
//! real (about 2.5× the live data); the disk quota of the agent is a later piece of work.

use std::path::Path;

use countersign_meter::report::{RecordId, RECORD_KEY_BYTES};
use countersign_protocol::{RecordOutcome, RejectReason};
use serde::{Deserialize, Serialize};

const RECEIVED_MS_BYTES: usize = 8;
const BATCH_SEQ_KEY: &[u8] = b"batch_seq";
/// At most this much of a quarantined payload is kept (its length is always kept).
pub const QUARANTINE_PAYLOAD_BYTES_MAX: usize = 4096;

/// Why the buffer failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened (locked by another process, corrupt, no permission).
    /// Not recoverable by retrying in this process.
    #[error("cannot open agent database at {path}: {source}")]
    Open {
        /// The database directory.
        path: String,
        /// sled's error.
        source: sled::Error,
    },
    /// A read, write or flush failed (e.g. disk full). Recoverable: retry once the cause clears.
    #[error("agent database i/o: {0}")]
    Io(#[from] sled::Error),
    /// A stored value does not have the documented format. Not recoverable for that entry.
    #[error("agent database entry is corrupt: {0}")]
    Corrupt(&'static str),
}

/// A report waiting for the endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    /// Its record id.
    pub id: RecordId,
    /// When the gateway received it, Unix milliseconds.
    pub received_ms: u64,
    /// The device's original bytes.
    pub report: Vec<u8>,
}

/// A payload from the report topic that is not a usable report, kept for inspection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    /// When it arrived, Unix milliseconds.
    pub received_ms: u64,
    /// The MQTT topic.
    pub topic: String,
    /// Stable reason code, e.g. `too_long`, `malformed`, `topic_mismatch`.
    pub reason: String,
    /// Human-readable detail.
    pub detail: String,
    /// Length of the payload as received.
    pub payload_len: usize,
    /// The payload in hex, cut at [`QUARANTINE_PAYLOAD_BYTES_MAX`] bytes.
    pub payload_hex: String,
}

/// A report the endpoint refused, kept with the endpoint's reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// Stable reason code from the endpoint.
    pub reason: RejectReason,
    /// The endpoint's explanation.
    pub detail: String,
    /// When the gateway received it.
    pub received_ms: u64,
    /// The report in hex.
    pub report_hex: String,
}

/// Counts of what the buffer holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Reports waiting for the endpoint.
    pub pending: usize,
    /// Payloads kept in quarantine.
    pub quarantined: usize,
    /// Reports the endpoint refused.
    pub rejected: usize,
}

/// The agent's durable buffer. One per process; cheap to clone (sled handles are shared).
#[derive(Clone)]
pub struct Buffer {
    db: sled::Db,
    pending: sled::Tree,
    quarantine: sled::Tree,
    rejected: sled::Tree,
    meta: sled::Tree,
}

impl Buffer {
    /// Opens (or creates) the database under `dir` with a bounded page cache.
    pub fn open(dir: &Path, cache_capacity_bytes: u64) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open { path: dir.display().to_string(), source };
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_capacity_bytes)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(open_err)?;
        Ok(Self {
            pending: db.open_tree("pending").map_err(open_err)?,
            quarantine: db.open_tree("quarantine").map_err(open_err)?,
            rejected: db.open_tree("rejected").map_err(open_err)?,
            meta: db.open_tree("meta").map_err(open_err)?,
            db,
        })
    }

    /// Writes a report (not yet durable: see [`Buffer::flush`]).
    pub fn put_report(&self, id: RecordId, received_ms: u64, report: &[u8]) -> Result<(), StoreError> {
        let mut v = Vec::with_capacity(RECEIVED_MS_BYTES + report.len());
        v.extend_from_slice(&received_ms.to_be_bytes());
        v.extend_from_slice(report);
        self.pending.insert(id.to_key(), v)?;
        Ok(())
    }

    /// Keeps a payload that is not a usable report (not yet durable: see [`Buffer::flush`]).
    pub fn put_quarantine(&self, q: &Quarantined) -> Result<(), StoreError> {
        let id = self.db.generate_id()?;
        let v =
            serde_json::to_vec(q).map_err(|_| StoreError::Corrupt("quarantine entry does not serialize"))?;
        self.quarantine.insert(id.to_be_bytes(), v)?;
        Ok(())
    }

    /// Makes every earlier write durable (fsync).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Up to `records_max` pending reports in record-id order whose reports add up to at most
    /// `report_bytes_max` bytes (always at least one, if any is pending).
    pub fn next_batch(
        &self,
        records_max: usize,
        report_bytes_max: usize,
    ) -> Result<Vec<Pending>, StoreError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for kv in self.pending.iter() {
            let (k, v) = kv?;
            let id = RecordId::from_key(&k).ok_or(StoreError::Corrupt("pending key is not a record id"))?;
            if k.len() != RECORD_KEY_BYTES || v.len() < RECEIVED_MS_BYTES {
                return Err(StoreError::Corrupt("pending value shorter than its header"));
            }
            let (ms, report) = v.split_at(RECEIVED_MS_BYTES);
            let mut ms_be = [0u8; RECEIVED_MS_BYTES];
            ms_be.copy_from_slice(ms);
            let next = bytes.saturating_add(report.len());
            if !out.is_empty() && (out.len() >= records_max || next > report_bytes_max) {
                break;
            }
            bytes = next;
            out.push(Pending { id, received_ms: u64::from_be_bytes(ms_be), report: report.to_vec() });
        }
        Ok(out)
    }

    /// Records the endpoint's answer: every record leaves `pending`; refused ones are kept in
    /// `rejected` with the reason. Not durable until the next flush, which is harmless: a
    /// record resent after a crash is a duplicate the endpoint recognises.
    pub fn settle(&self, batch: &[Pending], outcomes: &[RecordOutcome]) -> Result<(), StoreError> {
        let mut remove = sled::Batch::default();
        for (p, o) in batch.iter().zip(outcomes) {
            if let RecordOutcome::Rejected { reason, detail } = o {
                let r = Rejected {
                    reason: *reason,
                    detail: detail.clone(),
                    received_ms: p.received_ms,
                    report_hex: hex::encode(&p.report),
                };
                let v = serde_json::to_vec(&r)
                    .map_err(|_| StoreError::Corrupt("rejected entry does not serialize"))?;
                self.rejected.insert(p.id.to_key(), v)?;
            }
            remove.remove(&p.id.to_key());
        }
        self.pending.apply_batch(remove)?;
        Ok(())
    }

    /// Takes the next batch sequence number (persisted with the next flush).
    pub fn next_batch_seq(&self) -> Result<u64, StoreError> {
        let old = self.meta.fetch_and_update(BATCH_SEQ_KEY, |old| {
            let n = old.and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_be_bytes).unwrap_or(0);
            Some(n.wrapping_add(1).to_be_bytes().to_vec())
        })?;
        Ok(old.and_then(|b| <[u8; 8]>::try_from(&b[..]).ok()).map(u64::from_be_bytes).unwrap_or(0))
    }

    /// What the buffer holds now.
    pub fn stats(&self) -> Stats {
        Stats {
            pending: self.pending.len(),
            quarantined: self.quarantine.len(),
            rejected: self.rejected.len(),
        }
    }

    /// Every quarantined payload, oldest first.
    pub fn quarantined(&self) -> Result<Vec<Quarantined>, StoreError> {
        self.quarantine
            .iter()
            .map(|kv| {
                let (_, v) = kv?;
                serde_json::from_slice(&v).map_err(|_| StoreError::Corrupt("quarantine entry is not json"))
            })
            .collect()
    }

    /// Every rejected report, in record-id order.
    pub fn rejected(&self) -> Result<Vec<(RecordId, Rejected)>, StoreError> {
        self.rejected
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let id =
                    RecordId::from_key(&k).ok_or(StoreError::Corrupt("rejected key is not a record id"))?;
                let r = serde_json::from_slice(&v)
                    .map_err(|_| StoreError::Corrupt("rejected entry is not json"))?;
                Ok((id, r))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seq: u32) -> RecordId {
        RecordId { meter_id: 1, epoch: 0, seq }
    }

    #[tokio::test]
    async fn survives_reopen_after_flush_and_settles() {
        let dir = tempfile::tempdir().unwrap();
        {
            let b = Buffer::open(dir.path(), 1 << 20).unwrap();
            for s in 0..10 {
                b.put_report(id(s), 1000 + u64::from(s), &[s as u8; 40]).unwrap();
            }
            b.put_report(id(3), 1003, &[3u8; 40]).unwrap(); // redelivery: same key
            b.flush().await.unwrap();
        }
        let b = Buffer::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(b.stats().pending, 10);
        let batch = b.next_batch(4, usize::MAX).unwrap();
        assert_eq!(batch.iter().map(|p| p.id.seq).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        assert_eq!(batch[2].received_ms, 1002);
        let mut outcomes = vec![RecordOutcome::Stored; 4];
        outcomes[1] = RecordOutcome::Rejected { reason: RejectReason::BadTag, detail: "bad".into() };
        b.settle(&batch, &outcomes).unwrap();
        assert_eq!(b.stats(), Stats { pending: 6, quarantined: 0, rejected: 1 });
        assert_eq!(b.rejected().unwrap()[0].0, id(1));
        assert_eq!(b.next_batch(100, 80).unwrap().len(), 2, "byte bound");
        assert_eq!(b.next_batch(100, 1).unwrap().len(), 1, "always at least one");
    }

    #[test]
    fn batch_seq_increments() {
        let dir = tempfile::tempdir().unwrap();
        let b = Buffer::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(b.next_batch_seq().unwrap(), 0);
        assert_eq!(b.next_batch_seq().unwrap(), 1);
    }

    #[test]
    fn second_open_of_same_dir_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let _a = Buffer::open(dir.path(), 1 << 20).unwrap();
        let e = Buffer::open(dir.path(), 1 << 20).err().unwrap();
        assert!(matches!(e, StoreError::Open { .. }), "{e}");
    }
}
