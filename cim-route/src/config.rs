//! Configuration of a route instance: one serde struct whose defaults run a whole cluster on
//! one machine, loaded by `cim_common::config::load` (defaults < file < env < flags) and
//! checked by [`RouteConfig::validate`] before anything starts (errors:
//! `cim_common::config::ConfigError`, as every binary's).

pub use cim_common::config::ConfigError;
use cim_common::{
    backend::BackendConfig, config::DEV_SECRET, ids::valid_instance_name, store::GroupLimits,
    tls::TlsConfig,
};
use serde::{Deserialize, Serialize};
use std::{net::SocketAddr, time::Duration};

/// Most password hashing workers (`password_workers`).
pub const MAX_PASSWORD_WORKERS: usize = 256;

/// `field` of the route's configuration cannot be used, and why.
fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::invalid("route", field, reason)
}

/// Everything a route instance can be told.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    /// Instance name; the instance id is `{name}-{random}`.
    pub name: String,
    /// Public HTTP API listen address (HTTPS when `[tls]` is set).
    pub http_listen: String,
    /// Certificate and key of the public listener (PEM files). Unset (the default): plain
    /// HTTP, e.g. behind a proxy that terminates TLS. Set: HTTPS only on `http_listen`,
    /// reloaded on SIGHUP and when the files change. The internal listener stays plain.
    pub tls: TlsConfig,
    /// Internal API (forwards from servers) listen address; keep it off public networks.
    pub internal_listen: String,
    /// Host others reach this route at, combined with the bound ports. Defaults to the listen
    /// IP, or 127.0.0.1 when listening on all interfaces.
    pub advertise_host: Option<String>,
    /// Full advertised public address (`host:port`), overriding `advertise_host`.
    pub advertise_http: Option<String>,
    /// Full advertised internal address (`host:port`), overriding `advertise_host`.
    pub advertise_internal: Option<String>,
    /// Shared by every cim process. Never used as a key itself: HKDF derives a token-signing
    /// key and an internal-auth key from it (`cim_common::secret`).
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
    /// Redis + etcd.
    pub backend: BackendConfig,
    /// Lifetime of a connect token, and of a pending login slot: a user who logs in and never
    /// connects is locked out at most this long.
    pub connect_token_ttl_ms: u64,
    /// What a login does while the user is connected elsewhere: `refuse` (the default, CIM's
    /// single-login rule: 409 `already_logged_in` until that session ends) or `replace` (the
    /// new login wins, the old connection is kicked with REPLACED: still one connection per
    /// user, as many mobile apps do it). A client resuming its own session always replaces it.
    pub login_conflict: LoginConflict,
    /// Lifetime of a session (bearer) token.
    pub session_token_ttl_secs: u64,
    /// TTL of this instance's registry lease.
    pub registry_ttl_secs: u64,
    /// Deadline of one public HTTP request.
    pub request_timeout_ms: u64,
    /// Largest public request body, in bytes.
    pub max_request_body: usize,
    /// Largest message body text, in bytes.
    pub max_message_len: usize,
    /// Longest user name, in characters.
    pub max_name_len: usize,
    /// Password length bounds, in characters.
    pub min_password_len: usize,
    pub max_password_len: usize,
    /// Largest page of the online-users list.
    pub online_page_max: usize,
    /// COUNT hint of one step (SSCAN of a shard of its user set) when sweeping a lost
    /// server's users.
    pub scan_batch: usize,
    /// Deadline of one push (or kick) call to a connection server.
    pub push_timeout_ms: u64,
    /// Public requests in flight at once; more are shed with 503 `overloaded`.
    pub concurrency_limit: usize,
    /// Argon2id memory cost of new password hashes, in KiB (default: argon2's, 19 MiB).
    /// Existing hashes keep verifying with the parameters stored in them. Lower it only
    /// for tests: each step down makes stolen hashes cheaper to crack.
    pub password_memory_kib: u32,
    /// Argon2id iterations of new password hashes (default: argon2's, 2).
    pub password_iterations: u32,
    /// Password hashing workers: threads that each own one argon2 memory area of
    /// `password_memory_kib`, so hashes in flight, and the hashing memory, are at most this
    /// many (× 19 MiB by default) however many logins arrive. 0 (the default): one per core.
    pub password_workers: usize,
    /// Password checks waiting or running at once; past it a login answers 429 `busy` at once
    /// (so a good login never waits behind more than this many hashes).
    pub password_queue: usize,
    /// Password logins per second from one client address (429 `rate_limited` past it,
    /// before any hashing); 0: no limit.
    pub login_rate_per_addr: u32,
    /// Password logins from one client address at once above that rate.
    pub login_burst_per_addr: u32,
    /// Failed logins per minute (and at once) of one name; past it the name is refused with
    /// 429 `rate_limited` until a minute's share is back; 0: no limit.
    pub login_failures_per_name: u32,
    /// Header holding the client's address, set by a proxy in front of the route (e.g.
    /// `x-forwarded-for`: its rightmost address is used, or `x-real-ip`). Unset (the
    /// default): the TCP peer is the client. Set it only behind such a proxy: clients can
    /// write any header.
    pub client_ip_header: Option<String>,
    /// Keys of the business API (`/api/admin/*`, header `X-Api-Key`). Empty (the default):
    /// the business API refuses every call.
    pub api_keys: Vec<String>,
    /// Channels one user can be a member of.
    pub max_channels_per_user: usize,
    /// Most receivers of one business-API message.
    pub max_receivers: usize,
    /// Stored groups (`/api/groups`): their bounds.
    pub groups: GroupsConfig,
    /// Where presence events are POSTed (`{"events":[...]}`), if anywhere. One route instance
    /// at a time delivers them, in order, retrying until the hook answers 2xx.
    pub webhook_url: Option<String>,
    /// Signs webhook bodies (`X-Cim-Signature: sha256=<hex HMAC-SHA256>`), if set.
    pub webhook_secret: Option<String>,
    /// Deadline of one webhook POST.
    pub webhook_timeout_ms: u64,
    /// Publish a `message` event (webhook, SSE) for every stored private or group message
    /// whose receiver is offline: the offline-push hook. Off by default: each costs a store
    /// write, and a group message's offline members are found by reading its members and
    /// their routes (O(members), off the message's path).
    pub message_events: bool,
    /// Include the message's text in `message` events.
    pub message_events_body: bool,
    /// Tokio worker threads. 0: tokio's default (`TOKIO_WORKER_THREADS`, else one per core).
    /// Where several cim processes share a machine, keep their sum near the core count.
    pub worker_threads: usize,
}

