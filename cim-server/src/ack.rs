//! Acks: a client acks the stored (private and receipt) messages it received, and they leave
//! its inbox. Sessions hand acks to the [`AckQueue`] without waiting; one task takes whatever
//! is queued (waiting [`LINGER`] for more after the first) and removes it from the inboxes
//! of all those users in one state-store round trip, so acks cost O(1) round trips per
//! batch, not per message or per user.
//!
//! Messages that asked for a receipt come back from the store when acked (each once); they
//! are forwarded to a route (`ForwardRequest.receipts`), which sends the original sender a
//! RECEIPT message. Servers hold no routing rules, so the server never pushes receipts itself.
//!
//! Losing an ack is safe, never wrong: the message stays in the inbox, is replayed at the next
//! connection and de-duplicated by id in the client (at-least-once to the device).

use crate::{conn::ConnShared, forward::RouteCaller};
use cim_common::{
    pb::cluster::{AckedReceipt, ForwardRequest},
    store::StateStore,
    time::now_ms,
};
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

/// Most message ids one Ack frame may carry.
pub(crate) const MAX_IDS_PER_ACK: usize = 1024;
/// Longest id worth looking up (stored ids are at most 64 characters; receipts add a prefix).
pub(crate) const MAX_ID_LEN: usize = 128;
/// Ack frames waiting for the acker at most.
pub(crate) const QUEUE_CAPACITY: usize = 16_384;
/// Ack frames removed per store call at most.
const BATCH_MAX: usize = 512;
/// How long the acker waits for more acks once one arrived, unless it has [`BATCH_MAX`].
/// Nobody waits on an ack but a receipt's sender, so a few milliseconds cost nothing users
/// see, and they turn one store round trip (and one wake-up of Redis and of this server) per
/// ack into one per batch at any rate (measured at 10,000 msg/s: see README, Performance).
const LINGER: std::time::Duration = std::time::Duration::from_millis(5);

/// The acks of one Ack frame, with the connection they came from (its user; a reference
/// rather than a copy of the name, which only receipts need).
pub(crate) struct AckItem {
    pub conn: Arc<ConnShared>,
    pub ids: Vec<String>,
}

/// The submitting side, shared by all sessions.
pub(crate) struct AckQueue {
    tx: mpsc::Sender<AckItem>,
    /// Ack frames dropped because the queue was full, not yet reported.
    dropped: Arc<AtomicU64>,
    /// All ack frames dropped (`cim_server_acks_dropped_total`).
    dropped_total: prometheus_client::metrics::counter::Counter,
}

impl AckQueue {
    pub(crate) fn new(capacity: usize) -> (Self, AckReceiver) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        (
            Self {
                tx,
                dropped: dropped.clone(),
                dropped_total: Default::default(),
            },
            AckReceiver { rx, dropped },
        )
    }

    /// Queues acks without waiting. When the queue is full they are dropped (counted, and
    /// logged by the acker at most every [`DROP_REPORT_EVERY`]): the messages stay in the
    /// inbox and come again at the next connection.
    pub(crate) fn submit(&self, item: AckItem) {
        if self.tx.try_send(item).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.dropped_total.inc();
        }
    }

    /// Counts every dropped ack frame in `counter` too.
    pub(crate) fn count_drops_in(&mut self, counter: prometheus_client::metrics::counter::Counter) {
        self.dropped_total = counter;
    }
}

/// The acker's side of the queue.
pub(crate) struct AckReceiver {
    pub(crate) rx: mpsc::Receiver<AckItem>,
    dropped: Arc<AtomicU64>,
}

/// Drops of acks are logged at most this often (with their count), however many there are.
const DROP_REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Logs the acks dropped since the last report, when there are any and the last report is
/// at least [`DROP_REPORT_EVERY`] old.
fn report_drops(dropped: &AtomicU64, last: &mut Option<tokio::time::Instant>) {
    let now = tokio::time::Instant::now();
    if last.is_some_and(|at| now < at + DROP_REPORT_EVERY) {
        return;
    }
    let n = dropped.swap(0, Ordering::Relaxed);
    if n > 0 {
        warn!(
            frames = n,
            "ack queue full: acks dropped, those messages stay in the inboxes and are replayed at the next connection"
        );
        *last = Some(now);
    }
}

