//! The `p2p` scenario: pairs of users exchange private messages across servers. Senders are on
//! the first live server, receivers on the second, so every message takes the whole path:
//! connection → server → `/internal/forward` → route (Redis lookup) → `/internal/push` →
//! the other server → connection.
//!
//! Each body carries its send time (nanoseconds since a base `Instant` of this process;
//! sender and receiver are both here, so one clock serves both) and the receiver records the
//! one-way latency. Load is either a total rate spread evenly over the senders (open loop:
//! sends go out on schedule whether or not earlier ones were answered, up to a safety cap), or
//! flat out: each sender keeps `window` sends waiting for their `SendResult`. Receivers
//! acknowledge every push with one `Ack`, as the SDK does, so the whole life of a stored
//! private message (inbox write, push, ack, removal) is in the measured cost.
//!
//! Counted: sends the route accepted (`DELIVERED` or `STORED`), messages received, failures
//! by error code, and the CPU time of every server, route and Redis between the start and the
//! end of the drain, per message delivered.

use crate::{
    connect::{servers_of, transport_name},
    probe::{self, CpuUsage},
    report::{self, code_name, int, num, per_sec, Failures, Latencies, LatencySummary},
    setup::{heartbeat, ping, receive_pushes, Opened, Setup, CLOSE_DEADLINE},
    DRAIN_DEADLINE,
};
use cim_common::registry::{ServiceInfo, ServiceKind};
use cim_sdk::{
    conn::Transport,
    pb::{frame::Body, MessageKind, Send, SendStatus},
};
use serde::Serialize;
use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;

/// In rate mode, sends one sender may have unanswered before it pauses (the schedule catches
/// up once answers arrive): keeps a stalled cluster from making the bench queue without limit.
pub(crate) const RATE_MODE_MAX_OUTSTANDING: usize = 4096;

/// Prefix of every bench message body.
const BODY_PREFIX: &str = "p2p ";

/// How the senders load the cluster.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// Total messages per second, over all senders.
    Rate(f64),
    /// Each sender keeps `window` sends outstanding.
    FlatOut,
}

/// Options of [`run_p2p`].
#[derive(Debug, Clone)]
pub struct P2pOpts {
    pub pairs: usize,
    pub duration: Duration,
    pub load: Load,
    /// Flat out: sends each sender keeps waiting for their result.
    pub window: usize,
    pub transport: Transport,
    pub user_offset: u64,
}

impl Default for P2pOpts {
    fn default() -> Self {
        Self {
            pairs: 100,
            duration: Duration::from_secs(10),
            load: Load::Rate(1000.0),
            window: 32,
            transport: Transport::Tcp,
            user_offset: 0,
        }
    }
}

/// What [`run_p2p`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct P2pReport {
    pub scenario: &'static str,
    pub transport: &'static str,
    pub pairs: usize,
    /// `rate` or `flat-out`.
    pub mode: &'static str,
    pub target_rate: Option<f64>,
    pub window: Option<usize>,
    pub sender_server: String,
    pub receiver_server: String,
    /// False when only one server was live (messages then stay on it).
    pub cross_server: bool,
    pub duration_secs: f64,
    /// Sends the route accepted (answered `DELIVERED` or `STORED`).
    pub sent: u64,
    /// Accepted, but the receiver was not online: stored in its inbox (should be 0; not
    /// counted as delivered, it arrives at that user's next connection).
    pub offline: u64,
    /// Messages the receivers got.
    pub delivered: u64,
    /// Accepted as delivered but never received.
    pub lost: u64,
    /// Sends without an answer by the end of the drain.
    pub unanswered: u64,
    pub send_failures: BTreeMap<String, u64>,
    /// Sends attempted per second during the sending phase.
    pub send_rate_per_sec: Option<f64>,
    /// Messages received per second, from the first send to the last delivery.
    pub throughput_per_sec: Option<f64>,
    /// One-way, sender's write to receiver's read.
    pub latency: LatencySummary,
    pub cpu: CpuUsage,
    /// All CPU (servers, routes, Redis) per delivered message, in microseconds.
    pub cpu_us_per_message: Option<f64>,
}

