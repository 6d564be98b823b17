//! Publishing device reports at QoS 1 and knowing when the broker has them all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::task::JoinHandle;

/// An MQTT connection standing in for devices' modems.
pub struct Publisher {
    client: AsyncClient,
    published: u64,
    acked: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Publisher {
    /// Connects with a clean session under `client_id`.
    pub fn connect(client_id: &str, port: u16) -> Self {
        Self::connect_with(client_id, port, 1 << 20)
    }

    /// [`Publisher::connect`] sending packets of up to `packet_bytes_max` (Mosquitto accepts
    /// up to 256 MiB by default).
    pub fn connect_with(client_id: &str, port: u16, packet_bytes_max: usize) -> Self {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_inflight(100)
            .set_max_packet_size(packet_bytes_max, packet_bytes_max);
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        let acked = Arc::new(AtomicU64::new(0));
        let a = acked.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Self { client, published: 0, acked, task }
    }

    /// Queues one QoS 1 publish.
    pub async fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<()> {
        self.client.publish(topic, QoS::AtLeastOnce, false, payload.to_vec()).await?;
        self.published += 1;
        Ok(())
    }

    /// Queues one QoS 0 publish (the broker does not acknowledge it).
    pub async fn publish_qos0(&mut self, topic: &str, payload: &[u8]) -> Result<()> {
        self.publish_uncounted(topic, QoS::AtMostOnce, payload).await
    }

    /// Queues one publish at `qos` that [`Publisher::wait_acked`] does not wait for (QoS 0
    /// has no ack, QoS 2 ends with PUBCOMP rather than PUBACK).
    pub async fn publish_uncounted(&mut self, topic: &str, qos: QoS, payload: &[u8]) -> Result<()> {
        self.client.publish(topic, qos, false, payload.to_vec()).await?;
        Ok(())
    }

    /// Waits until the broker acknowledged every publish so far.
    pub async fn wait_acked(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.acked.load(Ordering::SeqCst) < self.published {
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "broker acknowledged {} of {} publishes",
                    self.acked.load(Ordering::SeqCst),
                    self.published
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Disconnects.
    pub async fn close(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}
