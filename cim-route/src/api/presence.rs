//! Who and what is online: the online-users list (bearer, paginated), the live connection
//! servers, and the health check.
//!
//! - `GET /api/users/online?prefix=&after=&limit=` (bearer) →
//!   `{"users":[{"user_id","name","server_id"}],"next":cursor|null}`
//! - `GET /api/servers` → `{"servers":[{"id","tcp_addr","ws_addr","tls_addr"?,"wss_addr"?}]}`
//! - `GET /healthz` → `{"status":"ok","id","servers":n,"pid","rss_bytes","cpu_ms"}` (the last
//!   three: this process, for `cim-bench`'s CPU per message; `null` where `/proc` cannot tell)

use crate::{
    api::{accounts::server_addrs, openapi::ErrorBody},
    auth::AuthUser,
    error::{ApiQuery, AppError},
    state::{is_live, AppState},
};
use axum::{extract::State, Json};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use cim_common::{keys, store::RouteEntry};
pub use cim_proto::api::{OnlinePage, OnlineUser, ServerList};
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Page size when the client names none.
pub const DEFAULT_PAGE: usize = 50;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct OnlineQuery {
    /// Only users whose name starts with this.
    #[serde(default)]
    pub prefix: Option<String>,
    /// The `next` cursor of the previous page.
    #[serde(default)]
    pub after: Option<String>,
    /// Page size (default 50, capped by the route's `online_page_max`).
    // Parsed by hand for a clear message on `limit=abc`.
    #[serde(default)]
    #[param(value_type = Option<u64>, minimum = 1)]
    pub limit: Option<String>,
}

/// The page size: default [`DEFAULT_PAGE`], clamped to `max`; 0 or not a number is an error.
pub fn parse_limit(limit: Option<&str>, max: usize) -> Result<usize, AppError> {
    let Some(raw) = limit.filter(|s| !s.is_empty()) else {
        return Ok(DEFAULT_PAGE.min(max));
    };
    match raw.parse::<u64>() {
        // Too many digits for u64 is still "more than the maximum".
        Err(_) if raw.bytes().all(|b| b.is_ascii_digit()) => Ok(max),
        Ok(0) | Err(_) => Err(AppError::bad_request(format!(
            "limit must be a positive integer (at most {max} are returned)"
        ))),
        Ok(n) => Ok(usize::try_from(n).unwrap_or(usize::MAX).min(max)),
    }
}

/// Cursors are the store's opaque index members, base64url-encoded so clients treat them as
/// tokens (they contain a control character).
pub fn encode_cursor(cursor: &str) -> String {
    URL_SAFE_NO_PAD.encode(cursor)
}

pub fn decode_cursor(cursor: &str) -> Result<String, AppError> {
    let bad = || AppError::bad_request("invalid cursor in `after`");
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    keys::parse_online_member(&text).ok_or_else(bad)?;
    Ok(text)
}

