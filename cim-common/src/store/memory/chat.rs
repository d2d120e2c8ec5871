//! Groups, conversation logs, read marks and group positions in memory.
//!
//! A group is its members (with roles and the seq of their joining event), a name, a
//! membership version and its log; every change and its event are one step under the lock.
//! A disbanded group stays in the map without members (its id is never reused; only
//! [`GroupSync::group_read`] still reads its log, which ages out like any other). Private
//! logs are keyed by the ordered pair of users; each user has the set of peers they have a
//! log with and the set of their groups, so the conversation list is computed from those.
//!
//! Logs are a deque in `log_seq` order: trimmed from the front to `max_messages` on append,
//! and from the front while the oldest message is past `max_age` (on append and on read);
//! an expired message behind a newer one is skipped by reads. The seq counter of a log is
//! never reset. The ids of the last [`DEDUP_WINDOW`] appends are remembered with their seq,
//! whether or not the message itself is still kept.

use super::*;
use crate::store::chat::*;

/// One conversation's log.
#[derive(Default)]
pub(super) struct Log {
    /// Seq of the newest message appended (the top; never reset).
    pub(super) last_seq: u64,
    /// The kept messages, `log_seq` increasing (not necessarily contiguous: see the module doc).
    messages: VecDeque<Message>,
    /// (message id, seq) of the last [`DEDUP_WINDOW`] appends, oldest first.
    recent: VecDeque<(String, u64)>,
}

impl Log {
    /// A retry of a message appended within the window: `m` becomes the stored copy (or, if
    /// that was trimmed already, gets its seq) and `true` is returned.
    fn repeat(&self, m: &mut Message) -> bool {
        let Some(&(_, seq)) = self.recent.iter().rev().find(|(id, _)| *id == m.id) else {
            return false;
        };
        match self.get(seq) {
            Some(stored) => *m = stored.clone(),
            None => m.log_seq = seq,
        }
        true
    }

    fn get(&self, seq: u64) -> Option<&Message> {
        let i = self.messages.partition_point(|m| m.log_seq < seq);
        self.messages.get(i).filter(|m| m.log_seq == seq)
    }

    /// Appends `m` with the next seq (set in `m`), then trims: the count, and the expired
    /// messages at the front (never the one just appended).
    fn push(&mut self, m: &mut Message, limits: &HistoryLimits, now_ms: i64) -> u64 {
        self.last_seq += 1;
        m.log_seq = self.last_seq;
        self.messages.push_back(m.clone());
        self.recent.push_back((m.id.clone(), self.last_seq));
        if self.recent.len() > DEDUP_WINDOW {
            self.recent.pop_front();
        }
        while self.messages.len() > limits.max_messages {
            self.messages.pop_front();
        }
        let oldest_ms = oldest_kept_ms(limits, now_ms);
        while self.messages.len() > 1
            && self
                .messages
                .front()
                .is_some_and(|m| m.timestamp_ms < oldest_ms)
        {
            self.messages.pop_front();
        }
        self.last_seq
    }

    /// Drops the expired messages at the front (a read's share of the trimming).
    fn expire(&mut self, oldest_ms: i64) {
        while self
            .messages
            .front()
            .is_some_and(|m| m.timestamp_ms < oldest_ms)
        {
            self.messages.pop_front();
        }
    }

    /// The newest message not expired.
    fn newest(&self, oldest_ms: i64) -> Option<&Message> {
        self.messages
            .iter()
            .rev()
            .find(|m| m.timestamp_ms >= oldest_ms)
    }

    /// Kept messages with `from <= seq < to`, not expired, in seq order.
    fn range(
        &self,
        from: u64,
        to: u64,
        oldest_ms: i64,
    ) -> impl DoubleEndedIterator<Item = &Message> {
        let start = self.messages.partition_point(|m| m.log_seq < from);
        let end = self.messages.partition_point(|m| m.log_seq < to).max(start);
        self.messages
            .range(start..end)
            .filter(move |m| m.timestamp_ms >= oldest_ms)
    }

