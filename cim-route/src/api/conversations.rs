//! Stored conversations (private ones and stored groups) as one user sees them: the list with
//! unread counts, history pages and read marks. Bearer for the caller's own; the business API
//! reads any user's (`/api/admin/users/{id}/conversations...`), sharing the functions here.
//!
//! - `GET /api/conversations?before_ms=&limit=` → `{"conversations":[{"type":"user"|"group",
//!   "id","name","last","top","read_seq","unread","peer_read_seq","activity_ms"}]}`, newest
//!   activity first (`before_ms`: the `activity_ms` of the last one seen, for the next page)
//! - `GET /api/conversations/{type}/{id}/messages?before=&after=&limit=` →
//!   `{"messages":[..]}`, oldest first: `before` (exclusive) pages back, `after` (exclusive)
//!   forward, neither: the newest; both: 400
//! - `POST /api/conversations/{type}/{id}/read` `{"seq"}` → `{"read_seq"}`
//!
//! `{type}` is `user` (the private conversation with user `{id}`) or `group`. A message is
//! rendered in the proto3 JSON mapping of `cim.Message`, exactly what a
//! WebSocket text frame carries (64-bit numbers as strings, enums by name, defaults left out).
//! A group the viewer is not a member of is 404, as one that does not exist.

use crate::{
    api::{groups::no_group, openapi::ErrorBody, presence::parse_limit},
    auth::{ApiKey, AuthUser},
    error::{ApiJson, ApiQuery, AppError, ErrorCode},
    state::AppState,
};
use axum::{
    extract::{Path, State},
    http::StatusCode,
    Json,
};
use cim_common::store::{
    chat::{MAX_CONVERSATIONS_PAGE, MAX_HISTORY_READ},
    ConvKey, ConversationSummary, HistoryPage,
};
use cim_proto::api::{ConversationList, ConversationView, MessagePage, ReadMarkAnswer};
use futures_util::{stream, StreamExt};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

/// Peer-name lookups of one conversation page in flight at once.
const NAME_LOOKUPS: usize = 32;

/// The conversation named by a path's `{type}` and `{id}`.
pub fn conv_key(kind: &str, id: &str) -> Result<ConvKey, AppError> {
    let id = id
        .parse::<u64>()
        .ok()
        .filter(|&id| id != 0)
        .ok_or_else(|| AppError::bad_request("a conversation id is a positive integer"))?;
    match kind {
        "user" => Ok(ConvKey::User(id)),
        "group" => Ok(ConvKey::Group(id)),
        _ => Err(AppError::bad_request(
            "a conversation type is `user` or `group`",
        )),
    }
}

fn unknown_user(id: u64) -> AppError {
    AppError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::UnknownUser,
        format!("no user with id {id}"),
    )
}

/// The 404 of a conversation the viewer may not read.
fn not_found(conv: ConvKey) -> AppError {
    match conv {
        ConvKey::Group(id) => no_group(id),
        ConvKey::User(id) => unknown_user(id),
    }
}

#[derive(Deserialize, ToSchema)]
pub struct ReadBody {
    /// Read up to this `log_seq`.
    pub seq: u64,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConversationsQuery {
    /// Only conversations with activity before this unix ms (the last `activity_ms` seen).
    #[serde(default)]
    #[param(value_type = Option<i64>)]
    pub before_ms: Option<String>,
    /// Page size (default 50, at most 200).
    #[serde(default)]
    #[param(value_type = Option<u64>, minimum = 1)]
    pub limit: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// The newest messages with a seq below this one (exclusive).
    #[serde(default)]
    #[param(value_type = Option<u64>)]
    pub before: Option<String>,
    /// The oldest messages with a seq above this one (exclusive); not with `before`.
    #[serde(default)]
    #[param(value_type = Option<u64>)]
    pub after: Option<String>,
    /// Page size (default 50, at most 200).
    #[serde(default)]
    #[param(value_type = Option<u64>, minimum = 1)]
    pub limit: Option<String>,
}

/// A query number, absent when empty.
fn query_number<T: std::str::FromStr>(
    raw: Option<&str>,
    what: &str,
) -> Result<Option<T>, AppError> {
    match raw.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|_| AppError::bad_request(format!("`{what}` must be an integer"))),
    }
}

fn conversation_view(
    c: ConversationSummary,
    peer_name: Option<String>,
) -> Result<ConversationView, AppError> {
    let (kind, id, name) = match c.conv {
        ConvKey::User(peer) => ("user", peer, peer_name.unwrap_or_default()),
        ConvKey::Group(group) => ("group", group, c.name),
    };
    Ok(ConversationView {
        kind: kind.to_string(),
        id,
        name,
        last: c.last,
        top: c.top,
        read_seq: c.read_seq,
        unread: c.unread,
        peer_read_seq: c.peer_read_seq,
        activity_ms: c.activity_ms,
    })
}

