//! The business API and channels end to end (real etcd and Redis, two servers, a route):
//! API keys, messages as the system or on behalf of a user, broadcast, presence, online
//! counts, force offline, connect tokens for backends, presence events (SSE, polling,
//! webhook), and channels used by clients and backends.

use axum::{body::Bytes, extract::State, http::HeaderMap, routing::post, Router};
use cim_sdk::{
    pb::{self, frame::Body, KickReason, MessageKind, SendStatus},
    LoginInfo, Transport,
};
use cim_tests::cluster::{Cluster, TestUser};
use serde_json::{json, Value};
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

const API_KEY: &str = "test-api-key-0123456789";
/// Deadline of anything the cluster does asynchronously (events, detach after a close).
const EVENTUALLY: Duration = Duration::from_secs(10);

async fn cluster() -> anyhow::Result<Cluster> {
    Cluster::builder()
        .route_config(|c| {
            c.api_keys = vec![API_KEY.into()];
            c.online_page_max = 3;
        })
        .start()
        .await
}

/// A JSON HTTP client of the route, with or without credentials.
#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    base: String,
    headers: Vec<(&'static str, String)>,
}

impl Api {
    fn new(cluster: &Cluster) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: cluster.route_url(),
            headers: Vec::new(),
        }
    }

    fn key(cluster: &Cluster, key: &str) -> Self {
        let mut api = Self::new(cluster);
        api.headers.push(("x-api-key", key.to_string()));
        api
    }

    fn admin(cluster: &Cluster) -> Self {
        Self::key(cluster, API_KEY)
    }

    fn bearer(cluster: &Cluster, login: &LoginInfo) -> Self {
        let mut api = Self::new(cluster);
        api.headers
            .push(("authorization", format!("Bearer {}", login.session_token)));
        api
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        for (name, value) in &self.headers {
            req = req.header(*name, value);
        }
        req.timeout(EVENTUALLY)
    }

    async fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let resp = self.request(reqwest::Method::GET, path).send().await?;
        Ok((resp.status().as_u16(), resp.json().await?))
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<(u16, Value)> {
        let resp = self
            .request(reqwest::Method::POST, path)
            .json(&body)
            .send()
            .await?;
        Ok((resp.status().as_u16(), resp.json().await?))
    }

    /// `post` that must answer 200; returns the body.
    async fn ok(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let (status, v) = self.post(path, body).await?;
        anyhow::ensure!(status == 200, "POST {path}: {status} {v}");
        Ok(v)
    }

    async fn ok_get(&self, path: &str) -> anyhow::Result<Value> {
        let (status, v) = self.get(path).await?;
        anyhow::ensure!(status == 200, "GET {path}: {status} {v}");
        Ok(v)
    }
}

fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// The next message `user` receives (acking stored ones, as a client does).
async fn next_message(user: &mut TestUser) -> anyhow::Result<pb::Message> {
    let (m, _) = user.next_delivery().await?;
    if m.kind != MessageKind::Group as i32 && m.kind != MessageKind::Channel as i32 {
        user.ack(vec![m.id.clone()]).await?;
    }
    Ok(m)
}

/// Connects `name` (registered and logged in) over TCP.
async fn online(cluster: &Cluster, name: &str) -> anyhow::Result<TestUser> {
    cluster.user(name, Transport::Tcp).await
}

