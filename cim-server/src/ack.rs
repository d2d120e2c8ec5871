//! Acks: a client acks the stored (private and receipt) messages it received, and they leave
//! its inbox. Sessions hand acks to the [`AckQueue`] without waiting; one task takes whatever
//! is queued (waiting [`LINGER`] for more after the first) and removes it from the inboxes
//! of all those users in one state-store round trip, so acks cost O(1) round trips per
//! batch, not per message or per user. Stored groups are acked by position instead: those
//! wait longer ([`POSITION_LINGER`], or until their connection closes) and leave as each
//! user's highest position per group.
//!
//! Messages that asked for a receipt come back from the store when acked (each once); they
//! are forwarded to a route (`ForwardRequest.receipts`), which stores a RECEIPT message for
//! the original sender and pushes it. Servers hold no routing rules, so the server never
//! pushes receipts itself.
//!
//! Receipts are as durable as private messages: the ack removes the message, but its receipt
//! request stays in the store until the route answers that the receipt is stored
//! (`ForwardResponse.receipts_done`, then `Inbox::receipts_done`). A forward that fails
//! is tried again ([`RECEIPT_ATTEMPTS`], backing off); what still fails, or what a server that
//! stopped first left, is sent again when the receiver next connects (a login queues a
//! pending-receipt check: `Inbox::pending_receipts`). A receipt is stored once however
//! often it is sent (its id derives from the message's).
//!
//! Losing an ack is safe, never wrong: the message stays in the inbox, is replayed at the next
//! connection and de-duplicated by id in the client (at-least-once to the device).

