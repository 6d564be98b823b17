//! `countersign-demo`: the whole chain in one process, on embedded defaults.
//!
//! Starts an embedded MQTT broker (rumqttd), the rating endpoint with its embedded sled
//! store, and one agent, each on a free port of 127.0.0.1; then runs a fleet of simulated
//! devices (the real meter code) over random traffic with reboots, modem counter resets and
//! reports dropped or duplicated on purpose. It prints usage per SIM as the endpoint derived
//! it and ends with `verified: device_total_bytes=… endpoint_total_bytes=…`, exiting non-zero
//! if the two differ.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use countersign_e2e::broker;
use countersign_e2e::fleet::{Faults, Fleet, STEP_S};
use countersign_e2e::publisher::Publisher;
use countersign_protocol::keys;
use countersign_testkit::{free_port, wait_for_port};

#[derive(Parser)]
#[command(name = "countersign-demo", about = "Run the Countersign chain end to end on embedded defaults")]
struct Args {
    /// Number of simulated devices.
    #[arg(long, default_value_t = 120)]
    devices: usize,
    /// Simulated hours.
    #[arg(long, default_value_t = 72)]
    hours: usize,
    /// Random seed (the same seed gives the same traffic).
    #[arg(long, default_value_t = 2026)]
    seed: u64,
    /// How long to wait for the endpoint to catch up, in seconds.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
}

/// Modem connections the devices share (one per cell, say).
const PUBLISHERS: usize = 8;

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rumqttd=off")),
        )
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let ok = rt.block_on(demo(args))?;
    // rumqttd has no stop: leave through the exit code.
    std::process::exit(if ok { 0 } else { 1 });
}

