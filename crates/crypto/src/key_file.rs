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
/// Refuses to replace an existing file unless `force` is set. Takes the
/// lock of the file's directory, as [`edit_key_file`] does, so that a
/// forced replacement and an edit under way do not lose one another.
pub fn write_new_key_file(path: &Path, force: bool) -> Result<(), KeyFileError> {
    securemesh_fs::refuse_symbolic_link(path)?;
    let _lock = securemesh_fs::lock_dir_of(path)?;
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
///
/// Comments and blank lines stay: a comment block directly above a key (no
/// blank line between) travels with that key when keys move or go, and
/// every other line keeps its place.
pub fn edit_key_file(path: &Path, edit: KeyFileEdit) -> Result<usize, KeyFileError> {
    securemesh_fs::refuse_symbolic_link(path)?;
    let _lock = securemesh_fs::lock_dir_of(path)?;
    let text = read_key_file_text(path)?;
    let mut lines = KeyFileLines::parse(&text);
    for (line, key) in lines.keys() {
        if fernet::Fernet::new(key).is_none() {
            return Err(KeyFileError::InvalidKey {
                path: path.to_path_buf(),
                line,
            });
        }
    }
    let slots = lines.key_slots();
    let Some(&first) = slots.first() else {
        return Err(KeyFileError::Empty(path.to_path_buf()));
    };
    match edit {
        KeyFileEdit::Rotate => lines.insert_key(first, generate_key()),
        KeyFileEdit::Stage => lines.insert_key(first + 1, generate_key()),
        KeyFileEdit::Promote => match slots.get(1) {
            Some(&second) => lines.0.swap(first, second),
            None => return Err(KeyFileError::NothingToPromote(path.to_path_buf())),
        },
        KeyFileEdit::Keep(0) => return Err(KeyFileError::KeepNone),
        KeyFileEdit::Keep(count) => {
            for &slot in slots.iter().skip(count).rev() {
                lines.0.remove(slot);
            }
        }
    }
    securemesh_fs::write_file(
        path,
        lines.render().as_bytes(),
        securemesh_fs::PRIVATE,
        true,
    )?;
    Ok(lines.key_slots().len())
}

/// A key file's lines as an edit sees them.
struct KeyFileLines(Vec<KeyFileLine>);

/// One line of a key file, or a key with the comment block above it.
enum KeyFileLine {
    /// A key, its 1-based line number (0 for a new key) and the comment
    /// lines directly above it.
    Key {
        key: String,
        line: usize,
        notes: Vec<String>,
    },
    /// A blank line, or a comment not directly above a key: kept as written.
    Other(String),
}

impl KeyFileLines {
    fn parse(text: &str) -> Self {
        let mut lines = Vec::new();
        let mut notes = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let trimmed = raw.trim();
            if trimmed.starts_with('#') {
                notes.push(raw.to_owned());
            } else if trimmed.is_empty() {
                lines.extend(notes.drain(..).map(KeyFileLine::Other));
                lines.push(KeyFileLine::Other(raw.to_owned()));
            } else {
                lines.push(KeyFileLine::Key {
                    key: trimmed.to_owned(),
                    line: index + 1,
                    notes: std::mem::take(&mut notes),
                });
            }
        }
        lines.extend(notes.into_iter().map(KeyFileLine::Other));
        Self(lines)
    }

    /// Every key with its line number, in order.
    fn keys(&self) -> impl Iterator<Item = (usize, &str)> {
        self.0.iter().filter_map(|entry| match entry {
            KeyFileLine::Key { key, line, .. } => Some((*line, key.as_str())),
            KeyFileLine::Other(_) => None,
        })
    }

    /// Where the keys are among the lines.
    fn key_slots(&self) -> Vec<usize> {
        (0..self.0.len())
            .filter(|&index| matches!(self.0[index], KeyFileLine::Key { .. }))
            .collect()
    }

    fn insert_key(&mut self, slot: usize, key: String) {
        let entry = KeyFileLine::Key {
            key,
            line: 0,
            notes: Vec::new(),
        };
        self.0.insert(slot, entry);
    }

    fn render(&self) -> String {
        let mut text = String::new();
        for entry in &self.0 {
            match entry {
                KeyFileLine::Key { key, notes, .. } => {
                    for note in notes {
                        text.push_str(note);
                        text.push('\n');
                    }
                    text.push_str(key);
                }
                KeyFileLine::Other(line) => text.push_str(line),
            }
            text.push('\n');
        }
        text
    }
}

