//! Evidence, not silence: logging refusals once per cause with rate-limited repeats, and
//! untrusted strings made safe for logs. Pure: the clock is passed in.
//!
//! A device can publish the same bad payload thousands of times a second and an endpoint
//! can answer with any text; neither may flood the log or write control characters into it.
//! [`cut`] is also how `store` bounds the strings it keeps.
//!
//! It imports no other agent module and does no I/O.

use std::collections::HashMap;
use std::fmt::Write;

/// After a cause was logged, its repeats are logged at most this often (with a count of
/// those left out in between).
pub const LOG_REPEAT_MS_MIN: u64 = 60_000;
/// Most causes tracked at once; causes are static names, so this is never reached in
/// practice, and past it every occurrence is logged rather than any forgotten silently.
pub const LOG_CAUSES_MAX: usize = 256;
/// Longest untrusted string written to a log (bytes of the original, before escaping).
pub const LOG_UNTRUSTED_BYTES_MAX: usize = 256;

/// Decides which occurrences of a cause are logged: the first, then one per
/// [`LOG_REPEAT_MS_MIN`].
#[derive(Debug, Default)]
pub struct LogLimiter {
    /// Per cause: when it was last logged, and occurrences since then that were not.
    causes: HashMap<&'static str, (u64, u64)>,
}

impl LogLimiter {
    /// Whether to log this occurrence of `cause` at `now_ms`: `Some(n)` with the number of
    /// occurrences left out since the last one logged, or `None` to stay quiet.
    pub fn admit(&mut self, cause: &'static str, now_ms: u64) -> Option<u64> {
        if !self.causes.contains_key(cause) && self.causes.len() >= LOG_CAUSES_MAX {
            return Some(0);
        }
        let entry = self.causes.entry(cause).or_insert((0, 0));
        let first = entry.0 == 0 && entry.1 == 0;
        if first || now_ms.saturating_sub(entry.0) >= LOG_REPEAT_MS_MIN {
            let skipped = entry.1;
            *entry = (now_ms.max(1), 0);
            Some(skipped)
        } else {
            entry.1 = entry.1.saturating_add(1);
            None
        }
    }
}

/// `s` cut to at most `max` bytes on a char boundary.
pub fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `s` made safe for a log line: cut to [`LOG_UNTRUSTED_BYTES_MAX`] bytes (on a char
/// boundary), control and non-printable characters escaped (`\n`, `\u{1b}`), and the true
/// length appended when cut.
pub fn untrusted(s: &str) -> String {
    let cut = cut(s, LOG_UNTRUSTED_BYTES_MAX);
    let mut out = String::with_capacity(cut.len() + 16);
    for c in cut.chars() {
        if c.is_control() || c == '\u{2028}' || c == '\u{2029}' || c == '\u{feff}' {
            let _ = write!(out, "{}", c.escape_unicode());
        } else if c == '\\' {
            out.push_str("\\\\");
        } else {
            out.push(c);
        }
    }
    if cut.len() < s.len() {
        let _ = write!(out, "…({} bytes)", s.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_then_one_per_period_with_the_count_left_out() {
        let mut l = LogLimiter::default();
        assert_eq!(l.admit("too_large", 1000), Some(0), "the first is logged");
        assert_eq!(l.admit("too_large", 1001), None);
        assert_eq!(l.admit("too_large", 2000), None);
        assert_eq!(l.admit("malformed", 2000), Some(0), "causes are independent");
        assert_eq!(l.admit("too_large", 1000 + LOG_REPEAT_MS_MIN - 1), None);
        assert_eq!(l.admit("too_large", 1000 + LOG_REPEAT_MS_MIN), Some(3), "three were left out");
        assert_eq!(l.admit("too_large", 1000 + LOG_REPEAT_MS_MIN + 1), None);
        // A clock at 0 (before 1970, say) still logs the first and limits the rest.
        let mut l = LogLimiter::default();
        assert_eq!(l.admit("x", 0), Some(0));
        assert_eq!(l.admit("x", 0), None);
    }

    #[test]
    fn cut_respects_char_boundaries() {
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("héllo", 3), "hé");
        assert_eq!(cut("abc", 10), "abc");
    }

    #[test]
    fn untrusted_strings_are_escaped_and_cut() {
        assert_eq!(untrusted("countersign/v1/reports/5"), "countersign/v1/reports/5");
        assert_eq!(untrusted("a\nb\u{1b}[31m\\"), "a\\u{a}b\\u{1b}[31m\\\\");
        let long = "é".repeat(1000);
        let u = untrusted(&long);
        assert!(u.len() <= LOG_UNTRUSTED_BYTES_MAX + 20, "{}", u.len());
        assert!(u.ends_with("…(2000 bytes)"), "{u}");
    }
}
