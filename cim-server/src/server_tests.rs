//! Whole-server tests over real loopback sockets, with the in-memory backends (the store
//! behind [`crate::testing::TestStore`]) and a fake route played by an axum app: TCP and WebSocket clients, the
//! internal API, forwarding with retries, registration and graceful shutdown.

use crate::{
    pb::{
        cluster::{
            ConnectedUser, Delivery, ForwardRequest, ForwardResponse, KickRequest, KickResponse,
            PresenceRequest, PresenceResponse, PushRequest, PushResponse,
        },
        frame::Body,
        ErrorCode, Frame, Kick, KickReason, Message as ChatMessage, Ping, Pong, Send, SendResult,
        SendStatus,
    },
    start,
    testing::{
        assert_closed, login_frame, next, test_config, token, TestStore, TestStoreExt, SECRET,
    },
    Listeners, ServerConfig, ServerHandle,
};
use axum::{routing::post, Router};
use cim_common::{
    backend::Backends,
    cluster::{ClusterClient, ClusterError, Protobuf},
    registry::{MemoryRegistry, Registration, Registry, ServiceInfo, ServiceKind},
};
use cim_proto::codec::FrameCodec;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_util::codec::Framed;

struct Cluster {
    server: ServerHandle,
    store: Arc<TestStore>,
    registry: MemoryRegistry,
    /// Routes played by tests stay registered while these are held.
    routes: Mutex<Vec<Box<dyn Registration>>>,
    internal: ClusterClient,
}

async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

async fn start_server(config: ServerConfig) -> Cluster {
    let listeners = Listeners {
        tcp: listener().await,
        ws: listener().await,
        tls: None,
        wss: None,
        internal: listener().await,
    };
    start_server_on(config, listeners).await
}

async fn start_server_on(config: ServerConfig, listeners: Listeners) -> Cluster {
    let store = Arc::new(TestStore::default());
    let registry = MemoryRegistry::new();
    let backends = Backends::new(store.clone(), Arc::new(registry.clone()));
    let server = start(config, listeners, backends).await.unwrap();
    Cluster {
        server,
        store,
        registry,
        routes: Mutex::default(),
        internal: ClusterClient::new(SECRET, Duration::from_secs(5)),
    }
}

impl Cluster {
    async fn tcp_login(&self, user_id: u64) -> Framed<TcpStream, FrameCodec> {
        let session = format!("s{user_id}");
        self.store.claim(user_id, &session).await;
        let stream = TcpStream::connect(self.server.tcp_addr()).await.unwrap();
        let mut client = Framed::new(stream, FrameCodec::default());
        client
            .send(login_frame(token(user_id, &session, self.server.id())))
            .await
            .unwrap();
        match next(&mut client).await.body {
            Some(Body::LoginResult(r)) => assert_eq!(r.user_id, user_id),
            other => panic!("expected LoginResult, got {other:?}"),
        }
        client
    }

    async fn push(&self, recipients: Vec<u64>, body: &str) -> PushResponse {
        self.push_delivery(Delivery {
            message: Some(ChatMessage {
                id: "m1".into(),
                body: body.into(),
                ..Default::default()
            }),
            recipients,
            everyone: false,
            ..Default::default()
        })
        .await
    }

    async fn push_delivery(&self, delivery: Delivery) -> PushResponse {
        let request = PushRequest {
            deliveries: vec![delivery],
        };
        self.internal
            .call(
                &self.server.internal_addr().to_string(),
                "/internal/push",
                &request,
            )
            .await
            .unwrap()
    }

    /// Plays a route at `addr` (registered as `id`).
    async fn add_route(&self, id: &str, addr: String) {
        let info = ServiceInfo {
            id: id.into(),
            internal_addr: addr,
            ..Default::default()
        };
        let registration = self
            .registry
            .register(ServiceKind::Route, &info, Duration::from_secs(10))
            .await
            .unwrap();
        self.routes.lock().unwrap().push(registration);
    }
}

/// A route that answers every forwarded send as delivered to one connection, counting calls.
async fn fake_route(calls: Arc<AtomicUsize>) -> String {
    let app = Router::new().route(
        "/internal/forward",
        post(move |Protobuf(req): Protobuf<ForwardRequest>| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let results = req
                    .items
                    .iter()
                    .map(|item| SendResult {
                        client_id: item.send.as_ref().map_or(0, |s| s.client_id),
                        status: SendStatus::Delivered as i32,
                        // Echo the authenticated sender so the test can check it.
                        message_id: format!("{}:{}", item.sender_id, item.sender_name),
                        delivered: 1,
                        ..Default::default()
                    })
                    .collect();
                Protobuf(ForwardResponse {
                    results,
                    ..Default::default()
                })
            }
        }),
    );
    let listener = listener().await;
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// An address where nothing listens (connections are refused).
async fn dead_addr() -> String {
    let l = listener().await;
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    addr
}

