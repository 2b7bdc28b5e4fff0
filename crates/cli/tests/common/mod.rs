//! Helpers shared by the tests that run the real `securemesh` binary.

// Each test file uses its own subset of these helpers.
#![allow(dead_code)]

pub mod cluster;
pub mod etcd;

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BINARY: &str = env!("CARGO_BIN_EXE_securemesh");

/// The binary under test, without the `SECUREMESH_*` settings of the
/// environment the tests run in (a developer's exported certificate or
/// password would change what a test runs).
pub fn command() -> Command {
    let mut command = Command::new(BINARY);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SECUREMESH_") {
            command.env_remove(name);
        }
    }
    command
}

/// Runs `securemesh ARGS` in `dir` to completion.
pub fn securemesh(args: &[&str], dir: &Path) -> Output {
    command()
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run securemesh")
}

/// Starts `securemesh ARGS` in `dir` with standard output and error in
/// `<dir>/<label>.log`.
pub fn spawn_logged(dir: &Path, label: &str, args: &[String]) -> Child {
    let log = File::create(dir.join(format!("{label}.log"))).unwrap();
    command()
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
/// starts (and may restart on the same port); see
/// [`securemesh::ports::free_loopback_port`].
pub fn free_port() -> u16 {
    securemesh::ports::free_loopback_port().unwrap()
}

/// Sends `signal` to `child`.
pub fn signal(child: &Child, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
}

/// SIGTERM, and the exit status once `child` has drained. Its log is
/// complete then: the log writer flushes at exit, not after a kill.
pub fn terminate(child: &mut Child) -> ExitStatus {
    signal(child, nix::sys::signal::Signal::SIGTERM);
    wait_exit(child)
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
