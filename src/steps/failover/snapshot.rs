//! snapshot (create / delete) and revert.
//!
//! The snapshot's name is derived from the run and recorded (step progress, projected into
//! `failover_jobs.linstor_snapshot_name`) *before* the snapshot is requested, so emergency
//! recovery can always find it; `create` adopts a snapshot of that name.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{fail, retryable, Cx};
use crate::engine::action::ActionError;
use crate::providers::{AsyncCommand, ProviderError, VmState};

pub(crate) async fn create(cx: &Cx<'_>) -> Result<Value, ActionError> {
    let name = cx.snapshot_name();
    let target = cx.snapshot_target();
    let backend = cx.deps.snapshots.kind();
    cx.record("snapshot_name", json!(name)).await?;
    let info = cx
        .deps
        .snapshots
        .create(&target, &name)
        .await
        .map_err(|e| fail("SNAPSHOT_FAILED", e))?;
    Ok(json!({"snapshot_name": info.name, "snapshot_id": info.id, "target": info.target, "backend": backend}))
}

/// Deletes the run's snapshot; a snapshot that does not exist is already deleted.
pub(crate) async fn delete(cx: &Cx<'_>) -> Result<Value, ActionError> {
    if cx.input.skip_snapshot {
        return Ok(json!({"skipped": "no snapshot was taken (skip_snapshot)"}));
    }
    const CODE: &str = "SNAPSHOT_DELETE_FAILED";
    let name = cx.snapshot_name();
    let target = cx.snapshot_target();
    if let Err(e) = cx.deps.snapshots.delete(&target, &name).await {
        // The world decides: an earlier attempt's delete (its reply lost) may have finished
        // meanwhile, and then this one's "not found" is success.
        if cx
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
pub(crate) async fn revert(cx: &Cx<'_>) -> Result<Value, ActionError> {
    const CODE: &str = "SNAPSHOT_REVERT_FAILED";
    if cx.input.skip_snapshot {
        return Ok(json!({"skipped": "no snapshot to revert to (skip_snapshot): the disk keeps any changes"}));
    }
    // As the compensation of virtio-injection: nothing to undo if injection was skipped.
    if cx.step.undo {
        if let Some(out) = cx.step.output_of(&cx.step.step) {
            if out.get("injected") == Some(&Value::Bool(false)) {
                return Ok(json!({"skipped": "drivers were not injected"}));
            }
        }
    }
    let name = cx.snapshot_name();
    let target = cx.snapshot_target();
    if cx
        .deps
        .snapshots
        .find(&target, &name)
        .await
        .map_err(|e| fail(CODE, e))?
        .is_none()
    {
        return Ok(json!({"skipped": format!("snapshot {name} does not exist (never taken)")}));
    }
    let src = cx.vm.volume_id.clone();
    let vol = cx.cloud().get_volume(&src).await.map_err(|e| fail(CODE, e))?;
    if let Some(on) = vol.vm_id.clone() {
        let vm = cx.cloud().get_vm(&on).await.map_err(|e| fail(CODE, e))?;
        if vm.state != VmState::Stopped {
            let back = RestoreTo {
                vm_id: on,
                device_id: vol.device_id,
            };
            cx.record("restore_to", json!(back)).await?;
            let cmd = AsyncCommand::DetachVolume { volume_id: src.clone() };
            cx.settle("detach_for_revert", cmd, CODE, |v| v.vm_id.is_none()).await?;
        }
    }
    match cx.deps.snapshots.revert(&target, &name).await {
        Ok(()) => {}
        Err(e @ ProviderError::NotFound { .. }) => return Err(ActionError::permanent(CODE, e.to_string())),
        Err(e) => {
            // The world decides: a job an earlier attempt issued (its reply lost, still running
            // when this attempt detached) may have put the volume back on a running VM; the
            // next attempt detaches it again rather than giving up.
            let now = cx.cloud().get_volume(&src).await.map_err(|e| fail(CODE, e))?;
            return Err(match now.vm_id {
                Some(_) => retryable(fail(CODE, e)),
                None => fail(CODE, e),
            });
        }
    }
    let back = cx.recorded("restore_to").await;
    if let Some(back) = back.and_then(|v| RestoreTo::deserialize(v).ok()) {
        let now = cx.cloud().get_volume(&src).await.map_err(|e| fail(CODE, e))?;
        if now.vm_id.is_none() && !back.vm_id.is_empty() {
            super::volume::put_back(cx, &back.vm_id, back.device_id, "reattach_after_revert", CODE).await?;
        }
    }
    Ok(json!({"reverted_to": name, "volume_id": src}))
}
