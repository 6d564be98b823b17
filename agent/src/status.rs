//! What a running agent knows about itself, for `/status`, `/health`, `/metrics` and logs.
//!
//! The tasks update [`AgentStatus`] with atomics as they go; [`AgentStatus::snapshot`]
//! combines it with the buffer's counts. [`Health::of`] is a pure function of a snapshot, so
//! what "healthy" means is tested without an agent. The supervisor keeps the current buffer in
//! a [`BufferSlot`], where the status listener reads those counts: the listener needs this
//! module, never the pipeline.
//!
//! It knows nothing about MQTT, HTTP or the tasks, and of the store only the buffer's type.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::store::Buffer;

/// An upload that has not succeeded for this long makes the agent unhealthy: the endpoint or
/// the uplink is down, and an installer should know.
pub const SYNC_STALE_S_MAX: u64 = 15 * 60;
/// Longest error text kept for `/status`.
const ERROR_TEXT_BYTES_MAX: usize = 512;

/// The buffer of the current pipeline incarnation, for the status listener.
pub type BufferSlot = Arc<Mutex<Option<Buffer>>>;

/// Now, in Unix milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Live state of a running agent, updated by its tasks.
#[derive(Debug)]
pub struct AgentStatus {
    /// Connected to the broker now.
    pub connected: AtomicBool,
    /// The broker holds our subscription on the current connection (confirmed by a SUBACK,
    /// or by a resumed session).
    pub subscribed: AtomicBool,
    /// Reports made durable (and then acked) since start.
    pub reports_committed: AtomicU64,
    /// Payloads quarantined since start.
    pub quarantined: AtomicU64,
    /// Records the endpoint answered for since start.
    pub records_delivered: AtomicU64,
    /// Batches the endpoint answered for since start.
    pub batches_delivered: AtomicU64,
    /// Failed upload attempts since start.
    pub upload_failures: AtomicU64,
    /// Unix ms of the last batch the endpoint answered for (0: none yet).
    pub last_sync_ms: AtomicU64,
    /// Unix ms of the first failure since the last success (0: the last attempt succeeded).
    pub failing_since_ms: AtomicU64,
    /// Sled writes or flushes fail now (disk full, I/O error): nothing is being acked.
    pub store_failing: AtomicBool,
    /// The buffer is at its quota: nothing is being acked until uploads free space.
    pub over_quota: AtomicBool,
    /// Free space on the buffer's filesystem is below the reserve: nothing is being acked.
    pub disk_low: AtomicBool,
    /// Free bytes on the buffer's filesystem at the last look (`u64::MAX`: not looked yet).
    pub disk_free_bytes: AtomicU64,
    /// Logical bytes buffered now (keys and values of pending and quarantined entries).
    pub buffer_bytes: AtomicU64,
    /// Groups of reports the committer held back because of the quota or a failing store.
    pub commits_held: AtomicU64,
    /// Publishes larger than the agent's MQTT packet limit (cut by the MQTT client, acked,
    /// quarantined as `too_large`) since start.
    pub oversized_publishes: AtomicU64,
    /// True payload length of the largest of those.
    pub oversized_bytes_max: AtomicU64,
    /// Oldest quarantine entries dropped to make room since start.
    pub quarantine_dropped: AtomicU64,
    /// Oldest rejected entries dropped to make room since start.
    pub rejected_dropped: AtomicU64,
    /// Endpoint replies that did not name this gateway and the batch sent, or did not have
    /// one result per record: counted as failed uploads, nothing settled.
    pub reply_mismatches: AtomicU64,
    quarantined_by_reason: Mutex<BTreeMap<&'static str, u64>>,
    last_error: Mutex<Option<String>>,
    moved_aside: Mutex<Option<String>>,
}

