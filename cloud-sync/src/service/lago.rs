//! Lago export: every stored record becomes exactly one Lago event, across restarts.
//!
//! # The event
//!
//! ```json
//! {"transaction_id":"10-0-3","external_subscription_id":"sub_42","code":"data_bytes",
//!  "timestamp":1795521600,"properties":{"bytes":1536}}
//! ```
//!
//! - `transaction_id` is the record id `meter-epoch-seq`, Lago's idempotency key.
//! - `external_subscription_id` comes from the configured ICCID → subscription map. A record
//!   of an unmapped SIM is not planned (and a warning is logged) until a mapping exists.
//! - `timestamp` is the record's attribution instant ([`crate::usage::attribution_instant`]),
//!   whole Unix seconds: derived from the stored record only, so it is the same on every retry.
//! - `properties.bytes` is what this record adds to its epoch's usage **in export order**:
//!   `max(0, used − highest used already exported in the epoch)`, up plus down. Summed over an
//!   epoch it is the epoch's highest `used`, as in [`crate::usage`]; a report that arrives
//!   after a later one of its epoch was exported adds 0 (the later one already carried its
//!   bytes). Per-day splits may therefore differ from `derive_daily` for late reports; totals
//!   never do.
//!
//! # Exactly once
//!
//! Planning writes, in one sled transaction, the event's JSON bytes to the `lago_outbox` tree
//! (key: export sequence number), the record id to `lago_planned`, and the epoch's new exported
//! maximum to `lago_epoch_max`, then flushes. Sending reads the outbox in order, at most
//! [`LAGO_EVENTS_PER_CALL_MAX`] per call, and removes entries **only after Lago accepted
//! them** (2xx, or 422 `value_already_exist` for that position, which means an earlier attempt
//! got through). So a crash anywhere re-sends at worst events Lago already has, with
//! byte-identical bodies, and Lago's idempotency turns them into no-ops.
//!
//! # Two stores, one exporter
//!
//! What to send is decided by pure functions of the rating core ([`countersign_rating::lago`],
//! re-exported here), shared by both stores: [`plan_event`] (a
//! record and its epoch's exported maximum → the event bytes and the new maximum),
//! [`classify_answer`] (Lago's answer → [`CallOutcome`]) and [`next_step`] (outcome →
//! settle, resend after a wait, or stop). The IO is thin and per store ([`LagoOutbox`]): [`Outbox`](crate::store::lago::Outbox) on sled
//! (trees above), [`PgOutbox`](crate::store::lago::PgOutbox) on PostgreSQL (tables `lago_planned`, `lago_outbox`,
//! `lago_epoch_max`; see [`crate::store::postgres::lago`]). [`LagoExporter`] runs the same loop
//! over either.
//!
//! Only one exporter may plan and send at a time: on sled the store's directory lock makes
//! that one process; on PostgreSQL the active exporter holds a session advisory lock on a
//! connection of its own, and every exporter without it stands by (see
//! [`crate::store::postgres::lago`]).
//!
//! # Errors from Lago
//!
//! 429: wait `Retry-After` or `X-RateLimit-Reset` seconds (bounded by
//! [`LAGO_RETRY_AFTER_S_MAX`]), else back off. 5xx and transport errors: exponential backoff,
//! forever (the outbox is durable). Other 4xx, and 422s other than `value_already_exist`:
//! [`LagoError::Refused`], the exporter stops and nothing is dropped.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

pub use countersign_rating::lago::*;

use crate::store::lago::LagoOutbox;
use crate::store::{StoreBackend, StoreError};

/// Path of Lago's batch events endpoint below the base URL.
pub const LAGO_EVENTS_BATCH_PATH: &str = "/api/v1/events/batch";
/// Longest accepted Lago answer body, bytes.
pub const LAGO_RESPONSE_BYTES_MAX: usize = 1024 * 1024;
/// ICCIDs the subscription map may hold.
pub const LAGO_SUBSCRIPTIONS_MAX: usize = 1_000_000;
/// Longest billable metric code / subscription id accepted, bytes.
pub const LAGO_ID_BYTES_MAX: usize = 256;
/// Largest API key file, bytes.
pub const LAGO_API_KEY_FILE_BYTES_MAX: u64 = 4096;
/// HTTP timeout per call, seconds.
pub const LAGO_REQUEST_TIMEOUT_S: u64 = 30;

