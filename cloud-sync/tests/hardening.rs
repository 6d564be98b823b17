//! The endpoint's network boundary under hostile clients, over real sockets: slow and idle
//! connections cannot starve batch uploads and are closed after their deadline; unknown
//! gateway ids and tokens cost one store lookup; the rate limit charges stored records only;
//! no query parameter can make a handler panic; weak gateway keys and a data directory
//! others can read are refused; and `/metrics` counts every refusal.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use countersign_cloud::auth::Role;
use countersign_cloud::client::{self, ClientError};
use countersign_cloud::config::{RateLimit, ServerLimits};
use countersign_cloud::{CloudConfig, Endpoint, StoreBackend};
use countersign_protocol::keys::write_secret;
use countersign_protocol::BATCHES_PATH;
use countersign_testkit::{gateway_key, network_time, now_s, signed_batch_at, signing_key, ReportBuilder};
use ed25519_dalek::SigningKey;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[macro_use]
mod common;
use common::Kind;

const TOKEN: [u8; 32] = [0x5a; 32];
const GATEWAY_ID: u64 = 1;
const METER_ID: u64 = 10;
const METER_KEY: [u8; 32] = [0xa1; 32];
const SIM: u64 = 8_988_280_666_000_000_001;
const SPEC: &str = include_str!("../openapi.yaml");
const PLANS: &str = r#"
[[plan]]
id = "p"
currency = "USD"
unit = "GB"
model = "per_unit"
price = "0.10"
lifetime_quota_bytes = 524288000
lifetime_years = 10

[[assign]]
customer = "acme"
group = "fleet"
plan = "p"
iccids = ["8988280666000000001"]

[[wallet]]
customer = "acme"
currency = "USD"
opening_credit = "10"
"#;

fn token() -> String {
    hex::encode(TOKEN)
}

/// Report `seq` of `meter_id` on SIM, made now, `used` bytes each way.
fn report(meter_id: u64, seq: u32, used: u64, key: &[u8; 32]) -> Vec<u8> {
    ReportBuilder::new(meter_id, seq, SIM, network_time(now_s())).used(used, used).encode(key)
}

/// A batch of `gateway_id` formed and received now.
fn batch_now(gateway_id: u64, seq: u64, reports: &[Vec<u8>], key: &SigningKey) -> Vec<u8> {
    signed_batch_at(key, gateway_id, seq, now_s() * 1000, reports)
}

struct Running {
    base: String,
    addr: std::net::SocketAddr,
    store: StoreBackend,
    server: common::Server,
    _dir: tempfile::TempDir,
    _db: Option<countersign_cloud::store::postgres::testing::TestDatabase>,
}

impl Running {
    async fn stop(self) {
        self.server.stop().await;
    }

    async fn post_batch(&self, http: &reqwest::Client, body: Vec<u8>) -> (u16, Value) {
        let r = http.post(format!("{}{BATCHES_PATH}", self.base)).body(body).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    async fn metrics(&self, http: &reqwest::Client) -> String {
        let r = http.get(format!("{}/metrics", self.base)).bearer_auth(token()).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        r.text().await.unwrap()
    }
}

/// The value of one sample line of `/metrics` (0 when absent).
fn sample(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0, |v| v.parse().unwrap())
}

/// An endpoint on a free port with `limits`, `rate` and a plans file, on `kind`.
async fn start(kind: Kind, limits: ServerLimits, rate: RateLimit) -> Running {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (dir, db) = common::state_for(kind).await;
    let token_file = dir.path().join("admin.token");
    write_secret(&token_file, &TOKEN).unwrap();
    let plans = dir.path().join("plans.toml");
    std::fs::write(&plans, PLANS).unwrap();
    let store = match &db {
        None => String::new(),
        Some(db) => format!("[store]\nbackend = 'postgres'\npostgres_url = '{}'\n", db.url()),
    };
    let config = CloudConfig::from_toml_str(&format!(
        "data_dir = '{}'\nadmin_token_file = '{}'\n{store}[billing]\nplans_file = '{}'\n",
        dir.path().join("data").display(),
        token_file.display(),
        plans.display()
    ))
    .unwrap()
    .with_rate_limit(rate)
    .with_server_limits(limits);
    let endpoint = Endpoint::connect(&config).await.unwrap();
    let store = endpoint.store().clone();
    let server = common::serve(endpoint).await;
    Running { base: server.base.clone(), addr: server.addr, store, server, _dir: dir, _db: db }
}

