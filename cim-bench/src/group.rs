//! The `group` scenario: a stored group (the conversations' GROUP_CHAT) of `members` users of
//! which `online` are connected besides the sender, spread round-robin over the live servers.
//! The sender (the group's owner) sends `count` numbered messages at a fixed rate or flat out
//! (a window of sends waiting for their `SendResult`); each online member notes when it got
//! each one and acks its group position, as the SDK does. Per message: the time from the send
//! until the *last* online member had it. Then `catch_up` members that were offline the whole
//! time connect one after the other, and each is timed from its connect until it has every
//! message the group got meanwhile (the login's catch-up from its stored position).
//!
//! What it is for: a group message is stored once in the group's log and pushed once per
//! server, so the Redis work per message must not grow with the number of members, only the
//! pushes and acks with the number of members online. Run it with two member counts and the
//! same `online` (the baseline does, 1,000 and 2,000 with 500 online) and compare
//! `redis_us_per_message`. The acks of the online members are in the measured cost: one ack
//! script per member and push, batched per server.
//!
//! Counted: sends the route accepted, deliveries to online members (a repeat or a message out
//! of order in the group's log counts in `repeated`), missing deliveries, the CPU of every
//! server, route and Redis during the live phase per message and per delivery, and for the
//! catch-up the time per member (median, max) and the CPU per caught-up message.
//!
//! Nobody else should be online: the group's users are bench users created for the run and
//! the group is new each run, so others do not receive these messages, but their traffic
//! would add to the CPU measured.

use crate::{
    connect::{servers_of, transport_name},
    fanout::{median, unix_ns, Slot},
    p2p::{opt, Load, RATE_MODE_MAX_OUTSTANDING},
    probe::{self, CpuUsage},
    report::{self, code_name, int, ms, num, per_sec, Failures, Tally},
    setup::{close_all, heartbeat, open, ping, receive_pushes, BenchUser, Opened, Setup},
    DRAIN_DEADLINE,
};
use cim_common::registry::{ServiceInfo, ServiceKind};
use cim_sdk::{
    conn::{self, Connection, Transport},
    pb::{frame::Body, Frame, Message, MessageKind, Send, SendStatus},
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
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Initial buffer size of each member connection (a push of one message is ~120 bytes; a
/// catch-up push holds a page of them and grows the buffer as it needs).
const BUFFER: usize = 1024;

/// Most messages one run sends (each has a slot of counters).
pub const MAX_MESSAGES: usize = 100_000;

/// Prefix of every bench message body: `group {number} {send time, Unix ns}`.
const BODY_PREFIX: &str = "group ";

/// Longest wait for any answer while sends are outstanding: a cluster that answers nothing
/// for this long has lost the sender's messages.
const RESULT_DEADLINE: Duration = Duration::from_secs(30);

/// Longest catch-up of one member, from its connect to its last message.
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(60);

/// Options of [`run_group`].
#[derive(Debug, Clone)]
pub struct GroupOpts {
    /// Group members, the sender (owner) included: at most the route's `max_members`.
    pub members: usize,
    /// Members connected during the messages, besides the sender.
    pub online: usize,
    /// Messages per second, or flat out with `window` sends outstanding.
    pub load: Load,
    pub window: usize,
    /// Messages sent.
    pub count: usize,
    /// Members offline during the messages that connect afterwards, one at a time, and catch
    /// up (0: no catch-up phase). `online + catch_up` is at most `members - 1`.
    pub catch_up: usize,
    pub transport: Transport,
    pub user_offset: u64,
}

impl Default for GroupOpts {
    fn default() -> Self {
        Self {
            members: 1000,
            online: 500,
            load: Load::Rate(50.0),
            window: 32,
            count: 500,
            catch_up: 10,
            transport: Transport::Tcp,
            user_offset: 0,
        }
    }
}

/// What [`run_group`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct GroupReport {
    pub scenario: &'static str,
    pub transport: &'static str,
    pub servers: usize,
    pub group_id: u64,
    pub members: usize,
    /// Members online during the messages, the sender not counted.
    pub online: usize,
    /// `rate` or `flat-out`.
    pub load: &'static str,
    pub target_rate: Option<f64>,
    pub window: Option<usize>,
    pub messages: usize,
    /// Messages the route accepted.
    pub sent: u64,
    pub send_failures: BTreeMap<String, u64>,
    /// Accepted messages per second, from the first send to the last answer.
    pub messages_per_sec: Option<f64>,
    /// `online × accepted messages`.
    pub expected_deliveries: u64,
    /// Bench messages the online members got (each at most once per member).
    pub deliveries: u64,
    pub missing: u64,
    /// Messages a member got again or out of the group log's order.
    pub repeated: u64,
    /// From a send until the last online member had the message.
    pub time_to_last_median_ms: Option<f64>,
    pub time_to_last_max_ms: Option<f64>,
    /// CPU of the live phase (first send to the last delivery).
    pub cpu: CpuUsage,
    /// All CPU (servers, routes, Redis) per accepted message, microseconds.
    pub cpu_us_per_message: Option<f64>,
    /// Redis CPU per accepted message, microseconds: flat in `members` at a given `online`.
    pub redis_us_per_message: Option<f64>,
    /// Server CPU per delivery, microseconds.
    pub server_cpu_us_per_delivery: Option<f64>,
    pub catch_up: CatchUpReport,
}

/// The catch-up phase of [`GroupReport`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct CatchUpReport {
    /// Members that connected after the messages.
    pub members: usize,
    /// Messages each had to catch up (the accepted ones).
    pub messages_each: u64,
    /// Members that got all of them.
    pub complete: usize,
    pub missing: u64,
    /// Messages a member got twice or out of order.
    pub repeated: u64,
    /// From a member's connect until it had every message.
    pub time_median_ms: Option<f64>,
    pub time_max_ms: Option<f64>,
    /// CPU of the catch-up phase (the connects and logins included).
    pub cpu: CpuUsage,
    /// All CPU per caught-up message, microseconds.
    pub cpu_us_per_message: Option<f64>,
    pub server_cpu_us_per_message: Option<f64>,
    pub redis_us_per_message: Option<f64>,
}

