//! Presence events in memory: a bounded queue with Redis-like ids; waiters sleep on a
//! `Notify` every append wakes.

use super::*;

#[async_trait]
impl Events for MemoryStore {
    async fn publish_messages(&self, events: &[PresenceEvent]) -> StoreResult<()> {
        let now = tokio::time::Instant::now();
        let mut state = self.lock();
        // Forget pairs older than the window (they are in publish order).
        while state
            .notified_order
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= MESSAGE_EVENT_DEDUP)
        {
            if let Some((_, pair)) = state.notified_order.pop_front() {
                state.notified.remove(&pair);
            }
        }
        let mut published = false;
        for event in events {
            let Some(m) = &event.message else { continue };
            let pair = (m.id.clone(), event.user_id);
            if !state.notified.insert(pair.clone()) {
                continue;
            }
            state.notified_order.push_back((now, pair));
            state.publish(event.clone(), self.events_max_len);
            published = true;
        }
        drop(state);
        if published {
            self.events_changed.notify_waiters();
        }
        Ok(())
    }

    async fn events_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<StoredEvent>> {
        let after = after.map(parse_event_id).transpose()?;
        let limit = limit.min(MAX_EVENTS_READ);
        Ok(self.lock().events_after(after, limit))
    }

    async fn events_wait(
        &self,
        after: &str,
        limit: usize,
        timeout: Duration,
    ) -> StoreResult<Vec<StoredEvent>> {
        let after = parse_event_id(after)?;
        let limit = limit.min(MAX_EVENTS_READ);
        // `None`: a wait too long to represent, i.e. no deadline.
        let deadline = Instant::now().checked_add(timeout);
        loop {
            // Registered before looking, so an event appended right after the look wakes it.
            let changed = self.events_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let page = self.lock().events_after(Some(after), limit);
            if !page.is_empty() || limit == 0 {
                return Ok(page);
            }
            match deadline {
                Some(deadline) => {
                    if tokio::time::timeout_at(deadline, changed).await.is_err() {
                        return Ok(Vec::new());
                    }
                }
                None => changed.await,
            }
        }
    }

    async fn events_last_id(&self) -> StoreResult<String> {
        Ok(self
            .lock()
            .events
            .back()
            .map_or_else(|| EventId::ZERO.to_string(), |(_, e)| e.id.clone()))
    }
}

impl State {
    /// Appends an event with the next id (`{ms}-{n}` like a Redis stream's: the wall clock,
    /// never going back) and drops the oldest past `max_len`.
    pub(super) fn publish(&mut self, event: PresenceEvent, max_len: usize) {
        let now = u64::try_from(crate::time::now_ms()).unwrap_or(0);
        let last = self.last_event;
        let id = if now > last.ms {
            EventId::new(now, 0)
        } else {
            EventId::new(last.ms, last.seq.saturating_add(1))
        };
        self.last_event = id;
        self.events.push_back((
            id,
            StoredEvent {
                id: id.to_string(),
                event,
            },
        ));
        while self.events.len() > max_len.max(1) {
            self.events.pop_front();
        }
    }

    pub(super) fn events_after(&self, after: Option<EventId>, limit: usize) -> Vec<StoredEvent> {
        let start = after.map_or(0, |after| {
            self.events.partition_point(|(id, _)| *id <= after)
        });
        self.events
            .range(start..)
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect()
    }
}
