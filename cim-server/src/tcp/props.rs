//! Property test of the server's own TCP read path ([`TcpTransport::recv`], what every TCP and
//! TLS session reads frames with): any byte stream, written in any chunks through a pipe of
//! any size, gives the frames the codec finds in the same bytes in one piece, then the end
//! the codec says (a clean close, the protocol error to answer, or a truncated frame), and
//! the read buffer never holds more than the limit + prefix + one read's room (looked at
//! each time `recv` returns: after an error or a truncated end it still holds what was
//! pending, which is how this property found the room reserved before a read doubling it).
//!
//! Cases per run (`PROPTEST_CASES` overrides it): 512 (about a second: each case runs a
//! current-thread runtime over an in-memory pipe).

use super::*;
use bytes::BufMut;
use cim_common::pb::{frame::Body, ErrorCode, Login};
use cim_proto::{
    arb::{self, Enums},
    codec::{frame_to_bytes, put_len_prefix, FrameCodec},
};
use proptest::{collection::vec, prelude::*};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::Decoder;

/// How a read ended, comparable with the codec's verdict.
#[derive(Debug, PartialEq)]
enum End {
    Closed,
    Protocol(ErrorCode),
    Broken,
}

/// The reference: the codec over all the bytes at once, as `FramedRead` would at EOF.
fn expected(bytes: &[u8], max: usize) -> (Vec<Frame>, End) {
    let mut codec = FrameCodec::new(max);
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => return (frames, End::Closed),
            Err(e) => {
                let end = match e.error_code() {
                    Some(code) => End::Protocol(code),
                    None => End::Broken,
                };
                return (frames, end);
            }
        }
    }
}

fn stream() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        3 => arb::frame(Enums::Any).prop_map(|f| frame_to_bytes(&f).to_vec()),
        // Frames near the limits drawn below, where growing the buffer matters.
        1 => (400usize..4000).prop_map(|n| {
            frame_to_bytes(&Frame::new(Body::Login(Login { token: "t".repeat(n) }))).to_vec()
        }),
        1 => vec(any::<u8>(), 0..32),
        1 => (any::<u32>(), vec(any::<u8>(), 0..8)).prop_map(|(len, tail)| {
            let mut b = BytesMut::new();
            put_len_prefix(len as usize % 2048, &mut b);
            b.put_slice(&tail);
            b.to_vec()
        }),
    ];
    vec(piece, 0..10).prop_map(|pieces| pieces.concat())
}

proptest! {
    #![proptest_config(arb::config(512))]

    #[test]
    fn any_stream_reads_as_the_codec_says_within_the_limit(
        bytes in stream(),
        chunk_sizes in vec(1usize..600, 1..8),
        pipe in 1usize..2048,
        max in 0usize..4000,
    ) {
        let (want_frames, want_end) = expected(&bytes, max);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (frames, end, peak) = rt.block_on(async {
            let (mut client, server) = tokio::io::duplex(pipe);
            let input = bytes.clone();
            let writer = tokio::spawn(async move {
                let mut rest = &input[..];
                for size in chunk_sizes.iter().cycle() {
                    if rest.is_empty() {
                        break;
                    }
                    let (chunk, tail) = rest.split_at((*size).min(rest.len()));
                    if client.write_all(chunk).await.is_err() {
                        return; // the reader stopped at an error
                    }
                    rest = tail;
                }
                // Dropping the client is the end of the stream.
            });
            let mut transport = TcpTransport::new(server, max);
            let mut frames = Vec::new();
            let mut peak = 0;
            let end = loop {
                let got = transport.recv().await;
                peak = peak.max(transport.read_buffer_capacity());
                match got {
                    Ok(Some(frame)) => frames.push(frame),
                    Ok(None) => break End::Closed,
                    Err(RecvError::Protocol { code, .. }) => break End::Protocol(code),
                    Err(RecvError::Io(_)) => break End::Broken,
                }
            };
            drop(transport);
            writer.await.unwrap();
            (frames, end, peak)
        });
        prop_assert_eq!(frames, want_frames);
        prop_assert_eq!(end, want_end);
        // One pending frame (payload and prefix) plus the room of one more read.
        let bound = max + 5 + READ_CHUNK;
        prop_assert!(peak <= bound, "read buffer of {} bytes, over {}", peak, bound);
    }
}
