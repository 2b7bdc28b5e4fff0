//! Log output: `tracing` events to standard error and, with `--log-file`,
//! to a file as well (optionally a new file each day), as text or as one
//! JSON object a line. Filtered by `RUST_LOG` (default `info`).

use std::io::IsTerminal as _;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

use crate::args::{LogArgs, LogFormat, LogRotation};

/// The log file's writer thread, until [`finish`] flushes and ends it.
static FILE_WRITER: Mutex<Option<WorkerGuard>> = Mutex::new(None);

/// Installs the global subscriber, logging at `default` (`info`, `warn`,
/// ...) unless `RUST_LOG` says otherwise. Call [`finish`] before the
/// process exits, or the last lines may not reach the log file.
pub fn init(default: &str, args: &LogArgs) -> anyhow::Result<()> {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let terminal = format_layer(
        args.log_format,
        std::io::stderr,
        std::io::stderr().is_terminal(),
    )
    .with_filter(filter());

    let (file, guard) = match &args.log_file {
        Some(path) => {
            let (writer, guard) =
                tracing_appender::non_blocking(appender(path, args.log_rotation)?);
            let layer = format_layer(args.log_format, writer, false).with_filter(filter());
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(terminal)
        .with(file)
        .try_init()?;
    *FILE_WRITER.lock().unwrap_or_else(PoisonError::into_inner) = guard;
    Ok(())
}

/// Calls [`finish`] when dropped.
pub struct FinishOnDrop;

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        finish();
    }
}

/// Writes out what is still buffered for the log file (waiting a moment at
/// most) and stops its writer. Events logged afterwards reach standard
/// error only.
pub fn finish() {
    let writer = FILE_WRITER
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    drop(writer);
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

/// Appends to `path`, or with daily rotation to `path.YYYY-MM-DD`.
fn appender(
    path: &Path,
    rotation: LogRotation,
) -> anyhow::Result<tracing_appender::rolling::RollingFileAppender> {
    let directory = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("--log-file {} names no file", path.display()))?;
    std::fs::create_dir_all(directory)?;
    let rotation = match rotation {
        LogRotation::Never => tracing_appender::rolling::Rotation::NEVER,
        LogRotation::Daily => tracing_appender::rolling::Rotation::DAILY,
    };
    Ok(tracing_appender::rolling::RollingFileAppender::builder()
        .rotation(rotation)
        .filename_prefix(name.to_string_lossy())
        .build(directory)?)
}
