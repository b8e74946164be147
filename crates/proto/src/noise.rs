//! The sans-IO Noise channel between a client and `natterd` (snow, `Noise_XX_25519_ChaChaPoly_BLAKE2s`).
//!
//! On the wire every Noise message, handshake or transport, is a *record*: a 2-byte big-endian length and
//! the message. After the handshake the records' plaintexts form one byte stream that carries
//! length-prefixed frames ([`crate::frame`]), so a frame may span records and a record may hold several
//! frames. The caller owns the socket: it feeds received bytes in and writes out the bytes it is given.

use bytes::{Buf, BytesMut};
use zeroize::Zeroizing;

use crate::error::ProtoError;
use crate::frame::{FrameDecoder, encode_frame};
use crate::limits::{MAX_HANDSHAKE_PAYLOAD, MAX_RECORD_PLAINTEXT, NOISE_TAG_LEN};
use crate::wire::Frame;

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
/// Mixed into the handshake hash, so that a handshake for another protocol or version cannot be
/// replayed into ours.
pub const PROLOGUE: &[u8] = b"natter/noise/v1";
/// Bytes of a record's length prefix.
pub const RECORD_PREFIX: usize = 2;
/// Largest handshake overhead of XX beyond the payload: two public keys and two tags.
const HANDSHAKE_OVERHEAD: usize = 2 * 32 + 2 * NOISE_TAG_LEN;

fn params() -> Result<snow::params::NoiseParams, ProtoError> {
    NOISE_PARAMS.parse().map_err(|_| ProtoError::Noise)
}

/// A Noise static key pair (Curve25519). The private half is wiped on drop and never printed.
#[derive(Clone)]
pub struct StaticKeypair {
    private: Zeroizing<[u8; 32]>,
    public: [u8; 32],
}

impl StaticKeypair {
    /// A fresh random key pair.
    pub fn generate() -> Result<Self, ProtoError> {
        let kp = snow::Builder::new(params()?).generate_keypair()?;
        let private = Zeroizing::new(
            <[u8; 32]>::try_from(kp.private.as_slice()).map_err(|_| ProtoError::Noise)?,
        );
        let public = <[u8; 32]>::try_from(kp.public.as_slice()).map_err(|_| ProtoError::Noise)?;
        let mut private_vec = kp.private;
        zeroize::Zeroize::zeroize(&mut private_vec);
        Ok(Self { private, public })
    }

    /// Rebuilds a key pair from its stored private half.
    pub fn from_private(private: [u8; 32]) -> Self {
        let secret = x25519_dalek::StaticSecret::from(private);
        let public = x25519_dalek::PublicKey::from(&secret).to_bytes();
        Self {
            private: Zeroizing::new(private),
            public,
        }
    }

    /// The public half.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// The private half, for storing (encrypted) by the owner.
    pub fn private(&self) -> &[u8; 32] {
        &self.private
    }
}

impl std::fmt::Debug for StaticKeypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticKeypair")
            .field("public", &hex::encode(self.public))
            .finish_non_exhaustive()
    }
}

/// Splits a byte stream into records (2-byte length + Noise message).
#[derive(Default, Debug)]
pub struct RecordReader {
    buf: BytesMut,
}

impl RecordReader {
    /// An empty reader.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes from the socket.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Mutable access for readers that fill the buffer in place.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// The next complete record's Noise message, if one is buffered.
    pub fn next_record(&mut self) -> Option<BytesMut> {
        if self.buf.len() < RECORD_PREFIX {
            return None;
        }
        let len = u16::from_be_bytes([self.buf[0], self.buf[1]]) as usize;
        if self.buf.len() < RECORD_PREFIX + len {
            return None;
        }
        self.buf.advance(RECORD_PREFIX);
        let rec = self.buf.split_to(len);
        if self.buf.is_empty() {
            // An idle connection keeps no buffer.
            self.buf = BytesMut::new();
        }
        Some(rec)
    }
}

