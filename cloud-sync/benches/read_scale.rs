//! How usage reads grow with history: loads histories of growing size through the store's
//! ingest (`StoreBackend::insert_batch`, the call the endpoint makes after verifying a batch;
//! rollups on), and after each step times the reads the API serves, over random SIMs. The
//! answers stay the same size while history grows (older epochs are added behind the newest
//! data), so a read whose cost follows history, not its answer, shows up as growth.
//!
//! ```sh
//! cargo bench -p countersign-cloud --bench read_scale -- --store sled --sims 100000 --steps 1000000,3000000,10000000
//! cargo bench -p countersign-cloud --bench read_scale -- --store postgres
//! ```
//!
//! Each SIM has one meter reporting three times a day. Step k loads its records as epoch
//! `STEPS_MAX - k` of every meter, each epoch earlier in time than the one before it, so
//! every load is in-order arrival within its epoch. Prints the ingest rate per step, then per
//! read p50/p99 (ms), settlement and a billing run over every wallet (s), the process's RSS,
//! and a growth line (p50 at the last step / p50 at the first).
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::time::{Duration, Instant};

use countersign_cloud::service::billing::Billing;
use countersign_cloud::store::postgres::testing::TestDatabase;
use countersign_cloud::store::rollups::SimPage;
use countersign_cloud::store::{StoreBackend, StoreKind};
use countersign_cloud::usage::{time_zone, DateRange, TimeZone};
use countersign_rating::batch::NewRecord;
use countersign_rating::pricing::PricingConfig;
use countersign_testkit::report::{network_time, ReportBuilder};
use time::{Date, Duration as Days};

/// 2026-11-24T00:00:00Z: the day the newest history ends on.
const LAST_DAY_S: u64 = 1_795_478_400;
const REPORTS_PER_DAY: u64 = 3;
const BATCH_RECORDS: usize = 1000;
/// Batches stored concurrently.
const BATCHES_IN_FLIGHT: usize = 8;
const STEPS_MAX: u32 = 16;
const SAMPLES: usize = 200;
const KEY: [u8; 32] = [7u8; 32];
const FIRST_SIM: u64 = 8_988_280_666_000_000_000;
/// Customers (one group and one prepaid wallet each) the fleet is billed in.
const BILLING_GROUPS: u64 = 1000;

