//! End-to-end tests of the client SDK (`cim_sdk::Client`) against a real cluster (etcd,
//! Redis, two connection servers, a route): chatting, reconnecting after a server dies or
//! shuts down, the decisions on kicks, logout, the errors a caller sees, and the delivery
//! guarantees (stored messages, acks, receipts, re-sends after a lost connection).

use anyhow::{bail, Context};
use cim_sdk::{
    pb::{ErrorCode, KickReason, MessageKind, SendStatus},
    Client, ClientConfig, ClientError, ConnState, Event, Events, Recipient, SendOptions, Transport,
};
use cim_tests::cluster::Cluster;
use std::time::Duration;

/// Deadline for any single awaited event; reconnects included (they take a few backoff
/// steps while a killed server's lease expires).
const EVENT_DEADLINE: Duration = Duration::from_secs(30);

fn password(name: &str) -> String {
    format!("password-{name}")
}

/// Config for `name` against the cluster's route, with short backoffs to keep tests fast.
fn config(cluster: &Cluster, name: &str, transport: Transport) -> ClientConfig {
    let mut c = ClientConfig::new(&cluster.route_url(), name, &password(name));
    c.transport = transport;
    c.reconnect.max_backoff = Duration::from_secs(1);
    c
}

/// Registers `name` and connects it.
async fn user(
    cluster: &Cluster,
    name: &str,
    transport: Transport,
) -> anyhow::Result<(Client, Events)> {
    Client::register(&cluster.route_url(), name, &password(name)).await?;
    connected(cluster, name, transport).await
}

/// Connects the registered user `name`; checks that the first event says where it connected.
async fn connected(
    cluster: &Cluster,
    name: &str,
    transport: Transport,
) -> anyhow::Result<(Client, Events)> {
    let (client, mut events) = Client::connect(config(cluster, name, transport)).await?;
    let first = next_event(&mut events).await?;
    let info = client.info();
    match &first {
        Event::State(ConnState::Connected { server_id, addr }) => {
            assert_eq!(Some(server_id), info.server_id.as_ref());
            assert_eq!(Some(addr), info.server_addr.as_ref());
        }
        other => bail!("{name}: first event {other:?}"),
    }
    assert_eq!(info.name, name);
    Ok((client, events))
}

async fn next_event(events: &mut Events) -> anyhow::Result<Event> {
    tokio::time::timeout(EVENT_DEADLINE, events.next())
        .await
        .context("no event in time")?
        .context("events ended")
}

/// Reads events until `pick` accepts one; returns the events read before it and the pick.
async fn wait_for<T>(
    events: &mut Events,
    what: &str,
    mut pick: impl FnMut(&Event) -> Option<T>,
) -> anyhow::Result<(Vec<Event>, T)> {
    let mut skipped = Vec::new();
    let deadline = tokio::time::Instant::now() + EVENT_DEADLINE;
    loop {
        let event = tokio::time::timeout_at(deadline, events.next())
            .await
            .with_context(|| format!("waiting for {what}; saw {skipped:?}"))?
            .with_context(|| format!("events ended waiting for {what}; saw {skipped:?}"))?;
        if let Some(t) = pick(&event) {
            return Ok((skipped, t));
        }
        skipped.push(event);
    }
}

/// The next received message, skipping state events (a message must not come after Closed).
async fn next_message(events: &mut Events) -> anyhow::Result<cim_sdk::pb::Message> {
    Ok(next_received(events).await?.0)
}

/// The next received message and whether it was replayed from the inbox.
async fn next_received(events: &mut Events) -> anyhow::Result<(cim_sdk::pb::Message, bool)> {
    let (skipped, received) = wait_for(events, "a message", |e| match e {
        Event::Message { message, replayed } => Some((message.clone(), *replayed)),
        _ => None,
    })
    .await?;
    assert!(
        skipped
            .iter()
            .all(|e| !matches!(e, Event::State(ConnState::Closed { .. }))),
        "{skipped:?}"
    );
    Ok(received)
}

/// Messages received up to and including the one whose body is `marker`, with their replay
/// flags; the other events on the way are returned too.
async fn messages_until(
    events: &mut Events,
    marker: &str,
) -> anyhow::Result<(Vec<(cim_sdk::pb::Message, bool)>, Vec<Event>)> {
    let mut messages = Vec::new();
    let mut others = Vec::new();
    let deadline = tokio::time::Instant::now() + EVENT_DEADLINE;
    loop {
        let event = tokio::time::timeout_at(deadline, events.next())
            .await
            .with_context(|| format!("waiting for {marker:?}; saw {messages:?} {others:?}"))?
            .with_context(|| format!("events ended waiting for {marker:?}; saw {others:?}"))?;
        match event {
            Event::Message { message, replayed } => {
                let done = message.body == marker;
                messages.push((message, replayed));
                if done {
                    return Ok((messages, others));
                }
            }
            other => others.push(other),
        }
    }
}

/// The server id of the next `Connected` state, and the events before it.
async fn reconnected(events: &mut Events) -> anyhow::Result<(Vec<Event>, String)> {
    wait_for(events, "Connected", |e| match e {
        Event::State(ConnState::Connected { server_id, .. }) => Some(server_id.clone()),
        _ => None,
    })
    .await
}

