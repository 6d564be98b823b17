//! Agent configuration: a TOML file, validated once into [`AgentConfig`].
//!
//! A minimal file is four lines:
//!
//! ```toml
//! gateway_id = 1
//! gateway_key_file = "/etc/countersign/gateway.key"
//! data_dir = "/var/lib/countersign-agent"
//! endpoint_url = "https://rating.example.com"
//! ```
//!
//! Everything else has a default sized for a small ARM gateway. Every error names its key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use countersign_protocol::batch::{BATCH_BYTES_MAX, BATCH_RECORDS_MAX};
use serde::Deserialize;

/// Smallest sled page cache the agent accepts.
pub const CACHE_CAPACITY_BYTES_MIN: u64 = 1024 * 1024;
/// Default sled page cache (`store.cache_capacity_bytes`).
pub const CACHE_CAPACITY_BYTES_DEFAULT: u64 = 2 * 1024 * 1024;
/// Largest sled page cache the agent accepts (sled's own default of 1 GiB is far too much).
pub const CACHE_CAPACITY_BYTES_MAX: u64 = 1024 * 1024 * 1024;
/// Most reports one sled flush may cover.
pub const COMMIT_REPORTS_MAX: usize = 4096;
/// Default reports per sled flush (`commit.reports_max`): a group's publishes, chunks and
/// acks are in memory together, and 1024 keeps the agent within 16 MiB RSS while a backlog
/// arrives (tests/benches/agent_footprint.rs) at a fraction of a flush per 1000 reports.
pub const COMMIT_REPORTS_DEFAULT: usize = 1024;
/// Longest a received report may wait for its flush.
pub const COMMIT_DELAY_MS_MAX: u64 = 1000;
/// Longest upload backoff.
pub const RETRY_DELAY_MS_MAX: u64 = 5 * 60 * 1000;
/// Longest request timeout towards the endpoint.
pub const HTTP_TIMEOUT_MS_MAX: u64 = 5 * 60 * 1000;
/// Smallest buffer quota: room for a few thousand reports.
pub const QUOTA_BYTES_MIN: u64 = 256 * 1024;
/// Largest buffer quota.
pub const QUOTA_BYTES_MAX: u64 = 64 * 1024 * 1024 * 1024;
/// Default free space kept on the buffer's filesystem: room for sled to finish a few
/// segments (512 KiB each) and a snapshot after the agent stops acking.
pub const DISK_FREE_BYTES_MIN_DEFAULT: u64 = 16 * 1024 * 1024;
/// Largest reserve of free space that can be configured.
pub const DISK_FREE_BYTES_MIN_MAX: u64 = 64 * 1024 * 1024 * 1024;
/// Fastest upload rate that can be configured after an outage.
pub const BATCHES_PER_S_MAX: u32 = 1000;
/// Smallest space for quarantine or `rejected`: a few entries of the largest kind.
pub const SIDE_BYTES_MIN: u64 = 64 * 1024;
/// Largest space for quarantine or `rejected`.
pub const SIDE_BYTES_MAX: u64 = 1024 * 1024 * 1024;
/// Default address of the `/health`, `/metrics` and `/status` listener.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:9464";

