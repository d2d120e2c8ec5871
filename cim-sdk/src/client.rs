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

use crate::tls::ClientTls;
use crate::{
    conn::{ConnError, ConnectOptions, Connection},
    pb,
    recent::{RecentIds, DEFAULT_CAPACITY},
    route::{
        channel_name_error, ChannelInfo, ChannelPage, LoginInfo, MemberPage, OnlineUser,
        RouteClient, RouteError,
    },
    worker::{Command, LogoutSlot, Shared, Worker},
    Transport,
};
use std::{
    fmt,
    path::PathBuf,
    pin::Pin,
    sync::{atomic::AtomicU64, Arc, Mutex},
    task::{Context, Poll},
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

/// Who a private message is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipient {
    Id(u64),
    Name(String),
}

impl From<u64> for Recipient {
    fn from(id: u64) -> Self {
        Recipient::Id(id)
    }
}

impl From<&str> for Recipient {
    fn from(name: &str) -> Self {
        Recipient::Name(name.to_string())
    }
}

impl From<String> for Recipient {
    fn from(name: String) -> Self {
        Recipient::Name(name)
    }
}

/// When and how often to reconnect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Delay before the first attempt (default 200 ms); doubles with each failed attempt.
    pub initial_backoff: Duration,
    /// Largest delay between attempts (default 10 s).
    pub max_backoff: Duration,
    /// Attempts per outage before giving up with `Closed`; `None` (default) keeps trying.
    pub max_attempts: Option<u32>,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            max_attempts: None,
        }
    }
}

impl ReconnectPolicy {
    /// The delay before reconnect attempt `attempt` (1-based): `initial_backoff · 2^(attempt−1)`
    /// capped at `max_backoff`, times a random factor in [0.8, 1.2), never above `max_backoff`.
    /// The jitter spreads the reconnects of many clients that lost the same server.
    pub fn backoff(&self, attempt: u32) -> Duration {
        self.backoff_with(attempt, rand::random::<f64>())
    }

    /// [`ReconnectPolicy::backoff`] with the random draw `unit` (in [0, 1)) given.
    pub(crate) fn backoff_with(&self, attempt: u32, unit: f64) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        let base = self
            .initial_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff);
        let factor = 1.0 + JITTER * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        // Near `Duration::MAX` the product does not fit: the cap applies then anyway.
        Duration::try_from_secs_f64(base.as_secs_f64() * factor)
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff)
    }
}

/// Whether the connection to the server uses TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// TLS when the route URL is `https://` and the assigned server offers a TLS address
    /// for the transport (`tls_addr` for TCP, `wss_addr` for WebSocket); plain otherwise.
    #[default]
    Auto,
    /// Always TLS: a server without a TLS address for the transport is a connect error.
    On,
    /// Never TLS to servers (the route URL's scheme still decides for the route).
    Off,
}

/// How to reach and log in as one user.
#[derive(Clone)]
pub struct ClientConfig {
    /// Base URL of a route (or of the load balancer in front of the routes); `https://`
    /// for a route serving HTTPS.
    pub route_url: String,
    pub name: String,
    pub password: String,
    pub transport: Transport,
    pub reconnect: ReconnectPolicy,
    /// TLS to the connection server.
    pub tls: TlsMode,
    /// A CA certificate file (PEM) trusted besides the system's roots, for the route's
    /// HTTPS and the server's TLS (clusters with certificates of their own CA).
    pub ca_file: Option<PathBuf>,
}

impl ClientConfig {
    /// TCP, default reconnect policy, TLS [`TlsMode::Auto`], the system's roots.
    pub fn new(route_url: &str, name: &str, password: &str) -> Self {
        Self {
            route_url: route_url.to_string(),
            name: name.to_string(),
            password: password.to_string(),
            transport: Transport::Tcp,
            reconnect: ReconnectPolicy::default(),
            tls: TlsMode::Auto,
            ca_file: None,
        }
    }

