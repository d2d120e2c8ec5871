//! The Redis key layout, in one place. Every key starts with a configurable prefix (default
//! `cim`) so several clusters or test runs can share one Redis.
//!
//! | key | type | value |
//! | --- | --- | --- |
//! | `{p}:user:next_id` | string | last user id handed out (INCR) |
//! | `{p}:user:name:{name}` | string | user id of that name |
//! | `{p}:user:{id}` | hash | `name`, `pw` (salted argon2 hash) |
//! | `{p}:login:{{id}}` | string | login slot: `{session}` (pending) or `{session}@{server}` |
//! | `{p}:route:{{id}}` | string | `{server}\|{session}`: where the user's connection lives |
//! | `{p}:gen:{{id}}` | string | the user's login generation (INCR at every login, logout and forced offline; only a session token of it can resume), expiring a session token lifetime after the last change |
//! | `{p}:online` | sorted set | lexicographic index `{name}\x1f{id}` of connected users |
//! | `{p}:online:ids` | set | user ids of connected users (channel online counts: ZINTERCARD) |
//! | `{p}:events` | stream | presence events, fields `t` (`online`/`offline`), `u` (user id), `n` (name), `s` (server id), `at` (unix ms), `r` (offline reason); capped with `MAXLEN ~` |
//! | `{p}:sent:{id}` | string | a group or channel message id already sent: its `timestamp_ms`, expiring after a minute (repeats are answered, not delivered) |
//! | `{p}:lease:{name}` | string | holder of a lease (owner id), expiring with the lease |
//! | `{p}:cursor:{name}` | string | a named cursor (the webhook's last delivered event id) |
//! | `{p}:chan:{{name}}` | sorted set | member user ids of a channel, each scored by itself (pages by id) |
//! | `{p}:user:chans:{{id}}` | set | names of the channels a user is a member of |
//! | `{p}:chans` | sorted set | names of the channels with members, score 0 (pages by name) |
//! | `{p}:inbox:{{id}}` | hash | message id → protobuf `Message` (unacked private messages) |
//! | `{p}:inbox:order:{{id}}` | sorted set | message id, scored by its seq: the inbox order |
//! | `{p}:inbox:rcpt:{{id}}` | hash | message id → sender id, for messages that asked for a receipt |
//! | `{p}:inbox:seq:{{id}}` | string | last seq handed out in this inbox (INCR; never expires) |
//!
//! The login slot and the route of one user share a hash tag (`{id}`) so the Lua scripts that
//! touch both stay within one Redis Cluster slot; so do the four inbox keys of one user.
//! A channel's member set has its own hash tag (`{name}`), a user's channel set that of the
//! user (`{id}`): joining touches both (and the channel list), so it is ordered writes rather
//! than one script (see the Redis store).

/// Builds keys under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

/// Separator between name and id in the online index (names never contain control characters).
pub const ONLINE_SEP: char = '\x1f';

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
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

    /// SCAN pattern matching every route key.
    pub fn route_pattern(&self) -> String {
        format!("{}:route:*", self.prefix)
    }

    /// The user id of a route key, if it is one.
    pub fn parse_route_key(&self, key: &str) -> Option<u64> {
        key.strip_prefix(&self.prefix)?
            .strip_prefix(":route:{")?
            .strip_suffix('}')?
            .parse()
            .ok()
    }

    pub fn online(&self) -> String {
        format!("{}:online", self.prefix)
    }

    pub fn online_ids(&self) -> String {
        format!("{}:online:ids", self.prefix)
    }

    pub fn events(&self) -> String {
        format!("{}:events", self.prefix)
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

    pub fn channel(&self, name: &str) -> String {
        format!("{}:chan:{{{name}}}", self.prefix)
    }

    pub fn user_channels(&self, id: u64) -> String {
        format!("{}:user:chans:{{{id}}}", self.prefix)
    }

    pub fn channels(&self) -> String {
        format!("{}:chans", self.prefix)
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
    fn route_keys_round_trip() {
        let k = Keys::new("t1");
        assert_eq!(k.route(42), "t1:route:{42}");
        assert_eq!(k.parse_route_key(&k.route(42)), Some(42));
        assert_eq!(k.parse_route_key("t2:route:{42}"), None);
        assert_eq!(k.parse_route_key("t1:route:{x}"), None);
    }

    #[test]
    fn channel_keys_carry_their_hash_tag() {
        let k = Keys::new("t1");
        assert_eq!(k.channel("room.1"), "t1:chan:{room.1}");
        assert_eq!(k.user_channels(7), "t1:user:chans:{7}");
        assert_eq!(k.channels(), "t1:chans");
        assert_eq!(k.online_ids(), "t1:online:ids");
        // A user channel set is no route key, nor an account record.
        assert_eq!(k.parse_route_key(&k.user_channels(7)), None);
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
