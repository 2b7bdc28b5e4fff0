//! Load mode: many submissions, summarised.
//!
//! Two ways to drive the load:
//!
//! - **closed loop** (the default): `concurrency` workers, each sending its
//!   next submission when the previous one is answered, as fast as the
//!   target allows;
//! - **open loop** (`rate`): submissions start on a fixed schedule whether
//!   or not earlier ones were answered, and each latency is measured from
//!   the moment its submission was *due*, not from when it could be sent.
//!   A stall therefore shows in the histogram as the many slow calls it
//!   causes, instead of being hidden by the sender waiting (coordinated
//!   omission). The schedule wakes up to a timer tick (1 ms) early rather
//!   than late, and a call sent before it was due counts from when it was
//!   sent, so that the timer's own lateness is not counted as the route's.
//!
//! The load can be spread over several clients, one HTTP/2 connection
//! each (`--connections`): one connection keeps a proxy on one worker and
//! hides how it scales. Latencies go into an HDR histogram (microsecond
//! resolution); failures are counted by status name, successes by the
//! server that handled them, and optionally per time bucket (a timeline).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::time::Instant;

use securemesh::v1::SubmitReply;

use crate::{Client, ClientError};

/// Largest latency recorded, in microseconds (10 minutes).
const MAX_MICROS: u64 = 600_000_000;

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Total submissions (at most; `duration` may end the run first).
    pub requests: usize,
    /// Closed loop: submissions in flight at once. Open loop: the most
    /// allowed in flight before the schedule has to wait (its lateness is
    /// still counted).
    pub concurrency: usize,
    /// Ends the run after this long, whatever is left of `requests`.
    pub duration: Option<Duration>,
    /// Open loop: submissions started per second.
    pub rate: Option<f64>,
    /// Also count answers per bucket of this width (see
    /// [`LoadSummary::timeline`]), at least [`SHORTEST_TIMELINE_BUCKET`]
    /// (a narrower one counts as that); answers after the first
    /// [`MOST_TIMELINE_BUCKETS`] buckets are left out of the timeline.
    pub timeline: Option<Duration>,
    /// Payload prefix; each submission appends its sequence number.
    pub message: String,
    /// Draw a progress bar on standard error.
    pub progress: bool,
    /// Once set (by a Ctrl-C, say), no more submissions start: those in
    /// flight finish and the run ends with what it counted.
    pub stop: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// The narrowest timeline bucket.
pub const SHORTEST_TIMELINE_BUCKET: Duration = Duration::from_millis(1);

/// The most timeline buckets of a run: each holds a latency histogram of
/// about 24 KB (see [`bucket_histogram`]).
pub const MOST_TIMELINE_BUCKETS: usize = 10_000;

impl LoadOptions {
    /// `requests` submissions, `concurrency` at a time, closed loop.
    pub fn closed(requests: usize, concurrency: usize) -> Self {
        Self {
            requests,
            concurrency,
            duration: None,
            rate: None,
            timeline: None,
            message: "load".to_owned(),
            progress: false,
            stop: None,
        }
    }
}

/// The outcome of a load run; serialised as the `--json` summary.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LoadSummary {
    /// Submissions answered (successfully or not).
    pub requests: u64,
    /// Submissions answered `ok` with a matching digest.
    pub ok: u64,
    /// Submissions that failed.
    pub failed: u64,
    /// Wall time of the run, seconds.
    pub elapsed_s: f64,
    /// Successful submissions per second: a failure that comes back fast
    /// is not throughput.
    pub rps: f64,
    /// Median latency of the successful submissions, milliseconds (the
    /// percentiles leave failures out, fast or slow: they are counted in
    /// `failed` and `errors`).
    pub p50_ms: f64,
    /// 90th percentile latency, milliseconds.
    pub p90_ms: f64,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: f64,
    /// 99.9th percentile latency, milliseconds.
    pub p999_ms: f64,
    /// Slowest submission, milliseconds.
    pub max_ms: f64,
    /// Failures by status name.
    pub errors: BTreeMap<String, u64>,
    /// Successes by `server_id`.
    pub servers: BTreeMap<String, u64>,
    /// With [`LoadOptions::timeline`]: what was answered in each bucket,
    /// from the start of the run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<Bucket>,
}

/// The answers of one timeline bucket.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Bucket {
    /// Answered successfully.
    pub ok: u64,
    /// Failed.
    pub failed: u64,
    /// 99th percentile latency of the successful answers in the bucket,
    /// milliseconds.
    pub p99_ms: f64,
}

