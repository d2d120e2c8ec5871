//! Test support for the crate's unit tests: helpers over the in-memory store of cim-common
//! ([`StoreExt`]), a thin wrapper around it for the tests that need faults or call counts
//! ([`FaultyStore`]), a fake connection server that records pushes and kicks, and an
//! [`AppState`] built on them. (Real Redis / etcd are exercised by the end-to-end tests.)

use crate::{config::RouteConfig, state::AppState};
use async_trait::async_trait;
use axum::{extract::State, http::HeaderMap, response::Response, routing::post, Router};
use cim_common::{
    cluster::{self, Protobuf},
    pb::cluster::{DeliveryResult, KickRequest, KickResponse, PushRequest, PushResponse},
    registry::{Members, ServiceInfo},
    store::*,
};
use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use tokio::sync::watch;

/// Shortcuts that set up users and connections through the [`StateStore`] API itself.
pub trait StoreExt: StateStore {
    /// Creates a user with a placeholder hash (no login possible) and returns its id.
    async fn add_user(&self, name: &str) -> u64 {
        self.create_user(name, "$argon2id$placeholder")
            .await
            .unwrap()
            .expect("a fresh name")
    }

    /// Marks `user_id` connected to `server_id` (slot, route and online index), as a login
    /// (taking over any slot) followed by the server's attach.
    async fn connect(&self, user_id: u64, server_id: &str) {
        let name = self
            .user_name(user_id)
            .await
            .unwrap()
            .expect("a known user");
        let session = format!("s{user_id}");
        let claimed = self
            .claim_login(user_id, &session, Duration::from_secs(3600), &|_| false)
            .await
            .unwrap();
        assert_eq!(claimed, ClaimOutcome::Claimed);
        let attached = self
            .attach(user_id, &name, &session, server_id)
            .await
            .unwrap();
        assert_eq!(attached, AttachOutcome::Attached);
    }

    async fn has_route(&self, user_id: u64) -> bool {
        self.routes(&[user_id]).await.unwrap()[0].is_some()
    }
}

impl<T: StateStore + ?Sized> StoreExt for T {}

/// [`MemoryStore`] with fault injection and call counts, for the tests that need them (the
/// product type stays free of test knobs). `fail` makes every call answer `Unavailable`;
/// `hang` makes `user_by_name` never answer (signalling `entered` when a call gets stuck).
#[derive(Default)]
pub struct FaultyStore {
    inner: MemoryStore,
    pub fail: AtomicBool,
    pub hang: AtomicBool,
    pub entered: tokio::sync::Notify,
    pub scans: AtomicUsize,
    pub route_lookups: AtomicUsize,
}

