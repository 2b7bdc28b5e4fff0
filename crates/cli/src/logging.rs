//! Log output: `tracing` events to standard error, filtered by `RUST_LOG`
//! (default `info`), coloured only on a terminal.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `quiet` commands (one-shot tools such as
/// `pki` or `client`) log warnings only unless `RUST_LOG` says otherwise.
pub fn init(quiet: bool) {
    let default = if quiet { "warn" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}
