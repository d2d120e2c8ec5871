//! A real Redis Cluster: `redis-server` nodes in cluster mode on free ports, joined by
//! `redis-cli --cluster create`, for tests of cim against a sharded Redis and of failover.
//!
//! Every node is a [`Redis`](crate::Redis)-like child process (same arguments, same
//! readiness check against *our* pid, same logs) with `--cluster-enabled yes`, its own
//! client port and cluster-bus port (both picked free; the bus port is set with
//! `--cluster-port` rather than left at port + 10000, which may be taken or out of range),
//! and its own subdirectory (`node-{i}`: `nodes.conf`, AOF, `redis.log`) of one temporary
//! directory. The node timeout is short ([`NODE_TIMEOUT_MS`]) so that a failover takes
//! seconds. `redis-cli` is found like `redis-server`: `CIM_TEST_REDIS_CLI`, else `PATH`
//! (Debian package `redis-tools`).
//!
//! Nodes are addressed by index (`0..len()`), in start order; which of them are masters is
//! read from the cluster after the create, and changes with failovers ([`RedisCluster::nodes`]).

use crate::process::{locate_binary, log_tail, relaunch, report_on_panic, ChildGuard};
use crate::process::{LaunchError, ProcessSlot};
use crate::redis_server::{
    launch_server, server_args, LOG_FILE, PROBE_TIMEOUT, START_ATTEMPTS, START_DEADLINE,
};
use crate::wait_until;
use anyhow::{anyhow, bail, Context as _};
use redis::aio::MultiplexedConnection;
use std::{
    ffi::OsString,
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
    time::Duration,
};
use tempfile::TempDir;

/// `cluster-node-timeout`: how long a node may not answer before it is considered failing.
/// Short so that failover tests take seconds (detection plus election take about 2–3 times
/// this), long enough that a loaded 2-core machine does not flap.
pub const NODE_TIMEOUT_MS: u64 = 1000;
/// Slots of a Redis Cluster.
const SLOTS: u32 = 16384;
/// How long `redis-cli --cluster create` plus the cluster's convergence may take.
const CLUSTER_DEADLINE: Duration = Duration::from_secs(30);
/// How long [`RedisCluster::wait_for_failover`] waits for a replica to take over.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(20);
/// The log of `redis-cli --cluster create`, in the cluster's directory.
const CREATE_LOG: &str = "cluster-create.log";

/// Options of [`RedisCluster::start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisClusterOptions {
    /// Masters (shards), at least 3 (`redis-cli --cluster create` refuses fewer). Default 3.
    pub masters: usize,
    /// Replicas per master. Default 0.
    pub replicas: usize,
    /// Persist with the append-only file (`appendfsync always`), as [`crate::RedisOptions::aof`]:
    /// a node's acknowledged writes survive [`RedisCluster::kill`] + [`RedisCluster::restart`].
    pub aof: bool,
}

impl Default for RedisClusterOptions {
    fn default() -> Self {
        Self {
            masters: 3,
            replicas: 0,
            aof: false,
        }
    }
}

/// One node as the cluster sees it now ([`RedisCluster::nodes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisClusterNode {
    /// Its index in the [`RedisCluster`].
    pub index: usize,
    pub port: u16,
    /// Its pid while it runs (`None` after [`RedisCluster::kill`]).
    pub pid: Option<u32>,
    /// The cluster node id (40 hex digits; kept across restarts in `nodes.conf`).
    pub id: String,
    pub is_master: bool,
    /// For a replica: the index of its master.
    pub master: Option<usize>,
    /// For a replica: the node id of its master.
    pub master_id: Option<String>,
}

/// Totals of `INFO commandstats` on one node: commands served and the CPU time spent in them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommandStats {
    /// Sum of `calls` over all commands.
    pub calls: u64,
    /// Sum of `usec` (microseconds executing commands) over all commands.
    pub usec: u64,
}

#[derive(Debug)]
struct Node {
    port: u16,
    bus_port: u16,
    dir: PathBuf,
    /// Read after the create; `nodes.conf` keeps it across restarts.
    id: String,
    process: ProcessSlot,
}