fn channel_send(channel: &str, body: &str) -> pb::Send {
    pb::Send {
        kind: MessageKind::Channel as i32,
        channel: channel.into(),
        body: body.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_business_api_needs_a_valid_key() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let alice = cluster.register_and_login("alice").await?;
    let paths = [
        "/api/admin/presence?user_ids=1",
        "/api/admin/online",
        "/api/admin/online/count",
        "/api/admin/events/recent",
        "/api/admin/users/1/channels",
    ];
    for api in [
        Api::new(&cluster),
        Api::key(&cluster, "wrong-key-0123456789"),
        Api::key(&cluster, ""),
        // A user's session token is not an API key.
        Api::bearer(&cluster, &alice),
    ] {
        for path in paths {
            let (status, v) = api.get(path).await?;
            assert_eq!(status, 401, "{path}: {v}");
            assert_eq!(error_code(&v), "unauthorized", "{path}: {v}");
        }
        let (status, _) = api
            .post("/api/admin/broadcast", json!({"body": "hi"}))
            .await?;
        assert_eq!(status, 401);
        let (status, _) = api.post("/api/admin/users/1/kick", json!({})).await?;
        assert_eq!(status, 401);
    }
    // A route without keys refuses every business call, even with a key.
    let closed = Cluster::builder().servers(1).start().await?;
    let (status, v) = Api::key(&closed, API_KEY)
        .get("/api/admin/online/count")
        .await?;
    assert_eq!(status, 401);
    assert_eq!(error_code(&v), "api_disabled");
    Ok(())
}

#[tokio::test]
async fn system_and_on_behalf_messages_are_stored_and_delivered() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let admin = Api::admin(&cluster);
    let mut alice = online(&cluster, "alice").await?;
    let bob = cluster.register_and_login("bob").await?; // logged in, not connected

    let v = admin
        .ok(
            "/api/admin/messages",
            json!({"to": [alice.id(), bob.user_id], "body": "maintenance at 10"}),
        )
        .await?;
    let results = v["results"].as_array().unwrap();
    assert_eq!(results[0]["status"], "delivered", "{v}");
    assert_eq!(results[1]["status"], "stored", "{v}");
    let m = next_message(&mut alice).await?;
    assert_eq!(m.kind, MessageKind::System as i32);
    assert_eq!((m.sender_id, m.sender_name.as_str()), (0, "system"));
    assert_eq!(m.body, "maintenance at 10");

    // Bob gets it from his inbox when he connects.
    let mut bob = TestUser::connect(bob, Transport::Tcp).await?;
    let (m, replayed) = bob.next_delivery().await?;
    assert!(replayed);
    assert_eq!(m.kind, MessageKind::System as i32);
    assert_eq!(m.id, results[1]["id"].as_str().unwrap());
    bob.ack(vec![m.id]).await?;

    // On behalf of alice, with a receipt back to her once bob acks.
    let v = admin
        .ok(
            "/api/admin/messages",
            json!({"to": [bob.id()], "body": "from alice", "from": alice.id(), "receipt": true, "id": "order-1"}),
        )
        .await?;
    let id = v["results"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(id, format!("{}-order-1", alice.id()));
    let m = bob.next_message().await?;
    assert_eq!(
        (m.sender_id, m.kind),
        (alice.id(), MessageKind::Private as i32)
    );
    bob.ack(vec![m.id]).await?;
    let receipt = next_message(&mut alice).await?;
    assert_eq!(receipt.kind, MessageKind::Receipt as i32);
    assert_eq!(receipt.receipt_for, id);

    // Bad requests.
    for (body, code, status) in [
        (json!({"to": [], "body": "x"}), "bad_request", 400),
        (json!({"to": [bob.id()], "body": ""}), "failed", 200),
        (
            json!({"to": [bob.id()], "body": "x", "receipt": true}),
            "bad_request",
            400,
        ),
        (
            json!({"to": [bob.id()], "body": "x", "from": 999_999}),
            "unknown_user",
            404,
        ),
        (json!({"to": "bob"}), "bad_request", 400),
    ] {
        let (s, v) = admin.post("/api/admin/messages", body.clone()).await?;
        assert_eq!(s, status, "{body}: {v}");
        if status == 200 {
            assert_eq!(v["results"][0]["status"], code, "{v}");
            assert_eq!(v["results"][0]["error"]["code"], "bad_request", "{v}");
        } else {
            assert_eq!(error_code(&v), code, "{body}: {v}");
        }
    }
    let too_many: Vec<u64> = (1..=1001).collect();
    let (s, _) = admin
        .post("/api/admin/messages", json!({"to": too_many, "body": "x"}))
        .await?;
    assert_eq!(s, 400);
    let (s, v) = admin
        .post("/api/admin/messages", json!({"to": [999_999], "body": "x"}))
        .await?;
    assert_eq!(s, 200);
    assert_eq!(v["results"][0]["error"]["code"], "unknown_user", "{v}");
    Ok(())
}

#[tokio::test]
async fn broadcast_presence_and_online_count() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let admin = Api::admin(&cluster);
    let mut alice = online(&cluster, "alice").await?;
    let mut bob = online(&cluster, "bob").await?;
    assert_ne!(alice.server_id(), bob.server_id(), "round robin");
    let carol = cluster.register_and_login("carol").await?;

    let v = admin
        .ok("/api/admin/broadcast", json!({"body": "hello everyone"}))
        .await?;
    assert_eq!(v["delivered"], 2, "{v}");
    for user in [&mut alice, &mut bob] {
        let m = user.next_message().await?;
        assert_eq!((m.kind, m.sender_id), (MessageKind::System as i32, 0));
        assert_eq!(m.body, "hello everyone");
    }
    // On behalf of alice: everyone but alice.
    let v = admin
        .ok(
            "/api/admin/broadcast",
            json!({"body": "from alice", "from": alice.id()}),
        )
        .await?;
    assert_eq!(v["delivered"], 1, "{v}");
    let m = bob.next_message().await?;
    assert_eq!(
        (m.kind, m.sender_id),
        (MessageKind::Group as i32, alice.id())
    );

    // A backend retrying a broadcast (its first answer was lost) with its own id: answered
    // as the first, and nobody gets it twice.
    let retried = json!({"body": "only once", "id": "notice-7"});
    let first = admin.ok("/api/admin/broadcast", retried.clone()).await?;
    let again = admin.ok("/api/admin/broadcast", retried).await?;
    assert_eq!(
        (&first["delivered"], &first["id"]),
        (&json!(2), &json!("sys-notice-7")),
        "{first}"
    );
    assert_eq!(
        (&again["delivered"], &again["repeat"]),
        (&json!(0), &json!(true)),
        "{again}"
    );
    assert_eq!(first["repeat"], false, "{first}");
    assert_eq!(
        (&again["id"], &again["timestamp_ms"]),
        (&first["id"], &first["timestamp_ms"])
    );
    for user in [&mut alice, &mut bob] {
        assert_eq!(user.next_message().await?.body, "only once");
        let after = user.ping(1).await?;
        assert!(
            after.iter().all(|f| !matches!(f.body, Some(Body::Push(_)))),
            "a second copy: {after:?}"
        );
    }

    let v = admin
        .ok_get(&format!(
            "/api/admin/presence?user_ids={},{},{}",
            alice.id(),
            bob.id(),
            carol.user_id
        ))
        .await?;
    let users = v["users"].as_array().unwrap();
    assert_eq!(users[0]["online"], true);
    assert_eq!(users[0]["server_id"], alice.server_id());
    assert_eq!(users[1]["server_id"], bob.server_id());
    assert_eq!(users[2]["online"], false);
    assert_eq!(users[2]["server_id"], Value::Null);
    let (s, _) = admin.get("/api/admin/presence?user_ids=x").await?;
    assert_eq!(s, 400);

    let v = admin.ok_get("/api/admin/online/count").await?;
    assert_eq!(v["online"], 2, "{v}");
    let servers = v["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 2);
    assert!(servers.iter().all(|s| s["online"] == 1), "{v}");

    // The online list pages at most `online_page_max` (3 here) whatever is asked.
    let mut users = vec![alice, bob];
    for name in ["dave", "erin", "frank"] {
        users.push(online(&cluster, name).await?);
    }
    let v = admin.ok_get("/api/admin/online?limit=100").await?;
    assert_eq!(v["users"].as_array().unwrap().len(), 3, "{v}");
    let next = v["next"].as_str().unwrap().to_string();
    let v = admin
        .ok_get(&format!("/api/admin/online?limit=100&after={next}"))
        .await?;
    assert_eq!(v["users"].as_array().unwrap().len(), 2, "{v}");
    Ok(())
}

#[tokio::test]
async fn force_offline_kicks_with_the_admin_reason() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let admin = Api::admin(&cluster);
    let mut alice = online(&cluster, "alice").await?;

    let v = admin
        .ok(
            &format!("/api/admin/users/{}/kick", alice.id()),
            json!({"reason": "account suspended"}),
        )
        .await?;
    assert_eq!(v["kicked"], true);
    let frames = alice.closed().await?;
    let kick = frames
        .iter()
        .find_map(|f| match &f.body {
            Some(Body::Kick(k)) => Some(k.clone()),
            _ => None,
        })
        .expect("a Kick frame");
    assert_eq!(kick.reason, KickReason::Admin as i32);
    assert_eq!(kick.message, "account suspended");

    // Offline now; kicking again finds nobody; unknown users are 404.
    cim_tests::wait_until("alice offline", EVENTUALLY, || {
        let admin = admin.clone();
        let path = format!("/api/admin/presence?user_ids={}", alice.id());
        async move {
            admin
                .ok_get(&path)
                .await
                .is_ok_and(|v| v["users"][0]["online"] == false)
        }
    })
    .await?;
    // Forced offline is for good: the session token cannot bring the client back.
    let err = cluster
        .route()
        .resume(&alice.login.session_token)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("session_ended"), "{err}");
    let path = format!("/api/admin/users/{}/kick", alice.id());
    let resp = admin.request(reqwest::Method::POST, &path).send().await?;
    assert_eq!(resp.status(), 200, "no body is fine");
    assert_eq!(resp.json::<Value>().await?["kicked"], false);
    let (s, v) = admin
        .post("/api/admin/users/999999/kick", json!({}))
        .await?;
    assert_eq!((s, error_code(&v)), (404, "unknown_user"));
    let (s, _) = admin
        .post(&path, json!({"reason": "x".repeat(300)}))
        .await?;
    assert_eq!(s, 400);
    Ok(())
}

