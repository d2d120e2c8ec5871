//! The presence-event streams in Redis (`events:{shard}`, each capped with `MAXLEN ~`):
//! appends, pages by XRANGE, blocking reads (XREAD) on a connection of their own.
//!
//! A single Redis has one stream: a page is one XRANGE and a wait one blocking XREAD, as
//! ever. A Redis Cluster store has one stream per shard, a user's events all in the user's
//! shard, so per-user order is the stream's. Reading merges the shards into one order by
//! `(ms, n, shard)` (see [`EventId`]), and that order is stable: an event is handed out only
//! once no event before it can still appear. Each stream's entries are appended with ids from
//! its node's clock, never below the stream's last id: once a shard was read at its node's
//! time `T`, every entry it gets later has an id of at least `T`. So a page reads every shard
//! with its `TIME` in the same pipeline and hands out only the entries below the smallest of
//! those times (and below the last entry of any shard whose page came back full). Those
//! withheld wait for the next read; a read that withheld entries of the last few ms waits
//! that long and reads again. Cost: one XRANGE and one TIME per shard (one pipeline per shard),
//! instead of one XRANGE. A cluster cannot block on several streams in one XREAD (their keys
//! are in different slots): waiting polls every [`POLL`].

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
        message: None,
    }
}

/// The id of an `after` argument; not an event id is a caller's bug, reported as such.
pub(in crate::store) fn parse_event_id(after: &str) -> StoreResult<EventId> {
    EventId::parse(after).ok_or_else(|| StoreError::Corrupt(format!("invalid event id {after:?}")))
}

/// Pause between two reads of a cluster's streams while waiting for events.
pub const POLL: Duration = Duration::from_millis(50);

/// Longest a cluster read waits for the clocks of the other shards to pass withheld events
/// before answering without them (they come with the next read).
const SKEW_WAIT: Duration = Duration::from_millis(20);

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
    let mut message: Option<MessageEvent> = None;
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
            "mi" => message.get_or_insert_with(MessageEvent::default).id = value.to_string(),
            "mf" => {
                message.get_or_insert_with(MessageEvent::default).sender_id = value.parse().ok()?
            }
            "mn" => {
                message
                    .get_or_insert_with(MessageEvent::default)
                    .sender_name = value.to_string()
            }
            "mc" => {
                let m = message.get_or_insert_with(MessageEvent::default);
                match crate::store::ConvKey::decode(value)? {
                    crate::store::ConvKey::User(id) => {
                        m.conversation_type = "user".into();
                        m.conversation_id = id;
                    }
                    crate::store::ConvKey::Group(id) => {
                        m.conversation_type = "group".into();
                        m.conversation_id = id;
                    }
                }
            }
            "mk" => message.get_or_insert_with(MessageEvent::default).kind = value.to_string(),
            "ms" => {
                message.get_or_insert_with(MessageEvent::default).log_seq = value.parse().ok()?
            }
            "mb" => {
                message.get_or_insert_with(MessageEvent::default).body = Some(value.to_string())
            }
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
            message,
        },
    })
}

