//! The agent's tasks, the channels between them, and the supervisor that restarts them.
//!
//! ```text
//!  MQTT event loop ──(bounded queue)──► committer ──notify──► uploader ──HTTPS──► endpoint
//!   receive QoS 1                        quota check           read pending
//!   (manual acks)  ◄──────── ack ─────── write, flush, ack      sign, POST, settle
//! ```
//!
//! Invariants:
//! - A report is acked only after the sled flush that covers it returned, in receive order.
//! - A report leaves sled only after the endpoint answered for it.
//! - While the buffer is at its quota or the store fails, nothing is acked: the broker keeps
//!   the reports (and stops sending once its in-flight window is full).
//! - Acks never wait: the request channel holds more acks than a broker can have unacked
//!   messages in flight to one client (16-bit packet ids), so the committer always drains the
//!   ingest queue and the MQTT event loop is never starved.
//! - A store failure ends the pipeline without acking; the supervisor reopens the database
//!   and starts a new pipeline, and the broker redelivers what was not acked.
//! - No publish the broker accepts stops the intake: one larger than
//!   [`MQTT_PACKET_BYTES_MAX`] is cut by the (patched) MQTT client to its topic and an
//!   excerpt, the rest discarded unread, then acked and quarantined as `too_large` like any
//!   other non-report. Quarantine never counts against the quota.
//! - The ingest queue is bounded in count and in bytes ([`INGEST_QUEUE_BYTES_MAX`]): when it
//!   is full the event loop stops reading, whatever the QoS.
//! - A reply settles only the batch it names, for this gateway, with one result per record
//!   ([`check_reply`]); anything else is a failed upload.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use countersign_meter::report::REPORT_BYTES_MAX;
use countersign_protocol::{BatchBuilder, BatchHeader, BatchReply, ErrorBody, RecordOutcome, RecordRef};
use ed25519_dalek::SigningKey;
use rand::Rng;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::backoff::Backoff;
use crate::classify::{classify_publish, Verdict};
use crate::config::AgentConfig;
use crate::evidence::{untrusted, LogLimiter};
use crate::status::AgentStatus;
// Their home is `status` (the status listener reads them without the pipeline); kept here
// at their old paths.
pub use crate::status::{now_ms, BufferSlot};
use crate::store::{secure_data_dir, Buffer, Quarantined, StoreError, QUARANTINE_PAYLOAD_BYTES_MAX};

/// Capacity of the queue between the MQTT event loop and the committer: the event loop waits
/// when it is full, which is how a slow disk slows the intake.
pub const INGEST_QUEUE_REPORTS_MAX: usize = 4096;
/// Most payload and topic bytes in that queue (each publish also counts
/// [`INGEST_ITEM_OVERHEAD_BYTES`]): a flood of large payloads (QoS 0 has no in-flight window)
/// makes the event loop wait, and the broker and TCP hold the rest, instead of the agent's
/// memory.
pub const INGEST_QUEUE_BYTES_MAX: usize = 4 * 1024 * 1024;
/// What one queued publish costs besides its payload and topic.
pub const INGEST_ITEM_OVERHEAD_BYTES: usize = 128;
/// Largest endpoint reply read: far above a reply for the largest batch, so an endpoint (or
/// whoever answers as one) cannot make the agent buffer an unbounded body.
pub const REPLY_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Capacity of rumqttc's request channel (acks, subscribes). The committer never waits on
/// it (see `send_acks`): acks that do not fit wait in the committer's own backlog.
const MQTT_REQUESTS_MAX: usize = u16::MAX as usize + 1;
/// Largest MQTT packet read whole: far above a report. A larger publish is cut by the
/// (patched) MQTT client to its topic and a short excerpt, the rest discarded unread, and
/// is acked and quarantined as `too_large` (it used to break the connection and be
/// redelivered for ever, wedging the gateway).
pub const MQTT_PACKET_BYTES_MAX: usize = 256 * 1024;
/// Backoff bounds for reconnecting to the broker.
const MQTT_RECONNECT_MS_MIN: u64 = 200;
const MQTT_RECONNECT_MS_MAX: u64 = 30_000;
/// Backoff bounds for reopening a failed store.
const STORE_RETRY_MS_MIN: u64 = 200;
const STORE_RETRY_MS_MAX: u64 = 30_000;
/// How long shutdown waits for the last acks to go out.
const SHUTDOWN_ACK_WAIT_MS: u64 = 2000;
/// How often a committer held back by the quota looks again.
const QUOTA_RECHECK_MS: u64 = 250;
/// Most acks kept waiting for room in the event loop's request channel (≈ 64 B each).
const ACK_BACKLOG_MAX: usize = 1 << 20;
/// How often waiting acks are retried while no report arrives.
const ACK_RETRY_MS: u64 = 5;
/// How often an idle uploader looks for reports that did not come through the committer.
const UPLOAD_IDLE_POLL_MS: u64 = 2000;
/// How often the durable generation is written beside the database (two fsyncs each).
const GENERATION_REMEMBER_MS: u64 = 5000;
/// Least free space before the database is (re)opened, whatever the configured reserve:
/// sled writes a snapshot and a segment at open, and a failed open on a full disk leaves
/// debris behind (see `store` module docs).
pub const REOPEN_FREE_BYTES_MIN: u64 = 1024 * 1024;
/// How often the agent looks at the free space while it waits for some.
const DISK_RECHECK_MS: u64 = 1000;