/// List online users.
///
/// One page of the online users in name order, with the server each is connected to.
#[utoipa::path(
    get,
    path = "/api/users/online",
    tag = "presence",
    security(("bearer" = [])),
    params(OnlineQuery),
    responses(
        (status = 200, description = "A page of online users", body = OnlinePage),
        (status = 400, description = "`bad_request`: bad `limit`, `prefix` or cursor", body = ErrorBody),
        (status = 401, description = "`unauthorized`, `token_expired` or `session_ended`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn online(
    State(state): State<AppState>,
    _user: AuthUser,
    ApiQuery(q): ApiQuery<OnlineQuery>,
) -> Result<Json<OnlinePage>, AppError> {
    Ok(Json(online_page(&state, q).await?))
}

/// A page of the online users (shared with the business API).
pub async fn online_page(state: &AppState, q: OnlineQuery) -> Result<OnlinePage, AppError> {
    let config = state.config();
    let limit = parse_limit(q.limit.as_deref(), config.online_page_max)?;
    let prefix = q.prefix.unwrap_or_default();
    if prefix.chars().count() > config.max_name_len {
        return Err(AppError::bad_request(format!(
            "prefix must be at most {} characters",
            config.max_name_len
        )));
    }
    // No name has control characters; the index uses one as its separator, so a prefix
    // with one could match on ids rather than names.
    if prefix.chars().any(char::is_control) {
        return Err(AppError::bad_request(
            "prefix must not contain control characters",
        ));
    }
    let after = q
        .after
        .filter(|a| !a.is_empty())
        .map(|a| decode_cursor(&a))
        .transpose()?;

    let entries = state
        .store()
        .online_page(&prefix, after.as_deref(), limit)
        .await?;
    // The cursor continues after the last entry the index returned, even if that one is
    // filtered out below; a full page means there may be more.
    let next = if entries.len() >= limit {
        entries.last().map(|e| encode_cursor(&e.cursor))
    } else {
        None
    };
    let ids: Vec<u64> = entries.iter().map(|e| e.user_id).collect();
    let routes = state.store().routes(&ids).await?;

    let servers = state.servers();
    let mut users = Vec::with_capacity(entries.len());
    let mut stale: Vec<RouteEntry> = Vec::new();
    for (entry, route) in entries.into_iter().zip(routes) {
        // No route: the index entry outlived its connection (it is only listed while routed).
        let Some(route) = route else { continue };
        if !is_live(&servers, &route.server_id) {
            stale.push(route);
            continue;
        }
        users.push(OnlineUser {
            user_id: entry.user_id,
            name: entry.name,
            server_id: route.server_id,
        });
    }
    // Best effort and bounded by the page size.
    let store = state.store();
    join_all(stale.iter().map(|r| async move {
        if let Err(e) = store.remove_stale_route(r).await {
            tracing::debug!(user_id = r.user_id, error = %e, "removing a stale route failed");
        }
    }))
    .await;
    Ok(OnlinePage { users, next })
}

/// List the live connection servers.
///
/// Their public addresses (TCP and WebSocket).
#[utoipa::path(
    get,
    path = "/api/servers",
    tag = "presence",
    responses(
        (status = 200, description = "The live connection servers", body = ServerList),
        (status = 503, description = "`overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn servers(State(state): State<AppState>) -> Json<ServerList> {
    let servers = state.servers();
    Json(ServerList {
        servers: servers.iter().map(server_addrs).collect(),
    })
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    #[schema(example = "ok")]
    pub status: &'static str,
    /// This route instance's id.
    pub id: String,
    /// Live connection servers this instance knows.
    pub servers: usize,
    /// This process (for `cim-bench`'s CPU per message).
    pub pid: u32,
    /// Resident memory of this process; null where `/proc` cannot tell.
    #[schema(required = true)]
    pub rss_bytes: Option<u64>,
    /// CPU time of this process; null where `/proc` cannot tell.
    #[schema(required = true)]
    pub cpu_ms: Option<u64>,
}

/// Health check.
///
/// `ok` with this instance's id, the number of live connection servers and this process's
/// pid, resident memory and CPU time (the last two null where `/proc` cannot tell).
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "presence",
    responses(
        (status = 200, description = "Healthy", body = Health),
        (status = 503, description = "`overloaded` or `timeout`", body = ErrorBody),
    )
)]
pub async fn healthz(State(state): State<AppState>) -> Json<Health> {
    let usage = cim_common::procinfo::self_usage();
    Json(Health {
        status: "ok",
        id: state.id().to_string(),
        servers: state.servers().len(),
        pid: std::process::id(),
        rss_bytes: usage.map(|u| u.rss_bytes),
        cpu_ms: usage.map(|u| u.cpu_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        assert_eq!(parse_limit(None, 500).unwrap(), 50);
        assert_eq!(parse_limit(None, 10).unwrap(), 10);
        assert_eq!(parse_limit(Some("7"), 500).unwrap(), 7);
        assert_eq!(parse_limit(Some("100000"), 500).unwrap(), 500);
        assert_eq!(
            parse_limit(Some("99999999999999999999999"), 500).unwrap(),
            500
        );
        assert_eq!(parse_limit(Some("0"), 500).unwrap_err().code, "bad_request");
        assert_eq!(
            parse_limit(Some("-1"), 500).unwrap_err().code,
            "bad_request"
        );
        assert_eq!(
            parse_limit(Some("abc"), 500).unwrap_err().code,
            "bad_request"
        );
    }

    #[test]
    fn cursors_round_trip() {
        let member = keys::online_member("bob", 42);
        let c = encode_cursor(&member);
        assert!(!c.contains('\u{1f}'));
        assert_eq!(decode_cursor(&c).unwrap(), member);
        assert!(decode_cursor("!!!").is_err());
        assert!(decode_cursor(&encode_cursor("no-separator")).is_err());
    }
}
