//! The fuzz corpus as a regression test: every committed seed under `fuzz/seeds/<target>/` goes through
//! the same harness as its fuzz target ([`natter_proto::fuzzing`]), and so do deterministic pseudo-random
//! inputs and mutations of the valid seeds. None may panic; seeds named `ok-*` must stay accepted and
//! seeds named `bad-*` refused (any other name, e.g. a crash the fuzzer found, only must not panic).
//!
//! `cargo test -p natter-proto --test fuzz_seeds -- --ignored write_seeds` rewrites the generated seeds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use natter_proto::content::{
    Content, HistoryBundle, HistoryMessage, Receipt, ReceiptKind, RetryRequest, Text, content,
};
use natter_proto::device_list::{DeviceEntry, DeviceListContent};
use natter_proto::frame::encode_frame;
use natter_proto::fuzzing::{TARGETS, Target, XorShift};
use natter_proto::limits::{
    MAX_ACK_IDS, MAX_APP_STATE_MUTATIONS, MAX_APP_STATE_VALUE, MAX_DEVICE_MESSAGES_PER_SEND,
    MAX_FRAME_LEN, MAX_TEXT_BYTES,
};
use natter_proto::link::{AcceptPayload, LinkQr, OfferPayload};
use natter_proto::noise::{Handshake, Role, StaticKeypair};
use natter_proto::wire::*;
use prost::Message;

fn seeds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds")
}

fn seed_files(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = seeds_dir().join(target);
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_file() {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            out.push((name, std::fs::read(&path).unwrap()));
        }
    }
    out.sort();
    out
}

