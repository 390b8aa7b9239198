//! Logging set-up for the binaries: `tracing` to stderr, filtered by `RUST_LOG`.
//!
//! Lambda's advanced logging controls ask for JSON with `AWS_LAMBDA_LOG_FORMAT=json`; the
//! CLI writes compact human lines. Secrets never reach a log line: the config redacts them
//! and no error message carries one.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `default_filter` applies when `RUST_LOG` is unset.
pub fn init(default_filter: &str, json: bool) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in a redirected log.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    // A second call (tests) keeps the first subscriber.
    let _ = if json {
        builder
            .json()
            .with_current_span(true)
            // The whole span list, so a scene's line also carries the request id of the
            // Lambda runtime's invocation span around it, not just its own scene id.
            .with_span_list(true)
            .try_init()
    } else {
        builder.compact().try_init()
    };
}
