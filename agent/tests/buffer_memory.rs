//! The buffer's page cache is bounded: a backlog far larger than `cache_capacity` does not
//! stay in memory. Unpatched sled 0.34.7 kept every page of a database accessed fewer than
//! ~16 000 times (256 LRU shards × 64 queued accesses) whatever the cache size, so the
//! agent's RSS grew with its backlog; see vendor/sled/COUNTERSIGN-PATCH.md.
//!
//! Alone in its test binary: it reads this process's resident memory.

use countersign_agent::Buffer;
use countersign_meter::report::RecordId;
use countersign_meter::DeviceTime;
use countersign_testkit::report::ReportBuilder;

/// Reports written between the two measurements: ~8 MiB of chunk values, eight times the cache.
const REPORTS_BETWEEN: u64 = 100_000;
const CACHE_BYTES: u64 = 1024 * 1024;
/// Growth allowed between the two measurements (allocator noise, sled's log buffers).
const GROWTH_KIB_MAX: u64 = 3 * 1024;
/// Reports per commit group, as the committer writes them.
const GROUP: u64 = 4096;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

fn write(buffer: &Buffer, rt: &tokio::runtime::Runtime, range: std::ops::Range<u64>) {
    let mut k = range.start;
    while k < range.end {
        let end = (k + GROUP).min(range.end);
        let group: Vec<(RecordId, Vec<u8>)> = (k..end)
            .map(|i| {
                let meter_id = 1 + i % 10_000;
                let seq = u32::try_from(i / 10_000).expect("seq fits");
                let b = ReportBuilder::new(
                    meter_id,
                    seq,
                    8_988_280_666_000_000_000 + meter_id,
                    DeviceTime::uptime(seq).expect("valid"),
                )
                .epoch(1)
                .used(u64::from(seq) * 100, u64::from(seq) * 300);
                (b.id(), b.encode(&[1u8; 32]))
            })
            .collect();
        let refs: Vec<(RecordId, u64, &[u8])> = group.iter().map(|(id, r)| (*id, k, r.as_slice())).collect();
        buffer.put_reports(&refs).expect("put");
        rt.block_on(buffer.flush()).expect("flush");
        k = end;
    }
}

#[test]
fn a_backlog_larger_than_the_cache_does_not_stay_in_memory() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let buffer = Buffer::open(dir.path(), CACHE_BYTES).expect("open");
    // Warm up: sled's log buffers, the allocator's arenas, a cache's worth of pages.
    write(&buffer, &rt, 0..REPORTS_BETWEEN / 2);
    let before = rss_kib();
    write(&buffer, &rt, REPORTS_BETWEEN / 2..REPORTS_BETWEEN / 2 + REPORTS_BETWEEN);
    let after = rss_kib();
    assert_eq!(buffer.pending_count(), REPORTS_BETWEEN / 2 + REPORTS_BETWEEN);
    assert!(
        after.saturating_sub(before) <= GROWTH_KIB_MAX,
        "RSS grew by {} KiB while {REPORTS_BETWEEN} more reports were buffered (cache {CACHE_BYTES} B)",
        after.saturating_sub(before)
    );
}
