//! Property tests of the message id and channel name validators: each documented rule written
//! as a property, checked from both sides (strings built to follow the rule are accepted;
//! strings built to break it in one way are refused; arbitrary strings are judged as the rule
//! says).
//!
//! Cases per run (`PROPTEST_CASES` overrides them all): 1,024 for each property (cheap: well
//! under a second in all).

use super::*;
use crate::arb::near_rules_text as any_text;
use proptest::prelude::*;

/// `[0-9A-Za-z_-]`, the message id alphabet, said without the validator's own predicate.
fn message_id_char(c: char) -> bool {
    matches!(c, '0'..='9' | 'A'..='Z' | 'a'..='z' | '_' | '-')
}

proptest! {
    #![proptest_config(crate::arb::config(1024))]

    /// Message ids: 1..=64 characters of `[0-9A-Za-z_-]`.
    #[test]
    fn message_ids_follow_their_rule(s in any_text()) {
        let rule = (1..=MAX_MESSAGE_ID_LEN).contains(&s.chars().count()) && s.chars().all(message_id_char);
        prop_assert_eq!(valid_message_id(&s), rule, "{:?}", s);
    }

    #[test]
    fn message_ids_of_the_alphabet_are_valid_up_to_64(s in "[0-9A-Za-z_-]{1,64}", extra in "[0-9A-Za-z_-]{1,8}") {
        prop_assert!(valid_message_id(&s));
        let longer = format!("{s}{}", "x".repeat(MAX_MESSAGE_ID_LEN - s.len()));
        prop_assert!(valid_message_id(&longer));
        let too_long = format!("{longer}{extra}");
        prop_assert!(!valid_message_id(&too_long));
    }

    #[test]
    fn one_foreign_character_makes_a_message_id_invalid(
        s in "[0-9A-Za-z_-]{0,63}",
        at in any::<usize>(),
        bad in any::<char>().prop_filter("outside the alphabet", |c| !message_id_char(*c)),
    ) {
        let mut chars: Vec<char> = s.chars().collect();
        chars.insert(at % (chars.len() + 1), bad);
        let id: String = chars.into_iter().collect();
        prop_assert!(!valid_message_id(&id), "{:?}", id);
    }

    /// Channel names: 1..=64 characters, each a Unicode letter or digit or one of `_ - .`, and
    /// not `.`, `..` or `mine`.
    #[test]
    fn channel_names_follow_their_rule(s in any_text()) {
        let rule = (1..=MAX_CHANNEL_NAME_LEN).contains(&s.chars().count())
            && s.chars().all(|c| c.is_alphabetic() || c.is_numeric() || "_-.".contains(c))
            && !["." , "..", "mine"].contains(&s.as_str());
        prop_assert_eq!(valid_channel_name(&s), rule, "{:?}", s);
    }

    #[test]
    fn channel_names_of_letters_and_digits_are_valid(s in "[\\p{L}\\p{N}_.-]{1,64}") {
        prop_assert_eq!(valid_channel_name(&s), !RESERVED_CHANNEL_NAMES.contains(&s.as_str()), "{:?}", s);
    }

    #[test]
    fn one_separator_makes_a_channel_name_invalid(
        s in "[\\p{L}\\p{N}_.-]{0,63}",
        at in any::<usize>(),
        bad in prop_oneof![
            Just(' '), Just('#'), Just('/'), Just('@'), Just(';'), Just('|'), Just('\n'),
            any::<char>().prop_filter("a separator or symbol", |c| !(c.is_alphanumeric() || "_-.".contains(*c))),
        ],
    ) {
        let mut chars: Vec<char> = s.chars().collect();
        chars.insert(at % (chars.len() + 1), bad);
        let name: String = chars.into_iter().collect();
        prop_assert!(!valid_channel_name(&name), "{:?}", name);
    }
}
