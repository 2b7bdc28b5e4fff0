//! Recent calls: rate, failures and latency percentiles over the last
//! ten to twenty seconds, for status pages (Prometheus computes its own
//! rates from the counters).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Length of one half of the window.
const HALF: Duration = Duration::from_secs(10);
/// Latencies are kept in microseconds, up to a minute, to 2 significant
/// figures (1% error): about 20 KB per half window.
const MAX_MICROS: u64 = 60_000_000;

/// What happened recently.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WindowSnapshot {
    /// Calls in the window.
    pub calls: u64,
    /// Of which failed.
    pub failures: u64,
    /// Calls per second over the window.
    pub per_second: f64,
    /// Median latency of the successful calls in milliseconds (0 without
    /// any): a failure that came fast (a refusal) or slow (a timeout) says
    /// nothing of how fast the backend serves.
    pub p50_ms: f64,
    /// 99th percentile latency of the successful calls in milliseconds (0
    /// without any).
    pub p99_ms: f64,
}

/// A sliding window made of two halves: the current one fills while the
/// previous, complete one still counts, so the window always covers
/// between one and two halves.
#[derive(Debug)]
pub struct Window {
    halves: Mutex<Halves>,
}

#[derive(Debug)]
struct Halves {
    current: Half,
    previous: Option<Half>,
}

#[derive(Debug)]
struct Half {
    started: Instant,
    /// Of the successful calls.
    latencies: Histogram<u64>,
    calls: u64,
    failures: u64,
}

impl Half {
    fn new(started: Instant) -> Self {
        Self {
            started,
            // The bounds are constants that hdrhistogram accepts.
            latencies: Histogram::new_with_bounds(1, MAX_MICROS, 2)
                .unwrap_or_else(|_| unreachable!("valid histogram bounds")),
            calls: 0,
            failures: 0,
        }
    }
}

impl Default for Window {
    fn default() -> Self {
        Self {
            halves: Mutex::new(Halves {
                current: Half::new(Instant::now()),
                previous: None,
            }),
        }
    }
}

impl Window {
    /// Records one call.
    pub fn record(&self, latency: Duration, ok: bool) {
        self.record_at(Instant::now(), latency, ok);
    }

    fn record_at(&self, now: Instant, latency: Duration, ok: bool) {
        let mut halves = self.lock();
        halves.advance(now);
        let micros = u64::try_from(latency.as_micros())
            .unwrap_or(MAX_MICROS)
            .clamp(1, MAX_MICROS);
        halves.current.calls += 1;
        if ok {
            halves.current.latencies.saturating_record(micros);
        } else {
            halves.current.failures += 1;
        }
    }

    /// The window now.
    pub fn snapshot(&self) -> WindowSnapshot {
        self.snapshot_at(Instant::now())
    }

    fn snapshot_at(&self, now: Instant) -> WindowSnapshot {
        let mut halves = self.lock();
        halves.advance(now);
        let mut latencies = halves.current.latencies.clone();
        let mut calls = halves.current.calls;
        let mut failures = halves.current.failures;
        let mut since = halves.current.started;
        if let Some(previous) = &halves.previous {
            let _ = latencies.add(&previous.latencies);
            calls += previous.calls;
            failures += previous.failures;
            since = previous.started;
        }
        let seconds = now.duration_since(since).as_secs_f64().max(1.0);
        let percentile = |quantile: f64| {
            if latencies.is_empty() {
                0.0
            } else {
                latencies.value_at_quantile(quantile) as f64 / 1000.0
            }
        };
        WindowSnapshot {
            calls,
            failures,
            per_second: calls as f64 / seconds,
            p50_ms: percentile(0.5),
            p99_ms: percentile(0.99),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Halves> {
        self.halves
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

impl Halves {
    /// Starts new halves as time passes, on a grid of [`HALF`]s from the
    /// first, so that the window always spans one to two halves: after a
    /// long idle the previous half is an empty one, and a burst is
    /// averaged over the idle time it follows.
    fn advance(&mut self, now: Instant) {
        let behind = now.duration_since(self.current.started);
        if behind < HALF {
            return;
        }
        // The start of the half `now` falls in; below HALF, so the cast
        // keeps every bit.
        let into_half = Duration::from_nanos((behind.as_nanos() % HALF.as_nanos()) as u64);
        let started = now - into_half;
        let finished = std::mem::replace(&mut self.current, Half::new(started));
        self.previous = Some(if behind < HALF * 2 {
            finished
        } else {
            Half::new(started - HALF)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_failures_and_percentiles_cover_the_recent_calls() {
        let window = Window::default();
        let start = window.lock().current.started;
        for index in 0..100u64 {
            // The failures time out: their 30 ms are no latency of the
            // backend's answers.
            let ok = index % 10 != 0;
            let latency = Duration::from_millis(if ok { 1 } else { 30 });
            window.record_at(start + Duration::from_millis(index * 10), latency, ok);
        }
        let snapshot = window.snapshot_at(start + Duration::from_secs(2));
        assert_eq!(snapshot.calls, 100);
        assert_eq!(snapshot.failures, 10);
        assert!((snapshot.per_second - 50.0).abs() < 0.01, "{snapshot:?}");
        assert!((snapshot.p50_ms - 1.0).abs() < 0.02, "{snapshot:?}");
        assert!(snapshot.p99_ms <= 1.02, "{snapshot:?}");
    }

    #[test]
    fn old_calls_leave_the_window() {
        let window = Window::default();
        let start = window.lock().current.started;
        window.record_at(start, Duration::from_millis(5), true);
        let soon = window.snapshot_at(start + HALF + Duration::from_secs(1));
        assert_eq!(soon.calls, 1, "the previous half still counts");
        let later = window.snapshot_at(start + HALF * 2 + Duration::from_secs(1));
        assert_eq!(later, WindowSnapshot::default());
        let much_later = window.snapshot_at(start + HALF * 50);
        assert_eq!(much_later.calls, 0);
    }

    #[test]
    fn a_burst_after_an_idle_spell_is_averaged_over_the_window() {
        let window = Window::default();
        let start = window.lock().current.started;
        let burst = start + HALF * 7 + Duration::from_secs(4);
        for index in 0..30u64 {
            window.record_at(
                burst + Duration::from_millis(index),
                Duration::from_millis(1),
                true,
            );
        }
        let snapshot = window.snapshot_at(burst + Duration::from_secs(1));
        assert_eq!(snapshot.calls, 30);
        // The window runs from the start of the previous (empty) half:
        // 10 s + 4 s + 1 s.
        assert!((snapshot.per_second - 2.0).abs() < 0.01, "{snapshot:?}");
    }
}
