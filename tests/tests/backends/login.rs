//! Login slots, generations, attach and detach, against both stores.

use super::*;

pub(crate) async fn claim_pending_is_taken_over_or_expires(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    let ttl = Duration::from_millis(300);

    assert_eq!(
        s.claim_login(7, "s1", ttl, &everyone_live).await?,
        ClaimOutcome::Claimed
    );
    assert_eq!(s.slot(7).await.as_deref(), Some("s1"));
    let left = s.slot_ttl_ms(7).await.expect("a pending slot expires");
    assert!(left > 0 && left <= 300, "PTTL {left}");
    // Pending (logged in, never connected): a new login takes it over at once, whoever is
    // live; the old session can no longer attach or release it.
    assert_eq!(
        s.claim_login(7, "s2", LONG_TTL, &everyone_live).await?,
        ClaimOutcome::Claimed
    );
    assert!(!s.session_active(7, "s1").await?);
    assert!(s.session_active(7, "s2").await?);
    let left = s.slot_ttl_ms(7).await.expect("still pending");
    assert!(left > 300, "the new login's TTL, PTTL {left}");
    assert_eq!(
        s.attach(7, "u7", "s1", "srv-a").await?,
        AttachOutcome::SessionInvalid
    );
    assert_eq!(s.release_login(7, "s1").await?, None);
    // Once attached to a live server, the slot holds.
    assert_eq!(
        s.attach(7, "u7", "s2", "srv-a").await?,
        AttachOutcome::Attached
    );
    assert_eq!(
        s.claim_login(7, "s3", ttl, &everyone_live).await?,
        ClaimOutcome::Held {
            session: "s2".into(),
            server: "srv-a".into()
        }
    );
    // Another user's slot is independent.
    assert_eq!(
        s.claim_login(8, "s2", ttl, &nobody_live).await?,
        ClaimOutcome::Claimed
    );

    // A pending slot nobody takes over expires by itself.
    wait_until("the pending slot to expire", DEADLINE, || async {
        !s.session_active(8, "s2").await.unwrap()
    })
    .await?;
    assert_eq!(s.slot(8).await, None);
    // An expired pending session cannot attach any more.
    assert_eq!(
        s.attach(8, "u8", "s2", "srv-a").await?,
        AttachOutcome::SessionInvalid
    );
    Ok(())
}

pub(crate) async fn claim_of_attached_slot_depends_on_server_liveness(
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
            session: "s1".into(),
            server: "srv-a".into()
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

pub(crate) async fn concurrent_claims_have_one_winner(s: &StoreUnderTest) -> anyhow::Result<()> {
    // Concurrent logins of one user, each then connecting: a pending slot is taken over by
    // the next login, so several claims may succeed, but one session holds the slot and only
    // that one can attach; afterwards the slot holds against everyone.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let store = s.store.clone();
        set.spawn(async move {
            let session = format!("s{i}");
            let out = store
                .claim_login(3, &session, LONG_TTL, &everyone_live)
                .await;
            (session, out)
        });
    }
    let mut claimed = Vec::new();
    while let Some(r) = set.join_next().await {
        let (session, out) = r?;
        match out? {
            ClaimOutcome::Claimed => claimed.push(session),
            other => assert_eq!(other, ClaimOutcome::Contended),
        }
    }
    assert!(!claimed.is_empty());
    let mut active = Vec::new();
    for session in &claimed {
        if s.session_active(3, session).await? {
            active.push(session.clone());
        }
    }
    assert_eq!(active.len(), 1, "one session holds the slot: {active:?}");
    let mut attached = 0;
    for session in &claimed {
        if s.attach(3, "u3", session, "srv-a").await? == AttachOutcome::Attached {
            attached += 1;
        }
    }
    assert_eq!(attached, 1, "exactly one of {claimed:?} attaches");
    assert!(matches!(
        s.claim_login(3, "late", LONG_TTL, &everyone_live).await?,
        ClaimOutcome::Held { .. }
    ));
    Ok(())
}

pub(crate) async fn generations_count_per_user_and_restart_after_keep(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    assert_eq!(s.generation(5).await?, 0);
    assert_eq!(s.next_generation(5, LONG_TTL).await?, 1);
    assert_eq!(s.next_generation(5, LONG_TTL).await?, 2);
    assert_eq!(s.generation(5).await?, 2);
    // Per user, and forgotten `keep` after the last change.
    assert_eq!(s.generation(6).await?, 0);
    assert_eq!(s.next_generation(6, Duration::from_millis(200)).await?, 1);
    wait_until("the generation to expire", DEADLINE, || async {
        s.generation(6).await.unwrap() == 0
    })
    .await?;
    assert_eq!(s.next_generation(6, LONG_TTL).await?, 1);
    assert_eq!(s.generation(5).await?, 2);
    Ok(())
}

pub(crate) async fn take_over_replaces_only_the_named_session(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    let ttl = Duration::from_millis(300);
    // Nothing to take over.
    assert!(!s.take_over_login(4, "s1", "s2", LONG_TTL).await?);
    assert_eq!(s.slot(4).await, None);
    s.claim_login(4, "s1", LONG_TTL, &nobody_live).await?;
    assert_eq!(
        s.attach(4, "u4", "s1", "srv-a").await?,
        AttachOutcome::Attached
    );
    // A session that does not hold the slot takes nothing, not even one whose id merely
    // starts like the holder's.
    assert!(!s.take_over_login(4, "s", "s2", LONG_TTL).await?);
    assert!(!s.take_over_login(4, "s9", "s2", LONG_TTL).await?);
    assert!(s.session_active(4, "s1").await?);
    // The holder's session (attached): replaced by a pending one with the new TTL.
    assert!(s.take_over_login(4, "s1", "s2", ttl).await?);
    assert!(!s.session_active(4, "s1").await?);
    assert!(s.session_active(4, "s2").await?);
    let pttl = s.slot_ttl_ms(4).await;
    assert!(
        pttl.is_some_and(|ms| ms > 0 && ms <= 300),
        "pending with the new TTL, got PTTL {pttl:?}"
    );
    // The old session can neither attach nor release; the new one attaches.
    assert_eq!(
        s.attach(4, "u4", "s1", "srv-a").await?,
        AttachOutcome::SessionInvalid
    );
    assert_eq!(s.release_login(4, "s1").await?, None);
    // A pending holder can be taken over too, then the new session attaches.
    assert!(s.take_over_login(4, "s2", "s3", LONG_TTL).await?);
    assert_eq!(
        s.attach(4, "u4", "s3", "srv-b").await?,
        AttachOutcome::Attached
    );
    assert_eq!(
        s.claim_login(4, "late", LONG_TTL, &everyone_live).await?,
        ClaimOutcome::Held {
            session: "s3".into(),
            server: "srv-b".into()
        }
    );
    Ok(())
}

pub(crate) async fn attach_is_single_use(s: &StoreUnderTest) -> anyhow::Result<()> {
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

pub(crate) async fn detach_removes_only_its_own_route_and_slot(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
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

pub(crate) async fn late_detach_of_an_old_session_keeps_the_new_one(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
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

pub(crate) async fn release_login_frees_the_slot_and_returns_the_server(
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
