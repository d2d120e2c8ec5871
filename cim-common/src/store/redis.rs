//! [`StateStore`] on Redis. One multiplexed connection (auto-reconnecting) shared by all
//! tasks; atomic multi-step updates are Lua scripts (or MULTI/EXEC where no step depends on
//! another's answer: acks) over keys of one hash slot.
//!
//! Round trips: claim 1 (2 when the slot is held), attach 2, detach 2, a stale route's
//! removal 2 (each 1 more when the user attached again meanwhile), routes of N users 1
//! (MGET), one SCAN step 2 (SCAN + MGET). Inboxes: storing N messages 1 (a pipeline of one
//! script call per receiver, applied in slice order), acking for N users 1 (a pipeline of
//! one MULTI/EXEC per user), inbox length 1 (ZCARD), a read 1 — plus, only when it skipped
//! expired or unreadable messages, one more per refill of the page and one to delete them.
//! Presence events, leases, cursors: 1 each (a blocking read: plus a connect on first use
//! and after an error; one more read per page of malformed entries it skips). Channels: join
//! 2 (1 when already a member or over the limit), leave 1 (2 when it was the last member, 3
//! when a join came in between), membership, a user's channels, a page of members or names
//! 1, the stats of N channels 1 (ZINTERCARD: Redis 7.0 or later).
//! A pipeline that meets NOSCRIPT (Redis restarted, or SCRIPT FLUSH) loads its scripts and
//! runs again: 2 more.
//!
//! Presence: attaching indexes the user as online twice, by name (`online`, for listing)
//! and by id (`online:ids`, for the online counts of channels), and appends an online event
//! to the `events` stream, all in the round trip after the attach script; detaching (only
//! when the route was still ours) undoes it and appends an offline event with the reason.
//! The stream is capped with `MAXLEN ~` on every append. A blocking read of it
//! (`events_wait`) runs on a connection of its own, never on the shared one, where it would
//! hold up every command behind it.
//!
//! Channels are a member set per channel (sorted by user id, for paging), a channel set per
//! user (for the per-user limit and "my channels"), and the list of channel names. They live
//! in three hash slots, so a join or leave is ordered writes that a later join or leave
//! repairs if interrupted (see `channel_join` below), not one script.
//!
//! An inbox is four keys under one hash tag (see [`crate::keys`]): the messages (hash), their
//! order (sorted set scored by seq), the senders waiting for a receipt (hash), and the seq
//! counter. Every store trims the inbox to `max_messages` and sets the first three to expire
//! after `max_age`; the counter never expires, so seqs are never reused. Messages older than
//! `max_age` (by `timestamp_ms`, which Lua cannot decode) are filtered here after a read and
//! deleted by a second script, only if they still hold the seq the read saw.

use super::*;
use crate::{
    events::{reason, EventId, PresenceEvent, PresenceKind},
    keys::{self, Keys},
};
use ::redis::{
    aio::{ConnectionManager, MultiplexedConnection},
    AsyncCommands, AsyncConnectionConfig, Script, ScriptInvocation, Value,
};
use prost::Message as _;
use std::{
    collections::HashSet,
    sync::{Arc, LazyLock},
};

/// Attach: KEYS = login slot, route; ARGV = session, attached slot value, route value.
static ATTACH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
        redis.call('SET', KEYS[1], ARGV[2])
        redis.call('SET', KEYS[2], ARGV[3])
        return 1",
    )
});

/// Detach: KEYS = login slot, route; ARGV = attached slot value, route value.
/// Returns 1 when the route was ours and is gone.
static DETACH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local removed = 0
        if redis.call('GET', KEYS[2]) == ARGV[2] then
            redis.call('DEL', KEYS[2])
            removed = 1
        end
        if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
        return removed",
    )
});

/// Compare-and-delete: KEYS = key; ARGV = expected value.
static DEL_IF_EQ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
        return 0",
    )
});

/// Compare-and-set with expiry: KEYS = key; ARGV = expected, new value, ttl ms.
static SET_IF_EQ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('GET', KEYS[1]) == ARGV[1] then
            redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
            return 1
        end
        return 0",
    )
});

/// Release a slot held by a session (pending or attached). KEYS = slot; ARGV = session.
/// Returns the old value when deleted, nil otherwise.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local v = redis.call('GET', KEYS[1])
        if not v then return nil end
        if v == ARGV[1] or string.sub(v, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '@' then
            redis.call('DEL', KEYS[1])
            return v
        end
        return nil",
    )
});

/// Give a slot held by a session (pending or attached) to another, pending. KEYS = slot;
/// ARGV = held session, new session, ttl ms. Returns 1 when it did.
static TAKE_OVER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local v = redis.call('GET', KEYS[1])
        if not v then return 0 end
        if v == ARGV[1] or string.sub(v, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '@' then
            redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
            return 1
        end
        return 0",
    )
});

/// Next login generation. KEYS = generation; ARGV = keep ms. Returns the new generation.
static NEXT_GENERATION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local g = redis.call('INCR', KEYS[1])
        redis.call('PEXPIRE', KEYS[1], ARGV[1])
        return g",
    )
});

/// Take or renew a lease. KEYS = lease; ARGV = owner, ttl ms. Returns 1 while `owner` holds it.
static LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('GET', KEYS[1]) == ARGV[1] then
            redis.call('PEXPIRE', KEYS[1], ARGV[2])
            return 1
        end
        if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
        return 0",
    )
});

/// The user's half of joining a channel, atomic so that concurrent joins cannot pass the
/// limit together. KEYS = the user's channel set; ARGV = channel, max channels. Returns 1
/// when the channel was listed already, 2 when added now, 0 when the user is at the limit
/// (nothing added).
static JOIN_INDEX: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
        if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
        redis.call('SADD', KEYS[1], ARGV[1])
        return 2",
    )
});

