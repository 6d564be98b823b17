//! The vendored rumqttc v4 decoder (vendor/rumqttc/COUNTERSIGN-PATCH.md): an incoming
//! PUBLISH over the packet limit becomes a truncated publish instead of an error, its
//! payload is discarded as it arrives (never buffered), and the packets after it decode.
//! The vendored crate's own tests cannot run outside the workspace, so they live here.

use bytes::{BufMut, BytesMut};
use rumqttc::{Codec, Packet, PubAck, Publish, QoS, OVERSIZED_PAYLOAD_EXCERPT_BYTES_MAX};
use tokio_util::codec::{Decoder, Encoder};

const LIMIT: usize = 1024;

fn publish(topic: &str, qos: QoS, pkid: u16, payload: Vec<u8>) -> Publish {
    let mut p = Publish::new(topic, qos, payload);
    p.pkid = pkid;
    p
}

fn encode(packets: &[Packet]) -> Vec<u8> {
    let mut enc = Codec::new(usize::MAX, usize::MAX);
    let mut buf = BytesMut::new();
    for p in packets {
        enc.encode(p.clone(), &mut buf).expect("encodes");
    }
    buf.to_vec()
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// Feeds `wire` to a decoder `step` bytes at a time (as reads from a socket would), and
/// returns the packets and the largest the read buffer ever was.
fn decode_in_steps(wire: &[u8], step: usize) -> (Vec<Packet>, usize) {
    let mut codec = Codec::new(LIMIT, LIMIT);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut high = 0;
    for piece in wire.chunks(step) {
        buf.put_slice(piece);
        high = high.max(buf.len());
        while let Some(p) = codec.decode(&mut buf).expect("decodes") {
            out.push(p);
        }
    }
    assert!(buf.is_empty(), "{} bytes left undecoded", buf.len());
    assert_eq!(codec.discarding(), 0);
    (out, high)
}

fn truncated(p: &Packet) -> (&Publish, usize) {
    match p {
        Packet::Publish(p) => (p, p.truncated_from.expect("truncated")),
        other => panic!("not a publish: {other:?}"),
    }
}

#[test]
fn oversized_publish_is_cut_and_the_packets_behind_it_decode() {
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let pkid = if qos == QoS::AtMostOnce { 0 } else { 7 };
        let big = pattern(LIMIT * 64);
        let before = publish("countersign/v1/reports/1", QoS::AtLeastOnce, 1, vec![1; 10]);
        let after = publish(
            "countersign/v1/reports/2",
            qos,
            if pkid == 0 { 0 } else { pkid + 1 },
            vec![2; LIMIT - 40],
        );
        let wire = encode(&[
            Packet::Publish(before.clone()),
            Packet::Publish(publish("countersign/v1/reports/9", qos, pkid, big.clone())),
            Packet::Publish(publish("countersign/v1/reports/9", qos, pkid, big.clone())),
            Packet::PubAck(PubAck::new(3)),
            Packet::Publish(after.clone()),
        ]);
        for step in [1, 7, 100, 4096, wire.len()] {
            let (packets, high) = decode_in_steps(&wire, step);
            assert_eq!(packets.len(), 5, "qos {qos:?} step {step}");
            assert_eq!(packets[0], Packet::Publish(before.clone()));
            for p in &packets[1..3] {
                let (p, size) = truncated(p);
                assert_eq!(size, big.len());
                assert_eq!(p.qos, qos);
                assert_eq!(p.pkid, pkid);
                assert_eq!(p.topic, "countersign/v1/reports/9");
                assert_eq!(&p.payload[..], &big[..OVERSIZED_PAYLOAD_EXCERPT_BYTES_MAX]);
            }
            assert_eq!(packets[3], Packet::PubAck(PubAck::new(3)));
            assert_eq!(packets[4], Packet::Publish(after.clone()));
            if step < wire.len() {
                // Never more buffered than one allowed packet and one read.
                assert!(high <= LIMIT + 2 * step.max(64), "buffer reached {high} bytes at step {step}");
            }
        }
    }
}

#[test]
fn the_limit_is_exact() {
    // Remaining length = 2 + topic + 2 (pkid) + payload.
    let topic = "t";
    let at = LIMIT - 2 - topic.len() - 2;
    let fits = publish(topic, QoS::AtLeastOnce, 5, pattern(at));
    let over = publish(topic, QoS::AtLeastOnce, 6, pattern(at + 1));
    let (packets, _) = decode_in_steps(&encode(&[Packet::Publish(fits.clone()), Packet::Publish(over)]), 3);
    assert_eq!(packets[0], Packet::Publish(fits));
    let (p, size) = truncated(&packets[1]);
    assert_eq!((size, p.pkid), (at + 1, 6));
}

