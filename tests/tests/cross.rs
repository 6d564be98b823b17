//! The cross-built gateway agents, run for real under QEMU user emulation: simulated devices →
//! a private Mosquitto (host) → `countersign-agent` for aarch64 / armv7 under `qemu-aarch64` /
//! `qemu-arm` → `countersign-cloud` (host). Checks exact totals per SIM, a kill -9 of the agent
//! mid-run, a clean SIGTERM, and `inspect` (opens the sled database, prints JSON) on the
//! emulated target. The same chain runs for the glibc builds and for the static musl builds
//! (the `.ipk` binaries; the x86_64 one runs natively, the ARM ones under QEMU without `-L`:
//! a static binary needs no loader or libraries from a sysroot).
//!
//! The binaries come from `cross/build.sh` (`--musl` for the static ones; profile
//! `release-gateway`, or the profile named by `COUNTERSIGN_CROSS_PROFILE`). Without them these
//! tests skip with a loud message, unless `COUNTERSIGN_REQUIRE_CROSS=1` (set by `tests/run.sh`,
//! which builds them first): then a missing binary or emulator is a failure. A musl target is
//! required only when the Rust toolchain has its standard library (`cross/build.sh` installs it
//! wherever the rustup distribution server offers it, and skips the target loudly otherwise).

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use countersign_e2e::broker::Mosquitto;
use countersign_e2e::fleet::{Faults, Fleet};
use countersign_e2e::publisher::Publisher;
use countersign_e2e::stack::{publish_all, Cloud};
use countersign_testkit::free_port;
use countersign_testkit::procs::{target_dir, Exe, Proc};

/// Set to 1 to turn a missing cross build into a failure instead of a skip.
const REQUIRE_ENV: &str = "COUNTERSIGN_REQUIRE_CROSS";
/// The cargo profile the cross agents were built with.
const PROFILE_ENV: &str = "COUNTERSIGN_CROSS_PROFILE";
const DEFAULT_PROFILE: &str = "release-gateway";

/// Everything under QEMU is slower: generous deadlines.
const START_TIMEOUT: Duration = Duration::from_secs(90);
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(120);

