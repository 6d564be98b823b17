//! Ingest validation over real HTTP with real signed batches, on both stores: every record a
//! later stage could not count is refused with its reason (counter ceilings, receive and
//! device times outside the window around the endpoint's clock), a batch created outside the
//! window is refused whole, and what is stored derives without a fault. The endpoint's clock
//! is injected, so the window is tested without the real clock.
#![allow(clippy::unwrap_used)]

use countersign_cloud::service::ingest::{
    Clock, EVENTS_PER_DEVICE_SECOND_MAX, RECEIVED_AGE_MS_MAX, RECEIVED_AHEAD_MS_MAX, UPTIME_SLACK_S,
};
use countersign_cloud::usage::{BYTES_PER_DEVICE_SECOND_MAX, USED_BYTES_PER_EPOCH_MAX};
use countersign_cloud::{CloudConfig, Endpoint, StoreBackend};
use countersign_meter::{CounterKind, DeviceTime, ExtraCounter, Totals};
use countersign_protocol::keys::write_secret;
use countersign_protocol::{BatchReply, RecordOutcome, RejectReason};
use countersign_testkit::{gateway_key, network_time, signed_batch, ReportBuilder};

#[macro_use]
mod common;
use common::Kind;

const TOKEN: [u8; 32] = [0x5a; 32];
const KEY: [u8; 32] = [0xa1; 32];
const METER: u64 = 10;
const GATEWAY: u64 = 1;
const SIM: u64 = 8_988_280_666_000_000_001;
/// The endpoint's clock: 2026-11-24T12:00:00Z.
const NOW_MS: u64 = 1_795_521_600_000;

on_both_stores!(records_later_stages_cannot_count_are_refused_with_reasons);

/// Report `seq` of the test's meter and SIM.
fn report(seq: u32, time: DeviceTime, used: Totals, extra: Option<ExtraCounter>) -> Vec<u8> {
    let r = ReportBuilder::new(METER, seq, SIM, time).used(used.up, used.down);
    let r = match extra {
        Some(x) => r.extra(x),
        None => r,
    };
    r.encode(&KEY)
}

/// A batch of the test's gateway.
fn sign(batch_seq: u64, created_ms: u64, records: &[(u64, Vec<u8>)]) -> Vec<u8> {
    signed_batch(&gateway_key(), GATEWAY, batch_seq, created_ms, records)
}

/// Stops the server when the test ends; keeps the state alive until then.
struct Guard {
    _server: common::Server,
    _dir: tempfile::TempDir,
    _db: Option<countersign_cloud::store::postgres::testing::TestDatabase>,
}

async fn start(kind: Kind) -> (String, StoreBackend, Guard) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (dir, db) = common::state_for(kind).await;
    let token_file = dir.path().join("admin.token");
    write_secret(&token_file, &TOKEN).unwrap();
    let store = common::store_section(db.as_ref());
    let text = format!(
        "listen = '127.0.0.1:0'\ndata_dir = '{}'\nadmin_token_file = '{}'\n[store]\n{store}\n",
        dir.path().join("data").display(),
        token_file.display(),
    );
    let endpoint = Endpoint::connect(&CloudConfig::from_toml_str(&text).unwrap())
        .await
        .unwrap()
        .with_clock(Clock::from_fn(|| NOW_MS));
    let store = endpoint.store().clone();
    store.add_gateway(GATEWAY, gateway_key().verifying_key()).await.unwrap();
    store.add_meter(METER, KEY).await.unwrap();
    let server = common::serve(endpoint).await;
    (server.base.clone(), store, Guard { _server: server, _dir: dir, _db: db })
}

