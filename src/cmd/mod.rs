//! The `tern` binary's commands, one file per group: `serve` (dev, server, worker), `sim`, `admin`
//! (direct-database commands, no server needed), `client` (gRPC commands to a server), `bench`.
//! `main.rs` only parses and dispatches here.

pub(crate) mod admin;
pub(crate) mod bench;
pub(crate) mod client;
pub(crate) mod config;
pub(crate) mod serve;
pub(crate) mod sim;
pub(crate) mod token;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use tern::domain::{parse_duration, RunId};
use tern::engine::EngineConfig;
use tern::store::{self, Store};

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "Durable workflow engine for VM failovers",
    after_help = "test-failover, live-failover, end-test, cancel, resolve, get, list, watch and readiness ask a Tern \
                  server over gRPC (--endpoint); `tern admin …` works on the database directly (--database)."
)]
pub(crate) struct Cli {
    /// A TOML file of settings (flag names as keys, `[server]`-style tables per command); the
    /// environment and flags override it.
    #[arg(long, global = true, env = "TERN_CONFIG", value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Database URL: sqlite://PATH (default: tern.db in the data directory) or postgres://…
    #[arg(long, global = true, env = "TERN_DATABASE_URL")]
    pub(crate) database: Option<String>,
    /// Directory whose *.toml definitions override the embedded ones.
    #[arg(long, global = true, env = "TERN_WORKFLOWS_DIR")]
    pub(crate) workflows: Option<PathBuf>,
    /// The Tern server the failover commands talk gRPC to (https:// for TLS).
    #[arg(
        long,
        global = true,
        env = "TERN_ENDPOINT",
        default_value = "http://127.0.0.1:50051",
        help_heading = "Connection to a server"
    )]
    pub(crate) endpoint: String,
    #[command(flatten)]
    pub(crate) connection: client::Connection,
    #[command(subcommand)]
    pub(crate) command: Command,
}

// Parsed once per process; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run Tern on its embedded default: SQLite in the data directory, the built-in CloudStack
    /// simulator with sample VMs, a worker and the gRPC API.
    Dev {
        #[command(flatten)]
        worker: WorkerArgs,
        /// Address of the built-in simulator (default: a free port on loopback, printed at start).
        #[arg(long, default_value = "127.0.0.1:0")]
        sim_listen: String,
        /// Address of the gRPC API.
        #[arg(long, env = "TERN_LISTEN", default_value = "127.0.0.1:50051")]
        listen: String,
        /// Address of the REST API (the seed documents' port).
        #[arg(long, env = "TERN_HTTP_LISTEN", default_value = "127.0.0.1:8082")]
        http_listen: String,
    },
    /// Run the gRPC API and a worker in one process until SIGTERM/SIGINT.
    Server {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        worker: WorkerArgs,
        #[command(flatten)]
        cloud: CloudArgs,
    },
    /// Run a worker process: claims and drives runs until SIGTERM/SIGINT.
    Worker {
        #[command(flatten)]
        worker: WorkerArgs,
        #[command(flatten)]
        cloud: CloudArgs,
    },
    /// Run the CloudStack/LINSTOR simulator (a real HTTP server).
    Sim(sim::SimArgs),
    /// Measure the reference workload (6 checkpointed no-op steps) on SQLite and PostgreSQL.
    Bench(bench::BenchArgs),
    /// Direct-database commands for any run (no server needed): submit, signal, cancel,
    /// journal, recover, runs, definitions, inventory, migrate.
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// Who may call the API: create, list and revoke bearer tokens and certificate names.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// The effective configuration of a command.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page, or write one per command into DIR.
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    #[command(flatten)]
    Client(client::ClientCommand),
}

