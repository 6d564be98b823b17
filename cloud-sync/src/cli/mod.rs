//! The command line by area: each module holds its clap subcommands and their handler;
//! `main.rs` keeps the top-level parser and the dispatch.
//!
//! - [`serve`]: `serve`, `check-config`, `rollups-rebuild`, `rollups-check`.
//! - [`admin`]: `keygen-meter`, `keygen-token`, `register-meter`, `register-gateway`,
//!   `create-token`, `revoke-token`, `list-tokens`.
//! - [`usage`]: the `usage` command.
//! - [`rating`]: `settle`, `faults`, `ledger`, `reconcile`.
//! - [`billing`]: `check-plans`, `charges`, `billing-run`, `wallets`, `topup`, `forecast`.
//! - [`lago`]: `lago status`.
//!
//! Import direction: the CLI → `countersign_cloud::client` and `countersign_cloud::wire` for
//! everything said to an endpoint, → `countersign_cloud::service` for the plan files it
//! checks locally, → `countersign_cloud::Endpoint` to serve; the library never imports the
//! CLI (lib.rs does not declare it). Errors are anyhow with context: this is the binary.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use countersign_cloud::text::{iccid_from_text, parse_date};
use countersign_protocol::keys::read_secret;

pub(crate) mod admin;
pub(crate) mod billing;
pub(crate) mod lago;
pub(crate) mod rating;
pub(crate) mod serve;
pub(crate) mod usage;

/// How long a command-line request may take before it is given up.
const REQUEST_TIMEOUT_S: u64 = 30;

fn iccid_arg(s: &str) -> Result<u64, String> {
    iccid_from_text(s).map_err(|e| e.to_string())
}

fn date_arg(s: &str) -> Result<time::Date, String> {
    parse_date(s).ok_or_else(|| format!("expected a date as YYYY-MM-DD, got '{s}'"))
}

fn print<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v).context("encoding the answer")?);
    Ok(())
}

fn read_token(path: &Path) -> Result<String> {
    Ok(hex::encode(read_secret(path).context("reading the admin token")?))
}

fn http() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(REQUEST_TIMEOUT_S))
        .build()
        .context("building the HTTP client")
}
