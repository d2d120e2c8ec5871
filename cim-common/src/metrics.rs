//! Prometheus metrics: what servers, routes and standalone share.
//!
//! Every cim instance keeps its own [`Registry`] (no global one: tests run several servers and
//! routes in one process, and standalone runs one of each), built at startup with the
//! instance's metrics and kept in its state. The internal listener answers `GET /metrics`
//! with [`respond`], which encodes the instance's registry in the OpenMetrics text format and
//! adds what belongs to the process: [`BUILD_INFO`] and the `process_*` metrics (resident
//! memory, open file descriptors, CPU seconds, read from `/proc` at scrape time).
//!
//! Rules every cim metric follows (so the hot paths stay as fast as without them):
//! - label values are `&'static str` from fixed tables ([`Labels`]): a user id, a channel name
//!   or an address can never become a label value, and every label set is bounded;
//! - the handles of labelled series are resolved once (at startup, or on first use through a
//!   [`Series`] cell) and kept: updating a metric is one atomic add, with no string formatting,
//!   hashing or lock;
//! - gauges that mirror a queue or a table are read when scraped, not updated per item.

use axum::{
    http::{header, StatusCode},
    response::{IntoResponse, Response},
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::ConstCounter,
        family::Family,
        gauge::{ConstGauge, Gauge},
    },
    registry::{Registry, Unit},
};
use std::sync::OnceLock;

/// Content type of [`respond`]'s body.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Name of the build information gauge (always 1, the version in its label).
pub const BUILD_INFO: &str = "cim_build_info";

/// A label set: pairs of label name and value, both from fixed tables.
pub type Labels = Vec<(&'static str, &'static str)>;

/// The `/metrics` answer: `registry` in the OpenMetrics text format, then the process's own
/// metrics.
pub fn respond(registry: &Registry) -> Response {
    respond_all(&[registry])
}

/// [`respond`] for several registries in one answer (standalone: its route's and its
/// server's). Their metric names must not overlap.
pub fn respond_all(registries: &[&Registry]) -> Response {
    match encode_all(registries) {
        Ok(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "encoding metrics failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed").into_response()
        }
    }
}

/// What one `/metrics` answer encodes of an instance: its registry, after bringing the
/// gauges read at scrape time up to date.
pub trait Source: Send + Sync + 'static {
    /// Updates what is read when scraped (queue depths); nothing by default.
    fn refresh(&self) {}

    fn registry(&self) -> &Registry;
}

/// [`respond_all`] for instances: each one refreshed, then encoded in order.
pub fn respond_sources(sources: &[&dyn Source]) -> Response {
    for source in sources {
        source.refresh();
    }
    let registries: Vec<&Registry> = sources.iter().map(|s| s.registry()).collect();
    respond_all(&registries)
}

/// The text [`respond_all`] answers.
pub fn encode_all(registries: &[&Registry]) -> Result<String, std::fmt::Error> {
    use prometheus_client::encoding::text;
    let mut body = String::with_capacity(8192);
    for registry in registries {
        text::encode_registry(&mut body, registry)?;
    }
    text::encode_registry(&mut body, process_registry())?;
    text::encode_eof(&mut body)?;
    Ok(body)
}

/// The process's section: build info and `/proc` readings. The same for every instance in
/// the process, so it is built once.
fn process_registry() -> &'static Registry {
    static PROCESS: OnceLock<Registry> = OnceLock::new();
    PROCESS.get_or_init(|| {
        let mut registry = Registry::default();
        let info: Family<Labels, Gauge> = Family::default();
        info.get_or_create(&vec![("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        registry.register(
            BUILD_INFO,
            "cim build: always 1, the version in its label",
            info,
        );
        registry.register_collector(Box::new(ProcessCollector));
        registry
    })
}

/// `process_resident_memory_bytes`, `process_open_fds`, `process_cpu_seconds_total`, read
/// from `/proc` at each scrape (absent where `/proc` cannot tell).
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(usage) = crate::procinfo::self_usage() {
            let rss = ConstGauge::new(i64::try_from(usage.rss_bytes).unwrap_or(i64::MAX));
            let m = encoder.encode_descriptor(
                "process_resident_memory",
                "Resident memory of the process",
                Some(&Unit::Bytes),
                rss.metric_type(),
            )?;
            rss.encode(m)?;
            let cpu = ConstCounter::new(usage.cpu_ms as f64 / 1000.0);
            let m = encoder.encode_descriptor(
                "process_cpu",
                "User and system CPU time of the process",
                Some(&Unit::Seconds),
                cpu.metric_type(),
            )?;
            cpu.encode(m)?;
        }
        if let Some(fds) = crate::procinfo::open_fds() {
            let fds = ConstGauge::new(i64::try_from(fds).unwrap_or(i64::MAX));
            let m = encoder.encode_descriptor(
                "process_open_fds",
                "Open file descriptors of the process",
                None,
                fds.metric_type(),
            )?;
            fds.encode(m)?;
        }
        Ok(())
    }
}

