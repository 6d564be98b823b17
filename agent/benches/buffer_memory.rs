//! Resident memory of the sled buffer alone, without MQTT or HTTP: a backlog written as the
//! committer writes it (groups of `COMMIT_REPORTS_MAX`, one flush each), then drained as the
//! uploader drains it (`next_batch` + `settle`). Prints this process's VmRSS as the backlog
//! grows and shrinks, and after the buffer is dropped, to tell what the database holds from
//! what the allocator keeps.
//!
//! `cargo bench -p countersign-agent --bench buffer_memory` (`BENCH_BACKLOG`, default
//! 300 000 reports of 10 000 meters; `BENCH_CACHE_BYTES`, default the agent's default).

use countersign_agent::config::COMMIT_REPORTS_MAX;
use countersign_agent::Buffer;
use countersign_meter::report::RecordId;
use countersign_meter::DeviceTime;
use countersign_protocol::RecordOutcome;
use countersign_testkit::report::ReportBuilder;

const METERS: u64 = 10_000;
const BATCH_RECORDS: usize = 2000;
const BATCH_BYTES: usize = 256 * 1024;

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn report(k: u64) -> (RecordId, Vec<u8>) {
    let meter_id = 1 + k % METERS;
    let seq = u32::try_from(k / METERS).expect("seq fits");
    let b = ReportBuilder::new(
        meter_id,
        seq,
        8_988_280_666_000_000_000 + meter_id,
        DeviceTime::uptime(seq).expect("valid"),
    )
    .epoch(1)
    .base(30 << 20, 12 << 20)
    .used(u64::from(seq) * 100, u64::from(seq) * 300);
    (b.id(), b.encode(&[1u8; 32]))
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let backlog: u64 = std::env::var("BENCH_BACKLOG").ok().and_then(|v| v.parse().ok()).unwrap_or(300_000);
    let cache: u64 = std::env::var("BENCH_CACHE_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(countersign_agent::config::CACHE_CAPACITY_BYTES_DEFAULT);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    println!("start: RSS {:.1} MiB (cache_capacity {} KiB)", mib(rss_kib("VmRSS:")), cache / 1024);
    let buffer = Buffer::open(dir.path(), cache).expect("open");
    let mut k = 0u64;
    let step = 50_000u64;
    while k < backlog {
        let end = (k + step).min(backlog);
        while k < end {
            let group: Vec<(RecordId, Vec<u8>)> =
                (k..(k + COMMIT_REPORTS_MAX as u64).min(end)).map(report).collect();
            k += group.len() as u64;
            let refs: Vec<(RecordId, u64, &[u8])> =
                group.iter().map(|(id, r)| (*id, k, r.as_slice())).collect();
            buffer.put_reports(&refs).expect("put");
            buffer.bump_generation().expect("generation");
            rt.block_on(buffer.flush()).expect("flush");
        }
        println!("{k:>7} buffered: RSS {:.1} MiB", mib(rss_kib("VmRSS:")));
    }
    let mut drained = 0u64;
    loop {
        let batch = buffer.next_batch(BATCH_RECORDS, BATCH_BYTES).expect("read");
        if batch.is_empty() {
            break;
        }
        let outcomes = vec![RecordOutcome::Stored; batch.len()];
        buffer.settle(&batch, &outcomes).expect("settle");
        drained += batch.len() as u64;
        if drained % step < batch.len() as u64 {
            rt.block_on(buffer.flush()).expect("flush");
            println!(
                "{:>7} buffered: RSS {:.1} MiB (draining)",
                buffer.pending_count(),
                mib(rss_kib("VmRSS:"))
            );
        }
    }
    rt.block_on(buffer.flush()).expect("flush");
    println!("drained: RSS {:.1} MiB, peak {:.1} MiB", mib(rss_kib("VmRSS:")), mib(rss_kib("VmHWM:")));
    drop(buffer);
    std::thread::sleep(std::time::Duration::from_secs(1));
    println!("buffer dropped: RSS {:.1} MiB", mib(rss_kib("VmRSS:")));
}
