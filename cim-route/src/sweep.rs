//! Cleaning up after a connection server that disappeared without detaching its users (a
//! crash, a lost network): when the registry watch drops a server, its users' routes are
//! removed and an offline event with reason `server_lost` is published for each.
//!
//! Without this, a crashed server's users would look online (routes, online index, channel
//! online counts) until something stumbled on each stale route, and business backends would
//! never hear that they went offline. A server that shut down cleanly detached everyone
//! before leaving, so its sweep finds nothing.
//!
//! Every route instance sees the removal and sweeps; the store's compare-and-delete lets
//! exactly one of them remove each route and publish its event. The sweep walks the lost
//! server's own index of its users (`Routes::server_routes`: O(its users), not a SCAN of
//! every route), in the background.

use crate::state::AppState;
use cim_common::registry::Members;
use futures_util::{stream, StreamExt};
use std::collections::HashSet;
use tokio_util::sync::CancellationToken;

/// Stale routes removed at once.
const REMOVE_CONCURRENCY: usize = 32;

/// Ids in `before` that are not in `after`.
pub fn removed_servers(before: &Members, after: &Members) -> Vec<String> {
    let live: HashSet<&str> = after.iter().map(|s| s.id.as_str()).collect();
    before
        .iter()
        .filter(|s| !live.contains(s.id.as_str()))
        .map(|s| s.id.clone())
        .collect()
}

/// Watches the live servers until cancelled and sweeps every one that leaves.
pub async fn run(
    state: AppState,
    mut servers: cim_common::registry::MembersRx,
    cancel: CancellationToken,
) {
    let mut before = servers.borrow_and_update().clone();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = servers.changed() => if changed.is_err() { return },
        }
        let after = servers.borrow_and_update().clone();
        let gone = removed_servers(&before, &after);
        before = after;
        if gone.is_empty() {
            continue;
        }
        let state = state.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => {}
                _ = sweep(&state, &gone) => {}
            }
        });
    }
}

/// Removes every route that points at one of `gone` (still unchanged), publishing the
/// offline events. Returns how many routes this call removed or found stale.
pub async fn sweep(state: &AppState, gone: &[String]) -> usize {
    let store = state.store();
    let batch = state.config().scan_batch;
    let mut found = 0usize;
    for server in gone {
        let mut cursor = 0u64;
        loop {
            let (next, stale) = match store.server_routes(server, cursor, batch).await {
                Ok(step) => step,
                Err(e) => {
                    tracing::warn!(server = %server, error = %e, "sweeping a lost server's routes failed; the rest are removed when next used");
                    break;
                }
            };
            found += stale.len();
            stream::iter(stale)
                .for_each_concurrent(REMOVE_CONCURRENCY, |route| async move {
                    if let Err(e) = store.remove_stale_route(&route).await {
                        tracing::debug!(user_id = route.user_id, error = %e, "removing a stale route failed");
                    }
                })
                .await;
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    if found > 0 {
        tracing::info!(servers = ?gone, users = found, "swept the routes of lost servers");
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use cim_common::registry::ServiceInfo;
    use std::sync::Arc;

    fn members(ids: &[&str]) -> Members {
        Arc::new(
            ids.iter()
                .map(|id| ServiceInfo {
                    id: (*id).to_string(),
                    ..Default::default()
                })
                .collect(),
        )
    }

    #[test]
    fn finds_the_servers_that_left() {
        assert_eq!(
            removed_servers(&members(&["a", "b", "c"]), &members(&["a", "c", "d"])),
            vec!["b".to_string()]
        );
        assert!(removed_servers(&members(&["a"]), &members(&["a", "b"])).is_empty());
        assert!(removed_servers(&members(&[]), &members(&[])).is_empty());
    }
}
