//! A small filesystem of a test's own (a tmpfs), so filling it up harms nothing else. Mounting
//! needs root ([`crate::procs::running_as_root`]); what a test does without root is the
//! test's to decide.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted for a test, unmounted (lazily) when dropped.
#[derive(Debug)]
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_bytes` at `dir` (created if missing). Needs root.
    pub fn mount(dir: &Path, size_bytes: u64) -> std::io::Result<Tmpfs> {
        std::fs::create_dir_all(dir)?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_bytes}"), "tmpfs"])
            .arg(dir)
            .status()?
            .success();
        if !ok {
            return Err(std::io::Error::other(format!("mount of a tmpfs at {} failed", dir.display())));
        }
        Ok(Tmpfs { dir: dir.to_owned() })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}
