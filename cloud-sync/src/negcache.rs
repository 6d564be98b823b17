//! Bounded negative caches for the two lookups an unauthenticated client can trigger: a
//! gateway id named in a batch header and an API token presented as a bearer token. An id the
//! store did not know is remembered for [`NEGATIVE_CACHE_TTL_S`], so repeating it costs no
//! database round trip.
//!
//! Staleness: a registration made through this process (`add_gateway`, `add_token`) removes
//! its entry at once. One made through another endpoint process on the same PostgreSQL
//! database is seen here at most [`NEGATIVE_CACHE_TTL_S`] later; until then its batches are
//! answered 401 `unknown_gateway` (the agent keeps them and retries) and its token 401.
//! Nothing positive is cached here, so a revoked token stops working at once.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an unknown id stays known as unknown, in seconds: the longest a registration
/// made through another endpoint process goes unseen here.
pub const NEGATIVE_CACHE_TTL_S: u64 = 30;
/// Most unknown ids remembered per kind (gateways, tokens); about 64 bytes each.
pub const NEGATIVE_CACHE_ENTRIES_MAX: usize = 4096;

/// Ids recently found unknown, each until its expiry. Pure: callers pass the time.
#[derive(Debug)]
pub struct NegativeCache<K> {
    entries: HashMap<K, Instant>,
    ttl: Duration,
    capacity: usize,
}

impl<K: Hash + Eq + Copy> NegativeCache<K> {
    /// An empty cache of at most `capacity` ids, each kept for `ttl`.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self { entries: HashMap::new(), ttl, capacity: capacity.max(1) }
    }

    /// Whether `key` was found unknown less than the TTL ago.
    pub fn contains(&mut self, key: &K, now: Instant) -> bool {
        match self.entries.get(key) {
            Some(expiry) if now < *expiry => true,
            Some(_) => {
                self.entries.remove(key);
                false
            }
            None => false,
        }
    }

    /// Remembers `key` as unknown. When full, expired ids go first, then the one closest to
    /// expiry (the oldest).
    pub fn insert(&mut self, key: K, now: Instant) {
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            self.entries.retain(|_, expiry| now < *expiry);
            if self.entries.len() >= self.capacity {
                if let Some(oldest) = self.entries.iter().min_by_key(|(_, e)| **e).map(|(k, _)| *k) {
                    self.entries.remove(&oldest);
                }
            }
        }
        self.entries.insert(key, now + self.ttl);
    }

    /// Forgets `key` (it was just registered).
    pub fn remove(&mut self, key: &K) {
        self.entries.remove(key);
    }

    /// Ids held, expired ones included until they are met again.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no id is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// How many lookups reached the store and how many the negative caches answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LookupStats {
    /// Gateway key lookups that reached the store.
    pub gateway_store_lookups: u64,
    /// Unknown gateway ids answered from the cache.
    pub gateway_negative_hits: u64,
    /// Token lookups that reached the store.
    pub token_store_lookups: u64,
    /// Unknown tokens answered from the cache.
    pub token_negative_hits: u64,
}

/// The negative caches of one store and their counters; shared by the store's clones.
#[derive(Debug)]
pub struct LookupCaches {
    gateways: Mutex<NegativeCache<u64>>,
    tokens: Mutex<NegativeCache<[u8; 32]>>,
    gateway_store_lookups: AtomicU64,
    gateway_negative_hits: AtomicU64,
    token_store_lookups: AtomicU64,
    token_negative_hits: AtomicU64,
}

