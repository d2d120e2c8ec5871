//! **relay**: client → relay → client, one read and one write per hop, and nothing else.
//!
//! A relay process (`internal-relay-server`) accepts a sender and a receiver connection per
//! pair (each opens with a 4-byte hello: the pair number, the top bit set for the receiver)
//! and then forwards whatever a sender's socket holds to its paired receiver: one epoll
//! (level-triggered) wake-up reports the ready senders, and each gets one `read` of up to
//! 64 KiB and one blocking `write` of those bytes to its receiver. The senders and receivers
//! are in other processes (`internal-relay-clients`, one by default; the pairs split evenly
//! when there are more), each pair's two ends in the same process.
//!
//! Why it is the floor of one hop of a message: a process that passes a message on cannot do
//! less than be woken, read it and write it, and on loopback that write runs the next process's
//! TCP receive too. cim's private message takes three such process hops (client → server →
//! route → server → client) plus Redis, so issue 22 states its CPU and latency targets as
//! multiples of this relay's.
//!
//! Each message carries its send time (`CLOCK_MONOTONIC` ns, taken just before the sender's
//! `write`); the receiver's side records the one-way latency at its `read` in a log-linear
//! histogram. Load:
//! - **rate**: a total rate spread over the pairs in turn, each send at its scheduled time
//!   (`epoll_pwait2` with nanosecond timeouts, so the sends do not bunch into milliseconds).
//! - **flat out**: each sender keeps `window` messages outstanding. The sender learns progress
//!   from its own receiver: both ends of a pair are in one process, so when the receiver's
//!   read completes `k` messages the sender writes `k` more, in one write (no ack travels
//!   back; the receiver echoes nothing).
//!
//! After `duration` the senders stop and the clients wait (≤ 2 s) until every message sent has
//! arrived: `lost` counts those that did not, `out_of_order` those that broke a pair's
//! sequence (both 0 on TCP; they check the relay). CPU: the relay reports its own
//! `getrusage` when asked (`stats` on its stdin) just before the clients start and after
//! they finish; each client process reports its own from start to finish. Per message
//! delivered: the relay's (compare one cim hop with it) and all processes' (relay + clients).

use crate::{
    bail,
    child::Children,
    error::{Context as _, Result},
    hist::{Histogram, Sparse},
    msg::{self, Framer, MESSAGE_BYTES},
    sys::{self, Cpu},
};
use serde::{Deserialize, Serialize};
use std::{
    io::{self, BufRead as _, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

/// Top bit of a hello: the connection is a pair's receiver.
const RECEIVER: u32 = 1 << 31;
/// How long the clients wait, after sending stops, for what is still on its way.
const DRAIN: Duration = Duration::from_secs(2);
/// Bytes per relay read (and per client read).
const READ_BYTES: usize = 64 * 1024;

/// How the senders load the relay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// Messages per second in total, over all pairs.
    Rate(f64),
    /// Each sender keeps `window` messages outstanding.
    Flat { window: usize },
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub pairs: usize,
    pub load: Load,
    pub duration: Duration,
}

/// Options of [`run`].
#[derive(Debug, Clone)]
pub struct RelayOpts {
    /// The program to run as the relay and client processes (this binary).
    pub exe: PathBuf,
    pub scenarios: Vec<Scenario>,
    /// Processes the pairs are spread over (at most one per pair).
    pub client_processes: usize,
}

impl RelayOpts {
    /// Issue 22's three scenarios: `unloaded` (1 pair at 200 msg/s), `rate` (200 pairs at
    /// 10,000 msg/s in total), `flat` (1,000 pairs, window 32), `duration` each.
    pub fn new(exe: PathBuf, duration: Duration) -> Self {
        let scenario = |name: &str, pairs, load| Scenario {
            name: name.to_owned(),
            pairs,
            load,
            duration,
        };
        Self {
            exe,
            scenarios: vec![
                scenario("unloaded", 1, Load::Rate(200.0)),
                scenario("rate", 200, Load::Rate(10_000.0)),
                scenario("flat", 1000, Load::Flat { window: 32 }),
            ],
            client_processes: 1,
        }
    }
}

/// Each scenario's figures under its name, in the order they ran (a JSON object).
#[derive(Debug, Clone, Default)]
pub struct RelayReport(pub Vec<(String, ScenarioReport)>);

impl RelayReport {
    pub fn get(&self, name: &str) -> Option<&ScenarioReport> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, r)| r)
    }
}

