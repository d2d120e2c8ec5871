//! A real single-member `etcd` process on free ports, in its own temporary directory.

use crate::process::{
    free_ports, locate_binary, log_tail, relaunch, report_on_panic, ChildGuard, LaunchError,
    ProcessSlot,
};
use crate::wait_until;
use anyhow::{anyhow, Context as _};
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};
use tempfile::TempDir;

/// How long a start (or restart) may take before it is an error.
pub(crate) const START_DEADLINE: Duration = Duration::from_secs(15);
/// Attempts with fresh ports when the process exits at start (a port taken meanwhile).
pub(crate) const START_ATTEMPTS: usize = 5;
/// Deadline of one readiness probe.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);

/// An `etcd` child process (one-member cluster), killed (SIGKILL) when dropped. Its data dir
/// and `etcd.log` live in a temporary directory removed on drop.
///
/// Raft timing is shortened (heartbeat 50 ms, election 500 ms) so it starts fast and grants
/// lease TTLs down to 1 s (with the defaults etcd rounds a 1 s TTL up to 2 s).
#[derive(Debug)]
pub struct Etcd {
    name: String,
    client_port: u16,
    peer_port: u16,
    binary: PathBuf,
    process: ProcessSlot,
    // Declared last: removed after the process is killed (see Drop).
    dir: TempDir,
}

impl Etcd {
    /// Starts etcd and waits until a read through `etcd_client` works against this very
    /// process (the member name, unique per instance, is checked, so a port taken by another
    /// test's etcd is never mistaken for ours). Retries on fresh ports when etcd exits at start.
    pub async fn start() -> anyhow::Result<Etcd> {
        let binary = locate_binary("etcd", "CIM_TEST_ETCD", "etcd-server")?;
        let dir = tempfile::Builder::new()
            .prefix("cim-test-etcd-")
            .tempdir()
            .context("creating a temporary directory for etcd")?;
        let mut etcd = Etcd {
            name: format!("t-{:016x}", rand::random::<u64>()),
            client_port: 0,
            peer_port: 0,
            binary,
            process: ProcessSlot::default(),
            dir,
        };
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            [etcd.client_port, etcd.peer_port] = free_ports::<2>()?;
            // A failed attempt may have initialised the data dir with the old peer URL.
            let _ = std::fs::remove_dir_all(etcd.data_dir());
            match etcd.launch().await {
                Ok(()) => return Ok(etcd),
                Err(LaunchError::Exited(e)) => last = Some(e),
                Err(LaunchError::Other(e)) => return Err(e),
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow!("etcd did not start"))
            .context(format!("etcd failed {START_ATTEMPTS} times")))
    }

    /// `http://127.0.0.1:{client port}`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    pub fn peer_port(&self) -> u16 {
        self.peer_port
    }

    /// The member name (`--name`), unique per instance.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The file receiving etcd's stdout and stderr.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn is_running(&self) -> bool {
        self.process.is_running()
    }

    /// SIGKILLs etcd (a crash). Idempotent.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Kills etcd if it runs, then starts it again on the same ports and data dir (keys and
    /// leases survive) and waits until it answers.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        relaunch("etcd", self.client_port, || self.launch()).await
    }

    /// A client of this etcd (for tests that look at raw keys).
    pub async fn client(&self) -> anyhow::Result<etcd_client::Client> {
        connect(&self.endpoint(), START_DEADLINE).await
    }

    fn args(&self) -> Vec<OsString> {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        member_args(&MemberSpec {
            name: &self.name,
            data_dir: &self.data_dir(),
            client_port: self.client_port,
            peer_port: self.peer_port,
            initial_cluster: &format!("{}={peer}", self.name),
            token: &self.name,
        })
    }

    async fn launch(&self) -> Result<(), LaunchError> {
        let mut cmd = Command::new(&self.binary);
        cmd.args(self.args()).current_dir(self.dir.path());
        let guard = ChildGuard::spawn(format!("etcd:{}", self.client_port), cmd, &self.log_path())
            .map_err(LaunchError::Other)?;
        self.process.set(guard);

        let endpoint = self.endpoint();
        let name = self.name.as_str();
        let process = &self.process;
        let ready = wait_until(
            &format!("etcd at {endpoint} to answer"),
            START_DEADLINE,
            || {
                let exited = !process.is_running();
                let endpoint = endpoint.clone();
                async move { exited || answers_as(&endpoint, name).await }
            },
        )
        .await;
        let exited = !self.is_running();
        let log = || {
            format!(
                "log {}:\n{}",
                self.log_path().display(),
                log_tail(&self.log_path(), 20)
            )
        };
        match (ready, exited) {
            (Ok(()), false) => Ok(()),
            (_, true) => Err(LaunchError::Exited(anyhow!(
                "etcd exited at start on ports {}/{}; {}",
                self.client_port,
                self.peer_port,
                log()
            ))),
            (Err(e), false) => {
                self.process.kill();
                Err(LaunchError::Other(e.context(log())))
            }
        }
    }
}