/// Reads the remaining events up to the end of the stream; fails if it does not end.
async fn rest(events: &mut Events) -> anyhow::Result<Vec<Event>> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + EVENT_DEADLINE;
    while let Some(e) = tokio::time::timeout_at(deadline, events.next())
        .await
        .with_context(|| format!("events did not end; saw {out:?}"))?
    {
        out.push(e);
    }
    Ok(out)
}

fn closed_reason(events: &[Event]) -> Option<&str> {
    match events.last() {
        Some(Event::State(ConnState::Closed { reason })) => Some(reason),
        _ => None,
    }
}

fn server_of(client: &Client) -> String {
    client.info().server_id.expect("connected")
}

/// The error code of a send the cluster or the SDK refused (`None`: another kind of error).
fn send_code(err: &ClientError) -> Option<ErrorCode> {
    match err {
        ClientError::Send { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test]
async fn clients_on_different_servers_chat_privately_and_in_groups() -> anyhow::Result<()> {
    let cluster = Cluster::builder().start().await?;
    let (alice, mut alice_events) = user(&cluster, "alice", Transport::Tcp).await?;
    let (bob, mut bob_events) = user(&cluster, "bob", Transport::Tcp).await?;
    assert_ne!(server_of(&alice), server_of(&bob), "round-robin");
    let bob_id = bob.info().user_id;

    // By id.
    let sent = alice.send(Recipient::Id(bob_id), "hi bob").await?;
    assert_eq!(sent.status, SendStatus::Delivered);
    assert_eq!(sent.delivered, 1);
    assert!(sent.timestamp_ms > 0);
    let m = next_message(&mut bob_events).await?;
    assert_eq!(m.id, sent.message_id);
    assert_eq!(m.body, "hi bob");
    assert_eq!(m.sender_name, "alice");
    assert_eq!(m.sender_id, alice.info().user_id);
    assert_eq!(m.receiver_id, bob_id);
    assert_eq!(m.kind(), MessageKind::Private);

    // By name, the other way round.
    let sent = bob.send("alice".into(), "hello alice ✓").await?;
    assert_eq!(sent.status, SendStatus::Delivered);
    let m = next_message(&mut alice_events).await?;
    assert_eq!((m.body.as_str(), m.sender_id), ("hello alice ✓", bob_id));

    // Group: everyone online except the sender.
    let sent = alice.send_group("hello everyone").await?;
    assert_eq!(sent.status, SendStatus::Delivered);
    assert_eq!(sent.delivered, 1);
    let m = next_message(&mut bob_events).await?;
    assert_eq!(m.body, "hello everyone");
    assert_eq!(m.kind(), MessageKind::Group);
    assert_eq!(m.id, sent.message_id);

    // A registered user who is not connected.
    let carol = Client::register(&cluster.route_url(), "carol", &password("carol")).await?;
    let sent = alice.send(Recipient::Id(carol), "are you there?").await?;
    assert_eq!(sent.status, SendStatus::Stored);
    assert_eq!(sent.delivered, 0);
    assert!(!sent.message_id.is_empty());
    let sent = alice
        .send(Recipient::Name("carol".into()), "still?")
        .await?;
    assert_eq!(sent.status, SendStatus::Stored);

    // Refusals are errors with the route's code, and the connection stays usable.
    let err = alice
        .send(Recipient::Name("nobody".into()), "x")
        .await
        .unwrap_err();
    assert_eq!(send_code(&err), Some(ErrorCode::UnknownUser), "{err:?}");
    let err = alice.send(Recipient::Id(bob_id), "").await.unwrap_err();
    assert_eq!(send_code(&err), Some(ErrorCode::BadRequest), "{err:?}");
    // Too large for the server's frame limit: refused before sending, connection intact.
    let err = alice
        .send(Recipient::Id(bob_id), &"x".repeat(70 * 1024))
        .await
        .unwrap_err();
    assert_eq!(send_code(&err), Some(ErrorCode::FrameTooLarge), "{err:?}");
    let sent = alice
        .send(Recipient::Id(bob_id), "after the refusals")
        .await?;
    assert_eq!(sent.status, SendStatus::Delivered);
    assert_eq!(
        next_message(&mut bob_events).await?.body,
        "after the refusals"
    );
    Ok(())
}

#[tokio::test]
async fn a_client_whose_server_is_killed_reconnects_to_the_other_server() -> anyhow::Result<()> {
    let mut cluster = Cluster::builder()
        .server_config(|c| c.registry_ttl_secs = 2)
        .start()
        .await?;
    let (alice, mut alice_events) = user(&cluster, "alice", Transport::Tcp).await?;
    let (bob, mut bob_events) = user(&cluster, "bob", Transport::Tcp).await?;
    let victim = server_of(&alice);
    let survivor = server_of(&bob);
    assert_ne!(victim, survivor);

    cluster.take_server(&victim).context("victim")?.kill();
    // The loss is reported first, with the attempt that follows.
    match next_event(&mut alice_events).await? {
        Event::State(ConnState::Reconnecting { attempt: 1, .. }) => {}
        other => bail!("expected Reconnecting, got {other:?}"),
    }
    // A send made while reconnecting waits for the new connection.
    let queued = {
        let alice = alice.clone();
        let bob_id = bob.info().user_id;
        tokio::spawn(async move {
            alice
                .send(Recipient::Id(bob_id), "sent while reconnecting")
                .await
        })
    };
    // The route may still hand out the dead server until its lease expires: the client
    // retries by itself and lands on the survivor.
    let (before, server) = reconnected(&mut alice_events).await?;
    assert_eq!(server, survivor, "events before: {before:?}");
    assert!(
        before.iter().all(|e| matches!(
            e,
            Event::State(ConnState::Connecting | ConnState::Reconnecting { .. })
        )),
        "{before:?}"
    );
    assert_eq!(alice.info().server_id.as_deref(), Some(survivor.as_str()));
    assert_eq!(
        alice.info().state,
        ConnState::Connected {
            server_id: survivor.clone(),
            addr: cluster.server(&survivor).unwrap().tcp_addr.to_string()
        }
    );

    let sent = queued.await??;
    assert_eq!(sent.status, SendStatus::Delivered);
    assert_eq!(
        next_message(&mut bob_events).await?.body,
        "sent while reconnecting"
    );
    // And the next message to alice reaches her new connection.
    let sent = bob
        .send(Recipient::Id(alice.info().user_id), "welcome back")
        .await?;
    assert_eq!(sent.status, SendStatus::Delivered);
    assert_eq!(next_message(&mut alice_events).await?.body, "welcome back");
    // Bob, whose server lived, never noticed anything.
    assert!(bob_events.try_next().is_none());
    Ok(())
}

#[tokio::test]
async fn a_graceful_server_shutdown_moves_the_client_to_another_server() -> anyhow::Result<()> {
    let mut cluster = Cluster::builder().start().await?;
    let (alice, mut alice_events) = user(&cluster, "alice", Transport::WsBinary).await?;
    let (bob, mut bob_events) = user(&cluster, "bob", Transport::Tcp).await?;
    let stopping = server_of(&alice);
    cluster
        .take_server(&stopping)
        .context("server")?
        .shutdown()
        .await?;

    match next_event(&mut alice_events).await? {
        Event::Kicked { reason, .. } => assert_eq!(reason, KickReason::ServerShutdown),
        other => bail!("expected the shutdown kick, got {other:?}"),
    }
    match next_event(&mut alice_events).await? {
        Event::State(ConnState::Reconnecting {
            attempt: 1, reason, ..
        }) => {
            assert!(reason.contains("SERVER_SHUTDOWN"), "{reason}");
        }
        other => bail!("expected Reconnecting, got {other:?}"),
    }
    let (_, server) = reconnected(&mut alice_events).await?;
    assert_eq!(server, server_of(&bob));
    // Over WebSocket again: the address is the server's WebSocket one.
    assert_eq!(
        alice.info().server_addr,
        Some(cluster.server(&server).unwrap().ws_addr.to_string())
    );

    let sent = bob
        .send(Recipient::Name("alice".into()), "still here")
        .await?;
    assert_eq!(sent.status, SendStatus::Delivered);
    assert_eq!(next_message(&mut alice_events).await?.body, "still here");
    let sent = alice.send(Recipient::Name("bob".into()), "me too").await?;
    assert_eq!(sent.status, SendStatus::Delivered);
    assert_eq!(next_message(&mut bob_events).await?.body, "me too");
    Ok(())
}

/// A watch of a group's read marks lives in the client, not in one connection: after the
/// client reconnects (its server was killed) it still gets the other members' marks.
#[tokio::test]
async fn a_group_read_mark_watch_survives_a_reconnect() -> anyhow::Result<()> {
    let mut cluster = Cluster::builder()
        .server_config(|c| c.registry_ttl_secs = 2)
        .start()
        .await?;
    let (alice, mut alice_events) = user(&cluster, "alice", Transport::Tcp).await?;
    let (bob, _bob_events) = user(&cluster, "bob", Transport::Tcp).await?;
    let victim = server_of(&alice);
    assert_ne!(victim, server_of(&bob));
    let g = alice
        .create_group("team", &[bob.info().user_id])
        .await?
        .group
        .id;
    let conv = cim_sdk::pb::Conversation {
        user_id: 0,
        group_id: g,
    };
    let first = bob.send_group_chat(g, "hello").await?;
    alice.watch_reads(g, true).await?;

    cluster.take_server(&victim).context("victim")?.kill();
    reconnected(&mut alice_events).await?;
    // The client tells the new connection its watches before anything else it writes: once
    // this send is answered, the server has the watch.
    alice.send_group_chat(g, "back").await?;
    assert_eq!(
        bob.mark_read_http(&conv, first.log_seq).await?,
        first.log_seq
    );
    let (_, (by, seq, c)) = wait_for(&mut alice_events, "bob's read mark", |e| match e {
        Event::ReadMark {
            conversation,
            by_user_id,
            seq,
        } => Some((*by_user_id, *seq, *conversation)),
        _ => None,
    })
    .await?;
    assert_eq!((by, seq, c), (bob.info().user_id, first.log_seq, conv));
    Ok(())
}

#[tokio::test]
async fn connect_errors_are_returned_to_the_caller() -> anyhow::Result<()> {
    let cluster = Cluster::builder().start().await?;
    let url = cluster.route_url();
    Client::register(&url, "alice", &password("alice")).await?;

    // Each of these returns promptly instead of retrying.
    let bounded = |f| tokio::time::timeout(EVENT_DEADLINE, f);

    let err = bounded(Client::connect(ClientConfig::new(
        &url,
        "alice",
        "wrong-password",
    )))
    .await?
    .unwrap_err();
    assert!(matches!(err, ClientError::BadCredentials), "{err:?}");
    assert_eq!(
        (err.code(), err.status()),
        (Some("bad_credentials"), Some(401))
    );
    let err = bounded(Client::connect(ClientConfig::new(
        &url, "nobody", "password",
    )))
    .await?
    .unwrap_err();
    assert!(matches!(err, ClientError::BadCredentials), "{err:?}");

    // A taken name.
    let err = Client::register(&url, "alice", "another-password")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("name_taken"), "{err:?}");

    // A second connect of a connected user is refused, and the first stays connected.
    let (alice, _alice_events) = Client::connect(config(&cluster, "alice", Transport::Tcp)).await?;
    let err = bounded(Client::connect(config(
        &cluster,
        "alice",
        Transport::WsJson,
    )))
    .await?
    .unwrap_err();
    assert!(matches!(err, ClientError::AlreadyLoggedIn(_)), "{err:?}");
    let sent = alice
        .send(Recipient::Id(alice.info().user_id), "note to self")
        .await?;
    assert_eq!(sent.status, SendStatus::Delivered);

    // Nothing listens on the route URL.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()?
    };
    let nowhere = format!("http://{closed}");
    let err = bounded(Client::connect(ClientConfig::new(
        &nowhere, "alice", "password",
    )))
    .await?
    .unwrap_err();
    assert!(err.is_transport(), "{err:?}");
    assert_eq!(err.code(), None);
    let err = Client::register(&nowhere, "zed", "password-zed")
        .await
        .unwrap_err();
    assert!(err.is_transport(), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn no_live_server_is_an_error() -> anyhow::Result<()> {
    let cluster = Cluster::builder().servers(0).start().await?;
    let url = cluster.route_url();
    Client::register(&url, "zed", &password("zed")).await?;
    let err = tokio::time::timeout(
        EVENT_DEADLINE,
        Client::connect(config(&cluster, "zed", Transport::Tcp)),
    )
    .await?
    .unwrap_err();
    assert!(matches!(err, ClientError::NoServer), "{err:?}");
    assert_eq!(err.status(), Some(503));
    Ok(())
}

#[tokio::test]
async fn logout_closes_for_good_and_the_user_can_log_in_again() -> anyhow::Result<()> {
    let cluster = Cluster::builder().start().await?;
    let (alice, mut events) = user(&cluster, "alice", Transport::Tcp).await?;
    let (bob, _bob_events) = user(&cluster, "bob", Transport::Tcp).await?;
    let other_handle = alice.clone();

    alice.logout().await?;
    let rest = rest(&mut events).await?;
    assert_eq!(closed_reason(&rest), Some("logged out"), "{rest:?}");
    assert!(
        !rest
            .iter()
            .any(|e| matches!(e, Event::State(ConnState::Reconnecting { .. }))),
        "{rest:?}"
    );
    assert!(matches!(
        other_handle.info().state,
        ConnState::Closed { .. }
    ));
    let err = other_handle
        .send(Recipient::Name("bob".into()), "x")
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Closed), "{err:?}");
    // A second logout has nothing left to do.
    other_handle.logout().await?;

    // The route freed the slot synchronously: the next login works at once.
    let (alice, mut events) = connected(&cluster, "alice", Transport::WsJson).await?;
    let sent = bob.send(Recipient::Name("alice".into()), "welcome").await?;
    assert_eq!(sent.status, SendStatus::Delivered);
    assert_eq!(next_message(&mut events).await?.body, "welcome");
    drop(alice);
    Ok(())
}

