//! The `connect` scenario: open many connections at a steady rate, hold them with heartbeats,
//! close them. Measures how fast servers accept logged-in connections and how much server
//! memory each one costs.
//!
//! Users are spread round-robin over the live servers. Each connection is one task that holds
//! a [`Connection`](cim_sdk::Connection) with small buffers (the bench keeps thousands), answers
//! nothing and pings at the interval its server's `LoginResult` asked for. Memory per
//! connection is the growth of each server process's resident memory between a reading taken
//! once 1 in 20 connections are open (a warm-up, from 100 connections on) and one after the
//! last, divided by the connections its servers gained in between. Freed memory is reused:
//! on servers that held more connections before (an earlier run), the figure comes out low;
//! measure on freshly started servers.

use crate::{
    probe::{self, MemoryPerConnection},
    report::{self, int, num, per_sec, Failures, Latencies, LatencySummary},
    setup::{self, heartbeat, ping, Setup},
};
use cim_sdk::conn::Transport;
use serde::Serialize;
use std::{
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;

/// Initial buffer size of each held connection: a Pong is a few bytes; buffers grow for
/// anything larger.
const BUFFER: usize = 512;

/// Options of [`run_connect`].
#[derive(Debug, Clone)]
pub struct ConnectOpts {
    pub connections: usize,
    pub transport: Transport,
    /// How long every connection is held once all are open.
    pub hold: Duration,
    /// Local IPs to bind, cycled through (empty: the kernel chooses).
    pub source_ips: Vec<IpAddr>,
    /// New connections per second.
    pub rate: f64,
    pub user_offset: u64,
}

impl Default for ConnectOpts {
    fn default() -> Self {
        Self {
            connections: 1000,
            transport: Transport::Tcp,
            hold: Duration::from_secs(30),
            source_ips: Vec::new(),
            rate: 5000.0,
            user_offset: 0,
        }
    }
}

/// What [`run_connect`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectReport {
    pub scenario: &'static str,
    pub transport: &'static str,
    pub servers: usize,
    pub requested: usize,
    pub connected: u64,
    pub failed: u64,
    pub failures: std::collections::BTreeMap<String, u64>,
    /// From the first connection attempt to the last one finishing.
    pub connect_secs: f64,
    pub connect_rate_per_sec: Option<f64>,
    /// Connect + login handshake, per connection.
    pub connect_latency: LatencySummary,
    pub held_secs: f64,
    /// Connections the server closed while they were held.
    pub dropped: u64,
    pub memory: MemoryPerConnection,
}

#[derive(Default)]
struct Counters {
    done: AtomicU64,
    connected: AtomicU64,
    dropped: AtomicU64,
    failures: Failures,
    latencies: Latencies,
    /// Signalled whenever `done` grows.
    done_changed: Notify,
}

