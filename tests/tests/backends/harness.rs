//! The state store under test: a fresh store of either kind with a window into it ([`StoreUnderTest`]).

use super::*;

/// How to look at what a store holds, beside its API.
pub(crate) enum Peek {
    /// Raw commands on the Redis server or cluster (which the struct keeps running).
    Redis { redis: Box<RedisNodes>, keys: Keys },
    /// The memory store's inspection methods.
    Memory(Arc<MemoryStore>),
}

/// One implementation of [`StateStore`], fresh and empty, with a window into it. Derefs to
/// the store, so tests call `s.claim_login(..)`.
pub(crate) struct StoreUnderTest {
    pub(crate) store: Arc<dyn StateStore>,
    pub(crate) peek: Peek,
}

impl Deref for StoreUnderTest {
    type Target = dyn StateStore;

    fn deref(&self) -> &Self::Target {
        self.store.as_ref()
    }
}

impl StoreUnderTest {
    /// A `RedisStore` on its own `redis-server`, under a fresh prefix.
    pub(crate) async fn redis() -> anyhow::Result<Self> {
        Self::on(RedisNodes::start(RedisKind::default()).await?).await
    }

    /// A `RedisStore` on its own 3-master Redis Cluster, under a fresh prefix.
    pub(crate) async fn cluster() -> anyhow::Result<Self> {
        Self::on(RedisNodes::cluster().await?).await
    }

    async fn on(redis: RedisNodes) -> anyhow::Result<Self> {
        let prefix = unique_prefix();
        let store = RedisStore::connect(&redis.url(), &prefix, CALL_TIMEOUT).await?;
        let keys = store.keys().clone();
        Ok(Self {
            store: Arc::new(store),
            peek: Peek::Redis {
                redis: Box::new(redis),
                keys,
            },
        })
    }

    pub(crate) fn memory() -> Self {
        let store = Arc::new(MemoryStore::new());
        Self {
            store: store.clone(),
            peek: Peek::Memory(store),
        }
    }

    /// Another, empty store of the same kind (on the same Redis, under another prefix).
    pub(crate) async fn another(&self) -> anyhow::Result<Arc<dyn StateStore>> {
        Ok(match &self.peek {
            Peek::Redis { redis, .. } => {
                Arc::new(RedisStore::connect(&redis.url(), &unique_prefix(), CALL_TIMEOUT).await?)
            }
            Peek::Memory(_) => Arc::new(MemoryStore::new()),
        })
    }

    /// Another, empty store of the same kind with these inbox limits.
    pub(crate) async fn with_inbox_limits(
        &self,
        limits: InboxLimits,
    ) -> anyhow::Result<Arc<dyn StateStore>> {
        Ok(match &self.peek {
            Peek::Redis { redis, .. } => Arc::new(
                RedisStore::connect(&redis.url(), &unique_prefix(), CALL_TIMEOUT)
                    .await?
                    .with_inbox_limits(limits),
            ),
            Peek::Memory(_) => Arc::new(MemoryStore::new().with_inbox_limits(limits)),
        })
    }

    /// Another, empty store of the same kind with these history limits.
    pub(crate) async fn with_history_limits(
        &self,
        limits: HistoryLimits,
    ) -> anyhow::Result<Arc<dyn StateStore>> {
        Ok(match &self.peek {
            Peek::Redis { redis, .. } => Arc::new(
                RedisStore::connect(&redis.url(), &unique_prefix(), CALL_TIMEOUT)
                    .await?
                    .with_history_limits(limits),
            ),
            Peek::Memory(_) => Arc::new(MemoryStore::new().with_history_limits(limits)),
        })
    }

    /// Another, empty store of the same kind keeping `max_len` presence events.
    pub(crate) async fn with_events_max_len(
        &self,
        max_len: usize,
    ) -> anyhow::Result<Arc<dyn StateStore>> {
        Ok(match &self.peek {
            Peek::Redis { redis, .. } => Arc::new(
                RedisStore::connect(&redis.url(), &unique_prefix(), CALL_TIMEOUT)
                    .await?
                    .with_events_max_len(max_len),
            ),
            Peek::Memory(_) => Arc::new(MemoryStore::new().with_events_max_len(max_len)),
        })
    }

