//! Signed batches: how a gateway carries device reports to the endpoint.
//!
//! # Wire format, version 1
//!
//! ```text
//! signed = body ‖ signature[64]
//! body   = version:u8 (=1) gateway_id:varint u64 batch_seq:varint u64 created_ms:varint u64
//!          count:varint u32 record{count}
//! record = received_ms:varint u64 len:varint u32 report[len]
//! signature = Ed25519(gateway key, body)
//! ```
//!
//! Reports travel as the device's original bytes, tag included, so the endpoint can verify
//! each one and keep it as evidence. Limits ([`BATCH_BYTES_MAX`], [`BATCH_RECORDS_MAX`],
//! [`REPORT_BYTES_MAX`]) are checked before anything is allocated.

use countersign_meter::REPORT_BYTES_MAX;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// The version byte this crate writes and reads.
pub const BATCH_VERSION: u8 = 1;
/// Length of the Ed25519 signature that ends a signed batch.
pub const SIGNATURE_BYTES: usize = 64;
/// Largest signed batch accepted, signature included.
pub const BATCH_BYTES_MAX: usize = 1024 * 1024;
/// Most records one batch may carry.
pub const BATCH_RECORDS_MAX: usize = 8192;
/// Bytes a record adds beyond its report at most (two varints).
pub const RECORD_OVERHEAD_BYTES_MAX: usize = 10 + 5;
/// Bytes of a body before its records at most.
pub const BATCH_HEADER_BYTES_MAX: usize = 1 + 10 + 10 + 10 + 5;

/// Who sent a batch and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchHeader {
    /// The gateway that signed it.
    pub gateway_id: u64,
    /// The gateway's batch counter (informational; idempotency is per record).
    pub batch_seq: u64,
    /// Gateway time when the batch was formed, Unix milliseconds.
    pub created_ms: u64,
}

/// One record of a batch: a device report as received, and when the gateway received it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// Gateway receive time, Unix milliseconds.
    pub received_ms: u64,
    /// The device's original report bytes.
    pub report: &'a [u8],
}

/// Why a batch was refused as a whole. None is recoverable by resending the same bytes.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum BatchError {
    /// Longer than [`BATCH_BYTES_MAX`].
    #[error("batch is {0} bytes, more than the {BATCH_BYTES_MAX} allowed")]
    TooLarge(usize),
    /// Too short to hold a header and a signature.
    #[error("batch is truncated")]
    Truncated,
    /// The version byte is unknown.
    #[error("unknown batch version {0}")]
    UnknownVersion(u8),
    /// A header or record field is malformed.
    #[error("malformed batch: {0}")]
    Malformed(&'static str),
    /// More records than [`BATCH_RECORDS_MAX`].
    #[error("batch declares {0} records, more than the {BATCH_RECORDS_MAX} allowed")]
    TooManyRecords(u32),
    /// A record's report exceeds [`REPORT_BYTES_MAX`].
    #[error("record {0} is longer than {REPORT_BYTES_MAX} bytes")]
    RecordTooLarge(usize),
    /// No key is registered for this gateway.
    #[error("gateway {0} is not registered")]
    UnknownGateway(u64),
    /// The signature does not verify under the gateway's key.
    #[error("batch signature does not verify for gateway {0}")]
    BadSignature(u64),
    /// The batch would exceed a limit while being built.
    #[error("batch full")]
    Full,
}

impl BatchError {
    /// Whether the sender is at fault for authentication (HTTP 401) rather than format (400).
    pub fn is_auth(&self) -> bool {
        matches!(self, BatchError::UnknownGateway(_) | BatchError::BadSignature(_))
    }
}

/// Builds a batch record by record, enforcing the limits as it goes.
#[derive(Debug)]
pub struct BatchBuilder {
    header: BatchHeader,
    records: Vec<u8>,
    count: u32,
}

