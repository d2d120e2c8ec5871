//! Delivery across the death of a route: two `cim-route` processes, connection servers in
//! this test process. One route is killed with SIGKILL while a sender streams messages; the
//! servers retry the forwards it had (or would have) taken on the other route with the same
//! message ids, so every accepted message reaches the receiver exactly once after
//! de-duplication by id, in send order, and nothing that was not sent arrives.

use cim_common::registry::{EtcdRegistry, Registry as _, ServiceKind};
use cim_route::RouteConfig;
use cim_sdk::{
    pb::{ErrorCode, SendStatus},
    RouteClient, Transport,
};
use cim_tests::{
    cluster::{check_stream_delivery, test_password, Cluster, Sent, TestUser},
    RouteProcess,
};
use std::time::Duration;

const ROUTE_BIN: &str = env!("CARGO_BIN_EXE_cim-route");
/// Body of the last message of a stream: the receiver stops when it arrives.
const MARKER: &str = "end";
/// Lease TTL of the route processes: how long a killed route still looks alive to servers.
const REGISTRY_TTL_SECS: u64 = 2;
/// Sends that may fail when a route dies under them (the servers retry on the other route,
/// so normally none).
const MAX_FAILED: usize = 3;

fn route_config(cluster: &Cluster) -> RouteConfig {
    cluster.route_config(&|c| c.registry_ttl_secs = REGISTRY_TTL_SECS)
}

/// Registers `name` through `route` and connects it.
async fn user(route: &RouteClient, name: &str) -> anyhow::Result<TestUser> {
    route.register(name, &test_password(name)).await?;
    TestUser::login_again(route, name, Transport::Tcp, Duration::from_secs(10)).await
}

/// Waits until the registry lists `n` routes (the servers learn them through the same
/// watch).
async fn routes_registered(cluster: &Cluster, n: usize) -> anyhow::Result<()> {
    let config = cluster.infra.backend_config(&cluster.prefix);
    let registry = EtcdRegistry::connect(
        &config.etcd_endpoints,
        &format!("/{}", config.prefix),
        config.timeout(),
    )
    .await?;
    let mut routes = registry.watch(ServiceKind::Route).await?;
    tokio::time::timeout(Duration::from_secs(10), routes.wait_for(|r| r.len() == n))
        .await
        .map_err(|_| anyhow::anyhow!("{n} routes not registered within 10 s"))??;
    Ok(())
}

/// Waits until `route` lists `n` servers.
async fn route_sees_servers(route: &RouteClient, n: usize) -> anyhow::Result<()> {
    cim_tests::wait_until(
        &format!("{} to list {n} servers", route.base_url()),
        Duration::from_secs(10),
        || async move { route.servers().await.is_ok_and(|s| s.len() == n) },
    )
    .await
}

fn statuses(sent: &[Sent]) -> String {
    sent.iter()
        .filter(|s| !s.accepted())
        .map(|s| format!("{}:{:?}", s.n, s.result.error))
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_route_mid_stream_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let cluster = Cluster::builder().servers(2).routes(0).start().await?;
    let store = cluster.store().await?;
    let mut doomed = RouteProcess::start(ROUTE_BIN, route_config(&cluster)).await?;
    let survivor = RouteProcess::start(ROUTE_BIN, route_config(&cluster)).await?;
    routes_registered(&cluster, 2).await?;
    let route = survivor.client();
    route_sees_servers(&route, 2).await?;
    route_sees_servers(&doomed.client(), 2).await?;

    let receiver = user(&route, "receiver").await?;
    let receiver_id = receiver.id();
    let mut sender = user(&route, "sender").await?;
    // Round-robin assignment: the message crosses servers.
    assert_ne!(sender.server_id(), receiver.server_id());

    let (progress, progress_rx) = tokio::sync::watch::channel(0);
    let collector = tokio::spawn(receiver.collect_until(
        route.clone(),
        MARKER,
        0,
        Duration::from_secs(40),
        progress,
    ));

    // The servers alternate between the two routes per forward; one dies at the 100th
    // answer, with up to 16 sends in flight, some of them in its hands.
    let mut answers = 0;
    let mut received_before_kill = None;
    let sent = sender
        .stream_private(
            receiver_id,
            0..300,
            16,
            |n| format!("m{n}"),
            |_| {
                answers += 1;
                if answers == 100 {
                    doomed.kill();
                    received_before_kill = Some(*progress_rx.borrow());
                }
            },
        )
        .await?;
    assert!(
        received_before_kill.is_some_and(|n| n > 0),
        "the route was not killed mid-stream: {received_before_kill:?}"
    );
    let marker = sender
        .send(cim_sdk::pb::Send {
            kind: cim_sdk::pb::MessageKind::Private as i32,
            to_user_id: receiver_id,
            body: MARKER.into(),
            message_id: "marker".into(),
            ..Default::default()
        })
        .await?;
    assert!(
        matches!(marker.status(), SendStatus::Delivered | SendStatus::Stored),
        "{marker:?}"
    );
    let collected = collector.await??;

    // A forward the dead route had taken may be pushed twice (by it, then by the retry):
    // copies on one connection are allowed here, never a different message or a gap.
    let check = check_stream_delivery(&sent, &collected, MARKER, true)?;
    eprintln!("{check:?}, received before the kill: {received_before_kill:?}");
    assert!(check.failed <= MAX_FAILED, "{check:?}: {}", statuses(&sent));
    for s in sent.iter().filter(|s| !s.accepted()) {
        let error = s.result.error.as_ref().expect("a failure says why");
        assert_eq!(error.code(), ErrorCode::Unavailable, "{s:?}");
    }
    assert_eq!(
        check.received,
        check.accepted + received_failed(&sent, &collected)
    );
    assert_eq!(collected.connections, 1, "the receiver's server lived");
    // Everything got acked: the inbox empties.
    cim_tests::wait_until(
        "the receiver's inbox to empty",
        Duration::from_secs(10),
        || {
            let store = store.clone();
            async move { store.inbox_len(receiver_id).await.is_ok_and(|n| n == 0) }
        },
    )
    .await?;
    drop(survivor);
    Ok(())
}

/// Sends reported failed whose message arrived anyway (a forward whose answer was lost may
/// have been stored: allowed, as long as it arrives once and in order).
fn received_failed(sent: &[Sent], collected: &cim_tests::cluster::Collected) -> usize {
    sent.iter()
        .filter(|s| !s.accepted())
        .filter(|s| collected.received.iter().any(|r| r.message.id == s.id))
        .count()
}
