//! `cim-route` binary: loads the configuration (defaults < file < `CIM_ROUTE_*` env < flags),
//! connects to Redis and etcd, binds, runs until ctrl-c or SIGTERM, then shuts down cleanly.

use anyhow::{Context, Result};
use cim_common::backend::Backends;
use cim_route::{Listeners, RouteConfig};
use clap::Parser;
use serde::Serialize;
use std::path::PathBuf;
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(
    name = "cim-route",
    version,
    about = "cim route: accounts, login and message routing"
)]
struct Cli {
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Instance name (the id is `{name}-{random}`).
    #[arg(long)]
    name: Option<String>,
    /// Public HTTP API address.
    #[arg(long)]
    http_listen: Option<String>,
    /// Internal API address (forwards from connection servers).
    #[arg(long)]
    internal_listen: Option<String>,
    /// Host advertised in the registry.
    #[arg(long)]
    advertise_host: Option<String>,
    /// Redis URL.
    #[arg(long)]
    redis_url: Option<String>,
    /// etcd endpoint (repeatable).
    #[arg(long = "etcd")]
    etcd: Vec<String>,
    /// Key prefix in Redis and etcd.
    #[arg(long)]
    prefix: Option<String>,
    /// Cluster secret shared by every cim process.
    #[arg(long)]
    cluster_secret: Option<String>,
}

/// The flags that were given, in the shape of [`RouteConfig`] (absent ones omitted).
#[derive(Serialize, Default)]
struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    internal_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    advertise_host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_secret: Option<String>,
    #[serde(skip_serializing_if = "BackendOverrides::is_empty")]
    backend: BackendOverrides,
}

#[derive(Serialize, Default)]
struct BackendOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd_endpoints: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
}

impl BackendOverrides {
    fn is_empty(&self) -> bool {
        self.redis_url.is_none() && self.etcd_endpoints.is_none() && self.prefix.is_none()
    }
}

impl Cli {
    fn overrides(self) -> Overrides {
        Overrides {
            name: self.name,
            http_listen: self.http_listen,
            internal_listen: self.internal_listen,
            advertise_host: self.advertise_host,
            cluster_secret: self.cluster_secret,
            backend: BackendOverrides {
                redis_url: self.redis_url,
                etcd_endpoints: (!self.etcd.is_empty()).then_some(self.etcd),
                prefix: self.prefix,
            },
        }
    }
}

async fn bind(addr: &str, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({what})"))
}

/// Resolves on ctrl-c or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut cli = Cli::parse();
    let file = cli.config.take();
    let config: RouteConfig =
        cim_common::config::load(file.as_deref(), "CIM_ROUTE_", &cli.overrides())
            .context("loading the configuration")?;
    config.validate()?;
    cim_common::config::init_logging();

    let backends = Backends::connect(&config.backend)
        .await
        .map_err(anyhow::Error::msg)
        .context("connecting to the backends")?;
    let listeners = Listeners {
        http: bind(&config.http_listen, "http_listen").await?,
        internal: bind(&config.internal_listen, "internal_listen").await?,
    };
    let handle = cim_route::start(config, listeners, backends).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    handle.shutdown().await;
    Ok(())
}
