//! Batch ingest: verify the gateway's signature, then every device tag, store durably, reply.
//!
//! The work is split so that either store can run it without blocking the async runtime:
//!
//! 1. [`open_batch`] (CPU: one Ed25519 check) verifies the batch signature with the gateway's
//!    key and lists its records as zero-copy slices of the body, each decoded once
//!    ([`OpenedRecord`]; no later step decodes a report again);
//! 2. the meter keys of the batch are read from the store in one call;
//! 3. [`check_records`] (CPU: one HMAC per record) checks every tag over the decoded body, and
//!    [`validate_report`] refuses what a later stage could not count (counters beyond their
//!    physical ceilings, receive and device times outside a window around the endpoint's
//!    clock), so that nothing stored can fail a derivation, settlement, billing run or
//!    export;
//! 4. the store inserts the verified records in one durable step
//!    ([`StoreBackend::insert_batch`]: one sled flush, or one PostgreSQL transaction);
//! 5. [`CheckedBatch::reply`] puts the per-record outcomes back in batch order.
//!
//! [`ingest`] runs these with the CPU steps on tokio's blocking pool; [`ingest_batch`] runs
//! them synchronously on a sled [`Store`], for tests and tools.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use countersign_protocol::{peek_header, BatchError, BatchHeader, BatchReply, RecordOutcome};
use tracing::Instrument;

pub use countersign_rating::batch::{
    check_records, open_batch, CheckedBatch, OpenedBatch, OpenedRecord, OutcomeCountError,
};

pub use countersign_rating::check::{
    attribution_ms, check_created, validate_report, BASE_MAX, EVENTS_PER_DEVICE_SECOND_MAX,
    EXTRA_USED_PER_EPOCH_MAX, LATE_ATTRIBUTION_MS, RECEIVED_AGE_MS_MAX, RECEIVED_AHEAD_MS_MAX,
    UPTIME_SLACK_S,
};

use crate::store::{blocking, Store, StoreBackend, StoreError};

/// The endpoint's clock, Unix milliseconds; injected so that the time checks are testable.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> u64 + Send + Sync>);

impl Clock {
    /// The system clock (0 before 1970, saturating far in the future).
    pub fn system() -> Self {
        Self(Arc::new(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0)
        }))
    }

    /// A clock that reads `f`, e.g. a fixed instant in tests.
    pub fn from_fn(f: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Now, Unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        (self.0)()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({} ms)", self.now_ms())
    }
}

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
    /// The batch's creation time is outside the window around the endpoint's clock (the
    /// gateway's clock is wrong). Not recoverable by resending: the gateway keeps the
    /// records until its clock is fixed.
    #[error("{0}")]
    Clock(String),
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

async fn cpu<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, IngestError> {
    // The same pool as store work: a task that panicked fails the batch as a store fault.
    blocking(move || Ok(f())).await
}

/// The batch's reply from the store's outcomes, logged.
fn reply(
    checked: CheckedBatch,
    outcomes: Vec<crate::store::InsertOutcome>,
) -> Result<BatchReply, IngestError> {
    let reply = checked.reply(outcomes).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let summary = IngestSummary::of(&reply);
    tracing::info!(
        stored = summary.stored,
        duplicate = summary.duplicate,
        rejected = summary.rejected,
        "batch ingested"
    );
    Ok(reply)
}

/// Verifies and stores one signed batch on either store. The reply is only returned once
/// every stored record is durable, so a gateway may forget whatever it says.
pub async fn ingest(store: &StoreBackend, signed: Bytes, now_ms: u64) -> Result<BatchReply, IngestError> {
    let header = peek_header(&signed)?;
    let span = tracing::info_span!(
        "batch",
        gateway_id = header.gateway_id,
        batch_seq = header.batch_seq,
        store = store.kind()
    );
    ingest_opened(store, header, signed, now_ms).instrument(span).await
}

async fn ingest_opened(
    store: &StoreBackend,
    header: BatchHeader,
    signed: Bytes,
    now_ms: u64,
) -> Result<BatchReply, IngestError> {
    let gateway_key = store.gateway_key(header.gateway_id).await?;
    let opened = cpu(move || open_batch(&signed, gateway_key)).await??;
    check_created(opened.header.created_ms, now_ms).map_err(IngestError::Clock)?;
    let keys = store.meter_keys(opened.meter_ids()).await?;
    let mut checked = cpu(move || check_records(opened, &keys, now_ms)).await?;
    let records = checked.take_records();
    let outcomes = store.insert_batch(checked.header.gateway_id, records).await?;
    reply(checked, outcomes)
}

