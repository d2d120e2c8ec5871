//! [`Counting`]: a [`StateStore`] that passes every call to another one and counts the calls
//! that fail (`cim_backend_errors_total{backend="redis"}`). [`crate::backend::Backends::connect`]
//! wraps the Redis store in it, so every store error of a server or a route is counted in one
//! place, whichever call it came from, without touching the store's own code. The cost is one
//! more boxed future per store call (each one a network round trip carrying a whole batch).

use super::*;
use prometheus_client::metrics::counter::Counter;
use std::sync::Arc;

/// A store whose failed calls are counted in `errors`.
pub struct Counting {
    inner: Arc<dyn StateStore>,
    errors: Counter,
}

impl Counting {
    pub fn new(inner: Arc<dyn StateStore>, errors: Counter) -> Self {
        Self { inner, errors }
    }

    fn count<T>(&self, result: StoreResult<T>) -> StoreResult<T> {
        if result.is_err() {
            self.errors.inc();
        }
        result
    }
}

#[async_trait]
impl StateStore for Counting {
    async fn create_user(&self, name: &str, password_hash: &str) -> StoreResult<Option<u64>> {
        self.count(self.inner.create_user(name, password_hash).await)
    }

    async fn user_by_name(&self, name: &str) -> StoreResult<Option<UserRecord>> {
        self.count(self.inner.user_by_name(name).await)
    }

    async fn user_name(&self, id: u64) -> StoreResult<Option<String>> {
        self.count(self.inner.user_name(id).await)
    }

    async fn claim_login(
        &self,
        user_id: u64,
        session: &str,
        pending_ttl: Duration,
        is_live: IsLive<'_>,
    ) -> StoreResult<ClaimOutcome> {
        let r = self
            .inner
            .claim_login(user_id, session, pending_ttl, is_live)
            .await;
        self.count(r)
    }

    async fn take_over_login(
        &self,
        user_id: u64,
        held_session: &str,
        session: &str,
        pending_ttl: Duration,
    ) -> StoreResult<bool> {
        let r = self
            .inner
            .take_over_login(user_id, held_session, session, pending_ttl)
            .await;
        self.count(r)
    }

    async fn next_generation(&self, user_id: u64, keep: Duration) -> StoreResult<u64> {
        self.count(self.inner.next_generation(user_id, keep).await)
    }

    async fn generation(&self, user_id: u64) -> StoreResult<u64> {
        self.count(self.inner.generation(user_id).await)
    }

    async fn session_active(&self, user_id: u64, session: &str) -> StoreResult<bool> {
        self.count(self.inner.session_active(user_id, session).await)
    }

    async fn release_login(&self, user_id: u64, session: &str) -> StoreResult<Option<String>> {
        self.count(self.inner.release_login(user_id, session).await)
    }

    async fn attach(
        &self,
        user_id: u64,
        name: &str,
        session: &str,
        server_id: &str,
    ) -> StoreResult<AttachOutcome> {
        let r = self.inner.attach(user_id, name, session, server_id).await;
        self.count(r)
    }

    async fn detach(
        &self,
        user_id: u64,
        name: &str,
        session: &str,
        server_id: &str,
        reason: &str,
    ) -> StoreResult<()> {
        let r = self
            .inner
            .detach(user_id, name, session, server_id, reason)
            .await;
        self.count(r)
    }

    async fn routes(&self, user_ids: &[u64]) -> StoreResult<Vec<Option<RouteEntry>>> {
        self.count(self.inner.routes(user_ids).await)
    }

    async fn scan_routes(&self, cursor: u64, count: usize) -> StoreResult<(u64, Vec<RouteEntry>)> {
        self.count(self.inner.scan_routes(cursor, count).await)
    }

    async fn online_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<OnlineEntry>> {
        self.count(self.inner.online_page(prefix, after, limit).await)
    }

    async fn remove_stale_route(&self, entry: &RouteEntry) -> StoreResult<()> {
        self.count(self.inner.remove_stale_route(entry).await)
    }

    async fn inbox_store(&self, messages: &mut [Message]) -> StoreResult<()> {
        self.count(self.inner.inbox_store(messages).await)
    }

