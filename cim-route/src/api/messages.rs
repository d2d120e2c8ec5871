//! Sending messages over HTTP (bearer): the same routing as messages sent over a server
//! connection, with the token's user as the sender.
//!
//! - `POST /api/messages/private` `{"to":u64}` or `{"to_name":"bob"}`, plus `"body"`, and
//!   optionally `"id"` (client-chosen message id: a retry with the same id is stored once) and
//!   `"receipt":true` → 200 `{"id","status":"delivered"|"stored","timestamp_ms"}`. `stored`:
//!   the receiver is offline and gets it from their inbox at their next connection.
//! - `POST /api/messages/group` `{"body"}` → 200 `{"id","delivered":n,"timestamp_ms"}`

use crate::{
    auth::AuthUser,
    error::{ApiJson, AppError},
    routing::{self, Outgoing},
    state::AppState,
};
use axum::{extract::State, http::StatusCode, Json};
use cim_common::pb::{ErrorCode, MessageKind, Send, SendResult, SendStatus};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
pub struct PrivateRequest {
    /// Receiver by id ...
    #[serde(default)]
    pub to: Option<u64>,
    /// ... or by name (used when `to` is absent or 0).
    #[serde(default)]
    pub to_name: Option<String>,
    /// Missing counts as empty, answered 400 like an empty one.
    #[serde(default)]
    pub body: String,
    /// Optional message id chosen by the caller (1-64 of `[0-9A-Za-z_-]`), for safe retries.
    #[serde(default)]
    pub id: Option<String>,
    /// Send the sender a RECEIPT message once the receiver acked this one.
    #[serde(default)]
    pub receipt: bool,
}

#[derive(Serialize)]
pub struct PrivateSent {
    pub id: String,
    /// `delivered` or `stored`.
    pub status: &'static str,
    pub timestamp_ms: i64,
}

#[derive(Deserialize)]
pub struct GroupRequest {
    #[serde(default)]
    pub body: String,
}

#[derive(Serialize)]
pub struct GroupSent {
    pub id: String,
    pub delivered: u32,
    pub timestamp_ms: i64,
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
        status,
        timestamp_ms: result.timestamp_ms,
    }))
}

pub async fn group(
    State(state): State<AppState>,
    user: AuthUser,
    ApiJson(req): ApiJson<GroupRequest>,
) -> Result<Json<GroupSent>, AppError> {
    let send = Send {
        kind: MessageKind::Group as i32,
        body: req.body,
        ..Default::default()
    };
    let item = Outgoing::from_user(user.user_id, user.user_name, send);
    let result = route_one(&state, item).await?;
    Ok(Json(GroupSent {
        id: result.message_id,
        delivered: result.delivered,
        timestamp_ms: result.timestamp_ms,
    }))
}
