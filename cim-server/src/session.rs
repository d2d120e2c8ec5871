//! The life of one client connection, written once for every transport: login handshake,
//! heartbeats, frames from the client, delivery of queued frames, and cleanup.
//!
//! One task per connection runs [`run`]. Once logged in, it waits on three things at once
//! (its outbound queue, the next client frame, the heartbeat deadline) and holds no other
//! task, timer or buffer while idle. Kicks, slow-consumer closes and the server shutdown all
//! arrive through the queue (`ConnShared::close`).
//!
//! Sequence: the first frame must be a `Login` with a connect token valid for this server;
//! the login session is attached in the state store, the connection enters the table, the
//! inbox's top seq and first page (stored messages not acked yet) are read, and it gets a
//! `LoginResult`. Then the inbox is replayed up to that top, oldest first, as
//! `Push { replay: true }` frames, and only then does the queue of live deliveries flow. On
//! exit, for whatever reason, it leaves the table and is detached.
//!
//! Replay and live pushes overlap safely: the connection is attached (so routes push here)
//! before the top is read, and routes store a message before pushing it. A message stored
//! before that is replayed; its live push, if one arrives, carries a seq not above the last
//! replayed one and is dropped here; a message stored after it has a higher seq, is left out
//! of the replay and is delivered live. Either way it reaches the client, once per
//! connection. Reading before the `LoginResult` makes the replay flag mean what clients show
//! it as: sent before the login completed ("while you were offline"), never a message sent
//! once it knew it was connected, however many pages the replay takes.
//!
//! A send that finds the forward queue full is not refused at once: the session stops reading
//! (the client's writes back up in TCP) until there is room, for up to `forward_wait_ms`, and
//! goes on writing what is queued for the client meanwhile.

use crate::metrics::Tally;
use crate::{
    ack::{self, AckItem},
    admission::Ticket,
    conn::{ConnShared, Outbound},
    pb::{frame::Body, ErrorCode, Frame, KickReason, LoginResult, Message, Pong, Push, SendResult},
    server::ServerState,
};
use cim_common::{
    metrics::{frame_kind_index, GaugeGuard},
    store::AttachOutcome,
    time::now_ms,
    token::TokenError,
};
use futures_util::FutureExt;
use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument, Span};

/// Frames handled per wake-up before answers are written: frames a client pipelined are
/// answered in one write, and a flood cannot keep the session from writing.
const MAX_FRAMES_PER_WAKE: usize = 64;
/// Longest wait for the client to close after our last frame.
const MAX_LINGER: Duration = Duration::from_secs(1);
/// Messages per inbox read during the replay.
const REPLAY_PAGE: usize = 200;

/// A way of exchanging frames with one client.
pub(crate) trait Transport: Send {
    /// Short name for logs ("tcp", "ws").
    const KIND: &'static str;

    /// The next frame; `Ok(None)` when the client closed the connection. Must be
    /// cancel-safe: the session drops it whenever something else happens first.
    fn recv(&mut self) -> impl Future<Output = Result<Option<Frame>, RecvError>> + Send;

    /// Writes a burst of frames and flushes them.
    fn send(&mut self, items: &[Outbound]) -> impl Future<Output = io::Result<()>> + Send;

    /// Closes the connection after the last frame, waiting at most `linger` for the client.
    fn close(&mut self, linger: Duration) -> impl Future<Output = ()> + Send;

    /// Frames up to `max` bytes are accepted from now on (raised after login from the
    /// pre-login limit). A transport whose limit is fixed at its handshake keeps it.
    fn set_max_frame_len(&mut self, _max: usize) {}
}

/// Why `recv` produced no frame.
#[derive(Debug)]
pub(crate) enum RecvError {
    /// The client sent something that is not a frame: answer `code`, then close.
    Protocol { code: ErrorCode, message: String },
    /// The connection broke (reset, truncated frame, ...): nothing can be sent anymore.
    Io(String),
}

/// Why a session ended (for the log line and the metrics).
#[derive(Debug)]
pub(crate) enum End {
    PeerClosed,
    /// We sent an Error frame with this code and closed.
    Failed(ErrorCode, String),
    Kicked(KickReason),
    Shutdown,
    ReadFailed(String),
    WriteFailed(String),
}

impl End {
    /// A newer connection of the same user took over.
    pub(crate) fn is_replaced(&self) -> bool {
        matches!(self, End::Kicked(KickReason::Replaced))
    }

    /// Closed because its outbound queue was full.
    pub(crate) fn is_slow_consumer(&self) -> bool {
        matches!(self, End::Kicked(KickReason::SlowConsumer))
    }

    /// The reason of the offline event this end publishes (see `cim_common::events`).
    pub(crate) fn offline_reason(&self) -> &'static str {
        use cim_common::events::reason;
        match self {
            End::PeerClosed => reason::CLOSED,
            End::Shutdown | End::Kicked(KickReason::ServerShutdown) => reason::SERVER_SHUTDOWN,
            End::Kicked(KickReason::LoggedOut) => reason::LOGGED_OUT,
            End::Kicked(KickReason::SlowConsumer) => reason::SLOW_CONSUMER,
            // Replaced: the newer connection owns the route, so no event is published.
            End::Kicked(KickReason::Admin | KickReason::Replaced | KickReason::Unspecified) => {
                reason::KICKED
            }
            End::Failed(ErrorCode::HeartbeatTimeout, _) => reason::HEARTBEAT_TIMEOUT,
            End::Failed(..) => reason::PROTOCOL_ERROR,
            End::ReadFailed(_) | End::WriteFailed(_) => reason::CONNECTION_LOST,
        }
    }

    fn log(&self) {
        match self {
            End::PeerClosed => debug!("connection closed by the client"),
            End::Shutdown => debug!("connection closed: server shutting down"),
            End::Kicked(reason) => info!(reason = reason.as_str_name(), "connection kicked"),
            End::Failed(ErrorCode::HeartbeatTimeout, message) => info!("{message}"),
            End::Failed(code, message) => {
                warn!(code = code.as_str_name(), "closing connection: {message}")
            }
            // Mostly resets by the client or its network: the client's doing.
            End::ReadFailed(e) => info!(error = %e, "connection lost"),
            End::WriteFailed(e) => warn!(error = %e, "write to client failed"),
        }
    }
}

