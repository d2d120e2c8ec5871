//! Test doubles for unit tests (compiled only under `cfg(test)`): a state store that
//! implements the login-slot calls a server makes (attach / detach), a registry kept in
//! memory, and a harness running sessions over `tokio::io::duplex`. Integration tests against
//! real Redis and etcd live in the workspace's `tests/` crate.

use crate::{
    config::ServerConfig,
    forward::{ForwardQueue, Pending},
    server::ServerState,
    session,
    tcp::TcpTransport,
};
use async_trait::async_trait;
use cim_common::{
    codec::FrameCodec,
    pb::{frame::Body, Frame, Login},
    registry::{
        Members, MembersRx, Registration, Registry, RegistryResult, ServiceInfo, ServiceKind,
    },
    store::{
        AttachOutcome, ClaimOutcome, IsLive, OnlineEntry, RouteEntry, StateStore, StoreError,
        StoreResult, UserRecord,
    },
    token::{ConnectClaims, TokenSigner},
};
use futures_util::{SinkExt, StreamExt};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{io::DuplexStream, sync::mpsc, sync::watch, task::JoinHandle};
use tokio_util::codec::Framed;

pub(crate) const SECRET: &str = "test-secret-0123456789";

/// Login slot of one user: `server` is set once attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Slot {
    pub session: String,
    pub server: Option<String>,
}

/// The attach / detach half of the state store, in memory.
#[derive(Default)]
pub(crate) struct MemStore {
    slots: Mutex<HashMap<u64, Slot>>,
    unavailable: Mutex<bool>,
}

impl MemStore {
    /// What a route's login does: a pending slot for `session`.
    pub(crate) fn claim(&self, user_id: u64, session: &str) {
        self.slots.lock().unwrap().insert(
            user_id,
            Slot {
                session: session.into(),
                server: None,
            },
        );
    }

    pub(crate) fn slot(&self, user_id: u64) -> Option<Slot> {
        self.slots.lock().unwrap().get(&user_id).cloned()
    }

    pub(crate) fn set_unavailable(&self, down: bool) {
        *self.unavailable.lock().unwrap() = down;
    }

    fn check(&self) -> StoreResult<()> {
        if *self.unavailable.lock().unwrap() {
            Err(StoreError::Unavailable("test store is down".into()))
        } else {
            Ok(())
        }
    }
}

fn not_here<T>() -> StoreResult<T> {
    Err(StoreError::Unavailable(
        "not implemented by the test store".into(),
    ))
}

#[async_trait]
impl StateStore for MemStore {
    async fn create_user(&self, _: &str, _: &str) -> StoreResult<Option<u64>> {
        not_here()
    }
    async fn user_by_name(&self, _: &str) -> StoreResult<Option<UserRecord>> {
        not_here()
    }
    async fn user_name(&self, _: u64) -> StoreResult<Option<String>> {
        not_here()
    }
    async fn claim_login(
        &self,
        _: u64,
        _: &str,
        _: Duration,
        _: IsLive<'_>,
    ) -> StoreResult<ClaimOutcome> {
        not_here()
    }
    async fn session_active(&self, _: u64, _: &str) -> StoreResult<bool> {
        not_here()
    }
    async fn release_login(&self, _: u64, _: &str) -> StoreResult<Option<String>> {
        not_here()
    }
    async fn attach(
        &self,
        user_id: u64,
        _name: &str,
        session: &str,
        server_id: &str,
    ) -> StoreResult<AttachOutcome> {
        self.check()?;
        let mut slots = self.slots.lock().unwrap();
        match slots.get_mut(&user_id) {
            Some(slot) if slot.session == session && slot.server.is_none() => {
                slot.server = Some(server_id.into());
                Ok(AttachOutcome::Attached)
            }
            _ => Ok(AttachOutcome::SessionInvalid),
        }
    }
    async fn detach(
        &self,
        user_id: u64,
        _name: &str,
        session: &str,
        server_id: &str,
    ) -> StoreResult<()> {
        self.check()?;
        let mut slots = self.slots.lock().unwrap();
        if slots.get(&user_id).is_some_and(|slot| {
            slot.session == session && slot.server.as_deref() == Some(server_id)
        }) {
            slots.remove(&user_id);
        }
        Ok(())
    }
    async fn routes(&self, _: &[u64]) -> StoreResult<Vec<Option<RouteEntry>>> {
        not_here()
    }
    async fn scan_routes(&self, _: u64, _: usize) -> StoreResult<(u64, Vec<RouteEntry>)> {
        not_here()
    }
    async fn online_page(
        &self,
        _: &str,
        _: Option<&str>,
        _: usize,
    ) -> StoreResult<Vec<OnlineEntry>> {
        not_here()
    }
    async fn remove_stale_route(&self, _: &RouteEntry) -> StoreResult<()> {
        not_here()
    }
}

