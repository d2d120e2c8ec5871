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

use anyhow::{anyhow, Context};
use cim_common::{
    backend::Backends,
    cli::{bind, bind_optional},
    tls::TlsConfig,
};
use cim_route::{RouteConfig, RouteHandle};
use cim_server::{ServerConfig, ServerHandle};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Environment prefix of the top-level settings.
pub const ENV_PREFIX: &str = "CIM_STANDALONE_";

/// Where the in-process internal listeners bind: loopback, any free port.
const INTERNAL_LISTEN: &str = "127.0.0.1:0";

/// The settings of a standalone process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct StandaloneConfig {
    /// The route's public HTTP API.
    pub http_listen: String,
    /// The connection server's client TCP listener.
    pub tcp_listen: String,
    /// The connection server's client WebSocket listener (path `/ws`).
    pub ws_listen: String,
    /// `GET /metrics` (Prometheus text format) of both roles. Keep it off public networks.
    pub metrics_listen: String,
    /// The connection server's client TLS listener (TCP protocol over TLS); needs `[tls]`.
    pub tls_listen: Option<String>,
    /// The connection server's WebSocket-over-TLS listener (`wss://`, `/ws`); needs `[tls]`.
    pub wss_listen: Option<String>,
    /// Certificate and key (PEM files) of the TLS listeners and of the route's HTTPS.
    /// Unset: plain HTTP.
    pub tls: TlsConfig,
    /// Host put into the addresses handed to clients; default: the bound IP (127.0.0.1 for a
    /// wildcard bind).
    pub advertise_host: Option<String>,
    /// Signs tokens and authenticates the internal calls between the two roles. `None`: a
    /// random secret at every start (tokens then die with the process, like all its state).
    pub cluster_secret: Option<String>,
    /// Other accepted secrets (a rotation of a configured `cluster_secret`): tokens signed
    /// with them before a restart still verify. At most 4.
    pub previous_cluster_secrets: Vec<String>,
    /// Accept tokens signed with the raw secret by versions before derived keys (and the raw
    /// secret on the internal calls between the two roles, which are on loopback). Off
    /// changes nothing for a random secret: no earlier token can exist.
    pub legacy_secret: bool,
    /// Any other route setting.
    pub route: RouteConfig,
    /// Any other connection-server setting.
    pub server: ServerConfig,
}

impl Default for StandaloneConfig {
    fn default() -> Self {
        Self {
            http_listen: "127.0.0.1:8080".into(),
            tcp_listen: "127.0.0.1:9000".into(),
            ws_listen: "127.0.0.1:9001".into(),
            metrics_listen: "127.0.0.1:9100".into(),
            tls_listen: None,
            wss_listen: None,
            tls: TlsConfig::default(),
            advertise_host: None,
            cluster_secret: None,
            previous_cluster_secrets: Vec::new(),
            legacy_secret: true,
            route: RouteConfig::default(),
            server: ServerConfig::default(),
        }
    }
}

/// Command line of `cim-standalone`.
#[derive(clap::Parser, Debug, Default)]
#[command(
    name = "cim-standalone",
    version,
    about = "cim in one process: a route and a connection server, state in memory (no etcd, no Redis)"
)]
pub struct Cli {
    /// TOML configuration file (top-level keys, plus [route] and [server] sections).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Route public HTTP API, ip:port (port 0: any free port, printed at start).
    #[arg(long)]
    pub http_listen: Option<String>,
    /// Client TCP listener, host:port.
    #[arg(long)]
    pub tcp_listen: Option<String>,
    /// Client WebSocket listener, host:port.
    #[arg(long)]
    pub ws_listen: Option<String>,
    /// Metrics listener (GET /metrics), host:port.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Client TLS listener (the TCP protocol over TLS), host:port; needs --tls-cert/--tls-key.
    #[arg(long)]
    pub tls_listen: Option<String>,
    /// Client WebSocket-over-TLS listener (wss://, /ws), host:port; needs the TLS files.
    #[arg(long)]
    pub wss_listen: Option<String>,
    /// Certificate chain, PEM ([tls] cert_file): the route serves HTTPS, and the TLS
    /// listeners use it.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// Private key of the certificate, PEM ([tls] key_file).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Host handed to clients in the server addresses and the printed route URL.
    #[arg(long)]
    pub advertise_host: Option<String>,
    /// Any setting (`--set route.login_conflict=replace`, `--set server.max_connections=5000`,
    /// top-level ones without a section).
    #[command(flatten)]
    pub settings: cim_common::cli::SetFlags,
}

/// The flags that were given, as a config layer (absent ones left out).
#[derive(Serialize)]
struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    http_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ws_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wss_listen: Option<String>,
    #[serde(skip_serializing_if = "cim_common::cli::TlsFlags::is_empty")]
    tls: cim_common::cli::TlsFlags,
    #[serde(skip_serializing_if = "Option::is_none")]
    advertise_host: Option<String>,
}

