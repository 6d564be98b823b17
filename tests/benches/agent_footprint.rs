//! The gateway agent's memory and a long outage, measured from outside on the real
//! binaries: `countersign-agent run` and `countersign-cloud serve` as processes, a private
//! Mosquitto, resident memory read from `/proc/<pid>/status` of the agent.
//!
//! ```text
//! cargo build --release -p countersign-agent -p countersign-cloud --bins
//! cargo bench -p countersign-e2e --bench agent_footprint -- memory   # issue 16 item 5
//! cargo bench -p countersign-e2e --bench agent_footprint -- outage   # issue 16 item 6 (root)
//! ```
//!
//! `memory`, for each fleet size in `BENCH_METERS` (default `1000,10000,100000`):
//! the endpoint is down while the fleet publishes `BENCH_BACKLOG` reports (default 300 000)
//! in rounds of `BENCH_ROUND` (default 100 000); the peak RSS of each round is printed as the
//! backlog grows. Then the endpoint comes back and the backlog drains (peak RSS while
//! draining), then one more round flows through with the link up (steady state). The
//! endpoint must have stored every report exactly once.
//!
//! `outage`: a 7-day outage at 10 000 meters × 3 reports a day (210 000 reports) with the
//! agent's data directory on a 64 MiB tmpfs (mounting needs root), default configuration.
//! Prints bytes on disk per buffered report, whether the agent had to hold reports back
//! (disk reserve: the broker keeps them), the time to drain at the default pacing once the
//! endpoint is back, and the endpoint's stored/duplicate counts.
//!
//! `BENCH_AGENT_BIN` runs another agent binary (e.g. a build to compare with). The agent's
//! configuration can be extended with `BENCH_AGENT_TOML` (TOML sections, `\n` for newlines).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use countersign_e2e::broker::Mosquitto;
use countersign_e2e::publisher::Publisher;
use countersign_testkit::disk::Tmpfs;
use countersign_testkit::procs::{run_ok, Exe, Proc};
use countersign_testkit::{free_port, network_time, now_s, wait_for_port, ReportBuilder};

/// The key every simulated meter tags with (each meter is registered with it).
const METER_KEY: [u8; 32] = [5u8; 32];
const ICCID_BASE: u64 = 8_988_228_066_600_000_000;
/// How often the agent's resident memory is sampled.
const SAMPLE_MS: u64 = 20;
/// Concurrent meter registrations while setting up.
const REGISTER_CONCURRENCY: usize = 16;
/// Longest wait for the agent to commit a round or drain its buffer.
const PHASE_TIMEOUT_S: u64 = 1800;
/// Outage scenario: fleet, reports per meter and day, days (`BENCH_OUTAGE_DAYS`), data
/// partition.
const OUTAGE_METERS: u64 = 10_000;
const OUTAGE_REPORTS_PER_DAY: u64 = 3;
const OUTAGE_DAYS: u64 = 7;
const OUTAGE_PARTITION_BYTES: u64 = 64 * 1024 * 1024;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list" || a == "--test") {
        return Ok(()); // `cargo test --benches` probes; the bench needs Mosquitto and time.
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    if args.iter().any(|a| a == "outage") {
        rt.block_on(outage())
    } else {
        let meters: Vec<u64> = std::env::var("BENCH_METERS")
            .unwrap_or_else(|_| "1000,10000,100000".into())
            .split(',')
            .map(|m| m.trim().parse().context("BENCH_METERS: comma-separated counts"))
            .collect::<Result<_>>()?;
        let backlog = env_u64("BENCH_BACKLOG", 300_000)?;
        let round = env_u64("BENCH_ROUND", 100_000)?;
        let mut table = Vec::new();
        for m in meters {
            table.push(rt.block_on(memory(m, backlog, round))?);
        }
        println!("\nsummary (peak RSS of the agent, MiB):");
        println!(
            "{:>8} | {:>14} | {:>8} | {:>12} | {:>7}",
            "meters", "outage rounds", "drain", "steady state", "VmHWM"
        );
        for r in table {
            let rounds: Vec<String> = r.rounds.iter().map(|k| format!("{:.1}", mib(*k))).collect();
            println!(
                "{:>8} | {:>14} | {:>8.1} | {:>12.1} | {:>7.1}",
                r.meters,
                rounds.join("/"),
                mib(r.drain),
                mib(r.steady),
                mib(r.hwm)
            );
        }
        Ok(())
    }
}

