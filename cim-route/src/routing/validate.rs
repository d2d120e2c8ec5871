//! The checks of a message that need no backend ([`validate`]: kind, sender, receiver,
//! body, channel name, client message id), and the resolution of private receivers to user
//! ids ([`resolve_receivers`]: known accounts from [`crate::known_users`], the others looked
//! up), before [`super::route_batch`] accepts a message.

use super::{failed, Kind, Outgoing, LOOKUP_CONCURRENCY};
use crate::known_users::KnownUsers;
use cim_common::{
    pb::{ErrorCode, MessageKind, SendResult},
    store::RouteStore,
};
use cim_proto::ids;
use futures_util::{stream, StreamExt};
use std::collections::{HashMap, HashSet};

/// How a private message names its receiver.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Receiver {
    Id(u64),
    Name(String),
}

/// A message that passed validation.
pub(super) struct Valid {
    pub(super) index: usize,
    pub(super) kind: Kind,
    pub(super) message_kind: MessageKind,
    pub(super) receiver: Option<Receiver>,
    pub(super) item: Outgoing,
}

/// Checks one item without touching any backend.
pub(super) fn validate(
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
        Some(MessageKind::GroupChat) => Kind::GroupChat,
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
    if kind == Kind::GroupChat && send.group_id == 0 {
        return Err(failed(
            client_id,
            ErrorCode::BadRequest,
            "missing group_id: GROUP_CHAT messages name their group",
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
        Kind::Group | Kind::Channel | Kind::GroupChat => None,
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
pub(super) async fn resolve_receivers(
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