impl Serialize for RelayReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(n, r)| (n, r)))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioReport {
    pub pairs: usize,
    /// `rate` or `flat`.
    pub mode: String,
    pub target_rate: Option<f64>,
    pub window: Option<usize>,
    pub duration_secs: f64,
    pub client_processes: usize,
    pub message_bytes: usize,
    pub sent: u64,
    pub delivered: u64,
    pub lost: u64,
    pub out_of_order: u64,
    /// Delivered per second, from the start to the last receipt.
    pub throughput_per_sec: f64,
    /// One-way, the sender's write to the receiver's read.
    pub latency_us: Latency,
    /// The relay process's CPU (user + system) per delivered message, µs.
    pub relay_cpu_us_per_message: f64,
    pub relay_user_us_per_message: f64,
    pub relay_sys_us_per_message: f64,
    /// The client processes' CPU per delivered message, µs.
    pub clients_cpu_us_per_message: f64,
    /// Relay + clients per delivered message, µs.
    pub all_cpu_us_per_message: f64,
    /// The relay's epoll_wait calls, reads and writes per delivered message (below 1 when a
    /// wake-up or a read carries several messages).
    pub relay_wakeups_per_message: f64,
    pub relay_reads_per_message: f64,
    pub relay_writes_per_message: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub max: Option<f64>,
}

/// The relay's counters (its `stats` line).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct RelayStats {
    cpu: Cpu,
    wakeups: u64,
    reads: u64,
    writes: u64,
    bytes: u64,
}

/// A client process's report (its `done` line).
#[derive(Debug, Serialize, Deserialize)]
struct ClientDone {
    sent: u64,
    received: u64,
    out_of_order: u64,
    latency_ns: Sparse,
    cpu: Cpu,
    start_ns: u64,
    last_receipt_ns: u64,
}

/// Runs every scenario in turn, each with a fresh relay and fresh clients.
pub fn run(o: &RelayOpts) -> Result<RelayReport> {
    let mut report = RelayReport::default();
    for sc in &o.scenarios {
        if report.get(&sc.name).is_some() {
            bail!("relay: scenario {} given twice", sc.name);
        }
        let r = run_scenario(o, sc).with_context(|| format!("relay scenario {}", sc.name))?;
        report.0.push((sc.name.clone(), r));
    }
    Ok(report)
}

