//! Accounts this route has seen exist: user id → exists, name → id. Private messages name
//! their receiver by id or by name, and the route must refuse unknown users; asking the
//! store for every receiver of every batch was one Redis command per distinct receiver and,
//! unloaded, one extra round trip before the message could be stored.
//!
//! Why a cache is safe here (and only here): accounts are immutable. Registration creates a
//! user with a fixed id and name; nothing renames or deletes one. A positive answer
//! therefore never goes stale, and two route instances still answer every request alike.
//! Negative answers are never cached: the user may register a moment later.
//! If accounts ever become deletable or renamable, this cache must learn about it first.
//!
//! Bounded: when a map reaches its capacity ([`DEFAULT_CAPACITY`] entries) it is emptied and refills
//! from the store (a rare, cheap reset instead of LRU bookkeeping on the hot path).

use std::{
    collections::{HashMap, HashSet},
    sync::{Mutex, PoisonError},
};

/// Entries per map by default: a few MiB at most.
pub const DEFAULT_CAPACITY: usize = 262_144;

pub struct KnownUsers {
    capacity: usize,
    inner: Mutex<Known>,
}

#[derive(Default)]
struct Known {
    ids: HashSet<u64>,
    names: HashMap<String, u64>,
}

impl Known {
    fn add_id(&mut self, id: u64, capacity: usize) {
        if self.ids.len() >= capacity {
            self.ids.clear();
        }
        self.ids.insert(id);
    }
}

impl Default for KnownUsers {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl KnownUsers {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            inner: Mutex::new(Known::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether user `id` is known to exist.
    pub fn has_id(&self, id: u64) -> bool {
        self.lock().ids.contains(&id)
    }

    /// The id of the user named `name`, if known.
    pub fn id_of(&self, name: &str) -> Option<u64> {
        self.lock().names.get(name).copied()
    }

    /// Records that user `id` exists (found in the store).
    pub fn learn_id(&self, id: u64) {
        self.lock().add_id(id, self.capacity);
    }

    /// Records that `name` is user `id` (found in the store); the id exists too.
    pub fn learn_name(&self, name: &str, id: u64) {
        let mut known = self.lock();
        if known.names.len() >= self.capacity {
            known.names.clear();
        }
        known.names.insert(name.to_owned(), id);
        known.add_id(id, self.capacity);
    }

    /// Entries held (ids, names).
    pub fn len(&self) -> (usize, usize) {
        let known = self.lock();
        (known.ids.len(), known.names.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_ids_and_names() {
        let known = KnownUsers::default();
        assert!(!known.has_id(7));
        assert_eq!(known.id_of("bob"), None);
        known.learn_name("bob", 7);
        assert!(known.has_id(7), "a name's id exists too");
        assert_eq!(known.id_of("bob"), Some(7));
        assert_eq!(known.id_of("Bob"), None, "names are exact");
        known.learn_id(9);
        assert!(known.has_id(9));
        assert_eq!(known.len(), (2, 1));
    }

    #[test]
    fn stays_within_its_capacity() {
        let known = KnownUsers::new(3);
        for id in 1..=10 {
            known.learn_id(id);
            assert!(known.has_id(id), "the latest is always kept");
            assert!(known.len().0 <= 3);
        }
        for id in 1..=10u64 {
            known.learn_name(&format!("u{id}"), id);
            let (ids, names) = known.len();
            assert!(ids <= 3 && names <= 3, "{ids} {names}");
            assert_eq!(known.id_of(&format!("u{id}")), Some(id));
        }
    }
}
