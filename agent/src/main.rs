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
    }
    Ok(())
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var("COUNTERSIGN_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        // Colour codes only for people: logs piped to files and journald stay plain.
        builder.with_ansi(std::io::stderr().is_terminal()).init();
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
