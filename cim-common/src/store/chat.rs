//! Stored conversations: persistent groups (members and roles), the per-conversation message
//! logs (history), each user's conversation list, read marks and group positions.
//!
//! Three role traits:
//! - [`Groups`] (the route's): create a group, add and remove members, roles, rename,
//!   disband, and the reads of group info and members. Every change appends its
//!   `MESSAGE_KIND_GROUP_EVENT` to the group's log in the same atomic step as the change, so
//!   a log position says exactly who was a member: the event of a removal has seq `r`, and
//!   nothing after `r` is for the removed member.
//! - [`History`] (the route's): appending private and group messages to their logs, reading
//!   history pages, the conversation list with unread counts, read marks.
//! - [`GroupSync`] (the connection server's): what a login needs to catch a user up on their
//!   groups (positions, tops, membership versions), the log reads of that catch-up, the
//!   positions a client acks, and the membership check a server makes before delivering a
//!   group message whose membership version it has not seen.
//!
//! **Logs.** A conversation's log holds its messages in `log_seq` order (1, 2, …, never
//! reused), trimmed to [`HistoryLimits::max_messages`] and [`HistoryLimits::max_age`]. A
//! private conversation (the pair of users) has one log that both read; a group has one log
//! for all its members: a group message is written once, whatever the member count.
//! Appending is idempotent by message id (within the last [`DEDUP_WINDOW`] messages of the
//! conversation): a retried send gets the first attempt's seq and stored copy back.
//!
//! **Positions and marks.** Per user and group, the *position* is the last seq the user's
//! client acked (what a login catches up from; at least the seq of the user's JOINED event);
//! per user and conversation, the *read mark* is the last seq the user read (unread = the
//! conversation's top − the read mark; sending a message moves the sender's mark to it).

use super::{Message, StoreResult};
use async_trait::async_trait;
use std::time::Duration;

/// Most messages one history or catch-up read returns.
pub const MAX_HISTORY_READ: usize = 200;
/// Most members one members page returns.
pub const MAX_MEMBERS_PAGE: usize = 1000;
/// Most conversations one conversation-list page returns.
pub const MAX_CONVERSATIONS_PAGE: usize = 200;
/// Message ids per conversation remembered for idempotent appends: a retry of a send is
/// recognised while fewer than this many messages came after it in its conversation. 100:
/// far more than arrive in a conversation during a retry (seconds), and few enough that
/// Redis keeps the set as a listpack (at most 101 entries, under the default
/// `zset-max-listpack-entries` 128: measured 3.6 KB; at 128 it became a skiplist of 16 KB).
pub const DEDUP_WINDOW: usize = 100;
/// Longest group name, in bytes.
pub const MAX_GROUP_NAME_LEN: usize = 128;

/// How much history is kept, per conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Messages kept per conversation; appending one more drops the oldest.
    pub max_messages: usize,
    /// Messages older than this are dropped (by `timestamp_ms`); a conversation with no
    /// message for this long is gone as a whole.
    pub max_age: Duration,
    /// Messages before their JOINED event that new group members may read (0: history
    /// starts at their join).
    pub before_join: u64,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        Self {
            max_messages: 10_000,
            max_age: Duration::from_secs(90 * 24 * 3600),
            before_join: 0,
        }
    }
}

/// Bounds of groups, checked atomically by the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimits {
    /// Members per group (the owner included).
    pub max_members: usize,
    /// Groups one user may be a member of.
    pub max_groups: usize,
}

impl Default for GroupLimits {
    fn default() -> Self {
        Self {
            max_members: 2000,
            max_groups: 500,
        }
    }
}

/// A member's role in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Member,
    Admin,
    Owner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "member" => Some(Role::Member),
            "admin" => Some(Role::Admin),
            "owner" => Some(Role::Owner),
            _ => None,
        }
    }

    /// The one-letter code the stores keep.
    pub(crate) fn code(self) -> &'static str {
        match self {
            Role::Member => "m",
            Role::Admin => "a",
            Role::Owner => "o",
        }
    }

    pub(crate) fn from_code(s: &str) -> Option<Self> {
        match s {
            "m" => Some(Role::Member),
            "a" => Some(Role::Admin),
            "o" => Some(Role::Owner),
            _ => None,
        }
    }
}

/// A conversation, as one participant sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConvKey {
    /// The private conversation with this user (the peer).
    User(u64),
    Group(u64),
}

impl ConvKey {
    /// `u{id}` / `g{id}`: how the stores name it in a user's read marks and lists.
    pub fn encode(self) -> String {
        match self {
            ConvKey::User(id) => format!("u{id}"),
            ConvKey::Group(id) => format!("g{id}"),
        }
    }

    pub fn decode(s: &str) -> Option<Self> {
        let (kind, id) = s.split_at_checked(1)?;
        let id: u64 = id.parse().ok()?;
        if id == 0 {
            return None;
        }
        match kind {
            "u" => Some(ConvKey::User(id)),
            "g" => Some(ConvKey::Group(id)),
            _ => None,
        }
    }

