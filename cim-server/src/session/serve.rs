//! The logged-in part of a session ([`serve`]): the `LoginResult`, the replay, then one loop
//! waiting on the outbound queue, the next client frames and the heartbeat deadline, with
//! held senders waiting for room in the forward queue.

use super::{
    replay::{group_catch_up, group_start, inbox_start, replay, unreplayed, GroupTops},
    write::{fail_after_queued, write},
    End, RecvError, Transport,
};
use crate::{
    ack::{self, AckItem},
    conn::{ConnShared, Outbound},
    forward::Signal,
    groups::{WatchRefused, MAX_READ_WATCHES},
    metrics::Tally,
    pb::{frame::Body, ErrorCode, Frame, KickReason, LoginResult, Pong, SendResult},
    server::ServerState,
};
use cim_common::metrics::GaugeGuard;
use futures_util::FutureExt;
use std::{sync::Arc, time::Duration};
use tokio::time::Instant;

/// Frames handled per wake-up before answers are written: frames a client pipelined are
/// answered in one write, and a flood cannot keep the session from writing.
const MAX_FRAMES_PER_WAKE: usize = 64;

/// What a received frame asks the session to do.
enum Step {
    Continue,
    End(End),
    /// Answer this error, then close.
    Fail(ErrorCode, String),
}

/// Handles one result of `recv` in the logged-in loop. Answers go through the connection's
/// own queue so that they are written together with pending deliveries.
///
/// A send that finds the forward queue full goes to `held`, and so does every send after it
/// until the session has waited for room (sends keep their order); other frames are
/// answered meanwhile.
// Boxed, not a bare Vec: `held` lives in the session future that every idle connection holds,
// where 8 bytes beat 24 (`session_future_is_small`).
#[allow(clippy::box_collection)]
fn on_recv(
    state: &ServerState,
    conn: &Arc<ConnShared>,
    held: &mut Option<Box<Vec<crate::pb::Send>>>,
    tally: &mut Tally,
    received: Result<Option<Frame>, RecvError>,
) -> Step {
    let frame = match received {
        Ok(Some(frame)) => frame,
        Ok(None) => return Step::End(End::PeerClosed),
        Err(RecvError::Io(e)) => return Step::End(End::ReadFailed(e)),
        Err(RecvError::Protocol { code, message }) => return Step::Fail(code, message),
    };
    tally.add(&frame);
    let kind = frame.kind_name();
    match frame.body {
        Some(Body::Ping(ping)) => conn.reply(Frame::new(Body::Pong(Pong { nonce: ping.nonce }))),
        Some(Body::Send(send)) => {
            if let Err(wait) = state.send_limit.check(&conn.user_id) {
                state.metrics.sends_rate_limited.inc();
                conn.reply(rate_limited(send.client_id, wait, &state.config));
                return Step::Continue;
            }
            match held {
                Some(sends) => sends.push(send),
                None => {
                    if let Err(send) = state.forward.submit(conn, send) {
                        *held = Some(Box::new(vec![send]));
                    }
                }
            }
        }
        Some(Body::Ack(a)) => {
            match ack::validate(a.message_ids)
                .and_then(|ids| Ok((ids, ack::validate_groups(a.groups)?)))
            {
                Ok((ids, groups)) if ids.is_empty() && groups.is_empty() => {}
                Ok((ids, groups)) => state.acks.submit(AckItem::acks(conn.clone(), ids, groups)),
                Err(message) => conn.reply(Frame::error(ErrorCode::BadRequest, message)),
            }
        }
        Some(Body::ReadMark(mark)) => {
            if !valid_conversation(mark.conversation.as_ref()) {
                conn.reply(Frame::error(
                    ErrorCode::BadRequest,
                    "a ReadMark names one conversation: user_id or group_id",
                ));
            } else if state.send_limit.check(&conn.user_id).is_err() {
                state.metrics.sends_rate_limited.inc();
                conn.reply(Frame::error(
                    ErrorCode::RateLimited,
                    "too many read marks: slow down (marks only move forward: send the latest)",
                ));
            } else if !state.forward.submit_signal(conn, Signal::ReadMark(mark)) {
                conn.reply(Frame::error(
                    ErrorCode::Overloaded,
                    "read mark not relayed: too many frames waiting for a route; send it again",
                ));
            }
        }
        Some(Body::Typing(typing)) => {
            if !valid_conversation(typing.conversation.as_ref()) {
                conn.reply(Frame::error(
                    ErrorCode::BadRequest,
                    "a Typing frame names one conversation: user_id or group_id",
                ));
            } else if conn.typing_allowed(cim_common::time::now_ms(), TYPING_MIN_GAP_MS) {
                // Dropped when the queue is full: an indicator is worth nothing late.
                let _ = state.forward.submit_signal(conn, Signal::Typing(typing));
            }
        }
        Some(Body::WatchReads(w)) => {
            match state
                .table
                .groups
                .watch_reads(conn.user_id, w.group_id, !w.stop)
            {
                Ok(()) => {}
                Err(WatchRefused::NotMember) => conn.reply(Frame::error(
                    ErrorCode::Forbidden,
                    format!(
                        "not a member of group {}: only members watch its read marks",
                        w.group_id
                    ),
                )),
                Err(WatchRefused::TooMany) => conn.reply(Frame::error(
                    ErrorCode::BadRequest,
                    format!(
                        "a connection watches the read marks of at most {MAX_READ_WATCHES} \
                         groups: stop one first"
                    ),
                )),
            }
        }
        Some(Body::Login(_)) => conn.reply(Frame::error(
            ErrorCode::UnsupportedFrame,
            "already logged in",
        )),
        Some(_) => conn.reply(Frame::error(
            ErrorCode::UnsupportedFrame,
            format!("{kind} frames are sent by the server, not to it"),
        )),
        None => conn.reply(Frame::error(
            ErrorCode::UnsupportedFrame,
            "unknown frame body",
        )),
    }
    Step::Continue
}

