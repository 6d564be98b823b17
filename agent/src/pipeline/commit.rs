//! The committer: takes publishes off the ingest queue in groups, classifies them, holds a
//! group while the buffer is at its quota or the disk below its reserve, writes it, flushes it,
//! and only then hands its acks to the MQTT client, in receive order. A store failure ends it
//! without acking.
//!
//! It knows nothing about HTTP or the endpoint, and does not poll the broker connection: it
//! only hands acks to the client.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use countersign_meter::report::REPORT_BYTES_MAX;
use rumqttc::{AsyncClient, Publish};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, error, info, warn};

use super::ingest::Received;
use super::reserve::{files_bytes, hold_reason, look_at_disk, reusable_bytes, Hold};
use super::wait::until_true;
use crate::classify::{classify_publish, Verdict};
use crate::config::AgentConfig;
use crate::evidence::{untrusted, LogLimiter};
use crate::status::{now_ms, AgentStatus};
use crate::store::{Buffer, Quarantined, StoreError, QUARANTINE_PAYLOAD_BYTES_MAX};

/// How often a committer held back by the quota looks again.
const QUOTA_RECHECK_MS: u64 = 250;
/// Most acks kept waiting for room in the event loop's request channel (≈ 64 B each).
const ACK_BACKLOG_MAX: usize = 1 << 20;
/// How often waiting acks are retried while no report arrives.
const ACK_RETRY_MS: u64 = 5;
/// How often the durable generation is written beside the database (two fsyncs each).
const GENERATION_REMEMBER_MS: u64 = 5000;

pub(super) struct Committer {
    pub(super) rx: mpsc::Receiver<Received>,
    pub(super) buffer: Buffer,
    pub(super) client: AsyncClient,
    pub(super) config: AgentConfig,
    pub(super) status: Arc<AgentStatus>,
    pub(super) committed: Arc<Notify>,
    pub(super) fault: watch::Sender<bool>,
    pub(super) stop: watch::Receiver<bool>,
}

pub(super) async fn commit_task(mut c: Committer, done: watch::Sender<bool>) {
    commit_loop(&mut c).await;
    // Tells the MQTT task that no more acks will come, whatever the reason.
    let _ = done.send(true);
}

/// A publish reduced to what an ack needs (QoS and packet id), so the backlog stays small.
fn ack_of(p: &Publish) -> Publish {
    let mut a = Publish::new("", p.qos, Vec::new());
    a.pkid = p.pkid;
    a
}

/// Hands acks to the MQTT event loop without waiting, in receive order. What does not fit
/// stays in `acks` for the next round: the committer must keep draining the ingest queue, or
/// the event loop (which also writes the acks) would wait on it for ever. rumqttc writes one
/// request per poll while it reads publishes by the bunch, and a broker that floods a resumed
/// session ignores its in-flight window, so acks can lag far behind during a backlog.
async fn send_acks(c: &mut Committer, acks: &mut std::collections::VecDeque<Publish>) {
    while let Some(a) = acks.front() {
        match c.client.try_ack(a) {
            Ok(()) => {
                acks.pop_front();
            }
            Err(rumqttc::ClientError::TryRequest(_)) if acks.len() < ACK_BACKLOG_MAX => return,
            Err(rumqttc::ClientError::TryRequest(_)) => {
                // Past the backlog bound: wait for room rather than grow further.
                warn!(backlog = acks.len(), "ack backlog at its bound; waiting for the broker connection");
                if c.client.ack(a).await.is_err() {
                    acks.clear();
                    return;
                }
                acks.pop_front();
            }
            // The event loop is gone: the broker redelivers unacked reports after a restart.
            Err(e) => {
                debug!(error = %e, "acks not sent");
                acks.clear();
                return;
            }
        }
    }
}

/// A group written to sled whose flush is running; acked when the flush returns.
struct InFlight {
    flush: tokio::task::JoinHandle<Result<(), StoreError>>,
    acks: Vec<Publish>,
    reports: usize,
    quarantined: std::collections::BTreeMap<&'static str, u64>,
}

/// What became of a flushed group.
enum Landed {
    /// Durable and queued for acking.
    Acked,
    /// The flush failed: nothing of it (or after it) is acked; the pipeline must restart.
    Fault,
}

type FlushResult = Result<Result<(), StoreError>, tokio::task::JoinError>;

/// Waits for a group's flush and, once durable, queues its acks (in receive order).
async fn land(
    c: &mut Committer,
    mut f: InFlight,
    acks: &mut std::collections::VecDeque<Publish>,
    remembered: &mut tokio::time::Instant,
) -> Landed {
    let result = (&mut f.flush).await;
    landed(c, f, result, acks, remembered).await
}

