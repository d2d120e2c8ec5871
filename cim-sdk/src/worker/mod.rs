//! The background task of a [`crate::Client`]: owns the connection, heartbeats, matches send
//! results to sends (and re-sends the unanswered ones after a reconnect), turns pushes into
//! events, acknowledges stored messages, reconnects, and ends the session. The behaviour it
//! implements is described in [`crate::client`]'s module doc.

use crate::route::ErrorCode;
use crate::{
    client::{lock, open, ClientConfig, ClientError, ConnState, Event, Live, SendOutcome},
    conn::{self, ConnError, Connection},
    pb::{self, frame::Body, Frame, KickReason},
    recent::RecentIds,
    route::{LoginInfo, RouteClient, RouteError},
    ClientInfo, Transport,
};
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    sync::{atomic::AtomicU64, Mutex},
    time::Duration,
};
use tokio::{
    sync::{mpsc, oneshot},
    time::{Instant, MissedTickBehavior},
};
use tokio_util::sync::CancellationToken;

/// Deadline of one frame write; a connection that cannot take a frame this long is dead.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the polite close of a connection may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the task waits for the application to take its last events before it ends.
const FINAL_EVENTS_TIMEOUT: Duration = Duration::from_secs(5);

/// State shared between the [`crate::Client`] handles and the task.
pub(crate) struct Shared {
    pub info: Mutex<ClientInfo>,
    /// Bearer token of the current login session (for HTTP calls such as online users).
    pub session_token: Mutex<String>,
    /// Cancelled by [`crate::Client::logout`] or when the last handle is dropped.
    pub stop: CancellationToken,
    pub logout: Mutex<LogoutSlot>,
    pub next_client_id: AtomicU64,
}

/// Whether a logout was asked for; the task takes the request when it finishes.
pub(crate) enum LogoutSlot {
    Open,
    Requested(oneshot::Sender<Result<(), ClientError>>),
    /// The task ended: a later logout has nothing to do.
    Finished,
}

/// One send, from a handle to the task.
pub(crate) struct Command {
    pub send: pb::Send,
    /// Instead of the send: a frame written as it is, answered once written (read marks,
    /// typing indicators, read-mark watches: the server answers nothing). Not written again
    /// after a reconnect (but the watches: see [`Worker::read_watches`]).
    pub signal: Option<Frame>,
    pub reply: oneshot::Sender<Result<SendOutcome, ClientError>>,
    /// After this the caller has given up: the send must not be written any more.
    pub deadline: Instant,
}

/// What a connection's run hands on, in order: events for the application, and acks, each
/// written once every event before it is in the events channel.
#[derive(Debug, PartialEq)]
// Events are most items and go to the application as they are: boxing them would add an
// allocation per message to save the bytes of the rare ack items.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Item {
    Event(Event),
    /// Ids of stored messages of one push (see [`conn::ack_ids`]).
    Ack(Vec<String>),
    /// Group positions of one push (see [`conn::group_positions`]).
    GroupAck(Vec<(u64, u64)>),
}

pub(crate) type Backlog = VecDeque<Item>;

/// Why a connection's run ended.
enum End {
    /// The connection is gone but the session should continue elsewhere.
    Reconnect(String),
    /// Final, with this reason.
    Closed(String),
    /// Logout or every handle dropped.
    Stop,
}

/// Outcome of one reconnect attempt that did not connect.
enum Failed {
    Retry(String),
    Final(String),
}

mod frames;
mod reconnect;
mod sends;

use frames::{on_frame, write_acks};
use sends::{outcome, resend, submit, PendingSends};

pub(crate) struct Worker {
    pub shared: std::sync::Arc<Shared>,
    pub route: RouteClient,
    pub config: ClientConfig,
    pub events: mpsc::Sender<Event>,
    pub commands: mpsc::Receiver<Command>,
    pub recent: RecentIds,
    /// Session token of the latest login whose slot we may still hold; logged out before the
    /// next login, and taken (`None`) once it surely ended.
    pub token: Option<String>,
    /// Reconnect attempts of the current outage.
    pub attempt: u32,
    /// Groups whose read marks the application watches (`WatchReads`): a watch lives as long
    /// as the server's connection, so each new connection is told them again.
    pub read_watches: BTreeSet<u64>,
}

impl Worker {
    pub(crate) async fn run(mut self, first: Live) {
        let mut backlog = Backlog::new();
        let mut pending = PendingSends::new();
        let mut live = first;
        let (end, conn) = loop {
            let end = self.serve(&mut live, &mut backlog, &mut pending).await;
            let End::Reconnect(reason) = end else {
                break (end, Some(live.conn));
            };
            // Messages and the kick that arrived before the loss come before `Reconnecting`.
            self.emit_backlog(&mut backlog).await;
            // A connection that stayed up a while ends an outage; one that failed at once
            // (e.g. kicked right after login) continues the backoff where it was, so a
            // flapping server is not hammered at the initial delay.
            if live.since.elapsed() >= self.config.reconnect.max_backoff {
                self.attempt = 0;
            }
            tracing::debug!(user = %self.config.name, %reason, "connection lost, reconnecting");
            close(live.conn).await;
            match self.reconnect(reason).await {
                Ok(next) => {
                    live = next;
                    let state = ConnState::Connected {
                        server_id: live.server_id.clone(),
                        addr: live.addr.clone(),
                    };
                    self.set_state(state).await;
                }
                Err(end) => break (end, None),
            }
        };
        // Sends still waiting will not be re-sent: they may or may not have been delivered.
        for (_, sent) in std::mem::take(&mut pending) {
            let _ = sent.reply.send(Err(ClientError::ConnectionLost));
        }
        self.finish(end, conn, backlog).await;
    }

