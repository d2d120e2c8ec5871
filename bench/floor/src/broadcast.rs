//! **broadcast**: one process writes one 100-byte message to each of N accepted loopback TCP
//! connections (TCP_NODELAY, one blocking `write` per socket, nothing else in the loop), M
//! times, `interval` apart (counted from the moment every receiver had the previous one).
//!
//! Why it is the floor of a server's broadcast: a connection server cannot deliver a frame to
//! N connections with less than one write per connection, and on loopback the writer's
//! `write` also runs the receiver's side of TCP (the softirq runs in the writer's context), so
//! the writer's CPU per delivery here is what the kernel charges a broadcasting server before
//! any code of its own. cim's fan-out (`cim-bench fanout`: server CPU per delivery, send → last
//! receipt) compares with `writer_cpu_us_per_delivery` and `time_to_last_median_ms`.
//!
//! The receivers live in other processes (the program runs itself as `internal-broadcast-client`,
//! `per_process` connections each): 10,000 accepted plus 10,000 connected sockets do not fit
//! under one process's 20,000-file hard limit, and a real broadcast's receivers are elsewhere
//! too. Each client epoll-reads its sockets and notes, per message, how many arrived and the
//! time of the last one (`CLOCK_MONOTONIC`, system-wide); it says `got M` on stdout once every
//! socket has message M, and the parent waits for that from all before the next message. The
//! writer's CPU is `getrusage(RUSAGE_SELF)` around each write loop (user + system), so it
//! excludes accepting, waiting and everything else.

use crate::{
    bail,
    child::Children,
    error::{Context as _, Result},
    msg::{self, Framer, MESSAGE_BYTES},
    sys::{self, Cpu},
};
use serde::{Deserialize, Serialize};
use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

/// Options of [`run`].
#[derive(Debug, Clone)]
pub struct BroadcastOpts {
    /// The program to run as the client processes (this binary).
    pub exe: PathBuf,
    pub connections: usize,
    pub messages: usize,
    /// Pause between one message reaching every receiver and the next write loop.
    pub interval: Duration,
    /// Connections per client process.
    pub per_process: usize,
}

