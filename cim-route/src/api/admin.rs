//! The business API (FreeIM's ImHelper role): what a backend does without touching connection
//! servers. Every call needs an API key from the configuration (`X-Api-Key`; with none
//! configured, every call is 401 `api_disabled`).
//!
//! - `POST /api/admin/messages` `{"to":[ids],"body","from"?,"receipt"?,"id"?}` →
//!   `{"results":[{"to","id","status","error"?}]}`: as the system (no `from`: kind SYSTEM,
//!   sender 0) or on behalf of user `from` (kind PRIVATE). Stored before pushed, like any
//!   private message; `status` is `delivered`, `stored` or `failed`.
//! - `POST /api/admin/broadcast` `{"body","from"?}` → `{"id","delivered","timestamp_ms"}`:
//!   everyone online (never stored).
//! - `GET /api/admin/presence?user_ids=1,2` → `{"users":[{"user_id","online","server_id"}]}`
//! - `GET /api/admin/online?prefix=&after=&limit=` → the online list of `GET /api/users/online`
//! - `GET /api/admin/online/count` → `{"online":n,"servers":[{"id","online"}]}`: asked of every
//!   live server (its logged-in connections), so a crashed server's users never count.
//! - `POST /api/admin/users/{id}/kick` `{"reason"?}` → `{"kicked":bool}`: the client gets
//!   `Kick{KICK_REASON_ADMIN}` and does not reconnect by itself.
//! - `POST /api/admin/users/{id}/connect` `{"server_id"?}` → the body of `/api/login`: a
//!   backend that did its own authentication hands the connect token (single-use) and session
//!   token to its app. `server_id` (optional, must be a live server, else 400) assigns that
//!   server instead of the round robin's: a load generator places senders and receivers.
//! - `POST /api/admin/users/bulk`: see [`super::bulk_users`].
//! - `POST /api/admin/channels/{name}/join|leave` `{"user_id"}`,
//!   `GET /api/admin/users/{id}/channels`,
//!   `POST /api/admin/channels/{name}/messages` `{"body","from"?}`
//! - events: see [`super::events`].

use crate::{
    api::{
        accounts::{open_session, LoggedIn, KICK_PATH, PRESENCE_PATH},
        channels::{
            channel_name, channel_send, channels_of, join_user, leave_user, ChannelList, Joined,
            Left,
        },
        messages::{route_fan_out, send_error, GroupSent},
        openapi::ErrorBody,
        presence::{online_page, OnlinePage, OnlineQuery},
    },
    auth::ApiKey,
    error::{ApiJson, ApiQuery, AppError, ErrorCode},
    routing::{self, Outgoing},
    state::{is_live, live_server, AppState},
};
use axum::{
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
    Json,
};
use cim_common::pb::{
    cluster::{KickRequest, KickResponse, PresenceRequest, PresenceResponse},
    Kick, KickReason, MessageKind, Send, SendStatus,
};
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Longest kick reason, in bytes (it travels in a Kick frame).
const MAX_REASON_LEN: usize = 256;

#[derive(Deserialize, ToSchema)]
pub struct AdminMessage {
    /// Receivers: 1 to the route's `max_receivers` user ids.
    #[serde(default)]
    #[schema(required = true)]
    pub to: Vec<u64>,
    /// Missing counts as empty, answered 400 like an empty one.
    #[serde(default)]
    #[schema(required = true)]
    pub body: String,
    /// On behalf of this user; absent or 0: from the system.
    #[serde(default)]
    pub from: Option<u64>,
    /// Send `from` a RECEIPT message when a receiver acked it (needs `from`).
    #[serde(default)]
    pub receipt: bool,
    /// Message id chosen by the caller (1-64 of `[0-9A-Za-z_-]`): a retry is stored once.
    #[serde(default)]
    pub id: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorView {
    #[schema(value_type = String)]
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Serialize, ToSchema)]
pub struct AdminResult {
    pub to: u64,
    /// Set unless the send failed.
    #[serde(skip_serializing_if = "String::is_empty")]
    #[schema(required = false)]
    pub id: String,
    /// `delivered`, `stored` or `failed`.
    #[schema(example = "delivered")]
    pub status: &'static str,
    /// Why the send failed (only when `status` is `failed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub error: Option<ErrorView>,
}

