//! The JSON shapes of the HTTP API and the paths they travel on: what the routes
//! ([`crate::api`]) answer, what the client ([`crate::client`]) sends and decodes, and what
//! the command line prints. One definition per shape, so the three cannot drift apart.
//!
//! - [`usage`]: usage per SIM, per SIM-day in a zone, the settlement ledger, underivable SIMs.
//! - [`admin`]: registrations, API tokens, settlement runs, the faults list.
//! - [`billing`]: charges, wallets, runs, top-ups, forecasts.
//! - [`ops`]: health (and the metrics path).
//! - [`render`]: charges as CSV and as a table, for people.
//!
//! Wire is pure data, serde and small conversions from the rating core's results: it knows
//! nothing of axum, of the store's IO or of the service layer. The one store item it names is
//! [`crate::store::Registration`], the outcome a registration reply carries as it is.
//!
//! Import direction: `wire` ← `api`, `wire` ← `client`, `wire` ← `service`, `wire` ← the CLI;
//! `wire` imports none of them.

use time::Date;

pub mod admin;
pub mod billing;
pub mod ops;
pub mod render;
pub mod usage;

/// Earliest date a query parameter may name: nothing is metered before the Unix epoch.
pub const QUERY_DATE_MIN: Date = time::macros::date!(1970 - 01 - 01);
/// Latest date a query parameter may name: far enough that periods, lifetimes and windows
/// computed from it stay inside the calendar (which ends at 9999-12-31).
pub const QUERY_DATE_MAX: Date = time::macros::date!(2999 - 12 - 31);

#[cfg(test)]
mod tests {
    use time::macros::date;

    use crate::store::Registration;
    use crate::text::{format_date, parse_date, parse_iccid};
    use crate::wire::admin::RegistrationReply;
    use crate::wire::usage::{DayUsage, SimUsage};

    #[test]
    fn json_shapes_are_pinned() {
        let u = SimUsage {
            iccid: 8_988_280_666_000_000_001,
            from: Some(date!(2026 - 11 - 24)),
            to: None,
            days: vec![DayUsage { date: date!(2026 - 11 - 24), up_bytes: 1, down_bytes: 2, total_bytes: 3 }],
            up_bytes: 1,
            down_bytes: 2,
            total_bytes: 3,
        };
        let s = serde_json::to_string(&u).unwrap();
        assert_eq!(
            s,
            r#"{"iccid":"8988280666000000001","from":"2026-11-24","to":null,"days":[{"date":"2026-11-24","up_bytes":1,"down_bytes":2,"total_bytes":3}],"up_bytes":1,"down_bytes":2,"total_bytes":3}"#
        );
        assert_eq!(serde_json::from_str::<SimUsage>(&s).unwrap(), u);
        let r =
            serde_json::to_string(&RegistrationReply { status: Registration::AlreadyRegistered }).unwrap();
        assert_eq!(r, r#"{"status":"already_registered"}"#);
    }

    #[test]
    fn parameters_parse_strictly() {
        assert_eq!(parse_iccid("8988280666000000001"), Some(8_988_280_666_000_000_001));
        // 20 digits are 19 and a Luhn check digit: checked, then dropped (text::iccid_from_text).
        assert_eq!(parse_iccid("99999999999999999999"), Some(9_999_999_999_999_999_999));
        for bad in ["", "+1", "-1", "12a", " 1", "99999999999999999990", "123456789012345678901"] {
            assert_eq!(parse_iccid(bad), None, "{bad}");
        }
        assert_eq!(parse_date("2026-02-28"), Some(date!(2026 - 02 - 28)));
        for bad in ["2026-02-30", "2026-2-1", "26-01-01", "2026-01-01T00:00"] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
        assert_eq!(format_date(date!(2026 - 01 - 05)), "2026-01-05");
    }
}
