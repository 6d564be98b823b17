//! `reconcile` with carrier usage as carriers publish it: `--fetch` against a local stand-in of
//! the 1NCE Management API, and `--carrier-twilio` files of Twilio Super SIM usage.
//!
//! The stand-in follows 1NCE's published OpenAPI files as 1NCE ships them in
//! github.com/1NCE-GmbH/1nce-mcp-server, commit 593e74a5ca8aad6a2f3b18db5372dc79a970e607:
//! `auth.json` (`POST /oauth/token`: HTTP Basic client id/secret, JSON body
//! `{"grant_type":"client_credentials"}`, answer `Bearer_Token_200` as its example `Success`,
//! 400 answers shaped as `Bearer_Token_400`) and `sim.json` (`GET /v1/sims` with `page` from 1,
//! `pageSize` at most 100 and the `X-Total-Pages`/`X-Total-Count`/`X-Current-Page`/
//! `X-Count-Per-Page` headers, items `SIM_card`; `GET /v1/sims/{iccid}/usage?start_dt&end_dt`
//! answering `DailyUsage` rows shaped as the published example: datetime `date`, `data` and
//! `sms` objects with `cost`, `currency`, `traffic_type`, MB strings; 401/404 without body).
//! Beyond the contract, it answers one 429 (1NCE documents no limit on `/sims`, but asks
//! clients to be gentle) and lets the first token expire early, once.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use countersign_cloud::client;
use countersign_cloud::once_api::{fetch_usage, OnceApiError, OnceCredentials};
use countersign_cloud::once_fetch::FetchError;
use countersign_cloud::store::NewRecord;
use countersign_cloud::text::format_date;
use countersign_cloud::usage::DateRange;
use countersign_cloud::{CloudConfig, Endpoint};
use countersign_protocol::keys::write_secret;
use countersign_testkit::{network_time, unix_s, ReportBuilder};
use serde_json::{json, Value};
use time::macros::date;

mod common;

const CLIENT_ID: &str = "countersign-reconcile";
const CLIENT_SECRET: &str = "s3cret-Pa55";
/// `Basic base64("countersign-reconcile:s3cret-Pa55")`.
const BASIC: &str = "Basic Y291bnRlcnNpZ24tcmVjb25jaWxlOnMzY3JldC1QYTU1";
const TOKEN: [u8; 32] = [0x5a; 32];
const SIM_A: u64 = 8_988_280_666_000_000_001;
const SIM_B: u64 = 8_988_280_666_000_000_002;

/// What the stand-in knows and what it saw.
#[derive(Default)]
struct OnceState {
    /// Usage per SIM (19-digit ICCID) and day: bytes as the carrier counted them.
    usage: BTreeMap<u64, BTreeMap<time::Date, u64>>,
    /// Tokens issued, in order.
    tokens: Vec<String>,
    /// Tokens that have expired.
    expired: Vec<String>,
    /// Whether the one 429 was sent.
    limited: bool,
    /// Requests seen, as "METHOD path?query" (the token request without its credentials).
    log: Vec<String>,
}

type Shared = Arc<Mutex<OnceState>>;

fn luhn(body: u64) -> u64 {
    let digits: Vec<u64> = body.to_string().bytes().map(|b| u64::from(b - b'0')).collect();
    let sum: u64 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 0 {
                if d * 2 > 9 {
                    d * 2 - 9
                } else {
                    d * 2
                }
            } else {
                d
            }
        })
        .sum();
    (10 - sum % 10) % 10
}

/// Bytes as 1NCE's MB string: 6 fraction digits of 1 MB = 1 048 576 bytes, rounded.
fn mb(bytes: u64) -> String {
    let micro = (u128::from(bytes) * 1_000_000 + 524_288) / 1_048_576;
    format!("{}.{:06}", micro / 1_000_000, micro % 1_000_000)
}

/// Whether the request carries a live token (else the published 401, no body).
fn bearer_ok(s: &OnceState, headers: &HeaderMap) -> bool {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    match token {
        Some(t) => s.tokens.contains(&t) && !s.expired.contains(&t),
        None => false,
    }
}

async fn token(State(state): State<Shared>, headers: HeaderMap, body: String) -> Response {
    let mut s = state.lock().unwrap();
    s.log.push("POST /oauth/token".into());
    let bad = |code: &str, message: &str| {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"statusCode": 400, "errorCode": code, "message": message})),
        )
            .into_response()
    };
    if headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/json") {
        return bad("UnsupportedContentTypeError", "Content-Type not supported");
    }
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(BASIC) {
        return bad("CognitoAuthenticationError", "User does not exist.");
    }
    let grant =
        serde_json::from_str::<Value>(&body).ok().and_then(|b| b["grant_type"].as_str().map(str::to_owned));
    if grant.as_deref() != Some("client_credentials") {
        return bad("BodyValidationError", "Request body validation error: Missing attributes 'grant_type'");
    }
    let t = format!("eyJpzhr-{}", s.tokens.len() + 1);
    s.tokens.push(t.clone());
    // Members as in the published example `Success`.
    axum::Json(json!({"status_code": 200, "access_token": t, "token_type": "bearer", "expires_in": 3600,
        "user_id": "user", "score": "all"}))
    .into_response()
}

