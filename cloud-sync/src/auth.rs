//! Operator API tokens: who may read usage and who may also register keys and manage tokens.
//!
//! Two roles. A `query` token reads usage; an `admin` token also registers meters and gateways
//! and manages tokens. The `admin_token_file` of the configuration is the bootstrap admin,
//! always valid, kept outside the store so that a fresh store can be administered at all.
//! Other tokens are made by `countersign-cloud create-token`, which generates 32 random bytes
//! locally, writes them to a 0600 file, and sends the endpoint only their SHA-256: the store
//! never holds a usable secret. A token is 32 random bytes, so a plain SHA-256 suffices (there
//! is nothing to brute-force that a slow hash would protect).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Longest token name, in bytes.
pub const TOKEN_NAME_BYTES_MAX: usize = 64;
/// Bytes of a token's secret (hex on the wire: 64 digits).
pub const TOKEN_BYTES: usize = 32;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read usage.
    Query,
    /// Read usage, register meters and gateways, manage tokens.
    Admin,
}

impl Role {
    /// The role's name as stored and sent: `query` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Query => "query",
            Role::Admin => "admin",
        }
    }

    /// Parses `query` or `admin`.
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "query" => Some(Role::Query),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// Whether a holder of this role may do what `needed` may.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

/// SHA-256 of a token's secret bytes: what the store keeps.
pub fn token_sha256(secret: &[u8; TOKEN_BYTES]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// Checks a token name: 1 to [`TOKEN_NAME_BYTES_MAX`] of `A-Z a-z 0-9 . _ -`, so that names
/// are safe in URLs, logs and shells.
pub fn check_token_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > TOKEN_NAME_BYTES_MAX {
        return Err(format!("must be 1 to {TOKEN_NAME_BYTES_MAX} bytes, got {}", name.len()));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("'{c}' is not allowed (use A-Z a-z 0-9 . _ -)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_order_and_parse() {
        assert!(Role::Admin.allows(Role::Query));
        assert!(Role::Admin.allows(Role::Admin));
        assert!(Role::Query.allows(Role::Query));
        assert!(!Role::Query.allows(Role::Admin));
        for r in [Role::Query, Role::Admin] {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn names_are_checked_and_hash_is_sha256() {
        assert!(check_token_name("billing-export_1.0").is_ok());
        assert!(check_token_name("").is_err());
        assert!(check_token_name("a b").unwrap_err().contains("' '"));
        assert!(check_token_name(&"a".repeat(TOKEN_NAME_BYTES_MAX + 1)).is_err());
        // SHA-256 of 32 zero bytes.
        assert_eq!(
            hex::encode(token_sha256(&[0u8; 32])),
            "66687aadf862bd776c8fc18b8e9f8e20089714856ee233b3902a591d0d5f2925"
        );
    }
}
