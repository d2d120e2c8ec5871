//! A whole cim cluster for end-to-end tests: real Redis and etcd (from [`crate::Infra`]),
//! plus connection servers and routes running in this test process, each on its own Tokio
//! runtime and its own port-0 listeners.
//!
//! Why one runtime per server: [`Cluster::kill_server`] drops that runtime, which drops every
//! task of the server at once without running any cleanup code: no deregistration, no Redis
//! detach, sockets simply closed. That is what `kill -9` does to a process, as far as every
//! other component can observe, and it keeps the tests fast (no binary spawn per test).

use crate::Infra;
use anyhow::Context;
use cim_client::{
    pb::{self, frame::Body, Frame},
    Connection, LoginInfo, RouteClient, Transport,
};
use cim_common::backend::Backends;
use cim_route::{RouteConfig, RouteHandle};
use cim_server::{ServerConfig, ServerHandle};
use std::collections::VecDeque;
use std::{net::SocketAddr, time::Duration};
use tokio::{net::TcpListener, runtime::Runtime};

/// Cluster secret used by test clusters.
pub const TEST_SECRET: &str = "test-cluster-secret-0123456789";

/// A cim node (server or route) on a runtime of its own; see the module docs for why.
struct Isolated<H> {
    rt: Option<Runtime>,
    handle: Option<H>,
}

impl<H: Send + 'static> Isolated<H> {
    /// Runs `start` on a new one-thread runtime; it returns the node's handle and whatever
    /// the caller wants to know about it (addresses, id).
    async fn start<T, F>(what: &str, start: F) -> anyhow::Result<(Self, T)>
    where
        T: Send + 'static,
        F: std::future::Future<Output = anyhow::Result<(H, T)>> + Send + 'static,
    {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let (handle, info) = rt
            .spawn(start)
            .await
            .with_context(|| format!("{what} start task"))??;
        let node = Self {
            rt: Some(rt),
            handle: Some(handle),
        };
        Ok((node, info))
    }

    /// Runs the handle's graceful shutdown on the node's own runtime.
    async fn shutdown<Fut>(mut self, shutdown: impl FnOnce(H) -> Fut) -> anyhow::Result<()>
    where
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        if let (Some(rt), Some(handle)) = (self.rt.as_ref(), self.handle.take()) {
            rt.spawn(shutdown(handle)).await?;
        }
        Ok(())
    }
}

impl<H> Isolated<H> {
    /// Hard stop, like `kill -9`: every task is dropped, nothing cleans up.
    fn kill(&mut self) {
        // The handle must not run its own cleanup either: forget it with the runtime.
        let handle = self.handle.take();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
        drop(handle);
    }
}

impl<H> Drop for Isolated<H> {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A connection server running on its own runtime.
pub struct ServerNode {
    node: Isolated<ServerHandle>,
    pub id: String,
    pub tcp_addr: SocketAddr,
    pub ws_addr: SocketAddr,
    pub internal_addr: SocketAddr,
}

/// A route running on its own runtime.
pub struct RouteNode {
    node: Isolated<RouteHandle>,
    pub id: String,
    pub http_addr: SocketAddr,
    pub internal_addr: SocketAddr,
}

async fn bind() -> anyhow::Result<TcpListener> {
    Ok(TcpListener::bind("127.0.0.1:0").await?)
}

impl ServerNode {
    /// Starts a server with `config` (its backend section is filled in by the cluster).
    pub async fn start(config: ServerConfig) -> anyhow::Result<Self> {
        let (node, (id, tcp_addr, ws_addr, internal_addr)) =
            Isolated::start("server", async move {
                let backends = Backends::connect(&config.backend)
                    .await
                    .map_err(anyhow::Error::msg)?;
                let listeners = cim_server::Listeners {
                    tcp: bind().await?,
                    ws: bind().await?,
                    internal: bind().await?,
                };
                let h = cim_server::start(config, listeners, backends).await?;
                let info = (
                    h.id().to_string(),
                    h.tcp_addr(),
                    h.ws_addr(),
                    h.internal_addr(),
                );
                anyhow::Ok((h, info))
            })
            .await?;
        Ok(Self {
            node,
            id,
            tcp_addr,
            ws_addr,
            internal_addr,
        })
    }

