//! cim in one process: a route and a connection server sharing one in-memory store and one
//! in-memory registry ([`Backends::memory`]). No etcd, no Redis: the way to try cim on one
//! machine, and to run it where one process is enough. Nothing survives a restart.
//!
//! The two roles are the real ones (`cim_route::start`, `cim_server::start`) and talk to each
//! other as in a cluster, over their internal HTTP APIs, on loopback listeners bound to
//! ephemeral ports (they are in-process: nobody else needs to find them).
//!
//! # Configuration
//! Defaults < TOML file (`--config`) < environment (`CIM_STANDALONE_*`, top-level keys) <
//! flags. The top level holds what standalone decides for both roles; `[route]` and
//! `[server]` take any other setting of `cim-route` / `cim-server` (limits, timeouts):
//!
//! ```toml
//! http_listen = "127.0.0.1:8080"   # route: public HTTP API
//! tcp_listen = "127.0.0.1:9000"    # server: client TCP
//! ws_listen = "127.0.0.1:9001"     # server: client WebSocket (/ws)
//! metrics_listen = "127.0.0.1:9100" # GET /metrics: both roles' metrics (Prometheus)
//! # tls_listen = "127.0.0.1:9443"  # server: client TCP over TLS (needs [tls])
//! # wss_listen = "127.0.0.1:9444"  # server: client WebSocket over TLS (needs [tls])
//! # advertise_host = "192.168.1.20"  # host handed to clients (default: the bound IP)
//! # cluster_secret = "..."           # default: a random secret at every start
//! # previous_cluster_secrets = []     # still accepted during a rotation (README "Key rotation")
//! # legacy_secret = true              # accept tokens of versions before derived keys
//! # [tls]                           # set: the route serves HTTPS too
//! # cert_file = "/etc/cim/cert.pem"
//! # key_file = "/etc/cim/key.pem"
//! [route]
//! connect_token_ttl_ms = 30000
//! [server]
//! heartbeat_interval_ms = 10000
//! ```
//!
//! With `[tls]` the route's API is HTTPS (the printed URL says `https://`), and
//! `tls_listen` / `wss_listen` serve the server's protocols over TLS with the same
//! certificate; the plain listeners stay.
//!
//! `[server] ws_allowed_origins` (the WebSocket Origin allow-list, empty: every origin) gets
//! the route's own URL added when set, so the web page it serves keeps working; list any other
//! name the page is opened under.
//!
//! Listen addresses, `advertise_host`, `cluster_secret` (and `previous_cluster_secrets`,
//! `legacy_secret`) and `tls` inside `[route]` /
//! `[server]` are refused (they belong to the top level); their `backend` sections are ignored, since the
//! state is in memory.
//!
//! # Metrics
//! In a cluster each role serves its metrics on its internal listener; here those listeners
//! are on ephemeral loopback ports, so standalone serves `GET /metrics` on a listener of its
//! own (`metrics_listen`): the route's metrics, the server's, and the process's, in one
//! answer (their names never overlap; the backends' error counters are in the route's part).
//!
//! The configuration (the settings, the flags, how both roles' configurations are made of
//! them) is in `config.rs`; this file starts and stops the two roles.

mod config;

pub use config::{load_file, Cli, Resolved, StandaloneConfig, ENV_PREFIX};

use anyhow::Context;
use cim_common::{
    backend::Backends,
    cli::{bind, bind_optional},
};
use cim_route::RouteHandle;
use cim_server::ServerHandle;
use config::INTERNAL_LISTEN;

/// A running standalone process: both roles.
pub struct Standalone {
    route: RouteHandle,
    server: ServerHandle,
    route_url: String,
    tcp_addr: String,
    ws_addr: String,
    metrics_addr: std::net::SocketAddr,
    /// Serves `/metrics` (aborted on shutdown: it holds no state).
    metrics_task: tokio::task::JoinHandle<()>,
    tls_addr: Option<String>,
    wss_addr: Option<String>,
}

