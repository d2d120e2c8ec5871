//! The load generator (`cim_bench`) against a real cluster (two servers, one route,
//! real Redis and etcd), at tiny sizes: the scenarios must keep working and their
//! reports must add up. The figures themselves are meaningless here (every cim node runs in
//! this test process, so memory and CPU are the whole process's).

use anyhow::Context;
use cim_bench::{self as bench, ConnectOpts, FanoutOpts, GroupOpts, Load, P2pOpts, Setup, Target};
use cim_tests::cluster::{Cluster, ClusterBuilder};
use std::time::Duration;

/// The route's API key: the bench logs its users in through the business API.
const API_KEY: &str = "bench-test-api-key-0123456789";

/// A test cluster whose route has the bench's API key.
fn with_api_key(builder: ClusterBuilder) -> ClusterBuilder {
    builder.route_config(|c| c.api_keys = vec![API_KEY.into()])
}

/// A bench setup for `cluster`, measuring its Redis by pid (it runs on this machine).
async fn setup_for(cluster: &Cluster) -> anyhow::Result<Setup> {
    let target = Target {
        route: cluster.route_url(),
        api_key: API_KEY.into(),
        etcd_endpoints: vec![cluster.infra.etcd.endpoint()],
        prefix: cluster.prefix.clone(),
    };
    Ok(Setup::connect(&target)
        .await?
        .with_redis_pids(cluster.infra.redis.pids()))
}

async fn cluster_and_setup() -> anyhow::Result<(Cluster, Setup)> {
    let cluster = with_api_key(Cluster::builder()).start().await?;
    let setup = setup_for(&cluster).await?;
    Ok((cluster, setup))
}

/// Connections the cluster's servers hold right now.
fn connections(cluster: &Cluster) -> usize {
    cluster.servers.iter().map(|s| s.connection_count()).sum()
}

/// Waits until the servers hold no connection: a run returns once the route sees its users
/// offline (detached in Redis), and a server counts a connection as gone a moment after it
/// detached it.
async fn all_closed(cluster: &Cluster) -> anyhow::Result<()> {
    cim_tests::wait_until(
        "servers to count no connection",
        Duration::from_secs(5),
        || std::future::ready(connections(cluster) == 0),
    )
    .await
}

#[tokio::test]
async fn connect_opens_holds_and_closes_everything() -> anyhow::Result<()> {
    let (cluster, setup) = cluster_and_setup().await?;
    let report = bench::run_connect(
        &setup,
        ConnectOpts {
            connections: 20,
            hold: Duration::from_secs(1),
            rate: 200.0,
            // Loopback addresses other than 127.0.0.1 exist on Linux without configuration.
            source_ips: bench::parse_ips("127.0.0.2-127.0.0.4").map_err(anyhow::Error::msg)?,
            ..ConnectOpts::default()
        },
    )
    .await?;
    assert_eq!(report.servers, 2);
    assert_eq!(report.connected, 20, "{report}");
    assert_eq!(report.failed, 0, "{report}");
    assert_eq!(report.dropped, 0, "{report}");
    assert!(report.connect_rate_per_sec.is_some_and(|r| r > 0.0));
    assert_eq!(report.connect_latency.count, 20);
    assert!(report.held_secs >= 1.0);
    // Both servers live in this process: one process, 20 connections gained.
    assert!(report.memory.bytes_per_connection.is_some(), "{report}");
    assert_eq!(report.memory.processes.len(), 1);
    assert_eq!(report.memory.processes[0].connections, 20);
    let json = serde_json::to_value(&report)?;
    assert!(json["memory"]["bytes_per_connection"].is_number(), "{json}");
    all_closed(&cluster).await?;

    // The same users again: their slots were freed (by the servers' detach), so a second
    // run connects them all as well.
    let again = bench::run_connect(
        &setup,
        ConnectOpts {
            connections: 5,
            hold: Duration::ZERO,
            rate: 1000.0,
            ..ConnectOpts::default()
        },
    )
    .await?;
    assert_eq!((again.connected, again.failed), (5, 0), "{again}");
    Ok(())
}

