//! Connecting to the production backends (Redis + etcd) from one config section shared by
//! every binary, or creating the in-memory pair of standalone mode.
//!
//! [`Backends`] also carries the error counters of its two backends ([`BackendErrors`]):
//! every failed Redis call (through [`crate::store::counting::Counting`]) and every failed
//! etcd call (inside [`EtcdRegistry`]) is counted there, and the server or route that uses
//! the backends exports them as `cim_backend_errors_total{backend}`.

use crate::{
    metrics::Labels,
    registry::{EtcdRegistry, MemoryRegistry, Registry},
    store::{
        counting::{CountErrors, Counting},
        HistoryLimits, InboxLimits, MemoryStore, RedisStore, RouteStore, ServerStore, StateStore,
        DEFAULT_EVENTS_MAX_LEN,
    },
};
use prometheus_client::metrics::{counter::Counter, family::Family};
use serde::{Deserialize, Serialize};
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

/// Where the shared state and the registry live.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct BackendConfig {
    /// Redis URL: one Redis (`redis://127.0.0.1:6379/0`) or a Redis Cluster by its seed
    /// nodes (`redis+cluster://10.0.0.1:6379,10.0.0.2:6379`, optionally `:password@` before
    /// the list). Every process of one cim cluster must name the same deployment.
    pub redis_url: String,
    /// etcd endpoints, e.g. `["http://127.0.0.1:2379"]`.
    pub etcd_endpoints: Vec<String>,
    /// Prefix of every Redis key (`{prefix}:...`) and etcd key (`/{prefix}/...`): clusters
    /// (or test runs) sharing one Redis / etcd keep apart by prefix.
    pub prefix: String,
    /// Deadline of every Redis / etcd call.
    pub timeout_ms: u64,
    /// Unacked private messages kept per user; one more drops the oldest.
    pub inbox_max_messages: usize,
    /// Age after which a stored message is no longer delivered (seconds).
    pub inbox_max_age_secs: u64,
    /// Messages kept per conversation (private pair or group) for history; one more drops
    /// the oldest.
    pub history_max_messages: usize,
    /// Age after which a conversation's message leaves its history (seconds).
    pub history_max_age_secs: u64,
    /// Messages before their join that new group members may read (0: from their join on).
    pub history_before_join: u64,
    /// Presence events kept in the stream (Redis trims approximately: up to one stream node,
    /// by default 100 events, more). A subscriber that is further behind misses the oldest.
    pub events_max_len: usize,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            redis_url: "redis://127.0.0.1:6379/0".into(),
            etcd_endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "cim".into(),
            timeout_ms: 3000,
            inbox_max_messages: InboxLimits::default().max_messages,
            inbox_max_age_secs: InboxLimits::default().max_age.as_secs(),
            history_max_messages: HistoryLimits::default().max_messages,
            history_max_age_secs: HistoryLimits::default().max_age.as_secs(),
            history_before_join: HistoryLimits::default().before_join,
            events_max_len: DEFAULT_EVENTS_MAX_LEN,
        }
    }
}

impl BackendConfig {
    pub fn validate(&self) -> Result<(), String> {
        if let Err(e) = crate::store::RedisTarget::parse(&self.redis_url) {
            return Err(format!("redis_url: {e}"));
        }
        if self.etcd_endpoints.is_empty() {
            return Err("etcd_endpoints must list at least one endpoint".into());
        }
        if !crate::ids::valid_instance_name(&self.prefix) {
            return Err("prefix must be 1-64 characters of [A-Za-z0-9_.-]".into());
        }
        if self.timeout_ms == 0 {
            return Err("timeout_ms must be positive".into());
        }
        if !(1..=1_000_000).contains(&self.inbox_max_messages) {
            return Err("inbox_max_messages must be 1 ..= 1000000".into());
        }
        if self.inbox_max_age_secs == 0 {
            return Err("inbox_max_age_secs must be positive".into());
        }
        if !(1..=10_000_000).contains(&self.history_max_messages) {
            return Err("history_max_messages must be 1 ..= 10000000".into());
        }
        if self.history_max_age_secs == 0 {
            return Err("history_max_age_secs must be positive".into());
        }
        if self.history_before_join > 100_000 {
            return Err("history_before_join must be 0 ..= 100000".into());
        }
        if !(1..=10_000_000).contains(&self.events_max_len) {
            return Err("events_max_len must be 1 ..= 10000000".into());
        }
        Ok(())
    }

    pub fn inbox_limits(&self) -> InboxLimits {
        InboxLimits {
            max_messages: self.inbox_max_messages,
            max_age: Duration::from_secs(self.inbox_max_age_secs),
        }
    }

