//! Stored conversations in Redis: groups, conversation logs, read marks, group positions.
//!
//! A conversation's keys share the tag of the conversation (`g{id}` for a group, `d{a}.{b}`
//! for the private conversation of users a < b; see [`crate::keys`]): its meta hash, its log
//! (a list of `{seq}|{unix ms}|{protobuf Message}`, oldest first, seqs consecutive, so a seq
//! is found by its offset from the first entry's), the ids of its newest messages (a sorted
//! set scored by seq: idempotent appends), and for a group its members and read marks. What
//! a user owns (the groups they are in, with their positions; the peers of their private
//! conversations) has the user's tag. So an append is ONE script in the conversation's slot
//! (plus, for private messages, one ZADD per participant in their slots, in the same round
//! trip), whatever the group's size; nothing per member is written for a group message.
//!
//! A group change is one script over the group's keys that changes the members and appends
//! the change's event together (`lua/group_change.lua`), so the log says exactly who was a
//! member at each seq. The users' lists are kept beside it: reserved (atomically, within the
//! per-user limit) before an add, removed after a removal. Both halves cannot be one script
//! (two slots), so a list may name a group whose removal was interrupted: [`GroupSync::group_cursors`]
//! checks each against the members hash and drops those (a login repairs it).
//!
//! Round trips: private append of N messages 1; group append 1; history page 1; read mark
//! 1; a conversation list 2 (the user's lists, then the meta of each conversation, which
//! grows with the user's groups: at most `max_groups`); group create 3, add 2 (3 to undo
//! reservations of a full group), remove 2, others 1; cursors 2; ack 1; check 1.

use super::*;
use crate::pb::MessageKind;
use crate::store::chat::*;

/// Private conversations one user's list keeps (the oldest by activity are dropped).
const MAX_USER_CONVERSATIONS: isize = 10_000;

/// The keys of one conversation.
struct ConvKeys {
    meta: String,
    log: String,
    ids: String,
    members: String,
    reads: String,
}

/// A log entry `{seq}|{unix ms}|{protobuf Message}` as the message, its `log_seq` set.
fn parse_entry(entry: &[u8]) -> StoreResult<Message> {
    let corrupt = || StoreError::Corrupt("conversation log entry".into());
    let mut parts = entry.splitn(3, |&b| b == b'|');
    let seq = parts
        .next()
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(corrupt)?;
    let _ms = parts.next().ok_or_else(corrupt)?;
    let bytes = parts.next().ok_or_else(corrupt)?;
    let mut m = <Message as prost::Message>::decode(bytes).map_err(|_| corrupt())?;
    m.log_seq = seq;
    Ok(m)
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("conversation reply: {what}"))
}

fn as_u64(v: &Value) -> StoreResult<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).map_err(|_| corrupt("negative number")),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt("not a number")),
        Value::Nil => Ok(0),
        _ => Err(corrupt("not a number")),
    }
}

fn as_i64(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        _ => None,
    }
}

fn array(v: Value) -> StoreResult<Vec<Value>> {
    match v {
        Value::Array(items) => Ok(items),
        _ => Err(corrupt("not an array")),
    }
}

/// A members-hash value `{role code}:{joined seq}`.
fn parse_member(user_id: u64, value: &str) -> Option<GroupMember> {
    let (code, seq) = value.split_once(':')?;
    Some(GroupMember {
        user_id,
        role: Role::from_code(code)?,
        joined_seq: seq.parse().ok()?,
    })
}

/// The status, seq and version at the head of a group-change answer, and the user ids after.
fn change_reply(v: Value) -> StoreResult<(String, u64, u64, Vec<u64>)> {
    let items = array(v)?;
    if items.len() < 3 {
        return Err(corrupt("short group change answer"));
    }
    let status = as_text(&items[0]).ok_or_else(|| corrupt("status"))?;
    let seq = as_u64(&items[1])?;
    let version = as_u64(&items[2])?;
    let users = items[3..].iter().map(as_u64).collect::<StoreResult<_>>()?;
    Ok((status, seq, version, users))
}

