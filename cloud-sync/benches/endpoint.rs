//! Endpoint throughput over HTTP: many gateways post signed batches of real tagged meter
//! reports concurrently; the endpoint verifies every signature and tag and stores every
//! record durably before it replies. Reports records/s (verified and stored) and batch
//! latency percentiles, per store.
//!
//! ```sh
//! cargo bench -p countersign-cloud --bench endpoint -- --store both
//! cargo bench -p countersign-cloud --bench endpoint -- --store sled --gateways 16 --batches 40 --records 1000
//! ```
//!
//! PostgreSQL: a throwaway database on 127.0.0.1:5432 as user `postgres`, or wherever
//! `COUNTERSIGN_PG_ADMIN_URL` points. Batches are signed before the clock starts: gateways
//! are other machines, and their signing is not the endpoint's cost.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use countersign_cloud::store::postgres::testing::TestDatabase;
use countersign_cloud::{CloudConfig, Endpoint};
use countersign_protocol::keys::write_secret;
use countersign_protocol::{BatchReply, RecordOutcome, BATCHES_PATH};
use countersign_testkit::batch::{signed_batch_at, signing_key};
use countersign_testkit::report::{network_time, ReportBuilder};
use ed25519_dalek::SigningKey;

const TOKEN: [u8; 32] = [0x5a; 32];
/// 2026-11-24T12:00:00Z.
const NOON_S: u64 = 1_795_521_600;

struct Args {
    stores: Vec<&'static str>,
    gateways: usize,
    batches: usize,
    records: usize,
    meters_per_gateway: u64,
}

fn args() -> Args {
    let mut a = Args {
        stores: vec!["sled", "postgres"],
        gateways: 16,
        batches: 40,
        records: 1000,
        meters_per_gateway: 100,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let value = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--store" => {
                a.stores = match value.as_str() {
                    "sled" => vec!["sled"],
                    "postgres" => vec!["postgres"],
                    _ => vec!["sled", "postgres"],
                };
                i += 1;
            }
            "--gateways" => {
                a.gateways = value.parse().unwrap();
                i += 1;
            }
            "--batches" => {
                a.batches = value.parse().unwrap();
                i += 1;
            }
            "--records" => {
                a.records = value.parse().unwrap();
                i += 1;
            }
            "--meters-per-gateway" => {
                a.meters_per_gateway = value.parse().unwrap();
                i += 1;
            }
            // `cargo bench` passes --bench; anything else is ignored the same way.
            _ => {}
        }
        i += 1;
    }
    a
}

fn meter_key(meter_id: u64) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&meter_id.to_be_bytes());
    k[31] = 0xc5;
    k
}

