//! Inboxes in Redis: storing (a pipeline of one `INBOX_STORE` script call per receiver),
//! reads, acks (one MULTI/EXEC per user), receipts. Four keys per user under one hash tag; see
//! the module doc of [`super`].

use super::*;

/// Most messages one inbox read returns, whatever the caller asks for.
pub const MAX_INBOX_READ: usize = 1000;
/// Most ids one ack entry (one user) is looked at; the rest are ignored.
pub const MAX_ACK_IDS: usize = 1024;
/// Longest message id an ack looks up (longer ones cannot exist and are ignored).
pub const MAX_ACK_ID_LEN: usize = 128;

/// The ids of an ack entry that are looked at: the first [`MAX_ACK_IDS`], without those
/// longer than [`MAX_ACK_ID_LEN`] bytes.
pub(in crate::store) fn ack_ids(ids: &[String]) -> impl Iterator<Item = &String> {
    ids.iter()
        .take(MAX_ACK_IDS)
        .filter(|id| id.len() <= MAX_ACK_ID_LEN)
}

/// The receipt senders of an ack's `EXEC` reply (`[zmscore, zrem, hdel, hmget]`): for each
/// of the `n` ids that this ack removed, the sender waiting for its receipt, if one was.
pub(in crate::store) fn ack_receipt_senders(
    exec: Value,
    n: usize,
) -> StoreResult<Vec<Option<u64>>> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("inbox ack reply: {what}"));
    let Value::Array(mut results) = exec else {
        return Err(corrupt("not an array"));
    };
    if results.len() != 4 {
        return Err(corrupt("not 4 results"));
    }
    let Value::Array(senders) = results.swap_remove(3) else {
        return Err(corrupt("receipt senders not an array"));
    };
    let Value::Array(scores) = results.swap_remove(0) else {
        return Err(corrupt("scores not an array"));
    };
    if senders.len() != n || scores.len() != n {
        return Err(corrupt("one sender and one score per id expected"));
    }
    senders
        .into_iter()
        .zip(scores)
        .map(|(v, score)| match v {
            // Not there when acked (acked before, or never stored): no receipt from this ack.
            _ if score == Value::Nil => Ok(None),
            Value::Nil => Ok(None),
            Value::BulkString(b) => std::str::from_utf8(&b)
                .ok()
                .and_then(|s| s.parse().ok())
                .map(Some)
                .ok_or_else(|| corrupt("a sender is not a user id")),
            _ => Err(corrupt("a sender is not a string")),
        })
        .collect()
}

/// The oldest `timestamp_ms` an inbox still delivers at `now_ms`.
pub(in crate::store) fn oldest_kept_ms(limits: &InboxLimits, now_ms: i64) -> i64 {
    let max_age_ms = i64::try_from(limits.max_age.as_millis()).unwrap_or(i64::MAX);
    now_ms.saturating_sub(max_age_ms)
}

