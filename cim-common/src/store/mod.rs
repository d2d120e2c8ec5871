//! Shared state: accounts, login slots, routes, the online index, the per-user inboxes,
//! channels, and the presence-event stream.
//!
//! The interface is cut into **role traits**, one per domain: [`Accounts`], [`LoginSlots`],
//! [`Sessions`], [`Routes`], [`Delivery`], [`Inbox`], [`Events`], [`Broadcasts`], [`Leases`],
//! [`Channels`]. Each process holds only the roles it uses, so that the types say what it
//! may do: a connection server holds a [`ServerStore`] (attach and detach its connections,
//! replay and ack their inboxes: no accounts, no routing), a route a [`RouteStore`]
//! (everything else). [`StateStore`] is all of them, what [`crate::backend::Backends`]
//! connects and hands out as either. The three are blanket-implemented: a type that
//! implements the roles is each of them, and an `Arc<dyn StateStore>` coerces to the
//! other two.
//!
//! [`redis::RedisStore`] is the production implementation and [`memory::MemoryStore`] the one
//! of standalone mode and unit tests, with the same semantics; both are cut into one file per
//! role, mirrored (`redis/inbox.rs` and `memory/inbox.rs`, ...). Every Redis call has a
//! deadline (the Redis response timeout), so a dead Redis produces an error, never a hang;
//! the memory store never waits. [`layer::Layered`] wraps any store with a hook that sees
//! every call: error counting ([`counting`]) and the test double ([`faulty`]) are hooks.

pub mod chat;
pub mod counting;
#[cfg(feature = "test-support")]
pub mod faulty;
pub mod layer;
pub mod memory;
pub mod redis;

/// Every role trait, for code that calls a concrete store (`MemoryStore`, `RedisStore`, a test
/// double) rather than a role's trait object: a method of a trait is only found with the trait
/// in scope. `use cim_common::store::prelude::*;`
pub mod prelude {
    pub use super::{
        Accounts, Broadcasts, Channels, Delivery, Events, GroupSync, Groups, History, Inbox,
        Leases, LoginSlots, Routes, Sessions,
    };
}

use crate::{
    events::{PresenceEvent, StoredEvent},
    pb::Message,
};
use async_trait::async_trait;
use std::time::Duration;

pub use self::chat::{
    AddOutcome, Changed, ConvKey, ConversationSummary, GroupAppend, GroupCursor, GroupInfo,
    GroupLimits, GroupMember, GroupSync, Groups, History, HistoryLimits, HistoryPage, Role,
};
pub use self::memory::MemoryStore;
pub use self::redis::{Conn as RedisConn, RedisStore, RedisTarget};

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    #[error("corrupt value in state store: {0}")]
    Corrupt(String),
    /// The store cannot serve cim at all (e.g. a Redis too old for its commands).
    #[error("unsupported state store: {0}")]
    Unsupported(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// [`Delivery::inbox_store_then_routes`] as two calls, one after the other (stores without
/// a pipeline, and the Redis store when there is nothing to pipeline).
async fn store_then_routes_in_turn<S: Delivery + ?Sized>(
    store: &S,
    messages: &mut [Message],
    user_ids: &[u64],
) -> (StoreResult<()>, StoreResult<Vec<Option<RouteEntry>>>) {
    let stored = store.inbox_store(messages).await;
    if stored.is_err() {
        return (stored, Ok(Vec::new()));
    }
    (stored, store.routes(user_ids).await)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub id: u64,
    pub name: String,
    pub password_hash: String,
}

/// Outcome of taking a user's login slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The slot is ours, pending until a server attaches the connection.
    Claimed,
    /// A session connected to a live server holds it.
    Held { session: String, server: String },
    /// The slot changed while this claim ran: another login took or attached it.
    Contended,
}

/// Outcome of attaching a connection to its login session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachOutcome {
    Attached,
    /// The session is not pending: the token was already used, or the session ended.
    SessionInvalid,
}

/// Where a user's connection lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub user_id: u64,
    pub server_id: String,
    pub session: String,
}

/// One entry of the online index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnlineEntry {
    pub user_id: u64,
    pub name: String,
    /// Opaque cursor: pass it as `after` to continue after this entry.
    pub cursor: String,
}

impl OnlineEntry {
    /// The entry of an online-index member (`None` for a malformed one).
    pub fn from_member(member: &str) -> Option<Self> {
        let (name, id) = crate::keys::parse_online_member(member)?;
        Some(OnlineEntry {
            user_id: id,
            name: name.to_string(),
            cursor: member.to_string(),
        })
    }
}

