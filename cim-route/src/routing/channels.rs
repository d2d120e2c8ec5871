//! Channel messages: the senders' membership checked, then the channel's members paged
//! through, each page's online members pushed once per server ([`deliver_channels`]).

use super::{
    all_answered, failed,
    fanout::{fan_out_result, group_by_server, group_deliveries, ServerGroups},
    push::{count, push, remove_stale},
    unavailable, Accepted, LOOKUP_CONCURRENCY,
};
use crate::state::AppState;
use cim_common::{
    pb::{ErrorCode, Message, SendResult},
    registry::Members,
    store::{StoreError, StoreResult, MAX_CHANNEL_PAGE},
};
use futures_util::{future::join_all, stream, StreamExt};
use std::collections::{HashMap, HashSet};

/// The failed result of a channel message whose sender is not a member.
fn not_a_member(a: &Accepted) -> SendResult {
    failed(
        a.client_id,
        ErrorCode::Forbidden,
        format!(
            "not a member of channel {:?}: join it first",
            a.message.channel
        ),
    )
}

/// Channel messages: per channel (in order of first appearance), the senders' membership is
/// checked, then the members are paged through ([`MAX_CHANNEL_PAGE`] at a time, one member
/// page and ONE route `MGET` per page) and every page's online members get ONE push per
/// server with all of the channel's messages. A member is on exactly one page, so nobody gets
/// a message twice; the sender is skipped. Never stored: offline members do not get it later.
pub(super) async fn deliver_channels(
    state: &AppState,
    servers: &Members,
    run: &[&Accepted],
) -> Vec<SendResult> {
    let store = state.store();
    let mut results: Vec<Option<SendResult>> = vec![None; run.len()];

    // Membership of each distinct (channel, sender) that needs checking, concurrently.
    // (Owned keys: a stream of futures borrowing from `run` trips the compiler's
    // higher-ranked lifetime check once the whole routing future is spawned.)
    let checks: HashSet<(String, u64)> = run
        .iter()
        .filter(|a| a.check_member)
        .map(|a| (a.message.channel.clone(), a.message.sender_id))
        .collect();
    let member: HashMap<(String, u64), StoreResult<bool>> = stream::iter(checks)
        .map(|(channel, user)| async move {
            let is = store.channel_is_member(&channel, user).await;
            ((channel, user), is)
        })
        .buffer_unordered(LOOKUP_CONCURRENCY)
        .collect()
        .await;

    let mut channels: Vec<&str> = Vec::new();
    let mut per_channel: HashMap<&str, Vec<usize>> = HashMap::new();
    for (pos, a) in run.iter().enumerate() {
        if a.check_member {
            match member.get(&(a.message.channel.clone(), a.message.sender_id)) {
                Some(Ok(true)) => {}
                Some(Ok(false)) => {
                    results[pos] = Some(not_a_member(a));
                    continue;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "channel membership check failed");
                    results[pos] = Some(unavailable(a.client_id));
                    continue;
                }
                None => {
                    results[pos] = Some(unavailable(a.client_id));
                    continue;
                }
            }
        }
        let channel = a.message.channel.as_str();
        per_channel
            .entry(channel)
            .or_insert_with(|| {
                channels.push(channel);
                Vec::new()
            })
            .push(pos);
    }

    for channel in channels {
        let positions = &per_channel[channel];
        let messages: Vec<&Message> = positions.iter().map(|&p| &run[p].message).collect();
        let (counts, failure) = fan_out_channel(state, servers, channel, &messages).await;
        for (j, &p) in positions.iter().enumerate() {
            results[p] = Some(fan_out_result(run[p], counts[j], failure.as_ref()));
        }
    }
    all_answered(results)
}

/// Pushes `messages` to the online members of `channel`, page by page. Returns the number of
/// recipients of each message and the store failure that cut the fan-out short, if one did.
async fn fan_out_channel(
    state: &AppState,
    servers: &Members,
    channel: &str,
    messages: &[&Message],
) -> (Vec<u32>, Option<StoreError>) {
    let store = state.store();
    let mut counts = vec![0u32; messages.len()];
    let mut after = 0u64;
    // Member pages never repeat a user; `seen` only satisfies `group_by_server`.
    let mut seen: HashSet<u64> = HashSet::new();
    loop {
        let members = match store
            .channel_members(channel, after, MAX_CHANNEL_PAGE)
            .await
        {
            Ok(m) => m,
            Err(e) => return (counts, Some(e)),
        };
        let Some(&last) = members.last() else { break };
        let routes = match store.routes(&members).await {
            Ok(r) => r,
            Err(e) => return (counts, Some(e)),
        };
        seen.clear();
        let ServerGroups { per_server, stale } =
            group_by_server(servers, routes.into_iter().flatten(), &mut seen);
        let pushes = per_server.into_values().map(|(server, users)| {
            let (positions, deliveries) = group_deliveries(messages.iter().copied(), &users);
            async move {
                if deliveries.is_empty() {
                    return (positions, None);
                }
                (positions, push(state, server, deliveries).await)
            }
        });
        let (outcomes, ()) = tokio::join!(join_all(pushes), remove_stale(store, &stale));
        for (positions, results) in outcomes {
            let Some(results) = results else { continue };
            for (j, &p) in positions.iter().enumerate() {
                counts[p] = counts[p].saturating_add(count(results.get(j)));
            }
        }
        if members.len() < MAX_CHANNEL_PAGE {
            break;
        }
        after = last;
    }
    (counts, None)
}
