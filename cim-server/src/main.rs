//! `cim-server` binary: loads the configuration (defaults < `--config` file < `CIM_SERVER_*`
//! environment < flags), builds a tokio runtime of `worker_threads` workers, connects to Redis
//! and etcd, binds the listeners, runs the server until ctrl-c or SIGTERM, then shuts it down
//! gracefully.

use anyhow::{anyhow, Context};
use cim_common::{
    backend::Backends,
    cli::{bind, bind_optional, shutdown_signal, ConfigFlags, NodeFlags, TlsFlags},
    config::ConfigError,
};
use cim_server::{Listeners, ServerConfig};
use clap::Parser;
use serde::Serialize;

/// The command line; serialized, the named flags that were given in the shape of
/// [`ServerConfig`] (the flags' config layer).
#[derive(Parser, Serialize, Debug)]
#[command(name = "cim-server", version, about = "cim connection server")]
struct Cli {
    #[command(flatten)]
    #[serde(skip)]
    config: ConfigFlags,
    /// Client TCP listener, host:port.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp_listen: Option<String>,
    /// Client WebSocket listener, host:port.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    ws_listen: Option<String>,
    /// Client TLS listener (the TCP protocol over TLS), host:port; needs --tls-cert/--tls-key.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_listen: Option<String>,
    /// Client WebSocket-over-TLS listener (wss://, path /ws), host:port; needs the TLS files.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    wss_listen: Option<String>,
    #[command(flatten)]
    #[serde(skip_serializing_if = "TlsFlags::is_empty")]
    tls: TlsFlags,
    #[command(flatten)]
    #[serde(flatten)]
    node: NodeFlags,
}

/// The configuration the flags, the file they name and the environment (`env_prefix`) give.
fn load_config(cli: Cli, env_prefix: &str) -> Result<ServerConfig, ConfigError> {
    cli.config.load(env_prefix, &cli)
}

fn main() -> anyhow::Result<()> {
    let config = load_config(Cli::parse(), "CIM_SERVER_").context("loading configuration")?;
    config.validate()?;
    cim_common::config::init_logging();
    cim_common::cli::raise_fd_limit();
    let runtime =
        cim_common::cli::runtime(config.worker_threads).context("building the tokio runtime")?;
    runtime.block_on(run(config))
}

