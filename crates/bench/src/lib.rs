//! `securemesh bench`: the coordinator measured side by side with calling
//! a server directly and with nginx's `grpc_pass`, in one run on one
//! machine, written up as `BENCHMARKS.md` with a failover picture.
//!
//! What one run does, in order:
//!
//! 1. the Fernet decrypt path against Python `cryptography` ([`fernet`]);
//! 2. starts the [`lab`]: two servers, the coordinator and nginx, and
//!    measures the proxies' idle memory;
//! 3. closed loop at concurrency 1, 32 and 128 over several caller
//!    connections, and at 32 once more over one, the three routes
//!    alternating round after round, with every process's CPU time per
//!    call;
//! 4. open loop at half of each route's best throughput, latency counted
//!    from when each call was due;
//! 5. each proxy's memory while it holds many client TLS connections;
//! 6. failover timelines: steady load while one server is SIGKILLed, and
//!    separately SIGSTOPped, through each proxy, each fault several times
//!    ([`BenchOptions::fault_repeats`]);
//!    and as often without a fault, as a control of what the machine's
//!    own noise reads as a recovery.
//!
//! [`report`] turns the results into the Markdown report, the ratio lines
//! and the picture.

pub mod fernet;
pub mod lab;
pub mod nginx;
pub mod process;
pub mod report;
pub mod svg;

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;
use securemesh_client::load::{self, LoadOptions, LoadSummary};
use serde::Serialize;

use crate::fernet::FernetResult;

/// Worker threads of the coordinator (`--threads`) and worker processes of
/// nginx (`worker_processes`). The machine's cores are shared with the two
/// servers and the load generator; with one worker each proxy handles a
/// call on one thread, without hand-offs between threads.
pub const PROXY_WORKERS: usize = 1;
use crate::lab::{Lab, Route};

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A process could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// Which.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A tool the benchmark needs is missing.
    #[error("missing: {0}")]
    Missing(String),
    /// The lab could not be set up.
    #[error("{0}")]
    Setup(String),
    /// A connection could not be opened.
    #[error("connecting: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// How much to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The `securemesh` executable to run servers and the coordinator with.
    pub binary: PathBuf,
    /// Where the lab lives (certificates, logs, nginx's files).
    pub dir: PathBuf,
    /// Each closed-loop and open-loop run's length.
    pub run_time: Duration,
    /// Rounds of alternation; medians are over rounds.
    pub rounds: usize,
    /// Closed-loop concurrencies.
    pub concurrencies: Vec<usize>,
    /// Connections the closed and open loops spread their calls over.
    pub connections: usize,
    /// Also a closed loop at this concurrency over one caller connection,
    /// on every route: how the callers connect moves what a proxy costs
    /// per call, and the report shows by how much.
    pub one_connection_at: Option<usize>,
    /// Client TLS connections held for the memory measurement.
    pub held_connections: usize,
    /// Each failover timeline's length; the fault comes at a third.
    pub timeline: Duration,
    /// Times each fault is repeated through each proxy; the report shows
    /// the run with the median recovery and counts failures over all.
    pub fault_repeats: usize,
    /// Time per size and side in the Fernet measurement.
    pub fernet_budget: Duration,
}

impl BenchOptions {
    /// The full benchmark (about six minutes).
    pub fn full(binary: PathBuf, dir: PathBuf) -> Self {
        Self {
            binary,
            dir,
            run_time: Duration::from_secs(3),
            rounds: 5,
            concurrencies: vec![1, 32, 128],
            connections: 4,
            one_connection_at: Some(32),
            held_connections: 1000,
            timeline: Duration::from_secs(4),
            fault_repeats: 5,
            fernet_budget: Duration::from_millis(500),
        }
    }

    /// A smoke run that checks every step works, not how fast (CI).
    pub fn quick(binary: PathBuf, dir: PathBuf) -> Self {
        Self {
            run_time: Duration::from_millis(300),
            rounds: 1,
            concurrencies: vec![1, 32],
            held_connections: 50,
            timeline: Duration::from_millis(1500),
            fault_repeats: 1,
            fernet_budget: Duration::from_millis(20),
            ..Self::full(binary, dir)
        }
    }

