//! Tests of internal calls end to end: a [`ClusterClient`] calling axum peers served as the
//! real internal listeners are (authentication, cim-rpc and the HTTP fallback, deadlines).

use super::*;
use crate::pb::cluster::{PresenceRequest, PresenceResponse};
use crate::secret::Keyring;
use axum::{
    extract::Request,
    http::{header, HeaderMap},
    response::IntoResponse,
};
use axum::{
    extract::State,
    routing::{get, post},
    Router,
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use prost::Message;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

const SECRET: &str = "test-secret-0123456789";

/// `/count` answers how many calls it has had (as `online`).
fn calls(counter: Arc<AtomicUsize>) -> Router {
    Router::new()
        .route(
            "/count",
            post(|State(n): State<Arc<AtomicUsize>>, Protobuf(_): Protobuf<PresenceRequest>| async move {
                Protobuf(PresenceResponse {
                    online: n.fetch_add(1, Ordering::SeqCst) as u64 + 1,
                    ..Default::default()
                })
            }),
        )
        .with_state(counter)
}

/// Serves `/count` as a POST, with the cim-rpc endpoint when `rpc` is given, behind the
/// secret check as the real listeners do. Returns the address.
async fn peer(rpc: Option<CancellationToken>) -> String {
    peer_with(rpc, Keyring::single(SECRET)).await
}

/// [`peer`] checking calls against `keys`.
async fn peer_with(rpc: Option<CancellationToken>, keys: Keyring) -> String {
    let counter = Arc::new(AtomicUsize::new(0));
    let mut app = calls(counter.clone());
    if let Some(cancel) = rpc {
        app = app.route(
            rpc::PATH,
            rpc::endpoint(calls(counter), cancel, TaskTracker::new()),
        );
    }
    let app = app.route_layer(axum::middleware::from_fn(
        move |req: Request, next: axum::middleware::Next| {
            let keys = keys.clone();
            async move {
                match authorize(req.headers(), &keys) {
                    Ok(()) => next.run(req).await,
                    Err(refusal) => refusal.into_response(),
                }
            }
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

async fn count(client: &ClusterClient, addr: &str) -> Result<u64, ClusterError> {
    client
        .call::<_, PresenceResponse>(addr, "/count", &PresenceRequest::default())
        .await
        .map(|r| r.online)
}

fn open_channel(client: &ClusterClient, addr: &str) -> Option<Arc<rpc::Channel>> {
    let peer = client.peers.lock().unwrap().get(addr)?.clone();
    let state = peer.0.try_lock().unwrap();
    state.channel.clone().filter(|c| !c.is_closed())
}

#[tokio::test]
async fn calls_travel_over_one_rpc_connection_and_reopen_after_it_breaks() {
    let cancel = CancellationToken::new();
    let addr = peer(Some(cancel.clone())).await;
    let client = ClusterClient::new(SECRET, Duration::from_secs(5));
    for expected in 1..=3 {
        assert_eq!(count(&client, &addr).await.unwrap(), expected);
    }
    let first = open_channel(&client, &addr).expect("the calls went over cim-rpc");
    // Closed on our side (as after a deadline): the next call opens a new connection.
    first.close();
    assert_eq!(count(&client, &addr).await.unwrap(), 4);
    let channel = open_channel(&client, &addr).expect("a new connection");
    assert!(!Arc::ptr_eq(&first, &channel));
    // The peer ends its connections (as when it shuts down).
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), async {
        while !channel.is_closed() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the client notices the closed connection");
    // The endpoint is still mounted but its token has fired: the upgrade is refused as
    // shutting down, and the call fails with that answer rather than hanging.
    match count(&client, &addr).await.unwrap_err() {
        ClusterError::Status { status, .. } => {
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE)
        }
        other => panic!("expected 503, got {other}"),
    }
}

#[tokio::test]
async fn a_peer_without_rpc_is_called_over_http() {
    let addr = peer(None).await;
    let client = ClusterClient::new(SECRET, Duration::from_secs(5));
    assert_eq!(count(&client, &addr).await.unwrap(), 1);
    assert_eq!(count(&client, &addr).await.unwrap(), 2);
    assert!(open_channel(&client, &addr).is_none());
    let peer = client.peers.lock().unwrap().get(&addr).unwrap().clone();
    assert!(peer.0.try_lock().unwrap().http_until.is_some());
}

/// A peer of an older version (no cim-rpc: the upgrade gets 404, so the caller also
/// makes an HTTP POST) that records the headers of every request it gets.
async fn recording_peer() -> (String, Arc<Mutex<Vec<HeaderMap>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = |seen: Arc<Mutex<Vec<HeaderMap>>>| {
        move |req: Request, next: axum::middleware::Next| {
            seen.lock().unwrap().push(req.headers().clone());
            next.run(req)
        }
    };
    let app = calls(Arc::new(AtomicUsize::new(0)))
        .route(rpc::PATH, get(|| async { StatusCode::NOT_FOUND }))
        .layer(axum::middleware::from_fn(record(seen.clone())));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

#[tokio::test]
async fn a_captured_internal_header_cannot_sign_a_token() {
    use crate::token::{forge_connect, ConnectClaims, TokenSigner};
    let (addr, seen) = recording_peer().await;
    // What nodes send once `legacy_secret` is off (with it on, the raw secret also
    // travels, for peers of earlier versions: the rolling-upgrade window).
    let client = ClusterClient::new(SECRET, Duration::from_secs(5));
    assert_eq!(count(&client, &addr).await.unwrap(), 1);
    let captured = seen.lock().unwrap().clone();
    assert_eq!(captured.len(), 2, "the upgrade and the POST");
    let verifier = TokenSigner::new(SECRET);
    // The key id is public (every token shows it): the forger knows it.
    let id = verifier
        .sign_connect(&claims())
        .split('.')
        .next()
        .unwrap()
        .to_owned();
    let mut tried = 0;
    for headers in &captured {
        for (name, value) in headers {
            // Every header value, whole and cut at the separators a proof uses, as a
            // secret, as an HMAC key, and decoded from base64url as a key.
            let value = value.to_str().unwrap_or_default();
            for piece in std::iter::once(value).chain(value.split(['.', ',', ' '])) {
                let decoded = URL_SAFE_NO_PAD.decode(piece).unwrap_or_default();
                let forged = [
                    TokenSigner::new(piece).sign_connect(&claims()),
                    forge_connect(piece.as_bytes(), None, &claims()),
                    forge_connect(piece.as_bytes(), Some(&id), &claims()),
                    forge_connect(&decoded, Some(&id), &claims()),
                ];
                for token in forged {
                    tried += 1;
                    assert!(
                        verifier.verify_connect(&token, 0).is_err(),
                        "header {name} signs tokens"
                    );
                }
            }
        }
    }
    assert!(tried > 16, "headers were captured");
    // The control: the same forgery with the token key itself verifies (so the tries
    // above were well-formed tokens, refused for their key alone).
    let (_, token_key) = verifier.keys().signing_key();
    let real = forge_connect(token_key, Some(&id), &claims());
    assert!(verifier.verify_connect(&real, 0).is_ok());

    fn claims() -> ConnectClaims {
        ConnectClaims {
            user_id: 1,
            user_name: "admin".into(),
            server_id: "server-1".into(),
            session: "s".into(),
            exp_ms: i64::MAX,
        }
    }
}

#[tokio::test]
async fn calls_are_accepted_with_a_previous_secret_while_it_is_listed() {
    const OLD: &str = "old-secret-0123456789";
    // A peer rotated to SECRET that still lists OLD; the caller still has OLD only.
    let rotated = Keyring::new(SECRET, &[OLD.into()], false);
    let addr = peer_with(Some(CancellationToken::new()), rotated).await;
    let caller = ClusterClient::new(OLD, Duration::from_secs(5));
    assert_eq!(count(&caller, &addr).await.unwrap(), 1);
    assert!(open_channel(&caller, &addr).is_some(), "over cim-rpc");
    // And over HTTP.
    let http_addr = peer_with(None, Keyring::new(SECRET, &[OLD.into()], false)).await;
    assert_eq!(count(&caller, &http_addr).await.unwrap(), 1);
    // OLD dropped: refused on both paths, and the 401 says why.
    for rpc in [Some(CancellationToken::new()), None] {
        let addr = peer_with(rpc, Keyring::single(SECRET)).await;
        match count(&ClusterClient::new(OLD, Duration::from_secs(5)), &addr)
            .await
            .unwrap_err()
        {
            ClusterError::Status { status, body, .. } => {
                assert_eq!(status, StatusCode::UNAUTHORIZED);
                assert!(body.contains("does not know"), "{body}");
            }
            other => panic!("expected 401, got {other}"),
        }
    }
}

#[tokio::test]
async fn the_raw_secret_header_is_accepted_only_in_legacy_mode() {
    // What a node of a version before derived keys sends: the raw secret, nothing else.
    async fn old_version_call(addr: &str) -> StatusCode {
        reqwest::Client::new()
            .post(format!("http://{addr}/count"))
            .header(SECRET_HEADER, SECRET)
            .body(PresenceRequest::default().encode_to_vec())
            .send()
            .await
            .unwrap()
            .status()
    }
    let legacy = peer_with(None, Keyring::new(SECRET, &[], true)).await;
    assert_eq!(old_version_call(&legacy).await, StatusCode::OK);
    let strict = peer_with(None, Keyring::single(SECRET)).await;
    assert_eq!(old_version_call(&strict).await, StatusCode::UNAUTHORIZED);
    // A node in legacy mode sends the raw secret too, so that such a peer (which
    // checks only that header) accepts its calls.
    let (addr, seen) = recording_peer().await;
    let client = ClusterClient::with_keys(Keyring::new(SECRET, &[], true), Duration::from_secs(5));
    count(&client, &addr).await.unwrap();
    let sent = seen.lock().unwrap().clone();
    assert!(sent
        .iter()
        .all(|h| h.get(SECRET_HEADER).is_some_and(|v| v == SECRET)));
    assert!(sent.iter().all(|h| h.contains_key(AUTH_HEADER)));
    // Not in strict mode.
    let (addr, seen) = recording_peer().await;
    count(&ClusterClient::new(SECRET, Duration::from_secs(5)), &addr)
        .await
        .unwrap();
    assert!(seen
        .lock()
        .unwrap()
        .iter()
        .all(|h| !h.contains_key(SECRET_HEADER)));
}

#[tokio::test]
async fn a_wrong_secret_is_refused_on_both_paths() {
    let addr = peer(Some(CancellationToken::new())).await;
    let intruder = ClusterClient::new("wrong-secret-0123456789", Duration::from_secs(5));
    match count(&intruder, &addr).await.unwrap_err() {
        ClusterError::Status { status, .. } => assert_eq!(status, StatusCode::UNAUTHORIZED),
        other => panic!("expected 401, got {other}"),
    }
    assert!(open_channel(&intruder, &addr).is_none());
    let peer = intruder.peers.lock().unwrap().get(&addr).unwrap().clone();
    assert!(
        peer.0.try_lock().unwrap().http_until.is_none(),
        "a refusal is not taken for a peer without cim-rpc"
    );
    // An upgrade request without the secret is refused before it switches.
    let resp = reqwest::Client::new()
        .get(format!("http://{addr}{}", rpc::PATH))
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, rpc::PROTOCOL)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

/// A peer with cim-rpc whose `/never` never answers and whose `/gate` answers once the
/// test sends on the returned channel; `entered` gets a message when `/gate` starts.
async fn gated_peer() -> (String, mpsc::Sender<()>, mpsc::Receiver<()>) {
    let (open_tx, open_rx) = mpsc::channel::<()>(1);
    let (entered_tx, entered_rx) = mpsc::channel::<()>(1);
    let open_rx = Arc::new(tokio::sync::Mutex::new(open_rx));
    let calls = Router::new()
        .route(
            "/never",
            post(|Protobuf(_): Protobuf<PresenceRequest>| std::future::pending::<()>()),
        )
        .route(
            "/gate",
            post(move |Protobuf(_): Protobuf<PresenceRequest>| {
                let (open_rx, entered_tx) = (open_rx.clone(), entered_tx.clone());
                async move {
                    let _ = entered_tx.send(()).await;
                    open_rx.lock().await.recv().await;
                    Protobuf(PresenceResponse {
                        online: 42,
                        ..Default::default()
                    })
                }
            }),
        );
    let app = Router::new().route(
        rpc::PATH,
        rpc::endpoint(calls, CancellationToken::new(), TaskTracker::new()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, open_tx, entered_rx)
}

/// A `/gate` call of `client` in a task of its own.
fn spawn_gate_call(
    client: &ClusterClient,
    addr: &str,
) -> tokio::task::JoinHandle<Result<PresenceResponse, ClusterError>> {
    let (client, addr) = (client.clone(), addr.to_string());
    tokio::spawn(async move {
        client
            .call::<_, PresenceResponse>(&addr, "/gate", &PresenceRequest::default())
            .await
    })
}

#[tokio::test]
async fn a_call_past_its_deadline_fails_alone() {
    let (addr, open, mut entered) = gated_peer().await;
    let client = ClusterClient::new(SECRET, Duration::from_secs(30));
    // A call in flight on the connection (the peer holds it until we open the gate)...
    let in_flight = spawn_gate_call(&client, &addr);
    entered.recv().await.expect("the peer took the call");
    let first = open_channel(&client, &addr).expect("over cim-rpc");
    // ...while another call on it goes past its deadline.
    let late = client
        .call_within::<_, PresenceResponse>(
            &addr,
            "/never",
            &PresenceRequest::default(),
            Duration::from_millis(200),
        )
        .await;
    assert!(matches!(late, Err(ClusterError::Rpc { .. })), "{late:?}");
    // The first call is still answered: the timed-out call failed alone.
    open.send(()).await.unwrap();
    let answer = in_flight
        .await
        .unwrap()
        .expect("the call in flight is answered");
    assert_eq!(answer.online, 42);
    // The connection that saw a call time out is not used again, and closes once its
    // calls are done; the next call opens a new one.
    assert!(first.is_closed());
    let next = spawn_gate_call(&client, &addr);
    entered.recv().await.expect("the peer took the next call");
    let second = open_channel(&client, &addr).expect("a new connection");
    assert!(!Arc::ptr_eq(&first, &second));
    open.send(()).await.unwrap();
    assert_eq!(next.await.unwrap().unwrap().online, 42);
}

#[tokio::test]
async fn the_http_fallback_keeps_the_calls_deadline() {
    // A peer of an older version, slow to refuse the upgrade, whose call never answers.
    let app = Router::new()
        .route(
            rpc::PATH,
            get(|| async {
                // The slow peer being simulated: its refusal takes 600 ms.
                tokio::time::sleep(Duration::from_millis(600)).await;
                StatusCode::NOT_FOUND
            }),
        )
        .route(
            "/never",
            post(|Protobuf(_): Protobuf<PresenceRequest>| std::future::pending::<()>()),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = ClusterClient::new(SECRET, Duration::from_secs(1));
    let err = client
        .call::<_, PresenceResponse>(&addr, "/never", &PresenceRequest::default())
        .await
        .unwrap_err();
    // The call's own deadline (1 s from its start) ends it, not the HTTP client's
    // timeout, which would only fire 1 s after the HTTP request began (at ~1.6 s).
    match err {
        ClusterError::Rpc { reason, .. } => assert!(reason.contains("no answer"), "{reason}"),
        other => panic!("expected the call's deadline, got {other}"),
    }
}

#[tokio::test]
async fn an_unreachable_peer_fails_within_the_deadline() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let client = ClusterClient::new(SECRET, Duration::from_secs(5));
    match count(&client, &addr).await.unwrap_err() {
        ClusterError::Transport { url, .. } => assert!(url.contains(&addr)),
        other => panic!("expected a transport error, got {other}"),
    }
}
