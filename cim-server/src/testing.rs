//! Test support for unit tests (compiled only under `cfg(test)`): the in-memory store of
//! cim-common behind a thin fault-injection wrapper, and a harness running sessions over
//! `tokio::io::duplex`. The registry is `cim_common::registry::MemoryRegistry` as is.
//! Integration tests against real Redis and etcd live in the workspace's `tests/` crate.

use crate::{
    ack::{AckItem, AckQueue},
    config::ServerConfig,
    forward::{ForwardQueue, Pending},
    server::ServerState,
    session,
    tcp::TcpTransport,
};
use cim_common::{
    keys,
    limit::KeyedLimit,
    pb::{frame::Body, Frame, Login},
    store::{ClaimOutcome, LoginSlots},
    token::{ConnectClaims, TokenSigner},
};
use cim_proto::codec::FrameCodec;
use futures_util::{SinkExt, StreamExt};
use std::{sync::Arc, time::Duration};
use tokio::{io::DuplexStream, sync::mpsc, task::JoinHandle};
use tokio_util::codec::Framed;

pub(crate) const SECRET: &str = "test-secret-0123456789";

/// Pending-slot TTL of test logins: far longer than any test.
const CLAIM_TTL: Duration = Duration::from_secs(3600);

/// Login slot of one user: `server` is set once attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Slot {
    pub session: String,
    pub server: Option<String>,
}

/// The in-memory store with fault injection, from cim-common's `test-support`.
pub(crate) use cim_common::store::faulty::FaultyStore as TestStore;

/// What the server's tests do to the store besides the trait calls.
pub(crate) trait TestStoreExt {
    /// What a route's login does: a pending slot for `session`. A slot another session
    /// holds is taken over (as after its server died), so tests can log a user in again.
    async fn claim(&self, user_id: u64, session: &str);
    fn slot(&self, user_id: u64) -> Option<Slot>;
    /// Makes every call fail as if Redis were down, or work again.
    fn set_unavailable(&self, down: bool);
}

impl TestStoreExt for TestStore {
    async fn claim(&self, user_id: u64, session: &str) {
        let outcome = self
            .inner()
            .claim_login(user_id, session, CLAIM_TTL, &|_| false)
            .await
            .unwrap();
        assert_eq!(outcome, ClaimOutcome::Claimed, "claim of user {user_id}");
    }

    fn slot(&self, user_id: u64) -> Option<Slot> {
        let (value, _) = self.inner().login_slot(user_id)?;
        let (session, server) = keys::parse_slot(&value);
        Some(Slot {
            session: session.into(),
            server: server.map(Into::into),
        })
    }

    fn set_unavailable(&self, down: bool) {
        self.set_fail(down);
    }
}

/// A config for tests: the test secret, everything else default unless changed.
pub(crate) fn test_config() -> ServerConfig {
    ServerConfig {
        cluster_secret: SECRET.into(),
        ..ServerConfig::default()
    }
}

/// A connect token for `user_id` / `session` on `server_id`, valid for a minute.
pub(crate) fn token(user_id: u64, session: &str, server_id: &str) -> String {
    TokenSigner::new(SECRET).sign_connect(&ConnectClaims {
        user_id,
        user_name: format!("user{user_id}"),
        server_id: server_id.into(),
        session: session.into(),
        exp_ms: cim_common::time::now_ms() + 60_000,
    })
}

pub(crate) fn login_frame(token: String) -> Frame {
    Frame::new(Body::Login(Login { token }))
}

pub(crate) type Client = Framed<DuplexStream, FrameCodec>;

/// Sessions over in-memory pipes, without listeners or a forwarder task.
pub(crate) struct Harness {
    pub state: Arc<ServerState>,
    pub store: Arc<TestStore>,
    /// What sessions submitted for forwarding.
    pub forwarded: mpsc::Receiver<Pending>,
    /// What sessions submitted for removal from inboxes.
    pub acked: mpsc::Receiver<AckItem>,
}

impl Harness {
    pub(crate) fn new(config: ServerConfig) -> Self {
        Self::with_send_limit(config, None)
    }

    /// [`Harness::new`] with this send limit instead of the configured one.
    pub(crate) fn with_send_limit(config: ServerConfig, limit: Option<KeyedLimit<u64>>) -> Self {
        let store = Arc::new(TestStore::default());
        let (forward, forwarded) = ForwardQueue::new(config.forward_queue);
        let (acks, acked) = AckQueue::new(64);
        let mut state =
            ServerState::new("server-test01".into(), config, store.clone(), forward, acks);
        if let Some(limit) = limit {
            state.send_limit = limit;
        }
        let state = Arc::new(state);
        Self {
            state,
            store,
            forwarded,
            acked: acked.rx,
        }
    }

    /// Opens a connection; the session runs in the returned task.
    pub(crate) fn connect(&self) -> (Client, JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(256 * 1024);
        let transport = TcpTransport::new(server, self.state.config.max_frame_len);
        let peer = std::net::SocketAddr::from(([127, 0, 0, 1], 1));
        let ticket = self
            .state
            .admission
            .admit()
            .expect("test servers have room");
        let task = tokio::spawn(session::run(self.state.clone(), transport, peer, ticket));
        (Framed::new(client, FrameCodec::default()), task)
    }

    /// Opens a connection and logs `user_id` in (a fresh pending session).
    pub(crate) async fn login(&self, user_id: u64, session: &str) -> (Client, JoinHandle<()>) {
        self.store.claim(user_id, session).await;
        let (mut client, task) = self.connect();
        client
            .send(login_frame(token(user_id, session, &self.state.id)))
            .await
            .unwrap();
        match next(&mut client).await.body {
            Some(Body::LoginResult(r)) => assert_eq!(r.user_id, user_id),
            other => panic!("expected LoginResult, got {other:?}"),
        }
        (client, task)
    }
}

/// The next frame from the server (panics on close: the test expected a frame).
pub(crate) async fn next<S>(client: &mut Framed<S, FrameCodec>) -> Frame
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match client.next().await {
        Some(Ok(frame)) => frame,
        other => panic!("expected a frame, got {other:?}"),
    }
}

/// Asserts that the server closed the connection (after whatever was read before).
pub(crate) async fn assert_closed<S>(client: &mut Framed<S, FrameCodec>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match client.next().await {
        None => {}
        other => panic!("expected the connection to be closed, got {other:?}"),
    }
}

/// The error code of an Error frame.
pub(crate) fn error_code(frame: &Frame) -> cim_common::pb::ErrorCode {
    match &frame.body {
        Some(Body::Error(e)) => e.code(),
        other => panic!("expected an Error frame, got {other:?}"),
    }
}
