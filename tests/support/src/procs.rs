//! The project's binaries (and other programs, such as `openssl s_server`) as child
//! processes: found in the target directory of the running test or given by path, optionally
//! behind a runner such as QEMU, killed when dropped. Knows nothing of what they do.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use anyhow::{bail, Context, Result};

/// The target directory the running test was built into (`target/`).
pub fn target_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> → target
    exe.parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .map(Path::to_owned)
        .context("test binary has no target dir")
}

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

/// How to start a program: an optional runner prefix (e.g. `qemu-aarch64 -L
/// /usr/aarch64-linux-gnu` for a cross-built binary) followed by an explicit binary path.
#[derive(Clone, Debug)]
pub struct Exe {
    runner: Vec<OsString>,
    binary: PathBuf,
}

impl Exe {
    /// A binary of this workspace for the host, run directly (see [`bin`]).
    pub fn workspace(name: &str) -> Result<Self> {
        Ok(Self { runner: Vec::new(), binary: bin(name)? })
    }

    /// `binary`, started through `runner` (program and its arguments; empty = run directly).
    /// Fails if the binary or the runner's program does not exist.
    pub fn with_runner(runner: &[&str], binary: impl Into<PathBuf>) -> Result<Self> {
        let binary = binary.into();
        if !binary.exists() {
            bail!("{} not found", binary.display());
        }
        if let Some(program) = runner.first() {
            which(program).with_context(|| format!("runner `{program}` is not installed"))?;
        }
        Ok(Self { runner: runner.iter().map(OsString::from).collect(), binary })
    }

    /// The binary it runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// A `Command` for this program with `args`.
    pub fn command<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Command {
        let mut c = match self.runner.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&self.binary);
                c
            }
            None => Command::new(&self.binary),
        };
        c.args(args);
        c
    }

    /// Runs it to completion and returns its output.
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        self.command(args).output().with_context(|| format!("cannot run {}", self.describe()))
    }

    /// Runs it and fails unless it exits 0; returns stdout.
    pub fn run_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args)?;
        if !out.status.success() {
            bail!("{} {args:?} failed: {}", self.describe(), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn describe(&self) -> String {
        let mut parts: Vec<String> = self.runner.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        parts.push(self.binary.display().to_string());
        parts.join(" ")
    }
}

/// Whether this process runs as root (asked of the `id` command).
pub fn running_as_root() -> std::io::Result<bool> {
    let uid = Command::new("id").arg("-u").output()?;
    Ok(String::from_utf8_lossy(&uid.stdout).trim() == "0")
}

/// The full path of `program` on `PATH` (or `program` itself if it contains a slash).
pub fn which(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Path::new(program).exists().then(|| PathBuf::from(program));
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(program)).find(|p| p.is_file())
}

/// Runs a binary to completion and returns its output.
pub fn run(name: &str, args: &[&str]) -> Result<Output> {
    Exe::workspace(name)?.run(args)
}

/// Runs a binary and fails unless it exits 0; returns stdout.
pub fn run_ok(name: &str, args: &[&str]) -> Result<String> {
    Exe::workspace(name)?.run_ok(args)
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
        Self::spawn_exe(&Exe::workspace(name)?, args, log)
    }

    /// Starts `exe args` (with the exe's runner prefix, if any), appending stdout and stderr
    /// to `log`.
    pub fn spawn_exe(exe: &Exe, args: &[&str], log: &Path) -> Result<Self> {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = exe
            .command(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("cannot start {}", exe.describe()))?;
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

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
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
