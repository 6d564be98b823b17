//! Batch ingest: verify the gateway's signature, then every device tag, store, flush, reply.
//!
//! Synchronous on purpose: signature and HMAC checks are CPU work and sled calls may block,
//! so the server runs [`ingest_batch`] on a blocking thread; tests call it directly.

use std::collections::HashMap;

use countersign_meter::{verify, Report, VerifyError, METER_KEY_BYTES};
use countersign_protocol::{open, BatchError, BatchReply, RecordOutcome, RejectReason};

use crate::store::{InsertOutcome, Store, StoreError};
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
                RecordOutcome::Stored => s.stored += 1,
                RecordOutcome::Duplicate => s.duplicate += 1,
                RecordOutcome::Rejected { .. } => s.rejected += 1,
            }
        }
        s
    }
}

/// Verifies and stores one signed batch, then flushes the store. The reply is only returned
/// once every stored record is durable, so a gateway may forget whatever it says.
pub fn ingest_batch(store: &Store, signed: &[u8]) -> Result<BatchReply, IngestError> {
    let mut lookup_failure = None;
    let opened = open(signed, |gateway_id| match store.gateway_key(gateway_id) {
        Ok(key) => key,
        Err(e) => {
            lookup_failure = Some(e);
            None
        }
    });
    // A store failure during the key lookup surfaces as "unknown gateway"; report the cause.
    if let Some(e) = lookup_failure {
        return Err(e.into());
    }
    let batch = opened?;
    let header = batch.header;
    let span = tracing::info_span!(
        "batch",
        gateway_id = header.gateway_id,
        batch_seq = header.batch_seq,
        records = batch.len()
    );
    let _entered = span.enter();

    let mut keys: HashMap<u64, Option<[u8; METER_KEY_BYTES]>> = HashMap::new();
    let mut results = Vec::with_capacity(batch.len());
    for record in batch.records() {
        // `open` already walked every record, so none fails here; treat one that does as a
        // malformed batch rather than trusting that.
        let record = record?;
        let outcome = match check_record(store, &mut keys, record.report, record.received_ms)? {
            Err(refusal) => refusal,
            Ok(report) => match store.insert_record(
                report.id(),
                header.gateway_id,
                record.received_ms,
                record.report,
            )? {
                InsertOutcome::Stored => RecordOutcome::Stored,
                InsertOutcome::Duplicate => RecordOutcome::Duplicate,
                InsertOutcome::Conflict => rejected(
                    RejectReason::Conflict,
                    format!("a different report with record id {} is already stored", report.id()),
                ),
            },
        };
        if let RecordOutcome::Rejected { reason, detail } = &outcome {
            tracing::warn!(reason = reason.code(), detail = %detail, "record rejected");
        }
        results.push(outcome);
    }
    // Flush even when nothing was stored: a duplicate may be an earlier attempt's write that
    // was never flushed, and it is acknowledged now.
    store.flush()?;
    let reply = BatchReply { gateway_id: header.gateway_id, batch_seq: header.batch_seq, results };
    let summary = IngestSummary::of(&reply);
    tracing::info!(
        stored = summary.stored,
        duplicate = summary.duplicate,
        rejected = summary.rejected,
        "batch ingested"
    );
    Ok(reply)
}

fn rejected(reason: RejectReason, detail: String) -> RecordOutcome {
    RecordOutcome::Rejected { reason, detail }
}

/// Decodes and verifies one report: `Ok(Ok(report))` to store, `Ok(Err(outcome))` when the
/// record is refused, `Err` when the store failed.
fn check_record(
    store: &Store,
    keys: &mut HashMap<u64, Option<[u8; METER_KEY_BYTES]>>,
    bytes: &[u8],
    received_ms: u64,
) -> Result<Result<Report, RecordOutcome>, StoreError> {
    let meter_id = match Report::decode(bytes) {
        Ok((report, _)) => report.meter_id,
        Err(e) => return Ok(Err(rejected(RejectReason::Malformed, e.to_string()))),
    };
    let key = match keys.get(&meter_id) {
        Some(k) => *k,
        None => {
            let k = store.meter_key(meter_id)?;
            keys.insert(meter_id, k);
            k
        }
    };
    let Some(key) = key else {
        return Ok(Err(rejected(RejectReason::UnknownMeter, format!("meter {meter_id} is not registered"))));
    };
    let report = match verify(bytes, &key) {
        Ok(r) => r,
        Err(VerifyError::BadTag) => {
            return Ok(Err(rejected(RejectReason::BadTag, VerifyError::BadTag.to_string())))
        }
        Err(e @ VerifyError::Decode(_)) => return Ok(Err(rejected(RejectReason::Malformed, e.to_string()))),
    };
    // A receive time no calendar can hold would make every later usage query fail; such a
    // gateway clock is broken, and the record is refused rather than stored.
    if attribution_date(&report.time, received_ms).is_none() {
        return Ok(Err(rejected(
            RejectReason::Malformed,
            format!("gateway receive time {received_ms} ms is not a representable date"),
        )));
    }
    Ok(Ok(report))
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
        let store = Store::open(dir.path(), crate::config::CACHE_CAPACITY_BYTES_MIN).unwrap();
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
