//! The settings of a standalone process ([`StandaloneConfig`], described in the crate docs),
//! its command line ([`Cli`]: defaults < file < `CIM_STANDALONE_*` < flags), and the route and
//! server configurations they resolve to ([`StandaloneConfig::resolve`]). Errors are
//! `cim_common::config::ConfigError`, as every binary's; those of the two roles' own checks
//! say whose configuration (`invalid route configuration: ...`).

use cim_common::{
    cli::{ConfigFlags, TlsFlags},
    config::ConfigError,
    tls::TlsConfig,
};
use cim_route::RouteConfig;
use cim_server::ServerConfig;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Environment prefix of the top-level settings.
pub const ENV_PREFIX: &str = "CIM_STANDALONE_";

/// Where the in-process internal listeners bind: loopback, any free port.
pub(crate) const INTERNAL_LISTEN: &str = "127.0.0.1:0";

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

/// Command line of `cim-standalone`; serialized, the flags that were given as the top-level
/// config layer.
#[derive(clap::Parser, Serialize, Debug, Default)]
#[command(
    name = "cim-standalone",
    version,
    about = "cim in one process: a route and a connection server, state in memory (no etcd, no Redis)"
)]
pub struct Cli {
    #[command(flatten)]
    #[serde(skip)]
    pub config: ConfigFlags,
    /// Route public HTTP API, ip:port (port 0: any free port, printed at start).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<String>,
    /// Client TCP listener, host:port.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_listen: Option<String>,
    /// Client WebSocket listener, host:port.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ws_listen: Option<String>,
    /// Metrics listener (GET /metrics), host:port.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// Client TLS listener (the TCP protocol over TLS), host:port; needs --tls-cert/--tls-key
    /// (with them the route serves HTTPS too).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_listen: Option<String>,
    /// Client WebSocket-over-TLS listener (wss://, /ws), host:port; needs the TLS files.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wss_listen: Option<String>,
    #[command(flatten)]
    #[serde(skip_serializing_if = "TlsFlags::is_empty")]
    pub tls: TlsFlags,
    /// Host handed to clients in the server addresses and the printed route URL.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_host: Option<String>,
}

impl Cli {
    /// Loads the configuration: defaults < `--config` file < `CIM_STANDALONE_*` < flags.
    pub fn load(self) -> Result<StandaloneConfig, ConfigError> {
        self.load_with_env(ENV_PREFIX)
    }

    fn load_with_env(self, env_prefix: &str) -> Result<StandaloneConfig, ConfigError> {
        self.config.load(env_prefix, &self)
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
    pub fn resolve(&self) -> Result<Resolved, ConfigError> {
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
            return Err(ConfigError::invalid(
                "standalone",
                format!("[{section}] {field}"),
                format!("is not used in standalone mode: {hint}"),
            ));
        }

        let (secret, secret_generated) = match &self.cluster_secret {
            Some(secret) => {
                cim_common::config::validate_secret(secret)
                    .map_err(|m| ConfigError::invalid("standalone", "cluster_secret", m))?;
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
        // Their errors say whose configuration ("invalid server configuration: ...").
        route.validate()?;
        server.validate()?;
        Ok(Resolved {
            route,
            server,
            secret_generated,
        })
    }
}

/// Loads `file` alone (no environment, no flags): for tools and tests that check a file.
pub fn load_file(file: &Path) -> Result<StandaloneConfig, ConfigError> {
    Cli {
        config: ConfigFlags {
            config: Some(file.to_path_buf()),
            ..ConfigFlags::default()
        },
        ..Cli::default()
    }
    .load_with_env("CIM_STANDALONE_UNUSED_PREFIX_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

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
}
