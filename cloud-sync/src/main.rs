//! `countersign-cloud`: run the rating endpoint, check its config, make keys, register
//! meters and gateways, query usage, settle days, reconcile with the carrier, export to Lago.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use cli::admin::AdminCommand;
use cli::billing::BillingCommand;
use cli::lago::LagoCommand;
use cli::rating::RatingCommand;
use cli::serve::ServeCommand;
use cli::usage::UsageCommand;

mod cli;

#[derive(Parser)]
#[command(name = "countersign-cloud", version, about = "Countersign rating endpoint and its admin tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Every command, by area; each area's commands and handler are in its `cli` module.
#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Serve(ServeCommand),
    #[command(flatten)]
    Admin(AdminCommand),
    #[command(flatten)]
    Usage(UsageCommand),
    #[command(flatten)]
    Rating(RatingCommand),
    #[command(flatten)]
    Billing(BillingCommand),
    /// The Lago export: `lago status`.
    #[command(subcommand)]
    Lago(LagoCommand),
}

#[tokio::main]
async fn main() -> ExitCode {
    // reqwest and rustls must agree on one crypto provider; ring is the project's choice.
    // An Err only means one is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(Cli::parse().command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line. Some errors repeat their source's message in their
/// own; a cause already said is not said again.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if out.contains(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve(c) => cli::serve::run(c).await,
        Command::Admin(c) => cli::admin::run(c).await,
        Command::Usage(c) => cli::usage::run(c).await,
        Command::Rating(c) => cli::rating::run(c).await,
        Command::Billing(c) => cli::billing::run(c).await,
        Command::Lago(c) => cli::lago::run(c).await,
    }
}
