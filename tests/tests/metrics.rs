//! `/metrics` of a real cluster (one server, one route, real Redis and etcd): users log in
//! over TCP and WebSocket, exchange messages, one disconnects; the values scraped from the
//! server's and the route's internal listeners are checked exactly. Also: no user id, name or
//! address ever appears as a label value, and backend errors are counted when Redis or etcd
//! dies.
//!
//! Every wait polls `/metrics` until the value appears, within a deadline: the counters are
//! updated by tasks of the nodes (a session ends after the client closed), which no event
//! reports to the test.

use cim_sdk::{pb, Connection, Transport};
use cim_tests::cluster::Cluster;
use std::{net::SocketAddr, time::Duration};

const DEADLINE: Duration = Duration::from_secs(15);

/// One scrape: the samples of a `/metrics` answer.
struct Scrape {
    text: String,
    samples: Vec<cim_common::metrics::Sample>,
}

impl Scrape {
    /// The value of `name{labels}` (exactly these labels, in any order).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        cim_common::metrics::find_sample(&self.samples, name, labels)
    }

    /// [`Scrape::get`], 0 when the series does not exist (yet).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    fn label_values(&self) -> impl Iterator<Item = &str> {
        self.samples
            .iter()
            .flat_map(|(_, l, _)| l.iter().map(|(_, v)| v.as_str()))
    }
}

async fn scrape(addr: SocketAddr) -> anyhow::Result<Scrape> {
    let response = reqwest::get(format!("http://{addr}/metrics")).await?;
    anyhow::ensure!(response.status().is_success(), "{}", response.status());
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    anyhow::ensure!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let text = response.text().await?;
    let samples = cim_common::metrics::parse_text(&text);
    Ok(Scrape { text, samples })
}

/// Scrapes `addr` until `check` holds, within [`DEADLINE`]; the last scrape.
async fn until(
    addr: SocketAddr,
    what: &str,
    check: impl Fn(&Scrape) -> bool,
) -> anyhow::Result<Scrape> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let s = scrape(addr).await?;
        if check(&s) {
            return Ok(s);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("{what}: not within {DEADLINE:?}; last scrape:\n{}", s.text);
        }
        tokio::time::sleep(cim_tests::POLL_INTERVAL).await;
    }
}

