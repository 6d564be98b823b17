//! `serve` (the endpoint, with the Lago export and periodic billing when configured),
//! `check-config`, and the rollup maintenance commands `rollups-rebuild` and `rollups-check`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;
use countersign_cloud::service::billing::{load_plans, Billing};
use countersign_cloud::service::lago::{LagoConfig, LagoExporter};
use countersign_cloud::{CloudConfig, Endpoint};

/// Seconds between Lago export rounds when the outbox is drained.
const LAGO_EXPORT_INTERVAL_S: u64 = 10;

/// Commands that run or check an endpoint on this machine.
#[derive(Subcommand)]
pub(crate) enum ServeCommand {
    /// Run the endpoint until SIGINT or SIGTERM.
    Serve {
        /// The TOML config file.
        #[arg(long)]
        config: PathBuf,
        /// A Lago export config (TOML); when given, stored usage is forwarded to Lago.
        #[arg(long)]
        lago_config: Option<PathBuf>,
    },
    /// Validate a config file and the admin token file it names (and a Lago export config).
    CheckConfig {
        /// The TOML config file.
        #[arg(long)]
        config: PathBuf,
        /// A Lago export config (TOML) to validate too, with its API key file.
        #[arg(long)]
        lago_config: Option<PathBuf>,
    },
    /// Derive the usage rollups again from the stored records (the embedded store: stop the
    /// endpoint first, it holds the store's lock).
    RollupsRebuild {
        /// The endpoint's TOML config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Compare the usage rollups with a derivation from the stored records; exits 1 when
    /// they differ (the embedded store: stop the endpoint first).
    RollupsCheck {
        /// The endpoint's TOML config file.
        #[arg(long)]
        config: PathBuf,
        /// Differences to describe at most.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

/// Runs one command of this area.
pub(crate) async fn run(command: ServeCommand) -> Result<()> {
    match command {
        ServeCommand::Serve { config, lago_config } => serve(&config, lago_config.as_deref()).await,
        ServeCommand::CheckConfig { config, lago_config } => {
            let c = CloudConfig::load(&config).with_context(|| format!("config {}", config.display()))?;
            c.read_admin_token().with_context(|| format!("config {}", config.display()))?;
            if let Some(b) = c.billing() {
                load_plans(&b.plans_file).with_context(|| format!("config {}", config.display()))?;
            }
            if let Some(lago) = lago_config {
                LagoConfig::load(&lago).with_context(|| format!("lago config {}", lago.display()))?;
            }
            println!("config ok");
            Ok(())
        }
        ServeCommand::RollupsRebuild { config } => {
            let store = open_store(&config).await?;
            let started = std::time::Instant::now();
            let records = store.rebuild_rollups().await.context("rebuilding the rollups")?;
            println!("rollups rebuilt from {records} records in {:.1} s", started.elapsed().as_secs_f64());
            Ok(())
        }
        ServeCommand::RollupsCheck { config, limit } => {
            let store = open_store(&config).await?;
            let check = store.check_rollups(limit).await.context("checking the rollups")?;
            println!("{}", serde_json::to_string_pretty(&check).context("encoding the answer")?);
            if check.differences > 0 {
                anyhow::bail!(
                    "rollups differ from the records in {} places; run rollups-rebuild",
                    check.differences
                );
            }
            Ok(())
        }
    }
}

/// The store a config names, opened on this machine.
async fn open_store(config_path: &Path) -> Result<countersign_cloud::store::StoreBackend> {
    let c = CloudConfig::load(config_path).with_context(|| format!("config {}", config_path.display()))?;
    countersign_cloud::store::StoreBackend::open(c.store_kind(), c.data_dir(), c.cache_capacity_bytes())
        .await
        .with_context(|| format!("opening the store of config {}", config_path.display()))
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
    let (endpoint, export) = match lago_config {
        None => {
            endpoint.store().lago_export_unconfigured().await.context("lago: unconfiguring the export")?;
            (endpoint, None)
        }
        Some(lago_path) => {
            let lago = LagoConfig::load(lago_path)
                .with_context(|| format!("lago config {}", lago_path.display()))?;
            tracing::info!(
                code = %lago.metric.code,
                field = %lago.metric.field,
                events_per_call = lago.events_per_call,
                "lago export configured"
            );
            // On PostgreSQL every process runs an exporter; one at a time is active (export lock).
            let exporter = LagoExporter::new(endpoint.store(), lago).context("lago exporter")?;
            let endpoint = endpoint.with_lago_status(exporter.status());
            let task = tokio::spawn(
                exporter.run(Duration::from_secs(LAGO_EXPORT_INTERVAL_S), stopped(stop_rx.clone())),
            );
            (endpoint, Some(task))
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
        if let Err(e) = export.await {
            tracing::error!(error = %e, "lago export task failed");
        }
    }
    if let Some(task) = billing {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "periodic billing task failed");
        }
    }
    served
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
