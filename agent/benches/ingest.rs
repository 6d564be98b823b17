//! The agent's durable ingest path without the network: classify each payload, write the
//! group to sled in chunks, and flush once per group, as the committer does before acking.
//!
//! `cargo bench -p countersign-agent --bench ingest` prints reports/s per group size.

use std::time::Instant;

use countersign_agent::classify::{classify, Verdict};
use countersign_agent::Buffer;
use countersign_meter::DeviceTime;
use countersign_testkit::report::ReportBuilder;

const REPORTS: u32 = 20_000;

fn payloads() -> Vec<(String, Vec<u8>)> {
    (0..REPORTS)
        .map(|i| {
            let meter_id = u64::from(i % 10_000);
            let r = ReportBuilder::new(
                meter_id,
                i / 10_000,
                8_988_280_666_000_000_000 + meter_id,
                DeviceTime::uptime(i).expect("valid"),
            )
            .epoch(1)
            .base(30 << 20, 12 << 20)
            .used(u64::from(i) * 100, u64::from(i) * 300);
            (format!("countersign/v1/reports/{meter_id}"), r.encode(&[1u8; 32]))
        })
        .collect()
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let input = payloads();
    for group in [1usize, 16, 128, 512, 4096] {
        let dir = tempfile::tempdir().expect("tempdir");
        let buffer = Buffer::open(dir.path(), 16 << 20).expect("open");
        let n = if group == 1 { 2000 } else { input.len() };
        let t = Instant::now();
        rt.block_on(async {
            for chunk in input[..n].chunks(group) {
                // As the committer does: classify the group, write it in chunks, one flush.
                let mut reports = Vec::with_capacity(chunk.len());
                for (topic, payload) in chunk {
                    match classify(topic, payload) {
                        Verdict::Report(id) => reports.push((id, 0u64, payload.as_slice())),
                        Verdict::Quarantine { reason, .. } => panic!("bench payload quarantined: {reason}"),
                    }
                }
                buffer.put_reports(&reports).expect("put");
                buffer.flush().await.expect("flush");
            }
        });
        let secs = t.elapsed().as_secs_f64();
        println!(
            "group commit of {group:>3}: {:>9.0} reports/s durable ({n} reports, {:.1} flushes/s)",
            n as f64 / secs,
            (n / group) as f64 / secs
        );
    }
}