impl Counters {
    /// Waits until `done` reaches `target`, at most `deadline` (every attempt ends within
    /// its own deadline; this one only guards against a bug).
    async fn wait_done(&self, target: u64, deadline: Duration) {
        let reached = async {
            loop {
                let notified = self.done_changed.notified();
                if self.done.load(Relaxed) >= target {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(deadline, reached).await;
    }
}

/// Runs the `connect` scenario.
pub async fn run_connect(setup: &Setup, opts: ConnectOpts) -> anyhow::Result<ConnectReport> {
    if opts.connections == 0 || !opts.rate.is_finite() || opts.rate <= 0.0 {
        anyhow::bail!("connect needs at least one connection and a positive rate");
    }
    crate::ensure_fd_capacity(opts.connections)?;
    let servers: Vec<Arc<_>> = setup.servers().await?.into_iter().map(Arc::new).collect();
    let n = opts.connections;
    let users = setup
        .prepare_users(opts.user_offset, n, |i| servers[i % servers.len()].clone())
        .await?;
    let counters = Arc::new(Counters::default());

    let stop = CancellationToken::new();
    let progress_stop = CancellationToken::new();
    let progress = report::progress(setup.progress, progress_stop.clone(), {
        let c = counters.clone();
        move || {
            format!(
                "connect: {}/{n} connected, {} failed, {} dropped",
                c.connected.load(Relaxed),
                c.failures.total(),
                c.dropped.load(Relaxed)
            )
        }
    });

    // The first connections of a fresh server also grow its allocator's arenas and its
    // tables; like the idle_memory bench, read the "before" memory only once 1 in 20 are open,
    // and count the connections gained from there.
    let warm = if n >= 100 { n / 20 } else { 0 };
    // Users are logged in a batch at a time, just before the batch connects (connect tokens
    // expire), and the logins are not connecting time: like the warm-up reading, they pause
    // the schedule and are left out of the connect phase.
    let batch = login_batch(opts.rate);
    let mut failed_logins = 0u64;
    let mut before = None;
    let mut paused = Duration::ZERO;
    let first_attempt = Instant::now();
    let mut start = first_attempt;
    let mut tasks = tokio::task::JoinSet::new();
    let mut i = 0usize;
    for chunk in users.chunks(batch) {
        let t = Instant::now();
        let logged = setup.login(chunk).await;
        for reason in &logged.failures {
            counters.failures.add(reason.as_str());
            counters.done.fetch_add(1, Relaxed);
        }
        failed_logins += logged.failures.len() as u64;
        let spent = t.elapsed();
        paused += spent;
        start += spent;
        for user in logged.users {
            if i == warm {
                let t = Instant::now();
                let deadline = setup::OPEN_DEADLINE + Duration::from_secs(5);
                counters.wait_done(failed_logins + i as u64, deadline).await;
                before = Some(setup.snapshot(&servers_of(&servers), &[]).await);
                // The pause is not connecting time: shift the schedule and leave it out.
                let spent = t.elapsed();
                paused += spent;
                start += spent;
            }
            let due = start + Duration::from_secs_f64(i as f64 / opts.rate);
            if due > Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            let local_ip = crate::setup::source_ip(&opts.source_ips, user.index);
            tasks.spawn(hold(
                user,
                opts.transport,
                local_ip,
                setup.tls().cloned(),
                counters.clone(),
                stop.clone(),
            ));
            i += 1;
        }
    }
    counters
        .wait_done(n as u64, setup::OPEN_DEADLINE + Duration::from_secs(5))
        .await;
    let connect_secs = (first_attempt.elapsed() - paused).as_secs_f64();
    let after = setup.snapshot(&servers_of(&servers), &[]).await;
    // No user could even log in: nothing was opened, before and after are alike.
    let before = before.unwrap_or_else(|| after.clone());

    let held = Instant::now();
    tokio::time::sleep(opts.hold).await;
    let held_secs = held.elapsed().as_secs_f64();
    stop.cancel();
    let closing = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(setup::CLOSE_DEADLINE * 2, closing)
        .await
        .is_err()
    {
        tasks.abort_all();
    }
    progress_stop.cancel();
    if let Some(p) = progress {
        let _ = p.await;
    }
    setup.settle(&users).await;

    let connected = counters.connected.load(Relaxed);
    Ok(ConnectReport {
        scenario: "connect",
        transport: transport_name(opts.transport),
        servers: servers.len(),
        requested: n,
        connected,
        failed: counters.failures.total(),
        failures: counters.failures.snapshot(),
        connect_secs,
        connect_rate_per_sec: per_sec(connected, connect_secs),
        connect_latency: counters.latencies.summary(),
        held_secs,
        dropped: counters.dropped.load(Relaxed),
        memory: probe::memory_delta(&before, &after),
    })
}

/// One connection's life: open and log in, hold with heartbeats until `stop`, close.
async fn hold(
    user: crate::BenchUser,
    transport: Transport,
    local_ip: Option<IpAddr>,
    tls: Option<cim_sdk::ClientTls>,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    let started = Instant::now();
    // Boxed: the opening future is large (connect, WebSocket handshake, login) and would
    // otherwise stay part of every held task's memory after it is done.
    let opened = Box::pin(setup::open(user, transport, local_ip, Some(BUFFER), tls)).await;
    match &opened {
        Ok(_) => {
            counters.latencies.record(started.elapsed());
            counters.connected.fetch_add(1, Relaxed);
        }
        Err(reason) => counters.failures.add(reason.as_str()),
    }
    counters.done.fetch_add(1, Relaxed);
    counters.done_changed.notify_waiters();
    // Only the connection and its interval are kept while holding (the user's token and
    // names are dropped here, not at the end of the task).
    let (mut conn, interval) = match opened {
        Ok(o) => (o.conn, o.heartbeat),
        Err(_) => return,
    };
    let mut tick = heartbeat(interval);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {
                // Boxed, like the close below: rare, and kept out of the idle task's size.
                if Box::pin(conn.send(&ping())).await.is_err() {
                    counters.dropped.fetch_add(1, Relaxed);
                    return;
                }
            }
            frame = conn.recv() => {
                // Pongs (and anything else) are read and dropped; the end of the stream is a
                // connection the server closed.
                if !matches!(frame, Ok(Some(_))) {
                    counters.dropped.fetch_add(1, Relaxed);
                    return;
                }
            }
        }
    }
    let _ = tokio::time::timeout(setup::CLOSE_DEADLINE, Box::pin(conn.close())).await;
}

/// Users logged in per batch at `rate` connections per second: what the paced phase opens
/// in 10 s (at most [`setup::LOGIN_BATCH`]), so a batch's connect tokens (30 s) outlive its
/// slowest ramp.
fn login_batch(rate: f64) -> usize {
    ((rate * 10.0) as usize).clamp(1, setup::LOGIN_BATCH)
}

pub(crate) fn servers_of(
    servers: &[Arc<cim_common::registry::ServiceInfo>],
) -> Vec<cim_common::registry::ServiceInfo> {
    servers.iter().map(|s| s.as_ref().clone()).collect()
}

pub(crate) fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Tcp => "tcp",
        Transport::WsBinary => "ws",
        Transport::WsJson => "ws-json",
    }
}

