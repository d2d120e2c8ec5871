//! [`StateStore`] on Redis. One multiplexed connection (auto-reconnecting) shared by all
//! tasks; atomic multi-step updates are Lua scripts over keys of one hash slot.
//!
//! Round trips: claim 1 (2 when the slot is held), attach 2, detach 2, routes of N users 1
//! (MGET), one SCAN step 2 (SCAN + MGET).

use super::*;
use crate::keys::{self, Keys};
use ::redis::{aio::ConnectionManager, AsyncCommands, Script};
use std::sync::LazyLock;

/// Attach: KEYS = login slot, route; ARGV = session, attached slot value, route value.
static ATTACH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
        redis.call('SET', KEYS[1], ARGV[2])
        redis.call('SET', KEYS[2], ARGV[3])
        return 1",
    )
});

/// Detach: KEYS = login slot, route; ARGV = attached slot value, route value.
/// Returns 1 when the route was ours and is gone.
static DETACH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local removed = 0
        if redis.call('GET', KEYS[2]) == ARGV[2] then
            redis.call('DEL', KEYS[2])
            removed = 1
        end
        if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
        return removed",
    )
});

/// Compare-and-delete: KEYS = key; ARGV = expected value.
static DEL_IF_EQ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
        return 0",
    )
});

/// Compare-and-set with expiry: KEYS = key; ARGV = expected, new value, ttl ms.
static SET_IF_EQ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('GET', KEYS[1]) == ARGV[1] then
            redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
            return 1
        end
        return 0",
    )
});

/// Release a slot held by a session (pending or attached). KEYS = slot; ARGV = session.
/// Returns the old value when deleted, nil otherwise.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local v = redis.call('GET', KEYS[1])
        if not v then return nil end
        if v == ARGV[1] or string.sub(v, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '@' then
            redis.call('DEL', KEYS[1])
            return v
        end
        return nil",
    )
});

/// Redis-backed shared state.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    keys: Keys,
}

