//! The Fernet decrypt path, ours against Python `cryptography`'s
//! `Fernet.decrypt`, on the same key and the same tokens, one thread each.
//!
//! Ours is a criterion micro-benchmark (group `fernet_decrypt`, one
//! benchmark per token size): criterion prints its usual report, keeps its
//! samples and estimates in the lab's directory, and we read back the
//! median time per token. Python, run as a child process (`python3` with
//! `cryptography` installed), times batches of decryptions long enough to
//! dwarf its clock and reports the median batch's time per token.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use securemesh_crypto::KeyRing;
use serde::Serialize;

use crate::BenchError;

/// criterion's group, and its directory under the output directory.
const GROUP: &str = "fernet_decrypt";

/// The TTL both sides check, as the server does.
const TTL: Duration = Duration::from_secs(3600);

/// One token size measured.
#[derive(Debug, Clone, Serialize)]
pub struct FernetResult {
    /// Plaintext bytes.
    pub plaintext_bytes: usize,
    /// Token bytes.
    pub token_bytes: usize,
    /// Our decrypt (with the TTL check the server makes), ns per token.
    pub rust_ns: f64,
    /// Python `Fernet(key).decrypt(token, ttl)`, ns per token; `None` when
    /// Python or `cryptography` is missing.
    pub python_ns: Option<f64>,
}

impl FernetResult {
    /// How many times faster ours is.
    pub fn speedup(&self) -> Option<f64> {
        self.python_ns.map(|python| python / self.rust_ns)
    }
}

/// The measured sizes: a typical message, 1 KiB, 16 KiB.
pub const SIZES: [usize; 3] = [64, 1024, 16 * 1024];

/// Times the decrypt path at every size in [`SIZES`]; `budget` is roughly
/// the time spent per size and side. criterion keeps its data under
/// `criterion_dir`.
pub fn measure(budget: Duration, criterion_dir: &Path) -> Result<Vec<FernetResult>, BenchError> {
    let key = securemesh_crypto::generate_key();
    let keys = KeyRing::from_key_strings(&[key.as_str()])
        .ok_or_else(|| BenchError::Missing("a valid generated Fernet key".into()))?;
    let tokens: Vec<(usize, Vec<u8>)> = SIZES
        .iter()
        .map(|&size| (size, keys.encrypt(&vec![b'x'; size])))
        .collect();
    let ours = ours_with_criterion(&keys, &tokens, budget, criterion_dir)?;
    let python = python_times(&key, &tokens, budget);
    Ok(tokens
        .iter()
        .zip(ours)
        .enumerate()
        .map(|(index, ((size, token), rust_ns))| FernetResult {
            plaintext_bytes: *size,
            token_bytes: token.len(),
            rust_ns,
            python_ns: python.as_ref().and_then(|times| times.get(index).copied()),
        })
        .collect())
}

/// Our decrypt of each token under criterion: the median time per token,
/// ns, in the order of `tokens`.
fn ours_with_criterion(
    keys: &KeyRing,
    tokens: &[(usize, Vec<u8>)],
    budget: Duration,
    criterion_dir: &Path,
) -> Result<Vec<f64>, BenchError> {
    // What is timed must be a decryption that succeeds: a refusal (an
    // expired token, a wrong key) returns early and would look fast.
    for (size, token) in tokens {
        match keys.decrypt_with_ttl(token, Some(TTL)) {
            Ok(plaintext) if plaintext.len() == *size => {}
            _ => {
                return Err(BenchError::Setup(format!(
                    "the {size} B token does not decrypt to its plaintext"
                )))
            }
        }
    }
    // criterion's defaults (3 s warm-up, 5 s measurement, 100,000
    // bootstrap resamples per estimate) are for one benchmark run on its
    // own; this one shares its run with the rest of the benchmark.
    // (`output_directory` is public but undocumented: without it,
    // criterion writes under `./target/criterion`.)
    let mut criterion = Criterion::default()
        .output_directory(criterion_dir)
        .without_plots()
        .warm_up_time((budget / 5).max(Duration::from_millis(1)))
        .measurement_time(budget.max(Duration::from_millis(1)))
        .sample_size(50)
        .nresamples(10_000);
    let mut group = criterion.benchmark_group(GROUP);
    for (size, token) in tokens {
        group.throughput(Throughput::Bytes(token.len() as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(size),
            token,
            |bencher, token| {
                bencher.iter(|| {
                    keys.decrypt_with_ttl(std::hint::black_box(token), Some(TTL))
                        .map(|plaintext| plaintext.len())
                });
            },
        );
    }
    group.finish();
    tokens
        .iter()
        .map(|(size, _)| criterion_median_ns(&criterion_dir.join(GROUP).join(size.to_string())))
        .collect()
}

/// The median time per iteration, ns, of the criterion benchmark whose
/// directory is `benchmark` (its latest run's `new/estimates.json`).
fn criterion_median_ns(benchmark: &Path) -> Result<f64, BenchError> {
    let path = benchmark.join("new").join("estimates.json");
    let text = std::fs::read_to_string(&path).map_err(|source| BenchError::Io {
        what: format!("reading {}", path.display()),
        source,
    })?;
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|estimates| estimates["median"]["point_estimate"].as_f64())
        .filter(|ns| *ns > 0.0)
        .ok_or_else(|| BenchError::Setup(format!("{}: no median point estimate", path.display())))
}

