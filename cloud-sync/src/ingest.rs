//! Batch ingest: verify the gateway's signature, then every device tag, store durably, reply.
//!
//! The work is split so that either store can run it without blocking the async runtime:
//!
//! 1. [`open_batch`] (CPU: one Ed25519 check) verifies the batch signature with the gateway's
//!    key and lists its records as zero-copy slices of the body;
//! 2. the meter keys of the batch are read from the store in one call;
//! 3. [`check_records`] (CPU: one HMAC per record) decodes and verifies every report;
//! 4. the store inserts the verified records in one durable step
//!    ([`StoreBackend::insert_batch`]: one sled flush, or one PostgreSQL transaction);
//! 5. [`CheckedBatch::reply`] puts the per-record outcomes back in batch order.
//!
//! [`ingest`] runs these with the CPU steps on tokio's blocking pool; [`ingest_batch`] runs
//! them synchronously on a sled [`Store`], for tests and tools.

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;
use countersign_meter::{verify, Report, VerifyError, METER_KEY_BYTES};
use countersign_protocol::{
    open, peek_header, BatchError, BatchHeader, BatchReply, RecordOutcome, RejectReason,
};
use ed25519_dalek::VerifyingKey;
use tracing::Instrument;

use crate::backend::StoreBackend;
use crate::store::{InsertOutcome, NewRecord, Store, StoreError};
use crate::usage::attribution_date;

/// Why a batch was refused as a whole; nothing of it was acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The batch is malformed, too large, or not signed by a registered gateway. Not
    /// recoverable by resending the same bytes.
    #[error(transparent)]
    Batch(#[from] BatchError),
    /// The store failed. Recoverable when [`StoreError::is_recoverable`] says so; records
    /// written before the failure answer `duplicate` when the batch is resent.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Counts of what happened to a batch's records, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngestSummary {
    /// Newly stored.
    pub stored: usize,
    /// Stored before.
    pub duplicate: usize,
    /// Refused.
    pub rejected: usize,
}

impl IngestSummary {
    /// Tallies the outcomes of a reply.
    pub fn of(reply: &BatchReply) -> Self {
        let mut s = Self::default();
        for r in &reply.results {
            match r {
                RecordOutcome::Stored => s.stored = s.stored.saturating_add(1),
                RecordOutcome::Duplicate => s.duplicate = s.duplicate.saturating_add(1),
                RecordOutcome::Rejected { .. } => s.rejected = s.rejected.saturating_add(1),
            }
        }
        s
    }
}

/// A batch whose gateway signature verified, with its records as slices of the body.
#[derive(Clone, Debug)]
pub struct OpenedBatch {
    /// Its header (the gateway is authenticated).
    pub header: BatchHeader,
    /// (gateway receive time in Unix ms, device report bytes), in batch order.
    pub records: Vec<(u64, Bytes)>,
}

impl OpenedBatch {
    /// The distinct meter ids the records name (records that do not decode name none).
    pub fn meter_ids(&self) -> Vec<u64> {
        let ids: BTreeSet<u64> = self
            .records
            .iter()
            .filter_map(|(_, r)| Report::decode(r).ok().map(|(r, _)| r.meter_id))
            .collect();
        ids.into_iter().collect()
    }
}

/// Verifies the signature of `signed` with `gateway_key` (the key registered for the gateway
/// its header names, `None` when unregistered) and walks its records.
pub fn open_batch(signed: &Bytes, gateway_key: Option<VerifyingKey>) -> Result<OpenedBatch, IngestError> {
    let batch = open(signed, |_| gateway_key)?;
    let mut records = Vec::with_capacity(batch.len());
    for record in batch.records() {
        // `open` already walked every record, so none fails here; treat one that does as a
        // malformed batch rather than trusting that.
        let record = record?;
        records.push((record.received_ms, signed.slice_ref(record.report)));
    }
    Ok(OpenedBatch { header: batch.header, records })
}

