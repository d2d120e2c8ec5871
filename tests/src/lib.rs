//! The cim testkit: real backends for integration and end-to-end tests.
//!
//! Integration tests in this crate (`tests/tests/*.rs`) run against **real `redis-server` and
//! `etcd` processes**, started through this one helper and never any other way. The rules:
//!
//! - **Own processes, free ports.** Each test starts its own [`Infra`] (or just a [`Redis`] /
//!   an [`Etcd`]): ~50–400 ms. Nothing is shared between tests, so tests stay independent and
//!   run in parallel. Ports are picked by binding `127.0.0.1:0`; no port is ever fixed. When
//!   another process takes the port before ours binds it, ours exits and the start is retried
//!   on fresh ports; readiness is checked against *our* pid (Redis `INFO`) or member name
//!   (etcd), so a neighbour's server is never mistaken for ours.
//! - **Nothing leaks.** Every process is owned by a [`ChildGuard`] that SIGKILLs and reaps it on
//!   drop — also when the test panics, and also outside an async runtime. Children run under
//!   `setpriv --pdeathsig KILL`, so even a test binary killed without unwinding takes them down.
//!   Each process gets a temporary directory (data, log) held by its struct and removed on drop.
//! - **Logs in files.** stdout/stderr go to `redis.log` / `etcd.log` in that directory. A start
//!   failure reports the log tail; a struct dropped during a panic prints its log tail (the test
//!   harness shows it for the failing test only).
//! - **Every wait has a deadline.** Starts wait at most 10–15 s. Where no event exists (a port
//!   accepting, a key expiring), poll with [`wait_until`] (every 20 ms until a deadline); where
//!   an event exists (a `watch` channel, a stream), await it under `tokio::time::timeout`.
//!   Never sleep for a guessed duration.
//! - **Keys apart.** Each test also uses its own [`unique_prefix`] for Redis and etcd keys.
//!
//! Missing binaries fail with the Debian package to install (`redis-server`, `etcd-server`);
//! `CIM_TEST_REDIS_SERVER` / `CIM_TEST_ETCD` override the binary paths.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let infra = cim_tests::Infra::start().await?;
//! let config = infra.backend_config(&cim_tests::unique_prefix());
//! let backends = cim_common::backend::Backends::connect(&config)
//!     .await
//!     .map_err(anyhow::Error::msg)?;
//! # drop(backends); Ok(()) }
//! ```
//!
//! Modules: [`process`] (child guard and helpers); the Redis and etcd starters are re-exported
//! at the root ([`Redis`], [`RedisCluster`]: a real Redis Cluster of `redis-server
//! --cluster-enabled yes` nodes joined by `redis-cli --cluster create`; [`RedisNodes`]: either,
//! behind one type, with [`RedisConn`] for raw looks at keys); [`etcd_cluster`] runs a real
//! multi-member etcd cluster ([`EtcdCluster`]: kill and restart members, find the leader) and
//! holds [`EtcdNodes`], the etcd of an [`Infra`] (one process or a cluster); [`cluster`] starts
//! cim servers and routes in-process on top of an [`Infra`]; [`tls`] makes a test CA and server
//! certificates for the TLS tests; [`docs`] reads and runs the shell examples of README.md.

pub mod bin_node;
pub mod cluster;
pub mod docs;
pub mod etcd_cluster;
pub mod process;
pub mod redis_cluster;
pub mod redis_nodes;
pub mod tls;
pub mod webhook;

mod etcd_server;
mod redis_server;

pub use bin_node::{RouteProcess, ServerProcess};
pub use etcd_cluster::EtcdCluster;
pub use etcd_cluster::EtcdNodes;
pub use etcd_server::Etcd;
pub use process::ChildGuard;
pub use redis_cluster::{RedisCluster, RedisClusterOptions};
pub use redis_nodes::{RedisConn, RedisKind, RedisNodes};
pub use redis_server::{Redis, RedisOptions};

use cim_common::backend::BackendConfig;
use std::{
    future::Future,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// Interval of [`wait_until`].
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `condition` every [`POLL_INTERVAL`] until it returns `true`, or fails after
/// `deadline` (total, including time spent inside `condition`) with an error naming `what`.
/// For conditions no event signals (a port accepting, a key expiring); await events directly.
pub async fn wait_until<F, Fut>(
    what: &str,
    deadline: Duration,
    mut condition: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    let end = start + deadline;
    let polling = async {
        loop {
            if condition().await {
                return;
            }
            tokio::time::sleep_until((tokio::time::Instant::now() + POLL_INTERVAL).min(end)).await;
        }
    };
    tokio::time::timeout_at(end, polling)
        .await
        .map_err(|_| anyhow::anyhow!("timed out after {deadline:?} waiting for {what}"))
}

/// A key prefix unique to the caller (process id, a counter, random bits), valid as
/// [`BackendConfig::prefix`] (`[A-Za-z0-9_.-]`, at most 64 characters).
pub fn unique_prefix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("t{}-{n}-{:08x}", std::process::id(), rand::random::<u32>())
}

