//! Property tests of the account name and password rules, each written as a property.
//!
//! Cases per run (`PROPTEST_CASES` overrides them): 1,024 each (pure, well under a second).

use super::*;
use cim_proto::arb;
use proptest::prelude::*;

/// Any text, often near the rule's edges: spaces of every kind, controls, the reserved
/// characters, letters of any script.
fn any_name() -> impl Strategy<Value = String> {
    prop_oneof![
        arb::text(),
        "[a-z;@#| \t\u{a0}\u{2028}\u{200b}\u{202e}\u{0}\u{7f}é字]{0,40}",
        "[\\p{L}\\p{N}\\p{P}\\p{S}]{0,40}",
    ]
}

proptest! {
    #![proptest_config(arb::config(1024))]

    /// A name is 1 to `max_len` characters, none of them whitespace, a control character or
    /// one of `; @ # |`.
    #[test]
    fn names_follow_their_rule(name in any_name(), max_len in 1usize..40) {
        let rule = (1..=max_len).contains(&name.chars().count())
            && name
                .chars()
                .all(|c| !c.is_whitespace() && !c.is_control() && !";@#|".contains(c));
        let verdict = validate_name(&name, max_len);
        prop_assert_eq!(verdict.is_ok(), rule, "{:?}: {:?}", name, verdict);
    }

    /// Names of letters, digits, punctuation and symbols of any script are accepted up to the
    /// limit, whatever their length in bytes.
    #[test]
    fn printable_names_are_accepted_up_to_the_limit(name in "[\\p{L}\\p{N}_.\\-]{1,32}") {
        prop_assert_eq!(validate_name(&name, 32), Ok(()));
        let longer = format!("{name}{}", "x".repeat(33 - name.chars().count()));
        prop_assert!(validate_name(&longer, 32).is_err());
    }

    /// A password is `min_len` to `max_len` characters, of anything.
    #[test]
    fn passwords_follow_their_rule(password in arb::text(), min in 0usize..20, extra in 0usize..300) {
        let max = min + extra;
        let rule = (min..=max).contains(&password.chars().count());
        prop_assert_eq!(validate_password(&password, min, max).is_ok(), rule);
    }
}