/// An inbox store's script calls (one per receiver) and how to read their answers.
pub(super) struct StorePlan {
    /// Each receiver and its call, in call order.
    calls: Vec<(u64, ScriptInvocation<'static>)>,
    /// Messages per receiver, in call order.
    receivers: Vec<usize>,
    /// Position in the slice of each message, in call order.
    order: Vec<usize>,
}

impl StorePlan {
    /// Sets each message's seq (and, for one stored already, puts the stored copy in its
    /// place) from the calls' answers.
    fn apply(self, messages: &mut [Message], per_receiver: Vec<Value>) -> StoreResult<()> {
        if per_receiver.len() != self.receivers.len() {
            return Err(StoreError::Corrupt(format!(
                "inbox store: {} answers for {} receivers",
                per_receiver.len(),
                self.receivers.len()
            )));
        }
        let mut answers: Vec<(u64, Option<Vec<u8>>)> = Vec::with_capacity(messages.len());
        for (reply, &n) in per_receiver.into_iter().zip(&self.receivers) {
            answers.extend(stored_answers(reply, n)?);
        }
        for (pos, (seq, stored)) in self.order.into_iter().zip(answers) {
            let m = &mut messages[pos];
            // Already stored (a retry): the stored copy is the message (its timestamp, its
            // receipt request), not the one this retry built.
            if let Some(bytes) = stored {
                match <Message as prost::Message>::decode(bytes.as_slice()) {
                    Ok(copy) => *m = copy,
                    Err(e) => {
                        tracing::warn!(id = %m.id, error = %e, "stored message does not decode")
                    }
                }
            }
            m.seq = seq;
        }
        Ok(())
    }
}

/// The answers of one INBOX_STORE call for `n` messages: each message's seq and, when it
/// was stored already, the stored copy. See the script for the two reply shapes.
pub(in crate::store) fn stored_answers(
    reply: Value,
    n: usize,
) -> StoreResult<Vec<(u64, Option<Vec<u8>>)>> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("inbox store reply: {what}"));
    let seq = |v: &Value| match v {
        Value::Int(i) => u64::try_from(*i).map_err(|_| corrupt("negative seq")),
        _ => Err(corrupt("seq is not an integer")),
    };
    match reply {
        Value::Int(_) => {
            let first = seq(&reply)?;
            Ok((0..n as u64).map(|j| (first + j, None)).collect())
        }
        Value::Array(items) if items.len() >= n && (items.len() - n).is_multiple_of(2) => {
            let mut answers = items[..n]
                .iter()
                .map(|v| Ok((seq(v)?, None)))
                .collect::<StoreResult<Vec<_>>>()?;
            for pair in items[n..].chunks_exact(2) {
                let k = usize::try_from(seq(&pair[0])?).unwrap_or(usize::MAX);
                let slot = k
                    .checked_sub(1)
                    .and_then(|i| answers.get_mut(i))
                    .ok_or_else(|| corrupt("copy of a message not in the call"))?;
                slot.1 = match &pair[1] {
                    Value::BulkString(b) => Some(b.clone()),
                    // The hash lost it (an inbox half-expired): go on with this copy.
                    _ => None,
                };
            }
            Ok(answers)
        }
        _ => Err(corrupt("unexpected shape")),
    }
}

#[async_trait]
impl Delivery for RedisStore {
    async fn inbox_store(&self, messages: &mut [Message]) -> StoreResult<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut plan = self.inbox_store_plan(messages);
        let mut batch = self.batch();
        self.add_store_calls(&mut batch, &mut plan);
        let replies = batch.run(self, &[&INBOX_STORE]).await?;
        plan.apply(
            messages,
            replies
                .into_iter()
                .map(batch::single)
                .collect::<StoreResult<_>>()?,
        )
    }

    async fn inbox_store_then_routes(
        &self,
        messages: &mut [Message],
        user_ids: &[u64],
    ) -> (StoreResult<()>, StoreResult<Vec<Option<RouteEntry>>>) {
        if messages.is_empty() || user_ids.is_empty() {
            return super::store_then_routes_in_turn(self, messages, user_ids).await;
        }
        // The lookup after the store, in one round trip: on a single Redis one pipeline, the
        // MGET last (sent again whole after a NOSCRIPT, so it always follows the store); on a
        // cluster each receiver's lookup in its store call's pipeline (the same slot), so each
        // receiver's lookup follows its own store, which is what a login relies on.
        let mut plan = self.inbox_store_plan(messages);
        let mut batch = self.batch();
        let calls = self.add_store_calls(&mut batch, &mut plan);
        let lookups: Vec<usize> = if self.is_cluster() {
            user_ids
                .iter()
                .map(|&id| {
                    let route = self.keys.route(id);
                    batch.add(&route, |pipe| {
                        pipe.get(&route);
                    })
                })
                .collect()
        } else {
            let mget = self.routes_lookup(user_ids);
            vec![batch.add("", |pipe| {
                pipe.add_command(mget);
            })]
        };
        let mut replies = match batch.run(self, &[&INBOX_STORE]).await {
            Ok(replies) => replies,
            Err(e) => return (Err(e.clone()), Err(e)),
        };
        let values: StoreResult<Vec<Option<String>>> = if self.is_cluster() {
            lookups
                .iter()
                .map(|&unit| batch::take(&mut replies, unit, "route lookup"))
                .collect()
        } else {
            batch::take(&mut replies, lookups[0], "route lookup")
        };
        let routes = values.map(|values| Self::routes_of(user_ids, values));
        let stored = replies
            .into_iter()
            .take(calls)
            .map(batch::single)
            .collect::<StoreResult<Vec<_>>>()
            .and_then(|per_receiver| plan.apply(messages, per_receiver));
        (stored, routes)
    }
}

