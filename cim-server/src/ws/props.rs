//! Property tests of the server's WebSocket read path: [`parse_json`] (text frames) and
//! [`WsTransport::recv`] behind a real handshake over an in-memory pipe.
//!
//! Cases per run (`PROPTEST_CASES` overrides them): 1,024 for `parse_json` (pure), 256 for
//! whole connections (a runtime, a handshake and up to six messages each; about a second).
//!
//! - any text is a frame or BAD_FRAME, never a panic;
//! - any sequence of messages (text: JSON frames, near-JSON, anything; binary: protobuf frames,
//!   anything; some over `max_frame_len`) reads message by message as a frame, BAD_FRAME or
//!   FRAME_TOO_LARGE, exactly as decoding each one alone says, and then the client's close is
//!   a clean end.

use super::*;
use cim_proto::arb::{self, Enums};
use proptest::{collection::vec, prelude::*};

/// What the server should make of one client message: a frame, or the error it answers.
fn verdict(message: &Message, max: usize) -> Result<Frame, ErrorCode> {
    let too_large = match message {
        Message::Text(t) => t.len() > max,
        Message::Binary(b) => b.len() > max,
        _ => unreachable!("only data messages are generated"),
    };
    if too_large {
        return Err(ErrorCode::FrameTooLarge);
    }
    match message {
        Message::Text(t) => serde_json::from_str(t.as_str()).map_err(|_| ErrorCode::BadFrame),
        Message::Binary(b) => Frame::decode(&b[..]).map_err(|_| ErrorCode::BadFrame),
        _ => unreachable!(),
    }
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        arb::frame(Enums::Known).prop_map(|f| Message::text(serde_json::to_string(&f).unwrap())),
        arb::text().prop_map(Message::text),
        (arb::frame(Enums::Known), any::<usize>()).prop_map(|(f, cut)| {
            let json = serde_json::to_string(&f).unwrap();
            let cut = json
                .char_indices()
                .map(|(i, _)| i)
                .nth(cut % json.len())
                .unwrap_or(0);
            Message::text(json[..cut].to_string())
        }),
        arb::frame(Enums::Any).prop_map(|f| Message::binary(f.encode_to_vec())),
        vec(any::<u8>(), 0..64).prop_map(Message::binary),
        (1usize..3000).prop_map(|n| Message::text(format!(
            "{{\"login\":{{\"token\":\"{}\"}}}}",
            "t".repeat(n)
        ))),
    ]
}

proptest! {
    #![proptest_config(arb::config(1024))]

    #[test]
    fn any_text_is_a_frame_or_bad_frame(text in prop_oneof![
        arb::text(),
        arb::frame(Enums::Known).prop_map(|f| serde_json::to_string(&f).unwrap()),
        "\\{\"(ping|send|ack|push)\":.{0,40}",
    ]) {
        match parse_json(&text) {
            Ok(frame) => prop_assert_eq!(Some(frame), serde_json::from_str::<Frame>(&text).ok()),
            Err(RecvError::Protocol { code, .. }) => prop_assert_eq!(code, ErrorCode::BadFrame),
            Err(e) => prop_assert!(false, "{:?}", e),
        }
    }
}

proptest! {
    #![proptest_config(arb::config(256))]

    #[test]
    fn any_messages_read_one_by_one_as_decoding_says(
        messages in vec(message(), 0..6),
        max in 16usize..2500,
        pipe in 64usize..4096,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let (client_io, server_io) = tokio::io::duplex(pipe);
            let sent = messages.clone();
            let client = tokio::spawn(async move {
                let (mut ws, _) =
                    tokio_tungstenite::client_async("ws://localhost/ws", client_io).await.unwrap();
                for m in sent {
                    if ws.send(m).await.is_err() {
                        return; // the server ended the connection
                    }
                }
                let _ = ws.close(None).await;
                // Answer the server's close (and drain whatever else) until it is gone.
                while let Some(Ok(_)) = ws.next().await {}
            });
            let mut server = accept(server_io, max, &AllowedOrigins::default()).await.unwrap();
            for m in &messages {
                let got = server.recv().await;
                match (verdict(m, max), got) {
                    (Ok(want), Ok(Some(frame))) => prop_assert_eq!(frame, want),
                    (Err(want), Err(RecvError::Protocol { code, .. })) => {
                        prop_assert_eq!(code, want);
                        // The session closes here (with 1009 after a message too large).
                        prop_assert_eq!(server.too_large, want == ErrorCode::FrameTooLarge);
                        server.close(Duration::from_secs(5)).await;
                        drop(server);
                        client.await.unwrap();
                        return Ok(());
                    }
                    (want, got) => prop_assert!(false, "{:?} for {:?}: got {:?}", want, m, got),
                }
            }
            prop_assert!(matches!(server.recv().await, Ok(None)), "the close is a clean end");
            drop(server);
            client.await.unwrap();
            Ok(())
        })?;
    }
}