#[derive(Subcommand)]
pub(crate) enum ConfigCommand {
    /// Show the settings COMMAND would run with (flags after it included), each with where it
    /// came from (flag, environment, file, default); credentials redacted.
    Print {
        /// server, worker, dev, sim, bench, …
        #[arg(default_value = "server")]
        command: String,
        /// The command's own flags, as it would be given them.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// How `tern server` meets its callers.
#[derive(clap::Args, Clone)]
pub(crate) struct ApiArgs {
    /// Address of the gRPC API.
    #[arg(long, env = "TERN_LISTEN", default_value = "127.0.0.1:50051")]
    pub(crate) listen: String,
    /// Address of the REST API (/api/v1/...), beside gRPC, with the same TLS and
    /// authentication (off when unset).
    #[arg(long, env = "TERN_HTTP_LISTEN", value_name = "ADDR")]
    pub(crate) http_listen: Option<String>,
    /// The server's certificate chain (PEM): the API speaks TLS. With --tls-key.
    #[arg(long, env = "TERN_TLS_CERT", requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The server certificate's private key (PEM).
    #[arg(long, env = "TERN_TLS_KEY", requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// CA (PEM) of client certificates (mTLS): a certificate it signed authenticates its
    /// subject common name (tern token create NAME --certificate). Needs --tls-cert.
    #[arg(long, env = "TERN_TLS_CLIENT_CA", requires = "tls_cert")]
    pub(crate) tls_client_ca: Option<PathBuf>,
    /// Let every caller do everything, unauthenticated. Without it every call needs a bearer
    /// token or a client certificate (tern token).
    #[arg(long, env = "TERN_INSECURE_NO_AUTH")]
    pub(crate) insecure_no_auth: bool,
    /// The largest request message, in bytes.
    #[arg(long, env = "TERN_MAX_MESSAGE_SIZE", default_value_t = 4 * 1024 * 1024)]
    pub(crate) max_message_size: usize,
    /// Calls in flight on one connection.
    #[arg(long, env = "TERN_MAX_CALLS_PER_CONNECTION", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_calls_per_connection: u32,
    /// Watch streams open at once, all callers together.
    #[arg(long, env = "TERN_MAX_WATCHES", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_watches: u32,
    /// Calls per second of one principal, bursts up to twice that (0: no limit).
    #[arg(long, env = "TERN_RATE_LIMIT", default_value_t = 200)]
    pub(crate) rate_limit: u32,
}

#[derive(clap::Args, Clone)]
pub(crate) struct WorkerArgs {
    /// Runs driven at once by this process.
    #[arg(long, env = "TERN_CONCURRENCY", default_value_t = 64)]
    pub(crate) concurrency: usize,
    /// Lease length; a dead worker's runs move to another after this.
    #[arg(long, env = "TERN_LEASE_TTL", default_value = "30s", value_parser = duration)]
    pub(crate) lease_ttl: Duration,
    /// Fallback poll interval (wake-ups normally arrive within milliseconds).
    #[arg(long, env = "TERN_POLL_INTERVAL", default_value = "1s", value_parser = duration)]
    pub(crate) poll_interval: Duration,
    /// On SIGTERM, how long in-flight steps may finish before leases are handed back.
    #[arg(long, env = "TERN_SHUTDOWN_GRACE", default_value = "30s", value_parser = duration)]
    pub(crate) shutdown_grace: Duration,
    /// Lease owner name (default host:pid:random).
    #[arg(long, env = "TERN_WORKER_ID")]
    pub(crate) worker_id: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (off when unset).
    #[arg(long, env = "TERN_METRICS_LISTEN", value_name = "ADDR")]
    pub(crate) metrics_listen: Option<String>,
}

/// How to reach CloudStack, LINSTOR and the VirtIO tooling (the failover steps' world).
#[derive(clap::Args, Clone)]
pub(crate) struct CloudArgs {
    /// CloudStack API endpoint, e.g. http://cloudstack:8080/client/api
    #[arg(long, env = "TERN_CLOUDSTACK_URL")]
    pub(crate) cloudstack_url: Option<String>,
    #[arg(long, env = "TERN_CLOUDSTACK_API_KEY", hide_env_values = true)]
    pub(crate) cloudstack_api_key: Option<String>,
    /// Refused: a flag shows in `ps`. The secret key comes from TERN_CLOUDSTACK_SECRET_KEY or
    /// the file named by TERN_CLOUDSTACK_SECRET_KEY_FILE.
    #[arg(long = "cloudstack-secret-key", hide = true)]
    pub(crate) secret_key_flag: Option<String>,
    /// A CA certificate file (PEM) to trust for CloudStack's HTTPS, besides the public roots.
    #[arg(long, env = "TERN_CLOUDSTACK_CA_FILE")]
    pub(crate) cloudstack_ca: Option<PathBuf>,
    /// LINSTOR controller, e.g. http://linstor:3370 (for --snapshot-backend linstor)
    #[arg(long, env = "TERN_LINSTOR_URL")]
    pub(crate) linstor_url: Option<String>,
    /// A CA certificate file (PEM) to trust for LINSTOR's HTTPS, besides the public roots.
    #[arg(long, env = "TERN_LINSTOR_CA_FILE")]
    pub(crate) linstor_ca: Option<PathBuf>,
    /// cloudstack-volume, cloudstack-vm or linstor
    #[arg(long, env = "TERN_SNAPSHOT_BACKEND", default_value = "cloudstack-volume")]
    pub(crate) snapshot_backend: tern::providers::SnapshotKind,
    #[arg(long, env = "TERN_ZONE_ID", default_value = "")]
    pub(crate) zone_id: String,
    /// Service offering for new VMs: a customized one gets the source's CPUs and memory;
    /// several fixed ones (comma-separated) let Tern pick the smallest that fits.
    #[arg(long, env = "TERN_SERVICE_OFFERING_ID", default_value = "")]
    pub(crate) service_offering_id: String,
    #[arg(long, env = "TERN_TEMPLATE_ID", default_value = "")]
    pub(crate) template_id: String,
    /// Network for a test VM's NIC when its source network has no test mapping.
    #[arg(long, env = "TERN_TEST_NETWORK_ID")]
    pub(crate) test_network_id: Option<String>,
    /// Injection command; {device} and {volume_id} are substituted (no shell).
    #[arg(
        long,
        env = "TERN_VIRTIO_COMMAND",
        default_value = "virt-v2v-in-place -i disk -if raw {device}"
    )]
    pub(crate) virtio_command: String,
    /// Read-only check: exit 0 = drivers present, 1 = absent.
    #[arg(long, env = "TERN_VIRTIO_CHECK_COMMAND")]
    pub(crate) virtio_check_command: Option<String>,
    /// Where the volume's disk appears on the OMA; {serial} = the volume id's first 20 characters.
    #[arg(
        long,
        env = "TERN_VIRTIO_DEVICE_PATTERN",
        default_value = "/dev/disk/by-id/*{serial}"
    )]
    pub(crate) virtio_device_pattern: String,
    #[arg(long, env = "VIRTIO_WIN", default_value = "/usr/share/virtio-win/virtio-win.iso")]
    pub(crate) virtio_win: String,
    #[arg(long, env = "TERN_VIRTIO_TIMEOUT", default_value = "30m", value_parser = duration)]
    pub(crate) virtio_timeout: Duration,
    /// Inject through the simulator at this base URL instead of running a command.
    #[arg(long, env = "TERN_VIRTIO_SIM_URL")]
    pub(crate) virtio_sim_url: Option<String>,
    /// queryAsyncJobResult poll interval.
    #[arg(long, env = "TERN_JOB_POLL", default_value = "2s", value_parser = duration)]
    pub(crate) job_poll: Duration,
    /// Longest wait for one CloudStack async job or snapshot.
    #[arg(long, env = "TERN_JOB_TIMEOUT", default_value = "30m", value_parser = duration)]
    pub(crate) job_timeout: Duration,
    /// HTTP request timeout towards CloudStack and LINSTOR.
    #[arg(long, env = "TERN_REQUEST_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub(crate) request_timeout: Duration,
    /// How far CloudStack's clock may be from this machine's: a request expires after the
    /// request timeout plus this, and a mutation left without a reply is looked into only once
    /// it has expired and this much more has passed.
    #[arg(long, env = "TERN_CLOUDSTACK_CLOCK_SKEW", default_value = "5s", value_parser = duration)]
    pub(crate) cloudstack_clock_skew: Duration,
}

