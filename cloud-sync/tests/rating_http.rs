//! The rating routes over real HTTP: usage per day in a time zone, settlement, the ledger with
//! an adjustment after late data. Records go straight into the store (ingest is tested in
//! `http.rs`). Every test runs on the embedded sled store and on PostgreSQL; on PostgreSQL,
//! several processes' worth of stores settle one database at the same moment.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use countersign_cloud::client::{self, ClientError};
use countersign_cloud::store::ledger::LedgerDay;
use countersign_cloud::store::postgres::testing::TestDatabase;
use countersign_cloud::store::NewRecord;
use countersign_cloud::store::StoreKind;
use countersign_cloud::usage::{DailyUsage, DateRange, Settlement};
use countersign_cloud::{CloudConfig, Endpoint, PgStore, Store, StoreBackend};
use countersign_protocol::keys::write_secret;
use countersign_testkit::{network_time, unix_s, ReportBuilder};
use time::macros::date;

#[macro_use]
mod common;
use common::{insert, new_record, Kind};

const TOKEN: [u8; 32] = [0x5a; 32];
const SIM: u64 = 8_988_280_666_000_000_001;
/// A second SIM that meter 1 swaps to (see `zone_days_of_one_sim_are_exact_across_a_swap`).
const SWAPPED_SIM: u64 = 8_988_280_666_000_000_002;

/// A stored record made and received at `at_s`, half as many bytes down as up.
fn record(meter_id: u64, epoch: u32, seq: u32, iccid: u64, up: u64, at_s: u64) -> NewRecord {
    let r = ReportBuilder::new(meter_id, seq, iccid, network_time(at_s)).epoch(epoch).used(up, up / 2);
    new_record(&r, &[1u8; 32], at_s * 1000)
}

/// One test's state: a temp dir with the admin token (and sled), a database on PostgreSQL.
struct Env {
    dir: tempfile::TempDir,
    db: Option<TestDatabase>,
}

impl Env {
    async fn new(kind: Kind) -> Env {
        let (dir, db) = common::state_for(kind).await;
        write_secret(&dir.path().join("admin.token"), &TOKEN).unwrap();
        Env { dir, db }
    }

    fn config(&self) -> CloudConfig {
        let config = CloudConfig::new(self.dir.path().join("data"), self.dir.path().join("admin.token"));
        match &self.db {
            None => config,
            Some(db) => config.with_store_kind(StoreKind::Postgres { url: db.url(), pool_connections: 4 }),
        }
    }

    /// A store on the test's database (PostgreSQL only: one more process's worth).
    async fn pg_store(&self) -> StoreBackend {
        let db = self.db.as_ref().expect("a PostgreSQL test");
        StoreBackend::Postgres(PgStore::connect(&db.url(), 4).await.unwrap())
    }
}

on_both_stores!(zone_days_settlement_and_ledger, zone_days_of_one_sim_are_exact_across_a_swap);

