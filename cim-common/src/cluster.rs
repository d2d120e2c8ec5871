//! Internal calls between cim processes: protobuf bodies, authenticated by proofs made with
//! the internal key derived from the cluster secret ([`crate::secret`]): every request (each
//! HTTP POST, each cim-rpc upgrade) carries `x-cim-cluster-auth`, one time-stamped HMAC proof
//! per secret of the caller's keyring, never the secret or a key. With `legacy_secret` on,
//! the raw secret also goes in `x-cim-cluster-secret`, for peers of earlier versions.
//! The caller's side is [`ClusterClient`]: it keeps one [`rpc`] connection per peer (an
//! upgrade of the peer's internal HTTP listener) and calls over HTTP/1.1 POSTs a peer that
//! does not speak it. The serving side (axum) is [`Protobuf`] plus [`authorized`], and
//! [`rpc::endpoint`] for the upgrade.

pub mod rpc;

use axum::{
    body::Bytes,
    extract::{FromRequest, Request},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use prost::Message;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::time::Instant;

pub use crate::secret::AUTH_HEADER;
use crate::secret::{Keyring, Refusal};

/// Header of the raw cluster secret (versions before derived keys; sent and accepted only
/// with `legacy_secret` on).
pub const SECRET_HEADER: &str = crate::secret::LEGACY_HEADER;
pub const CONTENT_TYPE: &str = "application/x-protobuf";

/// Largest internal request or response body: one client frame of the largest size a server
/// accepts (16 MiB) plus its envelope (sender, ids) must fit in a forward call, or a send near
/// that size would fail on every route as UNAVAILABLE instead of being answered by the route
/// (TOO_LONG past `max_message_len`).
pub const MAX_BODY: usize = 17 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("call to {url} failed: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("call to {url} answered {status}: {body}")]
    Status {
        url: String,
        status: StatusCode,
        body: String,
    },
    #[error("call to {url} failed: {reason}")]
    Rpc { url: String, reason: String },
    #[error("call to {url} answered an undecodable body: {source}")]
    Decode {
        url: String,
        #[source]
        source: prost::DecodeError,
    },
}

impl ClusterError {
    /// Whether the peer is known to be gone: its address refused the connection (no process
    /// listens there). A timeout is not: the peer may be alive behind a slow network, and
    /// whatever it holds may still be live.
    pub fn is_refused(&self) -> bool {
        match self {
            Self::Transport { source, .. } => source.is_connect() && !source.is_timeout(),
            _ => false,
        }
    }
}

/// Whether an internal request is authenticated for `keys` ([`Keyring::check`]).
pub fn authorized(headers: &HeaderMap, keys: &Keyring) -> bool {
    authorize(headers, keys).is_ok()
}

/// Checks an internal request's headers. The refusal answers as a 401 that says why (for
/// whoever runs the calling node: a wrong secret, a clock off by minutes, legacy form refused).
pub fn authorize(headers: &HeaderMap, keys: &Keyring) -> Result<(), Refusal> {
    keys.check(
        headers.get(AUTH_HEADER).map(|v| v.as_bytes()),
        headers.get(SECRET_HEADER).map(|v| v.as_bytes()),
        crate::secret::now_secs(),
    )
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (StatusCode::UNAUTHORIZED, self.to_string()).into_response()
    }
}

/// `request` with the authentication headers of a call made now.
pub(crate) fn with_auth(
    request: reqwest::RequestBuilder,
    keys: &Keyring,
) -> reqwest::RequestBuilder {
    let request = request.header(AUTH_HEADER, keys.auth_header(crate::secret::now_secs()));
    match keys.legacy_header() {
        Some(raw) => request.header(SECRET_HEADER, raw),
        None => request,
    }
}

/// How long a peer that refused the cim-rpc upgrade is called over HTTP before it is asked
/// again (a peer of an older version during a rolling upgrade, until it is replaced).
const HTTP_ONLY_FOR: Duration = Duration::from_secs(30);

/// Peers remembered before closed connections are pruned.
const PRUNE_PEERS_PAST: usize = 256;

