//! Routes and the online index in memory, and the removal of stale routes.

use super::*;

#[async_trait]
impl Routes for MemoryStore {
    async fn routes(&self, user_ids: &[u64]) -> StoreResult<Vec<Option<RouteEntry>>> {
        let state = self.lock();
        Ok(user_ids.iter().map(|&id| state.route_entry(id)).collect())
    }

    /// The cursor is the user id to resume at (0: from the start; the first route may belong
    /// to user 0, which a resumed scan never needs to revisit). A route present for the whole
    /// scan is returned exactly once, as SCAN guarantees; unlike SCAN, never twice.
    async fn server_routes(
        &self,
        server_id: &str,
        cursor: u64,
        count: usize,
    ) -> StoreResult<(u64, Vec<RouteEntry>)> {
        let mut state = self.lock();
        if cursor == 0 {
            // A sweep walks every route now and then: the moment to drop pending slots that
            // expired without anyone touching them again.
            state.purge_expired(Instant::now());
        }
        // No index by server here: walk the routes from `cursor` (a user id) until `count`
        // of them are on the server.
        let mut batch = Vec::new();
        let mut next = 0;
        for (&user_id, (server, session)) in state.routes.range(cursor..) {
            if batch.len() >= count.max(1) {
                next = user_id;
                break;
            }
            if server == server_id {
                batch.push(RouteEntry {
                    user_id,
                    server_id: server.clone(),
                    session: session.clone(),
                });
            }
        }
        Ok((next, batch))
    }

    async fn online_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<OnlineEntry>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // The bounds of the Redis store's ZRANGEBYLEX: after the cursor when it lies at or
        // past the prefix, else from the prefix; up to the last member starting with it.
        let start: Bound<&str> = match after {
            Some(a) if a.as_bytes() >= prefix.as_bytes() => Bound::Excluded(a),
            _ if prefix.is_empty() => Bound::Unbounded,
            _ => Bound::Included(prefix),
        };
        let state = self.lock();
        Ok(state
            .online
            .range::<str, _>((start, Bound::Unbounded))
            // Members at or past `prefix` sort below `prefix + 0xff` exactly when they start
            // with it (0xff never occurs in UTF-8).
            .take_while(|m| m.starts_with(prefix))
            .take(limit)
            .filter_map(|m| OnlineEntry::from_member(m))
            .collect())
    }

    async fn remove_stale_route(&self, entry: &RouteEntry) -> StoreResult<()> {
        let mut state = self.lock();
        if !state.route_is(entry.user_id, &entry.server_id, &entry.session) {
            return Ok(());
        }
        state.routes.remove(&entry.user_id);
        let name = state.users.get(&entry.user_id).map(|u| u.name.clone());
        if let Some(name) = &name {
            state
                .online
                .remove(&keys::online_member(name, entry.user_id));
        }
        let offline = presence_event(
            PresenceKind::Offline,
            entry.user_id,
            name.as_deref().unwrap_or_default(),
            &entry.server_id,
            reason::SERVER_LOST,
        );
        state.publish(offline, self.events_max_len);
        drop(state);
        self.events_changed.notify_waiters();
        Ok(())
    }
}

impl State {
    pub(super) fn route_is(&self, user_id: u64, server_id: &str, session: &str) -> bool {
        self.routes
            .get(&user_id)
            .is_some_and(|(server, s)| server == server_id && s == session)
    }

    /// The online index entry (name) and the online id (route) go together here: the id set
    /// of the Redis store is the set of users with a route.
    pub(super) fn is_online(&self, user_id: u64) -> bool {
        self.routes.contains_key(&user_id)
    }

    pub(super) fn route_entry(&self, user_id: u64) -> Option<RouteEntry> {
        self.routes
            .get(&user_id)
            .map(|(server, session)| RouteEntry {
                user_id,
                server_id: server.clone(),
                session: session.clone(),
            })
    }
}
