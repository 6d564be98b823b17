//! Exponential backoff with jitter. Pure: the caller supplies the randomness and sleeps.

use std::time::Duration;

/// Exponential backoff state: doubles from `min` to `max`, each delay jittered into its upper
/// half so that many gateways coming back after an outage do not retry in lockstep.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

/// Doubling stops here; `min * 2^20` exceeds any sensible `max`.
const DOUBLINGS_MAX: u32 = 20;

impl Backoff {
    /// A backoff between `min` and `max` (`max` is raised to `min` if lower).
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max: max.max(min), attempt: 0 }
    }

    /// The delay before the next attempt; `unit` in `[0, 1]` picks the point in the jitter
    /// window.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let exp = self.min.saturating_mul(1u32 << self.attempt.min(DOUBLINGS_MAX)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = exp / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// Back to the shortest delay after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Failed attempts since the last success.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        assert_eq!(b.next_delay(1.0), Duration::from_millis(100));
        assert_eq!(b.next_delay(1.0), Duration::from_millis(200));
        assert_eq!(b.next_delay(0.0), Duration::from_millis(200));
        for _ in 0..100 {
            assert!(b.next_delay(1.0) <= Duration::from_millis(1000));
        }
        b.reset();
        assert_eq!(b.next_delay(1.0), Duration::from_millis(100));
    }

    #[test]
    fn jitter_stays_in_upper_half() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(60));
        for _ in 0..5 {
            b.next_delay(0.5);
        }
        let d = b.next_delay(0.0);
        assert_eq!(d, Duration::from_millis(1600));
    }
}