/// One member's place in its cluster: what [`member_args`] turns into flags. Shared by
/// [`Etcd`] (a cluster of one) and [`crate::EtcdCluster`].
pub(crate) struct MemberSpec<'a> {
    /// `--name`, unique per member (readiness checks look for it).
    pub name: &'a str,
    pub data_dir: &'a Path,
    pub client_port: u16,
    pub peer_port: u16,
    /// `--initial-cluster`: `name=http://127.0.0.1:peer` for every member, comma-separated.
    pub initial_cluster: &'a str,
    /// `--initial-cluster-token`, unique per cluster: members of another test's cluster on
    /// a recycled port refuse to talk to ours.
    pub token: &'a str,
}

/// The flags of one etcd member on 127.0.0.1. Raft timing is shortened (heartbeat 50 ms,
/// election 500 ms) so it starts fast and grants lease TTLs down to 1 s (with the defaults
/// etcd rounds a 1 s TTL up to 2 s). Once the data dir exists (a restart) etcd ignores the
/// `--initial-*` flags and rejoins with what it stored.
pub(crate) fn member_args(spec: &MemberSpec<'_>) -> Vec<OsString> {
    let client = format!("http://127.0.0.1:{}", spec.client_port);
    let peer = format!("http://127.0.0.1:{}", spec.peer_port);
    let mut args: Vec<OsString> = Vec::new();
    let mut flag = |k: &str, v: OsString| {
        args.push(k.into());
        args.push(v);
    };
    flag("--name", spec.name.into());
    flag("--data-dir", spec.data_dir.into());
    flag("--listen-client-urls", client.clone().into());
    flag("--advertise-client-urls", client.into());
    flag("--listen-peer-urls", peer.clone().into());
    flag("--initial-advertise-peer-urls", peer.into());
    flag("--initial-cluster", spec.initial_cluster.into());
    flag("--initial-cluster-token", spec.token.into());
    flag("--initial-cluster-state", "new".into());
    flag("--heartbeat-interval", "50".into());
    flag("--election-timeout", "500".into());
    flag("--logger", "zap".into());
    flag("--log-level", "error".into());
    args
}

/// A client of the one etcd at `endpoint`, connected within `timeout` (calls time out after
/// it too).
pub(crate) async fn connect(
    endpoint: &str,
    timeout: Duration,
) -> anyhow::Result<etcd_client::Client> {
    connect_all(&[endpoint], timeout).await
}

/// A client balancing over `endpoints` (what the cim registry is given), connected within
/// `timeout` (calls time out after it too).
pub(crate) async fn connect_all(
    endpoints: &[&str],
    timeout: Duration,
) -> anyhow::Result<etcd_client::Client> {
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout);
    tokio::time::timeout(
        timeout,
        etcd_client::Client::connect(endpoints, Some(options)),
    )
    .await
    .map_err(|_| anyhow!("connecting to etcd at {endpoints:?} timed out"))?
    .with_context(|| format!("connecting to etcd at {endpoints:?}"))
}

/// Whether the etcd at `endpoint` serves reads and is the member `name`.
async fn answers_as(endpoint: &str, name: &str) -> bool {
    let probe = async {
        let mut client = connect(endpoint, PROBE_TIMEOUT).await.ok()?;
        client.get("cim-tests-probe", None).await.ok()?;
        let members = client.member_list().await.ok()?;
        Some(members.members().iter().any(|m| m.name() == name))
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, probe).await,
        Ok(Some(true))
    )
}

impl Drop for Etcd {
    fn drop(&mut self) {
        report_on_panic(
            &format!("etcd on port {}", self.client_port),
            &self.log_path(),
        );
        self.kill();
    }
}
