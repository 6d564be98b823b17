//! `countersign-cloud`: run the rating endpoint, check its config, make keys, register
//! meters and gateways, query usage, settle days, reconcile with the carrier, export to Lago.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use countersign_cloud::auth::Role;
use countersign_cloud::carrier::{self, CARRIER_FILE_BYTES_MAX};
use countersign_cloud::lago::{LagoConfig, LagoExporter};
use countersign_cloud::reconcile::{self, ProviderModel, Tolerance};
use countersign_cloud::service::billing::{load_plans, Billing};
use countersign_cloud::text::{parse_date, parse_iccid};
use countersign_cloud::usage::DateRange;
use countersign_cloud::wire::billing::{ChargesQuery, ForecastQuery};
use countersign_cloud::wire::render::{charges_csv, charges_table};
use countersign_cloud::{client, CloudConfig, Endpoint};
use countersign_protocol::keys::{parse_public_key, read_secret, write_secret, SECRET_KEY_BYTES};
use rand_core::{OsRng, RngCore};
use tracing_subscriber::EnvFilter;

/// How long a command-line request may take before it is given up.
const REQUEST_TIMEOUT_S: u64 = 30;
/// Seconds between Lago export rounds when the outbox is drained.
const LAGO_EXPORT_INTERVAL_S: u64 = 10;
/// How long a command-line billing run may take (it derives all usage) before it is given up.
const BILLING_RUN_TIMEOUT_S: u64 = 600;

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
        /// A Lago export config (TOML); when given, stored usage is forwarded to Lago.
        #[arg(long)]
        lago_config: Option<PathBuf>,
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
    #[command(flatten)]
    Rating(RatingCommand),
    #[command(flatten)]
    Billing(BillingCommand),
}

/// Commands of plans, prepaid wallets and forecasts, kept apart for easy merging.
#[derive(Subcommand)]
enum BillingCommand {
    /// Validate a plan file ([[plan]], [[assign]], [[wallet]], time_zone) and summarise it.
    CheckPlans {
        /// The plan file (TOML).
        #[arg(long)]
        plans: PathBuf,
    },
    /// Print the explained charges per customer and group for one billing period.
    Charges {
        /// Endpoint base URL.
        #[arg(long)]
        endpoint: String,
        /// A token file: the admin token or a query API token.
        #[arg(long)]
        token_file: PathBuf,
        /// One customer only.
        #[arg(long)]
        customer: Option<String>,
        /// One group only.
        #[arg(long)]
        group: Option<String>,
        /// A day, YYYY-MM-DD: each group's billing period containing it (default: today).
        #[arg(long, value_parser = date_arg, conflicts_with_all = ["from", "to"])]
        period: Option<time::Date>,
        /// First day of an explicit range, priced as one period (with --to).
        #[arg(long, value_parser = date_arg, requires = "to")]
        from: Option<time::Date>,
        /// Last day of an explicit range, included (with --from).
        #[arg(long, value_parser = date_arg, requires = "from")]
        to: Option<time::Date>,
        /// Output format: json, table or csv.
        #[arg(long, default_value = "json")]
        format: String,
    },
    /// Bill every prepaid wallet now and print what was debited (JSON).
    BillingRun {
        /// Endpoint base URL.
        #[arg(long)]
        endpoint: String,
        /// The admin token file.
        #[arg(long)]
        token_file: PathBuf,
    },
    /// Print prepaid wallets: balance, debits per period, top-ups, alerts (JSON).
    Wallets {
        /// Endpoint base URL.
        #[arg(long)]
        endpoint: String,
        /// A token file: the admin token or a query API token.
        #[arg(long)]
        token_file: PathBuf,
        /// One customer only.
        #[arg(long)]
        customer: Option<String>,
    },
    /// Top up a prepaid wallet; the same --topup-id again books nothing (JSON).
    Topup {
        /// Endpoint base URL.
        #[arg(long)]
        endpoint: String,
        /// The admin token file.
        #[arg(long)]
        token_file: PathBuf,
        /// The customer.
        #[arg(long)]
        customer: String,
        /// Your idempotency key for this top-up (A-Z a-z 0-9 . _ -, at most 64).
        #[arg(long)]
        topup_id: String,
        /// Decimal amount in the wallet's currency, e.g. 25.00.
        #[arg(long)]
        amount: String,
    },
    /// Forecast when a SIM's lifetime quota runs out at its recent rate (JSON).
    Forecast {
        /// Endpoint base URL.
        #[arg(long)]
        endpoint: String,
        /// A token file: the admin token or a query API token.
        #[arg(long)]
        token_file: PathBuf,
        /// The SIM, as decimal digits.
        #[arg(long, value_parser = iccid_arg)]
        iccid: u64,
        /// The quota (default: the SIM's plan's lifetime_quota_bytes).
        #[arg(long)]
        quota_bytes: Option<u64>,
        /// First day of the lifetime (default: the group's active_since, else first usage).
        #[arg(long, value_parser = date_arg)]
        since: Option<time::Date>,
        /// Last day of the lifetime (default: since + the plan's lifetime_years, or 10 years).
        #[arg(long, value_parser = date_arg)]
        expires: Option<time::Date>,
        /// Days the rate is averaged over (default 30).
        #[arg(long)]
        window_days: Option<u32>,
        /// The day the forecast is made on (default: today in the billing zone).
        #[arg(long, value_parser = date_arg)]
        as_of: Option<time::Date>,
    },
}