fn run_scenario(o: &RelayOpts, sc: &Scenario) -> Result<ScenarioReport> {
    if sc.pairs == 0 || sc.duration.is_zero() || o.client_processes == 0 {
        bail!("pairs, duration and client processes must be above 0");
    }
    match sc.load {
        Load::Rate(r) if !(r > 0.0 && r.is_finite()) => bail!("the rate must be above 0"),
        Load::Flat { window: 0 } => bail!("the window must be at least 1"),
        _ => {}
    }
    let procs = o.client_processes.min(sc.pairs);
    let load_text = match sc.load {
        Load::Rate(r) => format!("{r} msg/s in total"),
        Load::Flat { window } => format!("flat out, window {window}"),
    };
    eprintln!(
        "floor relay {}: {} pair(s), {load_text}, {:?}, clients in {procs} process(es)",
        sc.name, sc.pairs, sc.duration
    );
    let max = sc.duration + Duration::from_secs(120);
    let mut children = Children::default();
    let mut cmd = Command::new(&o.exe);
    cmd.arg("internal-relay-server")
        .args(["--pairs", &sc.pairs.to_string()])
        .args(["--max-secs", &max.as_secs().to_string()]);
    let relay = children.spawn("relay", cmd)?;
    let port = children.expect(&[relay], "port", Duration::from_secs(30))?;
    let port: u16 = port[0].parse().context("the relay's port")?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));

    let mut clients = Vec::with_capacity(procs);
    for p in 0..procs {
        let first = p * sc.pairs / procs;
        let n = (p + 1) * sc.pairs / procs - first;
        let mut cmd = Command::new(&o.exe);
        cmd.arg("internal-relay-clients")
            .args(["--addr", &addr.to_string()])
            .args(["--first-pair", &first.to_string()])
            .args(["--pairs", &n.to_string()])
            .args(["--duration-ms", &sc.duration.as_millis().to_string()])
            .args(["--max-secs", &max.as_secs().to_string()]);
        match sc.load {
            Load::Rate(r) => cmd.args(["--rate", &(r * n as f64 / sc.pairs as f64).to_string()]),
            Load::Flat { window } => cmd.args(["--window", &window.to_string()]),
        };
        clients.push(children.spawn(format!("relay clients {p}"), cmd)?);
    }
    let everyone: Vec<usize> = std::iter::once(relay)
        .chain(clients.iter().copied())
        .collect();
    children.expect(&everyone, "ready", Duration::from_secs(60))?;

    let stats = |children: &mut Children| -> Result<RelayStats> {
        children.send(relay, "stats")?;
        let line = children.expect(&[relay], "stats", Duration::from_secs(10))?;
        serde_json::from_str(&line[0]).context("the relay's stats")
    };
    let before = stats(&mut children)?;
    for &c in &clients {
        children.send(c, "go")?;
    }
    let done = children.expect(
        &clients,
        "done",
        sc.duration + DRAIN + Duration::from_secs(60),
    )?;
    let after = stats(&mut children)?;
    children.finish(Duration::from_secs(30))?;

    let mut hist = Histogram::default();
    let (mut sent, mut delivered, mut out_of_order) = (0, 0, 0);
    let (mut start, mut last) = (u64::MAX, 0);
    let mut clients_cpu = Cpu::default();
    for line in &done {
        let d: ClientDone = serde_json::from_str(line).context("a relay client's report")?;
        sent += d.sent;
        delivered += d.received;
        out_of_order += d.out_of_order;
        hist.merge(&d.latency_ns);
        clients_cpu = clients_cpu.add(d.cpu);
        start = start.min(d.start_ns);
        last = last.max(d.last_receipt_ns);
    }
    let relay_cpu = after.cpu.since(before.cpu);
    let per = |x: u64| {
        if delivered > 0 {
            x as f64 / delivered as f64
        } else {
            0.0
        }
    };
    let us = |q: f64| hist.quantile(q).map(|ns| ns as f64 / 1e3);
    let active_secs = last.saturating_sub(start) as f64 / 1e9;
    let report = ScenarioReport {
        pairs: sc.pairs,
        mode: match sc.load {
            Load::Rate(_) => "rate",
            Load::Flat { .. } => "flat",
        }
        .to_owned(),
        target_rate: match sc.load {
            Load::Rate(r) => Some(r),
            Load::Flat { .. } => None,
        },
        window: match sc.load {
            Load::Rate(_) => None,
            Load::Flat { window } => Some(window),
        },
        duration_secs: sc.duration.as_secs_f64(),
        client_processes: procs,
        message_bytes: MESSAGE_BYTES,
        sent,
        delivered,
        lost: sent.saturating_sub(delivered),
        out_of_order,
        throughput_per_sec: if active_secs > 0.0 {
            delivered as f64 / active_secs
        } else {
            0.0
        },
        latency_us: Latency {
            p50: us(0.5),
            p90: us(0.9),
            p99: us(0.99),
            p999: us(0.999),
            max: (hist.count() > 0).then(|| hist.max() as f64 / 1e3),
        },
        relay_cpu_us_per_message: per(relay_cpu.total_us()),
        relay_user_us_per_message: per(relay_cpu.user_us),
        relay_sys_us_per_message: per(relay_cpu.sys_us),
        clients_cpu_us_per_message: per(clients_cpu.total_us()),
        all_cpu_us_per_message: per(relay_cpu.total_us() + clients_cpu.total_us()),
        relay_wakeups_per_message: per(after.wakeups - before.wakeups),
        relay_reads_per_message: per(after.reads - before.reads),
        relay_writes_per_message: per(after.writes - before.writes),
    };
    eprintln!(
        "floor relay {}: {delivered} of {sent} delivered, {:.0} msg/s, p50 / p99 {:.0} / {:.0} µs, \
         CPU per message {:.1} µs relay, {:.1} µs all",
        sc.name,
        report.throughput_per_sec,
        report.latency_us.p50.unwrap_or(0.0),
        report.latency_us.p99.unwrap_or(0.0),
        report.relay_cpu_us_per_message,
        report.all_cpu_us_per_message
    );
    Ok(report)
}

