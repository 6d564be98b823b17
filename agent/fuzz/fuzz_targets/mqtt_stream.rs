//! The broker's byte stream (network input) through the patched MQTT decoder the agent runs,
//! in reads of fuzzed sizes: it never panics, never buffers more than one allowed packet or
//! one oversized publish's prefix plus the last read, and an oversized PUBLISH comes out cut
//! to at most the excerpt, with the packets behind it still decoded.
#![no_main]

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use rumqttc::{Codec, Packet, QoS, OVERSIZED_PAYLOAD_EXCERPT_BYTES_MAX};
use tokio_util::codec::Decoder;

/// Small, so that fuzzed inputs reach the oversized path often.
const LIMIT: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Some((&step, wire)) = data.split_first() else { return };
    let step = usize::from(step).max(1);
    let mut codec = Codec::new(LIMIT, LIMIT);
    let mut buf = BytesMut::new();
    'feed: for piece in wire.chunks(step) {
        buf.put_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(Packet::Publish(p))) => match p.truncated_from {
                    Some(n) => {
                        // `n` is the payload's true length; the packet (topic, packet id,
                        // payload) was over the limit.
                        let pkid_bytes = if p.qos == QoS::AtMostOnce { 0 } else { 2 };
                        assert!(2 + p.topic.len() + pkid_bytes + n > LIMIT, "a publish within the limit was cut");
                        assert!(p.payload.len() <= OVERSIZED_PAYLOAD_EXCERPT_BYTES_MAX.min(n));
                    }
                    None => assert!(p.payload.len() <= LIMIT),
                },
                Ok(Some(_)) => {}
                Ok(None) => break,
                // The connection is dropped on a malformed packet; nothing more to read.
                Err(_) => break 'feed,
            }
        }
        // Fixed header (5) + topic length and topic (2 + 65535) + packet id (2) + excerpt.
        assert!(buf.len() <= 5 + 2 + 65_535 + 2 + OVERSIZED_PAYLOAD_EXCERPT_BYTES_MAX + step);
    }
});
