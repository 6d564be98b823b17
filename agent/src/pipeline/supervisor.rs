//! The supervisor: starts the status listener and the uplink task, opens the buffer, runs
//! one pipeline incarnation (MQTT event loop, committer, uploader) at a time, and when the store
//! fails or a task ends on its own, reopens the database with backoff and starts a new one.
//!
//! It decides when to stop and restart, never what to ack, store or send: that is the tasks'.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use tokio::sync::{mpsc, watch, Notify};
use tracing::{error, info, info_span, warn, Instrument};

use super::commit::{commit_task, Committer};
use super::ingest::INGEST_QUEUE_REPORTS_MAX;
use super::mqtt::{self, mqtt_task};
use super::open::open_buffer;
use super::reserve::wait_for_space;
use super::uplink::uplink_task;
use super::upload::{upload_task, Uploader};
use super::wait::{jitter, until_true};
use crate::backoff::Backoff;
use crate::config::AgentConfig;
use crate::evidence::LogLimiter;
use crate::status::{AgentStatus, BufferSlot};
use crate::store::{secure_data_dir, Buffer, StoreError};

/// Backoff bounds for reopening a failed store.
const STORE_RETRY_MS_MIN: u64 = 200;
const STORE_RETRY_MS_MAX: u64 = 30_000;

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
    let (client, eventloop) = mqtt::client(&config);
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
