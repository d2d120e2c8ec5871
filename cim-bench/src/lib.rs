//! The load generator behind the `cim-bench` binary: four scenarios against a running cluster
//! and one against a single route, each a library function so tests can run it against a test
//! cluster.
//!
//! - [`run_connect`]: opens many connections at a given rate (optionally from several local
//!   IPs), holds them with heartbeats, and reports the connect rate and the servers' memory
//!   per connection.
//! - [`run_p2p`]: pairs of users send private messages across two servers, at a rate or as
//!   fast as a window of outstanding sends allows; reports throughput, one-way latency
//!   percentiles, losses, and the CPU per message of every cim process and (given its pid)
//!   Redis.
//! - [`run_fanout`]: one user sends group messages to many receivers; reports the time until
//!   the last receiver has each message, missing deliveries, and the CPU per delivery. Past
//!   one process's connections, further processes hold receivers only (`receive_only`) and
//!   their per-message wall-clock times merge with the sender's.
//! - [`run_group`]: one member of a stored group (conversations) sends to its online members
//!   at a rate or flat out; reports the time until the last online member has each message,
//!   the Redis CPU per message (flat in the member count), and the catch-up of members that
//!   were offline for all of it.
//! - [`run_login_flood`]: many concurrent wrong-password logins against one route (no API
//!   key or etcd needed), and that route's peak and resident memory before, right after and a
//!   while after (`/proc/{pid}/status`: the route must run on this machine).
//!
//! # How login cost is kept out
//! A [`Setup`] reads the live servers and routes from etcd and logs users in through a
//! route's business API ([`api`], an API key): it creates the accounts `bench-{k}` in bulk as
//! connect-only accounts (no password, so no argon2 hash per account, and nobody can log in
//! to them with one), then, one batch at a time just before the batch connects (connect
//! tokens expire after 30 s), asks the admin connect call for each user's session on the
//! server the scenario chose for it. That is the route's own login (single-login slot,
//! tokens), so the bench needs neither the cluster secret nor Redis, and the logins happen
//! outside the measured phases. `user_offset` moves the range of `k` so several bench
//! processes use different users.
//!
//! # Limits
//! One bench process opens at most [`MAX_CONNECTIONS`] connections: every connection is a file
//! descriptor, and the hard limit here is 20,000 per process. Larger loads run several
//! processes with disjoint `user_offset`s (and, past one local IP's ephemeral ports, with
//! `source_ips`). Every phase has a deadline; at the end every connection is closed, which
//! makes the servers detach the users and free their login slots; the slots of users that
//! never connected are pending ones, which expire with their tokens (and which the next login
//! takes over).
//!
//! Modules: [`api`] (the route's business API), [`setup`] (accounts, logins per batch,
//! opening connections), [`probe`] (`/healthz` of servers and routes, Redis's CPU time from
//! `/proc`), [`report`] (counters, latency summaries, tables), and one module per scenario.

pub mod api;
pub mod connect;
pub mod fanout;
pub mod group;
pub mod login_flood;
pub mod p2p;
pub mod probe;
pub mod report;
pub mod setup;

pub use connect::{run_connect, ConnectOpts, ConnectReport};
pub use fanout::{run_fanout, FanoutOpts, FanoutReport};
pub use group::{run_group, CatchUpReport, GroupOpts, GroupReport};
pub use login_flood::{run_login_flood, LoginFloodOpts, LoginFloodReport};
pub use p2p::{run_p2p, Load, P2pOpts, P2pReport};
pub use setup::{BenchUser, Setup, Target};

use std::{net::IpAddr, time::Duration};

/// Most connections one bench process opens: the per-process limit of 20,000 open files less
/// room for etcd, the route's API, HTTP probes and the runtime.
pub const MAX_CONNECTIONS: usize = 19_000;

/// File descriptors kept for everything that is not a client connection.
const RESERVED_FDS: u64 = 256;

/// How long in-flight messages may still arrive after the sending phase.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Fails unless this process can open `connections` more connections: at most
/// [`MAX_CONNECTIONS`], and the file limit is raised (up to the hard limit) to fit them.
pub fn ensure_fd_capacity(connections: usize) -> anyhow::Result<()> {
    if connections > MAX_CONNECTIONS {
        anyhow::bail!(
            "{connections} connections are more than one bench process opens \
             ({MAX_CONNECTIONS}, under the 20,000 open-file limit): run several cim-bench \
             processes with disjoint --user-offset ranges"
        );
    }
    let needed = connections as u64 + RESERVED_FDS;
    let soft = rlimit::increase_nofile_limit(needed)
        .map_err(|e| anyhow::anyhow!("cannot raise the open-file limit: {e}"))?;
    if soft < needed {
        anyhow::bail!(
            "{connections} connections need {needed} open files, the limit is {soft}: \
             use fewer connections per process"
        );
    }
    Ok(())
}

/// Parses a duration: `500ms`, `30s`, `1.5s`, `2m`, or plain seconds (`10`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (examples: 500ms, 30s, 2m)"))?;
    let secs = value * scale;
    // A day bounds every phase: the bench is never meant to run unattended for longer.
    if !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("`{s}` is out of range (0 to 24 h)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses local IPs to bind: `127.0.0.2-127.0.0.40` (an inclusive IPv4 range),
/// `127.0.0.2,127.0.0.3` (a list), or one address. At most 65,536 addresses.
pub fn parse_ips(s: &str) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((from, to)) = part.split_once('-') {
            let parse = |a: &str| {
                a.trim()
                    .parse::<std::net::Ipv4Addr>()
                    .map_err(|_| format!("`{a}` is not an IPv4 address"))
            };
            let (from, to) = (u32::from(parse(from)?), u32::from(parse(to)?));
            if from > to {
                return Err(format!("`{part}`: the range ends before it starts"));
            }
            if to - from >= 65_536 {
                return Err(format!("`{part}`: more than 65,536 addresses"));
            }
            out.extend((from..=to).map(|ip| IpAddr::from(std::net::Ipv4Addr::from(ip))));
        } else {
            out.push(
                part.parse()
                    .map_err(|_| format!("`{part}` is not an IP address"))?,
            );
        }
        if out.len() > 65_536 {
            return Err("more than 65,536 addresses".into());
        }
    }
    if out.is_empty() {
        return Err("no address given".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("2d").is_err());
        assert!(parse_duration("100000m").is_err());
    }

    #[test]
    fn ip_ranges_and_lists() {
        let ips = parse_ips("127.0.0.2-127.0.0.4").unwrap();
        let want: Vec<IpAddr> = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(ips, want);
        assert_eq!(parse_ips("127.0.0.2, 127.0.0.3").unwrap().len(), 2);
        assert_eq!(parse_ips("127.0.0.255-127.0.1.0").unwrap().len(), 2);
        assert!(parse_ips("127.0.0.4-127.0.0.2").is_err());
        assert!(parse_ips("127.0.0.0-127.1.0.0").is_err());
        assert!(parse_ips("nonsense").is_err());
        assert!(parse_ips("").is_err());
    }

    #[test]
    fn capacity_is_capped_per_process() {
        let err = ensure_fd_capacity(MAX_CONNECTIONS + 1).unwrap_err();
        assert!(err.to_string().contains("--user-offset"), "{err}");
    }
}
