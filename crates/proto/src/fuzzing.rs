//! Fuzzing harnesses: one function per fuzz target of `fuzz/`, shared with the seed-corpus regression test
//! (`tests/fuzz_seeds.rs`) so that the fuzzer and `cargo test` run exactly the same code.
//!
//! Each harness takes arbitrary bytes, feeds them to the real decoders of this crate with every limit
//! enforced, and returns whether the decoder *accepted* the input (used by the test to check that its
//! `ok-*` seeds stay valid and its `bad-*` seeds stay refused). Refusing input is never a failure. A
//! harness panics only when a decoder panics or when an invariant that holds for every input is broken
//! (a decoded frame that does not round-trip, a record accepted that nobody sealed, a result that depends
//! on how the stream was chunked): each of those is a bug the fuzzer is meant to find.
//!
//! Not for production use: nothing outside the fuzz targets and tests calls these.

// A harness reports a broken invariant by panicking: that is what the fuzzer catches.
#![allow(clippy::panic, clippy::expect_used)]

use std::sync::{Mutex, MutexGuard, OnceLock};

use prost::Message;

use crate::content::{Content, HistoryBundle, ReceiptKind, content};
use crate::device_list::{
    DeviceListContent, account_binding_input, device_signing_input, list_signing_input,
};
use crate::error::ProtoError;
use crate::frame::{FrameDecoder, LEN_PREFIX, decode_frame, encode_frame};
use crate::ids::{DeviceId, MessageId, PhoneNumber};
use crate::limits::{
    MAX_DECRYPT_RETRIES, MAX_DEVICES_PER_ACCOUNT, MAX_ENVELOPE_CIPHERTEXT, MAX_FRAME_LEN,
    MAX_RECEIPT_IDS, MAX_TEXT_BYTES,
};
use crate::link::{AcceptPayload, LinkQr, OfferPayload};
use crate::noise::{Handshake, RECORD_PREFIX, RecordReader, Role, SecureChannel, StaticKeypair};
use crate::wire::{
    AppState, AppStatePatch, AppStateSnapshot, Frame, Ping, SignedDeviceList, frame,
};

/// A fuzz target: its name (the directory of its seeds under `fuzz/seeds/`) and its harness.
pub type Target = (&'static str, fn(&[u8]) -> bool);

/// Every fuzz target, by name.
pub const TARGETS: &[Target] = &[
    ("frame_stream", frame_stream),
    ("frame", frame),
    ("content", content),
    ("device_list", device_list),
    ("noise_records", noise_records),
    ("refusal", refusal),
    ("link", link),
    ("history_bundle", history_bundle),
    ("app_state", app_state),
];

/// A small deterministic generator (xorshift64*), for chunkings and the smoke test. Not for keys.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from any seed (zero included).
    pub fn new(seed: u64) -> Self {
        Self((seed ^ 0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`0` when `n` is zero).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// Splits `data` into the pieces a socket might deliver, as chosen by `seed`: all at once for seed 0,
/// otherwise pieces of 1 to 2^(seed % 13) bytes.
pub fn chunks(seed: u8, data: &[u8]) -> Vec<&[u8]> {
    if seed == 0 {
        return vec![data];
    }
    let max = 1usize << (seed % 13);
    let mut rng = XorShift::new(u64::from(seed));
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = (1 + rng.below(max)).min(rest.len());
        let (piece, tail) = rest.split_at(n);
        out.push(piece);
        rest = tail;
    }
    out
}

/// Checks that a frame the decoder accepted encodes again and decodes to the same frame.
fn assert_round_trips(f: &Frame) {
    let mut out = Vec::new();
    match encode_frame(f, &mut out) {
        Ok(()) => {
            let again = decode_frame(&out[LEN_PREFIX..])
                .unwrap_or_else(|e| panic!("an accepted frame re-encodes to a refused one: {e}"));
            assert!(again == *f, "an accepted frame does not round-trip");
        }
        // Re-encoding may grow a frame (a negative enum value takes 10 bytes however it arrived).
        Err(ProtoError::FrameTooLarge { len, .. }) if len > MAX_FRAME_LEN => {}
        Err(e) => panic!("an accepted frame does not encode: {e}"),
    }
}

/// Frames out of one stream, and whether it ended in an error.
fn decode_stream<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> (Vec<Frame>, bool, usize) {
    let mut d = FrameDecoder::new();
    let mut frames = Vec::new();
    for piece in pieces {
        d.push(piece);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(_) => return (frames, true, d.buffered()),
            }
        }
    }
    (frames, false, d.buffered())
}

