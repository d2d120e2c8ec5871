//! `cim-route` binary: loads the configuration (defaults < file < `CIM_ROUTE_*` env < flags),
//! builds a tokio runtime of `worker_threads` workers, connects to Redis and etcd, binds, runs
//! until ctrl-c or SIGTERM, then shuts down cleanly.

use anyhow::{Context, Result};
use cim_common::{
    backend::Backends,
    cli::{bind, shutdown_signal, ConfigFlags, NodeFlags, TlsFlags},
    config::ConfigError,
};
use cim_route::{Listeners, RouteConfig};
use clap::Parser;
use serde::Serialize;

/// The command line; serialized, the named flags that were given in the shape of
/// [`RouteConfig`] (the flags' config layer).
#[derive(Parser, Serialize, Debug)]
#[command(
    name = "cim-route",
    version,
    about = "cim route: accounts, login and message routing"
)]
struct Cli {
    #[command(flatten)]
    #[serde(skip)]
    config: ConfigFlags,
    /// Public HTTP API address (HTTPS with --tls-cert/--tls-key).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_listen: Option<String>,
    #[command(flatten)]
    #[serde(skip_serializing_if = "TlsFlags::is_empty")]
    tls: TlsFlags,
    #[command(flatten)]
    #[serde(flatten)]
    node: NodeFlags,
}

/// The configuration the flags, the file they name and the environment (`env_prefix`) give.
fn load_config(cli: Cli, env_prefix: &str) -> Result<RouteConfig, ConfigError> {
    cli.config.load(env_prefix, &cli)
}

fn main() -> Result<()> {
    let config = load_config(Cli::parse(), "CIM_ROUTE_").context("loading the configuration")?;
    config.validate()?;
    cim_common::config::init_logging();
    let runtime =
        cim_common::cli::runtime(config.worker_threads).context("building the tokio runtime")?;
    runtime.block_on(run(config))
}

