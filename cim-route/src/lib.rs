//! cim-route: the stateless HTTP service of cim. Accounts, login with single-login, round-robin
//! assignment of connection servers, all message routing (private, group, channel), for
//! clients over HTTP and for messages that connection servers forward, and the business API
//! for backends (API key): system messages, presence and its events, channels.
//!
//! # Layout
//! - [`config`]: [`RouteConfig`], defaults that work on one machine, validation.
//! - [`state`]: [`AppState`], what handlers share (backends, live-server watch, signer).
//! - [`error`]: the API's one error shape, and extractors that keep rejections in it.
//! - [`auth`]: the bearer-token extractor ([`auth::AuthUser`]), API keys ([`auth::ApiKey`]).
//! - [`api`]: the public router ([`app`]) and its handlers: `accounts`, `messages`, `presence`,
//!   `channels`, `admin` (business API), `events` (presence events for backends).
//! - [`routing`]: message routing, shared by the HTTP API and the internal forward endpoint.
//! - [`internal`]: the internal listener (`/internal/forward`, cluster-secret protected).
//! - [`events`]: presence events: the store tail shared by SSE subscribers, the webhook.
//! - [`metrics`]: the route's Prometheus metrics (`cim_route_*`), served at `/metrics` on the
//!   internal listener.
//! - [`sweep`]: removes the routes of a server that vanished, publishing `server_lost` events.
//! - [`password`]: Argon2id hashing off the async threads.
//! - [`assign`]: the server a login gets; [`throttle`]: login rate limits; [`known_users`]:
//!   accounts known to exist; [`web`]: the web client page.
//!
//! [`start`] runs an instance on already-bound listeners (tests bind `127.0.0.1:0`). With
//! `[tls]` the public listener serves HTTPS (`cim_common::tls::TlsListener`, certificate
//! reloaded on SIGHUP and on file change); the internal listener is always plain HTTP.
//!
//! Architecture invariant: no business state lives in a route between requests. Accounts,
//! logins, routes, inboxes, channels and events are in the state store, so any route
//! instance serves any request and killing one loses nothing. What an instance keeps for
//! itself is derived or local, never the truth: the registry watch of live servers and the
//! round-robin assignment over it ([`assign`]), the cache of accounts known to exist
//! ([`known_users`]: accounts never change once created), the login throttle's buckets
//! ([`throttle`]: per instance, so a limit is per route), the tail of the event stream its
//! SSE subscribers share ([`events`]), its password hashing workers ([`password`]), its
//! cim-rpc connections to servers and its metrics.

pub mod api;
pub mod assign;
pub mod auth;
pub mod config;
pub mod error;
pub mod events;
pub mod internal;
pub mod known_users;
pub mod metrics;
pub mod password;
pub mod routing;
pub mod state;
pub mod sweep;
pub mod throttle;
pub mod web;

#[cfg(test)]
mod testing;

pub use api::app;
pub use config::RouteConfig;
pub use state::AppState;

use anyhow::Context;
use cim_common::{
    backend::Backends,
    ids,
    registry::{Registration, ServiceInfo, ServiceKind},
};
use std::{net::SocketAddr, time::Duration};
use tokio::{net::TcpListener, task::AbortHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// The two listeners of a route, already bound.
pub struct Listeners {
    /// Public HTTP API.
    pub http: TcpListener,
    /// Internal API (forwards from connection servers).
    pub internal: TcpListener,
}

/// A running route instance. Dropping it stops serving without deregistering (the registry
/// entry expires with its lease, as after a crash); [`RouteHandle::shutdown`] is the clean way.
pub struct RouteHandle {
    id: String,
    state: AppState,
    http_addr: SocketAddr,
    internal_addr: SocketAddr,
    cancel: CancellationToken,
    registration: Option<Box<dyn Registration>>,
    /// Every task of the instance: the listeners, the background loops and the cim-rpc
    /// connections (upgraded out of the internal listener's HTTP server, which no longer
    /// waits for them). Shutdown waits for all of them, as the server's does for its own.
    tasks: TaskTracker,
    /// The listeners and background loops (not the cim-rpc connections), aborted when they
    /// outlive the shutdown deadline.
    aborts: Vec<AbortHandle>,
    /// How long shutdown waits for in-flight requests.
    drain: Duration,
}

impl RouteHandle {
    /// This instance's id (as registered).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The bound public address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The bound internal address.
    pub fn internal_addr(&self) -> SocketAddr {
        self.internal_addr
    }

    /// This instance's metrics (what its `/metrics` serves), for a process that serves them
    /// itself (standalone).
    pub fn metrics(&self) -> std::sync::Arc<dyn cim_common::metrics::Source> {
        std::sync::Arc::new(self.state.clone())
    }

    /// Leaves the registry first (servers stop forwarding here), then stops accepting, lets
    /// in-flight requests and cim-rpc calls finish within the request deadline, and returns.
    pub async fn shutdown(mut self) {
        if let Some(registration) = self.registration.take() {
            if let Err(e) = registration.deregister().await {
                tracing::warn!(error = %e, "deregistering failed; the entry expires with its lease");
            }
        }
        self.cancel.cancel();
        self.tasks.close();
        if tokio::time::timeout(self.drain, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = self.tasks.len(),
                "in-flight requests outlived the shutdown deadline; aborting them"
            );
            self.aborts.iter().for_each(AbortHandle::abort);
        }
        tracing::info!(id = %self.id, "route stopped");
    }
}

