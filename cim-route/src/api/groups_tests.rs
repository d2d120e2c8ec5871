//! Stored groups and conversations through `app(state).oneshot(..)` on the in-memory store:
//! the user endpoints (bearer), their permissions and bad input, history pages, read marks,
//! and the business API (`/api/admin/groups...`, X-Api-Key).

use super::app;
use crate::testing::{fake_server, state_with, Recorded};
use axum::{
    body::Body,
    http::{header, Method, Request, StatusCode},
    Router,
};
use cim_common::{
    config::DEV_SECRET,
    pb::MessageKind,
    store::{chat::MAX_GROUP_NAME_LEN, MemoryStore},
};
use serde_json::{json, Value};
use std::sync::Arc;
use tower::ServiceExt;

const KEY: &str = "test-api-key-0123456789";

async fn call(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&bytes)));
    (status, value)
}

enum Auth<'a> {
    None,
    Bearer(&'a str),
    Key(&'a str),
}

fn request(method: Method, path: &str, body: Option<Value>, auth: Auth) -> Request<Body> {
    let mut req = Request::builder().method(method).uri(path);
    match auth {
        Auth::None => {}
        Auth::Bearer(t) => req = req.header(header::AUTHORIZATION, format!("Bearer {t}")),
        Auth::Key(k) => req = req.header(crate::auth::API_KEY_HEADER, k),
    }
    match body {
        Some(b) => req
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(b.to_string()))
            .unwrap(),
        None => req.body(Body::empty()).unwrap(),
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {v}"))
}

/// A logged-in user: id and session token.
struct User {
    id: u64,
    token: String,
}

struct Fixture {
    app: Router,
    /// What the one live (fake) connection server was pushed.
    pushed: Arc<Recorded>,
    /// Keeps the registry watch open for the test's life.
    _servers: tokio::sync::watch::Sender<cim_common::registry::Members>,
}

impl Fixture {
    async fn new() -> Self {
        let (server, pushed) = fake_server("server-a", DEV_SECRET).await;
        let (state, tx) = state_with(Arc::new(MemoryStore::new()), vec![server], |c| {
            c.api_keys = vec![KEY.into()];
        });
        Self {
            app: app(state),
            pushed,
            _servers: tx,
        }
    }

    /// `(group_id, kind, body)` of every message pushed so far.
    fn pushes(&self) -> Vec<(u64, i32, String)> {
        self.pushed
            .pushes
            .lock()
            .unwrap()
            .iter()
            .flat_map(|p| p.deliveries.iter())
            .filter_map(|d| {
                let m = d.message.as_ref()?;
                Some((d.group_id, m.kind, m.body.clone()))
            })
            .collect()
    }

    async fn user(&self, name: &str) -> User {
        let creds = json!({"name": name, "password": "secret-pw"});
        let (s, v) = self
            .call(
                Method::POST,
                "/api/register",
                Some(creds.clone()),
                Auth::None,
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let (s, v) = self
            .call(Method::POST, "/api/login", Some(creds), Auth::None)
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        User {
            id: v["user_id"].as_u64().unwrap(),
            token: v["session_token"].as_str().unwrap().to_string(),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        auth: Auth<'_>,
    ) -> (StatusCode, Value) {
        call(&self.app, request(method, path, body, auth)).await
    }

    async fn as_user(
        &self,
        user: &User,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.call(method, path, body, Auth::Bearer(&user.token))
            .await
    }

    async fn as_backend(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.call(method, path, body, Auth::Key(KEY)).await
    }

    /// `owner` creates a group named `name` with `members`; returns its id.
    async fn group(&self, owner: &User, name: &str, members: &[&User]) -> u64 {
        let ids: Vec<u64> = members.iter().map(|u| u.id).collect();
        let (s, v) = self
            .as_user(
                owner,
                Method::POST,
                "/api/groups",
                Some(json!({"name": name, "members": ids})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["group"]["id"].as_u64().unwrap()
    }

    async fn send(&self, user: &User, group: u64, body: &str) -> Value {
        let (s, v) = self
            .as_user(
                user,
                Method::POST,
                &format!("/api/groups/{group}/messages"),
                Some(json!({ "body": body })),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }
}

/// The `logSeq`s of a history answer (the proto3 JSON mapping writes them as strings).
fn seqs(v: &Value) -> Vec<u64> {
    v["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages in {v}"))
        .iter()
        .map(|m| m["logSeq"].as_str().unwrap().parse().unwrap())
        .collect()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn create_list_and_describe() {
    let f = Fixture::new().await;
    let (alice, bob) = (f.user("alice").await, f.user("bob").await);
    let (s, v) = f
        .as_user(
            &alice,
            Method::POST,
            "/api/groups",
            Some(json!({"name": "  team  ", "members": [bob.id, bob.id, alice.id]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let group = v["group"]["id"].as_u64().unwrap();
    assert_eq!(v["group"]["name"], "team", "trimmed");
    assert_eq!(v["group"]["owner"].as_u64(), Some(alice.id));
    assert_eq!(v["group"]["members"].as_u64(), Some(2));
    assert_eq!(
        ids(&v["added"]["added"]),
        vec![bob.id],
        "once, the owner left out"
    );
    // Each change's event went out live, to the group.
    let event = MessageKind::GroupEvent as i32;
    assert_eq!(
        f.pushes(),
        vec![
            (group, event, "alice created the group team".to_string()),
            (group, event, "alice added bob".to_string()),
        ]
    );

    for user in [&alice, &bob] {
        let (s, v) = f.as_user(user, Method::GET, "/api/groups", None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["groups"].as_array().unwrap().len(), 1, "{v}");
        assert_eq!(v["groups"][0]["id"].as_u64(), Some(group));

        let (s, v) = f
            .as_user(user, Method::GET, &format!("/api/groups/{group}"), None)
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["group"]["name"], "team");
    }

    let (s, v) = f
        .as_user(
            &bob,
            Method::GET,
            &format!("/api/groups/{group}/members"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let members: Vec<(u64, &str, &str)> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["user_id"].as_u64().unwrap(),
                m["name"].as_str().unwrap(),
                m["role"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        members,
        vec![(alice.id, "alice", "owner"), (bob.id, "bob", "member")]
    );
    assert!(v["members"][1]["joined_seq"].as_u64().unwrap() > 0);

    // A page of one has a cursor to the next.
    let (s, v) = f
        .as_user(
            &bob,
            Method::GET,
            &format!("/api/groups/{group}/members?limit=1"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["next"], alice.id.to_string());
    let (_, v) = f
        .as_user(
            &bob,
            Method::GET,
            &format!("/api/groups/{group}/members?after={}", alice.id),
            None,
        )
        .await;
    assert_eq!(v["members"][0]["user_id"].as_u64(), Some(bob.id), "{v}");

    // Without a token: 401.
    let (s, _) = f.call(Method::GET, "/api/groups", None, Auth::None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn non_members_get_404_like_for_no_group() {
    let f = Fixture::new().await;
    let (alice, carol) = (f.user("alice").await, f.user("carol").await);
    let group = f.group(&alice, "team", &[]).await;
    let missing = group + 1000;
    for id in [group, missing] {
        for (method, path, body) in [
            (Method::GET, format!("/api/groups/{id}"), None),
            (Method::GET, format!("/api/groups/{id}/members"), None),
            (
                Method::POST,
                format!("/api/groups/{id}/messages"),
                Some(json!({"body": "hi"})),
            ),
            (
                Method::POST,
                format!("/api/groups/{id}/members"),
                Some(json!({"user_ids": [carol.id]})),
            ),
            (Method::POST, format!("/api/groups/{id}/leave"), None),
            (Method::DELETE, format!("/api/groups/{id}"), None),
            (
                Method::PATCH,
                format!("/api/groups/{id}"),
                Some(json!({"name": "mine now"})),
            ),
            (
                Method::GET,
                format!("/api/conversations/group/{id}/messages"),
                None,
            ),
            (
                Method::POST,
                format!("/api/conversations/group/{id}/read"),
                Some(json!({"seq": 1})),
            ),
        ] {
            let (s, v) = f.as_user(&carol, method.clone(), &path, body).await;
            assert_eq!(
                (s, code(&v)),
                (StatusCode::NOT_FOUND, "unknown_group"),
                "{method} {path}"
            );
            // The same words whether the group exists or not.
            assert_eq!(v["error"]["message"], format!("no group {id}"), "{path}");
        }
    }
    // Nothing changed: still alice's, still named "team".
    let (_, v) = f
        .as_user(&alice, Method::GET, &format!("/api/groups/{group}"), None)
        .await;
    assert_eq!(v["group"]["name"], "team");
}

#[tokio::test]
async fn roles_decide_who_may_change_what() {
    let f = Fixture::new().await;
    let alice = f.user("alice").await;
    let bob = f.user("bob").await;
    let carol = f.user("carol").await;
    let dave = f.user("dave").await;
    let group = f.group(&alice, "team", &[&bob, &carol]).await;
    let members = format!("/api/groups/{group}/members");
    let role = |u: u64| format!("/api/groups/{group}/members/{u}/role");

    // A member can neither add, remove, rename nor change roles.
    let (s, v) = f
        .as_user(
            &bob,
            Method::POST,
            &members,
            Some(json!({"user_ids": [dave.id]})),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, "forbidden"), "{v}");
    let (s, _) = f
        .as_user(
            &bob,
            Method::DELETE,
            &format!("{members}/{}", carol.id),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = f
        .as_user(
            &bob,
            Method::PATCH,
            &format!("/api/groups/{group}"),
            Some(json!({"name": "bob's"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = f
        .as_user(
            &bob,
            Method::PUT,
            &role(carol.id),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // The owner makes bob and carol admins.
    for u in [&bob, &carol] {
        let (s, v) = f
            .as_user(
                &alice,
                Method::PUT,
                &role(u.id),
                Some(json!({"role": "admin"})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert!(v["seq"].as_u64().unwrap() > 0);
    }
    // An admin adds (answering the outcome) and renames ...
    let (s, v) = f
        .as_user(
            &bob,
            Method::POST,
            &members,
            Some(json!({"user_ids": [dave.id, carol.id]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(ids(&v["added"]), vec![dave.id]);
    assert_eq!(ids(&v["already"]), vec![carol.id]);
    assert!(v["seq"].as_u64().unwrap() > 0);
    let (s, v) = f
        .as_user(
            &bob,
            Method::PATCH,
            &format!("/api/groups/{group}"),
            Some(json!({"name": "renamed"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // ... but removes neither the owner nor another admin, nor changes roles.
    let (s, v) = f
        .as_user(
            &bob,
            Method::DELETE,
            &format!("{members}/{}", alice.id),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, _) = f
        .as_user(
            &bob,
            Method::DELETE,
            &format!("{members}/{}", carol.id),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = f
        .as_user(
            &bob,
            Method::PUT,
            &role(dave.id),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // An admin removes a member.
    let (s, v) = f
        .as_user(
            &bob,
            Method::DELETE,
            &format!("{members}/{}", dave.id),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _) = f
        .as_user(&dave, Method::GET, &format!("/api/groups/{group}"), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "dave is out");
    // Removing a non-member is 404.
    let (s, v) = f
        .as_user(
            &alice,
            Method::DELETE,
            &format!("{members}/{}", dave.id),
            None,
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "not_found"));

    // The owner demotes carol and removes her.
    let (s, _) = f
        .as_user(
            &alice,
            Method::PUT,
            &role(carol.id),
            Some(json!({"role": "member"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, v) = f.as_user(&alice, Method::GET, &members, None).await;
    let carol_role = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["user_id"].as_u64() == Some(carol.id))
        .map(|m| m["role"].clone());
    assert_eq!(carol_role, Some(json!("member")));
    let (s, _) = f
        .as_user(
            &alice,
            Method::DELETE,
            &format!("{members}/{}", carol.id),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);

    // The owner's own role does not change.
    let (s, _) = f
        .as_user(
            &alice,
            Method::PUT,
            &role(alice.id),
            Some(json!({"role": "member"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);

    // Every change is an event in the log, the last one carol's removal.
    let (s, v) = f
        .as_user(
            &alice,
            Method::GET,
            &format!("/api/conversations/group/{group}/messages?limit=1"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let last = &v["messages"][0];
    assert_eq!(last["kind"], "MESSAGE_KIND_GROUP_EVENT");
    assert_eq!(last["groupEvent"]["type"], "GROUP_EVENT_TYPE_REMOVED");
    assert_eq!(last["groupEvent"]["userIds"], json!([carol.id.to_string()]));
    assert_eq!(last["body"], "alice removed carol");
}

#[tokio::test]
async fn members_leave_but_the_owner_disbands() {
    let f = Fixture::new().await;
    let alice = f.user("alice").await;
    let bob = f.user("bob").await;
    let carol = f.user("carol").await;
    let group = f.group(&alice, "team", &[&bob, &carol]).await;

    let (s, v) = f
        .as_user(
            &bob,
            Method::POST,
            &format!("/api/groups/{group}/leave"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["seq"].as_u64().unwrap() > 0);
    let (_, v) = f.as_user(&bob, Method::GET, "/api/groups", None).await;
    assert_eq!(v["groups"], json!([]));
    let (s, _) = f
        .as_user(
            &bob,
            Method::POST,
            &format!("/api/groups/{group}/leave"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "not a member any more");

    // Removing oneself is leaving, for members.
    let (s, v) = f
        .as_user(
            &carol,
            Method::DELETE,
            &format!("/api/groups/{group}/members/{}", carol.id),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, v) = f
        .as_user(
            &alice,
            Method::GET,
            &format!("/api/conversations/group/{group}/messages?limit=1"),
            None,
        )
        .await;
    assert_eq!(
        v["messages"][0]["groupEvent"]["type"],
        "GROUP_EVENT_TYPE_LEFT"
    );
    assert_eq!(v["messages"][0]["body"], "carol left");

    // The owner cannot leave: 409, pointing at disbanding.
    let (s, v) = f
        .as_user(
            &alice,
            Method::POST,
            &format!("/api/groups/{group}/leave"),
            None,
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, "owner_stays"), "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("disband"),
        "{v}"
    );

    // Only the owner disbands; then the group is gone for everyone.
    let (s, v) = f
        .as_user(
            &alice,
            Method::DELETE,
            &format!("/api/groups/{group}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _) = f
        .as_user(&alice, Method::GET, &format!("/api/groups/{group}"), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, v) = f.as_user(&alice, Method::GET, "/api/groups", None).await;
    assert_eq!(v["groups"], json!([]));
}

#[tokio::test]
async fn only_the_owner_disbands() {
    let f = Fixture::new().await;
    let (alice, bob) = (f.user("alice").await, f.user("bob").await);
    let group = f.group(&alice, "team", &[&bob]).await;
    let (s, _) = f
        .as_user(
            &alice,
            Method::PUT,
            &format!("/api/groups/{group}/members/{}/role", bob.id),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = f
        .as_user(&bob, Method::DELETE, &format!("/api/groups/{group}"), None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "an admin does not disband: {v}");
    let (s, _) = f
        .as_user(&bob, Method::GET, &format!("/api/groups/{group}"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "still there");
}

#[tokio::test]
async fn bad_input_is_a_clear_400_or_404() {
    let f = Fixture::new().await;
    let (alice, bob) = (f.user("alice").await, f.user("bob").await);
    for name in [
        json!(""),
        json!("   "),
        json!("x".repeat(MAX_GROUP_NAME_LEN + 1)),
        json!("a\u{7}b"),
    ] {
        let (s, v) = f
            .as_user(
                &alice,
                Method::POST,
                "/api/groups",
                Some(json!({ "name": name })),
            )
            .await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::BAD_REQUEST, "bad_request"),
            "{name}"
        );
    }
    let (s, v) = f
        .as_user(
            &alice,
            Method::POST,
            "/api/groups",
            Some(json!({"name": 5})),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "bad_request"));
    let bad_json = Request::post("/api/groups")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, format!("Bearer {}", alice.token))
        .body(Body::from("{\"name\": "))
        .unwrap();
    let (s, v) = call(&f.app, bad_json).await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "invalid_json"));

    // Unknown members: 404 naming them, and nothing is created.
    let (s, v) = f
        .as_user(
            &alice,
            Method::POST,
            "/api/groups",
            Some(json!({"name": "team", "members": [bob.id, 9999, 8888]})),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::NOT_FOUND, "unknown_user"),
        "{v}"
    );
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("9999") && message.contains("8888"),
        "{message}"
    );
    assert!(!message.contains(&bob.id.to_string()), "{message}");
    let (_, v) = f.as_user(&alice, Method::GET, "/api/groups", None).await;
    assert_eq!(v["groups"], json!([]), "nothing created");

    let group = f.group(&alice, "team", &[]).await;
    let members = format!("/api/groups/{group}/members");
    for (body, want) in [
        (json!({"user_ids": [9999]}), StatusCode::NOT_FOUND),
        (json!({"user_ids": []}), StatusCode::BAD_REQUEST),
        (json!({"user_ids": [0]}), StatusCode::BAD_REQUEST),
        (json!({"user_ids": "bob"}), StatusCode::BAD_REQUEST),
    ] {
        let (s, v) = f
            .as_user(&alice, Method::POST, &members, Some(body.clone()))
            .await;
        assert_eq!(s, want, "{body}: {v}");
    }
    let (s, _) = f
        .as_user(
            &alice,
            Method::PUT,
            &format!("{members}/{}/role", alice.id),
            Some(json!({"role": "owner"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "owner is no role to give");
    let (s, v) = f
        .as_user(&alice, Method::GET, "/api/groups/not-a-number", None)
        .await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "bad_request"));
    let (s, v) = f
        .as_user(
            &alice,
            Method::POST,
            &format!("/api/groups/{group}/messages"),
            Some(json!({"body": "  "})),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::BAD_REQUEST, "bad_request"),
        "{v}"
    );

    // Conversations: a bad type, a bad id, both directions, a bad number.
    for path in [
        "/api/conversations/channel/1/messages".to_string(),
        "/api/conversations/group/0/messages".to_string(),
        "/api/conversations/group/x/messages".to_string(),
        format!("/api/conversations/group/{group}/messages?before=5&after=1"),
        format!("/api/conversations/group/{group}/messages?before=x"),
        format!("/api/conversations/group/{group}/messages?before=0"),
        format!("/api/conversations/group/{group}/messages?limit=0"),
        "/api/conversations?before_ms=soon".to_string(),
    ] {
        let (s, v) = f.as_user(&alice, Method::GET, &path, None).await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::BAD_REQUEST, "bad_request"),
            "{path}: {v}"
        );
    }
    let (s, _) = f
        .as_user(
            &alice,
            Method::POST,
            "/api/conversations/friends/1/read",
            Some(json!({"seq": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = f
        .as_user(
            &alice,
            Method::POST,
            &format!("/api/conversations/group/{group}/read"),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "seq is required");
    // A private conversation with nobody.
    let (s, v) = f
        .as_user(
            &alice,
            Method::GET,
            "/api/conversations/user/9999/messages",
            None,
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "unknown_user"));
}

#[tokio::test]
async fn history_pages_oldest_first() {
    let f = Fixture::new().await;
    let (alice, bob) = (f.user("alice").await, f.user("bob").await);
    // Seq 1: CREATED, 2: JOINED (bob), 3..=7: the messages.
    let group = f.group(&alice, "team", &[&bob]).await;
    for i in 0..5 {
        let v = f.send(&alice, group, &format!("m{i}")).await;
        assert_eq!(v["log_seq"].as_u64(), Some(3 + i), "{v}");
        assert_eq!(v["repeat"], false);
    }
    let history = format!("/api/conversations/group/{group}/messages");
    let page = |q: &str| format!("{history}?{q}");

    let (s, v) = f.as_user(&bob, Method::GET, &page("limit=2"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(seqs(&v), vec![6, 7], "the newest, oldest first");
    assert_eq!(v["messages"][1]["body"], "m4");
    assert_eq!(v["messages"][1]["senderName"], "alice");
    assert_eq!(v["messages"][1]["kind"], "MESSAGE_KIND_GROUP_CHAT");
    let (_, v) = f
        .as_user(&bob, Method::GET, &page("before=6&limit=2"), None)
        .await;
    assert_eq!(seqs(&v), vec![4, 5], "before is exclusive");
    let (_, v) = f.as_user(&bob, Method::GET, &page("after=5"), None).await;
    assert_eq!(seqs(&v), vec![6, 7], "after is exclusive");
    let (_, v) = f.as_user(&bob, Method::GET, &page("after=7"), None).await;
    assert_eq!(seqs(&v), Vec::<u64>::new(), "nothing newer");
    // Bob reads from his JOINED event on; alice from the start.
    let (_, v) = f.as_user(&bob, Method::GET, &history, None).await;
    assert_eq!(seqs(&v), (2..=7).collect::<Vec<_>>());
    let (_, v) = f.as_user(&alice, Method::GET, &history, None).await;
    assert_eq!(seqs(&v), (1..=7).collect::<Vec<_>>());
    assert_eq!(
        v["messages"][0]["groupEvent"]["type"],
        "GROUP_EVENT_TYPE_CREATED"
    );
    assert_eq!(v["messages"][0]["groupEvent"]["name"], "team");
    assert_eq!(v["messages"][1]["body"], "alice added bob");

    // A retry with the same message id is stored once.
    let retry = json!({"body": "once", "message_id": "m-1"});
    let path = format!("/api/groups/{group}/messages");
    let (_, first) = f
        .as_user(&bob, Method::POST, &path, Some(retry.clone()))
        .await;
    let (s, again) = f.as_user(&bob, Method::POST, &path, Some(retry)).await;
    assert_eq!(s, StatusCode::OK, "{again}");
    assert_eq!(again["repeat"], true);
    assert_eq!(again["log_seq"], first["log_seq"]);
    assert_eq!(again["id"], format!("{}-m-1", bob.id));

    // A private conversation nobody wrote to is empty, not an error.
    let (s, v) = f
        .as_user(
            &alice,
            Method::GET,
            &format!("/api/conversations/user/{}/messages", bob.id),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["messages"], json!([]));
}

#[tokio::test]
async fn read_marks_and_unread_counts() {
    let f = Fixture::new().await;
    let (alice, bob) = (f.user("alice").await, f.user("bob").await);
    let group = f.group(&alice, "team", &[&bob]).await;
    for i in 0..3 {
        f.send(&alice, group, &format!("m{i}")).await;
    }
    // Seqs 1..=5; the last is alice's own message, so she has read everything.
    let conversation = |v: &Value| {
        let list = v["conversations"].as_array().unwrap();
        assert_eq!(list.len(), 1, "{v}");
        list[0].clone()
    };
    let (s, v) = f
        .as_user(&alice, Method::GET, "/api/conversations", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let c = conversation(&v);
    assert_eq!(
        (c["type"].as_str(), c["id"].as_u64()),
        (Some("group"), Some(group))
    );
    assert_eq!(c["name"], "team");
    assert_eq!(c["top"].as_u64(), Some(5));
    assert_eq!(c["unread"].as_u64(), Some(0), "{c}");
    assert_eq!(c["last"]["body"], "m2");
    assert!(c["activity_ms"].as_i64().unwrap() > 0);

    let read = format!("/api/conversations/group/{group}/read");
    let (s, v) = f
        .as_user(&bob, Method::POST, &read, Some(json!({"seq": 3})))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["read_seq"].as_u64(), Some(3));
    let (_, v) = f
        .as_user(&bob, Method::GET, "/api/conversations", None)
        .await;
    let c = conversation(&v);
    assert_eq!(
        (c["read_seq"].as_u64(), c["unread"].as_u64()),
        (Some(3), Some(2))
    );

    // Marks never move back, and stop at the newest message.
    let (_, v) = f
        .as_user(&bob, Method::POST, &read, Some(json!({"seq": 1})))
        .await;
    assert_eq!(v["read_seq"].as_u64(), Some(3));
    let (_, v) = f
        .as_user(&bob, Method::POST, &read, Some(json!({"seq": 99})))
        .await;
    assert_eq!(v["read_seq"].as_u64(), Some(5));
    let (_, v) = f
        .as_user(&bob, Method::GET, "/api/conversations", None)
        .await;
    assert_eq!(conversation(&v)["unread"].as_u64(), Some(0));

    // Paging by activity: nothing older than the only conversation.
    let before = conversation(&v)["activity_ms"].as_i64().unwrap();
    let (_, v) = f
        .as_user(
            &bob,
            Method::GET,
            &format!("/api/conversations?before_ms={before}"),
            None,
        )
        .await;
    assert_eq!(v["conversations"], json!([]));
}

#[tokio::test]
async fn the_business_api_needs_its_key_and_acts_as_owner() {
    let f = Fixture::new().await;
    let alice = f.user("alice").await;
    let bob = f.user("bob").await;
    let carol = f.user("carol").await;
    let create = json!({"name": "support", "owner": alice.id, "members": [bob.id]});

    // Without the key, with a wrong one, with a user's token: 401, nothing created.
    for auth in [
        Auth::None,
        Auth::Key("wrong-key-0123456789"),
        Auth::Bearer(&alice.token),
    ] {
        let (s, v) = f
            .call(
                Method::POST,
                "/api/admin/groups",
                Some(create.clone()),
                auth,
            )
            .await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::UNAUTHORIZED, "unauthorized"),
            "{v}"
        );
    }
    let (_, v) = f.as_user(&alice, Method::GET, "/api/groups", None).await;
    assert_eq!(v["groups"], json!([]));

    let (s, v) = f
        .as_backend(
            Method::POST,
            "/api/admin/groups",
            Some(json!({"name": "x", "owner": 9999})),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "unknown_user"));
    let (s, _) = f
        .as_backend(
            Method::POST,
            "/api/admin/groups",
            Some(json!({"name": "x"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "an owner is needed");

    let (s, v) = f
        .as_backend(Method::POST, "/api/admin/groups", Some(create))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let group = v["group"]["id"].as_u64().unwrap();
    assert_eq!(v["group"]["owner"].as_u64(), Some(alice.id));
    let admin = |rest: &str| format!("/api/admin/groups/{group}{rest}");

    // The events name the system as who made the change.
    let (s, v) = f
        .as_backend(
            Method::GET,
            &format!(
                "/api/admin/users/{}/conversations/group/{group}/messages",
                alice.id
            ),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(seqs(&v), vec![1, 2]);
    assert!(v["messages"][0].get("senderId").is_none(), "sender 0: {v}");
    assert_eq!(v["messages"][0]["senderName"], "system");

    // Add, role, rename, as an owner may.
    let (s, v) = f
        .as_backend(
            Method::POST,
            &admin("/members"),
            Some(json!({"user_ids": [carol.id]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(ids(&v["added"]), vec![carol.id]);
    let (s, _) = f
        .as_backend(
            Method::PUT,
            &admin(&format!("/members/{}/role", bob.id)),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = f
        .as_backend(
            Method::PATCH,
            &admin(""),
            Some(json!({"name": "help desk"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = f.as_backend(Method::GET, &admin(""), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["group"]["name"].as_str(), v["group"]["members"].as_u64()),
        (Some("help desk"), Some(3))
    );
    let (s, v) = f.as_backend(Method::GET, &admin("/members"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["members"].as_array().unwrap().len(), 3);

    // Messages as the system and as a member; a non-member is refused.
    let (s, v) = f
        .as_backend(
            Method::POST,
            &admin("/messages"),
            Some(json!({"body": "welcome"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["log_seq"].as_u64().unwrap() > 0);
    let (s, v) = f
        .as_backend(
            Method::POST,
            &admin("/messages"),
            Some(json!({"body": "hi", "sender_id": bob.id})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let dave = f.user("dave").await;
    let (s, v) = f
        .as_backend(
            Method::POST,
            &admin("/messages"),
            Some(json!({"body": "hi", "sender_id": dave.id})),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::FORBIDDEN, "not_a_member"),
        "{v}"
    );

    // A user's groups and conversations.
    let (s, v) = f
        .as_backend(
            Method::GET,
            &format!("/api/admin/users/{}/groups", carol.id),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["groups"][0]["id"].as_u64(), Some(group));
    let (s, v) = f
        .as_backend(
            Method::GET,
            &format!("/api/admin/users/{}/conversations", carol.id),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["conversations"][0]["last"]["body"], "hi");
    let (s, _) = f
        .as_backend(Method::GET, "/api/admin/users/9999/conversations", None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // The owner is not removed (disband instead); a member is.
    let (s, _) = f
        .as_backend(
            Method::DELETE,
            &admin(&format!("/members/{}", alice.id)),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = f
        .as_backend(
            Method::DELETE,
            &admin(&format!("/members/{}", carol.id)),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = f.as_backend(Method::DELETE, &admin(""), None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = f.as_backend(Method::GET, &admin(""), None).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, "unknown_group"));
}

#[tokio::test]
async fn private_conversations_are_named_by_the_peer() {
    let f = Fixture::new().await;
    let (alice, bob) = (f.user("alice").await, f.user("bob").await);
    let (s, v) = f
        .as_user(
            &alice,
            Method::POST,
            "/api/messages/private",
            Some(json!({"to": bob.id, "body": "hello"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");

    let (s, v) = f
        .as_user(&bob, Method::GET, "/api/conversations", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let c = &v["conversations"][0];
    assert_eq!(
        (c["type"].as_str(), c["id"].as_u64()),
        (Some("user"), Some(alice.id)),
        "{v}"
    );
    assert_eq!(c["name"], "alice", "the peer's name");
    assert_eq!(c["unread"].as_u64(), Some(1));
    assert_eq!(c["last"]["body"], "hello");

    let history = format!("/api/conversations/user/{}/messages", alice.id);
    let (s, v) = f.as_user(&bob, Method::GET, &history, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(seqs(&v), vec![1]);
    let read = format!("/api/conversations/user/{}/read", alice.id);
    let (s, v) = f
        .as_user(&bob, Method::POST, &read, Some(json!({"seq": 1})))
        .await;
    assert_eq!(
        (s, v["read_seq"].as_u64()),
        (StatusCode::OK, Some(1)),
        "{v}"
    );
    let (_, v) = f
        .as_user(&bob, Method::GET, "/api/conversations", None)
        .await;
    assert_eq!(v["conversations"][0]["unread"].as_u64(), Some(0));
    // Alice sees bob's mark on her side.
    let (_, v) = f
        .as_user(&alice, Method::GET, "/api/conversations", None)
        .await;
    assert_eq!(v["conversations"][0]["name"], "bob");
    assert_eq!(
        v["conversations"][0]["peer_read_seq"].as_u64(),
        Some(1),
        "{v}"
    );
}