/// Target `frame_stream`: the first byte picks a chunking ([`chunks`]), the rest is a byte stream pushed
/// into a [`FrameDecoder`] piece by piece, decoding frames until an error or the end. Every frame must
/// round-trip, and the frames and the outcome must not depend on the chunking. Accepted: no error.
pub fn frame_stream(data: &[u8]) -> bool {
    let Some((&seed, stream)) = data.split_first() else {
        return true;
    };
    let (frames, failed, left) = decode_stream(chunks(seed, stream));
    for f in &frames {
        assert_round_trips(f);
    }
    let (whole, whole_failed, whole_left) = decode_stream([stream]);
    assert!(
        frames == whole && failed == whole_failed,
        "decoding depends on the chunking"
    );
    if !failed {
        assert_eq!(left, whole_left, "buffered bytes depend on the chunking");
    }
    !failed
}

/// Target `frame`: one frame's protobuf bytes into [`decode_frame`] (limits checked); an accepted frame
/// must round-trip. Accepted: the frame decoded and passed its limits.
pub fn frame(data: &[u8]) -> bool {
    match decode_frame(data) {
        Ok(f) => {
            assert_round_trips(&f);
            true
        }
        Err(_) => false,
    }
}

/// The checks a client makes on decrypted [`Content`] before it acts on it (see natter-client's
/// `apply_content`): a 16-byte message id, a text within [`MAX_TEXT_BYTES`] and, on a copy from our own
/// devices, a valid conversation; receipts and retry requests are read the same way.
pub fn check_content(c: &Content) -> Result<(), ProtoError> {
    MessageId::from_slice(&c.message_id)?;
    if !c.conversation.is_empty() {
        PhoneNumber::from_e164(&c.conversation)?;
    }
    match &c.body {
        Some(content::Body::Text(t)) => {
            if t.body.len() > MAX_TEXT_BYTES {
                return Err(ProtoError::LimitExceeded {
                    what: "text bytes",
                    len: t.body.len(),
                    max: MAX_TEXT_BYTES,
                });
            }
        }
        Some(content::Body::Receipt(r)) => {
            // Unknown kinds count as "delivered"; ids past the limit and malformed ids are skipped.
            let _read = matches!(ReceiptKind::try_from(r.kind), Ok(ReceiptKind::Read));
            let valid = r
                .message_ids
                .iter()
                .take(MAX_RECEIPT_IDS)
                .filter(|raw| MessageId::from_slice(raw).is_ok())
                .count();
            assert!(valid <= MAX_RECEIPT_IDS);
        }
        Some(content::Body::RetryRequest(r)) => {
            MessageId::from_slice(&r.message_id)?;
            if r.attempt == 0 || r.attempt > MAX_DECRYPT_RETRIES {
                return Err(ProtoError::Invalid {
                    what: "retry attempt",
                });
            }
        }
        Some(content::Body::Media(m)) => m.validate()?,
        Some(content::Body::HistorySync(h)) => {
            if let Some(m) = &h.blob {
                m.validate()?;
            }
        }
        Some(content::Body::ProfileKey(k)) => {
            if k.key.len() != 32 {
                return Err(ProtoError::Invalid {
                    what: "profile key",
                });
            }
        }
        Some(content::Body::HistoryRequest(_))
        | Some(content::Body::AppStateKeyShare(_))
        | Some(content::Body::AppStateRecovery(_)) => {}
        None => return Err(ProtoError::Missing("content body")),
    }
    Ok(())
}

/// Target `content`: the plaintext of an envelope into [`Content::decode`], then [`check_content`].
/// Accepted: it decoded and passed the checks.
pub fn content(data: &[u8]) -> bool {
    match Content::decode(data) {
        Ok(c) => {
            let again = Content::decode(c.encode_to_vec().as_slice())
                .unwrap_or_else(|e| panic!("decoded content does not decode again: {e}"));
            assert!(again == c, "content does not round-trip");
            check_content(&c).is_ok()
        }
        Err(_) => false,
    }
}

