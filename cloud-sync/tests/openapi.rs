//! The server against its contract, `cloud-sync/openapi.yaml`: the routes served are exactly
//! the operations documented, and every JSON answer of a real run (successes and refusals,
//! including 401, 403, 404, 413 and 429) has a documented status and validates against the
//! documented schema. Also checks operator token roles and the per-gateway rate limit.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use countersign_cloud::auth::Role;
use countersign_cloud::client;
use countersign_cloud::text::parse_date;
use countersign_cloud::{CloudConfig, Endpoint};
use countersign_protocol::batch::BATCH_BYTES_MAX;
use countersign_protocol::keys::write_secret;
use countersign_testkit::{gateway_key, network_time, signed_batch_at, ReportBuilder};
use ed25519_dalek::SigningKey;
use serde_json::Value;

mod common;

const SPEC: &str = include_str!("../openapi.yaml");
const TOKEN: [u8; 32] = [0x5a; 32];
const NOON_S: u64 = 1_795_521_600;
const PLANS: &str = r#"
[[plan]]
id = "field-example"
currency = "USD"
unit = "GB"
model = "graduated"
tiers = [{ up_to = 100, price = "0.10" }, { up_to = 500, price = "0.08" }, { price = "0.06" }]
flat_fee = "1.50"
included_bytes = 100
rounding_increment_bytes = 1024

[[assign]]
customer = "acme"
group = "fleet"
plan = "field-example"
iccids = ["8988280666000000001"]

[[wallet]]
customer = "acme"
currency = "USD"
opening_credit = "10"
alert_thresholds = ["9"]
"#;

fn spec() -> Value {
    serde_yaml::from_str(SPEC).unwrap()
}

fn spec_routes(spec: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            out.insert((method.clone(), path.clone()));
        }
    }
    out
}

fn resolve<'a>(spec: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let mut v = spec;
            for part in r.trim_start_matches("#/").split('/') {
                v = &v[part];
            }
            assert!(!v.is_null(), "dangling $ref {r}");
            resolve(spec, v)
        }
        None => schema,
    }
}

/// Matches the only pattern shape the spec uses: `^[class]{n}$` or `^[class]{m,n}$`.
fn pattern_matches(pattern: &str, s: &str) -> bool {
    let inner = pattern.strip_prefix("^[").and_then(|p| p.strip_suffix('$')).expect("supported pattern");
    let (class, count) = inner.split_once("]{").expect("supported pattern");
    let count = count.strip_suffix('}').expect("supported pattern");
    let (min, max) = match count.split_once(',') {
        Some((a, b)) => (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()),
        None => (count.parse().unwrap(), count.parse().unwrap()),
    };
    let class: Vec<char> = class.chars().collect();
    let in_class = |c: char| {
        let mut i = 0;
        while i < class.len() {
            if i + 2 < class.len() && class[i + 1] == '-' {
                if (class[i]..=class[i + 2]).contains(&c) {
                    return true;
                }
                i += 3;
            } else {
                if class[i] == c {
                    return true;
                }
                i += 1;
            }
        }
        false
    };
    let n = s.chars().count();
    (min..=max).contains(&n) && s.chars().all(in_class)
}

