//! Message routing, in one place: the public HTTP endpoints and `/internal/forward` (sends
//! that clients made over their server connections) both call [`route_batch`].
//!
//! Round trips per batch:
//! - private: one lookup per distinct receiver the route does not know yet (does the user
//!   exist; see [`crate::known_users`]), then ONE pipelined inbox store of all messages
//!   together with ONE `MGET` of all receivers' routes, then ONE push per connection server
//!   holding receivers (concurrently). A message is in its receiver's inbox before any push
//!   leaves; a receiver that is not connected (or whose push fails) gets it when it connects
//!   next (`SendStatus::Stored`);
//! - group (everyone online but the sender): ONE `everyone` push per live server, no lookup;
//! - channel: per page of members, ONE `MGET` and ONE push per server holding recipients of
//!   that page. Never a request per recipient, never `KEYS`;
//! - group and channel messages that came with an id are first claimed, ONE pipelined round
//!   trip for the run, so that a retry is answered instead of delivered twice
//!   ([`claims`]).
//!
//! A route counts only while its server is live in the registry watch; a route pointing at
//! a dead server is removed (compare-and-delete, best effort) when routing stumbles on it.
//!
//! Where each step lives, one module per delivery kind:
//! - this module: the entry points ([`route_batch`], [`route_detached`]), what a message
//!   becomes once accepted (id, timestamp, sender name) and the phases that keep each
//!   sender's runs in order while senders go side by side (`phases`);
//! - [`validate`]: the checks that need no backend, and receiver resolution;
//! - [`private`]: private messages, stored in the inbox then pushed;
//! - [`receipts`]: read receipts of acked messages, delivered as private messages;
//! - [`claims`]: broadcast ids claimed before a group or channel message goes out;
//! - [`group`]: group messages (one `everyone` push per live server);
//! - [`channels`]: channel messages (membership, then the members page by page);
//! - [`fanout`]: the fan-outs' shared steps; its pure CPU steps, [`group_by_server`] and
//!   [`group_deliveries`], are public so that `benches/fanout.rs` measures the code routing
//!   runs, not a copy of it;
//! - [`push`]: the push call to a connection server, and removing stale routes.

mod channels;
mod claims;
mod fanout;
mod group;
mod group_chat;
mod offline;
mod private;
mod push;
mod receipts;
mod signals;
#[cfg(test)]
mod tests;
mod validate;

pub use claims::BROADCAST_CLAIM_TTL;
pub use fanout::{group_by_server, group_deliveries, ServerGroups};
pub(crate) use group_chat::push_group;
pub use push::PUSH_PATH;
pub use receipts::route_receipts;
pub use signals::{relay_read_mark, relay_signals, SignalItem, SIGNAL_PATH};

use crate::state::AppState;
use cim_common::{
    pb::{ErrorCode, Message, Send, SendResult, SendStatus},
    time::now_ms,
};
use cim_proto::ids;
use claims::deliver_broadcasts;
use futures_util::future::join_all;
use private::deliver_private;
use std::collections::{HashMap, HashSet};
use validate::{resolve_receivers, validate, Receiver};

/// Receiver lookups of one batch in flight at once (they share one Redis connection).
const LOOKUP_CONCURRENCY: usize = 32;

/// One message to route, with its authenticated sender (from a session token or from the
/// server connection it arrived on; never from the message itself).
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// 0: the system (only from the business API).
    pub sender_id: u64,
    pub sender_name: String,
    pub send: Send,
    /// Sent through the business API (API key): may be from the system (sender 0, kind
    /// SYSTEM) and may send to a channel the sender is not a member of. False for everything
    /// a user sends (connection or bearer).
    pub backend: bool,
}

impl Outgoing {
    /// A message from a user (over a connection or with a bearer token).
    pub fn from_user(sender_id: u64, sender_name: String, send: Send) -> Self {
        Self {
            sender_id,
            sender_name,
            send,
            backend: false,
        }
    }
}

/// Sender name of system messages.
pub const SYSTEM_SENDER_NAME: &str = "system";

/// How a message is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// To one receiver, stored in their inbox first (PRIVATE, and SYSTEM to a user).
    Private,
    /// To everyone online but the sender (GROUP, and SYSTEM without a receiver).
    Group,
    /// To the online members of a channel but the sender (CHANNEL).
    Channel,
    /// To a stored group: appended to its log once, pushed to its members online
    /// (GROUP_CHAT).
    GroupChat,
}

