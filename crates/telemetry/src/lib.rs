//! What securemesh measures, in one place.
//!
//! Libraries record into one process-wide registry, [`metrics()`]; the
//! admin listener renders it as Prometheus text when `--metrics-listen` is
//! given. Besides the exported series, [`Window`] keeps recent latency and
//! rate in process, for the status page.

mod window;

pub use prometheus::{Histogram, IntCounter, IntGauge};
pub use window::{Window, WindowSnapshot};

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every series a securemesh process exports, registered in one registry.
/// Counters end in `_total` and durations are in seconds, as Prometheus
/// conventions ask.
pub struct Metrics {
    registry: Registry,
    /// Calls answered, by `method` and gRPC `status`.
    pub requests: IntCounterVec,
    /// Call latency in seconds, by `method`.
    pub request_duration: HistogramVec,
    /// Calls being served now, by `method`.
    pub in_flight: IntGaugeVec,
    /// TLS handshakes that failed, by `reason`.
    pub handshake_failures: IntCounterVec,
    /// Connections open now, past their handshake.
    pub connections_open: IntGauge,
    /// TLS handshakes in progress now.
    pub handshakes_in_progress: IntGauge,
    /// Connections closed on arrival, by the `limit` that was reached
    /// (`connections`, `handshakes`, `identity` or `reserved`).
    pub connections_refused: IntCounterVec,
    /// Tokens a server refused, by `reason`.
    pub token_refusals: IntCounterVec,
    /// 1 while a backend is in rotation, by `backend`.
    pub backend_up: IntGaugeVec,
    /// 1 while a backend's last health check answered SERVING.
    pub backend_healthy: IntGaugeVec,
    /// 1 while a backend is ejected for failed calls.
    pub backend_ejected: IntGaugeVec,
    /// Attempts sent to a backend.
    pub backend_requests: IntCounterVec,
    /// Attempts a backend failed (unreachable, reset, timed out).
    pub backend_failures: IntCounterVec,
    /// Attempts in flight on a backend.
    pub backend_in_flight: IntGaugeVec,
    /// Times a backend was ejected.
    pub backend_ejections: IntCounterVec,
    /// Retries made after an attempt on a backend failed.
    pub backend_retries: IntCounterVec,
    /// Retries and hedges the retry budget refused.
    pub retry_budget_refusals: IntCounter,
    /// Second attempts of calls whose first attempt was slower than the
    /// hedging delay.
    pub hedges: IntCounter,
    /// Hedges that answered the call.
    pub hedges_won: IntCounter,
    /// 1 while the retry budget is exhausted (its last withdrawal failed).
    pub retry_budget_exhausted: IntGauge,
    /// 1 while the process follows (coordinator) or holds (server) its
    /// etcd registrations.
    pub discovery_connected: IntGauge,
}

/// Latency histogram buckets, in seconds: 100 µs to 10 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

// Registering a fixed set of well-formed, distinct series cannot fail;
// `expect` documents that at start-up, as for any constant.
fn registered<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("distinct, well-formed metric definitions");
    metric
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    registered(
        registry,
        IntCounter::new(name, help).expect("a well-formed counter"),
    )
}

fn counters(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    registered(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("a well-formed counter"),
    )
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    registered(
        registry,
        IntGauge::new(name, help).expect("a well-formed gauge"),
    )
}

