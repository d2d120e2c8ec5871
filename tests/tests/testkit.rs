//! The testkit itself: processes start on free ports, answer, restart, run many at once, and
//! never outlive their owner (drop, panic, or the death of the whole test process).

use cim_tests::{
    unique_prefix, wait_until, Etcd, Infra, Redis, RedisCluster, RedisClusterOptions, RedisOptions,
};
use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

const DEADLINE: Duration = Duration::from_secs(10);

/// Whether `pid` is gone (or a zombie nobody reaped yet: it runs no more either).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state is the field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

async fn port_refuses(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
}

#[tokio::test]
async fn redis_answers_and_is_killed_on_drop() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    assert!(redis.url().starts_with("redis://127.0.0.1:"));
    assert!(redis.url().ends_with(&format!(":{}/0", redis.port())));
    let mut c = redis.connection().await?;
    let pong: String = redis::cmd("PING").query_async(&mut c).await?;
    assert_eq!(pong, "PONG");
    let pid = redis.pid().expect("running");
    let (port, dir) = (redis.port(), redis.dir().to_path_buf());
    assert!(dir.exists());
    drop(redis);
    assert!(process_gone(pid), "redis pid {pid} survived drop");
    assert!(port_refuses(port).await);
    assert!(!dir.exists(), "temp dir {} left behind", dir.display());
    Ok(())
}

#[tokio::test]
async fn etcd_answers_and_is_killed_on_drop() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    assert_eq!(
        etcd.endpoint(),
        format!("http://127.0.0.1:{}", etcd.client_port())
    );
    let mut c = etcd.client().await?;
    c.put("k", "v", None).await?;
    let got = c.get("k", None).await?;
    assert_eq!(got.kvs()[0].value(), b"v");
    let pid = etcd.pid().expect("running");
    let port = etcd.client_port();
    drop(etcd);
    assert!(process_gone(pid), "etcd pid {pid} survived drop");
    assert!(port_refuses(port).await);
    Ok(())
}

#[tokio::test]
async fn processes_die_when_the_test_panics() -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let infra = Infra::start().await.expect("infra");
        tx.send((
            infra.redis.single().pid().unwrap(),
            infra.etcd.pid().unwrap(),
        ))
        .unwrap();
        panic!("a failing test");
    });
    assert!(task.await.unwrap_err().is_panic());
    let (redis_pid, etcd_pid) = rx.await?;
    assert!(process_gone(redis_pid));
    assert!(process_gone(etcd_pid));
    Ok(())
}

/// Run by `processes_die_with_the_test_process` in a child test process: starts both backends,
/// prints their pids, then aborts (no unwinding, no destructors).
#[tokio::test]
async fn orphan_helper() {
    if std::env::var_os("CIM_TESTS_ORPHAN_HELPER").is_none() {
        return;
    }
    let infra = Infra::start().await.expect("infra");
    println!(
        "PIDS {} {}",
        infra.redis.single().pid().unwrap(),
        infra.etcd.pid().unwrap()
    );
    std::process::abort();
}

#[tokio::test]
async fn processes_die_with_the_test_process() -> anyhow::Result<()> {
    if !Path::new("/usr/bin/setpriv").exists() && !Path::new("/bin/setpriv").exists() {
        eprintln!("setpriv (util-linux) missing: children would outlive an aborted test binary");
    }
    // The helper cannot remove its temporary directories: put them in one of ours.
    let tmp = tempfile::tempdir()?;
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "orphan_helper",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CIM_TESTS_ORPHAN_HELPER", "1")
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            // The harness prints "test orphan_helper ... " on the same line.
            .find_map(|l| Some(l.split_once("PIDS ")?.1.to_string()))
    });
    let line = tokio::time::timeout(Duration::from_secs(30), line)
        .await??
        .expect("helper printed no pids");
    let _ = child.wait();
    let pids: Vec<u32> = line
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    for pid in pids {
        wait_until(
            &format!("orphaned pid {pid} to die"),
            DEADLINE,
            || async move { process_gone(pid) },
        )
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_start_in_parallel_on_distinct_ports() -> anyhow::Result<()> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..6 {
        set.spawn(Infra::start());
    }
    let mut all = Vec::new();
    while let Some(infra) = set.join_next().await {
        all.push(infra??);
    }
    let mut ports: Vec<u16> = all
        .iter()
        .flat_map(|i| {
            [
                i.redis.single().port(),
                i.etcd.client_port(),
                i.etcd.peer_port(),
            ]
        })
        .collect();
    let n = ports.len();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), n, "a port is used twice");
    for infra in &all {
        let config = infra.backend_config(&unique_prefix());
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.timeout_ms, 2000);
        cim_common::backend::Backends::connect(&config)
            .await
            .map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

