//! [`StateStore`] in memory: the shared state of standalone mode (one process, no Redis) and
//! of unit tests.
//!
//! The role traits are implemented one file each, as in `../redis/`; this file holds the
//! state they share under the lock.
//!
//! The semantics are those of [`super::RedisStore`] and its Lua scripts, call for call, so the
//! same behavioural test suite runs against both (`tests/tests/backends/`): the same ids,
//! the same outcomes, the same page order. Where Redis needs two round trips (attach, then
//! index the user as online), this store does both under one lock, which is the outcome the
//! Redis version converges to.
//!
//! One `std::sync::Mutex` guards everything. It is never held across an `.await` (no method
//! awaits anything), and callbacks from the caller (`is_live`) run outside it, as they run
//! between round trips in the Redis version.
//!
//! Expiry of pending login slots is checked lazily against [`tokio::time::Instant`] (so tests
//! with a paused clock see it): an expired slot is dropped whenever it is touched, all expired
//! slots are purged at the start of every route scan, and claims purge them once the slot map
//! has doubled since the last purge. Nothing else grows except with users and their sessions,
//! and with inboxes.
//!
//! Inboxes follow the Redis store's scripts: per user a seq counter (never reset), the
//! messages by seq, an id index and the receipt senders, trimmed to `max_messages` on every
//! store. Their ages are checked against the wall clock ([`crate::time::now_ms`], as
//! `timestamp_ms` is), and an inbox that got nothing new for `max_age` is emptied when next
//! touched (the Redis keys' expiry). One difference, to spare memory: a store also drops the
//! expired messages at the front of the inbox, which Redis leaves for the next read to skip
//! and delete; so `inbox_len` may be lower here before that read.
//!
//! Presence events are a bounded queue with Redis-like ids (`{ms}-{n}`, wall clock, strictly
//! increasing), trimmed exactly to `events_max_len` (Redis keeps up to a stream node more);
//! `events_wait` sleeps on a [`Notify`] that every append wakes, under a tokio-clock
//! deadline. The Redis online-id set needs no copy here: it is the set of users with a route.
//! Leases expire on the tokio clock, like pending slots, and so do broadcast claims: a map
//! of the live ones plus a queue in claim order that every claim prunes from the front, so
//! claims take memory only for their time to live. Channels are a member set per
//! channel (a channel without members is removed, so the channel list is the map's keys) and
//! a channel set per user, updated together under the lock: the repairs and races the Redis
//! store documents cannot happen here.
//!
//! Stored groups and conversation logs (`chat.rs`) follow the same one-lock rule: a group
//! change and its event in the log are one step, so membership and log never disagree. Logs
//! are bounded by the [`HistoryLimits`] (`with_history_limits`), by count on every append and
//! by age (wall clock, as for inboxes) on appends and reads; a private log, its seq counter
//! and a disbanded group's entry stay once created (the memory of a counter and an empty
//! deque), where the Redis keys would expire. Read marks and group positions of a user are
//! dropped with their membership.

mod accounts;
mod broadcasts;
mod channels;
mod chat;
mod events;
mod inbox;
mod leases;
mod login;
mod routes;
mod sessions;
#[cfg(test)]
mod tests;

use super::{
    redis::{ack_ids, oldest_kept_ms, parse_event_id, presence_event, MAX_INBOX_READ},
    *,
};
use crate::{
    events::{reason, EventId, PresenceEvent, PresenceKind},
    keys,
};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    ops::Bound,
    sync::{Mutex, MutexGuard, PoisonError},
};
use tokio::{sync::Notify, time::Instant};

/// Slot-map size below which claims never bother to purge expired slots.
const MIN_PURGE_AT: usize = 64;

/// A login slot: the value the Redis store keeps under `login:{id}` and its expiry.
#[derive(Debug, Clone)]
struct Slot {
    /// `{session}` (pending) or `{session}@{server}` (attached).
    value: String,
    /// `None`: no expiry (attached).
    expires: Option<Instant>,
}

impl Slot {
    fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|at| at <= now)
    }
}

struct User {
    name: String,
    password_hash: String,
}

