//! Channels through the client SDK against a real cluster (etcd, Redis, two connection
//! servers, a route): joining and leaving as oneself, sending over the connection and over
//! HTTP, who receives a channel message (the online members but the sender, once), the
//! errors a caller sees, and a force-offline through the business API ending the session
//! without a reconnect.

use anyhow::{bail, Context};
use cim_sdk::{
    pb::{ErrorCode, KickReason, MessageKind, SendStatus},
    ChannelInfo, Client, ClientConfig, ClientError, ConnState, Event, Events, Recipient, Transport,
};
use cim_tests::cluster::Cluster;
use std::time::Duration;

/// Deadline for any single awaited event.
const EVENT_DEADLINE: Duration = Duration::from_secs(30);
/// The business API key of the test clusters.
const API_KEY: &str = "test-api-key-0123456789abcdef";

fn password(name: &str) -> String {
    format!("password-{name}")
}

fn config(cluster: &Cluster, name: &str, transport: Transport) -> ClientConfig {
    let mut c = ClientConfig::new(&cluster.route_url(), name, &password(name));
    c.transport = transport;
    c.reconnect.max_backoff = Duration::from_secs(1);
    c
}

/// Registers `name` and connects it; the first event says it is connected.
async fn user(
    cluster: &Cluster,
    name: &str,
    transport: Transport,
) -> anyhow::Result<(Client, Events)> {
    Client::register(&cluster.route_url(), name, &password(name)).await?;
    let (client, mut events) = Client::connect(config(cluster, name, transport)).await?;
    match next_event(&mut events).await? {
        Event::State(ConnState::Connected { .. }) => Ok((client, events)),
        other => bail!("{name}: first event {other:?}"),
    }
}

async fn next_event(events: &mut Events) -> anyhow::Result<Event> {
    tokio::time::timeout(EVENT_DEADLINE, events.next())
        .await
        .context("no event in time")?
        .context("events ended")
}

/// Messages received up to and including the one whose body is `marker`; fails on any
/// other event on the way (a state change would make "not received" meaningless).
async fn messages_until(
    events: &mut Events,
    marker: &str,
) -> anyhow::Result<Vec<cim_sdk::pb::Message>> {
    let mut messages = Vec::new();
    loop {
        match next_event(events)
            .await
            .with_context(|| format!("waiting for {marker:?}; saw {messages:?}"))?
        {
            Event::Message { message, .. } => {
                let done = message.body == marker;
                messages.push(message);
                if done {
                    return Ok(messages);
                }
            }
            other => bail!("waiting for {marker:?}: unexpected {other:?}"),
        }
    }
}