/// The ids of a registry list, in its order.
pub fn member_ids(list: &cim_common::registry::Members) -> Vec<String> {
    list.iter().map(|s| s.id.clone()).collect()
}

/// Awaits a registry watch's updates (no polling) until `pred` holds for its list, within
/// `deadline`; the error names `what` and the last list.
pub async fn wait_members(
    rx: &mut cim_common::registry::MembersRx,
    what: &str,
    deadline: Duration,
    pred: impl Fn(&cim_common::registry::Members) -> bool,
) -> anyhow::Result<cim_common::registry::Members> {
    let wait = async {
        loop {
            {
                let current = rx.borrow_and_update();
                if pred(&current) {
                    return Ok(current.clone());
                }
            }
            rx.changed()
                .await
                .map_err(|_| anyhow::anyhow!("watch closed while waiting for {what}"))?;
        }
    };
    tokio::time::timeout(deadline, wait).await.map_err(|_| {
        anyhow::anyhow!(
            "timed out after {deadline:?} waiting for {what}; list is {:?}",
            member_ids(&rx.borrow())
        )
    })?
}

/// A Redis (one server or a cluster: [`RedisNodes`]) and an etcd (one process or a cluster:
/// [`EtcdNodes`]) for one test.
#[derive(Debug)]
pub struct Infra {
    pub redis: RedisNodes,
    pub etcd: EtcdNodes,
}

impl Infra {
    /// Starts both (concurrently) and waits until both answer.
    pub async fn start() -> anyhow::Result<Infra> {
        Self::start_on(RedisKind::default(), 1).await
    }

    /// Starts both, Redis with `options` (e.g. AOF on for kill/restart tests).
    pub async fn start_with(options: RedisOptions) -> anyhow::Result<Infra> {
        Self::start_on(RedisKind::Single(options), 1).await
    }

    /// Starts both, Redis as `kind` (one server or a cluster) and etcd with `etcd_members`
    /// members (1: one [`Etcd`]; more: an [`EtcdCluster`], for tests of a member's death).
    pub async fn start_on(kind: RedisKind, etcd_members: usize) -> anyhow::Result<Infra> {
        let (redis, etcd) =
            tokio::try_join!(RedisNodes::start(kind), EtcdNodes::start(etcd_members))?;
        Ok(Infra { redis, etcd })
    }

    /// Backend settings pointing at these processes (every etcd member), under `prefix`, with
    /// a 2 s call deadline.
    pub fn backend_config(&self, prefix: &str) -> BackendConfig {
        BackendConfig {
            redis_url: self.redis.url(),
            etcd_endpoints: self.etcd.endpoints(),
            prefix: prefix.to_string(),
            timeout_ms: 2000,
            ..BackendConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_prefixes_are_valid_and_distinct() {
        let a = unique_prefix();
        let b = unique_prefix();
        assert_ne!(a, b);
        for p in [a, b] {
            let config = BackendConfig {
                prefix: p.clone(),
                ..BackendConfig::default()
            };
            assert_eq!(config.validate(), Ok(()), "{p}");
        }
    }

    #[tokio::test]
    async fn wait_until_returns_once_true() {
        let mut n = 0;
        wait_until("n to reach 3", Duration::from_secs(5), || {
            n += 1;
            let done = n >= 3;
            async move { done }
        })
        .await
        .unwrap();
        assert_eq!(n, 3);
    }

    #[tokio::test]
    async fn wait_until_times_out_naming_what() {
        let start = std::time::Instant::now();
        let err = wait_until("the impossible", Duration::from_millis(100), || async {
            false
        })
        .await
        .unwrap_err();
        assert!(err.to_string().contains("the impossible"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn wait_until_bounds_a_hanging_condition() {
        let err = wait_until("a hang", Duration::from_millis(100), || {
            std::future::pending::<bool>()
        })
        .await
        .unwrap_err();
        assert!(err.to_string().contains("a hang"), "{err}");
    }
}
