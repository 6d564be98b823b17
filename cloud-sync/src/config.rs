//! Endpoint configuration: TOML in, one validated [`CloudConfig`] out.
//!
//! ```toml
//! listen = "127.0.0.1:8080"          # optional, this is the default
//! data_dir = "/var/lib/countersign"  # required: the sled store lives in data_dir/sled
//! admin_token_file = "admin.token"   # required: 0600, hex of 32 random bytes
//!
//! [store]
//! backend = "sled"                   # optional: "sled" (default) or "postgres"
//! cache_capacity_bytes = 67108864    # optional, sled only, 64 MiB by default
//! # postgres only: a libpq-style connection string (no TLS: loopback or a private network)
//! postgres_url = "host=127.0.0.1 user=postgres dbname=countersign"
//! postgres_pool_connections = 8      # optional, connections per process, 1..=64
//!
//! [rate_limit]                       # optional: per-gateway token bucket on /v1/batches
//! records_per_second = 20000         # refill rate, records per second per gateway
//! burst_records = 100000             # bucket size: what a gateway may send at once
//!
//! [server]                           # optional: limits of the HTTP listener
//! connections_max = 512              # connections served at once; more wait in the backlog
//! header_timeout_s = 10              # a request head must arrive within this
//! body_timeout_s = 60                # a request body must arrive within this (whole body)
//!
//! [billing]                          # optional: plans, prepaid wallets, periodic billing runs
//! plans_file = "plans.toml"          # [[plan]], [[assign]], [[wallet]], time_zone (see README)
//! run_interval_s = 300               # optional: seconds between billing runs in `serve`
//! ```
//!
//! With `backend = "postgres"` the `data_dir` is still required (it is where local state
//! would go) but the store lives in PostgreSQL, shared by every endpoint process.
//!
//! Relative paths in a file read by [`CloudConfig::load`] are relative to the directory of
//! that file, so a config works the same whatever directory the endpoint is started from.
//! Every error names the key it is about.

use crate::store::StoreKind;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use countersign_protocol::keys::{read_secret, KeyError, SECRET_KEY_BYTES};
use serde::Deserialize;
use subtle::ConstantTimeEq;

/// Address the endpoint listens on when `listen` is not given.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:8080";
/// sled page cache size when `[store] cache_capacity_bytes` is not given.
pub const CACHE_CAPACITY_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;
/// Smallest accepted cache: below this sled thrashes on every scan.
pub const CACHE_CAPACITY_BYTES_MIN: u64 = 1024 * 1024;
/// Largest accepted cache: more than this is almost surely a unit mistake.
pub const CACHE_CAPACITY_BYTES_MAX: u64 = 16 * 1024 * 1024 * 1024;
/// Records per second a gateway may upload when `[rate_limit] records_per_second` is not
/// given: an agent catching up after an outage drains 72 million records a day at this rate.
pub const RATE_RECORDS_PER_SECOND_DEFAULT: u64 = 20_000;
/// Bucket size when `[rate_limit] burst_records` is not given: several full batches at once.
pub const RATE_BURST_RECORDS_DEFAULT: u64 = 100_000;
/// Largest accepted `records_per_second` or `burst_records`: beyond this the limit means
/// nothing on any hardware, and the bucket arithmetic stays far from overflow.
pub const RATE_RECORDS_MAX: u64 = 1_000_000_000;
/// Connections served at once when `[server] connections_max` is not given; more wait in
/// the listen backlog until one closes. Each takes a file descriptor: this default stays
/// well under the usual soft limit of 1024 open files, leaving room for the store's files
/// and database connections. Raise `ulimit -n` (systemd `LimitNOFILE`) before raising it.
pub const SERVER_CONNECTIONS_DEFAULT: u64 = 512;
/// Largest accepted `server.connections_max` (each connection holds a file descriptor and up
/// to one batch, 1 MiB, in memory).
pub const SERVER_CONNECTIONS_MAX: u64 = 65_536;
/// Seconds a request head (request line and headers) may take when `[server]
/// header_timeout_s` is not given; also how long an idle keep-alive connection stays open.
pub const SERVER_HEADER_TIMEOUT_S_DEFAULT: u64 = 10;
/// Seconds a whole request body may take when `[server] body_timeout_s` is not given: a full
/// 1 MiB batch over a 200 kbit/s uplink.
pub const SERVER_BODY_TIMEOUT_S_DEFAULT: u64 = 60;
/// Largest accepted `server.header_timeout_s` or `server.body_timeout_s`.
pub const SERVER_TIMEOUT_S_MAX: u64 = 3600;
/// Config files larger than this are refused before they are read.
pub const CONFIG_FILE_BYTES_MAX: u64 = 64 * 1024;