/// The relay process: `port P`, then `ready` once every pair joined, then forwards until its
/// stdin says `stop` or closes; `stats` on stdin prints `stats {counters}`.
pub fn server_main(pairs: usize, max: Duration) -> Result<()> {
    let deadline = Instant::now() + max;
    sys::ensure_open_files(2 * pairs as u64 + 64)?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the relay")?;
    sys::set_backlog(&listener, 4096)?;
    listener.set_nonblocking(true)?;
    let mut out = io::stdout().lock();
    writeln!(out, "port {}", listener.local_addr()?.port())?;
    out.flush()?;

    let ep = sys::Epoll::new()?;
    const LISTENER: u64 = u64::MAX;
    const STDIN: u64 = u64::MAX - 1;
    ep.add_input(listener.as_raw_fd(), LISTENER)?;
    let mut senders: Vec<Option<TcpStream>> = (0..pairs).map(|_| None).collect();
    let mut receivers: Vec<Option<TcpStream>> = (0..pairs).map(|_| None).collect();
    let mut events = sys::events(256);
    let mut joined = 0;
    while joined < 2 * pairs {
        let mut s = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    bail!(
                        "relay: {joined} of {} connections within {max:?}",
                        2 * pairs
                    );
                }
                ep.wait(&mut events, Duration::from_millis(100))?;
                continue;
            }
            Err(e) => return Err(e).context("relay: accepting"),
        };
        // The hello comes right after connect: read it blocking, under a deadline.
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut hello = [0u8; 4];
        s.read_exact(&mut hello).context("relay: reading a hello")?;
        let hello = u32::from_le_bytes(hello);
        let pair = (hello & !RECEIVER) as usize;
        let side = if hello & RECEIVER != 0 {
            &mut receivers
        } else {
            &mut senders
        };
        match side.get_mut(pair) {
            Some(slot @ None) => *slot = Some(s),
            Some(Some(_)) => bail!("relay: pair {pair} joined twice"),
            None => bail!("relay: pair {pair} out of range (0..{pairs})"),
        }
        joined += 1;
    }
    ep.delete(listener.as_raw_fd())?;
    drop(listener);
    let senders: Vec<TcpStream> = senders.into_iter().flatten().collect();
    let mut receivers: Vec<TcpStream> = receivers.into_iter().flatten().collect();
    let mut open: Vec<bool> = vec![true; pairs];
    for (pair, s) in senders.iter().enumerate() {
        s.set_read_timeout(None)?;
        s.set_nonblocking(true)?;
        ep.add_input(s.as_raw_fd(), pair as u64)?;
    }
    for r in &receivers {
        r.set_nodelay(true)?;
        // Writes block (a receiver's buffer has room for any window), but never for long.
        r.set_write_timeout(Some(Duration::from_secs(10)))?;
    }
    ep.add_input(io::stdin().as_raw_fd(), STDIN)?;
    writeln!(out, "ready")?;
    out.flush()?;

    let mut stats = RelayStats::default();
    let mut buf = vec![0u8; READ_BYTES];
    let mut commands = Vec::new();
    // Reads from stdin at least the size of its buffer go straight to the pipe.
    let mut stdin_buf = [0u8; 16 * 1024];
    loop {
        if Instant::now() >= deadline {
            bail!("relay: still running after {max:?}");
        }
        let k = ep.wait(&mut events, Duration::from_secs(1))?;
        stats.wakeups += 1;
        for ev in &events[..k] {
            match sys::token(ev) {
                STDIN => {
                    let n = io::stdin().read(&mut stdin_buf).context("relay: stdin")?;
                    if n == 0 {
                        return Ok(());
                    }
                    commands.extend_from_slice(&stdin_buf[..n]);
                    while let Some(end) = commands.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = commands.drain(..=end).collect();
                        match line.trim_ascii() {
                            b"stats" => {
                                stats.cpu = sys::self_cpu();
                                let json = serde_json::to_string(&stats).context("encoding")?;
                                writeln!(out, "stats {json}")?;
                                out.flush()?;
                            }
                            b"stop" => return Ok(()),
                            other => bail!(
                                "relay: unknown command {:?}",
                                String::from_utf8_lossy(other)
                            ),
                        }
                    }
                }
                pair => {
                    let pair = pair as usize;
                    let n = match (&senders[pair]).read(&mut buf) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        // The clients reset their connections when they exit: an end too.
                        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => 0,
                        Err(e) => return Err(e).context("relay: reading a sender"),
                    };
                    stats.reads += 1;
                    if n == 0 {
                        if open[pair] {
                            open[pair] = false;
                            ep.delete(senders[pair].as_raw_fd())?;
                        }
                        continue;
                    }
                    receivers[pair]
                        .write_all(&buf[..n])
                        .context("relay: writing to a receiver")?;
                    stats.writes += 1;
                    stats.bytes += n as u64;
                }
            }
        }
    }
}

