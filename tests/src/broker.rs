//! MQTT brokers for the demo and the tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use countersign_testkit::procs::running_as_root;

/// Starts rumqttd in this process on `127.0.0.1:port`. It runs on its own thread until the
/// process exits (rumqttd has no stop); its sessions live in memory.
pub fn start_embedded(port: u16) -> Result<()> {
    let toml_text = format!(
        r#"
id = 0
[router]
max_connections = 10010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 262144
max_inflight_count = 200
dynamic_filters = true
"#
    );
    let config: rumqttd::Config = toml::from_str(&toml_text).context("embedded broker config")?;
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .context("cannot start the embedded broker thread")?;
    Ok(())
}

/// A private Mosquitto on its own port and persistence directory, killed on drop.
pub struct Mosquitto {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// Where Debian installs the broker.
const MOSQUITTO_PATHS: [&str; 2] = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"];

fn mosquitto_bin() -> Result<&'static str> {
    MOSQUITTO_PATHS
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("mosquitto is not installed (apt-get install mosquitto; tests/run.sh does it)")
}

impl Mosquitto {
    /// Starts a broker on `port`, persisting to `dir`.
    pub async fn start(port: u16, dir: &Path) -> Result<Self> {
        Self::start_with(port, dir, "").await
    }

    /// [`Mosquitto::start`] with more configuration lines (e.g. a TLS listener).
    pub async fn start_with(port: u16, dir: &Path, extra: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        // Started as root, mosquitto switches to the `mosquitto` user, which cannot write
        // persistence into a root-owned temporary directory: the broker would then forget
        // sessions and queued reports on restart without a word. Keep the current user.
        let user_line = if running_as_root().unwrap_or(false) { "user root\n" } else { "" };
        // max_queued_messages 0 = unlimited: the default of 1000 would silently drop QoS 1
        // reports queued for an agent that is down. The same goes for production brokers.
        let conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n\
             max_queued_messages 0\nmax_inflight_messages 1000\nautosave_interval 1\nlog_dest file {}/mosquitto.log\n{user_line}{extra}",
            dir.display(),
            dir.display()
        );
        std::fs::write(dir.join("mosquitto.conf"), conf)?;
        let mut m = Self { port, dir: dir.to_owned(), child: None };
        m.spawn().await?;
        Ok(m)
    }

    async fn spawn(&mut self) -> Result<()> {
        let child = Command::new(mosquitto_bin()?)
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start mosquitto")?;
        self.child = Some(child);
        if !countersign_testkit::wait_for_port(self.port, Duration::from_secs(10)).await {
            bail!("mosquitto did not listen on port {}", self.port);
        }
        Ok(())
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops it (SIGTERM, so it saves its persistence file) and starts it again.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn().await
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM lets mosquitto write its persistence database.
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
