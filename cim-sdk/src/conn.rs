//! One client connection to a connection server, over any of the three encodings the server
//! speaks: TCP with delimited protobuf, WebSocket binary (protobuf), WebSocket text (proto3
//! JSON), each plain or over TLS ([`Connection::connect_tls`]: the server's `tls_addr` for
//! TCP, `wss_addr` for WebSocket). Higher layers (reconnect, terminal client) see only
//! [`Frame`]s.

use crate::pb::{frame::Body, Ack, Frame, Login, LoginResult, Message, Push};
use crate::tls::{ClientTls, ClientTlsStream};
use cim_proto::codec::{CodecError, FrameCodec, DEFAULT_MAX_FRAME_LEN, MAX_MESSAGE_LEN};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use std::{net::IpAddr, time::Duration};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::{
    tungstenite::{protocol::WebSocketConfig, Message as WsMessage},
    WebSocketStream,
};
use tokio_util::{codec::Framed, either::Either};

/// A plain or a TLS byte stream (the TLS state boxed: a plain connection stays small).
type Stream = Either<TcpStream, Box<ClientTlsStream<TcpStream>>>;

/// Most message ids one `Ack` frame may carry (the server refuses longer acks).
pub const MAX_ACK_IDS: usize = 1024;

/// The ids a client acknowledges after taking the messages of `push`: every stored message
/// (`seq != 0`: private messages and receipts), including ones it already had (a replay
/// after a reconnect repeats them, and only an ack takes them out of the inbox). Group and
/// system messages are not stored and need no ack.
pub fn ack_ids(push: &Push) -> Vec<String> {
    stored_ids(&push.messages)
}

/// The group positions a push lets the client ack: per stored group (GROUP_CHAT and
/// GROUP_EVENT messages), the highest `log_seq` in it. Acking a position says "everything up
/// to here was received"; a login catches up from the last acked position.
pub fn group_positions(push: &Push) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for m in &push.messages {
        if m.group_id == 0 || m.log_seq == 0 {
            continue;
        }
        match out.iter_mut().find(|(g, _)| *g == m.group_id) {
            Some(at) => at.1 = at.1.max(m.log_seq),
            None => out.push((m.group_id, m.log_seq)),
        }
    }
    out
}

/// [`ack_ids`] for a slice of messages.
pub fn stored_ids(messages: &[Message]) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m.seq != 0 && !m.id.is_empty())
        .map(|m| m.id.clone())
        .collect()
}

/// `Ack` frames for `ids`, at most [`MAX_ACK_IDS`] each (none for no ids).
pub fn ack_frames(ids: Vec<String>) -> Vec<Frame> {
    if ids.len() <= MAX_ACK_IDS {
        if ids.is_empty() {
            return Vec::new();
        }
        return vec![Frame::new(Body::Ack(Ack {
            message_ids: ids,
            groups: Vec::new(),
        }))];
    }
    ids.chunks(MAX_ACK_IDS)
        .map(|chunk| {
            Frame::new(Body::Ack(Ack {
                message_ids: chunk.to_vec(),
                groups: Vec::new(),
            }))
        })
        .collect()
}

/// Which transport and encoding to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP, varint32-delimited protobuf.
    Tcp,
    /// WebSocket, binary messages of protobuf.
    WsBinary,
    /// WebSocket, text messages of proto3 JSON.
    WsJson,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connect to {addr} failed: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} failed: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("frame: {0}")]
    Codec(#[from] CodecError),
    #[error("undecodable frame from server: {0}")]
    Decode(String),
    #[error("timed out waiting for the server")]
    Timeout,
    #[error("connection closed by the server")]
    Closed,
    #[error("login refused: {code:?}: {message}")]
    LoginRefused {
        code: Option<crate::pb::ErrorCode>,
        message: String,
    },
}

enum Inner {
    Tcp(Framed<Stream, FrameCodec>),
    Ws {
        stream: Box<WebSocketStream<Stream>>,
        json: bool,
    },
}

