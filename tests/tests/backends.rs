//! The backends of cim-common, held to one behaviour.
//!
//! Each behavioural test of the state store is written once, as an async fn over a
//! [`StoreUnderTest`] (a `dyn StateStore` plus a way to look inside), and run twice by
//! [`for_each_store!`]: against `RedisStore` on a real `redis-server` started by the testkit
//! (`<test>::redis`) and against the in-memory `MemoryStore` of standalone mode
//! (`<test>::memory`). The registry tests do the same with [`RegistryUnderTest`] for
//! `EtcdRegistry` on a real `etcd` and `MemoryRegistry`. What only a real process can show
//! (an outage, a restart, lease expiry, keys of other prefixes) is tested on it alone, below
//! the shared suites. Each test has its own processes and its own key prefix.

use cim_common::{
    events::{reason, EventId, PresenceEvent, PresenceKind, StoredEvent},
    keys::{self, Keys},
    pb::{Message, MessageKind},
    registry::{
        self, EtcdRegistry, Members, MembersRx, MemoryRegistry, Registry, ServiceInfo, ServiceKind,
    },
    store::{
        AckedReceipt, AttachOutcome, ChannelInfo, ClaimOutcome, InboxLimits, JoinOutcome,
        MemoryStore, RedisStore, RouteEntry, StateStore, StoreError, MAX_CHANNEL_PAGE,
        MAX_CHANNEL_STATS, MAX_EVENTS_READ,
    },
    time::now_ms,
};
use cim_tests::{unique_prefix, wait_until, Etcd, Infra, Redis, RedisOptions};
use redis::AsyncCommands as _;
use std::{collections::BTreeMap, ops::Deref, sync::Arc, time::Duration};

const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Pending-slot TTL of the normal tests: long enough never to expire by accident.
const LONG_TTL: Duration = Duration::from_secs(60);
const DEADLINE: Duration = Duration::from_secs(10);

fn nobody_live(_: &str) -> bool {
    false
}

fn everyone_live(_: &str) -> bool {
    true
}

fn route(user_id: u64, server: &str, session: &str) -> RouteEntry {
    RouteEntry {
        user_id,
        server_id: server.to_string(),
        session: session.to_string(),
    }
}

// =============================================================================================
// The state store under test

/// How to look at what a store holds, beside its API.
enum Peek {
    /// Raw commands on the Redis server (which the struct keeps running).
    Redis { redis: Redis, keys: Keys },
    /// The memory store's inspection methods.
    Memory(Arc<MemoryStore>),
}

/// One implementation of [`StateStore`], fresh and empty, with a window into it. Derefs to
/// the store, so tests call `s.claim_login(..)`.
struct StoreUnderTest {
    store: Arc<dyn StateStore>,
    peek: Peek,
}

impl Deref for StoreUnderTest {
    type Target = dyn StateStore;

    fn deref(&self) -> &Self::Target {
        self.store.as_ref()
    }
}

impl StoreUnderTest {
    /// A `RedisStore` on its own `redis-server`, under a fresh prefix.
    async fn redis() -> anyhow::Result<Self> {
        let redis = Redis::start().await?;
        let prefix = unique_prefix();
        let store = RedisStore::connect(&redis.url(), &prefix, CALL_TIMEOUT).await?;
        Ok(Self {
            store: Arc::new(store),
            peek: Peek::Redis {
                redis,
                keys: Keys::new(prefix),
            },
        })
    }

    fn memory() -> Self {
        let store = Arc::new(MemoryStore::new());
        Self {
            store: store.clone(),
            peek: Peek::Memory(store),
        }
    }

    /// Another, empty store of the same kind (on the same Redis, under another prefix).
    async fn another(&self) -> anyhow::Result<Arc<dyn StateStore>> {
        Ok(match &self.peek {
            Peek::Redis { redis, .. } => {
                Arc::new(RedisStore::connect(&redis.url(), &unique_prefix(), CALL_TIMEOUT).await?)
            }
            Peek::Memory(_) => Arc::new(MemoryStore::new()),
        })
    }

    /// Another, empty store of the same kind with these inbox limits.
    async fn with_inbox_limits(&self, limits: InboxLimits) -> anyhow::Result<Arc<dyn StateStore>> {
        Ok(match &self.peek {
            Peek::Redis { redis, .. } => Arc::new(
                RedisStore::connect(&redis.url(), &unique_prefix(), CALL_TIMEOUT)
                    .await?
                    .with_inbox_limits(limits),
            ),
            Peek::Memory(_) => Arc::new(MemoryStore::new().with_inbox_limits(limits)),
        })
    }

    /// Another, empty store of the same kind keeping `max_len` presence events.
    async fn with_events_max_len(&self, max_len: usize) -> anyhow::Result<Arc<dyn StateStore>> {
        Ok(match &self.peek {
            Peek::Redis { redis, .. } => Arc::new(
                RedisStore::connect(&redis.url(), &unique_prefix(), CALL_TIMEOUT)
                    .await?
                    .with_events_max_len(max_len),
            ),
            Peek::Memory(_) => Arc::new(MemoryStore::new().with_events_max_len(max_len)),
        })
    }

    fn is_redis(&self) -> bool {
        matches!(self.peek, Peek::Redis { .. })
    }

    /// Returns once a blocking read of the event stream is waiting in Redis (`INFO clients`
    /// counts it); at once for the memory store, whose waiters cannot be observed (an event
    /// published before the wait starts is found by its first look: the test holds either way).
    async fn wait_for_blocked_reader(&self) -> anyhow::Result<()> {
        let Peek::Redis { redis, .. } = &self.peek else {
            return Ok(());
        };
        let c = redis.connection().await?;
        wait_until("a blocking read to wait in Redis", DEADLINE, || {
            let mut c = c.clone();
            async move {
                let info: String = redis::cmd("INFO")
                    .arg("clients")
                    .query_async(&mut c)
                    .await
                    .expect("INFO");
                info.lines()
                    .filter_map(|l| l.strip_prefix("blocked_clients:"))
                    .any(|n| n.trim().parse::<u64>().is_ok_and(|n| n > 0))
            }
        })
        .await
    }

    /// The raw login slot of `user` (`{session}` or `{session}@{server}`).
    async fn slot(&self, user: u64) -> Option<String> {
        match &self.peek {
            Peek::Redis { redis, keys } => {
                let mut c = redis.connection().await.expect("redis connection");
                c.get(keys.login(user)).await.expect("GET")
            }
            Peek::Memory(m) => m.login_slot(user).map(|(value, _)| value),
        }
    }

    /// Time to live of `user`'s slot, in whole milliseconds: `None` without expiry. Panics
    /// when there is no slot.
    async fn slot_ttl_ms(&self, user: u64) -> Option<u64> {
        match &self.peek {
            Peek::Redis { redis, keys } => {
                let mut c = redis.connection().await.expect("redis connection");
                let pttl: i64 = redis::cmd("PTTL")
                    .arg(keys.login(user))
                    .query_async(&mut c)
                    .await
                    .expect("PTTL");
                assert_ne!(pttl, -2, "user {user} has no slot");
                u64::try_from(pttl).ok()
            }
            Peek::Memory(m) => {
                let (_, ttl) = m
                    .login_slot(user)
                    .unwrap_or_else(|| panic!("user {user} has no slot"));
                ttl.map(|t| t.as_millis() as u64)
            }
        }
    }

    /// The online index, in order.
    async fn online(&self) -> Vec<String> {
        match &self.peek {
            Peek::Redis { redis, keys } => {
                let mut c = redis.connection().await.expect("redis connection");
                c.zrange(keys.online(), 0, -1).await.expect("ZRANGE")
            }
            Peek::Memory(m) => m.online_members(),
        }
    }

    /// Claims and attaches `session` of `user` on `server` (asserting both succeed).
    async fn connect_user(&self, user: u64, name: &str, session: &str, server: &str) {
        assert_eq!(
            self.claim_login(user, session, LONG_TTL, &nobody_live)
                .await
                .unwrap(),
            ClaimOutcome::Claimed,
            "claim of user {user}"
        );
        assert_eq!(
            self.attach(user, name, session, server).await.unwrap(),
            AttachOutcome::Attached,
            "attach of user {user}"
        );
    }
}

/// Runs each named `async fn(&StoreUnderTest) -> anyhow::Result<()>` as two tests,
/// `<name>::redis` and `<name>::memory`. Multi-threaded, so concurrent calls really overlap.
macro_rules! for_each_store {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() -> anyhow::Result<()> {
                super::$name(&super::StoreUnderTest::redis().await?).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() -> anyhow::Result<()> {
                super::$name(&super::StoreUnderTest::memory()).await
            }
        }
    )*};
}

for_each_store!(
    create_user_and_look_up,
    concurrent_create_of_one_name_has_one_winner,
    claim_pending_is_taken_over_or_expires,
    claim_of_attached_slot_depends_on_server_liveness,
    concurrent_claims_have_one_winner,
    take_over_replaces_only_the_named_session,
    generations_count_per_user_and_restart_after_keep,
    attach_is_single_use,
    detach_removes_only_its_own_route_and_slot,
    late_detach_of_an_old_session_keeps_the_new_one,
    release_login_frees_the_slot_and_returns_the_server,
    routes_returns_one_entry_per_id_in_order,
    scan_routes_visits_every_route_exactly_once,
    scan_routes_reaches_every_route_present_throughout,
    remove_stale_route_removes_only_an_unchanged_route,
    online_page_filters_by_prefix_and_pages_by_cursor,
    inbox_store_assigns_increasing_seqs_in_order,
    inbox_store_is_idempotent_by_receiver_and_id,
    concurrent_stores_of_one_message_store_it_once,
    inbox_read_pages_by_seq_and_limit,
    inbox_top_is_the_last_seq_given_even_once_acked,
    inbox_store_then_routes_stores_then_looks_up,
    inbox_keeps_the_newest_max_messages,
    inbox_read_skips_and_removes_expired_messages,
    inbox_ack_removes_messages_once,
    inbox_ack_returns_each_receipt_once,
    receipt_requests_stay_pending_until_done,
    inbox_ack_ignores_oversized_input,
    inboxes_of_users_are_separate,
    attach_and_detach_publish_presence_events,
    remove_stale_route_publishes_server_lost,
    events_after_pages_from_an_exclusive_start,
    events_wait_returns_new_events_or_nothing_after_its_timeout,
    event_stream_is_capped_near_events_max_len,
    leases_are_held_renewed_and_expire,
    broadcast_claims_answer_repeats_until_released_or_expired,
    cursors_are_stored_by_name,
    channel_join_leave_and_membership,
    channel_join_respects_the_per_user_limit,
    channel_members_page_by_user_id,
    channel_list_pages_by_name_and_drops_empty_channels,
    channel_stats_count_members_and_online,
);

// ---------------------------------------------------------------------------------------------
// Accounts

async fn create_user_and_look_up(s: &StoreUnderTest) -> anyhow::Result<()> {
    // Ids count from 1; a refused duplicate uses one up (INCR comes first in Redis).
    assert_eq!(s.create_user("alice", "hash-a").await?, Some(1));
    assert_eq!(s.create_user("bob", "hash-b").await?, Some(2));
    assert_eq!(s.create_user("alice", "other").await?, None);
    assert_eq!(s.create_user("carol", "hash-c").await?, Some(4));
    let (alice, bob) = (1, 2);

    let rec = s.user_by_name("alice").await?.expect("alice record");
    assert_eq!(
        (rec.id, rec.name.as_str(), rec.password_hash.as_str()),
        (alice, "alice", "hash-a"),
        "the duplicate must not overwrite the first account"
    );
    assert_eq!(s.user_by_name("nobody").await?, None);
    assert_eq!(s.user_by_name("Alice").await?, None, "names are exact");
    assert_eq!(s.user_name(alice).await?.as_deref(), Some("alice"));
    assert_eq!(s.user_name(bob).await?.as_deref(), Some("bob"));
    assert_eq!(s.user_name(3).await?, None, "the refused duplicate's id");
    assert_eq!(s.user_name(999_999).await?, None);
    Ok(())
}

