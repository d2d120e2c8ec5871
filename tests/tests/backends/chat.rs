//! Stored groups, conversation logs, read marks and group positions, against both stores.

use super::*;
use cim_common::{
    pb::{GroupEvent, GroupEventType},
    store::chat::DEDUP_WINDOW,
    store::{
        Changed, ConvKey, GroupAppend, GroupCursor, GroupInfo, GroupLimits, GroupMember,
        HistoryLimits, HistoryPage, Role,
    },
};

/// A moment a minute ago, so that offsets from it order messages and stay far from `max_age`.
fn base_ms() -> i64 {
    now_ms() - 60_000
}

/// The GROUP_EVENT message of a change made by `by`, listing `users`.
fn event(id: &str, by: u64, kind: GroupEventType, users: &[u64], timestamp_ms: i64) -> Message {
    Message {
        id: id.to_string(),
        sender_id: by,
        sender_name: format!("u{by}"),
        kind: MessageKind::GroupEvent as i32,
        timestamp_ms,
        group_event: Some(GroupEvent {
            r#type: kind as i32,
            user_ids: users.to_vec(),
            ..GroupEvent::default()
        }),
        ..Message::default()
    }
}

/// A GROUP_CHAT message of `from` in `group`.
fn gmsg(id: &str, from: u64, group: u64, timestamp_ms: i64) -> Message {
    Message {
        id: id.to_string(),
        sender_id: from,
        sender_name: format!("u{from}"),
        kind: MessageKind::GroupChat as i32,
        body: format!("body of {id}"),
        timestamp_ms,
        group_id: group,
        ..Message::default()
    }
}

/// A private message from `from` to `to` at `timestamp_ms`.
fn pmsg(id: &str, from: u64, to: u64, timestamp_ms: i64) -> Message {
    Message {
        timestamp_ms,
        ..msg(id, from, to)
    }
}

fn log_seqs(page: &[Message]) -> Vec<u64> {
    page.iter().map(|m| m.log_seq).collect()
}

fn user_ids(m: &Message) -> Vec<u64> {
    m.group_event
        .as_ref()
        .map(|e| e.user_ids.clone())
        .unwrap_or_default()
}

const LIMITS: GroupLimits = GroupLimits {
    max_members: 100,
    max_groups: 100,
};

/// Creates a group of `owner` named `name` (asserting it is created).
async fn create(s: &dyn StateStore, owner: u64, name: &str) -> anyhow::Result<GroupInfo> {
    let mut created = event(
        &format!("create-{name}"),
        owner,
        GroupEventType::Created,
        &[],
        base_ms(),
    );
    let info = s.group_create(owner, name, &mut created, LIMITS).await?;
    info.ok_or_else(|| anyhow::anyhow!("group {name} of {owner} not created"))
}

/// Adds `users` to `group`; returns the seq of the JOINED event.
async fn add(s: &dyn StateStore, group: u64, users: &[u64]) -> anyhow::Result<u64> {
    let mut joined = event(
        &format!("join-{group}-{users:?}"),
        0,
        GroupEventType::Joined,
        users,
        base_ms(),
    );
    let outcome = s.group_add(group, users, &mut joined, LIMITS).await?;
    assert_eq!(outcome.added, users, "added to {group}");
    Ok(outcome.seq)
}

/// Appends GROUP_CHAT messages `{prefix}{i}` of `from`, for `i` in `range`, each `i` ms
/// after [`base_ms`]; returns their seqs.
async fn say(
    s: &dyn StateStore,
    from: u64,
    group: u64,
    prefix: &str,
    range: std::ops::RangeInclusive<i64>,
) -> anyhow::Result<Vec<u64>> {
    let base = base_ms();
    let mut batch: Vec<Message> = range
        .map(|i| gmsg(&format!("{prefix}{i}"), from, group, base + i))
        .collect();
    let outcomes = s.group_append(&mut batch).await?;
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, GroupAppend::Appended { repeat: false, .. })),
        "{outcomes:?}"
    );
    Ok(log_seqs(&batch))
}

