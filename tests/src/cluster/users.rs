//! [`TestUser`]: a logged-in user connected to its assigned server, as tests drive it:
//! sends and their results, frames read while waiting for something else kept in order for
//! later calls, pings, pushes, acks, and logging in again after a loss.

use anyhow::Context;
use cim_sdk::ClientTls;
use cim_sdk::{
    pb::{self, frame::Body, Frame},
    Connection, LoginInfo, RouteClient, Transport,
};
use std::{collections::VecDeque, time::Duration};

/// A logged-in, connected user.
pub struct TestUser {
    pub login: LoginInfo,
    pub conn: Connection,
    pub transport: Transport,
    /// Frames read while waiting for something else, in arrival order.
    pending: VecDeque<Frame>,
    next_client_id: u64,
}

/// Deadline for any single expected frame in tests.
pub const FRAME_DEADLINE: Duration = Duration::from_secs(10);

impl TestUser {
    pub async fn connect(login: LoginInfo, transport: Transport) -> anyhow::Result<Self> {
        Self::connect_with(login, transport, None).await
    }

    /// [`TestUser::connect`], over TLS with `tls` (to the server's `tls_addr` / `wss_addr`).
    pub async fn connect_with(
        login: LoginInfo,
        transport: Transport,
        tls: Option<&ClientTls>,
    ) -> anyhow::Result<Self> {
        let server = &login.server;
        let mut conn = match (transport, tls) {
            (Transport::Tcp, None) => Connection::connect(&server.tcp_addr, transport).await?,
            (_, None) => Connection::connect(&server.ws_addr, transport).await?,
            (Transport::Tcp, Some(tls)) => {
                let addr = server.tls_addr.as_deref().context("no tls_addr")?;
                Connection::connect_tls(addr, transport, Default::default(), tls).await?
            }
            (_, Some(tls)) => {
                let addr = server.wss_addr.as_deref().context("no wss_addr")?;
                Connection::connect_tls(addr, transport, Default::default(), tls).await?
            }
        };
        conn.login(&login.connect_token).await?;
        Ok(Self {
            login,
            conn,
            transport,
            pending: VecDeque::new(),
            next_client_id: 1,
        })
    }

