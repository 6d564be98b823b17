//! `lago status`: where a running endpoint's Lago export stands (from its `/health`) and
//! how many events its store holds for Lago (from the store itself).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use countersign_cloud::client;
use countersign_cloud::store::lago::LagoOutbox;
use countersign_cloud::wire::ops::LagoHealth;
use countersign_cloud::CloudConfig;
use serde::Serialize;

use super::{http, print};

/// Commands about the Lago export.
#[derive(Subcommand)]
pub(crate) enum LagoCommand {
    /// Print the Lago export's state as JSON; exits 1 when it needs an operator (stopped by
    /// a refusal, billable metric mismatch, metric not checkable) or runs no export.
    #[command(group = clap::ArgGroup::new("source").required(true).multiple(true))]
    Status {
        /// The running endpoint's base URL: its `/health` says the state, the problem and a
        /// hint (no token needed).
        #[arg(long, group = "source")]
        endpoint: Option<String>,
        /// The endpoint's TOML config: count the outbox in its store (PostgreSQL any time;
        /// the embedded store only while the endpoint is stopped, it holds the store's lock).
        #[arg(long, group = "source")]
        config: Option<PathBuf>,
    },
}

/// What `lago status` prints.
#[derive(Serialize)]
struct LagoStatusOut {
    /// The endpoint's `/health` `lago` part.
    #[serde(skip_serializing_if = "Option::is_none")]
    export: Option<LagoHealth>,
    /// Events in the store's outbox, counted now.
    #[serde(skip_serializing_if = "Option::is_none")]
    store_backlog: Option<u64>,
}

/// Runs one command of this area.
pub(crate) async fn run(command: LagoCommand) -> Result<()> {
    match command {
        LagoCommand::Status { endpoint, config } => {
            let store_backlog = match &config {
                None => None,
                Some(path) => {
                    let c = CloudConfig::load(path).with_context(|| format!("config {}", path.display()))?;
                    let store = countersign_cloud::store::StoreBackend::open(
                        c.store_kind(),
                        c.data_dir(),
                        c.cache_capacity_bytes(),
                    )
                    .await
                    .with_context(|| {
                        format!("opening the store of config {} (a running endpoint holds the embedded store: use --endpoint)", path.display())
                    })?;
                    let outbox = LagoOutbox::open(&store).context("opening the lago outbox")?;
                    Some(outbox.pending().await.context("counting the lago outbox")?)
                }
            };
            let export = match &endpoint {
                None => None,
                Some(url) => {
                    let health =
                        client::health(&http()?, url).await.context("asking the endpoint's health")?;
                    let lago =
                        health.lago.with_context(|| format!("the endpoint at {url} runs no lago export"))?;
                    Some(lago)
                }
            };
            print(&LagoStatusOut { export: export.clone(), store_backlog })?;
            if let Some(e) = export.filter(|e| e.state.degraded()) {
                anyhow::bail!(
                    "lago export {} ({}): {}; {}",
                    e.state.as_str(),
                    e.code.unwrap_or_default(),
                    e.problem.unwrap_or_default(),
                    e.hint.unwrap_or_default()
                );
            }
            Ok(())
        }
    }
}