/// The stream fields every event starts with (kind, user, name, server, time): the plain
/// XADD of presence events and the once-only script of message events write the same.
fn event_fields(event: &PresenceEvent) -> [(&'static str, String); 5] {
    [
        ("t", event.kind.as_str().to_string()),
        ("u", event.user_id.to_string()),
        ("n", event.name.clone()),
        ("s", event.server_id.clone()),
        ("at", event.at_ms.to_string()),
    ]
}

/// The stream fields of a message event (after [`event_fields`]).
fn message_fields(m: &MessageEvent) -> Vec<(&'static str, String)> {
    let conv = match m.conversation_type.as_str() {
        "group" => crate::store::ConvKey::Group(m.conversation_id),
        _ => crate::store::ConvKey::User(m.conversation_id),
    };
    let mut fields = vec![
        ("mi", m.id.clone()),
        ("mf", m.sender_id.to_string()),
        ("mn", m.sender_name.clone()),
        ("mc", conv.encode()),
        ("mk", m.kind.clone()),
        ("ms", m.log_seq.to_string()),
    ];
    if let Some(body) = &m.body {
        fields.push(("mb", body.clone()));
    }
    fields
}

#[async_trait]
impl Events for RedisStore {
    async fn publish_messages(&self, events: &[PresenceEvent]) -> StoreResult<()> {
        let shards = self.keys.shards();
        let now = crate::time::now_ms();
        let window = MESSAGE_EVENT_DEDUP.as_millis() as u64;
        let mut batch = self.batch();
        for event in events {
            let Some(m) = &event.message else { continue };
            let shard = self.keys.user_shard(event.user_id);
            let stream = self.keys.events(shard);
            let mut inv = PUBLISH_ONCE.key(&stream);
            inv.key(self.keys.notified(shard))
                .arg(self.events_max_len.div_ceil(shards))
                .arg(format!("{}/{}", m.id, event.user_id))
                .arg(now)
                .arg(window);
            for (field, value) in event_fields(event).into_iter().chain(message_fields(m)) {
                inv.arg(field).arg(value);
            }
            batch.add(&stream, |pipe| {
                pipe.invoke_script(&inv);
            });
        }
        if batch.is_empty() {
            return Ok(());
        }
        batch.run(self, &[&PUBLISH_ONCE]).await.map(|_| ())
    }

    async fn events_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<StoredEvent>> {
        let after = after.map(parse_event_id).transpose()?;
        let limit = limit.min(MAX_EVENTS_READ);
        if self.keys.shards() > 1 {
            return self.merged_after(after, limit).await;
        }
        let mut after = after;
        let mut out = Vec::new();
        // One XRANGE, unless it met malformed entries: then read on past them, so that a
        // short page still means "nothing more" and paging never stalls on one.
        while out.len() < limit {
            let want = limit - out.len();
            let start = match after {
                None => "-".to_string(),
                // `(` past the last possible id is an error in Redis; nothing comes after it.
                Some(id) if (id.ms, id.seq) == (u64::MAX, u64::MAX) => break,
                Some(id) => format!("({}", id.stream_id()),
            };
            let reply: Value = ::redis::cmd("XRANGE")
                .arg(self.keys.events(0))
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
        let Some(client) = self.client.as_ref().filter(|_| self.keys.shards() == 1) else {
            return self.poll(after, limit, timeout).await;
        };
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
                        client.get_multiplexed_async_connection_with_config(&config),
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
                .arg(self.keys.events(0))
                .arg(after.stream_id())
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
        if self.keys.shards() > 1 {
            return self.merged_last_id().await;
        }
        let reply: Value = ::redis::cmd("XREVRANGE")
            .arg(self.keys.events(0))
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

/// Milliseconds of a `TIME` reply (`[seconds, microseconds]`).
fn time_ms(reply: Value) -> StoreResult<u64> {
    let (secs, micros): (u64, u64) = batch::parse(reply, "TIME")?;
    Ok(secs * 1000 + micros / 1000)
}

impl RedisStore {
    /// Appends `event` to its user's stream (each stream trimmed to about its share of
    /// `events_max_len`) in `pipe`.
    pub(super) fn publish(&self, pipe: &mut ::redis::Pipeline, event: &PresenceEvent) {
        let shards = self.keys.shards();
        pipe.cmd("XADD")
            .arg(self.keys.events(self.keys.user_shard(event.user_id)))
            .arg("MAXLEN")
            .arg("~")
            .arg(self.events_max_len.div_ceil(shards))
            .arg("*");
        for (field, value) in event_fields(event) {
            pipe.arg(field).arg(value);
        }
        if !event.reason.is_empty() {
            pipe.arg("r").arg(&event.reason);
        }
    }

    /// One read of every shard's stream after `after`: `(TIME, page)` per shard.
    async fn read_shards(
        &self,
        after: Option<EventId>,
        limit: usize,
    ) -> StoreResult<Vec<(u64, StreamPage)>> {
        let mut batch = self.batch();
        for shard in 0..self.keys.shards() {
            let key = self.keys.events(shard);
            let start = match after {
                None => "-".to_string(),
                // Entries with the same stream id in a later shard come after `after`.
                Some(a) if shard as u64 > u64::from(a.shard) => a.stream_id(),
                Some(a) if (a.ms, a.seq) == (u64::MAX, u64::MAX) => "+".to_string(),
                Some(a) => format!("({}", a.stream_id()),
            };
            batch.add(&key, |pipe| {
                pipe.cmd("TIME")
                    .cmd("XRANGE")
                    .arg(&key)
                    .arg(&start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(limit.max(1));
            });
        }
        batch
            .run(self, &[])
            .await?
            .into_iter()
            .map(|replies| {
                let [time, range]: [Value; 2] = replies
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("events: two replies expected".into()))?;
                Ok((time_ms(time)?, stream_page(&range)))
            })
            .collect()
    }

    /// [`Events::events_after`] over the shards' streams (see the module docs).
    async fn merged_after(
        &self,
        mut after: Option<EventId>,
        limit: usize,
    ) -> StoreResult<Vec<StoredEvent>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Bounded: a few reads for the clocks, a few past pages of malformed entries.
        for _ in 0..8 {
            let pages = self.read_shards(after, limit).await?;
            // Below `bound`, every shard has been read whole.
            let bound = pages
                .iter()
                .enumerate()
                .map(|(shard, (time, page))| match page.last_id {
                    Some(last) if page.entries >= limit => EventId {
                        shard: shard as u32 + 1,
                        ..last
                    },
                    _ => EventId::new(*time, 0),
                })
                .min()
                .unwrap_or(EventId::ZERO);
            let mut ready = Vec::new();
            let mut withheld: Option<EventId> = None;
            for (shard, (_, page)) in pages.into_iter().enumerate() {
                for mut e in page.events {
                    let Some(id) = EventId::parse(&e.id) else {
                        continue;
                    };
                    let id = EventId {
                        shard: shard as u32,
                        ..id
                    };
                    if after.is_some_and(|a| id <= a) {
                        continue;
                    }
                    if id < bound {
                        e.id = id.to_string();
                        ready.push((id, e));
                    } else {
                        withheld = Some(withheld.map_or(id, |w| w.min(id)));
                    }
                }
            }
            ready.sort_unstable_by_key(|(id, _)| *id);
            ready.truncate(limit);
            let time_bound = bound.seq == 0 && bound.shard == 0;
            match withheld {
                // Held back only by a clock a few ms behind: wait that long, read again.
                Some(first) if ready.is_empty() && time_bound => {
                    let behind = Duration::from_millis(first.ms.saturating_sub(bound.ms) + 1);
                    if behind > SKEW_WAIT {
                        return Ok(Vec::new());
                    }
                    tokio::time::sleep(behind).await;
                }
                // Every entry read was malformed, up to a full page's end: go on after it.
                None if ready.is_empty() && !time_bound => {
                    after = Some(EventId {
                        shard: bound.shard - 1,
                        ..bound
                    });
                }
                _ => return Ok(ready.into_iter().map(|(_, e)| e).collect()),
            }
        }
        Ok(Vec::new())
    }

    /// [`Events::events_wait`] by polling (a cluster's streams, see the module docs).
    async fn poll(
        &self,
        after: EventId,
        limit: usize,
        timeout: Duration,
    ) -> StoreResult<Vec<StoredEvent>> {
        let started = tokio::time::Instant::now();
        let after = after.to_string();
        loop {
            let page = self.events_after(Some(&after), limit).await?;
            let left = timeout.saturating_sub(started.elapsed());
            if !page.is_empty() || limit == 0 || left.is_zero() {
                return Ok(page);
            }
            tokio::time::sleep(left.min(POLL)).await;
        }
    }

    /// [`Events::events_last_id`] over the shards' streams: the newest event below every
    /// shard's clock (what comes after it is what a tail started now hands out).
    async fn merged_last_id(&self) -> StoreResult<String> {
        let mut batch = self.batch();
        for shard in 0..self.keys.shards() {
            let key = self.keys.events(shard);
            // The EXISTS only sends the TIME to the shard's node (a keyless pipeline goes
            // to any node).
            batch.add(&key, |pipe| {
                pipe.cmd("TIME").exists(&key);
            });
        }
        let mut now = u64::MAX;
        for replies in batch.run(self, &[]).await? {
            let time = replies
                .into_iter()
                .next()
                .ok_or_else(|| StoreError::Corrupt("events: no TIME reply".into()))?;
            now = now.min(time_ms(time)?);
        }
        let mut batch = self.batch();
        for shard in 0..self.keys.shards() {
            let key = self.keys.events(shard);
            batch.add(&key, |pipe| {
                pipe.cmd("XREVRANGE")
                    .arg(&key)
                    .arg(format!("({now}-0"))
                    .arg("-")
                    .arg("COUNT")
                    .arg(1);
            });
        }
        let mut last = EventId::ZERO;
        for (shard, replies) in batch.run(self, &[]).await?.into_iter().enumerate() {
            if let Value::Array(entries) = batch::single(replies)? {
                if let Some(id) = entries.first().and_then(entry_id) {
                    last = last.max(EventId {
                        shard: shard as u32,
                        ..id
                    });
                }
            }
        }
        Ok(last.to_string())
    }
}
