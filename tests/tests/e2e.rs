//! End to end, with real processes: simulated devices → Mosquitto → `countersign-agent` →
//! `countersign-cloud`. Needs the workspace binaries built and `mosquitto` installed
//! (`tests/run.sh` does both).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use countersign_e2e::broker::Mosquitto;
use countersign_e2e::fleet::{Faults, Fleet};
use countersign_e2e::publisher::Publisher;
use countersign_e2e::stack::{publish_all, AgentSetup, Cloud};
use countersign_meter::{DeviceTime, Report, Totals};
use countersign_testkit::free_port;
use countersign_testkit::procs::{run, run_ok};
use countersign_testkit::ReportBuilder;

const UPLINK_METER: u64 = 999_001;
const UPLINK_ICCID: u64 = 8_988_228_066_699_990_001;

fn set_counters(sysfs: &Path, tx: u64, rx: u64) -> Result<()> {
    let s = sysfs.join("wwan0/statistics");
    std::fs::create_dir_all(&s)?;
    std::fs::write(s.join("tx_bytes"), format!("{tx}\n"))?;
    std::fs::write(s.join("rx_bytes"), format!("{rx}\n"))?;
    Ok(())
}

fn bad_report(meter_id: u64, key: &[u8; 32]) -> Vec<u8> {
    ReportBuilder::new(meter_id, 0, 8_988_228_066_699_999_999, DeviceTime::uptime(1).expect("valid uptime"))
        .epoch(999)
        .used(1_000_000, 1_000_000)
        .encode(key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_totals_across_agent_kill_and_bad_input() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let mqtt = Mosquitto::start(free_port()?, &dir.join("mosquitto")).await?;
    let cloud = Cloud::start(dir).await?;
    let mut fleet = Fleet::new(12, 500, 99, 1_790_000_000, Faults { reboot: 0.05, ..Faults::default() });
    cloud.register(dir, &dir.join("gateway.key"), &fleet.meters())?;

    // The gateway's own SIM, metered from interface counters in a sysfs-shaped directory the
    // test controls (the agent reads /sys/class/net by default).
    let uplink_key = dir.join("uplink-meter.key");
    let key = countersign_protocol::keys::generate_meter_key();
    countersign_protocol::keys::write_secret(&uplink_key, &key)?;
    cloud.register_meters(dir, &[(UPLINK_METER, key, UPLINK_ICCID)])?;
    let sysfs = dir.join("sysfs");
    set_counters(&sysfs, 1000, 2000)?;
    let setup = AgentSetup::write(
        dir,
        &dir.join("agent-data"),
        mqtt.port(),
        &cloud.url,
        &format!(
            "[batch]\nlinger_ms = 50\nretry_delay_ms_min = 100\nretry_delay_ms_max = 1000\n\
             [uplink]\nmeter_id = {UPLINK_METER}\nkey_file = \"{}\"\niccid = \"{UPLINK_ICCID}\"\n\
             interfaces = [\"wwan0\"]\nread_interval_s = 1\nreport_delta_bytes_min = 1\nsysfs_net = \"{}\"\n",
            uplink_key.display(),
            sysfs.display()
        ),
    )?;
    let agent_config = setup.config_arg();
    let status_port = setup.status_port;
    let mut agent = setup.start().await?;
    let mut devices = Publisher::connect("e2e-devices", mqtt.port());

    // Phase 1: normal operation.
    for _ in 0..40 {
        let out = fleet.step();
        publish_all(&mut devices, &out).await?;
    }
    // Phase 2: the agent dies without warning; the broker keeps the reports for its session.
    agent.kill9();
    for _ in 0..40 {
        let out = fleet.step();
        publish_all(&mut devices, &out).await?;
    }
    // Phase 3: it comes back and catches up. The uplink carries traffic from now on (what it
    // carried while the agent was down is the documented bound of a restart).
    let mut agent = setup.start().await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    set_counters(&sysfs, 1000 + 123_456, 2000 + 654_321)?;
    for _ in 0..40 {
        let out = fleet.step();
        publish_all(&mut devices, &out).await?;
    }
    let out = fleet.finish();
    publish_all(&mut devices, &out).await?;

    // Bad input: not reports, a forged report, a report from an unknown meter.
    let (victim, _, _) = fleet.meters()[0];
    devices.publish(&format!("countersign/v1/reports/{victim}"), b"garbage").await?;
    devices.publish(&format!("countersign/v1/reports/{victim}"), &vec![1u8; 100_000]).await?;
    devices.publish(&format!("countersign/v1/reports/{victim}"), &bad_report(victim, &[0xee; 32])).await?;
    devices.publish("countersign/v1/reports/77777", &bad_report(77777, &[0xee; 32])).await?;
    devices.wait_acked(Duration::from_secs(30)).await?;

    let mut truth = fleet.truth_per_iccid();
    truth.insert(UPLINK_ICCID, Totals { up: 123_456, down: 654_321 });
    let want_total = fleet.truth_total_bytes() + 123_456 + 654_321;
    let (sims, total) = cloud.wait_for_total(want_total, Duration::from_secs(60)).await?;
    assert_eq!(sims, truth, "per-SIM totals differ (agent log: {})", agent.log.display());
    assert_eq!(total, want_total);
    assert!(fleet.stats().reboots > 0 && fleet.stats().dropped > 0 && fleet.stats().duplicated > 0);

    // Per-day figures add up to the SIM's total.
    let iccid = *truth.keys().next().context("no sims")?;
    let v: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/v1/usage?iccid={iccid}", cloud.url))
        .bearer_auth(&cloud.token)
        .send()
        .await?
        .json()
        .await?;
    let days = v["days"].as_array().context("days")?;
    assert!(days.len() >= 5, "120 simulated hours span at least 5 days: {v}");
    let sum: u64 = days.iter().map(|d| d["total_bytes"].as_u64().unwrap_or(0)).sum();
    assert_eq!(sum, truth[&iccid].up + truth[&iccid].down);

    // The endpoint's verdicts on the two bad reports reach the agent's rejected tree.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while agent.log_text().matches("endpoint rejected a report").count() < 2 {
        if tokio::time::Instant::now() > deadline {
            bail!("agent never recorded the rejections: {}", agent.log_text());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Operations: status from the running agent, health and metrics over HTTP.
    let st: serde_json::Value =
        serde_json::from_str(&run_ok("countersign-agent", &["status", "--config", &agent_config])?)?;
    assert_eq!(st["agent"], "running", "{st}");
    assert_eq!(st["status"]["buffered_reports"], 0, "{st}");
    assert_eq!(st["health"]["healthy"], true, "{st}");
    let metrics = reqwest::get(format!("http://127.0.0.1:{status_port}/metrics")).await?.text().await?;
    assert!(metrics.contains("countersign_agent_healthy 1"), "{metrics}");
    assert!(metrics.contains("countersign_agent_quarantined_total 2"), "{metrics}");
    let health = reqwest::get(format!("http://127.0.0.1:{status_port}/health")).await?;
    assert_eq!(health.status(), 200);

    assert!(agent.terminate(), "agent did not exit cleanly on SIGTERM");
    let st: serde_json::Value =
        serde_json::from_str(&run_ok("countersign-agent", &["status", "--config", &agent_config])?)?;
    assert_eq!(st["agent"], "not running", "{st}");
    let inspect: serde_json::Value =
        serde_json::from_str(&run_ok("countersign-agent", &["inspect", "--config", &agent_config])?)?;
    // Only the uplink meter's last report, made at shutdown, waits for the next start.
    assert_eq!(inspect["stats"]["pending"], 1, "{inspect}");
    let reasons: Vec<&str> = inspect["quarantined"]
        .as_array()
        .context("quarantined")?
        .iter()
        .filter_map(|q| q["reason"].as_str())
        .collect();
    assert_eq!(reasons, vec!["too_short", "too_long"], "{inspect}");
    let mut rejected: Vec<&str> = inspect["rejected"]
        .as_array()
        .context("rejected")?
        .iter()
        .filter_map(|r| r["rejected"]["reason"].as_str())
        .collect();
    rejected.sort_unstable();
    assert_eq!(rejected, vec!["bad_tag", "unknown_meter"], "{inspect}");
    devices.close().await;
    drop(cloud.proc);
    Ok(())
}

#[test]
fn config_errors_name_the_key() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        "gateway_id = 1\ngateway_key_file = \"/k\"\ndata_dir = \"/d\"\nendpoint_url = \"ftp://x\"\n",
    )?;
    let out = run("countersign-agent", &["check-config", "--config", &bad.display().to_string()])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("endpoint_url"), "{out:?}");

    std::fs::write(&bad, "listen = \"nowhere\"\ndata_dir = \"/d\"\nadmin_token_file = \"/t\"\n")?;
    let out = run("countersign-cloud", &["check-config", "--config", &bad.display().to_string()])?;
    assert!(!out.status.success());
    let text = format!("{}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    assert!(text.contains("listen"), "{text}");
    Ok(())
}

