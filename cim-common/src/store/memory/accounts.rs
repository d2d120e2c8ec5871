//! Accounts in memory: users by id and a name index.

use super::*;

#[async_trait]
impl Accounts for MemoryStore {
    async fn create_user(&self, name: &str, password_hash: &str) -> StoreResult<Option<u64>> {
        let mut state = self.lock();
        // Like INCR before SET NX: a refused duplicate still uses up an id.
        state.last_user_id += 1;
        let id = state.last_user_id;
        if state.names.contains_key(name) {
            return Ok(None);
        }
        state.names.insert(name.to_string(), id);
        state.users.insert(
            id,
            User {
                name: name.to_string(),
                password_hash: password_hash.to_string(),
            },
        );
        Ok(Some(id))
    }

    async fn user_by_name(&self, name: &str) -> StoreResult<Option<UserRecord>> {
        let state = self.lock();
        let Some(&id) = state.names.get(name) else {
            return Ok(None);
        };
        match state.users.get(&id) {
            Some(user) => Ok(Some(UserRecord {
                id,
                name: user.name.clone(),
                password_hash: user.password_hash.clone(),
            })),
            None => Err(StoreError::Corrupt(format!("user {id} has no record"))),
        }
    }

    async fn user_name(&self, id: u64) -> StoreResult<Option<String>> {
        Ok(self.lock().users.get(&id).map(|u| u.name.clone()))
    }
}
