//! Two real `countersign-cloud serve` processes on one PostgreSQL database, two gateways
//! sending signed batches of real meter reports to both, every batch sent to both processes
//! at once (the retry race: a gateway that timed out on one endpoint and retried on another)
//! and some resent later. Checks that each record is stored exactly once and that usage per
//! SIM equals the simulated devices' ground truth, byte for byte.
//!
//! Needs the workspace binaries built and PostgreSQL on 127.0.0.1:5432 (or
//! `COUNTERSIGN_PG_ADMIN_URL`); `tests/run.sh` sees to both.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use countersign_cloud::store::postgres::testing::TestDatabase;
use countersign_cloud::{client, usage::DateRange, PgStore};
use countersign_e2e::fleet::{Faults, Fleet, STEP_S};
use countersign_meter::{RecordId, Report, Totals};
use countersign_protocol::{BatchReply, RecordOutcome, BATCHES_PATH};
use countersign_testkit::endpoint::EndpointProcess;
use countersign_testkit::procs::{run_ok, Exe};
use countersign_testkit::{signed_batch_at, signing_key};

const DEVICES: usize = 60;
const STEPS: usize = 96;
const FIRST_METER: u64 = 1000;
/// 2026-11-24T00:00:00Z.
const START_S: u64 = 1_795_478_400;

async fn start(dir: &Path, name: &str, db_url: &str, token_file: &Path) -> Result<EndpointProcess> {
    let config = format!(
        "data_dir = \"{}\"\nadmin_token_file = \"{}\"\n\
         [store]\nbackend = \"postgres\"\npostgres_url = \"{db_url}\"\npostgres_pool_connections = 4\n",
        dir.join(format!("{name}-data")).display(),
        token_file.display()
    );
    let exe = Exe::workspace("countersign-cloud")?;
    EndpointProcess::start(&exe, dir, name, &config, Duration::from_secs(20)).await
}

async fn post(http: &reqwest::Client, url: &str, body: Vec<u8>) -> Result<BatchReply> {
    let r = http.post(format!("{url}{BATCHES_PATH}")).body(body).send().await?;
    let status = r.status();
    let text = r.text().await?;
    ensure!(status.is_success(), "{url} answered {status}: {text}");
    Ok(serde_json::from_str(&text)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_endpoints_on_one_database_store_each_record_once() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let db = TestDatabase::create().await?;
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("admin.token");
    run_ok("countersign-cloud", &["keygen-token", "--out", &token_file.display().to_string()])?;
    let token = std::fs::read_to_string(&token_file)?.trim().to_owned();
    // Both start at once: the migrations must be applied exactly once between them.
    let db_url = db.url();
    let (a, b) = tokio::join!(
        start(dir.path(), "a", &db_url, &token_file),
        start(dir.path(), "b", &db_url, &token_file)
    );
    let (a, b) = (a?, b?);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;

    let mut fleet = Fleet::new(DEVICES, FIRST_METER, 7, START_S, Faults::default());
    let gateways = [signing_key(0x61), signing_key(0x62)];
    for (i, g) in gateways.iter().enumerate() {
        // Registered on one process, used through both: registrations live in the database.
        client::register_gateway(&http, &a.url, &token, i as u64 + 1, &g.verifying_key()).await?;
    }
    for (meter_id, key, _) in fleet.meters() {
        let via = if meter_id % 2 == 0 { &a.url } else { &b.url };
        client::register_meter(&http, via, &token, meter_id, &key).await?;
    }

    let mut sent_ids = HashSet::new();
    let mut stored = 0usize;
    let mut resend = Vec::new();
    let mut batch_seq = 0u64;
    for step in 0..=STEPS {
        let out = if step == STEPS { fleet.finish() } else { fleet.step() };
        let received_ms = (START_S + (step as u64 + 1) * STEP_S) * 1000;
        // Meters alternate between the two gateways.
        let mut per_gateway: [Vec<Vec<u8>>; 2] = Default::default();
        for o in out {
            let (report, _) = Report::decode(&o.payload).context("fleet report decodes")?;
            sent_ids.insert(report.id());
            per_gateway[(report.meter_id % 2) as usize].push(o.payload);
        }
        for (g, reports) in per_gateway.iter().enumerate() {
            if reports.is_empty() {
                continue;
            }
            batch_seq += 1;
            let signed = signed_batch_at(&gateways[g], g as u64 + 1, batch_seq, received_ms, reports);
            // The same batch to both processes at once.
            let (ra, rb) =
                tokio::join!(post(&http, &a.url, signed.clone()), post(&http, &b.url, signed.clone()));
            let (ra, rb) = (ra?, rb?);
            for (x, y) in ra.results.iter().zip(&rb.results) {
                match (x, y) {
                    (RecordOutcome::Stored, RecordOutcome::Duplicate)
                    | (RecordOutcome::Duplicate, RecordOutcome::Stored) => stored += 1,
                    // A report the fleet published twice inside one batch, or one sent before.
                    (RecordOutcome::Duplicate, RecordOutcome::Duplicate) => {}
                    other => bail!("batch {batch_seq}: unexpected outcomes {other:?}"),
                }
            }
            if batch_seq % 5 == 0 {
                resend.push(signed);
            }
        }
    }
    // Late retries, alternating between the processes: all duplicates.
    for (i, signed) in resend.into_iter().enumerate() {
        let url = if i % 2 == 0 { &a.url } else { &b.url };
        let r = post(&http, url, signed).await?;
        ensure!(
            r.results.iter().all(|o| *o == RecordOutcome::Duplicate),
            "late retry stored something: {r:?}"
        );
    }

    // Each record stored exactly once, in both record tables.
    let store = PgStore::connect(&db.url(), 1).await?;
    ensure!(stored == sent_ids.len(), "stored {stored} of {} distinct records", sent_ids.len());
    ensure!(store.record_count().await? == sent_ids.len() as u64);
    for id in sent_ids.iter().take(50) {
        let id: RecordId = *id;
        ensure!(store.record(id).await?.is_some(), "record {id} missing");
    }

    // Usage per SIM, asked of either process, is the devices' ground truth.
    let truth = fleet.truth_per_iccid();
    for url in [&a.url, &b.url] {
        let sims = client::usage_sims(&http, url, &token, DateRange::default()).await?;
        let got: BTreeMap<u64, Totals> =
            sims.sims.iter().map(|s| (s.iccid, Totals { up: s.up_bytes, down: s.down_bytes })).collect();
        ensure!(got == truth, "usage differs from the ground truth via {url}");
    }
    let one = *truth.keys().next().context("fleet has SIMs")?;
    let u = client::usage(&http, &b.url, &token, one, DateRange::default()).await?;
    ensure!(Totals { up: u.up_bytes, down: u.down_bytes } == truth[&one]);
    let stats = fleet.stats();
    ensure!(stats.duplicated > 0 && stats.dropped > 0, "the fleet's faults must have happened: {stats:?}");

    let (mut a, mut b) = (a, b);
    ensure!(a.proc.terminate() && b.proc.terminate(), "endpoints did not stop cleanly");
    Ok(())
}