    /// Reads frames until one satisfies `pick`; the others are kept for later calls.
    pub async fn next_where<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&Frame) -> Option<T>,
    ) -> anyhow::Result<T> {
        if let Some(i) = self.pending.iter().position(|f| pick(f).is_some()) {
            let frame = self.pending.remove(i).expect("index is valid");
            return Ok(pick(&frame).expect("picked before"));
        }
        let deadline = tokio::time::Instant::now() + FRAME_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame = self
                .conn
                .recv_timeout(left)
                .await
                .with_context(|| format!("{}: waiting for {what}", self.login.name))?
                .with_context(|| format!("{}: closed while waiting for {what}", self.login.name))?;
            if let Some(t) = pick(&frame) {
                return Ok(t);
            }
            self.pending.push_back(frame);
        }
    }

    /// Sends a message over the connection and returns its result.
    pub async fn send(&mut self, mut send: pb::Send) -> anyhow::Result<pb::SendResult> {
        let client_id = self.next_client_id;
        self.next_client_id += 1;
        send.client_id = client_id;
        self.conn
            .send(&Frame::new(Body::Send(send)))
            .await
            .context("send")?;
        self.next_where("send_result", |f| match &f.body {
            Some(Body::SendResult(r)) if r.client_id == client_id => Some(r.clone()),
            _ => None,
        })
        .await
    }

    /// Sends a private message to `to` (user id).
    pub async fn send_private(&mut self, to: u64, body: &str) -> anyhow::Result<pb::SendResult> {
        self.send(pb::Send {
            kind: pb::MessageKind::Private as i32,
            to_user_id: to,
            body: body.into(),
            ..Default::default()
        })
        .await
    }

    /// Sends a message to everyone online.
    pub async fn send_group(&mut self, body: &str) -> anyhow::Result<pb::SendResult> {
        self.send(pb::Send {
            kind: pb::MessageKind::Group as i32,
            body: body.into(),
            ..Default::default()
        })
        .await
    }

    /// The next pushed message.
    /// A message to stored group `group` over the connection.
    pub async fn send_group_chat(
        &mut self,
        group: u64,
        body: &str,
    ) -> anyhow::Result<pb::SendResult> {
        self.send(pb::Send {
            kind: pb::MessageKind::GroupChat as i32,
            group_id: group,
            body: body.into(),
            ..Default::default()
        })
        .await
    }

    /// Acks group positions (`(group, log_seq)`).
    pub async fn ack_groups(&mut self, positions: &[(u64, u64)]) -> anyhow::Result<()> {
        let groups = positions
            .iter()
            .map(|&(group_id, log_seq)| pb::GroupPosition { group_id, log_seq })
            .collect();
        self.send_frame(&Frame::new(Body::Ack(pb::Ack {
            message_ids: Vec::new(),
            groups,
        })))
        .await
    }

    /// The next Typing frame.
    pub async fn next_typing(&mut self) -> anyhow::Result<pb::Typing> {
        self.next_where("a typing frame", |f| match &f.body {
            Some(Body::Typing(t)) => Some(t.clone()),
            _ => None,
        })
        .await
    }

    /// The next Error frame.
    pub async fn next_error(&mut self) -> anyhow::Result<pb::Error> {
        self.next_where("an error frame", |f| match &f.body {
            Some(Body::Error(e)) => Some(e.clone()),
            _ => None,
        })
        .await
    }

    /// The next ReadMark frame.
    pub async fn next_read_mark(&mut self) -> anyhow::Result<pb::ReadMark> {
        self.next_where("a read mark", |f| match &f.body {
            Some(Body::ReadMark(m)) => Some(*m),
            _ => None,
        })
        .await
    }

    pub async fn next_message(&mut self) -> anyhow::Result<pb::Message> {
        Ok(self.next_delivery().await?.0)
    }

    /// Messages received until (and including) the first one whose body is `marker`.
    pub async fn messages_until(&mut self, marker: &str) -> anyhow::Result<Vec<pb::Message>> {
        let mut out = Vec::new();
        loop {
            let m = self.next_message().await?;
            let done = m.body == marker;
            out.push(m);
            if done {
                return Ok(out);
            }
        }
    }

    /// Waits for the server to end the connection; returns the frames it sent before closing.
    pub async fn closed(&mut self) -> anyhow::Result<Vec<Frame>> {
        let mut frames: Vec<Frame> = self.pending.drain(..).collect();
        loop {
            match self.conn.recv_timeout(FRAME_DEADLINE).await {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => return Ok(frames),
                Err(cim_sdk::conn::ConnError::Timeout) => {
                    anyhow::bail!("{}: connection still open", self.login.name)
                }
                // A reset after the server's last frame is a close too.
                Err(_) => return Ok(frames),
            }
        }
    }

    pub fn id(&self) -> u64 {
        self.login.user_id
    }

    pub fn server_id(&self) -> &str {
        &self.login.server.id
    }
}

/// The password [`Cluster::register_and_login`] gives `name`.
pub fn test_password(name: &str) -> String {
    format!("password-{name}")
}

/// Pause between two attempts of a login that was refused (old slot still held, no server).
const RELOGIN_RETRY: Duration = Duration::from_millis(100);

impl TestUser {
    /// Logs `name` (registered, password [`test_password`]) in through `route` and connects,
    /// retrying for up to `deadline` while the login is refused or the assigned server cannot
    /// be reached (a server that just died may still be assigned until its lease expires; the
    /// failed session is logged out so its pending slot does not lock the user out).
    pub async fn login_again(
        route: &RouteClient,
        name: &str,
        transport: Transport,
        deadline: Duration,
    ) -> anyhow::Result<TestUser> {
        let password = test_password(name);
        let end = tokio::time::Instant::now() + deadline;
        loop {
            let error = match route.login(name, &password).await {
                Ok(login) => {
                    let session = login.session_token.clone();
                    match TestUser::connect(login, transport).await {
                        Ok(user) => return Ok(user),
                        Err(e) => {
                            let _ = route.logout(&session).await;
                            e
                        }
                    }
                }
                Err(e) => anyhow::Error::from(e),
            };
            if tokio::time::Instant::now() + RELOGIN_RETRY >= end {
                return Err(error.context(format!("{name}: no accepted login within {deadline:?}")));
            }
            tokio::time::sleep(RELOGIN_RETRY).await;
        }
    }