/// How to open a connection, beyond the address and the transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Local IP to bind before connecting (the kernel picks the port). Each local IP has its
    /// own ephemeral ports, so a load generator cycling through several loopback IPs can open
    /// more connections to one server than one IP's port range allows. `None`: the kernel
    /// picks the source address too.
    pub local_ip: Option<IpAddr>,
    /// Initial read and write buffer size in bytes (buffers still grow for larger frames).
    /// `None`: the libraries' defaults (8 KiB for TCP, 128 KiB for WebSocket reads), which
    /// suit one busy connection; a process holding thousands of mostly idle connections
    /// wants a few hundred bytes.
    pub buffer_size: Option<usize>,
}

/// Largest frame the SDK reads over TCP, whatever the server announced: one message of the
/// largest size a route accepts ([`MAX_MESSAGE_LEN`]) with its envelope. A
/// server pushes a message over its merge size alone, however large (cim-server `chunks`),
/// so a stored message stays readable even where the route accepts larger messages than the
/// server reads; a lower limit would make the client reconnect, get the same replay and
/// never ack it.
pub const MIN_READ_FRAME_LEN: usize = MAX_MESSAGE_LEN + 64 * 1024;

/// The TCP codec for a server announcing `max_frame_len` (0: not yet known, or a server that
/// does not say): writes stay within what the server reads, reads within what it can send.
fn tcp_codec(max_frame_len: u32) -> FrameCodec {
    let write = match usize::try_from(max_frame_len) {
        Ok(0) | Err(_) => DEFAULT_MAX_FRAME_LEN,
        Ok(n) => n,
    };
    FrameCodec::with_limits(write.max(MIN_READ_FRAME_LEN), write)
}

/// An open connection (not yet logged in until [`Connection::login`]).
pub struct Connection {
    inner: Inner,
}

impl Connection {
    /// Opens a connection to `addr` (`host:port`, the TCP or WS address the route assigned).
    pub async fn connect(addr: &str, transport: Transport) -> Result<Self, ConnError> {
        Self::connect_with(addr, transport, ConnectOptions::default()).await
    }

    /// [`Connection::connect`] with a local IP to bind and buffer sizes.
    pub async fn connect_with(
        addr: &str,
        transport: Transport,
        options: ConnectOptions,
    ) -> Result<Self, ConnError> {
        Self::open(addr, transport, options, None).await
    }

    /// [`Connection::connect_with`] over TLS: `addr` is the server's `tls_addr` (TCP) or
    /// `wss_addr` (WebSocket, `wss://{addr}/ws`); its host is checked against the
    /// server's certificate with what `tls` trusts.
    pub async fn connect_tls(
        addr: &str,
        transport: Transport,
        options: ConnectOptions,
        tls: &ClientTls,
    ) -> Result<Self, ConnError> {
        Self::open(addr, transport, options, Some(tls)).await
    }

