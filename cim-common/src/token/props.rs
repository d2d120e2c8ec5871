//! Property tests of connect and session tokens.
//!
//! Cases per run (`PROPTEST_CASES` overrides them all): 1,024 for arbitrary text, 256 for
//! round trips, 64 for mutations (each case tries every byte of two tokens of about 250
//! bytes, four verifications per byte), about two seconds in all.
//!
//! - arbitrary text, including text shaped like a token, never panics and never verifies;
//! - signing then verifying gives the claims back, for any claims a route can sign (names up
//!   to the largest `max_name_len`, 256 characters of anything), before their expiry and
//!   never at or after it;
//! - a valid token with any one byte changed (to any other ASCII byte: a token is ASCII, and
//!   any other byte would not be a `&str`), cut short or extended never verifies, nor does it
//!   verify as the other kind or under another secret.

use super::*;
use proptest::{collection::vec, prelude::*};

const SECRET: &str = "property-test-secret";

/// Claims a route may sign, with names of up to `name_len` characters of anything.
fn claims(name_len: usize) -> impl Strategy<Value = ConnectClaims> {
    (
        any::<u64>(),
        proptest::string::string_regex(&format!("(?s).{{0,{name_len}}}")).expect("a valid regex"),
        // `{name}-{6 hex}`, the name at most 64 of `[A-Za-z0-9_.-]`.
        "[A-Za-z0-9_.-]{1,64}-[0-9a-f]{6}",
        "[0-9a-f]{32}",
        // Room on both sides for "now".
        (i64::MIN + 1)..i64::MAX,
    )
        .prop_map(
            |(user_id, user_name, server_id, session, exp_ms)| ConnectClaims {
                user_id,
                user_name,
                server_id,
                session,
                exp_ms,
            },
        )
}

fn session_of(c: &ConnectClaims) -> SessionClaims {
    SessionClaims {
        user_id: c.user_id,
        user_name: c.user_name.clone(),
        session: c.session.clone(),
        exp_ms: c.exp_ms,
        // Any generation: the user id picks one.
        generation: c.user_id,
    }
}

fn verifies(signer: &TokenSigner, token: &str) -> bool {
    // Long before any expiry a strategy can make.
    signer.verify_connect(token, i64::MIN).is_ok() || signer.verify_session(token, i64::MIN).is_ok()
}

proptest! {
    #![proptest_config(cim_proto::arb::config(1024))]

    #[test]
    fn arbitrary_text_never_verifies(text in prop_oneof![
        cim_proto::arb::text(),
        "[A-Za-z0-9_-]{0,200}\\.[A-Za-z0-9_-]{0,60}",
        // The key id, claims and signature shape.
        "[A-Za-z0-9_-]{8}\\.[A-Za-z0-9_-]{0,200}\\.[A-Za-z0-9_-]{0,60}",
        "[A-Za-z0-9_=+/.-]{0,300}",
        // Around the verifier's length limit.
        (4000usize..4200).prop_map(|n| format!("{}.{}", "A".repeat(n - 44), "A".repeat(43))),
    ]) {
        let signer = TokenSigner::new(SECRET);
        let connect = signer.verify_connect(&text, i64::MIN);
        prop_assert!(matches!(connect, Err(TokenError::Malformed | TokenError::BadSignature)), "{:?}", connect);
        let session = signer.verify_session(&text, i64::MIN);
        prop_assert!(matches!(session, Err(TokenError::Malformed | TokenError::BadSignature)), "{:?}", session);
    }
}

proptest! {
    #![proptest_config(cim_proto::arb::config(256))]

    #[test]
    // The largest name a route accepts is 256 characters (`max_name_len`).
    fn sign_then_verify_gives_the_claims_until_expiry(c in claims(256), before in 1u64..=u64::MAX) {
        let signer = TokenSigner::new(SECRET);
        let now = c.exp_ms.saturating_sub_unsigned(before);
        let connect = signer.sign_connect(&c);
        prop_assert!(connect.len() <= 4096, "a route's token is over the verifier's limit");
        prop_assert_eq!(signer.verify_connect(&connect, now), Ok(c.clone()));
        prop_assert_eq!(signer.verify_connect(&connect, c.exp_ms), Err(TokenError::Expired));
        let s = session_of(&c);
        let session = signer.sign_session(&s);
        prop_assert_eq!(signer.verify_session(&session, now), Ok(s.clone()));
        prop_assert_eq!(
            signer.verify_session(&session, c.exp_ms.saturating_add(1)),
            Err(TokenError::Expired)
        );
    }
}

proptest! {
    #![proptest_config(cim_proto::arb::config(64))]

    #[test]
    // Names up to the default `max_name_len` (32): every byte is tried, so length is time.
    fn a_changed_token_never_verifies(
        c in claims(32),
        replacements in vec(0u8..0x80, 1..8),
        tail in "[A-Za-z0-9_.=-]{1,8}",
    ) {
        let signer = TokenSigner::new(SECRET);
        for token in [signer.sign_connect(&c), signer.sign_session(&session_of(&c))] {
            prop_assert!(verifies(&signer, &token));
            let bytes = token.as_bytes();
            for i in 0..bytes.len() {
                let mut changed = bytes.to_vec();
                // Any other ASCII byte (cycling through the generated ones).
                let r = replacements[i % replacements.len()];
                changed[i] = if r == bytes[i] { r ^ 1 } else { r };
                let changed = String::from_utf8(changed).unwrap();
                prop_assert!(!verifies(&signer, &changed), "byte {} of {}", i, token);
                prop_assert!(!verifies(&signer, &token[..i]), "cut at {}", i);
            }
            let extended = format!("{token}{tail}");
            prop_assert!(!verifies(&signer, &extended));
            prop_assert!(!verifies(&TokenSigner::new("another-secret-value"), &token));
        }
        // Each kind only as itself.
        prop_assert!(signer.verify_session(&signer.sign_connect(&c), i64::MIN).is_err());
        prop_assert!(signer.verify_connect(&signer.sign_session(&session_of(&c)), i64::MIN).is_err());
    }
}