/// The tracing span of one connection (`user_id` is recorded once known).
///
/// It covers the phases that log: accepting and logging in, and the end (why it closed,
/// cleanup). It is not kept open while the connection idles: a live span costs about 500
/// bytes per connection in the subscriber, a quarter of an idle connection's budget. Both
/// instances carry the same fields, so log lines read the same.
pub(crate) fn span(peer: SocketAddr, transport: &'static str) -> Span {
    tracing::info_span!(
        "conn",
        peer = %peer,
        transport,
        user_id = tracing::field::Empty
    )
}

/// Counts the connection in its transport's `cim_server_connections` gauge for its whole
/// life, cleanup included (the server's own count is the connection's admission ticket).
struct OpenGuard<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> OpenGuard<'a> {
    fn new(gauge: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pub(crate) fn shutdown_kick() -> Outbound {
    Outbound::new(Frame::kick(
        KickReason::ServerShutdown,
        "server shutting down, reconnect",
    ))
}

/// Writes a burst under the write deadline (counted in `cim_server_frames_out_total`, by
/// kind, whether or not the write then succeeds).
async fn write<T: Transport>(
    state: &ServerState,
    transport: &mut T,
    items: &[Outbound],
    timeout: Duration,
) -> Result<(), String> {
    {
        // Scoped: the tally is not kept in the future across the write.
        let mut tally = Tally::default();
        for item in items {
            tally.add(item.frame());
        }
        tally.flush(&state.metrics.frames_out);
    }
    // Boxed: a write is short-lived, and its timer and buffers inline would enlarge the
    // session future that every idle connection keeps.
    match Box::pin(tokio::time::timeout(timeout, transport.send(items))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "write timed out after {} ms (client not reading)",
            timeout.as_millis()
        )),
    }
}

/// Sends a last Error frame (best effort: the connection closes anyway).
async fn fail<T: Transport>(
    state: &ServerState,
    transport: &mut T,
    code: ErrorCode,
    message: String,
) -> End {
    let frame = Outbound::new(Frame::error(code, message.clone()));
    let _ = write(state, transport, &[frame], state.config.write_timeout()).await;
    End::Failed(code, message)
}

/// [`fail`] for a logged-in connection: what is already queued (answers to the frames
/// before the bad one, deliveries) is written first.
async fn fail_after_queued<T: Transport>(
    state: &ServerState,
    transport: &mut T,
    conn: &ConnShared,
    code: ErrorCode,
    message: String,
) -> End {
    let (mut items, _) = conn.take();
    items.push(Outbound::new(Frame::error(code, message.clone())));
    let _ = write(state, transport, &items, state.config.write_timeout()).await;
    End::Failed(code, message)
}

/// Runs one connection to its end.
pub(crate) async fn run<T: Transport>(
    state: Arc<ServerState>,
    mut transport: T,
    peer: SocketAddr,
    ticket: Ticket,
) {
    let _open = OpenGuard::new(state.metrics.connections_of(T::KIND));
    // Login and cleanup run boxed: they are short, and inline they would enlarge the future
    // that every idle connection keeps for its whole life.
    let login = login_or_close(&state, &mut transport).instrument(span(peer, T::KIND));
    let Some(conn) = Box::pin(login).await else {
        return;
    };
    let _admitted = ticket.logged_in();
    transport.set_max_frame_len(state.config.max_frame_len);
    state.metrics.logins.inc();
    let end = serve(&state, &mut transport, &conn).await;
    state.metrics.disconnected(&end);
    let span = span(peer, T::KIND);
    span.record("user_id", conn.user_id);
    let finish = async {
        end.log();
        cleanup(&state, &mut transport, &conn, end.offline_reason()).await;
    };
    Box::pin(finish.instrument(span)).await;
}

/// [`login`], closing the connection when it fails.
async fn login_or_close<T: Transport>(
    state: &ServerState,
    transport: &mut T,
) -> Option<Arc<ConnShared>> {
    match login(state, transport).await {
        Ok(conn) => Some(conn),
        Err(end) => {
            state.metrics.login_failed(&end);
            end.log();
            transport.close(linger(state)).await;
            None
        }
    }
}

fn linger(state: &ServerState) -> Duration {
    state.config.write_timeout().min(MAX_LINGER)
}

/// After a logged-in connection ended: it leaves the table (unless already replaced there)
/// and its login session is detached, while the transport closes.
async fn cleanup<T: Transport>(
    state: &ServerState,
    transport: &mut T,
    conn: &Arc<ConnShared>,
    reason: &str,
) {
    conn.mark_closed();
    state.table.remove_if_same(conn);
    let detach = async {
        if let Err(e) = state
            .store
            .detach(
                conn.user_id,
                &conn.user_name,
                &conn.session,
                &state.id,
                reason,
            )
            .await
        {
            warn!(error = %e, "detach failed: the route expires with the server's registration");
        }
    };
    tokio::join!(transport.close(linger(state)), detach);
}

