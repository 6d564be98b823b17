//! Tables `meters`, `gateways` and `api_tokens`, with a per-process cache of keys in front
//! (registrations are never overwritten, so a cached key is never stale).

use std::collections::HashMap;

use countersign_meter::METER_KEY_BYTES;
use countersign_protocol::keys::PUBLIC_KEY_BYTES;
use ed25519_dalek::VerifyingKey;

use super::{db_error, pool_error, u64_from_sql, u64_to_sql, PgStore};
use crate::store::{Registration, StoreError};

/// Meter and gateway keys cached per process. Registrations are never overwritten, so a
/// cached key can never be stale; the bound only limits memory (about 100 bytes an entry).
pub const PG_KEY_CACHE_ENTRIES_MAX: usize = 262_144;

#[derive(Debug, Default)]
pub(super) struct KeyCache {
    meters: HashMap<u64, [u8; METER_KEY_BYTES]>,
    gateways: HashMap<u64, VerifyingKey>,
}

impl KeyCache {
    fn insert_meter(&mut self, id: u64, key: [u8; METER_KEY_BYTES]) {
        if self.meters.len() >= PG_KEY_CACHE_ENTRIES_MAX {
            // Clearing is crude but bounded; keys are read again from the database.
            self.meters.clear();
        }
        self.meters.insert(id, key);
    }

    fn insert_gateway(&mut self, id: u64, key: VerifyingKey) {
        if self.gateways.len() >= PG_KEY_CACHE_ENTRIES_MAX {
            self.gateways.clear();
        }
        self.gateways.insert(id, key);
    }
}

impl PgStore {
    /// Keys of the given meters that are registered (cached after the first read).
    pub async fn meter_keys(&self, ids: &[u64]) -> Result<HashMap<u64, [u8; METER_KEY_BYTES]>, StoreError> {
        let mut found = HashMap::with_capacity(ids.len());
        let mut missing = Vec::new();
        {
            let cache = self.lock_cache();
            for id in ids {
                match cache.meters.get(id) {
                    Some(k) => {
                        found.insert(*id, *k);
                    }
                    None => missing.push(u64_to_sql(*id)),
                }
            }
        }
        if missing.is_empty() {
            return Ok(found);
        }
        let client = self.pool.get().await.map_err(pool_error)?;
        let stmt = client
            .prepare_cached("SELECT meter_id, hmac_key FROM meters WHERE meter_id = ANY($1)")
            .await
            .map_err(db_error)?;
        let rows = client.query(&stmt, &[&missing]).await.map_err(db_error)?;
        let mut cache = self.lock_cache();
        for row in rows {
            let id = u64_from_sql(row.try_get(0).map_err(db_error)?);
            let key = meter_key_of(id, row.try_get(1).map_err(db_error)?)?;
            cache.insert_meter(id, key);
            found.insert(id, key);
        }
        Ok(found)
    }

    /// The HMAC key of a meter, if registered.
    pub async fn meter_key(&self, meter_id: u64) -> Result<Option<[u8; METER_KEY_BYTES]>, StoreError> {
        Ok(self.meter_keys(&[meter_id]).await?.remove(&meter_id))
    }

