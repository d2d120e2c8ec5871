//! The WebSocket transport (tokio-tungstenite): one `Frame` per message on path `/ws`, binary
//! messages as protobuf, text messages as proto3 JSON. Answers use the format of the last
//! message the client sent, so a browser speaking JSON gets JSON back.
//!
//! tungstenite's default buffers are 128 KiB each; here they are 0.5-1 KiB (see
//! [`config`]) to keep an idle connection within a few KiB.
//!
//! The handshake refuses any path but `/ws` (404) and an `Origin` not on `ws_allowed_origins`
//! (403, [`origin`]; requests without one pass: non-browser clients send none).
//!
//! After a read error (a message over `max_frame_len`: Close 1009 with a reason) the close
//! reads on under tungstenite, discarding, until the client's Close ([`drain`]), so that a
//! client still writing its message reads why instead of getting a reset.

use crate::{
    conn::Outbound,
    pb::{ErrorCode, Frame},
    session::{RecvError, Transport},
    tcp::{oversized_drain_max, OVERSIZED_LINGER},
};
use drain::Tracked;
use futures_util::{SinkExt, StreamExt};
pub(crate) use origin::{unchecked_listeners, AllowedOrigins};
use prost::Message as _;
use std::{io, time::Duration};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::{
    accept_hdr_async_with_config,
    tungstenite::{
        error::ProtocolError,
        handshake::server::{Callback, ErrorResponse, Request, Response},
        http::{header::ORIGIN, StatusCode},
        protocol::{frame::coding::CloseCode, CloseFrame, WebSocketConfig},
        Error as WsError, Message,
    },
    WebSocketStream,
};
use tracing::debug;

/// Bytes discarded at most while waiting for the client's Close after a read error other than
/// a message over the limit (as the TCP transport does after its last frame).
const AFTER_ERROR_DRAIN_MAX: usize = 64 * 1024;

/// The only path that upgrades to a WebSocket.
pub(crate) const WS_PATH: &str = "/ws";

/// tungstenite allocates this eagerly per connection and reads at most this much at a time.
const READ_BUFFER: usize = 512;
/// Messages are buffered up to this size before being written; `flush` writes the rest. The
/// buffer keeps its capacity between bursts, so it is kept small too.
const WRITE_BUFFER: usize = 1024;

/// The WebSocket settings of a connection accepting frames up to `max_frame_len` bytes.
pub(crate) fn config(max_frame_len: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        // A bound, not an allocation: room for a few of the largest frames (JSON can be larger
        // than protobuf). Must stay above `write_buffer_size` (tungstenite asserts it).
        .max_write_buffer_size(WRITE_BUFFER + 8 * max_frame_len)
        .max_message_size(Some(max_frame_len))
        .max_frame_size(Some(max_frame_len))
}

/// Handshake callback: only [`WS_PATH`] upgrades (anything else is answered 404), and only
/// from an allowed origin (else 403, [`origin`]).
struct Handshake<'a> {
    origins: &'a AllowedOrigins,
}

fn refuse(status: StatusCode, reason: String) -> ErrorResponse {
    let mut refusal = ErrorResponse::new(Some(reason));
    *refusal.status_mut() = status;
    refusal
}

impl Callback for Handshake<'_> {
    fn on_request(self, request: &Request, response: Response) -> Result<Response, ErrorResponse> {
        if request.uri().path() != WS_PATH {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                format!("not found: the WebSocket endpoint is {WS_PATH}"),
            ));
        }
        let origins = request.headers().get_all(ORIGIN).iter();
        if let Err(refusal) = self.origins.check(origins.map(|v| v.as_bytes())) {
            debug!(
                origin = ?request.headers().get(ORIGIN),
                "websocket handshake refused: {}",
                refusal.reason()
            );
            return Err(refuse(StatusCode::FORBIDDEN, refusal.reason().into()));
        }
        Ok(response)
    }
}

/// Performs the server handshake: any path other than [`WS_PATH`] is refused, and so is an
/// `Origin` that `origins` does not allow.
pub(crate) async fn accept<S>(
    stream: S,
    max_frame_len: usize,
    origins: &AllowedOrigins,
) -> Result<WsTransport<S>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ws = accept_hdr_async_with_config(
        Tracked::new(stream),
        Handshake { origins },
        Some(config(max_frame_len)),
    )
    .await?;
    Ok(WsTransport {
        ws,
        text: false,
        read_failed: false,
        too_large: false,
    })
}

pub(crate) struct WsTransport<S> {
    ws: WebSocketStream<Tracked<S>>,
    /// The client's last data message was text: answer in JSON.
    text: bool,
    /// tungstenite failed a read, so it reads no more: the close discards what the client
    /// still sends under it ([`Tracked::discard_until_close`]).
    read_failed: bool,
    /// A message over `max_frame_len` ended the connection: the Close says 1009 (message too
    /// big) with a reason, so a browser's `onclose` tells why, not 1005 (no status); and the
    /// close waits longer, the client may still be writing the message.
    too_large: bool,
}

/// The reason of the Close after a message over the limit (≤ 123 bytes, the WebSocket limit).
pub(crate) const TOO_LARGE_REASON: &str =
    "FRAME_TOO_LARGE: message over the server's max_frame_len";

fn bad_frame(message: String) -> RecvError {
    RecvError::Protocol {
        code: ErrorCode::BadFrame,
        message,
    }
}

/// Parses a text message. Keys this server does not know are skipped (the generated
/// deserializer ignores unknown fields, see `cim-common/build.rs`), so a frame from a newer
/// client keeps its known fields, and a body from the future becomes an empty frame (answered
/// with UNSUPPORTED_FRAME, connection kept open), as unknown protobuf fields would.
fn parse_json(text: &str) -> Result<Frame, RecvError> {
    serde_json::from_str::<Frame>(text)
        .map_err(|e| bad_frame(format!("undecodable JSON frame: {e}")))
}