    /// The route client of this config: what it trusts is made once here (the system's
    /// roots plus `ca_file`) when TLS may be used at all.
    pub fn route_client(&self) -> Result<RouteClient, ClientError> {
        let needed = self.tls == TlsMode::On || crate::route::is_https(&self.route_url);
        let tls = match needed {
            true => Some(
                ClientTls::new(self.ca_file.as_deref())
                    .map_err(|e| ClientError::Tls(e.to_string()))?,
            ),
            false => None,
        };
        Ok(RouteClient::with_tls(&self.route_url, tls))
    }
}

// Written by hand so that a `{:?}` of the config never prints the password.
impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("route_url", &self.route_url)
            .field("name", &self.name)
            .field("password", &"<redacted>")
            .field("transport", &self.transport)
            .field("reconnect", &self.reconnect)
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// Connection state, as reported by [`Event::State`] and [`ClientInfo::state`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    /// A reconnect attempt is in progress (after its backoff delay).
    Connecting,
    /// Logged in on this server; `addr` is the address connected to.
    Connected { server_id: String, addr: String },
    /// The connection is gone; attempt `attempt` starts in `retry_in`.
    Reconnecting {
        attempt: u32,
        retry_in: Duration,
        reason: String,
    },
    /// Final: the client will not connect again, and no event follows this one.
    Closed { reason: String },
}

/// What the background task reports, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    State(ConnState),
    /// A received message (each id at most once, see the module doc): private, group,
    /// channel (`message.kind` `Channel`, `message.channel` names the channel) or system.
    /// Receipts are [`Event::Receipt`] instead.
    Message {
        message: pb::Message,
        /// It comes from the inbox replayed at the start of a connection: it arrived while
        /// this user was offline (or was received before and not acknowledged).
        /// `message.timestamp_ms` is when it was sent.
        replayed: bool,
    },
    /// A message this user sent with a receipt ([`SendOptions::receipt`]) was received: the
    /// receiver's client acknowledged it.
    Receipt {
        /// Id of the message sent ([`SendOutcome::message_id`]).
        message_id: String,
        /// Who received it.
        by_user_id: u64,
        by_name: String,
        /// When they acknowledged it (unix milliseconds).
        at_ms: i64,
    },
    /// The server closed the connection with this reason; a `State` event follows
    /// (`Reconnecting` or `Closed`, see the module doc for which).
    Kicked {
        reason: pb::KickReason,
        message: String,
    },
}

/// Options of [`Client::send_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendOptions {
    /// Ask for an [`Event::Receipt`] once the receiver's client acknowledged the message.
    pub receipt: bool,
    /// The message id to use (1-64 characters of `[0-9A-Za-z_-]`); `None` (default): the SDK
    /// generates a ULID. An application that keeps its own outbox across restarts sends
    /// again with the same id, and the server stores the message once.
    pub message_id: Option<String>,
}

/// The outcome of an accepted send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendOutcome {
    pub message_id: String,
    /// `Delivered` (pushed to the receiver's connection; group: to `delivered` connections)
    /// or `Stored` (private: the receiver is offline and gets it at their next connection).
    /// Both are successes; a failed send is a [`ClientError::Send`].
    pub status: pb::SendStatus,
    /// Number of connections the message was pushed to.
    pub delivered: u32,
    pub timestamp_ms: i64,
    /// A group or channel message the cluster had already delivered under this id: the
    /// SDK wrote it again after its connection died before the first result came. It was
    /// pushed to nobody this time (`delivered` is 0), which is not "nobody was online".
    pub repeat: bool,
}

/// A snapshot of the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub user_id: u64,
    pub name: String,
    pub route_url: String,
    /// The server connected to (`None` while not connected).
    pub server_id: Option<String>,
    pub server_addr: Option<String>,
    pub state: ConnState,
}

