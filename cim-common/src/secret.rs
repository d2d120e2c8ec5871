//! Keys derived from the cluster secret, and the proofs internal calls carry.
//!
//! The cluster secret is never used as a key itself. HKDF-SHA256 (RFC 5869) turns it into
//! independent keys, one per purpose:
//! - the **token key** (info `"cim token signing v1"`) signs connect and session tokens
//!   ([`crate::token`]);
//! - the **internal key** (info `"cim internal auth v1"`) authenticates internal calls: the
//!   caller sends a time-stamped HMAC proof made with it ([`AUTH_HEADER`]), never the key or
//!   the secret;
//! - the **key id** (info `"cim key id v1"`, 6 bytes, base64url) names the secret in tokens
//!   and proofs, so a verifier picks the right key without trying each.
//!
//! So a captured internal header gives neither the secret nor the internal key, and even the
//! internal key would not sign tokens: HKDF outputs for different infos are independent.
//!
//! **Rotation.** A [`Keyring`] holds the current secret (what new tokens and outgoing proofs
//! use) and up to [`MAX_PREVIOUS`] other accepted secrets (`previous_cluster_secrets`):
//! tokens signed with their keys verify, and outgoing calls carry a proof for each of them
//! too, so a peer that knows only one of the secrets still accepts the call.
//!
//! **Legacy form.** Versions before derived keys signed tokens with the raw secret and sent
//! it in clear in `x-cim-cluster-secret` ([`LEGACY_HEADER`]). With `legacy_secret` on, a
//! keyring accepts both (for any of its secrets) and outgoing calls send the raw current
//! secret beside the proofs, so nodes of both versions interoperate during a rolling upgrade.
//! While it is on, the raw secret still travels in clear: turn it off once every node runs
//! this version and the tokens issued before have expired.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::sync::Arc;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Header carrying the proofs of an internal call.
pub const AUTH_HEADER: &str = "x-cim-cluster-auth";
/// Header of versions before derived keys: the raw cluster secret, in clear.
pub const LEGACY_HEADER: &str = "x-cim-cluster-secret";
/// Most accepted secrets besides the current one (each costs an HMAC per legacy token and
/// a proof in every internal header).
pub const MAX_PREVIOUS: usize = 4;
/// A proof is accepted this long before or after its timestamp: a captured header stops
/// working after it. Wider than any clock skew a cluster survives anyway (connect tokens
/// live 30 s and are checked on another machine's clock than the one that signed them).
pub const PROOF_WINDOW_SECS: u64 = 300;

/// HKDF salt: fixed, it separates cim's derivations from any other use of the same secret.
const SALT: &[u8] = b"cim cluster secret";
const TOKEN_INFO: &[u8] = b"cim token signing v1";
const INTERNAL_INFO: &[u8] = b"cim internal auth v1";
const ID_INFO: &[u8] = b"cim key id v1";
/// Version of the proof format, its first field.
const PROOF_VERSION: &str = "v1";
/// Domain of the proof MAC.
const PROOF_TAG: &[u8] = b"cim internal proof v1\0";
/// Proofs read from one header at most (a node sends 1 + MAX_PREVIOUS).
const MAX_PROOFS: usize = 8;
/// Longest auth header read (a proof is about 70 bytes).
const MAX_AUTH_HEADER: usize = 1024;

/// The keys of one secret.
struct KeySet {
    id: String,
    token: [u8; 32],
    internal: [u8; 32],
    raw: Box<[u8]>,
}

impl KeySet {
    fn derive(secret: &str) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(SALT), secret.as_bytes());
        let mut token = [0u8; 32];
        let mut internal = [0u8; 32];
        let mut id = [0u8; 6];
        // 32 and 6 bytes are far below HKDF-SHA256's limit of 8,160: these cannot fail.
        hk.expand(TOKEN_INFO, &mut token).expect("HKDF length");
        hk.expand(INTERNAL_INFO, &mut internal)
            .expect("HKDF length");
        hk.expand(ID_INFO, &mut id).expect("HKDF length");
        Self {
            id: URL_SAFE_NO_PAD.encode(id),
            token,
            internal,
            raw: secret.as_bytes().into(),
        }
    }

    fn proof_mac(&self, timestamp: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.internal).expect("HMAC takes any key");
        mac.update(PROOF_TAG);
        mac.update(self.id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac
    }
}

