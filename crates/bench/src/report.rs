//! The written results: the ratio lines against the targets, and
//! `BENCHMARKS.md` with the tables, the failover picture and the machine.

use std::fmt::Write as _;

use crate::lab::Route;
use crate::{Fault, Results};
use securemesh_client::load::LoadSummary;

/// One target, checked.
#[derive(Debug, Clone)]
pub struct Ratio {
    /// What is compared.
    pub name: String,
    /// The measured value, formatted.
    pub value: String,
    /// The target, formatted.
    pub target: String,
    /// Whether the target is met; `None` if it could not be measured.
    pub met: Option<bool>,
}

impl std::fmt::Display for Ratio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.target == "-" {
            // A figure for comparison, not a target.
            return write!(f, "{}: {}", self.name, self.value);
        }
        let verdict = match self.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        write!(
            f,
            "{}: {} (target {}) {verdict}",
            self.name, self.value, self.target
        )
    }
}

fn ratio(
    name: &str,
    value: Option<f64>,
    format: &str,
    target: &str,
    met: impl Fn(f64) -> bool,
) -> Ratio {
    Ratio {
        name: name.to_owned(),
        value: value.map_or_else(
            || "-".to_owned(),
            |value| match format {
                "us" => format!("{value:.0} µs"),
                "mb" => format!("{:.1} MB", value / 1e6),
                "count" => format!("{value:.0}"),
                "ms" => format!("{value:.0} ms"),
                _ => format!("{value:.2}"),
            },
        ),
        target: target.to_owned(),
        met: value.map(met),
    }
}

