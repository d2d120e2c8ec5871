//! [`FaultyStore`]: the in-memory store with fault injection and call counters, for unit
//! tests of the crates built on [`StateStore`] (error paths, "how many round trips").
//! Compiled only with the `test-support` feature, which only dev-dependencies enable: the
//! product types stay free of test knobs.

use super::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// [`MemoryStore`] with fault injection and call counts, for the tests that need them (the
/// product type stays free of test knobs). `fail` makes every call answer `Unavailable`;
/// `hang` makes `user_by_name` never answer (signalling `entered` when a call gets stuck).
#[derive(Default)]
pub struct FaultyStore {
    inner: MemoryStore,
    pub fail: AtomicBool,
    pub hang: AtomicBool,
    pub entered: tokio::sync::Notify,
    pub scans: AtomicUsize,
    pub route_lookups: AtomicUsize,
    /// Calls of `user_name` and `user_by_name`.
    pub user_lookups: AtomicUsize,
    /// While set, `inbox_read` past the first page (`after_seq > 0`) signals `entered` and
    /// waits for `resume` (one `notify_one` lets one read through).
    pub hold_paged_reads: AtomicBool,
    pub resume: tokio::sync::Notify,
    /// Calls of `inbox_ack`, each signalled on `acked` once done.
    pub ack_calls: AtomicUsize,
    pub acked: tokio::sync::Notify,
}

impl FaultyStore {
    /// The store underneath, for direct inspection (`login_slot`, ...).
    pub fn inner(&self) -> &MemoryStore {
        &self.inner
    }

    /// Sets the inbox bounds of the store underneath.
    #[must_use]
    pub fn with_inbox_limits(mut self, limits: InboxLimits) -> Self {
        self.inner = self.inner.with_inbox_limits(limits);
        self
    }

    /// Makes every call fail as if Redis were down (`true`), or work again.
    pub fn set_fail(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }

