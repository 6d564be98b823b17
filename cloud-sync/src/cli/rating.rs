//! The rating work: settlement runs, the settlement ledger, the SIMs whose usage cannot be
//! derived, and reconciliation with the carrier's usage files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;
use countersign_cloud::carrier::{self, CARRIER_FILE_BYTES_MAX};
use countersign_cloud::carrier_twilio;
use countersign_cloud::client;
use countersign_cloud::once_api::{self, OnceCredentials};
use countersign_cloud::once_fetch::ONCE_API_BASE_URL;
use countersign_cloud::reconcile::{self, ProviderModel, Tolerance};
use countersign_cloud::text::iccid_from_text;
use countersign_cloud::usage::DateRange;

use super::{date_arg, http, iccid_arg, read_token};

/// Commands of the rating work (settlement, reconciliation), kept apart for easy merging.
#[derive(Subcommand)]
pub(crate) enum RatingCommand {
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
        /// 1NCE Data Streamer usage records (JSON array, object, or one object per line).
        #[arg(long)]
        carrier_streamer: Vec<PathBuf>,
        /// --carrier-twilio and --twilio-sims (boxed, as --fetch).
        #[command(flatten)]
        twilio: Box<TwilioOpts>,
        /// --fetch and its options (boxed: they would make every command this large).
        #[command(flatten)]
        fetch: Box<FetchOpts>,
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

/// `reconcile --carrier-twilio`: Twilio Super SIM usage files.
#[derive(clap::Args)]
pub(crate) struct TwilioOpts {
    /// Twilio Super SIM UsageRecords answers (Group=sim, Granularity=day or hour), one page
    /// a file; needs --twilio-sims.
    #[arg(long, requires = "twilio_sims")]
    carrier_twilio: Vec<PathBuf>,
    /// Twilio Super SIM Sims list answers (sid → ICCID) for --carrier-twilio.
    #[arg(long)]
    twilio_sims: Vec<PathBuf>,
}

/// `reconcile --fetch`: usage from the 1NCE Management API.
#[derive(clap::Args)]
pub(crate) struct FetchOpts {
    /// Fetch each SIM's daily usage for --from..--to from the 1NCE Management API instead
    /// of (or besides) reading files: the SIMs the endpoint reports for the range.
    #[arg(long, requires_all = ["fetch_credentials", "from", "to"])]
    fetch: bool,
    /// TOML file with `client_id` and `client_secret` of the 1NCE API client (--fetch).
    #[arg(long)]
    fetch_credentials: Option<PathBuf>,
    /// The 1NCE Management API base URL (--fetch).
    #[arg(long, default_value = ONCE_API_BASE_URL)]
    fetch_base_url: String,
    /// With --fetch, also fetch every SIM of the account (paging GET /v1/sims).
    #[arg(long, requires = "fetch")]
    fetch_all_sims: bool,
}

/// Runs one command of this area.
pub(crate) async fn run(command: RatingCommand) -> Result<()> {
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
            carrier_streamer,
            twilio,
            fetch,
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
            for path in &carrier_streamer {
                let text = read_carrier_file(path)?;
                carrier.extend(
                    carrier::parse_1nce_streamer_usage(&text, &zone)
                        .with_context(|| format!("{}", path.display()))?,
                );
            }
            if !twilio.carrier_twilio.is_empty() {
                if zone != jiff::tz::TimeZone::UTC {
                    // Twilio's UsageRecords are cut in UTC days and hours.
                    anyhow::bail!("--carrier-twilio: Twilio usage is cut in UTC, give --tz UTC (got '{tz}')");
                }
                let mut sims = std::collections::BTreeMap::new();
                for path in &twilio.twilio_sims {
                    let text = read_carrier_file(path)?;
                    sims.extend(
                        carrier_twilio::parse_twilio_sims(&text)
                            .with_context(|| format!("{}", path.display()))?,
                    );
                }
                for path in &twilio.carrier_twilio {
                    let text = read_carrier_file(path)?;
                    carrier.extend(
                        carrier_twilio::parse_twilio_supersim_usage(&text, &sims)
                            .with_context(|| format!("{}", path.display()))?,
                    );
                }
            }
            let range = DateRange { from, to };
            let token = read_token(&token_file)?;
            let days = client::usage_days(&http()?, &endpoint, &token, &tz, None, range)
                .await
                .context("device usage query")?;
            if fetch.fetch {
                if zone != jiff::tz::TimeZone::UTC {
                    // 1NCE's DailyUsage rows are UTC days; other device days would not match.
                    anyhow::bail!("--fetch: 1NCE daily usage is cut in UTC, give --tz UTC (got '{tz}')");
                }
                carrier.extend(
                    fetch_1nce(
                        FetchArgs {
                            credentials: fetch.fetch_credentials,
                            base_url: &fetch.fetch_base_url,
                            all: fetch.fetch_all_sims,
                        },
                        &days,
                        range,
                    )
                    .await?,
                );
            }
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

struct FetchArgs<'a> {
    credentials: Option<PathBuf>,
    base_url: &'a str,
    all: bool,
}

/// `--fetch`: the SIMs the endpoint reports for the range (usable or not), and with
/// `--fetch-all-sims` the account's, fetched from the 1NCE API. 1NCE cuts days in UTC.
async fn fetch_1nce(
    args: FetchArgs<'_>,
    days: &countersign_cloud::wire::usage::ZoneDays,
    range: DateRange,
) -> Result<Vec<carrier::CarrierDay>> {
    let path = args.credentials.context("--fetch needs --fetch-credentials")?;
    let credentials = OnceCredentials::from_file(&path).context("--fetch-credentials")?;
    let (Some(from), Some(to)) = (range.from, range.to) else {
        anyhow::bail!("--fetch needs --from and --to");
    };
    let sims: BTreeSet<u64> =
        days.days.iter().map(|d| d.iccid).chain(days.underivable.iter().map(|u| u.iccid)).collect();
    let (fetched, _stats) =
        once_api::fetch_usage(&http()?, args.base_url, &credentials, sims, (from, to), args.all)
            .await
            .context("fetching usage from 1nce")?;
    Ok(fetched)
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
    let iccid = iccid_from_text(&iccid)
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