/// Waits for the Login frame and checks it. On success the connection is attached and in the
/// table (the caller must clean up); on failure nothing needs undoing.
async fn login<T: Transport>(
    state: &ServerState,
    transport: &mut T,
) -> Result<Arc<ConnShared>, End> {
    let config = &state.config;
    let first = tokio::select! {
        biased;
        () = state.cancel.cancelled() => {
            let _ = write(state, transport, &[shutdown_kick()], config.write_timeout()).await;
            return Err(End::Shutdown);
        }
        r = tokio::time::timeout(config.login_timeout(), transport.recv()) => r,
    };
    let frame = match first {
        Err(_) => {
            let msg = format!("no Login frame within {} ms", config.login_timeout_ms);
            return Err(fail(state, transport, ErrorCode::LoginTimeout, msg).await);
        }
        Ok(Ok(None)) => return Err(End::PeerClosed),
        Ok(Err(RecvError::Io(e))) => return Err(End::ReadFailed(e)),
        Ok(Err(RecvError::Protocol { code, message })) => {
            return Err(fail(state, transport, code, message).await)
        }
        Ok(Ok(Some(frame))) => frame,
    };
    state.metrics.frames_in.get(frame_kind_index(&frame)).inc();
    let token = match frame.body {
        Some(Body::Login(login)) => login.token,
        _ => {
            let msg = format!("the first frame must be a Login, got {}", frame.kind_name());
            return Err(fail(state, transport, ErrorCode::LoginRequired, msg).await);
        }
    };
    let claims = match state.signer.verify_connect(&token, now_ms()) {
        Ok(claims) => claims,
        Err(TokenError::Expired) => {
            let msg = "connect token expired: log in again".to_string();
            return Err(fail(state, transport, ErrorCode::TokenExpired, msg).await);
        }
        Err(e) => {
            let msg = format!("invalid connect token: {e}");
            return Err(fail(state, transport, ErrorCode::InvalidToken, msg).await);
        }
    };
    if claims.server_id != state.id {
        let msg = format!(
            "the token is for server {}, this is {}: log in again",
            claims.server_id, state.id
        );
        return Err(fail(state, transport, ErrorCode::WrongServer, msg).await);
    }
    Span::current().record("user_id", claims.user_id);
    match state
        .store
        .attach(
            claims.user_id,
            &claims.user_name,
            &claims.session,
            &state.id,
        )
        .await
    {
        Ok(AttachOutcome::Attached) => {}
        Ok(AttachOutcome::SessionInvalid) => {
            let msg = "login session not pending: the token was already used or the session \
                       ended; log in again"
                .to_string();
            return Err(fail(state, transport, ErrorCode::SessionInvalid, msg).await);
        }
        Err(e) => {
            warn!(error = %e, "attach failed");
            let msg = "state store unavailable, retry later".to_string();
            return Err(fail(state, transport, ErrorCode::Unavailable, msg).await);
        }
    }
    // Attached before entering the table (a replayed token must not kick the legitimate
    // connection), so a push arriving in between finds nobody here; delivery guarantees
    // (inbox replay) cover that window.
    let conn = Arc::new(ConnShared::new(
        claims.user_id,
        claims.user_name,
        claims.session,
        config.outbound_queue_frames,
    ));
    if let Some(old) = state.table.insert(conn.clone()) {
        let kick = Frame::kick(
            KickReason::Replaced,
            "a newer connection of this user took over",
        );
        old.close(Outbound::new(kick), KickReason::Replaced, true);
    }
    // A route ended this session between its attach and now (a login that replaced it).
    if state.table.entered_ended(&conn) {
        let kick = Frame::kick(
            KickReason::Replaced,
            "this account logged in again elsewhere",
        );
        conn.close(Outbound::new(kick), KickReason::Replaced, true);
    }
    // A shutdown kicks the connections in the table; one that entered after that sweep
    // sees the cancellation here (the table lock orders the two).
    if state.cancel.is_cancelled() {
        conn.close(shutdown_kick(), KickReason::ServerShutdown, true);
    }
    Ok(conn)
}

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
        Some(Body::Ack(a)) => match ack::validate(a.message_ids) {
            Ok(ids) if ids.is_empty() => {}
            Ok(ids) => state.acks.submit(AckItem::acks(conn.clone(), ids)),
            Err(message) => conn.reply(Frame::error(ErrorCode::BadRequest, message)),
        },
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

