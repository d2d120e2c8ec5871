//! A whole cim cluster for end-to-end tests: real Redis and etcd (from [`crate::Infra`]),
//! plus connection servers and routes running in this test process, each on its own Tokio
//! runtime and its own port-0 listeners.
//!
//! Why one runtime per server: [`Cluster::kill_server`] drops that runtime, which drops every
//! task of the server at once without running any cleanup code: no deregistration, no Redis
//! detach, sockets simply closed. That is what `kill -9` does to a process, as far as every
//! other component can observe, and it keeps the tests fast (no binary spawn per test).

use crate::{Infra, RedisOptions};
use anyhow::Context;
use cim_common::backend::Backends;
use cim_route::{RouteConfig, RouteHandle};
use cim_sdk::{
    pb::{self, frame::Body, Frame},
    ClientTls, Connection, LoginInfo, RouteClient, Transport,
};
use cim_server::{ServerConfig, ServerHandle};
use std::collections::VecDeque;
use std::{net::SocketAddr, time::Duration};
use tokio::{net::TcpListener, runtime::Runtime, sync::watch};

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
    /// With `tls_listen` set (any value: tests bind `127.0.0.1:0`).
    pub tls_addr: Option<SocketAddr>,
    /// With `wss_listen` set (any value).
    pub wss_addr: Option<SocketAddr>,
    pub internal_addr: SocketAddr,
    /// Successful TLS certificate reloads (with a TLS listener).
    pub tls_reloads: Option<watch::Receiver<u64>>,
}

/// A route running on its own runtime.
pub struct RouteNode {
    node: Isolated<RouteHandle>,
    pub id: String,
    pub http_addr: SocketAddr,
    pub internal_addr: SocketAddr,
    /// The public listener serves HTTPS (`[tls]` set).
    pub https: bool,
    /// What this node's [`RouteNode::client`] trusts.
    pub client_tls: Option<ClientTls>,
}

async fn bind() -> anyhow::Result<TcpListener> {
    Ok(TcpListener::bind("127.0.0.1:0").await?)
}

impl ServerNode {
    /// Starts a server with `config` (its backend section is filled in by the cluster).
    pub async fn start(config: ServerConfig) -> anyhow::Result<Self> {
        let (node, (id, tcp_addr, ws_addr, secure, internal_addr, tls_reloads)) =
            Isolated::start("server", async move {
                let backends = Backends::connect(&config.backend)
                    .await
                    .map_err(anyhow::Error::msg)?;
                let optional = |on: bool| async move {
                    match on {
                        true => bind().await.map(Some),
                        false => Ok(None),
                    }
                };
                let listeners = cim_server::Listeners {
                    tcp: bind().await?,
                    ws: bind().await?,
                    tls: optional(config.tls_listen().is_some()).await?,
                    wss: optional(config.wss_listen().is_some()).await?,
                    internal: bind().await?,
                };
                let h = cim_server::start(config, listeners, backends).await?;
                let info = (
                    h.id().to_string(),
                    h.tcp_addr(),
                    h.ws_addr(),
                    (h.tls_addr(), h.wss_addr()),
                    h.internal_addr(),
                    h.tls_reloads(),
                );
                anyhow::Ok((h, info))
            })
            .await?;
        Ok(Self {
            node,
            id,
            tcp_addr,
            ws_addr,
            tls_addr: secure.0,
            wss_addr: secure.1,
            internal_addr,
            tls_reloads,
        })
    }

    pub fn connection_count(&self) -> usize {
        self.node
            .handle
            .as_ref()
            .map_or(0, |h| h.connection_count())
    }

    /// Live routes this server knows of.
    pub fn route_count(&self) -> usize {
        self.node.handle.as_ref().map_or(0, |h| h.route_count())
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
        Self::start_trusting(config, None).await
    }

