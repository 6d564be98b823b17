//! `countersign-cloud`: run the rating endpoint, check its config, make keys, register
//! meters and gateways, query usage.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use countersign_cloud::auth::Role;
use countersign_cloud::server::{parse_date, parse_iccid};
use countersign_cloud::usage::DateRange;
use countersign_cloud::{client, CloudConfig, Endpoint};
use countersign_protocol::keys::{parse_public_key, read_secret, write_secret, SECRET_KEY_BYTES};
use rand_core::{OsRng, RngCore};
use tracing_subscriber::EnvFilter;

/// How long a command-line request may take before it is given up.
const REQUEST_TIMEOUT_S: u64 = 30;

#[derive(Parser)]
#[command(name = "countersign-cloud", version, about = "Countersign rating endpoint and its admin tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the endpoint until SIGINT or SIGTERM.
    Serve {
        /// The TOML config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a config file and the admin token file it names.
    CheckConfig {
        /// The TOML config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Write a new random meter HMAC key (mode 0600; refuses to overwrite).
    KeygenMeter {
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a new random admin token (mode 0600; refuses to overwrite).
    KeygenToken {
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
    /// Register a meter's HMAC key with an endpoint.
    RegisterMeter {
        /// Endpoint base URL, e.g. https://rating.example:8443.
        #[arg(long)]
        endpoint: String,
        /// The admin token file.
        #[arg(long)]
        token_file: PathBuf,
        /// The meter's id.
        #[arg(long)]
        meter_id: u64,
        /// The meter's key file (from keygen-meter).
        #[arg(long)]
        key_file: PathBuf,
    },
    /// Register a gateway's Ed25519 public key with an endpoint.
    RegisterGateway {
        /// Endpoint base URL.
        #[arg(long)]
        endpoint: String,
        /// The admin token file.
        #[arg(long)]
        token_file: PathBuf,
        /// The gateway's id.
        #[arg(long)]
        gateway_id: u64,
        /// The gateway's public key, 64 hex digits.
        #[arg(long)]
        public_key: String,
    },
    /// Make an API token: writes 32 random bytes (hex, mode 0600) to --out and registers
    /// only their SHA-256 with the endpoint, under a unique name and a role.
    CreateToken {
        /// Endpoint base URL.
        #[arg(long)]
        endpoint: String,
        /// An admin token file (the bootstrap admin_token_file or an admin API token).
        #[arg(long)]
        token_file: PathBuf,
        /// The new token's name (A-Z a-z 0-9 . _ -, at most 64).
        #[arg(long)]
        name: String,
        /// `query` (read usage) or `admin` (also register and manage tokens).
        #[arg(long, value_parser = role_arg)]
        role: Role,
        /// Where to write the new token (refuses to overwrite).
        #[arg(long)]
        out: PathBuf,
    },
    /// Revoke an API token by name.
    RevokeToken {
        /// Endpoint base URL.
        #[arg(long)]
        endpoint: String,
        /// An admin token file.
        #[arg(long)]
        token_file: PathBuf,
        /// The token's name.
        #[arg(long)]
        name: String,
    },
    /// List API tokens (names and roles) as JSON.
    ListTokens {
        /// Endpoint base URL.
        #[arg(long)]
        endpoint: String,
        /// An admin token file.
        #[arg(long)]
        token_file: PathBuf,
    },
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

fn role_arg(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("expected 'query' or 'admin', got '{s}'"))
}

fn iccid_arg(s: &str) -> Result<u64, String> {
    parse_iccid(s).ok_or_else(|| format!("expected the ICCID as decimal digits, got '{s}'"))
}

fn date_arg(s: &str) -> Result<time::Date, String> {
    parse_date(s).ok_or_else(|| format!("expected a date as YYYY-MM-DD, got '{s}'"))
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
        Command::Serve { config } => serve(&config).await,
        Command::CheckConfig { config } => {
            let c = CloudConfig::load(&config).with_context(|| format!("config {}", config.display()))?;
            c.read_admin_token().with_context(|| format!("config {}", config.display()))?;
            println!("config ok");
            Ok(())
        }
        Command::KeygenMeter { out } => {
            keygen(&out, "meter key", countersign_protocol::keys::generate_meter_key())
        }
        Command::KeygenToken { out } => {
            let mut token = [0u8; SECRET_KEY_BYTES];
            OsRng.fill_bytes(&mut token);
            keygen(&out, "admin token", token)
        }
        Command::RegisterMeter { endpoint, token_file, meter_id, key_file } => {
            let token = read_token(&token_file)?;
            let key = read_secret(&key_file).context("reading the meter key")?;
            client::register_meter(&http()?, &endpoint, &token, meter_id, &key)
                .await
                .with_context(|| format!("registering meter {meter_id}"))?;
            println!("meter {meter_id} registered");
            Ok(())
        }
        Command::RegisterGateway { endpoint, token_file, gateway_id, public_key } => {
            let token = read_token(&token_file)?;
            let key = parse_public_key(&public_key).context("--public-key")?;
            client::register_gateway(&http()?, &endpoint, &token, gateway_id, &key)
                .await
                .with_context(|| format!("registering gateway {gateway_id}"))?;
            println!("gateway {gateway_id} registered");
            Ok(())
        }
        Command::CreateToken { endpoint, token_file, name, role, out } => {
            let token = read_token(&token_file)?;
            let mut secret = [0u8; SECRET_KEY_BYTES];
            OsRng.fill_bytes(&mut secret);
            // Written first: a token registered but lost would be useless, one written but
            // not registered is harmless (delete the file, run again).
            write_secret(&out, &secret).context("writing the new token")?;
            client::create_token(&http()?, &endpoint, &token, &name, role, &secret)
                .await
                .with_context(|| format!("registering token {name}"))?;
            println!("token {name} ({}) written to {} (mode 0600)", role.as_str(), out.display());
            Ok(())
        }
        Command::RevokeToken { endpoint, token_file, name } => {
            let token = read_token(&token_file)?;
            client::revoke_token(&http()?, &endpoint, &token, &name)
                .await
                .with_context(|| format!("revoking token {name}"))?;
            println!("token {name} revoked");
            Ok(())
        }
        Command::ListTokens { endpoint, token_file } => {
            let token = read_token(&token_file)?;
            let list = client::list_tokens(&http()?, &endpoint, &token).await.context("listing tokens")?;
            println!("{}", serde_json::to_string_pretty(&list).context("encoding the answer")?);
            Ok(())
        }
        Command::Usage { endpoint, token_file, iccid, from, to } => {
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

async fn serve(config_path: &Path) -> Result<()> {
    let config =
        CloudConfig::load(config_path).with_context(|| format!("config {}", config_path.display()))?;
    let endpoint =
        Endpoint::connect(&config).await.with_context(|| format!("config {}", config_path.display()))?;
    let listener = tokio::net::TcpListener::bind(config.listen())
        .await
        .with_context(|| format!("listen: cannot bind {}", config.listen()))?;
    endpoint.serve(listener, shutdown_signal()).await.context("serving")
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down");
}

fn keygen(out: &Path, what: &str, secret: [u8; SECRET_KEY_BYTES]) -> Result<()> {
    write_secret(out, &secret).with_context(|| format!("writing the {what}"))?;
    println!("wrote {what} to {} (mode 0600)", out.display());
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
