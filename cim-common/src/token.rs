//! Stateless tokens signed with HMAC-SHA256 over the cluster secret.
//!
//! Two kinds, told apart by a type tag inside the signed bytes so one can never pass as the
//! other:
//! - a **connect token** (short-lived, default 30 s): issued by a route at login, bound to one
//!   user, one server and one login session. The server checks the signature, the expiry and
//!   its own id; the session makes it single-use (see `StateStore::attach`).
//! - a **session token** (bearer for HTTP calls): bound to the user and the login session; it
//!   stops working when the session ends (logout or disconnect), checked against the login slot.
//!   Until it expires, the token of the user's latest login can *resume* (`POST
//!   /api/login/resume`): start a new session without the password, unless a logout, a
//!   forced offline or another login came after it.
//!
//! Format: `base64url(json claims) "." base64url(hmac(tag ‖ json))`.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use hmac::{Hmac, Mac};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Claims of a connect token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectClaims {
    pub user_id: u64,
    pub user_name: String,
    pub server_id: String,
    pub session: String,
    /// Expiry, unix milliseconds.
    pub exp_ms: i64,
}

/// Claims of a session (bearer) token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionClaims {
    pub user_id: u64,
    pub user_name: String,
    pub session: String,
    pub exp_ms: i64,
    /// The user's login generation when this session began (`StateStore::next_generation`):
    /// only a token of the current generation can resume; every later login, logout or
    /// forced offline starts a new one. 0 in tokens of versions before it existed (they
    /// cannot resume).
    #[serde(default)]
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("invalid token signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
}

/// Signs and verifies tokens with one secret.
#[derive(Clone)]
pub struct TokenSigner {
    key: Vec<u8>,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner(..)")
    }
}

const CONNECT_TAG: &[u8] = b"cim-connect-v1\0";
const SESSION_TAG: &[u8] = b"cim-session-v1\0";

impl TokenSigner {
    pub fn new(secret: &str) -> Self {
        Self {
            key: secret.as_bytes().to_vec(),
        }
    }

    fn mac(&self, tag: &[u8], payload: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC accepts any key length");
        mac.update(tag);
        mac.update(payload);
        mac
    }

    fn sign<T: Serialize>(&self, tag: &[u8], claims: &T) -> String {
        let json = serde_json::to_vec(claims).expect("claims serialize");
        let sig = self.mac(tag, &json).finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&json),
            URL_SAFE_NO_PAD.encode(sig)
        )
    }

    fn verify<T: DeserializeOwned>(&self, tag: &[u8], token: &str) -> Result<T, TokenError> {
        // Tokens are small; refuse anything absurd before decoding.
        if token.len() > 4096 {
            return Err(TokenError::Malformed);
        }
        let (payload, sig) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Malformed)?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| TokenError::Malformed)?;
        self.mac(tag, &json)
            .verify_slice(&sig)
            .map_err(|_| TokenError::BadSignature)?;
        serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)
    }

    pub fn sign_connect(&self, claims: &ConnectClaims) -> String {
        self.sign(CONNECT_TAG, claims)
    }

    /// Verifies signature and expiry (the caller checks the server id and the session).
    pub fn verify_connect(&self, token: &str, now_ms: i64) -> Result<ConnectClaims, TokenError> {
        let claims: ConnectClaims = self.verify(CONNECT_TAG, token)?;
        if claims.exp_ms <= now_ms {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    pub fn sign_session(&self, claims: &SessionClaims) -> String {
        self.sign(SESSION_TAG, claims)
    }

    pub fn verify_session(&self, token: &str, now_ms: i64) -> Result<SessionClaims, TokenError> {
        let claims: SessionClaims = self.verify(SESSION_TAG, token)?;
        if claims.exp_ms <= now_ms {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> ConnectClaims {
        ConnectClaims {
            user_id: 7,
            user_name: "alice".into(),
            server_id: "server-abc".into(),
            session: "s1".into(),
            exp_ms: 10_000,
        }
    }

    #[test]
    fn a_session_token_without_a_generation_still_verifies() {
        // Signed by a version before `iat_ms`: the claims JSON lacks it.
        let s = TokenSigner::new("k-0123456789abcdef");
        let json = br#"{"user_id":7,"user_name":"alice","session":"s1","exp_ms":10000}"#;
        let sig = s.mac(SESSION_TAG, json).finalize().into_bytes();
        let token = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(json),
            URL_SAFE_NO_PAD.encode(sig)
        );
        let claims = s.verify_session(&token, 0).unwrap();
        assert_eq!((claims.user_id, claims.generation), (7, 0));
    }

    #[test]
    fn round_trip_and_expiry() {
        let s = TokenSigner::new("secret-secret-secret");
        let t = s.sign_connect(&claims());
        assert_eq!(s.verify_connect(&t, 9_999).unwrap(), claims());
        assert_eq!(s.verify_connect(&t, 10_000), Err(TokenError::Expired));
    }

    #[test]
    fn forged_or_foreign_tokens_fail() {
        let s = TokenSigner::new("secret-secret-secret");
        let other = TokenSigner::new("another-secret-value");
        let t = other.sign_connect(&claims());
        assert_eq!(s.verify_connect(&t, 0), Err(TokenError::BadSignature));
        // Tampered claims: swap the user id, keep the signature.
        let t = s.sign_connect(&claims());
        let (_, sig) = t.split_once('.').unwrap();
        let mut forged = claims();
        forged.user_id = 8;
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        assert_eq!(
            s.verify_connect(&format!("{payload}.{sig}"), 0),
            Err(TokenError::BadSignature)
        );
        // A session token is not a connect token.
        let st = s.sign_session(&SessionClaims {
            user_id: 7,
            user_name: "alice".into(),
            session: "s1".into(),
            exp_ms: 10_000,
            generation: 0,
        });
        assert_eq!(s.verify_connect(&st, 0), Err(TokenError::BadSignature));
        assert_eq!(s.verify_connect("garbage", 0), Err(TokenError::Malformed));
        assert_eq!(s.verify_connect("a.b.c", 0), Err(TokenError::Malformed));
    }
}