/// The client process: `pairs` pairs (numbered from `first`) connected to the relay at `addr`;
/// `ready`, then on `go` (stdin) it sends for `duration` and drains, then `done {report}`.
pub fn clients_main(
    addr: SocketAddr,
    first: usize,
    pairs: usize,
    load: Load,
    duration: Duration,
    max: Duration,
) -> Result<()> {
    let deadline = Instant::now() + max;
    sys::ensure_open_files(2 * pairs as u64 + 64)?;
    let ep = sys::Epoll::new()?;
    let mut senders = Vec::with_capacity(pairs);
    let mut receivers = Vec::with_capacity(pairs);
    for i in 0..pairs {
        let id = (first + i) as u32;
        if id & RECEIVER != 0 {
            bail!("relay clients: pair number {id} too large");
        }
        let mut s = TcpStream::connect(addr).context("relay clients: connecting a sender")?;
        sys::reset_on_close(&s)?;
        s.set_nodelay(true)?;
        s.write_all(&id.to_le_bytes())?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        let mut r = TcpStream::connect(addr).context("relay clients: connecting a receiver")?;
        sys::reset_on_close(&r)?;
        r.write_all(&(id | RECEIVER).to_le_bytes())?;
        r.set_nonblocking(true)?;
        ep.add_input(r.as_raw_fd(), i as u64)?;
        senders.push(s);
        receivers.push(r);
    }
    let mut out = io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    let mut line = String::new();
    io::stdin()
        .lock()
        .read_line(&mut line)
        .context("relay clients: stdin")?;
    if line.trim() != "go" {
        bail!("relay clients: `go` expected, got {:?}", line.trim());
    }

    let cpu0 = sys::self_cpu();
    let start = sys::now_ns();
    let end = start + duration.as_nanos() as u64;
    let mut next_send = vec![0u64; pairs];
    let mut next_recv = vec![0u64; pairs];
    let mut framers: Vec<Framer> = (0..pairs).map(|_| Framer::default()).collect();
    let mut hist = Histogram::default();
    let (mut sent, mut received, mut out_of_order, mut last_receipt) = (0u64, 0u64, 0u64, start);
    let mut batch = Vec::new();

    // Writes `count` consecutive messages of pair `i` in one write.
    let mut send = |senders: &mut [TcpStream], i: usize, count: usize, next: &mut [u64]| {
        batch.clear();
        let now = sys::now_ns();
        for _ in 0..count {
            batch.extend_from_slice(&msg::encode(next[i], now));
            next[i] += 1;
        }
        senders[i]
            .write_all(&batch)
            .context("relay clients: sending")
    };

    let interval_ns = match load {
        Load::Rate(r) => 1e9 / r,
        Load::Flat { .. } => 0.0,
    };
    let mut scheduled = 0u64;
    if let Load::Flat { window } = load {
        for i in 0..pairs {
            send(&mut senders, i, window, &mut next_send)?;
            sent += window as u64;
        }
    }
    let mut sending = true;
    let mut drain_until = u64::MAX;
    let mut events = sys::events(1024);
    let mut buf = vec![0u8; READ_BYTES];
    loop {
        let now = sys::now_ns();
        if sending && now >= end {
            sending = false;
            drain_until = now + DRAIN.as_nanos() as u64;
        }
        if sending && interval_ns > 0.0 {
            // Everything due, in schedule order, at most 1,024 before looking at receipts.
            for _ in 0..1024 {
                let due = start + (scheduled as f64 * interval_ns) as u64;
                if due > sys::now_ns() {
                    break;
                }
                send(&mut senders, scheduled as usize % pairs, 1, &mut next_send)?;
                scheduled += 1;
                sent += 1;
            }
        }
        if !sending && (received >= sent || now >= drain_until) {
            break;
        }
        if Instant::now() >= deadline {
            bail!("relay clients: still running after {max:?}");
        }
        let now = sys::now_ns();
        let wake_at = if !sending {
            drain_until
        } else if interval_ns > 0.0 {
            (start + (scheduled as f64 * interval_ns) as u64).min(end)
        } else {
            end
        };
        let timeout =
            Duration::from_nanos(wake_at.saturating_sub(now)).min(Duration::from_millis(100));
        let k = ep.wait(&mut events, timeout)?;
        for ev in &events[..k] {
            let i = sys::token(ev) as usize;
            let n = match receivers[i].read(&mut buf) {
                Ok(0) => bail!("relay clients: the relay closed receiver {i}"),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e).context("relay clients: receiving"),
            };
            let now = sys::now_ns();
            let mut got = 0;
            let mut bad = false;
            framers[i].feed(&buf[..n], |m| {
                if !msg::is_valid(m) {
                    bad = true;
                    return;
                }
                hist.record(now.saturating_sub(msg::sent_ns(m)));
                let seq = msg::seq(m);
                if seq != next_recv[i] {
                    out_of_order += 1;
                }
                next_recv[i] = seq + 1;
                got += 1;
            });
            if bad {
                bail!("relay clients: receiver {i} got a malformed message");
            }
            received += got;
            last_receipt = now;
            if sending && matches!(load, Load::Flat { .. }) && got > 0 {
                send(&mut senders, i, got as usize, &mut next_send)?;
                sent += got;
            }
        }
    }

    let done = ClientDone {
        sent,
        received,
        out_of_order,
        latency_ns: hist.to_sparse(),
        cpu: sys::self_cpu().since(cpu0),
        start_ns: start,
        last_receipt_ns: last_receipt,
    };
    writeln!(
        out,
        "done {}",
        serde_json::to_string(&done).context("encoding")?
    )?;
    out.flush()?;
    Ok(())
}