fn unavailable(e: ::redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`). Every command times out after `timeout`.
    pub async fn connect(url: &str, prefix: &str, timeout: Duration) -> StoreResult<Self> {
        let client = ::redis::Client::open(url).map_err(unavailable)?;
        let config = ::redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout)
            .set_number_of_retries(2);
        let conn = tokio::time::timeout(
            timeout * 3,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| StoreError::Unavailable(format!("connecting to {url} timed out")))?
        .map_err(unavailable)?;
        Ok(Self {
            conn,
            keys: Keys::new(prefix),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Removes a user from the online index after their route was deleted. The index lives
    /// in another hash slot than the route, so this cannot be part of the route's script: if
    /// the user attached again in between, put the entry back (the route is the truth).
    async fn unindex(&self, user_id: u64, name: &str) -> StoreResult<()> {
        let mut c = self.conn();
        let member = keys::online_member(name, user_id);
        let (_, route): ((), Option<String>) = ::redis::pipe()
            .zrem(self.keys.online(), &member)
            .get(self.keys.route(user_id))
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        if route.is_some() {
            let _: () = c
                .zadd(self.keys.online(), &member, 0)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    fn parse_route(user_id: u64, value: &str) -> Option<RouteEntry> {
        let (server, session) = keys::parse_route_value(value)?;
        Some(RouteEntry {
            user_id,
            server_id: server.to_string(),
            session: session.to_string(),
        })
    }
}

#[async_trait]
impl StateStore for RedisStore {
    async fn create_user(&self, name: &str, password_hash: &str) -> StoreResult<Option<u64>> {
        let mut c = self.conn();
        let id: u64 = c
            .incr(self.keys.next_user_id(), 1)
            .await
            .map_err(unavailable)?;
        // Write the record first, then publish the name: a name never points at a missing user.
        let _: () = c
            .hset_multiple(self.keys.user(id), &[("name", name), ("pw", password_hash)])
            .await
            .map_err(unavailable)?;
        let won: bool = c
            .set_nx(self.keys.user_name(name), id)
            .await
            .map_err(unavailable)?;
        if won {
            Ok(Some(id))
        } else {
            let _: () = c.del(self.keys.user(id)).await.map_err(unavailable)?;
            Ok(None)
        }
    }

    async fn user_by_name(&self, name: &str) -> StoreResult<Option<UserRecord>> {
        let mut c = self.conn();
        let id: Option<u64> = c
            .get(self.keys.user_name(name))
            .await
            .map_err(unavailable)?;
        let Some(id) = id else { return Ok(None) };
        let (name, pw): (Option<String>, Option<String>) = ::redis::cmd("HMGET")
            .arg(self.keys.user(id))
            .arg("name")
            .arg("pw")
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        match (name, pw) {
            (Some(name), Some(password_hash)) => Ok(Some(UserRecord {
                id,
                name,
                password_hash,
            })),
            _ => Err(StoreError::Corrupt(format!("user {id} has no record"))),
        }
    }

    async fn user_name(&self, id: u64) -> StoreResult<Option<String>> {
        self.conn()
            .hget(self.keys.user(id), "name")
            .await
            .map_err(unavailable)
    }

    async fn claim_login(
        &self,
        user_id: u64,
        session: &str,
        pending_ttl: Duration,
        is_live: IsLive<'_>,
    ) -> StoreResult<ClaimOutcome> {
        let mut c = self.conn();
        let key = self.keys.login(user_id);
        let ttl_ms = pending_ttl.as_millis().max(1) as u64;
        // SET NX, then GET on failure; when the holder expires in between, one more SET NX.
        let mut current: Option<String> = None;
        for _ in 0..2 {
            let set: Option<String> = ::redis::cmd("SET")
                .arg(&key)
                .arg(session)
                .arg("NX")
                .arg("PX")
                .arg(ttl_ms)
                .query_async(&mut c)
                .await
                .map_err(unavailable)?;
            if set.is_some() {
                return Ok(ClaimOutcome::Claimed);
            }
            current = c.get(&key).await.map_err(unavailable)?;
            if current.is_some() {
                break;
            }
        }
        let Some(current) = current else {
            return Ok(ClaimOutcome::Held { server: None });
        };
        match keys::parse_slot(&current) {
            (_, None) => Ok(ClaimOutcome::Held { server: None }),
            (_, Some(server)) if is_live(server) => Ok(ClaimOutcome::Held {
                server: Some(server.to_string()),
            }),
            (_, Some(server)) => {
                // Held by a session on a dead server: take it over, unless it changed meanwhile.
                let took: i32 = SET_IF_EQ
                    .key(&key)
                    .arg(&current)
                    .arg(session)
                    .arg(ttl_ms)
                    .invoke_async(&mut c)
                    .await
                    .map_err(unavailable)?;
                if took == 1 {
                    Ok(ClaimOutcome::Claimed)
                } else {
                    Ok(ClaimOutcome::Held {
                        server: Some(server.to_string()),
                    })
                }
            }
        }
    }

    async fn session_active(&self, user_id: u64, session: &str) -> StoreResult<bool> {
        let v: Option<String> = self
            .conn()
            .get(self.keys.login(user_id))
            .await
            .map_err(unavailable)?;
        Ok(v.is_some_and(|v| keys::parse_slot(&v).0 == session))
    }

    async fn release_login(&self, user_id: u64, session: &str) -> StoreResult<Option<String>> {
        let old: Option<String> = RELEASE
            .key(self.keys.login(user_id))
            .arg(session)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(old.and_then(|v| keys::parse_slot(&v).1.map(str::to_string)))
    }

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
        let _: () = c
            .zadd(self.keys.online(), keys::online_member(name, user_id), 0)
            .await
            .map_err(unavailable)?;
        Ok(AttachOutcome::Attached)
    }

    async fn detach(
        &self,
        user_id: u64,
        name: &str,
        session: &str,
        server_id: &str,
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
            self.unindex(user_id, name).await?;
        }
        Ok(())
    }

    async fn routes(&self, user_ids: &[u64]) -> StoreResult<Vec<Option<RouteEntry>>> {
        if user_ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = user_ids.iter().map(|&id| self.keys.route(id)).collect();
        // MGET rather than GET: one round trip whatever the count (a one-key MGET returns a
        // one-element array too, unlike GET with a single key through the typed API).
        let values: Vec<Option<String>> = ::redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(user_ids
            .iter()
            .zip(values)
            .map(|(&id, v)| v.and_then(|v| Self::parse_route(id, &v)))
            .collect())
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
            .filter_map(|m| {
                let (name, id) = keys::parse_online_member(m)?;
                Some(OnlineEntry {
                    user_id: id,
                    name: name.to_string(),
                    cursor: m.clone(),
                })
            })
            .collect())
    }

    async fn remove_stale_route(&self, entry: &RouteEntry) -> StoreResult<()> {
        let mut c = self.conn();
        let removed: i32 = DEL_IF_EQ
            .key(self.keys.route(entry.user_id))
            .arg(keys::route_value(&entry.server_id, &entry.session))
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        if removed == 1 {
            if let Some(name) = self.user_name(entry.user_id).await? {
                self.unindex(entry.user_id, &name).await?;
            }
        }
        Ok(())
    }
}
