//! Unit tests of the background task against a fake server on a local TCP port.

use super::frames::take_front_acks;
use super::sends::frame_len;
use super::*;
use crate::{client::ReconnectPolicy, recent::DEFAULT_CAPACITY};
use cim_proto::codec::FrameCodec;
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

/// Deadline of every wait in these tests.
const DEADLINE: Duration = Duration::from_secs(10);

fn message(id: &str, seq: u64, kind: pb::MessageKind) -> pb::Message {
    pb::Message {
        id: id.into(),
        sender_id: 2,
        sender_name: "bob".into(),
        receiver_id: 1,
        kind: kind as i32,
        body: format!("body of {id}"),
        timestamp_ms: 1_700_000_000_000,
        seq,
        ..Default::default()
    }
}

fn private(id: &str, seq: u64) -> pb::Message {
    message(id, seq, pb::MessageKind::Private)
}

fn push(replay: bool, messages: Vec<pb::Message>) -> Frame {
    Frame::new(Body::Push(pb::Push { messages, replay }))
}

fn events(backlog: &Backlog) -> Vec<&Event> {
    backlog
        .iter()
        .filter_map(|i| match i {
            Item::Event(e) => Some(e),
            Item::Ack(_) | Item::GroupAck(_) => None,
        })
        .collect()
}

/// Runs `on_frame` on a push with fresh state, keeping `recent` for the next call.
fn on_push(recent: &mut RecentIds, frame: Frame) -> Backlog {
    let mut backlog = Backlog::new();
    let end = on_frame(
        frame,
        recent,
        &mut PendingSends::new(),
        &mut backlog,
        &mut None,
    );
    assert!(end.is_none());
    backlog
}

#[test]
fn a_push_is_acked_once_after_its_events_with_duplicates_and_without_unstored() {
    let mut recent = RecentIds::new(16);
    let first = on_push(&mut recent, push(false, vec![private("a", 1)]));
    assert_eq!(
        first.back(),
        Some(&Item::Ack(vec!["a".to_string()])),
        "{first:?}"
    );
    // "a" again (a replay after a reconnect), a group message (not stored: seq 0), "b".
    let group = message("g", 0, pb::MessageKind::Group);
    let second = on_push(
        &mut recent,
        push(true, vec![private("a", 1), group.clone(), private("b", 2)]),
    );
    assert_eq!(
        second,
        [
            Item::Event(Event::Message {
                message: group,
                replayed: true
            }),
            Item::Event(Event::Message {
                message: private("b", 2),
                replayed: true
            }),
            // One ack for the whole push, the duplicate included, after its events.
            Item::Ack(vec!["a".to_string(), "b".to_string()]),
        ]
        .into_iter()
        .collect::<Backlog>()
    );
    // Only duplicates: nothing for the application, the ack all the same.
    let third = on_push(&mut recent, push(false, vec![private("a", 1)]));
    assert_eq!(third, Backlog::from([Item::Ack(vec!["a".to_string()])]));
    // A push of unstored messages only needs no ack.
    let fourth = on_push(
        &mut recent,
        push(false, vec![message("s", 0, pb::MessageKind::System)]),
    );
    assert_eq!(fourth.len(), 1);
    assert!(matches!(fourth[0], Item::Event(Event::Message { .. })));
}

#[test]
fn channel_messages_become_message_events_once_and_are_never_acked() {
    let mut recent = RecentIds::new(16);
    let mut channel = message("c1", 0, pb::MessageKind::Channel);
    channel.channel = "room1".into();
    channel.receiver_id = 0;
    // Mixed with a stored private message: only that one is acked.
    let backlog = on_push(
        &mut recent,
        push(false, vec![channel.clone(), private("p1", 3)]),
    );
    assert_eq!(
        backlog,
        [
            Item::Event(Event::Message {
                message: channel.clone(),
                replayed: false
            }),
            Item::Event(Event::Message {
                message: private("p1", 3),
                replayed: false
            }),
            Item::Ack(vec!["p1".to_string()]),
        ]
        .into_iter()
        .collect::<Backlog>()
    );
    // The same channel message again (a sender's re-send after a lost connection):
    // dropped by id, and still nothing to ack.
    assert!(on_push(&mut recent, push(false, vec![channel])).is_empty());
}

#[test]
fn the_replay_flag_of_a_push_reaches_its_events() {
    let mut recent = RecentIds::new(16);
    let live = on_push(&mut recent, push(false, vec![private("a", 1)]));
    let replayed = on_push(&mut recent, push(true, vec![private("b", 2)]));
    assert!(matches!(
        events(&live)[..],
        [Event::Message {
            replayed: false,
            ..
        }]
    ));
    assert!(matches!(
        events(&replayed)[..],
        [Event::Message { replayed: true, .. }]
    ));
}

