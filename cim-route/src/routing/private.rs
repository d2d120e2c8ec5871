//! Private messages (and receipts, which travel as private messages): stored in their
//! receivers' inboxes first, then pushed to the servers holding the receivers, with the
//! route lookup in the store's round trip ([`deliver_private`]).

use super::{
    accepted_result,
    push::{push, remove_stale},
    unavailable, Accepted,
};
use crate::state::{live_server, AppState};
use cim_common::{
    pb::{cluster::Delivery, Message, SendResult, SendStatus},
    registry::{Members, ServiceInfo},
};
use futures_util::future::join_all;
use std::collections::{BTreeMap, HashMap};

/// Stores a run of private messages in their receivers' inboxes, then pushes them to the
/// receivers' servers. The route lookup goes in the store's round trip, after it.
pub(super) async fn deliver_private(
    state: &AppState,
    servers: &Members,
    run: &[Accepted],
) -> Vec<SendResult> {
    let mut ids: Vec<u64> = run.iter().map(|a| a.message.receiver_id).collect();
    ids.sort_unstable();
    ids.dedup();
    // Copies that get their log and inbox seqs; they are what the pushes carry.
    let mut messages: Vec<Message> = run.iter().map(|a| a.message.clone()).collect();
    // History first: the conversation's log gives each message its `log_seq` (a retry gets
    // the first attempt's copy back), which the inbox copy then carries, so what is
    // replayed names its place in the conversation as what was pushed live does. One round
    // trip for the run (one script per conversation, one list update per participant).
    if let Err(e) = state.store().private_append(&mut messages).await {
        tracing::warn!(error = %e, "appending messages to their conversations failed");
        return run.iter().map(|a| unavailable(a.client_id)).collect();
    }
    // The store before the lookup, in one round trip: a login that attaches in between is
    // either found by the lookup (the push reaches it) or has the message at or below the
    // inbox top its session reads first (its replay has it). No message falls between replay
    // and live delivery (see `cim_server::session`).
    let started = std::time::Instant::now();
    let (stored, routes) = state
        .store()
        .inbox_store_then_routes(&mut messages, &ids)
        .await;
    state
        .metrics()
        .inbox_store_seconds
        .observe(started.elapsed().as_secs_f64());
    if let Err(e) = stored {
        tracing::warn!(error = %e, "storing messages failed");
        return run.iter().map(|a| unavailable(a.client_id)).collect();
    }
    // Stored: from here on the messages are accepted whatever happens to the pushes.
    let routes = routes.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "route lookup failed: the messages wait in the inboxes");
        Vec::new()
    });
    let mut live: HashMap<u64, &ServiceInfo> = HashMap::new();
    let mut stale = Vec::new();
    for route in routes.into_iter().flatten() {
        match live_server(servers, &route.server_id) {
            Some(server) => {
                live.insert(route.user_id, server);
            }
            None => stale.push(route),
        }
    }

    // Per server: the positions in `run` of its deliveries, in order.
    let mut per_server: BTreeMap<&str, (&ServiceInfo, Vec<usize>)> = BTreeMap::new();
    for (pos, a) in run.iter().enumerate() {
        if let Some(server) = live.get(&a.message.receiver_id) {
            per_server
                .entry(server.id.as_str())
                .or_insert_with(|| (server, Vec::new()))
                .1
                .push(pos);
        }
    }
    // A retry answers with the first attempt's timestamp (the stored copy's); the copies
    // themselves move into the pushes.
    let timestamps: Vec<(i64, u64)> = messages
        .iter()
        .map(|m| (m.timestamp_ms, m.log_seq))
        .collect();
    let mut messages: Vec<Option<Message>> = messages.into_iter().map(Some).collect();
    let pushes: Vec<_> = per_server
        .into_values()
        .map(|(server, positions)| {
            let deliveries = positions
                .iter()
                .filter_map(|&p| messages[p].take())
                .map(|message| Delivery {
                    recipients: vec![message.receiver_id],
                    message: Some(message),
                    everyone: false,
                    ..Default::default()
                })
                .collect();
            async move { (positions, push(state, server, deliveries).await) }
        })
        .collect();
    let (outcomes, ()) = tokio::join!(join_all(pushes), remove_stale(state.store(), &stale));

    let mut delivered = vec![false; run.len()];
    for (positions, results) in outcomes {
        let Some(results) = results else { continue };
        for (j, &p) in positions.iter().enumerate() {
            let receiver = run[p].message.receiver_id;
            delivered[p] = results
                .get(j)
                .is_some_and(|r| r.delivered.contains(&receiver));
        }
    }
    if state.config().message_events {
        // Stored for receivers the push did not reach: the offline-push hook.
        let offline: Vec<Message> = run
            .iter()
            .zip(&delivered)
            .zip(&timestamps)
            .filter(|((_, d), _)| !**d)
            .map(|((a, _), &(_, log_seq))| Message {
                log_seq,
                ..a.message.clone()
            })
            .collect();
        super::offline::private_offline(state, &offline).await;
    }
    run.iter()
        .zip(timestamps)
        .zip(delivered)
        .map(|((a, (timestamp_ms, log_seq)), d)| {
            let mut r = if d {
                accepted_result(a, SendStatus::Delivered, 1)
            } else {
                accepted_result(a, SendStatus::Stored, 0)
            };
            r.timestamp_ms = timestamp_ms;
            r.log_seq = log_seq;
            r
        })
        .collect()
}