/// Why an internal call was refused (the 401 body says it, for the operator of the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no cluster auth header")]
    Missing,
    #[error("malformed cluster auth header")]
    Malformed,
    #[error("cluster auth proof signed with a secret this node does not know")]
    UnknownKey,
    #[error("cluster auth proof outside the accepted clock window (check the clocks)")]
    Stale,
    #[error("wrong cluster auth proof")]
    Wrong,
    #[error("raw cluster secret refused (legacy_secret is off here)")]
    LegacyOff,
    #[error("wrong cluster secret")]
    WrongSecret,
}

/// The keys of the current secret and of the other accepted ones. Cheap to clone.
#[derive(Clone)]
pub struct Keyring(Arc<Inner>);

struct Inner {
    /// The current secret's keys first.
    sets: Vec<KeySet>,
    legacy: bool,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field(
                "ids",
                &self.0.sets.iter().map(|s| &s.id).collect::<Vec<_>>(),
            )
            .field("legacy", &self.0.legacy)
            .finish()
    }
}

impl Keyring {
    /// Keys of `current` (used for everything new) and of `previous` (still accepted), plus
    /// the legacy raw-secret form when `legacy` is on. Duplicates of `current` are ignored;
    /// configs check [`validate_previous`] first.
    pub fn new(current: &str, previous: &[String], legacy: bool) -> Self {
        let mut sets = vec![KeySet::derive(current)];
        for secret in previous.iter().take(MAX_PREVIOUS) {
            if sets.iter().all(|s| *s.raw != *secret.as_bytes()) {
                sets.push(KeySet::derive(secret));
            }
        }
        Self(Arc::new(Inner { sets, legacy }))
    }

    /// One secret, no other, no legacy form.
    pub fn single(secret: &str) -> Self {
        Self::new(secret, &[], false)
    }

    /// Whether the raw-secret form of earlier versions is sent and accepted.
    pub fn legacy(&self) -> bool {
        self.0.legacy
    }

    fn current(&self) -> &KeySet {
        &self.0.sets[0]
    }

    /// Id and token key of the current secret: what new tokens are signed with.
    pub(crate) fn signing_key(&self) -> (&str, &[u8]) {
        let set = self.current();
        (&set.id, &set.token)
    }

    /// Token keys of the secrets with key id `id` (one, unless two ids collide).
    pub(crate) fn token_keys(&self, id: &str) -> impl Iterator<Item = &[u8]> {
        let id = id.to_owned();
        self.0
            .sets
            .iter()
            .filter(move |s| s.id == id)
            .map(|s| &s.token[..])
    }

    /// Keys of legacy (raw-secret) tokens: every secret's raw bytes, none without `legacy`.
    pub(crate) fn legacy_token_keys(&self) -> impl Iterator<Item = &[u8]> {
        self.0
            .sets
            .iter()
            .filter(|_| self.0.legacy)
            .map(|s| &s.raw[..])
    }

    /// The raw current secret in the legacy header, when `legacy` is on.
    pub fn legacy_header(&self) -> Option<&[u8]> {
        self.0.legacy.then(|| &self.current().raw[..])
    }