impl Drop for RouteHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A tap that does nothing (see the TLS listener in [`start`]).
fn ignore_io<T>(_: &mut T) {}

/// Keeps the login throttle's memory to what was limited recently, until `cancel`.
async fn prune_throttle(state: AppState, cancel: CancellationToken) {
    let mut every = tokio::time::interval(throttle::PRUNE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = every.tick() => state.throttle().prune(),
        }
    }
}

/// Serves `router` on `listener` until `cancel` fires.
async fn serve<L>(listener: L, router: axum::Router, cancel: CancellationToken, what: &str)
where
    L: axum::serve::Listener<Addr = SocketAddr>,
    SocketAddr: for<'a> axum::extract::connect_info::Connected<axum::serve::IncomingStream<'a, L>>,
{
    // The peer address is the client's for the login throttle (`throttle::ClientIp`).
    let service = router.into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, service)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
    {
        tracing::error!(listener = what, error = %e, "serving failed");
    }
}

/// Starts a route instance: watches the live servers, serves both listeners, then registers
/// in the registry (so nobody finds it before it answers).
pub async fn start(
    config: RouteConfig,
    listeners: Listeners,
    backends: Backends,
) -> anyhow::Result<RouteHandle> {
    config.validate()?;
    if config.uses_dev_secret() {
        tracing::warn!(
            "cluster_secret is the built-in development secret: anyone can forge tokens; \
             set a secret of your own outside a single development machine"
        );
    }
    let id = ids::instance_id(&config.name);
    let http_addr = listeners
        .http
        .local_addr()
        .context("reading the public listener's address")?;
    let internal_addr = listeners
        .internal
        .local_addr()
        .context("reading the internal listener's address")?;
    // HTTPS on the public listener only: internal calls stay plain on private networks.
    let tls = if config.https() {
        Some(
            cim_common::tls::ServerTls::load(&config.tls)
                .context("loading the [tls] certificate and key")?,
        )
    } else {
        None
    };
    let handshake_timeout = config.request_timeout();
    let info = ServiceInfo {
        id: id.clone(),
        http_addr: config.advertised(config.advertise_http.as_deref(), http_addr),
        internal_addr: config.advertised(config.advertise_internal.as_deref(), internal_addr),
        ..Default::default()
    };

    let servers = backends
        .registry
        .watch(ServiceKind::Server)
        .await
        .context("watching the live connection servers")?;
    let ttl = config.registry_ttl();
    let drain = config.request_timeout() + Duration::from_secs(1);
    // Events are read by backends (API key) and by the webhook; with neither, nobody could
    // read them, so there is no tail to keep.
    let events_read = !config.api_keys.is_empty() || config.webhook_url.is_some();
    let watch = servers.clone();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = metrics::RouteMetrics::new(&mut registry);
    backends.errors.register(&mut registry);
    let state = AppState::with_metrics(
        id.clone(),
        config,
        backends.route_store(),
        servers,
        metrics,
        registry,
    );

    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    let mut aborts = vec![
        tasks
            .spawn(sweep::run(state.clone(), watch, cancel.clone()))
            .abort_handle(),
        tasks
            .spawn(prune_throttle(state.clone(), cancel.clone()))
            .abort_handle(),
    ];
    if events_read {
        aborts.push(
            tasks
                .spawn(events::run_tail(state.clone(), cancel.clone()))
                .abort_handle(),
        );
        // Returns at once without a webhook_url.
        aborts.push(
            tasks
                .spawn(events::run_webhook(state.clone(), cancel.clone()))
                .abort_handle(),
        );
    }
    let public = app(state.clone());
    aborts.push(
        match &tls {
            None => tasks.spawn(serve(
                cim_common::cluster::without_nagle(listeners.http),
                public,
                cancel.clone(),
                "public",
            )),
            Some(tls) => {
                use axum::serve::ListenerExt;
                // Tapped (doing nothing) so that axum gives the peer address as connect info.
                let listener = cim_common::tls::TlsListener::new(
                    listeners.http,
                    tls.clone(),
                    handshake_timeout,
                )
                .tap_io(ignore_io as fn(&mut _));
                tasks.spawn(serve(listener, public, cancel.clone(), "public (https)"))
            }
        }
        .abort_handle(),
    );
    if let Some(tls) = tls {
        aborts.push(
            tasks
                .spawn(tls.watch(cim_common::tls::RELOAD_POLL, cancel.clone()))
                .abort_handle(),
        );
    }
    aborts.push(
        tasks
            .spawn(serve(
                cim_common::cluster::without_nagle(listeners.internal),
                internal::app(state.clone(), cancel.clone(), tasks.clone()),
                cancel.clone(),
                "internal",
            ))
            .abort_handle(),
    );
    let mut handle = RouteHandle {
        id,
        state: state.clone(),
        http_addr,
        internal_addr,
        cancel,
        registration: None,
        tasks,
        aborts,
        drain,
    };
    match backends
        .registry
        .register(ServiceKind::Route, &info, ttl)
        .await
    {
        Ok(registration) => handle.registration = Some(registration),
        Err(e) => {
            handle.shutdown().await;
            return Err(e).context("registering the route in the registry");
        }
    }
    tracing::info!(
        id = %info.id,
        http = %info.http_addr,
        internal = %info.internal_addr,
        "route started"
    );
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cim_common::{
        cluster::ClusterClient,
        config::DEV_SECRET,
        pb::cluster::{ForwardRequest, ForwardResponse},
        registry::MemoryRegistry,
        store::MemoryStore,
    };
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn start_serves_registers_and_shuts_down() {
        let registry = Arc::new(MemoryRegistry::new());
        let backends = Backends::new(Arc::new(MemoryStore::new()), registry.clone());
        let listeners = Listeners {
            http: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            internal: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let config = RouteConfig {
            advertise_http: Some("route.example:80".into()),
            ..Default::default()
        };
        let handle = start(config, listeners, backends).await.unwrap();
        assert!(handle.id().starts_with("route-"));

        let routes = registry.members(ServiceKind::Route);
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].id, handle.id());
        assert_eq!(routes[0].http_addr, "route.example:80");
        assert_eq!(routes[0].internal_addr, handle.internal_addr().to_string());

        let health = http_get(handle.http_addr(), "/healthz").await.unwrap();
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        assert!(
            health.contains(&format!("\"id\":\"{}\"", handle.id())),
            "{health}"
        );

        let client = ClusterClient::new(DEV_SECRET, Duration::from_secs(5));
        let resp: ForwardResponse = client
            .call(
                &handle.internal_addr().to_string(),
                "/internal/forward",
                &ForwardRequest::default(),
            )
            .await
            .unwrap();
        assert!(resp.results.is_empty());

        let http_addr = handle.http_addr();
        handle.shutdown().await;
        assert!(
            registry.members(ServiceKind::Route).is_empty(),
            "deregistered"
        );
        assert!(
            http_get(http_addr, "/healthz").await.is_err(),
            "no longer serving"
        );
    }

    #[tokio::test]
    async fn start_refuses_an_invalid_config() {
        let backends = Backends::new(
            Arc::new(MemoryStore::new()),
            Arc::new(MemoryRegistry::new()),
        );
        let listeners = Listeners {
            http: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            internal: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let config = RouteConfig {
            scan_batch: 0,
            ..Default::default()
        };
        let err = start(config, listeners, backends).await.err().unwrap();
        assert!(err.to_string().contains("scan_batch"), "{err}");
    }
}