/// Runs until `cancel`, then removes what is still queued and stops.
pub(crate) async fn run(
    rx: AckReceiver,
    store: Arc<dyn StateStore>,
    routes: Arc<RouteCaller>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let AckReceiver { mut rx, dropped } = rx;
    let mut batch = Vec::new();
    let mut reported = None;
    loop {
        report_drops(&dropped, &mut reported);
        let n = tokio::select! {
            () = cancel.cancelled() => break,
            n = rx.recv_many(&mut batch, BATCH_MAX) => n,
        };
        if n == 0 {
            break;
        }
        if batch.len() < BATCH_MAX {
            // Cancelled meanwhile: this batch is applied now, the loop ends next time round.
            tokio::select! {
                () = cancel.cancelled() => {}
                () = tokio::time::sleep(LINGER) => {}
            }
            while batch.len() < BATCH_MAX {
                match rx.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
            }
        }
        apply(&*store, &routes, &tracker, std::mem::take(&mut batch)).await;
    }
    // Acks of connections that closed at shutdown: remove them now rather than replaying
    // those messages at the next connection.
    rx.close();
    while let Ok(item) = rx.try_recv() {
        batch.push(item);
    }
    if !batch.is_empty() {
        apply(&*store, &routes, &tracker, batch).await;
    }
    debug!("acker stopped");
}

async fn apply(
    store: &dyn StateStore,
    routes: &Arc<RouteCaller>,
    tracker: &TaskTracker,
    batch: Vec<AckItem>,
) {
    let mut names = HashMap::with_capacity(batch.len());
    let acks = merge_by_user(batch, &mut names);
    let receipts = match store.inbox_ack(&acks).await {
        Ok(receipts) => receipts,
        Err(e) => {
            warn!(error = %e, users = acks.len(), "removing acked messages failed: they will be replayed");
            return;
        }
    };
    if receipts.is_empty() {
        return;
    }
    let now = now_ms();
    let request = ForwardRequest {
        server_id: routes.server_id().to_string(),
        items: Vec::new(),
        receipts: receipts
            .into_iter()
            .map(|r| AckedReceipt {
                receiver_name: names.get(&r.receiver_id).cloned().unwrap_or_default(),
                message_id: r.message_id,
                sender_id: r.sender_id,
                receiver_id: r.receiver_id,
                acked_at_ms: now,
            })
            .collect(),
    };
    // In a task of its own: a slow route must not hold up the next acks.
    let routes = routes.clone();
    tracker.spawn(async move {
        if let Err(e) = routes.call(&request).await {
            warn!(
                receipts = request.receipts.len(),
                "receipts could not be forwarded and are lost: {e}"
            );
        }
    });
}

/// One entry per user (several when a user's ids exceed what one entry may carry), in
/// first-seen order: the store pays its per-user cost once per batch, not once per frame.
fn merge_by_user(batch: Vec<AckItem>, names: &mut HashMap<u64, String>) -> Vec<(u64, Vec<String>)> {
    let mut acks: Vec<(u64, Vec<String>)> = Vec::with_capacity(batch.len());
    let mut open: HashMap<u64, usize> = HashMap::with_capacity(batch.len());
    for item in batch {
        let user_id = item.conn.user_id;
        names
            .entry(user_id)
            .or_insert_with(|| item.conn.user_name.clone());
        match open.get(&user_id) {
            Some(&i) if acks[i].1.len() + item.ids.len() <= MAX_IDS_PER_ACK => {
                acks[i].1.extend(item.ids);
            }
            _ => {
                open.insert(user_id, acks.len());
                acks.push((user_id, item.ids));
            }
        }
    }
    acks
}