#[derive(Default)]
struct Counters {
    attempted: AtomicU64,
    accepted: AtomicU64,
    /// Accepted with `DELIVERED`: what the receivers should get.
    expected: AtomicU64,
    offline: AtomicU64,
    received: AtomicU64,
    unanswered: AtomicU64,
    last_delivery_ns: AtomicU64,
    failures: Failures,
    latencies: Latencies,
    /// Signalled whenever `received` grows.
    progress: Notify,
}

/// Runs the `p2p` scenario.
pub async fn run_p2p(setup: &Setup, opts: P2pOpts) -> anyhow::Result<P2pReport> {
    let pairs = opts.pairs;
    match opts.load {
        _ if pairs == 0 => anyhow::bail!("p2p needs at least one pair"),
        Load::Rate(r) if !r.is_finite() || r <= 0.0 => anyhow::bail!("the rate must be positive"),
        Load::FlatOut if opts.window == 0 => anyhow::bail!("the window must be at least 1"),
        _ => {}
    }
    crate::ensure_fd_capacity(2 * pairs)?;
    let servers: Vec<Arc<ServiceInfo>> = setup.servers().await?.into_iter().map(Arc::new).collect();
    let routes = setup.members(ServiceKind::Route).await?;
    let senders_at = servers[0].clone();
    let receivers_at = servers.get(1).unwrap_or(&servers[0]).clone();
    if servers.len() == 1 {
        eprintln!(
            "cim-bench: only one live server ({}): senders and receivers share it, messages \
             do not cross servers",
            senders_at.id
        );
    }

    // Users 0..pairs send, pairs..2·pairs receive; sender i writes to receiver i.
    let users = setup
        .prepare_users(opts.user_offset, 2 * pairs, |i| {
            if i < pairs {
                senders_at.clone()
            } else {
                receivers_at.clone()
            }
        })
        .await?;
    let opened = setup.open_all(&users, opts.transport, None, &[]).await?;
    let (senders, receivers): (Vec<Opened>, Vec<Opened>) =
        opened.into_iter().partition(|o| o.user.index < pairs);
    let receiver_ids: Vec<u64> = receivers.iter().map(|r| r.user.id).collect();

    let counters = Arc::new(Counters::default());
    let base = Instant::now();
    let stop_receivers = CancellationToken::new();
    let receiver_tasks: Vec<_> = receivers
        .into_iter()
        .map(|r| tokio::spawn(receive(r, base, counters.clone(), stop_receivers.clone())))
        .collect();

    let before = setup.snapshot(&servers_of(&servers), &routes).await;
    let progress_stop = CancellationToken::new();
    let progress = report::progress(setup.progress, progress_stop.clone(), {
        let c = counters.clone();
        move || {
            format!(
                "p2p: {:.0}s sent {} delivered {} failed {}",
                base.elapsed().as_secs_f64(),
                c.accepted.load(Relaxed),
                c.received.load(Relaxed),
                c.failures.total()
            )
        }
    });
    let start = Instant::now();
    let end = start + opts.duration;
    let plan = match opts.load {
        Load::Rate(rate) => Plan::Rate {
            interval: Duration::from_secs_f64(pairs as f64 / rate),
        },
        Load::FlatOut => Plan::FlatOut {
            window: opts.window,
        },
    };
    let sender_tasks: Vec<_> = senders
        .into_iter()
        .map(|s| {
            let to = receiver_ids[s.user.index];
            // Spread the senders' schedules over one interval instead of all at once.
            let offset = match plan {
                Plan::Rate { interval } => interval.mul_f64(s.user.index as f64 / pairs as f64),
                Plan::FlatOut { .. } => Duration::ZERO,
            };
            tokio::spawn(send(
                s,
                to,
                plan,
                start + offset,
                end,
                base,
                counters.clone(),
            ))
        })
        .collect();
    for task in sender_tasks {
        let _ = task.await;
    }
    let sending_done = Instant::now();
    // The senders know every accepted message now; wait for the receivers to get them all.
    let drained = async {
        loop {
            let notified = counters.progress.notified();
            if counters.received.load(Relaxed) >= counters.expected.load(Relaxed) {
                return;
            }
            notified.await;
        }
    };
    let _ = tokio::time::timeout_at(sending_done + DRAIN_DEADLINE, drained).await;
    let after = setup.snapshot(&servers_of(&servers), &routes).await;
    stop_receivers.cancel();
    for task in receiver_tasks {
        let _ = task.await;
    }
    progress_stop.cancel();
    if let Some(p) = progress {
        let _ = p.await;
    }
    setup.settle(&users).await;

    let c = &counters;
    let delivered = c.received.load(Relaxed);
    let expected = c.expected.load(Relaxed);
    let cpu = probe::cpu_delta(&before, &after);
    let last_delivery = Duration::from_nanos(c.last_delivery_ns.load(Relaxed));
    let active = last_delivery.saturating_sub(start - base);
    Ok(P2pReport {
        scenario: "p2p",
        transport: transport_name(opts.transport),
        pairs,
        mode: match opts.load {
            Load::Rate(_) => "rate",
            Load::FlatOut => "flat-out",
        },
        target_rate: match opts.load {
            Load::Rate(r) => Some(r),
            Load::FlatOut => None,
        },
        window: matches!(opts.load, Load::FlatOut).then_some(opts.window),
        sender_server: senders_at.id.clone(),
        receiver_server: receivers_at.id.clone(),
        cross_server: servers.len() > 1,
        duration_secs: opts.duration.as_secs_f64(),
        sent: c.accepted.load(Relaxed),
        offline: c.offline.load(Relaxed),
        delivered,
        lost: expected.saturating_sub(delivered),
        unanswered: c.unanswered.load(Relaxed),
        send_failures: c.failures.snapshot(),
        send_rate_per_sec: per_sec(c.attempted.load(Relaxed), opts.duration.as_secs_f64()),
        throughput_per_sec: per_sec(delivered, active.as_secs_f64()),
        latency: c.latencies.summary(),
        cpu_us_per_message: cpu
            .total_ms
            .and_then(|ms| per_sec(ms * 1000, delivered as f64)),
        cpu,
    })
}

