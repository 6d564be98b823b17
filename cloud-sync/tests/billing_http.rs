//! Billing over real HTTP with real signed batches: the worked example ($0.10/GB to 100 GB,
//! $0.08/GB to 500 GB, $0.06/GB beyond: 600 GB in a month is $48.000000) from reports that
//! went through `POST /v1/batches`; a prepaid wallet billed repeatedly as usage grows and
//! across an endpoint restart; top-ups; the quota forecast; and the CLI over the same server.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use countersign_cloud::client::{self, ClientError};
use countersign_cloud::service::billing::Billing;
use countersign_cloud::wire::billing::{ChargesQuery, ForecastQuery, TopupStatus};
use countersign_cloud::{CloudConfig, Endpoint};
use countersign_protocol::keys::write_secret;
use countersign_protocol::BatchReply;
use countersign_testkit::endpoint::EndpointProcess;
use countersign_testkit::{gateway_key, network_time, signed_batch, unix_s, ReportBuilder};
use ed25519_dalek::SigningKey;
use time::macros::date;

mod common;
use common::{cloud_exe, serve};

const TOKEN: [u8; 32] = [0x5a; 32];
const METER_KEY: [u8; 32] = [0xa1; 32];
const SIM: &str = "8988280666000000042";
const GB: u64 = 1_000_000_000;

const PLANS: &str = r#"
time_zone = "Europe/Berlin"

[[plan]]
id = "field-example"
currency = "USD"
unit = "GB"
model = "graduated"
tiers = [{ up_to = 100, price = "0.10" }, { up_to = 500, price = "0.08" }, { price = "0.06" }]
rounding_increment_bytes = 1024
rounding_scope = "sim_day"
lifetime_quota_bytes = 2000000000000
lifetime_years = 1

[[assign]]
customer = "acme"
group = "berlin-meters"
plan = "field-example"
iccids = ["8988280666000000042"]
active_since = "2026-11-01"

[[wallet]]
customer = "acme"
currency = "USD"
opening_credit = "100.00"
alert_thresholds = ["60", "20"]
overdraft_limit = "10"
"#;

/// A signed batch of gateway 7 with reports of meter 42 (epoch 0): (seq, bytes used in the
/// epoch so far, device network time), each received when made.
fn usage_batch(gw: &SigningKey, batch_seq: u64, reports: &[(u32, u64, &str)]) -> Vec<u8> {
    let mut encoded = Vec::new();
    for (seq, used, at) in reports {
        let r = ReportBuilder::new(42, *seq, SIM.parse().unwrap(), network_time(unix_s(at)))
            // Two thirds down, one third up: the plan prices both directions.
            .used(used / 3, used - used / 3);
        encoded.push((unix_s(at) * 1000, r.encode(&METER_KEY)));
    }
    signed_batch(gw, 7, batch_seq, encoded[0].0, &encoded)
}

