//! Assembling a running server: the shared state, the accept loops, the forwarder, the
//! internal API, the registration in the registry, and the graceful shutdown.

use crate::pb::KickReason;
use crate::{
    ack::{self, AckQueue},
    admission::{self, Admission, Refused, Ticket},
    config::ServerConfig,
    conn::ConnTable,
    forward::{ForwardQueue, Forwarder, RouteCaller},
    internal,
    metrics::ServerMetrics,
    session,
    tcp::TcpTransport,
    ws,
};
use anyhow::{anyhow, Context as _};
use cim_common::{
    backend::Backends,
    cluster::ClusterClient,
    limit::KeyedLimit,
    registry::{Registration, ServiceInfo, ServiceKind},
    store::ServerStore,
    tls::ServerTls,
    token::TokenSigner,
};
use prometheus_client::registry::Registry;
use std::{net::SocketAddr, sync::Arc, time::Duration};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn, Instrument};

/// Pause after a failed accept before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What sessions, the forwarder and the internal API share.
pub(crate) struct ServerState {
    /// Instance id (`{name}-{random}`), as registered and as put in connect tokens.
    pub id: String,
    pub config: ServerConfig,
    pub signer: TokenSigner,
    pub store: Arc<dyn ServerStore>,
    pub table: ConnTable,
    pub forward: ForwardQueue,
    pub acks: AckQueue,
    /// Cancelled when the server shuts down.
    pub cancel: CancellationToken,
    /// The connection caps, and the count of open client connections (handshaking, logging
    /// in, logged in, or closing): one ticket each.
    pub admission: Arc<Admission>,
    /// Sends per user per second (`send_rate_per_sec`, `send_burst`).
    pub send_limit: KeyedLimit<u64>,
    /// The handles of this server's metrics...
    pub metrics: ServerMetrics,
    /// ... and the registry `/metrics` encodes (with the backends' error counters).
    pub registry: Registry,
    /// `config.ws_allowed_origins`, parsed once.
    pub ws_origins: ws::AllowedOrigins,
}

impl ServerState {
    /// A state with metrics of its own (unit tests).
    #[cfg(test)]
    pub(crate) fn new(
        id: String,
        config: ServerConfig,
        store: Arc<dyn ServerStore>,
        forward: ForwardQueue,
        acks: AckQueue,
    ) -> Self {
        let mut registry = Registry::default();
        let metrics = ServerMetrics::new(&mut registry);
        Self::with_metrics(id, config, store, forward, acks, metrics, registry)
    }

    /// [`ServerState::new`] with metrics registered in `registry` already.
    pub(crate) fn with_metrics(
        id: String,
        config: ServerConfig,
        store: Arc<dyn ServerStore>,
        forward: ForwardQueue,
        mut acks: AckQueue,
        metrics: ServerMetrics,
        registry: Registry,
    ) -> Self {
        acks.count_drops_in(metrics.acks_dropped.clone());
        let admission = Admission::new(config.max_connections, config.max_pending_logins);
        let send_limit = KeyedLimit::new(config.send_rate_per_sec, config.send_burst);
        let ws_origins = ws::AllowedOrigins::from_config(&config.ws_allowed_origins);
        Self {
            id,
            signer: TokenSigner::with_keys(config.keys()),
            config,
            store,
            table: ConnTable::default(),
            forward,
            acks,
            cancel: CancellationToken::new(),
            admission,
            send_limit,
            metrics,
            registry,
            ws_origins,
        }
    }

    /// Starts the shutdown of every connection: connections still logging in see the
    /// cancellation, logged-in ones get a SERVER_SHUTDOWN kick after their pending frames.
    pub(crate) fn shutdown_connections(&self) {
        self.cancel.cancel();
        for conn in self.table.all() {
            conn.close(session::shutdown_kick(), KickReason::ServerShutdown, true);
        }
    }
}

/// The listeners, bound by the caller (tests bind `127.0.0.1:0`).
pub struct Listeners {
    /// Client TCP connections.
    pub tcp: TcpListener,
    /// Client WebSocket connections.
    pub ws: TcpListener,
    /// Client TCP-protocol connections over TLS (`tls_listen`); needs `[tls]`.
    pub tls: Option<TcpListener>,
    /// Client WebSocket connections over TLS (`wss_listen`, `wss://…/ws`); needs `[tls]`.
    pub wss: Option<TcpListener>,
    /// Internal API (routes).
    pub internal: TcpListener,
}

/// A running server. [`ServerHandle::shutdown`] stops it gracefully; dropping the handle
/// stops it too, without leaving the registry first (the registration then expires).
pub struct ServerHandle {
    state: Arc<ServerState>,
    tracker: TaskTracker,
    registration: Option<Box<dyn Registration>>,
    tcp_addr: SocketAddr,
    ws_addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    wss_addr: Option<SocketAddr>,
    internal_addr: SocketAddr,
    tls: Option<Arc<ServerTls>>,
    /// The live routes this server forwards to (its registry watch).
    routes: cim_common::registry::MembersRx,
}