/// A labelled family whose series are picked by index into a fixed table of label sets, each
/// resolved on first use and then kept: [`Series::get`] is a load of an initialized cell, no
/// hashing, no lock. Only series that were used appear in the output, except those
/// [`Series::init`] / [`Series::init_all`] created up front: the servers and routes create
/// every series of their fixed tables at start, so each is exported at 0 before its first
/// event and `rate()` / `increase()` see the first one (Prometheus' advice for labels known in
/// advance; the dashboard's queries and `deploy_files.rs` rely on the families being there).
pub struct Series<M> {
    family: Family<Labels, M>,
    cells: Box<[OnceLock<M>]>,
    labels: fn(usize) -> Labels,
}

impl<M: Clone + Default> Series<M>
where
    Family<Labels, M>: prometheus_client::registry::Metric,
{
    /// `n` series; series `i` has the labels `labels(i)`. Registered in `registry` as `name`.
    pub fn register(
        registry: &mut Registry,
        name: &str,
        help: &str,
        n: usize,
        labels: fn(usize) -> Labels,
    ) -> Self {
        let family: Family<Labels, M> = Family::default();
        registry.register(name, help, family.clone());
        Self {
            family,
            cells: (0..n).map(|_| OnceLock::new()).collect(),
            labels,
        }
    }
}

impl<M: Clone + Default> Series<M> {
    /// Series `i` (an index past the table is clamped to its last entry, which callers keep
    /// for "other").
    pub fn get(&self, i: usize) -> &M {
        let i = i.min(self.cells.len().saturating_sub(1));
        self.cells[i].get_or_init(|| self.family.get_or_create_owned(&(self.labels)(i)))
    }

    /// Creates series `i` now, so it is exported (at zero) before its first update.
    pub fn init(&self, i: usize) -> &Self {
        self.get(i);
        self
    }

    /// Creates every series now.
    pub fn init_all(&self) -> &Self {
        for i in 0..self.cells.len() {
            self.get(i);
        }
        self
    }
}

impl<M> std::fmt::Debug for Series<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Series")
            .field("series", &self.cells.len())
            .finish_non_exhaustive()
    }
}

/// Adds one to `gauge` now and takes it off again when dropped (something open: a connection,
/// a subscriber, a held sender).
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Every [`crate::pb::ErrorCode`], by its protobuf number: the lower-case names used as label
/// values (`failed_<code>` outcomes, login failure reasons).
pub const ERROR_CODES: [&str; 19] = [
    "unspecified",
    "bad_frame",
    "frame_too_large",
    "unsupported_frame",
    "login_required",
    "login_timeout",
    "invalid_token",
    "token_expired",
    "wrong_server",
    "session_invalid",
    "heartbeat_timeout",
    "unknown_user",
    "bad_request",
    "unavailable",
    "internal",
    "overloaded",
    "forbidden",
    "server_full",
    "rate_limited",
];

/// The label value of an error code.
pub fn error_code_label(code: crate::pb::ErrorCode) -> &'static str {
    ERROR_CODES
        .get(code as usize)
        .copied()
        .unwrap_or("unspecified")
}

/// Every frame kind ([`crate::pb::Frame::kind_name`]), indexed by [`frame_kind_index`].
pub const FRAME_KINDS: [&str; 14] = [
    "unknown",
    "login",
    "login_result",
    "ping",
    "pong",
    "send",
    "send_result",
    "push",
    "kick",
    "error",
    "ack",
    "read_mark",
    "typing",
    "watch_reads",
];

