//! Leases (expiring on the tokio clock) and cursors in memory.

use super::*;

#[async_trait]
impl Leases for MemoryStore {
    async fn lease(&self, name: &str, owner: &str, ttl: Duration) -> StoreResult<bool> {
        let now = Instant::now();
        // `PX ttl_ms` with at least 1 ms, as the Redis store sends it.
        let expires = now + ttl.max(Duration::from_millis(1));
        let mut state = self.lock();
        match state.leases.get_mut(name) {
            Some((holder, until)) if *until > now => {
                if holder == owner {
                    *until = expires;
                    Ok(true)
                } else {
                    Ok(false)
                }
            }
            _ => {
                state
                    .leases
                    .insert(name.to_string(), (owner.to_string(), expires));
                Ok(true)
            }
        }
    }

    async fn cursor(&self, name: &str) -> StoreResult<Option<String>> {
        Ok(self.lock().cursors.get(name).cloned())
    }

    async fn set_cursor(&self, name: &str, value: &str) -> StoreResult<()> {
        self.lock()
            .cursors
            .insert(name.to_string(), value.to_string());
        Ok(())
    }
}
