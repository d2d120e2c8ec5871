//! Command-line plumbing every cim binary shares, so the binaries differ only in what they run:
//!
//! - [`BackendFlags`]: `--redis-url`, `--etcd` (repeatable), `--prefix`, to `#[command(flatten)]`
//!   into a clap parser. The same struct serializes as the `backend` layer of the config
//!   overrides, leaving out the flags that were not given (so they do not mask the file or
//!   the environment; see [`crate::config::load`]).
//! - [`TlsFlags`]: `--tls-cert` / `--tls-key` as the `[tls]` layer of the overrides.
//! - [`NodeFlags`]: what a cluster node (server or route) is told besides its listeners:
//!   `--name`, `--internal-listen`, `--advertise-host`, the backend flags, `--cluster-secret`,
//!   `--worker-threads`.
//! - [`ConfigFlags`]: `--config FILE` and `--set KEY=VALUE`, and [`ConfigFlags::load`], which
//!   layers them around a binary's named flags.
//!
//! A binary's parser is its named flags, serializable in the shape of its config (absent
//! flags skipped, these pieces flattened in), so the parser itself is the flags' config
//! layer: no second struct mirrors it.
//! - [`bind`]: binds a listener with an error that names the config field and the address.
//! - [`shutdown_signal`]: resolves on ctrl-c or SIGTERM, logging which.
//! - [`runtime`]: the tokio runtime of a binary, sized by its `worker_threads` setting.

use anyhow::Context;
use serde::{de::DeserializeOwned, Serialize};
use std::path::PathBuf;
use tokio::net::TcpListener;

/// Where a binary's configuration comes from besides the environment: `--config` (the TOML
/// file) and `--set` (any setting, last). Flattened into each parser (and skipped when it
/// serializes: these are not settings).
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigFlags {
    /// TOML configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: SetFlags,
}

impl ConfigFlags {
    /// Loads `T`: defaults < `--config` file < environment (`env_prefix`) < `named` (the
    /// binary's named flags, absent ones skipped) < `--set` (see
    /// [`crate::config::load_with_settings`]).
    pub fn load<T: Serialize + DeserializeOwned + Default>(
        &self,
        env_prefix: &str,
        named: &impl Serialize,
    ) -> Result<T, crate::config::ConfigError> {
        crate::config::load_with_settings(
            self.config.as_deref(),
            env_prefix,
            named,
            &self.settings.set,
        )
    }
}

/// The flags of a cluster node (connection server or route) besides its listeners, in the
/// shape of their configs (which share these fields), absent flags left out. Flattened into
/// the parser (`#[command(flatten)]`) and into its serialization (`#[serde(flatten)]`).
#[derive(clap::Args, Serialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFlags {
    /// Instance name (the id is `{name}-{random}`).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Internal API listener (calls from the other role), host:port.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub internal_listen: Option<String>,
    /// Host advertised in the registry (for the listeners' addresses).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_host: Option<String>,
    #[command(flatten)]
    #[serde(skip_serializing_if = "BackendFlags::is_empty")]
    pub backend: BackendFlags,
    /// Cluster secret shared by every cim process (prefer the config file or the
    /// environment: flags are visible in the process list).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_secret: Option<String>,
    /// Tokio worker threads (0: TOKIO_WORKER_THREADS, else one per core).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<usize>,
}

