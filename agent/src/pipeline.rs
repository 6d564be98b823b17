//! The agent's three tasks and the channels between them.
//!
//! ```text
//!  MQTT event loop ──(bounded queue)──► committer ──notify──► uploader ──HTTPS──► endpoint
//!   receive QoS 1                        write sled            read pending
//!   (manual acks)  ◄──────── ack ─────── flush, then ack       sign, POST, settle
//! ```
//!
//! Invariants:
//! - A report is acked only after the sled flush that covers it returned, in receive order.
//! - A report leaves sled only after the endpoint answered for it.
//! - The ingest queue holds at least as many reports as the broker may have in flight to us,
//!   so the event loop never blocks on a committer that is itself waiting to send an ack.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use countersign_protocol::{BatchBuilder, BatchHeader, BatchReply, ErrorBody, RecordRef};
use ed25519_dalek::SigningKey;
use rand::Rng;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::backoff::Backoff;
use crate::classify::{classify, Verdict};
use crate::config::AgentConfig;
use crate::store::{Buffer, Quarantined, StoreError, QUARANTINE_PAYLOAD_BYTES_MAX};

/// Capacity of the queue between the MQTT event loop and the committer. It must exceed what
/// a broker keeps in flight to one client (Mosquitto: `max_inflight_messages`, default 20).
pub const INGEST_QUEUE_REPORTS_MAX: usize = 4096;
/// Capacity of rumqttc's request channel (acks, subscribes).
const MQTT_REQUESTS_MAX: usize = INGEST_QUEUE_REPORTS_MAX;
/// Largest MQTT packet accepted: far above a report, so an oversized payload reaches the
/// quarantine instead of breaking the connection (and being redelivered forever).
pub const MQTT_PACKET_BYTES_MAX: usize = 256 * 1024;
/// Backoff bounds for reconnecting to the broker.
const MQTT_RECONNECT_MS_MIN: u64 = 200;
const MQTT_RECONNECT_MS_MAX: u64 = 30_000;
/// Backoff bounds for retrying a failed sled write or flush.
const STORE_RETRY_MS_MIN: u64 = 100;
const STORE_RETRY_MS_MAX: u64 = 10_000;
/// How long shutdown waits for the last acks to go out.
const SHUTDOWN_ACK_WAIT_MS: u64 = 2000;

/// Errors that stop the agent at start-up. Runtime faults are retried, not returned.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The durable buffer could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The gateway key could not be read.
    #[error(transparent)]
    Key(#[from] countersign_protocol::keys::KeyError),
    /// The HTTP client could not be built (TLS set-up).
    #[error("http client: {0}")]
    Http(String),
}

/// Live state of a running agent, shared with whoever wants to watch it (status, health).
#[derive(Debug, Default)]
pub struct AgentStatus {
    /// Connected to the broker now.
    pub connected: AtomicBool,
    /// The broker confirmed our subscription at least once.
    pub subscribed: AtomicBool,
    /// Reports made durable (and then acked) since start.
    pub reports_committed: AtomicU64,
    /// Payloads quarantined since start.
    pub quarantined: AtomicU64,
    /// Records the endpoint answered for since start.
    pub records_delivered: AtomicU64,
}

struct Received {
    publish: Publish,
    received_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn jitter() -> f64 {
    rand::thread_rng().gen::<f64>()
}

/// Runs the agent until `shutdown` completes, then flushes and returns.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()> + Send) -> Result<(), AgentError> {
    run_observed(config, Arc::new(AgentStatus::default()), shutdown).await
}

/// [`run`], updating `status` as it goes.
pub async fn run_observed(
    config: AgentConfig,
    status: Arc<AgentStatus>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    // Ignore the error: a host program may already have installed the same provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let key = countersign_protocol::keys::read_gateway_key(&config.gateway_key_file)?;
    let buffer = Buffer::open(&config.data_dir, config.cache_capacity_bytes)?;
    let http = reqwest::Client::builder()
        .timeout(config.http_timeout)
        .build()
        .map_err(|e| AgentError::Http(e.to_string()))?;
    run_with(config, buffer, key, http, status, shutdown).await;
    Ok(())
}

