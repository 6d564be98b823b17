//! `countersign-agent`: the gateway daemon and its operator commands.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use countersign_agent::{AgentConfig, Buffer};

#[derive(Parser)]
#[command(name = "countersign-agent", version, about = "Countersign gateway agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        /// Config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and the gateway key it names.
    CheckConfig {
        /// Config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Generate a gateway key pair: the secret goes to --out (0600), the public key to stdout.
    Keygen {
        /// Where to write the secret key; must not exist.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the public key of a gateway key file.
    Pubkey {
        /// The secret key file.
        #[arg(long)]
        key_file: PathBuf,
    },
    /// Print what the (stopped) agent's database holds, as JSON.
    Inspect {
        /// Config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show the agent's state: asks the running agent, or reads its database if it is stopped.
    Status {
        /// Config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Empty the quarantine and/or the rejected reports of the stopped agent's database
    /// (pending reports are never touched). Refused while the agent runs: stop it first.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["quarantine", "rejected", "all"])))]
    Purge {
        /// Config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Empty the quarantine.
        #[arg(long)]
        quarantine: bool,
        /// Empty the rejected reports.
        #[arg(long)]
        rejected: bool,
        /// Empty both.
        #[arg(long)]
        all: bool,
    },
    /// Recover reports from a database moved aside as corrupt, and optionally re-send them.
    Salvage {
        /// Config file (for the endpoint and gateway key when sending).
        #[arg(long, short)]
        config: PathBuf,
        /// The moved-aside database directory.
        #[arg(long)]
        from: PathBuf,
        /// Write the candidates as JSON lines to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Send them to the endpoint (it verifies tags and deduplicates).
        #[arg(long)]
        send: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            let config = AgentConfig::load(&config).context("invalid configuration")?;
            init_tracing();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            rt.block_on(countersign_agent::run(config, shutdown_signal()))
                .context("agent failed to start")?;
        }
        Command::CheckConfig { config } => {
            let c = AgentConfig::load(&config).context("invalid configuration")?;
            let key = countersign_protocol::keys::read_gateway_key(&c.gateway_key_file)
                .context("gateway_key_file is not usable")?;
            println!(
                "config ok: gateway {} (public key {}), broker {}:{}, endpoint {}",
                c.gateway_id,
                hex::encode(key.verifying_key().as_bytes()),
                c.mqtt.host,
                c.mqtt.port,
                c.endpoint_url
            );
        }
        Command::Keygen { out } => {
            let key = countersign_protocol::keys::generate_gateway_key();
            countersign_protocol::keys::write_secret(&out, key.as_bytes())
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!("{}", hex::encode(key.verifying_key().as_bytes()));
        }
        Command::Pubkey { key_file } => {
            let key = countersign_protocol::keys::read_gateway_key(&key_file)?;
            println!("{}", hex::encode(key.verifying_key().as_bytes()));
        }
        Command::Inspect { config } => {
            let c = AgentConfig::load(&config).context("invalid configuration")?;
            let b = Buffer::open(&c.data_dir, c.cache_capacity_bytes)
                .context("cannot open the database (is the agent still running?)")?;
            let rejected: Vec<_> = b
                .rejected()?
                .into_iter()
                .map(|(id, r)| serde_json::json!({"record_id": id.to_string(), "rejected": r}))
                .collect();
            let out = serde_json::json!({
                "stats": b.stats(),
                "quarantined": b.quarantined()?,
                "rejected": rejected,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Command::Status { config } => {
            let c = AgentConfig::load(&config).context("invalid configuration")?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let live = match c.listen {
                Some(addr) => rt.block_on(async {
                    let url = format!("http://{addr}/status");
                    let r = reqwest::Client::new()
                        .get(&url)
                        .timeout(std::time::Duration::from_secs(5))
                        .send()
                        .await;
                    match r {
                        Ok(r) => r.json::<serde_json::Value>().await.ok(),
                        Err(_) => None,
                    }
                }),
                None => None,
            };
            let out = match live {
                Some(v) => {
                    let s: countersign_agent::StatusSnapshot = serde_json::from_value(v)
                        .context("the agent answered /status with something else")?;
                    serde_json::json!({"agent": "running", "health": countersign_agent::Health::of(&s), "status": s})
                }
                None => {
                    let b = Buffer::open(&c.data_dir, c.cache_capacity_bytes).context(
                        "the agent does not answer on its status address and its database cannot be opened",
                    )?;
                    serde_json::json!({
                        "agent": "not running",
                        "buffered_reports": b.pending_count(),
                        "buffer_bytes": b.logical_bytes(),
                        "oldest_unsynced_ms": b.oldest_pending_ms()?,
                        "stats": b.stats(),
                    })
                }
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Command::Purge { config, quarantine, rejected, all } => {
            use countersign_agent::store::Purge;
            let c = AgentConfig::load(&config).context("invalid configuration")?;
            let which = match (all || (quarantine && rejected), quarantine) {
                (true, _) => Purge::All,
                (false, true) => Purge::Quarantine,
                (false, false) => Purge::Rejected,
            };
            // sled locks the database while the agent runs; say so plainly rather than
            // through sled's lock error.
            if let Some(addr) = c.listen {
                if std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(500)).is_ok()
                {
                    anyhow::bail!(
                        "the agent is running (it answers on {addr}); stop it first: purge works on a stopped agent"
                    );
                }
            }
            let b = Buffer::open_with(&c.data_dir, c.cache_capacity_bytes, c.side_limits).context(
                "cannot open the database (if the agent is running, stop it first: purge works on a stopped agent)",
            )?;
            let (q, r) = b.purge(which)?;
            println!(
                "{}",
                serde_json::json!({"quarantine_removed": q, "rejected_removed": r, "stats": b.stats()})
            );
        }
        Command::Salvage { config, from, out, send } => {
            let c = AgentConfig::load(&config).context("invalid configuration")?;
            let (method, candidates) = countersign_agent::salvage::salvage(&from)
                .with_context(|| format!("cannot salvage {}", from.display()))?;
            if let Some(out) = &out {
                let mut text = String::new();
                for cand in &candidates {
                    text.push_str(&serde_json::to_string(cand)?);
                    text.push('\n');
                }
                std::fs::write(out, text).with_context(|| format!("cannot write {}", out.display()))?;
            }
            let mut summary = serde_json::json!({"method": method, "candidates": candidates.len()});
            if send {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                let _ = rustls::crypto::ring::default_provider().install_default();
                let key = countersign_protocol::keys::read_gateway_key(&c.gateway_key_file)?;
                let counts = rt.block_on(send_candidates(&c, &key, &candidates))?;
                summary["sent"] = serde_json::json!(counts);
            }
            println!("{}", serde_json::to_string_pretty(&summary)?);
        }
    }
    Ok(())
}

/// Sends salvaged candidates in signed batches; returns counts per outcome.
async fn send_candidates(
    c: &AgentConfig,
    key: &ed25519_dalek::SigningKey,
    candidates: &[countersign_agent::salvage::Candidate],
) -> Result<std::collections::BTreeMap<String, u64>> {
    use countersign_protocol::{BatchBuilder, BatchHeader, BatchReply, RecordOutcome, RecordRef};
    let http = countersign_agent::tls::http_client(c)?;
    let url = format!("{}{}", c.endpoint_url, countersign_protocol::BATCHES_PATH);
    let mut counts = std::collections::BTreeMap::new();
    let reports: Vec<(u64, Vec<u8>)> = candidates
        .iter()
        .filter_map(|cand| hex::decode(&cand.report_hex).ok().map(|r| (cand.received_ms, r)))
        .collect();
    for (n, chunk) in reports.chunks(c.batch.records_max).enumerate() {
        let now = countersign_agent::status::now_ms();
        // Salvage batches get their own sequence space: the high bit marks them in endpoint logs.
        let header =
            BatchHeader { gateway_id: c.gateway_id, batch_seq: (1 << 63) | n as u64, created_ms: now };
        let mut b = BatchBuilder::new(header);
        for (ms, r) in chunk {
            b.push(RecordRef { received_ms: *ms, report: r })?;
        }
        let resp = http.post(&url).body(b.sign(key)).send().await.context("endpoint unreachable")?;
        let status = resp.status();
        if !status.is_success() {
            anyhow::bail!(
                "endpoint refused a salvage batch: {status} {}",
                resp.text().await.unwrap_or_default()
            );
        }
        let reply: BatchReply = resp.json().await?;
        countersign_agent::pipeline::check_reply(&reply, c.gateway_id, header.batch_seq, chunk.len())
            .context("the endpoint's reply does not match the salvage batch")?;
        for r in reply.results {
            let k = match r {
                RecordOutcome::Stored => "stored".to_owned(),
                RecordOutcome::Duplicate => "duplicate".to_owned(),
                RecordOutcome::Rejected { reason, .. } => format!("rejected_{}", reason.code()),
            };
            *counts.entry(k).or_insert(0) += 1;
        }
    }
    Ok(counts)
}

/// `RUST_LOG` as `target=level` directives (`info`, `countersign_agent=debug,rumqttc=warn`);
/// anything else, or nothing, means `info`. `Targets` rather than `EnvFilter`, whose span and
/// field matching would bring a regex engine into the gateway binary's size budget.
fn log_filter(rust_log: Option<&str>) -> tracing_subscriber::filter::Targets {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    rust_log
        .and_then(|v| v.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO))
}

fn init_tracing() {
    use tracing_subscriber::prelude::*;
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let json = std::env::var("COUNTERSIGN_LOG_FORMAT").is_ok_and(|v| v == "json");
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if json {
        tracing_subscriber::registry().with(layer.json().with_filter(filter)).init();
    } else {
        // Colour codes only for people: logs piped to files and journald stay plain.
        tracing_subscriber::registry()
            .with(layer.with_ansi(std::io::stderr().is_terminal()).with_filter(filter))
            .init();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;
    use tracing::Level;

    #[test]
    fn rust_log_takes_target_directives_and_falls_back_to_info() {
        let f = log_filter(Some("countersign_agent=debug,rumqttc=warn"));
        assert!(f.would_enable("countersign_agent::pipeline::commit", &Level::DEBUG));
        assert!(!f.would_enable("rumqttc::state", &Level::INFO));
        assert!(f.would_enable("rumqttc::state", &Level::WARN));
        let plain = log_filter(Some("debug"));
        assert!(plain.would_enable("sled", &Level::DEBUG));
        for default in [log_filter(None), log_filter(Some("countersign_agent=loudly"))] {
            assert!(default.would_enable("countersign_agent", &Level::INFO));
            assert!(!default.would_enable("countersign_agent", &Level::DEBUG));
        }
    }
}
