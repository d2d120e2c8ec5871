//! The caller's side of internal calls: [`ClusterClient`] keeps one cim-rpc connection per
//! peer ([`super::rpc::Channel`]), falls back to HTTP POSTs for a peer that refuses the
//! upgrade, and authenticates every request ([`with_auth`]).

use super::{rpc, ClusterError, AUTH_HEADER, CONTENT_TYPE, SECRET_HEADER};
use crate::secret::Keyring;
use axum::{
    body::Bytes,
    http::{header, StatusCode},
};
use prost::Message;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::time::Instant;

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
    pub(super) peers: Arc<Mutex<HashMap<String, Arc<Peer>>>>,
}

/// How one peer is called: the open connection, or HTTP until a time.
#[derive(Default)]
pub(super) struct Peer(pub(super) tokio::sync::Mutex<PeerState>);

#[derive(Default)]
pub(super) struct PeerState {
    pub(super) channel: Option<Arc<rpc::Channel>>,
    pub(super) http_until: Option<Instant>,
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
