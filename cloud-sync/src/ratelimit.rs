//! Per-gateway rate limit on batch uploads: a token bucket of records per gateway.
//!
//! A batch is **checked** before its signature is verified (is the gateway's bucket in
//! credit?) and **charged** only after the signature verified, and only for the records it
//! stored: duplicates (an agent resending after a lost reply) and rejected records add
//! nothing to the store and cost nothing. So a forger who names someone else's gateway id
//! spends no one's budget, and a gateway over its limit is turned away before it costs a
//! signature check. A charge may take the bucket below zero:
//! the gateway then waits until the debt is repaid, which keeps its long-run rate exact
//! whatever its batch sizes.
//!
//! State is bounded: buckets exist only for gateways whose batches verified, at most
//! [`RATE_LIMIT_GATEWAYS_MAX`]; when full, buckets that have refilled (indistinguishable from
//! new ones) are dropped first, then the least recently used.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::RateLimit;

/// Gateways whose buckets are kept at once (about 40 bytes each).
pub const RATE_LIMIT_GATEWAYS_MAX: usize = 65_536;
/// Bucket units per record: milli-records, so refills of a fraction of a record add up.
const UNITS_PER_RECORD: i64 = 1000;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Milli-records available; negative while in debt.
    units: i64,
    updated: Instant,
}

/// The buckets of every gateway. Shared by the request handlers.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    capacity_units: i64,
    buckets: Mutex<HashMap<u64, Bucket>>,
}

impl RateLimiter {
    /// An empty limiter: every gateway starts with a full bucket.
    pub fn new(limit: RateLimit) -> Self {
        // burst_records is at most RATE_RECORDS_MAX (1e9): times 1000 fits an i64.
        let capacity_units = i64::try_from(limit.burst_records)
            .ok()
            .and_then(|b| b.checked_mul(UNITS_PER_RECORD))
            .unwrap_or(i64::MAX);
        Self { limit, capacity_units, buckets: Mutex::new(HashMap::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Bucket>> {
        // Buckets are updated whole under the lock; a poisoned one is still consistent.
        self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let elapsed_us = now.saturating_duration_since(b.updated).as_micros();
        // units = µs × records/s × 1000 units/record / 1e6 µs/s = µs × records/s / 1000.
        let add = elapsed_us.saturating_mul(u128::from(self.limit.records_per_second)) / 1000;
        let add = i64::try_from(add).unwrap_or(i64::MAX);
        b.units = b.units.saturating_add(add).min(self.capacity_units);
        b.updated = now;
    }

    /// Whether `gateway_id` may send a batch now; otherwise how long until it may.
    pub fn check(&self, gateway_id: u64, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.lock();
        let Some(b) = buckets.get_mut(&gateway_id) else { return Ok(()) };
        self.refill(b, now);
        if b.units > 0 {
            return Ok(());
        }
        // Time until the bucket holds one record again.
        let deficit =
            u64::try_from(b.units.saturating_neg().saturating_add(UNITS_PER_RECORD)).unwrap_or(u64::MAX);
        let per_s = self.limit.records_per_second.saturating_mul(UNITS_PER_RECORD as u64).max(1);
        let ms = deficit.saturating_mul(1000).div_ceil(per_s);
        Err(Duration::from_millis(ms.max(1)))
    }

    /// Charges `records` newly stored records of an authenticated batch to `gateway_id`.
    pub fn charge(&self, gateway_id: u64, records: usize, now: Instant) {
        let cost = i64::try_from(records).unwrap_or(i64::MAX).saturating_mul(UNITS_PER_RECORD);
        let mut buckets = self.lock();
        if !buckets.contains_key(&gateway_id) && buckets.len() >= RATE_LIMIT_GATEWAYS_MAX {
            self.evict(&mut buckets, now);
        }
        let b = buckets.entry(gateway_id).or_insert(Bucket { units: self.capacity_units, updated: now });
        self.refill(b, now);
        b.units = b.units.saturating_sub(cost);
    }

    fn evict(&self, buckets: &mut HashMap<u64, Bucket>, now: Instant) {
        buckets.retain(|_, b| {
            let mut b = *b;
            self.refill(&mut b, now);
            b.units < self.capacity_units
        });
        if buckets.len() >= RATE_LIMIT_GATEWAYS_MAX {
            if let Some(oldest) = buckets.iter().min_by_key(|(_, b)| b.updated).map(|(id, _)| *id) {
                buckets.remove(&oldest);
            }
        }
    }

    /// Number of buckets kept, for tests and metrics.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no bucket is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateway_over_its_rate_waits_for_its_debt() {
        let l = RateLimiter::new(RateLimit { records_per_second: 1000, burst_records: 2000 });
        let t0 = Instant::now();
        assert!(l.check(1, t0).is_ok());
        l.charge(1, 1500, t0);
        assert!(l.check(1, t0).is_ok(), "500 records of credit left");
        l.charge(1, 1500, t0);
        // 1000 records in debt, 1000 records/s: credit again after just over a second.
        let wait = l.check(1, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(1001));
        assert!(l.check(1, t0 + Duration::from_millis(900)).is_err());
        assert!(l.check(1, t0 + Duration::from_millis(1002)).is_ok());
        // Another gateway is unaffected.
        assert!(l.check(2, t0).is_ok());
        // Refill stops at the burst size.
        let later = t0 + Duration::from_secs(3600);
        l.charge(1, 2000, later);
        assert!(l.check(1, later).is_err());
    }

    #[test]
    fn state_stays_bounded() {
        let l = RateLimiter::new(RateLimit { records_per_second: 1, burst_records: 10 });
        let t0 = Instant::now();
        for id in 0..(RATE_LIMIT_GATEWAYS_MAX as u64 + 10) {
            l.charge(id, 5, t0);
        }
        assert_eq!(l.len(), RATE_LIMIT_GATEWAYS_MAX);
        // Buckets that refilled are dropped first.
        let later = t0 + Duration::from_secs(60);
        l.charge(u64::MAX, 5, later);
        assert_eq!(l.len(), 1);
    }
}