    /// The conversation of `message` as `viewer` sees it (`None`: not a kept kind).
    pub fn of_message(message: &Message, viewer: u64) -> Option<Self> {
        use crate::pb::MessageKind;
        match MessageKind::try_from(message.kind).ok()? {
            MessageKind::GroupChat | MessageKind::GroupEvent => {
                (message.group_id != 0).then_some(ConvKey::Group(message.group_id))
            }
            MessageKind::Private | MessageKind::System => {
                let peer = if message.sender_id == viewer {
                    message.receiver_id
                } else {
                    message.sender_id
                };
                (peer != 0).then_some(ConvKey::User(peer))
            }
            _ => None,
        }
    }
}

/// A group, as [`Groups::group_info`] describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    pub id: u64,
    pub name: String,
    pub owner: u64,
    pub created_ms: i64,
    pub members: u64,
    /// Seq of the newest message (or event) in the group's log.
    pub top: u64,
    /// Membership version: grows with every change of the members.
    pub version: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupMember {
    pub user_id: u64,
    pub role: Role,
    /// Seq of the event that made them a member (CREATED for the owner, JOINED otherwise).
    pub joined_seq: u64,
}

/// Outcome of [`Groups::group_add`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddOutcome {
    /// Added now (listed in the JOINED event).
    pub added: Vec<u64>,
    /// Members already.
    pub already: Vec<u64>,
    /// In [`GroupLimits::max_groups`] groups already.
    pub too_many_groups: Vec<u64>,
    /// The group would pass [`GroupLimits::max_members`]: nobody was added.
    pub group_full: bool,
    /// No such group (or disbanded).
    pub no_group: bool,
    /// Seq of the JOINED event (0: none appended).
    pub seq: u64,
}

/// Outcome of a group change that names no users ([`Groups::group_rename`], ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Changed {
    /// Done; the seq of its event.
    Done(u64),
    /// No such group (or disbanded).
    NoGroup,
    /// The user it names is not a member.
    NotMember,
}

/// Outcome of appending one group message ([`History::group_append`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupAppend {
    /// In the log (its `log_seq` set); `version` is the membership version it was appended
    /// under; `repeat`: it was there already (a retried send; the slice holds the stored copy).
    Appended {
        version: u64,
        repeat: bool,
    },
    /// The sender is not a member.
    NotMember,
    NoGroup,
}

/// Where a history page starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryPage {
    /// The newest messages with a seq below this one (`u64::MAX` or 0: the newest of all),
    /// backwards.
    Before(u64),
    /// The oldest messages with a seq above this one, forwards (sync).
    After(u64),
}

/// One entry of a user's conversation list.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationSummary {
    pub conv: ConvKey,
    /// Group conversations: the group's name.
    pub name: String,
    /// The newest message kept (none once it aged out).
    pub last: Option<Message>,
    /// Seq of the newest message.
    pub top: u64,
    /// This user's read mark.
    pub read_seq: u64,
    /// Messages after the read mark (`top - read_seq`).
    pub unread: u64,
    /// Private conversations: the peer's read mark ("seen" up to here). 0 for groups.
    pub peer_read_seq: u64,
    /// Unix ms of the newest message (the list's order, newest first).
    pub activity_ms: i64,
}

/// A user's place in one of their groups, for a login's catch-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCursor {
    pub group: u64,
    /// Last seq the user's client acked (at least the JOINED event's seq).
    pub position: u64,
    /// Seq of the newest message in the group's log.
    pub top: u64,
    /// Membership version (see [`GroupInfo::version`]).
    pub version: u64,
}