#[derive(Debug, Clone, Copy)]
enum Plan {
    /// One send per `interval` (this sender's share of the total rate).
    Rate {
        interval: Duration,
    },
    FlatOut {
        window: usize,
    },
}

/// One sender: sends to `to` from `first` until `end` as `plan` says, then waits (at most
/// [`DRAIN_DEADLINE`]) for the answers to what it sent, and closes.
async fn send(
    sender: Opened,
    to: u64,
    plan: Plan,
    first: Instant,
    end: Instant,
    base: Instant,
    counters: Arc<Counters>,
) {
    let Opened {
        mut conn,
        heartbeat: interval,
        ..
    } = sender;
    let mut tick = heartbeat(interval);
    let mut next_due = first;
    let mut next_id: u64 = 1;
    let mut outstanding: usize = 0;
    let drain_deadline = end + DRAIN_DEADLINE;
    let cap = match plan {
        Plan::Rate { .. } => RATE_MODE_MAX_OUTSTANDING,
        Plan::FlatOut { window } => window,
    };
    loop {
        let now = Instant::now();
        let sending = now < end;
        if sending {
            // Queue every send that is due (several when the interval is shorter than the
            // timer's resolution), then write them in one go.
            let mut queued = 0;
            while outstanding < cap
                && match plan {
                    Plan::Rate { .. } => next_due <= now,
                    Plan::FlatOut { .. } => true,
                }
            {
                let body = format!("{BODY_PREFIX}{}", base.elapsed().as_nanos());
                let frame = cim_sdk::pb::Frame::new(Body::Send(Send {
                    client_id: next_id,
                    kind: MessageKind::Private as i32,
                    to_user_id: to,
                    body,
                    ..Default::default()
                }));
                if conn.feed(&frame).await.is_err() {
                    return lost_connection(&counters, outstanding + queued, "connection lost");
                }
                next_id += 1;
                queued += 1;
                outstanding += 1;
                if let Plan::Rate { interval } = plan {
                    next_due += interval;
                }
            }
            if queued > 0 {
                counters.attempted.fetch_add(queued as u64, Relaxed);
                if conn.flush().await.is_err() {
                    return lost_connection(&counters, outstanding, "connection lost");
                }
            }
        } else if outstanding == 0 {
            break;
        }
        let wake = match plan {
            Plan::Rate { .. } if sending && outstanding < cap => next_due.min(end),
            _ if sending => end,
            _ => drain_deadline,
        };
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {
                if !sending && Instant::now() >= drain_deadline {
                    counters.unanswered.fetch_add(outstanding as u64, Relaxed);
                    break;
                }
            }
            _ = tick.tick() => {
                if conn.send(&ping()).await.is_err() {
                    return lost_connection(&counters, outstanding, "connection lost");
                }
            }
            frame = conn.recv() => match frame {
                Ok(Some(frame)) => match frame.body {
                    Some(Body::SendResult(r)) => {
                        outstanding = outstanding.saturating_sub(1);
                        match SendStatus::try_from(r.status) {
                            Ok(SendStatus::Delivered) => {
                                counters.accepted.fetch_add(1, Relaxed);
                                counters.expected.fetch_add(1, Relaxed);
                            }
                            Ok(SendStatus::Stored) => {
                                counters.accepted.fetch_add(1, Relaxed);
                                counters.offline.fetch_add(1, Relaxed);
                            }
                            _ => counters.failures.add(
                                r.error.map_or_else(|| "failed".into(), |e| code_name(e.code)),
                            ),
                        }
                        // An answer may make the receivers' target reachable.
                        counters.progress.notify_waiters();
                    }
                    Some(Body::Error(e)) => counters.failures.add(format!("error: {}", code_name(e.code))),
                    Some(Body::Kick(_)) => {
                        return lost_connection(&counters, outstanding, "kicked");
                    }
                    _ => {}
                },
                Ok(None) | Err(_) => {
                    return lost_connection(&counters, outstanding, "connection lost");
                }
            }
        }
    }
    let _ = tokio::time::timeout(CLOSE_DEADLINE, conn.close()).await;
}