/// Bounds of every user's inbox (private messages and receipts waiting for an ack).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxLimits {
    /// Messages kept per user; storing one more drops the oldest.
    pub max_messages: usize,
    /// Messages older than this (by `timestamp_ms`) are never replayed; an inbox that got
    /// nothing new for this long expires as a whole.
    pub max_age: Duration,
}

impl Default for InboxLimits {
    fn default() -> Self {
        Self {
            max_messages: 1000,
            max_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// A stored message that asked for a receipt, acked by its receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckedReceipt {
    pub message_id: String,
    /// Who sent the message (and gets the receipt).
    pub sender_id: u64,
    /// Who acked it (the inbox's owner).
    pub receiver_id: u64,
}

/// Outcome of joining a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinOutcome {
    Joined,
    /// Already a member: nothing changed.
    AlreadyMember,
    /// The user is in `max_channels` channels already: nothing changed.
    TooManyChannels,
}

/// Size of a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelInfo {
    pub name: String,
    /// Members (online or not).
    pub members: u64,
    /// Members connected right now (members that are in the online-id set).
    pub online: u64,
}

/// Most events one `events_after` / `events_wait` call returns.
pub const MAX_EVENTS_READ: usize = 1000;
/// Most channel members or names one page call returns.
pub const MAX_CHANNEL_PAGE: usize = 1000;
/// Most channels one `channel_stats` call describes.
pub const MAX_CHANNEL_STATS: usize = 1000;
/// Presence events the stream keeps by default (`events_max_len` of the backend config).
pub const DEFAULT_EVENTS_MAX_LEN: usize = 100_000;

/// Predicate "is this server instance alive" (from the registry).
pub type IsLive<'a> = &'a (dyn Fn(&str) -> bool + Send + Sync);

/// Accounts: a user id per unique name, with its password hash. The route's.
#[async_trait]
pub trait Accounts: Send + Sync + 'static {
    /// Creates an account. `Ok(None)` when the name is taken.
    async fn create_user(&self, name: &str, password_hash: &str) -> StoreResult<Option<u64>>;

    async fn user_by_name(&self, name: &str) -> StoreResult<Option<UserRecord>>;

    async fn user_name(&self, id: u64) -> StoreResult<Option<String>>;
}

/// The login slot of each user (who may connect, single-login) and the login generations
/// that session tokens are checked against. The route's: it decides who logs in.
#[async_trait]
pub trait LoginSlots: Send + Sync + 'static {
    /// Takes the login slot of `user_id` for `session`, pending for `pending_ttl` (the slot
    /// expires unless a server attaches a connection in time). Only a slot attached to a live
    /// server holds ([`ClaimOutcome::Held`]): a pending slot (a login nobody connected with:
    /// its client crashed, its server refused it, or it was a plain HTTP client) and a slot
    /// of a session whose server is not live are taken over, so that a user is never locked
    /// out by a login that has no connection. The old session's token can then no longer
    /// attach. [`ClaimOutcome::Contended`]: the slot changed under the claim (lost a race).
    async fn claim_login(
        &self,
        user_id: u64,
        session: &str,
        pending_ttl: Duration,
        is_live: IsLive<'_>,
    ) -> StoreResult<ClaimOutcome>;

    /// Gives the slot held by `held_session` (pending or attached) to `session`, pending for
    /// `pending_ttl`, if `held_session` still holds it (compare-and-set); returns whether it
    /// did. For a takeover of a connected session: after its connection was kicked or its
    /// server is known to be gone, or when the holder itself resumes with its session token.
    async fn take_over_login(
        &self,
        user_id: u64,
        held_session: &str,
        session: &str,
        pending_ttl: Duration,
    ) -> StoreResult<bool>;

    /// Starts a new login generation of `user_id` and returns it (1, 2, …): at every login,
    /// logout and forced offline. Only the session token of the current generation can
    /// resume. Kept for `keep` after the last call (the session token lifetime: by then every
    /// token of an earlier generation has expired, so counting may restart).
    async fn next_generation(&self, user_id: u64, keep: Duration) -> StoreResult<u64>;

    /// The current login generation of `user_id` (0: none remembered).
    async fn generation(&self, user_id: u64) -> StoreResult<u64>;

    /// Whether `session` still holds the login slot (pending or attached).
    async fn session_active(&self, user_id: u64, session: &str) -> StoreResult<bool>;

    /// Frees the slot if `session` holds it. Returns the server it was attached to, if any.
    async fn release_login(&self, user_id: u64, session: &str) -> StoreResult<Option<String>>;
}