    /// The closed loops to run, as (concurrency, caller connections): each
    /// concurrency over [`BenchOptions::connections`] (fewer when there
    /// are fewer calls in flight), then [`BenchOptions::one_connection_at`].
    pub fn closed_loops(&self) -> Vec<(usize, usize)> {
        let mut loops: Vec<(usize, usize)> = self
            .concurrencies
            .iter()
            .map(|&concurrency| {
                (
                    concurrency,
                    usual_connections(self.connections, concurrency),
                )
            })
            .collect();
        if let Some(concurrency) = self.one_connection_at {
            if !loops.contains(&(concurrency, 1)) {
                loops.push((concurrency, 1));
            }
        }
        loops
    }
}

/// One route at one concurrency over some connections: every round, and
/// medians.
#[derive(Debug, Clone, Serialize)]
pub struct ClosedLoop {
    /// The route.
    pub route: Route,
    /// Calls in flight.
    pub concurrency: usize,
    /// HTTP/2 connections the calls were spread over.
    pub connections: usize,
    /// Each round's summary.
    pub rounds: Vec<LoadSummary>,
    /// The proxy's CPU time per call in each round, µs (none direct).
    pub cpu_us_per_call: Vec<f64>,
    /// Both servers' CPU time per call in each round, µs.
    pub servers_cpu_us_per_call: Vec<f64>,
    /// The load generator's CPU time per call in each round, µs (this
    /// process's own, which runs little else while it measures).
    pub load_generator_cpu_us_per_call: Vec<f64>,
}

impl ClosedLoop {
    fn median_of(&self, field: impl Fn(&LoadSummary) -> f64) -> f64 {
        median(&mut self.rounds.iter().map(field).collect::<Vec<_>>())
    }

    /// Median throughput, calls per second.
    pub fn rps(&self) -> f64 {
        self.median_of(|summary| summary.rps)
    }

    /// Median p50, ms.
    pub fn p50_ms(&self) -> f64 {
        self.median_of(|summary| summary.p50_ms)
    }

    /// Median p99, ms.
    pub fn p99_ms(&self) -> f64 {
        self.median_of(|summary| summary.p99_ms)
    }

    /// Median p99.9, ms.
    pub fn p999_ms(&self) -> f64 {
        self.median_of(|summary| summary.p999_ms)
    }

    /// Failed calls over all rounds.
    pub fn failed(&self) -> u64 {
        self.rounds.iter().map(|summary| summary.failed).sum()
    }

    /// Median CPU time per call of the proxy, µs.
    pub fn cpu_us(&self) -> Option<f64> {
        median_of_any(&self.cpu_us_per_call)
    }

    /// Median CPU time per call of both servers together, µs.
    pub fn servers_cpu_us(&self) -> Option<f64> {
        median_of_any(&self.servers_cpu_us_per_call)
    }

    /// Median CPU time per call of the load generator, µs.
    pub fn load_generator_cpu_us(&self) -> Option<f64> {
        median_of_any(&self.load_generator_cpu_us_per_call)
    }
}

/// One route's open-loop run.
#[derive(Debug, Clone, Serialize)]
pub struct OpenLoop {
    /// The route.
    pub route: Route,
    /// Calls started per second.
    pub rate: f64,
    /// What came of it.
    pub summary: LoadSummary,
}

/// A proxy's memory.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    /// The proxy.
    pub route: Route,
    /// Processes summed (nginx: master and workers).
    pub processes: usize,
    /// Resident set right after start, bytes.
    pub idle_bytes: u64,
    /// Resident set just before the connections were opened, after the
    /// load runs (what their buffers left in the allocator's keeping
    /// included), bytes.
    pub before_holding_bytes: u64,
    /// Resident set while holding [`Memory::connections`], bytes.
    pub loaded_bytes: u64,
    /// Client TLS connections held.
    pub connections: usize,
}

/// The fault of a failover timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Fault {
    /// The server is killed.
    Kill,
    /// The server is stopped (and continued after the run).
    Stop,
    /// Nothing happens: a control run, to see what "back to 90%" reads
    /// from the machine's own noise.
    Nothing,
}

impl Fault {
    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "SIGKILL",
            Fault::Stop => "SIGSTOP",
            Fault::Nothing => "none (control)",
        }
    }
}