async fn demo(args: Args) -> Result<bool> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().context("cannot create a work directory")?;
    let work = dir.path();

    // 1. Broker.
    let mqtt_port = free_port()?;
    broker::start_embedded(mqtt_port)?;
    if !wait_for_port(mqtt_port, Duration::from_secs(10)).await {
        bail!("embedded broker did not start on port {mqtt_port}");
    }

    // 2. Endpoint with its embedded store.
    let token = keys::generate_meter_key();
    let token_file = work.join("admin.token");
    keys::write_secret(&token_file, &token)?;
    let token_hex = hex::encode(token);
    let cloud_config = countersign_cloud::CloudConfig::from_toml_str(&format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nadmin_token_file = \"{}\"\n",
        work.join("cloud").display(),
        token_file.display()
    ))?;
    let endpoint = countersign_cloud::Endpoint::open(&cloud_config)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base_url = format!("http://{}", listener.local_addr()?);
    let (cloud_stop_tx, cloud_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let cloud = tokio::spawn(endpoint.serve(listener, async move {
        let _ = cloud_stop_rx.await;
    }));

    // 3. Keys: one gateway, one key per meter, all registered with the endpoint.
    let http = reqwest::Client::new();
    let gateway_id = 1;
    let gateway_key = keys::generate_gateway_key();
    let gateway_key_file = work.join("gateway.key");
    keys::write_secret(&gateway_key_file, gateway_key.as_bytes())?;
    countersign_cloud::client::register_gateway(
        &http,
        &base_url,
        &token_hex,
        gateway_id,
        &gateway_key.verifying_key(),
    )
    .await?;
    let start = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs()
        - (args.hours as u64 + 1) * STEP_S;
    let mut fleet = Fleet::new(args.devices, 1000, args.seed, start, Faults::default());
    for (meter_id, key, _) in fleet.meters() {
        countersign_cloud::client::register_meter(&http, &base_url, &token_hex, meter_id, &key).await?;
    }

    // 4. Agent.
    let agent_config = countersign_agent::AgentConfig::from_toml_str(&format!(
        "gateway_id = {gateway_id}\ngateway_key_file = \"{}\"\ndata_dir = \"{}\"\nendpoint_url = \"{base_url}\"\n\
         [mqtt]\nport = {mqtt_port}\n[batch]\nlinger_ms = 50\n[http]\nlisten = \"127.0.0.1:0\"\n",
        gateway_key_file.display(),
        work.join("agent").display(),
    ))?;
    let (agent_stop_tx, agent_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let status = std::sync::Arc::new(countersign_agent::AgentStatus::default());
    let agent = tokio::spawn(countersign_agent::run_observed(agent_config, status.clone(), async move {
        let _ = agent_stop_rx.await;
    }));

    // The agent must hold its subscription before devices publish, or the broker has
    // nobody to keep the reports for.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !status.subscribed.load(std::sync::atomic::Ordering::Relaxed) {
        if tokio::time::Instant::now() > deadline || agent.is_finished() {
            bail!("agent did not subscribe to the broker");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 5. Devices.
    let mut pubs: Vec<Publisher> =
        (0..PUBLISHERS).map(|i| Publisher::connect(&format!("demo-modem-{i}"), mqtt_port)).collect();
    let mut published = 0u64;
    for hour in 0..=args.hours {
        let out = if hour == args.hours { fleet.finish() } else { fleet.step() };
        for o in out {
            let meter_id: usize = o.topic.rsplit('/').next().and_then(|s| s.parse().ok()).unwrap_or(0);
            pubs[meter_id % PUBLISHERS].publish(&o.topic, &o.payload).await?;
            published += 1;
        }
    }
    for p in &pubs {
        p.wait_acked(Duration::from_secs(60)).await?;
    }
    for p in pubs {
        p.close().await;
    }

    // 6. Wait for the endpoint to have every byte, then compare per SIM.
    let truth = fleet.truth_per_iccid();
    let device_total = fleet.truth_total_bytes();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_s);
    let mut sims = BTreeMap::new();
    let mut endpoint_total = 0u64;
    while tokio::time::Instant::now() < deadline {
        (sims, endpoint_total) = usage_sims(&http, &base_url, &token_hex).await?;
        if endpoint_total == device_total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let stats = fleet.stats();
    println!("{:<20} {:>14} {:>14} {:>14}", "iccid", "up_bytes", "down_bytes", "total_bytes");
    let mut mismatched = 0;
    for (iccid, t) in &truth {
        let (up, down) = sims.get(iccid).copied().unwrap_or((0, 0));
        let mark = if (up, down) == (t.up, t.down) { "" } else { "  MISMATCH" };
        if !mark.is_empty() {
            mismatched += 1;
        }
        println!("{iccid:<20} {up:>14} {down:>14} {:>14}{mark}", up + down);
    }
    println!(
        "devices={} hours={} reports={} published={published} dropped={} duplicated={} reboots={} power_cuts={} modem_resets={}",
        args.devices,
        args.hours,
        stats.reports,
        stats.dropped,
        stats.duplicated,
        stats.reboots,
        stats.power_cuts,
        stats.modem_resets
    );

    let _ = agent_stop_tx.send(());
    agent.await?.context("agent failed")?;
    let _ = cloud_stop_tx.send(());
    cloud.await?.context("endpoint failed")?;

    let ok = endpoint_total == device_total && mismatched == 0;
    println!(
        "verified: device_total_bytes={device_total} endpoint_total_bytes={endpoint_total} sims={} mismatched_sims={mismatched} {}",
        truth.len(),
        if ok { "OK" } else { "DIFFERENT" }
    );
    Ok(ok)
}

/// Per-SIM (up, down) and the grand total, as the endpoint reports them (every page).
async fn usage_sims(
    http: &reqwest::Client,
    base_url: &str,
    token: &str,
) -> Result<(BTreeMap<u64, (u64, u64)>, u64)> {
    let mut sims = BTreeMap::new();
    let mut total = 0u64;
    let mut after: Option<String> = None;
    loop {
        let mut url = format!("{base_url}/v1/usage/sims?limit=10000");
        if let Some(a) = &after {
            url.push_str(&format!("&after={a}"));
        }
        let v: serde_json::Value =
            http.get(url).bearer_auth(token).send().await?.error_for_status()?.json().await?;
        for s in v["sims"].as_array().context("usage reply has no sims")? {
            let iccid: u64 = s["iccid"].as_str().and_then(|x| x.parse().ok()).context("sim without iccid")?;
            let up = s["up_bytes"].as_u64().context("sim without up_bytes")?;
            let down = s["down_bytes"].as_u64().context("sim without down_bytes")?;
            sims.insert(iccid, (up, down));
        }
        total += v["total_bytes"].as_u64().context("usage reply has no total_bytes")?;
        match v["next_after"].as_str() {
            Some(a) => after = Some(a.to_owned()),
            None => return Ok((sims, total)),
        }
    }
}
