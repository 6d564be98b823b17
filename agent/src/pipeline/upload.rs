//! The uploader: reads pending reports, signs them as a batch, POSTs it (paced, with backoff),
//! reads the reply bounded ([`REPLY_BYTES_MAX`]) and settles only what a reply for this batch
//! answers ([`check_reply`], pure).
//!
//! It knows nothing about MQTT or acks: it reads and settles what the committer made durable.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use countersign_protocol::{BatchBuilder, BatchHeader, BatchReply, ErrorBody, RecordOutcome, RecordRef};
use ed25519_dalek::SigningKey;
use tokio::sync::{watch, Notify};
use tracing::{error, info, info_span, warn, Instrument};

use super::wait::{jitter, until_true};
use crate::backoff::Backoff;
use crate::config::AgentConfig;
use crate::evidence::{untrusted, LogLimiter};
use crate::status::{now_ms, AgentStatus};
use crate::store::{Buffer, StoreError};

/// Largest endpoint reply read: far above a reply for the largest batch, so an endpoint (or
/// whoever answers as one) cannot make the agent buffer an unbounded body.
pub const REPLY_BYTES_MAX: usize = 4 * 1024 * 1024;
/// How often an idle uploader looks for reports that did not come through the committer.
const UPLOAD_IDLE_POLL_MS: u64 = 2000;

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

pub(super) struct Uploader {
    pub(super) buffer: Buffer,
    pub(super) key: SigningKey,
    pub(super) http: reqwest::Client,
    pub(super) config: AgentConfig,
    pub(super) status: Arc<AgentStatus>,
    pub(super) committed: Arc<Notify>,
    pub(super) stop: watch::Receiver<bool>,
    pub(super) fault: watch::Sender<bool>,
    pub(super) logs: LogLimiter,
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

pub(super) async fn upload_task(mut u: Uploader) {
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
}