/// `user`'s conversation list page (shared with the business API).
pub async fn conversations_of(
    state: &AppState,
    user: u64,
    q: ConversationsQuery,
) -> Result<ConversationList, AppError> {
    let limit = parse_limit(q.limit.as_deref(), MAX_CONVERSATIONS_PAGE)?;
    let before_ms = query_number::<i64>(q.before_ms.as_deref(), "before_ms")?;
    let store = state.store();
    let page = store.conversations(user, before_ms, limit).await?;
    let convs: Vec<ConvKey> = page.iter().map(|c| c.conv).collect();
    let names: Vec<_> = stream::iter(convs)
        .map(|conv| async move {
            match conv {
                ConvKey::User(peer) => store.user_name(peer).await,
                ConvKey::Group(_) => Ok(None),
            }
        })
        .buffered(NAME_LOOKUPS)
        .collect()
        .await;
    let mut conversations = Vec::with_capacity(page.len());
    for (c, name) in page.into_iter().zip(names) {
        conversations.push(conversation_view(c, name?)?);
    }
    Ok(ConversationList { conversations })
}

/// A history page of `conv` as `viewer` sees it (shared with the business API).
pub async fn history_of(
    state: &AppState,
    viewer: u64,
    conv: ConvKey,
    q: HistoryQuery,
) -> Result<MessagePage, AppError> {
    let limit = parse_limit(q.limit.as_deref(), MAX_HISTORY_READ)?;
    let before = query_number::<u64>(q.before.as_deref(), "before")?;
    let after = query_number::<u64>(q.after.as_deref(), "after")?;
    // The store reads `Before(0)` as "the newest": refuse it rather than answer the opposite.
    if before == Some(0) {
        return Err(AppError::bad_request("`before` is a seq: 1 or more"));
    }
    let page = match (before, after) {
        (Some(_), Some(_)) => {
            return Err(AppError::bad_request("give `before` or `after`, not both"))
        }
        (Some(b), None) => HistoryPage::Before(b),
        (None, Some(a)) => HistoryPage::After(a),
        (None, None) => HistoryPage::Before(u64::MAX),
    };
    if let ConvKey::User(peer) = conv {
        if state.store().user_name(peer).await?.is_none() {
            return Err(unknown_user(peer));
        }
    }
    let messages = state
        .store()
        .history(viewer, conv, page, limit)
        .await?
        .ok_or_else(|| not_found(conv))?;
    Ok(MessagePage { messages })
}

/// Moves `user`'s read mark of `conv` to `seq`.
pub async fn mark_read(
    state: &AppState,
    user: u64,
    conv: ConvKey,
    seq: u64,
) -> Result<ReadMarkAnswer, AppError> {
    if let ConvKey::User(peer) = conv {
        if state.store().user_name(peer).await?.is_none() {
            return Err(unknown_user(peer));
        }
    }
    let read_seq = state
        .store()
        .mark_read(user, conv, seq)
        .await?
        .ok_or_else(|| not_found(conv))?;
    // The peer (a group: its members watching the marks) sees "seen" live, as for a mark
    // sent over a connection.
    crate::routing::relay_read_mark(state, user, conv, read_seq).await;
    Ok(ReadMarkAnswer { read_seq })
}