/// First bytes of a refusal record (see [`refusal_record`]). A real second handshake message starts
/// with the server's fresh ephemeral key, so it cannot be mistaken for one.
pub const REFUSAL_MAGIC: &[u8; 16] = b"natter/refused/1";
/// Largest refusal record body (magic and encoded error).
const MAX_REFUSAL: usize = REFUSAL_MAGIC.len() + 2 * crate::limits::MAX_SHORT_TEXT;

/// A record the server sends *instead of* the second handshake message when it refuses a connection
/// before doing any cryptography (too many connections or handshakes from one address, a handshake that
/// took too long): the magic, then an encoded [`crate::wire::Error`]. It is not authenticated, like a
/// TCP reset: a client only reports it and retries later, it never trusts it for anything else.
pub fn refusal_record(error: &crate::wire::Error) -> Vec<u8> {
    use prost::Message;
    let mut error = error.clone();
    error.mismatched.clear();
    let mut cut = error.message.len().min(crate::limits::MAX_SHORT_TEXT);
    while !error.message.is_char_boundary(cut) {
        cut -= 1;
    }
    error.message.truncate(cut);
    let body_len = REFUSAL_MAGIC.len() + error.encoded_len();
    let mut out = Vec::with_capacity(RECORD_PREFIX + body_len);
    out.extend_from_slice(&(body_len as u16).to_be_bytes());
    out.extend_from_slice(REFUSAL_MAGIC);
    error.encode_raw(&mut out);
    out
}

/// The error in a refusal record (a record's Noise message as [`RecordReader::next_record`] returns it),
/// or `None` if the record is not one.
pub fn parse_refusal(record: &[u8]) -> Option<crate::wire::Error> {
    use prost::Message;
    let body = record.strip_prefix(REFUSAL_MAGIC.as_slice())?;
    if record.len() > MAX_REFUSAL {
        return None;
    }
    let mut e = crate::wire::Error::decode(body).ok()?;
    e.mismatched.clear();
    Some(e)
}

/// Which side of the handshake we are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The client.
    Initiator,
    /// The server.
    Responder,
}

/// A Noise `XX` handshake in progress.
pub struct Handshake {
    state: Box<snow::HandshakeState>,
    role: Role,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl Handshake {
    /// Starts a handshake with our static key.
    pub fn new(role: Role, local: &StaticKeypair) -> Result<Self, ProtoError> {
        let b = snow::Builder::new(params()?)
            .local_private_key(local.private.as_slice())?
            .prologue(PROLOGUE)?;
        let state = match role {
            Role::Initiator => b.build_initiator()?,
            Role::Responder => b.build_responder()?,
        };
        Ok(Self {
            state: Box::new(state),
            role,
        })
    }

    /// Writes the next handshake message as a record (prefix included) onto `out`.
    pub fn write_record(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), ProtoError> {
        if payload.len() > MAX_HANDSHAKE_PAYLOAD {
            return Err(ProtoError::LimitExceeded {
                what: "handshake payload",
                len: payload.len(),
                max: MAX_HANDSHAKE_PAYLOAD,
            });
        }
        // Room for the payload plus the largest XX overhead (two keys, two tags).
        let mut buf = vec![0u8; payload.len() + HANDSHAKE_OVERHEAD];
        let n = self.state.write_message(payload, &mut buf)?;
        out.extend_from_slice(&(n as u16).to_be_bytes());
        out.extend_from_slice(&buf[..n]);
        Ok(())
    }

    /// Reads the peer's next handshake message (without its prefix) and returns its payload.
    pub fn read_record(&mut self, msg: &[u8]) -> Result<Vec<u8>, ProtoError> {
        let mut buf = vec![0u8; msg.len()];
        let n = self.state.read_message(msg, &mut buf)?;
        if n > MAX_HANDSHAKE_PAYLOAD {
            return Err(ProtoError::LimitExceeded {
                what: "handshake payload",
                len: n,
                max: MAX_HANDSHAKE_PAYLOAD,
            });
        }
        buf.truncate(n);
        Ok(buf)
    }

    /// The peer's static key, once the handshake has revealed it.
    pub fn remote_static(&self) -> Option<[u8; 32]> {
        self.state
            .get_remote_static()
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
    }

    /// Whether it is our turn to write.
    pub fn is_my_turn(&self) -> bool {
        self.state.is_my_turn()
    }

    /// Whether both sides are done.
    pub fn is_finished(&self) -> bool {
        self.state.is_handshake_finished()
    }

    /// Switches to transport mode.
    pub fn into_channel(self) -> Result<SecureChannel, ProtoError> {
        let remote = self.remote_static().ok_or(ProtoError::Noise)?;
        let transport = self.state.into_transport_mode()?;
        Ok(SecureChannel {
            transport: Box::new(transport),
            frames: FrameDecoder::new(),
            remote,
        })
    }
}

/// An established channel: encrypts frames into records and decrypts records into frames.
pub struct SecureChannel {
    transport: Box<snow::TransportState>,
    frames: FrameDecoder,
    remote: [u8; 32],
}

impl std::fmt::Debug for SecureChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureChannel")
            .field("remote", &hex::encode(self.remote))
            .finish_non_exhaustive()
    }
}