impl Node {
    fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }
}

/// A Redis Cluster of child processes on 127.0.0.1, all SIGKILLed when dropped (also when a
/// test panics: the node logs are printed then). Its directory is removed on drop.
#[derive(Debug)]
pub struct RedisCluster {
    options: RedisClusterOptions,
    server: PathBuf,
    cli: PathBuf,
    nodes: Vec<Node>,
    /// The masters right after the start: the seeds of [`RedisCluster::url`].
    seeds: Vec<usize>,
    /// Each node's master (`None`: a master) when the cluster was last seen settled (start,
    /// [`RedisCluster::wait_ready`], [`RedisCluster::wait_for_failover`]): tells which nodes
    /// replicated a master that has been killed since.
    settled_masters: Mutex<Vec<Option<usize>>>,
    // Declared last: removed after the processes are killed (see Drop).
    dir: TempDir,
}

impl RedisCluster {
    /// Starts `options.masters` masters with `options.replicas` replicas each, creates the
    /// cluster with `redis-cli --cluster create`, and waits until every node reports
    /// `cluster_state:ok` with all 16384 slots assigned and knows every other node, and every
    /// replica's link to its master is up. Retries on fresh ports when a node exits at start.
    pub async fn start(options: RedisClusterOptions) -> anyhow::Result<RedisCluster> {
        if options.masters < 3 {
            bail!(
                "a Redis Cluster needs at least 3 masters, not {}",
                options.masters
            );
        }
        let server = locate_binary("redis-server", "CIM_TEST_REDIS_SERVER", "redis-server")?;
        let cli = locate_binary("redis-cli", "CIM_TEST_REDIS_CLI", "redis-tools")?;
        let dir = tempfile::Builder::new()
            .prefix("cim-test-redis-cluster-")
            .tempdir()
            .context("creating a temporary directory for the redis cluster")?;
        let mut cluster = RedisCluster {
            options,
            server,
            cli,
            nodes: Vec::new(),
            seeds: Vec::new(),
            settled_masters: Mutex::new(Vec::new()),
            dir,
        };
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            match cluster.try_start().await {
                Ok(()) => return Ok(cluster),
                Err(LaunchError::Exited(e)) => {
                    cluster.kill_all();
                    last = Some(e);
                }
                Err(LaunchError::Other(e)) => return Err(e),
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow!("the redis cluster did not start"))
            .context(format!("the redis cluster failed {START_ATTEMPTS} times")))
    }

    /// `redis+cluster://127.0.0.1:p1,127.0.0.1:p2,...`: the masters of the start as seed
    /// nodes (the form cim's `redis_url` takes for a cluster). Seeds only: after a failover
    /// one of them may be a replica or down, which a cluster client copes with.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .seeds
            .iter()
            .map(|&i| format!("127.0.0.1:{}", self.nodes[i].port))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    pub fn options(&self) -> RedisClusterOptions {
        self.options
    }

    /// Number of nodes (masters and replicas).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: a cluster has at least 3 nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The client port of node `i`. Panics if `i >= len()`.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    /// The pid of node `i` while it runs. Panics if `i >= len()`.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].process.pid()
    }

    /// The pids of all running nodes (e.g. to sum their CPU time).
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(|n| n.process.pid()).collect()
    }

    /// Whether node `i` runs. Panics if `i >= len()`.
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].process.is_running()
    }

    /// The cluster node id of node `i`. Panics if `i >= len()`.
    pub fn node_id(&self, i: usize) -> &str {
        &self.nodes[i].id
    }

    /// The cluster's directory (one `node-{i}` subdirectory per node, the create log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The file receiving node `i`'s stdout and stderr. Panics if `i >= len()`.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.nodes[i].log_path()
    }

    /// Every node with its current role: a running node as it sees itself, a killed one as
    /// the first running node sees it.
    pub async fn nodes(&self) -> anyhow::Result<Vec<RedisClusterNode>> {
        let mut views = Vec::with_capacity(self.nodes.len());
        for (i, node) in self.nodes.iter().enumerate() {
            views.push(match node.process.is_running() {
                true => Some(self.cluster_nodes(i).await?),
                false => None,
            });
        }
        let any_view = views
            .iter()
            .flatten()
            .next()
            .ok_or_else(|| anyhow!("no node of the redis cluster runs"))?;
        let mut out = Vec::with_capacity(self.nodes.len());
        for (i, node) in self.nodes.iter().enumerate() {
            let line = match &views[i] {
                Some(own) => own.iter().find(|l| l.has_flag("myself")),
                None => any_view.iter().find(|l| l.id == node.id),
            }
            .ok_or_else(|| anyhow!("node {i} (port {}) is not in CLUSTER NODES", node.port))?;
            let master = match &line.master_id {
                Some(id) => Some(self.index_of_id(id)?),
                None => None,
            };
            out.push(RedisClusterNode {
                index: i,
                port: node.port,
                pid: node.process.pid(),
                id: node.id.clone(),
                is_master: line.has_flag("master"),
                master,
                master_id: line.master_id.clone(),
            });
        }
        Ok(out)
    }

    /// A cluster client connection seeded with every running node: routes each command by its
    /// key's slot and follows MOVED / topology changes (for tests that look at raw keys).
    pub async fn connection(&self) -> anyhow::Result<redis::cluster_async::ClusterConnection> {
        let seeds: Vec<String> = (0..self.nodes.len())
            .filter(|&i| self.is_running(i))
            .map(|i| format!("redis://127.0.0.1:{}", self.nodes[i].port))
            .collect();
        let client = redis::cluster::ClusterClient::new(seeds.clone())
            .with_context(|| format!("a cluster client for {seeds:?}"))?;
        tokio::time::timeout(START_DEADLINE, client.get_async_connection())
            .await
            .map_err(|_| anyhow!("connecting to the redis cluster {seeds:?} timed out"))?
            .with_context(|| format!("connecting to the redis cluster {seeds:?}"))
    }

    /// A plain connection to node `i` alone (CLUSTER and INFO commands of one shard; keys of
    /// other slots answer MOVED). Panics if `i >= len()`.
    pub async fn node_connection(&self, i: usize) -> anyhow::Result<MultiplexedConnection> {
        let url = format!("redis://127.0.0.1:{}", self.nodes[i].port);
        let client = redis::Client::open(url.as_str())?;
        tokio::time::timeout(START_DEADLINE, client.get_multiplexed_async_connection())
            .await
            .map_err(|_| anyhow!("connecting to redis cluster node {i} at {url} timed out"))?
            .with_context(|| format!("connecting to redis cluster node {i} at {url}"))
    }

    /// The index of the master serving `key`'s slot now, as the first running node sees it.
    pub async fn master_for_key(&self, key: &str) -> anyhow::Result<usize> {
        let i = self.first_running()?;
        let mut c = self.node_connection(i).await?;
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut c)
            .await
            .with_context(|| format!("CLUSTER KEYSLOT {key:?} on node {i}"))?;
        let view = self.cluster_nodes(i).await?;
        let owner = view
            .iter()
            .find(|l| l.has_flag("master") && l.serves(slot))
            .ok_or_else(|| anyhow!("node {i} knows no master for slot {slot} (key {key:?})"))?;
        self.index_of_id(&owner.id)
    }

    /// SIGKILLs node `i` (a crash: no shutdown save). Idempotent. Panics if `i >= len()`.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].process.kill();
    }

    /// Kills node `i` if it runs, then starts it again on the same ports and directory and
    /// waits until it answers. With its `nodes.conf` it rejoins the cluster by itself (a
    /// master that was failed over comes back as a replica of its successor); without AOF it
    /// comes back empty. Use [`RedisCluster::wait_ready`] to wait until it has rejoined.
    /// Panics if `i >= len()`.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        relaunch("redis-server", self.nodes[i].port, || self.launch_node(i)).await
    }

    /// Waits until every running node reports `cluster_state:ok` with all slots assigned and
    /// knows every node, and every running replica's link to its master is up.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let what = format!("the redis cluster in {} to be ready", self.dir().display());
        wait_until(&what, CLUSTER_DEADLINE, || self.is_ready()).await?;
        self.settle().await
    }

    /// Waits until a replica of the killed master `killed` has become master and every
    /// running node reports `cluster_state:ok` and no longer gives `killed` any slot; returns
    /// the new master's index. `killed` must have been a master with a replica when the
    /// cluster was last settled (start, [`RedisCluster::wait_ready`]).
    pub async fn wait_for_failover(&self, killed: usize) -> anyhow::Result<usize> {
        if self.is_running(killed) {
            bail!("node {killed} still runs: kill it before waiting for its failover");
        }
        let candidates: Vec<usize> = self
            .settled()
            .iter()
            .enumerate()
            .filter(|(_, m)| **m == Some(killed))
            .map(|(i, _)| i)
            .collect();
        if candidates.is_empty() {
            bail!("node {killed} had no replica to fail over to");
        }
        // A Mutex rather than a Cell keeps this future Send.
        let promoted = Mutex::new(None);
        let what = format!("a replica ({candidates:?}) of node {killed} to take over");
        wait_until(&what, FAILOVER_DEADLINE, || async {
            let found = self.failed_over(killed, &candidates).await;
            *promoted.lock().unwrap_or_else(|e| e.into_inner()) = found;
            found.is_some()
        })
        .await?;
        self.settle().await?;
        let promoted = promoted.into_inner().unwrap_or_else(|e| e.into_inner());
        promoted.ok_or_else(|| anyhow!("no replica of node {killed} took over"))
    }

    /// Totals of `INFO commandstats` of node `i` (including the INFO calls themselves and the
    /// testkit's readiness probes; see [`RedisCluster::reset_stats`]). Panics if `i >= len()`.
    pub async fn commandstats(&self, i: usize) -> anyhow::Result<CommandStats> {
        let mut c = self.node_connection(i).await?;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut c)
            .await
            .with_context(|| format!("INFO commandstats on node {i}"))?;
        Ok(parse_commandstats(&info))
    }

    /// `CONFIG RESETSTAT` on every running node: zeroes the command statistics (e.g. before
    /// a measurement).
    pub async fn reset_stats(&self) -> anyhow::Result<()> {
        for i in (0..self.nodes.len()).filter(|&i| self.is_running(i)) {
            let mut c = self.node_connection(i).await?;
            let _: () = redis::cmd("CONFIG")
                .arg("RESETSTAT")
                .query_async(&mut c)
                .await
                .with_context(|| format!("CONFIG RESETSTAT on node {i}"))?;
        }
        Ok(())
    }

    /// One attempt: fresh ports and directories, nodes up, cluster created and settled.
    async fn try_start(&mut self) -> Result<(), LaunchError> {
        let count = self.options.masters * (1 + self.options.replicas);
        self.nodes = self.fresh_nodes(count).map_err(LaunchError::Other)?;
        for i in 0..count {
            self.launch_node(i).await?;
        }
        self.create().await?;
        let what = format!(
            "the new redis cluster in {} to be ready",
            self.dir().display()
        );
        let ready = wait_until(&what, CLUSTER_DEADLINE, || self.is_ready()).await;
        if let Err(e) = ready {
            return Err(self.launch_error(e.context(self.logs())));
        }
        self.read_ids().await.map_err(LaunchError::Other)?;
        self.settle().await.map_err(LaunchError::Other)?;
        let settled = self.settled();
        self.seeds = (0..count).filter(|&i| settled[i].is_none()).collect();
        if self.seeds.len() != self.options.masters {
            return Err(LaunchError::Other(anyhow!(
                "the redis cluster has {} masters, not {}",
                self.seeds.len(),
                self.options.masters
            )));
        }
        Ok(())
    }

    /// `count` nodes on fresh ports (client and bus), each with an empty directory.
    fn fresh_nodes(&self, count: usize) -> anyhow::Result<Vec<Node>> {
        let ports = free_port_list(2 * count)?;
        let mut nodes = Vec::with_capacity(count);
        for (i, pair) in ports.chunks(2).enumerate() {
            let dir = self.dir.path().join(format!("node-{i}"));
            // A failed attempt's nodes.conf would make the node rejoin that attempt's cluster.
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing {}", dir.display()))?;
            }
            std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
            nodes.push(Node {
                port: pair[0],
                bus_port: pair[1],
                dir,
                id: String::new(),
                process: ProcessSlot::default(),
            });
        }
        Ok(nodes)
    }

    /// Spawns node `i` and waits until it answers as itself.
    async fn launch_node(&self, i: usize) -> Result<(), LaunchError> {
        let node = &self.nodes[i];
        let mut args = server_args(node.port, &node.dir, self.options.aof);
        let timeout = NODE_TIMEOUT_MS.to_string();
        let bus_port = node.bus_port.to_string();
        args.extend(
            [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                &timeout,
                "--cluster-port",
                &bus_port,
                // Replicas sync at once rather than after the default 5 s of waiting for
                // more replicas to share the transfer.
                "--repl-diskless-sync-delay",
                "0",
            ]
            .map(OsString::from),
        );
        launch_server(&self.server, args, node.port, &node.dir, &node.process).await
    }

    /// Runs `redis-cli --cluster create` over all nodes and waits (bounded) for it to exit.
    async fn create(&self) -> Result<(), LaunchError> {
        let log = self.dir.path().join(CREATE_LOG);
        let mut cmd = Command::new(&self.cli);
        cmd.arg("--cluster").arg("create");
        cmd.args(self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
        cmd.args(["--cluster-replicas", &self.options.replicas.to_string()]);
        cmd.arg("--cluster-yes").current_dir(self.dir.path());
        let mut guard = ChildGuard::spawn("redis-cli --cluster create", cmd, &log)
            .map_err(LaunchError::Other)?;
        let mut status = None;
        let exited = wait_until(
            "redis-cli --cluster create to finish",
            CLUSTER_DEADLINE,
            || {
                status = guard.try_exit_status();
                let done = status.is_some();
                async move { done }
            },
        )
        .await;
        let failure = match (exited, status) {
            (Ok(()), Some(s)) if s.success() => return Ok(()),
            (Ok(()), Some(s)) => anyhow!("redis-cli --cluster create failed ({s})"),
            (Err(e), _) => e,
            (Ok(()), None) => anyhow!("redis-cli --cluster create vanished"),
        };
        let failure = failure.context(format!(
            "log {}:\n{}\n{}",
            log.display(),
            log_tail(&log, 20),
            self.logs()
        ));
        Err(self.launch_error(failure))
    }

    /// An error of a start attempt: worth retrying on fresh ports if a node exited meanwhile.
    fn launch_error(&self, e: anyhow::Error) -> LaunchError {
        match self.nodes.iter().any(|n| !n.process.is_running()) {
            true => LaunchError::Exited(e),
            false => LaunchError::Other(e),
        }
    }

    /// The tails of all node logs, for error messages.
    fn logs(&self) -> String {
        let tails: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                format!(
                    "node {i} log {}:\n{}",
                    n.log_path().display(),
                    log_tail(&n.log_path(), 10)
                )
            })
            .collect();
        tails.join("\n")
    }

    /// Whether every running node is ok, fully covered, knows all nodes and (as a replica)
    /// has its master link up.
    async fn is_ready(&self) -> bool {
        for (i, node) in self.nodes.iter().enumerate() {
            if !self.is_running(i) {
                continue;
            }
            match probe(node.port).await {
                Some(s) if s.is_ready(self.nodes.len()) => {}
                _ => return false,
            }
        }
        true
    }

    /// Whether one of `candidates` is master and every running node is ok without `killed`.
    async fn failed_over(&self, killed: usize, candidates: &[usize]) -> Option<usize> {
        let mut promoted = None;
        for &i in candidates {
            if self.is_running(i) && probe(self.nodes[i].port).await?.is_master {
                promoted = Some(i);
                break;
            }
        }
        let killed_id = &self.nodes[killed].id;
        for (i, node) in self.nodes.iter().enumerate() {
            if !self.is_running(i) {
                continue;
            }
            if !probe(node.port).await?.cluster_ok {
                return None;
            }
            let view = tokio::time::timeout(PROBE_TIMEOUT, self.cluster_nodes(i))
                .await
                .ok()?
                .ok()?;
            if view
                .iter()
                .any(|l| &l.id == killed_id && !l.slots.is_empty())
            {
                return None;
            }
        }
        promoted
    }

    /// Records each node's master from the cluster's current view (see `settled_masters`).
    async fn settle(&self) -> anyhow::Result<()> {
        let nodes = self.nodes().await?;
        let mut settled = self
            .settled_masters
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *settled = nodes.iter().map(|n| n.master).collect();
        Ok(())
    }

    fn settled(&self) -> Vec<Option<usize>> {
        self.settled_masters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Asks every node its id (`CLUSTER MYID`).
    async fn read_ids(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            let mut c = self.node_connection(i).await?;
            let id: String = redis::cmd("CLUSTER")
                .arg("MYID")
                .query_async(&mut c)
                .await
                .with_context(|| format!("CLUSTER MYID on node {i}"))?;
            self.nodes[i].id = id;
        }
        Ok(())
    }

    /// `CLUSTER NODES` of node `i`, parsed.
    async fn cluster_nodes(&self, i: usize) -> anyhow::Result<Vec<NodeLine>> {
        let mut c = self.node_connection(i).await?;
        let text: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut c)
            .await
            .with_context(|| format!("CLUSTER NODES on node {i}"))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| NodeLine::parse(l).with_context(|| format!("CLUSTER NODES of node {i}")))
            .collect()
    }

    fn index_of_id(&self, id: &str) -> anyhow::Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.id == id)
            .ok_or_else(|| anyhow!("node id {id} is not one of this cluster's nodes"))
    }

    fn first_running(&self) -> anyhow::Result<usize> {
        (0..self.nodes.len())
            .find(|&i| self.is_running(i))
            .ok_or_else(|| anyhow!("no node of the redis cluster runs"))
    }

    fn kill_all(&mut self) {
        for node in &self.nodes {
            node.process.kill();
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for (i, node) in self.nodes.iter().enumerate() {
            report_on_panic(
                &format!("redis cluster node {i} on port {}", node.port),
                &node.log_path(),
            );
        }
        report_on_panic(
            "redis-cli --cluster create",
            &self.dir.path().join(CREATE_LOG),
        );
        self.kill_all();
    }
}

