//! TCP framing: protobuf's standard *delimited* format, a varint32 length followed by that
//! many bytes of one [`Frame`]. The decoder never allocates more than the configured maximum
//! frame size, whatever length a peer announces.

use crate::pb::{ErrorCode, Frame};
use bytes::{Buf, BufMut, BytesMut};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder};

/// Default maximum frame size (encoded protobuf bytes, without the length prefix).
pub const DEFAULT_MAX_FRAME_LEN: usize = 64 * 1024;
/// The largest message body a route accepts (its `max_message_len` cannot be set higher):
/// the frame a client may have to read for one message is this plus its envelope.
pub const MAX_MESSAGE_LEN: usize = 1024 * 1024;

/// Longest varint32: 5 bytes.
const MAX_VARINT32_LEN: usize = 5;

/// Why bytes could not become a frame. Every variant except `Io` is the peer's fault.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {len} bytes is over the maximum of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("invalid length prefix (not a varint32)")]
    BadLength,
    #[error("undecodable frame: {0}")]
    Malformed(#[from] prost::DecodeError),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl CodecError {
    /// The protocol error code to send to the peer before closing, if any.
    pub fn error_code(&self) -> Option<ErrorCode> {
        match self {
            CodecError::TooLarge { .. } => Some(ErrorCode::FrameTooLarge),
            CodecError::BadLength | CodecError::Malformed(_) => Some(ErrorCode::BadFrame),
            CodecError::Truncated | CodecError::Io(_) => None,
        }
    }
}

/// Reads a varint32 from the front of `buf` without consuming it.
/// `Ok(None)`: more bytes are needed. `Ok(Some((value, prefix_len)))` otherwise.
fn peek_varint32(buf: &[u8]) -> Result<Option<(usize, usize)>, CodecError> {
    let mut value: u64 = 0;
    for (i, &b) in buf.iter().take(MAX_VARINT32_LEN).enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if value > u64::from(u32::MAX) {
                return Err(CodecError::BadLength);
            }
            return Ok(Some((value as usize, i + 1)));
        }
    }
    if buf.len() >= MAX_VARINT32_LEN {
        Err(CodecError::BadLength)
    } else {
        Ok(None)
    }
}

/// Makes room in `buf` for `additional` more bytes, allocating no more than that when it has
/// to allocate: first it tries to reuse the room of bytes already consumed, then it moves the
/// held bytes into a buffer of exactly the size needed. (`BytesMut::reserve` grows like a
/// `Vec`, to at least twice the old capacity: a connection holding half of a frame near the
/// limit would have reserved twice the limit.)
pub fn reserve_exact(buf: &mut BytesMut, additional: usize) {
    if buf.capacity() - buf.len() >= additional || buf.try_reclaim(additional) {
        return;
    }
    let mut exact = BytesMut::with_capacity(buf.len() + additional);
    exact.extend_from_slice(buf);
    *buf = exact;
}

/// Decodes one frame from the front of `buf`, consuming it. `Ok(None)`: incomplete, more bytes
/// are needed (and `buf` has reserved room for the rest of this frame, never over `max_len`).
pub fn decode_frame(buf: &mut BytesMut, max_len: usize) -> Result<Option<Frame>, CodecError> {
    let Some((len, prefix)) = peek_varint32(buf)? else {
        return Ok(None);
    };
    if len > max_len {
        return Err(CodecError::TooLarge { len, max: max_len });
    }
    let total = prefix + len;
    if buf.len() < total {
        reserve_exact(buf, total - buf.len());
        return Ok(None);
    }
    buf.advance(prefix);
    let payload = buf.split_to(len);
    Ok(Some(Frame::decode(payload.freeze())?))
}

/// Appends the length prefix for a payload of `len` bytes.
pub fn put_len_prefix(len: usize, dst: &mut impl BufMut) {
    prost::encoding::encode_varint(len as u64, dst);
}

/// Appends one frame, length-prefixed.
pub fn encode_frame(frame: &Frame, dst: &mut BytesMut) {
    let len = frame.encoded_len();
    dst.reserve(len + MAX_VARINT32_LEN);
    put_len_prefix(len, dst);
    // Cannot fail: capacity was reserved above.
    let _ = frame.encode(dst);
}