pub(crate) async fn groups_are_created_added_to_and_removed_from_within_limits(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    let base = base_ms();
    let mut created = event("c1", 1, GroupEventType::Created, &[], base);
    let info = s
        .group_create(1, "friends", &mut created, LIMITS)
        .await?
        .expect("created");
    assert_eq!(info.name, "friends");
    assert_eq!(info.owner, 1);
    assert_eq!(info.members, 1);
    assert_eq!(info.top, 1);
    assert_eq!(info.version, 1);
    assert_eq!(created.log_seq, 1, "the CREATED event is the first message");
    assert_eq!(created.group_id, info.id);
    let g = info.id;
    assert_eq!(s.group_info(g).await?, Some(info.clone()));
    assert_eq!(
        s.group_member(g, 1).await?,
        Some(GroupMember {
            user_id: 1,
            role: Role::Owner,
            joined_seq: 1
        })
    );
    assert_eq!(s.group_member(g, 2).await?, None);
    let second = create(&**s, 1, "second").await?;
    assert_ne!(second.id, g, "ids are not reused");
    assert_eq!(s.user_groups(1).await?, [g, second.id]);

    // Owners are limited too: user 9 is in 2 groups, the limit.
    let two = GroupLimits {
        max_members: 100,
        max_groups: 2,
    };
    let mut e = event("c9a", 9, GroupEventType::Created, &[], base);
    assert!(s.group_create(9, "a", &mut e, two).await?.is_some());
    let mut e = event("c9b", 9, GroupEventType::Created, &[], base);
    assert!(s.group_create(9, "b", &mut e, two).await?.is_some());
    let mut e = event("c9c", 9, GroupEventType::Created, &[], base);
    assert_eq!(s.group_create(9, "c", &mut e, two).await?, None);
    assert_eq!(s.user_groups(9).await?.len(), 2);

    // Add: the new ones are added, members and users at their limit are reported.
    let mut joined = event("j1", 1, GroupEventType::Joined, &[2, 3, 1, 9, 2], base);
    let outcome = s.group_add(g, &[2, 3, 1, 9], &mut joined, two).await?;
    assert_eq!(outcome.added, [2, 3]);
    assert_eq!(outcome.already, [1]);
    assert_eq!(outcome.too_many_groups, [9]);
    assert!(!outcome.group_full);
    assert!(!outcome.no_group);
    assert_eq!(outcome.seq, 2);
    assert_eq!(joined.log_seq, 2);
    assert_eq!(joined.group_id, g);
    assert_eq!(user_ids(&joined), [2, 3], "the event lists those added");
    for user in [2, 3] {
        let member = s.group_member(g, user).await?.expect("member");
        assert_eq!(member.role, Role::Member);
        assert_eq!(member.joined_seq, 2);
    }
    let info = s.group_info(g).await?.expect("group");
    assert_eq!((info.members, info.top, info.version), (3, 2, 2));
    assert_eq!(s.user_groups(2).await?, [g]);

    // Nobody new: no event.
    let mut again = event("j2", 1, GroupEventType::Joined, &[2], base);
    let outcome = s.group_add(g, &[2, 3], &mut again, LIMITS).await?;
    assert!(outcome.added.is_empty());
    assert_eq!(outcome.already, [2, 3]);
    assert_eq!(outcome.seq, 0);
    assert_eq!(s.group_info(g).await?.expect("group").top, 2);

    // Full: members + new would pass the limit, nobody is added.
    let four = GroupLimits {
        max_members: 4,
        max_groups: 100,
    };
    let mut full = event("j3", 1, GroupEventType::Joined, &[4, 5], base);
    let outcome = s.group_add(g, &[4, 5], &mut full, four).await?;
    assert!(outcome.group_full);
    assert!(outcome.added.is_empty());
    assert_eq!(outcome.seq, 0);
    assert_eq!(s.group_member(g, 4).await?, None);
    let mut fits = event("j4", 1, GroupEventType::Joined, &[4], base);
    let outcome = s.group_add(g, &[4], &mut fits, four).await?;
    assert_eq!(outcome.added, [4]);
    assert_eq!(outcome.seq, 3);

    let mut nowhere = event("j5", 1, GroupEventType::Joined, &[5], base);
    let outcome = s.group_add(999, &[5], &mut nowhere, LIMITS).await?;
    assert!(outcome.no_group);
    assert!(outcome.added.is_empty());

    // Members page by user id.
    let ids = |page: Vec<GroupMember>| page.iter().map(|m| m.user_id).collect::<Vec<u64>>();
    assert_eq!(ids(s.group_members(g, 0, 10).await?), [1, 2, 3, 4]);
    assert_eq!(ids(s.group_members(g, 0, 2).await?), [1, 2]);
    assert_eq!(ids(s.group_members(g, 2, 10).await?), [3, 4]);
    assert!(s.group_members(g, 4, 10).await?.is_empty());
    assert!(s.group_members(999, 0, 10).await?.is_empty());

    // Remove: never the owner; the event lists those removed.
    let mut removed = event("r1", 1, GroupEventType::Removed, &[1, 3, 7], base);
    let seq = s.group_remove(g, &[1, 3, 7], &mut removed).await?;
    assert_eq!(seq, 4);
    assert_eq!(removed.log_seq, 4);
    assert_eq!(user_ids(&removed), [3]);
    assert_eq!(s.group_member(g, 3).await?, None);
    assert!(s.group_member(g, 1).await?.is_some(), "the owner stays");
    assert!(s.user_groups(3).await?.is_empty());
    let info = s.group_info(g).await?.expect("group");
    assert_eq!((info.members, info.top, info.version), (3, 4, 4));
    let mut nobody = event("r2", 1, GroupEventType::Removed, &[3], base);
    assert_eq!(s.group_remove(g, &[3, 1], &mut nobody).await?, 0);
    assert_eq!(s.group_info(g).await?.expect("group").top, 4);
    let mut nowhere = event("r3", 1, GroupEventType::Removed, &[2], base);
    assert_eq!(s.group_remove(999, &[2], &mut nowhere).await?, 0);

    // A removed user can be added again, as a new member.
    let seq = add(&**s, g, &[3]).await?;
    assert_eq!(seq, 5);
    assert_eq!(s.group_member(g, 3).await?.expect("member").joined_seq, 5);

    // The log holds every change, in order.
    let log = s.group_read(g, 0, 100).await?;
    assert_eq!(log_seqs(&log), [1, 2, 3, 4, 5]);
    assert_eq!(msg_ids(&log)[..4], ["c1", "j1", "j4", "r1"]);
    assert!(log.iter().all(|m| m.group_id == g));
    Ok(())
}

