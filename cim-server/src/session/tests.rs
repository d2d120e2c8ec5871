//! Unit tests of the session: connections over a real TCP transport against a harness
//! server (login, heartbeats, frames both ways, replay, kicks, shutdown), and the idle
//! future's size.

use super::replay::{unreplayed, REPLAY_PAGE};
use super::*;
use crate::config::ServerConfig;
use crate::{
    ack,
    pb::{frame::Body, Pong},
};
use crate::{
    conn::Enqueued,
    pb::{Kick, Ping, Push, Send},
    tcp::TcpTransport,
    testing::{
        assert_closed, error_code, login_frame, next, test_config, token, Harness, TestStoreExt,
    },
};
use cim_common::time::now_ms;
use cim_common::token::{ConnectClaims, TokenSigner};
use cim_proto::codec::put_len_prefix;
use futures_util::SinkExt;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

fn ping(nonce: u64) -> Frame {
    Frame::new(Body::Ping(Ping { nonce }))
}

fn kick_reason(frame: &Frame) -> KickReason {
    match &frame.body {
        Some(Body::Kick(Kick { reason, .. })) => {
            KickReason::try_from(*reason).expect("known reason")
        }
        other => panic!("expected a Kick, got {other:?}"),
    }
}

#[tokio::test]
async fn login_then_ping_pong() {
    let h = Harness::new(test_config());
    h.store.claim(7, "s1").await;
    let (mut client, task) = h.connect();
    client
        .send(login_frame(token(7, "s1", &h.state.id)))
        .await
        .unwrap();
    match next(&mut client).await.body {
        Some(Body::LoginResult(r)) => {
            assert_eq!(r.user_id, 7);
            assert_eq!(r.user_name, "user7");
            assert_eq!(r.server_id, h.state.id);
            assert_eq!(r.heartbeat_interval_ms, 10_000);
            assert_eq!(r.heartbeat_timeout_ms, 30_000);
            assert_eq!(r.max_frame_len, 65_536);
        }
        other => panic!("expected LoginResult, got {other:?}"),
    }
    assert_eq!(
        h.store.slot(7).unwrap().server.as_deref(),
        Some(h.state.id.as_str())
    );
    assert!(h.state.table.get(7).is_some());
    assert_eq!(h.state.admission.open(), 1);

    client.send(ping(42)).await.unwrap();
    assert_eq!(
        next(&mut client).await,
        Frame::new(Body::Pong(Pong { nonce: 42 }))
    );

    // The client leaves: the session ends, leaves the table, and is detached.
    drop(client);
    task.await.unwrap();
    assert!(h.state.table.get(7).is_none());
    assert_eq!(h.store.slot(7), None);
    assert_eq!(h.state.admission.open(), 0);
}

#[tokio::test]
async fn pipelined_pings_are_all_answered_in_order() {
    let h = Harness::new(test_config());
    let (mut client, _task) = h.login(1, "s").await;
    for n in 0..200 {
        client.feed(ping(n)).await.unwrap();
    }
    SinkExt::<Frame>::flush(&mut client).await.unwrap();
    for n in 0..200 {
        assert_eq!(
            next(&mut client).await,
            Frame::new(Body::Pong(Pong { nonce: n }))
        );
    }
}

#[tokio::test]
async fn unexpected_frames_are_refused_but_keep_the_connection() {
    let h = Harness::new(test_config());
    let (mut client, _task) = h.login(1, "s").await;
    let frames = [
        Frame::default(),                        // a body this server does not know
        Frame::new(Body::Push(Push::default())), // server -> client only
        login_frame(token(1, "s", &h.state.id)), // already logged in
    ];
    for frame in frames {
        client.send(frame).await.unwrap();
        assert_eq!(
            error_code(&next(&mut client).await),
            ErrorCode::UnsupportedFrame
        );
    }
    // Acks need no answer; the connection is still usable.
    client
        .send(Frame::new(Body::Ack(Default::default())))
        .await
        .unwrap();
    client.send(ping(1)).await.unwrap();
    assert_eq!(
        next(&mut client).await,
        Frame::new(Body::Pong(Pong { nonce: 1 }))
    );
}

