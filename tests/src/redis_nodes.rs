//! [`RedisNodes`]: the Redis of a test, either one [`Redis`] or a [`RedisCluster`], and a raw
//! connection to it of the matching kind ([`RedisConn`], the store's own, for tests that look
//! at keys). Tests written against these run unchanged on both deployments.

use crate::{Redis, RedisCluster, RedisClusterOptions, RedisOptions};
pub use cim_common::store::RedisConn;
use std::time::Duration;

/// Which Redis a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisKind {
    /// One `redis-server`.
    Single(RedisOptions),
    /// A Redis Cluster.
    Cluster(RedisClusterOptions),
}

impl Default for RedisKind {
    fn default() -> Self {
        RedisKind::Single(RedisOptions::default())
    }
}

/// The Redis of a test, killed on drop.
#[derive(Debug)]
pub enum RedisNodes {
    Single(Redis),
    Cluster(RedisCluster),
}

impl RedisNodes {
    pub async fn start(kind: RedisKind) -> anyhow::Result<RedisNodes> {
        Ok(match kind {
            RedisKind::Single(options) => RedisNodes::Single(Redis::start_with(options).await?),
            RedisKind::Cluster(options) => RedisNodes::Cluster(RedisCluster::start(options).await?),
        })
    }

    /// A 3-master Redis Cluster without replicas.
    pub async fn cluster() -> anyhow::Result<RedisNodes> {
        Self::start(RedisKind::Cluster(RedisClusterOptions::default())).await
    }

    /// The `redis_url` of cim's config: `redis://…` or `redis+cluster://…`.
    pub fn url(&self) -> String {
        match self {
            RedisNodes::Single(r) => r.url(),
            RedisNodes::Cluster(c) => c.url(),
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisNodes::Cluster(_))
    }

    /// The pids of the running Redis processes.
    pub fn pids(&self) -> Vec<u32> {
        match self {
            RedisNodes::Single(r) => r.pid().into_iter().collect(),
            RedisNodes::Cluster(c) => c.pids(),
        }
    }

    /// The single Redis; panics on a cluster.
    pub fn single(&self) -> &Redis {
        match self {
            RedisNodes::Single(r) => r,
            RedisNodes::Cluster(_) => panic!("this test needs a single Redis, not a cluster"),
        }
    }

    /// The single Redis, to kill and restart it; panics on a cluster.
    pub fn single_mut(&mut self) -> &mut Redis {
        match self {
            RedisNodes::Single(r) => r,
            RedisNodes::Cluster(_) => panic!("this test needs a single Redis, not a cluster"),
        }
    }

    /// The cluster; panics on a single Redis.
    pub fn redis_cluster(&mut self) -> &mut RedisCluster {
        match self {
            RedisNodes::Cluster(c) => c,
            RedisNodes::Single(_) => panic!("this test needs a Redis Cluster"),
        }
    }

    /// A new raw connection of the matching kind (commands and single-slot pipelines work
    /// on both).
    pub async fn connection(&self) -> anyhow::Result<RedisConn> {
        Ok(RedisConn::connect(&self.url(), Duration::from_secs(10)).await?)
    }
}
