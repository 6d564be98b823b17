//! The store contract, the same on both stores: dedupe by record id, conflicts kept out,
//! registrations idempotent and never overwritten, usage derived from what is stored. Plus
//! what only PostgreSQL can be asked: migrations under concurrency, and several processes'
//! worth of stores ingesting the same batches at once.
#![allow(clippy::unwrap_used)]

use countersign_cloud::store::postgres::migrations::MIGRATIONS;
use countersign_cloud::store::postgres::testing::TestDatabase;
use countersign_cloud::store::PgStore;
use countersign_cloud::store::{InsertOutcome, NewRecord, Registration, StoredRecord};
use countersign_cloud::{Store, StoreBackend, StoreError};
use countersign_meter::{RecordId, Totals};
use countersign_testkit::{network_time, signing_key, ReportBuilder};

#[macro_use]
mod common;
use common::{new_record, Kind};

const KEY: [u8; 32] = [5u8; 32];
const SIM: u64 = 8_988_280_666_000_000_007;
const OTHER_SIM: u64 = 8_988_280_666_000_000_008;
/// 2026-11-24T12:00:00Z.
const NOON_S: u64 = 1_795_521_600;

fn record(meter_id: u64, seq: u32, iccid: u64, up: u64) -> NewRecord {
    let r = ReportBuilder::new(meter_id, seq, iccid, network_time(NOON_S)).used(up, 2 * up);
    new_record(&r, &KEY, NOON_S * 1000)
}

struct Env {
    _dir: tempfile::TempDir,
    _db: Option<TestDatabase>,
    store: StoreBackend,
}

async fn sled() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("data"), 1 << 20).unwrap();
    Env { _dir: dir, _db: None, store: StoreBackend::Sled(store) }
}

async fn postgres() -> Env {
    let db = TestDatabase::create().await.unwrap();
    let store = PgStore::connect(&db.url(), 4).await.unwrap();
    Env { _dir: tempfile::tempdir().unwrap(), _db: Some(db), store: StoreBackend::Postgres(store) }
}

async fn env(kind: Kind) -> Env {
    match kind {
        Kind::Sled => sled().await,
        Kind::Postgres => postgres().await,
    }
}

on_both_stores!(setup = env;

    insert_dedupes_and_refuses_conflicts,
    registry_is_idempotent_and_never_overwritten,
    usage_spans_meters_and_sims,
    tokens_are_unique_by_name_and_secret
);

async fn insert_dedupes_and_refuses_conflicts(env: Env) {
    let s = &env.store;
    let a = record(3, 0, SIM, 100);
    let b = record(3, 1, SIM, 200);
    let a_other_bytes = record(3, 0, SIM, 999);
    let a_other_sim = record(3, 0, OTHER_SIM, 100);
    // Inside one batch: the second copy of an id is settled against the first.
    let out = s.insert_batch(1, vec![a.clone(), b.clone(), a.clone(), a_other_bytes.clone()]).await.unwrap();
    use InsertOutcome::*;
    assert_eq!(out, vec![Stored, Stored, Duplicate, Conflict]);
    // Across batches, via another gateway: duplicate; other bytes or another SIM: conflict.
    let out = s.insert_batch(2, vec![b.clone(), a_other_sim, a_other_bytes, a.clone()]).await.unwrap();
    assert_eq!(out, vec![Duplicate, Conflict, Conflict, Duplicate]);
    assert_eq!(s.insert_batch(2, vec![]).await.unwrap(), vec![]);
    assert_eq!(s.record_count().await.unwrap(), 2);
    // The first copy is kept, as evidence, with who delivered it.
    let kept = s.record(a.id).await.unwrap().unwrap();
    assert_eq!(kept, StoredRecord { gateway_id: 1, received_ms: NOON_S * 1000, report: a.report.to_vec() });
    assert_eq!(s.record(RecordId { meter_id: 3, epoch: 0, seq: 9 }).await.unwrap(), None);
}

async fn registry_is_idempotent_and_never_overwritten(env: Env) {
    let s = &env.store;
    // Ids beyond i64 must round-trip through PostgreSQL's BIGINT.
    for id in [7, u64::MAX] {
        assert_eq!(s.meter_keys(vec![id]).await.unwrap().len(), 0);
        assert_eq!(s.add_meter(id, KEY).await.unwrap(), Registration::Created);
        assert_eq!(s.add_meter(id, KEY).await.unwrap(), Registration::AlreadyRegistered);
        let e = s.add_meter(id, [6u8; 32]).await.unwrap_err();
        assert!(matches!(e, StoreError::Conflict { kind: "meter", id: i } if i == id), "{e}");
        assert!(!e.is_recoverable());
    }
    let keys = s.meter_keys(vec![7, u64::MAX, 8]).await.unwrap();
    assert_eq!((keys.len(), keys[&7], keys[&u64::MAX]), (2, KEY, KEY));

    let gw = signing_key(1).verifying_key();
    let other = signing_key(2).verifying_key();
    assert_eq!(s.add_gateway(1, gw).await.unwrap(), Registration::Created);
    assert_eq!(s.add_gateway(1, gw).await.unwrap(), Registration::AlreadyRegistered);
    assert!(matches!(s.add_gateway(1, other).await, Err(StoreError::Conflict { kind: "gateway", id: 1 })));
    assert_eq!(s.gateway_key(1).await.unwrap(), Some(gw));
    assert_eq!(s.gateway_key(2).await.unwrap(), None);
}

