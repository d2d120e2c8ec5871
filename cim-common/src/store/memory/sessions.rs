//! A connection's attach and detach in memory: slot, route, online index and event under
//! one lock (the outcome the Redis store's two round trips converge to).

use super::*;

#[async_trait]
impl Sessions for MemoryStore {
    async fn attach(
        &self,
        user_id: u64,
        name: &str,
        session: &str,
        server_id: &str,
    ) -> StoreResult<AttachOutcome> {
        let mut state = self.lock();
        // Only a pending slot of exactly this session: single use, since attaching changes it.
        if state.slot_value(user_id, Instant::now()).as_deref() != Some(session) {
            return Ok(AttachOutcome::SessionInvalid);
        }
        state.slots.insert(
            user_id,
            Slot {
                value: keys::attached_slot(session, server_id),
                expires: None,
            },
        );
        state
            .routes
            .insert(user_id, (server_id.to_string(), session.to_string()));
        state.online.insert(keys::online_member(name, user_id));
        let online = presence_event(PresenceKind::Online, user_id, name, server_id, "");
        state.publish(online, self.events_max_len);
        drop(state);
        self.events_changed.notify_waiters();
        Ok(AttachOutcome::Attached)
    }

    async fn detach(
        &self,
        user_id: u64,
        name: &str,
        session: &str,
        server_id: &str,
        reason: &str,
    ) -> StoreResult<()> {
        let mut state = self.lock();
        let removed = state.route_is(user_id, server_id, session);
        if removed {
            state.routes.remove(&user_id);
        }
        let attached = keys::attached_slot(session, server_id);
        if state.slot_value(user_id, Instant::now()).as_deref() == Some(attached.as_str()) {
            state.slots.remove(&user_id);
        }
        if removed {
            // No route is left for this user (just removed, under the same lock): the Redis
            // store's "unindex unless attached again meanwhile" is a plain removal here.
            state.online.remove(&keys::online_member(name, user_id));
            let offline = presence_event(PresenceKind::Offline, user_id, name, server_id, reason);
            state.publish(offline, self.events_max_len);
            drop(state);
            self.events_changed.notify_waiters();
        }
        Ok(())
    }
}
