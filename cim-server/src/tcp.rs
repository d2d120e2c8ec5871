//! The TCP transport: varint32-delimited protobuf frames (`cim_proto::codec`) over any byte
//! stream (a `TcpStream` or a TLS stream over one in production, `tokio::io::duplex` in
//! tests).
//!
//! An idle connection holds no read buffer at all (it waits for readability first, then reads
//! into a small buffer, see [`READ_CHUNK`]), instead of the 8 KiB a `FramedRead` keeps per
//! connection; and the write path encodes a whole burst of frames into one buffer written with
//! one `write_all`, freed afterwards.

use crate::{
    conn::Outbound,
    session::{RecvError, Transport},
};
use bytes::BytesMut;
use cim_common::pb::Frame;
use cim_proto::codec::{decode_frame, encode_payload, reserve_exact, CodecError};
use std::{future::Future, io, time::Duration};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

/// Room reserved before a read. Most frames (pings, small sends) fit in one read of this size.
/// So the read buffer holds at most `max_frame_len` + 5 (a pending frame and its prefix) + this
/// (`tcp/props.rs` checks it on arbitrary streams).
const READ_CHUNK: usize = 512;
/// Below this much free room, reserve another chunk before reading.
const MIN_READ_ROOM: usize = 64;
/// Bytes read and discarded after our last frame while waiting for the peer to close (see
/// [`TcpTransport::close`]).
const LINGER_DRAIN_MAX: usize = 64 * 1024;
/// Least [`oversized_drain_max`].
const OVERSIZED_DRAIN_MIN: usize = 4 * 1024 * 1024;
/// How long the close after a frame over the limit reads and discards at most, waiting for a
/// client that is still writing it (the default `write_timeout_ms`): a 2 MiB frame takes 1.6 s
/// at 10 Mbit/s, longer than the usual linger of at most 1 s.
pub(crate) const OVERSIZED_LINGER: Duration = Duration::from_secs(10);

/// Bytes read and discarded, at most, by the close after a frame (or WebSocket message) over
/// `max_frame_len`: twice the limit, at least 4 MiB. The client may still be writing that
/// frame; closing with its tail unread would make the kernel reset the connection, and the
/// client's write would fail (ECONNRESET, EPIPE) before it read the error telling it why. A
/// frame far larger than the limit is cut off all the same once this much was read.
pub(crate) fn oversized_drain_max(max_frame_len: usize) -> usize {
    max_frame_len.saturating_mul(2).max(OVERSIZED_DRAIN_MIN)
}

/// A byte stream the TCP transport runs on.
pub(crate) trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// Whether the stream is TLS: the transport's `KIND` (`tls`/`wss` rather than `tcp`/`ws`)
    /// names it in logs and in the `cim_server_connections{transport}` gauge.
    const TLS: bool = false;

    /// Waits until input is available, without holding a buffer. A stream that cannot tell
    /// returns at once, and the read itself waits with its buffer reserved.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        std::future::ready(Ok(()))
    }
}

impl ByteStream for TcpStream {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        // The poll form keeps the waker in the socket's registration; `TcpStream::readable`
        // would put a ~130-byte waiter node into every idle connection's future.
        std::future::poll_fn(|cx| self.poll_read_ready(cx))
    }
}

/// TLS: readiness of the socket says nothing about plaintext rustls may already hold, so
/// the read itself waits (with its small buffer reserved).
impl ByteStream for cim_common::tls::TlsStream<TcpStream> {
    const TLS: bool = true;
}

#[cfg(test)]
impl ByteStream for tokio::io::DuplexStream {}

pub(crate) struct TcpTransport<S> {
    stream: S,
    read_buf: BytesMut,
    /// `u32` (the config allows at most 16 MiB) so that it and `too_large` take one word: the
    /// session future of every idle connection holds this struct.
    max_frame_len: u32,
    /// A frame over `max_frame_len` ended the connection: the close drains up to
    /// [`oversized_drain_max`], since the client may still be writing it.
    too_large: bool,
}

impl<S> TcpTransport<S> {
    pub(crate) fn new(stream: S, max_frame_len: usize) -> Self {
        Self {
            stream,
            read_buf: BytesMut::new(),
            max_frame_len: u32::try_from(max_frame_len).unwrap_or(u32::MAX),
            too_large: false,
        }
    }

    fn max_frame_len(&self) -> usize {
        self.max_frame_len as usize
    }

    #[cfg(test)]
    pub(crate) fn read_buffer_capacity(&self) -> usize {
        self.read_buf.capacity()
    }
}

fn codec_error(e: CodecError) -> RecvError {
    match e.error_code() {
        Some(code) => RecvError::Protocol {
            code,
            message: e.to_string(),
        },
        None => RecvError::Io(e.to_string()),
    }
}

impl<S: ByteStream> Transport for TcpTransport<S> {
    const KIND: &'static str = if S::TLS { "tls" } else { "tcp" };

