//! What every request handler shares: configuration, backends, the live-server list from the
//! registry watch, token signer, internal-call client, the round-robin counter, and the
//! in-memory fan-out of presence events.
//!
//! Architecture invariant: nothing here caches business state. Two route instances answer
//! any request identically; the only per-instance values are the registry watch (a cache of
//! etcd, updated by etcd), the round-robin position (which only spreads load), the event
//! hub (a pass-through of the store's event stream, holding nothing a subscriber cannot
//! re-read from the store), and the known users (positive answers about accounts, which
//! never change once created: see [`crate::known_users`]).

use crate::{
    assign::Assigner, config::RouteConfig, events::EventHub, known_users::KnownUsers,
    metrics::RouteMetrics, password::Passwords, throttle::LoginThrottle,
};
use cim_common::{
    cluster::ClusterClient,
    registry::{self, Members, MembersRx, ServiceInfo},
    store::RouteStore,
    token::TokenSigner,
};
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// Cheap to clone: one shared [`Arc`].
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    id: String,
    config: RouteConfig,
    store: Arc<dyn RouteStore>,
    servers: MembersRx,
    signer: TokenSigner,
    cluster: ClusterClient,
    passwords: Passwords,
    throttle: LoginThrottle,
    assigner: Assigner,
    events: EventHub,
    known_users: KnownUsers,
    metrics: RouteMetrics,
    /// What `/metrics` encodes: `metrics` and the backends' error counters.
    registry: Registry,
}

impl AppState {
    /// `id` is this instance's id; `servers` the watched list of live connection servers.
    pub fn new(
        id: String,
        config: RouteConfig,
        store: Arc<dyn RouteStore>,
        servers: MembersRx,
    ) -> Self {
        let mut registry = Registry::default();
        let metrics = RouteMetrics::new(&mut registry);
        Self::with_metrics(id, config, store, servers, metrics, registry)
    }

    /// [`AppState::new`] with metrics registered in `registry` already.
    pub fn with_metrics(
        id: String,
        config: RouteConfig,
        store: Arc<dyn RouteStore>,
        servers: MembersRx,
        metrics: RouteMetrics,
        registry: Registry,
    ) -> Self {
        // `validate` checked the parameters; fall back to the defaults rather than panic.
        let params = config.password_params().unwrap_or_default();
        let passwords = Passwords::with_params(params, config.password_workers())
            .with_queue_limit(config.password_queue);
        let throttle = LoginThrottle::new(
            config.login_rate_per_addr,
            config.login_burst_per_addr,
            config.login_failures_per_name,
        );
        let keys = config.keys();
        let signer = TokenSigner::with_keys(keys.clone());
        let cluster = ClusterClient::with_keys(keys, config.push_timeout());
        Self {
            inner: Arc::new(Inner {
                id,
                config,
                store,
                servers,
                signer,
                cluster,
                passwords,
                throttle,
                assigner: Assigner::default(),
                events: EventHub::new(),
                known_users: KnownUsers::default(),
                metrics,
                registry,
            }),
        }
    }

    pub fn id(&self) -> &str {
        &self.inner.id
    }

    pub fn config(&self) -> &RouteConfig {
        &self.inner.config
    }

    pub fn store(&self) -> &dyn RouteStore {
        self.inner.store.as_ref()
    }

    pub fn signer(&self) -> &TokenSigner {
        &self.inner.signer
    }

    pub fn cluster(&self) -> &ClusterClient {
        &self.inner.cluster
    }

    /// This instance's fan-out of presence events (fed by `events::run_tail`).
    pub fn events(&self) -> &EventHub {
        &self.inner.events
    }

    /// Accounts known to exist (receiver checks skip the store for them).
    pub fn known_users(&self) -> &KnownUsers {
        &self.inner.known_users
    }

    /// This instance's metrics.
    pub fn metrics(&self) -> &RouteMetrics {
        &self.inner.metrics
    }

    /// The registry `/metrics` encodes.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    pub fn passwords(&self) -> &Passwords {
        &self.inner.passwords
    }

    pub fn throttle(&self) -> &LoginThrottle {
        &self.inner.throttle
    }

    /// A snapshot of the live servers (sorted by id). Take one per request and use it for
    /// every liveness decision of that request, so they agree with each other.
    pub fn servers(&self) -> Members {
        self.inner.servers.borrow().clone()
    }

    /// The server a new login is assigned: the next reachable one in round-robin order,
    /// from `servers` (see [`crate::assign`]).
    pub async fn pick_server(&self, servers: &Members) -> Option<ServiceInfo> {
        self.inner.assigner.pick(servers, &self.inner.cluster).await
    }
}

impl cim_common::metrics::Source for AppState {
    fn registry(&self) -> &Registry {
        &self.inner.registry
    }
}

/// The live server `id` in `servers`, if it is there.
pub fn live_server<'a>(servers: &'a Members, id: &str) -> Option<&'a ServiceInfo> {
    servers
        .binary_search_by(|m| m.id.as_str().cmp(id))
        .ok()
        .and_then(|i| servers.get(i))
}

/// Whether server `id` is live in `servers`.
pub fn is_live(servers: &Members, id: &str) -> bool {
    registry::contains(servers, id)
}
