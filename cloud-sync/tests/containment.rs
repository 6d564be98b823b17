//! Regression for issue 10 (items 2 and 3): records no derivation can count, stored directly
//! as legacy data would be (bypassing ingest's validation), must not stop usage, settlement,
//! billing or the Lago export for any other SIM. On both stores, over real HTTP.
//!
//! The bad data is what was reproduced from outside: one meter whose `used` is near
//! `u64::MAX` in two epochs of one SIM-day; a receive time the `time` crate accepts but jiff
//! does not (9999-12-31T23:59:59Z); and, within every ceiling, more epochs of one SIM than 64
//! bits can sum. Only public API that predates the fix is used here (answers are read as
//! JSON), so this file also builds against the code before it, where it fails.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use countersign_cloud::service::lago::{LagoConfig, LagoExporter, LAGO_EVENTS_BATCH_PATH};
use countersign_cloud::store::postgres::testing::TestDatabase;
use countersign_cloud::store::NewRecord;
use countersign_cloud::{CloudConfig, Endpoint, StoreBackend};
use countersign_meter::{DeviceTime, Totals};
use countersign_protocol::keys::write_secret;
use countersign_testkit::{network_time, now_s, ReportBuilder};
use serde_json::{json, Value};

#[macro_use]
mod common;
use common::{insert, new_record, Kind};

const TOKEN: [u8; 32] = [0x5a; 32];
const KEY: [u8; 32] = [7u8; 32];
const SIM_A: u64 = 8_988_280_666_000_000_001;
const SIM_B: u64 = 8_988_280_666_000_000_002;
/// `used` near u64::MAX in two epochs of one SIM-day (meter 101).
const SIM_HUGE: u64 = 8_988_280_666_000_000_101;
/// A receive time `time` accepts and jiff does not (meter 102).
const SIM_EDGE_TIME: u64 = 8_988_280_666_000_000_102;
/// 8193 epochs at 2^50 bytes each way: within any per-record ceiling, beyond 64 bits summed
/// (meter 103).
const SIM_MANY_EPOCHS: u64 = 8_988_280_666_000_000_103;
/// 9999-12-31T23:59:59Z: the last second the `time` crate can date.
const LAST_TIME_CRATE_MS: u64 = 253_402_300_799_000;
const DAY_S: u64 = 86_400;

on_both_stores!(overflowing_counters_stop_no_other_sim, a_receive_time_beyond_jiff_stops_no_other_sim);

/// The issue's first reproduction: counters that overflow when summed.
async fn overflowing_counters_stop_no_other_sim(kind: Kind) {
    legacy_records_that_cannot_be_derived_stop_no_other_sim(kind, &[SIM_HUGE, SIM_MANY_EPOCHS]).await
}

/// The issue's second reproduction: a receive time `time` accepts and jiff does not.
async fn a_receive_time_beyond_jiff_stops_no_other_sim(kind: Kind) {
    legacy_records_that_cannot_be_derived_stop_no_other_sim(kind, &[SIM_EDGE_TIME]).await
}

/// A stored record of `meter` (network time `at_s` unless `received_ms` is given, which then
/// places it with an uptime clock).
fn record(
    meter_id: u64,
    epoch: u32,
    seq: u32,
    iccid: u64,
    used: Totals,
    at_s: u64,
    received_ms: Option<u64>,
) -> NewRecord {
    let time = match received_ms {
        None => network_time(at_s),
        Some(_) => DeviceTime::uptime(60).unwrap(),
    };
    let r = ReportBuilder::new(meter_id, seq, iccid, time).epoch(epoch).used(used.up, used.down);
    new_record(&r, &KEY, received_ms.unwrap_or(at_s * 1000))
}

fn good_records(seq0: u32, at_s: u64) -> Vec<NewRecord> {
    let t = |up, down| Totals { up, down };
    vec![
        record(10, 0, seq0, SIM_A, t(1_000 * u64::from(seq0 + 1), 5_000 * u64::from(seq0 + 1)), at_s, None),
        record(20, 0, seq0, SIM_B, t(300 * u64::from(seq0 + 1), 700 * u64::from(seq0 + 1)), at_s, None),
    ]
}

fn bad_records(at_s: u64) -> Vec<NewRecord> {
    let mut v = vec![
        record(101, 0, 0, SIM_HUGE, Totals { up: u64::MAX - 10, down: 1 }, at_s, None),
        record(101, 1, 0, SIM_HUGE, Totals { up: u64::MAX - 10, down: 1 }, at_s, None),
        record(102, 0, 0, SIM_EDGE_TIME, Totals { up: 10, down: 10 }, at_s, Some(LAST_TIME_CRATE_MS)),
    ];
    let max = 1u64 << 50;
    v.extend(
        (0..(1u32 << 13) + 1)
            .map(|e| record(103, e, 0, SIM_MANY_EPOCHS, Totals { up: max, down: max }, at_s, None)),
    );
    v
}