/// Why a configuration was refused. None is recoverable without changing the file or the
/// files it names, so the endpoint refuses to start rather than guess.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read (missing, no permission, too large).
    #[error("config file {path} could not be read")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The text is not TOML, or has a key this version does not know (the message names it).
    #[error("config is not valid: {0}")]
    Syntax(String),
    /// A required key is absent.
    #[error("{key}: required key is missing")]
    Missing {
        /// The key, dotted for keys inside a table (`store.cache_capacity_bytes`).
        key: &'static str,
    },
    /// A key has a value of the wrong type or out of range.
    #[error("{key}: {reason}")]
    Invalid {
        /// The key, dotted for keys inside a table.
        key: &'static str,
        /// What is wrong with the value.
        reason: String,
    },
    /// The admin token file is missing, readable by others, or not 32 bytes of hex. The
    /// key error's message is part of this one, so it is not repeated as a source.
    #[error("admin_token_file: {0}")]
    AdminToken(KeyError),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    // Values stay untyped here so that type errors are reported by key, in our words.
    listen: Option<toml::Value>,
    data_dir: Option<toml::Value>,
    admin_token_file: Option<toml::Value>,
    store: Option<RawStore>,
    rate_limit: Option<RawRateLimit>,
    server: Option<RawServer>,
    billing: Option<RawBilling>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    connections_max: Option<toml::Value>,
    header_timeout_s: Option<toml::Value>,
    body_timeout_s: Option<toml::Value>,
}

/// Limits of the HTTP listener (`[server]`): what one client can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Connections served at once (`connections_max`).
    pub connections_max: usize,
    /// Time a request head may take, and an idle keep-alive connection may stay
    /// (`header_timeout_s`).
    pub header_timeout: std::time::Duration,
    /// Time a whole request body may take once its head arrived (`body_timeout_s`).
    pub body_timeout: std::time::Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            connections_max: SERVER_CONNECTIONS_DEFAULT as usize,
            header_timeout: std::time::Duration::from_secs(SERVER_HEADER_TIMEOUT_S_DEFAULT),
            body_timeout: std::time::Duration::from_secs(SERVER_BODY_TIMEOUT_S_DEFAULT),
        }
    }
}

fn server_limits(raw: RawServer) -> Result<ServerLimits, ConfigError> {
    let mut limits = ServerLimits::default();
    if let Some(v) = &raw.connections_max {
        let key = "server.connections_max";
        let n = bounded_integer(key, v, 1, SERVER_CONNECTIONS_MAX)?;
        limits.connections_max =
            usize::try_from(n).map_err(|_| invalid(key, "does not fit this platform"))?;
    }
    if let Some(v) = &raw.header_timeout_s {
        let s = bounded_integer("server.header_timeout_s", v, 1, SERVER_TIMEOUT_S_MAX)?;
        limits.header_timeout = std::time::Duration::from_secs(s);
    }
    if let Some(v) = &raw.body_timeout_s {
        let s = bounded_integer("server.body_timeout_s", v, 1, SERVER_TIMEOUT_S_MAX)?;
        limits.body_timeout = std::time::Duration::from_secs(s);
    }
    Ok(limits)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBilling {
    plans_file: Option<toml::Value>,
    run_interval_s: Option<toml::Value>,
}

/// Seconds between billing runs inside `serve` when `[billing] run_interval_s` is not given.
pub const BILLING_RUN_INTERVAL_S_DEFAULT: u64 = 300;
/// Shortest accepted `billing.run_interval_s`: a run derives all usage, so not more often.
pub const BILLING_RUN_INTERVAL_S_MIN: u64 = 10;
/// Longest accepted `billing.run_interval_s`: a prepaid wallet must follow usage within a day.
pub const BILLING_RUN_INTERVAL_S_MAX: u64 = 86_400;

/// Plans, prepaid wallets and the periodic billing run (`[billing]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BillingSettings {
    /// The plan file (`plans_file`): `[[plan]]`, `[[assign]]`, `[[wallet]]`, `time_zone`.
    pub plans_file: PathBuf,
    /// Seconds between billing runs inside `serve` (`run_interval_s`).
    pub run_interval_s: u64,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    cache_capacity_bytes: Option<toml::Value>,
    backend: Option<toml::Value>,
    postgres_url: Option<toml::Value>,
    postgres_pool_connections: Option<toml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    records_per_second: Option<toml::Value>,
    burst_records: Option<toml::Value>,
}

