//! The uplink task: the gateway's own SIM metered every read interval; a report its policy
//! wants goes into the current buffer, is flushed, and only then is the meter checkpointed.
//!
//! It knows nothing about MQTT or the endpoint: its reports are uploaded like the devices'.

use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, warn};

use super::wait::until_true;
use crate::status::{now_ms, BufferSlot};
use crate::store::Buffer;

/// Reads the uplink's counters every `every`; a report the policy wants goes into the buffer,
/// is flushed, and only then is the meter checkpointed. At stop: one last report.
pub(super) async fn uplink_task(
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
