//! The presence-event stream in Redis (`events`, capped with `MAXLEN ~`): appends, pages by
//! XRANGE, and blocking reads (XREAD) on a connection of their own.

use super::*;

/// A presence event stamped now (`reason` empty for online events).
pub(in crate::store) fn presence_event(
    kind: PresenceKind,
    user_id: u64,
    name: &str,
    server_id: &str,
    reason: &str,
) -> PresenceEvent {
    PresenceEvent {
        kind,
        user_id,
        name: name.to_string(),
        server_id: server_id.to_string(),
        at_ms: crate::time::now_ms(),
        reason: reason.to_string(),
    }
}

/// The id of an `after` argument; not an event id is a caller's bug, reported as such.
pub(in crate::store) fn parse_event_id(after: &str) -> StoreResult<EventId> {
    EventId::parse(after).ok_or_else(|| StoreError::Corrupt(format!("invalid event id {after:?}")))
}

/// The highest id a stream can hold: nothing comes after it.
pub(in crate::store) const LAST_EVENT_ID: EventId = EventId {
    ms: u64::MAX,
    seq: u64::MAX,
};

/// UTF-8 text of a reply element.
fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// What a read of the stream returned.
#[derive(Default)]
struct StreamPage {
    /// The well-formed entries, as events.
    events: Vec<StoredEvent>,
    /// Entries read, malformed ones included.
    entries: usize,
    /// Id of the last entry read, malformed or not: where to go on from.
    last_id: Option<EventId>,
}

/// An XRANGE / XREVRANGE reply (an array of `[id, [field, value, ...]]`). Malformed entries
/// are skipped (the stream is shared state anything with access can write to) but counted,
/// so that a reader can go on past them rather than stop at them.
fn stream_page(reply: &Value) -> StreamPage {
    let Value::Array(entries) = reply else {
        return StreamPage::default();
    };
    let mut page = StreamPage {
        entries: entries.len(),
        ..StreamPage::default()
    };
    for entry in entries {
        if let Some(id) = entry_id(entry) {
            page.last_id = Some(id);
        }
        match parse_stream_entry(entry) {
            Some(event) => page.events.push(event),
            None => tracing::debug!(?entry, "events: skipping a malformed stream entry"),
        }
    }
    page
}

/// An XREAD reply on one stream: nil (timed out), `[[key, entries]]` (RESP2) or
/// `{key: entries}` (RESP3).
fn xread_page(reply: &Value) -> StreamPage {
    let entries = match reply {
        Value::Array(streams) => streams.iter().find_map(|s| match s {
            Value::Array(parts) if parts.len() == 2 => Some(&parts[1]),
            _ => None,
        }),
        Value::Map(streams) => streams.first().map(|(_, entries)| entries),
        _ => None,
    };
    entries.map(stream_page).unwrap_or_default()
}

/// The id of a stream entry, even if its fields are malformed.
fn entry_id(entry: &Value) -> Option<EventId> {
    let Value::Array(parts) = entry else {
        return None;
    };
    EventId::parse(text(parts.first()?)?)
}

/// One stream entry as an event (fields in [`crate::keys`]; unknown fields are ignored, so
/// a newer writer may add some).
fn parse_stream_entry(entry: &Value) -> Option<StoredEvent> {
    let Value::Array(parts) = entry else {
        return None;
    };
    let [id, Value::Array(fields)] = parts.as_slice() else {
        return None;
    };
    let id = text(id)?;
    EventId::parse(id)?;
    let (mut kind, mut user_id, mut name, mut server_id, mut at_ms) =
        (None, None, None, None, None);
    let mut reason = String::new();
    for pair in fields.chunks(2) {
        let [field, value] = pair else { return None };
        let value = text(value)?;
        match text(field)? {
            "t" => kind = Some(PresenceKind::parse(value)?),
            "u" => user_id = Some(value.parse().ok()?),
            "n" => name = Some(value.to_string()),
            "s" => server_id = Some(value.to_string()),
            "at" => at_ms = Some(value.parse().ok()?),
            "r" => reason = value.to_string(),
            _ => {}
        }
    }
    Some(StoredEvent {
        id: id.to_string(),
        event: PresenceEvent {
            kind: kind?,
            user_id: user_id?,
            name: name?,
            server_id: server_id?,
            at_ms: at_ms?,
            reason,
        },
    })
}

