//! Fernet key files: one base64url key per line, the first used to encrypt.
//!
//! A key file is a secret. It is created with mode 0600 and never replaced
//! unless the caller says so explicitly.

use std::path::{Path, PathBuf};

pub use securemesh_fs::WriteError;

/// Why a key file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Writing failed, or the file exists and the caller did not ask to
    /// overwrite it.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// Reading failed.
    #[error("{path}: {source}")]
    Read {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file holds no key at all.
    #[error("{0}: no Fernet key found")]
    Empty(PathBuf),
    /// A promotion asked of a file with one key.
    #[error("{0}: one key only, none staged to promote (keygen --stage first)")]
    NothingToPromote(PathBuf),
    /// Keeping no key at all was asked.
    #[error("at least one key must be kept")]
    KeepNone,
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
    let line = format!("{}\n", generate_key());
    Ok(securemesh_fs::write_file(
        path,
        line.as_bytes(),
        securemesh_fs::PRIVATE,
        force,
    )?)
}

/// Puts a new random key first in the key file at `path` and keeps the
/// existing keys after it (they still decrypt); the file stays mode 0600.
/// Returns how many keys the file now holds.
pub fn rotate_key_file(path: &Path) -> Result<usize, KeyFileError> {
    edit_key_file(path, KeyFileEdit::Rotate)
}

/// A change to a key file's list of keys (the first encrypts; every one
/// decrypts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFileEdit {
    /// A new key first, at once: whoever loads the file encrypts under it,
    /// so servers must have loaded it before clients do.
    Rotate,
    /// A new key second: servers that load the file accept it, and nobody
    /// encrypts under it yet. The first step of a rotation without an
    /// order to keep: stage, reload every server, then promote.
    Stage,
    /// The second key first, the first one second (it still decrypts).
    Promote,
    /// Only the first `n` keys (at least one) stay: tokens under the others
    /// no longer decrypt once servers reload.
    Keep(usize),
}

/// Applies `edit` to the key file at `path` (which must exist), rewriting
/// it with mode 0600 under the lock of its directory, so that two edits at
/// once do not lose one. Returns how many keys the file now holds.
pub fn edit_key_file(path: &Path, edit: KeyFileEdit) -> Result<usize, KeyFileError> {
    let _lock = securemesh_fs::lock_dir_of(path)?;
    let mut keys = Vec::new();
    for (line, key) in read_key_lines(path)? {
        if fernet::Fernet::new(&key).is_none() {
            return Err(KeyFileError::InvalidKey {
                path: path.to_path_buf(),
                line,
            });
        }
        keys.push(key);
    }
    match edit {
        KeyFileEdit::Rotate => keys.insert(0, generate_key()),
        KeyFileEdit::Stage => keys.insert(1, generate_key()),
        KeyFileEdit::Promote if keys.len() < 2 => {
            return Err(KeyFileError::NothingToPromote(path.to_path_buf()))
        }
        KeyFileEdit::Promote => keys.swap(0, 1),
        KeyFileEdit::Keep(0) => return Err(KeyFileError::KeepNone),
        KeyFileEdit::Keep(count) => keys.truncate(count),
    }
    let contents = keys
        .iter()
        .map(|key| format!("{key}\n"))
        .collect::<String>();
    securemesh_fs::write_file(path, contents.as_bytes(), securemesh_fs::PRIVATE, true)?;
    Ok(keys.len())
}

/// Reads every key line of a key file, skipping blank lines and `#` comments.
pub(crate) fn read_key_lines(path: &Path) -> Result<Vec<(usize, String)>, KeyFileError> {
    securemesh_fs::warn_if_exposed(path, "Fernet key file");
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
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
    fn rotation_puts_a_new_key_first_and_keeps_the_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.txt");
        write_new_key_file(&path, false).unwrap();
        let old = std::fs::read_to_string(&path).unwrap();
        assert_eq!(rotate_key_file(&path).unwrap(), 2);
        let rotated = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = rotated.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_ne!(lines[0], old.trim());
        assert_eq!(lines[1], old.trim());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(rotate_key_file(&dir.path().join("missing.txt")).is_err());
    }

    #[test]
    fn a_staged_key_decrypts_first_and_encrypts_once_promoted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.txt");
        write_new_key_file(&path, false).unwrap();
        let lines = || -> Vec<String> {
            std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        };
        let original = lines();
        assert!(matches!(
            edit_key_file(&path, KeyFileEdit::Promote),
            Err(KeyFileError::NothingToPromote(_))
        ));
        assert_eq!(edit_key_file(&path, KeyFileEdit::Stage).unwrap(), 2);
        let staged = lines();
        assert_eq!(staged[0], original[0], "the encrypting key is unchanged");
        assert_eq!(edit_key_file(&path, KeyFileEdit::Promote).unwrap(), 2);
        assert_eq!(lines(), [staged[1].clone(), original[0].clone()]);
        assert!(matches!(
            edit_key_file(&path, KeyFileEdit::Keep(0)),
            Err(KeyFileError::KeepNone)
        ));
        assert_eq!(edit_key_file(&path, KeyFileEdit::Keep(1)).unwrap(), 1);
        assert_eq!(lines(), [staged[1].clone()]);
        assert_eq!(edit_key_file(&path, KeyFileEdit::Keep(5)).unwrap(), 1);
    }

    #[test]
    fn new_key_file_is_private_and_never_overwritten_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/encryption_key.txt");
        write_new_key_file(&path, false).unwrap();
        let first = std::fs::read_to_string(&path).unwrap();

        let refused = write_new_key_file(&path, false).unwrap_err();
        assert!(
            matches!(refused, KeyFileError::Write(WriteError::Exists(_))),
            "{refused}"
        );
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
}
