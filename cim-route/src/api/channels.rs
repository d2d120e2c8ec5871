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
//! (see `routing::channels::deliver_channels`). Membership lives in Redis (one sorted set per channel),
//! so a message to a channel of 100k members costs two round trips per 1,000 members, not
//! one per member.

use crate::{
    api::{
        messages::{route_fan_out, GroupSent},
        openapi::ErrorBody,
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
    pb::{MessageKind, Send},
    store::{ChannelInfo, JoinOutcome, MAX_CHANNEL_PAGE},
};
pub use cim_proto::api::{ChannelList, ChannelPage, ChannelView, Joined, Left, Member, MemberPage};
use cim_proto::ids;
use futures_util::{stream, StreamExt};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

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

/// A channel's counts as the API shows them (a function, not a `From`: both types are other
/// crates').
pub fn channel_view(c: ChannelInfo) -> ChannelView {
    ChannelView {
        name: c.name,
        members: c.members,
        online: c.online,
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// The `next` cursor of the previous page.
    #[serde(default)]
    pub after: Option<String>,
    /// Page size (default 50, capped by the route's configuration).
    #[serde(default)]
    #[param(value_type = Option<u64>, minimum = 1)]
    pub limit: Option<String>,
}

#[derive(Deserialize, ToSchema)]
pub struct ChannelMessage {
    /// Missing counts as empty, answered 400 like an empty one.
    #[serde(default)]
    #[schema(required = true)]
    pub body: String,
    /// Message id chosen by the caller (1-64 of `[0-9A-Za-z_-]`): a retry with it within a
    /// minute is answered (`delivered: 0`, the first `timestamp_ms`) and reaches nobody twice.
    #[serde(default)]
    pub id: Option<String>,
}

/// Adds `user_id` to `channel` (shared with the business API).
pub async fn join_user(
    state: &AppState,
    channel: String,
    user_id: u64,
) -> Result<Joined, AppError> {
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
        channels: stats.into_iter().map(channel_view).collect(),
    })
}

/// The `Send` of a channel message.
pub fn channel_send(channel: String, body: String, id: Option<String>) -> Send {
    Send {
        kind: MessageKind::Channel as i32,
        channel,
        body,
        message_id: id.unwrap_or_default(),
        ..Default::default()
    }
}