async fn concurrent_create_of_one_name_has_one_winner(s: &StoreUnderTest) -> anyhow::Result<()> {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let store = s.store.clone();
        set.spawn(async move { store.create_user("carol", &format!("pw{i}")).await });
    }
    let mut winners = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Some(id) = r?? {
            winners.push(id);
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let rec = s.user_by_name("carol").await?.unwrap();
    assert_eq!(rec.id, winners[0]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Login slots

async fn claim_pending_is_taken_over_or_expires(s: &StoreUnderTest) -> anyhow::Result<()> {
    let ttl = Duration::from_millis(300);

    assert_eq!(
        s.claim_login(7, "s1", ttl, &everyone_live).await?,
        ClaimOutcome::Claimed
    );
    assert_eq!(s.slot(7).await.as_deref(), Some("s1"));
    let left = s.slot_ttl_ms(7).await.expect("a pending slot expires");
    assert!(left > 0 && left <= 300, "PTTL {left}");
    // Pending (logged in, never connected): a new login takes it over at once, whoever is
    // live; the old session can no longer attach or release it.
    assert_eq!(
        s.claim_login(7, "s2", LONG_TTL, &everyone_live).await?,
        ClaimOutcome::Claimed
    );
    assert!(!s.session_active(7, "s1").await?);
    assert!(s.session_active(7, "s2").await?);
    let left = s.slot_ttl_ms(7).await.expect("still pending");
    assert!(left > 300, "the new login's TTL, PTTL {left}");
    assert_eq!(
        s.attach(7, "u7", "s1", "srv-a").await?,
        AttachOutcome::SessionInvalid
    );
    assert_eq!(s.release_login(7, "s1").await?, None);
    // Once attached to a live server, the slot holds.
    assert_eq!(
        s.attach(7, "u7", "s2", "srv-a").await?,
        AttachOutcome::Attached
    );
    assert_eq!(
        s.claim_login(7, "s3", ttl, &everyone_live).await?,
        ClaimOutcome::Held {
            session: "s2".into(),
            server: "srv-a".into()
        }
    );
    // Another user's slot is independent.
    assert_eq!(
        s.claim_login(8, "s2", ttl, &nobody_live).await?,
        ClaimOutcome::Claimed
    );

    // A pending slot nobody takes over expires by itself.
    wait_until("the pending slot to expire", DEADLINE, || async {
        !s.session_active(8, "s2").await.unwrap()
    })
    .await?;
    assert_eq!(s.slot(8).await, None);
    // An expired pending session cannot attach any more.
    assert_eq!(
        s.attach(8, "u8", "s2", "srv-a").await?,
        AttachOutcome::SessionInvalid
    );
    Ok(())
}

async fn claim_of_attached_slot_depends_on_server_liveness(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    let ttl = Duration::from_millis(300);

    assert_eq!(
        s.claim_login(1, "s1", ttl, &nobody_live).await?,
        ClaimOutcome::Claimed
    );
    assert_eq!(
        s.attach(1, "dora", "s1", "srv-a").await?,
        AttachOutcome::Attached
    );
    assert_eq!(
        s.slot_ttl_ms(1).await,
        None,
        "an attached slot must have no expiry"
    );

    let only_a = |server: &str| server == "srv-a";
    assert_eq!(
        s.claim_login(1, "s2", ttl, &only_a).await?,
        ClaimOutcome::Held {
            session: "s1".into(),
            server: "srv-a".into()
        }
    );
    assert!(s.session_active(1, "s1").await?);

    // srv-a died: the slot is taken over by the new session, pending again.
    assert_eq!(
        s.claim_login(1, "s2", ttl, &nobody_live).await?,
        ClaimOutcome::Claimed
    );
    assert!(!s.session_active(1, "s1").await?);
    assert!(s.session_active(1, "s2").await?);
    let pttl = s.slot_ttl_ms(1).await;
    assert!(
        pttl.is_some_and(|ms| ms > 0 && ms <= 300),
        "a taken-over slot is pending with the new TTL, got PTTL {pttl:?}"
    );
    // The old session can neither attach again nor release the new one.
    assert_eq!(
        s.attach(1, "dora", "s1", "srv-a").await?,
        AttachOutcome::SessionInvalid
    );
    assert_eq!(s.release_login(1, "s1").await?, None);
    assert!(s.session_active(1, "s2").await?);
    Ok(())
}

async fn concurrent_claims_have_one_winner(s: &StoreUnderTest) -> anyhow::Result<()> {
    // Concurrent logins of one user, each then connecting: a pending slot is taken over by
    // the next login, so several claims may succeed, but one session holds the slot and only
    // that one can attach; afterwards the slot holds against everyone.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let store = s.store.clone();
        set.spawn(async move {
            let session = format!("s{i}");
            let out = store
                .claim_login(3, &session, LONG_TTL, &everyone_live)
                .await;
            (session, out)
        });
    }
    let mut claimed = Vec::new();
    while let Some(r) = set.join_next().await {
        let (session, out) = r?;
        match out? {
            ClaimOutcome::Claimed => claimed.push(session),
            other => assert_eq!(other, ClaimOutcome::Contended),
        }
    }
    assert!(!claimed.is_empty());
    let mut active = Vec::new();
    for session in &claimed {
        if s.session_active(3, session).await? {
            active.push(session.clone());
        }
    }
    assert_eq!(active.len(), 1, "one session holds the slot: {active:?}");
    let mut attached = 0;
    for session in &claimed {
        if s.attach(3, "u3", session, "srv-a").await? == AttachOutcome::Attached {
            attached += 1;
        }
    }
    assert_eq!(attached, 1, "exactly one of {claimed:?} attaches");
    assert!(matches!(
        s.claim_login(3, "late", LONG_TTL, &everyone_live).await?,
        ClaimOutcome::Held { .. }
    ));
    Ok(())
}

async fn generations_count_per_user_and_restart_after_keep(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    assert_eq!(s.generation(5).await?, 0);
    assert_eq!(s.next_generation(5, LONG_TTL).await?, 1);
    assert_eq!(s.next_generation(5, LONG_TTL).await?, 2);
    assert_eq!(s.generation(5).await?, 2);
    // Per user, and forgotten `keep` after the last change.
    assert_eq!(s.generation(6).await?, 0);
    assert_eq!(s.next_generation(6, Duration::from_millis(200)).await?, 1);
    wait_until("the generation to expire", DEADLINE, || async {
        s.generation(6).await.unwrap() == 0
    })
    .await?;
    assert_eq!(s.next_generation(6, LONG_TTL).await?, 1);
    assert_eq!(s.generation(5).await?, 2);
    Ok(())
}

async fn take_over_replaces_only_the_named_session(s: &StoreUnderTest) -> anyhow::Result<()> {
    let ttl = Duration::from_millis(300);
    // Nothing to take over.
    assert!(!s.take_over_login(4, "s1", "s2", LONG_TTL).await?);
    assert_eq!(s.slot(4).await, None);
    s.claim_login(4, "s1", LONG_TTL, &nobody_live).await?;
    assert_eq!(
        s.attach(4, "u4", "s1", "srv-a").await?,
        AttachOutcome::Attached
    );
    // A session that does not hold the slot takes nothing, not even one whose id merely
    // starts like the holder's.
    assert!(!s.take_over_login(4, "s", "s2", LONG_TTL).await?);
    assert!(!s.take_over_login(4, "s9", "s2", LONG_TTL).await?);
    assert!(s.session_active(4, "s1").await?);
    // The holder's session (attached): replaced by a pending one with the new TTL.
    assert!(s.take_over_login(4, "s1", "s2", ttl).await?);
    assert!(!s.session_active(4, "s1").await?);
    assert!(s.session_active(4, "s2").await?);
    let pttl = s.slot_ttl_ms(4).await;
    assert!(
        pttl.is_some_and(|ms| ms > 0 && ms <= 300),
        "pending with the new TTL, got PTTL {pttl:?}"
    );
    // The old session can neither attach nor release; the new one attaches.
    assert_eq!(
        s.attach(4, "u4", "s1", "srv-a").await?,
        AttachOutcome::SessionInvalid
    );
    assert_eq!(s.release_login(4, "s1").await?, None);
    // A pending holder can be taken over too, then the new session attaches.
    assert!(s.take_over_login(4, "s2", "s3", LONG_TTL).await?);
    assert_eq!(
        s.attach(4, "u4", "s3", "srv-b").await?,
        AttachOutcome::Attached
    );
    assert_eq!(
        s.claim_login(4, "late", LONG_TTL, &everyone_live).await?,
        ClaimOutcome::Held {
            session: "s3".into(),
            server: "srv-b".into()
        }
    );
    Ok(())
}

async fn attach_is_single_use(s: &StoreUnderTest) -> anyhow::Result<()> {
    // Never claimed.
    assert_eq!(
        s.attach(2, "erin", "s1", "srv-a").await?,
        AttachOutcome::SessionInvalid
    );
    assert_eq!(s.routes(&[2]).await?, vec![None]);

    s.claim_login(1, "s1", LONG_TTL, &nobody_live).await?;
    // Another session than the pending one.
    assert_eq!(
        s.attach(1, "dora", "s-other", "srv-a").await?,
        AttachOutcome::SessionInvalid
    );
    assert_eq!(
        s.attach(1, "dora", "s1", "srv-a").await?,
        AttachOutcome::Attached
    );
    assert_eq!(s.slot(1).await.as_deref(), Some("s1@srv-a"));
    // The same token again, on the same or on another server.
    assert_eq!(
        s.attach(1, "dora", "s1", "srv-a").await?,
        AttachOutcome::SessionInvalid
    );
    assert_eq!(
        s.attach(1, "dora", "s1", "srv-b").await?,
        AttachOutcome::SessionInvalid
    );
    assert_eq!(s.routes(&[1]).await?, vec![Some(route(1, "srv-a", "s1"))]);
    assert!(s.session_active(1, "s1").await?);
    assert_eq!(s.online().await, vec![keys::online_member("dora", 1)]);
    Ok(())
}

async fn detach_removes_only_its_own_route_and_slot(s: &StoreUnderTest) -> anyhow::Result<()> {
    s.connect_user(1, "dora", "s1", "srv-a").await;

    // Wrong session, wrong server: nothing changes.
    s.detach(1, "dora", "s-other", "srv-a", "closed").await?;
    s.detach(1, "dora", "s1", "srv-b", "closed").await?;
    assert_eq!(s.routes(&[1]).await?, vec![Some(route(1, "srv-a", "s1"))]);
    assert!(s.session_active(1, "s1").await?);
    assert_eq!(s.online().await.len(), 1);

    s.detach(1, "dora", "s1", "srv-a", "closed").await?;
    assert_eq!(s.routes(&[1]).await?, vec![None]);
    assert!(!s.session_active(1, "s1").await?);
    assert!(s.online().await.is_empty());
    assert_eq!(s.slot(1).await, None);
    // Detaching twice is harmless.
    s.detach(1, "dora", "s1", "srv-a", "closed").await?;
    Ok(())
}

async fn late_detach_of_an_old_session_keeps_the_new_one(s: &StoreUnderTest) -> anyhow::Result<()> {
    s.connect_user(1, "dora", "s1", "srv-a").await;

    // srv-a is declared dead; the user logs in again and lands on srv-b.
    assert_eq!(
        s.claim_login(1, "s2", LONG_TTL, &nobody_live).await?,
        ClaimOutcome::Claimed
    );
    assert_eq!(
        s.attach(1, "dora", "s2", "srv-b").await?,
        AttachOutcome::Attached
    );
    // srv-a wakes up and cleans up its old connection.
    s.detach(1, "dora", "s1", "srv-a", "closed").await?;
    assert_eq!(s.routes(&[1]).await?, vec![Some(route(1, "srv-b", "s2"))]);
    assert_eq!(s.slot(1).await.as_deref(), Some("s2@srv-b"));
    assert_eq!(
        s.online().await,
        vec![keys::online_member("dora", 1)],
        "the user is still online"
    );

    // Reconnect on the same server with a new session: same story.
    s.release_login(1, "s2").await?;
    s.connect_user(1, "dora", "s3", "srv-b").await;
    s.detach(1, "dora", "s2", "srv-b", "closed").await?;
    assert_eq!(s.routes(&[1]).await?, vec![Some(route(1, "srv-b", "s3"))]);
    assert_eq!(s.online().await.len(), 1);
    Ok(())
}

async fn release_login_frees_the_slot_and_returns_the_server(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    // Pending: freed, no server.
    s.claim_login(1, "ab", LONG_TTL, &nobody_live).await?;
    assert_eq!(s.release_login(1, "other").await?, None);
    assert!(s.session_active(1, "ab").await?);
    assert_eq!(s.release_login(1, "ab").await?, None);
    assert!(!s.session_active(1, "ab").await?);
    assert_eq!(s.slot(1).await, None);

    // Attached: freed, returns the server.
    s.connect_user(1, "dora", "abc", "srv-a").await;
    // A session id that is a prefix of the holder's must not match.
    assert_eq!(s.release_login(1, "ab").await?, None);
    assert!(s.session_active(1, "abc").await?);
    assert_eq!(s.release_login(1, "abc").await?.as_deref(), Some("srv-a"));
    assert!(!s.session_active(1, "abc").await?);
    // Released twice: nothing more.
    assert_eq!(s.release_login(1, "abc").await?, None);
    // Free for a new login.
    assert_eq!(
        s.claim_login(1, "s9", LONG_TTL, &everyone_live).await?,
        ClaimOutcome::Claimed
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Routes

async fn routes_returns_one_entry_per_id_in_order(s: &StoreUnderTest) -> anyhow::Result<()> {
    s.connect_user(10, "u10", "s10", "srv-a").await;
    s.connect_user(20, "u20", "s20", "srv-b").await;

    assert_eq!(s.routes(&[]).await?, vec![]);
    assert_eq!(
        s.routes(&[10]).await?,
        vec![Some(route(10, "srv-a", "s10"))]
    );
    assert_eq!(s.routes(&[11]).await?, vec![None]);
    assert_eq!(
        s.routes(&[20, 11, 10, 20, 12]).await?,
        vec![
            Some(route(20, "srv-b", "s20")),
            None,
            Some(route(10, "srv-a", "s10")),
            Some(route(20, "srv-b", "s20")),
            None,
        ]
    );
    // 1000 ids in one call (one MGET).
    let ids: Vec<u64> = (0..1000).collect();
    let got = s.routes(&ids).await?;
    assert_eq!(got.len(), 1000);
    assert_eq!(got.iter().flatten().count(), 2);
    assert_eq!(got[10], Some(route(10, "srv-a", "s10")));
    Ok(())
}

/// Every route of a full scan, checking that none comes twice.
async fn scan_all(
    store: &dyn StateStore,
    count: usize,
) -> anyhow::Result<(Vec<RouteEntry>, usize)> {
    let mut seen: BTreeMap<u64, RouteEntry> = BTreeMap::new();
    let mut cursor = 0;
    let mut steps = 0;
    loop {
        let (next, batch) = store.scan_routes(cursor, count).await?;
        steps += 1;
        assert!(steps < 10_000, "scan does not terminate");
        for e in batch {
            let id = e.user_id;
            if let Some(before) = seen.insert(id, e) {
                panic!("route of user {id} returned twice, first as {before:?}");
            }
        }
        if next == 0 {
            return Ok((seen.into_values().collect(), steps));
        }
        cursor = next;
    }
}

async fn scan_routes_visits_every_route_exactly_once(s: &StoreUnderTest) -> anyhow::Result<()> {
    const N: u64 = 600;
    // User 0 too: a cursor of 0 means "start", never "resume at user 0".
    for id in 0..N {
        let server = format!("srv-{}", id % 7);
        s.connect_user(id, &format!("u{id}"), &format!("s{id}"), &server)
            .await;
    }
    // Logged in but not connected: a slot, no route.
    s.claim_login(N, "pending", LONG_TTL, &nobody_live).await?;

    let (all, steps) = scan_all(&**s, 50).await?;
    assert!(steps > 1, "expected batches, got one step");
    assert!(all.iter().map(|e| e.user_id).eq(0..N), "missing routes");
    for e in &all {
        assert_eq!(
            (e.server_id.clone(), e.session.clone()),
            (format!("srv-{}", e.user_id % 7), format!("s{}", e.user_id)),
        );
    }

    // An empty store scans to nothing.
    let (none, _) = scan_all(&*s.another().await?, 1000).await?;
    assert!(none.is_empty());
    Ok(())
}

async fn scan_routes_reaches_every_route_present_throughout(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    // Users 1..=300 connected; while a scan runs, the odd ones leave and 301..=400 arrive.
    for id in 1..=300 {
        s.connect_user(id, &format!("u{id}"), &format!("s{id}"), "srv-a")
            .await;
    }
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    let mut cursor = 0;
    let mut step = 0;
    loop {
        let (next, batch) = s.scan_routes(cursor, 40).await?;
        for e in batch {
            *seen.entry(e.user_id).or_default() += 1;
        }
        if step == 1 {
            for id in (1..=300).filter(|id| id % 2 == 1) {
                s.detach(id, &format!("u{id}"), &format!("s{id}"), "srv-a", "closed")
                    .await?;
            }
            for id in 301..=400 {
                s.connect_user(id, &format!("u{id}"), &format!("s{id}"), "srv-b")
                    .await;
            }
        }
        step += 1;
        assert!(step < 10_000, "scan does not terminate");
        if next == 0 {
            break;
        }
        cursor = next;
    }
    // SCAN's guarantee, which fan-outs rely on: whoever is online throughout is reached.
    // (Redis may repeat a key while its table resizes, so repeats are not checked here.)
    for id in (2..=300).step_by(2) {
        assert!(seen.contains_key(&id), "user {id} was online throughout");
    }
    assert!(
        seen.keys().all(|id| (1..=400).contains(id)),
        "only routes that existed: {seen:?}"
    );
    Ok(())
}

async fn remove_stale_route_removes_only_an_unchanged_route(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    let id = s.create_user("dora", "pw").await?.unwrap();
    s.connect_user(id, "dora", "s1", "srv-a").await;

    // Not the current route: no effect.
    s.remove_stale_route(&route(id, "srv-a", "s0")).await?;
    s.remove_stale_route(&route(id, "srv-b", "s1")).await?;
    assert_eq!(s.routes(&[id]).await?, vec![Some(route(id, "srv-a", "s1"))]);
    assert_eq!(s.online().await.len(), 1);

    // Read as stale, but the user reconnected meanwhile: the new route stays.
    let stale = s.routes(&[id]).await?[0].clone().unwrap();
    assert_eq!(
        s.claim_login(id, "s2", LONG_TTL, &nobody_live).await?,
        ClaimOutcome::Claimed
    );
    s.attach(id, "dora", "s2", "srv-b").await?;
    s.remove_stale_route(&stale).await?;
    assert_eq!(s.routes(&[id]).await?, vec![Some(route(id, "srv-b", "s2"))]);
    assert_eq!(s.online().await, vec![keys::online_member("dora", id)]);

    // Unchanged: removed, with its online entry.
    s.remove_stale_route(&route(id, "srv-b", "s2")).await?;
    assert_eq!(s.routes(&[id]).await?, vec![None]);
    assert!(s.online().await.is_empty());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Online index

async fn online_page_filters_by_prefix_and_pages_by_cursor(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    let names = [
        "bob", "al", "alice", "albert", "bobby", "carol", "alfred", "zoë", "Alan",
    ];
    for (i, name) in names.iter().enumerate() {
        let id = 100 + i as u64;
        s.connect_user(id, name, &format!("s{id}"), "srv-a").await;
    }
    let page_names = |page: &[cim_common::store::OnlineEntry]| {
        page.iter().map(|e| e.name.clone()).collect::<Vec<_>>()
    };

    // Everyone, in byte order of names.
    let all = s.online_page("", None, 100).await?;
    assert_eq!(
        page_names(&all),
        ["Alan", "al", "albert", "alfred", "alice", "bob", "bobby", "carol", "zoë"]
    );
    for e in &all {
        let i = names.iter().position(|n| *n == e.name).unwrap();
        assert_eq!(e.user_id, 100 + i as u64);
        assert_eq!(e.cursor, keys::online_member(&e.name, e.user_id));
    }

    // Prefix "al", two at a time.
    let p1 = s.online_page("al", None, 2).await?;
    assert_eq!(page_names(&p1), ["al", "albert"]);
    let p2 = s
        .online_page("al", Some(&p1.last().unwrap().cursor), 2)
        .await?;
    assert_eq!(page_names(&p2), ["alfred", "alice"]);
    let p3 = s
        .online_page("al", Some(&p2.last().unwrap().cursor), 2)
        .await?;
    assert!(p3.is_empty(), "got {:?}", page_names(&p3));

    // A cursor before the prefix range starts at the prefix; one after it ends the listing.
    let bob = s.online_page("bob", Some(&all[0].cursor), 10).await?;
    assert_eq!(page_names(&bob), ["bob", "bobby"]);
    let after_bob = s.online_page("bob", Some(&bob[0].cursor), 10).await?;
    assert_eq!(page_names(&after_bob), ["bobby"]);
    let past = s.online_page("al", Some(&bob[0].cursor), 10).await?;
    assert!(past.is_empty());

    // A cursor that is no member: strictly after it, in byte order.
    assert_eq!(
        page_names(&s.online_page("", Some("b"), 100).await?),
        ["bob", "bobby", "carol", "zoë"]
    );
    assert_eq!(
        page_names(&s.online_page("al", Some("alf"), 10).await?),
        ["alfred", "alice"]
    );

    // Multi-byte prefix, no match, limit 0.
    assert_eq!(page_names(&s.online_page("zo", None, 10).await?), ["zoë"]);
    assert!(s.online_page("zz", None, 10).await?.is_empty());
    assert!(s.online_page("", None, 0).await?.is_empty());

    // Paging through everyone one by one yields everyone once.
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s.online_page("", after.as_deref(), 1).await?;
        let Some(e) = page.last() else { break };
        after = Some(e.cursor.clone());
        paged.extend(page_names(&page));
        assert!(paged.len() <= names.len());
    }
    assert_eq!(paged, page_names(&all));

    // Offline users leave the index.
    s.detach(102, "alice", "s102", "srv-a", "closed").await?;
    assert_eq!(
        page_names(&s.online_page("al", None, 10).await?),
        ["al", "albert", "alfred"]
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Inboxes

/// A private message from `from` to `to`, accepted now.
fn msg(id: &str, from: u64, to: u64) -> Message {
    Message {
        id: id.to_string(),
        sender_id: from,
        sender_name: format!("u{from}"),
        receiver_id: to,
        kind: MessageKind::Private as i32,
        body: format!("body of {id}"),
        timestamp_ms: now_ms(),
        ..Message::default()
    }
}

/// The same message asking for a receipt.
fn with_receipt(mut m: Message) -> Message {
    m.receipt = true;
    m
}

fn msg_ids(page: &[Message]) -> Vec<&str> {
    page.iter().map(|m| m.id.as_str()).collect()
}

fn seqs(page: &[Message]) -> Vec<u64> {
    page.iter().map(|m| m.seq).collect()
}

fn ack(user: u64, ids: &[&str]) -> (u64, Vec<String>) {
    (user, ids.iter().map(|id| id.to_string()).collect())
}

fn receipt(message_id: &str, sender_id: u64, receiver_id: u64) -> AckedReceipt {
    AckedReceipt {
        message_id: message_id.to_string(),
        sender_id,
        receiver_id,
    }
}

async fn inbox_store_assigns_increasing_seqs_in_order(s: &StoreUnderTest) -> anyhow::Result<()> {
    // Nothing stored yet: empty, and an empty store is fine.
    assert!(s.inbox_read(2, 0, 100).await?.is_empty());
    assert_eq!(s.inbox_len(2).await?, 0);
    s.inbox_store(&mut []).await?;

    // One call, many messages of one receiver: stored in slice order.
    let mut batch: Vec<Message> = (0..50).map(|i| msg(&format!("m{i:02}"), 1, 2)).collect();
    batch[7].seq = 999; // whatever the caller left in `seq` is replaced
    s.inbox_store(&mut batch).await?;
    assert_eq!(seqs(&batch), (1..=50).collect::<Vec<u64>>());

    let page = s.inbox_read(2, 0, 100).await?;
    assert_eq!(page, batch, "read back as stored, each with its seq");
    assert_eq!(s.inbox_len(2).await?, 50);

    // A later call continues the sequence.
    let mut more = vec![msg("late", 3, 2)];
    s.inbox_store(&mut more).await?;
    assert_eq!(more[0].seq, 51);
    let page = s.inbox_read(2, 50, 100).await?;
    assert_eq!(page, more);
    Ok(())
}

async fn inbox_store_is_idempotent_by_receiver_and_id(s: &StoreUnderTest) -> anyhow::Result<()> {
    let mut first = vec![msg("a", 1, 2), msg("b", 1, 2)];
    s.inbox_store(&mut first).await?;
    assert_eq!(seqs(&first), [1, 2]);

    // A retried send (even with another body), and a duplicate within one call: the
    // message keeps its place and seq, and is stored once.
    let mut retry = msg("a", 1, 2);
    retry.body = "changed".into();
    let mut again = vec![retry, msg("c", 1, 2), msg("c", 1, 2), msg("b", 1, 2)];
    s.inbox_store(&mut again).await?;
    assert_eq!(seqs(&again), [1, 3, 3, 2]);
    assert_eq!(s.inbox_len(2).await?, 3);
    let page = s.inbox_read(2, 0, 10).await?;
    assert_eq!(msg_ids(&page), ["a", "b", "c"]);
    assert_eq!(seqs(&page), [1, 2, 3]);
    assert_eq!(page[0].body, "body of a", "the first copy stays");
    assert_eq!(
        again[0], page[0],
        "a retry gets the stored copy back (to push the same message the first attempt did)"
    );

    // The same id to another receiver is another message.
    let mut other = vec![msg("a", 1, 3)];
    s.inbox_store(&mut other).await?;
    assert_eq!(other[0].seq, 1);

    // Once acked, the id is free again, and seqs are never reused.
    s.inbox_ack(&[ack(2, &["c"])]).await?;
    let mut after_ack = vec![msg("c", 1, 2)];
    s.inbox_store(&mut after_ack).await?;
    assert_eq!(after_ack[0].seq, 4);
    Ok(())
}

async fn concurrent_stores_of_one_message_store_it_once(s: &StoreUnderTest) -> anyhow::Result<()> {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let store = s.store.clone();
        set.spawn(async move {
            let mut batch = vec![msg("same", 1, 2), msg(&format!("own{i}"), 1, 2)];
            store.inbox_store(&mut batch).await.map(|()| batch)
        });
    }
    let mut same_seqs = Vec::new();
    let mut all_seqs = Vec::new();
    while let Some(r) = set.join_next().await {
        let batch = r??;
        same_seqs.push(batch[0].seq);
        assert!(batch[0].seq < batch[1].seq, "slice order within one call");
        all_seqs.extend(seqs(&batch));
    }
    same_seqs.dedup();
    assert_eq!(same_seqs.len(), 1, "seqs of one message: {same_seqs:?}");
    assert_eq!(s.inbox_len(2).await?, 21);
    let page = s.inbox_read(2, 0, 100).await?;
    assert_eq!(page.len(), 21);
    assert!(page.windows(2).all(|w| w[0].seq < w[1].seq));
    all_seqs.sort_unstable();
    all_seqs.dedup();
    assert_eq!(all_seqs, seqs(&page));
    Ok(())
}

async fn inbox_top_is_the_last_seq_given_even_once_acked(s: &StoreUnderTest) -> anyhow::Result<()> {
    assert_eq!(s.inbox_top(2).await?, 0, "nothing stored yet");
    let mut batch: Vec<Message> = ["a", "b", "c"].iter().map(|id| msg(id, 1, 2)).collect();
    s.inbox_store(&mut batch).await?;
    assert_eq!(s.inbox_top(2).await?, 3);
    // A retry stores nothing new; another user's messages are another count.
    s.inbox_store(&mut [msg("b", 1, 2), msg("z", 1, 3)]).await?;
    assert_eq!((s.inbox_top(2).await?, s.inbox_top(3).await?), (3, 1));
    // Acking everything empties the inbox but never lowers the top: a session replaying up
    // to it must never take a newer message for an older one.
    s.inbox_ack(&[ack(2, &["a", "b", "c"])]).await?;
    assert_eq!((s.inbox_len(2).await?, s.inbox_top(2).await?), (0, 3));
    s.inbox_store(&mut [msg("d", 1, 2)]).await?;
    assert_eq!(s.inbox_top(2).await?, 4);
    Ok(())
}

async fn inbox_store_then_routes_stores_then_looks_up(s: &StoreUnderTest) -> anyhow::Result<()> {
    s.connect_user(2, "u2", "s2", "srv-a").await;
    let mut batch = vec![msg("a", 1, 2), msg("b", 1, 3), msg("c", 1, 2)];
    let (stored, routes) = s.inbox_store_then_routes(&mut batch, &[2, 3]).await;
    stored?;
    assert_eq!(routes?, vec![Some(route(2, "srv-a", "s2")), None]);
    assert_eq!(seqs(&batch), [1, 1, 2]);
    // A retry answers with the stored copies, like `inbox_store`.
    let mut again = vec![msg("c", 1, 2)];
    again[0].body = "changed".into();
    let (stored, routes) = s.inbox_store_then_routes(&mut again, &[2]).await;
    stored?;
    assert_eq!(routes?.len(), 1);
    assert_eq!(
        (again[0].seq, again[0].body.as_str()),
        (2, batch[2].body.as_str())
    );
    assert_eq!(msg_ids(&s.inbox_read(2, 0, 10).await?), ["a", "c"]);
    // Nothing to store: the lookup alone.
    let (stored, routes) = s.inbox_store_then_routes(&mut [], &[2]).await;
    stored?;
    assert_eq!(routes?, vec![Some(route(2, "srv-a", "s2"))]);
    Ok(())
}

async fn inbox_read_pages_by_seq_and_limit(s: &StoreUnderTest) -> anyhow::Result<()> {
    let mut batch: Vec<Message> = (0..25).map(|i| msg(&format!("m{i:02}"), 1, 2)).collect();
    s.inbox_store(&mut batch).await?;

    // Page through with after_seq = the last seq seen.
    let mut paged = Vec::new();
    let mut after = 0;
    loop {
        let page = s.inbox_read(2, after, 10).await?;
        assert!(page.len() <= 10);
        let Some(last) = page.last() else { break };
        after = last.seq;
        paged.extend(page);
    }
    assert_eq!(paged, batch);

    assert_eq!(seqs(&s.inbox_read(2, 23, 10).await?), [24, 25]);
    assert!(s.inbox_read(2, 25, 10).await?.is_empty());
    assert!(s.inbox_read(2, u64::MAX, 10).await?.is_empty());
    assert!(s.inbox_read(2, 0, 0).await?.is_empty());
    assert_eq!(seqs(&s.inbox_read(2, 0, 1).await?), [1]);
    // Reading removes nothing.
    assert_eq!(s.inbox_len(2).await?, 25);

    // One read is bounded (1000) whatever the caller asks.
    let store = s
        .with_inbox_limits(InboxLimits {
            max_messages: 2000,
            ..InboxLimits::default()
        })
        .await?;
    let mut many: Vec<Message> = (0..1200).map(|i| msg(&format!("n{i}"), 1, 5)).collect();
    store.inbox_store(&mut many).await?;
    assert_eq!(store.inbox_len(5).await?, 1200);
    let page = store.inbox_read(5, 0, usize::MAX).await?;
    assert_eq!(seqs(&page), (1..=1000).collect::<Vec<u64>>());
    let rest = store.inbox_read(5, 1000, usize::MAX).await?;
    assert_eq!(seqs(&rest), (1001..=1200).collect::<Vec<u64>>());
    Ok(())
}

async fn inbox_keeps_the_newest_max_messages(s: &StoreUnderTest) -> anyhow::Result<()> {
    let store = s
        .with_inbox_limits(InboxLimits {
            max_messages: 3,
            max_age: Duration::from_secs(3600),
        })
        .await?;
    let mut batch: Vec<Message> = (1..=5)
        .map(|i| with_receipt(msg(&format!("m{i}"), 1, 2)))
        .collect();
    store.inbox_store(&mut batch).await?;
    assert_eq!(seqs(&batch), [1, 2, 3, 4, 5]);
    assert_eq!(store.inbox_len(2).await?, 3);
    let page = store.inbox_read(2, 0, 10).await?;
    assert_eq!(msg_ids(&page), ["m3", "m4", "m5"]);

    // One more drops the oldest; a dropped message is gone with its receipt.
    let mut one = vec![msg("m6", 1, 2)];
    store.inbox_store(&mut one).await?;
    assert_eq!(one[0].seq, 6);
    assert_eq!(
        msg_ids(&store.inbox_read(2, 0, 10).await?),
        ["m4", "m5", "m6"]
    );
    assert_eq!(
        store.inbox_ack(&[ack(2, &["m1", "m3", "m4"])]).await?,
        [receipt("m4", 1, 2)]
    );
    assert_eq!(msg_ids(&store.inbox_read(2, 0, 10).await?), ["m5", "m6"]);
    Ok(())
}

async fn inbox_read_skips_and_removes_expired_messages(s: &StoreUnderTest) -> anyhow::Result<()> {
    let max_age = Duration::from_secs(3600);
    let store = s
        .with_inbox_limits(InboxLimits {
            max_messages: 100,
            max_age,
        })
        .await?;
    let old_ms = now_ms() - max_age.as_millis() as i64 - 60_000;
    let old = |id: &str| {
        let mut m = with_receipt(msg(id, 1, 2));
        m.timestamp_ms = old_ms;
        m
    };
    // Expired ones at the front (the usual case) and one between fresh ones (clock skew).
    let mut batch = vec![
        old("o1"),
        old("o2"),
        old("o3"),
        msg("f1", 1, 2),
        old("o4"),
        msg("f2", 1, 2),
        msg("f3", 1, 2),
    ];
    store.inbox_store(&mut batch).await?;
    assert_eq!(seqs(&batch), [1, 2, 3, 4, 5, 6, 7]);

    // A page of 2 is filled past the expired ones: a short page still means the end.
    let page = store.inbox_read(2, 0, 2).await?;
    assert_eq!(msg_ids(&page), ["f1", "f2"]);
    assert_eq!(seqs(&page), [4, 6]);
    let rest = store.inbox_read(2, 6, 2).await?;
    assert_eq!(msg_ids(&rest), ["f3"]);
    // Skipped ones are gone, without receipts.
    assert_eq!(store.inbox_len(2).await?, 3);
    assert!(store
        .inbox_ack(&[ack(2, &["o1", "o2", "o3", "o4"])])
        .await?
        .is_empty());
    assert_eq!(
        msg_ids(&store.inbox_read(2, 0, 10).await?),
        ["f1", "f2", "f3"]
    );
    Ok(())
}

async fn inbox_ack_removes_messages_once(s: &StoreUnderTest) -> anyhow::Result<()> {
    let mut batch: Vec<Message> = ["a", "b", "c", "d"]
        .iter()
        .map(|id| msg(id, 1, 2))
        .collect();
    batch.push(msg("x", 1, 3));
    batch.push(msg("y", 1, 3));
    s.inbox_store(&mut batch).await?;

    // Several users in one call; unknown ids, others' ids and repeats are no-ops.
    let receipts = s
        .inbox_ack(&[
            ack(2, &["b", "nope", "x", "b"]),
            ack(3, &["y"]),
            ack(4, &["a"]),
            ack(2, &["d"]),
            ack(5, &[]),
        ])
        .await?;
    assert!(
        receipts.is_empty(),
        "no receipt was asked for: {receipts:?}"
    );
    assert_eq!(msg_ids(&s.inbox_read(2, 0, 10).await?), ["a", "c"]);
    assert_eq!(msg_ids(&s.inbox_read(3, 0, 10).await?), ["x"]);
    assert_eq!((s.inbox_len(2).await?, s.inbox_len(3).await?), (2, 1));

    // Again: nothing changes.
    s.inbox_ack(&[ack(2, &["b", "d"]), ack(3, &["y"])]).await?;
    assert_eq!((s.inbox_len(2).await?, s.inbox_len(3).await?), (2, 1));
    assert!(s.inbox_ack(&[]).await?.is_empty());

    s.inbox_ack(&[ack(2, &["a", "c"]), ack(3, &["x"])]).await?;
    assert_eq!((s.inbox_len(2).await?, s.inbox_len(3).await?), (0, 0));
    assert!(s.inbox_read(2, 0, 10).await?.is_empty());
    Ok(())
}

async fn inbox_ack_returns_each_receipt_once(s: &StoreUnderTest) -> anyhow::Result<()> {
    let mut batch = vec![
        with_receipt(msg("r1", 1, 2)),
        msg("plain", 1, 2),
        with_receipt(msg("r2", 4, 2)),
        with_receipt(msg("r3", 2, 3)),
    ];
    s.inbox_store(&mut batch).await?;
    // The flag is part of the stored message.
    let page = s.inbox_read(2, 0, 10).await?;
    assert_eq!(
        page.iter().map(|m| m.receipt).collect::<Vec<_>>(),
        [true, false, true]
    );

    // An id repeated in one ack gives its receipt once.
    let receipts = s
        .inbox_ack(&[ack(2, &["plain", "r2", "r1", "r2"]), ack(3, &["r3"])])
        .await?;
    assert_eq!(
        receipts,
        [
            receipt("r2", 4, 2),
            receipt("r1", 1, 2),
            receipt("r3", 2, 3)
        ],
        "in ack order, sender = who sent it, receiver = who acked"
    );
    // A repeated ack (a retry after a lost answer) finds nothing.
    assert!(s
        .inbox_ack(&[ack(2, &["r1", "r2"]), ack(3, &["r3"])])
        .await?
        .is_empty());

    // A retried store of an acked message is a new message, with its receipt again.
    let mut again = vec![with_receipt(msg("r1", 1, 2))];
    s.inbox_store(&mut again).await?;
    assert_eq!(
        s.inbox_ack(&[ack(2, &["r1"])]).await?,
        [receipt("r1", 1, 2)]
    );
    Ok(())
}

async fn receipt_requests_stay_pending_until_done(s: &StoreUnderTest) -> anyhow::Result<()> {
    let mut batch = vec![
        with_receipt(msg("r1", 1, 2)),
        with_receipt(msg("r2", 4, 2)),
        msg("plain", 1, 2),
        with_receipt(msg("unread", 1, 2)),
    ];
    s.inbox_store(&mut batch).await?;
    // Not acked yet: nothing pending (the message itself is still there).
    assert!(s.pending_receipts(2, 100).await?.is_empty());
    let receipts = s.inbox_ack(&[ack(2, &["r1", "r2", "plain"])]).await?;
    assert_eq!(receipts, [receipt("r1", 1, 2), receipt("r2", 4, 2)]);
    // Acked, receipts not confirmed: both pending (e.g. for the next login to send again),
    // the unread one not, other users' none.
    let mut pending = s.pending_receipts(2, 100).await?;
    pending.sort_by(|a, b| a.message_id.cmp(&b.message_id));
    assert_eq!(pending, [receipt("r1", 1, 2), receipt("r2", 4, 2)]);
    assert_eq!(
        s.pending_receipts(2, 1).await?.len(),
        1,
        "bounded by the limit"
    );
    assert!(s.pending_receipts(3, 100).await?.is_empty());
    // A repeated ack still finds nothing to return.
    assert!(s.inbox_ack(&[ack(2, &["r1"])]).await?.is_empty());
    // Confirmed: gone.
    s.receipts_done(&[ack(2, &["r1"])]).await?;
    assert_eq!(s.pending_receipts(2, 100).await?, [receipt("r2", 4, 2)]);
    s.receipts_done(&[ack(2, &["r2"]), ack(3, &["nothing"])])
        .await?;
    assert!(s.pending_receipts(2, 100).await?.is_empty());
    // The unread message keeps its request, and gives its receipt when acked.
    assert_eq!(
        s.inbox_ack(&[ack(2, &["unread"])]).await?,
        [receipt("unread", 1, 2)]
    );
    Ok(())
}

async fn inbox_ack_ignores_oversized_input(s: &StoreUnderTest) -> anyhow::Result<()> {
    let long_id = "x".repeat(129);
    let mut batch = vec![
        with_receipt(msg("late", 1, 2)),
        with_receipt(msg(&long_id, 1, 2)),
    ];
    s.inbox_store(&mut batch).await?;

    // Ids past the first 1024 of an entry and ids over 128 bytes are not looked at.
    let mut ids: Vec<String> = (0..1024).map(|i| format!("unknown{i}")).collect();
    ids.push("late".into());
    ids.push(long_id.clone());
    assert!(s.inbox_ack(&[(2, ids)]).await?.is_empty());
    assert_eq!(s.inbox_len(2).await?, 2);

    assert_eq!(
        s.inbox_ack(&[ack(2, &["late", &long_id])]).await?,
        [receipt("late", 1, 2)]
    );
    assert_eq!(s.inbox_len(2).await?, 1);
    Ok(())
}

async fn inboxes_of_users_are_separate(s: &StoreUnderTest) -> anyhow::Result<()> {
    // Interleaved receivers in one call: each inbox has its own seqs.
    let mut batch = vec![
        msg("a1", 9, 1),
        msg("b1", 9, 2),
        msg("a2", 9, 1),
        with_receipt(msg("b2", 9, 2)),
        msg("b3", 9, 2),
    ];
    s.inbox_store(&mut batch).await?;
    assert_eq!(seqs(&batch), [1, 1, 2, 2, 3]);
    assert_eq!(msg_ids(&s.inbox_read(1, 0, 10).await?), ["a1", "a2"]);
    assert_eq!(msg_ids(&s.inbox_read(2, 0, 10).await?), ["b1", "b2", "b3"]);
    assert!(
        s.inbox_read(9, 0, 10).await?.is_empty(),
        "the sender's inbox"
    );
    assert_eq!(
        (
            s.inbox_len(1).await?,
            s.inbox_len(2).await?,
            s.inbox_len(9).await?
        ),
        (2, 3, 0)
    );

    // Acking another user's messages (or a receipt message of another user) does nothing.
    assert!(s.inbox_ack(&[ack(1, &["b1", "b2"])]).await?.is_empty());
    assert_eq!(s.inbox_len(2).await?, 3);
    assert_eq!(
        s.inbox_ack(&[ack(2, &["b2"])]).await?,
        [receipt("b2", 9, 2)]
    );
    assert_eq!(msg_ids(&s.inbox_read(1, 0, 10).await?), ["a1", "a2"]);

    // Another store (another Redis prefix) shares nothing.
    let other = s.another().await?;
    assert!(other.inbox_read(1, 0, 10).await?.is_empty());
    let mut first = vec![msg("a1", 9, 1)];
    other.inbox_store(&mut first).await?;
    assert_eq!(first[0].seq, 1);
    assert_eq!(s.inbox_len(1).await?, 2);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Presence events

/// `(kind, user, name, server, reason)` of events, to compare without ids and times.
fn summary(events: &[StoredEvent]) -> Vec<(PresenceKind, u64, String, String, String)> {
    events
        .iter()
        .map(|e| {
            let PresenceEvent {
                kind,
                user_id,
                name,
                server_id,
                reason,
                ..
            } = &e.event;
            (
                *kind,
                *user_id,
                name.clone(),
                server_id.clone(),
                reason.clone(),
            )
        })
        .collect()
}

fn online(user: u64, name: &str, server: &str) -> (PresenceKind, u64, String, String, String) {
    (
        PresenceKind::Online,
        user,
        name.into(),
        server.into(),
        String::new(),
    )
}

fn offline(
    user: u64,
    name: &str,
    server: &str,
    why: &str,
) -> (PresenceKind, u64, String, String, String) {
    (
        PresenceKind::Offline,
        user,
        name.into(),
        server.into(),
        why.into(),
    )
}

/// Every event kept (at most 1000), oldest first.
async fn all_events(store: &dyn StateStore) -> anyhow::Result<Vec<StoredEvent>> {
    Ok(store.events_after(None, MAX_EVENTS_READ).await?)
}

fn event_ids(events: &[StoredEvent]) -> Vec<EventId> {
    events
        .iter()
        .map(|e| EventId::parse(&e.id).unwrap_or_else(|| panic!("bad event id {:?}", e.id)))
        .collect()
}

async fn attach_and_detach_publish_presence_events(s: &StoreUnderTest) -> anyhow::Result<()> {
    assert_eq!(s.events_last_id().await?, "0-0");
    assert!(all_events(&**s).await?.is_empty());

    let before = now_ms();
    s.connect_user(1, "dora", "s1", "srv-a").await;
    let after = now_ms();
    let events = all_events(&**s).await?;
    assert_eq!(summary(&events), [online(1, "dora", "srv-a")]);
    assert!(
        (before..=after).contains(&events[0].event.at_ms),
        "at_ms {} not within {before}..={after}",
        events[0].event.at_ms
    );
    assert_eq!(s.events_last_id().await?, events[0].id);

    // A refused attach, and detaches of what is not the route, publish nothing.
    assert_eq!(
        s.attach(1, "dora", "s1", "srv-a").await?,
        AttachOutcome::SessionInvalid
    );
    s.detach(1, "dora", "s-other", "srv-a", reason::CLOSED)
        .await?;
    s.detach(1, "dora", "s1", "srv-b", reason::CLOSED).await?;
    assert_eq!(all_events(&**s).await?.len(), 1);

    s.detach(1, "dora", "s1", "srv-a", reason::HEARTBEAT_TIMEOUT)
        .await?;
    s.detach(1, "dora", "s1", "srv-a", reason::CLOSED).await?;
    assert_eq!(
        summary(&all_events(&**s).await?),
        [
            online(1, "dora", "srv-a"),
            offline(1, "dora", "srv-a", reason::HEARTBEAT_TIMEOUT)
        ]
    );

    // Replaced: srv-a is taken for dead, the user lands on srv-b, then srv-a's late detach
    // of the old connection publishes nothing (the user is still online).
    s.connect_user(1, "dora", "s2", "srv-a").await;
    assert_eq!(
        s.claim_login(1, "s3", LONG_TTL, &nobody_live).await?,
        ClaimOutcome::Claimed
    );
    assert_eq!(
        s.attach(1, "dora", "s3", "srv-b").await?,
        AttachOutcome::Attached
    );
    s.detach(1, "dora", "s2", "srv-a", reason::CONNECTION_LOST)
        .await?;
    let events = all_events(&**s).await?;
    assert_eq!(
        summary(&events[2..]),
        [online(1, "dora", "srv-a"), online(1, "dora", "srv-b")]
    );
    let ids = event_ids(&events);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    assert_eq!(s.events_last_id().await?, events[3].id);
    Ok(())
}

async fn remove_stale_route_publishes_server_lost(s: &StoreUnderTest) -> anyhow::Result<()> {
    let id = s.create_user("dora", "pw").await?.unwrap();
    s.connect_user(id, "dora", "s1", "srv-a").await;
    // Not the route (any more): nothing.
    s.remove_stale_route(&route(id, "srv-a", "s0")).await?;
    assert_eq!(all_events(&**s).await?.len(), 1);

    s.remove_stale_route(&route(id, "srv-a", "s1")).await?;
    s.remove_stale_route(&route(id, "srv-a", "s1")).await?;
    assert_eq!(
        summary(&all_events(&**s).await?),
        [
            online(id, "dora", "srv-a"),
            offline(id, "dora", "srv-a", reason::SERVER_LOST)
        ]
    );
    Ok(())
}

async fn events_after_pages_from_an_exclusive_start(s: &StoreUnderTest) -> anyhow::Result<()> {
    for id in 1..=15 {
        let (name, session) = (format!("u{id}"), format!("s{id}"));
        s.connect_user(id, &name, &session, "srv-a").await;
        s.detach(id, &name, &session, "srv-a", reason::CLOSED)
            .await?;
    }
    let all = all_events(&**s).await?;
    assert_eq!(all.len(), 30);

    // Pages of 7, each after the last id of the one before.
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s.events_after(after.as_deref(), 7).await?;
        assert!(page.len() <= 7);
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        paged.extend(page);
        assert!(paged.len() <= 30);
    }
    assert_eq!(paged, all);

    // Exclusive start, at an event or between two; "0-0" is before everything.
    assert_eq!(s.events_after(Some(&all[28].id), 10).await?, &all[29..]);
    assert!(s.events_after(Some(&all[29].id), 10).await?.is_empty());
    let id = EventId::parse(&all[9].id).unwrap();
    let between = EventId {
        ms: id.ms,
        seq: id.seq + 1,
    };
    let from_between = s.events_after(Some(&between.to_string()), 100).await?;
    assert!(from_between.len() <= 20 && from_between.last() == all.last());
    assert_eq!(s.events_after(Some("0-0"), 100).await?, all);
    assert!(s.events_after(None, 0).await?.is_empty());
    for past in [
        "99999999999999-0",
        "18446744073709551615-18446744073709551615",
    ] {
        assert!(s.events_after(Some(past), 10).await?.is_empty(), "{past}");
    }
    // Not an event id: the caller's bug, not "from the start".
    for bad in ["", "abc", "1-", "-", "(1-0", "+"] {
        let err = s.events_after(Some(bad), 10).await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{bad:?}: {err:?}");
        let err = s
            .events_wait(bad, 10, Duration::from_millis(10))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{bad:?}: {err:?}");
    }

    // One read returns at most 1000, whatever the caller asks.
    for id in 100..700 {
        let (name, session) = (format!("u{id}"), format!("s{id}"));
        s.connect_user(id, &name, &session, "srv-b").await;
        s.detach(id, &name, &session, "srv-b", reason::CLOSED)
            .await?;
    }
    let first = s.events_after(None, usize::MAX).await?;
    assert_eq!(first.len(), MAX_EVENTS_READ);
    assert_eq!(first[..30], all[..]);
    let rest = s.events_after(Some(&first[999].id), usize::MAX).await?;
    assert_eq!(rest.len(), 1230 - MAX_EVENTS_READ);
    assert_eq!(s.events_last_id().await?, rest.last().unwrap().id);
    Ok(())
}

async fn events_wait_returns_new_events_or_nothing_after_its_timeout(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    let start = s.events_last_id().await?;

    // Nothing comes: empty, after the timeout.
    let started = std::time::Instant::now();
    let none = s.events_wait(&start, 10, Duration::from_millis(50)).await?;
    assert!(none.is_empty(), "{none:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(45),
        "returned after {:?}",
        started.elapsed()
    );

    // Already there: returned at once, however long the caller would wait.
    s.connect_user(1, "dora", "s1", "srv-a").await;
    let started = std::time::Instant::now();
    let got = s.events_wait(&start, 10, DEADLINE * 6).await?;
    assert_eq!(summary(&got), [online(1, "dora", "srv-a")]);
    assert!(started.elapsed() < DEADLINE, "took {:?}", started.elapsed());

    // Published while waiting: the wait returns it.
    let last = got[0].id.clone();
    let waiting = {
        let store = s.store.clone();
        let last = last.clone();
        tokio::spawn(async move { store.events_wait(&last, 10, DEADLINE * 6).await })
    };
    s.wait_for_blocked_reader().await?;
    // A blocked read holds up no other call.
    let started = std::time::Instant::now();
    assert_eq!(s.routes(&[1]).await?, vec![Some(route(1, "srv-a", "s1"))]);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a call during a blocked read took {:?}",
        started.elapsed()
    );
    // Nor does it hold up another wait beyond that one's own timeout.
    let started = std::time::Instant::now();
    assert!(s
        .events_wait(&last, 10, Duration::from_millis(100))
        .await?
        .is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a second wait took {:?}",
        started.elapsed()
    );
    s.detach(1, "dora", "s1", "srv-a", reason::LOGGED_OUT)
        .await?;
    let got = tokio::time::timeout(DEADLINE, waiting).await???;
    assert_eq!(
        summary(&got),
        [offline(1, "dora", "srv-a", reason::LOGGED_OUT)]
    );
    assert!(EventId::parse(&got[0].id) > EventId::parse(&last));

    // A wait given up by its caller (dropped mid-read) does not break the next one.
    let abandoned = {
        let store = s.store.clone();
        let last = got[0].id.clone();
        tokio::spawn(async move { store.events_wait(&last, 10, DEADLINE * 6).await })
    };
    s.wait_for_blocked_reader().await?;
    abandoned.abort();
    assert!(abandoned.await.unwrap_err().is_cancelled());
    s.connect_user(2, "erin", "s2", "srv-b").await;
    let next = s
        .events_wait(&got[0].id, 10, Duration::from_millis(50))
        .await?;
    assert_eq!(summary(&next), [online(2, "erin", "srv-b")]);
    // A limit and no wait.
    assert!(s.events_wait(&start, 0, DEADLINE).await?.is_empty());
    assert_eq!(s.events_wait(&start, 1, Duration::ZERO).await?.len(), 1);
    Ok(())
}

async fn event_stream_is_capped_near_events_max_len(s: &StoreUnderTest) -> anyhow::Result<()> {
    const MAX: usize = 10;
    // Redis trims with `MAXLEN ~`: whole stream nodes only, so it keeps up to one node
    // (stream-node-max-entries, 100 by default) more than asked. The memory store is exact.
    const SLACK: usize = 100;
    let store = s.with_events_max_len(MAX).await?;
    let mut published = Vec::new();
    for id in 1..=150 {
        let (name, session) = (format!("u{id}"), format!("s{id}"));
        assert_eq!(
            store
                .claim_login(id, &session, LONG_TTL, &nobody_live)
                .await?,
            ClaimOutcome::Claimed
        );
        store.attach(id, &name, &session, "srv-a").await?;
        store
            .detach(id, &name, &session, "srv-a", reason::CLOSED)
            .await?;
        published.push(online(id, &name, "srv-a"));
        published.push(offline(id, &name, "srv-a", reason::CLOSED));
    }
    let kept = all_events(&*store).await?;
    assert!(
        (MAX..=MAX + SLACK).contains(&kept.len()),
        "{} events kept of {}",
        kept.len(),
        published.len()
    );
    if !s.is_redis() {
        assert_eq!(kept.len(), MAX);
    }
    // The newest ones, in order.
    assert_eq!(summary(&kept), published[published.len() - kept.len()..]);
    assert_eq!(store.events_last_id().await?, kept.last().unwrap().id);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Leases and cursors

async fn leases_are_held_renewed_and_expire(s: &StoreUnderTest) -> anyhow::Result<()> {
    assert!(s.lease("webhook", "route-a", LONG_TTL).await?);
    assert!(!s.lease("webhook", "route-b", LONG_TTL).await?);
    assert!(s.lease("webhook", "route-a", LONG_TTL).await?, "renewal");
    assert!(!s.lease("webhook", "route-b", LONG_TTL).await?);
    // Names are separate.
    assert!(s.lease("other", "route-b", LONG_TTL).await?);

    // A short lease its holder does not renew passes to the next one asking.
    let short = Duration::from_millis(200);
    assert!(s.lease("short", "route-a", short).await?);
    assert!(!s.lease("short", "route-b", LONG_TTL).await?);
    wait_until("the short lease to expire", DEADLINE, || async {
        s.lease("short", "route-b", LONG_TTL).await.unwrap()
    })
    .await?;
    assert!(!s.lease("short", "route-a", short).await?);
    Ok(())
}

async fn broadcast_claims_answer_repeats_until_released_or_expired(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    let claim = |id: &str, ts: i64| (id.to_string(), ts);
    assert_eq!(s.claim_broadcasts(&[], LONG_TTL).await?, vec![]);
    // First claims win, in slice order; a repeat inside one call is a repeat too.
    assert_eq!(
        s.claim_broadcasts(
            &[claim("7-a", 100), claim("7-b", 101), claim("7-a", 102)],
            LONG_TTL
        )
        .await?,
        vec![None, None, Some(100)]
    );
    // A later repeat answers the first timestamp, and does not replace it.
    assert_eq!(
        s.claim_broadcasts(&[claim("7-b", 200), claim("7-c", 201)], LONG_TTL)
            .await?,
        vec![Some(101), None]
    );
    assert_eq!(
        s.claim_broadcasts(&[claim("7-b", 300)], LONG_TTL).await?,
        vec![Some(101)]
    );

    // Released (it reached nobody): the next claim is a first one, with its own timestamp.
    s.release_broadcasts(&["7-a".to_string(), "never-claimed".to_string()])
        .await?;
    assert_eq!(
        s.claim_broadcasts(&[claim("7-a", 400), claim("7-b", 401)], LONG_TTL)
            .await?,
        vec![None, Some(101)]
    );
    assert_eq!(
        s.claim_broadcasts(&[claim("7-a", 500)], LONG_TTL).await?,
        vec![Some(400)]
    );
    s.release_broadcasts(&[]).await?;

    // A claim expires with its time to live.
    let short = Duration::from_millis(200);
    assert_eq!(
        s.claim_broadcasts(&[claim("short", 1)], short).await?,
        vec![None]
    );
    assert_eq!(
        s.claim_broadcasts(&[claim("short", 2)], LONG_TTL).await?,
        vec![Some(1)]
    );
    wait_until("the short claim to expire", DEADLINE, || async {
        s.claim_broadcasts(&[claim("short", 3)], short)
            .await
            .unwrap()
            == vec![None]
    })
    .await?;
    Ok(())
}

async fn cursors_are_stored_by_name(s: &StoreUnderTest) -> anyhow::Result<()> {
    assert_eq!(s.cursor("webhook").await?, None);
    s.set_cursor("webhook", "1700000000000-0").await?;
    assert_eq!(
        s.cursor("webhook").await?.as_deref(),
        Some("1700000000000-0")
    );
    s.set_cursor("webhook", "1700000000000-7").await?;
    assert_eq!(
        s.cursor("webhook").await?.as_deref(),
        Some("1700000000000-7")
    );
    assert_eq!(s.cursor("other").await?, None);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Channels

async fn channel_join_leave_and_membership(s: &StoreUnderTest) -> anyhow::Result<()> {
    assert!(!s.channel_is_member("room", 1).await?);
    assert!(s.user_channels(1).await?.is_empty());
    assert_eq!(s.channel_join("room", 1, 10).await?, JoinOutcome::Joined);
    assert_eq!(
        s.channel_join("room", 1, 10).await?,
        JoinOutcome::AlreadyMember
    );
    assert_eq!(s.channel_join("room", 2, 10).await?, JoinOutcome::Joined);
    assert_eq!(s.channel_join("lobby", 1, 10).await?, JoinOutcome::Joined);
    assert!(s.channel_is_member("room", 1).await?);
    assert!(s.channel_is_member("room", 2).await?);
    assert!(!s.channel_is_member("lobby", 2).await?);
    assert!(!s.channel_is_member("Room", 1).await?, "names are exact");
    assert_eq!(s.user_channels(1).await?, ["lobby", "room"]);
    assert_eq!(s.user_channels(2).await?, ["room"]);

    assert!(s.channel_leave("room", 1).await?);
    assert!(!s.channel_leave("room", 1).await?, "left already");
    assert!(!s.channel_leave("nowhere", 1).await?);
    assert!(!s.channel_is_member("room", 1).await?);
    assert!(s.channel_is_member("room", 2).await?);
    assert_eq!(s.user_channels(1).await?, ["lobby"]);
    assert_eq!(s.channel_members("room", 0, 10).await?, [2]);

    // Whatever the name, it is one channel and nothing else (route-validated names are a
    // subset of these).
    let odd = ["", "a}b", "{x}", "sp ace", "ü.-_", "room*", "chan:{1}"];
    for name in odd {
        assert_eq!(
            s.channel_join(name, 3, 10).await?,
            JoinOutcome::Joined,
            "{name:?}"
        );
    }
    let mut sorted: Vec<String> = odd.iter().map(|n| n.to_string()).collect();
    sorted.sort();
    assert_eq!(s.user_channels(3).await?, sorted);
    for name in odd {
        assert_eq!(s.channel_members(name, 0, 10).await?, [3], "{name:?}");
    }
    assert!(!s.channel_is_member("room", 3).await?);
    assert!(!s.channel_is_member("a", 3).await?);
    for name in odd {
        assert!(s.channel_leave(name, 3).await?, "{name:?}");
    }
    assert!(s.user_channels(3).await?.is_empty());
    assert_eq!(s.channel_list(None, 100).await?, ["lobby", "room"]);
    Ok(())
}

async fn channel_join_respects_the_per_user_limit(s: &StoreUnderTest) -> anyhow::Result<()> {
    assert_eq!(s.channel_join("a", 1, 2).await?, JoinOutcome::Joined);
    assert_eq!(s.channel_join("b", 1, 2).await?, JoinOutcome::Joined);
    assert_eq!(
        s.channel_join("c", 1, 2).await?,
        JoinOutcome::TooManyChannels
    );
    assert!(!s.channel_is_member("c", 1).await?);
    assert!(s.channel_members("c", 0, 10).await?.is_empty());
    assert!(!s.channel_list(None, 10).await?.contains(&"c".to_string()));
    // A member at the limit is still a member.
    assert_eq!(s.channel_join("a", 1, 2).await?, JoinOutcome::AlreadyMember);
    assert_eq!(s.user_channels(1).await?, ["a", "b"]);
    // Others are not limited by this user.
    assert_eq!(s.channel_join("c", 2, 2).await?, JoinOutcome::Joined);
    // Leaving frees a place.
    s.channel_leave("a", 1).await?;
    assert_eq!(s.channel_join("c", 1, 2).await?, JoinOutcome::Joined);
    assert_eq!(s.user_channels(1).await?, ["b", "c"]);
    assert_eq!(
        s.channel_join("x", 3, 0).await?,
        JoinOutcome::TooManyChannels
    );

    // Concurrent joins of one user cannot pass the limit together.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let store = s.store.clone();
        set.spawn(async move { store.channel_join(&format!("c{i:02}"), 9, 3).await });
    }
    let mut joined = 0;
    while let Some(r) = set.join_next().await {
        if r?? == JoinOutcome::Joined {
            joined += 1;
        }
    }
    assert_eq!(joined, 3);
    let mine = s.user_channels(9).await?;
    assert_eq!(mine.len(), 3);
    for name in &mine {
        assert!(s.channel_is_member(name, 9).await?);
    }
    Ok(())
}

async fn channel_members_page_by_user_id(s: &StoreUnderTest) -> anyhow::Result<()> {
    let ids = [5, 3, 100, 42, 7, 1000, 2, 10, 9, 1 << 40];
    for id in ids {
        assert_eq!(s.channel_join("room", id, 10).await?, JoinOutcome::Joined);
    }
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    assert_eq!(s.channel_members("room", 0, 100).await?, sorted);

    // Pages of 3, each after the last id of the one before.
    let mut paged = Vec::new();
    let mut after = 0;
    loop {
        let page = s.channel_members("room", after, 3).await?;
        assert!(page.len() <= 3);
        let Some(&last) = page.last() else { break };
        after = last;
        paged.extend(page);
        assert!(paged.len() <= ids.len());
    }
    assert_eq!(paged, sorted);
    assert_eq!(s.channel_members("room", 42, 2).await?, [100, 1000]);
    assert_eq!(s.channel_members("room", 41, 1).await?, [42]);
    assert!(s.channel_members("room", 1 << 40, 10).await?.is_empty());
    assert!(s.channel_members("room", 0, 0).await?.is_empty());
    assert!(s.channel_members("nowhere", 0, 10).await?.is_empty());

    // One page is at most 1000, whatever the caller asks.
    for id in 1..=1100 {
        s.channel_join("big", id, 10).await?;
    }
    let first = s.channel_members("big", 0, usize::MAX).await?;
    assert_eq!(first, (1..=MAX_CHANNEL_PAGE as u64).collect::<Vec<_>>());
    let rest = s.channel_members("big", 1000, usize::MAX).await?;
    assert_eq!(rest, (1001..=1100).collect::<Vec<u64>>());
    Ok(())
}

async fn channel_list_pages_by_name_and_drops_empty_channels(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    assert!(s.channel_list(None, 10).await?.is_empty());
    for name in ["b", "a", "c.1", "B", "ä", "a-b"] {
        s.channel_join(name, 1, 100).await?;
    }
    s.channel_join("a", 2, 100).await?;
    // Byte order.
    let all = ["B", "a", "a-b", "b", "c.1", "ä"];
    assert_eq!(s.channel_list(None, 100).await?, all);

    let mut paged: Vec<String> = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s.channel_list(after.as_deref(), 4).await?;
        assert!(page.len() <= 4);
        let Some(last) = page.last() else { break };
        after = Some(last.clone());
        paged.extend(page);
        assert!(paged.len() <= all.len());
    }
    assert_eq!(paged, all);
    assert_eq!(s.channel_list(Some("b"), 10).await?, ["c.1", "ä"]);
    assert_eq!(s.channel_list(Some("a0"), 2).await?, ["b", "c.1"]);
    assert!(s.channel_list(Some("ä"), 10).await?.is_empty());
    assert!(s.channel_list(None, 0).await?.is_empty());

    // A channel is gone with its last member, not before.
    s.channel_leave("a", 1).await?;
    assert!(s.channel_list(None, 100).await?.contains(&"a".to_string()));
    s.channel_leave("a", 2).await?;
    s.channel_leave("ä", 1).await?;
    assert_eq!(s.channel_list(None, 100).await?, ["B", "a-b", "b", "c.1"]);
    // And back with a new one.
    s.channel_join("a", 3, 100).await?;
    assert_eq!(
        s.channel_list(None, 100).await?,
        ["B", "a", "a-b", "b", "c.1"]
    );

    // One page is at most 1000, whatever the caller asks.
    for i in 0..1100 {
        s.channel_join(&format!("n{i:04}"), 5, 2000).await?;
    }
    let page = s.channel_list(Some("c.1"), usize::MAX).await?;
    assert_eq!(page.len(), MAX_CHANNEL_PAGE);
    assert_eq!(page[0], "n0000");
    let rest = s
        .channel_list(page.last().map(String::as_str), usize::MAX)
        .await?;
    assert_eq!(rest.len(), 100);
    assert_eq!(rest.last().map(String::as_str), Some("n1099"));
    Ok(())
}

async fn channel_stats_count_members_and_online(s: &StoreUnderTest) -> anyhow::Result<()> {
    let info = |name: &str, members: u64, online: u64| ChannelInfo {
        name: name.to_string(),
        members,
        online,
    };
    assert!(s.channel_stats(&[]).await?.is_empty());
    let names = |list: &[&str]| list.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let dora = s.create_user("dora", "pw").await?.unwrap();
    let erin = s.create_user("erin", "pw").await?.unwrap();
    let fay = s.create_user("fay", "pw").await?.unwrap();
    let gus = s.create_user("gus", "pw").await?.unwrap();
    for user in [dora, erin, fay] {
        s.channel_join("room", user, 10).await?;
    }
    s.channel_join("duo", dora, 10).await?;
    let query = names(&["room", "ghost", "duo", "room"]);
    assert_eq!(
        s.channel_stats(&query).await?,
        [
            info("room", 3, 0),
            info("ghost", 0, 0),
            info("duo", 1, 0),
            info("room", 3, 0)
        ]
    );

    s.connect_user(dora, "dora", "s1", "srv-a").await;
    s.connect_user(erin, "erin", "s2", "srv-b").await;
    // Online but in no channel: counts nowhere.
    s.connect_user(gus, "gus", "s4", "srv-a").await;
    assert_eq!(
        s.channel_stats(&names(&["room", "duo"])).await?,
        [info("room", 3, 2), info("duo", 1, 1)]
    );
    s.detach(dora, "dora", "s1", "srv-a", reason::CLOSED)
        .await?;
    assert_eq!(
        s.channel_stats(&names(&["room", "duo"])).await?,
        [info("room", 3, 1), info("duo", 1, 0)]
    );
    // A replaced connection's late detach keeps the user online.
    s.connect_user(dora, "dora", "s5", "srv-a").await;
    assert_eq!(
        s.claim_login(dora, "s6", LONG_TTL, &nobody_live).await?,
        ClaimOutcome::Claimed
    );
    s.attach(dora, "dora", "s6", "srv-b").await?;
    s.detach(dora, "dora", "s5", "srv-a", reason::CLOSED)
        .await?;
    assert_eq!(
        s.channel_stats(&names(&["room"])).await?,
        [info("room", 3, 2)]
    );
    // Found stale: offline too.
    s.remove_stale_route(&route(erin, "srv-b", "s2")).await?;
    assert_eq!(
        s.channel_stats(&names(&["room"])).await?,
        [info("room", 3, 1)]
    );
    // Leaving lowers both counts.
    s.channel_leave("room", dora).await?;
    assert_eq!(
        s.channel_stats(&names(&["room", "duo"])).await?,
        [info("room", 2, 0), info("duo", 1, 1)]
    );

    // At most 1000 channels per call.
    let many: Vec<String> = (0..MAX_CHANNEL_STATS + 100)
        .map(|i| format!("c{i}"))
        .collect();
    let stats = s.channel_stats(&many).await?;
    assert_eq!(stats.len(), MAX_CHANNEL_STATS);
    assert_eq!(stats[999], info("c999", 0, 0));
    Ok(())
}

// =============================================================================================
// RedisStore only: raw keys, outages

async fn store_on(redis: &Redis) -> (RedisStore, Keys) {
    let prefix = unique_prefix();
    let store = RedisStore::connect(&redis.url(), &prefix, CALL_TIMEOUT)
        .await
        .expect("connect to redis");
    (store, Keys::new(prefix))
}

/// Claims and attaches `session` of `user` on `server` (asserting both succeed).
async fn connect_user(store: &RedisStore, user: u64, name: &str, session: &str, server: &str) {
    assert_eq!(
        store
            .claim_login(user, session, LONG_TTL, &nobody_live)
            .await
            .unwrap(),
        ClaimOutcome::Claimed,
        "claim of user {user}"
    );
    assert_eq!(
        store.attach(user, name, session, server).await.unwrap(),
        AttachOutcome::Attached,
        "attach of user {user}"
    );
}

/// The scripts are loaded at connect: the first calls on a fresh Redis never answer NOSCRIPT
/// (and pay for a second round trip).
#[tokio::test]
async fn scripts_are_loaded_at_connect() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (store, _keys) = store_on(&redis).await;
    let mut batch = vec![msg("m1", 1, 2)];
    store.inbox_store(&mut batch).await?;
    assert_eq!(store.inbox_read(2, 0, 10).await?.len(), 1);
    let mut c = redis.connection().await?;
    let stats: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await?;
    let evalsha = stats
        .lines()
        .find(|l| l.starts_with("cmdstat_evalsha:"))
        .expect("the scripts ran");
    assert!(evalsha.contains("failed_calls=0"), "{evalsha}");
    assert!(evalsha.contains("rejected_calls=0"), "{evalsha}");
    Ok(())
}

#[tokio::test]
async fn a_refused_duplicate_leaves_no_record_in_redis() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (store, keys) = store_on(&redis).await;
    let alice = store.create_user("alice", "hash-a").await?.expect("alice");
    let bob = store.create_user("bob", "hash-b").await?.expect("bob");
    assert_eq!(store.create_user("alice", "other").await?, None);

    let mut c = redis.connection().await?;
    let user_keys: Vec<String> = c.keys(format!("{}:user:*", keys.prefix())).await?;
    let mut records: Vec<&String> = user_keys
        .iter()
        .filter(|k| k[keys.prefix().len()..].starts_with(":user:"))
        .filter(|k| {
            k.rsplit(':')
                .next()
                .is_some_and(|id| id.parse::<u64>().is_ok())
        })
        .filter(|k| !k.contains(":name:"))
        .collect();
    records.sort();
    let mut expected = [keys.user(alice), keys.user(bob)];
    expected.sort();
    assert_eq!(records, expected.iter().collect::<Vec<_>>());
    Ok(())
}

#[tokio::test]
async fn scan_routes_skips_keys_that_are_not_our_routes() -> anyhow::Result<()> {
    const N: u64 = 2500;
    let redis = Redis::start().await?;
    let (store, keys) = store_on(&redis).await;
    let mut c = redis.connection().await?;

    let mut pipe = redis::pipe();
    for id in 0..N {
        let server = format!("srv-{}", id % 7);
        pipe.set(
            keys.route(id),
            keys::route_value(&server, &format!("s{id}")),
        )
        .ignore();
        // Keys that are not routes: login slots, accounts, the online index...
        pipe.set(keys.login(id), format!("s{id}@{server}")).ignore();
    }
    let other = Keys::new(format!("{}x", keys.prefix()));
    pipe.set(keys.next_user_id(), 5).ignore();
    pipe.hset(keys.user(1), "name", "n1").ignore();
    pipe.zadd(keys.online(), keys::online_member("n1", 1), 0)
        .ignore();
    // ...another prefix sharing this Redis, and keys matching the pattern but not routes.
    pipe.set(other.route(1), keys::route_value("srv-x", "sx"))
        .ignore();
    pipe.set(format!("{}:route:{{abc}}", keys.prefix()), "x|y")
        .ignore();
    pipe.set(format!("{}:route:{{5}}:extra", keys.prefix()), "x|y")
        .ignore();
    let _: () = pipe.query_async(&mut c).await?;

    let (all, steps) = scan_all(&store, 100).await?;
    assert!(steps > 1, "expected batches, got one step");
    assert!(all.iter().map(|e| e.user_id).eq(0..N), "missing routes");
    for e in &all {
        assert_eq!(
            (e.server_id.clone(), e.session.clone()),
            (format!("srv-{}", e.user_id % 7), format!("s{}", e.user_id)),
            "not one of our routes: {e:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn store_calls_fail_fast_while_redis_is_down_and_recover() -> anyhow::Result<()> {
    let mut redis = Redis::start_with(RedisOptions { aof: true }).await?;
    let (store, _) = store_on(&redis).await;
    let id = store.create_user("dora", "pw").await?.unwrap();

    redis.kill();
    let started = std::time::Instant::now();
    let down = tokio::time::timeout(DEADLINE * 2, store.user_name(id)).await?;
    assert!(
        down.is_err(),
        "a call to a dead Redis must fail, got {down:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a call to a dead Redis took {:?}",
        started.elapsed()
    );

    redis.restart().await?;
    wait_until("the store to reconnect", DEADLINE, || async {
        store.user_name(id).await.is_ok()
    })
    .await?;
    assert_eq!(store.user_name(id).await?.as_deref(), Some("dora"));
    // The restarted Redis has an empty script cache: the Lua-scripted calls still work.
    connect_user(&store, id, "dora", "s1", "srv-a").await;
    store.detach(id, "dora", "s1", "srv-a", "closed").await?;
    assert_eq!(store.routes(&[id]).await?, vec![None]);
    Ok(())
}

#[tokio::test]
async fn inbox_keys_expire_together_but_the_seq_counter_never() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (store, keys) = store_on(&redis).await;
    let store = store.with_inbox_limits(InboxLimits {
        max_messages: 10,
        max_age: Duration::from_secs(3600),
    });
    let mut c = redis.connection().await?;
    let mut batch = vec![with_receipt(msg("a", 1, 2)), msg("b", 1, 2)];
    store.inbox_store(&mut batch).await?;

    for key in [keys.inbox(2), keys.inbox_order(2), keys.inbox_receipts(2)] {
        let pttl: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut c).await?;
        assert!(pttl > 3_590_000 && pttl <= 3_600_000, "{key}: PTTL {pttl}");
    }
    let pttl: i64 = redis::cmd("PTTL")
        .arg(keys.inbox_seq(2))
        .query_async(&mut c)
        .await?;
    assert_eq!(pttl, -1, "the seq counter must not expire");
    // Values are the messages without their seq (the order set holds it).
    let raw: Vec<u8> = c.hget(keys.inbox(2), "a").await?;
    let stored = <Message as prost::Message>::decode(raw.as_slice())?;
    assert_eq!((stored.id.as_str(), stored.seq), ("a", 0));
    let sender: u64 = c.hget(keys.inbox_receipts(2), "a").await?;
    assert_eq!(sender, 1);

    // The inbox expired as a whole (nothing new for the max age): seqs go on.
    let _: () = c
        .del(&[keys.inbox(2), keys.inbox_order(2), keys.inbox_receipts(2)])
        .await?;
    assert_eq!(store.inbox_len(2).await?, 0);
    assert!(store.inbox_ack(&[ack(2, &["a"])]).await?.is_empty());
    let mut again = vec![msg("a", 1, 2)];
    store.inbox_store(&mut again).await?;
    assert_eq!(again[0].seq, 3);
    Ok(())
}

#[tokio::test]
async fn inbox_read_drops_entries_it_cannot_use() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (store, keys) = store_on(&redis).await;
    let mut c = redis.connection().await?;
    let mut batch = vec![msg("a", 1, 2), msg("b", 1, 2), msg("c", 1, 2)];
    store.inbox_store(&mut batch).await?;
    // "a" lost its value (half-expired), "b" holds bytes that are no message.
    let _: () = c.hdel(keys.inbox(2), "a").await?;
    let _: () = c.hset(keys.inbox(2), "b", &[0xff_u8, 0xff][..]).await?;

    let page = store.inbox_read(2, 0, 10).await?;
    assert_eq!(msg_ids(&page), ["c"]);
    assert_eq!(store.inbox_len(2).await?, 1);
    let left: Vec<String> = c.hkeys(keys.inbox(2)).await?;
    assert_eq!(left, ["c"]);
    Ok(())
}