    fn check(&self) -> StoreResult<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("test double set to fail".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl StateStore for FaultyStore {
    async fn create_user(&self, name: &str, password_hash: &str) -> StoreResult<Option<u64>> {
        self.check()?;
        self.inner.create_user(name, password_hash).await
    }

    async fn user_by_name(&self, name: &str) -> StoreResult<Option<UserRecord>> {
        self.user_lookups.fetch_add(1, Ordering::SeqCst);
        if self.hang.load(Ordering::SeqCst) {
            self.entered.notify_one();
            std::future::pending::<()>().await;
        }
        self.check()?;
        self.inner.user_by_name(name).await
    }

    async fn user_name(&self, id: u64) -> StoreResult<Option<String>> {
        self.user_lookups.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.user_name(id).await
    }

    async fn claim_login(
        &self,
        user_id: u64,
        session: &str,
        pending_ttl: Duration,
        is_live: IsLive<'_>,
    ) -> StoreResult<ClaimOutcome> {
        self.check()?;
        self.inner
            .claim_login(user_id, session, pending_ttl, is_live)
            .await
    }

    async fn take_over_login(
        &self,
        user_id: u64,
        held_session: &str,
        session: &str,
        pending_ttl: Duration,
    ) -> StoreResult<bool> {
        self.check()?;
        self.inner
            .take_over_login(user_id, held_session, session, pending_ttl)
            .await
    }

    async fn next_generation(&self, user_id: u64, keep: Duration) -> StoreResult<u64> {
        self.check()?;
        self.inner.next_generation(user_id, keep).await
    }

    async fn generation(&self, user_id: u64) -> StoreResult<u64> {
        self.check()?;
        self.inner.generation(user_id).await
    }

    async fn session_active(&self, user_id: u64, session: &str) -> StoreResult<bool> {
        self.check()?;
        self.inner.session_active(user_id, session).await
    }

    async fn release_login(&self, user_id: u64, session: &str) -> StoreResult<Option<String>> {
        self.check()?;
        self.inner.release_login(user_id, session).await
    }

    async fn attach(
        &self,
        user_id: u64,
        name: &str,
        session: &str,
        server_id: &str,
    ) -> StoreResult<AttachOutcome> {
        self.check()?;
        self.inner.attach(user_id, name, session, server_id).await
    }

    async fn detach(
        &self,
        user_id: u64,
        name: &str,
        session: &str,
        server_id: &str,
        reason: &str,
    ) -> StoreResult<()> {
        self.check()?;
        self.inner
            .detach(user_id, name, session, server_id, reason)
            .await
    }

    async fn routes(&self, user_ids: &[u64]) -> StoreResult<Vec<Option<RouteEntry>>> {
        self.route_lookups.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.routes(user_ids).await
    }

    async fn scan_routes(&self, cursor: u64, count: usize) -> StoreResult<(u64, Vec<RouteEntry>)> {
        self.scans.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.scan_routes(cursor, count).await
    }

    async fn online_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<OnlineEntry>> {
        self.check()?;
        self.inner.online_page(prefix, after, limit).await
    }

    async fn remove_stale_route(&self, entry: &RouteEntry) -> StoreResult<()> {
        self.check()?;
        self.inner.remove_stale_route(entry).await
    }

    async fn inbox_store(&self, messages: &mut [Message]) -> StoreResult<()> {
        self.check()?;
        self.inner.inbox_store(messages).await
    }

    async fn inbox_read(
        &self,
        user_id: u64,
        after_seq: u64,
        limit: usize,
    ) -> StoreResult<Vec<Message>> {
        self.check()?;
        if after_seq > 0 && self.hold_paged_reads.load(Ordering::SeqCst) {
            self.entered.notify_one();
            self.resume.notified().await;
        }
        // Lets other tasks run first, as the round trip to a real store does: an ordering
        // that only holds because the in-memory read never yields would not hold in Redis.
        tokio::task::yield_now().await;
        self.inner.inbox_read(user_id, after_seq, limit).await
    }

    async fn inbox_top(&self, user_id: u64) -> StoreResult<u64> {
        self.check()?;
        self.inner.inbox_top(user_id).await
    }

    async fn inbox_ack(&self, acks: &[(u64, Vec<String>)]) -> StoreResult<Vec<AckedReceipt>> {
        self.check()?;
        let result = self.inner.inbox_ack(acks).await;
        self.ack_calls.fetch_add(1, Ordering::SeqCst);
        self.acked.notify_one();
        result
    }

    async fn events_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<StoredEvent>> {
        self.check()?;
        self.inner.events_after(after, limit).await
    }

    async fn events_wait(
        &self,
        after: &str,
        limit: usize,
        timeout: Duration,
    ) -> StoreResult<Vec<StoredEvent>> {
        self.check()?;
        self.inner.events_wait(after, limit, timeout).await
    }

    async fn events_last_id(&self) -> StoreResult<String> {
        self.check()?;
        self.inner.events_last_id().await
    }

    async fn claim_broadcasts(
        &self,
        claims: &[(String, i64)],
        ttl: Duration,
    ) -> StoreResult<Vec<Option<i64>>> {
        self.check()?;
        self.inner.claim_broadcasts(claims, ttl).await
    }

    async fn release_broadcasts(&self, ids: &[String]) -> StoreResult<()> {
        self.check()?;
        self.inner.release_broadcasts(ids).await
    }

    async fn lease(&self, name: &str, owner: &str, ttl: Duration) -> StoreResult<bool> {
        self.check()?;
        self.inner.lease(name, owner, ttl).await
    }

    async fn cursor(&self, name: &str) -> StoreResult<Option<String>> {
        self.check()?;
        self.inner.cursor(name).await
    }

    async fn set_cursor(&self, name: &str, value: &str) -> StoreResult<()> {
        self.check()?;
        self.inner.set_cursor(name, value).await
    }

    async fn channel_join(
        &self,
        channel: &str,
        user_id: u64,
        max_channels: usize,
    ) -> StoreResult<JoinOutcome> {
        self.check()?;
        self.inner
            .channel_join(channel, user_id, max_channels)
            .await
    }

    async fn channel_leave(&self, channel: &str, user_id: u64) -> StoreResult<bool> {
        self.check()?;
        self.inner.channel_leave(channel, user_id).await
    }

    async fn channel_is_member(&self, channel: &str, user_id: u64) -> StoreResult<bool> {
        self.check()?;
        self.inner.channel_is_member(channel, user_id).await
    }

    async fn user_channels(&self, user_id: u64) -> StoreResult<Vec<String>> {
        self.check()?;
        self.inner.user_channels(user_id).await
    }

    async fn channel_members(
        &self,
        channel: &str,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<u64>> {
        self.check()?;
        self.inner.channel_members(channel, after, limit).await
    }

    async fn channel_list(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<String>> {
        self.check()?;
        self.inner.channel_list(after, limit).await
    }

    async fn channel_stats(&self, channels: &[String]) -> StoreResult<Vec<ChannelInfo>> {
        self.check()?;
        self.inner.channel_stats(channels).await
    }

    async fn receipts_done(&self, done: &[(u64, Vec<String>)]) -> StoreResult<()> {
        self.check()?;
        self.inner.receipts_done(done).await
    }

    async fn pending_receipts(&self, user_id: u64, limit: usize) -> StoreResult<Vec<AckedReceipt>> {
        self.check()?;
        self.inner.pending_receipts(user_id, limit).await
    }

    async fn inbox_len(&self, user_id: u64) -> StoreResult<usize> {
        self.check()?;
        self.inner.inbox_len(user_id).await
    }
}
