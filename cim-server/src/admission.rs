//! Admission: how many client connections a server holds, and how many of them may be
//! logging in at once.
//!
//! Every accepted connection takes a [`Ticket`] before anything is spawned for it; the ticket
//! counts it until the connection's task ends (cleanup included), and as *pending* until it
//! logs in ([`Ticket::logged_in`]). Over `max_connections` or `max_pending_logins` the
//! connection is refused at once, with a reason where that is cheap ([`refusal`]): an Error
//! frame `SERVER_FULL` on plain TCP, an HTTP 503 on plain WebSocket; TLS connections are
//! closed without a word (a handshake to say it would cost what the cap is there to save).
//! The refusal is written at accept without waiting (a new socket's send buffer is empty);
//! then at most [`REFUSERS`] tasks at once, each for at most [`REFUSAL_LINGER`], read what
//! the refused clients sent until they close, so that the close does not reset the
//! connection before the client read why. Past that a refused connection is closed at once,
//! so a flood costs a bounded amount.
//!
//! The pending cap keeps sockets that never log in (a flood, a slowloris) from taking the
//! room of users: they are closed at the login deadline, and until then at most
//! `max_pending_logins` exist, each with a read buffer of at most `pre_login_frame_len`
//! (TCP; a WebSocket's is bounded by `max_frame_len`).

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};
use std::time::Duration;
use tokio::sync::Semaphore;

/// Refused connections lingering at once, at most.
pub(crate) const REFUSERS: usize = 256;
/// How long a refused connection lingers for its client to read the refusal and close.
pub(crate) const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Why a connection was refused (the `reason` of `cim_server_connections_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `max_connections` are open.
    Full,
    /// `max_pending_logins` are logging in.
    Pending,
}

impl Refused {
    /// Label values, by `Refused as usize`.
    pub(crate) const LABELS: [&'static str; 2] = ["full", "pending_logins"];

    pub(crate) fn message(self) -> &'static str {
        match self {
            Self::Full => "server full: too many connections; log in again to be sent elsewhere",
            Self::Pending => "server busy: too many connections logging in; retry shortly",
        }
    }
}

/// The counts and caps of one server.
pub(crate) struct Admission {
    max_open: usize,
    max_pending: usize,
    open: AtomicUsize,
    pending: AtomicUsize,
    /// Permits of the tasks that write refusals.
    pub(crate) refusers: Arc<Semaphore>,
}

impl Admission {
    pub(crate) fn new(max_open: usize, max_pending: usize) -> Arc<Self> {
        Arc::new(Self {
            max_open,
            max_pending,
            open: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            refusers: Arc::new(Semaphore::new(REFUSERS)),
        })
    }

    /// A ticket for one more connection, or why there is no room.
    pub(crate) fn admit(self: &Arc<Self>) -> Result<Ticket, Refused> {
        // Taken first, then checked: concurrent accepts never overshoot the caps.
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max_open {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Full);
        }
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Pending);
        }
        Ok(Ticket(self.clone()))
    }

    /// Connections holding a ticket.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Connections holding a ticket that have not logged in.
    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }
}

/// One admitted connection that has not logged in; dropping it frees its place. One pointer:
/// every idle connection's future keeps its ticket.
pub(crate) struct Ticket(Arc<Admission>);

impl Ticket {
    /// The connection logged in: it no longer counts against the pending cap.
    pub(crate) fn logged_in(self) -> Admitted {
        let admission = self.0.clone();
        drop(self);
        // The ticket's drop gave back both places; the connection keeps one.
        admission.open.fetch_add(1, Ordering::AcqRel);
        Admitted(admission)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One admitted connection that logged in; dropping it frees its place.
pub(crate) struct Admitted(Arc<Admission>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a refused connection is told, by transport: the bytes to write (`None`: nothing,
/// just close).
pub(crate) fn refusal(why: Refused, websocket: bool, tls: bool) -> Option<Vec<u8>> {
    if tls {
        return None;
    }
    let message = why.message();
    if websocket {
        let body = format!("{message}\n");
        return Some(
            format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
                 Retry-After: 1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        );
    }
    let code = match why {
        Refused::Full => crate::pb::ErrorCode::ServerFull,
        Refused::Pending => crate::pb::ErrorCode::Overloaded,
    };
    let frame = crate::pb::Frame::error(code, message);
    let mut out = bytes::BytesMut::new();
    cim_proto::codec::encode_frame(&frame, &mut out);
    Some(out.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_and_tickets_give_their_place_back() {
        let admission = Admission::new(3, 2);
        let a = admission.admit().unwrap();
        let _b = admission.admit().unwrap();
        // Two logging in: the pending cap refuses the third.
        assert!(matches!(admission.admit(), Err(Refused::Pending)));
        assert_eq!((admission.open(), admission.pending()), (2, 2));
        let a = a.logged_in();
        assert_eq!((admission.open(), admission.pending()), (2, 1));
        let _c = admission.admit().unwrap();
        // Three open: full, whatever is pending.
        assert!(matches!(admission.admit(), Err(Refused::Full)));
        drop(a);
        assert_eq!((admission.open(), admission.pending()), (2, 2));
        assert!(matches!(admission.admit(), Err(Refused::Pending)));
    }

    #[test]
    fn refusals_say_why_where_it_is_cheap() {
        let tcp = refusal(Refused::Full, false, false).unwrap();
        let mut buf = bytes::BytesMut::from(&tcp[..]);
        let frame = cim_proto::codec::decode_frame(&mut buf, 1024)
            .unwrap()
            .unwrap();
        match frame.body {
            Some(crate::pb::frame::Body::Error(e)) => {
                assert_eq!(e.code, crate::pb::ErrorCode::ServerFull as i32);
                assert!(e.message.contains("server full"), "{}", e.message);
            }
            other => panic!("not an error frame: {other:?}"),
        }
        let ws = String::from_utf8(refusal(Refused::Pending, true, false).unwrap()).unwrap();
        assert!(ws.starts_with("HTTP/1.1 503 "), "{ws}");
        assert!(ws.ends_with("retry shortly\n"), "{ws}");
        assert_eq!(refusal(Refused::Full, true, true), None);
    }
}
