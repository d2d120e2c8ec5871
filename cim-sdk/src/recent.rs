//! A bounded memory of recently received message ids, so the SDK hands each message to the
//! application once even when the cluster delivers it twice.
//!
//! Why it exists before anything duplicates: the delivery guarantees (acks, per-user inbox
//! replayed on reconnect) are at-least-once to the device and rely on the client to make them
//! exactly-once to the user. A replay repeats messages the client saw shortly before it lost
//! its connection, so remembering the last few thousand ids is enough; an id older than that
//! would be delivered again, which the bound makes an explicit, documented trade-off.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

/// How many ids the SDK remembers by default.
pub const DEFAULT_CAPACITY: usize = 4096;

/// The last `capacity` distinct ids, oldest forgotten first.
#[derive(Debug)]
pub(crate) struct RecentIds {
    seen: HashSet<Arc<str>>,
    order: VecDeque<Arc<str>>,
    capacity: usize,
}

impl RecentIds {
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            seen: HashSet::with_capacity(capacity),
            order: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    /// Records `id`; `true` when it was not among the remembered ids (deliver it), `false`
    /// for a duplicate. An empty id cannot be de-duplicated and always counts as new.
    pub(crate) fn insert(&mut self, id: &str) -> bool {
        if id.is_empty() {
            return true;
        }
        if self.seen.contains(id) {
            return false;
        }
        if self.order.len() == self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        let id: Arc<str> = Arc::from(id);
        self.order.push_back(id.clone());
        self.seen.insert(id);
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        debug_assert_eq!(self.seen.len(), self.order.len());
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_id_is_a_duplicate() {
        let mut r = RecentIds::new(8);
        assert!(r.insert("a"));
        assert!(r.insert("b"));
        assert!(!r.insert("a"));
        assert!(!r.insert("b"));
        assert!(r.insert("c"));
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn the_oldest_id_is_forgotten_past_capacity() {
        let mut r = RecentIds::new(3);
        for id in ["1", "2", "3"] {
            assert!(r.insert(id));
        }
        // "4" pushes "1" out: "1" is new again, "3" and "4" are still remembered.
        assert!(r.insert("4"));
        assert_eq!(r.len(), 3);
        assert!(!r.insert("3"));
        assert!(!r.insert("4"));
        assert!(r.insert("1"));
        // ... which in turn pushed out "2".
        assert!(r.insert("2"));
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn a_duplicate_does_not_refresh_or_grow() {
        let mut r = RecentIds::new(2);
        assert!(r.insert("x"));
        assert!(r.insert("y"));
        assert!(!r.insert("x"));
        assert_eq!(r.len(), 2);
        // Insertion order, not last access, decides what goes: "x" is evicted first.
        assert!(r.insert("z"));
        assert!(r.insert("x"));
        assert!(!r.insert("z"));
    }

    #[test]
    fn empty_ids_always_pass_and_take_no_room() {
        let mut r = RecentIds::new(2);
        assert!(r.insert(""));
        assert!(r.insert(""));
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn stays_bounded_under_many_ids() {
        let mut r = RecentIds::new(DEFAULT_CAPACITY);
        for i in 0..3 * DEFAULT_CAPACITY {
            assert!(r.insert(&i.to_string()));
        }
        assert_eq!(r.len(), DEFAULT_CAPACITY);
        // The newest ids are the remembered ones.
        assert!(!r.insert(&(3 * DEFAULT_CAPACITY - 1).to_string()));
        assert!(r.insert("0"));
    }

    #[test]
    fn zero_capacity_is_treated_as_one() {
        let mut r = RecentIds::new(0);
        assert!(r.insert("a"));
        assert!(!r.insert("a"));
        assert!(r.insert("b"));
        assert!(r.insert("a"));
    }
}
