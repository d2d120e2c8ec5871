//! Connecting to the production backends (Redis + etcd) from one config section shared by
//! every binary, or creating the in-memory pair of standalone mode.

use crate::{
    registry::{EtcdRegistry, MemoryRegistry, Registry},
    store::{InboxLimits, MemoryStore, RedisStore, StateStore, DEFAULT_EVENTS_MAX_LEN},
};
use serde::{Deserialize, Serialize};
use std::{sync::Arc, time::Duration};

/// Where the shared state and the registry live.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct BackendConfig {
    /// Redis URL, e.g. `redis://127.0.0.1:6379/0`.
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
            events_max_len: DEFAULT_EVENTS_MAX_LEN,
        }
    }
}

impl BackendConfig {
    pub fn validate(&self) -> Result<(), String> {
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

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// The two backends a cim process uses.
#[derive(Clone)]
pub struct Backends {
    pub store: Arc<dyn StateStore>,
    pub registry: Arc<dyn Registry>,
}

impl Backends {
    /// A fresh in-memory store and registry, for processes that run every cim role inside
    /// themselves (standalone mode). Clones share them: give each role a clone.
    pub fn memory() -> Self {
        Self {
            store: Arc::new(MemoryStore::new()),
            registry: Arc::new(MemoryRegistry::new()),
        }
    }

    /// Connects to Redis and etcd, failing fast with a message naming the one that is missing.
    pub async fn connect(config: &BackendConfig) -> Result<Self, String> {
        let store = RedisStore::connect(&config.redis_url, &config.prefix, config.timeout())
            .await
            .map_err(|e| format!("redis at {}: {e}", config.redis_url))?
            .with_inbox_limits(config.inbox_limits())
            .with_events_max_len(config.events_max_len);
        let registry = EtcdRegistry::connect(
            &config.etcd_endpoints,
            &format!("/{}", config.prefix),
            config.timeout(),
        )
        .await
        .map_err(|e| format!("etcd at {:?}: {e}", config.etcd_endpoints))?;
        Ok(Self {
            store: Arc::new(store),
            registry: Arc::new(registry),
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
}