/// Typing frames relayed per connection at most once per this many ms (the rest dropped).
const TYPING_MIN_GAP_MS: i64 = 500;

/// A conversation that names exactly one peer or group.
fn valid_conversation(c: Option<&crate::pb::Conversation>) -> bool {
    c.is_some_and(|c| (c.user_id == 0) != (c.group_id == 0))
}

/// The answer to a send over the connection's rate (it is not forwarded; the connection
/// stays).
fn rate_limited(client_id: u64, wait: Duration, config: &crate::config::ServerConfig) -> Frame {
    Frame::new(Body::SendResult(SendResult::failed(
        client_id,
        ErrorCode::RateLimited,
        format!(
            "too many sends: at most {} per second ({} at once); retry in {} ms",
            config.send_rate_per_sec,
            config.send_burst,
            wait.as_millis().max(1)
        ),
    )))
}

/// The answer to a send that found no room in the forward queue in time.
fn overloaded(client_id: u64) -> Frame {
    Frame::new(Body::SendResult(SendResult::failed(
        client_id,
        ErrorCode::Overloaded,
        "too many sends waiting for a route: slow down and retry",
    )))
}

/// Writes what is queued for the connection; `Some` when the connection must end (a close
/// was requested, or the write failed). Pushes the replay covered are skipped.
async fn flush_queue<T: Transport>(
    state: &ServerState,
    transport: &mut T,
    conn: &ConnShared,
    covered: Option<&Covered>,
) -> Option<End> {
    let (mut items, closing) = conn.take();
    if let Some(c) = covered {
        items = items
            .into_iter()
            .filter_map(|item| unreplayed(item, c.inbox_upto, c.groups.as_ref()))
            .collect();
    }
    let timeout = state.config.write_timeout();
    if let Some(closing) = closing {
        if !closing.flush {
            items.clear();
        }
        items.push(closing.frame);
        let _ = write(state, transport, &items, timeout).await;
        return Some(match closing.reason {
            KickReason::ServerShutdown => End::Shutdown,
            reason => End::Kicked(reason),
        });
    }
    if items.is_empty() {
        return None;
    }
    write(state, transport, &items, timeout)
        .await
        .err()
        .map(End::WriteFailed)
}

/// The start of a logged-in session: the inbox's top and first page and the group cursors
/// read before the client learns it is connected (what it is sent from then on was stored
/// after those reads and comes live, so the replay and the catch-up mark exactly what was
/// sent before the login completed), the `LoginResult`, the replay, the group catch-up.
/// Returns the last inbox seq replayed and the group tops caught up to.
async fn begin<T: Transport>(
    state: &ServerState,
    transport: &mut T,
    conn: &Arc<ConnShared>,
) -> Result<Option<Box<Covered>>, End> {
    let config = &state.config;
    let (top, first_page) = inbox_start(state, transport, conn).await?;
    // The same for the user's groups: subscribed, then their tops read (see `group_start`).
    let cursors = group_start(state, transport, conn).await?;
    let login_result = Frame::new(Body::LoginResult(LoginResult {
        user_id: conn.user_id,
        user_name: conn.user_name.clone(),
        server_id: state.id.clone(),
        // Validated to fit in 32 bits.
        heartbeat_interval_ms: u32::try_from(config.heartbeat_interval_ms).unwrap_or(u32::MAX),
        heartbeat_timeout_ms: u32::try_from(config.heartbeat_timeout_ms()).unwrap_or(u32::MAX),
        max_frame_len: u32::try_from(config.max_frame_len).unwrap_or(u32::MAX),
    }));
    write(
        state,
        transport,
        &[Outbound::new(login_result)],
        config.write_timeout(),
    )
    .await
    .map_err(End::WriteFailed)?;
    let replayed_upto = replay(state, transport, conn, top, first_page).await?;
    let group_tops = group_catch_up(state, transport, cursors).await?;
    // Receipts this user acked that were never confirmed stored (a route was down, or the
    // server that took the ack stopped first) are sent again now. Only an inbox that ever
    // held a message can have any.
    if top > 0 {
        state.acks.submit(AckItem::resend_pending(conn.clone()));
    }
    Ok((replayed_upto > 0 || group_tops.is_some()).then(|| {
        Box::new(Covered {
            inbox_upto: replayed_upto,
            groups: group_tops,
        })
    }))
}