#[tokio::test]
async fn dropping_every_handle_takes_the_user_offline() -> anyhow::Result<()> {
    let cluster = Cluster::builder().start().await?;
    let (alice, mut events) = user(&cluster, "alice", Transport::Tcp).await?;
    let (bob, _bob_events) = user(&cluster, "bob", Transport::Tcp).await?;
    let clone = alice.clone();
    drop(alice);
    // One handle left: still connected.
    let sent = bob
        .send(Recipient::Name("alice".into()), "still there?")
        .await?;
    assert_eq!(sent.status, SendStatus::Delivered);
    drop(clone);

    let rest = rest(&mut events).await?;
    let reason = closed_reason(&rest).context("ends with Closed")?;
    assert!(reason.contains("dropped"), "{reason}");
    // The server noticed the closed connection and freed the user.
    cim_tests::wait_until("alice goes offline", EVENT_DEADLINE, || async {
        bob.online_users(None, 10)
            .await
            .is_ok_and(|users| users.iter().all(|u| u.name != "alice"))
    })
    .await?;
    connected(&cluster, "alice", Transport::Tcp).await?;
    Ok(())
}

#[tokio::test]
async fn kicks_decide_between_reconnecting_and_closing() -> anyhow::Result<()> {
    let cluster = Cluster::builder().start().await?;
    let (alice, mut alice_events) = user(&cluster, "alice", Transport::Tcp).await?;
    let (bob, mut bob_events) = user(&cluster, "bob", Transport::WsJson).await?;

    // A slow-consumer kick: reconnect and carry on.
    let kicked = cluster
        .kick(
            &server_of(&alice),
            alice.info().user_id,
            KickReason::SlowConsumer,
            "too slow",
        )
        .await?;
    assert_eq!(kicked, [alice.info().user_id]);
    match next_event(&mut alice_events).await? {
        Event::Kicked { reason, message } => {
            assert_eq!(
                (reason, message.as_str()),
                (KickReason::SlowConsumer, "too slow")
            );
        }
        other => bail!("expected the kick, got {other:?}"),
    }
    reconnected(&mut alice_events).await?;
    let sent = bob.send(Recipient::Name("alice".into()), "back?").await?;
    assert_eq!(sent.status, SendStatus::Delivered);
    assert_eq!(next_message(&mut alice_events).await?.body, "back?");

    // An admin kick (forced offline): no reconnect, the events end.
    cluster
        .kick(
            &server_of(&bob),
            bob.info().user_id,
            KickReason::Admin,
            "banned for a while",
        )
        .await?;
    let rest = rest(&mut bob_events).await?;
    assert!(
        matches!(
            rest.first(),
            Some(Event::Kicked {
                reason: KickReason::Admin,
                ..
            })
        ),
        "{rest:?}"
    );
    assert_eq!(rest.len(), 2, "kick then closed: {rest:?}");
    assert!(
        closed_reason(&rest).is_some_and(|r| r.contains("ADMIN")),
        "{rest:?}"
    );
    assert!(matches!(
        bob.send_group("anyone?").await,
        Err(ClientError::Closed)
    ));
    // Bob is offline now.
    let sent = alice.send(Recipient::Name("bob".into()), "bob?").await?;
    assert_eq!(sent.status, SendStatus::Stored);
    Ok(())
}