impl CloudArgs {
    /// The CloudStack secret key, from the environment only (see [`secret`]).
    pub(crate) fn secret_key(&self) -> Result<Option<String>> {
        if self.secret_key_flag.is_some() {
            bail!(
                "--cloudstack-secret-key is not accepted: a flag is visible to every user in `ps`. \
                 Set TERN_CLOUDSTACK_SECRET_KEY, or TERN_CLOUDSTACK_SECRET_KEY_FILE to a file holding it"
            );
        }
        secret("TERN_CLOUDSTACK_SECRET_KEY")
    }
}

/// A secret from the environment: the variable `name`, or the contents of the file named by
/// `name_FILE` (a trailing newline dropped), as systemd credentials and Kubernetes secrets
/// provide them. Never a flag: a command line is visible to every user in `ps`.
pub(crate) fn secret(name: &str) -> Result<Option<String>> {
    let file_var = format!("{name}_FILE");
    let direct = std::env::var(name).ok().filter(|v| !v.is_empty());
    let file = std::env::var_os(&file_var).filter(|v| !v.is_empty());
    match (direct, file) {
        (Some(_), Some(_)) => bail!("both {name} and {file_var} are set: set one"),
        (Some(v), None) => Ok(Some(v)),
        (None, Some(path)) => {
            let path = PathBuf::from(path);
            let text =
                std::fs::read_to_string(&path).with_context(|| format!("reading {file_var} ({})", path.display()))?;
            let value = text.strip_suffix('\n').unwrap_or(&text);
            let value = value.strip_suffix('\r').unwrap_or(value);
            if value.is_empty() {
                bail!("{file_var} ({}) is empty", path.display());
            }
            Ok(Some(value.to_string()))
        }
        (None, None) => Ok(None),
    }
}

