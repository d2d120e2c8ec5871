//! What only a Redis Cluster store shows: the merge of the shards' presence streams.

use super::*;

/// A shard whose node's clock runs ahead hands its events out only once every shard's
/// clock has passed them: never before events that can still appear in other shards with
/// lower ids (which a reader resuming after the early one would skip), and never lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_a_shard_ahead_in_time_wait_for_the_other_clocks() -> anyhow::Result<()> {
    let s = StoreUnderTest::cluster().await?;
    let Peek::Redis { redis, keys } = &s.peek else {
        unreachable!("a cluster store")
    };
    assert_eq!(keys.shards(), cim_common::keys::CLUSTER_SHARDS);
    let mut c = redis.connection().await?;
    // User 16 is in shard 0; its event carries an id 600 ms in the future, as a node whose
    // clock is ahead would give it.
    let ahead = u64::try_from(now_ms())? + 600;
    let _: String = redis::cmd("XADD")
        .arg(keys.events(keys.user_shard(16)))
        .arg(format!("{ahead}-0"))
        .arg(&[
            "t", "online", "u", "16", "n", "u16", "s", "srv-a", "at", "1",
        ])
        .query_async(&mut c)
        .await?;
    // Meanwhile user 1 (shard 1) comes online now.
    s.connect_user(1, "u1", "s1", "srv-a").await;

    let first = s.events_after(None, 100).await?;
    assert_eq!(summary(&first), [online(1, "u1", "srv-a")], "{first:?}");
    assert!(
        EventId::parse(&s.events_last_id().await?) < Some(EventId::new(ahead, 0)),
        "the tail would start past an event not handed out yet"
    );
    // Resuming after user 1's event: user 16's comes once the clocks pass it.
    let after = first[0].id.clone();
    let store = s.store.clone();
    wait_until("the early event to be handed out", DEADLINE, || {
        let (store, after) = (store.clone(), after.clone());
        async move {
            !store
                .events_after(Some(&after), 100)
                .await
                .expect("events")
                .is_empty()
        }
    })
    .await?;
    let late = s.events_after(Some(&after), 100).await?;
    assert_eq!(late.len(), 1, "{late:?}");
    assert_eq!(late[0].event.user_id, 16);
    let id = EventId::parse(&late[0].id).unwrap();
    assert_eq!((id.ms, id.shard), (ahead, 0));
    assert!(EventId::parse(&after) < Some(id));
    Ok(())
}
