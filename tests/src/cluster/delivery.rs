//! Streams of numbered private messages, for the delivery tests (restarts, kills, outages):
//! [`TestUser::stream_private`] sends them with a window, [`TestUser::collect_until`]
//! receives them over reconnections, and [`check_stream_delivery`] checks that every
//! accepted message arrived, in order, without unexplained copies.

use super::TestUser;
use anyhow::Context;
use cim_sdk::{
    pb::{self, frame::Body},
    RouteClient,
};
use std::{collections::VecDeque, time::Duration};

/// One message as a [`TestUser`] received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// Which connection of the user got it: 0 for the first, +1 per reconnection.
    pub connection: usize,
    /// It came in a `Push` with `replay` set (from the inbox, at the start of a connection).
    pub replay: bool,
    pub message: pb::Message,
}

/// What [`TestUser::collect_until`] received, over all connections.
#[derive(Debug, Default)]
pub struct Collected {
    pub received: Vec<Received>,
    /// Connections used (1 when the first one lasted).
    pub connections: usize,
    /// For each reconnection: how long from noticing the loss to being connected again.
    pub reconnect_times: Vec<Duration>,
}

/// Outcome of one send of [`TestUser::stream_private`].
#[derive(Debug, Clone)]
pub struct Sent {
    /// The message number: its body is `n.to_string()`.
    pub n: u64,
    /// The id the message has: the client-chosen one scoped by the sender,
    /// `{sender_id}-{chosen}`.
    pub id: String,
    pub result: pb::SendResult,
    /// From writing the Send to reading its result.
    pub latency: Duration,
}

impl Sent {
    /// Delivered or stored: the message must reach its receiver.
    pub fn accepted(&self) -> bool {
        matches!(
            self.result.status(),
            pb::SendStatus::Delivered | pb::SendStatus::Stored
        )
    }
}

/// Counts of [`check_stream_delivery`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryCheck {
    pub accepted: usize,
    pub failed: usize,
    /// Distinct numbered messages received.
    pub received: usize,
    /// Copies received beyond the first (replays after a reconnection, retried pushes).
    pub redelivered: usize,
}

/// Checks what a receiver got from a stream of numbered private messages (the marker body
/// `marker` excluded): every id received was sent, with the body of its number; every
/// accepted message arrived; de-duplicated by id they arrived in send order; and unless
/// `allow_repeats_on_one_connection`, no connection got the same id twice (copies are only
/// allowed from a replay on a later connection).
pub fn check_stream_delivery(
    sent: &[Sent],
    collected: &Collected,
    marker: &str,
    allow_repeats_on_one_connection: bool,
) -> anyhow::Result<DeliveryCheck> {
    use std::collections::{HashMap, HashSet};
    let by_id: HashMap<&str, &Sent> = sent.iter().map(|s| (s.id.as_str(), s)).collect();
    let mut seen: HashSet<&str> = HashSet::new();
    let mut per_connection: HashSet<(usize, &str)> = HashSet::new();
    let mut last_n = None;
    let mut redelivered = 0;
    for r in &collected.received {
        let m = &r.message;
        if m.body == marker {
            continue;
        }
        let s = by_id.get(m.id.as_str()).with_context(|| {
            format!(
                "received id {:?} (body {:?}) that was never sent",
                m.id, m.body
            )
        })?;
        anyhow::ensure!(
            m.body == s.n.to_string(),
            "id {} carries body {:?}, sent as {}",
            m.id,
            m.body,
            s.n
        );
        anyhow::ensure!(
            m.kind() == pb::MessageKind::Private && m.seq != 0,
            "message {} is not a stored private message: {m:?}",
            m.id
        );
        if !per_connection.insert((r.connection, m.id.as_str())) && !allow_repeats_on_one_connection
        {
            anyhow::bail!(
                "message {} (n = {}) arrived twice on connection {}",
                m.id,
                s.n,
                r.connection
            );
        }
        if !seen.insert(m.id.as_str()) {
            redelivered += 1;
            continue;
        }
        if let Some(last) = last_n {
            anyhow::ensure!(
                s.n > last,
                "out of order: {} arrived (first) after {last} (connection {}, replay {})",
                s.n,
                r.connection,
                r.replay
            );
        }
        last_n = Some(s.n);
    }
    let missing: Vec<u64> = sent
        .iter()
        .filter(|s| s.accepted() && !seen.contains(s.id.as_str()))
        .map(|s| s.n)
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "{} accepted messages never arrived: {missing:?}",
        missing.len()
    );
    let accepted = sent.iter().filter(|s| s.accepted()).count();
    Ok(DeliveryCheck {
        accepted,
        failed: sent.len() - accepted,
        received: seen.len(),
        redelivered,
    })
}