pub(crate) async fn groups_change_roles_rename_and_disband(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    let base = base_ms();
    let g = create(&**s, 1, "team").await?.id;
    add(&**s, g, &[2, 3]).await?;
    let version = s.group_info(g).await?.expect("group").version;

    let mut role = event("role", 1, GroupEventType::Role, &[2], base);
    assert_eq!(
        s.group_set_role(g, 2, Role::Admin, &mut role).await?,
        Changed::Done(3)
    );
    assert_eq!(role.log_seq, 3);
    assert_eq!(
        s.group_member(g, 2).await?.expect("member").role,
        Role::Admin
    );
    let mut role = event("role2", 1, GroupEventType::Role, &[7], base);
    assert_eq!(
        s.group_set_role(g, 7, Role::Admin, &mut role).await?,
        Changed::NotMember
    );
    assert_eq!(
        s.group_set_role(999, 2, Role::Admin, &mut role).await?,
        Changed::NoGroup
    );
    let mut role = event("role3", 1, GroupEventType::Role, &[2], base);
    assert_eq!(
        s.group_set_role(g, 2, Role::Member, &mut role).await?,
        Changed::Done(4)
    );
    assert_eq!(
        s.group_member(g, 2).await?.expect("member").role,
        Role::Member
    );

    let mut renamed = event("rename", 2, GroupEventType::Renamed, &[], base);
    assert_eq!(
        s.group_rename(g, "the team", &mut renamed).await?,
        Changed::Done(5)
    );
    assert_eq!(renamed.group_id, g);
    let info = s.group_info(g).await?.expect("group");
    assert_eq!(info.name, "the team");
    assert_eq!(info.top, 5);
    assert_eq!(info.version, version, "roles and names are not membership");
    assert_eq!(
        s.group_rename(999, "x", &mut renamed).await?,
        Changed::NoGroup
    );

    // Disband: the last message; then the group is gone for everyone.
    let mut disbanded = event("disband", 1, GroupEventType::Disbanded, &[], base);
    assert_eq!(s.group_disband(g, &mut disbanded).await?, Changed::Done(6));
    assert_eq!(disbanded.log_seq, 6);
    assert_eq!(s.group_info(g).await?, None);
    for user in [1, 2, 3] {
        assert_eq!(s.group_member(g, user).await?, None);
        assert!(s.user_groups(user).await?.is_empty(), "user {user}");
        assert!(s.group_cursors(user).await?.is_empty(), "user {user}");
        assert_eq!(
            s.history(user, ConvKey::Group(g), HistoryPage::Before(0), 10)
                .await?,
            None
        );
        assert_eq!(s.mark_read(user, ConvKey::Group(g), 1).await?, None);
        assert!(s.conversations(user, None, 10).await?.is_empty());
    }
    assert!(s.group_members(g, 0, 10).await?.is_empty());
    assert_eq!(s.group_check(g, &[1, 2]).await?.1, [false, false]);
    let mut late = [gmsg("late", 1, g, base)];
    assert_eq!(s.group_append(&mut late).await?, [GroupAppend::NoGroup]);
    assert_eq!(late[0].log_seq, 0);
    let mut again = event("disband2", 1, GroupEventType::Disbanded, &[], base);
    assert_eq!(s.group_disband(g, &mut again).await?, Changed::NoGroup);
    let mut joined = event("j", 1, GroupEventType::Joined, &[4], base);
    assert!(s.group_add(g, &[4], &mut joined, LIMITS).await?.no_group);
    let mut renamed = event("rename2", 1, GroupEventType::Renamed, &[], base);
    assert_eq!(
        s.group_rename(g, "y", &mut renamed).await?,
        Changed::NoGroup
    );
    // Places in the per-user group limit are free again.
    let one = GroupLimits {
        max_members: 10,
        max_groups: 1,
    };
    let mut created = event("c2", 2, GroupEventType::Created, &[], base);
    assert!(s.group_create(2, "new", &mut created, one).await?.is_some());
    Ok(())
}

