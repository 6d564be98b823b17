//! The Lago outbox on both backends: events planned from stored records, held until Lago
//! accepted them. What an event says is the rating core's [`plan_event`](countersign_rating::lago::plan_event);
//! the exporter that sends them is [`crate::service::lago`].

use std::collections::BTreeMap;

use countersign_rating::lago::LagoMetric;

pub use super::postgres::lago::PgOutbox;
pub use super::sled::lago::Outbox;
use super::{blocking, StoreBackend, StoreError};

/// Records planned per sled transaction batch before a flush.
pub const LAGO_PLAN_RECORDS_PER_FLUSH_MAX: usize = 1000;

impl StoreBackend {
    /// Tells the store that no Lago export is configured: on sled, new records are no longer
    /// queued for the planner and the queue is emptied (a later export queues what is
    /// unplanned again). On PostgreSQL nothing changes: other processes may export.
    pub async fn lago_export_unconfigured(&self) -> Result<(), StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.lago_pending_off()).await
            }
            Self::Postgres(_) => Ok(()),
        }
    }
}

/// The outbox of whichever store the endpoint runs on: the thin IO under the shared loop.
#[derive(Debug)]
pub enum LagoOutbox {
    /// The outbox trees of the sled store.
    Sled(Outbox),
    /// The outbox tables of the PostgreSQL store.
    Postgres(PgOutbox),
}

impl LagoOutbox {
    /// The outbox of `store`, sled or PostgreSQL.
    pub fn open(store: &StoreBackend) -> Result<Self, StoreError> {
        Ok(match store {
            StoreBackend::Sled(s) => Self::Sled(Outbox::open(s)?),
            StoreBackend::Postgres(p) => Self::Postgres(PgOutbox::new(p)),
        })
    }

    /// Whether this exporter may plan and send now (always on sled; on PostgreSQL only while
    /// it holds the export lock, which this tries to take).
    pub async fn acquire(&self) -> Result<bool, StoreError> {
        match self {
            Self::Sled(_) => Ok(true),
            Self::Postgres(p) => p.acquire().await,
        }
    }

    /// Gives up the export lock after a failure, so that a healthy exporter can take over.
    pub async fn release(&self) {
        if let Self::Postgres(p) = self {
            p.release().await;
        }
    }

    /// Plans an event for every stored record not planned yet whose SIM has a subscription in
    /// `subscriptions`, for the billable metric `metric` (code and field); durable when it
    /// returns. Returns how many were planned.
    pub async fn plan(
        &self,
        subscriptions: &BTreeMap<u64, String>,
        metric: &LagoMetric,
    ) -> Result<usize, StoreError> {
        match self {
            Self::Sled(o) => {
                let (o, subscriptions, metric) = (o.clone(), subscriptions.clone(), metric.clone());
                blocking(move || o.plan(&subscriptions, &metric)).await
            }
            Self::Postgres(p) => p.plan(subscriptions, metric).await,
        }
    }

    /// The next events to send: up to `max` (key, JSON bytes) in plan order.
    pub async fn peek(&self, max: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        match self {
            Self::Sled(o) => o.peek(max),
            Self::Postgres(p) => p.peek(max).await,
        }
    }

    /// Removes delivered events; durable when it returns.
    pub async fn settle(&self, delivered: Vec<u64>) -> Result<(), StoreError> {
        match self {
            Self::Sled(o) => {
                let o = o.clone();
                blocking(move || o.settle(&delivered)).await
            }
            Self::Postgres(p) => p.settle(&delivered).await,
        }
    }

    /// Events planned and not yet accepted by Lago.
    pub async fn pending(&self) -> Result<u64, StoreError> {
        match self {
            Self::Sled(o) => {
                u64::try_from(o.pending()).map_err(|_| StoreError::Corrupt("outbox length".into()))
            }
            Self::Postgres(p) => p.pending().await,
        }
    }
}