async fn usage_spans_meters_and_sims(env: Env) {
    let s = &env.store;
    let high_meter = u64::MAX - 1;
    // Meter 3 swaps SIM inside its epoch: the running maximum spans both SIMs, so the second
    // SIM is charged only what came after the swap.
    let records = vec![
        record(3, 0, SIM, 0),
        record(3, 2, OTHER_SIM, 500),
        record(3, 1, SIM, 300),
        record(high_meter, 0, OTHER_SIM, 10),
        record(high_meter, 1, OTHER_SIM, 40),
    ];
    let out = s.insert_batch(1, records).await.unwrap();
    assert!(out.iter().all(|o| *o == InsertOutcome::Stored));
    let all = s.daily_usage(None, Default::default()).await.unwrap().daily;
    let totals: Vec<_> = all.iter().map(|((sim, _), t)| (*sim, *t)).collect();
    assert_eq!(
        totals,
        vec![(SIM, Totals { up: 300, down: 600 }), (OTHER_SIM, Totals { up: 240, down: 480 })]
    );
    let one = s.daily_usage(Some(OTHER_SIM), Default::default()).await.unwrap().daily;
    assert_eq!(one.get(&(OTHER_SIM, all.keys().next().unwrap().1)), Some(&Totals { up: 240, down: 480 }));
}

async fn tokens_are_unique_by_name_and_secret(env: Env) {
    let s = &env.store;
    let h1 = [1u8; 32];
    let h2 = [2u8; 32];
    assert_eq!(s.add_token("billing".into(), "query", h1).await.unwrap(), Registration::Created);
    assert_eq!(s.add_token("billing".into(), "query", h1).await.unwrap(), Registration::AlreadyRegistered);
    assert!(matches!(
        s.add_token("billing".into(), "admin", h2).await,
        Err(StoreError::TokenConflict { .. })
    ));
    assert!(matches!(s.add_token("other".into(), "query", h1).await, Err(StoreError::TokenConflict { .. })));
    assert_eq!(s.add_token("ops".into(), "admin", h2).await.unwrap(), Registration::Created);
    assert_eq!(s.token(h1).await.unwrap(), Some(("billing".into(), "query".into())));
    assert_eq!(
        s.tokens().await.unwrap(),
        vec![("billing".into(), "query".into()), ("ops".into(), "admin".into())]
    );
    assert!(s.revoke_token("billing".into()).await.unwrap());
    assert!(!s.revoke_token("billing".into()).await.unwrap());
    assert_eq!(s.token(h1).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migrations_run_once_under_concurrency() {
    let db = TestDatabase::create().await.unwrap();
    let url = db.url();
    // Four processes' worth of stores starting at once: the advisory lock serialises them,
    // and each migration is applied exactly once.
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PgStore::connect(&url, 1).await })
        })
        .collect();
    for s in starts {
        s.await.unwrap().unwrap();
    }
    let store = PgStore::connect(&url, 1).await.unwrap();
    assert_eq!(store.migrate().await.unwrap(), Vec::<i32>::new(), "nothing left to apply");
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let versions: Vec<i32> = client
        .query("SELECT version FROM schema_migrations ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, MIGRATIONS.iter().map(|m| m.version).collect::<Vec<_>>());
    // A database from a newer binary is refused rather than written to.
    client
        .execute("INSERT INTO schema_migrations (version, name) VALUES (999, 'future')", &[])
        .await
        .unwrap();
    let e = PgStore::connect(&url, 1).await.unwrap_err();
    assert!(matches!(e, StoreError::Migration { version: 999, .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_ingest_of_the_same_batches_stores_each_record_once() {
    let db = TestDatabase::create().await.unwrap();
    let a = PgStore::connect(&db.url(), 4).await.unwrap();
    let b = PgStore::connect(&db.url(), 4).await.unwrap();
    // Overlapping batches in different orders, sent through two pools at once.
    let batches: Vec<Vec<NewRecord>> = (0..8u32)
        .map(|k| {
            let mut v: Vec<NewRecord> =
                (0..200u32).map(|i| record(u64::from(i % 10), i + k * 100, SIM, 1)).collect();
            if k % 2 == 1 {
                v.reverse();
            }
            v
        })
        .collect();
    let mut tasks = Vec::new();
    for batch in &batches {
        for store in [&a, &b] {
            let (store, batch) = (store.clone(), batch.clone());
            tasks.push(tokio::spawn(async move { store.insert_batch(1, &batch).await }));
        }
    }
    let mut stored = 0usize;
    for t in tasks {
        let out = t.await.unwrap().unwrap();
        assert!(out.iter().all(|o| *o != InsertOutcome::Conflict));
        stored += out.iter().filter(|o| **o == InsertOutcome::Stored).count();
    }
    // Ids are (i % 10, 0, i + 100 k): 200 + 7 × 100 distinct ids over the 8 batches.
    assert_eq!(stored, 900, "every id stored exactly once across both pools");
    assert_eq!(a.record_count().await.unwrap(), 900);
}