#[tokio::test]
async fn reconnecting_gives_up_after_max_attempts() -> anyhow::Result<()> {
    let mut cluster = Cluster::builder().servers(1).start().await?;
    Client::register(&cluster.route_url(), "alice", &password("alice")).await?;
    let mut c = config(&cluster, "alice", Transport::Tcp);
    c.reconnect.initial_backoff = Duration::from_millis(10);
    c.reconnect.max_attempts = Some(2);
    let (alice, mut events) = Client::connect(c).await?;
    let server = server_of(&alice);
    // The only server goes away: every re-login answers no_server.
    cluster
        .take_server(&server)
        .context("server")?
        .shutdown()
        .await?;

    let events = rest(&mut events).await?;
    let states: Vec<_> = events
        .iter()
        .map(|e| match e {
            Event::State(ConnState::Connected { .. }) => "connected".to_string(),
            Event::State(ConnState::Connecting) => "connecting".to_string(),
            Event::State(ConnState::Reconnecting { attempt, .. }) => {
                format!("reconnecting {attempt}")
            }
            Event::State(ConnState::Closed { .. }) => "closed".to_string(),
            Event::Kicked { reason, .. } => format!("kicked {}", reason.as_str_name()),
            Event::Message { .. } => "message".to_string(),
            Event::Receipt { .. } => "receipt".to_string(),
            Event::ReadMark { .. } => "read mark".to_string(),
            Event::Typing { .. } => "typing".to_string(),
        })
        .collect();
    assert_eq!(
        states,
        [
            "connected",
            "kicked KICK_REASON_SERVER_SHUTDOWN",
            "reconnecting 1",
            "connecting",
            "reconnecting 2",
            "connecting",
            "closed"
        ]
    );
    let reason = closed_reason(&events).unwrap_or_default();
    assert!(reason.contains("gave up after 2"), "{reason}");
    assert!(reason.contains("no_server"), "{reason}");
    match &events[4] {
        Event::State(ConnState::Reconnecting { reason, .. }) => {
            assert!(reason.contains("no_server"), "{reason}")
        }
        other => bail!("{other:?}"),
    }
    assert!(matches!(
        alice.send_group("hello?").await,
        Err(ClientError::Closed)
    ));
    assert!(matches!(alice.info().state, ConnState::Closed { .. }));
    Ok(())
}