    /// Whether this is the store on a Redis Cluster (sharded presence streams).
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.peek, Peek::Redis { ref redis, .. } if redis.is_cluster())
    }

    pub(crate) fn is_redis(&self) -> bool {
        matches!(self.peek, Peek::Redis { .. })
    }

    /// Returns once a blocking read of the event stream is waiting in Redis (`INFO clients`
    /// counts it); at once for the memory store and a cluster (which polls), whose waiters
    /// cannot be observed (an event published before the wait starts is found by its first
    /// look: the test holds either way).
    pub(crate) async fn wait_for_blocked_reader(&self) -> anyhow::Result<()> {
        let Peek::Redis { redis, .. } = &self.peek else {
            return Ok(());
        };
        let RedisNodes::Single(redis) = redis.as_ref() else {
            return Ok(());
        };
        let c = redis.connection().await?;
        wait_until("a blocking read to wait in Redis", DEADLINE, || {
            let mut c = c.clone();
            async move {
                let info: String = redis::cmd("INFO")
                    .arg("clients")
                    .query_async(&mut c)
                    .await
                    .expect("INFO");
                info.lines()
                    .filter_map(|l| l.strip_prefix("blocked_clients:"))
                    .any(|n| n.trim().parse::<u64>().is_ok_and(|n| n > 0))
            }
        })
        .await
    }

    /// The raw login slot of `user` (`{session}` or `{session}@{server}`).
    pub(crate) async fn slot(&self, user: u64) -> Option<String> {
        match &self.peek {
            Peek::Redis { redis, keys } => {
                let mut c = redis.connection().await.expect("redis connection");
                c.get(keys.login(user)).await.expect("GET")
            }
            Peek::Memory(m) => m.login_slot(user).map(|(value, _)| value),
        }
    }

    /// Time to live of `user`'s slot, in whole milliseconds: `None` without expiry. Panics
    /// when there is no slot.
    pub(crate) async fn slot_ttl_ms(&self, user: u64) -> Option<u64> {
        match &self.peek {
            Peek::Redis { redis, keys } => {
                let mut c = redis.connection().await.expect("redis connection");
                let pttl: i64 = redis::cmd("PTTL")
                    .arg(keys.login(user))
                    .query_async(&mut c)
                    .await
                    .expect("PTTL");
                assert_ne!(pttl, -2, "user {user} has no slot");
                u64::try_from(pttl).ok()
            }
            Peek::Memory(m) => {
                let (_, ttl) = m
                    .login_slot(user)
                    .unwrap_or_else(|| panic!("user {user} has no slot"));
                ttl.map(|t| t.as_millis() as u64)
            }
        }
    }

    /// The online index, in order.
    pub(crate) async fn online(&self) -> Vec<String> {
        match &self.peek {
            Peek::Redis { redis, keys } => {
                let mut c = redis.connection().await.expect("redis connection");
                let mut all = Vec::new();
                for shard in 0..keys.shards() {
                    let members: Vec<String> =
                        c.zrange(keys.online(shard), 0, -1).await.expect("ZRANGE");
                    all.extend(members);
                }
                all.sort();
                all
            }
            Peek::Memory(m) => m.online_members(),
        }
    }

    /// Claims and attaches `session` of `user` on `server` (asserting both succeed).
    pub(crate) async fn connect_user(&self, user: u64, name: &str, session: &str, server: &str) {
        assert_eq!(
            self.claim_login(user, session, LONG_TTL, &nobody_live)
                .await
                .unwrap(),
            ClaimOutcome::Claimed,
            "claim of user {user}"
        );
        assert_eq!(
            self.attach(user, name, session, server).await.unwrap(),
            AttachOutcome::Attached,
            "attach of user {user}"
        );
    }
}