fn changed(status: &str, seq: u64) -> Changed {
    match status {
        "ok" => Changed::Done(seq),
        "notmember" => Changed::NotMember,
        _ => Changed::NoGroup,
    }
}

impl RedisStore {
    /// One script call on keys of `key`'s slot (loaded again after a NOSCRIPT): its reply.
    async fn run_script(
        &self,
        key: &str,
        script: &Script,
        inv: &ScriptInvocation<'_>,
    ) -> StoreResult<Value> {
        let mut batch = self.batch();
        batch.add(key, |pipe| {
            pipe.invoke_script(inv);
        });
        let reply = batch
            .run(self, &[script])
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| corrupt("no reply"))?;
        batch::single(reply)
    }

    fn conv_keys(&self, tag: &str) -> ConvKeys {
        ConvKeys {
            meta: self.keys.conv_meta(tag),
            log: self.keys.conv_log(tag),
            ids: self.keys.conv_ids(tag),
            members: self.keys.group_members(tag),
            reads: self.keys.group_reads(tag),
        }
    }

    /// Oldest unix ms a log keeps now.
    fn history_cutoff_ms(&self) -> i64 {
        let age = i64::try_from(self.history.max_age.as_millis()).unwrap_or(i64::MAX);
        crate::time::now_ms().saturating_sub(age)
    }

    fn history_ttl_ms(&self) -> u64 {
        u64::try_from(self.history.max_age.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// A conversation script's invocation with its keys and the retention arguments every
    /// such script takes first (after `first`).
    fn conv_invocation(
        &self,
        script: &'static Script,
        keys: &ConvKeys,
        group: bool,
        first: &str,
    ) -> ScriptInvocation<'static> {
        let mut inv = script.key(&keys.meta);
        inv.key(&keys.log).key(&keys.ids);
        if group {
            inv.key(&keys.members).key(&keys.reads);
        } else {
            inv.key(&keys.meta).key(&keys.meta);
        }
        inv.arg(first)
            .arg(self.history.max_messages.max(1))
            .arg(self.history_cutoff_ms())
            .arg(self.history_ttl_ms())
            .arg(DEDUP_WINDOW);
        inv
    }

    /// Runs one group change (`op`) with `event` (given `group_id`) and its arguments.
    async fn group_change(
        &self,
        group: u64,
        op: &str,
        event: &mut Message,
        args: &[String],
    ) -> StoreResult<(String, u64, u64, Vec<u64>)> {
        event.group_id = group;
        let tag = Keys::conversation_tag(group, None);
        let keys = self.conv_keys(&tag);
        let mut inv = self.conv_invocation(&GROUP_CHANGE, &keys, true, op);
        inv.arg(&event.id)
            .arg(event.timestamp_ms)
            .arg(prost::Message::encode_to_vec(&*event));
        for a in args {
            inv.arg(a);
        }
        let answer = change_reply(self.run_script(&keys.meta, &GROUP_CHANGE, &inv).await?)?;
        event.log_seq = answer.1;
        Ok(answer)
    }

    /// Drops `group` from each user's list (after a removal or the disband).
    async fn unlist_group(&self, group: u64, users: &[u64]) -> StoreResult<()> {
        if users.is_empty() {
            return Ok(());
        }
        let mut batch = self.batch();
        for &u in users {
            let key = self.keys.user_groups(u);
            batch.add(&key, |pipe| {
                pipe.hdel(&key, group);
            });
        }
        batch.run(self, &[]).await.map(|_| ())
    }

    /// A page of a conversation's log (see `lua/conv_read.lua`); `None`: the viewer is not a
    /// member of the group.
    async fn read_log(
        &self,
        tag: &str,
        group: bool,
        viewer: u64,
        page: HistoryPage,
        limit: usize,
    ) -> StoreResult<Option<Vec<Message>>> {
        let keys = self.conv_keys(tag);
        let (dir, seq) = match page {
            HistoryPage::Before(s) if s == u64::MAX => ("b", 0),
            HistoryPage::Before(s) => ("b", s),
            HistoryPage::After(s) => ("a", s),
        };
        let mut inv = CONV_READ.key(&keys.meta);
        inv.key(&keys.log).key(&keys.ids);
        inv.key(if group { &keys.members } else { &keys.meta });
        inv.arg(dir)
            .arg(seq)
            .arg(limit.min(MAX_HISTORY_READ))
            .arg(viewer)
            .arg(self.history.before_join)
            .arg(self.history_cutoff_ms())
            .arg(if group { "g" } else { "p" });
        match self.run_script(&keys.meta, &CONV_READ, &inv).await? {
            Value::Int(-1) => Ok(None),
            v => array(v)?
                .iter()
                .map(|e| parse_entry(as_bytes(e).ok_or_else(|| corrupt("entry"))?))
                .collect::<StoreResult<Vec<_>>>()
                .map(Some),
        }
    }

    /// Runs conversation appends: per conversation tag, the positions in `messages` of its
    /// messages; sets each `log_seq` (repeats: the stored copy). Answers, per message, the
    /// script's status and version (`None` for messages not appended).
    async fn append_logs(
        &self,
        messages: &mut [Message],
        convs: Vec<(String, bool, Vec<usize>)>,
        extra: impl FnOnce(&mut Batch),
    ) -> StoreResult<Vec<Option<(String, u64)>>> {
        let mut batch = self.batch();
        let mut units = Vec::with_capacity(convs.len());
        for (tag, group, positions) in &convs {
            let keys = self.conv_keys(tag);
            let mut inv =
                self.conv_invocation(&CONV_APPEND, &keys, *group, if *group { "g" } else { "p" });
            for &p in positions {
                let m = &messages[p];
                inv.arg(m.sender_id)
                    .arg(&m.id)
                    .arg(m.timestamp_ms)
                    .arg(prost::Message::encode_to_vec(m));
            }
            units.push(batch.add(&keys.meta, |pipe| {
                pipe.invoke_script(&inv);
            }));
        }
        extra(&mut batch);
        let mut replies = batch.run(self, &[&CONV_APPEND]).await?;
        let mut out = vec![None; messages.len()];
        for ((_, _, positions), unit) in convs.iter().zip(units) {
            let reply = std::mem::take(&mut replies[unit]);
            let items = array(batch::single(reply)?)?;
            if items.len() != positions.len() * 4 {
                return Err(corrupt("4 values per message expected"));
            }
            for (&p, answer) in positions.iter().zip(items.chunks_exact(4)) {
                let status = as_text(&answer[0]).ok_or_else(|| corrupt("status"))?;
                let seq = as_u64(&answer[1])?;
                let version = as_u64(&answer[2])?;
                if let Some(copy) = as_bytes(&answer[3]) {
                    match parse_entry(copy) {
                        Ok(stored) => messages[p] = stored,
                        Err(e) => tracing::warn!(error = %e, "stored copy does not decode"),
                    }
                }
                if status == "ok" || status == "repeat" {
                    messages[p].log_seq = seq;
                }
                out[p] = Some((status, version));
            }
        }
        Ok(out)
    }
}