/// The per-gateway token bucket on batch uploads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Refill rate, records per second per gateway.
    pub records_per_second: u64,
    /// Bucket size in records.
    pub burst_records: u64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            records_per_second: RATE_RECORDS_PER_SECOND_DEFAULT,
            burst_records: RATE_BURST_RECORDS_DEFAULT,
        }
    }
}

/// The validated configuration of one endpoint process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudConfig {
    listen: SocketAddr,
    data_dir: PathBuf,
    admin_token_file: PathBuf,
    cache_capacity_bytes: u64,
    store_kind: StoreKind,
    rate_limit: RateLimit,
    server: ServerLimits,
    billing: Option<BillingSettings>,
}

impl CloudConfig {
    /// A configuration with every optional key at its default.
    pub fn new(data_dir: impl Into<PathBuf>, admin_token_file: impl Into<PathBuf>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: data_dir.into(),
            admin_token_file: admin_token_file.into(),
            cache_capacity_bytes: CACHE_CAPACITY_BYTES_DEFAULT,
            store_kind: StoreKind::Sled,
            rate_limit: RateLimit::default(),
            server: ServerLimits::default(),
            billing: None,
        }
    }

    /// The limits of the HTTP listener.
    pub fn server_limits(&self) -> ServerLimits {
        self.server
    }

    /// The same configuration with other listener limits.
    pub fn with_server_limits(mut self, limits: ServerLimits) -> Self {
        self.server = limits;
        self
    }

    /// The same configuration with a plans file, billing at the default interval.
    pub fn with_plans_file(mut self, plans_file: impl Into<PathBuf>) -> Self {
        self.billing = Some(BillingSettings {
            plans_file: plans_file.into(),
            run_interval_s: BILLING_RUN_INTERVAL_S_DEFAULT,
        });
        self
    }

    /// Plans and wallets, if `[billing]` names a plans file.
    pub fn billing(&self) -> Option<&BillingSettings> {
        self.billing.as_ref()
    }

    /// The same configuration on another store.
    pub fn with_store_kind(mut self, kind: StoreKind) -> Self {
        self.store_kind = kind;
        self
    }

    /// The same configuration with another rate limit.
    pub fn with_rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = limit;
        self
    }

    /// The same configuration listening on `listen`.
    pub fn with_listen(mut self, listen: SocketAddr) -> Self {
        self.listen = listen;
        self
    }

    /// The same configuration with another sled cache size, checked against the bounds.
    pub fn with_cache_capacity_bytes(mut self, bytes: u64) -> Result<Self, ConfigError> {
        self.cache_capacity_bytes = check_cache_capacity(bytes)?;
        Ok(self)
    }

    /// Parses and validates TOML text. Relative paths stay relative to the working directory.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Syntax(describe_toml_error(text, &e)))?;
        let listen = match raw.listen {
            None => {
                LISTEN_DEFAULT.parse().map_err(|_| invalid("listen", "default address does not parse"))?
            }
            Some(v) => {
                let s = string_value("listen", v)?;
                s.parse::<SocketAddr>().map_err(|_| {
                    invalid(
                        "listen",
                        format!("invalid socket address '{s}' (expected ip:port, e.g. {LISTEN_DEFAULT})"),
                    )
                })?
            }
        };
        let data_dir = path_value("data_dir", raw.data_dir)?;
        let admin_token_file = path_value("admin_token_file", raw.admin_token_file)?;
        let store = raw.store.unwrap_or_default();
        let store_kind = store_kind(&store)?;
        let rate_limit = rate_limit(raw.rate_limit.unwrap_or_default())?;
        let server = server_limits(raw.server.unwrap_or_default())?;
        let billing = match raw.billing {
            None => None,
            Some(b) => Some(BillingSettings {
                plans_file: path_value("billing.plans_file", b.plans_file)?,
                run_interval_s: match &b.run_interval_s {
                    None => BILLING_RUN_INTERVAL_S_DEFAULT,
                    Some(v) => bounded_integer(
                        "billing.run_interval_s",
                        v,
                        BILLING_RUN_INTERVAL_S_MIN,
                        BILLING_RUN_INTERVAL_S_MAX,
                    )?,
                },
            }),
        };
        let cache_capacity_bytes = match store.cache_capacity_bytes {
            None => CACHE_CAPACITY_BYTES_DEFAULT,
            Some(toml::Value::Integer(n)) => {
                let n = u64::try_from(n).map_err(|_| {
                    invalid("store.cache_capacity_bytes", format!("must not be negative, got {n}"))
                })?;
                check_cache_capacity(n)?
            }
            Some(other) => {
                return Err(invalid(
                    "store.cache_capacity_bytes",
                    format!("expected an integer number of bytes, found {}", other.type_str()),
                ))
            }
        };
        Ok(Self {
            listen,
            data_dir,
            admin_token_file,
            cache_capacity_bytes,
            store_kind,
            rate_limit,
            server,
            billing,
        })
    }

    /// Reads and validates a config file; relative paths in it are taken relative to its
    /// directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let read_err = |source| ConfigError::Read { path: path.to_owned(), source };
        let len = std::fs::metadata(path).map_err(read_err)?.len();
        if len > CONFIG_FILE_BYTES_MAX {
            return Err(read_err(std::io::Error::other(format!(
                "{len} bytes, more than the {CONFIG_FILE_BYTES_MAX} a config file may have"
            ))));
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        let mut config = Self::from_toml_str(&text)?;
        let base = path.parent().unwrap_or_else(|| Path::new(""));
        config.data_dir = base.join(&config.data_dir);
        config.admin_token_file = base.join(&config.admin_token_file);
        if let Some(b) = config.billing.as_mut() {
            b.plans_file = base.join(&b.plans_file);
        }
        Ok(config)
    }

    /// Where the endpoint listens.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// The directory that holds the store.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The file holding the admin token.
    pub fn admin_token_file(&self) -> &Path {
        &self.admin_token_file
    }

    /// sled's page cache size.
    pub fn cache_capacity_bytes(&self) -> u64 {
        self.cache_capacity_bytes
    }

    /// The store the endpoint runs on.
    pub fn store_kind(&self) -> &StoreKind {
        &self.store_kind
    }

    /// The per-gateway rate limit on batch uploads.
    pub fn rate_limit(&self) -> RateLimit {
        self.rate_limit
    }

    /// Reads the admin token, refusing a file that group or others can read.
    pub fn read_admin_token(&self) -> Result<AdminToken, ConfigError> {
        read_secret(&self.admin_token_file).map(AdminToken).map_err(ConfigError::AdminToken)
    }
}

