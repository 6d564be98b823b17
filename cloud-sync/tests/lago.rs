//! The Lago exporter against a local server that follows Lago's contract: at most
//! `LAGO_EVENTS_BATCH_MAX_LENGTH` events (default 100, settable per double), 422 `no_events` /
//! `too_many_events`, one already-stored `transaction_id` fails the whole batch with
//! `value_already_exist` at its position, 429 and 500 on demand, and
//! `GET /api/v1/billable_metrics/{code}` answering the metric or 404
//! `billable_metric_not_found`. The exporter is restarted mid-run; every record must arrive
//! exactly once with the right bytes and byte-identical retries. Each test runs on sled and on
//! PostgreSQL; on PostgreSQL, two exporters share one database as two `serve --lago-config`
//! processes would. The operator's view (`/health`, `/metrics`, `lago status`) is checked
//! against a metric mismatch and a `too_many_events` refusal.
//!
//! The double's source, Lago's own code and contract: `getlago/lago-api` commit
//! `1b1c24a6a6c321d7900b05906bf1b20f706c97c2` — `app/services/events/create_batch_service.rb`
//! (`MAX_LENGTH = ENV.fetch("LAGO_EVENTS_BATCH_MAX_LENGTH", 100)`, `no_events`,
//! `too_many_events` on field `events`, `value_already_exist` per index),
//! `app/controllers/concerns/api_errors.rb` (`validation_errors`: 422 `{status, error:
//! "Unprocessable Entity", code: "validation_errors", error_details}`; `unauthorized_error`:
//! 401 `{status, error: "Unauthorized"}`), `app/controllers/concerns/api_responses.rb`
//! (`not_found_error`: 404 `{status, error: "Not Found", code: "<resource>_not_found"}`),
//! `app/controllers/api/v1/billable_metrics_controller.rb#show` and
//! `app/serializers/v1/billable_metric_serializer.rb` (the metric under `billable_metric`);
//! and `getlago/lago-openapi` commit `120da1213306145141d3dd34022dd47a3216c911`,
//! `src/resources/billable_metric.yaml` and `src/schemas/BillableMetricObject.yaml`.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use countersign_cloud::service::lago::{
    transaction_id, ExportStats, LagoConfig, LagoError, LagoExporter, LAGO_BILLABLE_METRICS_PATH,
    LAGO_EVENTS_BATCH_PATH,
};
use countersign_cloud::store::postgres::testing::TestDatabase;
use countersign_cloud::store::NewRecord;
use countersign_cloud::wire::ops::LagoState;
use countersign_cloud::{AdminToken, Endpoint};
use countersign_cloud::{PgStore, Store, StoreBackend};
use countersign_meter::RecordId;
use countersign_testkit::{network_time, ReportBuilder};
use serde_json::{json, Value};

#[macro_use]
mod common;
use common::{insert, new_record, Kind};

const API_KEY: &str = "lago_test_key";
const KEY: [u8; 32] = [7u8; 32];
const SIM_A: u64 = 8_988_280_666_000_000_001;
const SIM_B: u64 = 8_988_280_666_000_000_002;
const SIM_UNMAPPED: u64 = 8_988_280_666_000_000_009;
const NOON_S: u64 = 1_795_521_600;

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Answer 429 with rate-limit headers.
    RateLimited,
    /// Answer 500 without looking at the batch.
    Unavailable,
    /// Store the batch, then answer 500 and stay down: the answer is lost, the events are in.
    AcceptThenDown,
}

/// The billable metric the double holds: `(aggregation_type, field_name, recurring)`.
type Metric = (&'static str, Option<&'static str>, bool);

/// The metric the exporter needs: a sum of `bytes`.
const GOOD_METRIC: Metric = ("sum_agg", Some("bytes"), false);

struct Lago {
    /// `LAGO_EVENTS_BATCH_MAX_LENGTH` of this Lago.
    batch_max: usize,
    /// Billable metrics by code.
    metrics: HashMap<String, Metric>,
    /// `GET` calls of billable metrics, answered or refused.
    metric_checks: usize,
    /// transaction_id → the event as first stored.
    stored: HashMap<String, Value>,
    /// transaction_id → how many calls carried it (accepted or not, faults excepted).
    received: HashMap<String, usize>,
    /// Every call's event count and status.
    calls: Vec<(usize, u16)>,
    /// Retried events whose body differed from the stored one (must stay 0).
    mismatched_retries: usize,
    /// Faults for the next calls in order; `None` answers normally.
    faults: VecDeque<Option<Fault>>,
    /// Answer 500 to everything while set.
    down: bool,
}

