//! The `login-flood` scenario: many concurrent wrong-password `POST /api/login` against one
//! route, and that route's memory before, right after and a while after (issue 24: a route
//! used to keep hundreds of MiB after a flood of argon2 verifications).
//!
//! Unlike the other scenarios it needs no Redis or etcd of its own: only the route's URL (any
//! route: standalone mode works). It registers one account `flood-{random}` (one hash), then
//! sends `logins` logins with a wrong password, at most `concurrency` in flight. Memory comes
//! from `/proc/{pid}/status` of the route's process (`VmHWM`, the peak resident size since it
//! started, and `VmRSS`), the pid from its `/healthz`: the route must run on this machine.
//! Answers are counted by error code (`bad_credentials` when the route kept up; `overloaded`
//! or `timeout` are what a route sheds past its `concurrency_limit` or request deadline).

use crate::report::{self, int, Failures};
use cim_sdk::RouteClient;
use serde::Serialize;
use std::{collections::BTreeMap, time::Duration};

/// What to run.
#[derive(Debug, Clone)]
pub struct LoginFloodOpts {
    /// The route's base URL, e.g. `http://127.0.0.1:8080`.
    pub route: String,
    /// Wrong-password logins to send.
    pub logins: usize,
    /// Most logins in flight at once (each is one HTTP connection).
    pub concurrency: usize,
    /// How long after the last answer the route's memory is read again.
    pub settle: Duration,
}

/// Memory of the route's process at one moment, from `/proc/{pid}/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProcMemory {
    /// `VmHWM`: the largest resident size the process has had.
    pub vm_hwm_bytes: u64,
    /// `VmRSS`: its resident size now.
    pub vm_rss_bytes: u64,
    /// `Threads`.
    pub threads: u64,
}

impl ProcMemory {
    /// Reads `/proc/{pid}/status`; `None` when the process is not on this machine.
    pub fn read(pid: u32) -> Option<Self> {
        parse_status(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
    }
}

/// `VmHWM`, `VmRSS` and `Threads` of a `/proc/*/status` text.
fn parse_status(status: &str) -> Option<ProcMemory> {
    let field = |name: &str| {
        status.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
    };
    Some(ProcMemory {
        vm_hwm_bytes: field("VmHWM")? * 1024,
        vm_rss_bytes: field("VmRSS")? * 1024,
        threads: field("Threads")?,
    })
}

/// What a flood did and what the route's memory was.
#[derive(Debug, Clone, Serialize)]
pub struct LoginFloodReport {
    pub route: String,
    pub pid: u32,
    pub logins: usize,
    pub concurrency: usize,
    /// Answers by error code (`bad_credentials`, `overloaded`, …; `ok` if a login succeeded,
    /// which would be a bug; `transport` when no answer came).
    pub answers: BTreeMap<String, u64>,
    pub duration_ms: u64,
    pub settle_ms: u64,
    /// After the one registration, before the first login.
    pub before: ProcMemory,
    /// Right after the last answer.
    pub after: ProcMemory,
    /// `settle` after the last answer.
    pub settled: ProcMemory,
}

/// Runs the flood. Fails if the route cannot be reached or is not on this machine.
pub async fn run_login_flood(opts: LoginFloodOpts) -> anyhow::Result<LoginFloodReport> {
    anyhow::ensure!(opts.logins > 0, "--logins must be at least 1");
    anyhow::ensure!(opts.concurrency > 0, "--concurrency must be at least 1");
    crate::ensure_fd_capacity(opts.concurrency)?;
    let route = RouteClient::new(&opts.route);
    let health: serde_json::Value = reqwest::get(format!("{}/healthz", route.base_url()))
        .await?
        .error_for_status()?
        .json()
        .await?;
    let pid = health["pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .ok_or_else(|| anyhow::anyhow!("the route's /healthz names no pid"))?;
    let memory = || {
        ProcMemory::read(pid).ok_or_else(|| {
            anyhow::anyhow!("cannot read /proc/{pid}/status: the route must run on this machine")
        })
    };
    memory()?;

    let name = format!("flood-{:08x}", rand::random::<u32>());
    route
        .register(&name, "right-password")
        .await
        .map_err(|e| anyhow::anyhow!("registering {name}: {e}"))?;
    let before = memory()?;

    let answers = Failures::default();
    let started = std::time::Instant::now();
    {
        use futures_util::StreamExt;
        let (route, name, answers) = (&route, name.as_str(), &answers);
        futures_util::stream::iter(0..opts.logins)
            .map(|_| async move {
                let outcome = match route.login(name, "wrong-password").await {
                    Ok(_) => "ok".to_string(),
                    Err(e) => e.code().unwrap_or("transport").to_string(),
                };
                answers.add(outcome);
            })
            .buffer_unordered(opts.concurrency)
            .collect::<()>()
            .await;
    }
    let duration = started.elapsed();
    let after = memory()?;
    tokio::time::sleep(opts.settle).await;
    let settled = memory()?;
    Ok(LoginFloodReport {
        route: opts.route,
        pid,
        logins: opts.logins,
        concurrency: opts.concurrency,
        answers: answers.snapshot(),
        duration_ms: duration.as_millis() as u64,
        settle_ms: opts.settle.as_millis() as u64,
        before,
        after,
        settled,
    })
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

impl std::fmt::Display for LoginFloodReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let row = |m: &ProcMemory| {
            format!(
                "VmHWM {}, VmRSS {}, {} threads",
                mib(m.vm_hwm_bytes),
                mib(m.vm_rss_bytes),
                m.threads
            )
        };
        let title = format!(
            "cim-bench login-flood ({} logins, {} in flight, route pid {})",
            self.logins, self.concurrency, self.pid
        );
        let settled = format!("{} ms after", int(self.settle_ms));
        f.write_str(&report::table(
            &title,
            &[
                ("answers", report::failures_line(&self.answers)),
                ("duration", format!("{} ms", int(self.duration_ms))),
                ("before", row(&self.before)),
                ("right after", row(&self.after)),
                (&settled, row(&self.settled)),
            ],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_status() {
        let status = "Name:\tcim-standalone\nVmPeak:\t  900000 kB\nVmHWM:\t  566272 kB\n\
                      VmRSS:\t  553000 kB\nThreads:\t17\n";
        assert_eq!(
            parse_status(status),
            Some(ProcMemory {
                vm_hwm_bytes: 566_272 * 1024,
                vm_rss_bytes: 553_000 * 1024,
                threads: 17,
            })
        );
        // `VmRSSx` is not `VmRSS`; a field missing is no reading.
        assert_eq!(
            parse_status("VmHWM: 1 kB\nVmRSSx: 2 kB\nThreads: 1\n"),
            None
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reads_this_process() {
        let m = ProcMemory::read(std::process::id()).unwrap();
        assert!(
            m.vm_rss_bytes > 0 && m.vm_hwm_bytes >= m.vm_rss_bytes,
            "{m:?}"
        );
        assert!(m.threads >= 1);
    }
}
