//! Delivery guarantees end to end (real etcd and Redis, servers and routes in-process, raw
//! protocol through `TestUser`): private messages are stored in the receiver's inbox before
//! they are pushed, replayed at every new connection until acked, receipts follow acks,
//! group messages are never stored, client-chosen ids make a message idempotent (a group or
//! channel message reaches everyone once however often it is sent), and a slow
//! consumer that is thrown out loses nothing.

use cim_common::store::StateStore;
use cim_sdk::{
    pb::{self, frame::Body, ErrorCode, Frame, KickReason, MessageKind, SendStatus},
    Transport,
};
use cim_tests::cluster::{test_password, Cluster};
use std::{sync::Arc, time::Duration};

/// Deadline of a re-login (the previous connection's slot is released asynchronously).
const RELOGIN: Duration = Duration::from_secs(10);
/// Deadline of an inbox change (acks are applied asynchronously, in batches).
const INBOX: Duration = Duration::from_secs(10);

/// The Push frames among `frames`.
fn pushes(frames: &[Frame]) -> Vec<&pb::Push> {
    frames
        .iter()
        .filter_map(|f| match &f.body {
            Some(Body::Push(p)) => Some(p),
            _ => None,
        })
        .collect()
}

fn kick_reason(frames: &[Frame]) -> Option<KickReason> {
    frames.iter().find_map(|f| match &f.body {
        Some(Body::Kick(k)) => KickReason::try_from(k.reason).ok(),
        _ => None,
    })
}

/// Waits until `user_id`'s inbox holds `len` messages.
async fn inbox_len_becomes(
    store: &Arc<dyn StateStore>,
    user_id: u64,
    len: usize,
) -> anyhow::Result<()> {
    cim_tests::cluster::inbox_len_becomes(store, user_id, len, INBOX).await
}

