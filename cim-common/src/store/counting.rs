//! [`CountErrors`]: the [`Hook`] that counts the calls that fail
//! (`cim_backend_errors_total{backend="redis"}`). [`crate::backend::Backends::connect`]
//! wraps the Redis store in it ([`Counting`]), so every store error of a server or a route is
//! counted in one place, whichever call it came from, without touching the store's own code.
//! The store-then-routes pipeline is one round trip: one error, however many of its parts
//! failed.

use super::layer::{Call, Hook, Layered};
use prometheus_client::metrics::counter::Counter;

/// Counts failed calls in its counter.
pub struct CountErrors(Counter);

impl CountErrors {
    pub fn new(errors: Counter) -> Self {
        Self(errors)
    }
}

impl Hook for CountErrors {
    fn after(&self, _call: Call, failed: bool) {
        if failed {
            self.0.inc();
        }
    }
}

/// A store whose failed calls are counted.
pub type Counting<S> = Layered<S, CountErrors>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Accounts, Inbox, MemoryStore};

    #[tokio::test]
    async fn passes_calls_through_and_counts_nothing_while_they_succeed() {
        let errors = Counter::default();
        let store = Counting::new(MemoryStore::new(), CountErrors::new(errors.clone()));
        assert_eq!(store.create_user("ann", "hash").await.unwrap(), Some(1));
        assert_eq!(store.user_name(1).await.unwrap().as_deref(), Some("ann"));
        assert_eq!(store.inbox_top(1).await.unwrap(), 0);
        assert_eq!(errors.get(), 0);
    }
}