impl TestUser {
    /// Streams numbered private messages `numbers` to `to`: message `n` has body
    /// `n.to_string()` and the client-chosen id `id_of(n)`; at most `window` sends are
    /// unanswered at any time. `on_result` sees each outcome as it arrives (to act mid-stream,
    /// e.g. kill a process). Returns every outcome, in send order.
    pub async fn stream_private(
        &mut self,
        to: u64,
        numbers: std::ops::Range<u64>,
        window: usize,
        id_of: impl Fn(u64) -> String,
        mut on_result: impl FnMut(&Sent),
    ) -> anyhow::Result<Vec<Sent>> {
        use std::collections::HashMap;
        let window = window.max(1);
        let mut in_flight: HashMap<u64, (u64, String, std::time::Instant)> = HashMap::new();
        let mut out = Vec::with_capacity(numbers.clone().count());
        let mut next = numbers.start;
        while next < numbers.end || !in_flight.is_empty() {
            while next < numbers.end && in_flight.len() < window {
                let id = id_of(next);
                let client_id = self
                    .submit(pb::Send {
                        kind: pb::MessageKind::Private as i32,
                        to_user_id: to,
                        body: next.to_string(),
                        message_id: id.clone(),
                        ..Default::default()
                    })
                    .await?;
                let id = format!("{}-{id}", self.id());
                in_flight.insert(client_id, (next, id, std::time::Instant::now()));
                next += 1;
            }
            let result = self
                .next_where("a streamed send's result", |f| match &f.body {
                    Some(Body::SendResult(r)) if in_flight.contains_key(&r.client_id) => {
                        Some(r.clone())
                    }
                    _ => None,
                })
                .await?;
            let (n, id, started) = in_flight
                .remove(&result.client_id)
                .expect("picked from in_flight");
            let sent = Sent {
                n,
                id,
                result,
                latency: started.elapsed(),
            };
            on_result(&sent);
            out.push(sent);
        }
        out.sort_by_key(|s| s.n);
        Ok(out)
    }

    /// Receives pushes until a message with body `marker` arrives, acking stored messages
    /// once `ack_lag` newer ones have arrived after them (0: right away; more leaves that
    /// many unacked at any time, for a reconnection to replay). When the connection ends it
    /// logs in again through `route` ([`TestUser::login_again`]) and goes on over the new
    /// connection. `progress` gets the number of messages received so far. Everything must
    /// happen within `deadline`.
    pub async fn collect_until(
        self,
        route: RouteClient,
        marker: &str,
        ack_lag: usize,
        deadline: Duration,
        progress: tokio::sync::watch::Sender<usize>,
    ) -> anyhow::Result<Collected> {
        let end = tokio::time::Instant::now() + deadline;
        let name = self.login.name.clone();
        let transport = self.transport;
        let mut user = self;
        let mut collected = Collected {
            connections: 1,
            ..Default::default()
        };
        // Received, not acked yet (on this connection).
        let mut unacked: VecDeque<String> = VecDeque::new();
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            let push = user.next_push_or_end(left).await.with_context(|| {
                format!(
                    "{name}: {} messages so far, marker {marker:?} not received",
                    collected.received.len()
                )
            })?;
            let Some(push) = push else {
                let lost = std::time::Instant::now();
                let left = end.saturating_duration_since(tokio::time::Instant::now());
                user = TestUser::login_again(&route, &name, transport, left).await?;
                // What was not acked comes again with the replay.
                unacked.clear();
                collected.reconnect_times.push(lost.elapsed());
                collected.connections += 1;
                continue;
            };
            unacked.extend(
                push.messages
                    .iter()
                    .filter(|m| m.seq != 0)
                    .map(|m| m.id.clone()),
            );
            let done = push.messages.iter().any(|m| m.body == marker);
            let keep = if done { 0 } else { ack_lag };
            let ack: Vec<String> = unacked
                .drain(..unacked.len().saturating_sub(keep))
                .collect();
            for message in push.messages {
                collected.received.push(Received {
                    connection: collected.connections - 1,
                    replay: push.replay,
                    message,
                });
            }
            progress.send_replace(collected.received.len());
            if !ack.is_empty() {
                // A failed write means the connection is gone: the next read says so.
                let _ = user.ack(ack).await;
            }
            if done {
                return Ok(collected);
            }
        }
    }
}

/// Waits (polling, within `deadline`) until `user_id`'s inbox holds `len` messages.
pub async fn inbox_len_becomes(
    store: &std::sync::Arc<dyn cim_common::store::StateStore>,
    user_id: u64,
    len: usize,
    deadline: Duration,
) -> anyhow::Result<()> {
    crate::wait_until(
        &format!("inbox of user {user_id} to hold {len} messages"),
        deadline,
        || async move { store.inbox_len(user_id).await.is_ok_and(|n| n == len) },
    )
    .await
}
