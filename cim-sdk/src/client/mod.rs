//! The client SDK: one logged-in user, kept connected.
//!
//! [`Client::connect`] logs in through the route, connects to the assigned server and starts a
//! background task that owns the connection. The application gets a cheap [`Client`] handle to
//! send messages and list online users, and an [`Events`] stream of state changes, received
//! messages, receipts and kicks.
//!
//! ```no_run
//! use cim_sdk::{Client, ClientConfig, ClientError, Event, Recipient, SendOptions};
//!
//! async fn chat() -> Result<(), ClientError> {
//!     let config = ClientConfig::new("http://127.0.0.1:8080", "alice", "secret1");
//!     let (client, mut events) = Client::connect(config).await?;
//!     let sent = client.send(Recipient::Name("bob".into()), "hi bob").await?;
//!     println!("{} {:?}", sent.message_id, sent.status); // Delivered, or Stored (bob is offline)
//!     let receipt = SendOptions { receipt: true, ..SendOptions::default() };
//!     client.send_with("bob".into(), "tell me when you got this", receipt).await?;
//!     while let Some(event) = events.next().await {
//!         match event {
//!             Event::Message { message, .. } if message.body == "bye" => break,
//!             Event::Message { message, replayed } => {
//!                 let when = if replayed { " (while you were offline)" } else { "" };
//!                 println!("{}: {}{when}", message.sender_name, message.body);
//!             }
//!             Event::Receipt { message_id, by_name, .. } => println!("{by_name} got {message_id}"),
//!             Event::State(state) => println!("{state:?}"), // Reconnecting, Connected, Closed
//!             Event::Kicked { reason, message } => println!("kicked: {reason:?} {message}"),
//!         }
//!     }
//!     client.logout().await // or drop every handle: the user goes offline
//! }
//! ```
//!
//! # Behaviour
//! - **Heartbeats.** The task pings every `heartbeat_interval_ms` of the server's LoginResult.
//!   A connection that stays silent (no pong, no frame at all) for two intervals is treated as
//!   dead and reconnected.
//! - **Reconnects** (automatic, with exponential backoff and ±20 % jitter, see
//!   [`ReconnectPolicy`]) after: a dropped or dead connection, a `SERVER_SHUTDOWN` kick, a
//!   `SLOW_CONSUMER` kick, or a kick with a reason this SDK does not know. Each re-login
//!   *resumes* the previous session (`POST /api/login/resume` with its session token, no
//!   password): its slot may still be held (its server died before its etcd lease expired, or
//!   has not noticed the drop yet), and the route gives it to the resumed session at once,
//!   ending the old connection if it is still open. A session that ended meanwhile is
//!   followed by a password login; a route without resume (404) by a logout and a login.
//!   During reconnects, `already_logged_in`, `no_server`, unreachable routes and servers and
//!   refused connect tokens are retried; `bad_credentials` (the password changed) ends the
//!   client. The backoff restarts once a connection has stayed up for `max_backoff`.
//! - **No reconnect** after a `LOGGED_OUT`, `ADMIN` or `REPLACED` kick (the session was ended
//!   on purpose, or another connection of the same user took over: reconnecting would fight
//!   it), after [`Client::logout`], after `max_attempts`, or once every [`Client`] handle is
//!   dropped. Each of these ends [`Events`] with `State(Closed)`.
//! - **Sends while reconnecting wait** for the next connection, within the send deadline
//!   ([`SEND_TIMEOUT`], 10 s), then fail with [`ClientError::Timeout`]. A send whose caller
//!   gave up is never written later.
//! - **Sends are re-sent, not lost.** Every send carries a message id chosen by the SDK (a
//!   ULID, or [`SendOptions::message_id`]). A send written to a connection that died before
//!   its result arrived (a server crash, a dropped network) is written again on the next
//!   connection with the same id, within its deadline; the server stores a message id once,
//!   so the receiver gets it once (and de-duplicates by id anyway, see below). A group or
//!   channel message written again is answered `Delivered` with `delivered: 0` and reaches
//!   nobody a second time (the route remembers broadcast ids for a minute). Only when the
//!   client ends for good (logout, final kick, gave up reconnecting) do such sends fail with
//!   [`ClientError::ConnectionLost`]: they may or may not have been delivered.
//! - **Stored messages and acks.** Private messages and receipts are kept in the receiver's
//!   inbox until acknowledged: a message to a user who is offline is answered
//!   [`pb::SendStatus::Stored`] (a success) and arrives at their next connection, in a push
//!   marked as replayed ([`Event::Message`]'s `replayed`). The SDK acknowledges the stored
//!   messages of each push with one `Ack` frame once they are in the events channel (so
//!   taking them is the application's part); a message still in the SDK's hands when the
//!   connection or the client ends is not acked and comes again.
//! - **Channels.** [`Client::join_channel`], [`Client::leave_channel`],
//!   [`Client::my_channels`], [`Client::channels`], [`Client::channel`] and
//!   [`Client::channel_members`] call the route's HTTP API with the current session (while
//!   reconnecting they may fail with `Route` code `session_ended`, like
//!   [`Client::online_users`]); [`Client::send_channel`] sends over the connection like any
//!   other send (re-sent after a lost connection, see above). A channel message reaches the
//!   members online at that moment as [`Event::Message`] with `kind` `Channel` and `channel`
//!   set; it is not stored, so it is never replayed nor acked. Channel names are checked
//!   before any network call ([`ClientError::InvalidChannel`]).
//! - **Receipts.** [`Client::send_with`] and [`SendOptions::receipt`] ask for one: when the
//!   receiver's client acks the message, the sender gets [`Event::Receipt`] (also when it was
//!   offline at that moment: receipts are stored like messages).
//! - **De-duplication.** Each received message id is remembered (the last 4096), and a message
//!   whose id was seen is not delivered again, but still acked. Messages can come twice: the
//!   inbox is replayed at every connection until acked, and a re-sent message may have been
//!   delivered before. A new client (another process, a new [`Client::connect`]) does not
//!   remember what an earlier one received: a message it had not acked yet comes again.
//! - **Back-pressure.** Events go through a bounded channel ([`EVENT_CAPACITY`]). An
//!   application that stops reading events stops the task from reading its connection (it keeps
//!   sending heartbeats): the server's queue for this user fills up and the server eventually
//!   kicks it as a slow consumer, after which the client reconnects. Nothing buffers without
//!   limit. An application that drops [`Events`] no longer receives anything: messages are
//!   acked and dropped.