/// Persistent groups: membership, roles and names. The route's (it checks who may do what;
/// the store checks the limits, atomically). Every change's `event` is the group's
/// GROUP_EVENT message as the route built it (id, sender, timestamp, `group_event`); the
/// store gives it its `log_seq` and appends it in the same step as the change.
#[async_trait]
pub trait Groups: Send + Sync + 'static {
    /// Creates a group owned by `owner` (the CREATED `event` is its first message, seq 1).
    /// `Ok(None)` when the owner is in `max_groups` groups already.
    async fn group_create(
        &self,
        owner: u64,
        name: &str,
        event: &mut Message,
        limits: GroupLimits,
    ) -> StoreResult<Option<GroupInfo>>;

    async fn group_info(&self, group: u64) -> StoreResult<Option<GroupInfo>>;

    async fn group_member(&self, group: u64, user: u64) -> StoreResult<Option<GroupMember>>;

    /// A page of members in user-id order, all with an id above `after`, at most `limit`
    /// (capped at [`MAX_MEMBERS_PAGE`]).
    async fn group_members(
        &self,
        group: u64,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<GroupMember>>;

    /// Adds `users` as members. The JOINED `event` lists whom the caller wants added; the
    /// store sets its `group_event.user_ids` to those it adds (not members yet, not over
    /// `max_groups`) and appends it, unless nobody is added. A new member's read mark starts
    /// at the JOINED event (what came before is not theirs to read, nor unread).
    async fn group_add(
        &self,
        group: u64,
        users: &[u64],
        event: &mut Message,
        limits: GroupLimits,
    ) -> StoreResult<AddOutcome>;

    /// Removes `users` (LEFT or REMOVED `event`; its `user_ids` set to those removed). The
    /// owner cannot be removed here (the caller disbands or transfers). Returns the seq of
    /// the event, 0 when nobody was a member (nothing appended).
    async fn group_remove(
        &self,
        group: u64,
        users: &[u64],
        event: &mut Message,
    ) -> StoreResult<u64>;

    /// Sets `user`'s role to admin or member (ROLE `event`). The owner's role is not changed
    /// here, nor is anyone made owner: [`Changed::NotMember`].
    async fn group_set_role(
        &self,
        group: u64,
        user: u64,
        role: Role,
        event: &mut Message,
    ) -> StoreResult<Changed>;

    /// Renames the group (RENAMED `event`).
    async fn group_rename(
        &self,
        group: u64,
        name: &str,
        event: &mut Message,
    ) -> StoreResult<Changed>;

    /// Ends the group: appends the DISBANDED `event` (its last message), removes every
    /// member and the group from their lists; the log stays readable to nobody and expires.
    async fn group_disband(&self, group: u64, event: &mut Message) -> StoreResult<Changed>;

    /// The groups `user` is a member of, ascending.
    async fn user_groups(&self, user: u64) -> StoreResult<Vec<u64>>;
}

/// The conversation logs: appending, history, conversation lists and read marks. The route's.
#[async_trait]
pub trait History: Send + Sync + 'static {
    /// Appends PRIVATE messages from a user to the log of their (sender, receiver) pair, in
    /// slice order, setting each `log_seq`; a message already in its log (a retry) gets its
    /// stored copy back. Other messages of the slice (SYSTEM, receipts) are left as they are:
    /// they are not conversations. Moves both users' conversation to the top of their lists
    /// and the sender's read mark to the message. One round trip for the slice.
    async fn private_append(&self, messages: &mut [Message]) -> StoreResult<()>;

    /// Appends GROUP_CHAT messages (each with its `group_id`) to their groups' logs, in slice
    /// order, if the sender is a member (sender 0, the business API: any group). One round
    /// trip for the slice; answers `[i]` for `messages[i]`.
    async fn group_append(&self, messages: &mut [Message]) -> StoreResult<Vec<GroupAppend>>;

    /// A page of `conv`'s log as `viewer` sees it, oldest first, at most `limit` (capped at
    /// [`MAX_HISTORY_READ`]). `None` when the viewer may not read it (not a member of the
    /// group; a group member reads from their JOINED event on, less
    /// [`HistoryLimits::before_join`]). A private conversation nobody wrote to is empty.
    async fn history(
        &self,
        viewer: u64,
        conv: ConvKey,
        page: HistoryPage,
        limit: usize,
    ) -> StoreResult<Option<Vec<Message>>>;

    /// `user`'s conversations (private ones with a message kept, and every group they are a
    /// member of), newest activity first, those with activity before `before_ms` (`None`:
    /// from the newest), at most `limit` (capped at [`MAX_CONVERSATIONS_PAGE`]).
    async fn conversations(
        &self,
        user: u64,
        before_ms: Option<i64>,
        limit: usize,
    ) -> StoreResult<Vec<ConversationSummary>>;

    /// Moves `user`'s read mark of `conv` to `seq` (clamped to the conversation's top; marks
    /// never move back). Returns the mark now, `None` when the user is not in the
    /// conversation (not a member of the group).
    async fn mark_read(&self, user: u64, conv: ConvKey, seq: u64) -> StoreResult<Option<u64>>;
}

/// A connection server's side of groups: a login's catch-up and the acked positions.
#[async_trait]
pub trait GroupSync: Send + Sync + 'static {
    /// The groups `user` is a member of, with their position, the group's top and its
    /// membership version. Groups the user's list still names but that no longer have them
    /// as a member (an interrupted removal) are left out and dropped from the list.
    async fn group_cursors(&self, user: u64) -> StoreResult<Vec<GroupCursor>>;

    /// Up to `limit` messages of `group`'s log after `after`, oldest first (capped at
    /// [`MAX_HISTORY_READ`]); fewer means there are no more.
    async fn group_read(&self, group: u64, after: u64, limit: usize) -> StoreResult<Vec<Message>>;

    /// Moves positions forward: for each `(user, [(group, seq)])`, only for groups the user is
    /// in, never back. One round trip.
    async fn group_ack(&self, acks: &[(u64, Vec<(u64, u64)>)]) -> StoreResult<()>;

    /// The group's membership version and, for each of `users`, whether they are a member.
    async fn group_check(&self, group: u64, users: &[u64]) -> StoreResult<(u64, Vec<bool>)>;
}
