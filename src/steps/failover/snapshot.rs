//! snapshot (create / delete) and revert, of every disk of the VM.
//!
//! The snapshot's name is derived from the run and recorded (step progress, projected into
//! `failover_jobs.linstor_snapshot_name`) *before* any snapshot is requested, so emergency
//! recovery can always find them: every disk's snapshot has that name on its own target (the
//! volume, its LINSTOR resource, or the one VM snapshot of the new VM covering every disk);
//! `create` adopts a snapshot of that name.
//!
//! When the snapshot is taken follows from the backend ([`Stage`]): the definitions hold a
//! step for each stage, and the one the backend does not use is skipped, saying why.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{disk_key, fail, retryable, Attempt};
use crate::engine::action::ActionError;
use crate::providers::{AsyncCommand, ProviderError, SnapshotKind, VmState};

/// When a backend takes the run's snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Of the disks while they are still on the OMA, before drivers are injected (step
    /// `snapshot`): CloudStack volume snapshots, LINSTOR.
    OnOma,
    /// Of the new VM once every disk is on it, before it starts (step `vm-snapshot`): a
    /// CloudStack VM snapshot covers every volume of its VM. One of the OMA would cover every
    /// other VM's disks too, and CloudStack refuses to move a volume off a VM that has VM
    /// snapshots, so it is taken of the new VM, reverted there while it is stopped, and
    /// deleted before the disks leave it. Drivers injected before it stay on the disks.
    OnNewVm,
}

impl Stage {
    pub(crate) fn of(kind: SnapshotKind) -> Stage {
        match kind {
            SnapshotKind::CloudstackVm => Stage::OnNewVm,
            SnapshotKind::CloudstackVolume | SnapshotKind::Linstor => Stage::OnOma,
        }
    }
}

/// The output of a step of `stage` that the configured backend does not use.
fn off_stage(attempt: &Attempt<'_>, stage: Stage) -> Option<Value> {
    let backend = attempt.deps.snapshots.kind();
    let why = match (stage, Stage::of(attempt.deps.config.snapshot_kind)) {
        (Stage::OnOma, Stage::OnNewVm) => {
            format!("the {backend} backend snapshots the new VM once every disk is on it (step vm-snapshot)")
        }
        (Stage::OnNewVm, Stage::OnOma) => {
            format!("the {backend} backend snapshots the disks before they leave the OMA (step snapshot)")
        }
        _ => return None,
    };
    Some(json!({"skipped": why, "backend": backend}))
}

/// Takes the run's snapshot of every disk, if the backend takes it at `stage`.
pub(crate) async fn create(attempt: &Attempt<'_>, stage: Stage) -> Result<Value, ActionError> {
    if let Some(skipped) = off_stage(attempt, stage) {
        return Ok(skipped);
    }
    let name = attempt.snapshot_name();
    let targets = attempt.snapshot_targets().await?;
    if targets.is_empty() {
        return Err(ActionError::permanent(
            "SNAPSHOT_FAILED",
            format!("no VM named {} to take the VM snapshot of", attempt.vm_name()),
        ));
    }
    let backend = attempt.deps.snapshots.kind();
    attempt.record("snapshot_name", json!(name)).await?;
    let names: Vec<String> = targets.iter().map(|(t, _)| t.clone()).collect();
    let group = attempt
        .deps
        .snapshots
        .create_group(&names, &name)
        .await
        .map_err(|e| fail("SNAPSHOT_FAILED", e))?;
    let taken: Vec<Value> = group
        .snapshots
        .iter()
        .zip(&targets)
        .map(|(info, (_, volume_ids))| json!({"target": info.target, "snapshot_id": info.id, "volume_ids": volume_ids}))
        .collect();
    let mut out = json!({
        "snapshot_name": name,
        "snapshot_id": taken[0]["snapshot_id"],
        "target": taken[0]["target"],
        "backend": backend,
        "snapshots": taken,
        "consistent": group.consistent,
    });
    if !group.consistent {
        out["note"] = json!(format!(
            "{backend} snapshots one disk at a time: the {} disks' snapshots were taken one after the other, not at one instant",
            targets.len()
        ));
    }
    if stage == Stage::OnNewVm && injected(attempt) {
        out["note"] = json!("taken after the VirtIO drivers were injected: a revert undoes what the VM wrote, the drivers stay on the boot disk");
    }
    Ok(out)
}