fn send(client_id: u64) -> Frame {
    Frame::new(Body::Send(Send {
        client_id,
        to_user_id: 2,
        body: "hello".into(),
        ..Default::default()
    }))
}

fn send_result(frame: Frame) -> SendResult {
    match frame.body {
        Some(Body::SendResult(r)) => r,
        other => panic!("expected SendResult, got {other:?}"),
    }
}

#[tokio::test]
async fn registers_serves_and_shuts_down() {
    let c = start_server(test_config()).await;
    let servers = c.registry.members(ServiceKind::Server);
    assert_eq!(servers.len(), 1);
    assert_eq!(servers[0].id, c.server.id());
    assert_eq!(servers[0].tcp_addr, c.server.tcp_addr().to_string());
    assert_eq!(servers[0].ws_addr, c.server.ws_addr().to_string());
    assert_eq!(
        servers[0].internal_addr,
        c.server.internal_addr().to_string()
    );

    let mut client = c.tcp_login(1).await;
    assert_eq!(c.server.connection_count(), 1);
    client
        .send(Frame::new(Body::Ping(Ping { nonce: 3 })))
        .await
        .unwrap();
    assert_eq!(
        next(&mut client).await,
        Frame::new(Body::Pong(Pong { nonce: 3 }))
    );

    let registry = c.registry.clone();
    let store = c.store.clone();
    let shutdown = tokio::spawn(c.server.shutdown());
    match next(&mut client).await.body {
        Some(Body::Kick(Kick { reason, .. })) => {
            assert_eq!(reason, KickReason::ServerShutdown as i32)
        }
        other => panic!("expected a shutdown Kick, got {other:?}"),
    }
    assert!(
        registry.members(ServiceKind::Server).is_empty(),
        "left the registry before kicking anyone"
    );
    assert_closed(&mut client).await;
    // The server waits (briefly) for clients to close after the kick.
    drop(client);
    shutdown.await.unwrap();
    assert_eq!(store.slot(1), None, "detached during shutdown");
}