/// Validates `v` against an OpenAPI 3.0 schema (the subset the spec uses). Errors name the
/// JSON path.
fn validate(spec: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(spec, schema);
    if v.is_null() {
        return if schema["nullable"] == Value::Bool(true) { Ok(()) } else { Err(format!("{at}: null")) };
    }
    if let Some(options) = schema.get("oneOf").and_then(Value::as_array) {
        let ok = options.iter().filter(|o| validate(spec, o, v, at).is_ok()).count();
        return if ok == 1 { Ok(()) } else { Err(format!("{at}: matches {ok} of oneOf, not 1: {v}")) };
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(v) {
            return Err(format!("{at}: {v} not in {allowed:?}"));
        }
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let obj = v.as_object().ok_or(format!("{at}: not an object"))?;
            for r in schema["required"].as_array().into_iter().flatten() {
                let r = r.as_str().unwrap();
                if !obj.contains_key(r) {
                    return Err(format!("{at}: missing {r}"));
                }
            }
            let props = schema["properties"].as_object();
            for (k, val) in obj {
                match props.and_then(|p| p.get(k)) {
                    Some(s) => validate(spec, s, val, &format!("{at}.{k}"))?,
                    None if schema["additionalProperties"] == Value::Bool(false) => {
                        return Err(format!("{at}: undocumented property {k}"))
                    }
                    None => {}
                }
            }
        }
        Some("boolean") if !v.is_boolean() => return Err(format!("{at}: not a boolean")),
        Some("boolean") => {}
        Some("array") => {
            let items = v.as_array().ok_or(format!("{at}: not an array"))?;
            for (i, item) in items.iter().enumerate() {
                validate(spec, &schema["items"], item, &format!("{at}[{i}]"))?;
            }
        }
        Some("string") => {
            let s = v.as_str().ok_or(format!("{at}: not a string"))?;
            if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
                if !pattern_matches(p, s) {
                    return Err(format!("{at}: '{s}' does not match {p}"));
                }
            }
            if schema["format"] == "date" && parse_date(s).is_none() {
                return Err(format!("{at}: '{s}' is not a date"));
            }
        }
        Some("integer") => {
            let n = v
                .as_i64()
                .map(i128::from)
                .or(v.as_u64().map(i128::from))
                .ok_or(format!("{at}: not an integer"))?;
            if let Some(min) = schema.get("minimum").and_then(Value::as_i64) {
                if n < i128::from(min) {
                    return Err(format!("{at}: {n} < {min}"));
                }
            }
        }
        Some(other) => panic!("schema type {other} not supported by this checker"),
        None => {}
    }
    Ok(())
}

#[test]
fn the_checker_can_fail() {
    let spec = spec();
    let reply = &spec["components"]["schemas"]["SimUsage"];
    let good = serde_json::json!({"iccid": "8988", "from": null, "to": "2026-11-24", "days": [],
        "up_bytes": 1, "down_bytes": 2, "total_bytes": 3});
    validate(&spec, reply, &good, "$").unwrap();
    for (field, bad) in [
        ("iccid", serde_json::json!(8988)),
        ("iccid", serde_json::json!("89a")),
        ("to", serde_json::json!("2026-13-01")),
        ("up_bytes", serde_json::json!(-1)),
        ("extra", serde_json::json!(1)),
    ] {
        let mut v = good.clone();
        v[field] = bad;
        assert!(validate(&spec, reply, &v, "$").is_err(), "{field}");
    }
    let outcome = &spec["components"]["schemas"]["RecordOutcome"];
    validate(&spec, outcome, &serde_json::json!({"status": "stored"}), "$").unwrap();
    assert!(validate(&spec, outcome, &serde_json::json!({"status": "rejected"}), "$").is_err());
}

#[test]
fn every_route_is_documented_and_every_operation_served() {
    let dir = tempfile::tempdir().unwrap();
    let config = CloudConfig::new(dir.path().join("data"), dir.path().join("t"));
    let endpoint = Endpoint::with_store(
        countersign_cloud::Store::open(config.data_dir(), 1 << 20).unwrap(),
        countersign_cloud::AdminToken::from_bytes(TOKEN),
    );
    let served: BTreeSet<(String, String)> =
        endpoint.route_table().iter().map(|r| (r.method.to_owned(), r.path.to_owned())).collect();
    assert_eq!(served, spec_routes(&spec()));
}

struct Checker {
    spec: Value,
    http: reqwest::Client,
    base: String,
    seen: BTreeSet<(String, String, u16)>,
}

impl Checker {
    /// Sends a request for the operation `method template`, checks the status is documented
    /// and the JSON body validates; returns status and body.
    async fn call(
        &mut self,
        method: &str,
        template: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Body>,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let url = format!("{}{path}", self.base);
        let mut req = match method {
            "get" => self.http.get(&url),
            "post" => self.http.post(&url),
            "delete" => self.http.delete(&url),
            "put" => self.http.put(&url),
            other => panic!("{other}"),
        };
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req = match body {
            Some(Body::Json(v)) => req.json(&v),
            Some(Body::Bytes(b)) => req.body(b),
            None => req,
        };
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        let plain = headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/plain"));
        let value: Value = if text.is_empty() {
            Value::Null
        } else if plain {
            Value::String(text.clone())
        } else {
            serde_json::from_str(&text).unwrap()
        };
        let op = &self.spec["paths"][template][method];
        let schema = if op.is_null() {
            // Not an operation (404/405): still an ErrorBody.
            serde_json::json!({"$ref": "#/components/schemas/ErrorBody"})
        } else {
            let response = &op["responses"][status.to_string()];
            assert!(!response.is_null(), "{method} {template} answered undocumented {status}: {text}");
            let response = resolve(&self.spec, response);
            let content = &response["content"];
            match content["application/json"]["schema"].clone() {
                Value::Null if plain => {
                    assert!(
                        !content["text/plain"].is_null(),
                        "{method} {template} {status}: undocumented text"
                    );
                    content["text/plain"]["schema"].clone()
                }
                Value::Null => {
                    assert!(text.is_empty(), "{method} {template} {status}: undocumented body {text}");
                    Value::Null
                }
                s => s,
            }
        };
        if !schema.is_null() {
            if let Err(e) = validate(&self.spec, &schema, &value, "$") {
                panic!("{method} {path} {status}: {e}\n{text}");
            }
        }
        self.seen.insert((method.to_owned(), template.to_owned(), status));
        (status, value, headers)
    }
}

