//! The Redis key layout, in one place. Every key starts with a configurable prefix (default
//! `cim`) so several clusters or test runs can share one Redis. Each key's **hash tag** (the
//! part in braces; Redis Cluster hashes only that) decides its slot: keys of one tag are the
//! only ones a script, a `MULTI` block or one pipeline of the cluster store may touch
//! together (see ARCHITECTURE.md, "Key layout", for which commands touch several keys).
//!
//! | key | tag | type | value |
//! | --- | --- | --- | --- |
//! | `{p}:user:next_id` | whole key | string | last user id handed out (INCR; registration only) |
//! | `{p}:user:name:{name}` | whole key | string | user id of that name |
//! | `{p}:user:{id}` | whole key | hash | `name`, `pw` (salted argon2 hash) |
//! | `{p}:login:{{id}}` | user | string | login slot: `{session}` (pending) or `{session}@{server}` |
//! | `{p}:route:{{id}}` | user | string | `{server}\|{session}`: where the user's connection lives |
//! | `{p}:gen:{{id}}` | user | string | the user's login generation (INCR at every login, logout and forced offline; only a session token of it can resume), expiring a session token lifetime after the last change |
//! | `{p}:inbox:{{id}}` | user | hash | message id → protobuf `Message` (unacked private messages) |
//! | `{p}:inbox:order:{{id}}` | user | sorted set | message id, scored by its seq: the inbox order |
//! | `{p}:inbox:rcpt:{{id}}` | user | hash | message id → sender id, for messages that asked for a receipt |
//! | `{p}:inbox:seq:{{id}}` | user | string | last seq handed out in this inbox (INCR; never expires) |
//! | `{p}:user:chans:{{id}}` | user | set | names of the channels a user is a member of |
//! | `{p}:online:{{t}}` | shard | sorted set | lexicographic index `{name}\x1f{id}` of the shard's connected users |
//! | `{p}:online:ids:{{t}}` | shard | set | ids of the shard's connected users (channel online counts: ZINTERCARD) |
//! | `{p}:onsrv:{{t}}:{server}` | shard | set | ids of the shard's users attached on that server (the lost-server sweep) |
//! | `{p}:events:{{t}}` | shard | stream | the shard's presence events, fields `t` (`online`/`offline`), `u` (user id), `n` (name), `s` (server id), `at` (unix ms), `r` (offline reason); capped with `MAXLEN ~` |
//! | `{p}:chan:{{t}}:{name}` | shard | sorted set | the members of a channel who are in shard `t`, each scored by their id |
//! | `{p}:chans:{{t}}` | shard | sorted set | names of the channels with members whose name hashes to shard `t`, score 0 |
//! | `{p}:user:grps:{{id}}` | user | hash | group id → the user's position in it (last acked seq) |
//! | `{p}:user:convs:{{id}}` | user | sorted set | peer ids of the user's private conversations, scored by the newest message's unix ms |
//! | `{p}:grp:next_id` | whole key | string | last group id handed out (INCR; group creation only) |
//! | `{p}:conv:{{c}}` | conversation | hash | `top`, `last`, `at`; groups: `name`, `owner`, `created`, `ver`, `gone`; private: read marks `r{id}` |
//! | `{p}:conv:log:{{c}}` | conversation | list | `{seq}\|{unix ms}\|{protobuf Message}`, oldest first, trimmed to the retention |
//! | `{p}:conv:ids:{{c}}` | conversation | sorted set | ids of the newest messages, scored by seq (idempotent appends) |
//! | `{p}:conv:mem:{{c}}` | conversation | hash | group members: user id → `{role}:{joined seq}` |
//! | `{p}:conv:read:{{c}}` | conversation | hash | group read marks: user id → seq |
//! | `{p}:notified:{{t}}` | shard | sorted set | `{message id}/{receiver}` of the message events the shard's stream got, scored by unix ms (kept 10 minutes: a retry does not notify twice) |
//! | `{p}:sent:{id}` | whole key | string | a group or channel message id already sent: its `timestamp_ms`, expiring after a minute |
//! | `{p}:lease:{name}` | whole key | string | holder of a lease (owner id), expiring with the lease |
//! | `{p}:cursor:{name}` | whole key | string | a named cursor (the webhook's last delivered event id) |
//!
//! **Shards.** What used to be one key for everyone (the online index, the presence stream,
//! the channel list, a channel's members) is cut into [`Keys::shards`] pieces so a cluster of
//! several masters shares it: a user belongs to shard `id % shards`, a channel name to shard
//! `crc16(name) % shards`. The tag `t` of shard `i` is the first string `s{i}.{k}` whose slot
//! falls in the `i`-th of `shards` equal ranges of the 16384 slots, so the shards spread
//! evenly over masters that split the slots evenly (what `redis-cli --cluster create` does).
//! A single Redis has one shard, under the names of the layout before shards (`{p}:online`,
//! `{p}:online:ids`, `{p}:events`, `{p}:chan:{{name}}`, `{p}:chans`; new: `{p}:onsrv:{server}`),
//! so an upgraded deployment keeps its data and every read costs what it did; a Redis Cluster
//! has [`CLUSTER_SHARDS`]. Every process of a cim cluster must use the same count.