/// Why the committer holds a group of reports back (unacked, so the broker keeps them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// The buffer would pass its quota of logical bytes.
    Quota,
    /// The filesystem has less free space than the configured reserve.
    DiskLow,
}

/// Whether a group costing `cost_bytes` may be written now. Pure. `free_bytes` is `None`
/// when the free space could not be read (the store's own errors then speak); a reserve of
/// 0 turns the disk check off.
pub fn hold_reason(
    buffered_bytes: u64,
    cost_bytes: u64,
    quota_bytes: u64,
    free_bytes: Option<u64>,
    reserve_bytes: u64,
) -> Option<Hold> {
    // An empty buffer takes any group: a group larger than the whole quota would otherwise
    // be held for ever.
    if buffered_bytes > 0 && buffered_bytes.saturating_add(cost_bytes) > quota_bytes {
        return Some(Hold::Quota);
    }
    match free_bytes {
        Some(free) if reserve_bytes > 0 && free < reserve_bytes => Some(Hold::DiskLow),
        _ => None,
    }
}

/// The directory whose filesystem holds the buffer: the data directory, or its parent
/// before the data directory exists.
fn buffer_fs(config: &AgentConfig) -> &Path {
    let dir = config.data_dir.as_path();
    if dir.exists() {
        dir
    } else {
        dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
    }
}

/// Free bytes on the buffer's filesystem, also recorded in `status`.
fn look_at_disk(config: &AgentConfig, status: &AgentStatus) -> Option<u64> {
    match crate::store::free_bytes(buffer_fs(config)) {
        Ok(free) => {
            status.disk_free_bytes.store(free, Ordering::Relaxed);
            Some(free)
        }
        Err(e) => {
            debug!(error = %e, "cannot read the free space of the buffer's filesystem");
            None
        }
    }
}

/// Waits until the buffer's filesystem has room to open the database
/// ([`REOPEN_FREE_BYTES_MIN`]; the reserve only governs acking, so that a gateway short of
/// space still uploads what it holds). Returns false if shutdown came first.
async fn wait_for_space<F: Future<Output = ()>>(
    config: &AgentConfig,
    status: &AgentStatus,
    shutdown: &mut std::pin::Pin<&mut F>,
) -> bool {
    let need = REOPEN_FREE_BYTES_MIN;
    let mut waiting = false;
    loop {
        match look_at_disk(config, status) {
            Some(free) if free < need => {
                if !waiting {
                    waiting = true;
                    status.disk_low.store(true, Ordering::Relaxed);
                    warn!(
                        free_bytes = free,
                        need_bytes = need,
                        data_dir = %config.data_dir.display(),
                        "disk full; waiting for free space before opening the database (the broker keeps the reports)"
                    );
                }
            }
            _ => {
                if waiting {
                    status.disk_low.store(false, Ordering::Relaxed);
                    info!("free space is back; opening the database");
                }
                return true;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(DISK_RECHECK_MS)) => {}
            _ = shutdown.as_mut() => return false,
        }
    }
}

/// Errors that stop the agent at start-up. Runtime faults are retried, not returned.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The durable buffer could not be opened (locked by another agent, permissions).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The gateway key could not be read.
    #[error(transparent)]
    Key(#[from] countersign_protocol::keys::KeyError),
    /// The HTTP client could not be built (TLS set-up).
    #[error("http client: {0}")]
    Http(String),
    /// The uplink meter could not start (key, state file).
    #[error(transparent)]
    Uplink(#[from] crate::uplink::UplinkError),
    /// The status listener could not bind its address.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// Why one incarnation of the pipeline ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exit {
    /// Shutdown was asked for; everything durable was acked.
    Stopped,
    /// The store failed; nothing unflushed was acked. Reopen and start again.
    StoreFault,
}

struct Received {
    publish: Publish,
    received_ms: u64,
    /// Its share of [`INGEST_QUEUE_BYTES_MAX`], given back when the committer is done with it.
    _room: OwnedSemaphorePermit,
}

/// What a publish costs in the ingest queue, in bytes (never more than the whole queue).
fn ingest_cost(p: &Publish) -> u32 {
    let n = p.payload.len().saturating_add(p.topic.len()).saturating_add(INGEST_ITEM_OVERHEAD_BYTES);
    u32::try_from(n.min(INGEST_QUEUE_BYTES_MAX)).unwrap_or(u32::MAX)
}

/// Resolves once the flag is true (or its sender is gone). Returns `()` rather than a watch
/// guard, which is not `Send` and must not live across an await.
async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

fn jitter() -> f64 {
    rand::thread_rng().gen::<f64>()
}

/// Runs the agent until `shutdown` completes, then flushes and returns.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()> + Send) -> Result<(), AgentError> {
    run_observed(config, Arc::new(AgentStatus::default()), shutdown).await
}