/// Steady load through a proxy while one server fails.
#[derive(Debug, Clone, Serialize)]
pub struct Timeline {
    /// The proxy.
    pub route: Route,
    /// What happened to the server.
    pub fault: Fault,
    /// When, from the start of the load, seconds.
    pub fault_at_s: f64,
    /// Bucket width, seconds.
    pub bucket_s: f64,
    /// The run, with its per-bucket timeline.
    pub summary: LoadSummary,
    /// Every run of this fault through this proxy, this one included, in
    /// the order they ran.
    pub runs: Vec<FaultRun>,
}

/// What one run of a fault cost.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FaultRun {
    /// Calls that failed.
    pub failed: u64,
    /// See [`Timeline::recovery_ms`].
    pub recovery_ms: Option<f64>,
    /// See [`Timeline::sustained_recovery_ms`].
    pub sustained_recovery_ms: Option<f64>,
}

impl Timeline {
    /// Successful calls per second in `bucket`: calls failed fast by a
    /// proxy are no recovery.
    fn rate(&self, bucket: &load::Bucket) -> f64 {
        bucket.ok as f64 / self.bucket_s
    }

    fn fault_bucket(&self) -> usize {
        (self.fault_at_s / self.bucket_s) as usize
    }

    /// Median calls per second over the half second before the fault
    /// (never the first bucket, which warms up): on a noisy machine,
    /// throughput drifts over seconds, and what matters is the level the
    /// fault interrupted.
    pub fn steady_rps(&self) -> f64 {
        const STEADY_BUCKETS: usize = 5;
        let before = self.fault_bucket().min(self.summary.timeline.len());
        let from = before.saturating_sub(STEADY_BUCKETS).max(1);
        let mut rates: Vec<f64> = self.summary.timeline[from.min(before)..before]
            .iter()
            .map(|bucket| self.rate(bucket))
            .collect();
        median(&mut rates)
    }

    /// From the fault to the end of the first bucket from it on whose
    /// throughput is at least 90% of steady, ms; `None` if none is. The
    /// fault comes just after a bucket starts, so 100 ms (less the few
    /// ms the fault came late) means the first 100 ms after it already
    /// ran at 90%.
    pub fn recovery_ms(&self) -> Option<f64> {
        let steady = self.steady_rps();
        let first = self.fault_bucket();
        self.summary
            .timeline
            .iter()
            .enumerate()
            .skip(first)
            .find(|(_, bucket)| self.rate(bucket) >= 0.9 * steady)
            .map(|(index, _)| ((index + 1) as f64 * self.bucket_s - self.fault_at_s) * 1000.0)
    }

    /// From the fault to the end of the first bucket from which every
    /// bucket to the end of the run is at 90% of steady or more, ms; `None`
    /// if the run ends below. Unlike [`Timeline::recovery_ms`], a dip after
    /// the first good bucket (a dead server tried again when its ejection
    /// ends) counts.
    pub fn sustained_recovery_ms(&self) -> Option<f64> {
        let steady = self.steady_rps();
        let first = self.fault_bucket();
        let buckets = &self.summary.timeline;
        if first >= buckets.len() {
            return None;
        }
        let last_low = (first..buckets.len())
            .rev()
            .find(|&index| self.rate(&buckets[index]) < 0.9 * steady);
        let recovered = match last_low {
            None => first,
            Some(index) if index + 1 < buckets.len() => index + 1,
            Some(_) => return None,
        };
        Some(((recovered + 1) as f64 * self.bucket_s - self.fault_at_s) * 1000.0)
    }

    /// The median over the runs of `pick` (a run without one counts as the
    /// slowest); `None` if that one has none.
    fn median_over_runs(&self, pick: impl Fn(&FaultRun) -> Option<f64>) -> Option<f64> {
        let mut values: Vec<f64> = self
            .runs
            .iter()
            .map(|run| pick(run).unwrap_or(f64::INFINITY))
            .collect();
        values.sort_by(f64::total_cmp);
        values
            .get(values.len().saturating_sub(1) / 2)
            .copied()
            .filter(|ms| ms.is_finite())
    }

    /// The median of the runs' [`Timeline::sustained_recovery_ms`].
    pub fn median_sustained_recovery_ms(&self) -> Option<f64> {
        self.median_over_runs(|run| run.sustained_recovery_ms)
    }

