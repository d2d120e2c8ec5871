//! A real 3-member etcd cluster ([`EtcdCluster`]): it forms one cluster, dies with its owner,
//! survives a member's death and takes the member back. The tests print what they measure
//! (`--nocapture`): how long a start and a restart take, when a new leader is known.

use cim_tests::{wait_until, EtcdCluster};
use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

/// Deadline of any one awaited change.
const DEADLINE: Duration = Duration::from_secs(10);

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
