//! Property tests of the proto3 JSON mapping of [`Frame`] (WebSocket text frames: the server
//! parses them with `serde_json::from_str::<Frame>`, see `cim-server/src/ws.rs`).
//!
//! Cases per run (`PROPTEST_CASES` overrides them all): 1,024 for the arbitrary text and
//! the round trips, 512 for arbitrary JSON values, 256 for deep nesting (about 5 s in all).
//!
//! - any text is a frame or an error, never a panic; a frame it gives survives a round trip;
//! - any JSON value (with known field names in odd places and of the wrong types) likewise;
//! - any frame, even with enum values from a newer schema, is written as JSON or refused with
//!   an error (pbjson has no name for such a value), never a panic;
//! - every frame this build can write as JSON (enum values it knows) reads back as itself, and
//!   agrees with its protobuf encoding;
//! - keys this build does not know, with any values, anywhere in a frame, are skipped (the
//!   documented behaviour that lets clients and servers of different versions mix);
//! - nesting of any depth (20,000 levels) is skipped under unknown keys, never a stack
//!   overflow.

use crate::{
    arb::{self, Enums},
    pb::Frame,
};
use proptest::{collection::vec, prelude::*};
use prost::Message as _;
use serde_json::Value;

/// Field names of `cim.proto`, in both spellings the mapping accepts, so generated JSON
/// reaches the typed parsers and not only the skipping of unknown keys.
const KNOWN_KEYS: &[&str] = &[
    "login",
    "loginResult",
    "login_result",
    "ping",
    "pong",
    "send",
    "sendResult",
    "push",
    "kick",
    "error",
    "ack",
    "token",
    "userId",
    "user_name",
    "nonce",
    "kind",
    "body",
    "messages",
    "messageIds",
    "message_id",
    "timestampMs",
    "status",
    "code",
    "reason",
    "replay",
    "receipt",
    "toUserId",
    "seq",
];

/// A key no version of `cim.proto` can have: it holds a character no protobuf field name can.
fn unknown_key() -> impl Strategy<Value = String> {
    proptest::string::string_regex(".{0,8}[^A-Za-z0-9_].{0,8}").expect("a valid regex")
}

/// Adds `extra` to every object in `value`, the frame itself and every message inside it.
fn add_everywhere(value: &mut Value, extra: &[(String, Value)]) {
    match value {
        Value::Object(map) => {
            for v in map.values_mut() {
                add_everywhere(v, extra);
            }
            for (k, v) in extra {
                map.insert(k.clone(), v.clone());
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| add_everywhere(v, extra)),
        _ => {}
    }
}

/// A frame read from JSON writes back and reads again as itself.
fn assert_round_trips(frame: &Frame) -> Result<(), TestCaseError> {
    // A frame read from JSON only holds enum values this build knows, so it can be written.
    let text = serde_json::to_string(frame).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let back: Frame =
        serde_json::from_str(&text).map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
    prop_assert_eq!(&back, frame, "{}", text);
    Ok(())
}

proptest! {
    #![proptest_config(arb::config(1024))]

    #[test]
    fn any_text_is_a_frame_or_an_error(text in prop_oneof![
        arb::text(),
        // Text that starts like a frame and then goes anywhere.
        (proptest::sample::select(KNOWN_KEYS), arb::text())
            .prop_map(|(k, rest)| format!("{{\"{k}\":{rest}")),
    ]) {
        if let Ok(frame) = serde_json::from_str::<Frame>(&text) {
            assert_round_trips(&frame)?;
        }
    }

    #[test]
    fn frames_round_trip_through_json(frame in arb::frame(Enums::Known)) {
        let text = serde_json::to_string(&frame).unwrap();
        let back: Frame = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(&back, &frame, "{}", text);
        // JSON and protobuf carry the same frame.
        prop_assert_eq!(Frame::decode(&frame.encode_to_vec()[..]).unwrap(), back);
    }

    #[test]
    fn any_frame_is_written_as_json_or_refused(frame in arb::frame(Enums::Any)) {
        // An enum value this build does not know (from a newer peer, kept by protobuf) has no
        // name to write: pbjson refuses the frame (the server then sends `{}`, see
        // `cim-server/src/conn.rs` `Outbound::json`). Anything else writes and reads back.
        match serde_json::to_string(&frame) {
            Ok(text) => prop_assert_eq!(serde_json::from_str::<Frame>(&text).unwrap(), frame),
            Err(e) => prop_assert!(e.to_string().starts_with("Invalid variant"), "{}", e),
        }
    }

    #[test]
    fn unknown_keys_anywhere_are_skipped(
        frame in arb::frame(Enums::Known),
        extra in vec((unknown_key(), arb::json_value(KNOWN_KEYS)), 1..4),
    ) {
        let mut value = serde_json::to_value(&frame).unwrap();
        add_everywhere(&mut value, &extra);
        let text = value.to_string();
        let back: Frame = serde_json::from_str(&text)
            .map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
        prop_assert_eq!(back, frame);
    }
}

proptest! {
    #![proptest_config(arb::config(512))]

    #[test]
    fn any_json_value_is_a_frame_or_an_error(value in arb::json_value(KNOWN_KEYS)) {
        let text = value.to_string();
        if let Ok(frame) = serde_json::from_str::<Frame>(&text) {
            assert_round_trips(&frame)?;
        }
        // Reading from a parsed value takes another path through serde: same answer.
        let from_value = serde_json::from_value::<Frame>(value);
        prop_assert_eq!(
            from_value.ok(),
            serde_json::from_str::<Frame>(&text).ok()
        );
    }

}

proptest! {
    // Each case parses two texts of up to 140 KB.
    #![proptest_config(arb::config(256))]

    #[test]
    fn deep_nesting_never_overflows_the_stack(depth in 0usize..20_000, array in any::<bool>()) {
        // Under a key the parser skips: skipped, at any depth (serde_json skips values with
        // a loop, not by recursion, so no depth exhausts the stack; the text is bounded by
        // the frame limit anyway).
        let (open, close) = if array { ("[", "]") } else { ("{\"a\":", "}") };
        let nested = format!("{}1{}", open.repeat(depth), close.repeat(depth));
        let parsed = serde_json::from_str::<Frame>(&format!("{{\"x-y\":{nested}}}"));
        prop_assert_eq!(parsed.unwrap(), Frame::default());
        // Inside a body it reads, where objects are messages with an unknown key `a`: the
        // same, and an array where a message belongs is an error.
        let parsed = serde_json::from_str::<Frame>(&format!("{{\"push\":{{\"messages\":[{nested}]}}}}"));
        if array || depth == 0 {
            prop_assert!(parsed.is_err());
        } else {
            prop_assert!(parsed.is_ok(), "{:?}", parsed);
        }
    }
}
