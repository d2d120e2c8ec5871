//! Service registry: which connection servers and routes are alive, and where.
//!
//! [`Registry`] is the interface; [`etcd::EtcdRegistry`] is the production implementation and
//! [`memory::MemoryRegistry`] the one of standalone mode and unit tests.
//! A member registers with a TTL lease it keeps alive; watchers get the whole live list through
//! a [`tokio::sync::watch`] channel, updated from a prefix watch (never polled per request).
//! A member that dies stops renewing and its key disappears when the lease expires (in memory,
//! at once: see [`memory`]).

pub mod etcd;
pub mod memory;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::{sync::Arc, time::Duration};
use tokio::sync::watch;

pub use self::etcd::EtcdRegistry;
pub use self::memory::MemoryRegistry;

/// What kind of member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceKind {
    Server,
    Route,
}

impl ServiceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceKind::Server => "servers",
            ServiceKind::Route => "routes",
        }
    }
}

/// A registered member and its advertised addresses (`host:port`; empty when not applicable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ServiceInfo {
    pub id: String,
    /// Connection server: client TCP address.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tcp_addr: String,
    /// Connection server: client WebSocket address (path `/ws`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ws_addr: String,
    /// Connection server: client TLS address (the TCP protocol over TLS), if it has one.
    /// Absent in entries of older servers.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tls_addr: String,
    /// Connection server: client WebSocket-over-TLS address (`wss://…/ws`), if it has one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub wss_addr: String,
    /// Connection server: internal API (pushes from routes).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub internal_addr: String,
    /// Route: HTTP API (public and internal endpoints).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub http_addr: String,
}

/// The live members of one kind, sorted by id.
pub type Members = Arc<Vec<ServiceInfo>>;

/// Live-member list receiver.
pub type MembersRx = watch::Receiver<Members>;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry unavailable: {0}")]
    Unavailable(String),
}

pub type RegistryResult<T> = Result<T, RegistryError>;

/// A live registration. Dropping it stops renewing (the key expires with the lease: what a
/// crash looks like; in memory it goes at once); [`Registration::deregister`] removes it at
/// once (a clean shutdown).
#[async_trait]
pub trait Registration: Send + Sync {
    async fn deregister(self: Box<Self>) -> RegistryResult<()>;
}

#[async_trait]
pub trait Registry: Send + Sync + 'static {
    async fn register(
        &self,
        kind: ServiceKind,
        info: &ServiceInfo,
        ttl: Duration,
    ) -> RegistryResult<Box<dyn Registration>>;

    /// The live list of `kind`, kept current in the background until every receiver is gone.
    /// The first value is loaded before this returns.
    async fn watch(&self, kind: ServiceKind) -> RegistryResult<MembersRx>;
}

/// Whether `id` is in the list.
pub fn contains(members: &Members, id: &str) -> bool {
    members.binary_search_by(|m| m.id.as_str().cmp(id)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_addresses_are_optional_both_ways() {
        // An entry of a server from before TLS: no tls_addr / wss_addr.
        let old: ServiceInfo =
            serde_json::from_str(r#"{"id":"s1","tcp_addr":"h:9000","ws_addr":"h:9001"}"#).unwrap();
        assert_eq!((old.tls_addr.as_str(), old.wss_addr.as_str()), ("", ""));
        // Without TLS nothing new is written, so older readers see what they always saw.
        let json = serde_json::to_string(&old).unwrap();
        assert!(!json.contains("tls") && !json.contains("wss"), "{json}");
        let new = ServiceInfo {
            tls_addr: "h:9443".into(),
            wss_addr: "h:9444".into(),
            ..old
        };
        let back: ServiceInfo =
            serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
        assert_eq!(back, new);
    }
}
