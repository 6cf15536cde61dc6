//! The `tern` binary: parses the command line and runs the command (`cmd/`).

mod cmd;

/// mimalloc rather than glibc's malloc: allocation was about a fifth of a server's CPU under
/// load (journal records, JSON, gRPC frames), spread over many threads' arenas. Built without
/// transparent huge pages (`no_thp`): with them its arenas held about twice the resident memory
/// for the same throughput.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let telemetry = tern::telemetry::init();
    let result = cmd::run(cmd::config::parse()).await;
    // Flushing waits for the exporter, whose connections run on this runtime.
    let _ = tokio::task::spawn_blocking(move || drop(telemetry)).await;
    if let Err(e) = result {
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

    #[test]
    fn commands_split_as_a_shell_would() {
        let words = super::cmd::serve::split_command("X", r#"inject --root "/dev/sda 1" 'it''s' {device}"#).unwrap();
        assert_eq!(words, ["inject", "--root", "/dev/sda 1", "its", "{device}"]);
        let e = super::cmd::serve::split_command("TERN_VIRTIO_COMMAND", r#"inject "open"#).unwrap_err();
        assert!(e.to_string().contains("TERN_VIRTIO_COMMAND"), "{e}");
    }

    #[test]
    fn secrets_come_from_the_environment_or_a_file_never_a_flag() {
        use clap::Parser;
        // Each test runs in a process of its own (nextest): the environment is this test's.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "from-file\n").unwrap();
        std::env::remove_var("TERN_CLOUDSTACK_SECRET_KEY");
        std::env::set_var("TERN_CLOUDSTACK_SECRET_KEY_FILE", &file);
        assert_eq!(
            super::cmd::secret("TERN_CLOUDSTACK_SECRET_KEY").unwrap().as_deref(),
            Some("from-file")
        );
        std::env::set_var("TERN_CLOUDSTACK_SECRET_KEY", "direct");
        assert!(super::cmd::secret("TERN_CLOUDSTACK_SECRET_KEY").is_err(), "both set");
        std::env::remove_var("TERN_CLOUDSTACK_SECRET_KEY_FILE");
        assert_eq!(
            super::cmd::secret("TERN_CLOUDSTACK_SECRET_KEY").unwrap().as_deref(),
            Some("direct")
        );

        let cli = super::cmd::Cli::try_parse_from(["tern", "worker", "--cloudstack-secret-key", "s3cret"]).unwrap();
        let super::cmd::Command::Worker { cloud, .. } = &cli.command else {
            panic!("not the worker command")
        };
        let e = cloud.secret_key().unwrap_err().to_string();
        assert!(
            e.contains("TERN_CLOUDSTACK_SECRET_KEY_FILE") && !e.contains("s3cret"),
            "{e}"
        );
    }
}
