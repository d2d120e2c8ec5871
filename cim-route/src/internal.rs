//! The internal API, served on its own listener (`internal_listen`): connection servers
//! forward the messages their clients sent, as protobuf, authenticated by the cluster secret.
//!
//! `POST /internal/forward`: `ForwardRequest` → `ForwardResponse`, `results[i]` answers
//! `items[i]`. Servers make this call over one cim-rpc connection per route
//! (`/internal/rpc`, see `cim_common::cluster::rpc`); the POST serves older callers and tools. The sender of each item is the one the server authenticated on its connection.
//! The request's `receipts` (acks of messages that asked for one) become RECEIPT messages to
//! their original senders.
//!
//! `GET /metrics` (open, no secret): the route's Prometheus metrics ([`crate::metrics`]).

use crate::{
    routing::{self, Outgoing},
    state::AppState,
};
use axum::{
    extract::{DefaultBodyLimit, Request, State},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};
use cim_common::{
    cluster::{self, rpc, Protobuf},
    pb::cluster::{ForwardRequest, ForwardResponse},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower_http::trace::TraceLayer;

/// Router of the internal listener: `/internal/forward` as an HTTP POST and over cim-rpc
/// connections (`/internal/rpc`, served in tasks of `tracker` until `cancel` fires), through
/// the same handler.
pub fn app(state: AppState, cancel: CancellationToken, tracker: TaskTracker) -> Router {
    let calls = Router::new().route("/internal/forward", post(forward));
    let rpc_calls = calls
        .clone()
        .layer(DefaultBodyLimit::max(cluster::MAX_BODY))
        .with_state(state.clone());
    calls
        .route(rpc::PATH, rpc::endpoint(rpc_calls, cancel, tracker))
        // Checked before the body is read: an unauthenticated caller cannot make us buffer
        // up to MAX_BODY bytes.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_secret,
        ))
        // Open, like the public `/healthz`: this listener is on a private network, and the
        // public one serves no metrics.
        .route("/metrics", get(metrics))
        .with_state(state)
        .layer(DefaultBodyLimit::max(cluster::MAX_BODY))
        .layer(TraceLayer::new_for_http())
}

/// This route's metrics and the process's (`crate::metrics`).
async fn metrics(State(state): State<AppState>) -> Response {
    cim_common::metrics::respond_sources(&[&state])
}

async fn require_secret(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match cluster::authorize(req.headers(), state.signer().keys()) {
        Ok(()) => next.run(req).await,
        Err(refusal) => refusal.into_response(),
    }
}

async fn forward(
    State(state): State<AppState>,
    Protobuf(req): Protobuf<ForwardRequest>,
) -> Protobuf<ForwardResponse> {
    // Read marks and typing frames are relayed beside the sends; their slots in the answer
    // are filled with an empty result (the server sends nothing back for them).
    let mut sends = Vec::with_capacity(req.items.len());
    let mut signals = Vec::new();
    let mut is_signal = Vec::with_capacity(req.items.len());
    for item in req.items {
        if let Some(mark) = item.read_mark {
            signals.push(routing::SignalItem::ReadMark(item.sender_id, mark));
            is_signal.push(true);
        } else if let Some(typing) = item.typing {
            signals.push(routing::SignalItem::Typing(
                item.sender_id,
                item.sender_name,
                typing,
            ));
            is_signal.push(true);
        } else {
            // A missing Send decodes as the default: kind UNSPECIFIED, answered as FAILED.
            sends.push(Outgoing::from_user(
                item.sender_id,
                item.sender_name,
                item.send.unwrap_or_default(),
            ));
            is_signal.push(false);
        }
    }
    let receipts = req.receipts;
    let (results, receipts_done, ()) = tokio::join!(
        routing::route_detached(&state, sends),
        async {
            if receipts.is_empty() {
                Vec::new()
            } else {
                routing::route_receipts(&state, receipts).await
            }
        },
        async {
            if !signals.is_empty() {
                routing::relay_signals(&state, signals).await
            }
        }
    );
    let mut results = results.into_iter();
    let results = is_signal
        .into_iter()
        .map(|signal| match signal {
            true => Default::default(),
            false => results.next().unwrap_or_default(),
        })
        .collect();
    Protobuf(ForwardResponse {
        results,
        receipts_done,
    })
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
        pb::{
            cluster::{AckedReceipt, ForwardItem},
            ErrorCode, MessageKind, Send, SendStatus,
        },
        store::{prelude::*, MemoryStore},
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
        let router = app(state, CancellationToken::new(), TaskTracker::new());
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
                    ..Default::default()
                },
                ForwardItem {
                    sender_id: alice,
                    sender_name: "alice".into(),
                    send: Some(send(12, MessageKind::Private, "nobody")),
                    ..Default::default()
                },
                ForwardItem {
                    sender_id: alice,
                    sender_name: "alice".into(),
                    send: None,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let resp = app(state, CancellationToken::new(), TaskTracker::new())
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
        assert_eq!(results[0].status, SendStatus::Stored as i32);
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

    #[tokio::test]
    async fn forwarded_receipts_reach_the_original_senders_inbox() {
        let store = Arc::new(MemoryStore::new());
        let alice = store.add_user("alice").await;
        let bob = store.add_user("bob").await;
        let (state, _tx) = state_with(store.clone(), vec![], |_| {});
        let acked_at = cim_common::time::now_ms();
        let receipt = |id: &str| AckedReceipt {
            message_id: id.into(),
            sender_id: alice,
            receiver_id: bob,
            receiver_name: "bob".into(),
            acked_at_ms: acked_at,
        };
        let req = ForwardRequest {
            server_id: "server-a".into(),
            // The same receipt twice (a retried forward) is stored once.
            receipts: vec![receipt("m1"), receipt("m1")],
            ..Default::default()
        };
        for _ in 0..2 {
            let resp = app(state.clone(), CancellationToken::new(), TaskTracker::new())
                .oneshot(request(Some(DEV_SECRET), req.encode_to_vec()))
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
        }
        let inbox = store.inbox_read(alice, 0, 10).await.unwrap();
        assert_eq!(inbox.len(), 1, "{inbox:?}");
        let r = &inbox[0];
        assert_eq!(r.kind(), MessageKind::Receipt);
        assert_eq!(r.receipt_for, "m1");
        assert_eq!((r.sender_id, r.sender_name.as_str()), (bob, "bob"));
        assert_eq!(r.receiver_id, alice);
        assert_eq!(r.timestamp_ms, acked_at);
        assert!(store.inbox_read(bob, 0, 10).await.unwrap().is_empty());
    }
}