#[tokio::test]
async fn inbox_scripts_are_reloaded_after_a_script_flush() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (store, _) = store_on(&redis).await;
    let mut c = redis.connection().await?;
    let flush = || redis::cmd("SCRIPT").arg("FLUSH").to_owned();

    let mut old = with_receipt(msg("old", 1, 2));
    old.timestamp_ms = 1;
    let mut batch = vec![old, with_receipt(msg("a", 1, 2)), msg("b", 1, 2)];
    let _: () = flush().query_async(&mut c).await?;
    store.inbox_store(&mut batch).await?;
    assert_eq!(seqs(&batch), [1, 2, 3]);

    // Store and lookup in one pipeline: resent whole, each message stored once.
    let _: () = flush().query_async(&mut c).await?;
    let mut more = vec![msg("c", 1, 3)];
    let (stored, routes) = store.inbox_store_then_routes(&mut more, &[3]).await;
    stored?;
    assert_eq!((routes?, seqs(&more)), (vec![None], vec![1]));
    assert_eq!(store.inbox_len(3).await?, 1);

    // A read that skips "old" and prunes it on the way.
    let _: () = flush().query_async(&mut c).await?;
    assert_eq!(msg_ids(&store.inbox_read(2, 0, 1).await?), ["a"]);
    let _: () = flush().query_async(&mut c).await?;
    assert_eq!(msg_ids(&store.inbox_read(2, 0, 10).await?), ["a", "b"]);

    let _: () = flush().query_async(&mut c).await?;
    assert_eq!(
        store.inbox_ack(&[ack(2, &["a", "b"])]).await?,
        [receipt("a", 1, 2)]
    );
    assert_eq!(store.inbox_len(2).await?, 0);
    Ok(())
}