/// A TCP proxy in front of `upstream`: the first connection it accepts goes silent (both
/// directions stop, sockets stay open) when `freeze` fires; later connections pass through.
async fn freezable_proxy(
    listener: tokio::net::TcpListener,
    upstream: std::net::SocketAddr,
    freeze: tokio::sync::oneshot::Receiver<()>,
) {
    let mut freeze = Some(freeze);
    while let Ok((mut client, _)) = listener.accept().await {
        let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
            continue;
        };
        let freeze = freeze.take();
        tokio::spawn(async move {
            let pipe = tokio::io::copy_bidirectional(&mut client, &mut server);
            match freeze {
                Some(freeze) => {
                    tokio::select! {
                        _ = pipe => {}
                        _ = freeze => std::future::pending::<()>().await,
                    }
                }
                None => {
                    let _ = pipe.await;
                }
            }
        });
    }
}

#[tokio::test]
async fn a_silent_connection_is_detected_by_heartbeats_and_replaced() -> anyhow::Result<()> {
    // The server advertises a proxy, so the test can silence one connection without closing it
    // (a dead network path, a frozen process).
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let proxy_addr = proxy.local_addr()?.to_string();
    let cluster = Cluster::builder()
        .servers(1)
        .server_config(move |c| {
            c.advertise_tcp = Some(proxy_addr.clone());
            c.heartbeat_interval_ms = 200;
        })
        .start()
        .await?;
    let (freeze, frozen) = tokio::sync::oneshot::channel();
    tokio::spawn(freezable_proxy(proxy, cluster.servers[0].tcp_addr, frozen));

    let (alice, mut alice_events) = user(&cluster, "alice", Transport::Tcp).await?;
    let (bob, _bob_events) = user(&cluster, "bob", Transport::Tcp).await?;
    let _ = freeze.send(());

    // No pong within two heartbeat intervals: the client gives the connection up by itself.
    match next_event(&mut alice_events).await? {
        Event::State(ConnState::Reconnecting { reason, .. }) => {
            assert!(reason.contains("no answer from the server"), "{reason}");
        }
        other => bail!("expected Reconnecting, got {other:?}"),
    }
    reconnected(&mut alice_events).await?;
    let sent = bob
        .send(Recipient::Id(alice.info().user_id), "found you")
        .await?;
    assert_eq!(sent.status, SendStatus::Delivered);
    assert_eq!(next_message(&mut alice_events).await?.body, "found you");
    Ok(())
}