    async fn inbox_store_then_routes(
        &self,
        messages: &mut [Message],
        user_ids: &[u64],
    ) -> (StoreResult<()>, StoreResult<Vec<Option<RouteEntry>>>) {
        let (stored, routes) = self.inner.inbox_store_then_routes(messages, user_ids).await;
        // One round trip: one error, however many of its parts failed.
        if stored.is_err() || routes.is_err() {
            self.errors.inc();
        }
        (stored, routes)
    }

    async fn inbox_read(
        &self,
        user_id: u64,
        after_seq: u64,
        limit: usize,
    ) -> StoreResult<Vec<Message>> {
        self.count(self.inner.inbox_read(user_id, after_seq, limit).await)
    }

    async fn inbox_top(&self, user_id: u64) -> StoreResult<u64> {
        self.count(self.inner.inbox_top(user_id).await)
    }

    async fn inbox_ack(&self, acks: &[(u64, Vec<String>)]) -> StoreResult<Vec<AckedReceipt>> {
        self.count(self.inner.inbox_ack(acks).await)
    }

    async fn receipts_done(&self, done: &[(u64, Vec<String>)]) -> StoreResult<()> {
        self.count(self.inner.receipts_done(done).await)
    }

    async fn pending_receipts(&self, user_id: u64, limit: usize) -> StoreResult<Vec<AckedReceipt>> {
        self.count(self.inner.pending_receipts(user_id, limit).await)
    }

    async fn inbox_len(&self, user_id: u64) -> StoreResult<usize> {
        self.count(self.inner.inbox_len(user_id).await)
    }

    async fn events_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<StoredEvent>> {
        self.count(self.inner.events_after(after, limit).await)
    }

    async fn events_wait(
        &self,
        after: &str,
        limit: usize,
        timeout: Duration,
    ) -> StoreResult<Vec<StoredEvent>> {
        self.count(self.inner.events_wait(after, limit, timeout).await)
    }

    async fn events_last_id(&self) -> StoreResult<String> {
        self.count(self.inner.events_last_id().await)
    }

    async fn claim_broadcasts(
        &self,
        claims: &[(String, i64)],
        ttl: Duration,
    ) -> StoreResult<Vec<Option<i64>>> {
        self.count(self.inner.claim_broadcasts(claims, ttl).await)
    }

    async fn release_broadcasts(&self, ids: &[String]) -> StoreResult<()> {
        self.count(self.inner.release_broadcasts(ids).await)
    }

    async fn lease(&self, name: &str, owner: &str, ttl: Duration) -> StoreResult<bool> {
        self.count(self.inner.lease(name, owner, ttl).await)
    }

    async fn cursor(&self, name: &str) -> StoreResult<Option<String>> {
        self.count(self.inner.cursor(name).await)
    }

    async fn set_cursor(&self, name: &str, value: &str) -> StoreResult<()> {
        self.count(self.inner.set_cursor(name, value).await)
    }

    async fn channel_join(
        &self,
        channel: &str,
        user_id: u64,
        max_channels: usize,
    ) -> StoreResult<JoinOutcome> {
        let r = self
            .inner
            .channel_join(channel, user_id, max_channels)
            .await;
        self.count(r)
    }

    async fn channel_leave(&self, channel: &str, user_id: u64) -> StoreResult<bool> {
        self.count(self.inner.channel_leave(channel, user_id).await)
    }

    async fn channel_is_member(&self, channel: &str, user_id: u64) -> StoreResult<bool> {
        self.count(self.inner.channel_is_member(channel, user_id).await)
    }

    async fn user_channels(&self, user_id: u64) -> StoreResult<Vec<String>> {
        self.count(self.inner.user_channels(user_id).await)
    }

    async fn channel_members(
        &self,
        channel: &str,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<u64>> {
        self.count(self.inner.channel_members(channel, after, limit).await)
    }

    async fn channel_list(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<String>> {
        self.count(self.inner.channel_list(after, limit).await)
    }

    async fn channel_stats(&self, channels: &[String]) -> StoreResult<Vec<ChannelInfo>> {
        self.count(self.inner.channel_stats(channels).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_calls_through_and_counts_nothing_while_they_succeed() {
        let errors = Counter::default();
        let store = Counting::new(Arc::new(MemoryStore::new()), errors.clone());
        assert_eq!(store.create_user("ann", "hash").await.unwrap(), Some(1));
        assert_eq!(store.user_name(1).await.unwrap().as_deref(), Some("ann"));
        assert_eq!(store.inbox_top(1).await.unwrap(), 0);
        assert_eq!(errors.get(), 0);
    }
}