/// Commands of the rating work (settlement, reconciliation), kept apart for easy merging.
#[derive(Subcommand)]
enum RatingCommand {
    /// Close days N hours after their end in a time zone and book adjustments for closed days.
    Settle {
        /// Endpoint base URL.
        #[arg(long)]
        endpoint: String,
        /// The admin token file.
        #[arg(long)]
        token_file: PathBuf,
        /// IANA time zone days are cut in, e.g. Europe/Berlin.
        #[arg(long)]
        tz: String,
        /// Hours after a day's end before it closes.
        #[arg(long, default_value_t = 48)]
        settlement_hours: u32,
    },
    /// List the SIMs whose usage cannot be derived (left out of usage, settlement, billing),
    /// with the record and the reason, as JSON.
    Faults {
        /// Endpoint base URL.
        #[arg(long)]
        endpoint: String,
        /// The admin token file.
        #[arg(long)]
        token_file: PathBuf,
    },
    /// Print the settlement ledger (settled SIM-days and their adjustments) as JSON.
    Ledger {
        /// Endpoint base URL.
        #[arg(long)]
        endpoint: String,
        /// The admin token file.
        #[arg(long)]
        token_file: PathBuf,
        /// One SIM only.
        #[arg(long, value_parser = iccid_arg)]
        iccid: Option<u64>,
        /// First day included, YYYY-MM-DD.
        #[arg(long, value_parser = date_arg)]
        from: Option<time::Date>,
        /// Last day included, YYYY-MM-DD.
        #[arg(long, value_parser = date_arg)]
        to: Option<time::Date>,
    },
    /// Compare device-counted usage (from the endpoint) with carrier usage files per SIM-day.
    Reconcile {
        /// Endpoint base URL.
        #[arg(long)]
        endpoint: String,
        /// The admin token file.
        #[arg(long)]
        token_file: PathBuf,
        /// 1NCE daily usage JSON of one SIM, as ICCID=FILE or FILE named <ICCID>.json.
        #[arg(long)]
        carrier_json: Vec<String>,
        /// Daily usage CSV (iccid, date, volume and/or volume_rx + volume_tx; MB strings).
        #[arg(long)]
        carrier_csv: Vec<PathBuf>,
        /// Session records CSV (iccid, start, end, volume_rx, volume_tx[, volume_total]).
        #[arg(long)]
        carrier_sessions: Vec<PathBuf>,
        /// Provider model: 1nce or exact.
        #[arg(long, default_value = "1nce")]
        provider: String,
        /// IANA time zone the carrier's days are cut in.
        #[arg(long, default_value = "UTC")]
        tz: String,
        /// First day included, YYYY-MM-DD.
        #[arg(long, value_parser = date_arg)]
        from: Option<time::Date>,
        /// Last day included, YYYY-MM-DD.
        #[arg(long, value_parser = date_arg)]
        to: Option<time::Date>,
        /// Absolute tolerance, bytes.
        #[arg(long, default_value_t = 1024)]
        tolerance_bytes: u64,
        /// Relative tolerance, basis points of the expected bytes (100 = 1 %).
        #[arg(long, default_value_t = 100)]
        tolerance_bp: u32,
        /// Output format: json or csv.
        #[arg(long, default_value = "json")]
        format: String,
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
        Command::Serve { config, lago_config } => serve(&config, lago_config.as_deref()).await,
        Command::Rating(c) => rating(c).await,
        Command::Billing(c) => billing(c).await,
        Command::CheckConfig { config } => {
            let c = CloudConfig::load(&config).with_context(|| format!("config {}", config.display()))?;
            c.read_admin_token().with_context(|| format!("config {}", config.display()))?;
            if let Some(b) = c.billing() {
                load_plans(&b.plans_file).with_context(|| format!("config {}", config.display()))?;
            }
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

async fn serve(config_path: &Path, lago_config: Option<&Path>) -> Result<()> {
    let config =
        CloudConfig::load(config_path).with_context(|| format!("config {}", config_path.display()))?;
    let endpoint =
        Endpoint::connect(&config).await.with_context(|| format!("config {}", config_path.display()))?;
    let listener = tokio::net::TcpListener::bind(config.listen())
        .await
        .with_context(|| format!("listen: cannot bind {}", config.listen()))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let export = match lago_config {
        None => None,
        Some(lago_path) => {
            let lago = LagoConfig::load(lago_path)
                .with_context(|| format!("lago config {}", lago_path.display()))?;
            // On PostgreSQL every process runs an exporter; one at a time is active (export lock).
            let exporter = LagoExporter::new(endpoint.store(), lago).context("lago exporter")?;
            Some(tokio::spawn(
                exporter.run(Duration::from_secs(LAGO_EXPORT_INTERVAL_S), stopped(stop_rx.clone())),
            ))
        }
    };
    // Periodic billing whenever a plans file is configured (interval: billing.run_interval_s).
    let billing = endpoint.billing().cloned().map(|b: std::sync::Arc<Billing>| {
        tracing::info!(interval_s = b.run_interval().as_secs(), "periodic billing");
        tokio::spawn(b.run_periodically(endpoint.store().clone(), stopped(stop_rx.clone())))
    });
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let served = endpoint.serve(listener, stopped(stop_rx)).await.context("serving");
    if let Some(export) = export {
        match export.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "lago export stopped"),
            Err(e) => tracing::error!(error = %e, "lago export task failed"),
        }
    }
    if let Some(task) = billing {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "periodic billing task failed");
        }
    }
    served
}

