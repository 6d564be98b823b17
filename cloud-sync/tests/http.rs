//! The endpoint over real HTTP: registration, signed batches of real meter reports,
//! deduplication, rejection, authentication, usage by SIM and by day, restart. Every test
//! runs twice: on the embedded sled store and on PostgreSQL (a fresh database per test).
#![allow(clippy::unwrap_used)]

use std::path::Path;

use countersign_cloud::client::{self, ClientError};
use countersign_cloud::store::postgres::testing::TestDatabase;
use countersign_cloud::usage::DateRange;
use countersign_cloud::wire::usage::{DayUsage, SimTotal, SimsUsage};
use countersign_cloud::{CloudConfig, Endpoint, StoreBackend};
use countersign_meter::{
    CounterWidth, DeviceTime, MemoryStore, Meter, MeterConfig, Report, Totals, REPORT_BYTES_MAX,
};
use countersign_protocol::batch::BATCH_BYTES_MAX;
use countersign_protocol::keys::write_secret;
use countersign_protocol::{BatchReply, ErrorBody, RecordOutcome, RejectReason, BATCHES_PATH};
use countersign_testkit::{gateway_key, network_time, signed_batch, signing_key};
use ed25519_dalek::SigningKey;
use time::macros::date;
use time::Date;

#[macro_use]
mod common;
use common::Kind;

const TOKEN: [u8; 32] = [0x5a; 32];
const GATEWAY_ID: u64 = 1;
const METER_A: u64 = 10;
const METER_B: u64 = 20;
const KEY_A: [u8; 32] = [0xa1; 32];
const KEY_B: [u8; 32] = [0xb2; 32];
const SIM_A: u64 = 8_988_280_666_000_000_001;
const SIM_B: u64 = 8_988_280_666_000_000_002;
/// 2026-11-24T12:00:00Z.
const DAY1_NOON_S: u64 = 1_795_521_600;
const DAY_S: u64 = 86_400;
const DAY1: Date = date!(2026 - 11 - 24);
const DAY2: Date = date!(2026 - 11 - 25);
const DAY3: Date = date!(2026 - 11 - 26);

/// Where one test's endpoint keeps its state: a temp dir, and a database on PostgreSQL.
struct Env {
    dir: tempfile::TempDir,
    db: Option<TestDatabase>,
}

impl Env {
    async fn new(kind: Kind) -> Env {
        let (dir, db) = common::state_for(kind).await;
        Env { dir, db }
    }
}

on_both_stores!(
    batches_are_verified_deduplicated_and_rated,
    bad_query_parameters_are_named,
    registration_answers_created_then_ok,
);

struct Running {
    base: String,
    store: StoreBackend,
    server: common::Server,
}

impl Running {
    async fn stop(self) {
        self.server.stop().await;
    }
}

fn config(env: &Env) -> CloudConfig {
    let dir: &Path = env.dir.path();
    let token_file = dir.join("admin.token");
    if !token_file.exists() {
        write_secret(&token_file, &TOKEN).unwrap();
    }
    let store = common::store_section(env.db.as_ref());
    let text = format!(
        "listen = '127.0.0.1:0'\ndata_dir = '{}'\nadmin_token_file = '{}'\n[store]\n{store}\n",
        dir.join("data").display(),
        token_file.display()
    );
    CloudConfig::from_toml_str(&text).unwrap()
}

async fn start(env: &Env) -> Running {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The endpoint's clock at 2026-12-01T00:00:00Z: the reports below are inside its window
    // whenever the test runs.
    let endpoint = Endpoint::connect(&config(env))
        .await
        .unwrap()
        .with_clock(countersign_cloud::service::ingest::Clock::from_fn(|| 1_796_083_200_000));
    let store = endpoint.store().clone();
    let server = common::serve(endpoint).await;
    Running { base: server.base.clone(), store, server }
}

fn token() -> String {
    hex::encode(TOKEN)
}

fn meter(id: u64, key: [u8; 32]) -> Meter<MemoryStore> {
    let config = MeterConfig::new(id, CounterWidth::Bits64);
    Meter::boot(config, key, MemoryStore::default()).unwrap()
}

fn reboot(m: Meter<MemoryStore>, id: u64, key: [u8; 32]) -> Meter<MemoryStore> {
    let config = MeterConfig::new(id, CounterWidth::Bits64);
    Meter::boot(config, key, m.into_store()).unwrap()
}

fn write(m: &mut Meter<MemoryStore>, iccid: u64, time: DeviceTime) -> Vec<u8> {
    let mut buf = [0u8; REPORT_BYTES_MAX];
    let n = m.write_report(iccid, time, time.secs(), &mut buf).unwrap();
    buf[..n].to_vec()
}

