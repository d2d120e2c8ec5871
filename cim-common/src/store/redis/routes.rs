//! Routes in Redis (`route:{id}` = `{server}|{session}`): lookups by MGET, scans, the online
//! index by name, and the removal of stale routes.

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

    async fn scan_routes(&self, cursor: u64, count: usize) -> StoreResult<(u64, Vec<RouteEntry>)> {
        let mut c = self.conn();
        let (next, keys): (u64, Vec<String>) = ::redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(self.keys.route_pattern())
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        let ids: Vec<u64> = keys
            .iter()
            .filter_map(|k| self.keys.parse_route_key(k))
            .collect();
        let routes = self.routes(&ids).await?;
        Ok((next, routes.into_iter().flatten().collect()))
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
        let members: Vec<String> = ::redis::cmd("ZRANGEBYLEX")
            .arg(self.keys.online())
            .arg(min)
            .arg(max)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(members
            .iter()
            .filter_map(|m| OnlineEntry::from_member(m))
            .collect())
    }

    async fn remove_stale_route(&self, entry: &RouteEntry) -> StoreResult<()> {
        // The name (for the name index and the event) comes with the compare-and-delete.
        let mut pipe = ::redis::pipe();
        pipe.invoke_script(
            DEL_IF_EQ
                .key(self.keys.route(entry.user_id))
                .arg(keys::route_value(&entry.server_id, &entry.session)),
        )
        .hget(self.keys.user(entry.user_id), "name");
        let (removed, name): (i32, Option<String>) = self.run_scripts(&pipe, &[&DEL_IF_EQ]).await?;
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
