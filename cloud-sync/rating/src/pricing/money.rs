//! Money: decimal amount strings parsed exactly into integer micro-units, and printed back.

#[allow(unused_imports)]
use super::*;

/// Parses a non-negative decimal amount ("0.10", "12", "0.000001") into micro-units, exactly.
pub fn parse_money_micros(text: &str) -> Result<u64, PricingError> {
    let bad = || PricingError::BadAmount(text.to_owned());
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    if int.is_empty()
        || int.len() > MONEY_INTEGER_DIGITS_MAX
        || frac.len() > MONEY_FRACTION_DIGITS_MAX
        || (text.contains('.') && frac.is_empty())
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let int: u64 = int.parse().map_err(|_| bad())?;
    let mut frac_micros: u64 = 0;
    for b in frac.bytes().chain(std::iter::repeat(b'0')).take(MONEY_FRACTION_DIGITS_MAX) {
        frac_micros = frac_micros * 10 + u64::from(b - b'0');
    }
    int.checked_mul(MICROS_PER_UNIT).and_then(|m| m.checked_add(frac_micros)).ok_or_else(bad)
}

/// Formats micro-units as a decimal amount with six fraction digits ("48.000000").
pub fn format_micros(micros: i128) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let m = micros.unsigned_abs();
    let per = u128::from(MICROS_PER_UNIT);
    format!("{sign}{}.{:06}", m / per, m % per)
}