#[tokio::test]
async fn a_cluster_counts_logins_frames_messages_and_disconnects() -> anyhow::Result<()> {
    let cluster = Cluster::builder().servers(1).routes(1).start().await?;
    let server = cluster.servers[0].internal_addr;
    let route = cluster.routes[0].internal_addr;

    let s = scrape(server).await?;
    assert_eq!(
        s.get("cim_server_connections", &[("transport", "tcp")]),
        Some(0.0)
    );
    assert_eq!(
        s.get("cim_server_connections", &[("transport", "ws")]),
        Some(0.0)
    );
    assert_eq!(s.get("cim_server_logins_total", &[]), Some(0.0));
    assert_eq!(
        s.get("cim_backend_errors_total", &[("backend", "redis")]),
        Some(0.0)
    );
    assert_eq!(
        s.get("cim_backend_errors_total", &[("backend", "etcd")]),
        Some(0.0)
    );
    assert!(s.get("process_resident_memory_bytes", &[]).unwrap() > 0.0);
    assert!(s.get("process_open_fds", &[]).unwrap() > 0.0);
    assert!(s.get("process_cpu_seconds_total", &[]).is_some());
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(s.get("cim_build_info", &[("version", version)]), Some(1.0));
    // The public listener serves no metrics.
    let public = reqwest::get(format!("{}/metrics", cluster.routes[0].url())).await?;
    assert_eq!(public.status(), reqwest::StatusCode::NOT_FOUND);

    let mut alice = cluster.user("alice", Transport::Tcp).await?;
    let mut bob = cluster.user("bob", Transport::WsBinary).await?;
    let r = alice.send_private(bob.id(), "hi bob").await?;
    assert_eq!(r.status(), pb::SendStatus::Delivered, "{r:?}");
    assert_eq!(bob.next_message().await?.body, "hi bob");
    let r = bob.send_private(alice.id(), "hi alice").await?;
    assert_eq!(r.status(), pb::SendStatus::Delivered, "{r:?}");
    assert_eq!(alice.next_message().await?.body, "hi alice");
    let r = alice.send_group("hi all").await?;
    assert_eq!((r.status(), r.delivered), (pb::SendStatus::Delivered, 1));
    assert_eq!(bob.next_message().await?.body, "hi all");

    // A wrong password at the route, a forged token at the server.
    let refused = cluster.route().login("alice", "wrong password").await;
    assert!(refused.is_err());
    let mut forged = Connection::connect(&alice.login.server.tcp_addr, Transport::Tcp).await?;
    assert!(forged.login("not-a-token").await.is_err());
    drop(forged);

    let s = until(server, "the forged login counted", |s| {
        s.value(
            "cim_server_login_failures_total",
            &[("reason", "invalid_token")],
        ) == 1.0
    })
    .await?;
    assert_eq!(
        s.get("cim_server_logins_total", &[]),
        Some(2.0),
        "{}",
        s.text
    );
    assert_eq!(
        s.get("cim_server_connections", &[("transport", "ws")]),
        Some(1.0)
    );
    let frames_in = |kind: &str| s.value("cim_server_frames_in_total", &[("kind", kind)]);
    let frames_out = |kind: &str| s.value("cim_server_frames_out_total", &[("kind", kind)]);
    assert_eq!(frames_in("login"), 3.0, "{}", s.text);
    assert_eq!(frames_in("send"), 3.0, "{}", s.text);
    assert_eq!(frames_out("login_result"), 2.0, "{}", s.text);
    assert_eq!(frames_out("send_result"), 3.0, "{}", s.text);
    assert_eq!(frames_out("push"), 3.0, "{}", s.text);
    assert_eq!(frames_out("error"), 1.0, "{}", s.text);
    assert!(s.get("cim_server_forward_call_seconds_count", &[]).unwrap() >= 1.0);
    assert_eq!(s.get("cim_server_forward_queue_depth", &[]), Some(0.0));
    assert_eq!(s.get("cim_server_held_senders", &[]), Some(0.0));

    let r = scrape(route).await?;
    assert_eq!(
        r.get("cim_route_logins_total", &[]),
        Some(2.0),
        "{}",
        r.text
    );
    assert_eq!(
        r.get(
            "cim_route_login_failures_total",
            &[("reason", "bad_credentials")]
        ),
        Some(1.0),
        "{}",
        r.text
    );
    let routed = |r: &Scrape, kind: &str, outcome: &str| {
        r.value(
            "cim_route_messages_total",
            &[("kind", kind), ("outcome", outcome)],
        )
    };
    assert_eq!(routed(&r, "private", "delivered"), 2.0, "{}", r.text);
    assert_eq!(routed(&r, "group", "delivered"), 1.0, "{}", r.text);
    assert!(r.get("cim_route_push_call_seconds_count", &[]).unwrap() >= 2.0);
    assert!(r.get("cim_route_inbox_store_seconds_count", &[]).unwrap() >= 2.0);
    assert_eq!(r.get("cim_route_sse_subscribers", &[]), Some(0.0));
    assert_eq!(
        r.get("cim_backend_errors_total", &[("backend", "redis")]),
        Some(0.0)
    );

    let alice_id = alice.id();
    // Alice disconnects: the TCP gauge goes back down, the disconnect is counted with the
    // reason of its presence event, and a message to her is stored.
    drop(alice);
    let s = until(server, "alice's disconnect", |s| {
        s.value("cim_server_disconnects_total", &[("reason", "closed")]) == 1.0
            && s.get("cim_server_connections", &[("transport", "tcp")]) == Some(0.0)
    })
    .await?;
    assert_eq!(
        s.get("cim_server_connections", &[("transport", "ws")]),
        Some(1.0)
    );
    let r = bob
        .send(pb::Send {
            kind: pb::MessageKind::Private as i32,
            to_user_name: "alice".into(),
            body: "are you there?".into(),
            ..Default::default()
        })
        .await?;
    assert_eq!(r.status(), pb::SendStatus::Stored, "{r:?}");
    let nobody = bob
        .send(pb::Send {
            kind: pb::MessageKind::Private as i32,
            to_user_name: "nobody".into(),
            body: "?".into(),
            ..Default::default()
        })
        .await?;
    assert_eq!(nobody.status(), pb::SendStatus::Failed);
    let r = until(route, "the stored message", |r| {
        routed(r, "private", "stored") == 1.0
    })
    .await?;
    assert_eq!(
        routed(&r, "private", "failed_unknown_user"),
        1.0,
        "{}",
        r.text
    );

    // No user id, name or address is a label value, in either answer.
    let s = scrape(server).await?;
    let ids = [alice_id.to_string(), bob.id().to_string()];
    let forbidden = [
        "alice".to_string(),
        "bob".to_string(),
        "nobody".to_string(),
        "127.0.0.1".to_string(),
        cluster.servers[0].id.clone(),
        cluster.routes[0].id.clone(),
    ];
    for scrape in [&s, &r] {
        for value in scrape.label_values() {
            assert!(
                !ids.iter().any(|id| value == id)
                    && !forbidden.iter().any(|f| value.contains(f.as_str())),
                "label value {value:?} names a user, an instance or an address:\n{}",
                scrape.text
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn backend_errors_are_counted_when_redis_or_etcd_is_gone() -> anyhow::Result<()> {
    let mut cluster = Cluster::builder().servers(1).routes(1).start().await?;
    let route = cluster.routes[0].internal_addr;
    cluster.register_and_login("carol").await?;
    let before = scrape(route).await?;
    assert_eq!(
        before.get("cim_backend_errors_total", &[("backend", "redis")]),
        Some(0.0)
    );

    cluster.infra.redis.single_mut().kill();
    // One login: one failed store call (the account lookup), answered 503.
    let refused = cluster.route().login("carol", "password-carol").await;
    assert!(refused.is_err());
    let after = until(route, "the failed Redis call", |r| {
        r.value("cim_backend_errors_total", &[("backend", "redis")]) >= 1.0
    })
    .await?;
    assert_eq!(
        after.get("cim_backend_errors_total", &[("backend", "redis")]),
        Some(1.0),
        "{}",
        after.text
    );
    assert_eq!(
        after.get("cim_backend_errors_total", &[("backend", "etcd")]),
        Some(0.0)
    );
    assert_eq!(
        after.get(
            "cim_route_login_failures_total",
            &[("reason", "unavailable")]
        ),
        Some(1.0),
        "{}",
        after.text
    );

    // etcd gone: the server's registry watch breaks (and its lease keep-alive fails).
    let server = cluster.servers[0].internal_addr;
    cluster.infra.etcd.kill();
    until(server, "a failed etcd call", |s| {
        s.value("cim_backend_errors_total", &[("backend", "etcd")]) >= 1.0
    })
    .await?;
    Ok(())
}
