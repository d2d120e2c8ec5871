//! What a client reports: [`Event`]s in order through [`Events`], the connection state
//! ([`ConnState`]), a snapshot ([`ClientInfo`]) and the outcome of a send ([`SendOutcome`]).

use crate::pb;
use std::{
    fmt,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};
use tokio::sync::mpsc;

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
    /// Someone read a conversation of this user's up to `seq` (a `log_seq`): in a private
    /// conversation the peer ("seen"), in a group a member (only while this client watches
    /// the group's marks: [`crate::Client::watch_reads`]); `conversation` names it as this
    /// user sees it.
    ReadMark {
        conversation: pb::Conversation,
        by_user_id: u64,
        seq: u64,
    },
    /// Someone is typing (or `stopped`) in a conversation of this user's. Ephemeral: repeat
    /// while typing, and treat an indicator as over a few seconds after the last one.
    Typing {
        conversation: pb::Conversation,
        by_user_id: u64,
        by_name: String,
        stopped: bool,
    },
    /// The server closed the connection with this reason; a `State` event follows
    /// (`Reconnecting` or `Closed`, see the module doc for which).
    Kicked {
        reason: pb::KickReason,
        message: String,
    },
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
    /// The message's place in its conversation's log (private and stored-group messages; 0
    /// for the kinds that are not kept): what read marks and history pages count in.
    pub log_seq: u64,
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

/// The events of one [`Client`], in order; `None` after the final `State(Closed)`.
/// Also a [`futures_util::Stream`].
pub struct Events {
    pub(super) rx: mpsc::Receiver<Event>,
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
