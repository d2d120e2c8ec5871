//! cim end to end on a real Redis Cluster (issue 20): two connection servers, a route and a
//! real etcd, the state store on a 3-master Redis Cluster (`redis+cluster://…`), through
//! the same clients as the single-Redis tests (`TestUser`, the route's HTTP API, the
//! business API with an API key).
//!
//! What a cluster changes is where keys live: a user's keys (route, login slot, inbox) on
//! the master of the user's hash tag, the shard-wide keys (online index, presence streams,
//! per-server user sets, channel members and list) cut into 16 shards spread over the
//! masters, and every multi-key operation one pipeline per hash slot. So each test drives
//! one feature across users whose keys sit on different masters: private messages over TCP
//! and WebSocket, inbox replay and receipts, the GROUP message, channels and their counts,
//! the paged online list and the merged presence-event order (polling, SSE resume, webhook),
//! and the lost-server sweep.
//!
//! The failover test runs on 3 masters with one replica each (AOF on): it kills the master
//! serving the receiver's inbox while two users exchange messages, keeps sending while the
//! replica takes over, and measures what the asynchronous replication lost (see
//! [`a_master_failover_mid_stream_loses_no_message_acked_before_the_kill`]).
//!
//! Helpers copied from other test files (kept minimal): `Admin` (a trimmed `Api` of
//! business.rs), `Sse` (a trimmed `SseReader` of business.rs) and the webhook receiver
//! `hook` (business.rs).

use anyhow::{ensure, Context};
use axum::{body::Bytes, extract::State, http::HeaderMap, routing::post, Router};
use cim_common::{
    events::EventId,
    keys::{Keys, CLUSTER_SHARDS},
    store::StateStore,
};
use cim_sdk::{
    pb::{self, frame::Body, ErrorCode, Frame, MessageKind, SendStatus},
    RouteClient, Transport,
};
use cim_tests::{
    cluster::{test_password, Cluster, ClusterBuilder, Collected, Received, Sent, TestUser},
    RedisCluster, RedisClusterOptions, RedisNodes,
};
use serde_json::{json, Value};
use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};
use tokio::sync::watch;

/// The business API key of these clusters.
const API_KEY: &str = "test-api-key-0123456789";
/// Deadline of anything the cluster does asynchronously (acks, detach after a close, events).
const EVENTUALLY: Duration = Duration::from_secs(10);
/// Deadline of a re-login (the previous connection's slot is released asynchronously).
const RELOGIN: Duration = Duration::from_secs(10);
/// Largest page of the online list (small, so that a handful of users takes several pages).
const ONLINE_PAGE_MAX: usize = 3;

/// A cluster on a 3-master Redis Cluster without replicas, with the business API on.
fn on_redis_cluster() -> ClusterBuilder {
    Cluster::builder()
        .redis_cluster(RedisClusterOptions::default())
        .route_config(|c| {
            c.api_keys = vec![API_KEY.into()];
            c.online_page_max = ONLINE_PAGE_MAX;
        })
}

/// The Redis Cluster under `cluster`.
fn redis_cluster(cluster: &Cluster) -> anyhow::Result<&RedisCluster> {
    match &cluster.infra.redis {
        RedisNodes::Cluster(c) => Ok(c),
        RedisNodes::Single(_) => anyhow::bail!("this test needs a Redis Cluster"),
    }
}

/// The business API of the cluster's route with the test API key (a trimmed copy of
/// business.rs's `Api`): calls that must answer 200, their JSON body.
#[derive(Clone)]
struct Admin {
    http: reqwest::Client,
    base: String,
}

impl Admin {
    fn new(cluster: &Cluster) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: cluster.route_url(),
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .header("x-api-key", API_KEY)
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let resp = self
            .request(reqwest::Method::GET, path)
            .timeout(EVENTUALLY)
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = resp.status();
        let body: Value = resp.json().await.with_context(|| format!("GET {path}"))?;
        ensure!(status == 200, "GET {path}: {status} {body}");
        Ok(body)
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let resp = self
            .request(reqwest::Method::POST, path)
            .timeout(EVENTUALLY)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        let status = resp.status();
        let answer: Value = resp.json().await.with_context(|| format!("POST {path}"))?;
        ensure!(status == 200, "POST {path} {body}: {status} {answer}");
        Ok(answer)
    }
}

/// The messages of the Push frames among `frames`, with their replay flag.
fn pushed(frames: &[Frame]) -> Vec<(pb::Message, bool)> {
    frames
        .iter()
        .filter_map(|f| match &f.body {
            Some(Body::Push(p)) => Some(p.messages.iter().map(|m| (m.clone(), p.replay))),
            _ => None,
        })
        .flatten()
        .collect()
}

/// Waits until `user_id`'s inbox holds `len` messages.
async fn inbox_len_becomes(
    store: &Arc<dyn StateStore>,
    user_id: u64,
    len: usize,
) -> anyhow::Result<()> {
    cim_tests::cluster::inbox_len_becomes(store, user_id, len, EVENTUALLY).await
}

/// `from` sends `body` to `to`, which must get it live and acks it.
async fn private_exchange(
    from: &mut TestUser,
    to: &mut TestUser,
    body: &str,
) -> anyhow::Result<()> {
    let what = format!(
        "{} ({:?}, {}) → {} ({:?}, {})",
        from.login.name,
        from.transport,
        from.server_id(),
        to.login.name,
        to.transport,
        to.server_id()
    );
    let r = from.send_private(to.id(), body).await?;
    ensure!(r.status() == SendStatus::Delivered, "{what}: {r:?}");
    let (m, replay) = to.next_delivery().await.context(what.clone())?;
    ensure!(
        (m.id.as_str(), m.body.as_str(), m.sender_id, m.receiver_id)
            == (r.message_id.as_str(), body, from.id(), to.id()),
        "{what}: got {m:?} for {r:?}"
    );
    ensure!(
        m.kind() == MessageKind::Private && m.seq > 0 && !replay,
        "{what}: {m:?}"
    );
    to.ack(vec![m.id]).await
}