#[test]
fn every_committed_seed_replays() {
    for entry in std::fs::read_dir(seeds_dir()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            TARGETS.iter().any(|(t, _)| *t == name),
            "fuzz/seeds/{name} belongs to no fuzz target"
        );
    }
    for (target, run) in TARGETS {
        let seeds = seed_files(target);
        assert!(!seeds.is_empty(), "no seeds for {target}");
        for (name, bytes) in &seeds {
            let accepted = std::panic::catch_unwind(|| run(bytes))
                .unwrap_or_else(|_| panic!("fuzz/seeds/{target}/{name} panics (message above)"));
            if name.starts_with("ok-") {
                assert!(accepted, "{target}/{name} is no longer accepted");
            } else if name.starts_with("bad-") {
                assert!(!accepted, "{target}/{name} is now accepted");
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_bytes(rng: &mut XorShift) -> Vec<u8> {
    // Mostly short inputs, a few long ones; bytes biased towards the values that matter to protobuf.
    let len = match rng.below(10) {
        0 => rng.below(4096),
        1..=3 => rng.below(512),
        _ => rng.below(64),
    };
    (0..len)
        .map(|_| match rng.below(8) {
            0 => 0,
            1 => 0xff,
            2 => 0x80 | rng.below(8) as u8,
            3 => (rng.below(16) << 3) as u8 | rng.below(6) as u8,
            _ => rng.next_u64() as u8,
        })
        .collect()
}

fn smoke(target: &Target, inputs: usize) {
    let (name, run) = target;
    let mut rng = XorShift::new(name.len() as u64 * 7919);
    for _ in 0..inputs {
        let input = random_bytes(&mut rng);
        if std::panic::catch_unwind(|| run(&input)).is_err() {
            panic!("{name} panics on {}", hex(&input));
        }
    }
}

#[test]
fn pseudo_random_inputs_never_panic() {
    for target in TARGETS {
        // The channel harness seals and opens real records: fewer inputs keep the debug build quick.
        let inputs = if target.0 == "noise_records" {
            2_000
        } else {
            20_000
        };
        smoke(target, inputs);
    }
}

fn mutate(rng: &mut XorShift, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut m = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(m.len() + 1);
        let last = m.len().saturating_sub(1);
        match rng.below(8) {
            0 if !m.is_empty() => m[at.min(last)] ^= 1 << rng.below(8),
            1 if !m.is_empty() => m[at.min(last)] = [0, 0xff, 0x7f, 0x80, 1][rng.below(5)],
            2 => m.insert(at, rng.next_u64() as u8),
            3 if at < m.len() => {
                m.remove(at);
            }
            4 => m.truncate(at),
            5 if !m.is_empty() => {
                let from = rng.below(m.len());
                let len = rng.below(m.len() - from + 1);
                let copy = m[from..from + len].to_vec();
                m.splice(at..at, copy);
            }
            6 => {
                let cut = rng.below(other.len() + 1);
                m.truncate(at);
                m.extend_from_slice(&other[cut..]);
            }
            _ => {
                // A varint of extreme value, where lengths and tags live.
                let v = [0x80, 0x80, 0x80, 0x80, 0x0f];
                m.splice(at..at, v[rng.below(5)..].iter().copied());
            }
        }
    }
    m
}

#[test]
fn mutated_valid_inputs_never_panic() {
    for (target, run) in TARGETS {
        let valid: Vec<Vec<u8>> = seed_files(target)
            .into_iter()
            .filter(|(name, _)| name.starts_with("ok-"))
            .map(|(_, bytes)| bytes)
            .collect();
        assert!(!valid.is_empty(), "no valid seeds for {target}");
        let per_seed = if *target == "noise_records" {
            100
        } else {
            1_000
        };
        let mut rng = XorShift::new(target.len() as u64);
        for (i, seed) in valid.iter().enumerate() {
            let other = &valid[(i + 1) % valid.len()];
            for _ in 0..per_seed {
                let input = mutate(&mut rng, seed, other);
                if std::panic::catch_unwind(|| run(&input)).is_err() {
                    panic!("{target} panics on {}", hex(&input));
                }
            }
        }
    }
}

// ---- The generated seeds -------------------------------------------------------------------------------

const PHONE: &str = "+15550000001";
const PEER: &str = "+15550000002";

fn frame_bytes(body: frame::Body) -> Vec<u8> {
    Frame::new(body).encode_to_vec()
}

fn stream(bodies: &[frame::Body]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in bodies {
        encode_frame(&Frame::new(b.clone()), &mut out).unwrap();
    }
    out
}

fn with_seed(seed: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![seed];
    out.extend_from_slice(bytes);
    out
}

fn send(devices: usize, ct: usize) -> frame::Body {
    frame::Body::Request(Request {
        id: 7,
        body: Some(request::Body::SendMessage(SendMessage {
            message_id: vec![0x11; 16],
            recipient: PEER.into(),
            messages: (0..devices)
                .map(|i| DeviceMessage {
                    phone: PEER.into(),
                    device_id: i as u32 + 1,
                    olm_type: 1,
                    ciphertext: vec![0xc7; ct],
                })
                .collect(),
            retry_of: Vec::new(),
            retry_attempt: 0,
        })),
    })
}

fn entry(id: u32) -> DeviceEntry {
    DeviceEntry {
        device_id: id,
        identity_curve: vec![1; 32],
        identity_ed: vec![2; 32],
        noise_key: vec![3; 32],
        name: format!("device {id}"),
        account_signature: vec![4; 64],
        device_signature: vec![5; 64],
    }
}

fn signed_list(phone: &str, devices: Vec<DeviceEntry>) -> Vec<u8> {
    let content = DeviceListContent {
        phone: phone.into(),
        version: 3,
        timestamp_ms: 1_700_000_000_000,
        account_key: vec![9; 32],
        devices,
    };
    SignedDeviceList {
        content: content.encode_to_vec(),
        signature: vec![8; 64],
    }
    .encode_to_vec()
}

fn content_bytes(body: content::Body, id_len: usize, conversation: &str) -> Vec<u8> {
    Content {
        message_id: vec![0x42; id_len],
        sent_at_ms: 1_700_000_000_000,
        body: Some(body),
        conversation: conversation.into(),
    }
    .encode_to_vec()
}

fn text(s: &str) -> content::Body {
    content::Body::Text(Text { body: s.into() })
}

/// Operations of the `noise_records` tampered-traffic mode: `[op, len, bytes...]`.
fn op(kind: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![kind, bytes.len() as u8];
    out.extend_from_slice(bytes);
    out
}

fn history_message(kind: &str, id_len: usize) -> HistoryMessage {
    HistoryMessage {
        chat: PEER.into(),
        id: vec![0x21; id_len],
        from_me: true,
        sender_device: 2,
        kind: kind.into(),
        text: "see you at 8".into(),
        sent_at_ms: 1_700_000_000_000,
        server_ts_ms: 1_700_000_000_100,
        status: "read".into(),
        media: None,
    }
}

fn bundle(messages: Vec<HistoryMessage>) -> Vec<u8> {
    HistoryBundle { messages }.encode_to_vec()
}

fn mutation(op: u32, value: usize) -> AppStateMutation {
    AppStateMutation {
        op,
        index_mac: vec![1; 32],
        value_blob: vec![2; value],
        value_mac: vec![3; 32],
        key_id: vec![4; 8],
    }
}

fn patch(mutations: Vec<AppStateMutation>) -> AppStatePatch {
    AppStatePatch {
        version: 4,
        mutations,
        snapshot_mac: vec![5; 32],
        patch_mac: vec![6; 32],
        key_id: vec![4; 8],
    }
}

fn generated_seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let hello = frame::Body::ClientHello(ClientHello {
        protocol_version: 1,
        required_features: vec!["receipts".into()],
        login: Some(Login {
            phone: PHONE.into(),
            device_id: 1,
        }),
    });
    let envelope = frame::Body::Push(Push {
        body: Some(push::Body::Envelope(Envelope {
            id: 99,
            message_id: vec![0x11; 16],
            sender: PEER.into(),
            sender_device: 2,
            server_ts_ms: 1_700_000_000_000,
            olm_type: 0,
            ciphertext: vec![0xc7; 200],
            retry_of: Vec::new(),
            retry_attempt: 0,
        })),
    });
    let error = frame::Body::Response(Response {
        id: 7,
        error: Some(Error {
            code: ErrorCode::MismatchedDevices as i32,
            message: "devices changed".into(),
            retry_after_ms: 0,
            mismatched: vec![MismatchedDevices {
                phone: PEER.into(),
                missing: vec![3],
                extra: vec![4, 5],
            }],
        }),
        body: None,
    });
    let devices = frame::Body::Response(Response {
        id: 8,
        error: None,
        body: Some(response::Body::Devices(Devices {
            account_key: vec![9; 32],
            device_list: Some(
                SignedDeviceList::decode(&signed_list(PEER, vec![entry(1)])[..]).unwrap(),
            ),
        })),
    });
    let upload = frame::Body::Request(Request {
        id: 9,
        body: Some(request::Body::UploadKeys(UploadKeys {
            one_time_keys: vec![
                SignedPreKey {
                    key_id: "AAAAAAAAAAE".into(),
                    key: vec![6; 32],
                    signature: vec![7; 64],
                };
                3
            ],
            fallback_key: None,
        })),
    });
    let claim = frame::Body::Request(Request {
        id: 10,
        body: Some(request::Body::ClaimKeys(ClaimKeys {
            phone: PEER.into(),
            device_ids: vec![1, 2],
        })),
    });
    let ack = |n: usize| {
        frame::Body::Ack(Ack {
            envelope_ids: (0..n as u64).collect(),
        })
    };
    let qr = LinkQr {
        reference: vec![1; 16],
        identity_curve: vec![2; 32],
        identity_ed: vec![3; 32],
        noise_key: vec![4; 32],
        secret: vec![5; 32],
        name: "laptop".into(),
    };
    let offer = |device_id: u32, key: usize| {
        with_seed(
            1,
            &OfferPayload {
                phone: PHONE.into(),
                account_key: vec![9; key],
                device_id,
            }
            .encode_to_vec(),
        )
    };
    let snapshot = AppStateSnapshot {
        version: 4,
        records: vec![mutation(0, 40); 3],
        snapshot_mac: vec![5; 32],
        key_id: vec![4; 8],
    };
    let ping = frame::Body::Ping(Ping { nonce: 5 });
    let pong = frame::Body::Pong(Ping { nonce: 5 });

    let mixed = stream(&[
        hello.clone(),
        send(2, 40),
        envelope.clone(),
        ack(3),
        error.clone(),
        ping.clone(),
    ]);
    let mut truncated = mixed.clone();
    truncated.truncate(mixed.len() - 3);
    let mut oversize = stream(std::slice::from_ref(&ping));
    oversize.extend_from_slice(&(MAX_FRAME_LEN as u32 + 1).to_be_bytes());
    let mut too_many = stream(std::slice::from_ref(&ping));
    too_many.extend(stream(&[ack(MAX_ACK_IDS + 1)]));

    // A genuine first handshake message, as a client sends it.
    let mut msg1 = Vec::new();
    Handshake::new(Role::Initiator, &StaticKeypair::generate().unwrap())
        .unwrap()
        .write_record(&[], &mut msg1)
        .unwrap();
    let mut records = msg1.clone();
    records.extend_from_slice(&[0, 20]);
    records.extend_from_slice(&[0xab; 20]);
    records.extend_from_slice(&[0xff, 0xff, 1, 2, 3]);
    let mut tampering = vec![0x01];
    for (kind, bytes) in [
        (0u8, &b"\x01\x02"[..]),
        (1, b"flip"),
        (2, b"truncate"),
        (3, b"extend"),
        (4, b"replay the last"),
        (5, b"replay this"),
        (0x81, b"large, flipped"),
    ] {
        tampering.extend(op(kind, bytes));
    }
    tampering.extend(op(0, &frame_bytes(hello.clone())));
    tampering.extend(op(1, &frame_bytes(send(2, 40))));

    vec![
        ("frame_stream", "ok-mixed-whole", with_seed(0, &mixed)),
        ("frame_stream", "ok-mixed-bytewise", with_seed(13, &mixed)),
        ("frame_stream", "ok-mixed-chunks", with_seed(6, &mixed)),
        ("frame_stream", "ok-truncated", with_seed(3, &truncated)),
        (
            "frame_stream",
            "bad-oversize-prefix",
            with_seed(2, &oversize),
        ),
        ("frame_stream", "bad-too-many-acks", with_seed(5, &too_many)),
        ("frame_stream", "bad-empty-frame", vec![0, 0, 0, 0, 0]),
        ("frame", "ok-client-hello", frame_bytes(hello)),
        ("frame", "ok-send", frame_bytes(send(2, 40))),
        ("frame", "ok-envelope", frame_bytes(envelope)),
        ("frame", "ok-response-error", frame_bytes(error)),
        ("frame", "ok-response-devices", frame_bytes(devices)),
        ("frame", "ok-upload-keys", frame_bytes(upload)),
        ("frame", "ok-claim-keys", frame_bytes(claim)),
        ("frame", "ok-ack", frame_bytes(ack(5))),
        ("frame", "ok-ping", frame_bytes(ping)),
        ("frame", "ok-pong", frame_bytes(pong)),
        ("frame", "bad-empty", Vec::new()),
        (
            "frame",
            "bad-too-many-device-messages",
            frame_bytes(send(MAX_DEVICE_MESSAGES_PER_SEND + 1, 1)),
        ),
        (
            "frame",
            "bad-truncated-varint",
            vec![0x32, 0xff, 0xff, 0xff, 0xff, 0x0f],
        ),
        ("content", "ok-text", content_bytes(text("hello"), 16, "")),
        (
            "content",
            "ok-text-own-copy",
            content_bytes(text("hi"), 16, PEER),
        ),
        (
            "content",
            "ok-receipt",
            content_bytes(
                content::Body::Receipt(Receipt {
                    kind: ReceiptKind::Read as i32,
                    message_ids: vec![vec![1; 16], vec![2; 16], vec![3; 15]],
                }),
                16,
                "",
            ),
        ),
        (
            "content",
            "ok-retry-request",
            content_bytes(
                content::Body::RetryRequest(RetryRequest {
                    message_id: vec![1; 16],
                    attempt: 1,
                }),
                16,
                "",
            ),
        ),
        (
            "content",
            "bad-short-id",
            content_bytes(text("hello"), 15, ""),
        ),
        (
            "content",
            "bad-long-text",
            content_bytes(text(&"x".repeat(MAX_TEXT_BYTES + 1)), 16, ""),
        ),
        (
            "content",
            "bad-invalid-utf8",
            vec![0x1a, 0x03, 0x0a, 0x01, 0xff],
        ),
        (
            "device_list",
            "ok-primary",
            signed_list(PHONE, vec![entry(1)]),
        ),
        (
            "device_list",
            "ok-five-devices",
            signed_list(PHONE, (1..=5).map(entry).collect()),
        ),
        (
            "device_list",
            "bad-no-primary",
            signed_list(PHONE, vec![entry(2)]),
        ),
        (
            "device_list",
            "bad-duplicate",
            signed_list(PHONE, vec![entry(1), entry(1)]),
        ),
        (
            "device_list",
            "bad-six-devices",
            signed_list(PHONE, (1..=6).map(entry).collect()),
        ),
        (
            "device_list",
            "bad-phone",
            signed_list("15550000001", vec![entry(1)]),
        ),
        ("device_list", "bad-short-key", {
            let mut e = entry(1);
            e.noise_key.pop();
            signed_list(PHONE, vec![e])
        }),
        ("link", "ok-qr", with_seed(0, qr.to_text().as_bytes())),
        ("link", "ok-offer", offer(2, 32)),
        (
            "link",
            "ok-answer",
            with_seed(
                2,
                &AcceptPayload {
                    device_signature: vec![7; 64],
                }
                .encode_to_vec(),
            ),
        ),
        ("link", "bad-qr-prefix", with_seed(0, b"natter:AAAA")),
        ("link", "bad-offer-primary", offer(1, 32)),
        ("link", "bad-offer-short-key", offer(2, 31)),
        (
            "history_bundle",
            "ok-texts",
            bundle(vec![
                history_message("text", 16),
                history_message("notice", 16),
            ]),
        ),
        ("history_bundle", "ok-empty", Vec::new()),
        (
            "history_bundle",
            "bad-short-id",
            bundle(vec![history_message("text", 15)]),
        ),
        (
            "history_bundle",
            "bad-media-without-pointer",
            bundle(vec![history_message("media", 16)]),
        ),
        (
            "history_bundle",
            "bad-kind",
            bundle(vec![history_message("sticker", 16)]),
        ),
        (
            "app_state",
            "ok-patch",
            with_seed(
                0,
                &patch(vec![mutation(0, 60), mutation(1, 0)]).encode_to_vec(),
            ),
        ),
        (
            "app_state",
            "ok-snapshot",
            with_seed(1, &snapshot.encode_to_vec()),
        ),
        (
            "app_state",
            "ok-collection",
            with_seed(
                2,
                &AppState {
                    collection: "chat_settings".into(),
                    snapshot: Some(snapshot.clone()),
                    patches: vec![patch(vec![mutation(0, 10)])],
                    version: 5,
                }
                .encode_to_vec(),
            ),
        ),
        (
            "app_state",
            "bad-op",
            with_seed(0, &patch(vec![mutation(2, 10)]).encode_to_vec()),
        ),
        (
            "app_state",
            "bad-large-value",
            with_seed(
                0,
                &patch(vec![mutation(0, MAX_APP_STATE_VALUE + 1)]).encode_to_vec(),
            ),
        ),
        (
            "app_state",
            "bad-too-many-mutations",
            with_seed(
                0,
                &patch(vec![mutation(1, 0); MAX_APP_STATE_MUTATIONS + 1]).encode_to_vec(),
            ),
        ),
        (
            "app_state",
            "bad-collection",
            with_seed(
                2,
                &AppState {
                    collection: "passwords".into(),
                    snapshot: None,
                    patches: Vec::new(),
                    version: 0,
                }
                .encode_to_vec(),
            ),
        ),
        ("noise_records", "ok-handshake-message", with_seed(2, &msg1)),
        (
            "noise_records",
            "ok-records-chunked",
            with_seed(4 * 5 + 2, &records),
        ),
        ("noise_records", "ok-tampered-traffic", tampering),
        (
            "noise_records",
            "bad-forged-records",
            with_seed(4 * 3, &records[msg1.len()..]),
        ),
        (
            "noise_records",
            "bad-short-handshake",
            with_seed(2, &[0, 4, 1, 2, 3, 4]),
        ),
    ]
}

/// Rewrites the generated seeds (run with `--ignored`); seeds the fuzzer found are left alone.
#[test]
#[ignore = "writes fuzz/seeds"]
fn write_seeds() {
    for (target, name, bytes) in generated_seeds() {
        let dir = seeds_dir().join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

#[test]
fn generated_seeds_are_committed() {
    for (target, name, bytes) in generated_seeds() {
        let path = seeds_dir().join(target).join(name);
        let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // Handshake messages hold a fresh ephemeral key: only their shape is fixed.
        if name.contains("handshake") || name.contains("records") {
            assert_eq!(
                committed.len(),
                bytes.len(),
                "{target}/{name} differs from its generator"
            );
        } else {
            assert_eq!(
                committed, bytes,
                "{target}/{name} differs from its generator"
            );
        }
    }
}
