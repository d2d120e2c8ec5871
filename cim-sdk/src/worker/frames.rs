//! What comes in on the connection: frames turned into events and send results
//! ([`on_frame`]), and the acks of stored messages written back ([`write_acks`]).

use super::*;

/// Writes the acks at the front of `backlog` (every event before them is in the events
/// channel), merged into as few frames as the limit per frame allows.
pub(super) async fn write_acks(
    conn: &mut Connection,
    backlog: &mut Backlog,
) -> Result<(), ConnError> {
    let (ids, groups) = take_front_acks(backlog);
    if ids.is_empty() && groups.is_empty() {
        return Ok(());
    }
    tokio::time::timeout(WRITE_TIMEOUT, conn.ack_all(ids, groups))
        .await
        .map_err(|_| ConnError::Timeout)?
}

/// Removes the acks at the front of `backlog` and returns their ids and group positions
/// (the highest seq per group).
pub(super) fn take_front_acks(backlog: &mut Backlog) -> (Vec<String>, Vec<(u64, u64)>) {
    let mut ids = Vec::new();
    let mut groups: Vec<(u64, u64)> = Vec::new();
    loop {
        match backlog.front() {
            Some(Item::Ack(_)) => {
                if let Some(Item::Ack(more)) = backlog.pop_front() {
                    ids.extend(more);
                }
            }
            Some(Item::GroupAck(_)) => {
                if let Some(Item::GroupAck(more)) = backlog.pop_front() {
                    for (group, seq) in more {
                        match groups.iter_mut().find(|(g, _)| *g == group) {
                            Some(at) => at.1 = at.1.max(seq),
                            None => groups.push((group, seq)),
                        }
                    }
                }
            }
            _ => return (ids, groups),
        }
    }
}

/// The event for one received (new) message: receipts have their own.
pub(super) fn event_of(message: pb::Message, replayed: bool) -> Event {
    if message.kind == pb::MessageKind::Receipt as i32 {
        Event::Receipt {
            message_id: message.receipt_for,
            by_user_id: message.sender_id,
            by_name: message.sender_name,
            at_ms: message.timestamp_ms,
        }
    } else {
        Event::Message { message, replayed }
    }
}

/// Handles one received frame; `Some` when the connection must end.
pub(super) fn on_frame(
    frame: Frame,
    recent: &mut RecentIds,
    pending: &mut PendingSends,
    backlog: &mut Backlog,
    last_error: &mut Option<String>,
) -> Option<End> {
    match frame.body {
        Some(Body::Push(push)) => {
            // Duplicates are acked too: a replay repeats what we had, and only an ack takes it
            // out of the inbox.
            let ack = conn::ack_ids(&push);
            let positions = conn::group_positions(&push);
            let replayed = push.replay;
            for message in push.messages {
                if recent.insert(&message.id) {
                    backlog.push_back(Item::Event(event_of(message, replayed)));
                }
            }
            if !ack.is_empty() {
                backlog.push_back(Item::Ack(ack));
            }
            if !positions.is_empty() {
                backlog.push_back(Item::GroupAck(positions));
            }
        }
        Some(Body::SendResult(result)) => {
            if let Some(sent) = pending.remove(&result.client_id) {
                let _ = sent.reply.send(outcome(result));
            }
        }
        Some(Body::Pong(_)) => {}
        Some(Body::ReadMark(mark)) => backlog.push_back(Item::Event(Event::ReadMark {
            conversation: mark.conversation.unwrap_or_default(),
            by_user_id: mark.user_id,
            seq: mark.seq,
        })),
        Some(Body::Typing(typing)) => backlog.push_back(Item::Event(Event::Typing {
            conversation: typing.conversation.unwrap_or_default(),
            by_user_id: typing.user_id,
            by_name: typing.user_name,
            stopped: typing.stopped,
        })),
        Some(Body::Kick(kick)) => {
            let reason = KickReason::try_from(kick.reason).unwrap_or(KickReason::Unspecified);
            let why = format!("kicked ({}): {}", reason.as_str_name(), kick.message);
            backlog.push_back(Item::Event(Event::Kicked {
                reason,
                message: kick.message,
            }));
            return Some(if crate::client::kick_ends_session(reason) {
                End::Closed(why)
            } else {
                End::Reconnect(why)
            });
        }
        Some(Body::Error(error)) => {
            let code = pb::ErrorCode::try_from(error.code).unwrap_or_default();
            tracing::debug!(code = code.as_str_name(), message = %error.message, "error frame");
            // An unsupported frame leaves the connection open; every other error comes right
            // before the server closes it (heartbeat timeout, bad frame, ...): the reason.
            if code != pb::ErrorCode::UnsupportedFrame {
                *last_error = Some(format!(
                    "server error {}: {}",
                    code.as_str_name(),
                    error.message
                ));
            }
        }
        Some(other) => {
            tracing::debug!(
                frame = Frame::new(other).kind_name(),
                "unexpected frame ignored"
            );
        }
        None => tracing::debug!("frame of an unknown kind ignored"),
    }
    None
}