/// The distinct masters serving `keys` now.
async fn masters_of(cluster: &Cluster, keys: &[String]) -> anyhow::Result<HashSet<usize>> {
    let redis = redis_cluster(cluster)?;
    let mut masters = HashSet::new();
    for key in keys {
        masters.insert(redis.master_for_key(key).await?);
    }
    Ok(masters)
}

#[tokio::test]
async fn private_messages_inbox_replay_and_receipts_on_a_redis_cluster() -> anyhow::Result<()> {
    let started = Instant::now();
    let cluster = on_redis_cluster().start().await?;
    eprintln!(
        "cluster (3 masters, etcd, 2 servers, route) up in {:?}",
        started.elapsed()
    );
    let store = cluster.store().await?;
    let admin = Admin::new(&cluster);
    let route = cluster.route();
    // Round robin: alice and carol on one server, bob on the other.
    let mut alice = cluster.user("alice", Transport::Tcp).await?;
    let mut bob = cluster.user("bob", Transport::WsBinary).await?;
    let mut carol = cluster.user("carol", Transport::WsJson).await?;
    assert_ne!(alice.server_id(), bob.server_id());
    assert_ne!(carol.server_id(), bob.server_id());

    // Live, across servers, over every transport, both ways; and on one server.
    private_exchange(&mut alice, &mut bob, "tcp to websocket").await?;
    private_exchange(&mut bob, &mut alice, "websocket to tcp").await?;
    private_exchange(&mut carol, &mut bob, "json to binary ✓").await?;
    private_exchange(&mut bob, &mut carol, "binary to json <b>").await?;
    private_exchange(&mut alice, &mut carol, "same server").await?;
    for user in [&alice, &bob, &carol] {
        inbox_len_becomes(&store, user.id(), 0).await?;
    }

    // Offline receivers: dave gets 20 private messages, then a system message stored for
    // dave and four more offline users at once (one inbox script per receiver, on the
    // masters of their hash tags: several pipelines of one batch).
    let mut offline = Vec::new();
    for name in ["dave", "erin", "frank", "gina", "hank"] {
        offline.push(route.register(name, &test_password(name)).await?.user_id);
    }
    let keys = Keys::with_shards(cluster.prefix.clone(), CLUSTER_SHARDS);
    let inboxes: Vec<String> = offline.iter().map(|&id| keys.inbox(id)).collect();
    let masters = masters_of(&cluster, &inboxes).await?;
    assert!(
        masters.len() >= 2,
        "the offline inboxes should span masters: {masters:?}"
    );
    let dave_id = offline[0];
    let mut expected = Vec::new();
    for i in 0..20 {
        let r = alice.send_private(dave_id, &format!("inbox-{i}")).await?;
        assert_eq!(r.status(), SendStatus::Stored, "{r:?}");
        expected.push((r.message_id, format!("inbox-{i}")));
    }
    let v = admin
        .post(
            "/api/admin/messages",
            json!({"to": offline, "body": "system notice"}),
        )
        .await?;
    let results = v["results"].as_array().context("results")?;
    assert_eq!(results.len(), offline.len(), "{v}");
    for r in results {
        assert_eq!(r["status"], "stored", "{v}");
    }
    let notice_id = results[0]["id"].as_str().context("an id")?.to_string();
    expected.push((notice_id, "system notice".to_string()));
    assert_eq!(store.inbox_len(dave_id).await?, 21);

    // Dave's next connection starts with his whole inbox, in order, as replay.
    let mut dave = cluster.relogin("dave", Transport::Tcp, RELOGIN).await?;
    let replayed = pushed(&dave.ping(1).await?);
    let got: Vec<(String, String)> = replayed
        .iter()
        .map(|(m, _)| (m.id.clone(), m.body.clone()))
        .collect();
    assert_eq!(got, expected, "dave's replay");
    assert!(replayed.iter().all(|(_, replay)| *replay));
    assert!(
        replayed.windows(2).all(|w| w[0].0.seq < w[1].0.seq),
        "seqs increase: {replayed:?}"
    );
    dave.ack(expected.iter().map(|(id, _)| id.clone()).collect())
        .await?;
    inbox_len_becomes(&store, dave_id, 0).await?;
    drop(dave);
    let mut dave = cluster.relogin("dave", Transport::WsJson, RELOGIN).await?;
    let again = pushed(&dave.ping(2).await?);
    assert!(again.is_empty(), "acked messages came again: {again:?}");
    // Every other offline user (on their own masters) gets the notice once.
    for name in ["erin", "frank", "gina", "hank"] {
        let mut user = cluster.relogin(name, Transport::Tcp, RELOGIN).await?;
        let got = pushed(&user.ping(1).await?);
        assert_eq!(got.len(), 1, "{name}: {got:?}");
        assert_eq!(
            (got[0].0.body.as_str(), got[0].0.kind(), got[0].1),
            ("system notice", MessageKind::System, true),
            "{name}"
        );
    }

    // A receipt: only after the receiver's ack, to the sender on the other server, stored
    // in the sender's inbox until acked in turn.
    let r = alice
        .send(pb::Send {
            kind: MessageKind::Private as i32,
            to_user_id: bob.id(),
            body: "tell me when you read this".into(),
            receipt: true,
            ..Default::default()
        })
        .await?;
    assert_eq!(r.status(), SendStatus::Delivered, "{r:?}");
    let (m, _) = bob.next_delivery().await?;
    assert!(m.receipt && m.id == r.message_id, "{m:?}");
    let before = pushed(&alice.ping(3).await?);
    assert!(before.is_empty(), "a receipt before the ack: {before:?}");
    bob.ack(vec![m.id.clone()]).await?;
    let (receipt, _) = alice.next_delivery().await?;
    assert_eq!(receipt.kind(), MessageKind::Receipt, "{receipt:?}");
    assert_eq!(
        (
            receipt.receipt_for.as_str(),
            receipt.sender_id,
            receipt.receiver_id
        ),
        (r.message_id.as_str(), bob.id(), alice.id())
    );
    assert!(receipt.seq > 0, "{receipt:?}");
    inbox_len_becomes(&store, bob.id(), 0).await?;
    assert_eq!(store.inbox_len(alice.id()).await?, 1);
    alice.ack(vec![receipt.id]).await?;
    inbox_len_becomes(&store, alice.id(), 0).await?;
    eprintln!(
        "private, inbox and receipts: {:?} in all",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn group_and_channel_messages_on_a_redis_cluster() -> anyhow::Result<()> {
    let cluster = on_redis_cluster().start().await?;
    let admin = Admin::new(&cluster);
    let route = cluster.route();
    let transports = [Transport::Tcp, Transport::WsBinary, Transport::WsJson];
    let mut users = Vec::new();
    for i in 0..6 {
        users.push(cluster.user(&format!("u{i}"), transports[i % 3]).await?);
    }
    let servers: HashSet<String> = users.iter().map(|u| u.server_id().to_string()).collect();
    assert_eq!(servers.len(), 2, "users on both servers");

    // GROUP: everyone online but the sender, once. A private marker sent after it closes
    // each receiver's window (the group push completed before the sender got its result).
    let r = users[0].send_group("hello everyone").await?;
    assert_eq!(
        (r.status(), r.delivered),
        (SendStatus::Delivered, 5),
        "{r:?}"
    );
    for i in 1..users.len() {
        let marker = format!("group-marker-{i}");
        let to = users[i].id();
        users[0].send_private(to, &marker).await?;
        let got = users[i].messages_until(&marker).await?;
        let copies: Vec<_> = got.iter().filter(|m| m.body == "hello everyone").collect();
        assert_eq!(copies.len(), 1, "u{i}: {got:?}");
        assert_eq!((copies[0].kind(), copies[0].seq), (MessageKind::Group, 0));
    }

    // A channel: u0 (the sender), u1 and u2 (on the two servers) online, olga a member who
    // is logged in but not connected; u3..u5 online, not members.
    assert_ne!(users[1].server_id(), users[2].server_id());
    for user in &users[..3] {
        let joined = route
            .join_channel(&user.login.session_token, "room")
            .await?;
        assert!(joined.joined, "{}", user.login.name);
    }
    let olga = cluster.register_and_login("olga").await?;
    assert!(
        route
            .join_channel(&olga.session_token, "room")
            .await?
            .joined
    );
    let stats = admin.get("/api/channels/room").await?;
    assert_eq!(stats, json!({"name": "room", "members": 4, "online": 3}));

    let r = users[0]
        .send(pb::Send {
            kind: MessageKind::Channel as i32,
            channel: "room".into(),
            body: "hi room".into(),
            ..Default::default()
        })
        .await?;
    assert_eq!(
        (r.status(), r.delivered),
        (SendStatus::Delivered, 2),
        "{r:?}"
    );
    // Over HTTP as u1: u0 and u2.
    let sent = route
        .send_channel(&users[1].login.session_token, "room", "from http")
        .await?;
    assert_eq!(sent.delivered, 2, "{sent:?}");
    for i in 0..users.len() {
        let marker = format!("channel-marker-{i}");
        let to = users[i].id();
        let from = if i == 5 { 4 } else { 5 };
        users[from].send_private(to, &marker).await?;
        let got: Vec<String> = users[i]
            .messages_until(&marker)
            .await?
            .into_iter()
            .filter(|m| m.kind() == MessageKind::Channel)
            .map(|m| m.body)
            .collect();
        let want: &[&str] = match i {
            0 => &["from http"],
            1 => &["hi room"],
            2 => &["hi room", "from http"],
            _ => &[],
        };
        assert_eq!(got, want, "u{i}'s channel messages");
    }

    // Counts follow presence: u2 leaves the connection, the channel keeps the member.
    users.remove(2).conn.close().await;
    cim_tests::wait_until("room to count 2 online", EVENTUALLY, || {
        let admin = admin.clone();
        async move {
            admin
                .get("/api/channels/room")
                .await
                .is_ok_and(|v| v["members"] == 4 && v["online"] == 2)
        }
    })
    .await?;

    // The channel list spans the shards of the names: paged, in name order, nothing twice.
    let mut names = vec!["room".to_string()];
    for name in ["alpha", "beta", "gamma", "delta", "zulu", "频道"] {
        route
            .join_channel(&users[0].login.session_token, name)
            .await?;
        names.push(name.to_string());
    }
    names.sort();
    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    for _page in 0..names.len() + 1 {
        let path = match &after {
            Some(a) => format!("/api/channels?limit=2&after={}", urlencode(a)),
            None => "/api/channels?limit=2".to_string(),
        };
        let v = admin.get(&path).await?;
        let page = v["channels"].as_array().context("channels")?;
        assert!(page.len() <= 2, "{v}");
        listed.extend(
            page.iter()
                .map(|c| c["name"].as_str().unwrap_or("").to_string()),
        );
        match v["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(listed, names, "the channel list, page by page");
    Ok(())
}

/// Percent-encodes a query value (channel names may be any Unicode).
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One presence event as the business API serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Presence {
    id: String,
    kind: String,
    user_id: u64,
    server_id: String,
    reason: String,
}

impl Presence {
    fn parse(v: &Value) -> anyhow::Result<Self> {
        Ok(Self {
            id: v["id"].as_str().context("an event id")?.to_string(),
            kind: v["type"].as_str().context("a type")?.to_string(),
            user_id: v["user_id"].as_u64().context("a user id")?,
            server_id: v["server_id"].as_str().unwrap_or("").to_string(),
            reason: v["reason"].as_str().unwrap_or("").to_string(),
        })
    }
}

/// One page of `/api/admin/events/recent` after `after`: the events and `next`.
async fn events_page(
    admin: &Admin,
    after: Option<&str>,
    limit: usize,
) -> anyhow::Result<(Vec<Presence>, Option<String>)> {
    let path = match after {
        Some(a) => format!("/api/admin/events/recent?limit={limit}&after={a}"),
        None => format!("/api/admin/events/recent?limit={limit}"),
    };
    let v = admin.get(&path).await?;
    let events = v["events"]
        .as_array()
        .context("events")?
        .iter()
        .map(Presence::parse)
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((events, v["next"].as_str().map(str::to_string)))
}

/// Every event after `after`, paging by `limit` until an empty page (bounded).
async fn events_all(
    admin: &Admin,
    after: Option<&str>,
    limit: usize,
) -> anyhow::Result<Vec<Presence>> {
    let mut out = Vec::new();
    let mut cursor = after.map(str::to_string);
    for _page in 0..1000 {
        let (page, next) = events_page(admin, cursor.as_deref(), limit).await?;
        if page.is_empty() {
            ensure!(next.is_none(), "an empty page with next {next:?}");
            return Ok(out);
        }
        out.extend(page);
        cursor = next;
    }
    anyhow::bail!("more than 1000 pages of events")
}

/// Polls the events by pages of 2 while they are being published, until `count` arrived
/// (or `deadline`): a reader that pages through a stream that grows meanwhile.
async fn poll_events_while_published(
    admin: Admin,
    count: usize,
    deadline: Duration,
) -> anyhow::Result<Vec<Presence>> {
    let end = Instant::now() + deadline;
    let mut out: Vec<Presence> = Vec::new();
    let mut cursor: Option<String> = None;
    while out.len() < count {
        ensure!(
            Instant::now() < end,
            "only {} of {count} events within {deadline:?}: {out:?}",
            out.len()
        );
        let (page, next) = events_page(&admin, cursor.as_deref(), 2).await?;
        if page.is_empty() {
            // Nothing new yet: no event tells a poller when there is (that is the point).
            tokio::time::sleep(cim_tests::POLL_INTERVAL).await;
            continue;
        }
        out.extend(page);
        cursor = next;
    }
    Ok(out)
}

/// Ids strictly increasing in the order the store hands events out (no event twice).
fn check_ids_increase(events: &[Presence]) -> anyhow::Result<()> {
    for w in events.windows(2) {
        let a = EventId::parse(&w[0].id).context("an event id")?;
        let b = EventId::parse(&w[1].id).context("an event id")?;
        ensure!(a < b, "event {} came after {}", w[1].id, w[0].id);
    }
    Ok(())
}

/// Reads server-sent events (a trimmed copy of business.rs's `SseReader`): id and data.
struct Sse {
    resp: reqwest::Response,
    buf: String,
}

impl Sse {
    async fn open(admin: &Admin, last_event_id: &str) -> anyhow::Result<Self> {
        let resp = admin
            .request(reqwest::Method::GET, "/api/admin/events")
            .header("last-event-id", last_event_id)
            .send()
            .await?;
        ensure!(resp.status() == 200, "SSE: {}", resp.status());
        Ok(Self {
            resp,
            buf: String::new(),
        })
    }

    /// The next event (keep-alive comments skipped), within [`EVENTUALLY`].
    async fn next(&mut self) -> anyhow::Result<Presence> {
        let read = async {
            loop {
                if let Some(end) = self.buf.find("\n\n") {
                    let block: String = self.buf.drain(..end + 2).collect();
                    let (mut id, mut data) = (String::new(), String::new());
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("id:") {
                            id = v.trim().to_string();
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data.push_str(v.trim());
                        }
                    }
                    if data.is_empty() {
                        continue;
                    }
                    let mut v: Value = serde_json::from_str(&data)?;
                    v["id"] = Value::String(id);
                    return Presence::parse(&v);
                }
                let chunk = self.resp.chunk().await?.context("the event stream ended")?;
                self.buf.push_str(&String::from_utf8_lossy(&chunk));
            }
        };
        tokio::time::timeout(EVENTUALLY, read)
            .await
            .map_err(|_| anyhow::anyhow!("no event within {EVENTUALLY:?}"))?
    }
}

/// What the webhook receiver got: raw bodies and their signature headers.
type Hooked = Arc<Mutex<Vec<(Bytes, String)>>>;

/// The webhook receiver (business.rs's `hook`).
async fn hook(State(got): State<Hooked>, headers: HeaderMap, body: Bytes) -> &'static str {
    let sig = headers
        .get("x-cim-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    got.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((body, sig));
    "ok"
}

/// Starts the webhook receiver on a free port; returns its URL and what it gets.
async fn webhook_receiver() -> anyhow::Result<(String, Hooked)> {
    let got: Hooked = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(got.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, got))
}

/// The events the webhook got so far, in delivery order.
fn hooked_events(got: &Hooked) -> Vec<Presence> {
    got.lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .flat_map(|(body, _)| {
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            v["events"].as_array().cloned().unwrap_or_default()
        })
        .filter_map(|e| Presence::parse(&e).ok())
        .collect()
}

/// The whole online list, paged by [`ONLINE_PAGE_MAX`] (names, in page order).
async fn online_names(
    route: &RouteClient,
    token: &str,
    prefix: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    let mut after: Option<String> = None;
    for _page in 0..100 {
        let page = route
            .online(token, prefix, after.as_deref(), Some(100))
            .await?;
        ensure!(
            page.users.len() <= ONLINE_PAGE_MAX,
            "a page over the maximum: {page:?}"
        );
        names.extend(page.users.into_iter().map(|u| u.name));
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(names),
        }
    }
    anyhow::bail!("more than 100 pages of online users")
}

#[tokio::test]
async fn presence_online_list_events_and_webhook_on_a_redis_cluster() -> anyhow::Result<()> {
    let (hook_url, hooked) = webhook_receiver().await?;
    let cluster = on_redis_cluster()
        .route_config(move |c| {
            c.api_keys = vec![API_KEY.into()];
            c.online_page_max = ONLINE_PAGE_MAX;
            c.webhook_url = Some(hook_url.clone());
            c.webhook_secret = Some("hook-secret".into());
        })
        .start()
        .await?;
    let admin = Admin::new(&cluster);
    let route = cluster.route();
    let store = cluster.store().await?;
    // The webhook starts at the end of the stream: wait until it has its cursor.
    cim_tests::wait_until("the webhook cursor", EVENTUALLY, || {
        let store = store.clone();
        async move { store.cursor("webhook").await.is_ok_and(|c| c.is_some()) }
    })
    .await?;

    // 12 users online (ids 1..=12: 12 shards of the presence streams), then half of them
    // close: 18 events, read meanwhile by a poller paging 2 at a time.
    let names = [
        "fay", "ann", "emil", "annie", "bob", "dora", "anna", "carl", "hugo", "ida", "jon", "kim",
    ];
    let closing = names.len() / 2;
    let poller = tokio::spawn(poll_events_while_published(
        admin.clone(),
        names.len() + closing,
        Duration::from_secs(30),
    ));
    let mut users = Vec::new();
    for name in names {
        users.push(cluster.user(name, Transport::Tcp).await?);
    }
    let keys = Keys::with_shards(cluster.prefix.clone(), CLUSTER_SHARDS);
    let streams: Vec<String> = users
        .iter()
        .map(|u| keys.events(keys.user_shard(u.id())))
        .collect();
    let masters = masters_of(&cluster, &streams).await?;
    assert_eq!(masters.len(), 3, "the users' streams span every master");
    let token = users[0].login.session_token.clone();
    let mut sorted: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    sorted.sort();
    assert_eq!(online_names(&route, &token, None).await?, sorted);
    assert_eq!(
        online_names(&route, &token, Some("ann")).await?,
        ["ann", "anna", "annie"]
    );
    let servers: HashMap<u64, String> = users
        .iter()
        .map(|u| (u.id(), u.server_id().to_string()))
        .collect();
    let closed: Vec<TestUser> = users.drain(names.len() - closing..).collect();
    let closed_ids: Vec<u64> = closed.iter().map(TestUser::id).collect();
    drop(closed);
    let events = poller.await??;

    // The poller got every event once, in one increasing order, per user online first.
    check_ids_increase(&events)?;
    for (user_id, server_id) in &servers {
        let server_id = server_id.as_str();
        let mine: Vec<(&str, &str, &str)> = events
            .iter()
            .filter(|e| e.user_id == *user_id)
            .map(|e| (e.kind.as_str(), e.server_id.as_str(), e.reason.as_str()))
            .collect();
        let want: Vec<(&str, &str, &str)> = match closed_ids.contains(user_id) {
            true => vec![("online", server_id, ""), ("offline", server_id, "closed")],
            false => vec![("online", server_id, "")],
        };
        assert_eq!(mine, want, "events of user {user_id}");
    }
    assert_eq!(events.len(), names.len() + closing, "{events:?}");

    // Read again from the start in other page sizes: the same events, the same order.
    assert_eq!(events_all(&admin, None, 5).await?, events);
    assert_eq!(events_all(&admin, None, 1000).await?, events);
    // Resuming after any event gives exactly the rest, however often.
    let at = &events[4].id;
    for _ in 0..2 {
        assert_eq!(events_all(&admin, Some(at), 3).await?, events[5..]);
    }
    let last = &events[events.len() - 1].id;
    assert_eq!(
        events_page(&admin, Some(last), 10).await?,
        (Vec::new(), None)
    );

    // SSE resumed with Last-Event-ID: the rest, then the next event live.
    let mut sse = Sse::open(&admin, at).await?;
    let mut resumed = Vec::new();
    for _ in 5..events.len() {
        resumed.push(sse.next().await?);
    }
    assert_eq!(resumed, events[5..], "SSE resumed after {at}");
    let gus = cluster.user("gus", Transport::WsBinary).await?;
    let live = sse.next().await?;
    assert_eq!(
        (live.kind.as_str(), live.user_id, live.server_id.as_str()),
        ("online", gus.id(), gus.server_id())
    );
    assert_eq!(
        events_all(&admin, Some(last), 10).await?,
        std::slice::from_ref(&live)
    );

    // The webhook delivered the same events, in the same order, signed.
    let mut want = events.clone();
    want.push(live);
    let count = want.len();
    cim_tests::wait_until("the webhook to get every event", EVENTUALLY, || {
        let n = hooked_events(&hooked).len();
        async move { n >= count }
    })
    .await?;
    assert_eq!(hooked_events(&hooked), want, "the webhook's events");
    for (body, sig) in hooked.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        let expected = format!(
            "sha256={}",
            cim_route::events::signature("hook-secret", body)
        );
        assert_eq!(sig, &expected);
    }
    Ok(())
}