#[tokio::test]
async fn a_backend_gets_connect_tokens_for_its_users() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let admin = Api::admin(&cluster);
    let route = cluster.route();
    let alice = route.register("alice", "password-alice").await?;

    let v = admin
        .ok(
            &format!("/api/admin/users/{}/connect", alice.user_id),
            json!({}),
        )
        .await?;
    let login: LoginInfo = serde_json::from_value(v)?;
    assert_eq!(login.user_id, alice.user_id);
    let mut user = TestUser::connect(login, Transport::WsJson).await?;
    user.ping(1).await?;

    // Single login holds for backends too.
    let (s, v) = admin
        .post(
            &format!("/api/admin/users/{}/connect", alice.user_id),
            json!({}),
        )
        .await?;
    assert_eq!((s, error_code(&v)), (409, "already_logged_in"));
    let (s, v) = admin
        .post("/api/admin/users/424242/connect", json!({}))
        .await?;
    assert_eq!((s, error_code(&v)), (404, "unknown_user"));
    Ok(())
}

/// Reads server-sent events from a streaming response.
struct SseReader {
    resp: reqwest::Response,
    buf: String,
}

#[derive(Debug)]
struct SseEvent {
    id: String,
    event: String,
    data: Value,
}

impl SseReader {
    async fn open(api: &Api, path: &str, last_id: Option<&str>) -> anyhow::Result<Self> {
        let mut req = api
            .request(reqwest::Method::GET, path)
            .timeout(Duration::from_secs(120));
        if let Some(id) = last_id {
            req = req.header("last-event-id", id);
        }
        let resp = req.send().await?;
        anyhow::ensure!(resp.status() == 200, "SSE: {}", resp.status());
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        anyhow::ensure!(ct.starts_with("text/event-stream"), "content type {ct}");
        Ok(Self {
            resp,
            buf: String::new(),
        })
    }

