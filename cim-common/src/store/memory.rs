//! [`StateStore`] in memory: the shared state of standalone mode (one process, no Redis) and
//! of unit tests.
//!
//! The semantics are those of [`super::RedisStore`] and its Lua scripts, call for call, so the
//! same behavioural test suite runs against both (`tests/tests/backends.rs`): the same ids,
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
    inboxes: HashMap<u64, Inbox>,
    /// Presence events, oldest first, ids increasing; at most `events_max_len`.
    events: VecDeque<(EventId, StoredEvent)>,
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
    /// User → (login generation, until when kept).
    generations: HashMap<u64, (u64, Instant)>,
    /// Entry count at which the next generation drops the expired ones.
    generations_purge_at: usize,
}

impl State {
    /// Drops the broadcast claims that expired by `now`, oldest first. Claims share one time
    /// to live in practice, so the queue is in expiry order and this stops at the first live
    /// one; a shorter one claimed later only waits for its turn.
    fn prune_broadcasts(&mut self, now: Instant) {
        while let Some((until, _)) = self.broadcast_expiries.front() {
            if *until > now {
                break;
            }
            if let Some((until, id)) = self.broadcast_expiries.pop_front() {
                if self.broadcasts.get(&id).is_some_and(|&(_, u)| u == until) {
                    self.broadcasts.remove(&id);
                }
            }
        }
    }

    /// The live slot of `user_id`, dropping it if it expired (a Redis key vanishes the same).
    fn slot(&mut self, user_id: u64, now: Instant) -> Option<&Slot> {
        if self.slots.get(&user_id).is_some_and(|s| s.expired(now)) {
            self.slots.remove(&user_id);
        }
        self.slots.get(&user_id)
    }

    fn slot_value(&mut self, user_id: u64, now: Instant) -> Option<String> {
        self.slot(user_id, now).map(|s| s.value.clone())
    }

    fn purge_expired(&mut self, now: Instant) {
        self.slots.retain(|_, slot| !slot.expired(now));
        self.purge_at = (self.slots.len() * 2).max(MIN_PURGE_AT);
    }

    fn set_pending(&mut self, user_id: u64, session: &str, ttl: Duration, now: Instant) {
        // `SET ... PX ttl_ms` with at least 1 ms, as the Redis store sends it.
        let ttl = ttl.max(Duration::from_millis(1));
        self.slots.insert(
            user_id,
            Slot {
                value: session.to_string(),
                expires: Some(now + ttl),
            },
        );
    }

    fn route_is(&self, user_id: u64, server_id: &str, session: &str) -> bool {
        self.routes
            .get(&user_id)
            .is_some_and(|(server, s)| server == server_id && s == session)
    }

    /// Appends an event with the next id (`{ms}-{n}` like a Redis stream's: the wall clock,
    /// never going back) and drops the oldest past `max_len`.
    fn publish(&mut self, event: PresenceEvent, max_len: usize) {
        let now = u64::try_from(crate::time::now_ms()).unwrap_or(0);
        let last = self.last_event;
        let id = if now > last.ms {
            EventId { ms: now, seq: 0 }
        } else {
            EventId {
                ms: last.ms,
                seq: last.seq.saturating_add(1),
            }
        };
        self.last_event = id;
        self.events.push_back((
            id,
            StoredEvent {
                id: id.to_string(),
                event,
            },
        ));
        while self.events.len() > max_len.max(1) {
            self.events.pop_front();
        }
    }

