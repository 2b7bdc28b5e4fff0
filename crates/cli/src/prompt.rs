//! Reading a new password: asked for twice, without echo, on a terminal;
//! the first line of standard input otherwise (for scripts).

use std::io::{IsTerminal as _, Write as _};

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

/// The terminal's echo, switched off until dropped.
struct EchoOff {
    before: Termios,
}

impl EchoOff {
    fn new() -> anyhow::Result<Self> {
        let stdin = std::io::stdin();
        let before = tcgetattr(&stdin)?;
        let mut quiet = before.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        tcsetattr(&stdin, SetArg::TCSANOW, &quiet)?;
        Ok(Self { before })
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.before);
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