/// [`land`] once the flush's result is known (its task must not be polled again).
async fn landed(
    c: &mut Committer,
    f: InFlight,
    result: FlushResult,
    acks: &mut std::collections::VecDeque<Publish>,
    remembered: &mut tokio::time::Instant,
) -> Landed {
    let result = result.unwrap_or_else(|e| {
        Err(StoreError::Io(sled::Error::Io(std::io::Error::other(format!("flush task failed: {e}")))))
    });
    match result {
        Ok(()) => {
            c.status.store_failing.store(false, Ordering::Relaxed);
            c.status.reports_committed.fetch_add(f.reports as u64, Ordering::Relaxed);
            let quarantined: u64 = f.quarantined.values().sum();
            c.status.quarantined.fetch_add(quarantined, Ordering::Relaxed);
            c.status.count_quarantined(&f.quarantined);
            c.status.buffer_bytes.store(c.buffer.logical_bytes(), Ordering::Relaxed);
            debug!(reports = f.reports, quarantined, "group committed");
            if remembered.elapsed() >= Duration::from_millis(GENERATION_REMEMBER_MS) {
                *remembered = tokio::time::Instant::now();
                if let Err(e) = c.buffer.remember_generation() {
                    warn!(error = %e, "cannot write the generation file");
                }
            }
            acks.extend(f.acks);
            send_acks(c, acks).await;
            c.committed.notify_one();
            Landed::Acked
        }
        Err(e) => {
            store_fault(c, &e, f.reports + f.quarantined.values().sum::<u64>() as usize);
            Landed::Fault
        }
    }
}

fn store_fault(c: &Committer, e: &StoreError, group: usize) {
    c.status.store_failing.store(true, Ordering::Relaxed);
    c.status.commits_held.fetch_add(1, Ordering::Relaxed);
    c.status.set_error(e);
    error!(error = %e, group, "cannot make reports durable; not acking them");
    let _ = c.fault.send(true);
}

/// The committer: gathers a group, writes it, and flushes it while the next group is
/// gathered and written (two groups at most: one being flushed, one being written). A
/// group's acks go out only after its own flush returned, and groups are acked in order.
async fn commit_loop(c: &mut Committer) {
    let mut group: Vec<Received> = Vec::with_capacity(c.config.commit.reports_max);
    let mut acks: std::collections::VecDeque<Publish> = std::collections::VecDeque::new();
    let mut remembered = tokio::time::Instant::now();
    let mut in_flight: Option<InFlight> = None;
    let mut logs = LogLimiter::default();
    loop {
        let first = match in_flight.as_mut() {
            Some(f) => tokio::select! {
                // New reports first: they are written while the flush runs, and the flush is
                // landed right after.
                biased;
                r = c.rx.recv() => Ok(r),
                // The flush returned before a new report came: ack now, not with the next group.
                res = &mut f.flush => Err(res),
            },
            None if acks.is_empty() => Ok(c.rx.recv().await),
            // Acks are waiting for room: retry them every few ms while no report comes.
            None => tokio::select! {
                r = c.rx.recv() => Ok(r),
                _ = tokio::time::sleep(Duration::from_millis(ACK_RETRY_MS)) => {
                    send_acks(c, &mut acks).await;
                    continue;
                }
            },
        };
        let first = match first {
            Err(res) => {
                if let Some(f) = in_flight.take() {
                    if let Landed::Fault = landed(c, f, res, &mut acks, &mut remembered).await {
                        return;
                    }
                }
                continue;
            }
            Ok(None) => break,
            Ok(Some(r)) => r,
        };
        group.push(first);
        // Natural group commit: whatever queued up while the last flush ran shares this one.
        while group.len() < c.config.commit.reports_max {
            match c.rx.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        if in_flight.is_none()
            && group.len() < c.config.commit.reports_max
            && !c.config.commit.delay.is_zero()
        {
            let deadline = tokio::time::Instant::now() + c.config.commit.delay;
            while group.len() < c.config.commit.reports_max {
                match tokio::time::timeout_at(deadline, c.rx.recv()).await {
                    Ok(Some(r)) => group.push(r),
                    _ => break,
                }
            }
        }
        if !wait_for_quota(c, &group).await {
            // Stopping while held: this group was not acked (the broker redelivers it); the
            // one in flight may still be.
            if let Some(f) = in_flight.take() {
                let _ = land(c, f, &mut acks, &mut remembered).await;
            }
            return;
        }
        let staged = stage_group(&c.buffer, &group, &mut logs);
        // The previous group's flush covered writes up to its start; this group's writes
        // need their own flush, started only after that one returned (sled flushes do not
        // overlap well, and acks must stay in order).
        if let Some(f) = in_flight.take() {
            if let Landed::Fault = land(c, f, &mut acks, &mut remembered).await {
                return;
            }
        }
        let Staged { reports, quarantined, quarantine_dropped } = match staged {
            Ok(n) => n,
            Err(e) => {
                store_fault(c, &e, group.len());
                return;
            }
        };
        if quarantine_dropped > 0 {
            c.status.quarantine_dropped.fetch_add(quarantine_dropped, Ordering::Relaxed);
            if let Some(skipped) = logs.admit("quarantine_full", now_ms()) {
                warn!(dropped = quarantine_dropped, skipped, "quarantine full: dropped its oldest entries");
            }
        }
        in_flight = Some(InFlight {
            // Covers this group's writes (see `Buffer::flush`); runs while the next is written.
            flush: tokio::spawn(c.buffer.flush()),
            acks: group.drain(..).map(|r| ack_of(&r.publish)).collect(),
            reports,
            quarantined,
        });
    }
    // The ingest queue closed (stopping): the group in flight is still acked once durable.
    if let Some(f) = in_flight.take() {
        let _ = land(c, f, &mut acks, &mut remembered).await;
    }
}

/// Holds the group while the buffer is at its quota or the disk below its reserve. Returns
/// false if asked to stop.
async fn wait_for_quota(c: &mut Committer, group: &[Received]) -> bool {
    // Only what can become a report counts: quarantine has its own space.
    let cost: u64 = group
        .iter()
        .filter(|r| r.publish.truncated_from.is_none() && r.publish.payload.len() <= REPORT_BYTES_MAX)
        .map(|r| Buffer::report_cost_bytes(r.publish.payload.len()))
        .fold(0u64, u64::saturating_add);
    let mut held: Option<Hold> = None;
    loop {
        let free = look_at_disk(&c.config, &c.status);
        // Only below the reserve are sled's files looked at (a few directory entries).
        let reusable = match free {
            Some(f) if f < c.config.disk_free_bytes_min => {
                reusable_bytes(files_bytes(&c.config.data_dir), c.buffer.logical_bytes())
            }
            _ => 0,
        };
        let hold = hold_reason(
            c.buffer.logical_bytes(),
            cost,
            c.config.quota_bytes,
            free,
            reusable,
            c.config.disk_free_bytes_min,
        );
        if hold != held {
            c.status.over_quota.store(hold == Some(Hold::Quota), Ordering::Relaxed);
            c.status.disk_low.store(hold == Some(Hold::DiskLow), Ordering::Relaxed);
            match hold {
                Some(Hold::Quota) => warn!(
                    buffer_bytes = c.buffer.logical_bytes(),
                    quota_bytes = c.config.quota_bytes,
                    "buffer at quota; not acking until uploads free space (the broker keeps the reports)"
                ),
                Some(Hold::DiskLow) => warn!(
                    free_bytes = free.unwrap_or(0),
                    reserve_bytes = c.config.disk_free_bytes_min,
                    "disk nearly full; not acking until space is freed (the broker keeps the reports)"
                ),
                None => info!(buffer_bytes = c.buffer.logical_bytes(), "room again; acking resumes"),
            }
            if held.is_none() {
                c.status.commits_held.fetch_add(1, Ordering::Relaxed);
            }
            held = hold;
        }
        if hold.is_none() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(QUOTA_RECHECK_MS)) => {}
            _ = until_true(&mut c.stop) => return false,
        }
    }
}

