//! Configuration of a connection server: where it listens, what it advertises in the registry,
//! the cluster secret, the backends, and every limit (timeouts, queue capacities, frame size).
//!
//! Loaded by the binary through `cim_common::config::load` (defaults < file < environment
//! `CIM_SERVER_*` < flags); [`ServerConfig::default`] runs a server on one machine as is.
//! [`ServerConfig::validate`] names the first bad field (`cim_common::config::ConfigError`,
//! as every binary's).

use cim_common::{backend::BackendConfig, config::ConfigError, tls::TlsConfig};
use serde::{Deserialize, Serialize};
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

/// Largest accepted `max_frame_len`: the WebSocket layer and the internal API are sized for it.
const MAX_FRAME_LEN_LIMIT: usize = 16 * 1024 * 1024;
// A forward call carrying one send of that size, with its envelope, fits an internal body.
const _: () = assert!(cim_common::cluster::MAX_BODY >= MAX_FRAME_LEN_LIMIT + 64 * 1024);
/// Smallest accepted `max_frame_len`: a `Login` frame with its token must fit.
const MIN_FRAME_LEN: usize = 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Instance name; the instance id is `{name}-{random}`.
    pub name: String,
    /// Client TCP listener.
    pub tcp_listen: String,
    /// Client WebSocket listener (path `/ws`).
    pub ws_listen: String,
    /// Client TLS listener: the TCP protocol (delimited protobuf) over TLS. `None` or empty:
    /// off. Needs `[tls]`.
    pub tls_listen: Option<String>,
    /// Client WebSocket-over-TLS listener (`wss://`, path `/ws`). `None` or empty: off.
    /// Needs `[tls]`.
    pub wss_listen: Option<String>,
    /// Origins whose pages may open WebSockets (ws and wss): exact origins
    /// (`https://chat.example.com`) or every subdomain of a domain (`https://*.example.com`).
    /// A handshake with another `Origin` is answered 403; one without (SDK, mobile apps) passes.
    /// Empty: every origin (the server warns when a WebSocket listener binds beyond loopback).
    pub ws_allowed_origins: Vec<String>,
    /// Internal API listener (pushes and kicks from routes). Keep it off public networks:
    /// it is plain HTTP (cluster secret), never TLS.
    pub internal_listen: String,
    /// Host put into the addresses registered in etcd. `None`: the bound IP, or 127.0.0.1 when
    /// bound to a wildcard address.
    pub advertise_host: Option<String>,
    /// Full `host:port` overrides of the registered addresses (e.g. behind NAT or a proxy).
    pub advertise_tcp: Option<String>,
    pub advertise_ws: Option<String>,
    pub advertise_tls: Option<String>,
    pub advertise_wss: Option<String>,
    pub advertise_internal: Option<String>,
    /// Certificate and key of `tls_listen` / `wss_listen` (PEM files), reloaded on SIGHUP
    /// and when the files change.
    pub tls: TlsConfig,
    /// Shared by every server and route. Never used as a key itself: HKDF derives a
    /// token-signing key and an internal-auth key from it (`cim_common::secret`).
    pub cluster_secret: String,
    /// Other accepted secrets during a rotation (at most 4): tokens signed with their keys
    /// and internal calls proved with them are accepted; outgoing calls carry a proof of
    /// each. New tokens and proofs use `cluster_secret` first. See README "Key rotation".
    pub previous_cluster_secrets: Vec<String>,
    /// Compatibility with versions before derived keys, for a rolling upgrade: also send the
    /// raw secret in clear (`x-cim-cluster-secret`) and accept it, and accept tokens signed
    /// with it. Turn it off once every node runs this version and old tokens have expired:
    /// until then a captured header still forges tokens. On by default for this release.
    pub legacy_secret: bool,
    /// Redis and etcd.
    pub backend: BackendConfig,
    /// Clients send a Ping at least this often.
    pub heartbeat_interval_ms: u64,
    /// A connection silent for this many intervals is closed.
    pub heartbeat_timeout_intervals: u32,
    /// Deadline for the first frame (the Login), and for the WebSocket handshake.
    pub login_timeout_ms: u64,
    /// Largest frame a client may send (encoded protobuf bytes).
    pub max_frame_len: usize,
    /// Client connections held at once (logging in, logged in or closing); more are refused
    /// at once with `SERVER_FULL` (TCP), HTTP 503 (WebSocket) or a close (TLS). Keep it below
    /// the process's open-files limit.
    pub max_connections: usize,
    /// Connections that have not logged in yet, at once; more are refused the same way
    /// (`OVERLOADED`). Sockets that never log in cannot crowd out users past this.
    pub max_pending_logins: usize,
    /// Sends one connection may make per second on average (`RATE_LIMITED` past it, the
    /// connection stays); 0: no limit. Per user, so a reconnect does not refill it.
    pub send_rate_per_sec: u32,
    /// Sends one connection may make at once above the rate (the bucket's size).
    pub send_burst: u32,
    /// Largest frame before login, over plain TCP and TLS (a Login frame is a few hundred
    /// bytes): what a socket that has not logged in can make the server buffer. At most
    /// `max_frame_len` is used.
    pub pre_login_frame_len: usize,
    /// Frames queued for one connection before it is closed as a slow consumer.
    pub outbound_queue_frames: usize,
    /// Deadline of one write burst to a client.
    pub write_timeout_ms: u64,
    /// Lease TTL of the registration in etcd.
    pub registry_ttl_secs: u64,
    /// Largest number of client sends in one forward call to a route, and the number of
    /// ready sends that opens a further call while others are out. Large: flat out, calls
    /// carry up to this many, and the calls in flight bound what the server forwards per
    /// route round trip (measured: 4 calls × 1,024 beat 32 × 256 flat out, 58–70k vs
    /// 54–66k msg/s, and at 10,000 msg/s).
    pub forward_batch_max: usize,
    /// Client sends waiting to be forwarded. When the queue is full a sender's session stops
    /// reading that connection (TCP pushes back on the client) for up to `forward_wait_ms`;
    /// only then is the send refused with OVERLOADED.
    pub forward_queue: usize,
    /// How long one client send may wait for room in the forward queue.
    pub forward_wait_ms: u64,
    /// Forward calls in flight at most. One goes out whenever none is; further ones open
    /// only for a full batch (`forward_batch_max` ready sends), so sends that arrive while a
    /// call is out leave together in the next one and a busy server makes fewer, larger
    /// calls (measured at 10,000 msg/s: a fifth less CPU per message over the cluster than
    /// four lanes always in use; before that, 32 lanes against 4: p50/p99 12/38 ms against
    /// 3–4/12–23 ms).
    pub forward_concurrency: usize,
    /// Deadline of one internal call (forward to a route).
    pub internal_timeout_ms: u64,
    /// How long a shutdown waits for connections to close and tasks to finish.
    pub shutdown_grace_ms: u64,
    /// Tokio worker threads. 0: tokio's default (`TOKIO_WORKER_THREADS`, else one per core).
    /// Where several cim processes share a machine, keep their sum near the core count.
    pub worker_threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            name: "server".into(),
            tcp_listen: "0.0.0.0:9000".into(),
            ws_listen: "0.0.0.0:9001".into(),
            tls_listen: None,
            wss_listen: None,
            ws_allowed_origins: Vec::new(),
            internal_listen: "127.0.0.1:9100".into(),
            advertise_host: None,
            advertise_tcp: None,
            advertise_ws: None,
            advertise_tls: None,
            advertise_wss: None,
            advertise_internal: None,
            tls: TlsConfig::default(),
            cluster_secret: cim_common::config::DEV_SECRET.into(),
            previous_cluster_secrets: Vec::new(),
            legacy_secret: true,
            backend: BackendConfig::default(),
            heartbeat_interval_ms: 10_000,
            heartbeat_timeout_intervals: 3,
            login_timeout_ms: 5_000,
            max_frame_len: cim_proto::codec::DEFAULT_MAX_FRAME_LEN,
            max_connections: 100_000,
            max_pending_logins: 1_024,
            pre_login_frame_len: 4_096,
            send_rate_per_sec: 50,
            send_burst: 200,
            outbound_queue_frames: 1024,
            write_timeout_ms: 10_000,
            registry_ttl_secs: 10,
            forward_batch_max: 1024,
            forward_queue: 8192,
            forward_wait_ms: 5_000,
            forward_concurrency: 4,
            internal_timeout_ms: 3_000,
            shutdown_grace_ms: 2_000,
            worker_threads: 0,
        }
    }
}

