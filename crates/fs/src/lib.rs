//! Writing key material and certificates to disk safely, and noticing
//! secrets that others can read.
//!
//! A file is created only if it does not exist, unless the caller forces an
//! overwrite; either way it ends with exactly the mode asked for (a forced
//! overwrite must not keep an existing file's looser permissions). Missing
//! parent directories are created. Secrets copied into place by hand are
//! checked when they are read: see [`warn_if_exposed`].

use std::fs::OpenOptions;
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
    /// Creating, writing or setting permissions failed.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Fails with [`WriteError::Exists`] for the first of `paths` that exists,
/// unless `force`: lets a caller refuse before writing any of a set.
pub fn refuse_existing<'a>(
    paths: impl IntoIterator<Item = &'a Path>,
    force: bool,
) -> Result<(), WriteError> {
    if force {
        return Ok(());
    }
    match paths.into_iter().find(|path| path.exists()) {
        Some(path) => Err(WriteError::Exists(path.to_path_buf())),
        None => Ok(()),
    }
}

/// Writes `contents` to `path` with `mode` (Unix permission bits).
///
/// An overwrite (`force`) is atomic: the contents go to a temporary file in
/// the same directory, which is synced and renamed over `path`, so that a
/// crash or a concurrent reader never sees a half-written secret.
pub fn write_file(path: &Path, contents: &[u8], mode: u32, force: bool) -> Result<(), WriteError> {
    if !force {
        return create(path, contents, mode, false);
    }
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    create(&temporary, contents, mode, true)?;
    std::fs::rename(&temporary, path).map_err(|source| {
        let _ = std::fs::remove_file(&temporary);
        WriteError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}

fn create(path: &Path, contents: &[u8], mode: u32, force: bool) -> Result<(), WriteError> {
    let io_error = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            WriteError::Exists(path.to_path_buf())
        } else {
            WriteError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_error)?;
    }
    let mut options = OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(mode);
    }
    let mut file = options.open(path).map_err(io_error)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io_error)?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    file.write_all(contents).map_err(io_error)?;
    file.sync_all().map_err(io_error)
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
            let mode = metadata.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = %format!("{mode:o}"),
                    "the {what} {} is open to others than its owner (mode {mode:o}): chmod 600 it",
                    path.display()
                );
                return true;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (path, what);
    false
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
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
