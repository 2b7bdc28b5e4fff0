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
    let (file, file_guard, file_mode) = match &args.log_file {
        Some(path) => {
            // Whatever the command: the files of a daily rotation are
            // created by the appender, with the mode the umask leaves.
            keep_created_files_private();
            let (appender, mode) = appender(path, args.log_rotation)?;
            let (writer, guard) = NonBlockingBuilder::default()
                .lossy(false)
                .thread_name("securemesh-log-file")
                .finish(appender);
            let layer = format_layer(args.log_format, writer, false).with_filter(filter());
            (Some(layer), Some(guard), mode)
        }
        None => (None, None, None),
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
        match file_mode {
            Some(mode) => {
                securemesh_fs::warn_if_mode_exposes(path, mode, "log file");
            }
            None => {
                if let Some(appended) = file_appended_to(path, args.log_rotation) {
                    securemesh_fs::warn_if_exposed(&appended, "log file");
                }
            }
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

/// [`finish`], then `last_words` on standard error, waiting `limit` at
/// most: a process on its way out must not hang on a standard error that
/// nobody reads (a full pipe: the writer's thread then holds standard
/// error's lock in a write that never returns, and `eprintln!` waits on
/// it). What is not written by then is lost with the process.
pub fn finish_and_say(last_words: String, limit: std::time::Duration) {
    let (said, saying) = std::sync::mpsc::channel();
    let spoken = std::thread::Builder::new()
        .name("securemesh-last-words".into())
        .spawn(move || {
            finish();
            eprintln!("{last_words}");
            let _ = said.send(());
        });
    if spoken.is_ok() {
        let _ = saying.recv_timeout(limit);
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

/// Opens the log file at `path` to append to it, creating it readable by
/// its owner only if missing. Refused: a symbolic link in a directory
/// others may write, such as /tmp (one planted there would send the audit
/// trail and plaintexts wherever it points; a link elsewhere, such as
/// `/dev/stdout` or one into a data volume, is followed), and a file that
/// belongs to another user, who could read it (a FIFO too; a character
/// device, such as a terminal, is no file to read); warned about, as for
/// keys: an existing file open to others. Checks are made on the file
/// opened, not on its name.
///
/// Returns the file and its mode (reported once logging is set up).
fn open_log_file(path: &Path) -> anyhow::Result<(std::fs::File, u32)> {
    let mut options = std::fs::OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
        if others_may_write(securemesh_fs::directory_of(path), GroupWrite::Shared) {
            options.custom_flags(nix::libc::O_NOFOLLOW);
        }
    }
    let file = match options.open(path) {
        Ok(file) => file,
        #[cfg(unix)]
        Err(error) if error.raw_os_error() == Some(nix::libc::ELOOP) => {
            anyhow::bail!(
                "--log-file {} is a symbolic link in a directory others may write: give \
                 the file itself",
                path.display()
            )
        }
        Err(error) => {
            return Err(anyhow::Error::new(error)
                .context(format!("cannot open the log file {}", path.display())))
        }
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        let metadata = file.metadata()?;
        if std::os::unix::fs::FileTypeExt::is_char_device(&metadata.file_type()) {
            // A terminal, /dev/null: no file for others to read. (A pipe
            // is judged by its owner: one planted in /tmp is someone's.)
            return Ok((file, 0o600));
        }
        let (owner, me) = (metadata.uid(), nix::unistd::geteuid().as_raw());
        // A file of root's is trusted as root's own directories are.
        anyhow::ensure!(
            owner == me || owner == 0,
            "the log file {} belongs to another user (uid {owner}), who could read it: \
             remove it or choose another",
            path.display()
        );
        Ok((file, metadata.mode() & 0o777))
    }
    #[cfg(not(unix))]
    Ok((file, 0o600))
}

/// How [`others_may_write`] reads a directory its group may write.
#[cfg(unix)]
#[derive(Clone, Copy)]
enum GroupWrite {
    /// As shared, whatever the group.
    Shared,
    /// As this user's alone when the group is this user's own
    /// ([`is_my_own_group`]), as shared otherwise.
    MineInMyOwnGroup,
}

/// Whether users other than this one (and root) may create files in
/// `directory`: writable by all (as /tmp is), or by its group (read as
/// `group_write` says), or owned by someone else. Unknown counts as yes.
#[cfg(unix)]
fn others_may_write(directory: &Path, group_write: GroupWrite) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(metadata) = std::fs::metadata(directory) else {
        return true;
    };
    let owner = metadata.uid();
    if owner != 0 && owner != nix::unistd::geteuid().as_raw() {
        return true;
    }
    let group_may_write = metadata.mode() & 0o020 != 0
        && match group_write {
            GroupWrite::Shared => true,
            GroupWrite::MineInMyOwnGroup => !is_my_own_group(metadata.gid()),
        };
    metadata.mode() & 0o002 != 0 || group_may_write
}

/// Refuses a daily rotation where others could plant its files: the
/// appender opens each day's file by name, following links and appending
/// to whatever is there, so its directory must be one that only this user
/// (or root) may write: not one writable by all (as /tmp is), nor by a
/// group with others in it, nor another user's. (A directory that only
/// one's own group may write is taken: with a group per user, as Debian
/// makes them, that is every directory its owner makes.) Refuses a
/// directory given as the file too (its name would become the prefix of
/// files beside it).
fn check_daily_rotation(path: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        !path.is_dir(),
        "--log-file {} is a directory: name a file in it",
        path.display()
    );
    #[cfg(unix)]
    anyhow::ensure!(
        !others_may_write(
            securemesh_fs::directory_of(path),
            GroupWrite::MineInMyOwnGroup
        ),
        "--log-file {} with --log-rotation daily: other users may create files in {}, \
         where each day's file is opened by name; choose a directory of your own",
        path.display(),
        securemesh_fs::directory_of(path).display()
    );
    Ok(())
}

/// Whether `gid` is this user's own group, as Debian makes one per user:
/// the user's primary group, named as the user, with no other member.
#[cfg(unix)]
fn is_my_own_group(gid: u32) -> bool {
    use nix::unistd::{Gid, Group, User};
    let (Ok(Some(group)), Ok(Some(user))) = (
        Group::from_gid(Gid::from_raw(gid)),
        User::from_uid(nix::unistd::geteuid()),
    ) else {
        return false;
    };
    user.gid == group.gid
        && group.name == user.name
        && group.mem.iter().all(|member| *member == user.name)
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

/// Appends to `path`, or with daily rotation to `path.YYYY-MM-DD`; with
/// the mode of `path` when it is opened here (no rotation).
fn appender(
    path: &Path,
    rotation: LogRotation,
) -> anyhow::Result<(Box<dyn std::io::Write + Send>, Option<u32>)> {
    let directory = securemesh_fs::directory_of(path);
    let name = path
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("--log-file {} names no file", path.display()))?;
    std::fs::create_dir_all(directory)?;
    match rotation {
        LogRotation::Never => {
            let (file, mode) = open_log_file(path)?;
            Ok((Box::new(file), Some(mode)))
        }
        LogRotation::Daily => {
            check_daily_rotation(path)?;
            // The appender takes the name as text: one that is not would
            // send the lines to another file than the one named.
            let name = name.to_str().ok_or_else(|| {
                anyhow::anyhow!(
                    "--log-file {} with --log-rotation daily needs a name in UTF-8",
                    path.display()
                )
            })?;
            let rolling = tracing_appender::rolling::RollingFileAppender::builder()
                .rotation(tracing_appender::rolling::Rotation::DAILY)
                .filename_prefix(name)
                .build(directory)?;
            Ok((Box::new(rolling), None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn a_log_file_is_private_and_neither_a_link_nor_another_users() {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("server.log");
        let (_file, mode) = open_log_file(&path).unwrap();
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // A link in a directory only its owner writes is followed (as
        // /dev/stdout is); one in a directory others may write is refused.
        let elsewhere = directory.path().join("volume.log");
        let linked = directory.path().join("linked.log");
        std::os::unix::fs::symlink(&elsewhere, &linked).unwrap();
        open_log_file(&linked).unwrap();
        assert!(elsewhere.is_file());
        open_log_file(Path::new("/dev/stdout")).unwrap();
        let shared = directory.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let planted = shared.join("planted.log");
        std::os::unix::fs::symlink(&elsewhere, &planted).unwrap();
        let refused = open_log_file(&planted).unwrap_err().to_string();
        assert!(refused.contains("is a symbolic link"), "{refused}");

        // Only root can give a file away.
        if nix::unistd::geteuid().is_root() {
            let theirs = directory.path().join("theirs.log");
            std::fs::write(&theirs, "").unwrap();
            let nobody = nix::unistd::Uid::from_raw(65534);
            nix::unistd::chown(&theirs, Some(nobody), None).unwrap();
            assert_eq!(std::fs::metadata(&theirs).unwrap().uid(), 65534);
            let refused = open_log_file(&theirs).unwrap_err().to_string();
            assert!(refused.contains("belongs to another user"), "{refused}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_daily_rotation_is_refused_where_others_could_plant_its_files() {
        use std::os::unix::fs::PermissionsExt as _;
        let directory = tempfile::tempdir().unwrap();
        check_daily_rotation(&directory.path().join("server.log")).unwrap();
        let refused = check_daily_rotation(directory.path())
            .unwrap_err()
            .to_string();
        assert!(refused.contains("is a directory"), "{refused}");
        let shared = directory.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let refused = check_daily_rotation(&shared.join("server.log"))
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("other users may create files"),
            "{refused}"
        );
        assert!(appender(&shared.join("server.log"), LogRotation::Daily).is_err());
        // A directory of one's own that one's own group may write is taken
        // (the test runs as a user with a group of its own: root, in CI);
        // one that another group may write is not.
        let grouped = directory.path().join("grouped");
        std::fs::create_dir(&grouped).unwrap();
        std::fs::set_permissions(&grouped, std::fs::Permissions::from_mode(0o775)).unwrap();
        let own_group = is_my_own_group(nix::unistd::getegid().as_raw());
        assert_eq!(
            check_daily_rotation(&grouped.join("server.log")).is_ok(),
            own_group
        );
        if nix::unistd::geteuid().is_root() {
            // A group of others (nogroup, with the directory group-writable).
            nix::unistd::chown(&grouped, None, Some(nix::unistd::Gid::from_raw(65534))).unwrap();
            assert!(check_daily_rotation(&grouped.join("server.log")).is_err());
        }
    }

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