/// `--set KEY=VALUE`, repeatable: any setting, over every other layer
/// (`crate::config::settings_layer`).
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct SetFlags {
    /// Any setting as KEY=VALUE (repeat it), applied last: `--set max_connections=20000`,
    /// `--set backend.redis_url=redis://10.0.0.5:6379` (sections joined by dots); the value
    /// is TOML (a number, true, a list) or else a string.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// Where the backends are, as flags. Serialized in the shape of
/// [`BackendConfig`](crate::backend::BackendConfig), absent flags left out.
#[derive(clap::Args, Serialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendFlags {
    /// Redis URL, e.g. redis://127.0.0.1:6379/0.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// etcd endpoint (repeat for several).
    #[arg(long = "etcd", value_name = "ENDPOINT")]
    #[serde(rename = "etcd_endpoints", skip_serializing_if = "Vec::is_empty")]
    pub etcd: Vec<String>,
    /// Key prefix in Redis and etcd.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

impl BackendFlags {
    /// No backend flag was given: skip the whole `backend` layer
    /// (`#[serde(skip_serializing_if = "BackendFlags::is_empty")]`).
    pub fn is_empty(&self) -> bool {
        self.redis_url.is_none() && self.etcd.is_empty() && self.prefix.is_none()
    }
}

/// The certificate files as flags (`--tls-cert`, `--tls-key`), serialized in the shape of
/// [`TlsConfig`](crate::tls::TlsConfig) with absent flags left out (flattened into a parser,
/// serialized as its `tls` field with `skip_serializing_if = "TlsFlags::is_empty"`). The
/// help of each binary's TLS listeners says which of them use the files.
#[derive(clap::Args, Serialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFlags {
    /// Certificate chain of the TLS listeners, PEM ([tls] cert_file).
    #[arg(long = "tls-cert", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// Private key of the certificate, PEM ([tls] key_file).
    #[arg(long = "tls-key", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl TlsFlags {
    /// Neither flag was given: skip the whole `tls` layer.
    pub fn is_empty(&self) -> bool {
        self.cert_file.is_none() && self.key_file.is_none()
    }
}

/// [`bind`] for a listener that may be off (`None`).
pub async fn bind_optional(field: &str, addr: Option<&str>) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        Some(addr) => bind(field, addr).await.map(Some),
        None => Ok(None),
    }
}

/// Binds `addr`; the error names the config `field` and the address, which is what an
/// operator needs to fix it ("address in use" alone does not say which of three listeners).
pub async fn bind(field: &str, addr: &str) -> anyhow::Result<TcpListener> {
    let context = || format!("cannot listen on {field} {addr}");
    let sock_addr = tokio::net::lookup_host(addr)
        .await
        .with_context(context)?
        .next()
        .with_context(context)?;
    let socket = if sock_addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .with_context(context)?;
    socket.set_reuseaddr(true).with_context(context)?;
    socket.bind(sock_addr).with_context(context)?;
    // A long accept queue: thousands of clients reconnecting at once (a server restart) must
    // not overflow it, or their handshakes are dropped and retried a second later. The kernel
    // caps it at net.core.somaxconn; tokio's default is 1,024.
    socket.listen(LISTEN_BACKLOG).with_context(context)
}

/// Accept-queue length asked for by [`bind`].
pub const LISTEN_BACKLOG: u32 = 4096;

/// Resolves on ctrl-c (SIGINT) or SIGTERM, logging which. A signal that cannot be listened
/// for is logged and never fires; the other one still does.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("ctrl-c received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}

/// Largest accepted `worker_threads` setting: far more than any machine has cores; a bigger
/// value is a typo, and each worker is an OS thread with its own stack.
pub const MAX_WORKER_THREADS: usize = 1024;

/// Checks a `worker_threads` setting (`0`: tokio's default; else at most
/// [`MAX_WORKER_THREADS`]). The message leaves the field to the caller to name.
pub fn validate_worker_threads(worker_threads: usize) -> Result<(), String> {
    if worker_threads > MAX_WORKER_THREADS {
        return Err(format!(
            "must be 0 (tokio's default: one per core) to {MAX_WORKER_THREADS}, got {worker_threads}"
        ));
    }
    Ok(())
}

/// The multi-thread tokio runtime of a cim binary, all drivers (I/O, time) enabled.
///
/// `worker_threads == 0` keeps tokio's default: the `TOKIO_WORKER_THREADS` environment
/// variable if set, else one worker per core. `N > 0` runs exactly `N` workers.
///
/// Why it is a setting: several cim processes often share one machine (a local cluster runs
/// two servers, a route, Redis and etcd). With the default every process starts one worker
/// per core, so the machine runs several times more workers than cores, and the cost goes
/// into cross-thread wake-ups and context switches instead of messages (on 2 cores, one
/// worker per cim process carried 30% more private messages per second, at 30% less CPU per
/// message). Size each process so that the workers of all of them add up to about the cores.
/// Logs the workers it got (call after logging is set up).
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 0 {
        builder.worker_threads(worker_threads);
    }
    let runtime = builder.enable_all().build()?;
    tracing::info!(
        worker_threads = runtime.metrics().num_workers(),
        configured = worker_threads,
        "tokio runtime"
    );
    Ok(runtime)
}