    /// Failed calls over every run of this fault.
    pub fn failed_in_all_runs(&self) -> u64 {
        self.runs.iter().map(|run| run.failed).sum()
    }

    /// The median of the runs' recoveries (a run that never recovered
    /// counts as the slowest); `None` if that one never recovered.
    pub fn median_recovery_ms(&self) -> Option<f64> {
        self.median_over_runs(|run| run.recovery_ms)
    }

    /// Of several runs of the same fault, the one whose recovery is the
    /// median (the lower one of an even count), knowing all of them.
    fn median_of(mut runs: Vec<Timeline>) -> Option<Timeline> {
        let outcomes: Vec<FaultRun> = runs
            .iter()
            .map(|run| FaultRun {
                failed: run.summary.failed,
                recovery_ms: run.recovery_ms(),
                sustained_recovery_ms: run.sustained_recovery_ms(),
            })
            .collect();
        runs.sort_by(|a, b| {
            let key = |run: &Timeline| run.recovery_ms().unwrap_or(f64::INFINITY);
            key(a).total_cmp(&key(b))
        });
        let middle = runs.len().saturating_sub(1) / 2;
        let mut median = runs.into_iter().nth(middle)?;
        median.runs = outcomes;
        Some(median)
    }

    /// Median throughput after the fault as a share of steady.
    pub fn after_share(&self) -> f64 {
        let steady = self.steady_rps();
        let mut rates: Vec<f64> = self
            .summary
            .timeline
            .iter()
            .skip(self.fault_bucket())
            .map(|bucket| self.rate(bucket))
            .collect();
        if steady > 0.0 {
            median(&mut rates) / steady
        } else {
            0.0
        }
    }
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// Closed-loop runs, by concurrency then route.
    pub closed: Vec<ClosedLoop>,
    /// Open-loop runs.
    pub open: Vec<OpenLoop>,
    /// The proxies' memory.
    pub memory: Vec<Memory>,
    /// Failover timelines.
    pub timelines: Vec<Timeline>,
    /// The Fernet decrypt path.
    pub fernet: Vec<FernetResult>,
    /// `nginx -v`.
    pub nginx_version: String,
    /// Connections the loops spread their calls over.
    pub connections: usize,
    /// Runs of each fault through each proxy.
    pub fault_repeats: usize,
    /// Length of each loop run, seconds.
    pub run_time_s: f64,
    /// Rounds.
    pub rounds: usize,
}

impl Results {
    /// The closed-loop result of `route` at `concurrency`, over the
    /// benchmark's usual number of connections.
    pub fn closed(&self, route: Route, concurrency: usize) -> Option<&ClosedLoop> {
        self.closed_over(
            route,
            concurrency,
            usual_connections(self.connections, concurrency),
        )
    }

    /// The closed-loop result of `route` at `concurrency` over `connections`.
    pub fn closed_over(
        &self,
        route: Route,
        concurrency: usize,
        connections: usize,
    ) -> Option<&ClosedLoop> {
        self.closed.iter().find(|run| {
            run.route == route && run.concurrency == concurrency && run.connections == connections
        })
    }
}

/// How many connections `concurrency` calls are spread over when the
/// benchmark spreads them over `connections`: never more connections than
/// calls.
pub(crate) fn usual_connections(connections: usize, concurrency: usize) -> usize {
    connections.min(concurrency).max(1)
}

/// The median of `values` (0 when empty).
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    }
}

/// The median of `values`, or `None` when there are none.
fn median_of_any(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| median(&mut values.to_vec()))
}

