//! Bulk creation of connect-only accounts through the business API (API key), for load
//! generators (`cim-bench`) and backends that do their own authentication:
//!
//! - `POST /api/admin/users/bulk` `{"names":[..]}` (1 to [`MAX_BULK_USERS`]) →
//!   `{"users":[{"name","user_id","created"}]}`, one entry per name, in order.
//!
//! The accounts get [`CONNECT_ONLY_HASH`] as password hash: no password matches it, so they
//! log in only through `POST /api/admin/users/{id}/connect`. That is what makes creating
//! thousands cheap (no argon2 hash per account, which is the whole cost of a registration)
//! without creating accounts anybody could guess their way into. A name that exists already
//! (a rerun of the bench, or a real account) is answered with its id and `created: false`,
//! so reruns are idempotent; its password is left as it is.

use crate::{
    api::openapi::ErrorBody,
    auth::ApiKey,
    error::{ApiJson, AppError},
    password::CONNECT_ONLY_HASH,
    state::AppState,
};
use axum::{extract::State, http::StatusCode, Json};
use futures_util::{stream, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::accounts::validate_name;

/// Most names in one bulk request: one request stays well within the request deadline (a
/// store call or two per name) and its body within `max_request_body` (1000 names of 64
/// characters are about 70 KB: the default limit of 64 KiB fits 1000 names of up to 60).
pub const MAX_BULK_USERS: usize = 1000;

/// Store calls in flight for one bulk request (each is one round trip; more would only
/// queue in the store).
const STORE_CONCURRENCY: usize = 32;

#[derive(Deserialize, ToSchema)]
pub struct BulkUsers {
    /// Names of the accounts, 1 to 1000 (each as `/api/register` accepts it).
    #[serde(default)]
    #[schema(required = true)]
    pub names: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct BulkUser {
    pub name: String,
    pub user_id: u64,
    /// False when the name existed already (its account is left as it is).
    pub created: bool,
}

#[derive(Serialize, ToSchema)]
pub struct BulkCreated {
    /// One entry per requested name, in the order of `names`.
    pub users: Vec<BulkUser>,
}

/// Create connect-only accounts.
///
/// Creates up to 1000 accounts without passwords: they log in only through
/// `POST /api/admin/users/{id}/connect` (no password hash is computed, so this is cheap).
/// Names that exist are answered with their id and `created: false`.
#[utoipa::path(
    post,
    path = "/api/admin/users/bulk",
    tag = "admin",
    security(("api_key" = [])),
    request_body = BulkUsers,
    responses(
        (status = 200, description = "One entry per name, in order", body = BulkCreated),
        (status = 400, description = "`invalid_name` (the message says which), `bad_request` (no names, or more than 1000) or `invalid_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not `application/json`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later (creating is idempotent)", body = ErrorBody),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    _key: ApiKey,
    ApiJson(req): ApiJson<BulkUsers>,
) -> Result<Json<BulkCreated>, AppError> {
    if req.names.is_empty() || req.names.len() > MAX_BULK_USERS {
        return Err(AppError::bad_request(format!(
            "`names` must list 1 to {MAX_BULK_USERS} names"
        )));
    }
    let max_len = state.config().max_name_len;
    // Every name is checked before any account is created: a bad request creates nothing.
    for (i, name) in req.names.iter().enumerate() {
        validate_name(name, max_len).map_err(|m| {
            AppError::new(
                StatusCode::BAD_REQUEST,
                "invalid_name",
                format!("names[{i}]: {m}"),
            )
        })?;
    }
    let state = &state;
    let users = stream::iter(req.names.into_iter().map(|name| async move {
        let (user_id, created) = account(state, &name).await?;
        Ok::<_, AppError>(BulkUser {
            name,
            user_id,
            created,
        })
    }))
    .buffered(STORE_CONCURRENCY)
    .try_collect::<Vec<_>>()
    .await?;
    let created = users.iter().filter(|u| u.created).count();
    tracing::info!(
        created,
        existing = users.len() - created,
        "connect-only accounts created through the business API"
    );
    Ok(Json(BulkCreated { users }))
}

/// The id of account `name` and whether it was created now.
async fn account(state: &AppState, name: &str) -> Result<(u64, bool), AppError> {
    let store = state.store();
    if let Some(user) = store.user_by_name(name).await? {
        return Ok((user.id, false));
    }
    if let Some(id) = store.create_user(name, CONNECT_ONLY_HASH).await? {
        return Ok((id, true));
    }
    // Created by a concurrent request (or twice in this one) between the two calls.
    let user = store.user_by_name(name).await?.ok_or_else(|| {
        AppError::unavailable(format!("account {name:?} was taken and is gone again"))
    })?;
    Ok((user.id, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{auth::API_KEY_HEADER, testing::state_with};
    use axum::{
        body::Body,
        http::{header, Request},
        Router,
    };
    use cim_common::{
        store::{prelude::*, MemoryStore},
        time::now_ms,
    };
    use serde_json::{json, Value};
    use std::sync::Arc;
    use tower::ServiceExt;

    const KEY: &str = "bulk-test-api-key";

    fn admin_post(path: &str, key: &str, body: Value) -> Request<Body> {
        Request::post(path)
            .header(header::CONTENT_TYPE, "application/json")
            .header(API_KEY_HEADER, key)
            .body(Body::from(body.to_string()))
            .unwrap()
    }

    async fn call(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    /// Asserts a 4xx with the API's error shape and returns its code.
    fn error_code(status: StatusCode, v: &Value) -> &str {
        assert!(status.is_client_error(), "{status} {v}");
        assert!(v["error"]["message"].is_string(), "{v}");
        v["error"]["code"].as_str().unwrap()
    }

    fn names(v: &Value) -> Vec<(&str, bool)> {
        v["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| (u["name"].as_str().unwrap(), u["created"].as_bool().unwrap()))
            .collect()
    }

    #[tokio::test]
    async fn creates_connect_only_accounts_idempotently() {
        let store = Arc::new(MemoryStore::new());
        let servers = vec![crate::testing::server("s1"), crate::testing::server("s2")];
        let (state, _tx) = state_with(store.clone(), servers, |c| c.api_keys = vec![KEY.into()]);
        let app = crate::api::app(state.clone());
        let bulk =
            |names: Value| admin_post("/api/admin/users/bulk", KEY, json!({ "names": names }));

        let (s, v) = call(&app, bulk(json!(["b-0", "b-1", "b-0"]))).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        // A name given twice is created once and answered as existing the second time.
        assert_eq!(names(&v), [("b-0", true), ("b-1", true), ("b-0", false)]);
        let id0 = v["users"][0]["user_id"].as_u64().unwrap();
        assert_eq!(v["users"][2]["user_id"].as_u64(), Some(id0));
        assert_eq!(store.user_name(id0).await.unwrap().as_deref(), Some("b-0"));

        // A rerun: the same ids, nothing created.
        let (s, again) = call(&app, bulk(json!(["b-1", "b-0", "b-2"]))).await;
        assert_eq!(s, StatusCode::OK, "{again}");
        assert_eq!(
            names(&again),
            [("b-1", false), ("b-0", false), ("b-2", true)]
        );
        assert_eq!(again["users"][1]["user_id"].as_u64(), Some(id0));

        // No password logs in to them: a wrong-password answer, not a corrupt hash.
        for password in ["", "-", CONNECT_ONLY_HASH, "secret-pw"] {
            let login = Request::post("/api/login")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(
                    json!({"name": "b-0", "password": password}).to_string(),
                ))
                .unwrap();
            let (s, v) = call(&app, login).await;
            assert_eq!(error_code(s, &v), "bad_credentials", "{password:?}");
        }

        // The admin connect call logs them in, on the server asked for.
        for server in ["s1", "s2"] {
            let path = format!("/api/admin/users/{id0}/connect");
            let (s, v) = call(&app, admin_post(&path, KEY, json!({ "server_id": server }))).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            assert_eq!(v["server"]["id"], server, "{v}");
            let claims = state
                .signer()
                .verify_connect(v["connect_token"].as_str().unwrap(), now_ms())
                .unwrap();
            assert_eq!((claims.user_id, claims.server_id.as_str()), (id0, server));
        }
        let path = format!("/api/admin/users/{id0}/connect");
        let (s, v) = call(&app, admin_post(&path, KEY, json!({"server_id": "gone"}))).await;
        assert_eq!(error_code(s, &v), "bad_request");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("gone"),
            "{v}"
        );
        // Without a body the route chooses, as before.
        let plain = Request::post(&path)
            .header(API_KEY_HEADER, KEY)
            .body(Body::empty())
            .unwrap();
        let (s, v) = call(&app, plain).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }

    #[tokio::test]
    async fn refuses_bad_requests_with_the_error_shape() {
        let store = Arc::new(MemoryStore::new());
        let (state, _tx) = state_with(store.clone(), vec![], |c| c.api_keys = vec![KEY.into()]);
        let app = crate::api::app(state);
        let path = "/api/admin/users/bulk";

        // Over the bound, and none at all.
        let many: Vec<String> = (0..=MAX_BULK_USERS).map(|i| format!("u{i}")).collect();
        for names in [json!(many), json!([]), json!(null)] {
            let (s, v) = call(&app, admin_post(path, KEY, json!({ "names": names }))).await;
            assert_eq!(error_code(s, &v), "bad_request", "{v}");
        }
        let (s, v) = call(&app, admin_post(path, KEY, json!({}))).await;
        assert_eq!(error_code(s, &v), "bad_request", "{v}");
        // Exactly the bound is fine.
        let bound: Vec<String> = (0..MAX_BULK_USERS).map(|i| format!("u{i}")).collect();
        let (s, v) = call(&app, admin_post(path, KEY, json!({ "names": bound }))).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["users"].as_array().unwrap().len(), MAX_BULK_USERS);

        // Wrong or missing key.
        let (s, v) = call(&app, admin_post(path, "wrong", json!({"names": ["x"]}))).await;
        assert_eq!(
            (s, error_code(s, &v)),
            (StatusCode::UNAUTHORIZED, "unauthorized")
        );
        let no_key = Request::post(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(json!({"names": ["x"]}).to_string()))
            .unwrap();
        let (s, v) = call(&app, no_key).await;
        assert_eq!(
            (s, error_code(s, &v)),
            (StatusCode::UNAUTHORIZED, "unauthorized")
        );

        // Invalid names: the message says which, and nothing of the request is created.
        for bad in ["", "with space", "a;b", &"x".repeat(33)] {
            let names = json!(["fine-1", bad]);
            let (s, v) = call(&app, admin_post(path, KEY, json!({ "names": names }))).await;
            assert_eq!(error_code(s, &v), "invalid_name", "{bad:?}: {v}");
            assert!(
                v["error"]["message"].as_str().unwrap().contains("names[1]"),
                "{v}"
            );
        }
        assert!(store.user_by_name("fine-1").await.unwrap().is_none());
        assert!(store.user_by_name("x").await.unwrap().is_none());
    }
}