impl BroadcastOpts {
    /// Issue 22's sizes: 10,000 connections (2 client processes of 5,000), 10 messages.
    pub fn new(exe: PathBuf) -> Self {
        Self {
            exe,
            connections: 10_000,
            messages: 10,
            interval: Duration::from_millis(100),
            per_process: 5_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BroadcastReport {
    pub connections: usize,
    pub messages: usize,
    pub message_bytes: usize,
    pub client_processes: usize,
    pub interval_ms: f64,
    pub deliveries: u64,
    pub expected_deliveries: u64,
    pub missing: u64,
    /// The writer's CPU (user + system) per delivery, over the write loops only, µs.
    pub writer_cpu_us_per_delivery: f64,
    pub writer_user_us_per_delivery: f64,
    pub writer_sys_us_per_delivery: f64,
    /// Wall time of one write loop (N writes), median over the messages, ms.
    pub write_loop_median_ms: f64,
    /// First write of a message → the last client's read of it: median and max over the
    /// messages, ms.
    pub time_to_last_median_ms: f64,
    pub time_to_last_max_ms: f64,
    /// The client processes' CPU per delivery (reading), µs: the receivers' share.
    pub clients_cpu_us_per_delivery: f64,
    pub per_message: Vec<MessageFigures>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessageFigures {
    pub number: usize,
    pub write_loop_ms: f64,
    pub writer_cpu_us: u64,
    pub time_to_last_ms: f64,
}

/// What a client process reports at the end (the `done` line).
#[derive(Debug, Serialize, Deserialize)]
struct ClientDone {
    /// Per message: sockets that received it, and when the last one did (ns).
    received: Vec<u64>,
    last_ns: Vec<u64>,
    /// CPU from `ready` to `done`.
    cpu: Cpu,
}

/// Runs the broadcast and returns its figures; every child is gone when it returns.
pub fn run(o: &BroadcastOpts) -> Result<BroadcastReport> {
    if o.connections == 0 || o.messages == 0 || o.per_process == 0 {
        bail!("broadcast: connections, messages and connections per process must be at least 1");
    }
    sys::ensure_open_files(o.connections as u64 + 64)?;
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the broadcast listener")?;
    sys::set_backlog(&listener, 4096)?;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let procs = o.connections.div_ceil(o.per_process);
    eprintln!(
        "floor broadcast: {} connections from {procs} client process(es), {} messages of {MESSAGE_BYTES} bytes",
        o.connections, o.messages
    );

    // Bounded: connecting is ~10k/s here; everything else is a few seconds.
    let max = Duration::from_secs(120)
        + Duration::from_millis(o.connections as u64 / 5)
        + (o.interval + Duration::from_secs(2)) * o.messages as u32;
    let mut children = Children::default();
    let mut ids = Vec::new();
    for p in 0..procs {
        let n = o.per_process.min(o.connections - p * o.per_process);
        let mut cmd = Command::new(&o.exe);
        cmd.arg("internal-broadcast-client")
            .arg("--addr")
            .arg(addr.to_string())
            .arg("--connections")
            .arg(n.to_string())
            .arg("--messages")
            .arg(o.messages.to_string())
            .arg("--max-secs")
            .arg(max.as_secs().to_string());
        ids.push(children.spawn(format!("broadcast client {p}"), cmd)?);
    }

    let mut sockets = accept_all(&listener, o.connections, &mut children, max)?;
    drop(listener);
    children.expect(&ids, "ready", Duration::from_secs(60))?;

    let mut per_message = Vec::with_capacity(o.messages);
    let mut writer = Cpu::default();
    let mut first_write_ns = Vec::with_capacity(o.messages);
    for m in 0..o.messages {
        let t0 = sys::now_ns();
        let message = msg::encode(m as u64, t0);
        let c0 = sys::self_cpu();
        for s in &mut sockets {
            s.write_all(&message)
                .context("writing a broadcast message")?;
        }
        let cpu = sys::self_cpu().since(c0);
        let t1 = sys::now_ns();
        writer = writer.add(cpu);
        first_write_ns.push(t0);
        per_message.push(MessageFigures {
            number: m,
            write_loop_ms: (t1 - t0) as f64 / 1e6,
            writer_cpu_us: cpu.total_us(),
            time_to_last_ms: 0.0,
        });
        let got = children.expect(&ids, "got", Duration::from_secs(60))?;
        if let Some(other) = got.iter().find(|g| **g != m.to_string()) {
            bail!("a broadcast client completed message {other} while {m} was awaited");
        }
        if m + 1 < o.messages && !o.interval.is_zero() {
            std::thread::sleep(o.interval);
        }
    }

    let done = children.expect(&ids, "done", Duration::from_secs(60))?;
    children.finish(Duration::from_secs(30))?;
    let mut deliveries = 0;
    let mut last_ns = vec![0u64; o.messages];
    let mut clients = Cpu::default();
    for line in &done {
        let d: ClientDone = serde_json::from_str(line).context("a broadcast client's report")?;
        if d.received.len() != o.messages || d.last_ns.len() != o.messages {
            bail!(
                "a broadcast client reported {} messages, not {}",
                d.received.len(),
                o.messages
            );
        }
        deliveries += d.received.iter().sum::<u64>();
        for (last, &t) in last_ns.iter_mut().zip(&d.last_ns) {
            *last = (*last).max(t);
        }
        clients = clients.add(d.cpu);
    }
    for (f, (&last, &t0)) in per_message
        .iter_mut()
        .zip(last_ns.iter().zip(&first_write_ns))
    {
        f.time_to_last_ms = last.saturating_sub(t0) as f64 / 1e6;
    }

    let expected = (o.connections * o.messages) as u64;
    let per = |us: u64| us as f64 / expected as f64;
    let mut times: Vec<f64> = per_message.iter().map(|f| f.time_to_last_ms).collect();
    let mut loops: Vec<f64> = per_message.iter().map(|f| f.write_loop_ms).collect();
    let report = BroadcastReport {
        connections: o.connections,
        messages: o.messages,
        message_bytes: MESSAGE_BYTES,
        client_processes: procs,
        interval_ms: o.interval.as_secs_f64() * 1e3,
        deliveries,
        expected_deliveries: expected,
        missing: expected.saturating_sub(deliveries),
        writer_cpu_us_per_delivery: per(writer.total_us()),
        writer_user_us_per_delivery: per(writer.user_us),
        writer_sys_us_per_delivery: per(writer.sys_us),
        write_loop_median_ms: median(&mut loops),
        time_to_last_median_ms: median(&mut times),
        time_to_last_max_ms: times.iter().copied().fold(0.0, f64::max),
        clients_cpu_us_per_delivery: per(clients.total_us()),
        per_message,
    };
    eprintln!(
        "floor broadcast: {:.2} µs writer CPU per delivery, send → last receipt median {:.1} / max {:.1} ms",
        report.writer_cpu_us_per_delivery, report.time_to_last_median_ms, report.time_to_last_max_ms
    );
    Ok(report)
}

/// Accepts `n` connections (TCP_NODELAY, blocking), failing if a client dies or `max` passes.
fn accept_all(
    listener: &TcpListener,
    n: usize,
    children: &mut Children,
    max: Duration,
) -> Result<Vec<TcpStream>> {
    let ep = sys::Epoll::new()?;
    ep.add_input(listener.as_raw_fd(), 0)?;
    let mut events = sys::events(1);
    let deadline = Instant::now() + max;
    let mut sockets = Vec::with_capacity(n);
    while sockets.len() < n {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                sockets.push(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    bail!(
                        "accepted {} of {n} connections within {max:?}",
                        sockets.len()
                    );
                }
                // A client that failed to connect says so on stderr and exits.
                children.check_running()?;
                ep.wait(&mut events, Duration::from_millis(100))?;
            }
            Err(e) => return Err(e).context("accepting a broadcast connection"),
        }
    }
    Ok(sockets)
}

/// Median of `v` (sorted in place); 0 for no values.
pub(crate) fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// The client process: `n` connections to `addr`, receipts of `messages` messages on each;
/// `ready`, then `got M` per completed message, then `done {report}` on stdout.
pub fn client_main(addr: SocketAddr, n: usize, messages: usize, max: Duration) -> Result<()> {
    let deadline = Instant::now() + max;
    sys::ensure_open_files(n as u64 + 64)?;
    let ep = sys::Epoll::new()?;
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let s = TcpStream::connect(addr).with_context(|| format!("connection {i} to {addr}"))?;
        sys::reset_on_close(&s)?;
        s.set_nonblocking(true)?;
        ep.add_input(s.as_raw_fd(), i as u64)?;
        conns.push(s);
    }
    let mut framers: Vec<Framer> = (0..n).map(|_| Framer::default()).collect();
    let mut out = io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    let cpu0 = sys::self_cpu();

    let mut received = vec![0u64; messages];
    let mut last_ns = vec![0u64; messages];
    let (mut total, expected) = (0u64, (n * messages) as u64);
    let mut completed = Vec::new();
    let mut events = sys::events(1024);
    let mut buf = [0u8; 4096];
    while total < expected {
        if Instant::now() >= deadline {
            bail!("broadcast client: {total} of {expected} messages within {max:?}");
        }
        let k = ep.wait(&mut events, Duration::from_millis(200))?;
        for ev in &events[..k] {
            let i = sys::token(ev) as usize;
            let len = match conns[i].read(&mut buf) {
                Ok(0) => bail!("broadcast client: connection {i} closed by the writer"),
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e).context("reading a broadcast message"),
            };
            let now = sys::now_ns();
            let mut bad = None;
            framers[i].feed(&buf[..len], |m| {
                let seq = msg::seq(m) as usize;
                if !msg::is_valid(m) || seq >= messages {
                    bad = Some(seq);
                    return;
                }
                received[seq] += 1;
                last_ns[seq] = last_ns[seq].max(now);
                total += 1;
                if received[seq] == n as u64 {
                    completed.push(seq);
                }
            });
            if let Some(seq) = bad {
                bail!("broadcast client: connection {i} got a malformed message ({seq})");
            }
        }
        for seq in completed.drain(..) {
            writeln!(out, "got {seq}")?;
            out.flush()?;
        }
    }
    let done = ClientDone {
        received,
        last_ns,
        cpu: sys::self_cpu().since(cpu0),
    };
    writeln!(
        out,
        "done {}",
        serde_json::to_string(&done).context("encoding")?
    )?;
    out.flush()?;
    Ok(())
}