    pub fn connection_count(&self) -> usize {
        self.node
            .handle
            .as_ref()
            .map_or(0, |h| h.connection_count())
    }

    /// Graceful shutdown: leaves etcd, kicks clients, closes.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.node.shutdown(ServerHandle::shutdown).await
    }

    /// Hard stop, like `kill -9`: every task of this server is dropped, nothing cleans up.
    pub fn kill(mut self) {
        self.node.kill();
    }
}

impl RouteNode {
    pub async fn start(config: RouteConfig) -> anyhow::Result<Self> {
        let (node, (id, http_addr, internal_addr)) = Isolated::start("route", async move {
            let backends = Backends::connect(&config.backend)
                .await
                .map_err(anyhow::Error::msg)?;
            let listeners = cim_route::Listeners {
                http: bind().await?,
                internal: bind().await?,
            };
            let h = cim_route::start(config, listeners, backends).await?;
            let info = (h.id().to_string(), h.http_addr(), h.internal_addr());
            anyhow::Ok((h, info))
        })
        .await?;
        Ok(Self {
            node,
            id,
            http_addr,
            internal_addr,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    pub fn client(&self) -> RouteClient {
        RouteClient::new(&self.url())
    }

    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.node.shutdown(RouteHandle::shutdown).await
    }

    /// Hard stop, like `kill -9`.
    pub fn kill(mut self) {
        self.node.kill();
    }
}

/// Real Redis + etcd, and the cim processes of one test, all under one unique key prefix.
pub struct Cluster {
    pub servers: Vec<ServerNode>,
    pub routes: Vec<RouteNode>,
    pub prefix: String,
    // Dropped last: the cim nodes above go first, then Redis and etcd.
    pub infra: Infra,
}

/// How to build a [`Cluster`].
pub struct ClusterBuilder {
    servers: usize,
    routes: usize,
    server_config: Box<dyn Fn(&mut ServerConfig)>,
    route_config: Box<dyn Fn(&mut RouteConfig)>,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self {
            servers: 2,
            routes: 1,
            server_config: Box::new(|_| {}),
            route_config: Box::new(|_| {}),
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

    pub async fn start(self) -> anyhow::Result<Cluster> {
        let infra = Infra::start().await?;
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
            cluster.routes.push(RouteNode::start(config).await?);
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

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// Config for one more server of this cluster.
    pub fn server_config(&self, adjust: &dyn Fn(&mut ServerConfig)) -> ServerConfig {
        let mut c = ServerConfig {
            backend: self.infra.backend_config(&self.prefix),
            cluster_secret: TEST_SECRET.into(),
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

/// A logged-in, connected user.
pub struct TestUser {
    pub login: LoginInfo,
    pub conn: Connection,
    pub transport: Transport,
    /// Frames read while waiting for something else, in arrival order.
    pending: VecDeque<Frame>,
    next_client_id: u64,
}

/// Deadline for any single expected frame in tests.
pub const FRAME_DEADLINE: Duration = Duration::from_secs(10);

impl TestUser {
    pub async fn connect(login: LoginInfo, transport: Transport) -> anyhow::Result<Self> {
        let addr = match transport {
            Transport::Tcp => &login.server.tcp_addr,
            Transport::WsBinary | Transport::WsJson => &login.server.ws_addr,
        };
        let mut conn = Connection::connect(addr, transport).await?;
        conn.login(&login.connect_token).await?;
        Ok(Self {
            login,
            conn,
            transport,
            pending: VecDeque::new(),
            next_client_id: 1,
        })
    }

    /// Reads frames until one satisfies `pick`; the others are kept for later calls.
    pub async fn next_where<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&Frame) -> Option<T>,
    ) -> anyhow::Result<T> {
        if let Some(i) = self.pending.iter().position(|f| pick(f).is_some()) {
            let frame = self.pending.remove(i).expect("index is valid");
            return Ok(pick(&frame).expect("picked before"));
        }
        let deadline = tokio::time::Instant::now() + FRAME_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame = self
                .conn
                .recv_timeout(left)
                .await
                .with_context(|| format!("{}: waiting for {what}", self.login.name))?
                .with_context(|| format!("{}: closed while waiting for {what}", self.login.name))?;
            if let Some(t) = pick(&frame) {
                return Ok(t);
            }
            self.pending.push_back(frame);
        }
    }

    /// Sends a message over the connection and returns its result.
    pub async fn send(&mut self, mut send: pb::Send) -> anyhow::Result<pb::SendResult> {
        let client_id = self.next_client_id;
        self.next_client_id += 1;
        send.client_id = client_id;
        self.conn
            .send(&Frame::new(Body::Send(send)))
            .await
            .context("send")?;
        self.next_where("send_result", |f| match &f.body {
            Some(Body::SendResult(r)) if r.client_id == client_id => Some(r.clone()),
            _ => None,
        })
        .await
    }

    /// Sends a private message to `to` (user id).
    pub async fn send_private(&mut self, to: u64, body: &str) -> anyhow::Result<pb::SendResult> {
        self.send(pb::Send {
            kind: pb::MessageKind::Private as i32,
            to_user_id: to,
            body: body.into(),
            ..Default::default()
        })
        .await
    }

    /// Sends a message to everyone online.
    pub async fn send_group(&mut self, body: &str) -> anyhow::Result<pb::SendResult> {
        self.send(pb::Send {
            kind: pb::MessageKind::Group as i32,
            body: body.into(),
            ..Default::default()
        })
        .await
    }

    /// The next pushed message.
    pub async fn next_message(&mut self) -> anyhow::Result<pb::Message> {
        let mut batch = self
            .next_where("a pushed message", |f| match &f.body {
                Some(Body::Push(p)) if !p.messages.is_empty() => Some(p.messages.clone()),
                _ => None,
            })
            .await?;
        // A push may carry several messages: keep the rest, in order, for the next calls.
        let first = batch.remove(0);
        if !batch.is_empty() {
            self.pending
                .push_front(Frame::new(Body::Push(pb::Push { messages: batch })));
        }
        Ok(first)
    }

    /// Messages received until (and including) the first one whose body is `marker`.
    pub async fn messages_until(&mut self, marker: &str) -> anyhow::Result<Vec<pb::Message>> {
        let mut out = Vec::new();
        loop {
            let m = self.next_message().await?;
            let done = m.body == marker;
            out.push(m);
            if done {
                return Ok(out);
            }
        }
    }

    /// Waits for the server to end the connection; returns the frames it sent before closing.
    pub async fn closed(&mut self) -> anyhow::Result<Vec<Frame>> {
        let mut frames: Vec<Frame> = self.pending.drain(..).collect();
        loop {
            match self.conn.recv_timeout(FRAME_DEADLINE).await {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => return Ok(frames),
                Err(cim_client::conn::ConnError::Timeout) => {
                    anyhow::bail!("{}: connection still open", self.login.name)
                }
                // A reset after the server's last frame is a close too.
                Err(_) => return Ok(frames),
            }
        }
    }

    pub fn id(&self) -> u64 {
        self.login.user_id
    }

    pub fn server_id(&self) -> &str {
        &self.login.server.id
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
        let request = pb::cluster::KickRequest {
            user_ids: vec![user_id],
            kick: Some(pb::Kick {
                reason: reason as i32,
                message: message.to_string(),
            }),
            session: String::new(),
        };
        let response: pb::cluster::KickResponse =
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