/// Client for internal calls (cheap to clone: the connections are shared).
#[derive(Clone)]
pub struct ClusterClient {
    http: reqwest::Client,
    keys: Keyring,
    timeout: Duration,
    peers: Arc<Mutex<HashMap<String, Arc<Peer>>>>,
}

/// How one peer is called: the open connection, or HTTP until a time.
#[derive(Default)]
struct Peer(tokio::sync::Mutex<PeerState>);

#[derive(Default)]
struct PeerState {
    channel: Option<Arc<rpc::Channel>>,
    http_until: Option<Instant>,
}

fn url(addr: &str, path: &str) -> String {
    format!("http://{addr}{path}")
}

impl ClusterClient {
    /// A client of one secret, without the legacy form ([`Keyring::single`]).
    pub fn new(secret: &str, timeout: Duration) -> Self {
        Self::with_keys(Keyring::single(secret), timeout)
    }

    /// Every call has `timeout` as its deadline (opening a connection included) and is
    /// authenticated with `keys`.
    pub fn with_keys(keys: Keyring, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()
            .expect("http client builds");
        Self {
            http,
            keys,
            timeout,
            peers: Arc::default(),
        }
    }

    /// Calls `path` at the internal listener `addr` (`host:port`) with `req` and decodes the
    /// answer: over the peer's cim-rpc connection (opened on first use), or as an HTTP POST
    /// when the peer does not serve cim-rpc.
    pub async fn call<Req: Message, Resp: Message + Default>(
        &self,
        addr: &str,
        path: &str,
        req: &Req,
    ) -> Result<Resp, ClusterError> {
        self.call_within(addr, path, req, self.timeout).await
    }

    /// [`call`](Self::call) with its own deadline, `timeout` from now, which covers
    /// everything: opening a connection and, for a peer without cim-rpc, the HTTP call.
    pub async fn call_within<Req: Message, Resp: Message + Default>(
        &self,
        addr: &str,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, ClusterError> {
        let deadline = Instant::now() + timeout;
        let late = || ClusterError::Rpc {
            url: url(addr, path),
            reason: format!("no answer within {timeout:?}"),
        };
        let channel = tokio::time::timeout_at(deadline, self.channel(addr, path))
            .await
            .map_err(|_| late())??;
        let Some(channel) = channel else {
            // The same deadline: the attempt to open a connection may have used part of it.
            return tokio::time::timeout_at(deadline, self.call_http(addr, path, req))
                .await
                .map_err(|_| late())?;
        };
        let answer = match tokio::time::timeout_at(deadline, channel.call(path, req)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                return Err(ClusterError::Rpc {
                    url: url(addr, path),
                    reason: e.to_string(),
                })
            }
            Err(_) => {
                // The peer may have a wedged connection (as an HTTP client drops one whose
                // request timed out), or this one call was just slow: the next call opens a
                // new connection, and the calls in flight here keep going, each with its
                // own deadline, so that a slow call fails alone (closing would fail
                // forwards that may have been delivered).
                channel.retire();
                return Err(late());
            }
        };
        Self::decode(addr, path, answer.status, answer.body)
    }

    /// The open connection to `addr`, opening one if there is none; `None` when the peer is
    /// to be called over HTTP.
    async fn channel(
        &self,
        addr: &str,
        path: &str,
    ) -> Result<Option<Arc<rpc::Channel>>, ClusterError> {
        let peer = {
            let mut peers = self.peers.lock().expect("peers lock");
            match peers.get(addr) {
                Some(peer) => peer.clone(),
                None => {
                    if peers.len() >= PRUNE_PEERS_PAST {
                        peers.retain(|_, peer| {
                            peer.0.try_lock().map_or(true, |state| {
                                state.channel.as_ref().is_some_and(|c| c.is_usable())
                            })
                        });
                    }
                    peers.entry(addr.to_string()).or_default().clone()
                }
            }
        };
        // Held while opening, so that concurrent callers share the one new connection.
        let mut state = peer.0.lock().await;
        if let Some(channel) = &state.channel {
            if channel.is_usable() {
                return Ok(Some(channel.clone()));
            }
            state.channel = None;
        }
        if state.http_until.is_some_and(|until| Instant::now() < until) {
            return Ok(None);
        }
        match rpc::Channel::open(&self.http, addr, &self.keys).await {
            Ok(rpc::Opened::Channel(channel)) => {
                let channel = Arc::new(channel);
                state.channel = Some(channel.clone());
                state.http_until = None;
                Ok(Some(channel))
            }
            // No such endpoint: a version before cim-rpc.
            Ok(rpc::Opened::Refused { status, .. })
                if matches!(
                    status,
                    StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
                ) =>
            {
                tracing::debug!(peer = addr, %status, "peer has no cim-rpc; calling it over HTTP");
                state.http_until = Some(Instant::now() + HTTP_ONLY_FOR);
                Ok(None)
            }
            // A refusal (wrong secret, shutting down) is the call's answer, as over HTTP.
            Ok(rpc::Opened::Refused { status, body }) => {
                Err(Self::status_error(addr, path, status, &body))
            }
            Err(source) => Err(ClusterError::Transport {
                url: url(addr, path),
                source,
            }),
        }
    }

