//! Internal calls between cim processes: protobuf bodies, authenticated by proofs made with
//! the internal key derived from the cluster secret ([`crate::secret`]): every request (each
//! HTTP POST, each cim-rpc upgrade) carries `x-cim-cluster-auth`, one time-stamped HMAC proof
//! per secret of the caller's keyring, never the secret or a key. With `legacy_secret` on,
//! the raw secret also goes in `x-cim-cluster-secret`, for peers of earlier versions.
//! The caller's side is [`ClusterClient`]: it keeps one [`rpc`] connection per peer (an
//! upgrade of the peer's internal HTTP listener) and calls over HTTP/1.1 POSTs a peer that
//! does not speak it. The serving side (axum) is [`Protobuf`] plus [`authorized`], and
//! [`rpc::endpoint`] for the upgrade.
//!
//! [`ClusterClient`] is in `client.rs`, the serving side (authentication, the protobuf
//! extractor, listener options) in `serve.rs`; both share the headers, body type and limits
//! defined here. Their tests call one through the other, so they are together in `tests.rs`.

mod client;
pub mod rpc;
mod serve;
#[cfg(test)]
mod tests;

pub(crate) use client::with_auth;
pub use client::ClusterClient;
pub use serve::{authorize, authorized, unauthorized, without_nagle, Protobuf};

use axum::http::StatusCode;

pub use crate::secret::AUTH_HEADER;

/// Header of the raw cluster secret (versions before derived keys; sent and accepted only
/// with `legacy_secret` on).
pub const SECRET_HEADER: &str = crate::secret::LEGACY_HEADER;
pub const CONTENT_TYPE: &str = "application/x-protobuf";

/// Largest internal request or response body: one client frame of the largest size a server
/// accepts (16 MiB) plus its envelope (sender, ids) must fit in a forward call, or a send near
/// that size would fail on every route as UNAVAILABLE instead of being answered by the route
/// (TOO_LONG past `max_message_len`).
pub const MAX_BODY: usize = 17 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("call to {url} failed: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("call to {url} answered {status}: {body}")]
    Status {
        url: String,
        status: StatusCode,
        body: String,
    },
    #[error("call to {url} failed: {reason}")]
    Rpc { url: String, reason: String },
    #[error("call to {url} answered an undecodable body: {source}")]
    Decode {
        url: String,
        #[source]
        source: prost::DecodeError,
    },
}

impl ClusterError {
    /// Whether the peer is known to be gone: its address refused the connection (no process
    /// listens there). A timeout is not: the peer may be alive behind a slow network, and
    /// whatever it holds may still be live.
    pub fn is_refused(&self) -> bool {
        match self {
            Self::Transport { source, .. } => source.is_connect() && !source.is_timeout(),
            _ => false,
        }
    }
}
