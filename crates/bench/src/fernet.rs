//! The Fernet decrypt path, ours against Python `cryptography`'s
//! `Fernet.decrypt`, on the same key and the same tokens, one thread each.
//!
//! Each side times batches of decryptions long enough to dwarf the clock
//! and reports the median time per token; Python runs as a child process
//! (`python3` with `cryptography` installed).

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use securemesh_crypto::KeyRing;
use serde::Serialize;

use crate::{median, BenchError};

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
/// the time spent per size and side.
pub fn measure(budget: Duration) -> Result<Vec<FernetResult>, BenchError> {
    let key = securemesh_crypto::generate_key();
    let keys = KeyRing::from_key_strings(&[key.as_str()])
        .ok_or_else(|| BenchError::Missing("a valid generated Fernet key".into()))?;
    let tokens: Vec<(usize, Vec<u8>)> = SIZES
        .iter()
        .map(|&size| (size, keys.encrypt(&vec![b'x'; size])))
        .collect();
    let python = python_times(&key, &tokens, budget);
    let mut results = Vec::new();
    for (index, (size, token)) in tokens.iter().enumerate() {
        let rust_ns = median_ns_per_op(budget, || {
            let plaintext =
                keys.decrypt_with_ttl(std::hint::black_box(token), Some(Duration::from_secs(3600)));
            std::hint::black_box(plaintext.map(|plaintext| plaintext.len()).unwrap_or(0));
        });
        results.push(FernetResult {
            plaintext_bytes: *size,
            token_bytes: token.len(),
            rust_ns,
            python_ns: python.as_ref().and_then(|times| times.get(index).copied()),
        });
    }
    Ok(results)
}

/// Runs `operation` in batches for about `budget`; the median batch's
/// time per operation, in ns.
fn median_ns_per_op(budget: Duration, mut operation: impl FnMut()) -> f64 {
    // Calibrate a batch to about a hundredth of the budget.
    let mut batch = 1u32;
    loop {
        let started = Instant::now();
        for _ in 0..batch {
            operation();
        }
        if started.elapsed() >= budget / 100 || batch >= 1 << 24 {
            break;
        }
        batch *= 2;
    }
    let mut samples = Vec::new();
    let started = Instant::now();
    while started.elapsed() < budget || samples.len() < 5 {
        let batch_started = Instant::now();
        for _ in 0..batch {
            operation();
        }
        samples.push(batch_started.elapsed().as_nanos() as f64 / f64::from(batch));
    }
    median(&mut samples)
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
            fernet.decrypt(token, ttl=3600)
        if time.perf_counter_ns() - started >= job["budget_ns"] / 100 or batch >= 1 << 24:
            break
        batch *= 2
    samples = []
    started = time.perf_counter_ns()
    while time.perf_counter_ns() - started < job["budget_ns"] or len(samples) < 5:
        batch_started = time.perf_counter_ns()
        for _ in range(batch):
            fernet.decrypt(token, ttl=3600)
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
        let results = measure(Duration::from_millis(20)).unwrap();
        assert_eq!(results.len(), SIZES.len());
        for result in &results {
            assert!(result.rust_ns > 0.0);
            assert!(result.token_bytes > result.plaintext_bytes);
        }
    }
}