#[tokio::test]
async fn presence_is_kept_in_the_documented_keys() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (store, keys) = store_on(&redis).await;
    let mut c = redis.connection().await?;
    connect_user(&store, 7, "dora", "s1", "srv-a").await;
    connect_user(&store, 8, "erin", "s2", "srv-a").await;
    let ids: Vec<u64> = c.smembers(keys.online_ids()).await?;
    assert_eq!(ids.len(), 2);
    store
        .detach(7, "dora", "s1", "srv-a", reason::KICKED)
        .await?;
    let ids: Vec<u64> = c.smembers(keys.online_ids()).await?;
    assert_eq!(ids, [8]);

    // Compact, explicit fields; `r` only on offline events.
    let raw: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(keys.events())
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await?;
    let fields: Vec<Vec<&str>> = raw
        .iter()
        .map(|(_, f)| f.iter().step_by(2).map(String::as_str).collect())
        .collect();
    assert_eq!(fields[0], ["t", "u", "n", "s", "at"]);
    assert_eq!(fields[2], ["t", "u", "n", "s", "at", "r"]);
    assert_eq!(raw[2].1[..4], ["t", "offline", "u", "7"]);
    assert_eq!(raw[2].1[11], "kicked");
    Ok(())
}

#[tokio::test]
async fn malformed_stream_entries_are_skipped_and_read_past() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (store, keys) = store_on(&redis).await;
    let mut c = redis.connection().await?;
    let xadd = |fields: &[(&str, &str)]| {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(keys.events()).arg("*");
        for (f, v) in fields {
            cmd.arg(*f).arg(*v);
        }
        cmd
    };
    connect_user(&store, 1, "dora", "s1", "srv-a").await;
    let first = store.events_last_id().await?;
    // Written by something else: unknown kind, a missing field, a bad number, a stranger.
    for bad in [
        &[
            ("t", "away"),
            ("u", "1"),
            ("n", "x"),
            ("s", "y"),
            ("at", "1"),
        ][..],
        &[("t", "online"), ("u", "1"), ("n", "x"), ("at", "1")],
        &[
            ("t", "online"),
            ("u", "-1"),
            ("n", "x"),
            ("s", "y"),
            ("at", "1"),
        ],
        &[("hello", "world")],
    ] {
        let _: String = xadd(bad).query_async(&mut c).await?;
    }
    // Unknown extra fields are fine (a newer writer).
    let _: String = xadd(&[
        ("t", "offline"),
        ("u", "2"),
        ("n", "erin"),
        ("s", "srv-b"),
        ("at", "5"),
        ("r", "closed"),
        ("x", "new"),
    ])
    .query_async(&mut c)
    .await?;

    let all = store.events_after(None, 100).await?;
    assert_eq!(
        summary(&all),
        [
            online(1, "dora", "srv-a"),
            offline(2, "erin", "srv-b", "closed")
        ]
    );
    // A page that meets them reads on past them: short still means "no more".
    let page = store.events_after(Some(&first), 2).await?;
    assert_eq!(summary(&page), [offline(2, "erin", "srv-b", "closed")]);
    assert_eq!(store.events_last_id().await?, all[1].id);

    // Only malformed entries after `after`: a wait goes on past them, for new events.
    let _: String = xadd(&[("t", "nope")]).query_async(&mut c).await?;
    let started = std::time::Instant::now();
    let none = store
        .events_wait(&all[1].id, 10, Duration::from_millis(100))
        .await?;
    assert!(none.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(90));
    let waiting = {
        let store = store.clone();
        let after = all[1].id.clone();
        tokio::spawn(async move { store.events_wait(&after, 10, DEADLINE * 6).await })
    };
    connect_user(&store, 3, "fay", "s3", "srv-c").await;
    let got = tokio::time::timeout(DEADLINE, waiting).await???;
    assert_eq!(summary(&got), [online(3, "fay", "srv-c")]);
    Ok(())
}

