//! The `tern` binary: CLI parsing, configuration, logging, and running until a signal.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use tern::domain::run::RunStatus;
use tern::domain::{parse_duration, RunId};
use tern::engine::{worker, Engine, EngineConfig, SubmitRequest};
use tern::providers::virtio::CommandInjectorConfig;
use tern::steps::failover::recover;
use tern::steps::failover::setup::{self as failover_setup, CloudSettings, InjectorSettings};
use tern::store::{self, RunFilter, SignalOutcome, Store};

/// mimalloc rather than glibc's malloc: allocation was about a fifth of a server's CPU under
/// load (journal records, JSON, gRPC frames), spread over many threads' arenas. Built without
/// transparent huge pages (`no_thp`): with them its arenas held about twice the resident memory
/// for the same throughput.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "tern", version, about = "Durable workflow engine for VM failovers")]
struct Cli {
    /// Database URL: sqlite://PATH (default: tern.db in the data directory) or postgres://…
    #[arg(long, global = true, env = "TERN_DATABASE_URL")]
    database: Option<String>,
    /// Directory whose *.toml definitions override the embedded ones.
    #[arg(long, global = true, env = "TERN_WORKFLOWS_DIR")]
    workflows: Option<PathBuf>,
    /// The Tern server the failover commands talk gRPC to.
    #[arg(long, global = true, env = "TERN_ENDPOINT", default_value = "http://127.0.0.1:50051")]
    endpoint: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct WorkerArgs {
    /// Runs driven at once by this process.
    #[arg(long, env = "TERN_CONCURRENCY", default_value_t = 64)]
    concurrency: usize,
    /// Lease length; a dead worker's runs move to another after this.
    #[arg(long, env = "TERN_LEASE_TTL", default_value = "30s", value_parser = duration)]
    lease_ttl: Duration,
    /// Fallback poll interval (wake-ups normally arrive within milliseconds).
    #[arg(long, env = "TERN_POLL_INTERVAL", default_value = "1s", value_parser = duration)]
    poll_interval: Duration,
    /// On SIGTERM, how long in-flight steps may finish before leases are handed back.
    #[arg(long, env = "TERN_SHUTDOWN_GRACE", default_value = "30s", value_parser = duration)]
    shutdown_grace: Duration,
    /// Lease owner name (default host:pid:random).
    #[arg(long, env = "TERN_WORKER_ID")]
    worker_id: Option<String>,
}

/// How to reach CloudStack, LINSTOR and the VirtIO tooling (the failover steps' world).
#[derive(clap::Args, Clone)]
struct CloudArgs {
    /// CloudStack API endpoint, e.g. http://cloudstack:8080/client/api
    #[arg(long, env = "TERN_CLOUDSTACK_URL")]
    cloudstack_url: Option<String>,
    #[arg(long, env = "TERN_CLOUDSTACK_API_KEY", hide_env_values = true)]
    cloudstack_api_key: Option<String>,
    #[arg(long, env = "TERN_CLOUDSTACK_SECRET_KEY", hide_env_values = true)]
    cloudstack_secret_key: Option<String>,
    /// LINSTOR controller, e.g. http://linstor:3370 (for --snapshot-backend linstor)
    #[arg(long, env = "TERN_LINSTOR_URL")]
    linstor_url: Option<String>,
    /// cloudstack-volume, cloudstack-vm or linstor
    #[arg(long, env = "TERN_SNAPSHOT_BACKEND", default_value = "cloudstack-volume")]
    snapshot_backend: tern::providers::SnapshotKind,
    #[arg(long, env = "TERN_ZONE_ID", default_value = "")]
    zone_id: String,
    #[arg(long, env = "TERN_SERVICE_OFFERING_ID", default_value = "")]
    service_offering_id: String,
    #[arg(long, env = "TERN_TEMPLATE_ID", default_value = "")]
    template_id: String,
    /// Network for a test VM's NIC when its source network has no test mapping.
    #[arg(long, env = "TERN_TEST_NETWORK_ID")]
    test_network_id: Option<String>,
    /// Injection command; {device} and {volume_id} are substituted (no shell).
    #[arg(
        long,
        env = "TERN_VIRTIO_COMMAND",
        default_value = "virt-v2v-in-place -i disk -if raw {device}"
    )]
    virtio_command: String,
    /// Read-only check: exit 0 = drivers present, 1 = absent.
    #[arg(long, env = "TERN_VIRTIO_CHECK_COMMAND")]
    virtio_check_command: Option<String>,
    /// Where the volume's disk appears on the OMA; {serial} = the volume id's first 20 characters.
    #[arg(
        long,
        env = "TERN_VIRTIO_DEVICE_PATTERN",
        default_value = "/dev/disk/by-id/*{serial}"
    )]
    virtio_device_pattern: String,
    #[arg(long, env = "VIRTIO_WIN", default_value = "/usr/share/virtio-win/virtio-win.iso")]
    virtio_win: String,
    #[arg(long, env = "TERN_VIRTIO_TIMEOUT", default_value = "30m", value_parser = duration)]
    virtio_timeout: Duration,
    /// Inject through the simulator at this base URL instead of running a command.
    #[arg(long, env = "TERN_VIRTIO_SIM_URL")]
    virtio_sim_url: Option<String>,
    /// queryAsyncJobResult poll interval.
    #[arg(long, env = "TERN_JOB_POLL", default_value = "2s", value_parser = duration)]
    job_poll: Duration,
    /// Longest wait for one CloudStack async job or snapshot.
    #[arg(long, env = "TERN_JOB_TIMEOUT", default_value = "30m", value_parser = duration)]
    job_timeout: Duration,
    /// HTTP request timeout towards CloudStack and LINSTOR.
    #[arg(long, env = "TERN_REQUEST_TIMEOUT", default_value = "30s", value_parser = duration)]
    request_timeout: Duration,
}

