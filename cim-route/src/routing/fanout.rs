//! What the fan-outs (group and channel) share: the pure CPU steps of a channel page
//! ([`group_by_server`], [`group_deliveries`], public for `benches/fanout.rs`) and the
//! result a fan-out message answers ([`fan_out_result`]).

use super::{accepted_result, Accepted};
use crate::state::live_server;
use cim_common::{
    pb::{cluster::Delivery, Error, ErrorCode, Message, SendResult, SendStatus},
    registry::{Members, ServiceInfo},
    store::{RouteEntry, StoreError},
};
use std::collections::{BTreeMap, HashSet};

/// One fan-out step's recipients, grouped by the live server that holds their connection.
#[derive(Debug, Default)]
pub struct ServerGroups<'a> {
    /// Per live server, in server id order: the server and its users, in route order.
    pub per_server: BTreeMap<&'a str, (&'a ServiceInfo, Vec<u64>)>,
    /// Routes that point at servers no longer live (to remove, best effort).
    pub stale: Vec<RouteEntry>,
}

/// Groups `routes` by live server (from the `servers` snapshot). Users already in `seen` are
/// skipped and every other user is added to it, so a user met twice gets one delivery per
/// fan-out. Pure (no I/O): the channel fan-out's per-page CPU work, which the `fanout`
/// benchmark measures.
pub fn group_by_server<'a>(
    servers: &'a Members,
    routes: impl IntoIterator<Item = RouteEntry>,
    seen: &mut HashSet<u64>,
) -> ServerGroups<'a> {
    let mut groups = ServerGroups::default();
    for route in routes {
        if !seen.insert(route.user_id) {
            continue;
        }
        match live_server(servers, &route.server_id) {
            Some(server) => groups
                .per_server
                .entry(server.id.as_str())
                .or_insert_with(|| (server, Vec::new()))
                .1
                .push(route.user_id),
            None => groups.stale.push(route),
        }
    }
    groups
}

/// The deliveries of one push to a server holding `users`: one per message, to every user
/// there except its sender (a group message never goes back to who sent it). Messages with
/// no recipient left are skipped; `positions[j]` is the index in `messages` of
/// `deliveries[j]`, to map the push's results back.
pub fn group_deliveries<'m>(
    messages: impl IntoIterator<Item = &'m Message>,
    users: &[u64],
) -> (Vec<usize>, Vec<Delivery>) {
    let mut positions = Vec::new();
    let mut deliveries = Vec::new();
    for (p, message) in messages.into_iter().enumerate() {
        let recipients: Vec<u64> = users
            .iter()
            .copied()
            .filter(|&u| u != message.sender_id)
            .collect();
        if !recipients.is_empty() {
            positions.push(p);
            deliveries.push(Delivery {
                message: Some(message.clone()),
                recipients,
                everyone: false,
                ..Default::default()
            });
        }
    }
    (positions, deliveries)
}

/// The result of a fan-out (group or channel) message that reached `n` users, or was cut
/// short by `failure`.
pub(super) fn fan_out_result(a: &Accepted, n: u32, failure: Option<&StoreError>) -> SendResult {
    let Some(e) = failure else {
        return accepted_result(a, SendStatus::Delivered, n);
    };
    tracing::warn!(error = %e, delivered = n, "fan-out interrupted");
    // Tell the sender how far it got: the id is set only if someone got it.
    let mut r = accepted_result(a, SendStatus::Failed, n);
    if n == 0 {
        r.message_id.clear();
        r.timestamp_ms = 0;
    }
    r.error = Some(Error {
        code: ErrorCode::Unavailable as i32,
        message: format!("state store unavailable during the fan-out (delivered to {n} users)"),
    });
    r
}