use crate::{conn::ConnShared, forward::RouteCaller};
use cim_common::{
    pb::cluster::{AckedReceipt, ForwardRequest},
    store::{AckedReceipt as StoreReceipt, ServerStore},
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
/// How long group positions may wait in the acker before they are written, unless their
/// connection closes first (then at once). A position only says how far a later login
/// catches up, so holding it costs nothing but re-delivering what came meanwhile if this
/// server dies (at-least-once to the device, ids de-duplicate). Writing each member's
/// position at every push was nearly all of a stored group message's Redis time (one script
/// per online member and push; README, Performance): held, a member's positions of many
/// pushes become one write.
const POSITION_LINGER: std::time::Duration = std::time::Duration::from_millis(500);

/// The acks of one Ack frame, with the connection they came from (its user; a reference
/// rather than a copy of the name, which only receipts need).
pub(crate) struct AckItem {
    pub conn: Arc<ConnShared>,
    pub ids: Vec<String>,
    /// Group positions acked (`(group, seq)`): the user received everything up to `seq`.
    pub groups: Vec<(u64, u64)>,
    /// Also send again the receipts of this user that were acked but never confirmed stored
    /// (a login asks for it).
    pub resend_pending: bool,
    /// The connection closed: write its held group positions now.
    pub closing: bool,
}

impl AckItem {
    /// The acks of one Ack frame.
    pub(crate) fn acks(conn: Arc<ConnShared>, ids: Vec<String>, groups: Vec<(u64, u64)>) -> Self {
        Self {
            conn,
            ids,
            groups,
            resend_pending: false,
            closing: false,
        }
    }

    /// A closed connection's last word: its held group positions are written at once.
    pub(crate) fn closing(conn: Arc<ConnShared>) -> Self {
        Self {
            conn,
            ids: Vec::new(),
            groups: Vec::new(),
            resend_pending: false,
            closing: true,
        }
    }

    /// A login's request to send its user's pending receipts again.
    pub(crate) fn resend_pending(conn: Arc<ConnShared>) -> Self {
        Self {
            conn,
            ids: Vec::new(),
            groups: Vec::new(),
            resend_pending: true,
            closing: false,
        }
    }
}

/// Forwards of one batch of receipts, the first included, before the rest waits for the
/// receiver's next login.
pub(crate) const RECEIPT_ATTEMPTS: u32 = 4;
/// Pause before the second attempt; doubled before each next one.
const RECEIPT_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(500);
/// Pending receipts sent again per login at most (the rest at later logins).
const PENDING_PER_LOGIN: usize = 256;
/// Pending-receipt reads in flight at once after a burst of logins.
const PENDING_READS_AT_ONCE: usize = 16;

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

async fn write_positions(store: &Arc<dyn ServerStore>, positions: Vec<(u64, Vec<(u64, u64)>)>) {
    if positions.is_empty() {
        return;
    }
    if let Err(e) = store.group_ack(&positions).await {
        warn!(error = %e, users = positions.len(), "storing group positions failed: those messages will be caught up again");
    }
}

/// Group positions waiting to be written ([`POSITION_LINGER`]): per user, per group the
/// highest seq acked.
#[derive(Default)]
struct HeldPositions {
    by_user: HashMap<u64, HashMap<u64, u64>>,
    /// When the oldest of them arrived.
    since: Option<tokio::time::Instant>,
}

impl HeldPositions {
    fn add(&mut self, user: u64, groups: Vec<(u64, u64)>) {
        if groups.is_empty() {
            return;
        }
        let held = self.by_user.entry(user).or_default();
        for (group, seq) in groups {
            let at = held.entry(group).or_insert(seq);
            *at = (*at).max(seq);
        }
        self.since.get_or_insert_with(tokio::time::Instant::now);
    }

    /// When the held positions are due (none held: never).
    fn due(&self) -> Option<tokio::time::Instant> {
        self.since.map(|since| since + POSITION_LINGER)
    }

    fn take_user(&mut self, user: u64) -> Option<(u64, Vec<(u64, u64)>)> {
        let held = self.by_user.remove(&user)?;
        if self.by_user.is_empty() {
            self.since = None;
        }
        Some((user, held.into_iter().collect()))
    }

    fn take_all(&mut self) -> Vec<(u64, Vec<(u64, u64)>)> {
        self.since = None;
        self.by_user
            .drain()
            .map(|(user, held)| (user, held.into_iter().collect()))
            .collect()
    }
}

/// Runs until `cancel`, then removes what is still queued and stops.
pub(crate) async fn run(
    rx: AckReceiver,
    store: Arc<dyn ServerStore>,
    routes: Arc<RouteCaller>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let AckReceiver { mut rx, dropped } = rx;
    let mut batch = Vec::new();
    let mut reported = None;
    let mut held = HeldPositions::default();
    loop {
        report_drops(&dropped, &mut reported);
        let due = held.due();
        let n = tokio::select! {
            () = cancel.cancelled() => break,
            n = rx.recv_many(&mut batch, BATCH_MAX) => n,
            () = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                write_positions(&store, held.take_all()).await;
                continue;
            }
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
        apply(
            &store,
            &routes,
            &cancel,
            &tracker,
            std::mem::take(&mut batch),
            &mut held,
        )
        .await;
    }
    // Acks of connections that closed at shutdown: remove them now rather than replaying
    // those messages at the next connection.
    rx.close();
    while let Ok(item) = rx.try_recv() {
        batch.push(item);
    }
    if !batch.is_empty() {
        apply(&store, &routes, &cancel, &tracker, batch, &mut held).await;
    }
    write_positions(&store, held.take_all()).await;
    debug!("acker stopped");
}

async fn apply(
    store: &Arc<dyn ServerStore>,
    routes: &Arc<RouteCaller>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
    mut batch: Vec<AckItem>,
    held: &mut HeldPositions,
) {
    let mut names = HashMap::with_capacity(batch.len());
    let resend: Vec<u64> = batch
        .iter()
        .filter(|item| item.resend_pending)
        .map(|item| item.conn.user_id)
        .collect();
    // Positions wait (see POSITION_LINGER) but those of closed connections, and all of them
    // once the oldest is due.
    let mut positions = Vec::new();
    for item in batch.iter_mut() {
        held.add(item.conn.user_id, std::mem::take(&mut item.groups));
        if item.closing {
            positions.extend(held.take_user(item.conn.user_id));
        }
    }
    if held
        .due()
        .is_some_and(|due| due <= tokio::time::Instant::now())
    {
        positions.extend(held.take_all());
    }
    write_positions(store, positions).await;
    let acks = merge_by_user(batch, &mut names);
    let receipts = if acks.is_empty() {
        Vec::new()
    } else {
        match store.inbox_ack(&acks).await {
            Ok(receipts) => receipts,
            Err(e) => {
                warn!(error = %e, users = acks.len(), "removing acked messages failed: they will be replayed");
                Vec::new()
            }
        }
    };
    if !resend.is_empty() {
        // Off the acker's path: a burst of logins must not delay everyone's acks.
        let (store, routes, cancel) = (store.clone(), routes.clone(), cancel.clone());
        let names = resend_names(&resend, &names);
        tracker.spawn(async move {
            let pending = read_pending(&*store, resend).await;
            if !pending.is_empty() {
                let receipts = with_names(pending, &names);
                forward_receipts(store, routes, cancel, receipts).await;
            }
        });
    }
    if receipts.is_empty() {
        return;
    }
    let receipts = with_names(receipts, &names);
    // In a task of its own: a slow route must not hold up the next acks.
    tracker.spawn(forward_receipts(
        store.clone(),
        routes.clone(),
        cancel.clone(),
        receipts,
    ));
}

/// The names of `users`, from a batch's names.
fn resend_names(users: &[u64], names: &HashMap<u64, String>) -> HashMap<u64, String> {
    users
        .iter()
        .filter_map(|u| names.get(u).map(|n| (*u, n.clone())))
        .collect()
}

/// The pending receipts of `users`, a few store calls at a time.
async fn read_pending(store: &dyn ServerStore, users: Vec<u64>) -> Vec<StoreReceipt> {
    use futures_util::StreamExt;
    futures_util::stream::iter(users)
        .map(|user_id| async move {
            store
                .pending_receipts(user_id, PENDING_PER_LOGIN)
                .await
                .unwrap_or_else(|e| {
                    debug!(user_id, error = %e, "reading pending receipts failed");
                    Vec::new()
                })
        })
        .buffer_unordered(PENDING_READS_AT_ONCE)
        .flat_map(futures_util::stream::iter)
        .collect()
        .await
}

/// The forwarded form of receipts the store gave, acked now by the users `names` names.
fn with_names(receipts: Vec<StoreReceipt>, names: &HashMap<u64, String>) -> Vec<AckedReceipt> {
    let now = now_ms();
    receipts
        .into_iter()
        .map(|r| AckedReceipt {
            receiver_name: names.get(&r.receiver_id).cloned().unwrap_or_default(),
            message_id: r.message_id,
            sender_id: r.sender_id,
            receiver_id: r.receiver_id,
            acked_at_ms: now,
        })
        .collect()
}

/// Forwards `receipts` to a route until each is stored or [`RECEIPT_ATTEMPTS`] were made
/// (not after `cancel`: shutdown does not wait for a backoff). Stored ones are confirmed in the
/// store; the others stay pending there, for the receiver's next login.
async fn forward_receipts(
    store: Arc<dyn ServerStore>,
    routes: Arc<RouteCaller>,
    cancel: CancellationToken,
    mut receipts: Vec<AckedReceipt>,
) {
    let mut pause = RECEIPT_RETRY_FIRST;
    for attempt in 1..=RECEIPT_ATTEMPTS {
        let request = ForwardRequest {
            server_id: routes.server_id().to_string(),
            items: Vec::new(),
            receipts,
        };
        receipts = match routes.call(&request).await {
            Ok(answer) => {
                let (done, left) = split_done(request.receipts, &answer.receipts_done);
                confirm(&*store, &done).await;
                left
            }
            Err(e) => {
                debug!(
                    attempt,
                    receipts = request.receipts.len(),
                    "forwarding receipts failed: {e}"
                );
                request.receipts
            }
        };
        if receipts.is_empty() {
            return;
        }
        if attempt < RECEIPT_ATTEMPTS {
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(pause) => {}
            }
            pause *= 2;
        }
    }
    warn!(
        receipts = receipts.len(),
        "receipts not stored yet: they stay pending and are sent again when their receiver next connects"
    );
}