/// What went wrong. Errors of [`Client::connect`] are final: the SDK never retries a first
/// connect by itself (only an established client reconnects).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Any other route answer (e.g. `name_taken`, `session_ended`), or the route was
    /// unreachable ([`RouteError::Transport`]).
    #[error("route: {0}")]
    Route(RouteError),
    #[error("wrong name or password")]
    BadCredentials,
    /// The user is connected elsewhere; the route's explanation.
    #[error("already logged in: {0}")]
    AlreadyLoggedIn(String),
    #[error("no connection server is available, retry later")]
    NoServer,
    /// The assigned server could not be reached, or the connection failed during login
    /// (including a TLS handshake refused: unknown CA, wrong name).
    #[error("connect failed: {0}")]
    Connect(String),
    /// TLS could not be set up (unreadable or invalid CA file).
    #[error("TLS: {0}")]
    Tls(String),
    /// The server refused the connect token (expired, wrong server, session ended ...).
    #[error("login refused by the server ({code:?}): {message}")]
    LoginRefused {
        code: Option<pb::ErrorCode>,
        message: String,
    },
    /// The route refused the message (unknown user, empty body, overloaded ...), or it is
    /// too large to send (`FrameTooLarge`, checked before sending).
    #[error("send failed ({code:?}): {message}")]
    Send {
        code: pb::ErrorCode,
        message: String,
    },
    /// The channel name breaks the route's rule (see [`crate::route::channel_name_error`]):
    /// refused before any network call. [`ClientError::code`] is `invalid_channel`, what
    /// the route answers for a bad name.
    #[error("invalid channel name: {0}")]
    InvalidChannel(String),
    /// The client ended for good (logout, final kick, gave up reconnecting) after the message
    /// was written and before its result arrived: it may or may not have been delivered. (A
    /// connection lost while the client reconnects does not fail a send: it is re-sent.)
    #[error("connection lost before the send result arrived; it may or may not be delivered")]
    ConnectionLost,
    /// The client is closed (logged out, kicked for good, gave up reconnecting, dropped).
    #[error("the client is closed")]
    Closed,
    /// No result within [`SEND_TIMEOUT`] (or the logout deadline); a send may or may not have
    /// been delivered.
    #[error("timed out")]
    Timeout,
}

impl ClientError {
    /// A route's error, with the codes a login answers turned into their own variants.
    pub(crate) fn from_login(e: RouteError) -> Self {
        match e {
            RouteError::Api { code, .. } if code == "bad_credentials" => {
                ClientError::BadCredentials
            }
            RouteError::Api { code, .. } if code == "no_server" => ClientError::NoServer,
            RouteError::Api { code, message, .. } if code == "already_logged_in" => {
                ClientError::AlreadyLoggedIn(message)
            }
            e => ClientError::Route(e),
        }
    }

    /// The route's error code (`bad_credentials`, `name_taken`, `session_ended`, ...), for
    /// errors that came from the route.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Route(e) => e.code(),
            ClientError::BadCredentials => Some("bad_credentials"),
            ClientError::AlreadyLoggedIn(_) => Some("already_logged_in"),
            ClientError::NoServer => Some("no_server"),
            ClientError::InvalidChannel(_) => Some("invalid_channel"),
            _ => None,
        }
    }

    /// The route's HTTP status, for errors that came from the route.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Route(e) => e.status(),
            ClientError::BadCredentials => Some(401),
            ClientError::AlreadyLoggedIn(_) => Some(409),
            ClientError::NoServer => Some(503),
            _ => None,
        }
    }

    /// Whether the route could not be reached at all (connection refused, DNS, timeout).
    pub fn is_transport(&self) -> bool {
        matches!(self, ClientError::Route(RouteError::Transport(_)))
    }
}

/// A connection the background task can run: connected and logged in.
pub(crate) struct Live {
    pub conn: Connection,
    pub server_id: String,
    pub addr: String,
    pub heartbeat: Duration,
    /// Largest frame the server accepts (0: unknown, not checked).
    pub max_frame_len: usize,
    pub since: tokio::time::Instant,
}

/// The address to connect to for `login` and whether it is a TLS one, by `mode` (see
/// [`TlsMode`]); `https_route`: the route URL is `https://`.
pub(crate) fn server_addr(
    login: &LoginInfo,
    transport: Transport,
    mode: TlsMode,
    https_route: bool,
) -> Result<(&str, bool), ClientError> {
    let (plain, secure) = match transport {
        Transport::Tcp => (&login.server.tcp_addr, &login.server.tls_addr),
        Transport::WsBinary | Transport::WsJson => (&login.server.ws_addr, &login.server.wss_addr),
    };
    let secure = secure.as_deref().filter(|a| !a.is_empty());
    match (mode, secure) {
        (TlsMode::Off, _) | (TlsMode::Auto, None) => Ok((plain, false)),
        (TlsMode::Auto, Some(addr)) if https_route => Ok((addr, true)),
        (TlsMode::Auto, Some(_)) => Ok((plain, false)),
        (TlsMode::On, Some(addr)) => Ok((addr, true)),
        (TlsMode::On, None) => Err(ClientError::Connect(format!(
            "server {} offers no TLS address for {transport:?} (TLS is required)",
            login.server.id
        ))),
    }
}