#[tokio::test]
async fn a_lost_servers_users_are_swept_on_a_redis_cluster() -> anyhow::Result<()> {
    let mut cluster = on_redis_cluster()
        // The registry drops a killed server after its lease: short, so the sweep comes soon.
        .server_config(|c| c.registry_ttl_secs = 2)
        .start()
        .await?;
    let admin = Admin::new(&cluster);
    let store = cluster.store().await?;
    let mut users = Vec::new();
    for i in 0..8 {
        let user = cluster.user(&format!("s{i}"), Transport::Tcp).await?;
        route_join(&cluster, &user, "lobby").await?;
        users.push(user);
    }
    let stats = admin.get("/api/channels/lobby").await?;
    assert_eq!(stats, json!({"name": "lobby", "members": 8, "online": 8}));
    let victim = users[0].server_id().to_string();
    let (lost, kept): (Vec<&TestUser>, Vec<&TestUser>) =
        users.iter().partition(|u| u.server_id() == victim);
    let lost_ids: Vec<u64> = lost.iter().map(|u| u.id()).collect();
    let kept_ids: Vec<u64> = kept.iter().map(|u| u.id()).collect();
    assert_eq!((lost.len(), kept.len()), (4, 4), "round robin");
    // The lost server's users sit in several shards (its per-server user sets).
    let shards: HashSet<u64> = lost_ids
        .iter()
        .map(|id| id % CLUSTER_SHARDS as u64)
        .collect();
    assert_eq!(shards.len(), 4, "{lost_ids:?}");

    let killed = Instant::now();
    cluster.take_server(&victim).context("the victim")?.kill();
    cim_tests::wait_until(
        "the lost server's routes to be removed",
        Duration::from_secs(20),
        || {
            let store = store.clone();
            let ids = lost_ids.clone();
            async move {
                store
                    .routes(&ids)
                    .await
                    .is_ok_and(|r| r.iter().all(Option::is_none))
            }
        },
    )
    .await?;
    eprintln!("routes swept {:?} after the kill", killed.elapsed());
    let (_, left) = store.server_routes(&victim, 0, 100).await?;
    assert!(left.is_empty(), "still attached to {victim}: {left:?}");
    let routes = store.routes(&kept_ids).await?;
    assert!(routes.iter().all(Option::is_some), "{routes:?}");

    // Offline for everyone: presence, the online list and count, channel counts.
    let ids: Vec<String> = users.iter().map(|u| u.id().to_string()).collect();
    let v = admin
        .get(&format!("/api/admin/presence?user_ids={}", ids.join(",")))
        .await?;
    for (user, p) in users.iter().zip(v["users"].as_array().context("users")?) {
        let online = user.server_id() != victim;
        assert_eq!(p["online"], online, "{}: {p}", user.login.name);
    }
    let token = kept[0].login.session_token.clone();
    let mut names: Vec<String> = kept.iter().map(|u| u.login.name.clone()).collect();
    names.sort();
    assert_eq!(online_names(&cluster.route(), &token, None).await?, names);
    assert_eq!(admin.get("/api/admin/online/count").await?["online"], 4);
    cim_tests::wait_until("the lobby to count 4 online", EVENTUALLY, || {
        let admin = admin.clone();
        async move {
            admin
                .get("/api/channels/lobby")
                .await
                .is_ok_and(|v| v == json!({"name": "lobby", "members": 8, "online": 4}))
        }
    })
    .await?;

    // One `server_lost` event per lost user, naming the server (the route publishes them
    // with the removal, so they are in the stream by now).
    let events = events_all(&admin, None, 1000).await?;
    let mut swept: Vec<u64> = events
        .iter()
        .filter(|e| e.reason == "server_lost")
        .map(|e| {
            assert_eq!(
                (e.kind.as_str(), e.server_id.as_str()),
                ("offline", victim.as_str())
            );
            e.user_id
        })
        .collect();
    swept.sort_unstable();
    let mut want = lost_ids.clone();
    want.sort_unstable();
    assert_eq!(swept, want, "server_lost events");
    check_ids_increase(&events)?;

    // A lost user logs in again, lands on the surviving server and chats.
    let name = lost[0].login.name.clone();
    let friend = users
        .iter()
        .position(|u| u.server_id() != victim)
        .context("a user on the surviving server")?;
    let mut friend = users.swap_remove(friend);
    drop(users);
    let mut back = cluster.relogin(&name, Transport::Tcp, RELOGIN).await?;
    assert_ne!(back.server_id(), victim);
    private_exchange(&mut friend, &mut back, "welcome back").await?;
    Ok(())
}

