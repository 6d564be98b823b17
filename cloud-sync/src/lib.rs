//! Countersign rating endpoint: verifies signed batches of device reports, deduplicates
//! them by record id, stores them durably (embedded sled, or PostgreSQL shared by several
//! processes), and derives per-SIM, per-day usage from them.
//!
//! - [`config`]: the TOML configuration, validated once.
//! - [`usage`], [`pricing`], [`carrier`], [`reconcile`], [`text`]: the pure rating core,
//!   crate `countersign-rating` (re-exported here).
//! - [`store`]: the store boundary: the contract, [`StoreBackend`], and the two backends
//!   (embedded sled; PostgreSQL shared by several endpoint processes), one file per feature.
//! - [`auth`]: operator API tokens and their roles.
//! - [`ratelimit`]: the per-gateway token bucket on batch uploads.
//! - [`negcache`]: bounded negative caches of unknown gateway ids and tokens.
//! - [`once_api`]: the HTTP side of `reconcile --fetch` (1NCE Management API usage).
//! - [`metrics`]: refusal counters for `/metrics`, the per-cause log limiter.
//! - [`listen`]: the accept loop: connection limit, header and body deadlines.
//! - [`api`]: the HTTP routes by area, their token checks and error answers, and [`Endpoint`].
//! - [`wire`]: the JSON shapes and paths of the API, shared by the routes, the client and the
//!   command line.
//! - [`billing`]: the rating core's billing decisions, and [`billing::BillingError`], which
//!   adds the store's failures to the decisions' refusals.
//! - [`service`]: the IO sequences: [`service::ingest`] (one batch in, one reply out, durable
//!   before it returns), [`service::billing::Billing`] (runs, charges, wallets, top-ups,
//!   forecasts) and [`service::lago`] (the exporter, exactly once per record).
//! - [`client`]: an async client for the admin and usage API.
//!
//! The library logs through `tracing` and never installs a subscriber.

// Tests may unwrap: a panic is how they fail.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod api;
pub mod auth;
pub mod billing;
pub mod client;
pub mod config;
pub mod listen;
pub mod metrics;
pub mod negcache;
pub mod once_api;
pub mod ratelimit;
pub mod service;
pub mod store;
pub mod wire;

// The rating core, where it has always been reachable: `countersign_cloud::usage` and the
// like keep their paths for the binary, the tests and the fuzz targets.
pub use countersign_rating::{carrier, carrier_twilio, once_fetch, pricing, reconcile, text, usage};

pub use api::Endpoint;
pub use config::{AdminToken, CloudConfig, ConfigError};
pub use store::{PgStore, Store, StoreBackend, StoreError};

/// Why the endpoint could not start. Neither is recoverable without operator action except
/// a store locked by another process, which frees when that process exits.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// The configuration or a file it names is invalid; the message names the key.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The plans file is missing or invalid; the message names the file and the key.
    #[error(transparent)]
    Billing(#[from] billing::BillingError),
}
