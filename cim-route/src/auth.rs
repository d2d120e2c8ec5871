//! Bearer authentication of public API calls. The session token is stateless (HMAC-signed
//! claims), so it is checked against the login slot in Redis too: a token stops working the
//! moment its session ends (logout, disconnect, heartbeat timeout), not when it expires.
//!
//! Architecture invariant: the acting user always comes from here, never from a request body.

use crate::{error::AppError, state::AppState};
use axum::{
    extract::FromRequestParts,
    http::{header, request::Parts},
};
use cim_common::{time::now_ms, token::TokenError};

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthUser {
    pub user_id: u64,
    pub user_name: String,
    /// The login session the token belongs to.
    pub session: String,
}

/// The token of an `Authorization: Bearer <token>` header value (scheme case-insensitive).
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .ok_or_else(|| {
                AppError::unauthorized(
                    "unauthorized",
                    "missing `Authorization: Bearer <session_token>` header",
                )
            })?;
        let claims = state
            .signer()
            .verify_session(token, now_ms())
            .map_err(|e| match e {
                TokenError::Expired => {
                    AppError::unauthorized("token_expired", "session token expired, log in again")
                }
                TokenError::Malformed | TokenError::BadSignature => {
                    AppError::unauthorized("unauthorized", "invalid session token")
                }
            })?;
        if !state
            .store()
            .session_active(claims.user_id, &claims.session)
            .await?
        {
            return Err(AppError::unauthorized(
                "session_ended",
                "this login session has ended (logged out or disconnected), log in again",
            ));
        }
        Ok(AuthUser {
            user_id: claims.user_id,
            user_name: claims.user_name,
            session: claims.session,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_values() {
        assert_eq!(bearer_token("Bearer abc.def"), Some("abc.def"));
        assert_eq!(bearer_token("bearer  abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearer"), None);
    }
}