    /// The next event (skipping keep-alive comments), within the deadline.
    async fn next(&mut self) -> anyhow::Result<SseEvent> {
        tokio::time::timeout(EVENTUALLY, async {
            loop {
                if let Some(end) = self.buf.find("\n\n") {
                    let block: String = self.buf.drain(..end + 2).collect();
                    let (mut id, mut event, mut data) =
                        (String::new(), String::new(), String::new());
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("id:") {
                            id = v.trim().to_string();
                        } else if let Some(v) = line.strip_prefix("event:") {
                            event = v.trim().to_string();
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data.push_str(v.trim());
                        }
                    }
                    if data.is_empty() {
                        continue; // a comment
                    }
                    return Ok(SseEvent {
                        id,
                        event,
                        data: serde_json::from_str(&data)?,
                    });
                }
                let chunk = self
                    .resp
                    .chunk()
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("event stream ended"))?;
                self.buf.push_str(&String::from_utf8_lossy(&chunk));
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("no event within {EVENTUALLY:?}"))?
    }

    /// The next event about `user_id`.
    async fn next_of(&mut self, user_id: u64) -> anyhow::Result<SseEvent> {
        loop {
            let e = self.next().await?;
            if e.data["user_id"] == user_id {
                return Ok(e);
            }
        }
    }
}

