//! The registry under test ([`RegistryUnderTest`]) and the registry suite, against both registries.

use super::*;

pub(crate) fn server(id: &str) -> ServiceInfo {
    ServiceInfo {
        id: id.to_string(),
        tcp_addr: format!("127.0.0.1:{}", 9000 + id.len()),
        ws_addr: "127.0.0.1:9001".into(),
        internal_addr: "127.0.0.1:9100".into(),
        ..ServiceInfo::default()
    }
}

pub(crate) fn route_member(id: &str) -> ServiceInfo {
    ServiceInfo {
        id: id.to_string(),
        http_addr: "127.0.0.1:8080".into(),
        ..ServiceInfo::default()
    }
}

pub(crate) use cim_tests::{member_ids as ids, wait_members};

pub(crate) async fn registry_on(etcd: &Etcd) -> EtcdRegistry {
    EtcdRegistry::connect(
        &[etcd.endpoint()],
        &format!("/{}", unique_prefix()),
        CALL_TIMEOUT,
    )
    .await
    .expect("connect to etcd")
}

pub(crate) enum RegistryBackend {
    /// A real etcd (kept running by the struct) and the prefix of this test.
    Etcd {
        etcd: Etcd,
        prefix: String,
    },
    Memory(MemoryRegistry),
}

/// One implementation of [`Registry`], fresh and empty. Derefs to the registry.
pub(crate) struct RegistryUnderTest {
    pub(crate) registry: Arc<dyn Registry>,
    pub(crate) backend: RegistryBackend,
}

impl Deref for RegistryUnderTest {
    type Target = dyn Registry;

    fn deref(&self) -> &Self::Target {
        self.registry.as_ref()
    }
}

impl RegistryUnderTest {
    pub(crate) async fn etcd() -> anyhow::Result<Self> {
        let etcd = Etcd::start().await?;
        let prefix = format!("/{}", unique_prefix());
        let registry = EtcdRegistry::connect(&[etcd.endpoint()], &prefix, CALL_TIMEOUT).await?;
        Ok(Self {
            registry: Arc::new(registry),
            backend: RegistryBackend::Etcd { etcd, prefix },
        })
    }

    pub(crate) fn memory() -> Self {
        let registry = MemoryRegistry::new();
        Self {
            registry: Arc::new(registry.clone()),
            backend: RegistryBackend::Memory(registry),
        }
    }

    /// Another client of the same registry: a second connection (another process) for
    /// etcd, a clone for memory (where the process is the registry).
    pub(crate) async fn another_client(&self) -> anyhow::Result<Arc<dyn Registry>> {
        Ok(match &self.backend {
            RegistryBackend::Etcd { etcd, prefix } => {
                Arc::new(EtcdRegistry::connect(&[etcd.endpoint()], prefix, CALL_TIMEOUT).await?)
            }
            RegistryBackend::Memory(registry) => Arc::new(registry.clone()),
        })
    }
}

pub(crate) async fn watcher_sees_registrations_sorted_by_id(
    r: &RegistryUnderTest,
) -> anyhow::Result<()> {
    let mut rx = r.watch(ServiceKind::Server).await?;
    assert!(rx.borrow().is_empty());

    let ttl = Duration::from_secs(10);
    let _b = r
        .register(ServiceKind::Server, &server("srv-b"), ttl)
        .await?;
    let _a = r
        .register(ServiceKind::Server, &server("srv-a"), ttl)
        .await?;
    let list = wait_members(&mut rx, "both servers", DEADLINE, |m| m.len() == 2).await?;
    assert_eq!(ids(&list), ["srv-a", "srv-b"]);
    assert_eq!(list[0], server("srv-a"), "advertised addresses round-trip");
    assert_eq!(list[1], server("srv-b"));
    assert!(registry::contains(&list, "srv-a"));
    assert!(!registry::contains(&list, "srv-c"));
    Ok(())
}

