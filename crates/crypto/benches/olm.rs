//! Criterion benches of natter-crypto's Olm wrappers against vodozemac called directly, so that the cost
//! our layer adds (signature check of the prekey, message type mapping, error mapping, copies) shows:
//! session set-up (outbound + first message + inbound) and a 200-byte message encrypted and decrypted,
//! for Olm and for Megolm (a group message: encrypt once, decrypt on one member).
//! Run: `cargo bench -p natter-crypto --bench olm`.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use natter_crypto::megolm::{InboundSession, OutboundGroupSession};
use natter_crypto::{DeviceKeys, OlmSession};
use std::hint::black_box;
use vodozemac::megolm::{
    GroupSession, InboundGroupSession, MegolmMessage, SessionConfig as MegolmConfig,
};
use vodozemac::olm::{Account, OlmMessage, Session, SessionConfig};

const PLAINTEXT: [u8; 200] = [0x5a; 200];

/// Two devices with a session each way established through natter-crypto (one reply sent, so both ends
/// send normal messages).
fn wrapped_pair() -> (OlmSession, OlmSession) {
    let alice = DeviceKeys::generate();
    let mut bob = DeviceKeys::generate();
    let prekey = bob.generate_one_time_keys(1).remove(0);
    let mut a = alice
        .create_outbound_session(&bob.identity_curve(), &bob.identity_ed(), &prekey)
        .unwrap();
    let first = a.encrypt(b"hi").unwrap();
    let (mut b, _) = bob
        .create_inbound_session(&alice.identity_curve(), &first)
        .unwrap();
    let reply = b.encrypt(b"hello").unwrap();
    a.decrypt(&reply).unwrap();
    (a, b)
}

fn direct_pair() -> (Session, Session) {
    let alice = Account::new();
    let mut bob = Account::new();
    bob.generate_one_time_keys(1);
    let otk = *bob.one_time_keys().values().next().unwrap();
    let mut a = alice
        .create_outbound_session(SessionConfig::version_1(), bob.curve25519_key(), otk)
        .unwrap();
    let OlmMessage::PreKey(first) = a.encrypt(b"hi").unwrap() else {
        unreachable!("a new session sends a pre-key message")
    };
    let mut b = bob
        .create_inbound_session(SessionConfig::version_1(), alice.curve25519_key(), &first)
        .unwrap()
        .session;
    let reply = b.encrypt(b"hello").unwrap();
    a.decrypt(&reply).unwrap();
    (a, b)
}

fn setup(c: &mut Criterion) {
    let mut g = c.benchmark_group("olm_session_setup");
    g.throughput(Throughput::Elements(1));
    g.bench_function("natter_crypto", |b| {
        b.iter_batched(
            || {
                let mut bob = DeviceKeys::generate();
                let prekey = bob.generate_one_time_keys(1).remove(0);
                (DeviceKeys::generate(), bob, prekey)
            },
            |(alice, mut bob, prekey)| {
                let mut a = alice
                    .create_outbound_session(&bob.identity_curve(), &bob.identity_ed(), &prekey)
                    .unwrap();
                let first = a.encrypt(&PLAINTEXT).unwrap();
                black_box(
                    bob.create_inbound_session(&alice.identity_curve(), &first)
                        .unwrap(),
                );
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("vodozemac", |b| {
        b.iter_batched(
            || {
                let mut bob = Account::new();
                bob.generate_one_time_keys(1);
                let otk = *bob.one_time_keys().values().next().unwrap();
                (Account::new(), bob, otk)
            },
            |(alice, mut bob, otk)| {
                let mut a = alice
                    .create_outbound_session(SessionConfig::version_1(), bob.curve25519_key(), otk)
                    .unwrap();
                let OlmMessage::PreKey(first) = a.encrypt(PLAINTEXT).unwrap() else {
                    unreachable!("a new session sends a pre-key message")
                };
                black_box(
                    bob.create_inbound_session(
                        SessionConfig::version_1(),
                        alice.curve25519_key(),
                        &first,
                    )
                    .unwrap(),
                );
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn messages(c: &mut Criterion) {
    let mut g = c.benchmark_group("olm_encrypt_decrypt_200B");
    g.throughput(Throughput::Elements(1));
    let (mut a, mut b) = wrapped_pair();
    g.bench_function("natter_crypto", |bench| {
        bench.iter(|| {
            let ct = a.encrypt(black_box(&PLAINTEXT)).unwrap();
            b.decrypt(&ct).unwrap()
        })
    });
    let (mut a, mut b) = direct_pair();
    g.bench_function("vodozemac", |bench| {
        bench.iter(|| {
            let ct = a.encrypt(black_box(&PLAINTEXT)).unwrap();
            b.decrypt(&ct).unwrap()
        })
    });
    g.finish();
}

fn megolm(c: &mut Criterion) {
    let mut g = c.benchmark_group("megolm_encrypt_decrypt_200B");
    g.throughput(Throughput::Elements(1));
    let mut out = OutboundGroupSession::new();
    let mut inb = InboundSession::import(&out.export_current().unwrap()).unwrap();
    g.bench_function("natter_crypto", |b| {
        b.iter(|| {
            let ct = out.encrypt(black_box(&PLAINTEXT));
            inb.decrypt(&ct).unwrap()
        })
    });
    let mut out = GroupSession::new(MegolmConfig::version_1());
    let mut inb = InboundGroupSession::new(&out.session_key(), MegolmConfig::version_1());
    g.bench_function("vodozemac", |b| {
        b.iter(|| {
            // The same wire round trip as the wrapper: the message travels as bytes.
            let bytes = out.encrypt(black_box(PLAINTEXT)).to_bytes();
            let msg = MegolmMessage::from_bytes(&bytes).unwrap();
            inb.decrypt(&msg).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, setup, messages, megolm);
criterion_main!(benches);