#[tokio::test]
async fn presence_events_stream_logins_logouts_and_timeouts() -> anyhow::Result<()> {
    let cluster = Cluster::builder()
        .route_config(|c| c.api_keys = vec![API_KEY.into()])
        // Short heartbeats, so a silent client times out quickly.
        .server_config(|c| {
            c.heartbeat_interval_ms = 200;
            c.heartbeat_timeout_intervals = 2;
        })
        .start()
        .await?;
    let admin = Api::admin(&cluster);
    let mut events = SseReader::open(&admin, "/api/admin/events", None).await?;

    // Login on one server, then a clean close.
    let alice = online(&cluster, "alice").await?;
    let e = events.next_of(alice.id()).await?;
    assert_eq!(e.event, "online");
    assert_eq!(e.data["type"], "online");
    assert_eq!(e.data["name"], "alice");
    assert_eq!(e.data["server_id"], alice.server_id());
    assert!(e.data.get("reason").is_none());
    let online_id = e.id.clone();
    let alice_server = alice.server_id().to_string();
    let alice_id = alice.id();
    drop(alice);
    let e = events.next_of(alice_id).await?;
    assert_eq!(e.event, "offline");
    assert_eq!(e.data["reason"], "closed");
    assert_eq!(e.data["server_id"], alice_server);

    // Another user on the other server who goes silent: heartbeat timeout.
    let bob = online(&cluster, "bob").await?;
    assert_ne!(bob.server_id(), alice_server);
    let e = events.next_of(bob.id()).await?;
    assert_eq!(
        (e.event.as_str(), &e.data["server_id"]),
        ("online", &json!(bob.server_id()))
    );
    let e = events.next_of(bob.id()).await?;
    assert_eq!(e.data["reason"], "heartbeat_timeout", "{:?}", e);

    // Resuming after the first event replays the rest, in order, on a new stream.
    let mut resumed = SseReader::open(&admin, "/api/admin/events", Some(&online_id)).await?;
    let kinds: Vec<(u64, String)> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            let e = resumed.next().await?;
            v.push((e.data["user_id"].as_u64().unwrap(), e.event));
        }
        v
    };
    assert_eq!(
        kinds,
        vec![
            (alice_id, "offline".to_string()),
            (bob.id(), "online".to_string()),
            (bob.id(), "offline".to_string())
        ]
    );

    // The same by polling, with paging.
    let v = admin.ok_get("/api/admin/events/recent?limit=2").await?;
    let page = v["events"].as_array().unwrap();
    assert_eq!(page.len(), 2, "{v}");
    assert_eq!(page[0]["type"], "online");
    assert_eq!(page[0]["id"], online_id);
    let next = v["next"].as_str().unwrap();
    let v = admin
        .ok_get(&format!("/api/admin/events/recent?after={next}&limit=1000"))
        .await?;
    assert_eq!(v["events"].as_array().unwrap().len(), 2, "{v}");
    let (s, _) = admin.get("/api/admin/events/recent?after=nonsense").await?;
    assert_eq!(s, 400);
    let (s, _) = SseReader::open(&admin, "/api/admin/events?after=1-x", None)
        .await
        .map(|_| (200, ()))
        .unwrap_or((400, ()));
    assert_eq!(s, 400);
    Ok(())
}

