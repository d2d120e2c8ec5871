//! The real `cim-server` and `cim-route` binaries as child processes, for tests that kill a
//! process for real (`kill -9`) rather than dropping an in-process runtime.
//!
//! The caller passes the binary: only a crate's own integration tests know where Cargo built
//! it (`env!("CARGO_BIN_EXE_cim-server")` in cim-server's tests, `CARGO_BIN_EXE_cim-route` in
//! cim-route's). The config is a [`ServerConfig`] / [`RouteConfig`], typically from
//! [`Cluster::server_config`](crate::cluster::Cluster::server_config) /
//! [`Cluster::route_config`](crate::cluster::Cluster::route_config); every listener is set to
//! a free port on 127.0.0.1, the whole config is written to a TOML file in the process's own
//! temporary directory and passed with `--config`. Output goes to `node.log` there.
//!
//! Ready means registered: the start waits (with a deadline) until the process appears in the
//! registry (etcd) with the addresses it was given, which it does only after binding every
//! listener and connecting to both backends. A process that exits first (a port taken by
//! someone else in the meantime) is started again on fresh ports.
//!
//! Every process is a [`ChildGuard`]: [`ServerProcess::kill`] / [`RouteProcess::kill`] is
//! SIGKILL, and dropping the struct kills it too (also when the test panics; the log tail is
//! printed then).

use crate::process::{free_ports, log_tail, report_on_panic, ChildGuard};
use anyhow::{anyhow, Context as _};
use cim_common::{
    backend::BackendConfig,
    registry::{EtcdRegistry, MembersRx, Registry as _, ServiceInfo, ServiceKind},
};
use cim_route::RouteConfig;
use cim_server::ServerConfig;
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};
use tempfile::TempDir;

/// How long a start may take (registration included) before it is an error.
const START_DEADLINE: Duration = Duration::from_secs(20);
/// Attempts with fresh ports when the process exits before registering.
const START_ATTEMPTS: usize = 3;

/// One run of a binary: the process, its directory (config, log) and what it registered.
/// [`ServerProcess`] and [`RouteProcess`] dereference to it for what they share.
#[derive(Debug)]
pub struct BinProcess {
    what: &'static str,
    guard: ChildGuard,
    log: PathBuf,
    info: ServiceInfo,
    // Declared last: removed after the process is killed.
    dir: TempDir,
}

impl BinProcess {
    pub fn pid(&self) -> Option<u32> {
        self.guard.id()
    }

    pub fn is_running(&mut self) -> bool {
        self.guard.is_running()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Its temporary directory (config file, log), removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// `kill -9`, and reaps it. Nothing cleans up: its registration stays until the lease
    /// expires, its users' routes and login slots stay in Redis. Idempotent.
    pub fn kill(&mut self) {
        self.guard.kill();
    }

    /// Starts `binary --config <file>` until it registers as `kind`. `configure` gets fresh
    /// ports on each attempt and returns the TOML text and the address the process must
    /// register (`pick` reads that address from a registry entry).
    async fn start(
        what: &'static str,
        binary: &Path,
        kind: ServiceKind,
        backend: &BackendConfig,
        mut configure: impl FnMut([u16; 3]) -> anyhow::Result<(String, String)>,
        pick: fn(&ServiceInfo) -> &str,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("cim-test-{what}-"))
            .tempdir()
            .with_context(|| format!("creating a temporary directory for {what}"))?;
        let log = dir.path().join("node.log");
        let config_file = dir.path().join("config.toml");
        let registry = EtcdRegistry::connect(
            &backend.etcd_endpoints,
            &format!("/{}", backend.prefix),
            backend.timeout(),
        )
        .await
        .map_err(|e| anyhow!("{what}: connecting to etcd to await the registration: {e}"))?;
        let members = registry
            .watch(kind)
            .await
            .map_err(|e| anyhow!("{what}: watching the registry: {e}"))?;
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            let (toml, addr) = configure(free_ports::<3>()?)?;
            std::fs::write(&config_file, toml)
                .with_context(|| format!("writing {}", config_file.display()))?;
            let mut cmd = Command::new(binary);
            cmd.arg("--config")
                .arg(&config_file)
                .current_dir(dir.path());
            if std::env::var_os("RUST_LOG").is_none() {
                cmd.env("RUST_LOG", "info");
            }
            let mut guard = ChildGuard::spawn(what, cmd, &log)?;
            match await_registration(&mut guard, members.clone(), &addr, pick).await {
                Ok(info) => {
                    return Ok(Self {
                        what,
                        guard,
                        log,
                        info,
                        dir,
                    })
                }
                Err(Launch::Exited) => {
                    last = Some(anyhow!(
                        "{what} exited before registering; last lines of {}:\n{}",
                        log.display(),
                        log_tail(&log, 20)
                    ));
                }
                Err(Launch::TimedOut) => {
                    drop(guard);
                    return Err(anyhow!(
                        "{what} did not register at {addr} within {START_DEADLINE:?}; last \
                         lines of {}:\n{}",
                        log.display(),
                        log_tail(&log, 20)
                    ));
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("{what} did not start")))
    }
}

impl Drop for BinProcess {
    fn drop(&mut self) {
        self.guard.kill();
        report_on_panic(self.what, &self.log);
    }
}