/// The run's latency histogram: three significant digits up to ten
/// minutes, about 170 KB. A run keeps one (and one while merging).
fn histogram() -> Option<Histogram<u64>> {
    // The bounds are constants: construction cannot fail.
    Histogram::new_with_bounds(1, MAX_MICROS, 3).ok()
}

/// A timeline bucket's histogram, for its p99 alone: two significant
/// digits (1%), about 24 KB, as a run may have thousands of buckets.
fn bucket_histogram() -> Option<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_MICROS, 2).ok()
}

fn micros(latency: Duration) -> u64 {
    u64::try_from(latency.as_micros())
        .unwrap_or(MAX_MICROS)
        .clamp(1, MAX_MICROS)
}

#[derive(Default)]
struct BucketTally {
    ok: u64,
    failed: u64,
    latencies: Option<Histogram<u64>>,
}

#[derive(Default)]
struct Tally {
    latencies: Option<Histogram<u64>>,
    ok: u64,
    failed: u64,
    errors: BTreeMap<String, u64>,
    servers: BTreeMap<String, u64>,
    first_error: Option<String>,
    timeline: Vec<BucketTally>,
}

impl Tally {
    fn new() -> Self {
        Self {
            latencies: histogram(),
            ..Self::default()
        }
    }

    fn record(&mut self, sample: Sample) {
        let Sample {
            outcome,
            latency,
            bucket,
            request_id,
        } = sample;
        let micros = micros(latency);
        let ok = outcome.is_ok();
        if ok {
            if let Some(histogram) = &mut self.latencies {
                histogram.saturating_record(micros);
            }
        }
        match outcome {
            Ok(reply) => {
                self.ok += 1;
                *self.servers.entry(reply.server_id).or_default() += 1;
            }
            Err(error) => {
                self.failed += 1;
                *self.errors.entry(error.kind().to_owned()).or_default() += 1;
                self.first_error
                    .get_or_insert_with(|| format!("{error} (request id {request_id})"));
            }
        }
        if let Some(index) = bucket {
            if self.timeline.len() <= index {
                self.timeline.resize_with(index + 1, BucketTally::default);
            }
            let bucket = &mut self.timeline[index];
            if !ok {
                bucket.failed += 1;
                return;
            }
            bucket.ok += 1;
            if bucket.latencies.is_none() {
                bucket.latencies = bucket_histogram();
            }
            if let Some(histogram) = &mut bucket.latencies {
                histogram.saturating_record(micros);
            }
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
        if self.timeline.len() < other.timeline.len() {
            self.timeline
                .resize_with(other.timeline.len(), BucketTally::default);
        }
        for (mine, theirs) in self.timeline.iter_mut().zip(other.timeline) {
            mine.ok += theirs.ok;
            mine.failed += theirs.failed;
            match (&mut mine.latencies, theirs.latencies) {
                (Some(mine), Some(theirs)) => {
                    let _ = mine.add(&theirs);
                }
                (slot @ None, theirs) => *slot = theirs,
                _ => {}
            }
        }
    }
}

/// One answered submission.
struct Sample {
    outcome: Result<SubmitReply, ClientError>,
    /// From when it was due (or sent, if sent before: see the module's
    /// docs) to when it was answered.
    latency: Duration,
    /// Its timeline bucket, if there is a timeline.
    bucket: Option<usize>,
    request_id: String,
}

/// The common state of one run.
struct Run {
    clients: Vec<Client>,
    options: LoadOptions,
    started: Instant,
    ends: Option<Instant>,
    bar: ProgressBar,
}

impl Run {
    fn bucket(&self, at: Instant) -> Option<usize> {
        let width = self.options.timeline?.max(SHORTEST_TIMELINE_BUCKET);
        let offset = at.saturating_duration_since(self.started);
        let index = usize::try_from(offset.as_nanos() / width.as_nanos()).ok()?;
        (index < MOST_TIMELINE_BUCKETS).then_some(index)
    }

    fn over(&self, now: Instant) -> bool {
        self.ends.is_some_and(|ends| now >= ends) || self.stopped()
    }

    /// Whether [`LoadOptions::stop`] was set.
    fn stopped(&self) -> bool {
        self.options
            .stop
            .as_ref()
            .is_some_and(|stop| stop.load(Ordering::Relaxed))
    }

