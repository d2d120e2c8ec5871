//! Reading what a client still sends after tungstenite gave up on the connection.
//!
//! After a read error (a message over `max_frame_len`, a protocol error) tokio-tungstenite's
//! stream ends: it reads nothing more. The server still sends its Close, but a client may be in
//! the middle of writing a large message; if the socket is then closed with input unread, the
//! kernel resets the connection and the client's write fails (ECONNRESET) before it reads the
//! Close telling it why. So the close reads on under tungstenite, discarding, until the client's
//! own Close frame has arrived (it has finished writing and expects the server to close the TCP
//! connection, RFC 6455 7.1.1) or the stream ends, bounded in bytes and time.
//!
//! Finding the client's Close among raw bytes needs the frame boundaries, and tungstenite keeps
//! the bytes it has read but not parsed to itself. So every connection reads through
//! [`Tracked`], which follows the boundaries as bytes pass ([`FrameTracker`]: the end of the
//! HTTP request, then each frame header, skipping payloads by their length; nothing is
//! buffered, 32 bytes of state). The tracker has seen every byte tungstenite has, so after an
//! error it knows where the frame in progress ends, however much of it tungstenite buffered.

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Longest WebSocket frame header: 2 bytes, an 8-byte length, a 4-byte mask.
const MAX_HEADER: usize = 14;
/// Opcode of a Close frame.
const CLOSE: u8 = 0x8;

/// Follows frame boundaries in the bytes a server reads: first the HTTP upgrade request (up to
/// its blank line), then frames.
#[derive(Debug, Default)]
pub(super) struct FrameTracker {
    /// The HTTP request has ended: what follows is frames.
    in_frames: bool,
    /// In the request: the current line is empty so far (`\r` does not count, as in httparse,
    /// which also accepts bare `\n` line ends).
    empty_line: bool,
    /// The header of the next frame, as far as it has arrived.
    header: [u8; MAX_HEADER],
    header_len: u8,
    /// The frame whose payload is passing is a Close.
    in_close: bool,
    /// A whole Close frame has passed.
    close_seen: bool,
    /// Payload bytes of the current frame still to come.
    payload_left: u64,
}

impl FrameTracker {
    /// Takes note of bytes read, in order.
    pub(super) fn observe(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if !self.in_frames {
                let end = bytes.iter().position(|&b| self.request_byte(b));
                match end {
                    Some(i) => {
                        self.in_frames = true;
                        bytes = &bytes[i + 1..];
                    }
                    None => return,
                }
            } else if self.payload_left > 0 {
                let n = usize::try_from(self.payload_left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                self.payload_left -= n as u64;
                bytes = &bytes[n..];
                if self.payload_left == 0 {
                    self.close_seen |= self.in_close;
                }
            } else {
                self.header[usize::from(self.header_len)] = bytes[0];
                self.header_len += 1;
                bytes = &bytes[1..];
                if let Some(len) = self.header_payload_len() {
                    self.header_len = 0;
                    self.in_close = self.header[0] & 0x0f == CLOSE;
                    self.payload_left = len;
                    if len == 0 {
                        self.close_seen |= self.in_close;
                    }
                }
            }
        }
    }

    /// A byte of the HTTP request; true for the one that ends it (the `\n` of an empty line).
    fn request_byte(&mut self, b: u8) -> bool {
        match b {
            b'\n' if self.empty_line => return true,
            b'\n' => self.empty_line = true,
            b'\r' => {}
            _ => self.empty_line = false,
        }
        false
    }

    /// The payload length once the header has arrived whole.
    fn header_payload_len(&self) -> Option<u64> {
        let h = &self.header[..usize::from(self.header_len)];
        let second = *h.get(1)?;
        let (extended, short) = match second & 0x7f {
            126 => (2, 0),
            127 => (8, 0),
            n => (0, u64::from(n)),
        };
        let mask = if second & 0x80 != 0 { 4 } else { 0 };
        if h.len() < 2 + extended + mask {
            return None;
        }
        let len = h[2..2 + extended]
            .iter()
            .fold(short, |len, &b| (len << 8) | u64::from(b));
        Some(len)
    }

    /// A whole Close frame has been read.
    pub(super) fn close_seen(&self) -> bool {
        self.close_seen
    }
}

/// A byte stream whose input passes a [`FrameTracker`]; output passes unchanged.
pub(super) struct Tracked<S> {
    inner: S,
    frames: FrameTracker,
}