/// The targets of the issue that asked for this benchmark, as measured.
pub fn ratios(results: &Results) -> Vec<Ratio> {
    let at = |route, concurrency| results.closed(route, concurrency);
    let divide = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let rps = |route, concurrency| at(route, concurrency).map(crate::ClosedLoop::rps);
    let p99 = |route, concurrency| at(route, concurrency).map(crate::ClosedLoop::p99_ms);
    let p50 = |route, concurrency| at(route, concurrency).map(crate::ClosedLoop::p50_ms);
    let around_the_proxy = |route, concurrency| {
        let run = at(route, concurrency)?;
        Some(run.load_generator_cpu_us()? + run.servers_cpu_us()?)
    };
    let timeline = |route, fault| {
        results
            .timelines
            .iter()
            .find(|timeline| timeline.route == route && timeline.fault == fault)
    };
    let memory = |route| results.memory.iter().find(|memory| memory.route == route);
    let added = |route| match (p50(route, 1), p50(Route::Direct, 1)) {
        (Some(proxy), Some(direct)) => Some((proxy - direct) * 1000.0),
        _ => None,
    };
    let slowest_fernet = results
        .fernet
        .iter()
        .map(crate::fernet::FernetResult::speedup)
        .try_fold(f64::INFINITY, |lowest, speedup| {
            speedup.map(|s| lowest.min(s))
        });
    vec![
        ratio(
            "coordinator / direct throughput, concurrency 32",
            divide(rps(Route::Coordinator, 32), rps(Route::Direct, 32)),
            "x",
            ">= 0.60",
            |value| value >= 0.6,
        ),
        ratio(
            "for comparison, the same with the coordinator's own CPU left out \
             (load generator + servers CPU per call, direct / coordinator)",
            divide(
                around_the_proxy(Route::Direct, 32),
                around_the_proxy(Route::Coordinator, 32),
            ),
            "x",
            "-",
            |_| true,
        ),
        ratio(
            "for comparison, coordinator / direct throughput, concurrency 32 over one \
             caller connection",
            divide(
                results
                    .closed_over(Route::Coordinator, 32, 1)
                    .map(crate::ClosedLoop::rps),
                results
                    .closed_over(Route::Direct, 32, 1)
                    .map(crate::ClosedLoop::rps),
            ),
            "x",
            "-",
            |_| true,
        ),
        ratio(
            "coordinator / nginx throughput, concurrency 32",
            divide(rps(Route::Coordinator, 32), rps(Route::Nginx, 32)),
            "x",
            ">= 1.20",
            |value| value >= 1.2,
        ),
        ratio(
            "coordinator / nginx p99, concurrency 32",
            divide(p99(Route::Coordinator, 32), p99(Route::Nginx, 32)),
            "x",
            "<= 0.80",
            |value| value <= 0.8,
        ),
        ratio(
            "coordinator failed calls through a SIGKILL (all runs)",
            timeline(Route::Coordinator, Fault::Kill).map(|t| t.failed_in_all_runs() as f64),
            "count",
            "0",
            |value| value == 0.0,
        ),
        ratio(
            "for comparison, nginx failed calls through a SIGKILL (all runs)",
            timeline(Route::Nginx, Fault::Kill).map(|t| t.failed_in_all_runs() as f64),
            "count",
            "-",
            |_| true,
        ),
        ratio(
            "coordinator back to 90% of steady after a SIGKILL (median of the runs)",
            timeline(Route::Coordinator, Fault::Kill).and_then(crate::Timeline::median_recovery_ms),
            "ms",
            "<= 100 ms",
            |value| value <= 100.0,
        ),
        ratio(
            "for comparison, coordinator at 90% of steady for good after a SIGKILL (median of the runs)",
            timeline(Route::Coordinator, Fault::Kill)
                .and_then(crate::Timeline::median_sustained_recovery_ms),
            "ms",
            "-",
            |_| true,
        ),
        ratio(
            "for comparison, coordinator \"at 90% for good\" without a fault (median of the control runs)",
            timeline(Route::Coordinator, Fault::Nothing)
                .and_then(crate::Timeline::median_sustained_recovery_ms),
            "ms",
            "-",
            |_| true,
        ),
        ratio(
            "for comparison, coordinator \"back to 90%\" without a fault (median of the control runs)",
            timeline(Route::Coordinator, Fault::Nothing)
                .and_then(crate::Timeline::median_recovery_ms),
            "ms",
            "-",
            |_| true,
        ),
        ratio(
            "coordinator added p50 at concurrency 1",
            added(Route::Coordinator),
            "us",
            "<= 150 µs",
            |value| value <= 150.0,
        ),
        ratio(
            "for comparison, nginx added p50 at concurrency 1",
            added(Route::Nginx),
            "us",
            "-",
            |_| true,
        ),
        ratio(
            "coordinator RSS idle",
            memory(Route::Coordinator).map(|m| m.idle_bytes as f64),
            "mb",
            "<= 20 MB",
            |value| value <= 20e6,
        ),
        ratio(
            &format!(
                "coordinator RSS holding {} client connections",
                memory(Route::Coordinator).map_or(0, |m| m.connections)
            ),
            memory(Route::Coordinator).map(|m| m.loaded_bytes as f64),
            "mb",
            "<= 64 MB",
            |value| value <= 64e6,
        ),
        ratio(
            "Fernet decrypt, ours / Python cryptography (slowest size)",
            slowest_fernet,
            "x",
            ">= 5",
            |value| value >= 5.0,
        ),
    ]
}

/// Facts about the machine, for the report.
pub struct Machine {
    /// CPU model.
    pub cpu: String,
    /// Cores available to us.
    pub cores: usize,
    /// Memory, GiB.
    pub memory_gib: f64,
    /// Kernel release.
    pub kernel: String,
}

impl Machine {
    /// Read from `/proc`.
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name")?.split_once(':'))
            .map_or_else(|| "unknown".to_owned(), |(_, name)| name.trim().to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib = crate::process::kib_field(&meminfo, "MemTotal:").unwrap_or(0) as f64;
        Self {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            memory_gib: memory_kib / 1024.0 / 1024.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown".to_owned(), |text| text.trim().to_owned()),
        }
    }
}

/// What the report says about how it was made.
pub struct Provenance<'a> {
    /// The command that produced it.
    pub command: &'a str,
    /// When, RFC 3339.
    pub date: &'a str,
    /// The picture's path relative to the report.
    pub picture: &'a str,
    /// The machine.
    pub machine: &'a Machine,
    /// The code measured (`git describe`).
    pub code: &'a str,
}