/// Whether this run injected drivers into the boot disk.
fn injected(attempt: &Attempt<'_>) -> bool {
    attempt
        .step
        .output_of("virtio-injection")
        .is_some_and(|o| o.get("injected") == Some(&Value::Bool(true)))
}

/// Deletes the run's snapshot of every disk, whatever its stage, or only if the backend takes
/// it at `only`; a snapshot that does not exist is already deleted.
pub(crate) async fn delete(attempt: &Attempt<'_>, only: Option<Stage>) -> Result<Value, ActionError> {
    if attempt.input.skip_snapshot {
        return Ok(json!({"skipped": "no snapshot was taken (skip_snapshot)"}));
    }
    if let Some(skipped) = only.and_then(|stage| off_stage(attempt, stage)) {
        return Ok(skipped);
    }
    const CODE: &str = "SNAPSHOT_DELETE_FAILED";
    let name = attempt.snapshot_name();
    let mut targets = Vec::new();
    for (target, _) in attempt.snapshot_targets().await? {
        if let Err(e) = attempt.deps.snapshots.delete(&target, &name).await {
            // The world decides: an earlier attempt's delete (its reply lost) may have finished
            // meanwhile, and then this one's "not found" is success.
            if exists(attempt, &target, &name, CODE).await? {
                return Err(retryable(fail(CODE, e)));
            }
        }
        targets.push(target);
    }
    Ok(json!({"deleted": name, "targets": targets}))
}

/// Whether the run's snapshot `name` of `target` exists.
async fn exists(attempt: &Attempt<'_>, target: &str, name: &str, code: &str) -> Result<bool, ActionError> {
    let found = attempt.deps.snapshots.find(target, name).await;
    Ok(found.map_err(|e| fail(code, e))?.is_some())
}

/// Where a revert must put a volume back (recorded before it detaches it from a running VM).
#[derive(Serialize, Deserialize)]
struct RestoreTo {
    vm_id: String,
    device_id: Option<u32>,
}

/// Reverts every disk to the run's snapshot taken at `stage`, undoing driver injection (on
/// the OMA stage) and test writes. A volume snapshot or LINSTOR revert needs the volumes off
/// any running VM: one that is on one (the OMA, during a rollback) is detached first, with the
/// intent to put it back recorded, and reattached after. A VM snapshot is reverted on the new
/// VM, stopped first. Each target reverted is recorded, so a resumed attempt goes on with the
/// next.
pub(crate) async fn revert(attempt: &Attempt<'_>, stage: Stage) -> Result<Value, ActionError> {
    const CODE: &str = "SNAPSHOT_REVERT_FAILED";
    if attempt.input.skip_snapshot {
        return Ok(json!({"skipped": "no snapshot to revert to (skip_snapshot): the disks keep any changes"}));
    }
    if let Some(mut skipped) = off_stage(attempt, stage) {
        if stage == Stage::OnOma && injected(attempt) {
            skipped["note"] = json!("the VirtIO drivers injected stay on the boot disk");
        }
        return Ok(skipped);
    }
    // As the compensation of virtio-injection: nothing to undo if injection was skipped.
    if attempt.step.undo {
        if let Some(out) = attempt.step.output_of(&attempt.step.step) {
            if out.get("injected") == Some(&Value::Bool(false)) {
                return Ok(json!({"skipped": "drivers were not injected"}));
            }
        }
    }
    let name = attempt.snapshot_name();
    let mut reverted: Vec<String> = attempt
        .recorded("reverted")
        .await
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    let mut missing = Vec::new();
    for (target, volume_ids) in attempt.snapshot_targets().await? {
        if reverted.contains(&target) {
            continue;
        }
        if !exists(attempt, &target, &name, CODE).await? {
            missing.push(target);
            continue;
        }
        match stage {
            Stage::OnOma => revert_target(attempt, &target, &volume_ids, &name).await?,
            Stage::OnNewVm => revert_vm(attempt, &target, &name).await?,
        }
        reverted.push(target);
        attempt.record("reverted", json!(reverted)).await?;
    }
    if reverted.is_empty() {
        return Ok(json!({"skipped": format!("snapshot {name} does not exist (never taken)")}));
    }
    let volume_ids: Vec<&str> = attempt.disks().iter().map(|d| d.volume_id.as_str()).collect();
    let mut out =
        json!({"reverted_to": name, "volume_id": volume_ids[0], "volume_ids": volume_ids, "targets": reverted});
    if !missing.is_empty() {
        out["not_taken"] = json!(missing);
    }
    Ok(out)
}

