//! Report encode + tag and decode + verify throughput on the host.
//!
//! `cargo bench -p countersign-meter --bench report` prints operations per second and the
//! encoded size of a typical report.

use std::hint::black_box;
use std::time::Instant;

use countersign_meter::report::REPORT_BYTES_MAX;
use countersign_meter::{verify, DeviceTime, Report, TimeQuality, Totals};

const ITERATIONS: u32 = 200_000;

fn main() {
    let key = [7u8; 32];
    let mut r = Report {
        meter_id: 4711,
        epoch: 3,
        seq: 0,
        iccid: 8_988_280_666_000_001_234,
        time: DeviceTime::wall_clock(TimeQuality::Network, 1_795_000_000).expect("valid time"),
        base: Totals { up: 30 << 20, down: 12 << 20 },
        used: Totals { up: 700 << 10, down: 280 << 10 },
        extras: Default::default(),
    };
    let mut buf = [0u8; REPORT_BYTES_MAX];

    let t = Instant::now();
    for i in 0..ITERATIONS {
        r.seq = i;
        black_box(r.encode(&key, black_box(&mut buf)).expect("encodes"));
    }
    let enc = t.elapsed();

    // Size of the typical report of the golden test: a week of hourly reports into an epoch.
    r.seq = 168;
    let n = r.encode(&key, &mut buf).expect("encodes");
    let bytes = buf[..n].to_vec();
    let t = Instant::now();
    for _ in 0..ITERATIONS {
        black_box(verify(black_box(&bytes), &key).expect("verifies"));
    }
    let dec = t.elapsed();

    println!("report size: {n} bytes (typical report, tag included)");
    println!(
        "encode+tag:    {:>10.0} reports/s  ({:.2} µs each)",
        f64::from(ITERATIONS) / enc.as_secs_f64(),
        enc.as_secs_f64() * 1e6 / f64::from(ITERATIONS)
    );
    println!(
        "decode+verify: {:>10.0} reports/s  ({:.2} µs each)",
        f64::from(ITERATIONS) / dec.as_secs_f64(),
        dec.as_secs_f64() * 1e6 / f64::from(ITERATIONS)
    );
}