    /// Sends submission `sequence` on its client; its latency counts from
    /// `counted_from` (when it was due, or sent if that was earlier).
    async fn submit(&self, sequence: usize, counted_from: Instant) -> Sample {
        let client = &self.clients[sequence % self.clients.len()];
        let payload = format!("{} #{sequence}", self.options.message);
        let request_id = securemesh::request_id::new();
        let outcome = client.submit_as(payload.as_bytes(), &request_id).await;
        let answered = Instant::now();
        self.bar.inc(1);
        Sample {
            outcome,
            latency: answered.saturating_duration_since(counted_from),
            bucket: self.bucket(answered),
            request_id,
        }
    }
}

/// Runs the load over `clients` (submission `n` goes to client `n mod
/// len`; give several for several connections) and returns its summary,
/// with the first error message seen (if any) for the caller to show.
pub async fn run(clients: &[Client], options: &LoadOptions) -> (LoadSummary, Option<String>) {
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
    if clients.is_empty() {
        return (Tally::new().summary(Duration::ZERO), None);
    }
    let started = Instant::now();
    let run = Arc::new(Run {
        clients: clients.to_vec(),
        options: options.clone(),
        started,
        ends: options.duration.map(|duration| started + duration),
        bar: bar.clone(),
    });
    let total = match options.rate {
        Some(rate) => open_loop(run, rate).await,
        None => closed_loop(run).await,
    };
    bar.finish_and_clear();
    (total.summary(started.elapsed()), total.first_error)
}

async fn closed_loop(run: Arc<Run>) -> Tally {
    let next = Arc::new(AtomicUsize::new(0));
    // One tally for every worker (its histograms are large), outside the
    // tasks: what a worker recorded before it panicked still counts.
    let total = Arc::new(Mutex::new(Tally::new()));
    // Dropped (the run abandoned), the set stops its workers.
    let mut workers = tokio::task::JoinSet::new();
    // No more workers than submissions.
    for _ in 0..run
        .options
        .concurrency
        .clamp(1, run.options.requests.max(1))
    {
        let run = run.clone();
        let next = next.clone();
        let recording = total.clone();
        workers.spawn(async move {
            loop {
                let sequence = next.fetch_add(1, Ordering::Relaxed);
                let now = Instant::now();
                if sequence >= run.options.requests || run.over(now) {
                    break;
                }
                let sample = run.submit(sequence, now).await;
                recording
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner())
                    .record(sample);
            }
        });
    }
    let mut panicked = Tally::new();
    while let Some(result) = workers.join_next().await {
        reap(&mut panicked, result);
    }
    let mut total = std::mem::take(&mut *total.lock().unwrap_or_else(|poison| poison.into_inner()));
    total.merge(panicked);
    total
}

/// The resolution of tokio's timer.
const TIMER_TICK: Duration = Duration::from_millis(1);

async fn open_loop(run: Arc<Run>, rate: f64) -> Tally {
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let slots = Arc::new(tokio::sync::Semaphore::new(run.options.concurrency.max(1)));
    let total = Arc::new(Mutex::new(Tally::new()));
    let mut panicked = Tally::new();
    let mut tasks = tokio::task::JoinSet::new();
    for sequence in 0..run.options.requests {
        let due = run.started + interval.mul_f64(sequence as f64);
        if run.over(due) {
            break;
        }
        // tokio's timer wakes at the first millisecond tick at or after
        // its deadline: a call sent then would count up to a millisecond
        // of the load generator's own lateness as the route's. Woken up
        // to a tick early instead, it is sent at once and counts from
        // when it was sent; woken late, from when it was due.
        tokio::time::sleep_until(due.checked_sub(TIMER_TICK).unwrap_or(due)).await;
        if run.stopped() {
            break;
        }
        let counted_from = due.min(Instant::now());
        // At the cap the schedule waits; the wait counts in the latency.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let run = run.clone();
        let total = total.clone();
        tasks.spawn(async move {
            let sample = run.submit(sequence, counted_from).await;
            drop(slot);
            total
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .record(sample);
        });
        // Reap finished tasks as we go, so the set stays small.
        while let Some(result) = tasks.try_join_next() {
            reap(&mut panicked, result);
        }
    }
    while let Some(result) = tasks.join_next().await {
        reap(&mut panicked, result);
    }
    let mut total = std::mem::take(&mut *total.lock().unwrap_or_else(|poison| poison.into_inner()));
    total.merge(panicked);
    total
}

/// Counts a task that panicked as one failed call.
fn reap(total: &mut Tally, task: Result<(), tokio::task::JoinError>) {
    if let Err(error) = task {
        total.failed += 1;
        *total.errors.entry("CLIENT_PANIC".into()).or_default() += 1;
        total.first_error.get_or_insert_with(|| error.to_string());
    }
}