    /// Sends a frame without waiting for anything.
    pub async fn send_frame(&mut self, frame: &Frame) -> anyhow::Result<()> {
        self.conn.send(frame).await.context("sending a frame")
    }

    /// Writes a Send (its `client_id` is chosen here) without waiting for the result; returns
    /// the client id to find the result with [`TestUser::result_of`].
    pub async fn submit(&mut self, mut send: pb::Send) -> anyhow::Result<u64> {
        let client_id = self.next_client_id;
        self.next_client_id += 1;
        send.client_id = client_id;
        self.send_frame(&Frame::new(Body::Send(send))).await?;
        Ok(client_id)
    }

    /// The SendResult of the send with `client_id`.
    pub async fn result_of(&mut self, client_id: u64) -> anyhow::Result<pb::SendResult> {
        self.next_where("send_result", |f| match &f.body {
            Some(Body::SendResult(r)) if r.client_id == client_id => Some(r.clone()),
            _ => None,
        })
        .await
    }

    /// Acknowledges stored messages (they leave the inbox; receipts follow).
    pub async fn ack(&mut self, ids: Vec<String>) -> anyhow::Result<()> {
        self.send_frame(&Frame::new(Body::Ack(pb::Ack {
            message_ids: ids,
            ..Default::default()
        })))
        .await
    }

    /// Sends a Ping and returns every frame that arrived before its Pong (frames kept from
    /// earlier calls included, and no longer kept). The server answers frames in order and
    /// writes a connection's inbox replay before reading anything, so what the Pong did not
    /// overtake is everything the server had queued for this connection by then.
    pub async fn ping(&mut self, nonce: u64) -> anyhow::Result<Vec<Frame>> {
        self.send_frame(&Frame::new(Body::Ping(pb::Ping { nonce })))
            .await?;
        let mut before: Vec<Frame> = self.pending.drain(..).collect();
        let deadline = tokio::time::Instant::now() + FRAME_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame = self
                .conn
                .recv_timeout(left)
                .await
                .with_context(|| format!("{}: waiting for pong {nonce}", self.login.name))?
                .with_context(|| format!("{}: closed before pong {nonce}", self.login.name))?;
            if matches!(&frame.body, Some(Body::Pong(p)) if p.nonce == nonce) {
                return Ok(before);
            }
            before.push(frame);
        }
    }

    /// The next Push frame with messages, whole (its `replay` flag included).
    pub async fn next_push(&mut self) -> anyhow::Result<pb::Push> {
        self.next_where("a push", |f| match &f.body {
            Some(Body::Push(p)) if !p.messages.is_empty() => Some(p.clone()),
            _ => None,
        })
        .await
    }

    /// The next pushed message, and whether it came in a replay Push.
    pub async fn next_delivery(&mut self) -> anyhow::Result<(pb::Message, bool)> {
        let mut push = self.next_push().await?;
        // A push may carry several messages: keep the rest, in order, for the next calls.
        let first = push.messages.remove(0);
        let replay = push.replay;
        if !push.messages.is_empty() {
            self.pending.push_front(Frame::new(Body::Push(push)));
        }
        Ok((first, replay))
    }

    /// The next Push frame with messages, or `None` when the connection ended (closed or
    /// reset) first. Other frames are kept. Fails after `deadline` without either.
    pub async fn next_push_or_end(
        &mut self,
        deadline: Duration,
    ) -> anyhow::Result<Option<pb::Push>> {
        let is_push = |f: &Frame| matches!(&f.body, Some(Body::Push(p)) if !p.messages.is_empty());
        if let Some(i) = self.pending.iter().position(is_push) {
            if let Some(Frame {
                body: Some(Body::Push(p)),
            }) = self.pending.remove(i)
            {
                return Ok(Some(p));
            }
        }
        let end = tokio::time::Instant::now() + deadline;
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            match self.conn.recv_timeout(left).await {
                Ok(Some(Frame {
                    body: Some(Body::Push(p)),
                })) if !p.messages.is_empty() => return Ok(Some(p)),
                Ok(Some(other)) => self.pending.push_back(other),
                Ok(None) => return Ok(None),
                Err(cim_sdk::conn::ConnError::Timeout) => {
                    anyhow::bail!("{}: no push within {deadline:?}", self.login.name)
                }
                // A reset (the server process died) ends the connection too.
                Err(_) => return Ok(None),
            }
        }
    }
}