fn read_key_file_text(path: &Path) -> Result<String, KeyFileError> {
    securemesh_fs::warn_if_exposed(path, "Fernet key file");
    std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads every key line of a key file, skipping blank lines and `#` comments.
pub(crate) fn read_key_lines(path: &Path) -> Result<Vec<(usize, String)>, KeyFileError> {
    let text = read_key_file_text(path)?;
    let keys: Vec<(usize, String)> = KeyFileLines::parse(&text)
        .keys()
        .map(|(line, key)| (line, key.to_owned()))
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
    fn edits_keep_comments_and_move_a_key_with_the_comment_above_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.txt");
        let (old, older) = (generate_key(), generate_key());
        let written = format!(
            "# securemesh Fernet keys: the first encrypts\n\n# since March\n{old}\n\n# since January\n{older}\n# end\n"
        );
        std::fs::write(&path, &written).unwrap();

        assert_eq!(edit_key_file(&path, KeyFileEdit::Stage).unwrap(), 3);
        let staged = std::fs::read_to_string(&path).unwrap();
        let new = staged.lines().nth(4).unwrap().to_owned();
        assert_eq!(
            staged,
            format!(
                "# securemesh Fernet keys: the first encrypts\n\n# since March\n{old}\n{new}\n\n# since January\n{older}\n# end\n"
            )
        );

        edit_key_file(&path, KeyFileEdit::Promote).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!(
                "# securemesh Fernet keys: the first encrypts\n\n{new}\n# since March\n{old}\n\n# since January\n{older}\n# end\n"
            )
        );

        assert_eq!(edit_key_file(&path, KeyFileEdit::Keep(2)).unwrap(), 2);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!(
                "# securemesh Fernet keys: the first encrypts\n\n{new}\n# since March\n{old}\n\n# end\n"
            )
        );

        let keys = read_key_lines(&path).unwrap();
        assert_eq!(keys, [(3, new), (5, old)]);
    }

    #[test]
    fn an_edit_refuses_a_bad_key_and_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.txt");
        let written = format!("# keys\n{}\nnot-a-key\n", generate_key());
        std::fs::write(&path, &written).unwrap();
        assert!(matches!(
            edit_key_file(&path, KeyFileEdit::Rotate),
            Err(KeyFileError::InvalidKey { line: 3, .. })
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), written);
        std::fs::write(&path, "# only a comment\n").unwrap();
        assert!(matches!(
            edit_key_file(&path, KeyFileEdit::Rotate),
            Err(KeyFileError::Empty(_))
        ));
    }

    #[test]
    fn a_forced_new_key_waits_for_an_edit_under_way() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.txt");
        write_new_key_file(&path, false).unwrap();
        let edit_under_way = securemesh_fs::lock_dir_of(&path).unwrap();
        let forced = std::thread::spawn({
            let path = path.clone();
            move || write_new_key_file(&path, true)
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!forced.is_finished(), "replaced the file during an edit");
        drop(edit_under_way);
        forced.join().unwrap().unwrap();
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

    /// A rewrite replaces the file at its path: through a symbolic link it
    /// would leave the link's target (which servers may read) unchanged,
    /// and the link a file of its own.
    #[cfg(unix)]
    #[test]
    fn a_key_file_that_is_a_symbolic_link_is_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target/keys.txt");
        write_new_key_file(&target, false).unwrap();
        let link = dir.path().join("keys.txt");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let before = std::fs::read_to_string(&target).unwrap();
        for edit in [
            KeyFileEdit::Rotate,
            KeyFileEdit::Stage,
            KeyFileEdit::Keep(1),
        ] {
            let refused = edit_key_file(&link, edit).unwrap_err();
            assert!(
                matches!(refused, KeyFileError::Write(WriteError::SymbolicLink(_))),
                "{refused}"
            );
        }
        let refused = write_new_key_file(&link, true).unwrap_err();
        assert!(
            matches!(refused, KeyFileError::Write(WriteError::SymbolicLink(_))),
            "{refused}"
        );
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), before);
        // The target itself is edited as any key file.
        assert_eq!(rotate_key_file(&target).unwrap(), 2);
    }
}
