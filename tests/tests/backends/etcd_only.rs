//! What only a real etcd can show: leases, prefixes, restarts.

use super::*;

#[tokio::test]
pub(crate) async fn dropped_registration_expires_with_its_lease() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let reg = registry_on(&etcd).await;
    let mut rx = reg.watch(ServiceKind::Server).await?;
    let ttl = Duration::from_secs(1);
    let a = reg
        .register(ServiceKind::Server, &server("srv-a"), ttl)
        .await?;
    let _b = reg
        .register(ServiceKind::Server, &server("srv-b"), ttl)
        .await?;
    wait_members(&mut rx, "both servers", DEADLINE, |m| m.len() == 2).await?;

    // Kept alive well past its TTL while held.
    let lost = wait_members(&mut rx, "srv-a to be lost", ttl * 3, |m| {
        !registry::contains(m, "srv-a")
    })
    .await;
    assert!(lost.is_err(), "a live registration expired: {lost:?}");

    // A crash: no deregistration, the keep-alive stops, the lease expires.
    let dropped_at = std::time::Instant::now();
    drop(a);
    let list = wait_members(&mut rx, "srv-a to expire", ttl + DEADLINE, |m| {
        !registry::contains(m, "srv-a")
    })
    .await?;
    assert_eq!(ids(&list), ["srv-b"]);
    let took = dropped_at.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "gone after {took:?}: removed, not expired?"
    );
    Ok(())
}

#[tokio::test]
pub(crate) async fn registration_comes_back_when_its_lease_is_lost() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let prefix = format!("/{}", unique_prefix());
    let reg = EtcdRegistry::connect(&[etcd.endpoint()], &prefix, CALL_TIMEOUT).await?;
    let mut rx = reg.watch(ServiceKind::Server).await?;
    let ttl = Duration::from_secs(1);
    let _a = reg
        .register(ServiceKind::Server, &server("srv-a"), ttl)
        .await?;
    wait_members(&mut rx, "srv-a", DEADLINE, |m| m.len() == 1).await?;

    // The lease disappears behind the keeper's back (as after a long pause past the TTL).
    let mut client = etcd.client().await?;
    let key = format!("{prefix}/servers/srv-a");
    let lease = client.get(key.as_str(), None).await?.kvs()[0].lease();
    client.lease_revoke(lease).await?;
    wait_members(&mut rx, "srv-a to go with its lease", DEADLINE, |m| {
        m.is_empty()
    })
    .await?;

    // The keeper notices and registers again under a new lease.
    let list = wait_members(&mut rx, "srv-a to come back", DEADLINE, |m| m.len() == 1).await?;
    assert_eq!(list[0], server("srv-a"));
    let new_lease = client.get(key.as_str(), None).await?.kvs()[0].lease();
    assert_ne!(new_lease, lease);
    Ok(())
}

#[tokio::test]
pub(crate) async fn registries_share_a_prefix_only() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let prefix = format!("/{}", unique_prefix());
    let one = EtcdRegistry::connect(&[etcd.endpoint()], &prefix, CALL_TIMEOUT).await?;
    let two = EtcdRegistry::connect(&[etcd.endpoint()], &prefix, CALL_TIMEOUT).await?;
    // A prefix that extends ours must not be seen by it.
    let longer =
        EtcdRegistry::connect(&[etcd.endpoint()], &format!("{prefix}x"), CALL_TIMEOUT).await?;
    let ttl = Duration::from_secs(10);
    let _a = one
        .register(ServiceKind::Server, &server("srv-a"), ttl)
        .await?;
    let _x = longer
        .register(ServiceKind::Server, &server("srv-x"), ttl)
        .await?;

    let mut rx = two.watch(ServiceKind::Server).await?;
    assert_eq!(ids(&rx.borrow_and_update()), ["srv-a"]);
    let _b = one
        .register(ServiceKind::Server, &server("srv-b"), ttl)
        .await?;
    let list = wait_members(&mut rx, "srv-b", DEADLINE, |m| m.len() == 2).await?;
    assert_eq!(ids(&list), ["srv-a", "srv-b"]);
    let longer_rx = longer.watch(ServiceKind::Server).await?;
    assert_eq!(ids(&longer_rx.borrow()), ["srv-x"]);
    Ok(())
}

#[tokio::test]
pub(crate) async fn registry_follows_an_etcd_restart() -> anyhow::Result<()> {
    let mut etcd = Etcd::start().await?;
    let reg = registry_on(&etcd).await;
    let mut rx = reg.watch(ServiceKind::Server).await?;
    let ttl = Duration::from_secs(2);
    let _a = reg
        .register(ServiceKind::Server, &server("srv-a"), ttl)
        .await?;
    wait_members(&mut rx, "srv-a", DEADLINE, |m| m.len() == 1).await?;

    etcd.restart().await?;
    // The watcher reconnects and sees a registration made after the restart; the old one is
    // still (or again) registered.
    let _b = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match reg
                .register(ServiceKind::Server, &server("srv-b"), ttl)
                .await
            {
                Ok(r) => return r,
                // The client may need a moment to reconnect: there is no event for that.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await?;
    let list = wait_members(
        &mut rx,
        "both servers after the restart",
        Duration::from_secs(20),
        |m| m.len() == 2,
    )
    .await?;
    assert_eq!(ids(&list), ["srv-a", "srv-b"]);
    Ok(())
}
