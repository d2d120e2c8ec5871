//! Unit tests of routing: batches routed through [`super::route_batch`] against a memory
//! (or faulty) store and fake connection servers, and the phases of a batch.

use super::*;
use crate::testing::{fake_server, server, state_with, FaultyStore, StoreExt};
use cim_common::{config::DEV_SECRET, store::MemoryStore};
use cim_common::{pb::MessageKind, registry::ServiceInfo, store::prelude::*};
use std::sync::{atomic::Ordering, Arc};

fn send(kind: MessageKind, client_id: u64, to: u64, to_name: &str, body: &str) -> Send {
    Send {
        client_id,
        kind: kind as i32,
        to_user_id: to,
        to_user_name: to_name.into(),
        body: body.into(),
        ..Default::default()
    }
}

fn from(sender_id: u64, name: &str, send: Send) -> Outgoing {
    Outgoing::from_user(sender_id, name.into(), send)
}

fn status(r: &SendResult) -> SendStatus {
    SendStatus::try_from(r.status).unwrap()
}

fn error_code(r: &SendResult) -> ErrorCode {
    ErrorCode::try_from(r.error.as_ref().expect("an error").code).unwrap()
}

#[tokio::test]
async fn private_batch_makes_one_lookup_and_one_push_per_server() {
    let store = Arc::new(FaultyStore::default());
    let alice = store.add_user("alice").await;
    let bob = store.add_user("bob").await;
    let carol = store.add_user("carol").await;
    let (a, rec) = fake_server("server-a", DEV_SECRET).await;
    store.connect(bob, &a.id).await;
    store.connect(carol, &a.id).await;
    let (state, _tx) = state_with(store.clone(), vec![a], |_| {});

    let results = route_batch(
        &state,
        vec![
            from(
                alice,
                "alice",
                send(MessageKind::Private, 1, bob, "", "hi bob"),
            ),
            from(
                alice,
                "alice",
                send(MessageKind::Private, 2, 0, "carol", "hi carol"),
            ),
            from(
                alice,
                "alice",
                send(MessageKind::Private, 3, bob, "", "again"),
            ),
        ],
    )
    .await;

    assert_eq!(results.len(), 3);
    for (r, client_id) in results.iter().zip([1, 2, 3]) {
        assert_eq!(r.client_id, client_id);
        assert_eq!(status(r), SendStatus::Delivered, "{r:?}");
        assert_eq!(r.delivered, 1);
        assert!(!r.message_id.is_empty());
    }
    assert_ne!(results[0].message_id, results[2].message_id);
    assert_eq!(store.route_lookups.load(Ordering::SeqCst), 1, "one MGET");
    let pushes = rec.pushes.lock().unwrap();
    assert_eq!(pushes.len(), 1, "one push for the whole batch");
    let d = &pushes[0].deliveries;
    assert_eq!(d.len(), 3);
    assert_eq!(d[0].recipients, vec![bob]);
    assert_eq!(d[1].recipients, vec![carol]);
    let m = d[1].message.as_ref().unwrap();
    assert_eq!((m.sender_id, m.sender_name.as_str()), (alice, "alice"));
    assert_eq!((m.receiver_id, m.body.as_str()), (carol, "hi carol"));
    assert_eq!(m.kind, MessageKind::Private as i32);
    assert_eq!(m.id, results[1].message_id);
    assert_eq!(d[2].message.as_ref().unwrap().body, "again", "order kept");
}