/// What a client listener speaks once a connection is open (and, on TLS listeners, after
/// the TLS handshake).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// Delimited protobuf frames.
    Tcp,
    /// WebSocket on `/ws`.
    Ws,
}

/// Starts a server on the given listeners: watches routes, serves clients and the internal
/// API, and registers in the registry. Returns once everything runs.
pub async fn start(
    config: ServerConfig,
    listeners: Listeners,
    backends: Backends,
) -> anyhow::Result<ServerHandle> {
    config.validate()?;
    if config.uses_dev_secret() {
        warn!("cluster_secret is the built-in development secret: set your own in production");
    }
    let tcp_addr = listeners.tcp.local_addr().context("tcp listener address")?;
    let ws_addr = listeners.ws.local_addr().context("ws listener address")?;
    let tls_addr = listeners
        .tls
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()
        .context("tls listener address")?;
    let wss_addr = listeners
        .wss
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()
        .context("wss listener address")?;
    let tls = if tls_addr.is_some() || wss_addr.is_some() {
        Some(ServerTls::load(&config.tls).context("loading the [tls] certificate and key")?)
    } else {
        None
    };
    let internal_addr = listeners
        .internal
        .local_addr()
        .context("internal listener address")?;
    let id = cim_common::ids::instance_id(&config.name);

    let mut registry = Registry::default();
    let metrics = ServerMetrics::new(&mut registry);
    backends.errors.register(&mut registry);
    let routes = backends
        .registry
        .watch(ServiceKind::Route)
        .await
        .context("watching routes in the registry")?;
    let routes_seen = routes.clone();
    let caller = Arc::new(
        RouteCaller::new(
            ClusterClient::with_keys(config.keys(), config.internal_timeout()),
            routes,
            id.clone(),
        )
        .with_call_seconds(metrics.forward_call_seconds.clone()),
    );
    let (forward, forward_rx) = ForwardQueue::new(config.forward_queue);
    let forwarder = Forwarder::new(
        forward_rx,
        caller.clone(),
        config.forward_batch_max,
        config.forward_concurrency,
    );
    let (acks, acks_rx) = AckQueue::new(ack::QUEUE_CAPACITY);
    let info = ServiceInfo {
        id: id.clone(),
        tcp_addr: config.advertised(tcp_addr, config.advertise_tcp.as_deref()),
        ws_addr: config.advertised(ws_addr, config.advertise_ws.as_deref()),
        tls_addr: tls_addr
            .map(|a| config.advertised(a, config.advertise_tls.as_deref()))
            .unwrap_or_default(),
        wss_addr: wss_addr
            .map(|a| config.advertised(a, config.advertise_wss.as_deref()))
            .unwrap_or_default(),
        internal_addr: config.advertised(internal_addr, config.advertise_internal.as_deref()),
        http_addr: String::new(),
    };
    let ttl = config.registry_ttl();
    let state = Arc::new(ServerState::with_metrics(
        id,
        config,
        backends.server_store(),
        forward,
        acks,
        metrics,
        registry,
    ));
    let websockets = [("ws_listen", Some(ws_addr)), ("wss_listen", wss_addr)];
    for (listener, addr) in ws::unchecked_listeners(&state.ws_origins, &websockets) {
        warn!(
            "{listener} {addr} is reachable beyond loopback and ws_allowed_origins is empty: \
             pages of any site may open WebSockets to this server; list your web origins"
        );
    }

    let tracker = TaskTracker::new();
    forwarder.spawn(&state.cancel, &tracker);
    tracker.spawn(prune_limits(state.clone()));
    tracker.spawn(ack::run(
        acks_rx,
        backends.server_store(),
        caller,
        state.cancel.clone(),
        tracker.clone(),
    ));
    let accept = |listener, protocol, tls: Option<&Arc<ServerTls>>| {
        accept_loop(
            state.clone(),
            listener,
            tracker.clone(),
            protocol,
            tls.cloned(),
        )
    };
    tracker.spawn(accept(listeners.tcp, Protocol::Tcp, None));
    tracker.spawn(accept(listeners.ws, Protocol::Ws, None));
    if let Some(tls) = &tls {
        if let Some(listener) = listeners.tls {
            tracker.spawn(accept(listener, Protocol::Tcp, Some(tls)));
        }
        if let Some(listener) = listeners.wss {
            tracker.spawn(accept(listener, Protocol::Ws, Some(tls)));
        }
        tracker.spawn(
            tls.clone()
                .watch(cim_common::tls::RELOAD_POLL, state.cancel.clone()),
        );
    }
    tracker.spawn(internal::serve(
        state.clone(),
        listeners.internal,
        tracker.clone(),
    ));

    // Registered last: routes assign clients only to a server that already serves them.
    let registration = match backends
        .registry
        .register(ServiceKind::Server, &info, ttl)
        .await
    {
        Ok(registration) => registration,
        Err(e) => {
            state.cancel.cancel();
            tracker.close();
            tracker.wait().await;
            return Err(anyhow!(e).context("registering in the registry"));
        }
    };
    info!(
        id = %state.id,
        tcp = %info.tcp_addr,
        ws = %info.ws_addr,
        tls = %info.tls_addr,
        wss = %info.wss_addr,
        internal = %info.internal_addr,
        "server started"
    );
    Ok(ServerHandle {
        state,
        tracker,
        registration: Some(registration),
        tcp_addr,
        ws_addr,
        tls_addr,
        wss_addr,
        internal_addr,
        tls,
        routes: routes_seen,
    })
}