/// Why the export failed.
#[derive(Debug, thiserror::Error)]
pub enum LagoError {
    /// The Lago config is invalid; names the key. Not recoverable without editing it.
    #[error("{key}: {reason}")]
    Config {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The store failed. Recoverable when the store error is (see [`StoreError::is_recoverable`]).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Lago refused the events for a reason retrying cannot fix (auth, validation). Not
    /// recoverable: the events stay in the outbox until an operator fixes the cause.
    #[error("lago refused the batch: {status} {body}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Lago's answer, truncated.
        body: String,
    },
    /// The HTTP client could not be built. Not recoverable.
    #[error("http client: {0}")]
    Client(String),
}

impl LagoError {
    /// Whether the exporter may try again later without anyone changing anything: the
    /// store's faults that pass (disk full, database unreachable). Lago's own transient
    /// answers (429, 5xx) never surface as errors: the exporter retries them itself.
    pub fn is_recoverable(&self) -> bool {
        matches!(self, LagoError::Store(e) if e.is_recoverable())
    }
}

/// The validated Lago export configuration.
#[derive(Clone, Debug)]
pub struct LagoConfig {
    /// Lago's base URL, e.g. `https://api.getlago.com`.
    pub base_url: String,
    /// The API key (sent as `Authorization: Bearer`).
    pub api_key: String,
    /// The billable metric code, e.g. `data_bytes`.
    pub code: String,
    /// ICCID → Lago external subscription id.
    pub subscriptions: BTreeMap<u64, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLago {
    base_url: String,
    api_key_file: String,
    code: Option<String>,
    #[serde(default)]
    subscriptions: BTreeMap<String, String>,
}

fn config_err(key: impl Into<String>, reason: impl Into<String>) -> LagoError {
    LagoError::Config { key: key.into(), reason: reason.into() }
}

impl LagoConfig {
    /// Loads the Lago config (TOML; see README "Lago export"); a relative `api_key_file` is
    /// relative to the config file. The key file must not be readable by group or others.
    pub fn load(path: &Path) -> Result<Self, LagoError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| config_err(path.display().to_string(), format!("cannot read: {e}")))?;
        let raw: RawLago = toml::from_str(&text).map_err(|e| config_err("lago", e.message().to_owned()))?;
        let key_path = path.parent().unwrap_or(Path::new(".")).join(&raw.api_key_file);
        let api_key = read_api_key(&key_path)?;
        Self::from_raw(raw, api_key)
    }

    /// A config from its parts, validated like [`LagoConfig::load`].
    pub fn new(
        base_url: &str,
        api_key: &str,
        code: &str,
        subscriptions: BTreeMap<u64, String>,
    ) -> Result<Self, LagoError> {
        let raw = RawLago {
            base_url: base_url.into(),
            api_key_file: String::new(),
            code: Some(code.into()),
            subscriptions: subscriptions.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        };
        Self::from_raw(raw, api_key.into())
    }

    fn from_raw(raw: RawLago, api_key: String) -> Result<Self, LagoError> {
        if !(raw.base_url.starts_with("https://") || raw.base_url.starts_with("http://")) {
            return Err(config_err("base_url", "expected an http(s) URL"));
        }
        let code = raw.code.unwrap_or_else(|| "data_bytes".into());
        if code.is_empty() || code.len() > LAGO_ID_BYTES_MAX {
            return Err(config_err("code", format!("expected 1 to {LAGO_ID_BYTES_MAX} bytes")));
        }
        if api_key.is_empty() || api_key.contains(char::is_whitespace) {
            return Err(config_err("api_key_file", "empty or contains whitespace"));
        }
        if raw.subscriptions.len() > LAGO_SUBSCRIPTIONS_MAX {
            return Err(config_err("subscriptions", format!("more than {LAGO_SUBSCRIPTIONS_MAX}")));
        }
        let mut subscriptions = BTreeMap::new();
        for (iccid, sub) in raw.subscriptions {
            let key = format!("subscriptions.{iccid}");
            let i = countersign_rating::text::parse_iccid(&iccid)
                .ok_or_else(|| config_err(&key, "not an ICCID"))?;
            if sub.is_empty() || sub.len() > LAGO_ID_BYTES_MAX {
                return Err(config_err(&key, format!("expected 1 to {LAGO_ID_BYTES_MAX} bytes")));
            }
            subscriptions.insert(i, sub);
        }
        Ok(Self { base_url: raw.base_url.trim_end_matches('/').to_owned(), api_key, code, subscriptions })
    }
}