#[derive(clap::Args, Clone)]
struct SimArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    #[arg(long, env = "TERN_SIM_API_KEY", default_value = "tern-dev-key")]
    api_key: String,
    #[arg(
        long,
        env = "TERN_SIM_SECRET_KEY",
        default_value = "tern-dev-secret",
        hide_env_values = true
    )]
    secret_key: String,
    /// Where the simulated world is kept (it survives restarts).
    #[arg(long)]
    state: Option<PathBuf>,
    /// Create the sample world (an OMA, networks, replicated VMs) and print its inventory.
    #[arg(long)]
    sample: bool,
    /// JSON fault plan (error, hang, job failure and lost-reply rates per command).
    #[arg(long)]
    fault_plan: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How long async jobs stay pending.
    #[arg(long, default_value = "200ms", value_parser = duration)]
    latency: Duration,
}

// Parsed once per process; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run Tern on its embedded default: SQLite in the data directory, the built-in CloudStack
    /// simulator with sample VMs, a worker and the gRPC API.
    Dev {
        #[command(flatten)]
        worker: WorkerArgs,
        /// Address of the built-in simulator.
        #[arg(long, default_value = "127.0.0.1:8080")]
        sim_listen: String,
        /// Address of the gRPC API.
        #[arg(long, env = "TERN_LISTEN", default_value = "127.0.0.1:50051")]
        listen: String,
    },
    /// Run the gRPC API and a worker in one process until SIGTERM/SIGINT.
    Server {
        /// Address of the gRPC API.
        #[arg(long, env = "TERN_LISTEN", default_value = "127.0.0.1:50051")]
        listen: String,
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
    Sim(SimArgs),
    /// Measure the reference workload (6 checkpointed no-op steps) on SQLite and PostgreSQL.
    Bench(tern::bench::BenchArgs),
    /// Submit a run of a definition and print its id.
    Submit {
        definition: String,
        /// The run's input as a JSON object.
        #[arg(long, default_value = "{}")]
        input: String,
        /// Idempotency key: the same request id returns the same run.
        #[arg(long)]
        request_id: Option<String>,
        /// Wait until the run is terminal (or this long) and print its final state.
        #[arg(long, value_parser = duration)]
        wait: Option<Duration>,
    },
    /// Send a named signal to a run (e.g. end-test).
    Signal { run: String, name: String },
    /// Cancel any run directly in the database: stop forward progress and roll back.
    CancelRun {
        run: String,
        #[arg(long, default_value = "cancelled by operator")]
        reason: String,
    },
    /// Show any run and its full journal, read from the database.
    Journal {
        run: String,
        #[arg(long)]
        json: bool,
    },
    /// Print the exact manual recovery for a failover run (snapshot, volume, VM ids, the calls).
    /// With the cloud configured (as for `tern worker`), it looks up what is left and lists
    /// only that; without, every step the run may have left.
    Recover {
        run: String,
        #[command(flatten)]
        cloud: CloudArgs,
    },
    /// List runs of any definition from the database, newest first.
    Runs {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        definition: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// List the definitions this build runs (validating any override directory).
    Definitions,
    /// The VM inventory: load a JSON inventory file, or list the VMs.
    Inventory {
        #[command(subcommand)]
        command: InventoryCommand,
    },
    /// Apply database migrations and exit.
    Migrate,
    #[command(flatten)]
    Client(tern::cli::ClientCommand),
}

#[derive(Subcommand)]
enum InventoryCommand {
    /// Load (insert or replace) VMs and network mappings from a JSON file.
    Load { file: PathBuf },
    /// List the VMs in the inventory.
    List,
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

fn data_dir() -> PathBuf {
    if let Ok(d) = std::env::var("TERN_DATA_DIR") {
        return PathBuf::from(d);
    }
    match std::env::var("HOME") {
        Ok(h) => PathBuf::from(h).join(".local/share/tern"),
        Err(_) => PathBuf::from(".tern"),
    }
}

async fn open_store(cli: &Cli) -> Result<Arc<dyn Store>> {
    let url = match &cli.database {
        Some(u) => u.clone(),
        None => {
            let dir = data_dir();
            std::fs::create_dir_all(&dir).with_context(|| format!("creating data directory {}", dir.display()))?;
            format!("sqlite://{}", dir.join("tern.db").display())
        }
    };
    store::open(&url)
        .await
        .with_context(|| format!("opening database {}", store::redact_url(&url)))
}

fn config(w: &WorkerArgs) -> Result<EngineConfig> {
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

fn run_id(s: &str) -> Result<RunId> {
    s.parse().with_context(|| format!("{s:?} is not a run id (a UUID)"))
}

/// Listens for SIGTERM/SIGINT. Registered before anything slow (opening the database) so a
/// SIGTERM during start-up still means a graceful stop, not death by the default action.
fn shutdown_on_signal() -> Result<CancellationToken> {
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

#[tokio::main]
async fn main() {
    tern::telemetry::init();
    if let Err(e) = real_main().await {
        eprintln!("tern: {e:#}");
        std::process::exit(1);
    }
}

async fn real_main() -> Result<()> {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Journal { .. }
            | Command::Runs { .. }
            | Command::Recover { .. }
            | Command::Definitions
            | Command::Inventory { .. }
    ) {
        // Printing commands end quietly when their reader goes away (`tern journal … | head`), like
        // other Unix tools. Long-running network processes keep Rust's default (SIGPIPE ignored).
        // SAFETY: setting a signal disposition to SIG_DFL before any thread writes output.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if let Command::Client(c) = cli.command {
        return tern::cli::run(&cli.endpoint, c).await;
    }
    let shutdown = match cli.command {
        Command::Dev { .. } | Command::Worker { .. } | Command::Server { .. } | Command::Sim(_) => {
            Some(shutdown_on_signal()?)
        }
        _ => None,
    };
    if let Command::Sim(args) = &cli.command {
        return run_sim(args, shutdown.unwrap_or_default()).await;
    }
    if let Command::Bench(args) = &cli.command {
        tern::bench::run(args).await?;
        return Ok(());
    }
    let store = open_store(&cli).await?;
    let engine_for = |cfg: EngineConfig| {
        Engine::with_registry(
            store.clone(),
            cli.workflows.as_deref(),
            tern::steps::builtins(store.clone()),
            cfg,
        )
    };
    match &cli.command {
        Command::Worker { worker: w, cloud } => {
            let (engine, _) = cloud_engine(&cli, store.clone(), w, cloud)?;
            worker::run_worker(engine, shutdown.unwrap_or_default()).await?;
        }
        Command::Server {
            listen,
            worker: w,
            cloud,
        } => {
            let listener = bind_api(listen).await?;
            let (engine, deps) = cloud_engine(&cli, store.clone(), w, cloud)?;
            serve_and_work(listener, engine, deps, shutdown.unwrap_or_default()).await?;
        }
        Command::Dev {
            worker: w,
            sim_listen,
            listen,
        } => {
            let token = shutdown.unwrap_or_default();
            let listener = bind_api(listen).await?;
            let (engine, deps) = dev(&cli, store.clone(), w, sim_listen, token.clone()).await?;
            eprintln!("tern dev: gRPC API on {}", listener.local_addr()?);
            serve_and_work(listener, engine, Some(deps), token).await?;
        }
        Command::Client(_) | Command::Sim(_) | Command::Bench(_) => unreachable!("handled before the store is opened"),
        Command::Submit {
            definition,
            input,
            request_id,
            wait,
        } => {
            let input: serde_json::Value = serde_json::from_str(input).context("--input is not valid JSON")?;
            let engine = engine_for(EngineConfig::default())?;
            let s = engine
                .submit(SubmitRequest {
                    definition: definition.clone(),
                    input,
                    request_id: request_id.clone(),
                    correlation_id: None,
                })
                .await?;
            println!(
                "{}{}",
                s.run.id,
                if s.created {
                    ""
                } else {
                    " (existing run for this request id)"
                }
            );
            if let Some(w) = wait {
                let row = engine.wait_terminal(s.run.id, *w).await?;
                println!("{} {}", row.status.as_str(), row.display_status);
                if !row.status.is_terminal() {
                    bail!("run {} not finished after {w:?}", row.id);
                }
            }
        }
        Command::Signal { run, name } => {
            let engine = engine_for(EngineConfig::default())?;
            report(engine.signal(run_id(run)?, name).await?, &format!("signal {name}"))?;
        }
        Command::CancelRun { run, reason } => {
            let engine = engine_for(EngineConfig::default())?;
            report(engine.cancel(run_id(run)?, reason).await?, "cancel")?;
        }
        Command::Journal { run, json } => {
            let id = run_id(run)?;
            let row = store
                .get_run(id)
                .await?
                .with_context(|| format!("run {id} not found"))?;
            let journal = store.journal(id, 0, 10_000).await?;
            if *json {
                let entries: Vec<_> = journal
                    .iter()
                    .map(|e| serde_json::json!({"seq": e.seq, "at": e.at.to_rfc3339(), "record": e.record}))
                    .collect();
                let out = serde_json::json!({
                    "id": row.id, "definition": row.definition, "status": row.status.as_str(),
                    "display_status": row.display_status, "current_step": row.current_step,
                    "state": row.state, "input": row.input, "context": row.context,
                    "correlation_id": row.correlation_id, "journal": entries,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!("run        {}", row.id);
                println!("definition {} ({})", row.definition, &row.definition_hash[..12]);
                println!("status     {} ({})", row.status.as_str(), row.display_status);
                println!("step       {}", row.current_step.as_deref().unwrap_or("-"));
                println!("created    {}", row.created_at);
                println!("journal:");
                for e in journal {
                    println!("  {:>4}  {}  {}", e.seq, e.at, serde_json::to_string(&e.record)?);
                }
            }
        }
        Command::Recover { run, cloud } => {
            let id = run_id(run)?;
            let row = store
                .get_run(id)
                .await?
                .with_context(|| format!("run {id} not found"))?;
            let input = tern::domain::failover::FailoverInput::from_value(&row.input)
                .map_err(|e| anyhow::anyhow!("run {id} is not a failover: {e}"))?;
            let vm = store.get_vm(&input.vm_id).await?;
            let job = store.failover_job(id).await?;
            let snap = job.as_ref().and_then(|j| j.linstor_snapshot_name.as_deref());
            let found = match (cloud_settings(cloud)?, &vm, row.status == RunStatus::NeedsOperator) {
                (Some(settings), Some(vm), true) => {
                    let deps = failover_setup::build(&settings, store.clone()).map_err(anyhow::Error::msg)?;
                    let rec = recover::Recorded::of(&row, snap);
                    Some(
                        recover::look(&deps, &row, vm, &rec)
                            .await
                            .context("looking up what the run left in the cloud")?,
                    )
                }
                _ => None,
            };
            println!("{}", recover::plan(&row, vm.as_ref(), snap, found.as_ref()));
        }
        Command::Runs {
            status,
            definition,
            limit,
        } => {
            let status = match status {
                Some(s) => Some(RunStatus::parse(s).with_context(|| format!("unknown status {s:?}"))?),
                None => None,
            };
            let rows = store
                .list_runs(&RunFilter {
                    status,
                    definition: definition.clone(),
                    before: None,
                    limit: *limit,
                })
                .await?;
            println!(
                "{:<36}  {:<14}  {:<15}  {:<16}  created",
                "run", "definition", "status", "step"
            );
            for r in rows {
                println!(
                    "{:<36}  {:<14}  {:<15}  {:<16}  {}",
                    r.id,
                    r.definition,
                    r.display_status,
                    r.current_step.as_deref().unwrap_or("-"),
                    r.created_at
                );
            }
        }
        Command::Definitions => {
            let engine = engine_for(EngineConfig::default())?;
            for d in engine.catalog.all() {
                println!(
                    "{:<14} {} steps{}, {} teardown  {}  {}",
                    d.name,
                    d.steps.len(),
                    if d.hold.is_some() { " + hold" } else { "" },
                    d.teardown.len(),
                    &d.hash[..12],
                    d.description
                );
            }
        }
        Command::Inventory { command } => match command {
            InventoryCommand::Load { file } => {
                let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
                let inv = tern::domain::inventory::InventoryFile::parse(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
                store::load_inventory(store.as_ref(), &inv, tern::domain::Timestamp::now()).await?;
                println!(
                    "loaded {} VMs and {} network mappings",
                    inv.vms.len(),
                    inv.network_mappings.len()
                );
            }
            InventoryCommand::List => {
                println!(
                    "{:<38}  {:<16}  {:>4}  {:>8}  {:<8}  {:<38}  sync",
                    "vm_id", "name", "cpu", "memory", "os", "volume"
                );
                for vm in store.list_vms().await? {
                    println!(
                        "{:<38}  {:<16}  {:>4}  {:>6}MB  {:<8}  {:<38}  {}",
                        vm.vm_id,
                        vm.name,
                        vm.cpu_count,
                        vm.memory_mb,
                        vm.os_type,
                        vm.volume_id,
                        vm.last_sync_change_id.as_deref().unwrap_or("never")
                    );
                }
            }
        },
        Command::Migrate => println!("migrations applied ({})", store.backend()),
    }
    Ok(())
}

/// The engine of `tern worker` / `tern server`: built-ins plus the failover steps bound to the
/// configured cloud (or failing with NOT_CONFIGURED when there is none).
fn cloud_engine(
    cli: &Cli,
    store: Arc<dyn Store>,
    w: &WorkerArgs,
    cloud: &CloudArgs,
) -> Result<(Arc<Engine>, Option<Arc<tern::steps::failover::FailoverDeps>>)> {
    let mut registry = tern::steps::builtins(store.clone());
    let deps = match cloud_settings(cloud)? {
        Some(settings) => {
            let deps = failover_setup::build(&settings, store.clone()).map_err(anyhow::Error::msg)?;
            tern::steps::failover::register(&mut registry, deps.clone());
            Some(deps)
        }
        None => {
            tracing::warn!("TERN_CLOUDSTACK_URL not set: failover steps will fail until CloudStack is configured");
            None
        }
    };
    let engine = Engine::with_registry(store, cli.workflows.as_deref(), registry, config(w)?)?;
    Ok((engine, deps))
}

async fn bind_api(listen: &str) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the gRPC API to {listen} (use --listen)"))
}

/// The gRPC API and a worker in one process; both stop on `token` (the API first drains its calls).
async fn serve_and_work(
    listener: tokio::net::TcpListener,
    engine: Arc<Engine>,
    failover: Option<Arc<tern::steps::failover::FailoverDeps>>,
    token: CancellationToken,
) -> Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "gRPC API listening");
    let state = tern::api::ApiState {
        engine: engine.clone(),
        failover,
    };
    let stop = token.clone();
    let api = tokio::spawn(tern::api::serve(listener, state, async move { stop.cancelled().await }));
    let worked = worker::run_worker(engine, token.clone()).await;
    token.cancel();
    let served = api.await.context("the gRPC server task panicked")?;
    worked?;
    served?;
    Ok(())
}

fn report(outcome: SignalOutcome, what: &str) -> Result<()> {
    match outcome {
        SignalOutcome::Accepted => println!("{what}: accepted"),
        SignalOutcome::Duplicate => println!("{what}: already requested (nothing changed)"),
        SignalOutcome::Finished(s) => bail!("{what}: the run is already {}", s.as_str()),
    }
    Ok(())
}

fn split_command(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

/// The cloud settings from flags/environment; None when no CloudStack URL is given.
fn cloud_settings(c: &CloudArgs) -> Result<Option<CloudSettings>> {
    let Some(url) = c.cloudstack_url.clone().filter(|u| !u.trim().is_empty()) else {
        return Ok(None);
    };
    let injector = match &c.virtio_sim_url {
        Some(base_url) => InjectorSettings::Sim {
            base_url: base_url.clone(),
        },
        None => InjectorSettings::Command(CommandInjectorConfig {
            inject_command: split_command(&c.virtio_command),
            check_command: c.virtio_check_command.as_deref().map(split_command),
            env: vec![("VIRTIO_WIN".to_string(), c.virtio_win.clone())],
            device_pattern: c.virtio_device_pattern.clone(),
            timeout: c.virtio_timeout,
            ..CommandInjectorConfig::default()
        }),
    };
    Ok(Some(CloudSettings {
        cloudstack_url: url,
        api_key: c.cloudstack_api_key.clone().unwrap_or_default(),
        secret_key: c.cloudstack_secret_key.clone().unwrap_or_default(),
        linstor_url: c.linstor_url.clone(),
        snapshot_backend: c.snapshot_backend,
        zone_id: c.zone_id.clone(),
        service_offering_id: c.service_offering_id.clone(),
        template_id: c.template_id.clone(),
        test_network_id: c.test_network_id.clone(),
        injector,
        job_poll: c.job_poll,
        job_timeout: c.job_timeout,
        request_timeout: c.request_timeout,
    }))
}

fn sim_config(args: &SimArgs) -> Result<tern::sim::SimConfig> {
    let fault_plan = match &args.fault_plan {
        Some(p) => Some(tern::sim::FaultPlan::load(p).with_context(|| format!("fault plan {}", p.display()))?),
        None => None,
    };
    Ok(tern::sim::SimConfig {
        api_key: args.api_key.clone(),
        secret_key: args.secret_key.clone(),
        state_file: args.state.clone(),
        async_latency: args.latency,
        fault_plan,
        seed: args.seed,
        sample: args.sample,
    })
}

async fn run_sim(args: &SimArgs, shutdown: CancellationToken) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    if args.sample {
        let inv = tern::sim::sample_inventory(args.seed);
        println!("{}", serde_json::to_string_pretty(&inv.to_inventory())?);
        eprintln!(
            "tern sim: CloudStack at http://{addr}/client/api, LINSTOR at http://{addr}\n\
             the inventory above loads with `tern inventory load FILE`; point a worker at it with\n  \
             TERN_CLOUDSTACK_URL=http://{addr}/client/api TERN_ZONE_ID={} TERN_SERVICE_OFFERING_ID={} \\\n  \
             TERN_TEMPLATE_ID={} TERN_TEST_NETWORK_ID={} TERN_VIRTIO_SIM_URL=http://{addr} tern worker",
            inv.zone_id, inv.service_offering_id, inv.template_id, inv.test_network_id
        );
    } else {
        eprintln!("tern sim: CloudStack at http://{addr}/client/api, LINSTOR at http://{addr}");
    }
    tern::sim::serve(listener, sim_config(args)?, async move { shutdown.cancelled().await }).await
}

/// `tern dev`: the simulator with the sample world (kept in the data directory), its
/// inventory loaded, and a worker whose failover steps talk to the simulator over HTTP.
async fn dev(
    cli: &Cli,
    store: Arc<dyn Store>,
    w: &WorkerArgs,
    sim_listen: &str,
    token: CancellationToken,
) -> Result<(Arc<Engine>, Arc<tern::steps::failover::FailoverDeps>)> {
    let seed = 1;
    let args = SimArgs {
        listen: sim_listen.to_string(),
        api_key: "tern-dev-key".into(),
        secret_key: "tern-dev-secret".into(),
        state: Some(data_dir().join("sim-state.json")),
        sample: true,
        fault_plan: None,
        seed,
        latency: Duration::from_millis(200),
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding the simulator to {} (use --sim-listen)", args.listen))?;
    let addr = listener.local_addr()?;
    let sim = sim_config(&args)?;
    let stop = token.clone();
    tokio::spawn(async move {
        if let Err(e) = tern::sim::serve(listener, sim, async move { stop.cancelled().await }).await {
            tracing::error!(error = %e, "simulator stopped");
        }
    });
    let inv = tern::sim::sample_inventory(seed);
    let file = inv.to_inventory();
    store::load_inventory(store.as_ref(), &file, tern::domain::Timestamp::now()).await?;
    let settings = CloudSettings {
        cloudstack_url: format!("http://{addr}/client/api"),
        api_key: args.api_key.clone(),
        secret_key: args.secret_key.clone(),
        linstor_url: Some(format!("http://{addr}")),
        snapshot_backend: tern::providers::SnapshotKind::CloudstackVolume,
        zone_id: inv.zone_id.clone(),
        service_offering_id: inv.service_offering_id.clone(),
        template_id: inv.template_id.clone(),
        test_network_id: Some(inv.test_network_id.clone()),
        injector: InjectorSettings::Sim {
            base_url: format!("http://{addr}"),
        },
        job_poll: Duration::from_millis(100),
        job_timeout: Duration::from_secs(120),
        request_timeout: Duration::from_secs(10),
    };
    let mut registry = tern::steps::builtins(store.clone());
    let deps = failover_setup::build(&settings, store.clone()).map_err(anyhow::Error::msg)?;
    tern::steps::failover::register(&mut registry, deps.clone());
    let engine = Engine::with_registry(store, cli.workflows.as_deref(), registry, config(w)?)?;
    print_dev_banner(&engine, &file, &format!("http://{addr}"));
    Ok((engine, deps))
}

fn print_dev_banner(engine: &Engine, inv: &tern::domain::inventory::InventoryFile, sim: &str) {
    let vms: Vec<String> = inv
        .vms
        .iter()
        .map(|v| format!("  {}  {:<12} {}", v.vm_id, v.name, v.os_type))
        .collect();
    let first = inv.vms.first().map(|v| v.vm_id.clone()).unwrap_or_default();
    eprintln!(
        "tern dev: engine on {} with the CloudStack simulator at {sim} (state in {})\n\
         sample VMs:\n{}\n\
         try, in another terminal:\n  \
         tern test-failover {first} --duration 30s --auto-cleanup --watch\n  \
         tern list\n  tern readiness {first}\n  \
         tern submit test-failover --input '{{\"vm_id\": \"{first}\", \"auto_cleanup\": true, \"test_duration\": \"30s\"}}' --wait 2m\n  \
         tern runs\n  tern journal <run-id>\n  \
         curl -s '{sim}/sim/invariant?prefix=tern-'\n\
         stop with Ctrl-C.",
        engine.store.backend(),
        data_dir().join("sim-state.json").display(),
        vms.join("\n"),
    );
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        // Catches clashing flag names and bad defaults at test time instead of at run time.
        super::Cli::command().debug_assert();
    }
}
