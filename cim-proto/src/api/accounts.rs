//! Accounts and login: the credentials a client sends, what registering and logging in
//! answer, and the public addresses of the connection server a login assigns.

use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Credentials {
    /// Account name: no whitespace, control characters or `;@#|`.
    #[cfg_attr(feature = "openapi", schema(example = "alice"))]
    pub name: String,
    #[cfg_attr(feature = "openapi", schema(format = Password))]
    pub password: String,
}

// Never derive Debug on Credentials: it would make logging a password one `{:?}` away.

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Registered {
    pub user_id: u64,
    pub name: String,
}

/// The public addresses of a connection server (never its internal one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ServerAddrs {
    pub id: String,
    pub tcp_addr: String,
    pub ws_addr: String,
    /// The TCP protocol over TLS, when the server has `tls_listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(nullable = false))]
    pub tls_addr: Option<String>,
    /// WebSocket over TLS (`wss://{wss_addr}/ws`), when the server has `wss_listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(nullable = false))]
    pub wss_addr: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LoggedIn {
    pub user_id: u64,
    pub name: String,
    pub server: ServerAddrs,
    /// Presented in the first frame to `server`; single-use, short-lived.
    pub connect_token: String,
    /// Bearer token of the HTTP API for this login session.
    pub session_token: String,
    /// How often the client should ping, when the route knows the server's setting. The
    /// registry does not carry it yet, so it is omitted; the server's LoginResult has it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(nullable = false))]
    pub heartbeat_hint_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OkBody {
    pub ok: bool,
}
