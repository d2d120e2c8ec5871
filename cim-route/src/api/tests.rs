//! The public API through `app(state).oneshot(..)`, on the in-memory store (wrapped in
//! [`FaultyStore`] where a test breaks it).

use super::app;
use crate::testing::{fake_server, server, state_with, FaultyStore, StoreExt};
use axum::{
    body::Body,
    http::{header, Request, StatusCode},
    Router,
};
use cim_common::{
    config::DEV_SECRET,
    pb::KickReason,
    store::{prelude::*, AttachOutcome, MemoryStore},
    time::now_ms,
    token::{SessionClaims, TokenSigner},
};
use serde_json::{json, Value};
use std::sync::{atomic::Ordering, Arc};
use tower::ServiceExt;

async fn call(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&bytes)));
    (status, value)
}

fn post(path: &str, body: Value, token: Option<&str>) -> Request<Body> {
    let mut req = Request::post(path).header(header::CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    req.body(Body::from(body.to_string())).unwrap()
}

fn get(path: &str, token: Option<&str>) -> Request<Body> {
    let mut req = Request::get(path);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    req.body(Body::empty()).unwrap()
}

fn code(v: &Value) -> &str {
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {v}"))
}

/// Registers `name` and logs in; returns the login response.
async fn register_and_login(app: &Router, name: &str) -> Value {
    let creds = json!({"name": name, "password": "secret-pw"});
    let (s, _) = call(app, post("/api/register", creds.clone(), None)).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, v) = call(app, post("/api/login", creds, None)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

/// Registers and logs in `name`, then attaches the session to `server_id` as that server
/// does when the client connects with the token. Returns the login answer and the token's
/// claims.
async fn login_and_attach(
    app: &Router,
    store: &MemoryStore,
    signer: &TokenSigner,
    name: &str,
    server_id: &str,
) -> (Value, cim_common::token::ConnectClaims) {
    let v = register_and_login(app, name).await;
    let claims = signer
        .verify_connect(v["connect_token"].as_str().unwrap(), now_ms())
        .unwrap();
    store
        .attach(claims.user_id, name, &claims.session, server_id)
        .await
        .unwrap();
    (v, claims)
}

#[tokio::test]
async fn malformed_requests_get_the_error_shape() {
    let (state, _tx) = state_with(Arc::new(MemoryStore::new()), vec![], |_| {});
    let app = app(state);

    let bad_json = Request::post("/api/register")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{\"name\": "))
        .unwrap();
    let (s, v) = call(&app, bad_json).await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_json"));

    let wrong_type = Request::post("/api/register")
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from("{}"))
        .unwrap();
    let (s, v) = call(&app, wrong_type).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
    );

    let (s, v) = call(&app, post("/api/register", json!({"name": 5}), None)).await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "bad_request"));

    let (s, v) = call(&app, get("/nope", None)).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "not_found"));

    let (s, v) = call(&app, get("/api/register", None)).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
}

#[tokio::test]
async fn oversize_bodies_get_413_json() {
    let (state, _tx) = state_with(Arc::new(MemoryStore::new()), vec![], |_| {});
    let max = state.config().max_request_body;
    let app = app(state);
    let big = json!({"name": "x".repeat(max), "password": "secret-pw"}).to_string();

    // Declared length: refused before reading.
    let declared = Request::post("/api/register")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, big.len())
        .body(Body::from(big.clone()))
        .unwrap();
    let (s, v) = call(&app, declared).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );

    // Streamed without a length: cut while reading.
    let chunks = futures_util::stream::iter(
        big.into_bytes()
            .chunks(4096)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let streamed = Request::post("/api/register")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(chunks))
        .unwrap();
    let (s, v) = call(&app, streamed).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );
}

