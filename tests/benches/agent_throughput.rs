//! Agent durable ingest against a bare QoS 1 subscriber, on one local Mosquitto.
//!
//! `cargo bench -p countersign-e2e --bench agent_throughput` (needs `mosquitto` installed).
//!
//! For each consumer the broker first queues the whole load (100 000 reports from 10 000
//! distinct meters) for the consumer's persistent session; then the consumer starts in a
//! child process and drains it. Rates are measured from the first to the last report
//! consumed, so neither the publisher nor start-up is in the figure:
//!
//! - (a) `subscriber`: rumqttc, QoS 1, counts and acks, nothing else.
//! - (b) `agent`: the real agent pipeline; a report counts once it is flushed to sled and
//!   acked. Its endpoint is unreachable, so the figure is the durable ingest path alone
//!   (uploads back off and cost next to nothing).
//!
//! Each child also reports its resident memory at the end and its CPU time per 1000 reports.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use countersign_e2e::broker::Mosquitto;
use countersign_e2e::publisher::Publisher;
use countersign_meter::DeviceTime;
use countersign_testkit::free_port;
use countersign_testkit::ReportBuilder;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const REPORTS: u64 = 100_000;
const METERS: u64 = 10_000;
/// Rounds of (subscriber, agent), unless BENCH_ROUNDS says otherwise.
const ROUNDS: usize = 5;
const CLIENT_ID: &str = "bench-consumer";
const TOPIC: &str = "countersign/v1/reports/+";

fn main() -> Result<()> {
    // Child modes: the parent re-runs this binary as the consumer under test.
    match std::env::var("BENCH_ROLE").as_deref() {
        Ok("subscriber") => return child(Role::Subscriber),
        Ok("agent") => return child(Role::Agent),
        _ => {}
    }
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return Ok(()); // `cargo test --benches` probes; the bench itself needs a broker.
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(parent())
}

#[derive(Clone, Copy)]
enum Role {
    Subscriber,
    Agent,
}

#[derive(Debug, serde::Deserialize)]
struct Outcome {
    reports: u64,
    seconds: f64,
    rss_kib: u64,
    cpu_ms: u64,
}

async fn parent() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let port = free_port()?;
    let extra = std::env::var("BENCH_MOSQUITTO_EXTRA").unwrap_or_default().replace("\\n", "\n");
    let _mqtt = Mosquitto::start_with(port, &tmp.path().join("mosquitto"), &extra).await?;
    let payloads = load();
    // Rounds alternate the two consumers, so drift in the machine's load hits both alike;
    // the figures are medians over the rounds.
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(ROUNDS);
    let mut results: [Vec<Outcome>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for (i, role) in ["subscriber", "agent"].into_iter().enumerate() {
            register_session(port).await?;
            let mut p = Publisher::connect(&format!("bench-pub-{role}-{round}"), port);
            for (topic, payload) in &payloads {
                p.publish(topic, payload).await?;
            }
            p.wait_acked(Duration::from_secs(300)).await?;
            p.close().await;
            // A fresh database each round: the agent starts empty, like the subscriber.
            let dir = tmp.path().join(format!("{role}-{round}"));
            std::fs::create_dir_all(&dir)?;
            let out = run_child(role, port, &dir)?;
            println!(
                "round {round} {role:>10}: {:>8.0} reports/s  ({} reports in {:.2} s), RSS {:.1} MiB, CPU {:.1} ms per 1000 reports",
                out.reports as f64 / out.seconds,
                out.reports,
                out.seconds,
                out.rss_kib as f64 / 1024.0,
                out.cpu_ms as f64 * 1000.0 / out.reports as f64
            );
            results[i].push(out);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let rate = |o: &Outcome| o.reports as f64 / o.seconds;
    let sub = median(&mut results[0].iter().map(rate).collect());
    let agent = median(&mut results[1].iter().map(rate).collect());
    let rss = median(&mut results[1].iter().map(|o| o.rss_kib as f64 / 1024.0).collect());
    let cpu = median(&mut results[1].iter().map(|o| o.cpu_ms as f64 * 1000.0 / o.reports as f64).collect());
    println!("median of {rounds} rounds: subscriber {sub:.0} reports/s, agent {agent:.0} reports/s durable");
    println!("agent durable rate / bare subscriber rate = {:.1}% (target >= 90%)", agent / sub * 100.0);
    println!("agent RSS with {METERS} distinct meters: {rss:.1} MiB (target <= 32 MiB)");
    println!("agent CPU: {cpu:.2} ms per 1000 reports");
    Ok(())
}

/// 100 000 reports, 10 per meter, as devices would publish them.
fn load() -> Vec<(String, Vec<u8>)> {
    (0..REPORTS)
        .map(|i| {
            let meter_id = 1 + i % METERS;
            let seq = (i / METERS) as u32;
            let time = DeviceTime::uptime(seq * 3600).expect("valid time");
            let report = ReportBuilder::new(meter_id, seq, 8_988_228_066_600_000_000 + meter_id, time)
                .epoch(1)
                .base(30 << 20, 12 << 20)
                .used(u64::from(seq) * 40_000, u64::from(seq) * 90_000)
                .encode(&[5u8; 32]);
            (format!("countersign/v1/reports/{meter_id}"), report)
        })
        .collect()
}

/// Creates the consumer's persistent session with its subscription, so the broker queues
/// the load for it.
async fn register_session(port: u16) -> Result<()> {
    let mut opts = MqttOptions::new(CLIENT_ID, "127.0.0.1", port);
    opts.set_clean_session(false);
    let (client, mut el) = AsyncClient::new(opts, 16);
    client.subscribe(TOPIC, QoS::AtLeastOnce).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout(Duration::from_secs(1), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
            _ if Instant::now() > deadline => bail!("no SUBACK from the broker"),
            _ => {}
        }
    }
    client.disconnect().await?;
    let _ = tokio::time::timeout(Duration::from_secs(1), el.poll()).await;
    Ok(())
}

