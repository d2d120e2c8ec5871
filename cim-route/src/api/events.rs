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
    api::{openapi::ErrorBody, presence::parse_limit},
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
    store::{RouteStore, MAX_EVENTS_READ},
};
use futures_util::{stream, Stream};
use serde::{Deserialize, Serialize};
use std::{collections::VecDeque, convert::Infallible, sync::Arc, time::Duration};
use tokio::sync::broadcast::{self, error::RecvError};
use utoipa::{IntoParams, ToSchema};

/// Interval of keep-alive comments on an idle stream (below common proxy idle timeouts).
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Event id (`<ms>-<n>`, or `<ms>-<n>-<shard>` on a Redis Cluster) to continue after.
    #[serde(default)]
    pub after: Option<String>,
    /// Page size (default 50, at most the store's read limit). Ignored by the stream.
    #[serde(default)]
    #[param(value_type = Option<u64>, minimum = 1)]
    pub limit: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct RecentEvents<'a> {
    #[schema(value_type = Vec<EventDoc>)]
    pub events: Vec<EventView<'a>>,
    /// The id to pass as `after`; null when there was nothing.
    #[schema(value_type = Option<String>, required = true)]
    pub next: Option<&'a str>,
}

/// The documented form of one event as served (`crate::events::EventView`, which flattens
/// `cim_common::events::PresenceEvent`): schema only, checked against the real serialization
/// by the OpenAPI tests.
#[derive(Serialize, ToSchema)]
#[schema(as = PresenceEvent)]
pub struct EventDoc {
    /// Event id, `<ms>-<n>` (on a Redis Cluster `<ms>-<n>-<shard>` past shard 0), increasing.
    #[schema(example = "1718000000000-0")]
    pub id: String,
    #[serde(rename = "type")]
    pub kind: EventKindDoc,
    pub user_id: u64,
    pub name: String,
    /// The connection server the user connected to / was connected to.
    pub server_id: String,
    /// Unix milliseconds, by the clock of the process that published it.
    pub at_ms: i64,
    /// Offline events only: `closed`, `connection_lost`, `heartbeat_timeout`, `logged_out`,
    /// `kicked`, `slow_consumer`, `protocol_error`, `server_shutdown` or `server_lost`.
    #[serde(skip_serializing_if = "String::is_empty")]
    #[schema(required = false)]
    pub reason: String,
    /// Message events only: the stored message the offline receiver (`user_id`) will get at
    /// their next connection (send them a push notification). `name` and `server_id` are
    /// empty in message events.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(required = false)]
    pub message: Option<MessageEventDoc>,
}

/// The message of a `message` event (`cim_common::events::MessageEvent`).
#[derive(Serialize, ToSchema)]
#[schema(as = MessageEvent)]
pub struct MessageEventDoc {
    /// The message id (what clients de-duplicate by).
    pub id: String,
    pub sender_id: u64,
    pub sender_name: String,
    /// `user` (private: `conversation_id` is the sender) or `group`.
    #[schema(example = "user")]
    pub conversation_type: String,
    pub conversation_id: u64,
    /// `MESSAGE_KIND_PRIVATE` or `MESSAGE_KIND_GROUP_CHAT`.
    pub kind: String,
    /// Its place in the conversation's log.
    pub log_seq: u64,
    /// The text: only with the route's `message_events_body = true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(required = false)]
    pub body: Option<String>,
}

/// The kind of an event (also the SSE `event:` field).
#[derive(Serialize, ToSchema)]
#[schema(as = PresenceKind)]
#[serde(rename_all = "snake_case")]
pub enum EventKindDoc {
    Online,
    Offline,
    Message,
}

/// A validated event id from the client.
fn event_id(raw: &str) -> Result<String, AppError> {
    EventId::parse(raw).map(|id| id.to_string()).ok_or_else(|| {
        AppError::bad_request("invalid event id: expected `<ms>-<n>` or `<ms>-<n>-<shard>`")
    })
}

/// Poll presence events.
///
/// The events of the SSE stream by polling: up to `limit` events after `after` (or the oldest
/// the store still has). `next` is the id to pass as `after`.
#[utoipa::path(
    get,
    path = "/api/admin/events/recent",
    tag = "events",
    security(("api_key" = [])),
    params(EventsQuery),
    responses(
        (status = 200, description = "A page of events, oldest first", body = RecentEvents),
        (status = 400, description = "`bad_request`: bad `limit` or event id", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
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
    /// Counts this stream in `cim_route_sse_subscribers` while it lives.
    _counted: cim_common::metrics::GaugeGuard,
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
                let store: &dyn RouteStore = self.state.store();
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

/// Stream presence events (server-sent events).
///
/// One SSE event per presence change or offline message: `id: <event id>`, `event:
/// online|offline|message`, `data: {"type","user_id","name","server_id","at_ms","reason"?,
/// "message"?}` (the `PresenceEvent`
/// schema without `id`, one line of JSON). Without a resume point it starts with the next
/// event; with `Last-Event-ID` (what browsers' EventSource send on reconnect) or `?after=<id>`
/// it first replays what the store still has after that id. Comment lines keep idle
/// connections open. Every route instance serves every subscriber.
#[utoipa::path(
    get,
    path = "/api/admin/events",
    tag = "events",
    security(("api_key" = [])),
    params(
        ("Last-Event-ID" = Option<String>, Header, nullable = false, description = "Resume after this event id (takes precedence over `after`)"),
        EventsQuery,
    ),
    responses(
        (status = 200, description = "An endless `text/event-stream`; each event is `id: <ms>-<n>` (or `<ms>-<n>-<shard>`), `event: online|offline|message`, `data: <PresenceEvent JSON without id>`", content_type = "text/event-stream", body = String),
        (status = 400, description = "`bad_request`: invalid event id", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 503, description = "`overloaded` or `timeout`", body = ErrorBody),
    )
)]
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
        _counted: state.metrics().sse_subscriber(),
        state,
    };
    let events = stream::unfold(sub, |mut sub| async move {
        let item = sub.next().await?;
        Some((item, sub))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}