pub(crate) async fn group_appends_are_idempotent_and_for_members_only(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    let base = base_ms();
    let a = create(&**s, 1, "a").await?;
    let b = create(&**s, 2, "b").await?;
    add(&**s, a.id, &[2]).await?; // a: 1 CREATED, 2 JOINED

    // One call, several groups, in slice order; each group counts on its own.
    let mut batch = vec![
        gmsg("m1", 1, a.id, base + 1),
        gmsg("m2", 2, b.id, base + 2),
        gmsg("m3", 2, a.id, base + 3),
        gmsg("m4", 1, b.id, base + 4), // 1 is not in b
        gmsg("m5", 0, b.id, base + 5), // the business API: any group
        gmsg("m6", 1, 999, base + 6),
    ];
    batch[0].log_seq = 77; // whatever the caller left is replaced
    let outcomes = s.group_append(&mut batch).await?;
    let version_a = s.group_info(a.id).await?.expect("a").version;
    let version_b = s.group_info(b.id).await?.expect("b").version;
    let appended = |version| GroupAppend::Appended {
        version,
        repeat: false,
    };
    assert_eq!(
        outcomes,
        [
            appended(version_a),
            appended(version_b),
            appended(version_a),
            GroupAppend::NotMember,
            appended(version_b),
            GroupAppend::NoGroup,
        ]
    );
    assert_eq!(log_seqs(&batch), [3, 2, 4, 0, 3, 0]);

    // A retry gets the stored copy back, even with another body or timestamp.
    let mut retry = vec![
        gmsg("m3", 2, a.id, base + 100),
        gmsg("m7", 2, a.id, base + 7),
    ];
    retry[0].body = "changed".to_string();
    let outcomes = s.group_append(&mut retry).await?;
    assert_eq!(
        outcomes,
        [
            GroupAppend::Appended {
                version: version_a,
                repeat: true
            },
            appended(version_a),
        ]
    );
    assert_eq!(retry[0], batch[2], "the stored copy");
    assert_eq!(retry[1].log_seq, 5);

    let log = s.group_read(a.id, 0, 100).await?;
    assert_eq!(log_seqs(&log), [1, 2, 3, 4, 5]);
    assert_eq!(log[2], batch[0]);
    assert_eq!(log[3], batch[2]);
    assert_eq!(
        msg_ids(&s.group_read(b.id, 0, 100).await?),
        ["create-b", "m2", "m5"]
    );
    assert_eq!(log_seqs(&s.group_read(a.id, 3, 100).await?), [4, 5]);
    assert_eq!(log_seqs(&s.group_read(a.id, 1, 2).await?), [2, 3]);
    assert!(s.group_read(a.id, 5, 100).await?.is_empty());
    assert!(s.group_read(999, 0, 100).await?.is_empty());
    assert_eq!(s.group_info(a.id).await?.expect("a").top, 5);

    // A member removed may no longer write; their retry is refused too.
    let mut left = event("left", 2, GroupEventType::Left, &[2], base);
    assert_eq!(s.group_remove(a.id, &[2], &mut left).await?, 6);
    let mut after = [gmsg("m3", 2, a.id, base + 3), gmsg("m8", 2, a.id, base + 8)];
    assert_eq!(
        s.group_append(&mut after).await?,
        [GroupAppend::NotMember, GroupAppend::NotMember]
    );
    assert_eq!(s.group_info(a.id).await?.expect("a").top, 6);

    // Retries are recognised while fewer than DEDUP_WINDOW messages came after them.
    let c = create(&**s, 3, "c").await?.id;
    say(&**s, 3, c, "first", 1..=1).await?; // seq 2
    let filler = i64::try_from(DEDUP_WINDOW)? - 1;
    say(&**s, 3, c, "fill", 1..=filler).await?;
    let mut retry = [gmsg("first1", 3, c, base)];
    assert!(matches!(
        s.group_append(&mut retry).await?[..],
        [GroupAppend::Appended { repeat: true, .. }]
    ));
    assert_eq!(retry[0].log_seq, 2);
    say(&**s, 3, c, "more", 1..=1).await?;
    let mut late = [gmsg("first1", 3, c, base)];
    assert!(matches!(
        s.group_append(&mut late).await?[..],
        [GroupAppend::Appended { repeat: false, .. }]
    ));
    assert_eq!(late[0].log_seq, 2 + filler as u64 + 2, "a new message now");
    Ok(())
}