#[tokio::test]
async fn push_reaches_connected_users_only() {
    let c = start_server(test_config()).await;
    let mut alice = c.tcp_login(1).await;
    let mut bob = c.tcp_login(2).await;
    let response = c.push(vec![1, 2, 3], "hi all").await;
    assert_eq!(response.results.len(), 1);
    assert_eq!(response.results[0].delivered, vec![1, 2]);
    for client in [&mut alice, &mut bob] {
        match next(client).await.body {
            Some(Body::Push(push)) => assert_eq!(push.messages[0].body, "hi all"),
            other => panic!("expected Push, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn push_to_everyone_reaches_all_but_the_sender() {
    let c = start_server(test_config()).await;
    let mut alice = c.tcp_login(1).await;
    let mut bob = c.tcp_login(2).await;
    let mut carol = c.tcp_login(3).await;
    let response = c
        .push_delivery(Delivery {
            message: Some(ChatMessage {
                id: "g1".into(),
                sender_id: 1,
                body: "hello everyone".into(),
                ..Default::default()
            }),
            recipients: Vec::new(),
            everyone: true,
            ..Default::default()
        })
        .await;
    assert_eq!(response.results.len(), 1);
    let result = &response.results[0];
    assert_eq!((result.count, result.delivered.len()), (2, 0), "{result:?}");
    for client in [&mut bob, &mut carol] {
        match next(client).await.body {
            Some(Body::Push(push)) => assert_eq!(push.messages[0].body, "hello everyone"),
            other => panic!("expected Push, got {other:?}"),
        }
    }
    // Alice's next frame is a later push to her alone: the broadcast skipped its sender.
    assert_eq!(c.push(vec![1], "just alice").await.results[0].count, 1);
    match next(&mut alice).await.body {
        Some(Body::Push(push)) => assert_eq!(push.messages[0].body, "just alice"),
        other => panic!("expected Push, got {other:?}"),
    }
}

#[tokio::test]
async fn internal_api_requires_the_secret() {
    let c = start_server(test_config()).await;
    let intruder = ClusterClient::new("wrong-secret-0123456789", Duration::from_secs(5));
    let err = intruder
        .call::<_, PushResponse>(
            &c.server.internal_addr().to_string(),
            "/internal/push",
            &PushRequest::default(),
        )
        .await
        .unwrap_err();
    match err {
        ClusterError::Status { status, .. } => assert_eq!(status.as_u16(), 401),
        other => panic!("expected 401, got {other}"),
    }
    // Health needs no secret.
    let health: serde_json::Value =
        reqwest::get(format!("http://{}/healthz", c.server.internal_addr()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["id"], c.server.id());
    assert_eq!(health["connections"], 0);
    assert_eq!(health["pid"], std::process::id());
    assert!(health["rss_bytes"].as_u64().unwrap() > 0, "{health}");
    assert!(health["cpu_ms"].is_u64(), "{health}");
}

#[tokio::test]
async fn kick_by_user_and_session() {
    let c = start_server(test_config()).await;
    let mut alice = c.tcp_login(1).await;
    let addr = c.server.internal_addr().to_string();
    let kick = |session: &str| KickRequest {
        user_ids: vec![1, 9],
        kick: Some(Kick {
            reason: KickReason::LoggedOut as i32,
            message: "logged out".into(),
        }),
        session: session.into(),
    };
    // Presence names the connected users with their sessions (9 is not connected).
    let presence: PresenceResponse = c
        .internal
        .call(
            &addr,
            "/internal/presence",
            &PresenceRequest {
                user_ids: vec![1, 9],
            },
        )
        .await
        .unwrap();
    assert_eq!(
        presence.connected,
        vec![ConnectedUser {
            user_id: 1,
            session: "s1".into()
        }]
    );
    // Another session of the same user: nothing happens.
    let response: KickResponse = c
        .internal
        .call(&addr, "/internal/kick", &kick("other"))
        .await
        .unwrap();
    assert!(response.kicked.is_empty());
    let response: KickResponse = c
        .internal
        .call(&addr, "/internal/kick", &kick("s1"))
        .await
        .unwrap();
    assert_eq!(response.kicked, vec![1]);
    match next(&mut alice).await.body {
        Some(Body::Kick(k)) => assert_eq!(k.reason, KickReason::LoggedOut as i32),
        other => panic!("expected Kick, got {other:?}"),
    }
    assert_closed(&mut alice).await;
}

#[tokio::test]
async fn sends_go_to_a_route_and_results_come_back() {
    let c = start_server(test_config()).await;
    let calls = Arc::new(AtomicUsize::new(0));
    c.add_route("route-a", fake_route(calls.clone()).await)
        .await;
    let mut alice = c.tcp_login(1).await;
    alice.send(send(10)).await.unwrap();
    let result = send_result(next(&mut alice).await);
    assert_eq!(result.client_id, 10);
    assert_eq!(result.status, SendStatus::Delivered as i32);
    assert_eq!(
        result.message_id, "1:user1",
        "sender is the connection's user"
    );
    // A burst is answered completely (batched into fewer calls than sends).
    for id in 0..50 {
        alice.feed(send(100 + id)).await.unwrap();
    }
    SinkExt::<Frame>::flush(&mut alice).await.unwrap();
    let mut ids: Vec<u64> = Vec::new();
    for _ in 0..50 {
        ids.push(send_result(next(&mut alice).await).client_id);
    }
    ids.sort();
    assert_eq!(ids, (100..150).collect::<Vec<_>>());
    assert!(calls.load(Ordering::SeqCst) <= 51);
}

#[tokio::test]
async fn a_refusing_route_is_skipped() {
    let c = start_server(test_config()).await;
    let calls = Arc::new(AtomicUsize::new(0));
    // Sorted by id, the dead route comes first in the round-robin.
    c.add_route("route-a", dead_addr().await).await;
    c.add_route("route-b", fake_route(calls.clone()).await)
        .await;
    let mut alice = c.tcp_login(1).await;
    for id in 0..4 {
        alice.send(send(id)).await.unwrap();
        let result = send_result(next(&mut alice).await);
        assert_eq!(result.status, SendStatus::Delivered as i32, "{result:?}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn no_route_means_unavailable() {
    let c = start_server(test_config()).await;
    let mut alice = c.tcp_login(1).await;
    alice.send(send(5)).await.unwrap();
    let result = send_result(next(&mut alice).await);
    assert_eq!(result.status, SendStatus::Failed as i32);
    assert_eq!(result.error.unwrap().code(), ErrorCode::Unavailable);
    // Only dead routes: the same.
    c.add_route("route-a", dead_addr().await).await;
    alice.send(send(6)).await.unwrap();
    let result = send_result(next(&mut alice).await);
    assert_eq!(result.error.unwrap().code(), ErrorCode::Unavailable);
}

async fn ws_connect(
    c: &Cluster,
    path: &str,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
    tungstenite::Error,
> {
    let url = format!("ws://{}{path}", c.server.ws_addr());
    tokio_tungstenite::connect_async(url)
        .await
        .map(|(ws, _)| ws)
}

#[tokio::test]
async fn websocket_binary_and_json() {
    let c = start_server(test_config()).await;
    c.store.claim(1, "s1").await;
    let mut ws = ws_connect(&c, "/ws").await.unwrap();
    let login = login_frame(token(1, "s1", c.server.id()));
    ws.send(WsMessage::Binary(login.encode_to_vec().into()))
        .await
        .unwrap();
    match ws.next().await {
        Some(Ok(WsMessage::Binary(bytes))) => match Frame::decode(bytes).unwrap().body {
            Some(Body::LoginResult(r)) => assert_eq!(r.user_id, 1),
            other => panic!("expected LoginResult, got {other:?}"),
        },
        other => panic!("expected a binary message, got {other:?}"),
    }
    // The client switches to JSON: answers follow.
    ws.send(WsMessage::text(r#"{"ping":{"nonce":"9"}}"#))
        .await
        .unwrap();
    match ws.next().await {
        Some(Ok(WsMessage::Text(text))) => {
            let frame: Frame = serde_json::from_str(text.as_str()).unwrap();
            assert_eq!(frame, Frame::new(Body::Pong(Pong { nonce: 9 })));
        }
        other => panic!("expected a text message, got {other:?}"),
    }
    // Pushes too, and unknown bodies get UNSUPPORTED_FRAME with the connection kept.
    assert_eq!(
        c.push(vec![1], "json push").await.results[0].delivered,
        vec![1]
    );
    ws.send(WsMessage::text(r#"{"teleport":{}}"#))
        .await
        .unwrap();
    let mut texts = Vec::new();
    for _ in 0..2 {
        match ws.next().await {
            Some(Ok(WsMessage::Text(text))) => texts.push(text.as_str().to_string()),
            other => panic!("expected a text message, got {other:?}"),
        }
    }
    assert!(texts[0].contains("json push"), "{texts:?}");
    assert!(
        texts[1].contains("ERROR_CODE_UNSUPPORTED_FRAME"),
        "{texts:?}"
    );
    // Garbage JSON closes with BAD_FRAME.
    ws.send(WsMessage::text("not json")).await.unwrap();
    match ws.next().await {
        Some(Ok(WsMessage::Text(text))) => {
            assert!(text.as_str().contains("ERROR_CODE_BAD_FRAME"), "{text}")
        }
        other => panic!("expected a text message, got {other:?}"),
    }
    loop {
        match ws.next().await {
            Some(Ok(WsMessage::Close(_))) => continue,
            None | Some(Err(_)) => break,
            Some(Ok(other)) => panic!("expected the close, got {other:?}"),
        }
    }
    assert_eq!(c.store.slot(1), None, "detached");
}

#[tokio::test]
async fn websocket_oversize_message_is_refused() {
    let c = start_server(ServerConfig {
        max_frame_len: 2048,
        ..test_config()
    })
    .await;
    let mut ws = ws_connect(&c, "/ws").await.unwrap();
    ws.send(WsMessage::Binary(vec![0u8; 4096].into()))
        .await
        .unwrap();
    match ws.next().await {
        Some(Ok(WsMessage::Binary(bytes))) => match Frame::decode(bytes).unwrap().body {
            Some(Body::Error(e)) => assert_eq!(e.code(), ErrorCode::FrameTooLarge),
            other => panic!("expected Error, got {other:?}"),
        },
        other => panic!("expected a binary message, got {other:?}"),
    }
    // Then a Close that says why: 1009 (message too big) and the reason, not 1005 (none).
    match ws.next().await {
        Some(Ok(WsMessage::Close(Some(close)))) => {
            assert_eq!(u16::from(close.code), 1009);
            assert_eq!(close.reason.as_str(), crate::ws::TOO_LARGE_REASON);
        }
        other => panic!("expected a Close with code 1009, got {other:?}"),
    }
}

#[tokio::test]
async fn websocket_other_paths_are_not_found() {
    let c = start_server(test_config()).await;
    match ws_connect(&c, "/chat").await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 404),
        other => panic!("expected 404, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn dropping_the_handle_stops_the_server() {
    let c = start_server(test_config()).await;
    let mut alice = c.tcp_login(1).await;
    drop(c.server);
    match next(&mut alice).await.body {
        Some(Body::Kick(k)) => assert_eq!(k.reason, KickReason::ServerShutdown as i32),
        other => panic!("expected Kick, got {other:?}"),
    }
}

/// Attempts of the tests below: the reset they guard against depended on timing (how much of
/// the message was in flight when the server closed).
const STILL_WRITING_ATTEMPTS: usize = 20;
/// An oversized message as a client writes it in one go: far over the 64 KiB default limit.
const STILL_WRITING_LEN: usize = 2 << 20;

/// Socket buffers of the tests below, on both ends: as on a real network, much less than the
/// message is in flight at once (loopback's autotuned buffers would take all of 2 MiB before
/// the server even reads the header, hiding the failure).
const STILL_WRITING_BUFFER: u32 = 64 * 1024;

/// A listener whose connections have small receive buffers.
fn small_buffer_listener() -> TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(STILL_WRITING_BUFFER).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    socket.listen(64).unwrap()
}

/// A server whose client listeners have small receive buffers.
async fn start_small_buffer_server() -> Cluster {
    let listeners = Listeners {
        tcp: small_buffer_listener(),
        ws: small_buffer_listener(),
        tls: None,
        wss: None,
        internal: listener().await,
    };
    start_server_on(test_config(), listeners).await
}

/// A connection to `addr` with a small send buffer.
async fn small_buffer_connect(addr: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(STILL_WRITING_BUFFER).unwrap();
    socket.connect(addr).await.unwrap()
}

/// A client still writing a message over the limit when the server refuses it reads why: the
/// Close with 1009 and the reason, every time. Before the server drained the rest of the
/// message, it closed the socket with the message's tail unread, the kernel reset the
/// connection, and the client's write failed (connection reset) before it read anything.
#[tokio::test]
async fn websocket_client_still_writing_an_oversized_message_reads_the_1009_close() {
    let c = start_small_buffer_server().await;
    let mut failed = Vec::new();
    for attempt in 0..STILL_WRITING_ATTEMPTS {
        let stream = small_buffer_connect(c.server.ws_addr()).await;
        let url = format!("ws://{}/ws", c.server.ws_addr());
        let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
        let written = ws
            .send(WsMessage::Binary(vec![7u8; STILL_WRITING_LEN].into()))
            .await;
        let mut read = Vec::new();
        let close = loop {
            match ws.next().await {
                Some(Ok(WsMessage::Close(close))) => break close,
                Some(Ok(other)) => read.push(format!("{other:?}")),
                Some(Err(e)) => {
                    read.push(format!("error {e}"));
                    break None;
                }
                None => break None,
            }
        };
        // tungstenite answers the Close on the next read, then waits for the server to close
        // the connection: it does so on our Close, well before its own bound.
        let closed = tokio::time::timeout(crate::tcp::OVERSIZED_LINGER / 2, async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
        if !(written.is_ok()
            && close.as_ref().is_some_and(|close| {
                u16::from(close.code) == 1009
                    && close.reason.as_str() == crate::ws::TOO_LARGE_REASON
            })
            && closed.is_ok())
        {
            failed.push(format!(
                "attempt {attempt}: write {written:?}, read {read:?} then close {close:?}, \
                 connection closed after our Close: {}",
                closed.is_ok()
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {STILL_WRITING_ATTEMPTS} attempts failed: {failed:#?}",
        failed.len()
    );
}

/// The same over TCP: a client still writing a frame over the limit reads the
/// FRAME_TOO_LARGE error frame, then the end of the stream, every time.
#[tokio::test]
async fn tcp_client_still_writing_an_oversized_frame_reads_the_error() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = start_small_buffer_server().await;
    let mut frame = bytes::BytesMut::new();
    cim_proto::codec::encode_payload(&vec![7u8; STILL_WRITING_LEN], &mut frame);
    let mut failed = Vec::new();
    for attempt in 0..STILL_WRITING_ATTEMPTS {
        let mut stream = small_buffer_connect(c.server.tcp_addr()).await;
        let written = stream.write_all(&frame).await;
        let mut answer = Vec::new();
        let read = stream.read_to_end(&mut answer).await;
        let mut answer = bytes::BytesMut::from(&answer[..]);
        let code = match cim_proto::codec::decode_frame(&mut answer, 1 << 20) {
            Ok(Some(frame)) => match frame.body {
                Some(Body::Error(e)) => Some(e.code()),
                _ => None,
            },
            _ => None,
        };
        if !(written.is_ok() && read.is_ok() && code == Some(ErrorCode::FrameTooLarge)) {
            failed.push(format!(
                "attempt {attempt}: write {written:?}, read {read:?}, error frame {code:?}"
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {STILL_WRITING_ATTEMPTS} attempts failed: {failed:#?}",
        failed.len()
    );
}