/// Lets go of the CPU between measurements, so that one's tail does not
/// run into the next.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// Runs the whole benchmark.
pub async fn run(options: &BenchOptions) -> Result<Results, BenchError> {
    raise_open_file_limit();
    eprintln!("bench: Fernet decrypt, ours and Python's");
    let fernet = fernet::measure(options.fernet_budget, &options.dir.join("criterion"))?;

    eprintln!("bench: starting two servers, the coordinator and nginx");
    let mut lab = Lab::start(&options.binary, &options.dir).await?;
    let idle: Vec<(Route, u64, usize)> = [Route::Coordinator, Route::Nginx]
        .into_iter()
        .filter_map(|route| {
            let proxy = lab.proxy(route)?;
            Some((route, proxy.usage().rss_bytes, proxy.process_count()))
        })
        .collect();

    // Warm every route up: connections, nginx's upstream keepalive pool
    // (nginx takes an upstream connection per call in flight: as many as
    // the highest concurrency measured).
    let most_concurrency = options
        .closed_loops()
        .iter()
        .map(|&(concurrency, _)| concurrency)
        .max()
        .unwrap_or(32);
    for route in Route::ALL {
        drive(
            &lab,
            route,
            most_concurrency,
            options.connections,
            options.run_time / 2,
            None,
        )
        .await?;
    }

    let mut closed: Vec<ClosedLoop> = Vec::new();
    for (concurrency, connections) in options.closed_loops() {
        let mut runs: Vec<ClosedLoop> = Route::ALL
            .iter()
            .map(|&route| ClosedLoop {
                route,
                concurrency,
                connections,
                rounds: Vec::new(),
                cpu_us_per_call: Vec::new(),
                servers_cpu_us_per_call: Vec::new(),
                load_generator_cpu_us_per_call: Vec::new(),
            })
            .collect();
        for round in 0..options.rounds {
            // Each round starts with another route, and every other round
            // runs them in the opposite order, so that no route mostly
            // follows the same one.
            let count = runs.len();
            for offset in 0..count {
                let step = if round % 2 == 0 {
                    offset
                } else {
                    count - 1 - offset
                };
                let run = &mut runs[(round + step) % count];
                eprintln!(
                    "bench: closed loop, concurrency {concurrency} over {connections} \
                     connection(s), {} (round {} of {})",
                    run.route.name(),
                    round + 1,
                    options.rounds
                );
                let before = lab.proxy(run.route).map(process::Process::usage);
                let servers_before = lab.servers_usage();
                let load_generator_before = process::Usage::own();
                let summary = drive(
                    &lab,
                    run.route,
                    concurrency,
                    connections,
                    options.run_time,
                    None,
                )
                .await?;
                let per_call = |spent_seconds: f64| spent_seconds * 1e6 / summary.requests as f64;
                if summary.requests > 0 {
                    if let (Some(before), Some(proxy)) = (before, lab.proxy(run.route)) {
                        run.cpu_us_per_call
                            .push(per_call(proxy.usage().cpu_seconds - before.cpu_seconds));
                    }
                    run.servers_cpu_us_per_call.push(per_call(
                        lab.servers_usage().cpu_seconds - servers_before.cpu_seconds,
                    ));
                    run.load_generator_cpu_us_per_call.push(per_call(
                        process::Usage::own().cpu_seconds - load_generator_before.cpu_seconds,
                    ));
                }
                run.rounds.push(summary);
                settle().await;
            }
        }
        closed.extend(runs);
    }

    let mut open = Vec::new();
    for route in Route::ALL {
        // The open loop spreads its calls as the usual closed loops do:
        // half of their best.
        let best = closed
            .iter()
            .filter(|run| {
                run.route == route
                    && run.connections == usual_connections(options.connections, run.concurrency)
            })
            .map(ClosedLoop::rps)
            .fold(0.0, f64::max);
        let rate = (best / 2.0).max(1.0);
        eprintln!("bench: open loop, {} at {rate:.0} calls/s", route.name());
        let summary = open_loop(&lab, route, rate, options).await?;
        open.push(OpenLoop {
            route,
            rate,
            summary,
        });
        settle().await;
    }

    let mut memory = Vec::new();
    for (route, idle_bytes, processes) in idle {
        eprintln!(
            "bench: {} holding {} client connections",
            route.name(),
            options.held_connections
        );
        // Both servers in rotation first: the open loop may have left an
        // upstream marked down.
        back_in_rotation(&lab, route).await?;
        let before_holding_bytes = lab.proxy(route).map_or(0, |proxy| proxy.usage().rss_bytes);
        let held = lab
            .hold_connections(route, options.held_connections)
            .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let loaded_bytes = lab.proxy(route).map_or(0, |proxy| proxy.usage().rss_bytes);
        memory.push(Memory {
            route,
            processes,
            idle_bytes,
            before_holding_bytes,
            loaded_bytes,
            connections: held.len(),
        });
        drop(held);
        settle().await;
    }

    // Every fault through both proxies once per repeat, the proxies
    // taking turns to go first: the control runs (no fault) and both
    // proxies meet the same machine, not blocks of runs minutes apart.
    let repeats = options.fault_repeats.max(1);
    let mut runs_of: Vec<((Fault, Route), Vec<Timeline>)> =
        [Fault::Kill, Fault::Stop, Fault::Nothing]
            .into_iter()
            .flat_map(|fault| [Route::Coordinator, Route::Nginx].map(|route| (fault, route)))
            .map(|kind| (kind, Vec::with_capacity(repeats)))
            .collect();
    for run in 1..=repeats {
        for fault in [Fault::Kill, Fault::Stop, Fault::Nothing] {
            let mut proxies = [Route::Coordinator, Route::Nginx];
            if run % 2 == 0 {
                proxies.reverse();
            }
            for route in proxies {
                eprintln!(
                    "bench: failover timeline, fault {}, through {} (run {run} of {repeats})",
                    fault.name(),
                    route.name()
                );
                let timeline = failover(&mut lab, route, fault, options).await?;
                if let Some((_, runs)) =
                    runs_of.iter_mut().find(|(kind, _)| *kind == (fault, route))
                {
                    runs.push(timeline);
                }
            }
        }
    }
    let mut timelines = Vec::new();
    for (_, runs) in runs_of {
        timelines.extend(Timeline::median_of(runs));
    }

    Ok(Results {
        closed,
        open,
        memory,
        timelines,
        fernet,
        nginx_version: lab.nginx_version.clone(),
        connections: options.connections,
        fault_repeats: options.fault_repeats.max(1),
        run_time_s: options.run_time.as_secs_f64(),
        rounds: options.rounds,
    })
}