pub(crate) async fn private_logs_are_shared_by_the_pair_and_idempotent(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    let base = base_ms();
    let mut batch = vec![
        pmsg("p1", 1, 2, base + 1),
        pmsg("p2", 2, 1, base + 2),
        pmsg("p3", 1, 3, base + 3),
        pmsg("p4", 1, 2, base + 4),
    ];
    s.private_append(&mut batch).await?;
    assert_eq!(log_seqs(&batch), [1, 2, 1, 3], "one counter per pair");

    let page = |viewer, peer| async move {
        s.history(viewer, ConvKey::User(peer), HistoryPage::Before(0), 100)
            .await
    };
    let of_1_and_2 = page(1, 2).await?.expect("readable");
    assert_eq!(msg_ids(&of_1_and_2), ["p1", "p2", "p4"]);
    assert_eq!(
        of_1_and_2,
        [batch[0].clone(), batch[1].clone(), batch[3].clone()]
    );
    assert_eq!(page(2, 1).await?, Some(of_1_and_2), "both read one log");
    assert_eq!(msg_ids(&page(3, 1).await?.expect("readable")), ["p3"]);
    assert_eq!(page(2, 3).await?, Some(Vec::new()), "nobody wrote");

    // A retry gets the stored copy; a new message the next seq.
    let mut retry = vec![pmsg("p2", 2, 1, base + 50), pmsg("p5", 2, 1, base + 5)];
    retry[0].body = "changed".to_string();
    s.private_append(&mut retry).await?;
    assert_eq!(retry[0], batch[1]);
    assert_eq!(retry[1].log_seq, 4);
    assert_eq!(
        log_seqs(&page(1, 2).await?.expect("readable")),
        [1, 2, 3, 4]
    );

    // The same id twice in one call: kept once, the second answered with the first's copy.
    let mut twice = vec![pmsg("p6", 1, 2, base + 60), pmsg("p6", 1, 2, base + 61)];
    twice[1].body = "second attempt".to_string();
    s.private_append(&mut twice).await?;
    assert_eq!(log_seqs(&twice), [5, 5]);
    assert_eq!(twice[1], twice[0], "the first attempt's copy");
    assert_eq!(
        msg_ids(&page(1, 2).await?.expect("readable")),
        ["p1", "p2", "p4", "p5", "p6"]
    );

    // Ids are scoped by conversation: the same id elsewhere is another message.
    let mut elsewhere = [pmsg("p1", 3, 4, base + 6)];
    s.private_append(&mut elsewhere).await?;
    assert_eq!(elsewhere[0].log_seq, 1);
    assert_eq!(msg_ids(&page(4, 3).await?.expect("readable")), ["p1"]);

    // System messages have no pair log.
    let mut system = [Message {
        kind: MessageKind::System as i32,
        ..pmsg("s1", 0, 2, base + 7)
    }];
    s.private_append(&mut system).await?;
    assert_eq!(system[0].log_seq, 0);
    assert_eq!(page(2, 1).await?.expect("readable").len(), 5);
    s.private_append(&mut []).await?;
    Ok(())
}

pub(crate) async fn history_pages_backwards_and_forwards(s: &StoreUnderTest) -> anyhow::Result<()> {
    let base = base_ms();
    let mut batch: Vec<Message> = (1..=25)
        .map(|i| {
            pmsg(
                &format!("m{i:02}"),
                1 + i as u64 % 2,
                2 - i as u64 % 2,
                base + i,
            )
        })
        .collect();
    s.private_append(&mut batch).await?;
    assert_eq!(log_seqs(&batch), (1..=25).collect::<Vec<u64>>());
    let conv = ConvKey::User(2);
    let read = |page| async move { s.history(1, conv, page, 10).await };

    // Backwards from the newest, page by page, each oldest first.
    let newest = read(HistoryPage::Before(0)).await?.expect("readable");
    assert_eq!(log_seqs(&newest), (16..=25).collect::<Vec<u64>>());
    assert_eq!(read(HistoryPage::Before(u64::MAX)).await?, Some(newest));
    let mut pages = Vec::new();
    let mut before = 0;
    loop {
        let page = read(HistoryPage::Before(before)).await?.expect("readable");
        let Some(first) = page.first() else { break };
        before = first.log_seq;
        pages.push(log_seqs(&page));
    }
    assert_eq!(
        pages,
        [
            (16..=25).collect::<Vec<u64>>(),
            (6..=15).collect(),
            (1..=5).collect()
        ]
    );
    assert_eq!(
        log_seqs(&read(HistoryPage::Before(3)).await?.expect("readable")),
        [1, 2]
    );
    assert!(read(HistoryPage::Before(1))
        .await?
        .expect("readable")
        .is_empty());

    // Forwards from a seq (sync), oldest first.
    let mut pages = Vec::new();
    let mut after = 0;
    loop {
        let page = read(HistoryPage::After(after)).await?.expect("readable");
        let Some(last) = page.last() else { break };
        after = last.log_seq;
        pages.push(log_seqs(&page));
    }
    assert_eq!(
        pages,
        [
            (1..=10).collect::<Vec<u64>>(),
            (11..=20).collect(),
            (21..=25).collect()
        ]
    );
    assert!(read(HistoryPage::After(u64::MAX))
        .await?
        .expect("readable")
        .is_empty());
    assert_eq!(
        s.history(2, ConvKey::User(1), HistoryPage::After(20), 0)
            .await?,
        Some(Vec::new())
    );

    // The same in a group; one read is bounded whatever the caller asks.
    let g = create(&**s, 1, "big").await?.id;
    say(&**s, 1, g, "g", 1..=249).await?;
    let newest = s
        .history(1, ConvKey::Group(g), HistoryPage::Before(0), usize::MAX)
        .await?
        .expect("member");
    assert_eq!(log_seqs(&newest), (51..=250).collect::<Vec<u64>>());
    let oldest = s
        .history(1, ConvKey::Group(g), HistoryPage::After(0), usize::MAX)
        .await?
        .expect("member");
    assert_eq!(log_seqs(&oldest), (1..=200).collect::<Vec<u64>>());
    assert_eq!(
        log_seqs(&s.group_read(g, 0, usize::MAX).await?),
        (1..=200).collect::<Vec<u64>>()
    );
    let middle = s
        .history(1, ConvKey::Group(g), HistoryPage::Before(101), 3)
        .await?
        .expect("member");
    assert_eq!(log_seqs(&middle), [98, 99, 100]);
    Ok(())
}

