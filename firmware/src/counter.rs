//! Turning raw modem counter readings into monotone usage.
//!
//! A modem counter is not a meter: it resets on PDP re-activation or a modem reset, some
//! modems count in 32 bits and wrap, and a few report kilobytes. [`Accumulator`] keeps the
//! last raw reading and adds only forward movement to its total, so the total it returns
//! never goes backwards and never jumps by a reset.

/// How a raw counter behaves when it passes its maximum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterWidth {
    /// 32-bit counter that wraps to 0 (e.g. Huawei `^DSFLOWQRY`).
    Bits32,
    /// 64-bit counter: for practical purposes it never wraps.
    Bits64,
}

/// What one reading did to the accumulated total.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// First reading: it only sets the reference, it adds nothing.
    Started,
    /// The counter moved forward by this much.
    Forward(u64),
    /// A 32-bit counter wrapped; this much was added across the wrap.
    Wrapped(u64),
    /// The counter went backwards (reset): a new segment starts, its reading is counted from 0.
    Reset(u64),
}

impl Step {
    /// Bytes (or units) this step added.
    pub fn added(self) -> u64 {
        match self {
            Step::Started => 0,
            Step::Forward(n) | Step::Wrapped(n) | Step::Reset(n) => n,
        }
    }
}

/// Accumulates forward movement of one raw counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accumulator {
    width: CounterWidth,
    last_raw: Option<u64>,
    total: u64,
}

/// A 32-bit counter that falls back by more than this is taken to have wrapped rather than
/// reset: a reset lands near zero, a wrap comes from near the top.
const WRAP_FALLBACK_MIN: u64 = 1 << 31;

impl Accumulator {
    /// A fresh accumulator; the first reading sets the reference and adds nothing, because
    /// what the modem counted before this epoch belongs to an earlier epoch.
    pub const fn new(width: CounterWidth) -> Self {
        Self { width, last_raw: None, total: 0 }
    }

    /// Total added since the accumulator was created (saturates at `u64::MAX`).
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Feeds one raw reading.
    pub fn observe(&mut self, raw: u64) -> Step {
        let raw = match self.width {
            CounterWidth::Bits32 => raw & 0xffff_ffff,
            CounterWidth::Bits64 => raw,
        };
        let step = match self.last_raw {
            None => Step::Started,
            Some(last) if raw >= last => Step::Forward(raw - last),
            Some(last) => match self.width {
                CounterWidth::Bits32 if last - raw >= WRAP_FALLBACK_MIN => {
                    Step::Wrapped((1u64 << 32) - last + raw)
                }
                _ => Step::Reset(raw),
            },
        };
        self.last_raw = Some(raw);
        self.total = self.total.saturating_add(step.added());
        step
    }

    /// Forgets the reference, e.g. when the modem was power-cycled: the next reading adds 0.
    pub fn rebase(&mut self) {
        self.last_raw = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn first_reading_only_sets_reference() {
        let mut a = Accumulator::new(CounterWidth::Bits64);
        assert_eq!(a.observe(1_000_000), Step::Started);
        assert_eq!(a.observe(1_000_500), Step::Forward(500));
        assert_eq!(a.total(), 500);
    }

    #[test]
    fn reset_starts_new_segment() {
        let mut a = Accumulator::new(CounterWidth::Bits64);
        a.observe(100);
        a.observe(400);
        assert_eq!(a.observe(50), Step::Reset(50));
        assert_eq!(a.observe(70), Step::Forward(20));
        assert_eq!(a.total(), 300 + 50 + 20);
    }

    #[test]
    fn wrap_is_widened() {
        let mut a = Accumulator::new(CounterWidth::Bits32);
        a.observe(0xffff_ff00);
        assert_eq!(a.observe(0x10), Step::Wrapped(0x110));
        assert_eq!(a.total(), 0x110);
    }

    #[test]
    fn small_fallback_on_32_bit_is_a_reset_not_a_wrap() {
        let mut a = Accumulator::new(CounterWidth::Bits32);
        a.observe(5000);
        assert_eq!(a.observe(10), Step::Reset(10));
    }

    proptest! {
        /// Model: the modem's true traffic is a series of increments; the raw counter is
        /// that traffic since the last reset, modulo 2^32. Between readings it moves less than
        /// 2^31, and a reset is followed by a reading before more than 2^31 accrues. Then the
        /// accumulator recovers exactly the true traffic after the first reading.
        #[test]
        fn recovers_true_traffic(steps in proptest::collection::vec((0u64..(1 << 30), any::<bool>()), 1..200), start in any::<u32>()) {
            let mut a = Accumulator::new(CounterWidth::Bits32);
            let mut raw = u64::from(start);
            a.observe(raw);
            let mut truth = 0u64;
            for (inc, reset) in steps {
                // A reset is only visible when the counter lands below where it was, and no
                // further back than a wrap would look.
                if reset && inc < raw && raw - inc < (1 << 31) {
                    raw = inc;
                } else {
                    raw = (raw + inc) & 0xffff_ffff;
                }
                truth += inc;
                let before = a.total();
                a.observe(raw);
                prop_assert!(a.total() >= before);
            }
            // Resets with a reading of `inc` add `inc`: the bytes since the reset.
            prop_assert_eq!(a.total(), truth);
        }
    }
}
