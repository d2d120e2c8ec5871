//! Connecting the backends from their config.

use super::*;

#[tokio::test]
pub(crate) async fn backends_connect_to_the_testkit_and_fail_fast_without_it() -> anyhow::Result<()>
{
    let infra = Infra::start().await?;
    let config = infra.backend_config(&unique_prefix());
    let backends = cim_common::backend::Backends::connect(&config)
        .await
        .map_err(anyhow::Error::msg)?;
    let id = backends.store.create_user("dora", "pw").await?.unwrap();
    assert_eq!(backends.store.user_name(id).await?.as_deref(), Some("dora"));
    let rx = backends.registry.watch(ServiceKind::Route).await?;
    assert!(rx.borrow().is_empty());

    let (redis_port, etcd_endpoint) = (infra.redis.single().port(), infra.etcd.endpoint());
    drop(infra);
    let started = std::time::Instant::now();
    let mut dead = config.clone();
    dead.etcd_endpoints = vec![etcd_endpoint];
    let err = match cim_common::backend::Backends::connect(&dead).await {
        Ok(_) => panic!("connected to dead backends"),
        Err(e) => e,
    };
    assert!(err.starts_with("redis at"), "{err}");
    assert!(err.contains(&redis_port.to_string()), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    Ok(())
}

#[tokio::test]
pub(crate) async fn memory_backends_are_shared_by_their_clones() -> anyhow::Result<()> {
    // Standalone mode gives one clone to the route and one to the server: both must see the
    // same users and the same members.
    let route_side = cim_common::backend::Backends::memory();
    let server_side = route_side.clone();
    let id = route_side.store.create_user("dora", "pw").await?.unwrap();
    assert_eq!(
        server_side.store.user_name(id).await?.as_deref(),
        Some("dora")
    );
    let rx = route_side.registry.watch(ServiceKind::Server).await?;
    let _s = server_side
        .registry
        .register(
            ServiceKind::Server,
            &server("srv-a"),
            Duration::from_secs(10),
        )
        .await?;
    assert_eq!(ids(&rx.borrow()), ["srv-a"]);
    // A fresh pair shares nothing with them.
    let other = cim_common::backend::Backends::memory();
    assert_eq!(other.store.user_name(id).await?, None);
    Ok(())
}