/// A batch of the test's gateway formed at noon on day 1.
fn sign(batch_seq: u64, records: &[(u64, &[u8])], key: &SigningKey) -> Vec<u8> {
    signed_batch(key, GATEWAY_ID, batch_seq, DAY1_NOON_S * 1000, records)
}

async fn post(http: &reqwest::Client, base: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
    let r = http
        .post(format!("{base}{BATCHES_PATH}"))
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn reply(v: serde_json::Value) -> BatchReply {
    serde_json::from_value(v).unwrap()
}

fn error_code(v: serde_json::Value) -> String {
    serde_json::from_value::<ErrorBody>(v).unwrap().code
}

fn reason(o: &RecordOutcome) -> Option<RejectReason> {
    match o {
        RecordOutcome::Rejected { reason, .. } => Some(*reason),
        _ => None,
    }
}

fn day(date: Date, up: u64, down: u64) -> DayUsage {
    DayUsage { date, up_bytes: up, down_bytes: down, total_bytes: up + down }
}

async fn count(ep: &Running) -> u64 {
    ep.store.record_count().await.unwrap()
}

async fn batches_are_verified_deduplicated_and_rated(kind: Kind) {
    let env = Env::new(kind).await;
    let ep = start(&env).await;
    let http = reqwest::Client::new();
    let base = ep.base.as_str();

    // Registration through the admin API, idempotent, never overwritten.
    client::register_gateway(&http, base, &token(), GATEWAY_ID, &gateway_key().verifying_key())
        .await
        .unwrap();
    client::register_meter(&http, base, &token(), METER_A, &KEY_A).await.unwrap();
    client::register_meter(&http, base, &token(), METER_B, &KEY_B).await.unwrap();
    client::register_meter(&http, base, &token(), METER_A, &KEY_A).await.unwrap();
    match client::register_meter(&http, base, &token(), METER_A, &KEY_B).await {
        Err(ClientError::Refused { status: 409, code, .. }) => assert_eq!(code, "conflict"),
        other => panic!("re-keying a meter must conflict, got {other:?}"),
    }

    // Meter A (network time): epoch 0 over days 1-2, checkpoint, bytes lost to a power cut,
    // then epoch 1 over days 2-3.
    let mut a = meter(METER_A, KEY_A);
    a.observe(50_000, 80_000);
    let a0 = write(&mut a, SIM_A, network_time(DAY1_NOON_S));
    a.observe(51_000, 85_000);
    let a1 = write(&mut a, SIM_A, network_time(DAY1_NOON_S + 60));
    a.observe(51_500, 89_000);
    let a2 = write(&mut a, SIM_A, network_time(DAY1_NOON_S + DAY_S));
    a.checkpoint().unwrap();
    a.observe(51_700, 89_100); // counted, never reported: the bounded loss of a power cut
    let mut a = reboot(a, METER_A, KEY_A);
    assert_eq!(a.epoch(), 1);
    a.observe(0, 0);
    a.observe(300, 700);
    let a3 = write(&mut a, SIM_A, network_time(DAY1_NOON_S + DAY_S + 3600));
    a.observe(800, 1000);
    let a4 = write(&mut a, SIM_A, network_time(DAY1_NOON_S + 2 * DAY_S));
    assert_eq!(Report::decode(&a4).unwrap().0.base, Totals { up: 1500, down: 9000 });

    // Meter B has only an uptime clock: its days come from the gateway's receive time.
    let mut b = meter(METER_B, KEY_B);
    b.observe(7, 7);
    let b0 = write(&mut b, SIM_B, DeviceTime::uptime(10).unwrap());
    b.observe(207, 107);
    let b1 = write(&mut b, SIM_B, DeviceTime::uptime(20).unwrap());
    let day1_ms = DAY1_NOON_S * 1000;
    let day2_ms = (DAY1_NOON_S + DAY_S) * 1000;

    // Batch 1: stored; resent: duplicate.
    let batch1 = sign(1, &[(day1_ms, &a0), (day1_ms, &a1), (day2_ms, &a2), (day1_ms, &b0)], &gateway_key());
    let (status, v) = post(&http, base, batch1.clone()).await;
    assert_eq!(status, 200, "{v}");
    let r = reply(v);
    assert_eq!((r.gateway_id, r.batch_seq), (GATEWAY_ID, 1));
    assert_eq!(r.results, vec![RecordOutcome::Stored; 4]);
    let (status, v) = post(&http, base, batch1).await;
    assert_eq!(status, 200);
    assert_eq!(reply(v).results, vec![RecordOutcome::Duplicate; 4]);

    // Batch 2: the second epoch out of order, a forged report, an unknown meter, a replay.
    let mut forger = meter(METER_A, [0xee; 32]);
    let forged = write(&mut forger, SIM_A, network_time(DAY1_NOON_S));
    let mut stranger = meter(30, [0x30; 32]);
    let unknown = write(&mut stranger, SIM_A, network_time(DAY1_NOON_S));
    let batch2 = sign(
        2,
        &[
            (day2_ms, &a4),
            (day2_ms, &a3),
            (day2_ms, &b1),
            (day2_ms, &forged),
            (day2_ms, &unknown),
            (day2_ms, &a2),
        ],
        &gateway_key(),
    );
    let (status, v) = post(&http, base, batch2).await;
    assert_eq!(status, 200, "{v}");
    let r = reply(v);
    assert_eq!(r.results[..3], [RecordOutcome::Stored, RecordOutcome::Stored, RecordOutcome::Stored]);
    assert_eq!(reason(&r.results[3]), Some(RejectReason::BadTag));
    assert_eq!(reason(&r.results[4]), Some(RejectReason::UnknownMeter));
    assert_eq!(r.results[5], RecordOutcome::Duplicate);
    assert_eq!(count(&ep).await, 7);

    // Per-SIM, per-day usage. Epoch 0 of meter A used (1500, 9000), epoch 1 (800, 1000).
    let all = DateRange::default();
    let usage_a = client::usage(&http, base, &token(), SIM_A, all).await.unwrap();
    assert_eq!(usage_a.iccid, SIM_A);
    assert_eq!(
        usage_a.days,
        vec![day(DAY1, 1000, 5000), day(DAY2, 500 + 300, 4000 + 700), day(DAY3, 500, 300)]
    );
    assert_eq!((usage_a.up_bytes, usage_a.down_bytes, usage_a.total_bytes), (2300, 10_000, 12_300));
    let usage_b = client::usage(&http, base, &token(), SIM_B, all).await.unwrap();
    assert_eq!(usage_b.days, vec![day(DAY1, 0, 0), day(DAY2, 200, 100)]);

    let only_day2 = DateRange { from: Some(DAY2), to: Some(DAY2) };
    let usage_a2 = client::usage(&http, base, &token(), SIM_A, only_day2).await.unwrap();
    assert_eq!(usage_a2.days, vec![day(DAY2, 800, 4700)]);
    assert_eq!((usage_a2.from, usage_a2.to, usage_a2.total_bytes), (Some(DAY2), Some(DAY2), 5500));

    let sims = client::usage_sims(&http, base, &token(), all).await.unwrap();
    let expected = SimsUsage {
        from: None,
        to: None,
        sims: vec![
            SimTotal { iccid: SIM_A, up_bytes: 2300, down_bytes: 10_000, total_bytes: 12_300 },
            SimTotal { iccid: SIM_B, up_bytes: 200, down_bytes: 100, total_bytes: 300 },
        ],
        up_bytes: 2500,
        down_bytes: 10_100,
        total_bytes: 12_600,
        underivable: vec![],
        next_after: None,
    };
    assert_eq!(sims, expected);
    // Pages of one SIM each: the cursor is the last ICCID of a page; the last page says null.
    let page = |q: String| {
        let http = http.clone();
        async move {
            let v: serde_json::Value = http
                .get(format!("{base}/v1/usage/sims?{q}"))
                .bearer_auth(token())
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v
        }
    };
    let first = page("limit=1".into()).await;
    assert_eq!(first["sims"].as_array().unwrap().len(), 1);
    assert_eq!(first["sims"][0]["iccid"], SIM_A.to_string());
    assert_eq!(first["next_after"], SIM_A.to_string());
    assert_eq!(first["total_bytes"], 12_300);
    let second = page(format!("limit=1&after={SIM_A}")).await;
    assert_eq!(second["sims"][0]["iccid"], SIM_B.to_string());
    assert_eq!(second["next_after"], serde_json::Value::Null);
    let past = page(format!("after={SIM_B}")).await;
    assert_eq!((past["sims"].as_array().unwrap().len(), &past["next_after"]), (0, &serde_json::Value::Null));
    for (q, name) in [("limit=0", "limit"), ("limit=10001", "limit"), ("after=12x", "after")] {
        let v = page(q.into()).await;
        assert!(v["error"].as_str().unwrap().starts_with(&format!("{name}:")), "{q}: {v}");
    }
    let v: serde_json::Value = http
        .get(format!("{base}/v1/usage?iccid={SIM_A}&limit=5"))
        .bearer_auth(token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(v["error"].as_str().unwrap().starts_with("limit:"), "{v}");
    let raw: serde_json::Value = http
        .get(format!("{base}/v1/usage?iccid={SIM_A}&from=2026-11-26"))
        .bearer_auth(token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        raw,
        serde_json::json!({"iccid": "8988280666000000001", "from": "2026-11-26", "to": null,
            "days": [{"date": "2026-11-26", "up_bytes": 500, "down_bytes": 300, "total_bytes": 800}],
            "up_bytes": 500, "down_bytes": 300, "total_bytes": 800})
    );

    // A batch signed with the wrong key is refused whole: nothing stored, usage unchanged.
    a.observe(10_000, 10_000);
    let a5 = write(&mut a, SIM_A, network_time(DAY1_NOON_S + 2 * DAY_S));
    let (status, v) = post(&http, base, sign(3, &[(day2_ms, &a5)], &signing_key(0x43))).await;
    assert_eq!((status, error_code(v)), (401, "bad_signature".to_owned()));
    assert_eq!(count(&ep).await, 7);
    assert_eq!(client::usage_sims(&http, base, &token(), all).await.unwrap(), expected);

    // An unregistered gateway, garbage, and an oversized body.
    let stranger = signed_batch(&gateway_key(), 99, 0, 0, &[(day2_ms, &a5)]);
    let (status, v) = post(&http, base, stranger).await;
    assert_eq!((status, error_code(v)), (401, "unknown_gateway".to_owned()));
    let (status, v) = post(&http, base, b"{\"this is\": \"not a batch\"}".repeat(4)).await;
    assert_eq!((status, error_code(v)), (400, "malformed_batch".to_owned()));
    let (status, v) = post(&http, base, vec![1u8; BATCH_BYTES_MAX + 1]).await;
    assert_eq!((status, error_code(v)), (413, "batch_too_large".to_owned()));
    assert_eq!(count(&ep).await, 7);

    // Usage and admin routes want the admin token.
    let no_token = http.get(format!("{base}/v1/usage?iccid={SIM_A}")).send().await.unwrap();
    assert_eq!(no_token.status().as_u16(), 401);
    assert_eq!(no_token.headers().get("www-authenticate").map(|v| v.as_bytes()), Some(&b"Bearer"[..]));
    assert_eq!(error_code(no_token.json().await.unwrap()), "unauthorized");
    match client::usage_sims(&http, base, &hex::encode([0u8; 32]), all).await {
        Err(ClientError::Refused { status: 401, code, .. }) => assert_eq!(code, "unauthorized"),
        other => panic!("wrong token accepted: {other:?}"),
    }
    match client::register_meter(&http, base, "", 31, &KEY_A).await {
        Err(ClientError::Refused { status: 401, .. }) => {}
        other => panic!("registration without token accepted: {other:?}"),
    }

    let health: serde_json::Value =
        http.get(format!("{base}/health")).send().await.unwrap().json().await.unwrap();
    assert_eq!(health, serde_json::json!({"status": "ok"}));

    // Everything acknowledged survives a restart.
    ep.stop().await;
    let ep = start(&env).await;
    assert_eq!(count(&ep).await, 7);
    assert_eq!(client::usage_sims(&http, &ep.base, &token(), all).await.unwrap(), expected);
    ep.stop().await;
}

async fn bad_query_parameters_are_named(kind: Kind) {
    let env = Env::new(kind).await;
    let ep = start(&env).await;
    let http = reqwest::Client::new();
    for (query, named) in [
        ("/v1/usage", "iccid"),
        ("/v1/usage?iccid=89x", "iccid"),
        ("/v1/usage?iccid=1&from=2026-13-01", "from"),
        ("/v1/usage?iccid=1&to=yesterday", "to"),
        ("/v1/usage?iccid=1&from=2026-11-25&to=2026-11-24", "from"),
        ("/v1/usage/sims?from=24.11.2026", "from"),
    ] {
        let r = http.get(format!("{}{query}", ep.base)).bearer_auth(token()).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 400, "{query}");
        let body: ErrorBody = r.json().await.unwrap();
        assert_eq!(body.code, "bad_request", "{query}");
        assert!(body.error.starts_with(&format!("{named}: ")), "{query}: {}", body.error);
    }
    let r = http
        .post(format!("{}/v1/admin/meters", ep.base))
        .bearer_auth(token())
        .json(&serde_json::json!({"meter_id": 1, "key_hex": "abcd"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.json::<ErrorBody>().await.unwrap().error.starts_with("key_hex: "));
    let r = http
        .post(format!("{}/v1/admin/gateways", ep.base))
        .bearer_auth(token())
        .json(&serde_json::json!({"gateway_id": 1, "public_key_hex": "zz"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.json::<ErrorBody>().await.unwrap().error.starts_with("public_key_hex: "));
    let r = http.get(format!("{}/v2/nothing", ep.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    ep.stop().await;
}

async fn registration_answers_created_then_ok(kind: Kind) {
    let env = Env::new(kind).await;
    let ep = start(&env).await;
    let http = reqwest::Client::new();
    let body = serde_json::json!({"gateway_id": 5, "public_key_hex": hex::encode(gateway_key().verifying_key().as_bytes())});
    for expected in [201, 200] {
        let r = http
            .post(format!("{}/v1/admin/gateways", ep.base))
            .bearer_auth(token())
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), expected);
    }
    ep.stop().await;
}