fn read_api_key(path: &Path) -> Result<String, LagoError> {
    use std::os::unix::fs::PermissionsExt;
    let key = "api_key_file";
    let meta = std::fs::metadata(path).map_err(|e| config_err(key, format!("{}: {e}", path.display())))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(config_err(
            key,
            format!("{} is readable by group or others; chmod 600 it", path.display()),
        ));
    }
    if meta.len() > LAGO_API_KEY_FILE_BYTES_MAX {
        return Err(config_err(key, "file too large"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| config_err(key, e.to_string()))?;
    Ok(text.trim().to_owned())
}

/// Forwards the outbox to Lago.
#[derive(Debug)]
pub struct LagoExporter {
    outbox: LagoOutbox,
    config: LagoConfig,
    http: reqwest::Client,
    url: String,
    events_per_call: usize,
}

/// Counters of one [`LagoExporter::drain`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Events newly planned.
    pub planned: usize,
    /// Events removed from the outbox as accepted.
    pub delivered: usize,
    /// Of those, accepted as `value_already_exist`.
    pub already_existed: usize,
    /// Calls answered 429.
    pub rate_limited: usize,
    /// Calls retried after a 5xx or transport error.
    pub retried: usize,
    /// Another exporter holds the export lock (PostgreSQL): this one did nothing.
    pub standby: bool,
}

