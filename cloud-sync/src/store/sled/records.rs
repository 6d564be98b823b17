//! The `records` tree: verified reports by record id, and usage derived from them.

use countersign_meter::{RecordId, Report};
use serde::{Deserialize, Serialize};

use super::Store;
use crate::store::{InsertOutcome, NewRecord, StoreError, StoredRecord};
use countersign_rating::usage::{derive_daily_in, Derived, TimeZone, UsageRecord};

/// Version byte that starts every value of the `records` tree.
pub const RECORD_VALUE_VERSION: u8 = 1;

#[derive(Serialize, Deserialize)]
struct WireValue<'a> {
    gateway_id: u64,
    received_ms: u64,
    #[serde(borrow)]
    report: &'a [u8],
}

fn encode_value(gateway_id: u64, received_ms: u64, report: &[u8]) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![RECORD_VALUE_VERSION];
    let body = postcard::to_stdvec(&WireValue { gateway_id, received_ms, report })
        .map_err(|e| StoreError::Corrupt(format!("record value does not encode: {e}")))?;
    out.extend_from_slice(&body);
    Ok(out)
}

fn decode_value(bytes: &[u8]) -> Result<WireValue<'_>, StoreError> {
    match bytes.split_first() {
        Some((&RECORD_VALUE_VERSION, rest)) => {
            let (v, tail): (WireValue<'_>, &[u8]) = postcard::take_from_bytes(rest)
                .map_err(|e| StoreError::Corrupt(format!("record value does not decode: {e}")))?;
            if !tail.is_empty() {
                return Err(StoreError::Corrupt("record value has trailing bytes".into()));
            }
            Ok(v)
        }
        Some((v, _)) => Err(StoreError::Corrupt(format!("record value has unknown version {v}"))),
        None => Err(StoreError::Corrupt("record value is empty".into())),
    }
}

impl Store {
    /// Stores a verified report under its record id unless a record with that id exists.
    /// Not durable until [`Store::flush`] returns.
    pub fn insert_record(
        &self,
        id: RecordId,
        gateway_id: u64,
        received_ms: u64,
        report: &[u8],
    ) -> Result<InsertOutcome, StoreError> {
        let value = encode_value(gateway_id, received_ms, report)?;
        match self.records.compare_and_swap(id.to_key(), None::<&[u8]>, Some(value))? {
            Ok(()) => Ok(InsertOutcome::Stored),
            Err(cas) => {
                let current = cas.current.ok_or_else(|| {
                    StoreError::Corrupt(format!("record {id}: insert refused but no record present"))
                })?;
                if decode_value(&current)?.report == report {
                    Ok(InsertOutcome::Duplicate)
                } else {
                    Ok(InsertOutcome::Conflict)
                }
            }
        }
    }

    /// Stores a batch's verified records (see [`Store::insert_record`]) and flushes, so they
    /// are durable when this returns. One outcome per input, in input order; a second copy
    /// of an id inside the batch is settled against the first, as across batches.
    pub fn insert_batch(
        &self,
        gateway_id: u64,
        records: &[NewRecord],
    ) -> Result<Vec<InsertOutcome>, StoreError> {
        let mut outcomes = Vec::with_capacity(records.len());
        for r in records {
            outcomes.push(self.insert_record(r.id, gateway_id, r.received_ms, &r.report)?);
        }
        // Flush even when nothing was stored: a duplicate may be an earlier attempt's write
        // that was never flushed, and it is acknowledged now.
        self.flush()?;
        Ok(outcomes)
    }

    /// The stored record with this id.
    pub fn record(&self, id: RecordId) -> Result<Option<StoredRecord>, StoreError> {
        let Some(bytes) = self.records.get(id.to_key())? else { return Ok(None) };
        let v = decode_value(&bytes)?;
        Ok(Some(StoredRecord {
            gateway_id: v.gateway_id,
            received_ms: v.received_ms,
            report: v.report.to_vec(),
        }))
    }

    /// Number of stored records. sled counts by walking the tree: O(records), for tests and
    /// tools, not for request paths.
    pub fn record_count(&self) -> usize {
        self.records.len()
    }

    /// Bytes per (ICCID, UTC day) over every stored record (see [`countersign_rating::usage`]).
    ///
    /// This scans the whole `records` tree in key order and decodes every report: O(records)
    /// per query, because an epoch's running maximum needs all its reports whatever range is
    /// asked for. Fine for the embedded store's scale; the PostgreSQL store keeps derived
    /// daily totals instead.
    pub fn daily_usage(&self) -> Result<Derived, StoreError> {
        // UTC days are zone days in UTC (`derive_daily` is `derive_daily_in` in UTC).
        self.daily_usage_in(&TimeZone::UTC)
    }

    /// Bytes per (ICCID, day in `tz`) over every stored record, streamed in key order
    /// through [`derive_daily_in`]: O(records), like [`Store::daily_usage`].
    pub fn daily_usage_in(&self, tz: &TimeZone) -> Result<Derived, StoreError> {
        let mut failure = None;
        let records = self.usage_records().map_while(|r| match r {
            Ok(r) => Some(r),
            Err(e) => {
                failure = Some(e);
                None
            }
        });
        let daily = derive_daily_in(records, tz);
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(daily?)
    }

    /// Every stored record as the derivation sees it, in record id order. O(records).
    pub fn usage_records(&self) -> impl Iterator<Item = Result<UsageRecord, StoreError>> + '_ {
        self.records.iter().map(usage_record)
    }
}

fn usage_record(item: sled::Result<(sled::IVec, sled::IVec)>) -> Result<UsageRecord, StoreError> {
    let (key, value) = item?;
    let id = RecordId::from_key(&key)
        .ok_or_else(|| StoreError::Corrupt(format!("record key of {} bytes", key.len())))?;
    let v = decode_value(&value)?;
    // Verified on ingest, so only decoding is needed; the tag stays in the bytes as evidence.
    let (report, _) = Report::decode(v.report)
        .map_err(|e| StoreError::Corrupt(format!("record {id}: stored report does not decode: {e}")))?;
    if report.id() != id {
        return Err(StoreError::Corrupt(format!(
            "record {id}: stored under the id of report {}",
            report.id()
        )));
    }
    Ok(UsageRecord::from_report(&report, v.received_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_value_format_is_pinned() {
        let v = encode_value(7, 1_795_000_000_123, &[0xaa, 0xbb]).unwrap();
        assert_eq!(hex::encode(&v), "0107fbbcd9f29e3402aabb");
        let back = decode_value(&v).unwrap();
        assert_eq!(
            (back.gateway_id, back.received_ms, back.report),
            (7, 1_795_000_000_123, &[0xaa, 0xbb][..])
        );
        assert!(matches!(decode_value(&[2, 0]), Err(StoreError::Corrupt(_))));
        assert!(matches!(decode_value(&[]), Err(StoreError::Corrupt(_))));
        let mut trailing = v.clone();
        trailing.push(0);
        assert!(matches!(decode_value(&trailing), Err(StoreError::Corrupt(_))));
    }
}
