//! Stored groups, history, read marks and typing end to end: real Redis, real etcd, several
//! connection servers, clients over TCP and WebSocket.
//!
//! What a group promises (see ARCHITECTURE.md, "Stored groups"): every message is kept once
//! in the group's log with a per-group seq; members online get it live, members offline get
//! everything after their acked position at their next connection, in order, once per
//! position; a removed member gets nothing after the removal; a non-member is refused.

use cim_sdk::{
    pb::{self, Conversation, GroupEventType, MessageKind, SendStatus},
    route::HistoryFrom,
    LoginInfo, Transport,
};
use cim_tests::cluster::{Cluster, TestUser};
use std::time::Duration;

const RELOGIN: Duration = Duration::from_secs(10);

fn group(id: u64) -> Conversation {
    Conversation {
        user_id: 0,
        group_id: id,
    }
}

fn peer(id: u64) -> Conversation {
    Conversation {
        user_id: id,
        group_id: 0,
    }
}

/// The next pushed GROUP_CHAT message of `group` (events of the group are skipped).
async fn next_chat(user: &mut TestUser, group: u64) -> anyhow::Result<(pb::Message, bool)> {
    loop {
        let (m, replay) = user.next_delivery().await?;
        if m.group_id == group && m.kind == MessageKind::GroupChat as i32 {
            return Ok((m, replay));
        }
    }
}

