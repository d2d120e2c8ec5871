//! The cim nodes of a test [`Cluster`](super::Cluster): a connection server
//! ([`ServerNode`]) or a route ([`RouteNode`]), each on a Tokio runtime of its own so that a
//! hard stop drops every task at once (see the parent module's docs for why).

use cim_common::backend::Backends;
use cim_route::{RouteConfig, RouteHandle};
use cim_sdk::ClientTls;
use cim_sdk::RouteClient;
use cim_server::{ServerConfig, ServerHandle};
use std::net::SocketAddr;
use tokio::{net::TcpListener, runtime::Runtime, sync::watch};

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
        let started = rt
            .spawn(start)
            .await
            .map_err(anyhow::Error::new)
            .and_then(|started| started);
        let (handle, info) = match started {
            Ok(started) => started,
            Err(e) => {
                // Dropping a runtime inside async code panics (hiding this error): stop it
                // in the background.
                rt.shutdown_background();
                return Err(e.context(format!("{what} start")));
            }
        };
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
