//! Property tests of the frame codec: any byte stream, cut into reads anywhere.
//!
//! Cases per run (`PROPTEST_CASES` overrides them all): 1,024 for each property here (they
//! are pure and cheap: the whole file runs in about a second).
//!
//! - any bytes, fed in any chunks, decode exactly as the same bytes in one piece (frames, then
//!   at most one error), never panic, and never hold more than one pending frame;
//! - a pending frame reserves room for itself and no more (whatever its length, up to the
//!   limit; a `Vec`'s doubling would reserve up to twice the limit);
//! - any sequence of valid frames, encoded back to back and cut anywhere, decodes to itself;
//! - a length prefix is judged on its own: over the limit is `TooLarge` before the payload
//!   arrives (nothing reserved), more than five bytes is `BadLength`;
//! - any payload under a valid prefix is a frame or `Malformed`, and a decoded frame survives
//!   re-encoding.

use super::*;
use crate::arb::{self, Enums};
use proptest::{collection::vec, prelude::*};

/// What a decode step gave, comparable across runs (errors by kind).
#[derive(Debug, PartialEq)]
enum Step {
    Frame(Frame),
    TooLarge(usize),
    BadLength,
    Malformed,
}

fn step(result: Result<Frame, CodecError>) -> Step {
    match result {
        Ok(frame) => Step::Frame(frame),
        Err(CodecError::TooLarge { len, .. }) => Step::TooLarge(len),
        Err(CodecError::BadLength) => Step::BadLength,
        Err(CodecError::Malformed(_)) => Step::Malformed,
        Err(e) => panic!("decode_frame never returns {e:?}"),
    }
}

/// Decodes `chunks` as a connection would: append each read, take every frame it completes,
/// stop at the first error. Checks what is held on the way.
fn decode_chunked(chunks: &[&[u8]], max: usize) -> (Vec<Step>, usize) {
    let mut buf = BytesMut::new();
    let mut steps = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            match decode_frame(&mut buf, max) {
                Ok(Some(frame)) => steps.push(Step::Frame(frame)),
                Ok(None) => {
                    // Incomplete: at most one frame's prefix and part of its payload are held.
                    assert!(buf.len() < max + MAX_VARINT32_LEN, "{} held", buf.len());
                    break;
                }
                Err(e) => {
                    steps.push(step(Err(e)));
                    return (steps, buf.len());
                }
            }
        }
    }
    (steps, buf.len())
}

/// Cuts `bytes` at the given points (any order, duplicates and out-of-range ones ignored).
fn cut<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|c| c % (bytes.len() + 1))
        .chain([0, bytes.len()])
        .collect();
    points.sort_unstable();
    points.dedup();
    points.windows(2).map(|w| &bytes[w[0]..w[1]]).collect()
}

/// Bytes that are often close to frames: garbage, valid frames, truncated ones, long prefixes.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        2 => vec(any::<u8>(), 0..64),
        2 => arb::frame(Enums::Any).prop_map(|f| frame_to_bytes(&f).to_vec()),
        1 => (arb::frame(Enums::Any), any::<usize>()).prop_map(|(f, n)| {
            let b = frame_to_bytes(&f);
            b[..n % (b.len() + 1)].to_vec()
        }),
        1 => (any::<u32>(), vec(any::<u8>(), 0..16)).prop_map(|(len, tail)| {
            let mut b = BytesMut::new();
            put_len_prefix(len as usize, &mut b);
            b.extend_from_slice(&tail);
            b.to_vec()
        }),
    ];
    vec(piece, 0..8).prop_map(|pieces| pieces.concat())
}