/// [`run`], updating `status` as it goes.
///
/// Supervises the pipeline: when the store fails (disk full, I/O error: sled refuses all
/// further writes after one), the pipeline stops without acking anything unflushed, the
/// database is reopened with backoff, and a new pipeline starts. The broker redelivers
/// whatever was not acked.
pub async fn run_observed(
    config: AgentConfig,
    status: Arc<AgentStatus>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    // Ignore the error: a host program may already have installed the same provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let key = countersign_protocol::keys::read_gateway_key(&config.gateway_key_file)?;
    let http = crate::tls::http_client(&config).map_err(|e| AgentError::Http(e.to_string()))?;
    // Reports are buffered here: other users must neither read nor alter them.
    secure_data_dir(&config.data_dir)?;
    if let Some(u) = &config.uplink {
        crate::store::check_state_file(&u.state_file)?;
    }
    let slot: BufferSlot = Arc::new(Mutex::new(None));
    let mut shutdown = std::pin::pin!(shutdown);
    // A full disk at start is waited out, not a reason to exit (and be restarted in a loop).
    if !wait_for_space(&config, &status, &mut shutdown).await {
        return Ok(());
    }
    let mut buffer = open_buffer(&config, &status)?;
    let (http_stop_tx, http_stop_rx) = watch::channel(false);
    let listener = match config.listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::Listen { addr, source })?;
            info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "status listener up");
            let ctx = crate::http::StatusCtx {
                gateway_id: config.gateway_id,
                quota_bytes: config.quota_bytes,
                status: status.clone(),
                buffer: slot.clone(),
            };
            Some(tokio::spawn(crate::http::serve(l, ctx, http_stop_rx.clone())))
        }
        None => None,
    };
    let mut uplink = match &config.uplink {
        Some(u) => {
            let key = countersign_protocol::keys::read_secret(&u.key_file)?;
            let meter = crate::uplink::UplinkMeter::boot(
                u.meter_id,
                key,
                u.iccid,
                &u.interfaces,
                u.sysfs_net.clone(),
                u.state_file.clone(),
                u.policy,
            )?;
            info!(meter_id = u.meter_id, epoch = meter.epoch(), interfaces = ?u.interfaces, "metering the uplink");
            Some(tokio::spawn(
                uplink_task(meter, u.read_interval, slot.clone(), http_stop_rx.clone())
                    .instrument(info_span!("uplink", meter_id = u.meter_id)),
            ))
        }
        None => None,
    };
    let mut backoff =
        Backoff::new(Duration::from_millis(STORE_RETRY_MS_MIN), Duration::from_millis(STORE_RETRY_MS_MAX));
    'incarnations: loop {
        if let Ok(mut g) = slot.lock() {
            *g = Some(buffer.clone());
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut task = tokio::spawn(run_pipeline(
            config.clone(),
            buffer.clone(),
            key.clone(),
            http.clone(),
            status.clone(),
            stop_rx,
        ));
        let exit = tokio::select! {
            _ = &mut shutdown => {
                info!("shutting down");
                let _ = stop_tx.send(true);
                (&mut task).await
            }
            r = &mut task => r,
        };
        let exit = exit.unwrap_or_else(|e| {
            error!(error = %e, "pipeline ended abnormally");
            Exit::StoreFault
        });
        if exit == Exit::Stopped {
            // The uplink's last report goes into the buffer before the final flush.
            let _ = http_stop_tx.send(true);
            if let Some(t) = uplink.take() {
                let _ = t.await;
            }
            match buffer.flush().await {
                Ok(()) => {
                    if let Err(e) = buffer.remember_generation() {
                        warn!(error = %e, "cannot write the generation file");
                    }
                }
                Err(e) => error!(error = %e, "final flush failed"),
            }
            break 'incarnations;
        }
        // Store fault: drop every handle so sled closes its files, then reopen.
        if let Ok(mut g) = slot.lock() {
            *g = None;
        }
        drop(buffer);
        loop {
            let delay = backoff.next_delay(jitter());
            warn!(retry_in_ms = delay.as_millis() as u64, "store failed; reopening the database");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = &mut shutdown => break 'incarnations,
            }
            // Opening sled on a full disk fails and leaves debris; wait for room first.
            if !wait_for_space(&config, &status, &mut shutdown).await {
                break 'incarnations;
            }
            match open_buffer(&config, &status) {
                Ok(b) => {
                    buffer = b;
                    status.store_failing.store(false, Ordering::Relaxed);
                    backoff.reset();
                    continue 'incarnations;
                }
                Err(e) => {
                    status.set_error(&e);
                    error!(error = %e, "cannot reopen the database");
                }
            }
        }
    }
    let _ = http_stop_tx.send(true);
    if let Some(t) = listener {
        let _ = t.await;
    }
    info!("agent stopped");
    Ok(())
}