/// The cross-built agent for `triple` behind its QEMU runner, or `None` (after a loud
/// message) when it was not built and the run does not require it.
/// `in_ci`: whether `COUNTERSIGN_REQUIRE_CROSS=1` makes it required.
fn cross_agent(triple: &str, runner: &[&str], in_ci: bool) -> Result<Option<Exe>> {
    let profile = std::env::var(PROFILE_ENV).unwrap_or_else(|_| DEFAULT_PROFILE.to_owned());
    let path = target_dir()?.join(triple).join(&profile).join("countersign-agent");
    let required = in_ci && std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1");
    match Exe::with_runner(runner, &path) {
        Ok(exe) => Ok(Some(exe)),
        Err(e) if required => Err(e.context(format!(
            "{REQUIRE_ENV}=1 but the {triple} agent cannot run; build it with cross/build.sh"
        ))),
        Err(e) => {
            // Straight to stderr: libtest captures eprintln!, and a skip must be seen.
            let _ = writeln!(
                std::io::stderr(),
                "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
                 !!! SKIPPED: the {triple} agent under QEMU ({e:#}).\n\
                 !!! Build it with cross/build.sh (tests/run.sh does, and then requires it).\n\
                 !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
            );
            Ok(None)
        }
    }
}

/// Starts the agent and waits until it is subscribed (fresh session) or has resumed its
/// session.
async fn start_agent(agent: &Exe, config: &str, log: &Path) -> Result<Proc> {
    let count = |needle: &str| std::fs::read_to_string(log).map(|s| s.matches(needle).count()).unwrap_or(0);
    let (subscribed, connected) = (count("subscribed"), count("connected to broker"));
    let p = Proc::spawn_exe(agent, &["run", "--config", config], log)?;
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        let text = p.log_text();
        if text.matches("subscribed").count() > subscribed
            || (text.matches("connected to broker").count() > connected
                && text.contains("session_present=true"))
        {
            return Ok(p);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("agent under QEMU did not connect: {text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The whole chain with the cross-built `agent`: exact totals across a kill -9, then a clean
/// stop and `inspect` on the emulated target.
async fn chain_with(agent: Exe, seed: u64) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let mqtt = Mosquitto::start(free_port()?, &dir.join("mosquitto")).await?;
    let cloud = Cloud::start(dir).await?;
    let host_cloud = Exe::workspace("countersign-cloud")?;

    // Before anything else: the emulated agent opens (creates) its sled database and answers.
    let gw_key = dir.join("gateway.key").display().to_string();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "gateway_id = 7\ngateway_key_file = \"{gw_key}\"\ndata_dir = \"{}\"\nendpoint_url = \"{}\"\n\
             [mqtt]\nport = {}\nclient_id = \"cross-agent\"\n[batch]\nlinger_ms = 50\nretry_delay_ms_min = 100\nretry_delay_ms_max = 1000\n\
             [http]\nlisten = \"\"\n",
            dir.join("agent-data").display(),
            cloud.url,
            mqtt.port(),
        ),
    )?;
    let config = config.display().to_string();
    let public = agent.run_ok(&["keygen", "--out", &gw_key])?;
    let checked = agent.run_ok(&["check-config", "--config", &config])?;
    assert!(checked.contains(public.trim()), "{checked}");
    let fresh: serde_json::Value = serde_json::from_str(&agent.run_ok(&["inspect", "--config", &config])?)?;
    assert_eq!(fresh["stats"]["pending"], 0, "{fresh}");

    host_cloud.run_ok(&[
        "register-gateway",
        "--endpoint",
        &cloud.url,
        "--token-file",
        &cloud.token_file,
        "--gateway-id",
        "7",
        "--public-key",
        public.trim(),
    ])?;
    let mut fleet = Fleet::new(6, 700, seed, 1_790_000_000, Faults { reboot: 0.05, ..Faults::default() });
    cloud.register_meters(dir, &fleet.meters())?;

    let log = dir.join("agent.log");
    let mut running = start_agent(&agent, &config, &log).await?;
    let mut devices = Publisher::connect("cross-devices", mqtt.port());
    for _ in 0..20 {
        publish_all(&mut devices, &fleet.step()).await?;
    }
    // Killed without warning: the broker keeps what the agent had not acked after a flush.
    running.kill9();
    for _ in 0..20 {
        publish_all(&mut devices, &fleet.step()).await?;
    }
    let mut running = start_agent(&agent, &config, &log).await?;
    for _ in 0..20 {
        publish_all(&mut devices, &fleet.step()).await?;
    }
    publish_all(&mut devices, &fleet.finish()).await?;

    let truth = fleet.truth_per_iccid();
    let (sims, total) = cloud.wait_for_total(fleet.truth_total_bytes(), DELIVERY_TIMEOUT).await?;
    assert_eq!(sims, truth, "per-SIM totals differ (agent log: {})", running.log_text());
    assert_eq!(total, fleet.truth_total_bytes());
    assert!(fleet.stats().reports > 0 && fleet.stats().dropped > 0 && fleet.stats().duplicated > 0);

    assert!(running.terminate(), "agent under QEMU did not exit cleanly on SIGTERM: {}", running.log_text());
    let after: serde_json::Value = serde_json::from_str(&agent.run_ok(&["inspect", "--config", &config])?)?;
    assert_eq!(after["stats"]["pending"], 0, "{after}");
    devices.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aarch64_agent_under_qemu_delivers_exact_totals() -> Result<()> {
    match cross_agent("aarch64-unknown-linux-gnu", &["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"], true)? {
        Some(agent) => chain_with(agent, 64).await,
        None => Ok(()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn armv7_agent_under_qemu_opens_sled_and_delivers_exact_totals() -> Result<()> {
    match cross_agent("armv7-unknown-linux-gnueabihf", &["qemu-arm", "-L", "/usr/arm-linux-gnueabihf"], true)?
    {
        Some(agent) => chain_with(agent, 32).await,
        None => Ok(()),
    }
}

/// Whether `cross/build.sh --musl` can build `triple` here: the Rust toolchain running the
/// tests has its standard library, or the fallback toolchain the script uses for musl
/// targets the active one lacks (`COUNTERSIGN_MUSL_FALLBACK_TOOLCHAIN`, default 1.93.0) has
/// it. Then CI requires the binary.
fn toolchain_has_std(triple: &str) -> bool {
    let sysroot_has = |mut cmd: std::process::Command| {
        cmd.output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| {
                Path::new(String::from_utf8_lossy(&o.stdout).trim())
                    .join("lib/rustlib")
                    .join(triple)
                    .join("lib")
            })
            .is_some_and(|lib| lib.is_dir())
    };
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let mut active = std::process::Command::new(rustc);
    active.args(["--print", "sysroot"]);
    let fallback =
        std::env::var("COUNTERSIGN_MUSL_FALLBACK_TOOLCHAIN").unwrap_or_else(|_| "1.93.0".to_owned());
    let mut other = std::process::Command::new("rustup");
    other.args(["run", &fallback, "rustc", "--print", "sysroot"]);
    sysroot_has(active) || sysroot_has(other)
}

/// The static builds (`cross/build.sh --musl`) that the `.ipk` packages ship.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aarch64_musl_agent_under_qemu_delivers_exact_totals() -> Result<()> {
    let triple = "aarch64-unknown-linux-musl";
    match cross_agent(triple, &["qemu-aarch64"], toolchain_has_std(triple))? {
        Some(agent) => chain_with(agent, 65).await,
        None => Ok(()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn armv7_musl_agent_under_qemu_delivers_exact_totals() -> Result<()> {
    let triple = "armv7-unknown-linux-musleabihf";
    match cross_agent(triple, &["qemu-arm"], toolchain_has_std(triple))? {
        Some(agent) => chain_with(agent, 33).await,
        None => Ok(()),
    }
}

/// Natively: this machine is x86_64 (the same static binary the x86_64 `.ipk` ships).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x86_64_musl_agent_delivers_exact_totals() -> Result<()> {
    let triple = "x86_64-unknown-linux-musl";
    if std::env::consts::ARCH != "x86_64" {
        let _ = writeln!(std::io::stderr(), "!!! SKIPPED: the {triple} agent needs an x86_64 machine");
        return Ok(());
    }
    match cross_agent(triple, &[], toolchain_has_std(triple))? {
        Some(agent) => chain_with(agent, 86).await,
        None => Ok(()),
    }
}
