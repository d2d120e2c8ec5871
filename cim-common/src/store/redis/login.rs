//! Login slots and login generations in Redis: a slot is one key per user, pending
//! (`{session}`, with an expiry) or attached (`{session}@{server}`); claims are `SET NX` then
//! compare-and-set scripts.

use super::*;

#[async_trait]
impl LoginSlots for RedisStore {
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
            return Ok(ClaimOutcome::Contended);
        };
        match keys::parse_slot(&current) {
            (held, Some(server)) if is_live(server) => Ok(ClaimOutcome::Held {
                session: held.to_string(),
                server: server.to_string(),
            }),
            _ => {
                // Pending (a login nobody connected with) or held by a session on a dead
                // server: take it over, unless it changed meanwhile (e.g. attached).
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
        let took: i32 = TAKE_OVER
            .key(self.keys.login(user_id))
            .arg(held_session)
            .arg(session)
            .arg(pending_ttl.as_millis().max(1) as u64)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(took == 1)
    }

    async fn next_generation(&self, user_id: u64, keep: Duration) -> StoreResult<u64> {
        NEXT_GENERATION
            .key(self.keys.generation(user_id))
            .arg(keep.as_millis().max(1) as u64)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)
    }

    async fn generation(&self, user_id: u64) -> StoreResult<u64> {
        let g: Option<u64> = self
            .conn()
            .get(self.keys.generation(user_id))
            .await
            .map_err(unavailable)?;
        Ok(g.unwrap_or(0))
    }

    async fn session_active(&self, user_id: u64, session: &str) -> StoreResult<bool> {
        let v: Option<String> = self
            .conn()
            .get(self.keys.login(user_id))
            .await
            .map_err(unavailable)?;
        Ok(v.is_some_and(|v| keys::slot_held_by(&v, session)))
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
}
