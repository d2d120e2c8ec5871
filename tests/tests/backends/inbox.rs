//! Inboxes and receipts, against both stores.

use super::*;

/// A private message from `from` to `to`, accepted now.
pub(crate) fn msg(id: &str, from: u64, to: u64) -> Message {
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
pub(crate) fn with_receipt(mut m: Message) -> Message {
    m.receipt = true;
    m
}

pub(crate) fn msg_ids(page: &[Message]) -> Vec<&str> {
    page.iter().map(|m| m.id.as_str()).collect()
}

pub(crate) fn seqs(page: &[Message]) -> Vec<u64> {
    page.iter().map(|m| m.seq).collect()
}

pub(crate) fn ack(user: u64, ids: &[&str]) -> (u64, Vec<String>) {
    (user, ids.iter().map(|id| id.to_string()).collect())
}

pub(crate) fn receipt(message_id: &str, sender_id: u64, receiver_id: u64) -> AckedReceipt {
    AckedReceipt {
        message_id: message_id.to_string(),
        sender_id,
        receiver_id,
    }
}

pub(crate) async fn inbox_store_assigns_increasing_seqs_in_order(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
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

pub(crate) async fn inbox_store_is_idempotent_by_receiver_and_id(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
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

pub(crate) async fn concurrent_stores_of_one_message_store_it_once(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
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

pub(crate) async fn inbox_top_is_the_last_seq_given_even_once_acked(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
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

pub(crate) async fn inbox_store_then_routes_stores_then_looks_up(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
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

pub(crate) async fn inbox_read_pages_by_seq_and_limit(s: &StoreUnderTest) -> anyhow::Result<()> {
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

pub(crate) async fn inbox_keeps_the_newest_max_messages(s: &StoreUnderTest) -> anyhow::Result<()> {
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

pub(crate) async fn inbox_read_skips_and_removes_expired_messages(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
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

pub(crate) async fn inbox_ack_removes_messages_once(s: &StoreUnderTest) -> anyhow::Result<()> {
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

pub(crate) async fn inbox_ack_returns_each_receipt_once(s: &StoreUnderTest) -> anyhow::Result<()> {
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

pub(crate) async fn receipt_requests_stay_pending_until_done(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
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

pub(crate) async fn inbox_ack_ignores_oversized_input(s: &StoreUnderTest) -> anyhow::Result<()> {
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

pub(crate) async fn inboxes_of_users_are_separate(s: &StoreUnderTest) -> anyhow::Result<()> {
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