/// `n` distinct free ports on 127.0.0.1 (all bound at once, then released). Another process
/// may take one before a node binds it: the node exits and the start is retried.
fn free_port_list(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// What one node says about itself (`CLUSTER INFO`, `INFO replication`).
#[derive(Debug)]
struct NodeState {
    cluster_ok: bool,
    slots_assigned: u32,
    known_nodes: usize,
    is_master: bool,
    link_up: bool,
}

impl NodeState {
    fn is_ready(&self, nodes: usize) -> bool {
        self.cluster_ok
            && self.slots_assigned == SLOTS
            && self.known_nodes == nodes
            && (self.is_master || self.link_up)
    }
}

/// Asks the node on `port` for its [`NodeState`]; `None` if it does not answer in time.
async fn probe(port: u16) -> Option<NodeState> {
    let probe = async {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
        let mut c = client.get_multiplexed_async_connection().await.ok()?;
        let cluster: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut c)
            .await
            .ok()?;
        let replication: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut c)
            .await
            .ok()?;
        Some(NodeState {
            cluster_ok: info_field(&cluster, "cluster_state") == Some("ok"),
            slots_assigned: info_field(&cluster, "cluster_slots_assigned")?
                .parse()
                .ok()?,
            known_nodes: info_field(&cluster, "cluster_known_nodes")?.parse().ok()?,
            is_master: info_field(&replication, "role") == Some("master"),
            link_up: info_field(&replication, "master_link_status") == Some("up"),
        })
    };
    tokio::time::timeout(PROBE_TIMEOUT, probe).await.ok()?
}

