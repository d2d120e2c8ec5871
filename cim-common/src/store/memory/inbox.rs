//! Inboxes in memory: per user a seq counter, the messages by seq, an id index and the
//! receipt senders, following the Redis store's scripts.

use super::*;

/// One user's inbox: the four Redis keys `inbox`, `inbox:order`, `inbox:rcpt`, `inbox:seq`.
#[derive(Default)]
pub(super) struct UserInbox {
    /// Last seq handed out (never reset).
    pub(super) last_seq: u64,
    /// seq → message (with its seq set): the order set and the hash in one.
    pub(super) entries: BTreeMap<u64, Message>,
    /// message id → seq.
    pub(super) by_id: HashMap<String, u64>,
    /// message id → sender, for messages that asked for a receipt.
    pub(super) receipts: HashMap<String, u64>,
    /// Wall-clock ms at which the whole inbox expires unless something is stored (the Redis
    /// keys' PEXPIRE); 0: nothing was ever stored.
    pub(super) expires_ms: i64,
}

impl UserInbox {
    /// Empties the inbox if it got nothing new for the max age (the Redis keys expired).
    pub(super) fn expire_idle(&mut self, now_ms: i64) {
        if self.expires_ms != 0 && now_ms >= self.expires_ms {
            self.entries.clear();
            self.by_id.clear();
            self.receipts.clear();
            self.expires_ms = 0;
        }
    }

    pub(super) fn remove_seq(&mut self, seq: u64) -> Option<Message> {
        let m = self.entries.remove(&seq)?;
        self.by_id.remove(&m.id);
        self.receipts.remove(&m.id);
        Some(m)
    }

    /// Stores `m` and returns its seq (the one it has when it is already stored).
    /// Stores `m`, sets its seq and returns it; a message already stored (same id) is
    /// replaced by the stored copy instead.
    pub(super) fn store(&mut self, m: &mut Message, limits: &InboxLimits, now_ms: i64) -> u64 {
        self.expire_idle(now_ms);
        if let Some(stored) = self.by_id.get(&m.id).and_then(|seq| self.entries.get(seq)) {
            *m = stored.clone();
            return m.seq;
        }
        self.last_seq += 1;
        let seq = self.last_seq;
        let mut stored = m.clone();
        stored.seq = seq;
        self.entries.insert(seq, stored);
        self.by_id.insert(m.id.clone(), seq);
        // Sender 0 (the system) gets no receipt: the Redis store passes 0 as "none".
        if m.receipt && m.sender_id != 0 {
            self.receipts.insert(m.id.clone(), m.sender_id);
        }
        while self.entries.len() > limits.max_messages {
            let Some((&oldest, _)) = self.entries.first_key_value() else {
                break;
            };
            self.remove_seq(oldest);
        }
        // Drop the expired oldest messages now rather than at the next read (memory is
        // what this store has to spare); an expired one behind a newer one waits for a read.
        let oldest_ms = oldest_kept_ms(limits, now_ms);
        while let Some((&oldest, first)) = self.entries.first_key_value() {
            if first.timestamp_ms >= oldest_ms || oldest == seq {
                break;
            }
            self.remove_seq(oldest);
        }
        self.expires_ms = now_ms.saturating_add(max_age_ms(limits));
        m.seq = seq;
        seq
    }
}

pub(super) fn max_age_ms(limits: &InboxLimits) -> i64 {
    i64::try_from(limits.max_age.as_millis())
        .unwrap_or(i64::MAX)
        .max(1)
}

#[async_trait]
impl Delivery for MemoryStore {
    async fn inbox_store(&self, messages: &mut [Message]) -> StoreResult<()> {
        let now_ms = crate::time::now_ms();
        let mut state = self.lock();
        for m in messages.iter_mut() {
            state
                .inboxes
                .entry(m.receiver_id)
                .or_default()
                .store(m, &self.limits, now_ms);
        }
        Ok(())
    }
}

#[async_trait]
impl Inbox for MemoryStore {
    async fn inbox_read(
        &self,
        user_id: u64,
        after_seq: u64,
        limit: usize,
    ) -> StoreResult<Vec<Message>> {
        let limit = limit.min(MAX_INBOX_READ);
        let now_ms = crate::time::now_ms();
        let oldest_ms = oldest_kept_ms(&self.limits, now_ms);
        let mut state = self.lock();
        let Some(inbox) = state.inboxes.get_mut(&user_id) else {
            return Ok(Vec::new());
        };
        inbox.expire_idle(now_ms);
        let mut out = Vec::new();
        let mut expired = Vec::new();
        if limit > 0 {
            for (&seq, m) in inbox.entries.range(after_seq.saturating_add(1)..) {
                if m.timestamp_ms < oldest_ms {
                    expired.push(seq);
                    continue;
                }
                out.push(m.clone());
                if out.len() == limit {
                    break;
                }
            }
        }
        for seq in expired {
            inbox.remove_seq(seq);
        }
        Ok(out)
    }

    async fn inbox_top(&self, user_id: u64) -> StoreResult<u64> {
        Ok(self
            .lock()
            .inboxes
            .get(&user_id)
            .map_or(0, |inbox| inbox.last_seq))
    }

    async fn inbox_ack(&self, acks: &[(u64, Vec<String>)]) -> StoreResult<Vec<AckedReceipt>> {
        let now_ms = crate::time::now_ms();
        let mut state = self.lock();
        let mut receipts = Vec::new();
        for (user_id, ids) in acks {
            let Some(inbox) = state.inboxes.get_mut(user_id) else {
                continue;
            };
            inbox.expire_idle(now_ms);
            for id in ack_ids(ids) {
                let Some(seq) = inbox.by_id.get(id.as_str()).copied() else {
                    continue;
                };
                let sender = inbox.receipts.get(id.as_str()).copied();
                inbox.remove_seq(seq);
                if let Some(sender_id) = sender {
                    // Kept until the receipt is stored for its sender (`receipts_done`).
                    inbox.receipts.insert(id.clone(), sender_id);
                    receipts.push(AckedReceipt {
                        message_id: id.clone(),
                        sender_id,
                        receiver_id: *user_id,
                    });
                }
            }
        }
        Ok(receipts)
    }

    async fn receipts_done(&self, done: &[(u64, Vec<String>)]) -> StoreResult<()> {
        let mut state = self.lock();
        for (user_id, ids) in done {
            if let Some(inbox) = state.inboxes.get_mut(user_id) {
                for id in ack_ids(ids) {
                    inbox.receipts.remove(id.as_str());
                }
            }
        }
        Ok(())
    }

    async fn pending_receipts(&self, user_id: u64, limit: usize) -> StoreResult<Vec<AckedReceipt>> {
        let now_ms = crate::time::now_ms();
        let mut state = self.lock();
        let Some(inbox) = state.inboxes.get_mut(&user_id) else {
            return Ok(Vec::new());
        };
        inbox.expire_idle(now_ms);
        Ok(inbox
            .receipts
            .iter()
            .filter(|(id, _)| !inbox.by_id.contains_key(id.as_str()))
            .take(limit)
            .map(|(id, &sender_id)| AckedReceipt {
                message_id: id.clone(),
                sender_id,
                receiver_id: user_id,
            })
            .collect())
    }

    async fn inbox_len(&self, user_id: u64) -> StoreResult<usize> {
        let mut state = self.lock();
        Ok(state.inboxes.get_mut(&user_id).map_or(0, |inbox| {
            inbox.expire_idle(crate::time::now_ms());
            inbox.entries.len()
        }))
    }
}
