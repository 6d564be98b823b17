//! Containment on the gateway (issue 10): no payload the broker accepts, whatever its size,
//! QoS or number, stops the reports of other devices. Real processes: a private Mosquitto
//! with its default limits (256 MiB packets), `countersign-agent`, `countersign-cloud`.
//! Needs the workspace binaries built and `mosquitto` installed (`tests/run.sh` does both).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use countersign_agent::pipeline::MQTT_PACKET_BYTES_MAX;
use countersign_e2e::broker::Mosquitto;
use countersign_e2e::fleet::{Faults, Fleet};
use countersign_e2e::publisher::Publisher;
use countersign_e2e::stack::{publish_all, AgentSetup, Cloud};
use countersign_testkit::free_port;
use countersign_testkit::procs::{run, run_ok, Proc};

/// Largest packet the test's devices send (Mosquitto's default limit is 256 MiB).
const DEVICE_PACKET_BYTES_MAX: usize = 128 << 20;

/// A broker, an endpoint with a fleet registered, and an agent subscribed.
struct Stack {
    _tmp: tempfile::TempDir,
    _mqtt: Mosquitto,
    cloud: Cloud,
    fleet: Fleet,
    setup: AgentSetup,
    agent: Proc,
    devices: Publisher,
}

impl Stack {
    async fn start(meters: usize, extra: &str) -> Result<Stack> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path();
        let mqtt = Mosquitto::start(free_port()?, &dir.join("mosquitto")).await?;
        let cloud = Cloud::start(dir).await?;
        let fleet = Fleet::new(meters, 700, 7, 1_790_000_000, Faults::default());
        cloud.register(dir, &dir.join("gateway.key"), &fleet.meters())?;
        let setup = AgentSetup::write(
            dir,
            &dir.join("agent-data"),
            mqtt.port(),
            &cloud.url,
            &format!("[batch]\nlinger_ms = 20\nretry_delay_ms_min = 50\nretry_delay_ms_max = 500\n{extra}"),
        )?;
        let agent = setup.start().await?;
        let devices = Publisher::connect_with("containment-devices", mqtt.port(), DEVICE_PACKET_BYTES_MAX);
        Ok(Stack { _tmp: tmp, _mqtt: mqtt, cloud, fleet, setup, agent, devices })
    }

    /// `steps` simulated hours of the fleet, published at QoS 1 and acked by the broker.
    async fn steps(&mut self, steps: usize) -> Result<()> {
        for _ in 0..steps {
            let out = self.fleet.step();
            publish_all(&mut self.devices, &out).await?;
        }
        Ok(())
    }

    /// The fleet's last reports, then: every valid report reached the endpoint, exactly.
    async fn all_reports_arrive(&mut self) -> Result<()> {
        let out = self.fleet.finish();
        publish_all(&mut self.devices, &out).await?;
        let want = self.fleet.truth_total_bytes();
        let (sims, total) = self.cloud.wait_for_total(want, Duration::from_secs(30)).await?;
        if total != want {
            bail!(
                "the endpoint has {total} bytes of {want}: reports behind the bad payload did not flow\n\
                 agent log (tail): {}",
                tail(&self.agent.log_text())
            );
        }
        assert_eq!(sims, self.fleet.truth_per_iccid());
        Ok(())
    }

    fn report_topic(&self) -> String {
        format!("countersign/v1/reports/{}", self.fleet.meters()[0].0)
    }

    async fn get(&self, path: &str) -> Result<(u16, String)> {
        let r = reqwest::get(format!("http://127.0.0.1:{}{path}", self.setup.status_port)).await?;
        Ok((r.status().as_u16(), r.text().await?))
    }

    /// Waits until `/metrics` has `line` (the agent commits asynchronously).
    async fn wait_metric(&self, line: &str) -> Result<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (_, m) = self.get("/metrics").await?;
            if m.lines().any(|l| l == line) {
                return Ok(m);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("/metrics never had `{line}`:\n{m}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the agent and returns what `countersign-agent inspect` shows.
    fn stop_and_inspect(&mut self) -> Result<serde_json::Value> {
        assert!(self.agent.terminate(), "agent did not exit cleanly on SIGTERM");
        Ok(serde_json::from_str(&run_ok(
            "countersign-agent",
            &["inspect", "--config", &self.setup.config_arg()],
        )?)?)
    }
}

fn tail(log: &str) -> &str {
    let mut start = log.len().saturating_sub(3000);
    while !log.is_char_boundary(start) {
        start += 1;
    }
    &log[start..]
}

/// A `VmRSS`/`VmHWM`-style field of /proc/<pid>/status, in bytes.
fn proc_status_bytes(pid: u32, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field}"))?;
    let kb: u64 = line.split_whitespace().nth(1).context("no value")?.parse()?;
    Ok(kb * 1024)
}

