//! The production backends of cim-common (`RedisStore`, `EtcdRegistry`) against real
//! `redis-server` and `etcd` processes started by the testkit. Each test has its own processes
//! and its own key prefix.

use cim_common::{
    keys::{self, Keys},
    registry::{self, EtcdRegistry, Members, MembersRx, Registry, ServiceInfo, ServiceKind},
    store::{AttachOutcome, ClaimOutcome, RedisStore, RouteEntry, StateStore},
};
use cim_tests::{unique_prefix, wait_until, Etcd, Infra, Redis, RedisOptions};
use redis::AsyncCommands as _;
use std::{collections::BTreeMap, sync::Arc, time::Duration};

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

/// A store under a fresh prefix, and its key layout.
async fn store_on(redis: &Redis) -> (RedisStore, Keys) {
    let prefix = unique_prefix();
    let store = RedisStore::connect(&redis.url(), &prefix, CALL_TIMEOUT)
        .await
        .expect("connect to redis");
    (store, Keys::new(prefix))
}

async fn raw_get(redis: &Redis, key: &str) -> Option<String> {
    let mut c = redis.connection().await.expect("redis connection");
    c.get(key).await.expect("GET")
}

async fn online_members(redis: &Redis, keys: &Keys) -> Vec<String> {
    let mut c = redis.connection().await.expect("redis connection");
    c.zrange(keys.online(), 0, -1).await.expect("ZRANGE")
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

fn route(user_id: u64, server: &str, session: &str) -> RouteEntry {
    RouteEntry {
        user_id,
        server_id: server.to_string(),
        session: session.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// RedisStore: accounts

#[tokio::test]
async fn create_user_and_look_up() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (store, keys) = store_on(&redis).await;

    let alice = store.create_user("alice", "hash-a").await?.expect("alice");
    let bob = store.create_user("bob", "hash-b").await?.expect("bob");
    assert_ne!(alice, bob);
    assert_eq!(store.create_user("alice", "other").await?, None);

    let rec = store.user_by_name("alice").await?.expect("alice record");
    assert_eq!(
        (rec.id, rec.name.as_str(), rec.password_hash.as_str()),
        (alice, "alice", "hash-a"),
        "the duplicate must not overwrite the first account"
    );
    assert_eq!(store.user_by_name("nobody").await?, None);
    assert_eq!(store.user_name(alice).await?.as_deref(), Some("alice"));
    assert_eq!(store.user_name(bob).await?.as_deref(), Some("bob"));
    assert_eq!(store.user_name(999_999).await?, None);

    // The losing duplicate left no orphan record behind.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_create_of_one_name_has_one_winner() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (store, _) = store_on(&redis).await;
    let store = Arc::new(store);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let store = store.clone();
        set.spawn(async move { store.create_user("carol", &format!("pw{i}")).await });
    }
    let mut winners = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Some(id) = r?? {
            winners.push(id);
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let rec = store.user_by_name("carol").await?.unwrap();
    assert_eq!(rec.id, winners[0]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// RedisStore: login slots

#[tokio::test]
async fn claim_pending_is_held_then_expires() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (store, _) = store_on(&redis).await;
    let ttl = Duration::from_millis(300);

    assert_eq!(
        store.claim_login(7, "s1", ttl, &everyone_live).await?,
        ClaimOutcome::Claimed
    );
    // Pending (logged in, not connected): held, with no server, whoever is live.
    assert_eq!(
        store.claim_login(7, "s2", ttl, &nobody_live).await?,
        ClaimOutcome::Held { server: None }
    );
    assert!(store.session_active(7, "s1").await?);
    assert!(!store.session_active(7, "s2").await?);
    // Another user's slot is independent.
    assert_eq!(
        store.claim_login(8, "s2", ttl, &nobody_live).await?,
        ClaimOutcome::Claimed
    );

    wait_until("the pending slot to expire", DEADLINE, || async {
        !store.session_active(7, "s1").await.unwrap()
    })
    .await?;
    assert_eq!(
        store.claim_login(7, "s2", ttl, &nobody_live).await?,
        ClaimOutcome::Claimed
    );
    // An expired pending session cannot attach any more.
    assert_eq!(
        store.attach(7, "u7", "s1", "srv-a").await?,
        AttachOutcome::SessionInvalid
    );
    Ok(())
}

#[tokio::test]
async fn claim_of_attached_slot_depends_on_server_liveness() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (store, keys) = store_on(&redis).await;
    let ttl = Duration::from_millis(300);

    assert_eq!(
        store.claim_login(1, "s1", ttl, &nobody_live).await?,
        ClaimOutcome::Claimed
    );
    assert_eq!(
        store.attach(1, "dora", "s1", "srv-a").await?,
        AttachOutcome::Attached
    );
    // Attached slots do not expire.
    let mut c = redis.connection().await?;
    let pttl: i64 = redis::cmd("PTTL")
        .arg(keys.login(1))
        .query_async(&mut c)
        .await?;
    assert_eq!(pttl, -1, "an attached slot must have no expiry");

    let only_a = |s: &str| s == "srv-a";
    assert_eq!(
        store.claim_login(1, "s2", ttl, &only_a).await?,
        ClaimOutcome::Held {
            server: Some("srv-a".into())
        }
    );
    assert!(store.session_active(1, "s1").await?);

    // srv-a died: the slot is taken over by the new session, pending again.
    assert_eq!(
        store.claim_login(1, "s2", ttl, &nobody_live).await?,
        ClaimOutcome::Claimed
    );
    assert!(!store.session_active(1, "s1").await?);
    assert!(store.session_active(1, "s2").await?);
    let pttl: i64 = redis::cmd("PTTL")
        .arg(keys.login(1))
        .query_async(&mut c)
        .await?;
    assert!(
        pttl > 0 && pttl <= 300,
        "a taken-over slot is pending with the new TTL, got PTTL {pttl}"
    );
    // The old session can neither attach again nor release the new one.
    assert_eq!(
        store.attach(1, "dora", "s1", "srv-a").await?,
        AttachOutcome::SessionInvalid
    );
    assert_eq!(store.release_login(1, "s1").await?, None);
    assert!(store.session_active(1, "s2").await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_have_one_winner() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (store, _) = store_on(&redis).await;
    let store = Arc::new(store);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let store = store.clone();
        set.spawn(async move {
            let s = format!("s{i}");
            let out = store.claim_login(3, &s, LONG_TTL, &nobody_live).await;
            (s, out)
        });
    }
    let mut winners = Vec::new();
    while let Some(r) = set.join_next().await {
        let (s, out) = r?;
        match out? {
            ClaimOutcome::Claimed => winners.push(s),
            ClaimOutcome::Held { server } => assert_eq!(server, None),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert!(store.session_active(3, &winners[0]).await?);
    Ok(())
}

#[tokio::test]
async fn attach_is_single_use() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (store, keys) = store_on(&redis).await;

    // Never claimed.
    assert_eq!(
        store.attach(2, "erin", "s1", "srv-a").await?,
        AttachOutcome::SessionInvalid
    );
    assert_eq!(raw_get(&redis, &keys.route(2)).await, None);

    store.claim_login(1, "s1", LONG_TTL, &nobody_live).await?;
    // Another session than the pending one.
    assert_eq!(
        store.attach(1, "dora", "s-other", "srv-a").await?,
        AttachOutcome::SessionInvalid
    );
    assert_eq!(
        store.attach(1, "dora", "s1", "srv-a").await?,
        AttachOutcome::Attached
    );
    assert_eq!(
        raw_get(&redis, &keys.login(1)).await.as_deref(),
        Some("s1@srv-a")
    );
    // The same token again, on the same or on another server.
    assert_eq!(
        store.attach(1, "dora", "s1", "srv-a").await?,
        AttachOutcome::SessionInvalid
    );
    assert_eq!(
        store.attach(1, "dora", "s1", "srv-b").await?,
        AttachOutcome::SessionInvalid
    );
    assert_eq!(
        store.routes(&[1]).await?,
        vec![Some(route(1, "srv-a", "s1"))]
    );
    assert!(store.session_active(1, "s1").await?);
    assert_eq!(
        online_members(&redis, &keys).await,
        vec![keys::online_member("dora", 1)]
    );
    Ok(())
}

#[tokio::test]
async fn detach_removes_only_its_own_route_and_slot() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (store, keys) = store_on(&redis).await;
    connect_user(&store, 1, "dora", "s1", "srv-a").await;

    // Wrong session, wrong server: nothing changes.
    store.detach(1, "dora", "s-other", "srv-a").await?;
    store.detach(1, "dora", "s1", "srv-b").await?;
    assert_eq!(
        store.routes(&[1]).await?,
        vec![Some(route(1, "srv-a", "s1"))]
    );
    assert!(store.session_active(1, "s1").await?);
    assert_eq!(online_members(&redis, &keys).await.len(), 1);

    store.detach(1, "dora", "s1", "srv-a").await?;
    assert_eq!(store.routes(&[1]).await?, vec![None]);
    assert!(!store.session_active(1, "s1").await?);
    assert!(online_members(&redis, &keys).await.is_empty());
    assert_eq!(raw_get(&redis, &keys.login(1)).await, None);
    // Detaching twice is harmless.
    store.detach(1, "dora", "s1", "srv-a").await?;
    Ok(())
}

#[tokio::test]
async fn late_detach_of_an_old_session_keeps_the_new_one() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (store, keys) = store_on(&redis).await;
    connect_user(&store, 1, "dora", "s1", "srv-a").await;

    // srv-a is declared dead; the user logs in again and lands on srv-b.
    assert_eq!(
        store.claim_login(1, "s2", LONG_TTL, &nobody_live).await?,
        ClaimOutcome::Claimed
    );
    assert_eq!(
        store.attach(1, "dora", "s2", "srv-b").await?,
        AttachOutcome::Attached
    );
    // srv-a wakes up and cleans up its old connection.
    store.detach(1, "dora", "s1", "srv-a").await?;
    assert_eq!(
        store.routes(&[1]).await?,
        vec![Some(route(1, "srv-b", "s2"))]
    );
    assert_eq!(
        raw_get(&redis, &keys.login(1)).await.as_deref(),
        Some("s2@srv-b")
    );
    assert_eq!(
        online_members(&redis, &keys).await,
        vec![keys::online_member("dora", 1)],
        "the user is still online"
    );

    // Reconnect on the same server with a new session: same story.
    store.release_login(1, "s2").await?;
    connect_user(&store, 1, "dora", "s3", "srv-b").await;
    store.detach(1, "dora", "s2", "srv-b").await?;
    assert_eq!(
        store.routes(&[1]).await?,
        vec![Some(route(1, "srv-b", "s3"))]
    );
    assert_eq!(online_members(&redis, &keys).await.len(), 1);
    Ok(())
}

#[tokio::test]
async fn release_login_frees_the_slot_and_returns_the_server() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (store, keys) = store_on(&redis).await;

    // Pending: freed, no server.
    store.claim_login(1, "ab", LONG_TTL, &nobody_live).await?;
    assert_eq!(store.release_login(1, "other").await?, None);
    assert!(store.session_active(1, "ab").await?);
    assert_eq!(store.release_login(1, "ab").await?, None);
    assert!(!store.session_active(1, "ab").await?);
    assert_eq!(raw_get(&redis, &keys.login(1)).await, None);

    // Attached: freed, returns the server.
    connect_user(&store, 1, "dora", "abc", "srv-a").await;
    // A session id that is a prefix of the holder's must not match.
    assert_eq!(store.release_login(1, "ab").await?, None);
    assert!(store.session_active(1, "abc").await?);
    assert_eq!(
        store.release_login(1, "abc").await?.as_deref(),
        Some("srv-a")
    );
    assert!(!store.session_active(1, "abc").await?);
    // Released twice: nothing more.
    assert_eq!(store.release_login(1, "abc").await?, None);
    // Free for a new login.
    assert_eq!(
        store.claim_login(1, "s9", LONG_TTL, &everyone_live).await?,
        ClaimOutcome::Claimed
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// RedisStore: routes

#[tokio::test]
async fn routes_returns_one_entry_per_id_in_order() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (store, _) = store_on(&redis).await;
    connect_user(&store, 10, "u10", "s10", "srv-a").await;
    connect_user(&store, 20, "u20", "s20", "srv-b").await;

    assert_eq!(store.routes(&[]).await?, vec![]);
    assert_eq!(
        store.routes(&[10]).await?,
        vec![Some(route(10, "srv-a", "s10"))]
    );
    assert_eq!(store.routes(&[11]).await?, vec![None]);
    assert_eq!(
        store.routes(&[20, 11, 10, 20, 12]).await?,
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
    let got = store.routes(&ids).await?;
    assert_eq!(got.len(), 1000);
    assert_eq!(got.iter().flatten().count(), 2);
    assert_eq!(got[10], Some(route(10, "srv-a", "s10")));
    Ok(())
}

#[tokio::test]
async fn scan_routes_visits_every_route_exactly_once() -> anyhow::Result<()> {
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

    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    let mut cursor = 0;
    let mut steps = 0;
    loop {
        let (next, batch) = store.scan_routes(cursor, 100).await?;
        steps += 1;
        assert!(steps < 10_000, "scan does not terminate");
        for e in batch {
            assert_eq!(
                (e.server_id.clone(), e.session.clone()),
                (format!("srv-{}", e.user_id % 7), format!("s{}", e.user_id)),
                "not one of our routes: {e:?}"
            );
            *seen.entry(e.user_id).or_default() += 1;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let dups: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).collect();
    assert!(dups.is_empty(), "routes returned more than once: {dups:?}");
    assert_eq!(seen.len() as u64, N, "missing routes");
    assert!(seen.keys().copied().eq(0..N));
    assert!(steps > 1, "expected batches, got one step");

    // An empty keyspace scans to nothing.
    let (empty, _) = store_on(&redis).await;
    let mut cursor = 0;
    loop {
        let (next, batch) = empty.scan_routes(cursor, 1000).await?;
        assert!(batch.is_empty());
        if next == 0 {
            break;
        }
        cursor = next;
    }
    Ok(())
}

#[tokio::test]
async fn remove_stale_route_removes_only_an_unchanged_route() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (store, keys) = store_on(&redis).await;
    let id = store.create_user("dora", "pw").await?.unwrap();
    connect_user(&store, id, "dora", "s1", "srv-a").await;

    // Not the current route: no effect.
    store.remove_stale_route(&route(id, "srv-a", "s0")).await?;
    store.remove_stale_route(&route(id, "srv-b", "s1")).await?;
    assert_eq!(
        store.routes(&[id]).await?,
        vec![Some(route(id, "srv-a", "s1"))]
    );
    assert_eq!(online_members(&redis, &keys).await.len(), 1);

    // Read as stale, but the user reconnected meanwhile: the new route stays.
    let stale = store.routes(&[id]).await?[0].clone().unwrap();
    assert_eq!(
        store.claim_login(id, "s2", LONG_TTL, &nobody_live).await?,
        ClaimOutcome::Claimed
    );
    store.attach(id, "dora", "s2", "srv-b").await?;
    store.remove_stale_route(&stale).await?;
    assert_eq!(
        store.routes(&[id]).await?,
        vec![Some(route(id, "srv-b", "s2"))]
    );
    assert_eq!(
        online_members(&redis, &keys).await,
        vec![keys::online_member("dora", id)]
    );

    // Unchanged: removed, with its online entry.
    store.remove_stale_route(&route(id, "srv-b", "s2")).await?;
    assert_eq!(store.routes(&[id]).await?, vec![None]);
    assert!(online_members(&redis, &keys).await.is_empty());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// RedisStore: online index

#[tokio::test]
async fn online_page_filters_by_prefix_and_pages_by_cursor() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (store, _) = store_on(&redis).await;
    let names = [
        "bob", "al", "alice", "albert", "bobby", "carol", "alfred", "zoë", "Alan",
    ];
    for (i, name) in names.iter().enumerate() {
        let id = 100 + i as u64;
        connect_user(&store, id, name, &format!("s{id}"), "srv-a").await;
    }
    let page_names = |page: &[cim_common::store::OnlineEntry]| {
        page.iter().map(|e| e.name.clone()).collect::<Vec<_>>()
    };

    // Everyone, in byte order of names.
    let all = store.online_page("", None, 100).await?;
    assert_eq!(
        page_names(&all),
        ["Alan", "al", "albert", "alfred", "alice", "bob", "bobby", "carol", "zoë"]
    );
    for e in &all {
        let i = names.iter().position(|n| *n == e.name).unwrap();
        assert_eq!(e.user_id, 100 + i as u64);
    }

    // Prefix "al", two at a time.
    let p1 = store.online_page("al", None, 2).await?;
    assert_eq!(page_names(&p1), ["al", "albert"]);
    let p2 = store
        .online_page("al", Some(&p1.last().unwrap().cursor), 2)
        .await?;
    assert_eq!(page_names(&p2), ["alfred", "alice"]);
    let p3 = store
        .online_page("al", Some(&p2.last().unwrap().cursor), 2)
        .await?;
    assert!(p3.is_empty(), "got {:?}", page_names(&p3));

    // A cursor before the prefix range starts at the prefix; one after it ends the listing.
    let bob = store.online_page("bob", Some(&all[0].cursor), 10).await?;
    assert_eq!(page_names(&bob), ["bob", "bobby"]);
    let after_bob = store.online_page("bob", Some(&bob[0].cursor), 10).await?;
    assert_eq!(page_names(&after_bob), ["bobby"]);
    let past = store.online_page("al", Some(&bob[0].cursor), 10).await?;
    assert!(past.is_empty());

    // Multi-byte prefix, no match, limit 0.
    assert_eq!(
        page_names(&store.online_page("zo", None, 10).await?),
        ["zoë"]
    );
    assert!(store.online_page("zz", None, 10).await?.is_empty());
    assert!(store.online_page("", None, 0).await?.is_empty());

    // Paging through everyone one by one yields everyone once.
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.online_page("", after.as_deref(), 1).await?;
        let Some(e) = page.last() else { break };
        after = Some(e.cursor.clone());
        paged.extend(page_names(&page));
        assert!(paged.len() <= names.len());
    }
    assert_eq!(paged, page_names(&all));

    // Offline users leave the index.
    store.detach(102, "alice", "s102", "srv-a").await?;
    assert_eq!(
        page_names(&store.online_page("al", None, 10).await?),
        ["al", "albert", "alfred"]
    );
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
    store.detach(id, "dora", "s1", "srv-a").await?;
    assert_eq!(store.routes(&[id]).await?, vec![None]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// EtcdRegistry

async fn registry_on(etcd: &Etcd) -> EtcdRegistry {
    EtcdRegistry::connect(
        &[etcd.endpoint()],
        &format!("/{}", unique_prefix()),
        CALL_TIMEOUT,
    )
    .await
    .expect("connect to etcd")
}

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

#[tokio::test]
async fn watcher_sees_registrations_sorted_by_id() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let reg = registry_on(&etcd).await;
    let mut rx = reg.watch(ServiceKind::Server).await?;
    assert!(rx.borrow().is_empty());

    let _b = reg
        .register(
            ServiceKind::Server,
            &server("srv-b"),
            Duration::from_secs(10),
        )
        .await?;
    let _a = reg
        .register(
            ServiceKind::Server,
            &server("srv-a"),
            Duration::from_secs(10),
        )
        .await?;
    let list = wait_members(&mut rx, "both servers", DEADLINE, |m| m.len() == 2).await?;
    assert_eq!(ids(&list), ["srv-a", "srv-b"]);
    assert_eq!(list[0], server("srv-a"), "advertised addresses round-trip");
    assert_eq!(list[1], server("srv-b"));
    assert!(registry::contains(&list, "srv-a"));
    assert!(!registry::contains(&list, "srv-c"));
    Ok(())
}

#[tokio::test]
async fn deregister_removes_at_once() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let reg = registry_on(&etcd).await;
    let mut rx = reg.watch(ServiceKind::Server).await?;
    // A long TTL: only deregistration, not expiry, can remove it within the deadline.
    let ttl = Duration::from_secs(60);
    let a = reg
        .register(ServiceKind::Server, &server("srv-a"), ttl)
        .await?;
    let _b = reg
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
async fn late_watcher_sees_the_current_list() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let prefix = format!("/{}", unique_prefix());
    let reg = EtcdRegistry::connect(&[etcd.endpoint()], &prefix, CALL_TIMEOUT).await?;
    let ttl = Duration::from_secs(10);
    let _c = reg
        .register(ServiceKind::Server, &server("srv-c"), ttl)
        .await?;
    let _a = reg
        .register(ServiceKind::Server, &server("srv-a"), ttl)
        .await?;

    // The same client, and another one (another process), watching after the fact: the first
    // value is loaded before `watch` returns.
    let rx = reg.watch(ServiceKind::Server).await?;
    assert_eq!(ids(&rx.borrow()), ["srv-a", "srv-c"]);
    let other = EtcdRegistry::connect(&[etcd.endpoint()], &prefix, CALL_TIMEOUT).await?;
    let rx = other.watch(ServiceKind::Server).await?;
    assert_eq!(ids(&rx.borrow()), ["srv-a", "srv-c"]);
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
async fn servers_and_routes_are_listed_apart() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let reg = registry_on(&etcd).await;
    let mut servers = reg.watch(ServiceKind::Server).await?;
    let mut routes = reg.watch(ServiceKind::Route).await?;
    let ttl = Duration::from_secs(10);
    let _s = reg
        .register(ServiceKind::Server, &server("x-1"), ttl)
        .await?;
    let _r = reg
        .register(ServiceKind::Route, &route_member("x-2"), ttl)
        .await?;

    let s = wait_members(&mut servers, "the server", DEADLINE, |m| !m.is_empty()).await?;
    let r = wait_members(&mut routes, "the route", DEADLINE, |m| !m.is_empty()).await?;
    assert_eq!(ids(&s), ["x-1"]);
    assert_eq!(ids(&r), ["x-2"]);
    assert_eq!(r[0], route_member("x-2"));
    // Same id in both kinds: two members, one per list.
    let _r2 = reg
        .register(ServiceKind::Route, &route_member("x-1"), ttl)
        .await?;
    let r = wait_members(&mut routes, "the second route", DEADLINE, |m| m.len() == 2).await?;
    assert_eq!(ids(&r), ["x-1", "x-2"]);
    assert_eq!(ids(&servers.borrow()), ["x-1"]);
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
