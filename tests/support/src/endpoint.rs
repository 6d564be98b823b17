//! A real `countersign-cloud serve` process on a free port of 127.0.0.1, for tests that need
//! the endpoint as a process (several at once, or beside other processes). Knows the
//! endpoint's command line and its `listen` setting; the rest of its configuration is the
//! caller's.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::net::{free_port, wait_for_port};
use crate::procs::{Exe, Proc};

/// A running endpoint process, killed when dropped.
pub struct EndpointProcess {
    /// The process.
    pub proc: Proc,
    /// Its base URL, `http://127.0.0.1:<port>`.
    pub url: String,
    /// The port it listens on.
    pub port: u16,
}

impl EndpointProcess {
    /// Writes `dir/<name>.toml` (`listen` on a free port, then `config`), starts
    /// `exe serve --config` on it with its log in `dir/<name>.log`, and waits up to `timeout`
    /// until it listens (it binds once its store is open, so it is ready by then).
    pub async fn start(exe: &Exe, dir: &Path, name: &str, config: &str, timeout: Duration) -> Result<Self> {
        let port = free_port()?;
        let config_file = dir.join(format!("{name}.toml"));
        std::fs::write(&config_file, format!("listen = \"127.0.0.1:{port}\"\n{config}"))?;
        let proc = Proc::spawn_exe(
            exe,
            &["serve", "--config", &config_file.display().to_string()],
            &dir.join(format!("{name}.log")),
        )?;
        if !wait_for_port(port, timeout).await {
            bail!("{name} did not listen: {}", proc.log_text());
        }
        Ok(EndpointProcess { proc, url: format!("http://127.0.0.1:{port}"), port })
    }
}