/// Why a configuration was refused. Never recoverable without editing the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The TOML does not parse or has unknown or mistyped keys (the message names the key).
    #[error("config: {0}")]
    Parse(String),
    /// A key has a value outside its allowed range.
    #[error("config key `{key}`: {problem}")]
    Invalid {
        /// Dotted key, e.g. `mqtt.port`.
        key: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    gateway_id: u64,
    gateway_key_file: PathBuf,
    data_dir: PathBuf,
    endpoint_url: String,
    #[serde(default)]
    allow_plain_http: bool,
    #[serde(default)]
    mqtt: RawMqtt,
    #[serde(default)]
    batch: RawBatch,
    #[serde(default)]
    commit: RawCommit,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    http: RawHttp,
    uplink: Option<RawUplink>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUplink {
    meter_id: u64,
    key_file: PathBuf,
    iccid: String,
    interfaces: Vec<String>,
    #[serde(default = "default_uplink_read_s")]
    read_interval_s: u64,
    #[serde(default = "default_uplink_report_s")]
    report_interval_s_max: u32,
    #[serde(default = "default_uplink_delta")]
    report_delta_bytes_min: u64,
    #[serde(default = "default_sysfs_net")]
    sysfs_net: PathBuf,
    state_file: Option<PathBuf>,
}

fn default_uplink_read_s() -> u64 {
    60
}
fn default_uplink_report_s() -> u32 {
    3600
}
fn default_uplink_delta() -> u64 {
    1024 * 1024
}
fn default_sysfs_net() -> PathBuf {
    PathBuf::from("/sys/class/net")
}

/// Metering of the gateway's own cellular uplink (absent: not metered).
#[derive(Clone, Debug)]
pub struct UplinkConfig {
    /// The uplink meter's id, registered at the endpoint with its key.
    pub meter_id: u64,
    /// File with the meter's 32-byte HMAC key (0600).
    pub key_file: PathBuf,
    /// ICCID of the gateway's SIM (19 digits; a 20th Luhn digit is dropped).
    pub iccid: u64,
    /// Interfaces whose counters are summed, e.g. `wwan0`.
    pub interfaces: Vec<String>,
    /// How often the counters are read.
    pub read_interval: Duration,
    /// Report policy of the uplink meter.
    pub policy: countersign_meter::ReportPolicy,
    /// Where the kernel's interface directories are (`/sys/class/net`).
    pub sysfs_net: PathBuf,
    /// The meter's epoch and lifetime totals.
    pub state_file: PathBuf,
}

/// Parses an ICCID of 19 digits, or 20 with a trailing Luhn check digit (dropped).
pub fn parse_iccid(s: &str) -> Option<u64> {
    let s = s.trim();
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match s.len() {
        19 => s.parse().ok(),
        20 => s[..19].parse().ok(),
        _ => None,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawMqtt {
    host: String,
    port: u16,
    client_id: Option<String>,
    topic: String,
    keep_alive_s: u64,
    username: Option<String>,
    password: Option<String>,
    ca_file: Option<PathBuf>,
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
}

impl Default for RawMqtt {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: None,
            topic: format!("{}+", countersign_protocol::REPORT_TOPIC_PREFIX),
            keep_alive_s: 30,
            username: None,
            password: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawBatch {
    records_max: usize,
    bytes_max: usize,
    linger_ms: u64,
    retry_delay_ms_min: u64,
    retry_delay_ms_max: u64,
    batches_per_s_max: u32,
}

impl Default for RawBatch {
    fn default() -> Self {
        Self {
            records_max: 2000,
            bytes_max: 256 * 1024,
            linger_ms: 200,
            retry_delay_ms_min: 500,
            retry_delay_ms_max: 60_000,
            batches_per_s_max: 20,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCommit {
    reports_max: usize,
    delay_ms: u64,
}

impl Default for RawCommit {
    fn default() -> Self {
        Self { reports_max: COMMIT_REPORTS_DEFAULT, delay_ms: 5 }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    cache_capacity_bytes: u64,
    quota_bytes: u64,
    disk_free_bytes_min: u64,
    quarantine_bytes_max: u64,
    rejected_bytes_max: u64,
}

impl Default for RawStore {
    fn default() -> Self {
        Self {
            cache_capacity_bytes: CACHE_CAPACITY_BYTES_DEFAULT,
            quota_bytes: 128 * 1024 * 1024,
            disk_free_bytes_min: DISK_FREE_BYTES_MIN_DEFAULT,
            quarantine_bytes_max: crate::store::QUARANTINE_BYTES_MAX_DEFAULT,
            rejected_bytes_max: crate::store::REJECTED_BYTES_MAX_DEFAULT,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHttp {
    timeout_ms: u64,
    listen: Option<String>,
    ca_file: Option<PathBuf>,
    pin_sha256: Option<Vec<String>>,
}

impl Default for RawHttp {
    fn default() -> Self {
        Self { timeout_ms: 30_000, listen: Some(LISTEN_DEFAULT.to_owned()), ca_file: None, pin_sha256: None }
    }
}

/// Whom the agent trusts to be the endpoint over HTTPS.
#[derive(Clone, Debug)]
pub enum EndpointTrust {
    /// The built-in public roots.
    SystemRoots,
    /// Only this CA (PEM), e.g. a provider's private CA.
    Ca(Vec<u8>),
    /// Only server certificates with these SHA-256 digests (of the DER).
    Pinned(Vec<[u8; 32]>),
}

/// MQTT settings.
#[derive(Clone, Debug)]
pub struct MqttConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Stable client id: the broker keeps our session (and unacked reports) under it.
    pub client_id: String,
    /// Topic filter for device reports.
    pub topic: String,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Optional username and password.
    pub credentials: Option<(String, String)>,
    /// MQTT over TLS (rustls, ring), when a CA is configured.
    pub tls: Option<MqttTls>,
}

/// TLS towards the broker: the CA that signed the broker's certificate, and optionally a
/// client certificate.
#[derive(Clone, Debug)]
pub struct MqttTls {
    /// PEM of the CA certificate(s).
    pub ca_pem: Vec<u8>,
    /// PEM of the client certificate chain and its private key.
    pub client_auth: Option<(Vec<u8>, Vec<u8>)>,
}

/// Largest PEM file read for TLS settings.
const PEM_FILE_BYTES_MAX: u64 = 256 * 1024;

fn read_pem(key: &'static str, path: &Path, secret: bool) -> Result<Vec<u8>, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| invalid(key, format!("{}: {e}", path.display())))?;
    if meta.len() > PEM_FILE_BYTES_MAX {
        return Err(invalid(key, format!("{} is larger than {PEM_FILE_BYTES_MAX} bytes", path.display())));
    }
    let mode = meta.permissions().mode() & 0o777;
    if secret && mode & 0o077 != 0 {
        return Err(invalid(
            key,
            format!("{} is readable by others (mode {mode:o}); run chmod 600 on it", path.display()),
        ));
    }
    let pem = std::fs::read(path).map_err(|e| invalid(key, format!("{}: {e}", path.display())))?;
    if !pem.windows(10).any(|w| w == b"-----BEGIN") {
        return Err(invalid(key, format!("{} is not PEM", path.display())));
    }
    Ok(pem)
}

/// Batch upload settings.
#[derive(Clone, Copy, Debug)]
pub struct BatchConfig {
    /// Most records per batch.
    pub records_max: usize,
    /// Most bytes per signed batch.
    pub bytes_max: usize,
    /// How long to wait for more records before sending a batch that is not full.
    pub linger: Duration,
    /// First retry delay after a failed upload.
    pub retry_delay_min: Duration,
    /// Longest retry delay.
    pub retry_delay_max: Duration,
    /// Upload at most this many batches a second, so a backlog after a long outage does
    /// not flood the endpoint.
    pub batches_per_s_max: u32,
}

/// Group commit settings.
#[derive(Clone, Copy, Debug)]
pub struct CommitConfig {
    /// Most reports covered by one flush.
    pub reports_max: usize,
    /// Longest a report waits for more to share its flush.
    pub delay: Duration,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// This gateway's id, registered at the endpoint with its public key.
    pub gateway_id: u64,
    /// File with the gateway's Ed25519 seed (0600).
    pub gateway_key_file: PathBuf,
    /// Where the sled database lives.
    pub data_dir: PathBuf,
    /// Base URL of the rating endpoint (`http://` only to a loopback host, or with
    /// `allow_plain_http`: see [`plain_http_allowed`]).
    pub endpoint_url: String,
    /// MQTT settings.
    pub mqtt: MqttConfig,
    /// Batch settings.
    pub batch: BatchConfig,
    /// Group commit settings.
    pub commit: CommitConfig,
    /// sled page cache size.
    pub cache_capacity_bytes: u64,
    /// Most logical bytes the buffer may hold before the agent stops acking (the broker then
    /// keeps the reports). sled's files take about 2.5× this on disk.
    pub quota_bytes: u64,
    /// The own space of quarantine and `rejected` (`store.quarantine_bytes_max`,
    /// `store.rejected_bytes_max`), outside the quota.
    pub side_limits: crate::store::SideLimits,
    /// Free space the agent leaves on the buffer's filesystem: below it, it stops acking as at
    /// the quota, and it does not reopen a failed database until this much is free. 0 turns
    /// the reserve off (sled then meets the full disk itself, which the agent survives).
    pub disk_free_bytes_min: u64,
    /// Request timeout towards the endpoint.
    pub http_timeout: Duration,
    /// Address of the `/health`, `/metrics` and `/status` listener; `None` when disabled
    /// with `http.listen = ""`.
    pub listen: Option<SocketAddr>,
    /// Metering of the gateway's own uplink, if configured.
    pub uplink: Option<UplinkConfig>,
    /// Who may answer as the endpoint over HTTPS.
    pub endpoint_trust: EndpointTrust,
}

/// Whether `url` may be used: `https://` always, `http://` only to a loopback host
/// (127.0.0.0/8, ::1, `localhost`) unless `allow_plain_http`. Pure.
///
/// Batches are signed, but a reply is not: whoever can answer for the endpoint decides which
/// reports the agent forgets, so it must be the endpoint (TLS) or a host-local process.
pub fn plain_http_allowed(url: &str, allow_plain_http: bool) -> bool {
    let Some(rest) = url.strip_prefix("http://") else { return true };
    if allow_plain_http {
        return true;
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    // Userinfo is not used by the agent; a host after '@' is the real one.
    let hostport = authority.rsplit('@').next().unwrap_or("");
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        hostport.split(':').next().unwrap_or("")
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, problem: problem.into() }
}

fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    key: &'static str,
    v: T,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    if v < min || v > max {
        return Err(invalid(key, format!("{v} is outside {min}..={max}")));
    }
    Ok(v)
}

impl AgentConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml_str(&text)
    }

    /// Parses and validates TOML text.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        if raw.endpoint_url.is_empty()
            || !(raw.endpoint_url.starts_with("http://") || raw.endpoint_url.starts_with("https://"))
        {
            return Err(invalid("endpoint_url", "must start with http:// or https://"));
        }
        if !plain_http_allowed(&raw.endpoint_url, raw.allow_plain_http) {
            return Err(invalid(
                "endpoint_url",
                "plain http:// is allowed only to a loopback host (127.0.0.0/8, ::1, localhost): \
                 use https://, or set allow_plain_http = true if the network path is protected otherwise",
            ));
        }
        if raw.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        if raw.gateway_key_file.as_os_str().is_empty() {
            return Err(invalid("gateway_key_file", "must not be empty"));
        }
        let m = raw.mqtt;
        if m.host.is_empty() {
            return Err(invalid("mqtt.host", "must not be empty"));
        }
        if m.port == 0 {
            return Err(invalid("mqtt.port", "must not be 0"));
        }
        // rumqttc panics on an empty client id with a persistent session.
        let client_id = m.client_id.unwrap_or_else(|| format!("countersign-agent-{}", raw.gateway_id));
        if client_id.is_empty() || client_id.len() > 64 {
            return Err(invalid("mqtt.client_id", "must be 1 to 64 characters"));
        }
        if !m.topic.starts_with(countersign_protocol::REPORT_TOPIC_PREFIX) {
            return Err(invalid(
                "mqtt.topic",
                format!("must start with {}", countersign_protocol::REPORT_TOPIC_PREFIX),
            ));
        }
        let keep_alive_s = in_range("mqtt.keep_alive_s", m.keep_alive_s, 5, 3600)?;
        let credentials = match (m.username, m.password) {
            (Some(u), Some(p)) => Some((u, p)),
            (None, None) => None,
            (Some(_), None) => return Err(invalid("mqtt.password", "is required with mqtt.username")),
            (None, Some(_)) => return Err(invalid("mqtt.username", "is required with mqtt.password")),
        };
        let tls = match (m.ca_file, m.client_cert_file, m.client_key_file) {
            (None, None, None) => None,
            (None, _, _) => return Err(invalid("mqtt.ca_file", "is required for MQTT over TLS")),
            (Some(ca), cert, key) => {
                let client_auth = match (cert, key) {
                    (None, None) => None,
                    (Some(c), Some(k)) => Some((
                        read_pem("mqtt.client_cert_file", &c, false)?,
                        read_pem("mqtt.client_key_file", &k, true)?,
                    )),
                    (Some(_), None) => {
                        return Err(invalid("mqtt.client_key_file", "is required with mqtt.client_cert_file"))
                    }
                    (None, Some(_)) => {
                        return Err(invalid("mqtt.client_cert_file", "is required with mqtt.client_key_file"))
                    }
                };
                Some(MqttTls { ca_pem: read_pem("mqtt.ca_file", &ca, false)?, client_auth })
            }
        };
        let b = raw.batch;
        let records_max = in_range("batch.records_max", b.records_max, 1, BATCH_RECORDS_MAX)?;
        let bytes_max = in_range("batch.bytes_max", b.bytes_max, 1024, BATCH_BYTES_MAX)?;
        let linger_ms = in_range("batch.linger_ms", b.linger_ms, 0, 60_000)?;
        let retry_min = in_range("batch.retry_delay_ms_min", b.retry_delay_ms_min, 10, RETRY_DELAY_MS_MAX)?;
        let retry_max =
            in_range("batch.retry_delay_ms_max", b.retry_delay_ms_max, retry_min, RETRY_DELAY_MS_MAX)?;
        let batches_per_s_max =
            in_range("batch.batches_per_s_max", b.batches_per_s_max, 1, BATCHES_PER_S_MAX)?;
        let c = raw.commit;
        let reports_max = in_range("commit.reports_max", c.reports_max, 1, COMMIT_REPORTS_MAX)?;
        let delay_ms = in_range("commit.delay_ms", c.delay_ms, 0, COMMIT_DELAY_MS_MAX)?;
        let cache = in_range(
            "store.cache_capacity_bytes",
            raw.store.cache_capacity_bytes,
            CACHE_CAPACITY_BYTES_MIN,
            CACHE_CAPACITY_BYTES_MAX,
        )?;
        let quota_bytes =
            in_range("store.quota_bytes", raw.store.quota_bytes, QUOTA_BYTES_MIN, QUOTA_BYTES_MAX)?;
        let disk_free_bytes_min =
            in_range("store.disk_free_bytes_min", raw.store.disk_free_bytes_min, 0, DISK_FREE_BYTES_MIN_MAX)?;
        let side_limits = crate::store::SideLimits {
            quarantine_bytes_max: in_range(
                "store.quarantine_bytes_max",
                raw.store.quarantine_bytes_max,
                SIDE_BYTES_MIN,
                SIDE_BYTES_MAX,
            )?,
            rejected_bytes_max: in_range(
                "store.rejected_bytes_max",
                raw.store.rejected_bytes_max,
                SIDE_BYTES_MIN,
                SIDE_BYTES_MAX,
            )?,
        };
        let timeout_ms = in_range("http.timeout_ms", raw.http.timeout_ms, 100, HTTP_TIMEOUT_MS_MAX)?;
        let listen = match raw.http.listen {
            None => None,
            Some(s) if s.is_empty() => None,
            Some(s) => Some(
                s.parse::<SocketAddr>()
                    .map_err(|e| invalid("http.listen", format!("'{s}' is not an address: {e}")))?,
            ),
        };
        let endpoint_trust = match (raw.http.ca_file, raw.http.pin_sha256) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "http.pin_sha256",
                    "set either http.ca_file or http.pin_sha256, not both",
                ))
            }
            (Some(ca), None) => EndpointTrust::Ca(read_pem("http.ca_file", &ca, false)?),
            (None, Some(pins)) => {
                if pins.is_empty() {
                    return Err(invalid("http.pin_sha256", "list at least one sha256"));
                }
                let mut out = Vec::with_capacity(pins.len());
                for p in &pins {
                    let mut d = [0u8; 32];
                    hex::decode_to_slice(p.trim().replace(':', ""), &mut d)
                        .map_err(|_| invalid("http.pin_sha256", format!("'{p}' is not 32 bytes of hex")))?;
                    out.push(d);
                }
                EndpointTrust::Pinned(out)
            }
            (None, None) => EndpointTrust::SystemRoots,
        };
        let uplink = match raw.uplink {
            None => None,
            Some(u) => {
                let iccid = parse_iccid(&u.iccid).ok_or_else(|| {
                    invalid("uplink.iccid", format!("'{}' is not 19 or 20 digits", u.iccid))
                })?;
                if u.interfaces.is_empty() || u.interfaces.len() > crate::uplink::INTERFACES_MAX {
                    return Err(invalid(
                        "uplink.interfaces",
                        format!("name 1 to {} interfaces", crate::uplink::INTERFACES_MAX),
                    ));
                }
                if let Some(bad) =
                    u.interfaces.iter().find(|i| i.is_empty() || i.contains('/') || i.starts_with('.'))
                {
                    return Err(invalid("uplink.interfaces", format!("'{bad}' is not an interface name")));
                }
                let read_s = in_range("uplink.read_interval_s", u.read_interval_s, 1, 3600)?;
                let report_s =
                    in_range("uplink.report_interval_s_max", u.report_interval_s_max, 60, 7 * 86_400)?;
                let delta = in_range("uplink.report_delta_bytes_min", u.report_delta_bytes_min, 1, 1 << 40)?;
                let state_file = u.state_file.unwrap_or_else(|| {
                    let mut name = raw.data_dir.file_name().map(|n| n.to_os_string()).unwrap_or_default();
                    name.push(".uplink-meter.json");
                    raw.data_dir.with_file_name(name)
                });
                Some(UplinkConfig {
                    meter_id: u.meter_id,
                    key_file: u.key_file,
                    iccid,
                    interfaces: u.interfaces,
                    read_interval: Duration::from_secs(read_s),
                    policy: countersign_meter::ReportPolicy {
                        delta_bytes_min: delta,
                        interval_s_min: u32::try_from(read_s).unwrap_or(u32::MAX),
                        interval_s_max: report_s,
                    },
                    sysfs_net: u.sysfs_net,
                    state_file,
                })
            }
        };
        Ok(Self {
            gateway_id: raw.gateway_id,
            gateway_key_file: raw.gateway_key_file,
            data_dir: raw.data_dir,
            endpoint_url: raw.endpoint_url.trim_end_matches('/').to_owned(),
            mqtt: MqttConfig {
                host: m.host,
                port: m.port,
                client_id,
                topic: m.topic,
                keep_alive: Duration::from_secs(keep_alive_s),
                credentials,
                tls,
            },
            batch: BatchConfig {
                records_max,
                bytes_max,
                linger: Duration::from_millis(linger_ms),
                retry_delay_min: Duration::from_millis(retry_min),
                retry_delay_max: Duration::from_millis(retry_max),
                batches_per_s_max,
            },
            commit: CommitConfig { reports_max, delay: Duration::from_millis(delay_ms) },
            cache_capacity_bytes: cache,
            quota_bytes,
            side_limits,
            disk_free_bytes_min,
            http_timeout: Duration::from_millis(timeout_ms),
            listen,
            uplink,
            endpoint_trust,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
gateway_id = 1
gateway_key_file = "/k"
data_dir = "/d"
endpoint_url = "http://127.0.0.1:8080/"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = AgentConfig::from_toml_str(MIN).unwrap();
        assert_eq!(c.mqtt.client_id, "countersign-agent-1");
        assert_eq!(c.mqtt.topic, "countersign/v1/reports/+");
        assert_eq!(c.endpoint_url, "http://127.0.0.1:8080");
        assert_eq!(c.cache_capacity_bytes, 2 * 1024 * 1024);
        assert_eq!(c.commit.reports_max, 1024);
        assert_eq!(c.disk_free_bytes_min, DISK_FREE_BYTES_MIN_DEFAULT);
        assert_eq!(c.listen, Some(LISTEN_DEFAULT.parse().unwrap()));
        let off = AgentConfig::from_toml_str(&format!("{MIN}[http]\nlisten = \"\"\n")).unwrap();
        assert_eq!(off.listen, None);
    }

    fn err(extra: &str) -> String {
        AgentConfig::from_toml_str(&format!("{MIN}{extra}")).unwrap_err().to_string()
    }

    #[test]
    fn uplink_section() {
        let c = AgentConfig::from_toml_str(&format!(
            "{MIN}[uplink]\nmeter_id = 9\nkey_file = \"/k2\"\niccid = \"89882280666000099990\"\ninterfaces = [\"wwan0\"]\n"
        ))
        .unwrap();
        let u = c.uplink.unwrap();
        assert_eq!(u.iccid, 8_988_228_066_600_009_999);
        assert_eq!(u.state_file, PathBuf::from("/d.uplink-meter.json"));
        assert!(err(
            "[uplink]\nmeter_id = 9\nkey_file = \"/k2\"\niccid = \"123\"\ninterfaces = [\"wwan0\"]\n"
        )
        .contains("uplink.iccid"));
        assert!(err("[uplink]\nmeter_id = 9\nkey_file = \"/k2\"\niccid = \"8988228066600009999\"\ninterfaces = [\"../x\"]\n")
            .contains("uplink.interfaces"));
    }

    #[test]
    fn plain_http_only_to_loopback_unless_allowed() {
        for ok in [
            "https://rating.example.com",
            "http://127.0.0.1:8080",
            "http://127.5.6.7/x",
            "http://[::1]:80/",
            "http://localhost:9",
            "http://LOCALHOST",
        ] {
            assert!(plain_http_allowed(ok, false), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:8080",
            "http://rating.example.com",
            "http://127.0.0.1.evil.example/",
            "http://localhost.evil.example",
            "http://127.0.0.1@evil.example/",
            "http://[::2]/",
            "http://",
        ] {
            assert!(!plain_http_allowed(bad, false), "{bad}");
            assert!(plain_http_allowed(bad, true), "{bad}");
        }
        let e = AgentConfig::from_toml_str(&MIN.replace("127.0.0.1", "192.0.2.1")).unwrap_err().to_string();
        assert!(e.contains("endpoint_url") && e.contains("allow_plain_http"), "{e}");
        let c = AgentConfig::from_toml_str(&format!(
            "allow_plain_http = true\n{}",
            MIN.replace("127.0.0.1", "192.0.2.1")
        ))
        .unwrap();
        assert_eq!(c.endpoint_url, "http://192.0.2.1:8080");
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err("[store]\nquarantine_bytes_max = 5\n").contains("store.quarantine_bytes_max"));
        assert!(err("[store]\nrejected_bytes_max = 5\n").contains("store.rejected_bytes_max"));
        assert!(err("[mqtt]\nport = 0\n").contains("mqtt.port"));
        assert!(err("[mqtt]\nportt = 1\n").contains("portt"));
        assert!(err("[batch]\nrecords_max = 0\n").contains("batch.records_max"));
        assert!(err("[store]\ncache_capacity_bytes = 5\n").contains("store.cache_capacity_bytes"));
        assert!(err("[http]\nlisten = \"nope\"\n").contains("http.listen"));
        assert!(err("[store]\nquota_bytes = 1\n").contains("store.quota_bytes"));
        assert!(err("[store]\ndisk_free_bytes_min = -1\n").contains("disk_free_bytes_min"));
        assert!(err(&format!("[store]\ndisk_free_bytes_min = {}\n", DISK_FREE_BYTES_MIN_MAX + 1))
            .contains("store.disk_free_bytes_min"));
        assert!(err("[batch]\nbatches_per_s_max = 0\n").contains("batch.batches_per_s_max"));
        assert!(err("[mqtt]\nusername = \"u\"\n").contains("mqtt.password"));
        assert!(err("[mqtt]\nclient_cert_file = \"/c\"\n").contains("mqtt.ca_file"));
        assert!(err("[http]\npin_sha256 = [\"zz\"]\n").contains("http.pin_sha256"));
        assert!(err("[http]\nca_file = \"/nonexistent.pem\"\n").contains("http.ca_file"));
        assert!(err("[mqtt]\nca_file = \"/nonexistent.pem\"\n").contains("mqtt.ca_file"));
        let missing = AgentConfig::from_toml_str("gateway_id = 1\n").unwrap_err().to_string();
        assert!(missing.contains("gateway_key_file"), "{missing}");
        let bad_type = AgentConfig::from_toml_str(&MIN.replace("gateway_id = 1", "gateway_id = \"x\""))
            .unwrap_err()
            .to_string();
        assert!(bad_type.contains("gateway_id"), "{bad_type}");
    }
}
