//! The rating core of the Countersign endpoint: everything the endpoint decides, as plain
//! functions and values, with no IO.
//!
//! - [`text`]: the text forms of dates and ICCIDs, parsed and printed here only.
//! - [`usage`]: which bytes, which SIM, which day; SIMs whose data cannot be derived;
//!   settlement decisions (which days close, what is booked).
//! - [`pricing`]: integer money, units, plans and charges, wallets, quota forecasts.
//! - [`billing`]: plans applied to derived usage; wallet debits, top-ups and alerts decided.
//! - [`check`]: what ingest checks in each report so that no later stage can fail on it.
//! - [`batch`]: a signed batch opened, its tags checked, its records validated, and the
//!   store's outcomes turned into the per-record reply.
//! - [`carrier`]: carrier usage files (1NCE JSON, CSV, session records), exact MB parsing;
//!   [`carrier_twilio`]: Twilio Super SIM UsageRecords (bytes per SIM and UTC day).
//! - [`lago`]: which Lago event a record becomes; what Lago's answers mean.
//! - [`rollup`]: usage per SIM and quarter-hour bucket kept up to date record by record;
//!   what inserting a record (in order or late) changes.
//! - [`reconcile`]: device against carrier usage per SIM-day under a provider model.
//! - [`once_fetch`]: fetching daily usage from the 1NCE Management API as a state machine
//!   (token, paging, retries, back-off); the caller does the HTTP.
//!
//! What this crate does not know, by design: storage (sled, SQL), HTTP, the network, threads
//! or the clock. Callers pass in records, times and configuration and get decisions back;
//! its dependency tree holds no tokio, sled, axum, PostgreSQL driver or reqwest (checked by
//! `tests/run.sh` with `cargo tree`). It logs through `tracing` and never installs a
//! subscriber.

// Tests may unwrap: a panic is how they fail.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod batch;
pub mod billing;
pub mod carrier;
pub mod carrier_twilio;
pub mod check;
pub mod lago;
pub mod once_fetch;
pub mod pricing;
pub mod reconcile;
pub mod rollup;
pub mod text;
pub mod usage;
