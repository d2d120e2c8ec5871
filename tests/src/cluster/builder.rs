//! [`ClusterBuilder`]: how to build a test [`Cluster`]: how many servers and routes, how
//! their configs are adjusted, how Redis and etcd run, what the routes' clients trust. Its
//! `start` waits until every server sees every route and every route sees every server, so a
//! test begins with a cluster that routes.

use super::{Cluster, RouteNode, ServerNode};
use crate::{Infra, RedisClusterOptions, RedisKind, RedisOptions};
use cim_route::RouteConfig;
use cim_sdk::ClientTls;
use cim_server::ServerConfig;
use std::time::Duration;

/// How to build a [`Cluster`].
pub struct ClusterBuilder {
    servers: usize,
    routes: usize,
    server_config: Box<dyn Fn(&mut ServerConfig)>,
    route_config: Box<dyn Fn(&mut RouteConfig)>,
    redis: RedisKind,
    etcd_members: usize,
    client_tls: Option<ClientTls>,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self {
            servers: 2,
            routes: 1,
            server_config: Box::new(|_| {}),
            route_config: Box::new(|_| {}),
            redis: RedisKind::default(),
            etcd_members: 1,
            client_tls: None,
        }
    }
}

impl ClusterBuilder {
    pub fn servers(mut self, n: usize) -> Self {
        self.servers = n;
        self
    }

    pub fn routes(mut self, n: usize) -> Self {
        self.routes = n;
        self
    }

    /// Adjusts every server's config (after the cluster filled in backend and secret).
    pub fn server_config(mut self, f: impl Fn(&mut ServerConfig) + 'static) -> Self {
        self.server_config = Box::new(f);
        self
    }

    pub fn route_config(mut self, f: impl Fn(&mut RouteConfig) + 'static) -> Self {
        self.route_config = Box::new(f);
        self
    }

    /// What the routes' clients ([`RouteNode::client`], [`Cluster::route`]) trust: the
    /// test CA of HTTPS routes.
    pub fn client_tls(mut self, tls: ClientTls) -> Self {
        self.client_tls = Some(tls);
        self
    }

    /// Starts Redis with `options` (e.g. AOF on, for tests that kill and restart it).
    pub fn redis(mut self, options: RedisOptions) -> Self {
        self.redis = RedisKind::Single(options);
        self
    }

    /// Runs on a real Redis Cluster (`options`: masters, replicas, AOF) instead of one Redis.
    pub fn redis_cluster(mut self, options: RedisClusterOptions) -> Self {
        self.redis = RedisKind::Cluster(options);
        self
    }

    /// Runs etcd as a cluster of `n` members (default 1: one process); every server and route
    /// is given all endpoints. For tests of an etcd member's death
    /// (`cluster.infra.etcd.cluster_mut()`).
    pub fn etcd_members(mut self, n: usize) -> Self {
        self.etcd_members = n;
        self
    }

    pub async fn start(self) -> anyhow::Result<Cluster> {
        let infra = Infra::start_on(self.redis, self.etcd_members).await?;
        let prefix = crate::unique_prefix();
        let mut cluster = Cluster {
            servers: Vec::new(),
            routes: Vec::new(),
            prefix,
            infra,
        };
        for _ in 0..self.servers {
            let config = cluster.server_config(&*self.server_config);
            cluster.servers.push(ServerNode::start(config).await?);
        }
        for _ in 0..self.routes {
            let config = cluster.route_config(&*self.route_config);
            cluster
                .routes
                .push(RouteNode::start_trusting(config, self.client_tls.clone()).await?);
        }
        // Servers learn routes through their etcd watch, and a send before that is answered
        // UNAVAILABLE: wait until every server sees every route.
        let routes = self.routes;
        for server in &cluster.servers {
            crate::wait_until(
                "servers see every route",
                Duration::from_secs(10),
                || async { server.route_count() == routes },
            )
            .await?;
        }
        // Routes learn servers through their etcd watch: wait until every route sees them all.
        let expected = self.servers;
        for route in &cluster.routes {
            let client = route.client();
            crate::wait_until("routes see every server", Duration::from_secs(10), || {
                let client = client.clone();
                async move { client.servers().await.is_ok_and(|s| s.len() == expected) }
            })
            .await?;
        }
        Ok(cluster)
    }
}
