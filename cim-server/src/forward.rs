//! Forwarding what clients send to a route: the server holds no routing rules, so every `Send`
//! becomes a [`ForwardItem`] carrying the authenticated sender, batched with others into one
//! `POST /internal/forward` to a live route (found through the registry), and each
//! `SendResult` of the answer goes back to the connection it came from.
//!
//! - [`ForwardQueue`] (in the server state) takes sends from sessions without blocking while
//!   the queue has room. When it is full the session waits for room (up to
//!   `forward_wait_ms`) without reading that connection, so the client is slowed by TCP
//!   flow control instead of being answered OVERLOADED again and again: flat out, refusals
//!   cost as much work as the sends themselves (measured: more refusals than deliveries).
//! - [`Forwarder`] (one task) makes the calls: when none is out, whatever waits leaves at
//!   once (no added latency when idle); while calls are out, sends gather for the next one,
//!   and another call opens beside them only for a full batch (`forward_batch_max`), up to
//!   `forward_concurrency` at once. So calls grow with load before they multiply. A user's
//!   sends are never in two calls at once, so one sender's messages reach the route, the
//!   inbox and the receiver in the order they were sent. Calls carry at most
//!   [`BATCH_BYTES`] of sends (a batch of large messages becomes several calls, in order).
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
    registry::{MembersRx, ServiceInfo},
};
use cim_proto::ids;
use futures_util::{stream::FuturesUnordered, StreamExt};
use prometheus_client::metrics::histogram::Histogram;
use std::{
    collections::{HashSet, VecDeque},
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
/// Smallest forward queue.
pub(crate) const MIN_QUEUE: usize = 16;
/// Encoded sends per forward call at most (unless one alone is larger): a batch of large
/// messages is split, so a call stays well under the internal body limit
/// ([`cim_common::cluster::MAX_BODY`]) whatever `forward_batch_max` is.
const BATCH_BYTES: usize = 4 * 1024 * 1024;

/// One client send waiting to be forwarded, with the connection that gets its result.
pub(crate) struct Pending {
    pub(crate) conn: Arc<ConnShared>,
    pub(crate) send: Send,
    /// Instead of the send: a read mark or typing frame for the route to relay (answered
    /// with nothing: the client expects no result).
    pub(crate) signal: Option<Signal>,
}

/// A client frame the route relays to other users ([`ForwardQueue::submit_signal`]).
pub(crate) enum Signal {
    ReadMark(crate::pb::ReadMark),
    Typing(crate::pb::Typing),
}

/// The submitting side, shared by all sessions: one bounded queue.
pub(crate) struct ForwardQueue {
    tx: mpsc::Sender<Pending>,
}

impl ForwardQueue {
    /// A queue of `capacity` sends (at least [`MIN_QUEUE`]), and the forwarder's end of it.
    pub(crate) fn new(capacity: usize) -> (Self, mpsc::Receiver<Pending>) {
        let (tx, rx) = mpsc::channel(capacity.max(MIN_QUEUE));
        (Self { tx }, rx)
    }

    /// Queues a send of `conn`'s user. Gives the send back when the queue is full (or the
    /// forwarder stopped), for the caller to answer it.
    // The refused send goes back whole to be held in order (it is the caller's own value,
    // moved, not copied): boxing it would allocate on the hot path for the rare refusal.
    #[allow(clippy::result_large_err)]
    pub(crate) fn submit(&self, conn: &Arc<ConnShared>, send: Send) -> Result<(), Send> {
        self.tx
            .try_send(Pending {
                conn: conn.clone(),
                send,
                signal: None,
            })
            .map_err(|e| e.into_inner().send)
    }

    /// Queues a read mark or typing frame behind the user's sends; dropped when the queue
    /// is full (a typing indicator is worth nothing late; a read mark is sent again with
    /// the next one, and marks only move forward). Returns whether it was queued.
    pub(crate) fn submit_signal(&self, conn: &Arc<ConnShared>, signal: Signal) -> bool {
        self.tx
            .try_send(Pending {
                conn: conn.clone(),
                send: Send::default(),
                signal: Some(signal),
            })
            .is_ok()
    }

    /// Sends in the queue, not yet taken by the forwarder.
    pub(crate) fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Queues `sends` of `conn`'s user in order, waiting up to `wait` in all for room; they
    /// enter together (the queue's capacity at a time). Returns those that found no room in
    /// time (or the forwarder stopped), in order, for the caller to refuse.
    pub(crate) async fn submit_all_waiting(
        &self,
        conn: &Arc<ConnShared>,
        sends: Vec<Send>,
        wait: Duration,
    ) -> Vec<Send> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut left = sends.len();
        let mut sends = sends.into_iter();
        while left > 0 {
            let n = left.min(self.tx.max_capacity());
            match tokio::time::timeout_at(deadline, self.tx.reserve_many(n)).await {
                Ok(Ok(permits)) => {
                    for (permit, send) in permits.zip(sends.by_ref()) {
                        permit.send(Pending {
                            signal: None,
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
    /// Duration of each call (`cim_server_forward_call_seconds`).
    call_seconds: Histogram,
}

impl RouteCaller {
    pub(crate) fn new(client: ClusterClient, routes: MembersRx, server_id: String) -> Self {
        Self {
            client,
            routes,
            server_id,
            next: AtomicUsize::new(0),
            call_seconds: Histogram::new(std::iter::empty()),
        }
    }

    /// Observes the duration of every call in `histogram`.
    #[must_use]
    pub(crate) fn with_call_seconds(mut self, histogram: Histogram) -> Self {
        self.call_seconds = histogram;
        self
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
            let started = std::time::Instant::now();
            let answer = self
                .client
                .call::<_, ForwardResponse>(&addr, FORWARD_PATH, request)
                .await;
            self.call_seconds.observe(started.elapsed().as_secs_f64());
            match answer {
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

/// The forwarder task's factory.
pub(crate) struct Forwarder {
    rx: mpsc::Receiver<Pending>,
    caller: Arc<RouteCaller>,
    limits: Limits,
}

impl Forwarder {
    pub(crate) fn new(
        rx: mpsc::Receiver<Pending>,
        caller: Arc<RouteCaller>,
        batch_max: usize,
        max_calls: usize,
    ) -> Self {
        Self {
            rx,
            caller,
            limits: Limits {
                batch_max,
                max_calls,
            },
        }
    }

    /// Runs the forwarder as a task on `tracker` until `cancel`.
    pub(crate) fn spawn(self, cancel: &CancellationToken, tracker: &TaskTracker) {
        let caller = self.caller;
        tracker.spawn(run(self.rx, self.limits, cancel.clone(), move |batch| {
            let caller = caller.clone();
            async move {
                for calls in split_by_bytes(batch, BATCH_BYTES) {
                    deliver(&caller, calls).await;
                }
            }
        }));
    }
}

/// How the forwarder batches: sends per call, calls in flight.
#[derive(Clone, Copy, Debug)]
struct Limits {
    batch_max: usize,
    max_calls: usize,
}

/// Sends taken from the queue and not yet in a call, in arrival order, and the users that
/// have sends in a call in flight. A user's sends wait while one of its calls is out, so
/// they reach the route after it: that is the whole per-sender order guarantee.
#[derive(Default)]
struct Waiting {
    sends: VecDeque<Pending>,
    /// Users with sends in a call in flight (a user is in at most one).
    busy: HashSet<u64>,
    /// How many of `sends` belong to users not in `busy`: what a call could take now.
    ready: usize,
}

impl Waiting {
    fn push(&mut self, pending: Pending) {
        if !self.busy.contains(&pending.conn.user_id) {
            self.ready += 1;
        }
        self.sends.push_back(pending);
    }

    /// Takes up to `max` ready sends in order; their users become busy. What stays keeps
    /// its order.
    fn take(&mut self, max: usize) -> Vec<Pending> {
        let mut batch = Vec::with_capacity(self.ready.min(max));
        let mut kept = VecDeque::with_capacity(self.sends.len().saturating_sub(self.ready));
        let mut taken_users = HashSet::new();
        for pending in self.sends.drain(..) {
            let user = pending.conn.user_id;
            // Once the batch is full everything stays, so a user's sends never skip one of
            // its own that stayed.
            if batch.len() < max && !self.busy.contains(&user) {
                taken_users.insert(user);
                batch.push(pending);
            } else {
                kept.push_back(pending);
            }
        }
        self.sends = kept;
        self.busy.extend(taken_users);
        self.recount();
        batch
    }

    /// A call carrying `users`' sends came back: their later sends may go.
    fn release(&mut self, users: &[u64]) {
        for user in users {
            self.busy.remove(user);
        }
        self.recount();
    }

    fn recount(&mut self) {
        self.ready = self
            .sends
            .iter()
            .filter(|p| !self.busy.contains(&p.conn.user_id))
            .count();
    }
}

/// The forwarder: takes sends from `rx` and hands batches of them to `call` (which forwards
/// a batch and answers its senders).
///
/// Calls open as load grows. When no call is out, whatever is waiting leaves at once (an idle
/// server adds no delay). While calls are out, another one opens only for a full batch
/// (`batch_max` ready sends), up to `max_calls`; otherwise sends gather for the next one. So
/// at moderate rates one call at a time carries everything that arrived during the previous
/// one (measured at 10,000 msg/s: a fifth less CPU per message over the whole cluster than
/// four calls at a time, each carrying a quarter as much), and flat out several full calls
/// keep routes busy. A user's sends are never in two calls at once (see [`Waiting`]).
///
/// On `cancel` it takes nothing more, lets the calls in flight finish, and stops.
async fn run<F, Fut>(
    mut rx: mpsc::Receiver<Pending>,
    limits: Limits,
    cancel: CancellationToken,
    call: F,
) where
    F: Fn(Vec<Pending>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let batch_max = limits.batch_max.max(1);
    let max_calls = limits.max_calls.max(1);
    // Sends held here besides the queue: two full batches, so that a full one can form
    // while another waits behind a busy user.
    let hold = 2 * batch_max;
    let mut waiting = Waiting::default();
    let mut calls = FuturesUnordered::new();
    let mut buf = Vec::new();
    let mut open = true;
    loop {
        if cancel.is_cancelled() {
            open = false;
        }
        while open
            && calls.len() < max_calls
            && waiting.ready > 0
            && (calls.is_empty() || waiting.ready >= batch_max)
        {
            let batch = waiting.take(batch_max);
            let users: Vec<u64> = batch.iter().map(|p| p.conn.user_id).collect();
            let call = call(batch);
            calls.push(async move {
                call.await;
                users
            });
        }
        if !open && calls.is_empty() {
            break;
        }
        let room = hold.saturating_sub(waiting.sends.len());
        tokio::select! {
            () = cancel.cancelled(), if open => open = false,
            Some(users) = calls.next(), if !calls.is_empty() => waiting.release(&users),
            n = rx.recv_many(&mut buf, room), if open && room > 0 => {
                if n == 0 {
                    // Every sender is gone: the server is being dropped.
                    open = false;
                }
                for pending in buf.drain(..) {
                    waiting.push(pending);
                }
            }
        }
    }
    debug!("forwarder stopped");
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
            // The sender is the connection's authenticated user, whatever the frame says.
            let mut item = ForwardItem {
                sender_id: p.conn.user_id,
                sender_name: p.conn.user_name.clone(),
                ..Default::default()
            };
            match p.signal {
                Some(Signal::ReadMark(mark)) => item.read_mark = Some(mark),
                Some(Signal::Typing(typing)) => item.typing = Some(typing),
                None => {
                    let mut send = p.send;
                    if send.message_id.is_empty() {
                        send.message_id = ids::message_id();
                    }
                    item.send = Some(send);
                }
            }
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
    for ((conn, result), item) in conns.iter().zip(results).zip(&request.items) {
        if item.send.is_none() {
            continue; // a signal: nothing to answer
        }
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
            signal: None,
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

    fn conn(user_id: u64) -> Arc<ConnShared> {
        Arc::new(ConnShared::new(user_id, "u".into(), "s".into(), 8))
    }

    /// User 1's connection, the queue filled with its sends 0..MIN_QUEUE.
    fn full_queue_of_user_1(queue: &ForwardQueue) -> Arc<ConnShared> {
        let conn = conn(1);
        for id in 0..MIN_QUEUE as u64 {
            assert!(queue.submit(&conn, send(id)).is_ok());
        }
        conn
    }

    #[tokio::test(start_paused = true)]
    async fn held_sends_enter_together_once_there_is_room_or_come_back() {
        let (queue, mut rx) = ForwardQueue::new(1);
        let conn = full_queue_of_user_1(&queue);
        // Full, and nobody drains it: all three come back after the wait, in order.
        let wait = Duration::from_millis(50);
        let refused = queue
            .submit_all_waiting(&conn, vec![send(100), send(101), send(102)], wait)
            .await;
        let ids: Vec<u64> = refused.iter().map(|s| s.client_id).collect();
        assert_eq!(ids, [100, 101, 102]);
        // Room for three: they go in behind what was queued, in order.
        for _ in 0..3 {
            rx.recv().await.unwrap();
        }
        assert!(queue
            .submit_all_waiting(&conn, refused, wait)
            .await
            .is_empty());
        let mut queued = Vec::new();
        while let Ok(p) = rx.try_recv() {
            queued.push(p.send.client_id);
        }
        assert_eq!(queued[queued.len() - 3..], [100, 101, 102]);
        assert_eq!(queued.len(), MIN_QUEUE);
    }

    #[test]
    fn queue_refuses_when_full() {
        let (queue, mut rx) = ForwardQueue::new(1);
        let conn = full_queue_of_user_1(&queue);
        assert_eq!(queue.submit(&conn, send(99)).unwrap_err().client_id, 99);
        assert_eq!(
            queue.submit(&self::conn(2), send(7)).unwrap_err().client_id,
            7
        );
        assert_eq!(rx.try_recv().unwrap().send.client_id, 0);
        // One taken out: room for one more.
        assert!(queue.submit(&self::conn(2), send(7)).is_ok());
    }

    /// A call the forwarder made: (user, client id) of each send in call order, and what
    /// answers it (the call stays out until then).
    type Started = (Vec<(u64, u64)>, tokio::sync::oneshot::Sender<()>);

    /// A forwarder whose calls are held until the test answers them.
    struct Calls {
        queue: ForwardQueue,
        started: mpsc::UnboundedReceiver<Started>,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Calls {
        fn start(batch_max: usize, max_calls: usize) -> Self {
            let (queue, rx) = ForwardQueue::new(64);
            let (tx, started) = mpsc::unbounded_channel();
            let cancel = CancellationToken::new();
            let limits = Limits {
                batch_max,
                max_calls,
            };
            let task = tokio::spawn(run(rx, limits, cancel.clone(), move |batch| {
                let tx = tx.clone();
                async move {
                    let (done, answered) = tokio::sync::oneshot::channel();
                    // (user, client id) of each send, in call order.
                    let sends = batch
                        .iter()
                        .map(|p| (p.conn.user_id, p.send.client_id))
                        .collect();
                    tx.send((sends, done)).unwrap();
                    let _ = answered.await;
                }
            }));
            Self {
                queue,
                started,
                cancel,
                task,
            }
        }

        fn submit(&self, user: u64, ids: std::ops::Range<u64>) {
            let conn = conn(user);
            for id in ids {
                assert!(self.queue.submit(&conn, send(id)).is_ok());
            }
        }

        /// The next call the forwarder made; it stays out until its sender is used. Fails
        /// (instead of hanging) when none starts: the paused clock jumps to the deadline as
        /// soon as every task waits.
        async fn next(&mut self) -> Started {
            tokio::time::timeout(Duration::from_secs(5), self.started.recv())
                .await
                .expect("no call started")
                .expect("forwarder stopped")
        }

        /// One send of `user` on an idle forwarder: it leaves at once, alone. Returns what
        /// answers that call.
        async fn first(&mut self, user: u64) -> tokio::sync::oneshot::Sender<()> {
            self.submit(user, 0..1);
            let (sends, done) = self.next().await;
            assert_eq!(sends, [(user, 0)]);
            done
        }

        /// No call started: checked once every task waits (the clock is paused, so this
        /// sleep ends only when nothing else can run).
        async fn none_started(&mut self) {
            tokio::time::sleep(Duration::from_millis(1)).await;
            assert!(self.started.try_recv().is_err(), "a call started");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_call_at_a_time_until_a_full_batch_waits() {
        let mut calls = Calls::start(4, 2);
        // Idle: a send leaves at once.
        let first_done = calls.first(1).await;
        // While it is out, sends gather: three are not a full batch.
        calls.submit(2, 10..13);
        calls.none_started().await;
        // The fourth makes one: a second call opens beside the first.
        calls.submit(3, 20..21);
        let (second, second_done) = calls.next().await;
        assert_eq!(second, [(2, 10), (2, 11), (2, 12), (3, 20)]);
        // Two out is the most: a further full batch waits for one to come back.
        calls.submit(4, 30..34);
        calls.none_started().await;
        first_done.send(()).unwrap();
        let (third, _third_done) = calls.next().await;
        assert_eq!(third, [(4, 30), (4, 31), (4, 32), (4, 33)]);
        second_done.send(()).unwrap();
        calls.none_started().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_users_sends_never_overtake_its_call_in_flight() {
        let mut calls = Calls::start(4, 4);
        let first_done = calls.first(1).await;
        // User 1's next sends wait for its call; user 2's fill a batch and leave beside it.
        calls.submit(1, 1..3);
        calls.submit(2, 10..14);
        let (second, second_done) = calls.next().await;
        assert_eq!(second, [(2, 10), (2, 11), (2, 12), (2, 13)]);
        // Two ready sends of user 1 now, but calls are out and the batch is not full.
        first_done.send(()).unwrap();
        calls.none_started().await;
        second_done.send(()).unwrap();
        let (third, _) = calls.next().await;
        assert_eq!(third, [(1, 1), (1, 2)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_leaves_the_rest_of_a_users_sends_for_the_next_call() {
        let mut calls = Calls::start(3, 1);
        let first_done = calls.first(9).await;
        // Behind it: user 1's five sends, then user 2's one. A call takes the first three;
        // user 1's last two stay (and so does user 2's send behind them) for the next call.
        calls.submit(1, 1..6);
        calls.submit(2, 10..11);
        first_done.send(()).unwrap();
        let (second, second_done) = calls.next().await;
        assert_eq!(second, [(1, 1), (1, 2), (1, 3)]);
        second_done.send(()).unwrap();
        let (third, _) = calls.next().await;
        assert_eq!(third, [(1, 4), (1, 5), (2, 10)]);
    }

    #[tokio::test(start_paused = true)]
    async fn on_cancel_calls_in_flight_finish_and_nothing_more_leaves() {
        let mut calls = Calls::start(4, 2);
        calls.submit(1, 0..1);
        let (_, done) = calls.next().await;
        calls.submit(2, 10..11);
        calls.cancel.cancel();
        calls.none_started().await;
        assert!(!calls.task.is_finished(), "stopped with a call out");
        done.send(()).unwrap();
        calls.task.await.unwrap();
        assert!(calls.started.try_recv().is_err());
    }
}