#[tokio::test]
async fn bearer_is_required_and_checked() {
    let store = Arc::new(MemoryStore::new());
    let (state, _tx) = state_with(store.clone(), vec![], |_| {});
    let app = app(state);
    let body = json!({"body": "hi"});

    let resp = app
        .clone()
        .oneshot(post("/api/messages/group", body.clone(), None))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.headers()[header::WWW_AUTHENTICATE], "Bearer");

    let (s, v) = call(&app, post("/api/messages/group", body.clone(), None)).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthorized"));
    let (s, v) = call(
        &app,
        post("/api/messages/group", body.clone(), Some("garbage")),
    )
    .await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthorized"));

    let signer = TokenSigner::new(DEV_SECRET);
    let claims = |exp_ms| SessionClaims {
        user_id: 1,
        user_name: "alice".into(),
        session: "s-1".into(),
        exp_ms,
        generation: 0,
    };
    let forged =
        TokenSigner::new("some-other-secret-value").sign_session(&claims(now_ms() + 60_000));
    let (s, v) = call(
        &app,
        post("/api/messages/group", body.clone(), Some(&forged)),
    )
    .await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthorized"));

    let expired = signer.sign_session(&claims(now_ms() - 1));
    let (s, v) = call(
        &app,
        post("/api/messages/group", body.clone(), Some(&expired)),
    )
    .await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "token_expired"));

    // Well signed, but the session does not hold the login slot.
    let ended = signer.sign_session(&claims(now_ms() + 60_000));
    let (s, v) = call(&app, post("/api/messages/group", body, Some(&ended))).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "session_ended"));
}

#[tokio::test]
async fn register_validates_and_refuses_duplicates() {
    let store = Arc::new(MemoryStore::new());
    let (state, _tx) = state_with(store.clone(), vec![], |_| {});
    let app = app(state);

    let (s, v) = call(
        &app,
        post(
            "/api/register",
            json!({"name": "alice", "password": "secret-pw"}),
            None,
        ),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["name"], "alice");
    let id = v["user_id"].as_u64().unwrap();
    let stored = store.user_by_name("alice").await.unwrap().unwrap();
    assert_eq!(stored.id, id);
    assert!(stored.password_hash.starts_with("$argon2id$"));
    assert!(!stored.password_hash.contains("secret-pw"));

    let (s, v) = call(
        &app,
        post(
            "/api/register",
            json!({"name": "alice", "password": "other-pw"}),
            None,
        ),
    )
    .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "name_taken"));

    for name in ["", "a b", "a;b", "a@b", "#a", "a|b", "a\u{1}"] {
        let (s, v) = call(
            &app,
            post(
                "/api/register",
                json!({"name": name, "password": "secret-pw"}),
                None,
            ),
        )
        .await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::BAD_REQUEST, "invalid_name"),
            "{name:?}"
        );
    }
    let (s, v) = call(
        &app,
        post(
            "/api/register",
            json!({"name": "bob", "password": "short"}),
            None,
        ),
    )
    .await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_password"));
}