/// Positions of `messages` per conversation, in first-seen order.
fn by_conversation(
    messages: &[Message],
    conv: impl Fn(&Message) -> Option<(String, bool)>,
) -> Vec<(String, bool, Vec<usize>)> {
    let mut out: Vec<(String, bool, Vec<usize>)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (p, m) in messages.iter().enumerate() {
        let Some((tag, group)) = conv(m) else {
            continue;
        };
        match index.get(&tag) {
            Some(&i) => out[i].2.push(p),
            None => {
                index.insert(tag.clone(), out.len());
                out.push((tag, group, vec![p]));
            }
        }
    }
    out
}

use std::collections::HashMap;

/// Whether `message` belongs in a private conversation's log.
fn private_kept(m: &Message) -> bool {
    m.sender_id != 0
        && m.receiver_id != 0
        && MessageKind::try_from(m.kind).ok() == Some(MessageKind::Private)
}

#[async_trait]
impl History for RedisStore {
    async fn private_append(&self, messages: &mut [Message]) -> StoreResult<()> {
        let convs = by_conversation(messages, |m| {
            private_kept(m).then(|| {
                (
                    Keys::conversation_tag(m.sender_id, Some(m.receiver_id)),
                    false,
                )
            })
        });
        if convs.is_empty() {
            return Ok(());
        }
        // Each participant's list: the newest activity per peer of this batch.
        let mut activity: HashMap<(u64, u64), i64> = HashMap::new();
        for m in messages.iter().filter(|m| private_kept(m)) {
            for (user, peer) in [(m.sender_id, m.receiver_id), (m.receiver_id, m.sender_id)] {
                let at = activity.entry((user, peer)).or_insert(m.timestamp_ms);
                *at = (*at).max(m.timestamp_ms);
            }
        }
        let cutoff = self.history_cutoff_ms();
        let ttl = self.history_ttl_ms();
        let keys = self.keys.clone();
        self.append_logs(messages, convs, |batch| {
            for ((user, peer), at) in activity {
                let key = keys.user_conversations(user);
                batch.add(&key, |pipe| {
                    pipe.zadd(&key, peer, at)
                        .zrembyscore(&key, "-inf", format!("({cutoff}"))
                        .zremrangebyrank(&key, 0, -MAX_USER_CONVERSATIONS - 1)
                        .pexpire(&key, ttl as i64);
                });
            }
        })
        .await
        .map(|_| ())
    }

