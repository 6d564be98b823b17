//! The server against its contract, `cloud-sync/openapi.yaml`: the routes served are exactly
//! the operations documented, and every JSON answer of a real run (successes and refusals,
//! including 401, 403, 404, 413 and 429) has a documented status and validates against the
//! documented schema. Also checks operator token roles and the per-gateway rate limit.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use countersign_cloud::auth::Role;
use countersign_cloud::client;
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

/// Resolves a `$ref` to a Response Object (`#/components/responses/…`): an OpenAPI
/// structure, not a JSON Schema one. Schemas are resolved by the JSON Schema library.
fn resolve<'a>(spec: &'a Value, object: &'a Value) -> &'a Value {
    match object.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let mut v = spec;
            for part in r.trim_start_matches("#/").split('/') {
                v = &v[part];
            }
            assert!(!v.is_null(), "dangling $ref {r}");
            resolve(spec, v)
        }
        None => object,
    }
}

/// Which JSON Schema dialect the file's Schema Objects are written in, from its `openapi`
/// field: 3.0.x is an extended subset of JSON Schema Wright draft 00 (draft 4's keywords,
/// plus OpenAPI's `nullable`), 3.1.x is JSON Schema 2020-12 itself.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Dialect {
    Oas30,
    Oas31,
}

fn dialect(spec: &Value) -> Dialect {
    match spec["openapi"].as_str() {
        Some(v) if v.starts_with("3.0.") => Dialect::Oas30,
        Some(v) if v.starts_with("3.1.") => Dialect::Oas31,
        other => panic!("openapi version {other:?} not handled"),
    }
}

/// Keywords of the OpenAPI 3.0 Schema Object that are not JSON Schema (annotations or
/// OpenAPI's own); `nullable` is translated, the rest constrain nothing.
const OAS30_ONLY: [&str; 8] =
    ["nullable", "discriminator", "readOnly", "writeOnly", "xml", "externalDocs", "example", "deprecated"];

/// An OpenAPI 3.0 Schema Object as a JSON Schema draft 4 schema. `$ref` stays as written
/// (it points into the same document, see `Contract::validate`) and, as OpenAPI 3.0 says,
/// its siblings are ignored. `nullable: true` adds `"null"` to the types given by `type`
/// in the same object, and only then (OpenAPI 3.0.3, Schema Object, `nullable`); an `enum`
/// must still list `null` to allow it.
fn oas30_to_draft4(schema: &Value) -> Value {
    let Some(obj) = schema.as_object() else { return schema.clone() };
    if let Some(r) = obj.get("$ref") {
        return serde_json::json!({ "$ref": r });
    }
    let mut out = serde_json::Map::new();
    for (k, v) in obj {
        if OAS30_ONLY.contains(&k.as_str()) {
            continue;
        }
        let v = match k.as_str() {
            "properties" | "patternProperties" => Value::Object(
                v.as_object()
                    .expect("properties is a map")
                    .iter()
                    .map(|(name, s)| (name.clone(), oas30_to_draft4(s)))
                    .collect(),
            ),
            "items" | "additionalProperties" | "not" => oas30_to_draft4(v),
            "allOf" | "anyOf" | "oneOf" => {
                Value::Array(v.as_array().expect("a list of schemas").iter().map(oas30_to_draft4).collect())
            }
            _ => v.clone(),
        };
        out.insert(k.clone(), v);
    }
    if obj.get("nullable") == Some(&Value::Bool(true)) {
        if let Some(t) = out.get("type").cloned() {
            let mut types = match t {
                Value::Array(a) => a,
                t => vec![t],
            };
            types.push(Value::from("null"));
            out.insert("type".into(), Value::Array(types));
        }
    }
    Value::Object(out)
}

/// The contract's schemas, checked by a JSON Schema library (`jsonschema`), not by hand.
struct Contract {
    dialect: Dialect,
    /// `components.schemas` in the library's dialect, under the same pointer as in the file,
    /// so every `$ref: "#/components/schemas/…"` resolves in the document built around it.
    schemas: Value,
}

impl Contract {
    fn new(spec: &Value) -> Contract {
        let dialect = dialect(spec);
        let raw = spec["components"]["schemas"].as_object().expect("components.schemas");
        let schemas = match dialect {
            Dialect::Oas30 => raw.iter().map(|(k, s)| (k.clone(), oas30_to_draft4(s))).collect(),
            Dialect::Oas31 => raw.clone(),
        };
        Contract { dialect, schemas: Value::Object(schemas) }
    }

