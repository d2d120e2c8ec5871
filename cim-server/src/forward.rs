//! Forwarding what clients send to a route: the server holds no routing rules, so every `Send`
//! becomes a [`ForwardItem`] carrying the authenticated sender, batched with others into one
//! `POST /internal/forward` to a live route (found through the registry), and each
//! `SendResult` of the answer goes back to the connection it came from.
//!
//! - [`ForwardQueue`] (in the server state) takes sends from sessions without blocking while
//!   the sender's lane has room. When it is full the session waits for room (up to
//!   `forward_wait_ms`) without reading that connection, so the client is slowed by TCP
//!   flow control instead of being answered OVERLOADED again and again: flat out, refusals
//!   cost as much work as the sends themselves (measured: more refusals than deliveries).
//! - [`Forwarder`] runs `forward_concurrency` lanes. A user's sends always take the same lane
//!   (by user id) and a lane has one call in flight at a time, so one sender's messages reach
//!   the route, the inbox and the receiver in the order they were sent, while different
//!   senders proceed in parallel. A lane takes whatever is queued, up to
//!   `forward_batch_max`, as soon as one item is there: batching adds no latency when idle
//!   and grows under load. Calls carry at most [`BATCH_BYTES`] of sends (a batch of large
//!   messages becomes several calls, in order).
//! - Every item carries a message id before it leaves (the client's `message_id`, or one the
//!   server assigns), and routes store messages idempotently by id. So a call that failed in
//!   any way — refused, timed out, connection lost mid-call — is retried on the next live
//!   route ([`RouteCaller`]) without risking a duplicate.

use crate::{
    conn::{ConnShared, Outbound},
    pb::{
        cluster::{ForwardItem, ForwardRequest, ForwardResponse},
        frame::Body,
        ErrorCode, Frame, Send, SendResult,
    },
};
use cim_common::{
    cluster::ClusterClient,
    ids,
    registry::{MembersRx, ServiceInfo},
};
use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

/// Path of the route's forward endpoint.
pub(crate) const FORWARD_PATH: &str = "/internal/forward";
/// Calls per batch at most (the first and two retries on other routes).
const MAX_ATTEMPTS: usize = 3;
/// Smallest queue of one lane.
pub(crate) const MIN_LANE_QUEUE: usize = 16;
/// Encoded sends per forward call at most (unless one alone is larger): a batch of large
/// messages is split, so a call stays well under the internal body limit
/// ([`cim_common::cluster::MAX_BODY`]) whatever `forward_batch_max` is.
const BATCH_BYTES: usize = 4 * 1024 * 1024;

/// One client send waiting to be forwarded, with the connection that gets its result.
pub(crate) struct Pending {
    pub(crate) conn: Arc<ConnShared>,
    pub(crate) send: Send,
}

/// The submitting side, shared by all sessions: one bounded queue per lane.
pub(crate) struct ForwardQueue {
    lanes: Vec<mpsc::Sender<Pending>>,
}

impl ForwardQueue {
    /// `lanes` queues sharing `capacity` (each at least [`MIN_LANE_QUEUE`]).
    pub(crate) fn new(capacity: usize, lanes: usize) -> (Self, Vec<mpsc::Receiver<Pending>>) {
        let lanes = lanes.max(1);
        let per_lane = capacity.div_ceil(lanes).max(MIN_LANE_QUEUE);
        let (txs, rxs) = (0..lanes).map(|_| mpsc::channel(per_lane)).unzip();
        (Self { lanes: txs }, rxs)
    }

    fn lane(&self, conn: &ConnShared) -> &mpsc::Sender<Pending> {
        // Lanes are few (≤ a few hundred): the remainder fits in usize on every platform.
        &self.lanes[(conn.user_id % self.lanes.len() as u64) as usize]
    }

    /// Queues a send of `conn`'s user on the user's lane. Gives the send back when the lane
    /// is full (or the forwarder stopped), for the caller to answer it.
    pub(crate) fn submit(&self, conn: &Arc<ConnShared>, send: Send) -> Result<(), Send> {
        self.lane(conn)
            .try_send(Pending {
                conn: conn.clone(),
                send,
            })
            .map_err(|e| e.into_inner().send)
    }

    /// Queues `sends` of `conn`'s user in order, waiting up to `wait` in all for room in the
    /// user's lane; they enter it together (a lane's capacity at a time). Returns those that
    /// found no room in time (or the forwarder stopped), in order, for the caller to refuse.
    pub(crate) async fn submit_all_waiting(
        &self,
        conn: &Arc<ConnShared>,
        sends: Vec<Send>,
        wait: Duration,
    ) -> Vec<Send> {
        let lane = self.lane(conn);
        let deadline = tokio::time::Instant::now() + wait;
        let mut left = sends.len();
        let mut sends = sends.into_iter();
        while left > 0 {
            let n = left.min(lane.max_capacity());
            match tokio::time::timeout_at(deadline, lane.reserve_many(n)).await {
                Ok(Ok(permits)) => {
                    for (permit, send) in permits.zip(sends.by_ref()) {
                        permit.send(Pending {
                            conn: conn.clone(),
                            send,
                        });
                    }
                    left -= n;
                }
                Ok(Err(_)) | Err(_) => break,
            }
        }
        sends.collect()
    }
}