fn store_kind(raw: &RawStore) -> Result<StoreKind, ConfigError> {
    let backend = match &raw.backend {
        None => "sled".to_owned(),
        Some(v) => string_value("store.backend", v.clone())?,
    };
    match backend.as_str() {
        "sled" => {
            for (key, v) in [
                ("store.postgres_url", &raw.postgres_url),
                ("store.postgres_pool_connections", &raw.postgres_pool_connections),
            ] {
                if v.is_some() {
                    return Err(invalid(key, "only applies with store.backend = \"postgres\""));
                }
            }
            Ok(StoreKind::Sled)
        }
        "postgres" => {
            let url = string_value(
                "store.postgres_url",
                raw.postgres_url.clone().ok_or(ConfigError::Missing { key: "store.postgres_url" })?,
            )?;
            if let Err(e) = crate::store::postgres::check_url(&url) {
                return Err(invalid("store.postgres_url", e));
            }
            let pool_connections = match &raw.postgres_pool_connections {
                None => crate::store::postgres::PG_POOL_CONNECTIONS_DEFAULT,
                Some(v) => {
                    let key = "store.postgres_pool_connections";
                    let n =
                        bounded_integer(key, v, 1, crate::store::postgres::PG_POOL_CONNECTIONS_MAX as u64)?;
                    usize::try_from(n).map_err(|_| invalid(key, "does not fit this platform"))?
                }
            };
            Ok(StoreKind::Postgres { url, pool_connections })
        }
        other => Err(invalid("store.backend", format!("expected \"sled\" or \"postgres\", got '{other}'"))),
    }
}