/// `item` without the stored messages the replay already wrote; `None` when nothing is left.
/// (A live push merges several messages of one recipient: some may predate the replay's
/// watermark and some not.)
fn unreplayed(item: Outbound, replayed_upto: u64) -> Option<Outbound> {
    let Some(Body::Push(push)) = &item.frame().body else {
        return Some(item);
    };
    let replayed = |m: &Message| m.seq != 0 && m.seq <= replayed_upto;
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

/// Writes what is queued for the connection; `Some` when the connection must end (a close
/// was requested, or the write failed). Pushes the replay covered are skipped.
async fn flush_queue<T: Transport>(
    state: &ServerState,
    transport: &mut T,
    conn: &ConnShared,
    replayed_upto: u64,
) -> Option<End> {
    let (mut items, closing) = conn.take();
    if replayed_upto > 0 {
        items = items
            .into_iter()
            .filter_map(|item| unreplayed(item, replayed_upto))
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
async fn inbox_start<T: Transport>(
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
async fn replay<T: Transport>(
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

/// The logged-in part: LoginResult, the inbox replay, then frames both ways until
/// something ends it.
async fn serve<T: Transport>(
    state: &ServerState,
    transport: &mut T,
    conn: &Arc<ConnShared>,
) -> End {
    let config = &state.config;
    // The inbox's top seq and first page are read before the client learns it is connected:
    // what it is sent from then on is stored after this and comes live, so `replay` marks
    // exactly the messages sent before the login completed. Boxed, like the other one-off
    // steps: the session future stays small while idle.
    let (top, first_page) = match Box::pin(inbox_start(state, transport, conn)).await {
        Ok(start) => start,
        Err(end) => return end,
    };
    let login_result = Frame::new(Body::LoginResult(LoginResult {
        user_id: conn.user_id,
        user_name: conn.user_name.clone(),
        server_id: state.id.clone(),
        // Validated to fit in 32 bits.
        heartbeat_interval_ms: u32::try_from(config.heartbeat_interval_ms).unwrap_or(u32::MAX),
        heartbeat_timeout_ms: u32::try_from(config.heartbeat_timeout_ms()).unwrap_or(u32::MAX),
        max_frame_len: u32::try_from(config.max_frame_len).unwrap_or(u32::MAX),
    }));
    if let Err(e) = write(
        state,
        transport,
        &[Outbound::new(login_result)],
        config.write_timeout(),
    )
    .await
    {
        return End::WriteFailed(e);
    }
    let replayed_upto = match Box::pin(replay(state, transport, conn, top, first_page)).await {
        Ok(upto) => upto,
        Err(end) => return end,
    };
    // Receipts this user acked that were never confirmed stored (a route was down, or the
    // server that took the ack stopped first) are sent again now. Only an inbox that ever
    // held a message can have any.
    if top > 0 {
        state.acks.submit(AckItem::resend_pending(conn.clone()));
    }

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
                            if let Some(end) = flush_queue(state, transport, conn, replayed_upto).await {
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
                if let Some(end) = Box::pin(flush_queue(state, transport, conn, replayed_upto)).await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServerConfig;
    use crate::{
        conn::Enqueued,
        pb::{Kick, Ping, Push, Send},
        tcp::TcpTransport,
        testing::{
            assert_closed, error_code, login_frame, next, test_config, token, Harness, TestStoreExt,
        },
    };
    use cim_common::{
        codec::put_len_prefix,
        token::{ConnectClaims, TokenSigner},
    };
    use futures_util::SinkExt;
    use tokio::io::AsyncWriteExt;

    fn ping(nonce: u64) -> Frame {
        Frame::new(Body::Ping(Ping { nonce }))
    }

    fn kick_reason(frame: &Frame) -> KickReason {
        match &frame.body {
            Some(Body::Kick(Kick { reason, .. })) => {
                KickReason::try_from(*reason).expect("known reason")
            }
            other => panic!("expected a Kick, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn login_then_ping_pong() {
        let h = Harness::new(test_config());
        h.store.claim(7, "s1").await;
        let (mut client, task) = h.connect();
        client
            .send(login_frame(token(7, "s1", &h.state.id)))
            .await
            .unwrap();
        match next(&mut client).await.body {
            Some(Body::LoginResult(r)) => {
                assert_eq!(r.user_id, 7);
                assert_eq!(r.user_name, "user7");
                assert_eq!(r.server_id, h.state.id);
                assert_eq!(r.heartbeat_interval_ms, 10_000);
                assert_eq!(r.heartbeat_timeout_ms, 30_000);
                assert_eq!(r.max_frame_len, 65_536);
            }
            other => panic!("expected LoginResult, got {other:?}"),
        }
        assert_eq!(
            h.store.slot(7).unwrap().server.as_deref(),
            Some(h.state.id.as_str())
        );
        assert!(h.state.table.get(7).is_some());
        assert_eq!(h.state.admission.open(), 1);

        client.send(ping(42)).await.unwrap();
        assert_eq!(
            next(&mut client).await,
            Frame::new(Body::Pong(Pong { nonce: 42 }))
        );

        // The client leaves: the session ends, leaves the table, and is detached.
        drop(client);
        task.await.unwrap();
        assert!(h.state.table.get(7).is_none());
        assert_eq!(h.store.slot(7), None);
        assert_eq!(h.state.admission.open(), 0);
    }

    #[tokio::test]
    async fn pipelined_pings_are_all_answered_in_order() {
        let h = Harness::new(test_config());
        let (mut client, _task) = h.login(1, "s").await;
        for n in 0..200 {
            client.feed(ping(n)).await.unwrap();
        }
        SinkExt::<Frame>::flush(&mut client).await.unwrap();
        for n in 0..200 {
            assert_eq!(
                next(&mut client).await,
                Frame::new(Body::Pong(Pong { nonce: n }))
            );
        }
    }

    #[tokio::test]
    async fn unexpected_frames_are_refused_but_keep_the_connection() {
        let h = Harness::new(test_config());
        let (mut client, _task) = h.login(1, "s").await;
        let frames = [
            Frame::default(),                        // a body this server does not know
            Frame::new(Body::Push(Push::default())), // server -> client only
            login_frame(token(1, "s", &h.state.id)), // already logged in
        ];
        for frame in frames {
            client.send(frame).await.unwrap();
            assert_eq!(
                error_code(&next(&mut client).await),
                ErrorCode::UnsupportedFrame
            );
        }
        // Acks need no answer; the connection is still usable.
        client
            .send(Frame::new(Body::Ack(Default::default())))
            .await
            .unwrap();
        client.send(ping(1)).await.unwrap();
        assert_eq!(
            next(&mut client).await,
            Frame::new(Body::Pong(Pong { nonce: 1 }))
        );
    }

    #[tokio::test]
    async fn garbage_closes_with_bad_frame_and_detaches() {
        let h = Harness::new(test_config());
        let (client, task) = h.login(3, "s").await;
        let mut io = client.into_inner();
        // A valid length, then bytes that are no Frame (field 1, wire type 7).
        io.write_all(&[3, 0x0f, 0xff, 0xff]).await.unwrap();
        let mut client = tokio_util::codec::Framed::new(io, Default::default());
        assert_eq!(error_code(&next(&mut client).await), ErrorCode::BadFrame);
        assert_closed(&mut client).await;
        drop(client); // the server's linger ends when the client closes
        task.await.unwrap();
        assert_eq!(h.store.slot(3), None, "detached");
        assert!(h.state.table.get(3).is_none());
    }

    #[tokio::test]
    async fn frames_before_garbage_are_answered_first() {
        let h = Harness::new(test_config());
        let (client, _task) = h.login(3, "s").await;
        let mut io = client.into_inner();
        let mut bytes = cim_common::codec::frame_to_bytes(&ping(1)).to_vec();
        bytes.extend_from_slice(&cim_common::codec::frame_to_bytes(&ping(2)));
        bytes.extend_from_slice(&[3, 0x0f, 0xff, 0xff]);
        io.write_all(&bytes).await.unwrap();
        let mut client = tokio_util::codec::Framed::new(io, Default::default());
        assert_eq!(
            next(&mut client).await,
            Frame::new(Body::Pong(Pong { nonce: 1 }))
        );
        assert_eq!(
            next(&mut client).await,
            Frame::new(Body::Pong(Pong { nonce: 2 }))
        );
        assert_eq!(error_code(&next(&mut client).await), ErrorCode::BadFrame);
        assert_closed(&mut client).await;
    }

    #[tokio::test]
    async fn oversize_frame_closes_with_frame_too_large() {
        let h = Harness::new(test_config());
        let (client, task) = h.login(3, "s").await;
        let mut io = client.into_inner();
        let mut prefix = bytes::BytesMut::new();
        put_len_prefix(65_537, &mut prefix);
        io.write_all(&prefix).await.unwrap();
        let mut client = tokio_util::codec::Framed::new(io, Default::default());
        assert_eq!(
            error_code(&next(&mut client).await),
            ErrorCode::FrameTooLarge
        );
        assert_closed(&mut client).await;
        drop(client); // the server's linger ends when the client closes
        task.await.unwrap();
    }

    #[tokio::test]
    async fn garbage_before_login_is_bad_frame() {
        let h = Harness::new(test_config());
        let (client, task) = h.connect();
        let mut io = client.into_inner();
        // An HTTP request on the TCP port ('G' reads as a 71-byte length).
        io.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8.0\r\nAccept: */*\r\nConnection: keep-alive\r\n\r\n").await.unwrap();
        let mut client = tokio_util::codec::Framed::new(io, Default::default());
        assert_eq!(error_code(&next(&mut client).await), ErrorCode::BadFrame);
        assert_closed(&mut client).await;
        drop(client); // the server's linger ends when the client closes
        task.await.unwrap();
        assert_eq!(h.state.admission.open(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn login_timeout() {
        let h = Harness::new(test_config());
        let (mut client, task) = h.connect();
        let started = Instant::now();
        assert_eq!(
            error_code(&next(&mut client).await),
            ErrorCode::LoginTimeout
        );
        assert!(started.elapsed() >= Duration::from_millis(5_000));
        assert_closed(&mut client).await;
        drop(client); // the server's linger ends when the client closes
        task.await.unwrap();
    }

    #[tokio::test]
    async fn first_frame_must_be_login() {
        let h = Harness::new(test_config());
        let (mut client, _task) = h.connect();
        client.send(ping(1)).await.unwrap();
        assert_eq!(
            error_code(&next(&mut client).await),
            ErrorCode::LoginRequired
        );
        assert_closed(&mut client).await;
    }

    /// Logs in with `token` and returns the error code the server answered.
    async fn login_error(h: &Harness, token: String) -> ErrorCode {
        let (mut client, task) = h.connect();
        client.send(login_frame(token)).await.unwrap();
        let code = error_code(&next(&mut client).await);
        assert_closed(&mut client).await;
        drop(client); // the server's linger ends when the client closes
        task.await.unwrap();
        code
    }

    #[tokio::test]
    async fn bad_tokens_are_refused() {
        let h = Harness::new(test_config());
        h.store.claim(5, "s").await;
        let id = h.state.id.clone();
        assert_eq!(
            login_error(&h, "nonsense".into()).await,
            ErrorCode::InvalidToken
        );
        let forged = TokenSigner::new("another-secret-0123456789").sign_connect(&ConnectClaims {
            user_id: 5,
            user_name: "x".into(),
            server_id: id.clone(),
            session: "s".into(),
            exp_ms: now_ms() + 60_000,
        });
        assert_eq!(login_error(&h, forged).await, ErrorCode::InvalidToken);
        let expired = TokenSigner::new(crate::testing::SECRET).sign_connect(&ConnectClaims {
            user_id: 5,
            user_name: "x".into(),
            server_id: id.clone(),
            session: "s".into(),
            exp_ms: now_ms() - 1,
        });
        assert_eq!(login_error(&h, expired).await, ErrorCode::TokenExpired);
        assert_eq!(
            login_error(&h, token(5, "s", "server-other")).await,
            ErrorCode::WrongServer
        );
        // Not pending (never claimed, or claimed by another session).
        assert_eq!(
            login_error(&h, token(5, "other", &id)).await,
            ErrorCode::SessionInvalid
        );
        h.store.set_unavailable(true);
        assert_eq!(
            login_error(&h, token(5, "s", &id)).await,
            ErrorCode::Unavailable
        );
        h.store.set_unavailable(false);
        // None of these attached anything.
        assert_eq!(h.store.slot(5).unwrap().server, None);
        assert!(h.state.table.get(5).is_none());
    }

    #[tokio::test]
    async fn a_token_works_once() {
        let h = Harness::new(test_config());
        let (_client, _task) = h.login(5, "s").await;
        assert_eq!(
            login_error(&h, token(5, "s", &h.state.id)).await,
            ErrorCode::SessionInvalid
        );
        // The replay did not disturb the first connection.
        assert!(h.state.table.get(5).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeat_timeout_and_activity() {
        let h = Harness::new(test_config());
        let (mut client, task) = h.login(9, "s").await;
        let started = Instant::now();
        // Activity at 20 s pushes the deadline to 50 s.
        tokio::time::sleep(Duration::from_secs(20)).await;
        client.send(ping(1)).await.unwrap();
        assert_eq!(
            next(&mut client).await,
            Frame::new(Body::Pong(Pong { nonce: 1 }))
        );
        assert_eq!(
            error_code(&next(&mut client).await),
            ErrorCode::HeartbeatTimeout
        );
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_secs(50) && elapsed < Duration::from_secs(51),
            "{elapsed:?}"
        );
        assert_closed(&mut client).await;
        drop(client); // the server's linger ends when the client closes
        task.await.unwrap();
        assert_eq!(h.store.slot(9), None, "detached");
    }

    #[tokio::test]
    async fn slow_consumer_is_kicked() {
        let h = Harness::new(ServerConfig {
            outbound_queue_frames: 4,
            ..test_config()
        });
        let (mut client, task) = h.login(2, "s").await;
        let conn = h.state.table.get(2).unwrap();
        // The client does not read: the queue fills up while the session is parked. Pushes
        // run on this test's thread; the session task only runs when we yield.
        let push = Outbound::new(Frame::new(Body::Push(Push::default())));
        let outcomes: Vec<_> = (0..5).map(|_| conn.enqueue(push.clone())).collect();
        assert_eq!(outcomes[..4], [Enqueued::Queued; 4]);
        assert_eq!(outcomes[4], Enqueued::Full);
        // The queued pushes are dropped: only the Kick arrives, then the close.
        assert_eq!(
            kick_reason(&next(&mut client).await),
            KickReason::SlowConsumer
        );
        assert_closed(&mut client).await;
        drop(client); // the server's linger ends when the client closes
        task.await.unwrap();
        assert!(h.state.table.get(2).is_none());
        assert_eq!(conn.enqueue(push), Enqueued::Closed);
    }

    #[tokio::test]
    async fn newer_connection_replaces_older() {
        let h = Harness::new(test_config());
        let (mut first, first_task) = h.login(4, "s1").await;
        let (mut second, _second_task) = h.login(4, "s2").await;
        assert_eq!(kick_reason(&next(&mut first).await), KickReason::Replaced);
        assert_closed(&mut first).await;
        drop(first); // the server's linger ends when the client closes
        first_task.await.unwrap();
        // The old session's cleanup left the new one alone.
        assert_eq!(h.state.table.get(4).unwrap().session, "s2");
        assert_eq!(h.store.slot(4).unwrap().session, "s2");
        second.send(ping(5)).await.unwrap();
        assert_eq!(
            next(&mut second).await,
            Frame::new(Body::Pong(Pong { nonce: 5 }))
        );
    }

    #[tokio::test]
    async fn sends_are_forwarded_with_the_authenticated_sender() {
        let mut h = Harness::new(test_config());
        let (mut client, _task) = h.login(11, "s").await;
        let send = Send {
            client_id: 77,
            to_user_id: 12,
            body: "hi".into(),
            ..Default::default()
        };
        client
            .send(Frame::new(Body::Send(send.clone())))
            .await
            .unwrap();
        let pending = h.forwarded.recv().await.unwrap();
        assert_eq!(pending.conn.user_id, 11);
        assert_eq!(pending.conn.user_name, "user11");
        assert_eq!(pending.send, send);
    }

    /// A harness whose forward queue holds its minimum (`forward_queue: 1`, and `config`'s
    /// other fields), with user 11 logged in.
    async fn small_queue(
        config: ServerConfig,
    ) -> (Harness, crate::testing::Client, tokio::task::JoinHandle<()>) {
        let h = Harness::new(ServerConfig {
            forward_queue: 1,
            ..config
        });
        let (client, task) = h.login(11, "s").await;
        (h, client, task)
    }

    /// Sends one more `Send` than the harness's forward queue holds (`forward_queue: 1`);
    /// returns how many (client ids 1..=that).
    async fn send_one_past_a_full_queue(client: &mut crate::testing::Client) -> u64 {
        let sends = crate::forward::MIN_QUEUE as u64 + 1;
        for client_id in 1..=sends {
            let send = Send {
                client_id,
                ..Default::default()
            };
            client.send(Frame::new(Body::Send(send))).await.unwrap();
        }
        sends
    }

    /// A sender that finds the queue full is not refused: its session stops reading until
    /// the queue has room, then takes the send (and whatever followed it) in order.
    #[tokio::test]
    async fn a_full_forward_queue_holds_the_sender_back_instead_of_refusing() {
        let (mut h, mut client, _task) = small_queue(test_config()).await;
        // The queue holds its minimum; the send after that must wait.
        let sends = send_one_past_a_full_queue(&mut client).await;
        client.send(ping(5)).await.unwrap();
        // Room for one: the waiting send goes in, the session reads on and answers the
        // ping. Refusing the send would have answered it first.
        assert_eq!(h.forwarded.recv().await.unwrap().send.client_id, 1);
        match next(&mut client).await.body {
            Some(Body::Pong(p)) => assert_eq!(p.nonce, 5),
            other => panic!("expected the Pong, got {other:?}"),
        }
        for client_id in 2..=sends {
            assert_eq!(h.forwarded.recv().await.unwrap().send.client_id, client_id);
        }
    }

    /// A held sender is not read, but still written to: what is pushed to it meanwhile
    /// arrives before the queue has room.
    #[tokio::test]
    async fn a_held_sender_still_gets_its_pushes() {
        let (mut h, mut client, _task) = small_queue(test_config()).await;
        let sends = send_one_past_a_full_queue(&mut client).await;
        // The queue is full once the session has read every send (they arrive in one read):
        // the last one is held and the session is waiting for room.
        while h.forwarded.len() < crate::forward::MIN_QUEUE {
            tokio::task::yield_now().await;
        }
        let mut message = stored(11, "pushed", "while held");
        message.seq = 1;
        h.state.table.get(11).unwrap().enqueue(live_push(message));
        // Bounded: without the writes during the wait it would never come (the queue stays
        // full until the test drains it below).
        let frame = tokio::time::timeout(Duration::from_secs(10), next(&mut client))
            .await
            .expect("the push reaches a held sender");
        assert_eq!(push_of(frame).messages[0].id, "pushed");
        // Only now is there room: every send, the held one included, reaches the queue.
        for client_id in 1..=sends {
            assert_eq!(h.forwarded.recv().await.unwrap().send.client_id, client_id);
        }
    }

    /// Sends past the connection's bucket are answered RATE_LIMITED, with their client ids,
    /// and not forwarded; the connection stays and other frames are answered.
    #[tokio::test]
    async fn sends_over_the_rate_are_refused_and_the_connection_stays() {
        let hour = Duration::from_secs(3600);
        let mut h = Harness::with_send_limit(
            test_config(),
            Some(cim_common::limit::KeyedLimit::per_period(hour, 3)),
        );
        let (mut client, _task) = h.login(1, "s").await;
        for client_id in 1..=5 {
            let send = Send {
                client_id,
                ..Default::default()
            };
            client.send(Frame::new(Body::Send(send))).await.unwrap();
        }
        client.send(ping(9)).await.unwrap();
        for client_id in 4..=5 {
            match next(&mut client).await.body {
                Some(Body::SendResult(r)) => {
                    assert_eq!(r.client_id, client_id);
                    let e = r.error.unwrap();
                    assert_eq!(e.code(), ErrorCode::RateLimited);
                    assert!(e.message.contains("retry in"), "{}", e.message);
                }
                other => panic!("expected SendResult, got {other:?}"),
            }
        }
        assert_eq!(
            next(&mut client).await,
            Frame::new(Body::Pong(Pong { nonce: 9 }))
        );
        for client_id in 1..=3 {
            assert_eq!(h.forwarded.recv().await.unwrap().send.client_id, client_id);
        }
        assert!(
            h.forwarded.try_recv().is_err(),
            "only the burst was forwarded"
        );
        assert_eq!(h.state.metrics.sends_rate_limited.get(), 2);
    }

    #[tokio::test]
    async fn a_send_that_finds_no_room_in_time_is_answered_overloaded() {
        let (_h, mut client, _task) = small_queue(ServerConfig {
            forward_wait_ms: 50,
            ..test_config()
        })
        .await;
        // Nobody drains the queue here.
        let overflow = send_one_past_a_full_queue(&mut client).await;
        match next(&mut client).await.body {
            Some(Body::SendResult(r)) => {
                assert_eq!(r.client_id, overflow);
                assert_eq!(r.error.unwrap().code(), ErrorCode::Overloaded);
            }
            other => panic!("expected SendResult, got {other:?}"),
        }
        // The session reads on after the refusal.
        client.send(ping(6)).await.unwrap();
        match next(&mut client).await.body {
            Some(Body::Pong(p)) => assert_eq!(p.nonce, 6),
            other => panic!("expected the Pong, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn shutdown_kicks_and_detaches() {
        let h = Harness::new(test_config());
        let (mut client, task) = h.login(6, "s").await;
        let (mut anonymous, anonymous_task) = h.connect();
        h.state.shutdown_connections();
        assert_eq!(
            kick_reason(&next(&mut client).await),
            KickReason::ServerShutdown
        );
        assert_closed(&mut client).await;
        assert_eq!(
            kick_reason(&next(&mut anonymous).await),
            KickReason::ServerShutdown
        );
        assert_closed(&mut anonymous).await;
        // The server's linger ends when the clients close.
        drop((client, anonymous));
        task.await.unwrap();
        anonymous_task.await.unwrap();
        assert_eq!(h.store.slot(6), None);
    }

    #[tokio::test]
    async fn kick_flushes_pending_frames_first() {
        let h = Harness::new(test_config());
        let (mut client, _task) = h.login(8, "s").await;
        let conn = h.state.table.get(8).unwrap();
        let push = Frame::new(Body::Push(Push::default()));
        conn.enqueue(Outbound::new(push.clone()));
        let kick = Frame::kick(KickReason::LoggedOut, "bye");
        conn.close(Outbound::new(kick.clone()), KickReason::LoggedOut, true);
        assert_eq!(next(&mut client).await, push);
        assert_eq!(next(&mut client).await, kick);
        assert_closed(&mut client).await;
    }

    #[tokio::test]
    async fn idle_tcp_connection_holds_no_read_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut transport = TcpTransport::new(server, 64 * 1024);
        let big = login_frame("x".repeat(20_000));
        let mut bytes = cim_common::codec::frame_to_bytes(&big).to_vec();
        bytes.extend_from_slice(&cim_common::codec::frame_to_bytes(&ping(1)));
        client.write_all(&bytes).await.unwrap();
        assert_eq!(transport.recv().await.unwrap(), Some(big));
        assert_eq!(transport.recv().await.unwrap(), Some(ping(1)));
        // Nothing more comes: the pending read holds no buffer.
        let idle = tokio::time::timeout(Duration::from_millis(50), transport.recv()).await;
        assert!(idle.is_err(), "no frame expected");
        assert_eq!(transport.read_buffer_capacity(), 0);
        // And reading still works afterwards.
        client
            .write_all(&cim_common::codec::frame_to_bytes(&ping(2)))
            .await
            .unwrap();
        assert_eq!(transport.recv().await.unwrap(), Some(ping(2)));
    }

    /// An idle connection's memory is mostly its task, i.e. this future (measured end to end
    /// by `cim-bench connect`): keep it small.
    #[test]
    fn session_future_is_small() {
        let h = Harness::new(test_config());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let _peer = std::net::TcpStream::connect(addr).unwrap();
        let (stream, _) = listener.accept().unwrap();
        stream.set_nonblocking(true).unwrap();
        let stream = tokio::net::TcpStream::from_std(stream).unwrap();
        let ticket = h.state.admission.admit().unwrap();
        let future = run(
            h.state.clone(),
            TcpTransport::new(stream, 65_536),
            addr,
            ticket,
        );
        let size = std::mem::size_of_val(&future);
        assert!(size <= 800, "session future is {size} bytes");
    }

    use cim_common::store::prelude::*;

    fn stored(user_id: u64, id: &str, body: &str) -> crate::pb::Message {
        crate::pb::Message {
            id: id.into(),
            sender_id: 99,
            sender_name: "sender".into(),
            receiver_id: user_id,
            kind: crate::pb::MessageKind::Private as i32,
            body: body.into(),
            timestamp_ms: now_ms(),
            ..Default::default()
        }
    }

    /// Stores a message for user 7, then pushes it live to user 7's connection, as a route
    /// does (stored before pushed).
    async fn store_then_push(h: &Harness, id: &str) {
        let mut message = vec![stored(7, id, "after")];
        h.store.inbox_store(&mut message).await.unwrap();
        h.state
            .table
            .get(7)
            .unwrap()
            .enqueue(live_push(message.remove(0)));
    }

    fn push_of(frame: Frame) -> Push {
        match frame.body {
            Some(Body::Push(push)) => push,
            other => panic!("expected a Push, got {other:?}"),
        }
    }

    fn live_push(message: crate::pb::Message) -> Outbound {
        Outbound::new(Frame::new(Body::Push(Push {
            messages: vec![message],
            replay: false,
        })))
    }

    #[tokio::test]
    async fn inbox_is_replayed_before_live_pushes_without_duplicates() {
        let h = Harness::new(test_config());
        let mut waiting = vec![stored(7, "m1", "one"), stored(7, "m2", "two")];
        h.store.inbox_store(&mut waiting).await.unwrap();
        let (mut client, _task) = h.login(7, "s").await;
        let replayed = push_of(next(&mut client).await);
        assert!(replayed.replay);
        let ids: Vec<&str> = replayed.messages.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["m1", "m2"]);
        assert!(replayed.messages[0].seq < replayed.messages[1].seq);

        // A live push of a message the replay covered (it was stored before the inbox was
        // read) is dropped; a newer one goes through, then the Pong.
        let conn = h.state.table.get(7).unwrap();
        conn.enqueue(live_push(waiting[1].clone()));
        let mut newer = vec![stored(7, "m3", "three")];
        h.store.inbox_store(&mut newer).await.unwrap();
        conn.enqueue(live_push(newer[0].clone()));
        client.send(ping(5)).await.unwrap();
        let live = push_of(next(&mut client).await);
        assert!(!live.replay);
        assert_eq!(live.messages[0].id, "m3");
        assert_eq!(
            next(&mut client).await,
            Frame::new(Body::Pong(Pong { nonce: 5 }))
        );
    }

    #[tokio::test]
    async fn a_message_stored_once_the_client_is_logged_in_comes_live() {
        let h = Harness::new(test_config());
        let mut waiting = vec![stored(7, "m1", "before")];
        h.store.inbox_store(&mut waiting).await.unwrap();
        // `login` returns with the LoginResult read: the inbox was read before it was sent,
        // so what is stored from now on is not part of the replay.
        let (mut client, _task) = h.login(7, "s").await;
        store_then_push(&h, "m2").await;
        let replayed = push_of(next(&mut client).await);
        assert!(replayed.replay);
        let ids: Vec<&str> = replayed.messages.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["m1"]);
        let live = push_of(next(&mut client).await);
        assert!(!live.replay, "{live:?}");
        assert_eq!(live.messages[0].id, "m2");
    }

    /// An inbox larger than a page is replayed up to what it held at login; a message stored
    /// while later pages are read comes live, not as part of the replay.
    #[tokio::test]
    async fn a_message_stored_during_a_paged_replay_comes_live() {
        let h = Harness::new(test_config());
        let mut waiting: Vec<_> = (0..REPLAY_PAGE + 50)
            .map(|i| stored(7, &format!("m{i:03}"), "before"))
            .collect();
        h.store.inbox_store(&mut waiting).await.unwrap();
        h.store
            .hold_paged_reads
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let (mut client, _task) = h.login(7, "s").await;
        // The session wrote the first page and is reading the second one.
        h.store.entered.notified().await;
        store_then_push(&h, "late").await;
        h.store.resume.notify_one();
        let mut replayed = Vec::new();
        let live = loop {
            let push = push_of(next(&mut client).await);
            if !push.replay {
                break push;
            }
            replayed.extend(push.messages.into_iter().map(|m| m.id));
        };
        let expected: Vec<String> = waiting.iter().map(|m| m.id.clone()).collect();
        assert_eq!(replayed, expected);
        let live: Vec<&str> = live.messages.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(live, ["late"]);
    }

    #[test]
    fn live_pushes_lose_only_the_messages_the_replay_wrote() {
        let message = |id: &str, seq: u64| crate::pb::Message {
            id: id.into(),
            seq,
            ..Default::default()
        };
        let ids = |item: &Outbound| -> Vec<String> {
            push_of(item.frame().clone())
                .messages
                .into_iter()
                .map(|m| m.id)
                .collect()
        };
        let push = |messages: Vec<crate::pb::Message>| {
            Outbound::new(Frame::new(Body::Push(Push {
                messages,
                replay: false,
            })))
        };
        assert!(unreplayed(push(vec![message("a", 3), message("b", 5)]), 5).is_none());
        let kept = push(vec![message("c", 6)]);
        let same = unreplayed(kept.clone(), 5).unwrap();
        assert!(
            std::ptr::eq(same.frame(), kept.frame()),
            "untouched: not re-encoded"
        );
        let part = unreplayed(push(vec![message("d", 5), message("e", 6)]), 5).unwrap();
        assert_eq!(ids(&part), ["e"]);
        // Messages without a seq (not stored: group, channel) are never the replay's.
        assert!(unreplayed(push(vec![message("g", 0)]), 5).is_some());
    }

    #[tokio::test]
    async fn a_large_inbox_is_replayed_in_bounded_frames_in_order() {
        let h = Harness::new(test_config());
        let body = "x".repeat(2000);
        let mut waiting: Vec<_> = (0..60)
            .map(|i| stored(8, &format!("m{i:02}"), &body))
            .collect();
        h.store.inbox_store(&mut waiting).await.unwrap();
        let (mut client, _task) = h.login(8, "s").await;
        let mut ids = Vec::new();
        let mut frames = 0;
        while ids.len() < 60 {
            let frame = next(&mut client).await;
            assert!(prost::Message::encoded_len(&frame) <= crate::chunks::PUSH_FRAME_BYTES + 4096);
            let push = push_of(frame);
            assert!(push.replay);
            ids.extend(push.messages.into_iter().map(|m| m.id));
            frames += 1;
        }
        assert!(frames > 1, "60 × 2 KB must not fit one frame");
        let expected: Vec<String> = (0..60).map(|i| format!("m{i:02}")).collect();
        assert_eq!(ids, expected);
    }

    #[tokio::test]
    async fn acks_go_to_the_acker_and_bad_acks_are_refused() {
        let mut h = Harness::new(test_config());
        let (mut client, _task) = h.login(9, "s").await;
        let ack = |ids: Vec<String>| Frame::new(Body::Ack(crate::pb::Ack { message_ids: ids }));
        client
            .send(ack(vec!["a".into(), "b".into()]))
            .await
            .unwrap();
        let item = h.acked.recv().await.unwrap();
        assert_eq!(item.conn.user_id, 9);
        assert_eq!(item.conn.user_name, "user9");
        assert_eq!(item.ids, ["a", "b"]);

        client
            .send(ack(vec!["a".into(); ack::MAX_IDS_PER_ACK + 1]))
            .await
            .unwrap();
        assert_eq!(error_code(&next(&mut client).await), ErrorCode::BadRequest);
        // The connection stays open.
        client.send(ping(1)).await.unwrap();
        assert_eq!(
            next(&mut client).await,
            Frame::new(Body::Pong(Pong { nonce: 1 }))
        );
        assert!(h.acked.try_recv().is_err(), "the refused ack went nowhere");
    }
}