    async fn group_append(&self, messages: &mut [Message]) -> StoreResult<Vec<GroupAppend>> {
        let convs = by_conversation(messages, |m| {
            (m.group_id != 0).then(|| (Keys::conversation_tag(m.group_id, None), true))
        });
        let answers = self.append_logs(messages, convs, |_| {}).await?;
        Ok(answers
            .into_iter()
            .map(|a| match a {
                Some((status, version)) if status == "ok" || status == "repeat" => {
                    GroupAppend::Appended {
                        version,
                        repeat: status == "repeat",
                    }
                }
                Some((status, _)) if status == "notmember" => GroupAppend::NotMember,
                _ => GroupAppend::NoGroup,
            })
            .collect())
    }

    async fn history(
        &self,
        viewer: u64,
        conv: ConvKey,
        page: HistoryPage,
        limit: usize,
    ) -> StoreResult<Option<Vec<Message>>> {
        match conv {
            ConvKey::User(peer) => {
                let tag = Keys::conversation_tag(viewer, Some(peer));
                self.read_log(&tag, false, viewer, page, limit).await
            }
            ConvKey::Group(group) => {
                let tag = Keys::conversation_tag(group, None);
                self.read_log(&tag, true, viewer, page, limit).await
            }
        }
    }

    async fn conversations(
        &self,
        user: u64,
        before_ms: Option<i64>,
        limit: usize,
    ) -> StoreResult<Vec<ConversationSummary>> {
        let limit = limit.min(MAX_CONVERSATIONS_PAGE);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let convs_key = self.keys.user_conversations(user);
        let groups_key = self.keys.user_groups(user);
        let max = before_ms.map_or("+inf".to_string(), |b| format!("({b}"));
        let mut batch = self.batch();
        let peers_unit = batch.add(&convs_key, |pipe| {
            pipe.cmd("ZREVRANGEBYSCORE")
                .arg(&convs_key)
                .arg(&max)
                .arg("-inf")
                .arg("LIMIT")
                .arg(0)
                .arg(limit);
        });
        let groups_unit = batch.add(&groups_key, |pipe| {
            pipe.hkeys(&groups_key);
        });
        let mut replies = batch.run(self, &[]).await?;
        let peers: Vec<u64> = batch::take(&mut replies, peers_unit, "conversation peers")?;
        let groups: Vec<u64> = batch::take(&mut replies, groups_unit, "user groups")?;

        let mut batch = self.batch();
        let mut peer_units = Vec::with_capacity(peers.len());
        for &peer in &peers {
            let keys = self.conv_keys(&Keys::conversation_tag(user, Some(peer)));
            peer_units.push(batch.add(&keys.meta, |pipe| {
                pipe.cmd("HMGET").arg(&keys.meta).arg(&[
                    "top",
                    "last",
                    "at",
                    &format!("r{user}"),
                    &format!("r{peer}"),
                ]);
            }));
        }
        let mut group_units = Vec::with_capacity(groups.len());
        for &group in &groups {
            let keys = self.conv_keys(&Keys::conversation_tag(group, None));
            group_units.push(batch.add(&keys.meta, |pipe| {
                pipe.cmd("HMGET")
                    .arg(&keys.meta)
                    .arg(&["top", "last", "at", "name", "created", "gone"])
                    .hget(&keys.reads, user)
                    .hexists(&keys.members, user);
            }));
        }
        let mut replies = batch.run(self, &[]).await?;
        let last_of = |v: &Value| as_bytes(v).and_then(|b| parse_entry(b).ok());
        let mut out = Vec::with_capacity(peers.len() + groups.len());
        for (&peer, unit) in peers.iter().zip(peer_units) {
            let reply = std::mem::take(&mut replies[unit]);
            let fields = array(batch::single(reply)?)?;
            if fields.len() != 5 || fields[0] == Value::Nil {
                continue; // the conversation expired
            }
            let top = as_u64(&fields[0])?;
            let read_seq = as_u64(&fields[3])?.min(top);
            out.push(ConversationSummary {
                conv: ConvKey::User(peer),
                name: String::new(),
                last: last_of(&fields[1]),
                top,
                read_seq,
                unread: top - read_seq,
                peer_read_seq: as_u64(&fields[4])?.min(top),
                activity_ms: as_i64(&fields[2]),
            });
        }
        for (&group, unit) in groups.iter().zip(group_units) {
            let mut reply = std::mem::take(&mut replies[unit]);
            if reply.len() != 3 {
                return Err(corrupt("group summary"));
            }
            let member = reply.pop().is_some_and(|v| v == Value::Int(1));
            let read = reply.pop().unwrap_or(Value::Nil);
            let fields = array(reply.pop().unwrap_or(Value::Nil))?;
            if !member || fields.len() != 6 || fields[0] == Value::Nil || fields[5] != Value::Nil {
                continue;
            }
            let top = as_u64(&fields[0])?;
            let read_seq = as_u64(&read)?.min(top);
            let at = match &fields[2] {
                Value::Nil => as_i64(&fields[4]),
                v => as_i64(v),
            };
            if before_ms.is_some_and(|b| at >= b) {
                continue;
            }
            out.push(ConversationSummary {
                conv: ConvKey::Group(group),
                name: as_text(&fields[3]).unwrap_or_default(),
                last: last_of(&fields[1]),
                top,
                read_seq,
                unread: top - read_seq,
                peer_read_seq: 0,
                activity_ms: at,
            });
        }
        out.sort_by(|a, b| b.activity_ms.cmp(&a.activity_ms).then(a.conv.cmp(&b.conv)));
        out.truncate(limit);
        Ok(out)
    }

