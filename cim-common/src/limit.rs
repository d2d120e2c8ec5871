//! Keyed rate limits: a token bucket (GCRA, from `governor`) per key, e.g. per user for a
//! connection's sends, per name and per address for failed logins.
//!
//! Memory is per key that was limited recently, not per key ever seen: [`KeyedLimit::prune`]
//! (run periodically) drops keys whose bucket is full again, which is indistinguishable
//! from a new one. A rate of 0 turns the limit off (every check passes, nothing is kept).

use governor::{
    clock::{Clock, DefaultClock},
    DefaultKeyedRateLimiter, Quota,
};
use std::{hash::Hash, num::NonZeroU32, time::Duration};

/// At most `per_sec` on average per key, `burst` at once.
pub struct KeyedLimit<K: Hash + Eq + Clone> {
    limiter: Option<DefaultKeyedRateLimiter<K>>,
    clock: DefaultClock,
}

impl<K: Hash + Eq + Clone> KeyedLimit<K> {
    /// `per_sec` 0: no limit. `burst` is at least 1.
    pub fn new(per_sec: u32, burst: u32) -> Self {
        match NonZeroU32::new(per_sec) {
            None => Self::off(),
            Some(rate) => Self::with_quota(Quota::per_second(rate), burst),
        }
    }

    /// One token every `period` (tests use hours: no refill while they run).
    pub fn per_period(period: Duration, burst: u32) -> Self {
        match Quota::with_period(period) {
            None => Self::off(),
            Some(quota) => Self::with_quota(quota, burst),
        }
    }

    fn with_quota(quota: Quota, burst: u32) -> Self {
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: Some(DefaultKeyedRateLimiter::keyed(quota.allow_burst(burst))),
            clock: DefaultClock::default(),
        }
    }

    fn off() -> Self {
        Self {
            limiter: None,
            clock: DefaultClock::default(),
        }
    }

    /// Takes one token of `key`'s bucket, or says how long until one is there.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        match &self.limiter {
            None => Ok(()),
            Some(limiter) => limiter
                .check_key(key)
                .map_err(|not_until| not_until.wait_time_from(self.clock.now())),
        }
    }

    /// Forgets keys whose bucket is full again (they behave as new ones).
    pub fn prune(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Keys held (an estimate).
    pub fn keys(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds_per_key() {
        let limit = KeyedLimit::per_period(Duration::from_secs(3600), 3);
        for _ in 0..3 {
            assert_eq!(limit.check(&1u64), Ok(()));
        }
        let wait = limit.check(&1).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(3600),
            "{wait:?}"
        );
        // Another key has its own bucket.
        assert_eq!(limit.check(&2), Ok(()));
        assert_eq!(limit.keys(), 2);
    }

    #[test]
    fn a_rate_of_zero_is_no_limit_and_keeps_nothing() {
        let limit = KeyedLimit::new(0, 0);
        for _ in 0..10_000 {
            assert_eq!(limit.check(&7u64), Ok(()));
        }
        assert_eq!(limit.keys(), 0);
    }
}
