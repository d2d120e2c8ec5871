//! Messages of stored groups (GROUP_CHAT, and the GROUP_EVENT of every membership change):
//! appended once to the group's log ([`deliver_group_chat`]: one store round trip for a
//! run, whatever the member count), then ONE push per live server carrying the group id
//! ([`push_group`]); each server hands the message to its connections subscribed to that
//! group. Nothing per member is read or written on the message path: Redis does O(1) work
//! per message, the servers O(their subscribers). Members who are offline catch up from
//! their position at their next connection (`cim_server::session`), so a push that fails
//! loses nothing.

use super::{accepted_result, failed, Accepted};
use crate::state::AppState;
use cim_common::{
    pb::{cluster::Delivery, ErrorCode, Message, SendResult, SendStatus},
    registry::Members,
    store::GroupAppend,
};
use futures_util::future::join_all;

/// Pushes stored group messages (each with the membership version it was appended under)
/// to every live server, one call per server for all of them. Returns, per message, how many
/// connections took it.
pub(crate) async fn push_group(
    state: &AppState,
    servers: &Members,
    messages: &[(Message, u64)],
) -> Vec<u32> {
    if messages.is_empty() {
        return Vec::new();
    }
    let deliveries: Vec<Delivery> = messages
        .iter()
        .map(|(m, version)| Delivery {
            message: Some(m.clone()),
            recipients: Vec::new(),
            everyone: false,
            group_id: m.group_id,
            group_version: *version,
        })
        .collect();
    let outcomes = join_all(
        servers
            .iter()
            .map(|server| super::push::push(state, server, deliveries.clone())),
    )
    .await;
    let mut counts = vec![0u32; messages.len()];
    for results in outcomes.into_iter().flatten() {
        for (n, result) in counts.iter_mut().zip(&results) {
            *n = n.saturating_add(u32::try_from(result.count).unwrap_or(u32::MAX));
        }
    }
    counts
}

/// A run of one sender's GROUP_CHAT messages: appended in one round trip (the store checks
/// that the sender is a member), then pushed. A repeat (a retried send whose first attempt
/// was stored) is answered DELIVERED with `repeat` and not pushed again.
pub(super) async fn deliver_group_chat(
    state: &AppState,
    servers: &Members,
    run: &[Accepted],
) -> Vec<SendResult> {
    let mut messages: Vec<Message> = run.iter().map(|a| a.message.clone()).collect();
    let outcomes = match state.store().group_append(&mut messages).await {
        Ok(outcomes) if outcomes.len() == run.len() => outcomes,
        Ok(_) | Err(_) => {
            tracing::warn!("appending group messages failed");
            return run
                .iter()
                .map(|a| super::unavailable(a.client_id))
                .collect();
        }
    };
    let mut fresh: Vec<(usize, (Message, u64))> = Vec::new();
    let mut results: Vec<Option<SendResult>> = vec![None; run.len()];
    for (i, (outcome, message)) in outcomes.iter().zip(messages).enumerate() {
        let a = &run[i];
        match *outcome {
            GroupAppend::NotMember => {
                results[i] = Some(failed(
                    a.client_id,
                    ErrorCode::Forbidden,
                    format!("not a member of group {}", a.message.group_id),
                ))
            }
            GroupAppend::NoGroup => {
                results[i] = Some(failed(
                    a.client_id,
                    ErrorCode::BadRequest,
                    format!("no group {}", a.message.group_id),
                ))
            }
            GroupAppend::Appended { repeat: true, .. } => {
                let mut r = accepted_result(a, SendStatus::Delivered, 0);
                r.timestamp_ms = message.timestamp_ms;
                r.repeat = true;
                r.log_seq = message.log_seq;
                results[i] = Some(r);
            }
            GroupAppend::Appended { version, .. } => fresh.push((i, (message, version))),
        }
    }
    let pushed: Vec<(Message, u64)> = fresh.iter().map(|(_, p)| p.clone()).collect();
    let counts = push_group(state, servers, &pushed).await;
    super::offline::group_offline(state, pushed.into_iter().map(|(m, _)| m).collect());
    for ((i, (message, _)), n) in fresh.into_iter().zip(counts) {
        let mut r = accepted_result(&run[i], SendStatus::Delivered, n);
        r.log_seq = message.log_seq;
        results[i] = Some(r);
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| failed(0, ErrorCode::Internal, "message was not routed")))
        .collect()
}