async fn register(ep: &Running, http: &reqwest::Client) {
    client::register_gateway(http, &ep.base, &token(), GATEWAY_ID, &gateway_key().verifying_key())
        .await
        .unwrap();
    client::register_meter(http, &ep.base, &token(), METER_ID, &METER_KEY).await.unwrap();
}

/// Reads until the server closes the connection (or resets it); what it sent.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let _ = stream.read_to_end(&mut buf).await;
    String::from_utf8_lossy(&buf).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Slow clients.

const SLOW_HEADER_CLIENTS: usize = 4;
const SLOW_BODY_CLIENTS: usize = 4;
const IDLE_CLIENTS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_cannot_starve_batch_uploads_and_are_closed_after_their_deadline() {
    let limits = ServerLimits {
        connections_max: SLOW_HEADER_CLIENTS + SLOW_BODY_CLIENTS + IDLE_CLIENTS,
        header_timeout: Duration::from_secs(1),
        body_timeout: Duration::from_secs(2),
    };
    let ep = start(Kind::Sled, limits, RateLimit::default()).await;
    // No pooled connection of ours may hold a slot: the slow clients take them all.
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    register(&ep, &http).await;
    let started = Instant::now();

    // Every slot taken: heads trickling, bodies trickling, connections saying nothing.
    let mut slow = Vec::new();
    for i in 0..SLOW_HEADER_CLIENTS {
        let addr = ep.addr;
        slow.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let head = format!("POST {BATCHES_PATH} HTTP/1.1\r\nhost: x\r\nx-slow-{i}: ");
            s.write_all(head.as_bytes()).await.unwrap();
            let t0 = Instant::now();
            // One byte every 200 ms until the server hangs up.
            while s.write_all(b"a").await.is_ok() {
                if t0.elapsed() > Duration::from_secs(10) {
                    panic!("a trickling head was not cut off");
                }
                let mut probe = [0u8; 256];
                match tokio::time::timeout(Duration::from_millis(200), s.read(&mut probe)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(_)) => {}
                    Err(_) => {}
                }
            }
            ("head", t0.elapsed(), String::new())
        }));
    }
    for _ in 0..SLOW_BODY_CLIENTS {
        let addr = ep.addr;
        slow.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "POST {BATCHES_PATH} HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\ncontent-length: 100000\r\n\r\n"
            );
            s.write_all(head.as_bytes()).await.unwrap();
            let t0 = Instant::now();
            let mut answer = Vec::new();
            loop {
                if t0.elapsed() > Duration::from_secs(10) {
                    panic!("a trickling body was not cut off");
                }
                if s.write_all(b"b").await.is_err() {
                    break;
                }
                let mut probe = [0u8; 1024];
                match tokio::time::timeout(Duration::from_millis(200), s.read(&mut probe)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => answer.extend_from_slice(&probe[..n]),
                    Err(_) => {}
                }
            }
            ("body", t0.elapsed(), String::from_utf8_lossy(&answer).into_owned())
        }));
    }
    for _ in 0..IDLE_CLIENTS {
        let addr = ep.addr;
        slow.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let t0 = Instant::now();
            let text = tokio::time::timeout(Duration::from_secs(10), read_to_close(&mut s)).await.unwrap();
            ("idle", t0.elapsed(), text)
        }));
    }
    // Let them take their slots.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A real signed batch from another client still gets its reply, within the head deadline
    // (when the first slow connections are cut) plus a margin.
    let t0 = Instant::now();
    let (status, reply) = ep
        .post_batch(&http, batch_now(GATEWAY_ID, 1, &[report(METER_ID, 0, 100, &METER_KEY)], &gateway_key()))
        .await;
    let waited = t0.elapsed();
    assert_eq!((status, reply["results"][0]["status"].as_str()), (200, Some("stored")), "{reply}");
    assert!(waited < limits.header_timeout + Duration::from_secs(2), "the batch waited {waited:?}");

    // Every slow connection was closed after its deadline (with a margin for scheduling).
    for task in slow {
        let (kind, held, answer) = task.await.unwrap();
        let deadline = match kind {
            "body" => limits.body_timeout,
            _ => limits.header_timeout,
        };
        assert!(
            held >= deadline.saturating_sub(Duration::from_millis(400))
                && held < deadline + Duration::from_secs(2),
            "{kind} connection held {held:?}, deadline {deadline:?}"
        );
        if kind == "body" {
            assert!(answer.starts_with("HTTP/1.1 408"), "a cut body answers 408: {answer}");
            assert!(answer.contains("body_timeout"), "{answer}");
        }
    }
    assert!(started.elapsed() < Duration::from_secs(8));

    // An idle keep-alive connection after a request is closed too.
    let mut s = TcpStream::connect(ep.addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let t0 = Instant::now();
    let text = tokio::time::timeout(Duration::from_secs(5), read_to_close(&mut s)).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(t0.elapsed() < limits.header_timeout + Duration::from_secs(1), "{:?}", t0.elapsed());

    let m = ep.metrics(&http).await;
    assert!(
        sample(&m, "countersign_header_timeouts_total") >= (SLOW_HEADER_CLIENTS + IDLE_CLIENTS) as u64,
        "{m}"
    );
    assert_eq!(sample(&m, "countersign_body_timeouts_total"), SLOW_BODY_CLIENTS as u64, "{m}");
    assert!(sample(&m, "countersign_connection_limit_waits_total") >= 1, "{m}");
    assert_eq!(sample(&m, "countersign_batches_total{status=\"200\"}"), 1, "{m}");
    assert_eq!(sample(&m, "countersign_records_total{outcome=\"stored\"}"), 1, "{m}");
    ep.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Negative caches, rate limit: on both stores.

on_both_stores!(unknown_gateways_and_tokens_cost_one_store_lookup, rate_limit_charges_stored_records_only);

async fn unknown_gateways_and_tokens_cost_one_store_lookup(kind: Kind) {
    let ep = start(kind, ServerLimits::default(), RateLimit::default()).await;
    let http = reqwest::Client::new();
    register(&ep, &http).await;
    let before = ep.store.lookup_stats();

    // A gateway nobody registered: the first batch asks the store, the rest do not.
    let stranger = signing_key(0x77);
    let body = batch_now(99, 1, &[report(METER_ID, 0, 1, &METER_KEY)], &stranger);
    for _ in 0..5 {
        let (status, v) = ep.post_batch(&http, body.clone()).await;
        assert_eq!((status, v["code"].as_str()), (401, Some("unknown_gateway")));
    }
    let after = ep.store.lookup_stats();
    assert_eq!(after.gateway_store_lookups - before.gateway_store_lookups, 1, "{after:?}");
    assert_eq!(after.gateway_negative_hits - before.gateway_negative_hits, 4, "{after:?}");
    // Registered through this process: known at once.
    client::register_gateway(&http, &ep.base, &token(), 99, &stranger.verifying_key()).await.unwrap();
    let (status, v) = ep.post_batch(&http, body).await;
    assert_eq!((status, v["results"][0]["status"].as_str()), (200, Some("stored")), "{v}");

    // A token nobody created: likewise.
    let secret = [0x33u8; 32];
    let sims = format!("{}/v1/usage/sims", ep.base);
    for _ in 0..5 {
        let r = http.get(&sims).bearer_auth(hex::encode(secret)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401);
    }
    let after = ep.store.lookup_stats();
    assert_eq!(after.token_store_lookups - before.token_store_lookups, 1, "{after:?}");
    assert_eq!(after.token_negative_hits - before.token_negative_hits, 4, "{after:?}");
    client::create_token(&http, &ep.base, &token(), "reader", Role::Query, &secret).await.unwrap();
    let r = http.get(&sims).bearer_auth(hex::encode(secret)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "a token created through this process works at once");

    let m = ep.metrics(&http).await;
    assert_eq!(sample(&m, "countersign_gateway_negative_cache_hits_total"), 4, "{m}");
    assert_eq!(sample(&m, "countersign_token_negative_cache_hits_total"), 4, "{m}");
    assert_eq!(sample(&m, "countersign_batches_total{status=\"401\"}"), 5, "{m}");
    assert_eq!(sample(&m, "countersign_auth_refusals_total{code=\"unauthorized\"}"), 5, "{m}");
    ep.stop().await;
}

async fn rate_limit_charges_stored_records_only(kind: Kind) {
    // One record per second refill: the test is over long before credit comes back.
    let ep =
        start(kind, ServerLimits::default(), RateLimit { records_per_second: 1, burst_records: 10 }).await;
    let http = reqwest::Client::new();
    register(&ep, &http).await;
    let gw = gateway_key();
    let first: Vec<Vec<u8>> =
        (0..8).map(|seq| report(METER_ID, seq, u64::from(seq) * 10, &METER_KEY)).collect();
    let (status, _) = ep.post_batch(&http, batch_now(GATEWAY_ID, 1, &first, &gw)).await;
    assert_eq!(status, 200);
    // Resent (a lost reply): duplicates only, which cost nothing.
    for seq in 2..7 {
        let (status, v) = ep.post_batch(&http, batch_now(GATEWAY_ID, seq, &first, &gw)).await;
        assert_eq!((status, v["results"][0]["status"].as_str()), (200, Some("duplicate")), "{v}");
    }
    // Records of an unregistered meter: rejected, cost nothing.
    let strangers: Vec<Vec<u8>> = (0..5).map(|seq| report(55, seq, 1, &METER_KEY)).collect();
    let (status, v) = ep.post_batch(&http, batch_now(GATEWAY_ID, 7, &strangers, &gw)).await;
    assert_eq!((status, v["results"][4]["reason"].as_str()), (200, Some("unknown_meter")), "{v}");
    // 8 of 10 spent: three new records still go in, and take the bucket into debt.
    let more: Vec<Vec<u8>> =
        (8..11).map(|seq| report(METER_ID, seq, u64::from(seq) * 10, &METER_KEY)).collect();
    let (status, v) = ep.post_batch(&http, batch_now(GATEWAY_ID, 8, &more, &gw)).await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = ep.post_batch(&http, batch_now(GATEWAY_ID, 9, &more, &gw)).await;
    assert_eq!((status, v["code"].as_str()), (429, Some("rate_limited")), "{v}");

    let m = ep.metrics(&http).await;
    assert_eq!(sample(&m, "countersign_records_total{outcome=\"stored\"}"), 11, "{m}");
    assert_eq!(sample(&m, "countersign_records_total{outcome=\"duplicate\"}"), 40, "{m}");
    assert_eq!(sample(&m, "countersign_records_rejected_total{reason=\"unknown_meter\"}"), 5, "{m}");
    assert_eq!(sample(&m, "countersign_batches_rate_limited_total"), 1, "{m}");
    assert_eq!(sample(&m, "countersign_batches_total{status=\"429\"}"), 1, "{m}");
    ep.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Query parameters.

/// Values no parameter should be able to turn into a panic.
fn extreme_values() -> Vec<String> {
    let mut v: Vec<String> = [
        "",
        "0",
        "1",
        "-1",
        "18446744073709551615",
        "18446744073709551616",
        "9223372036854775807",
        "-9223372036854775808",
        "340282366920938463463374607431768211456",
        "1e308",
        "NaN",
        "9999-12-31",
        "-9999-01-01",
        "0000-01-01",
        "+10000-01-01",
        "1970-01-01",
        "2026-02-29",
        "UTC",
        "Europe/Berlin",
        "Not/AZone",
        "../../etc/passwd",
        "+99:99",
        "%00",
        "%FF%FE",
        "\u{e9}\u{1f600}",
        "a b",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    v.push("9".repeat(4000));
    v.push("x".repeat(4000));
    v
}

fn spec_query_parameters() -> Vec<(String, Vec<String>)> {
    let spec: Value = serde_yaml::from_str(SPEC).unwrap();
    let resolve = |p: &Value| -> Value {
        match p.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let mut v = &spec;
                for part in r.trim_start_matches("#/").split('/') {
                    v = &v[part];
                }
                v.clone()
            }
            None => p.clone(),
        }
    };
    let mut out = Vec::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        let Some(get) = item.get("get") else { continue };
        let mut names = Vec::new();
        for p in get["parameters"].as_array().cloned().unwrap_or_default() {
            let p = resolve(&p);
            if p["in"] == "query" {
                names.push(p["name"].as_str().unwrap().to_owned());
            }
        }
        out.push((path.clone(), names));
    }
    out
}