proptest! {
    #![proptest_config(arb::config(1024))]

    #[test]
    fn any_bytes_decode_the_same_in_any_chunks(
        bytes in stream(),
        cuts in vec(any::<usize>(), 0..12),
        max in 0usize..700,
    ) {
        let (whole, _) = decode_chunked(&[&bytes], max);
        let (chunked, left) = decode_chunked(&cut(&bytes, &cuts), max);
        prop_assert_eq!(&chunked, &whole);
        // The codec's end-of-stream answer agrees: nothing left is a clean end, anything else
        // (unless an error already ended it) is a truncated frame.
        let ended_by_error = !matches!(chunked.last(), None | Some(Step::Frame(_)));
        if !ended_by_error {
            let mut rest = BytesMut::from(&bytes[bytes.len() - left..]);
            let eof = FrameCodec::new(max).decode_eof(&mut rest);
            prop_assert_eq!(matches!(eof, Ok(None)), left == 0, "{:?}", eof);
            prop_assert!(left == 0 || matches!(eof, Err(CodecError::Truncated)));
        }
    }

    #[test]
    fn valid_frames_round_trip_in_any_chunks(
        frames in vec(arb::frame(Enums::Any), 0..6),
        cuts in vec(any::<usize>(), 0..12),
    ) {
        let mut bytes = BytesMut::new();
        let mut codec = FrameCodec::default();
        for f in &frames {
            // Under the default limit (text() is at most 300 characters a field).
            codec.encode(f, &mut bytes).unwrap();
        }
        let (steps, left) = decode_chunked(&cut(&bytes, &cuts), DEFAULT_MAX_FRAME_LEN);
        let expected: Vec<Step> = frames.into_iter().map(Step::Frame).collect();
        prop_assert_eq!(steps, expected);
        prop_assert_eq!(left, 0);
    }

    #[test]
    fn a_pending_frame_reserves_only_itself(
        frame in arb::frame(Enums::Any),
        held in any::<usize>(),
    ) {
        let whole = frame_to_bytes(&frame);
        let (len, prefix) = peek_varint32(&whole).unwrap().unwrap();
        prop_assume!(len > 0);
        // Any part of the frame with its whole prefix, in a buffer with no room to spare.
        let held = prefix + held % len;
        let mut buf = BytesMut::with_capacity(held);
        buf.extend_from_slice(&whole[..held]);
        prop_assert!(decode_frame(&mut buf, len).unwrap().is_none());
        prop_assert_eq!(buf.capacity(), prefix + len, "{} held", held);
    }

    #[test]
    fn a_length_prefix_is_judged_before_its_payload(len in any::<u32>(), max in 0usize..100_000) {
        let mut buf = BytesMut::new();
        put_len_prefix(len as usize, &mut buf);
        let prefix = buf.len();
        let cap = buf.capacity();
        match decode_frame(&mut buf, max) {
            Err(CodecError::TooLarge { len: l, max: m }) => {
                prop_assert!(len as usize > max);
                prop_assert_eq!((l, m), (len as usize, max));
                prop_assert_eq!(buf.capacity(), cap, "reserved for a refused frame");
            }
            // Only an empty frame (length 0) is complete with its prefix alone.
            Ok(Some(frame)) => prop_assert_eq!((len, frame), (0, Frame::default())),
            Ok(None) => {
                prop_assert!(len > 0 && len as usize <= max);
                prop_assert!(buf.capacity() >= prefix + len as usize);
            }
            Err(e) => prop_assert!(false, "prefix {len}: {e:?}"),
        }
    }

    #[test]
    fn a_prefix_longer_than_a_varint32_is_bad(
        continued in vec(0x80u8..=0xff, 5..10),
        tail in vec(any::<u8>(), 0..8),
    ) {
        let mut buf = BytesMut::from(&[continued, tail].concat()[..]);
        prop_assert!(matches!(decode_frame(&mut buf, usize::MAX), Err(CodecError::BadLength)));
    }

    #[test]
    fn any_payload_is_a_frame_or_malformed(payload in vec(any::<u8>(), 0..256)) {
        let mut buf = BytesMut::new();
        encode_payload(&payload, &mut buf);
        match decode_frame(&mut buf, payload.len()) {
            Ok(Some(frame)) => {
                // What was understood survives re-encoding (unknown fields are dropped).
                let again = frame_to_bytes(&frame);
                let back = decode_frame(&mut BytesMut::from(&again[..]), again.len()).unwrap();
                prop_assert_eq!(back, Some(frame));
            }
            Err(e @ CodecError::Malformed(_)) => {
                prop_assert_eq!(e.error_code(), Some(ErrorCode::BadFrame));
            }
            other => prop_assert!(false, "{:?}", other),
        }
        prop_assert!(buf.is_empty(), "a whole frame is consumed, even a malformed one");
    }
}
