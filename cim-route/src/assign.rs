//! Server assignment for logins: round-robin over the live servers of the registry watch,
//! skipping a server that cannot be reached.
//!
//! A server that crashed stays in the registry until its lease expires (up to
//! `registry_ttl_secs`); every client assigned to it meanwhile fails to connect and logs in
//! again. So before a server is handed out it must answer a presence count (an empty
//! `/internal/presence`, [`check`]): one internal round trip over the already open cim-rpc
//! connection (tens of microseconds, next to a login's argon2 hash and store calls). A
//! crashed server fails it at once: the call on its dead connection ends when the connection
//! closes, and a new connection is refused. A server that fails is skipped for [`DOWN_FOR`],
//! then checked again. When no server passes, the plain round-robin choice is made anyway
//! (the fault may be this route's own network), as before the check existed.

use crate::api::accounts::PRESENCE_PATH;
use cim_common::{
    cluster::ClusterClient,
    pb::cluster::{PresenceRequest, PresenceResponse},
    registry::{Members, ServiceInfo},
};
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex, MutexGuard, PoisonError,
    },
    time::{Duration, Instant},
};

/// How long a server that failed the check is skipped before it is checked again.
pub const DOWN_FOR: Duration = Duration::from_secs(2);
/// Deadline of one check: opening a connection on a LAN or loopback takes well under a
/// millisecond; a server this slow to accept is skipped like one that is down.
pub const CHECK_WITHIN: Duration = Duration::from_millis(500);
/// Most servers checked for one login (each failing check costs up to [`CHECK_WITHIN`]).
const MAX_CHECKS: usize = 3;

/// The round-robin position and the servers found unreachable.
#[derive(Default)]
pub struct Assigner {
    next: AtomicUsize,
    /// Server id → until when it is skipped.
    down: Mutex<HashMap<String, Instant>>,
}

impl Assigner {
    /// The next reachable server in round-robin order, from `servers`; `None` when there is
    /// none at all.
    pub async fn pick(&self, servers: &Members, cluster: &ClusterClient) -> Option<ServiceInfo> {
        if servers.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = servers.len();
        let mut checks = 0;
        for i in 0..n {
            let server = &servers[(start + i) % n];
            if self.is_down(&server.id) {
                continue;
            }
            // A server that advertises no internal address cannot be checked: trust it.
            if server.internal_addr.is_empty() {
                return Some(server.clone());
            }
            if checks == MAX_CHECKS {
                break;
            }
            checks += 1;
            if check(cluster, &server.internal_addr).await {
                return Some(server.clone());
            }
            tracing::warn!(server = %server.id, "server unreachable: not assigned for {DOWN_FOR:?}");
            self.mark_down(&server.id);
        }
        Some(servers[start % n].clone())
    }

    fn down(&self) -> MutexGuard<'_, HashMap<String, Instant>> {
        self.down.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_down(&self, id: &str) -> bool {
        self.down()
            .get(id)
            .is_some_and(|until| Instant::now() < *until)
    }

    fn mark_down(&self, id: &str) {
        let now = Instant::now();
        let mut down = self.down();
        // Bounded by the servers that failed within the last DOWN_FOR.
        down.retain(|_, until| now < *until);
        down.insert(id.to_string(), now + DOWN_FOR);
    }
}

/// Whether the server at `addr` answers a presence count within [`CHECK_WITHIN`]. A call
/// that fails fast (the connection was found closed) is made once more, on a new connection.
async fn check(cluster: &ClusterClient, addr: &str) -> bool {
    let deadline = tokio::time::Instant::now() + CHECK_WITHIN;
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let count = cluster
            .call_within::<_, PresenceResponse>(
                addr,
                PRESENCE_PATH,
                &PresenceRequest::default(),
                left,
            )
            .await;
        match count {
            Ok(_) => return true,
            Err(e) if e.is_refused() => return false,
            Err(e) => tracing::debug!(addr, error = %e, "server check failed"),
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fake_server, members, server};
    use cim_common::config::DEV_SECRET;

    /// A server whose internal port refuses connections (its process is gone).
    async fn dead(id: &str) -> ServiceInfo {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        ServiceInfo {
            internal_addr: addr,
            ..server(id)
        }
    }

    #[tokio::test]
    async fn a_server_that_refuses_connections_is_not_assigned() {
        let cluster = ClusterClient::new(DEV_SECRET, Duration::from_secs(5));
        let (a, _) = fake_server("server-a", DEV_SECRET).await;
        let (c, _) = fake_server("server-c", DEV_SECRET).await;
        let servers = members(vec![a, dead("server-b").await, c]);
        let assigner = Assigner::default();
        let mut picked = Vec::new();
        for _ in 0..9 {
            picked.push(assigner.pick(&servers, &cluster).await.unwrap().id);
        }
        assert!(!picked.iter().any(|id| id == "server-b"), "{picked:?}");
        // The live ones still share the logins.
        for live in ["server-a", "server-c"] {
            assert!(picked.iter().any(|id| id == live), "{picked:?}");
        }
    }

    #[tokio::test]
    async fn with_no_reachable_server_the_round_robin_choice_stands() {
        let cluster = ClusterClient::new(DEV_SECRET, Duration::from_secs(5));
        let servers = members(vec![dead("server-x").await]);
        let assigner = Assigner::default();
        assert_eq!(
            assigner.pick(&servers, &cluster).await.map(|s| s.id),
            Some("server-x".to_string())
        );
        assert!(assigner
            .pick(&members(Vec::new()), &cluster)
            .await
            .is_none());
    }
}