#[test]
fn receipts_become_receipt_events_and_are_acked() {
    let mut recent = RecentIds::new(16);
    let mut receipt = message("r1", 7, pb::MessageKind::Receipt);
    receipt.receipt_for = "m42".into();
    receipt.timestamp_ms = 1234;
    let backlog = on_push(&mut recent, push(false, vec![receipt.clone()]));
    assert_eq!(
        backlog,
        [
            Item::Event(Event::Receipt {
                message_id: "m42".into(),
                by_user_id: 2,
                by_name: "bob".into(),
                at_ms: 1234
            }),
            Item::Ack(vec!["r1".to_string()]),
        ]
        .into_iter()
        .collect::<Backlog>()
    );
    // A receipt replayed after a reconnect is reported once, and acked again.
    let again = on_push(&mut recent, push(true, vec![receipt]));
    assert_eq!(again, Backlog::from([Item::Ack(vec!["r1".to_string()])]));
}

#[test]
fn acks_at_the_front_are_merged_and_the_rest_waits() {
    let event = || Item::Event(Event::State(ConnState::Connecting));
    let mut backlog: Backlog = [
        Item::Ack(vec!["a".into()]),
        Item::Ack(vec!["b".into(), "c".into()]),
        event(),
        Item::Ack(vec!["d".into()]),
    ]
    .into();
    assert_eq!(take_front_acks(&mut backlog).0, ["a", "b", "c"]);
    assert_eq!(backlog.len(), 2);
    // An event in front: nothing is taken until the application has it.
    assert!(take_front_acks(&mut backlog).0.is_empty());
    backlog.pop_front();
    assert_eq!(take_front_acks(&mut backlog).0, ["d"]);
    assert!(backlog.is_empty());
}

#[test]
fn group_positions_at_the_front_merge_to_the_highest_seq_per_group() {
    let mut backlog: Backlog = [
        Item::GroupAck(vec![(7, 3), (8, 1)]),
        Item::Ack(vec!["a".into()]),
        Item::GroupAck(vec![(7, 5)]),
        Item::Event(Event::State(ConnState::Connecting)),
        Item::GroupAck(vec![(7, 9)]),
    ]
    .into();
    let (ids, groups) = take_front_acks(&mut backlog);
    assert_eq!(ids, ["a"]);
    assert_eq!(groups, [(7, 5), (8, 1)]);
    assert_eq!(backlog.len(), 2);
}

/// A worker whose connections the test makes itself (no route behind it).
struct Harness {
    worker: Worker,
    events: mpsc::Receiver<Event>,
    commands: mpsc::Sender<Command>,
    listener: TcpListener,
}

async fn harness(event_capacity: usize) -> Harness {
    let config = ClientConfig {
        reconnect: ReconnectPolicy::default(),
        ..ClientConfig::new("http://127.0.0.1:1", "alice", "password")
    };
    let info = ClientInfo {
        user_id: 1,
        name: "alice".into(),
        route_url: config.route_url.clone(),
        server_id: None,
        server_addr: None,
        state: ConnState::Connecting,
    };
    let shared = Arc::new(Shared {
        info: Mutex::new(info),
        session_token: Mutex::new(String::new()),
        stop: CancellationToken::new(),
        logout: Mutex::new(LogoutSlot::Open),
        next_client_id: AtomicU64::new(1),
    });
    let (events_tx, events) = mpsc::channel(event_capacity);
    let (commands, commands_rx) = mpsc::channel(16);
    let worker = Worker {
        shared,
        route: RouteClient::new(&config.route_url),
        config,
        events: events_tx,
        commands: commands_rx,
        recent: RecentIds::new(DEFAULT_CAPACITY),
        token: None,
        attempt: 0,
        read_watches: Default::default(),
    };
    Harness {
        worker,
        events,
        commands,
        listener: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
    }
}

type Server = Framed<TcpStream, FrameCodec>;

impl Harness {
    /// A new connection: the worker's side (as if logged in, pinging every `heartbeat`)
    /// and the fake server's.
    async fn connection(&self, heartbeat: Duration) -> (Live, Server) {
        let addr = self.listener.local_addr().expect("addr").to_string();
        let (conn, accepted) = tokio::join!(
            Connection::connect(&addr, Transport::Tcp),
            self.listener.accept()
        );
        let live = Live {
            conn: conn.expect("connect"),
            server_id: "s1".into(),
            addr,
            heartbeat,
            max_frame_len: 0,
            since: Instant::now(),
        };
        let server = Framed::new(accepted.expect("accept").0, FrameCodec::default());
        (live, server)
    }