fn gauges(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    registered(
        registry,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("a well-formed gauge"),
    )
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let request_duration = registered(
            r,
            HistogramVec::new(
                HistogramOpts::new(
                    "securemesh_request_duration_seconds",
                    "Call latency, by method.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["method"],
            )
            .expect("a well-formed histogram"),
        );
        Self {
            requests: counters(
                r,
                "securemesh_requests_total",
                "Calls answered, by method and gRPC status.",
                &["method", "status"],
            ),
            request_duration,
            in_flight: gauges(
                r,
                "securemesh_requests_in_flight",
                "Calls being served now, by method.",
                &["method"],
            ),
            handshake_failures: counters(
                r,
                "securemesh_tls_handshake_failures_total",
                "TLS handshakes that failed, by reason.",
                &["reason"],
            ),
            connections_open: gauge(
                r,
                "securemesh_connections_open",
                "Connections open now, past their TLS handshake.",
            ),
            handshakes_in_progress: gauge(
                r,
                "securemesh_tls_handshakes_in_progress",
                "TLS handshakes in progress now.",
            ),
            connections_refused: counters(
                r,
                "securemesh_connections_refused_total",
                "Connections closed on arrival, by the limit reached: connections \
                 (--max-connections), handshakes (--max-handshakes), identity (one \
                 certificate's share) or reserved (the places held for allowed callers).",
                &["limit"],
            ),
            token_refusals: counters(
                r,
                "securemesh_token_refusals_total",
                "Fernet tokens refused, by reason.",
                &["reason"],
            ),
            backend_up: gauges(
                r,
                "securemesh_backend_up",
                "1 while the backend is in rotation.",
                &["backend"],
            ),
            backend_healthy: gauges(
                r,
                "securemesh_backend_healthy",
                "1 while the backend's last health check answered SERVING.",
                &["backend"],
            ),
            backend_ejected: gauges(
                r,
                "securemesh_backend_ejected",
                "1 while the backend is ejected for failed calls.",
                &["backend"],
            ),
            backend_requests: counters(
                r,
                "securemesh_backend_requests_total",
                "Attempts sent to the backend.",
                &["backend"],
            ),
            backend_failures: counters(
                r,
                "securemesh_backend_failures_total",
                "Attempts the backend failed (unreachable, reset, timed out).",
                &["backend"],
            ),
            backend_in_flight: gauges(
                r,
                "securemesh_backend_in_flight",
                "Attempts in flight on the backend.",
                &["backend"],
            ),
            backend_ejections: counters(
                r,
                "securemesh_backend_ejections_total",
                "Times the backend was ejected for failed calls.",
                &["backend"],
            ),
            backend_retries: counters(
                r,
                "securemesh_backend_retries_total",
                "Retries made after an attempt on the backend failed.",
                &["backend"],
            ),
            retry_budget_refusals: counter(
                r,
                "securemesh_retry_budget_refusals_total",
                "Retries and hedges refused because the retry budget was exhausted.",
            ),
            hedges: counter(
                r,
                "securemesh_hedges_total",
                "Second attempts sent because a call's first attempt was slower than the hedging delay.",
            ),
            hedges_won: counter(
                r,
                "securemesh_hedges_won_total",
                "Hedges that answered the call.",
            ),
            retry_budget_exhausted: gauge(
                r,
                "securemesh_retry_budget_exhausted",
                "1 while the retry budget is exhausted (its last withdrawal failed).",
            ),
            discovery_connected: gauge(
                r,
                "securemesh_discovery_connected",
                "1 while etcd registrations are followed (coordinator) or held (server).",
            ),
            registry,
        }
    }

    /// Every series in the Prometheus text exposition format (0.0.4).
    pub fn render(&self) -> String {
        self.try_render()
            .unwrap_or_else(|error| format!("# encoding failed: {error}\n"))
    }

    /// [`Metrics::render`], or why the series could not be encoded (only a
    /// malformed series could fail, and ours are fixed): a scrape must see
    /// a failure, not an exposition without series.
    pub fn try_render(&self) -> Result<String, prometheus::Error> {
        let mut text = String::new();
        TextEncoder::new().encode_utf8(&self.registry.gather(), &mut text)?;
        Ok(text)
    }

    /// Exports `reasons` of a refusal counter at 0 before the first
    /// refusal, so that `rate()` and alerts have a series from the start.
    pub fn declare_reasons(counters: &IntCounterVec, reasons: &[&str]) {
        for reason in reasons {
            let _ = counters.with_label_values(&[*reason]);
        }
    }

    /// Exports every per-backend series of `url`, counters at 0, as the
    /// backend joins the pool; returns the handles the backend moves, so
    /// that it needs no label lookup.
    pub fn track_backend(&self, url: &str) -> BackendSeries {
        BackendSeries {
            up: self.backend_up.with_label_values(&[url]),
            healthy: self.backend_healthy.with_label_values(&[url]),
            ejected: self.backend_ejected.with_label_values(&[url]),
            in_flight: self.backend_in_flight.with_label_values(&[url]),
            requests: self.backend_requests.with_label_values(&[url]),
            failures: self.backend_failures.with_label_values(&[url]),
            ejections: self.backend_ejections.with_label_values(&[url]),
            retries: self.backend_retries.with_label_values(&[url]),
        }
    }

    /// Stops exporting a backend's series (it left the pool), its counters
    /// too: where backends come and go (servers registering in etcd as
    /// they restart, on new ports), series of every backend ever seen
    /// would pile up without end. A backend that joins again starts its
    /// counters from 0, which `rate()` reads as a reset.
    pub fn forget_backend(&self, url: &str) {
        for gauges in [
            &self.backend_up,
            &self.backend_healthy,
            &self.backend_ejected,
            &self.backend_in_flight,
        ] {
            let _ = gauges.remove_label_values(&[url]);
        }
        for counters in [
            &self.backend_requests,
            &self.backend_failures,
            &self.backend_ejections,
            &self.backend_retries,
        ] {
            let _ = counters.remove_label_values(&[url]);
        }
    }
}