/// The value of `name:value` in an INFO-style text.
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

/// Sums `calls` and `usec` over the `cmdstat_*` lines of `INFO commandstats`.
fn parse_commandstats(info: &str) -> CommandStats {
    let mut total = CommandStats::default();
    for line in info.lines() {
        let Some((_, fields)) = line
            .strip_prefix("cmdstat_")
            .and_then(|rest| rest.split_once(':'))
        else {
            continue;
        };
        for (k, v) in fields.trim().split(',').filter_map(|f| f.split_once('=')) {
            match k {
                "calls" => total.calls += v.parse::<u64>().unwrap_or(0),
                "usec" => total.usec += v.parse::<u64>().unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

/// One line of `CLUSTER NODES`:
/// `<id> <ip:port@cport[,hostname]> <flags> <master|-> <ping> <pong> <epoch> <link> <slot>...`
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeLine {
    id: String,
    flags: Vec<String>,
    master_id: Option<String>,
    /// Served slot ranges, inclusive (migration markers `[...]` left out).
    slots: Vec<(u16, u16)>,
}

impl NodeLine {
    fn parse(line: &str) -> anyhow::Result<NodeLine> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            bail!("malformed CLUSTER NODES line {line:?}");
        }
        let slots = fields[8..]
            .iter()
            .filter(|f| !f.starts_with('['))
            .map(|f| parse_slot_range(f).with_context(|| format!("slots in {line:?}")))
            .collect::<anyhow::Result<_>>()?;
        Ok(NodeLine {
            id: fields[0].to_string(),
            flags: fields[2].split(',').map(str::to_string).collect(),
            master_id: (fields[3] != "-").then(|| fields[3].to_string()),
            slots,
        })
    }

    fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }
}

/// `N` or `N-M`.
fn parse_slot_range(s: &str) -> anyhow::Result<(u16, u16)> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    Ok((a.parse()?, b.parse()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cluster_nodes_lines() {
        let master = NodeLine::parse(
            "07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host \
             myself,master - 0 1426238317239 4 connected 0-5460 7000 [5461->-e7d1eecce]",
        )
        .unwrap();
        assert!(master.has_flag("myself") && master.has_flag("master"));
        assert_eq!(master.master_id, None);
        assert_eq!(master.slots, vec![(0, 5460), (7000, 7000)]);
        assert!(master.serves(0) && master.serves(5460) && master.serves(7000));
        assert!(!master.serves(5461));

        let replica = NodeLine::parse(
            "67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 slave \
             07c37dfeb235213a872192d90877d0cd55635b91 0 1426238316232 2 connected",
        )
        .unwrap();
        assert!(replica.has_flag("slave"));
        assert_eq!(
            replica.master_id.as_deref(),
            Some("07c37dfeb235213a872192d90877d0cd55635b91")
        );
        assert!(replica.slots.is_empty());

        assert!(NodeLine::parse("too short").is_err());
    }

    #[test]
    fn sums_commandstats() {
        let info = "# Commandstats\r\n\
            cmdstat_get:calls=3,usec=12,usec_per_call=4.00,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_cluster|info:calls=2,usec=30,usec_per_call=15.00,rejected_calls=0,failed_calls=0\r\n";
        assert_eq!(
            parse_commandstats(info),
            CommandStats { calls: 5, usec: 42 }
        );
        assert_eq!(parse_commandstats(""), CommandStats::default());
    }

    #[test]
    fn reads_info_fields() {
        let info = "# Cluster\r\ncluster_state:ok\r\ncluster_slots_assigned:16384\r\n";
        assert_eq!(info_field(info, "cluster_state"), Some("ok"));
        assert_eq!(info_field(info, "cluster_slots_assigned"), Some("16384"));
        assert_eq!(info_field(info, "cluster_slots"), None);
    }

    #[tokio::test]
    async fn fewer_than_three_masters_is_refused() {
        let options = RedisClusterOptions {
            masters: 2,
            ..RedisClusterOptions::default()
        };
        let err = RedisCluster::start(options).await.unwrap_err();
        assert!(err.to_string().contains("at least 3 masters"), "{err}");
    }

    #[test]
    fn free_port_list_is_distinct() {
        let mut ports = free_port_list(6).unwrap();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 6);
    }
}