/// A printing command ends quietly when its reader goes away (`tern list | head`), like other
/// Unix tools, instead of panicking on the broken pipe. Long-running processes keep Rust's
/// default (the signal ignored, the write failing).
pub(crate) fn quiet_on_broken_pipe() {
    // SAFETY: setting a signal disposition to SIG_DFL before any thread writes output.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Runs the command.
pub(crate) async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Client(c) => client::run(&cli.endpoint, &cli.connection, c.clone()).await,
        Command::Bench(args) => {
            bench::run(args).await?;
            Ok(())
        }
        Command::Sim(args) => sim::run(args, shutdown_on_signal()?).await,
        Command::Admin(a) => admin::run(&cli, a).await,
        Command::Token(t) => token::run(&cli, t).await,
        Command::Config(ConfigCommand::Print { command, args }) => config::print(command, args),
        Command::Completions { shell } => {
            quiet_on_broken_pipe();
            clap_complete::generate(
                *shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "tern",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man { dir } => man(dir.as_deref()),
        Command::Dev { .. } | Command::Server { .. } | Command::Worker { .. } => {
            serve::run(&cli, shutdown_on_signal()?).await
        }
    }
}

/// `tern man`: the man page of `tern` on stdout, or with `dir` one page per command (`tern.1`,
/// `tern-server.1`, …) written there.
fn man(dir: Option<&std::path::Path>) -> Result<()> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    match dir {
        None => {
            quiet_on_broken_pipe();
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
        }
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir).with_context(|| format!("writing man pages to {}", dir.display()))?;
            println!("man pages written to {}", dir.display());
        }
    }
    Ok(())
}

/// Prints rows under `titles` as aligned columns without borders (the columns listed in `right`
/// aligned right), as the listing commands show them.
pub(crate) fn print_table(titles: &[&str], right: &[usize], rows: impl IntoIterator<Item = Vec<String>>) {
    let mut table = comfy_table::Table::new();
    table
        .load_style(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(titles.to_vec())
        .add_rows(rows);
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    for &i in right {
        if let Some(column) = table.column_mut(i) {
            column.set_cell_alignment(comfy_table::CellAlignment::Right);
        }
    }
    println!("{}", table.trim_fmt());
}

pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

pub(crate) fn data_dir() -> PathBuf {
    if let Ok(d) = std::env::var("TERN_DATA_DIR") {
        return PathBuf::from(d);
    }
    match std::env::var("HOME") {
        Ok(h) => PathBuf::from(h).join(".local/share/tern"),
        Err(_) => PathBuf::from(".tern"),
    }
}

/// The directory of a SQLite database URL's file (None for PostgreSQL); "." for a bare name.
pub(crate) fn sqlite_dir(url: &str) -> Option<PathBuf> {
    let path = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = path.split('?').next().unwrap_or(path);
    match std::path::Path::new(path).parent() {
        Some(dir) if !dir.as_os_str().is_empty() => Some(dir.to_path_buf()),
        _ => Some(PathBuf::from(".")),
    }
}

/// Opens the database; a SQLite database's directory is created first, as on a machine that
/// never ran Tern.
pub(crate) async fn open_store(cli: &Cli) -> Result<Arc<dyn Store>> {
    let url = match &cli.database {
        Some(u) => u.clone(),
        None => format!("sqlite://{}", data_dir().join("tern.db").display()),
    };
    if let Some(dir) = sqlite_dir(&url) {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating the data directory {}", dir.display()))?;
    }
    store::open(&url)
        .await
        .with_context(|| format!("opening database {}", store::redact_url(&url)))
}

pub(crate) fn config(w: &WorkerArgs) -> Result<EngineConfig> {
    if w.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    Ok(EngineConfig {
        worker_id: w.worker_id.clone().unwrap_or_else(tern::engine::default_worker_id),
        concurrency: w.concurrency,
        lease_ttl: w.lease_ttl,
        poll_interval: w.poll_interval,
        shutdown_grace: w.shutdown_grace,
    })
}

pub(crate) fn run_id(s: &str) -> Result<RunId> {
    s.parse().with_context(|| format!("{s:?} is not a run id (a UUID)"))
}

/// Listens for SIGTERM/SIGINT. Registered before anything slow (opening the database) so a
/// SIGTERM during start-up still means a graceful stop, not death by the default action.
pub(crate) fn shutdown_on_signal() -> Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutdown requested");
        t.cancel();
    });
    Ok(token)
}