    /// A page of the messages from `first` on: [`HistoryPage`] semantics, oldest first.
    fn page(&self, first: u64, page: HistoryPage, limit: usize, oldest_ms: i64) -> Vec<Message> {
        if limit == 0 {
            return Vec::new();
        }
        match page {
            HistoryPage::Before(before) => {
                let before = if before == 0 { u64::MAX } else { before };
                let mut out: Vec<Message> = self
                    .range(first, before, oldest_ms)
                    .rev()
                    .take(limit)
                    .cloned()
                    .collect();
                out.reverse();
                out
            }
            HistoryPage::After(after) => self
                .range(first.max(after.saturating_add(1)), u64::MAX, oldest_ms)
                .take(limit)
                .cloned()
                .collect(),
        }
    }
}

/// A stored group.
pub(super) struct Group {
    name: String,
    owner: u64,
    created_ms: i64,
    /// Membership version: bumped by create, add, remove and disband.
    version: u64,
    members: BTreeMap<u64, GroupMember>,
    log: Log,
    disbanded: bool,
}

impl Group {
    fn info(&self, id: u64) -> GroupInfo {
        GroupInfo {
            id,
            name: self.name.clone(),
            owner: self.owner,
            created_ms: self.created_ms,
            members: self.members.len() as u64,
            top: self.log.last_seq,
            version: self.version,
        }
    }
}

/// Oldest `timestamp_ms` kept under `limits` at `now_ms`.
fn oldest_kept_ms(limits: &HistoryLimits, now_ms: i64) -> i64 {
    let max_age_ms = i64::try_from(limits.max_age.as_millis()).unwrap_or(i64::MAX);
    now_ms.saturating_sub(max_age_ms)
}

/// The key of the private log of `a` and `b`: one log whoever reads it.
fn pair(a: u64, b: u64) -> (u64, u64) {
    (a.min(b), a.max(b))
}

fn set_user_ids(event: &mut Message, users: &[u64]) {
    if let Some(e) = event.group_event.as_mut() {
        e.user_ids = users.to_vec();
    }
}

impl State {
    /// The live (not disbanded) group `id`.
    fn live_group(&mut self, id: u64) -> Option<&mut Group> {
        self.groups.get_mut(&id).filter(|g| !g.disbanded)
    }

    /// Appends a group's change `event` to its log and returns its seq.
    fn append_event(
        &mut self,
        group: u64,
        event: &mut Message,
        limits: &HistoryLimits,
        now_ms: i64,
    ) -> u64 {
        event.group_id = group;
        match self.groups.get_mut(&group) {
            Some(g) => g.log.push(event, limits, now_ms),
            None => 0,
        }
    }

    /// Forgets `user` in `group`: their entry in their group list, read mark and position.
    fn forget_membership(&mut self, user: u64, group: u64) {
        if let Some(mine) = self.user_groups.get_mut(&user) {
            mine.remove(&group);
            if mine.is_empty() {
                self.user_groups.remove(&user);
            }
        }
        self.read_marks.remove(&(user, ConvKey::Group(group)));
        self.positions.remove(&(user, group));
    }

    fn groups_of(&self, user: u64) -> usize {
        self.user_groups.get(&user).map_or(0, BTreeSet::len)
    }

    fn read_mark(&self, user: u64, conv: ConvKey) -> u64 {
        self.read_marks.get(&(user, conv)).copied().unwrap_or(0)
    }

    /// Moves a read mark forward to `seq` (never back) and returns it.
    fn raise_read_mark(&mut self, user: u64, conv: ConvKey, seq: u64) -> u64 {
        let mark = self.read_marks.entry((user, conv)).or_insert(0);
        *mark = (*mark).max(seq);
        *mark
    }
}

#[async_trait]
impl Groups for MemoryStore {
    async fn group_create(
        &self,
        owner: u64,
        name: &str,
        event: &mut Message,
        limits: GroupLimits,
    ) -> StoreResult<Option<GroupInfo>> {
        let now_ms = crate::time::now_ms();
        let mut state = self.lock();
        if state.groups_of(owner) >= limits.max_groups {
            return Ok(None);
        }
        state.last_group_id += 1;
        let id = state.last_group_id;
        let mut group = Group {
            name: name.to_string(),
            owner,
            created_ms: event.timestamp_ms,
            version: 1,
            members: BTreeMap::new(),
            log: Log::default(),
            disbanded: false,
        };
        event.group_id = id;
        let seq = group.log.push(event, &self.history, now_ms);
        group.members.insert(
            owner,
            GroupMember {
                user_id: owner,
                role: Role::Owner,
                joined_seq: seq,
            },
        );
        let info = group.info(id);
        state.groups.insert(id, group);
        state.user_groups.entry(owner).or_default().insert(id);
        // What a member sees from their join on starts read (as in the Redis store).
        state.raise_read_mark(owner, ConvKey::Group(id), seq);
        Ok(Some(info))
    }

