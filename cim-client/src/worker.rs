//! The background task of a [`crate::Client`]: owns the connection, heartbeats, matches send
//! results to sends, turns pushes into events, reconnects, and ends the session. The
//! behaviour it implements is described in [`crate::client`]'s module doc.

use crate::{
    client::{lock, open, ClientConfig, ClientError, ConnState, Event, Live, SendOutcome},
    conn::{ConnError, Connection},
    pb::{self, frame::Body, Frame, KickReason},
    recent::RecentIds,
    route::{RouteClient, RouteError},
    ClientInfo, Transport,
};
use std::{
    collections::{HashMap, VecDeque},
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

type PendingSends = HashMap<u64, oneshot::Sender<Result<SendOutcome, ClientError>>>;

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
        let mut backlog = VecDeque::new();
        let mut live = first;
        let (end, conn) = loop {
            let end = self.serve(&mut live, &mut backlog).await;
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
        self.finish(end, conn, backlog).await;
    }

    /// Runs one connection until it ends. Received messages and kicks go to `backlog` first
    /// and from there into the events channel; while the backlog is not empty the connection
    /// is not read (back-pressure), but heartbeats and sends continue.
    async fn serve(&mut self, live: &mut Live, backlog: &mut VecDeque<Event>) -> End {
        let interval = live.heartbeat;
        let silence_limit = interval.saturating_mul(2);
        let mut ping = tokio::time::interval_at(Instant::now() + interval, interval);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let mut nonce = 0u64;
        let mut pending = PendingSends::new();
        // An error frame the server sent before closing: the best reason for that close.
        let mut last_error: Option<String> = None;
        let transport = self.config.transport;
        let end = loop {
            let listening = backlog.is_empty();
            // Unbiased on purpose: a flood of incoming frames must not starve heartbeats
            // (the server closes a connection that sends nothing) or sends, and vice versa.
            tokio::select! {
                () = self.shared.stop.cancelled() => break End::Stop,
                permit = self.events.reserve(), if !listening => {
                    match permit {
                        Ok(permit) => {
                            if let Some(event) = backlog.pop_front() {
                                permit.send(event);
                            }
                        }
                        // Nobody listens to events any more: drop them, keep the session.
                        Err(_) => backlog.clear(),
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
                        &mut pending,
                        backlog,
                        &mut last_error,
                    );
                    if let Some(end) = end {
                        break end;
                    }
                }
                command = self.commands.recv() => {
                    // `None`: every handle is gone; the stop token is cancelled too.
                    let Some(command) = command else { break End::Stop };
                    if let Err(e) = submit(live, transport, command, &mut pending).await {
                        break End::Reconnect(format!("send failed: {e}"));
                    }
                }
                _ = ping.tick() => {
                    // Results of sends whose callers gave up are no longer awaited.
                    pending.retain(|_, reply| !reply.is_closed());
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
        };
        for (_, reply) in pending.drain() {
            let _ = reply.send(Err(ClientError::ConnectionLost));
        }
        end
    }
}

/// Handles one received frame; `Some` when the connection must end.
fn on_frame(
    frame: Frame,
    recent: &mut RecentIds,
    pending: &mut PendingSends,
    backlog: &mut VecDeque<Event>,
    last_error: &mut Option<String>,
) -> Option<End> {
    match frame.body {
        Some(Body::Push(push)) => {
            for message in push.messages {
                if recent.insert(&message.id) {
                    backlog.push_back(Event::Message(message));
                }
            }
        }
        Some(Body::SendResult(result)) => {
            if let Some(reply) = pending.remove(&result.client_id) {
                let _ = reply.send(outcome(result));
            }
        }
        Some(Body::Pong(_)) => {}
        Some(Body::Kick(kick)) => {
            let reason = KickReason::try_from(kick.reason).unwrap_or(KickReason::Unspecified);
            let why = format!("kicked ({}): {}", reason.as_str_name(), kick.message);
            backlog.push_back(Event::Kicked {
                reason,
                message: kick.message,
            });
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

    /// One reconnect attempt: free the previous session's slot, log in, connect.
    async fn try_login(&mut self) -> Result<Live, Failed> {
        if let Some(old) = self.token.take() {
            // The previous session may still hold the login slot: its server died before its
            // etcd lease expired, or has not noticed that the connection dropped. Its logout
            // frees the slot (only if that session still holds it), so the login below
            // succeeds now instead of answering 409 until the server or lease catches up.
            match self.route.logout(&old).await {
                Ok(()) => {}
                // The route could not be asked: keep the token for the next attempt.
                Err(e @ RouteError::Transport(_)) => {
                    self.token = Some(old);
                    return Err(Failed::Retry(format!("route unreachable: {e}")));
                }
                Err(e) if e.status().is_some_and(|s| s >= 500 || s == 429) => {
                    self.token = Some(old);
                    return Err(Failed::Retry(e.to_string()));
                }
                // 401: that session already ended, which is what we wanted.
                Err(_) => {}
            }
        }
        let login = self
            .route
            .login(&self.config.name, &self.config.password)
            .await
            .map_err(|e| match e.code() {
                Some("bad_credentials") => Failed::Final(
                    "the route refused the name or password (changed meanwhile?)".into(),
                ),
                _ => Failed::Retry(e.to_string()),
            })?;
        // From here the new session holds the slot until connected or logged out.
        self.token = Some(login.session_token.clone());
        let live = open(&login, self.config.transport)
            .await
            .map_err(|e| Failed::Retry(e.to_string()))?;
        *lock(&self.shared.session_token) = login.session_token;
        Ok(live)
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

    async fn emit_backlog(&mut self, backlog: &mut VecDeque<Event>) {
        let stop = self.shared.stop.clone();
        while let Some(event) = backlog.pop_front() {
            tokio::select! {
                sent = self.events.send(event) => if sent.is_err() { backlog.clear() },
                () = stop.cancelled() => return,
            }
        }
    }

    /// Ends the session: logout if asked, close the connection, report `Closed`.
    async fn finish(mut self, end: End, conn: Option<Connection>, mut backlog: VecDeque<Event>) {
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
        backlog.push_back(Event::State(ConnState::Closed { reason }));
        let events = self.events;
        let deliver = async {
            for event in backlog {
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

/// Writes one send to the connection, unless its caller gave up or it is too large.
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
    if reply.is_closed() || Instant::now() >= deadline {
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
    pending.insert(client_id, reply);
    write(&mut live.conn, &frame).await
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
            status: pb::SendStatus::Offline as i32,
            message_id: "01X".into(),
            timestamp_ms: 5,
            delivered: 0,
            error: None,
        };
        assert_eq!(
            outcome(ok).unwrap(),
            SendOutcome {
                message_id: "01X".into(),
                status: pb::SendStatus::Offline,
                delivered: 0,
                timestamp_ms: 5
            }
        );
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