/// The same measurement in Python: one line of ns per token per size, or
/// `None` if Python cannot run it.
fn python_times(key: &str, tokens: &[(usize, Vec<u8>)], budget: Duration) -> Option<Vec<f64>> {
    const SCRIPT: &str = r#"
import json, statistics, sys, time
from cryptography.fernet import Fernet
job = json.load(sys.stdin)
fernet = Fernet(job["key"].encode())
for token in job["tokens"]:
    token = token.encode()
    batch = 1
    while True:
        started = time.perf_counter_ns()
        for _ in range(batch):
            fernet.decrypt(token, ttl=job["ttl"])
        if time.perf_counter_ns() - started >= job["budget_ns"] / 100 or batch >= 1 << 24:
            break
        batch *= 2
    samples = []
    started = time.perf_counter_ns()
    while time.perf_counter_ns() - started < job["budget_ns"] or len(samples) < 5:
        batch_started = time.perf_counter_ns()
        for _ in range(batch):
            fernet.decrypt(token, ttl=job["ttl"])
        samples.append((time.perf_counter_ns() - batch_started) / batch)
    print(statistics.median(samples), flush=True)
"#;
    let job = serde_json::json!({
        "key": key,
        "tokens": tokens
            .iter()
            .map(|(_, token)| String::from_utf8_lossy(token).into_owned())
            .collect::<Vec<_>>(),
        "budget_ns": budget.as_nanos() as u64,
        "ttl": TTL.as_secs(),
    });
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    child
        .stdin
        .take()?
        .write_all(job.to_string().as_bytes())
        .ok()?;
    let output = child.wait_with_output().ok()?;
    if !output.status.success() {
        eprintln!(
            "Python Fernet benchmark skipped: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        return None;
    }
    let times: Vec<f64> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect();
    (times.len() == tokens.len()).then_some(times)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ours_decrypts_every_size_in_a_short_run() {
        let criterion_dir = tempfile::tempdir().unwrap();
        let results = measure(Duration::from_millis(20), criterion_dir.path()).unwrap();
        assert_eq!(results.len(), SIZES.len());
        for result in &results {
            assert!(result.rust_ns > 0.0);
            assert!(result.token_bytes > result.plaintext_bytes);
            // Our time is criterion's own estimate, kept where we told it.
            let estimates = criterion_dir
                .path()
                .join(GROUP)
                .join(result.plaintext_bytes.to_string())
                .join("new/estimates.json");
            assert!(estimates.is_file(), "{}", estimates.display());
        }
    }

    #[test]
    fn a_benchmark_without_estimates_is_an_error_not_a_zero() {
        let empty = tempfile::tempdir().unwrap();
        assert!(criterion_median_ns(empty.path()).is_err());
        let broken = empty.path().join("new");
        std::fs::create_dir_all(&broken).unwrap();
        std::fs::write(broken.join("estimates.json"), r#"{"median": {}}"#).unwrap();
        assert!(criterion_median_ns(empty.path()).is_err());
    }
}
