//! Property test of the public API's request bodies: every POST endpoint, driven through the
//! real router ([`app`], the whole service stack) on the in-memory store, with a live (fake)
//! connection server, a logged-in and attached user, a channel and an API key, gets arbitrary
//! bytes, arbitrary text and arbitrary JSON (objects with the endpoint's own field names and
//! values of every type) under several content types.
//!
//! Every answer is a 2xx with a JSON body, or a 4xx with the API's error shape
//! (`{"error":{"code","message"}}`); never a 5xx (everything it needs is up), never a panic.
//!
//! Cases per run (`PROPTEST_CASES` overrides it): 48 per endpoint, 19 endpoints, 912 requests
//! (about two seconds: registrations and logins hash with the cheap test parameters of
//! `testing::state_with`).

use super::app;
use crate::{
    auth::API_KEY_HEADER,
    testing::{fake_server, state_with, StoreExt},
};
use axum::{
    body::Body,
    http::{header, Request},
    Router,
};
use cim_common::{
    config::DEV_SECRET,
    store::{prelude::*, MemoryStore},
    time::now_ms,
};
use cim_proto::arb;
use proptest::{
    collection::vec,
    prelude::*,
    test_runner::{TestCaseError, TestRunner},
};
use serde_json::{json, Value};
use std::sync::Arc;
use tower::ServiceExt;

const API_KEY: &str = "property-test-api-key";

/// Who a request is from.
#[derive(Debug, Clone, Copy)]
enum Auth {
    None,
    /// The session token of a logged-in user attached to the live server.
    Bearer,
    /// The session token of a user whose session a logout may end (it then answers 401).
    Logout,
    ApiKey,
}

/// An endpoint: its path (with `{name}` / `{id}` filled per case) and its body's field names.
struct Endpoint {
    path: &'static str,
    auth: Auth,
    fields: &'static [&'static str],
}

const ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        path: "/api/register",
        auth: Auth::None,
        fields: &["name", "password"],
    },
    Endpoint {
        path: "/api/login",
        auth: Auth::None,
        fields: &["name", "password"],
    },
    Endpoint {
        path: "/api/logout",
        auth: Auth::Logout,
        fields: &[],
    },
    // Replaces the session it resumes, so like logout its token may stop working.
    Endpoint {
        path: "/api/login/resume",
        auth: Auth::Logout,
        fields: &[],
    },
    Endpoint {
        path: "/api/messages/private",
        auth: Auth::Bearer,
        fields: &["to", "to_name", "body", "id", "receipt"],
    },
    Endpoint {
        path: "/api/messages/group",
        auth: Auth::Bearer,
        fields: &["body", "id"],
    },
    Endpoint {
        path: "/api/channels/{name}/join",
        auth: Auth::Bearer,
        fields: &[],
    },
    Endpoint {
        path: "/api/channels/{name}/leave",
        auth: Auth::Bearer,
        fields: &[],
    },
    Endpoint {
        path: "/api/channels/{name}/messages",
        auth: Auth::Bearer,
        fields: &["body", "id"],
    },
    Endpoint {
        path: "/api/admin/messages",
        auth: Auth::ApiKey,
        fields: &["to", "body", "from", "receipt", "id"],
    },
    Endpoint {
        path: "/api/admin/broadcast",
        auth: Auth::ApiKey,
        fields: &["body", "from", "id"],
    },
    Endpoint {
        path: "/api/admin/users/{id}/kick",
        auth: Auth::ApiKey,
        fields: &["reason"],
    },
    Endpoint {
        path: "/api/admin/users/{id}/connect",
        auth: Auth::ApiKey,
        fields: &["server_id"],
    },
    Endpoint {
        path: "/api/admin/users/bulk",
        auth: Auth::ApiKey,
        fields: &["names"],
    },
    Endpoint {
        path: "/api/admin/channels/{name}/join",
        auth: Auth::ApiKey,
        fields: &["user_id"],
    },
    Endpoint {
        path: "/api/admin/channels/{name}/leave",
        auth: Auth::ApiKey,
        fields: &["user_id"],
    },
    Endpoint {
        path: "/api/admin/channels/{name}/messages",
        auth: Auth::ApiKey,
        fields: &["body", "from", "id"],
    },
    // A wrong method and an unknown path take the framework's own error paths.
    Endpoint {
        path: "/api/servers",
        auth: Auth::Bearer,
        fields: &[],
    },
    Endpoint {
        path: "/api/nope/{name}",
        auth: Auth::None,
        fields: &["body"],
    },
];