impl LagoExporter {
    /// An exporter over `store`, sled or PostgreSQL.
    pub fn new(store: &StoreBackend, config: LagoConfig) -> Result<Self, LagoError> {
        let outbox = LagoOutbox::open(store)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(LAGO_REQUEST_TIMEOUT_S))
            .build()
            .map_err(|e| LagoError::Client(e.to_string()))?;
        let url = format!("{}{LAGO_EVENTS_BATCH_PATH}", config.base_url);
        Ok(Self { outbox, config, http, url, events_per_call: LAGO_EVENTS_PER_CALL_MAX })
    }

    /// The same exporter sending at most `n` events per call (clamped to 1 to
    /// [`LAGO_EVENTS_PER_CALL_MAX`]), e.g. for a self-hosted Lago with a lower
    /// `LAGO_EVENTS_BATCH_MAX_LENGTH`.
    pub fn with_events_per_call(mut self, n: usize) -> Self {
        self.events_per_call = n.clamp(1, LAGO_EVENTS_PER_CALL_MAX);
        self
    }

    /// Events planned and not yet accepted by Lago (any exporter's, on PostgreSQL).
    pub async fn pending(&self) -> Result<u64, LagoError> {
        Ok(self.outbox.pending().await?)
    }

    /// Plans new records, then sends until the outbox is empty. Retries 429/5xx/transport
    /// errors with backoff for as long as it takes; returns on a refusal or a store error,
    /// giving up the export lock (PostgreSQL). While another exporter holds the lock,
    /// returns at once with [`ExportStats::standby`] set.
    pub async fn drain(&self) -> Result<ExportStats, LagoError> {
        if !self.outbox.acquire().await? {
            tracing::debug!("another exporter holds the lago export lock; standing by");
            return Ok(ExportStats { standby: true, ..ExportStats::default() });
        }
        let drained = self.drain_active().await;
        if let Err(e) = &drained {
            tracing::warn!(error = %e, "lago export round failed; giving up the export lock");
            self.outbox.release().await;
        }
        drained
    }

    async fn drain_active(&self) -> Result<ExportStats, LagoError> {
        let mut stats = ExportStats {
            planned: self.outbox.plan(&self.config.subscriptions, &self.config.code).await?,
            ..Default::default()
        };
        let mut backoff = Backoff::default();
        loop {
            let events = self.outbox.peek(self.events_per_call).await?;
            if events.is_empty() {
                return Ok(stats);
            }
            let sent: Vec<u64> = events.iter().map(|(k, _)| *k).collect();
            match next_step(self.call(&events).await, &sent, &mut backoff) {
                Step::Settle { keys, already_existed } => {
                    let n = keys.len();
                    if already_existed {
                        tracing::info!(count = n, "lago already has these events; treated as delivered");
                        stats.already_existed += n;
                    }
                    self.outbox.settle(keys).await?;
                    stats.delivered += n;
                }
                Step::Resend { wait, rate_limited: true } => {
                    stats.rate_limited += 1;
                    tracing::warn!(wait_ms = wait.as_millis() as u64, "lago rate limit; waiting");
                    tokio::time::sleep(wait).await;
                }
                Step::Resend { wait, rate_limited: false } => {
                    stats.retried += 1;
                    tracing::warn!(delay_ms = wait.as_millis() as u64, "lago unavailable; backing off");
                    tokio::time::sleep(wait).await;
                }
                Step::Stop { status, body } => {
                    tracing::error!(status, %body, "lago refused the batch; events stay in the outbox");
                    return Err(LagoError::Refused { status, body });
                }
            }
        }
    }

    async fn call(&self, events: &[(u64, Vec<u8>)]) -> CallOutcome {
        let sent = self
            .http
            .post(&self.url)
            .bearer_auth(&self.config.api_key)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(batch_body(events))
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "lago call failed");
                return CallOutcome::Retry;
            }
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = match response.bytes().await {
            Ok(b) if b.len() <= LAGO_RESPONSE_BYTES_MAX => b,
            Ok(_) => return CallOutcome::Retry,
            Err(_) => return CallOutcome::Retry,
        };
        classify_answer(
            status,
            |h| headers.get(h).and_then(|v| v.to_str().ok()).map(str::to_owned),
            &body,
            events.len(),
        )
    }

    /// Runs [`LagoExporter::drain`] every `interval` until `shutdown` completes. A round that
    /// fails for a recoverable store fault is retried next round; a refusal ends the run.
    pub async fn run(
        self,
        interval: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), LagoError> {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                r = self.drain() => match r {
                    Ok(stats) if stats.delivered > 0 => tracing::info!(?stats, "lago export"),
                    Ok(_) => {}
                    // The outbox is durable: a store that comes back resumes where it was.
                    Err(e) if e.is_recoverable() => {
                        tracing::warn!(error = %e, "lago export round failed; retrying next round");
                    }
                    Err(e) => return Err(e),
                },
                () = &mut shutdown => return Ok(()),
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = &mut shutdown => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_name_the_key() {
        let e = LagoConfig::new("ftp://x", "k", "data_bytes", BTreeMap::new()).unwrap_err();
        assert!(e.to_string().starts_with("base_url: "), "{e}");
        let e = LagoConfig::new("http://x", "k", "", BTreeMap::new()).unwrap_err();
        assert!(e.to_string().starts_with("code: "), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("lago.key");
        std::fs::write(&key, "secret\n").unwrap();
        let cfg = dir.path().join("lago.toml");
        std::fs::write(
            &cfg,
            "base_url = \"http://127.0.0.1:3000/\"\napi_key_file = \"lago.key\"\n[subscriptions]\n\"8988280666000000001\" = \"sub_a\"\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = LagoConfig::load(&cfg).unwrap_err();
        assert!(e.to_string().starts_with("api_key_file: "), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = LagoConfig::load(&cfg).unwrap();
        assert_eq!(
            (c.base_url.as_str(), c.api_key.as_str(), c.code.as_str()),
            ("http://127.0.0.1:3000", "secret", "data_bytes")
        );
        assert_eq!(c.subscriptions[&8_988_280_666_000_000_001], "sub_a");
    }
}