async fn zone_days_settlement_and_ledger(kind: Kind) {
    let env = Env::new(kind).await;
    let endpoint = Endpoint::connect(&env.config()).await.unwrap();
    let store = endpoint.store().clone();
    // 23:30 UTC on 2026-01-10 is already 2026-01-11 in Berlin.
    insert(
        &store,
        vec![
            record(1, 0, 0, SIM, 100, unix_s("2026-01-10T12:00:00Z")),
            record(1, 0, 2, SIM, 300, unix_s("2026-01-10T23:30:00Z")),
        ],
    )
    .await;
    let server = common::serve(endpoint).await;
    let base = server.base.clone();
    let http = reqwest::Client::new();
    let token = hex::encode(TOKEN);

    let utc = client::usage_days(&http, &base, &token, "UTC", None, DateRange::default()).await.unwrap();
    assert_eq!(utc.days.len(), 1);
    let berlin = client::usage_days(&http, &base, &token, "Europe/Berlin", Some(SIM), DateRange::default())
        .await
        .unwrap();
    let days: Vec<_> = berlin.days.iter().map(|d| (d.date, d.up_bytes)).collect();
    assert_eq!(days, vec![(date!(2026 - 01 - 10), 100), (date!(2026 - 01 - 11), 200)]);
    let e = client::usage_days(&http, &base, &token, "Mars/Olympus", None, DateRange::default())
        .await
        .unwrap_err();
    assert!(matches!(&e, ClientError::Refused { status: 400, .. }), "{e}");

    // Nothing settled yet: the ledger has no zone.
    let ledger = client::usage_ledger(&http, &base, &token, None, DateRange::default()).await.unwrap();
    assert_eq!((ledger.tz, ledger.days.len()), (None, 0));
    // Both days ended long ago: a 48 h window closes them.
    let r = client::settle(&http, &base, &token, "Europe/Berlin", 48).await.unwrap();
    assert_eq!((r.settled, r.adjustments), (2, 0));
    let e = client::settle(&http, &base, &token, "UTC", 48).await.unwrap_err();
    assert!(matches!(&e, ClientError::Refused { status: 409, .. }), "{e}");
    let e = client::settle(&http, &base, &token, "Mars/Olympus", 48).await.unwrap_err();
    assert!(matches!(&e, ClientError::Refused { status: 400, .. }), "{e}");

    // A late report of day 1 moves 50 bytes: booked as adjustments, settled figures unchanged.
    insert(&store, vec![record(1, 0, 1, SIM, 150, unix_s("2026-01-10T13:00:00Z"))]).await;
    let r = client::settle(&http, &base, &token, "Europe/Berlin", 48).await.unwrap();
    assert_eq!((r.settled, r.adjustments), (0, 2));
    // Settling again books nothing.
    let r = client::settle(&http, &base, &token, "Europe/Berlin", 48).await.unwrap();
    assert_eq!((r.settled, r.adjustments), (0, 0));
    let ledger = client::usage_ledger(&http, &base, &token, Some(SIM), DateRange::default()).await.unwrap();
    assert_eq!(ledger.tz.as_deref(), Some("Europe/Berlin"));
    let view: Vec<_> = ledger
        .days
        .iter()
        .map(|d| {
            (
                d.settled_up_bytes,
                d.adjustments.iter().map(|a| (a.seq, a.delta_up_bytes)).collect::<Vec<_>>(),
                d.booked_total_bytes,
            )
        })
        .collect();
    assert_eq!(view, vec![(100, vec![(1, 50)], 225), (200, vec![(1, -50)], 225)]);
    let json = serde_json::to_value(&ledger.days[0]).unwrap();
    assert_eq!(json["iccid"], "8988280666000000001");
    assert_eq!(json["date"], "2026-01-10");
    // Ranges and other SIMs filter the ledger.
    let range = DateRange { from: Some(date!(2026 - 01 - 11)), to: None };
    let later = client::usage_ledger(&http, &base, &token, Some(SIM), range).await.unwrap();
    assert_eq!(later.days.iter().map(|d| d.date).collect::<Vec<_>>(), vec![date!(2026 - 01 - 11)]);
    let range = DateRange { from: None, to: Some(date!(2026 - 01 - 10)) };
    let earlier = client::usage_ledger(&http, &base, &token, None, range).await.unwrap();
    assert_eq!(earlier.days.iter().map(|d| d.date).collect::<Vec<_>>(), vec![date!(2026 - 01 - 10)]);
    let other =
        client::usage_ledger(&http, &base, &token, Some(SWAPPED_SIM), DateRange::default()).await.unwrap();
    assert!(other.days.is_empty());

    server.stop().await;
}