#[tokio::test]
async fn lease_renewal_extends_its_ttl_in_redis() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (store, keys) = store_on(&redis).await;
    let mut c = redis.connection().await?;
    assert!(store.lease("hook", "a", Duration::from_secs(5)).await?);
    let pttl: i64 = redis::cmd("PTTL")
        .arg(keys.lease("hook"))
        .query_async(&mut c)
        .await?;
    assert!(pttl > 0 && pttl <= 5000, "PTTL {pttl}");
    assert!(store.lease("hook", "a", Duration::from_secs(60)).await?);
    let pttl: i64 = redis::cmd("PTTL")
        .arg(keys.lease("hook"))
        .query_async(&mut c)
        .await?;
    assert!(pttl > 5000 && pttl <= 60_000, "PTTL {pttl}");
    // Contended: the holder's TTL is not touched.
    assert!(!store.lease("hook", "b", Duration::from_secs(1)).await?);
    let pttl: i64 = redis::cmd("PTTL")
        .arg(keys.lease("hook"))
        .query_async(&mut c)
        .await?;
    assert!(pttl > 5000, "PTTL {pttl}");
    let holder: String = c.get(keys.lease("hook")).await?;
    assert_eq!(holder, "a");
    Ok(())
}

#[tokio::test]
async fn channel_writes_interrupted_halfway_are_repaired() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (store, keys) = store_on(&redis).await;
    let mut c = redis.connection().await?;

    // A join that listed the channel for the user, then died: not a member, and the
    // half-listed channel does not count twice toward the limit.
    let _: () = c.sadd(keys.user_channels(1), "room").await?;
    assert!(!store.channel_is_member("room", 1).await?);
    assert_eq!(store.channel_join("room", 1, 1).await?, JoinOutcome::Joined);
    assert!(store.channel_is_member("room", 1).await?);
    assert_eq!(store.channel_list(None, 10).await?, ["room"]);

    // A join that added the member, then died: the next join lists the channel everywhere.
    let _: () = c.zadd(keys.channel("hall"), 2, 2).await?;
    assert_eq!(
        store.channel_join("hall", 2, 5).await?,
        JoinOutcome::AlreadyMember
    );
    assert_eq!(store.user_channels(2).await?, ["hall"]);
    assert_eq!(store.channel_list(None, 10).await?, ["hall", "room"]);

    // A leave that removed the member, then died: the next leave unlists it for the user.
    let _: () = c.sadd(keys.user_channels(3), "gone").await?;
    assert!(!store.channel_leave("gone", 3).await?);
    assert!(store.user_channels(3).await?.is_empty());

    // An empty channel left listed: any leave of it unlists it.
    let _: () = c.zadd(keys.channels(), "ghost", 0).await?;
    assert!(!store.channel_leave("ghost", 9).await?);
    assert_eq!(store.channel_list(None, 10).await?, ["hall", "room"]);

    // The keys are the documented ones.
    let members: Vec<u64> = c.zrange(keys.channel("room"), 0, -1).await?;
    assert_eq!(members, [1]);
    let score: f64 = c.zscore(keys.channel("room"), 1).await?;
    assert_eq!(score, 1.0);
    Ok(())
}