    async fn group_info(&self, group: u64) -> StoreResult<Option<GroupInfo>> {
        Ok(self.lock().live_group(group).map(|g| g.info(group)))
    }

    async fn group_member(&self, group: u64, user: u64) -> StoreResult<Option<GroupMember>> {
        Ok(self
            .lock()
            .live_group(group)
            .and_then(|g| g.members.get(&user).copied()))
    }

    async fn group_members(
        &self,
        group: u64,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<GroupMember>> {
        let limit = limit.min(MAX_MEMBERS_PAGE);
        Ok(self.lock().live_group(group).map_or_else(Vec::new, |g| {
            g.members
                .range((Bound::Excluded(after), Bound::Unbounded))
                .take(limit)
                .map(|(_, m)| *m)
                .collect()
        }))
    }

    async fn group_add(
        &self,
        group: u64,
        users: &[u64],
        event: &mut Message,
        limits: GroupLimits,
    ) -> StoreResult<AddOutcome> {
        let now_ms = crate::time::now_ms();
        let mut state = self.lock();
        let mut outcome = AddOutcome::default();
        let Some(g) = state.groups.get(&group).filter(|g| !g.disbanded) else {
            outcome.no_group = true;
            return Ok(outcome);
        };
        let members = g.members.len();
        let mut seen = BTreeSet::new();
        let mut candidates = Vec::new();
        for &user in users {
            if !seen.insert(user) {
                continue;
            }
            if g.members.contains_key(&user) {
                outcome.already.push(user);
            } else if state.groups_of(user) >= limits.max_groups {
                outcome.too_many_groups.push(user);
            } else {
                candidates.push(user);
            }
        }
        if members + candidates.len() > limits.max_members {
            outcome.group_full = true;
            return Ok(outcome);
        }
        if candidates.is_empty() {
            return Ok(outcome);
        }
        set_user_ids(event, &candidates);
        let seq = state.append_event(group, event, &self.history, now_ms);
        if let Some(g) = state.groups.get_mut(&group) {
            g.version += 1;
            for &user in &candidates {
                g.members.insert(
                    user,
                    GroupMember {
                        user_id: user,
                        role: Role::Member,
                        joined_seq: seq,
                    },
                );
            }
        }
        for &user in &candidates {
            state.user_groups.entry(user).or_default().insert(group);
            state.raise_read_mark(user, ConvKey::Group(group), seq);
        }
        outcome.added = candidates;
        outcome.seq = seq;
        Ok(outcome)
    }

    async fn group_remove(
        &self,
        group: u64,
        users: &[u64],
        event: &mut Message,
    ) -> StoreResult<u64> {
        let now_ms = crate::time::now_ms();
        let mut state = self.lock();
        let Some(g) = state.live_group(group) else {
            return Ok(0);
        };
        let mut removed = Vec::new();
        for &user in users {
            // The owner stays: the caller disbands or transfers instead.
            if user != g.owner && g.members.remove(&user).is_some() {
                removed.push(user);
            }
        }
        if removed.is_empty() {
            return Ok(0);
        }
        g.version += 1;
        set_user_ids(event, &removed);
        let seq = state.append_event(group, event, &self.history, now_ms);
        for user in removed {
            state.forget_membership(user, group);
        }
        Ok(seq)
    }

    async fn group_set_role(
        &self,
        group: u64,
        user: u64,
        role: Role,
        event: &mut Message,
    ) -> StoreResult<Changed> {
        let now_ms = crate::time::now_ms();
        let mut state = self.lock();
        let Some(g) = state.live_group(group) else {
            return Ok(Changed::NoGroup);
        };
        // The owner's role is not changed here (nor anyone made owner): as in the Redis store.
        let Some(member) = g
            .members
            .get_mut(&user)
            .filter(|m| m.role != Role::Owner && role != Role::Owner)
        else {
            return Ok(Changed::NotMember);
        };
        member.role = role;
        Ok(Changed::Done(state.append_event(
            group,
            event,
            &self.history,
            now_ms,
        )))
    }

    async fn group_rename(
        &self,
        group: u64,
        name: &str,
        event: &mut Message,
    ) -> StoreResult<Changed> {
        let now_ms = crate::time::now_ms();
        let mut state = self.lock();
        let Some(g) = state.live_group(group) else {
            return Ok(Changed::NoGroup);
        };
        g.name = name.to_string();
        Ok(Changed::Done(state.append_event(
            group,
            event,
            &self.history,
            now_ms,
        )))
    }

    async fn group_disband(&self, group: u64, event: &mut Message) -> StoreResult<Changed> {
        let now_ms = crate::time::now_ms();
        let mut state = self.lock();
        let Some(g) = state.live_group(group) else {
            return Ok(Changed::NoGroup);
        };
        g.disbanded = true;
        g.version += 1;
        let members: Vec<u64> = std::mem::take(&mut g.members).into_keys().collect();
        let seq = state.append_event(group, event, &self.history, now_ms);
        for user in members {
            state.forget_membership(user, group);
        }
        Ok(Changed::Done(seq))
    }

    async fn user_groups(&self, user: u64) -> StoreResult<Vec<u64>> {
        Ok(self
            .lock()
            .user_groups
            .get(&user)
            .map(|mine| mine.iter().copied().collect())
            .unwrap_or_default())
    }
}

#[async_trait]
impl History for MemoryStore {
    async fn private_append(&self, messages: &mut [Message]) -> StoreResult<()> {
        let now_ms = crate::time::now_ms();
        let mut state = self.lock();
        for m in messages.iter_mut() {
            // System messages (sender 0) and messages without a receiver have no pair log.
            if m.sender_id == 0 || m.receiver_id == 0 {
                continue;
            }
            let (sender, receiver) = (m.sender_id, m.receiver_id);
            let log = state
                .private_logs
                .entry(pair(sender, receiver))
                .or_default();
            if log.repeat(m) {
                continue;
            }
            let seq = log.push(m, &self.history, now_ms);
            state.user_peers.entry(sender).or_default().insert(receiver);
            state.user_peers.entry(receiver).or_default().insert(sender);
            state.raise_read_mark(sender, ConvKey::User(receiver), seq);
        }
        Ok(())
    }