/// What the login's replay and catch-up wrote, which live pushes must not repeat: the last
/// inbox seq replayed and the groups' tops caught up to. Boxed (and absent when nothing was
/// written): one pointer in every idle session's future.
struct Covered {
    inbox_upto: u64,
    groups: Option<GroupTops>,
}

/// The logged-in part: LoginResult, the inbox replay, then frames both ways until
/// something ends it.
pub(super) async fn serve<T: Transport>(
    state: &ServerState,
    transport: &mut T,
    conn: &Arc<ConnShared>,
) -> End {
    let config = &state.config;
    // One boxed step for everything before the loop: its state (the inbox's first page, the
    // group cursors) lives in that allocation only while it runs, not in the session future
    // that every idle connection keeps.
    let covered = match Box::pin(begin(state, transport, conn)).await {
        Ok(started) => started,
        Err(end) => return end,
    };

    // The deadline timer is re-armed only when it fires (from the last activity), not on
    // every frame: a busy connection does not churn the timer wheel. (Values are read from
    // the config where used rather than kept in locals: every idle connection's future would
    // carry them.)
    let mut last_activity = Instant::now();
    let deadline = tokio::time::sleep_until(last_activity + config.heartbeat_timeout());
    tokio::pin!(deadline);

    // Sends waiting for room in the forward queue (see `on_recv`). Awaited outside the
    // `select!`, whose futures would otherwise be held alongside, growing every idle
    // session's future; boxed for the same reason.
    let mut held: Option<Box<Vec<crate::pb::Send>>> = None;
    loop {
        if let Some(sends) = held.take() {
            // Not reading meanwhile is the point: the client's writes back up in TCP. The
            // sends of one wake-up wait together and enter the queue together: a sender's
            // burst stays one run in the forward call, which the route and the inbox store
            // handle per receiver (measured: one at a time, flat out fell from ~70k to
            // ~52k msg/s, the inbox script taking 4 messages per call instead of 30).
            // Writing goes on: pushes, results and kicks for this client still leave, so a
            // held sender is never closed as a slow consumer by its own wait.
            let wait = async {
                let _held = GaugeGuard::new(&state.metrics.held_senders);
                let submit = state
                    .forward
                    .submit_all_waiting(conn, *sends, config.forward_wait());
                tokio::pin!(submit);
                loop {
                    tokio::select! {
                        biased;
                        refused = &mut submit => return Ok(refused),
                        () = conn.notified() => {
                            if let Some(end) = flush_queue(state, transport, conn, covered.as_deref()).await {
                                return Err(end);
                            }
                        }
                    }
                }
            };
            match Box::pin(wait).await {
                Ok(refused) => {
                    for send in refused {
                        conn.reply(overloaded(send.client_id));
                    }
                }
                Err(end) => return end,
            }
            last_activity = Instant::now();
        }
        tokio::select! {
            biased;
            () = conn.notified() => {
                if let Some(end) = Box::pin(flush_queue(state, transport, conn, covered.as_deref())).await {
                    return end;
                }
            }
            received = transport.recv() => {
                last_activity = Instant::now();
                // The frames of a burst are counted together (scoped: the tally is not kept
                // in the session future across the awaits below).
                let step = {
                    let mut tally = Tally::default();
                    let mut step = on_recv(state, conn, &mut held, &mut tally, received);
                    // Frames already buffered are handled now, their answers leave in one write.
                    for _ in 1..MAX_FRAMES_PER_WAKE {
                        if !matches!(step, Step::Continue) {
                            break;
                        }
                        match transport.recv().now_or_never() {
                            Some(received) => {
                                step = on_recv(state, conn, &mut held, &mut tally, received)
                            }
                            None => break,
                        }
                    }
                    tally.flush(&state.metrics.frames_in);
                    step
                };
                match step {
                    Step::Continue => {}
                    Step::End(end) => return end,
                    Step::Fail(code, message) => {
                        return Box::pin(fail_after_queued(state, transport, conn, code, message))
                            .await;
                    }
                }
            }
            () = &mut deadline => {
                let expires = last_activity + config.heartbeat_timeout();
                if Instant::now() < expires {
                    deadline.as_mut().reset(expires);
                    continue;
                }
                let msg = format!(
                    "no frame for {} ms: heartbeat timeout",
                    config.heartbeat_timeout_ms()
                );
                return Box::pin(fail_after_queued(state, transport, conn, ErrorCode::HeartbeatTimeout, msg)).await;
            }
        }
    }
}
