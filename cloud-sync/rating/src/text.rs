//! Text forms shared by every answer, file and export: dates as `YYYY-MM-DD` and ICCIDs as
//! decimal digits, parsed and printed here only, and their serde adapters for JSON fields.

use time::Date;

/// Longest ICCID accepted in a query: 20 decimal digits is all a u64 can hold.
pub const ICCID_DIGITS_MAX: usize = 20;

const DATE_FORMAT: &[time::format_description::BorrowedFormatItem<'static>] =
    time::macros::format_description!("[year]-[month]-[day]");

/// Formats a date as `YYYY-MM-DD`.
pub fn format_date(date: Date) -> String {
    // Formatting a Date with only date components cannot fail; fall back to Display anyway.
    date.format(DATE_FORMAT).unwrap_or_else(|_| date.to_string())
}

/// Parses a `YYYY-MM-DD` date.
pub fn parse_date(text: &str) -> Option<Date> {
    Date::parse(text, DATE_FORMAT).ok()
}

/// Parses an ICCID given as decimal digits (no sign, no spaces).
pub fn parse_iccid(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > ICCID_DIGITS_MAX || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Serde adapter: a [`Date`] as a `YYYY-MM-DD` string.
pub mod json_date {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};
    use time::Date;

    /// Serializes the value in its text form.
    pub fn serialize<S: Serializer>(d: &Date, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_date(*d))
    }

    /// Parses the text form, naming what was expected.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Date, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_date(&s).ok_or_else(|| D::Error::custom(format!("expected YYYY-MM-DD, got '{s}'")))
    }
}

/// Serde adapter: an optional [`Date`] as a `YYYY-MM-DD` string or null.
pub mod json_opt_date {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};
    use time::Date;

    /// Serializes the value in its text form.
    pub fn serialize<S: Serializer>(d: &Option<Date>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&super::format_date(*d)),
            None => s.serialize_none(),
        }
    }

    /// Parses the text form, naming what was expected.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Date>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => super::parse_date(&s)
                .map(Some)
                .ok_or_else(|| D::Error::custom(format!("expected YYYY-MM-DD, got '{s}'"))),
        }
    }
}

/// Serde adapter: an ICCID as a string of decimal digits (u64 exceeds what JSON numbers
/// carry exactly in many clients).
pub mod json_iccid {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    /// Serializes the value in its text form.
    pub fn serialize<S: Serializer>(iccid: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&iccid.to_string())
    }

    /// Parses the text form, naming what was expected.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_iccid(&s)
            .ok_or_else(|| D::Error::custom(format!("expected an ICCID as digits, got '{s}'")))
    }
}
