//! Criterion benches of the wire's hot pure functions: frame encode/decode (one frame, and a stream through
//! the incremental decoder), the Noise XX handshake, and sealing/opening frames on an established channel.
//! Run: `cargo bench -p natter-proto --bench wire`.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use natter_proto::frame::{FrameDecoder, decode_frame, encode_frame};
use natter_proto::noise::{Handshake, Role, SecureChannel, StaticKeypair};
use natter_proto::wire::{DeviceMessage, Frame, Request, SendMessage, frame, request};
use prost::Message;
use std::hint::black_box;

/// A 1:1 send as a client makes it: one 200-byte ciphertext for each of two devices.
fn send_frame() -> Frame {
    Frame::new(frame::Body::Request(Request {
        id: 7,
        body: Some(request::Body::SendMessage(SendMessage {
            message_id: vec![0x11; 16],
            recipient: "+15550000002".into(),
            messages: (1..=2)
                .map(|d| DeviceMessage {
                    phone: "+15550000002".into(),
                    device_id: d,
                    olm_type: 1,
                    ciphertext: vec![0xc7; 200],
                })
                .collect(),
            retry_of: Vec::new(),
            retry_attempt: 0,
        })),
    }))
}

fn frames(c: &mut Criterion) {
    let f = send_frame();
    let mut encoded = Vec::new();
    encode_frame(&f, &mut encoded).unwrap();
    let body = f.encode_to_vec();
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode", |b| {
        let mut out = Vec::with_capacity(1024);
        b.iter(|| {
            out.clear();
            encode_frame(black_box(&f), &mut out).unwrap();
        })
    });
    g.bench_function("decode", |b| {
        b.iter(|| decode_frame(black_box(&body)).unwrap())
    });
    let stream: Vec<u8> = encoded.repeat(100);
    g.throughput(Throughput::Elements(100));
    g.bench_function("decode_stream_100", |b| {
        b.iter(|| {
            let mut d = FrameDecoder::new();
            d.push(black_box(&stream));
            let mut n = 0;
            while d.next_frame().unwrap().is_some() {
                n += 1;
            }
            assert_eq!(n, 100);
        })
    });
    g.finish();
}

/// Runs a whole XX handshake in memory and returns both ends' channels.
fn handshake(client: &StaticKeypair, server: &StaticKeypair) -> (SecureChannel, SecureChannel) {
    let mut i = Handshake::new(Role::Initiator, client).unwrap();
    let mut r = Handshake::new(Role::Responder, server).unwrap();
    let mut msg = Vec::new();
    while !(i.is_finished() && r.is_finished()) {
        let (from, to) = if i.is_my_turn() {
            (&mut i, &mut r)
        } else {
            (&mut r, &mut i)
        };
        msg.clear();
        from.write_record(&[], &mut msg).unwrap();
        // write_record prefixes the record with its 2-byte length.
        to.read_record(&msg[2..]).unwrap();
    }
    (i.into_channel().unwrap(), r.into_channel().unwrap())
}

fn noise(c: &mut Criterion) {
    let client = StaticKeypair::generate().unwrap();
    let server = StaticKeypair::generate().unwrap();
    let mut g = c.benchmark_group("noise");
    g.throughput(Throughput::Elements(1));
    g.bench_function("xx_handshake_both_ends", |b| {
        b.iter(|| handshake(black_box(&client), black_box(&server)))
    });
    let f = send_frame();
    g.throughput(Throughput::Elements(64));
    g.bench_function("seal_open_64_frames_460B", |b| {
        b.iter_batched_ref(
            || handshake(&client, &server),
            |(tx, rx)| {
                let mut out = Vec::with_capacity(1024);
                for _ in 0..64 {
                    out.clear();
                    tx.seal_frame(&f, &mut out).unwrap();
                    rx.open_record(&out[2..]).unwrap();
                    rx.next_frame().unwrap().unwrap();
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, frames, noise);
criterion_main!(benches);
