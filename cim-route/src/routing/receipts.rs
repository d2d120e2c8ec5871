//! Read receipts: a receiver acked a message that asked for one, so its sender gets a
//! RECEIPT message, stored and delivered like a private message ([`route_receipts`], called
//! by `/internal/forward`).

use super::{private::deliver_private, Accepted, Kind};
use crate::state::AppState;
use cim_common::pb::{cluster::AckedReceipt, Message, MessageKind, SendStatus};

/// Prefix of a receipt's message id (followed by the id of the acked message), so a receipt
/// forwarded twice is stored once.
const RECEIPT_ID_PREFIX: &str = "rcpt-";

/// Sends each original sender a RECEIPT message for a message its receiver acked. Receipts
/// are stored and delivered like private messages (so an offline sender gets them later);
/// a receipt forwarded twice is stored once (its id derives from the acked message's).
/// Answers, per receipt, whether it is done (stored, or malformed); the server sends the
/// others again.
pub async fn route_receipts(state: &AppState, receipts: Vec<AckedReceipt>) -> Vec<bool> {
    let servers = state.servers();
    // Malformed requests can never be stored: answered done, so they are not sent again.
    let mut done = vec![true; receipts.len()];
    let mut positions = Vec::with_capacity(receipts.len());
    let run: Vec<Accepted> = receipts
        .into_iter()
        .enumerate()
        .filter(|(_, r)| r.sender_id != 0 && r.receiver_id != 0 && !r.message_id.is_empty())
        .enumerate()
        .map(|(index, (position, r))| {
            positions.push(position);
            Accepted {
                index,
                client_id: 0,
                kind: Kind::Private,
                check_member: false,
                claim: false,
                message: Message {
                    id: format!("{RECEIPT_ID_PREFIX}{}", r.message_id),
                    sender_id: r.receiver_id,
                    sender_name: r.receiver_name,
                    receiver_id: r.sender_id,
                    kind: MessageKind::Receipt as i32,
                    timestamp_ms: r.acked_at_ms,
                    receipt_for: r.message_id,
                    ..Default::default()
                },
            }
        })
        .collect();
    if run.is_empty() {
        return done;
    }
    let results = deliver_private(state, &servers, &run).await;
    let mut outcomes = crate::metrics::Outcomes::default();
    for r in &results {
        outcomes.add(MessageKind::Receipt as usize, r);
    }
    state.metrics().messages(&outcomes);
    let mut failed = 0;
    for (r, &position) in results.iter().zip(&positions) {
        if r.status == SendStatus::Failed as i32 {
            done[position] = false;
            failed += 1;
        }
    }
    if failed > 0 {
        tracing::warn!(
            failed,
            "receipts could not be stored now: their server sends them again"
        );
    }
    done
}
