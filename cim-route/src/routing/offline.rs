//! The offline-push hook: a `message` event (webhook and SSE, beside the presence events)
//! for each stored private or group message whose receiver is offline, so that a business
//! backend can send an APNs / FCM notification. On with the route's `message_events`.
//!
//! Private: the receivers the push did not reach (`SendStatus::Stored`). Group: the members
//! without a route to a live server, found off the message's path (a task per run: the
//! members page by page and their routes, O(members) store work, which is why it is opt-in).
//! The store publishes each (message, receiver) once within `MESSAGE_EVENT_DEDUP`, so a
//! retried send does not notify twice; one whose first attempt stopped before publishing
//! does notify (at least once).

use crate::state::{live_server, AppState};
use cim_common::{
    events::{MessageEvent, PresenceEvent, PresenceKind},
    pb::{Message, MessageKind},
    store::chat::MAX_MEMBERS_PAGE,
};

/// The `message` event telling `receiver` about `m`.
fn event_for(m: &Message, receiver: u64, with_body: bool) -> PresenceEvent {
    let (conversation_type, conversation_id) = if m.group_id != 0 {
        ("group", m.group_id)
    } else {
        ("user", m.sender_id)
    };
    PresenceEvent {
        kind: PresenceKind::Message,
        user_id: receiver,
        name: String::new(),
        server_id: String::new(),
        at_ms: cim_common::time::now_ms(),
        reason: String::new(),
        message: Some(MessageEvent {
            id: m.id.clone(),
            sender_id: m.sender_id,
            sender_name: m.sender_name.clone(),
            conversation_type: conversation_type.into(),
            conversation_id,
            kind: MessageKind::try_from(m.kind)
                .unwrap_or_default()
                .as_str_name()
                .to_string(),
            log_seq: m.log_seq,
            body: with_body.then(|| m.body.clone()),
        }),
    }
}

async fn publish(state: &AppState, events: Vec<PresenceEvent>) {
    if events.is_empty() {
        return;
    }
    if let Err(e) = state.store().publish_messages(&events).await {
        tracing::warn!(error = %e, events = events.len(), "publishing message events failed");
    }
}

/// Private messages stored for receivers that were not reached.
pub(super) async fn private_offline(state: &AppState, offline: &[Message]) {
    let config = state.config();
    if !config.message_events {
        return;
    }
    let events = offline
        .iter()
        .filter(|m| m.kind == MessageKind::Private as i32)
        .map(|m| event_for(m, m.receiver_id, config.message_events_body))
        .collect();
    publish(state, events).await;
}

/// Group messages just appended: their members without a live route, in a task of its own.
pub(super) fn group_offline(state: &AppState, messages: Vec<Message>) {
    let config = state.config();
    if !config.message_events || messages.is_empty() {
        return;
    }
    let with_body = config.message_events_body;
    let state = state.clone();
    tokio::spawn(async move {
        let servers = state.servers();
        // Per group: its members once, then an event per message for each offline one.
        let mut groups: Vec<u64> = messages.iter().map(|m| m.group_id).collect();
        groups.sort_unstable();
        groups.dedup();
        for group in groups {
            let mut after = 0;
            loop {
                let page = match state
                    .store()
                    .group_members(group, after, MAX_MEMBERS_PAGE)
                    .await
                {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::warn!(group, error = %e, "reading members for message events failed");
                        break;
                    }
                };
                let Some(last) = page.last().map(|m| m.user_id) else {
                    break;
                };
                let ids: Vec<u64> = page.iter().map(|m| m.user_id).collect();
                let routes = state.store().routes(&ids).await.unwrap_or_default();
                let offline: Vec<u64> = ids
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| {
                        routes
                            .get(*i)
                            .and_then(Option::as_ref)
                            .is_none_or(|r| live_server(&servers, &r.server_id).is_none())
                    })
                    .map(|(_, &id)| id)
                    .collect();
                let events = messages
                    .iter()
                    .filter(|m| m.group_id == group)
                    .flat_map(|m| {
                        offline
                            .iter()
                            .filter(|&&u| u != m.sender_id)
                            .map(|&u| event_for(m, u, with_body))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                publish(&state, events).await;
                if page.len() < MAX_MEMBERS_PAGE {
                    break;
                }
                after = last;
            }
        }
    });
}