    async fn open(
        addr: &str,
        transport: Transport,
        options: ConnectOptions,
        tls: Option<&ClientTls>,
    ) -> Result<Self, ConnError> {
        let connect_error = |source| ConnError::Connect {
            addr: addr.to_string(),
            source,
        };
        let stream = match options.local_ip {
            None => TcpStream::connect(addr).await.map_err(connect_error)?,
            Some(ip) => {
                let remote = tokio::net::lookup_host(addr)
                    .await
                    .map_err(connect_error)?
                    .find(|r| r.is_ipv4() == ip.is_ipv4())
                    .ok_or_else(|| {
                        connect_error(std::io::Error::new(
                            std::io::ErrorKind::AddrNotAvailable,
                            format!("no address of the family of {ip}"),
                        ))
                    })?;
                let socket = if ip.is_ipv4() {
                    TcpSocket::new_v4()
                } else {
                    TcpSocket::new_v6()
                }
                .map_err(connect_error)?;
                socket
                    .bind(std::net::SocketAddr::new(ip, 0))
                    .map_err(connect_error)?;
                socket.connect(remote).await.map_err(connect_error)?
            }
        };
        stream.set_nodelay(true).ok();
        let stream: Stream = match tls {
            None => Either::Left(stream),
            Some(tls) => Either::Right(Box::new(tls.connect(addr, stream).await.map_err(
                |source| ConnError::Tls {
                    addr: addr.to_string(),
                    source,
                },
            )?)),
        };
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        let inner = match transport {
            Transport::Tcp => Inner::Tcp(match options.buffer_size {
                Some(size) => Framed::with_capacity(stream, tcp_codec(0), size),
                None => Framed::new(stream, tcp_codec(0)),
            }),
            Transport::WsBinary | Transport::WsJson => {
                let config = options.buffer_size.map(|size| {
                    WebSocketConfig::default()
                        .read_buffer_size(size)
                        .write_buffer_size(size)
                });
                let (stream, _) = tokio_tungstenite::client_async_with_config(
                    format!("{scheme}://{addr}/ws"),
                    stream,
                    config,
                )
                .await?;
                Inner::Ws {
                    stream: Box::new(stream),
                    json: transport == Transport::WsJson,
                }
            }
        };
        Ok(Self { inner })
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ConnError> {
        self.feed(frame).await?;
        self.flush().await
    }

    /// Queues one frame without flushing it, so several frames can go out in one write
    /// ([`Connection::flush`] sends them).
    pub async fn feed(&mut self, frame: &Frame) -> Result<(), ConnError> {
        match &mut self.inner {
            Inner::Tcp(framed) => framed.feed(frame).await?,
            Inner::Ws { stream, json } => {
                let msg = if *json {
                    let text = serde_json::to_string(frame)
                        .map_err(|e| ConnError::Decode(e.to_string()))?;
                    WsMessage::text(text)
                } else {
                    WsMessage::binary(frame.encode_to_vec())
                };
                stream.feed(msg).await?;
            }
        }
        Ok(())
    }

    /// Writes every frame queued by [`Connection::feed`].
    pub async fn flush(&mut self) -> Result<(), ConnError> {
        match &mut self.inner {
            Inner::Tcp(framed) => SinkExt::<&Frame>::flush(framed).await?,
            Inner::Ws { stream, .. } => stream.flush().await?,
        }
        Ok(())
    }

    /// Acknowledges the messages `ids` (see [`ack_ids`]): one `Ack` frame per
    /// [`MAX_ACK_IDS`] ids, written together. No ids, no write.
    pub async fn ack(&mut self, ids: Vec<String>) -> Result<(), ConnError> {
        let frames = ack_frames(ids);
        if frames.is_empty() {
            return Ok(());
        }
        for frame in &frames {
            self.feed(frame).await?;
        }
        self.flush().await
    }

    /// [`Connection::ack`] with group positions too (`(group, seq)`, at most
    /// [`MAX_ACK_IDS`] per frame): one write.
    pub async fn ack_all(
        &mut self,
        ids: Vec<String>,
        groups: Vec<(u64, u64)>,
    ) -> Result<(), ConnError> {
        let mut frames = ack_frames(ids);
        for chunk in groups.chunks(MAX_ACK_IDS) {
            frames.push(Frame::new(Body::Ack(Ack {
                message_ids: Vec::new(),
                groups: chunk
                    .iter()
                    .map(|&(group_id, log_seq)| crate::pb::GroupPosition { group_id, log_seq })
                    .collect(),
            })));
        }
        if frames.is_empty() {
            return Ok(());
        }
        for frame in &frames {
            self.feed(frame).await?;
        }
        self.flush().await
    }

    /// Next frame; `Ok(None)` when the server closed the connection cleanly.
    pub async fn recv(&mut self) -> Result<Option<Frame>, ConnError> {
        match &mut self.inner {
            Inner::Tcp(framed) => framed.next().await.transpose().map_err(Into::into),
            Inner::Ws { stream, .. } => loop {
                let Some(msg) = stream.next().await else {
                    return Ok(None);
                };
                match msg {
                    Ok(WsMessage::Binary(b)) => {
                        return Frame::decode(b)
                            .map(Some)
                            .map_err(|e| ConnError::Decode(e.to_string()))
                    }
                    Ok(WsMessage::Text(t)) => {
                        return serde_json::from_str(t.as_str())
                            .map(Some)
                            .map_err(|e| ConnError::Decode(e.to_string()))
                    }
                    Ok(WsMessage::Close(_)) => return Ok(None),
                    Ok(_) => continue, // ping/pong handled by tungstenite
                    Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed) => {
                        return Ok(None)
                    }
                    Err(e) => return Err(e.into()),
                }
            },
        }
    }

