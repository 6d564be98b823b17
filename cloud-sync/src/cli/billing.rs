//! Plans, prepaid wallets and forecasts: a plan file checked locally, charges, billing runs,
//! wallets, top-ups and quota forecasts asked of an endpoint.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;
use countersign_cloud::client;
use countersign_cloud::service::billing::load_plans;
use countersign_cloud::wire::billing::{ChargesQuery, ForecastQuery};
use countersign_cloud::wire::render::{charges_csv, charges_table};

use super::{date_arg, http, iccid_arg, print, read_token};

/// How long a command-line billing run may take (it derives all usage) before it is given up.
const BILLING_RUN_TIMEOUT_S: u64 = 600;

/// Commands of plans, prepaid wallets and forecasts, kept apart for easy merging.
#[derive(Subcommand)]
pub(crate) enum BillingCommand {
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

/// Runs one command of this area.
pub(crate) async fn run(command: BillingCommand) -> Result<()> {
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
