//! [`Registry`] in memory: the registry of standalone mode (a route and a server in one
//! process) and of unit tests.
//!
//! Members are kept per kind and published through one [`watch`] channel per kind, sorted by
//! id, like the etcd registry's lists. There is no lease: inside one process a member cannot
//! die without the registry dying with it, so a [`Registration`] is removed when it is
//! deregistered *or dropped* (a drop is what a crash looks like, and takes effect at once
//! instead of after a TTL). The `ttl` of `register` is therefore ignored.
//!
//! Registering an id that is already registered replaces its entry (an etcd put on the same
//! key); the older registration then no longer owns the entry and removes nothing.

use super::*;
use std::{
    collections::BTreeMap,
    sync::{Mutex, PoisonError},
};

/// The members of one kind: id → (owner token, info).
struct Kind {
    entries: Mutex<BTreeMap<String, (u64, ServiceInfo)>>,
    published: watch::Sender<Members>,
}

impl Default for Kind {
    fn default() -> Self {
        Self {
            entries: Mutex::default(),
            published: watch::Sender::new(Members::default()),
        }
    }
}

impl Kind {
    /// Applies `change` and publishes the new list, under the lock so that publications come
    /// out in the order of the changes.
    fn update(&self, change: impl FnOnce(&mut BTreeMap<String, (u64, ServiceInfo)>) -> bool) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if change(&mut entries) {
            // BTreeMap order is id order: the list comes out sorted, as `contains` expects.
            let list = entries.values().map(|(_, info)| info.clone()).collect();
            // `send_replace` updates the value even while nobody watches (`send` would not).
            self.published.send_replace(Arc::new(list));
        }
    }
}

#[derive(Default)]
struct Inner {
    servers: Kind,
    routes: Kind,
    next_token: std::sync::atomic::AtomicU64,
}

impl Inner {
    fn kind(&self, kind: ServiceKind) -> &Kind {
        match kind {
            ServiceKind::Server => &self.servers,
            ServiceKind::Route => &self.routes,
        }
    }

    fn remove(&self, kind: ServiceKind, id: &str, token: u64) {
        self.kind(kind).update(|entries| {
            if entries.get(id).is_some_and(|(owner, _)| *owner == token) {
                entries.remove(id);
                true
            } else {
                false
            }
        });
    }
}

/// In-memory registry for one process. Clones share the same members.
#[derive(Clone, Default)]
pub struct MemoryRegistry {
    inner: Arc<Inner>,
}

impl MemoryRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// The current list of `kind` (what a watcher sees now), sorted by id.
    pub fn members(&self, kind: ServiceKind) -> Members {
        self.inner.kind(kind).published.borrow().clone()
    }
}

/// A member registered in a [`MemoryRegistry`]; removed on deregister or drop.
struct MemoryRegistration {
    inner: Arc<Inner>,
    kind: ServiceKind,
    id: String,
    token: u64,
}

impl Drop for MemoryRegistration {
    fn drop(&mut self) {
        // No lease to run out in one process: leaving now is the crash behaviour.
        self.inner.remove(self.kind, &self.id, self.token);
    }
}

#[async_trait]
impl Registration for MemoryRegistration {
    async fn deregister(self: Box<Self>) -> RegistryResult<()> {
        // Dropping removes the entry.
        Ok(())
    }
}

#[async_trait]
impl Registry for MemoryRegistry {
    async fn register(
        &self,
        kind: ServiceKind,
        info: &ServiceInfo,
        _ttl: Duration,
    ) -> RegistryResult<Box<dyn Registration>> {
        let token = self
            .inner
            .next_token
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.kind(kind).update(|entries| {
            entries.insert(info.id.clone(), (token, info.clone()));
            true
        });
        Ok(Box::new(MemoryRegistration {
            inner: self.inner.clone(),
            kind,
            id: info.id.clone(),
            token,
        }))
    }

    async fn watch(&self, kind: ServiceKind) -> RegistryResult<MembersRx> {
        Ok(self.inner.kind(kind).published.subscribe())
    }
}

#[cfg(test)]
mod tests {
    //! What only the memory registry does: drop = gone at once, and replacing an id. Its
    //! behaviour shared with etcd is tested once for both in `tests/tests/backends/`.

    use super::*;

    fn server(id: &str, tcp: &str) -> ServiceInfo {
        ServiceInfo {
            id: id.into(),
            tcp_addr: tcp.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_dropped_registration_is_gone_at_once() {
        let reg = MemoryRegistry::new();
        let mut rx = reg.watch(ServiceKind::Server).await.unwrap();
        let a = reg
            .register(ServiceKind::Server, &server("a", "h:1"), Duration::ZERO)
            .await
            .unwrap();
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().len(), 1);
        drop(a);
        assert!(rx.has_changed().unwrap(), "the drop was published");
        assert!(rx.borrow_and_update().is_empty());
    }

    #[tokio::test]
    async fn registering_an_id_again_replaces_it_and_the_old_owner_lets_go() {
        let reg = MemoryRegistry::new();
        let old = reg
            .register(ServiceKind::Server, &server("a", "h:1"), Duration::ZERO)
            .await
            .unwrap();
        let new = reg
            .register(ServiceKind::Server, &server("a", "h:2"), Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(
            *reg.members(ServiceKind::Server),
            vec![server("a", "h:2")],
            "one entry per id, the latest"
        );
        old.deregister().await.unwrap();
        assert_eq!(*reg.members(ServiceKind::Server), vec![server("a", "h:2")]);
        new.deregister().await.unwrap();
        assert!(reg.members(ServiceKind::Server).is_empty());
    }
}
