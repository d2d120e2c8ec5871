//! Broadcast claims in Redis: one key per message id, `SET NX GET` with the claim's expiry.

use super::*;

#[async_trait]
impl Broadcasts for RedisStore {
    /// `SET key ts NX GET PX ttl` per id, pipelined: the first `SET` of an id answers nil
    /// (claimed), every later one the first timestamp and writes nothing (Redis 7.0 allows
    /// `NX` with `GET`). One key per id, spread over every slot of a cluster.
    async fn claim_broadcasts(
        &self,
        claims: &[(String, i64)],
        ttl: Duration,
    ) -> StoreResult<Vec<Option<i64>>> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut batch = self.batch();
        for (id, timestamp_ms) in claims {
            let key = self.keys.sent(id);
            batch.add(&key, |pipe| {
                pipe.cmd("SET")
                    .arg(&key)
                    .arg(timestamp_ms)
                    .arg("NX")
                    .arg("GET")
                    .arg("PX")
                    .arg(ttl_ms);
            });
        }
        let previous = batch
            .run(self, &[])
            .await?
            .into_iter()
            .map(|r| batch::parse::<Option<String>>(batch::single(r)?, "broadcast claim"))
            .collect::<StoreResult<Vec<_>>>()?;
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
        // One DEL per key (a multi-key DEL would cross Cluster slots).
        let mut batch = self.batch();
        for id in ids {
            let key = self.keys.sent(id);
            batch.add(&key, |pipe| {
                pipe.del(&key);
            });
        }
        batch.run(self, &[]).await.map(drop)
    }
}