#[tokio::test]
async fn pipelined_scripts_are_reloaded_after_a_script_flush() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (store, _) = store_on(&redis).await;
    let mut c = redis.connection().await?;
    let flush = || redis::cmd("SCRIPT").arg("FLUSH").to_owned();

    let _: () = flush().query_async(&mut c).await?;
    assert_eq!(store.channel_join("room", 1, 5).await?, JoinOutcome::Joined);
    let id = store.create_user("dora", "pw").await?.unwrap();
    connect_user(&store, id, "dora", "s1", "srv-a").await;
    let _: () = flush().query_async(&mut c).await?;
    store.remove_stale_route(&route(id, "srv-a", "s1")).await?;
    assert_eq!(store.routes(&[id]).await?, vec![None]);
    let _: () = flush().query_async(&mut c).await?;
    assert!(store.lease("hook", "a", LONG_TTL).await?);
    Ok(())
}

// =============================================================================================
// The registry under test

fn server(id: &str) -> ServiceInfo {
    ServiceInfo {
        id: id.to_string(),
        tcp_addr: format!("127.0.0.1:{}", 9000 + id.len()),
        ws_addr: "127.0.0.1:9001".into(),
        internal_addr: "127.0.0.1:9100".into(),
        ..ServiceInfo::default()
    }
}