pub(crate) async fn group_history_starts_at_the_join_less_before_join(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    for before_join in [0, 2, 100] {
        let store = s
            .with_history_limits(HistoryLimits {
                before_join,
                ..HistoryLimits::default()
            })
            .await?;
        let store = store.as_ref();
        let g = create(store, 1, "g").await?.id;
        say(store, 1, g, "early", 1..=4).await?; // seqs 2..=5
        let joined = add(store, g, &[2]).await?;
        assert_eq!(joined, 6);
        say(store, 1, g, "late", 1..=2).await?; // seqs 7, 8
        let first = joined.saturating_sub(before_join).max(1);
        for page in [HistoryPage::Before(0), HistoryPage::After(0)] {
            let seen = store
                .history(2, ConvKey::Group(g), page, 100)
                .await?
                .expect("member");
            assert_eq!(
                log_seqs(&seen),
                (first..=8).collect::<Vec<u64>>(),
                "before_join {before_join}, {page:?}"
            );
        }
        let all = store
            .history(1, ConvKey::Group(g), HistoryPage::Before(0), 100)
            .await?
            .expect("member");
        assert_eq!(log_seqs(&all), (1..=8).collect::<Vec<u64>>(), "the owner");
        assert_eq!(
            store
                .history(3, ConvKey::Group(g), HistoryPage::Before(0), 100)
                .await?,
            None,
            "not a member"
        );
        let mut removed = event("r", 1, GroupEventType::Removed, &[2], base_ms());
        store.group_remove(g, &[2], &mut removed).await?;
        assert_eq!(
            store
                .history(2, ConvKey::Group(g), HistoryPage::After(0), 100)
                .await?,
            None,
            "removed"
        );
        assert_eq!(
            store
                .history(1, ConvKey::Group(999), HistoryPage::After(0), 100)
                .await?,
            None,
            "no group"
        );
    }
    Ok(())
}

pub(crate) async fn history_keeps_the_newest_max_messages_and_drops_old_ones(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    let store = s
        .with_history_limits(HistoryLimits {
            max_messages: 5,
            max_age: Duration::from_secs(3600),
            before_join: 0,
        })
        .await?;
    let base = base_ms();
    let mut batch: Vec<Message> = (1..=8)
        .map(|i| pmsg(&format!("m{i}"), 1, 2, base + i))
        .collect();
    store.private_append(&mut batch).await?;
    assert_eq!(log_seqs(&batch), (1..=8).collect::<Vec<u64>>());
    let kept = store
        .history(2, ConvKey::User(1), HistoryPage::After(0), 100)
        .await?
        .expect("readable");
    assert_eq!(log_seqs(&kept), [4, 5, 6, 7, 8]);
    let conversations = store.conversations(2, None, 10).await?;
    assert_eq!(conversations.len(), 1);
    assert_eq!(conversations[0].top, 8, "seqs go on counting");
    assert_eq!(conversations[0].unread, 8);

    let g = create(store.as_ref(), 1, "g").await?.id;
    say(store.as_ref(), 1, g, "x", 1..=9).await?;
    assert_eq!(
        log_seqs(&store.group_read(g, 0, 100).await?),
        [6, 7, 8, 9, 10]
    );

    // Older than max_age: not read, whether or not a newer message follows.
    let old = now_ms() - 2 * 3600 * 1000;
    let mut aged = vec![pmsg("o1", 3, 4, old), pmsg("o2", 3, 4, old + 1)];
    store.private_append(&mut aged).await?;
    assert_eq!(log_seqs(&aged), [1, 2]);
    assert_eq!(
        store
            .history(3, ConvKey::User(4), HistoryPage::Before(0), 100)
            .await?,
        Some(Vec::new())
    );
    assert!(
        store.conversations(4, None, 10).await?.is_empty(),
        "nothing kept: no conversation"
    );
    let mut fresh = [pmsg("o3", 4, 3, base)];
    store.private_append(&mut fresh).await?;
    assert_eq!(fresh[0].log_seq, 3);
    let kept = store
        .history(3, ConvKey::User(4), HistoryPage::After(0), 100)
        .await?
        .expect("readable");
    assert_eq!(msg_ids(&kept), ["o3"]);
    Ok(())
}

