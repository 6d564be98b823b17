//! The project's binaries as child processes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use anyhow::{bail, Context, Result};

/// Path of a binary of this workspace, built by `cargo build --workspace --bins` into the
/// same target directory as the running test.
pub fn bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).context("test binary has no target dir")?;
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} not found; build the workspace binaries first (cargo build --workspace --bins)",
            p.display()
        );
    }
    Ok(p)
}

/// Runs a binary to completion and returns its output.
pub fn run(name: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(bin(name)?).args(args).output().with_context(|| format!("cannot run {name}"))?;
    Ok(out)
}

/// Runs a binary and fails unless it exits 0; returns stdout.
pub fn run_ok(name: &str, args: &[&str]) -> Result<String> {
    let out = run(name, args)?;
    if !out.status.success() {
        bail!("{name} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A long-running child, logging to a file, killed (SIGKILL) on drop.
pub struct Proc {
    child: Option<Child>,
    /// Its log file.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `name args`, appending stdout and stderr to `log`.
    pub fn spawn(name: &str, args: &[&str], log: &Path) -> Result<Self> {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = Command::new(bin(name)?)
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Self { child: Some(child), log: log.to_owned() })
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a graceful exit; returns whether it exited 0.
    pub fn terminate(&mut self) -> bool {
        match self.child.take() {
            Some(mut c) => {
                let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
                c.wait().map(|s| s.success()).unwrap_or(false)
            }
            None => false,
        }
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The log so far, for failure messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}