#[tokio::test]
async fn login_checks_credentials_and_assigns_round_robin() {
    let store = Arc::new(MemoryStore::new());
    let (state, tx) = state_with(store.clone(), vec![], |_| {});
    let signer = state.signer().clone();
    let app = app(state);
    for name in ["alice", "bob", "carol"] {
        let creds = json!({"name": name, "password": "secret-pw"});
        assert_eq!(
            call(&app, post("/api/register", creds, None)).await.0,
            StatusCode::CREATED
        );
    }

    let wrong = json!({"name": "alice", "password": "wrong-pw"});
    let (s, v) = call(&app, post("/api/login", wrong, None)).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "bad_credentials"));
    let (s, v2) = call(
        &app,
        post(
            "/api/login",
            json!({"name": "nobody", "password": "secret-pw"}),
            None,
        ),
    )
    .await;
    assert_eq!(
        (s, &v2),
        (StatusCode::UNAUTHORIZED, &v),
        "unknown user looks like a wrong password"
    );

    let alice = json!({"name": "alice", "password": "secret-pw"});
    let (s, v) = call(&app, post("/api/login", alice.clone(), None)).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::SERVICE_UNAVAILABLE, "no_server")
    );

    tx.send(crate::testing::members(vec![
        server("server-a"),
        server("server-b"),
    ]))
    .unwrap();
    let mut assigned = Vec::new();
    let mut assigned_tokens = Vec::new();
    for name in ["alice", "bob", "carol"] {
        let (s, v) = call(
            &app,
            post(
                "/api/login",
                json!({"name": name, "password": "secret-pw"}),
                None,
            ),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["name"], name);
        assert!(v.get("heartbeat_hint_ms").is_none());
        let server_id = v["server"]["id"].as_str().unwrap().to_string();
        assert_eq!(v["server"]["tcp_addr"], format!("{server_id}.tcp:7000"));
        assert!(
            v["server"].get("internal_addr").is_none(),
            "internal address stays internal"
        );
        let connect = signer
            .verify_connect(v["connect_token"].as_str().unwrap(), now_ms())
            .unwrap();
        assert_eq!(connect.user_id, v["user_id"].as_u64().unwrap());
        assert_eq!(connect.server_id, server_id);
        let session = signer
            .verify_session(v["session_token"].as_str().unwrap(), now_ms())
            .unwrap();
        assert_eq!(session.session, connect.session);
        assert!(store
            .session_active(connect.user_id, &connect.session)
            .await
            .unwrap());
        assigned.push(server_id);
        assigned_tokens.push(v["connect_token"].as_str().unwrap().to_string());
    }
    assert_ne!(assigned[0], assigned[1], "round robin");
    assert_eq!(assigned[0], assigned[2]);

    // alice's login was never connected: a plain HTTP client that just logs in again gets in
    // at once (not after the connect token's TTL), and the first login's token is dead.
    let first = signer
        .verify_connect(assigned_tokens[0].as_str(), now_ms())
        .unwrap();
    let (s, v) = call(&app, post("/api/login", alice.clone(), None)).await;
    assert_eq!(s, StatusCode::OK, "a pending login is replaced: {v}");
    let second = signer
        .verify_connect(v["connect_token"].as_str().unwrap(), now_ms())
        .unwrap();
    assert!(!store
        .session_active(first.user_id, &first.session)
        .await
        .unwrap());
    assert_eq!(
        store
            .attach(first.user_id, "alice", &first.session, &first.server_id)
            .await
            .unwrap(),
        AttachOutcome::SessionInvalid
    );
    // The new login's token attaches (that a connected slot then holds, the server being
    // asked, is `a_slot_held_on_a_server_that_no_longer_has_the_user_is_taken_over`).
    assert_eq!(
        store
            .attach(second.user_id, "alice", &second.session, &second.server_id)
            .await
            .unwrap(),
        AttachOutcome::Attached
    );
}

/// A route on the memory store with one fake server, `server-a`, where alice (password
/// `secret-pw`) is logged in and attached.
struct AliceOn {
    app: Router,
    store: Arc<MemoryStore>,
    signer: TokenSigner,
    server: cim_common::registry::ServiceInfo,
    rec: Arc<crate::testing::Recorded>,
    /// Alice's login answer and its connect token's claims.
    login: Value,
    claims: cim_common::token::ConnectClaims,
    /// The registry watch, kept open.
    _servers: tokio::sync::watch::Sender<cim_common::registry::Members>,
}

async fn alice_on_server_a(tweak: impl FnOnce(&mut crate::config::RouteConfig)) -> AliceOn {
    let store = Arc::new(MemoryStore::new());
    let (server, rec) = fake_server("server-a", DEV_SECRET).await;
    let (state, servers) = state_with(store.clone(), vec![server.clone()], tweak);
    let signer = state.signer().clone();
    let app = app(state);
    let (login, claims) = login_and_attach(&app, &store, &signer, "alice", &server.id).await;
    AliceOn {
        app,
        store,
        signer,
        server,
        rec,
        login,
        claims,
        _servers: servers,
    }
}

/// A login request from `addr` (as the route's listener would give it).
fn login_from(addr: &str, name: &str, password: &str) -> Request<Body> {
    let mut req = post(
        "/api/login",
        json!({"name": name, "password": password}),
        None,
    );
    let addr: std::net::SocketAddr = format!("{addr}:40000").parse().unwrap();
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(addr));
    req
}

