//! Load mode: many submissions at a fixed concurrency, summarised.
//!
//! Latencies go into an HDR histogram (microsecond resolution); failures are
//! counted by status name and successes by the server that handled them.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::Client;

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Total submissions.
    pub requests: usize,
    /// Submissions in flight at once.
    pub concurrency: usize,
    /// Payload prefix; each submission appends its sequence number.
    pub message: String,
    /// Draw a progress bar on standard error.
    pub progress: bool,
}

/// The outcome of a load run; serialised as the `--json` summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadSummary {
    /// Submissions attempted.
    pub requests: u64,
    /// Submissions answered `ok` with a matching digest.
    pub ok: u64,
    /// Submissions that failed.
    pub failed: u64,
    /// Wall time of the run, seconds.
    pub elapsed_s: f64,
    /// Completed submissions per second.
    pub rps: f64,
    /// Median latency, milliseconds.
    pub p50_ms: f64,
    /// 90th percentile latency, milliseconds.
    pub p90_ms: f64,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: f64,
    /// Slowest submission, milliseconds.
    pub max_ms: f64,
    /// Failures by status name.
    pub errors: BTreeMap<String, u64>,
    /// Successes by `server_id`.
    pub servers: BTreeMap<String, u64>,
}

#[derive(Default)]
struct Tally {
    latencies: Option<Histogram<u64>>,
    ok: u64,
    failed: u64,
    errors: BTreeMap<String, u64>,
    servers: BTreeMap<String, u64>,
    first_error: Option<String>,
}

impl Tally {
    fn new() -> Self {
        Self {
            // 1 µs to 10 min at 3 significant figures; the bounds are
            // constants, so construction cannot fail.
            latencies: Histogram::new_with_bounds(1, 600_000_000, 3).ok(),
            ..Self::default()
        }
    }

    fn merge(&mut self, other: Tally) {
        if let (Some(mine), Some(theirs)) = (&mut self.latencies, &other.latencies) {
            let _ = mine.add(theirs);
        }
        self.ok += other.ok;
        self.failed += other.failed;
        for (kind, count) in other.errors {
            *self.errors.entry(kind).or_default() += count;
        }
        for (server, count) in other.servers {
            *self.servers.entry(server).or_default() += count;
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// Runs the load and returns its summary, with the first error message seen
/// (if any) for the caller to show.
pub async fn run(client: &Client, options: &LoadOptions) -> (LoadSummary, Option<String>) {
    let bar = if options.progress {
        let bar = ProgressBar::new(options.requests as u64);
        if let Ok(style) =
            ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta} {msg}")
        {
            bar.set_style(style);
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..options.concurrency.max(1))
        .map(|_| {
            let client = client.clone();
            let next = next.clone();
            let bar = bar.clone();
            let requests = options.requests;
            let message = options.message.clone();
            tokio::spawn(async move {
                let mut tally = Tally::new();
                loop {
                    let sequence = next.fetch_add(1, Ordering::Relaxed);
                    if sequence >= requests {
                        break tally;
                    }
                    let payload = format!("{message} #{sequence}");
                    let sent = Instant::now();
                    let request_id = securemesh::request_id::new();
                    let outcome = client.submit_as(payload.as_bytes(), &request_id).await;
                    if let Some(histogram) = &mut tally.latencies {
                        let micros = sent.elapsed().as_micros().max(1) as u64;
                        let _ = histogram.record(micros.min(600_000_000));
                    }
                    match outcome {
                        Ok(reply) => {
                            tally.ok += 1;
                            *tally.servers.entry(reply.server_id).or_default() += 1;
                        }
                        Err(error) => {
                            tally.failed += 1;
                            *tally.errors.entry(error.kind().to_owned()).or_default() += 1;
                            tally.first_error.get_or_insert_with(|| {
                                format!("{error} (request id {request_id})")
                            });
                        }
                    }
                    bar.inc(1);
                }
            })
        })
        .collect();

    let mut total = Tally::new();
    for worker in workers {
        match worker.await {
            Ok(tally) => total.merge(tally),
            Err(error) => {
                total.failed += 1;
                *total.errors.entry("CLIENT_PANIC".into()).or_default() += 1;
                total.first_error.get_or_insert_with(|| error.to_string());
            }
        }
    }
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    (total.summary(elapsed), total.first_error)
}

impl Tally {
    /// The summary, rounded to microseconds (and tenths of a request per
    /// second) so that the JSON is readable.
    fn summary(&self, elapsed: Duration) -> LoadSummary {
        let round = |value: f64| (value * 1000.0).round() / 1000.0;
        let millis = |micros: u64| round(micros as f64 / 1000.0);
        let (p50, p90, p99, max) = match &self.latencies {
            Some(h) => (
                h.value_at_quantile(0.50),
                h.value_at_quantile(0.90),
                h.value_at_quantile(0.99),
                h.max(),
            ),
            None => (0, 0, 0, 0),
        };
        let done = self.ok + self.failed;
        let elapsed_s = elapsed.as_secs_f64();
        let rps = if elapsed_s > 0.0 {
            done as f64 / elapsed_s
        } else {
            0.0
        };
        LoadSummary {
            requests: done,
            ok: self.ok,
            failed: self.failed,
            elapsed_s: round(elapsed_s),
            rps: (rps * 10.0).round() / 10.0,
            p50_ms: millis(p50),
            p90_ms: millis(p90),
            p99_ms: millis(p99),
            max_ms: millis(max),
            errors: self.errors.clone(),
            servers: self.servers.clone(),
        }
    }
}

impl fmt::Display for LoadSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "requests {}  ok {}  failed {}  in {:.2} s  ({:.1} req/s)",
            self.requests, self.ok, self.failed, self.elapsed_s, self.rps
        )?;
        writeln!(
            f,
            "latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}",
            self.p50_ms, self.p90_ms, self.p99_ms, self.max_ms
        )?;
        for (server, count) in &self.servers {
            writeln!(f, "server {server}: {count}")?;
        }
        for (kind, count) in &self.errors {
            writeln!(f, "error {kind}: {count}")?;
        }
        Ok(())
    }
}
