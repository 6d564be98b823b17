//! `usage`: one SIM day by day, or every SIM's total, as JSON.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use countersign_cloud::client;
use countersign_cloud::usage::DateRange;

use super::{date_arg, http, iccid_arg, read_token};

/// Commands that read usage.
#[derive(Subcommand)]
pub(crate) enum UsageCommand {
    /// Print usage as JSON: one SIM by day with --iccid, else every SIM's total.
    Usage {
        /// Endpoint base URL.
        #[arg(long)]
        endpoint: String,
        /// A token file: the admin token or a query API token.
        #[arg(long)]
        token_file: PathBuf,
        /// The SIM, as decimal digits.
        #[arg(long, value_parser = iccid_arg)]
        iccid: Option<u64>,
        /// First day included, YYYY-MM-DD (UTC).
        #[arg(long, value_parser = date_arg)]
        from: Option<time::Date>,
        /// Last day included, YYYY-MM-DD (UTC).
        #[arg(long, value_parser = date_arg)]
        to: Option<time::Date>,
    },
}

/// Runs one command of this area.
pub(crate) async fn run(command: UsageCommand) -> Result<()> {
    match command {
        UsageCommand::Usage { endpoint, token_file, iccid, from, to } => {
            let token = read_token(&token_file)?;
            let range = DateRange { from, to };
            let http = http()?;
            let json = match iccid {
                Some(iccid) => serde_json::to_string_pretty(
                    &client::usage(&http, &endpoint, &token, iccid, range).await.context("usage query")?,
                ),
                None => serde_json::to_string_pretty(
                    &client::usage_sims(&http, &endpoint, &token, range).await.context("usage query")?,
                ),
            }
            .context("encoding the answer")?;
            println!("{json}");
            Ok(())
        }
    }
}