/// Target `device_list`: a [`SignedDeviceList`] as it arrives, then its content into
/// [`DeviceListContent::decode`] and [`DeviceListContent::validate`]. For a valid list, the signing
/// inputs that natter-crypto then checks are built too. Accepted: the list is structurally valid.
pub fn device_list(data: &[u8]) -> bool {
    let Ok(signed) = SignedDeviceList::decode(data) else {
        return false;
    };
    let Ok(list) = DeviceListContent::decode(signed.content.as_slice()) else {
        return false;
    };
    if list.validate().is_err() {
        return false;
    }
    assert!(list.devices.len() <= MAX_DEVICES_PER_ACCOUNT);
    assert!(
        list.device(DeviceId::PRIMARY).is_some(),
        "a valid list without its primary"
    );
    let _ = list_signing_input(&signed.content);
    let _ = account_binding_input(&list.phone, &list.account_key);
    for d in &list.devices {
        assert!(DeviceId::new(d.device_id).is_ok());
        let _ = device_signing_input(&list.phone, d);
    }
    true
}

/// A client and a server channel, established once by a real `XX` handshake between two generated keys.
struct Pair {
    client: SecureChannel,
    server: SecureChannel,
    /// The server's static key, for the handshake harness.
    server_key: StaticKeypair,
    /// The last record the server accepted, for replays.
    last: Vec<u8>,
}

fn establish() -> Result<Pair, ProtoError> {
    let client_key = StaticKeypair::generate()?;
    let server_key = StaticKeypair::generate()?;
    let mut c = Handshake::new(Role::Initiator, &client_key)?;
    let mut s = Handshake::new(Role::Responder, &server_key)?;
    let (mut to_server, mut to_client) = (RecordReader::new(), RecordReader::new());
    for turn in 0..3 {
        let mut wire = Vec::new();
        let (writer, reader, inbox) = if turn % 2 == 0 {
            (&mut c, &mut s, &mut to_server)
        } else {
            (&mut s, &mut c, &mut to_client)
        };
        writer.write_record(&[], &mut wire)?;
        inbox.push(&wire);
        let msg = inbox.next_record().ok_or(ProtoError::Noise)?;
        reader.read_record(&msg)?;
    }
    Ok(Pair {
        client: c.into_channel()?,
        server: s.into_channel()?,
        server_key,
        last: Vec::new(),
    })
}

/// The pair, built on first use. Every harness call leaves it as it found it: both sides at the same
/// nonce and no bytes buffered, so that no input depends on an earlier one.
fn pair() -> MutexGuard<'static, Pair> {
    static PAIR: OnceLock<Mutex<Pair>> = OnceLock::new();
    PAIR.get_or_init(|| Mutex::new(establish().expect("in-process Noise handshake")))
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Records out of a stream: each record's message, and the bytes left over.
fn split_records<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> (Vec<Vec<u8>>, usize) {
    let mut reader = RecordReader::new();
    let mut out = Vec::new();
    for piece in pieces {
        reader.push(piece);
        while let Some(rec) = reader.next_record() {
            out.push(rec.to_vec());
        }
    }
    let left = reader.buffer_mut().len();
    (out, left)
}

/// Target `noise_records`. The first byte's low bit picks a mode, its other bits a chunking.
///
/// - Mode 0 (untrusted records): the rest is a byte stream split into records by a [`RecordReader`].
///   Every record goes to [`SecureChannel::open_record`] of an established channel, which must refuse
///   it: nobody sealed it. When bit 1 of the first byte is set, the first record also goes to a fresh
///   responder [`Handshake`] as the client's first handshake message (what `natterd` reads from anyone;
///   behind a bit because a responder costs a scalar multiplication). Accepted: the handshake message
///   was.
/// - Mode 1 (tampered traffic): the rest is a list of operations `[op, len, bytes...]` on genuine
///   traffic of the established pair: frames (the bytes when they decode as one, else a ping or, once
///   per input, an envelope larger than a record) are sealed by the client, then records are delivered
///   intact, bit-flipped, truncated, extended or replayed. The server must accept exactly the genuine,
///   in-order records and deliver exactly the sealed frames. Accepted: always (a failure panics).
pub fn noise_records(data: &[u8]) -> bool {
    let Some((&seed, rest)) = data.split_first() else {
        return false;
    };
    if seed & 1 == 0 {
        untrusted_records(seed & 2 != 0, seed >> 2, rest)
    } else {
        tampered_traffic(seed >> 1, rest)
    }
}