enum Launch {
    Exited,
    TimedOut,
}

/// Waits until the registry lists a member at `addr`, or the process exits, or the deadline.
async fn await_registration(
    guard: &mut ChildGuard,
    mut members: MembersRx,
    addr: &str,
    pick: fn(&ServiceInfo) -> &str,
) -> Result<ServiceInfo, Launch> {
    let deadline = tokio::time::Instant::now() + START_DEADLINE;
    loop {
        if let Some(info) = members.borrow_and_update().iter().find(|m| pick(m) == addr) {
            return Ok(info.clone());
        }
        if !guard.is_running() {
            return Err(Launch::Exited);
        }
        // The registration is an event (the watch); an exit is not: look at the process
        // again at least every poll interval.
        let wake = (tokio::time::Instant::now() + crate::POLL_INTERVAL).min(deadline);
        if tokio::time::Instant::now() >= deadline {
            return Err(Launch::TimedOut);
        }
        let _ = tokio::time::timeout_at(wake, members.changed()).await;
    }
}

fn server_toml(config: &ServerConfig) -> anyhow::Result<String> {
    toml::to_string(config).context("serializing the server config as TOML")
}

fn route_toml(config: &RouteConfig) -> anyhow::Result<String> {
    toml::to_string(config).context("serializing the route config as TOML")
}

fn loopback(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// A `cim-server` process.
#[derive(Debug)]
pub struct ServerProcess {
    process: BinProcess,
    /// The config it runs with (listen addresses as started).
    pub config: ServerConfig,
}

impl ServerProcess {
    /// Starts `binary` with `config`, its three listeners on free loopback ports, and waits
    /// until it is registered in etcd.
    pub async fn start(binary: impl AsRef<Path>, config: ServerConfig) -> anyhow::Result<Self> {
        let mut config = config;
        config.advertise_host = None;
        config.advertise_tcp = None;
        config.advertise_ws = None;
        config.advertise_internal = None;
        let backend = config.backend.clone();
        let mut started = config.clone();
        let process = BinProcess::start(
            "cim-server",
            binary.as_ref(),
            ServiceKind::Server,
            &backend,
            |[tcp, ws, internal]| {
                started.tcp_listen = loopback(tcp);
                started.ws_listen = loopback(ws);
                started.internal_listen = loopback(internal);
                Ok((server_toml(&started)?, loopback(tcp)))
            },
            |m| &m.tcp_addr,
        )
        .await?;
        Ok(Self {
            process,
            config: started,
        })
    }

    /// The instance id it registered with.
    pub fn id(&self) -> &str {
        &self.process.info.id
    }

    /// Client TCP address (`host:port`).
    pub fn tcp_addr(&self) -> &str {
        &self.process.info.tcp_addr
    }

    /// Client WebSocket address (`host:port`, path `/ws`).
    pub fn ws_addr(&self) -> &str {
        &self.process.info.ws_addr
    }

    /// Internal API address (`host:port`).
    pub fn internal_addr(&self) -> &str {
        &self.process.info.internal_addr
    }
}

impl std::ops::Deref for ServerProcess {
    type Target = BinProcess;
    fn deref(&self) -> &BinProcess {
        &self.process
    }
}

impl std::ops::DerefMut for ServerProcess {
    fn deref_mut(&mut self) -> &mut BinProcess {
        &mut self.process
    }
}

impl std::ops::Deref for RouteProcess {
    type Target = BinProcess;
    fn deref(&self) -> &BinProcess {
        &self.process
    }
}

impl std::ops::DerefMut for RouteProcess {
    fn deref_mut(&mut self) -> &mut BinProcess {
        &mut self.process
    }
}

/// A `cim-route` process.
#[derive(Debug)]
pub struct RouteProcess {
    process: BinProcess,
    /// The config it runs with (listen addresses as started).
    pub config: RouteConfig,
}

impl RouteProcess {
    /// Starts `binary` with `config`, both listeners on free loopback ports, and waits until
    /// it is registered in etcd.
    pub async fn start(binary: impl AsRef<Path>, config: RouteConfig) -> anyhow::Result<Self> {
        let mut config = config;
        config.advertise_host = None;
        config.advertise_http = None;
        config.advertise_internal = None;
        let backend = config.backend.clone();
        let mut started = config.clone();
        let process = BinProcess::start(
            "cim-route",
            binary.as_ref(),
            ServiceKind::Route,
            &backend,
            |[http, internal, _]| {
                started.http_listen = loopback(http);
                started.internal_listen = loopback(internal);
                Ok((route_toml(&started)?, loopback(http)))
            },
            |m| &m.http_addr,
        )
        .await?;
        Ok(Self {
            process,
            config: started,
        })
    }

    pub fn id(&self) -> &str {
        &self.process.info.id
    }

    /// Public HTTP address (`host:port`).
    pub fn http_addr(&self) -> &str {
        &self.process.info.http_addr
    }

    /// Internal API address (`host:port`).
    pub fn internal_addr(&self) -> &str {
        &self.process.info.internal_addr
    }

    /// Base URL of the public API.
    pub fn url(&self) -> String {
        format!("http://{}", self.http_addr())
    }

    pub fn client(&self) -> cim_sdk::RouteClient {
        cim_sdk::RouteClient::new(&self.url())
    }
}