    async fn mark_read(&self, user: u64, conv: ConvKey, seq: u64) -> StoreResult<Option<u64>> {
        let (keys, field, group) = match conv {
            ConvKey::User(peer) => (
                self.conv_keys(&Keys::conversation_tag(user, Some(peer))),
                format!("r{user}"),
                false,
            ),
            ConvKey::Group(group) => (
                self.conv_keys(&Keys::conversation_tag(group, None)),
                user.to_string(),
                true,
            ),
        };
        let mut inv = MARK_READ.key(&keys.meta);
        if group {
            inv.key(&keys.reads).key(&keys.members);
        } else {
            inv.key(&keys.meta).key(&keys.meta);
        }
        inv.arg(field)
            .arg(seq)
            .arg(if group { "g" } else { "p" })
            .arg(user);
        match self.run_script(&keys.meta, &MARK_READ, &inv).await? {
            Value::Int(-1) => Ok(None),
            v => as_u64(&v).map(Some),
        }
    }
}

#[async_trait]
impl Groups for RedisStore {
    async fn group_create(
        &self,
        owner: u64,
        name: &str,
        event: &mut Message,
        limits: GroupLimits,
    ) -> StoreResult<Option<GroupInfo>> {
        let id: u64 = self
            .conn()
            .incr(self.keys.next_group_id(), 1)
            .await
            .map_err(unavailable)?;
        let list = self.keys.user_groups(owner);
        let mut inv = GROUP_RESERVE.key(&list);
        inv.arg(id).arg(limits.max_groups);
        let reserved: u64 = batch::parse(
            self.run_script(&list, &GROUP_RESERVE, &inv).await?,
            "group reserve",
        )?;
        if reserved == 0 {
            return Ok(None);
        }
        let (status, seq, version, _) = self
            .group_change(id, "create", event, &[owner.to_string(), name.to_string()])
            .await?;
        if status != "ok" {
            return Err(corrupt("group id reused"));
        }
        self.group_ack(&[(owner, vec![(id, seq)])]).await?;
        Ok(Some(GroupInfo {
            id,
            name: name.to_string(),
            owner,
            created_ms: event.timestamp_ms,
            members: 1,
            top: seq,
            version,
        }))
    }