impl Default for Lago {
    fn default() -> Self {
        Self {
            batch_max: 100,
            metrics: [("data_bytes".to_owned(), GOOD_METRIC)].into(),
            metric_checks: 0,
            stored: HashMap::new(),
            received: HashMap::new(),
            calls: Vec::new(),
            mismatched_retries: 0,
            faults: VecDeque::new(),
            down: false,
        }
    }
}

type Shared = Arc<Mutex<Lago>>;

fn unauthorized() -> Response {
    (StatusCode::UNAUTHORIZED, axum::Json(json!({"status":401,"error":"Unauthorized"}))).into_response()
}

fn authorized(headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {API_KEY}"))
}

/// `GET /api/v1/billable_metrics/{code}` as Lago answers it.
async fn billable_metric(
    State(lago): State<Shared>,
    headers: HeaderMap,
    Path(code): Path<String>,
) -> Response {
    let mut l = lago.lock().unwrap();
    l.metric_checks += 1;
    if !authorized(&headers) {
        return unauthorized();
    }
    if l.down {
        return (StatusCode::INTERNAL_SERVER_ERROR, "oops").into_response();
    }
    let Some((aggregation, field, recurring)) = l.metrics.get(&code).copied() else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"status":404,"error":"Not Found","code":"billable_metric_not_found"})),
        )
            .into_response();
    };
    axum::Json(json!({"billable_metric": {
        "lago_id": "1a901a90-1a90-1a90-1a90-1a901a901a90", "name": "Data", "code": code,
        "description": null, "aggregation_type": aggregation, "weighted_interval": null,
        "recurring": recurring, "rounding_function": null, "rounding_precision": null,
        "created_at": "2026-01-01T00:00:00Z", "field_name": field, "expression": null, "filters": []
    }}))
    .into_response()
}

fn lago_422(details: Value) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        axum::Json(json!({"status":422,"error":"Unprocessable Entity","code":"validation_errors","error_details":details})),
    )
        .into_response()
}

async fn batch(State(lago): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let mut l = lago.lock().unwrap();
    if !authorized(&headers) {
        return unauthorized();
    }
    let doc: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => return (StatusCode::BAD_REQUEST, "bad json").into_response(),
    };
    let events = doc["events"].as_array().cloned().unwrap_or_default();
    let fault = if l.down { Some(Fault::Unavailable) } else { l.faults.pop_front().flatten() };
    match fault {
        Some(Fault::RateLimited) => {
            l.calls.push((events.len(), 429));
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("x-ratelimit-limit", "500"), ("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "1")],
                "{\"status\":429,\"error\":\"Too Many Requests\"}",
            )
                .into_response();
        }
        Some(Fault::Unavailable) => {
            l.calls.push((events.len(), 500));
            return (StatusCode::INTERNAL_SERVER_ERROR, "oops").into_response();
        }
        _ => {}
    }
    if events.is_empty() {
        l.calls.push((0, 422));
        return lago_422(json!({"events":["no_events"]}));
    }
    if events.len() > l.batch_max {
        l.calls.push((events.len(), 422));
        return lago_422(json!({"events":["too_many_events"]}));
    }
    // PostgreSQL event store: one already-stored transaction_id fails the whole batch.
    let mut details = serde_json::Map::new();
    for (i, e) in events.iter().enumerate() {
        let id = e["transaction_id"].as_str().unwrap_or_default().to_owned();
        *l.received.entry(id.clone()).or_default() += 1;
        if let Some(first) = l.stored.get(&id) {
            if first != e {
                l.mismatched_retries += 1;
            }
            details.insert(i.to_string(), json!({"transaction_id":["value_already_exist"]}));
        }
    }
    if !details.is_empty() {
        l.calls.push((events.len(), 422));
        return lago_422(Value::Object(details));
    }
    for e in &events {
        l.stored.insert(e["transaction_id"].as_str().unwrap().to_owned(), e.clone());
    }
    if matches!(fault, Some(Fault::AcceptThenDown)) {
        l.down = true;
        l.calls.push((events.len(), 500));
        return (StatusCode::INTERNAL_SERVER_ERROR, "lost answer").into_response();
    }
    l.calls.push((events.len(), 200));
    (StatusCode::OK, axum::Json(json!({"events": events}))).into_response()
}

async fn start_lago() -> (String, Shared) {
    let lago = Shared::default();
    let app = Router::new()
        .route(LAGO_EVENTS_BATCH_PATH, post(batch))
        .route(&format!("{LAGO_BILLABLE_METRICS_PATH}/{{code}}"), get(billable_metric))
        .with_state(lago.clone());
    (common::serve_router(app).await, lago)
}