impl ServerHandle {
    /// Instance id (as registered, and as routes put in connect tokens).
    pub fn id(&self) -> &str {
        &self.state.id
    }

    /// Bound client TCP address.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    /// Bound client WebSocket address (path `/ws`).
    pub fn ws_addr(&self) -> SocketAddr {
        self.ws_addr
    }

    /// Bound client TLS address, if `tls_listen` is on.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// Bound client WebSocket-over-TLS address (path `/ws`), if `wss_listen` is on.
    pub fn wss_addr(&self) -> Option<SocketAddr> {
        self.wss_addr
    }

    /// Bound internal API address.
    pub fn internal_addr(&self) -> SocketAddr {
        self.internal_addr
    }

    /// This server's metrics (what its `/metrics` serves), for a process that serves them
    /// itself (standalone).
    pub fn metrics(&self) -> Arc<dyn cim_common::metrics::Source> {
        self.state.clone()
    }

    /// Successful reloads of the TLS certificate (SIGHUP or changed files), as a watch;
    /// `None` without TLS listeners.
    pub fn tls_reloads(&self) -> Option<watch::Receiver<u64>> {
        self.tls.as_ref().map(|tls| tls.reloads())
    }

    /// Live routes this server knows of (from its registry watch): what it can forward to.
    pub fn route_count(&self) -> usize {
        self.routes.borrow().len()
    }

    /// Open client connections, including ones still logging in or closing.
    pub fn connection_count(&self) -> usize {
        self.state.admission.open()
    }

    /// Graceful stop: leaves the registry (routes stop assigning this server), stops
    /// accepting, kicks every connection with SERVER_SHUTDOWN (each is detached), and waits
    /// for tasks up to `shutdown_grace_ms`.
    pub async fn shutdown(mut self) {
        info!(id = %self.state.id, connections = self.connection_count(), "server shutting down");
        if let Some(registration) = self.registration.take() {
            if let Err(e) = registration.deregister().await {
                warn!(error = %e, "leaving the registry failed: the registration expires by itself");
            }
        }
        self.state.shutdown_connections();
        self.tracker.close();
        let grace = self.state.config.shutdown_grace();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                tasks = self.tracker.len(),
                connections = self.connection_count(),
                "shutdown grace period over with tasks still running"
            );
        }
        info!(id = %self.state.id, "server stopped");
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        // Stop serving (nothing left to do after `shutdown`). The registration, dropped with
        // the handle, stops renewing and expires.
        if !self.state.cancel.is_cancelled() {
            self.state.shutdown_connections();
        }
    }
}

/// The next client connection, or `None` once the server shuts down.
async fn next_connection(
    state: &ServerState,
    listener: &TcpListener,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            () = state.cancel.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Frames are small and latency matters more than packet count; writes
                    // are batched by the session anyway.
                    let _ = stream.set_nodelay(true);
                    return Some((stream, peer));
                }
                Err(e) => {
                    // E.g. out of file descriptors: pause rather than spin while it lasts.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
}

/// Accepts on one client listener until shutdown. Plain and TLS connections, TCP and
/// WebSocket, all end in the one `session::run`; each spawns a future of its own, so a plain
/// connection's task stays the size it was before TLS existed.
async fn accept_loop(
    state: Arc<ServerState>,
    listener: TcpListener,
    tracker: TaskTracker,
    protocol: Protocol,
    tls: Option<Arc<ServerTls>>,
) {
    while let Some((stream, peer)) = next_connection(&state, &listener).await {
        let ticket = match state.admission.admit() {
            Ok(ticket) => ticket,
            Err(why) => {
                refuse(&state, &tracker, stream, why, protocol, tls.is_some());
                continue;
            }
        };
        let state = state.clone();
        match (&tls, protocol) {
            (None, Protocol::Tcp) => {
                let transport = TcpTransport::new(stream, state.config.pre_login_limit());
                tracker.spawn(session::run(state, transport, peer, ticket));
            }
            (None, Protocol::Ws) => {
                // The handshake shares the login deadline: a client that opens a socket and
                // says nothing is dropped just the same.
                let deadline = Instant::now() + state.config.login_timeout();
                tracker.spawn(serve_ws(state, stream, peer, deadline, ticket));
            }
            (Some(tls), protocol) => {
                tracker.spawn(serve_tls(
                    state,
                    tls.clone(),
                    stream,
                    peer,
                    protocol,
                    ticket,
                ));
            }
        }
    }
    debug!(?protocol, tls = tls.is_some(), "client listener closed");
}