#[tokio::test]
async fn online_users_are_filtered_by_prefix_and_limited() -> anyhow::Result<()> {
    let cluster = Cluster::builder().start().await?;
    let mut clients = Vec::new();
    for name in ["ann", "anna", "annie", "bob"] {
        clients.push(user(&cluster, name, Transport::Tcp).await?);
    }
    let bob = &clients[3].0;
    let names = |users: Vec<cim_sdk::OnlineUser>| -> Vec<String> {
        users.into_iter().map(|u| u.name).collect()
    };
    assert_eq!(
        names(bob.online_users(Some("ann"), 10).await?),
        ["ann", "anna", "annie"]
    );
    assert_eq!(
        names(bob.online_users(Some("ann"), 2).await?),
        ["ann", "anna"]
    );
    assert_eq!(names(bob.online_users(Some("anni"), 10).await?), ["annie"]);
    assert!(bob.online_users(Some("zz"), 10).await?.is_empty());
    assert!(bob.online_users(None, 0).await?.is_empty());
    let all = bob.online_users(None, 1000).await?;
    assert_eq!(all.len(), 4);
    let ann = all.iter().find(|u| u.name == "ann").context("ann")?;
    assert_eq!(ann.user_id, clients[0].0.info().user_id);
    assert_eq!(Some(&ann.server_id), clients[0].0.info().server_id.as_ref());
    Ok(())
}

#[tokio::test]
async fn a_websocket_json_client_chats_with_a_tcp_client() -> anyhow::Result<()> {
    let cluster = Cluster::builder().start().await?;
    let (web, mut web_events) = user(&cluster, "web", Transport::WsJson).await?;
    let (tcp, mut tcp_events) = user(&cluster, "tcp", Transport::Tcp).await?;
    assert_eq!(
        web.info().server_addr,
        Some(
            cluster
                .server(&server_of(&web))
                .unwrap()
                .ws_addr
                .to_string()
        )
    );

    let sent = web
        .send(Recipient::Name("tcp".into()), "from the browser <b>&</b>")
        .await?;
    assert_eq!(sent.status, SendStatus::Delivered);
    let m = next_message(&mut tcp_events).await?;
    assert_eq!(m.body, "from the browser <b>&</b>");
    assert_eq!(m.sender_name, "web");

    let sent = tcp
        .send(Recipient::Id(web.info().user_id), "from the terminal ✓")
        .await?;
    assert_eq!(sent.status, SendStatus::Delivered);
    let m = next_message(&mut web_events).await?;
    assert_eq!(
        (m.body.as_str(), m.id.as_str()),
        ("from the terminal ✓", sent.message_id.as_str())
    );

    let sent = web.send_group("json group").await?;
    assert_eq!(sent.delivered, 1);
    assert_eq!(next_message(&mut tcp_events).await?.body, "json group");
    Ok(())
}

#[tokio::test]
async fn a_message_to_an_offline_user_is_stored_and_arrives_once_at_login() -> anyhow::Result<()> {
    let cluster = Cluster::builder().start().await?;
    let (alice, _alice_events) = user(&cluster, "alice", Transport::Tcp).await?;
    Client::register(&cluster.route_url(), "carol", &password("carol")).await?;

    let stored = alice
        .send(Recipient::Name("carol".into()), "while you were away")
        .await?;
    assert_eq!(stored.status, SendStatus::Stored);
    assert_eq!(stored.delivered, 0);

    // At login the inbox comes first, marked as replayed, then live messages. The server
    // reads the inbox before answering the login: a message sent once `connect` returned is
    // never part of the replay.
    let (carol, mut carol_events) = connected(&cluster, "carol", Transport::WsJson).await?;
    let live = alice
        .send(Recipient::Id(carol.info().user_id), "welcome")
        .await?;
    assert_eq!(live.status, SendStatus::Delivered);
    let (messages, _) = messages_until(&mut carol_events, "welcome").await?;
    let seen: Vec<(&str, bool)> = messages
        .iter()
        .map(|(m, replayed)| (m.body.as_str(), *replayed))
        .collect();
    assert_eq!(seen, [("while you were away", true), ("welcome", false)]);
    let (m, _) = &messages[0];
    assert_eq!(m.id, stored.message_id);
    assert_eq!(m.timestamp_ms, stored.timestamp_ms, "the time it was sent");
    assert_eq!(m.sender_name, "alice");
    assert_eq!(m.kind(), MessageKind::Private);
    assert!(m.seq > 0, "stored messages carry their inbox position");
    assert_eq!(messages[1].0.id, live.message_id);
    Ok(())
}

