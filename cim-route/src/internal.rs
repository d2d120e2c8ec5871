//! The internal API, served on its own listener (`internal_listen`): connection servers
//! forward the messages their clients sent, as protobuf, authenticated by the cluster secret.
//!
//! `POST /internal/forward`: `ForwardRequest` → `ForwardResponse`, `results[i]` answers
//! `items[i]`. The sender of each item is the one the server authenticated on its connection.

use crate::{
    routing::{self, Outgoing},
    state::AppState,
};
use axum::{
    extract::{DefaultBodyLimit, Request, State},
    middleware::{self, Next},
    response::Response,
    routing::post,
    Router,
};
use cim_common::{
    cluster::{self, Protobuf},
    pb::cluster::{ForwardRequest, ForwardResponse},
};
use tower_http::trace::TraceLayer;

/// Router of the internal listener.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/internal/forward", post(forward))
        // Checked before the body is read: an unauthenticated caller cannot make us buffer
        // up to MAX_BODY bytes.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_secret,
        ))
        .with_state(state)
        .layer(DefaultBodyLimit::max(cluster::MAX_BODY))
        .layer(TraceLayer::new_for_http())
}

async fn require_secret(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if cluster::authorized(req.headers(), &state.config().cluster_secret) {
        next.run(req).await
    } else {
        cluster::unauthorized()
    }
}

async fn forward(
    State(state): State<AppState>,
    Protobuf(req): Protobuf<ForwardRequest>,
) -> Protobuf<ForwardResponse> {
    let items = req
        .items
        .into_iter()
        .map(|item| Outgoing {
            sender_id: item.sender_id,
            sender_name: item.sender_name,
            // A missing Send decodes as the default: kind UNSPECIFIED, answered as FAILED.
            send: item.send.unwrap_or_default(),
        })
        .collect();
    let results = routing::route_detached(&state, items).await;
    Protobuf(ForwardResponse { results })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{state_with, StoreExt};
    use axum::{
        body::Body,
        http::{header, Request, StatusCode},
    };
    use cim_common::{
        config::DEV_SECRET,
        pb::{cluster::ForwardItem, ErrorCode, MessageKind, Send, SendStatus},
        store::MemoryStore,
    };
    use prost::Message as _;
    use std::sync::Arc;
    use tower::ServiceExt;

    fn request(secret: Option<&str>, body: Vec<u8>) -> Request<Body> {
        let mut req =
            Request::post("/internal/forward").header(header::CONTENT_TYPE, cluster::CONTENT_TYPE);
        if let Some(s) = secret {
            req = req.header(cluster::SECRET_HEADER, s);
        }
        req.body(Body::from(body)).unwrap()
    }

    #[tokio::test]
    async fn forward_requires_the_cluster_secret() {
        let (state, _tx) = state_with(Arc::new(MemoryStore::new()), vec![], |_| {});
        let router = app(state);
        for secret in [None, Some("wrong-secret-wrong-secret")] {
            let resp = router
                .clone()
                .oneshot(request(secret, ForwardRequest::default().encode_to_vec()))
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        }
        let resp = router
            .oneshot(request(Some(DEV_SECRET), b"\xff\xff\xff".to_vec()))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "undecodable body");
    }

    #[tokio::test]
    async fn forward_answers_each_item_in_order() {
        let store = Arc::new(MemoryStore::new());
        let alice = store.add_user("alice").await;
        store.add_user("bob").await;
        let (state, _tx) = state_with(store, vec![], |_| {});
        let send = |client_id, kind: MessageKind, to: &str| Send {
            client_id,
            kind: kind as i32,
            to_user_name: to.into(),
            body: "hi".into(),
            ..Default::default()
        };
        let req = ForwardRequest {
            server_id: "server-a".into(),
            items: vec![
                ForwardItem {
                    sender_id: alice,
                    sender_name: "alice".into(),
                    send: Some(send(11, MessageKind::Private, "bob")),
                },
                ForwardItem {
                    sender_id: alice,
                    sender_name: "alice".into(),
                    send: Some(send(12, MessageKind::Private, "nobody")),
                },
                ForwardItem {
                    sender_id: alice,
                    sender_name: "alice".into(),
                    send: None,
                },
            ],
        };
        let resp = app(state)
            .oneshot(request(Some(DEV_SECRET), req.encode_to_vec()))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let results = ForwardResponse::decode(bytes).unwrap().results;
        assert_eq!(results.len(), 3);
        assert_eq!(results[0].client_id, 11);
        assert_eq!(results[0].status, SendStatus::Offline as i32);
        assert_eq!(results[1].client_id, 12);
        assert_eq!(
            results[1].error.as_ref().unwrap().code,
            ErrorCode::UnknownUser as i32
        );
        assert_eq!(results[2].status, SendStatus::Failed as i32);
        assert_eq!(
            results[2].error.as_ref().unwrap().code,
            ErrorCode::BadRequest as i32
        );
    }
}