impl Default for AgentStatus {
    fn default() -> Self {
        Self {
            connected: AtomicBool::new(false),
            subscribed: AtomicBool::new(false),
            reports_committed: AtomicU64::new(0),
            quarantined: AtomicU64::new(0),
            records_delivered: AtomicU64::new(0),
            batches_delivered: AtomicU64::new(0),
            upload_failures: AtomicU64::new(0),
            last_sync_ms: AtomicU64::new(0),
            failing_since_ms: AtomicU64::new(0),
            store_failing: AtomicBool::new(false),
            over_quota: AtomicBool::new(false),
            disk_low: AtomicBool::new(false),
            disk_free_bytes: AtomicU64::new(u64::MAX),
            buffer_bytes: AtomicU64::new(0),
            commits_held: AtomicU64::new(0),
            oversized_publishes: AtomicU64::new(0),
            oversized_bytes_max: AtomicU64::new(0),
            quarantine_dropped: AtomicU64::new(0),
            rejected_dropped: AtomicU64::new(0),
            reply_mismatches: AtomicU64::new(0),
            quarantined_by_reason: Mutex::new(BTreeMap::new()),
            last_error: Mutex::new(None),
            moved_aside: Mutex::new(None),
        }
    }
}

impl AgentStatus {
    /// Remembers the latest error for `/status` (cut to a bounded length).
    pub fn set_error(&self, e: impl std::fmt::Display) {
        let mut s = e.to_string();
        if s.len() > ERROR_TEXT_BYTES_MAX {
            let mut cut = ERROR_TEXT_BYTES_MAX;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
        }
        if let Ok(mut g) = self.last_error.lock() {
            *g = Some(s);
        }
    }

    /// Counts quarantined payloads by reason (reasons are the classifier's static codes, so
    /// the map stays small).
    pub fn count_quarantined(&self, reasons: &BTreeMap<&'static str, u64>) {
        if let Ok(mut g) = self.quarantined_by_reason.lock() {
            for (r, n) in reasons {
                let c = g.entry(r).or_insert(0);
                *c = c.saturating_add(*n);
            }
        }
    }

    /// Records that a corrupt database was moved aside to `path` at start-up.
    pub fn set_moved_aside(&self, path: String) {
        if let Ok(mut g) = self.moved_aside.lock() {
            *g = Some(path);
        }
    }

    /// A consistent-enough view for reporting (each field is read atomically on its own).
    pub fn snapshot(
        &self,
        gateway_id: u64,
        buffered_reports: u64,
        oldest_unsynced_ms: Option<u64>,
        now_ms: u64,
    ) -> StatusSnapshot {
        let last_sync_ms = self.last_sync_ms.load(Ordering::Relaxed);
        let failing_since_ms = self.failing_since_ms.load(Ordering::Relaxed);
        StatusSnapshot {
            gateway_id,
            buffered_reports,
            oldest_unsynced_age_s: oldest_unsynced_ms.map(|t| now_ms.saturating_sub(t) / 1000),
            last_sync_ms: (last_sync_ms != 0).then_some(last_sync_ms),
            last_sync_age_s: (last_sync_ms != 0).then(|| now_ms.saturating_sub(last_sync_ms) / 1000),
            broker_connected: self.connected.load(Ordering::Relaxed),
            broker_subscribed: self.subscribed.load(Ordering::Relaxed),
            endpoint_failing_for_s: (failing_since_ms != 0)
                .then(|| now_ms.saturating_sub(failing_since_ms) / 1000),
            store_failing: self.store_failing.load(Ordering::Relaxed),
            over_quota: self.over_quota.load(Ordering::Relaxed),
            disk_low: self.disk_low.load(Ordering::Relaxed),
            disk_free_bytes: Some(self.disk_free_bytes.load(Ordering::Relaxed)).filter(|b| *b != u64::MAX),
            buffer_bytes: self.buffer_bytes.load(Ordering::Relaxed),
            reports_committed: self.reports_committed.load(Ordering::Relaxed),
            quarantined: self.quarantined.load(Ordering::Relaxed),
            records_delivered: self.records_delivered.load(Ordering::Relaxed),
            batches_delivered: self.batches_delivered.load(Ordering::Relaxed),
            upload_failures: self.upload_failures.load(Ordering::Relaxed),
            commits_held: self.commits_held.load(Ordering::Relaxed),
            oversized_publishes: self.oversized_publishes.load(Ordering::Relaxed),
            oversized_bytes_max: self.oversized_bytes_max.load(Ordering::Relaxed),
            quarantined_by_reason: self
                .quarantined_by_reason
                .lock()
                .map(|g| g.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect())
                .unwrap_or_default(),
            quarantine_dropped: self.quarantine_dropped.load(Ordering::Relaxed),
            rejected_dropped: self.rejected_dropped.load(Ordering::Relaxed),
            reply_mismatches: self.reply_mismatches.load(Ordering::Relaxed),
            last_error: self.last_error.lock().ok().and_then(|g| g.clone()),
            corrupt_db_moved_to: self.moved_aside.lock().ok().and_then(|g| g.clone()),
        }
    }
}

