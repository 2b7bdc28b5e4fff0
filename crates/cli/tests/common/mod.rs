//! Helpers shared by the tests that run the real `securemesh` binary.

// Each test file uses its own subset of these helpers.
#![allow(dead_code)]

pub mod cluster;
pub mod etcd;

use std::fs::File;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BINARY: &str = env!("CARGO_BIN_EXE_securemesh");

/// Runs `securemesh ARGS` in `dir` to completion.
pub fn securemesh(args: &[&str], dir: &Path) -> Output {
    Command::new(BINARY)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run securemesh")
}

/// Starts `securemesh ARGS` in `dir` with standard output and error in
/// `<dir>/<label>.log`.
pub fn spawn_logged(dir: &Path, label: &str, args: &[String]) -> Child {
    let log = File::create(dir.join(format!("{label}.log"))).unwrap();
    Command::new(BINARY)
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// What `spawn_logged` wrote for `label`.
pub fn log(dir: &Path, label: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{label}.log"))).unwrap_or_default()
}

/// Whether one line of `log` holds every one of `needles`.
pub fn has_line_with(log: &str, needles: &[&str]) -> bool {
    log.lines()
        .any(|line| needles.iter().all(|needle| line.contains(needle)))
}

/// Standard output then standard error, as text.
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A loopback port nobody listens on right now, for a process a test
/// starts (and may restart on the same port).
///
/// The port is taken from below the kernel's ephemeral range, so that no
/// outgoing connection (of this test or of any process it started) can
/// take it between this check and the process's `bind`, as a port from
/// `bind(0)` could. Tests in one binary run in parallel and get distinct
/// ports from a shared counter; test binaries are told apart by their
/// process id.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let below = ephemeral_range_start().max(LOWEST + 1_000);
    let span = below - LOWEST;
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(LOWEST + offset).expect("below the ephemeral range");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {LOWEST} and {below}");
}

/// The first port of the kernel's range for outgoing connections.
fn ephemeral_range_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// Sends `signal` to `child`.
pub fn signal(child: &Child, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
}

/// Waits at most 15 s for `child` to exit.
pub fn wait_exit(child: &mut Child) -> ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "process did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A command that must be installed (`.ci/run` installs them all).
pub fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|output| output.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not installed: run .ci/run, or see the README's test section"
    );
    Command::new(name)
}

/// The permission bits of `path`.
pub fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}