fn encode(v: &str) -> String {
    // Some values are percent-escapes already: keep those, escape the rest.
    if v.starts_with('%') {
        return v.to_owned();
    }
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_query_parameter_reaches_a_panic_and_the_endpoint_keeps_serving() {
    let ep = start(Kind::Sled, ServerLimits::default(), RateLimit::default()).await;
    let http = reqwest::Client::new();
    register(&ep, &http).await;
    let reports: Vec<Vec<u8>> =
        (0..3).map(|seq| report(METER_ID, seq, 1000 * u64::from(seq + 1), &METER_KEY)).collect();
    assert_eq!(ep.post_batch(&http, batch_now(GATEWAY_ID, 1, &reports, &gateway_key())).await.0, 200);

    // Regression: a huge quota at a few kB a day put the exhaustion day 10^15 days out and
    // `Duration::days` panicked in the forecast. Now a 400 that names the parameter.
    let r = http
        .get(format!("{}/v1/billing/forecast?iccid={SIM}&quota_bytes={}", ep.base, u64::MAX))
        .bearer_auth(token())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().starts_with("quota_bytes"), "{body}");

    let routes = spec_query_parameters();
    assert!(routes.iter().any(|(p, n)| p == "/v1/billing/forecast" && n.contains(&"quota_bytes".to_owned())));
    let values = extreme_values();
    let mut asked = 0usize;
    for (path, names) in &routes {
        if path.contains('{') {
            continue;
        }
        let mut names = names.clone();
        names.push("unknown_parameter".into());
        let mut queries = Vec::new();
        for value in &values {
            for name in &names {
                // Alone, and beside a valid ICCID (the parameter many routes require).
                queries.push(format!("{name}={}", encode(value)));
                if name != "iccid" {
                    queries.push(format!("iccid={SIM}&{name}={}", encode(value)));
                }
            }
            // Every parameter at once.
            queries
                .push(names.iter().map(|n| format!("{n}={}", encode(value))).collect::<Vec<_>>().join("&"));
        }
        for (from, to) in
            [("-9999-01-01", "9999-12-31"), ("9999-12-31", "9999-12-31"), ("-9999-01-01", "-9999-01-01")]
        {
            queries.push(format!(
                "iccid={SIM}&from={from}&to={to}&since={from}&expires={to}&as_of={to}&period={to}"
            ));
            queries.push(format!("iccid={SIM}&quota_bytes=1&since={from}&as_of={to}&window_days=366"));
            queries.push(format!(
                "iccid={SIM}&quota_bytes=1152921504606846976&since={from}&as_of={from}&window_days=1"
            ));
            queries.push(format!("tz=UTC&from={from}&to={to}"));
        }
        for q in queries {
            let r = http.get(format!("{}{path}?{q}", ep.base)).bearer_auth(token()).send().await.unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            assert!(status < 500, "GET {path}?{q} answered {status}: {text}");
            asked += 1;
        }
    }
    assert!(asked > 1000, "{asked}");
    // Bodies of the POST routes with extreme numbers in them.
    for body in [
        serde_json::json!({"tz": "UTC", "settlement_hours": u32::MAX}),
        serde_json::json!({"tz": "x".repeat(4000), "settlement_hours": 0}),
        serde_json::json!({"tz": "Etc/GMT+12", "settlement_hours": 1}),
    ] {
        let r = http
            .post(format!("{}/v1/admin/settle", ep.base))
            .bearer_auth(token())
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().as_u16() < 500, "settle {body}: {}", r.text().await.unwrap());
    }
    for amount in ["18446744073709551615", "-1", "0.0000001", "99999999999999999999999"] {
        let body = serde_json::json!({"topup_id": "t1", "amount": amount});
        let r = http
            .post(format!("{}/v1/admin/wallets/acme/topups", ep.base))
            .bearer_auth(token())
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().as_u16() < 500, "topup {amount}: {}", r.text().await.unwrap());
    }

    let m = ep.metrics(&http).await;
    assert_eq!(sample(&m, "countersign_panics_total"), 0, "{m}");
    let health = http.get(format!("{}/health", ep.base)).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    ep.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Keys and the data directory.

