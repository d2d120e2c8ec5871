//! Channels in memory: a member set per channel and a channel set per user, updated together.

use super::*;

#[async_trait]
impl Channels for MemoryStore {
    async fn channel_join(
        &self,
        channel: &str,
        user_id: u64,
        max_channels: usize,
    ) -> StoreResult<JoinOutcome> {
        let mut state = self.lock();
        if state
            .channels
            .get(channel)
            .is_some_and(|members| members.contains(&user_id))
        {
            return Ok(JoinOutcome::AlreadyMember);
        }
        let mine = state.user_channels.entry(user_id).or_default();
        if mine.len() >= max_channels {
            if mine.is_empty() {
                state.user_channels.remove(&user_id);
            }
            return Ok(JoinOutcome::TooManyChannels);
        }
        mine.insert(channel.to_string());
        state
            .channels
            .entry(channel.to_string())
            .or_default()
            .insert(user_id);
        Ok(JoinOutcome::Joined)
    }

    async fn channel_leave(&self, channel: &str, user_id: u64) -> StoreResult<bool> {
        let mut state = self.lock();
        let removed = match state.channels.get_mut(channel) {
            Some(members) => {
                let removed = members.remove(&user_id);
                if members.is_empty() {
                    state.channels.remove(channel);
                }
                removed
            }
            None => false,
        };
        if let Some(mine) = state.user_channels.get_mut(&user_id) {
            mine.remove(channel);
            if mine.is_empty() {
                state.user_channels.remove(&user_id);
            }
        }
        Ok(removed)
    }

    async fn channel_is_member(&self, channel: &str, user_id: u64) -> StoreResult<bool> {
        Ok(self
            .lock()
            .channels
            .get(channel)
            .is_some_and(|members| members.contains(&user_id)))
    }

    async fn user_channels(&self, user_id: u64) -> StoreResult<Vec<String>> {
        Ok(self
            .lock()
            .user_channels
            .get(&user_id)
            .map(|mine| mine.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn channel_members(
        &self,
        channel: &str,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<u64>> {
        let limit = limit.min(MAX_CHANNEL_PAGE);
        let state = self.lock();
        Ok(state
            .channels
            .get(channel)
            .map_or_else(Vec::new, |members| {
                members
                    .range((Bound::Excluded(after), Bound::Unbounded))
                    .take(limit)
                    .copied()
                    .collect()
            }))
    }

    async fn channel_list(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<String>> {
        let limit = limit.min(MAX_CHANNEL_PAGE);
        let start: Bound<&str> = after.map_or(Bound::Unbounded, Bound::Excluded);
        let state = self.lock();
        Ok(state
            .channels
            .range::<str, _>((start, Bound::Unbounded))
            .take(limit)
            .map(|(name, _)| name.clone())
            .collect())
    }

    async fn channel_stats(&self, channels: &[String]) -> StoreResult<Vec<ChannelInfo>> {
        let state = self.lock();
        Ok(channels
            .iter()
            .take(MAX_CHANNEL_STATS)
            .map(|name| {
                let (members, online) = match state.channels.get(name) {
                    None => (0, 0),
                    // Walk the smaller side, as ZINTERCARD does.
                    Some(members) if members.len() <= state.routes.len() => (
                        members.len(),
                        members.iter().filter(|id| state.is_online(**id)).count(),
                    ),
                    Some(members) => (
                        members.len(),
                        state
                            .routes
                            .keys()
                            .filter(|id| members.contains(id))
                            .count(),
                    ),
                };
                ChannelInfo {
                    name: name.clone(),
                    members: members as u64,
                    online: online as u64,
                }
            })
            .collect())
    }
}