/// Reads the uplink's counters every `every`; a report the policy wants goes into the buffer,
/// is flushed, and only then is the meter checkpointed. At stop: one last report.
async fn uplink_task(
    mut meter: crate::uplink::UplinkMeter,
    every: Duration,
    slot: BufferSlot,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = until_true(&mut stop) => true,
        };
        let buffer = slot.lock().ok().and_then(|g| g.clone());
        // While the store is being reopened the counters keep counting; the next report
        // covers the gap.
        if let Some(buffer) = buffer {
            if let Err(e) = uplink_report(&mut meter, &buffer, stopping).await {
                warn!(error = %e, "uplink report not buffered; the next one covers it");
            }
        }
        if stopping {
            return;
        }
    }
}

async fn uplink_report(
    meter: &mut crate::uplink::UplinkMeter,
    buffer: &Buffer,
    force: bool,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let Some(report) = meter.tick(now_ms() / 1000, force)? else { return Ok(()) };
    let (r, _) = countersign_meter::Report::decode(&report).map_err(|e| e.to_string())?;
    buffer.put_report(r.id(), now_ms(), &report)?;
    buffer.flush().await?;
    meter.checkpoint()?;
    debug!(seq = r.seq, up = r.used.up, down = r.used.down, "uplink report buffered");
    Ok(())
}

/// Opens the buffer. A database sled reports as corrupt (or panics on) is moved aside and a
/// fresh one started, loudly, so the agent never crash-loops on it. Other errors (locked by
/// another process, permissions, disk) are returned.
pub fn open_buffer(config: &AgentConfig, status: &AgentStatus) -> Result<Buffer, StoreError> {
    let dir = &config.data_dir;
    let attempt = || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Buffer::open_with(dir, config.cache_capacity_bytes, config.side_limits)
        }))
    };
    let why = match attempt() {
        Ok(Ok(b)) => {
            let s = b.stats();
            info!(
                pending = b.pending_count(),
                quarantined = s.quarantined,
                rejected = s.rejected,
                "buffer open"
            );
            return Ok(b);
        }
        Ok(Err(StoreError::Open {
            source: e @ (sled::Error::Corruption { .. } | sled::Error::ReportableBug(_)),
            ..
        })) => e.to_string(),
        Ok(Err(e @ StoreError::LostData { .. })) => e.to_string(),
        Ok(Err(e)) => return Err(e),
        Err(_) => "sled panicked while opening it".to_owned(),
    };
    let aside = moved_aside_path(dir, now_ms());
    error!(
        data_dir = %dir.display(),
        moved_to = %aside.display(),
        reason = %why,
        "DATABASE CORRUPT: moved aside, starting a fresh one; run `countersign-agent salvage` to re-send what it holds"
    );
    std::fs::rename(dir, &aside).map_err(|e| StoreError::Io(sled::Error::Io(e)))?;
    status.set_moved_aside(aside.display().to_string());
    secure_data_dir(dir)?;
    match attempt() {
        Ok(r) => r,
        Err(_) => Err(StoreError::Corrupt("sled panicked while creating a fresh database")),
    }
}

/// Where a corrupt database directory goes: beside it, stamped with the time.
pub fn moved_aside_path(dir: &Path, now_ms: u64) -> PathBuf {
    let mut name = dir.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".corrupt-{now_ms}"));
    dir.with_file_name(name)
}

