//! What a route's push becomes here: Push frames in the queues of the connections it names.
//!
//! A push carries deliveries in order. Those for one recipient alone (private messages and
//! receipts: most of them) are merged per recipient into as few Push frames as
//! [`PUSH_FRAME_BYTES`] allows: a receiver with thirty messages in a push gets one frame (one
//! queue slot, one encode, one Ack back) instead of thirty. Merging never reorders what one
//! connection receives: before a delivery that cannot be merged (to everyone, or to a list)
//! the merged frames so far are queued first.

use crate::{
    chunks::{split_by_size, PUSH_FRAME_BYTES},
    conn::{ConnTable, Enqueued, Outbound},
    pb::{
        cluster::{signal, Delivery, DeliveryResult, Signal},
        frame::Body,
        Frame, Message, Push,
    },
};
use std::collections::HashMap;

/// Queues `deliveries` on the connections here; one result per delivery, in order.
/// `delivered` lists the recipients whose queue accepted the message (absent users and full
/// queues are left out); an `everyone` delivery reaches every connection but its sender's
/// and answers with a count only.
pub(crate) fn deliver(table: &ConnTable, deliveries: Vec<Delivery>) -> Vec<DeliveryResult> {
    let mut results = vec![DeliveryResult::default(); deliveries.len()];
    let mut merged = Merged::default();
    for (index, delivery) in deliveries.into_iter().enumerate() {
        let Some(message) = delivery.message else {
            continue;
        };
        if delivery.group_id != 0 {
            merged.queue(table, &mut results);
            results[index] = deliver_to_group(table, delivery.group_id, message);
            continue;
        }
        if let [recipient] = delivery.recipients[..] {
            if !delivery.everyone {
                merged.add(recipient, index, message);
                continue;
            }
        }
        merged.queue(table, &mut results);
        let sender = message.sender_id;
        let item = push_frame(vec![message]);
        results[index] = if delivery.everyone {
            DeliveryResult {
                delivered: Vec::new(),
                count: table.enqueue_all(&item, sender),
            }
        } else {
            let delivered = table.enqueue_many(&delivery.recipients, &item);
            DeliveryResult {
                count: delivered.len() as u64,
                delivered,
            }
        };
    }
    merged.queue(table, &mut results);
    results
}

/// A stored group's message: to the connections subscribed to the group, but the sender's.
/// A membership event changes the subscriptions around its own delivery (joined users get
/// it, users who left or were removed get it and nothing after).
fn deliver_to_group(table: &ConnTable, group: u64, mut message: Message) -> DeliveryResult {
    message.group_id = group;
    table
        .groups
        .before_event(&message, |user| table.get(user).is_some());
    let recipients = table.groups.members(group, message.sender_id);
    let after = message.clone();
    let delivered = table.enqueue_many(&recipients, &push_frame(vec![message]));
    table.groups.after_event(&after);
    DeliveryResult {
        count: delivered.len() as u64,
        delivered: Vec::new(),
    }
}

/// Queues signals (typing, read marks) on the connections they name, or on a group's
/// subscribers but the signal's own user; returns how many queues took one.
pub(crate) fn signal(table: &ConnTable, signals: Vec<Signal>) -> u64 {
    let mut delivered = 0;
    for s in signals {
        let (frame, from) = match s.body {
            Some(signal::Body::Typing(t)) => {
                let from = t.user_id;
                (Frame::new(Body::Typing(t)), from)
            }
            Some(signal::Body::ReadMark(m)) => {
                let from = m.user_id;
                (Frame::new(Body::ReadMark(m)), from)
            }
            None => continue,
        };
        // A group's typing goes to its members here, its read marks to those watching them.
        let recipients = match (s.group_id, &frame.body) {
            (0, _) => s.recipients,
            (g, Some(Body::ReadMark(_))) => table.groups.read_watchers(g, from),
            (g, _) => table.groups.members(g, from),
        };
        delivered += table.enqueue_many(&recipients, &Outbound::new(frame)).len() as u64;
    }
    delivered
}

fn push_frame(messages: Vec<Message>) -> Outbound {
    Outbound::new(Frame::new(Body::Push(Push {
        messages,
        replay: false,
    })))
}

/// Single-recipient deliveries waiting to be queued: per recipient (in first-seen order),
/// the messages with the index of the delivery each came in.
#[derive(Default)]
struct Merged {
    recipients: Vec<(u64, Vec<(usize, Message)>)>,
    slot: HashMap<u64, usize>,
}

impl Merged {
    fn add(&mut self, recipient: u64, index: usize, message: Message) {
        let slot = *self.slot.entry(recipient).or_insert_with(|| {
            self.recipients.push((recipient, Vec::new()));
            self.recipients.len() - 1
        });
        self.recipients[slot].1.push((index, message));
    }