async fn sims(
    State(state): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let mut s = state.lock().unwrap();
    s.log.push(format!("GET /v1/sims page={:?} pageSize={:?}", q.get("page"), q.get("pageSize")));
    if !bearer_ok(&s, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let page: usize = q.get("page").map_or(Ok(1), |p| p.parse()).unwrap();
    let size: usize = q.get("pageSize").map_or(Ok(10), |p| p.parse()).unwrap();
    assert!(page >= 1 && (1..=100).contains(&size), "outside the published bounds: page {page} size {size}");
    let all: Vec<u64> = s.usage.keys().copied().collect();
    let pages = all.len().div_ceil(size);
    let items: Vec<Value> = all
        .iter()
        .skip((page - 1) * size)
        .take(size)
        .map(|i| {
            json!({"iccid": i.to_string(), "iccid_with_luhn": format!("{i}{}", luhn(*i)),
            "imsi": "901405100000018", "status": "Enabled", "current_quota": 500})
        })
        .collect();
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("x-total-pages", pages),
        ("x-total-count", all.len()),
        ("x-current-page", page),
        ("x-count-per-page", size),
    ] {
        h.insert(k, v.to_string().parse().unwrap());
    }
    (h, axum::Json(items)).into_response()
}

async fn usage(
    State(state): State<Shared>,
    headers: HeaderMap,
    UrlPath(iccid): UrlPath<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let mut s = state.lock().unwrap();
    s.log.push(format!(
        "GET /v1/sims/{iccid}/usage start_dt={:?} end_dt={:?}",
        q.get("start_dt"),
        q.get("end_dt")
    ));
    if !bearer_ok(&s, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if !s.limited {
        s.limited = true;
        return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")]).into_response();
    }
    // The first token expires after its first successful use.
    if s.expired.is_empty() {
        let first = s.tokens[0].clone();
        s.expired.push(first);
    }
    let parse = |k: &str| q.get(k).and_then(|d| countersign_cloud::text::parse_date(d));
    let (Some(from), Some(to)) = (parse("start_dt"), parse("end_dt")) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let Some(days) = iccid.parse::<u64>().ok().and_then(|i| s.usage.get(&i)) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let currency = json!({"id": 1, "symbol": "€", "code": "EUR"});
    let stats: Vec<Value> = days
        .range(from..=to)
        .map(|(d, bytes)| {
            json!({
                "date": format!("{}T00:00:00.000Z", format_date(*d)),
                "data": {"cost": "0.01", "currency": currency, "traffic_type": {"description": "Data", "id": 1, "unit": "MB"},
                    "volume": mb(*bytes), "volume_rx": mb(bytes / 3), "volume_tx": mb(bytes - bytes / 3)},
                "sms": {"cost": "0", "currency": currency, "traffic_type": {"description": "SMS", "id": 2, "unit": "SMS"},
                    "volume": "2", "volume_rx": "1", "volume_tx": "1"}
            })
        })
        .collect();
    axum::Json(json!({"stats": stats})).into_response()
}

async fn stand_in(usage_by_sim: BTreeMap<u64, BTreeMap<time::Date, u64>>) -> (String, Shared) {
    let state: Shared = Arc::new(Mutex::new(OnceState { usage: usage_by_sim, ..OnceState::default() }));
    let app = Router::new()
        .route("/management-api/oauth/token", post(token))
        .route("/management-api/v1/sims", get(sims))
        .route("/management-api/v1/sims/{iccid}/usage", get(usage))
        .with_state(state.clone());
    (format!("{}/management-api", common::serve_router(app).await), state)
}

fn credentials() -> OnceCredentials {
    OnceCredentials::from_toml(&format!("client_id = '{CLIENT_ID}'\nclient_secret = '{CLIENT_SECRET}'\n"))
        .unwrap()
}

#[tokio::test]
async fn fetch_pages_the_account_renews_an_expired_token_and_waits_out_a_429() {
    // 101 SIMs: two pages of 100.
    let account: BTreeMap<u64, BTreeMap<time::Date, u64>> = (0..101)
        .map(|n| {
            (
                SIM_A + n,
                BTreeMap::from([(date!(2026 - 01 - 10), 1_000 + n), (date!(2026 - 01 - 11), 5_000_000)]),
            )
        })
        .collect();
    let (base, state) = stand_in(account).await;
    let http = reqwest::Client::new();
    let started = std::time::Instant::now();
    let (days, stats) = fetch_usage(
        &http,
        &base,
        &credentials(),
        [SIM_A],
        (date!(2026 - 01 - 10), date!(2026 - 01 - 11)),
        true,
    )
    .await
    .unwrap();
    assert!(started.elapsed() >= std::time::Duration::from_secs(1), "Retry-After: 1 was waited");
    assert_eq!(days.len(), 202);
    let b = days.iter().find(|d| d.iccid == SIM_A + 7 && d.date == date!(2026 - 01 - 10)).unwrap();
    // 1007 bytes as "0.000960" MB: 6 fraction digits carry ±0.5 byte.
    assert_eq!(b.total_bytes, 1007);
    assert_eq!(stats.sims, 101);
    assert_eq!((stats.tokens, stats.retries), (2, 1));
    let s = state.lock().unwrap();
    let listing: Vec<_> = s.log.iter().filter(|l| l.starts_with("GET /v1/sims page")).collect();
    assert_eq!(
        listing,
        [
            "GET /v1/sims page=Some(\"1\") pageSize=Some(\"100\")",
            "GET /v1/sims page=Some(\"2\") pageSize=Some(\"100\")"
        ]
    );
    assert!(s.log.contains(&format!(
        "GET /v1/sims/{SIM_A}/usage start_dt=Some(\"2026-01-10\") end_dt=Some(\"2026-01-11\")"
    )));
}

#[tokio::test]
async fn wrong_credentials_and_an_unknown_sim_are_clear_errors() {
    let (base, _state) = stand_in(BTreeMap::from([(SIM_A, BTreeMap::new())])).await;
    let http = reqwest::Client::new();
    let range = (date!(2026 - 01 - 10), date!(2026 - 01 - 11));
    let wrong = OnceCredentials::from_toml("client_id = 'someone'\nclient_secret = 'else'\n").unwrap();
    let e = fetch_usage(&http, &base, &wrong, [SIM_A], range, false).await.unwrap_err();
    assert!(
        matches!(&e, OnceApiError::Fetch(FetchError::Credentials { status: 400, message }) if message.contains("User does not exist")),
        "{e}"
    );
    let e = fetch_usage(&http, &base, &credentials(), [SIM_B], range, false).await.unwrap_err();
    assert_eq!(e.to_string(), format!("usage of SIM {SIM_B}: 1nce answered status 404: (empty answer)"));
}

fn record(seq: u32, iccid: u64, up: u64, at_s: u64) -> NewRecord {
    let r = ReportBuilder::new(1, seq, iccid, network_time(at_s)).used(up, up / 2);
    common::new_record(&r, &[1u8; 32], at_s * 1000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_fetch_through_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    write_secret(&token_file, &TOKEN).unwrap();
    let endpoint =
        Endpoint::connect(&CloudConfig::new(dir.path().join("data"), token_file.clone())).await.unwrap();
    common::insert(
        endpoint.store(),
        vec![
            record(0, SIM_A, 300_000, unix_s("2026-01-10T12:00:00Z")),
            record(1, SIM_A, 900_000, unix_s("2026-01-11T12:00:00Z")),
        ],
    )
    .await;
    let server = common::serve(endpoint).await;
    let device = client::usage_days(
        &reqwest::Client::new(),
        &server.base,
        &hex::encode(TOKEN),
        "UTC",
        None,
        DateRange::default(),
    )
    .await
    .unwrap();
    // The carrier agrees with the device on SIM A and has a SIM B the device never reported.
    let mut account: BTreeMap<u64, BTreeMap<time::Date, u64>> = BTreeMap::new();
    for d in &device.days {
        account.entry(d.iccid).or_default().insert(d.date, d.total_bytes);
    }
    assert_eq!(account[&SIM_A].len(), 2);
    account.insert(SIM_B, BTreeMap::from([(date!(2026 - 01 - 11), 4096)]));
    let (base, state) = stand_in(account).await;
    let creds = dir.path().join("1nce.toml");
    std::fs::write(&creds, format!("client_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\n"))
        .unwrap();

    let (endpoint_base, token_path, creds_path) =
        (server.base.clone(), token_file.to_str().unwrap().to_owned(), creds.to_str().unwrap().to_owned());
    let run = move |extra: &'static [&'static str]| {
        let mut args = vec![
            "reconcile",
            "--endpoint",
            &endpoint_base,
            "--token-file",
            &token_path,
            "--provider",
            "exact",
            "--from",
            "2026-01-10",
            "--to",
            "2026-01-11",
            "--fetch",
            "--fetch-credentials",
            &creds_path,
            "--fetch-base-url",
            &base,
        ];
        args.extend_from_slice(extra);
        common::cloud_exe().run(&args).unwrap()
    };
    let (run2, run3) = (run.clone(), run.clone());
    let out = tokio::task::spawn_blocking(move || run(&["--fetch-all-sims"])).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["summary"]["matched"], 2, "{r:#}");
    assert_eq!(r["summary"]["missing_device"], 1, "{r:#}");
    let log = state.lock().unwrap().log.clone();
    assert!(!log.iter().any(|l| l.contains(CLIENT_SECRET)));

    // Without the listing only the endpoint's SIMs are fetched.
    let out = tokio::task::spawn_blocking(move || run3(&[])).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (r["summary"]["matched"].as_u64(), r["summary"]["missing_device"].as_u64()),
        (Some(2), Some(0))
    );
    // 1NCE's days are UTC days: another zone is refused.
    let out = tokio::task::spawn_blocking(move || run2(&["--tz", "Europe/Berlin"])).await.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tz UTC"), "{err}");
    server.stop().await;
}