fn private(to: u64, body: &str) -> pb::Send {
    pb::Send {
        kind: MessageKind::Private as i32,
        to_user_id: to,
        body: body.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_message_to_an_offline_user_is_stored_replayed_once_and_gone_after_its_ack(
) -> anyhow::Result<()> {
    let cluster = Cluster::builder().start().await?;
    let store = cluster.store().await?;
    let mut alice = cluster.user("alice", Transport::Tcp).await?;
    let bob_id = cluster
        .route()
        .register("bob", &test_password("bob"))
        .await?
        .user_id;

    let r = alice.send_private(bob_id, "while you were out").await?;
    assert_eq!(r.status(), SendStatus::Stored, "{r:?}");
    assert!(!r.message_id.is_empty(), "{r:?}");
    assert_eq!(r.delivered, 0);
    assert_eq!(store.inbox_len(bob_id).await?, 1);

    // Bob's first connection starts with the replay of his inbox.
    let mut bob = cluster.relogin("bob", Transport::Tcp, RELOGIN).await?;
    let push = bob.next_push().await?;
    assert!(push.replay, "{push:?}");
    assert_eq!(push.messages.len(), 1, "{push:?}");
    let m = &push.messages[0];
    assert_eq!(m.id, r.message_id);
    assert_eq!(m.body, "while you were out");
    assert_eq!(m.sender_id, alice.id());
    assert_eq!(m.sender_name, "alice");
    assert_eq!(m.receiver_id, bob_id);
    assert_eq!(m.kind(), MessageKind::Private);
    assert!(m.seq > 0, "stored messages have a seq: {m:?}");
    assert_eq!(m.timestamp_ms, r.timestamp_ms);
    // Once: no live copy follows the replay.
    let before = bob.ping(1).await?;
    assert!(pushes(&before).is_empty(), "{before:?}");

    bob.ack(vec![m.id.clone()]).await?;
    inbox_len_becomes(&store, bob_id, 0).await?;
    drop(bob);
    let mut bob = cluster.relogin("bob", Transport::Tcp, RELOGIN).await?;
    let before = bob.ping(2).await?;
    assert!(
        pushes(&before).is_empty(),
        "an acked message was replayed: {before:?}"
    );
    Ok(())
}

#[tokio::test]
async fn unacked_messages_are_replayed_on_reconnect_with_the_same_ids_in_order(
) -> anyhow::Result<()> {
    let cluster = Cluster::builder().start().await?;
    let store = cluster.store().await?;
    let mut alice = cluster.user("alice", Transport::Tcp).await?;
    // JSON over WebSocket: seq (uint64) and replay survive the proto3 JSON mapping too.
    let mut bob = cluster.user("bob", Transport::WsJson).await?;

    let mut ids = Vec::new();
    for i in 0..5 {
        let r = alice.send_private(bob.id(), &format!("m{i}")).await?;
        assert_eq!(r.status(), SendStatus::Delivered, "{r:?}");
        ids.push(r.message_id);
    }
    let mut live = Vec::new();
    for _ in 0..5 {
        let (m, replay) = bob.next_delivery().await?;
        assert!(!replay, "a live push is not a replay: {m:?}");
        live.push(m);
    }
    let live_ids: Vec<&str> = live.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(live_ids, ids);
    assert!(live.windows(2).all(|w| w[0].seq < w[1].seq), "{live:?}");
    assert_eq!(store.inbox_len(bob.id()).await?, 5, "nothing acked yet");

    // Reconnect without acking: the same five, same ids, same seqs, same order, as replay.
    drop(bob);
    let mut bob = cluster.relogin("bob", Transport::WsJson, RELOGIN).await?;
    let mut replayed = Vec::new();
    while replayed.len() < 5 {
        let (m, replay) = bob.next_delivery().await?;
        assert!(replay, "expected the replay, got a live push: {m:?}");
        replayed.push(m);
    }
    assert_eq!(replayed, live, "the replay repeats the messages exactly");
    let before = bob.ping(1).await?;
    assert!(pushes(&before).is_empty(), "{before:?}");

    // Acked, and the next live message is not a replay.
    bob.ack(ids.clone()).await?;
    inbox_len_becomes(&store, bob.id(), 0).await?;
    alice.send_private(bob.id(), "after the replay").await?;
    let (m, replay) = bob.next_delivery().await?;
    assert_eq!(m.body, "after the replay");
    assert!(!replay);
    assert!(m.seq > live[4].seq, "seqs are never reused: {m:?}");
    Ok(())
}

#[tokio::test]
async fn a_receipt_comes_only_after_the_receiver_acked() -> anyhow::Result<()> {
    let cluster = Cluster::builder().start().await?;
    let store = cluster.store().await?;
    let mut alice = cluster.user("alice", Transport::Tcp).await?;
    let mut bob = cluster.user("bob", Transport::Tcp).await?;

    let r = alice
        .send(pb::Send {
            receipt: true,
            ..private(bob.id(), "tell me when you read this")
        })
        .await?;
    assert_eq!(r.status(), SendStatus::Delivered, "{r:?}");
    let (m, _) = bob.next_delivery().await?;
    assert_eq!(m.id, r.message_id);
    assert!(
        m.receipt,
        "the receiver sees that a receipt was asked for: {m:?}"
    );

    // Received but not acked: no receipt for alice, neither pushed nor stored.
    let before = alice.ping(1).await?;
    assert!(
        pushes(&before).is_empty(),
        "receipt before the ack: {before:?}"
    );
    assert_eq!(store.inbox_len(alice.id()).await?, 0);

    bob.ack(vec![m.id.clone()]).await?;
    let (receipt, replay) = alice.next_delivery().await?;
    assert!(!replay);
    assert_eq!(receipt.kind(), MessageKind::Receipt, "{receipt:?}");
    assert_eq!(receipt.receipt_for, r.message_id);
    assert_eq!(receipt.sender_id, bob.id(), "from the one who acked");
    assert_eq!(receipt.sender_name, "bob");
    assert_eq!(receipt.receiver_id, alice.id());
    assert!(
        receipt.seq > 0,
        "receipts are stored until acked: {receipt:?}"
    );
    assert_ne!(receipt.id, r.message_id);
    inbox_len_becomes(&store, bob.id(), 0).await?;

    // Receipts are acked like messages.
    assert_eq!(store.inbox_len(alice.id()).await?, 1);
    alice.ack(vec![receipt.id.clone()]).await?;
    inbox_len_becomes(&store, alice.id(), 0).await?;
    Ok(())
}

#[tokio::test]
async fn a_receipt_waits_in_the_inbox_of_an_offline_sender() -> anyhow::Result<()> {
    let cluster = Cluster::builder().start().await?;
    let mut alice = cluster.user("alice", Transport::Tcp).await?;
    let mut bob = cluster.user("bob", Transport::Tcp).await?;
    let r = alice
        .send(pb::Send {
            receipt: true,
            ..private(bob.id(), "read me later")
        })
        .await?;
    assert!(matches!(
        r.status(),
        SendStatus::Delivered | SendStatus::Stored
    ));
    drop(alice);
    let (m, _) = bob.next_delivery().await?;
    // Acked only once alice is surely offline (her route released on close).
    let store = cluster.store().await?;
    let alice_id = m.sender_id;
    cim_tests::wait_until("alice to be offline", RELOGIN, || {
        let store = store.clone();
        async move {
            store
                .routes(&[alice_id])
                .await
                .is_ok_and(|r| r.iter().all(Option::is_none))
        }
    })
    .await?;
    bob.ack(vec![m.id]).await?;
    inbox_len_becomes(&store, alice_id, 1).await?;
    let mut alice = cluster.relogin("alice", Transport::Tcp, RELOGIN).await?;
    let push = alice.next_push().await?;
    assert!(push.replay, "{push:?}");
    assert_eq!(push.messages.len(), 1, "{push:?}");
    assert_eq!(push.messages[0].kind(), MessageKind::Receipt);
    assert_eq!(push.messages[0].receipt_for, r.message_id);
    Ok(())
}

/// A receipt is as durable as a private message: the receiver acks while no route is up (the
/// only one was killed), so the receipt cannot be stored for the sender then; it is sent again
/// once a route is back (by the server's retry, or at the receiver's next login) and reaches
/// the sender once (issue 18 item 3: before, the failed forward was only logged and the
/// receipt was lost).
#[tokio::test]
async fn a_receipt_survives_the_route_being_killed_between_ack_and_receipt() -> anyhow::Result<()> {
    let mut cluster = Cluster::builder().start().await?;
    let store = cluster.store().await?;
    let mut alice = cluster.user("alice", Transport::Tcp).await?;
    let mut bob = cluster.user("bob", Transport::Tcp).await?;
    let r = alice
        .send(pb::Send {
            receipt: true,
            ..private(bob.id(), "tell me when you read this")
        })
        .await?;
    let (m, _) = bob.next_delivery().await?;
    assert_eq!(m.id, r.message_id);

    cluster.routes.remove(0).kill();
    bob.ack(vec![m.id.clone()]).await?;
    // The ack is applied (the message left bob's inbox); its receipt has nowhere to go.
    inbox_len_becomes(&store, bob.id(), 0).await?;
    assert_eq!(store.inbox_len(alice.id()).await?, 0, "no route stored it");

    let route = cim_tests::cluster::RouteNode::start(cluster.route_config(&|_| {})).await?;
    cluster.routes.push(route);
    // Bob comes back through the new route (his next login sends pending receipts again).
    drop(bob);
    let _bob = cluster.relogin("bob", Transport::Tcp, RELOGIN).await?;
    let (receipt, _) = alice.next_delivery().await?;
    assert_eq!(receipt.kind(), MessageKind::Receipt, "{receipt:?}");
    assert_eq!(receipt.receipt_for, r.message_id);
    assert_eq!(receipt.sender_id, m.receiver_id);
    // Confirmed: nothing is pending any more, and it is stored once.
    let bob_id = m.receiver_id;
    cim_tests::wait_until("the receipt to be confirmed", RELOGIN, || {
        let store = store.clone();
        async move {
            store
                .pending_receipts(bob_id, 10)
                .await
                .is_ok_and(|p| p.is_empty())
        }
    })
    .await?;
    assert_eq!(store.inbox_len(alice.id()).await?, 1);
    Ok(())
}

#[tokio::test]
async fn group_messages_go_to_whoever_is_online_and_are_never_stored() -> anyhow::Result<()> {
    let cluster = Cluster::builder().start().await?;
    let store = cluster.store().await?;
    let mut alice = cluster.user("alice", Transport::Tcp).await?;
    let mut carol = cluster.user("carol", Transport::WsBinary).await?;
    let bob_id = cluster
        .route()
        .register("bob", &test_password("bob"))
        .await?
        .user_id;

    let r = alice.send_group("to everyone online").await?;
    assert_eq!(r.status(), SendStatus::Delivered, "{r:?}");
    assert_eq!(r.delivered, 1, "carol only: {r:?}");
    let (m, replay) = carol.next_delivery().await?;
    assert_eq!(m.kind(), MessageKind::Group);
    assert_eq!(m.body, "to everyone online");
    assert_eq!(m.seq, 0, "group messages are not stored: {m:?}");
    assert!(!replay);

    for user in [alice.id(), carol.id(), bob_id] {
        assert_eq!(store.inbox_len(user).await?, 0, "inbox of {user}");
    }
    let mut bob = cluster.relogin("bob", Transport::Tcp, RELOGIN).await?;
    let before = bob.ping(1).await?;
    assert!(
        pushes(&before).is_empty(),
        "an offline user got a group message: {before:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_group_or_channel_message_sent_twice_with_the_same_id_reaches_everyone_once(
) -> anyhow::Result<()> {
    let cluster = Cluster::builder().start().await?;
    let store = cluster.store().await?;
    let mut alice = cluster.user("alice", Transport::Tcp).await?;
    let mut carol = cluster.user("carol", Transport::WsBinary).await?;
    store.channel_join("room", alice.id(), 10).await?;
    store.channel_join("room", carol.id(), 10).await?;
    let group = pb::Send {
        kind: MessageKind::Group as i32,
        message_id: "g-1".into(),
        body: "to everyone, once".into(),
        ..Default::default()
    };
    let channel = pb::Send {
        kind: MessageKind::Channel as i32,
        message_id: "c-1".into(),
        channel: "room".into(),
        body: "to the room, once".into(),
        ..Default::default()
    };

    for send in [group, channel] {
        // The resend of a client whose first answer was lost: same id, same message.
        let first = alice.send(send.clone()).await?;
        let again = alice.send(send.clone()).await?;
        assert_eq!(
            (first.status(), first.delivered),
            (SendStatus::Delivered, 1),
            "{first:?}"
        );
        assert_eq!(
            (again.status(), again.delivered),
            (SendStatus::Delivered, 0),
            "answered, pushed to nobody: {again:?}"
        );
        assert_eq!(again.message_id, first.message_id);
        assert!(again.repeat && !first.repeat, "{again:?}");
        assert_eq!(again.timestamp_ms, first.timestamp_ms);

        let (m, _) = carol.next_delivery().await?;
        assert_eq!(
            (m.id.as_str(), m.body.as_str()),
            (first.message_id.as_str(), send.body.as_str())
        );
        // Both answers came after every push of their sends: a second copy would be here.
        let after = carol.ping(1).await?;
        assert!(pushes(&after).is_empty(), "carol got it twice: {after:?}");
    }
    Ok(())
}

#[tokio::test]
async fn a_message_sent_twice_with_the_same_client_id_is_stored_once_and_every_copy_is_the_same(
) -> anyhow::Result<()> {
    let cluster = Cluster::builder().start().await?;
    let store = cluster.store().await?;
    let mut alice = cluster.user("alice", Transport::Tcp).await?;
    let bob_id = cluster
        .route()
        .register("bob", &test_password("bob"))
        .await?
        .user_id;
    let with_id = |id: &str, body: &str| pb::Send {
        message_id: id.into(),
        ..private(bob_id, body)
    };

    // Ids are scoped by their sender.
    let dup1 = format!("{}-dup-1", alice.id());
    let dup2 = format!("{}-dup-2", alice.id());
    // Receiver offline: the resend finds the message already stored.
    for _ in 0..2 {
        let r = alice.send(with_id("dup-1", "only once")).await?;
        assert_eq!(r.status(), SendStatus::Stored, "{r:?}");
        assert_eq!(r.message_id, dup1);
    }
    assert_eq!(store.inbox_len(bob_id).await?, 1);
    let mut bob = cluster.relogin("bob", Transport::Tcp, RELOGIN).await?;
    let push = bob.next_push().await?;
    assert!(push.replay);
    let ids: Vec<&str> = push.messages.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, [dup1.as_str()]);
    let before = bob.ping(1).await?;
    assert!(pushes(&before).is_empty(), "{before:?}");
    bob.ack(vec![dup1.clone()]).await?;
    inbox_len_becomes(&store, bob_id, 0).await?;

    // Receiver online: both sends are answered and one copy is stored. The receiver may see
    // the resend pushed again (it de-duplicates by id), but every copy is the same message:
    // the one stored, with its seq and timestamp.
    for _ in 0..2 {
        let r = alice.send(with_id("dup-2", "also once")).await?;
        assert!(
            matches!(r.status(), SendStatus::Delivered | SendStatus::Stored),
            "{r:?}"
        );
        assert_eq!(r.message_id, dup2);
    }
    assert_eq!(store.inbox_len(bob_id).await?, 1);
    let before = bob.ping(2).await?;
    let copies: Vec<pb::Message> = pushes(&before)
        .into_iter()
        .flat_map(|p| p.messages.clone())
        .filter(|m| m.id == dup2)
        .collect();
    assert!(
        (1..=2).contains(&copies.len()),
        "pushed {} times: {copies:?}",
        copies.len()
    );
    drop(bob);
    let mut bob = cluster.relogin("bob", Transport::Tcp, RELOGIN).await?;
    let push = bob.next_push().await?;
    assert!(push.replay);
    assert_eq!(push.messages.len(), 1, "stored once: {push:?}");
    let stored = &push.messages[0];
    for copy in &copies {
        assert_eq!(copy, stored, "a live copy differs from the stored message");
    }
    Ok(())
}

#[tokio::test]
async fn the_same_client_id_from_two_senders_loses_neither_message() -> anyhow::Result<()> {
    let cluster = Cluster::builder().start().await?;
    let mut alice = cluster.user("alice", Transport::Tcp).await?;
    let mut carol = cluster.user("carol", Transport::Tcp).await?;
    let bob_id = cluster
        .route()
        .register("bob", &test_password("bob"))
        .await?
        .user_id;
    // Ids are chosen by clients, who do not know each other's: "1" is a plausible choice.
    for (sender, body) in [(&mut alice, "from alice"), (&mut carol, "from carol")] {
        let r = sender
            .send(pb::Send {
                message_id: "1".into(),
                ..private(bob_id, body)
            })
            .await?;
        assert_eq!(r.status(), SendStatus::Stored, "{r:?}");
    }
    let mut bob = cluster.relogin("bob", Transport::Tcp, RELOGIN).await?;
    let mut bodies = Vec::new();
    for f in bob.ping(1).await? {
        if let Some(Body::Push(p)) = f.body {
            bodies.extend(p.messages.into_iter().map(|m| (m.sender_id, m.body)));
        }
    }
    assert_eq!(
        bodies,
        [
            (alice.id(), "from alice".to_string()),
            (carol.id(), "from carol".to_string())
        ],
        "both senders were told their message was stored"
    );
    Ok(())
}

#[tokio::test]
async fn an_invalid_client_message_id_is_refused() -> anyhow::Result<()> {
    let cluster = Cluster::builder().start().await?;
    let store = cluster.store().await?;
    let mut alice = cluster.user("alice", Transport::Tcp).await?;
    let bob_id = cluster
        .route()
        .register("bob", &test_password("bob"))
        .await?
        .user_id;
    for bad in ["a b", &"x".repeat(65), "é", "a:b", "a\n"] {
        let r = alice
            .send(pb::Send {
                message_id: bad.to_string(),
                ..private(bob_id, "hello")
            })
            .await?;
        assert_eq!(r.status(), SendStatus::Failed, "{bad:?}: {r:?}");
        let error = r.error.as_ref().expect("a failed send says why");
        assert_eq!(error.code(), ErrorCode::BadRequest, "{bad:?}: {r:?}");
        assert!(error.message.contains("message_id"), "{r:?}");
        assert!(r.message_id.is_empty(), "{r:?}");
    }
    assert_eq!(store.inbox_len(bob_id).await?, 0);
    // The longest valid id is accepted, scoped by the sender.
    let longest = "y".repeat(64);
    let r = alice
        .send(pb::Send {
            message_id: longest.clone(),
            ..private(bob_id, "hello")
        })
        .await?;
    assert_eq!(r.status(), SendStatus::Stored, "{r:?}");
    assert_eq!(r.message_id, format!("{}-{longest}", alice.id()));
    Ok(())
}

#[tokio::test]
async fn a_slow_consumer_that_is_thrown_out_loses_nothing() -> anyhow::Result<()> {
    const BODY: usize = 40_000;
    let cluster = Cluster::builder()
        .servers(1)
        .server_config(|c| {
            c.outbound_queue_frames = 4;
            c.write_timeout_ms = 1000;
        })
        .route_config(|c| c.max_message_len = BODY + 100)
        .start()
        .await?;
    let mut alice = cluster.user("alice", Transport::Tcp).await?;
    let mut bob = cluster.user("bob", Transport::Tcp).await?;

    // Bob reads nothing while alice sends far more than his socket buffers (a few MB on
    // loopback) and his queue of 4 frames hold: the server closes his connection (slow
    // consumer, or write timeout).
    const N: u64 = 300;
    let body = "z".repeat(BODY);
    let mut ids = Vec::new();
    for i in 0..N {
        let r = alice
            .send(pb::Send {
                message_id: format!("slow-{i}"),
                ..private(bob.id(), &format!("{i} {body}"))
            })
            .await?;
        assert!(
            matches!(r.status(), SendStatus::Delivered | SendStatus::Stored),
            "{r:?}"
        );
        ids.push(r.message_id);
    }
    let frames = bob.closed().await?;
    let reason = kick_reason(&frames);
    assert!(
        matches!(reason, Some(KickReason::SlowConsumer) | None),
        "{reason:?}"
    );
    let got_before: usize = pushes(&frames).iter().map(|p| p.messages.len()).sum();
    assert!(
        got_before < N as usize,
        "bob was closed after reading everything ({got_before})"
    );

    // Everything, including what reached him before he was thrown out (not acked), comes
    // with the replay of the next connection, in order.
    let mut bob = cluster.relogin("bob", Transport::Tcp, RELOGIN).await?;
    let mut replayed = Vec::new();
    while replayed.len() < N as usize {
        let (m, replay) = bob.next_delivery().await?;
        assert!(replay, "{}", m.id);
        replayed.push(m.id);
    }
    assert_eq!(replayed, ids);
    let before = bob.ping(1).await?;
    assert!(pushes(&before).is_empty());
    Ok(())
}