/// Runs the agent on an already opened buffer (used by tests and embedders).
pub async fn run_with(
    config: AgentConfig,
    buffer: Buffer,
    key: SigningKey,
    http: reqwest::Client,
    status: Arc<AgentStatus>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let stats = buffer.stats();
    info!(
        gateway_id = config.gateway_id,
        pending = stats.pending,
        quarantined = stats.quarantined,
        rejected = stats.rejected,
        "agent starting"
    );
    let mut opts =
        MqttOptions::new(config.mqtt.client_id.clone(), config.mqtt.host.clone(), config.mqtt.port);
    opts.set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(config.mqtt.keep_alive)
        .set_max_packet_size(MQTT_PACKET_BYTES_MAX, MQTT_PACKET_BYTES_MAX);
    if let Some((u, p)) = &config.mqtt.credentials {
        opts.set_credentials(u.clone(), p.clone());
    }
    let (client, eventloop) = AsyncClient::new(opts, MQTT_REQUESTS_MAX);
    let (tx, rx) = mpsc::channel(INGEST_QUEUE_REPORTS_MAX);
    let (stop_tx, stop_rx) = watch::channel(false);
    let committed = Arc::new(Notify::new());
    let (commit_done_tx, commit_done_rx) = watch::channel(false);

    let mqtt = tokio::spawn(
        mqtt_task(
            eventloop,
            client.clone(),
            config.mqtt.topic.clone(),
            tx,
            status.clone(),
            stop_rx.clone(),
            commit_done_rx,
        )
        .instrument(info_span!("mqtt", client_id = %config.mqtt.client_id)),
    );
    let committer = tokio::spawn(
        commit_task(
            rx,
            buffer.clone(),
            client.clone(),
            config.clone(),
            status.clone(),
            committed.clone(),
            commit_done_tx,
        )
        .instrument(info_span!("commit")),
    );
    let uploader = tokio::spawn(
        upload_task(buffer.clone(), key, http, config.clone(), status, committed, stop_rx)
            .instrument(info_span!("upload", gateway_id = config.gateway_id)),
    );

    shutdown.await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    for (name, task) in [("mqtt", mqtt), ("commit", committer), ("upload", uploader)] {
        if let Err(e) = task.await {
            error!(task = name, error = %e, "task ended abnormally");
        }
    }
    if let Err(e) = buffer.flush().await {
        error!(error = %e, "final flush failed");
    }
    info!("agent stopped");
}

async fn mqtt_task(
    mut eventloop: EventLoop,
    client: AsyncClient,
    topic: String,
    tx: mpsc::Sender<Received>,
    status: Arc<AgentStatus>,
    mut stop: watch::Receiver<bool>,
    mut commit_done: watch::Receiver<bool>,
) {
    let mut tx = Some(tx);
    let mut backoff = Backoff::new(
        Duration::from_millis(MQTT_RECONNECT_MS_MIN),
        Duration::from_millis(MQTT_RECONNECT_MS_MAX),
    );
    loop {
        tokio::select! {
            _ = stop.changed(), if tx.is_some() => {
                // Stop taking reports; keep polling so the committer's last acks go out.
                tx = None;
            }
            _ = commit_done.changed() => break,
            ev = eventloop.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff.reset();
                    status.connected.store(true, Ordering::Relaxed);
                    info!(session_present = ack.session_present, "connected to broker");
                    // A broker without our session has forgotten the subscription too, and
                    // rumqttc does not resubscribe by itself.
                    if !ack.session_present {
                        if let Err(e) = client.subscribe(topic.clone(), QoS::AtLeastOnce).await {
                            warn!(error = %e, "subscribe request failed");
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let Some(q) = &tx else { continue };
                    let received = Received { publish, received_ms: now_ms() };
                    if q.send(received).await.is_err() {
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    status.subscribed.store(true, Ordering::Relaxed);
                    info!(%topic, "subscribed");
                }
                Ok(_) => {}
                Err(e) => {
                    status.connected.store(false, Ordering::Relaxed);
                    let delay = backoff.next_delay(jitter());
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "broker connection failed");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = commit_done.changed() => break,
                    }
                }
            }
        }
    }
    // Give the final acks a moment to leave, then say goodbye; the session stays on the broker.
    let _ = client.disconnect().await;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(SHUTDOWN_ACK_WAIT_MS);
    while let Ok(Ok(ev)) = tokio::time::timeout_at(deadline, eventloop.poll()).await {
        if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
            break;
        }
    }
}