fn plans(at_s: u64) -> String {
    let month = jiff::Timestamp::from_second(i64::try_from(at_s).unwrap())
        .unwrap()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date()
        .first_of_month();
    format!(
        r#"
time_zone = "UTC"

[[plan]]
id = "per-mb"
currency = "USD"
unit = "MB"
model = "per_unit"
price = "1.00"
rounding_increment_bytes = 1
rounding_scope = "sim_day"

[[assign]]
customer = "good"
group = "g"
plan = "per-mb"
iccids = ["{SIM_A}"]
active_since = "{month}"

[[assign]]
customer = "mixed"
group = "m"
plan = "per-mb"
iccids = ["{SIM_B}", "{SIM_HUGE}"]
active_since = "{month}"

[[wallet]]
customer = "good"
currency = "USD"
opening_credit = "1000.00"

[[wallet]]
customer = "mixed"
currency = "USD"
opening_credit = "1000.00"
"#
    )
}

struct Running {
    base: String,
    store: StoreBackend,
    server: common::Server,
    _db: Option<TestDatabase>,
    _dir: tempfile::TempDir,
}

async fn start(kind: Kind, at_s: u64) -> Running {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (dir, db) = common::state_for(kind).await;
    let token_file = dir.path().join("admin.token");
    write_secret(&token_file, &TOKEN).unwrap();
    let plans_file = dir.path().join("plans.toml");
    std::fs::write(&plans_file, plans(at_s)).unwrap();
    let store = common::store_section(db.as_ref());
    let text = format!(
        "listen = '127.0.0.1:0'\ndata_dir = '{}'\nadmin_token_file = '{}'\n[store]\n{store}\n\
         [billing]\nplans_file = '{}'\nrun_interval_s = 86400\n",
        dir.path().join("data").display(),
        token_file.display(),
        plans_file.display(),
    );
    let endpoint = Endpoint::connect(&CloudConfig::from_toml_str(&text).unwrap()).await.unwrap();
    let store = endpoint.store().clone();
    let server = common::serve(endpoint).await;
    Running { base: server.base.clone(), store, server, _db: db, _dir: dir }
}

