//! Wallets on both stores: repeated billing runs and growing usage debit exactly the charge,
//! a reopened store debits nothing more, alerts fire once, top-ups are idempotent. On
//! PostgreSQL also: two endpoint processes' worth of stores billing at the same moment
//! debit once.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use countersign_cloud::pricing::PricingConfig;
use countersign_cloud::service::billing::Billing;
use countersign_cloud::store::postgres::testing::TestDatabase;
use countersign_cloud::store::NewRecord;
use countersign_cloud::store::PgStore;
use countersign_cloud::wire::billing::TopupStatus;
use countersign_cloud::{Store, StoreBackend};
use countersign_testkit::{network_time, unix_s, ReportBuilder};

#[macro_use]
mod common;
use common::{new_record, Kind};

const KEY: [u8; 32] = [5u8; 32];
const SIM: u64 = 8_988_280_666_000_000_007;
const GB: u64 = 1_000_000_000;

const PLANS: &str = r#"
[[plan]]
id = "field-example"
currency = "USD"
unit = "GB"
model = "graduated"
tiers = [{ up_to = 100, price = "0.10" }, { up_to = 500, price = "0.08" }, { price = "0.06" }]

[[assign]]
customer = "acme"
group = "fleet"
plan = "field-example"
iccids = ["8988280666000000007"]

[[wallet]]
customer = "acme"
currency = "USD"
opening_credit = "100"
alert_thresholds = ["60", "20"]
overdraft_limit = "10"
"#;

fn ts(s: &str) -> jiff::Timestamp {
    s.parse().unwrap()
}

/// A report of meter 1, epoch 0, whose epoch has used `up` bytes, made at `at`.
fn record(seq: u32, up: u64, at: &str) -> NewRecord {
    let at_s = unix_s(at);
    let r = ReportBuilder::new(1, seq, SIM, network_time(at_s)).used(up, 0);
    new_record(&r, &KEY, at_s * 1000)
}

fn billing() -> Billing {
    Billing::new(PricingConfig::from_toml_str(PLANS).unwrap(), "plans.toml".into(), Duration::from_secs(60))
        .unwrap()
}

enum Env {
    Sled(tempfile::TempDir),
    Postgres(TestDatabase),
}

