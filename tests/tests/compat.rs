//! Forward compatibility of the wire protocol: a frame from a client built against a newer
//! `cim.proto` carries fields this server does not know. Protobuf readers skip unknown field
//! numbers, and JSON text frames skip unknown keys the same way, so the known part is served
//! and nothing the client adds can change who the sender is.
//!
//! The frames here are written byte by byte (prost would drop the unknown fields before they
//! reach the wire), over raw TCP, WebSocket binary and WebSocket text.

use anyhow::Context;
use bytes::{BufMut, BytesMut};
use cim_sdk::{
    pb::{self, frame::Body, ErrorCode, Frame, MessageKind, SendStatus},
    LoginInfo, Transport,
};
use cim_tests::cluster::{Cluster, FRAME_DEADLINE};
use futures_util::{SinkExt, StreamExt};
use prost::encoding::{encode_key, encode_varint, WireType};
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::{tungstenite::Message, MaybeTlsStream, WebSocketStream};

/// A client that writes frame bytes as given, under the SDK.
enum RawClient {
    Tcp(TcpStream, BytesMut),
    Ws(Box<WebSocketStream<MaybeTlsStream<TcpStream>>>),
}

impl RawClient {
    /// Connects to the server `login` names and logs in with its connect token.
    async fn login(login: &LoginInfo, transport: Transport) -> anyhow::Result<Self> {
        let mut raw = match transport {
            Transport::Tcp => Self::Tcp(
                TcpStream::connect(&login.server.tcp_addr).await?,
                BytesMut::new(),
            ),
            _ => {
                let url = format!("ws://{}/ws", login.server.ws_addr);
                Self::Ws(Box::new(tokio_tungstenite::connect_async(url).await?.0))
            }
        };
        let hello = Frame::new(Body::Login(pb::Login {
            token: login.connect_token.clone(),
        }));
        match transport {
            Transport::WsJson => raw.send_text(&serde_json::to_string(&hello)?).await?,
            _ => raw.send_payload(&hello.encode_to_vec()).await?,
        }
        match raw.recv().await?.body {
            Some(Body::LoginResult(r)) => assert_eq!(r.user_id, login.user_id),
            other => anyhow::bail!("expected a login result, got {other:?}"),
        }
        Ok(raw)
    }

    /// Sends `payload` as the bytes of one `Frame`.
    async fn send_payload(&mut self, payload: &[u8]) -> anyhow::Result<()> {
        match self {
            Self::Tcp(s, _) => {
                let mut out = BytesMut::new();
                encode_varint(payload.len() as u64, &mut out);
                out.put_slice(payload);
                s.write_all(&out).await?;
            }
            Self::Ws(ws) => ws.send(Message::binary(payload.to_vec())).await?,
        }
        Ok(())
    }

    async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        match self {
            Self::Tcp(..) => anyhow::bail!("text frames are WebSocket only"),
            Self::Ws(ws) => Ok(ws.send(Message::text(text)).await?),
        }
    }

    /// The next frame (JSON or protobuf, as the server chose).
    async fn recv(&mut self) -> anyhow::Result<Frame> {
        tokio::time::timeout(FRAME_DEADLINE, self.recv_inner())
            .await
            .context("no frame within the deadline")?
    }

    async fn recv_inner(&mut self) -> anyhow::Result<Frame> {
        match self {
            Self::Tcp(s, buf) => loop {
                if let Some(f) = cim_proto::codec::decode_frame(buf, 1 << 20)? {
                    return Ok(f);
                }
                anyhow::ensure!(s.read_buf(buf).await? > 0, "connection closed");
            },
            Self::Ws(ws) => loop {
                match ws.next().await.context("connection closed")?? {
                    Message::Binary(b) => return Ok(Frame::decode(b)?),
                    Message::Text(t) => return Ok(serde_json::from_str(t.as_str())?),
                    _ => continue,
                }
            },
        }
    }

    /// Reads frames until a SendResult for `client_id`.
    async fn send_result(&mut self, client_id: u64) -> anyhow::Result<pb::SendResult> {
        loop {
            if let Some(Body::SendResult(r)) = self.recv().await?.body {
                if r.client_id == client_id {
                    return Ok(r);
                }
            }
        }
    }
}

/// Unknown fields of every wire type, numbered from `first`, each claiming `claimed_user`
/// where a number fits: what a newer schema could carry (varint, 64-bit, length-delimited
/// holding a nested message, 32-bit).
fn unknown_fields(first: u32, claimed_user: u64) -> BytesMut {
    let mut out = BytesMut::new();
    encode_key(first, WireType::Varint, &mut out);
    encode_varint(claimed_user, &mut out);
    encode_key(first + 1, WireType::SixtyFourBit, &mut out);
    out.put_u64_le(claimed_user);
    let nested = pb::Message {
        sender_id: claimed_user,
        sender_name: "mallory".into(),
        ..Default::default()
    }
    .encode_to_vec();
    encode_key(first + 2, WireType::LengthDelimited, &mut out);
    encode_varint(nested.len() as u64, &mut out);
    out.put_slice(&nested);
    encode_key(first + 3, WireType::ThirtyTwoBit, &mut out);
    out.put_u32_le(claimed_user as u32);
    out
}

