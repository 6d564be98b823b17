//! The buffer on a disk that fills up, against a real (small) filesystem: every report whose
//! flush returned `Ok` must still be there after the disk was full, the database was
//! reopened while still full, and space came back — and the database must open as intact
//! (not be refused as corrupt, which would move it aside with every report in it).
//!
//! Needs root for a tmpfs of its own (CI runs as root); without root it says so loudly and
//! checks nothing, unless `COUNTERSIGN_REQUIRE_ROOT=1`, which makes that a failure.

use std::path::Path;
use std::time::Duration;

use countersign_agent::store::{free_bytes, Buffer, StoreError};
use countersign_meter::RecordId;
use countersign_testkit::disk::Tmpfs;
use countersign_testkit::procs::running_as_root;

const DISK_BYTES: u64 = 16 * 1024 * 1024;
/// Free space left for the buffer before it starts: sled fills it within seconds.
const ROOM_BYTES: u64 = 3 * 1024 * 1024;
const GROUP_REPORTS: u32 = 200;
/// Opens attempted while the disk is (nearly) full, as the agent's supervisor would without
/// its free-space wait (the store must survive both). Before each, this much more space is
/// given back, so the opens fail at different steps (sled's snapshot among them).
const FULL_OPEN_SLACK_BYTES: [u64; 6] = [0, 4096, 16 * 1024, 64 * 1024, 256 * 1024, 1024 * 1024];

/// The test's own small disk, or `None` (said loudly) when not running as root.
fn mount_disk(dir: &Path) -> Option<Tmpfs> {
    if !running_as_root().expect("id runs") {
        assert!(
            std::env::var_os("COUNTERSIGN_REQUIRE_ROOT").is_none(),
            "COUNTERSIGN_REQUIRE_ROOT is set but this test does not run as root"
        );
        eprintln!("full_disk: NOT CHECKED: mounting a tmpfs needs root");
        return None;
    }
    let disk = Tmpfs::mount(dir, DISK_BYTES)
        .unwrap_or_else(|e| panic!("running as root but cannot mount a tmpfs at {}: {e}", dir.display()));
    Some(disk)
}

/// Fills the filesystem of `path` until at most `leave_bytes` are free.
fn fill(path: &Path, leave_bytes: u64) {
    use std::io::Write;
    let dir = path.parent().expect("filler has a directory");
    let mut f = std::fs::File::create(path).expect("filler");
    let chunk = vec![0u8; 64 * 1024];
    while free_bytes(dir).expect("statvfs") > leave_bytes {
        if f.write_all(&chunk).is_err() {
            break;
        }
    }
    f.sync_all().expect("filler sync");
}

fn id(seq: u32) -> RecordId {
    RecordId { meter_id: 7, epoch: 1, seq }
}

/// Opens, retrying only while an earlier handle's file lock is still being released.
fn open(dir: &Path) -> Result<Buffer, StoreError> {
    for _ in 0..100 {
        match Buffer::open(dir, 1 << 20) {
            Err(StoreError::Open { source: sled::Error::Io(e), .. }) if e.to_string().contains("lock") => {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
    Buffer::open(dir, 1 << 20)
}

/// Writes groups of reports until a write or flush fails; returns the acked seqs (those
/// whose flush returned Ok).
async fn write_until_full(b: &Buffer, next: &mut u32, acked: &mut Vec<u32>) -> StoreError {
    let payload = [0x5au8; 48];
    loop {
        let first = *next;
        *next += GROUP_REPORTS;
        let r = async {
            for s in first..first + GROUP_REPORTS {
                b.put_report(id(s), 1_790_000_000_000, &payload)?;
            }
            b.bump_generation()?;
            b.flush().await
        }
        .await;
        match r {
            Ok(()) => acked.extend(first..first + GROUP_REPORTS),
            Err(e) => return e,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_reports_survive_a_full_disk_and_reopens() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some(disk) = mount_disk(&tmp.path().join("disk")) else { return };
    let db = disk.path().join("db");
    let filler = disk.path().join("filler");
    fill(&filler, ROOM_BYTES);
    let mut acked: Vec<u32> = Vec::new();
    let mut next = 0u32;

    let b = open(&db).expect("first open with room left");
    let e = write_until_full(&b, &mut next, &mut acked).await;
    eprintln!("full after {} acked reports: {e}", acked.len());
    assert!(!acked.is_empty(), "nothing fitted before the disk was full");
    drop(b);

    // Opening on the still-full disk may fail, but must not damage the database.
    for (attempt, slack) in FULL_OPEN_SLACK_BYTES.into_iter().enumerate() {
        std::thread::sleep(Duration::from_millis(100));
        let len = std::fs::metadata(&filler).expect("filler").len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&filler)
            .and_then(|f| f.set_len(len.saturating_sub(slack)))
            .expect("shrink the filler");
        match open(&db) {
            Ok(b) => {
                let e = write_until_full(&b, &mut next, &mut acked).await;
                eprintln!("open {attempt} (+{slack} B) on a full disk: opened, then {e}");
            }
            Err(e) => {
                assert!(
                    !matches!(e, StoreError::Open { source: sled::Error::Corruption { .. }, .. }),
                    "open {attempt} on a full disk calls the database corrupt: {e}"
                );
                eprintln!("open {attempt} (+{slack} B) on a full disk: {e}");
            }
        }
    }

    std::fs::remove_file(&filler).expect("free the space");
    std::thread::sleep(Duration::from_millis(100));
    let b = open(&db).expect("the database opens once space is back");
    let have: std::collections::HashSet<u32> =
        b.next_batch(usize::MAX, usize::MAX).expect("pending").iter().map(|p| p.id.seq).collect();
    let missing: Vec<u32> = acked.iter().copied().filter(|s| !have.contains(s)).collect();
    eprintln!(
        "acked {} reports, {} present after recovery, {} missing",
        acked.len(),
        have.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "{} flushed reports lost, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );

    // And it works normally again.
    for s in next..next + GROUP_REPORTS {
        b.put_report(id(s), 1_790_000_000_000, &[1u8; 48]).expect("write after recovery");
    }
    b.flush().await.expect("flush after recovery");
}