impl Cli {
    /// Loads the configuration: defaults < `--config` file < `CIM_STANDALONE_*` < flags.
    pub fn load(self) -> anyhow::Result<StandaloneConfig> {
        self.load_with_env(ENV_PREFIX)
    }

    fn load_with_env(self, env_prefix: &str) -> anyhow::Result<StandaloneConfig> {
        let overrides = Overrides {
            http_listen: self.http_listen,
            tcp_listen: self.tcp_listen,
            ws_listen: self.ws_listen,
            metrics_listen: self.metrics_listen,
            tls_listen: self.tls_listen,
            wss_listen: self.wss_listen,
            tls: cim_common::cli::TlsFlags {
                cert_file: self.tls_cert,
                key_file: self.tls_key,
            },
            advertise_host: self.advertise_host,
        };
        cim_common::config::load_with_settings(
            self.config.as_deref(),
            env_prefix,
            &overrides,
            &self.settings.set,
        )
        .context("loading the configuration")
    }
}

/// A fresh random cluster secret: 32 random bytes as hex (printable, no spaces).
fn random_secret() -> String {
    rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The route and server configurations a standalone process runs.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub route: RouteConfig,
    pub server: ServerConfig,
    /// The cluster secret was generated for this start.
    pub secret_generated: bool,
}

impl StandaloneConfig {
    /// The configurations of both roles: the top-level settings put into each, internal
    /// listeners on loopback ports chosen at bind time, one cluster secret. Fails, naming the
    /// setting, on a top-level setting given inside a section or on an invalid value.
    pub fn resolve(&self) -> anyhow::Result<Resolved> {
        let (route_defaults, server_defaults) = (RouteConfig::default(), ServerConfig::default());
        let misplaced = [
            (
                "route",
                "http_listen",
                self.route.http_listen != route_defaults.http_listen,
            ),
            (
                "route",
                "internal_listen",
                self.route.internal_listen != route_defaults.internal_listen,
            ),
            (
                "route",
                "advertise_host",
                self.route.advertise_host.is_some(),
            ),
            (
                "route",
                "cluster_secret",
                self.route.cluster_secret != route_defaults.cluster_secret,
            ),
            (
                "route",
                "previous_cluster_secrets",
                !self.route.previous_cluster_secrets.is_empty(),
            ),
            (
                "route",
                "legacy_secret",
                self.route.legacy_secret != route_defaults.legacy_secret,
            ),
            (
                "server",
                "previous_cluster_secrets",
                !self.server.previous_cluster_secrets.is_empty(),
            ),
            (
                "server",
                "legacy_secret",
                self.server.legacy_secret != server_defaults.legacy_secret,
            ),
            (
                "server",
                "tcp_listen",
                self.server.tcp_listen != server_defaults.tcp_listen,
            ),
            (
                "server",
                "ws_listen",
                self.server.ws_listen != server_defaults.ws_listen,
            ),
            ("route", "tls", self.route.tls.is_set()),
            ("server", "tls", self.server.tls.is_set()),
            ("server", "tls_listen", self.server.tls_listen.is_some()),
            ("server", "wss_listen", self.server.wss_listen.is_some()),
            (
                "server",
                "internal_listen",
                self.server.internal_listen != server_defaults.internal_listen,
            ),
            (
                "server",
                "advertise_host",
                self.server.advertise_host.is_some(),
            ),
            (
                "server",
                "cluster_secret",
                self.server.cluster_secret != server_defaults.cluster_secret,
            ),
        ];
        if let Some((section, field, _)) = misplaced.iter().find(|(_, _, set)| *set) {
            // Silently preferring one of two places would leave a listener where nobody expects it.
            let hint = if field.starts_with("internal") {
                "standalone binds its internal listeners to loopback itself".to_string()
            } else {
                format!("set {field} at the top level of the standalone configuration")
            };
            return Err(anyhow!(
                "[{section}] {field} is not used in standalone mode: {hint}"
            ));
        }

        let (secret, secret_generated) = match &self.cluster_secret {
            Some(secret) => {
                cim_common::config::validate_secret(secret).map_err(anyhow::Error::msg)?;
                (secret.clone(), false)
            }
            None => (random_secret(), true),
        };
        let route = RouteConfig {
            http_listen: self.http_listen.clone(),
            internal_listen: INTERNAL_LISTEN.into(),
            advertise_host: self.advertise_host.clone(),
            cluster_secret: secret.clone(),
            previous_cluster_secrets: self.previous_cluster_secrets.clone(),
            legacy_secret: self.legacy_secret,
            tls: self.tls.clone(),
            ..self.route.clone()
        };
        let server = ServerConfig {
            tcp_listen: self.tcp_listen.clone(),
            ws_listen: self.ws_listen.clone(),
            tls_listen: self.tls_listen.clone(),
            wss_listen: self.wss_listen.clone(),
            tls: self.tls.clone(),
            internal_listen: INTERNAL_LISTEN.into(),
            advertise_host: self.advertise_host.clone(),
            cluster_secret: secret,
            previous_cluster_secrets: self.previous_cluster_secrets.clone(),
            legacy_secret: self.legacy_secret,
            ..self.server.clone()
        };
        route.validate()?;
        server
            .validate()
            .map_err(|e| anyhow!("invalid server configuration: {e}"))?;
        Ok(Resolved {
            route,
            server,
            secret_generated,
        })
    }
}

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

