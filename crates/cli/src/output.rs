//! Standard output for every command. A write can fail: the commands that
//! also talk over the network (`client`, `status`, `demo`, `bench`) keep
//! SIGPIPE ignored, since TLS writes with `writev`, which would raise it on
//! a connection the peer reset, so a reader that goes away (`securemesh
//! status --json | head -1`) makes the write fail; and a full disk or a
//! closed descriptor fails any command's write. `println!` would panic on
//! either.

use std::io::Write as _;

/// The exit status of a process that SIGPIPE ended, as a shell shows it:
/// what the commands without sockets end with in the same case.
const READER_GONE: i32 = 128 + 13;

/// Writes `text` and a newline to standard output; if its reader has gone,
/// ends the process quietly, as the other commands do; if it cannot be
/// written otherwise (a full disk), ends the process with status 1, since
/// what it printed is not what it had to say.
pub fn line(text: impl std::fmt::Display) {
    write(format_args!("{text}\n"));
}

/// Writes `text` as it is to standard output (see [`line`]).
pub fn text(text: impl std::fmt::Display) {
    write(format_args!("{text}"));
}

/// Writes `bytes` exactly as they are to standard output (see [`line`]).
pub fn bytes(bytes: &[u8]) {
    end_unless_written(try_write(|stdout| stdout.write_all(bytes)));
}

/// Writes `text` and a newline to standard output, and says whether it
/// could: for output that must not be lost silently, whose caller says
/// what the loss means.
pub fn try_line(text: impl std::fmt::Display) -> std::io::Result<()> {
    try_write(|stdout| stdout.write_fmt(format_args!("{text}\n")))
}

fn write(arguments: std::fmt::Arguments<'_>) {
    end_unless_written(try_write(|stdout| stdout.write_fmt(arguments)));
}

fn try_write(
    write: impl FnOnce(&mut std::io::StdoutLock<'static>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    write(&mut stdout).and_then(|()| stdout.flush())
}

fn end_unless_written(written: std::io::Result<()>) {
    if let Err(error) = written {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            crate::logging::finish();
            std::process::exit(READER_GONE);
        }
        crate::logging::finish_and_say(
            format!("securemesh: cannot write to standard output: {error}"),
            crate::commands::LAST_WORDS_LIMIT,
        );
        std::process::exit(1);
    }
}