/// A Super SIM UsageRecords page (the published `readDayGroupBySim` shape, twilio/twilio-oai
/// `spec/yaml/twilio_supersim_v1.yaml`, commit d50069b44ea8cd23141385bdb6db48f16ff75bb5).
fn twilio_usage(records: &[(&str, &str, u64)]) -> String {
    let rows: Vec<Value> = records
        .iter()
        .map(|(sid, day, total)| {
            let next = countersign_cloud::text::parse_date(day).unwrap().next_day().unwrap();
            json!({"period": {"start_time": format!("{day}T00:00:00Z"), "end_time": format!("{}T00:00:00Z", format_date(next))},
                "account_sid": "ACaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "data_upload": total / 4, "data_download": total - total / 4,
                "data_total": total, "data_total_billed": "0.03", "billed_unit": "USD", "sim_sid": sid,
                "fleet_sid": null, "network_sid": null, "iso_country": null})
        })
        .collect();
    json!({"usage_records": rows, "meta": {"key": "usage_records", "page": 0, "page_size": 50, "next_page_url": null}})
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_twilio_supersim_files_through_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    write_secret(&token_file, &TOKEN).unwrap();
    let endpoint =
        Endpoint::connect(&CloudConfig::new(dir.path().join("data"), token_file.clone())).await.unwrap();
    common::insert(endpoint.store(), vec![record(0, SIM_A, 300_000, unix_s("2026-01-10T12:00:00Z"))]).await;
    let server = common::serve(endpoint).await;
    let device = client::usage_days(
        &reqwest::Client::new(),
        &server.base,
        &hex::encode(TOKEN),
        "UTC",
        None,
        DateRange::default(),
    )
    .await
    .unwrap();
    let total = device.days[0].total_bytes;
    let sid_a = "HSaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let sims = json!({"sims": [{"sid": sid_a, "iccid": format!("{SIM_A}{}", luhn(SIM_A)), "status": "active"}],
        "meta": {"key": "sims"}});
    let (sims_path, good, bad) =
        (dir.path().join("sims.json"), dir.path().join("usage.json"), dir.path().join("bad.json"));
    std::fs::write(&sims_path, sims.to_string()).unwrap();
    std::fs::write(&good, twilio_usage(&[(sid_a, "2026-01-10", total)])).unwrap();
    std::fs::write(
        &bad,
        twilio_usage(&[
            (sid_a, "2026-01-10", total),
            ("HS00000000000000000000000000000000", "2026-01-10", 1),
        ]),
    )
    .unwrap();
    let args = |usage: &std::path::Path| -> Vec<String> {
        [
            "reconcile",
            "--endpoint",
            &server.base,
            "--token-file",
            token_file.to_str().unwrap(),
            "--provider",
            "exact",
            "--tz",
            "UTC",
            "--carrier-twilio",
            usage.to_str().unwrap(),
            "--twilio-sims",
            sims_path.to_str().unwrap(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    };
    let (ok_args, bad_args) = (args(&good), args(&bad));
    let (ok, refused) = tokio::task::spawn_blocking(move || {
        let run = |a: &[String]| {
            common::cloud_exe().run(&a.iter().map(String::as_str).collect::<Vec<_>>()).unwrap()
        };
        (run(&ok_args), run(&bad_args))
    })
    .await
    .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let r: Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(r["summary"]["matched"], 1, "{r:#}");
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("bad.json") && err.contains("row 2, sim_sid"), "{err}");
    server.stop().await;
}