    /// The [`AUTH_HEADER`] value of a call made at `now_secs` (unix seconds): one proof per
    /// secret, current first, `v1.{key id}.{timestamp}.{mac}`, separated by commas.
    pub fn auth_header(&self, now_secs: u64) -> String {
        let timestamp = now_secs.to_string();
        self.0
            .sets
            .iter()
            .map(|set| {
                let mac = set.proof_mac(&timestamp).finalize().into_bytes();
                format!(
                    "{PROOF_VERSION}.{}.{timestamp}.{}",
                    set.id,
                    URL_SAFE_NO_PAD.encode(mac)
                )
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Checks an internal call's headers at `now_secs`: a valid proof of a secret this node
    /// accepts, or (with `legacy` on, and only without a valid proof) the raw secret.
    pub fn check(
        &self,
        auth: Option<&[u8]>,
        legacy: Option<&[u8]>,
        now_secs: u64,
    ) -> Result<(), Refusal> {
        let proof = match auth {
            Some(value) => match self.check_proofs(value, now_secs) {
                Ok(()) => return Ok(()),
                Err(refusal) => Some(refusal),
            },
            None => None,
        };
        if let (Some(raw), true) = (legacy, self.0.legacy) {
            // Every secret compared (no early exit), each in constant time.
            let matched = self
                .0
                .sets
                .iter()
                .fold(subtle::Choice::from(0), |any, s| any | s.raw.ct_eq(raw));
            if bool::from(matched) {
                return Ok(());
            }
        }
        Err(match (proof, legacy) {
            (Some(refusal), _) => refusal,
            (None, Some(_)) if !self.0.legacy => Refusal::LegacyOff,
            (None, Some(_)) => Refusal::WrongSecret,
            (None, None) => Refusal::Missing,
        })
    }

    fn check_proofs(&self, value: &[u8], now_secs: u64) -> Result<(), Refusal> {
        if value.len() > MAX_AUTH_HEADER {
            return Err(Refusal::Malformed);
        }
        let value = std::str::from_utf8(value).map_err(|_| Refusal::Malformed)?;
        // The most telling refusal among the proofs, if none passes.
        let mut refusal = Refusal::Malformed;
        for proof in value.split(',').take(MAX_PROOFS) {
            let this = self.check_proof(proof.trim(), now_secs);
            match this {
                Ok(()) => return Ok(()),
                Err(r) if rank(r) > rank(refusal) => refusal = r,
                Err(_) => {}
            }
        }
        Err(refusal)
    }

    fn check_proof(&self, proof: &str, now_secs: u64) -> Result<(), Refusal> {
        let mut fields = proof.split('.');
        let (Some(PROOF_VERSION), Some(id), Some(timestamp), Some(mac), None) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return Err(Refusal::Malformed);
        };
        if timestamp.len() > 20 || !timestamp.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Refusal::Malformed);
        }
        let at: u64 = timestamp.parse().map_err(|_| Refusal::Malformed)?;
        // 32 bytes are 43 characters; anything longer is not a proof.
        if mac.len() > 64 {
            return Err(Refusal::Malformed);
        }
        let mac = URL_SAFE_NO_PAD
            .decode(mac)
            .map_err(|_| Refusal::Malformed)?;
        let mut known = false;
        for set in self.0.sets.iter().filter(|s| s.id == id) {
            known = true;
            if set.proof_mac(timestamp).verify_slice(&mac).is_ok() {
                // Checked after the MAC: only a genuine proof learns that its time is off.
                return if at.abs_diff(now_secs) <= PROOF_WINDOW_SECS {
                    Ok(())
                } else {
                    Err(Refusal::Stale)
                };
            }
        }
        Err(if known {
            Refusal::Wrong
        } else {
            Refusal::UnknownKey
        })
    }
}

/// Which refusal to report when several proofs fail: the one closest to succeeding.
fn rank(refusal: Refusal) -> u8 {
    match refusal {
        Refusal::Missing | Refusal::Malformed => 0,
        Refusal::UnknownKey => 1,
        Refusal::Wrong => 2,
        Refusal::Stale => 3,
        Refusal::LegacyOff | Refusal::WrongSecret => 0,
    }
}

/// Checks `previous_cluster_secrets` against the current secret: each a usable secret, none
/// equal to it or to another, at most [`MAX_PREVIOUS`].
pub fn validate_previous(current: &str, previous: &[String]) -> Result<(), String> {
    if previous.len() > MAX_PREVIOUS {
        return Err(format!(
            "previous_cluster_secrets holds at most {MAX_PREVIOUS} secrets"
        ));
    }
    for (i, secret) in previous.iter().enumerate() {
        crate::config::validate_secret(secret)
            .map_err(|m| format!("previous_cluster_secrets[{i}]: {m}"))?;
        if secret == current {
            return Err(format!(
                "previous_cluster_secrets[{i}] is the current cluster_secret"
            ));
        }
        if previous[..i].contains(secret) {
            return Err(format!("previous_cluster_secrets[{i}] is listed twice"));
        }
    }
    Ok(())
}