/// The next pushed GROUP_EVENT of `group` with this type.
async fn next_event(
    user: &mut TestUser,
    group: u64,
    kind: GroupEventType,
) -> anyhow::Result<pb::Message> {
    loop {
        let m = user.next_message().await?;
        let is = m.group_id == group
            && m.kind == MessageKind::GroupEvent as i32
            && m.group_event
                .as_ref()
                .is_some_and(|e| e.r#type == kind as i32);
        if is {
            return Ok(m);
        }
    }
}

/// Alice, bob (WebSocket JSON), carol and dave connected (round-robin over the servers) and
/// the group "team" of alice (its owner), bob and carol, whose JOINED events bob and carol
/// have had. Returns the group's id and the four.
async fn team(cluster: &Cluster) -> anyhow::Result<(u64, [TestUser; 4])> {
    let alice = cluster.user("alice", Transport::Tcp).await?;
    let mut bob = cluster.user("bob", Transport::WsJson).await?;
    let mut carol = cluster.user("carol", Transport::Tcp).await?;
    let dave = cluster.user("dave", Transport::Tcp).await?;
    let g = cluster
        .route()
        .create_group(&alice.login.session_token, "team", &[bob.id(), carol.id()])
        .await?
        .group
        .id;
    next_event(&mut bob, g, GroupEventType::Joined).await?;
    next_event(&mut carol, g, GroupEventType::Joined).await?;
    Ok((g, [alice, bob, carol, dave]))
}

async fn login(cluster: &Cluster, name: &str) -> anyhow::Result<LoginInfo> {
    cluster.register_and_login(name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_members_catch_up_in_order_once_and_removed_members_get_nothing(
) -> anyhow::Result<()> {
    let cluster = Cluster::builder().servers(2).routes(1).start().await?;
    let route = cluster.route();
    let mut alice = cluster.user("alice", Transport::Tcp).await?;
    let mut bob = cluster.user("bob", Transport::WsJson).await?;
    // Carol logs in now and connects later: she is offline during the conversation.
    let carol_login = login(&cluster, "carol").await?;
    let mut dave = cluster.user("dave", Transport::Tcp).await?;

    let created = route
        .create_group(
            &alice.login.session_token,
            "team",
            &[bob.id(), carol_login.user_id],
        )
        .await?;
    let g = created.group.id;
    assert_eq!(created.added.as_ref().map(|a| a.added.len()), Some(2));
    // Bob is online: the JOINED event reaches him live, naming him.
    let joined = next_event(&mut bob, g, GroupEventType::Joined).await?;
    assert!(joined.group_event.unwrap().user_ids.contains(&bob.id()));

    let mut seqs = Vec::new();
    for i in 0..5 {
        let r = alice.send_group_chat(g, &format!("m{i}")).await?;
        assert_eq!(r.status, SendStatus::Delivered as i32, "{r:?}");
        seqs.push(r.log_seq);
    }
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    for (i, &seq) in seqs.iter().enumerate() {
        let (m, replay) = next_chat(&mut bob, g).await?;
        assert_eq!((m.body.as_str(), replay), (format!("m{i}").as_str(), false));
        assert_eq!(m.log_seq, seq);
        assert_eq!(m.sender_id, alice.id());
    }

    // A non-member is refused, over the connection and over HTTP.
    let refused = dave.send_group_chat(g, "let me in").await?;
    assert_eq!(refused.status, SendStatus::Failed as i32);
    assert_eq!(refused.error.unwrap().code, pb::ErrorCode::Forbidden as i32);
    let http = route
        .send_group_chat(&dave.login.session_token, g, "let me in")
        .await
        .unwrap_err();
    assert_eq!(http.status(), Some(404));

    // Carol connects: everything since her join, in order, as a replay, exactly once.
    let mut carol = TestUser::connect(carol_login, Transport::Tcp).await?;
    let mut caught = Vec::new();
    for _ in 0..5 {
        let (m, replay) = next_chat(&mut carol, g).await?;
        assert!(replay, "{m:?}");
        caught.push((m.body.clone(), m.log_seq));
    }
    let expected: Vec<(String, u64)> = (0..5).map(|i| (format!("m{i}"), seqs[i])).collect();
    assert_eq!(caught, expected);
    // Nothing more: a private marker comes next, not a repeat.
    alice.send_private(carol.id(), "marker").await?;
    let next = carol.next_message().await?;
    assert_eq!(next.body, "marker", "{next:?}");
    carol.ack(vec![next.id.clone()]).await?;
    carol.ack_groups(&[(g, seqs[4])]).await?;
    // The acked position holds across connections: nothing is caught up again. (Acks are
    // applied in the background: wait until the store has it.)
    let store = cluster.store().await?;
    let (id, acked) = (carol.id(), seqs[4]);
    cim_tests::wait_until("carol's acked position", Duration::from_secs(10), || {
        let store = store.clone();
        async move {
            store
                .group_cursors(id)
                .await
                .ok()
                .and_then(|c| c.first().map(|c| c.position == acked))
                .unwrap_or(false)
        }
    })
    .await?;
    drop(carol);
    let mut carol = cluster.relogin("carol", Transport::Tcp, RELOGIN).await?;
    alice.send_group_chat(g, "after reconnect").await?;
    let (m, replay) = next_chat(&mut carol, g).await?;
    assert_eq!((m.body.as_str(), replay), ("after reconnect", false));

    // Bob is removed: he gets the REMOVED event, then nothing of the group.
    route
        .remove_group_member(&alice.login.session_token, g, bob.id())
        .await?;
    let removed = next_event(&mut bob, g, GroupEventType::Removed).await?;
    assert_eq!(removed.group_event.unwrap().user_ids, [bob.id()]);
    alice.send_group_chat(g, "not for bob").await?;
    let (m, _) = next_chat(&mut carol, g).await?;
    assert_eq!(m.body, "not for bob");
    alice.send_private(bob.id(), "bob marker").await?;
    let next = bob.next_message().await?;
    assert_eq!(next.body, "bob marker", "bob got {next:?}");
    // Nor can he read on, or send.
    let refused = bob.send_group_chat(g, "still here?").await?;
    assert_eq!(refused.status, SendStatus::Failed as i32);
    let history = route
        .history(
            &bob.login.session_token,
            &group(g),
            HistoryFrom::Newest,
            None,
        )
        .await;
    assert_eq!(history.unwrap_err().status(), Some(404));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_both_ways_and_unread_counts_follow_read_marks_across_servers(
) -> anyhow::Result<()> {
    let cluster = Cluster::builder().servers(2).routes(1).start().await?;
    let route = cluster.route();
    let mut alice = cluster.user("alice", Transport::Tcp).await?;
    let mut bob = cluster.user("bob", Transport::WsBinary).await?;
    // Round-robin assignment: the two are on different servers.
    assert_ne!(alice.server_id(), bob.server_id());

    let mut seqs = Vec::new();
    for i in 0..25 {
        let r = alice.send_private(bob.id(), &format!("p{i}")).await?;
        assert_ne!(r.log_seq, 0, "{r:?}");
        seqs.push(r.log_seq);
    }
    let mut ids = Vec::new();
    for (i, &seq) in seqs.iter().enumerate() {
        let m = bob.next_message().await?;
        assert_eq!(m.body, format!("p{i}"));
        assert_eq!(m.log_seq, seq);
        ids.push(m.id);
    }
    bob.ack(ids).await?;

    // Backwards from the newest in pages of 10, then forwards from the start.
    let token = &bob.login.session_token.clone();
    let mut back: Vec<String> = Vec::new();
    let mut from = HistoryFrom::Newest;
    loop {
        let page = route
            .history(token, &peer(alice.id()), from, Some(10))
            .await?;
        let Some(first) = page.first() else { break };
        from = HistoryFrom::Before(first.log_seq);
        let mut bodies: Vec<String> = page.iter().map(|m| m.body.clone()).collect();
        bodies.extend(back);
        back = bodies;
    }
    let all: Vec<String> = (0..25).map(|i| format!("p{i}")).collect();
    assert_eq!(back, all);
    let mut fwd: Vec<String> = Vec::new();
    let mut after = 0;
    loop {
        let page = route
            .history(token, &peer(alice.id()), HistoryFrom::After(after), Some(7))
            .await?;
        let Some(last) = page.last() else { break };
        after = last.log_seq;
        fwd.extend(page.iter().map(|m| m.body.clone()));
    }
    assert_eq!(fwd, all);

    // Unread: all 25 for bob, none for alice (sending reads).
    let convs = route.conversations(token, None, None).await?;
    assert_eq!(convs.len(), 1);
    assert_eq!((convs[0].kind.as_str(), convs[0].id), ("user", alice.id()));
    assert_eq!((convs[0].unread, convs[0].name.as_str()), (25, "alice"));
    assert_eq!(convs[0].last.as_ref().map(|m| m.body.as_str()), Some("p24"));

    // Bob marks read over his connection; alice (on the other server) is told.
    bob.send_frame(&pb::Frame::new(pb::frame::Body::ReadMark(pb::ReadMark {
        conversation: Some(peer(alice.id())),
        seq: seqs[19],
        user_id: 0,
    })))
    .await?;
    let mark = alice.next_read_mark().await?;
    assert_eq!(mark.user_id, bob.id());
    assert_eq!(mark.seq, seqs[19]);
    assert_eq!(mark.conversation, Some(peer(bob.id())));
    let convs = route.conversations(token, None, None).await?;
    assert_eq!(convs[0].unread, 5);
    // Marks never move back; a mark past the top is clamped to it.
    assert_eq!(
        route.mark_read(token, &peer(alice.id()), seqs[3]).await?,
        seqs[19]
    );
    assert_eq!(
        route.mark_read(token, &peer(alice.id()), 10_000).await?,
        seqs[24]
    );
    // A mark over HTTP reaches the peer live too.
    loop {
        let mark = alice.next_read_mark().await?;
        assert_eq!(mark.user_id, bob.id());
        if mark.seq == seqs[24] {
            break;
        }
        assert_eq!(mark.seq, seqs[19], "marks never move back: {mark:?}");
    }
    // After a reconnect the counts are what they were; alice sees "seen up to".
    drop(bob);
    let bob = cluster.relogin("bob", Transport::Tcp, RELOGIN).await?;
    let convs = route
        .conversations(&bob.login.session_token, None, None)
        .await?;
    assert_eq!(convs[0].unread, 0);
    let alices = route
        .conversations(&alice.login.session_token, None, None)
        .await?;
    assert_eq!(alices[0].peer_read_seq, seqs[24]);
    assert_eq!(alices[0].unread, 0);
    Ok(())
}

/// A group's read marks go live to the members that watch them (`WatchReads`), over the
/// connection or HTTP, on any server; not to the others, nor after the watch stopped. Only
/// members may watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_read_marks_reach_the_members_watching_them() -> anyhow::Result<()> {
    let cluster = Cluster::builder().servers(2).routes(1).start().await?;
    let route = cluster.route();
    let (g, [mut alice, mut bob, mut carol, mut dave]) = team(&cluster).await?;
    // Round-robin: alice and carol on one server, bob and dave on the other.
    assert_eq!(alice.server_id(), carol.server_id());
    assert_ne!(alice.server_id(), bob.server_id());
    let sent = alice.send_group_chat(g, "read me").await?;
    let watch = |group_id, stop| {
        pb::Frame::new(pb::frame::Body::WatchReads(pb::WatchReads {
            group_id,
            stop,
        }))
    };
    let read = |seq| {
        pb::Frame::new(pb::frame::Body::ReadMark(pb::ReadMark {
            conversation: Some(group(g)),
            seq,
            user_id: 0,
        }))
    };

    // Dave is no member: refused. Carol watches (her ping's answer: the watch is in place).
    dave.send_frame(&watch(g, false)).await?;
    let refused = dave.next_error().await?;
    assert_eq!(refused.code, pb::ErrorCode::Forbidden as i32, "{refused:?}");
    carol.send_frame(&watch(g, false)).await?;
    carol.ping(1).await?;

    // Bob reads over his connection: carol, on the other server, is told.
    bob.send_frame(&read(sent.log_seq)).await?;
    let mark = carol.next_read_mark().await?;
    assert_eq!(
        (mark.user_id, mark.seq, mark.conversation),
        (bob.id(), sent.log_seq, Some(group(g)))
    );
    // Alice shares carol's server and watches nothing: a server queues one relayed signal
    // for all its recipients at once, so had she been one, she had it before her pong.
    let before_pong = alice.ping(2).await?;
    assert!(
        !before_pong
            .iter()
            .any(|f| matches!(f.body, Some(pb::frame::Body::ReadMark(_)))),
        "a member not watching got a read mark: {before_pong:?}"
    );

    // Carol stops, alice starts: bob's next mark, over HTTP, reaches alice only.
    carol.send_frame(&watch(g, true)).await?;
    alice.send_frame(&watch(g, false)).await?;
    carol.ping(3).await?;
    alice.ping(4).await?;
    let second = alice.send_group_chat(g, "and me").await?;
    route
        .mark_read(&bob.login.session_token, &group(g), second.log_seq)
        .await?;
    let mark = alice.next_read_mark().await?;
    assert_eq!((mark.user_id, mark.seq), (bob.id(), second.log_seq));
    let before_pong = carol.ping(5).await?;
    assert!(
        !before_pong
            .iter()
            .any(|f| matches!(f.body, Some(pb::frame::Body::ReadMark(_)))),
        "a stopped watch still got a read mark: {before_pong:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_online_members_only() -> anyhow::Result<()> {
    let cluster = Cluster::builder().servers(2).routes(1).start().await?;
    let route = cluster.route();
    let (g, [mut alice, mut bob, mut carol, mut dave]) = team(&cluster).await?;

    let typing = |c: Conversation| {
        pb::Frame::new(pb::frame::Body::Typing(pb::Typing {
            conversation: Some(c),
            ..Default::default()
        }))
    };
    alice.send_frame(&typing(group(g))).await?;
    for member in [&mut bob, &mut carol] {
        let t = member.next_typing().await?;
        assert_eq!((t.user_id, t.user_name.as_str()), (alice.id(), "alice"));
        assert_eq!(t.conversation, Some(group(g)));
        assert!(!t.stopped);
    }
    // Dave is online but no member. Each server queues one relayed signal for all its
    // recipients at once, and dave shares a server with bob or carol: had he been a
    // recipient, his queue had it before his answer to a ping.
    assert!(
        [bob.server_id(), carol.server_id()].contains(&dave.server_id()),
        "round-robin put dave beside a member"
    );
    let before_pong = dave.ping(1).await?;
    assert!(
        !before_pong
            .iter()
            .any(|f| matches!(f.body, Some(pb::frame::Body::Typing(_)))),
        "a non-member got the group's typing: {before_pong:?}"
    );
    // A private one reaches the peer, named as the peer sees the conversation.
    dave.send_frame(&typing(peer(carol.id()))).await?;
    let t = carol.next_typing().await?;
    assert_eq!(
        (t.user_id, t.conversation),
        (dave.id(), Some(peer(dave.id())))
    );
    // Typing is never stored: the group's history has only its events.
    let history = route
        .history(
            &carol.login.session_token,
            &group(g),
            HistoryFrom::Newest,
            None,
        )
        .await?;
    assert!(history
        .iter()
        .all(|m| m.kind == MessageKind::GroupEvent as i32));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_group_conversation_loses_nothing_stored() -> anyhow::Result<()> {
    let mut cluster = Cluster::builder().servers(2).routes(1).start().await?;
    let route = cluster.route();
    let mut alice = cluster.user("alice", Transport::Tcp).await?;
    let mut bob = cluster.user("bob", Transport::Tcp).await?;
    assert_ne!(alice.server_id(), bob.server_id());
    let g = route
        .create_group(&alice.login.session_token, "team", &[bob.id()])
        .await?
        .group
        .id;
    next_event(&mut bob, g, GroupEventType::Joined).await?;
    let mut sent = Vec::new();
    for i in 0..10 {
        if i == 4 {
            // Bob's server dies mid conversation (no goodbye: its clients see a reset).
            let server = cluster
                .take_server(&bob.login.server.id)
                .expect("bob's server");
            server.kill();
        }
        let r = alice.send_group_chat(g, &format!("k{i}")).await?;
        assert_eq!(r.status, SendStatus::Delivered as i32, "{r:?}");
        sent.push(format!("k{i}"));
    }
    // Bob logs in again (on the live server) and has every message he had not acked.
    drop(bob);
    let mut bob = cluster.relogin("bob", Transport::Tcp, RELOGIN).await?;
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let (m, _) = next_chat(&mut bob, g).await?;
        got.push(m.body);
    }
    assert_eq!(got, sent);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offline_push_webhook_fires_for_offline_receivers_only_and_once() -> anyhow::Result<()>
{
    let hook = cim_tests::webhook::WebhookReceiver::start().await?;
    let url = hook.url().to_string();
    let cluster = Cluster::builder()
        .servers(2)
        .route_config(move |c| {
            c.webhook_url = Some(url.clone());
            c.message_events = true;
            c.message_events_body = true;
        })
        .start()
        .await?;
    // The webhook starts at the end of the stream: wait for its cursor.
    let store = cluster.store().await?;
    cim_tests::wait_until("webhook cursor", Duration::from_secs(10), || {
        let store = store.clone();
        async move { store.cursor("webhook").await.is_ok_and(|c| c.is_some()) }
    })
    .await?;
    let route = cluster.route();
    let mut alice = cluster.user("alice", Transport::Tcp).await?;
    let mut bob = cluster.user("bob", Transport::Tcp).await?;
    let carol = login(&cluster, "carol").await?; // offline
    let g = route
        .create_group(
            &alice.login.session_token,
            "team",
            &[bob.id(), carol.user_id],
        )
        .await?
        .group
        .id;
    next_event(&mut bob, g, GroupEventType::Joined).await?;

    let private = |to: u64, body: &str, id: &str| pb::Send {
        kind: MessageKind::Private as i32,
        to_user_id: to,
        body: body.into(),
        message_id: id.into(),
        ..Default::default()
    };
    let r = alice.send(private(bob.id(), "to bob", "b1")).await?;
    assert_eq!(r.status, SendStatus::Delivered as i32);
    let r = alice.send(private(carol.user_id, "to carol", "c1")).await?;
    assert_eq!(r.status, SendStatus::Stored as i32);
    // A retry of the same message (same id): stored once, notified once.
    let again = alice.send(private(carol.user_id, "to carol", "c1")).await?;
    assert_eq!(again.message_id, r.message_id);
    alice.send_group_chat(g, "to the team").await?;
    alice.send(private(carol.user_id, "last", "c2")).await?;

    let message_events = || -> Vec<serde_json::Value> {
        hook.events()
            .into_iter()
            .filter(|e| e["type"] == "message")
            .collect()
    };
    cim_tests::wait_until("message events", Duration::from_secs(10), || {
        let bodies: Vec<String> = message_events()
            .iter()
            .map(|e| e["message"]["body"].as_str().unwrap_or("").to_string())
            .collect();
        async move {
            ["to carol", "to the team", "last"]
                .iter()
                .all(|b| bodies.iter().any(|x| x == b))
        }
    })
    .await?;
    let events = message_events();
    // Only carol, the offline one, is told; each message once.
    assert!(
        events.iter().all(|e| e["user_id"] == carol.user_id),
        "{events:?}"
    );
    let mut ids: Vec<&str> = events
        .iter()
        .map(|e| e["message"]["id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    let before = ids.len();
    ids.dedup();
    assert_eq!(
        before,
        ids.len(),
        "a message was notified twice: {events:?}"
    );
    assert_eq!(events.len(), 3, "{events:?}");
    let group_event = events
        .iter()
        .find(|e| e["message"]["body"] == "to the team")
        .unwrap();
    assert_eq!(group_event["message"]["conversation_type"], "group");
    assert_eq!(group_event["message"]["conversation_id"], g);
    assert_eq!(group_event["message"]["kind"], "MESSAGE_KIND_GROUP_CHAT");
    assert_eq!(group_event["message"]["sender_id"], alice.id());
    let private_event = events
        .iter()
        .find(|e| e["message"]["body"] == "to carol")
        .unwrap();
    assert_eq!(private_event["message"]["conversation_type"], "user");
    assert_eq!(private_event["message"]["conversation_id"], alice.id());
    assert_eq!(private_event["message"]["log_seq"], r.log_seq);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_whose_event_never_arrived_still_stops_delivery() -> anyhow::Result<()> {
    let cluster = Cluster::builder().servers(1).routes(1).start().await?;
    let route = cluster.route();
    let mut alice = cluster.user("alice", Transport::Tcp).await?;
    let mut bob = cluster.user("bob", Transport::Tcp).await?;
    let g = route
        .create_group(&alice.login.session_token, "team", &[bob.id()])
        .await?
        .group
        .id;
    next_event(&mut bob, g, GroupEventType::Joined).await?;
    alice.send_group_chat(g, "for bob").await?;
    assert_eq!(next_chat(&mut bob, g).await?.0.body, "for bob");
    // Bob is removed in the store alone: the REMOVED event is never pushed (as when it is
    // still on its way from another route). The next message carries a newer membership
    // version, so the server checks its subscribers before delivering.
    let store = cluster.store().await?;
    let mut event = pb::Message {
        id: "removal".into(),
        kind: MessageKind::GroupEvent as i32,
        timestamp_ms: cim_common::time::now_ms(),
        ..Default::default()
    };
    assert_ne!(store.group_remove(g, &[bob.id()], &mut event).await?, 0);
    alice.send_group_chat(g, "not for bob").await?;
    alice.send_private(bob.id(), "marker").await?;
    let next = bob.next_message().await?;
    assert_eq!(next.body, "marker", "bob got {next:?}");
    Ok(())
}