/// Store messages of one receiver in its inbox, in argument order. KEYS = inbox hash, order,
/// receipts, seq counter; ARGV = max messages, max age in ms, then per message: id, encoded
/// message, sender to send a receipt to ("0": none). When every message is new (the normal
/// case) it returns just the first one's seq: the others follow it one by one. Otherwise a
/// flat array: each message's seq, then for each one that was already there (a retry: the
/// caller goes on with the stored copy) its 1-based position and the stored copy. (The
/// first version answered `{seq, copy}` per message: parsing those nested replies was 15 %
/// of the route's CPU flat out.) Trims the oldest messages past the maximum and keeps the inbox
/// (not the seq counter: seqs are never reused) alive for the max age. One call per receiver
/// and batch: the script's fixed cost (most of it, measured) is paid once for all of them.
static INBOX_STORE: LazyLock<Script> = LazyLock::new(|| {
    // Costs are per `redis.call` (measured: the call overhead exceeds the commands'), so one
    // call's messages share one ZMSCORE (which are stored already), one HSET, one INCRBY and
    // one ZADD, however many they are.
    Script::new(
        r"
        local ids = {}
        for i = 3, #ARGV, 3 do ids[#ids + 1] = ARGV[i] end
        local scores = redis.call('ZMSCORE', KEYS[2], unpack(ids))
        local seqs, fresh, stored, dups, pending = {}, {}, {}, {}, {}
        for k, id in ipairs(ids) do
            if scores[k] then
                stored[#stored + 1] = {k, tonumber(scores[k]), id}
            elseif pending[id] then
                dups[#dups + 1] = {k, pending[id], id}
            else
                pending[id] = k
                fresh[#fresh + 1] = k
            end
        end
        local receipts = false
        if #fresh > 0 then
            local first = redis.call('INCRBY', KEYS[4], #fresh) - #fresh
            local values, order, senders = {}, {}, {}
            for j, k in ipairs(fresh) do
                local seq = first + j
                local i = 3 * k
                seqs[k] = seq
                values[#values + 1] = ARGV[i]
                values[#values + 1] = ARGV[i + 1]
                order[#order + 1] = seq
                order[#order + 1] = ARGV[i]
                if ARGV[i + 2] ~= '0' then
                    senders[#senders + 1] = ARGV[i]
                    senders[#senders + 1] = ARGV[i + 2]
                end
            end
            redis.call('HSET', KEYS[1], unpack(values))
            redis.call('ZADD', KEYS[2], unpack(order))
            if #senders > 0 then
                redis.call('HSET', KEYS[3], unpack(senders))
                receipts = true
            end
        end
        -- Already stored (a retry), or twice in this call: the stored seq and copy.
        local copies = {}
        for _, d in ipairs(stored) do
            seqs[d[1]] = d[2]
            copies[#copies + 1] = {d[1], redis.call('HGET', KEYS[1], d[3])}
        end
        for _, d in ipairs(dups) do
            seqs[d[1]] = seqs[d[2]]
            copies[#copies + 1] = {d[1], redis.call('HGET', KEYS[1], d[3])}
        end
        local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[1])
        if excess > 0 then
            local popped = redis.call('ZPOPMIN', KEYS[2], excess)
            for i = 1, #popped, 2 do
                redis.call('HDEL', KEYS[1], popped[i])
                redis.call('HDEL', KEYS[3], popped[i])
            end
        end
        redis.call('PEXPIRE', KEYS[1], ARGV[2])
        redis.call('PEXPIRE', KEYS[2], ARGV[2])
        if receipts or redis.call('EXISTS', KEYS[3]) == 1 then
            redis.call('PEXPIRE', KEYS[3], ARGV[2])
        end
        if #copies == 0 then return seqs[1] end
        local flat = {}
        for k = 1, #ids do flat[k] = seqs[k] end
        for _, c in ipairs(copies) do
            flat[#flat + 1] = c[1]
            flat[#flat + 1] = c[2]
        end
        return flat",
    )
});

/// A page of an inbox. KEYS = inbox hash, order, receipts; ARGV = after seq, limit.
/// Returns `{id, seq, message}` per entry in seq order; `message` is nil (and the entry
/// removed) when the hash has no value for it.
static INBOX_READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local page = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf',
            'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
        local out = {}
        if #page == 0 then return out end
        local ids = {}
        for i = 1, #page, 2 do ids[#ids + 1] = page[i] end
        local values = redis.call('HMGET', KEYS[1], unpack(ids))
        for i, id in ipairs(ids) do
            local value = values[i]
            if not value then
                redis.call('ZREM', KEYS[2], id)
                redis.call('HDEL', KEYS[3], id)
            end
            out[i] = {id, tonumber(page[2 * i]), value}
        end
        return out",
    )
});

/// Drops messages a read found expired or unreadable, each only if it still has the seq
/// the read saw (it may have been acked and stored again since). No receipt is sent for
/// them. KEYS = inbox hash, order, receipts; ARGV = id, seq, id, seq, ...
static INBOX_PRUNE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        for i = 1, #ARGV, 2 do
            local seq = redis.call('ZSCORE', KEYS[2], ARGV[i])
            if seq and tonumber(seq) == tonumber(ARGV[i + 1]) then
                redis.call('ZREM', KEYS[2], ARGV[i])
                redis.call('HDEL', KEYS[1], ARGV[i])
                redis.call('HDEL', KEYS[3], ARGV[i])
            end
        end
        return 0",
    )
});

/// Most messages one inbox read returns, whatever the caller asks for.
pub const MAX_INBOX_READ: usize = 1000;
/// Most ids one ack entry (one user) is looked at; the rest are ignored.
pub const MAX_ACK_IDS: usize = 1024;
/// Longest message id an ack looks up (longer ones cannot exist and are ignored).
pub const MAX_ACK_ID_LEN: usize = 128;

/// The ids of an ack entry that are looked at: the first [`MAX_ACK_IDS`], without those
/// longer than [`MAX_ACK_ID_LEN`] bytes.
pub(super) fn ack_ids(ids: &[String]) -> impl Iterator<Item = &String> {
    ids.iter()
        .take(MAX_ACK_IDS)
        .filter(|id| id.len() <= MAX_ACK_ID_LEN)
}

/// The receipt senders of an ack's `EXEC` reply (`[zmscore, zrem, hdel, hmget]`): for each
/// of the `n` ids that this ack removed, the sender waiting for its receipt, if one was.
fn ack_receipt_senders(exec: Value, n: usize) -> StoreResult<Vec<Option<u64>>> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("inbox ack reply: {what}"));
    let Value::Array(mut results) = exec else {
        return Err(corrupt("not an array"));
    };
    if results.len() != 4 {
        return Err(corrupt("not 4 results"));
    }
    let Value::Array(senders) = results.swap_remove(3) else {
        return Err(corrupt("receipt senders not an array"));
    };
    let Value::Array(scores) = results.swap_remove(0) else {
        return Err(corrupt("scores not an array"));
    };
    if senders.len() != n || scores.len() != n {
        return Err(corrupt("one sender and one score per id expected"));
    }
    senders
        .into_iter()
        .zip(scores)
        .map(|(v, score)| match v {
            // Not there when acked (acked before, or never stored): no receipt from this ack.
            _ if score == Value::Nil => Ok(None),
            Value::Nil => Ok(None),
            Value::BulkString(b) => std::str::from_utf8(&b)
                .ok()
                .and_then(|s| s.parse().ok())
                .map(Some)
                .ok_or_else(|| corrupt("a sender is not a user id")),
            _ => Err(corrupt("a sender is not a string")),
        })
        .collect()
}

/// The oldest `timestamp_ms` an inbox still delivers at `now_ms`.
pub(super) fn oldest_kept_ms(limits: &InboxLimits, now_ms: i64) -> i64 {
    let max_age_ms = i64::try_from(limits.max_age.as_millis()).unwrap_or(i64::MAX);
    now_ms.saturating_sub(max_age_ms)
}

/// A presence event stamped now (`reason` empty for online events).
pub(super) fn presence_event(
    kind: PresenceKind,
    user_id: u64,
    name: &str,
    server_id: &str,
    reason: &str,
) -> PresenceEvent {
    PresenceEvent {
        kind,
        user_id,
        name: name.to_string(),
        server_id: server_id.to_string(),
        at_ms: crate::time::now_ms(),
        reason: reason.to_string(),
    }
}

/// The id of an `after` argument; not an event id is a caller's bug, reported as such.
pub(super) fn parse_event_id(after: &str) -> StoreResult<EventId> {
    EventId::parse(after).ok_or_else(|| StoreError::Corrupt(format!("invalid event id {after:?}")))
}

/// The highest id a stream can hold: nothing comes after it.
const LAST_EVENT_ID: EventId = EventId {
    ms: u64::MAX,
    seq: u64::MAX,
};

/// UTF-8 text of a reply element.
/// Every script, loaded at connect.
static ALL_SCRIPTS: [&LazyLock<Script>; 12] = [
    &ATTACH,
    &DETACH,
    &DEL_IF_EQ,
    &SET_IF_EQ,
    &RELEASE,
    &TAKE_OVER,
    &NEXT_GENERATION,
    &LEASE,
    &JOIN_INDEX,
    &INBOX_STORE,
    &INBOX_READ,
    &INBOX_PRUNE,
];

/// Oldest Redis cim runs on: the scripts use `ZMSCORE` (6.2), channel counts
/// `ZINTERCARD` (7.0) and broadcast claims `SET … NX GET` (7.0).
const MIN_REDIS_VERSION: (u64, u64) = (7, 0);

/// Refuses a Redis older than [`MIN_REDIS_VERSION`], from the text of `INFO server`, at start
/// rather than with unknown-command errors on the first message. A server that does not say
/// its version (a proxy, a compatible store) is given the benefit of the doubt.
fn check_version(info: &str) -> StoreResult<()> {
    let Some(version) = info
        .lines()
        .find_map(|line| line.trim().strip_prefix("redis_version:"))
    else {
        return Ok(());
    };
    let mut parts = version.split('.').map(|p| p.parse::<u64>().ok());
    let (Some(Some(major)), Some(Some(minor))) = (parts.next(), parts.next()) else {
        return Ok(());
    };
    if (major, minor) < MIN_REDIS_VERSION {
        let (want_major, want_minor) = MIN_REDIS_VERSION;
        return Err(StoreError::Unsupported(format!(
            "Redis {want_major}.{want_minor} or newer is required, this one is {version}"
        )));
    }
    Ok(())
}

/// An inbox store's pipeline (one script call per receiver) and how to read its answers.
struct StorePlan {
    pipe: ::redis::Pipeline,
    /// Messages per receiver, in call order.
    receivers: Vec<usize>,
    /// Position in the slice of each message, in call order.
    order: Vec<usize>,
}

impl StorePlan {
    /// Sets each message's seq (and, for one stored already, puts the stored copy in its
    /// place) from the calls' answers.
    fn apply(self, messages: &mut [Message], per_receiver: Vec<Value>) -> StoreResult<()> {
        if per_receiver.len() != self.receivers.len() {
            return Err(StoreError::Corrupt(format!(
                "inbox store: {} answers for {} receivers",
                per_receiver.len(),
                self.receivers.len()
            )));
        }
        let mut answers: Vec<(u64, Option<Vec<u8>>)> = Vec::with_capacity(messages.len());
        for (reply, &n) in per_receiver.into_iter().zip(&self.receivers) {
            answers.extend(stored_answers(reply, n)?);
        }
        for (pos, (seq, stored)) in self.order.into_iter().zip(answers) {
            let m = &mut messages[pos];
            // Already stored (a retry): the stored copy is the message (its timestamp, its
            // receipt request), not the one this retry built.
            if let Some(bytes) = stored {
                match <Message as prost::Message>::decode(bytes.as_slice()) {
                    Ok(copy) => *m = copy,
                    Err(e) => {
                        tracing::warn!(id = %m.id, error = %e, "stored message does not decode")
                    }
                }
            }
            m.seq = seq;
        }
        Ok(())
    }
}

/// The answers of one INBOX_STORE call for `n` messages: each message's seq and, when it
/// was stored already, the stored copy. See the script for the two reply shapes.
fn stored_answers(reply: Value, n: usize) -> StoreResult<Vec<(u64, Option<Vec<u8>>)>> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("inbox store reply: {what}"));
    let seq = |v: &Value| match v {
        Value::Int(i) => u64::try_from(*i).map_err(|_| corrupt("negative seq")),
        _ => Err(corrupt("seq is not an integer")),
    };
    match reply {
        Value::Int(_) => {
            let first = seq(&reply)?;
            Ok((0..n as u64).map(|j| (first + j, None)).collect())
        }
        Value::Array(items) if items.len() >= n && (items.len() - n).is_multiple_of(2) => {
            let mut answers = items[..n]
                .iter()
                .map(|v| Ok((seq(v)?, None)))
                .collect::<StoreResult<Vec<_>>>()?;
            for pair in items[n..].chunks_exact(2) {
                let k = usize::try_from(seq(&pair[0])?).unwrap_or(usize::MAX);
                let slot = k
                    .checked_sub(1)
                    .and_then(|i| answers.get_mut(i))
                    .ok_or_else(|| corrupt("copy of a message not in the call"))?;
                slot.1 = match &pair[1] {
                    Value::BulkString(b) => Some(b.clone()),
                    // The hash lost it (an inbox half-expired): go on with this copy.
                    _ => None,
                };
            }
            Ok(answers)
        }
        _ => Err(corrupt("unexpected shape")),
    }
}

fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// What a read of the stream returned.
#[derive(Default)]
struct StreamPage {
    /// The well-formed entries, as events.
    events: Vec<StoredEvent>,
    /// Entries read, malformed ones included.
    entries: usize,
    /// Id of the last entry read, malformed or not: where to go on from.
    last_id: Option<EventId>,
}

/// An XRANGE / XREVRANGE reply (an array of `[id, [field, value, ...]]`). Malformed entries
/// are skipped (the stream is shared state anything with access can write to) but counted,
/// so that a reader can go on past them rather than stop at them.
fn stream_page(reply: &Value) -> StreamPage {
    let Value::Array(entries) = reply else {
        return StreamPage::default();
    };
    let mut page = StreamPage {
        entries: entries.len(),
        ..StreamPage::default()
    };
    for entry in entries {
        if let Some(id) = entry_id(entry) {
            page.last_id = Some(id);
        }
        match parse_stream_entry(entry) {
            Some(event) => page.events.push(event),
            None => tracing::debug!(?entry, "events: skipping a malformed stream entry"),
        }
    }
    page
}

/// An XREAD reply on one stream: nil (timed out), `[[key, entries]]` (RESP2) or
/// `{key: entries}` (RESP3).
fn xread_page(reply: &Value) -> StreamPage {
    let entries = match reply {
        Value::Array(streams) => streams.iter().find_map(|s| match s {
            Value::Array(parts) if parts.len() == 2 => Some(&parts[1]),
            _ => None,
        }),
        Value::Map(streams) => streams.first().map(|(_, entries)| entries),
        _ => None,
    };
    entries.map(stream_page).unwrap_or_default()
}

/// The id of a stream entry, even if its fields are malformed.
fn entry_id(entry: &Value) -> Option<EventId> {
    let Value::Array(parts) = entry else {
        return None;
    };
    EventId::parse(text(parts.first()?)?)
}

/// One stream entry as an event (fields in [`crate::keys`]; unknown fields are ignored, so
/// a newer writer may add some).
fn parse_stream_entry(entry: &Value) -> Option<StoredEvent> {
    let Value::Array(parts) = entry else {
        return None;
    };
    let [id, Value::Array(fields)] = parts.as_slice() else {
        return None;
    };
    let id = text(id)?;
    EventId::parse(id)?;
    let (mut kind, mut user_id, mut name, mut server_id, mut at_ms) =
        (None, None, None, None, None);
    let mut reason = String::new();
    for pair in fields.chunks(2) {
        let [field, value] = pair else { return None };
        let value = text(value)?;
        match text(field)? {
            "t" => kind = Some(PresenceKind::parse(value)?),
            "u" => user_id = Some(value.parse().ok()?),
            "n" => name = Some(value.to_string()),
            "s" => server_id = Some(value.to_string()),
            "at" => at_ms = Some(value.parse().ok()?),
            "r" => reason = value.to_string(),
            _ => {}
        }
    }
    Some(StoredEvent {
        id: id.to_string(),
        event: PresenceEvent {
            kind: kind?,
            user_id: user_id?,
            name: name?,
            server_id: server_id?,
            at_ms: at_ms?,
            reason,
        },
    })
}

/// Redis-backed shared state.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    /// For the connection of blocking reads.
    client: ::redis::Client,
    /// Deadline of every call (blocking reads: on top of their wait).
    timeout: Duration,
    keys: Keys,
    limits: InboxLimits,
    events_max_len: usize,
    /// The connection of `events_wait` (a blocking XREAD would stall every command queued
    /// behind it on the shared one). Made on first use; taken out for the duration of a read
    /// and put back only after a complete answer, so an error or a cancelled read drops it
    /// (with the XREAD possibly still blocked on it) and the next read connects afresh.
    waiter: Arc<tokio::sync::Mutex<Option<MultiplexedConnection>>>,
}

fn unavailable(e: ::redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`). Every command times out after `timeout`.
    pub async fn connect(url: &str, prefix: &str, timeout: Duration) -> StoreResult<Self> {
        let client = ::redis::Client::open(url).map_err(unavailable)?;
        let config = ::redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout)
            // No retry loop inside a call: redis-rs backs off from 1 s up to a minute between
            // reconnect attempts, and every command would wait for it. One immediate
            // reconnect attempt per call keeps "Redis down" a fast error.
            .set_number_of_retries(0);
        let conn = tokio::time::timeout(
            timeout * 3,
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        .map_err(|_| StoreError::Unavailable(format!("connecting to {url} timed out")))?
        .map_err(unavailable)?;
        let mut probe = conn.clone();
        let info: String = tokio::time::timeout(
            timeout,
            ::redis::cmd("INFO").arg("server").query_async(&mut probe),
        )
        .await
        .map_err(|_| StoreError::Unavailable(format!("INFO on {url} timed out")))?
        .map_err(unavailable)?;
        check_version(&info)?;
        // Every script loaded now: otherwise each one's first call answers NOSCRIPT and is
        // sent again, which for the inbox store means after the route lookup pipelined
        // behind it (the order the login replay relies on; see ARCHITECTURE.md).
        let mut load = ::redis::pipe();
        for script in ALL_SCRIPTS {
            load.load_script(script).ignore();
        }
        tokio::time::timeout(timeout, load.query_async::<()>(&mut probe))
            .await
            .map_err(|_| StoreError::Unavailable(format!("loading scripts on {url} timed out")))?
            .map_err(unavailable)?;
        Ok(Self {
            conn,
            client,
            timeout,
            keys: Keys::new(prefix),
            limits: InboxLimits::default(),
            events_max_len: DEFAULT_EVENTS_MAX_LEN,
            waiter: Arc::default(),
        })
    }

    /// Sets the bounds of every inbox (default: [`InboxLimits::default`]).
    #[must_use]
    pub fn with_inbox_limits(mut self, limits: InboxLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets how many presence events the stream keeps (default:
    /// [`DEFAULT_EVENTS_MAX_LEN`]; at least 1). Trimming is approximate (`MAXLEN ~`): Redis
    /// drops whole stream nodes only, so the stream holds up to one node (by default 100
    /// entries, `stream-node-max-entries`) more.
    #[must_use]
    pub fn with_events_max_len(mut self, max_len: usize) -> Self {
        self.events_max_len = max_len.max(1);
        self
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Appends `event` to the stream (trimmed to about `events_max_len`) in `pipe`.
    fn publish(&self, pipe: &mut ::redis::Pipeline, event: &PresenceEvent) {
        pipe.cmd("XADD")
            .arg(self.keys.events())
            .arg("MAXLEN")
            .arg("~")
            .arg(self.events_max_len)
            .arg("*")
            .arg("t")
            .arg(event.kind.as_str())
            .arg("u")
            .arg(event.user_id)
            .arg("n")
            .arg(&event.name)
            .arg("s")
            .arg(&event.server_id)
            .arg("at")
            .arg(event.at_ms);
        if !event.reason.is_empty() {
            pipe.arg("r").arg(&event.reason);
        }
        pipe.ignore();
    }

    /// Indexes a user as online (name index, id set) and publishes `online`, in `pipe`.
    fn index(&self, pipe: &mut ::redis::Pipeline, name: Option<&str>, online: &PresenceEvent) {
        if let Some(name) = name {
            pipe.zadd(
                self.keys.online(),
                keys::online_member(name, online.user_id),
                0,
            )
            .ignore();
        }
        pipe.sadd(self.keys.online_ids(), online.user_id).ignore();
        self.publish(pipe, online);
    }

    /// After a user's route was deleted: removes them from the online index and the id set
    /// (the name index only with the `name`, when known) and publishes `offline`. These keys
    /// live in other hash slots than the route, so this cannot be part of the route's script:
    /// if the user attached again in between, put the entries back and publish them online
    /// again (the route is the truth). The event goes before the GET of the route, so either
    /// that GET sees the new route, or the new attach (whose writes follow its route) publishes
    /// after us: either way the last event of the user says online. The price of the first
    /// case: an online event can come twice in a row.
    async fn unindex(
        &self,
        user_id: u64,
        name: Option<&str>,
        offline: &PresenceEvent,
    ) -> StoreResult<()> {
        let mut c = self.conn();
        let mut pipe = ::redis::pipe();
        if let Some(name) = name {
            pipe.zrem(self.keys.online(), keys::online_member(name, user_id))
                .ignore();
        }
        pipe.srem(self.keys.online_ids(), user_id).ignore();
        self.publish(&mut pipe, offline);
        pipe.get(self.keys.route(user_id));
        let (route,): (Option<String>,) = pipe.query_async(&mut c).await.map_err(unavailable)?;
        if let Some((server_id, _)) = route.as_deref().and_then(keys::parse_route_value) {
            let online = presence_event(
                PresenceKind::Online,
                user_id,
                name.unwrap_or_default(),
                server_id,
                "",
            );
            let mut pipe = ::redis::pipe();
            self.index(&mut pipe, name, &online);
            let () = pipe.query_async(&mut c).await.map_err(unavailable)?;
        }
        Ok(())
    }

    /// The inbox max age as a PEXPIRE argument (at least 1 ms: 0 would delete at once).
    fn max_age_ms(&self) -> u64 {
        u64::try_from(self.limits.max_age.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn prune_invocation(
        &self,
        user_id: u64,
        entries: &[(String, u64)],
    ) -> ScriptInvocation<'static> {
        let mut invocation = INBOX_PRUNE.prepare_invoke();
        invocation
            .key(self.keys.inbox(user_id))
            .key(self.keys.inbox_order(user_id))
            .key(self.keys.inbox_receipts(user_id));
        for (id, seq) in entries {
            invocation.arg(id).arg(seq);
        }
        invocation
    }

    /// Runs a pipeline of script invocations in one round trip. Redis forgets scripts when
    /// it restarts (or on SCRIPT FLUSH): on NOSCRIPT, load `scripts` and run the whole
    /// pipeline once more. That is safe for every inbox script: storing and pruning are
    /// idempotent and reading changes nothing a second run depends on. An ack pipeline
    /// answered NOSCRIPT was not applied either, unless the script cache was flushed between
    /// two of its commands: then the acks before the flush are applied and their receipts
    /// (which the rerun no longer finds) are lost.
    async fn run_scripts<T: ::redis::FromRedisValue>(
        &self,
        pipe: &::redis::Pipeline,
        scripts: &[&Script],
    ) -> StoreResult<T> {
        let mut c = self.conn();
        match pipe.query_async(&mut c).await {
            Err(e) if e.kind() == ::redis::ErrorKind::NoScriptError => {
                let mut load = ::redis::pipe();
                for script in scripts {
                    load.load_script(script).ignore();
                }
                let () = load.query_async(&mut c).await.map_err(unavailable)?;
                pipe.query_async(&mut c).await.map_err(unavailable)
            }
            result => result.map_err(unavailable),
        }
    }

    /// The `MGET` of the route keys of `user_ids` (rather than GET: one round trip whatever the
    /// count, and a one-key MGET answers an array too).
    fn routes_lookup(&self, user_ids: &[u64]) -> ::redis::Cmd {
        let mut cmd = ::redis::cmd("MGET");
        for &id in user_ids {
            cmd.arg(self.keys.route(id));
        }
        cmd
    }

    /// The routes in the answer of [`routes_lookup`](Self::routes_lookup).
    fn routes_of(user_ids: &[u64], values: Vec<Option<String>>) -> Vec<Option<RouteEntry>> {
        user_ids
            .iter()
            .zip(values)
            .map(|(&id, v)| v.and_then(|v| Self::parse_route(id, &v)))
            .collect()
    }

    /// The pipeline of one `INBOX_STORE` call per receiver, their messages in slice order.
    fn inbox_store_plan(&self, messages: &mut [Message]) -> StorePlan {
        let max_messages = self.limits.max_messages;
        let max_age_ms = self.max_age_ms();
        let mut by_receiver: Vec<(u64, Vec<usize>)> = Vec::new();
        let mut index: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
        for (pos, m) in messages.iter().enumerate() {
            let slot = *index.entry(m.receiver_id).or_insert_with(|| {
                by_receiver.push((m.receiver_id, Vec::new()));
                by_receiver.len() - 1
            });
            by_receiver[slot].1.push(pos);
        }
        let mut pipe = ::redis::pipe();
        let mut order = Vec::with_capacity(messages.len());
        for (user, positions) in &by_receiver {
            let user = *user;
            let mut invocation = INBOX_STORE.prepare_invoke();
            invocation
                .key(self.keys.inbox(user))
                .key(self.keys.inbox_order(user))
                .key(self.keys.inbox_receipts(user))
                .key(self.keys.inbox_seq(user))
                .arg(max_messages)
                .arg(max_age_ms);
            for &pos in positions {
                let m = &mut messages[pos];
                // Stored without its seq: the order set holds it, and a read puts it back.
                let seq = std::mem::take(&mut m.seq);
                let bytes = m.encode_to_vec();
                m.seq = seq;
                let receipt_sender = if m.receipt { m.sender_id } else { 0 };
                invocation.arg(&m.id).arg(bytes).arg(receipt_sender);
                order.push(pos);
            }
            pipe.invoke_script(&invocation);
        }
        StorePlan {
            pipe,
            receivers: by_receiver.into_iter().map(|(_, p)| p.len()).collect(),
            order,
        }
    }

    fn parse_route(user_id: u64, value: &str) -> Option<RouteEntry> {
        let (server, session) = keys::parse_route_value(value)?;
        Some(RouteEntry {
            user_id,
            server_id: server.to_string(),
            session: session.to_string(),
        })
    }
}

#[async_trait]
impl StateStore for RedisStore {
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

    async fn claim_login(
        &self,
        user_id: u64,
        session: &str,
        pending_ttl: Duration,
        is_live: IsLive<'_>,
    ) -> StoreResult<ClaimOutcome> {
        let mut c = self.conn();
        let key = self.keys.login(user_id);
        let ttl_ms = pending_ttl.as_millis().max(1) as u64;
        // SET NX, then GET on failure; when the holder expires in between, one more SET NX.
        let mut current: Option<String> = None;
        for _ in 0..2 {
            let set: Option<String> = ::redis::cmd("SET")
                .arg(&key)
                .arg(session)
                .arg("NX")
                .arg("PX")
                .arg(ttl_ms)
                .query_async(&mut c)
                .await
                .map_err(unavailable)?;
            if set.is_some() {
                return Ok(ClaimOutcome::Claimed);
            }
            current = c.get(&key).await.map_err(unavailable)?;
            if current.is_some() {
                break;
            }
        }
        let Some(current) = current else {
            return Ok(ClaimOutcome::Contended);
        };
        match keys::parse_slot(&current) {
            (held, Some(server)) if is_live(server) => Ok(ClaimOutcome::Held {
                session: held.to_string(),
                server: server.to_string(),
            }),
            _ => {
                // Pending (a login nobody connected with) or held by a session on a dead
                // server: take it over, unless it changed meanwhile (e.g. attached).
                let took: i32 = SET_IF_EQ
                    .key(&key)
                    .arg(&current)
                    .arg(session)
                    .arg(ttl_ms)
                    .invoke_async(&mut c)
                    .await
                    .map_err(unavailable)?;
                if took == 1 {
                    Ok(ClaimOutcome::Claimed)
                } else {
                    Ok(ClaimOutcome::Contended)
                }
            }
        }
    }

    async fn take_over_login(
        &self,
        user_id: u64,
        held_session: &str,
        session: &str,
        pending_ttl: Duration,
    ) -> StoreResult<bool> {
        let took: i32 = TAKE_OVER
            .key(self.keys.login(user_id))
            .arg(held_session)
            .arg(session)
            .arg(pending_ttl.as_millis().max(1) as u64)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(took == 1)
    }

    async fn next_generation(&self, user_id: u64, keep: Duration) -> StoreResult<u64> {
        NEXT_GENERATION
            .key(self.keys.generation(user_id))
            .arg(keep.as_millis().max(1) as u64)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)
    }

    async fn generation(&self, user_id: u64) -> StoreResult<u64> {
        let g: Option<u64> = self
            .conn()
            .get(self.keys.generation(user_id))
            .await
            .map_err(unavailable)?;
        Ok(g.unwrap_or(0))
    }

    async fn session_active(&self, user_id: u64, session: &str) -> StoreResult<bool> {
        let v: Option<String> = self
            .conn()
            .get(self.keys.login(user_id))
            .await
            .map_err(unavailable)?;
        Ok(v.is_some_and(|v| keys::slot_held_by(&v, session)))
    }

    async fn release_login(&self, user_id: u64, session: &str) -> StoreResult<Option<String>> {
        let old: Option<String> = RELEASE
            .key(self.keys.login(user_id))
            .arg(session)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(old.and_then(|v| keys::parse_slot(&v).1.map(str::to_string)))
    }

    async fn attach(
        &self,
        user_id: u64,
        name: &str,
        session: &str,
        server_id: &str,
    ) -> StoreResult<AttachOutcome> {
        let mut c = self.conn();
        let ok: i32 = ATTACH
            .key(self.keys.login(user_id))
            .key(self.keys.route(user_id))
            .arg(session)
            .arg(keys::attached_slot(session, server_id))
            .arg(keys::route_value(server_id, session))
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        if ok != 1 {
            return Ok(AttachOutcome::SessionInvalid);
        }
        let online = presence_event(PresenceKind::Online, user_id, name, server_id, "");
        let mut pipe = ::redis::pipe();
        self.index(&mut pipe, Some(name), &online);
        let () = pipe.query_async(&mut c).await.map_err(unavailable)?;
        Ok(AttachOutcome::Attached)
    }

    async fn detach(
        &self,
        user_id: u64,
        name: &str,
        session: &str,
        server_id: &str,
        reason: &str,
    ) -> StoreResult<()> {
        let mut c = self.conn();
        let removed: i32 = DETACH
            .key(self.keys.login(user_id))
            .key(self.keys.route(user_id))
            .arg(keys::attached_slot(session, server_id))
            .arg(keys::route_value(server_id, session))
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        if removed == 1 {
            let offline = presence_event(PresenceKind::Offline, user_id, name, server_id, reason);
            self.unindex(user_id, Some(name), &offline).await?;
        }
        Ok(())
    }

    async fn routes(&self, user_ids: &[u64]) -> StoreResult<Vec<Option<RouteEntry>>> {
        if user_ids.is_empty() {
            return Ok(Vec::new());
        }
        let values: Vec<Option<String>> = self
            .routes_lookup(user_ids)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(Self::routes_of(user_ids, values))
    }

    async fn scan_routes(&self, cursor: u64, count: usize) -> StoreResult<(u64, Vec<RouteEntry>)> {
        let mut c = self.conn();
        let (next, keys): (u64, Vec<String>) = ::redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(self.keys.route_pattern())
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        let ids: Vec<u64> = keys
            .iter()
            .filter_map(|k| self.keys.parse_route_key(k))
            .collect();
        let routes = self.routes(&ids).await?;
        Ok((next, routes.into_iter().flatten().collect()))
    }

    async fn online_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<OnlineEntry>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Members sort by bytes; 0xff never occurs in UTF-8, so `prefix + 0xff` bounds every
        // name that starts with `prefix`.
        let min: Vec<u8> = match after {
            Some(a) if a.as_bytes() >= prefix.as_bytes() => [b"(", a.as_bytes()].concat(),
            _ if prefix.is_empty() => b"-".to_vec(),
            _ => [b"[", prefix.as_bytes()].concat(),
        };
        let max: Vec<u8> = if prefix.is_empty() {
            b"+".to_vec()
        } else {
            [b"(", prefix.as_bytes(), &[0xff]].concat()
        };
        let members: Vec<String> = ::redis::cmd("ZRANGEBYLEX")
            .arg(self.keys.online())
            .arg(min)
            .arg(max)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(members
            .iter()
            .filter_map(|m| OnlineEntry::from_member(m))
            .collect())
    }

    async fn remove_stale_route(&self, entry: &RouteEntry) -> StoreResult<()> {
        // The name (for the name index and the event) comes with the compare-and-delete.
        let mut pipe = ::redis::pipe();
        pipe.invoke_script(
            DEL_IF_EQ
                .key(self.keys.route(entry.user_id))
                .arg(keys::route_value(&entry.server_id, &entry.session)),
        )
        .hget(self.keys.user(entry.user_id), "name");
        let (removed, name): (i32, Option<String>) = self.run_scripts(&pipe, &[&DEL_IF_EQ]).await?;
        if removed == 1 {
            // Without an account record (never in practice) the name index entry cannot be
            // found; the id set and the event do not need the name.
            let offline = presence_event(
                PresenceKind::Offline,
                entry.user_id,
                name.as_deref().unwrap_or_default(),
                &entry.server_id,
                reason::SERVER_LOST,
            );
            self.unindex(entry.user_id, name.as_deref(), &offline)
                .await?;
        }
        Ok(())
    }

    async fn inbox_store(&self, messages: &mut [Message]) -> StoreResult<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let plan = self.inbox_store_plan(messages);
        let per_receiver: Vec<Value> = self.run_scripts(&plan.pipe, &[&INBOX_STORE]).await?;
        plan.apply(messages, per_receiver)
    }

    async fn inbox_store_then_routes(
        &self,
        messages: &mut [Message],
        user_ids: &[u64],
    ) -> (StoreResult<()>, StoreResult<Vec<Option<RouteEntry>>>) {
        if messages.is_empty() || user_ids.is_empty() {
            return super::store_then_routes_in_turn(self, messages, user_ids).await;
        }
        // One pipeline, the lookup last: sent again whole after a NOSCRIPT, so the lookup
        // always follows the store.
        let mut plan = self.inbox_store_plan(messages);
        plan.pipe.add_command(self.routes_lookup(user_ids));
        let mut replies: Vec<Value> = match self.run_scripts(&plan.pipe, &[&INBOX_STORE]).await {
            Ok(replies) => replies,
            Err(e) => return (Err(e.clone()), Err(e)),
        };
        let routes = match replies.pop() {
            Some(value) => ::redis::from_owned_redis_value::<Vec<Option<String>>>(value)
                .map(|values| Self::routes_of(user_ids, values))
                .map_err(|e| StoreError::Corrupt(format!("route lookup reply: {e}"))),
            None => Err(StoreError::Corrupt("route lookup: no reply".into())),
        };
        (plan.apply(messages, replies), routes)
    }

    async fn inbox_read(
        &self,
        user_id: u64,
        after_seq: u64,
        limit: usize,
    ) -> StoreResult<Vec<Message>> {
        let limit = limit.min(MAX_INBOX_READ);
        let oldest_ms = oldest_kept_ms(&self.limits, crate::time::now_ms());
        let mut out: Vec<Message> = Vec::new();
        // (id, seq) of entries found expired or undecodable, removed with the next call.
        let mut prune: Vec<(String, u64)> = Vec::new();
        let mut after = after_seq;
        // Skipped entries leave a page short; read on after them so that a short page still
        // means "nothing more". Each pass removes what the previous one skipped, so expired
        // messages are read past (and deleted) once.
        while out.len() < limit {
            let want = limit - out.len();
            let mut pipe = ::redis::pipe();
            if !prune.is_empty() {
                pipe.invoke_script(&self.prune_invocation(user_id, &prune))
                    .ignore();
                prune.clear();
            }
            pipe.invoke_script(
                INBOX_READ
                    .key(self.keys.inbox(user_id))
                    .key(self.keys.inbox_order(user_id))
                    .key(self.keys.inbox_receipts(user_id))
                    .arg(after)
                    .arg(want),
            );
            let (entries,): (Vec<(String, u64, Option<Vec<u8>>)>,) = self
                .run_scripts(&pipe, &[&INBOX_PRUNE, &INBOX_READ])
                .await?;
            let scanned = entries.len();
            for (id, seq, value) in entries {
                after = after.max(seq);
                // A missing value was already dropped by the script (an inbox half-expired).
                let Some(value) = value else { continue };
                match Message::decode(value.as_slice()) {
                    Ok(mut m) if m.timestamp_ms >= oldest_ms => {
                        m.seq = seq;
                        out.push(m);
                    }
                    Ok(_) => prune.push((id, seq)),
                    Err(e) => {
                        tracing::warn!(user_id, message_id = %id, seq, error = %e,
                            "inbox: dropping a stored message that does not decode");
                        prune.push((id, seq));
                    }
                }
            }
            if scanned < want {
                break;
            }
        }
        if !prune.is_empty() {
            // Best effort: what is left is skipped (and removed) by the next read.
            let result: StoreResult<()> = self
                .run_scripts(
                    ::redis::pipe()
                        .invoke_script(&self.prune_invocation(user_id, &prune))
                        .ignore(),
                    &[&INBOX_PRUNE],
                )
                .await;
            if let Err(e) = result {
                tracing::debug!(user_id, error = %e, "inbox: removing expired messages failed");
            }
        }
        Ok(out)
    }

    async fn inbox_ack(&self, acks: &[(u64, Vec<String>)]) -> StoreResult<Vec<AckedReceipt>> {
        // One MULTI/EXEC per user (its keys share a hash tag), all in one pipeline: which of
        // the messages are there, remove them, read their receipt requests (which stay until
        // `receipts_done`). Atomic per user, so of two concurrent acks of a message only one
        // finds it there, and only that one returns its receipt. (A Lua script did this
        // first: its fixed cost, ~8 µs per call in Redis, was most of an ack.)
        let mut pipe = ::redis::pipe();
        let mut acked = Vec::new();
        for (user, ids) in acks {
            let ids: Vec<&String> = ack_ids(ids).collect();
            if ids.is_empty() {
                continue;
            }
            let receipts = self.keys.inbox_receipts(*user);
            // Inside MULTI every reply is QUEUED; EXEC answers them all, in this order
            // (what `ack_receipt_senders` reads).
            pipe.cmd("MULTI").ignore();
            let order = self.keys.inbox_order(*user);
            for (command, key) in [
                ("ZMSCORE", &order),
                ("ZREM", &order),
                ("HDEL", &self.keys.inbox(*user)),
                ("HMGET", &receipts),
            ] {
                pipe.cmd(command).arg(key).arg(&ids).ignore();
            }
            pipe.cmd("EXEC");
            acked.push((*user, ids));
        }
        if acked.is_empty() {
            return Ok(Vec::new());
        }
        let replies: Vec<Value> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        let mut out = Vec::new();
        for ((receiver_id, ids), reply) in acked.into_iter().zip(replies) {
            let senders = ack_receipt_senders(reply, ids.len())?;
            let mut seen = HashSet::new();
            for (id, sender) in ids.into_iter().zip(senders) {
                // An id acked twice in one call finds the same request twice: one receipt.
                if let Some(sender_id) = sender {
                    if seen.insert(id) {
                        out.push(AckedReceipt {
                            message_id: id.clone(),
                            sender_id,
                            receiver_id,
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    async fn receipts_done(&self, done: &[(u64, Vec<String>)]) -> StoreResult<()> {
        let mut pipe = ::redis::pipe();
        for (user, ids) in done {
            let ids: Vec<&String> = ack_ids(ids).collect();
            if !ids.is_empty() {
                pipe.cmd("HDEL")
                    .arg(self.keys.inbox_receipts(*user))
                    .arg(&ids)
                    .ignore();
            }
        }
        pipe.query_async::<()>(&mut self.conn())
            .await
            .map_err(unavailable)
    }

    async fn pending_receipts(&self, user_id: u64, limit: usize) -> StoreResult<Vec<AckedReceipt>> {
        let mut c = self.conn();
        // One page of the requests (HSCAN's COUNT is a hint), then which of their messages
        // are still in the inbox: those are not acked yet.
        let (_, fields): (u64, Vec<(String, u64)>) = ::redis::cmd("HSCAN")
            .arg(self.keys.inbox_receipts(user_id))
            .arg(0)
            .arg("COUNT")
            .arg(limit.max(1))
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        if fields.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&String> = fields.iter().map(|(id, _)| id).collect();
        let scores: Vec<Option<f64>> = ::redis::cmd("ZMSCORE")
            .arg(self.keys.inbox_order(user_id))
            .arg(&ids)
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(fields
            .into_iter()
            .zip(scores)
            .filter(|(_, score)| score.is_none())
            .take(limit)
            .map(|((message_id, sender_id), _)| AckedReceipt {
                message_id,
                sender_id,
                receiver_id: user_id,
            })
            .collect())
    }

    async fn events_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<StoredEvent>> {
        let mut after = after.map(parse_event_id).transpose()?;
        let limit = limit.min(MAX_EVENTS_READ);
        let mut out = Vec::new();
        // One XRANGE, unless it met malformed entries: then read on past them, so that a
        // short page still means "nothing more" and paging never stalls on one.
        while out.len() < limit {
            let want = limit - out.len();
            let start = match after {
                None => "-".to_string(),
                // `(` past the last possible id is an error in Redis; nothing comes after it.
                Some(LAST_EVENT_ID) => break,
                Some(id) => format!("({id}"),
            };
            let reply: Value = ::redis::cmd("XRANGE")
                .arg(self.keys.events())
                .arg(start)
                .arg("+")
                .arg("COUNT")
                .arg(want)
                .query_async(&mut self.conn())
                .await
                .map_err(unavailable)?;
            let page = stream_page(&reply);
            out.extend(page.events);
            match page.last_id {
                Some(last) if page.entries == want => after = Some(last),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn events_wait(
        &self,
        after: &str,
        limit: usize,
        timeout: Duration,
    ) -> StoreResult<Vec<StoredEvent>> {
        let mut after = parse_event_id(after)?;
        let limit = limit.min(MAX_EVENTS_READ);
        let started = tokio::time::Instant::now();
        // One blocking read at a time on the connection: a caller that waited its whole
        // timeout for its turn just looks (what came meanwhile is there to read).
        let Ok(mut waiter) = tokio::time::timeout(timeout, self.waiter.lock()).await else {
            return self.events_after(Some(&after.to_string()), limit).await;
        };
        loop {
            // BLOCK 0 would wait forever: with no time left, a plain read.
            let left = timeout.saturating_sub(started.elapsed());
            let block_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
            if limit == 0 || block_ms == 0 {
                drop(waiter);
                return self.events_after(Some(&after.to_string()), limit).await;
            }
            let mut conn = match waiter.take() {
                Some(conn) => conn,
                None => {
                    let config = AsyncConnectionConfig::new().set_connection_timeout(self.timeout);
                    tokio::time::timeout(
                        self.timeout,
                        self.client
                            .get_multiplexed_async_connection_with_config(&config),
                    )
                    .await
                    .map_err(|_| StoreError::Unavailable("connecting timed out".into()))?
                    .map_err(unavailable)?
                }
            };
            let read = ::redis::cmd("XREAD")
                .arg("COUNT")
                .arg(limit)
                .arg("BLOCK")
                .arg(block_ms)
                .arg("STREAMS")
                .arg(self.keys.events())
                .arg(after.to_string())
                .to_owned();
            // The deadline of the call on top of the wait; the connection has none of its
            // own, as each read waits for as long as its caller asks.
            let deadline = left.saturating_add(self.timeout);
            let reply: Value = tokio::time::timeout(deadline, read.query_async(&mut conn))
                .await
                .map_err(|_| StoreError::Unavailable("blocking read timed out".into()))?
                .map_err(unavailable)?;
            *waiter = Some(conn);
            let page = xread_page(&reply);
            match page.last_id {
                // Only malformed entries: wait on past them for the time that is left.
                Some(last) if page.events.is_empty() => after = last,
                _ => return Ok(page.events),
            }
        }
    }

    async fn events_last_id(&self) -> StoreResult<String> {
        let reply: Value = ::redis::cmd("XREVRANGE")
            .arg(self.keys.events())
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        let last = match &reply {
            Value::Array(entries) => entries.first().and_then(entry_id),
            _ => None,
        };
        Ok(last.unwrap_or(EventId::ZERO).to_string())
    }

    /// `SET key ts NX GET PX ttl` per id, pipelined: the first `SET` of an id answers nil
    /// (claimed), every later one the first timestamp and writes nothing (Redis 7.0 allows
    /// `NX` with `GET`). One key per id, so Redis Cluster may put them in any slot.
    async fn claim_broadcasts(
        &self,
        claims: &[(String, i64)],
        ttl: Duration,
    ) -> StoreResult<Vec<Option<i64>>> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut pipe = ::redis::pipe();
        for (id, timestamp_ms) in claims {
            pipe.cmd("SET")
                .arg(self.keys.sent(id))
                .arg(timestamp_ms)
                .arg("NX")
                .arg("GET")
                .arg("PX")
                .arg(ttl_ms);
        }
        let previous: Vec<Option<String>> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        previous
            .into_iter()
            .map(|p| match p {
                None => Ok(None),
                Some(v) => v.parse().map(Some).map_err(|_| {
                    StoreError::Corrupt(format!("broadcast claim holds {v:?}, not a timestamp"))
                }),
            })
            .collect()
    }

    async fn release_broadcasts(&self, ids: &[String]) -> StoreResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        // One DEL per key (in one pipeline): a multi-key DEL would cross Cluster slots.
        let mut pipe = ::redis::pipe();
        for id in ids {
            pipe.del(self.keys.sent(id)).ignore();
        }
        pipe.query_async(&mut self.conn())
            .await
            .map_err(unavailable)
    }

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

    async fn inbox_top(&self, user_id: u64) -> StoreResult<u64> {
        let top: Option<u64> = self
            .conn()
            .get(self.keys.inbox_seq(user_id))
            .await
            .map_err(unavailable)?;
        Ok(top.unwrap_or(0))
    }

    async fn inbox_len(&self, user_id: u64) -> StoreResult<usize> {
        self.conn()
            .zcard(self.keys.inbox_order(user_id))
            .await
            .map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_older_than_7_is_refused_at_connect() {
        let info = |v: &str| format!("# Server\r\nredis_version:{v}\r\nredis_mode:standalone\r\n");
        assert!(check_version(&info("7.0.15")).is_ok());
        assert!(check_version(&info("7.2.4")).is_ok());
        assert!(check_version(&info("10.0.0")).is_ok());
        let err = check_version(&info("6.2.14")).unwrap_err();
        assert!(matches!(err, StoreError::Unsupported(_)), "{err}");
        assert!(err.to_string().contains("7.0 or newer"), "{err}");
        assert!(check_version(&info("5.0")).is_err());
        // Nothing to judge by: allowed.
        assert!(check_version("# Server\r\nredis_mode:standalone\r\n").is_ok());
        assert!(check_version(&info("unstable")).is_ok());
    }

    #[test]
    fn ack_replies_give_the_senders_waiting_for_receipts() {
        let score = || Value::BulkString(b"3".to_vec());
        let exec = Value::Array(vec![
            Value::Array(vec![score(), score(), Value::Nil]),
            Value::Int(2),
            Value::Int(2),
            Value::Array(vec![
                Value::Nil,
                Value::BulkString(b"17".to_vec()),
                Value::BulkString(b"18".to_vec()),
            ]),
        ]);
        // The third was not there when acked (acked before): no receipt from this ack.
        assert_eq!(
            ack_receipt_senders(exec, 3).unwrap(),
            [None, Some(17), None]
        );
    }

    #[test]
    fn malformed_ack_replies_are_corrupt_not_panics() {
        let senders = |v: Vec<Value>| {
            let scores = v.iter().map(|_| Value::BulkString(b"1".to_vec())).collect();
            Value::Array(vec![
                Value::Array(scores),
                Value::Int(1),
                Value::Int(1),
                Value::Array(v),
            ])
        };
        let bad = [
            Value::Nil,
            Value::Int(1),
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![
                Value::Array(vec![Value::Nil]),
                Value::Int(1),
                Value::Int(1),
                Value::Nil,
            ]),
            Value::Array(vec![
                Value::Nil,
                Value::Int(1),
                Value::Int(1),
                Value::Array(vec![Value::Nil]),
            ]),
            senders(vec![]),
            senders(vec![Value::BulkString(b"bob".to_vec())]),
            senders(vec![Value::BulkString(b"-1".to_vec())]),
            senders(vec![Value::Int(3)]),
        ];
        for reply in bad {
            assert!(
                matches!(
                    ack_receipt_senders(reply.clone(), 1),
                    Err(StoreError::Corrupt(_))
                ),
                "{reply:?}"
            );
        }
    }

    #[test]
    fn stored_answers_of_new_messages_follow_the_first_seq() {
        let answers = stored_answers(Value::Int(41), 3).unwrap();
        assert_eq!(answers, [(41, None), (42, None), (43, None)]);
    }

    #[test]
    fn stored_answers_carry_the_copies_of_retries() {
        let reply = Value::Array(vec![
            Value::Int(1),
            Value::Int(5),
            Value::Int(1),
            Value::Int(3),
            Value::BulkString(b"copy".to_vec()),
            Value::Int(1),
            Value::Nil,
        ]);
        let answers = stored_answers(reply, 3).unwrap();
        assert_eq!(answers, [(1, None), (5, None), (1, Some(b"copy".to_vec()))]);
    }

    #[test]
    fn malformed_store_replies_are_corrupt_not_panics() {
        // Each answers a call of one message.
        let bad = [
            Value::Int(-1),
            Value::Nil,
            Value::Array(vec![]),
            Value::Array(vec![Value::Int(1), Value::Int(2), Value::Int(9)]),
            Value::Array(vec![Value::Int(1), Value::Int(0), Value::Nil]),
            Value::Array(vec![Value::Int(1), Value::Int(7), Value::Nil]),
            Value::Array(vec![Value::Int(1), Value::Int(-3), Value::Nil]),
            Value::Array(vec![Value::Int(1), Value::Int(1)]),
            Value::Array(vec![Value::SimpleString("x".into())]),
        ];
        for reply in bad {
            assert!(
                matches!(
                    stored_answers(reply.clone(), 1),
                    Err(StoreError::Corrupt(_))
                ),
                "{reply:?}"
            );
        }
    }
}
