//! What only a real Redis can show: raw keys, outages, restarts, scripts.

use super::*;

pub(crate) async fn store_on(redis: &Redis) -> (RedisStore, Keys) {
    let prefix = unique_prefix();
    let store = RedisStore::connect(&redis.url(), &prefix, CALL_TIMEOUT)
        .await
        .expect("connect to redis");
    (store, Keys::new(prefix))
}

/// Claims and attaches `session` of `user` on `server` (asserting both succeed).
pub(crate) async fn connect_user(
    store: &RedisStore,
    user: u64,
    name: &str,
    session: &str,
    server: &str,
) {
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
pub(crate) async fn scripts_are_loaded_at_connect() -> anyhow::Result<()> {
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
pub(crate) async fn a_refused_duplicate_leaves_no_record_in_redis() -> anyhow::Result<()> {
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
pub(crate) async fn store_calls_fail_fast_while_redis_is_down_and_recover() -> anyhow::Result<()> {
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
pub(crate) async fn inbox_keys_expire_together_but_the_seq_counter_never() -> anyhow::Result<()> {
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
pub(crate) async fn inbox_read_drops_entries_it_cannot_use() -> anyhow::Result<()> {
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
pub(crate) async fn inbox_scripts_are_reloaded_after_a_script_flush() -> anyhow::Result<()> {
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
pub(crate) async fn presence_is_kept_in_the_documented_keys() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (store, keys) = store_on(&redis).await;
    let mut c = redis.connection().await?;
    connect_user(&store, 7, "dora", "s1", "srv-a").await;
    connect_user(&store, 8, "erin", "s2", "srv-a").await;
    let ids: Vec<u64> = c.smembers(keys.online_ids(0)).await?;
    assert_eq!(ids.len(), 2);
    store
        .detach(7, "dora", "s1", "srv-a", reason::KICKED)
        .await?;
    let ids: Vec<u64> = c.smembers(keys.online_ids(0)).await?;
    assert_eq!(ids, [8]);

    // Compact, explicit fields; `r` only on offline events.
    let raw: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(keys.events(0))
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
pub(crate) async fn malformed_stream_entries_are_skipped_and_read_past() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (store, keys) = store_on(&redis).await;
    let mut c = redis.connection().await?;
    let xadd = |fields: &[(&str, &str)]| {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(keys.events(0)).arg("*");
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
pub(crate) async fn lease_renewal_extends_its_ttl_in_redis() -> anyhow::Result<()> {
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
pub(crate) async fn channel_writes_interrupted_halfway_are_repaired() -> anyhow::Result<()> {
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
    let _: () = c.zadd(keys.channel(0, "hall"), 2, 2).await?;
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
    let _: () = c.zadd(keys.channels(0), "ghost", 0).await?;
    assert!(!store.channel_leave("ghost", 9).await?);
    assert_eq!(store.channel_list(None, 10).await?, ["hall", "room"]);

    // The keys are the documented ones.
    let members: Vec<u64> = c.zrange(keys.channel(0, "room"), 0, -1).await?;
    assert_eq!(members, [1]);
    let score: f64 = c.zscore(keys.channel(0, "room"), 1).await?;
    assert_eq!(score, 1.0);
    Ok(())
}

#[tokio::test]
pub(crate) async fn pipelined_scripts_are_reloaded_after_a_script_flush() -> anyhow::Result<()> {
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
