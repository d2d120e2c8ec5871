//! Sending messages over HTTP (bearer): the same routing as messages sent over a server
//! connection, with the token's user as the sender.
//!
//! - `POST /api/messages/private` `{"to":u64}` or `{"to_name":"bob"}`, plus `"body"`, and
//!   optionally `"id"` (client-chosen message id: a retry with the same id is stored once) and
//!   `"receipt":true` → 200 `{"id","status":"delivered"|"stored","timestamp_ms"}`. `stored`:
//!   the receiver is offline and gets it from their inbox at their next connection.
//! - `POST /api/messages/group` `{"body"}` → 200 `{"id","delivered":n,"timestamp_ms"}`

use crate::{
    api::openapi::ErrorBody,
    auth::AuthUser,
    error::{ApiJson, AppError},
    routing::{self, Outgoing},
    state::AppState,
};
use axum::{extract::State, http::StatusCode, Json};
use cim_common::pb::{ErrorCode, MessageKind, Send, SendResult, SendStatus};
pub use cim_proto::api::{GroupSent, PrivateSent};
use serde::Deserialize;
use utoipa::ToSchema;

#[derive(Deserialize, ToSchema)]
pub struct PrivateRequest {
    /// Receiver by id ...
    #[serde(default)]
    pub to: Option<u64>,
    /// ... or by name (used when `to` is absent or 0).
    #[serde(default)]
    pub to_name: Option<String>,
    /// Missing counts as empty, answered 400 like an empty one.
    #[serde(default)]
    #[schema(required = true)]
    pub body: String,
    /// Optional message id chosen by the caller (1-64 of `[0-9A-Za-z_-]`), for safe retries.
    #[serde(default)]
    pub id: Option<String>,
    /// Send the sender a RECEIPT message once the receiver acked this one.
    #[serde(default)]
    pub receipt: bool,
}

#[derive(Deserialize, ToSchema)]
pub struct GroupRequest {
    /// Missing counts as empty, answered 400 like an empty one.
    #[serde(default)]
    #[schema(required = true)]
    pub body: String,
    /// Message id chosen by the caller (1-64 of `[0-9A-Za-z_-]`): a retry with it within a
    /// minute is answered (`delivered: 0`, the first `timestamp_ms`) and reaches nobody twice.
    #[serde(default)]
    pub id: Option<String>,
}

/// Routes one message to many (group, broadcast, channel) and answers with its id and reach.
pub(crate) async fn route_fan_out(state: &AppState, item: Outgoing) -> Result<GroupSent, AppError> {
    let result = route_one(state, item).await?;
    Ok(GroupSent {
        id: result.message_id,
        delivered: result.delivered,
        timestamp_ms: result.timestamp_ms,
        repeat: result.repeat,
    })
}

/// Routes one message and returns its result, or the HTTP error of a failed one.
pub(crate) async fn route_one(state: &AppState, item: Outgoing) -> Result<SendResult, AppError> {
    let result = routing::route_detached(state, vec![item])
        .await
        .pop()
        .ok_or_else(|| AppError::internal("routing returned no result"))?;
    if result.status != SendStatus::Failed as i32 {
        return Ok(result);
    }
    Err(send_error(&result))
}

/// The HTTP error of a FAILED send result.
pub(crate) fn send_error(result: &SendResult) -> AppError {
    let (code, message) = result
        .error
        .as_ref()
        .map(|e| (e.code, e.message.clone()))
        .unwrap_or((ErrorCode::Internal as i32, "failed".into()));
    match ErrorCode::try_from(code) {
        Ok(ErrorCode::UnknownUser) => AppError::new(StatusCode::NOT_FOUND, "unknown_user", message),
        Ok(ErrorCode::BadRequest) => AppError::bad_request(message),
        Ok(ErrorCode::Forbidden) => AppError::new(StatusCode::FORBIDDEN, "not_a_member", message),
        Ok(ErrorCode::Unavailable) => {
            AppError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        }
        _ => AppError::internal(message),
    }
}

/// Send a private message.
///
/// Routes the message like one sent over a server connection, with the token's user as the
/// sender. The receiver is named by `to` (id) or `to_name`. `stored`: the receiver is offline
/// and gets it from their inbox at their next connection. A retry with the same `id` is stored
/// once.
#[utoipa::path(
    post,
    path = "/api/messages/private",
    tag = "messages",
    security(("bearer" = [])),
    request_body = PrivateRequest,
    responses(
        (status = 200, description = "Delivered or stored", body = PrivateSent),
        (status = 400, description = "`bad_request` (empty body, bad id, no receiver, ...) or `invalid_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`, `token_expired` or `session_ended`", body = ErrorBody),
        (status = 404, description = "`unknown_user`: no such receiver", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not `application/json`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn private(
    State(state): State<AppState>,
    user: AuthUser,
    ApiJson(req): ApiJson<PrivateRequest>,
) -> Result<Json<PrivateSent>, AppError> {
    let send = Send {
        kind: MessageKind::Private as i32,
        to_user_id: req.to.unwrap_or(0),
        to_user_name: req.to_name.unwrap_or_default(),
        body: req.body,
        message_id: req.id.unwrap_or_default(),
        receipt: req.receipt,
        ..Default::default()
    };
    let item = Outgoing::from_user(user.user_id, user.user_name, send);
    let result = route_one(&state, item).await?;
    let status = if result.status == SendStatus::Delivered as i32 {
        "delivered"
    } else {
        "stored"
    };
    Ok(Json(PrivateSent {
        id: result.message_id,
        status: status.into(),
        timestamp_ms: result.timestamp_ms,
    }))
}

/// Send a group message.
///
/// Delivered to every online user but the sender, once; never stored. A retry with the same
/// `id` within a minute is answered with `delivered: 0` and delivered to nobody again.
#[utoipa::path(
    post,
    path = "/api/messages/group",
    tag = "messages",
    security(("bearer" = [])),
    request_body = GroupRequest,
    responses(
        (status = 200, description = "Sent; `delivered` counts the receivers", body = GroupSent),
        (status = 400, description = "`bad_request` (e.g. empty body) or `invalid_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`, `token_expired` or `session_ended`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not `application/json`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn group(
    State(state): State<AppState>,
    user: AuthUser,
    ApiJson(req): ApiJson<GroupRequest>,
) -> Result<Json<GroupSent>, AppError> {
    let send = Send {
        kind: MessageKind::Group as i32,
        body: req.body,
        message_id: req.id.unwrap_or_default(),
        ..Default::default()
    };
    let item = Outgoing::from_user(user.user_id, user.user_name, send);
    Ok(Json(route_fan_out(&state, item).await?))
}