fn route_member(id: &str) -> ServiceInfo {
    ServiceInfo {
        id: id.to_string(),
        http_addr: "127.0.0.1:8080".into(),
        ..ServiceInfo::default()
    }
}

fn ids(m: &Members) -> Vec<String> {
    m.iter().map(|s| s.id.clone()).collect()
}

/// Awaits watch updates (no polling) until `pred` holds for the list, within `deadline`.
async fn wait_members(
    rx: &mut MembersRx,
    what: &str,
    deadline: Duration,
    pred: impl Fn(&Members) -> bool,
) -> anyhow::Result<Members> {
    let wait = async {
        loop {
            {
                let current = rx.borrow_and_update();
                if pred(&current) {
                    return Ok(current.clone());
                }
            }
            rx.changed()
                .await
                .map_err(|_| anyhow::anyhow!("watch closed while waiting for {what}"))?;
        }
    };
    tokio::time::timeout(deadline, wait).await.map_err(|_| {
        anyhow::anyhow!(
            "timed out after {deadline:?} waiting for {what}; list is {:?}",
            ids(&rx.borrow())
        )
    })?
}

async fn registry_on(etcd: &Etcd) -> EtcdRegistry {
    EtcdRegistry::connect(
        &[etcd.endpoint()],
        &format!("/{}", unique_prefix()),
        CALL_TIMEOUT,
    )
    .await
    .expect("connect to etcd")
}