impl Tally {
    /// The summary, rounded to microseconds (and tenths of a request per
    /// second) so that the JSON is readable.
    fn summary(&self, elapsed: Duration) -> LoadSummary {
        let round = |value: f64| (value * 1000.0).round() / 1000.0;
        let millis = |micros: u64| round(micros as f64 / 1000.0);
        let quantile = |histogram: &Option<Histogram<u64>>, q: f64| {
            histogram
                .as_ref()
                .filter(|h| !h.is_empty())
                .map_or(0, |h| h.value_at_quantile(q))
        };
        let done = self.ok + self.failed;
        let elapsed_s = elapsed.as_secs_f64();
        let rps = if elapsed_s > 0.0 {
            self.ok as f64 / elapsed_s
        } else {
            0.0
        };
        LoadSummary {
            requests: done,
            ok: self.ok,
            failed: self.failed,
            elapsed_s: round(elapsed_s),
            rps: (rps * 10.0).round() / 10.0,
            p50_ms: millis(quantile(&self.latencies, 0.50)),
            p90_ms: millis(quantile(&self.latencies, 0.90)),
            p99_ms: millis(quantile(&self.latencies, 0.99)),
            p999_ms: millis(quantile(&self.latencies, 0.999)),
            max_ms: millis(self.latencies.as_ref().map_or(0, Histogram::max)),
            errors: self.errors.clone(),
            servers: self.servers.clone(),
            timeline: self
                .timeline
                .iter()
                .map(|bucket| Bucket {
                    ok: bucket.ok,
                    failed: bucket.failed,
                    p99_ms: millis(quantile(&bucket.latencies, 0.99)),
                })
                .collect(),
        }
    }
}

impl fmt::Display for LoadSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "requests {}  ok {}  failed {}  in {:.2} s  ({:.1} ok/s)",
            self.requests, self.ok, self.failed, self.elapsed_s, self.rps
        )?;
        if self.ok == 0 {
            writeln!(f, "ok latency ms  none: no call succeeded")?;
        } else {
            writeln!(
                f,
                "ok latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms
            )?;
        }
        for (server, count) in &self.servers {
            writeln!(f, "server {server}: {count}")?;
        }
        for (kind, count) in &self.errors {
            writeln!(f, "error {kind}: {count}")?;
        }
        if !self.timeline.is_empty() {
            write!(f, "answered per bucket (failed in parentheses):")?;
            for bucket in &self.timeline {
                write!(f, " {}", bucket.ok + bucket.failed)?;
                if bucket.failed > 0 {
                    write!(f, "({})", bucket.failed)?;
                }
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(timeline: Duration) -> Run {
        Run {
            clients: Vec::new(),
            options: LoadOptions {
                timeline: Some(timeline),
                ..LoadOptions::closed(1, 1)
            },
            started: Instant::now(),
            ends: None,
            bar: ProgressBar::hidden(),
        }
    }

    #[test]
    fn throughput_and_latency_count_successes_and_failures_apart() {
        let mut tally = Tally::new();
        let sample = |outcome, millis| Sample {
            outcome,
            latency: Duration::from_millis(millis),
            bucket: Some(0),
            request_id: "r".into(),
        };
        for _ in 0..10 {
            tally.record(sample(Ok(SubmitReply::default()), 2));
        }
        // Failures, one fast and one timing out: neither is throughput
        // nor a latency of the service.
        let refused = || ClientError::Status(tonic::Status::unavailable("down"));
        tally.record(sample(Err(refused()), 0));
        tally.record(sample(Err(refused()), 5_000));
        let summary = tally.summary(Duration::from_secs(1));
        assert_eq!((summary.requests, summary.ok, summary.failed), (12, 10, 2));
        assert_eq!(summary.rps, 10.0);
        assert_eq!((summary.p50_ms, summary.max_ms), (2.0, 2.0));
        let bucket = summary.timeline[0];
        assert_eq!((bucket.ok, bucket.failed), (10, 2));
        // A bucket's histogram has two significant digits.
        assert!((bucket.p99_ms - 2.0).abs() <= 0.02, "{}", bucket.p99_ms);
        assert_eq!(summary.errors["UNAVAILABLE"], 2);
    }

    #[test]
    fn timeline_buckets_are_at_least_a_millisecond_and_bounded_in_number() {
        let narrow = run(Duration::from_nanos(1));
        let at = |run: &Run, after: Duration| run.bucket(run.started + after);
        assert_eq!(at(&narrow, Duration::from_micros(2500)), Some(2));
        assert_eq!(at(&narrow, Duration::from_secs(3600)), None);
        let usual = run(Duration::from_millis(100));
        assert_eq!(at(&usual, Duration::from_millis(250)), Some(2));
        assert_eq!(
            at(&usual, Duration::from_millis(100) * 9_999),
            Some(MOST_TIMELINE_BUCKETS - 1)
        );
        assert_eq!(at(&usual, Duration::from_millis(100) * 10_000), None);
    }
}
