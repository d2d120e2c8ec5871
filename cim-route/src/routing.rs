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
//!   ([`deliver_broadcasts`]).
//!
//! A route counts only while its server is live in the registry watch; a route pointing at
//! a dead server is removed (compare-and-delete, best effort) when routing stumbles on it.
//!
//! The channel fan-out's pure CPU steps, [`group_by_server`] and [`group_deliveries`], are
//! public so that `benches/fanout.rs` measures the code routing runs, not a copy of it.

use crate::{
    known_users::KnownUsers,
    state::{live_server, AppState},
};
use cim_common::{
    ids,
    pb::{
        cluster::{AckedReceipt, Delivery, DeliveryResult, PushRequest, PushResponse},
        Error, ErrorCode, Message, MessageKind, Send, SendResult, SendStatus,
    },
    registry::{Members, ServiceInfo},
    store::{RouteEntry, RouteStore, StoreError, StoreResult, MAX_CHANNEL_PAGE},
    time::now_ms,
};
use futures_util::{future::join_all, stream, StreamExt};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Path of the connection servers' push endpoint.
pub const PUSH_PATH: &str = "/internal/push";

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
}

/// How a private message names its receiver.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Receiver {
    Id(u64),
    Name(String),
}

/// A message that passed validation.
struct Valid {
    index: usize,
    kind: Kind,
    message_kind: MessageKind,
    receiver: Option<Receiver>,
    item: Outgoing,
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
    /// delivered ([`deliver_broadcasts`]). An id the route just made up cannot repeat.
    claim: bool,
    message: Message,
}

/// Prefix of a receipt's message id (followed by the id of the acked message), so a receipt
/// forwarded twice is stored once.
const RECEIPT_ID_PREFIX: &str = "rcpt-";

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

/// Checks one item without touching any backend.
fn validate(
    index: usize,
    item: Outgoing,
    max_message_len: usize,
    max_name_len: usize,
) -> Result<Valid, SendResult> {
    let send = &item.send;
    let client_id = send.client_id;
    let system = item.sender_id == 0;
    if system && !item.backend {
        return Err(failed(client_id, ErrorCode::BadRequest, "missing sender"));
    }
    let has_receiver = send.to_user_id != 0 || !send.to_user_name.trim().is_empty();
    let message_kind = MessageKind::try_from(send.kind).ok();
    let kind = match message_kind {
        Some(MessageKind::Private) if !system => Kind::Private,
        Some(MessageKind::Group) if !system => Kind::Group,
        Some(MessageKind::System) if system && has_receiver => Kind::Private,
        Some(MessageKind::System) if system => Kind::Group,
        Some(MessageKind::Channel) => Kind::Channel,
        Some(MessageKind::System) if item.backend => {
            return Err(failed(
                client_id,
                ErrorCode::BadRequest,
                "system messages have no sender",
            ))
        }
        Some(MessageKind::Private | MessageKind::Group) => {
            return Err(failed(
                client_id,
                ErrorCode::BadRequest,
                "messages of the system are of kind SYSTEM",
            ))
        }
        Some(other) => {
            return Err(failed(
                client_id,
                ErrorCode::BadRequest,
                format!("unsupported kind {}", other.as_str_name()),
            ))
        }
        None => {
            return Err(failed(
                client_id,
                ErrorCode::BadRequest,
                format!("unsupported kind {}", send.kind),
            ))
        }
    };
    let message_kind = message_kind.unwrap_or(MessageKind::Unspecified);
    if kind == Kind::Channel && !ids::valid_channel_name(&send.channel) {
        return Err(failed(
            client_id,
            ErrorCode::BadRequest,
            format!(
                "channel must be 1 to {} letters, digits or _-.",
                ids::MAX_CHANNEL_NAME_LEN
            ),
        ));
    }
    if send.receipt && (kind != Kind::Private || system) {
        return Err(failed(
            client_id,
            ErrorCode::BadRequest,
            "receipts are for private messages from a user",
        ));
    }
    if send.body.trim().is_empty() {
        return Err(failed(
            client_id,
            ErrorCode::BadRequest,
            "message body is empty",
        ));
    }
    if !send.message_id.is_empty() && !ids::valid_message_id(&send.message_id) {
        return Err(failed(
            client_id,
            ErrorCode::BadRequest,
            format!(
                "message_id must be 1 to {} characters of [0-9A-Za-z_-]",
                ids::MAX_MESSAGE_ID_LEN
            ),
        ));
    }
    if send.body.len() > max_message_len {
        return Err(failed(
            client_id,
            ErrorCode::BadRequest,
            format!("message body is longer than {max_message_len} bytes"),
        ));
    }
    let receiver = match kind {
        Kind::Group | Kind::Channel => None,
        Kind::Private if send.to_user_id != 0 => Some(Receiver::Id(send.to_user_id)),
        Kind::Private => {
            let name = send.to_user_name.trim();
            if name.is_empty() {
                return Err(failed(
                    client_id,
                    ErrorCode::BadRequest,
                    "missing receiver: set to_user_id or to_user_name",
                ));
            }
            // No account has a longer name; answer without a Redis lookup of a huge key.
            if name.chars().count() > max_name_len {
                return Err(failed(
                    client_id,
                    ErrorCode::UnknownUser,
                    format!("no user named {name:?}"),
                ));
            }
            Some(Receiver::Name(name.to_string()))
        }
    };
    Ok(Valid {
        index,
        kind,
        message_kind,
        receiver,
        item,
    })
}

