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
        let mut batch = self.batch();
        self.index(&mut batch, Some(name), &online);
        batch.run(self, &[]).await?;
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
    /// Indexes a user as online (name index, id set, the set of its server) and publishes
    /// `online`: one unit of `batch`, all in the user's shard.
    pub(super) fn index(&self, batch: &mut Batch, name: Option<&str>, online: &PresenceEvent) {
        let shard = self.keys.user_shard(online.user_id);
        let ids = self.keys.online_ids(shard);
        batch.add(&ids, |pipe| {
            if let Some(name) = name {
                pipe.zadd(
                    self.keys.online(shard),
                    keys::online_member(name, online.user_id),
                    0,
                );
            }
            pipe.sadd(&ids, online.user_id).sadd(
                self.keys.server_users(shard, &online.server_id),
                online.user_id,
            );
            self.publish(pipe, online);
        });
    }

    /// After a user's route was deleted: removes them from the online index, the id set and
    /// the set of their server (the name index only with the `name`, when known) and publishes
    /// `offline`. These keys live in another hash slot than the route, so this cannot be part
    /// of the route's script: if the user attached again in between, put the entries back and
    /// publish them online again (the route is the truth). The event goes before the GET of
    /// the route (run in order: on a cluster the GET is a second round trip), so either that
    /// GET sees the new route, or the new attach (whose writes follow its route) publishes
    /// after us: either way the last event of the user says online. The price of the first
    /// case: an online event can come twice in a row.
    pub(super) async fn unindex(
        &self,
        user_id: u64,
        name: Option<&str>,
        offline: &PresenceEvent,
    ) -> StoreResult<()> {
        let shard = self.keys.user_shard(user_id);
        let ids = self.keys.online_ids(shard);
        let route = self.keys.route(user_id);
        let mut batch = self.batch();
        batch.add(&ids, |pipe| {
            if let Some(name) = name {
                pipe.zrem(self.keys.online(shard), keys::online_member(name, user_id));
            }
            pipe.srem(&ids, user_id)
                .srem(self.keys.server_users(shard, &offline.server_id), user_id);
            self.publish(pipe, offline);
        });
        let lookup = batch.add(&route, |pipe| {
            pipe.get(&route);
        });
        let mut replies = batch.run_in_order(self, &[]).await?;
        let route: Option<String> = batch::take(&mut replies, lookup, "route")?;
        if let Some((server_id, _)) = route.as_deref().and_then(keys::parse_route_value) {
            let online = presence_event(
                PresenceKind::Online,
                user_id,
                name.unwrap_or_default(),
                server_id,
                "",
            );
            let mut batch = self.batch();
            self.index(&mut batch, name, &online);
            batch.run(self, &[]).await?;
        }
        Ok(())
    }
}
