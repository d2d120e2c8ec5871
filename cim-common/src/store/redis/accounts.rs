//! Accounts in Redis: `user:{id}` hashes (name, password hash), a `user_name:{name}` index
//! and the id counter.

use super::*;

#[async_trait]
impl Accounts for RedisStore {
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
}