impl Default for RouteConfig {
    fn default() -> Self {
        Self {
            name: "route".into(),
            http_listen: "0.0.0.0:8080".into(),
            tls: TlsConfig::default(),
            internal_listen: "127.0.0.1:8081".into(),
            advertise_host: None,
            advertise_http: None,
            advertise_internal: None,
            cluster_secret: DEV_SECRET.into(),
            previous_cluster_secrets: Vec::new(),
            legacy_secret: true,
            backend: BackendConfig::default(),
            connect_token_ttl_ms: 30_000,
            login_conflict: LoginConflict::Refuse,
            session_token_ttl_secs: 86_400,
            registry_ttl_secs: 10,
            request_timeout_ms: 10_000,
            max_request_body: 64 * 1024,
            max_message_len: 8192,
            max_name_len: 32,
            min_password_len: 6,
            max_password_len: 256,
            online_page_max: 500,
            scan_batch: 1000,
            push_timeout_ms: 3000,
            concurrency_limit: 1024,
            password_memory_kib: argon2::Params::DEFAULT_M_COST,
            password_iterations: argon2::Params::DEFAULT_T_COST,
            password_workers: 0,
            password_queue: 64,
            login_rate_per_addr: 5,
            login_burst_per_addr: 20,
            login_failures_per_name: 10,
            client_ip_header: None,
            api_keys: Vec::new(),
            max_channels_per_user: 100,
            max_receivers: 1000,
            groups: GroupsConfig::default(),
            webhook_url: None,
            webhook_secret: None,
            webhook_timeout_ms: 5000,
            message_events: false,
            message_events_body: false,
            worker_threads: 0,
        }
    }
}

/// Most members of one group that `groups.max_members` may allow: a JOINED event lists every
/// member added at once, and it travels in one message.
pub const MAX_GROUP_MEMBERS: usize = 100_000;

