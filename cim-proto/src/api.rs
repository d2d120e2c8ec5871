//! The route's public HTTP API, as JSON: the request and response bodies both sides use (the
//! route serializes what the SDK deserializes, and the reverse), the error shape and its
//! [`ErrorCode`]s. One copy, so the two cannot drift. With feature `openapi` (cim-route's)
//! every type also derives `utoipa::ToSchema`, and the field docs here are the descriptions
//! of `/api/openapi.json`.
//!
//! Request bodies the SDK writes with `serde_json::json!` (messages, channel messages) and the
//! route's own request types with `#[serde(default)]` fields stay apart: the route reads them
//! leniently (a missing field is a 400 it words itself), the SDK writes exactly what it means.

mod accounts;
mod channels;
mod error;
mod groups;
mod messages;
mod presence;

pub use accounts::{Credentials, LoggedIn, OkBody, Registered, ServerAddrs};
pub use channels::{ChannelList, ChannelPage, ChannelView, Joined, Left, Member, MemberPage};
pub use error::{ErrorBody, ErrorCode, ErrorDetail};
pub use groups::{
    Added, ConversationList, ConversationView, CreatedGroup, GroupAnswer, GroupChange,
    GroupChatSent, GroupList, GroupMemberView, GroupMembersPage, GroupView, MessagePage,
    ReadMarkAnswer,
};
pub use messages::{GroupSent, PrivateSent};
pub use presence::{OnlinePage, OnlineUser, ServerList};