    fn events_after(&self, after: Option<EventId>, limit: usize) -> Vec<StoredEvent> {
        let start = after.map_or(0, |after| {
            self.events.partition_point(|(id, _)| *id <= after)
        });
        self.events
            .range(start..)
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// The online index entry (name) and the online id (route) go together here: the id set
    /// of the Redis store is the set of users with a route.
    fn is_online(&self, user_id: u64) -> bool {
        self.routes.contains_key(&user_id)
    }

    fn route_entry(&self, user_id: u64) -> Option<RouteEntry> {
        self.routes
            .get(&user_id)
            .map(|(server, session)| RouteEntry {
                user_id,
                server_id: server.clone(),
                session: session.clone(),
            })
    }
}

/// One user's inbox: the four Redis keys `inbox`, `inbox:order`, `inbox:rcpt`, `inbox:seq`.
#[derive(Default)]
struct Inbox {
    /// Last seq handed out (never reset).
    last_seq: u64,
    /// seq → message (with its seq set): the order set and the hash in one.
    entries: BTreeMap<u64, Message>,
    /// message id → seq.
    by_id: HashMap<String, u64>,
    /// message id → sender, for messages that asked for a receipt.
    receipts: HashMap<String, u64>,
    /// Wall-clock ms at which the whole inbox expires unless something is stored (the Redis
    /// keys' PEXPIRE); 0: nothing was ever stored.
    expires_ms: i64,
}

impl Inbox {
    /// Empties the inbox if it got nothing new for the max age (the Redis keys expired).
    fn expire_idle(&mut self, now_ms: i64) {
        if self.expires_ms != 0 && now_ms >= self.expires_ms {
            self.entries.clear();
            self.by_id.clear();
            self.receipts.clear();
            self.expires_ms = 0;
        }
    }

    fn remove_seq(&mut self, seq: u64) -> Option<Message> {
        let m = self.entries.remove(&seq)?;
        self.by_id.remove(&m.id);
        self.receipts.remove(&m.id);
        Some(m)
    }

    /// Stores `m` and returns its seq (the one it has when it is already stored).
    /// Stores `m`, sets its seq and returns it; a message already stored (same id) is
    /// replaced by the stored copy instead.
    fn store(&mut self, m: &mut Message, limits: &InboxLimits, now_ms: i64) -> u64 {
        self.expire_idle(now_ms);
        if let Some(stored) = self.by_id.get(&m.id).and_then(|seq| self.entries.get(seq)) {
            *m = stored.clone();
            return m.seq;
        }
        self.last_seq += 1;
        let seq = self.last_seq;
        let mut stored = m.clone();
        stored.seq = seq;
        self.entries.insert(seq, stored);
        self.by_id.insert(m.id.clone(), seq);
        // Sender 0 (the system) gets no receipt: the Redis store passes 0 as "none".
        if m.receipt && m.sender_id != 0 {
            self.receipts.insert(m.id.clone(), m.sender_id);
        }
        while self.entries.len() > limits.max_messages {
            let Some((&oldest, _)) = self.entries.first_key_value() else {
                break;
            };
            self.remove_seq(oldest);
        }
        // Drop the expired oldest messages now rather than at the next read (memory is
        // what this store has to spare); an expired one behind a newer one waits for a read.
        let oldest_ms = oldest_kept_ms(limits, now_ms);
        while let Some((&oldest, first)) = self.entries.first_key_value() {
            if first.timestamp_ms >= oldest_ms || oldest == seq {
                break;
            }
            self.remove_seq(oldest);
        }
        self.expires_ms = now_ms.saturating_add(max_age_ms(limits));
        m.seq = seq;
        seq
    }
}

fn max_age_ms(limits: &InboxLimits) -> i64 {
    i64::try_from(limits.max_age.as_millis())
        .unwrap_or(i64::MAX)
        .max(1)
}

/// In-memory shared state for one process. Share it with `Arc` between the route and the
/// server of a standalone process: it is their common Redis.
pub struct MemoryStore {
    state: Mutex<State>,
    limits: InboxLimits,
    events_max_len: usize,
    /// Wakes `events_wait` callers when an event is appended.
    events_changed: Notify,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            limits: InboxLimits::default(),
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
            .field("broadcast_claims", &state.broadcasts.len())
            .field("limits", &self.limits)
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

#[async_trait]
impl StateStore for MemoryStore {
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

