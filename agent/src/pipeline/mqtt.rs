//! The MQTT task: the broker connection (persistent session, manual acks, the packet limit),
//! the subscription, and the event loop that puts each publish on the ingest queue, waiting
//! when the queue is full so the broker and TCP hold the rest.
//!
//! It never acks and knows nothing about the store or the endpoint: acks are the committer's,
//! written by this event loop when the committer hands them to the client.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{info, warn};

use super::ingest::{ingest_cost, Received, INGEST_QUEUE_BYTES_MAX};
use super::wait::{jitter, until_true};
use crate::backoff::Backoff;
use crate::config::AgentConfig;
use crate::evidence::{untrusted, LogLimiter};
use crate::status::{now_ms, AgentStatus};

/// Capacity of rumqttc's request channel (acks, subscribes). The committer never waits on
/// it (see `commit::send_acks`): acks that do not fit wait in the committer's own backlog.
const MQTT_REQUESTS_MAX: usize = u16::MAX as usize + 1;
/// Largest MQTT packet read whole: far above a report. A larger publish is cut by the
/// (patched) MQTT client to its topic and a short excerpt, the rest discarded unread, and
/// is acked and quarantined as `too_large` (it used to break the connection and be
/// redelivered for ever, wedging the gateway).
pub const MQTT_PACKET_BYTES_MAX: usize = 256 * 1024;
/// Backoff bounds for reconnecting to the broker.
const MQTT_RECONNECT_MS_MIN: u64 = 200;
const MQTT_RECONNECT_MS_MAX: u64 = 30_000;
/// How long shutdown waits for the last acks to go out.
const SHUTDOWN_ACK_WAIT_MS: u64 = 2000;

/// The client and event loop of one pipeline incarnation, as the configuration asks.
pub(super) fn client(config: &AgentConfig) -> (AsyncClient, EventLoop) {
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
    AsyncClient::new(opts, MQTT_REQUESTS_MAX)
}

/// Polls the event loop until the committer is done: publishes go on the ingest queue (until
/// `stop`), the connection is retried with backoff, and the subscription is renewed when the
/// broker lost the session.
pub(super) async fn mqtt_task(
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