/// Starts both roles on shared in-memory backends. Every listener is bound before either
/// role starts, so a taken port fails the start with nothing left running.
pub async fn start(config: &StandaloneConfig) -> anyhow::Result<Standalone> {
    let Resolved {
        mut route,
        mut server,
        secret_generated,
    } = config.resolve()?;
    let defaults = cim_common::backend::BackendConfig::default();
    if route.backend != defaults || server.backend != defaults {
        tracing::warn!(
            "standalone keeps all state in memory: the [route.backend] / [server.backend] \
             settings are not used"
        );
    }
    if secret_generated {
        tracing::info!("no cluster_secret configured: using a random one for this run");
    }

    let route_listeners = cim_route::Listeners {
        http: bind("http_listen", &route.http_listen).await?,
        internal: bind("the route's internal listener", INTERNAL_LISTEN).await?,
    };
    let server_listeners = cim_server::Listeners {
        tcp: bind("tcp_listen", &server.tcp_listen).await?,
        ws: bind("ws_listen", &server.ws_listen).await?,
        tls: bind_optional("tls_listen", server.tls_listen()).await?,
        wss: bind_optional("wss_listen", server.wss_listen()).await?,
        internal: bind("the server's internal listener", INTERNAL_LISTEN).await?,
    };
    // Internal calls stay on loopback whatever host clients are given.
    route.advertise_internal = Some(route_listeners.internal.local_addr()?.to_string());
    server.advertise_internal = Some(server_listeners.internal.local_addr()?.to_string());
    let route_url = format!(
        "{}://{}",
        if route.https() { "https" } else { "http" },
        route.advertised(
            route.advertise_http.as_deref(),
            route_listeners.http.local_addr()?
        )
    );
    // The web page is served by the route: its own origin must keep its WebSocket when the
    // list is set. Other names the page is opened under (another host name, a proxy) are
    // listed by the operator.
    if !server.ws_allowed_origins.is_empty() && !server.ws_allowed_origins.contains(&route_url) {
        server.ws_allowed_origins.push(route_url.clone());
    }
    let tcp_addr = server.advertised(
        server_listeners.tcp.local_addr()?,
        server.advertise_tcp.as_deref(),
    );
    let ws_addr = server.advertised(
        server_listeners.ws.local_addr()?,
        server.advertise_ws.as_deref(),
    );
    let metrics_listener = bind("metrics_listen", &config.metrics_listen).await?;
    let metrics_addr = metrics_listener.local_addr()?;
    let advertised = |listener: Option<&tokio::net::TcpListener>, full: Option<&str>| {
        listener
            .map(|l| l.local_addr().map(|a| server.advertised(a, full)))
            .transpose()
    };
    let tls_addr = advertised(
        server_listeners.tls.as_ref(),
        server.advertise_tls.as_deref(),
    )?;
    let wss_addr = advertised(
        server_listeners.wss.as_ref(),
        server.advertise_wss.as_deref(),
    )?;

    let backends = Backends::memory();
    let route = cim_route::start(route, route_listeners, backends.clone())
        .await
        .context("starting the route")?;
    let server = match cim_server::start(server, server_listeners, backends).await {
        Ok(server) => server,
        Err(e) => {
            route.shutdown().await;
            return Err(e.context("starting the connection server"));
        }
    };
    let metrics_task = tokio::spawn(serve_metrics(
        metrics_listener,
        [route.metrics(), server.metrics()],
    ));
    Ok(Standalone {
        route,
        server,
        route_url,
        tcp_addr,
        ws_addr,
        metrics_addr,
        metrics_task,
        tls_addr,
        wss_addr,
    })
}

/// Serves `GET /metrics` of both roles (route first) on `listener`.
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    sources: [std::sync::Arc<dyn cim_common::metrics::Source>; 2],
) {
    let sources = std::sync::Arc::new(sources);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let sources = sources.clone();
            async move {
                let [route, server] = &*sources;
                cim_common::metrics::respond_sources(&[route.as_ref(), server.as_ref()])
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the metrics listener stopped");
    }
}

impl Standalone {
    /// Base URL of the route's HTTP API, as clients should use it.
    pub fn route_url(&self) -> &str {
        &self.route_url
    }

