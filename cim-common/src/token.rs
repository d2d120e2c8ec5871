//! Stateless tokens signed with HMAC-SHA256 under the token key derived from the cluster
//! secret ([`crate::secret`]).
//!
//! Two kinds, told apart by a type tag inside the signed bytes so one can never pass as the
//! other:
//! - a **connect token** (short-lived, default 30 s): issued by a route at login, bound to one
//!   user, one server and one login session. The server checks the signature, the expiry and
//!   its own id; the session makes it single-use (see `Sessions::attach`).
//! - a **session token** (bearer for HTTP calls): bound to the user and the login session; it
//!   stops working when the session ends (logout or disconnect), checked against the login slot.
//!   Until it expires, the token of the user's latest login can *resume* (`POST
//!   /api/login/resume`): start a new session without the password, unless a logout, a
//!   forced offline or another login came after it.
//!
//! Format: `key_id "." base64url(json claims) "." base64url(hmac(tag ‖ json))`. The key id
//! names the secret whose token key signed it (the current one, or one of the previous
//! secrets during a rotation), so verifying costs one HMAC whatever the number of secrets.
//! Versions before derived keys wrote `base64url(json) "." base64url(hmac)` with the raw
//! secret as the key; those **legacy tokens** verify only while the keyring's `legacy`
//! setting is on (trying each raw secret: at most 1 + `MAX_PREVIOUS` HMACs).

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use hmac::{Hmac, KeyInit, Mac};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::Sha256;

use crate::secret::Keyring;

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
    /// The user's login generation when this session began (`LoginSlots::next_generation`):
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

/// Signs tokens with the current secret's token key; verifies tokens of every secret of its
/// [`Keyring`].
#[derive(Clone)]
pub struct TokenSigner {
    keys: Keyring,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner(..)")
    }
}

const CONNECT_TAG: &[u8] = b"cim-connect-v1\0";
const SESSION_TAG: &[u8] = b"cim-session-v1\0";

fn mac(key: &[u8], tag: &[u8], payload: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(tag);
    mac.update(payload);
    mac
}

impl TokenSigner {
    /// One secret: no previous ones, no legacy tokens.
    pub fn new(secret: &str) -> Self {
        Self::with_keys(Keyring::single(secret))
    }

    pub fn with_keys(keys: Keyring) -> Self {
        Self { keys }
    }

    /// The keyring (the internal listeners check calls against the same one).
    pub fn keys(&self) -> &Keyring {
        &self.keys
    }

    fn sign<T: Serialize>(&self, tag: &[u8], claims: &T) -> String {
        let json = serde_json::to_vec(claims).expect("claims serialize");
        let (id, key) = self.keys.signing_key();
        let sig = mac(key, tag, &json).finalize().into_bytes();
        format!(
            "{id}.{}.{}",
            URL_SAFE_NO_PAD.encode(&json),
            URL_SAFE_NO_PAD.encode(sig)
        )
    }

    fn verify<T: DeserializeOwned>(&self, tag: &[u8], token: &str) -> Result<T, TokenError> {
        // Tokens are small; refuse anything absurd before decoding.
        if token.len() > 4096 {
            return Err(TokenError::Malformed);
        }
        let mut parts = token.split('.');
        let (id, payload, sig) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(id), Some(payload), Some(sig), None) => (Some(id), payload, sig),
            (Some(payload), Some(sig), None, None) => (None, payload, sig),
            _ => return Err(TokenError::Malformed),
        };
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Malformed)?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| TokenError::Malformed)?;
        let verified = match id {
            Some(id) => self
                .keys
                .token_keys(id)
                .any(|key| mac(key, tag, &json).verify_slice(&sig).is_ok()),
            None => self
                .keys
                .legacy_token_keys()
                .any(|key| mac(key, tag, &json).verify_slice(&sig).is_ok()),
        };
        if !verified {
            return Err(TokenError::BadSignature);
        }
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

/// Tokens in the form of versions before derived keys (signed with the raw current secret),
/// for tests of the rolling-upgrade window.
#[cfg(any(test, feature = "test-support"))]
impl TokenSigner {
    fn sign_legacy<T: Serialize>(secret: &str, tag: &[u8], claims: &T) -> String {
        let json = serde_json::to_vec(claims).expect("claims serialize");
        let sig = mac(secret.as_bytes(), tag, &json).finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&json),
            URL_SAFE_NO_PAD.encode(sig)
        )
    }

    /// A connect token as a version before derived keys signed it with `secret`.
    pub fn legacy_connect(secret: &str, claims: &ConnectClaims) -> String {
        Self::sign_legacy(secret, CONNECT_TAG, claims)
    }

    /// A session token as a version before derived keys signed it with `secret`.
    pub fn legacy_session(secret: &str, claims: &SessionClaims) -> String {
        Self::sign_legacy(secret, SESSION_TAG, claims)
    }
}