/// The bodies of `messages`.
fn bodies(messages: &[cim_sdk::pb::Message]) -> Vec<&str> {
    messages.iter().map(|m| m.body.as_str()).collect()
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

fn info(name: &str, members: u64, online: u64) -> ChannelInfo {
    ChannelInfo {
        name: name.into(),
        members,
        online,
    }
}

#[tokio::test]
async fn channel_messages_reach_the_online_members_but_the_sender_once() -> anyhow::Result<()> {
    let cluster = Cluster::builder()
        .route_config(|c| c.max_channels_per_user = 2)
        .start()
        .await?;
    // alice and carol land on one server, bob on the other (round-robin); bob speaks JSON.
    let (alice, mut alice_events) = user(&cluster, "alice", Transport::Tcp).await?;
    let (bob, mut bob_events) = user(&cluster, "bob", Transport::WsJson).await?;
    let (carol, mut carol_events) = user(&cluster, "carol", Transport::Tcp).await?;
    assert_ne!(alice.info().server_id, bob.info().server_id);
    let (alice_id, bob_id) = (alice.info().user_id, bob.info().user_id);

    // Joining: the first join creates the channel, a second one changes nothing.
    assert!(alice.join_channel("room1").await?);
    assert!(!alice.join_channel("room1").await?);
    assert!(bob.join_channel("room1").await?);
    assert_eq!(alice.my_channels().await?, [info("room1", 2, 2)]);
    assert!(carol.my_channels().await?.is_empty());

    // alice → room1: bob only (carol is online but no member; alice is the sender).
    let sent = alice.send_channel("room1", "hi room").await?;
    assert_eq!(sent.status, SendStatus::Delivered);
    assert_eq!(sent.delivered, 1);
    // Markers sent after it close each receiver's window: what came before them is all
    // the channel message could have produced.
    alice.send(Recipient::Id(bob_id), "marker bob 1").await?;
    alice.send("carol".into(), "marker carol 1").await?;
    bob.send(Recipient::Id(alice_id), "marker alice 1").await?;
    let got = messages_until(&mut bob_events, "marker bob 1").await?;
    assert_eq!(bodies(&got), ["hi room", "marker bob 1"], "once: {got:?}");
    let m = &got[0];
    assert_eq!(m.kind(), MessageKind::Channel);
    assert_eq!(m.channel, "room1");
    assert_eq!((m.sender_id, m.sender_name.as_str()), (alice_id, "alice"));
    assert_eq!(
        (m.id.as_str(), m.timestamp_ms),
        (sent.message_id.as_str(), sent.timestamp_ms)
    );
    let got = messages_until(&mut carol_events, "marker carol 1").await?;
    assert_eq!(bodies(&got), ["marker carol 1"], "not a member");
    let got = messages_until(&mut alice_events, "marker alice 1").await?;
    assert_eq!(bodies(&got), ["marker alice 1"], "not the sender");

    // Unicode names work through URLs and over JSON frames; the per-user limit (2 here).
    assert!(alice.join_channel("频道").await?);
    assert!(bob.join_channel("频道").await?);
    let e = alice.join_channel("extra").await.unwrap_err();
    assert_eq!(
        (e.code(), e.status()),
        (Some("too_many_channels"), Some(409)),
        "{e:?}"
    );
    let sent = alice.send_channel("频道", "你好").await?;
    assert_eq!(sent.delivered, 1);
    let got = next_event(&mut bob_events).await?;
    match &got {
        Event::Message { message, replayed } => {
            assert!(!replayed);
            assert_eq!(
                (message.channel.as_str(), message.body.as_str()),
                ("频道", "你好")
            );
        }
        other => bail!("{other:?}"),
    }
    assert_eq!(
        alice.my_channels().await?,
        [info("room1", 2, 2), info("频道", 2, 2)]
    );

    // Members, in user id order, paged.
    let page = bob.channel_members("room1", None, None).await?;
    let members: Vec<_> = page
        .members
        .iter()
        .map(|m| (m.user_id, m.name.as_str(), m.online))
        .collect();
    assert_eq!(members, [(alice_id, "alice", true), (bob_id, "bob", true)]);
    assert_eq!(page.next, None);
    let first = bob.channel_members("room1", None, Some(1)).await?;
    assert_eq!(first.members.len(), 1);
    assert_eq!(first.members[0].user_id, alice_id);
    let after = first.next.context("a second page")?;
    let second = bob.channel_members("room1", Some(after), Some(1)).await?;
    assert_eq!(second.members[0].user_id, bob_id);
    assert_eq!(carol.channel("room1").await?, info("room1", 2, 2));
    let all = carol.channels(None, None).await?;
    assert_eq!(all.channels, [info("room1", 2, 2), info("频道", 2, 2)]);
    let page = carol.channels(None, Some(1)).await?;
    assert_eq!(page.channels, [info("room1", 2, 2)]);
    let page = carol.channels(page.next.as_deref(), Some(1)).await?;
    assert_eq!(page.channels, [info("频道", 2, 2)]);

    // Not a member: the send is refused with FORBIDDEN, and nobody gets it.
    match carol.send_channel("room1", "let me in").await {
        Err(ClientError::Send {
            code: ErrorCode::Forbidden,
            message,
        }) => assert!(!message.is_empty()),
        other => bail!("carol's send: {other:?}"),
    }
    // Bad names never reach the network.
    for bad in ["", "two words", "#room1", "a/b", ".."] {
        for result in [
            alice.join_channel(bad).await.map(drop),
            alice.leave_channel(bad).await.map(drop),
            alice.send_channel(bad, "x").await.map(drop),
        ] {
            match result {
                Err(e @ ClientError::InvalidChannel(_)) => {
                    assert_eq!(e.code(), Some("invalid_channel"));
                }
                other => bail!("{bad:?}: {other:?}"),
            }
        }
    }
    let e = alice.channel("nobody-here").await.unwrap_err();
    assert_eq!(
        (e.code(), e.status()),
        (Some("unknown_channel"), Some(404)),
        "{e:?}"
    );

    // Leaving: bob no longer receives room1, and his list says so.
    assert!(bob.leave_channel("room1").await?);
    assert!(!bob.leave_channel("room1").await?);
    assert_eq!(bob.my_channels().await?, [info("频道", 2, 2)]);
    let sent = alice.send_channel("room1", "anyone?").await?;
    assert_eq!((sent.status, sent.delivered), (SendStatus::Delivered, 0));
    alice.send(Recipient::Id(bob_id), "marker bob 2").await?;
    let got = messages_until(&mut bob_events, "marker bob 2").await?;
    assert_eq!(bodies(&got), ["marker bob 2"], "left: {got:?}");
    match bob.send_channel("room1", "back?").await {
        Err(ClientError::Send {
            code: ErrorCode::Forbidden,
            ..
        }) => {}
        other => bail!("bob's send after leaving: {other:?}"),
    }
    // alice alone in room1: it goes when she leaves.
    assert!(alice.leave_channel("room1").await?);
    assert_eq!(alice.my_channels().await?, [info("频道", 2, 2)]);
    let e = alice.channel("room1").await.unwrap_err();
    assert_eq!(e.code(), Some("unknown_channel"), "{e:?}");
    Ok(())
}

#[tokio::test]
async fn the_route_client_joins_sends_and_lists_over_http() -> anyhow::Result<()> {
    let cluster = Cluster::builder().start().await?;
    let (alice, mut alice_events) = user(&cluster, "alice", Transport::WsBinary).await?;
    assert!(alice.join_channel("news.eu-west_2").await?);
    // dave uses HTTP only: logged in, never connected (so a member, but not online).
    let route = cluster.route();
    let dave = cluster.register_and_login("dave").await?;
    let token = &dave.session_token;
    let joined = route.join_channel(token, "news.eu-west_2").await?;
    assert_eq!(
        (joined.channel.as_str(), joined.joined),
        ("news.eu-west_2", true)
    );
    assert!(!route.join_channel(token, "news.eu-west_2").await?.joined);
    let mine = route.my_channels(token).await?;
    assert_eq!(mine, [info("news.eu-west_2", 2, 1)]);
    assert_eq!(
        route.channel_info(token, "news.eu-west_2").await?,
        info("news.eu-west_2", 2, 1)
    );
    let members = route
        .channel_members(token, "news.eu-west_2", None, None)
        .await?;
    let online: Vec<_> = members
        .members
        .iter()
        .map(|m| (m.name.as_str(), m.online))
        .collect();
    assert_eq!(online, [("alice", true), ("dave", false)]);

    let sent = route
        .send_channel(token, "news.eu-west_2", "over http")
        .await?;
    assert_eq!(sent.delivered, 1);
    match next_event(&mut alice_events).await? {
        Event::Message { message, .. } => {
            assert_eq!(message.id, sent.id);
            assert_eq!(message.kind(), MessageKind::Channel);
            assert_eq!(
                (
                    message.channel.as_str(),
                    message.sender_name.as_str(),
                    message.body.as_str()
                ),
                ("news.eu-west_2", "dave", "over http")
            );
        }
        other => bail!("{other:?}"),
    }
    // A channel message to dave, who is offline: not stored, so nothing waits for him.
    alice.send_channel("news.eu-west_2", "dave is away").await?;

    let left = route.leave_channel(token, "news.eu-west_2").await?;
    assert_eq!((left.channel.as_str(), left.left), ("news.eu-west_2", true));
    let e = route
        .send_channel(token, "news.eu-west_2", "still here?")
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.status()),
        (Some("not_a_member"), Some(403)),
        "{e:?}"
    );
    // Checked before sending, with the route's own code.
    let e = route.join_channel(token, "no spaces").await.unwrap_err();
    assert_eq!(e.code(), Some("invalid_channel"));
    assert!(route.my_channels(token).await?.is_empty());
    let page = route.channels(token, None, None).await?;
    assert_eq!(page.channels, [info("news.eu-west_2", 1, 1)]);
    assert_eq!(page.next, None);
    Ok(())
}

