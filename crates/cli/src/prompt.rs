//! Reading a new password: asked for twice, without echo, on a terminal;
//! the first line of standard input otherwise (for scripts).

use std::io::{IsTerminal as _, Write as _};

use std::sync::OnceLock;

use nix::libc;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg, Termios};

/// A new password for `user` from standard input.
pub fn new_password(user: &str) -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return read_line(&mut stdin.lock());
    }
    let first = ask(&format!("New password for {user}: "))?;
    let again = ask("The same again: ")?;
    anyhow::ensure!(
        first == again,
        "the two passwords differ; nothing was added"
    );
    Ok(first)
}

/// One line, its line ending removed.
fn read_line(input: &mut impl std::io::BufRead) -> anyhow::Result<String> {
    let mut line = String::new();
    input.read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

/// Prints `question` on standard error and reads the answer with echo off.
fn ask(question: &str) -> anyhow::Result<String> {
    let mut stderr = std::io::stderr();
    write!(stderr, "{question}")?;
    stderr.flush()?;
    let answer = {
        let _quiet = EchoOff::new()?;
        read_line(&mut std::io::stdin().lock())
    };
    // The Enter that ended the answer was not echoed either.
    writeln!(stderr)?;
    answer
}

/// The terminal's echo, switched off until dropped. A signal that would
/// end the process meanwhile (Ctrl-C, Ctrl-\\, a hang-up, SIGTERM) puts the
/// echo back before the process ends, as it would have ended.
struct EchoOff {
    before: Termios,
    handlers_before: Vec<(Signal, SigAction)>,
}

/// The terminal's settings before the echo went off, for the signal
/// handler (which may not take locks).
static SETTINGS_BEFORE: OnceLock<libc::termios> = OnceLock::new();

/// The signals whose default action ends the process and that a user at a
/// terminal sends.
const ENDING_SIGNALS: [Signal; 4] = [
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGHUP,
    Signal::SIGTERM,
];

impl EchoOff {
    fn new() -> anyhow::Result<Self> {
        let stdin = std::io::stdin();
        let before = tcgetattr(&stdin)?;
        // Every prompt of this process finds the terminal as the first did.
        SETTINGS_BEFORE.get_or_init(|| before.clone().into());
        let mut echo_off = Self {
            before,
            handlers_before: Vec::new(),
        };
        // Reset to the default action on entry, and not blocked while
        // handled: the handler raises the signal again, and the process
        // ends by it, as it would have without the prompt (a shell running
        // a script then stops the script too).
        let restore_then_end = SigAction::new(
            SigHandler::Handler(restore_settings_and_end),
            SaFlags::SA_RESETHAND | SaFlags::SA_NODEFER,
            SigSet::empty(),
        );
        for signal in ENDING_SIGNALS {
            // SAFETY: the handler calls only async-signal-safe functions
            // (tcsetattr, write, _exit) and reads a value that was set
            // before it was installed.
            let before = unsafe { sigaction(signal, &restore_then_end) }?;
            echo_off.handlers_before.push((signal, before));
            if before.handler() == SigHandler::SigIgn {
                // Ignored (under nohup, say): leave it so.
                echo_off.put_back_handler(signal, &before);
            }
        }
        let mut quiet = echo_off.before.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        tcsetattr(&stdin, SetArg::TCSANOW, &quiet)?;
        Ok(echo_off)
    }

    fn put_back_handler(&self, signal: Signal, handler: &SigAction) {
        // SAFETY: puts back what the process had before `new`.
        let _ = unsafe { sigaction(signal, handler) };
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.before);
        for (signal, handler) in &self.handlers_before {
            self.put_back_handler(*signal, handler);
        }
    }
}

/// Puts the terminal's settings back, ends the line the user was typing and
/// ends the process by `signal` (its default action again, see
/// `SA_RESETHAND`); exits with the status a shell reports for it should
/// the signal not end the process.
extern "C" fn restore_settings_and_end(signal: libc::c_int) {
    // SAFETY: tcsetattr, write, raise and _exit are async-signal-safe; the
    // settings are a plain value, set once before any handler ran.
    unsafe {
        if let Some(before) = SETTINGS_BEFORE.get() {
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, before);
        }
        libc::write(libc::STDERR_FILENO, b"\n".as_ptr().cast(), 1);
        libc::raise(signal);
        libc::_exit(128 + signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_piped_password_is_its_first_line_without_the_line_ending() {
        let mut piped = std::io::Cursor::new(b"correct horse\r\nignored\n".to_vec());
        assert_eq!(read_line(&mut piped).unwrap(), "correct horse");
    }
}
