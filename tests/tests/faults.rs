//! The agent's fault suite, against real processes: devices → Mosquitto → `countersign-agent`
//! → fault proxy → `countersign-cloud`.
//!
//! Faults injected while at least 100 000 reports flow: kill -9 of the agent at random
//! moments (at least 50 times), a Mosquitto restart, the endpoint answering 503, 500 and
//! hanging past the agent's timeout, the agent's disk filling up (a tmpfs of its own, when
//! running as root: once with the free-space reserve off, so sled itself meets the full disk,
//! once with the reserve on, so the agent stops acking before sled does), and its database
//! file corrupted. The invariant checked after every phase and at the end:
//! every report the broker accepted is counted exactly once at the endpoint (exact per-SIM
//! totals), and the agent is forwarding again after every fault.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use countersign_e2e::broker::Mosquitto;
use countersign_e2e::faultproxy::{FaultProxy, Mode};
use countersign_e2e::fleet::{Faults, Fleet};
use countersign_e2e::publisher::Publisher;
use countersign_e2e::stack::{publish_all, AgentSetup, Cloud};
use countersign_testkit::disk::Tmpfs;
use countersign_testkit::free_port;
use countersign_testkit::procs::{run_ok, running_as_root};
use rand::{Rng, SeedableRng};

const DEVICES: usize = 2000;
const REPORTS_MIN: u64 = 100_000;
const KILLS_MIN: u32 = 50;
const DISK_BYTES: u64 = 64 * 1024 * 1024;

/// A small filesystem of the agent's own, so filling it harms nothing else.
struct SmallDisk {
    tmpfs: Tmpfs,
}

impl SmallDisk {
    fn mount(dir: &Path) -> Result<Option<SmallDisk>> {
        // Mounting needs root.
        if !running_as_root()? {
            eprintln!("FAULT SUITE: not root, so the full-disk fault is NOT injected (tests/run.sh runs as root in CI)");
            return Ok(None);
        }
        let tmpfs = Tmpfs::mount(dir, DISK_BYTES)
            .with_context(|| format!("running as root but cannot mount a tmpfs at {}", dir.display()))?;
        Ok(Some(SmallDisk { tmpfs }))
    }

    /// Where it is mounted.
    fn dir(&self) -> &Path {
        self.tmpfs.path()
    }

    /// Fills what is left with a file; returns its path.
    fn fill(&self) -> Result<PathBuf> {
        let filler = self.dir().join("filler");
        let mut f = std::fs::File::create(&filler)?;
        let chunk = vec![0u8; 1 << 20];
        use std::io::Write;
        while f.write_all(&chunk).is_ok() {}
        // Whatever fits of a last small write, so not even a page is left.
        let small = vec![0u8; 4096];
        while f.write_all(&small).is_ok() {}
        Ok(filler)
    }
}

/// What the endpoint must have once everything published so far is delivered: per
/// (meter, epoch) the highest `used` among the reports the broker accepted.
#[derive(Default)]
struct Ledger {
    best: std::collections::HashMap<(u64, u32), u64>,
}

impl Ledger {
    fn add(&mut self, out: &[countersign_e2e::fleet::Outgoing]) {
        for o in out {
            if let Ok((r, _)) = countersign_meter::Report::decode(&o.payload) {
                let used = r.used.up + r.used.down;
                let e = self.best.entry((r.meter_id, r.epoch)).or_insert(0);
                *e = (*e).max(used);
            }
        }
    }

    fn total(&self) -> u64 {
        self.best.values().sum()
    }
}

/// After a phase: the endpoint has exactly what the broker accepted so far.
async fn check_phase(name: &str, cloud: &Cloud, ledger: &Ledger, t: Instant) -> Result<()> {
    let (_, total) = cloud.wait_for_total(ledger.total(), Duration::from_secs(60)).await?;
    println!(
        "phase {name}: endpoint_bytes={total} expected={} after {} s",
        ledger.total(),
        t.elapsed().as_secs()
    );
    if total != ledger.total() {
        bail!(
            "after {name}: endpoint has {total} bytes, the broker accepted reports worth {}",
            ledger.total()
        );
    }
    Ok(())
}