    async fn group_info(&self, group: u64) -> StoreResult<Option<GroupInfo>> {
        let keys = self.conv_keys(&Keys::conversation_tag(group, None));
        let mut batch = self.batch();
        batch.add(&keys.meta, |pipe| {
            pipe.cmd("HMGET")
                .arg(&keys.meta)
                .arg(&["name", "owner", "created", "top", "ver", "gone"])
                .hlen(&keys.members);
        });
        let mut replies = batch.run(self, &[]).await?;
        let mut reply = std::mem::take(&mut replies[0]);
        if reply.len() != 2 {
            return Err(corrupt("group info"));
        }
        let members = as_u64(&reply.pop().unwrap_or(Value::Nil))?;
        let fields = array(reply.pop().unwrap_or(Value::Nil))?;
        if fields.len() != 6 || fields[0] == Value::Nil || fields[5] != Value::Nil {
            return Ok(None);
        }
        Ok(Some(GroupInfo {
            id: group,
            name: as_text(&fields[0]).unwrap_or_default(),
            owner: as_u64(&fields[1])?,
            created_ms: as_i64(&fields[2]),
            members,
            top: as_u64(&fields[3])?,
            version: as_u64(&fields[4])?,
        }))
    }

    async fn group_member(&self, group: u64, user: u64) -> StoreResult<Option<GroupMember>> {
        let key = self
            .keys
            .group_members(&Keys::conversation_tag(group, None));
        let value: Option<String> = self.conn().hget(&key, user).await.map_err(unavailable)?;
        Ok(value.and_then(|v| parse_member(user, &v)))
    }

