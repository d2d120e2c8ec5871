//! Latency histogram: log-linear buckets (64 per power of two, so within ~1.6 % of the true
//! value) over nanoseconds, mergeable across processes. A client process sends its non-empty
//! buckets to the parent, which adds them up before taking percentiles.

use serde::{Deserialize, Serialize};

/// Buckets per power of two (and the exact range below `2 * SUB`).
const SUB: u64 = 64;
const SUB_BITS: u32 = 6;
const BUCKETS: usize = (2 * SUB + (64 - SUB_BITS as u64 - 1) * SUB) as usize;

#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

/// The non-empty buckets of a histogram, as `[index, count]`, plus its exact maximum.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sparse {
    pub buckets: Vec<(u32, u64)>,
    pub max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }
}

fn index(v: u64) -> usize {
    if v < 2 * SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // ≥ SUB_BITS + 1
    let shift = exp - SUB_BITS;
    (2 * SUB + (exp - SUB_BITS - 1) as u64 * SUB + ((v >> shift) - SUB)) as usize
}

/// The middle of bucket `i`.
fn value(i: usize) -> u64 {
    let i = i as u64;
    if i < 2 * SUB {
        return i;
    }
    let exp = (i - 2 * SUB) / SUB + SUB_BITS as u64 + 1;
    let shift = exp - SUB_BITS as u64;
    let low = ((i - 2 * SUB) % SUB + SUB) << shift;
    low + (1 << shift) / 2
}

impl Histogram {
    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.total += 1;
        self.max = self.max.max(v);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at quantile `q` (0..=1), never above the recorded maximum.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(value(i).min(self.max));
            }
        }
        Some(self.max)
    }

    pub fn to_sparse(&self) -> Sparse {
        Sparse {
            buckets: (self.counts.iter().enumerate())
                .filter(|(_, &c)| c > 0)
                .map(|(i, &c)| (i as u32, c))
                .collect(),
            max: self.max,
        }
    }

    /// Adds another histogram's buckets (ignoring indexes out of range).
    pub fn merge(&mut self, other: &Sparse) {
        for &(i, c) in &other.buckets {
            if let Some(slot) = self.counts.get_mut(i as usize) {
                *slot += c;
                self.total += c;
            }
        }
        self.max = self.max.max(other.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_close() {
        let mut last = 0;
        for v in 0..200_000u64 {
            let i = index(v);
            assert!(i >= last, "{v}: index went down");
            last = i;
            let mid = value(i) as f64;
            assert!(
                (mid - v as f64).abs() <= 1.0 + v as f64 / 60.0,
                "{v} → {mid}"
            );
        }
        for e in 8..64 {
            let v = 1u64 << e;
            for v in [v - 1, v, v + 1, v | (v >> 1)] {
                let mid = value(index(v)) as f64;
                assert!((mid / v as f64 - 1.0).abs() < 0.02, "{v} → {mid}");
            }
        }
        assert!(index(u64::MAX) < BUCKETS);
    }

    #[test]
    fn quantiles_and_merge() {
        let mut a = Histogram::default();
        for v in 1..=1000 {
            a.record(v * 1000);
        }
        let p50 = a.quantile(0.5).unwrap() as f64;
        assert!((p50 - 500_000.0).abs() < 10_000.0, "{p50}");
        assert_eq!(a.quantile(1.0), Some(1_000_000));
        let mut b = Histogram::default();
        b.merge(&a.to_sparse());
        b.merge(&a.to_sparse());
        assert_eq!(b.count(), 2000);
        assert_eq!(b.max(), 1_000_000);
        assert_eq!(Histogram::default().quantile(0.5), None);
    }
}
