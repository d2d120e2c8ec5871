//! Leases (a key with an owner and an expiry, renewed by a script) and cursors in Redis.

use super::*;

#[async_trait]
impl Leases for RedisStore {
    async fn lease(&self, name: &str, owner: &str, ttl: Duration) -> StoreResult<bool> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let held: i32 = LEASE
            .key(self.keys.lease(name))
            .arg(owner)
            .arg(ttl_ms)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(held == 1)
    }

    async fn cursor(&self, name: &str) -> StoreResult<Option<String>> {
        self.conn()
            .get(self.keys.cursor(name))
            .await
            .map_err(unavailable)
    }

    async fn set_cursor(&self, name: &str, value: &str) -> StoreResult<()> {
        self.conn()
            .set(self.keys.cursor(name), value)
            .await
            .map_err(unavailable)
    }
}