/// How often the rate limits forget users whose bucket is full again.
const PRUNE_LIMITS_EVERY: Duration = Duration::from_secs(60);

/// Keeps the rate limits' memory to the users who sent recently, until shutdown.
async fn prune_limits(state: Arc<ServerState>) {
    let mut every = tokio::time::interval(PRUNE_LIMITS_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = state.cancel.cancelled() => return,
            _ = every.tick() => state.send_limit.prune(),
        }
    }
}

/// Refuses a connection over a cap: counted, told why where that is cheap, closed (see
/// [`crate::admission`]).
fn refuse(
    state: &ServerState,
    tracker: &TaskTracker,
    mut stream: TcpStream,
    why: Refused,
    protocol: Protocol,
    tls: bool,
) {
    state.metrics.connections_refused.get(why as usize).inc();
    debug!(reason = Refused::LABELS[why as usize], "connection refused");
    let Some(answer) = admission::refusal(why, protocol == Protocol::Ws, tls) else {
        return;
    };
    // A new socket's send buffer is empty: the answer (~100 bytes) leaves at once, here,
    // whatever the rate of refusals.
    if !matches!(stream.try_write(&answer), Ok(n) if n == answer.len()) {
        return;
    }
    // Then, while there is a free closer, read what the client sent until it closes, so that
    // closing does not reset the connection before the client read the answer (a socket
    // closed with unread input sends RST; a client that sent nothing gets a clean close
    // anyway). Discarded a little at a time, within a deadline.
    let Ok(permit) = state.admission.refusers.clone().try_acquire_owned() else {
        return;
    };
    tracker.spawn(async move {
        let _permit = permit;
        let _ = tokio::time::timeout(admission::REFUSAL_LINGER, async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            stream.shutdown().await?;
            let mut sink = [0u8; 1024];
            while stream.read(&mut sink).await? > 0 {}
            std::io::Result::Ok(())
        })
        .await;
    });
}

/// The WebSocket handshake (by `deadline`), then the session.
async fn serve_ws<S>(
    state: Arc<ServerState>,
    stream: S,
    peer: SocketAddr,
    deadline: Instant,
    ticket: Ticket,
) where
    S: crate::tcp::ByteStream + 'static,
{
    // Boxed, like the login: it is short-lived.
    let handshake = async {
        let handshake = ws::accept(stream, state.config.max_frame_len, &state.ws_origins);
        match tokio::time::timeout_at(deadline, handshake).await {
            Ok(Ok(transport)) => Some(transport),
            Ok(Err(e)) => {
                debug!(error = %e, "websocket handshake failed");
                None
            }
            Err(_) => {
                debug!("websocket handshake timed out");
                None
            }
        }
    };
    let handshake = Box::pin(handshake.instrument(session::span(peer, "ws")));
    if let Some(transport) = handshake.await {
        session::run(state, transport, peer, ticket).await;
    }
}

/// The TLS handshake, then `protocol` over the TLS stream. The TLS and the WebSocket
/// handshakes together have the login deadline: a plain client on a TLS port fails the
/// handshake at once, one that sends nothing at the deadline, never a hang.
async fn serve_tls(
    state: Arc<ServerState>,
    tls: Arc<ServerTls>,
    stream: TcpStream,
    peer: SocketAddr,
    protocol: Protocol,
    ticket: Ticket,
) {
    let timeout = state.config.login_timeout();
    let deadline = Instant::now() + timeout;
    let kind = match protocol {
        Protocol::Tcp => "tls",
        Protocol::Ws => "wss",
    };
    let handshake = async {
        match tls.accept(stream, timeout).await {
            Ok(stream) => Some(stream),
            Err(e) => {
                debug!(error = %e, "TLS handshake failed");
                None
            }
        }
    };
    let Some(stream) = Box::pin(handshake.instrument(session::span(peer, kind))).await else {
        return;
    };
    match protocol {
        Protocol::Tcp => {
            let transport = TcpTransport::new(stream, state.config.pre_login_limit());
            session::run(state, transport, peer, ticket).await;
        }
        Protocol::Ws => serve_ws(state, stream, peer, deadline, ticket).await,
    }
}