/// A read's name, p50 and p99 (ms).
type Timing = (&'static str, f64, f64);

struct Args {
    store: String,
    sims: u64,
    steps: Vec<u64>,
}

fn args() -> Args {
    let mut a = Args { store: "sled".into(), sims: 100_000, steps: vec![1_000_000, 3_000_000, 10_000_000] };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let value = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--store" => a.store = value,
            "--sims" => a.sims = value.parse().unwrap(),
            "--steps" => a.steps = value.split(',').map(|s| s.parse().unwrap()).collect(),
            // `cargo bench` passes --bench; anything else is ignored the same way.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

/// The records of one step, batch by batch (never all in memory): `records` reports spread
/// over every SIM, in the days that end `days_before` days before LAST_DAY_S, as epoch
/// `epoch` of each SIM's meter. Returns the batches and the days they span.
fn step_records(
    sims: u64,
    records: u64,
    days_before: u64,
    epoch: u32,
) -> (impl Iterator<Item = Vec<NewRecord>>, u64) {
    let per_sim = records.div_ceil(sims);
    let days = per_sim.div_ceil(REPORTS_PER_DAY);
    let start_s = LAST_DAY_S + 86_400 - (days_before + days) * 86_400;
    let mut next = (0u64, 0u64); // (seq, sim)
    let batches = std::iter::from_fn(move || {
        let mut batch = Vec::with_capacity(BATCH_RECORDS);
        while batch.len() < BATCH_RECORDS && next.0 < per_sim {
            let (seq, sim) = next;
            let at = start_s + seq * (86_400 / REPORTS_PER_DAY) + sim % 3_600;
            let r =
                ReportBuilder::new(1 + sim, u32::try_from(seq).unwrap(), FIRST_SIM + sim, network_time(at))
                    .epoch(epoch)
                    .used(10_000 * (seq + 1), 40_000 * (seq + 1));
            batch.push(NewRecord::new(r.report(), at * 1000, r.encode(&KEY).into()));
            next = if sim + 1 == sims { (seq + 1, 0) } else { (seq, sim + 1) };
        }
        (!batch.is_empty()).then_some(batch)
    });
    (batches, days)
}

/// One new day (`day` after LAST_DAY) of every SIM: three reports each, as a fresh epoch
/// `epoch` of its meter (the meter rebooted), after everything loaded so far.
fn day_records(sims: u64, day: u64, epoch: u32) -> impl Iterator<Item = Vec<NewRecord>> {
    let start_s = LAST_DAY_S + day * 86_400;
    let mut next = (0u64, 0u64); // (seq, sim)
    std::iter::from_fn(move || {
        let mut batch = Vec::with_capacity(BATCH_RECORDS);
        while batch.len() < BATCH_RECORDS && next.0 < REPORTS_PER_DAY {
            let (seq, sim) = next;
            let at = start_s + seq * (86_400 / REPORTS_PER_DAY) + sim % 3_600;
            let r =
                ReportBuilder::new(1 + sim, u32::try_from(seq).unwrap(), FIRST_SIM + sim, network_time(at))
                    .epoch(epoch)
                    .used(10_000 * (seq + 1), 40_000 * (seq + 1));
            batch.push(NewRecord::new(r.report(), at * 1000, r.encode(&KEY).into()));
            next = if sim + 1 == sims { (seq + 1, 0) } else { (seq, sim + 1) };
        }
        (!batch.is_empty()).then_some(batch)
    })
}

/// Stores the batches through the store's ingest, several gateways' batches in flight, as
/// the endpoint sees concurrent uploads (a flush covers all of them: one batch at a time
/// would measure fsync latency). Returns the records stored.
async fn load(store: &StoreBackend, batches: impl Iterator<Item = Vec<NewRecord>>) -> usize {
    let mut n = 0usize;
    let mut chunks = batches.peekable();
    while chunks.peek().is_some() {
        let mut handles = Vec::with_capacity(BATCHES_IN_FLIGHT);
        for g in 0..BATCHES_IN_FLIGHT {
            let Some(batch) = chunks.next() else { break };
            n += batch.len();
            let s = store.clone();
            handles.push(tokio::spawn(async move { s.insert_batch(g as u64 + 1, batch).await.unwrap() }));
        }
        for h in handles {
            h.await.unwrap();
        }
    }
    n
}

/// Plans for the billing run: one monthly graduated plan, the fleet in `BILLING_GROUPS`
/// groups of one customer each, every customer a prepaid wallet.
fn billing(sims: u64) -> Billing {
    let mut text = String::from(
        "time_zone = \"UTC\"\n\n[[plan]]\nid = \"p\"\ncurrency = \"EUR\"\nunit = \"MB\"\nmodel = \"graduated\"\n\
         tiers = [{ up_to = 10, price = \"0.10\" }, { price = \"0.05\" }]\n",
    );
    let per_group = sims.div_ceil(BILLING_GROUPS);
    for g in 0..BILLING_GROUPS {
        let iccids: Vec<String> = (g * per_group..((g + 1) * per_group).min(sims))
            .map(|i| format!("\"{}\"", FIRST_SIM + i))
            .collect();
        if iccids.is_empty() {
            continue;
        }
        text.push_str(&format!(
            "\n[[assign]]\ncustomer = \"c{g}\"\ngroup = \"g{g}\"\nplan = \"p\"\niccids = [{}]\nactive_since = \"2025-01-01\"\n\
             \n[[wallet]]\ncustomer = \"c{g}\"\ncurrency = \"EUR\"\nopening_credit = \"1000.00\"\n",
            iccids.join(",")
        ));
    }
    let pricing = PricingConfig::from_toml_str(&text).unwrap();
    Billing::new(pricing, "bench-plans.toml".into(), Duration::from_secs(3600)).unwrap()
}

fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

fn instant(unix_s: u64) -> jiff::Timestamp {
    jiff::Timestamp::from_second(i64::try_from(unix_s).unwrap()).unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1e3
}

async fn open(dir: &Path, db: Option<&TestDatabase>) -> StoreBackend {
    let kind = match db {
        None => StoreKind::Sled,
        Some(db) => StoreKind::Postgres { url: db.url().to_owned(), pool_connections: 8 },
    };
    StoreBackend::open(&kind, dir, 256 << 20).await.unwrap()
}

fn date_of(unix_s: u64) -> Date {
    Date::from_julian_day(2_440_588 + i32::try_from(unix_s / 86_400).unwrap()).unwrap()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(run(args()));
}

async fn run(a: Args) {
    let dir = tempfile::tempdir().unwrap();
    let db = if a.store == "postgres" { Some(TestDatabase::create().await.unwrap()) } else { None };
    let store = open(&dir.path().join("data"), db.as_ref()).await;
    let last = date_of(LAST_DAY_S);
    let month = DateRange { from: Some(last - Days::days(29)), to: Some(last) };
    let day = DateRange { from: Some(last), to: Some(last) };
    let week = DateRange { from: Some(last - Days::days(6)), to: Some(last) };
    let berlin = time_zone("Europe/Berlin").unwrap();
    println!("store={} sims={} steps={:?}", a.store, a.sims, a.steps);
    let bill = billing(a.sims);
    let mut loaded = 0u64;
    let mut days_loaded = 0u64;
    let mut table: Vec<(u64, Vec<Timing>)> = Vec::new();
    for (k, &target) in a.steps.iter().enumerate() {
        let (batches, days) =
            step_records(a.sims, target - loaded, days_loaded, STEPS_MAX - u32::try_from(k).unwrap());
        let t = Instant::now();
        let n = load(&store, batches).await;
        let secs = t.elapsed().as_secs_f64();
        loaded += n as u64;
        days_loaded += days;
        println!(
            "step {k}: loaded {n} records ({loaded} in all, {days_loaded} days) at {:.0} records/s",
            n as f64 / secs
        );
        let mut reads = Vec::new();
        let sims: Vec<u64> = (0..SAMPLES as u64).map(|i| FIRST_SIM + (i * 7_919) % a.sims).collect();
        let reads_of = [
            ("one_sim_month", 0),
            ("one_sim_zone_week", 1),
            ("page_1000_sims_day", 2),
            ("page_1000_sims_zone_day", 3),
            ("all_sims_day_unpaged", 4),
        ];
        for (name, f) in reads_of {
            let mut times = Vec::new();
            let samples = if f == 4 { 5 } else { SAMPLES };
            for sim in sims.iter().take(samples) {
                // A page starting anywhere in the fleet (its first page when near the end).
                let page = SimPage { after: (*sim + 1000 < FIRST_SIM + a.sims).then_some(*sim), limit: 1000 };
                let t = Instant::now();
                let derived = match f {
                    0 => store.daily_usage(Some(*sim), month).await.unwrap(),
                    1 => store.daily_usage_in(Some(*sim), berlin.clone(), week).await.unwrap(),
                    2 => store.usage_page(TimeZone::UTC, day, page).await.unwrap().derived,
                    3 => store.usage_page(berlin.clone(), day, page).await.unwrap().derived,
                    _ => store.daily_usage(None, day).await.unwrap(),
                };
                times.push(t.elapsed());
                assert!(!derived.daily.is_empty(), "{name}: empty answer");
                if f == 2 || f == 3 {
                    let sims_in_page: std::collections::BTreeSet<u64> =
                        derived.daily.keys().map(|(i, _)| *i).collect();
                    assert!(sims_in_page.len() <= 1000, "{name}: page of {} SIMs", sims_in_page.len());
                }
            }
            times.sort();
            let (p50, p99) = (percentile(&times, 0.5), percentile(&times, 0.99));
            println!("step {k}: {name} p50={p50:.2} ms p99={p99:.2} ms ({} samples)", times.len());
            reads.push((name, p50, p99));
        }
        // Settlement (UTC, no window): the run after this load (step 0: the first run, over
        // all history; later steps: the older history just loaded arrives as late data for
        // closed days), then one new day of every SIM and the run that books it.
        let newest_end = LAST_DAY_S + (k as u64 + 1) * 86_400;
        let t = Instant::now();
        let s = store.settle("UTC".into(), 0, instant(newest_end)).await.unwrap();
        println!(
            "step {k}: settle_after_load {:.2} s ({} SIM-days settled, {} adjusted)",
            t.elapsed().as_secs_f64(),
            s.settled.len(),
            s.adjustments.len()
        );
        let epoch = STEPS_MAX + 1 + u32::try_from(k).unwrap();
        loaded += load(&store, day_records(a.sims, k as u64 + 1, epoch)).await as u64;
        let t = Instant::now();
        let s = store.settle("UTC".into(), 0, instant(newest_end + 86_400)).await.unwrap();
        let settle_s = t.elapsed().as_secs_f64();
        println!(
            "step {k}: settle_one_day {settle_s:.2} s ({} SIM-days settled, {} adjusted)",
            s.settled.len(),
            s.adjustments.len()
        );
        reads.push(("settle_one_day", settle_s * 1e3, settle_s * 1e3));
        let t = Instant::now();
        let run = bill.run(&store, instant(newest_end + 86_400)).await.unwrap();
        let bill_s = t.elapsed().as_secs_f64();
        println!("step {k}: billing_run {bill_s:.2} s ({} wallets, {} SIMs)", run.wallets.len(), a.sims);
        reads.push(("billing_run", bill_s * 1e3, bill_s * 1e3));
        let (rss, hwm) = rss_mib();
        println!("step {k}: rss {rss:.0} MiB, peak {hwm:.0} MiB (store cache 256 MiB)");
        table.push((loaded, reads));
    }
    if let (Some(first), Some(last)) = (table.first(), table.last()) {
        for ((name, p50_first, _), (_, p50_last, _)) in first.1.iter().zip(&last.1) {
            println!(
                "growth {name}: {:.2}x ({} → {} records)",
                p50_last / p50_first.max(f64::EPSILON),
                first.0,
                last.0
            );
        }
    }
}
