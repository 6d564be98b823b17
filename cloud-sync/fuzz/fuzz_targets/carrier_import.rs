//! Fuzzes the carrier usage importers (1NCE daily JSON, daily CSV, session CSV, MB strings):
//! never a panic, whatever file a carrier portal hands out. The first byte picks the parser.
//!
//! Run: `tests/fuzz.sh` (all targets) or `cd cloud-sync/fuzz && cargo fuzz run carrier_import`.
#![no_main]

use countersign_cloud::carrier::{parse_1nce_daily_json, parse_daily_csv, parse_mb, parse_sessions_csv};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((which, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    match which % 4 {
        0 => drop(parse_1nce_daily_json(8_988_228_066_600_001_042, text)),
        1 => drop(parse_daily_csv(text)),
        2 => {
            let tz = countersign_cloud::usage::time_zone("Europe/Berlin").expect("bundled zone");
            drop(parse_sessions_csv(text, &tz));
        }
        _ => drop(parse_mb(text)),
    }
});