#[async_trait]
impl Events for RedisStore {
    async fn events_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<StoredEvent>> {
        let mut after = after.map(parse_event_id).transpose()?;
        let limit = limit.min(MAX_EVENTS_READ);
        let mut out = Vec::new();
        // One XRANGE, unless it met malformed entries: then read on past them, so that a
        // short page still means "nothing more" and paging never stalls on one.
        while out.len() < limit {
            let want = limit - out.len();
            let start = match after {
                None => "-".to_string(),
                // `(` past the last possible id is an error in Redis; nothing comes after it.
                Some(LAST_EVENT_ID) => break,
                Some(id) => format!("({id}"),
            };
            let reply: Value = ::redis::cmd("XRANGE")
                .arg(self.keys.events())
                .arg(start)
                .arg("+")
                .arg("COUNT")
                .arg(want)
                .query_async(&mut self.conn())
                .await
                .map_err(unavailable)?;
            let page = stream_page(&reply);
            out.extend(page.events);
            match page.last_id {
                Some(last) if page.entries == want => after = Some(last),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn events_wait(
        &self,
        after: &str,
        limit: usize,
        timeout: Duration,
    ) -> StoreResult<Vec<StoredEvent>> {
        let mut after = parse_event_id(after)?;
        let limit = limit.min(MAX_EVENTS_READ);
        let started = tokio::time::Instant::now();
        // One blocking read at a time on the connection: a caller that waited its whole
        // timeout for its turn just looks (what came meanwhile is there to read).
        let Ok(mut waiter) = tokio::time::timeout(timeout, self.waiter.lock()).await else {
            return self.events_after(Some(&after.to_string()), limit).await;
        };
        loop {
            // BLOCK 0 would wait forever: with no time left, a plain read.
            let left = timeout.saturating_sub(started.elapsed());
            let block_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
            if limit == 0 || block_ms == 0 {
                drop(waiter);
                return self.events_after(Some(&after.to_string()), limit).await;
            }
            let mut conn = match waiter.take() {
                Some(conn) => conn,
                None => {
                    let config =
                        AsyncConnectionConfig::new().set_connection_timeout(Some(self.timeout));
                    tokio::time::timeout(
                        self.timeout,
                        self.client
                            .get_multiplexed_async_connection_with_config(&config),
                    )
                    .await
                    .map_err(|_| StoreError::Unavailable("connecting timed out".into()))?
                    .map_err(unavailable)?
                }
            };
            let read = ::redis::cmd("XREAD")
                .arg("COUNT")
                .arg(limit)
                .arg("BLOCK")
                .arg(block_ms)
                .arg("STREAMS")
                .arg(self.keys.events())
                .arg(after.to_string())
                .to_owned();
            // The deadline of the call on top of the wait; the connection has none of its
            // own, as each read waits for as long as its caller asks.
            let deadline = left.saturating_add(self.timeout);
            let reply: Value = tokio::time::timeout(deadline, read.query_async(&mut conn))
                .await
                .map_err(|_| StoreError::Unavailable("blocking read timed out".into()))?
                .map_err(unavailable)?;
            *waiter = Some(conn);
            let page = xread_page(&reply);
            match page.last_id {
                // Only malformed entries: wait on past them for the time that is left.
                Some(last) if page.events.is_empty() => after = last,
                _ => return Ok(page.events),
            }
        }
    }

    async fn events_last_id(&self) -> StoreResult<String> {
        let reply: Value = ::redis::cmd("XREVRANGE")
            .arg(self.keys.events())
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        let last = match &reply {
            Value::Array(entries) => entries.first().and_then(entry_id),
            _ => None,
        };
        Ok(last.unwrap_or(EventId::ZERO).to_string())
    }
}

impl RedisStore {
    /// Appends `event` to the stream (trimmed to about `events_max_len`) in `pipe`.
    pub(super) fn publish(&self, pipe: &mut ::redis::Pipeline, event: &PresenceEvent) {
        pipe.cmd("XADD")
            .arg(self.keys.events())
            .arg("MAXLEN")
            .arg("~")
            .arg(self.events_max_len)
            .arg("*")
            .arg("t")
            .arg(event.kind.as_str())
            .arg("u")
            .arg(event.user_id)
            .arg("n")
            .arg(&event.name)
            .arg("s")
            .arg(&event.server_id)
            .arg("at")
            .arg(event.at_ms);
        if !event.reason.is_empty() {
            pipe.arg("r").arg(&event.reason);
        }
        pipe.ignore();
    }
}
