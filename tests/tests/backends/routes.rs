//! Routes and the online index, against both stores.

use super::*;

pub(crate) async fn routes_returns_one_entry_per_id_in_order(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
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

/// Every route of a full walk of `server`'s users, checking that none comes twice.
pub(crate) async fn server_walk(
    store: &dyn StateStore,
    server: &str,
    count: usize,
) -> anyhow::Result<(Vec<RouteEntry>, usize)> {
    let mut seen: BTreeMap<u64, RouteEntry> = BTreeMap::new();
    let mut cursor = 0;
    let mut steps = 0;
    loop {
        let (next, batch) = store.server_routes(server, cursor, count).await?;
        steps += 1;
        assert!(steps < 10_000, "the walk does not terminate");
        for e in batch {
            let id = e.user_id;
            assert_eq!(e.server_id, server, "a route of another server");
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

pub(crate) async fn server_routes_visits_every_route_of_the_server_exactly_once(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    const N: u64 = 600;
    // User 0 too: a cursor of 0 means "start", never "resume at user 0".
    for id in 0..N {
        let server = format!("srv-{}", id % 3);
        s.connect_user(id, &format!("u{id}"), &format!("s{id}"), &server)
            .await;
    }
    // Logged in but not connected: a slot, no route.
    s.claim_login(N, "pending", LONG_TTL, &nobody_live).await?;

    for server in 0..3 {
        let name = format!("srv-{server}");
        let (all, steps) = server_walk(&**s, &name, 50).await?;
        // Batches, except on one Redis: a set of 200 small integers is an intset, which
        // SSCAN returns whole whatever its COUNT.
        assert!(
            steps > 1 || (s.is_redis() && !s.is_cluster()),
            "expected batches, got one step"
        );
        assert!(
            all.iter()
                .map(|e| e.user_id)
                .eq((0..N).filter(|id| id % 3 == server)),
            "missing routes of {name}"
        );
        for e in &all {
            assert_eq!(e.session, format!("s{}", e.user_id));
        }
    }
    // A user who moved to another server without a detach on the first (the first crashed):
    // walked for the new server only, and dropped from the old one's index on the way.
    s.claim_login(3, "s3-new", LONG_TTL, &nobody_live).await?;
    s.attach(3, "u3", "s3-new", "srv-1").await?;
    let (on_0, _) = server_walk(&**s, "srv-0", 1000).await?;
    assert!(on_0.iter().all(|e| e.user_id != 3), "user 3 moved to srv-1");
    let (on_1, _) = server_walk(&**s, "srv-1", 1000).await?;
    assert!(on_1.iter().any(|e| e.user_id == 3 && e.session == "s3-new"));

    // No such server, or an empty store: nothing.
    assert!(server_walk(&**s, "srv-9", 10).await?.0.is_empty());
    let (none, _) = server_walk(&*s.another().await?, "srv-0", 1000).await?;
    assert!(none.is_empty());
    Ok(())
}

pub(crate) async fn server_routes_reaches_every_route_present_throughout(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    // Users 1..=300 connected; while a walk runs, the odd ones leave and 301..=400 arrive.
    for id in 1..=300 {
        s.connect_user(id, &format!("u{id}"), &format!("s{id}"), "srv-a")
            .await;
    }
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    let mut cursor = 0;
    let mut step = 0;
    loop {
        let (next, batch) = s.server_routes("srv-a", cursor, 40).await?;
        for e in batch {
            *seen.entry(e.user_id).or_default() += 1;
        }
        if step == 1 {
            for id in (1..=300).filter(|id| id % 2 == 1) {
                s.detach(id, &format!("u{id}"), &format!("s{id}"), "srv-a", "closed")
                    .await?;
            }
            for id in 301..=400 {
                s.connect_user(id, &format!("u{id}"), &format!("s{id}"), "srv-a")
                    .await;
            }
        }
        step += 1;
        assert!(step < 10_000, "the walk does not terminate");
        if next == 0 {
            break;
        }
        cursor = next;
    }
    // SSCAN's guarantee, which the sweep relies on: whoever is attached throughout is
    // reached. (Redis may repeat a member while its table resizes: repeats are not checked.)
    for id in (2..=300).step_by(2) {
        assert!(seen.contains_key(&id), "user {id} was online throughout");
    }
    assert!(
        seen.keys().all(|id| (1..=400).contains(id)),
        "only routes that existed: {seen:?}"
    );
    Ok(())
}

pub(crate) async fn remove_stale_route_removes_only_an_unchanged_route(
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

pub(crate) async fn online_page_filters_by_prefix_and_pages_by_cursor(
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