/// Connects to the server `login` assigned (plain or TLS, see [`server_addr`]) and presents
/// its connect token. TLS trusts what `route` trusts.
pub(crate) async fn open(
    login: &LoginInfo,
    transport: Transport,
    mode: TlsMode,
    route: &RouteClient,
) -> Result<Live, ClientError> {
    let (addr, secure) = server_addr(login, transport, mode, route.is_https())?;
    let connect = async {
        match (secure, route.tls()) {
            (false, _) => Connection::connect(addr, transport).await,
            (true, Some(tls)) => {
                Connection::connect_tls(addr, transport, ConnectOptions::default(), tls).await
            }
            (true, None) => {
                let tls = ClientTls::new(None).map_err(|e| ConnError::Tls {
                    addr: addr.to_string(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                Connection::connect_tls(addr, transport, ConnectOptions::default(), &tls).await
            }
        }
    };
    let addr = &addr.to_string();
    let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| ClientError::Connect(format!("connecting to {addr} timed out")))?
        .map_err(|e| ClientError::Connect(e.to_string()))?;
    let result = conn
        .login(&login.connect_token)
        .await
        .map_err(|e| match e {
            ConnError::LoginRefused { code, message } => {
                ClientError::LoginRefused { code, message }
            }
            e => ClientError::Connect(format!("login at {addr}: {e}")),
        })?;
    // A server that states no interval still times out silent connections: ping at the
    // documented default.
    let heartbeat = match result.heartbeat_interval_ms {
        0 => Duration::from_secs(10),
        ms => Duration::from_millis(u64::from(ms)),
    };
    Ok(Live {
        conn,
        server_id: result.server_id,
        addr: addr.clone(),
        heartbeat,
        max_frame_len: usize::try_from(result.max_frame_len).unwrap_or(usize::MAX),
        since: tokio::time::Instant::now(),
    })
}

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

/// The events of one [`Client`], in order; `None` after the final `State(Closed)`.
/// Also a [`futures_util::Stream`].
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl fmt::Debug for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events")
            .field("ready", &self.rx.len())
            .finish()
    }
}

impl Events {
    /// The next event; `None` once the client is closed and every event was read.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event if one is ready now (`None` also when none is ready yet).
    pub fn try_next(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }
}

