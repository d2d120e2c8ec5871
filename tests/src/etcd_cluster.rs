//! A real multi-member `etcd` cluster on free ports ([`EtcdCluster`]), and [`EtcdNodes`]: the
//! etcd of an [`Infra`](crate::Infra), one process or a cluster.
//!
//! Why a real cluster: production runs etcd with three members and gives the cim registry
//! every endpoint. What one member's death does (the client streams it served break, writes
//! pause while a new leader is elected, leases held by the old leader move) can only be seen
//! against several real `etcd` processes.
//!
//! Each member is an `etcd` child process (a [`ChildGuard`] in a [`ProcessSlot`]) with its own
//! client and peer ports, data dir and log, all in one temporary directory. The members form
//! one cluster from `--initial-cluster` with `--initial-cluster-state new` and a token unique
//! to this cluster, with the short raft timings of [`Etcd`] (heartbeat 50 ms, election
//! 500 ms) so 1 s lease TTLs are honoured. The cluster is ready when every member answers as
//! itself (its unique name), lists all members, knows a leader and serves a linearizable read.
//! When a member exits at start (a port taken meanwhile) the whole start is retried on fresh
//! ports: its peers were told the old address.

use crate::etcd_server::{
    connect, connect_all, member_args, MemberSpec, PROBE_TIMEOUT, START_ATTEMPTS, START_DEADLINE,
};
use crate::process::{
    locate_binary, log_tail, relaunch, report_on_panic, ChildGuard, LaunchError, ProcessSlot,
};
use crate::{wait_until, Etcd};
use anyhow::{anyhow, bail, Context as _};
use std::{net::TcpListener, path::PathBuf, process::Command};
use tempfile::TempDir;

/// One member: its name (unique), ports and current process.
#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    process: ProcessSlot,
}

/// `members` real `etcd` processes forming one cluster; every process is killed (SIGKILL) when
/// this is dropped, and the directory with their data dirs and logs removed.
///
/// Members are numbered `0..members()` in the order of [`EtcdCluster::endpoints`]; a member
/// may be killed and restarted (it rejoins with its data dir on the same ports).
#[derive(Debug)]
pub struct EtcdCluster {
    token: String,
    binary: PathBuf,
    members: Vec<Member>,
    // Declared last: removed after the processes are killed (see Drop).
    dir: TempDir,
}

