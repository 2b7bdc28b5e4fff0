//! Fernet key files: one base64url key per line, the first used to encrypt.
//!
//! A key file is a secret. It is created with mode 0600 and never replaced
//! unless the caller says so explicitly.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why a key file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file exists and the caller did not ask to overwrite it.
    #[error("{0} already exists (use --force to overwrite)")]
    Exists(PathBuf),
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file holds no key at all.
    #[error("{0}: no Fernet key found")]
    Empty(PathBuf),
    /// A line is not a 32-byte base64url key. The line itself is not shown:
    /// it may be a secret with a typo.
    #[error("{path}: line {line} is not a valid Fernet key (32 bytes, base64url)")]
    InvalidKey {
        /// The file concerned.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
}

/// A new random Fernet key, as `Fernet.generate_key()` makes it.
pub fn generate_key() -> String {
    fernet::Fernet::generate_key()
}

/// Writes a new random key to `path` with mode 0600 and returns nothing but
/// success: the key itself stays in the file.
///
/// Refuses to replace an existing file unless `force` is set.
pub fn write_new_key_file(path: &Path, force: bool) -> Result<(), KeyFileError> {
    write_secret_file(path, format!("{}\n", generate_key()).as_bytes(), force)
}

fn write_secret_file(path: &Path, contents: &[u8], force: bool) -> Result<(), KeyFileError> {
    let io_error = |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
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
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            KeyFileError::Exists(path.to_path_buf())
        } else {
            io_error(source)
        }
    })?;
    // `mode` applies only at creation: a forced overwrite of an existing file
    // must not keep looser permissions.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io_error)?;
    }
    file.write_all(contents).map_err(io_error)
}

/// Reads every key line of a key file, skipping blank lines and `#` comments.
pub(crate) fn read_key_lines(path: &Path) -> Result<Vec<(usize, String)>, KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let keys: Vec<(usize, String)> = text
        .lines()
        .enumerate()
        .map(|(index, line)| (index + 1, line.trim().to_owned()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
        .collect();
    if keys.is_empty() {
        return Err(KeyFileError::Empty(path.to_path_buf()));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_key_file_is_private_and_never_overwritten_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/encryption_key.txt");
        write_new_key_file(&path, false).unwrap();
        let first = std::fs::read_to_string(&path).unwrap();

        let refused = write_new_key_file(&path, false).unwrap_err();
        assert!(matches!(refused, KeyFileError::Exists(_)), "{refused}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), first);

        write_new_key_file(&path, true).unwrap();
        assert_ne!(std::fs::read_to_string(&path).unwrap(), first);

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn forced_overwrite_tightens_loose_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.txt");
        std::fs::write(&path, "old\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            write_new_key_file(&path, true).unwrap();
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
