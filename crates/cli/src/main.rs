//! `securemesh`: one binary for every role. It parses arguments and wires
//! the library crates together; everything testable lives in them.

mod args;
mod commands;
mod demo;
mod errors;
mod logging;
mod output;
mod prompt;

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = args::Cli::parse();
    if cli.command.ends_with_its_reader() {
        end_with_the_reader_of_standard_output();
    }
    if cli.command.serves() {
        logging::keep_created_files_private();
    }
    if let Err(error) = logging::init(cli.command.default_log_level(), &cli.log) {
        eprintln!(
            "securemesh: cannot set up logging: {}",
            errors::describe(&error)
        );
        return std::process::ExitCode::FAILURE;
    }
    // Writes out the logs at the end, a panic's unwinding included.
    let _flush_log = logging::FinishOnDrop;
    run(cli)
}

/// Lets SIGPIPE end the process, as it does `cat` or `head`: Rust ignores
/// it, so that a write to a closed pipe fails, and `println!` panics on
/// that failure. Only for commands without sockets (see
/// `Command::ends_with_its_reader`).
fn end_with_the_reader_of_standard_output() {
    #[cfg(unix)]
    {
        use nix::sys::signal::{signal, SigHandler, Signal};
        // SAFETY: called first thing in main, before any other thread
        // starts; the default action is no handler of ours.
        let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
    }
}

fn run(cli: args::Cli) -> std::process::ExitCode {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = cli.threads {
        runtime.worker_threads(usize::from(threads));
    }
    let runtime = match runtime.build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("securemesh: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli.command)) {
        Ok(code) => code,
        Err(error) => {
            // The log lines that led here come out first.
            logging::finish_and_say(
                format!("securemesh: {}", errors::describe(&error)),
                commands::LAST_WORDS_LIMIT,
            );
            std::process::ExitCode::FAILURE
        }
    }
}