impl BatchBuilder {
    /// An empty batch.
    pub fn new(header: BatchHeader) -> Self {
        Self { header, records: Vec::new(), count: 0 }
    }

    /// Records so far.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether no record was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Size of the signed batch if it were finished now.
    pub fn signed_len_max(&self) -> usize {
        BATCH_HEADER_BYTES_MAX + self.records.len() + SIGNATURE_BYTES
    }

    /// Whether a report of `report_len` bytes still fits under `bytes_max` and `records_max`
    /// (each capped by the protocol's own limits).
    pub fn fits(&self, report_len: usize, records_max: usize, bytes_max: usize) -> bool {
        let records_max = records_max.min(BATCH_RECORDS_MAX);
        let bytes_max = bytes_max.min(BATCH_BYTES_MAX);
        self.len() < records_max
            && report_len <= REPORT_BYTES_MAX
            && self.signed_len_max() + RECORD_OVERHEAD_BYTES_MAX + report_len <= bytes_max
    }

    /// Appends a record; refuses with [`BatchError::Full`] past the protocol limits.
    pub fn push(&mut self, record: RecordRef<'_>) -> Result<(), BatchError> {
        if !self.fits(record.report.len(), BATCH_RECORDS_MAX, BATCH_BYTES_MAX) {
            return Err(BatchError::Full);
        }
        let mut buf = [0u8; RECORD_OVERHEAD_BYTES_MAX];
        let used = postcard::to_slice(&(record.received_ms, record.report.len() as u32), &mut buf)
            .map_err(|_| BatchError::Malformed("record header"))?
            .len();
        self.records.extend_from_slice(&buf[..used]);
        self.records.extend_from_slice(record.report);
        self.count += 1;
        Ok(())
    }

    /// Encodes and signs the batch.
    pub fn sign(self, key: &SigningKey) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.signed_len_max());
        out.push(BATCH_VERSION);
        let mut buf = [0u8; BATCH_HEADER_BYTES_MAX];
        // Fixed-size integers into a buffer sized for their widest encoding cannot fail.
        if let Ok(h) = postcard::to_slice(&(self.header, self.count), &mut buf) {
            out.extend_from_slice(h);
        }
        out.extend_from_slice(&self.records);
        let sig = key.sign(&out);
        out.extend_from_slice(&sig.to_bytes());
        out
    }
}

/// A batch whose signature has been verified.
#[derive(Debug)]
pub struct VerifiedBatch<'a> {
    /// Its header.
    pub header: BatchHeader,
    records: &'a [u8],
    count: u32,
}

/// Reads the header of a signed batch without verifying it (to find the gateway's key).
pub fn peek_header(signed: &[u8]) -> Result<BatchHeader, BatchError> {
    let (header, _, _) = split(signed)?;
    Ok(header)
}

fn split(signed: &[u8]) -> Result<(BatchHeader, u32, &[u8]), BatchError> {
    if signed.len() > BATCH_BYTES_MAX {
        return Err(BatchError::TooLarge(signed.len()));
    }
    if signed.len() < 1 + 4 + SIGNATURE_BYTES {
        return Err(BatchError::Truncated);
    }
    let body = &signed[..signed.len() - SIGNATURE_BYTES];
    let (&version, rest) = body.split_first().ok_or(BatchError::Truncated)?;
    if version != BATCH_VERSION {
        return Err(BatchError::UnknownVersion(version));
    }
    let ((header, count), records): ((BatchHeader, u32), &[u8]) =
        postcard::take_from_bytes(rest).map_err(|_| BatchError::Malformed("header"))?;
    if count as usize > BATCH_RECORDS_MAX {
        return Err(BatchError::TooManyRecords(count));
    }
    Ok((header, count, records))
}

