//! Leases, broadcast claims and cursors, against both stores.

use super::*;

pub(crate) async fn leases_are_held_renewed_and_expire(s: &StoreUnderTest) -> anyhow::Result<()> {
    assert!(s.lease("webhook", "route-a", LONG_TTL).await?);
    assert!(!s.lease("webhook", "route-b", LONG_TTL).await?);
    assert!(s.lease("webhook", "route-a", LONG_TTL).await?, "renewal");
    assert!(!s.lease("webhook", "route-b", LONG_TTL).await?);
    // Names are separate.
    assert!(s.lease("other", "route-b", LONG_TTL).await?);

    // A short lease its holder does not renew passes to the next one asking.
    let short = Duration::from_millis(200);
    assert!(s.lease("short", "route-a", short).await?);
    assert!(!s.lease("short", "route-b", LONG_TTL).await?);
    wait_until("the short lease to expire", DEADLINE, || async {
        s.lease("short", "route-b", LONG_TTL).await.unwrap()
    })
    .await?;
    assert!(!s.lease("short", "route-a", short).await?);
    Ok(())
}

pub(crate) async fn broadcast_claims_answer_repeats_until_released_or_expired(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    let claim = |id: &str, ts: i64| (id.to_string(), ts);
    assert_eq!(s.claim_broadcasts(&[], LONG_TTL).await?, vec![]);
    // First claims win, in slice order; a repeat inside one call is a repeat too.
    assert_eq!(
        s.claim_broadcasts(
            &[claim("7-a", 100), claim("7-b", 101), claim("7-a", 102)],
            LONG_TTL
        )
        .await?,
        vec![None, None, Some(100)]
    );
    // A later repeat answers the first timestamp, and does not replace it.
    assert_eq!(
        s.claim_broadcasts(&[claim("7-b", 200), claim("7-c", 201)], LONG_TTL)
            .await?,
        vec![Some(101), None]
    );
    assert_eq!(
        s.claim_broadcasts(&[claim("7-b", 300)], LONG_TTL).await?,
        vec![Some(101)]
    );

    // Released (it reached nobody): the next claim is a first one, with its own timestamp.
    s.release_broadcasts(&["7-a".to_string(), "never-claimed".to_string()])
        .await?;
    assert_eq!(
        s.claim_broadcasts(&[claim("7-a", 400), claim("7-b", 401)], LONG_TTL)
            .await?,
        vec![None, Some(101)]
    );
    assert_eq!(
        s.claim_broadcasts(&[claim("7-a", 500)], LONG_TTL).await?,
        vec![Some(400)]
    );
    s.release_broadcasts(&[]).await?;

    // A claim expires with its time to live.
    let short = Duration::from_millis(200);
    assert_eq!(
        s.claim_broadcasts(&[claim("short", 1)], short).await?,
        vec![None]
    );
    assert_eq!(
        s.claim_broadcasts(&[claim("short", 2)], LONG_TTL).await?,
        vec![Some(1)]
    );
    wait_until("the short claim to expire", DEADLINE, || async {
        s.claim_broadcasts(&[claim("short", 3)], short)
            .await
            .unwrap()
            == vec![None]
    })
    .await?;
    Ok(())
}

pub(crate) async fn cursors_are_stored_by_name(s: &StoreUnderTest) -> anyhow::Result<()> {
    assert_eq!(s.cursor("webhook").await?, None);
    s.set_cursor("webhook", "1700000000000-0").await?;
    assert_eq!(
        s.cursor("webhook").await?.as_deref(),
        Some("1700000000000-0")
    );
    s.set_cursor("webhook", "1700000000000-7").await?;
    assert_eq!(
        s.cursor("webhook").await?.as_deref(),
        Some("1700000000000-7")
    );
    assert_eq!(s.cursor("other").await?, None);
    Ok(())
}
