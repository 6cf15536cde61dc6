//! The `tern` binary: CLI parsing, configuration, logging, and running until a signal.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use tern::domain::{parse_duration, RunId};
use tern::engine::machine::RunStatus;
use tern::engine::{worker, Engine, EngineConfig, SubmitRequest};
use tern::store::{self, RunFilter, SignalOutcome, Store};

#[derive(Parser)]
#[command(name = "tern", version, about = "Durable workflow engine for VM failovers")]
struct Cli {
    /// Database URL: sqlite://PATH (default: tern.db in the data directory) or postgres://…
    #[arg(long, global = true, env = "TERN_DATABASE_URL")]
    database: Option<String>,
    /// Directory whose *.toml definitions override the embedded ones.
    #[arg(long, global = true, env = "TERN_WORKFLOWS_DIR")]
    workflows: Option<PathBuf>,
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

#[derive(Subcommand)]
enum Command {
    /// Run the engine on the embedded default (SQLite in the data directory).
    Dev(WorkerArgs),
    /// Run a worker process: claims and drives runs until SIGTERM/SIGINT.
    Worker(WorkerArgs),
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
    /// Cancel a run: stop forward progress and roll back.
    Cancel {
        run: String,
        #[arg(long, default_value = "cancelled by operator")]
        reason: String,
    },
    /// Show a run and its journal.
    Get {
        run: String,
        #[arg(long)]
        json: bool,
    },
    /// List runs, newest first.
    List {
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
    let shutdown = match cli.command {
        Command::Dev(_) | Command::Worker(_) => Some(shutdown_on_signal()?),
        _ => None,
    };
    let store = open_store(&cli).await?;
    let engine_for = |cfg: EngineConfig| Engine::with_defaults(store.clone(), cli.workflows.as_deref(), cfg);
    match &cli.command {
        Command::Dev(w) | Command::Worker(w) => {
            let engine = engine_for(config(w)?)?;
            if matches!(cli.command, Command::Dev(_)) {
                print_dev_banner(&engine);
            }
            let token = shutdown.unwrap_or_default();
            worker::run_worker(engine, token).await?;
        }
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
        Command::Cancel { run, reason } => {
            let engine = engine_for(EngineConfig::default())?;
            report(engine.cancel(run_id(run)?, reason).await?, "cancel")?;
        }
        Command::Get { run, json } => {
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
        Command::List {
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
                let now = tern::domain::Timestamp::now();
                for vm in &inv.vms {
                    store.upsert_vm(vm, now).await?;
                }
                for kind in [
                    tern::domain::inventory::NetworkKind::Test,
                    tern::domain::inventory::NetworkKind::Production,
                ] {
                    for vm in &inv.vms {
                        let ms: Vec<_> = inv
                            .network_mappings
                            .iter()
                            .filter(|m| m.vm_id == vm.vm_id && m.kind == kind)
                            .cloned()
                            .collect();
                        if !ms.is_empty() {
                            store.set_network_mappings(&vm.vm_id, kind, &ms).await?;
                        }
                    }
                }
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

fn report(outcome: SignalOutcome, what: &str) -> Result<()> {
    match outcome {
        SignalOutcome::Accepted => println!("{what}: accepted"),
        SignalOutcome::Duplicate => println!("{what}: already requested (nothing changed)"),
        SignalOutcome::Finished(s) => bail!("{what}: the run is already {}", s.as_str()),
    }
    Ok(())
}

fn print_dev_banner(engine: &Engine) {
    let names: Vec<_> = engine.catalog.all().map(|d| d.name.clone()).collect();
    eprintln!(
        "tern dev: engine running on {} with definitions: {}\n\
         try, in another terminal:\n  \
         tern submit crash-saga --input '{{\"hold\": \"5s\"}}' --wait 30s\n  \
         tern list\n  tern get <run-id>\n\
         stop with Ctrl-C.",
        engine.store.backend(),
        names.join(", ")
    );
}
