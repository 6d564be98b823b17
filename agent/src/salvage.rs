//! Getting reports out of a database the agent moved aside as corrupt.
//!
//! sled is asked to open it and its pending reports are read; and, because sled may open a
//! damaged database and silently miss part of it, the files are also scanned byte by byte
//! for what a pending value looks like: a plausible big-endian receive time in milliseconds
//! followed by a report that decodes. The union of both is returned.
//! The scan cannot check tags (the agent has no meter keys), so it may find a few false
//! candidates; the endpoint verifies every tag and deduplicates by record id, so re-sending
//! candidates can neither forge usage nor count anything twice.

use std::collections::BTreeSet;
use std::path::Path;

use countersign_meter::report::{Report, REPORT_BYTES_MAX, REPORT_BYTES_MIN, REPORT_VERSION};
use serde::{Deserialize, Serialize};

use crate::store::Buffer;

/// Receive times before this (2020-01-01) are not ones this agent wrote.
const RECEIVED_MS_MIN: u64 = 1_577_836_800_000;
/// Receive times after this (2100-01-01) are not ones this agent wrote.
const RECEIVED_MS_MAX: u64 = 4_102_444_800_000;
/// Files larger than this are not scanned (a gateway's buffer is far smaller).
pub const SCAN_FILE_BYTES_MAX: u64 = 4 * 1024 * 1024 * 1024;
/// Attempts to open a database whose lock is still held, 50 ms apart.
const SLED_LOCK_RETRIES: u32 = 40;
/// Most candidates one salvage returns.
pub const CANDIDATES_MAX: usize = 10_000_000;

/// A report recovered from an old database.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Candidate {
    /// Gateway receive time, Unix ms.
    pub received_ms: u64,
    /// The report bytes, hex.
    pub report_hex: String,
}

/// How the candidates were found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Method {
    /// Whether sled could open the database (its pending reports are included).
    pub sled_opened: bool,
    /// Candidates the raw scan found (overlapping with sled's).
    pub scanned: usize,
}

