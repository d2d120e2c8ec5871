//! The route's metrics (`cim_route_*`), served with the process's at `GET /metrics` on the
//! internal listener (`internal_listen`, default `127.0.0.1:8081`; no cluster secret, like the
//! public `/healthz`). The public listener serves no metrics.
//!
//! Each route instance has its own [`Registry`] ([`RouteMetrics::new`], at start), shared by
//! the handlers through [`crate::AppState`]. Label values come from fixed tables only
//! ([`MESSAGE_KINDS`], [`OUTCOMES`], the `&'static str` codes of [`AppError`]): a user id, a
//! user or channel name never becomes a label. Message outcomes are tallied per routed batch
//! and added once per series seen ([`Outcomes`]).

use crate::error::AppError;
use cim_common::{
    metrics::{GaugeGuard, Labels, Series},
    pb::{ErrorCode, MessageKind, SendResult, SendStatus},
};
use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::{Registry, Unit},
};
use std::sync::atomic::AtomicU64;

/// Values of the `kind` label of `cim_route_messages_total`: the message kinds, by protobuf
/// number (`unspecified`: a send without a valid kind, answered `failed_bad_request`).
pub const MESSAGE_KINDS: [&str; 6] = [
    "unspecified",
    "private",
    "group",
    "system",
    "channel",
    "receipt",
];

/// Values of the `outcome` label: delivered, stored (private, receiver offline), or
/// `failed_<error code>` (the codes by protobuf number, from index 2 on).
pub const OUTCOMES: [&str; 21] = [
    "delivered",
    "stored",
    "failed_unspecified",
    "failed_bad_frame",
    "failed_frame_too_large",
    "failed_unsupported_frame",
    "failed_login_required",
    "failed_login_timeout",
    "failed_invalid_token",
    "failed_token_expired",
    "failed_wrong_server",
    "failed_session_invalid",
    "failed_heartbeat_timeout",
    "failed_unknown_user",
    "failed_bad_request",
    "failed_unavailable",
    "failed_internal",
    "failed_overloaded",
    "failed_forbidden",
    "failed_server_full",
    "failed_rate_limited",
];

/// The [`MESSAGE_KINDS`] index of a send's `kind` field.
pub fn kind_index(kind: i32) -> usize {
    MessageKind::try_from(kind).map_or(0, |k| k as usize)
}

/// The [`OUTCOMES`] index of a result.
fn outcome_index(r: &SendResult) -> usize {
    match SendStatus::try_from(r.status) {
        Ok(SendStatus::Delivered) => 0,
        Ok(SendStatus::Stored) => 1,
        _ => {
            let code = r
                .error
                .as_ref()
                .and_then(|e| ErrorCode::try_from(e.code).ok())
                .unwrap_or(ErrorCode::Unspecified);
            2 + code as usize
        }
    }
}

/// Bucket bounds of the call histograms: 0.25 ms to ~4 s, doubling.
fn call_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_25, 2.0, 15)
}

/// The handles every update goes through.
pub struct RouteMetrics {
    logins: Counter,
    login_failures: Family<Labels, Counter>,
    messages: Series<Counter>,
    pub push_call_seconds: Histogram,
    pub inbox_store_seconds: Histogram,
    sse_subscribers: Gauge,
    pub webhook_lag_events: Gauge,
    pub webhook_lag_seconds: Gauge<f64, AtomicU64>,
}

/// Login refusals created at start (`cim_route_login_failures_total{reason}`).
const LOGIN_REASONS: [&str; 7] = [
    "bad_credentials",
    "already_logged_in",
    "no_server",
    "unavailable",
    "bad_request",
    "rate_limited",
    "busy",
];