#[derive(Default)]
struct State {
    /// Last id handed out (the Redis `user:next_id` counter).
    last_user_id: u64,
    names: HashMap<String, u64>,
    users: HashMap<u64, User>,
    slots: HashMap<u64, Slot>,
    /// user → (server, session). Ordered: scans walk it by user id.
    routes: BTreeMap<u64, (String, String)>,
    /// Members `{name}\x1f{id}`. `String` orders by bytes, as a Redis sorted set of equal
    /// scores orders by memcmp, so ranges below match `ZRANGEBYLEX`.
    online: BTreeSet<String>,
    /// Slot count at which the next claim purges expired slots.
    purge_at: usize,
    /// Per-user inboxes. An entry stays once created (its seq counter never resets, as the
    /// Redis seq key never expires); its messages are bounded by the inbox limits.
    inboxes: HashMap<u64, inbox::UserInbox>,
    /// Presence events, oldest first, ids increasing; at most `events_max_len`.
    events: VecDeque<(EventId, StoredEvent)>,
    /// (message id, receiver) of the message events published within
    /// [`MESSAGE_EVENT_DEDUP`], and when, oldest first.
    notified: std::collections::HashSet<(String, u64)>,
    notified_order: VecDeque<(tokio::time::Instant, (String, u64))>,
    /// Id of the last event appended (ids stay increasing when the stream is trimmed).
    last_event: EventId,
    /// Lease name → (owner, expiry).
    leases: HashMap<String, (String, Instant)>,
    cursors: HashMap<String, String>,
    /// Broadcast id → (first `timestamp_ms`, expiry): the `sent:{id}` keys.
    broadcasts: HashMap<String, (i64, Instant)>,
    /// (expiry, id) in claim order, for pruning: an entry whose id was released or claimed
    /// again later is skipped (the map's expiry differs, or there is none).
    broadcast_expiries: VecDeque<(Instant, String)>,
    /// Channel → member ids. A channel without members is removed (it is gone).
    channels: BTreeMap<String, BTreeSet<u64>>,
    /// User → the channels they are a member of (no entry: none).
    user_channels: HashMap<u64, BTreeSet<String>>,
    /// Last group id handed out (ids start at 1, never reused).
    last_group_id: u64,
    /// Group id → group (disbanded ones stay, without members).
    groups: HashMap<u64, chat::Group>,
    /// User → the groups they are a member of (no entry: none).
    user_groups: HashMap<u64, BTreeSet<u64>>,
    /// Ordered pair of users → their private log.
    private_logs: HashMap<(u64, u64), chat::Log>,
    /// User → the peers they have a private log with.
    user_peers: HashMap<u64, BTreeSet<u64>>,
    /// (user, conversation) → read mark (no entry: 0).
    read_marks: HashMap<(u64, ConvKey), u64>,
    /// (user, group) → the last seq the user's client acked (no entry: none yet).
    positions: HashMap<(u64, u64), u64>,
    /// User → (login generation, until when kept).
    generations: HashMap<u64, (u64, Instant)>,
    /// Entry count at which the next generation drops the expired ones.
    generations_purge_at: usize,
}

/// In-memory shared state for one process. Share it with `Arc` between the route and the
/// server of a standalone process: it is their common Redis.
pub struct MemoryStore {
    state: Mutex<State>,
    limits: InboxLimits,
    history: HistoryLimits,
    events_max_len: usize,
    /// Wakes `events_wait` callers when an event is appended.
    events_changed: Notify,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            limits: InboxLimits::default(),
            history: HistoryLimits::default(),
            events_max_len: DEFAULT_EVENTS_MAX_LEN,
            events_changed: Notify::new(),
        }
    }
}

/// Sizes only: the state holds password hashes, which have no business in a log.
impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryStore")
            .field("users", &state.users.len())
            .field("slots", &state.slots.len())
            .field("routes", &state.routes.len())
            .field("online", &state.online.len())
            .field("inboxes", &state.inboxes.len())
            .field("events", &state.events.len())
            .field("channels", &state.channels.len())
            .field("groups", &state.groups.len())
            .field("private_logs", &state.private_logs.len())
            .field("broadcast_claims", &state.broadcasts.len())
            .field("limits", &self.limits)
            .field("history", &self.history)
            .field("events_max_len", &self.events_max_len)
            .finish()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the bounds of every inbox (default: [`InboxLimits::default`]).
    #[must_use]
    pub fn with_inbox_limits(mut self, limits: InboxLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets how much history every conversation keeps (default: [`HistoryLimits::default`]).
    #[must_use]
    pub fn with_history_limits(mut self, limits: HistoryLimits) -> Self {
        self.history = limits;
        self
    }

    /// Sets how many presence events are kept (default: [`DEFAULT_EVENTS_MAX_LEN`]; at least
    /// 1). Exactly that many, where Redis keeps up to a stream node more.
    #[must_use]
    pub fn with_events_max_len(mut self, max_len: usize) -> Self {
        self.events_max_len = max_len.max(1);
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update below is complete before anything can panic, so a poisoned lock still
        // guards consistent data: carry on rather than take the whole process down.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Inspection (tests, diagnostics): the raw value of a user's login slot in the Redis
    /// layout (`{session}` pending, `{session}@{server}` attached) and its remaining time to
    /// live (`None`: no expiry). `None` when there is no live slot.
    pub fn login_slot(&self, user_id: u64) -> Option<(String, Option<Duration>)> {
        let now = Instant::now();
        let mut state = self.lock();
        let slot = state.slot(user_id, now)?;
        Some((
            slot.value.clone(),
            slot.expires.map(|at| at.saturating_duration_since(now)),
        ))
    }

    /// Inspection (tests, diagnostics): the online index in order, as `{name}\x1f{id}`.
    pub fn online_members(&self) -> Vec<String> {
        self.lock().online.iter().cloned().collect()
    }

    /// Inspection (tests, diagnostics): login slots held in memory, expired ones included
    /// until they are purged.
    pub fn slots_in_memory(&self) -> usize {
        self.lock().slots.len()
    }
}