/// A batch after every device tag was checked: refusals decided, the rest ready to store.
#[derive(Debug)]
pub struct CheckedBatch {
    /// Its header.
    pub header: BatchHeader,
    /// Per record in batch order: the refusal, or `None` when it goes to the store.
    refusals: Vec<Option<RecordOutcome>>,
    /// The verified records, in batch order.
    pub to_store: Vec<NewRecord>,
}

/// Decodes and verifies every report of an opened batch with the meter keys given.
pub fn check_records(batch: OpenedBatch, keys: &HashMap<u64, [u8; METER_KEY_BYTES]>) -> CheckedBatch {
    let mut refusals = Vec::with_capacity(batch.records.len());
    let mut to_store = Vec::with_capacity(batch.records.len());
    for (received_ms, bytes) in batch.records {
        match check_record(keys, &bytes, received_ms) {
            Ok(report) => {
                refusals.push(None);
                to_store.push(NewRecord { id: report.id(), iccid: report.iccid, received_ms, report: bytes });
            }
            Err(refusal) => {
                if let RecordOutcome::Rejected { reason, detail } = &refusal {
                    tracing::warn!(reason = reason.code(), detail = %detail, "record rejected");
                }
                refusals.push(Some(refusal));
            }
        }
    }
    CheckedBatch { header: batch.header, refusals, to_store }
}

impl CheckedBatch {
    /// The reply, given the store's outcomes for [`CheckedBatch::to_store`] in order.
    pub fn reply(self, stored: Vec<InsertOutcome>) -> Result<BatchReply, StoreError> {
        if stored.len() != self.to_store.len() {
            return Err(StoreError::Corrupt(format!(
                "store answered {} outcomes for {} records",
                stored.len(),
                self.to_store.len()
            )));
        }
        let mut stored = stored.into_iter().zip(&self.to_store);
        let mut results = Vec::with_capacity(self.refusals.len());
        for refusal in self.refusals {
            let outcome = match refusal {
                Some(r) => r,
                None => match stored.next() {
                    Some((InsertOutcome::Stored, _)) => RecordOutcome::Stored,
                    Some((InsertOutcome::Duplicate, _)) => RecordOutcome::Duplicate,
                    Some((InsertOutcome::Conflict, record)) => {
                        tracing::warn!(record = %record.id, "record conflicts with the stored one");
                        rejected(
                            RejectReason::Conflict,
                            format!("a different report with record id {} is already stored", record.id),
                        )
                    }
                    None => return Err(StoreError::Corrupt("store answered too few outcomes".into())),
                },
            };
            results.push(outcome);
        }
        let reply =
            BatchReply { gateway_id: self.header.gateway_id, batch_seq: self.header.batch_seq, results };
        let summary = IngestSummary::of(&reply);
        tracing::info!(
            stored = summary.stored,
            duplicate = summary.duplicate,
            rejected = summary.rejected,
            "batch ingested"
        );
        Ok(reply)
    }
}

async fn cpu<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, IngestError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| IngestError::Store(StoreError::Corrupt(format!("verification task failed: {e}"))))
}

/// Verifies and stores one signed batch on either store. The reply is only returned once
/// every stored record is durable, so a gateway may forget whatever it says.
pub async fn ingest(store: &StoreBackend, signed: Bytes) -> Result<BatchReply, IngestError> {
    let header = peek_header(&signed)?;
    let span = tracing::info_span!(
        "batch",
        gateway_id = header.gateway_id,
        batch_seq = header.batch_seq,
        store = store.kind()
    );
    ingest_opened(store, header, signed).instrument(span).await
}

async fn ingest_opened(
    store: &StoreBackend,
    header: BatchHeader,
    signed: Bytes,
) -> Result<BatchReply, IngestError> {
    let gateway_key = store.gateway_key(header.gateway_id).await?;
    let opened = cpu(move || open_batch(&signed, gateway_key)).await??;
    let keys = store.meter_keys(opened.meter_ids()).await?;
    let mut checked = cpu(move || check_records(opened, &keys)).await?;
    let records = std::mem::take(&mut checked.to_store);
    let gateway_id = checked.header.gateway_id;
    // The records go to the store and come back, so that the reply can name conflicts.
    let outcomes = store.insert_batch(gateway_id, records.clone()).await?;
    checked.to_store = records;
    Ok(checked.reply(outcomes)?)
}