fn env_u64(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v.parse().with_context(|| format!("{name}: a number")),
        Err(_) => Ok(default),
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Peak figures of one fleet size, KiB.
struct MemoryRun {
    meters: u64,
    rounds: Vec<u64>,
    drain: u64,
    steady: u64,
    hwm: u64,
}

/// A `/proc/<pid>/status` field in KiB.
fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()
}

/// Samples the agent's VmRSS on its own thread; `take_peak` returns the peak since the last
/// call.
struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(kib) = proc_status_kib(pid, "VmRSS:") {
                    p.fetch_max(kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(SAMPLE_MS));
            }
        });
        Self { peak, stop }
    }

    fn take_peak(&self) -> u64 {
        self.peak.swap(0, Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// An endpoint process that can be stopped and started again on the same port.
struct Endpoint {
    exe: Exe,
    config: PathBuf,
    log: PathBuf,
    port: u16,
    token: String,
    proc: Option<Proc>,
}

impl Endpoint {
    async fn start_new(dir: &Path) -> Result<Self> {
        let token_file = dir.join("admin.token");
        run_ok("countersign-cloud", &["keygen-token", "--out", &token_file.display().to_string()])?;
        let token = std::fs::read_to_string(&token_file)?.trim().to_owned();
        let port = free_port()?;
        let config = dir.join("cloud.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nadmin_token_file = \"{}\"\n",
                dir.join("cloud-data").display(),
                token_file.display()
            ),
        )?;
        let mut e = Endpoint {
            exe: Exe::workspace("countersign-cloud")?,
            config,
            log: dir.join("cloud.log"),
            port,
            token,
            proc: None,
        };
        e.start().await?;
        Ok(e)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn start(&mut self) -> Result<()> {
        let p = Proc::spawn_exe(
            &self.exe,
            &["serve", "--config", &self.config.display().to_string()],
            &self.log,
        )?;
        if !wait_for_port(self.port, Duration::from_secs(30)).await {
            bail!("endpoint did not listen: {}", p.log_text());
        }
        self.proc = Some(p);
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate();
        }
    }

    /// (stored, duplicate, rejected) records since this endpoint process started.
    async fn records(&self) -> Result<(u64, u64, u64)> {
        let text = reqwest::Client::new()
            .get(format!("{}/metrics", self.url()))
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        let get =
            |o: &str| metric(&text, &format!("countersign_records_total{{outcome=\"{o}\"}}")).unwrap_or(0);
        Ok((get("stored"), get("duplicate"), get("rejected")))
    }

    /// Registers the gateway (its key made by `countersign-agent keygen`) and meters
    /// `1..=meters`, all with [`METER_KEY`].
    async fn register(&self, gateway_key: &Path, meters: u64) -> Result<()> {
        let public = run_ok("countersign-agent", &["keygen", "--out", &gateway_key.display().to_string()])?;
        let http = reqwest::Client::new();
        let key = ed25519_dalek::VerifyingKey::from_bytes(
            &<[u8; 32]>::try_from(hex::decode(public.trim())?.as_slice()).context("public key length")?,
        )?;
        countersign_cloud::client::register_gateway(&http, &self.url(), &self.token, 1, &key).await?;
        let next = Arc::new(AtomicU64::new(1));
        let mut tasks = Vec::new();
        for _ in 0..REGISTER_CONCURRENCY {
            let (http, url, token, next) = (http.clone(), self.url(), self.token.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let m = next.fetch_add(1, Ordering::Relaxed);
                    if m > meters {
                        return anyhow::Ok(());
                    }
                    countersign_cloud::client::register_meter(&http, &url, &token, m, &METER_KEY)
                        .await
                        .with_context(|| format!("registering meter {m}"))?;
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        Ok(())
    }
}

/// The value of an unlabelled or fully labelled Prometheus line `name value`.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The agent under test, with its status listener.
struct Agent {
    proc: Proc,
    status_port: u16,
}

impl Agent {
    fn start(dir: &Path, data_dir: &Path, mqtt_port: u16, endpoint_url: &str) -> Result<Self> {
        let status_port = free_port()?;
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "gateway_id = 1\ngateway_key_file = \"{}\"\ndata_dir = \"{}\"\nendpoint_url = \"{endpoint_url}\"\n\
                 [mqtt]\nport = {mqtt_port}\nclient_id = \"footprint-agent\"\n\
                 [http]\nlisten = \"127.0.0.1:{status_port}\"\n{}",
                dir.join("gateway.key").display(),
                data_dir.display(),
                std::env::var("BENCH_AGENT_TOML").unwrap_or_default().replace("\\n", "\n"),
            ),
        )?;
        let exe = match std::env::var("BENCH_AGENT_BIN") {
            Ok(path) => Exe::with_runner(&[], path)?,
            Err(_) => Exe::workspace("countersign-agent")?,
        };
        let log = dir.join("agent.log");
        let proc = Proc::spawn_exe(&exe, &["run", "--config", &config.display().to_string()], &log)?;
        Ok(Self { proc, status_port })
    }

    fn pid(&self) -> Result<u32> {
        self.proc.pid().context("agent is not running")
    }

    async fn metrics(&mut self) -> Result<String> {
        if !self.proc.is_running() {
            bail!("agent exited: {}", self.proc.log_text());
        }
        Ok(reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/metrics", self.status_port))
            .timeout(Duration::from_secs(5))
            .send()
            .await?
            .text()
            .await?)
    }

    async fn value(&mut self, name: &str) -> Result<u64> {
        let text = self.metrics().await?;
        metric(&text, &format!("countersign_agent_{name}")).with_context(|| format!("no {name} in /metrics"))
    }

    async fn wait_subscribed(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(1) = self.value("broker_connected").await {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "agent did not subscribe: {}", self.proc.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `name` reaches at least (`at_least`) or at most (`!at_least`) `target`.
    async fn wait_for(&mut self, name: &str, target: u64, at_least: bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(PHASE_TIMEOUT_S);
        loop {
            let v = self.value(name).await?;
            if (at_least && v >= target) || (!at_least && v <= target) {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "{name} is {v}, waited for {target}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Report `k` (0-based) of a fleet of `meters`: meter `1 + k % meters`, its seq `k / meters`,
/// device time `spacing_s` apart per seq ending about now.
fn report(k: u64, meters: u64, seqs: u64, spacing_s: u64) -> (String, Vec<u8>) {
    let meter_id = 1 + k % meters;
    let seq = k / meters;
    let t = now_s() - (seqs - seq) * spacing_s;
    let payload = ReportBuilder::new(
        meter_id,
        u32::try_from(seq).expect("seq fits"),
        ICCID_BASE + meter_id,
        network_time(t),
    )
    .epoch(1)
    .base(30 << 20, 12 << 20)
    .used(seq * 40_000, seq * 90_000)
    .encode(&METER_KEY);
    (format!("countersign/v1/reports/{meter_id}"), payload)
}

async fn publish_range(
    port: u16,
    name: &str,
    range: std::ops::Range<u64>,
    meters: u64,
    seqs: u64,
    spacing_s: u64,
) -> Result<()> {
    let mut p = Publisher::connect(name, port);
    for k in range {
        let (topic, payload) = report(k, meters, seqs, spacing_s);
        p.publish(&topic, &payload).await?;
    }
    p.wait_acked(Duration::from_secs(600)).await?;
    p.close().await;
    Ok(())
}

async fn memory(meters: u64, backlog: u64, round: u64) -> Result<MemoryRun> {
    println!("\n== {meters} meters: backlog of {backlog} reports in rounds of {round}, endpoint down ==");
    let tmp = tempfile::tempdir()?;
    let mqtt_port = free_port()?;
    let _mqtt = Mosquitto::start(mqtt_port, &tmp.path().join("mosquitto")).await?;
    let mut endpoint = Endpoint::start_new(tmp.path()).await?;
    let t = Instant::now();
    endpoint.register(&tmp.path().join("gateway.key"), meters).await?;
    println!("registered {meters} meters in {:.1} s", t.elapsed().as_secs_f64());
    endpoint.stop();

    let mut agent = Agent::start(tmp.path(), &tmp.path().join("agent-data"), mqtt_port, &endpoint.url())?;
    agent.wait_subscribed().await?;
    let pid = agent.pid()?;
    let sampler = RssSampler::start(pid);
    println!("idle after start: RSS {:.1} MiB", mib(proc_status_kib(pid, "VmRSS:").unwrap_or(0)));
    let total = backlog + round;
    // Seqs per meter over the whole run, so device times stay in order and end about now.
    let seqs = total.div_ceil(meters);
    let spacing_s = 60;
    let mut rounds = Vec::new();
    let mut published = 0;
    while published < backlog {
        let n = round.min(backlog - published);
        let t = Instant::now();
        publish_range(
            mqtt_port,
            &format!("pub-{published}"),
            published..published + n,
            meters,
            seqs,
            spacing_s,
        )
        .await?;
        published += n;
        agent.wait_for("reports_committed_total", published, true).await?;
        let peak = sampler.take_peak();
        let buffered = agent.value("buffered_reports").await?;
        println!(
            "outage round: {buffered:>7} buffered, peak RSS {:.1} MiB, RSS now {:.1} MiB ({:.1} s)",
            mib(peak),
            mib(proc_status_kib(pid, "VmRSS:").unwrap_or(0)),
            t.elapsed().as_secs_f64()
        );
        rounds.push(peak);
    }

    endpoint.start().await?;
    let back = Instant::now();
    agent.wait_for("buffered_reports", 0, false).await?;
    let drain = sampler.take_peak();
    println!(
        "drained {backlog} reports {:.1} s after the endpoint returned, peak RSS {:.1} MiB",
        back.elapsed().as_secs_f64(),
        mib(drain)
    );

    let t = Instant::now();
    publish_range(mqtt_port, "pub-steady", backlog..total, meters, seqs, spacing_s).await?;
    agent.wait_for("reports_committed_total", total, true).await?;
    agent.wait_for("buffered_reports", 0, false).await?;
    let steady = sampler.take_peak();
    println!(
        "steady state: {round} reports through in {:.1} s, peak RSS {:.1} MiB",
        t.elapsed().as_secs_f64(),
        mib(steady)
    );
    let hwm = proc_status_kib(pid, "VmHWM:").unwrap_or(0);
    let (stored, duplicate, rejected) = endpoint.records().await?;
    println!(
        "endpoint: {stored} stored, {duplicate} duplicate, {rejected} rejected; agent VmHWM {:.1} MiB",
        mib(hwm)
    );
    ensure!(stored == total && rejected == 0, "the endpoint must store all {total} reports once");
    Ok(MemoryRun { meters, rounds, drain, steady, hwm })
}

/// Apparent size of the files under `dir` (what the filesystem holds for them), bytes.
fn disk_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += disk_bytes(&e.path()),
                Ok(m) => {
                    use std::os::unix::fs::MetadataExt;
                    total += m.blocks() * 512;
                }
                Err(_) => {}
            }
        }
    }
    total
}

async fn outage() -> Result<()> {
    let meters = OUTAGE_METERS;
    let days = env_u64("BENCH_OUTAGE_DAYS", OUTAGE_DAYS)?;
    let total = meters * OUTAGE_REPORTS_PER_DAY * days;
    println!(
        "== outage: {days} days × {meters} meters × {OUTAGE_REPORTS_PER_DAY} reports/day = {total} reports, data on a {} MiB tmpfs ==",
        OUTAGE_PARTITION_BYTES >> 20
    );
    let tmp = tempfile::tempdir()?;
    let disk = Tmpfs::mount(&tmp.path().join("data"), OUTAGE_PARTITION_BYTES)
        .context("mounting the data partition (run as root)")?;
    let data_dir = disk.path().join("agent");
    let mqtt_port = free_port()?;
    let _mqtt = Mosquitto::start(mqtt_port, &tmp.path().join("mosquitto")).await?;
    let mut endpoint = Endpoint::start_new(tmp.path()).await?;
    endpoint.register(&tmp.path().join("gateway.key"), meters).await?;
    endpoint.stop();

    let mut agent = Agent::start(tmp.path(), &data_dir, mqtt_port, &endpoint.url())?;
    agent.wait_subscribed().await?;
    let sampler = RssSampler::start(agent.pid()?);
    let seqs = OUTAGE_REPORTS_PER_DAY * days;
    let spacing_s = 24 * 3600 / OUTAGE_REPORTS_PER_DAY;
    let t = Instant::now();
    // A day at a time, as the outage goes on.
    let per_day = meters * OUTAGE_REPORTS_PER_DAY;
    for day in 0..days {
        let range = day * per_day..(day + 1) * per_day;
        publish_range(mqtt_port, &format!("pub-day-{day}"), range, meters, seqs, spacing_s).await?;
        // Wait until the agent took the day or holds (disk reserve reached).
        let deadline = Instant::now() + Duration::from_secs(PHASE_TIMEOUT_S);
        loop {
            let committed = agent.value("reports_committed_total").await?;
            let held = agent.value("disk_low").await? == 1 || agent.value("over_quota").await? == 1;
            if committed >= (day + 1) * per_day || held {
                break;
            }
            ensure!(Instant::now() < deadline, "day {day} not committed");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Let a hold settle before reading the figures.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let buffered = agent.value("buffered_reports").await?;
        let on_disk = disk_bytes(&data_dir);
        let free = countersign_agent::store::free_bytes(disk.path())?;
        println!(
            "day {}: {buffered:>7} buffered, {:.1} MiB on disk ({:.0} B per report), {:.1} MiB free, disk_low {}, logical {:.1} MiB",
            day + 1,
            on_disk as f64 / 1048576.0,
            on_disk as f64 / buffered.max(1) as f64,
            free as f64 / 1048576.0,
            agent.value("disk_low").await?,
            agent.value("buffer_bytes").await? as f64 / 1048576.0,
        );
    }
    let committed = agent.value("reports_committed_total").await?;
    println!(
        "outage published in {:.1} s; agent committed {committed} of {total} (the broker holds the rest); peak RSS {:.1} MiB",
        t.elapsed().as_secs_f64(),
        mib(sampler.take_peak())
    );

    endpoint.start().await?;
    let back = Instant::now();
    // The agent finds the endpoint back at its next retry (backoff up to
    // `batch.retry_delay_ms_max`); the drain proper starts with the first answered batch.
    agent.wait_for("batches_delivered_total", 1, true).await?;
    let first_s = back.elapsed().as_secs_f64();
    agent.wait_for("reports_committed_total", total, true).await?;
    agent.wait_for("buffered_reports", 0, false).await?;
    let drain_s = back.elapsed().as_secs_f64();
    let batches = agent.value("batches_delivered_total").await?;
    let (stored, duplicate, rejected) = endpoint.records().await?;
    println!(
        "endpoint back: first batch answered after {first_s:.1} s (retry backoff), all drained after {drain_s:.1} s: \
         {:.1} s of draining, {batches} batches at the default pacing; peak RSS {:.1} MiB",
        drain_s - first_s,
        mib(sampler.take_peak())
    );
    println!("endpoint: {stored} stored, {duplicate} duplicate, {rejected} rejected of {total} published");
    ensure!(stored == total && rejected == 0, "the endpoint must store all {total} reports once");
    Ok(())
}