/// A connection's side of its login slot: a connection server attaches the pending session
/// it accepted and detaches it when the connection closes, which also keeps the route, the
/// online index and the presence events in step.
#[async_trait]
pub trait Sessions: Send + Sync + 'static {
    /// A server accepted the connection of a pending session: atomically marks the slot as
    /// attached to `server_id` (without expiry), records the route, then indexes the user as
    /// online (name index and online-id set) and publishes an online event. Single-use: a
    /// second attach of the same session fails (and publishes nothing).
    async fn attach(
        &self,
        user_id: u64,
        name: &str,
        session: &str,
        server_id: &str,
    ) -> StoreResult<AttachOutcome>;

    /// The connection closed: removes the route and the slot, each only if it still belongs
    /// to this session on this server (compare-and-delete). When the route was removed, also
    /// the online index entries, and publishes an offline event with `reason` (one of
    /// [`crate::events::reason`]); a connection whose route a newer session took over
    /// publishes nothing (the user is still online).
    async fn detach(
        &self,
        user_id: u64,
        name: &str,
        session: &str,
        server_id: &str,
        reason: &str,
    ) -> StoreResult<()>;
}

/// Where users are connected (the route entries) and the online index, by name. Read by the
/// route to deliver; stale entries are removed when their server is gone.
#[async_trait]
pub trait Routes: Send + Sync + 'static {
    /// Routes of many users in one round trip; `None` for users not connected.
    async fn routes(&self, user_ids: &[u64]) -> StoreResult<Vec<Option<RouteEntry>>>;

    /// One step over the users attached on `server_id` (the lost-server sweep): about
    /// `count` of them per call, from `cursor` (0 to start). Returns the next cursor (0: done)
    /// and the routes that still point at that server. Users found attached elsewhere (or
    /// nowhere) meanwhile leave the server's index as a side effect. Redis: per shard, the
    /// server's member set (SSCAN) and the routes of what it found; no SCAN of the keyspace
    /// (which on a cluster sees one node).
    async fn server_routes(
        &self,
        server_id: &str,
        cursor: u64,
        count: usize,
    ) -> StoreResult<(u64, Vec<RouteEntry>)>;

    /// A page of the online index in name order, names starting with `prefix`, after the
    /// entry with cursor `after`. At most `limit` entries.
    async fn online_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<OnlineEntry>>;

    /// Drops a route (and the index entries) that was found stale, if it is unchanged, and
    /// then publishes an offline event with reason `server_lost`.
    async fn remove_stale_route(&self, entry: &RouteEntry) -> StoreResult<()>;
}

/// Storing private messages (and receipts) in their receivers' inboxes, before the push that
/// delivers them: the route's side of an inbox. A [`Routes`] store, for the one round trip
/// that stores and then looks the receivers up.
#[async_trait]
pub trait Delivery: Routes {
    /// Stores each message in the inbox of its `receiver_id`, in slice order, and sets its
    /// `seq` (increasing per receiver, never reused). Idempotent by (receiver, id): a message
    /// already in the inbox keeps its place and seq (a retried send), and the slice entry is
    /// replaced by the stored copy, so what a retry pushes equals what the first attempt did. One round trip for the
    /// whole slice. An inbox over `max_messages` drops its oldest messages.
    async fn inbox_store(&self, messages: &mut [Message]) -> StoreResult<()>;

    /// [`inbox_store`](Self::inbox_store), then [`routes`](Self::routes) of `user_ids`, in that
    /// order as the store sees them, in one round trip where the store can. The order is what
    /// a login relies on: a user who attaches between the two is either found by the lookup
    /// or has the message below the inbox top its session reads first. When storing fails
    /// the lookup's answer is meaningless (and may be an error too).
    async fn inbox_store_then_routes(
        &self,
        messages: &mut [Message],
        user_ids: &[u64],
    ) -> (StoreResult<()>, StoreResult<Vec<Option<RouteEntry>>>) {
        store_then_routes_in_turn(self, messages, user_ids).await
    }
}

