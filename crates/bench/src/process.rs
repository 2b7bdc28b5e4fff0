//! The processes a benchmark runs (servers, the coordinator, nginx) and
//! what Linux says about them: resident memory and CPU time, from `/proc`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use crate::BenchError;

/// A child process, killed when dropped.
pub struct Process {
    label: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Process {
    /// Starts `program args`, its standard output and error going to
    /// `<dir>/<label>.log`.
    pub fn start(
        dir: &Path,
        label: &str,
        program: &Path,
        args: Vec<String>,
    ) -> Result<Self, BenchError> {
        let mut process = Self {
            label: label.to_owned(),
            program: program.to_owned(),
            args,
            log: dir.join(format!("{label}.log")),
            child: None,
        };
        process.restart()?;
        Ok(process)
    }

    /// Starts it again with the same arguments (after [`Process::kill`]).
    pub fn restart(&mut self) -> Result<(), BenchError> {
        let spawn = |what: &str, error: std::io::Error| BenchError::Spawn {
            what: format!("{} ({what})", self.label),
            source: error,
        };
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|error| spawn("log file", error))?;
        let errors = log.try_clone().map_err(|error| spawn("log file", error))?;
        let child = securemesh::children::for_lab(&mut Command::new(&self.program))
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(errors)
            .spawn()
            .map_err(|error| spawn(&self.program.display().to_string(), error))?;
        self.child = Some(child);
        Ok(())
    }

    /// Its process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, ...).
    pub fn signal(&self, signal: Signal) {
        if let Some(pid) = self.pid().and_then(|pid| i32::try_from(pid).ok()) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    /// SIGKILL, and reaps it; its own children (nginx's workers, which
    /// outlive a killed master and keep its port) are killed by the same
    /// signal: it leads a process group of its own (see
    /// `securemesh::children::for_lab`), which the signal is sent to.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(leader) = i32::try_from(child.id()) {
                let _ = killpg(Pid::from_raw(leader), Signal::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// This process and its children (nginx's workers): resident memory
    /// and CPU time, summed.
    pub fn usage(&self) -> Usage {
        let Some(pid) = self.pid() else {
            return Usage::default();
        };
        let mut pids = vec![pid];
        pids.extend(children_of(pid));
        pids.iter().map(|&pid| Usage::of(pid)).sum()
    }

    /// How many processes [`Process::usage`] sums.
    pub fn process_count(&self) -> usize {
        self.pid().map_or(0, |pid| 1 + children_of(pid).len())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal(Signal::SIGCONT);
            self.kill();
        }
    }
}

/// Memory and CPU of one or more processes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// Resident set size, bytes (`VmRSS`).
    pub rss_bytes: u64,
    /// User plus system CPU time, seconds.
    pub cpu_seconds: f64,
}

impl Usage {
    /// This process's own.
    pub fn own() -> Self {
        Self::of(std::process::id())
    }

    fn of(pid: u32) -> Self {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss_kib = kib_field(&status, "VmRSS:").unwrap_or(0);
        Self {
            rss_bytes: rss_kib * 1024,
            cpu_seconds: cpu_seconds(pid),
        }
    }
}

impl std::iter::Sum for Usage {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), |total, usage| Self {
            rss_bytes: total.rss_bytes + usage.rss_bytes,
            cpu_seconds: total.cpu_seconds + usage.cpu_seconds,
        })
    }
}

/// The value of a `NAME: N kB` line of a `/proc` file (`status`,
/// `meminfo`), in KiB.
pub fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The fields of `/proc/<pid>/stat` after the command name, which may
/// itself hold spaces and parentheses.
fn stat_fields(pid: u32) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// utime + stime, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    // After the name: state(0) ppid(1) ... utime(11) stime(12).
    let fields = stat_fields(pid);
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|value| value.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&ticks| ticks > 0)
        .unwrap_or(100);
    (ticks(11) + ticks(12)) as f64 / per_second as f64
}

/// The direct children of `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            stat_fields(pid)
                .get(1)
                .and_then(|ppid| ppid.parse::<u32>().ok())
                == Some(parent)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_process_takes_its_children_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let process = Process::start(
            dir.path(),
            "parent",
            Path::new("/bin/sh"),
            vec!["-c".into(), "sleep 30 & sleep 30 & wait".into()],
        )
        .unwrap();
        let pid = process.pid().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let children = loop {
            let children = children_of(pid);
            if children.len() == 2 || std::time::Instant::now() > deadline {
                break children;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert_eq!(children.len(), 2, "{children:?}");
        drop(process);
        std::thread::sleep(std::time::Duration::from_millis(100));
        for child in children {
            // Gone, or a zombie waiting for init to reap it.
            let state = stat_fields(child).first().cloned();
            assert!(
                state.is_none() || state.as_deref() == Some("Z"),
                "child {child} still {state:?}"
            );
        }
    }

    #[test]
    fn usage_of_this_process_is_plausible() {
        let usage = Usage::of(std::process::id());
        assert!(usage.rss_bytes > 1024 * 1024, "{usage:?}");
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(200) {
            std::hint::black_box(spin.elapsed());
        }
        // The spin's CPU time shows (at clock-tick resolution, and this
        // thread may have shared a core: half of it at least).
        let spent = Usage::of(std::process::id()).cpu_seconds - usage.cpu_seconds;
        assert!(spent >= 0.1, "{spent}");
    }

    #[test]
    fn children_are_found_and_summed() {
        let dir = tempfile::tempdir().unwrap();
        let sleeper =
            Process::start(dir.path(), "sleeper", Path::new("sleep"), vec!["5".into()]).unwrap();
        let me = std::process::id();
        assert!(children_of(me).contains(&sleeper.pid().unwrap()));
        assert_eq!(sleeper.process_count(), 1);
        assert!(sleeper.usage().rss_bytes > 0);
    }
}