/// The p2p scenario on a 3-master Redis Cluster (what `deploy/baseline.sh` measures with
/// `BASELINE_REDIS_MASTERS=3`): nothing lost, Redis's CPU summed over the three nodes.
#[tokio::test]
async fn p2p_on_a_redis_cluster_delivers_everything_and_counts_every_node() -> anyhow::Result<()> {
    let cluster = with_api_key(Cluster::builder())
        .redis_cluster(cim_tests::RedisClusterOptions::default())
        .start()
        .await?;
    assert_eq!(cluster.infra.redis.pids().len(), 3);
    let setup = setup_for(&cluster).await?;
    let report = bench::run_p2p(
        &setup,
        P2pOpts {
            pairs: 3,
            duration: Duration::from_secs(1),
            load: Load::Rate(60.0),
            ..P2pOpts::default()
        },
    )
    .await?;
    assert!(report.sent > 0, "{report}");
    assert_eq!(report.delivered, report.sent, "{report}");
    assert_eq!((report.lost, report.offline, report.unanswered), (0, 0, 0));
    assert!(report.cpu.redis_ms.is_some(), "{report}");
    all_closed(&cluster).await?;
    Ok(())
}

#[tokio::test]
async fn p2p_delivers_every_message_across_servers() -> anyhow::Result<()> {
    let (cluster, setup) = cluster_and_setup().await?;
    let report = bench::run_p2p(
        &setup,
        P2pOpts {
            pairs: 3,
            duration: Duration::from_secs(1),
            load: Load::Rate(60.0),
            ..P2pOpts::default()
        },
    )
    .await?;
    assert!(report.cross_server, "{report}");
    assert_ne!(report.sender_server, report.receiver_server);
    assert!(report.sent > 0, "{report}");
    assert_eq!(report.delivered, report.sent, "{report}");
    assert_eq!((report.lost, report.offline, report.unanswered), (0, 0, 0));
    assert!(report.send_failures.is_empty(), "{report}");
    let l = report.latency;
    assert_eq!(l.count, report.delivered);
    assert!(l.p50_ms > 0.0, "{report}");
    assert!(l.p50_ms <= l.p99_ms && l.p99_ms <= l.max_ms, "{report}");
    assert!(report.throughput_per_sec.is_some_and(|t| t > 0.0));
    // Every node is in this process, so CPU is measured (once) under servers.
    assert!(report.cpu.servers_ms.is_some() && report.cpu.redis_ms.is_some());
    all_closed(&cluster).await?;
    // The receivers acked what they got: no inbox keeps anything (the servers remove acked
    // messages in the background, hence the wait).
    let store = cluster.store().await?;
    let mut users = Vec::new();
    for k in 0..6 {
        let name = format!("bench-{k}");
        let user = store.user_by_name(&name).await?;
        users.push(user.with_context(|| format!("{name} exists"))?.id);
    }
    cim_tests::wait_until("every inbox is empty", Duration::from_secs(5), || {
        let (store, users) = (store.clone(), users.clone());
        async move {
            for id in users {
                if store.inbox_len(id).await.ok() != Some(0) {
                    return false;
                }
            }
            true
        }
    })
    .await?;

    // Flat out, briefly: still nothing lost.
    let report = bench::run_p2p(
        &setup,
        P2pOpts {
            pairs: 2,
            duration: Duration::from_millis(300),
            load: Load::FlatOut,
            window: 4,
            ..P2pOpts::default()
        },
    )
    .await?;
    assert!(report.sent > 0, "{report}");
    assert_eq!(report.delivered, report.sent, "{report}");
    assert_eq!(report.lost, 0);
    Ok(())
}