#[tokio::test]
async fn redis_restart_with_aof_keeps_acknowledged_writes() -> anyhow::Result<()> {
    let mut redis = Redis::start_with(RedisOptions { aof: true }).await?;
    let port = redis.port();
    let mut c = redis.connection().await?;
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut c)
        .await?;
    let old_pid = redis.pid().unwrap();
    redis.kill();
    assert!(!redis.is_running());
    assert!(process_gone(old_pid));
    redis.restart().await?;
    assert_eq!(redis.port(), port);
    assert_ne!(redis.pid().unwrap(), old_pid);
    let mut c = redis.connection().await?;
    let v: Option<String> = redis::cmd("GET").arg("k").query_async(&mut c).await?;
    assert_eq!(v.as_deref(), Some("v"));
    Ok(())
}

#[tokio::test]
async fn redis_restart_without_persistence_starts_empty() -> anyhow::Result<()> {
    let mut redis = Redis::start().await?;
    let mut c = redis.connection().await?;
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut c)
        .await?;
    // restart() kills a running server itself.
    redis.restart().await?;
    let mut c = redis.connection().await?;
    let v: Option<String> = redis::cmd("GET").arg("k").query_async(&mut c).await?;
    assert_eq!(v, None);
    Ok(())
}

#[tokio::test]
async fn etcd_restart_keeps_data() -> anyhow::Result<()> {
    let mut etcd = Etcd::start().await?;
    etcd.client().await?.put("k", "v", None).await?;
    etcd.kill();
    assert!(!etcd.is_running());
    etcd.restart().await?;
    let got = etcd.client().await?.get("k", None).await?;
    assert_eq!(got.kvs()[0].value(), b"v");
    Ok(())
}

#[test]
fn dropping_outside_a_runtime_kills() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let infra = rt.block_on(Infra::start()).unwrap();
    drop(rt);
    let pids = [
        infra.redis.single().pid().unwrap(),
        infra.etcd.pid().unwrap(),
    ];
    drop(infra);
    for pid in pids {
        assert!(process_gone(pid));
    }
}

#[tokio::test]
async fn redis_cluster_serves_keys_on_every_master_and_dies_on_drop() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let cluster = RedisCluster::start(RedisClusterOptions::default()).await?;
    eprintln!("3-master redis cluster started in {:?}", started.elapsed());
    assert_eq!(cluster.len(), 3);
    let nodes = cluster.nodes().await?;
    assert!(nodes.iter().all(|n| n.is_master && n.master.is_none()));
    let seeds: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    assert_eq!(
        cluster.url(),
        format!("redis+cluster://{}", seeds.join(","))
    );

    cluster.reset_stats().await?;
    let mut c = cluster.connection().await?;
    let prefix = unique_prefix();
    let mut served = [0u64; 3];
    // 60 keys spread over 3 equal slot ranges: a master left without any is ~1e-10 likely.
    for n in 0..60 {
        let key = format!("{prefix}:{n}");
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(n)
            .query_async(&mut c)
            .await?;
        let got: i64 = redis::cmd("GET").arg(&key).query_async(&mut c).await?;
        assert_eq!(got, n);
        let master = cluster.master_for_key(&key).await?;
        served[master] += 1;
        // The key lives on that very master.
        let mut node = cluster.node_connection(master).await?;
        let raw: Option<i64> = redis::cmd("GET").arg(&key).query_async(&mut node).await?;
        assert_eq!(raw, Some(n), "{key} not on node {master}");
    }
    assert!(served.iter().all(|&k| k > 0), "keys per master: {served:?}");
    for (i, &keys) in served.iter().enumerate() {
        let stats = cluster.commandstats(i).await?;
        // Our SET + GET of each key, plus the probes' GET; more from the client's own calls.
        assert!(
            stats.calls >= 3 * keys,
            "node {i}: {stats:?} for {keys} keys"
        );
        assert!(stats.usec > 0, "node {i}: {stats:?}");
    }

    let pids = cluster.pids();
    assert_eq!(pids.len(), 3);
    let dir = cluster.dir().to_path_buf();
    drop(c);
    drop(cluster);
    for pid in pids {
        assert!(process_gone(pid), "cluster node pid {pid} survived drop");
    }
    assert!(!dir.exists(), "temp dir {} left behind", dir.display());
    Ok(())
}