/// Loads `file` alone (no environment, no flags): for tools and tests that check a file.
pub fn load_file(file: &Path) -> anyhow::Result<StandaloneConfig> {
    Cli {
        config: Some(file.to_path_buf()),
        ..Cli::default()
    }
    .load_with_env("CIM_STANDALONE_UNUSED_PREFIX_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("cim-standalone").chain(args.iter().copied())).unwrap()
    }

    fn file(dir: &tempfile::TempDir, text: &str) -> String {
        let path = dir.path().join("standalone.toml");
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }

    #[test]
    fn any_setting_of_either_role_comes_from_set_flags() {
        let config = cli(&[
            "--set",
            "route.login_conflict=replace",
            "--set",
            "server.send_rate_per_sec=7",
            "--set",
            "metrics_listen=127.0.0.1:9999",
        ])
        .load_with_env("CIM_STANDALONE_TEST_UNUSED_")
        .unwrap();
        assert_eq!(
            config.route.login_conflict,
            cim_route::config::LoginConflict::Replace
        );
        assert_eq!(config.server.send_rate_per_sec, 7);
        assert_eq!(config.metrics_listen, "127.0.0.1:9999");
    }

    #[test]
    fn defaults_bind_loopback_and_generate_a_secret() {
        let config = cli(&[])
            .load_with_env("CIM_STANDALONE_TEST_UNUSED_")
            .unwrap();
        assert_eq!(config, StandaloneConfig::default());
        let one = config.resolve().unwrap();
        assert_eq!(one.route.http_listen, "127.0.0.1:8080");
        assert_eq!(one.server.tcp_listen, "127.0.0.1:9000");
        assert_eq!(one.server.ws_listen, "127.0.0.1:9001");
        assert_eq!(one.route.internal_listen, "127.0.0.1:0");
        assert_eq!(one.server.internal_listen, "127.0.0.1:0");
        assert!(one.secret_generated);
        assert_eq!(one.route.cluster_secret, one.server.cluster_secret);
        assert!(!one.route.uses_dev_secret(), "no dev-secret warning");
        cim_common::config::validate_secret(&one.route.cluster_secret).unwrap();
        let two = config.resolve().unwrap();
        assert_ne!(one.route.cluster_secret, two.route.cluster_secret);
    }

    #[test]
    fn the_example_file_is_valid_and_states_the_defaults() {
        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/standalone.toml");
        let config = load_file(&example).unwrap();
        assert_eq!(config, StandaloneConfig::default());
        config.resolve().unwrap();
    }

    #[test]
    fn file_then_flags_and_sections_tune_each_role() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(
            &dir,
            "http_listen = \"127.0.0.1:18080\"\ntcp_listen = \"127.0.0.1:19000\"\n\
             cluster_secret = \"a-configured-secret-123\"\n\
             [route]\nconnect_token_ttl_ms = 1234\n[server]\nheartbeat_interval_ms = 2000\n",
        );
        let config = cli(&[
            "--config",
            &path,
            "--tcp-listen",
            "127.0.0.1:29000",
            "--advertise-host",
            "im.example.org",
        ])
        .load_with_env("CIM_STANDALONE_TEST_UNUSED_")
        .unwrap();
        let r = config.resolve().unwrap();
        assert_eq!(r.route.http_listen, "127.0.0.1:18080", "from the file");
        assert_eq!(r.server.tcp_listen, "127.0.0.1:29000", "the flag wins");
        assert_eq!(r.server.ws_listen, "127.0.0.1:9001", "default");
        assert_eq!(r.route.connect_token_ttl_ms, 1234);
        assert_eq!(r.server.heartbeat_interval_ms, 2000);
        assert_eq!(r.route.advertise_host.as_deref(), Some("im.example.org"));
        assert_eq!(r.server.advertise_host.as_deref(), Some("im.example.org"));
        assert!(!r.secret_generated);
        assert_eq!(r.route.cluster_secret, "a-configured-secret-123");
        assert_eq!(r.server.cluster_secret, "a-configured-secret-123");
    }

    #[test]
    fn every_section_from_the_environment() {
        // `[route]`, `[server]` and a section inside them through `SECTION__FIELD`.
        let prefix = "CIM_STANDALONE_TEST_NEST_";
        let vars = [
            ("HTTP_LISTEN", "127.0.0.1:18081"),
            ("ROUTE__CONNECT_TOKEN_TTL_MS", "4321"),
            ("ROUTE__API_KEYS", "[\"a-backend-key-of-16+\"]"),
            ("ROUTE__BACKEND__INBOX_MAX_MESSAGES", "77"),
            ("SERVER__HEARTBEAT_INTERVAL_MS", "3000"),
            ("SERVER__BACKEND__PREFIX", "solo"),
        ];
        for (name, value) in vars {
            std::env::set_var(format!("{prefix}{name}"), value);
        }
        let loaded = cli(&[]).load_with_env(prefix);
        for (name, _) in vars {
            std::env::remove_var(format!("{prefix}{name}"));
        }
        let config = loaded.unwrap();
        assert_eq!(config.http_listen, "127.0.0.1:18081");
        assert_eq!(config.route.connect_token_ttl_ms, 4321);
        assert_eq!(config.route.api_keys, ["a-backend-key-of-16+"]);
        assert_eq!(config.route.backend.inbox_max_messages, 77);
        assert_eq!(config.server.heartbeat_interval_ms, 3000);
        assert_eq!(config.server.backend.prefix, "solo");
        config.resolve().unwrap();
    }

    #[test]
    fn top_level_settings_inside_a_section_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (text, names) in [
            (
                "[route]\nhttp_listen = \"127.0.0.1:1\"\n",
                "[route] http_listen",
            ),
            (
                "[server]\ntcp_listen = \"127.0.0.1:1\"\n",
                "[server] tcp_listen",
            ),
            (
                "[server]\ncluster_secret = \"0123456789abcdefgh\"\n",
                "[server] cluster_secret",
            ),
            (
                "[route]\ninternal_listen = \"0.0.0.0:8081\"\n",
                "[route] internal_listen",
            ),
        ] {
            let config = load_file(Path::new(&file(&dir, text))).unwrap();
            let err = config.resolve().unwrap_err().to_string();
            assert!(err.contains(names), "{err}");
        }
        // Unknown keys, and bad values, are named too.
        let err = load_file(Path::new(&file(&dir, "htp_listen = \"x\"\n"))).unwrap_err();
        assert!(format!("{err:#}").contains("htp_listen"), "{err:#}");
        let config = load_file(Path::new(&file(&dir, "cluster_secret = \"short\"\n"))).unwrap();
        let err = config.resolve().unwrap_err().to_string();
        assert!(err.contains("cluster_secret"), "{err}");
    }

    #[test]
    fn tls_settings_go_to_both_roles_and_only_at_the_top_level() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(
            &dir,
            "tls_listen = \"127.0.0.1:19443\"\nwss_listen = \"127.0.0.1:19444\"\n\
             [tls]\ncert_file = \"/etc/cim/cert.pem\"\nkey_file = \"/etc/cim/key.pem\"\n",
        );
        let r = load_file(Path::new(&path)).unwrap().resolve().unwrap();
        assert_eq!(r.server.tls_listen(), Some("127.0.0.1:19443"));
        assert_eq!(r.server.wss_listen(), Some("127.0.0.1:19444"));
        assert_eq!(r.server.tls, r.route.tls);
        assert!(r.route.https(), "[tls] makes the route HTTPS too");
        let config = cli(&[
            "--wss-listen",
            "127.0.0.1:29444",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
        ])
        .load_with_env("CIM_STANDALONE_TEST_UNUSED_")
        .unwrap();
        let r = config.resolve().unwrap();
        assert_eq!(r.server.wss_listen(), Some("127.0.0.1:29444"));
        assert_eq!(r.route.tls.key_file.as_deref(), Some(Path::new("k.pem")));
        // A TLS listener without [tls]: the server's validation names it.
        let config = cli(&["--tls-listen", "127.0.0.1:29443"])
            .load_with_env("CIM_STANDALONE_TEST_UNUSED_")
            .unwrap();
        let err = config.resolve().unwrap_err().to_string();
        assert!(err.contains("tls_listen") && err.contains("[tls]"), "{err}");
        for (text, names) in [
            (
                "[server]\ntls_listen = \"127.0.0.1:1\"\n",
                "[server] tls_listen",
            ),
            ("[server.tls]\ncert_file = \"c.pem\"\n", "[server] tls"),
            ("[route.tls]\nkey_file = \"k.pem\"\n", "[route] tls"),
        ] {
            let config = load_file(Path::new(&file(&dir, text))).unwrap();
            let err = config.resolve().unwrap_err().to_string();
            assert!(err.contains(names), "{err}");
        }
    }

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