#[tokio::test]
async fn an_address_flooding_logins_is_refused_before_hashing_others_are_not() {
    let (a, _) = fake_server("server-a", DEV_SECRET).await;
    let (state, _tx) = state_with(Arc::new(MemoryStore::new()), vec![a], |c| {
        c.login_rate_per_addr = 1;
        c.login_burst_per_addr = 3;
        c.login_failures_per_name = 0;
    });
    let app = app(state);
    let creds = json!({"name": "alice", "password": "secret-pw"});
    let (s, _) = call(&app, post("/api/register", creds, None)).await;
    assert_eq!(s, StatusCode::CREATED);
    for _ in 0..3 {
        let (s, v) = call(&app, login_from("10.0.0.1", "alice", "wrong-pw")).await;
        assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "bad_credentials"));
    }
    let resp = app
        .clone()
        .oneshot(login_from("10.0.0.1", "alice", "secret-pw"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=1).contains(&retry), "Retry-After {retry}");
    // Another address logs in at once.
    let (s, v) = call(&app, login_from("10.0.0.2", "alice", "secret-pw")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn a_name_with_too_many_failures_is_refused_whatever_the_password() {
    let (a, _) = fake_server("server-a", DEV_SECRET).await;
    let (state, _tx) = state_with(Arc::new(MemoryStore::new()), vec![a], |c| {
        c.login_rate_per_addr = 0;
        c.login_failures_per_name = 2;
    });
    let app = app(state);
    for name in ["alice", "bob"] {
        let creds = json!({"name": name, "password": "secret-pw"});
        let (s, _) = call(&app, post("/api/register", creds, None)).await;
        assert_eq!(s, StatusCode::CREATED);
    }
    // Failures from many addresses: two fit, the third finds the bucket empty.
    for addr in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
        let (s, v) = call(&app, login_from(addr, "alice", "wrong-pw")).await;
        assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "bad_credentials"));
    }
    let (s, v) = call(&app, login_from("10.0.0.4", "alice", "secret-pw")).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        "{v}"
    );
    // Other names are not affected; successes cost nothing.
    for _ in 0..3 {
        let (s, v) = call(&app, login_from("10.0.0.4", "bob", "secret-pw")).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let token = v["session_token"].as_str().unwrap();
        let (s, _) = call(&app, post("/api/logout", json!({}), Some(token))).await;
        assert_eq!(s, StatusCode::OK);
    }
}

/// The internal-call deadline of the takeover tests: a stalled fake server costs this much.
const SHORT_CALLS: u64 = 300;

#[tokio::test]
async fn a_login_whose_holder_does_not_answer_is_refused_not_doubled() {
    // The server holding alice's connection is wedged: it takes the presence probe and the
    // kick but never answers. It may still have her connection, so a second login must not
    // take the slot (before: the failed probe counted as "not connected", the login took the
    // slot and alice had two live connections).
    let AliceOn {
        app,
        store,
        signer: _,
        server: _,
        rec,
        login: _,
        claims: first,
        _servers,
    } = alice_on_server_a(|c| {
        c.push_timeout_ms = SHORT_CALLS;
    })
    .await;
    rec.stalled.store(true, Ordering::SeqCst);
    let alice = json!({"name": "alice", "password": "secret-pw"});
    let (s, v) = call(&app, post("/api/login", alice, None)).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        "{v}"
    );
    assert!(
        v["error"]["message"].as_str().unwrap().contains("server-a"),
        "{v}"
    );
    assert!(store
        .session_active(first.user_id, &first.session)
        .await
        .unwrap());
}

#[tokio::test]
async fn replace_mode_kicks_the_old_connection_before_taking_its_slot() {
    let AliceOn {
        app,
        store,
        signer,
        server: a,
        rec,
        login: _,
        claims: first,
        _servers,
    } = alice_on_server_a(|c| {
        c.login_conflict = crate::config::LoginConflict::Replace;
        c.push_timeout_ms = SHORT_CALLS;
    })
    .await;
    let alice = json!({"name": "alice", "password": "secret-pw"});

    // A wedged holder: the kick cannot be confirmed, so nothing is taken.
    rec.stalled.store(true, Ordering::SeqCst);
    let (s, v) = call(&app, post("/api/login", alice.clone(), None)).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        "{v}"
    );
    assert!(store
        .session_active(first.user_id, &first.session)
        .await
        .unwrap());

    // It answers: the new login wins, the old connection got a REPLACED kick of its own
    // session only (the server answers with the presence of alice: replace does not ask).
    rec.stalled.store(false, Ordering::SeqCst);
    let kicks_before = rec.kicks.lock().unwrap().len();
    let (s, v) = call(&app, post("/api/login", alice, None)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let second = signer
        .verify_connect(v["connect_token"].as_str().unwrap(), now_ms())
        .unwrap();
    {
        let kicks = rec.kicks.lock().unwrap();
        let kick = kicks.last().expect("the old connection was kicked");
        assert_eq!(kicks.len(), kicks_before + 1);
        assert_eq!(kick.user_ids, vec![first.user_id]);
        assert_eq!(kick.session, first.session);
        assert_eq!(
            kick.kick.as_ref().map(|k| k.reason),
            Some(KickReason::Replaced as i32)
        );
    }
    assert!(!store
        .session_active(first.user_id, &first.session)
        .await
        .unwrap());
    assert_eq!(
        store
            .attach(second.user_id, "alice", &second.session, &a.id)
            .await
            .unwrap(),
        AttachOutcome::Attached
    );
}

