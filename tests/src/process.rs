//! Child processes that cannot outlive their owner: [`ChildGuard`], plus the small helpers the
//! backend starters share (locating a binary, picking free ports, reading a log tail).

use anyhow::{anyhow, Context as _};
use std::{
    ffi::OsString,
    fs::{File, OpenOptions},
    io::{self, Read as _, Seek as _, SeekFrom},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{mpsc, OnceLock},
    thread,
};

/// A child process that is SIGKILLed and reaped when the guard is dropped (also while a test
/// unwinds from a panic, and also outside any async runtime).
///
/// Children are additionally started under `setpriv --pdeathsig KILL` (util-linux) when it is
/// available, from one long-lived spawner thread: the kernel then kills them if the whole test
/// process dies without running destructors (SIGKILL, abort, a CI timeout). The parent-death
/// signal fires when the *thread* that forked the child exits, which is why every spawn goes
/// through a thread that lives as long as the process.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    exit: Option<ExitStatus>,
}

impl ChildGuard {
    /// Spawns `cmd` (its program, arguments, environment and working directory) with stdin
    /// from /dev/null and stdout + stderr appended to the file `log`.
    pub fn spawn(name: impl Into<String>, cmd: Command, log: &Path) -> anyhow::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log file {}", log.display()))?;
        let program = cmd.get_program().to_owned();
        let mut cmd = with_parent_death_signal(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file));
        let child = spawn_from_spawner_thread(cmd)
            .with_context(|| format!("spawning {}", Path::new(&program).display()))?;
        Ok(Self {
            name: name.into(),
            child: Some(child),
            exit: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id, while the child has not been killed or reaped.
    pub fn id(&self) -> Option<u32> {
        match (&self.child, self.exit) {
            (Some(c), None) => Some(c.id()),
            _ => None,
        }
    }

    /// The exit status if the process has exited (non-blocking).
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Some(child) = self.child.as_mut() {
                // An error here means the child was already reaped: treat as exited.
                self.exit = match child.try_wait() {
                    Ok(status) => status,
                    Err(_) => Some(ExitStatus::default()),
                };
            }
        }
        self.exit
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_exit_status().is_none()
    }

    /// SIGKILLs the process (if it still runs) and reaps it. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.exit.is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A copy of `cmd` (program, arguments, environment, working directory; not stdio), run under
/// `setpriv --pdeathsig KILL` when setpriv is installed.
fn with_parent_death_signal(cmd: &Command) -> Command {
    static SETPRIV: OnceLock<Option<PathBuf>> = OnceLock::new();
    let setpriv = SETPRIV.get_or_init(|| find_in_path("setpriv", std::env::var_os("PATH")));
    let mut out = match setpriv {
        Some(setpriv) => {
            let mut c = Command::new(setpriv);
            c.arg("--pdeathsig")
                .arg("KILL")
                .arg("--")
                .arg(cmd.get_program());
            c
        }
        None => Command::new(cmd.get_program()),
    };
    out.args(cmd.get_args());
    if let Some(dir) = cmd.get_current_dir() {
        out.current_dir(dir);
    }
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => out.env(k, v),
            None => out.env_remove(k),
        };
    }
    out
}

type SpawnRequest = (Command, mpsc::SyncSender<io::Result<Child>>);

fn spawn_from_spawner_thread(cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("cim-tests-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("cannot start the cim-tests spawner thread");
        tx
    });
    let (reply_tx, reply_rx) = mpsc::sync_channel(1);
    tx.send((cmd, reply_tx))
        .map_err(|_| io::Error::other("cim-tests spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("cim-tests spawner thread is gone"))?
}

/// Finds `name` on `path` (a `PATH`-style list).
pub(crate) fn find_in_path(name: &str, path: Option<OsString>) -> Option<PathBuf> {
    let path = path?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The binary `name`: from the environment variable `env_override` when set, else from `PATH`
/// (plus /usr/sbin and /usr/local/bin). The error tells which Debian package provides it.
pub(crate) fn locate_binary(
    name: &str,
    env_override: &str,
    debian_package: &str,
) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_override) {
        let p = PathBuf::from(p);
        if is_executable(&p) {
            return Ok(p);
        }
        return Err(anyhow!(
            "{name} not found at {} (from {env_override}): install the Debian package \
             {debian_package}",
            p.display()
        ));
    }
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    path.push(":/usr/sbin:/usr/local/bin");
    find_in_path(name, Some(path))
        .ok_or_else(|| anyhow!("{name} not found: install the Debian package {debian_package}"))
}