/// `cim_route_messages_total` counts each routed message by kind and outcome, and no
/// label value of the route's metrics names a user (id or name), a channel or a server.
#[tokio::test]
async fn messages_are_counted_without_naming_anyone() {
    let store = Arc::new(MemoryStore::new());
    let alice = store.add_user("alice-4711").await;
    let bob = store.add_user("bob-4712").await;
    let dave = store.add_user("dave-4713").await; // not connected
    let (a, _rec) = fake_server("server-a", DEV_SECRET).await;
    store.connect(bob, &a.id).await;
    let (state, _tx) = state_with(store.clone(), vec![a], |_| {});
    let p = MessageKind::Private;
    let results = route_batch(
        &state,
        vec![
            from(alice, "alice-4711", send(p, 1, bob, "", "hi")),
            from(alice, "alice-4711", send(p, 2, dave, "", "hi")),
            from(alice, "alice-4711", send(p, 3, 0, "nobody-4714", "hi")),
            from(
                alice,
                "alice-4711",
                send(MessageKind::Group, 4, 0, "", "all"),
            ),
            from(
                alice,
                "alice-4711",
                send(MessageKind::Channel, 5, 0, "", "x"),
            ),
        ],
    )
    .await;
    assert_eq!(results.len(), 5);
    let text = cim_common::metrics::encode_all(&[state.registry()]).unwrap();
    let samples = cim_common::metrics::parse_text(&text);
    let count = |kind: &str, outcome: &str| {
        samples
            .iter()
            .find(|(n, l, _)| {
                n == "cim_route_messages_total"
                    && l.contains(&("kind".into(), kind.into()))
                    && l.contains(&("outcome".into(), outcome.into()))
            })
            .map(|s| s.2)
    };
    assert_eq!(count("private", "delivered"), Some(1.0), "{text}");
    assert_eq!(count("private", "stored"), Some(1.0), "{text}");
    assert_eq!(count("private", "failed_unknown_user"), Some(1.0), "{text}");
    assert_eq!(count("group", "delivered"), Some(1.0), "{text}");
    assert_eq!(count("channel", "failed_bad_request"), Some(1.0), "{text}");
    let ids = [alice, bob, dave].map(|id| id.to_string());
    for (_, labels, _) in &samples {
        for (_, value) in labels {
            assert!(
                !ids.contains(value)
                    && !["4711", "4712", "4713", "4714", "server-", "127.0.0.1"]
                        .iter()
                        .any(|f| value.contains(f)),
                "label value {value:?} names someone: {text}"
            );
        }
    }
}

#[tokio::test]
async fn private_offline_and_failures() {
    let store = Arc::new(MemoryStore::new());
    let alice = store.add_user("alice").await;
    let dave = store.add_user("dave").await; // not connected
    let erin = store.add_user("erin").await; // on a dead server
    let frank = store.add_user("frank").await; // on a live server that does not have him
    let (a, rec) = fake_server("server-a", DEV_SECRET).await;
    store.connect(erin, "server-dead").await;
    store.connect(frank, &a.id).await;
    rec.absent.lock().unwrap().insert(frank);
    let (state, _tx) = state_with(store.clone(), vec![a], |c| c.max_message_len = 10);

    let p = MessageKind::Private;
    let results = route_batch(
        &state,
        vec![
            from(alice, "alice", send(p, 1, dave, "", "x")),
            from(alice, "alice", send(p, 2, erin, "", "x")),
            from(alice, "alice", send(p, 3, frank, "", "x")),
            from(alice, "alice", send(p, 4, 0, "nobody", "x")),
            from(alice, "alice", send(p, 5, 999, "", "x")),
            from(alice, "alice", send(p, 6, dave, "", " ")),
            from(alice, "alice", send(p, 7, dave, "", "12345678901")),
            from(alice, "alice", send(p, 8, 0, "", "x")),
            from(alice, "alice", send(MessageKind::Channel, 9, 0, "", "x")),
            from(0, "", send(p, 10, dave, "", "x")),
            from(alice, "alice", send(p, 11, 0, &"n".repeat(100), "x")),
        ],
    )
    .await;

    let ids: Vec<u64> = results.iter().map(|r| r.client_id).collect();
    assert_eq!(ids, (1..=11).collect::<Vec<_>>());
    for r in &results[..3] {
        assert_eq!(status(r), SendStatus::Stored, "{r:?}");
        assert!(!r.message_id.is_empty(), "accepted messages have an id");
    }
    for (r, code) in results[3..].iter().zip([
        ErrorCode::UnknownUser,
        ErrorCode::UnknownUser,
        ErrorCode::BadRequest,
        ErrorCode::BadRequest,
        ErrorCode::BadRequest,
        ErrorCode::BadRequest,
        ErrorCode::BadRequest,
        ErrorCode::UnknownUser,
    ]) {
        assert_eq!(status(r), SendStatus::Failed, "{r:?}");
        assert_eq!(error_code(r), code, "{r:?}");
        assert!(r.message_id.is_empty());
    }
    assert!(
        !store.has_route(erin).await,
        "the dead server's route was removed"
    );
    assert!(store.has_route(frank).await);
    let pushes = rec.pushes.lock().unwrap();
    assert_eq!(pushes.len(), 1);
    assert_eq!(
        pushes[0].deliveries.len(),
        1,
        "only frank's server was called"
    );
}