    async fn group_append(&self, messages: &mut [Message]) -> StoreResult<Vec<GroupAppend>> {
        let now_ms = crate::time::now_ms();
        let mut state = self.lock();
        let mut out = Vec::with_capacity(messages.len());
        for m in messages.iter_mut() {
            let group = m.group_id;
            let sender = m.sender_id;
            let Some(g) = state.live_group(group) else {
                out.push(GroupAppend::NoGroup);
                continue;
            };
            if sender != 0 && !g.members.contains_key(&sender) {
                out.push(GroupAppend::NotMember);
                continue;
            }
            let version = g.version;
            if g.log.repeat(m) {
                out.push(GroupAppend::Appended {
                    version,
                    repeat: true,
                });
                continue;
            }
            let seq = g.log.push(m, &self.history, now_ms);
            if sender != 0 {
                state.raise_read_mark(sender, ConvKey::Group(group), seq);
            }
            out.push(GroupAppend::Appended {
                version,
                repeat: false,
            });
        }
        Ok(out)
    }

    async fn history(
        &self,
        viewer: u64,
        conv: ConvKey,
        page: HistoryPage,
        limit: usize,
    ) -> StoreResult<Option<Vec<Message>>> {
        let limit = limit.min(MAX_HISTORY_READ);
        let oldest_ms = oldest_kept_ms(&self.history, crate::time::now_ms());
        let before_join = self.history.before_join;
        let mut state = self.lock();
        let (log, first) = match conv {
            ConvKey::User(peer) => match state.private_logs.get_mut(&pair(viewer, peer)) {
                Some(log) => (log, 1),
                None => return Ok(Some(Vec::new())),
            },
            ConvKey::Group(group) => {
                let Some(g) = state.live_group(group) else {
                    return Ok(None);
                };
                let Some(member) = g.members.get(&viewer) else {
                    return Ok(None);
                };
                let first = member.joined_seq.saturating_sub(before_join).max(1);
                (&mut g.log, first)
            }
        };
        log.expire(oldest_ms);
        Ok(Some(log.page(first, page, limit, oldest_ms)))
    }

