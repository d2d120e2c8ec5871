//! The connection of the Redis store: one multiplexed connection to a single Redis, or the
//! redis crate's cluster connection to a Redis Cluster (it follows MOVED and ASK, refreshes
//! the topology and reconnects by itself), behind one type, and the URL that chooses.
//!
//! `redis://…` (and `rediss://`, `unix://`) is a single Redis. `redis+cluster://` followed by
//! comma-separated `host:port` seed nodes, optionally with `user:password@` before them
//! (`redis+cluster://:secret@10.0.0.1:6379,10.0.0.2:6379`), is a Redis Cluster; any one
//! reachable seed is enough to learn the others.

use super::{unavailable, StoreError, StoreResult};
use ::redis::{
    aio::{ConnectionLike, ConnectionManager},
    cluster_async::ClusterConnection,
    Cmd, Pipeline, RedisFuture, Value,
};
use std::time::Duration;

/// The scheme of a Redis Cluster URL.
pub const CLUSTER_SCHEME: &str = "redis+cluster://";

/// What a `redis_url` points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One Redis, by its URL.
    Single(String),
    /// A Redis Cluster, by the `redis://` URLs of its seed nodes.
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// Parses a `redis_url`; the error says what is wrong with it.
    pub fn parse(url: &str) -> Result<Self, String> {
        let Some(rest) = url.strip_prefix(CLUSTER_SCHEME) else {
            ::redis::parse_redis_url(url)
                .ok_or_else(|| format!("{url:?} is not a Redis URL (redis://host:port/db)"))?;
            return Ok(Self::Single(url.to_string()));
        };
        let rest = rest.trim_end_matches('/');
        let (userinfo, hosts) = match rest.rsplit_once('@') {
            Some((user, hosts)) => (Some(user), hosts),
            None => (None, rest),
        };
        if hosts.contains('/') || hosts.contains('?') {
            return Err(format!(
                "{url:?}: a Redis Cluster has no database and takes no options \
                 (redis+cluster://host:port,host:port)"
            ));
        }
        let seeds = hosts
            .split(',')
            .map(|host| {
                let host = host.trim();
                let (name, port) = host
                    .rsplit_once(':')
                    .ok_or_else(|| format!("{url:?}: seed node {host:?} is not host:port"))?;
                if name.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
                    return Err(format!("{url:?}: seed node {host:?} is not host:port"));
                }
                Ok(match userinfo {
                    Some(user) => format!("redis://{user}@{host}"),
                    None => format!("redis://{host}"),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        for seed in &seeds {
            ::redis::parse_redis_url(seed).ok_or_else(|| format!("{url:?}: bad seed {seed:?}"))?;
        }
        Ok(Self::Cluster(seeds))
    }
}

/// One connection of either kind; clones share it. What the store talks through, and what
/// tests use to look at raw keys of either deployment.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    /// Connects to `url` (see [`RedisTarget`]); every command times out after `timeout`.
    pub async fn connect(url: &str, timeout: Duration) -> StoreResult<Conn> {
        let target = RedisTarget::parse(url).map_err(StoreError::Unavailable)?;
        let timed_out = || StoreError::Unavailable(format!("connecting to {url} timed out"));
        Ok(match target {
            RedisTarget::Single(url) => {
                let client = ::redis::Client::open(url.as_str()).map_err(unavailable)?;
                let config = ::redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    // No retry loop inside a call: redis-rs backs off from 1 s up to a minute
                    // between reconnect attempts, and every command would wait for it. One
                    // immediate reconnect attempt per call keeps "Redis down" a fast error.
                    .set_number_of_retries(0);
                let conn = ConnectionManager::new_with_config(client, config);
                Conn::Single(
                    tokio::time::timeout(timeout * 3, conn)
                        .await
                        .map_err(|_| timed_out())?
                        .map_err(unavailable)?,
                )
            }
            RedisTarget::Cluster(seeds) => {
                let client = ::redis::cluster::ClusterClient::builder(seeds)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    // Redirections (MOVED, ASK) and reconnects after a failover are retried
                    // inside a call, which as a whole still ends at its deadline.
                    .overall_response_timeout(Some(timeout))
                    .build()
                    .map_err(unavailable)?;
                Conn::Cluster(
                    tokio::time::timeout(timeout * 3, client.get_async_connection())
                        .await
                        .map_err(|_| timed_out())?
                        .map_err(unavailable)?,
                )
            }
        })
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_choose_a_single_redis_or_a_cluster() {
        assert_eq!(
            RedisTarget::parse("redis://127.0.0.1:6379/0"),
            Ok(RedisTarget::Single("redis://127.0.0.1:6379/0".into()))
        );
        assert_eq!(
            RedisTarget::parse("redis+cluster://10.0.0.1:7000,10.0.0.2:7001/"),
            Ok(RedisTarget::Cluster(vec![
                "redis://10.0.0.1:7000".into(),
                "redis://10.0.0.2:7001".into()
            ]))
        );
        assert_eq!(
            RedisTarget::parse("redis+cluster://:pw@h1:7000,h2:7000"),
            Ok(RedisTarget::Cluster(vec![
                "redis://:pw@h1:7000".into(),
                "redis://:pw@h2:7000".into()
            ]))
        );
        for bad in [
            "http://x",
            "127.0.0.1:6379",
            "redis+cluster://",
            "redis+cluster://h1",
            "redis+cluster://h1:0",
            "redis+cluster://h1:7000,",
            "redis+cluster://h1:7000/0",
            "redis+cluster://:7000",
        ] {
            let err = RedisTarget::parse(bad).unwrap_err();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }
}