/// A message accepted for delivery: it has an id and a timestamp.
struct Accepted {
    index: usize,
    client_id: u64,
    kind: Kind,
    /// Channel messages from users: the sender must be a member (checked at delivery).
    check_member: bool,
    /// A group or channel message whose id came with it (the client's, or the one its
    /// server assigned before forwarding): it may be a retry, so it is claimed before it is
    /// delivered ([`claims::deliver_broadcasts`]). An id the route just made up cannot repeat.
    claim: bool,
    message: Message,
}

fn failed(client_id: u64, code: ErrorCode, message: impl Into<String>) -> SendResult {
    SendResult::failed(client_id, code, message)
}

fn unavailable(client_id: u64) -> SendResult {
    failed(
        client_id,
        ErrorCode::Unavailable,
        "state store unavailable, retry later",
    )
}

/// The results of a batch whose every slot was filled; a slot left empty (a bug) answers
/// INTERNAL rather than dropping its item's answer.
fn all_answered(results: Vec<Option<SendResult>>) -> Vec<SendResult> {
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| failed(0, ErrorCode::Internal, "message was not routed")))
        .collect()
}

fn accepted_result(a: &Accepted, status: SendStatus, delivered: u32) -> SendResult {
    SendResult {
        client_id: a.client_id,
        status: status as i32,
        message_id: a.message.id.clone(),
        timestamp_ms: a.message.timestamp_ms,
        delivered,
        ..Default::default()
    }
}

/// Routes a batch; `results[i]` answers `items[i]`. Validation failures, unknown receivers
/// and backend errors are per-item `FAILED` results, never an error of the whole batch.
pub async fn route_batch(state: &AppState, items: Vec<Outgoing>) -> Vec<SendResult> {
    // One snapshot of the live servers for the whole batch, so its decisions agree.
    let servers = state.servers();
    let config = state.config();
    let mut results: Vec<Option<SendResult>> = vec![None; items.len()];
    // Kind of each item, for `cim_route_messages_total` (the items move on).
    let kinds: Vec<u8> = items
        .iter()
        .map(|i| crate::metrics::kind_index(i.send.kind) as u8)
        .collect();

    let mut valid = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        match validate(index, item, config.max_message_len, config.max_name_len) {
            Ok(v) => valid.push(v),
            Err(r) => results[index] = Some(r),
        }
    }

    let receivers: HashSet<Receiver> = valid.iter().filter_map(|v| v.receiver.clone()).collect();
    let resolved = resolve_receivers(state.store(), state.known_users(), receivers).await;

    let mut accepted = Vec::with_capacity(valid.len());
    for v in valid {
        let client_id = v.item.send.client_id;
        let receiver_id = match &v.receiver {
            None => 0,
            Some(r) => match resolved.get(r) {
                Some(Some(Some(id))) => *id,
                Some(Some(None)) => {
                    let what = match r {
                        Receiver::Id(id) => format!("no user with id {id}"),
                        Receiver::Name(name) => format!("no user named {name:?}"),
                    };
                    results[v.index] = Some(failed(client_id, ErrorCode::UnknownUser, what));
                    continue;
                }
                Some(None) | None => {
                    results[v.index] = Some(unavailable(client_id));
                    continue;
                }
            },
        };
        let send = v.item.send;
        // A client-chosen id is unique only among its sender's messages: scoped by the
        // sender, two senders picking the same id can never make one message pass for the
        // other (the inbox stores once per id). It cannot collide with a bare ULID or a
        // receipt id either (those have no '-' / start with a letter). The system's scope
        // is `sys`.
        let id = match (send.message_id.is_empty(), v.item.sender_id) {
            (true, _) => ids::message_id(),
            (false, 0) => format!("sys-{}", send.message_id),
            (false, sender) => format!("{sender}-{}", send.message_id),
        };
        let sender_name = if v.item.sender_id == 0 {
            SYSTEM_SENDER_NAME.to_string()
        } else {
            v.item.sender_name
        };
        accepted.push(Accepted {
            index: v.index,
            client_id,
            kind: v.kind,
            check_member: v.kind == Kind::Channel && !v.item.backend,
            // Stored kinds are idempotent by id in their stores; only broadcasts are claimed.
            claim: matches!(v.kind, Kind::Group | Kind::Channel) && !send.message_id.is_empty(),
            message: Message {
                id,
                sender_id: v.item.sender_id,
                sender_name,
                receiver_id,
                kind: v.message_kind as i32,
                body: send.body,
                timestamp_ms: now_ms(),
                receipt: v.kind == Kind::Private && send.receipt,
                channel: if v.kind == Kind::Channel {
                    send.channel
                } else {
                    String::new()
                },
                group_id: if v.kind == Kind::GroupChat {
                    send.group_id
                } else {
                    0
                },
                ..Default::default()
            },
        });
    }

    // Each phase at once: its private messages in one store round trip and one push per
    // server, beside every sender's broadcast run (see `phases`). Phases one after another,
    // so a sender's private and broadcast messages reach a common recipient in send order.
    for phase in phases(accepted) {
        let privates = async {
            match phase.privates.is_empty() {
                true => Vec::new(),
                false => deliver_private(state, &servers, &phase.privates).await,
            }
        };
        let broadcasts = join_all(
            phase
                .broadcasts
                .iter()
                .map(|run| deliver_run(state, &servers, run)),
        );
        let (private_outcomes, broadcast_outcomes) = tokio::join!(privates, broadcasts);
        for (a, r) in phase.privates.iter().zip(private_outcomes) {
            results[a.index] = Some(r);
        }
        for (run, outcomes) in phase.broadcasts.iter().zip(broadcast_outcomes) {
            for (a, r) in run.iter().zip(outcomes) {
                results[a.index] = Some(r);
            }
        }
    }

    let results = all_answered(results);
    let mut outcomes = crate::metrics::Outcomes::default();
    for (kind, r) in kinds.iter().zip(&results) {
        outcomes.add(usize::from(*kind), r);
    }
    state.metrics().messages(&outcomes);
    results
}

