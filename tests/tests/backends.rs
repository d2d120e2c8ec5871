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
    keys::{self, Keys},
    pb::{Message, MessageKind},
    registry::{
        self, EtcdRegistry, Members, MembersRx, MemoryRegistry, Registry, ServiceInfo, ServiceKind,
    },
    store::{
        AckedReceipt, AttachOutcome, ClaimOutcome, InboxLimits, MemoryStore, RedisStore,
        RouteEntry, StateStore,
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
    claim_pending_is_held_then_expires,
    claim_of_attached_slot_depends_on_server_liveness,
    concurrent_claims_have_one_winner,
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
    inbox_keeps_the_newest_max_messages,
    inbox_read_skips_and_removes_expired_messages,
    inbox_ack_removes_messages_once,
    inbox_ack_returns_each_receipt_once,
    inbox_ack_ignores_oversized_input,
    inboxes_of_users_are_separate,
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

async fn claim_pending_is_held_then_expires(s: &StoreUnderTest) -> anyhow::Result<()> {
    let ttl = Duration::from_millis(300);

    assert_eq!(
        s.claim_login(7, "s1", ttl, &everyone_live).await?,
        ClaimOutcome::Claimed
    );
    // Pending (logged in, not connected): held, with no server, whoever is live.
    assert_eq!(
        s.claim_login(7, "s2", ttl, &nobody_live).await?,
        ClaimOutcome::Held { server: None }
    );
    assert!(s.session_active(7, "s1").await?);
    assert!(!s.session_active(7, "s2").await?);
    assert_eq!(s.slot(7).await.as_deref(), Some("s1"));
    let left = s.slot_ttl_ms(7).await.expect("a pending slot expires");
    assert!(left > 0 && left <= 300, "PTTL {left}");
    // Another user's slot is independent.
    assert_eq!(
        s.claim_login(8, "s2", ttl, &nobody_live).await?,
        ClaimOutcome::Claimed
    );

    wait_until("the pending slot to expire", DEADLINE, || async {
        !s.session_active(7, "s1").await.unwrap()
    })
    .await?;
    assert_eq!(s.slot(7).await, None);
    assert_eq!(
        s.claim_login(7, "s2", ttl, &nobody_live).await?,
        ClaimOutcome::Claimed
    );
    // An expired pending session cannot attach any more.
    assert_eq!(
        s.attach(7, "u7", "s1", "srv-a").await?,
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
            server: Some("srv-a".into())
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
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let store = s.store.clone();
        set.spawn(async move {
            let session = format!("s{i}");
            let out = store.claim_login(3, &session, LONG_TTL, &nobody_live).await;
            (session, out)
        });
    }
    let mut winners = Vec::new();
    while let Some(r) = set.join_next().await {
        let (session, out) = r?;
        match out? {
            ClaimOutcome::Claimed => winners.push(session),
            ClaimOutcome::Held { server } => assert_eq!(server, None),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert!(s.session_active(3, &winners[0]).await?);
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
                s.detach(id, &format!("u{id}"), &format!("s{id}"), "srv-a", "closed").await?;
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

    let receipts = s
        .inbox_ack(&[ack(2, &["plain", "r2", "r1"]), ack(3, &["r3"])])
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

// =============================================================================================
// The registry under test

fn server(id: &str) -> ServiceInfo {
    ServiceInfo {
        id: id.to_string(),
        tcp_addr: format!("127.0.0.1:{}", 9000 + id.len()),
        ws_addr: "127.0.0.1:9001".into(),
        internal_addr: "127.0.0.1:9100".into(),
        http_addr: String::new(),
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
