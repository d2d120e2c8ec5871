//! The `fanout` scenario: one sender, N receivers spread round-robin over the live servers.
//! Every `interval` the sender sends a group message (numbered, with its send time); each
//! receiver notes when it got it. Per message: the time from the send until the *last*
//! receiver had it. Reported: median and maximum of that time, missing deliveries, the
//! delivery rate while a message fans out, and CPU per delivery.
//!
//! A group message goes to everyone online except its sender, so any other connected user
//! (another bench, a person) gets these messages too and adds to the work measured. The
//! scenario counts who else is online before it starts and reports it (`other_online`); run
//! it on a cluster where nothing else is connected.
//!
//! More receivers than one process can hold (19,000 connections): run the receivers beyond
//! them in other processes with `receive_only` (they connect, then note the receipts of the
//! `count` messages), and give the sending process their number in `others`: it waits until
//! they are online before the first message. Send and receipt times are wall-clock (Unix
//! nanoseconds, one clock for every process on the machine) and each report lists them per
//! message (`per_message`), so the reports of all processes merge into one time to the last
//! receipt (`deploy/baseline.sh`'s 100k mode does).

use crate::{
    connect::{servers_of, transport_name},
    p2p::opt,
    probe::{self, CpuUsage},
    report::{self, code_name, int, ms, num, per_sec, Failures, Tally},
    setup::{close_all, heartbeat, ping, receive_pushes, Opened, Setup},
    DRAIN_DEADLINE,
};
use cim_common::registry::{ServiceInfo, ServiceKind};
use cim_sdk::{
    conn::{Connection, Transport},
    pb::{frame::Body, Frame, MessageKind, Send, SendStatus},
};
use serde::Serialize;
use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, SystemTime},
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Initial buffer size of each receiver connection (a push of one message is ~100 bytes).
const BUFFER: usize = 1024;

/// Most messages one run sends (each has a slot of counters).
pub const MAX_MESSAGES: usize = 100_000;

/// Deadline of one send's `SendResult` (the route answers after the whole fan-out).
const RESULT_DEADLINE: Duration = Duration::from_secs(30);

/// Prefix of every bench message body: `fanout {number} {send time, Unix ns}`.
const BODY_PREFIX: &str = "fanout ";

/// How often a sender waiting for `others` counts who is online.
const OTHERS_POLL: Duration = Duration::from_millis(250);

/// Options of [`run_fanout`].
#[derive(Debug, Clone)]
pub struct FanoutOpts {
    pub receivers: usize,
    /// Time between two messages.
    pub interval: Duration,
    /// Messages sent.
    pub count: usize,
    pub transport: Transport,
    pub user_offset: u64,
    /// Receivers in other processes (`receive_only`): the sender waits until this many
    /// users besides its own are online before the first message.
    pub others: usize,
    /// No sender here: connect the receivers and note the receipts of the `count` messages
    /// a sending process elsewhere sends.
    pub receive_only: bool,
    /// Longest wait for the `others` to be online (sender), or for the first message
    /// (receive-only).
    pub start_wait: Duration,
    /// Local addresses to connect from, in turn (empty: the system's choice).
    pub source_ips: Vec<IpAddr>,
}

impl Default for FanoutOpts {
    fn default() -> Self {
        Self {
            receivers: 1000,
            interval: Duration::from_secs(1),
            count: 10,
            transport: Transport::Tcp,
            user_offset: 0,
            others: 0,
            receive_only: false,
            start_wait: Duration::from_secs(300),
            source_ips: Vec::new(),
        }
    }
}

/// One message as this process saw it (wall-clock Unix nanoseconds, so that the reports of
/// several processes merge: the last receipt of a message is the latest over all of them).
#[derive(Debug, Clone, Serialize)]
pub struct MessageTiming {
    /// The message's number (0-based).
    pub number: usize,
    pub sent_unix_ns: u64,
    /// Receivers of this process that got it.
    pub received: u64,
    /// The last of those receipts (0: none).
    pub last_unix_ns: u64,
}

