//! The `tern` binary: parses the command line and runs the command (`cmd/`).

mod cmd;

use clap::Parser;

/// mimalloc rather than glibc's malloc: allocation was about a fifth of a server's CPU under
/// load (journal records, JSON, gRPC frames), spread over many threads' arenas. Built without
/// transparent huge pages (`no_thp`): with them its arenas held about twice the resident memory
/// for the same throughput.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    tern::telemetry::init();
    if let Err(e) = cmd::run(cmd::Cli::parse()).await {
        eprintln!("tern: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        // Catches clashing flag names and bad defaults at test time instead of at run time.
        super::cmd::Cli::command().debug_assert();
    }
}