/// Resolves distinct receivers to user ids: `Some(Some(id))` found, `Some(None)` no such
/// user, `None` the lookup failed (logged). Receivers the route already knows exist are
/// answered without the store (accounts never change: see [`crate::known_users`]); the
/// others are looked up, and those found are remembered.
async fn resolve_receivers(
    store: &dyn RouteStore,
    known: &KnownUsers,
    receivers: HashSet<Receiver>,
) -> HashMap<Receiver, Option<Option<u64>>> {
    let mut resolved = HashMap::with_capacity(receivers.len());
    let mut unknown = Vec::new();
    for r in receivers {
        let hit = match &r {
            Receiver::Id(id) => known.has_id(*id).then_some(*id),
            Receiver::Name(name) => known.id_of(name),
        };
        match hit {
            Some(id) => {
                resolved.insert(r, Some(Some(id)));
            }
            None => unknown.push(r),
        }
    }
    if unknown.is_empty() {
        return resolved;
    }
    let looked_up: Vec<(Receiver, Option<Option<u64>>)> = stream::iter(unknown)
        .map(|r| async move {
            let found = match &r {
                Receiver::Id(id) => store.user_name(*id).await.map(|n| n.map(|_| *id)),
                Receiver::Name(name) => store.user_by_name(name).await.map(|u| u.map(|u| u.id)),
            };
            let found = match found {
                Ok(found) => Some(found),
                Err(e) => {
                    tracing::warn!(error = %e, "receiver lookup failed");
                    None
                }
            };
            (r, found)
        })
        .buffer_unordered(LOOKUP_CONCURRENCY)
        .collect()
        .await;
    for (r, found) in looked_up {
        if let Some(Some(id)) = found {
            match &r {
                Receiver::Id(_) => known.learn_id(id),
                Receiver::Name(name) => known.learn_name(name, id),
            }
        }
        resolved.insert(r, found);
    }
    resolved
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
            claim: v.kind != Kind::Private && !send.message_id.is_empty(),
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
                .map(|run| deliver_broadcasts(state, &servers, run)),
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
            Kind::Group | Kind::Channel => match slot {
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

/// One push call; `None` when it failed (logged: its recipients count as not delivered).
async fn push(
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
async fn remove_stale(store: &dyn RouteStore, stale: &[RouteEntry]) {
    join_all(stale.iter().map(|route| async move {
        if let Err(e) = store.remove_stale_route(route).await {
            tracing::debug!(user_id = route.user_id, error = %e, "removing a stale route failed");
        }
    }))
    .await;
}

/// Number of recipients a server accepted, saturating.
fn count(result: Option<&DeliveryResult>) -> u32 {
    result.map_or(0, |r| u32::try_from(r.delivered.len()).unwrap_or(u32::MAX))
}

/// Sends each original sender a RECEIPT message for a message its receiver acked. Receipts
/// are stored and delivered like private messages (so an offline sender gets them later);
/// a receipt forwarded twice is stored once (its id derives from the acked message's).
/// Answers, per receipt, whether it is done (stored, or malformed); the server sends the
/// others again.
pub async fn route_receipts(state: &AppState, receipts: Vec<AckedReceipt>) -> Vec<bool> {
    let servers = state.servers();
    // Malformed requests can never be stored: answered done, so they are not sent again.
    let mut done = vec![true; receipts.len()];
    let mut positions = Vec::with_capacity(receipts.len());
    let run: Vec<Accepted> = receipts
        .into_iter()
        .enumerate()
        .filter(|(_, r)| r.sender_id != 0 && r.receiver_id != 0 && !r.message_id.is_empty())
        .enumerate()
        .map(|(index, (position, r))| {
            positions.push(position);
            Accepted {
                index,
                client_id: 0,
                kind: Kind::Private,
                check_member: false,
                claim: false,
                message: Message {
                    id: format!("{RECEIPT_ID_PREFIX}{}", r.message_id),
                    sender_id: r.receiver_id,
                    sender_name: r.receiver_name,
                    receiver_id: r.sender_id,
                    kind: MessageKind::Receipt as i32,
                    timestamp_ms: r.acked_at_ms,
                    receipt_for: r.message_id,
                    ..Default::default()
                },
            }
        })
        .collect();
    if run.is_empty() {
        return done;
    }
    let results = deliver_private(state, &servers, &run).await;
    let mut outcomes = crate::metrics::Outcomes::default();
    for r in &results {
        outcomes.add(MessageKind::Receipt as usize, r);
    }
    state.metrics().messages(&outcomes);
    let mut failed = 0;
    for (r, &position) in results.iter().zip(&positions) {
        if r.status == SendStatus::Failed as i32 {
            done[position] = false;
            failed += 1;
        }
    }
    if failed > 0 {
        tracing::warn!(
            failed,
            "receipts could not be stored now: their server sends them again"
        );
    }
    done
}

/// Stores a run of private messages in their receivers' inboxes, then pushes them to the
/// receivers' servers. The route lookup goes in the store's round trip, after it.
async fn deliver_private(state: &AppState, servers: &Members, run: &[Accepted]) -> Vec<SendResult> {
    let mut ids: Vec<u64> = run.iter().map(|a| a.message.receiver_id).collect();
    ids.sort_unstable();
    ids.dedup();
    // Copies that get their inbox seq; they are what the pushes carry.
    let mut messages: Vec<Message> = run.iter().map(|a| a.message.clone()).collect();
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
    let timestamps: Vec<i64> = messages.iter().map(|m| m.timestamp_ms).collect();
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
    run.iter()
        .zip(timestamps)
        .zip(delivered)
        .map(|((a, timestamp_ms), d)| {
            let mut r = if d {
                accepted_result(a, SendStatus::Delivered, 1)
            } else {
                accepted_result(a, SendStatus::Stored, 0)
            };
            r.timestamp_ms = timestamp_ms;
            r
        })
        .collect()
}

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
            });
        }
    }
    (positions, deliveries)
}

