//! Delivery across failures of real processes: connection servers run as `cim-server`
//! processes (killed with SIGKILL mid-stream), Redis with AOF is killed and restarted
//! mid-stream; the route runs in this test process. Every message the sender was told was
//! accepted (Delivered or Stored) must reach the receiver exactly once after de-duplication
//! by id, in send order, and nothing that was not sent may arrive.

use cim_sdk::{
    pb::{self, ErrorCode, SendStatus},
    RouteClient, Transport,
};
use cim_server::ServerConfig;
use cim_tests::{
    cluster::{check_stream_delivery, Cluster, Sent, TestUser},
    RedisOptions, ServerProcess,
};
use std::time::{Duration, Instant};

const SERVER_BIN: &str = env!("CARGO_BIN_EXE_cim-server");
/// Body of the last message of a stream: the receiver stops when it arrives.
const MARKER: &str = "end";
/// Lease TTL of the server processes: how long a killed server still looks alive.
const REGISTRY_TTL_SECS: u64 = 2;
/// Everything a receiver does in one test (reconnections included).
const COLLECT_DEADLINE: Duration = Duration::from_secs(40);
/// Bound of a 100-message stream of which 60 are sent while Redis is down: failing fast,
/// they take a few seconds; hanging, far longer.
const OUTAGE_STREAM_DEADLINE: Duration = Duration::from_secs(30);

fn server_config(cluster: &Cluster) -> ServerConfig {
    cluster.server_config(&|c| c.registry_ttl_secs = REGISTRY_TTL_SECS)
}

/// Waits until the route lists exactly the servers `ids`.
async fn route_sees(route: &RouteClient, ids: &[&str]) -> anyhow::Result<()> {
    let mut want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    want.sort();
    cim_tests::wait_until(
        &format!("the route to list the servers {want:?}"),
        Duration::from_secs(10),
        || {
            let want = want.clone();
            async move {
                route.servers().await.is_ok_and(|s| {
                    let mut have: Vec<String> = s.into_iter().map(|s| s.id).collect();
                    have.sort();
                    have == want
                })
            }
        },
    )
    .await
}

/// Registers users `{prefix}{i}` until one is assigned `server`.
async fn user_on(cluster: &Cluster, prefix: &str, server: &str) -> anyhow::Result<TestUser> {
    for i in 0..8 {
        let user = cluster
            .user(&format!("{prefix}{i}"), Transport::Tcp)
            .await?;
        if user.server_id() == server {
            return Ok(user);
        }
    }
    anyhow::bail!("no login of {prefix}* was assigned {server} in 8 tries")
}

/// The last message of a stream, with a fixed id.
async fn send_marker(sender: &mut TestUser, to: u64) -> anyhow::Result<pb::SendResult> {
    sender
        .send(pb::Send {
            kind: pb::MessageKind::Private as i32,
            to_user_id: to,
            body: MARKER.into(),
            message_id: "marker".into(),
            ..Default::default()
        })
        .await
}

