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
//! - `code` and the property name (`bytes` above) are `[lago] code` and `[lago] field`: the
//!   billable metric's code and its `field_name`.
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
//! `[lago] events_per_call` (default [`LAGO_EVENTS_PER_CALL_DEFAULT`], at most
//! [`LAGO_EVENTS_PER_CALL_MAX`]) per call, and removes entries **only after Lago accepted
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
//! # The billable metric
//!
//! Lago accepts an event of a code no metric has, or without the metric's field, and bills
//! nothing for it. So before it plans or sends anything, and again every
//! [`LAGO_METRIC_CHECK_INTERVAL_S`], [`LagoExporter::run`] reads the metric
//! (`GET /api/v1/billable_metrics/{code}`) and sends only while [`check_metric`] says it
//! exists, sums (`sum_agg`) the configured field, has no expression and is not recurring.
//! While it does not, or cannot be read, the export waits and checks again every round.
//! Events are planned with the code and field configured at the time and sent verbatim, so
//! an outbox holding events of another code or field (the config changed with a backlog)
//! stops the export before anything new is planned ([`planned_for_other_metric`]).
//!
//! # Errors from Lago
//!
//! 429: wait `Retry-After` or `X-RateLimit-Reset` seconds (bounded by
//! [`LAGO_RETRY_AFTER_S_MAX`]), else back off. 5xx and transport errors: exponential backoff,
//! forever (the outbox is durable). Other 4xx, and 422s other than `value_already_exist`:
//! [`LagoError::Refused`], named by [`explain_refusal`] (`too_many_events` when the batch is
//! larger than Lago's `LAGO_EVENTS_BATCH_MAX_LENGTH`): the export stops and nothing is
//! dropped.
//!
//! # What an operator sees
//!
//! Every transition goes to the shared [`LagoStatus`] ([`LagoExporter::status`]): `/health`
//! answers `degraded` with the problem, its code, a hint and the backlog; `/metrics` carries
//! `countersign_lago_export_stopped`, `countersign_lago_metric_mismatch`,
//! `countersign_lago_unavailable` (every call failing for [`LAGO_UNAVAILABLE_DEGRADED_S`]),
//! `countersign_lago_backlog_events`, and `countersign-cloud lago status` prints it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

pub use countersign_rating::lago::*;

use crate::metrics::log_excerpt;
use crate::service::lago_status::now_unix_s;
pub use crate::service::lago_status::{
    LagoStatus, LAGO_METRIC_CHECK_INTERVAL_S, LAGO_UNAVAILABLE_DEGRADED_S,
};
use crate::store::lago::LagoOutbox;
use crate::store::{StoreBackend, StoreError};

/// Path of Lago's batch events endpoint below the base URL.
pub const LAGO_EVENTS_BATCH_PATH: &str = "/api/v1/events/batch";
/// Path of Lago's billable metrics below the base URL; one metric is `…/{code}`.
pub const LAGO_BILLABLE_METRICS_PATH: &str = "/api/v1/billable_metrics";
/// Longest accepted Lago answer body, bytes.
pub const LAGO_RESPONSE_BYTES_MAX: usize = 1024 * 1024;
/// ICCIDs the subscription map may hold.
pub const LAGO_SUBSCRIPTIONS_MAX: usize = 1_000_000;
/// Longest billable metric code / subscription id accepted, bytes.
pub const LAGO_ID_BYTES_MAX: usize = 256;
/// Largest API key file, bytes.
pub const LAGO_API_KEY_FILE_BYTES_MAX: u64 = 4096;
/// Seconds between two counts of the outbox while the export does not send (stopped,
/// mismatch, standby): a count walks the whole outbox on sled.
pub const LAGO_BACKLOG_COUNT_INTERVAL_S: u64 = 60;
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
    #[error("lago refused the batch ({code}): {status} {body}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The refusal's stable name ([`explain_refusal`]), e.g. `too_many_events`.
        code: String,
        /// Lago's answer, truncated.
        body: String,
    },
    /// The outbox holds events planned under another code or field than configured (the
    /// config changed with a backlog). Not recoverable without an operator: see the message.
    #[error("{0}")]
    OutboxMetricChanged(String),
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
    /// The billable metric: `code` (e.g. `data_bytes`) and the property Lago sums, `field`
    /// (e.g. `bytes`).
    pub metric: LagoMetric,
    /// Events per batch call, 1 to [`LAGO_EVENTS_PER_CALL_MAX`]; at most Lago's
    /// `LAGO_EVENTS_BATCH_MAX_LENGTH`.
    pub events_per_call: usize,
    /// ICCID → Lago external subscription id.
    pub subscriptions: BTreeMap<u64, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLago {
    base_url: String,
    api_key_file: String,
    code: Option<String>,
    field: Option<String>,
    // Signed, so that a negative value is refused here naming the key, not by serde.
    events_per_call: Option<i64>,
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
            field: None,
            events_per_call: None,
            subscriptions: subscriptions.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        };
        Self::from_raw(raw, api_key.into())
    }

    /// The same config sending at most `n` events per call, validated like the
    /// `events_per_call` key.
    pub fn with_events_per_call(mut self, n: usize) -> Result<Self, LagoError> {
        self.events_per_call = events_per_call(Some(i64::try_from(n).unwrap_or(i64::MAX)))?;
        Ok(self)
    }

    /// The same config with the bytes in property `field`, validated like the `field` key.
    pub fn with_field(mut self, field: &str) -> Result<Self, LagoError> {
        self.metric.field = metric_field(Some(field.to_owned()))?;
        Ok(self)
    }

    fn from_raw(raw: RawLago, api_key: String) -> Result<Self, LagoError> {
        if !(raw.base_url.starts_with("https://") || raw.base_url.starts_with("http://")) {
            return Err(config_err("base_url", "expected an http(s) URL"));
        }
        let code = raw.code.unwrap_or_else(|| LAGO_METRIC_CODE_DEFAULT.into());
        if code.is_empty() || code.len() > LAGO_ID_BYTES_MAX || code.contains(char::is_control) {
            return Err(config_err(
                "code",
                format!("expected 1 to {LAGO_ID_BYTES_MAX} bytes, no control characters"),
            ));
        }
        let field = metric_field(raw.field)?;
        let events_per_call = events_per_call(raw.events_per_call)?;
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
        Ok(Self {
            base_url: raw.base_url.trim_end_matches('/').to_owned(),
            api_key,
            metric: LagoMetric { code, field },
            events_per_call,
            subscriptions,
        })
    }
}