enum RegistryBackend {
    /// A real etcd (kept running by the struct) and the prefix of this test.
    Etcd {
        etcd: Etcd,
        prefix: String,
    },
    Memory(MemoryRegistry),
}

/// One implementation of [`Registry`], fresh and empty. Derefs to the registry.
struct RegistryUnderTest {
    registry: Arc<dyn Registry>,
    backend: RegistryBackend,
}

impl Deref for RegistryUnderTest {
    type Target = dyn Registry;

    fn deref(&self) -> &Self::Target {
        self.registry.as_ref()
    }
}

impl RegistryUnderTest {
    async fn etcd() -> anyhow::Result<Self> {
        let etcd = Etcd::start().await?;
        let prefix = format!("/{}", unique_prefix());
        let registry = EtcdRegistry::connect(&[etcd.endpoint()], &prefix, CALL_TIMEOUT).await?;
        Ok(Self {
            registry: Arc::new(registry),
            backend: RegistryBackend::Etcd { etcd, prefix },
        })
    }

    fn memory() -> Self {
        let registry = MemoryRegistry::new();
        Self {
            registry: Arc::new(registry.clone()),
            backend: RegistryBackend::Memory(registry),
        }
    }

    /// Another client of the same registry: a second connection (another process) for
    /// etcd, a clone for memory (where the process is the registry).
    async fn another_client(&self) -> anyhow::Result<Arc<dyn Registry>> {
        Ok(match &self.backend {
            RegistryBackend::Etcd { etcd, prefix } => {
                Arc::new(EtcdRegistry::connect(&[etcd.endpoint()], prefix, CALL_TIMEOUT).await?)
            }
            RegistryBackend::Memory(registry) => Arc::new(registry.clone()),
        })
    }
}

/// Runs each named `async fn(&RegistryUnderTest) -> anyhow::Result<()>` as two tests,
/// `<name>::etcd` and `<name>::memory`.
macro_rules! for_each_registry {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn etcd() -> anyhow::Result<()> {
                super::$name(&super::RegistryUnderTest::etcd().await?).await
            }

            #[tokio::test]
            async fn memory() -> anyhow::Result<()> {
                super::$name(&super::RegistryUnderTest::memory()).await
            }
        }
    )*};
}

for_each_registry!(
    watcher_sees_registrations_sorted_by_id,
    deregister_removes_at_once,
    a_dropped_registration_leaves_the_list,
    late_watcher_sees_the_current_list,
    servers_and_routes_are_listed_apart,
);

async fn watcher_sees_registrations_sorted_by_id(r: &RegistryUnderTest) -> anyhow::Result<()> {
    let mut rx = r.watch(ServiceKind::Server).await?;
    assert!(rx.borrow().is_empty());

    let ttl = Duration::from_secs(10);
    let _b = r
        .register(ServiceKind::Server, &server("srv-b"), ttl)
        .await?;
    let _a = r
        .register(ServiceKind::Server, &server("srv-a"), ttl)
        .await?;
    let list = wait_members(&mut rx, "both servers", DEADLINE, |m| m.len() == 2).await?;
    assert_eq!(ids(&list), ["srv-a", "srv-b"]);
    assert_eq!(list[0], server("srv-a"), "advertised addresses round-trip");
    assert_eq!(list[1], server("srv-b"));
    assert!(registry::contains(&list, "srv-a"));
    assert!(!registry::contains(&list, "srv-c"));
    Ok(())
}

async fn deregister_removes_at_once(r: &RegistryUnderTest) -> anyhow::Result<()> {
    let mut rx = r.watch(ServiceKind::Server).await?;
    // A long TTL: only deregistration, not expiry, can remove it within the deadline.
    let ttl = Duration::from_secs(60);
    let a = r
        .register(ServiceKind::Server, &server("srv-a"), ttl)
        .await?;
    let _b = r
        .register(ServiceKind::Server, &server("srv-b"), ttl)
        .await?;
    wait_members(&mut rx, "both servers", DEADLINE, |m| m.len() == 2).await?;

    a.deregister().await?;
    let list = wait_members(&mut rx, "srv-a to go", Duration::from_secs(3), |m| {
        !registry::contains(m, "srv-a")
    })
    .await?;
    assert_eq!(ids(&list), ["srv-b"]);
    Ok(())
}

async fn a_dropped_registration_leaves_the_list(r: &RegistryUnderTest) -> anyhow::Result<()> {
    let mut rx = r.watch(ServiceKind::Server).await?;
    // etcd: the lease runs out after the TTL (how long exactly is the etcd-only test's
    // business); memory: no lease, gone at once.
    let ttl = Duration::from_secs(1);
    let a = r
        .register(ServiceKind::Server, &server("srv-a"), ttl)
        .await?;
    let _b = r
        .register(ServiceKind::Server, &server("srv-b"), ttl)
        .await?;
    wait_members(&mut rx, "both servers", DEADLINE, |m| m.len() == 2).await?;

    // A crash: no deregistration.
    drop(a);
    let list = wait_members(&mut rx, "srv-a to leave", ttl + DEADLINE, |m| {
        !registry::contains(m, "srv-a")
    })
    .await?;
    assert_eq!(ids(&list), ["srv-b"], "the held registration stays");
    Ok(())
}

async fn late_watcher_sees_the_current_list(r: &RegistryUnderTest) -> anyhow::Result<()> {
    let ttl = Duration::from_secs(10);
    let _c = r
        .register(ServiceKind::Server, &server("srv-c"), ttl)
        .await?;
    let _a = r
        .register(ServiceKind::Server, &server("srv-a"), ttl)
        .await?;

    // The same client, and another one, watching after the fact: the first value is loaded
    // before `watch` returns.
    let rx = r.watch(ServiceKind::Server).await?;
    assert_eq!(ids(&rx.borrow()), ["srv-a", "srv-c"]);
    let other = r.another_client().await?;
    let rx = other.watch(ServiceKind::Server).await?;
    assert_eq!(ids(&rx.borrow()), ["srv-a", "srv-c"]);
    Ok(())
}

async fn servers_and_routes_are_listed_apart(r: &RegistryUnderTest) -> anyhow::Result<()> {
    let mut servers = r.watch(ServiceKind::Server).await?;
    let mut routes = r.watch(ServiceKind::Route).await?;
    let ttl = Duration::from_secs(10);
    let _s = r.register(ServiceKind::Server, &server("x-1"), ttl).await?;
    let _r = r
        .register(ServiceKind::Route, &route_member("x-2"), ttl)
        .await?;

    let s = wait_members(&mut servers, "the server", DEADLINE, |m| !m.is_empty()).await?;
    let rl = wait_members(&mut routes, "the route", DEADLINE, |m| !m.is_empty()).await?;
    assert_eq!(ids(&s), ["x-1"]);
    assert_eq!(ids(&rl), ["x-2"]);
    assert_eq!(rl[0], route_member("x-2"));
    // Same id in both kinds: two members, one per list.
    let _r2 = r
        .register(ServiceKind::Route, &route_member("x-1"), ttl)
        .await?;
    let rl = wait_members(&mut routes, "the second route", DEADLINE, |m| m.len() == 2).await?;
    assert_eq!(ids(&rl), ["x-1", "x-2"]);
    assert_eq!(ids(&servers.borrow()), ["x-1"]);
    Ok(())
}

// =============================================================================================
// EtcdRegistry only: leases, prefixes, restarts

#[tokio::test]
async fn dropped_registration_expires_with_its_lease() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let reg = registry_on(&etcd).await;
    let mut rx = reg.watch(ServiceKind::Server).await?;
    let ttl = Duration::from_secs(1);
    let a = reg
        .register(ServiceKind::Server, &server("srv-a"), ttl)
        .await?;
    let _b = reg
        .register(ServiceKind::Server, &server("srv-b"), ttl)
        .await?;
    wait_members(&mut rx, "both servers", DEADLINE, |m| m.len() == 2).await?;

    // Kept alive well past its TTL while held.
    let lost = wait_members(&mut rx, "srv-a to be lost", ttl * 3, |m| {
        !registry::contains(m, "srv-a")
    })
    .await;
    assert!(lost.is_err(), "a live registration expired: {lost:?}");

    // A crash: no deregistration, the keep-alive stops, the lease expires.
    let dropped_at = std::time::Instant::now();
    drop(a);
    let list = wait_members(&mut rx, "srv-a to expire", ttl + DEADLINE, |m| {
        !registry::contains(m, "srv-a")
    })
    .await?;
    assert_eq!(ids(&list), ["srv-b"]);
    let took = dropped_at.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "gone after {took:?}: removed, not expired?"
    );
    Ok(())
}

#[tokio::test]
async fn registration_comes_back_when_its_lease_is_lost() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let prefix = format!("/{}", unique_prefix());
    let reg = EtcdRegistry::connect(&[etcd.endpoint()], &prefix, CALL_TIMEOUT).await?;
    let mut rx = reg.watch(ServiceKind::Server).await?;
    let ttl = Duration::from_secs(1);
    let _a = reg
        .register(ServiceKind::Server, &server("srv-a"), ttl)
        .await?;
    wait_members(&mut rx, "srv-a", DEADLINE, |m| m.len() == 1).await?;

    // The lease disappears behind the keeper's back (as after a long pause past the TTL).
    let mut client = etcd.client().await?;
    let key = format!("{prefix}/servers/srv-a");
    let lease = client.get(key.as_str(), None).await?.kvs()[0].lease();
    client.lease_revoke(lease).await?;
    wait_members(&mut rx, "srv-a to go with its lease", DEADLINE, |m| {
        m.is_empty()
    })
    .await?;

    // The keeper notices and registers again under a new lease.
    let list = wait_members(&mut rx, "srv-a to come back", DEADLINE, |m| m.len() == 1).await?;
    assert_eq!(list[0], server("srv-a"));
    let new_lease = client.get(key.as_str(), None).await?.kvs()[0].lease();
    assert_ne!(new_lease, lease);
    Ok(())
}

#[tokio::test]
async fn registries_share_a_prefix_only() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let prefix = format!("/{}", unique_prefix());
    let one = EtcdRegistry::connect(&[etcd.endpoint()], &prefix, CALL_TIMEOUT).await?;
    let two = EtcdRegistry::connect(&[etcd.endpoint()], &prefix, CALL_TIMEOUT).await?;
    // A prefix that extends ours must not be seen by it.
    let longer =
        EtcdRegistry::connect(&[etcd.endpoint()], &format!("{prefix}x"), CALL_TIMEOUT).await?;
    let ttl = Duration::from_secs(10);
    let _a = one
        .register(ServiceKind::Server, &server("srv-a"), ttl)
        .await?;
    let _x = longer
        .register(ServiceKind::Server, &server("srv-x"), ttl)
        .await?;

    let mut rx = two.watch(ServiceKind::Server).await?;
    assert_eq!(ids(&rx.borrow_and_update()), ["srv-a"]);
    let _b = one
        .register(ServiceKind::Server, &server("srv-b"), ttl)
        .await?;
    let list = wait_members(&mut rx, "srv-b", DEADLINE, |m| m.len() == 2).await?;
    assert_eq!(ids(&list), ["srv-a", "srv-b"]);
    let longer_rx = longer.watch(ServiceKind::Server).await?;
    assert_eq!(ids(&longer_rx.borrow()), ["srv-x"]);
    Ok(())
}

#[tokio::test]
async fn registry_follows_an_etcd_restart() -> anyhow::Result<()> {
    let mut etcd = Etcd::start().await?;
    let reg = registry_on(&etcd).await;
    let mut rx = reg.watch(ServiceKind::Server).await?;
    let ttl = Duration::from_secs(2);
    let _a = reg
        .register(ServiceKind::Server, &server("srv-a"), ttl)
        .await?;
    wait_members(&mut rx, "srv-a", DEADLINE, |m| m.len() == 1).await?;

    etcd.restart().await?;
    // The watcher reconnects and sees a registration made after the restart; the old one is
    // still (or again) registered.
    let _b = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match reg
                .register(ServiceKind::Server, &server("srv-b"), ttl)
                .await
            {
                Ok(r) => return r,
                // The client may need a moment to reconnect: there is no event for that.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await?;
    let list = wait_members(
        &mut rx,
        "both servers after the restart",
        Duration::from_secs(20),
        |m| m.len() == 2,
    )
    .await?;
    assert_eq!(ids(&list), ["srv-a", "srv-b"]);
    Ok(())
}

// =============================================================================================
// Connecting

#[tokio::test]
async fn backends_connect_to_the_testkit_and_fail_fast_without_it() -> anyhow::Result<()> {
    let infra = Infra::start().await?;
    let config = infra.backend_config(&unique_prefix());
    let backends = cim_common::backend::Backends::connect(&config)
        .await
        .map_err(anyhow::Error::msg)?;
    let id = backends.store.create_user("dora", "pw").await?.unwrap();
    assert_eq!(backends.store.user_name(id).await?.as_deref(), Some("dora"));
    let rx = backends.registry.watch(ServiceKind::Route).await?;
    assert!(rx.borrow().is_empty());

    let (redis_port, etcd_endpoint) = (infra.redis.port(), infra.etcd.endpoint());
    drop(infra);
    let started = std::time::Instant::now();
    let mut dead = config.clone();
    dead.etcd_endpoints = vec![etcd_endpoint];
    let err = match cim_common::backend::Backends::connect(&dead).await {
        Ok(_) => panic!("connected to dead backends"),
        Err(e) => e,
    };
    assert!(err.starts_with("redis at"), "{err}");
    assert!(err.contains(&redis_port.to_string()), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    Ok(())
}

#[tokio::test]
async fn memory_backends_are_shared_by_their_clones() -> anyhow::Result<()> {
    // Standalone mode gives one clone to the route and one to the server: both must see the
    // same users and the same members.
    let route_side = cim_common::backend::Backends::memory();
    let server_side = route_side.clone();
    let id = route_side.store.create_user("dora", "pw").await?.unwrap();
    assert_eq!(
        server_side.store.user_name(id).await?.as_deref(),
        Some("dora")
    );
    let rx = route_side.registry.watch(ServiceKind::Server).await?;
    let _s = server_side
        .registry
        .register(
            ServiceKind::Server,
            &server("srv-a"),
            Duration::from_secs(10),
        )
        .await?;
    assert_eq!(ids(&rx.borrow()), ["srv-a"]);
    // A fresh pair shares nothing with them.
    let other = cim_common::backend::Backends::memory();
    assert_eq!(other.store.user_name(id).await?, None);
    Ok(())
}