impl Env {
    async fn open(&self) -> StoreBackend {
        match self {
            Env::Sled(dir) => {
                // sled's flusher may hold the previous handle for a moment after the drop.
                for _ in 0..100 {
                    if let Ok(s) = Store::open(&dir.path().join("data"), 1 << 20) {
                        return StoreBackend::Sled(s);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                panic!("sled store did not reopen");
            }
            Env::Postgres(db) => StoreBackend::Postgres(PgStore::connect(&db.url(), 4).await.unwrap()),
        }
    }
}

async fn sled() -> Env {
    Env::Sled(tempfile::tempdir().unwrap())
}

async fn postgres() -> Env {
    Env::Postgres(TestDatabase::create().await.unwrap())
}

async fn wallet_runs_debit_the_charge_once_across_restarts(env: Env) {
    let b = billing();
    let now = ts("2026-11-30T12:00:00Z");
    {
        let store = env.open().await;
        store.insert_batch(1, vec![record(0, 300 * GB, "2026-11-03T10:00:00Z")]).await.unwrap();
        // 300 GB: $10 + $16.
        let r = b.run(&store, now).await.unwrap();
        let w = &r.wallets[0];
        assert_eq!((w.debited_micros, w.balance_after_micros), (26_000_000, 74_000_000));
        assert!(w.alerts.is_empty() && !w.skipped);
        // Again with the same usage: nothing.
        let r = b.run(&store, now).await.unwrap();
        assert_eq!(r.wallets[0].debited_micros, 0);
        assert!(r.wallets[0].changes.is_empty());
        // Usage grows to 600 GB ($48): only the $22 increase, and the 60 threshold alerts.
        store.insert_batch(1, vec![record(1, 600 * GB, "2026-11-20T10:00:00Z")]).await.unwrap();
        let r = b.run(&store, now).await.unwrap();
        let w = &r.wallets[0];
        assert_eq!((w.debited_micros, w.balance_after_micros), (22_000_000, 52_000_000));
        assert_eq!(w.changes.len(), 1);
        assert_eq!((w.changes[0].previously_micros, w.changes[0].charge_micros), (26_000_000, 48_000_000));
        assert_eq!(w.alerts.len(), 1);
        assert_eq!(
            (w.alerts[0].alert.as_str(), w.alerts[0].threshold_micros),
            ("threshold_crossed", Some(60_000_000))
        );
        let r = b.run(&store, now).await.unwrap();
        assert!(r.wallets[0].alerts.is_empty() && r.wallets[0].debited_micros == 0);
        store.flush().await.unwrap();
    }
    // Restart: a new store handle (and a new Billing, as a new process would have).
    let store = env.open().await;
    let b = billing();
    let r = b.run(&store, now).await.unwrap();
    assert_eq!(r.wallets[0].debited_micros, 0);
    assert!(r.wallets[0].alerts.is_empty());
    let v = b.wallets(&store, Some("acme")).await.unwrap();
    let w = &v.wallets[0];
    assert_eq!(
        (w.balance_micros, w.debited_micros, w.balance.as_str()),
        (52_000_000, 48_000_000, "52.000000")
    );
    assert_eq!(w.debits.len(), 1);
    assert_eq!((w.debits[0].debited_micros, w.debits[0].debits), (48_000_000, 2));
    assert_eq!(w.alerts.len(), 1);
    assert_eq!(w.active_alerts, vec!["threshold:60000000".to_owned()]);

    // Top-ups: booked once under their id; the same id with another amount is refused.
    let t = b.top_up(&store, "acme", "pay-1", 50_000_000, now).await.unwrap();
    assert_eq!((t.status, t.balance_micros), (TopupStatus::Booked, 102_000_000));
    let t = b.top_up(&store, "acme", "pay-1", 50_000_000, now).await.unwrap();
    assert_eq!((t.status, t.balance_micros), (TopupStatus::AlreadyBooked, 102_000_000));
    assert!(b.top_up(&store, "acme", "pay-1", 1, now).await.is_err());
    assert!(b.top_up(&store, "nobody", "pay-1", 1, now).await.is_err());
    // The top-up lifted the balance above 60: that alert is re-armed …
    let v = b.wallets(&store, None).await.unwrap();
    assert!(v.wallets[0].active_alerts.is_empty(), "{:?}", v.wallets[0].active_alerts);
    // … and fires again when December's usage takes the balance down past 60 and 20.
    store.insert_batch(1, vec![record(2, 1600 * GB, "2026-12-01T10:00:00Z")]).await.unwrap();
    let r = b.run(&store, ts("2026-12-01T12:00:00Z")).await.unwrap();
    let w = &r.wallets[0];
    // 1000 GB in December: $10 + $32 + $30.
    assert_eq!((w.debited_micros, w.balance_after_micros), (72_000_000, 30_000_000));
    let kinds: Vec<(&str, Option<i64>)> =
        w.alerts.iter().map(|a| (a.alert.as_str(), a.threshold_micros)).collect();
    assert_eq!(kinds, vec![("threshold_crossed", Some(60_000_000))]);
    let seqs: Vec<u64> =
        b.wallets(&store, None).await.unwrap().wallets[0].alerts.iter().map(|a| a.seq).collect();
    assert_eq!(seqs, vec![1, 2]);
}

async fn env(kind: Kind) -> Env {
    match kind {
        Kind::Sled => sled().await,
        Kind::Postgres => postgres().await,
    }
}

on_both_stores!(setup = env;
    wallet_runs_debit_the_charge_once_across_restarts);

/// Two processes' worth of endpoints (own pools, own `Billing`) on one database run billing
/// at the same moment, round after round as usage grows: the wallet is debited exactly the
/// charge, every alert is recorded once, and the runs never fail on each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_runs_on_one_postgres_debit_once() {
    let db = TestDatabase::create().await.unwrap();
    let s1 = StoreBackend::Postgres(PgStore::connect(&db.url(), 4).await.unwrap());
    let s2 = StoreBackend::Postgres(PgStore::connect(&db.url(), 4).await.unwrap());
    let (b1, b2) = (billing(), billing());
    let now = ts("2026-11-30T12:00:00Z");
    let mut expected_debits = 0i64;
    for round in 1..=12u32 {
        // 60 GB more each round, up to 720 GB: $10, then $0.08/GB, then $0.06/GB.
        let used = u64::from(round) * 60 * GB;
        s1.insert_batch(1, vec![record(round, used, "2026-11-10T10:00:00Z")]).await.unwrap();
        let (r1, r2) = tokio::join!(b1.run(&s1, now), b2.run(&s2, now));
        let (r1, r2) = (r1.unwrap(), r2.unwrap());
        let gb = used / GB;
        let charge = match gb {
            0..=100 => gb * 100_000,
            101..=500 => 10_000_000 + (gb - 100) * 80_000,
            _ => 42_000_000 + (gb - 500) * 60_000,
        };
        let this_round = r1.wallets[0].debited_micros + r2.wallets[0].debited_micros;
        expected_debits += this_round;
        assert_eq!(expected_debits, i64::try_from(charge).unwrap(), "round {round}");
    }
    let v = b1.wallets(&s2, Some("acme")).await.unwrap();
    let w = &v.wallets[0];
    // 720 GB: $10 + $32 + $13.20.
    assert_eq!((w.debited_micros, w.balance_micros), (55_200_000, 44_800_000));
    let alerts: Vec<(&str, Option<i64>, u64)> =
        w.alerts.iter().map(|a| (a.alert.as_str(), a.threshold_micros, a.seq)).collect();
    assert_eq!(alerts, vec![("threshold_crossed", Some(60_000_000), 1)]);
}