fn metric_field(field: Option<String>) -> Result<String, LagoError> {
    let field = field.unwrap_or_else(|| LAGO_METRIC_FIELD_DEFAULT.into());
    if field.is_empty() || field.len() > LAGO_ID_BYTES_MAX || field.contains(char::is_control) {
        return Err(config_err(
            "field",
            format!("expected 1 to {LAGO_ID_BYTES_MAX} bytes, no control characters"),
        ));
    }
    Ok(field)
}

fn events_per_call(n: Option<i64>) -> Result<usize, LagoError> {
    let Some(n) = n else { return Ok(LAGO_EVENTS_PER_CALL_DEFAULT) };
    usize::try_from(n).ok().filter(|n| (1..=LAGO_EVENTS_PER_CALL_MAX).contains(n)).ok_or_else(|| {
        config_err(
            "events_per_call",
            format!("expected 1 to {LAGO_EVENTS_PER_CALL_MAX} (at most lago's LAGO_EVENTS_BATCH_MAX_LENGTH), got {n}"),
        )
    })
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
    metric_url: reqwest::Url,
    status: Arc<LagoStatus>,
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
        // The code goes in as one path segment, percent-encoded by the URL type.
        let mut metric_url = reqwest::Url::parse(&format!("{}{LAGO_BILLABLE_METRICS_PATH}", config.base_url))
            .map_err(|e| config_err("base_url", e.to_string()))?;
        metric_url
            .path_segments_mut()
            .map_err(|()| config_err("base_url", "cannot be a base"))?
            .push(&config.metric.code);
        let status = Arc::new(LagoStatus::new(&config.metric.code, config.events_per_call));
        Ok(Self { outbox, config, http, url, metric_url, status })
    }

    /// Where the export stands, shared with the API (`/health`, `/metrics`).
    pub fn status(&self) -> Arc<LagoStatus> {
        Arc::clone(&self.status)
    }

    /// Events planned and not yet accepted by Lago (any exporter's, on PostgreSQL).
    pub async fn pending(&self) -> Result<u64, LagoError> {
        Ok(self.outbox.pending().await?)
    }

    /// Plans new records, then sends until the outbox is empty. Retries 429/5xx/transport
    /// errors with backoff for as long as it takes; returns on a refusal or a store error,
    /// giving up the export lock (PostgreSQL). While another exporter holds the lock,
    /// returns at once with [`ExportStats::standby`] set. Does not check the billable
    /// metric ([`LagoExporter::check_metric`]; [`LagoExporter::run`] does both). A refusal
    /// also stops the shared [`LagoStatus`].
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
        // Before planning: events of the configured metric must not be queued behind events
        // of an older config, or going back to that config to send those would strand these.
        self.refuse_other_metric(&self.outbox.peek(self.config.events_per_call).await?).await?;
        let mut stats = ExportStats {
            planned: self.outbox.plan(&self.config.subscriptions, &self.config.metric).await?,
            ..Default::default()
        };
        let mut backoff = Backoff::default();
        loop {
            let events = self.outbox.peek(self.config.events_per_call).await?;
            if events.is_empty() {
                return Ok(stats);
            }
            self.refuse_other_metric(&events).await?;
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
                    self.status.update(|s| {
                        s.call_ok();
                        s.delivered(n);
                    });
                }
                Step::Resend { wait, rate_limited: true } => {
                    stats.rate_limited += 1;
                    self.status.update(|s| s.call_failed(now_unix_s()));
                    tracing::warn!(wait_ms = wait.as_millis() as u64, "lago rate limit; waiting");
                    tokio::time::sleep(wait).await;
                }
                Step::Resend { wait, rate_limited: false } => {
                    stats.retried += 1;
                    self.status.update(|s| s.call_failed(now_unix_s()));
                    tracing::warn!(delay_ms = wait.as_millis() as u64, "lago unavailable; backing off");
                    tokio::time::sleep(wait).await;
                }
                Step::Stop { status, body } => {
                    let why = explain_refusal(status, body.as_bytes(), self.config.events_per_call);
                    let pending = self.outbox.pending().await.ok();
                    tracing::error!(
                        status,
                        code = %why.code,
                        body = %log_excerpt(&body),
                        hint = %why.hint,
                        pending,
                        "lago refused the batch; the export stops, the events stay in the outbox"
                    );
                    self.status.update(|s| {
                        if let Some(n) = pending {
                            s.backlog(n);
                        }
                        s.stop(
                            &why.code,
                            format!("lago refused the batch: {status} {body}"),
                            why.hint.clone(),
                            now_unix_s(),
                        );
                    });
                    return Err(LagoError::Refused { status, code: why.code, body });
                }
            }
        }
    }

    /// Stops the export when `events` (read from the outbox) hold one planned under another
    /// code or field than configured: sent as they are, they would feed another metric.
    async fn refuse_other_metric(&self, events: &[(u64, Vec<u8>)]) -> Result<(), LagoError> {
        let Some(what) = planned_for_other_metric(events, &self.config.metric) else { return Ok(()) };
        let code = "outbox_metric_changed";
        let pending = self.outbox.pending().await.ok();
        tracing::error!(%what, pending, "lago export stops: the outbox holds events of another metric");
        self.status.update(|s| {
            if let Some(n) = pending {
                s.backlog(n);
            }
            s.stop(
                code,
                what.clone(),
                "set [lago] code and field back to what the outbox holds and restart; change them once \
                 lago status shows a backlog of 0"
                    .into(),
                now_unix_s(),
            );
        });
        Err(LagoError::OutboxMetricChanged(what))
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

    /// Reads the billable metric from Lago and records what [`check_metric`] says in the
    /// shared status; returns it too.
    pub async fn check_metric(&self) -> MetricCheck {
        let answer = self.http.get(self.metric_url.clone()).bearer_auth(&self.config.api_key).send().await;
        let check = match answer {
            Err(e) => {
                tracing::warn!(error = %e, "lago billable metric check failed");
                MetricCheck::Unavailable
            }
            Ok(r) => {
                let status = r.status().as_u16();
                match r.bytes().await {
                    Ok(b) if b.len() <= LAGO_RESPONSE_BYTES_MAX => {
                        check_metric(status, &b, &self.config.metric)
                    }
                    _ => MetricCheck::Unavailable,
                }
            }
        };
        let refusal = match &check {
            MetricCheck::Refused(status, body) => {
                Some(explain_refusal(*status, body.as_bytes(), self.config.events_per_call))
            }
            _ => None,
        };
        match &check {
            MetricCheck::Ok => {
                tracing::debug!(code = %self.config.metric.code, "lago billable metric matches")
            }
            MetricCheck::Mismatch(m) => {
                tracing::error!(problem = %log_excerpt(&m.to_string()), "lago billable metric mismatch; export waits")
            }
            MetricCheck::Unavailable => tracing::warn!("lago billable metric could not be checked"),
            MetricCheck::Refused(status, body) => {
                tracing::error!(status, body = %log_excerpt(body), "lago refused the billable metric check")
            }
        }
        self.status.update(|s| s.metric_checked(&check, refusal.as_ref(), now_unix_s()));
        check
    }

    /// Counts the outbox for the status, at most once per [`LAGO_BACKLOG_COUNT_INTERVAL_S`]
    /// (`counted`: when it last did): on sled a count walks the whole outbox.
    async fn count_backlog(&self, counted: &mut Option<tokio::time::Instant>) {
        let now = tokio::time::Instant::now();
        if counted.is_some_and(|t| now.duration_since(t) < Duration::from_secs(LAGO_BACKLOG_COUNT_INTERVAL_S))
        {
            return;
        }
        *counted = Some(now);
        match self.outbox.pending().await {
            Ok(n) => self.status.update(|s| s.backlog(n)),
            Err(e) => tracing::warn!(error = %e, "cannot count the lago outbox"),
        }
    }

    /// One round of [`LagoExporter::run`]: check the metric when due, drain when allowed,
    /// count the backlog when not. `next_check` is when the metric is due next (`None`:
    /// never again, the export stopped); `counted` is when the backlog was last counted.
    async fn round(
        &self,
        next_check: &mut Option<tokio::time::Instant>,
        counted: &mut Option<tokio::time::Instant>,
    ) {
        let due = next_check.is_some_and(|t| tokio::time::Instant::now() >= t);
        if due {
            self.check_metric().await;
            *next_check = self.status.snapshot().metric_check_in().map(|d| tokio::time::Instant::now() + d);
        }
        if !self.status.snapshot().may_send() {
            self.count_backlog(counted).await;
            return;
        }
        match self.drain().await {
            Ok(stats) => {
                if stats.delivered > 0 {
                    tracing::info!(?stats, "lago export");
                }
                self.status.update(|s| s.round_done(stats.standby));
                if stats.standby {
                    self.count_backlog(counted).await;
                } else {
                    // The active exporter just emptied the outbox.
                    self.status.update(|s| s.backlog(0));
                }
            }
            // The outbox is durable: a store that comes back resumes where it was.
            Err(e) if e.is_recoverable() => {
                tracing::warn!(error = %e, "lago export round failed; retrying next round");
            }
            // The status is stopped already (drain did it).
            Err(LagoError::Refused { .. } | LagoError::OutboxMetricChanged(_)) => {}
            Err(e) => {
                tracing::error!(error = %e, "lago export stopped");
                self.status.update(|s| {
                    s.stop(
                        "export_failed",
                        e.to_string(),
                        "see the endpoint's log; fix the cause, then restart the endpoint".into(),
                        now_unix_s(),
                    )
                });
            }
        }
    }

    /// Checks the billable metric, then runs [`LagoExporter::drain`] every `interval`, until
    /// `shutdown` completes. Sends only while the metric matches (checked again every
    /// [`LAGO_METRIC_CHECK_INTERVAL_S`], or every round while it does not). A round that
    /// fails for a recoverable store fault is retried next round; a refusal stops the export
    /// for the life of the process (the status says why; the backlog is still counted).
    pub async fn run(self, interval: Duration, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut next_check = Some(tokio::time::Instant::now());
        let mut counted = None;
        loop {
            tokio::select! {
                () = self.round(&mut next_check, &mut counted) => {}
                () = &mut shutdown => return,
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = &mut shutdown => return,
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
            (c.base_url.as_str(), c.api_key.as_str(), &c.metric, c.events_per_call),
            ("http://127.0.0.1:3000", "secret", &LagoMetric::default(), LAGO_EVENTS_PER_CALL_DEFAULT)
        );
        assert_eq!((c.metric.code.as_str(), c.metric.field.as_str()), ("data_bytes", "bytes"));
        assert_eq!(c.subscriptions[&8_988_280_666_000_000_001], "sub_a");

        // The metric and the batch size are keys of their own, each named when wrong.
        let with = |extra: &str| {
            std::fs::write(&cfg, format!("base_url = \"http://x\"\napi_key_file = \"lago.key\"\n{extra}\n"))
                .unwrap();
            LagoConfig::load(&cfg)
        };
        let c = with("code = \"sim_data\"\nfield = \"octets\"\nevents_per_call = 40").unwrap();
        assert_eq!(
            (c.metric.code.as_str(), c.metric.field.as_str(), c.events_per_call),
            ("sim_data", "octets", 40)
        );
        for (extra, key) in [
            ("events_per_call = 0", "events_per_call: "),
            ("events_per_call = -5", "events_per_call: "),
            ("events_per_call = 1001", "events_per_call: "),
            ("field = \"\"", "field: "),
            ("field = \"a\\nb\"", "field: "),
        ] {
            let e = with(extra).unwrap_err();
            assert!(e.to_string().starts_with(key), "{extra}: {e}");
        }
        assert_eq!(
            with(&format!("events_per_call = {LAGO_EVENTS_PER_CALL_MAX}")).unwrap().events_per_call,
            1000
        );
        let e = LagoConfig::new("http://x", "k", "c", BTreeMap::new())
            .unwrap()
            .with_events_per_call(0)
            .unwrap_err();
        assert!(e.to_string().starts_with("events_per_call: "), "{e}");
    }
}
