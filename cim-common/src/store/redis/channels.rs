//! Channels in Redis: a channel's members, cut by the members' shards (so each piece sits
//! beside its shard's online ids, for the online counts), a channel set per user, and the
//! channel list (cut by the names' shards). A join touches three hash slots (the user's
//! channel set, the member piece, the list piece), so joins and leaves are ordered writes a
//! later one repairs. Reads over a whole channel (its members, its counts) are one command per
//! shard, one pipeline per shard (see [`Batch`]).

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
        let members = self.keys.channel(self.keys.user_shard(user_id), channel);
        let mine = self.keys.user_channels(user_id);
        let list = self.keys.channels(self.keys.name_shard(channel));
        let mut batch = self.batch();
        let member = batch.add(&members, |pipe| {
            pipe.zscore(&members, user_id);
        });
        let index = batch.add(&mine, |pipe| {
            pipe.invoke_script(JOIN_INDEX.key(&mine).arg(channel).arg(max_channels));
        });
        let listing = batch.add(&list, |pipe| {
            pipe.zscore(&list, channel);
        });
        let mut replies = batch.run(self, &[&JOIN_INDEX]).await?;
        let score: Option<f64> = batch::take(&mut replies, member, "channel member")?;
        let indexed: i32 = batch::take(&mut replies, index, "channel index")?;
        let listed: Option<f64> = batch::take(&mut replies, listing, "channel list")?;
        if score.is_some() {
            if indexed == 0 || listed.is_none() {
                let mut batch = self.batch();
                batch.add(&mine, |pipe| {
                    pipe.sadd(&mine, channel);
                });
                batch.add(&list, |pipe| {
                    pipe.zadd(&list, channel, 0);
                });
                batch.run(self, &[]).await?;
            }
            return Ok(JoinOutcome::AlreadyMember);
        }
        if indexed == 0 {
            return Ok(JoinOutcome::TooManyChannels);
        }
        // The member first, then the listing: a listed channel has had a member.
        let mut batch = self.batch();
        batch.add(&members, |pipe| {
            pipe.zadd(&members, user_id, user_id);
        });
        batch.add(&list, |pipe| {
            pipe.zadd(&list, channel, 0);
        });
        batch.run_in_order(self, &[]).await?;
        Ok(JoinOutcome::Joined)
    }

    /// Unlisting an empty channel checks again after the removal and lists it back if a join
    /// came in between (a join adds its member before listing the channel, so one of the two
    /// sees the other). What can remain: a channel listed without members when a user's join
    /// and leave of that channel race each other (until the next join or leave of it).
    async fn channel_leave(&self, channel: &str, user_id: u64) -> StoreResult<bool> {
        let members = self.keys.channel(self.keys.user_shard(user_id), channel);
        let mine = self.keys.user_channels(user_id);
        let list = self.keys.channels(self.keys.name_shard(channel));
        let mut batch = self.batch();
        let removal = batch.add(&members, |pipe| {
            pipe.zrem(&members, user_id);
        });
        batch.add(&mine, |pipe| {
            pipe.srem(&mine, channel);
        });
        let mut replies = batch.run_in_order(self, &[]).await?;
        let removed: i32 = batch::take(&mut replies, removal, "channel leave")?;
        if self.member_count(channel).await? == 0 {
            let () = self
                .conn()
                .zrem(&list, channel)
                .await
                .map_err(unavailable)?;
            if self.member_count(channel).await? > 0 {
                let () = self
                    .conn()
                    .zadd(&list, channel, 0)
                    .await
                    .map_err(unavailable)?;
            }
        }
        Ok(removed == 1)
    }

    async fn channel_is_member(&self, channel: &str, user_id: u64) -> StoreResult<bool> {
        let score: Option<f64> = self
            .conn()
            .zscore(
                self.keys.channel(self.keys.user_shard(user_id), channel),
                user_id,
            )
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
        // Each shard's first `limit` members after `after`, merged: the first `limit` of all.
        let pages: Vec<Vec<String>> = self
            .per_shard(
                |shard| self.keys.channel(shard, channel),
                |pipe, key| {
                    pipe.cmd("ZRANGEBYSCORE")
                        .arg(key)
                        .arg(format!("({after}"))
                        .arg("+inf")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(limit);
                },
                "channel members",
            )
            .await?;
        let mut ids: Vec<u64> = pages
            .iter()
            .flatten()
            .filter_map(|m| m.parse::<u64>().ok())
            .collect();
        ids.sort_unstable();
        ids.truncate(limit);
        Ok(ids)
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
        let pages: Vec<Vec<String>> = self
            .per_shard(
                |shard| self.keys.channels(shard),
                |pipe, key| {
                    pipe.cmd("ZRANGEBYLEX")
                        .arg(key)
                        .arg(&min)
                        .arg("+")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(limit);
                },
                "channel list",
            )
            .await?;
        let mut names: Vec<String> = pages.into_iter().flatten().collect();
        names.sort_unstable();
        names.truncate(limit);
        Ok(names)
    }

    async fn channel_stats(&self, channels: &[String]) -> StoreResult<Vec<ChannelInfo>> {
        let channels = &channels[..channels.len().min(MAX_CHANNEL_STATS)];
        if channels.is_empty() {
            return Ok(Vec::new());
        }
        // Per channel and shard: the piece's size and how many of it are online (ZINTERCARD,
        // Redis 7, with the shard's plain set of online ids, in the same slot), summed.
        let mut batch = self.batch();
        for shard in 0..self.keys.shards() {
            let online = self.keys.online_ids(shard);
            for name in channels {
                let members = self.keys.channel(shard, name);
                batch.add(&members, |pipe| {
                    pipe.zcard(&members)
                        .cmd("ZINTERCARD")
                        .arg(2)
                        .arg(&members)
                        .arg(&online);
                });
            }
        }
        let mut stats: Vec<ChannelInfo> = channels
            .iter()
            .map(|name| ChannelInfo {
                name: name.clone(),
                members: 0,
                online: 0,
            })
            .collect();
        let replies = batch.run(self, &[]).await?;
        for (i, counts) in replies.into_iter().enumerate() {
            let [members, online]: [u64; 2] =
                batch::parse::<Vec<u64>>(Value::Array(counts), "channel stats")?
                    .try_into()
                    .map_err(|_| {
                        StoreError::Corrupt("channel stats: two counts expected".into())
                    })?;
            let info = &mut stats[i % channels.len()];
            info.members += members;
            info.online += online;
        }
        Ok(stats)
    }
}

impl RedisStore {
    /// Members of `channel` over all shards (one ZCARD per shard).
    async fn member_count(&self, channel: &str) -> StoreResult<u64> {
        let sizes: Vec<u64> = self
            .per_shard(
                |shard| self.keys.channel(shard, channel),
                |pipe, key| {
                    pipe.zcard(key);
                },
                "channel size",
            )
            .await?;
        Ok(sizes.into_iter().sum())
    }
}
