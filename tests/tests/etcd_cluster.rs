//! A real 3-member etcd cluster ([`EtcdCluster`]) and what cim does when one member dies.
//!
//! Production gives the registry every etcd endpoint. Two deaths matter:
//! - **the leader**: writes (grants, puts, revokes) pause until the others elect a new one
//!   (a write sent in the first ~0.5 s goes to a follower that forwards it to the dead leader
//!   and is lost: it fails only at the call deadline), and every lease keep-alive goes
//!   through the leader whichever member its stream is on;
//! - **the member serving the registry's streams** (found through etcd's metrics): the watch
//!   and keep-alive streams on it break and must be opened again on another member.
//!
//! And as long as a member is down, etcd-client's balancer keeps handing it calls (tonic's
//! lazy connection to it reports itself ready and fails each call at once with
//! `Unavailable`): a quarter of the calls of a client given all three endpoints fail, unless
//! the caller tries again.
//!
//! After either death, a registration made before stays listed (its key is never deleted:
//! its create revision is unchanged) for 3 lease TTLs, a new registration is seen by a
//! watcher started before the kill, a deregistration is seen, and a registration dropped
//! without deregistering leaves after its TTL. Every member dying in turn (restarted before
//! the next) shows the same whichever members the streams were on. Then a whole cim cluster
//! whose servers and routes use the 3 members loses the etcd leader and goes on: logins,
//! a new server, messages. The tests print what they measure (`--nocapture`): how long a
//! start and a restart take, when a new leader is known, when writes work again.

use cim_common::registry::{
    self, EtcdRegistry, Members, MembersRx, Registration, Registry, ServiceInfo, ServiceKind,
};
use cim_sdk::{pb::SendStatus, Transport};
use cim_tests::{
    cluster::{Cluster, ServerNode},
    member_ids as ids, unique_prefix, wait_until, EtcdCluster,
};
use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

/// Lease TTL of the registrations. The testkit's etcd grants 1 s, and the tests pass with
/// it, but a keep-alive every 333 ms leaves little room on a loaded 2-core machine: 2 s
/// keeps the margin while staying far below production's 10 s.
const TTL: Duration = Duration::from_secs(2);
/// Deadline of every registry call (what the cim backends use in tests).
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline of any one awaited change.
const DEADLINE: Duration = Duration::from_secs(10);
/// How long a registration made before a kill must stay listed after it: 3 TTLs.
const HOLD: Duration = Duration::from_secs(6);

fn server(id: &str) -> ServiceInfo {
    ServiceInfo {
        id: id.into(),
        tcp_addr: "127.0.0.1:9000".into(),
        ..Default::default()
    }
}

/// Awaits the watch until `pred` holds for its list (within [`DEADLINE`]).
async fn wait_members(
    rx: &mut MembersRx,
    what: &str,
    pred: impl Fn(&Members) -> bool,
) -> anyhow::Result<Members> {
    cim_tests::wait_members(rx, what, DEADLINE, pred).await
}