/// Why an Ack frame is refused, or `Ok` with the ids worth acking.
pub(crate) fn validate(ids: Vec<String>) -> Result<Vec<String>, String> {
    if ids.len() > MAX_IDS_PER_ACK {
        return Err(format!(
            "an Ack carries at most {MAX_IDS_PER_ACK} message ids, got {}",
            ids.len()
        ));
    }
    if ids.iter().any(|id| id.is_empty() || id.len() > MAX_ID_LEN) {
        return Err(format!(
            "message ids in an Ack are 1 to {MAX_ID_LEN} bytes long"
        ));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_frames_are_bounded() {
        assert_eq!(validate(vec!["a".into()]).unwrap(), vec!["a".to_string()]);
        assert!(validate(vec![String::new()]).is_err());
        assert!(validate(vec!["x".repeat(MAX_ID_LEN + 1)]).is_err());
        assert!(validate(vec!["a".into(); MAX_IDS_PER_ACK]).is_ok());
        assert!(validate(vec!["a".into(); MAX_IDS_PER_ACK + 1]).is_err());
    }

    #[test]
    fn acks_merge_per_user_within_the_per_entry_limit() {
        let item = |user_id, n: usize, tag: &str| AckItem {
            conn: Arc::new(ConnShared::new(
                user_id,
                format!("u{user_id}"),
                "s".into(),
                8,
            )),
            ids: (0..n).map(|i| format!("{tag}{i}")).collect(),
        };
        let mut names = HashMap::new();
        let acks = merge_by_user(
            vec![
                item(1, 2, "a"),
                item(2, 1, "b"),
                item(1, 1, "c"),
                item(1, MAX_IDS_PER_ACK, "d"),
            ],
            &mut names,
        );
        let shape: Vec<(u64, usize)> = acks.iter().map(|(u, ids)| (*u, ids.len())).collect();
        assert_eq!(shape, [(1, 3), (2, 1), (1, MAX_IDS_PER_ACK)]);
        assert_eq!(acks[0].1, ["a0", "a1", "c0"]);
        assert_eq!(names[&2], "u2");
    }

    /// Acks that arrive while the acker lingers leave in the same store call.
    #[tokio::test(start_paused = true)]
    async fn acks_arriving_within_the_linger_share_one_round_trip() {
        use cim_common::{
            registry::Members,
            store::{faulty::FaultyStore, StateStore},
        };
        let store = Arc::new(FaultyStore::default());
        let message = |user: u64, id: &str| cim_common::pb::Message {
            id: id.into(),
            receiver_id: user,
            timestamp_ms: now_ms(),
            ..Default::default()
        };
        store
            .inbox_store(&mut [message(1, "a"), message(2, "b"), message(3, "c")])
            .await
            .unwrap();
        let (_routes_tx, routes_rx) = tokio::sync::watch::channel(Members::default());
        let routes = Arc::new(RouteCaller::new(
            cim_common::cluster::ClusterClient::new("secret", std::time::Duration::from_secs(1)),
            routes_rx,
            "server-test01".into(),
        ));
        let (queue, rx) = AckQueue::new(16);
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let acker = tokio::spawn(run(
            rx,
            store.clone(),
            routes,
            cancel.clone(),
            tracker.clone(),
        ));
        let ack = |user: u64, id: &str| AckItem {
            conn: Arc::new(ConnShared::new(user, format!("u{user}"), "s".into(), 8)),
            ids: vec![id.into()],
        };
        queue.submit(ack(1, "a"));
        // The acker takes the first ack and lingers (the paused clock stands still until
        // every task waits); the others arrive meanwhile.
        tokio::task::yield_now().await;
        queue.submit(ack(2, "b"));
        queue.submit(ack(3, "c"));
        store.acked.notified().await;
        assert_eq!(store.ack_calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        for user in [1, 2, 3] {
            assert_eq!(store.inbox_len(user).await.unwrap(), 0, "user {user}");
        }
        cancel.cancel();
        acker.await.unwrap();
    }

    #[test]
    fn a_full_queue_drops_instead_of_blocking() {
        let (queue, mut rx) = AckQueue::new(1);
        let conn = Arc::new(ConnShared::new(1, "a".into(), "s".into(), 8));
        let item = |id: &str| AckItem {
            conn: conn.clone(),
            ids: vec![id.into()],
        };
        queue.submit(item("1"));
        queue.submit(item("2"));
        queue.submit(item("3"));
        assert_eq!(rx.rx.try_recv().unwrap().ids, vec!["1".to_string()]);
        assert!(rx.rx.try_recv().is_err());
        // Counted for the acker's report, which takes the count.
        assert_eq!(rx.dropped.load(Ordering::Relaxed), 2);
        let mut last = None;
        report_drops(&rx.dropped, &mut last);
        assert!(last.is_some());
        assert_eq!(rx.dropped.load(Ordering::Relaxed), 0);
    }
}
