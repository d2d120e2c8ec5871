//! Property tests of the cluster's own ids: instance names follow their rule, and ids made by
//! cim itself (message, session and instance ids) pass the rules applied to ids chosen by
//! clients. (The message id and channel name rules are tested in cim-proto.)
//!
//! Cases per run (`PROPTEST_CASES` overrides them all): 1,024 for each property (cheap: well
//! under a second in all).

use super::*;
use cim_proto::arb::near_rules_text as any_text;
use proptest::prelude::*;

/// `[A-Za-z0-9_.-]`, the instance name alphabet, said without the validator's own predicate.
fn instance_name_char(c: char) -> bool {
    matches!(c, '0'..='9' | 'A'..='Z' | 'a'..='z' | '_' | '-' | '.')
}

proptest! {
    #![proptest_config(cim_proto::arb::config(1024))]

    /// Ids made by cim itself pass the rules the route applies to ids chosen by clients.
    #[test]
    fn generated_ids_are_valid(name in "[A-Za-z0-9_.-]{1,64}") {
        prop_assert!(cim_proto::ids::valid_message_id(&cim_proto::ids::message_id()));
        let session = session_id();
        prop_assert!(session.len() == 32 && session.chars().all(|c| c.is_ascii_hexdigit()));
        // `{name}-{6 hex digits}`: the name's alphabet, so safe in keys and values (an instance
        // id may be 7 longer than the longest name: it is never checked as a name).
        let id = instance_id(&name);
        prop_assert!(valid_instance_name(&name));
        let (head, hex) = id.rsplit_once('-').unwrap();
        prop_assert_eq!(head, name.as_str());
        prop_assert!(hex.len() == 6 && hex.chars().all(|c| c.is_ascii_hexdigit()));
        prop_assert!(id.chars().all(instance_name_char));
    }

    /// Instance names: 1..=64 characters of `[A-Za-z0-9_.-]`.
    #[test]
    fn instance_names_follow_their_rule(s in any_text()) {
        let rule = (1..=64).contains(&s.chars().count()) && s.chars().all(instance_name_char);
        prop_assert_eq!(valid_instance_name(&s), rule, "{:?}", s);
    }
}