    async fn group_members(
        &self,
        group: u64,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<GroupMember>> {
        let key = self
            .keys
            .group_members(&Keys::conversation_tag(group, None));
        let all: HashMap<u64, String> = self.conn().hgetall(&key).await.map_err(unavailable)?;
        let mut members: Vec<GroupMember> = all
            .into_iter()
            .filter(|(id, _)| *id > after)
            .filter_map(|(id, v)| parse_member(id, &v))
            .collect();
        members.sort_by_key(|m| m.user_id);
        members.truncate(limit.min(MAX_MEMBERS_PAGE));
        Ok(members)
    }

    async fn group_add(
        &self,
        group: u64,
        users: &[u64],
        event: &mut Message,
        limits: GroupLimits,
    ) -> StoreResult<AddOutcome> {
        let mut users = users.to_vec();
        users.sort_unstable();
        users.dedup();
        let mut outcome = AddOutcome::default();
        if users.is_empty() {
            return Ok(outcome);
        }
        let mut batch = self.batch();
        for &u in &users {
            let list = self.keys.user_groups(u);
            batch.add(&list, |pipe| {
                pipe.invoke_script(GROUP_RESERVE.key(&list).arg(group).arg(limits.max_groups));
            });
        }
        let mut replies = batch.run(self, &[&GROUP_RESERVE]).await?;
        let mut candidates = Vec::new();
        let mut reserved_now = Vec::new();
        for (i, &u) in users.iter().enumerate() {
            match batch::take::<u64>(&mut replies, i, "group reserve")? {
                0 => outcome.too_many_groups.push(u),
                2 => {
                    reserved_now.push(u);
                    candidates.push(u);
                }
                _ => candidates.push(u),
            }
        }
        if candidates.is_empty() {
            return Ok(outcome);
        }
        if let Some(e) = event.group_event.as_mut() {
            e.user_ids = candidates.clone();
        }
        let mut args = vec![limits.max_members.to_string()];
        args.extend(candidates.iter().map(u64::to_string));
        let (status, seq, _, added) = self.group_change(group, "add", event, &args).await?;
        match status.as_str() {
            "ok" => {
                outcome.already = candidates
                    .iter()
                    .copied()
                    .filter(|u| !added.contains(u))
                    .collect();
                if seq != 0 {
                    let positions: Vec<(u64, Vec<(u64, u64)>)> =
                        added.iter().map(|&u| (u, vec![(group, seq)])).collect();
                    self.group_ack(&positions).await?;
                }
                if let Some(e) = event.group_event.as_mut() {
                    e.user_ids = added.clone();
                }
                outcome.added = added;
                outcome.seq = seq;
            }
            other => {
                outcome.group_full = other == "full";
                outcome.no_group = other != "full";
                self.unlist_group(group, &reserved_now).await?;
            }
        }
        Ok(outcome)
    }

    async fn group_remove(
        &self,
        group: u64,
        users: &[u64],
        event: &mut Message,
    ) -> StoreResult<u64> {
        if users.is_empty() {
            return Ok(0);
        }
        let args: Vec<String> = users.iter().map(u64::to_string).collect();
        let (status, seq, _, removed) = self.group_change(group, "remove", event, &args).await?;
        if status != "ok" || seq == 0 {
            return Ok(0);
        }
        if let Some(e) = event.group_event.as_mut() {
            e.user_ids = removed.clone();
        }
        self.unlist_group(group, &removed).await?;
        Ok(seq)
    }

    async fn group_set_role(
        &self,
        group: u64,
        user: u64,
        role: Role,
        event: &mut Message,
    ) -> StoreResult<Changed> {
        if role == Role::Owner {
            return Ok(Changed::NotMember);
        }
        let (status, seq, _, _) = self
            .group_change(
                group,
                "role",
                event,
                &[user.to_string(), role.code().to_string()],
            )
            .await?;
        Ok(changed(&status, seq))
    }

    async fn group_rename(
        &self,
        group: u64,
        name: &str,
        event: &mut Message,
    ) -> StoreResult<Changed> {
        let (status, seq, _, _) = self
            .group_change(group, "rename", event, &[name.to_string()])
            .await?;
        Ok(changed(&status, seq))
    }

    async fn group_disband(&self, group: u64, event: &mut Message) -> StoreResult<Changed> {
        let (status, seq, _, members) = self.group_change(group, "disband", event, &[]).await?;
        if status == "ok" {
            for chunk in members.chunks(500) {
                self.unlist_group(group, chunk).await?;
            }
        }
        Ok(changed(&status, seq))
    }

    async fn user_groups(&self, user: u64) -> StoreResult<Vec<u64>> {
        let mut groups: Vec<u64> = self
            .conn()
            .hkeys(self.keys.user_groups(user))
            .await
            .map_err(unavailable)?;
        groups.sort_unstable();
        Ok(groups)
    }
}

#[async_trait]
impl GroupSync for RedisStore {
    async fn group_cursors(&self, user: u64) -> StoreResult<Vec<GroupCursor>> {
        let list = self.keys.user_groups(user);
        let listed: HashMap<u64, u64> = self.conn().hgetall(&list).await.map_err(unavailable)?;
        if listed.is_empty() {
            return Ok(Vec::new());
        }
        let mut listed: Vec<(u64, u64)> = listed.into_iter().collect();
        listed.sort_unstable();
        let mut batch = self.batch();
        for &(group, _) in &listed {
            let keys = self.conv_keys(&Keys::conversation_tag(group, None));
            batch.add(&keys.meta, |pipe| {
                pipe.cmd("HMGET")
                    .arg(&keys.meta)
                    .arg(&["top", "ver", "gone"])
                    .hget(&keys.members, user);
            });
        }
        let replies = batch.run(self, &[]).await?;
        let mut out = Vec::with_capacity(listed.len());
        let mut stale = Vec::new();
        for (&(group, position), mut reply) in listed.iter().zip(replies) {
            if reply.len() != 2 {
                return Err(corrupt("group cursor"));
            }
            let member = reply.pop().and_then(|v| as_text(&v));
            let fields = array(reply.pop().unwrap_or(Value::Nil))?;
            let member = member.and_then(|m| parse_member(user, &m));
            match member {
                Some(m) if fields.len() == 3 && fields[2] == Value::Nil => out.push(GroupCursor {
                    group,
                    position: position.max(m.joined_seq),
                    top: as_u64(&fields[0])?,
                    version: as_u64(&fields[1])?,
                }),
                // Position 0: an add in flight reserved the entry; leave it to the add.
                _ if position == 0 => {}
                _ => stale.push(group),
            }
        }
        if !stale.is_empty() {
            let _: u64 = self.conn().hdel(&list, stale).await.map_err(unavailable)?;
        }
        Ok(out)
    }

