//! Stored groups and conversations: the answers of `/api/groups…` and `/api/conversations…`
//! (and their `/api/admin/…` twins). Messages are `cim.Message` in the proto3 JSON mapping,
//! as in WebSocket text frames.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GroupView {
    pub id: u64,
    pub name: String,
    pub owner: u64,
    pub created_ms: i64,
    /// Member count, the owner included.
    pub members: u64,
    /// Seq of the newest message (or event) in the group's log.
    pub top: u64,
    /// Membership version: grows with every change of the members.
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GroupAnswer {
    pub group: GroupView,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreatedGroup {
    pub group: GroupView,
    /// The outcome of adding `members`; null when none were asked for.
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub added: Option<Added>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GroupList {
    pub groups: Vec<GroupView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GroupMemberView {
    pub user_id: u64,
    pub name: String,
    /// `owner`, `admin` or `member`.
    #[cfg_attr(feature = "openapi", schema(example = "member"))]
    pub role: String,
    /// Seq of the event that made them a member.
    pub joined_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GroupMembersPage {
    pub members: Vec<GroupMemberView>,
    /// Pass as `after` for the next page; null on the last one.
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub next: Option<String>,
}

/// What adding members did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Added {
    /// Added now.
    pub added: Vec<u64>,
    /// Members already.
    pub already: Vec<u64>,
    /// Not added: in as many groups as a user may be.
    pub too_many_groups: Vec<u64>,
    /// The group would have more members than allowed: nobody was added (never true in an
    /// answer: that is a 409).
    pub group_full: bool,
    /// Seq of the JOINED event; 0 when nobody was added.
    pub seq: u64,
}

/// A change done: the seq of its event in the group's log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GroupChange {
    pub group_id: u64,
    pub seq: u64,
}

/// The answer of a group message: the other send endpoints' fields, and its place in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GroupChatSent {
    pub id: String,
    /// Connections it was pushed to.
    pub delivered: u32,
    pub timestamp_ms: i64,
    /// This `message_id` was sent before (a retry): answered with the first send's
    /// timestamp and seq, pushed to nobody again.
    pub repeat: bool,
    /// The message's seq in the group's log.
    pub log_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConversationView {
    /// `user` (a private conversation; `id` is the peer) or `group`.
    #[serde(rename = "type")]
    #[cfg_attr(feature = "openapi", schema(example = "group"))]
    pub kind: String,
    pub id: u64,
    /// The peer's user name, or the group's name.
    pub name: String,
    /// The newest message kept (`cim.Message` in the proto3 JSON mapping); null once it
    /// aged out.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>, required = true))]
    pub last: Option<crate::pb::Message>,
    /// Seq of the newest message.
    pub top: u64,
    /// The viewer's read mark.
    pub read_seq: u64,
    /// Messages after the read mark.
    pub unread: u64,
    /// Private conversations: the peer's read mark ("seen" up to here); 0 for groups.
    pub peer_read_seq: u64,
    /// Unix ms of the newest message: the list's order, and the `before_ms` of the next page.
    pub activity_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConversationList {
    pub conversations: Vec<ConversationView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MessagePage {
    /// Oldest first; each a `cim.Message` in the proto3 JSON mapping.
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<Object>))]
    pub messages: Vec<crate::pb::Message>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReadMarkAnswer {
    /// The mark now (marks never move back; clamped to the conversation's newest seq).
    pub read_seq: u64,
}
