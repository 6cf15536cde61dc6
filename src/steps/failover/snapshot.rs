//! snapshot (create / delete) and revert.
//!
//! The snapshot's name is derived from the run and recorded (step progress, projected into
//! `failover_jobs.linstor_snapshot_name`) *before* the snapshot is requested, so emergency
//! recovery can always find it; `create` adopts a snapshot of that name.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{fail, retryable, Attempt};
use crate::engine::action::ActionError;
use crate::providers::{AsyncCommand, ProviderError, VmState};

pub(crate) async fn create(attempt: &Attempt<'_>) -> Result<Value, ActionError> {
    let name = attempt.snapshot_name();
    let target = attempt.snapshot_target();
    let backend = attempt.deps.snapshots.kind();
    attempt.record("snapshot_name", json!(name)).await?;
    let info = attempt
        .deps
        .snapshots
        .create(&target, &name)
        .await
        .map_err(|e| fail("SNAPSHOT_FAILED", e))?;
    Ok(json!({"snapshot_name": info.name, "snapshot_id": info.id, "target": info.target, "backend": backend}))
}

/// Deletes the run's snapshot; a snapshot that does not exist is already deleted.
pub(crate) async fn delete(attempt: &Attempt<'_>) -> Result<Value, ActionError> {
    if attempt.input.skip_snapshot {
        return Ok(json!({"skipped": "no snapshot was taken (skip_snapshot)"}));
    }
    const CODE: &str = "SNAPSHOT_DELETE_FAILED";
    let name = attempt.snapshot_name();
    let target = attempt.snapshot_target();
    if let Err(e) = attempt.deps.snapshots.delete(&target, &name).await {
        // The world decides: an earlier attempt's delete (its reply lost) may have finished
        // meanwhile, and then this one's "not found" is success.
        if attempt
            .deps
            .snapshots
            .find(&target, &name)
            .await
            .map_err(|e| fail(CODE, e))?
            .is_some()
        {
            return Err(retryable(fail(CODE, e)));
        }
    }
    Ok(json!({"deleted": name}))
}

/// Where a revert must put the volume back (recorded before it detaches it from a running VM).
#[derive(Serialize, Deserialize)]
struct RestoreTo {
    vm_id: String,
    device_id: Option<u32>,
}

/// Reverts the replicated volume to the run's snapshot, undoing driver injection and test
/// writes. A revert needs the volume off any running VM: if it is on one (the OMA, during a
/// rollback), it is detached first, with the intent to put it back recorded, and reattached after.
pub(crate) async fn revert(attempt: &Attempt<'_>) -> Result<Value, ActionError> {
    const CODE: &str = "SNAPSHOT_REVERT_FAILED";
    if attempt.input.skip_snapshot {
        return Ok(json!({"skipped": "no snapshot to revert to (skip_snapshot): the disk keeps any changes"}));
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
    let target = attempt.snapshot_target();
    if attempt
        .deps
        .snapshots
        .find(&target, &name)
        .await
        .map_err(|e| fail(CODE, e))?
        .is_none()
    {
        return Ok(json!({"skipped": format!("snapshot {name} does not exist (never taken)")}));
    }
    let src = attempt.vm.boot_disk.volume_id.clone();
    let vol = attempt.cloud().get_volume(&src).await.map_err(|e| fail(CODE, e))?;
    if let Some(on) = vol.vm_id.clone() {
        let vm = attempt.cloud().get_vm(&on).await.map_err(|e| fail(CODE, e))?;
        if vm.state != VmState::Stopped {
            let back = RestoreTo {
                vm_id: on,
                device_id: vol.device_id,
            };
            attempt.record("restore_to", json!(back)).await?;
            let cmd = AsyncCommand::DetachVolume { volume_id: src.clone() };
            attempt
                .settle("detach_for_revert", cmd, CODE, |v| v.vm_id.is_none())
                .await?;
        }
    }
    match attempt.deps.snapshots.revert(&target, &name).await {
        Ok(()) => {}
        Err(e @ ProviderError::NotFound { .. }) => return Err(ActionError::permanent(CODE, e.to_string())),
        Err(e) => {
            // The world decides: a job an earlier attempt issued (its reply lost, still running
            // when this attempt detached) may have put the volume back on a running VM; the
            // next attempt detaches it again rather than giving up.
            let now = attempt.cloud().get_volume(&src).await.map_err(|e| fail(CODE, e))?;
            return Err(match now.vm_id {
                Some(_) => retryable(fail(CODE, e)),
                None => fail(CODE, e),
            });
        }
    }
    let back = attempt.recorded("restore_to").await;
    if let Some(back) = back.and_then(|v| RestoreTo::deserialize(v).ok()) {
        let now = attempt.cloud().get_volume(&src).await.map_err(|e| fail(CODE, e))?;
        if now.vm_id.is_none() && !back.vm_id.is_empty() {
            super::volume::put_back(attempt, &back.vm_id, back.device_id, "reattach_after_revert", CODE).await?;
        }
    }
    Ok(json!({"reverted_to": name, "volume_id": src}))
}
