//! Identifiers clients see or choose: message ids (ULIDs, sortable by time, unique across
//! processes without coordination), and the rules for message ids and channel names chosen by
//! clients. (Server instance ids and session ids are cim-common's `ids`.)

use std::sync::Mutex;

static GENERATOR: Mutex<Option<ulid::Generator>> = Mutex::new(None);

/// A new message id: a ULID, monotonic within this process.
pub fn message_id() -> String {
    let mut guard = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    let generator = guard.get_or_insert_with(ulid::Generator::new);
    // The generator only fails when 80 random bits overflow within one millisecond.
    match generator.generate() {
        Ok(id) => id.to_string(),
        Err(_) => ulid::Ulid::generate().to_string(),
    }
}

/// Longest message id a client may choose.
pub const MAX_MESSAGE_ID_LEN: usize = 64;

/// Message ids chosen by clients (`Send.message_id`): 1..=64 characters of `[0-9A-Za-z_-]`,
/// so they are safe in keys, logs and URLs.
pub fn valid_message_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_MESSAGE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Longest channel name, in characters.
pub const MAX_CHANNEL_NAME_LEN: usize = 64;

/// Names no channel can have: `.` and `..` are path segments URL parsers remove (no HTTP
/// client could address them), and `/api/channels/mine` is the caller's own list.
pub const RESERVED_CHANNEL_NAMES: [&str; 3] = [".", "..", "mine"];

/// Channel names: 1..=64 characters, each a Unicode letter or digit or one of `_ - .`, and
/// not one of [`RESERVED_CHANNEL_NAMES`]. No spaces, `#` or `/`: they appear after `#` in the
/// terminal client and in URL paths.
pub fn valid_channel_name(name: &str) -> bool {
    !name.is_empty()
        && !RESERVED_CHANNEL_NAMES.contains(&name)
        && name.chars().count() <= MAX_CHANNEL_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '-' || c == '.')
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names() {
        for good in [
            "room1",
            "Lobby",
            "live-42",
            "a.b_c",
            "聊天室",
            "ä",
            &"x".repeat(64),
        ] {
            assert!(valid_channel_name(good), "{good:?}");
        }
        for bad in [
            "",
            "a b",
            "#a",
            "a/b",
            "a\u{1f}",
            "a;b",
            "a@b",
            "a|b",
            &"x".repeat(65),
        ] {
            assert!(!valid_channel_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn message_ids_are_unique_and_sorted() {
        let ids: Vec<String> = (0..1000).map(|_| message_id()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, ids);
    }

    #[test]
    fn client_message_ids() {
        assert!(valid_message_id(&message_id()));
        assert!(valid_message_id("a-b_C9"));
        assert!(valid_message_id(&"x".repeat(64)));
        for bad in ["", "a b", "a:b", "é", "a\n"] {
            assert!(!valid_message_id(bad), "{bad:?}");
        }
        assert!(!valid_message_id(&"x".repeat(65)));
    }
}