/// Verifies and stores one signed batch on a sled store, synchronously, then flushes. The
/// reply is only returned once every stored record is durable.
pub fn ingest_batch(store: &Store, signed: &[u8], now_ms: u64) -> Result<BatchReply, IngestError> {
    let signed = Bytes::copy_from_slice(signed);
    let header = peek_header(&signed)?;
    let span = tracing::info_span!("batch", gateway_id = header.gateway_id, batch_seq = header.batch_seq);
    let _entered = span.enter();
    let opened = open_batch(&signed, store.gateway_key(header.gateway_id)?)?;
    check_created(opened.header.created_ms, now_ms).map_err(IngestError::Clock)?;
    let mut keys = HashMap::new();
    for id in opened.meter_ids() {
        if let Some(k) = store.meter_key(id)? {
            keys.insert(id, k);
        }
    }
    let mut checked = check_records(opened, &keys, now_ms);
    let records = checked.take_records();
    let outcomes = store.insert_batch(checked.header.gateway_id, &records)?;
    reply(checked, outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::{UsageRecord, BYTES_PER_DEVICE_SECOND_MAX, USED_BYTES_PER_EPOCH_MAX};
    use countersign_meter::{CounterKind, DeviceTime, Report, TimeQuality, Totals};
    use countersign_protocol::RejectReason;
    use countersign_testkit::batch::{signed_batch, signing_key};
    use countersign_testkit::report::ReportBuilder;
    use ed25519_dalek::SigningKey;
    use proptest::prelude::*;

    const METER_KEY: [u8; 32] = [4u8; 32];
    const NOW_MS: u64 = 1_795_521_600_000;

    fn gateway() -> SigningKey {
        signing_key(11)
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
        ReportBuilder::new(meter_id, seq, 8_988_280_666_000_000_001, time).used(up, up).encode(key)
    }

    fn batch(reports: &[(u64, Vec<u8>)], key: &SigningKey) -> Vec<u8> {
        signed_batch(key, 1, 9, NOW_MS, reports)
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
        let reply = ingest_batch(&store, &signed, NOW_MS).unwrap();
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
                Some(RejectReason::ReceiveTime),
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
        let e = ingest_batch(&store, &wrong, NOW_MS).unwrap_err();
        assert!(matches!(e, IngestError::Batch(BatchError::BadSignature(1))), "{e}");
        let e = ingest_batch(
            &store,
            b"not a batch at all, clearly, not even close to one, no sir, not at all",
            NOW_MS,
        )
        .unwrap_err();
        assert!(matches!(e, IngestError::Batch(ref b) if !b.is_auth()), "{e}");
        let signed = signed_batch(&gateway(), 2, 0, 0, &[(0, &reports[0].1)]);
        let e = ingest_batch(&store, &signed, NOW_MS).unwrap_err();
        assert!(matches!(e, IngestError::Batch(BatchError::UnknownGateway(2))), "{e}");
        // A batch created outside the window around the endpoint's clock: refused whole.
        for created_ms in [NOW_MS + RECEIVED_AHEAD_MS_MAX + 1, NOW_MS - RECEIVED_AGE_MS_MAX - 1, 0] {
            let signed = signed_batch(&gateway(), 1, 0, created_ms, &[(NOW_MS, &reports[0].1)]);
            let e = ingest_batch(&store, &signed, NOW_MS).unwrap_err();
            assert!(matches!(e, IngestError::Clock(ref why) if why.contains("batch creation time")), "{e}");
        }
        assert_eq!(store.record_count(), 0);
    }

    fn base_report(time: DeviceTime) -> Report {
        Report {
            meter_id: 5,
            epoch: 0,
            seq: 0,
            iccid: 8_988_280_666_000_000_001,
            time,
            base: Totals::default(),
            used: Totals { up: 1000, down: 1000 },
            extras: Default::default(),
        }
    }

    fn verdict(r: &Report, received_ms: u64) -> Option<RejectReason> {
        validate_report(r, received_ms, NOW_MS).err().map(|(reason, detail)| {
            assert!(!detail.is_empty());
            reason
        })
    }

    #[test]
    fn receive_and_network_times_must_be_inside_the_window() {
        let uptime = base_report(DeviceTime::uptime(3600).unwrap());
        assert_eq!(verdict(&uptime, NOW_MS), None);
        assert_eq!(verdict(&uptime, NOW_MS + RECEIVED_AHEAD_MS_MAX), None);
        assert_eq!(verdict(&uptime, NOW_MS + RECEIVED_AHEAD_MS_MAX + 1), Some(RejectReason::ReceiveTime));
        assert_eq!(verdict(&uptime, NOW_MS - RECEIVED_AGE_MS_MAX), None);
        assert_eq!(verdict(&uptime, NOW_MS - RECEIVED_AGE_MS_MAX - 1), Some(RejectReason::ReceiveTime));
        for bad in [0, u64::MAX, u64::MAX / 2, i64::MAX as u64] {
            assert_eq!(verdict(&uptime, bad), Some(RejectReason::ReceiveTime), "{bad}");
        }
        // The receive time is checked whatever the device's clock, network time included.
        let network = |s: u64| base_report(DeviceTime::wall_clock(TimeQuality::Network, s).unwrap());
        assert_eq!(verdict(&network(NOW_MS / 1000), u64::MAX), Some(RejectReason::ReceiveTime));
        let ahead_s = (NOW_MS + RECEIVED_AHEAD_MS_MAX) / 1000 + 1;
        assert_eq!(verdict(&network(ahead_s), NOW_MS), Some(RejectReason::DeviceTime));
        let old_s = (NOW_MS - RECEIVED_AGE_MS_MAX) / 1000 - 1;
        assert_eq!(verdict(&network(old_s), NOW_MS), Some(RejectReason::DeviceTime));
        assert_eq!(verdict(&network(NOW_MS / 1000 - 86_400), NOW_MS), None);
        // An RTC time is not trusted for the day, so it is not checked either.
        let rtc = base_report(DeviceTime::wall_clock(TimeQuality::Rtc, ahead_s + 1_000_000).unwrap());
        assert_eq!(verdict(&rtc, NOW_MS), None);
    }

    #[test]
    fn counters_beyond_their_ceilings_are_refused() {
        let network = DeviceTime::wall_clock(TimeQuality::Network, NOW_MS / 1000).unwrap();
        let with = |f: &dyn Fn(&mut Report)| {
            let mut r = base_report(network);
            f(&mut r);
            verdict(&r, NOW_MS)
        };
        let ceiling = Some(RejectReason::CounterCeiling);
        assert_eq!(with(&|r| r.used.up = USED_BYTES_PER_EPOCH_MAX), None);
        assert_eq!(with(&|r| r.used.up = USED_BYTES_PER_EPOCH_MAX + 1), ceiling);
        assert_eq!(with(&|r| r.used.down = u64::MAX), ceiling);
        assert_eq!(with(&|r| r.base.down = BASE_MAX), None);
        assert_eq!(with(&|r| r.base.down = BASE_MAX + 1), ceiling);
        // Per second of uptime: 2.5 GB/s with a minute of slack.
        let up_s = 100u32;
        let per_s = |used: u64| {
            let mut r = base_report(DeviceTime::uptime(up_s).unwrap());
            r.used.down = used;
            verdict(&r, NOW_MS)
        };
        let max = BYTES_PER_DEVICE_SECOND_MAX * (u64::from(up_s) + UPTIME_SLACK_S);
        assert_eq!(per_s(max), None);
        assert_eq!(per_s(max + 1), ceiling);
        let extra = |kind: CounterKind, used: u64, time: DeviceTime| {
            let mut r = base_report(time);
            r.extras.push(countersign_meter::ExtraCounter { kind, base: 0, used }).unwrap();
            verdict(&r, NOW_MS)
        };
        let uptime = DeviceTime::uptime(up_s).unwrap();
        let secs = u64::from(up_s) + UPTIME_SLACK_S;
        assert_eq!(extra(CounterKind::SmsSent, EVENTS_PER_DEVICE_SECOND_MAX * secs, uptime), None);
        assert_eq!(extra(CounterKind::SmsSent, EVENTS_PER_DEVICE_SECOND_MAX * secs + 1, uptime), ceiling);
        assert_eq!(
            extra(CounterKind::DataSessions, EVENTS_PER_DEVICE_SECOND_MAX * secs + 1, uptime),
            ceiling
        );
        assert_eq!(extra(CounterKind::AttachedSeconds, secs, uptime), None);
        assert_eq!(extra(CounterKind::AttachedSeconds, secs + 1, uptime), ceiling);
        assert_eq!(extra(CounterKind::AttachedSeconds, 1 << 31, network), ceiling);
        assert_eq!(extra(CounterKind::App(3), EXTRA_USED_PER_EPOCH_MAX, network), None);
        assert_eq!(extra(CounterKind::App(3), EXTRA_USED_PER_EPOCH_MAX + 1, network), ceiling);
        assert_eq!(extra(CounterKind::SmsReceived, EXTRA_USED_PER_EPOCH_MAX + 1, network), ceiling);
    }

    #[test]
    fn nothing_validation_accepts_can_fail_a_later_stage() {
        // The attribution instant of an accepted record is a date in every zone, through the
        // very function settlement, billing and the export use.
        let zones = ["UTC", "Pacific/Kiritimati", "Pacific/Pago_Pago", "Europe/Berlin"];
        for received_ms in [NOW_MS - RECEIVED_AGE_MS_MAX, NOW_MS, NOW_MS + RECEIVED_AHEAD_MS_MAX] {
            let r = base_report(DeviceTime::uptime(3600).unwrap());
            assert_eq!(verdict(&r, received_ms), None);
            let t = crate::usage::attribution_instant(&r.time, received_ms).unwrap();
            for z in zones {
                assert!(crate::usage::zone_date(t, &crate::usage::time_zone(z).unwrap()).is_some());
            }
            assert!(crate::usage::record_fault(&UsageRecord::from_report(&r, received_ms)).is_none());
        }
    }

    proptest! {
        /// Whatever report, receive time and clock: what validation accepts derives without a
        /// fault in every zone and plans as a Lago event (the fuzz target `ingest_check` says
        /// the same over arbitrary bytes).
        #[test]
        fn whatever_validation_accepts_every_later_stage_can_count(
            now_ms in 0u64..4_000_000_000_000,
            received in prop_oneof![any::<u64>(), 0u64..2 * RECEIVED_AGE_MS_MAX],
            secs in 0u32..1 << 30,
            quality in 0u8..3,
            up in prop_oneof![any::<u64>(), 0u64..=USED_BYTES_PER_EPOCH_MAX],
            down in prop_oneof![any::<u64>(), 0u64..=USED_BYTES_PER_EPOCH_MAX],
        ) {
            // Half the receive times near the clock, half anywhere.
            let received_ms = if received < 2 * RECEIVED_AGE_MS_MAX {
                now_ms.saturating_sub(RECEIVED_AGE_MS_MAX).saturating_add(received)
            } else {
                received
            };
            let time = match quality {
                0 => DeviceTime::uptime(secs).unwrap(),
                1 => DeviceTime::wall_clock(TimeQuality::Rtc, countersign_meter::report::DEVICE_TIME_ORIGIN_UNIX_S + u64::from(secs)).unwrap(),
                _ => DeviceTime::wall_clock(TimeQuality::Network, countersign_meter::report::DEVICE_TIME_ORIGIN_UNIX_S + u64::from(secs)).unwrap(),
            };
            let mut r = base_report(time);
            r.used = Totals { up, down };
            if validate_report(&r, received_ms, now_ms).is_ok() {
                let record = UsageRecord::from_report(&r, received_ms);
                prop_assert!(crate::usage::record_fault(&record).is_none());
                for z in ["UTC", "Pacific/Kiritimati", "Pacific/Pago_Pago"] {
                    let d = crate::usage::derive_daily_in([record], &crate::usage::time_zone(z).unwrap()).unwrap();
                    prop_assert!(d.faults.is_empty());
                }
                prop_assert!(crate::service::lago::plan_event(&record, Totals::default(), "s", &crate::service::lago::LagoMetric::default()).is_ok());
            }
        }
    }

    #[test]
    fn late_records_are_counted() {
        let (_dir, store) = store();
        let old = NOW_MS - 3 * 24 * 3600 * 1000;
        let signed = batch(
            &[
                (NOW_MS, report(5, 0, 10, &METER_KEY)),
                (old, report_at(5, 1, 11, &METER_KEY, DeviceTime::uptime(60).unwrap())),
            ],
            &gateway(),
        );
        let opened = open_batch(&Bytes::from(signed), Some(gateway().verifying_key())).unwrap();
        let keys = HashMap::from([(5, METER_KEY)]);
        let checked = check_records(opened, &keys, NOW_MS);
        assert_eq!((checked.to_store.len(), checked.late), (2, 1));
        drop(store);
    }
}