/// One sender's run of broadcasts or group-chat messages (one kind).
async fn deliver_run(
    state: &AppState,
    servers: &cim_common::registry::Members,
    run: &[Accepted],
) -> Vec<SendResult> {
    match run.first().map(|a| a.kind) {
        Some(Kind::GroupChat) => group_chat::deliver_group_chat(state, servers, run).await,
        _ => deliver_broadcasts(state, servers, run).await,
    }
}

/// Messages of a batch that are delivered together.
#[derive(Default)]
struct Phase {
    /// Private messages of every sender in this phase, in batch order.
    privates: Vec<Accepted>,
    /// One run of broadcasts (group or channel messages, in order) per sender.
    broadcasts: Vec<Vec<Accepted>>,
}

/// `accepted` cut into phases: each sender's messages form runs of consecutive messages of
/// one kind, and its k-th run goes to phase k. Within a phase nothing waits for anything else
/// (the privates of all senders share one delivery, each sender's broadcast run is its own),
/// so one sender's slow channel fan-out does not hold up another's private messages; across
/// phases, a sender's runs stay in order. Most batches are one phase.
fn phases(accepted: Vec<Accepted>) -> Vec<Phase> {
    let mut phases: Vec<Phase> = Vec::new();
    // Sender → (its current phase, the kind of its current run, its broadcast run's slot).
    let mut senders: HashMap<u64, (usize, Kind, Option<usize>)> = HashMap::new();
    for a in accepted {
        let (phase, slot) = match senders.get_mut(&a.message.sender_id) {
            Some((phase, kind, slot)) if *kind == a.kind => (*phase, slot),
            Some(entry) => {
                *entry = (entry.0 + 1, a.kind, None);
                (entry.0, &mut entry.2)
            }
            None => {
                let entry = senders
                    .entry(a.message.sender_id)
                    .or_insert((0, a.kind, None));
                (0, &mut entry.2)
            }
        };
        if phases.len() <= phase {
            phases.resize_with(phase + 1, Phase::default);
        }
        let at = &mut phases[phase];
        match a.kind {
            Kind::Private => at.privates.push(a),
            Kind::Group | Kind::Channel | Kind::GroupChat => match slot {
                Some(i) => at.broadcasts[*i].push(a),
                None => {
                    *slot = Some(at.broadcasts.len());
                    at.broadcasts.push(vec![a]);
                }
            },
        }
    }
    phases
}

/// [`route_batch`] in a task of its own: once a message is accepted its delivery runs to
/// the end even if the caller goes away (client disconnect, request timeout), so a retry
/// never races a half-finished fan-out.
pub async fn route_detached(state: &AppState, items: Vec<Outgoing>) -> Vec<SendResult> {
    let client_ids: Vec<u64> = items.iter().map(|i| i.send.client_id).collect();
    let task_state = state.clone();
    match tokio::spawn(async move { route_batch(&task_state, items).await }).await {
        Ok(results) => results,
        Err(e) => {
            tracing::error!(error = %e, "routing task failed");
            client_ids
                .into_iter()
                .map(|id| failed(id, ErrorCode::Internal, "internal error"))
                .collect()
        }
    }
}
