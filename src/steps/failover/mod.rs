//! The failover steps: one file per step, each a forward action and its compensation.
//!
//! Every action is written for at-least-once execution: it first looks at the world
//! (CloudStack, the snapshot backend), adopts what an earlier attempt already did, and only
//! then does what is missing. Names are derived from the run (`tern-t-<tag>-<vm>` for a test
//! VM, `tern-<tag>` for a snapshot), so look-ups work even when a crash lost a reply. Async
//! CloudStack job ids are checkpointed as step progress before polling starts, so a restarted
//! worker polls the same job instead of issuing the command again. The replicated volume is
//! never deleted or expunged: every destructive call checks it is not the target.

mod network;
pub mod recover;
pub mod setup;
mod snapshot;
mod validate;
mod virtio;
mod vm;
mod volume;

pub use validate::readiness_for;

use snapshot::Stage;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};

use crate::domain::failover::FailoverInput;
use crate::domain::inventory::{Disk, NetworkKind, VmRecord};
use crate::domain::RunId;
use crate::engine::action::{Action, ActionError, Progress, Registry, StepInput};
use crate::providers::virtio::DriverInjector;
use crate::providers::{AsyncCommand, Cloud, ProviderError, SnapshotBackend, SnapshotKind, Vm, VmFilter, VmState};
use crate::store::Store;

/// Where Tern deploys VMs and how it talks to the cloud, from configuration.
#[derive(Debug, Clone)]
pub struct FailoverConfig {
    pub zone_id: String,
    /// The service offerings a new VM may get: a customized one is given the source's size;
    /// otherwise the smallest fixed one that fits is chosen.
    pub service_offering_ids: Vec<String>,
    pub template_id: String,
    /// Network for a test VM's NIC when a source network has no test mapping.
    pub test_network_id: Option<String>,
    pub snapshot_kind: SnapshotKind,
    /// queryAsyncJobResult interval.
    pub job_poll: Duration,
    /// Longest wait for one async job.
    pub job_timeout: Duration,
}

/// What the failover actions work with.
pub struct FailoverDeps {
    pub store: Arc<dyn Store>,
    pub cloud: Arc<dyn Cloud>,
    pub snapshots: Arc<dyn SnapshotBackend>,
    pub injector: Arc<dyn DriverInjector>,
    pub config: FailoverConfig,
}

/// A failover action, by the name definitions give it (`failover.<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Validate,
    Snapshot,
    DeleteSnapshot,
    InjectVirtio,
    RevertSnapshot,
    CreateVm,
    DestroyVm,
    AttachVolume,
    ReturnVolume,
    DetachVolume,
    ReattachOma,
    StartVm,
    StopVm,
    ConfigureNetwork,
    SnapshotVm,
    RevertVmSnapshot,
    DeleteVmSnapshot,
    UndoVmSnapshot,
}

impl Op {
    const ALL: [Op; 18] = [
        Op::Validate,
        Op::Snapshot,
        Op::DeleteSnapshot,
        Op::InjectVirtio,
        Op::RevertSnapshot,
        Op::CreateVm,
        Op::DestroyVm,
        Op::AttachVolume,
        Op::ReturnVolume,
        Op::DetachVolume,
        Op::ReattachOma,
        Op::StartVm,
        Op::StopVm,
        Op::ConfigureNetwork,
        Op::SnapshotVm,
        Op::RevertVmSnapshot,
        Op::DeleteVmSnapshot,
        Op::UndoVmSnapshot,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::Validate => "failover.validate",
            Op::Snapshot => "failover.snapshot",
            Op::DeleteSnapshot => "failover.delete_snapshot",
            Op::InjectVirtio => "failover.inject_virtio",
            Op::RevertSnapshot => "failover.revert_snapshot",
            Op::CreateVm => "failover.create_vm",
            Op::DestroyVm => "failover.destroy_vm",
            Op::AttachVolume => "failover.attach_volume",
            Op::ReturnVolume => "failover.return_volume",
            Op::DetachVolume => "failover.detach_volume",
            Op::ReattachOma => "failover.reattach_oma",
            Op::StartVm => "failover.start_vm",
            Op::StopVm => "failover.stop_vm",
            Op::ConfigureNetwork => "failover.configure_network",
            Op::SnapshotVm => "failover.snapshot_vm",
            Op::RevertVmSnapshot => "failover.revert_vm_snapshot",
            Op::DeleteVmSnapshot => "failover.delete_vm_snapshot",
            Op::UndoVmSnapshot => "failover.undo_vm_snapshot",
        }
    }

    async fn run(self, attempt: &Attempt<'_>) -> Result<Value, ActionError> {
        match self {
            Op::Validate => validate::run(attempt).await,
            Op::Snapshot => snapshot::create(attempt, Stage::OnOma).await,
            Op::DeleteSnapshot => snapshot::delete(attempt, None).await,
            Op::InjectVirtio => virtio::inject(attempt).await,
            Op::RevertSnapshot => snapshot::revert(attempt, Stage::OnOma).await,
            Op::CreateVm => vm::create(attempt).await,
            Op::DestroyVm => vm::destroy(attempt).await,
            Op::AttachVolume => volume::attach(attempt).await,
            Op::ReturnVolume | Op::ReattachOma => volume::give_back(attempt).await,
            Op::DetachVolume => volume::detach(attempt).await,
            Op::StartVm => vm::start(attempt).await,
            Op::StopVm => vm::stop(attempt).await,
            Op::ConfigureNetwork => network::configure(attempt).await,
            Op::SnapshotVm => snapshot::create(attempt, Stage::OnNewVm).await,
            Op::RevertVmSnapshot => snapshot::revert(attempt, Stage::OnNewVm).await,
            Op::DeleteVmSnapshot => snapshot::delete(attempt, Some(Stage::OnNewVm)).await,
            Op::UndoVmSnapshot => snapshot::undo_vm_snapshot(attempt).await,
        }
    }
}

