//! Channels, against both stores.

use super::*;

pub(crate) async fn channel_join_leave_and_membership(s: &StoreUnderTest) -> anyhow::Result<()> {
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

pub(crate) async fn channel_join_respects_the_per_user_limit(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
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

pub(crate) async fn channel_members_page_by_user_id(s: &StoreUnderTest) -> anyhow::Result<()> {
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

pub(crate) async fn channel_list_pages_by_name_and_drops_empty_channels(
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

pub(crate) async fn channel_stats_count_members_and_online(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
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
