//! Fuzzes the device report decoder and tag check: never a panic, and whatever decodes
//! re-encodes to the same body (the format has one encoding per report).
//!
//! Run: `tests/fuzz.sh` (all targets) or `cd firmware/fuzz && cargo fuzz run report_decode`.
#![no_main]

use countersign_meter::report::{verify, Report, REPORT_BYTES_MAX};
use libfuzzer_sys::fuzz_target;

const KEY: [u8; 32] = [7u8; 32];

fuzz_target!(|data: &[u8]| {
    let _ = verify(data, &KEY);
    if let Ok((report, body)) = Report::decode(data) {
        let mut buf = [0u8; REPORT_BYTES_MAX];
        // A report that decodes must encode again (with our tag) to the same body.
        if let Ok(n) = report.encode(&KEY, &mut buf) {
            let tag_bytes = data.len() - body.len();
            assert_eq!(&buf[..n.saturating_sub(tag_bytes)], body, "decode/encode are not inverse");
        }
    }
});