async fn run(config: RouteConfig) -> Result<()> {
    let backends = Backends::connect(&config.backend)
        .await
        .map_err(anyhow::Error::msg)
        .context("connecting to the backends")?;
    let listeners = Listeners {
        http: bind("http_listen", &config.http_listen).await?,
        internal: bind("internal_listen", &config.internal_listen).await?,
    };
    let handle = cim_route::start(config, listeners, backends).await?;
    shutdown_signal().await;
    handle.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env_prefix: &str, args: &[&str]) -> RouteConfig {
        let cli =
            Cli::try_parse_from(std::iter::once("cim-route").chain(args.iter().copied())).unwrap();
        load_config(cli, env_prefix).unwrap()
    }

    #[test]
    fn any_setting_comes_from_set_flags() {
        let config = load(
            "CIM_ROUTE_TEST_UNUSED_",
            &[
                "--set",
                "login_conflict=replace",
                "--set",
                "login_rate_per_addr=0",
                "--set",
                "client_ip_header=x-real-ip",
                "--set",
                "backend.prefix=other",
            ],
        );
        assert_eq!(
            config.login_conflict,
            cim_route::config::LoginConflict::Replace
        );
        assert_eq!(config.login_rate_per_addr, 0);
        assert_eq!(config.client_ip_header.as_deref(), Some("x-real-ip"));
        assert_eq!(config.backend.prefix, "other");
    }

    #[test]
    fn worker_threads_from_file_env_and_flag() {
        const UNUSED: &str = "CIM_ROUTE_TEST_UNUSED_";
        assert_eq!(load(UNUSED, &[]).worker_threads, 0, "default: tokio's");
        let dir = std::env::temp_dir().join(format!("cim-route-wt-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("route.toml");
        std::fs::write(&file, "worker_threads = 3\nscan_batch = 7\n").unwrap();
        let file = file.to_str().unwrap();
        let config = load(UNUSED, &["--config", file]);
        assert_eq!((config.worker_threads, config.scan_batch), (3, 7));
        // A variable of its own: no other test reads this prefix.
        std::env::set_var("CIM_ROUTE_TEST_WT_WORKER_THREADS", "2");
        assert_eq!(
            load("CIM_ROUTE_TEST_WT_", &["--config", file]).worker_threads,
            2,
            "the environment beats the file"
        );
        let config = load(
            "CIM_ROUTE_TEST_WT_",
            &["--config", file, "--worker-threads", "1"],
        );
        std::env::remove_var("CIM_ROUTE_TEST_WT_WORKER_THREADS");
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(config.worker_threads, 1, "the flag beats both");
        assert_eq!(config.validate(), Ok(()));
        let err = load(UNUSED, &["--worker-threads", "5000"])
            .validate()
            .unwrap_err();
        assert_eq!(err.field(), Some("worker_threads"));
    }

    #[test]
    fn backend_settings_from_the_environment() {
        // `[backend]` through `SECTION__FIELD`: what containers configure by environment.
        let prefix = "CIM_ROUTE_TEST_NEST_";
        std::env::set_var(
            format!("{prefix}BACKEND__REDIS_URL"),
            "redis://redis:6379/0",
        );
        std::env::set_var(
            format!("{prefix}BACKEND__ETCD_ENDPOINTS"),
            "[\"http://etcd:2379\"]",
        );
        std::env::set_var(format!("{prefix}BACKEND__INBOX_MAX_MESSAGES"), "50");
        std::env::set_var(format!("{prefix}API_KEYS"), "[\"a-backend-key-of-16+\"]");
        let config = load(prefix, &[]);
        for var in [
            "BACKEND__REDIS_URL",
            "BACKEND__ETCD_ENDPOINTS",
            "BACKEND__INBOX_MAX_MESSAGES",
            "API_KEYS",
        ] {
            std::env::remove_var(format!("{prefix}{var}"));
        }
        assert_eq!(config.backend.redis_url, "redis://redis:6379/0");
        assert_eq!(config.backend.etcd_endpoints, ["http://etcd:2379"]);
        assert_eq!(config.backend.inbox_max_messages, 50);
        assert_eq!(config.api_keys, ["a-backend-key-of-16+"]);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn group_history_and_message_event_settings_from_file_environment_and_flags() {
        // The settings of stored groups, history and the offline-push hook, each way.
        let prefix = "CIM_ROUTE_TEST_GROUPS_";
        let dir =
            std::env::temp_dir().join(format!("cim-route-groups-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("route.toml");
        std::fs::write(
            &file,
            "message_events_body = true\n[groups]\nmax_members = 300\n[backend]\nhistory_max_age_secs = 3600\n",
        )
        .unwrap();
        std::env::set_var(format!("{prefix}MESSAGE_EVENTS"), "true");
        std::env::set_var(format!("{prefix}GROUPS__MAX_GROUPS"), "20");
        std::env::set_var(format!("{prefix}BACKEND__HISTORY_MAX_MESSAGES"), "500");
        let config = load(
            prefix,
            &[
                "--config",
                file.to_str().unwrap(),
                "--set",
                "backend.history_before_join=5",
                "--set",
                "groups.max_members=400",
            ],
        );
        for var in [
            "MESSAGE_EVENTS",
            "GROUPS__MAX_GROUPS",
            "BACKEND__HISTORY_MAX_MESSAGES",
        ] {
            std::env::remove_var(format!("{prefix}{var}"));
        }
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(config.message_events && config.message_events_body);
        assert_eq!(
            (config.groups.max_members, config.groups.max_groups),
            (400, 20)
        );
        let history = config.backend.history_limits();
        assert_eq!(history.max_messages, 500);
        assert_eq!(history.max_age, std::time::Duration::from_secs(3600));
        assert_eq!(history.before_join, 5);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn tls_files_from_flags_and_file() {
        const UNUSED: &str = "CIM_ROUTE_TEST_UNUSED_";
        assert!(!load(UNUSED, &[]).https(), "plain HTTP by default");
        let dir = std::env::temp_dir().join(format!("cim-route-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("route.toml");
        std::fs::write(&file, "[tls]\nkey_file = \"/etc/cim/key.pem\"\n").unwrap();
        let file = file.to_str().unwrap();
        let err = load(UNUSED, &["--config", file]).validate().unwrap_err();
        assert_eq!(err.field(), Some("tls"));
        assert!(err.reason().unwrap().contains("cert_file"), "{err}");
        let config = load(
            UNUSED,
            &["--config", file, "--tls-cert", "/etc/cim/cert.pem"],
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(config.validate(), Ok(()));
        assert!(config.https());
        assert_eq!(
            config.tls.cert_file.as_deref(),
            Some(std::path::Path::new("/etc/cim/cert.pem"))
        );
        assert_eq!(
            config.tls.key_file.as_deref(),
            Some(std::path::Path::new("/etc/cim/key.pem")),
            "the file's key stays beside the flag's certificate"
        );
    }
}