/// A stored record made `seq` minutes after noon, received at noon.
fn record(meter_id: u64, epoch: u32, seq: u32, iccid: u64, up: u64, down: u64) -> NewRecord {
    let r = ReportBuilder::new(meter_id, seq, iccid, network_time(NOON_S + u64::from(seq) * 60))
        .epoch(epoch)
        .used(up, down);
    new_record(&r, &KEY, NOON_S * 1000)
}

/// One test's store: a sled directory, or a throwaway PostgreSQL database.
struct Env {
    dir: tempfile::TempDir,
    db: Option<TestDatabase>,
}

impl Env {
    async fn new(kind: Kind) -> Env {
        let (dir, db) = common::state_for(kind).await;
        Env { dir, db }
    }

    /// Opens the store, as a (re)starting process does: sled once the previous handle is
    /// gone, PostgreSQL as one more pool on the same database.
    async fn open(&self) -> StoreBackend {
        match &self.db {
            Some(db) => StoreBackend::Postgres(PgStore::connect(&db.url(), 4).await.unwrap()),
            None => {
                // sled's flusher thread may hold the old handle for a moment after the drop.
                for _ in 0..100 {
                    if let Ok(s) = Store::open(&self.dir.path().join("data"), 1024 * 1024) {
                        return StoreBackend::Sled(s);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                panic!("the sled store did not become free");
            }
        }
    }
}

/// One drain as the active exporter: a restarted process may find the lock of the process it
/// replaces still held for a moment (PostgreSQL frees it when that connection has closed).
async fn drain_when_active(exporter: &LagoExporter) -> ExportStats {
    for _ in 0..200 {
        let stats = exporter.drain().await.unwrap();
        if !stats.standby {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the export lock was never freed");
}

on_both_stores!(
    every_record_arrives_exactly_once_across_restarts_and_faults,
    the_local_lago_enforces_the_contract_and_refusals_stop_the_exporter,
    the_configured_batch_size_is_honoured_and_a_larger_one_is_refused_by_name,
    a_metric_mismatch_and_a_refusal_show_on_health_metrics_and_the_cli,
    events_of_another_metric_in_the_outbox_stop_the_export_before_anything_is_planned
);

fn config(base: &str) -> LagoConfig {
    let subs: BTreeMap<u64, String> = [(SIM_A, "sub_a".to_owned()), (SIM_B, "sub_b".to_owned())].into();
    LagoConfig::new(base, API_KEY, "data_bytes", subs).unwrap()
}

async fn every_record_arrives_exactly_once_across_restarts_and_faults(kind: Kind) {
    let (base, lago) = start_lago().await;
    let env = Env::new(kind).await;
    let mut expected_epoch_bytes = BTreeMap::<(u64, u32), u64>::new();
    let mut ids = Vec::new();
    {
        let store = env.open().await;
        // 3 meters × 2 epochs × 40 reports; seq 10 of meter 1 epoch 0 arrives later.
        let mut records = Vec::new();
        for meter in 1..=3u64 {
            for epoch in 0..2u32 {
                for seq in 0..40u32 {
                    let iccid = if meter == 3 { SIM_B } else { SIM_A };
                    let (up, down) = (u64::from(seq) * 100 + u64::from(epoch), u64::from(seq) * 1000);
                    ids.push(RecordId { meter_id: meter, epoch, seq });
                    if (meter, epoch, seq) != (1, 0, 10) {
                        records.push(record(meter, epoch, seq, iccid, up, down));
                    }
                    *expected_epoch_bytes.entry((meter, epoch)).or_default() = up + down;
                }
            }
        }
        // An unmapped SIM is held back, not sent and not dropped.
        records.push(record(9, 0, 0, SIM_UNMAPPED, 5, 5));
        insert(&store, records).await;

        // First run: a 429, a 500, one good call, then a call whose answer is lost, after
        // which Lago stays down.
        lago.lock().unwrap().faults =
            [Some(Fault::RateLimited), Some(Fault::Unavailable), None, Some(Fault::AcceptThenDown)].into();
        let exporter = LagoExporter::new(&store, config(&base).with_events_per_call(60).unwrap()).unwrap();
        let task = tokio::spawn(async move { exporter.drain().await });
        for _ in 0..500 {
            if lago.lock().unwrap().stored.len() >= 120 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Kill the exporter mid-run, with a batch delivered but unacknowledged.
        task.abort();
        let _ = task.await;
        assert_eq!(lago.lock().unwrap().stored.len(), 120);
    }
    // Restart: reopen the store, a late report arrives, Lago is back (after a 429).
    let store = env.open().await;
    insert(&store, vec![record(1, 0, 10, SIM_A, 1000, 10_000)]).await;
    {
        let mut l = lago.lock().unwrap();
        l.down = false;
        l.faults = [Some(Fault::RateLimited)].into();
    }
    let exporter = LagoExporter::new(&store, config(&base)).unwrap();
    let stats = drain_when_active(&exporter).await;
    assert_eq!(stats.rate_limited, 1);
    assert!(stats.already_existed >= 60, "{stats:?}");
    assert_eq!(exporter.pending().await.unwrap(), 0);

    {
        let l = lago.lock().unwrap();
        assert!(!l.stored.contains_key("9-0-0"), "an unmapped SIM's record was sent");
    }
    // Once mapped, the held-back record goes too.
    let mut with_unmapped = config(&base);
    with_unmapped.subscriptions.insert(SIM_UNMAPPED, "sub_9".into());
    // (A new exporter: on PostgreSQL the previous one still holds the lock until dropped.)
    drop(exporter);
    let stats = drain_when_active(&LagoExporter::new(&store, with_unmapped).unwrap()).await;
    assert_eq!((stats.planned, stats.delivered), (1, 1));

    let l = lago.lock().unwrap();
    assert_eq!(l.stored["9-0-0"]["properties"]["bytes"], 10);
    assert_eq!(l.mismatched_retries, 0, "a retry changed an event's bytes or timestamp");
    assert!(l.calls.iter().all(|(n, _)| *n <= 100));
    assert!(l.calls.iter().any(|(_, s)| *s == 422), "no value_already_exist round: {:?}", l.calls);
    assert_eq!(l.stored.len(), ids.len() + 1);
    let mut got = BTreeMap::<(u64, u32), u64>::new();
    for id in &ids {
        let e = &l.stored[&transaction_id(*id)];
        assert_eq!(e["code"], "data_bytes");
        let sub = if id.meter_id == 3 { "sub_b" } else { "sub_a" };
        assert_eq!(e["external_subscription_id"], sub);
        assert_eq!(e["timestamp"], NOON_S + u64::from(id.seq) * 60);
        *got.entry((id.meter_id, id.epoch)).or_default() += e["properties"]["bytes"].as_u64().unwrap();
    }
    // Each epoch's events add up to its highest `used`; the late report added nothing.
    assert_eq!(got, expected_epoch_bytes);
    assert_eq!(l.stored["1-0-10"]["properties"]["bytes"], 0);
    assert_eq!(l.stored["1-0-11"]["properties"]["bytes"], 1100 + 11_000 - 900 - 9000);
}

async fn the_local_lago_enforces_the_contract_and_refusals_stop_the_exporter(kind: Kind) {
    let (base, lago) = start_lago().await;
    let http = reqwest::Client::new();
    let url = format!("{base}{LAGO_EVENTS_BATCH_PATH}");
    let post = |body: Value| http.post(&url).bearer_auth(API_KEY).json(&body).send();
    let r = post(json!({"events": []})).await.unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(r.json::<Value>().await.unwrap()["error_details"]["events"][0], "no_events");
    let many: Vec<Value> = (0..101).map(|i| json!({"transaction_id": i.to_string()})).collect();
    let r = post(json!({ "events": many })).await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["error_details"]["events"][0], "too_many_events");
    let e = json!({"transaction_id":"x","external_subscription_id":"s","code":"c","timestamp":1,"properties":{"bytes":1}});
    assert_eq!(post(json!({"events": [e.clone()]})).await.unwrap().status(), 200);
    let r = post(json!({"events": [json!({"transaction_id":"y"}), e]})).await.unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"status":422,"error":"Unprocessable Entity","code":"validation_errors","error_details":{"1":{"transaction_id":["value_already_exist"]}}})
    );
    assert_eq!(lago.lock().unwrap().stored.len(), 1, "a failing batch stores nothing");

    // A wrong API key is a refusal: the exporter stops and keeps the events.
    let env = Env::new(kind).await;
    let store = env.open().await;
    insert(&store, vec![record(1, 0, 0, SIM_A, 1, 1)]).await;
    let subs: BTreeMap<u64, String> = [(SIM_A, "sub_a".to_owned())].into();
    let bad = LagoConfig::new(&base, "wrong", "data_bytes", subs).unwrap();
    let exporter = LagoExporter::new(&store, bad).unwrap();
    let e = exporter.drain().await.unwrap_err();
    assert!(matches!(&e, LagoError::Refused { status: 401, code, .. } if code == "unauthorized"), "{e}");
    assert_eq!(exporter.pending().await.unwrap(), 1);
    // The failed round gave up the export lock (PostgreSQL): a fixed exporter takes over.
    let fixed = LagoExporter::new(&store, config(&base)).unwrap();
    let stats = fixed.drain().await.unwrap();
    assert_eq!((stats.standby, stats.delivered), (false, 1), "{stats:?}");
}

async fn the_configured_batch_size_is_honoured_and_a_larger_one_is_refused_by_name(kind: Kind) {
    let (base, lago) = start_lago().await;
    // A self-hosted Lago with LAGO_EVENTS_BATCH_MAX_LENGTH=30.
    lago.lock().unwrap().batch_max = 30;
    let env = Env::new(kind).await;
    let store = env.open().await;
    insert(&store, wave(1..=2, 0, 25)).await;

    // The default batch (100): refused as too_many_events, the export stops, nothing dropped.
    let exporter = LagoExporter::new(&store, config(&base)).unwrap();
    let e = exporter.drain().await.unwrap_err();
    assert!(matches!(&e, LagoError::Refused { status: 422, code, .. } if code == "too_many_events"), "{e}");
    assert_eq!(exporter.pending().await.unwrap(), 100);
    let h = exporter.status().snapshot().health();
    assert_eq!(
        (h.state, h.code.as_deref(), h.backlog),
        (LagoState::Stopped, Some("too_many_events"), Some(100))
    );
    assert!(h.hint.as_deref().unwrap().contains("events_per_call"), "{h:?}");
    assert!(lago.lock().unwrap().stored.is_empty());
    drop(exporter);

    // Configured to Lago's limit: everything goes, in calls of at most 30.
    let exporter = LagoExporter::new(&store, config(&base).with_events_per_call(30).unwrap()).unwrap();
    let stats = drain_when_active(&exporter).await;
    assert_eq!(stats.delivered, 100);
    assert_eq!(exporter.pending().await.unwrap(), 0);
    let l = lago.lock().unwrap();
    assert_eq!(l.stored.len(), 100);
    assert_eq!(l.calls, vec![(100, 422), (30, 200), (30, 200), (30, 200), (10, 200)]);
}

/// `GET /health` of the endpoint at `base`: status code and body.
async fn health(base: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{base}/health")).await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Waits until the endpoint's `/health` says the Lago export is in `state`; its body.
async fn wait_for_lago_state(base: &str, state: &str) -> Value {
    for _ in 0..500 {
        let (code, h) = health(base).await;
        assert_eq!(code, 200, "health answers 200 in every state: {h}");
        if h["lago"]["state"] == state {
            return h;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the lago export never reached {state}: {}", health(base).await.1);
}

/// `countersign-cloud lago status --endpoint <base>`: exit success, stdout, stderr.
async fn cli_status(base: &str) -> (bool, Value, String) {
    let base = base.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        common::cloud_exe().run(&["lago", "status", "--endpoint", &base]).unwrap()
    })
    .await
    .unwrap();
    let stdout: Value = serde_json::from_slice(&out.stdout).unwrap();
    (out.status.success(), stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

async fn metrics(base: &str, token: &AdminToken) -> String {
    let r = reqwest::Client::new()
        .get(format!("{base}/metrics"))
        .bearer_auth(token.to_hex())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

async fn a_metric_mismatch_and_a_refusal_show_on_health_metrics_and_the_cli(kind: Kind) {
    let (base, lago) = start_lago().await;
    // The metric sums another property than the events carry.
    lago.lock().unwrap().metrics.insert("data_bytes".into(), ("sum_agg", Some("megabytes"), false));
    let env = Env::new(kind).await;
    let store = env.open().await;
    insert(&store, wave(1..=1, 0, 10)).await;
    let token = AdminToken::from_bytes([9; 32]);
    let exporter = LagoExporter::new(&store, config(&base).with_events_per_call(5).unwrap()).unwrap();
    let server = common::serve(
        Endpoint::with_backend(store.clone(), token.clone()).with_lago_status(exporter.status()),
    )
    .await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(exporter.run(Duration::from_millis(30), async move {
        let _ = stopped.await;
    }));

    // Mismatch: degraded, named, nothing sent, checked again every round.
    let h = wait_for_lago_state(&server.base, "metric_mismatch").await;
    assert_eq!(h["status"], "degraded", "{h}");
    assert_eq!(h["lago"]["code"], "metric_field", "{h}");
    assert!(h["lago"]["problem"].as_str().unwrap().contains("megabytes"), "{h}");
    assert!(h["lago"]["since_unix_s"].as_u64().is_some(), "{h}");
    let m = metrics(&server.base, &token).await;
    assert!(has_line(&m, "countersign_lago_metric_mismatch 1"), "{m}");
    assert!(has_line(&m, "countersign_lago_export_stopped 0"), "{m}");
    let (ok, out, err) = cli_status(&server.base).await;
    assert!(!ok, "lago status must fail on a mismatch: {out} {err}");
    assert_eq!(out["export"]["state"], "metric_mismatch", "{out}");
    assert!(err.contains("metric_field"), "{err}");
    {
        let l = lago.lock().unwrap();
        assert!(l.calls.is_empty() && l.stored.is_empty(), "events sent under a mismatched metric");
        assert!(l.metric_checks >= 1);
    }

    // A missing metric is named as such.
    lago.lock().unwrap().metrics.clear();
    for _ in 0..500 {
        if health(&server.base).await.1["lago"]["code"] == "metric_not_found" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(health(&server.base).await.1["lago"]["code"], "metric_not_found");

    // Fixed in Lago: the export resumes by itself, health is ok again.
    lago.lock().unwrap().metrics.insert("data_bytes".into(), GOOD_METRIC);
    wait_for_stored(&lago, 20).await;
    let mut h = health(&server.base).await.1;
    for _ in 0..500 {
        if h["lago"]["delivered"] == 20 && h["lago"]["backlog"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        h = health(&server.base).await.1;
    }
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(
        (h["lago"]["state"].as_str(), h["lago"]["delivered"].as_u64()),
        (Some("running"), Some(20)),
        "{h}"
    );
    let (ok, out, err) = cli_status(&server.base).await;
    assert!(ok, "{out} {err}");

    // Lago's batch limit drops below the configured size: a named refusal stops the export.
    lago.lock().unwrap().batch_max = 3;
    insert(&store, wave(2..=2, 0, 10)).await;
    let h = wait_for_lago_state(&server.base, "stopped").await;
    assert_eq!(h["status"], "degraded", "{h}");
    assert_eq!(h["lago"]["code"], "too_many_events", "{h}");
    assert!(h["lago"]["hint"].as_str().unwrap().contains("events_per_call"), "{h}");
    assert_eq!(h["lago"]["backlog"], 20, "nothing planned is dropped: {h}");
    let m = metrics(&server.base, &token).await;
    for line in [
        "countersign_lago_export_stopped 1",
        "countersign_lago_metric_mismatch 0",
        "countersign_lago_backlog_events 20",
        "countersign_lago_events_delivered_total 20",
        "countersign_lago_refusals_total{code=\"too_many_events\"} 1",
    ] {
        assert!(has_line(&m, line), "{line} missing from\n{m}");
    }
    let (ok, out, err) = cli_status(&server.base).await;
    assert!(!ok, "{out} {err}");
    assert_eq!(
        (out["export"]["state"].as_str(), out["export"]["backlog"].as_u64()),
        (Some("stopped"), Some(20))
    );
    assert!(err.contains("too_many_events") && err.contains("events_per_call"), "{err}");
    // Stopped means stopped: no further batch calls while it runs on.
    let (calls, checks) = {
        let l = lago.lock().unwrap();
        (l.calls.len(), l.metric_checks)
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let now = {
        let l = lago.lock().unwrap();
        (l.calls.len(), l.metric_checks)
    };
    assert_eq!(now, (calls, checks), "a stopped export still calls lago");

    let _ = stop.send(());
    run.await.unwrap();
    server.stop().await;

    // The store itself says how many events wait (the embedded store once the endpoint has
    // let go of it).
    drop(store);
    let dir = env.dir.path();
    countersign_protocol::keys::write_secret(&dir.join("admin.token"), &[9; 32]).unwrap();
    let cfg = dir.join("cloud.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = '{}'\nadmin_token_file = '{}'\n[store]\n{}\n",
            dir.join("data").display(),
            dir.join("admin.token").display(),
            common::store_section(env.db.as_ref())
        ),
    )
    .unwrap();
    let cfg = cfg.display().to_string();
    let mut last = String::new();
    for _ in 0..100 {
        let cfg = cfg.clone();
        let out = tokio::task::spawn_blocking(move || {
            common::cloud_exe().run(&["lago", "status", "--config", &cfg]).unwrap()
        })
        .await
        .unwrap();
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v, json!({"store_backlog": 20}));
            return;
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("lago status --config failed: {last}");
}

/// Records of `meters` meters × 2 epochs × `per_epoch` reports starting at `first_seq`, with
/// cumulative `used`, on SIM_A and SIM_B.
fn wave(meters: std::ops::RangeInclusive<u64>, first_seq: u32, per_epoch: u32) -> Vec<NewRecord> {
    let mut out = Vec::new();
    for meter in meters {
        for epoch in 0..2u32 {
            for seq in first_seq..first_seq + per_epoch {
                let iccid = if meter % 2 == 0 { SIM_B } else { SIM_A };
                out.push(record(meter, epoch, seq, iccid, u64::from(seq) * 10 + 1, u64::from(seq) * 100));
            }
        }
    }
    out
}

/// One endpoint process's exporter loop: drains every 20 ms, counting what it did.
fn exporter_loop(exporter: LagoExporter, log: Arc<Mutex<Vec<ExportStats>>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let stats = exporter.drain().await.unwrap();
            log.lock().unwrap().push(stats);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

fn delivered(log: &Mutex<Vec<ExportStats>>) -> usize {
    log.lock().unwrap().iter().map(|s| s.delivered).sum()
}

async fn wait_for_stored(lago: &Shared, n: usize) {
    for _ in 0..1500 {
        if lago.lock().unwrap().stored.len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("lago has {} events, expected {n}", lago.lock().unwrap().stored.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_exporters_on_one_database_deliver_each_record_once() {
    let (base, lago) = start_lago().await;
    let env = Env::new(Kind::Postgres).await;
    // Two endpoint processes on one database, each with its exporter.
    let (store_a, store_b) = (env.open().await, env.open().await);
    insert(&store_a, wave(1..=6, 0, 50)).await;
    let (log_a, log_b) = (Arc::default(), Arc::default());
    let a = exporter_loop(LagoExporter::new(&store_a, config(&base)).unwrap(), Arc::clone(&log_a));
    let b = exporter_loop(LagoExporter::new(&store_b, config(&base)).unwrap(), Arc::clone(&log_b));
    wait_for_stored(&lago, 600).await;
    // More records while both run, through the other process, some late within their epochs.
    insert(&store_b, wave(1..=6, 50, 25)).await;
    insert(&store_b, wave(7..=8, 0, 25)).await;
    wait_for_stored(&lago, 1000).await;
    // The round that sent the last events reports once it has removed them.
    for _ in 0..500 {
        if delivered(&log_a) + delivered(&log_b) >= 1000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(LagoExporter::new(&store_a, config(&base)).unwrap().pending().await.unwrap(), 0);
    // Exactly one of them was active; the other only stood by.
    let (by_a, by_b) = (delivered(&log_a), delivered(&log_b));
    assert_eq!(by_a + by_b, 1000, "delivered {by_a} + {by_b}");
    assert!(by_a == 0 || by_b == 0, "both exporters sent: {by_a} and {by_b}");
    let (active, standby, standby_log, standby_store) =
        if by_a > 0 { (a, b, Arc::clone(&log_b), &store_b) } else { (b, a, Arc::clone(&log_a), &store_a) };
    assert!(standby_log.lock().unwrap().iter().all(|s| s.standby && s.planned == 0));

    // The active process goes away (its connection, and with it the lock): the other takes
    // over and exports what arrives from then on.
    active.abort();
    let _ = active.await;
    insert(standby_store, wave(9..=10, 0, 50)).await;
    wait_for_stored(&lago, 1200).await;
    for _ in 0..500 {
        if delivered(&standby_log) >= 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(delivered(&standby_log), 200, "the standby exporter did not take over");
    standby.abort();
    let _ = standby.await;

    let l = lago.lock().unwrap();
    assert_eq!(l.stored.len(), 1200);
    let resent: Vec<_> = l.received.iter().filter(|(_, n)| **n != 1).collect();
    assert!(resent.is_empty(), "events sent more than once: {resent:?}");
    assert!(l.calls.iter().all(|(n, s)| *n <= 100 && *s == 200), "{:?}", l.calls);
    assert_eq!(l.mismatched_retries, 0);
    // Each epoch's events add up to its highest `used`, whichever exporter planned them.
    let mut got = BTreeMap::<(u64, u32), u64>::new();
    for e in l.stored.values() {
        let id: Vec<u64> =
            e["transaction_id"].as_str().unwrap().split('-').map(|p| p.parse().unwrap()).collect();
        *got.entry((id[0], u32::try_from(id[1]).unwrap())).or_default() +=
            e["properties"]["bytes"].as_u64().unwrap();
    }
    for ((meter, _), bytes) in &got {
        let last = if *meter <= 6 {
            74u64
        } else if *meter <= 8 {
            24
        } else {
            49
        };
        assert_eq!(*bytes, last * 10 + 1 + last * 100, "meter {meter}");
    }
    assert_eq!(got.len(), 20);
}

#[test]
fn check_config_names_a_wrong_lago_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    countersign_protocol::keys::write_secret(&d.join("admin.token"), &[9; 32]).unwrap();
    std::fs::write(
        d.join("cloud.toml"),
        format!(
            "data_dir = '{}'\nadmin_token_file = '{}'\n",
            d.join("data").display(),
            d.join("admin.token").display()
        ),
    )
    .unwrap();
    std::fs::write(d.join("lago.key"), "k\n").unwrap();
    std::fs::set_permissions(d.join("lago.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let check = |lago: &str| {
        std::fs::write(
            d.join("lago.toml"),
            format!("base_url = 'http://lago'\napi_key_file = 'lago.key'\n{lago}\n"),
        )
        .unwrap();
        let cloud = d.join("cloud.toml").display().to_string();
        let lago = d.join("lago.toml").display().to_string();
        common::cloud_exe().run(&["check-config", "--config", &cloud, "--lago-config", &lago]).unwrap()
    };
    let ok = check("events_per_call = 50\nfield = 'octets'");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    for (lago, key) in [("events_per_call = 0", "events_per_call: "), ("field = ''", "field: ")] {
        let out = check(lago);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(key), "{lago}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_metric_check_stops_the_export_and_asks_no_more() {
    let (base, lago) = start_lago().await;
    let env = Env::new(Kind::Sled).await;
    let store = env.open().await;
    insert(&store, vec![record(1, 0, 0, SIM_A, 1, 1)]).await;
    let subs: BTreeMap<u64, String> = [(SIM_A, "sub_a".to_owned())].into();
    let exporter =
        LagoExporter::new(&store, LagoConfig::new(&base, "wrong", "data_bytes", subs).unwrap()).unwrap();
    let status = exporter.status();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(exporter.run(Duration::from_millis(20), async move {
        let _ = stopped.await;
    }));
    for _ in 0..500 {
        if status.snapshot().state() == LagoState::Stopped {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let h = status.snapshot().health();
    assert_eq!((h.state, h.code.as_deref()), (LagoState::Stopped, Some("unauthorized")), "{h:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stop.send(());
    run.await.unwrap();
    let l = lago.lock().unwrap();
    // The refused check was the only call.
    assert_eq!((l.metric_checks, l.calls.len()), (1, 0), "lago was asked again after the refusal");
    assert_eq!(status.snapshot().refusals()["unauthorized"], 1);
}

async fn events_of_another_metric_in_the_outbox_stop_the_export_before_anything_is_planned(kind: Kind) {
    let (base, lago) = start_lago().await;
    let env = Env::new(kind).await;
    let store = env.open().await;
    insert(&store, wave(1..=1, 0, 5)).await;
    // Planned under the default field, then refused (wrong key): 10 events wait.
    let subs: BTreeMap<u64, String> = [(SIM_A, "sub_a".to_owned()), (SIM_B, "sub_b".to_owned())].into();
    let bad =
        LagoExporter::new(&store, LagoConfig::new(&base, "wrong", "data_bytes", subs).unwrap()).unwrap();
    assert!(matches!(bad.drain().await.unwrap_err(), LagoError::Refused { status: 401, .. }));
    drop(bad);
    // The operator renames the field (in Lago and in the config) with the backlog not empty.
    lago.lock().unwrap().metrics.insert("data_bytes".into(), ("sum_agg", Some("octets"), false));
    insert(&store, wave(2..=2, 0, 5)).await;
    let renamed = LagoExporter::new(&store, config(&base).with_field("octets").unwrap()).unwrap();
    for _ in 0..200 {
        match renamed.drain().await {
            Ok(stats) if stats.standby => tokio::time::sleep(Duration::from_millis(25)).await,
            Err(LagoError::OutboxMetricChanged(what)) => {
                assert!(what.contains(r#"field "bytes""#) && what.contains(r#"field "octets""#), "{what}");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    let h = renamed.status().snapshot().health();
    assert_eq!((h.state, h.code.as_deref()), (LagoState::Stopped, Some("outbox_metric_changed")));
    // Nothing sent, and nothing new planned behind the old events.
    assert_eq!(renamed.pending().await.unwrap(), 10);
    assert!(lago.lock().unwrap().calls.is_empty());
    drop(renamed);
    // Back to the old field: the old events go; then the new field plans the rest.
    lago.lock().unwrap().metrics.insert("data_bytes".into(), GOOD_METRIC);
    let old = LagoExporter::new(&store, config(&base)).unwrap();
    let stats = drain_when_active(&old).await;
    assert_eq!(stats.delivered, 20, "{stats:?}");
    drop(old);
    insert(&store, wave(3..=3, 0, 5)).await;
    lago.lock().unwrap().metrics.insert("data_bytes".into(), ("sum_agg", Some("octets"), false));
    let renamed = LagoExporter::new(&store, config(&base).with_field("octets").unwrap()).unwrap();
    assert_eq!(drain_when_active(&renamed).await.delivered, 10);
    let l = lago.lock().unwrap();
    assert_eq!(l.stored.values().filter(|e| e["properties"].get("octets").is_some()).count(), 10);
}