#[tokio::test]
async fn fanout_reaches_every_receiver() -> anyhow::Result<()> {
    let (cluster, setup) = cluster_and_setup().await?;
    let report = bench::run_fanout(
        &setup,
        FanoutOpts {
            receivers: 10,
            interval: Duration::from_millis(200),
            count: 3,
            ..FanoutOpts::default()
        },
    )
    .await?;
    assert_eq!(report.other_online, 0);
    assert_eq!(report.sent, 3, "{report}");
    assert_eq!(report.pushed, 30, "{report}");
    assert_eq!(report.expected_deliveries, 30);
    assert_eq!(report.deliveries, 30, "{report}");
    assert_eq!(report.missing, 0);
    let (median, max) = (
        report.time_to_last_median_ms.unwrap(),
        report.time_to_last_max_ms.unwrap(),
    );
    assert!(median > 0.0 && median <= max, "{report}");
    assert!(report.deliveries_per_sec.is_some_and(|d| d > 0.0));
    assert!(report.server_cpu_us_per_delivery.is_some());
    assert_eq!(report.role, "send");
    let numbers: Vec<usize> = report.per_message.iter().map(|m| m.number).collect();
    assert_eq!(numbers, [0, 1, 2]);
    for m in &report.per_message {
        assert_eq!(m.received, 10, "{m:?}");
        assert!(
            m.last_unix_ns >= m.sent_unix_ns && m.sent_unix_ns > 0,
            "{m:?}"
        );
    }
    all_closed(&cluster).await?;
    Ok(())
}

/// The stored-group scenario at a tiny size, at a rate and flat out: every online member gets
/// every message once, the members that were offline catch up on all of them, and everyone
/// who was connected acked their position (a later login does not catch up again).
#[tokio::test]
async fn group_reaches_online_members_and_offline_ones_catch_up() -> anyhow::Result<()> {
    let (cluster, setup) = cluster_and_setup().await?;
    let store = cluster.store().await?;
    for (load, offset) in [(Load::Rate(200.0), 0), (Load::FlatOut, 100)] {
        let report = bench::run_group(
            &setup,
            GroupOpts {
                members: 12,
                online: 6,
                load,
                window: 4,
                count: 8,
                catch_up: 3,
                user_offset: offset,
                ..GroupOpts::default()
            },
        )
        .await?;
        assert_eq!(report.sent, 8, "{report}");
        assert!(report.send_failures.is_empty(), "{report}");
        assert_eq!(report.expected_deliveries, 48, "{report}");
        assert_eq!(report.deliveries, 48, "{report}");
        assert_eq!((report.missing, report.repeated), (0, 0), "{report}");
        let (median, max) = (
            report.time_to_last_median_ms.unwrap(),
            report.time_to_last_max_ms.unwrap(),
        );
        assert!(median > 0.0 && median <= max, "{report}");
        assert!(report.messages_per_sec.is_some_and(|r| r > 0.0), "{report}");
        assert!(report.redis_us_per_message.is_some(), "{report}");
        let c = &report.catch_up;
        assert_eq!((c.members, c.messages_each), (3, 8), "{report}");
        assert_eq!((c.complete, c.missing, c.repeated), (3, 0, 0), "{report}");
        assert!(c.time_median_ms.is_some_and(|m| m > 0.0), "{report}");
        // The online and the caught-up members acked the whole log; the other two did not
        // connect (the sender's position is not the bench's to assert). A connection's last
        // acks reach the store through its server's acker after the bench closed it: wait.
        let members = store.group_members(report.group_id, 0, 100).await?;
        assert_eq!(members.len(), 12);
        let at_top = || async {
            let mut n = 0;
            for m in &members {
                let cursors = store.group_cursors(m.user_id).await.unwrap_or_default();
                n += usize::from(
                    cursors
                        .iter()
                        .any(|g| g.group == report.group_id && g.position == g.top),
                );
            }
            n
        };
        cim_tests::wait_until(
            "the online and caught-up members' positions at the top",
            Duration::from_secs(10),
            || async { at_top().await >= 9 },
        )
        .await
        .with_context(|| format!("{report}"))?;
        let at_top = at_top().await;
        assert!(at_top <= 10, "{at_top}: members that never connected acked");
        all_closed(&cluster).await?;
    }
    Ok(())
}