    async fn claim_login(
        &self,
        user_id: u64,
        session: &str,
        pending_ttl: Duration,
        is_live: IsLive<'_>,
    ) -> StoreResult<ClaimOutcome> {
        let current = {
            let now = Instant::now();
            let mut state = self.lock();
            if state.slots.len() >= state.purge_at {
                state.purge_expired(now);
            }
            match state.slot_value(user_id, now) {
                None => {
                    state.set_pending(user_id, session, pending_ttl, now);
                    return Ok(ClaimOutcome::Claimed);
                }
                Some(current) => current,
            }
        };
        match keys::parse_slot(&current) {
            (held, Some(server)) if is_live(server) => Ok(ClaimOutcome::Held {
                session: held.to_string(),
                server: server.to_string(),
            }),
            _ => {
                // Pending (a login nobody connected with) or held by a session on a dead
                // server: take it over unless it changed while `is_live` ran (the Redis
                // store's compare-and-set).
                let now = Instant::now();
                let mut state = self.lock();
                if state.slot_value(user_id, now).as_deref() == Some(current.as_str()) {
                    state.set_pending(user_id, session, pending_ttl, now);
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
        let now = Instant::now();
        let mut state = self.lock();
        let holds = state
            .slot_value(user_id, now)
            .is_some_and(|value| keys::slot_held_by(&value, held_session));
        if holds {
            state.set_pending(user_id, session, pending_ttl, now);
        }
        Ok(holds)
    }

    async fn next_generation(&self, user_id: u64, keep: Duration) -> StoreResult<u64> {
        let now = Instant::now();
        let mut state = self.lock();
        if state.generations.len() >= state.generations_purge_at {
            state.generations.retain(|_, (_, until)| *until > now);
            state.generations_purge_at = (state.generations.len() * 2).max(MIN_PURGE_AT);
        }
        let until = now + keep.max(Duration::from_millis(1));
        let entry = state.generations.entry(user_id).or_insert((0, until));
        // An expired counter restarts, as the Redis key vanishes.
        let current = if entry.1 > now { entry.0 } else { 0 };
        *entry = (current + 1, until);
        Ok(current + 1)
    }

    async fn generation(&self, user_id: u64) -> StoreResult<u64> {
        let now = Instant::now();
        let state = self.lock();
        Ok(state
            .generations
            .get(&user_id)
            .filter(|(_, until)| *until > now)
            .map_or(0, |&(generation, _)| generation))
    }

    async fn session_active(&self, user_id: u64, session: &str) -> StoreResult<bool> {
        let mut state = self.lock();
        Ok(state
            .slot(user_id, Instant::now())
            .is_some_and(|s| keys::slot_held_by(&s.value, session)))
    }

    async fn release_login(&self, user_id: u64, session: &str) -> StoreResult<Option<String>> {
        let mut state = self.lock();
        let Some(value) = state.slot_value(user_id, Instant::now()) else {
            return Ok(None);
        };
        if !keys::slot_held_by(&value, session) {
            return Ok(None);
        }
        state.slots.remove(&user_id);
        Ok(keys::parse_slot(&value).1.map(str::to_string))
    }

    async fn attach(
        &self,
        user_id: u64,
        name: &str,
        session: &str,
        server_id: &str,
    ) -> StoreResult<AttachOutcome> {
        let mut state = self.lock();
        // Only a pending slot of exactly this session: single use, since attaching changes it.
        if state.slot_value(user_id, Instant::now()).as_deref() != Some(session) {
            return Ok(AttachOutcome::SessionInvalid);
        }
        state.slots.insert(
            user_id,
            Slot {
                value: keys::attached_slot(session, server_id),
                expires: None,
            },
        );
        state
            .routes
            .insert(user_id, (server_id.to_string(), session.to_string()));
        state.online.insert(keys::online_member(name, user_id));
        let online = presence_event(PresenceKind::Online, user_id, name, server_id, "");
        state.publish(online, self.events_max_len);
        drop(state);
        self.events_changed.notify_waiters();
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
        let mut state = self.lock();
        let removed = state.route_is(user_id, server_id, session);
        if removed {
            state.routes.remove(&user_id);
        }
        let attached = keys::attached_slot(session, server_id);
        if state.slot_value(user_id, Instant::now()).as_deref() == Some(attached.as_str()) {
            state.slots.remove(&user_id);
        }
        if removed {
            // No route is left for this user (just removed, under the same lock): the Redis
            // store's "unindex unless attached again meanwhile" is a plain removal here.
            state.online.remove(&keys::online_member(name, user_id));
            let offline = presence_event(PresenceKind::Offline, user_id, name, server_id, reason);
            state.publish(offline, self.events_max_len);
            drop(state);
            self.events_changed.notify_waiters();
        }
        Ok(())
    }

    async fn routes(&self, user_ids: &[u64]) -> StoreResult<Vec<Option<RouteEntry>>> {
        let state = self.lock();
        Ok(user_ids.iter().map(|&id| state.route_entry(id)).collect())
    }

    /// The cursor is the user id to resume at (0: from the start; the first route may belong
    /// to user 0, which a resumed scan never needs to revisit). A route present for the whole
    /// scan is returned exactly once, as SCAN guarantees; unlike SCAN, never twice.
    async fn scan_routes(&self, cursor: u64, count: usize) -> StoreResult<(u64, Vec<RouteEntry>)> {
        let mut state = self.lock();
        if cursor == 0 {
            // A fan-out walks every route now and then: the moment to drop pending slots
            // that expired without anyone touching them again.
            state.purge_expired(Instant::now());
        }
        let batch: Vec<RouteEntry> = state
            .routes
            .range(cursor..)
            .take(count.max(1))
            .map(|(&user_id, (server, session))| RouteEntry {
                user_id,
                server_id: server.clone(),
                session: session.clone(),
            })
            .collect();
        let next = match batch.last() {
            Some(last) => match last.user_id.checked_add(1) {
                Some(next) if state.routes.range(next..).next().is_some() => next,
                _ => 0,
            },
            None => 0,
        };
        Ok((next, batch))
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
        // The bounds of the Redis store's ZRANGEBYLEX: after the cursor when it lies at or
        // past the prefix, else from the prefix; up to the last member starting with it.
        let start: Bound<&str> = match after {
            Some(a) if a.as_bytes() >= prefix.as_bytes() => Bound::Excluded(a),
            _ if prefix.is_empty() => Bound::Unbounded,
            _ => Bound::Included(prefix),
        };
        let state = self.lock();
        Ok(state
            .online
            .range::<str, _>((start, Bound::Unbounded))
            // Members at or past `prefix` sort below `prefix + 0xff` exactly when they start
            // with it (0xff never occurs in UTF-8).
            .take_while(|m| m.starts_with(prefix))
            .take(limit)
            .filter_map(|m| OnlineEntry::from_member(m))
            .collect())
    }

    async fn remove_stale_route(&self, entry: &RouteEntry) -> StoreResult<()> {
        let mut state = self.lock();
        if !state.route_is(entry.user_id, &entry.server_id, &entry.session) {
            return Ok(());
        }
        state.routes.remove(&entry.user_id);
        let name = state.users.get(&entry.user_id).map(|u| u.name.clone());
        if let Some(name) = &name {
            state
                .online
                .remove(&keys::online_member(name, entry.user_id));
        }
        let offline = presence_event(
            PresenceKind::Offline,
            entry.user_id,
            name.as_deref().unwrap_or_default(),
            &entry.server_id,
            reason::SERVER_LOST,
        );
        state.publish(offline, self.events_max_len);
        drop(state);
        self.events_changed.notify_waiters();
        Ok(())
    }

    async fn inbox_store(&self, messages: &mut [Message]) -> StoreResult<()> {
        let now_ms = crate::time::now_ms();
        let mut state = self.lock();
        for m in messages.iter_mut() {
            state
                .inboxes
                .entry(m.receiver_id)
                .or_default()
                .store(m, &self.limits, now_ms);
        }
        Ok(())
    }

    async fn inbox_read(
        &self,
        user_id: u64,
        after_seq: u64,
        limit: usize,
    ) -> StoreResult<Vec<Message>> {
        let limit = limit.min(MAX_INBOX_READ);
        let now_ms = crate::time::now_ms();
        let oldest_ms = oldest_kept_ms(&self.limits, now_ms);
        let mut state = self.lock();
        let Some(inbox) = state.inboxes.get_mut(&user_id) else {
            return Ok(Vec::new());
        };
        inbox.expire_idle(now_ms);
        let mut out = Vec::new();
        let mut expired = Vec::new();
        if limit > 0 {
            for (&seq, m) in inbox.entries.range(after_seq.saturating_add(1)..) {
                if m.timestamp_ms < oldest_ms {
                    expired.push(seq);
                    continue;
                }
                out.push(m.clone());
                if out.len() == limit {
                    break;
                }
            }
        }
        for seq in expired {
            inbox.remove_seq(seq);
        }
        Ok(out)
    }

    async fn inbox_ack(&self, acks: &[(u64, Vec<String>)]) -> StoreResult<Vec<AckedReceipt>> {
        let now_ms = crate::time::now_ms();
        let mut state = self.lock();
        let mut receipts = Vec::new();
        for (user_id, ids) in acks {
            let Some(inbox) = state.inboxes.get_mut(user_id) else {
                continue;
            };
            inbox.expire_idle(now_ms);
            for id in ack_ids(ids) {
                let Some(seq) = inbox.by_id.get(id.as_str()).copied() else {
                    continue;
                };
                let sender = inbox.receipts.get(id.as_str()).copied();
                inbox.remove_seq(seq);
                if let Some(sender_id) = sender {
                    // Kept until the receipt is stored for its sender (`receipts_done`).
                    inbox.receipts.insert(id.clone(), sender_id);
                    receipts.push(AckedReceipt {
                        message_id: id.clone(),
                        sender_id,
                        receiver_id: *user_id,
                    });
                }
            }
        }
        Ok(receipts)
    }

    async fn receipts_done(&self, done: &[(u64, Vec<String>)]) -> StoreResult<()> {
        let mut state = self.lock();
        for (user_id, ids) in done {
            if let Some(inbox) = state.inboxes.get_mut(user_id) {
                for id in ack_ids(ids) {
                    inbox.receipts.remove(id.as_str());
                }
            }
        }
        Ok(())
    }

    async fn pending_receipts(&self, user_id: u64, limit: usize) -> StoreResult<Vec<AckedReceipt>> {
        let now_ms = crate::time::now_ms();
        let mut state = self.lock();
        let Some(inbox) = state.inboxes.get_mut(&user_id) else {
            return Ok(Vec::new());
        };
        inbox.expire_idle(now_ms);
        Ok(inbox
            .receipts
            .iter()
            .filter(|(id, _)| !inbox.by_id.contains_key(id.as_str()))
            .take(limit)
            .map(|(id, &sender_id)| AckedReceipt {
                message_id: id.clone(),
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
        let after = after.map(parse_event_id).transpose()?;
        let limit = limit.min(MAX_EVENTS_READ);
        Ok(self.lock().events_after(after, limit))
    }

    async fn events_wait(
        &self,
        after: &str,
        limit: usize,
        timeout: Duration,
    ) -> StoreResult<Vec<StoredEvent>> {
        let after = parse_event_id(after)?;
        let limit = limit.min(MAX_EVENTS_READ);
        // `None`: a wait too long to represent, i.e. no deadline.
        let deadline = Instant::now().checked_add(timeout);
        loop {
            // Registered before looking, so an event appended right after the look wakes it.
            let changed = self.events_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let page = self.lock().events_after(Some(after), limit);
            if !page.is_empty() || limit == 0 {
                return Ok(page);
            }
            match deadline {
                Some(deadline) => {
                    if tokio::time::timeout_at(deadline, changed).await.is_err() {
                        return Ok(Vec::new());
                    }
                }
                None => changed.await,
            }
        }
    }

    async fn events_last_id(&self) -> StoreResult<String> {
        Ok(self
            .lock()
            .events
            .back()
            .map_or_else(|| EventId::ZERO.to_string(), |(_, e)| e.id.clone()))
    }

    async fn lease(&self, name: &str, owner: &str, ttl: Duration) -> StoreResult<bool> {
        let now = Instant::now();
        // `PX ttl_ms` with at least 1 ms, as the Redis store sends it.
        let expires = now + ttl.max(Duration::from_millis(1));
        let mut state = self.lock();
        match state.leases.get_mut(name) {
            Some((holder, until)) if *until > now => {
                if holder == owner {
                    *until = expires;
                    Ok(true)
                } else {
                    Ok(false)
                }
            }
            _ => {
                state
                    .leases
                    .insert(name.to_string(), (owner.to_string(), expires));
                Ok(true)
            }
        }
    }

    async fn claim_broadcasts(
        &self,
        claims: &[(String, i64)],
        ttl: Duration,
    ) -> StoreResult<Vec<Option<i64>>> {
        let now = Instant::now();
        // `PX ttl_ms` with at least 1 ms, as the Redis store sends it.
        let expires = now + ttl.max(Duration::from_millis(1));
        let mut state = self.lock();
        state.prune_broadcasts(now);
        let mut answers = Vec::with_capacity(claims.len());
        for (id, timestamp_ms) in claims {
            match state.broadcasts.get(id) {
                Some(&(first, until)) if until > now => answers.push(Some(first)),
                _ => {
                    state
                        .broadcasts
                        .insert(id.clone(), (*timestamp_ms, expires));
                    state.broadcast_expiries.push_back((expires, id.clone()));
                    answers.push(None);
                }
            }
        }
        Ok(answers)
    }

    async fn release_broadcasts(&self, ids: &[String]) -> StoreResult<()> {
        let mut state = self.lock();
        for id in ids {
            state.broadcasts.remove(id);
        }
        Ok(())
    }

    async fn cursor(&self, name: &str) -> StoreResult<Option<String>> {
        Ok(self.lock().cursors.get(name).cloned())
    }

    async fn set_cursor(&self, name: &str, value: &str) -> StoreResult<()> {
        self.lock()
            .cursors
            .insert(name.to_string(), value.to_string());
        Ok(())
    }

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

    async fn inbox_top(&self, user_id: u64) -> StoreResult<u64> {
        Ok(self
            .lock()
            .inboxes
            .get(&user_id)
            .map_or(0, |inbox| inbox.last_seq))
    }

    async fn inbox_len(&self, user_id: u64) -> StoreResult<usize> {
        let mut state = self.lock();
        Ok(state.inboxes.get_mut(&user_id).map_or(0, |inbox| {
            inbox.expire_idle(crate::time::now_ms());
            inbox.entries.len()
        }))
    }
}

#[cfg(test)]
mod tests {
    //! What only the memory store has: a clock it reads lazily, and purging. Its behaviour
    //! shared with Redis is tested once for both in `tests/tests/backends.rs`.

    use super::*;

    fn nobody_live(_: &str) -> bool {
        false
    }

    #[tokio::test(start_paused = true)]
    async fn pending_slots_expire_on_the_tokio_clock() {
        let store = MemoryStore::new();
        let ttl = Duration::from_secs(30);
        assert_eq!(
            store.claim_login(1, "s1", ttl, &nobody_live).await.unwrap(),
            ClaimOutcome::Claimed
        );
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(store.session_active(1, "s1").await.unwrap());
        let (value, left) = store.login_slot(1).unwrap();
        assert_eq!(value, "s1");
        assert_eq!(left, Some(Duration::from_secs(1)));

        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!store.session_active(1, "s1").await.unwrap());
        assert_eq!(store.login_slot(1), None);
        assert_eq!(
            store.attach(1, "u1", "s1", "srv-a").await.unwrap(),
            AttachOutcome::SessionInvalid
        );
        assert_eq!(
            store.claim_login(1, "s2", ttl, &nobody_live).await.unwrap(),
            ClaimOutcome::Claimed
        );
    }

    #[tokio::test(start_paused = true)]
    async fn attached_slots_never_expire() {
        let store = MemoryStore::new();
        store
            .claim_login(1, "s1", Duration::from_secs(1), &nobody_live)
            .await
            .unwrap();
        store.attach(1, "u1", "s1", "srv-a").await.unwrap();
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(store.login_slot(1), Some(("s1@srv-a".into(), None)));
        store.scan_routes(0, 10).await.unwrap();
        assert_eq!(store.slots_in_memory(), 1, "a purge keeps attached slots");
    }

    #[tokio::test(start_paused = true)]
    async fn expired_slots_nobody_touches_are_purged() {
        let store = MemoryStore::new();
        let ttl = Duration::from_secs(1);
        // Users who log in and never connect, nor come back.
        for user in 0..1000 {
            store
                .claim_login(user, "s", ttl, &nobody_live)
                .await
                .unwrap();
            if user % 10 == 0 {
                tokio::time::advance(ttl).await;
            }
        }
        // Claims alone keep the map within twice the live slots (plus the floor).
        assert!(
            store.slots_in_memory() <= 2 * 10 + MIN_PURGE_AT,
            "{} slots kept",
            store.slots_in_memory()
        );

        tokio::time::advance(ttl).await;
        store.scan_routes(0, 10).await.unwrap();
        assert_eq!(store.slots_in_memory(), 0, "a scan from the start purges");
    }

    fn message(id: &str, timestamp_ms: i64) -> Message {
        Message {
            id: id.to_string(),
            sender_id: 1,
            receiver_id: 2,
            timestamp_ms,
            ..Message::default()
        }
    }

    const HOUR_MS: i64 = 3_600_000;

    fn hour_limits() -> InboxLimits {
        InboxLimits {
            max_messages: 10,
            max_age: Duration::from_secs(3600),
        }
    }

    #[test]
    fn an_idle_inbox_expires_as_a_whole_and_keeps_its_seqs() {
        let limits = hour_limits();
        let t0 = 1_000_000_000;
        let mut inbox = Inbox::default();
        assert_eq!(inbox.store(&mut message("a", t0), &limits, t0), 1);
        assert_eq!(inbox.store(&mut message("b", t0), &limits, t0 + 10), 2);

        // Each store keeps the inbox alive for the max age from then (the Redis PEXPIRE).
        inbox.expire_idle(t0 + 10 + HOUR_MS - 1);
        assert_eq!(inbox.entries.len(), 2);
        inbox.expire_idle(t0 + 10 + HOUR_MS);
        assert!(inbox.entries.is_empty() && inbox.by_id.is_empty());

        let later = t0 + 2 * HOUR_MS;
        assert_eq!(inbox.store(&mut message("a", later), &limits, later), 3);
    }

    #[test]
    fn a_store_drops_the_expired_oldest_messages() {
        let limits = hour_limits();
        let now = 5 * HOUR_MS;
        let mut inbox = Inbox::default();
        let mut receipt = message("old1", now - 2 * HOUR_MS);
        receipt.receipt = true;
        inbox.store(&mut receipt, &limits, now);
        inbox.store(&mut message("old2", now - 2 * HOUR_MS), &limits, now);
        inbox.store(&mut message("fresh", now), &limits, now);
        inbox.store(&mut message("old3", now - 2 * HOUR_MS), &limits, now);
        // The expired front is gone with its receipt; one behind a fresh one (and the one
        // just stored) wait for a read, as in Redis.
        let ids: Vec<&str> = inbox.entries.values().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["fresh", "old3"]);
        assert_eq!(inbox.by_id.len(), 2);
        assert!(inbox.receipts.is_empty());
    }

    #[tokio::test]
    async fn inbox_memory_stays_bounded() {
        let store = MemoryStore::new().with_inbox_limits(hour_limits());
        let now = crate::time::now_ms();
        for round in 0..100 {
            let mut batch: Vec<Message> = (0..10)
                .map(|i| {
                    let mut m = message(&format!("m{round}-{i}"), now);
                    m.receipt = true;
                    m
                })
                .collect();
            store.inbox_store(&mut batch).await.unwrap();
        }
        let state = store.lock();
        let inbox = &state.inboxes[&2];
        assert_eq!(inbox.last_seq, 1000);
        assert_eq!(
            (inbox.entries.len(), inbox.by_id.len(), inbox.receipts.len()),
            (10, 10, 10)
        );
    }

    async fn connect(store: &MemoryStore, user: u64, session: &str) {
        store
            .claim_login(user, session, Duration::from_secs(60), &nobody_live)
            .await
            .unwrap();
        assert_eq!(
            store.attach(user, "u", session, "srv-a").await.unwrap(),
            AttachOutcome::Attached
        );
    }

    #[tokio::test]
    async fn events_are_trimmed_exactly_with_increasing_ids() {
        let store = MemoryStore::new().with_events_max_len(5);
        for user in 1..=20 {
            connect(&store, user, "s").await;
        }
        let kept = store.events_after(None, 100).await.unwrap();
        let users: Vec<u64> = kept.iter().map(|e| e.event.user_id).collect();
        assert_eq!(users, [16, 17, 18, 19, 20]);
        let ids: Vec<EventId> = kept
            .iter()
            .map(|e| EventId::parse(&e.id).unwrap())
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        // Ids go on increasing past the trimmed ones.
        assert_eq!(store.events_last_id().await.unwrap(), kept[4].id);
        let after_trimmed = store.events_after(Some("0-0"), 100).await.unwrap();
        assert_eq!(after_trimmed, kept);
    }

    #[tokio::test(start_paused = true)]
    async fn events_wait_times_out_on_the_tokio_clock() {
        let store = MemoryStore::new();
        let started = Instant::now();
        let none = store
            .events_wait("0-0", 10, Duration::from_secs(30))
            .await
            .unwrap();
        assert!(none.is_empty());
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn events_wait_wakes_on_an_append() {
        let store = std::sync::Arc::new(MemoryStore::new());
        let waiting = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .events_wait("0-0", 10, Duration::from_secs(3600))
                    .await
            })
        };
        // The paused clock moves only when every task is idle: after this, the waiter waits.
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        connect(&store, 1, "s").await;
        let got = waiting.await.unwrap().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].event.kind, PresenceKind::Online);
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(1),
            "woken, not timed out"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn leases_expire_on_the_tokio_clock() {
        let store = MemoryStore::new();
        let ttl = Duration::from_secs(10);
        assert!(store.lease("hook", "a", ttl).await.unwrap());
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(!store.lease("hook", "b", ttl).await.unwrap());
        // Renewed by its holder: 10 s from now.
        assert!(store.lease("hook", "a", ttl).await.unwrap());
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(!store.lease("hook", "b", ttl).await.unwrap());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(store.lease("hook", "b", ttl).await.unwrap());
        assert!(!store.lease("hook", "a", ttl).await.unwrap());
    }

    #[tokio::test]
    async fn empty_channels_and_channel_sets_leave_no_trace() {
        let store = MemoryStore::new();
        assert_eq!(
            store.channel_join("c", 1, 0).await.unwrap(),
            JoinOutcome::TooManyChannels
        );
        store.channel_join("c", 1, 5).await.unwrap();
        store.channel_join("d", 1, 5).await.unwrap();
        store.channel_leave("c", 1).await.unwrap();
        store.channel_leave("d", 1).await.unwrap();
        store.channel_leave("e", 2).await.unwrap();
        let state = store.lock();
        assert!(state.channels.is_empty());
        assert!(state.user_channels.is_empty());
    }

    #[tokio::test]
    async fn a_resumed_scan_does_not_revisit_user_zero() {
        let store = MemoryStore::new();
        for user in [0, 1, 2] {
            let session = format!("s{user}");
            store
                .claim_login(user, &session, Duration::from_secs(60), &nobody_live)
                .await
                .unwrap();
            store.attach(user, "u", &session, "srv-a").await.unwrap();
        }
        let (next, first) = store.scan_routes(0, 1).await.unwrap();
        assert_eq!((next, first[0].user_id), (1, 0));
        let (next, second) = store.scan_routes(next, 1).await.unwrap();
        assert_eq!((next, second[0].user_id), (2, 1));
        let (next, third) = store.scan_routes(next, 5).await.unwrap();
        assert_eq!((next, third[0].user_id), (0, 2));
    }
}
