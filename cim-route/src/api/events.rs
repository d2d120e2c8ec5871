//! Presence events for backends (FreeIM's EventBus), API key only:
//!
//! - `GET /api/admin/events` → `text/event-stream`: one SSE event per presence change,
//!   `id: <event id>`, `event: online|offline`, `data: {"type","user_id","name","server_id",
//!   "at_ms","reason"?}`. Without a resume point it starts with the next event; with
//!   `Last-Event-ID` (what browsers' EventSource send on reconnect) or `?after=<id>` it first
//!   replays what the store still has after that id. Comment lines keep idle connections open.
//! - `GET /api/admin/events/recent?after=&limit=` → `{"events":[{"id",..}],"next"}`: the same
//!   events by polling (`next` is the id to pass as `after`; null when there was nothing).
//!
//! Every route instance serves every subscriber: the events come from the store's stream (see
//! [`crate::events`]).

use crate::{
    api::presence::parse_limit,
    auth::ApiKey,
    error::{ApiQuery, AppError},
    events::EventView,
    state::AppState,
};
use axum::{
    extract::State,
    http::HeaderMap,
    response::sse::{Event, KeepAlive, Sse},
    Json,
};
use cim_common::{
    events::{EventId, StoredEvent},
    store::{StateStore, MAX_EVENTS_READ},
};
use futures_util::{stream, Stream};
use serde::{Deserialize, Serialize};
use std::{collections::VecDeque, convert::Infallible, sync::Arc, time::Duration};
use tokio::sync::broadcast::{self, error::RecvError};

/// Interval of keep-alive comments on an idle stream (below common proxy idle timeouts).
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Deserialize)]
pub struct EventsQuery {
    #[serde(default)]
    pub after: Option<String>,
    #[serde(default)]
    pub limit: Option<String>,
}

#[derive(Serialize)]
pub struct RecentEvents<'a> {
    pub events: Vec<EventView<'a>>,
    pub next: Option<&'a str>,
}

/// A validated event id from the client.
fn event_id(raw: &str) -> Result<String, AppError> {
    EventId::parse(raw)
        .map(|id| id.to_string())
        .ok_or_else(|| AppError::bad_request("invalid event id: expected `<ms>-<n>`"))
}

pub async fn recent(
    State(state): State<AppState>,
    _key: ApiKey,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Json<serde_json::Value>, AppError> {
    let limit = parse_limit(q.limit.as_deref(), MAX_EVENTS_READ)?;
    let after = q
        .after
        .as_deref()
        .filter(|a| !a.is_empty())
        .map(event_id)
        .transpose()?;
    let events = state.store().events_after(after.as_deref(), limit).await?;
    let body = RecentEvents {
        events: events.iter().map(EventView::from).collect(),
        next: events.last().map(|e| e.id.as_str()),
    };
    serde_json::to_value(&body)
        .map(Json)
        .map_err(AppError::internal)
}

/// The SSE form of one event.
fn sse_event(e: &StoredEvent) -> Event {
    let data = serde_json::to_string(&EventView::from(e)).unwrap_or_default();
    Event::default()
        .id(e.id.clone())
        .event(e.event.kind.as_str())
        .data(data)
}

/// Where a subscriber is: events up to `last` were sent; `backlog` waits to be sent.
struct Subscription {
    state: AppState,
    live: broadcast::Receiver<Arc<StoredEvent>>,
    /// Id of the last event sent (`None`: nothing yet and no resume point: take live events).
    last: Option<EventId>,
    last_raw: Option<String>,
    /// Read from the store, not sent yet.
    backlog: VecDeque<StoredEvent>,
    /// The store may have more after `last` than the backlog held.
    catching_up: bool,
}

impl Subscription {
    fn sent(&mut self, e: &StoredEvent) {
        self.last = EventId::parse(&e.id);
        self.last_raw = Some(e.id.clone());
    }

    fn is_new(&self, e: &StoredEvent) -> bool {
        match (self.last, EventId::parse(&e.id)) {
            (Some(last), Some(id)) => id > last,
            (None, _) => true,
            (Some(_), None) => false,
        }
    }

    /// The next event to send, or an error that ends the stream.
    async fn next(&mut self) -> Option<Result<Event, Infallible>> {
        loop {
            if let Some(e) = self.backlog.pop_front() {
                if self.is_new(&e) {
                    self.sent(&e);
                    return Some(Ok(sse_event(&e)));
                }
                continue;
            }
            if self.catching_up {
                let store: &dyn StateStore = self.state.store();
                match store
                    .events_after(self.last_raw.as_deref(), MAX_EVENTS_READ)
                    .await
                {
                    Ok(page) => {
                        self.catching_up = page.len() >= MAX_EVENTS_READ;
                        self.backlog.extend(page);
                        continue;
                    }
                    Err(e) => {
                        // End the stream: the client reconnects with Last-Event-ID and
                        // loses nothing.
                        tracing::warn!(error = %e, "reading events for a subscriber failed");
                        return None;
                    }
                }
            }
            match self.live.recv().await {
                Ok(e) => {
                    if self.is_new(&e) {
                        self.sent(&e);
                        return Some(Ok(sse_event(&e)));
                    }
                }
                // Fell behind the hub's buffer: the missed events are in the store.
                Err(RecvError::Lagged(_)) => self.catching_up = true,
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

pub async fn stream_events(
    State(state): State<AppState>,
    _key: ApiKey,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, AppError> {
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(q.after)
        .filter(|s| !s.trim().is_empty());
    let last_raw = resume.as_deref().map(|r| event_id(r.trim())).transpose()?;
    // Subscribe before reading the backlog, so nothing published in between is missed
    // (events seen twice are skipped by id).
    let sub = Subscription {
        live: state.events().subscribe(),
        last: last_raw.as_deref().and_then(EventId::parse),
        catching_up: last_raw.is_some(),
        last_raw,
        backlog: VecDeque::new(),
        state,
    };
    let events = stream::unfold(sub, |mut sub| async move {
        let item = sub.next().await?;
        Some((item, sub))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}
