//! Broadcast claims in memory: the live claims and a queue in claim order that every claim
//! prunes from the front.

use super::*;

#[async_trait]
impl Broadcasts for MemoryStore {
    async fn claim_broadcasts(
        &self,
        claims: &[(String, i64)],
        ttl: Duration,
    ) -> StoreResult<Vec<Option<i64>>> {
        let now = Instant::now();
        // `PX ttl_ms` with at least 1 ms, as the Redis store sends it.
        let expires = now + ttl.max(Duration::from_millis(1));
        let mut state = self.lock();
        state.prune_broadcasts(now);
        let mut answers = Vec::with_capacity(claims.len());
        for (id, timestamp_ms) in claims {
            match state.broadcasts.get(id) {
                Some(&(first, until)) if until > now => answers.push(Some(first)),
                _ => {
                    state
                        .broadcasts
                        .insert(id.clone(), (*timestamp_ms, expires));
                    state.broadcast_expiries.push_back((expires, id.clone()));
                    answers.push(None);
                }
            }
        }
        Ok(answers)
    }

    async fn release_broadcasts(&self, ids: &[String]) -> StoreResult<()> {
        let mut state = self.lock();
        for id in ids {
            state.broadcasts.remove(id);
        }
        Ok(())
    }
}

impl State {
    /// Drops the broadcast claims that expired by `now`, oldest first. Claims share one time
    /// to live in practice, so the queue is in expiry order and this stops at the first live
    /// one; a shorter one claimed later only waits for its turn.
    pub(super) fn prune_broadcasts(&mut self, now: Instant) {
        while let Some((until, _)) = self.broadcast_expiries.front() {
            if *until > now {
                break;
            }
            if let Some((until, id)) = self.broadcast_expiries.pop_front() {
                if self.broadcasts.get(&id).is_some_and(|&(_, u)| u == until) {
                    self.broadcasts.remove(&id);
                }
            }
        }
    }
}