/// The `[groups]` section: bounds of stored groups, checked atomically by the store.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct GroupsConfig {
    /// Members of one group, the owner included.
    pub max_members: usize,
    /// Groups one user may be a member of.
    pub max_groups: usize,
}

impl Default for GroupsConfig {
    fn default() -> Self {
        let limits = GroupLimits::default();
        Self {
            max_members: limits.max_members,
            max_groups: limits.max_groups,
        }
    }
}

impl GroupsConfig {
    /// The limits as the store takes them.
    pub fn limits(&self) -> GroupLimits {
        GroupLimits {
            max_members: self.max_members,
            max_groups: self.max_groups,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        // Two: an owner alone is a group nobody can be added to.
        if self.max_members < 2 || self.max_members > MAX_GROUP_MEMBERS {
            return Err(invalid(
                "groups.max_members",
                format!("must be 2 to {MAX_GROUP_MEMBERS}"),
            ));
        }
        if self.max_groups == 0 {
            return Err(invalid("groups.max_groups", "must be positive"));
        }
        Ok(())
    }
}

/// What a second login of a connected user does (`login_conflict`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LoginConflict {
    /// Refused with 409 `already_logged_in` while the first connection lives.
    #[default]
    Refuse,
    /// The new login wins; the old connection is kicked (REPLACED).
    Replace,
}

/// Whether `s` is `host:port` with a non-empty host and a non-zero port.
fn valid_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    }
}

