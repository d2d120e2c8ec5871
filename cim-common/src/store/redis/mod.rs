//! [`StateStore`] on Redis: a single Redis or a Redis Cluster (`conn.rs`: the URL decides).
//! One multiplexed connection (auto-reconnecting; on a cluster the redis crate's cluster
//! connection) shared by all tasks; atomic multi-step updates are Lua scripts (or MULTI/EXEC
//! where no step depends on another's answer: acks) over keys of one hash slot.
//!
//! **Slot safety.** No command, script, `MULTI` block or pipeline touches keys of two hash
//! slots: commands on many keys go through [`batch::Batch`], one pipeline on a single Redis,
//! one per slot touched on a cluster (concurrent, so still one round trip of latency).
//! What used to be one key for everyone is cut into shards ([`crate::keys`]); a read over
//! all shards (an online page, a channel's members, the presence streams) is one command per
//! shard in the same way.
//!
//! The role traits are implemented one file each (`accounts.rs`, `login.rs`, `sessions.rs`,
//! `routes.rs`, `inbox.rs`, `events.rs`, `broadcasts.rs`, `leases.rs`, `channels.rs`, mirrored
//! by `../memory/`); the Lua scripts are `lua/*.lua`, compiled in by `scripts.rs`. This file:
//! the connection, the version check, and the NOSCRIPT retry every file uses.
//!
//! Round trips (latency; on a cluster the pipelines of different slots go out at once, so a
//! "1" there is one pipeline per slot touched): claim 1 (2 when the slot is held), attach 2,
//! detach 2 (cluster: 3, as the route check follows the index update), a stale route's
//! removal 2 (cluster: 3; each 1 more when the user attached again meanwhile), routes of N
//! users 1 (MGET; the cluster connection splits it per slot), one step of a server's users 2
//! (SSCAN of one shard's set + the routes). Inboxes: storing N messages 1 (one script call per
//! receiver, applied in slice order; with the route lookup: each receiver's GET in its call's
//! pipeline on a cluster, one MGET after all calls on one Redis), acking for N users 1 (one
//! MULTI/EXEC per user), inbox length 1 (ZCARD), a read 1 — plus, only when it skipped
//! expired or unreadable messages, one more per refill of the page and one to delete them.
//! Presence events: a page 1 (cluster: XRANGE + TIME per shard; see `events.rs`), a wait 1
//! blocking read (cluster: a page every [`events::POLL`]); leases, cursors: 1 each.
//! Channels: join 2 (1 when already a member or over the limit), leave 2 (3 when it was the
//! last member, 4 when a join came in between), membership, a user's channels 1, a page of
//! members or names 1 (one command per shard), the stats of N channels 1 (ZCARD + ZINTERCARD
//! per channel and shard). A pipeline that meets NOSCRIPT (Redis restarted, a failover to a
//! replica without the scripts, or SCRIPT FLUSH) loads its scripts and runs again: 2 more.
//!
//! Presence: attaching indexes the user as online in the user's shard three times, by name
//! (`online`, for listing), by id (`online:ids`, for the online counts of channels) and in
//! its server's set (`onsrv`, for the sweep after a crash), and appends an online event to the
//! shard's `events` stream, all in one pipeline after the attach script; detaching (only when
//! the route was still ours) undoes it and appends an offline event with the reason. Each
//! stream is capped with `MAXLEN ~` (its share of `events_max_len`) on every append. A
//! blocking read of a single Redis's stream (`events_wait`) runs on a connection of its own,
//! never on the shared one, where it would hold up every command behind it.
//!
//! Channels are a member set per channel and shard (sorted by user id, for paging; each piece
//! in the slot of its shard's online ids), a channel set per user (for the per-user limit and
//! "my channels"), and the list of channel names (per shard of the name). They live in three
//! hash slots, so a join or leave is ordered writes that a later join or leave repairs if
//! interrupted (see `channel_join` in `channels.rs`), not one script.
//!
//! An inbox is four keys under one hash tag (see [`crate::keys`]): the messages (hash), their
//! order (sorted set scored by seq), the senders waiting for a receipt (hash), and the seq
//! counter. Every store trims the inbox to `max_messages` and sets the first three to expire
//! after `max_age`; the counter never expires, so seqs are never reused. Messages older than
//! `max_age` (by `timestamp_ms`, which Lua cannot decode) are filtered here after a read and
//! deleted by a second script, only if they still hold the seq the read saw.

mod accounts;
mod batch;
mod broadcasts;
mod channels;
mod chat;
mod conn;
mod events;
mod inbox;
mod leases;
mod login;
mod routes;
mod scripts;
mod sessions;

use super::*;
use crate::{
    events::{reason, EventId, MessageEvent, PresenceEvent, PresenceKind},
    keys::{self, Keys},
};
use ::redis::{
    aio::MultiplexedConnection, AsyncCommands, AsyncConnectionConfig, Script, ScriptInvocation,
    Value,
};
use keys::CLUSTER_SHARDS;
use prost::Message as _;
use std::{collections::HashSet, sync::Arc};

use batch::Batch;
pub use conn::{Conn, RedisTarget, CLUSTER_SCHEME};
use scripts::*;

pub(super) use self::{
    events::{parse_event_id, presence_event},
    inbox::{ack_ids, oldest_kept_ms},
};
pub use inbox::{MAX_ACK_IDS, MAX_ACK_ID_LEN, MAX_INBOX_READ};

