//! The `records` tree: verified reports by record id, and usage derived from them.

use countersign_meter::{RecordId, Report, Totals};
use serde::{Deserialize, Serialize};

use super::Store;
use crate::store::{StoreError, StoredRecord};
use countersign_rating::usage::{derive_daily_in, Derived, TimeZone, UsageRecord};

/// Version byte of values written before rollups: the record alone.
pub const RECORD_VALUE_V1: u8 = 1;
/// Version byte of every value written now: the record and its epoch's running maximum
/// through it (see [`super::rollups`]).
pub const RECORD_VALUE_VERSION: u8 = 2;

#[derive(Serialize, Deserialize)]
struct WireValueV1<'a> {
    gateway_id: u64,
    received_ms: u64,
    #[serde(borrow)]
    report: &'a [u8],
}

#[derive(Serialize, Deserialize)]
struct WireValueV2<'a> {
    gateway_id: u64,
    received_ms: u64,
    #[serde(borrow)]
    report: &'a [u8],
    max_up: u64,
    max_down: u64,
}

/// A decoded `records` value.
pub(crate) struct RecordValue<'a> {
    pub gateway_id: u64,
    pub received_ms: u64,
    /// The device's original bytes, tag included.
    pub report: &'a [u8],
    /// The epoch's running maximum through this record; `None` in a version 1 value, whose
    /// store has not had its rollups built yet.
    pub max_through: Option<Totals>,
}

pub(crate) fn encode_value(
    gateway_id: u64,
    received_ms: u64,
    report: &[u8],
    max_through: Totals,
) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![RECORD_VALUE_VERSION];
    let value =
        WireValueV2 { gateway_id, received_ms, report, max_up: max_through.up, max_down: max_through.down };
    let body = postcard::to_stdvec(&value)
        .map_err(|e| StoreError::Corrupt(format!("record value does not encode: {e}")))?;
    out.extend_from_slice(&body);
    Ok(out)
}

pub(crate) fn decode_value(bytes: &[u8]) -> Result<RecordValue<'_>, StoreError> {
    fn whole<'a, T: Deserialize<'a>>(rest: &'a [u8]) -> Result<T, StoreError> {
        let (v, tail): (T, &[u8]) = postcard::take_from_bytes(rest)
            .map_err(|e| StoreError::Corrupt(format!("record value does not decode: {e}")))?;
        if !tail.is_empty() {
            return Err(StoreError::Corrupt("record value has trailing bytes".into()));
        }
        Ok(v)
    }
    match bytes.split_first() {
        Some((&RECORD_VALUE_VERSION, rest)) => {
            let v: WireValueV2<'_> = whole(rest)?;
            Ok(RecordValue {
                gateway_id: v.gateway_id,
                received_ms: v.received_ms,
                report: v.report,
                max_through: Some(Totals { up: v.max_up, down: v.max_down }),
            })
        }
        Some((&RECORD_VALUE_V1, rest)) => {
            let v: WireValueV1<'_> = whole(rest)?;
            Ok(RecordValue {
                gateway_id: v.gateway_id,
                received_ms: v.received_ms,
                report: v.report,
                max_through: None,
            })
        }
        Some((v, _)) => Err(StoreError::Corrupt(format!("record value has unknown version {v}"))),
        None => Err(StoreError::Corrupt("record value is empty".into())),
    }
}

impl Store {
    /// Stores one report's bytes through [`Store::insert_batch`], for tests.
    #[cfg(test)]
    pub(crate) fn insert_one(
        &self,
        gateway_id: u64,
        received_ms: u64,
        bytes: &[u8],
    ) -> Result<crate::store::InsertOutcome, StoreError> {
        let (report, _) = Report::decode(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let record = crate::store::NewRecord::new(&report, received_ms, bytes.to_vec().into());
        Ok(self.insert_batch(gateway_id, &[record])?[0])
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

    /// Bytes per (ICCID, UTC day), from the rollups (see [`Store::rollup_daily_in`]).
    pub fn daily_usage(&self) -> Result<Derived, StoreError> {
        self.rollup_daily_in(None, &TimeZone::UTC, Default::default())
    }

    /// Bytes per (ICCID, day in `tz`), from the rollups (see [`Store::rollup_daily_in`]).
    pub fn daily_usage_in(&self, tz: &TimeZone) -> Result<Derived, StoreError> {
        self.rollup_daily_in(None, tz, Default::default())
    }

    /// Bytes per (ICCID, day in `tz`) derived from every stored record, streamed in key
    /// order through [`derive_daily_in`]: O(records). The model the rollups are checked
    /// against; reads use [`Store::rollup_daily_in`].
    pub fn derive_from_records_in(&self, tz: &TimeZone) -> Result<Derived, StoreError> {
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

pub(super) fn usage_record(item: sled::Result<(sled::IVec, sled::IVec)>) -> Result<UsageRecord, StoreError> {
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
        let max = Totals { up: 300, down: 5 };
        let v = encode_value(7, 1_795_000_000_123, &[0xaa, 0xbb], max).unwrap();
        assert_eq!(hex::encode(&v), "0207fbbcd9f29e3402aabbac0205");
        let back = decode_value(&v).unwrap();
        assert_eq!(
            (back.gateway_id, back.received_ms, back.report, back.max_through),
            (7, 1_795_000_000_123, &[0xaa, 0xbb][..], Some(max))
        );
        // Version 1 (before rollups) still reads, without a running maximum.
        let v1 = hex::decode("0107fbbcd9f29e3402aabb").unwrap();
        let back = decode_value(&v1).unwrap();
        assert_eq!((back.gateway_id, back.report, back.max_through), (7, &[0xaa, 0xbb][..], None));
        assert!(matches!(decode_value(&[3, 0]), Err(StoreError::Corrupt(_))));
        assert!(matches!(decode_value(&[]), Err(StoreError::Corrupt(_))));
        let mut trailing = v.clone();
        trailing.push(0);
        assert!(matches!(decode_value(&trailing), Err(StoreError::Corrupt(_))));
    }
}
