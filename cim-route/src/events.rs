//! Presence events on a route instance: one tail of the store's event stream, fanned out in
//! memory to every server-sent-events subscriber of this instance ([`EventHub`]), and the
//! webhook delivery ([`run_webhook`]).
//!
//! Servers publish the events (through the store, as part of attach / detach), so every
//! route instance sees the same stream and any of them can serve a subscriber; a subscriber
//! that reconnects, to this instance or another, resumes from the last id it saw.
//!
//! One blocking read per instance, not one per subscriber: a blocking XREAD holds a Redis
//! connection for its whole wait, so subscribers share the tail through a broadcast channel.
//! A subscriber that falls behind that channel's buffer catches up from the store (the
//! stream keeps the newest `events_max_len` events), so a slow reader loses nothing the
//! stream still has.
//!
//! The webhook: one route instance at a time holds the `webhook` lease and POSTs batches of
//! events in stream order, advancing a cursor in the store after each 2xx, retrying a failed
//! batch with backoff. Delivery is at least once: an instance that loses its lease during a
//! POST and the one that takes over may both deliver that batch.

use crate::state::AppState;
use cim_common::{
    events::{EventId, StoredEvent},
    store::MAX_EVENTS_READ,
};
use hmac::{Hmac, KeyInit, Mac};
use serde::Serialize;
use sha2::Sha256;
use std::{sync::Arc, time::Duration};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Events buffered for subscribers that have not read them yet.
const HUB_CAPACITY: usize = 4096;
/// Longest blocking read of the tail (a shutdown waits at most this long for it).
const TAIL_WAIT: Duration = Duration::from_secs(5);
/// Pause after a failed store call of the tail or the webhook (it retries forever).
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Events per webhook POST at most.
const WEBHOOK_BATCH: usize = 100;
/// Webhook lease: renewed every loop, taken over by another instance this long after its
/// holder stopped renewing.
const WEBHOOK_LEASE: Duration = Duration::from_secs(15);
/// Store name of the webhook's lease and cursor.
const WEBHOOK: &str = "webhook";

/// The in-memory fan-out of the event tail to this instance's subscribers.
#[derive(Clone)]
pub struct EventHub {
    tx: broadcast::Sender<Arc<StoredEvent>>,
}

impl Default for EventHub {
    fn default() -> Self {
        Self::new()
    }
}

impl EventHub {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(HUB_CAPACITY);
        Self { tx }
    }

    /// Events from now on (see the module docs for a receiver that lags).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<StoredEvent>> {
        self.tx.subscribe()
    }

    fn publish(&self, event: StoredEvent) {
        // No subscriber is not an error: the event stays in the store.
        let _ = self.tx.send(Arc::new(event));
    }
}

/// Doubles `delay` up to [`RETRY_MAX`].
fn backoff(delay: Duration) -> Duration {
    (delay * 2).min(RETRY_MAX)
}

/// Waits `delay`, or returns false at once when cancelled.
async fn pause(cancel: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

/// Follows the store's event stream from its current end and publishes every event to the
/// hub, until cancelled.
pub async fn run_tail(state: AppState, cancel: CancellationToken) {
    let store = state.store();
    let mut delay = RETRY_MIN;
    let mut last = loop {
        match store.events_last_id().await {
            Ok(id) => break id,
            Err(e) => {
                tracing::warn!(error = %e, "reading the event stream's end failed; retrying");
                if !pause(&cancel, delay).await {
                    return;
                }
                delay = backoff(delay);
            }
        }
    };
    delay = RETRY_MIN;
    loop {
        let read = tokio::select! {
            () = cancel.cancelled() => return,
            r = store.events_wait(&last, MAX_EVENTS_READ, TAIL_WAIT) => r,
        };
        match read {
            Ok(events) => {
                delay = RETRY_MIN;
                for event in events {
                    last.clone_from(&event.id);
                    state.events().publish(event);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading presence events failed; retrying");
                if !pause(&cancel, delay).await {
                    return;
                }
                delay = backoff(delay);
            }
        }
    }
}

/// One event as the API shows it: its id, then the event's fields.
#[derive(Serialize)]
pub struct EventView<'a> {
    pub id: &'a str,
    #[serde(flatten)]
    pub event: &'a cim_common::events::PresenceEvent,
}

impl<'a> From<&'a StoredEvent> for EventView<'a> {
    fn from(e: &'a StoredEvent) -> Self {
        Self {
            id: &e.id,
            event: &e.event,
        }
    }
}

#[derive(Serialize)]
struct WebhookBody<'a> {
    events: Vec<EventView<'a>>,
}

