//! The real processes of a Countersign deployment, started for a test: an endpoint, keys
//! registered through the real commands, and agents.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use countersign_meter::Totals;
use countersign_testkit::endpoint::EndpointProcess;
use countersign_testkit::free_port;
use countersign_testkit::procs::{run_ok, Exe, Proc};

use crate::fleet::Outgoing;
use crate::publisher::Publisher;

/// A running `countersign-cloud serve`.
pub struct Cloud {
    /// The process.
    pub proc: Proc,
    /// Its base URL.
    pub url: String,
    /// The admin token file.
    pub token_file: String,
    /// The admin token.
    pub token: String,
}

impl Cloud {
    /// Starts an endpoint with its embedded store under `dir`.
    pub async fn start(dir: &Path) -> Result<Cloud> {
        let token_file = dir.join("admin.token");
        run_ok("countersign-cloud", &["keygen-token", "--out", &token_file.display().to_string()])?;
        let token = std::fs::read_to_string(&token_file)?.trim().to_owned();
        let config = format!(
            "data_dir = \"{}\"\nadmin_token_file = \"{}\"\n",
            dir.join("cloud-data").display(),
            token_file.display()
        );
        let exe = Exe::workspace("countersign-cloud")?;
        let endpoint = EndpointProcess::start(&exe, dir, "cloud", &config, Duration::from_secs(20)).await?;
        Ok(Cloud {
            proc: endpoint.proc,
            url: endpoint.url,
            token_file: token_file.display().to_string(),
            token,
        })
    }

    /// Registers a gateway key (made with `countersign-agent keygen`) and every meter key,
    /// through the real commands.
    pub fn register(&self, dir: &Path, gateway_key: &Path, meters: &[(u64, [u8; 32], u64)]) -> Result<()> {
        let public = run_ok("countersign-agent", &["keygen", "--out", &gateway_key.display().to_string()])?;
        run_ok(
            "countersign-cloud",
            &[
                "register-gateway",
                "--endpoint",
                &self.url,
                "--token-file",
                &self.token_file,
                "--gateway-id",
                "1",
                "--public-key",
                public.trim(),
            ],
        )?;
        self.register_meters(dir, meters)
    }

    /// Registers meter keys through `countersign-cloud register-meter`.
    pub fn register_meters(&self, dir: &Path, meters: &[(u64, [u8; 32], u64)]) -> Result<()> {
        for (meter_id, key, _) in meters {
            let path = dir.join(format!("meter-{meter_id}.key"));
            if !path.exists() {
                countersign_protocol::keys::write_secret(&path, key)?;
            }
            run_ok(
                "countersign-cloud",
                &[
                    "register-meter",
                    "--endpoint",
                    &self.url,
                    "--token-file",
                    &self.token_file,
                    "--meter-id",
                    &meter_id.to_string(),
                    "--key-file",
                    &path.display().to_string(),
                ],
            )?;
        }
        Ok(())
    }

    /// Per-SIM totals and the grand total, as the endpoint derives them (every page).
    pub async fn usage_sims(&self) -> Result<(BTreeMap<u64, Totals>, u64)> {
        let mut sims = BTreeMap::new();
        let mut total = 0u64;
        let mut after: Option<String> = None;
        loop {
            let mut url = format!("{}/v1/usage/sims?limit=10000", self.url);
            if let Some(a) = &after {
                url.push_str(&format!("&after={a}"));
            }
            let v: serde_json::Value = reqwest::Client::new()
                .get(url)
                .bearer_auth(&self.token)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            for s in v["sims"].as_array().context("no sims")? {
                let iccid: u64 = s["iccid"].as_str().context("iccid")?.parse()?;
                let t = Totals {
                    up: s["up_bytes"].as_u64().context("up")?,
                    down: s["down_bytes"].as_u64().context("down")?,
                };
                sims.insert(iccid, t);
            }
            total += v["total_bytes"].as_u64().context("total")?;
            match v["next_after"].as_str() {
                Some(a) => after = Some(a.to_owned()),
                None => return Ok((sims, total)),
            }
        }
    }

    /// Waits until the endpoint's grand total is `total` (or the timeout passes) and returns
    /// the per-SIM figures it then has.
    pub async fn wait_for_total(
        &self,
        total: u64,
        timeout: Duration,
    ) -> Result<(BTreeMap<u64, Totals>, u64)> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (sims, got) = self.usage_sims().await?;
            if got == total || tokio::time::Instant::now() > deadline {
                return Ok((sims, got));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// An agent's configuration on disk.
pub struct AgentSetup {
    /// The config file.
    pub config: PathBuf,
    /// Its status listener port.
    pub status_port: u16,
    /// Its log file.
    pub log: PathBuf,
}

impl AgentSetup {
    /// Writes a config for gateway 1 under `dir` with `data_dir` and extra TOML appended to
    /// the `[batch]` section... as whole sections in `extra`.
    pub fn write(
        dir: &Path,
        data_dir: &Path,
        mqtt_port: u16,
        endpoint_url: &str,
        extra: &str,
    ) -> Result<AgentSetup> {
        let status_port = free_port()?;
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "gateway_id = 1\ngateway_key_file = \"{}\"\ndata_dir = \"{}\"\nendpoint_url = \"{endpoint_url}\"\n\
                 [mqtt]\nport = {mqtt_port}\nclient_id = \"e2e-agent\"\n\
                 [http]\nlisten = \"127.0.0.1:{status_port}\"\ntimeout_ms = 1000\n{extra}",
                dir.join("gateway.key").display(),
                data_dir.display(),
            ),
        )?;
        Ok(AgentSetup { config, status_port, log: dir.join("agent.log") })
    }

    /// The config path as a string, for command lines.
    pub fn config_arg(&self) -> String {
        self.config.display().to_string()
    }

    /// The agent's `/status`, if it answers.
    pub async fn status(&self) -> Option<serde_json::Value> {
        let r = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/status", self.status_port))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    /// Starts `countersign-agent run` and waits until it holds its subscription.
    pub async fn start(&self) -> Result<Proc> {
        let agent = Proc::spawn("countersign-agent", &["run", "--config", &self.config_arg()], &self.log)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.status().await {
                if s["broker_connected"] == true && s["broker_subscribed"] == true {
                    return Ok(agent);
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!("agent did not subscribe within 30 s: {}", agent.log_text());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Publishes every report and waits until the broker acknowledged all of them.
pub async fn publish_all(p: &mut Publisher, out: &[Outgoing]) -> Result<()> {
    for o in out {
        p.publish(&o.topic, &o.payload).await?;
    }
    p.wait_acked(Duration::from_secs(60)).await
}