#[tokio::test]
async fn failed_push_counts_as_offline() {
    let store = Arc::new(MemoryStore::new());
    let alice = store.add_user("alice").await;
    let bob = store.add_user("bob").await;
    // Live in the registry, but nothing listens on its internal address.
    let unreachable = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        ServiceInfo {
            internal_addr: addr.to_string(),
            ..server("server-x")
        }
    };
    store.connect(bob, &unreachable.id).await;
    let (state, _tx) = state_with(store.clone(), vec![unreachable], |_| {});
    let results = route_batch(
        &state,
        vec![from(
            alice,
            "alice",
            send(MessageKind::Private, 1, bob, "", "x"),
        )],
    )
    .await;
    assert_eq!(status(&results[0]), SendStatus::Stored);
    assert!(
        store.has_route(bob).await,
        "a live server's route is not stale"
    );
}

#[tokio::test]
async fn private_messages_are_stored_before_the_push_and_carry_their_seq() {
    let store = Arc::new(MemoryStore::new());
    let alice = store.add_user("alice").await;
    let bob = store.add_user("bob").await; // online
    let dave = store.add_user("dave").await; // offline
    let (a, rec) = fake_server("server-a", DEV_SECRET).await;
    store.connect(bob, &a.id).await;
    let (state, _tx) = state_with(store.clone(), vec![a], |_| {});
    let p = MessageKind::Private;
    let mut with_receipt = send(p, 1, bob, "", "to bob");
    with_receipt.receipt = true;
    let results = route_batch(
        &state,
        vec![
            from(alice, "alice", with_receipt),
            from(alice, "alice", send(p, 2, dave, "", "to dave")),
            from(alice, "alice", send(MessageKind::Group, 3, 0, "", "all")),
        ],
    )
    .await;
    assert_eq!(status(&results[0]), SendStatus::Delivered);
    assert_eq!(status(&results[1]), SendStatus::Stored);
    assert_eq!(status(&results[2]), SendStatus::Delivered);

    // Both private messages wait in their receivers' inboxes until acked; the group
    // message is nowhere.
    let bobs = store.inbox_read(bob, 0, 10).await.unwrap();
    assert_eq!(bobs.len(), 1);
    assert_eq!(bobs[0].id, results[0].message_id);
    assert!(bobs[0].receipt, "the receipt request is kept");
    let daves = store.inbox_read(dave, 0, 10).await.unwrap();
    assert_eq!(daves.len(), 1);
    assert_eq!(daves[0].body, "to dave");
    assert_eq!(store.inbox_len(alice).await.unwrap(), 0);

    // The push carries the stored seq (the server drops pushes its replay covered).
    let pushes = rec.pushes.lock().unwrap();
    let pushed = pushes[0].deliveries[0].message.as_ref().unwrap();
    assert_eq!(pushed.id, bobs[0].id);
    assert_eq!(pushed.seq, bobs[0].seq);
    assert!(pushed.seq > 0);
}

