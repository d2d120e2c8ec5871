//! Channels (FreeIM's 频道: temporary group chats, chat rooms, live-stream comment areas),
//! for clients acting as themselves (bearer) and, read-only, for backends (API key). The
//! business API's own channel calls (acting for any user) are in [`super::admin`] and share
//! the functions here.
//!
//! - `POST /api/channels/{name}/join` (bearer) → `{"channel","joined":bool}` (false: already a
//!   member); 409 `too_many_channels`
//! - `POST /api/channels/{name}/leave` (bearer) → `{"channel","left":bool}`
//! - `GET /api/channels/mine` (bearer) → `{"channels":[{"name","members","online"}]}`
//! - `GET /api/channels?after=&limit=` (bearer or API key) → `{"channels":[..],"next"}`
//! - `GET /api/channels/{name}` (bearer or API key) → `{"name","members","online"}`; 404
//!   `unknown_channel` when it has no members. (A channel named `mine` is listed by the
//!   other calls; this path is the caller's list.)
//! - `GET /api/channels/{name}/members?after=&limit=` (bearer or API key) →
//!   `{"members":[{"user_id","name","online"}],"next"}`
//! - `POST /api/channels/{name}/messages` `{"body"}` (bearer, members only: 403
//!   `not_a_member`) → `{"id","delivered","timestamp_ms"}`
//!
//! Channel messages go to the online members but the sender, once, and are never stored
//! (see `routing::deliver_channels`). Membership lives in Redis (one sorted set per channel),
//! so a message to a channel of 100k members costs two round trips per 1,000 members, not
//! one per member.

use crate::{
    api::{
        messages::{route_one, GroupSent},
        presence::parse_limit,
    },
    auth::{AuthUser, Caller},
    error::{ApiJson, ApiQuery, AppError},
    routing::Outgoing,
    state::{is_live, AppState},
};
use axum::{
    extract::{Path, State},
    http::StatusCode,
    Json,
};
use cim_common::{
    ids,
    pb::{MessageKind, Send},
    store::{ChannelInfo, JoinOutcome, MAX_CHANNEL_PAGE},
};
use futures_util::{stream, StreamExt};
use serde::{Deserialize, Serialize};

/// The channel name of a path, validated.
pub fn channel_name(name: String) -> Result<String, AppError> {
    if ids::valid_channel_name(&name) {
        Ok(name)
    } else {
        Err(AppError::new(
            StatusCode::BAD_REQUEST,
            "invalid_channel",
            format!(
                "a channel name is 1 to {} letters, digits or _-.",
                ids::MAX_CHANNEL_NAME_LEN
            ),
        ))
    }
}

#[derive(Serialize)]
pub struct Joined {
    pub channel: String,
    /// False when the user was a member already.
    pub joined: bool,
}

#[derive(Serialize)]
pub struct Left {
    pub channel: String,
    /// False when the user was not a member.
    pub left: bool,
}

#[derive(Serialize)]
pub struct ChannelView {
    pub name: String,
    pub members: u64,
    pub online: u64,
}

impl From<ChannelInfo> for ChannelView {
    fn from(c: ChannelInfo) -> Self {
        Self {
            name: c.name,
            members: c.members,
            online: c.online,
        }
    }
}

#[derive(Serialize)]
pub struct ChannelList {
    pub channels: Vec<ChannelView>,
}

#[derive(Serialize)]
pub struct ChannelPage {
    pub channels: Vec<ChannelView>,
    /// Pass as `after` for the next page; null on the last one.
    pub next: Option<String>,
}

#[derive(Serialize)]
pub struct Member {
    pub user_id: u64,
    pub name: String,
    pub online: bool,
}

#[derive(Serialize)]
pub struct MemberPage {
    pub members: Vec<Member>,
    /// Pass as `after` for the next page; null on the last one.
    pub next: Option<String>,
}

#[derive(Deserialize)]
pub struct PageQuery {
    #[serde(default)]
    pub after: Option<String>,
    #[serde(default)]
    pub limit: Option<String>,
}

#[derive(Deserialize)]
pub struct ChannelMessage {
    #[serde(default)]
    pub body: String,
}

/// Adds `user_id` to `channel` (shared with the business API).
pub async fn join_user(state: &AppState, channel: String, user_id: u64) -> Result<Joined, AppError> {
    let max = state.config().max_channels_per_user;
    match state.store().channel_join(&channel, user_id, max).await? {
        JoinOutcome::Joined => {
            tracing::debug!(user_id, channel = %channel, "joined channel");
            Ok(Joined {
                channel,
                joined: true,
            })
        }
        JoinOutcome::AlreadyMember => Ok(Joined {
            channel,
            joined: false,
        }),
        JoinOutcome::TooManyChannels => Err(AppError::new(
            StatusCode::CONFLICT,
            "too_many_channels",
            format!("a user can be a member of at most {max} channels; leave one first"),
        )),
    }
}

/// Removes `user_id` from `channel` (shared with the business API).
pub async fn leave_user(state: &AppState, channel: String, user_id: u64) -> Result<Left, AppError> {
    let left = state.store().channel_leave(&channel, user_id).await?;
    Ok(Left { channel, left })
}

