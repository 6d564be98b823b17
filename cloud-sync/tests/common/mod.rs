//! What the endpoint's integration tests share: the two stores, and one test per store.
// Each test binary uses its own part of this module.
#![allow(dead_code, clippy::unwrap_used)]

use countersign_cloud::postgres::testing::TestDatabase;
use countersign_cloud::store::NewRecord;
use countersign_cloud::StoreBackend;

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
