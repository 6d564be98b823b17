//! Key files: generated here, written 0600, refused when others can read them.
//!
//! Every key file holds one line of lowercase hex: a gateway's 32-byte Ed25519 seed, or a
//! meter's 32-byte HMAC key. Public keys are printed as hex and are not secret.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use rand_core::{OsRng, RngCore};

/// Length of every secret key this project uses.
pub const SECRET_KEY_BYTES: usize = 32;
/// Length of a gateway's Ed25519 public key.
pub const PUBLIC_KEY_BYTES: usize = 32;
/// Key files larger than this are not key files.
const KEY_FILE_BYTES_MAX: u64 = 4096;

/// Why a key could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read or created (missing, no permission, already exists).
    #[error("key file {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// Group or others may read the file: the key must be considered leaked, or fixed first.
    #[error("key file {path} is readable by others (mode {mode:o}); run chmod 600 on it")]
    TooOpen {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The content is not 32 bytes of hex.
    #[error("key file {path} does not hold {SECRET_KEY_BYTES} bytes of hex")]
    BadContent {
        /// The key file.
        path: PathBuf,
    },
    /// A public key given as hex is malformed.
    #[error("public key is not {PUBLIC_KEY_BYTES} bytes of hex encoding an Ed25519 point")]
    BadPublicKey,
    /// The public key is a point of small order: signatures under it prove nothing (for some
    /// messages anyone can make one), so no gateway may be registered with it.
    #[error("public key is a weak (small-order) Ed25519 point; generate a new key")]
    WeakPublicKey,
}

/// A fresh random gateway signing key.
pub fn generate_gateway_key() -> SigningKey {
    SigningKey::generate(&mut OsRng)
}

/// A fresh random meter HMAC key.
pub fn generate_meter_key() -> [u8; SECRET_KEY_BYTES] {
    let mut k = [0u8; SECRET_KEY_BYTES];
    OsRng.fill_bytes(&mut k);
    k
}

/// Writes `secret` as hex to a new file with mode 0600; refuses to overwrite.
pub fn write_secret(path: &Path, secret: &[u8; SECRET_KEY_BYTES]) -> Result<(), KeyError> {
    let io = |source| KeyError::Io { path: path.to_owned(), source };
    let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
    let mut line = hex::encode(secret);
    line.push('\n');
    f.write_all(line.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Reads a secret written by [`write_secret`], refusing files that group or others can read.
pub fn read_secret(path: &Path) -> Result<[u8; SECRET_KEY_BYTES], KeyError> {
    let io = |source| KeyError::Io { path: path.to_owned(), source };
    let meta = std::fs::metadata(path).map_err(io)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::TooOpen { path: path.to_owned(), mode });
    }
    if meta.len() > KEY_FILE_BYTES_MAX {
        return Err(KeyError::BadContent { path: path.to_owned() });
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    let mut k = [0u8; SECRET_KEY_BYTES];
    hex::decode_to_slice(text.trim(), &mut k).map_err(|_| KeyError::BadContent { path: path.to_owned() })?;
    Ok(k)
}

/// Reads a gateway signing key file.
pub fn read_gateway_key(path: &Path) -> Result<SigningKey, KeyError> {
    read_secret(path).map(|seed| SigningKey::from_bytes(&seed))
}

/// Parses a gateway public key from hex, refusing weak (small-order) points: every
/// registration path (admin route, CLI) goes through here.
pub fn parse_public_key(hex_str: &str) -> Result<VerifyingKey, KeyError> {
    let mut k = [0u8; PUBLIC_KEY_BYTES];
    hex::decode_to_slice(hex_str.trim(), &mut k).map_err(|_| KeyError::BadPublicKey)?;
    let key = VerifyingKey::from_bytes(&k).map_err(|_| KeyError::BadPublicKey)?;
    check_public_key(&key)?;
    Ok(key)
}

/// Refuses a weak (small-order) gateway public key.
pub fn check_public_key(key: &VerifyingKey) -> Result<(), KeyError> {
    if key.is_weak() {
        return Err(KeyError::WeakPublicKey);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_0600_and_read_back() {
        let dir = std::env::temp_dir().join(format!("cs-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("meter.key");
        let _ = std::fs::remove_file(&p);
        let k = generate_meter_key();
        write_secret(&p, &k).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(read_secret(&p).unwrap(), k);
        assert!(matches!(write_secret(&p, &k), Err(KeyError::Io { .. })), "must not overwrite");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_secret(&p).unwrap_err();
        assert!(matches!(e, KeyError::TooOpen { mode: 0o644, .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn public_key_roundtrip() {
        let k = generate_gateway_key();
        let hex_str = hex::encode(k.verifying_key().as_bytes());
        assert_eq!(parse_public_key(&hex_str).unwrap(), k.verifying_key());
        assert!(parse_public_key("zz").is_err());
    }

    /// The identity point (encoded 1, 0, …, 0) has order 1; with it `verify` accepts the
    /// signature R = identity, s = 0 for every message.
    pub(crate) const IDENTITY_POINT: [u8; PUBLIC_KEY_BYTES] = {
        let mut k = [0u8; PUBLIC_KEY_BYTES];
        k[0] = 1;
        k
    };

    #[test]
    fn weak_public_keys_are_refused() {
        let e = parse_public_key(&hex::encode(IDENTITY_POINT)).unwrap_err();
        assert!(matches!(e, KeyError::WeakPublicKey), "{e}");
        assert!(e.to_string().contains("weak"), "{e}");
        // The point of order 2 (y = -1) is weak too.
        let mut order2 = [0xffu8; PUBLIC_KEY_BYTES];
        order2[0] = 0xec;
        order2[31] = 0x7f;
        assert!(matches!(parse_public_key(&hex::encode(order2)), Err(KeyError::WeakPublicKey)));
        assert!(check_public_key(&generate_gateway_key().verifying_key()).is_ok());
    }
}