/// More receivers than one process holds: receive-only processes connect the rest, the
/// sender waits for them, and their reports carry the send times to merge by.
#[tokio::test]
async fn fanout_spans_a_receive_only_process() -> anyhow::Result<()> {
    let (cluster, setup) = cluster_and_setup().await?;
    let elsewhere = setup_for(&cluster).await?;
    let opts = FanoutOpts {
        interval: Duration::from_millis(200),
        count: 3,
        start_wait: Duration::from_secs(30),
        ..FanoutOpts::default()
    };
    let sending = bench::run_fanout(
        &setup,
        FanoutOpts {
            receivers: 4,
            others: 6,
            ..opts.clone()
        },
    );
    let receiving = bench::run_fanout(
        &elsewhere,
        FanoutOpts {
            receivers: 6,
            receive_only: true,
            user_offset: 100,
            ..opts
        },
    );
    let (sent, received) = tokio::join!(sending, receiving);
    let (sent, received) = (sent?, received?);
    assert_eq!(sent.other_online, 6, "{sent}");
    assert_eq!(sent.sent, 3, "{sent}");
    assert_eq!(sent.pushed, 30, "every receiver of both processes: {sent}");
    assert_eq!((sent.deliveries, sent.missing), (12, 0), "{sent}");
    assert_eq!(received.role, "receive-only");
    assert_eq!(received.sent, 3, "{received}");
    assert_eq!(received.expected_deliveries, 18);
    assert_eq!(
        (received.deliveries, received.missing),
        (18, 0),
        "{received}"
    );
    // Both processes know each message's send time, from the same clock.
    let times = |r: &bench::FanoutReport| -> Vec<(usize, u64)> {
        r.per_message
            .iter()
            .map(|m| (m.number, m.sent_unix_ns))
            .collect()
    };
    assert_eq!(times(&sent), times(&received));
    for m in &received.per_message {
        assert_eq!(m.received, 6, "{m:?}");
        assert!(m.last_unix_ns >= m.sent_unix_ns, "{m:?}");
    }
    all_closed(&cluster).await?;
    Ok(())
}

#[tokio::test]
async fn a_receive_only_fanout_gives_up_without_a_sender() -> anyhow::Result<()> {
    let (cluster, setup) = cluster_and_setup().await?;
    let report = bench::run_fanout(
        &setup,
        FanoutOpts {
            receivers: 2,
            count: 2,
            receive_only: true,
            start_wait: Duration::from_millis(300),
            ..FanoutOpts::default()
        },
    )
    .await?;
    assert_eq!((report.sent, report.deliveries), (0, 0), "{report}");
    assert_eq!(report.missing, 4, "{report}");
    assert!(report.per_message.is_empty());
    assert!(report.time_to_last_median_ms.is_none());
    all_closed(&cluster).await?;
    Ok(())
}

#[tokio::test]
async fn users_held_elsewhere_are_reported_not_stolen() -> anyhow::Result<()> {
    let (cluster, setup) = cluster_and_setup().await?;
    // A connect run holds bench-0..3 while a p2p run on the same users must refuse to start.
    let holding = bench::run_connect(
        &setup,
        ConnectOpts {
            connections: 4,
            hold: Duration::from_secs(2),
            ..ConnectOpts::default()
        },
    );
    let second = async {
        // Start once the first run's users are online.
        cim_tests::wait_until("first run connected", Duration::from_secs(10), || async {
            connections(&cluster) == 4
        })
        .await?;
        let setup2 = setup_for(&cluster).await?;
        let refused = bench::run_p2p(
            &setup2,
            P2pOpts {
                pairs: 2,
                duration: Duration::from_millis(100),
                ..P2pOpts::default()
            },
        )
        .await;
        anyhow::Ok(refused)
    };
    let (held, refused) = tokio::join!(holding, second);
    let held = held?;
    assert_eq!(held.connected, 4, "{held}");
    assert_eq!(
        held.dropped, 0,
        "the refused run must not disturb the held users"
    );
    let err = refused?.expect_err("users are logged in").to_string();
    assert!(err.contains("logged in already"), "{err}");
    Ok(())
}