enum Body {
    Json(Value),
    Bytes(Vec<u8>),
}

/// Report `seq` of `meter_id` made at noon on the SIM the plans assign.
fn report(meter_id: u64, seq: u32, key: &[u8; 32]) -> Vec<u8> {
    ReportBuilder::new(meter_id, seq, 8_988_280_666_000_000_001, network_time(NOON_S))
        .used(100 * u64::from(seq), 10)
        .encode(key)
}

/// A batch of `gateway_id` formed and received at noon.
fn batch_at_noon(gateway_id: u64, seq: u64, reports: &[Vec<u8>], key: &SigningKey) -> Vec<u8> {
    signed_batch_at(key, gateway_id, seq, NOON_S * 1000, reports)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_of_a_real_run_validate_and_roles_and_rate_limits_hold() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    write_secret(&token_file, &TOKEN).unwrap();
    // A small bucket: 10 records, refilled at 1 record/s, so the third batch of 4 waits.
    let plans = dir.path().join("plans.toml");
    std::fs::write(&plans, PLANS).unwrap();
    let config = CloudConfig::from_toml_str(&format!(
        "data_dir = '{}'\nadmin_token_file = '{}'\n[rate_limit]\nrecords_per_second = 1\nburst_records = 10\n[billing]\nplans_file = '{}'\n",
        dir.path().join("data").display(),
        token_file.display(),
        plans.display()
    ))
    .unwrap();
    // The endpoint's clock at 2026-12-01T00:00:00Z: the reports below are inside its window
    // whenever the test runs.
    let endpoint = Endpoint::connect(&config)
        .await
        .unwrap()
        .with_clock(countersign_cloud::service::ingest::Clock::from_fn(|| 1_796_083_200_000));
    let server = common::serve(endpoint).await;
    let base = server.base.clone();
    let mut c =
        Checker { spec: spec(), http: reqwest::Client::new(), base: base.clone(), seen: BTreeSet::new() };
    let admin = hex::encode(TOKEN);
    let gw = gateway_key();
    let meter_key = [0xa1u8; 32];

    c.call("get", "/health", "/health", None, None).await;
    // Registration: 201, 200, 409, 400, 401.
    let meter = serde_json::json!({"meter_id": 10, "key_hex": hex::encode(meter_key)});
    let gateway =
        serde_json::json!({"gateway_id": 1, "public_key_hex": hex::encode(gw.verifying_key().as_bytes())});
    for (path, body) in [("/v1/admin/meters", &meter), ("/v1/admin/gateways", &gateway)] {
        assert_eq!(c.call("post", path, path, Some(&admin), Some(Body::Json(body.clone()))).await.0, 201);
        assert_eq!(c.call("post", path, path, Some(&admin), Some(Body::Json(body.clone()))).await.0, 200);
        assert_eq!(c.call("post", path, path, None, Some(Body::Json(body.clone()))).await.0, 401);
    }
    let rekey = serde_json::json!({"meter_id": 10, "key_hex": hex::encode([0xb2u8; 32])});
    assert_eq!(
        c.call("post", "/v1/admin/meters", "/v1/admin/meters", Some(&admin), Some(Body::Json(rekey))).await.0,
        409
    );
    let bad = serde_json::json!({"meter_id": 10});
    assert_eq!(
        c.call("post", "/v1/admin/meters", "/v1/admin/meters", Some(&admin), Some(Body::Json(bad))).await.0,
        400
    );

    // Tokens: a query token reads usage but may not register or manage tokens.
    let q_secret = [0x77u8; 32];
    client::create_token(&c.http, &base, &admin, "reader", Role::Query, &q_secret).await.unwrap();
    let a_secret = [0x78u8; 32];
    client::create_token(&c.http, &base, &admin, "ops", Role::Admin, &a_secret).await.unwrap();
    let query = hex::encode(q_secret);
    let ops = hex::encode(a_secret);
    let (s, v, _) = c.call("get", "/v1/admin/tokens", "/v1/admin/tokens", Some(&ops), None).await;
    assert_eq!(s, 200);
    assert_eq!(
        v,
        serde_json::json!({"tokens": [{"name": "ops", "role": "admin"}, {"name": "reader", "role": "query"}]})
    );
    assert_eq!(c.call("get", "/v1/admin/tokens", "/v1/admin/tokens", Some(&query), None).await.0, 403);
    let m2 = serde_json::json!({"meter_id": 11, "key_hex": hex::encode(meter_key)});
    assert_eq!(
        c.call("post", "/v1/admin/meters", "/v1/admin/meters", Some(&query), Some(Body::Json(m2.clone())))
            .await
            .0,
        403
    );
    assert_eq!(
        c.call("post", "/v1/admin/meters", "/v1/admin/meters", Some(&ops), Some(Body::Json(m2))).await.0,
        201
    );
    let dup_name =
        serde_json::json!({"name": "reader", "role": "admin", "token_sha256_hex": hex::encode([1u8; 32])});
    assert_eq!(
        c.call("post", "/v1/admin/tokens", "/v1/admin/tokens", Some(&admin), Some(Body::Json(dup_name)))
            .await
            .0,
        409
    );
    let bad_name =
        serde_json::json!({"name": "a b", "role": "query", "token_sha256_hex": hex::encode([1u8; 32])});
    assert_eq!(
        c.call("post", "/v1/admin/tokens", "/v1/admin/tokens", Some(&admin), Some(Body::Json(bad_name)))
            .await
            .0,
        400
    );
    let fresh =
        serde_json::json!({"name": "temp", "role": "query", "token_sha256_hex": hex::encode([2u8; 32])});
    assert_eq!(
        c.call("post", "/v1/admin/tokens", "/v1/admin/tokens", Some(&admin), Some(Body::Json(fresh.clone())))
            .await
            .0,
        201
    );
    assert_eq!(
        c.call("post", "/v1/admin/tokens", "/v1/admin/tokens", Some(&admin), Some(Body::Json(fresh))).await.0,
        200
    );
    let t = "/v1/admin/tokens/{name}";
    assert_eq!(c.call("delete", t, "/v1/admin/tokens/temp", Some(&admin), None).await.0, 204);
    assert_eq!(c.call("delete", t, "/v1/admin/tokens/temp", Some(&admin), None).await.0, 404);
    assert_eq!(c.call("delete", t, "/v1/admin/tokens/reader", Some(&query), None).await.0, 403);
    assert_eq!(c.call("delete", t, "/v1/admin/tokens/a%20b", Some(&admin), None).await.0, 400);

    // Batches: stored, then the rate limit (10-record bucket, batches of 4).
    let reports: Vec<Vec<u8>> = (0..12).map(|s| report(10, s, &meter_key)).collect();
    let mut with_reject = reports[0..4].to_vec();
    with_reject[3] = report(10, 3, &[0xee; 32]);
    let (s, v, _) = c
        .call(
            "post",
            "/v1/batches",
            "/v1/batches",
            None,
            Some(Body::Bytes(batch_at_noon(1, 1, &with_reject, &gw))),
        )
        .await;
    assert_eq!((s, v["results"][3]["reason"].as_str()), (200, Some("bad_tag")));
    let (s, _, _) = c
        .call(
            "post",
            "/v1/batches",
            "/v1/batches",
            None,
            Some(Body::Bytes(batch_at_noon(1, 2, &reports[4..8], &gw))),
        )
        .await;
    assert_eq!(s, 200);
    // 7 charged of 10 (the rejected record costs nothing): still in credit; this one takes
    // the bucket into debt.
    let (s, _, _) = c
        .call(
            "post",
            "/v1/batches",
            "/v1/batches",
            None,
            Some(Body::Bytes(batch_at_noon(1, 3, &reports[8..12], &gw))),
        )
        .await;
    assert_eq!(s, 200);
    let (s, v, h) = c
        .call(
            "post",
            "/v1/batches",
            "/v1/batches",
            None,
            Some(Body::Bytes(batch_at_noon(1, 4, &reports[8..12], &gw))),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (429, Some("rate_limited")));
    let retry: u64 = h.get("retry-after").unwrap().to_str().unwrap().parse().unwrap();
    assert!((1..=3).contains(&retry), "{retry}");
    // A forged batch naming the limited gateway is refused for its limit, not charged; a
    // forged batch naming another gateway is refused for its signature.
    let (s, v, _) = c
        .call(
            "post",
            "/v1/batches",
            "/v1/batches",
            None,
            Some(Body::Bytes(batch_at_noon(2, 1, &reports[..1], &gw))),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (401, Some("unknown_gateway")));
    let (s, v, _) =
        c.call("post", "/v1/batches", "/v1/batches", None, Some(Body::Bytes(vec![7u8; 100]))).await;
    assert_eq!((s, v["code"].as_str()), (400, Some("malformed_batch")));
    let (s, v, _) = c
        .call("post", "/v1/batches", "/v1/batches", None, Some(Body::Bytes(vec![1u8; BATCH_BYTES_MAX + 1])))
        .await;
    assert_eq!((s, v["code"].as_str()), (413, Some("batch_too_large")));

    // Usage with each role; refusals.
    for tok in [&query, &ops, &admin] {
        let path = "/v1/usage?iccid=8988280666000000001&from=2026-11-24";
        let (s, v, _) = c.call("get", "/v1/usage", path, Some(tok), None).await;
        assert_eq!((s, v["up_bytes"].as_u64()), (200, Some(1100)));
        assert_eq!(c.call("get", "/v1/usage/sims", "/v1/usage/sims", Some(tok), None).await.0, 200);
    }
    // Days in a time zone, settlement and the ledger (embedded store).
    let (s, v, _) =
        c.call("get", "/v1/usage/days", "/v1/usage/days?tz=Europe/Berlin", Some(&query), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        c.call("get", "/v1/usage/days", "/v1/usage/days?tz=Mars/Base", Some(&query), None).await.0,
        400
    );
    let settle = serde_json::json!({"tz": "Europe/Berlin", "settlement_hours": 0});
    let p = "/v1/admin/settle";
    assert_eq!(c.call("post", p, p, Some(&query), Some(Body::Json(settle.clone()))).await.0, 403);
    let (s, v, _) = c.call("post", p, p, Some(&admin), Some(Body::Json(settle))).await;
    assert_eq!(s, 200, "{v}");
    let (s, v, _) = c.call("get", "/v1/usage/ledger", "/v1/usage/ledger", Some(&query), None).await;
    assert_eq!(s, 200, "{v}");
    let fp = "/v1/admin/faults";
    assert_eq!(c.call("get", fp, fp, Some(&query), None).await.0, 403);
    let (s, v, _) = c.call("get", fp, fp, Some(&admin), None).await;
    assert_eq!((s, v["underivable"].as_array().map(Vec::len)), (200, Some(0)), "{v}");
    // Billing: charges, a run (debits and an alert), wallets, top-ups, a forecast.
    let ch = "/v1/billing/charges";
    let (s, v, _) = c.call("get", ch, "/v1/billing/charges?period=2026-11-24", Some(&query), None).await;
    assert_eq!((s, v["charges"][0]["total"].as_str()), (200, Some("1.500000")), "{v}");
    assert_eq!(v["charges"][0]["rounding"]["rounded_bytes"], 2048, "{v}");
    let (s, v, _) = c
        .call(
            "get",
            ch,
            "/v1/billing/charges?customer=acme&from=2026-11-01&to=2026-11-30",
            Some(&query),
            None,
        )
        .await;
    assert_eq!((s, v["totals"][0]["total_micros"].as_u64()), (200, Some(1_500_000)), "{v}");
    assert_eq!(c.call("get", ch, "/v1/billing/charges?from=2026-11-01", Some(&query), None).await.0, 400);
    assert_eq!(c.call("get", ch, "/v1/billing/charges?customer=nobody", Some(&query), None).await.0, 404);
    let run = "/v1/admin/billing/run";
    assert_eq!(c.call("post", run, run, Some(&query), None).await.0, 403);
    let (s, v, _) = c.call("post", run, run, Some(&admin), None).await;
    assert_eq!(s, 200, "{v}");
    // The $1.50 flat fee of every period from November on takes the balance below 9.
    assert_eq!(v["wallets"][0]["alerts"][0]["alert"], "threshold_crossed", "{v}");
    let w = "/v1/billing/wallets";
    let (s, v, _) = c.call("get", w, w, Some(&query), None).await;
    assert_eq!((s, v["wallets"][0]["alerts"].as_array().map(Vec::len)), (200, Some(1)), "{v}");
    assert_eq!(c.call("get", w, "/v1/billing/wallets?customer=nobody", Some(&query), None).await.0, 404);
    let t = "/v1/admin/wallets/{customer}/topups";
    let topup = serde_json::json!({"topup_id": "pay-1", "amount": "5.00"});
    let tp = "/v1/admin/wallets/acme/topups";
    assert_eq!(c.call("post", t, tp, Some(&admin), Some(Body::Json(topup.clone()))).await.0, 201);
    assert_eq!(c.call("post", t, tp, Some(&admin), Some(Body::Json(topup.clone()))).await.0, 200);
    assert_eq!(c.call("post", t, tp, Some(&query), Some(Body::Json(topup.clone()))).await.0, 403);
    let other = serde_json::json!({"topup_id": "pay-1", "amount": "6"});
    assert_eq!(c.call("post", t, tp, Some(&admin), Some(Body::Json(other))).await.0, 409);
    let bad = serde_json::json!({"topup_id": "pay 2", "amount": "6"});
    assert_eq!(c.call("post", t, tp, Some(&admin), Some(Body::Json(bad))).await.0, 400);
    let nobody = "/v1/admin/wallets/nobody/topups";
    assert_eq!(c.call("post", t, nobody, Some(&admin), Some(Body::Json(topup))).await.0, 404);
    let f = "/v1/billing/forecast";
    let (s, v, _) = c
        .call(
            "get",
            f,
            "/v1/billing/forecast?iccid=8988280666000000001&quota_bytes=524288000&as_of=2026-11-24",
            Some(&query),
            None,
        )
        .await;
    assert_eq!(
        (s, v["quota_source"].as_str(), v["used_bytes"].as_u64()),
        (200, Some("parameter"), Some(1110)),
        "{v}"
    );
    assert_eq!(
        c.call("get", f, "/v1/billing/forecast?iccid=8988280666000000001", Some(&query), None).await.0,
        400
    );
    assert_eq!(c.call("get", f, "/v1/billing/forecast", Some(&query), None).await.0, 400);
    assert_eq!(c.call("get", "/v1/usage", "/v1/usage?iccid=x", Some(&query), None).await.0, 400);
    assert_eq!(c.call("get", "/v1/usage/sims", "/v1/usage/sims?to=x", Some(&query), None).await.0, 400);
    assert_eq!(
        c.call("get", "/v1/usage", "/v1/usage?iccid=1", Some(&hex::encode([3u8; 32])), None).await.0,
        401
    );
    assert_eq!(c.call("get", "/v1/usage/sims", "/v1/usage/sims", Some("nothex"), None).await.0, 401);
    let (s, v, _) = c.call("get", "/metrics", "/metrics", Some(&query), None).await;
    assert_eq!(s, 200);
    assert!(v.as_str().unwrap().contains("\ncountersign_batches_total{status=\"200\"} "), "{v}");
    assert_eq!(c.call("get", "/metrics", "/metrics", None, None).await.0, 401);
    // Revoked tokens stop working at once.
    client::revoke_token(&c.http, &base, &admin, "reader").await.unwrap();
    assert_eq!(c.call("get", "/v1/usage/sims", "/v1/usage/sims", Some(&query), None).await.0, 401);
    // Not operations: 404 and 405, still with an ErrorBody.
    assert_eq!(c.call("get", "/v2", "/v2/nothing", None, None).await.0, 404);
    assert_eq!(c.call("put", "/health", "/health", None, None).await.0, 405);

    // Every operation was seen answering successfully at least once.
    for (method, path) in spec_routes(&c.spec) {
        assert!(
            c.seen.iter().any(|(m, p, s)| *m == method && *p == path && (200..300).contains(s)),
            "{method} {path} never answered 2xx in this run"
        );
    }
    server.stop().await;
}