#[tokio::test]
async fn receipts_reach_the_sender_once_the_receiver_acked() -> anyhow::Result<()> {
    let cluster = Cluster::builder().start().await?;
    let (alice, mut alice_events) = user(&cluster, "alice", Transport::Tcp).await?;
    let (bob, mut bob_events) = user(&cluster, "bob", Transport::WsBinary).await?;
    let bob_id = bob.info().user_id;
    let receipt = || SendOptions {
        receipt: true,
        ..SendOptions::default()
    };

    // Online: bob's SDK acks the message, alice gets the receipt.
    let sent = alice
        .send_with(Recipient::Id(bob_id), "read me", receipt())
        .await?;
    assert_eq!(sent.status, SendStatus::Delivered);
    let (m, replayed) = next_received(&mut bob_events).await?;
    assert_eq!(
        (m.body.as_str(), m.receipt, replayed),
        ("read me", true, false)
    );
    let (skipped, (message_id, by_user_id, by_name, at_ms)) =
        wait_for(&mut alice_events, "a receipt", |e| match e {
            Event::Receipt {
                message_id,
                by_user_id,
                by_name,
                at_ms,
            } => Some((message_id.clone(), *by_user_id, by_name.clone(), *at_ms)),
            _ => None,
        })
        .await?;
    assert!(skipped.is_empty(), "{skipped:?}");
    assert_eq!(message_id, sent.message_id);
    assert_eq!((by_user_id, by_name.as_str()), (bob_id, "bob"));
    assert!(
        at_ms >= sent.timestamp_ms,
        "{at_ms} < {}",
        sent.timestamp_ms
    );

    // The receipt exists because the ack removed the message from bob's inbox: a new
    // connection of bob does not get it again.
    bob.logout().await?;
    let (bob, mut bob_events) = connected(&cluster, "bob", Transport::Tcp).await?;
    alice.send(Recipient::Id(bob_id), "marker").await?;
    let (messages, _) = messages_until(&mut bob_events, "marker").await?;
    assert_eq!(messages.len(), 1, "nothing replayed: {messages:?}");

    // A message without a receipt request gets none.
    alice.send(Recipient::Id(bob_id), "no receipt").await?;
    assert!(!next_message(&mut bob_events).await?.receipt);

    // Offline both ways: carol acks while alice is offline; the receipt waits in alice's
    // inbox and arrives at her next login, after the messages stored before it.
    Client::register(&cluster.route_url(), "carol", &password("carol")).await?;
    let for_carol = alice
        .send_with(Recipient::Name("carol".into()), "when you can", receipt())
        .await?;
    assert_eq!(for_carol.status, SendStatus::Stored);
    alice.logout().await?;
    let (_carol, mut carol_events) = connected(&cluster, "carol", Transport::Tcp).await?;
    let (m, replayed) = next_received(&mut carol_events).await?;
    assert_eq!(
        (m.id.as_str(), replayed),
        (for_carol.message_id.as_str(), true)
    );
    let (_alice, mut alice_events) = connected(&cluster, "alice", Transport::Tcp).await?;
    let (_, message_id) = wait_for(&mut alice_events, "the stored receipt", |e| match e {
        Event::Receipt {
            message_id,
            by_name,
            ..
        } if by_name == "carol" => Some(message_id.clone()),
        _ => None,
    })
    .await?;
    assert_eq!(message_id, for_carol.message_id);
    drop(bob);
    Ok(())
}

/// A TCP proxy in front of `upstream` whose server-to-client direction can be muted: while
/// `mute` is set, what the server writes is read and dropped (the client hears nothing, the
/// server still gets everything). When the server side closes, so does the client side.
async fn mutable_proxy(
    listener: tokio::net::TcpListener,
    upstream: std::net::SocketAddr,
    mute: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    while let Ok((client, _)) = listener.accept().await {
        let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
            continue;
        };
        let mute = mute.clone();
        tokio::spawn(async move {
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            let up = tokio::io::copy(&mut client_read, &mut server_write);
            let down = async {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match server_read.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if mute.load(std::sync::atomic::Ordering::SeqCst) {
                                continue;
                            }
                            if client_write.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            };
            tokio::select! {
                _ = up => {}
                () = down => {}
            }
        });
    }
}