    /// [`RouteNode::start`]; [`RouteNode::client`] trusts what `client_tls` trusts (the
    /// test CA of an HTTPS route).
    pub async fn start_trusting(
        config: RouteConfig,
        client_tls: Option<ClientTls>,
    ) -> anyhow::Result<Self> {
        let https = config.https();
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
            https,
            client_tls,
        })
    }

    /// `http://127.0.0.1:port`, or `https://localhost:port` for an HTTPS route (the test
    /// certificate names both `localhost` and `127.0.0.1`).
    pub fn url(&self) -> String {
        match self.https {
            true => format!("https://localhost:{}", self.http_addr.port()),
            false => format!("http://{}", self.http_addr),
        }
    }

    pub fn client(&self) -> RouteClient {
        RouteClient::with_tls(&self.url(), self.client_tls.clone())
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
    redis: RedisOptions,
    client_tls: Option<ClientTls>,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self {
            servers: 2,
            routes: 1,
            server_config: Box::new(|_| {}),
            route_config: Box::new(|_| {}),
            redis: RedisOptions::default(),
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
        self.redis = options;
        self
    }

    pub async fn start(self) -> anyhow::Result<Cluster> {
        let infra = Infra::start_with(self.redis).await?;
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
        Self::connect_with(login, transport, None).await
    }

    /// [`TestUser::connect`], over TLS with `tls` (to the server's `tls_addr` / `wss_addr`).
    pub async fn connect_with(
        login: LoginInfo,
        transport: Transport,
        tls: Option<&ClientTls>,
    ) -> anyhow::Result<Self> {
        let server = &login.server;
        let mut conn = match (transport, tls) {
            (Transport::Tcp, None) => Connection::connect(&server.tcp_addr, transport).await?,
            (_, None) => Connection::connect(&server.ws_addr, transport).await?,
            (Transport::Tcp, Some(tls)) => {
                let addr = server.tls_addr.as_deref().context("no tls_addr")?;
                Connection::connect_tls(addr, transport, Default::default(), tls).await?
            }
            (_, Some(tls)) => {
                let addr = server.wss_addr.as_deref().context("no wss_addr")?;
                Connection::connect_tls(addr, transport, Default::default(), tls).await?
            }
        };
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
        Ok(self.next_delivery().await?.0)
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
                Err(cim_sdk::conn::ConnError::Timeout) => {
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

/// The password [`Cluster::register_and_login`] gives `name`.
pub fn test_password(name: &str) -> String {
    format!("password-{name}")
}

/// Pause between two attempts of a login that was refused (old slot still held, no server).
const RELOGIN_RETRY: Duration = Duration::from_millis(100);

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

/// One message as a [`TestUser`] received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// Which connection of the user got it: 0 for the first, +1 per reconnection.
    pub connection: usize,
    /// It came in a `Push` with `replay` set (from the inbox, at the start of a connection).
    pub replay: bool,
    pub message: pb::Message,
}

/// What [`TestUser::collect_until`] received, over all connections.
#[derive(Debug, Default)]
pub struct Collected {
    pub received: Vec<Received>,
    /// Connections used (1 when the first one lasted).
    pub connections: usize,
    /// For each reconnection: how long from noticing the loss to being connected again.
    pub reconnect_times: Vec<Duration>,
}

/// Outcome of one send of [`TestUser::stream_private`].
#[derive(Debug, Clone)]
pub struct Sent {
    /// The message number: its body is `n.to_string()`.
    pub n: u64,
    /// The id the message has: the client-chosen one scoped by the sender,
    /// `{sender_id}-{chosen}`.
    pub id: String,
    pub result: pb::SendResult,
    /// From writing the Send to reading its result.
    pub latency: Duration,
}

impl Sent {
    /// Delivered or stored: the message must reach its receiver.
    pub fn accepted(&self) -> bool {
        matches!(
            self.result.status(),
            pb::SendStatus::Delivered | pb::SendStatus::Stored
        )
    }
}

/// Counts of [`check_stream_delivery`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryCheck {
    pub accepted: usize,
    pub failed: usize,
    /// Distinct numbered messages received.
    pub received: usize,
    /// Copies received beyond the first (replays after a reconnection, retried pushes).
    pub redelivered: usize,
}

/// Checks what a receiver got from a stream of numbered private messages (the marker body
/// `marker` excluded): every id received was sent, with the body of its number; every
/// accepted message arrived; de-duplicated by id they arrived in send order; and unless
/// `allow_repeats_on_one_connection`, no connection got the same id twice (copies are only
/// allowed from a replay on a later connection).
pub fn check_stream_delivery(
    sent: &[Sent],
    collected: &Collected,
    marker: &str,
    allow_repeats_on_one_connection: bool,
) -> anyhow::Result<DeliveryCheck> {
    use std::collections::{HashMap, HashSet};
    let by_id: HashMap<&str, &Sent> = sent.iter().map(|s| (s.id.as_str(), s)).collect();
    let mut seen: HashSet<&str> = HashSet::new();
    let mut per_connection: HashSet<(usize, &str)> = HashSet::new();
    let mut last_n = None;
    let mut redelivered = 0;
    for r in &collected.received {
        let m = &r.message;
        if m.body == marker {
            continue;
        }
        let s = by_id.get(m.id.as_str()).with_context(|| {
            format!(
                "received id {:?} (body {:?}) that was never sent",
                m.id, m.body
            )
        })?;
        anyhow::ensure!(
            m.body == s.n.to_string(),
            "id {} carries body {:?}, sent as {}",
            m.id,
            m.body,
            s.n
        );
        anyhow::ensure!(
            m.kind() == pb::MessageKind::Private && m.seq != 0,
            "message {} is not a stored private message: {m:?}",
            m.id
        );
        if !per_connection.insert((r.connection, m.id.as_str())) && !allow_repeats_on_one_connection
        {
            anyhow::bail!(
                "message {} (n = {}) arrived twice on connection {}",
                m.id,
                s.n,
                r.connection
            );
        }
        if !seen.insert(m.id.as_str()) {
            redelivered += 1;
            continue;
        }
        if let Some(last) = last_n {
            anyhow::ensure!(
                s.n > last,
                "out of order: {} arrived (first) after {last} (connection {}, replay {})",
                s.n,
                r.connection,
                r.replay
            );
        }
        last_n = Some(s.n);
    }
    let missing: Vec<u64> = sent
        .iter()
        .filter(|s| s.accepted() && !seen.contains(s.id.as_str()))
        .map(|s| s.n)
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "{} accepted messages never arrived: {missing:?}",
        missing.len()
    );
    let accepted = sent.iter().filter(|s| s.accepted()).count();
    Ok(DeliveryCheck {
        accepted,
        failed: sent.len() - accepted,
        received: seen.len(),
        redelivered,
    })
}