/// The address to call on a route: its internal address, or its HTTP address when it
/// serves internal calls there.
fn route_addr(route: &ServiceInfo) -> Option<&str> {
    [&route.internal_addr, &route.http_addr]
        .into_iter()
        .find(|a| !a.is_empty())
        .map(String::as_str)
}

/// Calls `/internal/forward` on live routes: round-robin, and on failure the next one.
pub(crate) struct RouteCaller {
    client: ClusterClient,
    routes: MembersRx,
    server_id: String,
    next: AtomicUsize,
}

impl RouteCaller {
    pub(crate) fn new(client: ClusterClient, routes: MembersRx, server_id: String) -> Self {
        Self {
            client,
            routes,
            server_id,
            next: AtomicUsize::new(0),
        }
    }

    pub(crate) fn server_id(&self) -> &str {
        &self.server_id
    }

    /// Up to [`MAX_ATTEMPTS`] calls, each to the next live route. Safe to repeat because
    /// what a request carries is idempotent by message id. `Err` is the message for clients.
    pub(crate) async fn call(&self, request: &ForwardRequest) -> Result<ForwardResponse, String> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last_error = String::from("no route is registered");
        for attempt in 0..MAX_ATTEMPTS {
            // Re-read the live list each time: a route that just died may have left it.
            let addr = {
                let routes = self.routes.borrow();
                let addrs: Vec<&str> = routes.iter().filter_map(route_addr).collect();
                if addrs.is_empty() {
                    break;
                }
                addrs[start.wrapping_add(attempt) % addrs.len()].to_string()
            };
            match self
                .client
                .call::<_, ForwardResponse>(&addr, FORWARD_PATH, request)
                .await
            {
                Ok(response) => return Ok(response),
                Err(e) => {
                    warn!(route = %addr, attempt = attempt + 1, error = %e, "forward failed, trying the next route");
                    last_error = e.to_string();
                }
            }
        }
        warn!(
            items = request.items.len(),
            receipts = request.receipts.len(),
            "no route took the forward: {last_error}"
        );
        Err(format!("no route reachable, retry later ({last_error})"))
    }
}

/// The lanes' task factory.
pub(crate) struct Forwarder {
    lanes: Vec<mpsc::Receiver<Pending>>,
    caller: Arc<RouteCaller>,
    batch_max: usize,
}

impl Forwarder {
    pub(crate) fn new(
        lanes: Vec<mpsc::Receiver<Pending>>,
        caller: Arc<RouteCaller>,
        batch_max: usize,
    ) -> Self {
        Self {
            lanes,
            caller,
            batch_max,
        }
    }

    /// Runs every lane as a task on `tracker` until `cancel`.
    pub(crate) fn spawn(self, cancel: &CancellationToken, tracker: &TaskTracker) {
        for rx in self.lanes {
            tracker.spawn(run_lane(
                rx,
                self.caller.clone(),
                self.batch_max,
                cancel.clone(),
            ));
        }
    }
}

/// One lane: one batch in flight at a time, the next one gathering meanwhile.
async fn run_lane(
    mut rx: mpsc::Receiver<Pending>,
    caller: Arc<RouteCaller>,
    batch_max: usize,
    cancel: CancellationToken,
) {
    let mut batch = Vec::new();
    loop {
        let n = tokio::select! {
            () = cancel.cancelled() => break,
            n = rx.recv_many(&mut batch, batch_max) => n,
        };
        if n == 0 {
            break; // every sender is gone: the server is being dropped
        }
        for calls in split_by_bytes(std::mem::take(&mut batch), BATCH_BYTES) {
            deliver(&caller, calls).await;
        }
    }
    debug!("forward lane stopped");
}

/// `batch` in order, cut into runs of at most `max_bytes` of encoded sends (a send larger
/// than that goes alone).
fn split_by_bytes(batch: Vec<Pending>, max_bytes: usize) -> Vec<Vec<Pending>> {
    crate::chunks::split_by_size(batch, max_bytes, |p| prost::Message::encoded_len(&p.send))
}