/// The signed batches of one gateway: each meter reports in turn, seq rising, counters
/// cumulative, so that every record is new and a typical 48-byte report.
fn batches(a: &Args, gateway: usize, key: &SigningKey, sizes: &mut Vec<usize>) -> Vec<Vec<u8>> {
    let first_meter = 1_000 + gateway as u64 * a.meters_per_gateway;
    let mut seq = vec![0u32; a.meters_per_gateway as usize];
    let mut out = Vec::with_capacity(a.batches);
    let mut n = 0u64;
    for b in 0..a.batches {
        let mut reports = Vec::with_capacity(a.records);
        for _ in 0..a.records {
            let m = n % a.meters_per_gateway;
            n += 1;
            let meter_id = first_meter + m;
            let s = &mut seq[m as usize];
            let report = ReportBuilder::new(
                meter_id,
                *s,
                8_988_280_666_000_000_000 + meter_id,
                network_time(NOON_S + u64::from(*s) * 60),
            )
            .epoch(3)
            .base(1_500_000, 9_000_000)
            .used(20_000 + u64::from(*s) * 700, 90_000 + u64::from(*s) * 2_900)
            .encode(&meter_key(meter_id));
            *s += 1;
            sizes.push(report.len());
            reports.push(report);
        }
        out.push(signed_batch_at(key, gateway as u64 + 1, b as u64, NOON_S * 1000, &reports));
    }
    out
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn run(a: &Args, store: &str) {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    write_secret(&token_file, &TOKEN).unwrap();
    let db = if store == "postgres" { Some(TestDatabase::create().await.unwrap()) } else { None };
    let store_toml = match &db {
        None => "cache_capacity_bytes = 268435456".to_owned(),
        Some(db) => {
            format!("backend = 'postgres'\npostgres_url = '{}'\npostgres_pool_connections = 16", db.url())
        }
    };
    let config = CloudConfig::from_toml_str(&format!(
        "data_dir = '{}'\nadmin_token_file = '{}'\n[store]\n{store_toml}\n[rate_limit]\nrecords_per_second = 1000000000\nburst_records = 1000000000\n",
        dir.path().join("data").display(),
        token_file.display()
    ))
    .unwrap();
    // The endpoint's clock at 2026-12-01T00:00:00Z: the reports below are inside its window
    // whenever the test runs.
    let endpoint = Endpoint::connect(&config)
        .await
        .unwrap()
        .with_clock(countersign_cloud::service::ingest::Clock::from_fn(|| 1_796_083_200_000));
    let backend = endpoint.store().clone();
    let gateway_keys: Vec<SigningKey> = (0..a.gateways).map(|g| signing_key(g as u8 + 1)).collect();
    for (g, k) in gateway_keys.iter().enumerate() {
        backend.add_gateway(g as u64 + 1, k.verifying_key()).await.unwrap();
        let first = 1_000 + g as u64 * a.meters_per_gateway;
        for m in first..first + a.meters_per_gateway {
            backend.add_meter(m, meter_key(m)).await.unwrap();
        }
    }
    let mut sizes = Vec::new();
    let all: Vec<Vec<Vec<u8>>> =
        gateway_keys.iter().enumerate().map(|(g, k)| batches(a, g, k, &mut sizes)).collect();
    let avg_report = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(endpoint.serve(listener, async {
        let _ = stopped.await;
    }));

    let started = Instant::now();
    let tasks: Vec<_> = all
        .into_iter()
        .map(|gateway_batches| {
            let url = format!("{base}{BATCHES_PATH}");
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut latencies = Vec::with_capacity(gateway_batches.len());
                let mut stored = 0usize;
                for body in gateway_batches {
                    let t = Instant::now();
                    let r = http.post(&url).body(body).send().await.unwrap();
                    assert!(r.status().is_success(), "{}", r.status());
                    let reply: BatchReply = r.json().await.unwrap();
                    latencies.push(t.elapsed());
                    stored += reply.results.iter().filter(|o| **o == RecordOutcome::Stored).count();
                }
                (latencies, stored)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut stored = 0usize;
    for t in tasks {
        let (l, s) = t.await.unwrap();
        latencies.extend(l);
        stored += s;
    }
    let elapsed = started.elapsed();
    let expected = a.gateways * a.batches * a.records;
    assert_eq!(stored, expected, "every record must be stored");
    assert_eq!(backend.record_count().await.unwrap(), expected as u64);
    latencies.sort();
    println!(
        "store={store} gateways={} batches/gateway={} records/batch={} meters={} report_bytes_avg={avg_report:.1}",
        a.gateways,
        a.batches,
        a.records,
        a.gateways as u64 * a.meters_per_gateway
    );
    println!(
        "store={store} records={stored} elapsed_s={:.2} records_per_s={:.0} batch_latency_ms p50={:.1} p99={:.1} max={:.1}",
        elapsed.as_secs_f64(),
        stored as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3,
    );
    reads(&base, store).await;
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// Times the usage reads over what was just stored (best and worst of 5 each), so that the
/// read side's cost is printed beside the ingest rate it was bought with.
async fn reads(base: &str, store: &str) {
    let http = reqwest::Client::new();
    let token = hex::encode(TOKEN);
    let sim = 8_988_280_666_000_000_000u64 + 1_000;
    // The reports span 2026-11-24 from noon on (one a minute per meter).
    let reads = [
        ("one_sim_one_day", format!("/v1/usage?iccid={sim}&from=2026-11-24&to=2026-11-24")),
        ("page_1000_sims_one_day", "/v1/usage/sims?from=2026-11-24&to=2026-11-24&limit=1000".to_owned()),
        ("page_10000_sims_one_day", "/v1/usage/sims?from=2026-11-24&to=2026-11-24&limit=10000".to_owned()),
        ("zone_days_one_sim", format!("/v1/usage/days?tz=Europe/Berlin&iccid={sim}")),
    ];
    for (name, path) in reads {
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let r = http.get(format!("{base}{path}")).bearer_auth(&token).send().await.unwrap();
            assert!(r.status().is_success(), "{path}: {}", r.status());
            let _ = r.bytes().await.unwrap();
            times.push(t.elapsed());
        }
        times.sort();
        println!(
            "store={store} read={name} ms_min={:.2} ms_max={:.2}",
            times[0].as_secs_f64() * 1e3,
            times[times.len() - 1].as_secs_f64() * 1e3
        );
    }
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    for store in a.stores.clone() {
        rt.block_on(run(&a, store));
    }
}