    fn command(&self, message_id: &str) -> (Command, oneshot::Receiver<SendResultOf>) {
        let (reply, result) = oneshot::channel();
        let client_id = self.worker.shared.next_client_id.fetch_add(1, Relaxed);
        let command = Command {
            signal: None,
            send: pb::Send {
                client_id,
                kind: pb::MessageKind::Private as i32,
                to_user_id: 2,
                body: format!("body of {message_id}"),
                message_id: message_id.into(),
                ..Default::default()
            },
            reply,
            deadline: Instant::now() + DEADLINE,
        };
        (command, result)
    }
}

type SendResultOf = Result<SendOutcome, ClientError>;
use std::sync::atomic::Ordering::Relaxed;

/// The next frame the fake server receives, skipping pings.
async fn next_frame(server: &mut Server) -> Body {
    loop {
        let frame = tokio::time::timeout(DEADLINE, server.next())
            .await
            .expect("a frame in time")
            .expect("connection open")
            .expect("a valid frame");
        match frame.body {
            Some(Body::Ping(_)) => continue,
            Some(body) => return body,
            None => panic!("empty frame"),
        }
    }
}

async fn next_event(events: &mut mpsc::Receiver<Event>) -> Event {
    tokio::time::timeout(DEADLINE, events.recv())
        .await
        .expect("an event in time")
        .expect("events open")
}

#[tokio::test]
async fn acks_follow_the_events_into_the_channel() {
    let mut h = harness(1).await;
    let (mut live, mut server) = h.connection(Duration::from_millis(20)).await;
    let stop = h.worker.shared.stop.clone();
    let mut backlog = Backlog::new();
    let mut pending = PendingSends::new();
    let served = async {
        let end = h.worker.serve(&mut live, &mut backlog, &mut pending).await;
        assert!(matches!(end, End::Stop));
    };
    let test = async {
        server
            .send(push(true, vec![private("a", 1), private("b", 2)]))
            .await
            .unwrap();
        // The channel holds one event: "b" waits in the backlog, and so does the ack.
        // Heartbeats go on meanwhile; the next pings come before any ack.
        for _ in 0..3 {
            let frame = tokio::time::timeout(DEADLINE, server.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert!(matches!(frame.body, Some(Body::Ping(_))), "{frame:?}");
        }
        for id in ["a", "b"] {
            match next_event(&mut h.events).await {
                Event::Message { message, replayed } => {
                    assert_eq!((message.id.as_str(), replayed), (id, true));
                }
                other => panic!("{other:?}"),
            }
        }
        // Both taken: one ack for the push.
        match next_frame(&mut server).await {
            Body::Ack(ack) => assert_eq!(ack.message_ids, ["a", "b"]),
            other => panic!("{other:?}"),
        }
        stop.cancel();
    };
    tokio::time::timeout(DEADLINE, async { tokio::join!(served, test) })
        .await
        .expect("in time");
}

#[tokio::test]
async fn unanswered_sends_are_resent_on_the_next_connection_with_their_id() {
    let mut h = harness(16).await;
    let hour = Duration::from_secs(3600);
    let mut backlog = Backlog::new();
    let mut pending = PendingSends::new();

    // First connection: two sends are written, the server dies without answering.
    let (mut live, mut server) = h.connection(hour).await;
    let (kept, kept_result) = h.command("m-kept");
    let (abandoned, abandoned_result) = h.command("m-abandoned");
    h.commands.send(kept).await.unwrap();
    h.commands.send(abandoned).await.unwrap();
    let served = h.worker.serve(&mut live, &mut backlog, &mut pending);
    let server_side = async {
        for id in ["m-kept", "m-abandoned"] {
            match next_frame(&mut server).await {
                Body::Send(send) => assert_eq!(send.message_id, id),
                other => panic!("{other:?}"),
            }
        }
        drop(server);
    };
    let (end, ()) = tokio::join!(served, server_side);
    assert!(matches!(end, End::Reconnect(_)));
    assert_eq!(pending.len(), 2, "kept for the next connection");
    // The second caller gives up during the outage.
    drop(abandoned_result);

    // Second connection: the send still awaited goes out first, same ids, and its
    // result reaches the caller; the abandoned one is not written again.
    let (mut live, mut server) = h.connection(hour).await;
    let stop = h.worker.shared.stop.clone();
    let (later, later_result) = h.command("m-later");
    let commands = h.commands.clone();
    let served = async {
        let end = h.worker.serve(&mut live, &mut backlog, &mut pending).await;
        assert!(matches!(end, End::Stop));
    };
    let server_side = async {
        let resent = match next_frame(&mut server).await {
            Body::Send(send) => send,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            (resent.message_id.as_str(), resent.body.as_str()),
            ("m-kept", "body of m-kept")
        );
        commands.send(later).await.unwrap();
        match next_frame(&mut server).await {
            Body::Send(send) => assert_eq!(send.message_id, "m-later"),
            other => panic!("{other:?}"),
        }
        server
            .send(Frame::new(Body::SendResult(pb::SendResult {
                client_id: resent.client_id,
                status: pb::SendStatus::Stored as i32,
                message_id: resent.message_id.clone(),
                timestamp_ms: 9,
                ..Default::default()
            })))
            .await
            .unwrap();
        let outcome = tokio::time::timeout(DEADLINE, kept_result)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            (outcome.message_id.as_str(), outcome.status),
            ("m-kept", pb::SendStatus::Stored)
        );
        stop.cancel();
    };
    tokio::time::timeout(DEADLINE, async { tokio::join!(served, server_side) })
        .await
        .expect("in time");
    // Still unanswered when the worker stopped: "m-later" (the run loop fails it).
    assert_eq!(pending.keys().count(), 1);
    drop(later_result);
}