/// Oldest Redis cim runs on: the scripts use `ZMSCORE` (6.2), channel counts
/// `ZINTERCARD` (7.0) and broadcast claims `SET … NX GET` (7.0).
const MIN_REDIS_VERSION: (u64, u64) = (7, 0);

/// [`check_version`] of every node's text in an `INFO server` reply (a cluster answers one
/// per master).
fn check_versions(reply: &Value) -> StoreResult<()> {
    match reply {
        Value::BulkString(b) => check_version(&String::from_utf8_lossy(b)),
        Value::VerbatimString { text, .. } | Value::SimpleString(text) => check_version(text),
        Value::Map(nodes) => nodes.iter().try_for_each(|(_, v)| check_versions(v)),
        Value::Array(nodes) => nodes.iter().try_for_each(check_versions),
        _ => Ok(()),
    }
}

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

/// Redis-backed shared state.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    /// For the connection of blocking reads (a single Redis only: a cluster's presence
    /// streams are polled, see `events.rs`).
    client: Option<::redis::Client>,
    /// Deadline of every call (blocking reads: on top of their wait).
    timeout: Duration,
    keys: Keys,
    limits: InboxLimits,
    history: HistoryLimits,
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
    /// Connects to `url`: `redis://host:port/db` (one Redis) or `redis+cluster://host:port,…`
    /// (a Redis Cluster; see [`RedisTarget`]). Every command times out after `timeout`.
    pub async fn connect(url: &str, prefix: &str, timeout: Duration) -> StoreResult<Self> {
        let conn = Conn::connect(url, timeout).await?;
        let (client, shards) = match RedisTarget::parse(url).map_err(StoreError::Unavailable)? {
            RedisTarget::Single(url) => (
                Some(::redis::Client::open(url.as_str()).map_err(unavailable)?),
                1,
            ),
            RedisTarget::Cluster(_) => (None, CLUSTER_SHARDS),
        };
        let mut probe = conn.clone();
        let info: Value = tokio::time::timeout(
            timeout,
            ::redis::cmd("INFO").arg("server").query_async(&mut probe),
        )
        .await
        .map_err(|_| StoreError::Unavailable(format!("INFO on {url} timed out")))?
        .map_err(unavailable)?;
        check_versions(&info)?;
        // Every script loaded now: otherwise each one's first call answers NOSCRIPT and is
        // sent again, which for the inbox store means after the route lookup pipelined
        // behind it (the order the login replay relies on; see ARCHITECTURE.md).
        tokio::time::timeout(
            timeout,
            load_scripts(&mut probe, &ALL_SCRIPTS.map(|s| &**s)),
        )
        .await
        .map_err(|_| StoreError::Unavailable(format!("loading scripts on {url} timed out")))??;
        Ok(Self {
            conn,
            client,
            timeout,
            keys: Keys::with_shards(prefix, shards),
            limits: InboxLimits::default(),
            history: HistoryLimits::default(),
            events_max_len: DEFAULT_EVENTS_MAX_LEN,
            waiter: Arc::default(),
        })
    }

    /// Whether this store is on a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.conn.is_cluster()
    }

    /// A batch of commands for this deployment (see [`Batch`]).
    fn batch(&self) -> Batch {
        Batch::new(self.is_cluster())
    }

    /// Sets the bounds of every inbox (default: [`InboxLimits::default`]).
    #[must_use]
    pub fn with_inbox_limits(mut self, limits: InboxLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The retention of conversation logs (see [`HistoryLimits`]).
    pub fn with_history_limits(mut self, history: HistoryLimits) -> Self {
        self.history = history;
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

    fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// Runs a pipeline of script invocations in one round trip. Redis forgets scripts when
    /// it restarts (or on SCRIPT FLUSH; a replica promoted by a failover may never have
    /// loaded them): on NOSCRIPT, load `scripts` and run the whole pipeline once more. That
    /// is safe for every inbox script: storing and pruning are idempotent and reading changes
    /// nothing a second run depends on. An ack pipeline answered NOSCRIPT was not applied
    /// either, unless the script cache was flushed between two of its commands: then the
    /// acks before the flush are applied and their receipts (which the rerun no longer
    /// finds) are lost.
    pub(super) async fn run_scripts<T: ::redis::FromRedisValue>(
        &self,
        pipe: &::redis::Pipeline,
        scripts: &[&Script],
    ) -> StoreResult<T> {
        let mut c = self.conn();
        match pipe.query_async(&mut c).await {
            Err(e)
                if e.kind() == ::redis::ErrorKind::Server(::redis::ServerErrorKind::NoScript) =>
            {
                load_scripts(&mut c, scripts).await?;
                pipe.query_async(&mut c).await.map_err(unavailable)
            }
            result => result.map_err(unavailable),
        }
    }
}

/// Loads `scripts`: one pipeline on a single Redis; on a cluster one `SCRIPT LOAD` each,
/// which the cluster connection sends to every node (a pipeline of keyless commands would
/// go to one node only).
async fn load_scripts(c: &mut Conn, scripts: &[&Script]) -> StoreResult<()> {
    if c.is_cluster() {
        for script in scripts {
            script.load_async(c).await.map_err(unavailable)?;
        }
        return Ok(());
    }
    let mut load = ::redis::pipe();
    for script in scripts {
        load.load_script(script).ignore();
    }
    load.query_async::<()>(c).await.map_err(unavailable)
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
}