/// One backend's series, resolved once. After [`Metrics::forget_backend`]
/// they still count, unexported: a backend that left cannot bring its
/// series back.
#[derive(Debug, Clone)]
pub struct BackendSeries {
    /// `securemesh_backend_up{backend}`.
    pub up: IntGauge,
    /// `securemesh_backend_healthy{backend}`.
    pub healthy: IntGauge,
    /// `securemesh_backend_ejected{backend}`.
    pub ejected: IntGauge,
    /// `securemesh_backend_in_flight{backend}`.
    pub in_flight: IntGauge,
    /// `securemesh_backend_requests_total{backend}`.
    pub requests: IntCounter,
    /// `securemesh_backend_failures_total{backend}`.
    pub failures: IntCounter,
    /// `securemesh_backend_ejections_total{backend}`.
    pub ejections: IntCounter,
    /// `securemesh_backend_retries_total{backend}`.
    pub retries: IntCounter,
}

/// The calls a process serves: exported series plus an in-process
/// [`Window`] for its status. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct CallStats {
    window: Arc<Window>,
    in_flight: Arc<std::sync::atomic::AtomicI64>,
    /// The series of the first method timed, resolved once: a service has
    /// one hot method, and label lookups cost on every call.
    method: Arc<std::sync::OnceLock<MethodSeries>>,
}

/// One method's series that every call moves.
#[derive(Debug)]
struct MethodSeries {
    method: &'static str,
    in_flight: IntGauge,
    duration: Histogram,
    ok: IntCounter,
}

impl MethodSeries {
    fn of(method: &'static str) -> Self {
        let metrics = metrics();
        Self {
            method,
            in_flight: metrics.in_flight.with_label_values(&[method]),
            duration: metrics.request_duration.with_label_values(&[method]),
            ok: metrics.requests.with_label_values(&[method, "OK"]),
        }
    }
}

impl CallStats {
    /// Starts timing one call of `method`; finish it with
    /// [`CallTimer::finish`]. A timer dropped unfinished (the caller went
    /// away) counts as `CANCELLED`.
    pub fn start(&self, method: &'static str) -> CallTimer {
        match self.cached(method) {
            Some(series) => series.in_flight.inc(),
            None => metrics().in_flight.with_label_values(&[method]).inc(),
        }
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        CallTimer {
            stats: self.clone(),
            method,
            started: Instant::now(),
            finished: false,
        }
    }

