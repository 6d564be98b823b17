//! Text forms shared by every answer, file and export: dates as `YYYY-MM-DD` and ICCIDs as
//! decimal digits, parsed and printed here only, and their serde adapters for JSON fields.

use time::Date;

/// Longest ICCID accepted: 19 digits and the Luhn check digit (ITU-T E.118).
pub const ICCID_DIGITS_MAX: usize = 20;
/// Most digits of an ICCID's identity, the ICCID without its check digit (fits a u64).
pub const ICCID_BODY_DIGITS_MAX: usize = 19;

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

/// Why a text is not an ICCID.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IccidError {
    /// Something other than decimal digits (sign, space, letter), or nothing at all.
    #[error("'{0}' is not an ICCID (decimal digits only)")]
    NotDigits(String),
    /// More digits than an ICCID has.
    #[error("'{text}' is not an ICCID: {digits} digits, at most {ICCID_DIGITS_MAX}")]
    TooLong {
        /// The text (cut for the message).
        text: String,
        /// How many digits it has.
        digits: usize,
    },
    /// 20 digits whose last is not the Luhn check digit of the first 19.
    #[error("'{text}' fails the Luhn check: its check digit should be {expected}")]
    Luhn {
        /// The text.
        text: String,
        /// The check digit the first 19 digits call for.
        expected: u8,
    },
}

/// The text as shown in an error: digits of an ICCID fit, anything longer is cut.
fn shown(text: &str) -> String {
    const SHOWN_CHARS_MAX: usize = 32;
    match text.char_indices().nth(SHOWN_CHARS_MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// The Luhn check digit (ISO/IEC 7812-1, used by ITU-T E.118 for ICCIDs) of `digits`:
/// every second digit from the right doubled (its digits summed), the check digit brings the
/// sum to a multiple of 10.
pub fn luhn_check_digit(digits: &[u8]) -> u8 {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 0 {
                let twice = 2 * d;
                twice / 10 + twice % 10
            } else {
                d
            }
        })
        .sum();
    // `sum % 10` < 10, so the digit fits.
    u8::try_from((10 - sum % 10) % 10).unwrap_or(0)
}

/// Parses an ICCID given as decimal digits (no sign, no spaces) into its identity.
///
/// # Identity
///
/// A SIM is stored, compared and answered by its ICCID **without the Luhn check digit**: the
/// number of at most 19 digits that 1NCE's API puts in its paths (`8988280666000000000`) and
/// that the agent keeps for `uplink.iccid`. An ICCID of 20 digits is those 19 digits followed
/// by the check digit (ITU-T E.118): the digit is checked, then dropped, so the 20-digit and
/// the 19-digit forms name the same SIM. A text of up to 19 digits is taken as it is — whether
/// its last digit is a check digit cannot be told, and a check digit kept there would only
/// make the identity differ from the carrier's. Nothing here goes through a number wider than
/// the 19 digits of the identity, so no ICCID overflows a u64.
pub fn iccid_from_text(text: &str) -> Result<u64, IccidError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(IccidError::NotDigits(shown(text)));
    }
    if text.len() > ICCID_DIGITS_MAX {
        return Err(IccidError::TooLong { text: shown(text), digits: text.len() });
    }
    let (body, check) = text.split_at(text.len().min(ICCID_BODY_DIGITS_MAX));
    let digits: Vec<u8> = body.bytes().map(|b| b - b'0').collect();
    if let Some(&c) = check.as_bytes().first() {
        let expected = luhn_check_digit(&digits);
        if c - b'0' != expected {
            return Err(IccidError::Luhn { text: text.to_owned(), expected });
        }
    }
    // At most 19 digits: below 10^19 < 2^64, so neither step can overflow.
    Ok(digits.iter().fold(0u64, |n, &d| n * 10 + u64::from(d)))
}

/// Parses an ICCID into its identity (see [`iccid_from_text`]); `None` for anything else.
pub fn parse_iccid(text: &str) -> Option<u64> {
    iccid_from_text(text).ok()
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
        super::iccid_from_text(&s).map_err(D::Error::custom)
    }
}

/// Serde adapter: an optional ICCID as a string of decimal digits, `null` when absent.
pub mod json_opt_iccid {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    /// Serializes the value in its text form, or `null`.
    pub fn serialize<S: Serializer>(iccid: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match iccid {
            Some(i) => s.serialize_str(&i.to_string()),
            None => s.serialize_none(),
        }
    }

    /// Parses the text form or `null`, naming what was expected.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(s) => super::iccid_from_text(&s).map(Some).map_err(D::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iccids_with_and_without_their_luhn_digit_name_one_sim() {
        // The 19-digit identity and the same ICCID with its check digit appended.
        let body = "8988280666000000001";
        let digits: Vec<u8> = body.bytes().map(|b| b - b'0').collect();
        let c = luhn_check_digit(&digits);
        let full = format!("{body}{c}");
        assert_eq!(iccid_from_text(body), Ok(8_988_280_666_000_000_001));
        assert_eq!(iccid_from_text(&full), Ok(8_988_280_666_000_000_001));
        let wrong = format!("{body}{}", (c + 1) % 10);
        assert_eq!(iccid_from_text(&wrong), Err(IccidError::Luhn { text: wrong.clone(), expected: c }));
        // Known Luhn vectors (ISO/IEC 7812): 7992739871 → 3; 8988247000000000000 → the
        // check digit makes the whole number pass the Luhn sum.
        assert_eq!(luhn_check_digit(&[7, 9, 9, 2, 7, 3, 9, 8, 7, 1]), 3);
        for body in ["8988247000000000000", "8949000000000000001", "9999999999999999999"] {
            let digits: Vec<u8> = body.bytes().map(|b| b - b'0').collect();
            let c = luhn_check_digit(&digits);
            let mut all = digits.clone();
            all.push(c);
            let sum: u32 =
                all.iter()
                    .rev()
                    .enumerate()
                    .map(|(i, &d)| {
                        if i % 2 == 1 {
                            [0, 2, 4, 6, 8, 1, 3, 5, 7, 9][usize::from(d)]
                        } else {
                            u32::from(d)
                        }
                    })
                    .sum();
            assert_eq!(sum % 10, 0, "{body}{c}");
            // The largest 20-digit ICCID parses without overflow.
            assert_eq!(iccid_from_text(&format!("{body}{c}")), iccid_from_text(body));
        }
        assert_eq!(iccid_from_text("1"), Ok(1));
        for bad in ["", "+1", "-1", "12a", " 1", "1 ", "٣"] {
            assert!(matches!(iccid_from_text(bad), Err(IccidError::NotDigits(_))), "{bad}");
        }
        assert_eq!(
            iccid_from_text("123456789012345678901").unwrap_err().to_string(),
            "'123456789012345678901' is not an ICCID: 21 digits, at most 20"
        );
        let long = "9".repeat(100);
        assert!(iccid_from_text(&long).unwrap_err().to_string().len() < 100);
    }
}