/// A closed-loop run of `route`.
async fn drive(
    lab: &Lab,
    route: Route,
    concurrency: usize,
    connections: usize,
    duration: Duration,
    timeline: Option<Duration>,
) -> Result<LoadSummary, BenchError> {
    let clients = warmed_clients(lab, route, connections).await?;
    let options = LoadOptions {
        duration: Some(duration),
        timeline,
        message: "bench".into(),
        ..LoadOptions::closed(usize::MAX, concurrency)
    };
    Ok(load::run(&clients, &options).await.0)
}

/// An open-loop run of `route` at `rate`.
async fn open_loop(
    lab: &Lab,
    route: Route,
    rate: f64,
    options: &BenchOptions,
) -> Result<LoadSummary, BenchError> {
    let clients = warmed_clients(lab, route, options.connections).await?;
    let load = LoadOptions {
        duration: Some(options.run_time),
        rate: Some(rate),
        message: "bench".into(),
        ..LoadOptions::closed(usize::MAX, 1024)
    };
    Ok(load::run(&clients, &load).await.0)
}

/// Steady load through `route` while the second server meets `fault` a
/// third of the way in; the server is back and in rotation afterwards.
async fn failover(
    lab: &mut Lab,
    route: Route,
    fault: Fault,
    options: &BenchOptions,
) -> Result<Timeline, BenchError> {
    const BUCKET: Duration = Duration::from_millis(100);
    // A third of the way in, on a bucket boundary.
    let buckets_before = (options.timeline.as_secs_f64() / 3.0 / BUCKET.as_secs_f64()).round();
    let fault_at = BUCKET.mul_f64(buckets_before.max(2.0));
    let clients = warmed_clients(lab, route, options.connections).await?;
    let load = LoadOptions {
        duration: Some(options.timeline),
        timeline: Some(BUCKET),
        message: "failover".into(),
        ..LoadOptions::closed(usize::MAX, 32)
    };
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let running = tokio::spawn(async move {
        // The load generator's clock starts next, within microseconds.
        let _ = started_tx.send(tokio::time::Instant::now());
        load::run(&clients, &load).await.0
    });
    let started = started
        .await
        .map_err(|_| BenchError::Setup("the load generator did not start".into()))?;
    // Just after the boundary.
    tokio::time::sleep_until(started + fault_at + Duration::from_millis(2)).await;
    let victim = 1;
    // Recovery counts from the signal.
    let fault_at_s = started.elapsed().as_secs_f64();
    match fault {
        // Only the signal now: reaping the process waits for the kernel
        // to tear it down, and waiting here, on a worker thread of the
        // load generator's runtime, took throughput from the very bucket
        // the recovery is read from. It is reaped after the run.
        Fault::Kill => lab.servers[victim].1.signal(Signal::SIGKILL),
        Fault::Stop => lab.servers[victim].1.signal(Signal::SIGSTOP),
        Fault::Nothing => {}
    }
    let mut summary = running
        .await
        .map_err(|error| BenchError::Setup(format!("the load generator failed: {error}")))?;
    // Whole buckets of the run only: not the last, partial one, nor the
    // calls that were still finishing after it.
    let whole = (options.timeline.as_secs_f64() / BUCKET.as_secs_f64()).floor() as usize;
    summary.timeline.truncate(whole);
    match fault {
        Fault::Kill => {
            lab.servers[victim].1.kill();
            lab.servers[victim].1.restart()?;
        }
        Fault::Stop => lab.servers[victim].1.signal(Signal::SIGCONT),
        Fault::Nothing => {}
    }
    if fault != Fault::Nothing {
        lab.server_ready(victim).await?;
        // Through both proxies: the next run may be the other's.
        for route in [Route::Coordinator, Route::Nginx] {
            back_in_rotation(lab, route).await?;
        }
    }
    Ok(Timeline {
        route,
        fault,
        fault_at_s,
        bucket_s: BUCKET.as_secs_f64(),
        summary,
        runs: Vec::new(),
    })
}

