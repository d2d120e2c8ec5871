//! A whole cim cluster for end-to-end tests: real Redis and etcd (from [`crate::Infra`]),
//! plus connection servers and routes running in this test process, each on its own Tokio
//! runtime and its own port-0 listeners.
//!
//! Why one runtime per server: [`ServerNode::kill`] drops that runtime, which drops every
//! task of the server at once without running any cleanup code: no deregistration, no Redis
//! detach, sockets simply closed. That is what `kill -9` does to a process, as far as every
//! other component can observe, and it keeps the tests fast (no binary spawn per test).
//!
//! Cut along its seams, every item re-exported here (`cim_tests::cluster::...`):
//! - this module: [`Cluster`] (the nodes of one test under one key prefix, the configs of
//!   further nodes, logins, kicks through the internal API, a direct store connection);
//! - `builder`: [`ClusterBuilder`] (how many servers and routes, config adjustments, Redis
//!   options; starts everything and waits until the nodes see each other);
//! - `nodes`: [`ServerNode`] and [`RouteNode`], each on a runtime of its own;
//! - `users`: [`TestUser`], a logged-in connected user (sends, reads frames, relogins);
//! - `delivery`: streams of numbered private messages and what their receiver got
//!   ([`TestUser::stream_private`], [`TestUser::collect_until`], [`check_stream_delivery`]).

mod builder;
mod delivery;
mod nodes;
mod users;

pub use builder::ClusterBuilder;
pub use delivery::{
    check_stream_delivery, inbox_len_becomes, Collected, DeliveryCheck, Received, Sent,
};
pub use nodes::{RouteNode, ServerNode};
pub use users::{test_password, TestUser, FRAME_DEADLINE};

use crate::Infra;
use anyhow::Context;
use cim_common::backend::Backends;
use cim_route::RouteConfig;
use cim_sdk::{pb, LoginInfo, RouteClient, Transport};
use cim_server::ServerConfig;
use std::time::Duration;

/// Cluster secret used by test clusters.
pub const TEST_SECRET: &str = "test-cluster-secret-0123456789";

/// Real Redis + etcd, and the cim processes of one test, all under one unique key prefix.
pub struct Cluster {
    pub servers: Vec<ServerNode>,
    pub routes: Vec<RouteNode>,
    pub prefix: String,
    // Dropped last: the cim nodes above go first, then Redis and etcd.
    pub infra: Infra,
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// Config for one more server of this cluster.
    pub fn server_config(&self, adjust: &dyn Fn(&mut ServerConfig)) -> ServerConfig {
        let mut c = ServerConfig {
            backend: self.infra.backend_config(&self.prefix),
            cluster_secret: TEST_SECRET.into(),
            // Tests stream hundreds of messages from one user to check delivery, far past a
            // person's rate; the send limit has tests of its own that turn it on.
            send_rate_per_sec: 0,
            ..ServerConfig::default()
        };
        adjust(&mut c);
        c
    }

    pub fn route_config(&self, adjust: &dyn Fn(&mut RouteConfig)) -> RouteConfig {
        let mut c = RouteConfig {
            backend: self.infra.backend_config(&self.prefix),
            cluster_secret: TEST_SECRET.into(),
            // Tests run debug builds, where argon2 with production parameters takes ~1 s per
            // hash; the hashing itself is covered by cim-route's unit tests.
            password_memory_kib: 1024,
            password_iterations: 1,
            ..RouteConfig::default()
        };
        adjust(&mut c);
        c
    }

    pub fn route(&self) -> RouteClient {
        self.routes[0].client()
    }

    /// Registers `name` and logs in (password `password-{name}`), without connecting.
    pub async fn register_and_login(&self, name: &str) -> anyhow::Result<LoginInfo> {
        let route = self.route();
        let password = format!("password-{name}");
        route.register(name, &password).await?;
        Ok(route.login(name, &password).await?)
    }

    /// Registers, logs in and connects `name` over `transport` to its assigned server.
    pub async fn user(&self, name: &str, transport: Transport) -> anyhow::Result<TestUser> {
        let login = self.register_and_login(name).await?;
        TestUser::connect(login, transport).await
    }

    /// The server node with this id.
    pub fn server(&self, id: &str) -> Option<&ServerNode> {
        self.servers.iter().find(|s| s.id == id)
    }

    /// Removes the server with this id from the cluster and returns it.
    pub fn take_server(&mut self, id: &str) -> Option<ServerNode> {
        let i = self.servers.iter().position(|s| s.id == id)?;
        Some(self.servers.remove(i))
    }
}

impl Cluster {
    /// Base URL of the first route: what SDK clients are configured with.
    pub fn route_url(&self) -> String {
        self.routes[0].url()
    }

    /// Kicks `user_id`'s connection on server `server_id` with `reason`, through the server's
    /// internal API (what a route does on logout or a business force-offline). Returns the
    /// user ids that were kicked.
    pub async fn kick(
        &self,
        server_id: &str,
        user_id: u64,
        reason: pb::KickReason,
        message: &str,
    ) -> anyhow::Result<Vec<u64>> {
        let server = self
            .server(server_id)
            .with_context(|| format!("no server {server_id} in the cluster"))?;
        let request = cim_common::pb::cluster::KickRequest {
            user_ids: vec![user_id],
            kick: Some(pb::Kick {
                reason: reason as i32,
                message: message.to_string(),
            }),
            session: String::new(),
        };
        let response: cim_common::pb::cluster::KickResponse =
            cim_common::cluster::ClusterClient::new(TEST_SECRET, FRAME_DEADLINE)
                .call(
                    &server.internal_addr.to_string(),
                    "/internal/kick",
                    &request,
                )
                .await?;
        Ok(response.kicked)
    }
}

impl Cluster {
    /// Logs `name` (registered before) in again and connects, retrying while the route
    /// refuses (e.g. the previous connection's login slot is not released yet) for up to
    /// `deadline`.
    pub async fn relogin(
        &self,
        name: &str,
        transport: Transport,
        deadline: Duration,
    ) -> anyhow::Result<TestUser> {
        TestUser::login_again(&self.route(), name, transport, deadline).await
    }

    /// A direct connection to this cluster's Redis state store, for tests that look at what
    /// is stored (inboxes) rather than only at what clients receive.
    pub async fn store(&self) -> anyhow::Result<std::sync::Arc<dyn cim_common::store::StateStore>> {
        let backends = Backends::connect(&self.infra.backend_config(&self.prefix))
            .await
            .map_err(anyhow::Error::msg)?;
        Ok(backends.store)
    }
}
