//! Read marks and typing indicators that clients sent over their connections
//! ([`relay_signals`]). Neither is a message: a read mark is stored (the user's position in
//! the conversation, see `History::mark_read`) and then relayed; a typing frame is only
//! relayed. Private conversations: to the peer's server (one route lookup); groups: to every
//! live server with the group's id, where typing reaches the members online (as a group
//! message does) and read marks only the members that watch the group's marks
//! (`WatchReads`): every member getting every member's marks would be members × members
//! frames for a group where everyone reads everything.
//! Best effort: a relay that fails is not retried (marks are kept; indicators are worth
//! nothing late).

use crate::state::{live_server, AppState};
use cim_common::{
    pb::{
        cluster::{signal, Signal, SignalRequest, SignalResponse},
        Conversation, ReadMark, Typing,
    },
    store::ConvKey,
};
use futures_util::future::join_all;
use std::collections::BTreeMap;

/// Path of the connection servers' signal endpoint.
pub const SIGNAL_PATH: &str = "/internal/signal";

/// A read mark or typing frame of one user.
pub enum SignalItem {
    ReadMark(u64, ReadMark),
    Typing(u64, String, Typing),
}

fn conv_of(c: Option<&Conversation>) -> Option<ConvKey> {
    match c? {
        Conversation {
            user_id,
            group_id: 0,
        } if *user_id != 0 => Some(ConvKey::User(*user_id)),
        Conversation {
            user_id: 0,
            group_id,
        } if *group_id != 0 => Some(ConvKey::Group(*group_id)),
        _ => None,
    }
}

/// Stores the read marks and relays them and the typing frames (see the module docs).
pub async fn relay_signals(state: &AppState, items: Vec<SignalItem>) {
    // Per recipient user (private) or group: the signals to send.
    let mut to_users: Vec<(u64, Signal)> = Vec::new();
    let mut to_groups: Vec<Signal> = Vec::new();
    for item in items {
        match item {
            SignalItem::ReadMark(user, mark) => {
                let Some(conv) = conv_of(mark.conversation.as_ref()) else {
                    continue;
                };
                let stored = match state.store().mark_read(user, conv, mark.seq).await {
                    Ok(Some(seq)) => seq,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "storing a read mark failed");
                        continue;
                    }
                };
                match conv {
                    ConvKey::User(peer) => {
                        to_users.push((peer, read_mark_signal(user, conv, stored)))
                    }
                    ConvKey::Group(_) => to_groups.push(read_mark_signal(user, conv, stored)),
                }
            }
            SignalItem::Typing(user, name, typing) => {
                let Some(conv) = conv_of(typing.conversation.as_ref()) else {
                    continue;
                };
                let (conversation, recipients, group_id) = match conv {
                    ConvKey::User(peer) => (
                        Conversation {
                            user_id: user,
                            group_id: 0,
                        },
                        vec![peer],
                        0,
                    ),
                    ConvKey::Group(group) => {
                        // Only members may say they are typing in a group.
                        match state.store().group_member(group, user).await {
                            Ok(Some(_)) => {}
                            _ => continue,
                        }
                        (
                            Conversation {
                                user_id: 0,
                                group_id: group,
                            },
                            Vec::new(),
                            group,
                        )
                    }
                };
                let signal = Signal {
                    recipients: recipients.clone(),
                    group_id,
                    body: Some(signal::Body::Typing(Typing {
                        conversation: Some(conversation),
                        stopped: typing.stopped,
                        user_id: user,
                        user_name: name,
                    })),
                };
                match recipients.first() {
                    Some(&peer) => to_users.push((peer, signal)),
                    None => to_groups.push(signal),
                }
            }
        }
    }
    send_signals(state, to_users, to_groups).await;
}

/// The ReadMark frame telling the others in `conv` that `user` read it up to `seq`: the
/// peer of a private conversation, or a group's watchers.
fn read_mark_signal(user: u64, conv: ConvKey, seq: u64) -> Signal {
    let (recipients, group_id, conversation) = match conv {
        // As the peer sees the conversation: with this user.
        ConvKey::User(peer) => (
            vec![peer],
            0,
            Conversation {
                user_id: user,
                group_id: 0,
            },
        ),
        ConvKey::Group(group) => (
            Vec::new(),
            group,
            Conversation {
                user_id: 0,
                group_id: group,
            },
        ),
    };
    Signal {
        recipients,
        group_id,
        body: Some(signal::Body::ReadMark(ReadMark {
            conversation: Some(conversation),
            seq,
            user_id: user,
        })),
    }
}

/// Relays a read mark already stored (the HTTP `…/read` endpoints) to the peer, or to the
/// group's watchers.
pub async fn relay_read_mark(state: &AppState, user: u64, conv: ConvKey, seq: u64) {
    let signal = read_mark_signal(user, conv, seq);
    match conv {
        ConvKey::User(peer) => send_signals(state, vec![(peer, signal)], Vec::new()).await,
        ConvKey::Group(_) => send_signals(state, Vec::new(), vec![signal]).await,
    }
}

/// Sends signals to the servers of their users (one route lookup for all) and group
/// signals to every live server, one call per server.
async fn send_signals(state: &AppState, to_users: Vec<(u64, Signal)>, to_groups: Vec<Signal>) {
    let servers = state.servers();
    let mut per_server: BTreeMap<String, (String, Vec<Signal>)> = BTreeMap::new();
    if !to_users.is_empty() {
        let users: Vec<u64> = to_users.iter().map(|(u, _)| *u).collect();
        let routes = state.store().routes(&users).await.unwrap_or_default();
        for ((_, signal), route) in to_users.into_iter().zip(routes) {
            let Some(route) = route else { continue };
            let Some(server) = live_server(&servers, &route.server_id) else {
                continue;
            };
            per_server
                .entry(server.id.clone())
                .or_insert_with(|| (server.internal_addr.clone(), Vec::new()))
                .1
                .push(signal);
        }
    }
    if !to_groups.is_empty() {
        for server in servers.iter() {
            per_server
                .entry(server.id.clone())
                .or_insert_with(|| (server.internal_addr.clone(), Vec::new()))
                .1
                .extend(to_groups.iter().cloned());
        }
    }
    join_all(per_server.into_iter().map(|(id, (addr, signals))| async move {
        if addr.is_empty() {
            return;
        }
        let req = SignalRequest { signals };
        if let Err(e) = state
            .cluster()
            .call::<_, SignalResponse>(&addr, SIGNAL_PATH, &req)
            .await
        {
            tracing::debug!(server = %id, error = %e, "relaying typing / read marks failed");
        }
    }))
    .await;
}
