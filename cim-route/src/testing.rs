//! Test support for the crate's unit tests: helpers over the in-memory store of cim-common
//! ([`StoreExt`]), a thin wrapper around it for the tests that need faults or call counts
//! ([`FaultyStore`]), a fake connection server that records pushes and kicks, and an
//! [`AppState`] built on them. (Real Redis / etcd are exercised by the end-to-end tests.)

use crate::{config::RouteConfig, state::AppState};
use axum::{extract::State, http::HeaderMap, response::Response, routing::post, Router};
use cim_common::{
    cluster::{self, Protobuf},
    pb::cluster::{
        ConnectedUser, DeliveryResult, KickRequest, KickResponse, PresenceRequest,
        PresenceResponse, PushRequest, PushResponse,
    },
    registry::{Members, ServiceInfo},
    store::*,
};
use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use tokio::sync::watch;

/// Shortcuts that set up users and connections through the [`StateStore`] API itself.
pub trait StoreExt: StateStore {
    /// Creates a user with a placeholder hash (no login possible) and returns its id.
    async fn add_user(&self, name: &str) -> u64 {
        self.create_user(name, &test_hash())
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

pub use cim_common::store::faulty::FaultyStore;

/// A real argon2id hash of the tests' password `secret-pw` (cheap parameters), for users the
/// tests add to the store directly: a login with it works like one of a registered user.
pub fn test_hash() -> String {
    use argon2::password_hash::PasswordHasher;
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| {
        let params = argon2::Params::new(8, 1, 1, None).expect("valid parameters");
        let argon2 =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        argon2
            .hash_password_with_salt(b"secret-pw", b"cim-test-salt-16")
            .expect("hashes")
            .to_string()
    })
    .clone()
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
    store: Arc<dyn RouteStore>,
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
    /// How many connections an `everyone` delivery reaches here (the fake has none to count).
    pub everyone: AtomicU64,
    /// While set, kick and presence calls are taken but never answered (a wedged server).
    pub stalled: AtomicBool,
    /// While set, pushes are held (recorded as `held`) until [`Recorded::release`].
    pub hold_pushes: AtomicBool,
    /// Pushes being held now.
    pub held: AtomicU64,
    /// Signalled after each push is recorded.
    pub pushed: tokio::sync::Notify,
    /// Signalled when a push starts being held; pushes are let go by [`Recorded::release`].
    pub holding: tokio::sync::Notify,
    released: tokio::sync::Notify,
}

impl Recorded {
    /// Waits until at least one push was recorded.
    pub async fn first_push(&self) {
        loop {
            let pushed = self.pushed.notified();
            tokio::pin!(pushed);
            pushed.as_mut().enable();
            if !self.pushes.lock().unwrap().is_empty() {
                return;
            }
            pushed.await;
        }
    }

    /// Lets every held push go (and stops holding new ones).
    pub fn release(&self) {
        self.hold_pushes.store(false, Ordering::SeqCst);
        self.released.notify_waiters();
    }

    /// Waits forever while the server is stalled.
    async fn stall_if_asked(&self) {
        if self.stalled.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }
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
    if !cluster::authorized(&headers, &cim_common::secret::Keyring::single(&s.secret)) {
        return Err(cluster::unauthorized());
    }
    if s.recorded.hold_pushes.load(Ordering::SeqCst) {
        let released = s.recorded.released.notified();
        tokio::pin!(released);
        released.as_mut().enable();
        s.recorded.held.fetch_add(1, Ordering::SeqCst);
        s.recorded.holding.notify_waiters();
        if s.recorded.hold_pushes.load(Ordering::SeqCst) {
            released.await;
        }
        s.recorded.held.fetch_sub(1, Ordering::SeqCst);
    }
    let absent = s.recorded.absent.lock().unwrap().clone();
    let results = req
        .deliveries
        .iter()
        .map(|d| {
            if d.everyone {
                return DeliveryResult {
                    delivered: Vec::new(),
                    count: s.recorded.everyone.load(Ordering::SeqCst),
                };
            }
            let delivered: Vec<u64> = d
                .recipients
                .iter()
                .copied()
                .filter(|r| !absent.contains(r))
                .collect();
            DeliveryResult {
                count: delivered.len() as u64,
                delivered,
            }
        })
        .collect();
    s.recorded.pushes.lock().unwrap().push(req);
    s.recorded.pushed.notify_waiters();
    Ok(Protobuf(PushResponse { results }))
}

async fn fake_kick(
    State(s): State<FakeServer>,
    Protobuf(req): Protobuf<KickRequest>,
) -> Protobuf<KickResponse> {
    s.recorded.stall_if_asked().await;
    let kicked = req.user_ids.clone();
    s.recorded.kicks.lock().unwrap().push(req);
    Protobuf(KickResponse { kicked })
}

/// Everyone not `absent` is connected here (under a made-up session).
async fn fake_presence(
    State(s): State<FakeServer>,
    Protobuf(req): Protobuf<PresenceRequest>,
) -> Protobuf<PresenceResponse> {
    s.recorded.stall_if_asked().await;
    let absent = s.recorded.absent.lock().unwrap().clone();
    let connected = req
        .user_ids
        .into_iter()
        .filter(|u| !absent.contains(u))
        .map(|user_id| ConnectedUser {
            user_id,
            session: "fake".into(),
        })
        .collect();
    Protobuf(PresenceResponse {
        connected,
        online: 0,
    })
}

/// Starts a fake connection server's internal API on a free port; returns its registry
/// entry and what it records. It stops with the test's runtime.
pub async fn fake_server(id: &str, secret: &str) -> (ServiceInfo, Arc<Recorded>) {
    let recorded = Arc::new(Recorded::default());
    let app = Router::new()
        .route("/internal/push", post(fake_push))
        .route("/internal/kick", post(fake_kick))
        .route("/internal/presence", post(fake_presence))
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
