//! Test doubles for the crate's unit tests: an in-memory [`StateStore`] with the semantics
//! the route relies on, a fake connection server that records pushes and kicks, and an
//! [`AppState`] built on them. (Real Redis / etcd are exercised by the end-to-end tests.)

use crate::{config::RouteConfig, state::AppState};
use async_trait::async_trait;
use axum::{extract::State, http::HeaderMap, response::Response, routing::post, Router};
use cim_common::{
    cluster::{self, Protobuf},
    keys,
    pb::cluster::{DeliveryResult, KickRequest, KickResponse, PushRequest, PushResponse},
    registry::{
        Members, MembersRx, Registration, Registry, RegistryError, RegistryResult, ServiceInfo,
        ServiceKind,
    },
    store::*,
};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use tokio::sync::watch;

#[derive(Default)]
struct Mem {
    next_id: u64,
    names: HashMap<String, u64>,
    users: HashMap<u64, (String, String)>,
    slots: HashMap<u64, String>,
    routes: BTreeMap<u64, RouteEntry>,
    online: BTreeSet<String>,
}

/// In-memory store. `fail` makes every call answer `Unavailable`; `hang` makes
/// `user_by_name` never answer (signalling `entered` when a call gets stuck).
#[derive(Default)]
pub struct MemStore {
    mem: Mutex<Mem>,
    pub fail: AtomicBool,
    pub hang: AtomicBool,
    pub entered: tokio::sync::Notify,
    pub scans: AtomicUsize,
    pub route_lookups: AtomicUsize,
}

impl MemStore {
    fn mem(&self) -> StoreResult<std::sync::MutexGuard<'_, Mem>> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("test double set to fail".into()));
        }
        Ok(self.mem.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Creates a user with a placeholder hash (no login possible) and returns its id.
    pub fn add_user(&self, name: &str) -> u64 {
        let mut m = self.mem().unwrap();
        m.next_id += 1;
        let id = m.next_id;
        m.names.insert(name.into(), id);
        m.users
            .insert(id, (name.into(), "$argon2id$placeholder".into()));
        id
    }

    /// Marks `user_id` connected to `server_id` (slot, route and online index).
    pub fn connect(&self, user_id: u64, server_id: &str) {
        let mut m = self.mem().unwrap();
        let name = m.users[&user_id].0.clone();
        let session = format!("s{user_id}");
        m.slots
            .insert(user_id, keys::attached_slot(&session, server_id));
        m.routes.insert(
            user_id,
            RouteEntry {
                user_id,
                server_id: server_id.into(),
                session,
            },
        );
        m.online.insert(keys::online_member(&name, user_id));
    }

    pub fn has_route(&self, user_id: u64) -> bool {
        self.mem().unwrap().routes.contains_key(&user_id)
    }
}

#[async_trait]
impl StateStore for MemStore {
    async fn create_user(&self, name: &str, password_hash: &str) -> StoreResult<Option<u64>> {
        let mut m = self.mem()?;
        if m.names.contains_key(name) {
            return Ok(None);
        }
        m.next_id += 1;
        let id = m.next_id;
        m.names.insert(name.into(), id);
        m.users.insert(id, (name.into(), password_hash.into()));
        Ok(Some(id))
    }

    async fn user_by_name(&self, name: &str) -> StoreResult<Option<UserRecord>> {
        if self.hang.load(Ordering::SeqCst) {
            self.entered.notify_one();
            std::future::pending::<()>().await;
        }
        let m = self.mem()?;
        Ok(m.names.get(name).map(|&id| UserRecord {
            id,
            name: m.users[&id].0.clone(),
            password_hash: m.users[&id].1.clone(),
        }))
    }

    async fn user_name(&self, id: u64) -> StoreResult<Option<String>> {
        Ok(self.mem()?.users.get(&id).map(|u| u.0.clone()))
    }

    async fn claim_login(
        &self,
        user_id: u64,
        session: &str,
        _pending_ttl: Duration,
        is_live: IsLive<'_>,
    ) -> StoreResult<ClaimOutcome> {
        let mut m = self.mem()?;
        if let Some(current) = m.slots.get(&user_id) {
            match keys::parse_slot(current) {
                (_, None) => return Ok(ClaimOutcome::Held { server: None }),
                (_, Some(server)) if is_live(server) => {
                    return Ok(ClaimOutcome::Held {
                        server: Some(server.to_string()),
                    })
                }
                _ => {}
            }
        }
        m.slots.insert(user_id, session.into());
        Ok(ClaimOutcome::Claimed)
    }

    async fn session_active(&self, user_id: u64, session: &str) -> StoreResult<bool> {
        Ok(self
            .mem()?
            .slots
            .get(&user_id)
            .is_some_and(|v| keys::parse_slot(v).0 == session))
    }

    async fn release_login(&self, user_id: u64, session: &str) -> StoreResult<Option<String>> {
        let mut m = self.mem()?;
        let Some(v) = m.slots.get(&user_id).cloned() else {
            return Ok(None);
        };
        let (s, server) = keys::parse_slot(&v);
        if s != session {
            return Ok(None);
        }
        let server = server.map(str::to_string);
        m.slots.remove(&user_id);
        Ok(server)
    }

