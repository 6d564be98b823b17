//! The disk reserve and the hold decision: whether the committer may write a group now
//! ([`hold_reason`], pure), the free space of the buffer's filesystem, and waiting for room to
//! (re)open the database.
//!
//! It knows nothing about MQTT, acks or uploads: the committer acts on its answer.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::config::AgentConfig;
use crate::status::AgentStatus;

/// Least free space before the database is (re)opened, whatever the configured reserve:
/// sled writes a snapshot and a segment at open, and a failed open on a full disk leaves
/// debris behind (see `store` module docs).
pub const REOPEN_FREE_BYTES_MIN: u64 = 1024 * 1024;
/// How often the agent looks at the free space while it waits for some.
const DISK_RECHECK_MS: u64 = 1000;

/// Why the committer holds a group of reports back (unacked, so the broker keeps them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// The buffer would pass its quota of logical bytes.
    Quota,
    /// The filesystem has less free space than the configured reserve.
    DiskLow,
}

/// Whether a group costing `cost_bytes` may be written now. Pure. `free_bytes` is `None`
/// when the free space could not be read (the store's own errors then speak); a reserve of
/// 0 turns the disk check off.
pub fn hold_reason(
    buffered_bytes: u64,
    cost_bytes: u64,
    quota_bytes: u64,
    free_bytes: Option<u64>,
    reserve_bytes: u64,
) -> Option<Hold> {
    // An empty buffer takes any group: a group larger than the whole quota would otherwise
    // be held for ever.
    if buffered_bytes > 0 && buffered_bytes.saturating_add(cost_bytes) > quota_bytes {
        return Some(Hold::Quota);
    }
    match free_bytes {
        Some(free) if reserve_bytes > 0 && free < reserve_bytes => Some(Hold::DiskLow),
        _ => None,
    }
}

/// The directory whose filesystem holds the buffer: the data directory, or its parent
/// before the data directory exists.
fn buffer_fs(config: &AgentConfig) -> &Path {
    let dir = config.data_dir.as_path();
    if dir.exists() {
        dir
    } else {
        dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
    }
}

/// Free bytes on the buffer's filesystem, also recorded in `status`.
pub(super) fn look_at_disk(config: &AgentConfig, status: &AgentStatus) -> Option<u64> {
    match crate::store::free_bytes(buffer_fs(config)) {
        Ok(free) => {
            status.disk_free_bytes.store(free, Ordering::Relaxed);
            Some(free)
        }
        Err(e) => {
            debug!(error = %e, "cannot read the free space of the buffer's filesystem");
            None
        }
    }
}

/// Waits until the buffer's filesystem has room to open the database
/// ([`REOPEN_FREE_BYTES_MIN`]; the reserve only governs acking, so that a gateway short of
/// space still uploads what it holds). Returns false if shutdown came first.
pub(super) async fn wait_for_space<F: Future<Output = ()>>(
    config: &AgentConfig,
    status: &AgentStatus,
    shutdown: &mut std::pin::Pin<&mut F>,
) -> bool {
    let need = REOPEN_FREE_BYTES_MIN;
    let mut waiting = false;
    loop {
        match look_at_disk(config, status) {
            Some(free) if free < need => {
                if !waiting {
                    waiting = true;
                    status.disk_low.store(true, Ordering::Relaxed);
                    warn!(
                        free_bytes = free,
                        need_bytes = need,
                        data_dir = %config.data_dir.display(),
                        "disk full; waiting for free space before opening the database (the broker keeps the reports)"
                    );
                }
            }
            _ => {
                if waiting {
                    status.disk_low.store(false, Ordering::Relaxed);
                    info!("free space is back; opening the database");
                }
                return true;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(DISK_RECHECK_MS)) => {}
            _ = shutdown.as_mut() => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_at_quota_and_below_the_disk_reserve() {
        assert_eq!(hold_reason(90, 10, 100, Some(1 << 30), 1 << 20), None, "exactly at the quota fits");
        assert_eq!(hold_reason(91, 10, 100, Some(1 << 30), 1 << 20), Some(Hold::Quota));
        assert_eq!(hold_reason(u64::MAX, 1, 100, None, 0), Some(Hold::Quota), "no overflow");
        assert_eq!(hold_reason(0, 10, 100, Some((1 << 20) - 1), 1 << 20), Some(Hold::DiskLow));
        assert_eq!(hold_reason(0, 10, 100, Some(1 << 20), 1 << 20), None);
        assert_eq!(hold_reason(0, 10, 100, Some(0), 0), None, "a reserve of 0 turns the check off");
        assert_eq!(hold_reason(0, 10, 100, None, 1 << 20), None, "unknown free space does not hold");
    }

    #[test]
    fn an_empty_buffer_takes_a_group_larger_than_the_quota() {
        assert_eq!(hold_reason(0, 1000, 100, None, 0), None);
        assert_eq!(hold_reason(1, 1000, 100, None, 0), Some(Hold::Quota));
    }
}