#[test]
fn world_readable_secrets_are_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let key = tmp.path().join("gateway.key");
    run_ok("countersign-agent", &["keygen", "--out", &key.display().to_string()])?;
    assert_eq!(std::fs::metadata(&key)?.permissions().mode() & 0o777, 0o600);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644))?;
    let out = run("countersign-agent", &["pubkey", "--key-file", &key.display().to_string()])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"), "{out:?}");
    Ok(())
}

/// Builds the real board image for QEMU with this test's meter id and key provisioned.
fn build_board_image(meter_id: u64, key_file: &Path) -> Result<std::path::PathBuf> {
    let board = Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware/boards/mps2-an386");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["build", "--release", "--bin", "countersign-meter-fw"])
        .current_dir(&board)
        .env("COUNTERSIGN_METER_ID", meter_id.to_string())
        .env("COUNTERSIGN_METER_KEY_FILE", key_file)
        .env("COUNTERSIGN_POLL_INTERVAL_MS", "20")
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .context("cannot run cargo for the board image")?;
    if !out.status.success() {
        bail!("board image build failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(board.join("target/thumbv7em-none-eabihf/release/countersign-meter-fw"))
}

/// The real firmware image under `qemu-system-arm` (mps2-an386), a simulated Quectel modem
/// on its UART publishing through Mosquitto, the real agent and endpoint. Two power cycles
/// on the same flash image file: the epoch advances, the second epoch's base is exactly the
/// first epoch's final totals, and the endpoint's total equals the bytes the modem counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_firmware_reports_exact_totals_across_power_cycles() -> Result<()> {
    use countersign_e2e::modem_sim::{ModemSim, PublishFailure, SimState};
    use std::sync::{Arc, Mutex};

    const METER_ID: u64 = 4_200_001;
    const ICCID20: &str = "89882280666000010421";
    const ICCID: u64 = 8_988_228_066_600_001_042;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let key_file = dir.join("meter.key");
    run_ok("countersign-cloud", &["keygen-meter", "--out", &key_file.display().to_string()])?;
    let elf = tokio::task::block_in_place(|| build_board_image(METER_ID, &key_file))?;

    let mqtt = Mosquitto::start(free_port()?, &dir.join("mosquitto")).await?;
    let cloud = Cloud::start(dir).await?;
    let key = countersign_protocol::keys::read_secret(&key_file)?;
    cloud.register(dir, &dir.join("gateway.key"), &[(METER_ID, key, ICCID)])?;
    let setup = AgentSetup::write(
        dir,
        &dir.join("agent-data"),
        mqtt.port(),
        &cloud.url,
        "[batch]\nlinger_ms = 50\n",
    )?;
    let _agent = setup.start().await?;

    let board_dir = dir.join("board");
    std::fs::create_dir_all(&board_dir)?;
    let state = Arc::new(Mutex::new(SimState { clock_unix: 1_795_000_000, ..SimState::default() }));
    let mut truth = Totals::default();
    let mut epochs = Vec::new();
    let mut last_final: Option<Report> = None;
    for boot in 0..2 {
        let sim = tokio::task::block_in_place(|| -> Result<ModemSim> {
            let sim = ModemSim::boot(&elf, &board_dir, mqtt.port(), ICCID20, state.clone())?;
            // A slow network on the first boot, then a publish lost on the air: the next
            // cumulative report covers it.
            if boot == 0 {
                sim.wait_for("the first report", Duration::from_secs(60), |s| !s.delivered.is_empty())?;
                {
                    let mut s = state.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                    s.publish_delay_ms = 1500;
                    s.drop_publishes = 1;
                }
                // Waits for the drop itself, not any failure: a publish the harness lost for
                // its own reasons must not leave the drop pending for the next boot.
                sim.wait_for("a dropped publish", Duration::from_secs(90), |s| {
                    s.drop_publishes == 0 && s.failed_publishes.contains(&PublishFailure::Dropped)
                })?;
                state.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.publish_delay_ms = 0;
            }
            // Several policy reports while traffic flows (delta or max interval)...
            sim.wait_for("three reports", Duration::from_secs(90), |s| s.delivered.len() >= 3)?;
            // ...then the data context goes down: the firmware reports on demand.
            state.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.pdp_deact_requested = true;
            sim.wait_for("the on-demand report", Duration::from_secs(60), |s| {
                s.delivered_before_deact.is_some_and(|i| s.delivered.len() > i)
            })?;
            // The firmware checkpoints right after a delivery, then polls again: a new
            // reading means the checkpoint is on flash.
            sim.wait_for("the checkpoint after the report", Duration::from_secs(30), |s| {
                s.delivered.last().is_some_and(|d| s.answers.len() > d.answers_at_delivery)
            })?;
            Ok(sim)
        })?;
        let (first_answer, fin, first_report, failed) = {
            let s = state.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            assert!(s.unknown.is_empty(), "firmware sent unknown commands: {:?}", s.unknown);
            let i = s.delivered_before_deact.context("deact index")?;
            (s.answers[0], s.delivered[i].clone(), s.delivered[0].report.clone(), s.failed_publishes.clone())
        };
        let dropped = failed.iter().filter(|f| **f == PublishFailure::Dropped).count();
        assert_eq!(dropped, usize::from(boot == 0), "boot {boot}: publishes dropped on the air");
        // The firmware's contract covers any lost publish (the next cumulative report carries
        // it), so a PUBACK the harness's own broker client missed under load is checked like a
        // drop below (seq and totals), and shown rather than failing the run.
        assert!(
            !failed.contains(&PublishFailure::NoSession),
            "boot {boot}: the firmware published without an MQTT session: {failed:?}"
        );
        if failed.len() > dropped {
            eprintln!("boot {boot}: publishes lost by the harness itself: {failed:?}");
        }
        let failed = failed.len();
        // Power cut while the device sleeps after its on-demand report.
        sim.power_cut();
        let r = &fin.report;
        assert_eq!(r.iccid, ICCID);
        assert_eq!(
            r.seq as usize + 1,
            state.lock().map(|s| s.delivered.len()).unwrap_or(0) + failed,
            "seq counts reports, delivered or lost"
        );
        // The modem counted exactly this much between the first reading and the final report.
        let counted = Totals {
            up: fin.counters_before.0 - first_answer.0,
            down: fin.counters_before.1 - first_answer.1,
        };
        assert_eq!(r.used, counted, "boot {boot}: report does not match the modem's counters");
        truth = truth.checked_add(&counted).context("overflow")?;
        if let Some(prev) = &last_final {
            // Restored from the checkpoint written after the previous on-demand report.
            assert_eq!(first_report.base, prev.cumulative().context("overflow")?, "base after power cycle");
        }
        epochs.push(r.epoch);
        last_final = Some(r.clone());
    }
    assert_eq!(epochs, vec![0, 1], "the epoch advances across the power cycle");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let sims = loop {
        let (sims, _) = cloud.usage_sims().await?;
        if sims.get(&ICCID) == Some(&truth) || tokio::time::Instant::now() > deadline {
            break sims;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(sims.get(&ICCID), Some(&truth), "endpoint totals differ from the modem's counters");
    Ok(())
}