#[test]
fn a_short_oversized_payload_is_kept_whole_as_the_excerpt() {
    // The topic alone takes the packet over the limit.
    let topic = "x".repeat(LIMIT);
    let (packets, _) =
        decode_in_steps(&encode(&[Packet::Publish(publish(&topic, QoS::AtLeastOnce, 9, vec![1, 2, 3]))]), 50);
    let (p, size) = truncated(&packets[0]);
    assert_eq!((size, &p.payload[..], p.topic.len()), (3, &[1u8, 2, 3][..], LIMIT));
}

#[test]
fn other_oversized_packets_are_still_errors() {
    let mut codec = Codec::new(16, 16);
    // SUBACK (type 9) announcing 1000 bytes.
    let mut buf = BytesMut::from(&[0x90, 0xe8, 0x07][..]);
    assert!(matches!(codec.decode(&mut buf), Err(rumqttc::Error::PayloadSizeLimitExceeded(1000))));
}

#[test]
fn a_topic_longer_than_the_packet_is_malformed_not_a_panic() {
    let mut codec = Codec::new(16, 16);
    // PUBLISH QoS 1, remaining length 100, topic length 200.
    let mut buf = BytesMut::from(&[0x32, 100, 0x00, 200][..]);
    assert!(codec.decode(&mut buf).is_err());
}

#[test]
fn a_packet_id_of_zero_is_refused_when_oversized_too() {
    let mut codec = Codec::new(16, 16);
    let mut wire = encode(&[Packet::Publish(publish("t", QoS::AtMostOnce, 0, vec![0; 100]))]);
    wire[0] |= 0b0010; // QoS 1, with the first two payload bytes (zeros) read as the packet id
    let mut buf = BytesMut::from(&wire[..]);
    assert!(matches!(codec.decode(&mut buf), Err(rumqttc::Error::PacketIdZero)));
}

/// The model: what the decoder must yield for a publish, given the limit.
fn expected(p: &Publish) -> Publish {
    let remaining = 2 + p.topic.len() + if p.qos == QoS::AtMostOnce { 0 } else { 2 } + p.payload.len();
    if remaining <= LIMIT {
        return p.clone();
    }
    let mut cut = p.clone();
    cut.payload = p.payload.slice(..p.payload.len().min(OVERSIZED_PAYLOAD_EXCERPT_BYTES_MAX));
    cut.truncated_from = Some(p.payload.len());
    cut
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

    /// Any sequence of publishes, some over the limit, read in any step size: the decoder
    /// yields exactly the model's sequence and never buffers much more than one packet.
    #[test]
    fn any_publishes_in_any_reads_decode_as_the_model(
        sizes in proptest::collection::vec((0usize..3 * LIMIT, 0u8..3, 1usize..40), 1..12),
        step in 1usize..3000,
    ) {
        let publishes: Vec<Publish> = sizes
            .iter()
            .enumerate()
            .map(|(i, (n, q, t))| {
                let qos = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][usize::from(*q)];
                let pkid = if qos == QoS::AtMostOnce { 0 } else { i as u16 + 1 };
                publish(&"t".repeat(*t), qos, pkid, pattern(*n))
            })
            .collect();
        let wire = encode(&publishes.iter().cloned().map(Packet::Publish).collect::<Vec<_>>());
        let (packets, high) = decode_in_steps(&wire, step);
        let want: Vec<Packet> = publishes.iter().map(|p| Packet::Publish(expected(p))).collect();
        proptest::prop_assert_eq!(packets, want);
        proptest::prop_assert!(high <= LIMIT + 2 * step.max(64) + 64, "buffer reached {}", high);
    }

    /// Arbitrary bytes never panic the decoder, and it never asks to buffer without bound.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000), step in 1usize..64) {
        let mut codec = Codec::new(64, 64);
        let mut buf = BytesMut::new();
        'feed: for piece in bytes.chunks(step) {
            buf.put_slice(piece);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
            // What the decoder holds: at most one prefix (fixed header, topic, packet id,
            // excerpt) or one allowed packet, plus the last read.
            proptest::prop_assert!(buf.len() <= 5 + 2 + 65535 + 2 + OVERSIZED_PAYLOAD_EXCERPT_BYTES_MAX + step);
        }
    }
}