/// Free TCP ports on 127.0.0.1, distinct from each other. Another process may take one before
/// the caller binds it: callers detect that and retry.
pub(crate) fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let mut listeners = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    for port in &mut ports {
        let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        *port = l.local_addr()?.port();
        listeners.push(l);
    }
    Ok(ports)
}

/// The last `lines` lines of a log file (empty when unreadable).
pub fn log_tail(path: &Path, lines: usize) -> String {
    const MAX: u64 = 64 * 1024;
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(MAX)));
    let mut buf = Vec::new();
    let _ = f.take(MAX).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Prints where a backend's log is and its tail, for a test that is failing (the test harness
/// shows captured output of failing tests only).
pub(crate) fn report_on_panic(what: &str, log: &Path) {
    if thread::panicking() {
        eprintln!(
            "--- {what}: last lines of {} ---\n{}\n---",
            log.display(),
            log_tail(log, 20)
        );
    }
}

/// The current run of a process that tests may kill and start again (Redis, etcd).
#[derive(Debug, Default)]
pub struct ProcessSlot(std::sync::Mutex<Option<ChildGuard>>);

impl ProcessSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<ChildGuard>> {
        // A panic while holding the lock leaves the data usable: it is only an Option.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a new run (the previous one must have been killed).
    pub fn set(&self, guard: ChildGuard) {
        *self.lock() = Some(guard);
    }

    /// The pid while the process runs.
    pub fn pid(&self) -> Option<u32> {
        let mut guard = self.lock();
        let g = guard.as_mut()?;
        if g.is_running() {
            g.id()
        } else {
            None
        }
    }

    /// Whether the process runs (it may have been killed or have crashed).
    pub fn is_running(&self) -> bool {
        self.lock().as_mut().is_some_and(|g| g.is_running())
    }

    /// SIGKILLs the current run. Idempotent.
    pub fn kill(&self) {
        if let Some(mut g) = self.lock().take() {
            g.kill();
        }
    }
}

/// Why one attempt to start a process failed.
pub(crate) enum LaunchError {
    /// The process exited before answering (port taken, bad flag): see the log.
    Exited(anyhow::Error),
    Other(anyhow::Error),
}

/// Starts a killed process again on the same ports and directory: a few attempts cover a
/// brief race for the port the old run had.
pub(crate) async fn relaunch<F, Fut>(what: &str, port: u16, mut launch: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), LaunchError>>,
{
    let mut last = None;
    for _ in 0..3 {
        match launch().await {
            Ok(()) => return Ok(()),
            Err(LaunchError::Exited(e)) => last = Some(e),
            Err(LaunchError::Other(e)) => return Err(e),
        }
    }
    Err(last
        .unwrap_or_else(|| anyhow!("{what} did not restart"))
        .context(format!("restarting {what} on port {port}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_kills_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        let mut g = ChildGuard::spawn("sleep", cmd, &dir.path().join("log")).unwrap();
        assert!(g.is_running());
        let pid = g.id().unwrap();
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        drop(g);
        // Reaped: no zombie left behind either.
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn guard_kill_is_idempotent_and_detects_exit() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hello; echo oops >&2"]);
        let mut g = ChildGuard::spawn("sh", cmd, &dir.path().join("log")).unwrap();
        let status = loop {
            if let Some(s) = g.try_exit_status() {
                break s;
            }
            thread::sleep(std::time::Duration::from_millis(5));
        };
        assert!(status.success());
        assert!(!g.is_running());
        assert_eq!(log_tail(&dir.path().join("log"), 10), "hello\noops");
        g.kill();
        g.kill();
    }

    #[test]
    fn missing_binary_names_the_package() {
        let err = locate_binary(
            "surely-not-a-binary-cim",
            "CIM_TESTS_NO_SUCH_VAR",
            "some-pkg",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "surely-not-a-binary-cim not found: install the Debian package some-pkg"
        );
    }

    #[test]
    fn free_ports_are_distinct() {
        let [a, b, c] = free_ports::<3>().unwrap();
        assert!(a != b && b != c && a != c);
    }
}