/// What a webhook receiver got: raw bodies and their signature headers.
type Hooked = Arc<Mutex<Vec<(Bytes, String)>>>;

async fn hook(State(got): State<Hooked>, headers: HeaderMap, body: Bytes) -> &'static str {
    let sig = headers
        .get("x-cim-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    got.lock().unwrap().push((body, sig));
    "ok"
}

#[tokio::test]
async fn presence_events_reach_the_webhook_signed_and_in_order() -> anyhow::Result<()> {
    let got: Hooked = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(got.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let hook_url = url.clone();
    let cluster = Cluster::builder()
        // No API key: the webhook works without the business API.
        .route_config(move |c| {
            c.webhook_url = Some(hook_url.clone());
            c.webhook_secret = Some("hook-secret".into());
        })
        .start()
        .await?;
    // The webhook starts at the end of the stream when its route starts: wait until it has
    // a cursor, so the login below is after it.
    let store = cluster.store().await?;
    cim_tests::wait_until("webhook cursor", EVENTUALLY, || {
        let store = store.clone();
        async move { store.cursor("webhook").await.is_ok_and(|c| c.is_some()) }
    })
    .await?;

    let alice = online(&cluster, "alice").await?;
    let alice_id = alice.id();
    drop(alice);
    let events = || -> Vec<Value> {
        got.lock()
            .unwrap()
            .iter()
            .flat_map(|(body, _)| {
                let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                v["events"].as_array().cloned().unwrap_or_default()
            })
            .filter(|e| e["user_id"] == alice_id)
            .collect()
    };
    cim_tests::wait_until("two webhook events", EVENTUALLY, || {
        let n = events().len();
        async move { n >= 2 }
    })
    .await?;
    let events = events();
    assert_eq!(events[0]["type"], "online");
    assert_eq!(events[1]["type"], "offline");
    assert_eq!(events[1]["reason"], "closed");
    for (body, sig) in got.lock().unwrap().iter() {
        assert_eq!(
            sig,
            &format!(
                "sha256={}",
                cim_route::events::signature("hook-secret", body)
            )
        );
    }
    Ok(())
}

#[tokio::test]
async fn channel_messages_reach_exactly_the_online_members() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let admin = Api::admin(&cluster);
    let mut alice = online(&cluster, "alice").await?;
    let mut bob = online(&cluster, "bob").await?;
    assert_ne!(
        alice.server_id(),
        bob.server_id(),
        "members on both servers"
    );
    let mut dave = online(&cluster, "dave").await?; // online, not a member
    let carol = cluster.route().register("carol", "password-carol").await?; // member, offline

    for user in [&alice.login, &bob.login] {
        let v = Api::bearer(&cluster, user)
            .ok("/api/channels/room-1/join", json!({}))
            .await?;
        assert_eq!(v, json!({"channel": "room-1", "joined": true}));
    }
    let v = admin
        .ok(
            "/api/admin/channels/room-1/join",
            json!({"user_id": carol.user_id}),
        )
        .await?;
    assert_eq!(v["joined"], true);
    // Joining twice changes nothing.
    let v = Api::bearer(&cluster, &alice.login)
        .ok("/api/channels/room-1/join", json!({}))
        .await?;
    assert_eq!(v["joined"], false);

    let v = admin.ok_get("/api/channels/room-1").await?;
    assert_eq!(v, json!({"name": "room-1", "members": 3, "online": 2}));

    // Over the connection: bob gets it once; alice (sender), dave and carol do not.
    let r = alice.send(channel_send("room-1", "hi room")).await?;
    assert_eq!(r.status, SendStatus::Delivered as i32, "{r:?}");
    assert_eq!(r.delivered, 1);
    let m = bob.next_message().await?;
    assert_eq!(m.kind, MessageKind::Channel as i32);
    assert_eq!((m.channel.as_str(), m.body.as_str()), ("room-1", "hi room"));
    assert_eq!((m.sender_id, m.sender_name.as_str()), (alice.id(), "alice"));
    // Over HTTP as bob, then from the system: markers that prove nothing else came first.
    let v = Api::bearer(&cluster, &bob.login)
        .ok(
            "/api/channels/room-1/messages",
            json!({"body": "hello alice"}),
        )
        .await?;
    assert_eq!(v["delivered"], 1);
    let m = alice.next_message().await?;
    assert_eq!((m.sender_id, m.body.as_str()), (bob.id(), "hello alice"));
    let v = admin
        .ok(
            "/api/admin/channels/room-1/messages",
            json!({"body": "room closes soon"}),
        )
        .await?;
    assert_eq!(v["delivered"], 2);
    for user in [&mut alice, &mut bob] {
        let m = user.next_message().await?;
        assert_eq!((m.sender_id, m.body.as_str()), (0, "room closes soon"));
        assert_eq!(m.channel, "room-1");
    }
    // Dave got none of them: the next thing he receives is a private marker.
    let r = alice.send_private(dave.id(), "marker").await?;
    assert_eq!(r.status, SendStatus::Delivered as i32);
    let m = next_message(&mut dave).await?;
    assert_eq!(m.body, "marker", "dave is not a member");

    // Non-members cannot send; bad names are refused.
    let r = dave.send(channel_send("room-1", "let me in")).await?;
    assert_eq!(r.status, SendStatus::Failed as i32);
    assert_eq!(r.error.unwrap().code, pb::ErrorCode::Forbidden as i32);
    let (s, v) = Api::bearer(&cluster, &dave.login)
        .post("/api/channels/room-1/messages", json!({"body": "x"}))
        .await?;
    assert_eq!((s, error_code(&v)), (403, "not_a_member"));
    let r = alice.send(channel_send("bad name", "x")).await?;
    assert_eq!(r.error.unwrap().code, pb::ErrorCode::BadRequest as i32);
    let (s, v) = Api::bearer(&cluster, &alice.login)
        .post("/api/channels/a%20b/join", json!({}))
        .await?;
    assert_eq!((s, error_code(&v)), (400, "invalid_channel"));

    // Leaving stops delivery.
    let v = Api::bearer(&cluster, &bob.login)
        .ok("/api/channels/room-1/leave", json!({}))
        .await?;
    assert_eq!(v["left"], true);
    let r = alice.send(channel_send("room-1", "anyone?")).await?;
    assert_eq!(r.delivered, 0);
    let v = Api::bearer(&cluster, &alice.login)
        .ok_get("/api/channels/mine")
        .await?;
    assert_eq!(
        v["channels"],
        json!([{"name": "room-1", "members": 2, "online": 1}])
    );
    let v = admin
        .ok_get(&format!("/api/admin/users/{}/channels", bob.id()))
        .await?;
    assert_eq!(v["channels"], json!([]));
    Ok(())
}