/// Shards of a Redis Cluster store (see the module docs). 16: enough that a cluster of up to
/// 16 masters shares every shard-wide key, few enough that a read over all shards (an online
/// page, a poll of the presence streams) stays 16 small commands.
pub const CLUSTER_SHARDS: usize = 16;

/// Hash slots of Redis Cluster.
pub const SLOTS: u16 = 16384;

/// The hash slot of `key`, as Redis Cluster computes it: CRC16 (XMODEM) of the hash tag (the
/// part between the first `{` and the next `}`, when not empty) or of the whole key, modulo
/// 16384. The store groups commands by it (one pipeline per slot); which node serves a slot
/// is the redis crate's business.
pub fn hash_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) % SLOTS
}

/// The hash tags of `n` shards: shard `i`'s is the first `s{i}.{k}` whose slot lies in the
/// `i`-th of `n` equal ranges of the slots (one shard: `s0.0`).
fn shard_tags(n: usize) -> Vec<String> {
    let n = n.clamp(1, SLOTS as usize);
    (0..n)
        .map(|i| {
            let low = i * SLOTS as usize / n;
            let high = (i + 1) * SLOTS as usize / n;
            (0u64..)
                .map(|k| format!("s{i}.{k}"))
                .find(|tag| (low..high).contains(&(hash_slot(tag.as_bytes()) as usize)))
                .expect("some tag hashes into every slot range")
        })
        .collect()
}

/// Builds keys under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    /// The hash tag of each shard.
    shards: std::sync::Arc<[String]>,
}

/// Separator between name and id in the online index (names never contain control characters).
pub const ONLINE_SEP: char = '\x1f';