/// The route and what a request can refer to.
struct Fixture {
    app: Router,
    /// The registry watch: open, so the server stays live.
    _servers: tokio::sync::watch::Sender<cim_common::registry::Members>,
    bearer: String,
    logout: String,
    /// Ids that exist (alice: attached, bob: offline) and some that do not.
    ids: Vec<String>,
}

async fn fixture() -> Fixture {
    let store = Arc::new(MemoryStore::new());
    let (server, _recorded) = fake_server("server-a", DEV_SECRET).await;
    let (state, tx) = state_with(store.clone(), vec![server], |c| {
        c.api_keys = vec![API_KEY.into()];
    });
    let app = app(state.clone());
    let mut tokens = Vec::new();
    for name in ["alice", "carol"] {
        let creds = json!({"name": name, "password": "secret-pw"}).to_string();
        for path in ["/api/register", "/api/login"] {
            let resp = app
                .clone()
                .oneshot(
                    Request::post(path)
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(Body::from(creds.clone()))
                        .unwrap(),
                )
                .await
                .unwrap();
            assert!(resp.status().is_success(), "{path}: {}", resp.status());
            if path == "/api/login" {
                let v: Value = serde_json::from_slice(
                    &axum::body::to_bytes(resp.into_body(), 1 << 20)
                        .await
                        .unwrap(),
                )
                .unwrap();
                let claims = state
                    .signer()
                    .verify_connect(v["connect_token"].as_str().unwrap(), now_ms())
                    .unwrap();
                store
                    .attach(claims.user_id, name, &claims.session, "server-a")
                    .await
                    .unwrap();
                tokens.push((
                    claims.user_id,
                    v["session_token"].as_str().unwrap().to_string(),
                ));
            }
        }
    }
    let bob = store.add_user("bob").await;
    store.channel_join("room", tokens[0].0, 100).await.unwrap();
    let ids = [tokens[0].0, bob, 0, 999_999, u64::MAX]
        .iter()
        .map(u64::to_string)
        .chain(["x".to_string(), "-1".to_string(), "1.5".to_string()])
        .collect();
    Fixture {
        app,
        _servers: tx,
        bearer: tokens[0].1.clone(),
        logout: tokens[1].1.clone(),
        ids,
    }
}

/// A path segment: a channel that exists, valid and invalid names, percent-encoded text.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("room".to_string()),
        Just("mine".to_string()),
        "[a-z0-9_.-]{1,70}",
        arb::text().prop_map(|t| { t.bytes().map(|b| format!("%{b:02X}")).collect::<String>() }),
    ]
}

/// A value for field `name`: mostly of the right type and often acceptable (users 1 to 3
/// exist), sometimes anything.
fn field_value(name: &'static str, keys: &'static [&'static str]) -> BoxedStrategy<Value> {
    let right = match name {
        "name" | "to_name" => prop_oneof![
            proptest::sample::select(&["alice", "bob", "nobody"][..]).prop_map(String::from),
            "[A-Za-z0-9_.-]{1,40}",
            arb::text(),
        ]
        .prop_map(Value::from)
        .boxed(),
        "password" => prop_oneof![Just("secret-pw".to_string()), "[a-z]{0,12}", arb::text()]
            .prop_map(Value::from)
            .boxed(),
        "body" | "reason" => prop_oneof![Just("hello".to_string()), arb::text()]
            .prop_map(Value::from)
            .boxed(),
        "id" => prop_oneof!["[0-9A-Za-z_-]{1,64}", arb::text()]
            .prop_map(Value::from)
            .boxed(),
        "to" => prop_oneof![
            (0u64..5).prop_map(Value::from),
            vec(0u64..5, 0..4).prop_map(Value::from),
        ]
        .boxed(),
        "from" | "user_id" => prop_oneof![
            (0u64..5).prop_map(Value::from),
            any::<u64>().prop_map(Value::from)
        ]
        .boxed(),
        "receipt" => any::<bool>().prop_map(Value::from).boxed(),
        "server_id" => prop_oneof![
            Just("server-a".to_string()),
            Just("server-gone".to_string()),
            arb::text()
        ]
        .prop_map(Value::from)
        .boxed(),
        // Mostly valid names (some taken), now and then one that is not, or too many.
        "names" => prop_oneof![
            8 => vec(
                prop_oneof![
                    proptest::sample::select(&["alice", "bob", "bulk-1"][..]).prop_map(String::from),
                    "[A-Za-z0-9_.-]{1,40}",
                    arb::text(),
                ],
                0..6
            )
            .prop_map(Value::from),
            1 => Just(Value::from(vec!["n"; 1001])),
        ]
        .boxed(),
        _ => arb::json_value(keys).boxed(),
    };
    prop_oneof![5 => right, 1 => arb::json_value(keys)].boxed()
}

/// A body for an endpoint with `fields`.
fn body(fields: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    let keys: &'static [&'static str] = if fields.is_empty() { &["body"] } else { fields };
    // Objects of the endpoint's own fields (each present or not), plus now and then a field
    // from another version.
    let object = (
        keys.iter()
            .map(|k| proptest::option::weighted(0.7, field_value(k, keys)))
            .collect::<Vec<_>>(),
        proptest::option::weighted(0.2, (arb::text(), arb::json_value(keys))),
    )
        .prop_map(move |(values, extra)| {
            let mut object: serde_json::Map<String, Value> = keys
                .iter()
                .zip(values)
                .filter_map(|(k, v)| Some((k.to_string(), v?)))
                .collect();
            if let Some((k, v)) = extra {
                object.insert(k, v);
            }
            Value::Object(object).to_string()
        });
    prop_oneof![
        6 => object.prop_map(String::into_bytes),
        1 => arb::json_value(keys).prop_map(|v| v.to_string().into_bytes()),
        1 => arb::text().prop_map(String::into_bytes),
        1 => vec(any::<u8>(), 0..128),
        1 => Just(Vec::new()),
    ]
}