async fn run(config: ServerConfig) -> anyhow::Result<()> {
    let backends = Backends::connect(&config.backend)
        .await
        .map_err(|e| anyhow!("cannot reach a backend: {e}"))?;
    let listeners = Listeners {
        tcp: bind("tcp_listen", &config.tcp_listen).await?,
        ws: bind("ws_listen", &config.ws_listen).await?,
        tls: bind_optional("tls_listen", config.tls_listen()).await?,
        wss: bind_optional("wss_listen", config.wss_listen()).await?,
        internal: bind("internal_listen", &config.internal_listen).await?,
    };
    let handle = cim_server::start(config, listeners, backends).await?;
    shutdown_signal().await;
    handle.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(args: &[&str]) -> ServerConfig {
        load_with_env("CIM_SERVER_TEST_UNUSED_", args)
    }

    fn load_with_env(env_prefix: &str, args: &[&str]) -> ServerConfig {
        let cli =
            Cli::try_parse_from(std::iter::once("cim-server").chain(args.iter().copied())).unwrap();
        load_config(cli, env_prefix).unwrap()
    }

    #[test]
    fn any_setting_comes_from_set_flags_over_the_named_ones() {
        let config = load(&[
            "--set",
            "max_connections=12345",
            "--set",
            "ws_allowed_origins=[\"https://chat.example.com\"]",
            "--worker-threads",
            "2",
            "--set",
            "worker_threads=1",
        ]);
        assert_eq!(config.max_connections, 12345);
        assert_eq!(config.ws_allowed_origins, ["https://chat.example.com"]);
        assert_eq!(config.worker_threads, 1, "--set is the last layer");
        let cli = Cli::try_parse_from(["cim-server", "--set", "max_conections=1"]).unwrap();
        let err = load_config(cli, "CIM_SERVER_TEST_UNUSED_").unwrap_err();
        assert!(err.to_string().contains("max_conections"), "{err}");
    }

    #[test]
    fn worker_threads_from_file_env_and_flag() {
        assert_eq!(load(&[]).worker_threads, 0, "default: tokio's");
        let dir = std::env::temp_dir().join(format!("cim-server-wt-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("server.toml");
        std::fs::write(&file, "worker_threads = 3\n").unwrap();
        let file = file.to_str().unwrap();
        assert_eq!(load(&["--config", file]).worker_threads, 3);
        // A variable of its own: no other test reads this prefix.
        std::env::set_var("CIM_SERVER_TEST_WT_WORKER_THREADS", "2");
        assert_eq!(
            load_with_env("CIM_SERVER_TEST_WT_", &["--config", file]).worker_threads,
            2,
            "the environment beats the file"
        );
        let config = load_with_env(
            "CIM_SERVER_TEST_WT_",
            &["--config", file, "--worker-threads", "1"],
        );
        std::env::remove_var("CIM_SERVER_TEST_WT_WORKER_THREADS");
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(config.worker_threads, 1, "the flag beats both");
        config.validate().unwrap();
        let err = load(&["--worker-threads", "5000"])
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("worker_threads"), "{err}");
        assert!(
            Cli::try_parse_from(["cim-server", "--worker-threads", "-1"]).is_err(),
            "not a count"
        );
    }

    #[test]
    fn flags_override_defaults() {
        let config = load(&[
            "--name",
            "edge1",
            "--tcp-listen",
            "127.0.0.1:7000",
            "--etcd",
            "http://a:2379",
            "--etcd",
            "http://b:2379",
            "--prefix",
            "t1",
        ]);
        assert_eq!(config.name, "edge1");
        assert_eq!(config.tcp_listen, "127.0.0.1:7000");
        assert_eq!(
            config.backend.etcd_endpoints,
            vec!["http://a:2379".to_string(), "http://b:2379".to_string()]
        );
        assert_eq!(config.backend.prefix, "t1");
        // Untouched fields keep their defaults, including the rest of `backend`.
        let defaults = ServerConfig::default();
        assert_eq!(config.backend.redis_url, defaults.backend.redis_url);
        assert_eq!(config.ws_listen, defaults.ws_listen);
    }

    #[test]
    fn tls_listeners_and_files_from_flags() {
        let config = load(&[]);
        assert_eq!(
            (config.tls_listen(), config.wss_listen()),
            (None, None),
            "off by default"
        );
        assert!(!config.tls.is_set());
        let config = load(&[
            "--tls-listen",
            "0.0.0.0:9443",
            "--wss-listen",
            "0.0.0.0:9444",
            "--tls-cert",
            "/etc/cim/cert.pem",
            "--tls-key",
            "/etc/cim/key.pem",
        ]);
        assert_eq!(config.tls_listen(), Some("0.0.0.0:9443"));
        assert_eq!(config.wss_listen(), Some("0.0.0.0:9444"));
        assert_eq!(
            config.tls.cert_file.as_deref(),
            Some(std::path::Path::new("/etc/cim/cert.pem"))
        );
        assert_eq!(
            config.tls.key_file.as_deref(),
            Some(std::path::Path::new("/etc/cim/key.pem"))
        );
        config.validate().unwrap();
        // A TLS listener without the files: refused, saying what is missing.
        let err = load(&["--wss-listen", "0.0.0.0:9444"])
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("[tls]") && err.contains("wss_listen"), "{err}");
    }

    #[test]
    fn file_then_flags() {
        let dir = std::env::temp_dir().join(format!("cim-server-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("server.toml");
        std::fs::write(
            &file,
            "name = \"fromfile\"\nheartbeat_interval_ms = 2000\n[backend]\nredis_url = \"redis://r:1/0\"\n",
        )
        .unwrap();
        let config = load(&["--config", file.to_str().unwrap(), "--name", "fromflag"]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(config.name, "fromflag");
        assert_eq!(config.heartbeat_interval_ms, 2000);
        assert_eq!(config.backend.redis_url, "redis://r:1/0");
        assert_eq!(config.backend.prefix, "cim");
    }

    #[test]
    fn backend_settings_from_the_environment() {
        // `[backend]` through `SECTION__FIELD`: what containers configure by environment.
        let prefix = "CIM_SERVER_TEST_NEST_";
        std::env::set_var(
            format!("{prefix}BACKEND__REDIS_URL"),
            "redis://redis:6379/0",
        );
        std::env::set_var(
            format!("{prefix}BACKEND__ETCD_ENDPOINTS"),
            "[\"http://etcd-0:2379\",\"http://etcd-1:2379\"]",
        );
        std::env::set_var(format!("{prefix}BACKEND__PREFIX"), "team");
        std::env::set_var(format!("{prefix}TCP_LISTEN"), "0.0.0.0:19000");
        let config = load_with_env(prefix, &[]);
        for var in [
            "BACKEND__REDIS_URL",
            "BACKEND__ETCD_ENDPOINTS",
            "BACKEND__PREFIX",
            "TCP_LISTEN",
        ] {
            std::env::remove_var(format!("{prefix}{var}"));
        }
        assert_eq!(config.backend.redis_url, "redis://redis:6379/0");
        assert_eq!(
            config.backend.etcd_endpoints,
            ["http://etcd-0:2379", "http://etcd-1:2379"]
        );
        assert_eq!(config.backend.prefix, "team");
        assert_eq!(config.tcp_listen, "0.0.0.0:19000");
        config.validate().unwrap();
    }
}