#[tokio::test]
async fn a_send_in_flight_when_the_server_dies_is_resent_and_received_once() -> anyhow::Result<()> {
    // Each server is reached through a proxy that can mute it, so a send can reach the
    // server while its result never comes back.
    let proxies = [
        tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    ];
    let advertised: Vec<String> = proxies
        .iter()
        .map(|p| p.local_addr().map(|a| a.to_string()))
        .collect::<Result<_, _>>()?;
    let started = std::sync::atomic::AtomicUsize::new(0);
    let mut cluster = Cluster::builder()
        .server_config(move |c| {
            let i = started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            c.advertise_tcp = Some(advertised[i].clone());
            c.registry_ttl_secs = 2;
        })
        .start()
        .await?;
    let mut mutes = Vec::new();
    for (proxy, server) in proxies.into_iter().zip(&cluster.servers) {
        let mute = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        tokio::spawn(mutable_proxy(proxy, server.tcp_addr, mute.clone()));
        mutes.push((server.id.clone(), mute));
    }

    let (alice, mut alice_events) = user(&cluster, "alice", Transport::Tcp).await?;
    let (bob, mut bob_events) = user(&cluster, "bob", Transport::Tcp).await?;
    let victim = server_of(&alice);
    assert_ne!(victim, server_of(&bob), "round-robin");
    let (_, mute) = mutes
        .iter()
        .find(|(id, _)| *id == victim)
        .context("proxy")?;

    // Alice's server takes the send and routes it (bob has it), but its answer is lost ...
    mute.store(true, std::sync::atomic::Ordering::SeqCst);
    let in_flight = {
        let alice = alice.clone();
        let bob_id = bob.info().user_id;
        tokio::spawn(async move { alice.send(Recipient::Id(bob_id), "in flight").await })
    };
    let (first, replayed) = next_received(&mut bob_events).await?;
    assert_eq!((first.body.as_str(), replayed), ("in flight", false));
    // ... and then the server dies.
    cluster.take_server(&victim).context("victim")?.kill();
    let (_, server) = reconnected(&mut alice_events).await?;
    assert_ne!(server, victim);

    // The SDK wrote the send again on the new connection, with the same id: the caller gets
    // its result instead of `ConnectionLost`, under the id bob already has.
    let sent = tokio::time::timeout(EVENT_DEADLINE, in_flight).await???;
    assert_eq!(sent.message_id, first.id);
    assert!(
        matches!(sent.status, SendStatus::Delivered | SendStatus::Stored),
        "{sent:?}"
    );
    // Bob sees it once.
    alice
        .send(Recipient::Name("bob".into()), "after the crash")
        .await?;
    let (messages, _) = messages_until(&mut bob_events, "after the crash").await?;
    assert_eq!(messages.len(), 1, "no second copy: {messages:?}");
    Ok(())
}

#[tokio::test]
async fn messages_over_64_kib_are_sent_stored_and_replayed_over_tcp() -> anyhow::Result<()> {
    // The server reads frames up to 512 KiB and the route takes messages up to 256 KiB: the
    // SDK must use the server's announced limit, not its own 64 KiB default, both ways.
    let cluster = Cluster::builder()
        .server_config(|c| c.max_frame_len = 512 * 1024)
        .route_config(|c| {
            c.max_message_len = 256 * 1024;
            c.max_request_body = 300 * 1024;
        })
        .start()
        .await?;
    let (alice, mut alice_events) = user(&cluster, "alice", Transport::Tcp).await?;
    Client::register(&cluster.route_url(), "carol", &password("carol")).await?;
    let big = |tag: char| tag.to_string().repeat(200 * 1024);

    // Stored for an offline user, then replayed to the SDK at its login.
    let stored = alice
        .send(Recipient::Name("carol".into()), &big('s'))
        .await?;
    assert_eq!(stored.status, SendStatus::Stored);
    let (carol, mut carol_events) = connected(&cluster, "carol", Transport::Tcp).await?;
    let live = alice
        .send(Recipient::Id(carol.info().user_id), "after the big one")
        .await?;
    assert_eq!(live.status, SendStatus::Delivered);
    let (messages, others) = messages_until(&mut carol_events, "after the big one").await?;
    let seen: Vec<(usize, bool)> = messages
        .iter()
        .map(|(m, replayed)| (m.body.len(), *replayed))
        .collect();
    assert_eq!(seen, [(200 * 1024, true), (17, false)]);
    assert_eq!(messages[0].0.id, stored.message_id);
    assert_eq!(messages[0].0.body, big('s'));
    // No reconnect on the way: the replay was read, not refused by the decoder.
    assert!(others.is_empty(), "{others:?}");

    // Sent live from the SDK, both ways.
    let sent = carol
        .send(Recipient::Id(alice.info().user_id), &big('c'))
        .await?;
    assert_eq!(sent.status, SendStatus::Delivered, "{sent:?}");
    let m = next_message(&mut alice_events).await?;
    assert_eq!(m.body, big('c'));
    assert_eq!(m.sender_name, "carol");
    let sent = alice
        .send(Recipient::Id(carol.info().user_id), &big('a'))
        .await?;
    assert_eq!(sent.status, SendStatus::Delivered, "{sent:?}");
    assert_eq!(next_message(&mut carol_events).await?.body, big('a'));

    // Over the server's own limit: refused before sending, the connection stays.
    let err = alice
        .send(Recipient::Id(carol.info().user_id), &"x".repeat(600 * 1024))
        .await
        .unwrap_err();
    assert_eq!(send_code(&err), Some(ErrorCode::FrameTooLarge), "{err:?}");
    assert_eq!(
        alice
            .send(Recipient::Id(carol.info().user_id), "still here")
            .await?
            .status,
        SendStatus::Delivered
    );
    assert_eq!(next_message(&mut carol_events).await?.body, "still here");
    Ok(())
}
