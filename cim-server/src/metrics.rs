//! The connection server's metrics (`cim_server_*`), served with the process's at
//! `GET /metrics` on the internal listener (`internal_listen`, default `127.0.0.1:9100`; no
//! cluster secret, like `/healthz`).
//!
//! Each server instance has its own [`Registry`] ([`ServerMetrics::new`], at start), kept in
//! the server state. Every labelled series is picked by index into a fixed table of label
//! values ([`TRANSPORTS`], [`LOGIN_FAILURES`], [`DISCONNECTS`], frame kinds from
//! `cim_common::metrics::FRAME_KINDS`) and resolved once, so an update is one atomic add;
//! frames are tallied per read burst and per write, not per frame. Gauges that mirror a
//! queue (`cim_server_forward_queue_depth`) are read when scraped ([`refresh`]).

use crate::session::End;
use cim_common::metrics::{Series, ERROR_CODES, FRAME_KINDS};
use prometheus_client::{
    metrics::{
        counter::Counter,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::{Registry, Unit},
};

/// Values of the `transport` label of `cim_server_connections`, in the order of their series.
/// A transport's `Transport::KIND` must be one of them (a test checks it): a new transport
/// (tls, wss) adds its name here.
pub(crate) const TRANSPORTS: &[&str] = &["tcp", "ws", "tls", "wss"];

/// Reasons of `cim_server_login_failures_total`: the error code the server answered (the
/// first [`ERROR_CODES`]`.len()` entries, by protobuf number), or how the connection ended
/// before logging in.
pub(crate) const LOGIN_FAILURES: [&str; ERROR_CODES.len() + 3] = {
    let mut all = [""; ERROR_CODES.len() + 3];
    let mut i = 0;
    while i < ERROR_CODES.len() {
        all[i] = ERROR_CODES[i];
        i += 1;
    }
    all[ERROR_CODES.len()] = "closed";
    all[ERROR_CODES.len() + 1] = "connection_lost";
    all[ERROR_CODES.len() + 2] = "server_shutdown";
    all
};

/// Reasons of `cim_server_disconnects_total`: the reasons of the offline presence events
/// (`cim_common::events::reason`, what `End::offline_reason` answers), plus `replaced` (a
/// newer connection of the same user took over: no offline event is published for it).
pub(crate) const DISCONNECTS: [&str; 9] = {
    use cim_common::events::reason;
    [
        reason::CLOSED,
        reason::CONNECTION_LOST,
        reason::HEARTBEAT_TIMEOUT,
        reason::LOGGED_OUT,
        reason::KICKED,
        reason::SLOW_CONSUMER,
        reason::PROTOCOL_ERROR,
        reason::SERVER_SHUTDOWN,
        "replaced",
    ]
};

/// Index of `replaced` in [`DISCONNECTS`].
const REPLACED: usize = 8;

/// Bucket bounds of `cim_server_forward_call_seconds`: 0.25 ms to ~4 s, doubling.
fn call_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_25, 2.0, 15)
}

/// The handles every update goes through (cheap to clone parts of: each is an `Arc`).
pub(crate) struct ServerMetrics {
    pub connections: Series<Gauge>,
    pub logins: Counter,
    pub login_failures: Series<Counter>,
    pub disconnects: Series<Counter>,
    pub frames_in: Series<Counter>,
    pub frames_out: Series<Counter>,
    pub slow_consumer_kicks: Counter,
    pub connections_refused: Series<Counter>,
    pub sends_rate_limited: Counter,
    pub acks_dropped: Counter,
    pub forward_queue_depth: Gauge,
    pub held_senders: Gauge,
    pub forward_call_seconds: Histogram,
}

impl ServerMetrics {
    /// Registers every server metric in `registry`.
    pub(crate) fn new(registry: &mut Registry) -> Self {
        let connections = Series::register(
            registry,
            "cim_server_connections",
            "Open client connections (logging in, logged in or closing), by transport",
            TRANSPORTS.len(),
            |i| vec![("transport", TRANSPORTS[i])],
        );
        connections.init_all();
        let logins = Counter::default();
        registry.register(
            "cim_server_logins",
            "Connections that logged in (connect token accepted, session attached)",
            logins.clone(),
        );
        let login_failures = Series::register(
            registry,
            "cim_server_login_failures",
            "Connections that ended before logging in, by the error answered or how they ended",
            LOGIN_FAILURES.len(),
            |i| vec![("reason", LOGIN_FAILURES[i])],
        );
        login_failures.init_all();
        let disconnects = Series::register(
            registry,
            "cim_server_disconnects",
            "Logged-in connections that ended, by the reason of their offline presence event",
            DISCONNECTS.len(),
            |i| vec![("reason", DISCONNECTS[i])],
        );
        disconnects.init_all();
        let frames_in = Series::register(
            registry,
            "cim_server_frames_in",
            "Frames received from clients, by frame kind",
            FRAME_KINDS.len(),
            |i| vec![("kind", FRAME_KINDS[i])],
        );
        frames_in.init_all();
        let frames_out = Series::register(
            registry,
            "cim_server_frames_out",
            "Frames written to clients, by frame kind",
            FRAME_KINDS.len(),
            |i| vec![("kind", FRAME_KINDS[i])],
        );
        frames_out.init_all();
        let slow_consumer_kicks = Counter::default();
        registry.register(
            "cim_server_slow_consumer_kicks",
            "Connections closed because their outbound queue was full",
            slow_consumer_kicks.clone(),
        );
        let connections_refused = Series::register(
            registry,
            "cim_server_connections_refused",
            "Connections refused at accept: over max_connections (full) or max_pending_logins",
            crate::admission::Refused::LABELS.len(),
            |i| vec![("reason", crate::admission::Refused::LABELS[i])],
        );
        connections_refused.init_all();
        let sends_rate_limited = Counter::default();
        registry.register(
            "cim_server_sends_rate_limited",
            "Client sends refused with RATE_LIMITED (over send_rate_per_sec / send_burst)",
            sends_rate_limited.clone(),
        );
        let acks_dropped = Counter::default();
        registry.register(
            "cim_server_acks_dropped",
            "Ack frames dropped because the ack queue was full (their messages are replayed)",
            acks_dropped.clone(),
        );
        let forward_queue_depth = Gauge::default();
        registry.register(
            "cim_server_forward_queue_depth",
            "Client sends in the forward queue, not yet taken by the forwarder",
            forward_queue_depth.clone(),
        );
        let held_senders = Gauge::default();
        registry.register(
            "cim_server_held_senders",
            "Connections not read because their sends wait for room in the forward queue",
            held_senders.clone(),
        );
        let forward_call_seconds = Histogram::new(call_buckets());
        registry.register_with_unit(
            "cim_server_forward_call",
            "Duration of one forward call to a route (each attempt)",
            Unit::Seconds,
            forward_call_seconds.clone(),
        );
        Self {
            connections,
            logins,
            login_failures,
            disconnects,
            frames_in,
            frames_out,
            slow_consumer_kicks,
            connections_refused,
            sends_rate_limited,
            acks_dropped,
            forward_queue_depth,
            held_senders,
            forward_call_seconds,
        }
    }