#[tokio::test]
async fn client_message_ids_are_used_validated_and_stored_once() {
    let store = Arc::new(MemoryStore::new());
    let alice = store.add_user("alice").await;
    let dave = store.add_user("dave").await; // offline
    let (state, _tx) = state_with(store.clone(), vec![], |_| {});
    let with_id = |client_id, id: &str| {
        let mut s = send(MessageKind::Private, client_id, dave, "", "hello");
        s.message_id = id.into();
        s
    };
    let results = route_batch(
        &state,
        vec![
            from(alice, "alice", with_id(1, "client-chosen_1")),
            // A resend after a lost answer: same id.
            from(alice, "alice", with_id(2, "client-chosen_1")),
            from(alice, "alice", with_id(3, "has space")),
            from(alice, "alice", with_id(4, &"x".repeat(65))),
        ],
    )
    .await;
    let id = format!("{alice}-client-chosen_1");
    assert_eq!(results[0].message_id, id, "scoped by the sender");
    assert_eq!(status(&results[1]), SendStatus::Stored);
    assert_eq!(results[1].message_id, id);
    assert_eq!(
        results[1].timestamp_ms, results[0].timestamp_ms,
        "a retry answers with the stored message's timestamp"
    );
    for r in &results[2..] {
        assert_eq!(status(r), SendStatus::Failed);
        assert_eq!(error_code(r), ErrorCode::BadRequest);
    }
    assert_eq!(store.inbox_len(dave).await.unwrap(), 1, "stored once");
}

#[tokio::test]
async fn group_pushes_once_per_live_server_to_everyone_there_and_reads_nothing() {
    let store = Arc::new(FaultyStore::default());
    let (a, rec_a) = fake_server("server-a", DEV_SECRET).await;
    let (b, rec_b) = fake_server("server-b", DEV_SECRET).await;
    rec_a.everyone.store(5, Ordering::SeqCst);
    rec_b.everyone.store(2, Ordering::SeqCst);
    // A live server that refuses every push (wrong secret) counts zero, not an error.
    let (c, rec_c) = fake_server("server-c", "another-secret-entirely").await;
    rec_c.everyone.store(100, Ordering::SeqCst);
    let sender = store.add_user("sender").await;
    store.connect(sender, &a.id).await;
    let (state, _tx) = state_with(store.clone(), vec![a, b, c], |_| {});

    let results = route_batch(
        &state,
        vec![
            from(
                sender,
                "sender",
                send(MessageKind::Group, 7, 0, "", "hello all"),
            ),
            from(
                sender,
                "sender",
                send(MessageKind::Group, 8, 0, "", "again"),
            ),
        ],
    )
    .await;

    assert_eq!(results.len(), 2);
    for (r, client_id) in results.iter().zip([7, 8]) {
        assert_eq!(status(r), SendStatus::Delivered, "{r:?}");
        assert_eq!(r.client_id, client_id);
        assert_eq!(r.delivered, 7, "5 on server-a + 2 on server-b");
    }
    assert_eq!(store.scans.load(Ordering::SeqCst), 0, "no route lookup");
    for rec in [&rec_a, &rec_b] {
        let pushes = rec.pushes.lock().unwrap();
        assert_eq!(pushes.len(), 1, "one push per server for the whole run");
        let deliveries = &pushes[0].deliveries;
        assert_eq!(deliveries.len(), 2);
        for (d, r) in deliveries.iter().zip(&results) {
            assert!(d.everyone && d.recipients.is_empty(), "{d:?}");
            let m = d.message.as_ref().unwrap();
            assert_eq!((m.kind, m.receiver_id), (MessageKind::Group as i32, 0));
            assert_eq!(
                (m.id.as_str(), m.sender_id),
                (r.message_id.as_str(), sender)
            );
        }
    }
    assert!(
        rec_c.pushes.lock().unwrap().is_empty(),
        "refused, not recorded"
    );
}

#[tokio::test]
async fn known_receivers_are_not_looked_up_again_unknown_ones_are() {
    let store = Arc::new(FaultyStore::default());
    let alice = store.add_user("alice").await;
    let bob = store.add_user("bob").await;
    store.add_user("carol").await;
    let (state, _tx) = state_with(store.clone(), vec![], |_| {});
    let batch = || {
        vec![
            from(
                alice,
                "alice",
                send(MessageKind::Private, 1, bob, "", "by id"),
            ),
            from(
                alice,
                "alice",
                send(MessageKind::Private, 2, 0, "carol", "by name"),
            ),
            from(
                alice,
                "alice",
                send(MessageKind::Private, 3, 0, "zed", "nobody"),
            ),
        ]
    };
    let lookups = || store.user_lookups.load(Ordering::SeqCst);

    let first = route_batch(&state, batch()).await;
    assert_eq!(lookups(), 3);
    let second = route_batch(&state, batch()).await;
    assert_eq!(lookups(), 4, "only the unknown name is asked again");
    for results in [&first, &second] {
        assert_eq!(status(&results[0]), SendStatus::Stored, "{results:?}");
        assert_eq!(status(&results[1]), SendStatus::Stored, "{results:?}");
        assert_eq!(error_code(&results[2]), ErrorCode::UnknownUser);
    }
    // Registered meanwhile: found at once (misses are never remembered).
    store.add_user("zed").await;
    let third = route_batch(&state, batch()).await;
    assert_eq!(status(&third[2]), SendStatus::Stored, "{third:?}");
    assert_eq!(state.known_users().len(), (3, 2));
}