pub(crate) async fn deregister_removes_at_once(r: &RegistryUnderTest) -> anyhow::Result<()> {
    let mut rx = r.watch(ServiceKind::Server).await?;
    // A long TTL: only deregistration, not expiry, can remove it within the deadline.
    let ttl = Duration::from_secs(60);
    let a = r
        .register(ServiceKind::Server, &server("srv-a"), ttl)
        .await?;
    let _b = r
        .register(ServiceKind::Server, &server("srv-b"), ttl)
        .await?;
    wait_members(&mut rx, "both servers", DEADLINE, |m| m.len() == 2).await?;

    a.deregister().await?;
    let list = wait_members(&mut rx, "srv-a to go", Duration::from_secs(3), |m| {
        !registry::contains(m, "srv-a")
    })
    .await?;
    assert_eq!(ids(&list), ["srv-b"]);
    Ok(())
}

pub(crate) async fn a_dropped_registration_leaves_the_list(
    r: &RegistryUnderTest,
) -> anyhow::Result<()> {
    let mut rx = r.watch(ServiceKind::Server).await?;
    // etcd: the lease runs out after the TTL (how long exactly is the etcd-only test's
    // business); memory: no lease, gone at once.
    let ttl = Duration::from_secs(1);
    let a = r
        .register(ServiceKind::Server, &server("srv-a"), ttl)
        .await?;
    let _b = r
        .register(ServiceKind::Server, &server("srv-b"), ttl)
        .await?;
    wait_members(&mut rx, "both servers", DEADLINE, |m| m.len() == 2).await?;

    // A crash: no deregistration.
    drop(a);
    let list = wait_members(&mut rx, "srv-a to leave", ttl + DEADLINE, |m| {
        !registry::contains(m, "srv-a")
    })
    .await?;
    assert_eq!(ids(&list), ["srv-b"], "the held registration stays");
    Ok(())
}

pub(crate) async fn late_watcher_sees_the_current_list(
    r: &RegistryUnderTest,
) -> anyhow::Result<()> {
    let ttl = Duration::from_secs(10);
    let _c = r
        .register(ServiceKind::Server, &server("srv-c"), ttl)
        .await?;
    let _a = r
        .register(ServiceKind::Server, &server("srv-a"), ttl)
        .await?;

    // The same client, and another one, watching after the fact: the first value is loaded
    // before `watch` returns.
    let rx = r.watch(ServiceKind::Server).await?;
    assert_eq!(ids(&rx.borrow()), ["srv-a", "srv-c"]);
    let other = r.another_client().await?;
    let rx = other.watch(ServiceKind::Server).await?;
    assert_eq!(ids(&rx.borrow()), ["srv-a", "srv-c"]);
    Ok(())
}

pub(crate) async fn servers_and_routes_are_listed_apart(
    r: &RegistryUnderTest,
) -> anyhow::Result<()> {
    let mut servers = r.watch(ServiceKind::Server).await?;
    let mut routes = r.watch(ServiceKind::Route).await?;
    let ttl = Duration::from_secs(10);
    let _s = r.register(ServiceKind::Server, &server("x-1"), ttl).await?;
    let _r = r
        .register(ServiceKind::Route, &route_member("x-2"), ttl)
        .await?;

    let s = wait_members(&mut servers, "the server", DEADLINE, |m| !m.is_empty()).await?;
    let rl = wait_members(&mut routes, "the route", DEADLINE, |m| !m.is_empty()).await?;
    assert_eq!(ids(&s), ["x-1"]);
    assert_eq!(ids(&rl), ["x-2"]);
    assert_eq!(rl[0], route_member("x-2"));
    // Same id in both kinds: two members, one per list.
    let _r2 = r
        .register(ServiceKind::Route, &route_member("x-1"), ttl)
        .await?;
    let rl = wait_members(&mut routes, "the second route", DEADLINE, |m| m.len() == 2).await?;
    assert_eq!(ids(&rl), ["x-1", "x-2"]);
    assert_eq!(ids(&servers.borrow()), ["x-1"]);
    Ok(())
}