    /// Client TCP address (advertised).
    pub fn tcp_addr(&self) -> &str {
        &self.tcp_addr
    }

    /// Client WebSocket address (advertised; path `/ws`).
    pub fn ws_addr(&self) -> &str {
        &self.ws_addr
    }

    /// Bound address of `GET /metrics`.
    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        self.metrics_addr
    }

    /// Client TLS address (advertised), if `tls_listen` is on.
    pub fn tls_addr(&self) -> Option<&str> {
        self.tls_addr.as_deref()
    }

    /// Client WebSocket-over-TLS address (advertised; `wss://…/ws`), if `wss_listen` is on.
    pub fn wss_addr(&self) -> Option<&str> {
        self.wss_addr.as_deref()
    }

    /// What the binary prints at start: where everything is and how to connect. The
    /// `route:`, `tcp:`, `ws:` (and, when on, `tls:` and `wss:`) lines are stable (tests
    /// and scripts read them).
    pub fn banner(&self) -> String {
        let url = &self.route_url;
        let mut secure = String::new();
        if let Some(tls) = &self.tls_addr {
            secure.push_str(&format!("tls: {tls}\n"));
        }
        if let Some(wss) = &self.wss_addr {
            secure.push_str(&format!("wss: wss://{wss}/ws\n"));
        }
        format!(
            "cim standalone: a route and a connection server in one process, all state in \
             memory (no etcd, no Redis; nothing survives a restart)\n\
             route: {url}\n\
             tcp: {tcp}\n\
             ws: ws://{ws}/ws\n\
             metrics: http://{metrics}/metrics\n\
             {secure}\
             Chat from other terminals (one per user):\n  \
             cim-client --route {url} --name alice --register\n  \
             (from this checkout, built by ./start.sh: target/release/cim-client --route {url} --name alice --register)\n\
             Stop with ctrl-c.\n",
            tcp = self.tcp_addr,
            ws = self.ws_addr,
            metrics = self.metrics_addr,
        )
    }

    /// Graceful stop: the connection server first (clients get a shutdown kick and are
    /// detached, their last sends still reach the route), then the route.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
        self.route.shutdown().await;
        self.metrics_task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cim_route::RouteConfig;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn http_get(url_host: &str, path: &str) -> std::io::Result<String> {
        let mut s = tokio::net::TcpStream::connect(url_host).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn the_route_sees_the_server_through_the_shared_registry() {
        let config = StandaloneConfig {
            http_listen: "127.0.0.1:0".into(),
            tcp_listen: "127.0.0.1:0".into(),
            ws_listen: "127.0.0.1:0".into(),
            ..Default::default()
        };
        let running = start(&config).await.unwrap();
        let host = running
            .route_url()
            .strip_prefix("http://")
            .unwrap()
            .to_string();
        assert!(
            host.starts_with("127.0.0.1:") && !host.ends_with(":0"),
            "{host}"
        );
        let banner = running.banner();
        assert!(
            banner.contains(&format!("route: http://{host}\n")),
            "{banner}"
        );
        assert!(
            banner.contains(&format!("tcp: {}\n", running.tcp_addr())),
            "{banner}"
        );

        let servers = http_get(&host, "/api/servers").await.unwrap();
        assert!(servers.starts_with("HTTP/1.1 200"), "{servers}");
        assert!(
            servers.contains(&format!("\"tcp_addr\":\"{}\"", running.tcp_addr())),
            "{servers}"
        );

        running.shutdown().await;
        assert!(http_get(&host, "/healthz").await.is_err(), "stopped");
    }

    /// The status line answering a WebSocket upgrade of `/ws` at `addr` from `origin`.
    async fn ws_upgrade_status(addr: &str, origin: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Origin: {origin}\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 256];
        let n = s.read(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
        answer.lines().next().unwrap_or_default().to_string()
    }

    #[tokio::test]
    async fn the_web_page_keeps_its_websocket_when_origins_are_listed() {
        let mut config = StandaloneConfig {
            http_listen: "127.0.0.1:0".into(),
            tcp_listen: "127.0.0.1:0".into(),
            ws_listen: "127.0.0.1:0".into(),
            metrics_listen: "127.0.0.1:0".into(),
            ..Default::default()
        };
        config.server.ws_allowed_origins = vec!["https://chat.example.com".into()];
        let running = start(&config).await.unwrap();
        let ws = running.ws_addr().to_string();
        let page = running.route_url().to_string();
        for (origin, status) in [
            (page.as_str(), "101"),
            ("https://chat.example.com", "101"),
            ("https://evil.example", "403"),
        ] {
            let line = ws_upgrade_status(&ws, origin).await;
            assert!(line.contains(status), "{origin}: {line}");
        }
        running.shutdown().await;
        // Unset, nothing is added: every origin passes.
        let resolved = StandaloneConfig::default().resolve().unwrap();
        assert!(resolved.server.ws_allowed_origins.is_empty());
    }

    #[tokio::test]
    async fn tls_everywhere_in_one_process() {
        use cim_sdk::{Client, ClientConfig, ConnState, Event, TlsMode, Transport};
        let pki = cim_tests::tls::TestPki::new();
        let config = StandaloneConfig {
            http_listen: "127.0.0.1:0".into(),
            tcp_listen: "127.0.0.1:0".into(),
            ws_listen: "127.0.0.1:0".into(),
            metrics_listen: "127.0.0.1:0".into(),
            tls_listen: Some("127.0.0.1:0".into()),
            wss_listen: Some("127.0.0.1:0".into()),
            tls: pki.tls_config(),
            route: RouteConfig {
                password_memory_kib: 1024,
                password_iterations: 1,
                ..RouteConfig::default()
            },
            ..Default::default()
        };
        let running = start(&config).await.unwrap();
        let url = running.route_url().to_string();
        assert!(url.starts_with("https://127.0.0.1:"), "{url}");
        let (tls, wss) = (running.tls_addr().unwrap(), running.wss_addr().unwrap());
        let banner = running.banner();
        assert!(banner.contains(&format!("route: {url}\n")), "{banner}");
        assert!(banner.contains(&format!("tls: {tls}\n")), "{banner}");
        assert!(
            banner.contains(&format!("wss: wss://{wss}/ws\n")),
            "{banner}"
        );

        let deadline = std::time::Duration::from_secs(20);
        let mut clients = Vec::new();
        for (name, transport, expected) in [
            ("alice", Transport::Tcp, tls),
            ("bob", Transport::WsJson, wss),
        ] {
            let config = ClientConfig {
                transport,
                tls: TlsMode::Auto,
                ca_file: Some(pki.ca_file.clone()),
                ..ClientConfig::new(&url, name, "password-1")
            };
            Client::register_with(&config).await.unwrap();
            let (client, mut events) = Client::connect(config).await.unwrap();
            match tokio::time::timeout(deadline, events.next()).await.unwrap() {
                Some(Event::State(ConnState::Connected { addr, .. })) => assert_eq!(addr, expected),
                other => panic!("{name}: {other:?}"),
            }
            clients.push((client, events));
        }
        let bob_id = clients[1].0.info().user_id;
        clients[0]
            .0
            .send(bob_id.into(), "hello over TLS")
            .await
            .unwrap();
        let events = &mut clients[1].1;
        loop {
            match tokio::time::timeout(deadline, events.next()).await.unwrap() {
                Some(Event::Message { message, .. }) => {
                    assert_eq!(message.body, "hello over TLS");
                    break;
                }
                Some(_) => continue,
                None => panic!("bob's events ended"),
            }
        }
        drop(clients);
        running.shutdown().await;
    }

    #[tokio::test]
    async fn a_taken_port_fails_the_start_naming_it() {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let config = StandaloneConfig {
            http_listen: "127.0.0.1:0".into(),
            tcp_listen: "127.0.0.1:0".into(),
            ws_listen: addr.clone(),
            ..Default::default()
        };
        let err = start(&config).await.err().expect("the port is taken");
        assert_eq!(
            err.to_string(),
            format!("cannot listen on ws_listen {addr}")
        );
    }
}