fn untrusted_records(handshake: bool, chunking: u8, stream: &[u8]) -> bool {
    let (records, left) = split_records(chunks(chunking, stream));
    let consumed: usize = records.iter().map(|r| RECORD_PREFIX + r.len()).sum();
    assert_eq!(
        consumed + left,
        stream.len(),
        "the record reader lost bytes"
    );
    let mut pair = pair();
    let mut accepted = false;
    if let Some(first) = records.first().filter(|_| handshake) {
        let mut hs = Handshake::new(Role::Responder, &pair.server_key)
            .expect("a responder from a valid key");
        accepted = hs.read_record(first).is_ok();
    }
    for rec in &records {
        assert!(
            pair.server.open_record(rec).is_err(),
            "the channel accepted a record nobody sealed"
        );
    }
    assert!(
        matches!(pair.server.next_frame(), Ok(None)),
        "refused records left bytes in the frame stream"
    );
    accepted
}

/// Which frame an operation's bytes stand for.
fn frame_for(op: u8, bytes: &[u8], large: &mut bool) -> Frame {
    if let Ok(f) = decode_frame(bytes) {
        return f;
    }
    let n = bytes
        .iter()
        .fold(0u64, |acc, &b| acc.rotate_left(8) ^ u64::from(b));
    if op & 0x80 != 0 && !*large {
        *large = true;
        // Larger than one record's plaintext, so that it spans two records.
        let len = MAX_ENVELOPE_CIPHERTEXT - (n % 16) as usize;
        Frame::new(frame::Body::Push(crate::wire::Push {
            body: Some(crate::wire::push::Body::Envelope(crate::wire::Envelope {
                id: n,
                ciphertext: vec![op; len],
                ..Default::default()
            })),
        }))
    } else {
        Frame::new(frame::Body::Ping(Ping { nonce: n }))
    }
}

fn tampered_traffic(chunking: u8, mut ops: &[u8]) -> bool {
    let mut pair = pair();
    let pair = &mut *pair;
    let mut large = false;
    while let [op, len, tail @ ..] = ops {
        let n = usize::from(*len).min(tail.len());
        let (bytes, next) = tail.split_at(n);
        ops = next;
        let sent = frame_for(*op, bytes, &mut large);
        let mut wire = Vec::new();
        pair.client
            .seal_frame(&sent, &mut wire)
            .expect("sealing a frame that fits");
        let (records, left) = split_records(chunks(chunking, &wire));
        assert_eq!(left, 0, "sealed records do not split back");
        let mut rng = XorShift::new(bytes.iter().fold(u64::from(*op), |a, &b| {
            a.wrapping_mul(31).wrapping_add(u64::from(b))
        }));
        for rec in &records {
            let mut forged = rec.clone();
            let kind = (op & 0x7f) % 6;
            match kind {
                0 => {}
                1 => {
                    let i = rng.below(forged.len());
                    forged[i] ^= 1 << rng.below(8);
                }
                2 => forged.truncate(rng.below(forged.len())),
                3 => forged.push(rng.below(256) as u8),
                4 => forged.clone_from(&pair.last),
                _ => forged.clone_from(rec),
            }
            if kind != 0 && forged != *rec {
                assert!(
                    pair.server.open_record(&forged).is_err(),
                    "the channel accepted a forged, truncated or replayed record"
                );
            }
            if let Err(e) = pair.server.open_record(rec) {
                panic!("a genuine record was refused after a forged one: {e}");
            }
            if kind == 5 {
                assert!(
                    pair.server.open_record(rec).is_err(),
                    "the channel accepted a record twice"
                );
            }
            pair.last.clone_from(rec);
        }
        let mut got = Vec::new();
        loop {
            match pair.server.next_frame() {
                Ok(Some(f)) => got.push(f),
                Ok(None) => break,
                Err(e) => panic!("a genuine frame was refused: {e}"),
            }
        }
        assert!(
            got == [sent],
            "the channel did not deliver the sealed frame"
        );
    }
    true
}