/// `user` joins channel `name` through the route.
async fn route_join(cluster: &Cluster, user: &TestUser, name: &str) -> anyhow::Result<()> {
    let joined = cluster
        .route()
        .join_channel(&user.login.session_token, name)
        .await?;
    ensure!(joined.joined, "{} was already in {name}", user.login.name);
    Ok(())
}

/// Body of the last message of the failover stream: the receiver stops when it arrives.
const MARKER: &str = "end";
/// The stream's bounds: at most this many messages, for at most this long (whichever first).
const STREAM_MESSAGES: u64 = 400;
const STREAM_TIME: Duration = Duration::from_secs(20);
/// Sends in flight at once.
const WINDOW: usize = 4;
/// The master dies after this many answers and [`KILL_AFTER`] into the stream, or after
/// [`KILL_BY_ANSWERS`] answers: mid-stream, with many messages acked well before the kill.
const KILL_AFTER_ANSWERS: usize = 100;
const KILL_AFTER: Duration = Duration::from_millis(500);
const KILL_BY_ANSWERS: usize = 250;
/// Sends per chunk (the loop checks its bounds between chunks).
const CHUNK: u64 = 20;
/// Accepted sends after the failover that end the stream early.
const RESUMED: usize = 40;
/// How long after the failover sends may still fail (the cim processes' cluster clients
/// learning the new topology).
const RECOVERY: Duration = Duration::from_secs(15);
/// Messages acked by the master this long before it was killed must have reached its
/// replica. Redis feeds a write to its replicas in the same event-loop turn as the reply
/// (asynchronous, but not delayed), and on loopback the replica has the bytes in its socket
/// buffer at once: a loss older than this is a bug, not replication lag.
const REPLICATION_MARGIN: Duration = Duration::from_millis(100);
/// Everything the receiver does in the failover test.
const COLLECT_DEADLINE: Duration = Duration::from_secs(90);

