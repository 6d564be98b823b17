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

/// Currencies Lago accepts whose ISO 4217 exponent is not 2. Lago's list is
/// `app/models/concerns/currencies.rb` of getlago/lago-api at
/// 1b1c24a6a6c321d7900b05906bf1b20f706c97c2; Lago rounds a fee to `currency.exponent` of the
/// money gem it locks (RubyMoney/money v7.0.2, `config/currency_iso.json`, commit
/// c344e94068c2eebf61493964b124a9a2deeafa38), which agrees with ISO 4217 for all of them but
/// [`LAGO_CURRENCIES_DISAGREEING`].
const LAGO_CURRENCY_EXPONENTS_NOT_2: [(&str, u32); 20] = [
    ("BHD", 3),
    ("BIF", 0),
    ("CLF", 4),
    ("CLP", 0),
    ("DJF", 0),
    ("GNF", 0),
    ("ISK", 0),
    ("JOD", 3),
    ("JPY", 0),
    ("KMF", 0),
    ("KRW", 0),
    ("KWD", 3),
    ("PYG", 0),
    ("RWF", 0),
    ("UGX", 0),
    ("VND", 0),
    ("VUV", 0),
    ("XAF", 0),
    ("XOF", 0),
    ("XPF", 0),
];

/// Currencies Lago accepts with ISO 4217 exponent 2 (same sources as above).
const LAGO_CURRENCIES_EXPONENT_2: [&str; 119] = [
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT", "BGN", "BMD",
    "BND", "BOB", "BRL", "BSD", "BWP", "BYN", "BZD", "CAD", "CDF", "CHF", "CNY", "COP", "CRC", "CVE", "CZK",
    "DKK", "DOP", "DZD", "EGP", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GTQ", "GYD",
    "HKD", "HNL", "HRK", "HTG", "IDR", "ILS", "INR", "IRR", "JMD", "KES", "KGS", "KHR", "KYD", "KZT", "LAK",
    "LBP", "LKR", "LRD", "LSL", "MAD", "MDL", "MKD", "MMK", "MNT", "MOP", "MUR", "MVR", "MWK", "MXN", "MYR",
    "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "QAR", "RON",
    "RSD", "RUB", "SAR", "SBD", "SCR", "SEK", "SGD", "SHP", "SLL", "SOS", "SRD", "STD", "SZL", "THB", "TJS",
    "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "USD", "UYU", "UZS", "WST", "XCD", "YER", "ZAR", "ZMW",
];

/// Currencies Lago accepts but rounds to another exponent than ISO 4217's (money gem
/// v7.0.2: HUF and MGA to 0 digits, MRO to units of 1/5): refused under Lago semantics, as
/// no single rule matches both.
pub const LAGO_CURRENCIES_DISAGREEING: [&str; 3] = ["HUF", "MGA", "MRO"];

/// The ISO 4217 exponent (fraction digits of the minor unit) of a currency Lago accepts and
/// rounds by ISO 4217; `None` for any other code.
pub fn lago_currency_exponent(code: &str) -> Option<u32> {
    if let Some((_, e)) = LAGO_CURRENCY_EXPONENTS_NOT_2.iter().find(|(c, _)| *c == code) {
        return Some(*e);
    }
    LAGO_CURRENCIES_EXPONENT_2.contains(&code).then_some(2)
}