#[tokio::test]
async fn refuse_mode_keeps_the_connected_login_and_kicks_nobody() {
    let AliceOn {
        app,
        store,
        signer: _,
        server: _,
        rec,
        login: _,
        claims: first,
        _servers,
    } = alice_on_server_a(|_| {}).await;
    let alice = json!({"name": "alice", "password": "secret-pw"});
    let (s, v) = call(&app, post("/api/login", alice, None)).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "already_logged_in"));
    assert!(rec.kicks.lock().unwrap().is_empty(), "nobody kicked");
    assert!(store
        .session_active(first.user_id, &first.session)
        .await
        .unwrap());
}

#[tokio::test]
async fn a_login_whose_holder_refuses_connections_takes_the_slot() {
    // The holder's process is gone (its port refuses connections) but its registry lease
    // has not expired yet: it holds nothing, so the login does not wait for the lease.
    let store = Arc::new(MemoryStore::new());
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = cim_common::registry::ServiceInfo {
        internal_addr: closed.local_addr().unwrap().to_string(),
        ..server("server-dead")
    };
    drop(closed);
    let (state, _tx) = state_with(store.clone(), vec![dead.clone()], |c| {
        c.push_timeout_ms = 5000;
    });
    let signer = state.signer().clone();
    let app = app(state);
    let (_, first) = login_and_attach(&app, &store, &signer, "alice", &dead.id).await;
    let alice = json!({"name": "alice", "password": "secret-pw"});
    let (s, v) = call(&app, post("/api/login", alice, None)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(!store
        .session_active(first.user_id, &first.session)
        .await
        .unwrap());
}

#[tokio::test]
async fn resume_replaces_the_callers_own_session_without_the_password() {
    // Refuse mode (the default): another device is refused, but the session itself comes
    // back at once, its old connection kicked.
    let AliceOn {
        app,
        store,
        signer,
        server: a,
        rec,
        login: v,
        claims: first,
        _servers,
    } = alice_on_server_a(|_| {}).await;
    let old_token = v["session_token"].as_str().unwrap().to_string();

    let (s, v) = call(&app, post("/api/login/resume", json!({}), Some(&old_token))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["name"], "alice");
    let second = signer
        .verify_connect(v["connect_token"].as_str().unwrap(), now_ms())
        .unwrap();
    assert_ne!(second.session, first.session);
    {
        let kicks = rec.kicks.lock().unwrap();
        assert_eq!(kicks.len(), 1, "its old connection was kicked");
        assert_eq!(kicks[0].session, first.session);
    }
    // The old token is spent; the new one works (here: it resumes in turn).
    let (s, v2) = call(&app, post("/api/login/resume", json!({}), Some(&old_token))).await;
    assert_eq!((s, code(&v2)), (StatusCode::UNAUTHORIZED, "session_ended"));
    let new_token = v["session_token"].as_str().unwrap();
    let (s, v3) = call(&app, post("/api/login/resume", json!({}), Some(new_token))).await;
    assert_eq!(s, StatusCode::OK, "{v3}");
    // Its connection closed and the slot is free (a reload, usually): it still resumes.
    let third = signer
        .verify_connect(v3["connect_token"].as_str().unwrap(), now_ms())
        .unwrap();
    store
        .attach(third.user_id, "alice", &third.session, &a.id)
        .await
        .unwrap();
    store
        .detach(third.user_id, "alice", &third.session, &a.id, "closed")
        .await
        .unwrap();
    assert!(!store
        .session_active(third.user_id, &third.session)
        .await
        .unwrap());
    let token3 = v3["session_token"].as_str().unwrap();
    let (s, v3) = call(&app, post("/api/login/resume", json!({}), Some(token3))).await;
    assert_eq!(s, StatusCode::OK, "{v3}");
    // A password login (another device, the slot being pending) makes it a newer login:
    // the resumed token cannot take the account back.
    let token4 = v3["session_token"].as_str().unwrap().to_string();
    let alice = json!({"name": "alice", "password": "secret-pw"});
    let (s, v5) = call(&app, post("/api/login", alice, None)).await;
    assert_eq!(s, StatusCode::OK, "{v5}");
    let (s, v) = call(&app, post("/api/login/resume", json!({}), Some(&token4))).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "session_ended"));
    // Logged out: nothing to resume.
    let token3 = v5["session_token"].as_str().unwrap();
    let (s, _) = call(&app, post("/api/logout", json!({}), Some(token3))).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v4) = call(&app, post("/api/login/resume", json!({}), Some(token3))).await;
    assert_eq!((s, code(&v4)), (StatusCode::UNAUTHORIZED, "session_ended"));
    // No token, or a forged one.
    let (s, v5) = call(&app, post("/api/login/resume", json!({}), None)).await;
    assert_eq!((s, code(&v5)), (StatusCode::UNAUTHORIZED, "unauthorized"));
    let (s, v6) = call(&app, post("/api/login/resume", json!({}), Some("x.y"))).await;
    assert_eq!((s, code(&v6)), (StatusCode::UNAUTHORIZED, "unauthorized"));
}