/// Appends an already-encoded frame payload, length-prefixed.
pub fn encode_payload(payload: &[u8], dst: &mut BytesMut) {
    dst.reserve(payload.len() + MAX_VARINT32_LEN);
    put_len_prefix(payload.len(), dst);
    dst.put_slice(payload);
}

/// A frame encoded to a standalone length-prefixed buffer.
pub fn frame_to_bytes(frame: &Frame) -> bytes::Bytes {
    let mut buf = BytesMut::new();
    encode_frame(frame, &mut buf);
    buf.freeze()
}

/// `tokio_util` codec over [`decode_frame`] / [`encode_frame`], for clients and tests. Reads
/// and writes have their own limits: a client writes what the server accepts (its announced
/// `max_frame_len`) but must read what the server sends, which can be larger.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max_read: usize,
    max_write: usize,
}

impl FrameCodec {
    /// The same limit both ways.
    pub fn new(max_len: usize) -> Self {
        Self::with_limits(max_len, max_len)
    }

    /// Frames read are at most `max_read` bytes, frames written at most `max_write`.
    pub fn with_limits(max_read: usize, max_write: usize) -> Self {
        Self {
            max_read,
            max_write,
        }
    }

    pub fn max_read(&self) -> usize {
        self.max_read
    }

    pub fn max_write(&self) -> usize {
        self.max_write
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME_LEN)
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        decode_frame(src, self.max_read)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(CodecError::Truncated),
        }
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        let len = frame.encoded_len();
        if len > self.max_write {
            return Err(CodecError::TooLarge {
                len,
                max: self.max_write,
            });
        }
        encode_frame(frame, dst);
        Ok(())
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        Encoder::<&Frame>::encode(self, &frame, dst)
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{frame::Body, Login, Ping};

    fn ping(n: u64) -> Frame {
        Frame::new(Body::Ping(Ping { nonce: n }))
    }

    #[test]
    fn several_frames_in_one_read() {
        let mut buf = BytesMut::new();
        for n in 1..=3 {
            encode_frame(&ping(n), &mut buf);
        }
        let mut codec = FrameCodec::default();
        for n in 1..=3 {
            assert_eq!(codec.decode(&mut buf).unwrap(), Some(ping(n)));
        }
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        assert!(buf.is_empty());
    }

    #[test]
    fn read_and_write_limits_are_separate() {
        let big = Frame::new(Body::Login(Login {
            token: "t".repeat(300),
        }));
        let mut codec = FrameCodec::with_limits(1024, 100);
        let mut buf = BytesMut::new();
        assert!(matches!(
            codec.encode(&big, &mut buf),
            Err(CodecError::TooLarge { max: 100, .. })
        ));
        assert!(buf.is_empty(), "nothing written for a refused frame");
        encode_frame(&big, &mut buf);
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(big));
    }

    #[test]
    fn frame_split_across_reads() {
        let frame = Frame::new(Body::Login(Login {
            token: "x".repeat(300), // forces a two-byte length prefix
        }));
        let whole = frame_to_bytes(&frame);
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        // Feed one byte at a time: the prefix itself is split too.
        for (i, b) in whole.iter().enumerate() {
            buf.put_u8(*b);
            let out = codec.decode(&mut buf).unwrap();
            if i + 1 < whole.len() {
                assert_eq!(out, None, "decoded early at byte {i}");
            } else {
                assert_eq!(out, Some(frame.clone()));
            }
        }
    }

    #[test]
    fn length_over_maximum_is_rejected_without_allocating() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::new();
        put_len_prefix(1025, &mut buf);
        let cap_before = buf.capacity();
        match codec.decode(&mut buf) {
            Err(
                e @ CodecError::TooLarge {
                    len: 1025,
                    max: 1024,
                },
            ) => {
                assert_eq!(e.error_code(), Some(ErrorCode::FrameTooLarge))
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(buf.capacity(), cap_before);
        // An announced 4 GiB frame is refused on its prefix alone.
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0x0f][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::TooLarge { .. })
        ));
    }

    /// Found by `props::a_pending_frame_reserves_only_itself`: with `BytesMut::reserve` a
    /// buffer holding 40,000 bytes of a 64 KiB frame grew to 80,000 (twice its capacity).
    #[test]
    fn a_partial_frame_reserves_exactly_the_rest() {
        let frame = Frame::new(Body::Login(Login {
            token: "z".repeat(DEFAULT_MAX_FRAME_LEN - 8),
        }));
        let whole = frame_to_bytes(&frame);
        assert!(whole.len() <= DEFAULT_MAX_FRAME_LEN + MAX_VARINT32_LEN);
        let mut buf = BytesMut::with_capacity(40_000);
        buf.extend_from_slice(&whole[..40_000]);
        assert_eq!(decode_frame(&mut buf, DEFAULT_MAX_FRAME_LEN).unwrap(), None);
        assert_eq!(buf.capacity(), whole.len());
        buf.extend_from_slice(&whole[40_000..]);
        assert_eq!(buf.capacity(), whole.len(), "the rest fits without growing");
        assert_eq!(
            decode_frame(&mut buf, DEFAULT_MAX_FRAME_LEN).unwrap(),
            Some(frame)
        );
    }

    #[test]
    fn consumed_room_is_reused_before_allocating() {
        let mut buf = BytesMut::with_capacity(100);
        buf.extend_from_slice(&[7; 100]);
        buf.advance(90);
        reserve_exact(&mut buf, 50);
        assert_eq!(&buf[..], &[7; 10][..]);
        // Moved to the front of the same allocation (an exact new one would have 60).
        assert_eq!(buf.capacity(), 100);
        // No room to reuse: exactly what was asked.
        reserve_exact(&mut buf, 200);
        assert_eq!(buf.capacity(), 210);
        assert_eq!(&buf[..], &[7; 10][..]);
    }

    #[test]
    fn exactly_maximum_is_accepted() {
        let frame = Frame::new(Body::Login(Login {
            token: "y".repeat(100),
        }));
        let len = prost::Message::encoded_len(&frame);
        let mut codec = FrameCodec::new(len);
        let mut buf = BytesMut::new();
        codec.encode(&frame, &mut buf).unwrap();
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(frame));
    }

    #[test]
    fn garbage_bytes_are_an_error() {
        let mut codec = FrameCodec::default();
        // A varint that never ends.
        let mut buf = BytesMut::from(&[0xff; 8][..]);
        assert!(matches!(codec.decode(&mut buf), Err(CodecError::BadLength)));
        // A valid length followed by bytes that are not a Frame (field 1 with wire type 7).
        let mut buf = BytesMut::new();
        encode_payload(&[0x0f, 0xff, 0xff], &mut buf);
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(matches!(err, CodecError::Malformed(_)), "{err:?}");
        assert_eq!(err.error_code(), Some(ErrorCode::BadFrame));
        // Text instead of protobuf, e.g. an HTTP request on the TCP port.
        // ('G' reads as a 71-byte length; the rest is not a valid Frame.)
        let request = b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8.0\r\nAccept: */*\r\nConnection: keep-alive\r\n\r\n";
        let mut buf = BytesMut::from(&request[..]);
        assert!(codec.decode(&mut buf).is_err());
    }

    #[test]
    fn unknown_oneof_case_decodes_to_an_empty_body() {
        // Field 99, varint 1: a body a newer client might send.
        let mut payload = BytesMut::new();
        prost::encoding::encode_key(99, prost::encoding::WireType::Varint, &mut payload);
        prost::encoding::encode_varint(1, &mut payload);
        let mut buf = BytesMut::new();
        encode_payload(&payload, &mut buf);
        let frame = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
        assert_eq!(frame.body, None);
        assert_eq!(frame.kind_name(), "unknown");
    }

    #[test]
    fn eof_mid_frame_is_truncated() {
        let whole = frame_to_bytes(&ping(7));
        let mut buf = BytesMut::from(&whole[..whole.len() - 1]);
        assert!(matches!(
            FrameCodec::default().decode_eof(&mut buf),
            Err(CodecError::Truncated)
        ));
    }

    #[test]
    fn json_mapping_round_trips() {
        let frame = Frame::new(Body::Send(crate::pb::Send {
            client_id: 5,
            kind: crate::pb::MessageKind::Private as i32,
            to_user_id: 42,
            body: "hi".into(),
            ..Default::default()
        }));
        let json = serde_json::to_string(&frame).unwrap();
        assert!(json.contains("\"toUserId\":\"42\""), "{json}");
        assert!(json.contains("MESSAGE_KIND_PRIVATE"), "{json}");
        let back: Frame = serde_json::from_str(&json).unwrap();
        assert_eq!(back, frame);
    }
}
