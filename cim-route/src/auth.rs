//! Bearer authentication of public API calls. The session token is stateless (HMAC-signed
//! claims), so it is checked against the login slot in Redis too: a token stops working the
//! moment its session ends (logout, disconnect, heartbeat timeout), not when it expires.
//!
//! The business API (`/api/admin/*`) authenticates with an API key from the configuration
//! instead ([`ApiKey`], header `X-Api-Key`); with no key configured it refuses every call.
//! Read-only endpoints that both clients and backends use take either ([`Caller`]).
//!
//! Architecture invariant: the acting user always comes from here, never from a request body.
//! (A backend with an API key may act on behalf of a user it names: it is trusted by
//! configuration, like the system itself.)

use crate::{error::AppError, state::AppState};
use axum::{
    extract::FromRequestParts,
    http::{header, request::Parts},
};
use cim_common::{
    time::now_ms,
    token::{SessionClaims, TokenError},
};

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

/// The verified claims of the request's session token (signature and expiry; not whether
/// its session still holds the login slot).
fn session_claims(parts: &Parts, state: &AppState) -> Result<SessionClaims, AppError> {
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
    state
        .signer()
        .verify_session(token, now_ms())
        .map_err(|e| match e {
            TokenError::Expired => {
                AppError::unauthorized("token_expired", "session token expired, log in again")
            }
            TokenError::Malformed | TokenError::BadSignature => {
                AppError::unauthorized("unauthorized", "invalid session token")
            }
        })
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let claims = session_claims(parts, state)?;
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

/// A caller resuming a login session (`POST /api/login/resume`): a valid, unexpired session
/// token of the user's current login generation (no login, logout or forced offline came
/// after it). Its session need not hold the slot any more (a reloaded page's connection has
/// usually closed by then).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resumable(pub AuthUser);

impl FromRequestParts<AppState> for Resumable {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let claims = session_claims(parts, state)?;
        let current = state.store().generation(claims.user_id).await?;
        if claims.generation == 0 || claims.generation != current {
            return Err(AppError::unauthorized(
                "session_ended",
                "this login session was logged out, forced offline or replaced by a newer \
                 login: log in again",
            ));
        }
        Ok(Resumable(AuthUser {
            user_id: claims.user_id,
            user_name: claims.user_name,
            session: claims.session,
        }))
    }
}

/// Header carrying an API key.
pub const API_KEY_HEADER: &str = "x-api-key";

/// A business-API caller: the request carried one of the configured API keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiKey;

/// Whether `presented` is one of `keys`. Every key is compared, each in constant time, so the
/// time taken tells nothing about how close a guess was or which key matched.
pub fn key_matches(keys: &[String], presented: &str) -> bool {
    use subtle::ConstantTimeEq;
    let mut found = subtle::Choice::from(0);
    for key in keys {
        found |= key.as_bytes().ct_eq(presented.as_bytes());
    }
    bool::from(found)
}

impl FromRequestParts<AppState> for ApiKey {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let keys = &state.config().api_keys;
        if keys.is_empty() {
            return Err(AppError::unauthorized(
                "api_disabled",
                "the business API is disabled: no api_keys are configured on this route",
            ));
        }
        let presented = parts
            .headers
            .get(API_KEY_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .ok_or_else(|| AppError::unauthorized("unauthorized", "missing `X-Api-Key` header"))?;
        if key_matches(keys, presented) {
            Ok(ApiKey)
        } else {
            Err(AppError::unauthorized("unauthorized", "invalid API key"))
        }
    }
}

/// Who is calling an endpoint open to both clients and backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    User(AuthUser),
    Backend,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        if parts.headers.contains_key(API_KEY_HEADER) {
            ApiKey::from_request_parts(parts, state).await?;
            return Ok(Caller::Backend);
        }
        Ok(Caller::User(
            AuthUser::from_request_parts(parts, state).await?,
        ))
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

    #[test]
    fn api_keys_match_exactly() {
        let keys = vec!["k".repeat(16), "other-key-0123456789".to_string()];
        assert!(key_matches(&keys, &"k".repeat(16)));
        assert!(key_matches(&keys, "other-key-0123456789"));
        assert!(!key_matches(&keys, &"k".repeat(15)));
        assert!(!key_matches(&keys, &"k".repeat(17)));
        assert!(!key_matches(&keys, ""));
        assert!(!key_matches(&[], ""));
    }
}