fn rate_limit(raw: RawRateLimit) -> Result<RateLimit, ConfigError> {
    let mut limit = RateLimit::default();
    if let Some(v) = &raw.records_per_second {
        limit.records_per_second = bounded_integer("rate_limit.records_per_second", v, 1, RATE_RECORDS_MAX)?;
    }
    if let Some(v) = &raw.burst_records {
        limit.burst_records = bounded_integer("rate_limit.burst_records", v, 1, RATE_RECORDS_MAX)?;
    }
    Ok(limit)
}

fn bounded_integer(key: &'static str, v: &toml::Value, min: u64, max: u64) -> Result<u64, ConfigError> {
    match v {
        toml::Value::Integer(n) => match u64::try_from(*n) {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(invalid(key, format!("{n} is outside {min}..={max}"))),
        },
        other => Err(invalid(key, format!("expected an integer, found {}", other.type_str()))),
    }
}

fn check_cache_capacity(bytes: u64) -> Result<u64, ConfigError> {
    if !(CACHE_CAPACITY_BYTES_MIN..=CACHE_CAPACITY_BYTES_MAX).contains(&bytes) {
        return Err(invalid(
            "store.cache_capacity_bytes",
            format!("{bytes} is outside {CACHE_CAPACITY_BYTES_MIN}..={CACHE_CAPACITY_BYTES_MAX}"),
        ));
    }
    Ok(bytes)
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, reason: reason.into() }
}

fn string_value(key: &'static str, v: toml::Value) -> Result<String, ConfigError> {
    match v {
        toml::Value::String(s) => Ok(s),
        other => Err(invalid(key, format!("expected a string, found {}", other.type_str()))),
    }
}

fn path_value(key: &'static str, v: Option<toml::Value>) -> Result<PathBuf, ConfigError> {
    let s = string_value(key, v.ok_or(ConfigError::Missing { key })?)?;
    if s.trim().is_empty() {
        return Err(invalid(key, "must not be empty"));
    }
    Ok(PathBuf::from(s))
}

/// toml's own rendering spans several lines; a one-line "line L, column C: message" reads
/// better in logs and still points at the offending key.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count().saturating_add(1);
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()).saturating_add(1);
            format!("line {line}, column {column}: {}", e.message())
        }
        None => e.message().to_owned(),
    }
}

/// The bearer token of the usage and admin API. Debug output never shows it.
#[derive(Clone)]
pub struct AdminToken([u8; SECRET_KEY_BYTES]);

impl AdminToken {
    /// A token from its raw bytes.
    pub fn from_bytes(bytes: [u8; SECRET_KEY_BYTES]) -> Self {
        Self(bytes)
    }