impl TestUser {
    /// Logs `name` (registered, password [`test_password`]) in through `route` and connects,
    /// retrying for up to `deadline` while the login is refused or the assigned server cannot
    /// be reached (a server that just died may still be assigned until its lease expires; the
    /// failed session is logged out so its pending slot does not lock the user out).
    pub async fn login_again(
        route: &RouteClient,
        name: &str,
        transport: Transport,
        deadline: Duration,
    ) -> anyhow::Result<TestUser> {
        let password = test_password(name);
        let end = tokio::time::Instant::now() + deadline;
        loop {
            let error = match route.login(name, &password).await {
                Ok(login) => {
                    let session = login.session_token.clone();
                    match TestUser::connect(login, transport).await {
                        Ok(user) => return Ok(user),
                        Err(e) => {
                            let _ = route.logout(&session).await;
                            e
                        }
                    }
                }
                Err(e) => anyhow::Error::from(e),
            };
            if tokio::time::Instant::now() + RELOGIN_RETRY >= end {
                return Err(error.context(format!("{name}: no accepted login within {deadline:?}")));
            }
            tokio::time::sleep(RELOGIN_RETRY).await;
        }
    }

    /// Sends a frame without waiting for anything.
    pub async fn send_frame(&mut self, frame: &Frame) -> anyhow::Result<()> {
        self.conn.send(frame).await.context("sending a frame")
    }

    /// Writes a Send (its `client_id` is chosen here) without waiting for the result; returns
    /// the client id to find the result with [`TestUser::result_of`].
    pub async fn submit(&mut self, mut send: pb::Send) -> anyhow::Result<u64> {
        let client_id = self.next_client_id;
        self.next_client_id += 1;
        send.client_id = client_id;
        self.send_frame(&Frame::new(Body::Send(send))).await?;
        Ok(client_id)
    }

