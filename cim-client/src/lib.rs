//! cim client SDK.
//!
//! # Layout
//! - [`route`]: the route's HTTP API (register, login, logout, online users, messages).
//! - [`conn`]: one connection to a connection server over TCP (delimited protobuf) or
//!   WebSocket (binary protobuf or JSON text frames): login handshake, send and receive frames.
//!
//! The terminal client, reconnect logic and the load generator build on these two layers.

pub mod conn;
pub mod route;

pub use cim_common::pb;
pub use conn::{Connection, Transport};
pub use route::{LoginInfo, RouteClient, RouteError};
