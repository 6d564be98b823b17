//! Batch checking: a signed batch opened (gateway signature, each report decoded once),
//! every device tag checked against the meter keys the caller read, every report validated
//! ([`validate_report`]), and the store's outcomes turned back into the per-record reply in
//! batch order.
//!
//! The endpoint runs these steps around its IO (reading keys, one durable insert); they are
//! plain functions of their inputs, so the whole decision is testable and fuzzable without a
//! store. The records to store are [`NewRecord`]s, slices of the signed body: nothing is
//! copied on the way to the store, and nothing decodes a report twice.

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;
use countersign_meter::{
    check_tag, DecodeError, DeviceTime, RecordId, Report, Totals, VerifyError, METER_KEY_BYTES,
};
use countersign_protocol::{open, BatchError, BatchHeader, BatchReply, RecordOutcome, RejectReason};
use ed25519_dalek::VerifyingKey;

use crate::check::{attribution_ms, validate_report, LATE_ATTRIBUTION_MS};
use crate::usage::UsageRecord;

/// A verified record on its way into a store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRecord {
    /// Its record id (from the verified report).
    pub id: RecordId,
    /// The SIM the report names.
    pub iccid: u64,
    /// When the gateway received it, Unix milliseconds.
    pub received_ms: u64,
    /// The device's original bytes, tag included; a slice of the batch, not a copy.
    pub report: Bytes,
    /// Bytes counted in its epoch up to it (from the one decoding, for the rollups).
    pub used: Totals,
    /// When the device says it made the report.
    pub time: DeviceTime,
}

impl NewRecord {
    /// The record of a verified `report` whose bytes are `bytes`.
    pub fn new(report: &Report, received_ms: u64, bytes: Bytes) -> Self {
        Self {
            id: report.id(),
            iccid: report.iccid,
            received_ms,
            report: bytes,
            used: report.used,
            time: report.time,
        }
    }

    /// What the usage derivation needs of it.
    pub fn usage(&self) -> UsageRecord {
        UsageRecord {
            id: self.id,
            iccid: self.iccid,
            used: self.used,
            time: self.time,
            received_ms: self.received_ms,
        }
    }
}

/// What storing one [`NewRecord`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsertOutcome {
    /// The record was new and is now stored (durable after the next flush).
    Stored,
    /// The same record, byte for byte, was stored before.
    Duplicate,
    /// A different report with the same record id is stored; the new one was not.
    Conflict,
}

/// The store answered a different number of outcomes than it was given records: a store
/// fault, not recoverable by resending (the caller reports it as corrupt).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("store answered {outcomes} outcomes for {records} records")]
pub struct OutcomeCountError {
    /// Outcomes answered.
    pub outcomes: usize,
    /// Records given.
    pub records: usize,
}

/// A batch whose gateway signature verified, with its records as slices of the body.
#[derive(Clone, Debug)]
pub struct OpenedBatch {
    /// Its header (the gateway is authenticated).
    pub header: BatchHeader,
    /// The records, in batch order, each decoded once.
    pub records: Vec<OpenedRecord>,
}

/// One record of an opened batch: its bytes and their one decoding. Every later step (meter
/// keys, tag, checks, the stored id) uses this decoding; nothing decodes the report again.
#[derive(Clone, Debug)]
pub struct OpenedRecord {
    /// When the gateway received it, Unix milliseconds.
    pub received_ms: u64,
    /// The device's bytes, tag included; a slice of the batch.
    pub bytes: Bytes,
    /// The report and the length of its body (the tag follows), or why it does not decode.
    pub decoded: Result<(Report, usize), DecodeError>,
}

impl OpenedRecord {
    /// Decodes `bytes` (once).
    pub fn new(received_ms: u64, bytes: Bytes) -> Self {
        let decoded = Report::decode(&bytes).map(|(r, body)| (r, body.len()));
        Self { received_ms, bytes, decoded }
    }
}

