//! End to end, with real processes: simulated devices → Mosquitto → `countersign-agent` →
//! `countersign-cloud`. Needs the workspace binaries built and `mosquitto` installed
//! (`tests/run.sh` does both).

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use countersign_e2e::broker::Mosquitto;
use countersign_e2e::fleet::{Faults, Fleet};
use countersign_e2e::free_port;
use countersign_e2e::procs::{run, run_ok};
use countersign_e2e::publisher::Publisher;
use countersign_e2e::stack::{publish_all, AgentSetup, Cloud};
use countersign_meter::report::REPORT_BYTES_MAX;
use countersign_meter::{DeviceTime, Report, Totals};

fn bad_report(meter_id: u64, key: &[u8; 32]) -> Vec<u8> {
    let r = Report {
        meter_id,
        epoch: 999,
        seq: 0,
        iccid: 8_988_228_066_699_999_999,
        time: DeviceTime::uptime(1).expect("valid uptime"),
        base: Totals::default(),
        used: Totals { up: 1_000_000, down: 1_000_000 },
        extras: Default::default(),
    };
    let mut buf = [0u8; REPORT_BYTES_MAX];
    let n = r.encode(key, &mut buf).expect("encodes");
    buf[..n].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_totals_across_agent_kill_and_bad_input() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let mqtt = Mosquitto::start(free_port()?, &dir.join("mosquitto")).await?;
    let cloud = Cloud::start(dir).await?;
    let mut fleet = Fleet::new(12, 500, 99, 1_790_000_000, Faults { reboot: 0.05, ..Faults::default() });
    cloud.register(dir, &dir.join("gateway.key"), &fleet.meters())?;

    let setup = AgentSetup::write(
        dir,
        &dir.join("agent-data"),
        mqtt.port(),
        &cloud.url,
        "[batch]\nlinger_ms = 50\nretry_delay_ms_min = 100\nretry_delay_ms_max = 1000\n",
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
    // Phase 3: it comes back and catches up.
    let mut agent = setup.start().await?;
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

    let truth = fleet.truth_per_iccid();
    let (sims, total) = cloud.wait_for_total(fleet.truth_total_bytes(), Duration::from_secs(60)).await?;
    assert_eq!(sims, truth, "per-SIM totals differ (agent log: {})", agent.log.display());
    assert_eq!(total, fleet.truth_total_bytes());
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
    assert_eq!(inspect["stats"]["pending"], 0, "{inspect}");
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
