//! Accounts, against both stores.

use super::*;

pub(crate) async fn create_user_and_look_up(s: &StoreUnderTest) -> anyhow::Result<()> {
    // Ids count from 1; a refused duplicate uses one up (INCR comes first in Redis).
    assert_eq!(s.create_user("alice", "hash-a").await?, Some(1));
    assert_eq!(s.create_user("bob", "hash-b").await?, Some(2));
    assert_eq!(s.create_user("alice", "other").await?, None);
    assert_eq!(s.create_user("carol", "hash-c").await?, Some(4));
    let (alice, bob) = (1, 2);

    let rec = s.user_by_name("alice").await?.expect("alice record");
    assert_eq!(
        (rec.id, rec.name.as_str(), rec.password_hash.as_str()),
        (alice, "alice", "hash-a"),
        "the duplicate must not overwrite the first account"
    );
    assert_eq!(s.user_by_name("nobody").await?, None);
    assert_eq!(s.user_by_name("Alice").await?, None, "names are exact");
    assert_eq!(s.user_name(alice).await?.as_deref(), Some("alice"));
    assert_eq!(s.user_name(bob).await?.as_deref(), Some("bob"));
    assert_eq!(s.user_name(3).await?, None, "the refused duplicate's id");
    assert_eq!(s.user_name(999_999).await?, None);
    Ok(())
}

pub(crate) async fn concurrent_create_of_one_name_has_one_winner(
    s: &StoreUnderTest,
) -> anyhow::Result<()> {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let store = s.store.clone();
        set.spawn(async move { store.create_user("carol", &format!("pw{i}")).await });
    }
    let mut winners = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Some(id) = r?? {
            winners.push(id);
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let rec = s.user_by_name("carol").await?.unwrap();
    assert_eq!(rec.id, winners[0]);
    Ok(())
}
