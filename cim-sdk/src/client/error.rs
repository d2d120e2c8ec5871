//! [`ClientError`]: what went wrong, with the route's [`ErrorCode`]s of a login turned into
//! variants of their own.

use crate::{pb, route::RouteError};

use crate::route::ErrorCode;

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
            RouteError::Api {
                code: ErrorCode::BadCredentials,
                ..
            } => ClientError::BadCredentials,
            RouteError::Api {
                code: ErrorCode::NoServer,
                ..
            } => ClientError::NoServer,
            RouteError::Api {
                code: ErrorCode::AlreadyLoggedIn,
                message,
                ..
            } => ClientError::AlreadyLoggedIn(message),
            e => ClientError::Route(e),
        }
    }

    /// The route's error code, for errors that came from the route (the variants a login
    /// answer became, too).
    pub fn error_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Route(e) => e.error_code().cloned(),
            ClientError::BadCredentials => Some(ErrorCode::BadCredentials),
            ClientError::AlreadyLoggedIn(_) => Some(ErrorCode::AlreadyLoggedIn),
            ClientError::NoServer => Some(ErrorCode::NoServer),
            ClientError::InvalidChannel(_) => Some(ErrorCode::InvalidChannel),
            _ => None,
        }
    }

    /// The route's error code as on the wire (`bad_credentials`, `name_taken`,
    /// `session_ended`, ...), for errors that came from the route.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Route(e) => e.code(),
            other => other.error_code().and_then(|code| code.known_str()),
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
