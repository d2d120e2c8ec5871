//! Presence events, against both stores.

use super::*;

/// `(kind, user, name, server, reason)` of events, to compare without ids and times.
pub(crate) fn summary(events: &[StoredEvent]) -> Vec<(PresenceKind, u64, String, String, String)> {
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

pub(crate) fn online(
    user: u64,
    name: &str,
    server: &str,
) -> (PresenceKind, u64, String, String, String) {
    (
        PresenceKind::Online,
        user,
        name.into(),
        server.into(),
        String::new(),
    )
}

pub(crate) fn offline(
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
pub(crate) async fn all_events(store: &dyn StateStore) -> anyhow::Result<Vec<StoredEvent>> {
    Ok(store.events_after(None, MAX_EVENTS_READ).await?)
}

/// Every event, once there are at least `n`: on a cluster the newest may come with a later
/// read (the shards' clock watermark, see `Events::events_after`).
pub(crate) async fn events_at_least(
    store: &dyn StateStore,
    n: usize,
) -> anyhow::Result<Vec<StoredEvent>> {
    wait_until(&format!("{n} events"), DEADLINE, || async {
        all_events(store).await.is_ok_and(|e| e.len() >= n)
    })
    .await?;
    all_events(store).await
}

pub(crate) fn event_ids(events: &[StoredEvent]) -> Vec<EventId> {
    events
        .iter()
        .map(|e| EventId::parse(&e.id).unwrap_or_else(|| panic!("bad event id {:?}", e.id)))
        .collect()
}

pub(crate) async fn attach_and_detach_publish_presence_events(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    assert_eq!(s.events_last_id().await?, "0-0");
    assert!(all_events(&**s).await?.is_empty());

    let before = now_ms();
    s.connect_user(1, "dora", "s1", "srv-a").await;
    let after = now_ms();
    let events = events_at_least(&**s, 1).await?;
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
        summary(&events_at_least(&**s, 2).await?),
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
    let events = events_at_least(&**s, 4).await?;
    assert_eq!(
        summary(&events[2..]),
        [online(1, "dora", "srv-a"), online(1, "dora", "srv-b")]
    );
    let ids = event_ids(&events);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    assert_eq!(s.events_last_id().await?, events[3].id);
    Ok(())
}

pub(crate) async fn remove_stale_route_publishes_server_lost(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
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

pub(crate) async fn events_after_pages_from_an_exclusive_start(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
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
        seq: id.seq + 1,
        ..id
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

pub(crate) async fn events_wait_returns_new_events_or_nothing_after_its_timeout(
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

pub(crate) async fn event_stream_is_capped_near_events_max_len(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
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
    // On a cluster the newest events may come with a later read (the shards' clock
    // watermark, see `Events::events_after`): wait until the last one is handed out.
    let last = published.last().cloned();
    wait_until("the last event to be handed out", DEADLINE, || {
        let store = store.clone();
        let last = last.clone();
        async move {
            all_events(&*store)
                .await
                .is_ok_and(|e| summary(&e).last().cloned() == last)
        }
    })
    .await?;
    let kept = all_events(&*store).await?;
    // A cluster trims each shard's stream to its share of MAX, each with that slack (here
    // nothing is trimmed: 300 events over 16 shards stay below one node each).
    let (min, slack) = if s.is_cluster() {
        (
            MAX.min(published.len()),
            SLACK * cim_common::keys::CLUSTER_SHARDS,
        )
    } else {
        (MAX, SLACK)
    };
    assert!(
        (min..=MAX + slack).contains(&kept.len()),
        "{} events kept of {}",
        kept.len(),
        published.len()
    );
    if !s.is_redis() {
        assert_eq!(kept.len(), MAX);
    }
    // The newest ones, in order: on one stream exactly as published; over a cluster's shards
    // each user's in the order published (events of one ms in different shards are ordered
    // by shard, not by publication), and the whole in id order.
    let newest = &published[published.len() - kept.len()..];
    if s.is_cluster() {
        let by_user = |events: &[(PresenceKind, u64, String, String, String)]| {
            let mut users: BTreeMap<u64, Vec<_>> = BTreeMap::new();
            for e in events {
                users.entry(e.1).or_default().push(e.clone());
            }
            users
        };
        assert_eq!(by_user(&summary(&kept)), by_user(newest));
        let ids = event_ids(&kept);
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    } else {
        assert_eq!(summary(&kept), newest);
    }
    assert_eq!(store.events_last_id().await?, kept.last().unwrap().id);
    Ok(())
}

pub(crate) async fn message_events_are_published_once_per_message_and_receiver(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    use cim_common::events::MessageEvent;
    let event = |id: &str, receiver: u64, body: Option<&str>| PresenceEvent {
        kind: PresenceKind::Message,
        user_id: receiver,
        name: String::new(),
        server_id: String::new(),
        at_ms: now_ms(),
        reason: String::new(),
        message: Some(MessageEvent {
            id: id.into(),
            sender_id: 3,
            sender_name: "alice".into(),
            conversation_type: "group".into(),
            conversation_id: 9,
            kind: "MESSAGE_KIND_GROUP_CHAT".into(),
            log_seq: 4,
            body: body.map(str::to_string),
        }),
    };
    s.publish_messages(&[event("m1", 5, Some("hi")), event("m1", 6, None)])
        .await?;
    // A retry publishes nothing again; another message does.
    s.publish_messages(&[event("m1", 5, Some("hi")), event("m2", 5, None)])
        .await?;
    // On a cluster a just-published event may come with a later read (the shards' clock
    // watermark, see `Events::events_after`): wait for the third.
    wait_until("three message events", DEADLINE, || async {
        all_events(&**s).await.is_ok_and(|e| e.len() >= 3)
    })
    .await?;
    let events = all_events(&**s).await?;
    let got: Vec<(u64, String)> = events
        .iter()
        .map(|e| {
            (
                e.event.user_id,
                e.event.message.as_ref().unwrap().id.clone(),
            )
        })
        .collect();
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            (5, "m1".to_string()),
            (5, "m2".to_string()),
            (6, "m1".to_string())
        ]
    );
    // Everything survives the store round trip, the body only where it was given.
    let first = events
        .iter()
        .find(|e| e.event.user_id == 5 && e.event.message.as_ref().unwrap().id == "m1")
        .unwrap();
    assert_eq!(
        first.event,
        event("m1", 5, Some("hi")).with_at(first.event.at_ms)
    );
    Ok(())
}

trait WithAt {
    fn with_at(self, at_ms: i64) -> Self;
}

impl WithAt for PresenceEvent {
    fn with_at(mut self, at_ms: i64) -> Self {
        self.at_ms = at_ms;
        self
    }
}
