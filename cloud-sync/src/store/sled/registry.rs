//! The `meters`, `gateways` and `api_tokens` trees.

use countersign_meter::METER_KEY_BYTES;
use countersign_protocol::keys::PUBLIC_KEY_BYTES;
use ed25519_dalek::VerifyingKey;

use super::Store;
use crate::store::{Registration, StoreError, API_TOKENS_MAX};

impl Store {
    /// Registers a meter's HMAC key; durable when this returns. Idempotent for the same key.
    pub fn add_meter(&self, meter_id: u64, key: &[u8; METER_KEY_BYTES]) -> Result<Registration, StoreError> {
        self.register(&self.meters, "meter", meter_id, key)
    }

    /// The HMAC key of a meter, if registered.
    pub fn meter_key(&self, meter_id: u64) -> Result<Option<[u8; METER_KEY_BYTES]>, StoreError> {
        let Some(v) = self.meters.get(meter_id.to_be_bytes())? else { return Ok(None) };
        let key = <[u8; METER_KEY_BYTES]>::try_from(v.as_ref())
            .map_err(|_| StoreError::Corrupt(format!("meter {meter_id}: key is {} bytes", v.len())))?;
        Ok(Some(key))
    }

    /// Registers a gateway's public key; durable when this returns. Idempotent for the same key.
    pub fn add_gateway(&self, gateway_id: u64, key: &VerifyingKey) -> Result<Registration, StoreError> {
        self.register(&self.gateways, "gateway", gateway_id, key.as_bytes())
    }

    /// The public key of a gateway, if registered.
    pub fn gateway_key(&self, gateway_id: u64) -> Result<Option<VerifyingKey>, StoreError> {
        self.lookups.gateway_store_lookup();
        let Some(v) = self.gateways.get(gateway_id.to_be_bytes())? else { return Ok(None) };
        let bytes = <[u8; PUBLIC_KEY_BYTES]>::try_from(v.as_ref())
            .map_err(|_| StoreError::Corrupt(format!("gateway {gateway_id}: key is {} bytes", v.len())))?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| StoreError::Corrupt(format!("gateway {gateway_id}: key is not an Ed25519 point")))?;
        Ok(Some(key))
    }

    fn register(
        &self,
        tree: &sled::Tree,
        kind: &'static str,
        id: u64,
        key: &[u8; 32],
    ) -> Result<Registration, StoreError> {
        match tree.compare_and_swap(id.to_be_bytes(), None::<&[u8]>, Some(&key[..]))? {
            Ok(()) => {
                self.flush()?;
                Ok(Registration::Created)
            }
            Err(cas) if cas.current.as_deref() == Some(&key[..]) => {
                // Flushing here too covers a concurrent first registration still in flight.
                self.flush()?;
                Ok(Registration::AlreadyRegistered)
            }
            Err(_) => Err(StoreError::Conflict { kind, id }),
        }
    }

    /// Stores an API token's SHA-256 under a unique name; durable when this returns.
    /// Idempotent for the same name, role and token.
    pub fn add_token(&self, name: &str, role: &str, sha256: &[u8; 32]) -> Result<Registration, StoreError> {
        let _guard = self.token_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let value = encode_token(name, role)?;
        if let Some(current) = self.tokens.get(sha256)? {
            return if current.as_ref() == value.as_slice() {
                Ok(Registration::AlreadyRegistered)
            } else {
                Err(StoreError::TokenConflict { name: name.to_owned() })
            };
        }
        let all = self.tokens()?;
        if all.iter().any(|(n, _)| n == name) {
            return Err(StoreError::TokenConflict { name: name.to_owned() });
        }
        if all.len() >= API_TOKENS_MAX {
            return Err(StoreError::TooManyTokens);
        }
        self.tokens.insert(sha256, value)?;
        self.flush()?;
        Ok(Registration::Created)
    }

    /// The name and role of the token with this SHA-256, if any.
    pub fn token(&self, sha256: &[u8; 32]) -> Result<Option<(String, String)>, StoreError> {
        self.lookups.token_store_lookup();
        self.tokens.get(sha256)?.map(|v| decode_token(&v)).transpose()
    }

    /// Removes the token named `name`; durable when this returns. Whether one was there.
    pub fn revoke_token(&self, name: &str) -> Result<bool, StoreError> {
        let _guard = self.token_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut found = None;
        for item in self.tokens.iter().take(API_TOKENS_MAX) {
            let (k, v) = item?;
            if decode_token(&v)?.0 == name {
                found = Some(k);
                break;
            }
        }
        let Some(key) = found else { return Ok(false) };
        self.tokens.remove(key)?;
        self.flush()?;
        Ok(true)
    }

    /// Names and roles of every token, by name.
    pub fn tokens(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tokens.iter().take(API_TOKENS_MAX) {
            let (_, v) = item?;
            out.push(decode_token(&v)?);
        }
        out.sort();
        Ok(out)
    }
}

fn encode_token(name: &str, role: &str) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(&(name, role)).map_err(|e| StoreError::Corrupt(format!("token does not encode: {e}")))
}

fn decode_token(bytes: &[u8]) -> Result<(String, String), StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("token entry does not decode: {e}")))
}