async fn commit_task(
    mut rx: mpsc::Receiver<Received>,
    buffer: Buffer,
    client: AsyncClient,
    config: AgentConfig,
    status: Arc<AgentStatus>,
    committed: Arc<Notify>,
    done: watch::Sender<bool>,
) {
    let mut group: Vec<Received> = Vec::with_capacity(config.commit.reports_max);
    while let Some(first) = rx.recv().await {
        group.push(first);
        // Natural group commit: whatever queued up while the last flush ran shares this one.
        while group.len() < config.commit.reports_max {
            match rx.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        if group.len() < config.commit.reports_max && !config.commit.delay.is_zero() {
            let deadline = tokio::time::Instant::now() + config.commit.delay;
            while group.len() < config.commit.reports_max {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(r)) => group.push(r),
                    _ => break,
                }
            }
        }
        let (reports, quarantined) = commit_group(&buffer, &group).await;
        status.reports_committed.fetch_add(reports as u64, Ordering::Relaxed);
        status.quarantined.fetch_add(quarantined as u64, Ordering::Relaxed);
        for r in group.drain(..) {
            // Fails only if the event loop is gone; the broker then redelivers after restart.
            if let Err(e) = client.ack(&r.publish).await {
                debug!(error = %e, "ack not sent");
            }
        }
        committed.notify_one();
    }
    let _ = done.send(true);
}