async fn billing(command: BillingCommand) -> Result<()> {
    match command {
        BillingCommand::CheckPlans { plans } => {
            let p = load_plans(&plans)?;
            println!(
                "plans ok: {} plan(s), {} group(s), {} SIM(s), {} wallet(s), days in {}",
                p.plans.len(),
                p.assignments.len(),
                p.assigned_sims(),
                p.wallets.len(),
                p.time_zone
            );
            Ok(())
        }
        BillingCommand::Charges { endpoint, token_file, customer, group, period, from, to, format } => {
            if !matches!(format.as_str(), "json" | "table" | "csv") {
                anyhow::bail!("--format: expected json, table or csv, got '{format}'");
            }
            let token = read_token(&token_file)?;
            let q = ChargesQuery { customer, group, period, from, to };
            let r =
                client::billing_charges(&http()?, &endpoint, &token, &q).await.context("charges query")?;
            match format.as_str() {
                "csv" => print!("{}", charges_csv(&r).context("encoding csv")?),
                "table" => print!("{}", charges_table(&r)),
                _ => print(&r)?,
            }
            Ok(())
        }
        BillingCommand::BillingRun { endpoint, token_file } => {
            let token = read_token(&token_file)?;
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(BILLING_RUN_TIMEOUT_S))
                .build()
                .context("building the HTTP client")?;
            print(&client::billing_run(&http, &endpoint, &token).await.context("billing run")?)
        }
        BillingCommand::Wallets { endpoint, token_file, customer } => {
            let token = read_token(&token_file)?;
            print(
                &client::billing_wallets(&http()?, &endpoint, &token, customer.as_deref())
                    .await
                    .context("wallets query")?,
            )
        }
        BillingCommand::Topup { endpoint, token_file, customer, topup_id, amount } => {
            let token = read_token(&token_file)?;
            print(
                &client::billing_topup(&http()?, &endpoint, &token, &customer, &topup_id, &amount)
                    .await
                    .with_context(|| format!("top-up {topup_id} of {customer}"))?,
            )
        }
        BillingCommand::Forecast {
            endpoint,
            token_file,
            iccid,
            quota_bytes,
            since,
            expires,
            window_days,
            as_of,
        } => {
            let token = read_token(&token_file)?;
            let q = ForecastQuery { iccid, quota_bytes, since, expires, window_days, as_of };
            print(&client::billing_forecast(&http()?, &endpoint, &token, &q).await.context("forecast")?)
        }
    }
}