/// A connected user's side of the inbox: what a connection server replays at login and
/// removes when acked, and the receipt requests it confirms.
#[async_trait]
pub trait Inbox: Send + Sync + 'static {
    /// Up to `limit` messages of `user_id`'s inbox with `seq > after_seq`, in seq order, each
    /// with its `seq` set. Messages older than `max_age` are skipped (and removed), and the
    /// page is filled past them: fewer than `limit` means there is no more. `limit` is capped
    /// at [`redis::MAX_INBOX_READ`].
    async fn inbox_read(
        &self,
        user_id: u64,
        after_seq: u64,
        limit: usize,
    ) -> StoreResult<Vec<Message>>;

    /// The last seq given to a message of `user_id`'s inbox (0: none ever was). A login reads
    /// it before the inbox: what has a higher seq was stored after the connection could be
    /// found, so it comes live, and the replay stops at this seq.
    async fn inbox_top(&self, user_id: u64) -> StoreResult<u64>;

    /// Removes acked messages, for many `(user_id, message ids)` in one round trip. Returns
    /// the removed messages that asked for a receipt, each once (a repeated ack finds nothing).
    /// Their receipt requests stay stored until [`Self::receipts_done`]: a receipt that could
    /// not be stored for its sender is not lost ([`Self::pending_receipts`]).
    /// Unknown ids are no-ops; of each entry, ids past the first [`redis::MAX_ACK_IDS`] and
    /// ids longer than [`redis::MAX_ACK_ID_LEN`] bytes are ignored.
    async fn inbox_ack(&self, acks: &[(u64, Vec<String>)]) -> StoreResult<Vec<AckedReceipt>>;

    /// The receipts of these `(receiver id, message ids)` are stored for their senders:
    /// removes the receipt requests, in one round trip.
    async fn receipts_done(&self, done: &[(u64, Vec<String>)]) -> StoreResult<()>;

    /// Up to `limit` receipt requests of `user_id` whose message was acked but whose receipt
    /// was never confirmed done (its forward failed, or its server stopped first).
    async fn pending_receipts(&self, user_id: u64, limit: usize) -> StoreResult<Vec<AckedReceipt>>;

    /// Number of messages in `user_id`'s inbox.
    async fn inbox_len(&self, user_id: u64) -> StoreResult<usize>;
}

/// The stream of presence events (online / offline), published by [`Sessions`] and the removal
/// of stale routes, read by the route's event API and webhook.
#[async_trait]
pub trait Events: Send + Sync + 'static {
    /// Events with an id after `after` (`None`: from the oldest kept), oldest first, at most
    /// `limit` (capped at [`MAX_EVENTS_READ`]). Never waits. The stream keeps the newest
    /// `events_max_len` events (approximately, in Redis: up to one stream node, by default
    /// 100 events, more; on a Redis Cluster each shard's stream its share). Over a cluster's
    /// shards the order is by [`crate::events::EventId`] and stable: an event is handed out
    /// only once nothing can appear before it, so resuming after any id repeats and loses
    /// nothing (a just-published event may come with the next call). An `after` that is no event id (`{u64}-{u64}`, see
    /// [`crate::events::EventId`]) is [`StoreError::Corrupt`]: callers validate ids they
    /// were given.
    async fn events_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<StoredEvent>>;

    /// Like [`Self::events_after`] from `after`, but when there is none yet, waits up to
    /// `timeout` for one to be published; empty when none came (a zero `timeout` does not
    /// wait). Redis: a blocking XREAD on a connection of its own (never the shared
    /// multiplexed one, which it would stall); concurrent calls on one store take turns, each
    /// still answering within its `timeout` (plus one call's deadline). A Redis Cluster's
    /// shards are polled every 50 ms instead (one XREAD cannot block on several slots).
    async fn events_wait(
        &self,
        after: &str,
        limit: usize,
        timeout: Duration,
    ) -> StoreResult<Vec<StoredEvent>>;

    /// Id of the newest event (`"0-0"` when there is none): tail the stream from there to get
    /// only new events.
    async fn events_last_id(&self) -> StoreResult<String>;

    /// Publishes `message` events (the offline-push hook: a stored message waits for an
    /// offline receiver), each in its receiver's stream like their presence events, each
    /// (message id, receiver) at most once within [`MESSAGE_EVENT_DEDUP`]: a retried send
    /// whose first attempt published already publishes nothing, one whose first attempt
    /// stopped before publishing does. One round trip.
    async fn publish_messages(&self, events: &[PresenceEvent]) -> StoreResult<()>;
}

/// How long a published message event's (message id, receiver) is remembered, so that a
/// retried send does not notify twice: longer than any retry cim makes (seconds).
pub const MESSAGE_EVENT_DEDUP: Duration = Duration::from_secs(600);

