//! Meter keys, gateway keys and API tokens: the registry feature of [`StoreBackend`] over
//! both backends, with the negative caches in front of gateway and token lookups.

use std::collections::HashMap;

use countersign_meter::METER_KEY_BYTES;
use ed25519_dalek::VerifyingKey;

use super::{blocking, Registration, StoreBackend, StoreError};

impl StoreBackend {
    /// The registered keys among `ids`.
    pub async fn meter_keys(&self, ids: Vec<u64>) -> Result<HashMap<u64, [u8; METER_KEY_BYTES]>, StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || {
                    let mut out = HashMap::with_capacity(ids.len());
                    for id in ids {
                        if let Some(k) = s.meter_key(id)? {
                            out.insert(id, k);
                        }
                    }
                    Ok(out)
                })
                .await
            }
            Self::Postgres(p) => p.meter_keys(&ids).await,
        }
    }

    /// The public key of a gateway, if registered. An id the store did not know is answered
    /// from a negative cache for [`NEGATIVE_CACHE_TTL_S`](crate::negcache::NEGATIVE_CACHE_TTL_S)
    /// (a header naming an unknown gateway costs no store lookup after the first).
    pub async fn gateway_key(&self, gateway_id: u64) -> Result<Option<VerifyingKey>, StoreError> {
        let caches = self.lookup_caches();
        if caches.gateway_known_unknown(gateway_id) {
            return Ok(None);
        }
        let key = match self {
            // A point read in sled's cache: not worth a trip to the blocking pool.
            Self::Sled(s) => s.gateway_key(gateway_id)?,
            Self::Postgres(p) => p.gateway_key(gateway_id).await?,
        };
        if key.is_none() {
            caches.gateway_unknown(gateway_id);
        }
        Ok(key)
    }

    /// Registers a meter's HMAC key; durable when this returns.
    pub async fn add_meter(
        &self,
        meter_id: u64,
        key: [u8; METER_KEY_BYTES],
    ) -> Result<Registration, StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.add_meter(meter_id, &key)).await
            }
            Self::Postgres(p) => p.add_meter(meter_id, &key).await,
        }
    }

    /// Registers a gateway's public key; durable when this returns. The gateway is no longer
    /// known unknown to this process.
    pub async fn add_gateway(&self, gateway_id: u64, key: VerifyingKey) -> Result<Registration, StoreError> {
        let r = match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.add_gateway(gateway_id, &key)).await
            }
            Self::Postgres(p) => p.add_gateway(gateway_id, &key).await,
        };
        // Whatever the answer: after a conflict the id is registered too.
        self.lookup_caches().gateway_registered(gateway_id);
        r
    }

    /// Stores an API token's SHA-256 under a unique name.
    pub async fn add_token(
        &self,
        name: String,
        role: &'static str,
        sha256: [u8; 32],
    ) -> Result<Registration, StoreError> {
        let r = match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.add_token(&name, role, &sha256)).await
            }
            Self::Postgres(p) => p.add_token(&name, role, &sha256).await,
        };
        self.lookup_caches().token_created(&sha256);
        r
    }

    /// The name and role of the token with this SHA-256. A hash the store did not know is
    /// answered from a negative cache like [`StoreBackend::gateway_key`].
    pub async fn token(&self, sha256: [u8; 32]) -> Result<Option<(String, String)>, StoreError> {
        let caches = self.lookup_caches();
        if caches.token_known_unknown(&sha256) {
            return Ok(None);
        }
        let token = match self {
            Self::Sled(s) => s.token(&sha256)?,
            Self::Postgres(p) => p.token(&sha256).await?,
        };
        if token.is_none() {
            caches.token_unknown(sha256);
        }
        Ok(token)
    }

    /// Removes the token named `name`; whether one was there.
    pub async fn revoke_token(&self, name: String) -> Result<bool, StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.revoke_token(&name)).await
            }
            Self::Postgres(p) => p.revoke_token(&name).await,
        }
    }

    /// Names and roles of every token.
    pub async fn tokens(&self) -> Result<Vec<(String, String)>, StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.tokens()).await
            }
            Self::Postgres(p) => p.tokens().await,
        }
    }
}
