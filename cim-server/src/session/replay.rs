//! The inbox replay of a new login: the top seq and first page read before the
//! `LoginResult` ([`inbox_start`]), the pages up to that top written as replay Push frames
//! ([`replay`]), and the live pushes that replay already covered dropped ([`unreplayed`]).
//! See the session's module doc for why replay and live pushes never lose or repeat a
//! message.

use super::{
    write::{fail, write},
    End, Transport,
};
use crate::{
    conn::{ConnShared, Outbound},
    pb::{frame::Body, ErrorCode, Frame, Message, Push},
    server::ServerState,
};
use tracing::warn;

/// Messages per inbox read during the replay.
pub(super) const REPLAY_PAGE: usize = 200;

/// The tops of the user's groups that the login's catch-up wrote up to: live group
/// messages at or below them were in the catch-up.
pub(super) type GroupTops = std::collections::HashMap<u64, u64>;

/// Whether `m` is a group message the catch-up already wrote.
fn caught_up(m: &Message, tops: Option<&GroupTops>) -> bool {
    m.group_id != 0
        && m.log_seq != 0
        && tops.is_some_and(|t| t.get(&m.group_id).is_some_and(|&top| m.log_seq <= top))
}

/// `item` without the stored messages the replay already wrote; `None` when nothing is left.
/// (A live push merges several messages of one recipient: some may predate the replay's
/// watermark and some not.)
pub(super) fn unreplayed(
    item: Outbound,
    replayed_upto: u64,
    groups: Option<&GroupTops>,
) -> Option<Outbound> {
    let Some(Body::Push(push)) = &item.frame().body else {
        return Some(item);
    };
    // Inbox seqs are those of private messages (group messages have none).
    let replayed = |m: &Message| (m.seq != 0 && m.seq <= replayed_upto) || caught_up(m, groups);
    let n = push.messages.iter().filter(|m| replayed(m)).count();
    if push.replay || n == 0 {
        return Some(item);
    }
    if n == push.messages.len() {
        return None;
    }
    let messages = push
        .messages
        .iter()
        .filter(|m| !replayed(m))
        .cloned()
        .collect();
    Some(Outbound::new(Frame::new(Body::Push(Push {
        messages,
        replay: false,
    }))))
}

/// Splits replayed messages into Push frames of at most [`crate::chunks::PUSH_FRAME_BYTES`].
fn replay_frames(messages: Vec<Message>) -> Vec<Outbound> {
    crate::chunks::split_by_size(
        messages,
        crate::chunks::PUSH_FRAME_BYTES,
        prost::Message::encoded_len,
    )
    .into_iter()
    .map(|messages| {
        Outbound::new(Frame::new(Body::Push(Push {
            messages,
            replay: true,
        })))
    })
    .collect()
}

/// One page of the user's inbox after `after`; a store failure ends the connection
/// ([`inbox_unavailable`]).
async fn inbox_page<T: Transport>(
    state: &ServerState,
    transport: &mut T,
    conn: &ConnShared,
    after: u64,
) -> Result<Vec<Message>, End> {
    match state
        .store
        .inbox_read(conn.user_id, after, REPLAY_PAGE)
        .await
    {
        Ok(page) => Ok(page),
        Err(e) => Err(inbox_unavailable(state, transport, e).await),
    }
}

/// Ends a login whose inbox cannot be read with `UNAVAILABLE` (the client reconnects and
/// tries again: going on without the replay would leave its stored messages waiting for the
/// next connection).
async fn inbox_unavailable<T: Transport>(
    state: &ServerState,
    transport: &mut T,
    e: cim_common::store::StoreError,
) -> End {
    warn!(error = %e, "reading the inbox failed");
    let message = "state store unavailable: your stored messages cannot be read, reconnect later";
    fail(state, transport, ErrorCode::Unavailable, message.into()).await
}

