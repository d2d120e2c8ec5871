//! The public HTTP API (JSON): the router and its service stack. Handlers live in one module
//! per concern; every error, including the framework's own, has the shape
//! `{"error":{"code","message"}}` (see [`crate::error`]).

pub mod accounts;
pub mod admin;
pub mod bulk_users;
pub mod channels;
pub mod conversations;
pub mod events;
pub mod groups;
pub mod messages;
pub mod openapi;
pub mod presence;

use crate::{
    error::{error_response, normalize_errors, overloaded, AppError},
    state::AppState,
};
use axum::{
    error_handling::HandleErrorLayer,
    extract::{DefaultBodyLimit, Request, State},
    http::StatusCode,
    middleware::{self, Next},
    response::Response,
    routing::{delete, get, post, put},
    Router,
};
use std::time::Duration;
use tower::{limit::GlobalConcurrencyLimitLayer, ServiceBuilder};
use tower_http::{
    limit::RequestBodyLimitLayer,
    trace::{DefaultOnFailure, TraceLayer},
};

/// The public API router with its whole service stack (testable with `oneshot`).
///
/// Stack, outermost first: tracing; load shedding over a concurrency limit shared by all
/// routes (503 `overloaded`); JSON-ifying of framework errors; the request deadline
/// (503 `timeout`); the body limit (413).
pub fn app(state: AppState) -> Router {
    let config = state.config();
    let max_body = config.max_request_body;
    let deadline = config.request_timeout();
    let limit = config.concurrency_limit;
    Router::new()
        .route("/healthz", get(presence::healthz))
        .route("/api/register", post(accounts::register))
        .route("/api/login", post(accounts::login))
        .route("/api/login/resume", post(accounts::resume))
        .route("/api/logout", post(accounts::logout))
        .route("/api/servers", get(presence::servers))
        .route("/api/users/online", get(presence::online))
        .route("/api/messages/private", post(messages::private))
        .route("/api/messages/group", post(messages::group))
        .route("/api/channels", get(channels::list))
        .route("/api/channels/mine", get(channels::mine))
        .route("/api/channels/{name}", get(channels::info))
        .route("/api/channels/{name}/join", post(channels::join))
        .route("/api/channels/{name}/leave", post(channels::leave))
        .route("/api/channels/{name}/members", get(channels::members))
        .route("/api/channels/{name}/messages", post(channels::send))
        .route("/api/groups", post(groups::create).get(groups::mine))
        .route(
            "/api/groups/{id}",
            get(groups::info)
                .patch(groups::rename)
                .delete(groups::disband),
        )
        .route(
            "/api/groups/{id}/members",
            get(groups::members).post(groups::add),
        )
        .route("/api/groups/{id}/members/{user}", delete(groups::remove))
        .route("/api/groups/{id}/members/{user}/role", put(groups::role))
        .route("/api/groups/{id}/leave", post(groups::leave))
        .route("/api/groups/{id}/messages", post(groups::send))
        .route("/api/conversations", get(conversations::list))
        .route(
            "/api/conversations/{type}/{id}/messages",
            get(conversations::history),
        )
        .route(
            "/api/conversations/{type}/{id}/read",
            post(conversations::read),
        )
        .route("/api/admin/messages", post(admin::messages))
        .route("/api/admin/broadcast", post(admin::broadcast))
        .route("/api/admin/presence", get(admin::presence))
        .route("/api/admin/online", get(admin::online))
        .route("/api/admin/online/count", get(admin::online_count))
        .route("/api/admin/users/{id}/kick", post(admin::kick))
        .route("/api/admin/users/{id}/connect", post(admin::connect))
        .route("/api/admin/users/bulk", post(bulk_users::create))
        .route("/api/admin/users/{id}/channels", get(admin::user_channels))
        .route("/api/admin/channels/{name}/join", post(admin::channel_join))
        .route(
            "/api/admin/channels/{name}/leave",
            post(admin::channel_leave),
        )
        .route(
            "/api/admin/channels/{name}/messages",
            post(admin::channel_message),
        )
        .route("/api/admin/groups", post(groups::admin_create))
        .route(
            "/api/admin/groups/{id}",
            get(groups::admin_info)
                .patch(groups::admin_rename)
                .delete(groups::admin_disband),
        )
        .route(
            "/api/admin/groups/{id}/members",
            get(groups::admin_members).post(groups::admin_add),
        )
        .route(
            "/api/admin/groups/{id}/members/{user}",
            delete(groups::admin_remove),
        )
        .route(
            "/api/admin/groups/{id}/members/{user}/role",
            put(groups::admin_role),
        )
        .route("/api/admin/groups/{id}/messages", post(groups::admin_send))
        .route(
            "/api/admin/users/{id}/groups",
            get(groups::admin_user_groups),
        )
        .route(
            "/api/admin/users/{id}/conversations",
            get(conversations::admin_list),
        )
        .route(
            "/api/admin/users/{id}/conversations/{type}/{cid}/messages",
            get(conversations::admin_history),
        )
        .route("/api/admin/events", get(events::stream_events))
        .route("/api/admin/events/recent", get(events::recent))
        .route("/api/openapi.json", get(openapi::serve))
        .merge(crate::web::routes())
        .fallback(not_found)
        .with_state(state)
        // tower-http's limit (below) is the one in force, whatever axum's default is.
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(max_body))
        .layer(middleware::from_fn_with_state(deadline, request_deadline))
        .layer(middleware::map_response(normalize_errors))
        // Router::layer wraps each route separately: the *global* limit shares one semaphore
        // across them, so `concurrency_limit` bounds the whole API.
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(overloaded))
                .load_shed()
                .layer(GlobalConcurrencyLimitLayer::new(limit)),
        )
        // 5xx causes are logged where they are known (AppError, the shedder, the deadline);
        // the trace layer would only repeat them without the cause, at ERROR.
        .layer(
            TraceLayer::new_for_http()
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
}

async fn not_found() -> AppError {
    AppError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// Every public request has a deadline. Work that must not be cut in half (message
/// delivery) runs in its own task and finishes anyway; see `routing::route_detached`.
async fn request_deadline(State(deadline): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(deadline, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => {
            tracing::warn!(deadline_ms = deadline.as_millis(), "request timed out");
            error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &crate::error::ErrorCode::Timeout,
                &format!("the request took longer than {} ms", deadline.as_millis()),
            )
        }
    }
}

#[cfg(test)]
mod groups_tests;
#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;