/// The action names the failover definitions use (known even without a cloud configured).
pub fn action_names() -> impl Iterator<Item = &'static str> {
    Op::ALL.into_iter().map(Op::name)
}

/// Registers the failover actions bound to `deps`.
pub fn register(reg: &mut Registry, deps: Arc<FailoverDeps>) {
    for op in Op::ALL {
        reg.insert(op.name(), Arc::new(FailoverAction { op, deps: deps.clone() }));
    }
}

/// Registers the failover actions for a process without a cloud: each fails permanently
/// with a message saying what to configure.
pub fn register_unconfigured(reg: &mut Registry) {
    for name in action_names() {
        reg.insert(name, Arc::new(Unconfigured));
    }
}

struct Unconfigured;

#[async_trait]
impl Action for Unconfigured {
    async fn run(&self, _step: StepInput) -> Result<Value, ActionError> {
        Err(ActionError::permanent(
            "NOT_CONFIGURED",
            "CloudStack is not configured: set TERN_CLOUDSTACK_URL, TERN_CLOUDSTACK_API_KEY and TERN_CLOUDSTACK_SECRET_KEY",
        ))
    }
}

struct FailoverAction {
    op: Op,
    deps: Arc<FailoverDeps>,
}

#[async_trait]
impl Action for FailoverAction {
    async fn run(&self, step: StepInput) -> Result<Value, ActionError> {
        let attempt = Attempt::new(&self.deps, &step).await?;
        self.op.run(&attempt).await
    }
}

/// One attempt of a failover action: the deps, the step, the typed input, the VM record, and
/// the step's progress (merged and re-saved as the attempt goes).
pub(crate) struct Attempt<'a> {
    pub deps: &'a FailoverDeps,
    pub step: &'a StepInput,
    pub input: FailoverInput,
    pub vm: VmRecord,
    progress: tokio::sync::Mutex<Value>,
    checkpoint: Progress,
}