struct Shared {
    group: u64,
    slots: Vec<Slot>,
    deliveries: Tally,
    repeated: AtomicU64,
    failures: Failures,
}

/// Runs the `group` scenario.
pub async fn run_group(setup: &Setup, opts: GroupOpts) -> anyhow::Result<GroupReport> {
    match opts.load {
        Load::Rate(r) if !r.is_finite() || r <= 0.0 => anyhow::bail!("the rate must be positive"),
        Load::FlatOut if opts.window == 0 => anyhow::bail!("the window must be at least 1"),
        _ => {}
    }
    if opts.count == 0 || opts.count > MAX_MESSAGES {
        anyhow::bail!("group sends 1 to {MAX_MESSAGES} messages");
    }
    if opts.online == 0 || opts.online + opts.catch_up >= opts.members {
        anyhow::bail!(
            "the group needs at least one online member, and room for the sender, the {} \
             online and the {} catching up among its {} members",
            opts.online,
            opts.catch_up,
            opts.members
        );
    }
    crate::ensure_fd_capacity(opts.online + 1)?;
    let servers: Vec<Arc<ServiceInfo>> = setup.servers().await?.into_iter().map(Arc::new).collect();
    let routes = setup.members(ServiceKind::Route).await?;
    // The sender (user 0, the owner) is on the first server; the members follow,
    // round-robin over the servers.
    let users = setup
        .prepare_users(opts.user_offset, opts.members, |i| {
            servers[i.saturating_sub(1) % servers.len()].clone()
        })
        .await?;
    let ids: Vec<u64> = users.iter().map(|u| u.id).collect();
    let group = setup
        .api
        .create_group(
            ids[0],
            &format!("bench group {}", opts.user_offset),
            &ids[1..],
        )
        .await?;
    let live_users = &users[..=opts.online];
    let mut opened = setup
        .open_all(live_users, opts.transport, Some(BUFFER), &[])
        .await?
        .into_iter();
    let sender = opened.next().expect("open_all opens every user or fails");

    let shared = Arc::new(Shared {
        group,
        slots: (0..opts.count).map(|_| Slot::default()).collect(),
        deliveries: Tally::default(),
        repeated: AtomicU64::new(0),
        failures: Failures::default(),
    });
    let stop = CancellationToken::new();
    let receiver_tasks: Vec<_> = opened
        .map(|r| tokio::spawn(receive(r, shared.clone(), stop.clone())))
        .collect();

    let before = setup.snapshot(&servers_of(&servers), &routes).await;
    let sent_so_far = Arc::new(AtomicU64::new(0));
    let progress_stop = CancellationToken::new();
    let progress = report::progress(setup.progress, progress_stop.clone(), {
        let (s, sent) = (shared.clone(), sent_so_far.clone());
        let count = opts.count;
        move || {
            format!(
                "group: message {}/{count}, deliveries {}",
                sent.load(Relaxed),
                s.deliveries.get()
            )
        }
    });
    let outcome = send_all(sender, group, &opts, &shared, &sent_so_far).await;
    let expected = outcome.accepted * opts.online as u64;
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
    setup.settle(live_users).await;

    let catch_up_users = &users[opts.online + 1..opts.online + 1 + opts.catch_up];
    let catch_up = catch_up(
        setup,
        (&servers, &routes),
        catch_up_users,
        &opts,
        group,
        outcome.accepted,
    )
    .await?;

    let mut times: Vec<f64> = shared
        .slots
        .iter()
        .filter(|s| s.received.load(Relaxed) > 0)
        .map(|s| {
            let (sent, last) = (s.sent_ns.load(Relaxed), s.last_ns.load(Relaxed));
            last.saturating_sub(sent) as f64 / 1e6
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let deliveries = shared.deliveries.get();
    let cpu = probe::cpu_delta(&before, &after);
    let per = |ms: Option<u64>, n: u64| ms.and_then(|ms| per_sec(ms * 1000, n as f64));
    let mut failures = shared.failures.snapshot();
    for (k, v) in outcome.failures.snapshot() {
        *failures.entry(k).or_default() += v;
    }
    let busy = outcome
        .last_answer
        .saturating_duration_since(outcome.first_send);
    Ok(GroupReport {
        scenario: "group",
        transport: transport_name(opts.transport),
        servers: servers.len(),
        group_id: group,
        members: opts.members,
        online: opts.online,
        load: match opts.load {
            Load::Rate(_) => "rate",
            Load::FlatOut => "flat-out",
        },
        target_rate: match opts.load {
            Load::Rate(r) => Some(r),
            Load::FlatOut => None,
        },
        window: matches!(opts.load, Load::FlatOut).then_some(opts.window),
        messages: opts.count,
        sent: outcome.accepted,
        send_failures: failures,
        messages_per_sec: per_sec(outcome.accepted, busy.as_secs_f64()),
        expected_deliveries: expected,
        deliveries,
        missing: expected.saturating_sub(deliveries),
        repeated: shared.repeated.load(Relaxed),
        time_to_last_median_ms: median(&times),
        time_to_last_max_ms: times.last().copied(),
        cpu_us_per_message: per(cpu.total_ms, outcome.accepted),
        redis_us_per_message: per(cpu.redis_ms, outcome.accepted),
        server_cpu_us_per_delivery: per(cpu.servers_ms, deliveries),
        cpu,
        catch_up,
    })
}

struct SendOutcome {
    accepted: u64,
    failures: Failures,
    first_send: Instant,
    last_answer: Instant,
}

/// Sends the numbered group messages (at the rate, or keeping `window` outstanding), reads
/// their results, and closes the sender. Pings keep its connection alive.
async fn send_all(
    sender: Opened,
    group: u64,
    opts: &GroupOpts,
    shared: &Shared,
    sent_so_far: &AtomicU64,
) -> SendOutcome {
    let Opened {
        mut conn,
        heartbeat: interval,
        ..
    } = sender;
    let mut tick = heartbeat(interval);
    let (cap, gap) = match opts.load {
        Load::Rate(r) => (RATE_MODE_MAX_OUTSTANDING, Duration::from_secs_f64(1.0 / r)),
        Load::FlatOut => (opts.window, Duration::ZERO),
    };
    let start = Instant::now();
    let mut out = SendOutcome {
        accepted: 0,
        failures: Failures::default(),
        first_send: start,
        last_answer: start,
    };
    let (mut next, mut outstanding) = (0usize, 0usize);
    let mut next_due = start;
    let mut last_activity = start;
    while next < opts.count || outstanding > 0 {
        let now = Instant::now();
        let mut queued = 0;
        while next < opts.count && outstanding < cap && next_due <= now {
            let sent_ns = unix_ns();
            shared.slots[next].sent_ns.store(sent_ns, Relaxed);
            let frame = Frame::new(Body::Send(Send {
                client_id: next as u64 + 1,
                kind: MessageKind::GroupChat as i32,
                group_id: group,
                body: format!("{BODY_PREFIX}{next} {sent_ns}"),
                ..Default::default()
            }));
            if conn.feed(&frame).await.is_err() {
                out.failures.add("sender connection lost");
                return out;
            }
            next += 1;
            queued += 1;
            outstanding += 1;
            next_due += gap;
        }
        if queued > 0 {
            sent_so_far.fetch_add(queued, Relaxed);
            if conn.flush().await.is_err() {
                out.failures.add("sender connection lost");
                return out;
            }
            last_activity = now;
        }
        let wake = if next < opts.count && outstanding < cap {
            next_due
        } else {
            last_activity + RESULT_DEADLINE
        };
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {
                if outstanding > 0 && Instant::now() >= last_activity + RESULT_DEADLINE {
                    out.failures.add_n("no send result", outstanding as u64);
                    break;
                }
            }
            _ = tick.tick() => {
                if conn.send(&ping()).await.is_err() {
                    out.failures.add("sender connection lost");
                    return out;
                }
            }
            frame = conn.recv() => match frame {
                Ok(Some(Frame { body: Some(Body::SendResult(r)) })) => {
                    outstanding = outstanding.saturating_sub(1);
                    out.last_answer = Instant::now();
                    last_activity = out.last_answer;
                    match SendStatus::try_from(r.status) {
                        Ok(SendStatus::Delivered | SendStatus::Stored) => out.accepted += 1,
                        _ => out.failures.add(
                            r.error.map_or_else(|| "failed".into(), |e| code_name(e.code)),
                        ),
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    out.failures.add("sender connection lost");
                    return out;
                }
            }
        }
    }
    close_all([conn]).await;
    out
}

/// The bench messages of `group` in `messages`: (number, send time, log seq).
fn bench_messages(group: u64, messages: &[Message]) -> impl Iterator<Item = (usize, u64)> + '_ {
    messages
        .iter()
        .filter(move |m| m.kind == MessageKind::GroupChat as i32 && m.group_id == group)
        .filter_map(|m| Some((parse_body(&m.body)?, m.log_seq)))
}

/// One online member: notes the receipt of every bench message until `stop`, then closes.
/// Its acks (message ids and group positions) are [`receive_pushes`]'s.
async fn receive(member: Opened, shared: Arc<Shared>, stop: CancellationToken) {
    let mut last_seq = 0;
    receive_pushes(member, stop, &shared.failures, |messages| {
        let now_ns = unix_ns();
        let mut got = 0;
        for (number, log_seq) in bench_messages(shared.group, messages) {
            if log_seq <= last_seq {
                shared.repeated.fetch_add(1, Relaxed);
                continue;
            }
            last_seq = log_seq;
            let Some(slot) = shared.slots.get(number) else {
                continue;
            };
            slot.received.fetch_add(1, Relaxed);
            slot.last_ns.fetch_max(now_ns, Relaxed);
            got += 1;
        }
        shared.deliveries.add(got);
    })
    .await;
}

/// The catch-up phase: logs `users` in (outside the measured part), then connects them one
/// at a time, each until it has the `messages` the group got while it was offline.
async fn catch_up(
    setup: &Setup,
    (servers, routes): (&[Arc<ServiceInfo>], &[ServiceInfo]),
    users: &[BenchUser],
    opts: &GroupOpts,
    group: u64,
    messages: u64,
) -> anyhow::Result<CatchUpReport> {
    let mut out = CatchUpReport {
        members: users.len(),
        messages_each: messages,
        ..CatchUpReport::default()
    };
    if users.is_empty() {
        return Ok(out);
    }
    let logged = setup.login(users).await;
    if let Some(reason) = logged.failures.first() {
        anyhow::bail!("catch-up members could not log in: {reason}");
    }
    let before = setup.snapshot(&servers_of(servers), routes).await;
    let mut times = Vec::with_capacity(users.len());
    for user in logged.users {
        let start = Instant::now();
        let opened = open(user, opts.transport, None, Some(BUFFER), setup.tls.clone())
            .await
            .map_err(|reason| anyhow::anyhow!("a catch-up member could not connect: {reason}"))?;
        let (got, repeated) = catch_up_one(opened.conn, group, messages).await;
        out.missing += messages.saturating_sub(got);
        out.repeated += repeated;
        if got >= messages {
            out.complete += 1;
            times.push(start.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let after = setup.snapshot(&servers_of(servers), routes).await;
    setup.settle(users).await;
    times.sort_by(f64::total_cmp);
    out.time_median_ms = median(&times);
    out.time_max_ms = times.last().copied();
    let caught = (messages * out.members as u64).saturating_sub(out.missing);
    out.cpu = probe::cpu_delta(&before, &after);
    let per = |ms: Option<u64>| ms.and_then(|ms| per_sec(ms * 1000, caught as f64));
    out.cpu_us_per_message = per(out.cpu.total_ms);
    out.server_cpu_us_per_message = per(out.cpu.servers_ms);
    out.redis_us_per_message = per(out.cpu.redis_ms);
    Ok(out)
}

/// One catching-up member: reads pushes (replayed or live), acking each as the SDK does,
/// until it has `messages` bench messages of `group` or [`CATCH_UP_DEADLINE`] passes; then
/// closes. Returns (messages got, repeats).
async fn catch_up_one(mut conn: Connection, group: u64, messages: u64) -> (u64, u64) {
    let deadline = Instant::now() + CATCH_UP_DEADLINE;
    let (mut got, mut repeated, mut last_seq) = (0, 0, 0);
    while got < messages {
        let push = match tokio::time::timeout_at(deadline, conn.recv()).await {
            Ok(Ok(Some(Frame {
                body: Some(Body::Push(push)),
            }))) => push,
            Ok(Ok(Some(_))) => continue,
            _ => break,
        };
        for (_, log_seq) in bench_messages(group, &push.messages) {
            if log_seq <= last_seq {
                repeated += 1;
            } else {
                last_seq = log_seq;
                got += 1;
            }
        }
        let acks = conn::ack_ids(&push);
        if conn
            .ack_all(acks, conn::group_positions(&push))
            .await
            .is_err()
        {
            break;
        }
    }
    close_all([conn]).await;
    (got, repeated)
}

/// The number of a bench message body; `None` for any other body.
fn parse_body(body: &str) -> Option<usize> {
    let (number, _sent) = body.strip_prefix(BODY_PREFIX)?.split_once(' ')?;
    number.parse().ok()
}

impl std::fmt::Display for GroupReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let load = match (self.target_rate, self.window) {
            (Some(r), _) => format!("{r} msg/s"),
            (None, Some(w)) => format!("flat out, window {w}"),
            (None, None) => "-".into(),
        };
        let title = format!(
            "cim-bench group ({}, {} members, {} online on {} server{}, {} messages, {load})",
            self.transport,
            self.members,
            self.online,
            self.servers,
            if self.servers == 1 { "" } else { "s" },
            self.messages
        );
        let ms_opt = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{} ms", ms(v)));
        let (cpu, c) = (&self.cpu, &self.catch_up);
        f.write_str(&report::table(
            &title,
            &[
                ("sent (accepted)", int(self.sent)),
                ("send failures", report::failures_line(&self.send_failures)),
                ("messages/s", num(self.messages_per_sec)),
                (
                    "deliveries",
                    format!(
                        "{} of {} (missing {}, repeated {})",
                        int(self.deliveries),
                        int(self.expected_deliveries),
                        int(self.missing),
                        int(self.repeated)
                    ),
                ),
                (
                    "send → last online receipt",
                    format!(
                        "median {}, max {}",
                        ms_opt(self.time_to_last_median_ms),
                        ms_opt(self.time_to_last_max_ms)
                    ),
                ),
                (
                    "cpu per message",
                    format!(
                        "all {} µs, redis {} µs; servers {} µs/delivery (servers {} ms, \
                         routes {} ms, redis {} ms; this bench {} ms)",
                        num(self.cpu_us_per_message),
                        num(self.redis_us_per_message),
                        num(self.server_cpu_us_per_delivery),
                        opt(cpu.servers_ms),
                        opt(cpu.routes_ms),
                        opt(cpu.redis_ms),
                        opt(cpu.bench_ms)
                    ),
                ),
                (
                    "catch-up",
                    format!(
                        "{} of {} members got all {} (missing {}, repeated {}): median {}, \
                         max {}",
                        c.complete,
                        c.members,
                        int(c.messages_each),
                        int(c.missing),
                        int(c.repeated),
                        ms_opt(c.time_median_ms),
                        ms_opt(c.time_max_ms)
                    ),
                ),
                (
                    "catch-up cpu per message",
                    format!(
                        "all {} µs, servers {} µs, redis {} µs",
                        num(c.cpu_us_per_message),
                        num(c.server_cpu_us_per_message),
                        num(c.redis_us_per_message)
                    ),
                ),
            ],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_parse() {
        assert_eq!(parse_body("group 12 1700000000000000000"), Some(12));
        assert_eq!(parse_body("fanout 12 1"), None);
        assert_eq!(parse_body("group x 1"), None);
        assert_eq!(parse_body("group 3"), None);
    }

    #[test]
    fn only_the_groups_chat_messages_count() {
        let m = |kind: MessageKind, group_id, body: &str, log_seq| Message {
            kind: kind as i32,
            group_id,
            body: body.into(),
            log_seq,
            ..Default::default()
        };
        let messages = [
            m(MessageKind::GroupChat, 7, "group 0 1", 3),
            m(MessageKind::GroupEvent, 7, "group 1 1", 4),
            m(MessageKind::GroupChat, 8, "group 2 1", 5),
            m(MessageKind::GroupChat, 7, "hello", 6),
            m(MessageKind::GroupChat, 7, "group 4 1", 7),
        ];
        let got: Vec<_> = bench_messages(7, &messages).collect();
        assert_eq!(got, [(0, 3), (4, 7)]);
    }
}
