//! What only the memory store has: a clock it reads lazily, and purging. Its behaviour
//! shared with Redis is tested once for both in `tests/tests/backends/`.

use super::{inbox::UserInbox, *};

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
    store.server_routes("srv-a", 0, 10).await.unwrap();
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
    store.server_routes("srv-a", 0, 10).await.unwrap();
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
    let mut inbox = UserInbox::default();
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
    let mut inbox = UserInbox::default();
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
async fn a_resumed_server_walk_does_not_revisit_user_zero() {
    let store = MemoryStore::new();
    for user in [0, 1, 2] {
        let session = format!("s{user}");
        store
            .claim_login(user, &session, Duration::from_secs(60), &nobody_live)
            .await
            .unwrap();
        store.attach(user, "u", &session, "srv-a").await.unwrap();
    }
    let (next, first) = store.server_routes("srv-a", 0, 1).await.unwrap();
    assert_eq!((next, first[0].user_id), (1, 0));
    let (next, second) = store.server_routes("srv-a", next, 1).await.unwrap();
    assert_eq!((next, second[0].user_id), (2, 1));
    let (next, third) = store.server_routes("srv-a", next, 5).await.unwrap();
    assert_eq!((next, third[0].user_id), (0, 2));
}