/// One incarnation of the pipeline on an open buffer.
async fn run_pipeline(
    config: AgentConfig,
    buffer: Buffer,
    key: SigningKey,
    http: reqwest::Client,
    status: Arc<AgentStatus>,
    mut stop: watch::Receiver<bool>,
) -> Exit {
    info!(gateway_id = config.gateway_id, pending = buffer.pending_count(), "pipeline starting");
    status.buffer_bytes.store(buffer.logical_bytes(), Ordering::Relaxed);
    let mut opts =
        MqttOptions::new(config.mqtt.client_id.clone(), config.mqtt.host.clone(), config.mqtt.port);
    opts.set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(config.mqtt.keep_alive)
        .set_max_packet_size(MQTT_PACKET_BYTES_MAX, MQTT_PACKET_BYTES_MAX);
    if let Some((u, p)) = &config.mqtt.credentials {
        opts.set_credentials(u.clone(), p.clone());
    }
    if let Some(tls) = &config.mqtt.tls {
        // rustls with the ring provider installed at start; the broker's name is checked
        // against `mqtt.host`.
        opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Simple {
            ca: tls.ca_pem.clone(),
            alpn: None,
            client_auth: tls.client_auth.clone(),
        }));
    }
    let (client, eventloop) = AsyncClient::new(opts, MQTT_REQUESTS_MAX);
    let (tx, rx) = mpsc::channel(INGEST_QUEUE_REPORTS_MAX);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (fault_tx, mut fault_rx) = watch::channel(false);
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
            Committer {
                rx,
                buffer: buffer.clone(),
                client: client.clone(),
                config: config.clone(),
                status: status.clone(),
                committed: committed.clone(),
                fault: fault_tx.clone(),
                stop: stop_rx.clone(),
            },
            commit_done_tx,
        )
        .instrument(info_span!("commit")),
    );
    let uploader = tokio::spawn(
        upload_task(Uploader {
            buffer,
            key,
            http,
            config: config.clone(),
            status,
            committed,
            stop: stop_rx,
            fault: fault_tx,
            logs: LogLimiter::default(),
        })
        .instrument(info_span!("upload", gateway_id = config.gateway_id)),
    );

    let mut tasks = [("mqtt", Some(mqtt)), ("commit", Some(committer)), ("upload", Some(uploader))];
    // A task that ends on its own (a panic, say) must not leave a half-alive agent that
    // receives but never acks: the supervisor restarts the whole pipeline instead.
    let ended = {
        let [(_, Some(m)), (_, Some(c)), (_, Some(u))] = &mut tasks else { unreachable!("all tasks set") };
        tokio::select! {
            _ = until_true(&mut stop) => None,
            _ = until_true(&mut fault_rx) => None,
            r = m => Some((0, r)),
            r = c => Some((1, r)),
            r = u => Some((2, r)),
        }
    };
    let exit = if ended.is_some() || *fault_rx.borrow() { Exit::StoreFault } else { Exit::Stopped };
    if let Some((i, r)) = ended {
        let name = tasks[i].0;
        tasks[i].1 = None;
        match r {
            Err(e) => error!(task = name, error = %e, "pipeline task failed; restarting the pipeline"),
            Ok(()) if !*fault_rx.borrow() => {
                error!(task = name, "pipeline task ended on its own; restarting the pipeline")
            }
            Ok(()) => {}
        }
    }
    let _ = stop_tx.send(true);
    for (name, task) in tasks {
        if let Some(task) = task {
            if let Err(e) = task.await {
                error!(task = name, error = %e, "task ended abnormally");
            }
        }
    }
    if *fault_rx.borrow() {
        return Exit::StoreFault;
    }
    exit
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
    let ingest_room = Arc::new(Semaphore::new(INGEST_QUEUE_BYTES_MAX));
    let mut logs = LogLimiter::default();
    let mut backoff = Backoff::new(
        Duration::from_millis(MQTT_RECONNECT_MS_MIN),
        Duration::from_millis(MQTT_RECONNECT_MS_MAX),
    );
    let mut reconnect_after: Option<Duration> = None;
    loop {
        tokio::select! {
            _ = until_true(&mut stop), if tx.is_some() => {
                // Stop taking reports; keep polling so the committer's last acks go out.
                tx = None;
            }
            _ = until_true(&mut commit_done) => break,
            ev = eventloop.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff.reset();
                    status.connected.store(true, Ordering::Relaxed);
                    info!(session_present = ack.session_present, "connected to broker");
                    // A broker without our session has forgotten the subscription too, and
                    // rumqttc does not resubscribe by itself.
                    if ack.session_present {
                        status.subscribed.store(true, Ordering::Relaxed);
                    } else {
                        status.subscribed.store(false, Ordering::Relaxed);
                        if let Err(e) = client.subscribe(topic.clone(), QoS::AtLeastOnce).await {
                            warn!(error = %e, "subscribe request failed");
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let Some(q) = &tx else { continue };
                    if let Some(size) = publish.truncated_from {
                        status.oversized_publishes.fetch_add(1, Ordering::Relaxed);
                        status.oversized_bytes_max.fetch_max(size as u64, Ordering::Relaxed);
                        if let Some(skipped) = logs.admit("oversized_publish", now_ms()) {
                            warn!(
                                topic = %untrusted(&publish.topic),
                                bytes = size,
                                limit_bytes = MQTT_PACKET_BYTES_MAX,
                                qos = publish.qos as u8,
                                skipped,
                                "publish over the packet limit: read its first bytes only, quarantining it"
                            );
                        }
                    }
                    // Waiting here (queue full in count or bytes) is the back-pressure: the
                    // event loop stops reading, TCP and the broker hold the rest.
                    let Ok(room) = ingest_room.clone().acquire_many_owned(ingest_cost(&publish)).await else {
                        tx = None;
                        continue;
                    };
                    let received = Received { publish, received_ms: now_ms(), _room: room };
                    if q.send(received).await.is_err() {
                        tx = None;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    status.subscribed.store(true, Ordering::Relaxed);
                    info!(%topic, "subscribed");
                }
                Ok(_) => {}
                Err(e) => {
                    status.connected.store(false, Ordering::Relaxed);
                    status.subscribed.store(false, Ordering::Relaxed);
                    let delay = backoff.next_delay(jitter());
                    warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "broker connection failed");
                    reconnect_after = Some(delay);
                }
            }
        }
        // Outside the select: its branches still borrow the channels.
        if let Some(delay) = reconnect_after.take() {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = until_true(&mut commit_done) => break,
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
    status.connected.store(false, Ordering::Relaxed);
}

struct Committer {
    rx: mpsc::Receiver<Received>,
    buffer: Buffer,
    client: AsyncClient,
    config: AgentConfig,
    status: Arc<AgentStatus>,
    committed: Arc<Notify>,
    fault: watch::Sender<bool>,
    stop: watch::Receiver<bool>,
}

async fn commit_task(mut c: Committer, done: watch::Sender<bool>) {
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
        let hold = hold_reason(
            c.buffer.logical_bytes(),
            cost,
            c.config.quota_bytes,
            free,
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

/// Why an endpoint reply cannot be applied to the batch that was sent. Each is a failed
/// upload (retried with backoff): nothing is settled, so no report is forgotten on the word
/// of a reply meant for another batch or gateway.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyMismatch {
    /// The reply is for another gateway.
    #[error("reply names gateway {got}, but this is gateway {want}")]
    Gateway {
        /// The gateway the reply names.
        got: u64,
        /// This gateway.
        want: u64,
    },
    /// The reply is for another batch.
    #[error("reply names batch {got}, but batch {want} was sent")]
    BatchSeq {
        /// The batch the reply names.
        got: u64,
        /// The batch sent.
        want: u64,
    },
    /// The reply does not have one result per record sent.
    #[error("reply has {got} results for {want} records sent")]
    Results {
        /// Results in the reply.
        got: usize,
        /// Records sent.
        want: usize,
    },
}

/// Whether `reply` answers the batch `batch_seq` of `gateway_id` with `sent` records. Pure.
pub fn check_reply(
    reply: &BatchReply,
    gateway_id: u64,
    batch_seq: u64,
    sent: usize,
) -> Result<(), ReplyMismatch> {
    if reply.gateway_id != gateway_id {
        return Err(ReplyMismatch::Gateway { got: reply.gateway_id, want: gateway_id });
    }
    if reply.batch_seq != batch_seq {
        return Err(ReplyMismatch::BatchSeq { got: reply.batch_seq, want: batch_seq });
    }
    if reply.results.len() != sent {
        return Err(ReplyMismatch::Results { got: reply.results.len(), want: sent });
    }
    Ok(())
}

/// What one upload attempt came to.
#[derive(Debug)]
enum Upload {
    /// The endpoint answered for every record.
    Done(BatchReply),
    /// Try again after the delay (from `Retry-After`) or the backoff.
    Retry { why: String, after: Option<Duration> },
}

struct Uploader {
    buffer: Buffer,
    key: SigningKey,
    http: reqwest::Client,
    config: AgentConfig,
    status: Arc<AgentStatus>,
    committed: Arc<Notify>,
    stop: watch::Receiver<bool>,
    fault: watch::Sender<bool>,
    logs: LogLimiter,
}

impl Uploader {
    fn store_fault(&self, what: &str, e: &StoreError) {
        self.status.store_failing.store(true, Ordering::Relaxed);
        self.status.set_error(e);
        error!(error = %e, "{what}");
        let _ = self.fault.send(true);
    }

    async fn wait(&mut self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = until_true(&mut self.stop) => {}
        }
    }
}

async fn upload_task(mut u: Uploader) {
    let url = format!("{}{}", u.config.endpoint_url, countersign_protocol::BATCHES_PATH);
    let mut backoff = Backoff::new(u.config.batch.retry_delay_min, u.config.batch.retry_delay_max);
    // After an outage the backlog goes out at most this fast.
    let pace = Duration::from_secs(1) / u.config.batch.batches_per_s_max;
    let mut last_post: Option<tokio::time::Instant> = None;
    loop {
        if *u.stop.borrow() {
            return;
        }
        let batch = match u.buffer.next_batch(u.config.batch.records_max, u.config.batch.bytes_max) {
            Ok(b) => b,
            Err(e) => return u.store_fault("cannot read pending reports", &e),
        };
        if batch.is_empty() {
            // Woken by commits; the idle poll picks up reports that enter the buffer another
            // way (the uplink meter, a salvage).
            tokio::select! {
                _ = u.committed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(UPLOAD_IDLE_POLL_MS)) => {}
                _ = until_true(&mut u.stop) => return,
            }
            // Let a few more commits land so batches are not one report each.
            if !u.config.batch.linger.is_zero() {
                let linger = u.config.batch.linger;
                u.wait(linger).await;
            }
            continue;
        }
        if let Some(t) = last_post {
            tokio::time::sleep_until(t + pace).await;
        }
        let seq = match u.buffer.next_batch_seq() {
            Ok(s) => s,
            Err(e) => return u.store_fault("cannot take a batch sequence number", &e),
        };
        let header = BatchHeader { gateway_id: u.config.gateway_id, batch_seq: seq, created_ms: now_ms() };
        let mut builder = BatchBuilder::new(header);
        let mut sent = 0;
        for p in &batch {
            if !builder.fits(p.report.len(), u.config.batch.records_max, u.config.batch.bytes_max)
                || builder.push(RecordRef { received_ms: p.received_ms, report: &p.report }).is_err()
            {
                break;
            }
            sent += 1;
        }
        let batch = &batch[..sent];
        let body = builder.sign(&u.key);
        let span = info_span!("batch", batch_seq = seq, records = sent, bytes = body.len());
        last_post = Some(tokio::time::Instant::now());
        let outcome = post(&u.http, &url, body).instrument(span.clone()).await;
        let _enter = span.enter();
        let outcome = match outcome {
            Upload::Done(reply) => match check_reply(&reply, u.config.gateway_id, seq, batch.len()) {
                Ok(()) => Upload::Done(reply),
                Err(m) => {
                    u.status.reply_mismatches.fetch_add(1, Ordering::Relaxed);
                    Upload::Retry {
                        why: format!("endpoint reply does not match the batch: {m}; nothing settled"),
                        after: None,
                    }
                }
            },
            retry => retry,
        };
        match outcome {
            Upload::Done(reply) => {
                let (mut stored, mut dup, mut rejected) = (0, 0, 0);
                for r in &reply.results {
                    match r {
                        RecordOutcome::Stored => stored += 1,
                        RecordOutcome::Duplicate => dup += 1,
                        RecordOutcome::Rejected { reason, detail } => {
                            rejected += 1;
                            if let Some(skipped) = u.logs.admit(reason.code(), now_ms()) {
                                warn!(
                                    reason = reason.code(),
                                    detail = %untrusted(detail),
                                    skipped,
                                    "endpoint rejected a report"
                                );
                            }
                        }
                    }
                }
                let dropped_before = u.buffer.dropped().rejected;
                if let Err(e) = u.buffer.settle(batch, &reply.results) {
                    // The endpoint has the records; resending them later only yields duplicates.
                    return u.store_fault("cannot settle an acknowledged batch", &e);
                }
                let dropped = u.buffer.dropped().rejected.saturating_sub(dropped_before);
                if dropped > 0 {
                    u.status.rejected_dropped.fetch_add(dropped, Ordering::Relaxed);
                    if let Some(skipped) = u.logs.admit("rejected_full", now_ms()) {
                        warn!(dropped, skipped, "rejected reports full: dropped the oldest entries");
                    }
                }
                u.status.records_delivered.fetch_add(batch.len() as u64, Ordering::Relaxed);
                u.status.batches_delivered.fetch_add(1, Ordering::Relaxed);
                u.status.last_sync_ms.store(now_ms(), Ordering::Relaxed);
                u.status.failing_since_ms.store(0, Ordering::Relaxed);
                u.status.buffer_bytes.store(u.buffer.logical_bytes(), Ordering::Relaxed);
                info!(stored, duplicate = dup, rejected, "batch delivered");
                backoff.reset();
            }
            Upload::Retry { why, after } => upload_failed(&mut u, &mut backoff, why, after).await,
        }
    }
}