/// `field` of the server's configuration cannot be used, and why.
fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::invalid("server", field, reason)
}

/// Checks a `host:port` string (the host may be a name or a bracketed IPv6 address).
fn validate_host_port(field: &str, value: &str) -> Result<(), ConfigError> {
    let bad = || invalid(field, format!("must be host:port, got {value:?}"));
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(())
}

fn positive(field: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(invalid(field, "must be positive"));
    }
    Ok(())
}

impl ServerConfig {
    /// Checks every field, naming the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !cim_common::ids::valid_instance_name(&self.name) {
            return Err(invalid(
                "name",
                format!(
                    "must be 1-64 characters of [A-Za-z0-9_.-], got {:?}",
                    self.name
                ),
            ));
        }
        validate_host_port("tcp_listen", &self.tcp_listen)?;
        validate_host_port("ws_listen", &self.ws_listen)?;
        validate_host_port("internal_listen", &self.internal_listen)?;
        for (field, value) in [
            ("tls_listen", self.tls_listen()),
            ("wss_listen", self.wss_listen()),
        ] {
            if let Some(value) = value {
                validate_host_port(field, value)?;
            }
        }
        let needs_tls = match (self.tls_listen(), self.wss_listen()) {
            (Some(_), Some(_)) => Some("tls_listen and wss_listen"),
            (Some(_), None) => Some("tls_listen"),
            (None, Some(_)) => Some("wss_listen"),
            (None, None) => None,
        };
        self.tls
            .validate(needs_tls)
            .map_err(|m| invalid("tls", m))?;
        crate::ws::AllowedOrigins::new(&self.ws_allowed_origins)
            .map_err(|m| invalid("ws_allowed_origins", m))?;
        if let Some(host) = &self.advertise_host {
            if host.is_empty() || host.contains(char::is_whitespace) {
                return Err(invalid(
                    "advertise_host",
                    format!("must be a host name or IP, got {host:?}"),
                ));
            }
        }
        for (field, value) in [
            ("advertise_tcp", &self.advertise_tcp),
            ("advertise_ws", &self.advertise_ws),
            ("advertise_tls", &self.advertise_tls),
            ("advertise_wss", &self.advertise_wss),
            ("advertise_internal", &self.advertise_internal),
        ] {
            if let Some(value) = value {
                validate_host_port(field, value)?;
            }
        }
        cim_common::config::validate_secret(&self.cluster_secret)
            .map_err(|m| invalid("cluster_secret", m))?;
        cim_common::secret::validate_previous(&self.cluster_secret, &self.previous_cluster_secrets)
            .map_err(|m| invalid("previous_cluster_secrets", m))?;
        self.backend.validate().map_err(|m| invalid("backend", m))?;
        positive("heartbeat_interval_ms", self.heartbeat_interval_ms)?;
        positive(
            "heartbeat_timeout_intervals",
            u64::from(self.heartbeat_timeout_intervals),
        )?;
        // Both travel to clients as uint32 in LoginResult.
        if u32::try_from(self.heartbeat_timeout_ms()).is_err() {
            return Err(invalid(
                "heartbeat_interval_ms * heartbeat_timeout_intervals",
                "must fit in 32 bits",
            ));
        }
        positive("login_timeout_ms", self.login_timeout_ms)?;
        if !(MIN_FRAME_LEN..=MAX_FRAME_LEN_LIMIT).contains(&self.max_frame_len) {
            return Err(invalid(
                "max_frame_len",
                format!(
                    "must be between {MIN_FRAME_LEN} and {MAX_FRAME_LEN_LIMIT}, got {}",
                    self.max_frame_len
                ),
            ));
        }
        positive("max_connections", self.max_connections as u64)?;
        positive("max_pending_logins", self.max_pending_logins as u64)?;
        if self.pre_login_frame_len < MIN_FRAME_LEN {
            return Err(invalid(
                "pre_login_frame_len",
                format!(
                    "must be at least {MIN_FRAME_LEN}, got {}",
                    self.pre_login_frame_len
                ),
            ));
        }
        positive("outbound_queue_frames", self.outbound_queue_frames as u64)?;
        positive("write_timeout_ms", self.write_timeout_ms)?;
        positive("registry_ttl_secs", self.registry_ttl_secs)?;
        positive("forward_batch_max", self.forward_batch_max as u64)?;
        positive("forward_queue", self.forward_queue as u64)?;
        positive("forward_wait_ms", self.forward_wait_ms)?;
        positive("forward_concurrency", self.forward_concurrency as u64)?;
        positive("internal_timeout_ms", self.internal_timeout_ms)?;
        cim_common::cli::validate_worker_threads(self.worker_threads)
            .map_err(|m| invalid("worker_threads", m))?;
        Ok(())
    }

    /// The frame limit before login: `pre_login_frame_len`, or `max_frame_len` if smaller.
    pub fn pre_login_limit(&self) -> usize {
        self.pre_login_frame_len.min(self.max_frame_len)
    }

    /// The TLS listen address, if TLS is on (`None` and empty are off).
    pub fn tls_listen(&self) -> Option<&str> {
        self.tls_listen.as_deref().filter(|s| !s.is_empty())
    }

    /// The WebSocket-over-TLS listen address, if on (`None` and empty are off).
    pub fn wss_listen(&self) -> Option<&str> {
        self.wss_listen.as_deref().filter(|s| !s.is_empty())
    }

    /// The keys derived from `cluster_secret` and `previous_cluster_secrets`.
    pub fn keys(&self) -> cim_common::secret::Keyring {
        cim_common::secret::Keyring::new(
            &self.cluster_secret,
            &self.previous_cluster_secrets,
            self.legacy_secret,
        )
    }

    /// Whether the built-in development secret is in use (the server warns at start).
    pub fn uses_dev_secret(&self) -> bool {
        self.cluster_secret == cim_common::config::DEV_SECRET
    }

    /// Silence after which a connection is closed.
    pub fn heartbeat_timeout_ms(&self) -> u64 {
        self.heartbeat_interval_ms
            .saturating_mul(u64::from(self.heartbeat_timeout_intervals))
    }

    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat_timeout_ms())
    }

    pub fn login_timeout(&self) -> Duration {
        Duration::from_millis(self.login_timeout_ms)
    }

    pub fn forward_wait(&self) -> Duration {
        Duration::from_millis(self.forward_wait_ms)
    }

    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    pub fn internal_timeout(&self) -> Duration {
        Duration::from_millis(self.internal_timeout_ms)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    pub fn registry_ttl(&self) -> Duration {
        Duration::from_secs(self.registry_ttl_secs)
    }

    /// The address to register for a listener bound to `bound`: the full override if given,
    /// else `advertise_host` (or the bound IP; 127.0.0.1 for a wildcard bind) with the bound port.
    pub fn advertised(&self, bound: SocketAddr, full_override: Option<&str>) -> String {
        if let Some(addr) = full_override {
            return addr.to_string();
        }
        match &self.advertise_host {
            Some(host) => match host.parse::<IpAddr>() {
                // Formatting through SocketAddr brackets IPv6 literals.
                Ok(ip) => SocketAddr::new(ip, bound.port()).to_string(),
                Err(_) => format!("{host}:{}", bound.port()),
            },
            None => {
                let ip = if bound.ip().is_unspecified() {
                    IpAddr::V4(Ipv4Addr::LOCALHOST)
                } else {
                    bound.ip()
                };
                SocketAddr::new(ip, bound.port()).to_string()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        ServerConfig::default().validate().unwrap();
        assert_eq!(ServerConfig::default().worker_threads, 0, "tokio's default");
        assert!(ServerConfig::default().uses_dev_secret());
        assert_eq!(ServerConfig::default().heartbeat_timeout_ms(), 30_000);
    }

    #[test]
    fn the_secret_settings_come_from_the_environment() {
        // A prefix of its own: no other test reads these variables.
        let prefix = "CIM_SERVER_TEST_SECRETS_";
        std::env::set_var(
            format!("{prefix}PREVIOUS_CLUSTER_SECRETS"),
            r#"["old-secret-0123456789"]"#,
        );
        std::env::set_var(format!("{prefix}LEGACY_SECRET"), "false");
        let loaded: Result<ServerConfig, _> = cim_common::config::load(
            None,
            prefix,
            &std::collections::BTreeMap::<String, String>::new(),
        );
        for var in ["PREVIOUS_CLUSTER_SECRETS", "LEGACY_SECRET"] {
            std::env::remove_var(format!("{prefix}{var}"));
        }
        let loaded = loaded.unwrap();
        assert_eq!(loaded.previous_cluster_secrets, ["old-secret-0123456789"]);
        assert!(!loaded.legacy_secret);
        loaded.validate().unwrap();
        assert!(!loaded.keys().legacy());
    }

    #[test]
    fn bad_fields_are_named() {
        let check = |f: fn(&mut ServerConfig), field: &str| {
            let mut c = ServerConfig::default();
            f(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err:?} should name {field}");
        };
        check(|c| c.name = "a b".into(), "name");
        check(|c| c.tcp_listen = "9000".into(), "tcp_listen");
        check(
            |c| c.advertise_ws = Some("host:99999".into()),
            "advertise_ws",
        );
        check(|c| c.cluster_secret = "short".into(), "cluster_secret");
        check(
            |c| c.previous_cluster_secrets = vec![c.cluster_secret.clone()],
            "previous_cluster_secrets",
        );
        check(
            |c| c.previous_cluster_secrets = vec!["short".into()],
            "previous_cluster_secrets",
        );
        check(|c| c.heartbeat_interval_ms = 0, "heartbeat_interval_ms");
        check(|c| c.heartbeat_interval_ms = u64::MAX, "32 bits");
        check(|c| c.max_frame_len = 10, "max_frame_len");
        check(|c| c.outbound_queue_frames = 0, "outbound_queue_frames");
        check(|c| c.forward_concurrency = 0, "forward_concurrency");
        check(|c| c.backend.etcd_endpoints.clear(), "backend");
        check(|c| c.worker_threads = 1025, "worker_threads");
        check(|c| c.tls_listen = Some("nope".into()), "tls_listen");
        check(|c| c.advertise_wss = Some("x".into()), "advertise_wss");
        check(
            |c| c.ws_allowed_origins = vec!["https://example.com/app".into()],
            "ws_allowed_origins",
        );
    }

    #[test]
    fn tls_listeners_need_the_tls_section() {
        let mut c = ServerConfig {
            tls_listen: Some(String::new()),
            wss_listen: Some(String::new()),
            ..Default::default()
        };
        c.validate().unwrap();
        assert_eq!(
            (c.tls_listen(), c.wss_listen()),
            (None, None),
            "empty is off"
        );
        c.tls_listen = Some("0.0.0.0:9443".into());
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("cert_file and key_file") && err.contains("tls_listen"),
            "{err}"
        );
        c.tls_listen = None;
        c.wss_listen = Some("0.0.0.0:9444".into());
        c.tls.cert_file = Some("/etc/cim/cert.pem".into());
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("key_file") && err.contains("wss_listen"),
            "{err}"
        );
        c.tls.key_file = Some("/etc/cim/key.pem".into());
        c.validate().unwrap();
        assert_eq!(c.wss_listen(), Some("0.0.0.0:9444"));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<ServerConfig>(r#"{"nmae":"x"}"#).unwrap_err();
        assert!(err.to_string().contains("nmae"), "{err}");
        let ok: ServerConfig =
            serde_json::from_str(r#"{"name":"s1","backend":{"prefix":"t"}}"#).unwrap();
        assert_eq!(ok.name, "s1");
        assert_eq!(ok.backend.prefix, "t");
        assert_eq!(ok.backend.timeout_ms, BackendConfig::default().timeout_ms);
    }

    #[test]
    fn allowed_origins_come_from_the_environment() {
        let no_flags = std::collections::BTreeMap::<String, String>::new();
        // A prefix of its own: no other test reads these variables.
        let prefix = "CIM_SERVER_TEST_ORIGINS_";
        let loaded: ServerConfig = cim_common::config::load(None, prefix, &no_flags).unwrap();
        assert!(loaded.ws_allowed_origins.is_empty(), "the default");
        std::env::set_var(
            format!("{prefix}WS_ALLOWED_ORIGINS"),
            r#"["https://chat.example.com","https://*.example.org"]"#,
        );
        let loaded: ServerConfig = cim_common::config::load(None, prefix, &no_flags).unwrap();
        std::env::remove_var(format!("{prefix}WS_ALLOWED_ORIGINS"));
        assert_eq!(
            loaded.ws_allowed_origins,
            ["https://chat.example.com", "https://*.example.org"]
        );
        loaded.validate().unwrap();
    }

    #[test]
    fn advertised_addresses() {
        let mut c = ServerConfig::default();
        let wildcard: SocketAddr = "0.0.0.0:9000".parse().unwrap();
        let v6_wildcard: SocketAddr = "[::]:9000".parse().unwrap();
        let bound: SocketAddr = "10.1.2.3:9001".parse().unwrap();
        assert_eq!(c.advertised(wildcard, None), "127.0.0.1:9000");
        assert_eq!(c.advertised(v6_wildcard, None), "127.0.0.1:9000");
        assert_eq!(c.advertised(bound, None), "10.1.2.3:9001");
        assert_eq!(c.advertised(bound, Some("lb:80")), "lb:80");
        c.advertise_host = Some("im.example.org".into());
        assert_eq!(c.advertised(wildcard, None), "im.example.org:9000");
        c.advertise_host = Some("fe80::1".into());
        assert_eq!(c.advertised(wildcard, None), "[fe80::1]:9000");
    }
}