/// The index in [`FRAME_KINDS`] of `frame`'s kind (a match on the body's variant: no string).
pub fn frame_kind_index(frame: &crate::pb::Frame) -> usize {
    use crate::pb::frame::Body;
    match &frame.body {
        None => 0,
        Some(Body::Login(_)) => 1,
        Some(Body::LoginResult(_)) => 2,
        Some(Body::Ping(_)) => 3,
        Some(Body::Pong(_)) => 4,
        Some(Body::Send(_)) => 5,
        Some(Body::SendResult(_)) => 6,
        Some(Body::Push(_)) => 7,
        Some(Body::Kick(_)) => 8,
        Some(Body::Error(_)) => 9,
        Some(Body::Ack(_)) => 10,
        Some(Body::ReadMark(_)) => 11,
        Some(Body::Typing(_)) => 12,
        Some(Body::WatchReads(_)) => 13,
    }
}

/// One parsed sample: metric name, labels (name, value) in order, value.
pub type Sample = (String, Vec<(String, String)>, f64);

/// Parses the OpenMetrics / Prometheus text format into `(name, labels, value)` samples, for
/// tests and tools that read `/metrics`. Comment lines are skipped; labels are kept in order
/// as `(name, value)` pairs, unescaped.
pub fn parse_text(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(split) => split,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), Vec::new()),
            Some((name, rest)) => (
                name.to_string(),
                parse_labels(rest.strip_suffix('}').unwrap_or(rest)),
            ),
        };
        samples.push((name, labels, value));
    }
    samples
}

/// The value of the sample `name{labels}` among `samples`: exactly these labels, in any order.
pub fn find_sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && l.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|s| s.2)
}

/// [`find_sample`] in `/metrics` text.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    find_sample(&parse_text(text), name, labels)
}

fn parse_labels(mut s: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    while let Some((key, rest)) = s.split_once("=\"") {
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let mut end = rest.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').to_string(), value));
        s = &rest[end..];
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{frame::Body, ErrorCode, Frame, Ping};
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn error_code_labels_follow_the_protobuf_numbers() {
        for (i, label) in ERROR_CODES.iter().enumerate() {
            let code = ErrorCode::try_from(i as i32).expect("a code per entry");
            let proto = code.as_str_name().trim_start_matches("ERROR_CODE_");
            assert_eq!(proto.to_ascii_lowercase(), *label);
            assert_eq!(error_code_label(code), *label);
        }
        assert!(
            ErrorCode::try_from(ERROR_CODES.len() as i32).is_err(),
            "a code is missing"
        );
    }

    #[test]
    fn frame_kinds_match_kind_name() {
        let frames = [
            Frame::default(),
            Frame::new(Body::Ping(Ping { nonce: 1 })),
            Frame::error(ErrorCode::BadFrame, "x"),
            Frame::kick(crate::pb::KickReason::Admin, "x"),
        ];
        for frame in frames {
            assert_eq!(FRAME_KINDS[frame_kind_index(&frame)], frame.kind_name());
        }
    }

    #[test]
    fn series_are_resolved_once_and_encoded_with_their_labels() {
        let mut registry = Registry::default();
        let series: Series<Counter> = Series::register(&mut registry, "demo", "demo", 3, |i| {
            vec![("kind", ["a", "b", "other"][i])]
        });
        series.get(1).inc();
        series.get(1).inc();
        series.get(7).inc(); // clamped to "other"
        let text = encode_all(&[&registry]).unwrap();
        let samples = parse_text(&text);
        let value = |kind: &str| {
            samples
                .iter()
                .find(|(n, l, _)| n == "demo_total" && l[0].1 == kind)
                .map(|s| s.2)
        };
        assert_eq!(value("b"), Some(2.0));
        assert_eq!(value("other"), Some(1.0));
        assert_eq!(value("a"), None, "never used, never created");
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("cim_build_info{version=\""), "{text}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_metrics_come_from_proc() {
        let samples = parse_text(&encode_all(&[]).unwrap());
        let get = |name: &str| samples.iter().find(|s| s.0 == name).map(|s| s.2);
        assert!(get("process_resident_memory_bytes").unwrap() > 0.0);
        assert!(get("process_open_fds").unwrap() >= 3.0);
        assert!(get("process_cpu_seconds_total").is_some());
        assert_eq!(get("cim_build_info"), Some(1.0));
    }

    #[test]
    fn parses_labels_with_escapes() {
        let samples = parse_text("# HELP x y\nx_total{a=\"1\",b=\"q\\\"z\"} 3\ny 4.5\n# EOF\n");
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].0, "x_total");
        assert_eq!(
            samples[0].1,
            vec![("a".into(), "1".into()), ("b".into(), "q\"z".into())]
        );
        assert_eq!(samples[0].2, 3.0);
        assert_eq!(samples[1], ("y".into(), vec![], 4.5));
    }
}
