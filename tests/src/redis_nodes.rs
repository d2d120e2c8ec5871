//! [`RedisNodes`]: the Redis of a test, either one [`Redis`] or a [`RedisCluster`], and
//! [`RedisConn`], a raw connection to it of the matching kind (for tests that look at keys).
//! Tests written against these run unchanged on both deployments.

use crate::{Redis, RedisCluster, RedisClusterOptions, RedisOptions};
use redis::{
    aio::{ConnectionLike, MultiplexedConnection},
    cluster_async::ClusterConnection,
    Cmd, Pipeline, RedisFuture, Value,
};

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

    /// A new raw connection of the matching kind.
    pub async fn connection(&self) -> anyhow::Result<RedisConn> {
        Ok(match self {
            RedisNodes::Single(r) => RedisConn::Single(r.connection().await?),
            RedisNodes::Cluster(c) => RedisConn::Cluster(c.connection().await?),
        })
    }
}

/// A raw connection to a single Redis or to a cluster; commands and single-slot pipelines
/// work on both.
#[derive(Clone)]
pub enum RedisConn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}
