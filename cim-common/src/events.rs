//! Presence events: a user came online on a server, or went offline (and why); and message
//! events (the offline-push hook): a stored message waits for a receiver who is offline.
//!
//! Servers publish them through the state store as part of attaching and detaching a
//! connection (no extra round trip, and only when the route really changed hands: a
//! connection replaced by a newer one of the same user publishes no offline event). In Redis
//! they are capped streams (`{p}:events:{shard}`: one on a single Redis, one per shard of a
//! Redis Cluster, a user's events all in the user's shard), so any route instance can serve
//! them to business backends (server-sent events, webhook) and a subscriber that reconnects
//! can resume from the last id it saw. Event ids are the stream's (`{ms}-{n}`, with the shard
//! appended past shard 0), increasing in the order events are handed out; [`EventId`]
//! compares them.

use serde::{Deserialize, Serialize};

/// Why a user went offline (`reason` of an offline event).
pub mod reason {
    /// The client closed the connection.
    pub const CLOSED: &str = "closed";
    /// The connection broke (reset, write failure).
    pub const CONNECTION_LOST: &str = "connection_lost";
    /// No frame within the heartbeat timeout.
    pub const HEARTBEAT_TIMEOUT: &str = "heartbeat_timeout";
    /// The user logged out.
    pub const LOGGED_OUT: &str = "logged_out";
    /// Forced offline through the business API.
    pub const KICKED: &str = "kicked";
    /// The client did not read its messages fast enough.
    pub const SLOW_CONSUMER: &str = "slow_consumer";
    /// The client broke the protocol (bad frame, oversize frame, ...).
    pub const PROTOCOL_ERROR: &str = "protocol_error";
    /// The connection server shut down (its clients reconnect elsewhere).
    pub const SERVER_SHUTDOWN: &str = "server_shutdown";
    /// The connection server disappeared without detaching (crash); found by a route.
    pub const SERVER_LOST: &str = "server_lost";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceKind {
    Online,
    Offline,
    /// A stored message could not be pushed to its receiver (`user_id`), who is offline: the
    /// offline-push hook (a backend sends an APNs / FCM notification). See [`MessageEvent`].
    Message,
}

impl PresenceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceKind::Online => "online",
            PresenceKind::Offline => "offline",
            PresenceKind::Message => "message",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "online" => Some(PresenceKind::Online),
            "offline" => Some(PresenceKind::Offline),
            "message" => Some(PresenceKind::Message),
            _ => None,
        }
    }
}

/// What a `message` event says: the message the offline receiver (the event's `user_id`)
/// will get at their next connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageEvent {
    /// The message's id (what the client de-duplicates by).
    pub id: String,
    pub sender_id: u64,
    pub sender_name: String,
    /// `user` (a private conversation: `conversation_id` is the sender, as the receiver
    /// sees it) or `group`.
    pub conversation_type: String,
    pub conversation_id: u64,
    /// The proto name of its kind (`MESSAGE_KIND_PRIVATE`, `MESSAGE_KIND_GROUP_CHAT`).
    pub kind: String,
    /// Its place in the conversation's log.
    pub log_seq: u64,
    /// The text, only when the route is configured to include it (`message_events_body`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// One presence change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEvent {
    #[serde(rename = "type")]
    pub kind: PresenceKind,
    pub user_id: u64,
    pub name: String,
    /// The connection server the user connected to / was connected to.
    pub server_id: String,
    /// Unix milliseconds, by the clock of the process that published it.
    pub at_ms: i64,
    /// Offline events: one of [`reason`]; empty for online events.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Message events: the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<MessageEvent>,
}

/// An event as stored, with its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub id: String,
    pub event: PresenceEvent,
}

/// A parsed event id: `{ms}-{n}` (a Redis stream id) of shard 0, `{ms}-{n}-{shard}` of
/// another shard of a Redis Cluster store's presence streams. Ordered by `(ms, n, shard)`:
/// the order in which the store hands events out, across shards too (see
/// `Events::events_after`). The default is [`EventId::ZERO`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    pub ms: u64,
    pub seq: u64,
    /// The stream it is in (0 with one stream).
    pub shard: u32,
}

impl EventId {
    /// Before every event.
    pub const ZERO: EventId = EventId {
        ms: 0,
        seq: 0,
        shard: 0,
    };

    /// An id in stream 0.
    pub const fn new(ms: u64, seq: u64) -> Self {
        EventId { ms, seq, shard: 0 }
    }

    /// `None` unless `s` is `{u64}-{u64}` or `{u64}-{u64}-{u32}`.
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.split('-');
        let (ms, seq) = (parts.next()?, parts.next()?);
        let shard = parts.next();
        if parts.next().is_some() {
            return None;
        }
        let number = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if !number(ms) || !number(seq) || !shard.is_none_or(number) {
            return None;
        }
        Some(EventId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
            shard: shard.map_or(Some(0), |s| s.parse().ok())?,
        })
    }

    /// The stream id part (`{ms}-{n}`), what Redis knows the entry by.
    pub fn stream_id(&self) -> String {
        format!("{}-{}", self.ms, self.seq)
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.shard {
            0 => write!(f, "{}-{}", self.ms, self.seq),
            shard => write!(f, "{}-{}-{shard}", self.ms, self.seq),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_order() {
        let a = EventId::parse("1700000000000-0").unwrap();
        let b = EventId::parse("1700000000000-12").unwrap();
        let c = EventId::parse("1700000000001-0").unwrap();
        assert!(EventId::ZERO < a && a < b && b < c);
        assert_eq!(b.to_string(), "1700000000000-12");
        // Another shard's: after every id of a lower shard with the same stream id.
        let b3 = EventId::parse("1700000000000-12-3").unwrap();
        assert_eq!((b3.ms, b3.seq, b3.shard), (1_700_000_000_000, 12, 3));
        assert!(b < b3 && b3 < c);
        assert_eq!(b3.to_string(), "1700000000000-12-3");
        assert_eq!(b3.stream_id(), "1700000000000-12");
        assert_eq!(EventId::parse("5-1-0"), EventId::parse("5-1"));
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "1",
            "a-1",
            "1-b",
            "+1-1",
            "1-1-",
            "1-1-1-1",
            "1-1-x",
            "1-1-99999999999",
            "99999999999999999999-0",
        ] {
            assert_eq!(EventId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn json_shape() {
        let e = PresenceEvent {
            kind: PresenceKind::Offline,
            user_id: 7,
            name: "bob".into(),
            server_id: "server-1".into(),
            at_ms: 5,
            reason: reason::HEARTBEAT_TIMEOUT.into(),
            message: None,
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "offline");
        assert_eq!(v["reason"], "heartbeat_timeout");
        let online = PresenceEvent {
            kind: PresenceKind::Online,
            reason: String::new(),
            ..e.clone()
        };
        let v = serde_json::to_value(&online).unwrap();
        assert_eq!(v["type"], "online");
        assert!(v.get("reason").is_none());
        assert!(v.get("message").is_none());
        let message = PresenceEvent {
            kind: PresenceKind::Message,
            server_id: String::new(),
            reason: String::new(),
            message: Some(MessageEvent {
                id: "3-a".into(),
                sender_id: 3,
                sender_name: "alice".into(),
                conversation_type: "group".into(),
                conversation_id: 9,
                kind: "MESSAGE_KIND_GROUP_CHAT".into(),
                log_seq: 4,
                body: None,
            }),
            ..e
        };
        let v = serde_json::to_value(&message).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["message"]["conversation_id"], 9);
        assert!(v["message"].get("body").is_none());
    }
}