/// A connect token signed with any `key`, in the current form (with key id `id`) or, without
/// one, the legacy form: what an attacker holding `key` could make.
#[cfg(test)]
pub(crate) fn forge_connect(key: &[u8], id: Option<&str>, claims: &ConnectClaims) -> String {
    let json = serde_json::to_vec(claims).expect("claims serialize");
    let sig = URL_SAFE_NO_PAD.encode(mac(key, CONNECT_TAG, &json).finalize().into_bytes());
    let json = URL_SAFE_NO_PAD.encode(&json);
    match id {
        Some(id) => format!("{id}.{json}.{sig}"),
        None => format!("{json}.{sig}"),
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
        let (id, key) = s.keys.signing_key();
        let sig = mac(key, SESSION_TAG, json).finalize().into_bytes();
        let token = format!(
            "{id}.{}.{}",
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
        let (id, rest) = t.split_once('.').unwrap();
        let (_, sig) = rest.split_once('.').unwrap();
        let mut forged = claims();
        forged.user_id = 8;
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        assert_eq!(
            s.verify_connect(&format!("{id}.{payload}.{sig}"), 0),
            Err(TokenError::BadSignature)
        );
        // The same signature under the id of another secret.
        let (other_id, _) = other.keys.signing_key();
        let moved = format!("{other_id}.{rest}");
        assert_eq!(s.verify_connect(&moved, 0), Err(TokenError::BadSignature));
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
        assert_eq!(s.verify_connect("a.b.c.d", 0), Err(TokenError::Malformed));
    }

    const OLD: &str = "old-secret-0123456789";
    const NEW: &str = "new-secret-0123456789";

    fn session() -> SessionClaims {
        SessionClaims {
            user_id: 7,
            user_name: "alice".into(),
            session: "s1".into(),
            exp_ms: 10_000,
            generation: 3,
        }
    }

    #[test]
    fn tokens_of_a_previous_secret_verify_while_it_is_listed() {
        let old = TokenSigner::new(OLD);
        let (connect, session_token) = (old.sign_connect(&claims()), old.sign_session(&session()));
        let rotating = TokenSigner::with_keys(Keyring::new(NEW, &[OLD.into()], false));
        assert_eq!(rotating.verify_connect(&connect, 0), Ok(claims()));
        assert_eq!(rotating.verify_session(&session_token, 0), Ok(session()));
        // New tokens use the current secret: a node that only has it verifies them...
        let fresh = rotating.sign_connect(&claims());
        assert_eq!(
            TokenSigner::new(NEW).verify_connect(&fresh, 0),
            Ok(claims())
        );
        // ...and one that only has the old one does not.
        assert_eq!(old.verify_connect(&fresh, 0), Err(TokenError::BadSignature));
        // The old secret dropped: its tokens are refused.
        let rotated = TokenSigner::new(NEW);
        assert_eq!(
            rotated.verify_connect(&connect, 0),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            rotated.verify_session(&session_token, 0),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn legacy_tokens_verify_only_in_legacy_mode() {
        // Signed as versions before derived keys did: HMAC under the raw secret.
        let connect = TokenSigner::legacy_connect(OLD, &claims());
        let session_token = TokenSigner::legacy_session(OLD, &session());
        for current in [OLD, NEW] {
            let legacy = TokenSigner::with_keys(Keyring::new(current, &[OLD.into()], true));
            assert_eq!(
                legacy.verify_connect(&connect, 0),
                Ok(claims()),
                "{current}"
            );
            assert_eq!(legacy.verify_session(&session_token, 0), Ok(session()));
            // Still typed: a legacy session token is no connect token.
            assert_eq!(
                legacy.verify_connect(&session_token, 0),
                Err(TokenError::BadSignature)
            );
            let strict = TokenSigner::with_keys(Keyring::new(current, &[OLD.into()], false));
            assert_eq!(
                strict.verify_connect(&connect, 0),
                Err(TokenError::BadSignature)
            );
            assert_eq!(
                strict.verify_session(&session_token, 0),
                Err(TokenError::BadSignature)
            );
        }
        // Legacy mode accepts the raw form of listed secrets only.
        let unrelated = TokenSigner::with_keys(Keyring::new(NEW, &[], true));
        assert_eq!(
            unrelated.verify_connect(&connect, 0),
            Err(TokenError::BadSignature)
        );
        // And new tokens are signed with the derived key even in legacy mode.
        let signed = unrelated.sign_connect(&claims());
        assert_eq!(signed.split('.').count(), 3);
        assert_eq!(
            TokenSigner::new(NEW).verify_connect(&signed, 0),
            Ok(claims())
        );
    }

    #[test]
    fn the_token_key_is_not_the_secret() {
        // A token signed with the raw secret in the new format does not verify: the
        // derived key signs, not the secret.
        let s = TokenSigner::new(OLD);
        let (id, _) = s.keys.signing_key();
        let json = serde_json::to_vec(&claims()).unwrap();
        let sig = mac(OLD.as_bytes(), CONNECT_TAG, &json)
            .finalize()
            .into_bytes();
        let token = format!(
            "{id}.{}.{}",
            URL_SAFE_NO_PAD.encode(&json),
            URL_SAFE_NO_PAD.encode(sig)
        );
        assert_eq!(s.verify_connect(&token, 0), Err(TokenError::BadSignature));
    }
}
