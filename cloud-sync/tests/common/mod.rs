//! What the endpoint's integration tests share: the two stores, one test per store, an
//! endpoint served in-process, the endpoint binary, and records as ingest stores them.
//! Reports, signed batches, ports and processes come from `countersign-testkit`, shared with
//! the other crates' tests; this module holds what needs the endpoint's own types.
// Each test binary uses its own part of this module.
#![allow(dead_code, unused_macros, clippy::unwrap_used)]

use countersign_cloud::store::postgres::testing::TestDatabase;
use countersign_cloud::store::NewRecord;
use countersign_cloud::{Endpoint, StoreBackend};
use countersign_testkit::procs::Exe;
use countersign_testkit::ReportBuilder;

/// Which store a test runs on.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Sled,
    Postgres,
}

/// The default per-store set-up: the test gets the kind itself.
pub async fn kind(kind: Kind) -> Kind {
    kind
}

/// Where one test keeps its state: a temp dir (the sled store lives there), and a throwaway
/// database on PostgreSQL.
pub async fn state_for(kind: Kind) -> (tempfile::TempDir, Option<TestDatabase>) {
    let db = match kind {
        Kind::Sled => None,
        Kind::Postgres => Some(TestDatabase::create().await.unwrap()),
    };
    (tempfile::tempdir().unwrap(), db)
}

/// Stores records as ingest would (durable when this returns).
pub async fn insert(store: &StoreBackend, records: Vec<NewRecord>) {
    let n = records.len();
    let out = store.insert_batch(1, records).await.unwrap();
    assert_eq!(out.len(), n);
}

/// The record ingest would store for `report`, tagged under the meter's `key` and received
/// at `received_ms`.
pub fn new_record(report: &ReportBuilder, key: &[u8; 32], received_ms: u64) -> NewRecord {
    NewRecord::new(report.report(), received_ms, report.encode(key).into())
}

/// The `[store]` settings of a test's endpoint: sled with a small cache, or its PostgreSQL
/// database with a pool of 4.
pub fn store_section(db: Option<&TestDatabase>) -> String {
    match db {
        None => "cache_capacity_bytes = 8388608".to_owned(),
        Some(db) => {
            format!("backend = 'postgres'\npostgres_url = '{}'\npostgres_pool_connections = 4", db.url())
        }
    }
}

/// An endpoint served in-process on a free port of 127.0.0.1. Dropping it starts the
/// endpoint's graceful shutdown without waiting for it.
pub struct Server {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// The address it listens on.
    pub addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Serves `endpoint` on a free port until the [`Server`] is stopped or dropped.
pub async fn serve(endpoint: Endpoint) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(endpoint.serve(listener, async move {
        let _ = stopped.await;
    }));
    Server { base: format!("http://{addr}"), addr, stop, task }
}

impl Server {
    /// Shuts the endpoint down and waits until it has, failing the test if serving failed.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

/// Serves `app` (a stand-in for another service, such as Lago) on a free port; its base URL.
pub async fn serve_router(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// The `countersign-cloud` binary cargo built for these tests.
pub fn cloud_exe() -> Exe {
    Exe::with_runner(&[], env!("CARGO_BIN_EXE_countersign-cloud")).unwrap()
}

/// Defines one `#[tokio::test]` per store (`on_sled::<name>`, `on_postgres::<name>`) for each
/// `async fn <name>(T)`, where `setup: async fn(Kind) -> T` (default: the `Kind` itself).
macro_rules! on_both_stores {
    (setup = $setup:path; $($name:ident),* $(,)?) => {
        mod on_sled {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($setup(crate::common::Kind::Sled).await).await
                }
            )*
        }
        mod on_postgres {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($setup(crate::common::Kind::Postgres).await).await
                }
            )*
        }
    };
    ($($name:ident),* $(,)?) => {
        on_both_stores!(setup = crate::common::kind; $($name),*);
    };
}