    /// Next frame within `deadline`.
    pub async fn recv_timeout(&mut self, deadline: Duration) -> Result<Option<Frame>, ConnError> {
        tokio::time::timeout(deadline, self.recv())
            .await
            .map_err(|_| ConnError::Timeout)?
    }

    /// Sends the login frame and waits for the result (deadline 10 s).
    pub async fn login(&mut self, connect_token: &str) -> Result<LoginResult, ConnError> {
        self.send(&Frame::new(Body::Login(Login {
            token: connect_token.to_string(),
        })))
        .await?;
        match self.recv_timeout(Duration::from_secs(10)).await? {
            Some(Frame {
                body: Some(Body::LoginResult(r)),
            }) => {
                if let Inner::Tcp(framed) = &mut self.inner {
                    *framed.codec_mut() = tcp_codec(r.max_frame_len);
                }
                Ok(r)
            }
            Some(Frame {
                body: Some(Body::Error(e)),
            }) => Err(ConnError::LoginRefused {
                code: crate::pb::ErrorCode::try_from(e.code).ok(),
                message: e.message,
            }),
            Some(other) => Err(ConnError::Decode(format!(
                "expected login_result, got {}",
                other.kind_name()
            ))),
            None => Err(ConnError::Closed),
        }
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        match &mut self.inner {
            Inner::Tcp(framed) => {
                let _ = SinkExt::<&Frame>::close(framed).await;
            }
            Inner::Ws { stream, .. } => {
                let _ = WebSocketStream::close(&mut **stream, None).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(frames: &[Frame]) -> Vec<usize> {
        frames
            .iter()
            .map(|f| match &f.body {
                Some(Body::Ack(a)) => a.message_ids.len(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn the_tcp_codec_writes_what_the_server_reads_and_reads_what_it_sends() {
        let limits = |announced: u32| {
            let c = tcp_codec(announced);
            (c.max_read(), c.max_write())
        };
        // Before login, or a server that does not say: the protocol's default for writes.
        assert_eq!(limits(0), (MIN_READ_FRAME_LEN, DEFAULT_MAX_FRAME_LEN));
        assert_eq!(limits(512 * 1024), (MIN_READ_FRAME_LEN, 512 * 1024));
        assert_eq!(limits(4096), (MIN_READ_FRAME_LEN, 4096));
        let large = 16 * 1024 * 1024;
        assert_eq!(limits(large as u32), (large, large));
    }

    #[test]
    fn acks_are_split_at_the_limit_per_frame() {
        assert!(ack_frames(Vec::new()).is_empty());
        let n = |count: usize| (0..count).map(|i| i.to_string()).collect::<Vec<_>>();
        assert_eq!(ids(&ack_frames(n(1))), [1]);
        assert_eq!(ids(&ack_frames(n(MAX_ACK_IDS))), [MAX_ACK_IDS]);
        assert_eq!(
            ids(&ack_frames(n(2 * MAX_ACK_IDS + 1))),
            [MAX_ACK_IDS, MAX_ACK_IDS, 1]
        );
        // In order, nothing lost.
        let all: Vec<String> = ack_frames(n(3000))
            .into_iter()
            .flat_map(|f| match f.body {
                Some(Body::Ack(a)) => a.message_ids,
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(all, n(3000));
    }

    #[test]
    fn only_stored_messages_are_acked() {
        let m = |id: &str, seq| Message {
            id: id.into(),
            seq,
            ..Default::default()
        };
        let push = Push {
            messages: vec![m("a", 3), m("group", 0), m("b", 4), m("", 5)],
            replay: false,
        };
        assert_eq!(ack_ids(&push), ["a", "b"]);
    }
}