/// What [`run_fanout`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    pub scenario: &'static str,
    /// `send` (the sender and its receivers) or `receive-only`.
    pub role: &'static str,
    pub transport: &'static str,
    pub servers: usize,
    pub receivers: usize,
    /// Users online before the run that are not part of it (they receive the messages too;
    /// with `others`, counted when the first message leaves).
    pub other_online: u64,
    /// Receivers in other processes this one waited for (`others`).
    pub others: usize,
    pub messages: usize,
    /// Messages the route accepted (receive-only: messages that reached a receiver here).
    pub sent: u64,
    pub send_failures: BTreeMap<String, u64>,
    /// Connections the route pushed to, summed over messages (its `SendResult.delivered`).
    pub pushed: u64,
    /// `receivers × accepted messages`.
    pub expected_deliveries: u64,
    pub deliveries: u64,
    pub missing: u64,
    /// From a send until the last receiver had the message, over messages that reached at
    /// least one receiver.
    pub time_to_last_median_ms: Option<f64>,
    pub time_to_last_max_ms: Option<f64>,
    /// Deliveries per second while messages fan out: all deliveries over the summed
    /// send-to-last-receipt times.
    pub deliveries_per_sec: Option<f64>,
    pub cpu: CpuUsage,
    /// Server CPU per delivery, microseconds.
    pub server_cpu_us_per_delivery: Option<f64>,
    /// All CPU (servers, routes, Redis) per delivery, microseconds.
    pub cpu_us_per_delivery: Option<f64>,
    /// Every message sent or received here, by number.
    pub per_message: Vec<MessageTiming>,
}

/// Per message: when it was sent, how many receivers got it, when the last one did.
#[derive(Default)]
pub(crate) struct Slot {
    pub(crate) sent_ns: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) last_ns: AtomicU64,
}

struct Shared {
    slots: Vec<Slot>,
    deliveries: Tally,
    /// Messages (numbers) that reached at least one receiver here.
    seen: AtomicU64,
    failures: Failures,
}