    /// Runs one connection until it ends. Received messages and kicks go to `backlog` first
    /// and from there into the events channel; while the backlog is not empty the connection
    /// is not read (back-pressure), but heartbeats and sends continue. The acks of a push are
    /// written once its messages are in the events channel. Sends of `pending` (left from the
    /// previous connection) are written again first.
    async fn serve(
        &mut self,
        live: &mut Live,
        backlog: &mut Backlog,
        pending: &mut PendingSends,
    ) -> End {
        let interval = live.heartbeat;
        let silence_limit = interval.saturating_mul(2);
        let mut ping = tokio::time::interval_at(Instant::now() + interval, interval);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let mut nonce = 0u64;
        // An error frame the server sent before closing: the best reason for that close.
        let mut last_error: Option<String> = None;
        let transport = self.config.transport;
        if let Err(e) = resend(live, pending).await {
            return End::Reconnect(format!("send failed: {e}"));
        }
        for &group_id in &self.read_watches {
            let watch = Frame::new(Body::WatchReads(pb::WatchReads {
                group_id,
                stop: false,
            }));
            if let Err(e) = write(&mut live.conn, &watch).await {
                return End::Reconnect(format!("send failed: {e}"));
            }
        }
        loop {
            let listening = backlog.is_empty();
            // Unbiased on purpose: a flood of incoming frames must not starve heartbeats
            // (the server closes a connection that sends nothing) or sends, and vice versa.
            tokio::select! {
                () = self.shared.stop.cancelled() => break End::Stop,
                permit = self.events.reserve(), if !listening => {
                    match permit {
                        Ok(permit) => {
                            if let Some(Item::Event(event)) = backlog.pop_front() {
                                permit.send(event);
                            }
                        }
                        // Nobody listens to events any more: drop them (the application
                        // gave up receiving), keep the session and the acks.
                        Err(_) => backlog.retain(|item| matches!(item, Item::Ack(_) | Item::GroupAck(_))),
                    }
                    if let Err(e) = write_acks(&mut live.conn, backlog).await {
                        break End::Reconnect(format!("ack failed: {e}"));
                    }
                    if backlog.is_empty() {
                        // The connection was not read meanwhile: its silence does not count.
                        last_heard = Instant::now();
                    }
                }
                received = live.conn.recv(), if listening => {
                    last_heard = Instant::now();
                    let frame = match received {
                        Ok(Some(frame)) => frame,
                        Ok(None) => {
                            let reason = last_error
                                .take()
                                .unwrap_or_else(|| "connection closed by the server".into());
                            break End::Reconnect(reason);
                        }
                        Err(e) => break End::Reconnect(format!("connection failed: {e}")),
                    };
                    let end = on_frame(
                        frame,
                        &mut self.recent,
                        pending,
                        backlog,
                        &mut last_error,
                    );
                    if let Some(end) = end {
                        break end;
                    }
                    // A push of messages we had already has its ack at the front at once.
                    if let Err(e) = write_acks(&mut live.conn, backlog).await {
                        break End::Reconnect(format!("ack failed: {e}"));
                    }
                }
                command = self.commands.recv() => {
                    // `None`: every handle is gone; the stop token is cancelled too.
                    let Some(command) = command else { break End::Stop };
                    if let Some(Frame { body: Some(Body::WatchReads(w)) }) = &command.signal {
                        if w.stop {
                            self.read_watches.remove(&w.group_id);
                        } else {
                            self.read_watches.insert(w.group_id);
                        }
                    }
                    if let Err(e) = submit(live, transport, command, pending).await {
                        break End::Reconnect(format!("send failed: {e}"));
                    }
                }
                _ = ping.tick() => {
                    // Results of sends whose callers gave up are no longer awaited.
                    pending.retain(|_, sent| !sent.reply.is_closed());
                    nonce += 1;
                    let frame = Frame::new(Body::Ping(pb::Ping { nonce }));
                    if let Err(e) = write(&mut live.conn, &frame).await {
                        break End::Reconnect(format!("heartbeat failed: {e}"));
                    }
                }
                () = tokio::time::sleep_until(last_heard + silence_limit), if listening => {
                    break End::Reconnect(format!(
                        "no answer from the server for {} ms",
                        silence_limit.as_millis()
                    ));
                }
            }
        }
    }
}

async fn write(conn: &mut Connection, frame: &Frame) -> Result<(), ConnError> {
    tokio::time::timeout(WRITE_TIMEOUT, conn.send(frame))
        .await
        .map_err(|_| ConnError::Timeout)?
}

async fn close(conn: Connection) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close()).await;
}

#[cfg(test)]
mod tests;