    async fn attach(
        &self,
        user_id: u64,
        name: &str,
        session: &str,
        server_id: &str,
    ) -> StoreResult<AttachOutcome> {
        let mut m = self.mem()?;
        if m.slots.get(&user_id).map(String::as_str) != Some(session) {
            return Ok(AttachOutcome::SessionInvalid);
        }
        m.slots
            .insert(user_id, keys::attached_slot(session, server_id));
        m.routes.insert(
            user_id,
            RouteEntry {
                user_id,
                server_id: server_id.into(),
                session: session.into(),
            },
        );
        m.online.insert(keys::online_member(name, user_id));
        Ok(AttachOutcome::Attached)
    }

    async fn detach(
        &self,
        user_id: u64,
        name: &str,
        session: &str,
        server_id: &str,
    ) -> StoreResult<()> {
        let mut m = self.mem()?;
        if m.routes
            .get(&user_id)
            .is_some_and(|r| r.session == session && r.server_id == server_id)
        {
            m.routes.remove(&user_id);
            m.online.remove(&keys::online_member(name, user_id));
        }
        if m.slots.get(&user_id) == Some(&keys::attached_slot(session, server_id)) {
            m.slots.remove(&user_id);
        }
        Ok(())
    }

    async fn routes(&self, user_ids: &[u64]) -> StoreResult<Vec<Option<RouteEntry>>> {
        self.route_lookups.fetch_add(1, Ordering::SeqCst);
        let m = self.mem()?;
        Ok(user_ids
            .iter()
            .map(|id| m.routes.get(id).cloned())
            .collect())
    }

    /// The cursor is an offset into the id-ordered routes, plus one (0 means done).
    async fn scan_routes(&self, cursor: u64, count: usize) -> StoreResult<(u64, Vec<RouteEntry>)> {
        self.scans.fetch_add(1, Ordering::SeqCst);
        let m = self.mem()?;
        let start = cursor.saturating_sub(1) as usize;
        let page: Vec<RouteEntry> = m.routes.values().skip(start).take(count).cloned().collect();
        let end = start + page.len();
        let next = if end < m.routes.len() {
            end as u64 + 1
        } else {
            0
        };
        Ok((next, page))
    }

    async fn online_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<OnlineEntry>> {
        let m = self.mem()?;
        Ok(m.online
            .iter()
            .filter(|member| member.starts_with(prefix))
            .filter(|member| after.is_none_or(|a| member.as_str() > a))
            .take(limit)
            .filter_map(|member| {
                let (name, id) = keys::parse_online_member(member)?;
                Some(OnlineEntry {
                    user_id: id,
                    name: name.into(),
                    cursor: member.clone(),
                })
            })
            .collect())
    }

    async fn remove_stale_route(&self, entry: &RouteEntry) -> StoreResult<()> {
        let mut m = self.mem()?;
        if m.routes.get(&entry.user_id) == Some(entry) {
            m.routes.remove(&entry.user_id);
            if let Some((name, _)) = m.users.get(&entry.user_id).cloned() {
                m.online.remove(&keys::online_member(&name, entry.user_id));
            }
        }
        Ok(())
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
    store: Arc<MemStore>,
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

/// In-memory registry: members by kind, published through watch channels.
pub struct MemRegistry {
    members: Arc<Mutex<HashMap<&'static str, Vec<ServiceInfo>>>>,
    servers: watch::Sender<Members>,
}

impl Default for MemRegistry {
    fn default() -> Self {
        Self {
            members: Arc::default(),
            servers: watch::channel(members(vec![])).0,
        }
    }
}

impl MemRegistry {
    pub fn list(&self, kind: ServiceKind) -> Vec<ServiceInfo> {
        self.members
            .lock()
            .unwrap()
            .get(kind.as_str())
            .cloned()
            .unwrap_or_default()
    }

    fn publish(&self) {
        self.servers
            .send_replace(members(self.list(ServiceKind::Server)));
    }
}

struct MemRegistration {
    members: Arc<Mutex<HashMap<&'static str, Vec<ServiceInfo>>>>,
    kind: ServiceKind,
    id: String,
}

#[async_trait]
impl Registration for MemRegistration {
    async fn deregister(self: Box<Self>) -> RegistryResult<()> {
        if let Some(list) = self.members.lock().unwrap().get_mut(self.kind.as_str()) {
            list.retain(|m| m.id != self.id);
        }
        Ok(())
    }
}

#[async_trait]
impl Registry for MemRegistry {
    async fn register(
        &self,
        kind: ServiceKind,
        info: &ServiceInfo,
        _ttl: Duration,
    ) -> RegistryResult<Box<dyn Registration>> {
        self.members
            .lock()
            .unwrap()
            .entry(kind.as_str())
            .or_default()
            .push(info.clone());
        self.publish();
        Ok(Box::new(MemRegistration {
            members: self.members.clone(),
            kind,
            id: info.id.clone(),
        }))
    }

    async fn watch(&self, kind: ServiceKind) -> RegistryResult<MembersRx> {
        match kind {
            ServiceKind::Server => Ok(self.servers.subscribe()),
            ServiceKind::Route => Err(RegistryError::Unavailable("not needed by tests".into())),
        }
    }
}