/// List the caller's conversations.
///
/// Private conversations with a message kept and every group the caller is a member of,
/// newest activity first, with unread counts. For the next page pass the last
/// `activity_ms` as `before_ms`.
#[utoipa::path(
    get,
    path = "/api/conversations",
    operation_id = "conversations_list",
    tag = "conversations",
    security(("bearer" = [])),
    params(ConversationsQuery),
    responses(
        (status = 200, description = "A page of conversations", body = ConversationList),
        (status = 400, description = "`bad_request`: bad `limit` or `before_ms`", body = ErrorBody),
        (status = 401, description = "`unauthorized`, `token_expired` or `session_ended`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    user: AuthUser,
    ApiQuery(q): ApiQuery<ConversationsQuery>,
) -> Result<Json<ConversationList>, AppError> {
    Ok(Json(conversations_of(&state, user.user_id, q).await?))
}

/// Read a conversation's history.
///
/// Oldest first. `before` (exclusive) pages back from a seq, `after` (exclusive) reads
/// forward from one (sync); neither: the newest messages; both: 400. A group member reads
/// from their joining on.
#[utoipa::path(
    get,
    path = "/api/conversations/{type}/{id}/messages",
    operation_id = "conversations_history",
    tag = "conversations",
    security(("bearer" = [])),
    params(
        ("type" = String, Path, description = "`user` or `group`"),
        ("id" = u64, Path, description = "The peer's user id, or the group id"),
        HistoryQuery,
    ),
    responses(
        (status = 200, description = "A page of messages", body = MessagePage),
        (status = 400, description = "`bad_request`: bad type, id, `limit`, `before` or `after`, or both of these", body = ErrorBody),
        (status = 401, description = "`unauthorized`, `token_expired` or `session_ended`", body = ErrorBody),
        (status = 404, description = "`unknown_group` (no such group, or not a member) or `unknown_user`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn history(
    State(state): State<AppState>,
    user: AuthUser,
    Path((kind, id)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> Result<Json<MessagePage>, AppError> {
    let conv = conv_key(&kind, &id)?;
    Ok(Json(history_of(&state, user.user_id, conv, q).await?))
}

/// Mark a conversation read.
///
/// Moves the caller's read mark to `seq` (clamped to the newest message; marks never move
/// back) and answers the mark now.
#[utoipa::path(
    post,
    path = "/api/conversations/{type}/{id}/read",
    operation_id = "conversations_read",
    tag = "conversations",
    security(("bearer" = [])),
    params(
        ("type" = String, Path, description = "`user` or `group`"),
        ("id" = u64, Path, description = "The peer's user id, or the group id"),
    ),
    request_body = ReadBody,
    responses(
        (status = 200, description = "The mark now", body = ReadMarkAnswer),
        (status = 400, description = "`bad_request` (bad type, id or seq) or `invalid_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`, `token_expired` or `session_ended`", body = ErrorBody),
        (status = 404, description = "`unknown_group` (no such group, or not a member) or `unknown_user`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn read(
    State(state): State<AppState>,
    user: AuthUser,
    Path((kind, id)): Path<(String, String)>,
    ApiJson(req): ApiJson<ReadBody>,
) -> Result<Json<ReadMarkAnswer>, AppError> {
    let conv = conv_key(&kind, &id)?;
    Ok(Json(mark_read(&state, user.user_id, conv, req.seq).await?))
}

/// List a user's conversations.
///
/// The business API's view of user `id`'s conversation list (as `GET /api/conversations`).
#[utoipa::path(
    get,
    path = "/api/admin/users/{id}/conversations",
    operation_id = "admin_conversations_list",
    tag = "admin",
    security(("api_key" = [])),
    params(("id" = u64, Path, description = "User id"), ConversationsQuery),
    responses(
        (status = 200, description = "A page of conversations", body = ConversationList),
        (status = 400, description = "`bad_request`: bad id, `limit` or `before_ms`", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 404, description = "`unknown_user`: no such user", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn admin_list(
    State(state): State<AppState>,
    _key: ApiKey,
    Path(user): Path<u64>,
    ApiQuery(q): ApiQuery<ConversationsQuery>,
) -> Result<Json<ConversationList>, AppError> {
    if state.store().user_name(user).await?.is_none() {
        return Err(unknown_user(user));
    }
    Ok(Json(conversations_of(&state, user, q).await?))
}

/// Read a user's conversation history.
///
/// The business API's view of a history page as user `id` sees it (as
/// `GET /api/conversations/{type}/{id}/messages`).
#[utoipa::path(
    get,
    path = "/api/admin/users/{id}/conversations/{type}/{cid}/messages",
    operation_id = "admin_conversations_history",
    tag = "admin",
    security(("api_key" = [])),
    params(
        ("id" = u64, Path, description = "User id of the viewer"),
        ("type" = String, Path, description = "`user` or `group`"),
        ("cid" = u64, Path, description = "The peer's user id, or the group id"),
        HistoryQuery,
    ),
    responses(
        (status = 200, description = "A page of messages", body = MessagePage),
        (status = 400, description = "`bad_request`: bad type, id, `limit`, `before` or `after`, or both of these", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 404, description = "`unknown_group` (no such group, or the user is not a member) or `unknown_user`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn admin_history(
    State(state): State<AppState>,
    _key: ApiKey,
    Path((user, kind, id)): Path<(u64, String, String)>,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> Result<Json<MessagePage>, AppError> {
    let conv = conv_key(&kind, &id)?;
    if state.store().user_name(user).await?.is_none() {
        return Err(unknown_user(user));
    }
    Ok(Json(history_of(&state, user, conv, q).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversation_paths() {
        assert_eq!(conv_key("user", "7").unwrap(), ConvKey::User(7));
        assert_eq!(conv_key("group", "9").unwrap(), ConvKey::Group(9));
        for (kind, id) in [
            ("channel", "1"),
            ("user", "0"),
            ("group", "x"),
            ("group", "-1"),
        ] {
            let e = conv_key(kind, id).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{kind}/{id}");
        }
    }

    #[test]
    fn messages_use_the_proto3_json_mapping() {
        let m = cim_common::pb::Message {
            id: "m1".into(),
            sender_id: 3,
            kind: cim_common::pb::MessageKind::GroupChat as i32,
            group_id: 9,
            log_seq: 4,
            body: "hi".into(),
            ..Default::default()
        };
        // As the answers serialize it (pbjson, like WebSocket text frames).
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["kind"], "MESSAGE_KIND_GROUP_CHAT");
        // 64-bit numbers as strings, as in WebSocket text frames.
        assert_eq!(v["logSeq"], "4");
        assert_eq!(v["groupId"], "9");
        assert_eq!(v["body"], "hi");
    }
}