/// What staging a group came to.
struct Staged {
    reports: usize,
    quarantined: std::collections::BTreeMap<&'static str, u64>,
    quarantine_dropped: u64,
}

/// Classifies a group and writes it to sled (not yet durable). Quarantined payloads are
/// logged once per reason and then at most once a minute (see [`LogLimiter`]).
fn stage_group(buffer: &Buffer, group: &[Received], logs: &mut LogLimiter) -> Result<Staged, StoreError> {
    let mut reports: Vec<(countersign_meter::RecordId, u64, &[u8])> = Vec::with_capacity(group.len());
    let mut quarantined = std::collections::BTreeMap::new();
    let dropped_before = buffer.dropped().quarantine;
    for r in group {
        let p = &r.publish;
        match classify_publish(&p.topic, &p.payload, p.truncated_from) {
            Verdict::Report(id) => reports.push((id, r.received_ms, &p.payload)),
            Verdict::Quarantine { reason, detail } => {
                let payload_len = p.truncated_from.unwrap_or(p.payload.len());
                if let Some(skipped) = logs.admit(reason, r.received_ms) {
                    warn!(
                        topic = %untrusted(&p.topic),
                        reason,
                        detail = %untrusted(&detail),
                        bytes = payload_len,
                        skipped,
                        "payload quarantined"
                    );
                }
                let keep = &p.payload[..p.payload.len().min(QUARANTINE_PAYLOAD_BYTES_MAX)];
                buffer.put_quarantine(&Quarantined {
                    received_ms: r.received_ms,
                    topic: p.topic.clone(),
                    reason: reason.to_owned(),
                    detail,
                    payload_len,
                    payload_hex: hex::encode(keep),
                })?;
                *quarantined.entry(reason).or_insert(0u64) += 1;
            }
        }
    }
    // One chunk per CHUNK_REPORTS_MAX reports: a sled insert per report is what limited the
    // committer (the throughput bench showed it).
    buffer.put_reports(&reports)?;
    buffer.bump_generation()?;
    let quarantine_dropped = buffer.dropped().quarantine.saturating_sub(dropped_before);
    Ok(Staged { reports: reports.len(), quarantined, quarantine_dropped })
}