#[tokio::test]
async fn a_send_whose_deadline_passed_during_the_outage_times_out() {
    let mut h = harness(16).await;
    let hour = Duration::from_secs(3600);
    let mut backlog = Backlog::new();
    let mut pending = PendingSends::new();
    let (mut live, mut server) = h.connection(hour).await;
    let (command, result) = h.command("m-late");
    h.commands.send(command).await.unwrap();
    let served = h.worker.serve(&mut live, &mut backlog, &mut pending);
    let server_side = async {
        assert!(matches!(next_frame(&mut server).await, Body::Send(_)));
        drop(server);
    };
    let (end, ()) = tokio::join!(served, server_side);
    assert!(matches!(end, End::Reconnect(_)));
    // The outage outlasts the send's deadline.
    assert_eq!(pending.len(), 1);
    for sent in pending.values_mut() {
        sent.deadline = Instant::now();
    }
    let (mut live, _server) = h.connection(hour).await;
    h.worker.shared.stop.cancel();
    let end = h.worker.serve(&mut live, &mut backlog, &mut pending).await;
    assert!(matches!(end, End::Stop));
    assert!(pending.is_empty());
    assert!(matches!(result.await, Ok(Err(ClientError::Timeout))));
}

#[test]
fn failed_results_are_errors_and_others_outcomes() {
    let failed = pb::SendResult::failed(3, pb::ErrorCode::UnknownUser, "no such user");
    match outcome(failed) {
        Err(ClientError::Send { code, message }) => {
            assert_eq!(
                (code, message.as_str()),
                (pb::ErrorCode::UnknownUser, "no such user")
            );
        }
        other => panic!("{other:?}"),
    }
    let ok = pb::SendResult {
        client_id: 4,
        status: pb::SendStatus::Stored as i32,
        message_id: "01X".into(),
        timestamp_ms: 5,
        log_seq: 4,
        ..Default::default()
    };
    assert_eq!(
        outcome(ok).unwrap(),
        SendOutcome {
            message_id: "01X".into(),
            status: pb::SendStatus::Stored,
            delivered: 0,
            timestamp_ms: 5,
            repeat: false,
            log_seq: 4,
        }
    );
    let repeat = pb::SendResult {
        client_id: 5,
        status: pb::SendStatus::Delivered as i32,
        message_id: "01G".into(),
        timestamp_ms: 6,
        repeat: true,
        ..Default::default()
    };
    assert!(outcome(repeat).unwrap().repeat);
}

#[test]
fn frame_length_follows_the_encoding() {
    let frame = Frame::new(Body::Send(pb::Send {
        body: "x".repeat(100),
        ..Default::default()
    }));
    let binary = frame_len(&frame, Transport::Tcp);
    assert!((100..120).contains(&binary), "{binary}");
    assert_eq!(binary, frame_len(&frame, Transport::WsBinary));
    // JSON adds field names and quotes.
    assert!(frame_len(&frame, Transport::WsJson) > binary);
}