impl Default for LookupCaches {
    fn default() -> Self {
        let ttl = Duration::from_secs(NEGATIVE_CACHE_TTL_S);
        Self {
            gateways: Mutex::new(NegativeCache::new(NEGATIVE_CACHE_ENTRIES_MAX, ttl)),
            tokens: Mutex::new(NegativeCache::new(NEGATIVE_CACHE_ENTRIES_MAX, ttl)),
            gateway_store_lookups: AtomicU64::new(0),
            gateway_negative_hits: AtomicU64::new(0),
            token_store_lookups: AtomicU64::new(0),
            token_negative_hits: AtomicU64::new(0),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each cache operation is one whole map update; a poisoned cache is still consistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl LookupCaches {
    /// Whether gateway `id` is known unknown (a hit is counted).
    pub fn gateway_known_unknown(&self, id: u64) -> bool {
        let hit = lock(&self.gateways).contains(&id, Instant::now());
        if hit {
            self.gateway_negative_hits.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    /// Counts a gateway lookup that reached the store (called by the stores themselves, so
    /// the count is of real round trips).
    pub fn gateway_store_lookup(&self) {
        self.gateway_store_lookups.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a token lookup that reached the store.
    pub fn token_store_lookup(&self) {
        self.token_store_lookups.fetch_add(1, Ordering::Relaxed);
    }

    /// The store did not know gateway `id`.
    pub fn gateway_unknown(&self, id: u64) {
        lock(&self.gateways).insert(id, Instant::now());
    }

    /// Gateway `id` was registered through this process.
    pub fn gateway_registered(&self, id: u64) {
        lock(&self.gateways).remove(&id);
    }

    /// Whether the token with this SHA-256 is known unknown (a hit is counted).
    pub fn token_known_unknown(&self, sha256: &[u8; 32]) -> bool {
        let hit = lock(&self.tokens).contains(sha256, Instant::now());
        if hit {
            self.token_negative_hits.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    /// The store did not know the token with this SHA-256.
    pub fn token_unknown(&self, sha256: [u8; 32]) {
        lock(&self.tokens).insert(sha256, Instant::now());
    }

    /// The token with this SHA-256 was created through this process.
    pub fn token_created(&self, sha256: &[u8; 32]) {
        lock(&self.tokens).remove(sha256);
    }

    /// The counters so far.
    pub fn stats(&self) -> LookupStats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        LookupStats {
            gateway_store_lookups: load(&self.gateway_store_lookups),
            gateway_negative_hits: load(&self.gateway_negative_hits),
            token_store_lookups: load(&self.token_store_lookups),
            token_negative_hits: load(&self.token_negative_hits),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_ids_expire_and_are_forgotten_on_registration() {
        let mut c = NegativeCache::new(8, Duration::from_secs(30));
        let t0 = Instant::now();
        assert!(!c.contains(&1u64, t0));
        c.insert(1, t0);
        assert!(c.contains(&1, t0 + Duration::from_secs(29)));
        assert!(!c.contains(&1, t0 + Duration::from_secs(30)), "expired at the TTL");
        assert!(c.is_empty(), "an expired id met again is dropped");
        c.insert(2, t0);
        c.remove(&2);
        assert!(!c.contains(&2, t0));
    }

    #[test]
    fn capacity_is_bounded_expired_then_oldest_first() {
        let mut c = NegativeCache::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        for (i, id) in [1u64, 2, 3].into_iter().enumerate() {
            c.insert(id, t0 + Duration::from_secs(i as u64));
        }
        c.insert(4, t0 + Duration::from_secs(5));
        assert_eq!(c.len(), 3);
        assert!(!c.contains(&1, t0 + Duration::from_secs(5)), "the oldest went");
        // At t0+11 id 2 (expiring at 11) has expired: it goes first; 3 and 4 stay.
        c.insert(5, t0 + Duration::from_secs(11));
        assert_eq!(c.len(), 3);
        assert!(c.contains(&3, t0 + Duration::from_secs(11)));
        assert!(c.contains(&4, t0 + Duration::from_secs(11)));
        for id in 100..10_000u64 {
            c.insert(id, t0);
        }
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn caches_count_store_lookups_and_hits() {
        let c = LookupCaches::default();
        assert!(!c.gateway_known_unknown(7));
        c.gateway_store_lookup();
        c.gateway_unknown(7);
        assert!(c.gateway_known_unknown(7));
        assert!(c.gateway_known_unknown(7));
        c.gateway_registered(7);
        assert!(!c.gateway_known_unknown(7));
        assert!(!c.token_known_unknown(&[1; 32]));
        c.token_store_lookup();
        c.token_unknown([1; 32]);
        assert!(c.token_known_unknown(&[1; 32]));
        c.token_created(&[1; 32]);
        assert!(!c.token_known_unknown(&[1; 32]));
        assert_eq!(
            c.stats(),
            LookupStats {
                gateway_store_lookups: 1,
                gateway_negative_hits: 2,
                token_store_lookups: 1,
                token_negative_hits: 1
            }
        );
    }
}
