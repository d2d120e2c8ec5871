//! Channels in Redis: a member set per channel, a channel set per user, the channel list;
//! three hash slots, so joins and leaves are ordered writes a later one repairs.

use super::*;

#[async_trait]
impl Channels for RedisStore {
    /// The member set of the channel is the truth; the user's channel set (which counts
    /// toward the limit) and the channel list are indexes in other hash slots. Round 1 checks
    /// membership and, atomically on the user's set, the limit while listing the channel
    /// there; round 2 adds the member and lists the channel. Every write is idempotent and a
    /// join or leave repairs what an interrupted one left: listed for the user but no member
    /// (the next join goes on, the limit not counting it twice; a leave unlists it), a member
    /// whose channel is not listed for the user or in the channel list (the next join puts
    /// them back).
    async fn channel_join(
        &self,
        channel: &str,
        user_id: u64,
        max_channels: usize,
    ) -> StoreResult<JoinOutcome> {
        let members = self.keys.channel(channel);
        let mine = self.keys.user_channels(user_id);
        let list = self.keys.channels();
        let mut pipe = ::redis::pipe();
        pipe.zscore(&members, user_id)
            .invoke_script(JOIN_INDEX.key(&mine).arg(channel).arg(max_channels))
            .zscore(&list, channel);
        let (score, indexed, listed): (Option<f64>, i32, Option<f64>) =
            self.run_scripts(&pipe, &[&JOIN_INDEX]).await?;
        if score.is_some() {
            if indexed == 0 || listed.is_none() {
                let () = ::redis::pipe()
                    .sadd(&mine, channel)
                    .ignore()
                    .zadd(&list, channel, 0)
                    .ignore()
                    .query_async(&mut self.conn())
                    .await
                    .map_err(unavailable)?;
            }
            return Ok(JoinOutcome::AlreadyMember);
        }
        if indexed == 0 {
            return Ok(JoinOutcome::TooManyChannels);
        }
        // The member first, then the listing: a listed channel has had a member.
        let () = ::redis::pipe()
            .zadd(&members, user_id, user_id)
            .ignore()
            .zadd(&list, channel, 0)
            .ignore()
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(JoinOutcome::Joined)
    }

    /// Unlisting an empty channel checks again after the removal and lists it back if a join
    /// came in between (a join adds its member before listing the channel, so one of the two
    /// sees the other). What can remain: a channel listed without members when a user's join
    /// and leave of that channel race each other (until the next join or leave of it).
    async fn channel_leave(&self, channel: &str, user_id: u64) -> StoreResult<bool> {
        let members = self.keys.channel(channel);
        let list = self.keys.channels();
        let mut c = self.conn();
        let (removed, left): (i32, u64) = ::redis::pipe()
            .zrem(&members, user_id)
            .srem(self.keys.user_channels(user_id), channel)
            .ignore()
            .zcard(&members)
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        if left == 0 {
            let (again,): (u64,) = ::redis::pipe()
                .zrem(&list, channel)
                .ignore()
                .zcard(&members)
                .query_async(&mut c)
                .await
                .map_err(unavailable)?;
            if again > 0 {
                let () = c.zadd(&list, channel, 0).await.map_err(unavailable)?;
            }
        }
        Ok(removed == 1)
    }

    async fn channel_is_member(&self, channel: &str, user_id: u64) -> StoreResult<bool> {
        let score: Option<f64> = self
            .conn()
            .zscore(self.keys.channel(channel), user_id)
            .await
            .map_err(unavailable)?;
        Ok(score.is_some())
    }

    async fn user_channels(&self, user_id: u64) -> StoreResult<Vec<String>> {
        let mut names: Vec<String> = self
            .conn()
            .smembers(self.keys.user_channels(user_id))
            .await
            .map_err(unavailable)?;
        names.sort_unstable();
        Ok(names)
    }

    async fn channel_members(
        &self,
        channel: &str,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<u64>> {
        let limit = limit.min(MAX_CHANNEL_PAGE);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let members: Vec<String> = ::redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.channel(channel))
            .arg(format!("({after}"))
            .arg("+inf")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(members.iter().filter_map(|m| m.parse().ok()).collect())
    }

    async fn channel_list(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<String>> {
        let limit = limit.min(MAX_CHANNEL_PAGE);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let min: Vec<u8> = match after {
            Some(after) => [b"(", after.as_bytes()].concat(),
            None => b"-".to_vec(),
        };
        ::redis::cmd("ZRANGEBYLEX")
            .arg(self.keys.channels())
            .arg(min)
            .arg("+")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)
    }

    async fn channel_stats(&self, channels: &[String]) -> StoreResult<Vec<ChannelInfo>> {
        let channels = &channels[..channels.len().min(MAX_CHANNEL_STATS)];
        if channels.is_empty() {
            return Ok(Vec::new());
        }
        let online = self.keys.online_ids();
        let mut pipe = ::redis::pipe();
        for name in channels {
            let members = self.keys.channel(name);
            // ZINTERCARD (Redis 7) takes the plain set of online ids as one of its inputs.
            pipe.zcard(&members)
                .cmd("ZINTERCARD")
                .arg(2)
                .arg(&members)
                .arg(&online);
        }
        let counts: Vec<u64> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        if counts.len() != 2 * channels.len() {
            return Err(StoreError::Corrupt(format!(
                "channel stats: {} answers for {} channels",
                counts.len(),
                channels.len()
            )));
        }
        Ok(channels
            .iter()
            .zip(counts.chunks(2))
            .map(|(name, c)| ChannelInfo {
                name: name.clone(),
                members: c[0],
                online: c[1],
            })
            .collect())
    }
}