async fn call(base: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let http = reqwest::Client::new();
    let mut req = match method {
        "get" => http.get(format!("{base}{path}")),
        _ => http.post(format!("{base}{path}")),
    };
    req = req.bearer_auth(hex::encode(TOKEN));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn iccids_of(v: &Value, list: &str) -> BTreeSet<String> {
    v[list].as_array().unwrap().iter().map(|s| s["iccid"].as_str().unwrap().to_owned()).collect()
}

fn set(sims: &[u64]) -> BTreeSet<String> {
    sims.iter().map(u64::to_string).collect()
}

/// A Lago that accepts every event and remembers its transaction id and bytes.
async fn start_lago() -> (String, Arc<Mutex<BTreeMap<String, u64>>>) {
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    async fn batch(State(seen): State<Arc<Mutex<BTreeMap<String, u64>>>>, body: Bytes) -> axum::Json<Value> {
        let v: Value = serde_json::from_slice(&body).unwrap();
        for e in v["events"].as_array().unwrap() {
            let id = e["transaction_id"].as_str().unwrap().to_owned();
            seen.lock().unwrap().insert(id, e["properties"]["bytes"].as_u64().unwrap());
        }
        axum::Json(json!({}))
    }
    let app = Router::new().route(LAGO_EVENTS_BATCH_PATH, post(batch)).with_state(seen.clone());
    (common::serve_router(app).await, seen)
}

async fn legacy_records_that_cannot_be_derived_stop_no_other_sim(kind: Kind, bad_sims: &[u64]) {
    // Three days ago: closed for a settlement window of 0 hours, inside the current month
    // or the one before (both billed).
    let at_s = now_s() - 3 * DAY_S;
    let ep = start(kind, at_s).await;
    let base = ep.base.as_str();

    // Good usage first, and the answers it gets before anything bad is stored.
    insert(&ep.store, good_records(0, at_s)).await;
    let (s, sims_before) = call(base, "get", "/v1/usage/sims", None).await;
    assert_eq!(s, 200, "{sims_before}");
    let (s, a_before) = call(base, "get", &format!("/v1/usage?iccid={SIM_A}"), None).await;
    assert_eq!((s, a_before["total_bytes"].as_u64()), (200, Some(6_000)), "{a_before}");
    let (s, days_before) = call(base, "get", "/v1/usage/days?tz=Pacific/Kiritimati", None).await;
    assert_eq!(s, 200, "{days_before}");
    let (s, run1) = call(base, "post", "/v1/admin/billing/run", None).await;
    assert_eq!(s, 200, "{run1}");
    let debited = |run: &Value, customer: &str| {
        let w = run["wallets"].as_array().unwrap().iter().find(|w| w["customer"] == customer).unwrap();
        (w["skipped"].as_bool().unwrap(), w["debited_micros"].as_i64().unwrap())
    };
    // 6000 bytes at $1/MB (rounded per SIM-day to the byte): 6000 micro-dollars; 1000 for B.
    assert_eq!(debited(&run1, "good"), (false, 6_000), "{run1}");
    assert_eq!(debited(&run1, "mixed"), (false, 1_000), "{run1}");

    // The legacy data that cannot be derived.
    insert(&ep.store, bad_records(at_s).into_iter().filter(|r| bad_sims.contains(&r.iccid)).collect()).await;
    let bad = set(bad_sims);

    // Usage reads: every good SIM exactly as before, the bad ones listed.
    let (s, sims) = call(base, "get", "/v1/usage/sims", None).await;
    assert_eq!(s, 200, "{sims}");
    assert_eq!(sims["sims"], sims_before["sims"]);
    assert_eq!(sims["total_bytes"], sims_before["total_bytes"]);
    assert_eq!(iccids_of(&sims, "underivable"), bad, "{sims}");
    let (s, a) = call(base, "get", &format!("/v1/usage?iccid={SIM_A}"), None).await;
    assert_eq!((s, &a), (200, &a_before));
    let (s, v) = call(base, "get", &format!("/v1/usage?iccid={}", bad_sims[0]), None).await;
    assert_eq!((s, v["code"].as_str()), (422, Some("underivable_sim")), "{v}");
    for tz in ["Pacific/Kiritimati", "UTC"] {
        let (s, days) = call(base, "get", &format!("/v1/usage/days?tz={tz}"), None).await;
        assert_eq!(s, 200, "{tz}: {days}");
        if tz == "Pacific/Kiritimati" {
            assert_eq!(days["days"], days_before["days"]);
        }
        assert_eq!(iccids_of(&days, "underivable"), bad, "{days}");
    }
    let (s, faults) = call(base, "get", "/v1/admin/faults", None).await;
    assert_eq!(s, 200, "{faults}");
    let codes: BTreeMap<String, String> = faults["underivable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["iccid"].as_str().unwrap().to_owned(), f["code"].as_str().unwrap().to_owned()))
        .collect();
    let want: BTreeMap<String, String> =
        [(SIM_HUGE, "counter_ceiling"), (SIM_EDGE_TIME, "time_out_of_range"), (SIM_MANY_EPOCHS, "overflow")]
            .into_iter()
            .filter(|(sim, _)| bad_sims.contains(sim))
            .map(|(sim, code)| (sim.to_string(), code.to_owned()))
            .collect();
    assert_eq!(codes, want);

    // Settlement in a zone where the edge time is beyond jiff: the good SIM-days settle.
    let settle = json!({"tz": "Pacific/Kiritimati", "settlement_hours": 0});
    let (s, v) = call(base, "post", "/v1/admin/settle", Some(settle)).await;
    assert_eq!((s, v["settled"].as_u64()), (200, Some(2)), "{v}");
    assert_eq!(iccids_of(&v, "underivable"), bad, "{v}");
    let (s, ledger) = call(base, "get", "/v1/usage/ledger", None).await;
    assert_eq!(s, 200, "{ledger}");
    assert_eq!(iccids_of(&ledger, "days"), set(&[SIM_A, SIM_B]));

    // Billing: the good wallet is billed exactly (nothing changed: 0), the wallet whose group
    // holds a faulty SIM is left alone (not credited back), and billing goes on for the good.
    let (s, run2) = call(base, "post", "/v1/admin/billing/run", None).await;
    assert_eq!(s, 200, "{run2}");
    assert_eq!(debited(&run2, "good"), (false, 0), "{run2}");
    // The mixed group holds SIM_HUGE: skipped when that SIM is faulty, billed (nothing new)
    // otherwise.
    assert_eq!(debited(&run2, "mixed"), (bad_sims.contains(&SIM_HUGE), 0), "{run2}");
    insert(&ep.store, good_records(1, at_s)).await;
    let (s, run3) = call(base, "post", "/v1/admin/billing/run", None).await;
    assert_eq!(s, 200, "{run3}");
    assert_eq!(debited(&run3, "good"), (false, 6_000), "{run3}");
    let (s, charges) = call(base, "get", "/v1/billing/charges?customer=good", None).await;
    assert_eq!(s, 200, "{charges}");

    // Lago: every good record is planned and delivered, the uncountable ones are held back.
    let (lago_base, seen) = start_lago().await;
    let subs: BTreeMap<u64, String> =
        [SIM_A, SIM_HUGE, SIM_EDGE_TIME].into_iter().map(|s| (s, format!("sub-{s}"))).collect();
    let exporter =
        LagoExporter::new(&ep.store, LagoConfig::new(&lago_base, "k", "data_bytes", subs).unwrap()).unwrap();
    let mut stats = exporter.drain().await.unwrap();
    for _ in 0..100 {
        if !stats.standby {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        stats = exporter.drain().await.unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen, [("10-0-0".to_owned(), 6_000), ("10-0-1".to_owned(), 6_000)].into());
    drop(ep.server);
}