/// Checks the signature with the key `lookup` returns for the batch's gateway; only then
/// are the records looked at.
///
/// The check is `verify_strict`: it refuses small-order keys and R values and non-canonical
/// encodings, so one batch has one valid signature under one key, and a weak key (which
/// registration refuses anyway) verifies nothing.
pub fn open(
    signed: &[u8],
    lookup: impl FnOnce(u64) -> Option<VerifyingKey>,
) -> Result<VerifiedBatch<'_>, BatchError> {
    let (header, count, records) = split(signed)?;
    let key = lookup(header.gateway_id).ok_or(BatchError::UnknownGateway(header.gateway_id))?;
    let (body, sig) = signed.split_at(signed.len() - SIGNATURE_BYTES);
    let sig = Signature::from_slice(sig).map_err(|_| BatchError::BadSignature(header.gateway_id))?;
    key.verify_strict(body, &sig).map_err(|_| BatchError::BadSignature(header.gateway_id))?;
    // Walk once to reject a malformed body as a whole before anything is stored.
    let batch = VerifiedBatch { header, records, count };
    let mut n = 0usize;
    for r in batch.records() {
        r?;
        n += 1;
    }
    if n != count as usize {
        return Err(BatchError::Malformed("record count"));
    }
    Ok(batch)
}

impl<'a> VerifiedBatch<'a> {
    /// Number of records.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether it has no record.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The records in batch order.
    pub fn records(&self) -> RecordIter<'a> {
        RecordIter { rest: self.records, left: self.count, failed: false }
    }
}