pub(crate) async fn conversations_list_newest_first_with_unread_counts_and_read_marks(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    let base = base_ms();
    // User 1: with 2 (activity base+10), group g (base+20), with 3 (base+30).
    let mut private = vec![
        pmsg("a1", 2, 1, base + 1),
        pmsg("a2", 2, 1, base + 2),
        pmsg("a3", 1, 2, base + 3),
        pmsg("a4", 2, 1, base + 10),
        pmsg("b1", 3, 1, base + 30),
    ];
    s.private_append(&mut private).await?;
    let mut created = event("c", 4, GroupEventType::Created, &[], base + 5);
    let g = s
        .group_create(4, "club", &mut created, LIMITS)
        .await?
        .expect("created")
        .id;
    let mut joined = event("j", 4, GroupEventType::Joined, &[1], base + 6);
    assert_eq!(s.group_add(g, &[1], &mut joined, LIMITS).await?.seq, 2);
    let mut chat = vec![gmsg("g1", 4, g, base + 19), gmsg("g2", 4, g, base + 20)];
    s.group_append(&mut chat).await?;
    // A group with nothing said yet sorts by its creation.
    let mut quiet = event("q", 5, GroupEventType::Created, &[], base + 8);
    let quiet = s
        .group_create(5, "quiet", &mut quiet, LIMITS)
        .await?
        .expect("created")
        .id;
    let mut joined = event("jq", 5, GroupEventType::Joined, &[1], base + 8);
    assert_eq!(s.group_add(quiet, &[1], &mut joined, LIMITS).await?.seq, 2);

    let list = s.conversations(1, None, 10).await?;
    let convs: Vec<ConvKey> = list.iter().map(|c| c.conv).collect();
    assert_eq!(
        convs,
        [
            ConvKey::User(3),
            ConvKey::Group(g),
            ConvKey::User(2),
            ConvKey::Group(quiet)
        ]
    );
    let [with_3, club, with_2, _] = &list[..] else {
        anyhow::bail!("four conversations expected: {list:?}");
    };
    assert_eq!(with_3.activity_ms, base + 30);
    assert_eq!(with_3.last.as_ref(), Some(&private[4]));
    assert_eq!((with_3.top, with_3.read_seq, with_3.unread), (1, 0, 1));
    assert_eq!(with_3.name, "");
    assert_eq!(club.name, "club");
    assert_eq!(club.activity_ms, base + 20);
    assert_eq!(club.last.as_ref(), Some(&chat[1]));
    assert_eq!(club.top, 4);
    assert_eq!(club.peer_read_seq, 0);
    // Sending moved 1's mark to a3 (seq 3); a4 came after it.
    assert_eq!((with_2.top, with_2.read_seq, with_2.unread), (4, 3, 1));
    assert_eq!(with_2.peer_read_seq, 4, "2 sent a4, so 2 read up to it");
    let of_2 = s.conversations(2, None, 10).await?;
    assert_eq!(of_2.len(), 1);
    assert_eq!(
        (of_2[0].read_seq, of_2[0].unread, of_2[0].peer_read_seq),
        (4, 0, 3)
    );

    // Pages by activity.
    let page = s.conversations(1, None, 2).await?;
    assert_eq!(page, list[..2]);
    let next = s.conversations(1, Some(page[1].activity_ms), 2).await?;
    assert_eq!(next, list[2..]);
    assert!(s.conversations(1, Some(base), 10).await?.is_empty());
    assert!(s.conversations(99, None, 10).await?.is_empty());

    // Read marks: clamped to the top, never back.
    assert_eq!(s.mark_read(1, ConvKey::User(2), 100).await?, Some(4));
    assert_eq!(s.mark_read(1, ConvKey::User(2), 1).await?, Some(4));
    assert_eq!(s.mark_read(1, ConvKey::Group(g), 3).await?, Some(3));
    assert_eq!(s.mark_read(1, ConvKey::Group(g), 2).await?, Some(3));
    assert_eq!(
        s.mark_read(1, ConvKey::User(77), 5).await?,
        Some(0),
        "no log"
    );
    assert_eq!(
        s.mark_read(3, ConvKey::Group(g), 1).await?,
        None,
        "not a member"
    );
    assert_eq!(s.mark_read(1, ConvKey::Group(999), 1).await?, None);
    let list = s.conversations(1, None, 10).await?;
    let by_conv = |conv| list.iter().find(|c| c.conv == conv).expect("listed");
    assert_eq!(by_conv(ConvKey::User(2)).unread, 0);
    assert_eq!(by_conv(ConvKey::Group(g)).unread, 1);
    assert_eq!(s.conversations(2, None, 10).await?[0].peer_read_seq, 4);

    // A message sent moves the sender's mark in groups too; a new one moves the list.
    let mut reply = [gmsg("g3", 1, g, base + 40)];
    s.group_append(&mut reply).await?;
    let list = s.conversations(1, None, 10).await?;
    assert_eq!(list[0].conv, ConvKey::Group(g));
    assert_eq!((list[0].top, list[0].read_seq, list[0].unread), (5, 5, 0));
    let of_4 = s.conversations(4, None, 10).await?;
    assert_eq!(of_4.len(), 1);
    assert_eq!((of_4[0].read_seq, of_4[0].unread), (4, 1));

    // Leaving a group takes it off the list.
    let mut left = event("l", 1, GroupEventType::Left, &[1], base + 50);
    s.group_remove(quiet, &[1], &mut left).await?;
    assert!(s
        .conversations(1, None, 10)
        .await?
        .iter()
        .all(|c| c.conv != ConvKey::Group(quiet)));
    Ok(())
}