async fn upload_failed(u: &mut Uploader, backoff: &mut Backoff, why: String, after: Option<Duration>) {
    u.status.upload_failures.fetch_add(1, Ordering::Relaxed);
    let _ = u.status.failing_since_ms.compare_exchange(0, now_ms(), Ordering::Relaxed, Ordering::Relaxed);
    let delay = after.unwrap_or_else(|| backoff.next_delay(jitter())).min(u.config.batch.retry_delay_max);
    warn!(%why, retry_in_ms = delay.as_millis() as u64, attempts = backoff.attempts(), "upload failed");
    u.status.set_error(&why);
    u.wait(delay).await;
}

/// The response body, refused past `max` bytes (read chunk by chunk, never more than `max`
/// plus one chunk held).
async fn read_bounded(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, String> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(format!("endpoint reply is larger than {max} bytes"));
    }
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if body.len().saturating_add(c.len()) > max {
                    return Err(format!("endpoint reply is larger than {max} bytes"));
                }
                body.extend_from_slice(&c);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(format!("reading the reply failed: {e}")),
        }
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
    let body = match read_bounded(resp, REPLY_BYTES_MAX).await {
        Ok(b) => b,
        Err(why) => return Upload::Retry { why, after: retry_after },
    };
    if status.is_success() {
        return match serde_json::from_slice::<BatchReply>(&body) {
            Ok(r) => Upload::Done(r),
            Err(e) => Upload::Retry { why: format!("unreadable reply: {e}"), after: None },
        };
    }
    let why = match serde_json::from_slice::<ErrorBody>(&body) {
        // The endpoint's words are untrusted text: escaped and cut.
        Ok(b) => format!("endpoint answered {status}: {} ({})", untrusted(&b.error), untrusted(&b.code)),
        Err(_) => format!("endpoint answered {status}"),
    };
    if status.is_client_error() && status.as_u16() != 429 {
        // Not fixed by retrying, but never dropped either: an operator must look.
        error!(%why, "endpoint refuses this batch; records stay buffered");
    }
    Upload::Retry { why, after: retry_after }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_at_quota_and_below_the_disk_reserve() {
        assert_eq!(hold_reason(90, 10, 100, Some(1 << 30), 1 << 20), None, "exactly at the quota fits");
        assert_eq!(hold_reason(91, 10, 100, Some(1 << 30), 1 << 20), Some(Hold::Quota));
        assert_eq!(hold_reason(u64::MAX, 1, 100, None, 0), Some(Hold::Quota), "no overflow");
        assert_eq!(hold_reason(0, 10, 100, Some((1 << 20) - 1), 1 << 20), Some(Hold::DiskLow));
        assert_eq!(hold_reason(0, 10, 100, Some(1 << 20), 1 << 20), None);
        assert_eq!(hold_reason(0, 10, 100, Some(0), 0), None, "a reserve of 0 turns the check off");
        assert_eq!(hold_reason(0, 10, 100, None, 1 << 20), None, "unknown free space does not hold");
    }

    #[test]
    fn an_empty_buffer_takes_a_group_larger_than_the_quota() {
        assert_eq!(hold_reason(0, 1000, 100, None, 0), None);
        assert_eq!(hold_reason(1, 1000, 100, None, 0), Some(Hold::Quota));
    }

    #[test]
    fn a_reply_is_applied_only_to_the_batch_it_names() {
        let reply = |gateway_id, batch_seq, n| BatchReply {
            gateway_id,
            batch_seq,
            results: vec![RecordOutcome::Stored; n],
        };
        assert_eq!(check_reply(&reply(7, 300, 2), 7, 300, 2), Ok(()));
        assert_eq!(
            check_reply(&reply(8, 300, 2), 7, 300, 2),
            Err(ReplyMismatch::Gateway { got: 8, want: 7 })
        );
        assert_eq!(
            check_reply(&reply(7, 299, 2), 7, 300, 2),
            Err(ReplyMismatch::BatchSeq { got: 299, want: 300 })
        );
        assert_eq!(
            check_reply(&reply(7, 300, 3), 7, 300, 2),
            Err(ReplyMismatch::Results { got: 3, want: 2 })
        );
        assert_eq!(
            check_reply(&reply(7, 300, 1), 7, 300, 2),
            Err(ReplyMismatch::Results { got: 1, want: 2 })
        );
    }

    #[test]
    fn ingest_cost_is_bounded_by_the_queue() {
        let small = Publish::new("t", QoS::AtLeastOnce, vec![0u8; 100]);
        assert_eq!(ingest_cost(&small) as usize, 101 + INGEST_ITEM_OVERHEAD_BYTES);
        let huge = Publish::new("t", QoS::AtLeastOnce, vec![0u8; INGEST_QUEUE_BYTES_MAX + 1]);
        assert_eq!(ingest_cost(&huge) as usize, INGEST_QUEUE_BYTES_MAX);
    }

    #[test]
    fn corrupt_db_goes_beside_the_original() {
        assert_eq!(
            moved_aside_path(Path::new("/var/lib/countersign-agent"), 42),
            PathBuf::from("/var/lib/countersign-agent.corrupt-42")
        );
    }
}