fn lost_connection(counters: &Counters, outstanding: usize, why: &str) {
    counters.failures.add(why);
    counters.unanswered.fetch_add(outstanding as u64, Relaxed);
    counters.progress.notify_waiters();
}

/// One receiver: records the latency of every bench message until `stop`, then closes.
async fn receive(
    receiver: Opened,
    base: Instant,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    receive_pushes(receiver, stop, &counters.failures, |messages| {
        on_push(&counters, base, messages)
    })
    .await;
}

fn on_push(counters: &Counters, base: Instant, messages: &[cim_sdk::pb::Message]) {
    let now = base.elapsed();
    let now_ns = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
    let latencies: Vec<Duration> = messages
        .iter()
        .filter_map(|m| m.body.strip_prefix(BODY_PREFIX)?.parse::<u64>().ok())
        .map(|sent_ns| Duration::from_nanos(now_ns.saturating_sub(sent_ns)))
        .collect();
    if latencies.is_empty() {
        return;
    }
    let n = latencies.len() as u64;
    counters.latencies.record_all(latencies);
    counters.last_delivery_ns.fetch_max(now_ns, Relaxed);
    counters.received.fetch_add(n, Relaxed);
    counters.progress.notify_waiters();
}

impl std::fmt::Display for P2pReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let load = match (self.target_rate, self.window) {
            (Some(r), _) => format!("rate {r:.0} msg/s"),
            (None, Some(w)) => format!("flat out, window {w}"),
            (None, None) => "-".into(),
        };
        let title = format!(
            "cim-bench p2p ({}, {} pairs, {load}, {:.1} s)",
            self.transport, self.pairs, self.duration_secs
        );
        let path = if self.cross_server {
            format!("{} → {}", self.sender_server, self.receiver_server)
        } else {
            format!("{} only (one live server)", self.sender_server)
        };
        let cpu = &self.cpu;
        let cpu_line = format!(
            "{} µs/msg (servers {} ms, routes {} ms, redis {} ms; this bench {} ms)",
            num(self.cpu_us_per_message),
            opt(cpu.servers_ms),
            opt(cpu.routes_ms),
            opt(cpu.redis_ms),
            opt(cpu.bench_ms)
        );
        f.write_str(&report::table(
            &title,
            &[
                ("servers", path),
                ("sent (accepted)", int(self.sent)),
                ("delivered", int(self.delivered)),
                ("lost", int(self.lost)),
                ("offline", int(self.offline)),
                ("unanswered", int(self.unanswered)),
                ("send failures", report::failures_line(&self.send_failures)),
                (
                    "send rate",
                    format!("{} msg/s", num(self.send_rate_per_sec)),
                ),
                (
                    "throughput",
                    format!("{} msg/s delivered", num(self.throughput_per_sec)),
                ),
                ("latency (one-way)", self.latency.to_string()),
                ("cpu", cpu_line),
            ],
        ))
    }
}

pub(crate) fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), int)
}