use crate::{
    pb,
    recent::{RecentIds, DEFAULT_CAPACITY},
    route::{
        channel_name_error, Added, ChannelInfo, ChannelPage, ConversationView, CreatedGroup,
        GroupChange, GroupMembersPage, GroupView, HistoryFrom, MemberPage, OnlineUser, RouteClient,
    },
    worker::{Command, LogoutSlot, Shared, Worker},
};
use std::{
    fmt,
    sync::{atomic::AtomicU64, Arc, Mutex},
    time::Duration,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// How long a send waits for its result (including waiting for a connection).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long opening a connection to a server may take (TCP or WebSocket handshake).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Capacity of the events channel.
pub const EVENT_CAPACITY: usize = 1024;
/// How long [`Client::logout`] waits for the background task to finish the logout.
const LOGOUT_TIMEOUT: Duration = Duration::from_secs(20);
/// Capacity of the queue of sends waiting for the background task.
const COMMAND_CAPACITY: usize = 256;
/// Largest page the route serves for online users.
const ONLINE_PAGE_MAX: usize = 500;
/// Jitter of reconnect delays, as a fraction of the delay (±).
const JITTER: f64 = 0.2;

mod connect;
mod error;
mod events;
mod options;

pub(crate) use connect::{open, Live};
pub use error::ClientError;
pub use events::{ClientInfo, ConnState, Event, Events, SendOutcome};
pub use options::{ClientConfig, Recipient, ReconnectPolicy, SendOptions, TlsMode};

/// Cancels the task's stop token when the last [`Client`] handle goes away, so that a client
/// the application forgot ends its connection and task instead of leaking them.
struct HandleGuard(CancellationToken);

impl Drop for HandleGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A handle to one connected user; clone it freely. Dropping the last handle closes the
/// connection (the user goes offline) and ends the background task.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
    route: RouteClient,
    commands: mpsc::Sender<Command>,
    _guard: Arc<HandleGuard>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("info", &self.info())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Creates an account; returns its user id. A taken name is
    /// `ClientError::Route` with code `name_taken`.
    pub async fn register(route_url: &str, name: &str, password: &str) -> Result<u64, ClientError> {
        Self::register_with(&ClientConfig::new(route_url, name, password)).await
    }

    /// [`Client::register`] of `config`'s name and password, trusting what it trusts
    /// (`ca_file`) for an `https://` route.
    pub async fn register_with(config: &ClientConfig) -> Result<u64, ClientError> {
        config
            .route_client()?
            .register(&config.name, &config.password)
            .await
            .map(|r| r.user_id)
            .map_err(ClientError::Route)
    }

    /// Logs in, connects to the assigned server and starts the background task. The first
    /// event is `State(Connected)`. Errors are returned, never retried: `BadCredentials`,
    /// `AlreadyLoggedIn`, `NoServer`, `Route` (unreachable route: see
    /// [`ClientError::is_transport`]), `Connect`, `LoginRefused`.
    pub async fn connect(config: ClientConfig) -> Result<(Client, Events), ClientError> {
        let route = config.route_client()?;
        let login = route
            .login(&config.name, &config.password)
            .await
            .map_err(ClientError::from_login)?;
        let live = match open(&login, config.transport, config.tls, &route).await {
            Ok(live) => live,
            Err(e) => {
                // The login took the user's slot (pending until the connect token expires):
                // give it back so that an immediate retry is not refused as a second login.
                if let Err(le) = route.logout(&login.session_token).await {
                    tracing::debug!(error = %le, "logout after a failed connect");
                }
                return Err(e);
            }
        };
        let state = ConnState::Connected {
            server_id: live.server_id.clone(),
            addr: live.addr.clone(),
        };
        let info = ClientInfo {
            user_id: login.user_id,
            name: login.name.clone(),
            route_url: route.base_url().to_string(),
            server_id: Some(live.server_id.clone()),
            server_addr: Some(live.addr.clone()),
            state: state.clone(),
        };
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            info: Mutex::new(info),
            session_token: Mutex::new(login.session_token.clone()),
            stop: stop.clone(),
            logout: Mutex::new(LogoutSlot::Open),
            next_client_id: AtomicU64::new(1),
        });
        let (events_tx, events_rx) = mpsc::channel(EVENT_CAPACITY);
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_CAPACITY);
        // The channel is new and empty: this cannot fail.
        let _ = events_tx.try_send(Event::State(state));
        let worker = Worker {
            shared: shared.clone(),
            route: route.clone(),
            config,
            events: events_tx,
            commands: commands_rx,
            recent: RecentIds::new(DEFAULT_CAPACITY),
            token: Some(login.session_token),
            attempt: 0,
            read_watches: Default::default(),
        };
        tokio::spawn(worker.run(live));
        let client = Client {
            shared,
            route,
            commands: commands_tx,
            _guard: Arc::new(HandleGuard(stop)),
        };
        Ok((client, Events { rx: events_rx }))
    }

    /// Sends a private message over the connection. `Stored` is a successful outcome (the
    /// receiver is not connected and gets it at their next connection); an unknown receiver
    /// is `Send { code: UnknownUser }`.
    pub async fn send(&self, to: Recipient, body: &str) -> Result<SendOutcome, ClientError> {
        self.send_with(to, body, SendOptions::default()).await
    }

    /// [`Client::send`] with options: ask for a receipt, choose the message id. An invalid
    /// `message_id` is `Send { code: BadRequest }`, refused before sending.
    pub async fn send_with(
        &self,
        to: Recipient,
        body: &str,
        options: SendOptions,
    ) -> Result<SendOutcome, ClientError> {
        let (to_user_id, to_user_name) = match to {
            Recipient::Id(id) => (id, String::new()),
            Recipient::Name(name) => (0, name),
        };
        let message_id = match options.message_id {
            Some(id) if !cim_proto::ids::valid_message_id(&id) => {
                return Err(ClientError::Send {
                    code: pb::ErrorCode::BadRequest,
                    message: format!(
                        "message id {id:?} is not 1-{} characters of [0-9A-Za-z_-]",
                        cim_proto::ids::MAX_MESSAGE_ID_LEN
                    ),
                });
            }
            Some(id) => id,
            None => String::new(),
        };
        self.submit(pb::Send {
            kind: pb::MessageKind::Private as i32,
            to_user_id,
            to_user_name,
            body: body.to_string(),
            receipt: options.receipt,
            message_id,
            ..Default::default()
        })
        .await
    }

    /// Sends a message to everyone online except this user; `delivered` counts the
    /// connections it reached.
    pub async fn send_group(&self, body: &str) -> Result<SendOutcome, ClientError> {
        self.submit(pb::Send {
            kind: pb::MessageKind::Group as i32,
            body: body.to_string(),
            ..Default::default()
        })
        .await
    }

    /// Sends a message to stored group `group_id` (see [`crate::RouteClient::create_group`])
    /// over the connection. Kept in the group's log once; members online get it now, the
    /// others at their next connection. Not a member: `Send { code: Forbidden }`.
    pub async fn send_group_chat(
        &self,
        group_id: u64,
        body: &str,
    ) -> Result<SendOutcome, ClientError> {
        self.submit(pb::Send {
            kind: pb::MessageKind::GroupChat as i32,
            group_id,
            body: body.to_string(),
            ..Default::default()
        })
        .await
    }

    /// Marks `conversation` read up to `seq` (a `log_seq`; marks never move back). The peer
    /// of a private conversation gets an [`crate::Event::ReadMark`], in a group the members
    /// that watch its marks ([`Client::watch_reads`]). Written over the
    /// connection, answered by nothing: the mark is in the store once the route has it
    /// (read it back with the conversation list).
    pub async fn mark_read(
        &self,
        conversation: pb::Conversation,
        seq: u64,
    ) -> Result<(), ClientError> {
        self.signal(pb::Frame::new(pb::frame::Body::ReadMark(pb::ReadMark {
            conversation: Some(conversation),
            seq,
            user_id: 0,
        })))
        .await
    }

    /// Starts (or, `watch` false, stops) getting the read marks the other members of stored
    /// group `group_id` set, as [`crate::Event::ReadMark`]s: e.g. while the group's
    /// conversation is on screen, to show who has seen what. Kept across reconnects until
    /// stopped. The server refuses a non-member (an `Error` frame: `Forbidden`) and more
    /// than 16 watched groups per connection.
    pub async fn watch_reads(&self, group_id: u64, watch: bool) -> Result<(), ClientError> {
        self.signal(pb::Frame::new(pb::frame::Body::WatchReads(
            pb::WatchReads {
                group_id,
                stop: !watch,
            },
        )))
        .await
    }

    /// Tells the peer, or the group's members online, that this user is typing (or
    /// `stopped`). Never stored; the server relays at most two a second per connection.
    pub async fn typing(
        &self,
        conversation: pb::Conversation,
        stopped: bool,
    ) -> Result<(), ClientError> {
        self.signal(pb::Frame::new(pb::frame::Body::Typing(pb::Typing {
            conversation: Some(conversation),
            stopped,
            user_id: 0,
            user_name: String::new(),
        })))
        .await
    }

    /// Writes a frame the server answers nothing to.
    async fn signal(&self, frame: pb::Frame) -> Result<(), ClientError> {
        if self.is_closed() {
            return Err(ClientError::Closed);
        }
        let (reply, result) = oneshot::channel();
        let command = Command {
            send: pb::Send::default(),
            signal: Some(frame),
            reply,
            deadline: tokio::time::Instant::now() + SEND_TIMEOUT,
        };
        self.commands
            .send(command)
            .await
            .map_err(|_| ClientError::Closed)?;
        match tokio::time::timeout(SEND_TIMEOUT, result).await {
            Ok(Ok(Ok(_))) => Ok(()),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout),
        }
    }

    /// Sends a message to the online members of channel `name`, except this user, over the
    /// connection; `delivered` counts the members it reached. The sender must be a member
    /// ([`Client::join_channel`]): otherwise `Send { code: Forbidden }`. A bad name is
    /// [`ClientError::InvalidChannel`], refused before sending. Channel messages are not
    /// stored: members offline now never get it. Like every send, one unanswered when the
    /// connection drops is written again on the next connection with the same message id
    /// (the receivers' clients drop the repeat by id).
    pub async fn send_channel(&self, name: &str, body: &str) -> Result<SendOutcome, ClientError> {
        check_channel(name)?;
        self.submit(pb::Send {
            kind: pb::MessageKind::Channel as i32,
            channel: name.to_string(),
            body: body.to_string(),
            ..Default::default()
        })
        .await
    }

    async fn submit(&self, mut send: pb::Send) -> Result<SendOutcome, ClientError> {
        if self.is_closed() {
            return Err(ClientError::Closed);
        }
        send.client_id = self
            .shared
            .next_client_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Chosen here, before anything is written: a re-send after a lost connection carries
        // the same id, and the server stores the message once.
        if send.message_id.is_empty() {
            send.message_id = cim_proto::ids::message_id();
        }
        let deadline = tokio::time::Instant::now() + SEND_TIMEOUT;
        let (reply, result) = oneshot::channel();
        let command = Command {
            signal: None,
            send,
            reply,
            deadline,
        };
        let sent = async {
            // Either failure means the task ended: the client is closed.
            self.commands
                .send(command)
                .await
                .map_err(|_| ClientError::Closed)?;
            result.await.map_err(|_| ClientError::Closed)?
        };
        tokio::time::timeout_at(deadline, sent)
            .await
            .unwrap_or(Err(ClientError::Timeout))
    }

    /// Online users (optionally whose name starts with `prefix`), at most `limit`, paging
    /// through the route API. Uses the current session: while reconnecting it may fail with
    /// `Route` code `session_ended`.
    pub async fn online_users(
        &self,
        prefix: Option<&str>,
        limit: usize,
    ) -> Result<Vec<OnlineUser>, ClientError> {
        let token = self.token()?;
        let mut users = Vec::new();
        let mut after: Option<String> = None;
        while users.len() < limit {
            let page_size = (limit - users.len()).min(ONLINE_PAGE_MAX);
            let page = self
                .route
                .online(&token, prefix, after.as_deref(), Some(page_size))
                .await
                .map_err(ClientError::Route)?;
            let got = page.users.len();
            users.extend(page.users);
            match page.next {
                // An empty page with a cursor would loop forever: stop there too.
                Some(next) if got > 0 => after = Some(next),
                _ => break,
            }
        }
        users.truncate(limit);
        Ok(users)
    }

    /// Joins channel `name` (a channel exists while it has members: the first join creates
    /// it). `Ok(false)` when this user was a member already. Errors: a bad name is
    /// [`ClientError::InvalidChannel`] (no network call); the route's `too_many_channels`
    /// (409) as `Route`. Uses the current session, like [`Client::online_users`].
    pub async fn join_channel(&self, name: &str) -> Result<bool, ClientError> {
        check_channel(name)?;
        let token = self.token()?;
        let joined = self.route.join_channel(&token, name).await;
        Ok(joined.map_err(ClientError::Route)?.joined)
    }

    /// Leaves channel `name`; `Ok(false)` when this user was not a member.
    pub async fn leave_channel(&self, name: &str) -> Result<bool, ClientError> {
        check_channel(name)?;
        let token = self.token()?;
        let left = self.route.leave_channel(&token, name).await;
        Ok(left.map_err(ClientError::Route)?.left)
    }

    /// The channels this user is a member of, with their member and online counts, in name
    /// order.
    pub async fn my_channels(&self) -> Result<Vec<ChannelInfo>, ClientError> {
        let token = self.token()?;
        self.route
            .my_channels(&token)
            .await
            .map_err(ClientError::Route)
    }

    /// One page of all channels (those with at least one member), in name order, after the
    /// channel `after` (the previous page's `next`); `limit` `None` is the route's default.
    pub async fn channels(
        &self,
        after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<ChannelPage, ClientError> {
        let token = self.token()?;
        self.route
            .channels(&token, after, limit)
            .await
            .map_err(ClientError::Route)
    }

    /// Member and online counts of channel `name`; a channel without members is `Route`
    /// code `unknown_channel` (404).
    pub async fn channel(&self, name: &str) -> Result<ChannelInfo, ClientError> {
        check_channel(name)?;
        let token = self.token()?;
        self.route
            .channel_info(&token, name)
            .await
            .map_err(ClientError::Route)
    }

    /// One page of channel `name`'s members, in user id order, with ids above `after` (the
    /// previous page's `next`); `limit` `None` is the route's default page size.
    pub async fn channel_members(
        &self,
        name: &str,
        after: Option<u64>,
        limit: Option<usize>,
    ) -> Result<MemberPage, ClientError> {
        check_channel(name)?;
        let token = self.token()?;
        self.route
            .channel_members(&token, name, after, limit)
            .await
            .map_err(ClientError::Route)
    }

    /// Creates a stored group owned by this user, with the users `members` (ids) added at once.
    pub async fn create_group(
        &self,
        name: &str,
        members: &[u64],
    ) -> Result<CreatedGroup, ClientError> {
        let token = self.token()?;
        let created = self.route.create_group(&token, name, members).await;
        created.map_err(ClientError::Route)
    }

    /// The stored groups this user is a member of.
    pub async fn groups(&self) -> Result<Vec<GroupView>, ClientError> {
        let token = self.token()?;
        self.route
            .my_groups(&token)
            .await
            .map_err(ClientError::Route)
    }

    /// Stored group `id` (not a member: `Route` code `unknown_group`, like a missing group).
    pub async fn group(&self, id: u64) -> Result<GroupView, ClientError> {
        let token = self.token()?;
        self.route
            .group(&token, id)
            .await
            .map_err(ClientError::Route)
    }

    /// One page of group `id`'s members in user id order, ids above `after`; `limit` `None`
    /// is the route's default page size.
    pub async fn group_members(
        &self,
        id: u64,
        after: Option<u64>,
        limit: Option<usize>,
    ) -> Result<GroupMembersPage, ClientError> {
        let token = self.token()?;
        let page = self.route.group_members(&token, id, after, limit).await;
        page.map_err(ClientError::Route)
    }

    /// Adds the users `users` (ids) to group `id` (its owner or an admin only).
    pub async fn add_group_members(&self, id: u64, users: &[u64]) -> Result<Added, ClientError> {
        let token = self.token()?;
        let added = self.route.add_group_members(&token, id, users).await;
        added.map_err(ClientError::Route)
    }

    /// Removes user `user` from group `id` (its owner or an admin only).
    pub async fn remove_group_member(
        &self,
        id: u64,
        user: u64,
    ) -> Result<GroupChange, ClientError> {
        let token = self.token()?;
        let removed = self.route.remove_group_member(&token, id, user).await;
        removed.map_err(ClientError::Route)
    }

    /// Leaves group `id` (its owner cannot: `Route` code `owner_stays`; disband it instead).
    pub async fn leave_group(&self, id: u64) -> Result<GroupChange, ClientError> {
        let token = self.token()?;
        let left = self.route.leave_group(&token, id).await;
        left.map_err(ClientError::Route)
    }

    /// Makes `user` an admin (`role` `admin`) or a plain member (`member`) of group `id`;
    /// the owner only.
    pub async fn set_group_role(
        &self,
        id: u64,
        user: u64,
        role: &str,
    ) -> Result<GroupChange, ClientError> {
        let token = self.token()?;
        let changed = self.route.set_group_role(&token, id, user, role).await;
        changed.map_err(ClientError::Route)
    }

    /// Renames group `id` (its owner or an admin only).
    pub async fn rename_group(&self, id: u64, name: &str) -> Result<GroupChange, ClientError> {
        let token = self.token()?;
        let renamed = self.route.rename_group(&token, id, name).await;
        renamed.map_err(ClientError::Route)
    }

    /// Disbands group `id` (the owner only): its last event, then no members.
    pub async fn disband_group(&self, id: u64) -> Result<GroupChange, ClientError> {
        let token = self.token()?;
        let disbanded = self.route.disband_group(&token, id).await;
        disbanded.map_err(ClientError::Route)
    }

    /// This user's conversations (private and group), newest activity first, with unread
    /// counts; those active before `before_ms` (the previous page's last `activity_ms`).
    pub async fn conversations(
        &self,
        before_ms: Option<i64>,
        limit: Option<usize>,
    ) -> Result<Vec<ConversationView>, ClientError> {
        let token = self.token()?;
        let list = self.route.conversations(&token, before_ms, limit).await;
        list.map_err(ClientError::Route)
    }

    /// A page of `conversation`'s stored messages, oldest first, starting at `from`.
    pub async fn history(
        &self,
        conversation: &pb::Conversation,
        from: HistoryFrom,
        limit: Option<usize>,
    ) -> Result<Vec<pb::Message>, ClientError> {
        let token = self.token()?;
        let page = self.route.history(&token, conversation, from, limit).await;
        page.map_err(ClientError::Route)
    }

    /// Marks `conversation` read up to `seq` over HTTP and returns the mark now (marks never
    /// move back); [`Client::mark_read`] does the same over the connection, unanswered.
    pub async fn mark_read_http(
        &self,
        conversation: &pb::Conversation,
        seq: u64,
    ) -> Result<u64, ClientError> {
        let token = self.token()?;
        let mark = self.route.mark_read(&token, conversation, seq).await;
        mark.map_err(ClientError::Route)
    }

    /// The bearer token of the current session, for the route's HTTP API. While
    /// reconnecting it may be one the route no longer accepts (`Route` code
    /// `session_ended`): the caller may retry once connected again.
    fn token(&self) -> Result<String, ClientError> {
        if self.is_closed() {
            return Err(ClientError::Closed);
        }
        Ok(lock(&self.shared.session_token).clone())
    }

    /// Who is logged in, where, and the connection state.
    pub fn info(&self) -> ClientInfo {
        lock(&self.shared.info).clone()
    }

    fn is_closed(&self) -> bool {
        matches!(lock(&self.shared.info).state, ConnState::Closed { .. })
    }

    /// Logs out through the route (the session ends, the slot frees at once so the user can
    /// log in again), closes the connection, never reconnects. [`Events`] ends with
    /// `State(Closed)`. Logging out a client that is already closed is `Ok`. Other clones of
    /// this handle see the client closed.
    pub async fn logout(self) -> Result<(), ClientError> {
        let (reply, done) = oneshot::channel();
        {
            let mut slot = lock(&self.shared.logout);
            match &*slot {
                // The task ended already (kicked, gave up, ...): its session is gone.
                LogoutSlot::Finished => return Ok(()),
                // Another handle's logout is under way and gets the result; this one's
                // reply sender drops below, so it returns `Ok` at once.
                LogoutSlot::Requested(_) => {}
                LogoutSlot::Open => *slot = LogoutSlot::Requested(reply),
            }
        }
        self.shared.stop.cancel();
        match tokio::time::timeout(LOGOUT_TIMEOUT, done).await {
            Ok(Ok(result)) => result,
            // Our request was not the one the task answered (a concurrent logout, or the
            // task finished on its own meanwhile): either way the session is over.
            Ok(Err(_)) => Ok(()),
            Err(_) => Err(ClientError::Timeout),
        }
    }
}

/// Locks a mutex of the shared state. A panic while holding it cannot leave the data half
/// written (every critical section is a plain assignment or clone), so poisoning is ignored.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A channel name the route would refuse, as an error before any network call.
fn check_channel(name: &str) -> Result<(), ClientError> {
    match channel_name_error(name) {
        Some(why) => Err(ClientError::InvalidChannel(why)),
        None => Ok(()),
    }
}

/// Whether a kick with this reason ends the client for good (no reconnect).
///
/// Logged out or forced offline on purpose, or another connection of ours took over: coming
/// back would undo the logout or fight the other connection. Shutdown and slow consumer ask
/// for a fresh connection; an unknown reason (a newer server) is treated like a dropped
/// connection.
pub fn kick_ends_session(reason: pb::KickReason) -> bool {
    match reason {
        pb::KickReason::LoggedOut | pb::KickReason::Admin | pb::KickReason::Replaced => true,
        pb::KickReason::ServerShutdown
        | pb::KickReason::SlowConsumer
        | pb::KickReason::Unspecified => false,
    }
}

#[cfg(test)]
mod tests;