/// Meter 1 swaps from SIM to SWAPPED_SIM inside one epoch: the second SIM is charged only
/// what came after the swap, also when only its days are asked for.
async fn zone_days_of_one_sim_are_exact_across_a_swap(kind: Kind) {
    let env = Env::new(kind).await;
    let endpoint = Endpoint::connect(&env.config()).await.unwrap();
    let at = unix_s("2026-01-10T12:00:00Z");
    insert(
        endpoint.store(),
        vec![
            record(1, 0, 0, SIM, 100, at),
            record(1, 0, 1, SIM, 300, at + 60),
            record(1, 0, 2, SWAPPED_SIM, 1000, at + 120),
            // Another meter on the swapped SIM, in another epoch layout.
            record(2, 5, 0, SWAPPED_SIM, 10, at),
        ],
    )
    .await;
    let server = common::serve(endpoint).await;
    let base = server.base.clone();
    let http = reqwest::Client::new();
    let token = hex::encode(TOKEN);
    let one = client::usage_days(&http, &base, &token, "Asia/Tokyo", Some(SWAPPED_SIM), DateRange::default())
        .await
        .unwrap();
    let days: Vec<_> = one.days.iter().map(|d| (d.iccid, d.date, d.up_bytes, d.down_bytes)).collect();
    assert_eq!(days, vec![(SWAPPED_SIM, date!(2026 - 01 - 10), 700 + 10, 350 + 5)]);
    let all =
        client::usage_days(&http, &base, &token, "Asia/Tokyo", None, DateRange::default()).await.unwrap();
    let sims: Vec<_> = all.days.iter().map(|d| (d.iccid, d.up_bytes)).collect();
    assert_eq!(sims, vec![(SIM, 300), (SWAPPED_SIM, 710)]);
    server.stop().await;
}

/// Many meters and SIMs over several Berlin days, with reports that arrive late in waves.
fn fleet(wave: u32) -> Vec<NewRecord> {
    let start = unix_s("2026-01-05T06:00:00Z");
    let mut out = Vec::new();
    for meter in 1..=24u64 {
        let sim = 8_988_280_666_000_001_000 + meter % 7;
        for seq in 0..60u32 {
            // Seq k is made at 07:00 + 1.5 k h Berlin time, so 11, 27, 43 and 59 are each
            // day's last. Wave 1 brings 11 and 43 late (their bytes move from the next day to
            // theirs), wave 2 brings 27 and 59 (the same next days gain again): those days
            // are adjusted twice. Every 9th report also arrives in wave 1.
            let belongs = match seq % 32 {
                11 => 1,
                27 => 2,
                _ if seq % 9 == 4 => 1,
                _ => 0,
            };
            if belongs == wave {
                let at = start + u64::from(seq) * 5400 + meter * 60;
                out.push(record(meter, 0, seq, sim, u64::from(seq) * 1000 + meter, at));
            }
        }
    }
    out
}

/// The ledger as a comparable value: every day with its adjustments.
async fn ledger_of(store: &StoreBackend) -> (Option<String>, Vec<LedgerDay>) {
    store.ledger(None, DateRange::default()).await.unwrap()
}