struct Figures {
    kills: u32,
    broker_restarts: u32,
    endpoint_faults: u32,
    disk_full: u32,
    corruptions: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_report_counted_exactly_once_under_faults() -> Result<()> {
    let started = Instant::now();
    // COUNTERSIGN_KEEP_TMP=1 keeps logs and databases for a post-mortem.
    let tmp = tempfile::Builder::new()
        .prefix("countersign-faults")
        .disable_cleanup(std::env::var_os("COUNTERSIGN_KEEP_TMP").is_some())
        .tempdir()?;
    let dir = tmp.path();
    eprintln!("fault suite working directory: {}", dir.display());
    let mut rng = rand::rngs::StdRng::seed_from_u64(4242);
    let mut mqtt = Mosquitto::start(free_port()?, &dir.join("mosquitto")).await?;
    let cloud = Cloud::start(dir).await?;
    let proxy = FaultProxy::start(&cloud.url).await?;
    let mut fleet = Fleet::new(DEVICES, 10_000, 7, 1_780_000_000, Faults::default());

    // Keys: the gateway through the real command, the many meters through the admin API.
    let public =
        run_ok("countersign-agent", &["keygen", "--out", &dir.join("gateway.key").display().to_string()])?;
    let http = reqwest::Client::new();
    let public = countersign_protocol::keys::parse_public_key(public.trim())?;
    countersign_cloud::client::register_gateway(&http, &cloud.url, &cloud.token, 1, &public).await?;
    for (meter_id, key, _) in fleet.meters() {
        countersign_cloud::client::register_meter(&http, &cloud.url, &cloud.token, meter_id, &key).await?;
    }

    let disk = SmallDisk::mount(&dir.join("disk"))?;
    let data_dir = match &disk {
        Some(d) => d.dir().join("agent-data"),
        None => dir.join("agent-data"),
    };
    let setup = AgentSetup::write(
        dir,
        &data_dir,
        mqtt.port(),
        &proxy.url,
        // The free-space reserve starts off, so the first full-disk phase reaches sled.
        "[batch]\nlinger_ms = 20\nretry_delay_ms_min = 50\nretry_delay_ms_max = 500\nbatches_per_s_max = 200\n\
         [store]\ndisk_free_bytes_min = 0\n",
    )?;
    let mut agent = setup.start().await?;
    let mut devices = Publisher::connect("fault-devices", mqtt.port());
    let mut f = Figures { kills: 0, broker_restarts: 0, endpoint_faults: 0, disk_full: 0, corruptions: 0 };
    let mut published = 0u64;
    let mut ledger = Ledger::default();

    // Phase 1: kill -9 at random moments while reports flow.
    while f.kills < KILLS_MIN {
        let out = fleet.step();
        for o in &out {
            devices.publish(&o.topic, &o.payload).await?;
        }
        published += out.len() as u64;
        ledger.add(&out);
        ledger.add(&out);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..250))).await;
        agent.kill9();
        f.kills += 1;
        agent = setup.start().await?;
        devices.wait_acked(Duration::from_secs(60)).await?;
    }

    check_phase("kill -9", &cloud, &ledger, started).await?;

    // Phase 2: the endpoint refuses, fails and hangs for a while, in turn.
    for mode in [Mode::Unavailable, Mode::ServerError, Mode::Hang] {
        proxy.set(mode);
        f.endpoint_faults += 1;
        for _ in 0..3 {
            let out = fleet.step();
            publish_all(&mut devices, &out).await?;
            published += out.len() as u64;
            ledger.add(&out);
            ledger.add(&out);
            ledger.add(&out);
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        proxy.set(Mode::Pass);
        wait_drained(&setup, Duration::from_secs(60)).await.context("after endpoint fault")?;
    }

    check_phase("endpoint faults", &cloud, &ledger, started).await?;

    // Phase 3: the broker restarts (devices' publishes acked first: the invariant is about
    // what the broker accepted).
    let out = fleet.step();
    publish_all(&mut devices, &out).await?;
    published += out.len() as u64;
    ledger.add(&out);
    mqtt.restart().await?;
    f.broker_restarts += 1;
    for _ in 0..3 {
        let out = fleet.step();
        publish_all(&mut devices, &out).await?;
        published += out.len() as u64;
        ledger.add(&out);
        ledger.add(&out);
    }
    wait_drained(&setup, Duration::from_secs(60)).await.context("after broker restart")?;

    check_phase("broker restart", &cloud, &ledger, started).await?;

    // Phase 4: the disk fills up while reports keep coming; then space comes back. Uploads are
    // held back meanwhile, so the buffer must grow: sled reuses the space of delivered
    // reports, and a buffer that does not grow might never touch the full disk.
    if let Some(d) = &disk {
        // 4a: no reserve, so sled's own writes fail (ENOSPC), the store fault path.
        published += disk_full_phase(
            d,
            &proxy,
            &setup,
            &mut agent,
            &mut fleet,
            &mut devices,
            &mut ledger,
            "store_failing",
        )
        .await
        .context("full disk, reserve off")?;
        f.disk_full += 1;
        check_phase("disk full (sled meets it)", &cloud, &ledger, started).await?;
        // 4b: the default reserve, so the agent stops acking before sled meets the full disk.
        assert!(agent.terminate(), "agent did not stop cleanly before the reserve phase");
        let text = std::fs::read_to_string(&setup.config)?;
        std::fs::write(&setup.config, text.replace("disk_free_bytes_min = 0\n", ""))?;
        agent = setup.start().await?;
        published +=
            disk_full_phase(d, &proxy, &setup, &mut agent, &mut fleet, &mut devices, &mut ledger, "disk_low")
                .await
                .context("full disk, default reserve")?;
        f.disk_full += 1;
        let s = setup.status().await.context("no status after the reserve phase")?;
        assert_eq!(s["store_failing"], false, "the reserve should have kept sled off the full disk: {s}");
    } else {
        eprintln!(
            "FAULT SUITE: not root, so the full-disk phases are NOT run (tests/run.sh runs as root in CI)"
        );
    }

    check_phase("disk full", &cloud, &ledger, started).await?;

    // Phase 5: the database file is corrupted while the agent is stopped.
    assert!(agent.terminate(), "agent did not stop cleanly");
    corrupt(&data_dir.join("db"))?;
    f.corruptions += 1;
    agent = setup.start().await?;
    let s = setup.status().await.context("no status after corruption")?;
    let moved = s["corrupt_db_moved_to"].as_str().context("corruption not detected")?.to_owned();
    let h: serde_json::Value =
        reqwest::get(format!("http://127.0.0.1:{}/health", setup.status_port)).await?.json().await?;
    assert_eq!(h["healthy"], false, "health must say the database was moved aside: {h}");
    // Salvage runs on the damaged copy and sends what it finds; the endpoint's checks make
    // that harmless whatever the scan turns up.
    run_ok("countersign-agent", &["salvage", "--config", &setup.config_arg(), "--from", &moved, "--send"])?;

    check_phase("corruption", &cloud, &ledger, started).await?;

    // Phase 6: normal running until enough reports have flowed, then the final reports.
    while fleet.stats().reports < REPORTS_MIN {
        let out = fleet.step();
        publish_all(&mut devices, &out).await?;
        published += out.len() as u64;
        ledger.add(&out);
        ledger.add(&out);
    }
    let out = fleet.finish();
    publish_all(&mut devices, &out).await?;
    published += out.len() as u64;
    ledger.add(&out);

    let truth_total = fleet.truth_total_bytes();
    let (sims, total) = cloud.wait_for_total(truth_total, Duration::from_secs(180)).await?;
    let lost = truth_total.saturating_sub(total);
    let duplicated = total.saturating_sub(truth_total);
    let stats = fleet.stats();
    println!(
        "fault suite: reports={} published={published} kills={} broker_restarts={} endpoint_faults={} disk_full={} \
         corruptions={} lost_bytes={lost} duplicated_bytes={duplicated} seconds={}",
        stats.reports,
        f.kills,
        f.broker_restarts,
        f.endpoint_faults,
        f.disk_full,
        f.corruptions,
        started.elapsed().as_secs()
    );
    assert_eq!(sims, fleet.truth_per_iccid(), "per-SIM totals differ; agent log {}", setup.log.display());
    assert_eq!((lost, duplicated), (0, 0));
    assert!(stats.reports >= REPORTS_MIN && f.kills >= KILLS_MIN);
    wait_drained(&setup, Duration::from_secs(30)).await.context("forwarding at the end")?;
    assert!(agent.terminate(), "agent did not stop cleanly at the end");
    devices.close().await;
    Ok(())
}

