//! Fuzzes the signed batch decoder past its signature: the input is the batch body, signed
//! here with a known gateway key, so the fuzzer reaches the header and record walk. Never a
//! panic; every record the walk yields decodes as a device report.
//!
//! The strict signature check is fuzzed too: with the input's first 32 bytes as the gateway's
//! public key, a weak (small-order) key verifies nothing and is refused at registration, and
//! the forgery the lenient check accepts under the identity point (R = identity, s = 0) is
//! refused for every body.
//!
//! Run: `tests/fuzz.sh` (all targets) or `cd cloud-sync/fuzz && cargo fuzz run batch_open`.
#![no_main]

use countersign_protocol::batch::open;
use countersign_protocol::keys::{check_public_key, KeyError};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use libfuzzer_sys::fuzz_target;

/// The identity point, encoded: order 1.
const IDENTITY: [u8; 32] = {
    let mut k = [0u8; 32];
    k[0] = 1;
    k
};

fuzz_target!(|body: &[u8]| {
    let key = SigningKey::from_bytes(&[3u8; 32]);
    let mut signed = body.to_vec();
    signed.extend_from_slice(&key.sign(body).to_bytes());
    let public = key.verifying_key();
    if let Ok(batch) = open(&signed, |_| Some(public)) {
        for r in batch.records() {
            let _ = r;
        }
    }
    // Unsigned garbage too: the signature check must refuse it without panicking.
    let _ = open(body, |_| Some(public));

    // Any 32 bytes as a gateway key: a weak one verifies nothing and is never registered.
    if let Some(k) = body.get(..32).and_then(|k| <[u8; 32]>::try_from(k).ok()) {
        if let Ok(fuzzed) = VerifyingKey::from_bytes(&k) {
            let verified = open(body, |_| Some(fuzzed)).is_ok();
            if fuzzed.is_weak() {
                assert!(!verified, "a weak key verified a batch");
                assert!(matches!(check_public_key(&fuzzed), Err(KeyError::WeakPublicKey)));
            }
        }
    }
    // The identity-point forgery of this body.
    if let Ok(identity) = VerifyingKey::from_bytes(&IDENTITY) {
        let mut forged = body.to_vec();
        let mut sig = [0u8; 64];
        sig[0] = 1;
        forged.extend_from_slice(&sig);
        assert!(open(&forged, |_| Some(identity)).is_err(), "the identity forgery verified");
    }
});
