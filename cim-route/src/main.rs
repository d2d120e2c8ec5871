//! `cim-route` binary: loads the configuration (defaults < file < `CIM_ROUTE_*` env < flags),
//! connects to Redis and etcd, binds, runs until ctrl-c or SIGTERM, then shuts down cleanly.

use anyhow::{Context, Result};
use cim_common::{
    backend::Backends,
    cli::{bind, shutdown_signal, BackendFlags},
};
use cim_route::{Listeners, RouteConfig};
use clap::Parser;
use serde::Serialize;
use std::path::PathBuf;

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
    #[command(flatten)]
    backend: BackendFlags,
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
    #[serde(skip_serializing_if = "BackendFlags::is_empty")]
    backend: BackendFlags,
}

impl Cli {
    fn overrides(self) -> Overrides {
        Overrides {
            name: self.name,
            http_listen: self.http_listen,
            internal_listen: self.internal_listen,
            advertise_host: self.advertise_host,
            cluster_secret: self.cluster_secret,
            backend: self.backend,
        }
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
        http: bind("http_listen", &config.http_listen).await?,
        internal: bind("internal_listen", &config.internal_listen).await?,
    };
    let handle = cim_route::start(config, listeners, backends).await?;
    shutdown_signal().await;
    handle.shutdown().await;
    Ok(())
}
