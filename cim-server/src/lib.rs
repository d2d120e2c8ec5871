//! cim connection server: holds long-lived client connections over TCP (varint32-delimited
//! protobuf frames) and WebSocket (`/ws`, protobuf binary or proto3 JSON text), checks connect
//! tokens, keeps heartbeats, and delivers what routes push. It holds no business logic:
//! whatever a client sends is forwarded to a route (`cim-route`), which decides.
//!
//! # Layout
//! - `config`: [`ServerConfig`], every listener, limit and timeout, with validation.
//! - `server`: [`start`], [`Listeners`], [`ServerHandle`]: assembling, registering in the
//!   registry, accept loops, graceful shutdown.
//! - `admission`: the connection caps, a ticket taken at accept, and what a refused
//!   connection is told.
//! - `session`: the life of one connection (login, inbox replay, heartbeats, frames both
//!   ways, cleanup), written once over the `Transport` trait.
//! - `tcp`: the TCP transport (delimited protobuf, small buffers, batched writes), over a
//!   plain or a TLS stream (`tls_listen`).
//! - `ws`: the WebSocket transport (tokio-tungstenite, binary or JSON, small buffers), over a
//!   plain or a TLS stream (`wss_listen`).
//! - `conn`: the shared handle of a logged-in connection with its bounded outbound queue,
//!   shared pre-encoded outbound frames, and the table of connections by user.
//! - `forward`: batching client sends to live routes (`POST /internal/forward`), calls that
//!   grow with load before they multiply, a sender's sends never in two calls at once, and
//!   handing the results back to the connections.
//! - `push`: what a route's push becomes: Push frames in the connections' queues, a
//!   recipient's messages merged into as few frames as the size bound allows.
//! - `ack`: batching clients' acks into inbox removals, and forwarding the receipts they
//!   produce to a route.
//! - `chunks`: cutting ordered batches into runs bounded by encoded size (replay frames,
//!   merged pushes, forward calls).
//! - `internal`: the internal API for routes (`/internal/push` into `push`, `/internal/kick`,
//!   `/internal/presence`: which of some users this server holds), `/healthz` and
//!   `/metrics`.
//! - `metrics`: the server's Prometheus metrics (`cim_server_*`), one registry per instance.
//!
//! TLS (`cim_common::tls::ServerTls`): the handshake runs under the login deadline, then the
//! connection takes the same path as a plain one; the certificate is reloaded on SIGHUP and
//! when its files change.

mod ack;
mod admission;
mod chunks;
mod config;
mod conn;
mod forward;
mod groups;
mod internal;
mod metrics;
mod push;
mod server;
mod session;
mod tcp;
mod ws;

#[cfg(test)]
mod server_tests;
#[cfg(test)]
mod testing;

pub use config::ServerConfig;
pub use server::{start, Listeners, ServerHandle};

pub(crate) use cim_common::pb;
