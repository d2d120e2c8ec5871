//! Microbenchmarks of the frame codec: what every TCP frame costs in and out, and the proto3
//! JSON mapping that WebSocket text frames use instead.
//!
//! Frames are the typical ones: a heartbeat `Ping`, a client's `Send` with a 64-byte body, a
//! server's `Push` of one message and of a batch of 32 (what a busy connection's writer
//! drains at once), and 64 pings decoded from one buffer (many small frames in one read).
//! Throughput is in encoded bytes (length prefixes included), so protobuf and JSON compare.
//!
//! `cargo bench -p cim-proto --bench codec`; `cargo test` runs each once, as a smoke check.

use bytes::BytesMut;
use cim_proto::{
    codec::{decode_frame, encode_frame, DEFAULT_MAX_FRAME_LEN},
    pb::{frame::Body, Frame, Message, MessageKind, Ping, Push, Send},
};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;

/// A 64-byte message body: typical chat text length.
fn body() -> String {
    "x".repeat(64)
}

fn ping() -> Frame {
    Frame::new(Body::Ping(Ping {
        nonce: 1_234_567_890,
    }))
}

fn send() -> Frame {
    Frame::new(Body::Send(Send {
        client_id: 42,
        kind: MessageKind::Private as i32,
        to_user_id: 100_042,
        body: body(),
        ..Default::default()
    }))
}

/// A message as the route makes it: a ULID id (26 characters), real-looking ids and time.
fn message(n: u64) -> Message {
    Message {
        id: format!("01J9Z8Q4W6X2M3N5P7R{n:07}"),
        sender_id: 100_000 + n,
        sender_name: format!("user{n}"),
        receiver_id: 200_000 + n,
        kind: MessageKind::Private as i32,
        body: body(),
        timestamp_ms: 1_730_000_000_000 + n as i64,
        ..Default::default()
    }
}

fn push(messages: u64) -> Frame {
    Frame::new(Body::Push(Push {
        messages: (0..messages).map(message).collect(),
        replay: false,
    }))
}

fn encoded(frame: &Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    encode_frame(frame, &mut buf);
    buf
}

/// Encode and decode of one frame of each typical kind.
fn single_frames(c: &mut Criterion) {
    let frames = [
        ("ping", ping()),
        ("send_64b", send()),
        ("push_1x64b", push(1)),
        ("push_32x64b", push(32)),
    ];
    let mut group = c.benchmark_group("codec");
    for (name, frame) in &frames {
        let wire = encoded(frame).freeze();
        group.throughput(Throughput::Bytes(wire.len() as u64));
        // A reused buffer, as a connection's writer keeps one: measures encoding, not malloc.
        let mut out = BytesMut::with_capacity(wire.len());
        group.bench_function(format!("encode/{name}"), |b| {
            b.iter(|| {
                out.clear();
                encode_frame(black_box(frame), &mut out);
                black_box(&out);
            })
        });
        group.bench_function(format!("decode/{name}"), |b| {
            b.iter_batched_ref(
                // A fresh buffer per decode (decoding consumes it); the copy is not timed.
                || BytesMut::from(&wire[..]),
                |buf| black_box(decode_frame(buf, DEFAULT_MAX_FRAME_LEN).unwrap()),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// Many small frames arriving in one read: the decode loop of a session after one `read`.
fn many_in_one_read(c: &mut Criterion) {
    const FRAMES: usize = 64;
    let mut wire = BytesMut::new();
    for n in 0..FRAMES as u64 {
        encode_frame(&Frame::new(Body::Ping(Ping { nonce: n })), &mut wire);
    }
    let wire = wire.freeze();
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(FRAMES as u64));
    group.bench_function("decode/64_pings_one_buffer", |b| {
        b.iter_batched_ref(
            || BytesMut::from(&wire[..]),
            |buf| {
                let mut n = 0;
                while let Some(frame) = decode_frame(buf, DEFAULT_MAX_FRAME_LEN).unwrap() {
                    black_box(frame);
                    n += 1;
                }
                assert_eq!(n, FRAMES);
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// The proto3 JSON mapping of a Push: what a WebSocket text-frame client costs the server.
fn json_push(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec_json");
    for (name, frame) in [("push_1x64b", push(1)), ("push_32x64b", push(32))] {
        let text = serde_json::to_string(&frame).unwrap();
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(format!("encode/{name}"), |b| {
            b.iter(|| black_box(serde_json::to_string(black_box(&frame)).unwrap()))
        });
        group.bench_function(format!("decode/{name}"), |b| {
            b.iter(|| black_box(serde_json::from_str::<Frame>(black_box(&text)).unwrap()))
        });
    }
    group.finish();
}

criterion_group!(benches, single_frames, many_in_one_read, json_push);
criterion_main!(benches);