    /// The public key of a gateway, if registered (cached after the first read).
    pub async fn gateway_key(&self, gateway_id: u64) -> Result<Option<VerifyingKey>, StoreError> {
        if let Some(k) = self.lock_cache().gateways.get(&gateway_id) {
            return Ok(Some(*k));
        }
        self.lookups.gateway_store_lookup();
        let client = self.pool.get().await.map_err(pool_error)?;
        let stmt = client
            .prepare_cached("SELECT public_key FROM gateways WHERE gateway_id = $1")
            .await
            .map_err(db_error)?;
        let Some(row) = client.query_opt(&stmt, &[&u64_to_sql(gateway_id)]).await.map_err(db_error)? else {
            return Ok(None);
        };
        let bytes: &[u8] = row.try_get(0).map_err(db_error)?;
        let bytes = <[u8; PUBLIC_KEY_BYTES]>::try_from(bytes).map_err(|_| {
            StoreError::Corrupt(format!("gateway {gateway_id}: key is {} bytes", bytes.len()))
        })?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| StoreError::Corrupt(format!("gateway {gateway_id}: key is not an Ed25519 point")))?;
        self.lock_cache().insert_gateway(gateway_id, key);
        Ok(Some(key))
    }

    /// Registers a meter's HMAC key; committed when this returns. Idempotent for the same
    /// key, never overwritten.
    pub async fn add_meter(
        &self,
        meter_id: u64,
        key: &[u8; METER_KEY_BYTES],
    ) -> Result<Registration, StoreError> {
        self.register(
            "INSERT INTO meters (meter_id, hmac_key) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            "SELECT hmac_key FROM meters WHERE meter_id = $1",
            "meter",
            meter_id,
            key,
        )
        .await
    }

    /// Registers a gateway's public key; committed when this returns. Idempotent for the
    /// same key, never overwritten.
    pub async fn add_gateway(&self, gateway_id: u64, key: &VerifyingKey) -> Result<Registration, StoreError> {
        self.register(
            "INSERT INTO gateways (gateway_id, public_key) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            "SELECT public_key FROM gateways WHERE gateway_id = $1",
            "gateway",
            gateway_id,
            key.as_bytes(),
        )
        .await
    }

    async fn register(
        &self,
        insert: &str,
        select: &str,
        kind: &'static str,
        id: u64,
        key: &[u8; 32],
    ) -> Result<Registration, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let sql_id = u64_to_sql(id);
        let n = client.execute(insert, &[&sql_id, &&key[..]]).await.map_err(db_error)?;
        if n == 1 {
            return Ok(Registration::Created);
        }
        let row = client.query_one(select, &[&sql_id]).await.map_err(db_error)?;
        let current: &[u8] = row.try_get(0).map_err(db_error)?;
        if current == &key[..] {
            Ok(Registration::AlreadyRegistered)
        } else {
            Err(StoreError::Conflict { kind, id })
        }
    }

    /// Stores an API token's SHA-256 under a unique name; committed when this returns.
    pub async fn add_token(
        &self,
        name: &str,
        role: &str,
        sha256: &[u8; 32],
    ) -> Result<Registration, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let n = client
            .execute(
                "INSERT INTO api_tokens (token_sha256, name, role) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&&sha256[..], &name, &role],
            )
            .await
            .map_err(db_error)?;
        if n == 1 {
            return Ok(Registration::Created);
        }
        let row = client
            .query_opt("SELECT name, role FROM api_tokens WHERE token_sha256 = $1", &[&&sha256[..]])
            .await
            .map_err(db_error)?;
        match row {
            Some(r)
                if r.try_get::<_, &str>(0).map_err(db_error)? == name
                    && r.try_get::<_, &str>(1).map_err(db_error)? == role =>
            {
                Ok(Registration::AlreadyRegistered)
            }
            _ => Err(StoreError::TokenConflict { name: name.to_owned() }),
        }
    }

    /// The name and role of the token with this SHA-256, if any.
    pub async fn token(&self, sha256: &[u8; 32]) -> Result<Option<(String, String)>, StoreError> {
        self.lookups.token_store_lookup();
        let client = self.pool.get().await.map_err(pool_error)?;
        let stmt = client
            .prepare_cached("SELECT name, role FROM api_tokens WHERE token_sha256 = $1")
            .await
            .map_err(db_error)?;
        let Some(row) = client.query_opt(&stmt, &[&&sha256[..]]).await.map_err(db_error)? else {
            return Ok(None);
        };
        Ok(Some((row.try_get(0).map_err(db_error)?, row.try_get(1).map_err(db_error)?)))
    }

    /// Removes the token named `name`; whether one was there.
    pub async fn revoke_token(&self, name: &str) -> Result<bool, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let n = client.execute("DELETE FROM api_tokens WHERE name = $1", &[&name]).await.map_err(db_error)?;
        Ok(n > 0)
    }

    /// Names and roles of every token, by name.
    pub async fn tokens(&self) -> Result<Vec<(String, String)>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let rows =
            client.query("SELECT name, role FROM api_tokens ORDER BY name", &[]).await.map_err(db_error)?;
        rows.iter().map(|r| Ok((r.try_get(0).map_err(db_error)?, r.try_get(1).map_err(db_error)?))).collect()
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, KeyCache> {
        // A panic while holding the lock leaves only a cache behind; its content is still
        // valid (entries are inserted whole), so keep using it.
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn meter_key_of(id: u64, bytes: &[u8]) -> Result<[u8; METER_KEY_BYTES], StoreError> {
    <[u8; METER_KEY_BYTES]>::try_from(bytes)
        .map_err(|_| StoreError::Corrupt(format!("meter {id}: key is {} bytes", bytes.len())))
}