#[tokio::test]
async fn garbage_closes_with_bad_frame_and_detaches() {
    let h = Harness::new(test_config());
    let (client, task) = h.login(3, "s").await;
    let mut io = client.into_inner();
    // A valid length, then bytes that are no Frame (field 1, wire type 7).
    io.write_all(&[3, 0x0f, 0xff, 0xff]).await.unwrap();
    let mut client = tokio_util::codec::Framed::new(io, Default::default());
    assert_eq!(error_code(&next(&mut client).await), ErrorCode::BadFrame);
    assert_closed(&mut client).await;
    drop(client); // the server's linger ends when the client closes
    task.await.unwrap();
    assert_eq!(h.store.slot(3), None, "detached");
    assert!(h.state.table.get(3).is_none());
}

#[tokio::test]
async fn frames_before_garbage_are_answered_first() {
    let h = Harness::new(test_config());
    let (client, _task) = h.login(3, "s").await;
    let mut io = client.into_inner();
    let mut bytes = cim_proto::codec::frame_to_bytes(&ping(1)).to_vec();
    bytes.extend_from_slice(&cim_proto::codec::frame_to_bytes(&ping(2)));
    bytes.extend_from_slice(&[3, 0x0f, 0xff, 0xff]);
    io.write_all(&bytes).await.unwrap();
    let mut client = tokio_util::codec::Framed::new(io, Default::default());
    assert_eq!(
        next(&mut client).await,
        Frame::new(Body::Pong(Pong { nonce: 1 }))
    );
    assert_eq!(
        next(&mut client).await,
        Frame::new(Body::Pong(Pong { nonce: 2 }))
    );
    assert_eq!(error_code(&next(&mut client).await), ErrorCode::BadFrame);
    assert_closed(&mut client).await;
}

#[tokio::test]
async fn oversize_frame_closes_with_frame_too_large() {
    let h = Harness::new(test_config());
    let (client, task) = h.login(3, "s").await;
    let mut io = client.into_inner();
    let mut prefix = bytes::BytesMut::new();
    put_len_prefix(65_537, &mut prefix);
    io.write_all(&prefix).await.unwrap();
    let mut client = tokio_util::codec::Framed::new(io, Default::default());
    assert_eq!(
        error_code(&next(&mut client).await),
        ErrorCode::FrameTooLarge
    );
    assert_closed(&mut client).await;
    drop(client); // the server's linger ends when the client closes
    task.await.unwrap();
}