/// The agent's state at one moment, as `/status` and `countersign-agent status` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusSnapshot {
    /// This gateway.
    pub gateway_id: u64,
    /// Reports waiting for the endpoint.
    pub buffered_reports: u64,
    /// Age of the oldest report waiting for the endpoint, by gateway receive time.
    pub oldest_unsynced_age_s: Option<u64>,
    /// When the endpoint last answered for a batch (Unix ms).
    pub last_sync_ms: Option<u64>,
    /// How long ago that was.
    pub last_sync_age_s: Option<u64>,
    /// Connected to the broker.
    pub broker_connected: bool,
    /// The broker holds our subscription on the current connection.
    pub broker_subscribed: bool,
    /// Seconds since uploads started failing, if they are failing.
    pub endpoint_failing_for_s: Option<u64>,
    /// The database refuses writes or flushes.
    pub store_failing: bool,
    /// The buffer is at its quota.
    pub over_quota: bool,
    /// Free space on the buffer's filesystem is below the reserve (`store.disk_free_bytes_min`).
    pub disk_low: bool,
    /// Free bytes on the buffer's filesystem at the last look.
    pub disk_free_bytes: Option<u64>,
    /// Logical bytes buffered.
    pub buffer_bytes: u64,
    /// Reports made durable since start.
    pub reports_committed: u64,
    /// Payloads quarantined since start.
    pub quarantined: u64,
    /// Records delivered since start.
    pub records_delivered: u64,
    /// Batches delivered since start.
    pub batches_delivered: u64,
    /// Failed upload attempts since start.
    pub upload_failures: u64,
    /// Commit groups held back (quota or store failure) since start.
    pub commits_held: u64,
    /// Publishes over the MQTT packet limit, quarantined as `too_large`, since start.
    #[serde(default)]
    pub oversized_publishes: u64,
    /// True payload length of the largest of those.
    #[serde(default)]
    pub oversized_bytes_max: u64,
    /// Payloads quarantined since start, by reason.
    #[serde(default)]
    pub quarantined_by_reason: BTreeMap<String, u64>,
    /// Oldest quarantine entries dropped to make room since start.
    #[serde(default)]
    pub quarantine_dropped: u64,
    /// Oldest rejected entries dropped to make room since start.
    #[serde(default)]
    pub rejected_dropped: u64,
    /// Endpoint replies that did not match the batch sent, since start.
    #[serde(default)]
    pub reply_mismatches: u64,
    /// The latest error, if any.
    pub last_error: Option<String>,
    /// Where a corrupt database was moved at start-up, if that happened.
    pub corrupt_db_moved_to: Option<String>,
}

/// Whether an installer needs to act, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// True when nothing below is wrong.
    pub healthy: bool,
    /// One line per problem, stable enough to grep.
    pub problems: Vec<String>,
    /// What was refused or dropped since start without making the agent unhealthy (reports
    /// keep flowing), one line per cause: an installer should still look.
    #[serde(default)]
    pub warnings: Vec<String>,
}