/// Receives pushes until a message with body `marker` arrives, never acking (so the inbox
/// keeps every message it stored: the replay after the failover shows what survived), and
/// logs in again when the connection ends. Returns what arrived and the connected user.
async fn receive_without_acking(
    mut user: TestUser,
    route: RouteClient,
    marker: &str,
    deadline: Duration,
) -> anyhow::Result<(Collected, TestUser)> {
    let end = tokio::time::Instant::now() + deadline;
    let name = user.login.name.clone();
    let mut collected = Collected {
        connections: 1,
        ..Default::default()
    };
    loop {
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        let push = user.next_push_or_end(left).await.with_context(|| {
            format!(
                "{name}: {} messages, no marker {marker:?}",
                collected.received.len()
            )
        })?;
        let Some(push) = push else {
            let lost = Instant::now();
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            user = TestUser::login_again(&route, &name, user.transport, left).await?;
            collected.reconnect_times.push(lost.elapsed());
            collected.connections += 1;
            continue;
        };
        let done = push.messages.iter().any(|m| m.body == marker);
        for message in push.messages {
            collected.received.push(Received {
                connection: collected.connections - 1,
                replay: push.replay,
                message,
            });
        }
        if done {
            return Ok((collected, user));
        }
    }
}

/// When each answer of a stream arrived, by message number.
type AnsweredAt = HashMap<u64, Instant>;

