//! The performance floor of the machine it runs on (issue 22): what the kernel, loopback TCP
//! and Redis cost before any cim code, so that cim's figures can be stated as ratios to it
//! and mean the same on a noisy VM and on real hardware.
//!
//! No tokio, no framework, no protocol (fixed-size 100-byte messages carrying a sequence
//! number and a send timestamp), no storage but Redis in its own scenario: plain sockets and
//! raw epoll through `libc`. Three scenarios, each in its own module:
//! - [`broadcast`]: one process writes one message to each of 10,000 accepted connections —
//!   the floor of a server's group fan-out (CPU per delivery, send → last receipt).
//! - [`relay`]: client → relay → client, one read and one write per hop — the floor of one
//!   process hop of a private message (latency p50/p99 at 1 pair and at 10,000 msg/s over 200
//!   pairs, CPU per message; throughput flat out over 1,000 pairs).
//! - [`redis`]: pipelined HSET then HDEL of a 100-byte value on an AOF Redis — the floor of a
//!   stored and acked message's Redis CPU.
//!
//! # Layout
//! The binary (`main.rs`) parses flags and prints reports; the scenarios are library functions
//! taking the program to re-execute, so the tests run them through the built binary. The
//! other processes of a scenario are this same program under hidden `internal-*`
//! subcommands, driven over stdin/stdout lines ([`child`]); [`sys`] holds every libc call,
//! [`msg`] the message layout, [`hist`] the latency histogram.
//!
//! # Rules every scenario keeps
//! - Every loop is bounded in count and in time (a deadline per process); every child is
//!   killed when its parent's guard drops, and by the kernel when the parent dies
//!   (`PR_SET_PDEATHSIG`).
//! - Only 127.0.0.1; ports are chosen by the kernel. Listeners queue 4,096 connects (std's 128
//!   overflows, and a dropped SYN costs its client a 1 s retransmit); clients close with a
//!   reset (`SO_LINGER` 0), so a run leaves no TIME_WAIT holding ephemeral ports for the next.
//! - Times are `CLOCK_MONOTONIC`, which is system-wide, so a send time taken in one process
//!   and a receipt in another compare directly.

pub mod broadcast;
pub mod child;
pub mod error;
pub mod hist;
pub mod msg;
pub mod redis;
pub mod relay;
pub mod sys;