impl OpenedBatch {
    /// The distinct meter ids the records name (records that do not decode name none).
    pub fn meter_ids(&self) -> Vec<u64> {
        let ids: BTreeSet<u64> =
            self.records.iter().filter_map(|r| r.decoded.as_ref().ok().map(|(r, _)| r.meter_id)).collect();
        ids.into_iter().collect()
    }
}

/// Verifies the signature of `signed` with `gateway_key` (the key registered for the gateway
/// its header names, `None` when unregistered) and walks its records.
pub fn open_batch(signed: &Bytes, gateway_key: Option<VerifyingKey>) -> Result<OpenedBatch, BatchError> {
    let batch = open(signed, |_| gateway_key)?;
    let mut records = Vec::with_capacity(batch.len());
    for record in batch.records() {
        // `open` already walked every record, so none fails here; treat one that does as a
        // malformed batch rather than trusting that.
        let record = record?;
        records.push(OpenedRecord::new(record.received_ms, signed.slice_ref(record.report)));
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
    /// The verified records, in batch order (until [`CheckedBatch::take_records`]).
    pub to_store: Vec<NewRecord>,
    /// The ids of the records to store, in order: what the reply needs of them once they
    /// went to the store.
    ids: Vec<RecordId>,
    /// Records to store attributed more than [`LATE_ATTRIBUTION_MS`] before the endpoint's
    /// clock: they may fall in settled days (the ledger then books adjustments).
    pub late: usize,
}

/// Decodes and verifies every report of an opened batch with the meter keys given, and
/// refuses what [`validate_report`] refuses at `now_ms` (the endpoint's clock).
pub fn check_records(
    batch: OpenedBatch,
    keys: &HashMap<u64, [u8; METER_KEY_BYTES]>,
    now_ms: u64,
) -> CheckedBatch {
    let mut refusals = Vec::with_capacity(batch.records.len());
    let mut to_store = Vec::with_capacity(batch.records.len());
    let mut late = 0usize;
    let mut ids = Vec::with_capacity(batch.records.len());
    for record in batch.records {
        let (received_ms, bytes) = (record.received_ms, record.bytes.clone());
        match check_record(keys, record, now_ms) {
            Ok(report) => {
                if attribution_ms(&report, received_ms) < now_ms.saturating_sub(LATE_ATTRIBUTION_MS) {
                    late = late.saturating_add(1);
                }
                refusals.push(None);
                ids.push(report.id());
                to_store.push(NewRecord::new(&report, received_ms, bytes));
            }
            Err(refusal) => {
                if let RecordOutcome::Rejected { reason, detail } = &refusal {
                    // Logged at warn once per cause by the server (`Metrics::log_admit`); here every one.
                    tracing::debug!(reason = reason.code(), detail = %detail, "record rejected");
                }
                refusals.push(Some(refusal));
            }
        }
    }
    if late > 0 {
        tracing::warn!(
            gateway_id = batch.header.gateway_id,
            batch_seq = batch.header.batch_seq,
            late,
            late_ms = LATE_ATTRIBUTION_MS,
            "records attributed to days that may be settled; the ledger adjusts them"
        );
    }
    CheckedBatch { header: batch.header, refusals, to_store, ids, late }
}

impl CheckedBatch {
    /// The records to store, moved out (the batch keeps their ids for the reply), so they go
    /// to the store without a copy.
    pub fn take_records(&mut self) -> Vec<NewRecord> {
        std::mem::take(&mut self.to_store)
    }

    /// The reply, given the store's outcomes for the records taken, in order.
    pub fn reply(self, stored: Vec<InsertOutcome>) -> Result<BatchReply, OutcomeCountError> {
        if stored.len() != self.ids.len() {
            return Err(OutcomeCountError { outcomes: stored.len(), records: self.ids.len() });
        }
        let stored_len = stored.len();
        let mut stored = stored.into_iter().zip(&self.ids);
        let mut results = Vec::with_capacity(self.refusals.len());
        for refusal in self.refusals {
            let outcome = match refusal {
                Some(r) => r,
                None => match stored.next() {
                    Some((InsertOutcome::Stored, _)) => RecordOutcome::Stored,
                    Some((InsertOutcome::Duplicate, _)) => RecordOutcome::Duplicate,
                    Some((InsertOutcome::Conflict, id)) => {
                        tracing::warn!(record = %id, "record conflicts with the stored one");
                        rejected(
                            RejectReason::Conflict,
                            format!("a different report with record id {id} is already stored"),
                        )
                    }
                    None => return Err(OutcomeCountError { outcomes: stored_len, records: self.ids.len() }),
                },
            };
            results.push(outcome);
        }
        let reply =
            BatchReply { gateway_id: self.header.gateway_id, batch_seq: self.header.batch_seq, results };
        Ok(reply)
    }
}

fn rejected(reason: RejectReason, detail: String) -> RecordOutcome {
    RecordOutcome::Rejected { reason, detail }
}

/// Verifies one decoded report: the report to store, or the refusal.
fn check_record(
    keys: &HashMap<u64, [u8; METER_KEY_BYTES]>,
    record: OpenedRecord,
    now_ms: u64,
) -> Result<Report, RecordOutcome> {
    let (report, body_len) = match record.decoded {
        Ok(d) => d,
        Err(e) => return Err(rejected(RejectReason::Malformed, e.to_string())),
    };
    let Some(key) = keys.get(&report.meter_id) else {
        return Err(rejected(
            RejectReason::UnknownMeter,
            format!("meter {} is not registered", report.meter_id),
        ));
    };
    let (body, tag) = record.bytes.split_at(body_len);
    if check_tag(body, tag, key).is_err() {
        return Err(rejected(RejectReason::BadTag, VerifyError::BadTag.to_string()));
    }
    validate_report(&report, record.received_ms, now_ms)
        .map_err(|(reason, detail)| rejected(reason, detail))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use countersign_testkit::batch::{signed_batch_at, signing_key};
    use countersign_testkit::report::{network_time, ReportBuilder};

    const KEY: [u8; 32] = [4u8; 32];
    const NOW_MS: u64 = 1_795_521_600_000;

    fn report(seq: u32, key: &[u8; 32]) -> Vec<u8> {
        ReportBuilder::new(5, seq, 8_988_280_666_000_000_001, network_time(NOW_MS / 1000))
            .used(10, 10)
            .encode(key)
    }

    fn opened(reports: &[Vec<u8>]) -> OpenedBatch {
        let gateway = signing_key(11);
        let signed = signed_batch_at(&gateway, 1, 9, NOW_MS, reports);
        open_batch(&Bytes::from(signed), Some(gateway.verifying_key())).unwrap()
    }

    #[test]
    fn refusals_and_store_outcomes_come_back_in_batch_order() {
        let batch = opened(&[report(0, &KEY), report(1, &[9u8; 32]), vec![1, 2, 3], report(2, &KEY)]);
        assert_eq!(batch.meter_ids(), vec![5]);
        let keys = HashMap::from([(5u64, KEY)]);
        let mut checked = check_records(batch, &keys, NOW_MS);
        let records = checked.take_records();
        assert_eq!(records.iter().map(|r| r.id.seq).collect::<Vec<_>>(), vec![0, 2]);
        let reply = checked.reply(vec![InsertOutcome::Stored, InsertOutcome::Conflict]).unwrap();
        let codes: Vec<_> = reply
            .results
            .iter()
            .map(|o| match o {
                RecordOutcome::Rejected { reason, .. } => reason.code(),
                RecordOutcome::Stored => "stored",
                RecordOutcome::Duplicate => "duplicate",
            })
            .collect();
        assert_eq!(codes, ["stored", "bad_tag", "malformed", "conflict"]);
    }

    #[test]
    fn a_store_answering_the_wrong_number_of_outcomes_is_an_error() {
        let keys = HashMap::from([(5u64, KEY)]);
        let mut checked = check_records(opened(&[report(0, &KEY)]), &keys, NOW_MS);
        let _ = checked.take_records();
        assert_eq!(checked.reply(vec![]).unwrap_err(), OutcomeCountError { outcomes: 0, records: 1 });
    }
}