/// Why salvage failed.
#[derive(Debug, thiserror::Error)]
pub enum SalvageError {
    /// The directory or one of its files could not be read. Not recoverable here.
    #[error("cannot read {path}: {source}")]
    Read {
        /// What could not be read.
        path: String,
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// Recovers what it can from the database directory `dir`.
pub fn salvage(dir: &Path) -> Result<(Method, Vec<Candidate>), SalvageError> {
    let mut found = BTreeSet::new();
    let open = || std::panic::catch_unwind(|| Buffer::open(dir, 8 * 1024 * 1024));
    let mut opened = open();
    // A database closed a moment ago may still be locked by sled's background thread.
    for _ in 0..SLED_LOCK_RETRIES {
        if !matches!(opened, Ok(Err(crate::store::StoreError::Open { source: sled::Error::Io(_), .. }))) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        opened = open();
    }
    let mut sled_opened = false;
    if let Ok(Ok(b)) = opened {
        if let Ok(batch) = b.next_batch(CANDIDATES_MAX, usize::MAX) {
            sled_opened = true;
            found.extend(
                batch
                    .into_iter()
                    .map(|p| Candidate { received_ms: p.received_ms, report_hex: hex::encode(&p.report) }),
            );
        }
    }
    let mut scanned = BTreeSet::new();
    scan_dir(dir, &mut scanned)?;
    let method = Method { sled_opened, scanned: scanned.len() };
    found.extend(scanned);
    Ok((method, found.into_iter().collect()))
}

fn scan_dir(dir: &Path, found: &mut BTreeSet<Candidate>) -> Result<(), SalvageError> {
    let read_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| SalvageError::Read { path, source }
    };
    for entry in std::fs::read_dir(dir).map_err(read_err(dir))? {
        let entry = entry.map_err(read_err(dir))?;
        let path = entry.path();
        let meta = entry.metadata().map_err(read_err(&path))?;
        if meta.is_dir() {
            scan_dir(&path, found)?;
        } else if meta.is_file() && meta.len() <= SCAN_FILE_BYTES_MAX {
            let bytes = std::fs::read(&path).map_err(read_err(&path))?;
            scan_bytes(&bytes, found);
        }
    }
    Ok(())
}

/// Finds every `received_ms ‖ report` pattern in `bytes`. Pure; never panics.
pub fn scan_bytes(bytes: &[u8], found: &mut BTreeSet<Candidate>) {
    let mut i = 0usize;
    while i + 8 + REPORT_BYTES_MIN <= bytes.len() && found.len() < CANDIDATES_MAX {
        let ms = u64::from_be_bytes([
            bytes[i],
            bytes[i + 1],
            bytes[i + 2],
            bytes[i + 3],
            bytes[i + 4],
            bytes[i + 5],
            bytes[i + 6],
            bytes[i + 7],
        ]);
        if (RECEIVED_MS_MIN..RECEIVED_MS_MAX).contains(&ms) && bytes[i + 8] == REPORT_VERSION {
            let start = i + 8;
            let end_max = (start + REPORT_BYTES_MAX).min(bytes.len());
            // The stored length is not next to the value, so every length that decodes is a
            // candidate; the endpoint's tag check tells the right one.
            for end in start + REPORT_BYTES_MIN..=end_max {
                if Report::decode(&bytes[start..end]).is_ok() {
                    found.insert(Candidate { received_ms: ms, report_hex: hex::encode(&bytes[start..end]) });
                }
            }
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use countersign_meter::DeviceTime;
    use countersign_testkit::report::ReportBuilder;

    fn report(seq: u32) -> Vec<u8> {
        ReportBuilder::new(12, seq, 8_988_280_666_000_000_012, DeviceTime::uptime(seq).unwrap())
            .epoch(1)
            .used(u64::from(seq) * 1000, 7)
            .encode(&[9u8; 32])
    }

    #[test]
    fn finds_reports_in_noise() {
        let mut bytes = vec![0xa5u8; 100];
        let mut want = Vec::new();
        for seq in 0..5u32 {
            let ms = 1_790_000_000_000u64 + u64::from(seq);
            bytes.extend_from_slice(&ms.to_be_bytes());
            let r = report(seq);
            want.push(Candidate { received_ms: ms, report_hex: hex::encode(&r) });
            bytes.extend_from_slice(&r);
            bytes.extend_from_slice(&[0x11; 37]);
        }
        let mut found = BTreeSet::new();
        scan_bytes(&bytes, &mut found);
        for w in &want {
            assert!(found.contains(w), "missing {w:?}");
        }
    }

    #[test]
    fn reads_an_intact_database_through_sled() {
        let dir = tempfile::tempdir().unwrap();
        {
            let b = Buffer::open(dir.path(), 1 << 20).unwrap();
            for seq in 0..3 {
                let (r, _) = Report::decode(&report(seq)).unwrap();
                b.put_report(r.id(), 1_790_000_000_000, &report(seq)).unwrap();
            }
            b.flush_blocking().unwrap();
        }
        let (method, c) = salvage(dir.path()).unwrap();
        assert!(method.sled_opened);
        for seq in 0..3 {
            assert!(c.iter().any(|c| c.report_hex == hex::encode(report(seq))));
        }
    }

    #[test]
    fn scans_a_database_sled_cannot_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let b = Buffer::open(dir.path(), 1 << 20).unwrap();
            for seq in 0..50 {
                let (r, _) = Report::decode(&report(seq)).unwrap();
                b.put_report(r.id(), 1_790_000_000_000 + u64::from(seq), &report(seq)).unwrap();
            }
            b.flush_blocking().unwrap();
        }
        // What sled cannot read is found by the scan alone.
        let mut c = BTreeSet::new();
        scan_dir(dir.path(), &mut c).unwrap();
        let reports: BTreeSet<String> = c.iter().map(|c| c.report_hex.clone()).collect();
        for seq in 0..50 {
            assert!(reports.contains(&hex::encode(report(seq))), "seq {seq} not recovered");
        }
    }

    proptest::proptest! {
        #[test]
        fn scan_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000)) {
            let mut found = BTreeSet::new();
            scan_bytes(&bytes, &mut found);
        }
    }
}
