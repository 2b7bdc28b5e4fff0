//! Standard output for the commands that also talk over the network
//! (`client`, `status`, `demo`, `bench`): they keep SIGPIPE ignored, since
//! TLS writes with `writev`, which would raise it on a connection the peer
//! reset; so a reader that goes away (`securemesh status --json | head -1`)
//! makes the write fail, and `println!` would panic on that.

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

fn write(arguments: std::fmt::Arguments<'_>) {
    let written = {
        let mut stdout = std::io::stdout().lock();
        stdout.write_fmt(arguments).and_then(|()| stdout.flush())
    };
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
