//! Writing key material and certificates to disk safely, and noticing
//! secrets that others can read.
//!
//! A file is created only if it does not exist, unless the caller forces an
//! overwrite; either way it ends with exactly the mode asked for (a forced
//! overwrite must not keep an existing file's looser permissions). Missing
//! parent directories are created. Secrets copied into place by hand are
//! checked when they are read: see [`warn_if_exposed`].

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Mode of private keys and other secrets: owner read and write only.
pub const PRIVATE: u32 = 0o600;
/// Mode of public material such as certificates.
pub const PUBLIC: u32 = 0o644;

/// Why a file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The file exists and the caller did not ask to overwrite it.
    #[error("{0} already exists (use --force to overwrite)")]
    Exists(PathBuf),
    /// A file to rewrite is a symbolic link: a rewrite replaces the file
    /// at the path, so the link would become a file of its own and
    /// whoever reads its target would never see the change.
    #[error("{0} is a symbolic link: name the file it points to instead")]
    SymbolicLink(PathBuf),
    /// Creating, writing or setting permissions failed.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Fails with [`WriteError::Exists`] for the first of `paths` that exists
/// (a symbolic link counts, even a broken one, as [`write_file`] refuses
/// it too), unless `force`: lets a caller refuse before writing any of a
/// set.
pub fn refuse_existing<'a>(
    paths: impl IntoIterator<Item = &'a Path>,
    force: bool,
) -> Result<(), WriteError> {
    if force {
        return Ok(());
    }
    match paths
        .into_iter()
        .find(|path| path.symlink_metadata().is_ok())
    {
        Some(path) => Err(WriteError::Exists(path.to_path_buf())),
        None => Ok(()),
    }
}

/// Writes `contents` to `path` with `mode` (Unix permission bits).
///
/// The contents go first to a new temporary file with a random name in the
/// same directory (created exclusively, so a planted file or symlink is
/// never written through), which is synced and then moved into place in
/// one step: renamed over `path` when forced, linked to it only if `path`
/// does not exist otherwise. The directory is synced after, so that a
/// crash leaves the old file or the complete new one, never part of a
/// secret or an empty key.
pub fn write_file(path: &Path, contents: &[u8], mode: u32, force: bool) -> Result<(), WriteError> {
    write_files(
        &[FileToWrite {
            path,
            contents,
            mode,
        }],
        force,
    )
}

/// One file of a set written by [`write_files`].
#[derive(Clone, Copy)]
pub struct FileToWrite<'a> {
    /// Where it goes.
    pub path: &'a Path,
    /// What it holds.
    pub contents: &'a [u8],
    /// Its Unix permission bits.
    pub mode: u32,
}

/// Shows where the file goes, not what it holds (often a private key).
impl std::fmt::Debug for FileToWrite<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileToWrite")
            .field("path", &self.path)
            .field("bytes", &self.contents.len())
            .field("mode", &format_args!("{:o}", self.mode))
            .finish()
    }
}

/// Refuses, with [`WriteError::SymbolicLink`], to rewrite a file (a key
/// file, a credentials file) that is a symbolic link.
pub fn refuse_symbolic_link(path: &Path) -> Result<(), WriteError> {
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_symlink() => {
            Err(WriteError::SymbolicLink(path.to_path_buf()))
        }
        _ => Ok(()),
    }
}

