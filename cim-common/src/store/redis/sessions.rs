//! A connection's attach and detach in Redis (scripts over the slot and the route), and the
//! online index they keep in step (name index, id set, presence events).

use super::*;

#[async_trait]
impl Sessions for RedisStore {
    async fn attach(
        &self,
        user_id: u64,
        name: &str,
        session: &str,
        server_id: &str,
    ) -> StoreResult<AttachOutcome> {
        let mut c = self.conn();
        let ok: i32 = ATTACH
            .key(self.keys.login(user_id))
            .key(self.keys.route(user_id))
            .arg(session)
            .arg(keys::attached_slot(session, server_id))
            .arg(keys::route_value(server_id, session))
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        if ok != 1 {
            return Ok(AttachOutcome::SessionInvalid);
        }
        let online = presence_event(PresenceKind::Online, user_id, name, server_id, "");
        let mut pipe = ::redis::pipe();
        self.index(&mut pipe, Some(name), &online);
        let () = pipe.query_async(&mut c).await.map_err(unavailable)?;
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
        let mut c = self.conn();
        let removed: i32 = DETACH
            .key(self.keys.login(user_id))
            .key(self.keys.route(user_id))
            .arg(keys::attached_slot(session, server_id))
            .arg(keys::route_value(server_id, session))
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        if removed == 1 {
            let offline = presence_event(PresenceKind::Offline, user_id, name, server_id, reason);
            self.unindex(user_id, Some(name), &offline).await?;
        }
        Ok(())
    }
}

impl RedisStore {
    /// Indexes a user as online (name index, id set) and publishes `online`, in `pipe`.
    pub(super) fn index(
        &self,
        pipe: &mut ::redis::Pipeline,
        name: Option<&str>,
        online: &PresenceEvent,
    ) {
        if let Some(name) = name {
            pipe.zadd(
                self.keys.online(),
                keys::online_member(name, online.user_id),
                0,
            )
            .ignore();
        }
        pipe.sadd(self.keys.online_ids(), online.user_id).ignore();
        self.publish(pipe, online);
    }

    /// After a user's route was deleted: removes them from the online index and the id set
    /// (the name index only with the `name`, when known) and publishes `offline`. These keys
    /// live in other hash slots than the route, so this cannot be part of the route's script:
    /// if the user attached again in between, put the entries back and publish them online
    /// again (the route is the truth). The event goes before the GET of the route, so either
    /// that GET sees the new route, or the new attach (whose writes follow its route) publishes
    /// after us: either way the last event of the user says online. The price of the first
    /// case: an online event can come twice in a row.
    pub(super) async fn unindex(
        &self,
        user_id: u64,
        name: Option<&str>,
        offline: &PresenceEvent,
    ) -> StoreResult<()> {
        let mut c = self.conn();
        let mut pipe = ::redis::pipe();
        if let Some(name) = name {
            pipe.zrem(self.keys.online(), keys::online_member(name, user_id))
                .ignore();
        }
        pipe.srem(self.keys.online_ids(), user_id).ignore();
        self.publish(&mut pipe, offline);
        pipe.get(self.keys.route(user_id));
        let (route,): (Option<String>,) = pipe.query_async(&mut c).await.map_err(unavailable)?;
        if let Some((server_id, _)) = route.as_deref().and_then(keys::parse_route_value) {
            let online = presence_event(
                PresenceKind::Online,
                user_id,
                name.unwrap_or_default(),
                server_id,
                "",
            );
            let mut pipe = ::redis::pipe();
            self.index(&mut pipe, name, &online);
            let () = pipe.query_async(&mut c).await.map_err(unavailable)?;
        }
        Ok(())
    }
}