/// Join a channel.
///
/// Makes the caller a member; a channel exists while it has members.
#[utoipa::path(
    post,
    path = "/api/channels/{name}/join",
    tag = "channels",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Channel name: 1 to 64 letters, digits or `_-.`"),),
    responses(
        (status = 200, description = "Joined (`joined` false: already a member)", body = Joined),
        (status = 400, description = "`invalid_channel`: bad channel name", body = ErrorBody),
        (status = 401, description = "`unauthorized`, `token_expired` or `session_ended`", body = ErrorBody),
        (status = 409, description = "`too_many_channels`: the user is in as many channels as allowed", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn join(
    State(state): State<AppState>,
    user: AuthUser,
    Path(name): Path<String>,
) -> Result<Json<Joined>, AppError> {
    let channel = channel_name(name)?;
    Ok(Json(join_user(&state, channel, user.user_id).await?))
}

/// Leave a channel.
///
/// Ends the caller's membership; the channel is gone when its last member leaves.
#[utoipa::path(
    post,
    path = "/api/channels/{name}/leave",
    tag = "channels",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Channel name: 1 to 64 letters, digits or `_-.`"),),
    responses(
        (status = 200, description = "Left (`left` false: was not a member)", body = Left),
        (status = 400, description = "`invalid_channel`: bad channel name", body = ErrorBody),
        (status = 401, description = "`unauthorized`, `token_expired` or `session_ended`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn leave(
    State(state): State<AppState>,
    user: AuthUser,
    Path(name): Path<String>,
) -> Result<Json<Left>, AppError> {
    let channel = channel_name(name)?;
    Ok(Json(leave_user(&state, channel, user.user_id).await?))
}

/// List the caller's channels.
///
/// Every channel the caller is a member of, with its member and online counts.
#[utoipa::path(
    get,
    path = "/api/channels/mine",
    tag = "channels",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller's channels", body = ChannelList),
        (status = 401, description = "`unauthorized`, `token_expired` or `session_ended`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn mine(
    State(state): State<AppState>,
    user: AuthUser,
) -> Result<Json<ChannelList>, AppError> {
    Ok(Json(channels_of(&state, user.user_id).await?))
}

/// List channels.
///
/// One page of all channels (those with members) in name order.
#[utoipa::path(
    get,
    path = "/api/channels",
    tag = "channels",
    security(("bearer" = []), ("api_key" = [])),
    params(PageQuery),
    responses(
        (status = 200, description = "A page of channels", body = ChannelPage),
        (status = 400, description = "`bad_request`: bad `limit` or cursor", body = ErrorBody),
        (status = 401, description = "`unauthorized` (no or bad bearer token or API key), `token_expired`, `session_ended` or `api_disabled`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    _caller: Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<ChannelPage>, AppError> {
    let limit = parse_limit(
        q.limit.as_deref(),
        MAX_CHANNEL_PAGE.min(state.config().online_page_max),
    )?;
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
        // A join racing the last leave can leave an empty channel's name in the index for a
        // while: it is not a channel anyone is in.
        channels: stats
            .into_iter()
            .filter(|c| c.members > 0)
            .map(channel_view)
            .collect(),
        next,
    }))
}

/// Describe a channel.
///
/// Its member and online counts. (A channel named `mine` is listed by the other calls; this
/// path is the caller's list.)
#[utoipa::path(
    get,
    path = "/api/channels/{name}",
    tag = "channels",
    security(("bearer" = []), ("api_key" = [])),
    params(("name" = String, Path, description = "Channel name: 1 to 64 letters, digits or `_-.`"),),
    responses(
        (status = 200, description = "The channel", body = ChannelView),
        (status = 400, description = "`invalid_channel`: bad channel name", body = ErrorBody),
        (status = 401, description = "`unauthorized` (no or bad bearer token or API key), `token_expired`, `session_ended` or `api_disabled`", body = ErrorBody),
        (status = 404, description = "`unknown_channel`: the channel has no members", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn info(
    State(state): State<AppState>,
    _caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<ChannelView>, AppError> {
    let channel = channel_name(name)?;
    let stats = state
        .store()
        .channel_stats(std::slice::from_ref(&channel))
        .await?;
    match stats.into_iter().next() {
        Some(c) if c.members > 0 => Ok(Json(channel_view(c))),
        _ => Err(AppError::new(
            StatusCode::NOT_FOUND,
            "unknown_channel",
            format!("channel {channel:?} has no members"),
        )),
    }
}

/// Name lookups of one member page in flight at once.
const NAME_LOOKUPS: usize = 32;

/// List a channel's members.
///
/// One page of the members in user-id order, with whether each is online.
#[utoipa::path(
    get,
    path = "/api/channels/{name}/members",
    tag = "channels",
    security(("bearer" = []), ("api_key" = [])),
    params(
        ("name" = String, Path, description = "Channel name: 1 to 64 letters, digits or `_-.`"),
        PageQuery,
    ),
    responses(
        (status = 200, description = "A page of members", body = MemberPage),
        (status = 400, description = "`invalid_channel`, or `bad_request`: bad `limit` or cursor", body = ErrorBody),
        (status = 401, description = "`unauthorized` (no or bad bearer token or API key), `token_expired`, `session_ended` or `api_disabled`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
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
        ids.last().copied()
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

/// Send a message to a channel.
///
/// Members only. Delivered once to the online members but the sender; never stored. A retry
/// with the same `id` within a minute is answered with `delivered: 0` and delivered to nobody
/// again.
#[utoipa::path(
    post,
    path = "/api/channels/{name}/messages",
    tag = "channels",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Channel name: 1 to 64 letters, digits or `_-.`"),),
    request_body = ChannelMessage,
    responses(
        (status = 200, description = "Sent; `delivered` counts the receivers", body = GroupSent),
        (status = 400, description = "`invalid_channel`, `invalid_json` or `bad_request` (e.g. empty body)", body = ErrorBody),
        (status = 401, description = "`unauthorized`, `token_expired` or `session_ended`", body = ErrorBody),
        (status = 403, description = "`not_a_member`: join the channel first", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not `application/json`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn send(
    State(state): State<AppState>,
    user: AuthUser,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<ChannelMessage>,
) -> Result<Json<GroupSent>, AppError> {
    let channel = channel_name(name)?;
    let item = Outgoing::from_user(
        user.user_id,
        user.user_name,
        channel_send(channel, req.body, req.id),
    );
    Ok(Json(route_fan_out(&state, item).await?))
}