    async fn conversations(
        &self,
        user: u64,
        before_ms: Option<i64>,
        limit: usize,
    ) -> StoreResult<Vec<ConversationSummary>> {
        let limit = limit.min(MAX_CONVERSATIONS_PAGE);
        let oldest_ms = oldest_kept_ms(&self.history, crate::time::now_ms());
        let state = self.lock();
        let mut all = Vec::new();
        for &peer in state.user_peers.get(&user).into_iter().flatten() {
            let Some(log) = state.private_logs.get(&pair(user, peer)) else {
                continue;
            };
            // A conversation whose messages all aged out is gone from the list.
            let Some(last) = log.newest(oldest_ms) else {
                continue;
            };
            let conv = ConvKey::User(peer);
            let read_seq = state.read_mark(user, conv);
            all.push(ConversationSummary {
                conv,
                name: String::new(),
                activity_ms: last.timestamp_ms,
                last: Some(last.clone()),
                top: log.last_seq,
                read_seq,
                unread: log.last_seq.saturating_sub(read_seq),
                peer_read_seq: state.read_mark(peer, ConvKey::User(user)),
            });
        }
        for &group in state.user_groups.get(&user).into_iter().flatten() {
            let Some(g) = state.groups.get(&group).filter(|g| !g.disbanded) else {
                continue;
            };
            let conv = ConvKey::Group(group);
            let last = g.log.newest(oldest_ms);
            let read_seq = state.read_mark(user, conv);
            all.push(ConversationSummary {
                conv,
                name: g.name.clone(),
                activity_ms: last.map_or(g.created_ms, |m| m.timestamp_ms),
                last: last.cloned(),
                top: g.log.last_seq,
                read_seq,
                unread: g.log.last_seq.saturating_sub(read_seq),
                peer_read_seq: 0,
            });
        }
        if let Some(before) = before_ms {
            all.retain(|c| c.activity_ms < before);
        }
        // Newest first; equal activities in descending `encode()` order, as a reverse range
        // of a sorted set orders equal scores.
        all.sort_by(|a, b| {
            b.activity_ms
                .cmp(&a.activity_ms)
                .then_with(|| b.conv.encode().cmp(&a.conv.encode()))
        });
        all.truncate(limit);
        Ok(all)
    }

    async fn mark_read(&self, user: u64, conv: ConvKey, seq: u64) -> StoreResult<Option<u64>> {
        let mut state = self.lock();
        let top = match conv {
            ConvKey::User(peer) => state
                .private_logs
                .get(&pair(user, peer))
                .map_or(0, |log| log.last_seq),
            ConvKey::Group(group) => match state.live_group(group) {
                Some(g) if g.members.contains_key(&user) => g.log.last_seq,
                _ => return Ok(None),
            },
        };
        Ok(Some(state.raise_read_mark(user, conv, seq.min(top))))
    }
}

#[async_trait]
impl GroupSync for MemoryStore {
    async fn group_cursors(&self, user: u64) -> StoreResult<Vec<GroupCursor>> {
        let state = self.lock();
        Ok(state
            .user_groups
            .get(&user)
            .into_iter()
            .flatten()
            .filter_map(|&group| {
                let g = state.groups.get(&group).filter(|g| !g.disbanded)?;
                let member = g.members.get(&user)?;
                let acked = state.positions.get(&(user, group)).copied().unwrap_or(0);
                Some(GroupCursor {
                    group,
                    position: acked.max(member.joined_seq),
                    top: g.log.last_seq,
                    version: g.version,
                })
            })
            .collect())
    }

    async fn group_read(&self, group: u64, after: u64, limit: usize) -> StoreResult<Vec<Message>> {
        let limit = limit.min(MAX_HISTORY_READ);
        let oldest_ms = oldest_kept_ms(&self.history, crate::time::now_ms());
        let mut state = self.lock();
        let Some(g) = state.groups.get_mut(&group) else {
            return Ok(Vec::new());
        };
        g.log.expire(oldest_ms);
        Ok(g.log.page(1, HistoryPage::After(after), limit, oldest_ms))
    }