#[async_trait]
impl Inbox for RedisStore {
    async fn inbox_read(
        &self,
        user_id: u64,
        after_seq: u64,
        limit: usize,
    ) -> StoreResult<Vec<Message>> {
        let limit = limit.min(MAX_INBOX_READ);
        let oldest_ms = oldest_kept_ms(&self.limits, crate::time::now_ms());
        let mut out: Vec<Message> = Vec::new();
        // (id, seq) of entries found expired or undecodable, removed with the next call.
        let mut prune: Vec<(String, u64)> = Vec::new();
        let mut after = after_seq;
        // Skipped entries leave a page short; read on after them so that a short page still
        // means "nothing more". Each pass removes what the previous one skipped, so expired
        // messages are read past (and deleted) once.
        while out.len() < limit {
            let want = limit - out.len();
            let mut pipe = ::redis::pipe();
            if !prune.is_empty() {
                pipe.invoke_script(&self.prune_invocation(user_id, &prune))
                    .ignore();
                prune.clear();
            }
            pipe.invoke_script(
                INBOX_READ
                    .key(self.keys.inbox(user_id))
                    .key(self.keys.inbox_order(user_id))
                    .key(self.keys.inbox_receipts(user_id))
                    .arg(after)
                    .arg(want),
            );
            let (entries,): (Vec<(String, u64, Option<Vec<u8>>)>,) = self
                .run_scripts(&pipe, &[&INBOX_PRUNE, &INBOX_READ])
                .await?;
            let scanned = entries.len();
            for (id, seq, value) in entries {
                after = after.max(seq);
                // A missing value was already dropped by the script (an inbox half-expired).
                let Some(value) = value else { continue };
                match Message::decode(value.as_slice()) {
                    Ok(mut m) if m.timestamp_ms >= oldest_ms => {
                        m.seq = seq;
                        out.push(m);
                    }
                    Ok(_) => prune.push((id, seq)),
                    Err(e) => {
                        tracing::warn!(user_id, message_id = %id, seq, error = %e,
                            "inbox: dropping a stored message that does not decode");
                        prune.push((id, seq));
                    }
                }
            }
            if scanned < want {
                break;
            }
        }
        if !prune.is_empty() {
            // Best effort: what is left is skipped (and removed) by the next read.
            let result: StoreResult<()> = self
                .run_scripts(
                    ::redis::pipe()
                        .invoke_script(&self.prune_invocation(user_id, &prune))
                        .ignore(),
                    &[&INBOX_PRUNE],
                )
                .await;
            if let Err(e) = result {
                tracing::debug!(user_id, error = %e, "inbox: removing expired messages failed");
            }
        }
        Ok(out)
    }

    async fn inbox_top(&self, user_id: u64) -> StoreResult<u64> {
        let top: Option<u64> = self
            .conn()
            .get(self.keys.inbox_seq(user_id))
            .await
            .map_err(unavailable)?;
        Ok(top.unwrap_or(0))
    }