/// Fills the agent's disk while reports keep coming and uploads are refused, until the agent's
/// status shows `flag`; then frees the space and waits until everything is delivered.
#[allow(clippy::too_many_arguments)]
async fn disk_full_phase(
    d: &SmallDisk,
    proxy: &FaultProxy,
    setup: &AgentSetup,
    agent: &mut countersign_testkit::procs::Proc,
    fleet: &mut Fleet,
    devices: &mut Publisher,
    ledger: &mut Ledger,
    flag: &str,
) -> Result<u64> {
    proxy.set(Mode::Unavailable);
    let filler = d.fill()?;
    let mut published = 0u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut noticed = false;
    while !noticed && Instant::now() < deadline {
        let out = fleet.step();
        for o in &out {
            devices.publish(&o.topic, &o.payload).await?;
        }
        published += out.len() as u64;
        ledger.add(&out);
        tokio::time::sleep(Duration::from_millis(300)).await;
        noticed = setup.status().await.is_some_and(|s| s[flag] == true);
    }
    if !noticed {
        bail!("the agent never reported {flag} on the full disk: {}", tail(&setup.log));
    }
    let h: serde_json::Value =
        reqwest::get(format!("http://127.0.0.1:{}/health", setup.status_port)).await?.json().await?;
    if h["healthy"] != false {
        bail!("health must report the full disk: {h}");
    }
    if !agent.is_running() {
        bail!("the agent died on a full disk: {}", tail(&setup.log));
    }
    std::fs::remove_file(filler)?;
    proxy.set(Mode::Pass);
    devices.wait_acked(Duration::from_secs(120)).await?;
    wait_drained(setup, Duration::from_secs(90)).await.context("after the disk was freed")?;
    Ok(published)
}

/// Waits until the agent is connected and has nothing left to send.
async fn wait_drained(setup: &AgentSetup, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = setup.status().await {
            if s["broker_connected"] == true && s["buffered_reports"] == 0 && s["store_failing"] == false {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("agent not drained: {s}\n{}", tail(&setup.log));
            }
        } else if Instant::now() > deadline {
            bail!("agent not answering: {}", tail(&setup.log));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Flips bits all over a file, the way failing storage does.
fn corrupt(file: &Path) -> Result<()> {
    let mut bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    for (i, b) in bytes.iter_mut().enumerate() {
        if i % 7 == 3 {
            *b ^= 0x5a;
        }
    }
    std::fs::write(file, bytes)?;
    Ok(())
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
