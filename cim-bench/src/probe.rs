//! Readings of the cluster's processes, taken before and after a measured phase: each server's
//! and route's `/healthz` (pid, resident memory, CPU time, open connections) and, given its
//! pid (`--redis-pid`), Redis's CPU time from `/proc`. The differences give memory per
//! connection and CPU per message.
//!
//! Processes are told apart by pid: when several servers or routes run in one process (a
//! test cluster, standalone mode) its memory and CPU are counted once, under "servers" if it
//! runs any server.

use crate::setup::Setup;
use cim_common::registry::ServiceInfo;
use serde::Serialize;
use std::collections::BTreeMap;

/// Which kind of cim process a reading is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Server,
    Route,
}

/// One `/healthz` answer (fields missing from it, or an unreachable member, are `None`).
#[derive(Debug, Clone, Serialize)]
pub struct Reading {
    pub role: Role,
    pub id: String,
    pub pid: Option<u32>,
    pub rss_bytes: Option<u64>,
    pub cpu_ms: Option<u64>,
    pub connections: Option<u64>,
}

/// Every reading at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub readings: Vec<Reading>,
    /// Redis's CPU time (user + system), in milliseconds, when its pid is known.
    pub redis_cpu_ms: Option<u64>,
    /// This bench process's CPU time, in milliseconds.
    pub bench_cpu_ms: Option<u64>,
}

/// CPU time used between two snapshots, in milliseconds (`None`: not measurable).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuUsage {
    /// Processes running a connection server.
    pub servers_ms: Option<u64>,
    /// Processes running routes only.
    pub routes_ms: Option<u64>,
    pub redis_ms: Option<u64>,
    /// All of the above.
    pub total_ms: Option<u64>,
    /// This bench process (not in the total): near one core per runtime thread, the load
    /// generator itself limits what is measured.
    pub bench_ms: Option<u64>,
}

/// Growth of the servers' resident memory per connection they gained.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MemoryPerConnection {
    /// Over every server process that gained connections.
    pub bytes_per_connection: Option<f64>,
    pub processes: Vec<ProcessMemory>,
}

/// One server process's share.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessMemory {
    pub pid: Option<u32>,
    pub servers: Vec<String>,
    pub connections: i64,
    pub rss_delta_bytes: i64,
    pub bytes_per_connection: Option<f64>,
}

impl Setup {
    /// Reads every server's and route's `/healthz` (concurrently) and Redis's CPU time.
    pub async fn snapshot(&self, servers: &[ServiceInfo], routes: &[ServiceInfo]) -> Snapshot {
        let probes = servers
            .iter()
            .map(|s| (Role::Server, s.id.as_str(), s.internal_addr.as_str()))
            .chain(
                routes
                    .iter()
                    .map(|r| (Role::Route, r.id.as_str(), r.http_addr.as_str())),
            )
            .map(|(role, id, addr)| self.health(role, id, addr));
        let readings = futures_util::future::join_all(probes).await;
        Snapshot {
            readings,
            redis_cpu_ms: self.redis_cpu_ms(),
            bench_cpu_ms: cim_common::procinfo::self_usage().map(|u| u.cpu_ms),
        }
    }