#[tokio::test]
async fn garbage_before_login_is_bad_frame() {
    let h = Harness::new(test_config());
    let (client, task) = h.connect();
    let mut io = client.into_inner();
    // An HTTP request on the TCP port ('G' reads as a 71-byte length).
    io.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8.0\r\nAccept: */*\r\nConnection: keep-alive\r\n\r\n").await.unwrap();
    let mut client = tokio_util::codec::Framed::new(io, Default::default());
    assert_eq!(error_code(&next(&mut client).await), ErrorCode::BadFrame);
    assert_closed(&mut client).await;
    drop(client); // the server's linger ends when the client closes
    task.await.unwrap();
    assert_eq!(h.state.admission.open(), 0);
}

#[tokio::test(start_paused = true)]
async fn login_timeout() {
    let h = Harness::new(test_config());
    let (mut client, task) = h.connect();
    let started = Instant::now();
    assert_eq!(
        error_code(&next(&mut client).await),
        ErrorCode::LoginTimeout
    );
    assert!(started.elapsed() >= Duration::from_millis(5_000));
    assert_closed(&mut client).await;
    drop(client); // the server's linger ends when the client closes
    task.await.unwrap();
}

#[tokio::test]
async fn first_frame_must_be_login() {
    let h = Harness::new(test_config());
    let (mut client, _task) = h.connect();
    client.send(ping(1)).await.unwrap();
    assert_eq!(
        error_code(&next(&mut client).await),
        ErrorCode::LoginRequired
    );
    assert_closed(&mut client).await;
}

/// Logs in with `token` and returns the error code the server answered.
async fn login_error(h: &Harness, token: String) -> ErrorCode {
    let (mut client, task) = h.connect();
    client.send(login_frame(token)).await.unwrap();
    let code = error_code(&next(&mut client).await);
    assert_closed(&mut client).await;
    drop(client); // the server's linger ends when the client closes
    task.await.unwrap();
    code
}

#[tokio::test]
async fn bad_tokens_are_refused() {
    let h = Harness::new(test_config());
    h.store.claim(5, "s").await;
    let id = h.state.id.clone();
    assert_eq!(
        login_error(&h, "nonsense".into()).await,
        ErrorCode::InvalidToken
    );
    let forged = TokenSigner::new("another-secret-0123456789").sign_connect(&ConnectClaims {
        user_id: 5,
        user_name: "x".into(),
        server_id: id.clone(),
        session: "s".into(),
        exp_ms: now_ms() + 60_000,
    });
    assert_eq!(login_error(&h, forged).await, ErrorCode::InvalidToken);
    let expired = TokenSigner::new(crate::testing::SECRET).sign_connect(&ConnectClaims {
        user_id: 5,
        user_name: "x".into(),
        server_id: id.clone(),
        session: "s".into(),
        exp_ms: now_ms() - 1,
    });
    assert_eq!(login_error(&h, expired).await, ErrorCode::TokenExpired);
    assert_eq!(
        login_error(&h, token(5, "s", "server-other")).await,
        ErrorCode::WrongServer
    );
    // Not pending (never claimed, or claimed by another session).
    assert_eq!(
        login_error(&h, token(5, "other", &id)).await,
        ErrorCode::SessionInvalid
    );
    h.store.set_unavailable(true);
    assert_eq!(
        login_error(&h, token(5, "s", &id)).await,
        ErrorCode::Unavailable
    );
    h.store.set_unavailable(false);
    // None of these attached anything.
    assert_eq!(h.store.slot(5).unwrap().server, None);
    assert!(h.state.table.get(5).is_none());
}

#[tokio::test]
async fn a_token_works_once() {
    let h = Harness::new(test_config());
    let (_client, _task) = h.login(5, "s").await;
    assert_eq!(
        login_error(&h, token(5, "s", &h.state.id)).await,
        ErrorCode::SessionInvalid
    );
    // The replay did not disturb the first connection.
    assert!(h.state.table.get(5).is_some());
}

#[tokio::test(start_paused = true)]
async fn heartbeat_timeout_and_activity() {
    let h = Harness::new(test_config());
    let (mut client, task) = h.login(9, "s").await;
    let started = Instant::now();
    // Activity at 20 s pushes the deadline to 50 s.
    tokio::time::sleep(Duration::from_secs(20)).await;
    client.send(ping(1)).await.unwrap();
    assert_eq!(
        next(&mut client).await,
        Frame::new(Body::Pong(Pong { nonce: 1 }))
    );
    assert_eq!(
        error_code(&next(&mut client).await),
        ErrorCode::HeartbeatTimeout
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(50) && elapsed < Duration::from_secs(51),
        "{elapsed:?}"
    );
    assert_closed(&mut client).await;
    drop(client); // the server's linger ends when the client closes
    task.await.unwrap();
    assert_eq!(h.store.slot(9), None, "detached");
}

#[tokio::test]
async fn slow_consumer_is_kicked() {
    let h = Harness::new(ServerConfig {
        outbound_queue_frames: 4,
        ..test_config()
    });
    let (mut client, task) = h.login(2, "s").await;
    let conn = h.state.table.get(2).unwrap();
    // The client does not read: the queue fills up while the session is parked. Pushes
    // run on this test's thread; the session task only runs when we yield.
    let push = Outbound::new(Frame::new(Body::Push(Push::default())));
    let outcomes: Vec<_> = (0..5).map(|_| conn.enqueue(push.clone())).collect();
    assert_eq!(outcomes[..4], [Enqueued::Queued; 4]);
    assert_eq!(outcomes[4], Enqueued::Full);
    // The queued pushes are dropped: only the Kick arrives, then the close.
    assert_eq!(
        kick_reason(&next(&mut client).await),
        KickReason::SlowConsumer
    );
    assert_closed(&mut client).await;
    drop(client); // the server's linger ends when the client closes
    task.await.unwrap();
    assert!(h.state.table.get(2).is_none());
    assert_eq!(conn.enqueue(push), Enqueued::Closed);
}

#[tokio::test]
async fn newer_connection_replaces_older() {
    let h = Harness::new(test_config());
    let (mut first, first_task) = h.login(4, "s1").await;
    let (mut second, _second_task) = h.login(4, "s2").await;
    assert_eq!(kick_reason(&next(&mut first).await), KickReason::Replaced);
    assert_closed(&mut first).await;
    drop(first); // the server's linger ends when the client closes
    first_task.await.unwrap();
    // The old session's cleanup left the new one alone.
    assert_eq!(h.state.table.get(4).unwrap().session, "s2");
    assert_eq!(h.store.slot(4).unwrap().session, "s2");
    second.send(ping(5)).await.unwrap();
    assert_eq!(
        next(&mut second).await,
        Frame::new(Body::Pong(Pong { nonce: 5 }))
    );
}

#[tokio::test]
async fn sends_are_forwarded_with_the_authenticated_sender() {
    let mut h = Harness::new(test_config());
    let (mut client, _task) = h.login(11, "s").await;
    let send = Send {
        client_id: 77,
        to_user_id: 12,
        body: "hi".into(),
        ..Default::default()
    };
    client
        .send(Frame::new(Body::Send(send.clone())))
        .await
        .unwrap();
    let pending = h.forwarded.recv().await.unwrap();
    assert_eq!(pending.conn.user_id, 11);
    assert_eq!(pending.conn.user_name, "user11");
    assert_eq!(pending.send, send);
}

/// A harness whose forward queue holds its minimum (`forward_queue: 1`, and `config`'s
/// other fields), with user 11 logged in.
async fn small_queue(
    config: ServerConfig,
) -> (Harness, crate::testing::Client, tokio::task::JoinHandle<()>) {
    let h = Harness::new(ServerConfig {
        forward_queue: 1,
        ..config
    });
    let (client, task) = h.login(11, "s").await;
    (h, client, task)
}

/// Sends one more `Send` than the harness's forward queue holds (`forward_queue: 1`);
/// returns how many (client ids 1..=that).
async fn send_one_past_a_full_queue(client: &mut crate::testing::Client) -> u64 {
    let sends = crate::forward::MIN_QUEUE as u64 + 1;
    for client_id in 1..=sends {
        let send = Send {
            client_id,
            ..Default::default()
        };
        client.send(Frame::new(Body::Send(send))).await.unwrap();
    }
    sends
}

/// A sender that finds the queue full is not refused: its session stops reading until
/// the queue has room, then takes the send (and whatever followed it) in order.
#[tokio::test]
async fn a_full_forward_queue_holds_the_sender_back_instead_of_refusing() {
    let (mut h, mut client, _task) = small_queue(test_config()).await;
    // The queue holds its minimum; the send after that must wait.
    let sends = send_one_past_a_full_queue(&mut client).await;
    client.send(ping(5)).await.unwrap();
    // Room for one: the waiting send goes in, the session reads on and answers the
    // ping. Refusing the send would have answered it first.
    assert_eq!(h.forwarded.recv().await.unwrap().send.client_id, 1);
    match next(&mut client).await.body {
        Some(Body::Pong(p)) => assert_eq!(p.nonce, 5),
        other => panic!("expected the Pong, got {other:?}"),
    }
    for client_id in 2..=sends {
        assert_eq!(h.forwarded.recv().await.unwrap().send.client_id, client_id);
    }
}

/// A held sender is not read, but still written to: what is pushed to it meanwhile
/// arrives before the queue has room.
#[tokio::test]
async fn a_held_sender_still_gets_its_pushes() {
    let (mut h, mut client, _task) = small_queue(test_config()).await;
    let sends = send_one_past_a_full_queue(&mut client).await;
    // The queue is full once the session has read every send (they arrive in one read):
    // the last one is held and the session is waiting for room.
    while h.forwarded.len() < crate::forward::MIN_QUEUE {
        tokio::task::yield_now().await;
    }
    let mut message = stored(11, "pushed", "while held");
    message.seq = 1;
    h.state.table.get(11).unwrap().enqueue(live_push(message));
    // Bounded: without the writes during the wait it would never come (the queue stays
    // full until the test drains it below).
    let frame = tokio::time::timeout(Duration::from_secs(10), next(&mut client))
        .await
        .expect("the push reaches a held sender");
    assert_eq!(push_of(frame).messages[0].id, "pushed");
    // Only now is there room: every send, the held one included, reaches the queue.
    for client_id in 1..=sends {
        assert_eq!(h.forwarded.recv().await.unwrap().send.client_id, client_id);
    }
}

/// Sends past the connection's bucket are answered RATE_LIMITED, with their client ids,
/// and not forwarded; the connection stays and other frames are answered.
#[tokio::test]
async fn sends_over_the_rate_are_refused_and_the_connection_stays() {
    let hour = Duration::from_secs(3600);
    let mut h = Harness::with_send_limit(
        test_config(),
        Some(cim_common::limit::KeyedLimit::per_period(hour, 3)),
    );
    let (mut client, _task) = h.login(1, "s").await;
    for client_id in 1..=5 {
        let send = Send {
            client_id,
            ..Default::default()
        };
        client.send(Frame::new(Body::Send(send))).await.unwrap();
    }
    client.send(ping(9)).await.unwrap();
    for client_id in 4..=5 {
        match next(&mut client).await.body {
            Some(Body::SendResult(r)) => {
                assert_eq!(r.client_id, client_id);
                let e = r.error.unwrap();
                assert_eq!(e.code(), ErrorCode::RateLimited);
                assert!(e.message.contains("retry in"), "{}", e.message);
            }
            other => panic!("expected SendResult, got {other:?}"),
        }
    }
    assert_eq!(
        next(&mut client).await,
        Frame::new(Body::Pong(Pong { nonce: 9 }))
    );
    for client_id in 1..=3 {
        assert_eq!(h.forwarded.recv().await.unwrap().send.client_id, client_id);
    }
    assert!(
        h.forwarded.try_recv().is_err(),
        "only the burst was forwarded"
    );
    assert_eq!(h.state.metrics.sends_rate_limited.get(), 2);
}

#[tokio::test]
async fn a_send_that_finds_no_room_in_time_is_answered_overloaded() {
    let (_h, mut client, _task) = small_queue(ServerConfig {
        forward_wait_ms: 50,
        ..test_config()
    })
    .await;
    // Nobody drains the queue here.
    let overflow = send_one_past_a_full_queue(&mut client).await;
    match next(&mut client).await.body {
        Some(Body::SendResult(r)) => {
            assert_eq!(r.client_id, overflow);
            assert_eq!(r.error.unwrap().code(), ErrorCode::Overloaded);
        }
        other => panic!("expected SendResult, got {other:?}"),
    }
    // The session reads on after the refusal.
    client.send(ping(6)).await.unwrap();
    match next(&mut client).await.body {
        Some(Body::Pong(p)) => assert_eq!(p.nonce, 6),
        other => panic!("expected the Pong, got {other:?}"),
    }
}

#[tokio::test]
async fn shutdown_kicks_and_detaches() {
    let h = Harness::new(test_config());
    let (mut client, task) = h.login(6, "s").await;
    let (mut anonymous, anonymous_task) = h.connect();
    h.state.shutdown_connections();
    assert_eq!(
        kick_reason(&next(&mut client).await),
        KickReason::ServerShutdown
    );
    assert_closed(&mut client).await;
    assert_eq!(
        kick_reason(&next(&mut anonymous).await),
        KickReason::ServerShutdown
    );
    assert_closed(&mut anonymous).await;
    // The server's linger ends when the clients close.
    drop((client, anonymous));
    task.await.unwrap();
    anonymous_task.await.unwrap();
    assert_eq!(h.store.slot(6), None);
}

#[tokio::test]
async fn kick_flushes_pending_frames_first() {
    let h = Harness::new(test_config());
    let (mut client, _task) = h.login(8, "s").await;
    let conn = h.state.table.get(8).unwrap();
    let push = Frame::new(Body::Push(Push::default()));
    conn.enqueue(Outbound::new(push.clone()));
    let kick = Frame::kick(KickReason::LoggedOut, "bye");
    conn.close(Outbound::new(kick.clone()), KickReason::LoggedOut, true);
    assert_eq!(next(&mut client).await, push);
    assert_eq!(next(&mut client).await, kick);
    assert_closed(&mut client).await;
}

#[tokio::test]
async fn idle_tcp_connection_holds_no_read_buffer() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    let mut transport = TcpTransport::new(server, 64 * 1024);
    let big = login_frame("x".repeat(20_000));
    let mut bytes = cim_proto::codec::frame_to_bytes(&big).to_vec();
    bytes.extend_from_slice(&cim_proto::codec::frame_to_bytes(&ping(1)));
    client.write_all(&bytes).await.unwrap();
    assert_eq!(transport.recv().await.unwrap(), Some(big));
    assert_eq!(transport.recv().await.unwrap(), Some(ping(1)));
    // Nothing more comes: the pending read holds no buffer.
    let idle = tokio::time::timeout(Duration::from_millis(50), transport.recv()).await;
    assert!(idle.is_err(), "no frame expected");
    assert_eq!(transport.read_buffer_capacity(), 0);
    // And reading still works afterwards.
    client
        .write_all(&cim_proto::codec::frame_to_bytes(&ping(2)))
        .await
        .unwrap();
    assert_eq!(transport.recv().await.unwrap(), Some(ping(2)));
}

/// An idle connection's memory is mostly its task, i.e. this future (measured end to end
/// by `cim-bench connect`): keep it small.
#[test]
fn session_future_is_small() {
    let h = Harness::new(test_config());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let _peer = std::net::TcpStream::connect(addr).unwrap();
    let (stream, _) = listener.accept().unwrap();
    stream.set_nonblocking(true).unwrap();
    let stream = tokio::net::TcpStream::from_std(stream).unwrap();
    let ticket = h.state.admission.admit().unwrap();
    let future = run(
        h.state.clone(),
        TcpTransport::new(stream, 65_536),
        addr,
        ticket,
    );
    let size = std::mem::size_of_val(&future);
    assert!(size <= 800, "session future is {size} bytes");
}

use cim_common::store::prelude::*;

fn stored(user_id: u64, id: &str, body: &str) -> crate::pb::Message {
    crate::pb::Message {
        id: id.into(),
        sender_id: 99,
        sender_name: "sender".into(),
        receiver_id: user_id,
        kind: crate::pb::MessageKind::Private as i32,
        body: body.into(),
        timestamp_ms: now_ms(),
        ..Default::default()
    }
}

/// Stores a message for user 7, then pushes it live to user 7's connection, as a route
/// does (stored before pushed).
async fn store_then_push(h: &Harness, id: &str) {
    let mut message = vec![stored(7, id, "after")];
    h.store.inbox_store(&mut message).await.unwrap();
    h.state
        .table
        .get(7)
        .unwrap()
        .enqueue(live_push(message.remove(0)));
}

fn push_of(frame: Frame) -> Push {
    match frame.body {
        Some(Body::Push(push)) => push,
        other => panic!("expected a Push, got {other:?}"),
    }
}

fn live_push(message: crate::pb::Message) -> Outbound {
    Outbound::new(Frame::new(Body::Push(Push {
        messages: vec![message],
        replay: false,
    })))
}

#[tokio::test]
async fn inbox_is_replayed_before_live_pushes_without_duplicates() {
    let h = Harness::new(test_config());
    let mut waiting = vec![stored(7, "m1", "one"), stored(7, "m2", "two")];
    h.store.inbox_store(&mut waiting).await.unwrap();
    let (mut client, _task) = h.login(7, "s").await;
    let replayed = push_of(next(&mut client).await);
    assert!(replayed.replay);
    let ids: Vec<&str> = replayed.messages.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["m1", "m2"]);
    assert!(replayed.messages[0].seq < replayed.messages[1].seq);

    // A live push of a message the replay covered (it was stored before the inbox was
    // read) is dropped; a newer one goes through, then the Pong.
    let conn = h.state.table.get(7).unwrap();
    conn.enqueue(live_push(waiting[1].clone()));
    let mut newer = vec![stored(7, "m3", "three")];
    h.store.inbox_store(&mut newer).await.unwrap();
    conn.enqueue(live_push(newer[0].clone()));
    client.send(ping(5)).await.unwrap();
    let live = push_of(next(&mut client).await);
    assert!(!live.replay);
    assert_eq!(live.messages[0].id, "m3");
    assert_eq!(
        next(&mut client).await,
        Frame::new(Body::Pong(Pong { nonce: 5 }))
    );
}

#[tokio::test]
async fn a_message_stored_once_the_client_is_logged_in_comes_live() {
    let h = Harness::new(test_config());
    let mut waiting = vec![stored(7, "m1", "before")];
    h.store.inbox_store(&mut waiting).await.unwrap();
    // `login` returns with the LoginResult read: the inbox was read before it was sent,
    // so what is stored from now on is not part of the replay.
    let (mut client, _task) = h.login(7, "s").await;
    store_then_push(&h, "m2").await;
    let replayed = push_of(next(&mut client).await);
    assert!(replayed.replay);
    let ids: Vec<&str> = replayed.messages.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["m1"]);
    let live = push_of(next(&mut client).await);
    assert!(!live.replay, "{live:?}");
    assert_eq!(live.messages[0].id, "m2");
}

/// An inbox larger than a page is replayed up to what it held at login; a message stored
/// while later pages are read comes live, not as part of the replay.
#[tokio::test]
async fn a_message_stored_during_a_paged_replay_comes_live() {
    let h = Harness::new(test_config());
    let mut waiting: Vec<_> = (0..REPLAY_PAGE + 50)
        .map(|i| stored(7, &format!("m{i:03}"), "before"))
        .collect();
    h.store.inbox_store(&mut waiting).await.unwrap();
    h.store
        .hold_paged_reads
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut client, _task) = h.login(7, "s").await;
    // The session wrote the first page and is reading the second one.
    h.store.entered.notified().await;
    store_then_push(&h, "late").await;
    h.store.resume.notify_one();
    let mut replayed = Vec::new();
    let live = loop {
        let push = push_of(next(&mut client).await);
        if !push.replay {
            break push;
        }
        replayed.extend(push.messages.into_iter().map(|m| m.id));
    };
    let expected: Vec<String> = waiting.iter().map(|m| m.id.clone()).collect();
    assert_eq!(replayed, expected);
    let live: Vec<&str> = live.messages.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(live, ["late"]);
}

#[test]
fn live_pushes_lose_only_the_messages_the_replay_wrote() {
    let message = |id: &str, seq: u64| crate::pb::Message {
        id: id.into(),
        seq,
        ..Default::default()
    };
    let ids = |item: &Outbound| -> Vec<String> {
        push_of(item.frame().clone())
            .messages
            .into_iter()
            .map(|m| m.id)
            .collect()
    };
    let push = |messages: Vec<crate::pb::Message>| {
        Outbound::new(Frame::new(Body::Push(Push {
            messages,
            replay: false,
        })))
    };
    assert!(unreplayed(push(vec![message("a", 3), message("b", 5)]), 5, None).is_none());
    let kept = push(vec![message("c", 6)]);
    let same = unreplayed(kept.clone(), 5, None).unwrap();
    assert!(
        std::ptr::eq(same.frame(), kept.frame()),
        "untouched: not re-encoded"
    );
    let part = unreplayed(push(vec![message("d", 5), message("e", 6)]), 5, None).unwrap();
    assert_eq!(ids(&part), ["e"]);
    // Messages without a seq (not stored: group, channel) are never the replay's.
    assert!(unreplayed(push(vec![message("g", 0)]), 5, None).is_some());
}

#[tokio::test]
async fn a_large_inbox_is_replayed_in_bounded_frames_in_order() {
    let h = Harness::new(test_config());
    let body = "x".repeat(2000);
    let mut waiting: Vec<_> = (0..60)
        .map(|i| stored(8, &format!("m{i:02}"), &body))
        .collect();
    h.store.inbox_store(&mut waiting).await.unwrap();
    let (mut client, _task) = h.login(8, "s").await;
    let mut ids = Vec::new();
    let mut frames = 0;
    while ids.len() < 60 {
        let frame = next(&mut client).await;
        assert!(prost::Message::encoded_len(&frame) <= crate::chunks::PUSH_FRAME_BYTES + 4096);
        let push = push_of(frame);
        assert!(push.replay);
        ids.extend(push.messages.into_iter().map(|m| m.id));
        frames += 1;
    }
    assert!(frames > 1, "60 × 2 KB must not fit one frame");
    let expected: Vec<String> = (0..60).map(|i| format!("m{i:02}")).collect();
    assert_eq!(ids, expected);
}

#[tokio::test]
async fn acks_go_to_the_acker_and_bad_acks_are_refused() {
    let mut h = Harness::new(test_config());
    let (mut client, _task) = h.login(9, "s").await;
    let ack = |ids: Vec<String>| {
        Frame::new(Body::Ack(crate::pb::Ack {
            message_ids: ids,
            ..Default::default()
        }))
    };
    client
        .send(ack(vec!["a".into(), "b".into()]))
        .await
        .unwrap();
    let item = h.acked.recv().await.unwrap();
    assert_eq!(item.conn.user_id, 9);
    assert_eq!(item.conn.user_name, "user9");
    assert_eq!(item.ids, ["a", "b"]);

    client
        .send(ack(vec!["a".into(); ack::MAX_IDS_PER_ACK + 1]))
        .await
        .unwrap();
    assert_eq!(error_code(&next(&mut client).await), ErrorCode::BadRequest);
    // The connection stays open.
    client.send(ping(1)).await.unwrap();
    assert_eq!(
        next(&mut client).await,
        Frame::new(Body::Pong(Pong { nonce: 1 }))
    );
    assert!(h.acked.try_recv().is_err(), "the refused ack went nowhere");
}