    async fn inbox_ack(&self, acks: &[(u64, Vec<String>)]) -> StoreResult<Vec<AckedReceipt>> {
        // One MULTI/EXEC per user (its keys share a hash tag), in one batch: which of
        // the messages are there, remove them, read their receipt requests (which stay until
        // `receipts_done`). Atomic per user, so of two concurrent acks of a message only one
        // finds it there, and only that one returns its receipt. (A Lua script did this
        // first: its fixed cost, ~8 µs per call in Redis, was most of an ack.)
        let mut batch = self.batch();
        let mut acked = Vec::new();
        for (user, ids) in acks {
            let ids: Vec<&String> = ack_ids(ids).collect();
            if ids.is_empty() {
                continue;
            }
            let receipts = self.keys.inbox_receipts(*user);
            let order = self.keys.inbox_order(*user);
            // Inside MULTI every reply is QUEUED; EXEC answers them all, in this order
            // (what `ack_receipt_senders` reads).
            batch.add(&order, |pipe| {
                pipe.cmd("MULTI");
                for (command, key) in [
                    ("ZMSCORE", &order),
                    ("ZREM", &order),
                    ("HDEL", &self.keys.inbox(*user)),
                    ("HMGET", &receipts),
                ] {
                    pipe.cmd(command).arg(key).arg(&ids);
                }
                pipe.cmd("EXEC");
            });
            acked.push((*user, ids));
        }
        if acked.is_empty() {
            return Ok(Vec::new());
        }
        // The EXEC answer is the last of each unit's.
        let replies: Vec<Value> = batch
            .run(self, &[])
            .await?
            .into_iter()
            .map(|mut unit| unit.pop().unwrap_or(Value::Nil))
            .collect();
        let mut out = Vec::new();
        for ((receiver_id, ids), reply) in acked.into_iter().zip(replies) {
            let senders = ack_receipt_senders(reply, ids.len())?;
            let mut seen = HashSet::new();
            for (id, sender) in ids.into_iter().zip(senders) {
                // An id acked twice in one call finds the same request twice: one receipt.
                if let Some(sender_id) = sender {
                    if seen.insert(id) {
                        out.push(AckedReceipt {
                            message_id: id.clone(),
                            sender_id,
                            receiver_id,
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    async fn receipts_done(&self, done: &[(u64, Vec<String>)]) -> StoreResult<()> {
        let mut batch = self.batch();
        for (user, ids) in done {
            let ids: Vec<&String> = ack_ids(ids).collect();
            if !ids.is_empty() {
                let receipts = self.keys.inbox_receipts(*user);
                batch.add(&receipts, |pipe| {
                    pipe.cmd("HDEL").arg(&receipts).arg(&ids);
                });
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        batch.run(self, &[]).await.map(drop)
    }

    async fn pending_receipts(&self, user_id: u64, limit: usize) -> StoreResult<Vec<AckedReceipt>> {
        let mut c = self.conn();
        // One page of the requests (HSCAN's COUNT is a hint), then which of their messages
        // are still in the inbox: those are not acked yet.
        let (_, fields): (u64, Vec<(String, u64)>) = ::redis::cmd("HSCAN")
            .arg(self.keys.inbox_receipts(user_id))
            .arg(0)
            .arg("COUNT")
            .arg(limit.max(1))
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        if fields.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&String> = fields.iter().map(|(id, _)| id).collect();
        let scores: Vec<Option<f64>> = ::redis::cmd("ZMSCORE")
            .arg(self.keys.inbox_order(user_id))
            .arg(&ids)
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(fields
            .into_iter()
            .zip(scores)
            .filter(|(_, score)| score.is_none())
            .take(limit)
            .map(|((message_id, sender_id), _)| AckedReceipt {
                message_id,
                sender_id,
                receiver_id: user_id,
            })
            .collect())
    }

    async fn inbox_len(&self, user_id: u64) -> StoreResult<usize> {
        self.conn()
            .zcard(self.keys.inbox_order(user_id))
            .await
            .map_err(unavailable)
    }
}

impl RedisStore {
    /// The inbox max age as a PEXPIRE argument (at least 1 ms: 0 would delete at once).
    pub(super) fn max_age_ms(&self) -> u64 {
        u64::try_from(self.limits.max_age.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    pub(super) fn prune_invocation(
        &self,
        user_id: u64,
        entries: &[(String, u64)],
    ) -> ScriptInvocation<'static> {
        let mut invocation = INBOX_PRUNE.prepare_invoke();
        invocation
            .key(self.keys.inbox(user_id))
            .key(self.keys.inbox_order(user_id))
            .key(self.keys.inbox_receipts(user_id));
        for (id, seq) in entries {
            invocation.arg(id).arg(seq);
        }
        invocation
    }

    /// One `INBOX_STORE` call per receiver, their messages in slice order.
    pub(super) fn inbox_store_plan(&self, messages: &mut [Message]) -> StorePlan {
        let max_messages = self.limits.max_messages;
        let max_age_ms = self.max_age_ms();
        let mut by_receiver: Vec<(u64, Vec<usize>)> = Vec::new();
        let mut index: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
        for (pos, m) in messages.iter().enumerate() {
            let slot = *index.entry(m.receiver_id).or_insert_with(|| {
                by_receiver.push((m.receiver_id, Vec::new()));
                by_receiver.len() - 1
            });
            by_receiver[slot].1.push(pos);
        }
        let mut calls = Vec::with_capacity(by_receiver.len());
        let mut order = Vec::with_capacity(messages.len());
        for (user, positions) in &by_receiver {
            let user = *user;
            let mut invocation = INBOX_STORE.prepare_invoke();
            invocation
                .key(self.keys.inbox(user))
                .key(self.keys.inbox_order(user))
                .key(self.keys.inbox_receipts(user))
                .key(self.keys.inbox_seq(user))
                .arg(max_messages)
                .arg(max_age_ms);
            for &pos in positions {
                let m = &mut messages[pos];
                // Stored without its seq: the order set holds it, and a read puts it back.
                let seq = std::mem::take(&mut m.seq);
                let bytes = m.encode_to_vec();
                m.seq = seq;
                let receipt_sender = if m.receipt { m.sender_id } else { 0 };
                invocation.arg(&m.id).arg(bytes).arg(receipt_sender);
                order.push(pos);
            }
            calls.push((user, invocation));
        }
        StorePlan {
            calls,
            receivers: by_receiver.into_iter().map(|(_, p)| p.len()).collect(),
            order,
        }
    }

    /// Adds the plan's script calls to `batch`, one unit each (units `0..n`, in call order);
    /// returns `n`.
    fn add_store_calls(&self, batch: &mut Batch, plan: &mut StorePlan) -> usize {
        let calls = std::mem::take(&mut plan.calls);
        let n = calls.len();
        for (user, invocation) in calls {
            batch.add(&self.keys.inbox(user), |pipe| {
                pipe.invoke_script(&invocation);
            });
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_replies_give_the_senders_waiting_for_receipts() {
        let score = || Value::BulkString(b"3".to_vec());
        let exec = Value::Array(vec![
            Value::Array(vec![score(), score(), Value::Nil]),
            Value::Int(2),
            Value::Int(2),
            Value::Array(vec![
                Value::Nil,
                Value::BulkString(b"17".to_vec()),
                Value::BulkString(b"18".to_vec()),
            ]),
        ]);
        // The third was not there when acked (acked before): no receipt from this ack.
        assert_eq!(
            ack_receipt_senders(exec, 3).unwrap(),
            [None, Some(17), None]
        );
    }

    #[test]
    fn malformed_ack_replies_are_corrupt_not_panics() {
        let senders = |v: Vec<Value>| {
            let scores = v.iter().map(|_| Value::BulkString(b"1".to_vec())).collect();
            Value::Array(vec![
                Value::Array(scores),
                Value::Int(1),
                Value::Int(1),
                Value::Array(v),
            ])
        };
        let bad = [
            Value::Nil,
            Value::Int(1),
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![
                Value::Array(vec![Value::Nil]),
                Value::Int(1),
                Value::Int(1),
                Value::Nil,
            ]),
            Value::Array(vec![
                Value::Nil,
                Value::Int(1),
                Value::Int(1),
                Value::Array(vec![Value::Nil]),
            ]),
            senders(vec![]),
            senders(vec![Value::BulkString(b"bob".to_vec())]),
            senders(vec![Value::BulkString(b"-1".to_vec())]),
            senders(vec![Value::Int(3)]),
        ];
        for reply in bad {
            assert!(
                matches!(
                    ack_receipt_senders(reply.clone(), 1),
                    Err(StoreError::Corrupt(_))
                ),
                "{reply:?}"
            );
        }
    }

    #[test]
    fn stored_answers_of_new_messages_follow_the_first_seq() {
        let answers = stored_answers(Value::Int(41), 3).unwrap();
        assert_eq!(answers, [(41, None), (42, None), (43, None)]);
    }

    #[test]
    fn stored_answers_carry_the_copies_of_retries() {
        let reply = Value::Array(vec![
            Value::Int(1),
            Value::Int(5),
            Value::Int(1),
            Value::Int(3),
            Value::BulkString(b"copy".to_vec()),
            Value::Int(1),
            Value::Nil,
        ]);
        let answers = stored_answers(reply, 3).unwrap();
        assert_eq!(answers, [(1, None), (5, None), (1, Some(b"copy".to_vec()))]);
    }

    #[test]
    fn malformed_store_replies_are_corrupt_not_panics() {
        // Each answers a call of one message.
        let bad = [
            Value::Int(-1),
            Value::Nil,
            Value::Array(vec![]),
            Value::Array(vec![Value::Int(1), Value::Int(2), Value::Int(9)]),
            Value::Array(vec![Value::Int(1), Value::Int(0), Value::Nil]),
            Value::Array(vec![Value::Int(1), Value::Int(7), Value::Nil]),
            Value::Array(vec![Value::Int(1), Value::Int(-3), Value::Nil]),
            Value::Array(vec![Value::Int(1), Value::Int(1)]),
            Value::Array(vec![Value::SimpleString("x".into())]),
        ];
        for reply in bad {
            assert!(
                matches!(
                    stored_answers(reply.clone(), 1),
                    Err(StoreError::Corrupt(_))
                ),
                "{reply:?}"
            );
        }
    }
}