    /// The same call as an HTTP POST to `http://{addr}{path}`.
    async fn call_http<Req: Message, Resp: Message + Default>(
        &self,
        addr: &str,
        path: &str,
        req: &Req,
    ) -> Result<Resp, ClusterError> {
        let transport = |source| ClusterError::Transport {
            url: url(addr, path),
            source,
        };
        let resp = with_auth(self.http.post(url(addr, path)), &self.keys)
            .header(header::CONTENT_TYPE, CONTENT_TYPE)
            .body(req.encode_to_vec())
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(transport)?;
        Self::decode(addr, path, status, body)
    }

    fn status_error(addr: &str, path: &str, status: StatusCode, body: &[u8]) -> ClusterError {
        ClusterError::Status {
            url: url(addr, path),
            status,
            body: String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
        }
    }

    fn decode<Resp: Message + Default>(
        addr: &str,
        path: &str,
        status: StatusCode,
        body: Bytes,
    ) -> Result<Resp, ClusterError> {
        if !status.is_success() {
            return Err(Self::status_error(addr, path, status, &body));
        }
        Resp::decode(body).map_err(|source| ClusterError::Decode {
            url: url(addr, path),
            source,
        })
    }
}

/// `listener` with Nagle's algorithm off on every connection it accepts. A cim-rpc connection
/// carries small answers while others are still unacknowledged, and Nagle would hold each of
/// those back until the caller's delayed ACK (tens of milliseconds). Callers' connections
/// already have it off (`ClusterClient`).
pub fn without_nagle(
    listener: tokio::net::TcpListener,
) -> axum::serve::TapIo<tokio::net::TcpListener, fn(&mut tokio::net::TcpStream)> {
    use axum::serve::ListenerExt;
    // A named type (not `impl Listener`): axum then knows the peer address is connect info.
    fn no_delay(tcp: &mut tokio::net::TcpStream) {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot turn Nagle's algorithm off");
        }
    }
    listener.tap_io(no_delay as fn(&mut tokio::net::TcpStream))
}

/// Axum extractor and response for protobuf bodies.
pub struct Protobuf<T>(pub T);

impl<T: Message + Default, S: Send + Sync> FromRequest<S> for Protobuf<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        T::decode(bytes).map(Protobuf).map_err(|e| {
            (
                StatusCode::BAD_REQUEST,
                format!("undecodable protobuf body: {e}"),
            )
                .into_response()
        })
    }
}

impl<T: Message> IntoResponse for Protobuf<T> {
    fn into_response(self) -> Response {
        (
            [(header::CONTENT_TYPE, CONTENT_TYPE)],
            self.0.encode_to_vec(),
        )
            .into_response()
    }
}

/// The rejection for a call without valid authentication (see [`authorize`] for one that
/// says why).
pub fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        "missing or wrong cluster authentication",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::cluster::{PresenceRequest, PresenceResponse};
    use axum::{
        extract::State,
        routing::{get, post},
        Router,
    };
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
    use std::sync::atomic::{AtomicUsize, Ordering};
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
        let client =
            ClusterClient::with_keys(Keyring::new(SECRET, &[], true), Duration::from_secs(5));
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
}
