//! Login slots and generations in memory; pending slots expire lazily on the tokio clock.

use super::*;

#[async_trait]
impl LoginSlots for MemoryStore {
    async fn claim_login(
        &self,
        user_id: u64,
        session: &str,
        pending_ttl: Duration,
        is_live: IsLive<'_>,
    ) -> StoreResult<ClaimOutcome> {
        let current = {
            let now = Instant::now();
            let mut state = self.lock();
            if state.slots.len() >= state.purge_at {
                state.purge_expired(now);
            }
            match state.slot_value(user_id, now) {
                None => {
                    state.set_pending(user_id, session, pending_ttl, now);
                    return Ok(ClaimOutcome::Claimed);
                }
                Some(current) => current,
            }
        };
        match keys::parse_slot(&current) {
            (held, Some(server)) if is_live(server) => Ok(ClaimOutcome::Held {
                session: held.to_string(),
                server: server.to_string(),
            }),
            _ => {
                // Pending (a login nobody connected with) or held by a session on a dead
                // server: take it over unless it changed while `is_live` ran (the Redis
                // store's compare-and-set).
                let now = Instant::now();
                let mut state = self.lock();
                if state.slot_value(user_id, now).as_deref() == Some(current.as_str()) {
                    state.set_pending(user_id, session, pending_ttl, now);
                    Ok(ClaimOutcome::Claimed)
                } else {
                    Ok(ClaimOutcome::Contended)
                }
            }
        }
    }

    async fn take_over_login(
        &self,
        user_id: u64,
        held_session: &str,
        session: &str,
        pending_ttl: Duration,
    ) -> StoreResult<bool> {
        let now = Instant::now();
        let mut state = self.lock();
        let holds = state
            .slot_value(user_id, now)
            .is_some_and(|value| keys::slot_held_by(&value, held_session));
        if holds {
            state.set_pending(user_id, session, pending_ttl, now);
        }
        Ok(holds)
    }

    async fn next_generation(&self, user_id: u64, keep: Duration) -> StoreResult<u64> {
        let now = Instant::now();
        let mut state = self.lock();
        if state.generations.len() >= state.generations_purge_at {
            state.generations.retain(|_, (_, until)| *until > now);
            state.generations_purge_at = (state.generations.len() * 2).max(MIN_PURGE_AT);
        }
        let until = now + keep.max(Duration::from_millis(1));
        let entry = state.generations.entry(user_id).or_insert((0, until));
        // An expired counter restarts, as the Redis key vanishes.
        let current = if entry.1 > now { entry.0 } else { 0 };
        *entry = (current + 1, until);
        Ok(current + 1)
    }

    async fn generation(&self, user_id: u64) -> StoreResult<u64> {
        let now = Instant::now();
        let state = self.lock();
        Ok(state
            .generations
            .get(&user_id)
            .filter(|(_, until)| *until > now)
            .map_or(0, |&(generation, _)| generation))
    }

    async fn session_active(&self, user_id: u64, session: &str) -> StoreResult<bool> {
        let mut state = self.lock();
        Ok(state
            .slot(user_id, Instant::now())
            .is_some_and(|s| keys::slot_held_by(&s.value, session)))
    }

    async fn release_login(&self, user_id: u64, session: &str) -> StoreResult<Option<String>> {
        let mut state = self.lock();
        let Some(value) = state.slot_value(user_id, Instant::now()) else {
            return Ok(None);
        };
        if !keys::slot_held_by(&value, session) {
            return Ok(None);
        }
        state.slots.remove(&user_id);
        Ok(keys::parse_slot(&value).1.map(str::to_string))
    }
}

impl State {
    /// The live slot of `user_id`, dropping it if it expired (a Redis key vanishes the same).
    pub(super) fn slot(&mut self, user_id: u64, now: Instant) -> Option<&Slot> {
        if self.slots.get(&user_id).is_some_and(|s| s.expired(now)) {
            self.slots.remove(&user_id);
        }
        self.slots.get(&user_id)
    }

    pub(super) fn slot_value(&mut self, user_id: u64, now: Instant) -> Option<String> {
        self.slot(user_id, now).map(|s| s.value.clone())
    }

    pub(super) fn purge_expired(&mut self, now: Instant) {
        self.slots.retain(|_, slot| !slot.expired(now));
        self.purge_at = (self.slots.len() * 2).max(MIN_PURGE_AT);
    }

    pub(super) fn set_pending(&mut self, user_id: u64, session: &str, ttl: Duration, now: Instant) {
        // `SET ... PX ttl_ms` with at least 1 ms, as the Redis store sends it.
        let ttl = ttl.max(Duration::from_millis(1));
        self.slots.insert(
            user_id,
            Slot {
                value: session.to_string(),
                expires: Some(now + ttl),
            },
        );
    }
}
