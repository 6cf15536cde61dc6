//! `tern admin …`: commands that work on the database directly, for any run of any definition;
//! no server needs to run. The failover commands a user runs day to day (`tern test-failover`,
//! `tern list`, …) talk gRPC to a server instead (`client.rs`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use tern::domain::run::RunStatus;
use tern::engine::{Engine, EngineConfig, SubmitRequest};
use tern::steps::failover::recover;
use tern::steps::failover::setup as failover_setup;
use tern::store::{self, RunFilter, SignalOutcome};

use super::{duration, open_store, run_id, serve, Cli, CloudArgs};

// Parsed once per process; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub(crate) enum AdminCommand {
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
    /// Cancel any run: stop forward progress and roll back.
    Cancel {
        run: String,
        #[arg(long, default_value = "cancelled by operator")]
        reason: String,
    },
    /// Show any run and its full journal.
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
    /// List runs of any definition, newest first.
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
}

#[derive(Subcommand)]
pub(crate) enum InventoryCommand {
    /// Load (insert or replace) VMs and network mappings from a JSON file.
    Load { file: PathBuf },
    /// List the VMs in the inventory.
    List,
}

pub(crate) async fn run(cli: &Cli, command: &AdminCommand) -> Result<()> {
    if !matches!(
        command,
        AdminCommand::Submit { .. } | AdminCommand::Signal { .. } | AdminCommand::Cancel { .. } | AdminCommand::Migrate
    ) {
        super::quiet_on_broken_pipe();
    }
    let store = open_store(cli).await?;
    let engine_for = |cfg: EngineConfig| {
        Engine::with_registry(
            store.clone(),
            cli.workflows.as_deref(),
            tern::steps::builtins(store.clone()),
            cfg,
        )
    };
    match command {
        AdminCommand::Submit {
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
                    by: None,
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
        AdminCommand::Signal { run, name } => {
            let engine = engine_for(EngineConfig::default())?;
            report(engine.signal(run_id(run)?, name).await?, &format!("signal {name}"))?;
        }
        AdminCommand::Cancel { run, reason } => {
            let engine = engine_for(EngineConfig::default())?;
            report(engine.cancel(run_id(run)?, reason).await?, "cancel")?;
        }
        AdminCommand::Journal { run, json } => {
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
        AdminCommand::Recover { run, cloud } => {
            let id = run_id(run)?;
            let row = store
                .get_run(id)
                .await?
                .with_context(|| format!("run {id} not found"))?;
            let input = tern::domain::failover::FailoverInput::from_value(&row.input)
                .map_err(|e| anyhow::anyhow!("run {id} is not a failover: {e}"))?;
            // The VM as the job saw it (pinned at start), else as the inventory has it now.
            let vm = match input.source_vm_spec.clone() {
                Some(vm) => Some(vm),
                None => store.vm_record(&input.vm_id).await?,
            };
            let job = store.failover_job(id).await?;
            let snap = job.as_ref().and_then(|j| j.linstor_snapshot_name.as_deref());
            let found = match (
                serve::cloud_settings(cloud)?,
                &vm,
                row.status == RunStatus::NeedsOperator,
            ) {
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
        AdminCommand::Runs {
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
            super::print_table(
                &["run", "definition", "status", "step", "created"],
                &[],
                rows.into_iter().map(|r| {
                    vec![
                        r.id.to_string(),
                        r.definition,
                        r.display_status,
                        r.current_step.unwrap_or_else(|| "-".into()),
                        r.created_at.to_rfc3339(),
                    ]
                }),
            );
        }
        AdminCommand::Definitions => {
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
        AdminCommand::Inventory { command } => match command {
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
                super::print_table(
                    &[
                        "vm_id",
                        "name",
                        "cpu",
                        "memory",
                        "os",
                        "boot volume",
                        "disks",
                        "nics",
                        "sync",
                    ],
                    &[2, 3, 6, 7],
                    store.vm_records().await?.into_iter().map(|vm| {
                        vec![
                            vm.vm_id,
                            vm.name,
                            vm.cpu_count.to_string(),
                            format!("{}MB", vm.memory_mb),
                            vm.os_type,
                            vm.boot_disk.volume_id,
                            (1 + vm.data_disks.len()).to_string(),
                            vm.nics.len().to_string(),
                            vm.last_sync_change_id.unwrap_or_else(|| "never".into()),
                        ]
                    }),
                );
            }
        },
        AdminCommand::Migrate => println!("migrations applied ({})", store.backend()),
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