    /// The connections gauge of a transport (by its `Transport::KIND`).
    pub(crate) fn connections_of(&self, kind: &str) -> &Gauge {
        let i = TRANSPORTS.iter().position(|t| *t == kind);
        debug_assert!(i.is_some(), "transport {kind} missing from TRANSPORTS");
        self.connections.get(i.unwrap_or(0))
    }

    /// Counts a connection that ended before it logged in.
    pub(crate) fn login_failed(&self, end: &End) {
        self.login_failures.get(login_failure_index(end)).inc();
    }

    /// Counts the end of a logged-in connection.
    pub(crate) fn disconnected(&self, end: &End) {
        let i = if end.is_replaced() {
            REPLACED
        } else {
            let reason = end.offline_reason();
            DISCONNECTS
                .iter()
                .position(|r| *r == reason)
                .unwrap_or(REPLACED)
        };
        self.disconnects.get(i).inc();
        if end.is_slow_consumer() {
            self.slow_consumer_kicks.inc();
        }
    }
}

/// The [`LOGIN_FAILURES`] entry of a login that ended with `end`.
fn login_failure_index(end: &End) -> usize {
    match end {
        End::Failed(code, _) => *code as usize,
        End::PeerClosed => ERROR_CODES.len(),
        End::ReadFailed(_) | End::WriteFailed(_) => ERROR_CODES.len() + 1,
        End::Shutdown | End::Kicked(_) => ERROR_CODES.len() + 2,
    }
}

impl cim_common::metrics::Source for crate::server::ServerState {
    /// Reads the gauges that mirror server state.
    fn refresh(&self) {
        let depth = i64::try_from(self.forward.depth()).unwrap_or(i64::MAX);
        self.metrics.forward_queue_depth.set(depth);
    }

    fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// Counts frames by kind over a burst, then adds them in one atomic add per kind seen (a
/// read burst or a write takes many frames of few kinds).
#[derive(Default)]
pub(crate) struct Tally([u32; FRAME_KINDS.len()]);

impl Tally {
    pub(crate) fn add(&mut self, frame: &crate::pb::Frame) {
        self.0[cim_common::metrics::frame_kind_index(frame)] += 1;
    }

    pub(crate) fn flush(&self, series: &Series<Counter>) {
        for (i, &n) in self.0.iter().enumerate() {
            if n > 0 {
                series.get(i).inc_by(u64::from(n));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::ErrorCode;
    use crate::{session::Transport, tcp::TcpTransport, ws::WsTransport};

    #[test]
    fn every_transport_has_a_series() {
        type Tcp = TcpTransport<tokio::net::TcpStream>;
        type Ws = WsTransport<tokio::net::TcpStream>;
        type Tls = TcpTransport<cim_common::tls::TlsStream<tokio::net::TcpStream>>;
        type Wss = WsTransport<cim_common::tls::TlsStream<tokio::net::TcpStream>>;
        assert_eq!(
            [Tcp::KIND, Ws::KIND, Tls::KIND, Wss::KIND],
            ["tcp", "ws", "tls", "wss"]
        );
        for kind in [Tcp::KIND, Ws::KIND, Tls::KIND, Wss::KIND] {
            assert!(TRANSPORTS.contains(&kind), "{kind}");
        }
    }

    #[test]
    fn login_failure_reasons_start_with_the_error_codes() {
        for (i, code) in ERROR_CODES.iter().enumerate() {
            assert_eq!(LOGIN_FAILURES[i], *code);
        }
        assert!(LOGIN_FAILURES.iter().all(|r| !r.is_empty()));
        let end = End::Failed(ErrorCode::TokenExpired, String::new());
        assert_eq!(LOGIN_FAILURES[login_failure_index(&end)], "token_expired");
        assert_eq!(
            LOGIN_FAILURES[login_failure_index(&End::PeerClosed)],
            "closed"
        );
    }
}