/// Hex HMAC-SHA256 of `body` under `secret` (the `X-Cim-Signature` value after `sha256=`).
pub fn signature(secret: &str, body: &[u8]) -> String {
    use std::fmt::Write;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    digest.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// POSTs one batch; `Err` describes why it did not count as delivered.
async fn post_batch(
    http: &reqwest::Client,
    url: &str,
    secret: Option<&str>,
    events: &[StoredEvent],
) -> Result<(), String> {
    let body = serde_json::to_vec(&WebhookBody {
        events: events.iter().map(EventView::from).collect(),
    })
    .map_err(|e| e.to_string())?;
    let mut req = http
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    if let Some(secret) = secret {
        req = req.header(
            "x-cim-signature",
            format!("sha256={}", signature(secret, &body)),
        );
    }
    let resp = req.body(body).send().await.map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("the webhook answered {}", resp.status()))
    }
}

/// Sets the webhook lag gauges from the events read and not delivered yet (oldest first).
fn lag(state: &AppState, pending: &[StoredEvent]) {
    let metrics = state.metrics();
    metrics
        .webhook_lag_events
        .set(i64::try_from(pending.len()).unwrap_or(i64::MAX));
    let age_ms = pending.first().map_or(0, |e| {
        cim_common::time::now_ms()
            .saturating_sub(e.event.at_ms)
            .max(0)
    });
    metrics.webhook_lag_seconds.set(age_ms as f64 / 1000.0);
}

/// Delivers presence events to the configured webhook while this instance holds the webhook
/// lease, until cancelled. Starts, the very first time, at the end of the stream (events
/// from before a webhook was configured are not sent).
pub async fn run_webhook(state: AppState, cancel: CancellationToken) {
    let config = state.config();
    let Some(url) = config.webhook_url.clone() else {
        return;
    };
    let secret = config.webhook_secret.clone();
    let http = match reqwest::Client::builder()
        .timeout(config.webhook_timeout())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook's HTTP client; no webhook");
            return;
        }
    };
    let store = state.store();
    let owner = state.id().to_string();
    let mut live = state.events().subscribe();
    let mut delay = RETRY_MIN;
    let mut holding = false;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        match store.lease(WEBHOOK, &owner, WEBHOOK_LEASE).await {
            Ok(true) => {
                if !holding {
                    tracing::info!("delivering presence events to the webhook");
                }
                holding = true;
            }
            Ok(false) => {
                holding = false;
                // Another route delivers: this one is behind by nothing.
                lag(&state, &[]);
                // Another instance delivers; check again well before its lease could lapse.
                if !pause(&cancel, WEBHOOK_LEASE / 3).await {
                    return;
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "webhook lease check failed; retrying");
                if !pause(&cancel, delay).await {
                    return;
                }
                delay = backoff(delay);
                continue;
            }
        }
        let cursor = match store.cursor(WEBHOOK).await {
            Ok(Some(c)) if EventId::parse(&c).is_some() => Ok(c),
            Ok(_) => match store.events_last_id().await {
                Ok(end) => store.set_cursor(WEBHOOK, &end).await.map(|()| end),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        let batch = match cursor {
            Ok(c) => store.events_after(Some(&c), WEBHOOK_BATCH).await,
            Err(e) => Err(e),
        };
        let events = match batch {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(error = %e, "reading events for the webhook failed; retrying");
                if !pause(&cancel, delay).await {
                    return;
                }
                delay = backoff(delay);
                continue;
            }
        };
        lag(&state, &events);
        if events.is_empty() {
            // Wake on the next event of the tail, or re-check the lease in a while.
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = live.recv() => {}
                () = tokio::time::sleep(WEBHOOK_LEASE / 3) => {}
            }
            continue;
        }
        match post_batch(&http, &url, secret.as_deref(), &events).await {
            Ok(()) => {
                let last = &events[events.len() - 1].id;
                if let Err(e) = store.set_cursor(WEBHOOK, last).await {
                    // The batch will be delivered again: at least once.
                    tracing::warn!(error = %e, "saving the webhook cursor failed");
                }
                delay = RETRY_MIN;
            }
            Err(e) => {
                tracing::warn!(error = %e, events = events.len(), "webhook delivery failed; retrying");
                if !pause(&cancel, delay).await {
                    return;
                }
                delay = backoff(delay);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_is_capped() {
        let mut d = RETRY_MIN;
        for _ in 0..20 {
            d = backoff(d);
        }
        assert_eq!(d, RETRY_MAX);
    }
}