/// A Frame{send} whose Send and Frame both carry unknown fields before and after the known ones.
fn newer_send_frame(to: u64, body: &str, claimed_user: u64) -> Vec<u8> {
    let mut send = BytesMut::new();
    // Field 9 is the next free number of Send, 20.. further out: both as a newer schema would.
    send.put(unknown_fields(9, claimed_user));
    send.put_slice(
        &pb::Send {
            client_id: 1,
            kind: MessageKind::Private as i32,
            to_user_id: to,
            body: body.into(),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    send.put(unknown_fields(20, claimed_user));

    let mut frame = BytesMut::new();
    frame.put(unknown_fields(30, claimed_user));
    encode_key(5, WireType::LengthDelimited, &mut frame);
    encode_varint(send.len() as u64, &mut frame);
    frame.put(send);
    frame.put(unknown_fields(40, claimed_user));
    frame.to_vec()
}

async fn unknown_binary_fields_are_skipped(transport: Transport) -> anyhow::Result<()> {
    let cluster = Cluster::builder().start().await?;
    let mut bob = cluster.user("bob", Transport::Tcp).await?;
    let mallory = cluster
        .route()
        .register("mallory", "password-mallory")
        .await?;
    let alice = cluster.register_and_login("alice").await?;
    let mut raw = RawClient::login(&alice, transport).await?;

    raw.send_payload(&newer_send_frame(
        bob.id(),
        "from the future",
        mallory.user_id,
    ))
    .await?;
    let r = raw.send_result(1).await?;
    assert_eq!(r.status(), SendStatus::Delivered, "{r:?}");
    let m = bob.next_message().await?;
    assert_eq!(m.body, "from the future");
    assert_eq!(m.id, r.message_id);
    assert_eq!(
        m.sender_id, alice.user_id,
        "the sender is the logged-in user"
    );
    assert_eq!(m.sender_name, "alice");
    assert_eq!(m.receiver_id, bob.id());
    Ok(())
}

#[tokio::test]
async fn unknown_protobuf_fields_inside_send_and_frame_are_skipped_over_tcp() -> anyhow::Result<()>
{
    unknown_binary_fields_are_skipped(Transport::Tcp).await
}

#[tokio::test]
async fn unknown_protobuf_fields_inside_send_and_frame_are_skipped_over_websocket_binary(
) -> anyhow::Result<()> {
    unknown_binary_fields_are_skipped(Transport::WsBinary).await
}

#[tokio::test]
async fn a_json_frame_from_a_newer_schema_is_served_and_a_broken_one_refused() -> anyhow::Result<()>
{
    let cluster = Cluster::builder().servers(1).start().await?;
    let mut bob = cluster.user("bob", Transport::Tcp).await?;
    let mallory = cluster
        .route()
        .register("mallory", "password-mallory")
        .await?;
    let alice = cluster.register_and_login("alice").await?;
    let mut raw = RawClient::login(&alice, Transport::WsJson).await?;

    // Unknown keys inside Send (one claiming another sender), next to it in Frame, and of
    // every JSON type: the known part is delivered, from alice.
    let frame = serde_json::json!({
        "trace": {"id": "abc", "sampled": true},
        "send": {
            "clientId": "1",
            "kind": "MESSAGE_KIND_PRIVATE",
            "toUserId": bob.id().to_string(),
            "body": "newer page",
            "senderId": mallory.user_id.to_string(),
            "sender_name": "mallory",
            "priority": 5,
            "silent": false,
            "attachments": [{"url": "https://example.invalid/a.png", "size": 3}],
            "replyTo": null
        },
        "schemaVersion": 2.5
    });
    raw.send_text(&frame.to_string()).await?;
    let r = raw.send_result(1).await?;
    assert_eq!(r.status(), SendStatus::Delivered, "{r:?}");
    let m = bob.next_message().await?;
    assert_eq!(m.body, "newer page");
    assert_eq!(m.sender_id, alice.user_id);
    assert_eq!(m.sender_name, "alice");

    // A body from the future alone: UNSUPPORTED_FRAME, and the connection stays open.
    raw.send_text(r#"{"hologram":{"depth":3}}"#).await?;
    match raw.recv().await?.body {
        Some(Body::Error(e)) => assert_eq!(e.code(), ErrorCode::UnsupportedFrame),
        other => panic!("expected UNSUPPORTED_FRAME, got {other:?}"),
    }
    raw.send_text(r#"{"ping":{"nonce":"9","hops":1}}"#).await?;
    match raw.recv().await?.body {
        Some(Body::Pong(p)) => assert_eq!(p.nonce, 9),
        other => panic!("expected a pong, got {other:?}"),
    }

    // A known key with the wrong type is still refused: BAD_FRAME, then the close.
    raw.send_text(r#"{"send":{"clientId":"2","toUserId":{"id":1},"body":"x"}}"#)
        .await?;
    match raw.recv().await?.body {
        Some(Body::Error(e)) => assert_eq!(e.code(), ErrorCode::BadFrame, "{e:?}"),
        other => panic!("expected BAD_FRAME, got {other:?}"),
    }
    assert!(raw.recv().await.is_err(), "the connection is closed");
    Ok(())
}