impl futures_util::Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
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
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn backoff_doubles_from_initial_up_to_max() {
        let p = ReconnectPolicy::default();
        // unit 0.5 is the middle of the jitter range: no jitter.
        let schedule: Vec<_> = (1..=9).map(|a| p.backoff_with(a, 0.5)).collect();
        assert_eq!(
            schedule,
            [
                ms(200),
                ms(400),
                ms(800),
                ms(1600),
                ms(3200),
                ms(6400),
                ms(10_000),
                ms(10_000),
                ms(10_000)
            ]
        );
    }

    #[test]
    fn jitter_is_plus_minus_twenty_percent_and_never_exceeds_max() {
        let p = ReconnectPolicy::default();
        assert_eq!(p.backoff_with(1, 0.0), ms(160));
        assert_eq!(p.backoff_with(3, 0.0), ms(640));
        assert_eq!(p.backoff_with(3, 1.0), ms(960));
        // At the cap, jitter only shortens.
        assert_eq!(p.backoff_with(20, 0.0), ms(8000));
        assert_eq!(p.backoff_with(20, 1.0), ms(10_000));
        for attempt in 1..=12 {
            let base = p.backoff_with(attempt, 0.5);
            for _ in 0..200 {
                let d = p.backoff(attempt);
                assert!(d >= base.mul_f64(0.8), "{attempt}: {d:?} < 0.8 × {base:?}");
                assert!(d <= base.mul_f64(1.2), "{attempt}: {d:?} > 1.2 × {base:?}");
                assert!(d <= p.max_backoff);
            }
        }
    }

    #[test]
    fn jitter_actually_varies() {
        let p = ReconnectPolicy::default();
        let draws: std::collections::HashSet<_> = (0..50).map(|_| p.backoff(2)).collect();
        assert!(draws.len() > 1, "{draws:?}");
    }

    #[test]
    fn backoff_does_not_overflow_and_handles_odd_policies() {
        let p = ReconnectPolicy::default();
        assert_eq!(
            p.backoff_with(0, 0.5),
            ms(200),
            "attempt 0 counts as the first"
        );
        assert_eq!(p.backoff_with(u32::MAX, 0.5), ms(10_000));
        let huge = ReconnectPolicy {
            initial_backoff: Duration::from_secs(u64::MAX / 4),
            max_backoff: Duration::MAX,
            max_attempts: None,
        };
        assert!(huge.backoff_with(40, 0.99) <= Duration::MAX);
        // A max below the initial delay wins.
        let capped = ReconnectPolicy {
            initial_backoff: ms(500),
            max_backoff: ms(100),
            max_attempts: Some(1),
        };
        assert_eq!(capped.backoff_with(1, 0.5), ms(100));
        let zero = ReconnectPolicy {
            initial_backoff: Duration::ZERO,
            ..ReconnectPolicy::default()
        };
        assert_eq!(zero.backoff_with(5, 0.9), Duration::ZERO);
    }

    #[test]
    fn config_debug_hides_the_password() {
        let c = ClientConfig::new("http://r", "alice", "hunter22");
        let s = format!("{c:?}");
        assert!(!s.contains("hunter22"), "{s}");
        assert!(s.contains("alice"));
        assert_eq!(c.transport, Transport::Tcp);
        assert_eq!(c.reconnect, ReconnectPolicy::default());
    }

    #[test]
    fn login_errors_map_to_their_variants() {
        let api = |status, code: &str| RouteError::Api {
            status,
            code: code.into(),
            message: format!("{code} message"),
        };
        assert!(matches!(
            ClientError::from_login(api(401, "bad_credentials")),
            ClientError::BadCredentials
        ));
        assert!(matches!(
            ClientError::from_login(api(503, "no_server")),
            ClientError::NoServer
        ));
        let e = ClientError::from_login(api(409, "already_logged_in"));
        assert!(
            matches!(&e, ClientError::AlreadyLoggedIn(m) if m == "already_logged_in message"),
            "{e:?}"
        );
        assert_eq!(
            (e.code(), e.status()),
            (Some("already_logged_in"), Some(409))
        );
        let e = ClientError::from_login(api(400, "invalid_name"));
        assert_eq!((e.code(), e.status()), (Some("invalid_name"), Some(400)));
        assert!(!e.is_transport());
        assert_eq!(ClientError::Closed.code(), None);
    }

    #[test]
    fn handles_can_move_between_tasks() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<Client>();
        send_sync::<ClientError>();
        send::<Events>();
    }

    #[tokio::test]
    async fn an_invalid_message_id_is_refused_before_sending() {
        let (commands, mut queued) = mpsc::channel(1);
        let shared = Arc::new(Shared {
            info: Mutex::new(ClientInfo {
                user_id: 1,
                name: "alice".into(),
                route_url: "http://r".into(),
                server_id: None,
                server_addr: None,
                state: ConnState::Connecting,
            }),
            session_token: Mutex::new(String::new()),
            stop: CancellationToken::new(),
            logout: Mutex::new(LogoutSlot::Open),
            next_client_id: AtomicU64::new(1),
        });
        let client = Client {
            shared: shared.clone(),
            route: RouteClient::new("http://r"),
            commands,
            _guard: Arc::new(HandleGuard(shared.stop.clone())),
        };
        for bad in ["", "has space", &"x".repeat(65)] {
            let options = SendOptions {
                message_id: Some(bad.to_string()),
                ..SendOptions::default()
            };
            let err = client.send_with("bob".into(), "hi", options).await;
            assert!(
                matches!(
                    err,
                    Err(ClientError::Send {
                        code: pb::ErrorCode::BadRequest,
                        ..
                    })
                ),
                "{bad:?}: {err:?}"
            );
        }
        assert!(queued.try_recv().is_err(), "nothing was queued");
        // A valid id and the receipt flag go out as given; without an id the SDK picks one.
        let sending = {
            let client = client.clone();
            tokio::spawn(async move {
                let options = SendOptions {
                    receipt: true,
                    message_id: Some("my-id_1".into()),
                };
                let _ = client.send_with(Recipient::Id(2), "hi", options).await;
            })
        };
        let command = queued.recv().await.expect("queued");
        assert_eq!(command.send.message_id, "my-id_1");
        assert!(command.send.receipt);
        drop(command);
        sending.await.unwrap();
        let sending = {
            let client = client.clone();
            tokio::spawn(async move {
                let _ = client.send_group("all").await;
            })
        };
        let command = queued.recv().await.expect("queued");
        assert!(cim_proto::ids::valid_message_id(&command.send.message_id));
        assert!(!command.send.receipt);
        drop(command);
        sending.await.unwrap();
    }

    #[tokio::test]
    async fn channel_sends_carry_the_channel_and_bad_names_are_refused_before_anything() {
        let (commands, mut queued) = mpsc::channel(1);
        let shared = Arc::new(Shared {
            info: Mutex::new(ClientInfo {
                user_id: 1,
                name: "alice".into(),
                route_url: "http://127.0.0.1:1".into(),
                server_id: None,
                server_addr: None,
                state: ConnState::Connecting,
            }),
            session_token: Mutex::new(String::new()),
            stop: CancellationToken::new(),
            logout: Mutex::new(LogoutSlot::Open),
            next_client_id: AtomicU64::new(1),
        });
        // Port 1: any HTTP call would fail as unreachable, not as an invalid name.
        let client = Client {
            shared: shared.clone(),
            route: RouteClient::new("http://127.0.0.1:1"),
            commands,
            _guard: Arc::new(HandleGuard(shared.stop.clone())),
        };
        for bad in ["", "a b", "#room", "a/b", ".", "..", &"x".repeat(65)] {
            let invalid = |r: Result<(), ClientError>| match r {
                Err(e @ ClientError::InvalidChannel(_)) => {
                    assert_eq!(e.code(), Some("invalid_channel"));
                }
                other => panic!("{bad:?}: {other:?}"),
            };
            invalid(client.send_channel(bad, "hi").await.map(drop));
            invalid(client.join_channel(bad).await.map(drop));
            invalid(client.leave_channel(bad).await.map(drop));
            invalid(client.channel(bad).await.map(drop));
            invalid(client.channel_members(bad, None, None).await.map(drop));
        }
        assert!(queued.try_recv().is_err(), "nothing was queued");
        // A valid name reaches the network (here: an unreachable route).
        let e = client.join_channel("频道-1").await.unwrap_err();
        assert!(e.is_transport(), "{e:?}");
        let sending = {
            let client = client.clone();
            tokio::spawn(async move {
                let _ = client.send_channel("频道-1", "hello").await;
            })
        };
        let command = queued.recv().await.expect("queued");
        assert_eq!(command.send.kind, pb::MessageKind::Channel as i32);
        assert_eq!(
            (command.send.channel.as_str(), command.send.body.as_str()),
            ("频道-1", "hello")
        );
        assert!(cim_proto::ids::valid_message_id(&command.send.message_id));
        assert_eq!(
            (command.send.to_user_id, command.send.to_user_name.as_str()),
            (0, "")
        );
        drop(command);
        sending.await.unwrap();
        // A closed client says so before looking at anything else.
        *lock(&shared.info) = ClientInfo {
            state: ConnState::Closed { reason: "x".into() },
            ..client.info()
        };
        assert!(matches!(
            client.my_channels().await,
            Err(ClientError::Closed)
        ));
        assert!(matches!(
            client.send_channel("room", "x").await,
            Err(ClientError::Closed)
        ));
    }

    #[test]
    fn recipients_convert() {
        assert_eq!(Recipient::from(7), Recipient::Id(7));
        assert_eq!(Recipient::from("bob"), Recipient::Name("bob".into()));
        assert_eq!(
            Recipient::from(String::from("bob")),
            Recipient::Name("bob".into())
        );
    }
}
