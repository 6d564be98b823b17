//! Fuzzes the AT response classifier (`Exchange`: echo, URCs, info lines, final results,
//! garbage): never a panic, and it always ends a bounded response.
//!
//! Run: `tests/fuzz.sh` (all targets) or `cd firmware/fuzz && cargo fuzz run at_exchange`.
#![no_main]

use countersign_meter::at::{Event, Exchange, RESPONSE_BYTES_MAX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut ex: Exchange = Exchange::new(b"AT+QGDCNT?", b"+QGDCNT:");
    let mut fed = 0usize;
    for &b in data {
        fed += 1;
        match ex.feed(b) {
            Event::Final(_) | Event::Failed(_) => return,
            _ => {}
        }
        assert!(fed <= RESPONSE_BYTES_MAX + 1, "exchange did not end a runaway response");
    }
});
