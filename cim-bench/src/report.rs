//! What the scenarios share for counting and reporting: failure tallies by reason, latency
//! histograms and their summaries, the once-a-second progress line, and the summary table.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio_util::sync::CancellationToken;

/// Counts of failures by reason (a short, stable text such as `login: session_invalid`).
#[derive(Debug, Default)]
pub struct Failures(Mutex<BTreeMap<String, u64>>);

impl Failures {
    pub fn add(&self, reason: impl Into<String>) {
        self.add_n(reason, 1);
    }

    pub fn add_n(&self, reason: impl Into<String>, n: u64) {
        if n > 0 {
            *lock(&self.0).entry(reason.into()).or_default() += n;
        }
    }

    pub fn total(&self) -> u64 {
        lock(&self.0).values().sum()
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        lock(&self.0).clone()
    }
}

/// A count that tasks add to and others wait on (deliveries of the fan-out scenarios).
#[derive(Debug, Default)]
pub(crate) struct Tally {
    count: std::sync::atomic::AtomicU64,
    changed: tokio::sync::Notify,
}

impl Tally {
    pub(crate) fn add(&self, n: u64) {
        if n > 0 {
            self.count
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            self.changed.notify_waiters();
        }
    }

    pub(crate) fn get(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Returns once the count is at least `target`.
    pub(crate) async fn reached(&self, target: u64) {
        loop {
            let changed = self.changed.notified();
            if self.get() >= target {
                return;
            }
            changed.await;
        }
    }
}

/// Locks a mutex; a panic elsewhere while holding it leaves counters that are still worth
/// reporting, so poisoning is ignored.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A latency histogram shared by many tasks, in microseconds from 1 µs to 10 minutes with
/// three significant digits (~0.1 % error at every size).
#[derive(Debug, Clone)]
pub struct Latencies(Arc<Mutex<Histogram<u64>>>);

impl Default for Latencies {
    fn default() -> Self {
        let histogram = Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
        Self(Arc::new(Mutex::new(histogram)))
    }
}

impl Latencies {
    pub fn record(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        lock(&self.0).saturating_record(micros);
    }

    /// Records many at one lock (receivers record a whole push batch at once).
    pub fn record_all(&self, latencies: impl IntoIterator<Item = Duration>) {
        let mut h = lock(&self.0);
        for latency in latencies {
            h.saturating_record(
                u64::try_from(latency.as_micros())
                    .unwrap_or(u64::MAX)
                    .max(1),
            );
        }
    }

    pub fn summary(&self) -> LatencySummary {
        let h = lock(&self.0);
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// Percentiles of a latency distribution, in milliseconds (all 0 when nothing was measured).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl std::fmt::Display for LatencySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {} ms, p99 {} ms, p99.9 {} ms, max {} ms",
            ms(self.p50_ms),
            ms(self.p99_ms),
            ms(self.p999_ms),
            ms(self.max_ms)
        )
    }
}

/// Milliseconds with a precision that suits their size.
pub(crate) fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.3}")
    } else if v < 1000.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// An integer with thousands separators (`12,345`).
pub(crate) fn int(v: u64) -> String {
    let digits = v.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A rate or an average with one decimal, or `-` when it could not be computed.
pub(crate) fn num(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

/// `count / secs`, or `None` for an empty interval.
pub(crate) fn per_sec(count: u64, secs: f64) -> Option<f64> {
    (secs > 0.0).then(|| count as f64 / secs)
}

/// Failure counts as `reason ×n, …`, or `none`.
pub(crate) fn failures_line(failures: &BTreeMap<String, u64>) -> String {
    if failures.is_empty() {
        return "none".into();
    }
    failures
        .iter()
        .map(|(reason, n)| format!("{reason} ×{}", int(*n)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The summary table: a title line, then one `label  value` row per line, labels aligned.
pub(crate) fn table(title: &str, rows: &[(&str, String)]) -> String {
    let width = rows
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = format!("{title}\n");
    for (label, value) in rows {
        let _ = writeln!(out, "  {label:<width$}  {value}");
    }
    out
}

/// The short name of a protocol error code: `ERROR_CODE_OVERLOADED` → `overloaded`.
pub(crate) fn code_name(code: i32) -> String {
    cim_sdk::pb::ErrorCode::try_from(code).map_or_else(
        |_| format!("code {code}"),
        |c| {
            c.as_str_name()
                .trim_start_matches("ERROR_CODE_")
                .to_ascii_lowercase()
        },
    )
}

/// Prints `line()` to stderr once a second until `stop` fires (or the task is dropped).
pub(crate) fn progress(
    enabled: bool,
    stop: CancellationToken,
    line: impl Fn() -> String + Send + 'static,
) -> Option<tokio::task::JoinHandle<()>> {
    if !enabled {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(1),
            Duration::from_secs(1),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => eprintln!("{}", line()),
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_summary_orders_percentiles() {
        let l = Latencies::default();
        assert_eq!(l.summary(), LatencySummary::default());
        l.record_all((1..=1000).map(Duration::from_micros));
        l.record(Duration::from_millis(50));
        let s = l.summary();
        assert_eq!(s.count, 1001);
        assert!(s.p50_ms > 0.49 && s.p50_ms < 0.51, "{s:?}");
        assert!(s.p50_ms <= s.p99_ms && s.p99_ms <= s.p999_ms && s.p999_ms <= s.max_ms);
        assert!((s.max_ms - 50.0).abs() < 0.1, "{s:?}");
        // Below the histogram's resolution still counts as 1 µs, never as nothing.
        l.record(Duration::ZERO);
        assert_eq!(l.summary().count, 1002);
    }

    #[test]
    fn formatting() {
        assert_eq!(int(0), "0");
        assert_eq!(int(999), "999");
        assert_eq!(int(1000), "1,000");
        assert_eq!(int(1234567), "1,234,567");
        assert_eq!(ms(1.23456), "1.235");
        assert_eq!(ms(123.45), "123.5");
        assert_eq!(num(None), "-");
        assert_eq!(per_sec(10, 0.0), None);
        assert_eq!(
            code_name(cim_sdk::pb::ErrorCode::Overloaded as i32),
            "overloaded"
        );
        assert_eq!(code_name(999), "code 999");
        let f = Failures::default();
        assert_eq!(failures_line(&f.snapshot()), "none");
        f.add("b");
        f.add_n("a", 2);
        f.add_n("c", 0);
        assert_eq!(failures_line(&f.snapshot()), "a ×2, b ×1");
        assert_eq!(f.total(), 3);
        let t = table("title", &[("a", "1".into()), ("long label", "2".into())]);
        assert_eq!(t, "title\n  a           1\n  long label  2\n");
    }
}