impl FaultyStore {
    fn check(&self) -> StoreResult<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("test double set to fail".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl StateStore for FaultyStore {
    async fn create_user(&self, name: &str, password_hash: &str) -> StoreResult<Option<u64>> {
        self.check()?;
        self.inner.create_user(name, password_hash).await
    }

    async fn user_by_name(&self, name: &str) -> StoreResult<Option<UserRecord>> {
        if self.hang.load(Ordering::SeqCst) {
            self.entered.notify_one();
            std::future::pending::<()>().await;
        }
        self.check()?;
        self.inner.user_by_name(name).await
    }

    async fn user_name(&self, id: u64) -> StoreResult<Option<String>> {
        self.check()?;
        self.inner.user_name(id).await
    }

    async fn claim_login(
        &self,
        user_id: u64,
        session: &str,
        pending_ttl: Duration,
        is_live: IsLive<'_>,
    ) -> StoreResult<ClaimOutcome> {
        self.check()?;
        self.inner
            .claim_login(user_id, session, pending_ttl, is_live)
            .await
    }

    async fn session_active(&self, user_id: u64, session: &str) -> StoreResult<bool> {
        self.check()?;
        self.inner.session_active(user_id, session).await
    }

    async fn release_login(&self, user_id: u64, session: &str) -> StoreResult<Option<String>> {
        self.check()?;
        self.inner.release_login(user_id, session).await
    }

    async fn attach(
        &self,
        user_id: u64,
        name: &str,
        session: &str,
        server_id: &str,
    ) -> StoreResult<AttachOutcome> {
        self.check()?;
        self.inner.attach(user_id, name, session, server_id).await
    }

    async fn detach(
        &self,
        user_id: u64,
        name: &str,
        session: &str,
        server_id: &str,
    ) -> StoreResult<()> {
        self.check()?;
        self.inner.detach(user_id, name, session, server_id).await
    }

    async fn routes(&self, user_ids: &[u64]) -> StoreResult<Vec<Option<RouteEntry>>> {
        self.route_lookups.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.routes(user_ids).await
    }

    async fn scan_routes(&self, cursor: u64, count: usize) -> StoreResult<(u64, Vec<RouteEntry>)> {
        self.scans.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.scan_routes(cursor, count).await
    }

    async fn online_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<OnlineEntry>> {
        self.check()?;
        self.inner.online_page(prefix, after, limit).await
    }

    async fn remove_stale_route(&self, entry: &RouteEntry) -> StoreResult<()> {
        self.check()?;
        self.inner.remove_stale_route(entry).await
    }
}

/// A member list as the registry would publish it (sorted by id).
pub fn members(mut servers: Vec<ServiceInfo>) -> Members {
    servers.sort_by(|a, b| a.id.cmp(&b.id));
    Arc::new(servers)
}

/// A server entry without a reachable internal API (enough where nothing is pushed).
pub fn server(id: &str) -> ServiceInfo {
    ServiceInfo {
        id: id.into(),
        tcp_addr: format!("{id}.tcp:7000"),
        ws_addr: format!("{id}.ws:7001"),
        internal_addr: "127.0.0.1:9".into(),
        ..Default::default()
    }
}

/// An [`AppState`] on `store` with `servers` live, cheap password hashing, and the config
/// `tweak` leaves. The sender keeps the server list changeable (and the watch open).
pub fn state_with(
    store: Arc<dyn StateStore>,
    servers: Vec<ServiceInfo>,
    tweak: impl FnOnce(&mut RouteConfig),
) -> (AppState, watch::Sender<Members>) {
    let mut config = RouteConfig {
        // Cheap hashing: the tests check behaviour, not hash strength.
        password_memory_kib: 8,
        password_iterations: 1,
        ..Default::default()
    };
    tweak(&mut config);
    let (tx, rx) = watch::channel(members(servers));
    (AppState::new("route-test".into(), config, store, rx), tx)
}

/// What a fake connection server received.
#[derive(Default)]
pub struct Recorded {
    pub pushes: Mutex<Vec<PushRequest>>,
    pub kicks: Mutex<Vec<KickRequest>>,
    /// Recipients that are *not* connected here (everyone else is).
    pub absent: Mutex<HashSet<u64>>,
}

#[derive(Clone)]
struct FakeServer {
    recorded: Arc<Recorded>,
    secret: String,
}

async fn fake_push(
    State(s): State<FakeServer>,
    headers: HeaderMap,
    Protobuf(req): Protobuf<PushRequest>,
) -> Result<Protobuf<PushResponse>, Response> {
    if !cluster::authorized(&headers, &s.secret) {
        return Err(cluster::unauthorized());
    }
    let absent = s.recorded.absent.lock().unwrap().clone();
    let results = req
        .deliveries
        .iter()
        .map(|d| DeliveryResult {
            delivered: d
                .recipients
                .iter()
                .copied()
                .filter(|r| !absent.contains(r))
                .collect(),
        })
        .collect();
    s.recorded.pushes.lock().unwrap().push(req);
    Ok(Protobuf(PushResponse { results }))
}

async fn fake_kick(
    State(s): State<FakeServer>,
    Protobuf(req): Protobuf<KickRequest>,
) -> Protobuf<KickResponse> {
    let kicked = req.user_ids.clone();
    s.recorded.kicks.lock().unwrap().push(req);
    Protobuf(KickResponse { kicked })
}

/// Starts a fake connection server's internal API on a free port; returns its registry
/// entry and what it records. It stops with the test's runtime.
pub async fn fake_server(id: &str, secret: &str) -> (ServiceInfo, Arc<Recorded>) {
    let recorded = Arc::new(Recorded::default());
    let app = Router::new()
        .route("/internal/push", post(fake_push))
        .route("/internal/kick", post(fake_kick))
        .with_state(FakeServer {
            recorded: recorded.clone(),
            secret: secret.into(),
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let info = ServiceInfo {
        internal_addr: addr.to_string(),
        ..server(id)
    };
    (info, recorded)
}