async fn send(http: &reqwest::Client, base: &str, body: Vec<u8>) {
    let r = http.post(format!("{base}/v1/batches")).body(body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let reply: BatchReply = r.json().await.unwrap();
    let text = serde_json::to_string(&reply).unwrap();
    assert!(!text.contains("rejected"), "{text}");
}

async fn start(config: &CloudConfig) -> common::Server {
    // sled's flusher may hold the previous process's handle for a moment after it stopped.
    let mut endpoint = None;
    for _ in 0..100 {
        match Endpoint::connect(config).await {
            Ok(e) => {
                // The endpoint's clock at 2026-12-01T00:00:00Z: the reports below are inside
                // its window whenever the test runs.
                endpoint =
                    Some(e.with_clock(countersign_cloud::service::ingest::Clock::from_fn(|| {
                        1_796_083_200_000
                    })));
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    let endpoint = endpoint.expect("endpoint starts");
    assert!(endpoint.billing().is_some(), "the plans file is loaded at start");
    serve(endpoint).await
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = cloud_exe().run(args).unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worked_example_wallet_and_forecast_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    write_secret(&token_file, &TOKEN).unwrap();
    let plans = dir.path().join("plans.toml");
    std::fs::write(&plans, PLANS).unwrap();
    let config = CloudConfig::new(dir.path().join("data"), &token_file).with_plans_file(&plans);
    let http = reqwest::Client::new();
    let token = hex::encode(TOKEN);
    let gw = gateway_key();

    let server = start(&config).await;
    let base = server.base.clone();
    client::register_gateway(&http, &base, &token, 7, &gw.verifying_key()).await.unwrap();
    client::register_meter(&http, &base, &token, 42, &METER_KEY).await.unwrap();
    // 200 GB by 3 November, 600 GB by 20 November (Berlin days), one report repeated.
    send(
        &http,
        &base,
        usage_batch(&gw, 1, &[(0, 0, "2026-11-01T08:00:00Z"), (1, 200 * GB, "2026-11-03T10:00:00Z")]),
    )
    .await;
    send(
        &http,
        &base,
        usage_batch(&gw, 2, &[(1, 200 * GB, "2026-11-03T10:00:00Z"), (2, 600 * GB, "2026-11-20T10:00:00Z")]),
    )
    .await;

    // The worked example: 600 GB decimal in November is $10 + $32 + $6.
    let q = ChargesQuery { period: Some(date!(2026 - 11 - 10)), ..ChargesQuery::default() };
    let r = client::billing_charges(&http, &base, &token, &q).await.unwrap();
    assert_eq!(r.time_zone, "Europe/Berlin");
    assert_eq!(r.charges.len(), 1);
    let c = &r.charges[0];
    assert_eq!(
        (c.customer.as_str(), c.group.as_str(), c.plan_id.as_str()),
        ("acme", "berlin-meters", "field-example")
    );
    assert_eq!((c.period.start, c.period.end), (date!(2026 - 11 - 01), date!(2026 - 12 - 01)));
    assert_eq!((c.total_micros, c.total.as_str()), (48_000_000, "48.000000"));
    let lines: Vec<(&str, u64, i64, &str)> = c
        .lines
        .iter()
        .map(|l| (l.kind.as_str(), l.quantity_bytes, l.amount_micros, l.amount.as_str()))
        .collect();
    assert_eq!(
        lines,
        vec![
            ("tier", 100 * GB, 10_000_000, "10.000000"),
            ("tier", 400 * GB, 32_000_000, "32.000000"),
            ("tier", 100 * GB, 6_000_000, "6.000000"),
        ]
    );
    assert_eq!(c.lines[1].description, "tier 2: 100 GB < usage ≤ 500 GB");
    assert!(c.lines.iter().all(|l| l.money_rounding == "half_up_to_1_micro_per_line" && l.unit_bytes == GB));
    // Rounding stated: three SIM-days (1, 3 and 20 November), already multiples of 1 KiB.
    assert_eq!((c.rounding.increment_bytes, c.rounding.scope.as_str()), (1024, "sim_day"));
    assert_eq!(
        (c.rounding.raw_bytes, c.rounding.rounded_bytes, c.rounding.rounding_units),
        (600 * GB, 600 * GB, 3)
    );
    assert_eq!(r.totals[0].total, "48.000000");
    // A range inside November (the 3rd only): 200 GB, $10 + $8.
    let q = ChargesQuery {
        from: Some(date!(2026 - 11 - 03)),
        to: Some(date!(2026 - 11 - 03)),
        ..Default::default()
    };
    assert_eq!(
        client::billing_charges(&http, &base, &token, &q).await.unwrap().charges[0].total_micros,
        18_000_000
    );
    let bad = ChargesQuery { customer: Some("nobody".into()), ..Default::default() };
    let e = client::billing_charges(&http, &base, &token, &bad).await.unwrap_err();
    assert!(matches!(&e, ClientError::Refused { status: 404, .. }), "{e}");

    // The wallet: $48 debited once, the 60 threshold alerts once.
    let run = client::billing_run(&http, &base, &token).await.unwrap();
    let w = &run.wallets[0];
    assert_eq!(
        (w.debited_micros, w.balance_after_micros, w.balance_after.as_str()),
        (48_000_000, 52_000_000, "52.000000")
    );
    assert_eq!(w.alerts.iter().map(|a| a.threshold_micros).collect::<Vec<_>>(), vec![Some(60_000_000)]);
    let again = client::billing_run(&http, &base, &token).await.unwrap();
    assert_eq!((again.wallets[0].debited_micros, again.wallets[0].alerts.len()), (0, 0));
    // Usage grows by 50 GB on 21 November: only $3 more (tier 3), no new alert.
    send(&http, &base, usage_batch(&gw, 3, &[(3, 650 * GB, "2026-11-21T10:00:00Z")])).await;
    let run = client::billing_run(&http, &base, &token).await.unwrap();
    assert_eq!((run.wallets[0].debited_micros, run.wallets[0].balance_after_micros), (3_000_000, 49_000_000));
    assert!(run.wallets[0].alerts.is_empty());
    server.stop().await;

    // Restart: the same store and plans, a new process's worth of endpoint.
    let server = start(&config).await;
    let base = server.base.clone();
    let run = client::billing_run(&http, &base, &token).await.unwrap();
    assert_eq!((run.wallets[0].debited_micros, run.wallets[0].alerts.len()), (0, 0));
    let wallets = client::billing_wallets(&http, &base, &token, Some("acme")).await.unwrap();
    let w = &wallets.wallets[0];
    assert_eq!((w.balance_micros, w.debited_micros), (49_000_000, 51_000_000));
    assert_eq!(w.debits.len(), 1);
    assert_eq!((w.debits[0].debited.as_str(), w.debits[0].debits), ("51.000000", 2));
    assert_eq!(w.alerts.len(), 1);
    // Top-ups over HTTP: booked once.
    let t = client::billing_topup(&http, &base, &token, "acme", "invoice-7", "25.50").await.unwrap();
    assert_eq!((t.status, t.balance.as_str()), (TopupStatus::Booked, "74.500000"));
    let t = client::billing_topup(&http, &base, &token, "acme", "invoice-7", "25.50").await.unwrap();
    assert_eq!(t.status, TopupStatus::AlreadyBooked);
    let e = client::billing_topup(&http, &base, &token, "acme", "invoice-7", "1").await.unwrap_err();
    assert!(matches!(&e, ClientError::Refused { status: 409, .. }), "{e}");

    // Forecast from the plan's lifetime quota (2 TB over a year from 1 November): 650 GB used
    // in the 30 days to 30 November, 1350 GB remain: ⌈1350 × 30 / 650⌉ = 63 days.
    let q = ForecastQuery {
        iccid: SIM.parse().unwrap(),
        as_of: Some(date!(2026 - 11 - 30)),
        ..Default::default()
    };
    let f = client::billing_forecast(&http, &base, &token, &q).await.unwrap();
    assert_eq!((f.quota_source.as_str(), f.quota_bytes, f.used_bytes), ("plan", 2000 * GB, 650 * GB));
    assert_eq!((f.since, f.expires_on), (date!(2026 - 11 - 01), date!(2027 - 10 - 31)));
    assert_eq!((f.window_days, f.window_bytes), (30, 650 * GB));
    assert_eq!(f.exhausted_on, Some(date!(2026 - 11 - 30) + time::Duration::days(63)));
    assert!(f.runs_out_before_expiry);

    // The CLI over the same server: charges as a table and as CSV, wallets, a plan check.
    let tf = path(&token_file);
    let (ok, out, err) = cli(&[
        "charges",
        "--endpoint",
        &base,
        "--token-file",
        tf,
        "--period",
        "2026-11-10",
        "--format",
        "table",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("acme / berlin-meters  plan field-example  2026-11-01 to 2026-11-30"), "{out}");
    assert!(out.contains("51.000000 USD"), "{out}");
    let (ok, out, err) = cli(&[
        "charges",
        "--endpoint",
        &base,
        "--token-file",
        tf,
        "--period",
        "2026-11-10",
        "--format",
        "csv",
    ]);
    assert!(ok, "{err}");
    assert!(out.lines().any(|l| l.ends_with(",total,,650000000000,,,,51000000,51.000000,")), "{out}");
    let (ok, out, err) = cli(&["wallets", "--endpoint", &base, "--token-file", tf, "--customer", "acme"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["wallets"][0]["balance"], "74.500000");
    let (ok, out, err) = cli(&["check-plans", "--plans", path(&plans)]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "plans ok: 1 plan(s), 1 group(s), 1 SIM(s), 1 wallet(s), days in Europe/Berlin");
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        PLANS.replace("currency = \"USD\"\nopening_credit", "currency = \"EUR\"\nopening_credit"),
    )
    .unwrap();
    let (ok, _, err) = cli(&["check-plans", "--plans", path(&broken)]);
    assert!(!ok);
    assert!(err.contains("broken.toml") && err.contains("wallet[0].currency"), "{err}");
    server.stop().await;
}

/// The periodic billing loop debits without being asked, and stops when told to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_billing_debits_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let store = countersign_cloud::Store::open(&dir.path().join("data"), 1 << 20).unwrap();
    let backend = countersign_cloud::StoreBackend::Sled(store);
    let pricing = countersign_cloud::pricing::PricingConfig::from_toml_str(
        &PLANS
            .replace("rounding_increment_bytes = 1024", "rounding_increment_bytes = 1024\nflat_fee = \"2\""),
    )
    .unwrap();
    let b = std::sync::Arc::new(
        Billing::new(pricing, "plans.toml".into(), std::time::Duration::from_millis(50)).unwrap(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(b.clone().run_periodically(backend.clone(), async move {
        let _ = stopped.await;
    }));
    // Flat fees from 1 November on: some are debited without any request.
    let mut debited = 0;
    for _ in 0..100 {
        debited = b.wallets(&backend, None).await.unwrap().wallets[0].debited_micros;
        if debited > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(debited >= 4_000_000, "{debited}");
    let _ = stop.send(());
    tokio::time::timeout(std::time::Duration::from_secs(5), task).await.unwrap().unwrap();
}

/// Two real `countersign-cloud serve` processes on one PostgreSQL, both asked to bill at the
/// same moment round after round while usage grows (sent to either): the wallet is debited
/// exactly the charge and each alert is recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_endpoint_processes_on_one_postgres_bill_once() {
    let db = countersign_cloud::store::postgres::testing::TestDatabase::create().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    write_secret(&token_file, &TOKEN).unwrap();
    // No active_since: nothing is charged before the first usage.
    std::fs::write(dir.path().join("plans.toml"), PLANS.replace("active_since = \"2026-11-01\"\n", ""))
        .unwrap();
    let config = |i: usize| {
        format!(
            "data_dir = \"data-{i}\"\nadmin_token_file = \"admin.token\"\n\
             [store]\nbackend = \"postgres\"\npostgres_url = \"{}\"\npostgres_pool_connections = 2\n\
             [billing]\nplans_file = \"plans.toml\"\nrun_interval_s = 86400\n",
            db.url()
        )
    };
    let (exe, up) = (cloud_exe(), std::time::Duration::from_secs(60));
    let (config_0, config_1) = (config(0), config(1));
    // Both start at once, as two processes of a deployment do.
    let (a, b) = tokio::join!(
        EndpointProcess::start(&exe, dir.path(), "cloud-0", &config_0, up),
        EndpointProcess::start(&exe, dir.path(), "cloud-1", &config_1, up)
    );
    let processes = [a.expect("endpoint up"), b.expect("endpoint up")];
    let bases: Vec<String> = processes.iter().map(|p| p.url.clone()).collect();
    let http = reqwest::Client::new();
    let token = hex::encode(TOKEN);
    let gw = gateway_key();
    client::register_gateway(&http, &bases[0], &token, 7, &gw.verifying_key()).await.unwrap();
    client::register_meter(&http, &bases[1], &token, 42, &METER_KEY).await.unwrap();
    let mut debited = 0i64;
    for round in 1..=10u32 {
        // 70 GB more each round, on 2 November: up to 700 GB.
        let used = u64::from(round) * 70 * GB;
        let base = &bases[usize::try_from(round % 2).unwrap()];
        send(&http, base, usage_batch(&gw, u64::from(round), &[(round, used, "2026-11-02T10:00:00Z")])).await;
        let (a, b) = tokio::join!(
            client::billing_run(&http, &bases[0], &token),
            client::billing_run(&http, &bases[1], &token)
        );
        debited += a.unwrap().wallets[0].debited_micros + b.unwrap().wallets[0].debited_micros;
        let gb = used / GB;
        let charge = match gb {
            0..=100 => gb * 100_000,
            101..=500 => 10_000_000 + (gb - 100) * 80_000,
            _ => 42_000_000 + (gb - 500) * 60_000,
        };
        assert_eq!(debited, i64::try_from(charge).unwrap(), "round {round}");
    }
    let w = client::billing_wallets(&http, &bases[1], &token, Some("acme")).await.unwrap();
    let w = &w.wallets[0];
    // 700 GB: $10 + $32 + $12.
    assert_eq!((w.debited_micros, w.balance_micros), (54_000_000, 46_000_000));
    let alerts: Vec<(u64, Option<i64>)> = w.alerts.iter().map(|a| (a.seq, a.threshold_micros)).collect();
    assert_eq!(alerts, vec![(1, Some(60_000_000))]);
    drop(processes);
}

/// Without a plans file the billing routes say so; the forecast still works with a quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_plans_billing_routes_answer_not_configured() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    write_secret(&token_file, &TOKEN).unwrap();
    let config = CloudConfig::new(dir.path().join("data"), &token_file);
    // The endpoint's clock at 2026-12-01T00:00:00Z: the reports below are inside its window
    // whenever the test runs.
    let endpoint = Endpoint::connect(&config)
        .await
        .unwrap()
        .with_clock(countersign_cloud::service::ingest::Clock::from_fn(|| 1_796_083_200_000));
    assert!(endpoint.billing().is_none());
    let server = serve(endpoint).await;
    let http = reqwest::Client::new();
    let token = hex::encode(TOKEN);
    let e = client::billing_charges(&http, &server.base, &token, &ChargesQuery::default()).await.unwrap_err();
    assert!(matches!(&e, ClientError::Refused { status: 404, code, .. } if code == "not_configured"), "{e}");
    let e = client::billing_run(&http, &server.base, &token).await.unwrap_err();
    assert!(matches!(&e, ClientError::Refused { status: 404, code, .. } if code == "not_configured"), "{e}");
    let q = ForecastQuery {
        iccid: SIM.parse().unwrap(),
        quota_bytes: Some(1000),
        since: Some(date!(2026 - 11 - 01)),
        as_of: Some(date!(2026 - 11 - 30)),
        ..Default::default()
    };
    let f = client::billing_forecast(&http, &server.base, &token, &q).await.unwrap();
    assert_eq!((f.time_zone.as_str(), f.used_bytes, f.exhausted_on), ("UTC", 0, None));
    assert_eq!(f.expires_on, date!(2036 - 10 - 31));
    server.stop().await;
}
