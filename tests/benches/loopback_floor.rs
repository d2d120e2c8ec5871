//! What the machine itself costs, below any cim code: the floor under the performance
//! figures in README (Performance). No cim process runs here; only plain loopback sockets.
//!
//! `cargo bench -p cim-tests --bench loopback_floor` measures
//! - **CPU per small write**: one 120-byte `write` to each of 4,000 loopback TCP sockets,
//!   the shape of a broadcast (one frame per connection). On loopback the writer's syscall
//!   also runs the receiver's side of TCP, so this is what a server pays per delivery before
//!   any work of its own; the reader's `read` is reported too (a client's share).
//! - **Round trip between two threads** over one loopback TCP connection, each blocked in
//!   `read` until the other writes: two wake-ups per round trip, the cost every hop of a
//!   message (client → server → route → Redis → route → server → client) pays at low load.
//!
//! CPU time comes from `/proc/self/stat` (10 ms ticks: the rounds are sized to be long
//! enough). Under `cargo test` it runs as a smoke test with 50 sockets and 100 round trips,
//! checking that every byte arrives.

use cim_common::procinfo::self_usage;
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

const MESSAGE: [u8; 120] = [7; 120];

fn cpu_ms() -> u64 {
    self_usage().expect("/proc/self/stat").cpu_ms
}

/// `n` connected pairs (server side, client side) with Nagle off.
fn pairs(n: usize) -> (Vec<TcpStream>, Vec<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let mut servers = Vec::with_capacity(n);
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(TcpStream::connect(addr).expect("connect"));
        let (s, _) = listener.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        servers.push(s);
    }
    (servers, clients)
}

/// CPU µs per write and per read over `rounds` rounds of one write to each socket.
fn write_cost(sockets: usize, rounds: usize) -> (f64, f64) {
    let (mut servers, mut clients) = pairs(sockets);
    let mut buf = [0u8; MESSAGE.len()];
    let (mut write_ms, mut read_ms) = (0, 0);
    for _ in 0..rounds {
        let t0 = cpu_ms();
        for s in &mut servers {
            s.write_all(&MESSAGE).expect("write");
        }
        let t1 = cpu_ms();
        for c in &mut clients {
            c.read_exact(&mut buf).expect("read");
            assert_eq!(buf, MESSAGE);
        }
        write_ms += t1 - t0;
        read_ms += cpu_ms() - t1;
    }
    let per = |ms: u64| ms as f64 * 1000.0 / (sockets * rounds) as f64;
    (per(write_ms), per(read_ms))
}

/// Median and 99th percentile of `n` round trips between two threads, and the CPU µs (both
/// threads) per round trip.
fn round_trips(n: usize) -> (Duration, Duration, f64) {
    let (mut servers, mut clients) = pairs(1);
    let mut server = servers.pop().expect("one pair");
    let mut client = clients.pop().expect("one pair");
    client.set_nodelay(true).expect("nodelay");
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; MESSAGE.len()];
        for _ in 0..n {
            server.read_exact(&mut buf).expect("echo read");
            server.write_all(&buf).expect("echo write");
        }
    });
    let mut buf = [0u8; MESSAGE.len()];
    let mut times = Vec::with_capacity(n);
    let cpu_before = cpu_ms();
    for _ in 0..n {
        let start = Instant::now();
        client.write_all(&MESSAGE).expect("write");
        client.read_exact(&mut buf).expect("read");
        times.push(start.elapsed());
        assert_eq!(buf, MESSAGE);
    }
    echo.join().expect("echo thread");
    let cpu = (cpu_ms() - cpu_before) as f64 * 1000.0 / n as f64;
    times.sort_unstable();
    (times[n / 2], times[n * 99 / 100], cpu)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test` runs this as a smoke test.
    let full = std::env::args().any(|a| a == "--bench");
    let (sockets, rounds, trips) = if full {
        (4_000, 50, 20_000)
    } else {
        (50, 1, 100)
    };
    let (write, read) = write_cost(sockets, rounds);
    println!(
        "loopback TCP, {sockets} sockets × {rounds} rounds: {write:.2} µs CPU per 120-byte write \
         (receiver's TCP side included), {read:.2} µs per read"
    );
    let (p50, p99, cpu) = round_trips(trips);
    println!(
        "round trip between two threads blocked in read, {trips} trips: p50 {:.1} µs, p99 {:.1} µs, \
         {cpu:.1} µs CPU (two wake-ups, two writes, two reads each)",
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );
}