/// A registry in memory: one watch channel per kind.
pub(crate) struct MemRegistry {
    servers: watch::Sender<Members>,
    routes: watch::Sender<Members>,
}

impl Default for MemRegistry {
    fn default() -> Self {
        Self {
            servers: watch::Sender::new(Members::default()),
            routes: watch::Sender::new(Members::default()),
        }
    }
}

impl MemRegistry {
    fn channel(&self, kind: ServiceKind) -> &watch::Sender<Members> {
        match kind {
            ServiceKind::Server => &self.servers,
            ServiceKind::Route => &self.routes,
        }
    }

    pub(crate) fn members(&self, kind: ServiceKind) -> Members {
        self.channel(kind).borrow().clone()
    }

    /// Adds or replaces a member directly (for routes played by tests).
    pub(crate) fn put(&self, kind: ServiceKind, info: ServiceInfo) {
        self.channel(kind).send_modify(|members| {
            let mut list: Vec<ServiceInfo> = members
                .iter()
                .filter(|m| m.id != info.id)
                .cloned()
                .collect();
            list.push(info);
            list.sort_by(|a, b| a.id.cmp(&b.id));
            *members = Arc::new(list);
        });
    }

    fn remove(&self, kind: ServiceKind, id: &str) {
        self.channel(kind).send_modify(|members| {
            *members = Arc::new(members.iter().filter(|m| m.id != id).cloned().collect());
        });
    }
}

struct MemRegistration {
    registry: Arc<MemRegistry>,
    kind: ServiceKind,
    id: String,
}

#[async_trait]
impl Registration for MemRegistration {
    async fn deregister(self: Box<Self>) -> RegistryResult<()> {
        self.registry.remove(self.kind, &self.id);
        Ok(())
    }
}

/// `Registry` for an `Arc<MemRegistry>`, so tests keep a handle to inspect it.
pub(crate) struct SharedRegistry(pub Arc<MemRegistry>);

#[async_trait]
impl Registry for SharedRegistry {
    async fn register(
        &self,
        kind: ServiceKind,
        info: &ServiceInfo,
        _ttl: Duration,
    ) -> RegistryResult<Box<dyn Registration>> {
        self.0.put(kind, info.clone());
        Ok(Box::new(MemRegistration {
            registry: self.0.clone(),
            kind,
            id: info.id.clone(),
        }))
    }

    async fn watch(&self, kind: ServiceKind) -> RegistryResult<MembersRx> {
        Ok(self.0.channel(kind).subscribe())
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
    pub store: Arc<MemStore>,
    /// What sessions submitted for forwarding.
    pub forwarded: mpsc::Receiver<Pending>,
}

impl Harness {
    pub(crate) fn new(config: ServerConfig) -> Self {
        let store = Arc::new(MemStore::default());
        let (forward, forwarded) = ForwardQueue::new(config.forward_queue);
        let state = Arc::new(ServerState::new(
            "server-test01".into(),
            config,
            store.clone(),
            forward,
        ));
        Self {
            state,
            store,
            forwarded,
        }
    }

    /// Opens a connection; the session runs in the returned task.
    pub(crate) fn connect(&self) -> (Client, JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(256 * 1024);
        let transport = TcpTransport::new(server, self.state.config.max_frame_len);
        let peer = std::net::SocketAddr::from(([127, 0, 0, 1], 1));
        let task = tokio::spawn(session::run(self.state.clone(), transport, peer));
        (Framed::new(client, FrameCodec::default()), task)
    }

    /// Opens a connection and logs `user_id` in (a fresh pending session).
    pub(crate) async fn login(&self, user_id: u64, session: &str) -> (Client, JoinHandle<()>) {
        self.store.claim(user_id, session);
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