/// A refusal record's body ([`crate::noise::parse_refusal`]), as a client reads it where it expects the
/// server's handshake message. An accepted refusal must survive [`crate::noise::refusal_record`] and a
/// second parse unchanged, and stay within the short-text bound. Accepted: it parsed as a refusal.
pub fn refusal(data: &[u8]) -> bool {
    let Some(e) = crate::noise::parse_refusal(data) else {
        return false;
    };
    let record = crate::noise::refusal_record(&e);
    let mut reader = RecordReader::new();
    reader.push(&record);
    let body = reader.next_record().expect("a whole record");
    let again = crate::noise::parse_refusal(&body).expect("a refusal re-parses");
    assert_eq!(again.code, e.code, "the code changed");
    assert_eq!(again.retry_after_ms, e.retry_after_ms, "the delay changed");
    assert!(
        e.message.starts_with(&again.message)
            && again.message.len() <= crate::limits::MAX_SHORT_TEXT,
        "the message grew or changed"
    );
    true
}

/// Decodes `data` as `M`; a decoded message must encode and decode to itself.
fn decode_round_trip<M: Message + Default + PartialEq>(data: &[u8], what: &str) -> Option<M> {
    let m = M::decode(data).ok()?;
    let again = M::decode(m.encode_to_vec().as_slice())
        .unwrap_or_else(|e| panic!("a decoded {what} does not decode again: {e}"));
    assert!(again == m, "{what} does not round-trip");
    Some(m)
}

/// Target `link`: the first byte picks what a device reads while linking: 0 the text of a scanned QR code
/// ([`LinkQr::from_text`]; an accepted code must print as the same text), 1 the primary's sealed offer
/// once opened, 2 the companion's sealed answer once opened ([`OfferPayload::parse`]).
/// Accepted: the input parsed and passed those checks.
pub fn link(data: &[u8]) -> bool {
    let Some((&kind, rest)) = data.split_first() else {
        return false;
    };
    match kind % 3 {
        0 => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return false;
            };
            match LinkQr::from_text(text) {
                Ok(qr) => {
                    let again = LinkQr::from_text(&qr.to_text())
                        .unwrap_or_else(|e| panic!("a parsed QR code does not parse again: {e}"));
                    assert!(again == qr, "QR code does not round-trip");
                    true
                }
                Err(_) => false,
            }
        }
        1 => {
            decode_round_trip::<OfferPayload>(rest, "link offer").is_some_and(|o| o.parse().is_ok())
        }
        _ => decode_round_trip::<AcceptPayload>(rest, "link answer").is_some(),
    }
}

/// Target `history_bundle`: the decompressed content of a history chunk into [`HistoryBundle`], then
/// every message's checks ([`crate::content::HistoryMessage::parse_ids`]). Accepted: every message passed.
pub fn history_bundle(data: &[u8]) -> bool {
    decode_round_trip::<HistoryBundle>(data, "history bundle")
        .is_some_and(|b| b.messages.iter().all(|m| m.parse_ids().is_ok()))
}

/// Target `app_state`: the first byte picks a patch a device pushes (0), a snapshot (1) or a collection
/// as the server serves it (2); the rest is decoded and validated as the server and the devices do before
/// checking MACs. Accepted: it decoded and passed the checks.
pub fn app_state(data: &[u8]) -> bool {
    let Some((&kind, rest)) = data.split_first() else {
        return false;
    };
    match kind % 3 {
        0 => decode_round_trip::<AppStatePatch>(rest, "app-state patch")
            .is_some_and(|p| p.validate().is_ok()),
        1 => decode_round_trip::<AppStateSnapshot>(rest, "app-state snapshot")
            .is_some_and(|s| s.validate().is_ok()),
        _ => decode_round_trip::<AppState>(rest, "app-state collection").is_some_and(|c| {
            crate::wire::APP_STATE_COLLECTIONS.contains(&c.collection.as_str())
                && c.snapshot.as_ref().is_none_or(|s| s.validate().is_ok())
                && c.patches.len() <= crate::limits::MAX_APP_STATE_PATCHES_PER_FETCH
                && c.patches.iter().all(|p| p.validate().is_ok())
        }),
    }
}
