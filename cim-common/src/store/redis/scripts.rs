//! The Lua scripts of the Redis store, one `.lua` file each (in `lua/`), compiled in with
//! `include_str!`. Each doc says its keys, arguments and answer; every script is loaded
//! when the store connects ([`ALL_SCRIPTS`]).

use ::redis::Script;
use std::sync::LazyLock;

/// Attach: KEYS = login slot, route; ARGV = session, attached slot value, route value.
pub(super) static ATTACH: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/attach.lua")));

/// Detach: KEYS = login slot, route; ARGV = attached slot value, route value.
/// Returns 1 when the route was ours and is gone.
pub(super) static DETACH: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/detach.lua")));

/// Compare-and-delete: KEYS = key; ARGV = expected value.
pub(super) static DEL_IF_EQ: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/del_if_eq.lua")));

/// Compare-and-set with expiry: KEYS = key; ARGV = expected, new value, ttl ms.
pub(super) static SET_IF_EQ: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/set_if_eq.lua")));

/// Release a slot held by a session (pending or attached). KEYS = slot; ARGV = session.
/// Returns the old value when deleted, nil otherwise.
pub(super) static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/release.lua")));

/// Give a slot held by a session (pending or attached) to another, pending. KEYS = slot;
/// ARGV = held session, new session, ttl ms. Returns 1 when it did.
pub(super) static TAKE_OVER: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/take_over.lua")));

/// Next login generation. KEYS = generation; ARGV = keep ms. Returns the new generation.
pub(super) static NEXT_GENERATION: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/next_generation.lua")));

/// Take or renew a lease. KEYS = lease; ARGV = owner, ttl ms. Returns 1 while `owner` holds it.
pub(super) static LEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/lease.lua")));

/// The user's half of joining a channel, atomic so that concurrent joins cannot pass the
/// limit together. KEYS = the user's channel set; ARGV = channel, max channels. Returns 1
/// when the channel was listed already, 2 when added now, 0 when the user is at the limit
/// (nothing added).
pub(super) static JOIN_INDEX: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/join_index.lua")));

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
///
/// Costs are per `redis.call` (measured: the call overhead exceeds the commands'), so one
/// call's messages share one ZMSCORE (which are stored already), one HSET, one INCRBY and
/// one ZADD, however many they are.
pub(super) static INBOX_STORE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/inbox_store.lua")));

/// A page of an inbox. KEYS = inbox hash, order, receipts; ARGV = after seq, limit.
/// Returns `{id, seq, message}` per entry in seq order; `message` is nil (and the entry
/// removed) when the hash has no value for it.
pub(super) static INBOX_READ: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/inbox_read.lua")));

/// Drops messages a read found expired or unreadable, each only if it still has the seq
/// the read saw (it may have been acked and stored again since). No receipt is sent for
/// them. KEYS = inbox hash, order, receipts; ARGV = id, seq, id, seq, ...
pub(super) static INBOX_PRUNE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/inbox_prune.lua")));

/// A conversation script: `lua/conv_lib.lua` (the log's shared functions) and its body.
macro_rules! conv_script {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("lua/conv_lib.lua"),
                include_str!(concat!("lua/", $file))
            ))
        })
    };
}

/// Append private or group messages to their conversation's log; see the script for its
/// keys, arguments and answer (4 values per message).
pub(super) static CONV_APPEND: LazyLock<Script> = conv_script!("conv_append.lua");

/// A group change and its event, atomically; see the script.
pub(super) static GROUP_CHANGE: LazyLock<Script> = conv_script!("group_change.lua");

/// A page of a conversation's log (with the membership check of a group's reader).
pub(super) static CONV_READ: LazyLock<Script> = conv_script!("conv_read.lua");

/// Move a read mark forward. KEYS = meta, marks' hash, members; ARGV = field, seq, kind, user.
pub(super) static MARK_READ: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/mark_read.lua")));

/// Move group positions forward. KEYS = the user's groups; ARGV = group, seq pairs.
pub(super) static GROUP_ACK: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/group_ack.lua")));

/// List a group in a user's groups within the limit. KEYS = the user's groups; ARGV =
/// group, max groups. Returns 1 listed already, 2 listed now, 0 at the limit.
pub(super) static GROUP_RESERVE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/group_reserve.lua")));

/// Publish a message event once per (message, receiver); see the script.
pub(super) static PUBLISH_ONCE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/publish_once.lua")));

/// Every script, loaded at connect.
pub(super) static ALL_SCRIPTS: [&LazyLock<Script>; 19] = [
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
    &CONV_APPEND,
    &GROUP_CHANGE,
    &CONV_READ,
    &MARK_READ,
    &GROUP_ACK,
    &GROUP_RESERVE,
    &PUBLISH_ONCE,
];