    async fn group_read(&self, group: u64, after: u64, limit: usize) -> StoreResult<Vec<Message>> {
        let tag = Keys::conversation_tag(group, None);
        Ok(self
            .read_log(&tag, true, 0, HistoryPage::After(after), limit)
            .await?
            .unwrap_or_default())
    }

    async fn group_ack(&self, acks: &[(u64, Vec<(u64, u64)>)]) -> StoreResult<()> {
        let mut batch = self.batch();
        for (user, positions) in acks {
            if positions.is_empty() {
                continue;
            }
            let list = self.keys.user_groups(*user);
            let mut inv = GROUP_ACK.key(&list);
            for (group, seq) in positions.iter().take(crate::store::redis::MAX_ACK_IDS) {
                inv.arg(group).arg(seq);
            }
            batch.add(&list, |pipe| {
                pipe.invoke_script(&inv);
            });
        }
        if batch.is_empty() {
            return Ok(());
        }
        batch.run(self, &[&GROUP_ACK]).await.map(|_| ())
    }

    async fn group_check(&self, group: u64, users: &[u64]) -> StoreResult<(u64, Vec<bool>)> {
        let keys = self.conv_keys(&Keys::conversation_tag(group, None));
        let mut batch = self.batch();
        batch.add(&keys.meta, |pipe| {
            pipe.hget(&keys.meta, "ver");
            if !users.is_empty() {
                pipe.cmd("HMGET").arg(&keys.members).arg(users);
            }
        });
        let mut replies = batch.run(self, &[]).await?;
        let mut reply = std::mem::take(&mut replies[0]);
        let members = if users.is_empty() {
            Vec::new()
        } else {
            array(reply.pop().unwrap_or(Value::Nil))?
                .iter()
                .map(|v| *v != Value::Nil)
                .collect()
        };
        let version = as_u64(&reply.pop().unwrap_or(Value::Nil))?;
        Ok((version, members))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_entries_parse_with_their_seq() {
        let m = Message {
            id: "1-a".into(),
            body: "x|y".into(),
            ..Default::default()
        };
        let mut entry = b"42|-5|".to_vec();
        entry.extend(prost::Message::encode_to_vec(&m));
        let parsed = parse_entry(&entry).unwrap();
        assert_eq!(parsed.log_seq, 42);
        assert_eq!(parsed.body, "x|y");
        assert!(parse_entry(b"x|1|").is_err());
        assert!(parse_entry(b"1|2").is_err());
        assert!(parse_entry(b"1|2|\xff\xff").is_err());
    }

    #[test]
    fn member_values_parse() {
        assert_eq!(
            parse_member(7, "a:12"),
            Some(GroupMember {
                user_id: 7,
                role: Role::Admin,
                joined_seq: 12
            })
        );
        assert_eq!(parse_member(7, "x:1"), None);
        assert_eq!(parse_member(7, "m"), None);
    }
}
