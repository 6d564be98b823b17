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

/// sled's files per logical byte buffered, at most (measured ≈1.8× for reports; the store
/// docs and the quota's say 2.5×), as a fraction: what the files need for what is buffered.
const SLED_FILE_BYTES_PER_LOGICAL_NUM: u64 = 5;
const SLED_FILE_BYTES_PER_LOGICAL_DEN: u64 = 2;

/// The part of sled's files that sled can write into again before they grow: what they
/// take beyond what the buffered reports need. Pure. sled never gives space back to the
/// filesystem: after an outage that reached the disk reserve, the buffer drains but the
/// files keep their size, and judged by free space alone the agent would hold for ever.
pub fn reusable_bytes(files_bytes: u64, buffered_bytes: u64) -> u64 {
    let needed =
        buffered_bytes.saturating_mul(SLED_FILE_BYTES_PER_LOGICAL_NUM) / SLED_FILE_BYTES_PER_LOGICAL_DEN;
    files_bytes.saturating_sub(needed)
}

/// Whether a group costing `cost_bytes` may be written now. Pure. `free_bytes` is `None`
/// when the free space could not be read (the store's own errors then speak); a reserve of
/// 0 turns the disk check off. `reusable_bytes` ([`reusable_bytes`]) counts as free: sled
/// fills it before its files grow.
pub fn hold_reason(
    buffered_bytes: u64,
    cost_bytes: u64,
    quota_bytes: u64,
    free_bytes: Option<u64>,
    reusable_bytes: u64,
    reserve_bytes: u64,
) -> Option<Hold> {
    // An empty buffer takes any group: a group larger than the whole quota would otherwise
    // be held for ever.
    if buffered_bytes > 0 && buffered_bytes.saturating_add(cost_bytes) > quota_bytes {
        return Some(Hold::Quota);
    }
    match free_bytes {
        Some(free) if reserve_bytes > 0 && free.saturating_add(reusable_bytes) < reserve_bytes => {
            Some(Hold::DiskLow)
        }
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

/// Most directory entries counted by [`files_bytes`] (sled keeps a handful of files and a
/// `blobs` directory).
const DB_FILES_MAX: usize = 10_000;

/// Bytes the files under `dir` (and its subdirectories, one level down) occupy on their
/// filesystem; what cannot be read counts as 0, so the reserve errs towards holding.
pub(super) fn files_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fn walk(dir: &Path, depth: usize, seen: &mut usize) -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
        let mut total = 0u64;
        for entry in entries.flatten() {
            *seen += 1;
            if *seen > DB_FILES_MAX {
                break;
            }
            match entry.metadata() {
                Ok(m) if m.is_dir() && depth > 0 => {
                    total = total.saturating_add(walk(&entry.path(), depth - 1, seen))
                }
                Ok(m) if m.is_file() => total = total.saturating_add(m.blocks().saturating_mul(512)),
                _ => {}
            }
        }
        total
    }
    walk(dir, 1, &mut 0)
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
        assert_eq!(hold_reason(90, 10, 100, Some(1 << 30), 0, 1 << 20), None, "exactly at the quota fits");
        assert_eq!(hold_reason(91, 10, 100, Some(1 << 30), 0, 1 << 20), Some(Hold::Quota));
        assert_eq!(hold_reason(u64::MAX, 1, 100, None, 0, 0), Some(Hold::Quota), "no overflow");
        assert_eq!(hold_reason(0, 10, 100, Some((1 << 20) - 1), 0, 1 << 20), Some(Hold::DiskLow));
        assert_eq!(hold_reason(0, 10, 100, Some(1 << 20), 0, 1 << 20), None);
        assert_eq!(hold_reason(0, 10, 100, Some(0), 0, 0), None, "a reserve of 0 turns the check off");
        assert_eq!(hold_reason(0, 10, 100, None, 0, 1 << 20), None, "unknown free space does not hold");
    }

    #[test]
    fn an_empty_buffer_takes_a_group_larger_than_the_quota() {
        assert_eq!(hold_reason(0, 1000, 100, None, 0, 0), None);
        assert_eq!(hold_reason(1, 1000, 100, None, 0, 0), Some(Hold::Quota));
    }

    #[test]
    fn files_bytes_counts_files_and_one_level_of_directories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db"), vec![1u8; 64 * 1024]).unwrap();
        std::fs::create_dir(dir.path().join("blobs")).unwrap();
        std::fs::write(dir.path().join("blobs").join("1"), vec![1u8; 64 * 1024]).unwrap();
        let n = files_bytes(dir.path());
        assert!((128 * 1024..=136 * 1024).contains(&n), "{n}");
        assert_eq!(files_bytes(&dir.path().join("missing")), 0);
    }

    /// The 14-day outage of tests/benches/agent_footprint.rs: 64 MiB partition, 16 MiB
    /// reserve, sled's files at 48 MiB when the reserve was reached; once the backlog has
    /// drained, the files are as large but empty, and the agent must take reports again.
    #[test]
    fn space_sled_can_reuse_counts_as_free() {
        let (reserve, free, files) = (16u64 << 20, 15u64 << 20, 48u64 << 20);
        let full = 26u64 << 20; // logical bytes when the reserve was reached (≈1.8× on disk)
        assert_eq!(reusable_bytes(files, full), 0, "a full buffer leaves nothing to reuse");
        let r = reusable_bytes(files, full);
        assert_eq!(hold_reason(full, 1000, 128 << 20, Some(free), r, reserve), Some(Hold::DiskLow));
        let r = reusable_bytes(files, 0);
        assert_eq!(r, files);
        assert_eq!(hold_reason(0, 1000, 128 << 20, Some(free), r, reserve), None, "drained: acking resumes");
        // Refilling: the hold comes back once what is buffered needs the files again.
        let half = 12u64 << 20;
        assert_eq!(reusable_bytes(files, half), files - half * 5 / 2);
        let r = reusable_bytes(files, 19 << 20);
        assert_eq!(hold_reason(19 << 20, 1000, 128 << 20, Some(free), r, reserve), Some(Hold::DiskLow));
        assert_eq!(reusable_bytes(0, u64::MAX), 0, "no overflow");
    }
}