/// Iterator over the records of a [`VerifiedBatch`].
#[derive(Debug)]
pub struct RecordIter<'a> {
    rest: &'a [u8],
    left: u32,
    failed: bool,
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Result<RecordRef<'a>, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if self.left == 0 {
            if !self.rest.is_empty() {
                self.failed = true;
                return Some(Err(BatchError::Malformed("trailing bytes after records")));
            }
            return None;
        }
        let r = (|| {
            let ((received_ms, len), rest): ((u64, u32), &[u8]) =
                postcard::take_from_bytes(self.rest).map_err(|_| BatchError::Malformed("record header"))?;
            let len = len as usize;
            if len > REPORT_BYTES_MAX {
                return Err(BatchError::RecordTooLarge(len));
            }
            if rest.len() < len {
                return Err(BatchError::Malformed("record truncated"));
            }
            let (report, rest) = rest.split_at(len);
            self.rest = rest;
            Ok(RecordRef { received_ms, report })
        })();
        self.left -= 1;
        if r.is_err() {
            self.failed = true;
        }
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[42u8; 32])
    }

    fn header() -> BatchHeader {
        BatchHeader { gateway_id: 7, batch_seq: 300, created_ms: 1_795_000_000_000 }
    }

    const SIG_HEX: &str = "790e09b8ff6ddb621cc14b06b78a93a9dd048460288de773513ca16b94fbc1c429ba246247ba215197824f3d9c785d21bc0abb49ef92cfc9bedbd59a2954840d";

    #[test]
    fn golden_bytes_v1() {
        let mut b = BatchBuilder::new(header());
        b.push(RecordRef { received_ms: 1_795_000_000_123, report: &[0xaa; 3] }).unwrap();
        let signed = b.sign(&key());
        let body = &signed[..signed.len() - SIGNATURE_BYTES];
        assert_eq!(
            hex::encode(body),
            // version, gateway 7, seq 300, created_ms, count 1, received_ms, len 3, report
            "0107ac0280bcd9f29e3401fbbcd9f29e3403aaaaaa"
        );
        // Ed25519 is deterministic: the signature is pinned too.
        assert_eq!(hex::encode(&signed[body.len()..]), SIG_HEX);
    }

    #[test]
    fn roundtrip() {
        let mut b = BatchBuilder::new(header());
        for i in 0..100u8 {
            b.push(RecordRef { received_ms: u64::from(i), report: &[i; 48] }).unwrap();
        }
        let signed = b.sign(&key());
        let v = open(&signed, |g| (g == 7).then(|| key().verifying_key())).unwrap();
        assert_eq!(v.header, header());
        let recs: Vec<_> = v.records().map(|r| r.unwrap()).collect();
        assert_eq!(recs.len(), 100);
        assert_eq!(recs[99].report, &[99u8; 48][..]);
    }

    #[test]
    fn bad_signature_and_unknown_gateway() {
        let mut b = BatchBuilder::new(header());
        b.push(RecordRef { received_ms: 1, report: &[1; 40] }).unwrap();
        let mut signed = b.sign(&key());
        let other = SigningKey::from_bytes(&[1u8; 32]).verifying_key();
        assert_eq!(open(&signed, |_| Some(other)).unwrap_err(), BatchError::BadSignature(7));
        assert_eq!(open(&signed, |_| None).unwrap_err(), BatchError::UnknownGateway(7));
        let n = signed.len();
        signed[n - SIGNATURE_BYTES - 1] ^= 1;
        assert_eq!(open(&signed, |_| Some(key().verifying_key())).unwrap_err(), BatchError::BadSignature(7));
    }

    #[test]
    fn weak_keys_and_malleable_signatures_verify_nothing() {
        use ed25519_dalek::Verifier;
        let mut b = BatchBuilder::new(header());
        b.push(RecordRef { received_ms: 1, report: &[1; 40] }).unwrap();
        let signed = b.sign(&key());
        let body = &signed[..signed.len() - SIGNATURE_BYTES];
        // Under the identity point, R = identity and s = 0 is a "signature" of anything for
        // the lenient check; the strict one refuses it.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = VerifyingKey::from_bytes(&identity).unwrap();
        let mut forged_sig = [0u8; SIGNATURE_BYTES];
        forged_sig[0] = 1;
        let forged_sig = Signature::from_bytes(&forged_sig);
        assert!(weak.verify(body, &forged_sig).is_ok(), "the lenient check accepts the forgery");
        let mut forged = body.to_vec();
        forged.extend_from_slice(&forged_sig.to_bytes());
        assert_eq!(open(&forged, |_| Some(weak)).unwrap_err(), BatchError::BadSignature(7));
    }

    #[test]
    fn limits_are_enforced_before_allocation() {
        assert!(matches!(open(&vec![1u8; BATCH_BYTES_MAX + 1], |_| None), Err(BatchError::TooLarge(_))));
        // A header that claims a huge count is refused without reading further.
        let mut body = vec![BATCH_VERSION];
        let mut buf = [0u8; 64];
        body.extend_from_slice(postcard::to_slice(&(header(), u32::MAX), &mut buf).unwrap());
        body.extend_from_slice(&[0u8; SIGNATURE_BYTES]);
        assert_eq!(peek_header(&body).unwrap_err(), BatchError::TooManyRecords(u32::MAX));
    }

    #[test]
    fn builder_refuses_past_limits() {
        let mut b = BatchBuilder::new(header());
        assert_eq!(
            b.push(RecordRef { received_ms: 0, report: &[0u8; REPORT_BYTES_MAX + 1] }),
            Err(BatchError::Full)
        );
        assert!(!b.fits(48, 0, BATCH_BYTES_MAX));
        assert!(!b.fits(48, 10, 100));
        assert!(b.fits(48, 10, 1000));
    }

    proptest::proptest! {
        #[test]
        fn open_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = peek_header(&bytes);
            let _ = open(&bytes, |_| Some(key().verifying_key()));
        }

        #[test]
        fn signed_garbage_records_never_panic(records in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400), count in 0u32..20) {
            // A correctly signed body with arbitrary record bytes: must fail cleanly or parse.
            let mut body = vec![BATCH_VERSION];
            let mut buf = [0u8; 64];
            body.extend_from_slice(postcard::to_slice(&(header(), count), &mut buf).unwrap());
            body.extend_from_slice(&records);
            let sig = key().sign(&body);
            body.extend_from_slice(&sig.to_bytes());
            let _ = open(&body, |_| Some(key().verifying_key()));
        }
    }
}