async fn post(base: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new().post(format!("{base}/v1/batches")).body(body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn records_later_stages_cannot_count_are_refused_with_reasons(kind: Kind) {
    let (base, store, _guard) = start(kind).await;
    let now = network_time(NOW_MS / 1000);
    let small = Totals { up: 1_000, down: 2_000 };
    let up_s = 100u32;
    let rate_max = BYTES_PER_DEVICE_SECOND_MAX * (u64::from(up_s) + UPTIME_SLACK_S);
    let sms = |used| Some(ExtraCounter { kind: CounterKind::SmsSent, base: 0, used });
    let cases: Vec<(u64, Vec<u8>, Option<RejectReason>)> = vec![
        (NOW_MS, report(0, now, small, None), None),
        (
            NOW_MS,
            report(1, now, Totals { up: USED_BYTES_PER_EPOCH_MAX + 1, down: 0 }, None),
            Some(RejectReason::CounterCeiling),
        ),
        (
            NOW_MS,
            report(2, now, Totals { up: u64::MAX - 10, down: 1 }, None),
            Some(RejectReason::CounterCeiling),
        ),
        (
            NOW_MS,
            report(3, DeviceTime::uptime(up_s).unwrap(), Totals { up: 0, down: rate_max + 1 }, None),
            Some(RejectReason::CounterCeiling),
        ),
        (
            NOW_MS,
            report(4, DeviceTime::uptime(up_s).unwrap(), small, sms(EVENTS_PER_DEVICE_SECOND_MAX * 1_000)),
            Some(RejectReason::CounterCeiling),
        ),
        (NOW_MS + RECEIVED_AHEAD_MS_MAX + 1, report(5, now, small, None), Some(RejectReason::ReceiveTime)),
        (NOW_MS - RECEIVED_AGE_MS_MAX - 1, report(6, now, small, None), Some(RejectReason::ReceiveTime)),
        // The value: accepted by the `time` crate, out of range for jiff.
        (
            253_402_300_799_000,
            report(7, DeviceTime::uptime(60).unwrap(), small, None),
            Some(RejectReason::ReceiveTime),
        ),
        (u64::MAX, report(8, DeviceTime::uptime(60).unwrap(), small, None), Some(RejectReason::ReceiveTime)),
        (NOW_MS, report(9, network_time(NOW_MS / 1000 + 3_600), small, None), Some(RejectReason::DeviceTime)),
        (
            NOW_MS,
            report(10, DeviceTime::uptime(up_s).unwrap(), Totals { up: 5_000, down: rate_max }, None),
            None,
        ),
    ];
    let records: Vec<(u64, Vec<u8>)> = cases.iter().map(|(t, r, _)| (*t, r.clone())).collect();
    let (status, v) = post(&base, sign(1, NOW_MS, &records)).await;
    assert_eq!(status, 200, "{v}");
    let reply: BatchReply = serde_json::from_value(v.clone()).unwrap();
    let got: Vec<Option<RejectReason>> = reply
        .results
        .iter()
        .map(|o| match o {
            RecordOutcome::Rejected { reason, detail } => {
                assert!(!detail.is_empty());
                Some(*reason)
            }
            RecordOutcome::Stored => None,
            other => panic!("{other:?}"),
        })
        .collect();
    let want: Vec<Option<RejectReason>> = cases.iter().map(|(_, _, r)| *r).collect();
    assert_eq!(got, want, "{v}");
    assert_eq!(v["results"][1]["reason"], "counter_ceiling");
    assert_eq!(v["results"][5]["reason"], "receive_time");
    assert_eq!(v["results"][9]["reason"], "device_time");
    assert_eq!(store.record_count().await.unwrap(), 2);

    // A batch created outside the window is refused whole; its records are not stored.
    let later = vec![(NOW_MS, report(20, now, small, None))];
    for created_ms in [NOW_MS + RECEIVED_AHEAD_MS_MAX + 1, NOW_MS - RECEIVED_AGE_MS_MAX - 1] {
        let (status, v) = post(&base, sign(2, created_ms, &later)).await;
        assert_eq!((status, v["code"].as_str()), (422, Some("clock_skew")), "{v}");
    }
    assert_eq!(store.record_count().await.unwrap(), 2);

    // What was stored derives without a fault, in any zone.
    let derived = store.daily_usage(None, Default::default()).await.unwrap();
    assert!(derived.faults.is_empty());
    let tz = countersign_cloud::usage::time_zone("Pacific/Kiritimati").unwrap();
    assert!(store.daily_usage_in(None, tz, Default::default()).await.unwrap().faults.is_empty());
}