    async fn health(&self, role: Role, id: &str, addr: &str) -> Reading {
        let body: Option<serde_json::Value> = async {
            self.http
                .get(format!("http://{addr}/healthz"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()
        }
        .await;
        let field = |name: &str| body.as_ref().and_then(|b| b[name].as_u64());
        Reading {
            role,
            id: id.to_string(),
            pid: field("pid").and_then(|p| u32::try_from(p).ok()),
            rss_bytes: field("rss_bytes"),
            cpu_ms: field("cpu_ms"),
            connections: field("connections"),
        }
    }

    /// Redis's own CPU time, from `/proc/{pid}` of the pids it was given, summed over the
    /// nodes of a cluster (the bench does not talk to Redis; Redis must run on this machine).
    /// None when no pid was given or one of them is gone.
    fn redis_cpu_ms(&self) -> Option<u64> {
        if self.redis_pids.is_empty() {
            return None;
        }
        self.redis_pids
            .iter()
            .map(|&pid| cim_common::procinfo::usage_of(pid).map(|u| u.cpu_ms))
            .sum()
    }
}

/// A process: its pid, or (no pid known) the member's own id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum ProcessKey {
    Pid(u32),
    Member(Role, String),
}

fn key(r: &Reading) -> ProcessKey {
    r.pid
        .map_or_else(|| ProcessKey::Member(r.role, r.id.clone()), ProcessKey::Pid)
}

/// One reading per process: the one from the lowest (role, id), so that the same member
/// represents the process before and after.
fn per_process(s: &Snapshot) -> BTreeMap<ProcessKey, (Role, &Reading)> {
    let mut out: BTreeMap<ProcessKey, (Role, &Reading)> = BTreeMap::new();
    for r in &s.readings {
        out.entry(key(r))
            .and_modify(|(role, rep)| {
                *role = (*role).min(r.role);
                if (r.role, &r.id) < (rep.role, &rep.id) {
                    *rep = r;
                }
            })
            .or_insert((r.role, r));
    }
    out
}

/// CPU used between `before` and `after`, per kind of process.
pub fn cpu_delta(before: &Snapshot, after: &Snapshot) -> CpuUsage {
    let before_map = per_process(before);
    let mut servers = None;
    let mut routes = None;
    for (k, (role, a)) in per_process(after) {
        let Some((_, b)) = before_map.get(&k) else {
            continue;
        };
        // The same member must represent the process both times (its cpu_ms is the
        // process's either way, but a member that vanished in between tells nothing).
        let (Some(cb), Some(ca)) = (b.cpu_ms, a.cpu_ms) else {
            continue;
        };
        let sum = match role {
            Role::Server => &mut servers,
            Role::Route => &mut routes,
        };
        *sum = Some(sum.unwrap_or(0) + ca.saturating_sub(cb));
    }
    let delta = |a: Option<u64>, b: Option<u64>| a.zip(b).map(|(a, b)| a.saturating_sub(b));
    let redis = delta(after.redis_cpu_ms, before.redis_cpu_ms);
    let parts = [servers, routes, redis];
    let total = parts
        .iter()
        .any(Option::is_some)
        .then(|| parts.iter().flatten().sum());
    CpuUsage {
        servers_ms: servers,
        routes_ms: routes,
        redis_ms: redis,
        total_ms: total,
        bench_ms: delta(after.bench_cpu_ms, before.bench_cpu_ms),
    }
}

/// Growth of each server process's memory over the connections its servers gained.
pub fn memory_delta(before: &Snapshot, after: &Snapshot) -> MemoryPerConnection {
    let conns = |s: &Snapshot, k: &ProcessKey| -> Option<i64> {
        s.readings
            .iter()
            .filter(|r| r.role == Role::Server && &key(r) == k)
            .map(|r| r.connections.map(|c| c as i64))
            .sum()
    };
    let before_map = per_process(before);
    let mut processes = Vec::new();
    for (k, (role, a)) in per_process(after) {
        let Some((_, b)) = before_map.get(&k) else {
            continue;
        };
        if role != Role::Server {
            continue;
        }
        let (Some(rb), Some(ra), Some(cb), Some(ca)) = (
            b.rss_bytes,
            a.rss_bytes,
            conns(before, &k),
            conns(after, &k),
        ) else {
            continue;
        };
        let connections = ca - cb;
        let rss_delta_bytes = ra as i64 - rb as i64;
        let mut servers: Vec<String> = after
            .readings
            .iter()
            .filter(|r| r.role == Role::Server && key(r) == k)
            .map(|r| r.id.clone())
            .collect();
        servers.sort();
        processes.push(ProcessMemory {
            pid: a.pid,
            servers,
            connections,
            rss_delta_bytes,
            bytes_per_connection: (connections > 0)
                .then(|| rss_delta_bytes as f64 / connections as f64),
        });
    }
    let (rss, conns): (i64, i64) = processes
        .iter()
        .filter(|p| p.connections > 0)
        .fold((0, 0), |(r, c), p| {
            (r + p.rss_delta_bytes, c + p.connections)
        });
    MemoryPerConnection {
        bytes_per_connection: (conns > 0).then(|| rss as f64 / conns as f64),
        processes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(role: Role, id: &str, pid: u32, rss: u64, cpu: u64, conns: u64) -> Reading {
        Reading {
            role,
            id: id.into(),
            pid: Some(pid),
            rss_bytes: Some(rss),
            cpu_ms: Some(cpu),
            connections: (role == Role::Server).then_some(conns),
        }
    }

    #[test]
    fn separate_processes() {
        let before = Snapshot {
            readings: vec![
                reading(Role::Server, "a", 1, 1000, 100, 0),
                reading(Role::Server, "b", 2, 2000, 200, 10),
                reading(Role::Route, "r", 3, 500, 50, 0),
            ],
            redis_cpu_ms: Some(10),
            bench_cpu_ms: Some(1),
        };
        let after = Snapshot {
            readings: vec![
                reading(Role::Server, "a", 1, 3000, 150, 100),
                reading(Role::Server, "b", 2, 4000, 260, 110),
                reading(Role::Route, "r", 3, 600, 80, 0),
            ],
            redis_cpu_ms: Some(25),
            bench_cpu_ms: Some(5),
        };
        let cpu = cpu_delta(&before, &after);
        assert_eq!(cpu.servers_ms, Some(110));
        assert_eq!(cpu.routes_ms, Some(30));
        assert_eq!(cpu.redis_ms, Some(15));
        assert_eq!(cpu.total_ms, Some(155));
        assert_eq!(cpu.bench_ms, Some(4));
        let mem = memory_delta(&before, &after);
        assert_eq!(mem.processes.len(), 2);
        assert_eq!(mem.processes[0].bytes_per_connection, Some(20.0));
        assert_eq!(mem.bytes_per_connection, Some(20.0));
    }

    #[test]
    fn one_process_is_counted_once() {
        // A test cluster: two servers and a route in one process.
        let snap = |rss, cpu, ca, cb| Snapshot {
            readings: vec![
                reading(Role::Route, "r", 7, rss, cpu, 0),
                reading(Role::Server, "b", 7, rss, cpu, cb),
                reading(Role::Server, "a", 7, rss, cpu, ca),
            ],
            redis_cpu_ms: None,
            bench_cpu_ms: None,
        };
        let cpu = cpu_delta(&snap(1000, 100, 0, 0), &snap(5000, 400, 10, 10));
        assert_eq!(cpu.servers_ms, Some(300));
        assert_eq!(cpu.routes_ms, None);
        assert_eq!(cpu.redis_ms, None);
        assert_eq!(cpu.total_ms, Some(300));
        let mem = memory_delta(&snap(1000, 100, 0, 0), &snap(5000, 400, 10, 10));
        assert_eq!(mem.processes.len(), 1);
        assert_eq!(mem.processes[0].servers, ["a", "b"]);
        assert_eq!(mem.processes[0].connections, 20);
        assert_eq!(mem.bytes_per_connection, Some(200.0));
    }

    #[test]
    fn unreachable_members_are_left_out() {
        let before = Snapshot {
            readings: vec![reading(Role::Server, "a", 1, 1000, 100, 0)],
            redis_cpu_ms: None,
            bench_cpu_ms: None,
        };
        let mut gone = reading(Role::Server, "a", 1, 0, 0, 0);
        (gone.pid, gone.rss_bytes, gone.cpu_ms, gone.connections) = (None, None, None, None);
        let after = Snapshot {
            readings: vec![gone],
            redis_cpu_ms: None,
            bench_cpu_ms: None,
        };
        assert_eq!(cpu_delta(&before, &after).total_ms, None);
        assert_eq!(memory_delta(&before, &after).bytes_per_connection, None);
    }
}