    pub fn history_limits(&self) -> HistoryLimits {
        HistoryLimits {
            max_messages: self.history_max_messages,
            max_age: Duration::from_secs(self.history_max_age_secs),
            before_join: self.history_before_join,
        }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// Name of the backend error counter family.
pub const BACKEND_ERRORS: &str = "cim_backend_errors";

/// Label values of `cim_backend_errors_total{backend}`.
pub mod backend_label {
    pub const REDIS: &str = "redis";
    pub const ETCD: &str = "etcd";
}

/// Failed calls to the backends, by backend (`cim_backend_errors_total{backend}`). Clones
/// share the counts.
#[derive(Clone, Debug, Default)]
pub struct BackendErrors {
    family: Family<Labels, Counter>,
    /// Exported by a registry already (see [`BackendErrors::register`]).
    registered: Arc<AtomicBool>,
}

impl BackendErrors {
    /// The counter of `backend` (one of [`backend_label`]), created now, so it is exported at
    /// zero before the first error.
    pub fn counter(&self, backend: &'static str) -> Counter {
        self.family.get_or_create_owned(&vec![("backend", backend)])
    }

    /// Exports the counters in `registry`. Only the first registry of a set of clones gets
    /// them: a standalone process shares one [`Backends`] between its route and its server,
    /// and serves both registries in one answer, where a family may appear once. (In a
    /// cluster every process connects its own.)
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        if !self.registered.swap(true, Ordering::SeqCst) {
            registry.register(
                BACKEND_ERRORS,
                "Failed calls to a backend (Redis or etcd), timeouts included",
                self.family.clone(),
            );
        }
    }
}

/// The two backends a cim process uses.
#[derive(Clone)]
pub struct Backends {
    /// The whole store: a process hands each of its roles the part it uses
    /// ([`Backends::server_store`], [`Backends::route_store`]).
    pub store: Arc<dyn StateStore>,
    pub registry: Arc<dyn Registry>,
    /// The error counters of `store` and `registry`.
    pub errors: BackendErrors,
}

impl Backends {
    /// Backends without error counting (tests and tools with backends of their own).
    pub fn new(store: Arc<dyn StateStore>, registry: Arc<dyn Registry>) -> Self {
        Self {
            store,
            registry,
            errors: BackendErrors::default(),
        }
    }

    /// What a connection server may do to the store (sessions and inboxes of its
    /// connections), the same store.
    pub fn server_store(&self) -> Arc<dyn ServerStore> {
        self.store.clone()
    }

    /// What a route may do to the store (everything but a connection's side), the same store.
    pub fn route_store(&self) -> Arc<dyn RouteStore> {
        self.store.clone()
    }

    /// A fresh in-memory store and registry, for processes that run every cim role inside
    /// themselves (standalone mode). Clones share them: give each role a clone. (They never
    /// fail, so no error series is exported.)
    pub fn memory() -> Self {
        Self::new(
            Arc::new(MemoryStore::new()),
            Arc::new(MemoryRegistry::new()),
        )
    }

    /// Connects to Redis and etcd, failing fast with a message naming the one that is missing.
    /// Every later failed call to either is counted in [`Backends::errors`].
    pub async fn connect(config: &BackendConfig) -> Result<Self, String> {
        let errors = BackendErrors::default();
        let store = RedisStore::connect(&config.redis_url, &config.prefix, config.timeout())
            .await
            .map_err(|e| format!("redis at {}: {e}", config.redis_url))?
            .with_inbox_limits(config.inbox_limits())
            .with_history_limits(config.history_limits())
            .with_events_max_len(config.events_max_len);
        let registry = EtcdRegistry::connect(
            &config.etcd_endpoints,
            &format!("/{}", config.prefix),
            config.timeout(),
        )
        .await
        .map_err(|e| format!("etcd at {:?}: {e}", config.etcd_endpoints))?
        .with_errors(errors.counter(backend_label::ETCD));
        let store = Counting::new(
            store,
            CountErrors::new(errors.counter(backend_label::REDIS)),
        );
        Ok(Self {
            store: Arc::new(store),
            registry: Arc::new(registry),
            errors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_max_len_is_bounded() {
        let ok = BackendConfig::default();
        assert_eq!(ok.events_max_len, 100_000);
        assert_eq!(ok.validate(), Ok(()));
        for bad in [0, 10_000_001] {
            let config = BackendConfig {
                events_max_len: bad,
                ..BackendConfig::default()
            };
            assert!(config.validate().unwrap_err().contains("events_max_len"));
        }
        let edge = BackendConfig {
            events_max_len: 10_000_000,
            ..BackendConfig::default()
        };
        assert_eq!(edge.validate(), Ok(()));
    }

    #[test]
    fn redis_urls_name_one_redis_or_a_cluster() {
        for good in [
            "redis://127.0.0.1:6379/0",
            "redis+cluster://10.0.0.1:7000,10.0.0.2:7000",
        ] {
            let config = BackendConfig {
                redis_url: good.into(),
                ..BackendConfig::default()
            };
            assert_eq!(config.validate(), Ok(()), "{good}");
        }
        for bad in [
            "localhost:6379",
            "redis+cluster://",
            "redis+cluster://h:1/0",
        ] {
            let config = BackendConfig {
                redis_url: bad.into(),
                ..BackendConfig::default()
            };
            let err = config.validate().unwrap_err();
            assert!(err.starts_with("redis_url: "), "{err}");
        }
    }
}
