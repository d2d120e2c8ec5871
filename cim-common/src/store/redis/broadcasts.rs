//! Broadcast claims in Redis: one key per message id, `SET NX GET` with the claim's expiry.

use super::*;

#[async_trait]
impl Broadcasts for RedisStore {
    /// `SET key ts NX GET PX ttl` per id, pipelined: the first `SET` of an id answers nil
    /// (claimed), every later one the first timestamp and writes nothing (Redis 7.0 allows
    /// `NX` with `GET`). One key per id, so Redis Cluster may put them in any slot.
    async fn claim_broadcasts(
        &self,
        claims: &[(String, i64)],
        ttl: Duration,
    ) -> StoreResult<Vec<Option<i64>>> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut pipe = ::redis::pipe();
        for (id, timestamp_ms) in claims {
            pipe.cmd("SET")
                .arg(self.keys.sent(id))
                .arg(timestamp_ms)
                .arg("NX")
                .arg("GET")
                .arg("PX")
                .arg(ttl_ms);
        }
        let previous: Vec<Option<String>> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        previous
            .into_iter()
            .map(|p| match p {
                None => Ok(None),
                Some(v) => v.parse().map(Some).map_err(|_| {
                    StoreError::Corrupt(format!("broadcast claim holds {v:?}, not a timestamp"))
                }),
            })
            .collect()
    }

    async fn release_broadcasts(&self, ids: &[String]) -> StoreResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        // One DEL per key (in one pipeline): a multi-key DEL would cross Cluster slots.
        let mut pipe = ::redis::pipe();
        for id in ids {
            pipe.del(self.keys.sent(id)).ignore();
        }
        pipe.query_async(&mut self.conn())
            .await
            .map_err(unavailable)
    }
}
