//! Fuzzes the modem response parser with every profile: it must never panic, whatever a
//! modem or a noisy line sends. The same property runs on stable in the crate's proptest
//! `modem::tests::parser_never_panics`.
//!
//! Run: `tests/fuzz.sh` (all targets) or `cd firmware/fuzz && cargo fuzz run modem_response`.
#![no_main]

use countersign_meter::modem::{parse_response, ModemProfile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let profiles = [
        ModemProfile::QUECTEL,
        ModemProfile::QUECTEL_UNISOC,
        ModemProfile::UBLOX,
        ModemProfile::TELIT,
        ModemProfile::NORDIC,
    ];
    // First byte picks the profile so the fuzzer can steer it.
    let (which, rest) = match data.split_first() {
        Some((w, r)) => (usize::from(*w) % profiles.len(), r),
        None => (0, data),
    };
    let _ = parse_response(&profiles[which], rest);
});