/// Calls routes for one batch, then hands each result to its connection.
async fn deliver(caller: &RouteCaller, batch: Vec<Pending>) {
    let (conns, items): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|p| {
            let mut send = p.send;
            if send.message_id.is_empty() {
                send.message_id = ids::message_id();
            }
            // The sender is the connection's authenticated user, whatever the frame says.
            let item = ForwardItem {
                sender_id: p.conn.user_id,
                sender_name: p.conn.user_name.clone(),
                send: Some(send),
            };
            (p.conn, item)
        })
        .unzip();
    let request = ForwardRequest {
        server_id: caller.server_id().to_string(),
        items,
        receipts: Vec::new(),
    };
    let client_id = |i: usize| {
        request.items[i]
            .send
            .as_ref()
            .map_or(0, |send| send.client_id)
    };
    let results = match caller.call(&request).await {
        Ok(response) => {
            if response.results.len() != conns.len() {
                warn!(
                    sent = conns.len(),
                    answered = response.results.len(),
                    "route answered a different number of results than items"
                );
            }
            let mut answered = response.results.into_iter();
            (0..conns.len())
                .map(|i| {
                    answered.next().unwrap_or_else(|| {
                        SendResult::failed(
                            client_id(i),
                            ErrorCode::Internal,
                            "the route returned no result for this send",
                        )
                    })
                })
                .collect::<Vec<_>>()
        }
        Err(message) => (0..conns.len())
            .map(|i| SendResult::failed(client_id(i), ErrorCode::Unavailable, message.clone()))
            .collect(),
    };
    for (conn, result) in conns.iter().zip(results) {
        // A full queue closes that connection as a slow consumer; nothing else to do here.
        conn.enqueue(Outbound::new(Frame::new(Body::SendResult(result))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_address_prefers_internal() {
        let mut info = ServiceInfo {
            id: "r".into(),
            http_addr: "h:1".into(),
            ..Default::default()
        };
        assert_eq!(route_addr(&info), Some("h:1"));
        info.internal_addr = "i:2".into();
        assert_eq!(route_addr(&info), Some("i:2"));
        assert_eq!(route_addr(&ServiceInfo::default()), None);
    }

    #[test]
    fn large_batches_are_cut_by_bytes_in_order() {
        let conn = Arc::new(ConnShared::new(1, "a".into(), "s".into(), 8));
        let pending = |id: u64, len: usize| Pending {
            conn: conn.clone(),
            send: Send {
                client_id: id,
                body: "x".repeat(len),
                ..Default::default()
            },
        };
        let batch = vec![
            pending(1, 400),
            pending(2, 400),
            pending(3, 2000),
            pending(4, 10),
            pending(5, 10),
        ];
        let runs: Vec<Vec<u64>> = split_by_bytes(batch, 1000)
            .into_iter()
            .map(|run| run.iter().map(|p| p.send.client_id).collect())
            .collect();
        // 1+2 fit; 3 is too large for any run and goes alone; 4+5 fit.
        assert_eq!(runs, [vec![1, 2], vec![3], vec![4, 5]]);
        assert!(split_by_bytes(Vec::new(), 1000).is_empty());
    }

    fn send(client_id: u64) -> Send {
        Send {
            client_id,
            ..Default::default()
        }
    }

    /// User 1's connection, its lane filled with sends 0..MIN_LANE_QUEUE.
    fn full_lane_of_user_1(queue: &ForwardQueue) -> Arc<ConnShared> {
        let conn = Arc::new(ConnShared::new(1, "a".into(), "s".into(), 8));
        for id in 0..MIN_LANE_QUEUE as u64 {
            assert!(queue.submit(&conn, send(id)).is_ok());
        }
        conn
    }

    #[tokio::test(start_paused = true)]
    async fn held_sends_enter_together_once_there_is_room_or_come_back() {
        let (queue, mut lanes) = ForwardQueue::new(1, 1);
        let conn = full_lane_of_user_1(&queue);
        // Full, and nobody drains it: all three come back after the wait, in order.
        let wait = Duration::from_millis(50);
        let refused = queue
            .submit_all_waiting(&conn, vec![send(100), send(101), send(102)], wait)
            .await;
        let ids: Vec<u64> = refused.iter().map(|s| s.client_id).collect();
        assert_eq!(ids, [100, 101, 102]);
        // Room for three: they go in behind what was queued, in order.
        for _ in 0..3 {
            lanes[0].recv().await.unwrap();
        }
        assert!(queue
            .submit_all_waiting(&conn, refused, wait)
            .await
            .is_empty());
        let mut queued = Vec::new();
        while let Ok(p) = lanes[0].try_recv() {
            queued.push(p.send.client_id);
        }
        assert_eq!(queued[queued.len() - 3..], [100, 101, 102]);
        assert_eq!(queued.len(), MIN_LANE_QUEUE);
    }

    #[test]
    fn queue_refuses_when_the_lane_is_full() {
        let (queue, mut lanes) = ForwardQueue::new(1, 2);
        assert_eq!(lanes.len(), 2);
        let conn = full_lane_of_user_1(&queue);
        let refused = queue.submit(&conn, send(99)).unwrap_err();
        assert_eq!(refused.client_id, 99);
        // User 1's sends all went to lane 1, in order; lane 0 is free for user 2.
        assert_eq!(lanes[1].try_recv().unwrap().send.client_id, 0);
        assert!(lanes[0].try_recv().is_err());
        let other = Arc::new(ConnShared::new(2, "b".into(), "s".into(), 8));
        assert!(queue.submit(&other, send(7)).is_ok());
        assert_eq!(lanes[0].try_recv().unwrap().send.client_id, 7);
    }
}