    fn cached(&self, method: &'static str) -> Option<&MethodSeries> {
        Some(self.method.get_or_init(|| MethodSeries::of(method)))
            .filter(|series| series.method == method)
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Recent rate and latency.
    pub fn recent(&self) -> WindowSnapshot {
        self.window.snapshot()
    }
}

/// One call being timed.
#[derive(Debug)]
pub struct CallTimer {
    stats: CallStats,
    method: &'static str,
    started: Instant,
    finished: bool,
}

impl CallTimer {
    /// Records the call as answered with `status` (a gRPC code name such
    /// as `OK` or `INVALID_ARGUMENT`); returns its latency.
    pub fn finish(mut self, status: &'static str) -> std::time::Duration {
        self.record(status)
    }

    fn record(&mut self, status: &'static str) -> std::time::Duration {
        self.finished = true;
        let latency = self.started.elapsed();
        match self.stats.cached(self.method) {
            Some(series) => {
                if status == "OK" {
                    series.ok.inc();
                } else {
                    metrics()
                        .requests
                        .with_label_values(&[self.method, status])
                        .inc();
                }
                series.duration.observe(latency.as_secs_f64());
                series.in_flight.dec();
            }
            None => {
                let metrics = metrics();
                metrics
                    .requests
                    .with_label_values(&[self.method, status])
                    .inc();
                metrics
                    .request_duration
                    .with_label_values(&[self.method])
                    .observe(latency.as_secs_f64());
                metrics.in_flight.with_label_values(&[self.method]).dec();
            }
        }
        self.stats
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.stats.window.record(latency, status == "OK");
        latency
    }
}

impl Drop for CallTimer {
    fn drop(&mut self) {
        if !self.finished {
            self.record("CANCELLED");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_is_in_flight_until_finished_or_dropped() {
        let stats = CallStats::default();
        let first = stats.start("/m");
        let second = stats.start("/m");
        assert_eq!(stats.in_flight(), 2);
        first.finish("OK");
        drop(second);
        assert_eq!(stats.in_flight(), 0);
        let recent = stats.recent();
        assert_eq!(recent.calls, 2);
        assert_eq!(recent.failures, 1, "a dropped call is a failure");
    }

    #[test]
    fn a_backend_that_left_leaves_no_series_behind() {
        let url = "https://leaving.test:1";
        let series = metrics().track_backend(url);
        series.requests.inc();
        series.retries.inc();
        series.up.set(1);
        let exported = || {
            metrics()
                .render()
                .lines()
                .filter(|line| line.contains(url))
                .count()
        };
        assert_eq!(exported(), 8, "{}", metrics().render());
        metrics().forget_backend(url);
        assert_eq!(exported(), 0, "{}", metrics().render());
        // Its handles still count, unexported.
        series.requests.inc();
        assert_eq!(exported(), 0);
    }

    #[test]
    fn the_exposition_has_help_and_type_for_every_series() {
        let stats = CallStats::default();
        stats.start("/test.Method").finish("OK");
        metrics()
            .backend_up
            .with_label_values(&["https://b:1"])
            .set(1);
        let text = metrics().render();
        assert!(
            text.contains("# TYPE securemesh_requests_total counter"),
            "{text}"
        );
        // Every family exported has its help and its type, and a counter's
        // name ends in _total.
        // One gathering for both the text and the families, since other
        // tests add and remove series meanwhile.
        let families = metrics().registry.gather();
        let text = TextEncoder::new().encode_to_string(&families).unwrap();
        for family in families {
            let name = family.name();
            assert!(!family.help().is_empty(), "{name} has no help");
            let kind = match family.get_field_type() {
                prometheus::proto::MetricType::COUNTER => "counter",
                prometheus::proto::MetricType::GAUGE => "gauge",
                prometheus::proto::MetricType::HISTOGRAM => "histogram",
                other => panic!("{name} is a {other:?}"),
            };
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
            assert!(text.contains(&format!("# TYPE {name} {kind}\n")), "{name}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "{name}");
            }
        }
        assert!(text.contains("securemesh_requests_total{method=\"/test.Method\",status=\"OK\"} 1"));
        assert!(text.contains(
            "securemesh_request_duration_seconds_bucket{method=\"/test.Method\",le=\"0.0001\"}"
        ));
        metrics().forget_backend("https://b:1");
        assert!(!metrics().render().contains("https://b:1"));
    }
}
