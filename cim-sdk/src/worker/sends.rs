//! Sends in flight: written to the connection ([`submit`]), matched to their results by
//! `client_id` ([`outcome`]), and written again after a reconnect ([`resend`]).

use super::*;

/// A send written to a connection and waiting for its result.
pub(crate) struct InFlight {
    /// The `Send` frame as written, with its `message_id`: what a re-send writes again.
    pub(super) frame: Frame,
    pub(super) reply: oneshot::Sender<Result<SendOutcome, ClientError>>,
    pub(super) deadline: Instant,
}

impl InFlight {
    /// Whether the caller still waits for the result (it has not given up, and its deadline
    /// has not passed).
    fn awaited(&self) -> bool {
        !self.reply.is_closed() && Instant::now() < self.deadline
    }
}

/// Sends waiting for their results, by `client_id`, which increases: iterating re-sends them
/// in the order they were first sent. They outlive a connection: after a reconnect, the ones
/// still awaited are written again (same `message_id`, so the server stores them once).
pub(crate) type PendingSends = BTreeMap<u64, InFlight>;

/// Writes the sends of `pending` again (a new connection), in their original order; the ones
/// no longer awaited are dropped (a caller whose deadline passed is told `Timeout`).
pub(super) async fn resend(live: &mut Live, pending: &mut PendingSends) -> Result<(), ConnError> {
    let gone: Vec<u64> = pending
        .iter()
        .filter(|(_, sent)| !sent.awaited())
        .map(|(id, _)| *id)
        .collect();
    for id in gone {
        if let Some(sent) = pending.remove(&id) {
            // Only a caller still waiting can read this; one that gave up ignores it.
            let _ = sent.reply.send(Err(ClientError::Timeout));
        }
    }
    if pending.is_empty() {
        return Ok(());
    }
    tracing::debug!(sends = pending.len(), "re-sending unanswered sends");
    let conn = &mut live.conn;
    let write_all = async {
        for sent in pending.values() {
            conn.feed(&sent.frame).await?;
        }
        conn.flush().await
    };
    tokio::time::timeout(WRITE_TIMEOUT, write_all)
        .await
        .map_err(|_| ConnError::Timeout)?
}

/// Writes one send to the connection, unless its caller gave up or it is too large. It stays
/// in `pending` until its result arrives, also when the write fails (re-sent on the next
/// connection).
pub(super) async fn submit(
    live: &mut Live,
    transport: Transport,
    command: Command,
    pending: &mut PendingSends,
) -> Result<(), ConnError> {
    let Command {
        send,
        reply,
        deadline,
        signal,
    } = command;
    // A caller told "timed out" must not have its message sent afterwards.
    if reply.is_closed() {
        return Ok(());
    }
    if let Some(frame) = signal {
        write(&mut live.conn, &frame).await?;
        let _ = reply.send(Ok(SendOutcome {
            message_id: String::new(),
            status: pb::SendStatus::Delivered,
            delivered: 0,
            timestamp_ms: 0,
            repeat: false,
            log_seq: 0,
        }));
        return Ok(());
    }
    if Instant::now() >= deadline {
        let _ = reply.send(Err(ClientError::Timeout));
        return Ok(());
    }
    let client_id = send.client_id;
    let frame = Frame::new(Body::Send(send));
    // The server closes a connection that sends an oversized frame: refuse it here instead.
    let len = frame_len(&frame, transport);
    if live.max_frame_len > 0 && len > live.max_frame_len {
        let _ = reply.send(Err(ClientError::Send {
            code: pb::ErrorCode::FrameTooLarge,
            message: format!(
                "the message is {len} bytes encoded, the server accepts at most {}",
                live.max_frame_len
            ),
        }));
        return Ok(());
    }
    let sent = InFlight {
        frame,
        reply,
        deadline,
    };
    pending.insert(client_id, sent);
    write(&mut live.conn, &pending[&client_id].frame).await
}

/// Size of `frame` as the server measures it for `transport`.
pub(super) fn frame_len(frame: &Frame, transport: Transport) -> usize {
    match transport {
        Transport::Tcp | Transport::WsBinary => prost::Message::encoded_len(frame),
        Transport::WsJson => serde_json::to_string(frame).map_or(usize::MAX, |s| s.len()),
    }
}

/// A send result as the API reports it.
pub(super) fn outcome(result: pb::SendResult) -> Result<SendOutcome, ClientError> {
    match result.status() {
        pb::SendStatus::Failed => {
            let error = result.error.unwrap_or_default();
            Err(ClientError::Send {
                code: error.code(),
                message: error.message,
            })
        }
        status => Ok(SendOutcome {
            message_id: result.message_id,
            status,
            delivered: result.delivered,
            timestamp_ms: result.timestamp_ms,
            repeat: result.repeat,
            log_seq: result.log_seq,
        }),
    }
}
