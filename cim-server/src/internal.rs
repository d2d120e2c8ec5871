//! The internal API that routes call (axum, on the internal listener): pushes of messages to
//! connected users and kicks. Every `/internal/*` call must carry the cluster secret; the
//! check runs before the body is read. Routes make these calls over one cim-rpc connection
//! each (`/internal/rpc`, an upgrade checked by the same secret); the HTTP POSTs stay for
//! callers of an older version and for tools. `/healthz` is open (for load balancers and probes, and
//! `cim-bench`, which reads the process's memory and CPU time from it), and so is `/metrics`
//! (Prometheus; see `crate::metrics`).

use crate::{
    conn::Outbound,
    pb::{
        cluster::{
            ConnectedUser, KickRequest, KickResponse, PresenceRequest, PresenceResponse,
            PushRequest, PushResponse, SignalRequest, SignalResponse,
        },
        frame::Body,
        Frame, Kick, KickReason,
    },
    server::ServerState,
};
use axum::{
    extract::{DefaultBodyLimit, Request, State},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use cim_common::cluster::{authorize, rpc, Protobuf, MAX_BODY};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::{error, info};

type AppState = Arc<ServerState>;

/// The internal API's routes. The calls are served both as HTTP POSTs and over cim-rpc
/// connections ([`rpc::endpoint`]), through the same handlers.
pub(crate) fn router(state: AppState, tracker: TaskTracker) -> Router {
    let calls = Router::new()
        .route("/internal/push", post(push))
        .route("/internal/kick", post(kick))
        .route("/internal/presence", post(presence))
        .route("/internal/signal", post(signal));
    let rpc_calls = calls
        .clone()
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state.clone());
    let internal = calls
        .route(
            rpc::PATH,
            rpc::endpoint(rpc_calls, state.cancel.clone(), tracker),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_secret,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(internal)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Serves the internal API until the server shuts down; cim-rpc connections are served in
/// tasks of `tracker` (the server's, which its shutdown waits for).
pub(crate) async fn serve(state: AppState, listener: TcpListener, tracker: TaskTracker) {
    let cancel = state.cancel.clone();
    let app = router(state, tracker);
    if let Err(e) = axum::serve(cim_common::cluster::without_nagle(listener), app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
    {
        error!(error = %e, "internal API stopped");
    }
}

async fn require_secret(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match authorize(req.headers(), state.signer.keys()) {
        Ok(()) => next.run(req).await,
        Err(refusal) => refusal.into_response(),
    }
}

/// Queues the deliveries on the connections here ([`crate::push::deliver`]).
async fn push(
    State(state): State<AppState>,
    Protobuf(request): Protobuf<PushRequest>,
) -> Protobuf<PushResponse> {
    check_memberships(&state, &request.deliveries).await;
    Protobuf(PushResponse {
        results: crate::push::deliver(&state.table, request.deliveries),
    })
}

/// Typing and read-mark frames to users here (never stored: a user not connected here is
/// skipped).
async fn signal(
    State(state): State<AppState>,
    Protobuf(request): Protobuf<SignalRequest>,
) -> Protobuf<SignalResponse> {
    Protobuf(SignalResponse {
        delivered: crate::push::signal(&state.table, request.signals),
    })
}

/// For group messages of a membership version this server has not seen: checks the
/// group's subscribers here against the store before they are delivered (see
/// `crate::groups`). A failed check delivers as subscribed (logged): the REMOVED event
/// unsubscribes soon after.
async fn check_memberships(state: &AppState, deliveries: &[crate::pb::cluster::Delivery]) {
    let mut stale: Vec<(u64, u64)> = Vec::new();
    for d in deliveries {
        if d.group_id != 0 && state.table.groups.stale(d.group_id, d.group_version) {
            match stale.iter_mut().find(|(g, _)| *g == d.group_id) {
                Some(at) => at.1 = at.1.max(d.group_version),
                None => stale.push((d.group_id, d.group_version)),
            }
        }
    }
    for (group, version) in stale {
        let users = state.table.groups.members(group, 0);
        match state.store.group_check(group, &users).await {
            Ok((now, members)) => {
                let gone: Vec<u64> = users
                    .iter()
                    .zip(&members)
                    .filter(|(_, m)| !**m)
                    .map(|(u, _)| *u)
                    .collect();
                state.table.groups.checked(group, now.max(version), &gone);
            }
            Err(e) => tracing::warn!(group, error = %e, "checking a group's members failed"),
        }
    }
}

/// Most users one presence call may ask about.
const MAX_PRESENCE_USERS: usize = 10_000;

/// Which of the listed users have a logged-in connection here (and its login session), and
/// how many logged-in connections there are.
async fn presence(
    State(state): State<AppState>,
    Protobuf(request): Protobuf<PresenceRequest>,
) -> Protobuf<PresenceResponse> {
    let connected = request
        .user_ids
        .into_iter()
        .take(MAX_PRESENCE_USERS)
        .filter_map(|user_id| {
            let conn = state.table.get(user_id)?;
            Some(ConnectedUser {
                user_id,
                session: conn.session.clone(),
            })
        })
        .collect();
    Protobuf(PresenceResponse {
        connected,
        online: state.table.len() as u64,
    })
}

/// Sends the Kick and closes each listed user's connection (only the given login session's,
/// when `session` is set).
async fn kick(
    State(state): State<AppState>,
    Protobuf(request): Protobuf<KickRequest>,
) -> Protobuf<KickResponse> {
    let kick = request.kick.unwrap_or_else(|| Kick {
        reason: KickReason::Admin as i32,
        message: "disconnected by the server".into(),
    });
    let reason = KickReason::try_from(kick.reason).unwrap_or(KickReason::Unspecified);
    let frame = Outbound::new(Frame::new(Body::Kick(kick)));
    let mut kicked = Vec::new();
    for user_id in request.user_ids {
        let conn = if request.session.is_empty() {
            state.table.get(user_id)
        } else {
            // A session ended by a route (logout, a login that replaces it) stays ended
            // even if its connection has not entered the table yet.
            state.table.end_session(user_id, &request.session)
        };
        let Some(conn) = conn else {
            continue;
        };
        if conn.close(frame.clone(), reason, true) {
            kicked.push(user_id);
        }
    }
    if !kicked.is_empty() {
        info!(
            count = kicked.len(),
            reason = reason.as_str_name(),
            "kicked connections"
        );
    }
    Protobuf(KickResponse { kicked })
}

/// This server's metrics and the process's, in the OpenMetrics text format (open, like
/// `/healthz`: the internal listener is on a private network).
async fn metrics(State(state): State<AppState>) -> Response {
    cim_common::metrics::respond_sources(&[state.as_ref()])
}

/// Liveness plus what a load generator needs to compute memory per connection and CPU per
/// message from two readings: open connections, pid (servers sharing one process are counted
/// once), resident memory and CPU time of the process (`null` where `/proc` cannot tell).
async fn healthz(State(state): State<AppState>) -> Json<serde_json::Value> {
    let usage = cim_common::procinfo::self_usage();
    Json(serde_json::json!({
        "status": "ok",
        "id": state.id,
        "connections": state.admission.open(),
        "pending_logins": state.admission.pending(),
        "pid": std::process::id(),
        "rss_bytes": usage.map(|u| u.rss_bytes),
        "cpu_ms": usage.map(|u| u.cpu_ms),
    }))
}