impl<'a> Attempt<'a> {
    async fn new(deps: &'a FailoverDeps, step: &'a StepInput) -> Result<Attempt<'a>, ActionError> {
        let input = FailoverInput::from_value(&step.input)
            .map_err(|e| ActionError::permanent("INVALID_INPUT", format!("failover input: {e}")))?;
        // The VM as it was when the job started; a run without it reads the inventory.
        let vm = match input.source_vm_spec.clone() {
            Some(vm) => vm,
            None => deps.store.vm_record(&input.vm_id).await?.ok_or_else(|| {
                ActionError::permanent("VM_NOT_FOUND", format!("VM {} is not in the inventory", input.vm_id))
            })?,
        };
        Ok(Attempt {
            deps,
            step,
            input,
            vm,
            progress: tokio::sync::Mutex::new(step.progress.clone().unwrap_or_else(|| json!({}))),
            checkpoint: step.checkpoint.clone(),
        })
    }

    pub fn cloud(&self) -> &dyn Cloud {
        self.deps.cloud.as_ref()
    }

    pub fn run_id(&self) -> RunId {
        self.step.run_id
    }

    /// A value this step checkpointed earlier (in this or a previous attempt).
    pub async fn recorded(&self, key: &str) -> Option<Value> {
        self.progress.lock().await.get(key).cloned()
    }

    /// Durably records `key = value` in the step's progress before going on.
    pub async fn record(&self, key: &str, value: Value) -> Result<(), ActionError> {
        let snapshot = {
            let mut p = self.progress.lock().await;
            if !p.is_object() {
                *p = json!({});
            }
            if let Some(obj) = p.as_object_mut() {
                obj.insert(key.to_string(), value);
            }
            p.clone()
        };
        self.checkpoint.save(snapshot).await
    }

    /// Runs an async CloudStack command as the sub-operation `op` of this step: polls the job a
    /// previous attempt recorded, or issues the command and records its job before polling.
    pub async fn job(&self, op: &str, cmd: AsyncCommand, code: &str) -> Result<Value, ActionError> {
        let key = format!("job:{op}");
        let job_id = match self.recorded(&key).await.as_ref().and_then(RecordedJob::read) {
            Some(job) => {
                if job.attempt != Some(self.step.attempt) {
                    // Its outcome is a hint only: callers check the world after it (see `settle`).
                    tracing::info!(op, job = %job.id, "polling a job an earlier attempt issued");
                }
                job.id
            }
            None => {
                let job = self.cloud().issue(cmd).await.map_err(|e| fail(code, e))?;
                self.record(&key, json!({"id": job.job_id, "attempt": self.step.attempt}))
                    .await?;
                if let Some(rid) = &job.resource_id {
                    self.record(&format!("{op}:resource_id"), json!(rid)).await?;
                }
                crate::crash::point("failover_job_recorded");
                crate::crash::point_of("job_recorded", crash_name(op));
                job.job_id
            }
        };
        let cfg = &self.deps.config;
        let result = self.cloud().wait_job(&job_id, cfg.job_poll, cfg.job_timeout).await;
        crate::crash::point("failover_job_finished");
        crate::crash::point_of("job_finished", crash_name(op));
        if matches!(&result, Ok(_) | Err(ProviderError::AsyncJobFailed { .. })) {
            // A finished job is not polled again: whoever comes next looks at the world anew
            // (a retry of this operation is a new job). A job we merely lost sight of
            // (timeout, connection) stays recorded, so the next attempt polls it.
            self.record(&key, Value::Null).await?;
        }
        result.map_err(|e| fail(code, e))
    }

    /// Runs a job that moves the replicated volume `volume_id`, then lets the world decide: the
    /// step is done when the volume is as wanted (`done`), whatever the job said, and the volume
    /// as last read is returned. A recorded
    /// job may be an earlier attempt's, finished before a crash and undone since by this
    /// attempt (a revert detaches the volume again): its success is then no proof, and the
    /// command is issued anew (at most twice). A failed job whose effect is nevertheless there
    /// (an earlier attempt's job won the race) is success; otherwise the failure is retryable,
    /// as the world is still moving.
    pub async fn settle(
        &self,
        op: &str,
        cmd: AsyncCommand,
        code: &str,
        volume_id: &str,
        done: impl Fn(&crate::providers::Volume) -> bool,
    ) -> Result<crate::providers::Volume, ActionError> {
        for _ in 0..2 {
            let result = self.job(op, cmd.clone(), code).await;
            let now = self.cloud().get_volume(volume_id).await.map_err(|e| fail(code, e))?;
            if done(&now) {
                return Ok(now);
            }
            if let Err(e) = result {
                return Err(retryable(e));
            }
            tracing::warn!(op, volume = %volume_id, "a finished job left the volume elsewhere; issuing it again");
        }
        Err(ActionError::retryable(
            code,
            format!("{op}: volume {volume_id} is still not where it must be"),
        ))
    }

    /// Every replicated disk of the VM, the boot disk first, then the data disks in the
    /// source's order.
    pub fn disks(&self) -> Vec<&Disk> {
        self.vm.all_disks().collect()
    }

    /// Whether `volume_id` is one of the VM's replicated disks (never deleted or expunged).
    pub fn is_replicated(&self, volume_id: &str) -> bool {
        self.vm.all_disks().any(|d| d.volume_id == volume_id)
    }

    /// The test (or production) VM this run created: from a step output, a recorded deploy,
    /// or a look-up by its derived name.
    pub async fn find_vm(&self) -> Result<Option<Vm>, ActionError> {
        let known = self
            .step
            .outputs
            .values()
            .find_map(|v| v.get("destination_vm_id").and_then(Value::as_str))
            .map(str::to_string);
        let id = match known {
            Some(id) => Some(id),
            None => self
                .recorded("deploy:resource_id")
                .await
                .and_then(|v| v.as_str().map(str::to_string)),
        };
        let alive = |found: Vec<Vm>| {
            found
                .into_iter()
                .find(|v| !matches!(v.state, VmState::Destroyed | VmState::Expunging))
        };
        if let Some(id) = id {
            let by_id = self.cloud().list_vms(VmFilter::id(id)).await;
            if let Some(vm) = alive(by_id.map_err(|e| fail("VM_LOOKUP_FAILED", e))?) {
                return Ok(Some(vm));
            }
        }
        // The recorded VM is gone (a failed deploy removed it), or none was recorded: a later
        // deploy whose reply was lost is found by the name the run derives.
        let by_name = self.cloud().list_vms(VmFilter::name(self.vm_name())).await;
        Ok(alive(by_name.map_err(|e| fail("VM_LOOKUP_FAILED", e))?))
    }

    /// The CloudStack name of the VM this run creates: derived from the run, so a re-run finds it.
    pub fn vm_name(&self) -> String {
        let prefix = match self.input.network_kind() {
            NetworkKind::Test => "tern-t",
            NetworkKind::Production => "tern-l",
        };
        vm_name(prefix, self.run_id(), &self.vm.name)
    }

    pub fn snapshot_name(&self) -> String {
        format!("tern-{}", run_tag(self.run_id()))
    }

    /// The backend targets protecting the VM's disks, in disk order, each with the disks it
    /// covers: each disk's own (a volume, a LINSTOR resource), or the one VM snapshot of the
    /// new VM covering every disk (none while that VM does not exist).
    pub async fn snapshot_targets(&self) -> Result<Vec<(String, Vec<String>)>, ActionError> {
        let volumes = || self.vm.all_disks().map(|d| d.volume_id.clone());
        let kind = self.deps.config.snapshot_kind;
        if Stage::of(kind) == Stage::OnNewVm {
            let new_vm = self.find_vm().await?;
            return Ok(new_vm.map(|vm| (vm.id, volumes().collect())).into_iter().collect());
        }
        Ok(volumes()
            .map(|v| (kind.target(&v, &self.vm.oma_vm_id), vec![v]))
            .collect())
    }
}