/// Unix seconds now (0 before 1970).
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "old-secret-0123456789";
    const NEW: &str = "new-secret-0123456789";
    const NOW: u64 = 1_700_000_000;

    fn check(keys: &Keyring, auth: Option<&str>, legacy: Option<&str>) -> Result<(), Refusal> {
        keys.check(auth.map(str::as_bytes), legacy.map(str::as_bytes), NOW)
    }

    #[test]
    fn derived_keys_are_distinct_and_stable() {
        let a = KeySet::derive(OLD);
        let b = KeySet::derive(OLD);
        assert_eq!((a.token, a.internal, &a.id), (b.token, b.internal, &b.id));
        assert_ne!(a.token, a.internal);
        assert_ne!(&a.token[..], OLD.as_bytes());
        let c = KeySet::derive(NEW);
        assert_ne!(a.token, c.token);
        assert_ne!(a.id, c.id);
        assert_eq!(a.id.len(), 8);
    }

    #[test]
    fn a_proof_is_accepted_within_its_window_only() {
        let keys = Keyring::single(OLD);
        let fresh = keys.auth_header(NOW - PROOF_WINDOW_SECS);
        assert_eq!(check(&keys, Some(&fresh), None), Ok(()));
        let ahead = keys.auth_header(NOW + PROOF_WINDOW_SECS);
        assert_eq!(check(&keys, Some(&ahead), None), Ok(()));
        let old = keys.auth_header(NOW - PROOF_WINDOW_SECS - 1);
        assert_eq!(check(&keys, Some(&old), None), Err(Refusal::Stale));
    }

    #[test]
    fn a_proof_does_not_contain_the_secret_or_a_key() {
        let keys = Keyring::single(OLD);
        let header = keys.auth_header(NOW);
        let set = KeySet::derive(OLD);
        assert!(!header.contains(OLD));
        for key in [&set.token, &set.internal] {
            assert!(!header.contains(&URL_SAFE_NO_PAD.encode(key)));
        }
    }

    #[test]
    fn forged_or_changed_proofs_are_refused() {
        let keys = Keyring::single(OLD);
        let other = Keyring::single(NEW).auth_header(NOW);
        assert_eq!(check(&keys, Some(&other), None), Err(Refusal::UnknownKey));
        let good = keys.auth_header(NOW);
        // Another timestamp with the same MAC.
        let fields: Vec<&str> = good.split('.').collect();
        let moved = format!("v1.{}.{}.{}", fields[1], NOW + 1, fields[3]);
        assert_eq!(check(&keys, Some(&moved), None), Err(Refusal::Wrong));
        for bad in [
            "",
            "v1",
            "v2.a.1.b",
            "v1.a.b.c.d",
            "v1.x.-1.y",
            &"v1.".repeat(400),
        ] {
            assert!(check(&keys, Some(bad), None).is_err(), "{bad}");
        }
        assert_eq!(check(&keys, None, None), Err(Refusal::Missing));
    }

    #[test]
    fn previous_secrets_are_accepted_while_listed() {
        let rotated = Keyring::new(NEW, &[OLD.into()], false);
        let old_only = Keyring::single(OLD);
        // A node still on the old secret calls a rotated one, and the other way round.
        assert_eq!(
            check(&rotated, Some(&old_only.auth_header(NOW)), None),
            Ok(())
        );
        assert_eq!(
            check(&old_only, Some(&rotated.auth_header(NOW)), None),
            Ok(())
        );
        // Once the old secret is dropped, its proofs are not.
        let new_only = Keyring::single(NEW);
        assert_eq!(
            check(&new_only, Some(&old_only.auth_header(NOW)), None),
            Err(Refusal::UnknownKey)
        );
        assert_eq!(
            check(&old_only, Some(&new_only.auth_header(NOW)), None),
            Err(Refusal::UnknownKey)
        );
    }

    #[test]
    fn the_raw_secret_is_accepted_only_in_legacy_mode() {
        let legacy = Keyring::new(NEW, &[OLD.into()], true);
        let strict = Keyring::new(NEW, &[OLD.into()], false);
        for raw in [NEW, OLD] {
            assert_eq!(check(&legacy, None, Some(raw)), Ok(()));
            assert_eq!(check(&strict, None, Some(raw)), Err(Refusal::LegacyOff));
        }
        assert_eq!(
            check(&legacy, None, Some("wrong-secret-0123456789")),
            Err(Refusal::WrongSecret)
        );
        assert_eq!(legacy.legacy_header(), Some(NEW.as_bytes()));
        assert_eq!(strict.legacy_header(), None);
        // A wrong proof with a right raw secret passes in legacy mode (an older peer may
        // forward headers it does not understand), a right proof never needs the raw one.
        assert_eq!(check(&legacy, Some("v1.x.1.y"), Some(OLD)), Ok(()));
        assert_eq!(check(&strict, Some(&strict.auth_header(NOW)), None), Ok(()));
    }

    #[test]
    fn previous_secrets_are_validated() {
        assert!(validate_previous(NEW, &[OLD.into()]).is_ok());
        assert!(validate_previous(NEW, &[]).is_ok());
        assert!(validate_previous(NEW, &[NEW.into()]).is_err());
        assert!(validate_previous(NEW, &["short".into()]).is_err());
        assert!(validate_previous(NEW, &[OLD.into(), OLD.into()]).is_err());
        let many: Vec<String> = (0..=MAX_PREVIOUS).map(|i| format!("{OLD}-{i}")).collect();
        assert!(validate_previous(NEW, &many).is_err());
    }
}
