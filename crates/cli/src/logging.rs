//! Log output: `tracing` events to standard error and, with `--log-file`,
//! to a file as well (optionally a new file each day), as text or as one
//! JSON object a line. Filtered by `RUST_LOG` (default `info`).
//!
//! Both are written by threads of their own, so that a slow disk or a
//! standard error nobody reads (a full pipe) never stops the service. They
//! differ when they cannot keep up: the file is the audit trail, so a
//! line for it waits for room rather than being lost; a line for standard
//! error is dropped, and how many were is logged (to the file) on the way
//! out.

use std::io::IsTerminal as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

use crate::args::{LogArgs, LogFormat, LogRotation};

/// The writer threads, until [`finish`] flushes and ends them.
static FILE_WRITER: Mutex<Option<WorkerGuard>> = Mutex::new(None);
static STDERR_WRITER: Mutex<Option<WorkerGuard>> = Mutex::new(None);

/// The lines standard error could not take.
static STDERR_DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Set by the first [`finish`]: the others do nothing.
static FINISHED: AtomicBool = AtomicBool::new(false);

/// Installs the global subscriber, logging at `default` (`info`, `warn`,
/// ...) unless `RUST_LOG` says otherwise. Call [`finish`] before the
/// process exits, or the last lines may be lost.
pub fn init(default: &str, args: &LogArgs) -> anyhow::Result<()> {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let (file, file_guard) = match &args.log_file {
        Some(path) => {
            let (writer, guard) = NonBlockingBuilder::default()
                .lossy(false)
                .thread_name("securemesh-log-file")
                .finish(appender(path, args.log_rotation)?);
            let layer = format_layer(args.log_format, writer, false).with_filter(filter());
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };
    let (stderr, stderr_guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(usize::try_from(args.stderr_backlog).unwrap_or(usize::MAX))
        .thread_name("securemesh-log-stderr")
        .finish(std::io::stderr());
    let dropped = stderr.error_counter();
    let terminal = format_layer(args.log_format, stderr, std::io::stderr().is_terminal())
        .with_filter(filter());
    tracing_subscriber::registry()
        .with(terminal)
        .with(file)
        .try_init()?;
    let _ = STDERR_DROPPED.set(dropped);
    if let Some(path) = &args.log_file {
        if let Some(appended) = file_appended_to(path, args.log_rotation) {
            securemesh_fs::warn_if_exposed(&appended, "log file");
        }
    }
    *lock(&FILE_WRITER) = file_guard;
    *lock(&STDERR_WRITER) = Some(stderr_guard);
    Ok(())
}

/// Calls [`finish`] when dropped.
pub struct FinishOnDrop;

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        finish();
    }
}

/// Says how many lines standard error dropped, if any, then writes out
/// what is still buffered (waiting a moment at most for each writer) and
/// stops the writers; only the first call does anything. Events logged
/// afterwards are lost.
pub fn finish() {
    if FINISHED.swap(true, Ordering::AcqRel) {
        return;
    }
    let dropped = STDERR_DROPPED.get().map_or(0, ErrorCounter::dropped_lines);
    if dropped > 0 {
        tracing::warn!(
            dropped,
            "log lines for standard error were dropped: it was not read fast enough"
        );
    }
    drop(lock(&FILE_WRITER).take());
    let stderr = lock(&STDERR_WRITER).take();
    if dropped > 0 {
        // Its backlog is full: dropping the guard would wait in vain, then
        // print its complaint on standard output, into a command's output.
        std::mem::forget(stderr);
    } else {
        drop(stderr);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn format_layer<S, W>(format: LogFormat, writer: W, ansi: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi)
        .with_target(false);
    match format {
        LogFormat::Text => layer.boxed(),
        LogFormat::Json => layer.json().flatten_event(true).boxed(),
    }
}

/// Makes the process create its files readable by their owner only (umask
/// 077), as servers and the coordinator do: their log files hold the audit
/// trail and, unless `--hide-plaintext`, the plaintext of accepted calls,
/// and the files of a daily rotation are created by the appender with
/// whatever mode the umask leaves. Files written through
/// the file-writing helpers of the library crates get their mode
/// explicitly either way.
pub fn keep_created_files_private() {
    #[cfg(unix)]
    {
        use nix::sys::stat::{umask, Mode};
        umask(Mode::from_bits_truncate(0o077));
    }
}

/// Creates the log file at `path`, if missing, readable by its owner only.
fn create_private(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options.open(path).map(drop)
}

/// The file that existed before and that lines go on to: `path` itself,
/// or with a daily rotation its newest `path.YYYY-MM-DD` (today's, or the
/// one before; either holds lines as private as the new ones). Files the
/// process creates are private already.
fn file_appended_to(path: &Path, rotation: LogRotation) -> Option<std::path::PathBuf> {
    match rotation {
        LogRotation::Never => Some(path.to_owned()),
        LogRotation::Daily => {
            let name = path.file_name()?.to_str()?;
            let directory = securemesh_fs::directory_of(path);
            std::fs::read_dir(directory)
                .ok()?
                .filter_map(Result::ok)
                .map(|entry| entry.file_name())
                .filter_map(|file| {
                    let date = file.to_str()?.strip_prefix(name)?.strip_prefix('.')?;
                    let dated = date.len() == 10
                        && date.char_indices().all(|(at, c)| match at {
                            4 | 7 => c == '-',
                            _ => c.is_ascii_digit(),
                        });
                    dated.then(|| directory.join(&file))
                })
                .max()
        }
    }
}

/// Appends to `path`, or with daily rotation to `path.YYYY-MM-DD`.
fn appender(
    path: &Path,
    rotation: LogRotation,
) -> anyhow::Result<tracing_appender::rolling::RollingFileAppender> {
    let directory = securemesh_fs::directory_of(path);
    let name = path
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("--log-file {} names no file", path.display()))?;
    std::fs::create_dir_all(directory)?;
    let rotation = match rotation {
        LogRotation::Never => {
            // The appender would create it with the umask's mode.
            create_private(path)?;
            tracing_appender::rolling::Rotation::NEVER
        }
        LogRotation::Daily => tracing_appender::rolling::Rotation::DAILY,
    };
    Ok(tracing_appender::rolling::RollingFileAppender::builder()
        .rotation(rotation)
        .filename_prefix(name.to_string_lossy())
        .build(directory)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_existing_log_file_is_checked_where_lines_go_on() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("server.log");
        assert_eq!(
            file_appended_to(&path, LogRotation::Never).as_deref(),
            Some(path.as_path())
        );
        assert_eq!(file_appended_to(&path, LogRotation::Daily), None);
        for other in [
            "server.log",
            "server.log.old",
            "server.log.2026-1-1",
            "server.logx.2027-01-01",
            "server.log.2025-11-29",
            "server.log.2026-11-28",
        ] {
            std::fs::write(directory.path().join(other), "").unwrap();
        }
        assert_eq!(
            file_appended_to(&path, LogRotation::Daily),
            Some(directory.path().join("server.log.2026-11-28"))
        );
    }
}