    /// The SendResult of the send with `client_id`.
    pub async fn result_of(&mut self, client_id: u64) -> anyhow::Result<pb::SendResult> {
        self.next_where("send_result", |f| match &f.body {
            Some(Body::SendResult(r)) if r.client_id == client_id => Some(r.clone()),
            _ => None,
        })
        .await
    }

    /// Acknowledges stored messages (they leave the inbox; receipts follow).
    pub async fn ack(&mut self, ids: Vec<String>) -> anyhow::Result<()> {
        self.send_frame(&Frame::new(Body::Ack(pb::Ack { message_ids: ids })))
            .await
    }

    /// Sends a Ping and returns every frame that arrived before its Pong (frames kept from
    /// earlier calls included, and no longer kept). The server answers frames in order and
    /// writes a connection's inbox replay before reading anything, so what the Pong did not
    /// overtake is everything the server had queued for this connection by then.
    pub async fn ping(&mut self, nonce: u64) -> anyhow::Result<Vec<Frame>> {
        self.send_frame(&Frame::new(Body::Ping(pb::Ping { nonce })))
            .await?;
        let mut before: Vec<Frame> = self.pending.drain(..).collect();
        let deadline = tokio::time::Instant::now() + FRAME_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame = self
                .conn
                .recv_timeout(left)
                .await
                .with_context(|| format!("{}: waiting for pong {nonce}", self.login.name))?
                .with_context(|| format!("{}: closed before pong {nonce}", self.login.name))?;
            if matches!(&frame.body, Some(Body::Pong(p)) if p.nonce == nonce) {
                return Ok(before);
            }
            before.push(frame);
        }
    }

    /// The next Push frame with messages, whole (its `replay` flag included).
    pub async fn next_push(&mut self) -> anyhow::Result<pb::Push> {
        self.next_where("a push", |f| match &f.body {
            Some(Body::Push(p)) if !p.messages.is_empty() => Some(p.clone()),
            _ => None,
        })
        .await
    }

    /// The next pushed message, and whether it came in a replay Push.
    pub async fn next_delivery(&mut self) -> anyhow::Result<(pb::Message, bool)> {
        let mut push = self.next_push().await?;
        // A push may carry several messages: keep the rest, in order, for the next calls.
        let first = push.messages.remove(0);
        let replay = push.replay;
        if !push.messages.is_empty() {
            self.pending.push_front(Frame::new(Body::Push(push)));
        }
        Ok((first, replay))
    }

    /// The next Push frame with messages, or `None` when the connection ended (closed or
    /// reset) first. Other frames are kept. Fails after `deadline` without either.
    pub async fn next_push_or_end(
        &mut self,
        deadline: Duration,
    ) -> anyhow::Result<Option<pb::Push>> {
        let is_push = |f: &Frame| matches!(&f.body, Some(Body::Push(p)) if !p.messages.is_empty());
        if let Some(i) = self.pending.iter().position(is_push) {
            if let Some(Frame {
                body: Some(Body::Push(p)),
            }) = self.pending.remove(i)
            {
                return Ok(Some(p));
            }
        }
        let end = tokio::time::Instant::now() + deadline;
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            match self.conn.recv_timeout(left).await {
                Ok(Some(Frame {
                    body: Some(Body::Push(p)),
                })) if !p.messages.is_empty() => return Ok(Some(p)),
                Ok(Some(other)) => self.pending.push_back(other),
                Ok(None) => return Ok(None),
                Err(cim_sdk::conn::ConnError::Timeout) => {
                    anyhow::bail!("{}: no push within {deadline:?}", self.login.name)
                }
                // A reset (the server process died) ends the connection too.
                Err(_) => return Ok(None),
            }
        }
    }

    /// Streams numbered private messages `numbers` to `to`: message `n` has body
    /// `n.to_string()` and the client-chosen id `id_of(n)`; at most `window` sends are
    /// unanswered at any time. `on_result` sees each outcome as it arrives (to act mid-stream,
    /// e.g. kill a process). Returns every outcome, in send order.
    pub async fn stream_private(
        &mut self,
        to: u64,
        numbers: std::ops::Range<u64>,
        window: usize,
        id_of: impl Fn(u64) -> String,
        mut on_result: impl FnMut(&Sent),
    ) -> anyhow::Result<Vec<Sent>> {
        use std::collections::HashMap;
        let window = window.max(1);
        let mut in_flight: HashMap<u64, (u64, String, std::time::Instant)> = HashMap::new();
        let mut out = Vec::with_capacity(numbers.clone().count());
        let mut next = numbers.start;
        while next < numbers.end || !in_flight.is_empty() {
            while next < numbers.end && in_flight.len() < window {
                let id = id_of(next);
                let client_id = self
                    .submit(pb::Send {
                        kind: pb::MessageKind::Private as i32,
                        to_user_id: to,
                        body: next.to_string(),
                        message_id: id.clone(),
                        ..Default::default()
                    })
                    .await?;
                let id = format!("{}-{id}", self.id());
                in_flight.insert(client_id, (next, id, std::time::Instant::now()));
                next += 1;
            }
            let result = self
                .next_where("a streamed send's result", |f| match &f.body {
                    Some(Body::SendResult(r)) if in_flight.contains_key(&r.client_id) => {
                        Some(r.clone())
                    }
                    _ => None,
                })
                .await?;
            let (n, id, started) = in_flight
                .remove(&result.client_id)
                .expect("picked from in_flight");
            let sent = Sent {
                n,
                id,
                result,
                latency: started.elapsed(),
            };
            on_result(&sent);
            out.push(sent);
        }
        out.sort_by_key(|s| s.n);
        Ok(out)
    }

    /// Receives pushes until a message with body `marker` arrives, acking stored messages
    /// once `ack_lag` newer ones have arrived after them (0: right away; more leaves that
    /// many unacked at any time, for a reconnection to replay). When the connection ends it
    /// logs in again through `route` ([`TestUser::login_again`]) and goes on over the new
    /// connection. `progress` gets the number of messages received so far. Everything must
    /// happen within `deadline`.
    pub async fn collect_until(
        self,
        route: RouteClient,
        marker: &str,
        ack_lag: usize,
        deadline: Duration,
        progress: tokio::sync::watch::Sender<usize>,
    ) -> anyhow::Result<Collected> {
        let end = tokio::time::Instant::now() + deadline;
        let name = self.login.name.clone();
        let transport = self.transport;
        let mut user = self;
        let mut collected = Collected {
            connections: 1,
            ..Default::default()
        };
        // Received, not acked yet (on this connection).
        let mut unacked: VecDeque<String> = VecDeque::new();
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            let push = user.next_push_or_end(left).await.with_context(|| {
                format!(
                    "{name}: {} messages so far, marker {marker:?} not received",
                    collected.received.len()
                )
            })?;
            let Some(push) = push else {
                let lost = std::time::Instant::now();
                let left = end.saturating_duration_since(tokio::time::Instant::now());
                user = TestUser::login_again(&route, &name, transport, left).await?;
                // What was not acked comes again with the replay.
                unacked.clear();
                collected.reconnect_times.push(lost.elapsed());
                collected.connections += 1;
                continue;
            };
            unacked.extend(
                push.messages
                    .iter()
                    .filter(|m| m.seq != 0)
                    .map(|m| m.id.clone()),
            );
            let done = push.messages.iter().any(|m| m.body == marker);
            let keep = if done { 0 } else { ack_lag };
            let ack: Vec<String> = unacked
                .drain(..unacked.len().saturating_sub(keep))
                .collect();
            for message in push.messages {
                collected.received.push(Received {
                    connection: collected.connections - 1,
                    replay: push.replay,
                    message,
                });
            }
            progress.send_replace(collected.received.len());
            if !ack.is_empty() {
                // A failed write means the connection is gone: the next read says so.
                let _ = user.ack(ack).await;
            }
            if done {
                return Ok(collected);
            }
        }
    }
}
