//! Fuzzes the carrier usage importers (1NCE daily JSON as published — datetimes, `TOTAL` rows,
//! `sms`, units —, 1NCE Data Streamer usage records, daily CSV, session CSV, MB strings,
//! ICCIDs with or without their Luhn digit): never a panic, whatever file a carrier portal hands out. The first byte picks the
//! parser; `regressions/carrier_import` holds the published shapes as seeds.
//!
//! Run: `tests/fuzz.sh` (all targets) or `cd cloud-sync/fuzz && cargo fuzz run carrier_import`.
#![no_main]

use countersign_cloud::carrier::{
    parse_1nce_daily_json, parse_1nce_streamer_usage, parse_daily_csv, parse_mb, parse_sessions_csv,
};
use countersign_cloud::text::iccid_from_text;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((which, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    match which % 6 {
        0 => drop(parse_1nce_daily_json(8_988_228_066_600_001_042, text)),
        1 => drop(parse_daily_csv(text)),
        2 => {
            let tz = countersign_cloud::usage::time_zone("Europe/Berlin").expect("bundled zone");
            drop(parse_sessions_csv(text, &tz));
        }
        3 => drop(parse_mb(text)),
        4 => {
            let tz = countersign_cloud::usage::time_zone("Europe/Berlin").expect("bundled zone");
            drop(parse_1nce_streamer_usage(text, &tz));
        }
        _ => {
            // An accepted ICCID's identity is at most 19 digits and names itself.
            if let Ok(id) = iccid_from_text(text) {
                assert!(id < 10_000_000_000_000_000_000, "{text} → {id}");
                assert_eq!(iccid_from_text(&id.to_string()), Ok(id), "{text}");
            }
        }
    }
});