pub(crate) async fn group_cursors_acks_and_checks(s: &StoreUnderTest) -> anyhow::Result<()> {
    let a = create(&**s, 1, "a").await?.id;
    let b = create(&**s, 2, "b").await?.id;
    assert_eq!(add(&**s, a, &[2, 3]).await?, 2);
    say(&**s, 1, a, "m", 1..=3).await?; // seqs 3..=5
    let version_a = s.group_info(a).await?.expect("a").version;
    let version_b = s.group_info(b).await?.expect("b").version;

    let cursor = |group, position, top, version| GroupCursor {
        group,
        position,
        top,
        version,
    };
    assert_eq!(
        s.group_cursors(2).await?,
        [cursor(a, 2, 5, version_a), cursor(b, 1, 1, version_b)]
    );
    assert_eq!(s.group_cursors(1).await?, [cursor(a, 1, 5, version_a)]);
    assert!(s.group_cursors(9).await?.is_empty());

    // Acks move forward only, and only for members.
    s.group_ack(&[
        (2, vec![(a, 4), (b, 1)]),
        (3, vec![(a, 5)]),
        (9, vec![(a, 5)]),
    ])
    .await?;
    s.group_ack(&[(2, vec![(a, 3)]), (3, vec![(b, 1)])]).await?;
    s.group_ack(&[]).await?;
    assert_eq!(
        s.group_cursors(2).await?,
        [cursor(a, 4, 5, version_a), cursor(b, 1, 1, version_b)]
    );
    assert_eq!(s.group_cursors(3).await?, [cursor(a, 5, 5, version_a)]);
    assert!(s.group_cursors(9).await?.is_empty());
    assert_eq!(
        log_seqs(&s.group_read(a, 4, 100).await?),
        [5],
        "the catch-up of 2"
    );

    // Membership checks.
    assert_eq!(
        s.group_check(a, &[1, 2, 3, 4]).await?,
        (version_a, vec![true, true, true, false])
    );
    assert_eq!(s.group_check(999, &[1, 2]).await?, (0, vec![false, false]));
    assert_eq!(s.group_check(a, &[]).await?, (version_a, vec![]));

    // A removal changes the version and drops the position; added again, the position
    // starts at the new JOINED event.
    let mut removed = event("r", 1, GroupEventType::Removed, &[3], base_ms());
    assert_eq!(s.group_remove(a, &[3], &mut removed).await?, 6);
    let (version, members) = s.group_check(a, &[2, 3]).await?;
    assert!(version > version_a);
    assert_eq!(members, [true, false]);
    assert!(s.group_cursors(3).await?.is_empty());
    s.group_ack(&[(3, vec![(a, 6)])]).await?;
    assert_eq!(add(&**s, a, &[3]).await?, 7);
    say(&**s, 1, a, "n", 1..=2).await?; // seqs 8, 9
    let version = s.group_info(a).await?.expect("a").version;
    assert_eq!(s.group_cursors(3).await?, [cursor(a, 7, 9, version)]);
    Ok(())
}
