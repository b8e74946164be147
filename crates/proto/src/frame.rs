//! Frame codec: each [`Frame`] is a 4-byte big-endian length followed by its protobuf bytes. Lengths are
//! checked against [`MAX_FRAME_LEN`] before anything is buffered, and every decoded frame is checked
//! against the count and size limits of [`crate::limits`] before it is handed on.

use bytes::{Buf, BytesMut};
use prost::Message;

use crate::error::ProtoError;
use crate::limits::*;
use crate::wire::{Frame, frame, push, request};

/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Most a decoder reserves ahead of bytes that have actually arrived.
const MAX_EAGER_RESERVE: usize = 64 * 1024;

/// Appends the frame, length-prefixed, to `out`.
pub fn encode_frame(f: &Frame, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    let len = f.encoded_len();
    if len > MAX_FRAME_LEN {
        return Err(ProtoError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    out.reserve(LEN_PREFIX + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    f.encode(out)
        .map_err(|_| ProtoError::Invalid { what: "frame" })?;
    Ok(())
}

/// Decodes one frame's protobuf bytes (without the prefix) and checks its limits.
pub fn decode_frame(bytes: &[u8]) -> Result<Frame, ProtoError> {
    if bytes.len() > MAX_FRAME_LEN {
        return Err(ProtoError::FrameTooLarge {
            len: bytes.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let f = Frame::decode(bytes)?;
    check_limits(&f)?;
    Ok(f)
}

/// Splits a byte stream into frames.
#[derive(Default, Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    /// An empty decoder (no allocation until bytes arrive).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes from the stream.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, if any. An error poisons the stream: drop the connection.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        if self.buf.len() < LEN_PREFIX {
            self.release_if_empty();
            return Ok(None);
        }
        let mut prefix = [0u8; LEN_PREFIX];
        prefix.copy_from_slice(&self.buf[..LEN_PREFIX]);
        let len = u32::from_be_bytes(prefix) as usize;
        if len > MAX_FRAME_LEN {
            return Err(ProtoError::FrameTooLarge {
                len,
                max: MAX_FRAME_LEN,
            });
        }
        if self.buf.len() < LEN_PREFIX + len {
            // Reserve for what is likely to come soon, not for what a peer merely announces: a few
            // bytes of prefix must not pin a megabyte per connection.
            self.buf
                .reserve((LEN_PREFIX + len - self.buf.len()).min(MAX_EAGER_RESERVE));
            return Ok(None);
        }
        self.buf.advance(LEN_PREFIX);
        let body = self.buf.split_to(len);
        let f = decode_frame(&body)?;
        self.release_if_empty();
        Ok(Some(f))
    }

    /// An idle connection should own no buffer: give a large empty one back to the allocator.
    fn release_if_empty(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }
}

fn limit(what: &'static str, len: usize, max: usize) -> Result<(), ProtoError> {
    if len > max {
        Err(ProtoError::LimitExceeded { what, len, max })
    } else {
        Ok(())
    }
}

/// Checks the count and size limits that protobuf itself cannot express. Semantic validation (valid ids,
/// known devices) is left to whoever handles the frame, which can answer with a precise error.
pub fn check_limits(f: &Frame) -> Result<(), ProtoError> {
    match &f.body {
        None => Err(ProtoError::Missing("frame body")),
        Some(frame::Body::ClientHello(h)) => {
            limit("features", h.required_features.len(), MAX_FEATURES)?;
            for feat in &h.required_features {
                limit("feature name", feat.len(), MAX_FEATURE_LEN)?;
            }
            Ok(())
        }
        Some(frame::Body::Request(r)) => match &r.body {
            None => Err(ProtoError::Missing("request body")),
            Some(request::Body::SendMessage(s)) => {
                limit(
                    "device messages per send",
                    s.messages.len(),
                    MAX_DEVICE_MESSAGES_PER_SEND,
                )?;
                for m in &s.messages {
                    limit(
                        "ciphertext bytes",
                        m.ciphertext.len(),
                        MAX_ENVELOPE_CIPHERTEXT,
                    )?;
                }
                Ok(())
            }
            Some(request::Body::UploadKeys(u)) => limit(
                "one-time keys per upload",
                u.one_time_keys.len(),
                MAX_ONE_TIME_KEYS_PER_UPLOAD,
            ),
            Some(request::Body::SendGroupMessage(g)) => limit(
                "group ciphertext bytes",
                g.ciphertext.len(),
                MAX_GROUP_CIPHERTEXT,
            ),
            Some(request::Body::ShareGroupKeys(k)) => {
                limit(
                    "key shares per request",
                    k.shares.len(),
                    MAX_KEY_SHARES_PER_REQUEST,
                )?;
                for m in &k.shares {
                    limit(
                        "ciphertext bytes",
                        m.ciphertext.len(),
                        MAX_ENVELOPE_CIPHERTEXT,
                    )?;
                }
                Ok(())
            }
            Some(request::Body::ClaimKeys(c)) => limit(
                "devices per claim",
                c.device_ids.len(),
                MAX_DEVICES_PER_ACCOUNT,
            ),
            Some(_) => Ok(()),
        },
        Some(frame::Body::Push(p)) => match &p.body {
            None => Err(ProtoError::Missing("push body")),
            Some(push::Body::Envelope(e)) => limit(
                "ciphertext bytes",
                e.ciphertext.len(),
                MAX_ENVELOPE_CIPHERTEXT,
            ),
            Some(_) => Ok(()),
        },
        Some(frame::Body::Ack(a)) => limit("acknowledged ids", a.envelope_ids.len(), MAX_ACK_IDS),
        Some(frame::Body::Response(r)) => {
            if let Some(e) = &r.error {
                limit("error message", e.message.len(), MAX_FRAME_LEN)?;
            }
            Ok(())
        }
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::*;

    fn ping(n: u64) -> Frame {
        Frame::new(frame::Body::Ping(Ping { nonce: n }))
    }

    fn send_with(messages: usize, ct: usize) -> Frame {
        Frame::new(frame::Body::Request(Request {
            id: 1,
            body: Some(request::Body::SendMessage(SendMessage {
                message_id: vec![0; 16],
                recipient: "+15550000002".into(),
                messages: (0..messages)
                    .map(|i| DeviceMessage {
                        phone: "+15550000002".into(),
                        device_id: i as u32 + 1,
                        olm_type: 1,
                        ciphertext: vec![0; ct],
                    })
                    .collect(),
                ..Default::default()
            })),
        }))
    }

    #[test]
    fn frames_round_trip_in_any_chunking() {
        let mut wire = Vec::new();
        for n in 0..50 {
            encode_frame(&ping(n), &mut wire).unwrap();
        }
        for chunk in [1, 2, 3, 7, 64, wire.len()] {
            let mut d = FrameDecoder::new();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                d.push(piece);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, (0..50).map(ping).collect::<Vec<_>>());
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn oversized_length_prefix_is_refused_before_buffering() {
        let mut d = FrameDecoder::new();
        d.push(&((MAX_FRAME_LEN as u32) + 1).to_be_bytes());
        assert!(matches!(
            d.next_frame(),
            Err(ProtoError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn frame_at_the_limit_is_accepted_and_over_it_refused() {
        let mut d = FrameDecoder::new();
        d.push(&(MAX_FRAME_LEN as u32).to_be_bytes());
        assert!(d.next_frame().unwrap().is_none(), "waits for the body");
        let mut out = Vec::new();
        let big = Frame::new(frame::Body::Ack(Ack {
            envelope_ids: vec![u64::MAX; MAX_FRAME_LEN / 8],
        }));
        assert!(matches!(
            encode_frame(&big, &mut out),
            Err(ProtoError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn an_announced_frame_does_not_reserve_its_full_length() {
        let mut d = FrameDecoder::new();
        d.push(&(MAX_FRAME_LEN as u32).to_be_bytes());
        assert!(d.next_frame().unwrap().is_none());
        assert!(d.buf.capacity() <= 2 * MAX_EAGER_RESERVE);
    }

    #[test]
    fn garbage_is_a_decode_error_not_a_panic() {
        assert!(decode_frame(&[0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        assert!(matches!(
            decode_frame(&[]),
            Err(ProtoError::Missing("frame body"))
        ));
    }

    #[test]
    fn send_limits_are_enforced() {
        assert!(check_limits(&send_with(MAX_DEVICE_MESSAGES_PER_SEND, 10)).is_ok());
        assert!(matches!(
            check_limits(&send_with(MAX_DEVICE_MESSAGES_PER_SEND + 1, 10)),
            Err(ProtoError::LimitExceeded { .. })
        ));
        assert!(check_limits(&send_with(1, MAX_ENVELOPE_CIPHERTEXT)).is_ok());
        assert!(check_limits(&send_with(1, MAX_ENVELOPE_CIPHERTEXT + 1)).is_err());
    }

    #[test]
    fn ack_and_upload_limits_are_enforced() {
        let ack = |n| {
            Frame::new(frame::Body::Ack(Ack {
                envelope_ids: vec![1; n],
            }))
        };
        assert!(check_limits(&ack(MAX_ACK_IDS)).is_ok());
        assert!(check_limits(&ack(MAX_ACK_IDS + 1)).is_err());
        let upload = |n| {
            Frame::new(frame::Body::Request(Request {
                id: 1,
                body: Some(request::Body::UploadKeys(UploadKeys {
                    one_time_keys: vec![SignedPreKey::default(); n],
                    fallback_key: None,
                })),
            }))
        };
        assert!(check_limits(&upload(MAX_ONE_TIME_KEYS_PER_UPLOAD)).is_ok());
        assert!(check_limits(&upload(MAX_ONE_TIME_KEYS_PER_UPLOAD + 1)).is_err());
        let hello = |n| {
            Frame::new(frame::Body::ClientHello(ClientHello {
                protocol_version: 1,
                required_features: vec!["x".into(); n],
                login: None,
            }))
        };
        assert!(check_limits(&hello(MAX_FEATURES)).is_ok());
        assert!(check_limits(&hello(MAX_FEATURES + 1)).is_err());
    }
}