impl RouteConfig {
    /// Checks every field, naming the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !valid_instance_name(&self.name) {
            return Err(invalid("name", "must be 1-64 characters of [A-Za-z0-9_.-]"));
        }
        self.http_listen_addr()?;
        self.tls.validate(None).map_err(|m| invalid("tls", m))?;
        self.internal_listen_addr()?;
        if let Some(host) = &self.advertise_host {
            if host.is_empty() || host.contains(char::is_whitespace) {
                return Err(invalid("advertise_host", "must be a host name or IP"));
            }
        }
        for (field, value) in [
            ("advertise_http", &self.advertise_http),
            ("advertise_internal", &self.advertise_internal),
        ] {
            if let Some(v) = value {
                if !valid_host_port(v) {
                    return Err(invalid(field, format!("{v:?} is not host:port")));
                }
            }
        }
        cim_common::config::validate_secret(&self.cluster_secret)
            .map_err(|m| invalid("cluster_secret", m))?;
        cim_common::secret::validate_previous(&self.cluster_secret, &self.previous_cluster_secrets)
            .map_err(|m| invalid("previous_cluster_secrets", m))?;
        self.backend.validate().map_err(|m| invalid("backend", m))?;
        for key in &self.api_keys {
            // Compared in constant time; a short key is guessable whatever the comparison.
            if key.len() < 16 || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(
                    "api_keys",
                    "each key must be at least 16 characters without whitespace",
                ));
            }
        }
        if let Some(url) = &self.webhook_url {
            if !(url.starts_with("http://") || url.starts_with("https://"))
                || reqwest::Url::parse(url).is_err()
            {
                return Err(invalid(
                    "webhook_url",
                    format!("{url:?} is not an http(s) URL"),
                ));
            }
        }
        let positive: [(&'static str, u64); 14] = [
            ("connect_token_ttl_ms", self.connect_token_ttl_ms),
            ("session_token_ttl_secs", self.session_token_ttl_secs),
            ("registry_ttl_secs", self.registry_ttl_secs),
            ("request_timeout_ms", self.request_timeout_ms),
            ("max_message_len", self.max_message_len as u64),
            ("max_name_len", self.max_name_len as u64),
            ("min_password_len", self.min_password_len as u64),
            ("online_page_max", self.online_page_max as u64),
            ("scan_batch", self.scan_batch as u64),
            ("push_timeout_ms", self.push_timeout_ms),
            ("concurrency_limit", self.concurrency_limit as u64),
            ("max_channels_per_user", self.max_channels_per_user as u64),
            ("max_receivers", self.max_receivers as u64),
            ("webhook_timeout_ms", self.webhook_timeout_ms),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(invalid(field, "must be positive"));
            }
        }
        self.groups.validate()?;
        if self.max_password_len < self.min_password_len {
            return Err(invalid(
                "max_password_len",
                "must be at least min_password_len",
            ));
        }
        // A request must be able to carry the largest message plus its JSON envelope.
        if self.max_request_body < self.max_message_len + 1024 {
            return Err(invalid(
                "max_request_body",
                "must exceed max_message_len by at least 1024 bytes",
            ));
        }
        // The message travels inside internal protobuf bodies, which have a fixed maximum
        // (`cim_common::cluster::MAX_BODY`, 17 MiB): 1 MiB leaves room for batches of them.
        if self.max_message_len > cim_proto::codec::MAX_MESSAGE_LEN {
            return Err(invalid("max_message_len", "is unreasonably large"));
        }
        self.password_params()
            .map_err(|m| invalid("password_memory_kib", m))?;
        // Each worker is a thread with up to password_memory_kib of its own.
        if self.password_workers > MAX_PASSWORD_WORKERS {
            return Err(invalid(
                "password_workers",
                format!("must be at most {MAX_PASSWORD_WORKERS} (0: one per core)"),
            ));
        }
        // Names are stored in Redis keys and the online index; keep them small.
        if self.max_name_len > 256 {
            return Err(invalid("max_name_len", "must be at most 256"));
        }
        cim_common::cli::validate_worker_threads(self.worker_threads)
            .map_err(|m| invalid("worker_threads", m))?;
        Ok(())
    }

    /// Whether the public listener serves HTTPS.
    pub fn https(&self) -> bool {
        self.tls.is_set()
    }

    /// The keys derived from `cluster_secret` and `previous_cluster_secrets`.
    pub fn keys(&self) -> cim_common::secret::Keyring {
        cim_common::secret::Keyring::new(
            &self.cluster_secret,
            &self.previous_cluster_secrets,
            self.legacy_secret,
        )
    }

    /// Whether the well-known development secret is in use (warn about it).
    pub fn uses_dev_secret(&self) -> bool {
        self.cluster_secret == DEV_SECRET
    }

    pub fn http_listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.http_listen.parse().map_err(|_| {
            invalid(
                "http_listen",
                format!("{:?} is not ip:port", self.http_listen),
            )
        })
    }

    pub fn internal_listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.internal_listen.parse().map_err(|_| {
            invalid(
                "internal_listen",
                format!("{:?} is not ip:port", self.internal_listen),
            )
        })
    }

    /// Argon2id parameters of new hashes (one lane).
    pub fn password_params(&self) -> Result<argon2::Params, String> {
        argon2::Params::new(self.password_memory_kib, self.password_iterations, 1, None).map_err(
            |e| {
                format!(
                    "password_memory_kib {} / password_iterations {} are not valid argon2 \
                     parameters: {e}",
                    self.password_memory_kib, self.password_iterations
                )
            },
        )
    }

    /// How many password hashing workers to run: `password_workers`, or one per core.
    pub fn password_workers(&self) -> usize {
        match self.password_workers {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }

    pub fn connect_token_ttl(&self) -> Duration {
        Duration::from_millis(self.connect_token_ttl_ms)
    }

    pub fn session_token_ttl(&self) -> Duration {
        Duration::from_secs(self.session_token_ttl_secs)
    }

    pub fn registry_ttl(&self) -> Duration {
        Duration::from_secs(self.registry_ttl_secs)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn webhook_timeout(&self) -> Duration {
        Duration::from_millis(self.webhook_timeout_ms)
    }

    pub fn push_timeout(&self) -> Duration {
        Duration::from_millis(self.push_timeout_ms)
    }

    /// The address advertised for a listener bound at `bound`: the explicit override, else
    /// `advertise_host` with the bound port, else the bound address (127.0.0.1 for a wildcard
    /// bind, which only works on one machine).
    pub fn advertised(&self, explicit: Option<&str>, bound: SocketAddr) -> String {
        if let Some(addr) = explicit {
            return addr.to_string();
        }
        let port = bound.port();
        match &self.advertise_host {
            Some(host) if host.contains(':') && !host.starts_with('[') => {
                format!("[{host}]:{port}")
            }
            Some(host) => format!("{host}:{port}"),
            None if bound.ip().is_unspecified() => format!("127.0.0.1:{port}"),
            None => bound.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = RouteConfig::default();
        assert_eq!(c.validate(), Ok(()));
        assert!(c.uses_dev_secret());
        assert_eq!(c.worker_threads, 0, "tokio's default");
    }

    #[test]
    fn bad_fields_are_named() {
        let mut c = RouteConfig {
            http_listen: "nope".into(),
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().field(), Some("http_listen"));
        c.http_listen = "127.0.0.1:0".into();
        c.cluster_secret = "short".into();
        assert_eq!(c.validate().unwrap_err().field(), Some("cluster_secret"));
        c.cluster_secret = "a-long-enough-secret".into();
        c.previous_cluster_secrets = vec!["a-long-enough-secret".into()];
        assert_eq!(
            c.validate().unwrap_err().field(),
            Some("previous_cluster_secrets")
        );
        c.previous_cluster_secrets = vec!["another-long-enough-secret".into()];
        assert_eq!(c.validate(), Ok(()));
        c.scan_batch = 0;
        assert_eq!(c.validate().unwrap_err().field(), Some("scan_batch"));
        c.scan_batch = 10;
        c.advertise_http = Some("host-without-port".into());
        assert_eq!(c.validate().unwrap_err().field(), Some("advertise_http"));
        c.advertise_http = Some("example.com:80".into());
        assert_eq!(c.validate(), Ok(()));
        c.password_memory_kib = 1;
        assert_eq!(
            c.validate().unwrap_err().field(),
            Some("password_memory_kib")
        );
        c.password_memory_kib = RouteConfig::default().password_memory_kib;
        c.password_workers = MAX_PASSWORD_WORKERS + 1;
        assert_eq!(c.validate().unwrap_err().field(), Some("password_workers"));
        c.password_workers = MAX_PASSWORD_WORKERS;
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.password_workers(), MAX_PASSWORD_WORKERS);
        c.password_workers = 0;
        assert!(c.password_workers() >= 1);
        c.worker_threads = 1024;
        assert_eq!(c.validate(), Ok(()));
        c.worker_threads = 1025;
        let err = c.validate().unwrap_err();
        assert_eq!(err.field(), Some("worker_threads"));
        assert!(err.to_string().contains("1025"), "{err}");
    }

    #[test]
    fn groups_section() {
        let c = RouteConfig::default();
        assert_eq!(c.groups.limits(), GroupLimits::default());
        assert_eq!(c.groups.limits().max_members, 2000);
        assert_eq!(c.groups.limits().max_groups, 500);
        let c: RouteConfig = serde_json::from_str(r#"{"groups":{"max_members":10}}"#).unwrap();
        assert_eq!(c.groups.max_members, 10);
        assert_eq!(
            c.groups.max_groups, 500,
            "the rest of the section keeps its defaults"
        );
        assert_eq!(c.validate(), Ok(()));
        for (members, groups, field) in [
            (1, 500, "groups.max_members"),
            (MAX_GROUP_MEMBERS + 1, 500, "groups.max_members"),
            (10, 0, "groups.max_groups"),
        ] {
            let c = RouteConfig {
                groups: GroupsConfig {
                    max_members: members,
                    max_groups: groups,
                },
                ..Default::default()
            };
            assert_eq!(c.validate().unwrap_err().field(), Some(field));
        }
        let err =
            serde_json::from_str::<RouteConfig>(r#"{"groups":{"max_member":3}}"#).unwrap_err();
        assert!(err.to_string().contains("max_member"), "{err}");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<RouteConfig>(r#"{"nmae":"x"}"#).unwrap_err();
        assert!(err.to_string().contains("nmae"), "{err}");
    }

    #[test]
    fn advertised_addresses() {
        let c = RouteConfig::default();
        let any: SocketAddr = "0.0.0.0:9000".parse().unwrap();
        let local: SocketAddr = "10.0.0.5:9001".parse().unwrap();
        assert_eq!(c.advertised(None, any), "127.0.0.1:9000");
        assert_eq!(c.advertised(None, local), "10.0.0.5:9001");
        assert_eq!(c.advertised(Some("lb:80"), any), "lb:80");
        let c = RouteConfig {
            advertise_host: Some("route1.internal".into()),
            ..Default::default()
        };
        assert_eq!(c.advertised(None, any), "route1.internal:9000");
    }
}
