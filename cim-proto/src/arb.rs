//! proptest strategies for the client wire types (feature `arb`, and this crate's own tests):
//! arbitrary [`Frame`]s of every body, for the property tests of the codec (`codec/props.rs`),
//! the JSON mapping (`pb/props.rs`) and the server's read paths; text near the id rules; the
//! per-property case counts every property test of the workspace uses ([`config`]).
//!
//! Two flavours, because the two encodings differ on one point: protobuf carries any `i32` in
//! an enum field (a newer peer's value survives a round trip), while the proto3 JSON mapping
//! names enum values, so only the values this build knows can be written as JSON.

use crate::pb::{
    frame::Body, Ack, Conversation, Error, ErrorCode, Frame, GroupEvent, GroupPosition, Kick,
    KickReason, Login, LoginResult, Message, MessageKind, Ping, Pong, Push, ReadMark, Send,
    SendResult, SendStatus, Typing, WatchReads,
};
use proptest::{collection::vec, option, prelude::*};
use serde_json::Value;

/// Which enum values a strategy produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enums {
    /// Only values of this build's `cim.proto` (what JSON can carry).
    Known,
    /// Any `i32` (what a newer peer may send in protobuf).
    Any,
}

/// Text of any Unicode scalar values, up to 300 of them (so some frames need a two-byte
/// length prefix).
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::string::string_regex(".{0,12}").expect("a valid regex"),
        1 => proptest::string::string_regex("(?s).{0,300}").expect("a valid regex"),
    ]
}

/// Any text, often with characters close to the edges of the id and name rules (`ids`):
/// separators, symbols, letters of other scripts, control characters, lengths around 64.
pub fn near_rules_text() -> impl Strategy<Value = String> {
    prop_oneof![
        text(),
        "[A-Za-z0-9_.\\-: /#|;@é\u{0}\n]{0,70}",
        "[\\p{L}\\p{N}_.\\- ]{0,70}",
    ]
}

fn enum_value(enums: Enums, last_known: i32) -> BoxedStrategy<i32> {
    match enums {
        Enums::Known => (0..=last_known).boxed(),
        Enums::Any => prop_oneof![3 => 0..=last_known, 1 => any::<i32>()].boxed(),
    }
}

fn message_kind(enums: Enums) -> BoxedStrategy<i32> {
    enum_value(enums, MessageKind::Receipt as i32)
}

fn error(enums: Enums) -> impl Strategy<Value = Error> {
    (enum_value(enums, ErrorCode::Forbidden as i32), text())
        .prop_map(|(code, message)| Error { code, message })
}

/// An arbitrary stored or pushed message.
pub fn message(enums: Enums) -> impl Strategy<Value = Message> {
    (
        (
            text(),
            any::<u64>(),
            text(),
            any::<u64>(),
            message_kind(enums),
        ),
        (
            text(),
            any::<i64>(),
            any::<u64>(),
            text(),
            any::<bool>(),
            text(),
        ),
        (any::<u64>(), any::<u64>()),
    )
        .prop_map(
            |(
                (id, sender_id, sender_name, receiver_id, kind),
                (body, timestamp_ms, seq, channel, receipt, receipt_for),
                (group_id, log_seq),
            )| Message {
                id,
                sender_id,
                sender_name,
                receiver_id,
                kind,
                body,
                timestamp_ms,
                seq,
                channel,
                receipt,
                receipt_for,
                group_id,
                log_seq,
                group_event: (group_id % 3 == 0).then(|| GroupEvent {
                    r#type: (log_seq % 8) as i32,
                    user_ids: vec![sender_id, receiver_id],
                    name: format!("g{group_id}"),
                    role: String::new(),
                }),
            },
        )
}

fn send(enums: Enums) -> impl Strategy<Value = Send> {
    (
        (any::<u64>(), message_kind(enums), any::<u64>(), text()),
        (text(), text(), any::<bool>(), text(), any::<u64>()),
    )
        .prop_map(
            |(
                (client_id, kind, to_user_id, to_user_name),
                (body, channel, receipt, message_id, group_id),
            )| {
                Send {
                    client_id,
                    kind,
                    to_user_id,
                    to_user_name,
                    body,
                    channel,
                    receipt,
                    message_id,
                    group_id,
                }
            },
        )
}