fn run_child(role: &str, port: u16, dir: &std::path::Path) -> Result<Outcome> {
    let mut child = Command::new(std::env::current_exe()?)
        .env("BENCH_ROLE", role)
        .env("BENCH_PORT", port.to_string())
        .env("BENCH_DIR", dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start the consumer")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut last = String::new();
    for line in BufReader::new(stdout).lines() {
        last = line?;
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{role} child failed");
    }
    serde_json::from_str(&last).with_context(|| format!("{role} child said: {last}"))
}

fn proc_self(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU time of this process, in ms (clock ticks are 100 Hz on Linux).
fn cpu_ms() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<u64> = after.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    // Fields after the command name: state is not numeric, so utime/stime are at 10 and 11.
    (f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0)) * 10
}

fn child(role: Role) -> Result<()> {
    // BENCH_LOG=<file> writes the agent's log there, to see inside a run.
    if let Ok(path) = std::env::var("BENCH_LOG") {
        let file = std::fs::File::create(path)?;
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("countersign_agent=debug,rumqttc=debug"))
            .with_writer(std::sync::Mutex::new(file))
            .with_ansi(false)
            .init();
    }
    let port: u16 = std::env::var("BENCH_PORT")?.parse()?;
    let dir = std::path::PathBuf::from(std::env::var("BENCH_DIR")?);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (seconds, cpu) = rt.block_on(async {
        match role {
            Role::Subscriber => subscriber(port).await,
            Role::Agent => agent(port, &dir).await,
        }
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let out = serde_json::json!({"reports": REPORTS, "seconds": seconds, "rss_kib": proc_self("VmRSS:"), "cpu_ms": cpu});
    println!("{out}");
    Ok(())
}

async fn subscriber(port: u16) -> Result<(f64, u64)> {
    let mut opts = MqttOptions::new(CLIENT_ID, "127.0.0.1", port);
    opts.set_clean_session(false).set_max_packet_size(1 << 20, 1 << 20);
    let (_client, mut el) = AsyncClient::new(opts, 4096);
    let mut n = 0u64;
    let mut first: Option<(Instant, u64)> = None;
    while n < REPORTS {
        if let Event::Incoming(Packet::Publish(_)) = el.poll().await? {
            if first.is_none() {
                first = Some((Instant::now(), cpu_ms()));
            }
            n += 1;
        }
    }
    let (t0, c0) = first.context("nothing received")?;
    // Let the last acks leave.
    let _ = tokio::time::timeout(Duration::from_millis(200), el.poll()).await;
    Ok((t0.elapsed().as_secs_f64(), cpu_ms().saturating_sub(c0)))
}

async fn agent(port: u16, dir: &std::path::Path) -> Result<(f64, u64)> {
    let key = dir.join("gateway.key");
    countersign_protocol::keys::write_secret(&key, &countersign_protocol::keys::generate_meter_key())?;
    let config = countersign_agent::AgentConfig::from_toml_str(&format!(
        "gateway_id = 1\ngateway_key_file = \"{}\"\ndata_dir = \"{}\"\nendpoint_url = \"http://127.0.0.1:1\"\n\
         [mqtt]\nport = {port}\nclient_id = \"{CLIENT_ID}\"\n[http]\nlisten = \"\"\n[batch]\nretry_delay_ms_min = 1000\n{}",
        key.display(),
        dir.join("agent-data").display(),
        std::env::var("BENCH_AGENT_TOML").unwrap_or_default().replace("\\n", "\n"),
    ))?;
    let status = Arc::new(countersign_agent::AgentStatus::default());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(countersign_agent::run_observed(config, status.clone(), async move {
        let _ = stop_rx.await;
    }));
    let mut first: Option<(Instant, u64)> = None;
    loop {
        let n = status.reports_committed.load(Ordering::Relaxed);
        if n > 0 && first.is_none() {
            first = Some((Instant::now(), cpu_ms()));
        }
        if n >= REPORTS {
            break;
        }
        if task.is_finished() {
            bail!("agent stopped early");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (t0, c0) = first.context("nothing committed")?;
    let result = (t0.elapsed().as_secs_f64(), cpu_ms().saturating_sub(c0));
    let _ = stop_tx.send(());
    task.await?.context("agent failed")?;
    Ok(result)
}
