//! Writing to the client: a burst under the write deadline ([`write`], counted by frame
//! kind), and the last Error frame of a session that fails ([`fail`], and
//! [`fail_after_queued`] once logged in, which writes what is queued first).

use super::{End, Transport};
use crate::{
    conn::{ConnShared, Outbound},
    metrics::Tally,
    pb::{ErrorCode, Frame},
    server::ServerState,
};
use std::time::Duration;

/// Writes a burst under the write deadline (counted in `cim_server_frames_out_total`, by
/// kind, whether or not the write then succeeds).
pub(super) async fn write<T: Transport>(
    state: &ServerState,
    transport: &mut T,
    items: &[Outbound],
    timeout: Duration,
) -> Result<(), String> {
    {
        // Scoped: the tally is not kept in the future across the write.
        let mut tally = Tally::default();
        for item in items {
            tally.add(item.frame());
        }
        tally.flush(&state.metrics.frames_out);
    }
    // Boxed: a write is short-lived, and its timer and buffers inline would enlarge the
    // session future that every idle connection keeps.
    match Box::pin(tokio::time::timeout(timeout, transport.send(items))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "write timed out after {} ms (client not reading)",
            timeout.as_millis()
        )),
    }
}

/// Sends a last Error frame (best effort: the connection closes anyway).
pub(super) async fn fail<T: Transport>(
    state: &ServerState,
    transport: &mut T,
    code: ErrorCode,
    message: String,
) -> End {
    let frame = Outbound::new(Frame::error(code, message.clone()));
    let _ = write(state, transport, &[frame], state.config.write_timeout()).await;
    End::Failed(code, message)
}

/// [`fail`] for a logged-in connection: what is already queued (answers to the frames
/// before the bad one, deliveries) is written first.
pub(super) async fn fail_after_queued<T: Transport>(
    state: &ServerState,
    transport: &mut T,
    conn: &ConnShared,
    code: ErrorCode,
    message: String,
) -> End {
    let (mut items, _) = conn.take();
    items.push(Outbound::new(Frame::error(code, message.clone())));
    let _ = write(state, transport, &items, state.config.write_timeout()).await;
    End::Failed(code, message)
}