/// Writes a set of files that belong together (a CA and the certificates
/// it signed, a certificate and its key), each as [`write_file`] does, so
/// that a failure leaves the set as it was rather than half new, as far
/// as the file system allows (see below).
///
/// Every file is written and synced under a temporary name before any is
/// moved into place; what fails then (a full disk, a directory that cannot
/// be created) changes nothing. When not forced, a file that appears
/// meanwhile at one of the paths stops the placing, and the files already
/// placed are removed again. A directory at one of the paths is refused
/// before anything is written, forced or not. What can still leave part
/// of the set new is a crash during the placing itself (a rename or link
/// per file) or, when forced, a rename that fails partway (a file that
/// is a mount point of its own, say): the files placed before it stay.
pub fn write_files(files: &[FileToWrite<'_>], force: bool) -> Result<(), WriteError> {
    refuse_existing(files.iter().map(|file| file.path), force)?;
    // Not even forced is a directory replaced; refused here, it cannot
    // stop the placing halfway.
    if let Some(file) = files.iter().find(|file| {
        file.path
            .symlink_metadata()
            .is_ok_and(|metadata| metadata.is_dir())
    }) {
        return Err(io_error(
            file.path,
            std::io::Error::from(std::io::ErrorKind::IsADirectory),
        ));
    }
    let mut staged = Vec::with_capacity(files.len());
    for file in files {
        staged.push(stage(file)?);
    }
    let mut placed: Vec<&Path> = Vec::with_capacity(files.len());
    for (file, temporary) in files.iter().zip(staged) {
        let moved = if force {
            temporary.persist(file.path)
        } else {
            temporary.persist_noclobber(file.path)
        };
        if let Err(failed) = moved {
            if !force {
                // Each was linked where nothing was: removing it restores
                // what was there.
                for path in &placed {
                    let _ = std::fs::remove_file(path);
                }
            }
            return Err(io_error(file.path, failed.error));
        }
        placed.push(file.path);
    }
    let mut directories: Vec<&Path> = files.iter().map(|file| directory_of(file.path)).collect();
    directories.sort();
    directories.dedup();
    for directory in directories {
        sync_directory(directory).map_err(|source| io_error(directory, source))?;
    }
    Ok(())
}

/// `file`'s contents, synced to a new temporary file with its mode in its
/// directory (created if missing), ready to be moved into place.
fn stage(file: &FileToWrite<'_>) -> Result<tempfile::NamedTempFile, WriteError> {
    let error = |source| io_error(file.path, source);
    let parent = directory_of(file.path);
    std::fs::create_dir_all(parent).map_err(error)?;
    let name = file
        .path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut temporary = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(parent)
        .map_err(error)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        temporary
            .as_file()
            .set_permissions(std::fs::Permissions::from_mode(file.mode))
            .map_err(error)?;
    }
    temporary.write_all(file.contents).map_err(error)?;
    temporary.as_file().sync_all().map_err(error)?;
    Ok(temporary)
}

/// An I/O failure on `path`, or [`WriteError::Exists`] when it is that.
fn io_error(path: &Path, source: std::io::Error) -> WriteError {
    if source.kind() == std::io::ErrorKind::AlreadyExists {
        WriteError::Exists(path.to_path_buf())
    } else {
        WriteError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Makes a rename or link in `directory` durable.
fn sync_directory(directory: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(directory)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = directory;
    Ok(())
}

/// An exclusive lock on a directory, held until dropped: see [`lock_dir`].
#[derive(Debug)]
pub struct DirLock {
    _held: std::fs::File,
}

/// Waits for, then takes, an exclusive advisory lock on `dir` (created if
/// missing), so that two processes each reading, changing and writing back
/// a file in it (a CRL, a key file, a credentials file) take turns instead
/// of one losing the other's change. Every writer of such files here takes
/// it; the lock goes with the returned guard, or with the process.
pub fn lock_dir(dir: &Path) -> Result<DirLock, WriteError> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let io_error = |source| WriteError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io_error)?;
    let held = std::fs::File::open(dir).map_err(io_error)?;
    held.lock().map_err(io_error)?;
    Ok(DirLock { _held: held })
}

/// [`lock_dir`] on the directory of the file at `path`, for a change to
/// that file.
pub fn lock_dir_of(path: &Path) -> Result<DirLock, WriteError> {
    lock_dir(directory_of(path))
}

/// The directory that holds `path`: its parent, or `.` for a bare file
/// name.
pub fn directory_of(path: &Path) -> &Path {
    path.parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Logs a warning when the secret at `path` (`what`: "private key", ...)
/// is open to anyone but its owner, as ssh does for keys; `true` when it
/// warned. It does not refuse: secrets mounted by an orchestrator are often
/// group- or world-readable, and refusing would stop a working service.
pub fn warn_if_exposed(path: &Path, what: &str) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(metadata) = std::fs::metadata(path) {
            return warn_if_mode_exposes(path, metadata.permissions().mode(), what);
        }
    }
    #[cfg(not(unix))]
    let _ = (path, what);
    false
}

