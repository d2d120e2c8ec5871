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
//!
//! Where each part lives:
//! - this module: [`run`] (one connection from accept to cleanup), the [`Transport`] trait
//!   the transports implement, why a session ended ([`End`]), and the cleanup (leave the
//!   table, detach);
//! - [`login`]: the Login frame under its deadline, the token checks, attach, entering the
//!   connection table;
//! - [`replay`]: the inbox read before the `LoginResult` and replayed after it, and the
//!   live pushes the replay already covered;
//! - [`serve`]: the logged-in loop (frames both ways, heartbeats, held senders);
//! - [`write`]: writes under the write deadline, and the last Error frame of a failure.

mod login;
mod replay;
mod serve;
#[cfg(test)]
mod tests;
mod write;

use crate::{
    admission::Ticket,
    conn::{ConnShared, Outbound},
    pb::{ErrorCode, Frame, KickReason},
    server::ServerState,
};
use login::login_or_close;
use serve::serve;
use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};
use tracing::{debug, info, warn, Instrument, Span};

/// Longest wait for the client to close after our last frame.
const MAX_LINGER: Duration = Duration::from_secs(1);

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
    // Its group positions held in the acker are written now: a next login catches up from
    // there.
    state
        .acks
        .submit(crate::ack::AckItem::closing(conn.clone()));
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
