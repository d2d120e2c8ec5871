//! Connections as the rest of the server sees them: the shared handle of one logged-in
//! connection ([`ConnShared`], with its bounded outbound queue), the items in that queue
//! ([`Outbound`]), and the table of connections by user ([`ConnTable`]).
//!
//! Memory matters here more than anywhere (100k+ mostly idle connections per process), so:
//! - the queue is a `Vec` behind a `std::sync::Mutex`: it allocates only while non-empty,
//!   unlike a tokio mpsc channel that preallocates blocks per channel;
//! - an [`Outbound`] is an `Arc`: a message pushed to 10k connections is one allocation,
//!   encoded once per wire format, and each queue holds a pointer.
//!
//! Lock order: the table lock may be held while taking a connection's queue lock, never the
//! other way round. No lock is ever held across an `.await`.

use crate::pb::{Frame, KickReason};
use bytes::Bytes;
use prost::Message;
use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock},
    time::{Duration, Instant},
};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// A frame on its way to one or many connections, encoded lazily and at most once per format.
#[derive(Clone)]
pub(crate) struct Outbound(Arc<Encoded>);

struct Encoded {
    frame: Frame,
    /// Protobuf encoding (TCP, WebSocket binary), without length prefix.
    proto: OnceLock<Bytes>,
    /// proto3 JSON (WebSocket text).
    json: OnceLock<Utf8Bytes>,
}

impl Outbound {
    pub(crate) fn new(frame: Frame) -> Self {
        Outbound(Arc::new(Encoded {
            frame,
            proto: OnceLock::new(),
            json: OnceLock::new(),
        }))
    }

    pub(crate) fn frame(&self) -> &Frame {
        &self.0.frame
    }

    /// The protobuf bytes (computed on first use, then shared).
    pub(crate) fn proto(&self) -> &Bytes {
        self.0
            .proto
            .get_or_init(|| Bytes::from(self.0.frame.encode_to_vec()))
    }

    /// The proto3 JSON text (computed on first use, then shared).
    pub(crate) fn json(&self) -> &Utf8Bytes {
        self.0.json.get_or_init(|| {
            // Serializing generated types to a String cannot fail in practice (no maps with
            // non-string keys, no I/O); if it ever did, send an empty frame rather than panic.
            let text = serde_json::to_string(&self.0.frame).unwrap_or_else(|e| {
                tracing::error!(error = %e, "cannot serialize frame to JSON");
                "{}".to_string()
            });
            Utf8Bytes::from(text)
        })
    }
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Outbound").field(self.frame()).finish()
    }
}

/// Outcome of offering an item to a connection's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Enqueued {
    Queued,
    /// The queue was full: the connection is now closing as a slow consumer.
    Full,
    /// The connection is closing or closed.
    Closed,
}

/// Why and how a connection is being closed by someone other than its session.
#[derive(Debug, Clone)]
pub(crate) struct Closing {
    /// Last frame written to the client (a Kick).
    pub frame: Outbound,
    pub reason: KickReason,
    /// Write the frames already queued before the last one. (A slow consumer does not read
    /// them anyway, so they are dropped.)
    pub flush: bool,
}

#[derive(Default)]
struct QueueState {
    items: Vec<Outbound>,
    closing: Option<Closing>,
    /// The session ended: nothing is accepted anymore.
    closed: bool,
}

/// The handle of one logged-in connection, shared by its session (the only reader of the
/// queue), the table, the forwarder (send results) and the internal API (pushes, kicks).
pub(crate) struct ConnShared {
    pub user_id: u64,
    pub user_name: String,
    /// Login session id (from the connect token).
    pub session: String,
    capacity: usize,
    state: Mutex<QueueState>,
    notify: Notify,
    /// Milliseconds since the Unix epoch of the last typing frame relayed (the per-connection
    /// throttle of typing indicators).
    typing_at: std::sync::atomic::AtomicI64,
}