/// Follows the watch until `until` has passed and `done` holds, failing as soon as a list
/// published meanwhile lacks one of `listed`.
async fn hold_listed(
    rx: &mut MembersRx,
    listed: &[&str],
    until: Instant,
    done: impl Fn(&Members) -> bool,
) -> anyhow::Result<()> {
    let end = Instant::now().max(until) + DEADLINE;
    loop {
        {
            let list = rx.borrow_and_update();
            if let Some(missing) = listed.iter().find(|id| !registry::contains(&list, id)) {
                anyhow::bail!("{missing} left the list: {:?}", ids(&list));
            }
            if Instant::now() >= until && done(&list) {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < end,
                "the list never became what was awaited: {:?}",
                ids(&list)
            );
        }
        // Woken by a change, at `until` (to check `done` then) or at the end.
        let wake = tokio::time::Instant::from_std(if Instant::now() < until { until } else { end });
        tokio::select! {
            changed = rx.changed() => changed.map_err(|_| anyhow::anyhow!("watch closed"))?,
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

async fn register(registry: &EtcdRegistry, id: &str) -> anyhow::Result<Box<dyn Registration>> {
    Ok(registry
        .register(ServiceKind::Server, &server(id), TTL)
        .await?)
}

/// Registers `id`, retrying while the cluster cannot write (a registration sent during the
/// election is lost and fails at the call deadline): what a caller registering right after
/// a leader's death must do. Returns the registration, how long it took and how many
/// attempts failed.
async fn register_retrying(
    registry: &EtcdRegistry,
    id: &str,
) -> anyhow::Result<(Box<dyn Registration>, Duration, usize)> {
    let start = Instant::now();
    let mut failed = 0;
    loop {
        match registry
            .register(ServiceKind::Server, &server(id), TTL)
            .await
        {
            Ok(r) => return Ok((r, start.elapsed(), failed)),
            Err(e) if start.elapsed() < DEADLINE => {
                failed += 1;
                eprintln!("register {id}: attempt {failed} failed: {e}");
            }
            Err(e) => return Err(anyhow::Error::from(e).context(format!("registering {id}"))),
        }
    }
}

/// How long until a member other than `killed` leads (the killed one may have been a
/// follower: then the leader stays).
async fn elected(etcd: &EtcdCluster, killed: usize) -> anyhow::Result<Duration> {
    let start = Instant::now();
    wait_until("a leader among the survivors", DEADLINE, || async {
        etcd.leader().await.is_ok_and(|l| l != killed)
    })
    .await?;
    Ok(start.elapsed())
}

/// How long until a put through the running members succeeds, each try cut at 100 ms (a
/// write sent to a follower that still believes in the dead leader is lost, not refused).
async fn writes_resume(etcd: &EtcdCluster) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut client = etcd.client().await?;
    for _ in 0..(DEADLINE.as_millis() / 100) {
        let put = client.put("cim-tests-write-probe", "x", None);
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(100), put).await {
            return Ok(start.elapsed());
        }
    }
    anyhow::bail!("no write succeeded within {DEADLINE:?} of the kill")
}

/// The create revision of the key of server `id` (changes if the key is ever deleted and
/// put again), read through the members still running.
async fn create_revision(etcd: &EtcdCluster, prefix: &str, id: &str) -> anyhow::Result<i64> {
    let key = format!("{prefix}/servers/{id}");
    let mut client = etcd.client().await?;
    let resp = client.get(key.as_str(), None).await?;
    let kv = resp
        .kvs()
        .first()
        .ok_or_else(|| anyhow::anyhow!("{key} is not in etcd"))?;
    Ok(kv.create_revision())
}

/// Client streams one etcd member serves, from its metrics.
#[derive(Debug, Default, Clone, Copy)]
struct Streams {
    watch: u64,
    keep_alive: u64,
}

/// Reads `/metrics` of the member at `endpoint`: open watch streams (a gauge) and open lease
/// keep-alive streams (started minus handled).
async fn streams_of(endpoint: &str) -> anyhow::Result<Streams> {
    let text = reqwest::get(format!("{endpoint}/metrics"))
        .await?
        .error_for_status()?
        .text()
        .await?;
    let sum = |name: &str, label: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    let keep_alive = r#"grpc_method="LeaseKeepAlive""#;
    Ok(Streams {
        watch: sum("etcd_debugging_mvcc_watch_stream_total ", ""),
        keep_alive: sum("grpc_server_started_total{", keep_alive)
            .saturating_sub(sum("grpc_server_handled_total{", keep_alive)),
    })
}

async fn all_streams(etcd: &EtcdCluster) -> anyhow::Result<Vec<Streams>> {
    let mut out = Vec::new();
    for endpoint in etcd.endpoints() {
        out.push(streams_of(&endpoint).await?);
    }
    Ok(out)
}

/// Which member a test kills.
#[derive(Debug, Clone, Copy)]
enum Victim {
    Leader,
    /// The member serving the registry's watch stream.
    StreamServer,
}

impl Victim {
    async fn pick(self, etcd: &EtcdCluster, keep_alives: u64) -> anyhow::Result<usize> {
        let leader = etcd.leader().await?;
        let i = match self {
            Victim::Leader => leader,
            Victim::StreamServer => {
                // The streams open right after the calls return: wait until all are counted.
                wait_until("the registry's streams to open", DEADLINE, || async {
                    all_streams(etcd).await.is_ok_and(|s| {
                        s.iter().map(|s| s.watch).sum::<u64>() == 1
                            && s.iter().map(|s| s.keep_alive).sum::<u64>() == keep_alives
                    })
                })
                .await?;
                let streams = all_streams(etcd).await?;
                eprintln!("streams per member: {streams:?}");
                streams
                    .iter()
                    .position(|s| s.watch == 1)
                    .expect("one member serves the watch")
            }
        };
        eprintln!("killing member {i} (leader: {leader}) as {self:?}");
        Ok(i)
    }
}

/// The registry on all three members keeps working when `victim` is killed: see the module
/// docs for what is checked.
async fn registry_survives(victim: Victim) -> anyhow::Result<()> {
    let mut etcd = EtcdCluster::start(3).await?;
    let prefix = format!("/{}", unique_prefix());
    let registry = EtcdRegistry::connect(&etcd.endpoints(), &prefix, CALL_TIMEOUT).await?;
    let mut watcher = registry.watch(ServiceKind::Server).await?;
    let _before = register(&registry, "before").await?;
    let leaving = register(&registry, "leaving").await?;
    let doomed = register(&registry, "doomed").await?;
    wait_members(&mut watcher, "the three registrations", |m| m.len() == 3).await?;
    let revision = create_revision(&etcd, &prefix, "before").await?;

    let i = victim.pick(&etcd, 3).await?;
    etcd.kill(i);
    let killed = Instant::now();

    // (b) A registration after the kill, seen by the watcher started before it. Measured
    // meanwhile: when a new leader is known, and when a raw write (100 ms per try) first
    // succeeds again.
    let (registered, elected, writable) = tokio::join!(
        register_retrying(&registry, "after"),
        elected(&etcd, i),
        writes_resume(&etcd),
    );
    let (_after, took, failed) = registered?;
    eprintln!(
        "measured ({victim:?}): a registration succeeded {took:?} after the kill \
         ({failed} attempts failed); a new leader known after {:?}; raw writes again after {:?}",
        elected?, writable?
    );
    wait_members(&mut watcher, "the registration after the kill", |m| {
        registry::contains(m, "after")
    })
    .await?;

    // (c) A deregistration is seen.
    leaving.deregister().await?;
    wait_members(&mut watcher, "the deregistration", |m| {
        !registry::contains(m, "leaving")
    })
    .await?;

    // (d) A registration dropped without deregistering (its process died) leaves after its
    // TTL; (a) meanwhile, and for HOLD (3 TTLs) after the kill, the ones alive stay listed.
    let dropped = Instant::now();
    drop(doomed);
    hold_listed(&mut watcher, &["before", "after"], killed + HOLD, |m| {
        !registry::contains(m, "doomed")
    })
    .await?;
    let expired = dropped.elapsed();
    assert!(
        expired >= TTL / 3,
        "doomed gone {expired:?} after the drop: removed, not expired?"
    );
    // The key of `before` was never deleted (a re-put after a lost lease would show in the
    // watcher only between two polls; its create revision shows it for sure).
    assert_eq!(
        create_revision(&etcd, &prefix, "before").await?,
        revision,
        "the key of the registration made before the kill was deleted and put again"
    );
    assert_eq!(ids(&watcher.borrow()), ["after", "before"]);
    Ok(())
}

#[tokio::test]
async fn three_members_form_one_cluster_and_die_on_drop() -> anyhow::Result<()> {
    let start = Instant::now();
    let etcd = EtcdCluster::start(3).await?;
    eprintln!("measured: a 3-member start took {:?}", start.elapsed());
    let endpoints = etcd.endpoints();
    assert_eq!(endpoints.len(), 3);
    assert_eq!(
        endpoints.iter().collect::<HashSet<_>>().len(),
        3,
        "{endpoints:?}"
    );
    let pids: Vec<u32> = etcd
        .pids()
        .into_iter()
        .map(|p| p.expect("running"))
        .collect();
    assert_eq!(pids.iter().collect::<HashSet<_>>().len(), 3, "{pids:?}");

    // One cluster: every member lists the same three names and follows the same leader.
    let leader = etcd.leader().await?;
    assert!(leader < 3);
    for endpoint in &endpoints {
        let mut client = etcd_client::Client::connect([endpoint], None).await?;
        let list = client.member_list().await?;
        let mut names: Vec<&str> = list.members().iter().map(|m| m.name()).collect();
        names.sort();
        let mut expected: Vec<&str> = (0..3).map(|i| etcd.name(i)).collect();
        expected.sort();
        assert_eq!(names, expected, "members seen by {endpoint}");
        let status = client.status().await?;
        let leader_id = list
            .members()
            .iter()
            .find(|m| m.name() == etcd.name(leader))
            .map(|m| m.id());
        assert_eq!(
            Some(status.leader()),
            leader_id,
            "leader seen by {endpoint}"
        );
    }
    // Writes through one member are read through another.
    let mut first = etcd_client::Client::connect([&endpoints[0]], None).await?;
    first.put("k", "v", None).await?;
    let mut last = etcd_client::Client::connect([&endpoints[2]], None).await?;
    assert_eq!(last.get("k", None).await?.kvs()[0].value(), b"v");

    drop(etcd);
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "etcd pid {pid} survived the drop"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_killed_member_restarts_and_rejoins() -> anyhow::Result<()> {
    let mut etcd = EtcdCluster::start(3).await?;
    let mut client = etcd.client().await?;
    client.put("before", "1", None).await?;

    // Killing the leader: the two others elect one of them.
    let old = etcd.leader().await?;
    etcd.kill(old);
    assert!(!etcd.is_running(old));
    assert_eq!(etcd.pids()[old], None);
    let killed = Instant::now();
    wait_until("a new leader", DEADLINE, || async {
        etcd.leader().await.is_ok_and(|l| l != old)
    })
    .await?;
    eprintln!(
        "measured: a new leader was elected {:?} after the kill",
        killed.elapsed()
    );
    // Two of three are a quorum: writes go on. The testkit's client balances over the
    // running members only, so none of its calls lands on the dead one.
    let mut survivors = etcd.client().await?;
    survivors.put("while-down", "2", None).await?;
    for _ in 0..20 {
        survivors.get("while-down", None).await?;
    }

    // Back on its ports and data dir, it catches up with what it missed.
    let start = Instant::now();
    etcd.restart(old).await?;
    eprintln!("measured: a member restart took {:?}", start.elapsed());
    assert!(etcd.is_running(old));
    let mut back = etcd_client::Client::connect([etcd.endpoint(old)], None).await?;
    for (key, value) in [("before", b"1"), ("while-down", b"2")] {
        let resp = back.get(key, None).await?;
        assert_eq!(
            resp.kvs().first().map(|kv| kv.value()),
            Some(&value[..]),
            "{key}"
        );
    }
    assert_eq!(back.member_list().await?.members().len(), 3);
    Ok(())
}

#[tokio::test]
async fn the_registry_survives_the_leader_being_killed() -> anyhow::Result<()> {
    registry_survives(Victim::Leader).await
}

#[tokio::test]
async fn the_registry_survives_the_member_serving_its_streams_being_killed() -> anyhow::Result<()> {
    registry_survives(Victim::StreamServer).await
}

/// Each member killed in turn and restarted before the next: whichever member serves each of
/// the registry's streams, it dies once.
#[tokio::test]
async fn the_registry_survives_each_member_dying_in_turn() -> anyhow::Result<()> {
    let mut etcd = EtcdCluster::start(3).await?;
    let prefix = format!("/{}", unique_prefix());
    let registry = EtcdRegistry::connect(&etcd.endpoints(), &prefix, CALL_TIMEOUT).await?;
    let mut watcher = registry.watch(ServiceKind::Server).await?;
    let _before = register(&registry, "before").await?;
    wait_members(&mut watcher, "before", |m| m.len() == 1).await?;
    let revision = create_revision(&etcd, &prefix, "before").await?;
    let mut kept = Vec::new();
    for (i, id) in ["after-0", "after-1", "after-2"].into_iter().enumerate() {
        etcd.kill(i);
        let killed = Instant::now();
        let (registration, took, _) = register_retrying(&registry, id).await?;
        eprintln!("measured: member {i} killed, a registration took {took:?}");
        kept.push(registration);
        wait_members(&mut watcher, id, |m| registry::contains(m, id)).await?;
        hold_listed(&mut watcher, &["before", id], killed + 2 * TTL, |_| true).await?;
        etcd.restart(i).await?;
    }
    assert_eq!(create_revision(&etcd, &prefix, "before").await?, revision);
    assert_eq!(
        ids(&watcher.borrow()),
        ["after-0", "after-1", "after-2", "before"]
    );
    Ok(())
}

/// A whole cim cluster on the 3 members: the etcd leader dies and nothing a user sees changes.
#[tokio::test]
async fn a_cim_cluster_routes_on_when_the_etcd_leader_dies() -> anyhow::Result<()> {
    let ttl_secs = TTL.as_secs();
    let mut cluster = Cluster::builder()
        .etcd_members(3)
        .server_config(move |c| c.registry_ttl_secs = ttl_secs)
        .route_config(move |c| c.registry_ttl_secs = ttl_secs)
        .start()
        .await?;
    let config = cluster.server_config(&|_| {});
    assert_eq!(
        config.backend.etcd_endpoints.len(),
        3,
        "servers get every member"
    );
    let route = cluster.route();
    let mut alice = cluster.user("alice", Transport::Tcp).await?;
    let mut bob = cluster.user("bob", Transport::Tcp).await?;
    assert_ne!(alice.server_id(), bob.server_id());
    let old: Vec<String> = cluster.servers.iter().map(|s| s.id.clone()).collect();

    let etcd = cluster.infra.etcd.cluster_mut().expect("a 3-member etcd");
    let leader = etcd.leader().await?;
    etcd.kill(leader);
    let killed = Instant::now();

    // Both servers' registrations, and the route's, outlive 3 TTLs: the route lists both
    // servers and both servers know the route at every poll.
    let mut polls = 0;
    let servers = &cluster.servers;
    wait_until("3 TTLs to pass with every node listed", DEADLINE, || {
        polls += 1;
        let route = route.clone();
        let old = old.clone();
        async move {
            assert!(
                servers.iter().all(|s| s.route_count() == 1),
                "a server lost the route"
            );
            let servers = route.servers().await.expect("the route's server list");
            let listed: HashSet<&str> = servers.iter().map(|s| s.id.as_str()).collect();
            assert!(
                old.iter().all(|id| listed.contains(id.as_str())),
                "a live server left the route's list: {listed:?}"
            );
            killed.elapsed() >= HOLD
        }
    })
    .await?;
    assert!(polls > 1);

    // Logins are still assigned, round-robin over the two live servers.
    let mut assigned = HashSet::new();
    for i in 0..4 {
        assigned.insert(
            cluster
                .register_and_login(&format!("u{i}"))
                .await?
                .server
                .id,
        );
    }
    assert_eq!(assigned, old.iter().cloned().collect::<HashSet<_>>());

    // A server started after the kill registers; the route's watch sees it and assigns it.
    let new = ServerNode::start(config).await?;
    let new_id = new.id.clone();
    wait_until("the new server to see the route", DEADLINE, || async {
        new.route_count() == 1
    })
    .await?;
    cluster.servers.push(new);
    wait_until("the route to list the new server", DEADLINE, || async {
        route.servers().await.is_ok_and(|s| s.len() == 3)
    })
    .await?;
    let mut carol = None;
    let mut assigned = HashSet::new();
    for name in ["carol", "dave", "erin"] {
        let login = cluster.register_and_login(name).await?;
        assigned.insert(login.server.id.clone());
        if login.server.id == new_id {
            carol = Some(cim_tests::cluster::TestUser::connect(login, Transport::Tcp).await?);
        }
    }
    assert_eq!(
        assigned.len(),
        3,
        "three logins in a row, three servers: {assigned:?}"
    );
    let mut carol = carol.expect("one login on the new server");

    // Private messages between users on two servers, old ones and the new one.
    let r = alice.send_private(bob.id(), "after the kill").await?;
    assert_eq!(r.status(), SendStatus::Delivered, "{r:?}");
    assert_eq!(bob.next_message().await?.body, "after the kill");
    let r = bob.send_private(alice.id(), "still here").await?;
    assert_eq!(r.status(), SendStatus::Delivered, "{r:?}");
    assert_eq!(alice.next_message().await?.body, "still here");
    let r = carol
        .send_private(alice.id(), "from the new server")
        .await?;
    assert_eq!(r.status(), SendStatus::Delivered, "{r:?}");
    assert_eq!(alice.next_message().await?.body, "from the new server");
    let r = alice.send_private(carol.id(), "to the new server").await?;
    assert_eq!(r.status(), SendStatus::Delivered, "{r:?}");
    assert_eq!(carol.next_message().await?.body, "to the new server");
    Ok(())
}
