//! cim client SDK: what an application needs to talk to a cim cluster, and nothing of the
//! terminal client, the load generator or the cluster itself (it depends on the wire contract,
//! `cim-proto`, not on cim-common).
//!
//! # Layout
//! - [`client`]: the SDK most applications want: [`Client::connect`] logs in, stays connected
//!   (heartbeats, reconnects, re-sends, acks, de-duplication) and reports [`Event`]s;
//!   [`Client::send`], [`Client::send_with`] (receipts), [`Client::send_group`],
//!   [`Client::send_channel`], [`Client::join_channel`], [`Client::leave_channel`],
//!   [`Client::my_channels`], [`Client::online_users`], [`Client::logout`].
//! - [`route`]: the route's HTTP API (register, login, logout, online users, messages,
//!   channels).
//! - [`conn`]: one connection to a connection server over TCP (delimited protobuf) or
//!   WebSocket (binary protobuf or JSON text frames), plain or TLS: login handshake, send and
//!   receive frames.
//! - [`tls`]: [`ClientTls`], which certificates to trust, and the server name checked.
//!
//! TLS: `https://` route URLs, and TLS / `wss://` to servers per [`TlsMode`]; [`ClientTls`]
//! trusts the system's roots plus [`ClientConfig::ca_file`].
//!
//! The terminal client (`cim-client`) and the load generator (`cim-bench`) build on these
//! layers.

pub mod client;
pub mod conn;
mod recent;
pub mod route;
pub mod tls;
mod worker;

pub use cim_proto::pb;
pub use client::{
    Client, ClientConfig, ClientError, ClientInfo, ConnState, Event, Events, Recipient,
    ReconnectPolicy, SendOptions, SendOutcome, TlsMode,
};
pub use conn::{Connection, Transport};
pub use route::{
    Added, ChannelInfo, ChannelMember, ChannelPage, ConversationView, CreatedGroup, ErrorCode,
    GroupChange, GroupMemberView, GroupMembersPage, GroupView, HistoryFrom, LoginInfo, MemberPage,
    OnlineUser, RouteClient, RouteError,
};
pub use tls::ClientTls;