/// `receipts` split by the route's answer into (done, to send again). An answer without
/// `receipts_done` (a route older than it) counts as done: it cannot say, and sending again
/// forever would be worse than the best effort it gives.
fn split_done(
    receipts: Vec<AckedReceipt>,
    done: &[bool],
) -> (Vec<AckedReceipt>, Vec<AckedReceipt>) {
    if done.is_empty() {
        return (receipts, Vec::new());
    }
    let (done, left): (Vec<_>, Vec<_>) = receipts
        .into_iter()
        .enumerate()
        .partition(|(i, _)| done.get(*i).copied().unwrap_or(false));
    (
        done.into_iter().map(|(_, r)| r).collect(),
        left.into_iter().map(|(_, r)| r).collect(),
    )
}

/// Removes the requests of stored receipts. A failure only means they are sent again later
/// (and stored once).
async fn confirm(store: &dyn ServerStore, done: &[AckedReceipt]) {
    if done.is_empty() {
        return;
    }
    let mut by_receiver: Vec<(u64, Vec<String>)> = Vec::new();
    for r in done {
        match by_receiver
            .iter_mut()
            .find(|(u, ids)| *u == r.receiver_id && ids.len() < MAX_IDS_PER_ACK)
        {
            Some((_, ids)) => ids.push(r.message_id.clone()),
            None => by_receiver.push((r.receiver_id, vec![r.message_id.clone()])),
        }
    }
    if let Err(e) = store.receipts_done(&by_receiver).await {
        debug!(error = %e, "confirming stored receipts failed: they will be sent again");
    }
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
        if item.ids.is_empty() {
            continue;
        }
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
/// The group positions of an Ack frame, bounded like its ids.
pub(crate) fn validate_groups(
    groups: Vec<crate::pb::GroupPosition>,
) -> Result<Vec<(u64, u64)>, String> {
    if groups.len() > MAX_IDS_PER_ACK {
        return Err(format!(
            "an Ack carries at most {MAX_IDS_PER_ACK} group positions, got {}",
            groups.len()
        ));
    }
    Ok(groups
        .into_iter()
        .filter(|g| g.group_id != 0 && g.log_seq != 0)
        .map(|g| (g.group_id, g.log_seq))
        .collect())
}

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

    #[tokio::test(start_paused = true)]
    async fn held_positions_keep_the_highest_per_group_until_due_or_closed() {
        let mut held = HeldPositions::default();
        assert_eq!(held.due(), None);
        let start = tokio::time::Instant::now();
        held.add(1, vec![(10, 5), (11, 2)]);
        held.add(1, vec![(10, 3), (10, 7)]);
        held.add(2, vec![(10, 4)]);
        held.add(3, Vec::new());
        assert_eq!(held.due(), Some(start + POSITION_LINGER));
        tokio::time::advance(POSITION_LINGER / 2).await;
        // A later position does not move the deadline: the oldest sets it.
        held.add(2, vec![(10, 6)]);
        assert_eq!(held.due(), Some(start + POSITION_LINGER));
        let (user, mut groups) = held.take_user(1).expect("user 1 held");
        groups.sort_unstable();
        assert_eq!((user, groups), (1, vec![(10, 7), (11, 2)]));
        assert!(held.take_user(3).is_none(), "nothing acked, nothing held");
        assert_eq!(held.take_all(), vec![(2, vec![(10, 6)])]);
        assert_eq!(held.due(), None);
    }

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
        let item = |user_id, n: usize, tag: &str| {
            AckItem::acks(
                Arc::new(ConnShared::new(
                    user_id,
                    format!("u{user_id}"),
                    "s".into(),
                    8,
                )),
                (0..n).map(|i| format!("{tag}{i}")).collect(),
                Vec::new(),
            )
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
            store::{faulty::FaultyStore, Delivery, Inbox},
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
        let ack = |user: u64, id: &str| {
            AckItem::acks(
                Arc::new(ConnShared::new(user, format!("u{user}"), "s".into(), 8)),
                vec![id.into()],
                Vec::new(),
            )
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
        let item = |id: &str| AckItem::acks(conn.clone(), vec![id.into()], Vec::new());
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