#[tokio::test]
async fn channel_lists_and_members_page_within_limits() -> anyhow::Result<()> {
    let cluster = Cluster::builder()
        .servers(1)
        .route_config(|c| {
            c.api_keys = vec![API_KEY.into()];
            c.online_page_max = 3;
            c.max_channels_per_user = 2;
        })
        .start()
        .await?;
    let admin = Api::admin(&cluster);
    let route = cluster.route();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            route
                .register(&format!("user{i}"), "password-x")
                .await?
                .user_id,
        );
    }
    for &id in &ids {
        admin
            .ok("/api/admin/channels/big/join", json!({"user_id": id}))
            .await?;
    }
    admin
        .ok("/api/admin/channels/a1/join", json!({"user_id": ids[0]}))
        .await?;
    // At most 2 channels per user here: user1 is in big, joins a3, and a4 is one too many.
    let (s, v) = admin
        .post("/api/admin/channels/a3/join", json!({"user_id": ids[1]}))
        .await?;
    assert_eq!(s, 200, "{v}");
    let (s, v) = admin
        .post("/api/admin/channels/a4/join", json!({"user_id": ids[1]}))
        .await?;
    assert_eq!((s, error_code(&v)), (409, "too_many_channels"));

    // Members: pages of at most 3, in id order, whatever the limit asked.
    let v = admin.ok_get("/api/channels/big/members?limit=1000").await?;
    let page: Vec<u64> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user_id"].as_u64().unwrap())
        .collect();
    assert_eq!(page, ids[..3]);
    assert!(v["members"][0]["online"] == false);
    let next = v["next"].as_str().unwrap();
    let v = admin
        .ok_get(&format!("/api/channels/big/members?limit=2&after={next}"))
        .await?;
    assert_eq!(v["members"].as_array().unwrap().len(), 2);
    assert_eq!(v["members"][1]["user_id"], ids[4]);
    let (s, _) = admin.get("/api/channels/big/members?after=x").await?;
    assert_eq!(s, 400);
    let (s, _) = admin.get("/api/channels/big/members?limit=0").await?;
    assert_eq!(s, 400);

    // Channels: name order, paged.
    let v = admin.ok_get("/api/channels?limit=2").await?;
    let names: Vec<&str> = v["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a1", "a3"]);
    let v = admin
        .ok_get(&format!(
            "/api/channels?after={}",
            v["next"].as_str().unwrap()
        ))
        .await?;
    assert_eq!(
        v["channels"],
        json!([{"name": "big", "members": 5, "online": 0}])
    );
    assert_eq!(v["next"], Value::Null);
    let (s, v) = admin.get("/api/channels/nobody-here").await?;
    assert_eq!((s, error_code(&v)), (404, "unknown_channel"));
    // Leaving the last member removes the channel.
    admin
        .ok("/api/admin/channels/a3/leave", json!({"user_id": ids[1]}))
        .await?;
    let (s, _) = admin.get("/api/channels/a3").await?;
    assert_eq!(s, 404);
    // Clients see the lists too, with their bearer token; anonymous callers do not.
    let login = route.login("user4", "password-x").await?;
    let v = Api::bearer(&cluster, &login)
        .ok_get("/api/channels")
        .await?;
    assert_eq!(v["channels"].as_array().unwrap().len(), 2);
    let (s, _) = Api::new(&cluster).get("/api/channels").await?;
    assert_eq!(s, 401);
    Ok(())
}

