//! End to end, with real processes: simulated devices → Mosquitto → `countersign-agent` →
//! `countersign-cloud`. Needs the workspace binaries built and `mosquitto` installed
//! (`tests/run.sh` does both).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use countersign_e2e::broker::Mosquitto;
use countersign_e2e::fleet::{Faults, Fleet, Outgoing};
use countersign_e2e::procs::{run, run_ok, Proc};
use countersign_e2e::publisher::Publisher;
use countersign_e2e::{free_port, wait_for_port};
use countersign_meter::report::REPORT_BYTES_MAX;
use countersign_meter::{DeviceTime, Report, Totals};

struct Cloud {
    proc: Proc,
    url: String,
    token_file: String,
    token: String,
}

async fn start_cloud(dir: &Path) -> Result<Cloud> {
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
    let proc = Proc::spawn(
        "countersign-cloud",
        &["serve", "--config", &config.display().to_string()],
        &dir.join("cloud.log"),
    )?;
    if !wait_for_port(port, Duration::from_secs(20)).await {
        bail!("endpoint did not listen: {}", proc.log_text());
    }
    Ok(Cloud {
        proc,
        url: format!("http://127.0.0.1:{port}"),
        token_file: token_file.display().to_string(),
        token,
    })
}

fn write_agent_config(dir: &Path, mqtt_port: u16, url: &str, status_port: u16) -> Result<String> {
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "gateway_id = 1\ngateway_key_file = \"{}\"\ndata_dir = \"{}\"\nendpoint_url = \"{url}\"\n\
             [mqtt]\nport = {mqtt_port}\nclient_id = \"e2e-agent\"\n[batch]\nlinger_ms = 50\nretry_delay_ms_min = 100\nretry_delay_ms_max = 1000\n\
             [http]\nlisten = \"127.0.0.1:{status_port}\"\n",
            dir.join("gateway.key").display(),
            dir.join("agent-data").display(),
        ),
    )?;
    Ok(config.display().to_string())
}

async fn start_agent(dir: &Path, config: &str) -> Result<Proc> {
    let log = dir.join("agent.log");
    let before = std::fs::read_to_string(&log).map(|s| s.matches("subscribed").count()).unwrap_or(0);
    let before_connected =
        std::fs::read_to_string(&log).map(|s| s.matches("connected to broker").count()).unwrap_or(0);
    let agent = Proc::spawn("countersign-agent", &["run", "--config", config], &log)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = agent.log_text();
        // A fresh session subscribes; a resumed one already has the subscription.
        if text.matches("subscribed").count() > before
            || (text.matches("connected to broker").count() > before_connected
                && text.contains("session_present=true"))
        {
            return Ok(agent);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("agent did not connect: {text}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn publish_all(p: &mut Publisher, out: &[Outgoing]) -> Result<()> {
    for o in out {
        p.publish(&o.topic, &o.payload).await?;
    }
    p.wait_acked(Duration::from_secs(30)).await
}

async fn usage_sims(cloud: &Cloud) -> Result<(BTreeMap<u64, Totals>, u64)> {
    let v: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/v1/usage/sims", cloud.url))
        .bearer_auth(&cloud.token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let mut sims = BTreeMap::new();
    for s in v["sims"].as_array().context("no sims")? {
        let iccid: u64 = s["iccid"].as_str().context("iccid")?.parse()?;
        sims.insert(
            iccid,
            Totals {
                up: s["up_bytes"].as_u64().context("up")?,
                down: s["down_bytes"].as_u64().context("down")?,
            },
        );
    }
    Ok((sims, v["total_bytes"].as_u64().context("total")?))
}

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
    let cloud = start_cloud(dir).await?;

    // Keys through the real commands.
    let gw_key = dir.join("gateway.key").display().to_string();
    let public = run_ok("countersign-agent", &["keygen", "--out", &gw_key])?;
    run_ok(
        "countersign-cloud",
        &[
            "register-gateway",
            "--endpoint",
            &cloud.url,
            "--token-file",
            &cloud.token_file,
            "--gateway-id",
            "1",
            "--public-key",
            public.trim(),
        ],
    )?;
    let mut fleet = Fleet::new(12, 500, 99, 1_790_000_000, Faults { reboot: 0.05, ..Faults::default() });
    for (meter_id, key, _) in fleet.meters() {
        let path = dir.join(format!("meter-{meter_id}.key"));
        countersign_protocol::keys::write_secret(&path, &key)?;
        run_ok(
            "countersign-cloud",
            &[
                "register-meter",
                "--endpoint",
                &cloud.url,
                "--token-file",
                &cloud.token_file,
                "--meter-id",
                &meter_id.to_string(),
                "--key-file",
                &path.display().to_string(),
            ],
        )?;
    }

    let status_port = free_port()?;
    let agent_config = write_agent_config(dir, mqtt.port(), &cloud.url, status_port)?;
    let mut agent = start_agent(dir, &agent_config).await?;
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
    let mut agent = start_agent(dir, &agent_config).await?;
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (sims, total) = loop {
        let (sims, total) = usage_sims(&cloud).await?;
        if total == fleet.truth_total_bytes() || tokio::time::Instant::now() > deadline {
            break (sims, total);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
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
