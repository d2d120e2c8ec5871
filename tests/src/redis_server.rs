//! A real `redis-server` process on a free port, in its own temporary directory.

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
pub(crate) const START_DEADLINE: Duration = Duration::from_secs(10);
/// Attempts with fresh ports when the process exits at start (a port taken meanwhile).
pub(crate) const START_ATTEMPTS: usize = 5;
/// Deadline of one readiness probe.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Options of [`Redis::start_with`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RedisOptions {
    /// Persist with the append-only file (`appendfsync always`): every acknowledged write
    /// survives [`Redis::kill`] + [`Redis::restart`]. Without it, a restart starts empty.
    pub aof: bool,
}

/// A `redis-server` child process on `127.0.0.1:{port}`, killed (SIGKILL) when dropped.
/// Its working directory (data, `redis.log`) is a temporary directory removed on drop.
#[derive(Debug)]
pub struct Redis {
    options: RedisOptions,
    port: u16,
    binary: PathBuf,
    process: ProcessSlot,
    // Declared last: removed after the process is killed (see Drop).
    dir: TempDir,
}

impl Redis {
    /// Starts a throw-away Redis (no persistence) and waits until it answers.
    pub async fn start() -> anyhow::Result<Redis> {
        Self::start_with(RedisOptions::default()).await
    }

    /// Starts a Redis with `options` and waits until it answers PING (as this very process:
    /// its `INFO` must report our pid, so a port taken by another test is never mistaken for
    /// ours). Retries on fresh ports when the process exits at start.
    pub async fn start_with(options: RedisOptions) -> anyhow::Result<Redis> {
        let binary = locate_binary("redis-server", "CIM_TEST_REDIS_SERVER", "redis-server")?;
        let dir = tempfile::Builder::new()
            .prefix("cim-test-redis-")
            .tempdir()
            .context("creating a temporary directory for redis")?;
        let mut redis = Redis {
            options,
            port: 0,
            binary,
            process: ProcessSlot::default(),
            dir,
        };
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            let [port] = free_ports::<1>()?;
            redis.port = port;
            match redis.launch().await {
                Ok(()) => return Ok(redis),
                Err(LaunchError::Exited(e)) => last = Some(e),
                Err(LaunchError::Other(e)) => return Err(e),
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow!("redis-server did not start"))
            .context(format!("redis-server failed {START_ATTEMPTS} times")))
    }

    /// `redis://127.0.0.1:{port}/0`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The working directory (RDB / AOF files, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The file receiving the server's stdout and stderr.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(LOG_FILE)
    }

    pub fn options(&self) -> RedisOptions {
        self.options
    }

    /// The server's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Whether the process is running (it may have been killed or have crashed).
    pub fn is_running(&self) -> bool {
        self.process.is_running()
    }

    /// SIGKILLs the server (a crash: no shutdown save). Idempotent.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Kills the server if it runs, then starts it again on the same port and directory (with
    /// AOF on, the data is still there) and waits until it answers.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        relaunch("redis-server", self.port, || self.launch()).await
    }

    /// A new client connection (for tests that look at raw keys).
    pub async fn connection(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url())?;
        tokio::time::timeout(START_DEADLINE, client.get_multiplexed_async_connection())
            .await
            .map_err(|_| anyhow!("connecting to redis at {} timed out", self.url()))?
            .with_context(|| format!("connecting to redis at {}", self.url()))
    }

    fn args(&self) -> Vec<OsString> {
        server_args(self.port, self.dir.path(), self.options.aof)
    }

    /// Spawns the process on `self.port` and waits until it answers as itself.
    async fn launch(&self) -> Result<(), LaunchError> {
        launch_server(
            &self.binary,
            self.args(),
            self.port,
            self.dir.path(),
            &self.process,
        )
        .await
    }
}

/// The log file of a server, in its directory.
pub(crate) const LOG_FILE: &str = "redis.log";

/// The arguments every test `redis-server` gets (standalone or cluster node): `port` on
/// 127.0.0.1, data in `dir`, no RDB snapshots, log to stdout (our log file), and with `aof`
/// the append-only file fsynced on every write.
pub(crate) fn server_args(port: u16, dir: &Path, aof: bool) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--port".into(),
        port.to_string().into(),
        "--bind".into(),
        "127.0.0.1".into(),
        "--dir".into(),
        dir.into(),
        "--daemonize".into(),
        "no".into(),
        "--save".into(),
        "".into(),
        "--logfile".into(),
        "".into(),
        "--loglevel".into(),
        "warning".into(),
    ];
    if aof {
        args.extend(["--appendonly", "yes", "--appendfsync", "always"].map(OsString::from));
    } else {
        args.extend(["--appendonly", "no"].map(OsString::from));
    }
    args
}

/// Spawns `binary args` in `dir` (log: `dir/redis.log`) as the current run of `process`, and
/// waits until the server on `port` answers as this very process. An exit before that is
/// [`LaunchError::Exited`] (typically a port taken meanwhile: retry on fresh ports).
pub(crate) async fn launch_server(
    binary: &Path,
    args: Vec<OsString>,
    port: u16,
    dir: &Path,
    process: &ProcessSlot,
) -> Result<(), LaunchError> {
    let log_path = dir.join(LOG_FILE);
    let mut cmd = Command::new(binary);
    cmd.args(args).current_dir(dir);
    let guard =
        ChildGuard::spawn(format!("redis:{port}"), cmd, &log_path).map_err(LaunchError::Other)?;
    let pid = guard.id().unwrap_or_default();
    process.set(guard);

    let ready = wait_until(
        &format!("redis-server on port {port} to answer"),
        START_DEADLINE,
        || {
            let exited = !process.is_running();
            async move { exited || answers_as(port, pid).await }
        },
    )
    .await;
    let exited = !process.is_running();
    let log = || format!("log {}:\n{}", log_path.display(), log_tail(&log_path, 20));
    match (ready, exited) {
        (Ok(()), false) => Ok(()),
        (_, true) => Err(LaunchError::Exited(anyhow!(
            "redis-server exited at start on port {port}; {}",
            log()
        ))),
        (Err(e), false) => {
            process.kill();
            Err(LaunchError::Other(e.context(log())))
        }
    }
}

/// Whether the Redis on `port` answers and is the process `pid`.
pub(crate) async fn answers_as(port: u16, pid: u32) -> bool {
    let probe = async {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).ok()?;
        let mut c = client.get_multiplexed_async_connection().await.ok()?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut c)
            .await
            .ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
    };
    matches!(tokio::time::timeout(PROBE_TIMEOUT, probe).await, Ok(Some(p)) if p == pid)
}

impl Drop for Redis {
    fn drop(&mut self) {
        report_on_panic(
            &format!("redis-server on port {}", self.port),
            &self.log_path(),
        );
        self.kill();
    }
}