impl SecureChannel {
    /// The peer's authenticated static key.
    pub fn remote_static(&self) -> [u8; 32] {
        self.remote
    }

    /// Encrypts one frame and appends its records to `out`.
    pub fn seal_frame(&mut self, f: &Frame, out: &mut Vec<u8>) -> Result<(), ProtoError> {
        let mut plain = Vec::new();
        encode_frame(f, &mut plain)?;
        self.seal_bytes(&plain, out)
    }

    /// Encrypts several frames into as few records as possible (one syscall's worth of output).
    pub fn seal_frames<'a>(
        &mut self,
        frames: impl IntoIterator<Item = &'a Frame>,
        out: &mut Vec<u8>,
    ) -> Result<(), ProtoError> {
        let mut plain = Vec::new();
        for f in frames {
            encode_frame(f, &mut plain)?;
        }
        self.seal_bytes(&plain, out)
    }

    fn seal_bytes(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), ProtoError> {
        for chunk in plain.chunks(MAX_RECORD_PLAINTEXT) {
            let start = out.len();
            out.resize(start + RECORD_PREFIX + chunk.len() + NOISE_TAG_LEN, 0);
            let n = self
                .transport
                .write_message(chunk, &mut out[start + RECORD_PREFIX..])?;
            out[start..start + RECORD_PREFIX].copy_from_slice(&(n as u16).to_be_bytes());
            out.truncate(start + RECORD_PREFIX + n);
        }
        Ok(())
    }

    /// Decrypts one record (the Noise message, without prefix); its plaintext joins the frame stream.
    pub fn open_record(&mut self, msg: &[u8]) -> Result<(), ProtoError> {
        if msg.len() < NOISE_TAG_LEN {
            return Err(ProtoError::Noise);
        }
        let mut plain = vec![0u8; msg.len()];
        let n = self.transport.read_message(msg, &mut plain)?;
        self.frames.push(&plain[..n]);
        Ok(())
    }

    /// The next complete frame received.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        self.frames.next_frame()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Ping, frame};

    fn handshake(client: &StaticKeypair, server: &StaticKeypair) -> (SecureChannel, SecureChannel) {
        let mut c = Handshake::new(Role::Initiator, client).unwrap();
        let mut s = Handshake::new(Role::Responder, server).unwrap();
        let mut reader_s = RecordReader::new();
        let mut reader_c = RecordReader::new();
        let mut wire = Vec::new();
        c.write_record(&[], &mut wire).unwrap();
        reader_s.push(&wire);
        s.read_record(&reader_s.next_record().unwrap()).unwrap();
        wire.clear();
        s.write_record(&[], &mut wire).unwrap();
        reader_c.push(&wire);
        c.read_record(&reader_c.next_record().unwrap()).unwrap();
        assert_eq!(c.remote_static(), Some(server.public()));
        wire.clear();
        c.write_record(&[], &mut wire).unwrap();
        reader_s.push(&wire);
        s.read_record(&reader_s.next_record().unwrap()).unwrap();
        assert!(c.is_finished() && s.is_finished());
        (c.into_channel().unwrap(), s.into_channel().unwrap())
    }

    #[test]
    fn refusal_records_round_trip_and_are_not_handshake_messages() {
        let mut e = crate::wire::Error::new(crate::wire::ErrorCode::RateLimited, "é".repeat(400));
        e.retry_after_ms = 1500;
        let mut reader = RecordReader::new();
        reader.push(&refusal_record(&e));
        let rec = reader.next_record().unwrap();
        let back = parse_refusal(&rec).unwrap();
        assert_eq!(back.code, e.code);
        assert_eq!(back.retry_after_ms, 1500);
        assert!(
            back.message.len() <= crate::limits::MAX_SHORT_TEXT && back.message.starts_with('é')
        );

        // A real second handshake message is not a refusal.
        let server = StaticKeypair::generate().unwrap();
        let client = StaticKeypair::generate().unwrap();
        let mut c = Handshake::new(Role::Initiator, &client).unwrap();
        let mut s = Handshake::new(Role::Responder, &server).unwrap();
        let mut wire = Vec::new();
        c.write_record(&[], &mut wire).unwrap();
        s.read_record(&wire[RECORD_PREFIX..]).unwrap();
        wire.clear();
        s.write_record(&[], &mut wire).unwrap();
        assert!(parse_refusal(&wire[RECORD_PREFIX..]).is_none());
    }

    #[test]
    fn keys_restore_from_private_half() {
        let kp = StaticKeypair::generate().unwrap();
        let again = StaticKeypair::from_private(*kp.private());
        assert_eq!(kp.public(), again.public());
    }

    #[test]
    fn frames_cross_the_channel_including_ones_larger_than_a_record() {
        let ck = StaticKeypair::generate().unwrap();
        let sk = StaticKeypair::generate().unwrap();
        let (mut c, mut s) = handshake(&ck, &sk);
        assert_eq!(s.remote_static(), ck.public());
        let big = Frame::new(frame::Body::Push(crate::wire::Push {
            body: Some(crate::wire::push::Body::Envelope(crate::wire::Envelope {
                ciphertext: vec![0xab; 60_000],
                ..Default::default()
            })),
        }));
        let mut big_twice = Vec::new();
        crate::frame::encode_frame(&big, &mut big_twice).unwrap();
        crate::frame::encode_frame(&big, &mut big_twice).unwrap();
        assert!(big_twice.len() > crate::limits::MAX_RECORD_PLAINTEXT);
        let small = Frame::new(frame::Body::Ping(Ping { nonce: 7 }));
        let mut wire = Vec::new();
        c.seal_frames([&small, &big, &big, &small], &mut wire)
            .unwrap();
        let mut reader = RecordReader::new();
        let mut got = Vec::new();
        for piece in wire.chunks(1000) {
            reader.push(piece);
            while let Some(rec) = reader.next_record() {
                s.open_record(&rec).unwrap();
                while let Some(f) = s.next_frame().unwrap() {
                    got.push(f);
                }
            }
        }
        assert_eq!(got, vec![small.clone(), big.clone(), big, small]);
    }

    #[test]
    fn tampered_record_is_refused() {
        let (mut c, mut s) = handshake(
            &StaticKeypair::generate().unwrap(),
            &StaticKeypair::generate().unwrap(),
        );
        let mut wire = Vec::new();
        c.seal_frame(&Frame::new(frame::Body::Ping(Ping { nonce: 1 })), &mut wire)
            .unwrap();
        let last = wire.len() - 1;
        wire[last] ^= 1;
        assert!(matches!(
            s.open_record(&wire[RECORD_PREFIX..]),
            Err(ProtoError::Noise)
        ));
        assert!(s.open_record(&[0; 3]).is_err());
    }
}
