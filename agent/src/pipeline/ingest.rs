//! The ingest queue between the MQTT event loop and the committer: what a queued publish
//! carries and what it costs. The queue is bounded in count ([`INGEST_QUEUE_REPORTS_MAX`]) and in
//! bytes ([`INGEST_QUEUE_BYTES_MAX`]); a publish holds its share of the bytes until the committer
//! is done with it.
//!
//! It knows nothing about the broker connection, the store or acks.

use rumqttc::Publish;
use tokio::sync::OwnedSemaphorePermit;

/// Capacity of the queue between the MQTT event loop and the committer: the event loop waits
/// when it is full, which is how a slow disk slows the intake. Two commit groups of the
/// default size (`commit.reports_max`, 1024): one arriving while the other is flushed; more
/// only costs memory while a backlog arrives.
pub const INGEST_QUEUE_REPORTS_MAX: usize = 2048;
/// Most payload and topic bytes in that queue (each publish also counts
/// [`INGEST_ITEM_OVERHEAD_BYTES`]): a flood of large payloads (QoS 0 has no in-flight window)
/// makes the event loop wait, and the broker and TCP hold the rest, instead of the agent's
/// memory.
pub const INGEST_QUEUE_BYTES_MAX: usize = 4 * 1024 * 1024;
/// What one queued publish costs besides its payload and topic.
pub const INGEST_ITEM_OVERHEAD_BYTES: usize = 128;

/// A publish taken off the broker connection, waiting for the committer.
pub(super) struct Received {
    pub(super) publish: Publish,
    pub(super) received_ms: u64,
    /// Its share of [`INGEST_QUEUE_BYTES_MAX`], given back when the committer is done with it.
    pub(super) _room: OwnedSemaphorePermit,
}

/// What a publish costs in the ingest queue, in bytes (never more than the whole queue).
pub(super) fn ingest_cost(p: &Publish) -> u32 {
    let n = p.payload.len().saturating_add(p.topic.len()).saturating_add(INGEST_ITEM_OVERHEAD_BYTES);
    u32::try_from(n.min(INGEST_QUEUE_BYTES_MAX)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::QoS;

    #[test]
    fn ingest_cost_is_bounded_by_the_queue() {
        let small = Publish::new("t", QoS::AtLeastOnce, vec![0u8; 100]);
        assert_eq!(ingest_cost(&small) as usize, 101 + INGEST_ITEM_OVERHEAD_BYTES);
        let huge = Publish::new("t", QoS::AtLeastOnce, vec![0u8; INGEST_QUEUE_BYTES_MAX + 1]);
        assert_eq!(ingest_cost(&huge) as usize, INGEST_QUEUE_BYTES_MAX);
    }
}