/// Which closed loops ran once more over one connection, for the setup.
fn one_connection_loops(results: &Results) -> String {
    let concurrencies: Vec<String> = results
        .closed
        .iter()
        .filter(|run| {
            run.route == Route::Direct
                && run.connections == 1
                && crate::usual_connections(results.connections, run.concurrency) > 1
        })
        .map(|run| run.concurrency.to_string())
        .collect();
    if concurrencies.is_empty() {
        String::new()
    } else {
        format!(
            "; at concurrency {} also once more over one",
            concurrencies.join(", ")
        )
    }
}

/// The failed calls of `summary`, and by which status when there are any
/// (`3 (DEADLINE_EXCEEDED 1, UNAVAILABLE 2)`).
fn failed_by_kind(summary: &LoadSummary) -> String {
    if summary.failed == 0 {
        return "0".to_owned();
    }
    let kinds: Vec<String> = summary
        .errors
        .iter()
        .map(|(kind, count)| format!("{kind} {count}"))
        .collect();
    format!("{} ({})", summary.failed, kinds.join(", "))
}

/// `BENCHMARKS.md`.
pub fn markdown(results: &Results, provenance: &Provenance<'_>, profile: &str) -> String {
    let mut md = String::new();
    let machine = provenance.machine;
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Written by `{}` on {}, of the code at `{}`. Every number in the sections up to \
         the notes on where the coordinator's CPU goes comes from that one run on one \
         machine: the three routes were measured alternately, in {} round(s) of {:.1} s \
         per route, and the tables quote medians over rounds. Absolute numbers depend on \
         the machine; the ratios are what to compare.\n",
        provenance.command, provenance.date, provenance.code, results.rounds, results.run_time_s
    );
    let _ = writeln!(md, "## Targets\n\n```");
    for line in ratios(results) {
        let _ = writeln!(md, "{line}");
    }
    let _ = writeln!(md, "```\n");

    let _ = writeln!(md, "## Setup\n");
    let _ = writeln!(
        md,
        "- **direct**: the load generator calls one server.\n\
         - **coordinator**: `securemesh coordinator` over both servers (mutual TLS both ways), \
         default flags: 1 s per-try timeout, up to 2 retries, a hedge after 50 ms without an \
         answer (nginx has no hedging: a call on a stopped server waits for its timeout).\n\
         - **nginx**: {} as a gRPC proxy over the same two servers: mutual TLS both ways \
         (`ssl_verify_client on`, `grpc_pass grpcs://`, `grpc_ssl_certificate` with the \
         coordinator's certificate, `grpc_ssl_verify on`), upstream `keepalive 512`, \
         `grpc_next_upstream error timeout` (adding `non_idempotent`, which lets nginx resend \
         a POST such as a gRPC call, was tried and changes nothing: the calls in flight on a \
         killed server still fail), 1 s connect/send/read timeouts (as the \
         coordinator's per-try timeout), no access log.\n\
         - Each proxy runs {} worker(s) (`securemesh --threads`, nginx `worker_processes`): \
         the machine's cores are shared with both servers and the load generator, and with one \
         worker a proxy handles each call on one thread.\n\
         - The load generator (`securemesh_client::load`, in the bench process) spreads its \
         calls over {} HTTP/2 connections (fewer at concurrency 1{}), encrypts every payload \
         with Fernet, checks every reply's digest and never retries: what a route fails, the \
         benchmark counts.\n\
         - Servers and coordinator run with `RUST_LOG=warn` (no per-call audit line), as \
         nginx runs without an access log.\n",
        results.nginx_version,
        crate::PROXY_WORKERS,
        results.connections,
        one_connection_loops(results)
    );

    let _ = writeln!(md, "## Closed loop\n");
    let _ = writeln!(
        md,
        "Here and below, calls per second and latencies are those of successful calls; \
         failed calls are counted apart (a proxy that fails calls fast would otherwise \
         look both faster and quicker to recover).\n"
    );
    let _ = writeln!(
        md,
        "| concurrency | connections | route | calls/s | p50 ms | p99 ms | p99.9 ms | failed | load generator CPU µs/call | servers CPU µs/call | proxy CPU µs/call | vs direct |"
    );
    let _ = writeln!(
        md,
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let microseconds = |cpu: Option<f64>| cpu.map_or_else(|| "-".into(), |cpu| format!("{cpu:.0}"));
    for run in &results.closed {
        let direct = results
            .closed_over(Route::Direct, run.concurrency, run.connections)
            .map_or(0.0, crate::ClosedLoop::rps);
        let versus = if direct > 0.0 {
            format!("{:.2}", run.rps() / direct)
        } else {
            "-".into()
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {versus} |",
            run.concurrency,
            run.connections,
            run.route.name(),
            run.rps(),
            run.p50_ms(),
            run.p99_ms(),
            run.p999_ms(),
            run.failed(),
            microseconds(run.load_generator_cpu_us()),
            microseconds(run.servers_cpu_us()),
            microseconds(run.cpu_us()),
        );
    }
    let _ = writeln!(
        md,
        "\nCPU is user + system time during the run divided by the calls answered: \
         the load generator's is the benchmark process's own, the servers' is both \
         servers' together (the direct route uses one), the proxy's is nginx's master \
         and workers together. The machine's cores are shared by all of them, so what \
         the load generator and the servers spend per call behind a proxy bounds the \
         proxy's ratio to direct even if the proxy cost nothing: that bound is the \
         target list's \"with the coordinator's own CPU left out\" line.\n\n\
         The rows over one connection are the same load from one caller connection \
         instead of several: a proxy then reads and writes one caller socket instead \
         of several, with more calls per system call, while a server called directly \
         reads and writes its one connection in one task, on one thread at a time. \
         The targets are read over several connections; the one-connection ratio is \
         in the target list for comparison.\n"
    );

    let _ = writeln!(md, "## Open loop\n");
    let _ = writeln!(
        md,
        "Calls start on a fixed schedule at half of each route's best closed-loop \
         throughput; each latency counts from when its call was due, so a stall shows \
         as the many late calls it causes (corrected for coordinated omission). The \
         schedule wakes up to a timer tick (1 ms) early rather than late, and a call \
         sent before it was due counts from when it was sent. At most 1,024 calls are \
         in flight; failed calls are listed by status.\n"
    );
    let _ = writeln!(
        md,
        "| route | calls/s asked | ok/s | p50 ms | p99 ms | p99.9 ms | max ms | failed |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for run in &results.open {
        let s = &run.summary;
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {} |",
            run.route.name(),
            run.rate,
            s.rps,
            s.p50_ms,
            s.p99_ms,
            s.p999_ms,
            s.max_ms,
            failed_by_kind(s)
        );
    }

    let _ = writeln!(md, "\n## Memory\n");
    let _ = writeln!(
        md,
        "| proxy | processes | RSS idle | RSS after the load runs | RSS holding client connections | connections | added per connection |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
    for memory in &results.memory {
        let added = memory
            .loaded_bytes
            .saturating_sub(memory.before_holding_bytes);
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} MB | {:.1} MB | {:.1} MB | {} | {:.1} kB |",
            memory.route.name(),
            memory.processes,
            memory.idle_bytes as f64 / 1e6,
            memory.before_holding_bytes as f64 / 1e6,
            memory.loaded_bytes as f64 / 1e6,
            memory.connections,
            added as f64 / 1e3 / memory.connections.max(1) as f64
        );
    }
    let _ = writeln!(
        md,
        "\nRSS is `VmRSS` from `/proc`, summed over nginx's master and workers (their \
         shared pages count once per process). Each held connection is a mutual-TLS \
         HTTP/2 connection that has carried one call. The connections are held after \
         the load runs, so the RSS holding them (the figure the target judges) includes \
         what the load left in the allocator's keeping; the last column is their own \
         cost.\n"
    );

    let _ = writeln!(md, "## Failover\n");
    let _ = writeln!(
        md,
        "Steady closed-loop load (concurrency 32) through each proxy; a third of the \
         way in, one of the two servers is SIGKILLed, or SIGSTOPped (continued after the \
         run). Each fault ran {} time(s) through each proxy; the picture and the table \
         show the run with the median recovery, and the table lists every run's failed \
         calls and recovery. The control runs (\"none\") inject nothing: what they read as \
         \"back to 90%\" or \"at 90% for good\" is the machine's own bucket-to-bucket noise. Throughput and p99 \
         per 100 ms:\n",
        results.fault_repeats
    );
    let _ = writeln!(md, "![failover timelines]({})\n", provenance.picture);
    let _ = writeln!(
        md,
        "\"Steady\" is the median of the half second before the fault; \"back to 90%\" \
         counts from the fault to the end of the first 100 ms bucket at 90% of it or \
         more (about 100 ms: the first bucket after the fault was already there); \
         \"at 90% for good\" to the end of the first bucket from which every bucket to \
         the end of the run is (a later dip counts). Before each run, both servers \
         answer through the proxy again.\n"
    );
    let _ = writeln!(md, "| fault | proxy | calls | failed | steady calls/s | back to 90% after | at 90% for good after | median after / steady | p99 ms | max ms | every run: failed | every run: back to 90% |");
    let _ = writeln!(
        md,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
    );
    let recovery = |ms: Option<f64>| ms.map_or_else(|| "never".into(), |ms| format!("{ms:.0} ms"));
    for timeline in &results.timelines {
        let every = |field: &dyn Fn(&crate::FaultRun) -> String| {
            timeline
                .runs
                .iter()
                .map(field)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {} | {} | {:.2} | {:.3} | {:.3} | {} | {} |",
            timeline.fault.name(),
            timeline.route.name(),
            timeline.summary.requests,
            timeline.summary.failed,
            timeline.steady_rps(),
            recovery(timeline.recovery_ms()),
            recovery(timeline.sustained_recovery_ms()),
            timeline.after_share(),
            timeline.summary.p99_ms,
            timeline.summary.max_ms,
            every(&|run| run.failed.to_string()),
            every(&|run| recovery(run.recovery_ms)),
        );
    }

    let _ = writeln!(md, "\n## Fernet decrypt\n");
    let _ = writeln!(
        md,
        "One thread each, same key and tokens: ours (`KeyRing::decrypt_with_ttl`, the \
         server's path) against Python `cryptography`'s `Fernet.decrypt(token, ttl)`. \
         Ours is a criterion micro-benchmark (group `fernet_decrypt`, its median \
         estimate; criterion's own report is printed as the benchmark starts), \
         Python's the median of timed batches.\n"
    );
    let _ = writeln!(
        md,
        "| plaintext | token | ours ns | Python ns | ours faster by |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|");
    for result in &results.fernet {
        let _ = writeln!(
            md,
            "| {} B | {} B | {:.0} | {} | {} |",
            result.plaintext_bytes,
            result.token_bytes,
            result.rust_ns,
            result
                .python_ns
                .map_or_else(|| "-".into(), |ns| format!("{ns:.0}")),
            result
                .speedup()
                .map_or_else(|| "-".into(), |speedup| format!("{speedup:.1}x")),
        );
    }

    if !profile.trim().is_empty() {
        let _ = writeln!(
            md,
            "\n## Where the coordinator's CPU goes\n\nNotes kept by hand from profiling \
             runs (`docs/coordinator-profile.md`), not measured by this run: the figures \
             they quote are of the runs they name.\n\n{}",
            profile.trim()
        );
    }

    let _ = writeln!(md, "\n## Machine\n");
    let _ = writeln!(
        md,
        "- CPU: {} ({} cores available)\n- memory: {:.1} GiB\n- kernel: {}\n- {}\n- securemesh {} at `{}`",
        machine.cpu,
        machine.cores,
        machine.memory_gib,
        machine.kernel,
        results.nginx_version,
        env!("CARGO_PKG_VERSION"),
        provenance.code,
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_calls_are_listed_by_status() {
        let mut summary = LoadSummary::default();
        assert_eq!(failed_by_kind(&summary), "0");
        summary.failed = 3;
        summary.errors = [("UNAVAILABLE".into(), 2), ("DEADLINE_EXCEEDED".into(), 1)].into();
        assert_eq!(
            failed_by_kind(&summary),
            "3 (DEADLINE_EXCEEDED 1, UNAVAILABLE 2)"
        );
    }
}
