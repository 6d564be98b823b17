use bytes::{Buf, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::{Packet, Publish};
use crate::mqttbytes::{parse_fixed_header, qos, Error, FixedHeader, PacketType, QoS};

/// Countersign patch: most payload bytes kept of an incoming publish larger than
/// `max_incoming_size` (see [`Publish::truncated_from`]).
pub const OVERSIZED_PAYLOAD_EXCERPT_BYTES_MAX: usize = 256;

/// MQTT v4 codec
///
/// Countersign patch: the decoder is stateful. An incoming PUBLISH whose remaining length
/// exceeds `max_incoming_size` is not an error (an error drops the connection, and a broker
/// holding the message in a persistent session sends it again on reconnect, for ever).
/// Once its bounded prefix is buffered (fixed header, topic of at most 65535 bytes, packet
/// id, and at most [`OVERSIZED_PAYLOAD_EXCERPT_BYTES_MAX`] payload bytes) it is yielded
/// with [`Publish::truncated_from`] set to the payload's true length, and the rest of the
/// packet is discarded as it arrives, never buffered: memory stays bounded whatever the
/// size. Any other packet over the limit is still an error.
#[derive(Debug, Clone)]
pub struct Codec {
    /// Maximum packet size allowed by client
    pub max_incoming_size: usize,
    /// Maximum packet size allowed by broker
    pub max_outgoing_size: usize,
    /// Bytes of an oversized publish still to be read and thrown away.
    discard_bytes: usize,
}

impl Codec {
    /// A codec with the given limits and nothing left to discard.
    pub fn new(max_incoming_size: usize, max_outgoing_size: usize) -> Codec {
        Codec {
            max_incoming_size,
            max_outgoing_size,
            discard_bytes: 0,
        }
    }

    /// Bytes of an oversized publish the decoder will still discard.
    pub fn discarding(&self) -> usize {
        self.discard_bytes
    }

    /// An oversized packet is at the front of `src`: a PUBLISH is reduced to its prefix and
    /// an excerpt, anything else is refused.
    fn oversized(&mut self, src: &mut BytesMut, size: usize) -> Result<Option<Packet>, Error> {
        let header = parse_fixed_header(src.iter())?;
        if header.packet_type()? != PacketType::Publish {
            return Err(Error::PayloadSizeLimitExceeded(size));
        }
        let fixed_len = header.fixed_header_len;
        let remaining = header.remaining_len;
        let qos = qos((header.byte1 & 0b0110) >> 1)?;
        let Some(len_bytes) = src.get(fixed_len..fixed_len + 2) else {
            src.reserve(fixed_len + 2 - src.len());
            return Ok(None);
        };
        let topic_len = usize::from(u16::from_be_bytes([len_bytes[0], len_bytes[1]]));
        let pkid_len = if qos == QoS::AtMostOnce { 0 } else { 2 };
        let variable_len = 2 + topic_len + pkid_len;
        let Some(payload_len) = remaining.checked_sub(variable_len) else {
            return Err(Error::BoundaryCrossed(topic_len));
        };
        let excerpt = payload_len.min(OVERSIZED_PAYLOAD_EXCERPT_BYTES_MAX);
        let keep = fixed_len + variable_len + excerpt;
        if src.len() < keep {
            src.reserve(keep - src.len());
            return Ok(None);
        }
        let head = src.split_to(keep).freeze();
        let short = FixedHeader {
            remaining_len: variable_len + excerpt,
            ..header
        };
        let mut publish = Publish::read(short, head)?;
        publish.truncated_from = Some(payload_len);
        self.discard_bytes = fixed_len + remaining - keep;
        self.discard(src);
        Ok(Some(Packet::Publish(publish)))
    }

    /// Throws away what `src` holds of the packet being discarded; true when done.
    fn discard(&mut self, src: &mut BytesMut) -> bool {
        let n = self.discard_bytes.min(src.len());
        src.advance(n);
        self.discard_bytes -= n;
        self.discard_bytes == 0
    }
}

impl Decoder for Codec {
    type Item = Packet;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        if !self.discard(src) {
            return Ok(None);
        }
        match Packet::read(src, self.max_incoming_size) {
            Ok(packet) => Ok(Some(packet)),
            Err(Error::InsufficientBytes(b)) => {
                // Get more packets to construct the incomplete packet
                src.reserve(b);
                Ok(None)
            }
            Err(Error::PayloadSizeLimitExceeded(size)) => self.oversized(src, size),
            Err(e) => Err(e),
        }
    }
}

impl Encoder<Packet> for Codec {
    type Error = Error;

    fn encode(&mut self, item: Packet, dst: &mut BytesMut) -> Result<(), Self::Error> {
        item.write(dst, self.max_outgoing_size)?;

        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use tokio_util::codec::Encoder;

    use super::Codec;
    use crate::{mqttbytes::Error, Packet, Publish, QoS};

    #[test]
    fn outgoing_max_packet_size_check() {
        let mut buf = BytesMut::new();
        let mut codec = Codec::new(100, 200);

        let mut small_publish = Publish::new("hello/world", QoS::AtLeastOnce, vec![1; 100]);
        small_publish.pkid = 1;
        codec
            .encode(Packet::Publish(small_publish), &mut buf)
            .unwrap();

        let large_publish = Publish::new("hello/world", QoS::AtLeastOnce, vec![1; 265]);
        match codec.encode(Packet::Publish(large_publish), &mut buf) {
            Err(Error::OutgoingPacketTooLarge {
                pkt_size: 281,
                max: 200,
            }) => {}
            _ => unreachable!(),
        }
    }
}