impl std::fmt::Debug for ConnShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnShared")
            .field("user_id", &self.user_id)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl ConnShared {
    pub(crate) fn new(user_id: u64, user_name: String, session: String, capacity: usize) -> Self {
        Self {
            user_id,
            user_name,
            session,
            capacity,
            state: Mutex::new(QueueState::default()),
            notify: Notify::new(),
            typing_at: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// Whether a typing frame at `now_ms` may be relayed: at most one per `min_gap_ms`
    /// (the rest are dropped, which costs an indicator nothing: clients repeat them).
    pub(crate) fn typing_allowed(&self, now_ms: i64, min_gap_ms: i64) -> bool {
        use std::sync::atomic::Ordering;
        let last = self.typing_at.load(Ordering::Relaxed);
        now_ms.saturating_sub(last) >= min_gap_ms
            && self
                .typing_at
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // A panic while holding this lock cannot leave the queue inconsistent (every critical
        // section is a few field updates), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Offers an item (push, send result). Never blocks. A full queue closes the connection
    /// as a slow consumer: one client that does not read must not make the server buffer
    /// without bound.
    pub(crate) fn enqueue(&self, item: Outbound) -> Enqueued {
        let mut state = self.lock();
        if state.closed || state.closing.is_some() {
            return Enqueued::Closed;
        }
        if state.items.len() >= self.capacity {
            state.closing = Some(Closing {
                frame: Outbound::new(Frame::kick(
                    KickReason::SlowConsumer,
                    "too many undelivered frames: the client did not read fast enough",
                )),
                reason: KickReason::SlowConsumer,
                flush: false,
            });
            drop(state);
            self.notify.notify_one();
            return Enqueued::Full;
        }
        state.items.push(item);
        let first = state.items.len() == 1;
        drop(state);
        // The session drains the whole queue per wake-up, so only the first item of a burst
        // needs to wake it (a stored permit covers a session that is busy right now).
        if first {
            self.notify.notify_one();
        }
        Enqueued::Queued
    }

    /// Queues an answer of the session itself (Pong, Error, ...). It skips the capacity
    /// check: the session produces at most a bounded number per read burst and writes them
    /// before reading more.
    pub(crate) fn reply(&self, frame: Frame) {
        let mut state = self.lock();
        if state.closed {
            return;
        }
        state.items.push(Outbound::new(frame));
        let first = state.items.len() == 1;
        drop(state);
        if first {
            self.notify.notify_one();
        }
    }

    /// Asks the session to write `frame` (a Kick) and close. The first close wins. Returns
    /// false when the connection had already ended.
    pub(crate) fn close(&self, frame: Outbound, reason: KickReason, flush: bool) -> bool {
        let mut state = self.lock();
        if state.closed {
            return false;
        }
        if state.closing.is_none() {
            state.closing = Some(Closing {
                frame,
                reason,
                flush,
            });
        }
        drop(state);
        self.notify.notify_one();
        true
    }

    /// Takes everything queued, and the close request if any. Called by the session only.
    pub(crate) fn take(&self) -> (Vec<Outbound>, Option<Closing>) {
        let mut state = self.lock();
        (std::mem::take(&mut state.items), state.closing.take())
    }

    /// The session ended: refuse everything from now on and free what is queued.
    pub(crate) fn mark_closed(&self) {
        let items = {
            let mut state = self.lock();
            state.closed = true;
            state.closing = None;
            std::mem::take(&mut state.items)
        };
        drop(items);
    }

    /// Completes when something was queued or a close was requested since the last `take`.
    pub(crate) async fn notified(&self) {
        self.notify.notified().await;
    }

    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.lock().items.len()
    }
}

/// Logged-in connections of this server by user id (one per user: a newer connection of the
/// same user replaces the older one).
#[derive(Default)]
pub(crate) struct ConnTable {
    map: RwLock<HashMap<u64, Arc<ConnShared>>>,
    /// The stored groups each connected user's messages come from (kept by user: one
    /// connection per user; dropped when it leaves or is replaced).
    pub(crate) groups: crate::groups::GroupSubs,
    /// Login sessions a route ended (kicked by session) while they had no connection here:
    /// a connection's attach and its entry into the table are two steps, and a route that
    /// saw the attach may end the session in between. The connection then finds its session
    /// here as it enters, and closes. Oldest first; bounded in count and age.
    ended: Mutex<VecDeque<EndedSession>>,
}

/// A login session ended before its connection entered the table.
struct EndedSession {
    user_id: u64,
    session: String,
    at: Instant,
}

/// How long an ended session is remembered: far longer than an attach takes to reach the
/// table, short enough to keep the list small.
const ENDED_KEEP: Duration = Duration::from_secs(10);
/// Most ended sessions remembered (the oldest are forgotten first).
const ENDED_MAX: usize = 4096;

impl ConnTable {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<u64, Arc<ConnShared>>> {
        self.map.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u64, Arc<ConnShared>>> {
        self.map.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a connection; returns the one it replaced.
    pub(crate) fn insert(&self, conn: Arc<ConnShared>) -> Option<Arc<ConnShared>> {
        let user = conn.user_id;
        let old = self.write().insert(user, conn);
        if old.is_some() {
            // The new connection subscribes afresh at its login.
            self.groups.forget_user(user);
        }
        old
    }

    /// Removes the user's entry only if it is still `conn` (a replaced connection closing
    /// late must not remove its successor).
    pub(crate) fn remove_if_same(&self, conn: &Arc<ConnShared>) -> bool {
        let mut map = self.write();
        match map.get(&conn.user_id) {
            Some(current) if Arc::ptr_eq(current, conn) => {
                map.remove(&conn.user_id);
                self.groups.forget_user(conn.user_id);
                true
            }
            _ => false,
        }
    }

    pub(crate) fn get(&self, user_id: u64) -> Option<Arc<ConnShared>> {
        self.read().get(&user_id).cloned()
    }

    fn ended(&self) -> MutexGuard<'_, VecDeque<EndedSession>> {
        self.ended.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The connection of `user_id` if it belongs to login session `session`. When there is
    /// none, the session is remembered as ended, so that a connection of it that is still
    /// between its attach and the table is closed as it enters ([`Self::entered_ended`]).
    pub(crate) fn end_session(&self, user_id: u64, session: &str) -> Option<Arc<ConnShared>> {
        // Held across the lookup: an entry checks the list after it is in the map, so either
        // this finds the connection or the connection finds this record.
        let mut ended = self.ended();
        if let Some(conn) = self.get(user_id).filter(|c| c.session == session) {
            return Some(conn);
        }
        let now = Instant::now();
        while ended
            .front()
            .is_some_and(|e| now.duration_since(e.at) > ENDED_KEEP)
            || ended.len() >= ENDED_MAX
        {
            ended.pop_front();
        }
        ended.push_back(EndedSession {
            user_id,
            session: session.to_string(),
            at: now,
        });
        None
    }

    /// Whether `conn`, just inserted, belongs to a session a route ended before it got here
    /// (see [`Self::end_session`]); it must then close.
    pub(crate) fn entered_ended(&self, conn: &ConnShared) -> bool {
        let ended = self.ended();
        ended
            .iter()
            .any(|e| e.user_id == conn.user_id && e.session == conn.session)
    }

    /// Offers `item` to each recipient connected here; returns those whose queue accepted it.
    /// One table lock for the whole list.
    pub(crate) fn enqueue_many(&self, recipients: &[u64], item: &Outbound) -> Vec<u64> {
        let map = self.read();
        recipients
            .iter()
            .copied()
            .filter(|id| {
                map.get(id)
                    .is_some_and(|conn| conn.enqueue(item.clone()) == Enqueued::Queued)
            })
            .collect()
    }

    /// Offers `item` to every connection here except `except`'s (0: nobody is excepted, no
    /// user has id 0); returns how many queues accepted it. One table lock for the whole
    /// pass, and no list of recipients is built: a message to everyone online costs one
    /// enqueue per connection.
    pub(crate) fn enqueue_all(&self, item: &Outbound, except: u64) -> u64 {
        let map = self.read();
        let mut queued = 0;
        for (&user_id, conn) in map.iter() {
            if user_id != except && conn.enqueue(item.clone()) == Enqueued::Queued {
                queued += 1;
            }
        }
        queued
    }

    /// Every connection (a snapshot).
    pub(crate) fn all(&self) -> Vec<Arc<ConnShared>> {
        self.read().values().cloned().collect()
    }

    /// Logged-in connections.
    pub(crate) fn len(&self) -> usize {
        self.read().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{frame::Body, Ping};

    fn ping(n: u64) -> Outbound {
        Outbound::new(Frame::new(Body::Ping(Ping { nonce: n })))
    }

    #[test]
    fn outbound_encodes_once_and_shares() {
        let a = ping(7);
        let b = a.clone();
        assert!(std::ptr::eq(a.proto().as_ptr(), b.proto().as_ptr()));
        assert_eq!(Frame::decode(a.proto().clone()).unwrap(), *a.frame());
        let json: Frame = serde_json::from_str(b.json().as_str()).unwrap();
        assert_eq!(json, *a.frame());
    }

    #[test]
    fn full_queue_closes_as_slow_consumer() {
        let conn = ConnShared::new(1, "a".into(), "s".into(), 2);
        assert_eq!(conn.enqueue(ping(1)), Enqueued::Queued);
        assert_eq!(conn.enqueue(ping(2)), Enqueued::Queued);
        assert_eq!(conn.enqueue(ping(3)), Enqueued::Full);
        // Closing: nothing more is accepted.
        assert_eq!(conn.enqueue(ping(4)), Enqueued::Closed);
        let (items, closing) = conn.take();
        assert_eq!(items.len(), 2);
        let closing = closing.expect("close requested");
        assert_eq!(closing.reason, KickReason::SlowConsumer);
        assert!(!closing.flush);
    }

    #[test]
    fn closed_connection_refuses_everything() {
        let conn = ConnShared::new(1, "a".into(), "s".into(), 8);
        conn.enqueue(ping(1));
        conn.mark_closed();
        assert_eq!(conn.queued(), 0);
        assert_eq!(conn.enqueue(ping(2)), Enqueued::Closed);
        assert!(!conn.close(ping(0), KickReason::Admin, true));
        conn.reply(Frame::default());
        assert_eq!(conn.queued(), 0);
    }

    #[test]
    fn first_close_wins() {
        let conn = ConnShared::new(1, "a".into(), "s".into(), 8);
        assert!(conn.close(ping(0), KickReason::Replaced, true));
        assert!(conn.close(ping(0), KickReason::Admin, false));
        let (_, closing) = conn.take();
        assert_eq!(closing.unwrap().reason, KickReason::Replaced);
    }

    #[tokio::test]
    async fn enqueue_wakes_the_reader() {
        let conn = Arc::new(ConnShared::new(1, "a".into(), "s".into(), 8));
        let waiter = tokio::spawn({
            let conn = conn.clone();
            async move {
                conn.notified().await;
                conn.take().0.len()
            }
        });
        tokio::task::yield_now().await;
        conn.enqueue(ping(1));
        assert_eq!(waiter.await.unwrap(), 1);
    }

    #[test]
    fn enqueue_all_reaches_every_open_connection_but_the_sender() {
        let table = ConnTable::default();
        let conns: Vec<Arc<ConnShared>> = (1..=4)
            .map(|id| Arc::new(ConnShared::new(id, format!("u{id}"), "s".into(), 8)))
            .collect();
        for c in &conns {
            table.insert(c.clone());
        }
        conns[3].mark_closed();
        // User 2 sent it; user 4's connection is closing: 1 and 3 get it.
        assert_eq!(table.enqueue_all(&ping(9), 2), 2);
        let queued: Vec<usize> = conns.iter().map(|c| c.queued()).collect();
        assert_eq!(queued, [1, 0, 1, 0]);
        // From the system (sender 0): nobody is skipped.
        assert_eq!(table.enqueue_all(&ping(10), 0), 3);
        assert_eq!(conns[1].queued(), 1);
    }

    #[test]
    fn a_session_ended_before_its_connection_entered_is_refused_as_it_enters() {
        let table = ConnTable::default();
        let live = Arc::new(ConnShared::new(5, "a".into(), "s1".into(), 8));
        table.insert(live.clone());
        // A connection of the session: found, nothing remembered.
        assert!(table
            .end_session(5, "s1")
            .is_some_and(|c| Arc::ptr_eq(&c, &live)));
        assert!(!table.entered_ended(&live));
        // Another session of the user, not here yet: remembered, and refused as it enters;
        // other sessions and users are not.
        assert!(table.end_session(5, "s2").is_none());
        let late = ConnShared::new(5, "a".into(), "s2".into(), 8);
        assert!(table.entered_ended(&late));
        assert!(!table.entered_ended(&ConnShared::new(5, "a".into(), "s3".into(), 8)));
        assert!(!table.entered_ended(&ConnShared::new(6, "b".into(), "s2".into(), 8)));
        // Bounded: the oldest are forgotten first.
        for i in 0..ENDED_MAX {
            table.end_session(7, &format!("x{i}"));
        }
        assert_eq!(table.ended().len(), ENDED_MAX);
        assert!(!table.entered_ended(&late));
    }

    #[test]
    fn table_replaces_and_removes_only_itself() {
        let table = ConnTable::default();
        let old = Arc::new(ConnShared::new(5, "a".into(), "s1".into(), 8));
        let new = Arc::new(ConnShared::new(5, "a".into(), "s2".into(), 8));
        assert!(table.insert(old.clone()).is_none());
        let replaced = table.insert(new.clone()).expect("old one replaced");
        assert!(Arc::ptr_eq(&replaced, &old));
        assert!(!table.remove_if_same(&old));
        assert_eq!(table.get(5).unwrap().session, "s2");
        let delivered = table.enqueue_many(&[5, 6], &ping(1));
        assert_eq!(delivered, vec![5]);
        assert_eq!(new.queued(), 1);
        assert!(table.remove_if_same(&new));
        assert_eq!(table.len(), 0);
    }
}