#[derive(Serialize, ToSchema)]
pub struct AdminResults {
    pub results: Vec<AdminResult>,
}

#[derive(Deserialize, ToSchema)]
pub struct Broadcast {
    /// Missing counts as empty, answered 400 like an empty one.
    #[serde(default)]
    #[schema(required = true)]
    pub body: String,
    /// On behalf of this user; absent or 0: from the system.
    #[serde(default)]
    pub from: Option<u64>,
    /// Message id chosen by the caller (1-64 of `[0-9A-Za-z_-]`): a retry with it within a
    /// minute is answered (`delivered: 0`, the first `timestamp_ms`) and reaches nobody twice.
    #[serde(default)]
    pub id: Option<String>,
}

#[derive(Deserialize, ToSchema)]
pub struct UserRef {
    pub user_id: u64,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PresenceQuery {
    /// Comma-separated user ids (1 to the route's `max_receivers`).
    #[serde(default)]
    #[param(required = true, example = "1,2")]
    pub user_ids: String,
}

#[derive(Serialize, ToSchema)]
pub struct UserPresence {
    pub user_id: u64,
    pub online: bool,
    /// The live server the user is connected to; null when offline.
    #[schema(required = true)]
    pub server_id: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct PresenceList {
    pub users: Vec<UserPresence>,
}

#[derive(Serialize, ToSchema)]
pub struct ServerCount {
    pub id: String,
    pub online: u64,
}

#[derive(Serialize, ToSchema)]
pub struct OnlineCount {
    /// Logged-in connections on all live servers.
    pub online: u64,
    pub servers: Vec<ServerCount>,
}

#[derive(Deserialize, Default, ToSchema)]
pub struct KickBody {
    /// Shown to the user (at most 256 bytes); default "disconnected by the service".
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Deserialize, Default, ToSchema)]
pub struct ConnectBody {
    /// Assign this live connection server (400 `bad_request` if it is not live) instead of
    /// the route's own choice.
    #[serde(default)]
    pub server_id: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Kicked {
    pub kicked: bool,
}

/// The sender of a business-API message: `(0, "")` for the system, else the named user, who
/// must exist.
async fn sender(state: &AppState, from: Option<u64>) -> Result<(u64, String), AppError> {
    match from.filter(|&id| id != 0) {
        None => Ok((0, String::new())),
        Some(id) => Ok((id, existing_user(state, id).await?)),
    }
}

/// The name of user `id`, or 404 `unknown_user`.
async fn existing_user(state: &AppState, id: u64) -> Result<String, AppError> {
    state.store().user_name(id).await?.ok_or_else(|| {
        AppError::new(
            StatusCode::NOT_FOUND,
            "unknown_user",
            format!("no user with id {id}"),
        )
    })
}

/// A connection server that did not answer an internal call.
fn server_unavailable(id: &str, cause: impl std::fmt::Display) -> AppError {
    AppError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        format!("server {id} did not answer, retry later"),
    )
    .with_cause(cause)
}

fn backend_item(sender_id: u64, sender_name: String, send: Send) -> Outgoing {
    Outgoing {
        sender_id,
        sender_name,
        send,
        backend: true,
    }
}

/// Send messages as the system or on behalf of a user.
///
/// One message to each of `to`: as the system (no `from`: kind SYSTEM, sender 0) or on behalf
/// of user `from` (kind PRIVATE). Stored before pushed, like any private message; each result
/// is `delivered`, `stored` or `failed` (with its error).
#[utoipa::path(
    post,
    path = "/api/admin/messages",
    tag = "admin",
    security(("api_key" = [])),
    request_body = AdminMessage,
    responses(
        (status = 200, description = "One result per receiver, in the order of `to`", body = AdminResults),
        (status = 400, description = "`bad_request` (bad `to`, `receipt` without `from`, ...) or `invalid_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 404, description = "`unknown_user`: no user `from`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not `application/json`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn messages(
    State(state): State<AppState>,
    _key: ApiKey,
    ApiJson(req): ApiJson<AdminMessage>,
) -> Result<Json<AdminResults>, AppError> {
    let max = state.config().max_receivers;
    if req.to.is_empty() || req.to.len() > max {
        return Err(AppError::bad_request(format!(
            "`to` must list 1 to {max} user ids"
        )));
    }
    if req.to.contains(&0) {
        return Err(AppError::bad_request("`to` must not contain 0"));
    }
    let (sender_id, sender_name) = sender(&state, req.from).await?;
    if req.receipt && sender_id == 0 {
        return Err(AppError::bad_request(
            "`receipt` needs `from`: receipts go to the user who sent the message",
        ));
    }
    let kind = if sender_id == 0 {
        MessageKind::System
    } else {
        MessageKind::Private
    };
    let items: Vec<Outgoing> = req
        .to
        .iter()
        .map(|&to| {
            let send = Send {
                kind: kind as i32,
                to_user_id: to,
                body: req.body.clone(),
                receipt: req.receipt,
                message_id: req.id.clone().unwrap_or_default(),
                ..Default::default()
            };
            backend_item(sender_id, sender_name.clone(), send)
        })
        .collect();
    let results = routing::route_detached(&state, items).await;
    let results = req
        .to
        .iter()
        .zip(results)
        .map(|(&to, r)| {
            let status = match SendStatus::try_from(r.status) {
                Ok(SendStatus::Delivered) => "delivered",
                Ok(SendStatus::Stored) => "stored",
                _ => "failed",
            };
            let error = (status == "failed").then(|| {
                let e = send_error(&r);
                ErrorView {
                    code: e.code,
                    message: e.message,
                }
            });
            AdminResult {
                to,
                id: r.message_id,
                status,
                error,
            }
        })
        .collect();
    Ok(Json(AdminResults { results }))
}

/// Broadcast to everyone online.
///
/// As the system (no `from`) or on behalf of user `from`; never stored.
#[utoipa::path(
    post,
    path = "/api/admin/broadcast",
    tag = "admin",
    security(("api_key" = [])),
    request_body = Broadcast,
    responses(
        (status = 200, description = "Sent; `delivered` counts the receivers", body = GroupSent),
        (status = 400, description = "`bad_request` (e.g. empty body) or `invalid_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 404, description = "`unknown_user`: no user `from`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not `application/json`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn broadcast(
    State(state): State<AppState>,
    _key: ApiKey,
    ApiJson(req): ApiJson<Broadcast>,
) -> Result<Json<GroupSent>, AppError> {
    let (sender_id, sender_name) = sender(&state, req.from).await?;
    let kind = if sender_id == 0 {
        MessageKind::System
    } else {
        MessageKind::Group
    };
    let send = Send {
        kind: kind as i32,
        body: req.body,
        message_id: req.id.unwrap_or_default(),
        ..Default::default()
    };
    let item = backend_item(sender_id, sender_name, send);
    Ok(Json(route_fan_out(&state, item).await?))
}

/// Parses `1,2,3` (1 to `max` ids).
fn parse_ids(raw: &str, max: usize) -> Result<Vec<u64>, AppError> {
    let bad = || {
        AppError::bad_request(format!(
            "user_ids must be 1 to {max} comma-separated user ids"
        ))
    };
    let ids = raw
        .split(',')
        .map(|s| s.trim().parse::<u64>().map_err(|_| bad()))
        .collect::<Result<Vec<u64>, _>>()?;
    if ids.is_empty() || ids.len() > max {
        return Err(bad());
    }
    Ok(ids)
}

/// Whether users are online.
///
/// For each user id: online or not, and the live server it is connected to.
#[utoipa::path(
    get,
    path = "/api/admin/presence",
    tag = "admin",
    security(("api_key" = [])),
    params(PresenceQuery),
    responses(
        (status = 200, description = "One entry per requested id", body = PresenceList),
        (status = 400, description = "`bad_request`: bad `user_ids`", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn presence(
    State(state): State<AppState>,
    _key: ApiKey,
    ApiQuery(q): ApiQuery<PresenceQuery>,
) -> Result<Json<PresenceList>, AppError> {
    let ids = parse_ids(&q.user_ids, state.config().max_receivers)?;
    let routes = state.store().routes(&ids).await?;
    let servers = state.servers();
    let users = ids
        .into_iter()
        .zip(routes)
        .map(|(user_id, route)| {
            let server_id = route.map(|r| r.server_id).filter(|s| is_live(&servers, s));
            UserPresence {
                user_id,
                online: server_id.is_some(),
                server_id,
            }
        })
        .collect();
    Ok(Json(PresenceList { users }))
}

/// List online users.
///
/// The online list of `GET /api/users/online`, for backends.
#[utoipa::path(
    get,
    path = "/api/admin/online",
    operation_id = "admin_online",
    tag = "admin",
    security(("api_key" = [])),
    params(OnlineQuery),
    responses(
        (status = 200, description = "A page of online users", body = OnlinePage),
        (status = 400, description = "`bad_request`: bad `limit`, `prefix` or cursor", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn online(
    State(state): State<AppState>,
    _key: ApiKey,
    ApiQuery(q): ApiQuery<OnlineQuery>,
) -> Result<Json<OnlinePage>, AppError> {
    Ok(Json(online_page(&state, q).await?))
}

/// Count the online users.
///
/// Asked of every live server (its logged-in connections), so a crashed server's users never
/// count; 503 when a live server does not answer.
#[utoipa::path(
    get,
    path = "/api/admin/online/count",
    tag = "admin",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The total and each server's count", body = OnlineCount),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 503, description = "`unavailable` (a backend or a connection server did not answer), `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn online_count(
    State(state): State<AppState>,
    _key: ApiKey,
) -> Result<Json<OnlineCount>, AppError> {
    let servers = state.servers();
    let asks = servers.iter().map(|server| {
        let state = state.clone();
        async move {
            let resp = state
                .cluster()
                .call::<_, PresenceResponse>(
                    &server.internal_addr,
                    PRESENCE_PATH,
                    &PresenceRequest::default(),
                )
                .await;
            (server.id.clone(), resp)
        }
    });
    let mut counts = Vec::with_capacity(servers.len());
    for (id, resp) in join_all(asks).await {
        match resp {
            Ok(r) => counts.push(ServerCount {
                id,
                online: r.online,
            }),
            // A live server that does not answer cannot be counted: say so rather than
            // answer a number that is silently short.
            Err(e) => return Err(server_unavailable(&id, e)),
        }
    }
    Ok(Json(OnlineCount {
        online: counts.iter().map(|c| c.online).sum(),
        servers: counts,
    }))
}

/// Force a user offline.
///
/// The client gets `Kick{KICK_REASON_ADMIN}` and does not reconnect by itself. The body is
/// optional.
#[utoipa::path(
    post,
    path = "/api/admin/users/{id}/kick",
    tag = "admin",
    security(("api_key" = [])),
    params(("id" = u64, Path, description = "User id"),),
    // Optional (an empty body is fine): `ApiDoc`'s modifier marks it so.
    request_body(content = KickBody, description = "Optional: an empty body kicks with the default reason"),
    responses(
        (status = 200, description = "`kicked` false: the user was not connected", body = Kicked),
        (status = 400, description = "`bad_request`: bad id, invalid JSON or a reason over 256 bytes", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 404, description = "`unknown_user`: no such user", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 503, description = "`unavailable` (a backend or a connection server did not answer), `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn kick(
    State(state): State<AppState>,
    _key: ApiKey,
    Path(user_id): Path<u64>,
    body: Bytes,
) -> Result<Json<Kicked>, AppError> {
    let req: KickBody = optional_body(&body)?;
    let reason = req
        .reason
        .filter(|r| !r.trim().is_empty())
        .unwrap_or_else(|| "disconnected by the service".into());
    if reason.len() > MAX_REASON_LEN {
        return Err(AppError::bad_request(format!(
            "reason must be at most {MAX_REASON_LEN} bytes"
        )));
    }
    existing_user(&state, user_id).await?;
    // Forced offline: the client's session token must not bring it back by resuming.
    state
        .store()
        .next_generation(user_id, state.config().session_token_ttl())
        .await?;
    let routes = state.store().routes(&[user_id]).await?;
    let servers = state.servers();
    let Some(server) = routes
        .into_iter()
        .flatten()
        .next()
        .and_then(|r| live_server(&servers, &r.server_id).cloned())
    else {
        return Ok(Json(Kicked { kicked: false }));
    };
    let req = KickRequest {
        user_ids: vec![user_id],
        kick: Some(Kick {
            reason: KickReason::Admin as i32,
            message: reason,
        }),
        session: String::new(),
    };
    let resp: KickResponse = state
        .cluster()
        .call(&server.internal_addr, KICK_PATH, &req)
        .await
        .map_err(|e| server_unavailable(&server.id, e))?;
    let kicked = resp.kicked.contains(&user_id);
    tracing::info!(user_id, kicked, "forced offline through the business API");
    Ok(Json(Kicked { kicked }))
}

/// A JSON body that may be left out (empty or whitespace: the type's default).
fn optional_body<T: Default + serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, AppError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| AppError::bad_request(format!("invalid JSON body: {e}")))
}

/// Open a login session for a user.
///
/// For a backend that did its own authentication: answers like `/api/login`, so it can hand the
/// (single-use) connect token and the session token to its app. The body is optional;
/// `server_id` assigns that live server instead of the route's choice (a load generator
/// places its senders and receivers).
#[utoipa::path(
    post,
    path = "/api/admin/users/{id}/connect",
    tag = "admin",
    security(("api_key" = [])),
    params(("id" = u64, Path, description = "User id"),),
    request_body = ConnectBody,
    responses(
        (status = 200, description = "Logged in: connect to `server` with `connect_token`", body = LoggedIn),
        (status = 400, description = "`bad_request`: bad id, bad JSON, or `server_id` is not a live server", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 404, description = "`unknown_user`: no such user", body = ErrorBody),
        (status = 409, description = "`already_logged_in`: the user is logged in elsewhere", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 503, description = "`no_server` (no connection server is live), `unavailable`, `overloaded` or `timeout`", body = ErrorBody),
    )
)]
pub async fn connect(
    State(state): State<AppState>,
    _key: ApiKey,
    Path(user_id): Path<u64>,
    body: Bytes,
) -> Result<Json<LoggedIn>, AppError> {
    let req: ConnectBody = optional_body(&body)?;
    let name = existing_user(&state, user_id).await?;
    let result = open_session(&state, user_id, name, req.server_id.as_deref()).await;
    state.metrics().login(&result);
    Ok(Json(result?))
}

/// Add a user to a channel.
///
/// The business API's join, acting for user `user_id` (who must exist).
#[utoipa::path(
    post,
    path = "/api/admin/channels/{name}/join",
    tag = "admin",
    security(("api_key" = [])),
    params(("name" = String, Path, description = "Channel name: 1 to 64 letters, digits or `_-.`"),),
    request_body = UserRef,
    responses(
        (status = 200, description = "Joined (`joined` false: already a member)", body = Joined),
        (status = 400, description = "`invalid_channel`, `invalid_json` or `bad_request`", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 404, description = "`unknown_user`: no such user", body = ErrorBody),
        (status = 409, description = "`too_many_channels`: the user is in as many channels as allowed", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not `application/json`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn channel_join(
    State(state): State<AppState>,
    _key: ApiKey,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<UserRef>,
) -> Result<Json<Joined>, AppError> {
    let channel = channel_name(name)?;
    existing_user(&state, req.user_id).await?;
    Ok(Json(join_user(&state, channel, req.user_id).await?))
}

/// Remove a user from a channel.
///
/// The business API's leave, acting for user `user_id`.
#[utoipa::path(
    post,
    path = "/api/admin/channels/{name}/leave",
    tag = "admin",
    security(("api_key" = [])),
    params(("name" = String, Path, description = "Channel name: 1 to 64 letters, digits or `_-.`"),),
    request_body = UserRef,
    responses(
        (status = 200, description = "Left (`left` false: was not a member)", body = Left),
        (status = 400, description = "`invalid_channel`, `invalid_json` or `bad_request`", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not `application/json`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn channel_leave(
    State(state): State<AppState>,
    _key: ApiKey,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<UserRef>,
) -> Result<Json<Left>, AppError> {
    let channel = channel_name(name)?;
    Ok(Json(leave_user(&state, channel, req.user_id).await?))
}

/// List a user's channels.
///
/// Every channel user `id` is a member of, with its member and online counts.
#[utoipa::path(
    get,
    path = "/api/admin/users/{id}/channels",
    tag = "admin",
    security(("api_key" = [])),
    params(("id" = u64, Path, description = "User id"),),
    responses(
        (status = 200, description = "The user's channels", body = ChannelList),
        (status = 400, description = "`bad_request`: bad id", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 404, description = "`unknown_user`: no such user", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn user_channels(
    State(state): State<AppState>,
    _key: ApiKey,
    Path(user_id): Path<u64>,
) -> Result<Json<ChannelList>, AppError> {
    existing_user(&state, user_id).await?;
    Ok(Json(channels_of(&state, user_id).await?))
}

/// Send a message to a channel.
///
/// As the system (no `from`) or on behalf of user `from`, who need not be a member. Delivered
/// once to the online members but the sender; never stored.
#[utoipa::path(
    post,
    path = "/api/admin/channels/{name}/messages",
    tag = "admin",
    security(("api_key" = [])),
    params(("name" = String, Path, description = "Channel name: 1 to 64 letters, digits or `_-.`"),),
    request_body = Broadcast,
    responses(
        (status = 200, description = "Sent; `delivered` counts the receivers", body = GroupSent),
        (status = 400, description = "`invalid_channel`, `invalid_json` or `bad_request` (e.g. empty body)", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 404, description = "`unknown_user`: no user `from`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not `application/json`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn channel_message(
    State(state): State<AppState>,
    _key: ApiKey,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<Broadcast>,
) -> Result<Json<GroupSent>, AppError> {
    let channel = channel_name(name)?;
    let (sender_id, sender_name) = sender(&state, req.from).await?;
    let item = backend_item(
        sender_id,
        sender_name,
        channel_send(channel, req.body, req.id),
    );
    Ok(Json(route_fan_out(&state, item).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_lists() {
        assert_eq!(parse_ids("1,2, 3", 10).unwrap(), vec![1, 2, 3]);
        assert!(parse_ids("", 10).is_err());
        assert!(parse_ids("1,,2", 10).is_err());
        assert!(parse_ids("a", 10).is_err());
        assert!(parse_ids("-1", 10).is_err());
        assert!(parse_ids("1,2,3", 2).is_err());
    }
}