/// Runs the `fanout` scenario.
pub async fn run_fanout(setup: &Setup, opts: FanoutOpts) -> anyhow::Result<FanoutReport> {
    let n = opts.receivers;
    if n == 0 || opts.count == 0 || opts.count > MAX_MESSAGES {
        anyhow::bail!("fanout needs at least one receiver and 1 to {MAX_MESSAGES} messages");
    }
    if opts.receive_only && opts.others > 0 {
        anyhow::bail!("--others is for the sending process, not a receive-only one");
    }
    // The sender (unless receive-only) is user 0, on the first server; the receivers follow,
    // round-robin over the servers.
    let senders = usize::from(!opts.receive_only);
    crate::ensure_fd_capacity(n + senders)?;
    let servers: Vec<Arc<ServiceInfo>> = setup.servers().await?.into_iter().map(Arc::new).collect();
    let routes = setup.members(ServiceKind::Route).await?;
    let users = setup
        .prepare_users(opts.user_offset, n + senders, |i| {
            servers[i.saturating_sub(senders) % servers.len()].clone()
        })
        .await?;
    let ours: Vec<u64> = users.iter().map(|u| u.id).collect();
    let mut other_online = count_others(setup, &ours).await?;
    if other_online > 0 && opts.others == 0 && !opts.receive_only {
        eprintln!(
            "cim-bench: {other_online} other users are online: they receive every group \
             message too, and the CPU figures include their deliveries"
        );
    }
    let opened = setup
        .open_all(&users, opts.transport, Some(BUFFER), &opts.source_ips)
        .await?;
    let mut opened = opened.into_iter();
    let sender = if opts.receive_only {
        None
    } else {
        opened.next()
    };

    let shared = Arc::new(Shared {
        slots: (0..opts.count).map(|_| Slot::default()).collect(),
        deliveries: Tally::default(),
        seen: AtomicU64::new(0),
        failures: Failures::default(),
    });
    let stop = CancellationToken::new();
    let receiver_tasks: Vec<_> = opened
        .map(|r| tokio::spawn(receive(r, shared.clone(), stop.clone())))
        .collect();

    if opts.others > 0 {
        match await_others(setup, &ours, opts.others, opts.start_wait).await {
            Ok(online) => other_online = online,
            Err(e) => {
                stop.cancel();
                for task in receiver_tasks {
                    let _ = task.await;
                }
                setup.settle(&users).await;
                return Err(e);
            }
        }
    }
    let before = setup.snapshot(&servers_of(&servers), &routes).await;
    let sent_so_far = Arc::new(AtomicU64::new(0));
    let progress_stop = CancellationToken::new();
    let progress = report::progress(setup.progress, progress_stop.clone(), {
        let (s, sent) = (shared.clone(), sent_so_far.clone());
        let count = opts.count;
        let receive_only = opts.receive_only;
        move || {
            let (what, n) = if receive_only {
                ("receive-only", s.seen.load(Relaxed))
            } else {
                ("message", sent.load(Relaxed))
            };
            format!(
                "fanout: {what} {n}/{count}, deliveries {}",
                s.deliveries.get()
            )
        }
    });
    let outcome = match sender {
        Some(sender) => send_all(sender, &opts, &shared, &sent_so_far).await,
        None => {
            await_messages(&opts, &shared).await;
            SendOutcome {
                accepted: shared.seen.load(Relaxed),
                pushed: 0,
                failures: Failures::default(),
            }
        }
    };
    // Every message was answered (or failed): wait for the receivers to have them all.
    let expected = if opts.receive_only {
        opts.count as u64 * n as u64
    } else {
        outcome.accepted * n as u64
    };
    let _ = tokio::time::timeout(DRAIN_DEADLINE, shared.deliveries.reached(expected)).await;
    let after = setup.snapshot(&servers_of(&servers), &routes).await;
    stop.cancel();
    for task in receiver_tasks {
        let _ = task.await;
    }
    progress_stop.cancel();
    if let Some(p) = progress {
        let _ = p.await;
    }
    setup.settle(&users).await;

    let per_message: Vec<MessageTiming> = shared
        .slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.sent_ns.load(Relaxed) > 0 || s.received.load(Relaxed) > 0)
        .map(|(number, s)| MessageTiming {
            number,
            sent_unix_ns: s.sent_ns.load(Relaxed),
            received: s.received.load(Relaxed),
            last_unix_ns: s.last_ns.load(Relaxed),
        })
        .collect();
    // Time to the last receipt of every message that reached anyone here.
    let mut times: Vec<f64> = per_message
        .iter()
        .filter(|m| m.received > 0)
        .map(|m| m.last_unix_ns.saturating_sub(m.sent_unix_ns) as f64 / 1e6)
        .collect();
    times.sort_by(f64::total_cmp);
    let deliveries = shared.deliveries.get();
    let busy_secs: f64 = times.iter().sum::<f64>() / 1000.0;
    let cpu = probe::cpu_delta(&before, &after);
    let per_delivery = |ms: Option<u64>| ms.and_then(|ms| per_sec(ms * 1000, deliveries as f64));
    let mut failures = shared.failures.snapshot();
    for (k, v) in outcome.failures.snapshot() {
        *failures.entry(k).or_default() += v;
    }
    Ok(FanoutReport {
        scenario: "fanout",
        role: if opts.receive_only {
            "receive-only"
        } else {
            "send"
        },
        transport: transport_name(opts.transport),
        servers: servers.len(),
        receivers: n,
        other_online,
        others: opts.others,
        messages: opts.count,
        sent: outcome.accepted,
        send_failures: failures,
        pushed: outcome.pushed,
        expected_deliveries: expected,
        deliveries,
        missing: expected.saturating_sub(deliveries),
        time_to_last_median_ms: median(&times),
        time_to_last_max_ms: times.last().copied(),
        deliveries_per_sec: per_sec(deliveries, busy_secs),
        server_cpu_us_per_delivery: per_delivery(cpu.servers_ms),
        cpu_us_per_delivery: per_delivery(cpu.total_ms),
        cpu,
        per_message,
    })
}