/// The identity point: order 1, a weak key under which the lenient check accepts a forged
/// signature of anything.
fn identity_point_hex() -> String {
    let mut k = [0u8; 32];
    k[0] = 1;
    hex::encode(k)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weak_gateway_keys_are_refused_at_the_admin_route_and_the_cli() {
    let ep = start(Kind::Sled, ServerLimits::default(), RateLimit::default()).await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/v1/admin/gateways", ep.base))
        .bearer_auth(token())
        .json(&serde_json::json!({"gateway_id": 5, "public_key_hex": identity_point_hex()}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")), "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.starts_with("public_key_hex:") && error.contains("weak"), "{error}");

    // The CLI refuses it before sending anything.
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    write_secret(&token_file, &TOKEN).unwrap();
    let out = common::cloud_exe()
        .command(&["register-gateway", "--endpoint", &ep.base, "--token-file"])
        .arg(&token_file)
        .args(["--gateway-id", "5", "--public-key", &identity_point_hex()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--public-key") && stderr.contains("weak"), "{stderr}");
    match client::register_gateway(&http, &ep.base, &token(), 5, &gateway_key().verifying_key()).await {
        Ok(()) => {}
        Err(ClientError::Refused { status, .. }) => panic!("gateway 5 was registered before: {status}"),
        Err(e) => panic!("{e}"),
    }
    ep.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_others_can_read_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    write_secret(&token_file, &TOKEN).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = CloudConfig::new(&data, &token_file);
    let e = Endpoint::connect(&config).await.unwrap_err().to_string();
    assert!(e.contains(&data.display().to_string()) && e.contains("mode 755"), "{e}");
    // The real binary says so and exits.
    let config_file = dir.path().join("cloud.toml");
    std::fs::write(
        &config_file,
        format!(
            "listen = '127.0.0.1:0'\ndata_dir = '{}'\nadmin_token_file = '{}'\n",
            data.display(),
            token_file.display()
        ),
    )
    .unwrap();
    let out = common::cloud_exe().command(&["serve", "--config"]).arg(&config_file).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("mode 755") && stderr.contains("chmod 700"), "{stderr}");
    // A fresh one is created 0700, and a private one is used.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let fresh = dir.path().join("fresh/data");
    let _ = Endpoint::connect(&CloudConfig::new(&fresh, &token_file)).await.unwrap();
    assert_eq!(std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o700);
    drop(Endpoint::connect(&config).await.unwrap());
}