    /// The token as clients send it: lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Whether `presented` (hex, as sent by a client) is this token, compared in constant
    /// time so that response timing does not reveal how much of a guess was right.
    pub fn verify_hex(&self, presented: &str) -> bool {
        let mut bytes = [0u8; SECRET_KEY_BYTES];
        if hex::decode_to_slice(presented.trim(), &mut bytes).is_err() {
            return false;
        }
        bool::from(self.0.ct_eq(&bytes))
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "data_dir = \"/tmp/cs\"\nadmin_token_file = \"/tmp/cs/token\"\n";

    fn err(text: &str) -> String {
        CloudConfig::from_toml_str(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_apply() {
        let c = CloudConfig::from_toml_str(MINIMAL).unwrap();
        assert_eq!(c.listen().to_string(), LISTEN_DEFAULT);
        assert_eq!(c.data_dir(), Path::new("/tmp/cs"));
        assert_eq!(c.cache_capacity_bytes(), CACHE_CAPACITY_BYTES_DEFAULT);
        assert_eq!(c, CloudConfig::new("/tmp/cs", "/tmp/cs/token"));
    }

    #[test]
    fn full_config_parses() {
        let c = CloudConfig::from_toml_str(&format!(
            "listen = \"0.0.0.0:9000\"\n{MINIMAL}[store]\ncache_capacity_bytes = 2097152\n"
        ))
        .unwrap();
        assert_eq!(c.listen().port(), 9000);
        assert_eq!(c.cache_capacity_bytes(), 2 * 1024 * 1024);
    }

    #[test]
    fn errors_name_the_key() {
        assert_eq!(
            err(&format!("listen = \"x\"\n{MINIMAL}")),
            "listen: invalid socket address 'x' (expected ip:port, e.g. 127.0.0.1:8080)"
        );
        assert_eq!(err(&format!("listen = 5\n{MINIMAL}")), "listen: expected a string, found integer");
        assert_eq!(err("admin_token_file = \"t\""), "data_dir: required key is missing");
        assert_eq!(err("data_dir = \"d\""), "admin_token_file: required key is missing");
        assert_eq!(err("data_dir = \"\"\nadmin_token_file = \"t\""), "data_dir: must not be empty");
        let e = err(&format!("{MINIMAL}[store]\ncache_capacity_bytes = 10\n"));
        assert!(e.starts_with("store.cache_capacity_bytes: 10 is outside"), "{e}");
        let e = err(&format!("{MINIMAL}[store]\ncache_capacity_bytes = -1\n"));
        assert_eq!(e, "store.cache_capacity_bytes: must not be negative, got -1");
        let e = err(&format!("{MINIMAL}[store]\ncache_capacity_bytes = \"64M\"\n"));
        assert_eq!(e, "store.cache_capacity_bytes: expected an integer number of bytes, found string");
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let e = err(&format!("lisen = \"127.0.0.1:1\"\n{MINIMAL}"));
        assert!(e.contains("unknown field `lisen`") && e.contains("line 1"), "{e}");
        let e = err(&format!("{MINIMAL}[store]\ncache_capacity = 1\n"));
        assert!(e.contains("unknown field `cache_capacity`") && e.contains("line 4"), "{e}");
        assert!(err("data_dir = ").starts_with("config is not valid: line 1"));
    }

    #[test]
    fn store_backend_and_rate_limit_parse_and_name_their_keys() {
        let c = CloudConfig::from_toml_str(&format!(
            "{MINIMAL}[store]\nbackend = \"postgres\"\npostgres_url = \"host=127.0.0.1 user=postgres dbname=cs\"\npostgres_pool_connections = 3\n[rate_limit]\nrecords_per_second = 5\nburst_records = 7\n"
        ))
        .unwrap();
        assert_eq!(
            c.store_kind(),
            &StoreKind::Postgres {
                url: "host=127.0.0.1 user=postgres dbname=cs".into(),
                pool_connections: 3
            }
        );
        assert!(!format!("{:?}", c.store_kind()).contains("host="));
        assert_eq!(c.rate_limit(), RateLimit { records_per_second: 5, burst_records: 7 });
        assert_eq!(CloudConfig::from_toml_str(MINIMAL).unwrap().store_kind(), &StoreKind::Sled);
        assert_eq!(
            err(&format!("{MINIMAL}[store]\nbackend = \"mysql\"\n")),
            "store.backend: expected \"sled\" or \"postgres\", got 'mysql'"
        );
        assert_eq!(
            err(&format!("{MINIMAL}[store]\nbackend = \"postgres\"\n")),
            "store.postgres_url: required key is missing"
        );
        assert_eq!(
            err(&format!("{MINIMAL}[store]\npostgres_url = \"host=x\"\n")),
            "store.postgres_url: only applies with store.backend = \"postgres\""
        );
        let e = err(&format!(
            "{MINIMAL}[store]\nbackend = \"postgres\"\npostgres_url = \"host=x\"\npostgres_pool_connections = 0\n"
        ));
        assert_eq!(e, "store.postgres_pool_connections: 0 is outside 1..=64");
        let e = err(&format!("{MINIMAL}[store]\nbackend = \"postgres\"\npostgres_url = \"port=notaport\"\n"));
        assert!(e.starts_with("store.postgres_url: not a PostgreSQL connection string"), "{e}");
        let e = err(&format!("{MINIMAL}[rate_limit]\nrecords_per_second = 0\n"));
        assert_eq!(e, "rate_limit.records_per_second: 0 is outside 1..=1000000000");
        let e = err(&format!("{MINIMAL}[rate_limit]\nburst = 1\n"));
        assert!(e.contains("unknown field `burst`"), "{e}");
    }

    #[test]
    fn server_limits_parse_and_name_their_keys() {
        let c = CloudConfig::from_toml_str(&format!(
            "{MINIMAL}[server]\nconnections_max = 16\nheader_timeout_s = 2\nbody_timeout_s = 30\n"
        ))
        .unwrap();
        assert_eq!(
            c.server_limits(),
            ServerLimits {
                connections_max: 16,
                header_timeout: std::time::Duration::from_secs(2),
                body_timeout: std::time::Duration::from_secs(30),
            }
        );
        assert_eq!(CloudConfig::from_toml_str(MINIMAL).unwrap().server_limits(), ServerLimits::default());
        assert_eq!(
            err(&format!("{MINIMAL}[server]\nconnections_max = 0\n")),
            "server.connections_max: 0 is outside 1..=65536"
        );
        assert_eq!(
            err(&format!("{MINIMAL}[server]\nheader_timeout_s = 0\n")),
            "server.header_timeout_s: 0 is outside 1..=3600"
        );
        assert_eq!(
            err(&format!("{MINIMAL}[server]\nbody_timeout_s = \"1m\"\n")),
            "server.body_timeout_s: expected an integer, found string"
        );
        assert!(err(&format!("{MINIMAL}[server]\ntimeout = 1\n")).contains("unknown field `timeout`"));
    }

    #[test]
    fn billing_section_parses_and_names_its_keys() {
        let c = CloudConfig::from_toml_str(&format!("{MINIMAL}[billing]\nplans_file = \"plans.toml\"\n"))
            .unwrap();
        let b = c.billing().unwrap();
        assert_eq!(
            (b.plans_file.as_path(), b.run_interval_s),
            (Path::new("plans.toml"), BILLING_RUN_INTERVAL_S_DEFAULT)
        );
        assert!(CloudConfig::from_toml_str(MINIMAL).unwrap().billing().is_none());
        assert_eq!(
            err(&format!("{MINIMAL}[billing]\nrun_interval_s = 60\n")),
            "billing.plans_file: required key is missing"
        );
        assert_eq!(
            err(&format!("{MINIMAL}[billing]\nplans_file = \"p\"\nrun_interval_s = 1\n")),
            "billing.run_interval_s: 1 is outside 10..=86400"
        );
        assert!(err(&format!("{MINIMAL}[billing]\nplans = \"p\"\n")).contains("unknown field `plans`"));
    }

    #[test]
    fn bounds_are_checked_in_the_builder_too() {
        let c = CloudConfig::new("d", "t");
        assert!(c.clone().with_cache_capacity_bytes(CACHE_CAPACITY_BYTES_MAX + 1).is_err());
        assert_eq!(
            c.with_cache_capacity_bytes(CACHE_CAPACITY_BYTES_MIN).unwrap().cache_capacity_bytes(),
            1 << 20
        );
    }

    #[test]
    fn load_resolves_relative_paths_and_reads_the_token() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.toml");
        std::fs::write(&path, "data_dir = \"data\"\nadmin_token_file = \"admin.token\"\n").unwrap();
        let c = CloudConfig::load(&path).unwrap();
        assert_eq!(c.data_dir(), dir.path().join("data"));
        let e = c.read_admin_token().unwrap_err().to_string();
        assert!(e.starts_with("admin_token_file: key file"), "{e}");
        countersign_protocol::keys::write_secret(c.admin_token_file(), &[9u8; 32]).unwrap();
        let token = c.read_admin_token().unwrap();
        assert!(token.verify_hex(&hex::encode([9u8; 32])));
        assert!(!token.verify_hex(&hex::encode([8u8; 32])));
        assert!(!token.verify_hex("not hex"));
        assert_eq!(format!("{token:?}"), "AdminToken(..)");
        std::fs::set_permissions(c.admin_token_file(), std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = c.read_admin_token().unwrap_err().to_string();
        assert!(e.contains("readable by others"), "{e}");
        let missing = CloudConfig::load(&dir.path().join("nope.toml")).unwrap_err().to_string();
        assert!(missing.starts_with("config file ") && missing.ends_with("could not be read"), "{missing}");
    }
}
