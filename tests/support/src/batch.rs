//! Gateway keys and signed batches, made as a gateway makes them (`countersign-protocol`'s
//! builder). Knows nothing of where a batch is sent or what the endpoint answers.

use countersign_protocol::{BatchBuilder, BatchHeader, RecordRef};
use ed25519_dalek::SigningKey;

/// The gateway key most tests register: every byte of the secret is 0x42.
pub fn gateway_key() -> SigningKey {
    signing_key(0x42)
}

/// A gateway key whose secret is `byte` 32 times: fixed, so a test is the same every run.
pub fn signing_key(byte: u8) -> SigningKey {
    SigningKey::from_bytes(&[byte; 32])
}

/// A batch of `gateway_id`, formed at `created_ms`, of `records` (the gateway's receive time
/// in Unix milliseconds, the report's bytes), signed with `key`.
pub fn signed_batch<R: AsRef<[u8]>>(
    key: &SigningKey,
    gateway_id: u64,
    batch_seq: u64,
    created_ms: u64,
    records: &[(u64, R)],
) -> Vec<u8> {
    let mut b = BatchBuilder::new(BatchHeader { gateway_id, batch_seq, created_ms });
    for (received_ms, report) in records {
        b.push(RecordRef { received_ms: *received_ms, report: report.as_ref() }).expect("the batch has room");
    }
    b.sign(key)
}

/// A batch of `gateway_id` formed at `at_ms`, every one of whose `reports` the gateway
/// received at that moment, signed with `key`.
pub fn signed_batch_at<R: AsRef<[u8]>>(
    key: &SigningKey,
    gateway_id: u64,
    batch_seq: u64,
    at_ms: u64,
    reports: &[R],
) -> Vec<u8> {
    let records: Vec<(u64, &[u8])> = reports.iter().map(|r| (at_ms, r.as_ref())).collect();
    signed_batch(key, gateway_id, batch_seq, at_ms, &records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_batch_opens_under_its_key_only() {
        let records = [(1_000, vec![1u8, 2, 3]), (2_000, vec![4u8])];
        let signed = signed_batch(&gateway_key(), 5, 9, 500, &records);
        let opened =
            countersign_protocol::open(&signed, |id| (id == 5).then(|| gateway_key().verifying_key()))
                .expect("opens");
        assert_eq!(opened.header, BatchHeader { gateway_id: 5, batch_seq: 9, created_ms: 500 });
        assert_eq!(opened.len(), 2);
        assert!(countersign_protocol::open(&signed, |_| Some(signing_key(0x43).verifying_key())).is_err());
        let at = signed_batch_at(&gateway_key(), 5, 10, 700, &[vec![1u8]]);
        let opened = countersign_protocol::open(&at, |_| Some(gateway_key().verifying_key())).expect("opens");
        assert_eq!(opened.header.created_ms, 700);
        assert!(opened.records().all(|r| r.is_ok_and(|r| r.received_ms == 700)));
    }
}