#[tokio::test]
async fn a_slot_held_on_a_server_that_no_longer_has_the_user_is_taken_over() {
    let AliceOn {
        app,
        store,
        signer,
        server: _,
        rec,
        login: _,
        claims,
        _servers,
    } = alice_on_server_a(|_| {}).await;
    let alice = json!({"name": "alice", "password": "secret-pw"});

    // server-a says alice is connected there: single login holds.
    let (s, v) = call(&app, post("/api/login", alice.clone(), None)).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "already_logged_in"));

    // Her connection died (server-a no longer has her) before the slot was freed: the next
    // login takes the slot over at once instead of waiting.
    rec.absent.lock().unwrap().insert(claims.user_id);
    let (s, v) = call(&app, post("/api/login", alice, None)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let new = signer
        .verify_connect(v["connect_token"].as_str().unwrap(), now_ms())
        .unwrap();
    assert!(store
        .session_active(new.user_id, &new.session)
        .await
        .unwrap());
    assert!(!store
        .session_active(claims.user_id, &claims.session)
        .await
        .unwrap());
}

#[tokio::test]
async fn a_slot_held_on_an_unreachable_server_is_taken_over() {
    let store = Arc::new(MemoryStore::new());
    // Still in the registry (its lease has not expired), but the process is gone.
    let crashed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        cim_common::registry::ServiceInfo {
            internal_addr: addr.to_string(),
            ..server("server-x")
        }
    };
    let (state, _tx) = state_with(store.clone(), vec![crashed.clone()], |_| {});
    let signer = state.signer().clone();
    let app = app(state);
    login_and_attach(&app, &store, &signer, "bob", &crashed.id).await;
    let (s, v) = call(
        &app,
        post(
            "/api/login",
            json!({"name": "bob", "password": "secret-pw"}),
            None,
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn logout_frees_the_slot_and_kicks_the_connection() {
    let AliceOn {
        app,
        store: _,
        signer: _,
        server: _,
        rec,
        login: v,
        claims,
        _servers,
    } = alice_on_server_a(|_| {}).await;
    let token = v["session_token"].as_str().unwrap().to_string();

    let (s, v) = call(&app, post("/api/logout", json!({}), Some(&token))).await;
    assert_eq!((s, &v), (StatusCode::OK, &json!({"ok": true})));
    {
        let kicks = rec.kicks.lock().unwrap();
        assert_eq!(kicks.len(), 1);
        assert_eq!(kicks[0].user_ids, vec![claims.user_id]);
        assert_eq!(kicks[0].session, claims.session);
        assert_eq!(
            kicks[0].kick.as_ref().unwrap().reason,
            KickReason::LoggedOut as i32
        );
    }
    let (s, v) = call(&app, post("/api/logout", json!({}), Some(&token))).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "session_ended"));
    // The slot is free: logging in again works.
    let (s, _) = call(
        &app,
        post(
            "/api/login",
            json!({"name": "alice", "password": "secret-pw"}),
            None,
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn online_users_page_through_live_routes() {
    let store = Arc::new(MemoryStore::new());
    let (state, _tx) = state_with(store.clone(), vec![server("server-a")], |c| {
        c.online_page_max = 2
    });
    let app = app(state);
    let token = register_and_login(&app, "viewer").await["session_token"]
        .as_str()
        .unwrap()
        .to_string();
    for name in ["ann", "bea", "cat", "dan"] {
        let id = store.add_user(name).await;
        store.connect(id, "server-a").await;
    }
    let ghost = store.add_user("bo-ghost").await;
    store.connect(ghost, "server-dead").await;

    for bad in [
        "limit=0",
        "limit=abc",
        "limit=-3",
        "after=%21%21",
        "prefix=ann%1F",
    ] {
        let (s, v) = call(&app, get(&format!("/api/users/online?{bad}"), Some(&token))).await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::BAD_REQUEST, "bad_request"),
            "{bad}"
        );
    }

    // limit=100 is clamped to online_page_max = 2.
    let mut names = Vec::new();
    let mut query = "/api/users/online?limit=100".to_string();
    for _ in 0..10 {
        let (s, v) = call(&app, get(&query, Some(&token))).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let users = v["users"].as_array().unwrap();
        assert!(users.len() <= 2);
        for u in users {
            assert_eq!(u["server_id"], "server-a");
            names.push(u["name"].as_str().unwrap().to_string());
        }
        match v["next"].as_str() {
            Some(next) => query = format!("/api/users/online?limit=100&after={next}"),
            None => break,
        }
    }
    assert_eq!(
        names,
        ["ann", "bea", "cat", "dan"],
        "the ghost on a dead server is hidden"
    );
    assert!(!store.has_route(ghost).await, "and its stale route removed");

    let (s, v) = call(&app, get("/api/users/online?prefix=c", Some(&token))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["users"].as_array().unwrap().len(), 1);
    assert_eq!(v["users"][0]["name"], "cat");
    assert_eq!(v["next"], Value::Null);

    let (s, v) = call(&app, get("/api/users/online", None)).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthorized"));
}

#[tokio::test]
async fn messages_over_http_use_the_token_user() {
    let store = Arc::new(MemoryStore::new());
    let (a, rec) = fake_server("server-a", DEV_SECRET).await;
    let (state, _tx) = state_with(store.clone(), vec![a.clone()], |_| {});
    let app = app(state);
    let login = register_and_login(&app, "alice").await;
    let token = login["session_token"].as_str().unwrap().to_string();
    let alice = login["user_id"].as_u64().unwrap();
    let bob = store.add_user("bob").await;
    let carol = store.add_user("carol").await;
    store.connect(bob, &a.id).await;

    // A forged sender in the body is ignored (unknown fields are not identity).
    let (s, v) = call(
        &app,
        post(
            "/api/messages/private",
            json!({"to": bob, "body": "hi", "sender_id": carol}),
            Some(&token),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "delivered");
    assert!(v["timestamp_ms"].as_i64().unwrap() > 0);
    let id = v["id"].as_str().unwrap().to_string();
    {
        let pushes = rec.pushes.lock().unwrap();
        let m = pushes[0].deliveries[0].message.as_ref().unwrap();
        assert_eq!(
            (m.sender_id, m.sender_name.as_str(), m.id.as_str()),
            (alice, "alice", id.as_str())
        );
    }

    let (s, v) = call(
        &app,
        post(
            "/api/messages/private",
            json!({"to_name": "carol", "body": "hi"}),
            Some(&token),
        ),
    )
    .await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("stored")));

    let (s, v) = call(
        &app,
        post(
            "/api/messages/private",
            json!({"to_name": "zed", "body": "hi"}),
            Some(&token),
        ),
    )
    .await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "unknown_user"));
    let (s, v) = call(
        &app,
        post(
            "/api/messages/private",
            json!({"to": bob, "body": ""}),
            Some(&token),
        ),
    )
    .await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "bad_request"));
    let (s, v) = call(
        &app,
        post("/api/messages/private", json!({"body": "hi"}), Some(&token)),
    )
    .await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "bad_request"));
    let long = "x".repeat(8193);
    let (s, v) = call(
        &app,
        post(
            "/api/messages/private",
            json!({"to": bob, "body": long}),
            Some(&token),
        ),
    )
    .await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "bad_request"));

    // The server counts who got a message to everyone (bob: alice sent it, carol is offline).
    rec.everyone.store(1, std::sync::atomic::Ordering::SeqCst);
    let (s, v) = call(
        &app,
        post(
            "/api/messages/group",
            json!({"body": "hello all"}),
            Some(&token),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["delivered"], 1, "{v}");
    assert!(!v["id"].as_str().unwrap().is_empty());
    let pushes = rec.pushes.lock().unwrap();
    let d = &pushes.last().unwrap().deliveries[0];
    let m = d.message.as_ref().unwrap();
    assert!(d.everyone, "{d:?}");
    assert_eq!(
        (m.sender_id, m.id.as_str()),
        (alice, v["id"].as_str().unwrap())
    );
}