#[tokio::test]
async fn a_force_offline_through_the_business_api_ends_the_session_without_reconnecting(
) -> anyhow::Result<()> {
    let cluster = Cluster::builder()
        .route_config(|c| c.api_keys = vec![API_KEY.to_string()])
        .start()
        .await?;
    let (alice, mut alice_events) = user(&cluster, "alice", Transport::Tcp).await?;
    let (bob, _bob_events) = user(&cluster, "bob", Transport::Tcp).await?;
    let alice_id = alice.info().user_id;
    let http = reqwest::Client::new();
    let kick_url = format!("{}/api/admin/users/{alice_id}/kick", cluster.route_url());

    // Without the key: refused, nothing happens.
    let refused = http
        .post(&kick_url)
        .header("X-Api-Key", "not-the-key")
        .json(&serde_json::json!({"reason": "x"}))
        .send()
        .await?;
    assert_eq!(refused.status(), 401);

    let resp = http
        .post(&kick_url)
        .header("X-Api-Key", API_KEY)
        .json(&serde_json::json!({"reason": "maintenance until 3pm"}))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await?;
    assert_eq!(body, serde_json::json!({"kicked": true}));

    // The kick, then Closed, then the end of the events: no Reconnecting / Connected on the
    // way (the stream ends only once the client gave up for good).
    let rest = rest(&mut alice_events).await?;
    assert!(
        matches!(
            rest.as_slice(),
            [
                Event::Kicked {
                    reason: KickReason::Admin,
                    message,
                },
                Event::State(ConnState::Closed { .. }),
            ] if message == "maintenance until 3pm"
        ),
        "{rest:?}"
    );
    assert!(matches!(alice.info().state, ConnState::Closed { .. }));
    assert!(matches!(
        alice.send_channel("room", "x").await,
        Err(ClientError::Closed)
    ));
    // alice is offline for everyone else, and may log in again when she chooses.
    let online = bob.online_users(None, 10).await?;
    assert!(online.iter().all(|u| u.user_id != alice_id), "{online:?}");
    let (again, _events) = Client::connect(config(&cluster, "alice", Transport::Tcp)).await?;
    assert_eq!(again.info().user_id, alice_id);
    Ok(())
}