impl std::fmt::Display for ConnectReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let memory = match self.memory.bytes_per_connection {
            Some(b) => {
                let per: Vec<String> = self
                    .memory
                    .processes
                    .iter()
                    .map(|p| {
                        format!(
                            "{}: {} conns, {} B each",
                            p.servers.join("+"),
                            p.connections,
                            num(p.bytes_per_connection)
                        )
                    })
                    .collect();
                format!("{b:.0} B ({})", per.join("; "))
            }
            None => "- (no server reported its memory)".into(),
        };
        let title = format!(
            "cim-bench connect ({}, {} server{})",
            self.transport,
            self.servers,
            if self.servers == 1 { "" } else { "s" }
        );
        f.write_str(&report::table(
            &title,
            &[
                ("connections requested", int(self.requested as u64)),
                ("connected", int(self.connected)),
                (
                    "failed",
                    format!(
                        "{} ({})",
                        int(self.failed),
                        report::failures_line(&self.failures)
                    ),
                ),
                ("connect phase", format!("{:.2} s", self.connect_secs)),
                (
                    "connect rate",
                    format!("{} conn/s", num(self.connect_rate_per_sec)),
                ),
                ("connect + login", self.connect_latency.to_string()),
                ("held", format!("{:.1} s", self.held_secs)),
                ("dropped while held", int(self.dropped)),
                ("server memory / connection", memory),
            ],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every held connection is one task of this future: keep it small (the bench holds up
    /// to 19,000 of them).
    #[test]
    fn login_batches_outlive_no_token() {
        assert_eq!(login_batch(5000.0), setup::LOGIN_BATCH);
        assert_eq!(login_batch(20.0), 200);
        assert_eq!(login_batch(0.01), 1);
    }

    #[test]
    fn held_connection_task_is_small() {
        let user = crate::BenchUser {
            index: 0,
            id: 1,
            name: String::new(),
            server: Arc::default(),
            connect_token: String::new(),
        };
        let task = hold(
            user,
            Transport::Tcp,
            None,
            None,
            Arc::default(),
            CancellationToken::new(),
        );
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1024, "{size} bytes");
    }
}