/// `cim-bench --tls`: the scenarios connect to the servers' TLS addresses (TCP and wss).
#[tokio::test]
async fn scenarios_run_over_tls() -> anyhow::Result<()> {
    let pki = cim_tests::tls::TestPki::new();
    let tls_config = pki.tls_config();
    let cluster = with_api_key(Cluster::builder())
        .server_config(move |c| {
            c.tls_listen = Some("127.0.0.1:0".into());
            c.wss_listen = Some("127.0.0.1:0".into());
            c.tls = tls_config.clone();
        })
        .start()
        .await?;
    let setup = setup_for(&cluster).await?.with_tls(Some(pki.client_tls()));
    let report = bench::run_p2p(
        &setup,
        P2pOpts {
            pairs: 2,
            duration: Duration::from_millis(500),
            load: Load::Rate(40.0),
            ..P2pOpts::default()
        },
    )
    .await?;
    assert!(report.sent > 0, "{report}");
    assert_eq!(report.delivered, report.sent, "{report}");
    assert_eq!((report.lost, report.unanswered), (0, 0), "{report}");
    all_closed(&cluster).await?;
    let report = bench::run_connect(
        &setup,
        ConnectOpts {
            connections: 4,
            hold: Duration::from_millis(200),
            rate: 100.0,
            transport: cim_sdk::Transport::WsBinary,
            user_offset: 100,
            ..ConnectOpts::default()
        },
    )
    .await?;
    assert_eq!((report.connected, report.failed), (4, 0), "{report}");
    all_closed(&cluster).await?;

    // Against servers without TLS listeners, --tls fails instead of falling back to plain.
    let plain = with_api_key(Cluster::builder()).servers(1).start().await?;
    let setup = setup_for(&plain).await?.with_tls(Some(pki.client_tls()));
    let report = bench::run_connect(
        &setup,
        ConnectOpts {
            connections: 2,
            hold: Duration::from_millis(10),
            rate: 100.0,
            ..ConnectOpts::default()
        },
    )
    .await?;
    assert_eq!((report.connected, report.failed), (0, 2), "{report}");
    assert!(
        report.failures.keys().any(|k| k.contains("no TLS address")),
        "{report}"
    );
    Ok(())
}

/// `login-flood` against a cluster's route (in this process, so its pid is this test's):
/// every wrong-password login is answered `bad_credentials`, and the memory readings are real.
#[tokio::test]
async fn login_flood_answers_every_login_and_reads_memory() -> anyhow::Result<()> {
    let cluster = Cluster::builder().servers(1).start().await?;
    let report = bench::run_login_flood(bench::LoginFloodOpts {
        route: cluster.route_url(),
        logins: 12,
        concurrency: 4,
        settle: Duration::ZERO,
    })
    .await?;
    assert_eq!(report.pid, std::process::id());
    assert_eq!(
        report.answers,
        [("bad_credentials".to_string(), 12)].into(),
        "{report}"
    );
    for m in [report.before, report.after, report.settled] {
        assert!(
            m.vm_rss_bytes > 0 && m.vm_hwm_bytes >= m.vm_rss_bytes,
            "{report}"
        );
        assert!(m.threads >= 1, "{report}");
    }
    // The peak never goes down.
    assert!(report.settled.vm_hwm_bytes >= report.before.vm_hwm_bytes);
    let json = serde_json::to_value(&report)?;
    assert!(json["after"]["vm_hwm_bytes"].is_number(), "{json}");
    assert!(
        report.to_string().contains("bad_credentials ×12"),
        "{report}"
    );
    Ok(())
}
