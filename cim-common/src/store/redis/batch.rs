//! [`Batch`]: commands on many keys, sent in as few round trips as the deployment allows. On
//! a single Redis everything goes in one pipeline, in the order it was added. On a Redis
//! Cluster a pipeline may only touch one hash slot, so commands are grouped by the slot of
//! the key they name: one pipeline per slot touched, sent concurrently (the cluster
//! connection routes each to its node; those of one node share its connection). Commands of
//! one slot keep their order; commands of different slots have none, unless the batch is run
//! [`in order`](Batch::run_in_order).
//!
//! A unit is what one caller adds for one slot (a script call and a lookup of the same user,
//! a `MULTI … EXEC` block): it always lands in one pipeline, and its replies come back
//! together. Units keep every reply (no `ignore()`), so the count of a unit's replies is the
//! count of its commands.

use super::*;
use crate::keys::hash_slot;
use std::collections::HashMap;

/// Commands grouped for sending; see the module docs.
pub(super) struct Batch {
    cluster: bool,
    /// (slot, pipeline, units in it, in order); one group on a single Redis.
    groups: Vec<(u16, ::redis::Pipeline, Vec<usize>)>,
    /// Group of each slot (cluster only).
    by_slot: HashMap<u16, usize>,
    /// Commands of each unit.
    sizes: Vec<usize>,
}

impl Batch {
    pub(super) fn new(cluster: bool) -> Self {
        Self {
            cluster,
            groups: Vec::new(),
            by_slot: HashMap::new(),
            sizes: Vec::new(),
        }
    }

    /// Adds one unit: the commands `build` adds, on keys of `key`'s slot. Returns the unit's
    /// index in the answer of [`run`](Self::run).
    pub(super) fn add(&mut self, key: &str, build: impl FnOnce(&mut ::redis::Pipeline)) -> usize {
        let slot = if self.cluster {
            hash_slot(key.as_bytes())
        } else {
            0
        };
        let group = match self.by_slot.get(&slot) {
            Some(&g) => g,
            None => {
                self.groups.push((slot, ::redis::pipe(), Vec::new()));
                self.by_slot.insert(slot, self.groups.len() - 1);
                self.groups.len() - 1
            }
        };
        let (_, pipe, units) = &mut self.groups[group];
        let before = pipe.len();
        build(pipe);
        let unit = self.sizes.len();
        self.sizes.push(pipe.len() - before);
        units.push(unit);
        unit
    }

    pub(super) fn is_empty(&self) -> bool {
        self.sizes.is_empty()
    }

    /// Sends every group at once; the replies of each unit, by unit index.
    pub(super) async fn run(
        self,
        store: &RedisStore,
        scripts: &[&Script],
    ) -> StoreResult<Vec<Vec<Value>>> {
        let replies = futures_util::future::try_join_all(
            self.groups
                .iter()
                .map(|(_, pipe, _)| store.run_scripts::<Vec<Value>>(pipe, scripts)),
        )
        .await?;
        self.split(replies)
    }

    /// Sends the groups one after the other, in the order their slots were first added to:
    /// what one group writes is in place before the next group's commands run.
    pub(super) async fn run_in_order(
        self,
        store: &RedisStore,
        scripts: &[&Script],
    ) -> StoreResult<Vec<Vec<Value>>> {
        let mut replies = Vec::with_capacity(self.groups.len());
        for (_, pipe, _) in &self.groups {
            replies.push(store.run_scripts::<Vec<Value>>(pipe, scripts).await?);
        }
        self.split(replies)
    }

    /// The replies of each group cut into its units' replies.
    fn split(self, replies: Vec<Vec<Value>>) -> StoreResult<Vec<Vec<Value>>> {
        let mut out: Vec<Vec<Value>> = vec![Vec::new(); self.sizes.len()];
        for ((_, _, units), replies) in self.groups.into_iter().zip(replies) {
            let expected: usize = units.iter().map(|&u| self.sizes[u]).sum();
            if replies.len() != expected {
                return Err(StoreError::Corrupt(format!(
                    "pipeline: {} replies for {expected} commands",
                    replies.len()
                )));
            }
            let mut replies = replies.into_iter();
            for unit in units {
                out[unit] = replies.by_ref().take(self.sizes[unit]).collect();
            }
        }
        Ok(out)
    }
}

impl RedisStore {
    /// One command on each shard's key (`key(shard)`, the command from `build`), in one batch:
    /// each shard's reply as `T`, in shard order (what every read over a shard-wide key does).
    pub(super) async fn per_shard<T: ::redis::FromRedisValue>(
        &self,
        key: impl Fn(usize) -> String,
        build: impl Fn(&mut ::redis::Pipeline, &str),
        what: &str,
    ) -> StoreResult<Vec<T>> {
        let mut batch = self.batch();
        for shard in 0..self.keys.shards() {
            let key = key(shard);
            batch.add(&key, |pipe| build(pipe, &key));
        }
        batch
            .run(self, &[])
            .await?
            .into_iter()
            .map(|replies| parse(single(replies)?, what))
            .collect()
    }
}

/// The one reply of a one-command unit.
pub(super) fn single(mut replies: Vec<Value>) -> StoreResult<Value> {
    match (replies.pop(), replies.is_empty()) {
        (Some(v), true) => Ok(v),
        _ => Err(StoreError::Corrupt("pipeline: one reply expected".into())),
    }
}

/// The one reply of one-command unit `unit`, as `T` (see [`parse`]).
pub(super) fn take<T: ::redis::FromRedisValue>(
    replies: &mut [Vec<Value>],
    unit: usize,
    what: &str,
) -> StoreResult<T> {
    let replies = replies
        .get_mut(unit)
        .map(std::mem::take)
        .ok_or_else(|| StoreError::Corrupt(format!("{what}: no reply")))?;
    parse(single(replies)?, what)
}

/// A reply as `T`, or the store's corrupt error naming `what`.
pub(super) fn parse<T: ::redis::FromRedisValue>(value: Value, what: &str) -> StoreResult<T> {
    ::redis::from_redis_value(value).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_land_whole_in_the_group_of_their_slot() {
        let keys = Keys::with_shards("t", 4);
        let mut batch = Batch::new(true);
        let a = batch.add(&keys.route(1), |p| {
            p.get(keys.route(1)).get(keys.login(1));
        });
        let b = batch.add(&keys.route(2), |p| {
            p.get(keys.route(2));
        });
        let c = batch.add(&keys.inbox(1), |p| {
            p.get(keys.inbox_seq(1));
        });
        assert_eq!((a, b, c), (0, 1, 2));
        assert_eq!(batch.groups.len(), 2);
        assert_eq!(batch.groups[0].2, [0, 2]);
        let replies = vec![
            vec![Value::Int(1), Value::Int(2), Value::Int(3)],
            vec![Value::Int(4)],
        ];
        let out = batch.split(replies).unwrap();
        assert_eq!(
            out,
            [
                vec![Value::Int(1), Value::Int(2)],
                vec![Value::Int(4)],
                vec![Value::Int(3)]
            ]
        );
    }

    #[test]
    fn a_single_redis_gets_one_pipeline_and_short_replies_are_corrupt() {
        let keys = Keys::new("t");
        let mut batch = Batch::new(false);
        for id in 1..=3 {
            batch.add(&keys.route(id), |p| {
                p.get(keys.route(id));
            });
        }
        assert_eq!(batch.groups.len(), 1);
        let err = batch.split(vec![vec![Value::Nil]]).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    }
}