/// Writes and flushes a group, retrying until it is durable: nothing is acked before that,
/// so while the disk refuses writes the broker keeps the reports.
async fn commit_group(buffer: &Buffer, group: &[Received]) -> (usize, usize) {
    let mut backoff =
        Backoff::new(Duration::from_millis(STORE_RETRY_MS_MIN), Duration::from_millis(STORE_RETRY_MS_MAX));
    loop {
        match write_group(buffer, group).await {
            Ok((reports, quarantined)) => {
                debug!(reports, quarantined, "group committed");
                return (reports, quarantined);
            }
            Err(e) => {
                let delay = backoff.next_delay(jitter());
                error!(error = %e, group = group.len(), retry_in_ms = delay.as_millis() as u64,
                       "cannot make reports durable; not acking");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

async fn write_group(buffer: &Buffer, group: &[Received]) -> Result<(usize, usize), StoreError> {
    let mut reports = 0;
    let mut quarantined = 0;
    for r in group {
        let p = &r.publish;
        match classify(&p.topic, &p.payload) {
            Verdict::Report(id) => {
                buffer.put_report(id, r.received_ms, &p.payload)?;
                reports += 1;
            }
            Verdict::Quarantine { reason, detail } => {
                warn!(topic = %p.topic, reason, %detail, bytes = p.payload.len(), "payload quarantined");
                let keep = &p.payload[..p.payload.len().min(QUARANTINE_PAYLOAD_BYTES_MAX)];
                buffer.put_quarantine(&Quarantined {
                    received_ms: r.received_ms,
                    topic: p.topic.clone(),
                    reason: reason.to_owned(),
                    detail,
                    payload_len: p.payload.len(),
                    payload_hex: hex::encode(keep),
                })?;
                quarantined += 1;
            }
        }
    }
    buffer.flush().await?;
    Ok((reports, quarantined))
}

/// What one upload attempt came to.
#[derive(Debug)]
enum Upload {
    /// The endpoint answered for every record.
    Done(BatchReply),
    /// Try again after the delay (from `Retry-After`) or the backoff.
    Retry { why: String, after: Option<Duration> },
}

async fn upload_task(
    buffer: Buffer,
    key: SigningKey,
    http: reqwest::Client,
    config: AgentConfig,
    status: Arc<AgentStatus>,
    committed: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let url = format!("{}{}", config.endpoint_url, countersign_protocol::BATCHES_PATH);
    let mut backoff = Backoff::new(config.batch.retry_delay_min, config.batch.retry_delay_max);
    loop {
        if *stop.borrow() {
            return;
        }
        let batch = match buffer.next_batch(config.batch.records_max, config.batch.bytes_max) {
            Ok(b) => b,
            Err(e) => {
                error!(error = %e, "cannot read pending reports");
                Vec::new()
            }
        };
        if batch.is_empty() {
            tokio::select! {
                _ = committed.notified() => {}
                _ = stop.changed() => return,
            }
            // Let a few more commits land so batches are not one report each.
            if !config.batch.linger.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(config.batch.linger) => {}
                    _ = stop.changed() => return,
                }
            }
            continue;
        }
        let seq = match buffer.next_batch_seq() {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "cannot take a batch sequence number");
                0
            }
        };
        let header = BatchHeader { gateway_id: config.gateway_id, batch_seq: seq, created_ms: now_ms() };
        let mut builder = BatchBuilder::new(header);
        let mut sent = 0;
        for p in &batch {
            if !builder.fits(p.report.len(), config.batch.records_max, config.batch.bytes_max) {
                break;
            }
            if builder.push(RecordRef { received_ms: p.received_ms, report: &p.report }).is_err() {
                break;
            }
            sent += 1;
        }
        let batch = &batch[..sent];
        let body = builder.sign(&key);
        let span = info_span!("batch", batch_seq = seq, records = sent, bytes = body.len());
        let outcome = post(&http, &url, body).instrument(span.clone()).await;
        let _enter = span.enter();
        match outcome {
            Upload::Done(reply) if reply.results.len() == batch.len() => {
                let (mut stored, mut dup, mut rejected) = (0, 0, 0);
                for r in &reply.results {
                    match r {
                        countersign_protocol::RecordOutcome::Stored => stored += 1,
                        countersign_protocol::RecordOutcome::Duplicate => dup += 1,
                        countersign_protocol::RecordOutcome::Rejected { reason, detail } => {
                            rejected += 1;
                            warn!(reason = reason.code(), %detail, "endpoint rejected a report");
                        }
                    }
                }
                if let Err(e) = buffer.settle(batch, &reply.results) {
                    error!(error = %e, "cannot settle an acknowledged batch; it will be resent");
                }
                status.records_delivered.fetch_add(batch.len() as u64, Ordering::Relaxed);
                info!(stored, duplicate = dup, rejected, "batch delivered");
                backoff.reset();
            }
            Upload::Done(reply) => {
                error!(
                    expected = batch.len(),
                    got = reply.results.len(),
                    "endpoint answered for a different number of records; resending"
                );
                wait(&mut stop, backoff.next_delay(jitter())).await;
            }
            Upload::Retry { why, after } => {
                let delay =
                    after.unwrap_or_else(|| backoff.next_delay(jitter())).min(config.batch.retry_delay_max);
                warn!(%why, retry_in_ms = delay.as_millis() as u64, attempts = backoff.attempts(), "upload failed");
                wait(&mut stop, delay).await;
            }
        }
    }
}

async fn wait(stop: &mut watch::Receiver<bool>, d: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = stop.changed() => {}
    }
}

async fn post(http: &reqwest::Client, url: &str, body: Vec<u8>) -> Upload {
    let resp = match http.post(url).header("content-type", "application/octet-stream").body(body).send().await
    {
        Ok(r) => r,
        Err(e) => return Upload::Retry { why: format!("request failed: {e}"), after: None },
    };
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    if status.is_success() {
        return match resp.json::<BatchReply>().await {
            Ok(r) => Upload::Done(r),
            Err(e) => Upload::Retry { why: format!("unreadable reply: {e}"), after: None },
        };
    }
    let text = resp.text().await.unwrap_or_default();
    let why = match serde_json::from_str::<ErrorBody>(&text) {
        Ok(b) => format!("endpoint answered {status}: {} ({})", b.error, b.code),
        Err(_) => format!("endpoint answered {status}"),
    };
    if status.is_client_error() && status.as_u16() != 429 {
        // Not fixed by retrying, but never dropped either: an operator must look.
        error!(%why, "endpoint refuses this batch; records stay buffered");
    }
    Upload::Retry { why, after: retry_after }
}