/// The failover stream: chunks of [`CHUNK`] numbered messages from 0, [`WINDOW`] in flight,
/// until the failover is over and [`RESUMED`] sends were accepted since, or the stream's
/// bounds. Every answer is timed in `answered_at` and counted in `answers`.
async fn stream_through_failover(
    sender: &mut TestUser,
    to: u64,
    failed_over: &AtomicBool,
    answered_at: &mut AnsweredAt,
    answers: watch::Sender<usize>,
) -> anyhow::Result<Vec<Sent>> {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut n = 0;
    let mut resumed = 0;
    while n < STREAM_MESSAGES && started.elapsed() < STREAM_TIME && resumed < RESUMED {
        let after_failover = failed_over.load(Ordering::SeqCst);
        let end = (n + CHUNK).min(STREAM_MESSAGES);
        let chunk = sender
            .stream_private(
                to,
                n..end,
                WINDOW,
                |n| format!("m{n}"),
                |s| {
                    answered_at.insert(s.n, Instant::now());
                    answers.send_modify(|a| *a += 1);
                },
            )
            .await?;
        if after_failover {
            resumed += chunk.iter().filter(|s| s.accepted()).count();
        }
        out.extend(chunk);
        n = end;
    }
    Ok(out)
}

/// Kills master `victim` once the stream is far enough ([`KILL_AFTER_ANSWERS`] answers and
/// [`KILL_AFTER`], or [`KILL_BY_ANSWERS`] answers), then waits for its replica to take over
/// and says so in `failed_over`. Returns when it killed, the promoted replica, and when the
/// cluster was settled without the victim.
async fn kill_mid_stream(
    redis: &mut RedisCluster,
    victim: usize,
    mut answers: watch::Receiver<usize>,
    failed_over: &AtomicBool,
) -> anyhow::Result<(Instant, usize, Instant)> {
    let started = Instant::now();
    let ended = "the stream ended before the kill";
    answers
        .wait_for(|&a| a >= KILL_AFTER_ANSWERS)
        .await
        .context(ended)?;
    // A deliberate delay, not a wait for an event: enough of the stream lies well before the
    // kill for the zero-loss check to mean something, however fast the sends are.
    tokio::select! {
        () = tokio::time::sleep(KILL_AFTER.saturating_sub(started.elapsed())) => {}
        far = answers.wait_for(|&a| a >= KILL_BY_ANSWERS) => { far.context(ended)?; }
    }
    redis.kill(victim);
    let killed_at = Instant::now();
    let promoted = redis.wait_for_failover(victim).await;
    failed_over.store(true, Ordering::SeqCst);
    Ok((killed_at, promoted?, Instant::now()))
}