/// How long a broadcast's id is claimed: a repeat within it is answered, not delivered. It
/// covers every retry cim itself makes (the SDK's resend within its 10 s send deadline, a
/// server's forward retry within its timeouts) with room to spare, and bounds the claims
/// kept to one minute of broadcasts.
pub const BROADCAST_CLAIM_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// Group and channel messages of one run. They are not stored, so nothing else would stop a
/// retry from reaching everyone a second time: the SDK resending a send whose connection
/// died before its result came, a server retrying a forward on another route, a backend
/// retrying a POST. So the ids that may repeat ([`Accepted::claim`]) are claimed first, in
/// ONE store round trip for the run: a repeat is answered `DELIVERED` with the first send's
/// timestamp and `delivered = 0` (the first send did the delivering) and pushed to nobody.
/// A broadcast that reached nobody (refused, or no server answered) gives its claim back,
/// so that a retry can still deliver it. When the claim cannot be made the messages fail
/// with `UNAVAILABLE`: never duplicated outranks delivered during a store outage.
async fn deliver_broadcasts(
    state: &AppState,
    servers: &Members,
    run: &[Accepted],
) -> Vec<SendResult> {
    let mut results: Vec<Option<SendResult>> = vec![None; run.len()];
    let claimed: Vec<usize> = (0..run.len()).filter(|&p| run[p].claim).collect();
    if !claimed.is_empty() {
        let claims: Vec<(String, i64)> = claimed
            .iter()
            .map(|&p| (run[p].message.id.clone(), run[p].message.timestamp_ms))
            .collect();
        match state
            .store()
            .claim_broadcasts(&claims, BROADCAST_CLAIM_TTL)
            .await
        {
            Ok(previous) => {
                for (&p, first) in claimed.iter().zip(previous) {
                    if let Some(timestamp_ms) = first {
                        let mut repeat = accepted_result(&run[p], SendStatus::Delivered, 0);
                        repeat.timestamp_ms = timestamp_ms;
                        repeat.repeat = true;
                        results[p] = Some(repeat);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "claiming broadcast ids failed");
                for &p in &claimed {
                    results[p] = Some(unavailable(run[p].client_id));
                }
            }
        }
    }

    let fresh: Vec<usize> = (0..run.len()).filter(|&p| results[p].is_none()).collect();
    let to_deliver: Vec<&Accepted> = fresh.iter().map(|&p| &run[p]).collect();
    // Still runs of one kind: `run` is.
    let outcomes = match run[0].kind {
        Kind::Channel => deliver_channels(state, servers, &to_deliver).await,
        _ => deliver_group(state, servers, &to_deliver).await,
    };
    let mut release = Vec::new();
    for (p, outcome) in fresh.into_iter().zip(outcomes) {
        // A failure with no message id reached nobody (see `fan_out_result`).
        if run[p].claim
            && outcome.status == SendStatus::Failed as i32
            && outcome.message_id.is_empty()
        {
            release.push(run[p].message.id.clone());
        }
        results[p] = Some(outcome);
    }
    if !release.is_empty() {
        if let Err(e) = state.store().release_broadcasts(&release).await {
            // Their retries within the claim's time are answered as repeats: logged, as the
            // sender was told the message failed.
            tracing::warn!(error = %e, ids = release.len(), "releasing broadcast claims failed");
        }
    }
    all_answered(results)
}

/// Group messages (to everyone online): ONE push per live server, carrying all of the run's
/// messages as `everyone` deliveries; each server hands every message to all of its
/// logged-in connections but the sender's and answers with counts. Nothing is looked up:
/// who is online is exactly who holds a connection on a live server, and every live server
/// is asked, at the same time. (The first version SCANned the `route:*` keys and MGET the
/// routes page by page, ten sequential Redis rounds and a push list per page for 10,000
/// users; see README, Performance.) A server whose push fails counts zero (logged), like a
/// failed private push (when none answers, the send fails: UNAVAILABLE); a user between
/// two servers may get the message on both or neither,
/// which the not-stored group kind allows.
async fn deliver_group(state: &AppState, servers: &Members, run: &[&Accepted]) -> Vec<SendResult> {
    // Nothing to push (every message was a repeat): no server is asked.
    if run.is_empty() {
        return Vec::new();
    }
    let deliveries: Vec<Delivery> = run
        .iter()
        .map(|a| Delivery {
            message: Some(a.message.clone()),
            recipients: Vec::new(),
            everyone: true,
        })
        .collect();
    let outcomes = join_all(
        servers
            .iter()
            .map(|server| push(state, server, deliveries.clone())),
    )
    .await;
    if !outcomes.is_empty() && outcomes.iter().all(Option::is_none) {
        return run
            .iter()
            .map(|a| {
                failed(
                    a.client_id,
                    ErrorCode::Unavailable,
                    "no connection server answered: the group message reached nobody",
                )
            })
            .collect();
    }
    let mut counts = vec![0u32; run.len()];
    for results in outcomes.into_iter().flatten() {
        for (n, result) in counts.iter_mut().zip(&results) {
            *n = n.saturating_add(u32::try_from(result.count).unwrap_or(u32::MAX));
        }
    }
    run.iter()
        .zip(counts)
        .map(|(a, n)| fan_out_result(a, n, None))
        .collect()
}

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
async fn deliver_channels(
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

/// The result of a fan-out (group or channel) message that reached `n` users, or was cut
/// short by `failure`.
fn fan_out_result(a: &Accepted, n: u32, failure: Option<&StoreError>) -> SendResult {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fake_server, server, state_with, FaultyStore, StoreExt};
    use cim_common::{
        config::DEV_SECRET,
        store::{prelude::*, MemoryStore},
    };
    use std::sync::{atomic::Ordering, Arc};

    fn send(kind: MessageKind, client_id: u64, to: u64, to_name: &str, body: &str) -> Send {
        Send {
            client_id,
            kind: kind as i32,
            to_user_id: to,
            to_user_name: to_name.into(),
            body: body.into(),
            ..Default::default()
        }
    }

    fn from(sender_id: u64, name: &str, send: Send) -> Outgoing {
        Outgoing::from_user(sender_id, name.into(), send)
    }

    fn status(r: &SendResult) -> SendStatus {
        SendStatus::try_from(r.status).unwrap()
    }

    fn error_code(r: &SendResult) -> ErrorCode {
        ErrorCode::try_from(r.error.as_ref().expect("an error").code).unwrap()
    }

    #[tokio::test]
    async fn private_batch_makes_one_lookup_and_one_push_per_server() {
        let store = Arc::new(FaultyStore::default());
        let alice = store.add_user("alice").await;
        let bob = store.add_user("bob").await;
        let carol = store.add_user("carol").await;
        let (a, rec) = fake_server("server-a", DEV_SECRET).await;
        store.connect(bob, &a.id).await;
        store.connect(carol, &a.id).await;
        let (state, _tx) = state_with(store.clone(), vec![a], |_| {});

        let results = route_batch(
            &state,
            vec![
                from(
                    alice,
                    "alice",
                    send(MessageKind::Private, 1, bob, "", "hi bob"),
                ),
                from(
                    alice,
                    "alice",
                    send(MessageKind::Private, 2, 0, "carol", "hi carol"),
                ),
                from(
                    alice,
                    "alice",
                    send(MessageKind::Private, 3, bob, "", "again"),
                ),
            ],
        )
        .await;

        assert_eq!(results.len(), 3);
        for (r, client_id) in results.iter().zip([1, 2, 3]) {
            assert_eq!(r.client_id, client_id);
            assert_eq!(status(r), SendStatus::Delivered, "{r:?}");
            assert_eq!(r.delivered, 1);
            assert!(!r.message_id.is_empty());
        }
        assert_ne!(results[0].message_id, results[2].message_id);
        assert_eq!(store.route_lookups.load(Ordering::SeqCst), 1, "one MGET");
        let pushes = rec.pushes.lock().unwrap();
        assert_eq!(pushes.len(), 1, "one push for the whole batch");
        let d = &pushes[0].deliveries;
        assert_eq!(d.len(), 3);
        assert_eq!(d[0].recipients, vec![bob]);
        assert_eq!(d[1].recipients, vec![carol]);
        let m = d[1].message.as_ref().unwrap();
        assert_eq!((m.sender_id, m.sender_name.as_str()), (alice, "alice"));
        assert_eq!((m.receiver_id, m.body.as_str()), (carol, "hi carol"));
        assert_eq!(m.kind, MessageKind::Private as i32);
        assert_eq!(m.id, results[1].message_id);
        assert_eq!(d[2].message.as_ref().unwrap().body, "again", "order kept");
    }

    /// `cim_route_messages_total` counts each routed message by kind and outcome, and no
    /// label value of the route's metrics names a user (id or name), a channel or a server.
    #[tokio::test]
    async fn messages_are_counted_without_naming_anyone() {
        let store = Arc::new(MemoryStore::new());
        let alice = store.add_user("alice-4711").await;
        let bob = store.add_user("bob-4712").await;
        let dave = store.add_user("dave-4713").await; // not connected
        let (a, _rec) = fake_server("server-a", DEV_SECRET).await;
        store.connect(bob, &a.id).await;
        let (state, _tx) = state_with(store.clone(), vec![a], |_| {});
        let p = MessageKind::Private;
        let results = route_batch(
            &state,
            vec![
                from(alice, "alice-4711", send(p, 1, bob, "", "hi")),
                from(alice, "alice-4711", send(p, 2, dave, "", "hi")),
                from(alice, "alice-4711", send(p, 3, 0, "nobody-4714", "hi")),
                from(
                    alice,
                    "alice-4711",
                    send(MessageKind::Group, 4, 0, "", "all"),
                ),
                from(
                    alice,
                    "alice-4711",
                    send(MessageKind::Channel, 5, 0, "", "x"),
                ),
            ],
        )
        .await;
        assert_eq!(results.len(), 5);
        let text = cim_common::metrics::encode_all(&[state.registry()]).unwrap();
        let samples = cim_common::metrics::parse_text(&text);
        let count = |kind: &str, outcome: &str| {
            samples
                .iter()
                .find(|(n, l, _)| {
                    n == "cim_route_messages_total"
                        && l.contains(&("kind".into(), kind.into()))
                        && l.contains(&("outcome".into(), outcome.into()))
                })
                .map(|s| s.2)
        };
        assert_eq!(count("private", "delivered"), Some(1.0), "{text}");
        assert_eq!(count("private", "stored"), Some(1.0), "{text}");
        assert_eq!(count("private", "failed_unknown_user"), Some(1.0), "{text}");
        assert_eq!(count("group", "delivered"), Some(1.0), "{text}");
        assert_eq!(count("channel", "failed_bad_request"), Some(1.0), "{text}");
        let ids = [alice, bob, dave].map(|id| id.to_string());
        for (_, labels, _) in &samples {
            for (_, value) in labels {
                assert!(
                    !ids.contains(value)
                        && !["4711", "4712", "4713", "4714", "server-", "127.0.0.1"]
                            .iter()
                            .any(|f| value.contains(f)),
                    "label value {value:?} names someone: {text}"
                );
            }
        }
    }

    #[tokio::test]
    async fn private_offline_and_failures() {
        let store = Arc::new(MemoryStore::new());
        let alice = store.add_user("alice").await;
        let dave = store.add_user("dave").await; // not connected
        let erin = store.add_user("erin").await; // on a dead server
        let frank = store.add_user("frank").await; // on a live server that does not have him
        let (a, rec) = fake_server("server-a", DEV_SECRET).await;
        store.connect(erin, "server-dead").await;
        store.connect(frank, &a.id).await;
        rec.absent.lock().unwrap().insert(frank);
        let (state, _tx) = state_with(store.clone(), vec![a], |c| c.max_message_len = 10);

        let p = MessageKind::Private;
        let results = route_batch(
            &state,
            vec![
                from(alice, "alice", send(p, 1, dave, "", "x")),
                from(alice, "alice", send(p, 2, erin, "", "x")),
                from(alice, "alice", send(p, 3, frank, "", "x")),
                from(alice, "alice", send(p, 4, 0, "nobody", "x")),
                from(alice, "alice", send(p, 5, 999, "", "x")),
                from(alice, "alice", send(p, 6, dave, "", " ")),
                from(alice, "alice", send(p, 7, dave, "", "12345678901")),
                from(alice, "alice", send(p, 8, 0, "", "x")),
                from(alice, "alice", send(MessageKind::Channel, 9, 0, "", "x")),
                from(0, "", send(p, 10, dave, "", "x")),
                from(alice, "alice", send(p, 11, 0, &"n".repeat(100), "x")),
            ],
        )
        .await;

        let ids: Vec<u64> = results.iter().map(|r| r.client_id).collect();
        assert_eq!(ids, (1..=11).collect::<Vec<_>>());
        for r in &results[..3] {
            assert_eq!(status(r), SendStatus::Stored, "{r:?}");
            assert!(!r.message_id.is_empty(), "accepted messages have an id");
        }
        for (r, code) in results[3..].iter().zip([
            ErrorCode::UnknownUser,
            ErrorCode::UnknownUser,
            ErrorCode::BadRequest,
            ErrorCode::BadRequest,
            ErrorCode::BadRequest,
            ErrorCode::BadRequest,
            ErrorCode::BadRequest,
            ErrorCode::UnknownUser,
        ]) {
            assert_eq!(status(r), SendStatus::Failed, "{r:?}");
            assert_eq!(error_code(r), code, "{r:?}");
            assert!(r.message_id.is_empty());
        }
        assert!(
            !store.has_route(erin).await,
            "the dead server's route was removed"
        );
        assert!(store.has_route(frank).await);
        let pushes = rec.pushes.lock().unwrap();
        assert_eq!(pushes.len(), 1);
        assert_eq!(
            pushes[0].deliveries.len(),
            1,
            "only frank's server was called"
        );
    }

    #[tokio::test]
    async fn failed_push_counts_as_offline() {
        let store = Arc::new(MemoryStore::new());
        let alice = store.add_user("alice").await;
        let bob = store.add_user("bob").await;
        // Live in the registry, but nothing listens on its internal address.
        let unreachable = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            drop(l);
            ServiceInfo {
                internal_addr: addr.to_string(),
                ..server("server-x")
            }
        };
        store.connect(bob, &unreachable.id).await;
        let (state, _tx) = state_with(store.clone(), vec![unreachable], |_| {});
        let results = route_batch(
            &state,
            vec![from(
                alice,
                "alice",
                send(MessageKind::Private, 1, bob, "", "x"),
            )],
        )
        .await;
        assert_eq!(status(&results[0]), SendStatus::Stored);
        assert!(
            store.has_route(bob).await,
            "a live server's route is not stale"
        );
    }

    #[tokio::test]
    async fn private_messages_are_stored_before_the_push_and_carry_their_seq() {
        let store = Arc::new(MemoryStore::new());
        let alice = store.add_user("alice").await;
        let bob = store.add_user("bob").await; // online
        let dave = store.add_user("dave").await; // offline
        let (a, rec) = fake_server("server-a", DEV_SECRET).await;
        store.connect(bob, &a.id).await;
        let (state, _tx) = state_with(store.clone(), vec![a], |_| {});
        let p = MessageKind::Private;
        let mut with_receipt = send(p, 1, bob, "", "to bob");
        with_receipt.receipt = true;
        let results = route_batch(
            &state,
            vec![
                from(alice, "alice", with_receipt),
                from(alice, "alice", send(p, 2, dave, "", "to dave")),
                from(alice, "alice", send(MessageKind::Group, 3, 0, "", "all")),
            ],
        )
        .await;
        assert_eq!(status(&results[0]), SendStatus::Delivered);
        assert_eq!(status(&results[1]), SendStatus::Stored);
        assert_eq!(status(&results[2]), SendStatus::Delivered);

        // Both private messages wait in their receivers' inboxes until acked; the group
        // message is nowhere.
        let bobs = store.inbox_read(bob, 0, 10).await.unwrap();
        assert_eq!(bobs.len(), 1);
        assert_eq!(bobs[0].id, results[0].message_id);
        assert!(bobs[0].receipt, "the receipt request is kept");
        let daves = store.inbox_read(dave, 0, 10).await.unwrap();
        assert_eq!(daves.len(), 1);
        assert_eq!(daves[0].body, "to dave");
        assert_eq!(store.inbox_len(alice).await.unwrap(), 0);

        // The push carries the stored seq (the server drops pushes its replay covered).
        let pushes = rec.pushes.lock().unwrap();
        let pushed = pushes[0].deliveries[0].message.as_ref().unwrap();
        assert_eq!(pushed.id, bobs[0].id);
        assert_eq!(pushed.seq, bobs[0].seq);
        assert!(pushed.seq > 0);
    }

    #[tokio::test]
    async fn client_message_ids_are_used_validated_and_stored_once() {
        let store = Arc::new(MemoryStore::new());
        let alice = store.add_user("alice").await;
        let dave = store.add_user("dave").await; // offline
        let (state, _tx) = state_with(store.clone(), vec![], |_| {});
        let with_id = |client_id, id: &str| {
            let mut s = send(MessageKind::Private, client_id, dave, "", "hello");
            s.message_id = id.into();
            s
        };
        let results = route_batch(
            &state,
            vec![
                from(alice, "alice", with_id(1, "client-chosen_1")),
                // A resend after a lost answer: same id.
                from(alice, "alice", with_id(2, "client-chosen_1")),
                from(alice, "alice", with_id(3, "has space")),
                from(alice, "alice", with_id(4, &"x".repeat(65))),
            ],
        )
        .await;
        let id = format!("{alice}-client-chosen_1");
        assert_eq!(results[0].message_id, id, "scoped by the sender");
        assert_eq!(status(&results[1]), SendStatus::Stored);
        assert_eq!(results[1].message_id, id);
        assert_eq!(
            results[1].timestamp_ms, results[0].timestamp_ms,
            "a retry answers with the stored message's timestamp"
        );
        for r in &results[2..] {
            assert_eq!(status(r), SendStatus::Failed);
            assert_eq!(error_code(r), ErrorCode::BadRequest);
        }
        assert_eq!(store.inbox_len(dave).await.unwrap(), 1, "stored once");
    }

    #[tokio::test]
    async fn group_pushes_once_per_live_server_to_everyone_there_and_reads_nothing() {
        let store = Arc::new(FaultyStore::default());
        let (a, rec_a) = fake_server("server-a", DEV_SECRET).await;
        let (b, rec_b) = fake_server("server-b", DEV_SECRET).await;
        rec_a.everyone.store(5, Ordering::SeqCst);
        rec_b.everyone.store(2, Ordering::SeqCst);
        // A live server that refuses every push (wrong secret) counts zero, not an error.
        let (c, rec_c) = fake_server("server-c", "another-secret-entirely").await;
        rec_c.everyone.store(100, Ordering::SeqCst);
        let sender = store.add_user("sender").await;
        store.connect(sender, &a.id).await;
        let (state, _tx) = state_with(store.clone(), vec![a, b, c], |_| {});

        let results = route_batch(
            &state,
            vec![
                from(
                    sender,
                    "sender",
                    send(MessageKind::Group, 7, 0, "", "hello all"),
                ),
                from(
                    sender,
                    "sender",
                    send(MessageKind::Group, 8, 0, "", "again"),
                ),
            ],
        )
        .await;

        assert_eq!(results.len(), 2);
        for (r, client_id) in results.iter().zip([7, 8]) {
            assert_eq!(status(r), SendStatus::Delivered, "{r:?}");
            assert_eq!(r.client_id, client_id);
            assert_eq!(r.delivered, 7, "5 on server-a + 2 on server-b");
        }
        assert_eq!(store.scans.load(Ordering::SeqCst), 0, "no route lookup");
        for rec in [&rec_a, &rec_b] {
            let pushes = rec.pushes.lock().unwrap();
            assert_eq!(pushes.len(), 1, "one push per server for the whole run");
            let deliveries = &pushes[0].deliveries;
            assert_eq!(deliveries.len(), 2);
            for (d, r) in deliveries.iter().zip(&results) {
                assert!(d.everyone && d.recipients.is_empty(), "{d:?}");
                let m = d.message.as_ref().unwrap();
                assert_eq!((m.kind, m.receiver_id), (MessageKind::Group as i32, 0));
                assert_eq!(
                    (m.id.as_str(), m.sender_id),
                    (r.message_id.as_str(), sender)
                );
            }
        }
        assert!(
            rec_c.pushes.lock().unwrap().is_empty(),
            "refused, not recorded"
        );
    }

    #[tokio::test]
    async fn known_receivers_are_not_looked_up_again_unknown_ones_are() {
        let store = Arc::new(FaultyStore::default());
        let alice = store.add_user("alice").await;
        let bob = store.add_user("bob").await;
        store.add_user("carol").await;
        let (state, _tx) = state_with(store.clone(), vec![], |_| {});
        let batch = || {
            vec![
                from(
                    alice,
                    "alice",
                    send(MessageKind::Private, 1, bob, "", "by id"),
                ),
                from(
                    alice,
                    "alice",
                    send(MessageKind::Private, 2, 0, "carol", "by name"),
                ),
                from(
                    alice,
                    "alice",
                    send(MessageKind::Private, 3, 0, "zed", "nobody"),
                ),
            ]
        };
        let lookups = || store.user_lookups.load(Ordering::SeqCst);

        let first = route_batch(&state, batch()).await;
        assert_eq!(lookups(), 3);
        let second = route_batch(&state, batch()).await;
        assert_eq!(lookups(), 4, "only the unknown name is asked again");
        for results in [&first, &second] {
            assert_eq!(status(&results[0]), SendStatus::Stored, "{results:?}");
            assert_eq!(status(&results[1]), SendStatus::Stored, "{results:?}");
            assert_eq!(error_code(&results[2]), ErrorCode::UnknownUser);
        }
        // Registered meanwhile: found at once (misses are never remembered).
        store.add_user("zed").await;
        let third = route_batch(&state, batch()).await;
        assert_eq!(status(&third[2]), SendStatus::Stored, "{third:?}");
        assert_eq!(state.known_users().len(), (3, 2));
    }

    #[tokio::test]
    async fn mixed_batch_keeps_results_aligned() {
        let store = Arc::new(MemoryStore::new());
        let alice = store.add_user("alice").await;
        let bob = store.add_user("bob").await;
        let (a, rec) = fake_server("server-a", DEV_SECRET).await;
        store.connect(bob, &a.id).await;
        let (state, _tx) = state_with(store.clone(), vec![a], |_| {});
        let results = route_batch(
            &state,
            vec![
                from(
                    alice,
                    "alice",
                    send(MessageKind::Private, 1, bob, "", "first"),
                ),
                from(alice, "alice", send(MessageKind::Group, 2, 0, "", "second")),
                from(
                    alice,
                    "alice",
                    send(MessageKind::Private, 3, bob, "", "third"),
                ),
            ],
        )
        .await;
        assert_eq!(
            results.iter().map(|r| r.client_id).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert!(results.iter().all(|r| status(r) == SendStatus::Delivered));
        let bodies: Vec<String> = rec
            .pushes
            .lock()
            .unwrap()
            .iter()
            .flat_map(|p| p.deliveries.iter())
            .map(|d| d.message.as_ref().unwrap().body.clone())
            .collect();
        assert_eq!(
            bodies,
            ["first", "second", "third"],
            "bob sees them in send order"
        );
    }

    /// A broadcast with the sender's own id (what the SDK and servers always send).
    fn with_id(kind: MessageKind, client_id: u64, id: &str, channel: &str) -> Send {
        let mut s = send(kind, client_id, 0, "", "hello");
        s.message_id = id.into();
        s.channel = channel.into();
        s
    }

    fn pushed_ids(rec: &crate::testing::Recorded) -> Vec<String> {
        rec.pushes
            .lock()
            .unwrap()
            .iter()
            .flat_map(|p| p.deliveries.iter())
            .map(|d| d.message.as_ref().unwrap().id.clone())
            .collect()
    }

    #[test]
    fn phases_keep_each_senders_runs_in_order_and_put_senders_side_by_side() {
        let item = |index, sender, kind| Accepted {
            index,
            client_id: index as u64,
            kind,
            check_member: false,
            claim: false,
            message: Message {
                sender_id: sender,
                ..Default::default()
            },
        };
        // a: private, private, group, private; b: group, group; c: private.
        let phases = phases(vec![
            item(0, 1, Kind::Private),
            item(1, 2, Kind::Group),
            item(2, 1, Kind::Private),
            item(3, 1, Kind::Group),
            item(4, 3, Kind::Private),
            item(5, 2, Kind::Group),
            item(6, 1, Kind::Private),
        ]);
        let shape: Vec<(Vec<usize>, Vec<Vec<usize>>)> = phases
            .iter()
            .map(|p| {
                (
                    p.privates.iter().map(|a| a.index).collect(),
                    p.broadcasts
                        .iter()
                        .map(|run| run.iter().map(|a| a.index).collect())
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            shape,
            [
                (vec![0, 2, 4], vec![vec![1, 5]]),
                (vec![], vec![vec![3]]),
                (vec![6], vec![]),
            ]
        );
    }

    /// One sender's channel fan-out to a server that is slow to answer does not hold up
    /// another sender's private message in the same batch: the private push goes out while
    /// the fan-out's push is still held (issue 18 item 5: before, the batch's runs went one
    /// after another, and the private push waited for the channel's).
    #[tokio::test]
    async fn a_slow_fan_out_does_not_hold_up_another_senders_private_message() {
        let store = Arc::new(MemoryStore::new());
        let flooder = store.add_user("flooder").await;
        let member = store.add_user("member").await;
        let carol = store.add_user("carol").await;
        let dave = store.add_user("dave").await;
        let (slow, slow_rec) = fake_server("server-slow", DEV_SECRET).await;
        let (fast, fast_rec) = fake_server("server-fast", DEV_SECRET).await;
        store.connect(member, &slow.id).await;
        store.connect(dave, &fast.id).await;
        store.channel_join("room", flooder, 10).await.unwrap();
        store.channel_join("room", member, 10).await.unwrap();
        slow_rec.hold_pushes.store(true, Ordering::SeqCst);
        let (state, _tx) = state_with(store.clone(), vec![slow, fast], |c| {
            c.push_timeout_ms = 60_000;
        });
        let batch = vec![
            from(
                flooder,
                "flooder",
                send(MessageKind::Channel, 1, 0, "", "to the room"),
            ),
            from(
                carol,
                "carol",
                send(MessageKind::Private, 2, dave, "", "hi dave"),
            ),
        ];
        let batch = {
            let mut b = batch;
            b[0].send.channel = "room".into();
            b
        };
        let routed = tokio::spawn({
            let state = state.clone();
            async move { route_batch(&state, batch).await }
        });
        // The channel's push reaches the slow server and is held there...
        loop {
            let holding = slow_rec.holding.notified();
            tokio::pin!(holding);
            holding.as_mut().enable();
            if slow_rec.held.load(Ordering::SeqCst) > 0 {
                break;
            }
            holding.await;
        }
        // ...and meanwhile dave's message is pushed (bounded: before, it never came until
        // the channel's push returned).
        let pushed =
            tokio::time::timeout(std::time::Duration::from_secs(10), fast_rec.first_push()).await;
        assert!(pushed.is_ok(), "the private push waited for the channel's");
        assert_eq!(slow_rec.held.load(Ordering::SeqCst), 1, "still held");
        slow_rec.release();
        let results = routed.await.unwrap();
        assert_eq!(
            status(&results[0]),
            SendStatus::Delivered,
            "{:?}",
            results[0]
        );
        assert_eq!(
            status(&results[1]),
            SendStatus::Delivered,
            "{:?}",
            results[1]
        );
    }

    #[tokio::test]
    async fn a_repeated_group_or_channel_message_is_answered_and_not_delivered_again() {
        let store = Arc::new(MemoryStore::new());
        let alice = store.add_user("alice").await;
        let bob = store.add_user("bob").await;
        let (a, rec) = fake_server("server-a", DEV_SECRET).await;
        rec.everyone.store(3, Ordering::SeqCst);
        store.connect(bob, &a.id).await;
        store.channel_join("room", alice, 10).await.unwrap();
        store.channel_join("room", bob, 10).await.unwrap();
        let (state, _tx) = state_with(store.clone(), vec![a], |_| {});
        let batch = || {
            vec![
                from(alice, "alice", with_id(MessageKind::Group, 1, "g1", "")),
                from(
                    alice,
                    "alice",
                    with_id(MessageKind::Channel, 2, "c1", "room"),
                ),
                // Without an id of its own: the route makes one up, which cannot repeat.
                from(alice, "alice", send(MessageKind::Group, 3, 0, "", "fresh")),
            ]
        };

        let first = route_batch(&state, batch()).await;
        assert_eq!(
            first.iter().map(|r| r.delivered).collect::<Vec<_>>(),
            [3, 1, 3],
            "{first:?}"
        );
        // The retry: the connection died before these results arrived.
        let retry = route_batch(&state, batch()).await;
        for (r, f) in retry[..2].iter().zip(&first) {
            assert_eq!(status(r), SendStatus::Delivered, "{r:?}");
            assert_eq!(r.delivered, 0, "the first send did the delivering");
            assert!(r.repeat && !f.repeat, "{r:?} {f:?}");
            assert_eq!(
                (&r.message_id, r.timestamp_ms, r.client_id),
                (&f.message_id, f.timestamp_ms, f.client_id),
                "answered as the first"
            );
        }
        assert_eq!(retry[2].delivered, 3, "a message with a new id is new");
        assert_ne!(retry[2].message_id, first[2].message_id);

        let ids = pushed_ids(&rec);
        for id in [&first[0].message_id, &first[1].message_id] {
            assert_eq!(ids.iter().filter(|i| *i == id).count(), 1, "{ids:?}");
        }
        assert_eq!(first[0].message_id, format!("{alice}-g1"));
        // Another sender's id of the same text is another message.
        let carol = store.add_user("carol").await;
        let other = route_batch(
            &state,
            vec![from(
                carol,
                "carol",
                with_id(MessageKind::Group, 1, "g1", ""),
            )],
        )
        .await;
        assert_eq!(other[0].delivered, 3, "{other:?}");
    }

    #[tokio::test]
    async fn a_broadcast_that_reached_nobody_can_be_retried() {
        let store = Arc::new(MemoryStore::new());
        let alice = store.add_user("alice").await;
        let (a, rec) = fake_server("server-a", DEV_SECRET).await;
        rec.everyone.store(4, Ordering::SeqCst);
        // No server answers: the group message reached nobody.
        let (state, tx) = state_with(store.clone(), vec![server("server-down")], |_| {});
        let group = || {
            vec![from(
                alice,
                "alice",
                with_id(MessageKind::Group, 1, "g", ""),
            )]
        };
        let down = route_batch(&state, group()).await;
        assert_eq!(error_code(&down[0]), ErrorCode::Unavailable, "{down:?}");
        // Not a member: refused, and a retry after joining goes through.
        let channel = || {
            vec![from(
                alice,
                "alice",
                with_id(MessageKind::Channel, 2, "c", "room"),
            )]
        };
        let refused = route_batch(&state, channel()).await;
        assert_eq!(error_code(&refused[0]), ErrorCode::Forbidden, "{refused:?}");

        tx.send(crate::testing::members(vec![a])).unwrap();
        store.channel_join("room", alice, 10).await.unwrap();
        let again = route_batch(&state, group()).await;
        assert_eq!(
            (status(&again[0]), again[0].delivered),
            (SendStatus::Delivered, 4),
            "{again:?}"
        );
        let joined = route_batch(&state, channel()).await;
        assert_eq!(status(&joined[0]), SendStatus::Delivered, "{joined:?}");
        assert_eq!(
            pushed_ids(&rec),
            [format!("{alice}-g")],
            "the channel has nobody else"
        );
    }

    #[tokio::test]
    async fn a_broadcast_that_cannot_be_claimed_is_not_sent() {
        let store = Arc::new(FaultyStore::default());
        let alice = store.add_user("alice").await;
        let (a, rec) = fake_server("server-a", DEV_SECRET).await;
        rec.everyone.store(2, Ordering::SeqCst);
        let (state, _tx) = state_with(store.clone(), vec![a], |_| {});
        store.fail.store(true, Ordering::SeqCst);
        let results = route_batch(
            &state,
            vec![
                from(alice, "alice", with_id(MessageKind::Group, 1, "g", "")),
                // Nothing to claim (a new id), and a group send needs no store.
                from(alice, "alice", send(MessageKind::Group, 2, 0, "", "x")),
            ],
        )
        .await;
        assert_eq!(
            error_code(&results[0]),
            ErrorCode::Unavailable,
            "{results:?}"
        );
        assert_eq!(results[1].delivered, 2, "{results:?}");
        assert_eq!(pushed_ids(&rec), [results[1].message_id.clone()]);
    }

    #[tokio::test]
    async fn store_failure_is_unavailable() {
        let store = Arc::new(FaultyStore::default());
        let alice = store.add_user("alice").await;
        let bob = store.add_user("bob").await;
        store.fail.store(true, Ordering::SeqCst);
        let (state, _tx) = state_with(store.clone(), vec![server("server-a")], |_| {});
        let results = route_batch(
            &state,
            vec![
                from(alice, "alice", send(MessageKind::Private, 1, bob, "", "x")),
                from(alice, "alice", send(MessageKind::Group, 2, 0, "", "x")),
            ],
        )
        .await;
        for r in &results {
            assert_eq!(status(r), SendStatus::Failed);
            assert_eq!(error_code(r), ErrorCode::Unavailable);
        }
    }
}