/// The inbox's top seq, then its first page (in that order: whatever the page holds past
/// `top` arrived after both and comes live).
pub(super) async fn inbox_start<T: Transport>(
    state: &ServerState,
    transport: &mut T,
    conn: &ConnShared,
) -> Result<(u64, Vec<Message>), End> {
    let top = match state.store.inbox_top(conn.user_id).await {
        Ok(top) => top,
        Err(e) => return Err(inbox_unavailable(state, transport, e).await),
    };
    if top == 0 {
        // Nothing was ever stored for this user: no page to read.
        return Ok((0, Vec::new()));
    }
    Ok((top, inbox_page(state, transport, conn, 0).await?))
}

/// Writes the user's inbox up to seq `top`, oldest first, as replay Push frames: `first`
/// (read before the `LoginResult`), then the pages after it. Messages over `top` were
/// stored after the connection could be found (`top` is read after attach), so they come
/// live and are left out here: `replay` marks exactly what was sent before the login
/// completed, however large the inbox. Returns the last seq written (0: nothing was).
pub(super) async fn replay<T: Transport>(
    state: &ServerState,
    transport: &mut T,
    conn: &ConnShared,
    top: u64,
    first: Vec<Message>,
) -> Result<u64, End> {
    let mut written = 0;
    let mut page = first;
    loop {
        let Some(last) = page.last().map(|m| m.seq) else {
            return Ok(written);
        };
        // A short page is the end, and so is one that reached `top`.
        let more = page.len() >= REPLAY_PAGE && last < top;
        page.retain(|m| m.seq <= top);
        if let Some(m) = page.last() {
            written = m.seq;
            let frames = replay_frames(page);
            write(state, transport, &frames, state.config.write_timeout())
                .await
                .map_err(End::WriteFailed)?;
        }
        if !more {
            return Ok(written);
        }
        page = inbox_page(state, transport, conn, last).await?;
    }
}

/// The user's groups at login: subscribes the connection to the groups the store lists,
/// then reads their tops again. In that order: a message appended after the second read
/// is pushed to a connection already subscribed (it comes live), one appended before is at
/// or below the top (the catch-up writes it). A store failure ends the login like an
/// unreadable inbox.
pub(super) async fn group_start<T: Transport>(
    state: &ServerState,
    transport: &mut T,
    conn: &ConnShared,
) -> Result<Vec<cim_common::store::GroupCursor>, End> {
    let listed = match state.store.group_cursors(conn.user_id).await {
        Ok(c) => c,
        Err(e) => return Err(inbox_unavailable(state, transport, e).await),
    };
    if listed.is_empty() {
        return Ok(listed);
    }
    let groups: Vec<u64> = listed.iter().map(|c| c.group).collect();
    state.table.groups.subscribe(conn.user_id, &groups);
    match state.store.group_cursors(conn.user_id).await {
        // The versions read here are not noted as checked: other users' subscriptions on this
        // server may predate them (the first message of the group checks them all).
        Ok(c) => Ok(c),
        Err(e) => Err(inbox_unavailable(state, transport, e).await),
    }
}

/// Writes each group's messages after the user's position up to the top read at login, as
/// replay Push frames, oldest first per group. Returns the tops written up to (what live
/// pushes must not repeat).
pub(super) async fn group_catch_up<T: Transport>(
    state: &ServerState,
    transport: &mut T,
    cursors: Vec<cim_common::store::GroupCursor>,
) -> Result<Option<GroupTops>, End> {
    let mut tops = GroupTops::new();
    for cursor in cursors {
        let mut after = cursor.position;
        while after < cursor.top {
            let mut page = match state
                .store
                .group_read(cursor.group, after, REPLAY_PAGE)
                .await
            {
                Ok(page) => page,
                Err(e) => return Err(inbox_unavailable(state, transport, e).await),
            };
            let short = page.len() < REPLAY_PAGE;
            page.retain(|m| m.log_seq <= cursor.top);
            let Some(last) = page.last().map(|m| m.log_seq) else {
                break;
            };
            for m in &mut page {
                m.group_id = cursor.group;
            }
            write(
                state,
                transport,
                &replay_frames(page),
                state.config.write_timeout(),
            )
            .await
            .map_err(End::WriteFailed)?;
            after = last;
            if short {
                break;
            }
        }
        tops.insert(cursor.group, cursor.top);
    }
    Ok((!tops.is_empty()).then_some(tops))
}