/// Reverts the new VM `vm_id` to its VM snapshot `name`, on the VM stopped (CloudStack reverts
/// a disk-only VM snapshot only then).
async fn revert_vm(attempt: &Attempt<'_>, vm_id: &str, name: &str) -> Result<(), ActionError> {
    const CODE: &str = "SNAPSHOT_REVERT_FAILED";
    let vm = attempt.cloud().get_vm(vm_id).await.map_err(|e| fail(CODE, e))?;
    super::vm::stop_found(attempt, &vm).await?;
    match attempt.deps.snapshots.revert(vm_id, name).await {
        Ok(()) => Ok(()),
        Err(e @ ProviderError::NotFound { .. }) => Err(ActionError::permanent(CODE, e.to_string())),
        Err(e) => Err(fail(CODE, e)),
    }
}

/// Undoes the VM snapshot step: reverts the new VM's disks to it (what the VM wrote before a
/// failed start is undone) and deletes it, so the disks can leave the VM.
pub(crate) async fn undo_vm_snapshot(attempt: &Attempt<'_>) -> Result<Value, ActionError> {
    let reverted = revert(attempt, Stage::OnNewVm).await?;
    let deleted = delete(attempt, Some(Stage::OnNewVm)).await?;
    Ok(json!({"reverted": reverted, "deleted": deleted}))
}

/// Reverts one target to `name`: its volumes come off running VMs first and go back after.
async fn revert_target(
    attempt: &Attempt<'_>,
    target: &str,
    volume_ids: &[String],
    name: &str,
) -> Result<(), ActionError> {
    const CODE: &str = "SNAPSHOT_REVERT_FAILED";
    for src in volume_ids {
        let vol = attempt.cloud().get_volume(src).await.map_err(|e| fail(CODE, e))?;
        let Some(on) = vol.vm_id.clone() else { continue };
        let vm = attempt.cloud().get_vm(&on).await.map_err(|e| fail(CODE, e))?;
        if vm.state != VmState::Stopped {
            let back = RestoreTo {
                vm_id: on,
                device_id: vol.device_id,
            };
            attempt
                .record(&disk_key("restore_to", &attempt.vm, src), json!(back))
                .await?;
            let cmd = AsyncCommand::DetachVolume { volume_id: src.clone() };
            let op = disk_key("detach_for_revert", &attempt.vm, src);
            attempt.settle(&op, cmd, CODE, src, |v| v.vm_id.is_none()).await?;
        }
    }
    match attempt.deps.snapshots.revert(target, name).await {
        Ok(()) => {}
        Err(e @ ProviderError::NotFound { .. }) => return Err(ActionError::permanent(CODE, e.to_string())),
        Err(e) => {
            // The world decides: a job an earlier attempt issued (its reply lost, still running
            // when this attempt detached) may have put a volume back on a running VM; the
            // next attempt detaches it again rather than giving up.
            for src in volume_ids {
                let now = attempt.cloud().get_volume(src).await.map_err(|e| fail(CODE, e))?;
                if now.vm_id.is_some() {
                    return Err(retryable(fail(CODE, e)));
                }
            }
            return Err(fail(CODE, e));
        }
    }
    for src in volume_ids {
        let back = attempt.recorded(&disk_key("restore_to", &attempt.vm, src)).await;
        if let Some(back) = back.and_then(|v| RestoreTo::deserialize(v).ok()) {
            let now = attempt.cloud().get_volume(src).await.map_err(|e| fail(CODE, e))?;
            if now.vm_id.is_none() && !back.vm_id.is_empty() {
                let op = disk_key("reattach_after_revert", &attempt.vm, src);
                super::volume::put_back(attempt, src, &back.vm_id, back.device_id, &op, CODE).await?;
            }
        }
    }
    Ok(())
}
