//! [`Layered`]: a store wrapped with a [`Hook`] that sees every call, before it reaches the
//! store underneath and after it answered.
//!
//! Why a hook rather than wrappers: the error counter of the Redis store
//! ([`super::counting`]) and the test double ([`super::faulty`]) both need to stand between a
//! caller and every method of every role trait. Written as wrappers, each restated all the
//! methods (twice ~35 forwarding methods, to keep in step with the traits by hand). Here the
//! forwarding is written once, by [`layered!`] from one list of the methods (a line each,
//! checked by the compiler against the traits), and a wrapper is only its hook: what to do
//! before and after a call, told which call it is ([`Call`]). The hook is a static type
//! parameter, so a wrapper costs nothing a hand-written one would not (no extra boxing: its
//! `before` is an `impl Future`).

use super::*;

/// What a call answers, as a hook sees it: whether it failed, and the answer of a call the
/// hook refused.
trait Answer {
    fn failed(&self) -> bool;
    fn refused(e: StoreError) -> Self;
}

impl<T> Answer for StoreResult<T> {
    fn failed(&self) -> bool {
        self.is_err()
    }

    fn refused(e: StoreError) -> Self {
        Err(e)
    }
}

/// [`Delivery::inbox_store_then_routes`]: one round trip, failed when either part did; refused,
/// it answers as a failed store does (nothing looked up).
impl Answer for (StoreResult<()>, StoreResult<Vec<Option<RouteEntry>>>) {
    fn failed(&self) -> bool {
        self.0.is_err() || self.1.is_err()
    }

    fn refused(e: StoreError) -> Self {
        (Err(e), Ok(Vec::new()))
    }
}

/// What a [`Layered`] store does around each call of the store underneath.
pub trait Hook: Send + Sync + 'static {
    /// Runs before the call reaches the store underneath; an error is the call's answer
    /// instead (the store is not called, and [`Hook::after`] is not either).
    fn before(&self, call: Call) -> impl std::future::Future<Output = StoreResult<()>> + Send {
        let _ = call;
        std::future::ready(Ok(()))
    }

    /// Runs when the store underneath answered; `failed`: it answered an error.
    fn after(&self, call: Call, failed: bool) {
        let _ = (call, failed);
    }
}

/// `inner` with `hook` around every call. It implements each role trait that `inner` does.
/// It dereferences to the hook, so the hook's knobs and counters read as the store's
/// (`store.fail` of the test double).
#[derive(Default)]
pub struct Layered<S, H> {
    inner: S,
    hook: H,
}

impl<S, H> Layered<S, H> {
    pub fn new(inner: S, hook: H) -> Self {
        Self { inner, hook }
    }

    /// The store underneath, for direct inspection (calls on it bypass the hook).
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Changes the store underneath (its settings: `with_inbox_limits`, ...).
    #[must_use]
    pub fn map_inner(self, f: impl FnOnce(S) -> S) -> Self {
        Self {
            inner: f(self.inner),
            hook: self.hook,
        }
    }

    pub fn hook(&self) -> &H {
        &self.hook
    }
}

impl<S, H> std::ops::Deref for Layered<S, H> {
    type Target = H;

    fn deref(&self) -> &H {
        &self.hook
    }
}

/// Writes, from one list of the role traits' methods, the [`Call`] enum (a variant per
/// method, with the fields a hook may look at) and the impl of each role trait for
/// [`Layered`]: every method runs `before`, the inner store's method, then `after`.
macro_rules! layered {
    ($(
        $role:ident {
            $( $variant:ident $({ $($field:ident: $field_ty:ty),* })? =
                fn $method:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty; )*
        }
    )*) => {
        /// The call a [`Hook`] sees: one variant per method of the role traits.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Call {
            $($( $variant $({ $($field: $field_ty),* })?, )*)*
        }

        $(
            #[async_trait]
            impl<S: $role, H: Hook> $role for Layered<S, H> {
                $(
                    async fn $method(&self $(, $arg: $ty)*) -> $ret {
                        let call = Call::$variant $({ $($field),* })?;
                        if let Err(e) = self.hook.before(call).await {
                            return Answer::refused(e);
                        }
                        let answer = self.inner.$method($($arg),*).await;
                        self.hook.after(call, answer.failed());
                        answer
                    }
                )*
            }
        )*
    };
}

