//! Broadcast claims: group and channel messages are not stored, so the ids that may repeat
//! are claimed before anything is pushed, and a repeat is answered instead of delivered
//! again ([`deliver_broadcasts`], which then hands the fresh ones to [`super::group`] or
//! [`super::channels`]).

use super::{
    accepted_result, all_answered, channels::deliver_channels, group::deliver_group, unavailable,
    Accepted, Kind,
};
use crate::state::AppState;
use cim_common::{
    pb::{SendResult, SendStatus},
    registry::Members,
};

/// How long a broadcast's id is claimed: a repeat within it is answered, not delivered. It
/// covers every retry cim itself makes (the SDK's resend within its 10 s send deadline, a
/// server's forward retry within its timeouts) with room to spare, and bounds the claims
/// kept to one minute of broadcasts.
pub const BROADCAST_CLAIM_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// Group and channel messages of one run. They are not stored, so nothing else would stop a
/// retry from reaching everyone a second time: the SDK resending a send whose connection
/// died before its result came, a server retrying a forward on another route, a backend
/// retrying a POST. So the ids that may repeat ([`Accepted::claim`]) are claimed first, in
/// ONE store round trip for the run: a repeat is answered `DELIVERED` with the first send's
/// timestamp and `delivered = 0` (the first send did the delivering) and pushed to nobody.
/// A broadcast that reached nobody (refused, or no server answered) gives its claim back,
/// so that a retry can still deliver it. When the claim cannot be made the messages fail
/// with `UNAVAILABLE`: never duplicated outranks delivered during a store outage.
pub(super) async fn deliver_broadcasts(
    state: &AppState,
    servers: &Members,
    run: &[Accepted],
) -> Vec<SendResult> {
    let mut results: Vec<Option<SendResult>> = vec![None; run.len()];
    let claimed: Vec<usize> = (0..run.len()).filter(|&p| run[p].claim).collect();
    if !claimed.is_empty() {
        let claims: Vec<(String, i64)> = claimed
            .iter()
            .map(|&p| (run[p].message.id.clone(), run[p].message.timestamp_ms))
            .collect();
        match state
            .store()
            .claim_broadcasts(&claims, BROADCAST_CLAIM_TTL)
            .await
        {
            Ok(previous) => {
                for (&p, first) in claimed.iter().zip(previous) {
                    if let Some(timestamp_ms) = first {
                        let mut repeat = accepted_result(&run[p], SendStatus::Delivered, 0);
                        repeat.timestamp_ms = timestamp_ms;
                        repeat.repeat = true;
                        results[p] = Some(repeat);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "claiming broadcast ids failed");
                for &p in &claimed {
                    results[p] = Some(unavailable(run[p].client_id));
                }
            }
        }
    }

    let fresh: Vec<usize> = (0..run.len()).filter(|&p| results[p].is_none()).collect();
    let to_deliver: Vec<&Accepted> = fresh.iter().map(|&p| &run[p]).collect();
    // Still runs of one kind: `run` is.
    let outcomes = match run[0].kind {
        Kind::Channel => deliver_channels(state, servers, &to_deliver).await,
        _ => deliver_group(state, servers, &to_deliver).await,
    };
    let mut release = Vec::new();
    for (p, outcome) in fresh.into_iter().zip(outcomes) {
        // A failure with no message id reached nobody (see `fan_out_result`).
        if run[p].claim
            && outcome.status == SendStatus::Failed as i32
            && outcome.message_id.is_empty()
        {
            release.push(run[p].message.id.clone());
        }
        results[p] = Some(outcome);
    }
    if !release.is_empty() {
        if let Err(e) = state.store().release_broadcasts(&release).await {
            // Their retries within the claim's time are answered as repeats: logged, as the
            // sender was told the message failed.
            tracing::warn!(error = %e, ids = release.len(), "releasing broadcast claims failed");
        }
    }
    all_answered(results)
}