impl Health {
    /// Judges a snapshot. Pure.
    pub fn of(s: &StatusSnapshot) -> Health {
        let mut problems = Vec::new();
        if !s.broker_connected {
            problems.push("broker: not connected".to_owned());
        }
        if s.store_failing {
            problems.push("store: writes failing (disk full or i/o error); not acking reports".to_owned());
        }
        if s.over_quota {
            problems.push("store: buffer at quota; not acking reports until uploads free space".to_owned());
        }
        if s.disk_low {
            let free = s.disk_free_bytes.map_or_else(|| "unknown".to_owned(), |b| b.to_string());
            problems.push(format!(
                "store: disk nearly full ({free} bytes free, below the reserve); not acking reports"
            ));
        }
        if let Some(f) = s.endpoint_failing_for_s.filter(|f| *f >= SYNC_STALE_S_MAX) {
            problems.push(format!("endpoint: uploads failing for {f} s"));
        }
        if let Some(p) = &s.corrupt_db_moved_to {
            problems
                .push(format!("store: corrupt database moved aside to {p}; run countersign-agent salvage"));
        }
        let mut warnings = Vec::new();
        if s.oversized_publishes > 0 {
            warnings.push(format!(
                "mqtt: {} publishes over the packet limit were acked and quarantined as too_large \
                 (largest {} bytes); see countersign-agent inspect",
                s.oversized_publishes, s.oversized_bytes_max
            ));
        }
        if s.quarantine_dropped > 0 {
            warnings.push(format!(
                "store: quarantine full; {} oldest entries dropped (countersign-agent purge empties it)",
                s.quarantine_dropped
            ));
        }
        if s.rejected_dropped > 0 {
            warnings
                .push(format!("store: rejected reports full; {} oldest entries dropped", s.rejected_dropped));
        }
        if s.reply_mismatches > 0 {
            warnings.push(format!(
                "endpoint: {} replies did not match the batch sent (gateway, batch_seq or record count); \
                 nothing was settled from them",
                s.reply_mismatches
            ));
        }
        Health { healthy: problems.is_empty(), problems, warnings }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_when_connected_and_syncing() {
        let st = AgentStatus::default();
        st.connected.store(true, Ordering::Relaxed);
        let h = Health::of(&st.snapshot(1, 0, None, 1000));
        assert!(h.healthy, "{h:?}");
    }

    #[test]
    fn each_fault_is_named() {
        let st = AgentStatus::default();
        st.store_failing.store(true, Ordering::Relaxed);
        st.over_quota.store(true, Ordering::Relaxed);
        st.disk_low.store(true, Ordering::Relaxed);
        st.failing_since_ms.store(1, Ordering::Relaxed);
        st.set_moved_aside("/x.corrupt".into());
        let h = Health::of(&st.snapshot(1, 5, Some(0), (SYNC_STALE_S_MAX + 1) * 1000));
        assert!(!h.healthy);
        let text = h.problems.join("\n");
        for needle in ["broker", "disk full", "quota", "disk nearly full", "uploads failing", "salvage"] {
            assert!(text.contains(needle), "{needle} missing in {text}");
        }
    }

    #[test]
    fn refusals_are_named_as_warnings_without_making_the_agent_unhealthy() {
        let st = AgentStatus::default();
        st.connected.store(true, Ordering::Relaxed);
        assert!(Health::of(&st.snapshot(1, 0, None, 0)).warnings.is_empty());
        st.oversized_publishes.store(2, Ordering::Relaxed);
        st.oversized_bytes_max.store(4 << 20, Ordering::Relaxed);
        st.quarantine_dropped.store(3, Ordering::Relaxed);
        st.rejected_dropped.store(4, Ordering::Relaxed);
        st.reply_mismatches.store(5, Ordering::Relaxed);
        st.count_quarantined(&BTreeMap::from([("too_large", 2)]));
        st.count_quarantined(&BTreeMap::from([("too_large", 1), ("malformed", 1)]));
        let s = st.snapshot(1, 0, None, 0);
        assert_eq!(
            s.quarantined_by_reason,
            BTreeMap::from([("malformed".into(), 1), ("too_large".into(), 3)])
        );
        let h = Health::of(&s);
        assert!(h.healthy, "{h:?}");
        let text = h.warnings.join("\n");
        for needle in ["too_large", "4194304 bytes", "3 oldest", "4 oldest", "5 replies"] {
            assert!(text.contains(needle), "{needle} missing in {text}");
        }
    }

    #[test]
    fn short_upload_failures_are_not_unhealthy() {
        let st = AgentStatus::default();
        st.connected.store(true, Ordering::Relaxed);
        st.failing_since_ms.store(1000, Ordering::Relaxed);
        assert!(Health::of(&st.snapshot(1, 0, None, 60_000)).healthy);
    }

    #[test]
    fn error_text_is_bounded() {
        let st = AgentStatus::default();
        st.set_error("é".repeat(1000));
        let s = st.snapshot(1, 0, None, 0);
        assert!(s.last_error.unwrap().len() <= ERROR_TEXT_BYTES_MAX);
    }
}
