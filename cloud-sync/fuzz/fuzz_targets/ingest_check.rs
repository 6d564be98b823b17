//! Fuzzes ingest's record checks past the device tag: the input chooses the endpoint's clock,
//! the gateway's receive time and a report body (any counters, times, extras), which is
//! re-tagged here with a known meter key so that `validate_report` sees it. Never a panic;
//! and whatever ingest accepts derives without a fault in every zone and plans as a Lago
//! event: nothing ingest stores can fail a later stage.
//!
//! Run: `tests/fuzz.sh` (all targets) or `cd cloud-sync/fuzz && cargo fuzz run ingest_check`.
#![no_main]

use std::collections::HashMap;

use bytes::Bytes;
use countersign_cloud::service::ingest::{check_records, OpenedBatch, OpenedRecord};
use countersign_cloud::service::lago::{plan_event, LagoMetric};
use countersign_cloud::usage::{derive_daily_in, time_zone, UsageRecord};
use countersign_meter::{Report, Totals, REPORT_BYTES_MAX};
use countersign_protocol::BatchHeader;
use libfuzzer_sys::fuzz_target;

const KEY: [u8; 32] = [9u8; 32];

fuzz_target!(|data: &[u8]| {
    let Some((head, body)) = data.split_at_checked(16) else { return };
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    // Any clock from 1970 to about 2096: the endpoint's clock is not an attacker's input.
    let now_ms = word(&head[..8]) % 4_000_000_000_000;
    let received_ms = word(&head[8..]);
    // The body is a report whose last 16 bytes stand for its tag; re-tag it with the key.
    let Ok((report, _)) = Report::decode(body) else { return };
    let mut buf = [0u8; REPORT_BYTES_MAX];
    let Ok(n) = report.encode(&KEY, &mut buf) else { return };
    let meter_id = report.meter_id;
    let batch = OpenedBatch {
        header: BatchHeader { gateway_id: 1, batch_seq: 0, created_ms: now_ms },
        records: vec![OpenedRecord::new(received_ms, Bytes::copy_from_slice(&buf[..n]))],
    };
    let checked = check_records(batch, &HashMap::from([(meter_id, KEY)]), now_ms);
    for r in &checked.to_store {
        let record = UsageRecord::from_report(&report, r.received_ms);
        for zone in ["UTC", "Pacific/Kiritimati", "Pacific/Pago_Pago"] {
            let tz = time_zone(zone).unwrap();
            let d = derive_daily_in([record], &tz).unwrap();
            assert!(d.faults.is_empty(), "accepted record underivable in {zone}: {:?}", d.faults);
        }
        plan_event(&record, Totals::default(), "sub", &LagoMetric::default()).unwrap();
    }
});