fn signal(p: &Proc, sig: &str) -> Result<()> {
    let pid = p.pid().context("not running")?;
    let ok =
        std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status()?.success();
    if !ok {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

/// The first few bytes of a quarantined entry's fields, checked for the oversized publish.
fn too_large_entries(inspect: &serde_json::Value) -> Vec<(u64, String)> {
    inspect["quarantined"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|q| q["reason"] == "too_large")
                .map(|q| {
                    (q["payload_len"].as_u64().unwrap_or(0), q["topic"].as_str().unwrap_or("").to_owned())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Regression for the wedged gateway: one QoS 1 publish several times the agent's packet
/// limit, between valid reports. Before the fix the agent's MQTT client refused the packet,
/// reconnected, got it again from its persistent session, and never acked or uploaded
/// anything again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_qos1_publish_is_quarantined_and_reports_keep_flowing() -> Result<()> {
    let mut s = Stack::start(4, "").await?;
    let pid = s.agent.pid().context("agent pid")?;
    s.steps(5).await?;
    let rss_before = proc_status_bytes(pid, "VmRSS")?;
    let big = 4 * MQTT_PACKET_BYTES_MAX;
    let topic = s.report_topic();
    s.devices.publish(&topic, &vec![0x5a; big]).await?;
    // And one far larger: it must be discarded as it arrives, never held in memory.
    let huge = 64 << 20;
    s.devices.publish(&topic, &vec![0xa5; huge]).await?;
    s.devices.wait_acked(Duration::from_secs(60)).await?;
    s.steps(5).await?;
    s.all_reports_arrive().await?;

    let m = s.wait_metric("countersign_agent_oversized_publishes_total 2").await?;
    assert!(m.contains("countersign_agent_quarantined_by_reason_total{reason=\"too_large\"} 2\n"), "{m}");
    assert!(m.contains(&format!("countersign_agent_oversized_bytes_max {huge}\n")), "{m}");
    let (code, health) = s.get("/health").await?;
    assert_eq!(code, 200, "reports flow, so the agent is healthy: {health}");
    assert!(health.contains("too_large") && health.contains(&huge.to_string()), "{health}");
    let hwm = proc_status_bytes(pid, "VmHWM")?;
    eprintln!("agent RSS before the oversized publishes {rss_before} B, peak {hwm} B");
    assert!(
        hwm < rss_before + (32 << 20),
        "agent peak RSS {hwm} B grew by more than 32 MiB over {rss_before} B for a 64 MiB payload"
    );

    let inspect = s.stop_and_inspect()?;
    let entries = too_large_entries(&inspect);
    assert_eq!(entries, vec![(big as u64, topic.clone()), (huge as u64, topic)], "{inspect}");
    Ok(())
}

/// The same at QoS 0 (nothing to ack, but the connection must survive it all the same) and
/// at QoS 2 (the agent subscribes at QoS 1, so the broker delivers it at QoS 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_qos0_and_qos2_publishes_are_quarantined_and_reports_keep_flowing() -> Result<()> {
    let mut s = Stack::start(4, "").await?;
    s.steps(5).await?;
    let big = 4 * MQTT_PACKET_BYTES_MAX + 17;
    let topic = s.report_topic();
    s.devices.publish_qos0(&topic, &vec![0x11; big]).await?;
    s.steps(3).await?;
    s.devices.publish_uncounted(&topic, rumqttc::QoS::ExactlyOnce, &vec![0x22; big + 1]).await?;
    s.steps(3).await?;
    s.all_reports_arrive().await?;
    s.wait_metric("countersign_agent_oversized_publishes_total 2").await?;
    let (_, health) = s.get("/health").await?;
    assert!(health.contains("too_large"), "{health}");
    let inspect = s.stop_and_inspect()?;
    assert_eq!(
        too_large_entries(&inspect),
        vec![(big as u64, topic.clone()), (big as u64 + 1, topic)],
        "{inspect}"
    );
    Ok(())
}

/// A QoS 0 flood of large payloads (each within the packet limit, so read whole) while the
/// agent cannot commit (its buffer is at quota and the endpoint is stopped): the ingest
/// queue is bounded in bytes, so the agent stops reading and its memory stays bounded;
/// once the endpoint is back, every valid report arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos0_flood_while_the_agent_is_held_does_not_grow_its_memory() -> Result<()> {
    let mut s = Stack::start(20, "[store]\nquota_bytes = 262144\n").await?;
    let pid = s.agent.pid().context("agent pid")?;
    s.steps(2).await?;
    // The endpoint stops answering: uploads time out, the buffer fills to its quota, and the
    // committer holds (nothing more is taken off the ingest queue).
    signal(&s.cloud.proc, "STOP")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        s.steps(5).await?;
        let st = s.setup.status().await.context("no /status")?;
        if st["over_quota"] == true {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the buffer never reached its quota: {st}");
        }
    }
    let rss_before = proc_status_bytes(pid, "VmRSS")?;
    let flood_payload = vec![0x33u8; MQTT_PACKET_BYTES_MAX - 1024];
    let topic = s.report_topic();
    let flood = 256; // 64 MiB in all
    for _ in 0..flood {
        s.devices.publish_qos0(&topic, &flood_payload).await?;
    }
    // Give the broker time to push what the agent will take.
    let mut rss_max = 0;
    for _ in 0..30 {
        rss_max = rss_max.max(proc_status_bytes(pid, "VmRSS")?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let hwm = proc_status_bytes(pid, "VmHWM")?;
    eprintln!("agent RSS before the flood {rss_before} B, during it at most {rss_max} B, peak {hwm} B");
    assert!(
        hwm < rss_before + (24 << 20) && rss_max < rss_before + (24 << 20),
        "agent memory grew from {rss_before} B to {rss_max} B (peak {hwm} B) under a 64 MiB QoS 0 flood"
    );
    // The endpoint comes back: the held reports and everything after them flow.
    signal(&s.cloud.proc, "CONT")?;
    s.steps(3).await?;
    s.all_reports_arrive().await?;
    let (code, health) = s.get("/health").await?;
    assert_eq!(code, 200, "{health}");
    Ok(())
}

/// The quarantine has its own bounded space: when it is full the oldest entries go, are
/// counted, and valid reports are not affected. Purge empties it on a stopped agent, and
/// says so plainly while the agent runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_quarantine_drops_its_oldest_and_reports_are_unaffected() -> Result<()> {
    let mut s = Stack::start(4, "[store]\nquarantine_bytes_max = 65536\n").await?;
    let data_dir = s.setup.config.parent().context("dir")?.join("agent-data");
    assert_eq!(mode(&data_dir)?, 0o700, "the agent creates its data directory 0700");
    let topic = s.report_topic();
    let garbage = 40u8;
    for g in 0..garbage {
        s.steps(1).await?;
        // Each entry keeps 4 KiB of payload (8 KiB in hex): about 7 fit in 64 KiB.
        s.devices.publish(&topic, &vec![g; 5000]).await?;
    }
    s.devices.wait_acked(Duration::from_secs(30)).await?;
    s.all_reports_arrive().await?;
    s.wait_metric(&format!("countersign_agent_quarantined_total {garbage}")).await?;
    let (_, m) = s.get("/metrics").await?;
    let dropped: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("countersign_agent_quarantine_dropped_total "))
        .context("no quarantine_dropped_total")?
        .parse()?;
    assert!(dropped >= u64::from(garbage) - 8, "only {dropped} dropped:\n{m}");
    let (code, health) = s.get("/health").await?;
    assert_eq!(code, 200, "{health}");
    assert!(health.contains("quarantine full"), "{health}");

    let running = run("countersign-agent", &["purge", "--config", &s.setup.config_arg(), "--quarantine"])?;
    assert!(!running.status.success());
    assert!(String::from_utf8_lossy(&running.stderr).contains("running"), "{running:?}");

    let inspect = s.stop_and_inspect()?;
    let kept = inspect["quarantined"].as_array().context("quarantined")?;
    assert_eq!(kept.len() as u64, u64::from(garbage) - dropped, "{inspect}");
    let newest = kept.last().context("none kept")?["payload_hex"].as_str().unwrap_or("");
    assert!(newest.starts_with(&hex::encode([garbage - 1; 4])), "the newest entry is kept");
    assert_eq!(inspect["stats"]["pending"], 0, "{inspect}");

    let purged: serde_json::Value = serde_json::from_str(&run_ok(
        "countersign-agent",
        &["purge", "--config", &s.setup.config_arg(), "--quarantine"],
    )?)?;
    assert_eq!(purged["quarantine_removed"], kept.len(), "{purged}");
    assert_eq!(purged["stats"]["quarantined"], 0, "{purged}");
    Ok(())
}

fn mode(p: &Path) -> Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(p)?.permissions().mode() & 0o7777)
}