impl EtcdCluster {
    /// Starts `members` etcd processes as one cluster and waits until every member is ready
    /// (see the module docs). Retries on fresh ports when a member exits at start.
    pub async fn start(members: usize) -> anyhow::Result<EtcdCluster> {
        anyhow::ensure!(members >= 1, "an etcd cluster needs at least one member");
        let binary = locate_binary("etcd", "CIM_TEST_ETCD", "etcd-server")?;
        let dir = tempfile::Builder::new()
            .prefix("cim-test-etcd-cluster-")
            .tempdir()
            .context("creating a temporary directory for the etcd cluster")?;
        let token = format!("c-{:016x}", rand::random::<u64>());
        let members = (0..members)
            .map(|i| Member {
                name: format!("{token}-{i}"),
                client_port: 0,
                peer_port: 0,
                process: ProcessSlot::default(),
            })
            .collect();
        let mut cluster = EtcdCluster {
            token,
            binary,
            members,
            dir,
        };
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            cluster.assign_fresh_ports()?;
            match cluster.launch_all().await {
                Ok(()) => return Ok(cluster),
                Err(LaunchError::Exited(e)) => last = Some(e),
                Err(LaunchError::Other(e)) => return Err(e),
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow!("the etcd cluster did not start"))
            .context(format!("the etcd cluster failed {START_ATTEMPTS} times")))
    }

    /// How many members the cluster has (running or not).
    pub fn members(&self) -> usize {
        self.members.len()
    }

    /// `http://127.0.0.1:{client port}` of every member, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// `http://127.0.0.1:{client port}` of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.member(i).client_port)
    }

    /// The pid of every member, `None` for one that is not running.
    pub fn pids(&self) -> Vec<Option<u32>> {
        self.members.iter().map(|m| m.process.pid()).collect()
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.member(i).process.is_running()
    }

    /// The member name (`--name`) of member `i`, unique per cluster and instance.
    pub fn name(&self, i: usize) -> &str {
        &self.member(i).name
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("data-{i}"))
    }

    /// The file receiving member `i`'s stdout and stderr.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("etcd-{i}.log"))
    }

    /// SIGKILLs member `i` (a crash). Idempotent.
    pub fn kill(&mut self, i: usize) {
        self.member(i).process.kill();
    }

    /// Kills member `i` if it runs, then starts it again on the same ports and data dir: it
    /// rejoins the cluster. Waits until it is ready again (it knows the leader and serves a
    /// linearizable read).
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        let what = format!("etcd member {i}");
        relaunch(&what, self.member(i).client_port, || self.launch_member(i)).await
    }

    /// The index of the current leader: the running member that reports itself as leader.
    /// Right after the leader died there is none until the others elect one (an error then;
    /// poll with [`wait_until`] to wait for the election).
    pub async fn leader(&self) -> anyhow::Result<usize> {
        let mut seen = Vec::new();
        for i in 0..self.members.len() {
            if !self.is_running(i) {
                seen.push(format!("member {i}: not running"));
                continue;
            }
            match own_and_leader_id(&self.endpoint(i)).await {
                Ok((own, leader)) if own == leader => return Ok(i),
                Ok((_, leader)) => seen.push(format!("member {i}: follows {leader:x}")),
                Err(e) => seen.push(format!("member {i}: {e:#}")),
            }
        }
        bail!(
            "no member of the etcd cluster is the leader ({})",
            seen.join("; ")
        )
    }

    /// A client balancing over the members running now, for tests that look at raw keys.
    /// (A client given a dead member's endpoint too, as cim's registry is, sends some calls
    /// to it, which fail at once; see `tests/tests/etcd_cluster.rs`.)
    pub async fn client(&self) -> anyhow::Result<etcd_client::Client> {
        let endpoints: Vec<String> = (0..self.members.len())
            .filter(|&i| self.is_running(i))
            .map(|i| self.endpoint(i))
            .collect();
        anyhow::ensure!(!endpoints.is_empty(), "no member of the etcd cluster runs");
        let endpoints: Vec<&str> = endpoints.iter().map(String::as_str).collect();
        connect_all(&endpoints, START_DEADLINE).await
    }

    fn member(&self, i: usize) -> &Member {
        let n = self.members.len();
        self.members
            .get(i)
            .unwrap_or_else(|| panic!("no etcd member {i}: the cluster has {n}"))
    }

    /// New ports for every member, and no data dir: a failed attempt may have initialised
    /// one with the old peer URLs.
    fn assign_fresh_ports(&mut self) -> anyhow::Result<()> {
        let ports = free_port_list(2 * self.members.len())?;
        for (i, member) in self.members.iter_mut().enumerate() {
            member.client_port = ports[2 * i];
            member.peer_port = ports[2 * i + 1];
        }
        for i in 0..self.members.len() {
            let _ = std::fs::remove_dir_all(self.data_dir(i));
        }
        Ok(())
    }

    /// `name=http://127.0.0.1:peer,...` of every member.
    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&self, i: usize) -> anyhow::Result<()> {
        let member = self.member(i);
        let args = member_args(&MemberSpec {
            name: &member.name,
            data_dir: &self.data_dir(i),
            client_port: member.client_port,
            peer_port: member.peer_port,
            initial_cluster: &self.initial_cluster(),
            token: &self.token,
        });
        let mut cmd = Command::new(&self.binary);
        cmd.args(args).current_dir(self.dir.path());
        let name = format!("etcd:{}:{i}", member.client_port);
        member
            .process
            .set(ChildGuard::spawn(name, cmd, &self.log_path(i))?);
        Ok(())
    }

    /// Spawns every member and waits until all are ready; kills them all on failure.
    async fn launch_all(&self) -> Result<(), LaunchError> {
        let all: Vec<usize> = (0..self.members.len()).collect();
        let result = self.launch(&all).await;
        if result.is_err() {
            for member in &self.members {
                member.process.kill();
            }
        }
        result
    }

    /// Spawns member `i` alone (a restart) and waits until it is ready.
    async fn launch_member(&self, i: usize) -> Result<(), LaunchError> {
        self.launch(&[i]).await
    }

    /// Spawns the members `which` and waits until each is ready or one exits.
    async fn launch(&self, which: &[usize]) -> Result<(), LaunchError> {
        for &i in which {
            self.spawn(i).map_err(LaunchError::Other)?;
        }
        let exited = || which.iter().copied().find(|&i| !self.is_running(i));
        let ready = wait_until(
            &format!("etcd members {which:?} to be ready"),
            START_DEADLINE,
            || async {
                if exited().is_some() {
                    return true;
                }
                for &i in which {
                    if !self.is_ready(i).await {
                        return false;
                    }
                }
                true
            },
        )
        .await;
        match (ready, exited()) {
            (Ok(()), None) => Ok(()),
            (_, Some(i)) => Err(LaunchError::Exited(anyhow!(
                "etcd member {i} exited at start on ports {}/{}; {}",
                self.member(i).client_port,
                self.member(i).peer_port,
                self.logs(&[i])
            ))),
            (Err(e), None) => {
                for &i in which {
                    self.member(i).process.kill();
                }
                Err(LaunchError::Other(e.context(self.logs(which))))
            }
        }
    }

    /// Whether member `i` answers as itself, lists every member, knows a leader and serves a
    /// linearizable read (which needs a quorum).
    async fn is_ready(&self, i: usize) -> bool {
        let member = self.member(i);
        let endpoint = self.endpoint(i);
        let probe = async {
            let mut client = connect(&endpoint, PROBE_TIMEOUT).await.ok()?;
            let status = client.status().await.ok()?;
            // Before the first election a read would hang until the probe's deadline.
            if status.leader() == 0 {
                return Some(false);
            }
            let own = status.header()?.member_id();
            let list = client.member_list().await.ok()?;
            let me = list.members().iter().find(|m| m.id() == own)?;
            client.get("cim-tests-probe", None).await.ok()?;
            Some(me.name() == member.name && list.members().len() == self.members.len())
        };
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, probe).await,
            Ok(Some(true))
        )
    }

    fn logs(&self, which: &[usize]) -> String {
        which
            .iter()
            .map(|&i| {
                format!(
                    "log of member {i} {}:\n{}",
                    self.log_path(i).display(),
                    log_tail(&self.log_path(i), 20)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for (i, member) in self.members.iter().enumerate() {
            report_on_panic(
                &format!("etcd member {i} on port {}", member.client_port),
                &self.log_path(i),
            );
            member.process.kill();
        }
    }
}

/// The member id of the etcd at `endpoint` and the id of the leader it knows (0: none).
async fn own_and_leader_id(endpoint: &str) -> anyhow::Result<(u64, u64)> {
    let probe = async {
        let mut client = connect(endpoint, PROBE_TIMEOUT).await?;
        let status = client
            .status()
            .await
            .with_context(|| format!("status of {endpoint}"))?;
        let own = status
            .header()
            .with_context(|| format!("status of {endpoint} without a header"))?
            .member_id();
        anyhow::Ok((own, status.leader()))
    };
    tokio::time::timeout(PROBE_TIMEOUT, probe)
        .await
        .map_err(|_| anyhow!("status of {endpoint} timed out"))?
}

/// `n` distinct free TCP ports on 127.0.0.1 (all bound at once, so none repeats). Another
/// process may take one before etcd binds it: the start detects that and retries.
fn free_port_list(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// The etcd of an [`Infra`](crate::Infra): one process (what most tests need) or a cluster
/// (tests of a member's death). Both give the endpoints to configure cim with.
#[derive(Debug)]
pub enum EtcdNodes {
    Single(Etcd),
    Cluster(EtcdCluster),
}

impl EtcdNodes {
    /// One [`Etcd`] for `members == 1`, else an [`EtcdCluster`] of `members`.
    pub async fn start(members: usize) -> anyhow::Result<EtcdNodes> {
        match members {
            0 => bail!("etcd needs at least one member"),
            1 => Ok(EtcdNodes::Single(Etcd::start().await?)),
            n => Ok(EtcdNodes::Cluster(EtcdCluster::start(n).await?)),
        }
    }

    /// Every member's endpoint (what `etcd_endpoints` of cim's config lists).
    pub fn endpoints(&self) -> Vec<String> {
        match self {
            EtcdNodes::Single(etcd) => vec![etcd.endpoint()],
            EtcdNodes::Cluster(cluster) => cluster.endpoints(),
        }
    }

    /// The endpoint of the single etcd, or of a cluster's member 0.
    pub fn endpoint(&self) -> String {
        match self {
            EtcdNodes::Single(etcd) => etcd.endpoint(),
            EtcdNodes::Cluster(cluster) => cluster.endpoint(0),
        }
    }

    /// The pid of the single etcd, or of a cluster's member 0 (see [`EtcdCluster::pids`]).
    pub fn pid(&self) -> Option<u32> {
        match self {
            EtcdNodes::Single(etcd) => etcd.pid(),
            EtcdNodes::Cluster(cluster) => cluster.pids()[0],
        }
    }

    /// The client port of the single etcd, or of a cluster's member 0.
    pub fn client_port(&self) -> u16 {
        match self {
            EtcdNodes::Single(etcd) => etcd.client_port(),
            EtcdNodes::Cluster(cluster) => cluster.member(0).client_port,
        }
    }

    /// The peer port of the single etcd, or of a cluster's member 0.
    pub fn peer_port(&self) -> u16 {
        match self {
            EtcdNodes::Single(etcd) => etcd.peer_port(),
            EtcdNodes::Cluster(cluster) => cluster.member(0).peer_port,
        }
    }

    /// SIGKILLs every member: etcd is gone. Idempotent.
    pub fn kill(&mut self) {
        match self {
            EtcdNodes::Single(etcd) => etcd.kill(),
            EtcdNodes::Cluster(cluster) => {
                for i in 0..cluster.members() {
                    cluster.kill(i);
                }
            }
        }
    }

    /// The cluster, when this is one.
    pub fn cluster(&self) -> Option<&EtcdCluster> {
        match self {
            EtcdNodes::Cluster(cluster) => Some(cluster),
            EtcdNodes::Single(_) => None,
        }
    }

    /// The cluster, when this is one (to kill and restart members).
    pub fn cluster_mut(&mut self) -> Option<&mut EtcdCluster> {
        match self {
            EtcdNodes::Cluster(cluster) => Some(cluster),
            EtcdNodes::Single(_) => None,
        }
    }

    /// The single etcd, when this is one.
    pub fn single(&self) -> Option<&Etcd> {
        match self {
            EtcdNodes::Single(etcd) => Some(etcd),
            EtcdNodes::Cluster(_) => None,
        }
    }

    /// The single etcd, when this is one (to kill and restart it).
    pub fn single_mut(&mut self) -> Option<&mut Etcd> {
        match self {
            EtcdNodes::Single(etcd) => Some(etcd),
            EtcdNodes::Cluster(_) => None,
        }
    }
}