layered! {
    Accounts {
        CreateUser = fn create_user(&self, name: &str, password_hash: &str) -> StoreResult<Option<u64>>;
        UserByName = fn user_by_name(&self, name: &str) -> StoreResult<Option<UserRecord>>;
        UserName = fn user_name(&self, id: u64) -> StoreResult<Option<String>>;
    }
    LoginSlots {
        ClaimLogin = fn claim_login(&self, user_id: u64, session: &str, pending_ttl: Duration, is_live: IsLive<'_>) -> StoreResult<ClaimOutcome>;
        TakeOverLogin = fn take_over_login(&self, user_id: u64, held_session: &str, session: &str, pending_ttl: Duration) -> StoreResult<bool>;
        NextGeneration = fn next_generation(&self, user_id: u64, keep: Duration) -> StoreResult<u64>;
        Generation = fn generation(&self, user_id: u64) -> StoreResult<u64>;
        SessionActive = fn session_active(&self, user_id: u64, session: &str) -> StoreResult<bool>;
        ReleaseLogin = fn release_login(&self, user_id: u64, session: &str) -> StoreResult<Option<String>>;
    }
    Sessions {
        Attach = fn attach(&self, user_id: u64, name: &str, session: &str, server_id: &str) -> StoreResult<AttachOutcome>;
        Detach = fn detach(&self, user_id: u64, name: &str, session: &str, server_id: &str, reason: &str) -> StoreResult<()>;
    }
    Routes {
        Routes = fn routes(&self, user_ids: &[u64]) -> StoreResult<Vec<Option<RouteEntry>>>;
        ServerRoutes = fn server_routes(&self, server_id: &str, cursor: u64, count: usize) -> StoreResult<(u64, Vec<RouteEntry>)>;
        OnlinePage = fn online_page(&self, prefix: &str, after: Option<&str>, limit: usize) -> StoreResult<Vec<OnlineEntry>>;
        RemoveStaleRoute = fn remove_stale_route(&self, entry: &RouteEntry) -> StoreResult<()>;
    }
    Delivery {
        InboxStore = fn inbox_store(&self, messages: &mut [Message]) -> StoreResult<()>;
        InboxStoreThenRoutes = fn inbox_store_then_routes(&self, messages: &mut [Message], user_ids: &[u64]) -> (StoreResult<()>, StoreResult<Vec<Option<RouteEntry>>>);
    }
    Inbox {
        InboxRead { after_seq: u64 } = fn inbox_read(&self, user_id: u64, after_seq: u64, limit: usize) -> StoreResult<Vec<Message>>;
        InboxTop = fn inbox_top(&self, user_id: u64) -> StoreResult<u64>;
        InboxAck = fn inbox_ack(&self, acks: &[(u64, Vec<String>)]) -> StoreResult<Vec<AckedReceipt>>;
        ReceiptsDone = fn receipts_done(&self, done: &[(u64, Vec<String>)]) -> StoreResult<()>;
        PendingReceipts = fn pending_receipts(&self, user_id: u64, limit: usize) -> StoreResult<Vec<AckedReceipt>>;
        InboxLen = fn inbox_len(&self, user_id: u64) -> StoreResult<usize>;
    }
    Events {
        EventsAfter = fn events_after(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<StoredEvent>>;
        EventsWait = fn events_wait(&self, after: &str, limit: usize, timeout: Duration) -> StoreResult<Vec<StoredEvent>>;
        EventsLastId = fn events_last_id(&self) -> StoreResult<String>;
        PublishMessages = fn publish_messages(&self, events: &[PresenceEvent]) -> StoreResult<()>;
    }
    Broadcasts {
        ClaimBroadcasts = fn claim_broadcasts(&self, claims: &[(String, i64)], ttl: Duration) -> StoreResult<Vec<Option<i64>>>;
        ReleaseBroadcasts = fn release_broadcasts(&self, ids: &[String]) -> StoreResult<()>;
    }
    Leases {
        Lease = fn lease(&self, name: &str, owner: &str, ttl: Duration) -> StoreResult<bool>;
        Cursor = fn cursor(&self, name: &str) -> StoreResult<Option<String>>;
        SetCursor = fn set_cursor(&self, name: &str, value: &str) -> StoreResult<()>;
    }
    Channels {
        ChannelJoin = fn channel_join(&self, channel: &str, user_id: u64, max_channels: usize) -> StoreResult<JoinOutcome>;
        ChannelLeave = fn channel_leave(&self, channel: &str, user_id: u64) -> StoreResult<bool>;
        ChannelIsMember = fn channel_is_member(&self, channel: &str, user_id: u64) -> StoreResult<bool>;
        UserChannels = fn user_channels(&self, user_id: u64) -> StoreResult<Vec<String>>;
        ChannelMembers = fn channel_members(&self, channel: &str, after: u64, limit: usize) -> StoreResult<Vec<u64>>;
        ChannelList = fn channel_list(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<String>>;
        ChannelStats = fn channel_stats(&self, channels: &[String]) -> StoreResult<Vec<ChannelInfo>>;
    }
    Groups {
        GroupCreate = fn group_create(&self, owner: u64, name: &str, event: &mut Message, limits: GroupLimits) -> StoreResult<Option<GroupInfo>>;
        GroupInfo = fn group_info(&self, group: u64) -> StoreResult<Option<GroupInfo>>;
        GroupMember = fn group_member(&self, group: u64, user: u64) -> StoreResult<Option<GroupMember>>;
        GroupMembers = fn group_members(&self, group: u64, after: u64, limit: usize) -> StoreResult<Vec<GroupMember>>;
        GroupAdd = fn group_add(&self, group: u64, users: &[u64], event: &mut Message, limits: GroupLimits) -> StoreResult<AddOutcome>;
        GroupRemove = fn group_remove(&self, group: u64, users: &[u64], event: &mut Message) -> StoreResult<u64>;
        GroupSetRole = fn group_set_role(&self, group: u64, user: u64, role: Role, event: &mut Message) -> StoreResult<Changed>;
        GroupRename = fn group_rename(&self, group: u64, name: &str, event: &mut Message) -> StoreResult<Changed>;
        GroupDisband = fn group_disband(&self, group: u64, event: &mut Message) -> StoreResult<Changed>;
        UserGroups = fn user_groups(&self, user: u64) -> StoreResult<Vec<u64>>;
    }
    History {
        PrivateAppend = fn private_append(&self, messages: &mut [Message]) -> StoreResult<()>;
        GroupAppend = fn group_append(&self, messages: &mut [Message]) -> StoreResult<Vec<GroupAppend>>;
        History = fn history(&self, viewer: u64, conv: ConvKey, page: HistoryPage, limit: usize) -> StoreResult<Option<Vec<Message>>>;
        Conversations = fn conversations(&self, user: u64, before_ms: Option<i64>, limit: usize) -> StoreResult<Vec<ConversationSummary>>;
        MarkRead = fn mark_read(&self, user: u64, conv: ConvKey, seq: u64) -> StoreResult<Option<u64>>;
    }
    GroupSync {
        GroupCursors = fn group_cursors(&self, user: u64) -> StoreResult<Vec<GroupCursor>>;
        GroupRead = fn group_read(&self, group: u64, after: u64, limit: usize) -> StoreResult<Vec<Message>>;
        GroupAck = fn group_ack(&self, acks: &[(u64, Vec<(u64, u64)>)]) -> StoreResult<()>;
        GroupCheck = fn group_check(&self, group: u64, users: &[u64]) -> StoreResult<(u64, Vec<bool>)>;
    }
}
