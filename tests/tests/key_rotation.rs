//! Rotating the cluster secret across a running cluster (README "Key rotation"): real etcd
//! and Redis, servers and routes with different secret settings side by side, as during the
//! rolling restarts of a rotation.

use cim_common::{
    cluster::{ClusterClient, ClusterError},
    pb::cluster::{PresenceRequest, PresenceResponse},
};
use cim_route::RouteConfig;
use cim_sdk::{pb::SendStatus, RouteClient, Transport};
use cim_server::ServerConfig;
use cim_tests::cluster::{test_password, Cluster, RouteNode, ServerNode, TestUser, TEST_SECRET};
use std::time::Duration;

const OLD: &str = TEST_SECRET;
const NEW: &str = "the-rotated-cluster-secret-0123";

fn owned(secrets: &[&str]) -> Vec<String> {
    secrets.iter().map(|s| s.to_string()).collect()
}

/// A server of `cluster` with `current` and `previous` secrets, without the legacy form
/// (this test is about rotation; the legacy form has its own tests in cim-common).
fn server_with(cluster: &Cluster, current: &str, previous: &[&str]) -> ServerConfig {
    cluster.server_config(&|c: &mut ServerConfig| {
        c.cluster_secret = current.into();
        c.previous_cluster_secrets = owned(previous);
        c.legacy_secret = false;
    })
}

/// A route, as [`server_with`].
fn route_with(cluster: &Cluster, current: &str, previous: &[&str]) -> RouteConfig {
    cluster.route_config(&|c: &mut RouteConfig| {
        c.cluster_secret = current.into();
        c.previous_cluster_secrets = owned(previous);
        c.legacy_secret = false;
    })
}

async fn sees_servers(route: &RouteClient, n: usize) -> anyhow::Result<()> {
    cim_tests::wait_until(
        "the route to see the servers",
        Duration::from_secs(10),
        || {
            let route = route.clone();
            async move { route.servers().await.is_ok_and(|s| s.len() == n) }
        },
    )
    .await
}

/// Registers and logs `name` in through `route`, then connects over TCP.
async fn user(route: &RouteClient, name: &str) -> anyhow::Result<TestUser> {
    route.register(name, &test_password(name)).await?;
    let login = route.login(name, &test_password(name)).await?;
    TestUser::connect(login, Transport::Tcp).await
}

/// An internal call to a server, authenticated with `secret` alone.
async fn presence(server: &ServerNode, secret: &str) -> Result<PresenceResponse, ClusterError> {
    ClusterClient::new(secret, Duration::from_secs(5))
        .call(
            &server.internal_addr.to_string(),
            "/internal/presence",
            &PresenceRequest::default(),
        )
        .await
}

fn unauthorized(result: Result<impl std::fmt::Debug, ClusterError>) -> bool {
    matches!(result, Err(ClusterError::Status { status, .. }) if status.as_u16() == 401)
}

