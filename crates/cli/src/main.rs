//! `securemesh`: one binary for every role. It parses arguments and wires
//! the library crates together; everything testable lives in them.

mod args;
mod commands;
mod demo;
mod logging;

use clap::Parser as _;

/// mimalloc instead of the system allocator: the proxy path allocates and
/// frees small buffers on every call (h2 frames, headers, futures), and
/// glibc's malloc cost 9% of the coordinator's CPU under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = args::Cli::parse();
    // Held until exit: it flushes the log file.
    let _log_guard = match logging::init(cli.command.is_quiet(), &cli.log) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("securemesh: cannot set up logging: {error:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("securemesh: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli.command)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("securemesh: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