/// An existing data directory other users can read is refused at start, naming it.
#[test]
fn an_exposed_data_directory_is_refused_at_start() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("agent-data");
    std::fs::create_dir(&data)?;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755))?;
    let key = tmp.path().join("gateway.key");
    run_ok("countersign-agent", &["keygen", "--out", &key.display().to_string()])?;
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "gateway_id = 1\ngateway_key_file = \"{}\"\ndata_dir = \"{}\"\nendpoint_url = \"http://127.0.0.1:1\"\n\
             [http]\nlisten = \"\"\n",
            key.display(),
            data.display()
        ),
    )?;
    let out = run("countersign-agent", &["run", "--config", &config.display().to_string()])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&data.display().to_string()) && err.contains("0755"), "{err}");

    // And a plain http endpoint off loopback is a config error naming the key that allows it.
    std::fs::write(
        &config,
        format!(
            "gateway_id = 1\ngateway_key_file = \"{}\"\ndata_dir = \"{}\"\nendpoint_url = \"http://192.0.2.1:8080\"\n",
            key.display(),
            data.display()
        ),
    )?;
    let out = run("countersign-agent", &["check-config", "--config", &config.display().to_string()])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("endpoint_url") && err.contains("allow_plain_http"), "{err}");
    Ok(())
}