#[tokio::test]
async fn backend_failures_are_503() {
    let store = Arc::new(FaultyStore::default());
    let (state, _tx) = state_with(store.clone(), vec![], |_| {});
    let app = app(state);
    store.fail.store(true, Ordering::SeqCst);
    let (s, v) = call(
        &app,
        post(
            "/api/register",
            json!({"name": "alice", "password": "secret-pw"}),
            None,
        ),
    )
    .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    );
    assert!(
        !v.to_string().contains("test double"),
        "causes stay in the logs"
    );
}

#[tokio::test]
async fn health_and_servers() {
    let (state, _tx) = state_with(
        Arc::new(MemoryStore::new()),
        vec![server("server-a")],
        |_| {},
    );
    let app = app(state);
    let (s, mut v) = call(&app, get("/healthz", None)).await;
    assert_eq!(s, StatusCode::OK);
    let usage = v.as_object_mut().unwrap();
    assert_eq!(usage.remove("pid"), Some(json!(std::process::id())));
    assert!(usage.remove("rss_bytes").unwrap().as_u64().unwrap() > 0);
    assert!(usage.remove("cpu_ms").unwrap().is_u64());
    assert_eq!(v, json!({"status": "ok", "id": "route-test", "servers": 1}));
    let (s, v) = call(&app, get("/api/servers", None)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        v,
        json!({"servers": [{"id": "server-a", "tcp_addr": "server-a.tcp:7000", "ws_addr": "server-a.ws:7001"}]})
    );
}