    async fn group_ack(&self, acks: &[(u64, Vec<(u64, u64)>)]) -> StoreResult<()> {
        let mut state = self.lock();
        for (user, groups) in acks {
            for &(group, seq) in groups {
                let top = match state.live_group(group) {
                    Some(g) if g.members.contains_key(user) => g.log.last_seq,
                    _ => continue,
                };
                // Clamped to the top: a position past it would skip messages not yet sent.
                let position = state.positions.entry((*user, group)).or_insert(0);
                *position = (*position).max(seq.min(top));
            }
        }
        Ok(())
    }

    async fn group_check(&self, group: u64, users: &[u64]) -> StoreResult<(u64, Vec<bool>)> {
        let state = self.lock();
        Ok(match state.groups.get(&group) {
            Some(g) => (
                g.version,
                users.iter().map(|u| g.members.contains_key(u)).collect(),
            ),
            None => (0, vec![false; users.len()]),
        })
    }
}

/// What the shared suite cannot see: that removals leave no per-user state behind (the
/// memory the store would otherwise keep for ever), and a retry of a trimmed message.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::MessageKind;

    fn message(id: &str, sender: u64, group: u64) -> Message {
        Message {
            id: id.to_string(),
            sender_id: sender,
            kind: MessageKind::GroupChat as i32,
            timestamp_ms: crate::time::now_ms(),
            group_id: group,
            ..Message::default()
        }
    }

    #[tokio::test]
    async fn removal_and_disband_drop_marks_positions_and_lists() {
        let store = MemoryStore::new();
        let limits = GroupLimits::default();
        let g = store
            .group_create(1, "g", &mut message("c", 1, 0), limits)
            .await
            .unwrap()
            .unwrap()
            .id;
        let added = store
            .group_add(g, &[2, 3], &mut message("j", 1, 0), limits)
            .await
            .unwrap();
        assert_eq!(added.added, [2, 3]);
        store
            .group_append(&mut [message("m2", 2, g), message("m3", 3, g)])
            .await
            .unwrap();
        store
            .group_ack(&[(2, vec![(g, 4)]), (3, vec![(g, 4)])])
            .await
            .unwrap();
        {
            let state = store.lock();
            // The owner's (from creation) and the two members' (from their join, then sends).
            assert_eq!(state.read_marks.len(), 3);
            assert_eq!(state.positions.len(), 2);
        }

        store
            .group_remove(g, &[2], &mut message("r", 1, 0))
            .await
            .unwrap();
        {
            let state = store.lock();
            assert!(!state.read_marks.contains_key(&(2, ConvKey::Group(g))));
            assert!(!state.positions.contains_key(&(2, g)));
            assert!(!state.user_groups.contains_key(&2));
            assert!(state.positions.contains_key(&(3, g)));
        }

        store
            .group_disband(g, &mut message("d", 1, 0))
            .await
            .unwrap();
        let state = store.lock();
        assert!(state.read_marks.is_empty());
        assert!(state.positions.is_empty());
        assert!(state.user_groups.is_empty());
        assert!(state.groups[&g].members.is_empty());
    }

    #[tokio::test]
    async fn a_retry_of_a_trimmed_message_gets_its_seq() {
        let store = MemoryStore::new().with_history_limits(HistoryLimits {
            max_messages: 2,
            ..HistoryLimits::default()
        });
        let g = store
            .group_create(1, "g", &mut message("c", 1, 0), GroupLimits::default())
            .await
            .unwrap()
            .unwrap()
            .id;
        let mut batch: Vec<Message> = (0..4).map(|i| message(&format!("m{i}"), 1, g)).collect();
        store.group_append(&mut batch).await.unwrap();
        assert_eq!(store.group_read(g, 0, 10).await.unwrap().len(), 2);
        let mut retry = [message("m0", 1, g)];
        retry[0].body = "retried".to_string();
        let outcome = store.group_append(&mut retry).await.unwrap();
        assert!(matches!(
            outcome[..],
            [GroupAppend::Appended { repeat: true, .. }]
        ));
        assert_eq!(retry[0].log_seq, 2, "the first attempt's seq");
        assert_eq!(store.group_info(g).await.unwrap().unwrap().top, 5);
    }
}