    /// Queues what was merged so far, one frame per recipient unless that exceeds
    /// [`PUSH_FRAME_BYTES`], and records each delivery's outcome.
    fn queue(&mut self, table: &ConnTable, results: &mut [DeliveryResult]) {
        self.slot.clear();
        for (recipient, messages) in self.recipients.drain(..) {
            let Some(conn) = table.get(recipient) else {
                continue;
            };
            let runs = split_by_size(messages, PUSH_FRAME_BYTES, |(_, m)| {
                prost::Message::encoded_len(m)
            });
            for run in runs {
                let (indexes, messages): (Vec<usize>, Vec<Message>) = run.into_iter().unzip();
                if conn.enqueue(push_frame(messages)) != Enqueued::Queued {
                    // Full (the connection is closing as a slow consumer) or closed: the
                    // rest would not be accepted either.
                    break;
                }
                for index in indexes {
                    results[index] = DeliveryResult {
                        delivered: vec![recipient],
                        count: 1,
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::ConnShared;
    use std::sync::Arc;

    fn message(id: &str, to: u64, body_len: usize) -> Message {
        Message {
            id: id.into(),
            sender_id: 99,
            receiver_id: to,
            body: "x".repeat(body_len),
            ..Default::default()
        }
    }

    fn to(recipient: u64, m: Message) -> Delivery {
        Delivery {
            recipients: vec![recipient],
            message: Some(m),
            everyone: false,
            ..Default::default()
        }
    }

    fn table_with(users: &[u64], capacity: usize) -> (ConnTable, Vec<Arc<ConnShared>>) {
        let table = ConnTable::default();
        let conns: Vec<_> = users
            .iter()
            .map(|&u| {
                let c = Arc::new(ConnShared::new(u, format!("u{u}"), "s".into(), capacity));
                table.insert(c.clone());
                c
            })
            .collect();
        (table, conns)
    }

    /// The message ids of each Push frame queued on `conn`, frame by frame.
    fn frames(conn: &ConnShared) -> Vec<Vec<String>> {
        conn.take()
            .0
            .iter()
            .map(|item| match &item.frame().body {
                Some(Body::Push(p)) => p.messages.iter().map(|m| m.id.clone()).collect(),
                other => panic!("expected a Push, got {other:?}"),
            })
            .collect()
    }

    #[test]
    fn one_frame_per_recipient_in_order_with_a_result_per_delivery() {
        let (table, conns) = table_with(&[1, 2], 8);
        let results = deliver(
            &table,
            vec![
                to(1, message("a", 1, 1)),
                to(2, message("b", 2, 1)),
                to(1, message("c", 1, 1)),
                to(3, message("d", 3, 1)), // not here
                to(1, message("e", 1, 1)),
            ],
        );
        let delivered: Vec<Vec<u64>> = results.iter().map(|r| r.delivered.clone()).collect();
        assert_eq!(delivered, [vec![1], vec![2], vec![1], vec![], vec![1]]);
        assert_eq!(frames(&conns[0]), [vec!["a", "c", "e"]]);
        assert_eq!(frames(&conns[1]), [vec!["b"]]);
    }

    #[test]
    fn merged_frames_are_bounded_in_size() {
        let (table, conns) = table_with(&[1], 64);
        let big = PUSH_FRAME_BYTES / 3;
        let results = deliver(
            &table,
            (0..5)
                .map(|i| to(1, message(&format!("m{i}"), 1, big)))
                .collect(),
        );
        assert!(results.iter().all(|r| r.delivered == [1]));
        assert_eq!(
            frames(&conns[0]),
            [vec!["m0", "m1"], vec!["m2", "m3"], vec!["m4"]]
        );
    }

    #[test]
    fn a_delivery_that_cannot_merge_keeps_its_place() {
        let (table, conns) = table_with(&[1, 2], 8);
        let everyone = Delivery {
            recipients: Vec::new(),
            message: Some(message("all", 0, 1)),
            everyone: true,
            ..Default::default()
        };
        let results = deliver(
            &table,
            vec![
                to(1, message("a", 1, 1)),
                everyone,
                to(1, message("b", 1, 1)),
            ],
        );
        assert_eq!(results[1].count, 2);
        assert_eq!(frames(&conns[0]), [vec!["a"], vec!["all"], vec!["b"]]);
        assert_eq!(frames(&conns[1]), [vec!["all"]]);
    }

    #[test]
    fn a_full_queue_delivers_nothing_more_to_that_connection() {
        // Room for one frame: the second run overflows and closes the connection.
        let (table, conns) = table_with(&[1], 1);
        let big = PUSH_FRAME_BYTES / 2 + 1;
        let results = deliver(
            &table,
            (0..3)
                .map(|i| to(1, message(&format!("m{i}"), 1, big)))
                .collect(),
        );
        let delivered: Vec<usize> = results.iter().map(|r| r.delivered.len()).collect();
        assert_eq!(delivered, [1, 0, 0]);
        assert_eq!(conns[0].queued(), 1);
    }
}