#[tokio::test]
async fn mixed_batch_keeps_results_aligned() {
    let store = Arc::new(MemoryStore::new());
    let alice = store.add_user("alice").await;
    let bob = store.add_user("bob").await;
    let (a, rec) = fake_server("server-a", DEV_SECRET).await;
    store.connect(bob, &a.id).await;
    let (state, _tx) = state_with(store.clone(), vec![a], |_| {});
    let results = route_batch(
        &state,
        vec![
            from(
                alice,
                "alice",
                send(MessageKind::Private, 1, bob, "", "first"),
            ),
            from(alice, "alice", send(MessageKind::Group, 2, 0, "", "second")),
            from(
                alice,
                "alice",
                send(MessageKind::Private, 3, bob, "", "third"),
            ),
        ],
    )
    .await;
    assert_eq!(
        results.iter().map(|r| r.client_id).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(results.iter().all(|r| status(r) == SendStatus::Delivered));
    let bodies: Vec<String> = rec
        .pushes
        .lock()
        .unwrap()
        .iter()
        .flat_map(|p| p.deliveries.iter())
        .map(|d| d.message.as_ref().unwrap().body.clone())
        .collect();
    assert_eq!(
        bodies,
        ["first", "second", "third"],
        "bob sees them in send order"
    );
}

/// A broadcast with the sender's own id (what the SDK and servers always send).
fn with_id(kind: MessageKind, client_id: u64, id: &str, channel: &str) -> Send {
    let mut s = send(kind, client_id, 0, "", "hello");
    s.message_id = id.into();
    s.channel = channel.into();
    s
}

fn pushed_ids(rec: &crate::testing::Recorded) -> Vec<String> {
    rec.pushes
        .lock()
        .unwrap()
        .iter()
        .flat_map(|p| p.deliveries.iter())
        .map(|d| d.message.as_ref().unwrap().id.clone())
        .collect()
}

#[test]
fn phases_keep_each_senders_runs_in_order_and_put_senders_side_by_side() {
    let item = |index, sender, kind| Accepted {
        index,
        client_id: index as u64,
        kind,
        check_member: false,
        claim: false,
        message: Message {
            sender_id: sender,
            ..Default::default()
        },
    };
    // a: private, private, group, private; b: group, group; c: private.
    let phases = phases(vec![
        item(0, 1, Kind::Private),
        item(1, 2, Kind::Group),
        item(2, 1, Kind::Private),
        item(3, 1, Kind::Group),
        item(4, 3, Kind::Private),
        item(5, 2, Kind::Group),
        item(6, 1, Kind::Private),
    ]);
    let shape: Vec<(Vec<usize>, Vec<Vec<usize>>)> = phases
        .iter()
        .map(|p| {
            (
                p.privates.iter().map(|a| a.index).collect(),
                p.broadcasts
                    .iter()
                    .map(|run| run.iter().map(|a| a.index).collect())
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        shape,
        [
            (vec![0, 2, 4], vec![vec![1, 5]]),
            (vec![], vec![vec![3]]),
            (vec![6], vec![]),
        ]
    );
}

/// One sender's channel fan-out to a server that is slow to answer does not hold up
/// another sender's private message in the same batch: the private push goes out while
/// the fan-out's push is still held (issue 18 item 5: before, the batch's runs went one
/// after another, and the private push waited for the channel's).
#[tokio::test]
async fn a_slow_fan_out_does_not_hold_up_another_senders_private_message() {
    let store = Arc::new(MemoryStore::new());
    let flooder = store.add_user("flooder").await;
    let member = store.add_user("member").await;
    let carol = store.add_user("carol").await;
    let dave = store.add_user("dave").await;
    let (slow, slow_rec) = fake_server("server-slow", DEV_SECRET).await;
    let (fast, fast_rec) = fake_server("server-fast", DEV_SECRET).await;
    store.connect(member, &slow.id).await;
    store.connect(dave, &fast.id).await;
    store.channel_join("room", flooder, 10).await.unwrap();
    store.channel_join("room", member, 10).await.unwrap();
    slow_rec.hold_pushes.store(true, Ordering::SeqCst);
    let (state, _tx) = state_with(store.clone(), vec![slow, fast], |c| {
        c.push_timeout_ms = 60_000;
    });
    let batch = vec![
        from(
            flooder,
            "flooder",
            send(MessageKind::Channel, 1, 0, "", "to the room"),
        ),
        from(
            carol,
            "carol",
            send(MessageKind::Private, 2, dave, "", "hi dave"),
        ),
    ];
    let batch = {
        let mut b = batch;
        b[0].send.channel = "room".into();
        b
    };
    let routed = tokio::spawn({
        let state = state.clone();
        async move { route_batch(&state, batch).await }
    });
    // The channel's push reaches the slow server and is held there...
    loop {
        let holding = slow_rec.holding.notified();
        tokio::pin!(holding);
        holding.as_mut().enable();
        if slow_rec.held.load(Ordering::SeqCst) > 0 {
            break;
        }
        holding.await;
    }
    // ...and meanwhile dave's message is pushed (bounded: before, it never came until
    // the channel's push returned).
    let pushed =
        tokio::time::timeout(std::time::Duration::from_secs(10), fast_rec.first_push()).await;
    assert!(pushed.is_ok(), "the private push waited for the channel's");
    assert_eq!(slow_rec.held.load(Ordering::SeqCst), 1, "still held");
    slow_rec.release();
    let results = routed.await.unwrap();
    assert_eq!(
        status(&results[0]),
        SendStatus::Delivered,
        "{:?}",
        results[0]
    );
    assert_eq!(
        status(&results[1]),
        SendStatus::Delivered,
        "{:?}",
        results[1]
    );
}

#[tokio::test]
async fn a_repeated_group_or_channel_message_is_answered_and_not_delivered_again() {
    let store = Arc::new(MemoryStore::new());
    let alice = store.add_user("alice").await;
    let bob = store.add_user("bob").await;
    let (a, rec) = fake_server("server-a", DEV_SECRET).await;
    rec.everyone.store(3, Ordering::SeqCst);
    store.connect(bob, &a.id).await;
    store.channel_join("room", alice, 10).await.unwrap();
    store.channel_join("room", bob, 10).await.unwrap();
    let (state, _tx) = state_with(store.clone(), vec![a], |_| {});
    let batch = || {
        vec![
            from(alice, "alice", with_id(MessageKind::Group, 1, "g1", "")),
            from(
                alice,
                "alice",
                with_id(MessageKind::Channel, 2, "c1", "room"),
            ),
            // Without an id of its own: the route makes one up, which cannot repeat.
            from(alice, "alice", send(MessageKind::Group, 3, 0, "", "fresh")),
        ]
    };

    let first = route_batch(&state, batch()).await;
    assert_eq!(
        first.iter().map(|r| r.delivered).collect::<Vec<_>>(),
        [3, 1, 3],
        "{first:?}"
    );
    // The retry: the connection died before these results arrived.
    let retry = route_batch(&state, batch()).await;
    for (r, f) in retry[..2].iter().zip(&first) {
        assert_eq!(status(r), SendStatus::Delivered, "{r:?}");
        assert_eq!(r.delivered, 0, "the first send did the delivering");
        assert!(r.repeat && !f.repeat, "{r:?} {f:?}");
        assert_eq!(
            (&r.message_id, r.timestamp_ms, r.client_id),
            (&f.message_id, f.timestamp_ms, f.client_id),
            "answered as the first"
        );
    }
    assert_eq!(retry[2].delivered, 3, "a message with a new id is new");
    assert_ne!(retry[2].message_id, first[2].message_id);

    let ids = pushed_ids(&rec);
    for id in [&first[0].message_id, &first[1].message_id] {
        assert_eq!(ids.iter().filter(|i| *i == id).count(), 1, "{ids:?}");
    }
    assert_eq!(first[0].message_id, format!("{alice}-g1"));
    // Another sender's id of the same text is another message.
    let carol = store.add_user("carol").await;
    let other = route_batch(
        &state,
        vec![from(
            carol,
            "carol",
            with_id(MessageKind::Group, 1, "g1", ""),
        )],
    )
    .await;
    assert_eq!(other[0].delivered, 3, "{other:?}");
}

#[tokio::test]
async fn a_broadcast_that_reached_nobody_can_be_retried() {
    let store = Arc::new(MemoryStore::new());
    let alice = store.add_user("alice").await;
    let (a, rec) = fake_server("server-a", DEV_SECRET).await;
    rec.everyone.store(4, Ordering::SeqCst);
    // No server answers: the group message reached nobody.
    let (state, tx) = state_with(store.clone(), vec![server("server-down")], |_| {});
    let group = || {
        vec![from(
            alice,
            "alice",
            with_id(MessageKind::Group, 1, "g", ""),
        )]
    };
    let down = route_batch(&state, group()).await;
    assert_eq!(error_code(&down[0]), ErrorCode::Unavailable, "{down:?}");
    // Not a member: refused, and a retry after joining goes through.
    let channel = || {
        vec![from(
            alice,
            "alice",
            with_id(MessageKind::Channel, 2, "c", "room"),
        )]
    };
    let refused = route_batch(&state, channel()).await;
    assert_eq!(error_code(&refused[0]), ErrorCode::Forbidden, "{refused:?}");

    tx.send(crate::testing::members(vec![a])).unwrap();
    store.channel_join("room", alice, 10).await.unwrap();
    let again = route_batch(&state, group()).await;
    assert_eq!(
        (status(&again[0]), again[0].delivered),
        (SendStatus::Delivered, 4),
        "{again:?}"
    );
    let joined = route_batch(&state, channel()).await;
    assert_eq!(status(&joined[0]), SendStatus::Delivered, "{joined:?}");
    assert_eq!(
        pushed_ids(&rec),
        [format!("{alice}-g")],
        "the channel has nobody else"
    );
}

#[tokio::test]
async fn a_broadcast_that_cannot_be_claimed_is_not_sent() {
    let store = Arc::new(FaultyStore::default());
    let alice = store.add_user("alice").await;
    let (a, rec) = fake_server("server-a", DEV_SECRET).await;
    rec.everyone.store(2, Ordering::SeqCst);
    let (state, _tx) = state_with(store.clone(), vec![a], |_| {});
    store.fail.store(true, Ordering::SeqCst);
    let results = route_batch(
        &state,
        vec![
            from(alice, "alice", with_id(MessageKind::Group, 1, "g", "")),
            // Nothing to claim (a new id), and a group send needs no store.
            from(alice, "alice", send(MessageKind::Group, 2, 0, "", "x")),
        ],
    )
    .await;
    assert_eq!(
        error_code(&results[0]),
        ErrorCode::Unavailable,
        "{results:?}"
    );
    assert_eq!(results[1].delivered, 2, "{results:?}");
    assert_eq!(pushed_ids(&rec), [results[1].message_id.clone()]);
}

#[tokio::test]
async fn store_failure_is_unavailable() {
    let store = Arc::new(FaultyStore::default());
    let alice = store.add_user("alice").await;
    let bob = store.add_user("bob").await;
    store.fail.store(true, Ordering::SeqCst);
    let (state, _tx) = state_with(store.clone(), vec![server("server-a")], |_| {});
    let results = route_batch(
        &state,
        vec![
            from(alice, "alice", send(MessageKind::Private, 1, bob, "", "x")),
            from(alice, "alice", send(MessageKind::Group, 2, 0, "", "x")),
        ],
    )
    .await;
    for r in &results {
        assert_eq!(status(r), SendStatus::Failed);
        assert_eq!(error_code(r), ErrorCode::Unavailable);
    }
}