/// The concurrent runs of one moment, added up: what they booked between them.
fn booked_by(runs: &[Settlement]) -> (usize, usize) {
    (runs.iter().map(|s| s.settled.len()).sum(), runs.iter().map(|s| s.adjustments.len()).sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_settlements_book_exactly_what_one_settlement_books() {
    let env = Env::new(Kind::Postgres).await;
    // Four endpoint processes' worth of stores on one database, and a sled reference that
    // settles alone at the same instants.
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(env.pg_store().await);
    }
    let sled_dir = tempfile::tempdir().unwrap();
    let reference = StoreBackend::Sled(Store::open(&sled_dir.path().join("data"), 1 << 20).unwrap());
    let now = "2026-01-20T00:00:00Z".parse::<jiff::Timestamp>().unwrap();

    for wave in 0..3u32 {
        insert(&stores[0], fleet(wave)).await;
        insert(&reference, fleet(wave)).await;
        let now = now.checked_add(jiff::SignedDuration::from_hours(i64::from(wave))).unwrap();
        let expected = reference.settle("Europe/Berlin".into(), 48, now).await.unwrap();
        // All four start together.
        let gate = Arc::new(tokio::sync::Barrier::new(stores.len()));
        let runs: Vec<_> = stores
            .iter()
            .map(|s| {
                let (s, gate) = (s.clone(), gate.clone());
                tokio::spawn(async move {
                    gate.wait().await;
                    s.settle("Europe/Berlin".into(), 48, now).await
                })
            })
            .collect();
        let mut results = Vec::new();
        for r in runs {
            results.push(r.await.unwrap().unwrap());
        }
        // One of them booked everything, the others nothing; together exactly what one
        // settlement alone books.
        assert_eq!(booked_by(&results), booked_by(std::slice::from_ref(&expected)), "wave {wave}");
        assert_eq!(results.iter().filter(|s| **s != Settlement::default()).count(), 1, "wave {wave}");
        match wave {
            0 => assert!(!expected.settled.is_empty() && expected.adjustments.is_empty()),
            _ => assert!(!expected.adjustments.is_empty(), "wave {wave} adjusts closed days"),
        }
        assert_eq!(ledger_of(&stores[1]).await, ledger_of(&reference).await, "wave {wave}");
    }
    // Adjustments are numbered 1, 2, … per SIM-day without gaps or repeats, and settled plus
    // adjustments is today's derivation.
    let (tz, days) = ledger_of(&stores[2]).await;
    assert_eq!(tz.as_deref(), Some("Europe/Berlin"));
    let fresh: DailyUsage = stores[3]
        .daily_usage_in(
            None,
            countersign_cloud::usage::time_zone("Europe/Berlin").unwrap(),
            Default::default(),
        )
        .await
        .unwrap()
        .daily;
    let mut with_two = 0;
    let mut booked = BTreeMap::new();
    for d in &days {
        let seqs: Vec<u32> = d.adjustments.iter().map(|a| a.seq).collect();
        assert_eq!(seqs, (1..=u32::try_from(seqs.len()).unwrap()).collect::<Vec<_>>());
        with_two += usize::from(seqs.len() == 2);
        let up = i128::from(d.settled.totals.up)
            + d.adjustments.iter().map(|a| i128::from(a.delta_up)).sum::<i128>();
        booked.insert((d.settled.iccid, d.settled.date), u64::try_from(up).unwrap());
    }
    assert!(with_two > 0, "some day was adjusted twice");
    let derived: BTreeMap<_, _> = fresh.iter().map(|(k, t)| (*k, t.up)).collect();
    assert_eq!(booked, derived);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_endpoints_settle_one_ledger_over_http() {
    let env = Env::new(Kind::Postgres).await;
    let a = Endpoint::connect(&env.config()).await.unwrap();
    let b = Endpoint::connect(&env.config()).await.unwrap();
    insert(a.store(), fleet(0)).await;
    let (server_a, server_b) = (common::serve(a).await, common::serve(b).await);
    let (base_a, base_b) = (server_a.base.clone(), server_b.base.clone());
    let http = reqwest::Client::new();
    let token = hex::encode(TOKEN);
    let (ra, rb) = tokio::join!(
        client::settle(&http, &base_a, &token, "Europe/Berlin", 48),
        client::settle(&http, &base_b, &token, "Europe/Berlin", 48),
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(ra.settled + rb.settled > 0);
    assert_eq!(ra.settled.min(rb.settled), 0, "a day was settled by both: {ra:?} {rb:?}");
    // The zone is the database's, whichever process is asked.
    let e = client::settle(&http, &base_b, &token, "UTC", 48).await.unwrap_err();
    assert!(matches!(&e, ClientError::Refused { status: 409, .. }), "{e}");
    let la = client::usage_ledger(&http, &base_a, &token, None, DateRange::default()).await.unwrap();
    let lb = client::usage_ledger(&http, &base_b, &token, None, DateRange::default()).await.unwrap();
    assert_eq!(la, lb);
    assert_eq!(la.days.len(), ra.settled + rb.settled);
    tokio::join!(server_a.stop(), server_b.stop());
}