#[tokio::test]
async fn a_rotation_keeps_old_and_new_nodes_talking_until_the_old_secret_is_dropped(
) -> anyhow::Result<()> {
    let cluster = Cluster::builder().servers(0).routes(0).start().await?;
    // Mid-rotation: the server is on the new secret and still lists the old one; the route
    // has not been restarted yet and knows only the old one.
    let server = ServerNode::start(server_with(&cluster, NEW, &[OLD])).await?;
    let old_route = RouteNode::start(route_with(&cluster, OLD, &[])).await?;
    let r_old = old_route.client();
    sees_servers(&r_old, 1).await?;

    // Logins through the old route: its connect tokens (old secret) verify on the server,
    // and its presence probe (route → server, old proof) is accepted.
    let mut alice = user(&r_old, "alice").await?;
    let mut bob = user(&r_old, "bob").await?;
    // Server → route (forward: the server's proofs include the old secret's) and route →
    // server (push, old proof).
    let r = alice.send_private(bob.id(), "over the rotation").await?;
    assert_eq!(r.status(), SendStatus::Delivered, "{r:?}");
    assert_eq!(bob.next_message().await?.body, "over the rotation");

    // A rotated route joins: it takes the old route's session tokens, and its own connect
    // tokens (new secret) verify on the server.
    let new_route = RouteNode::start(route_with(&cluster, NEW, &[OLD])).await?;
    let r_new = new_route.client();
    sees_servers(&r_new, 1).await?;
    let sent = r_new
        .send_private(
            &alice.login.session_token,
            bob.id(),
            "through the new route",
        )
        .await?;
    assert_eq!(sent.status, "delivered", "{sent:?}");
    assert_eq!(bob.next_message().await?.body, "through the new route");
    let mut carol = user(&r_new, "carol").await?;
    let r = carol.send_private(alice.id(), "hi from carol").await?;
    assert_eq!(r.status(), SendStatus::Delivered, "{r:?}");
    assert_eq!(alice.next_message().await?.body, "hi from carol");
    // The other way, a route that has only the old secret refuses the new route's session
    // tokens: why the procedure lists the new secret everywhere first. A route in that first
    // step (old secret current, new one listed) takes them.
    let refused = r_old
        .send_private(&carol.login.session_token, alice.id(), "x")
        .await
        .unwrap_err();
    assert_eq!(refused.status(), Some(401), "{refused}");
    let staged_route = RouteNode::start(route_with(&cluster, OLD, &[NEW])).await?;
    let sent = staged_route
        .client()
        .send_private(&carol.login.session_token, alice.id(), "staged")
        .await?;
    assert_eq!(sent.status, "delivered", "{sent:?}");
    assert_eq!(alice.next_message().await?.body, "staged");

    // The rotation ends: every node restarted with the new secret alone.
    drop((alice, bob, carol));
    for route in [old_route, new_route, staged_route] {
        route.shutdown().await?;
    }
    server.shutdown().await?;
    let server = ServerNode::start(server_with(&cluster, NEW, &[])).await?;
    let route = RouteNode::start(route_with(&cluster, NEW, &[])).await?;
    let r = route.client();
    sees_servers(&r, 1).await?;
    let mut dave = user(&r, "dave").await?;
    let mut erin = user(&r, "erin").await?;
    let sent = dave.send_private(erin.id(), "after the rotation").await?;
    assert_eq!(sent.status(), SendStatus::Delivered, "{sent:?}");
    assert_eq!(erin.next_message().await?.body, "after the rotation");
    // Internal calls with the old secret are refused now, with the new one answered.
    assert!(unauthorized(presence(&server, OLD).await));
    presence(&server, NEW).await?;
    // And tokens of the old secret: a session token signed by the old route...
    let old_token =
        cim_common::token::TokenSigner::new(OLD).sign_session(&cim_common::token::SessionClaims {
            user_id: dave.id(),
            user_name: "dave".into(),
            session: "any".into(),
            exp_ms: i64::MAX,
            generation: 0,
        });
    let refused = r
        .send_private(&old_token, erin.id(), "x")
        .await
        .unwrap_err();
    assert_eq!(refused.status(), Some(401), "{refused}");
    assert!(
        refused.to_string().contains("invalid session token"),
        "{refused}"
    );
    // ...and a connect token the old route would have made for this server.
    let mut login = dave.login.clone();
    login.connect_token =
        cim_common::token::TokenSigner::new(OLD).sign_connect(&cim_common::token::ConnectClaims {
            user_id: dave.id(),
            user_name: "dave".into(),
            server_id: server.id.clone(),
            session: "any".into(),
            exp_ms: i64::MAX,
        });
    drop(dave);
    let refused = match TestUser::connect(login, Transport::Tcp).await {
        Ok(_) => panic!("a connect token of the dropped secret logged in"),
        Err(e) => format!("{e:#}"),
    };
    assert!(refused.contains("invalid"), "{refused}");
    Ok(())
}