/// Verifies and stores one signed batch on a sled store, synchronously, then flushes. The
/// reply is only returned once every stored record is durable.
pub fn ingest_batch(store: &Store, signed: &[u8]) -> Result<BatchReply, IngestError> {
    let signed = Bytes::copy_from_slice(signed);
    let header = peek_header(&signed)?;
    let span = tracing::info_span!("batch", gateway_id = header.gateway_id, batch_seq = header.batch_seq);
    let _entered = span.enter();
    let opened = open_batch(&signed, store.gateway_key(header.gateway_id)?)?;
    let mut keys = HashMap::new();
    for id in opened.meter_ids() {
        if let Some(k) = store.meter_key(id)? {
            keys.insert(id, k);
        }
    }
    let checked = check_records(opened, &keys);
    let outcomes = store.insert_batch(checked.header.gateway_id, &checked.to_store)?;
    Ok(checked.reply(outcomes)?)
}

fn rejected(reason: RejectReason, detail: String) -> RecordOutcome {
    RecordOutcome::Rejected { reason, detail }
}

/// Decodes and verifies one report: the report to store, or the refusal.
fn check_record(
    keys: &HashMap<u64, [u8; METER_KEY_BYTES]>,
    bytes: &[u8],
    received_ms: u64,
) -> Result<Report, RecordOutcome> {
    let meter_id = match Report::decode(bytes) {
        Ok((report, _)) => report.meter_id,
        Err(e) => return Err(rejected(RejectReason::Malformed, e.to_string())),
    };
    let Some(key) = keys.get(&meter_id) else {
        return Err(rejected(RejectReason::UnknownMeter, format!("meter {meter_id} is not registered")));
    };
    let report = match verify(bytes, key) {
        Ok(r) => r,
        Err(VerifyError::BadTag) => {
            return Err(rejected(RejectReason::BadTag, VerifyError::BadTag.to_string()))
        }
        Err(e @ VerifyError::Decode(_)) => return Err(rejected(RejectReason::Malformed, e.to_string())),
    };
    // A receive time no calendar can hold would make every later usage query fail; such a
    // gateway clock is broken, and the record is refused rather than stored.
    if attribution_date(&report.time, received_ms).is_none() {
        return Err(rejected(
            RejectReason::Malformed,
            format!("gateway receive time {received_ms} ms is not a representable date"),
        ));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use countersign_meter::{DeviceTime, TimeQuality, Totals, REPORT_BYTES_MAX};
    use countersign_protocol::{BatchBuilder, BatchHeader, RecordRef};
    use ed25519_dalek::SigningKey;

    const METER_KEY: [u8; 32] = [4u8; 32];
    const NOW_MS: u64 = 1_795_521_600_000;

    fn gateway() -> SigningKey {
        SigningKey::from_bytes(&[11u8; 32])
    }

    fn report(meter_id: u64, seq: u32, up: u64, key: &[u8; 32]) -> Vec<u8> {
        report_at(
            meter_id,
            seq,
            up,
            key,
            DeviceTime::wall_clock(TimeQuality::Network, NOW_MS / 1000).unwrap(),
        )
    }

    fn report_at(meter_id: u64, seq: u32, up: u64, key: &[u8; 32], time: DeviceTime) -> Vec<u8> {
        let r = Report {
            meter_id,
            epoch: 0,
            seq,
            iccid: 8_988_280_666_000_000_001,
            time,
            base: Totals::default(),
            used: Totals { up, down: up },
            extras: Default::default(),
        };
        let mut buf = [0u8; REPORT_BYTES_MAX];
        let n = r.encode(key, &mut buf).unwrap();
        buf[..n].to_vec()
    }

    fn batch(reports: &[(u64, Vec<u8>)], key: &SigningKey) -> Vec<u8> {
        let mut b = BatchBuilder::new(BatchHeader { gateway_id: 1, batch_seq: 9, created_ms: NOW_MS });
        for (received_ms, r) in reports {
            b.push(RecordRef { received_ms: *received_ms, report: r }).unwrap();
        }
        b.sign(key)
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("data"), crate::config::CACHE_CAPACITY_BYTES_MIN).unwrap();
        store.add_gateway(1, &gateway().verifying_key()).unwrap();
        store.add_meter(5, &METER_KEY).unwrap();
        (dir, store)
    }

    fn reason(o: &RecordOutcome) -> Option<RejectReason> {
        match o {
            RecordOutcome::Rejected { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    #[test]
    fn outcomes_in_batch_order() {
        let (_dir, store) = store();
        let good = report(5, 0, 10, &METER_KEY);
        let mut conflicting = report(5, 0, 11, &METER_KEY);
        let forged = report(5, 1, 10, &[9u8; 32]);
        let unknown = report(6, 0, 10, &METER_KEY);
        let garbage = vec![1u8; 3];
        let signed = batch(
            &[
                (NOW_MS, good.clone()),
                (NOW_MS, good.clone()),
                (NOW_MS, std::mem::take(&mut conflicting)),
                (NOW_MS, forged),
                (NOW_MS, unknown),
                (NOW_MS, garbage),
                // Without network time the receive time decides the day, and this one has none.
                (u64::MAX, report_at(5, 2, 12, &METER_KEY, DeviceTime::uptime(60).unwrap())),
            ],
            &gateway(),
        );
        let reply = ingest_batch(&store, &signed).unwrap();
        assert_eq!((reply.gateway_id, reply.batch_seq), (1, 9));
        let reasons: Vec<_> = reply.results.iter().map(reason).collect();
        assert_eq!(reply.results[0], RecordOutcome::Stored);
        assert_eq!(reply.results[1], RecordOutcome::Duplicate);
        assert_eq!(
            reasons[2..],
            [
                Some(RejectReason::Conflict),
                Some(RejectReason::BadTag),
                Some(RejectReason::UnknownMeter),
                Some(RejectReason::Malformed),
                Some(RejectReason::Malformed),
            ]
        );
        match &reply.results[5] {
            RecordOutcome::Rejected { detail, .. } => assert_eq!(detail, "report shorter than 36 bytes"),
            other => panic!("{other:?}"),
        }
        assert_eq!(IngestSummary::of(&reply), IngestSummary { stored: 1, duplicate: 1, rejected: 5 });
        assert_eq!(store.record_count(), 1);
    }

    #[test]
    fn whole_batch_errors_store_nothing() {
        let (_dir, store) = store();
        let reports = [(NOW_MS, report(5, 0, 10, &METER_KEY))];
        let wrong = batch(&reports, &SigningKey::from_bytes(&[12u8; 32]));
        let e = ingest_batch(&store, &wrong).unwrap_err();
        assert!(matches!(e, IngestError::Batch(BatchError::BadSignature(1))), "{e}");
        let e =
            ingest_batch(&store, b"not a batch at all, clearly, not even close to one, no sir, not at all")
                .unwrap_err();
        assert!(matches!(e, IngestError::Batch(ref b) if !b.is_auth()), "{e}");
        let mut b = BatchBuilder::new(BatchHeader { gateway_id: 2, batch_seq: 0, created_ms: 0 });
        b.push(RecordRef { received_ms: 0, report: &reports[0].1 }).unwrap();
        let e = ingest_batch(&store, &b.sign(&gateway())).unwrap_err();
        assert!(matches!(e, IngestError::Batch(BatchError::UnknownGateway(2))), "{e}");
        assert_eq!(store.record_count(), 0);
    }
}