impl<S> Tracked<S> {
    pub(super) fn new(inner: S) -> Self {
        Self {
            inner,
            frames: FrameTracker::default(),
        }
    }
}

impl<S: AsyncRead + Unpin> Tracked<S> {
    /// Reads and discards until a whole Close frame has been read (maybe already), the stream
    /// ends or fails, or `max` bytes were read. Holds one small buffer meanwhile, never more.
    pub(super) async fn discard_until_close(&mut self, max: usize) {
        let mut scratch = vec![0u8; 16 * 1024];
        let mut read = 0;
        while !self.frames.close_seen() && read < max {
            match self.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read += n,
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        this.frames.observe(&buf.filled()[before..]);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame: FIN, `opcode`, `payload_len` bytes of payload.
    fn frame(opcode: u8, payload_len: usize) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match payload_len {
            0..=125 => f.push(0x80 | payload_len as u8),
            126..=0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(payload_len as u16).to_be_bytes());
            }
            _ => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(payload_len as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend(std::iter::repeat_n(0xaa, payload_len));
        f
    }

    fn stream() -> Vec<u8> {
        // A Close opcode in a payload, and a request whose lines end in bare \n too.
        let mut s = b"GET /ws HTTP/1.1\r\nHost: x\nUpgrade: websocket\r\n\r\n".to_vec();
        let mut lying = frame(0x2, 40);
        lying[10] = 0x88;
        s.extend(lying);
        s.extend(frame(0x2, 300));
        s.extend(frame(0x1, 70_000));
        s.extend(frame(0x9, 0));
        s.extend(frame(CLOSE, 2));
        s
    }

    #[test]
    fn the_close_frame_is_found_in_any_chunks() {
        let all = stream();
        let close_end = all.len();
        for chunk in [1, 2, 3, 7, 13, 14, 512, 4096, all.len()] {
            let mut t = FrameTracker::default();
            let mut seen_at = None;
            for (i, piece) in all.chunks(chunk).enumerate() {
                t.observe(piece);
                if t.close_seen() && seen_at.is_none() {
                    seen_at = Some(((i + 1) * chunk).min(all.len()));
                }
            }
            assert_eq!(seen_at, Some(close_end), "chunks of {chunk}");
        }
    }

    #[test]
    fn the_tracker_stays_small() {
        // Every WebSocket connection holds one, idle or not.
        assert!(std::mem::size_of::<FrameTracker>() <= 32);
    }

    #[test]
    fn nothing_before_the_end_of_the_request_counts() {
        let mut t = FrameTracker::default();
        // Close frame bytes inside the request are request bytes.
        t.observe(&[b"GET / HTTP/1.1\r\nX: ".as_slice(), &frame(CLOSE, 0)].concat());
        assert!(!t.close_seen());
        t.observe(b"\r\n\r\n");
        assert!(!t.close_seen());
        t.observe(&frame(CLOSE, 0));
        assert!(t.close_seen());
    }

    #[test]
    fn a_huge_announced_length_is_skipped_not_buffered() {
        let mut t = FrameTracker::default();
        t.observe(b"GET / HTTP/1.1\r\n\r\n");
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&u64::MAX.to_be_bytes());
        header.extend_from_slice(&[0; 4]);
        t.observe(&header);
        t.observe(&frame(CLOSE, 0));
        assert!(!t.close_seen(), "still inside the payload");
        assert_eq!(t.payload_left, u64::MAX - frame(CLOSE, 0).len() as u64);
    }

    #[tokio::test]
    async fn discarding_stops_at_the_close_or_the_bound() {
        let all = stream();
        let (mut client, server) = tokio::io::duplex(1024);
        let mut tracked = Tracked::new(server);
        let writer = tokio::spawn(async move {
            tokio::io::AsyncWriteExt::write_all(&mut client, &all)
                .await
                .unwrap();
            client // kept open: the discard must end on the Close, not on EOF
        });
        tracked.discard_until_close(usize::MAX).await;
        assert!(tracked.frames.close_seen());
        let _client = writer.await.unwrap();

        let (mut client, server) = tokio::io::duplex(1024);
        let mut tracked = Tracked::new(server);
        let writer = tokio::spawn(async move {
            let _ = tokio::io::AsyncWriteExt::write_all(&mut client, &[0u8; 100_000]).await;
        });
        tracked.discard_until_close(10_000).await;
        assert!(!tracked.frames.close_seen());
        drop(tracked);
        writer.await.unwrap();
    }
}