fn print<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v).context("encoding the answer")?);
    Ok(())
}

/// Reads a 1NCE JSON argument: `ICCID=FILE`, or `FILE` whose stem is the ICCID.
fn carrier_json_arg(arg: &str) -> Result<(u64, PathBuf)> {
    let (iccid, path) = match arg.split_once('=') {
        Some((i, p)) => (i.to_owned(), PathBuf::from(p)),
        None => {
            let p = PathBuf::from(arg);
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
            (stem, p)
        }
    };
    let iccid = parse_iccid(&iccid)
        .with_context(|| format!("--carrier-json {arg}: give ICCID=FILE or name the file <ICCID>.json"))?;
    Ok((iccid, path))
}

fn read_carrier_file(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.len() > CARRIER_FILE_BYTES_MAX as u64 {
        anyhow::bail!("{}: larger than {CARRIER_FILE_BYTES_MAX} bytes", path.display());
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

async fn rating(command: RatingCommand) -> Result<()> {
    match command {
        RatingCommand::Settle { endpoint, token_file, tz, settlement_hours } => {
            let token = read_token(&token_file)?;
            let r =
                client::settle(&http()?, &endpoint, &token, &tz, settlement_hours).await.context("settle")?;
            println!("{}", serde_json::to_string_pretty(&r).context("encoding the answer")?);
            Ok(())
        }
        RatingCommand::Faults { endpoint, token_file } => {
            let token = read_token(&token_file)?;
            let r = client::faults(&http()?, &endpoint, &token).await.context("faults query")?;
            println!("{}", serde_json::to_string_pretty(&r).context("encoding the answer")?);
            Ok(())
        }
        RatingCommand::Ledger { endpoint, token_file, iccid, from, to } => {
            let token = read_token(&token_file)?;
            let r = client::usage_ledger(&http()?, &endpoint, &token, iccid, DateRange { from, to })
                .await
                .context("ledger query")?;
            println!("{}", serde_json::to_string_pretty(&r).context("encoding the answer")?);
            Ok(())
        }
        RatingCommand::Reconcile {
            endpoint,
            token_file,
            carrier_json,
            carrier_csv,
            carrier_sessions,
            provider,
            tz,
            from,
            to,
            tolerance_bytes,
            tolerance_bp,
            format,
        } => {
            if format != "json" && format != "csv" {
                anyhow::bail!("--format: expected json or csv, got '{format}'");
            }
            let model = ProviderModel::builtin(&provider).context("--provider")?;
            let zone = countersign_cloud::usage::time_zone(&tz).context("--tz")?;
            let mut carrier = Vec::new();
            for arg in &carrier_json {
                let (iccid, path) = carrier_json_arg(arg)?;
                let text = read_carrier_file(&path)?;
                carrier.extend(
                    carrier::parse_1nce_daily_json(iccid, &text)
                        .with_context(|| format!("{}", path.display()))?,
                );
            }
            for path in &carrier_csv {
                let text = read_carrier_file(path)?;
                carrier
                    .extend(carrier::parse_daily_csv(&text).with_context(|| format!("{}", path.display()))?);
            }
            for path in &carrier_sessions {
                let text = read_carrier_file(path)?;
                carrier.extend(
                    carrier::parse_sessions_csv(&text, &zone)
                        .with_context(|| format!("{}", path.display()))?,
                );
            }
            let range = DateRange { from, to };
            let token = read_token(&token_file)?;
            let days = client::usage_days(&http()?, &endpoint, &token, &tz, None, range)
                .await
                .context("device usage query")?;
            let device = days.days.iter().map(|d| ((d.iccid, d.date), d.total_bytes)).collect();
            let tolerance = Tolerance { bytes: tolerance_bytes, basis_points: tolerance_bp };
            let mut r =
                reconcile::reconcile(&device, &carrier, &model, tolerance, range).context("reconciling")?;
            // The endpoint left these SIMs out: their carrier days are not "missing on the
            // device", they cannot be compared.
            for u in &days.underivable {
                reconcile::mark_underivable(
                    &mut r,
                    u.iccid,
                    format!("device usage cannot be derived: {}", u.reason),
                );
            }
            if format == "csv" {
                print!("{}", reconcile::to_csv(&r).context("encoding csv")?);
            } else {
                println!("{}", serde_json::to_string_pretty(&r).context("encoding json")?);
            }
            Ok(())
        }
    }
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
