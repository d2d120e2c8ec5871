//! The OpenAPI 3.1 description of the public API, generated from the handlers'
//! `#[utoipa::path]` annotations and the `ToSchema` derives of their request and response
//! types, and served at `GET /api/openapi.json` (no auth).
//!
//! Every route of [`super::app`] must be listed in [`ApiDoc`]: a test reads the router's
//! `.route(..)` calls from `mod.rs` and fails on any endpoint the document lacks (and on any
//! documented one the router lacks). The web page's routes (`crate::web`) are not API.

use super::{
    accounts, admin, bulk_users, channels, conversations, events, groups, messages, presence,
};
use axum::{http::header, response::IntoResponse};
use std::sync::LazyLock;
use utoipa::{
    openapi::{
        security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme},
        OpenApi as Document, RefOr, Required,
    },
    Modify, OpenApi,
};

pub use cim_proto::api::{ErrorBody, ErrorDetail};

/// The whole public API (the web page's files are not part of it).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "cim route API",
        version = env!("CARGO_PKG_VERSION"),
        description = "The public HTTP API of a cim route, the stateless HTTP service of the cim \
            clustered IM system: accounts and login (with server assignment), presence, \
            messages, channels, stored groups and conversations (history, read marks), and the business API for backends (`/api/admin/*`, API key). \
            Clients log in with `POST /api/login` and use its `session_token` as bearer token; \
            backends send one of the route's configured API keys in `X-Api-Key`. Every error \
            answers `{\"error\":{\"code\",\"message\"}}` (schema `ErrorBody`); besides the \
            statuses listed per operation, any request may answer 500 `internal`, 404 \
            `not_found` (unknown path) or 405 `method_not_allowed`.",
        license(name = "MIT"),
    ),
    paths(
        presence::healthz,
        accounts::register,
        accounts::login,
        accounts::resume,
        accounts::logout,
        presence::servers,
        presence::online,
        messages::private,
        messages::group,
        channels::list,
        channels::mine,
        channels::info,
        channels::join,
        channels::leave,
        channels::members,
        channels::send,
        groups::create,
        groups::mine,
        groups::info,
        groups::rename,
        groups::disband,
        groups::members,
        groups::add,
        groups::remove,
        groups::role,
        groups::leave,
        groups::send,
        conversations::list,
        conversations::history,
        conversations::read,
        admin::messages,
        admin::broadcast,
        admin::presence,
        admin::online,
        admin::online_count,
        admin::kick,
        admin::connect,
        bulk_users::create,
        admin::user_channels,
        admin::channel_join,
        admin::channel_leave,
        admin::channel_message,
        groups::admin_create,
        groups::admin_info,
        groups::admin_rename,
        groups::admin_disband,
        groups::admin_members,
        groups::admin_add,
        groups::admin_remove,
        groups::admin_role,
        groups::admin_send,
        groups::admin_user_groups,
        conversations::admin_list,
        conversations::admin_history,
        events::stream_events,
        events::recent,
        serve,
    ),
    components(schemas(
        ErrorBody,
        ErrorDetail,
        accounts::Credentials,
        accounts::Registered,
        accounts::ServerAddrs,
        accounts::LoggedIn,
        accounts::OkBody,
        presence::OnlineUser,
        presence::OnlinePage,
        presence::ServerList,
        presence::Health,
        messages::PrivateRequest,
        messages::PrivateSent,
        messages::GroupRequest,
        messages::GroupSent,
        channels::Joined,
        channels::Left,
        channels::ChannelView,
        channels::ChannelList,
        channels::ChannelPage,
        channels::Member,
        channels::MemberPage,
        channels::ChannelMessage,
        admin::AdminMessage,
        admin::ErrorView,
        admin::AdminResult,
        admin::AdminResults,
        admin::Broadcast,
        admin::UserRef,
        admin::UserPresence,
        admin::PresenceList,
        admin::ServerCount,
        admin::OnlineCount,
        admin::KickBody,
        admin::ConnectBody,
        bulk_users::BulkUsers,
        bulk_users::BulkUser,
        bulk_users::BulkCreated,
        admin::Kicked,
        cim_proto::api::GroupView,
        cim_proto::api::GroupAnswer,
        cim_proto::api::CreatedGroup,
        cim_proto::api::GroupList,
        cim_proto::api::GroupMemberView,
        cim_proto::api::GroupMembersPage,
        cim_proto::api::Added,
        cim_proto::api::GroupChange,
        cim_proto::api::GroupChatSent,
        groups::NewGroup,
        groups::AdminNewGroup,
        groups::UserIds,
        groups::RoleBody,
        groups::Rename,
        groups::GroupMessage,
        groups::AdminGroupMessage,
        cim_proto::api::ConversationView,
        cim_proto::api::ConversationList,
        cim_proto::api::MessagePage,
        cim_proto::api::ReadMarkAnswer,
        conversations::ReadBody,
        events::RecentEvents,
        events::MessageEventDoc,
        events::EventDoc,
        events::EventKindDoc,
    )),
    modifiers(&SecuritySchemes, &OptionalBodies),
    tags(
        (name = "accounts", description = "Accounts and login sessions"),
        (name = "presence", description = "Who and what is online, and the health check"),
        (name = "messages", description = "Sending messages as the logged-in user"),
        (name = "channels", description = "Channels: temporary group chats, chat rooms, comment areas"),
        (name = "groups", description = "Stored groups: members, roles, messages kept in the group's log"),
        (name = "conversations", description = "The caller's conversations: list, history, read marks"),
        (name = "admin", description = "The business API for backends (API key)"),
        (name = "events", description = "Presence events for backends (API key)"),
        (name = "meta", description = "This document"),
    ),
)]
pub struct ApiDoc;