#[tokio::test]
async fn a_crashed_servers_users_go_offline_with_reason_server_lost() -> anyhow::Result<()> {
    let mut cluster = Cluster::builder()
        .route_config(|c| c.api_keys = vec![API_KEY.into()])
        .server_config(|c| c.registry_ttl_secs = 2)
        .start()
        .await?;
    let admin = Api::admin(&cluster);
    let alice = online(&cluster, "alice").await?;
    let bob = online(&cluster, "bob").await?;
    for user in [&alice.login, &bob.login] {
        Api::bearer(&cluster, user)
            .ok("/api/channels/lobby/join", json!({}))
            .await?;
    }
    let mut events = SseReader::open(&admin, "/api/admin/events", None).await?;
    let victim = alice.server_id().to_string();
    cluster.take_server(&victim).unwrap().kill();

    // Once the registry drops the server (its lease expires), the route sweeps its routes.
    let e = events.next_of(alice.id()).await?;
    assert_eq!(e.event, "offline");
    assert_eq!(e.data["reason"], "server_lost");
    assert_eq!(e.data["server_id"], victim);
    let v = admin
        .ok_get(&format!("/api/admin/presence?user_ids={}", alice.id()))
        .await?;
    assert_eq!(v["users"][0]["online"], false);
    let v = admin.ok_get("/api/channels/lobby").await?;
    assert_eq!(v["online"], 1, "{v}");
    // Bob, on the surviving server, is untouched.
    let v = admin
        .ok_get(&format!("/api/admin/presence?user_ids={}", bob.id()))
        .await?;
    assert_eq!(v["users"][0]["online"], true);
    Ok(())
}