impl RouteMetrics {
    /// Registers every route metric in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let logins = Counter::default();
        registry.register(
            "cim_route_logins",
            "Login sessions opened (POST /api/login, and connect calls of the business API)",
            logins.clone(),
        );
        let login_failures = Family::<Labels, Counter>::default();
        registry.register(
            "cim_route_login_failures",
            "Refused logins, by the error code answered",
            login_failures.clone(),
        );
        // The usual refusals exported at 0 from the start (see `Series::init_all`); rarer codes
        // appear at their first use.
        for reason in LOGIN_REASONS {
            drop(login_failures.get_or_create(&vec![("reason", reason)]));
        }
        let messages = Series::register(
            registry,
            "cim_route_messages",
            "Messages routed (from clients over servers, HTTP and the business API; receipts), by kind and outcome",
            MESSAGE_KINDS.len() * OUTCOMES.len(),
            |i| {
                vec![
                    ("kind", MESSAGE_KINDS[i / OUTCOMES.len()]),
                    ("outcome", OUTCOMES[i % OUTCOMES.len()]),
                ]
            },
        );
        messages.init_all();
        let push_call_seconds = Histogram::new(call_buckets());
        registry.register_with_unit(
            "cim_route_push_call",
            "Duration of one push call to a connection server",
            Unit::Seconds,
            push_call_seconds.clone(),
        );
        let inbox_store_seconds = Histogram::new(call_buckets());
        registry.register_with_unit(
            "cim_route_inbox_store",
            "Duration of storing a run of private messages (one round trip, with the route lookup)",
            Unit::Seconds,
            inbox_store_seconds.clone(),
        );
        let sse_subscribers = Gauge::default();
        registry.register(
            "cim_route_sse_subscribers",
            "Open server-sent event streams of presence events",
            sse_subscribers.clone(),
        );
        let webhook_lag_events = Gauge::default();
        registry.register(
            "cim_route_webhook_lag_events",
            "Presence events read for the webhook and not delivered yet (at most one batch, 100); 0 on routes not holding the webhook lease",
            webhook_lag_events.clone(),
        );
        let webhook_lag_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "cim_route_webhook_lag",
            "Age of the oldest presence event not delivered to the webhook yet; 0 when caught up or not holding the webhook lease",
            Unit::Seconds,
            webhook_lag_seconds.clone(),
        );
        Self {
            logins,
            login_failures,
            messages,
            push_call_seconds,
            inbox_store_seconds,
            sse_subscribers,
            webhook_lag_events,
            webhook_lag_seconds,
        }
    }

    /// Counts a login attempt's outcome.
    pub fn login<T>(&self, result: &Result<T, AppError>) {
        match result {
            Ok(_) => {
                self.logins.inc();
            }
            Err(e) => {
                self.login_failures
                    // Every code the route answers is a known one (`AppError::new` checks).
                    .get_or_create(&vec![("reason", e.code.known_str().unwrap_or("other"))])
                    .inc();
            }
        }
    }

    /// One SSE subscriber, counted while the guard lives.
    pub fn sse_subscriber(&self) -> GaugeGuard {
        GaugeGuard::new(&self.sse_subscribers)
    }

    /// Counts the outcomes of a routed batch.
    pub fn messages(&self, outcomes: &Outcomes) {
        for (i, &n) in outcomes.0.iter().enumerate() {
            if n > 0 {
                self.messages.get(i).inc_by(u64::from(n));
            }
        }
    }
}

/// Message outcomes of one batch by (kind, outcome), added to the counters at once.
pub struct Outcomes([u32; MESSAGE_KINDS.len() * OUTCOMES.len()]);

impl Default for Outcomes {
    fn default() -> Self {
        Self([0; MESSAGE_KINDS.len() * OUTCOMES.len()])
    }
}

impl Outcomes {
    /// Counts `result` of a message of kind index `kind` ([`kind_index`]).
    pub fn add(&mut self, kind: usize, result: &SendResult) {
        let kind = kind.min(MESSAGE_KINDS.len() - 1);
        self.0[kind * OUTCOMES.len() + outcome_index(result)] += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_follow_the_error_codes() {
        for (i, code) in cim_common::metrics::ERROR_CODES.iter().enumerate() {
            assert_eq!(OUTCOMES[2 + i], format!("failed_{code}"));
        }
        for (i, kind) in MESSAGE_KINDS.iter().enumerate() {
            let name = MessageKind::try_from(i as i32).unwrap().as_str_name();
            assert_eq!(
                name.trim_start_matches("MESSAGE_KIND_").to_lowercase(),
                *kind
            );
        }
        let failed = SendResult::failed(1, ErrorCode::UnknownUser, "x");
        assert_eq!(OUTCOMES[outcome_index(&failed)], "failed_unknown_user");
        assert_eq!(kind_index(99), 0);
    }
}
