//! Routes in Redis (`route:{id}` = `{server}|{session}`): lookups by MGET, a server's users
//! by its per-shard member sets, the online index by name (a page merged over the shards), and
//! the removal of stale routes.

use super::*;

#[async_trait]
impl Routes for RedisStore {
    async fn routes(&self, user_ids: &[u64]) -> StoreResult<Vec<Option<RouteEntry>>> {
        if user_ids.is_empty() {
            return Ok(Vec::new());
        }
        let values: Vec<Option<String>> = self
            .routes_lookup(user_ids)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(Self::routes_of(user_ids, values))
    }

    async fn server_routes(
        &self,
        server_id: &str,
        cursor: u64,
        count: usize,
    ) -> StoreResult<(u64, Vec<RouteEntry>)> {
        // The cursor: the shard in the high 16 bits, that shard's SSCAN cursor below (Redis
        // cursors of a set stay far below 2^48).
        let shards = self.keys.shards() as u64;
        let (mut shard, mut sscan) = (cursor >> 48, cursor & ((1 << 48) - 1));
        let mut c = self.conn();
        while shard < shards {
            let set = self.keys.server_users(shard as usize, server_id);
            let (next, ids): (u64, Vec<u64>) = ::redis::cmd("SSCAN")
                .arg(&set)
                .arg(sscan)
                .arg("COUNT")
                .arg(count.max(1))
                .query_async(&mut c)
                .await
                .map_err(unavailable)?;
            let next_cursor = if next != 0 {
                (shard << 48) | next
            } else if shard + 1 < shards {
                (shard + 1) << 48
            } else {
                0
            };
            if ids.is_empty() {
                (shard, sscan) = (next_cursor >> 48, next_cursor & ((1 << 48) - 1));
                if next_cursor == 0 {
                    break;
                }
                continue;
            }
            let routes = self.routes(&ids).await?;
            let (here, gone): (Vec<_>, Vec<_>) = ids
                .iter()
                .zip(routes)
                .partition(|(_, r)| r.as_ref().is_some_and(|r| r.server_id == server_id));
            if !gone.is_empty() {
                // Attached elsewhere or nowhere now (a detach that did not get to it, or a
                // login on another server first): no longer this server's.
                let gone: Vec<u64> = gone.into_iter().map(|(&id, _)| id).collect();
                let () = c.srem(&set, gone).await.map_err(unavailable)?;
            }
            let here = here.into_iter().filter_map(|(_, r)| r).collect();
            return Ok((next_cursor, here));
        }
        Ok((0, Vec::new()))
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
        // Members sort by bytes; 0xff never occurs in UTF-8, so `prefix + 0xff` bounds every
        // name that starts with `prefix`.
        let min: Vec<u8> = match after {
            Some(a) if a.as_bytes() >= prefix.as_bytes() => [b"(", a.as_bytes()].concat(),
            _ if prefix.is_empty() => b"-".to_vec(),
            _ => [b"[", prefix.as_bytes()].concat(),
        };
        let max: Vec<u8> = if prefix.is_empty() {
            b"+".to_vec()
        } else {
            [b"(", prefix.as_bytes(), &[0xff]].concat()
        };
        // Each shard's first `limit` entries of the range, merged: the first `limit` of all.
        let pages: Vec<Vec<String>> = self
            .per_shard(
                |shard| self.keys.online(shard),
                |pipe, key| {
                    pipe.cmd("ZRANGEBYLEX")
                        .arg(key)
                        .arg(&min)
                        .arg(&max)
                        .arg("LIMIT")
                        .arg(0)
                        .arg(limit);
                },
                "online page",
            )
            .await?;
        let mut members: Vec<String> = pages.into_iter().flatten().collect();
        members.sort_unstable();
        members.truncate(limit);
        Ok(members
            .iter()
            .filter_map(|m| OnlineEntry::from_member(m))
            .collect())
    }

    async fn remove_stale_route(&self, entry: &RouteEntry) -> StoreResult<()> {
        // The name (for the name index and the event) comes with the compare-and-delete.
        let route = self.keys.route(entry.user_id);
        let user = self.keys.user(entry.user_id);
        let mut batch = self.batch();
        let del = batch.add(&route, |pipe| {
            pipe.invoke_script(
                DEL_IF_EQ
                    .key(&route)
                    .arg(keys::route_value(&entry.server_id, &entry.session)),
            );
        });
        let get = batch.add(&user, |pipe| {
            pipe.hget(&user, "name");
        });
        let mut replies = batch.run(self, &[&DEL_IF_EQ]).await?;
        let removed: i32 = batch::take(&mut replies, del, "stale route")?;
        let name: Option<String> = batch::take(&mut replies, get, "name")?;
        if removed == 1 {
            // Without an account record (never in practice) the name index entry cannot be
            // found; the id set and the event do not need the name.
            let offline = presence_event(
                PresenceKind::Offline,
                entry.user_id,
                name.as_deref().unwrap_or_default(),
                &entry.server_id,
                reason::SERVER_LOST,
            );
            self.unindex(entry.user_id, name.as_deref(), &offline)
                .await?;
        }
        Ok(())
    }
}

impl RedisStore {
    /// The `MGET` of the route keys of `user_ids` (rather than GET: one round trip whatever the
    /// count, and a one-key MGET answers an array too).
    pub(super) fn routes_lookup(&self, user_ids: &[u64]) -> ::redis::Cmd {
        let mut cmd = ::redis::cmd("MGET");
        for &id in user_ids {
            cmd.arg(self.keys.route(id));
        }
        cmd
    }

    /// The routes in the answer of [`routes_lookup`](Self::routes_lookup).
    pub(super) fn routes_of(
        user_ids: &[u64],
        values: Vec<Option<String>>,
    ) -> Vec<Option<RouteEntry>> {
        user_ids
            .iter()
            .zip(values)
            .map(|(&id, v)| v.and_then(|v| Self::parse_route(id, &v)))
            .collect()
    }

    pub(super) fn parse_route(user_id: u64, value: &str) -> Option<RouteEntry> {
        let (server, session) = keys::parse_route_value(value)?;
        Some(RouteEntry {
            user_id,
            server_id: server.to_string(),
            session: session.to_string(),
        })
    }
}