#[tokio::test]
async fn tls_addresses_reach_clients_only_when_offered() {
    let secure = cim_common::registry::ServiceInfo {
        tls_addr: "server-s.tls:9443".into(),
        wss_addr: "server-s.wss:9444".into(),
        ..server("server-s")
    };
    let store = Arc::new(MemoryStore::new());
    let (state, _tx) = state_with(store, vec![secure], |_| {});
    let app = app(state);
    let (s, v) = call(&app, get("/api/servers", None)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["servers"][0]["tls_addr"], "server-s.tls:9443");
    assert_eq!(v["servers"][0]["wss_addr"], "server-s.wss:9444");
    let creds = json!({"name": "tina", "password": "secret-pw"});
    let (s, _) = call(&app, post("/api/register", creds.clone(), None)).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, v) = call(&app, post("/api/login", creds, None)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["server"]["tls_addr"], "server-s.tls:9443");
    assert_eq!(v["server"]["wss_addr"], "server-s.wss:9444");
    assert_eq!(v["server"]["tcp_addr"], "server-s.tcp:7000");
}

#[tokio::test(start_paused = true)]
async fn slow_requests_hit_the_deadline() {
    let store = Arc::new(FaultyStore::default());
    let (state, _tx) = state_with(store.clone(), vec![], |c| c.request_timeout_ms = 100);
    let app = app(state);
    store.hang.store(true, Ordering::SeqCst);
    let creds = json!({"name": "alice", "password": "secret-pw"});
    let (s, v) = call(&app, post("/api/register", creds, None)).await;
    assert_eq!((s, code(&v)), (StatusCode::SERVICE_UNAVAILABLE, "timeout"));
}

#[tokio::test]
async fn requests_over_the_concurrency_limit_are_shed() {
    let store = Arc::new(FaultyStore::default());
    let (state, _tx) = state_with(store.clone(), vec![], |c| c.concurrency_limit = 1);
    let app = app(state);
    store.hang.store(true, Ordering::SeqCst);
    let creds = json!({"name": "alice", "password": "secret-pw"});
    let stuck = tokio::spawn(app.clone().oneshot(post("/api/register", creds, None)));
    // The first request holds the only permit once it is stuck in the store.
    store.entered.notified().await;
    let (s, v) = call(&app, get("/healthz", None)).await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
    );
    stuck.abort();
}
