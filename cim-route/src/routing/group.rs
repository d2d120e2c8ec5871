//! Group messages (to everyone online but the sender): one `everyone` push per live server
//! ([`deliver_group`]).

use super::{failed, fanout::fan_out_result, push::push, Accepted};
use crate::state::AppState;
use cim_common::{
    pb::{cluster::Delivery, ErrorCode, SendResult},
    registry::Members,
};
use futures_util::future::join_all;

/// Group messages (to everyone online): ONE push per live server, carrying all of the run's
/// messages as `everyone` deliveries; each server hands every message to all of its
/// logged-in connections but the sender's and answers with counts. Nothing is looked up:
/// who is online is exactly who holds a connection on a live server, and every live server
/// is asked, at the same time. (The first version SCANned the `route:*` keys and MGET the
/// routes page by page, ten sequential Redis rounds and a push list per page for 10,000
/// users; see README, Performance.) A server whose push fails counts zero (logged), like a
/// failed private push (when none answers, the send fails: UNAVAILABLE); a user between
/// two servers may get the message on both or neither,
/// which the not-stored group kind allows.
pub(super) async fn deliver_group(
    state: &AppState,
    servers: &Members,
    run: &[&Accepted],
) -> Vec<SendResult> {
    // Nothing to push (every message was a repeat): no server is asked.
    if run.is_empty() {
        return Vec::new();
    }
    let deliveries: Vec<Delivery> = run
        .iter()
        .map(|a| Delivery {
            message: Some(a.message.clone()),
            recipients: Vec::new(),
            everyone: true,
            ..Default::default()
        })
        .collect();
    let outcomes = join_all(
        servers
            .iter()
            .map(|server| push(state, server, deliveries.clone())),
    )
    .await;
    if !outcomes.is_empty() && outcomes.iter().all(Option::is_none) {
        return run
            .iter()
            .map(|a| {
                failed(
                    a.client_id,
                    ErrorCode::Unavailable,
                    "no connection server answered: the group message reached nobody",
                )
            })
            .collect();
    }
    let mut counts = vec![0u32; run.len()];
    for results in outcomes.into_iter().flatten() {
        for (n, result) in counts.iter_mut().zip(&results) {
            *n = n.saturating_add(u32::try_from(result.count).unwrap_or(u32::MAX));
        }
    }
    run.iter()
        .zip(counts)
        .map(|(a, n)| fan_out_result(a, n, None))
        .collect()
}