/// `connections` clients of `route`, each connected (one call made) before
/// it is returned: a run's clock measures calls, not the TCP and TLS
/// handshakes of its first ones.
async fn warmed_clients(
    lab: &Lab,
    route: Route,
    connections: usize,
) -> Result<Vec<securemesh_client::Client>, BenchError> {
    let clients = lab.clients(route, connections)?;
    let first_calls = clients.iter().map(|client| client.submit(b"warm-up"));
    for outcome in futures_util::future::join_all(first_calls).await {
        outcome.map_err(|error| {
            BenchError::Setup(format!("{} does not answer: {error}", route.name()))
        })?;
    }
    Ok(clients)
}

/// Waits until calls through `route` reach both servers again after a
/// fault (a proxy takes a failed server back after its health checks or
/// `fail_timeout`, and the coordinator's ejection lasts longer after
/// repeated ones), so that the next run starts from both in rotation.
async fn back_in_rotation(lab: &Lab, route: Route) -> Result<(), BenchError> {
    const MOST_WAIT: Duration = Duration::from_secs(40);
    // Not warmed: a call that fails right after the fault is expected.
    let clients = lab.clients(route, 1)?;
    let given_up = tokio::time::Instant::now() + MOST_WAIT;
    loop {
        let load = LoadOptions {
            message: "back in rotation?".into(),
            ..LoadOptions::closed(64, 4)
        };
        let answered = tokio::time::timeout_at(given_up, load::run(&clients, &load)).await;
        if answered.is_ok_and(|(summary, _)| summary.servers.len() >= 2) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= given_up {
            return Err(BenchError::Setup(format!(
                "{} did not take the server back within {} s",
                route.name(),
                MOST_WAIT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The benchmark holds many connections, and so do the proxies it starts
/// (they inherit the limit): raise the soft limit on open files to the
/// hard one.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_loops_run_each_concurrency_over_the_usual_connections_then_one_over_one() {
        let full = BenchOptions::full("securemesh".into(), "lab".into());
        assert_eq!(full.closed_loops(), [(1, 1), (32, 4), (128, 4), (32, 1)]);
        // Already over one connection: not run twice.
        let single = BenchOptions {
            connections: 1,
            ..full.clone()
        };
        assert_eq!(single.closed_loops(), [(1, 1), (32, 1), (128, 1)]);
        let without = BenchOptions {
            one_connection_at: None,
            ..full
        };
        assert_eq!(without.closed_loops(), [(1, 1), (32, 4), (128, 4)]);
    }

    fn timeline(rates: &[u64], fault_at_s: f64) -> Timeline {
        let summary = LoadSummary {
            timeline: rates
                .iter()
                .map(|&ok| load::Bucket {
                    ok,
                    failed: 0,
                    p99_ms: 1.0,
                })
                .collect(),
            ..LoadSummary::default()
        };
        Timeline {
            route: Route::Coordinator,
            fault: Fault::Kill,
            fault_at_s,
            bucket_s: 0.1,
            summary,
            runs: Vec::new(),
        }
    }

    #[test]
    fn repeated_faults_are_shown_by_their_median_run_and_counted_in_full() {
        let mut unlucky = timeline(&[50, 100, 100, 40, 60, 70, 95, 100], 0.302);
        unlucky.summary.failed = 2;
        let runs = vec![
            unlucky,
            timeline(&[50, 100, 100, 100, 100, 100], 0.302),
            timeline(&[50, 100, 100, 40, 95, 100], 0.302),
        ];
        let median = Timeline::median_of(runs).unwrap();
        assert!((median.recovery_ms().unwrap() - 198.0).abs() < 0.01);
        assert_eq!(median.runs.len(), 3);
        assert_eq!(median.failed_in_all_runs(), 2);
        assert!((median.median_recovery_ms().unwrap() - 198.0).abs() < 0.01);

        let never = timeline(&[50, 100, 100, 10, 10, 10], 0.302);
        let two_never = Timeline::median_of(vec![never.clone(), never, median]).unwrap();
        assert_eq!(two_never.median_recovery_ms(), None);
        assert_eq!(
            two_never.recovery_ms(),
            None,
            "the median run is one that never recovered"
        );
        assert!(Timeline::median_of(Vec::new()).is_none());
    }

    #[test]
    fn calls_failed_fast_are_no_recovery() {
        let mut failing_fast = timeline(&[50, 100, 100, 10, 100], 0.302);
        failing_fast.summary.timeline[3].failed = 90;
        assert!((failing_fast.recovery_ms().unwrap() - 198.0).abs() < 0.01);
    }

    #[test]
    fn the_median_is_the_middle() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }

    #[test]
    fn a_dip_in_the_first_bucket_after_the_fault_costs_one_bucket() {
        // Buckets of 100 ms: 1000 calls/s steady, the fault at 0.302 s.
        let dipped = timeline(&[50, 100, 100, 40, 95, 100], 0.302);
        assert_eq!(dipped.steady_rps(), 1000.0, "the first bucket is left out");
        let recovery = dipped.recovery_ms().unwrap();
        assert!((recovery - 198.0).abs() < 0.01, "{recovery}");
        let unbothered = timeline(&[50, 100, 100, 100, 100, 100], 0.302);
        assert!(unbothered.recovery_ms().unwrap() < 100.0);
        // Only the half second before the fault sets the level.
        let drifted = timeline(
            &[50, 150, 150, 150, 100, 100, 100, 100, 100, 92, 100],
            0.902,
        );
        assert_eq!(drifted.steady_rps(), 1000.0);
        assert!(drifted.recovery_ms().unwrap() < 100.0);
        let broken = timeline(&[50, 100, 100, 10, 10, 10], 0.302);
        assert_eq!(broken.recovery_ms(), None);
        assert!((broken.after_share() - 0.1).abs() < 1e-9);
    }

    #[test]
    fn a_later_dip_delays_the_sustained_recovery_only() {
        // Good at once after the fault, then a dip a few buckets later.
        let relapsed = timeline(&[50, 100, 100, 100, 100, 30, 100, 100], 0.302);
        assert!(relapsed.recovery_ms().unwrap() < 100.0);
        let sustained = relapsed.sustained_recovery_ms().unwrap();
        assert!((sustained - 398.0).abs() < 0.01, "{sustained}");
        let unbothered = timeline(&[50, 100, 100, 100, 100, 100], 0.302);
        assert_eq!(unbothered.sustained_recovery_ms(), unbothered.recovery_ms());
        let ends_low = timeline(&[50, 100, 100, 100, 100, 30], 0.302);
        assert_eq!(ends_low.sustained_recovery_ms(), None);
        let runs = vec![relapsed.clone(), unbothered, relapsed];
        let median = Timeline::median_of(runs).unwrap();
        assert!((median.median_sustained_recovery_ms().unwrap() - 398.0).abs() < 0.01);
    }
}