/// Now, in nanoseconds since the Unix epoch: one clock for every bench process here.
pub(crate) fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Waits until at least `others` users besides `ours` are online (the receivers of other
/// processes), for at most `wait`; returns how many there are.
async fn await_others(
    setup: &Setup,
    ours: &[u64],
    others: usize,
    wait: Duration,
) -> anyhow::Result<u64> {
    let deadline = Instant::now() + wait;
    loop {
        let online = count_others(setup, ours).await?;
        if online >= others as u64 {
            return Ok(online);
        }
        if Instant::now() + OTHERS_POLL > deadline {
            anyhow::bail!(
                "only {online} of the {others} receivers of other processes were online \
                 after {wait:?}"
            );
        }
        tokio::time::sleep(OTHERS_POLL).await;
    }
}

/// Receive-only: waits up to `start_wait` for the first message, then until every receiver
/// here has all `count` messages, or the sender's schedule and the drain deadline are over.
async fn await_messages(opts: &FanoutOpts, shared: &Shared) {
    let all = opts.count as u64 * opts.receivers as u64;
    if tokio::time::timeout(opts.start_wait, shared.deliveries.reached(1))
        .await
        .is_err()
    {
        return;
    }
    let schedule = opts.interval * u32::try_from(opts.count).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(schedule + DRAIN_DEADLINE, shared.deliveries.reached(all)).await;
}

pub(crate) fn median(sorted: &[f64]) -> Option<f64> {
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[n / 2]),
        n => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// Online users that are not `ours`: every live server's logged-in connections, less those
/// of `ours` that are online.
async fn count_others(setup: &Setup, ours: &[u64]) -> anyhow::Result<u64> {
    let (all, mine) = tokio::try_join!(setup.online_count(), setup.online_of(ours))?;
    Ok(all.saturating_sub(mine as u64))
}

struct SendOutcome {
    accepted: u64,
    pushed: u64,
    failures: Failures,
}

/// Sends the numbered group messages on schedule, each after the previous one's result, and
/// closes the sender. Pings keep the sender's connection alive across long intervals.
async fn send_all(
    sender: Opened,
    opts: &FanoutOpts,
    shared: &Shared,
    sent_so_far: &AtomicU64,
) -> SendOutcome {
    let mut out = SendOutcome {
        accepted: 0,
        pushed: 0,
        failures: Failures::default(),
    };
    let Opened {
        mut conn,
        heartbeat: interval,
        ..
    } = sender;
    let mut tick = heartbeat(interval);
    let start = Instant::now();
    for seq in 0..opts.count {
        let due = start + opts.interval * seq as u32;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(due) => break,
                _ = tick.tick() => {
                    if conn.send(&ping()).await.is_err() {
                        out.failures.add("sender connection lost");
                        return out;
                    }
                }
            }
        }
        let sent_ns = unix_ns();
        shared.slots[seq].sent_ns.store(sent_ns, Relaxed);
        let client_id = seq as u64 + 1;
        let frame = Frame::new(Body::Send(Send {
            client_id,
            kind: MessageKind::Group as i32,
            body: format!("{BODY_PREFIX}{seq} {sent_ns}"),
            ..Default::default()
        }));
        if conn.send(&frame).await.is_err() {
            out.failures.add("sender connection lost");
            return out;
        }
        sent_so_far.fetch_add(1, Relaxed);
        match await_result(&mut conn, client_id).await {
            Ok(r) => match SendStatus::try_from(r.status) {
                Ok(SendStatus::Delivered | SendStatus::Stored) => {
                    out.accepted += 1;
                    out.pushed += u64::from(r.delivered);
                }
                _ => out.failures.add(
                    r.error
                        .map_or_else(|| "failed".into(), |e| code_name(e.code)),
                ),
            },
            Err(reason) => {
                out.failures.add(reason);
                return out;
            }
        }
    }
    close_all([conn]).await;
    out
}