impl Keys {
    /// Keys of a single Redis: one shard.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self::with_shards(prefix, 1)
    }

    /// Keys of a store with `shards` shards (at least 1).
    pub fn with_shards(prefix: impl Into<String>, shards: usize) -> Self {
        Self {
            prefix: prefix.into(),
            shards: shard_tags(shards).into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// How many shards the shard-wide keys are cut into.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// The shard of a user.
    pub fn user_shard(&self, user_id: u64) -> usize {
        (user_id % self.shards.len() as u64) as usize
    }

    /// The shard of a channel name (in the channel list).
    pub fn name_shard(&self, name: &str) -> usize {
        hash_slot(name.as_bytes()) as usize % self.shards.len()
    }

    fn tag(&self, shard: usize) -> &str {
        &self.shards[shard % self.shards.len()]
    }

    pub fn next_user_id(&self) -> String {
        format!("{}:user:next_id", self.prefix)
    }

    pub fn user_name(&self, name: &str) -> String {
        format!("{}:user:name:{name}", self.prefix)
    }

    pub fn user(&self, id: u64) -> String {
        format!("{}:user:{id}", self.prefix)
    }

    pub fn login(&self, id: u64) -> String {
        format!("{}:login:{{{id}}}", self.prefix)
    }

    pub fn generation(&self, id: u64) -> String {
        format!("{}:gen:{{{id}}}", self.prefix)
    }

    pub fn route(&self, id: u64) -> String {
        format!("{}:route:{{{id}}}", self.prefix)
    }

    /// `{p}:{name}:{{tag}}` of a shard; with one shard the name alone, `{p}:{name}`: the
    /// keys of the layout before shards, so a single Redis keeps its data across the upgrade.
    fn sharded(&self, name: &str, shard: usize) -> String {
        if self.shards.len() == 1 {
            format!("{}:{name}", self.prefix)
        } else {
            format!("{}:{name}:{{{}}}", self.prefix, self.tag(shard))
        }
    }

    /// The (message id, receiver) pairs a shard's stream published message events for.
    pub fn notified(&self, shard: usize) -> String {
        self.sharded("notified", shard)
    }

    /// The online index (by name) of a shard.
    pub fn online(&self, shard: usize) -> String {
        self.sharded("online", shard)
    }

    /// The ids of the connected users of a shard.
    pub fn online_ids(&self, shard: usize) -> String {
        self.sharded("online:ids", shard)
    }

    /// The ids of a shard's users attached on `server_id`.
    pub fn server_users(&self, shard: usize, server_id: &str) -> String {
        format!("{}:{server_id}", self.sharded("onsrv", shard))
    }

    /// The presence stream of a shard.
    pub fn events(&self, shard: usize) -> String {
        self.sharded("events", shard)
    }

    pub fn sent(&self, message_id: &str) -> String {
        format!("{}:sent:{message_id}", self.prefix)
    }

    pub fn lease(&self, name: &str) -> String {
        format!("{}:lease:{name}", self.prefix)
    }

    pub fn cursor(&self, name: &str) -> String {
        format!("{}:cursor:{name}", self.prefix)
    }

    /// The members of channel `name` who are in `shard` (one shard: `{p}:chan:{{name}}`,
    /// the key before shards).
    pub fn channel(&self, shard: usize, name: &str) -> String {
        if self.shards.len() == 1 {
            format!("{}:chan:{{{name}}}", self.prefix)
        } else {
            format!("{}:chan:{{{}}}:{name}", self.prefix, self.tag(shard))
        }
    }

    pub fn user_channels(&self, id: u64) -> String {
        format!("{}:user:chans:{{{id}}}", self.prefix)
    }

    /// The channel names of a shard.
    pub fn channels(&self, shard: usize) -> String {
        self.sharded("chans", shard)
    }

    pub fn inbox(&self, id: u64) -> String {
        format!("{}:inbox:{{{id}}}", self.prefix)
    }

    pub fn inbox_order(&self, id: u64) -> String {
        format!("{}:inbox:order:{{{id}}}", self.prefix)
    }

    pub fn inbox_receipts(&self, id: u64) -> String {
        format!("{}:inbox:rcpt:{{{id}}}", self.prefix)
    }

    pub fn inbox_seq(&self, id: u64) -> String {
        format!("{}:inbox:seq:{{{id}}}", self.prefix)
    }

    /// The groups a user is a member of, each with the user's position (acked seq).
    pub fn user_groups(&self, id: u64) -> String {
        format!("{}:user:grps:{{{id}}}", self.prefix)
    }

    /// The private conversations of a user: peer ids scored by the last message's unix ms.
    pub fn user_conversations(&self, id: u64) -> String {
        format!("{}:user:convs:{{{id}}}", self.prefix)
    }

    /// Last group id handed out (INCR; group creation only).
    pub fn next_group_id(&self) -> String {
        format!("{}:grp:next_id", self.prefix)
    }

    /// The hash tag of a conversation's keys: `g{id}` for a group, `d{a}.{b}` (a < b) for
    /// the private conversation of two users.
    pub fn conversation_tag(a: u64, b: Option<u64>) -> String {
        match b {
            None => format!("g{a}"),
            Some(b) => format!("d{}.{}", a.min(b), a.max(b)),
        }
    }

    /// A conversation's metadata (hash): `top` (last seq), `last` (the newest message),
    /// `at` (its unix ms); groups also `name`, `owner`, `created`, `ver`, `gone`; private
    /// conversations the two read marks `r{id}`.
    pub fn conv_meta(&self, tag: &str) -> String {
        format!("{}:conv:{{{tag}}}", self.prefix)
    }

    /// A conversation's log (list of `{seq}|{unix ms}|{protobuf Message}`, oldest first).
    pub fn conv_log(&self, tag: &str) -> String {
        format!("{}:conv:log:{{{tag}}}", self.prefix)
    }

    /// The ids of a conversation's newest messages, scored by seq (idempotent appends).
    pub fn conv_ids(&self, tag: &str) -> String {
        format!("{}:conv:ids:{{{tag}}}", self.prefix)
    }

    /// A group's members (hash): user id → `{role code}:{joined seq}`.
    pub fn group_members(&self, tag: &str) -> String {
        format!("{}:conv:mem:{{{tag}}}", self.prefix)
    }

    /// A group's read marks (hash): user id → seq.
    pub fn group_reads(&self, tag: &str) -> String {
        format!("{}:conv:read:{{{tag}}}", self.prefix)
    }
}

/// Value of a route key.
pub fn route_value(server_id: &str, session: &str) -> String {
    format!("{server_id}|{session}")
}

/// `(server_id, session)` of a route value.
pub fn parse_route_value(value: &str) -> Option<(&str, &str)> {
    value.split_once('|')
}

/// Value of an attached login slot.
pub fn attached_slot(session: &str, server_id: &str) -> String {
    format!("{session}@{server_id}")
}

/// `(session, Some(server))` of an attached slot, `(session, None)` of a pending one.
pub fn parse_slot(value: &str) -> (&str, Option<&str>) {
    match value.split_once('@') {
        Some((s, server)) => (s, Some(server)),
        None => (value, None),
    }
}

/// Whether login-slot `value` is held by `session` (pending, or attached as `{session}@…`):
/// never by a longer session id that merely starts with it.
pub fn slot_held_by(value: &str, session: &str) -> bool {
    parse_slot(value).0 == session
}

/// Member of the online index.
pub fn online_member(name: &str, user_id: u64) -> String {
    format!("{name}{ONLINE_SEP}{user_id}")
}

pub fn parse_online_member(member: &str) -> Option<(&str, u64)> {
    let (name, id) = member.rsplit_once(ONLINE_SEP)?;
    Some((name, id.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_slots_are_redis_clusters() {
        // The examples of the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(hash_slot(b"123456789"), 0x31C3 % SLOTS);
        assert_eq!(hash_slot(b"foo"), 12182);
        assert_eq!(hash_slot(b"{user1000}.following"), hash_slot(b"user1000"));
        assert_eq!(hash_slot(b"foo{}{bar}"), hash_slot(b"foo{}{bar}"));
        assert_ne!(hash_slot(b"foo{}{bar}"), hash_slot(b"bar"));
        assert_eq!(hash_slot(b"foo{{bar}}zap"), hash_slot(b"{bar"));
        assert_eq!(hash_slot(b"foo{bar}{zap}"), hash_slot(b"bar"));
    }

    #[test]
    fn keys_of_one_user_share_a_slot() {
        let k = Keys::with_shards("t1", CLUSTER_SHARDS);
        let slot = hash_slot(k.route(42).as_bytes());
        for key in [
            k.login(42),
            k.generation(42),
            k.inbox(42),
            k.inbox_order(42),
            k.inbox_receipts(42),
            k.inbox_seq(42),
            k.user_channels(42),
        ] {
            assert_eq!(hash_slot(key.as_bytes()), slot, "{key}");
        }
        assert_eq!(k.route(42), "t1:route:{42}");
    }

    #[test]
    fn keys_of_one_shard_share_a_slot_and_shards_spread_evenly() {
        let k = Keys::with_shards("t1", CLUSTER_SHARDS);
        assert_eq!(k.shards(), CLUSTER_SHARDS);
        let range = SLOTS as usize / CLUSTER_SHARDS;
        for shard in 0..CLUSTER_SHARDS {
            let slot = hash_slot(k.online(shard).as_bytes());
            for key in [
                k.online_ids(shard),
                k.server_users(shard, "s-1"),
                k.events(shard),
                k.channel(shard, "room.1"),
                k.channels(shard),
            ] {
                assert_eq!(hash_slot(key.as_bytes()), slot, "{key}");
            }
            // Shard i in the i-th sixteenth of the slots.
            assert_eq!(slot as usize / range, shard, "{}", k.online(shard));
        }
        assert_eq!(k.user_shard(17), 1);
        assert!(k.name_shard("room.1") < CLUSTER_SHARDS);
        // One shard: every user and name in it.
        let single = Keys::new("t1");
        assert_eq!(single.shards(), 1);
        assert_eq!((single.user_shard(17), single.name_shard("x")), (0, 0));
        // One shard: the keys of the layout before shards (a single Redis keeps its data).
        assert_eq!(single.online(0), "t1:online");
        assert_eq!(single.online_ids(0), "t1:online:ids");
        assert_eq!(single.events(0), "t1:events");
        assert_eq!(single.channel(0, "room.1"), "t1:chan:{room.1}");
        assert_eq!(single.channels(0), "t1:chans");
        assert_eq!(single.server_users(0, "s-1"), "t1:onsrv:s-1");
    }

    #[test]
    fn values_round_trip() {
        assert_eq!(
            parse_route_value(&route_value("s-1", "abc")),
            Some(("s-1", "abc"))
        );
        assert_eq!(
            parse_slot(&attached_slot("abc", "s-1")),
            ("abc", Some("s-1"))
        );
        assert_eq!(parse_slot("abc"), ("abc", None));
        assert_eq!(
            parse_online_member(&online_member("bob", 9)),
            Some(("bob", 9))
        );
    }
}