/// Adds the two ways to authenticate that operations refer to.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut Document) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut bearer = Http::new(HttpAuthScheme::Bearer);
        bearer.description = Some(
            "The `session_token` of `POST /api/login`: valid until it expires or its login \
             session ends (logout, disconnect, heartbeat timeout)."
                .into(),
        );
        components.add_security_scheme("bearer", SecurityScheme::Http(bearer));
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Api-Key",
                "One of the route's configured `api_keys` (the business API is disabled, \
                 401 `api_disabled`, when none is configured).",
            ))),
        );
    }
}

/// `POST` operations whose JSON body may be left out (`#[utoipa::path]` marks every
/// body that is not an `Option` required, and an `Option` body would say `null` is valid).
const OPTIONAL_BODIES: [&str; 2] = [
    "/api/admin/users/{id}/kick",
    "/api/admin/users/{id}/connect",
];

/// Marks the bodies of [`OPTIONAL_BODIES`] optional.
struct OptionalBodies;

impl Modify for OptionalBodies {
    fn modify(&self, openapi: &mut Document) {
        for path in OPTIONAL_BODIES {
            let body = openapi
                .paths
                .paths
                .get_mut(path)
                .and_then(|item| item.post.as_mut())
                .and_then(|op| op.request_body.as_mut());
            match body {
                Some(RefOr::T(body)) => body.required = Some(Required::False),
                _ => debug_assert!(false, "no POST body documented inline for {path}"),
            }
        }
    }
}

/// The document as served, generated once.
static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    ApiDoc::openapi()
        .to_json()
        .expect("the OpenAPI document serializes")
});