/// Reads the sender's frames until the `SendResult` of `client_id` (others are pongs).
async fn await_result(
    conn: &mut Connection,
    client_id: u64,
) -> Result<cim_sdk::pb::SendResult, &'static str> {
    let deadline = Instant::now() + RESULT_DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, conn.recv()).await {
            Err(_) => return Err("no send result"),
            Ok(Ok(Some(Frame {
                body: Some(Body::SendResult(r)),
            }))) if r.client_id == client_id => return Ok(r),
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None) | Err(_)) => return Err("sender connection lost"),
        }
    }
}

/// One receiver: notes the receipt of every bench message until `stop`, then closes.
async fn receive(receiver: Opened, shared: Arc<Shared>, stop: CancellationToken) {
    receive_pushes(receiver, stop, &shared.failures, |messages| {
        let now_ns = unix_ns();
        let mut got = 0;
        for m in messages {
            if m.kind != MessageKind::Group as i32 {
                continue;
            }
            let Some((seq, sent_ns)) = parse_body(&m.body) else {
                continue;
            };
            let Some(slot) = shared.slots.get(seq) else {
                continue;
            };
            // A receive-only process learns the send time from the body.
            slot.sent_ns.fetch_max(sent_ns, Relaxed);
            if slot.received.fetch_add(1, Relaxed) == 0 {
                shared.seen.fetch_add(1, Relaxed);
            }
            slot.last_ns.fetch_max(now_ns, Relaxed);
            got += 1;
        }
        shared.deliveries.add(got);
    })
    .await;
}

/// The number and send time (Unix ns) of a bench message body; `None` for any other body.
fn parse_body(body: &str) -> Option<(usize, u64)> {
    let (seq, sent) = body.strip_prefix(BODY_PREFIX)?.split_once(' ')?;
    Some((seq.parse().ok()?, sent.parse().ok()?))
}

impl std::fmt::Display for FanoutReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let title = format!(
            "cim-bench fanout{} ({}, {} receivers on {} server{}, {} messages)",
            if self.role == "send" {
                ""
            } else {
                " receive-only"
            },
            self.transport,
            self.receivers,
            self.servers,
            if self.servers == 1 { "" } else { "s" },
            self.messages
        );
        let ms_opt = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{} ms", ms(v)));
        let cpu = &self.cpu;
        f.write_str(&report::table(
            &title,
            &[
                ("other users online", int(self.other_online)),
                ("sent (accepted)", int(self.sent)),
                ("send failures", report::failures_line(&self.send_failures)),
                ("pushed by the route", int(self.pushed)),
                (
                    "deliveries",
                    format!(
                        "{} of {}",
                        int(self.deliveries),
                        int(self.expected_deliveries)
                    ),
                ),
                ("missing", int(self.missing)),
                (
                    "send → last receipt",
                    format!(
                        "median {}, max {}",
                        ms_opt(self.time_to_last_median_ms),
                        ms_opt(self.time_to_last_max_ms)
                    ),
                ),
                (
                    "delivery rate",
                    format!("{} deliveries/s", num(self.deliveries_per_sec)),
                ),
                (
                    "cpu",
                    format!(
                        "servers {} µs/delivery, all {} µs/delivery (servers {} ms, routes {} ms, \
                         redis {} ms; this bench {} ms)",
                        num(self.server_cpu_us_per_delivery),
                        num(self.cpu_us_per_delivery),
                        opt(cpu.servers_ms),
                        opt(cpu.routes_ms),
                        opt(cpu.redis_ms),
                        opt(cpu.bench_ms)
                    ),
                ),
            ],
        ))
    }
}