    /// Cancel-safe: bytes only enter `read_buf` when a read completes, and a frame is only
    /// taken out of it when it is returned.
    async fn recv(&mut self) -> Result<Option<Frame>, RecvError> {
        loop {
            let max_frame_len = self.max_frame_len();
            match decode_frame(&mut self.read_buf, max_frame_len) {
                Ok(Some(frame)) => return Ok(Some(frame)),
                Ok(None) => {}
                Err(e) => {
                    self.too_large |= matches!(e, CodecError::TooLarge { .. });
                    return Err(codec_error(e));
                }
            }
            if self.read_buf.is_empty() {
                // Idle between frames: wait for input holding no buffer at all (most
                // connections spend most of their life here).
                self.read_buf = BytesMut::new();
                self.stream
                    .readable()
                    .await
                    .map_err(|e| RecvError::Io(e.to_string()))?;
            }
            if self.read_buf.capacity() - self.read_buf.len() < MIN_READ_ROOM {
                // Exactly: `BytesMut::reserve` would double a buffer the decoder sized for a
                // frame near the limit (up to twice the limit per connection).
                reserve_exact(&mut self.read_buf, READ_CHUNK);
            }
            let n = self
                .stream
                .read_buf(&mut self.read_buf)
                .await
                .map_err(|e| RecvError::Io(e.to_string()))?;
            if n == 0 {
                return if self.read_buf.is_empty() {
                    Ok(None)
                } else {
                    Err(codec_error(CodecError::Truncated))
                };
            }
        }
    }

    fn set_max_frame_len(&mut self, max: usize) {
        self.max_frame_len = u32::try_from(max).unwrap_or(u32::MAX);
    }

    async fn send(&mut self, items: &[Outbound]) -> io::Result<()> {
        // Length prefix (at most 5 bytes) + payload per frame, in one buffer: one syscall per
        // burst. The buffer lives only for this burst.
        let total: usize = items.iter().map(|i| i.proto().len() + 5).sum();
        let mut buf = BytesMut::with_capacity(total);
        for item in items {
            encode_payload(item.proto(), &mut buf);
        }
        self.stream.write_all(&buf).await?;
        self.stream.flush().await
    }

    /// Half-closes, then reads and discards until the peer closes too (bounded in bytes and
    /// time). Closing a socket with unread input makes the kernel send a reset, which can
    /// destroy our last frame (the error or kick telling the client why) before it reads it,
    /// and fails the writes of a client still sending. After a frame over the limit the
    /// bounds are [`oversized_drain_max`] and [`OVERSIZED_LINGER`]: the client is likely
    /// still writing that frame (before, it got EPIPE on every try of a 2 MiB frame over
    /// 64 KiB socket buffers, `tcp_client_still_writing_an_oversized_frame_reads_the_error`).
    async fn close(&mut self, linger: Duration) {
        self.read_buf = BytesMut::new();
        if self.stream.shutdown().await.is_err() {
            return;
        }
        let (max, linger) = if self.too_large {
            (
                LINGER_DRAIN_MAX + oversized_drain_max(self.max_frame_len()),
                OVERSIZED_LINGER,
            )
        } else {
            (LINGER_DRAIN_MAX, linger)
        };
        let drain = async {
            // On the heap: an array here would enlarge every idle session's future.
            let mut scratch = vec![0u8; if self.too_large { 16 * 1024 } else { 1024 }];
            let mut drained = 0;
            while drained < max {
                match self.stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => drained += n,
                }
            }
        };
        let _ = tokio::time::timeout(linger, drain).await;
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;
    use cim_common::pb::{frame::Body, Login};
    use cim_proto::codec::{frame_to_bytes, DEFAULT_MAX_FRAME_LEN};

    /// Found by `props::any_stream_reads_as_the_codec_says_within_the_limit`: the room
    /// reserved before a read doubled a buffer sized for a frame near the limit (131,078 bytes
    /// held for a 64 KiB frame arriving a byte at a time: below 64 bytes of room, 512 more).
    #[tokio::test]
    async fn a_frame_near_the_limit_holds_the_limit_and_one_read() {
        let frame = Frame::new(Body::Login(Login {
            token: "x".repeat(DEFAULT_MAX_FRAME_LEN - 8),
        }));
        let bytes = frame_to_bytes(&frame);
        // All but its last byte, then the end: the buffer still holds the pending frame when
        // the truncated read is reported.
        let (mut client, server) = tokio::io::duplex(1);
        let writer = tokio::spawn(async move { client.write_all(&bytes[..bytes.len() - 1]).await });
        let mut transport = TcpTransport::new(server, DEFAULT_MAX_FRAME_LEN);
        assert!(matches!(transport.recv().await, Err(RecvError::Io(_))));
        let held = transport.read_buffer_capacity();
        assert!(
            held <= DEFAULT_MAX_FRAME_LEN + 5 + READ_CHUNK,
            "{held} bytes held"
        );
        writer.await.unwrap().unwrap();
    }
}
