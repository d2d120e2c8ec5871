//! The background task of a [`crate::Client`]: owns the connection, heartbeats, matches send
//! results to sends (and re-sends the unanswered ones after a reconnect), turns pushes into
//! events, acknowledges stored messages, reconnects, and ends the session. The behaviour it
//! implements is described in [`crate::client`]'s module doc.

use crate::{
    client::{lock, open, ClientConfig, ClientError, ConnState, Event, Live, SendOutcome},
    conn::{self, ConnError, Connection},
    pb::{self, frame::Body, Frame, KickReason},
    recent::RecentIds,
    route::{LoginInfo, RouteClient, RouteError},
    ClientInfo, Transport,
};
use std::{
    collections::{BTreeMap, VecDeque},
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
    pub reply: oneshot::Sender<Result<SendOutcome, ClientError>>,
    /// After this the caller has given up: the send must not be written any more.
    pub deadline: Instant,
}

/// What a connection's run hands on, in order: events for the application, and acks, each
/// written once every event before it is in the events channel.
#[derive(Debug, PartialEq)]
pub(crate) enum Item {
    Event(Event),
    /// Ids of stored messages of one push (see [`conn::ack_ids`]).
    Ack(Vec<String>),
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

/// A send written to a connection and waiting for its result.
pub(crate) struct InFlight {
    /// The `Send` frame as written, with its `message_id`: what a re-send writes again.
    frame: Frame,
    reply: oneshot::Sender<Result<SendOutcome, ClientError>>,
    deadline: Instant,
}

impl InFlight {
    /// Whether the caller still waits for the result (it has not given up, and its deadline
    /// has not passed).
    fn awaited(&self) -> bool {
        !self.reply.is_closed() && Instant::now() < self.deadline
    }
}

/// Sends waiting for their results, by `client_id`, which increases: iterating re-sends them
/// in the order they were first sent. They outlive a connection: after a reconnect, the ones
/// still awaited are written again (same `message_id`, so the server stores them once).
pub(crate) type PendingSends = BTreeMap<u64, InFlight>;

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
                        Err(_) => backlog.retain(|item| matches!(item, Item::Ack(_))),
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

/// Writes the sends of `pending` again (a new connection), in their original order; the ones
/// no longer awaited are dropped (a caller whose deadline passed is told `Timeout`).
async fn resend(live: &mut Live, pending: &mut PendingSends) -> Result<(), ConnError> {
    let gone: Vec<u64> = pending
        .iter()
        .filter(|(_, sent)| !sent.awaited())
        .map(|(id, _)| *id)
        .collect();
    for id in gone {
        if let Some(sent) = pending.remove(&id) {
            // Only a caller still waiting can read this; one that gave up ignores it.
            let _ = sent.reply.send(Err(ClientError::Timeout));
        }
    }
    if pending.is_empty() {
        return Ok(());
    }
    tracing::debug!(sends = pending.len(), "re-sending unanswered sends");
    let conn = &mut live.conn;
    let write_all = async {
        for sent in pending.values() {
            conn.feed(&sent.frame).await?;
        }
        conn.flush().await
    };
    tokio::time::timeout(WRITE_TIMEOUT, write_all)
        .await
        .map_err(|_| ConnError::Timeout)?
}

/// Writes the acks at the front of `backlog` (every event before them is in the events
/// channel), merged into as few frames as the limit per frame allows.
async fn write_acks(conn: &mut Connection, backlog: &mut Backlog) -> Result<(), ConnError> {
    let ids = take_front_acks(backlog);
    if ids.is_empty() {
        return Ok(());
    }
    tokio::time::timeout(WRITE_TIMEOUT, conn.ack(ids))
        .await
        .map_err(|_| ConnError::Timeout)?
}

/// Removes the acks at the front of `backlog` and returns their ids.
fn take_front_acks(backlog: &mut Backlog) -> Vec<String> {
    let mut ids = Vec::new();
    while matches!(backlog.front(), Some(Item::Ack(_))) {
        if let Some(Item::Ack(more)) = backlog.pop_front() {
            ids.extend(more);
        }
    }
    ids
}

/// The event for one received (new) message: receipts have their own.
fn event_of(message: pb::Message, replayed: bool) -> Event {
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
fn on_frame(
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
            let replayed = push.replay;
            for message in push.messages {
                if recent.insert(&message.id) {
                    backlog.push_back(Item::Event(event_of(message, replayed)));
                }
            }
            if !ack.is_empty() {
                backlog.push_back(Item::Ack(ack));
            }
        }
        Some(Body::SendResult(result)) => {
            if let Some(sent) = pending.remove(&result.client_id) {
                let _ = sent.reply.send(outcome(result));
            }
        }
        Some(Body::Pong(_)) => {}
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

impl Worker {
    /// Reconnects with backoff until connected, or until the end is final.
    async fn reconnect(&mut self, mut reason: String) -> Result<Live, End> {
        let stop = self.shared.stop.clone();
        loop {
            self.attempt = self.attempt.saturating_add(1);
            if let Some(max) = self.config.reconnect.max_attempts {
                if self.attempt > max {
                    return Err(End::Closed(format!(
                        "gave up after {max} reconnect attempts: {reason}"
                    )));
                }
            }
            let delay = self.config.reconnect.backoff(self.attempt);
            self.set_state(ConnState::Reconnecting {
                attempt: self.attempt,
                retry_in: delay,
                reason: reason.clone(),
            })
            .await;
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop.cancelled() => return Err(End::Stop),
            }
            self.set_state(ConnState::Connecting).await;
            let attempt = tokio::select! {
                result = self.try_login() => result,
                () = stop.cancelled() => return Err(End::Stop),
            };
            match attempt {
                Ok(live) => return Ok(live),
                Err(Failed::Retry(why)) => {
                    tracing::debug!(attempt = self.attempt, %why, "reconnect attempt failed");
                    reason = why;
                }
                Err(Failed::Final(why)) => return Err(End::Closed(why)),
            }
        }
    }

    /// One reconnect attempt: resume the previous session (or log in with the password),
    /// then connect.
    async fn try_login(&mut self) -> Result<Live, Failed> {
        let login = match self.token.take() {
            Some(old) => match self.resume(old).await? {
                Some(login) => login,
                None => self.password_login().await?,
            },
            None => self.password_login().await?,
        };
        // From here the new session holds the slot until connected or logged out.
        self.token = Some(login.session_token.clone());
        let live = open(&login, self.config.transport, self.config.tls, &self.route)
            .await
            .map_err(|e| Failed::Retry(e.to_string()))?;
        *lock(&self.shared.session_token) = login.session_token;
        Ok(live)
    }

    /// Logs in again with the previous session's token: the route replaces that session
    /// (ending its connection if its server still has it), so a reconnect is never refused
    /// by our own old session, and costs no password hash. `None` when that session ended
    /// (a password login follows).
    async fn resume(&mut self, old: String) -> Result<Option<LoginInfo>, Failed> {
        match self.route.resume(&old).await {
            Ok(login) => Ok(Some(login)),
            // The route could not be asked: keep the token for the next attempt.
            Err(e @ RouteError::Transport(_)) => {
                self.token = Some(old);
                Err(Failed::Retry(e.to_string()))
            }
            // A route older than resume: free the old slot by logging it out, then log in.
            Err(e) if e.status() == Some(404) => match self.route.logout(&old).await {
                Err(e @ RouteError::Transport(_)) => {
                    self.token = Some(old);
                    Err(Failed::Retry(e.to_string()))
                }
                _ => Ok(None),
            },
            Err(e) if e.status().is_some_and(|s| s >= 500 || s == 429) => {
                self.token = Some(old);
                Err(Failed::Retry(e.to_string()))
            }
            // 401: that session ended (logged out, replaced, expired): log in afresh. 409:
            // another login took the slot at the same moment; the password login says so.
            Err(_) => Ok(None),
        }
    }

    /// Logs in with the name and password.
    async fn password_login(&self) -> Result<LoginInfo, Failed> {
        self.route
            .login(&self.config.name, &self.config.password)
            .await
            .map_err(|e| match e.code() {
                // Unknown names and wrong passwords get the same answer (no account probing).
                Some("bad_credentials") => Failed::Final(
                    "the route no longer accepts this name and password (the account was \
                     removed, e.g. by a standalone restart, or its password changed)"
                        .into(),
                ),
                _ => Failed::Retry(e.to_string()),
            })
    }

    /// Records `state` for [`crate::Client::info`] and reports it as an event.
    async fn set_state(&mut self, state: ConnState) {
        {
            let mut info = lock(&self.shared.info);
            match &state {
                ConnState::Connected { server_id, addr } => {
                    info.server_id = Some(server_id.clone());
                    info.server_addr = Some(addr.clone());
                }
                _ => {
                    info.server_id = None;
                    info.server_addr = None;
                }
            }
            info.state = state.clone();
        }
        let stop = self.shared.stop.clone();
        tokio::select! {
            // An error means nobody listens: nothing to report to.
            _ = self.events.send(Event::State(state)) => {}
            () = stop.cancelled() => {}
        }
    }

    /// Hands the backlog's events to the application after the connection was lost. Its acks
    /// are dropped: the messages come again at the next connection, where the ring of
    /// recent ids filters them out and they are acked.
    async fn emit_backlog(&mut self, backlog: &mut Backlog) {
        let stop = self.shared.stop.clone();
        while let Some(item) = backlog.pop_front() {
            let Item::Event(event) = item else { continue };
            tokio::select! {
                sent = self.events.send(event) => if sent.is_err() { backlog.clear() },
                () = stop.cancelled() => return,
            }
        }
    }

    /// Ends the session: logout if asked, close the connection, report `Closed`.
    async fn finish(mut self, end: End, conn: Option<Connection>, mut backlog: Backlog) {
        // Taken under the lock that `logout` checks, so a logout either is answered here or
        // sees `Finished` and returns at once.
        let logout = match std::mem::replace(&mut *lock(&self.shared.logout), LogoutSlot::Finished)
        {
            LogoutSlot::Requested(reply) => Some(reply),
            LogoutSlot::Open | LogoutSlot::Finished => None,
        };
        let connected = conn.is_some();
        let reason = match end {
            End::Closed(reason) => reason,
            End::Stop if logout.is_some() => "logged out".to_string(),
            End::Stop => "every client handle was dropped".to_string(),
            End::Reconnect(reason) => reason,
        };
        let mut logout_result = Ok(());
        if let Some(token) = self.token.take() {
            if logout.is_some() {
                // 401: the session ended already (kicked, expired), which is what was asked.
                logout_result = match self.route.logout(&token).await {
                    Err(e) if e.status() != Some(401) => Err(ClientError::Route(e)),
                    _ => Ok(()),
                };
            } else if !connected {
                // A reconnect attempt logged in but never connected: give its slot back now
                // rather than after the connect-token TTL. (An open connection frees its slot
                // itself when it closes.)
                if let Err(e) = self.route.logout(&token).await {
                    tracing::debug!(error = %e, "logout of an unused login failed");
                }
            }
        }
        if let Some(conn) = conn {
            close(conn).await;
        }
        self.set_state_quietly(ConnState::Closed {
            reason: reason.clone(),
        });
        tracing::debug!(user = %self.config.name, %reason, "client closed");
        if let Some(reply) = logout {
            let _ = reply.send(logout_result);
        }
        // Queued sends are answered `Closed` when their reply senders drop with the receiver.
        self.commands.close();
        backlog.push_back(Item::Event(Event::State(ConnState::Closed { reason })));
        let events = self.events;
        let deliver = async {
            for item in backlog {
                // Acks cannot be written any more: those messages come again at the next
                // login (a new client has no memory of them, so they arrive twice).
                let Item::Event(event) = item else { continue };
                if events.send(event).await.is_err() {
                    return;
                }
            }
        };
        // An application that never reads again must not keep this task alive.
        let _ = tokio::time::timeout(FINAL_EVENTS_TIMEOUT, deliver).await;
    }

    fn set_state_quietly(&self, state: ConnState) {
        let mut info = lock(&self.shared.info);
        info.server_id = None;
        info.server_addr = None;
        info.state = state;
    }
}

/// Writes one send to the connection, unless its caller gave up or it is too large. It stays
/// in `pending` until its result arrives, also when the write fails (re-sent on the next
/// connection).
async fn submit(
    live: &mut Live,
    transport: Transport,
    command: Command,
    pending: &mut PendingSends,
) -> Result<(), ConnError> {
    let Command {
        send,
        reply,
        deadline,
    } = command;
    // A caller told "timed out" must not have its message sent afterwards.
    if reply.is_closed() {
        return Ok(());
    }
    if Instant::now() >= deadline {
        let _ = reply.send(Err(ClientError::Timeout));
        return Ok(());
    }
    let client_id = send.client_id;
    let frame = Frame::new(Body::Send(send));
    // The server closes a connection that sends an oversized frame: refuse it here instead.
    let len = frame_len(&frame, transport);
    if live.max_frame_len > 0 && len > live.max_frame_len {
        let _ = reply.send(Err(ClientError::Send {
            code: pb::ErrorCode::FrameTooLarge,
            message: format!(
                "the message is {len} bytes encoded, the server accepts at most {}",
                live.max_frame_len
            ),
        }));
        return Ok(());
    }
    let sent = InFlight {
        frame,
        reply,
        deadline,
    };
    pending.insert(client_id, sent);
    write(&mut live.conn, &pending[&client_id].frame).await
}

/// Size of `frame` as the server measures it for `transport`.
fn frame_len(frame: &Frame, transport: Transport) -> usize {
    match transport {
        Transport::Tcp | Transport::WsBinary => prost::Message::encoded_len(frame),
        Transport::WsJson => serde_json::to_string(frame).map_or(usize::MAX, |s| s.len()),
    }
}

/// A send result as the API reports it.
fn outcome(result: pb::SendResult) -> Result<SendOutcome, ClientError> {
    match result.status() {
        pb::SendStatus::Failed => {
            let error = result.error.unwrap_or_default();
            Err(ClientError::Send {
                code: error.code(),
                message: error.message,
            })
        }
        status => Ok(SendOutcome {
            message_id: result.message_id,
            status,
            delivered: result.delivered,
            timestamp_ms: result.timestamp_ms,
            repeat: result.repeat,
        }),
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
mod tests {
    use super::*;
    use crate::{client::ReconnectPolicy, recent::DEFAULT_CAPACITY};
    use cim_proto::codec::FrameCodec;
    use futures_util::{SinkExt, StreamExt};
    use std::sync::Arc;
    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::codec::Framed;

    /// Deadline of every wait in these tests.
    const DEADLINE: Duration = Duration::from_secs(10);

    fn message(id: &str, seq: u64, kind: pb::MessageKind) -> pb::Message {
        pb::Message {
            id: id.into(),
            sender_id: 2,
            sender_name: "bob".into(),
            receiver_id: 1,
            kind: kind as i32,
            body: format!("body of {id}"),
            timestamp_ms: 1_700_000_000_000,
            seq,
            ..Default::default()
        }
    }

    fn private(id: &str, seq: u64) -> pb::Message {
        message(id, seq, pb::MessageKind::Private)
    }

    fn push(replay: bool, messages: Vec<pb::Message>) -> Frame {
        Frame::new(Body::Push(pb::Push { messages, replay }))
    }

    fn events(backlog: &Backlog) -> Vec<&Event> {
        backlog
            .iter()
            .filter_map(|i| match i {
                Item::Event(e) => Some(e),
                Item::Ack(_) => None,
            })
            .collect()
    }

    /// Runs `on_frame` on a push with fresh state, keeping `recent` for the next call.
    fn on_push(recent: &mut RecentIds, frame: Frame) -> Backlog {
        let mut backlog = Backlog::new();
        let end = on_frame(
            frame,
            recent,
            &mut PendingSends::new(),
            &mut backlog,
            &mut None,
        );
        assert!(end.is_none());
        backlog
    }

    #[test]
    fn a_push_is_acked_once_after_its_events_with_duplicates_and_without_unstored() {
        let mut recent = RecentIds::new(16);
        let first = on_push(&mut recent, push(false, vec![private("a", 1)]));
        assert_eq!(
            first.back(),
            Some(&Item::Ack(vec!["a".to_string()])),
            "{first:?}"
        );
        // "a" again (a replay after a reconnect), a group message (not stored: seq 0), "b".
        let group = message("g", 0, pb::MessageKind::Group);
        let second = on_push(
            &mut recent,
            push(true, vec![private("a", 1), group.clone(), private("b", 2)]),
        );
        assert_eq!(
            second,
            [
                Item::Event(Event::Message {
                    message: group,
                    replayed: true
                }),
                Item::Event(Event::Message {
                    message: private("b", 2),
                    replayed: true
                }),
                // One ack for the whole push, the duplicate included, after its events.
                Item::Ack(vec!["a".to_string(), "b".to_string()]),
            ]
            .into_iter()
            .collect::<Backlog>()
        );
        // Only duplicates: nothing for the application, the ack all the same.
        let third = on_push(&mut recent, push(false, vec![private("a", 1)]));
        assert_eq!(third, Backlog::from([Item::Ack(vec!["a".to_string()])]));
        // A push of unstored messages only needs no ack.
        let fourth = on_push(
            &mut recent,
            push(false, vec![message("s", 0, pb::MessageKind::System)]),
        );
        assert_eq!(fourth.len(), 1);
        assert!(matches!(fourth[0], Item::Event(Event::Message { .. })));
    }

    #[test]
    fn channel_messages_become_message_events_once_and_are_never_acked() {
        let mut recent = RecentIds::new(16);
        let mut channel = message("c1", 0, pb::MessageKind::Channel);
        channel.channel = "room1".into();
        channel.receiver_id = 0;
        // Mixed with a stored private message: only that one is acked.
        let backlog = on_push(
            &mut recent,
            push(false, vec![channel.clone(), private("p1", 3)]),
        );
        assert_eq!(
            backlog,
            [
                Item::Event(Event::Message {
                    message: channel.clone(),
                    replayed: false
                }),
                Item::Event(Event::Message {
                    message: private("p1", 3),
                    replayed: false
                }),
                Item::Ack(vec!["p1".to_string()]),
            ]
            .into_iter()
            .collect::<Backlog>()
        );
        // The same channel message again (a sender's re-send after a lost connection):
        // dropped by id, and still nothing to ack.
        assert!(on_push(&mut recent, push(false, vec![channel])).is_empty());
    }

    #[test]
    fn the_replay_flag_of_a_push_reaches_its_events() {
        let mut recent = RecentIds::new(16);
        let live = on_push(&mut recent, push(false, vec![private("a", 1)]));
        let replayed = on_push(&mut recent, push(true, vec![private("b", 2)]));
        assert!(matches!(
            events(&live)[..],
            [Event::Message {
                replayed: false,
                ..
            }]
        ));
        assert!(matches!(
            events(&replayed)[..],
            [Event::Message { replayed: true, .. }]
        ));
    }

    #[test]
    fn receipts_become_receipt_events_and_are_acked() {
        let mut recent = RecentIds::new(16);
        let mut receipt = message("r1", 7, pb::MessageKind::Receipt);
        receipt.receipt_for = "m42".into();
        receipt.timestamp_ms = 1234;
        let backlog = on_push(&mut recent, push(false, vec![receipt.clone()]));
        assert_eq!(
            backlog,
            [
                Item::Event(Event::Receipt {
                    message_id: "m42".into(),
                    by_user_id: 2,
                    by_name: "bob".into(),
                    at_ms: 1234
                }),
                Item::Ack(vec!["r1".to_string()]),
            ]
            .into_iter()
            .collect::<Backlog>()
        );
        // A receipt replayed after a reconnect is reported once, and acked again.
        let again = on_push(&mut recent, push(true, vec![receipt]));
        assert_eq!(again, Backlog::from([Item::Ack(vec!["r1".to_string()])]));
    }

    #[test]
    fn acks_at_the_front_are_merged_and_the_rest_waits() {
        let event = || Item::Event(Event::State(ConnState::Connecting));
        let mut backlog: Backlog = [
            Item::Ack(vec!["a".into()]),
            Item::Ack(vec!["b".into(), "c".into()]),
            event(),
            Item::Ack(vec!["d".into()]),
        ]
        .into();
        assert_eq!(take_front_acks(&mut backlog), ["a", "b", "c"]);
        assert_eq!(backlog.len(), 2);
        // An event in front: nothing is taken until the application has it.
        assert!(take_front_acks(&mut backlog).is_empty());
        backlog.pop_front();
        assert_eq!(take_front_acks(&mut backlog), ["d"]);
        assert!(backlog.is_empty());
    }

    /// A worker whose connections the test makes itself (no route behind it).
    struct Harness {
        worker: Worker,
        events: mpsc::Receiver<Event>,
        commands: mpsc::Sender<Command>,
        listener: TcpListener,
    }

    async fn harness(event_capacity: usize) -> Harness {
        let config = ClientConfig {
            reconnect: ReconnectPolicy::default(),
            ..ClientConfig::new("http://127.0.0.1:1", "alice", "password")
        };
        let info = ClientInfo {
            user_id: 1,
            name: "alice".into(),
            route_url: config.route_url.clone(),
            server_id: None,
            server_addr: None,
            state: ConnState::Connecting,
        };
        let shared = Arc::new(Shared {
            info: Mutex::new(info),
            session_token: Mutex::new(String::new()),
            stop: CancellationToken::new(),
            logout: Mutex::new(LogoutSlot::Open),
            next_client_id: AtomicU64::new(1),
        });
        let (events_tx, events) = mpsc::channel(event_capacity);
        let (commands, commands_rx) = mpsc::channel(16);
        let worker = Worker {
            shared,
            route: RouteClient::new(&config.route_url),
            config,
            events: events_tx,
            commands: commands_rx,
            recent: RecentIds::new(DEFAULT_CAPACITY),
            token: None,
            attempt: 0,
        };
        Harness {
            worker,
            events,
            commands,
            listener: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        }
    }

    type Server = Framed<TcpStream, FrameCodec>;

    impl Harness {
        /// A new connection: the worker's side (as if logged in, pinging every `heartbeat`)
        /// and the fake server's.
        async fn connection(&self, heartbeat: Duration) -> (Live, Server) {
            let addr = self.listener.local_addr().expect("addr").to_string();
            let (conn, accepted) = tokio::join!(
                Connection::connect(&addr, Transport::Tcp),
                self.listener.accept()
            );
            let live = Live {
                conn: conn.expect("connect"),
                server_id: "s1".into(),
                addr,
                heartbeat,
                max_frame_len: 0,
                since: Instant::now(),
            };
            let server = Framed::new(accepted.expect("accept").0, FrameCodec::default());
            (live, server)
        }

        fn command(&self, message_id: &str) -> (Command, oneshot::Receiver<SendResultOf>) {
            let (reply, result) = oneshot::channel();
            let client_id = self.worker.shared.next_client_id.fetch_add(1, Relaxed);
            let command = Command {
                send: pb::Send {
                    client_id,
                    kind: pb::MessageKind::Private as i32,
                    to_user_id: 2,
                    body: format!("body of {message_id}"),
                    message_id: message_id.into(),
                    ..Default::default()
                },
                reply,
                deadline: Instant::now() + DEADLINE,
            };
            (command, result)
        }
    }

    type SendResultOf = Result<SendOutcome, ClientError>;
    use std::sync::atomic::Ordering::Relaxed;

    /// The next frame the fake server receives, skipping pings.
    async fn next_frame(server: &mut Server) -> Body {
        loop {
            let frame = tokio::time::timeout(DEADLINE, server.next())
                .await
                .expect("a frame in time")
                .expect("connection open")
                .expect("a valid frame");
            match frame.body {
                Some(Body::Ping(_)) => continue,
                Some(body) => return body,
                None => panic!("empty frame"),
            }
        }
    }

    async fn next_event(events: &mut mpsc::Receiver<Event>) -> Event {
        tokio::time::timeout(DEADLINE, events.recv())
            .await
            .expect("an event in time")
            .expect("events open")
    }

    #[tokio::test]
    async fn acks_follow_the_events_into_the_channel() {
        let mut h = harness(1).await;
        let (mut live, mut server) = h.connection(Duration::from_millis(20)).await;
        let stop = h.worker.shared.stop.clone();
        let mut backlog = Backlog::new();
        let mut pending = PendingSends::new();
        let served = async {
            let end = h.worker.serve(&mut live, &mut backlog, &mut pending).await;
            assert!(matches!(end, End::Stop));
        };
        let test = async {
            server
                .send(push(true, vec![private("a", 1), private("b", 2)]))
                .await
                .unwrap();
            // The channel holds one event: "b" waits in the backlog, and so does the ack.
            // Heartbeats go on meanwhile; the next pings come before any ack.
            for _ in 0..3 {
                let frame = tokio::time::timeout(DEADLINE, server.next())
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap();
                assert!(matches!(frame.body, Some(Body::Ping(_))), "{frame:?}");
            }
            for id in ["a", "b"] {
                match next_event(&mut h.events).await {
                    Event::Message { message, replayed } => {
                        assert_eq!((message.id.as_str(), replayed), (id, true));
                    }
                    other => panic!("{other:?}"),
                }
            }
            // Both taken: one ack for the push.
            match next_frame(&mut server).await {
                Body::Ack(ack) => assert_eq!(ack.message_ids, ["a", "b"]),
                other => panic!("{other:?}"),
            }
            stop.cancel();
        };
        tokio::time::timeout(DEADLINE, async { tokio::join!(served, test) })
            .await
            .expect("in time");
    }

    #[tokio::test]
    async fn unanswered_sends_are_resent_on_the_next_connection_with_their_id() {
        let mut h = harness(16).await;
        let hour = Duration::from_secs(3600);
        let mut backlog = Backlog::new();
        let mut pending = PendingSends::new();

        // First connection: two sends are written, the server dies without answering.
        let (mut live, mut server) = h.connection(hour).await;
        let (kept, kept_result) = h.command("m-kept");
        let (abandoned, abandoned_result) = h.command("m-abandoned");
        h.commands.send(kept).await.unwrap();
        h.commands.send(abandoned).await.unwrap();
        let served = h.worker.serve(&mut live, &mut backlog, &mut pending);
        let server_side = async {
            for id in ["m-kept", "m-abandoned"] {
                match next_frame(&mut server).await {
                    Body::Send(send) => assert_eq!(send.message_id, id),
                    other => panic!("{other:?}"),
                }
            }
            drop(server);
        };
        let (end, ()) = tokio::join!(served, server_side);
        assert!(matches!(end, End::Reconnect(_)));
        assert_eq!(pending.len(), 2, "kept for the next connection");
        // The second caller gives up during the outage.
        drop(abandoned_result);

        // Second connection: the send still awaited goes out first, same ids, and its
        // result reaches the caller; the abandoned one is not written again.
        let (mut live, mut server) = h.connection(hour).await;
        let stop = h.worker.shared.stop.clone();
        let (later, later_result) = h.command("m-later");
        let commands = h.commands.clone();
        let served = async {
            let end = h.worker.serve(&mut live, &mut backlog, &mut pending).await;
            assert!(matches!(end, End::Stop));
        };
        let server_side = async {
            let resent = match next_frame(&mut server).await {
                Body::Send(send) => send,
                other => panic!("{other:?}"),
            };
            assert_eq!(
                (resent.message_id.as_str(), resent.body.as_str()),
                ("m-kept", "body of m-kept")
            );
            commands.send(later).await.unwrap();
            match next_frame(&mut server).await {
                Body::Send(send) => assert_eq!(send.message_id, "m-later"),
                other => panic!("{other:?}"),
            }
            server
                .send(Frame::new(Body::SendResult(pb::SendResult {
                    client_id: resent.client_id,
                    status: pb::SendStatus::Stored as i32,
                    message_id: resent.message_id.clone(),
                    timestamp_ms: 9,
                    ..Default::default()
                })))
                .await
                .unwrap();
            let outcome = tokio::time::timeout(DEADLINE, kept_result)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(
                (outcome.message_id.as_str(), outcome.status),
                ("m-kept", pb::SendStatus::Stored)
            );
            stop.cancel();
        };
        tokio::time::timeout(DEADLINE, async { tokio::join!(served, server_side) })
            .await
            .expect("in time");
        // Still unanswered when the worker stopped: "m-later" (the run loop fails it).
        assert_eq!(pending.keys().count(), 1);
        drop(later_result);
    }

    #[tokio::test]
    async fn a_send_whose_deadline_passed_during_the_outage_times_out() {
        let mut h = harness(16).await;
        let hour = Duration::from_secs(3600);
        let mut backlog = Backlog::new();
        let mut pending = PendingSends::new();
        let (mut live, mut server) = h.connection(hour).await;
        let (command, result) = h.command("m-late");
        h.commands.send(command).await.unwrap();
        let served = h.worker.serve(&mut live, &mut backlog, &mut pending);
        let server_side = async {
            assert!(matches!(next_frame(&mut server).await, Body::Send(_)));
            drop(server);
        };
        let (end, ()) = tokio::join!(served, server_side);
        assert!(matches!(end, End::Reconnect(_)));
        // The outage outlasts the send's deadline.
        assert_eq!(pending.len(), 1);
        for sent in pending.values_mut() {
            sent.deadline = Instant::now();
        }
        let (mut live, _server) = h.connection(hour).await;
        h.worker.shared.stop.cancel();
        let end = h.worker.serve(&mut live, &mut backlog, &mut pending).await;
        assert!(matches!(end, End::Stop));
        assert!(pending.is_empty());
        assert!(matches!(result.await, Ok(Err(ClientError::Timeout))));
    }

    #[test]
    fn failed_results_are_errors_and_others_outcomes() {
        let failed = pb::SendResult::failed(3, pb::ErrorCode::UnknownUser, "no such user");
        match outcome(failed) {
            Err(ClientError::Send { code, message }) => {
                assert_eq!(
                    (code, message.as_str()),
                    (pb::ErrorCode::UnknownUser, "no such user")
                );
            }
            other => panic!("{other:?}"),
        }
        let ok = pb::SendResult {
            client_id: 4,
            status: pb::SendStatus::Stored as i32,
            message_id: "01X".into(),
            timestamp_ms: 5,
            ..Default::default()
        };
        assert_eq!(
            outcome(ok).unwrap(),
            SendOutcome {
                message_id: "01X".into(),
                status: pb::SendStatus::Stored,
                delivered: 0,
                timestamp_ms: 5,
                repeat: false,
            }
        );
        let repeat = pb::SendResult {
            client_id: 5,
            status: pb::SendStatus::Delivered as i32,
            message_id: "01G".into(),
            timestamp_ms: 6,
            repeat: true,
            ..Default::default()
        };
        assert!(outcome(repeat).unwrap().repeat);
    }

    #[test]
    fn frame_length_follows_the_encoding() {
        let frame = Frame::new(Body::Send(pb::Send {
            body: "x".repeat(100),
            ..Default::default()
        }));
        let binary = frame_len(&frame, Transport::Tcp);
        assert!((100..120).contains(&binary), "{binary}");
        assert_eq!(binary, frame_len(&frame, Transport::WsBinary));
        // JSON adds field names and quotes.
        assert!(frame_len(&frame, Transport::WsJson) > binary);
    }
}
