//! Opening the buffer: a database sled calls corrupt (or panics on) is moved aside, beside
//! the original and stamped with the time, and a fresh one started, so the agent never
//! crash-loops on it.
//!
//! It knows nothing about the tasks or the network; when to (re)open is the supervisor's call.

use std::path::{Path, PathBuf};

use tracing::{error, info};

use crate::config::AgentConfig;
use crate::status::{now_ms, AgentStatus};
use crate::store::{secure_data_dir, Buffer, StoreError};

/// Opens the buffer. A database sled reports as corrupt (or panics on) is moved aside and a
/// fresh one started, loudly, so the agent never crash-loops on it. Other errors (locked by
/// another process, permissions, disk) are returned.
pub fn open_buffer(config: &AgentConfig, status: &AgentStatus) -> Result<Buffer, StoreError> {
    let dir = &config.data_dir;
    let attempt = || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Buffer::open_with(dir, config.cache_capacity_bytes, config.side_limits)
        }))
    };
    let why = match attempt() {
        Ok(Ok(b)) => {
            let s = b.stats();
            info!(
                pending = b.pending_count(),
                quarantined = s.quarantined,
                rejected = s.rejected,
                "buffer open"
            );
            return Ok(b);
        }
        Ok(Err(StoreError::Open {
            source: e @ (sled::Error::Corruption { .. } | sled::Error::ReportableBug(_)),
            ..
        })) => e.to_string(),
        Ok(Err(e @ StoreError::LostData { .. })) => e.to_string(),
        Ok(Err(e)) => return Err(e),
        Err(_) => "sled panicked while opening it".to_owned(),
    };
    let aside = moved_aside_path(dir, now_ms());
    error!(
        data_dir = %dir.display(),
        moved_to = %aside.display(),
        reason = %why,
        "DATABASE CORRUPT: moved aside, starting a fresh one; run `countersign-agent salvage` to re-send what it holds"
    );
    std::fs::rename(dir, &aside).map_err(|e| StoreError::Io(sled::Error::Io(e)))?;
    status.set_moved_aside(aside.display().to_string());
    secure_data_dir(dir)?;
    match attempt() {
        Ok(r) => r,
        Err(_) => Err(StoreError::Corrupt("sled panicked while creating a fresh database")),
    }
}

/// Where a corrupt database directory goes: beside it, stamped with the time.
pub fn moved_aside_path(dir: &Path, now_ms: u64) -> PathBuf {
    let mut name = dir.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".corrupt-{now_ms}"));
    dir.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_db_goes_beside_the_original() {
        assert_eq!(
            moved_aside_path(Path::new("/var/lib/countersign-agent"), 42),
            PathBuf::from("/var/lib/countersign-agent.corrupt-42")
        );
    }
}