fn content_type() -> impl Strategy<Value = Option<&'static str>> {
    prop_oneof![
        6 => Just(Some("application/json")),
        1 => Just(Some("application/json; charset=utf-8")),
        1 => Just(Some("text/plain")),
        1 => Just(None),
    ]
}

async fn check(
    fx: &Fixture,
    endpoint: &Endpoint,
    (segment, id, body, content_type): (String, usize, Vec<u8>, Option<&'static str>),
) -> Result<(), TestCaseError> {
    let path = endpoint
        .path
        .replace("{name}", &segment)
        .replace("{id}", &fx.ids[id % fx.ids.len()]);
    let mut req = Request::post(&path);
    if let Some(ct) = content_type {
        req = req.header(header::CONTENT_TYPE, ct);
    }
    req = match endpoint.auth {
        Auth::None => req,
        Auth::Bearer => req.header(header::AUTHORIZATION, format!("Bearer {}", fx.bearer)),
        Auth::Logout => req.header(header::AUTHORIZATION, format!("Bearer {}", fx.logout)),
        Auth::ApiKey => req.header(API_KEY_HEADER, API_KEY),
    };
    let shown = String::from_utf8_lossy(&body).into_owned();
    let resp = fx
        .app
        .clone()
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let answer: Value = serde_json::from_slice(&bytes).map_err(|e| {
        TestCaseError::fail(format!(
            "{path} {shown:?}: {status} not JSON ({e}): {bytes:?}"
        ))
    })?;
    prop_assert!(
        status.is_success() || status.is_client_error(),
        "{} {:?}: {} {}",
        path,
        shown,
        status,
        answer
    );
    if status.is_client_error() {
        prop_assert!(
            answer["error"]["code"].is_string() && answer["error"]["message"].is_string(),
            "{} {:?}: {} without the error shape: {}",
            path,
            shown,
            status,
            answer
        );
    } else {
        prop_assert!(answer.is_object(), "{} {:?}: {}", path, shown, answer);
    }
    Ok(())
}

#[test]
fn post_bodies_get_a_2xx_or_a_4xx_with_the_error_shape() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let fx = rt.block_on(fixture());
    for endpoint in ENDPOINTS {
        let config = ProptestConfig {
            // Where proptest keeps the seeds of failures (as `proptest!` would say).
            source_file: Some(file!()),
            ..arb::config(48)
        };
        let mut runner = TestRunner::new(config);
        let input = (
            segment(),
            any::<usize>(),
            body(endpoint.fields),
            content_type(),
        );
        if let Err(e) = runner.run(&input, |case| rt.block_on(check(&fx, endpoint, case))) {
            panic!("POST {}: {e}", endpoint.path);
        }
    }
}