    /// Every way `v` deviates from `schema` (a Schema Object of the file), by JSON path.
    fn validate(&self, schema: &Value, v: &Value) -> Result<(), String> {
        let (root, draft) = match self.dialect {
            Dialect::Oas30 => (oas30_to_draft4(schema), jsonschema::Draft::Draft4),
            Dialect::Oas31 => (schema.clone(), jsonschema::Draft::Draft202012),
        };
        let doc = serde_json::json!({ "allOf": [root], "components": { "schemas": self.schemas } });
        let validator = jsonschema::options()
            .with_draft(draft)
            .should_validate_formats(true)
            .build(&doc)
            .map_err(|e| format!("schema does not compile: {e}"))?;
        let errors: Vec<String> =
            validator.iter_errors(v).map(|e| format!("${}: {e}", e.instance_path())).collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

#[test]
fn the_file_is_openapi_3_0_and_its_schemas_compile() {
    let spec = spec();
    assert_eq!(dialect(&spec), Dialect::Oas30, "openapi: {}", spec["openapi"]);
    let contract = Contract::new(&spec);
    for name in spec["components"]["schemas"].as_object().unwrap().keys() {
        let r = serde_json::json!({ "$ref": format!("#/components/schemas/{name}") });
        // Compiles (every $ref resolves); whether `null` passes is the schema's business.
        if let Err(e) = contract.validate(&r, &Value::Null) {
            assert!(!e.starts_with("schema does not compile"), "{name}: {e}");
        }
    }
}

#[test]
fn the_checker_can_fail() {
    let spec = spec();
    let c = Contract::new(&spec);
    let reply = serde_json::json!({ "$ref": "#/components/schemas/SimUsage" });
    let good = serde_json::json!({"iccid": "8988", "from": null, "to": "2026-11-24", "days": [],
        "up_bytes": 1, "down_bytes": 2, "total_bytes": 3});
    c.validate(&reply, &good).unwrap();
    for (field, bad) in [
        ("iccid", serde_json::json!(8988)),
        ("iccid", serde_json::json!("89a")),
        ("iccid", serde_json::json!("898828066600000000012")),
        ("iccid", Value::Null),
        ("to", serde_json::json!("2026-13-01")),
        ("to", serde_json::json!(20261124)),
        ("up_bytes", serde_json::json!(-1)),
        ("up_bytes", serde_json::json!(1.5)),
        ("days", serde_json::json!([{"date": "2026-11-24", "up_bytes": 1, "down_bytes": 1}])),
        ("extra", serde_json::json!(1)),
    ] {
        let mut v = good.clone();
        v[field] = bad.clone();
        let e = c.validate(&reply, &v).expect_err(&format!("{field} = {bad} passed"));
        assert!(e.contains('$'), "{e}");
    }
    let mut v = good.clone();
    v.as_object_mut().unwrap().remove("from");
    assert!(c.validate(&reply, &v).is_err(), "a required nullable property left out");
    let outcome = serde_json::json!({ "$ref": "#/components/schemas/RecordOutcome" });
    c.validate(&outcome, &serde_json::json!({"status": "stored"})).unwrap();
    c.validate(&outcome, &serde_json::json!({"status": "rejected", "reason": "bad_tag", "detail": "x"}))
        .unwrap();
    assert!(c.validate(&outcome, &serde_json::json!({"status": "rejected"})).is_err());
    assert!(c.validate(&outcome, &serde_json::json!({"status": "stored", "reason": "bad_tag"})).is_err());
    // A deviation two $refs deep: SimsUsage → UnderivableSims → Iccid / code.
    let sims = serde_json::json!({ "$ref": "#/components/schemas/SimsUsage" });
    let fault = serde_json::json!({"iccid": "1", "record": "1-0-2", "code": "overflow", "reason": "r"});
    let good = serde_json::json!({"from": null, "to": null, "sims": [], "up_bytes": 0,
        "down_bytes": 0, "total_bytes": 0, "underivable": [fault], "next_after": null});
    c.validate(&sims, &good).unwrap();
    let mut bad = good.clone();
    bad["underivable"][0]["code"] = "melted".into();
    let e = c.validate(&sims, &bad).unwrap_err();
    assert!(e.contains("/underivable/0/code"), "{e}");
    // nullable without null in the types: an integer or null, nothing else.
    let alert = serde_json::json!({ "$ref": "#/components/schemas/Alert" });
    let a = serde_json::json!({"seq": 1, "alert": "overdrawn", "threshold_micros": null,
        "overdraft_limit_micros": 5, "balance_micros": -1, "raised_at_s": 0});
    c.validate(&alert, &a).unwrap();
    let mut b = a.clone();
    b["threshold_micros"] = "5".into();
    assert!(c.validate(&alert, &b).is_err());
    // The error body every refusal carries.
    let err = serde_json::json!({ "$ref": "#/components/schemas/ErrorBody" });
    c.validate(&err, &serde_json::json!({"code": "not_found", "error": "no such route"})).unwrap();
    assert!(c.validate(&err, &serde_json::json!({"code": "not_found"})).is_err());
    assert!(c.validate(&err, &serde_json::json!({"code": "x", "error": "y", "for people.": null})).is_err());
}

#[test]
fn every_lago_export_state_is_a_documented_health_answer() {
    use countersign_cloud::service::lago::{LagoStatus, MetricCheck, MetricMismatch};
    use countersign_cloud::wire::ops::{HealthReply, HEALTH_DEGRADED, HEALTH_OK};
    let spec = spec();
    let c = Contract::new(&spec);
    let health = serde_json::json!({ "$ref": "#/components/schemas/HealthReply" });
    let check = |status: &LagoStatus| {
        let lago = status.snapshot().health();
        let reply = HealthReply {
            status: if lago.state.degraded() { HEALTH_DEGRADED } else { HEALTH_OK }.into(),
            lago: Some(lago),
        };
        let v = serde_json::to_value(&reply).unwrap();
        c.validate(&health, &v).unwrap_or_else(|e| panic!("{e}: {v}"));
    };
    c.validate(&health, &serde_json::json!({"status": "ok"})).unwrap();
    let s = LagoStatus::new("data_bytes", 100);
    check(&s);
    s.update(|s| s.metric_checked(&MetricCheck::Unavailable, None, 5));
    check(&s);
    let gone = MetricCheck::Mismatch(MetricMismatch::NotFound { code: "data_bytes".into() });
    s.update(|s| s.metric_checked(&gone, None, 6));
    check(&s);
    s.update(|s| s.metric_checked(&MetricCheck::Ok, None, 7));
    s.update(|s| s.round_done(true));
    check(&s);
    s.update(|s| {
        s.call_failed(100);
        s.call_failed(100_000)
    });
    assert_eq!(s.snapshot().state(), countersign_cloud::wire::ops::LagoState::Unavailable);
    check(&s);
    assert!(c.validate(&health, &serde_json::json!({"status": "broken"})).is_err());
}

#[test]
fn nullable_follows_openapi_3_0() {
    let s = serde_json::json!({"type": "object", "additionalProperties": false,
        "properties": {"a": {"type": "string", "nullable": true, "format": "date"},
                       "b": {"type": "string", "enum": ["x"], "nullable": true},
                       "c": {"nullable": true, "$ref": "#/components/schemas/Date"},
                       "d": {"type": "integer"}}});
    let c = Contract::new(&spec());
    c.validate(&s, &serde_json::json!({"a": null, "d": 1})).unwrap();
    c.validate(&s, &serde_json::json!({"a": "2026-01-31", "b": "x"})).unwrap();
    for bad in [
        serde_json::json!({"a": "2026-02-30"}),
        // An enum must list null itself (OpenAPI 3.0.3).
        serde_json::json!({"b": null}),
        // Siblings of $ref are ignored: not nullable.
        serde_json::json!({"c": null}),
        serde_json::json!({"d": null}),
    ] {
        assert!(c.validate(&s, &bad).is_err(), "{bad}");
    }
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
    contract: Contract,
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
            if let Err(e) = self.contract.validate(&schema, &value) {
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
    // A Lago export stopped by a refusal: /health answers with every field of its part set.
    let lago = std::sync::Arc::new(countersign_cloud::service::lago::LagoStatus::new("data_bytes", 100));
    lago.update(|s| {
        s.backlog(3);
        s.stop("too_many_events", "lago refused the batch".into(), "lower [lago] events_per_call".into(), 1)
    });
    let endpoint = endpoint.with_lago_status(lago);
    let server = common::serve(endpoint).await;
    let base = server.base.clone();
    let spec = spec();
    let mut c = Checker {
        contract: Contract::new(&spec),
        spec,
        http: reqwest::Client::new(),
        base: base.clone(),
        seen: BTreeSet::new(),
    };
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
    // The same SIM by its 20-digit ICCID (Luhn check digit 0 appended): checked, dropped.
    let (s, v, _) = c
        .call("get", "/v1/usage", "/v1/usage?iccid=89882806660000000010&from=2026-11-24", Some(&query), None)
        .await;
    assert_eq!(
        (s, v["iccid"].as_str(), v["up_bytes"].as_u64()),
        (200, Some("8988280666000000001"), Some(1100))
    );
    let (s, v, _) =
        c.call("get", "/v1/usage", "/v1/usage?iccid=89882806660000000013", Some(&query), None).await;
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("Luhn"), "{v}");
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