fn statuses(sent: &[Sent]) -> String {
    sent.iter()
        .map(|s| format!("{}:{:?}", s.n, s.result.status()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Sender on server B, receiver on server A; A is killed (SIGKILL) while the stream is in
/// flight. The receiver logs in again through the route as soon as its old slot (held by
/// the dead A until A's lease expires) lets it, lands on B, gets its inbox replayed, acks,
/// and receives the rest live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_receivers_server_mid_stream_loses_and_duplicates_nothing() -> anyhow::Result<()>
{
    let cluster = Cluster::builder().servers(0).routes(1).start().await?;
    let route = cluster.route();
    let store = cluster.store().await?;
    // A alone first, so the receiver lands on it.
    let mut a = ServerProcess::start(SERVER_BIN, server_config(&cluster)).await?;
    route_sees(&route, &[a.id()]).await?;
    let receiver = cluster.user("receiver", Transport::Tcp).await?;
    assert_eq!(receiver.server_id(), a.id());
    let receiver_id = receiver.id();
    let b = ServerProcess::start(SERVER_BIN, server_config(&cluster)).await?;
    route_sees(&route, &[a.id(), b.id()]).await?;
    let mut sender = user_on(&cluster, "sender", b.id()).await?;

    let (progress, progress_rx) = tokio::sync::watch::channel(0);
    // 20 messages stay unacked at any time: at the kill, they wait in the inbox to be
    // replayed on the new connection, copies of what the receiver already has.
    let collector =
        tokio::spawn(receiver.collect_until(route.clone(), MARKER, 20, COLLECT_DEADLINE, progress));

    // 0..200 with 16 in flight; A dies at the 100th answer, with sends still in flight.
    let mut killed_at = None;
    let mut answers = 0;
    let mut sent = sender
        .stream_private(
            receiver_id,
            0..200,
            16,
            |n| format!("m{n}"),
            |_| {
                answers += 1;
                if answers == 100 {
                    a.kill();
                    killed_at = Some((Instant::now(), *progress_rx.borrow()));
                }
            },
        )
        .await?;
    let (killed_when, received_before_kill) = killed_at.expect("A was killed mid-stream");
    assert!(
        received_before_kill > 0,
        "the receiver got nothing before A died"
    );
    // The receiver is back, on B: the rest goes live to its new connection.
    cim_tests::wait_until(
        "the receiver to be connected to B",
        COLLECT_DEADLINE,
        || {
            let store = store.clone();
            let b = b.id().to_string();
            async move {
                store
                    .routes(&[receiver_id])
                    .await
                    .is_ok_and(|r| r[0].as_ref().is_some_and(|r| r.server_id == b))
            }
        },
    )
    .await?;
    let back_after = killed_when.elapsed();
    sent.extend(
        sender
            .stream_private(receiver_id, 200..300, 16, |n| format!("m{n}"), |_| {})
            .await?,
    );
    let marker = send_marker(&mut sender, receiver_id).await?;
    assert!(
        matches!(marker.status(), SendStatus::Delivered | SendStatus::Stored),
        "{marker:?}"
    );
    let collected = collector.await??;

    let check = check_stream_delivery(&sent, &collected, MARKER, false)?;
    let stored = sent
        .iter()
        .filter(|s| s.result.status() == SendStatus::Stored)
        .count();
    let replayed = collected.received.iter().filter(|r| r.replay).count();
    eprintln!(
        "{check:?}; {stored} stored; {received_before_kill} received before the kill, \
         {replayed} replayed; reconnected after {:?}, back on B {back_after:?} after the kill",
        collected.reconnect_times
    );
    assert_eq!(check.failed, 0, "{}", statuses(&sent));
    assert!(
        check.redelivered > 0,
        "the unacked messages were not replayed: {check:?}"
    );
    assert_eq!(check.accepted, 300);
    assert_eq!(check.received, 300);
    assert_eq!(collected.connections, 2, "{:?}", collected.reconnect_times);
    // The dead server's slot locked the receiver out for about its lease TTL, not longer.
    assert!(
        back_after < Duration::from_secs(REGISTRY_TTL_SECS + 8),
        "re-login took {back_after:?}"
    );
    assert!(
        collected
            .received
            .iter()
            .any(|r| r.connection == 1 && r.replay),
        "nothing was replayed on the new connection"
    );
    assert!(
        collected
            .received
            .iter()
            .any(|r| r.connection == 1 && !r.replay),
        "nothing came live on the new connection"
    );
    // Everything was acked on B in the end: the inbox empties.
    cim_tests::wait_until(
        "the receiver's inbox to empty",
        Duration::from_secs(10),
        || {
            let store = store.clone();
            async move { store.inbox_len(receiver_id).await.is_ok_and(|n| n == 0) }
        },
    )
    .await?;
    drop(b);
    Ok(())
}

/// Redis (AOF, fsync always) is killed while messages stream and restarted: sends during the
/// outage fail fast with a clear error, never hang; every accepted one is delivered exactly
/// once after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_stream_fails_sends_fast_and_loses_no_accepted_message(
) -> anyhow::Result<()> {
    let mut cluster = Cluster::builder()
        .servers(0)
        .routes(1)
        .redis(RedisOptions { aof: true })
        .start()
        .await?;
    let route = cluster.route();
    let a = ServerProcess::start(SERVER_BIN, server_config(&cluster)).await?;
    let b = ServerProcess::start(SERVER_BIN, server_config(&cluster)).await?;
    route_sees(&route, &[a.id(), b.id()]).await?;
    let receiver = cluster.user("receiver", Transport::Tcp).await?;
    let receiver_id = receiver.id();
    let mut sender = cluster.user("sender", Transport::Tcp).await?;
    let backend_timeout = cluster.infra.backend_config(&cluster.prefix).timeout();
    let internal_timeout = server_config(&cluster).internal_timeout();

    let (progress, _progress_rx) = tokio::sync::watch::channel(0);
    let collector =
        tokio::spawn(receiver.collect_until(route.clone(), MARKER, 0, COLLECT_DEADLINE, progress));

    // Redis dies at the 40th answer, with 8 sends in flight; the stream goes on into the
    // outage. Each send must be answered within the Redis timeout plus the forward's own
    // deadline; the whole stream gets a generous bound so a hang fails here, not later.
    let redis = cluster.infra.redis.single_mut();
    let mut answers = 0;
    let stream = sender.stream_private(
        receiver_id,
        0..100,
        8,
        |n| format!("m{n}"),
        |_| {
            answers += 1;
            if answers == 40 {
                redis.kill();
            }
        },
    );
    let started = Instant::now();
    let mut sent = tokio::time::timeout(OUTAGE_STREAM_DEADLINE, stream)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "100 sends (60 of them while Redis was down) were not all answered within \
                 {OUTAGE_STREAM_DEADLINE:?}: sends hang while Redis is down"
            )
        })??;
    eprintln!("stream into the outage: {:?}", started.elapsed());
    assert!(!cluster.infra.redis.single().is_running());
    let failed: Vec<&Sent> = sent.iter().filter(|s| !s.accepted()).collect();
    assert!(
        failed.len() >= 50,
        "sends during the outage must fail: {}",
        statuses(&sent)
    );
    for s in &failed {
        assert_eq!(s.result.status(), SendStatus::Failed, "{s:?}");
        let error = s.result.error.as_ref().expect("a failure says why");
        assert!(
            matches!(error.code(), ErrorCode::Unavailable | ErrorCode::Overloaded),
            "{s:?}"
        );
        assert!(!error.message.is_empty(), "{s:?}");
    }
    // Fast: within the Redis timeout (plus the forward's own deadline), never a hang.
    let slowest = sent.iter().map(|s| s.latency).max().unwrap_or_default();
    assert!(
        slowest < backend_timeout + internal_timeout,
        "a send took {slowest:?}"
    );

    cluster.infra.redis.single_mut().restart().await?;
    // Sends work again once the store has reconnected (no event tells when: retry, bounded).
    let mut n = 100;
    let back = Instant::now();
    loop {
        let more = sender
            .stream_private(receiver_id, n..n + 1, 1, |n| format!("m{n}"), |_| {})
            .await?;
        n += 1;
        let ok = more[0].accepted();
        sent.extend(more);
        if ok {
            break;
        }
        anyhow::ensure!(
            back.elapsed() < Duration::from_secs(15),
            "sends still fail after Redis is back: {}",
            statuses(&sent[100..])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "sends accepted again {:?} after the restart",
        back.elapsed()
    );
    sent.extend(
        sender
            .stream_private(receiver_id, n..n + 100, 8, |n| format!("m{n}"), |_| {})
            .await?,
    );
    let after: Vec<&Sent> = sent.iter().filter(|s| s.n >= n).collect();
    assert!(
        after.iter().all(|s| s.accepted()),
        "{}",
        statuses(&sent[n as usize..])
    );
    let marker = send_marker(&mut sender, receiver_id).await?;
    assert!(
        matches!(marker.status(), SendStatus::Delivered | SendStatus::Stored),
        "{marker:?}"
    );
    let collected = collector.await??;
    let check = check_stream_delivery(&sent, &collected, MARKER, false)?;
    eprintln!(
        "{check:?}, receiver connections: {}, done after {:?}",
        collected.connections,
        started.elapsed()
    );
    assert!(check.accepted >= 140, "{check:?}");
    drop((a, b));
    Ok(())
}