/// The channels of `user_id` with their sizes (shared with the business API).
pub async fn channels_of(state: &AppState, user_id: u64) -> Result<ChannelList, AppError> {
    let names = state.store().user_channels(user_id).await?;
    let stats = state.store().channel_stats(&names).await?;
    Ok(ChannelList {
        channels: stats.into_iter().map(ChannelView::from).collect(),
    })
}

/// Routes a channel message from `item`'s sender and answers like a group send.
pub async fn send_to_channel(state: &AppState, item: Outgoing) -> Result<GroupSent, AppError> {
    let result = route_one(state, item).await?;
    Ok(GroupSent {
        id: result.message_id,
        delivered: result.delivered,
        timestamp_ms: result.timestamp_ms,
    })
}

/// The `Send` of a channel message.
pub fn channel_send(channel: String, body: String) -> Send {
    Send {
        kind: MessageKind::Channel as i32,
        channel,
        body,
        ..Default::default()
    }
}

pub async fn join(
    State(state): State<AppState>,
    user: AuthUser,
    Path(name): Path<String>,
) -> Result<Json<Joined>, AppError> {
    let channel = channel_name(name)?;
    Ok(Json(join_user(&state, channel, user.user_id).await?))
}

pub async fn leave(
    State(state): State<AppState>,
    user: AuthUser,
    Path(name): Path<String>,
) -> Result<Json<Left>, AppError> {
    let channel = channel_name(name)?;
    Ok(Json(leave_user(&state, channel, user.user_id).await?))
}

pub async fn mine(
    State(state): State<AppState>,
    user: AuthUser,
) -> Result<Json<ChannelList>, AppError> {
    Ok(Json(channels_of(&state, user.user_id).await?))
}

pub async fn list(
    State(state): State<AppState>,
    _caller: Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<ChannelPage>, AppError> {
    let limit = parse_limit(q.limit.as_deref(), MAX_CHANNEL_PAGE.min(state.config().online_page_max))?;
    let after = q.after.filter(|a| !a.is_empty());
    if let Some(a) = &after {
        // Names are the cursor: a valid one only (no arbitrary strings into the store).
        channel_name(a.clone()).map_err(|_| AppError::bad_request("invalid cursor in `after`"))?;
    }
    let names = state.store().channel_list(after.as_deref(), limit).await?;
    let next = if names.len() >= limit {
        names.last().cloned()
    } else {
        None
    };
    let stats = state.store().channel_stats(&names).await?;
    Ok(Json(ChannelPage {
        channels: stats.into_iter().map(ChannelView::from).collect(),
        next,
    }))
}

pub async fn info(
    State(state): State<AppState>,
    _caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<ChannelView>, AppError> {
    let channel = channel_name(name)?;
    let stats = state.store().channel_stats(std::slice::from_ref(&channel)).await?;
    match stats.into_iter().next() {
        Some(c) if c.members > 0 => Ok(Json(c.into())),
        _ => Err(AppError::new(
            StatusCode::NOT_FOUND,
            "unknown_channel",
            format!("channel {channel:?} has no members"),
        )),
    }
}

/// Name lookups of one member page in flight at once.
const NAME_LOOKUPS: usize = 32;

pub async fn members(
    State(state): State<AppState>,
    _caller: Caller,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<MemberPage>, AppError> {
    let channel = channel_name(name)?;
    let limit = parse_limit(q.limit.as_deref(), state.config().online_page_max)?;
    let after = match q.after.as_deref().filter(|a| !a.is_empty()) {
        None => 0,
        Some(a) => a
            .parse::<u64>()
            .map_err(|_| AppError::bad_request("invalid cursor in `after`"))?,
    };
    let store = state.store();
    let ids = store.channel_members(&channel, after, limit).await?;
    let next = if ids.len() >= limit {
        ids.last().map(u64::to_string)
    } else {
        None
    };
    let (names, routes) = tokio::join!(
        stream::iter(ids.iter().copied())
            .map(|id| async move { store.user_name(id).await })
            .buffered(NAME_LOOKUPS)
            .collect::<Vec<_>>(),
        store.routes(&ids)
    );
    let routes = routes?;
    let servers = state.servers();
    let mut members = Vec::with_capacity(ids.len());
    for ((id, name), route) in ids.iter().zip(names).zip(routes) {
        // A member whose account is gone (not possible today) is left out, not an error.
        let Some(name) = name? else { continue };
        members.push(Member {
            user_id: *id,
            name,
            online: route.is_some_and(|r| is_live(&servers, &r.server_id)),
        });
    }
    Ok(Json(MemberPage { members, next }))
}

pub async fn send(
    State(state): State<AppState>,
    user: AuthUser,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<ChannelMessage>,
) -> Result<Json<GroupSent>, AppError> {
    let channel = channel_name(name)?;
    let item = Outgoing::from_user(user.user_id, user.user_name, channel_send(channel, req.body));
    Ok(Json(send_to_channel(&state, item).await?))
}
