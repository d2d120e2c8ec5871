//! The push call to a connection server (`/internal/push`, timed into
//! `cim_route_push_call_seconds`), how many recipients a push reached, and the best-effort
//! removal of routes found pointing at dead servers.

use crate::state::AppState;
use cim_common::{
    pb::cluster::{Delivery, DeliveryResult, PushRequest, PushResponse},
    registry::ServiceInfo,
    store::{RouteEntry, RouteStore},
};
use futures_util::future::join_all;

/// Path of the connection servers' push endpoint.
pub const PUSH_PATH: &str = "/internal/push";

/// One push call; `None` when it failed (logged: its recipients count as not delivered).
pub(super) async fn push(
    state: &AppState,
    server: &ServiceInfo,
    deliveries: Vec<Delivery>,
) -> Option<Vec<DeliveryResult>> {
    if server.internal_addr.is_empty() {
        tracing::warn!(server = %server.id, "live server advertises no internal address");
        return None;
    }
    let req = PushRequest { deliveries };
    let started = std::time::Instant::now();
    let answer = state
        .cluster()
        .call::<_, PushResponse>(&server.internal_addr, PUSH_PATH, &req)
        .await;
    state
        .metrics()
        .push_call_seconds
        .observe(started.elapsed().as_secs_f64());
    match answer {
        Ok(resp) => Some(resp.results),
        Err(e) => {
            tracing::warn!(server = %server.id, error = %e, "push failed; its recipients count as offline");
            None
        }
    }
}

/// Removes routes found pointing at dead servers. Best effort: a failure only leaves a
/// stale route that the next lookup skips again.
pub(super) async fn remove_stale(store: &dyn RouteStore, stale: &[RouteEntry]) {
    join_all(stale.iter().map(|route| async move {
        if let Err(e) = store.remove_stale_route(route).await {
            tracing::debug!(user_id = route.user_id, error = %e, "removing a stale route failed");
        }
    }))
    .await;
}

/// Number of recipients a server accepted, saturating.
pub(super) fn count(result: Option<&DeliveryResult>) -> u32 {
    result.map_or(0, |r| u32::try_from(r.delivered.len()).unwrap_or(u32::MAX))
}
