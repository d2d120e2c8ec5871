//! [`FaultyStore`]: the in-memory store with fault injection and call counters, for unit
//! tests of the crates built on the store (error paths, "how many round trips").
//! Compiled only with the `test-support` feature, which only dev-dependencies enable: the
//! product types stay free of test knobs.
//!
//! It is the memory store under the [`Faults`] hook ([`super::layer`]): the knobs and
//! counters are the hook's fields, read on the store itself (`store.fail`), and only the
//! calls a test looks at are named here.

use super::{
    layer::{Call, Hook, Layered},
    InboxLimits, MemoryStore, StoreError, StoreResult,
};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// [`MemoryStore`] with fault injection and call counts (see [`Faults`]).
pub type FaultyStore = Layered<MemoryStore, Faults>;

/// The knobs and counters of a [`FaultyStore`]. `fail` makes every call answer
/// `Unavailable`; `hang` makes `user_by_name` never answer (signalling `entered` when a call
/// gets stuck).
#[derive(Default)]
pub struct Faults {
    pub fail: AtomicBool,
    pub hang: AtomicBool,
    pub entered: tokio::sync::Notify,
    pub scans: AtomicUsize,
    /// Route lookups: calls of `routes`, and the lookup of `inbox_store_then_routes`.
    pub route_lookups: AtomicUsize,
    /// Calls of `user_name` and `user_by_name`.
    pub user_lookups: AtomicUsize,
    /// While set, `inbox_read` past the first page (`after_seq > 0`) signals `entered` and
    /// waits for `resume` (one `notify_one` lets one read through).
    pub hold_paged_reads: AtomicBool,
    pub resume: tokio::sync::Notify,
    /// Calls of `inbox_ack`, each signalled on `acked` once done.
    pub ack_calls: AtomicUsize,
    pub acked: tokio::sync::Notify,
}

impl Faults {
    /// Makes every call fail as if Redis were down (`true`), or work again.
    pub fn set_fail(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }

    fn check(&self) -> StoreResult<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("test double set to fail".into()));
        }
        Ok(())
    }
}

impl Hook for Faults {
    async fn before(&self, call: Call) -> StoreResult<()> {
        match call {
            Call::UserByName => {
                self.user_lookups.fetch_add(1, Ordering::SeqCst);
                if self.hang.load(Ordering::SeqCst) {
                    self.entered.notify_one();
                    std::future::pending::<()>().await;
                }
            }
            Call::UserName => {
                self.user_lookups.fetch_add(1, Ordering::SeqCst);
            }
            Call::Routes => {
                self.route_lookups.fetch_add(1, Ordering::SeqCst);
            }
            Call::ServerRoutes => {
                self.scans.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
        self.check()?;
        if let Call::InboxRead { after_seq } = call {
            if after_seq > 0 && self.hold_paged_reads.load(Ordering::SeqCst) {
                self.entered.notify_one();
                self.resume.notified().await;
            }
            // Lets other tasks run first, as the round trip to a real store does: an ordering
            // that only holds because the in-memory read never yields would not hold in Redis.
            tokio::task::yield_now().await;
        }
        Ok(())
    }

    fn after(&self, call: Call, _failed: bool) {
        match call {
            Call::InboxAck => {
                self.ack_calls.fetch_add(1, Ordering::SeqCst);
                self.acked.notify_one();
            }
            // The memory store stores, then looks the routes up (the lookup a `routes` call
            // would count).
            Call::InboxStoreThenRoutes => {
                self.route_lookups.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
    }
}

impl FaultyStore {
    /// Sets the inbox bounds of the store underneath.
    #[must_use]
    pub fn with_inbox_limits(self, limits: InboxLimits) -> Self {
        self.map_inner(|inner| inner.with_inbox_limits(limits))
    }
}