/// What one class of accepted messages (by when they were answered) became.
#[derive(Debug, Default, Clone, Copy)]
struct Fate {
    accepted: usize,
    /// Not in the receiver's inbox after the failover (its replay).
    not_stored: usize,
    /// Neither received live nor replayed.
    lost: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_failover_mid_stream_loses_no_message_acked_before_the_kill() -> anyhow::Result<()>
{
    let t0 = Instant::now();
    let mut cluster = Cluster::builder()
        .redis_cluster(RedisClusterOptions {
            masters: 3,
            replicas: 1,
            aof: true,
        })
        .start()
        .await?;
    let startup = t0.elapsed();
    let route = cluster.route();
    let receiver = cluster.user("receiver", Transport::Tcp).await?;
    let mut sender = cluster.user("sender", Transport::Tcp).await?;
    assert_ne!(receiver.server_id(), sender.server_id());
    let receiver_id = receiver.id();
    let keys = Keys::with_shards(cluster.prefix.clone(), CLUSTER_SHARDS);
    let victim = redis_cluster(&cluster)?
        .master_for_key(&keys.inbox(receiver_id))
        .await?;
    let sender_master = redis_cluster(&cluster)?
        .master_for_key(&keys.inbox(sender.id()))
        .await?;
    let call_bound = cluster.infra.backend_config(&cluster.prefix).timeout()
        + cluster.server_config(&|_| {}).internal_timeout();
    let collector = tokio::spawn(receive_without_acking(
        receiver,
        route.clone(),
        MARKER,
        COLLECT_DEADLINE,
    ));

    // The stream, while the master of the receiver's keys is killed mid-way (sends in
    // flight) and a replica takes over.
    let started = Instant::now();
    let mut answered_at = AnsweredAt::new();
    let failed_over = AtomicBool::new(false);
    let (answers, answers_rx) = watch::channel(0);
    let (sent, killed) = tokio::join!(
        stream_through_failover(
            &mut sender,
            receiver_id,
            &failed_over,
            &mut answered_at,
            answers
        ),
        kill_mid_stream(
            cluster.infra.redis.redis_cluster(),
            victim,
            answers_rx,
            &failed_over
        )
    );
    let mut sent = sent?;
    let (killed_at, promoted, failover_at) = killed?;
    let failover_took = failover_at - killed_at;

    // Sending works again (the clients follow the new topology; no event says when).
    let mut n = sent.iter().map(|s| s.n).max().unwrap_or(0) + 1;
    let mut back_at = sent
        .iter()
        .filter(|s| s.accepted() && answered_at[&s.n] > failover_at)
        .map(|s| answered_at[&s.n])
        .min();
    while back_at.is_none() {
        ensure!(
            failover_at.elapsed() < RECOVERY,
            "sends still fail {RECOVERY:?} after the failover: {}",
            statuses(&sent[sent.len().saturating_sub(10)..])
        );
        let one = sender
            .stream_private(
                receiver_id,
                n..n + 1,
                1,
                |n| format!("m{n}"),
                |s| {
                    answered_at.insert(s.n, Instant::now());
                },
            )
            .await?;
        n += 1;
        if one[0].accepted() {
            back_at = Some(answered_at[&one[0].n]);
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sent.extend(one);
    }
    let back_at = back_at.context("sends work again")?;
    let tail = sender
        .stream_private(
            receiver_id,
            n..n + 50,
            WINDOW,
            |n| format!("m{n}"),
            |s| {
                answered_at.insert(s.n, Instant::now());
            },
        )
        .await?;
    assert!(
        tail.iter().all(Sent::accepted),
        "after the failover: {}",
        statuses(&tail)
    );
    sent.extend(tail);
    let marker = sender
        .send(pb::Send {
            kind: MessageKind::Private as i32,
            to_user_id: receiver_id,
            body: MARKER.into(),
            message_id: "marker".into(),
            ..Default::default()
        })
        .await?;
    assert!(
        matches!(marker.status(), SendStatus::Delivered | SendStatus::Stored),
        "{marker:?}"
    );

    // Sends during the switch: answered, accepted or failed with a reason, never hung.
    for s in sent.iter().filter(|s| !s.accepted()) {
        assert_eq!(s.result.status(), SendStatus::Failed, "{s:?}");
        let error = s.result.error.as_ref().context("a failure says why")?;
        assert!(
            matches!(error.code(), ErrorCode::Unavailable | ErrorCode::Overloaded),
            "{s:?}"
        );
        assert!(!error.message.is_empty(), "{s:?}");
    }
    let slowest = sent.iter().map(|s| s.latency).max().unwrap_or_default();
    assert!(
        slowest < call_bound,
        "a send took {slowest:?} (bound {call_bound:?})"
    );

    // What arrived live, then what the inbox still holds (nothing was acked): its replay.
    let (collected, receiver) = collector.await??;
    // The receiver's route (on the failed-over master too) still names its server.
    let store = cluster.store().await?;
    let routes = store.routes(&[receiver_id]).await?;
    assert_eq!(
        routes[0].as_ref().map(|r| r.server_id.as_str()),
        Some(receiver.server_id()),
        "the receiver's route after the failover"
    );
    drop(receiver);
    let mut again = cluster.relogin("receiver", Transport::Tcp, RELOGIN).await?;
    let replay = pushed(&again.ping(1).await?);
    let live: HashSet<&str> = collected
        .received
        .iter()
        .map(|r| r.message.id.as_str())
        .collect();
    let stored: HashSet<&str> = replay.iter().map(|(m, _)| m.id.as_str()).collect();
    // The survivors replay in send order.
    let by_id: HashMap<&str, &Sent> = sent.iter().map(|s| (s.id.as_str(), s)).collect();
    let order: Vec<u64> = replay
        .iter()
        .filter_map(|(m, _)| by_id.get(m.id.as_str()).map(|s| s.n))
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "the replay is out of send order: {order:?}"
    );

    let fates = classify(&sent, &answered_at, killed_at, failover_at, &live, &stored);
    let failed = sent.iter().filter(|s| !s.accepted()).count();
    // A send answered UNAVAILABLE may still have been stored: its call timed out while the
    // cluster client held the write, which it sent once the replica had taken over. That
    // is the ambiguity UNAVAILABLE carries (resend with the same id: stored once).
    let failed_but_stored = sent
        .iter()
        .filter(|s| !s.accepted() && stored.contains(s.id.as_str()))
        .count();
    let outage = longest_gap(&sent, &answered_at);
    eprintln!(
        "failover: cluster up in {startup:?}; master {victim} (receiver's inbox; sender's \
         on {sender_master}) killed {:?} into the stream, replica {promoted} took over \
         after {failover_took:?}, sends accepted again {:?} after the kill; {} sends, \
         {failed} failed ({failed_but_stored} of them stored all the same), slowest \
         {slowest:?}, longest gap between accepted answers {outage:?}; receiver \
         connections {}, {} received live, {} in the inbox after; fates {fates:?}; whole \
         test {:?}",
        killed_at - started,
        back_at - killed_at,
        sent.len(),
        collected.connections,
        collected.received.len(),
        replay.len(),
        t0.elapsed()
    );
    let [early, near, after] = fates;
    // Not a vacuous check: a good part of the stream was acked well before the kill.
    assert!(early.accepted >= KILL_AFTER_ANSWERS / 2, "{early:?}");
    assert_eq!(
        (early.not_stored, early.lost),
        (0, 0),
        "acked {REPLICATION_MARGIN:?} or more before the kill: {early:?}"
    );
    assert_eq!(
        (after.not_stored, after.lost),
        (0, 0),
        "acked after the failover: {after:?}"
    );
    // Around the kill, asynchronous replication may lose a write the master acked; what was
    // pushed live still reached the receiver.
    assert_eq!(near.lost, 0, "acked around the kill: {near:?}");
    // Acks work on the new master: the inbox empties.
    again
        .ack(replay.iter().map(|(m, _)| m.id.clone()).collect())
        .await?;
    inbox_len_becomes(&store, receiver_id, 0).await?;
    Ok(())
}

/// The fates of the accepted messages answered (1) more than [`REPLICATION_MARGIN`] before
/// the kill, (2) from then until the failover was over, (3) after it.
fn classify(
    sent: &[Sent],
    answered_at: &AnsweredAt,
    killed_at: Instant,
    failover_at: Instant,
    live: &HashSet<&str>,
    stored: &HashSet<&str>,
) -> [Fate; 3] {
    let mut fates = [Fate::default(); 3];
    for s in sent.iter().filter(|s| s.accepted()) {
        let at = answered_at[&s.n];
        let class = if at + REPLICATION_MARGIN < killed_at {
            0
        } else if at <= failover_at {
            1
        } else {
            2
        };
        let fate = &mut fates[class];
        fate.accepted += 1;
        let in_inbox = stored.contains(s.id.as_str());
        fate.not_stored += usize::from(!in_inbox);
        fate.lost += usize::from(!in_inbox && !live.contains(s.id.as_str()));
    }
    fates
}

/// The longest time between two consecutive answers that accepted a message: the outage as
/// the sender saw it.
fn longest_gap(sent: &[Sent], answered_at: &AnsweredAt) -> Duration {
    let mut times: Vec<Instant> = sent
        .iter()
        .filter(|s| s.accepted())
        .map(|s| answered_at[&s.n])
        .collect();
    times.sort_unstable();
    times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

fn statuses(sent: &[Sent]) -> String {
    sent.iter()
        .map(|s| format!("{}:{:?}", s.n, s.result.status()))
        .collect::<Vec<_>>()
        .join(" ")
}