/// File descriptors kept for everything that is not a client connection (listeners, Redis,
/// etcd, internal calls, logs).
const RESERVED_FDS: u64 = 64;

/// Each client connection is a file descriptor: raises the soft limit to the hard one and
/// logs the connection capacity that gives.
pub fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(
            fd_limit = limit,
            "file descriptor limit: room for about {} connections",
            limit.saturating_sub(RESERVED_FDS)
        ),
        Err(e) => tracing::warn!(error = %e, "cannot raise the file descriptor limit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendConfig;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        backend: BackendFlags,
    }

    #[derive(Serialize)]
    struct Overrides {
        #[serde(skip_serializing_if = "BackendFlags::is_empty")]
        backend: BackendFlags,
    }

    #[derive(serde::Deserialize, Serialize, Default)]
    #[serde(default)]
    struct Config {
        backend: BackendConfig,
    }

    fn load(args: &[&str]) -> BackendConfig {
        let cli = Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied())).unwrap();
        let overrides = Overrides {
            backend: cli.backend,
        };
        crate::config::load::<Config>(None, "CIM_CLI_TEST_UNUSED_", &overrides)
            .unwrap()
            .backend
    }

    #[test]
    fn given_flags_override_and_absent_ones_keep_the_layer_below() {
        let defaults = BackendConfig::default();
        assert_eq!(load(&[]), defaults);
        let config = load(&["--etcd", "http://a:2379", "--etcd", "b:2379"]);
        assert_eq!(config.etcd_endpoints, ["http://a:2379", "b:2379"]);
        assert_eq!(config.redis_url, defaults.redis_url);
        assert_eq!(config.prefix, defaults.prefix);
        let config = load(&["--redis-url", "redis://r:1/0", "--prefix", "p1"]);
        assert_eq!(config.redis_url, "redis://r:1/0");
        assert_eq!(config.prefix, "p1");
        assert_eq!(config.etcd_endpoints, defaults.etcd_endpoints);
    }

    #[test]
    fn runtimes_run_futures_with_the_asked_workers() {
        let one = runtime(1).unwrap();
        assert_eq!(one.metrics().num_workers(), 1);
        // Timers and I/O are enabled.
        let n = one.block_on(async {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            tokio::spawn(async { 41 }).await.unwrap() + usize::from(listener.local_addr().is_ok())
        });
        assert_eq!(n, 42);
        let default = runtime(0).unwrap();
        assert!(default.metrics().num_workers() >= 1);
        assert_eq!(default.block_on(default.spawn(async { 7 })).unwrap(), 7);
        assert_eq!(runtime(3).unwrap().metrics().num_workers(), 3);
    }

    #[test]
    fn worker_threads_are_bounded() {
        validate_worker_threads(0).unwrap();
        validate_worker_threads(MAX_WORKER_THREADS).unwrap();
        let err = validate_worker_threads(MAX_WORKER_THREADS + 1).unwrap_err();
        assert!(err.contains("1025"), "{err}");
    }

    #[tokio::test]
    async fn bind_errors_name_the_field_and_the_address() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let err = bind("ws_listen", &addr).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("cannot listen on ws_listen {addr}")
        );
        let err = bind("tcp_listen", "not-an-address").await.unwrap_err();
        assert!(
            err.to_string().contains("tcp_listen not-an-address"),
            "{err}"
        );
        let ok = bind("http_listen", "127.0.0.1:0").await.unwrap();
        assert_ne!(ok.local_addr().unwrap().port(), 0);
    }
}
