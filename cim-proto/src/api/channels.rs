//! Channels: joining and leaving, listing channels and members (pages with a cursor).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Joined {
    pub channel: String,
    /// False when the user was a member already.
    pub joined: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Left {
    pub channel: String,
    /// False when the user was not a member.
    pub left: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChannelView {
    pub name: String,
    pub members: u64,
    pub online: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChannelList {
    pub channels: Vec<ChannelView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChannelPage {
    pub channels: Vec<ChannelView>,
    /// Pass as `after` for the next page; null on the last one.
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub next: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Member {
    pub user_id: u64,
    pub name: String,
    pub online: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MemberPage {
    pub members: Vec<Member>,
    /// Pass as `after` for the next page; null on the last one.
    // A user id, written as text (`"42"`) like every cursor; a number is read too.
    #[serde(
        default,
        serialize_with = "id_cursor_text",
        deserialize_with = "id_cursor"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, required = true))]
    pub next: Option<u64>,
}

/// The members cursor written as text: `"42"`, or null.
fn id_cursor_text<S: serde::Serializer>(next: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match next {
        Some(id) => s.collect_str(id),
        None => s.serialize_none(),
    }
}

/// The members cursor read back: a user id as a string (`"42"`); a number is taken too.
fn id_cursor<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Cursor {
        Text(String),
        Number(u64),
    }
    match Option::<Cursor>::deserialize(d)? {
        None => Ok(None),
        Some(Cursor::Number(n)) => Ok(Some(n)),
        Some(Cursor::Text(s)) => s.parse().map(Some).map_err(serde::de::Error::custom),
    }
}
