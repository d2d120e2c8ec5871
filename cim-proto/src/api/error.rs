//! The one error shape of the route's HTTP API, `{"error":{"code":"snake_case","message":"text"}}`,
//! and the codes it carries ([`ErrorCode`]): the route answers with them, the SDK matches on
//! them, so neither spells a code as a string literal.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Declares [`ErrorCode`] from one list: each variant with its wire string, so the two
/// directions (`as_str`, `from_code`) cannot disagree.
macro_rules! error_codes {
    ($($(#[$doc:meta])* $variant:ident = $code:literal,)*) => {
        /// A machine-readable error code of the HTTP API (`error.code`): stable, snake_case
        /// on the wire. A code this build does not know (a newer route's) is kept as
        /// [`ErrorCode::Other`], so an answer still parses.
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[$doc])* $variant,)*
            /// A code this build does not know, as it was sent.
            Other(String),
        }

        impl ErrorCode {
            /// Every code this build knows.
            pub const KNOWN: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The code as it is on the wire.
            pub fn as_str(&self) -> &str {
                match self {
                    $(ErrorCode::$variant => $code,)*
                    ErrorCode::Other(code) => code,
                }
            }

            /// The wire string of a code this build knows (`None` for [`ErrorCode::Other`]).
            pub fn known_str(&self) -> Option<&'static str> {
                match self {
                    $(ErrorCode::$variant => Some($code),)*
                    ErrorCode::Other(_) => None,
                }
            }

            /// The code for a wire string; one this build does not know is
            /// [`ErrorCode::Other`].
            pub fn from_code(code: &str) -> Self {
                match code {
                    $($code => ErrorCode::$variant,)*
                    other => ErrorCode::Other(other.to_owned()),
                }
            }
        }
    };
}

error_codes! {
    /// The name is taken by another live login (`login_conflict = "refuse"`).
    AlreadyLoggedIn = "already_logged_in",
    /// This part of the API is turned off (e.g. the business API without an API key).
    ApiDisabled = "api_disabled",
    /// Wrong name or password.
    BadCredentials = "bad_credentials",
    /// A request the route could not accept as it is.
    BadRequest = "bad_request",
    /// Too many password checks at once; retry after `Retry-After`.
    Busy = "busy",
    /// The caller may not do this (e.g. a group member who is not its owner or an admin).
    Forbidden = "forbidden",
    /// The group has as many members as allowed.
    GroupFull = "group_full",
    /// The route failed; the cause is in its log, never in the answer.
    Internal = "internal",
    /// Not a valid channel name.
    InvalidChannel = "invalid_channel",
    /// The body is not JSON.
    InvalidJson = "invalid_json",
    /// Not a valid account name.
    InvalidName = "invalid_name",
    /// The password is too short or too long.
    InvalidPassword = "invalid_password",
    /// The path exists, the method does not.
    MethodNotAllowed = "method_not_allowed",
    /// The name is registered already.
    NameTaken = "name_taken",
    /// No connection server is live to assign.
    NoServer = "no_server",
    /// The caller is not a member of the channel.
    NotAMember = "not_a_member",
    /// No such endpoint or resource.
    NotFound = "not_found",
    /// The route sheds load; retry later.
    Overloaded = "overloaded",
    /// The body is over the route's limit.
    PayloadTooLarge = "payload_too_large",
    /// Too many requests from this caller; retry after `Retry-After`.
    RateLimited = "rate_limited",
    /// The login session ended (logged out, replaced, kicked).
    SessionEnded = "session_ended",
    /// The request took too long.
    Timeout = "timeout",
    /// The token is past its expiry.
    TokenExpired = "token_expired",
    /// The user is a member of as many channels as allowed.
    TooManyChannels = "too_many_channels",
    /// The user is a member of as many groups as allowed.
    TooManyGroups = "too_many_groups",
    /// The group's owner cannot leave, be removed or change role: disband the group instead.
    OwnerStays = "owner_stays",
    /// No or an invalid credential (bearer token, API key).
    Unauthorized = "unauthorized",
    /// A backend the route needs is unreachable; retry later.
    Unavailable = "unavailable",
    /// No such channel.
    UnknownChannel = "unknown_channel",
    /// No such group, or not one of the caller's (the two are not told apart).
    UnknownGroup = "unknown_group",
    /// No such user.
    UnknownUser = "unknown_user",
    /// The body is not `application/json`.
    UnsupportedMediaType = "unsupported_media_type",
    /// Not from the route: an HTTP error whose body is not the error shape (a proxy's page).
    HttpError = "http_error",
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for ErrorCode {
    fn from(code: &str) -> Self {
        ErrorCode::from_code(code)
    }
}

impl PartialEq<str> for ErrorCode {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        Ok(ErrorCode::from_code(&code))
    }
}

/// The body of every failed request, whatever failed (handler, extractor, framework, load
/// shedding, deadline): `{"error":{"code","message"}}` (see `crate::error`). Schema only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// Stable, machine-readable, snake_case; each operation lists the codes it can answer.
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "bad_request"))]
    pub code: ErrorCode,
    /// For humans; never contains a server-side cause.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_as_their_snake_case_strings() {
        for code in ErrorCode::KNOWN {
            let json = serde_json::to_string(code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(&serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
            assert_eq!(code.known_str(), Some(code.as_str()));
        }
        let strings: std::collections::BTreeSet<&str> =
            ErrorCode::KNOWN.iter().map(ErrorCode::as_str).collect();
        assert_eq!(strings.len(), ErrorCode::KNOWN.len(), "a wire string twice");
    }

    #[test]
    fn an_unknown_code_still_parses_and_is_written_back_as_sent() {
        let body: ErrorBody =
            serde_json::from_str(r#"{"error":{"code":"from_the_future","message":"m"}}"#).unwrap();
        assert_eq!(body.error.code, ErrorCode::Other("from_the_future".into()));
        assert_eq!(body.error.code.known_str(), None);
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"error":{"code":"from_the_future","message":"m"}}"#
        );
        let known: ErrorBody =
            serde_json::from_str(r#"{"error":{"code":"rate_limited","message":"slow"}}"#).unwrap();
        assert_eq!(known.error.code, ErrorCode::RateLimited);
        assert!(known.error.code == "rate_limited");
    }
}