/// [`warn_if_exposed`] for a file whose mode the caller has read already
/// (from the file it opened, so that what it checks is what it uses).
pub fn warn_if_mode_exposes(path: &Path, mode: u32, what: &str) -> bool {
    let mode = mode & 0o777;
    if mode & 0o077 == 0 {
        return false;
    }
    tracing::warn!(
        path = %path.display(),
        mode = %format!("{mode:o}"),
        "the {what} {} is open to others than its owner (mode {mode:o}): chmod 600 it",
        path.display()
    );
    true
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_directory_lock_is_held_by_one_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_dir(dir.path()).unwrap();
        // Another open file description of the directory (as another
        // process has) cannot take it meanwhile...
        let other = std::fs::File::open(dir.path()).unwrap();
        assert!(matches!(
            other.try_lock(),
            Err(std::fs::TryLockError::WouldBlock)
        ));
        // ...and can once the guard is gone.
        drop(held);
        other.try_lock().unwrap();
    }

    #[test]
    fn creates_with_the_mode_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/secret.pem");
        write_file(&path, b"one", PRIVATE, false).unwrap();
        assert_eq!(mode_of(&path), 0o600);

        let refused = write_file(&path, b"two", PRIVATE, false).unwrap_err();
        assert!(matches!(refused, WriteError::Exists(_)), "{refused}");
        assert!(refused.to_string().contains("secret.pem already exists"));
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        assert!(refuse_existing([path.as_path()], false).is_err());
        assert!(refuse_existing([path.as_path()], true).is_ok());
        // A broken symbolic link is refused up front as write_file refuses
        // it, so that a set is not left half written.
        let dangling = dir.path().join("dangling.pem");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert!(write_file(&dangling, b"x", PRIVATE, false).is_err());
        assert!(refuse_existing([dangling.as_path()], false).is_err());
    }

    #[test]
    fn secrets_open_to_others_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        write_file(&path, b"secret", PRIVATE, false).unwrap();
        assert!(!warn_if_exposed(&path, "private key"));
        for loose in [0o640, 0o604, 0o644, 0o660] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(loose)).unwrap();
            assert!(warn_if_exposed(&path, "private key"), "{loose:o}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(!warn_if_exposed(&path, "private key"));
    }

    /// What is in `dir` besides `keep`: temporary files left behind.
    fn leftovers(dir: &Path, keep: &[&str]) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| !keep.contains(&name.as_str()))
            .collect()
    }

    #[test]
    fn a_symlink_in_the_way_is_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere.txt");
        std::fs::write(&elsewhere, "not yours").unwrap();
        let path = dir.path().join("key.txt");
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        // Not forced: the link counts as an existing file, even dangling.
        let refused = write_file(&path, b"secret", PRIVATE, false).unwrap_err();
        assert!(matches!(refused, WriteError::Exists(_)), "{refused}");
        let dangling = dir.path().join("dangling.txt");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert!(write_file(&dangling, b"secret", PRIVATE, false).is_err());
        assert!(!dir.path().join("nowhere").exists());
        // Forced: the link itself is replaced by a private file.
        write_file(&path, b"secret", PRIVATE, true).unwrap();
        assert_eq!(std::fs::read(&elsewhere).unwrap(), b"not yours");
        assert!(!std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
        assert_eq!(mode_of(&path), 0o600);
        let left = leftovers(dir.path(), &["elsewhere.txt", "key.txt", "dangling.txt"]);
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_set_that_cannot_be_written_whole_leaves_nothing_new() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("ca_key.pem");
        let blocked = dir.path().join("not-a-directory");
        std::fs::write(&blocked, "a file").unwrap();
        let second = blocked.join("client_key.pem");
        let set = |contents: &'static [u8]| {
            [
                FileToWrite {
                    path: &first,
                    contents,
                    mode: PRIVATE,
                },
                FileToWrite {
                    path: &second,
                    contents,
                    mode: PRIVATE,
                },
            ]
        };
        // The second file's directory cannot be made: the first, whose
        // write went through, is not placed either, forced or not.
        for force in [false, true] {
            assert!(write_files(&set(b"new"), force).is_err());
            assert!(!first.exists(), "force {force}");
        }
        std::fs::write(&first, "old").unwrap();
        assert!(write_files(&set(b"new"), true).is_err());
        assert_eq!(std::fs::read(&first).unwrap(), b"old");
        let left = leftovers(dir.path(), &["ca_key.pem", "not-a-directory"]);
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_set_stopped_while_placed_takes_back_what_it_placed() {
        let dir = tempfile::tempdir().unwrap();
        let one = dir.path().join("one.pem");
        let two = dir.path().join("two.pem");
        let file = |path| FileToWrite {
            path,
            contents: b"new",
            mode: PUBLIC,
        };
        // The same path twice stands for a file that appears at a path
        // while the set is placed: its second placing finds the first.
        let refused = write_files(&[file(&one), file(&two), file(&two)], false).unwrap_err();
        assert!(matches!(refused, WriteError::Exists(_)), "{refused}");
        assert!(!one.exists() && !two.exists());
        assert!(leftovers(dir.path(), &[]).is_empty());

        // A directory in the way is refused before anything is written.
        std::fs::create_dir(&two).unwrap();
        for force in [false, true] {
            assert!(write_files(&[file(&one), file(&two)], force).is_err());
            assert!(!one.exists(), "force {force}");
        }

        write_files(&[file(&one)], false).unwrap();
        assert_eq!(std::fs::read(&one).unwrap(), b"new");
        assert_eq!(mode_of(&one), 0o644);
    }

    #[test]
    fn a_forced_overwrite_replaces_content_and_tightens_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.txt");
        std::fs::write(&path, "old and longer").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_file(&path, b"new", PRIVATE, true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(mode_of(&path), 0o600);
    }
}