#[tokio::test]
async fn redis_cluster_fails_over_to_a_replica() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut cluster = RedisCluster::start(RedisClusterOptions {
        masters: 3,
        replicas: 1,
        aof: false,
    })
    .await?;
    eprintln!("3+3 redis cluster started in {:?}", started.elapsed());
    assert_eq!(cluster.len(), 6);
    let before = cluster.nodes().await?;
    assert_eq!(before.iter().filter(|n| n.is_master).count(), 3);
    for replica in before.iter().filter(|n| !n.is_master) {
        let master = replica.master.expect("a replica has a master");
        assert!(before[master].is_master);
        assert_eq!(replica.master_id.as_deref(), Some(cluster.node_id(master)));
    }

    let key = format!("{}:survivor", unique_prefix());
    let master = cluster.master_for_key(&key).await?;
    let mut node = cluster.node_connection(master).await?;
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("v")
        .query_async(&mut node)
        .await?;
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(1000)
        .query_async(&mut node)
        .await?;
    assert_eq!(acked, 1, "the write did not reach the replica");
    // Opened before the failover: it has to follow the topology change.
    let mut c = cluster.connection().await?;
    let got: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut c).await?;
    assert_eq!(got.as_deref(), Some("v"));

    let old_pid = cluster.pid(master).expect("running");
    cluster.kill(master);
    assert!(process_gone(old_pid));
    let killed = std::time::Instant::now();
    let promoted = cluster.wait_for_failover(master).await?;
    eprintln!("failover took {:?}", killed.elapsed());
    assert_eq!(
        before[promoted].master,
        Some(master),
        "not a replica of {master}"
    );
    let after = cluster.nodes().await?;
    assert!(after[promoted].is_master);
    assert_eq!(cluster.master_for_key(&key).await?, promoted);
    let got: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut c).await?;
    assert_eq!(got.as_deref(), Some("v"));

    // The old master comes back (same port, its nodes.conf) as the new master's replica.
    cluster.restart(master).await?;
    assert_ne!(cluster.pid(master), Some(old_pid));
    cluster.wait_ready().await?;
    let rejoined = cluster.nodes().await?;
    assert!(!rejoined[master].is_master);
    assert_eq!(rejoined[master].master, Some(promoted));
    assert_eq!(cluster.pids().len(), 6);
    Ok(())
}

/// A node that fails to start returns its error: its runtime is shut down in the background,
/// not dropped inside the caller's async context (which panicked, hiding the error).
#[tokio::test]
async fn a_node_that_cannot_start_returns_its_error() -> anyhow::Result<()> {
    // A port nothing listens on (bound for a moment to learn it).
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = cim_server::ServerConfig {
        backend: cim_common::backend::BackendConfig {
            // Nothing listens there.
            redis_url: format!("redis://127.0.0.1:{port}/0"),
            timeout_ms: 200,
            ..Default::default()
        },
        ..Default::default()
    };
    let err = match cim_tests::cluster::ServerNode::start(config).await {
        Ok(_) => anyhow::bail!("a server without Redis started"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains(&port.to_string()), "{err}");
    Ok(())
}