/// This document.
///
/// The OpenAPI 3.1 description of this API, generated from the code.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "meta",
    responses(
        (status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object),
        (status = 503, description = "`overloaded` or `timeout`", body = ErrorBody),
    )
)]
pub async fn serve() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::state_with;
    use axum::{
        body::Body,
        http::{Request, StatusCode},
    };
    use cim_common::store::MemoryStore;
    use serde_json::Value;
    use std::{
        collections::{BTreeSet, HashSet},
        sync::Arc,
    };
    use tower::ServiceExt;

    /// The router's source: the routes are read from it, so a new endpoint without
    /// documentation fails [`every_route_is_documented`].
    const ROUTER_SOURCE: &str = include_str!("mod.rs");

    const METHODS: [&str; 8] = [
        "get", "post", "put", "delete", "patch", "head", "options", "trace",
    ];

    /// `(method, path)` of every `.route("path", get(..).post(..))` in `source`, tolerant of
    /// line breaks and of `axum::routing::get`-style paths.
    fn registered_routes(source: &str) -> BTreeSet<(String, String)> {
        let mut routes = BTreeSet::new();
        for (at, _) in source.match_indices(".route(") {
            let rest = source[at + ".route(".len()..].trim_start();
            let rest = rest
                .strip_prefix('"')
                .unwrap_or_else(|| panic!("a .route( without a literal path: {rest:.60}"));
            let end = rest.find('"').expect("unterminated path literal");
            let path = &rest[..end];
            // The method router: up to the `)` that closes `.route(`.
            let mut depth = 0usize;
            let mut word = String::new();
            let mut methods = Vec::new();
            for c in rest[end + 1..].chars() {
                match c {
                    '(' => {
                        if depth == 0 && METHODS.contains(&word.as_str()) {
                            methods.push(word.clone());
                        }
                        depth += 1;
                        word.clear();
                    }
                    ')' if depth == 0 => break,
                    ')' => {
                        depth -= 1;
                        word.clear();
                    }
                    c if c.is_alphanumeric() || c == '_' => word.push(c),
                    _ => word.clear(),
                }
            }
            assert!(!methods.is_empty(), "no method found for route {path}");
            for m in methods {
                routes.insert((m, path.to_string()));
            }
        }
        routes
    }

    fn document() -> Value {
        serde_json::from_str(&DOCUMENT).unwrap()
    }

    fn documented_routes(doc: &Value) -> BTreeSet<(String, String)> {
        let mut routes = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in METHODS {
                if item.get(method).is_some() {
                    routes.insert((method.to_string(), path.clone()));
                }
            }
        }
        routes
    }

    #[test]
    fn the_route_scan_understands_the_router_syntax() {
        let routes = registered_routes(
            r#"Router::new()
                .route("/a", get(x::a))
                .route(
                    "/b/{id}",
                    axum::routing::post(b).get(some::get_b),
                )
                .merge(other())"#,
        );
        let expected: BTreeSet<_> = [("get", "/a"), ("get", "/b/{id}"), ("post", "/b/{id}")]
            .into_iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(routes, expected);
    }

    #[test]
    fn every_route_is_documented() {
        let registered = registered_routes(ROUTER_SOURCE);
        assert!(
            registered.len() >= 29,
            "the scan of mod.rs found too few routes: {registered:?}"
        );
        assert!(registered.contains(&("get".into(), "/api/openapi.json".into())));
        let documented = documented_routes(&document());
        let undocumented: Vec<_> = registered.difference(&documented).collect();
        assert!(
            undocumented.is_empty(),
            "routes without OpenAPI documentation (add #[utoipa::path] and list them in \
             ApiDoc): {undocumented:?}"
        );
        let unrouted: Vec<_> = documented.difference(&registered).collect();
        assert!(
            unrouted.is_empty(),
            "documented but not routed: {unrouted:?}"
        );
    }

    #[test]
    fn document_is_complete() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["info"]["title"], "cim route API");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
        let schemes = &doc["components"]["securitySchemes"];
        assert_eq!(schemes["bearer"]["type"], "http");
        assert_eq!(schemes["bearer"]["scheme"], "bearer");
        assert_eq!(schemes["api_key"]["type"], "apiKey");
        assert_eq!(schemes["api_key"]["in"], "header");
        assert_eq!(schemes["api_key"]["name"], "X-Api-Key");
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let mut operation_ids = HashSet::new();

        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in METHODS {
                let Some(op) = item.get(method) else { continue };
                let what = format!("{} {path}", method.to_uppercase());
                assert!(op["summary"].is_string(), "{what}: no summary");
                let id = op["operationId"].as_str().unwrap();
                assert!(
                    operation_ids.insert(id),
                    "{what}: operationId {id} is taken"
                );
                assert!(op["description"].is_string(), "{what}: no description");
                // Every `{param}` of the path is a documented path parameter.
                let params: HashSet<(&str, &str)> = op["parameters"]
                    .as_array()
                    .map(|ps| {
                        ps.iter()
                            .map(|p| (p["name"].as_str().unwrap(), p["in"].as_str().unwrap()))
                            .collect()
                    })
                    .unwrap_or_default();
                for segment in path.split('/') {
                    if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}'))
                    {
                        assert!(
                            params.contains(&(name, "path")),
                            "{what}: no `{name}` parameter"
                        );
                    }
                }
                // A success, and every error in the one error shape.
                let responses = op["responses"].as_object().unwrap();
                assert!(
                    responses.keys().any(|s| s.starts_with('2')),
                    "{what}: no success response"
                );
                for (status, resp) in responses {
                    if status.starts_with('4') || status.starts_with('5') {
                        assert_eq!(
                            resp["content"]["application/json"]["schema"]["$ref"],
                            "#/components/schemas/ErrorBody",
                            "{what}: {status} is not an ErrorBody"
                        );
                    }
                }
                // Security names a defined scheme; the business API always needs a key.
                for requirement in op["security"].as_array().into_iter().flatten() {
                    for scheme in requirement.as_object().unwrap().keys() {
                        assert!(
                            schemes.get(scheme).is_some(),
                            "{what}: unknown scheme {scheme}"
                        );
                    }
                }
                if path.starts_with("/api/admin/") {
                    assert_eq!(
                        op["security"],
                        serde_json::json!([{"api_key": []}]),
                        "{what}"
                    );
                    assert!(responses.contains_key("401"), "{what}: no 401");
                }
            }
        }
        // Every referenced schema is defined.
        let text = doc.to_string();
        for (at, _) in text.match_indices("#/components/schemas/") {
            let name: String = text[at + "#/components/schemas/".len()..]
                .chars()
                .take_while(|&c| c != '"')
                .collect();
            assert!(schemas.contains_key(&name), "undefined schema {name}");
        }

        let join = &doc["paths"]["/api/channels/{name}/join"]["post"];
        let name = &join["parameters"][0];
        assert_eq!(
            (&name["name"], &name["in"]),
            (&"name".into(), &"path".into())
        );
        assert_eq!(name["required"], true);
        assert_eq!(join["security"], serde_json::json!([{"bearer": []}]));
        assert_eq!(
            doc["paths"]["/api/channels"]["get"]["security"],
            serde_json::json!([{"bearer": []}, {"api_key": []}])
        );
        assert!(doc["paths"]["/api/login"]["post"].get("security").is_none());
        let events = &doc["paths"]["/api/admin/events"]["get"]["responses"]["200"]["content"];
        assert!(events.get("text/event-stream").is_some(), "{events}");
        let register = &doc["paths"]["/api/register"]["post"];
        assert_eq!(
            register["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/Credentials"
        );
        assert!(register["responses"].get("201").is_some());
        let kick = &doc["paths"]["/api/admin/users/{id}/kick"]["post"]["requestBody"];
        assert_eq!(kick["required"], false, "{kick}");
        let connect = &doc["paths"]["/api/admin/users/{id}/connect"]["post"]["requestBody"];
        assert_eq!(connect["required"], false, "{connect}");
        let bulk = &doc["paths"]["/api/admin/users/bulk"]["post"];
        assert_eq!(
            bulk["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/BulkUsers"
        );
        assert_eq!(bulk["requestBody"]["required"], true, "{bulk}");
        assert_eq!(
            properties(&doc, "BulkUser"),
            (
                ["created", "name", "user_id"].map(String::from).into(),
                ["created", "name", "user_id"].map(String::from).into()
            )
        );
    }

    /// The property names of schema `name`, and which are required.
    fn properties(doc: &Value, name: &str) -> (BTreeSet<String>, BTreeSet<String>) {
        let schema = &doc["components"]["schemas"][name];
        let props = schema["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("no properties in {name}: {schema}"))
            .keys()
            .cloned()
            .collect();
        let required = schema["required"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        (props, required)
    }

    fn keys(v: &Value) -> BTreeSet<String> {
        v.as_object().unwrap().keys().cloned().collect()
    }

    /// The schema-only types describe what is really sent.
    #[tokio::test]
    async fn schema_only_types_match_the_real_json() {
        let doc = document();
        let resp = crate::error::error_response(
            StatusCode::CONFLICT,
            &crate::error::ErrorCode::NameTaken,
            "taken",
        );
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        let error: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(keys(&error), properties(&doc, "ErrorBody").0);
        assert_eq!(keys(&error["error"]), properties(&doc, "ErrorDetail").0);

        use cim_common::events::{PresenceEvent, PresenceKind, StoredEvent};
        let stored = StoredEvent {
            id: "1-0".into(),
            event: PresenceEvent {
                kind: PresenceKind::Offline,
                user_id: 7,
                name: "bob".into(),
                server_id: "server-a".into(),
                at_ms: 1,
                reason: "kicked".into(),
                message: None,
            },
        };
        let (props, required) = properties(&doc, "PresenceEvent");
        let offline = serde_json::to_value(crate::events::EventView::from(&stored)).unwrap();
        let mut offline_keys = keys(&offline);
        // `message` is only in message events (checked below).
        offline_keys.insert("message".to_string());
        assert_eq!(offline_keys, props);
        let online = StoredEvent {
            event: PresenceEvent {
                kind: PresenceKind::Online,
                reason: String::new(),
                ..stored.event.clone()
            },
            ..stored.clone()
        };
        let online = serde_json::to_value(crate::events::EventView::from(&online)).unwrap();
        assert_eq!(
            keys(&online),
            required,
            "`reason` and `message` are the only optional fields"
        );
        let message = StoredEvent {
            event: PresenceEvent {
                kind: PresenceKind::Message,
                reason: String::new(),
                message: Some(cim_common::events::MessageEvent {
                    id: "3-a".into(),
                    sender_id: 3,
                    sender_name: "alice".into(),
                    conversation_type: "user".into(),
                    conversation_id: 3,
                    kind: "MESSAGE_KIND_PRIVATE".into(),
                    log_seq: 1,
                    body: Some("hi".into()),
                }),
                ..stored.event.clone()
            },
            ..stored.clone()
        };
        let message = serde_json::to_value(crate::events::EventView::from(&message)).unwrap();
        let mut with_message = required.clone();
        with_message.insert("message".to_string());
        assert_eq!(keys(&message), with_message);
        assert_eq!(
            keys(&message["message"]),
            properties(&doc, "MessageEvent").0
        );
        let kinds = &doc["components"]["schemas"]["PresenceKind"]["enum"];
        assert_eq!(*kinds, serde_json::json!(["online", "offline", "message"]));
    }

    /// Asserts that `value` has every required property of `schema` (a `$ref` or inline
    /// schema of `doc`) and no undocumented one, recursively.
    fn assert_fits(doc: &Value, schema: &Value, value: &Value, at: &str) {
        let schema = match schema["$ref"].as_str() {
            Some(r) => &doc["components"]["schemas"][r.rsplit('/').next().unwrap()],
            None => schema,
        };
        if let (Some(props), Some(object)) = (schema["properties"].as_object(), value.as_object()) {
            for required in schema["required"].as_array().into_iter().flatten() {
                let name = required.as_str().unwrap();
                assert!(
                    object.contains_key(name),
                    "{at}: `{name}` is missing in {value}"
                );
            }
            for (name, v) in object {
                let prop = props
                    .get(name)
                    .unwrap_or_else(|| panic!("{at}: `{name}` is not documented"));
                assert_fits(doc, prop, v, &format!("{at}.{name}"));
            }
        }
        if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
            for v in array {
                assert_fits(doc, items, v, &format!("{at}[]"));
            }
        }
    }

    fn fits(doc: &Value, schema: &str, value: impl serde::Serialize) {
        let value = serde_json::to_value(value).unwrap();
        let reference = Value::String(format!("#/components/schemas/{schema}"));
        assert_fits(
            doc,
            &serde_json::json!({ "$ref": reference }),
            &value,
            schema,
        );
    }

    /// Responses whose fields are sometimes left out match their schemas both ways.
    #[test]
    fn optional_fields_are_documented_as_optional() {
        let doc = document();
        let logged_in = |hint, tls: Option<&str>| accounts::LoggedIn {
            user_id: 1,
            name: "alice".into(),
            server: accounts::ServerAddrs {
                id: "s".into(),
                tcp_addr: "t".into(),
                ws_addr: "w".into(),
                tls_addr: tls.map(|a| format!("{a}:9443")),
                wss_addr: tls.map(|a| format!("{a}:9444")),
            },
            connect_token: "c".into(),
            session_token: "s".into(),
            heartbeat_hint_ms: hint,
        };
        fits(&doc, "LoggedIn", logged_in(None, None));
        fits(&doc, "LoggedIn", logged_in(Some(30_000), None));
        fits(&doc, "LoggedIn", logged_in(None, Some("im.example.org")));
        let results = admin::AdminResults {
            results: vec![
                admin::AdminResult {
                    to: 2,
                    id: "m1".into(),
                    status: "delivered",
                    error: None,
                },
                admin::AdminResult {
                    to: 3,
                    id: String::new(),
                    status: "failed",
                    error: Some(admin::ErrorView {
                        code: crate::error::ErrorCode::UnknownUser,
                        message: "no such user".into(),
                    }),
                },
            ],
        };
        fits(&doc, "AdminResults", results);
        let page = presence::OnlinePage {
            users: vec![],
            next: None,
        };
        fits(&doc, "OnlinePage", page);
    }

    #[tokio::test]
    async fn served_at_api_openapi_json() {
        let (state, _tx) = state_with(Arc::new(MemoryStore::new()), vec![], |_| {});
        let req = Request::get("/api/openapi.json")
            .body(Body::empty())
            .unwrap();
        let resp = crate::api::app(state).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "application/json",
            "no auth needed, JSON"
        );
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 22)
            .await
            .unwrap();
        let served: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(served, document());
        assert!(served["paths"]["/api/login"]["post"].is_object());
    }
}