/// The progress key of a per-disk record: the boot disk keeps the bare key (runs recorded
/// before data disks moved read the same), a data disk's key names its volume.
pub(crate) fn disk_key(base: &str, vm: &VmRecord, volume_id: &str) -> String {
    if vm.boot_disk.volume_id == volume_id {
        base.to_string()
    } else {
        format!("{base}:{volume_id}")
    }
}

/// A sub-operation as a crash point names it: without the id some carry (`detach_own_root:<id>`),
/// so the point is the same in every run.
fn crash_name(op: &str) -> &str {
    op.split(':').next().unwrap_or(op)
}

/// A CloudStack job id a step checkpointed (`job:<op>` in its progress), with the attempt that
/// issued it. Older progress holds the bare id.
struct RecordedJob {
    id: String,
    attempt: Option<u32>,
}

impl RecordedJob {
    fn read(v: &Value) -> Option<RecordedJob> {
        match v {
            Value::String(id) => Some(RecordedJob {
                id: id.clone(),
                attempt: None,
            }),
            Value::Object(o) => Some(RecordedJob {
                id: o.get("id")?.as_str()?.to_string(),
                attempt: o
                    .get("attempt")
                    .and_then(Value::as_u64)
                    .and_then(|a| u32::try_from(a).ok()),
            }),
            _ => None,
        }
    }
}

/// The random tail of a run id (UUIDv7's leading digits are a timestamp, shared by runs started together).
pub fn run_tag(run: RunId) -> String {
    let s = run.0.simple().to_string();
    s[s.len() - 12..].to_string()
}

/// A CloudStack VM name (a hostname: letters, digits, hyphens, at most 63 characters).
pub fn vm_name(prefix: &str, run: RunId, source_name: &str) -> String {
    let mut clean: String = source_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while clean.contains("--") {
        clean = clean.replace("--", "-");
    }
    let mut name = format!("{prefix}-{}-{}", run_tag(run), clean.trim_matches('-'));
    name.truncate(63);
    name.trim_end_matches('-').to_string()
}

/// A step error made retryable: used when a failed operation left the world in flux (for
/// example a job that lost a race with an earlier attempt's job still running).
pub(crate) fn retryable(e: ActionError) -> ActionError {
    match e {
        ActionError::Step(mut se) => {
            se.class = crate::domain::ErrorClass::Retryable;
            ActionError::Step(se)
        }
        other => other,
    }
}

/// A provider error as a step error with a machine code; retry or not is the provider's call.
pub(crate) fn fail(code: &str, e: ProviderError) -> ActionError {
    if e.is_retryable() {
        ActionError::retryable(code, e.to_string())
    } else {
        ActionError::permanent(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_names_are_valid_hostnames_and_stable() {
        let run = RunId("0190a000-0000-7000-8000-00000000abcd".parse().unwrap());
        assert_eq!(vm_name("tern-t", run, "pgtest1"), "tern-t-00000000abcd-pgtest1");
        assert_eq!(
            vm_name("tern-t", run, "Win App_01 (prod)"),
            "tern-t-00000000abcd-win-app-01-prod"
        );
        let long = vm_name("tern-t", run, &"x".repeat(100));
        assert_eq!(long.len(), 63);
        assert_eq!(vm_name("tern-t", run, "pgtest1"), vm_name("tern-t", run, "pgtest1"));
    }
}
