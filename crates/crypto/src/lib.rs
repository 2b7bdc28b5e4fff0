//! Fernet payload encryption as securemesh uses it.
//!
//! Clients encrypt with the first key of a [`KeyRing`]; servers accept a token
//! under any key of the ring. Tokens are the standard Fernet format, byte for
//! byte what Python's `cryptography.fernet` produces and accepts. The
//! coordinator never links this crate's key loading: it relays tokens only.

mod key_file;
mod token;

pub use key_file::{
    edit_key_file, generate_key, rotate_key_file, write_new_key_file, KeyFileEdit, KeyFileError,
    WriteError,
};
pub use token::{sha256, unix_now, KeyRing, TokenError};