/// Claims of broadcast (group and channel) message ids: a retried broadcast is delivered once.
#[async_trait]
pub trait Broadcasts: Send + Sync + 'static {
    /// Claims the ids of group and channel messages (never stored, so a retry would reach
    /// everyone again) for `ttl`: `claims` are `(message id, timestamp_ms)`. For each, `None`
    /// if this call claimed it, `Some(timestamp_ms)` of the first claim if the id is already
    /// claimed (a repeat: not to be delivered again). One round trip for the whole slice.
    async fn claim_broadcasts(
        &self,
        claims: &[(String, i64)],
        ttl: Duration,
    ) -> StoreResult<Vec<Option<i64>>>;

    /// Drops claims of broadcasts that reached nobody, so that a retry can deliver them.
    async fn release_broadcasts(&self, ids: &[String]) -> StoreResult<()>;
}

/// Named leases (one route instance at a time runs a singleton job) and named cursors.
#[async_trait]
pub trait Leases: Send + Sync + 'static {
    /// Takes or renews the lease `name` for `owner` for `ttl`: true while `owner` holds it.
    /// (One route instance at a time runs the webhook delivery.)
    async fn lease(&self, name: &str, owner: &str, ttl: Duration) -> StoreResult<bool>;

    /// A named cursor (the webhook's last delivered event id).
    async fn cursor(&self, name: &str) -> StoreResult<Option<String>>;

    async fn set_cursor(&self, name: &str, value: &str) -> StoreResult<()>;
}

/// Channel memberships, listings and counts.
#[async_trait]
pub trait Channels: Send + Sync + 'static {
    /// Adds `user_id` to `channel` (created by its first member), unless the user is in
    /// `max_channels` channels already (checked atomically: concurrent joins of one user
    /// cannot pass the limit together).
    async fn channel_join(
        &self,
        channel: &str,
        user_id: u64,
        max_channels: usize,
    ) -> StoreResult<JoinOutcome>;

    /// Removes `user_id` from `channel` (a channel without members is gone). False when the
    /// user was not a member.
    async fn channel_leave(&self, channel: &str, user_id: u64) -> StoreResult<bool>;

    async fn channel_is_member(&self, channel: &str, user_id: u64) -> StoreResult<bool>;

    /// The channels `user_id` is a member of, in name order.
    async fn user_channels(&self, user_id: u64) -> StoreResult<Vec<String>>;

    /// A page of `channel`'s member ids, ascending, all greater than `after` (0: from the
    /// start), at most `limit` (capped at [`MAX_CHANNEL_PAGE`]).
    async fn channel_members(
        &self,
        channel: &str,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<u64>>;

    /// A page of channel names (channels with at least one member), in byte order, after
    /// `after`, at most `limit` (capped at [`MAX_CHANNEL_PAGE`]). Redis: the list is an index
    /// beside the member sets; when a user's join and leave of one channel race each other,
    /// the channel may stay listed without members (until its next join or leave), so a
    /// caller showing counts should skip channels whose `channel_stats` say 0 members.
    async fn channel_list(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<String>>;

    /// Member and online counts of each channel, in one round trip; an unknown channel has
    /// zero of both. At most [`MAX_CHANNEL_STATS`] channels (more is an error-free truncation).
    async fn channel_stats(&self, channels: &[String]) -> StoreResult<Vec<ChannelInfo>>;
}

/// What a connection server does to the shared state: attach and detach the sessions of its
/// connections, replay and ack their inboxes, catch its users up on their groups. Nothing of
/// accounts, logins or routing.
pub trait ServerStore: Sessions + Inbox + GroupSync {}

impl<T: Sessions + Inbox + GroupSync + ?Sized> ServerStore for T {}

/// What a route does to the shared state: every role but the connection's side of a session
/// and of an inbox.
pub trait RouteStore:
    Accounts
    + LoginSlots
    + Routes
    + Delivery
    + Events
    + Broadcasts
    + Leases
    + Channels
    + Groups
    + History
{
}

impl<T> RouteStore for T where
    T: Accounts
        + LoginSlots
        + Routes
        + Delivery
        + Events
        + Broadcasts
        + Leases
        + Channels
        + Groups
        + History
        + ?Sized
{
}

/// The whole store, every role: what a process connects ([`crate::backend::Backends`]) and
/// what tests and tools that play several roles hold.
pub trait StateStore: RouteStore + ServerStore {}

impl<T: RouteStore + ServerStore + ?Sized> StateStore for T {}