fn send_result(enums: Enums) -> impl Strategy<Value = SendResult> {
    (
        (
            any::<u64>(),
            enum_value(enums, SendStatus::Failed as i32),
            text(),
        ),
        (
            any::<i64>(),
            any::<u32>(),
            option::of(error(enums)),
            any::<bool>(),
            any::<u64>(),
        ),
    )
        .prop_map(
            |(
                (client_id, status, message_id),
                (timestamp_ms, delivered, error, repeat, log_seq),
            )| {
                SendResult {
                    client_id,
                    status,
                    message_id,
                    timestamp_ms,
                    delivered,
                    error,
                    repeat,
                    log_seq,
                }
            },
        )
}

fn login_result() -> impl Strategy<Value = LoginResult> {
    (
        any::<u64>(),
        text(),
        text(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(
            |(
                user_id,
                user_name,
                server_id,
                heartbeat_interval_ms,
                heartbeat_timeout_ms,
                max_frame_len,
            )| LoginResult {
                user_id,
                user_name,
                server_id,
                heartbeat_interval_ms,
                heartbeat_timeout_ms,
                max_frame_len,
            },
        )
}

/// An arbitrary frame: any body (or none, what a frame from a newer schema decodes to), with
/// arbitrary field values.
pub fn frame(enums: Enums) -> BoxedStrategy<Frame> {
    let body = prop_oneof![
        text().prop_map(|token| Body::Login(Login { token })),
        login_result().prop_map(Body::LoginResult),
        any::<u64>().prop_map(|nonce| Body::Ping(Ping { nonce })),
        any::<u64>().prop_map(|nonce| Body::Pong(Pong { nonce })),
        send(enums).prop_map(Body::Send),
        send_result(enums).prop_map(Body::SendResult),
        (vec(message(enums), 0..4), any::<bool>())
            .prop_map(|(messages, replay)| Body::Push(Push { messages, replay })),
        (enum_value(enums, KickReason::Admin as i32), text())
            .prop_map(|(reason, message)| Body::Kick(Kick { reason, message })),
        error(enums).prop_map(Body::Error),
        (vec(text(), 0..6), vec((any::<u64>(), any::<u64>()), 0..3)).prop_map(
            |(message_ids, groups)| Body::Ack(Ack {
                message_ids,
                groups: groups
                    .into_iter()
                    .map(|(group_id, log_seq)| GroupPosition { group_id, log_seq })
                    .collect(),
            })
        ),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(id, seq, user_id)| {
            Body::ReadMark(ReadMark {
                conversation: Some(Conversation {
                    user_id: id,
                    group_id: 0,
                }),
                seq,
                user_id,
            })
        }),
        (any::<u64>(), any::<bool>(), text()).prop_map(|(id, stopped, user_name)| {
            Body::Typing(Typing {
                conversation: Some(Conversation {
                    user_id: 0,
                    group_id: id,
                }),
                stopped,
                user_id: id,
                user_name,
            })
        }),
        (any::<u64>(), any::<bool>())
            .prop_map(|(group_id, stop)| Body::WatchReads(WatchReads { group_id, stop })),
    ];
    option::weighted(0.95, body)
        .prop_map(|body| Frame { body })
        .boxed()
}

/// Any JSON value, up to four levels deep, whose object keys are often from `keys` (the field
/// names of whatever parses it, so the typed parsers are reached with values of every type)
/// and otherwise any text.
pub fn json_value(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (0u64..4).prop_map(Value::from),
        any::<f64>().prop_map(Value::from), // NaN and infinities become null
        text().prop_map(Value::String),
        // Numbers as strings, as the proto3 JSON mapping writes 64-bit integers.
        any::<i64>().prop_map(|n| Value::String(n.to_string())),
        proptest::sample::select(&["MESSAGE_KIND_PRIVATE", "ERROR_CODE_BAD_FRAME", "NaN", ""][..])
            .prop_map(|s| Value::String(s.into())),
    ];
    let key = prop_oneof![
        3 => proptest::sample::select(keys).prop_map(String::from),
        1 => text(),
    ]
    .boxed();
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            vec((key.clone(), inner), 0..6).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// The config of one property: `cases` cases (chosen per property, so the whole set stays
/// well under a minute on CI's two cores), or `PROPTEST_CASES` when that is set, to run more.
/// (`ProptestConfig::with_cases` would ignore the variable.)
pub fn config(cases: u32) -> ProptestConfig {
    // `default()` reads PROPTEST_CASES (and the other PROPTEST_* settings).
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}