fn recv_error(e: WsError) -> Result<Option<Frame>, RecvError> {
    match e {
        WsError::ConnectionClosed | WsError::AlreadyClosed => Ok(None),
        WsError::Capacity(e) => Err(RecvError::Protocol {
            code: ErrorCode::FrameTooLarge,
            message: e.to_string(),
        }),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => Err(RecvError::Io(
            "connection reset without closing handshake".into(),
        )),
        WsError::Protocol(e) => Err(bad_frame(format!("websocket protocol error: {e}"))),
        WsError::Utf8(e) => Err(bad_frame(format!("text message is not UTF-8: {e}"))),
        WsError::Io(e) => Err(RecvError::Io(e.to_string())),
        other => Err(RecvError::Io(other.to_string())),
    }
}

fn io_error(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

impl<S> Transport for WsTransport<S>
where
    S: crate::tcp::ByteStream,
{
    const KIND: &'static str = if S::TLS { "wss" } else { "ws" };

    /// Cancel-safe: `StreamExt::next` keeps partial input inside the stream.
    async fn recv(&mut self) -> Result<Option<Frame>, RecvError> {
        loop {
            let message = match self.ws.next().await {
                None => return Ok(None),
                Some(Err(e)) => {
                    self.read_failed = true;
                    self.too_large |= matches!(e, WsError::Capacity(_));
                    return recv_error(e);
                }
                Some(Ok(m)) => m,
            };
            match message {
                Message::Binary(bytes) => {
                    self.text = false;
                    return Frame::decode(bytes)
                        .map(Some)
                        .map_err(|e| bad_frame(format!("undecodable frame: {e}")));
                }
                Message::Text(text) => {
                    self.text = true;
                    return parse_json(text.as_str()).map(Some);
                }
                Message::Close(_) => return Ok(None),
                // Control frames: tungstenite answers pings itself.
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            }
        }
    }

    async fn send(&mut self, items: &[Outbound]) -> io::Result<()> {
        for item in items {
            let message = if self.text {
                Message::Text(item.json().clone())
            } else {
                Message::Binary(item.proto().clone())
            };
            // `feed` buffers (writing only past WRITE_BUFFER); one flush for the burst.
            self.ws.feed(message).await.map_err(io_error)?;
        }
        self.ws.flush().await.map_err(io_error)
    }

    /// Sends a Close and waits (bounded) for the client's, so it reads our last frame before
    /// the socket goes away. After a read error tungstenite reads nothing more, so the wait
    /// reads under it, discarding (at most 64 KiB; after a message over the limit, which the
    /// client may still be writing, [`oversized_drain_max`] within [`OVERSIZED_LINGER`]).
    /// Before, the socket closed with the message's tail unread and the kernel reset the
    /// connection: a client writing 2 MiB over 64 KiB socket buffers failed its write with
    /// ECONNRESET on every try
    /// (`websocket_client_still_writing_an_oversized_message_reads_the_1009_close`).
    async fn close(&mut self, linger: Duration) {
        let frame = self.too_large.then(|| CloseFrame {
            code: CloseCode::Size,
            reason: TOO_LARGE_REASON.into(),
        });
        let (read_failed, too_large) = (self.read_failed, self.too_large);
        let max_frame_len = self.ws.get_config().max_message_size.unwrap_or(0);
        let (max, linger) = if too_large {
            (oversized_drain_max(max_frame_len), OVERSIZED_LINGER)
        } else {
            (AFTER_ERROR_DRAIN_MAX, linger)
        };
        let ws = &mut self.ws;
        let _ = tokio::time::timeout(linger, async move {
            if ws.close(frame).await.is_err() {
                return;
            }
            if read_failed {
                ws.get_mut().discard_until_close(max).await;
            } else {
                while let Some(Ok(_)) = ws.next().await {}
            }
        })
        .await;
    }
}

mod drain;
mod origin;

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{frame::Body, Ping};

    #[test]
    fn json_frames() {
        let ping = parse_json(r#"{"ping":{"nonce":"5"}}"#).unwrap();
        assert_eq!(ping, Frame::new(Body::Ping(Ping { nonce: 5 })));
        // A body from the future: an empty frame, not an error.
        assert_eq!(parse_json(r#"{"hologram":{}}"#).unwrap(), Frame::default());
        assert_eq!(parse_json("{}").unwrap(), Frame::default());
        // Fields from a newer schema, next to and inside a known body: skipped.
        let newer = parse_json(
            r#"{"ping":{"nonce":"7","priority":3,"trace":{"id":"x"}},"hologram":[1,2],"v":2}"#,
        )
        .unwrap();
        assert_eq!(newer, Frame::new(Body::Ping(Ping { nonce: 7 })));
        // A known body that is broken, or not JSON at all: BAD_FRAME.
        for bad in [
            r#"{"ping":{"nonce":"x"}}"#,
            r#"{"ping":{"nonce":"5"}"#,
            r#"{"ping":"now"}"#,
            "hello",
            "[1]",
        ] {
            match parse_json(bad) {
                Err(RecvError::Protocol { code, .. }) => assert_eq!(code, ErrorCode::BadFrame),
                other => panic!("{bad}: expected BAD_FRAME, got {other:?}"),
            }
        }
    }

    #[test]
    fn config_is_valid_and_small() {
        let c = config(64 * 1024);
        assert!(c.max_write_buffer_size > c.write_buffer_size);
        assert!(c.read_buffer_size <= 4096);
        assert_eq!(c.max_message_size, Some(64 * 1024));
    }
}
