//! volume-attachment / volume-switch, and giving the volume back to the OMA.
//!
//! Safety invariant: the replicated volume is attached to exactly one VM, or the step's
//! progress holds an `intent` naming where it goes next, which the next attempt completes.

use serde_json::{json, Value};

use super::{fail, Cx};
use crate::providers::{AsyncCommand, VmState, VolumeFilter, VolumeType};
use crate::steps::ActionError;

/// Moves the replicated volume from the OMA to the new VM as its ROOT disk (deviceid 0),
/// after deleting the new VM's own ROOT volume.
pub(crate) async fn attach(cx: &Cx<'_>) -> Result<Value, ActionError> {
    const CODE: &str = "VOLUME_ATTACH_FAILED";
    let src = cx.vm.volume_id.clone();
    let target = cx
        .find_vm()
        .await?
        .ok_or_else(|| ActionError::permanent(CODE, format!("VM {} does not exist", cx.vm_name())))?;
    if target.state != VmState::Stopped {
        return Err(ActionError::retryable(CODE, format!("VM {} must be Stopped to swap its ROOT disk", target.id)));
    }
    // 1. The new VM's own ROOT disk goes (never the replicated volume).
    let filter = VolumeFilter { vm_id: Some(target.id.clone()), volume_type: Some(VolumeType::Root), ..Default::default() };
    for v in cx.cloud().list_volumes(filter).await.map_err(|e| fail(CODE, e))? {
        if v.id == src {
            continue;
        }
        cx.job("detach_own_root", AsyncCommand::DetachVolume { volume_id: v.id.clone() }, CODE).await?;
        match cx.cloud().delete_volume(&v.id).await {
            Ok(()) | Err(crate::providers::ProviderError::NotFound { .. }) => {}
            Err(e) => return Err(fail(CODE, e)),
        }
    }
    // 2. The replicated volume moves, with the intent recorded before it leaves the OMA.
    let vol = cx.cloud().get_volume(&src).await.map_err(|e| fail(CODE, e))?;
    match vol.vm_id.as_deref() {
        Some(vm) if vm == target.id => {
            return Ok(json!({"volume_id": src, "attached_to": target.id, "device_id": vol.device_id, "adopted": true}))
        }
        Some(vm) if vm == cx.vm.oma_vm_id => {
            cx.record("intent", json!({"attach_to": target.id})).await?;
            cx.job("detach_from_oma", AsyncCommand::DetachVolume { volume_id: src.clone() }, CODE).await?;
        }
        Some(other) => {
            return Err(ActionError::permanent(CODE, format!("volume {src} is attached to an unexpected VM {other}")));
        }
        None => cx.record("intent", json!({"attach_to": target.id})).await?,
    }
    let cmd = AsyncCommand::AttachVolume { volume_id: src.clone(), vm_id: target.id.clone(), device_id: Some(0) };
    cx.job("attach_as_root", cmd, CODE).await?;
    Ok(json!({"volume_id": src, "attached_to": target.id, "device_id": 0, "adopted": false}))
}

/// Detaches the replicated volume from this run's VM (stopping it first if needed), keeping
/// the intent to return it to the OMA. Nothing to do if it is not on that VM.
pub(crate) async fn detach(cx: &Cx<'_>) -> Result<Value, ActionError> {
    const CODE: &str = "VOLUME_DETACH_FAILED";
    let src = cx.vm.volume_id.clone();
    let vol = cx.cloud().get_volume(&src).await.map_err(|e| fail(CODE, e))?;
    let Some(on) = vol.vm_id.clone() else {
        return Ok(json!({"volume_id": src, "detached": true}));
    };
    if on == cx.vm.oma_vm_id {
        return Ok(json!({"volume_id": src, "attached_to": on, "note": "already back on the OMA"}));
    }
    let ours = cx.find_vm().await?;
    if ours.as_ref().map(|v| v.id.as_str()) != Some(on.as_str()) {
        return Err(ActionError::permanent(CODE, format!("volume {src} is attached to {on}, which this run did not create")));
    }
    if let Some(vm) = ours.filter(|v| v.state != VmState::Stopped) {
        cx.job("stop_before_detach", AsyncCommand::StopVm { id: vm.id.clone(), forced: false }, CODE).await?;
    }
    cx.record("intent", json!({"attach_to": cx.vm.oma_vm_id})).await?;
    cx.job("detach", AsyncCommand::DetachVolume { volume_id: src.clone() }, CODE).await?;
    Ok(json!({"volume_id": src, "detached_from": on}))
}

/// Gives the replicated volume back to the OMA: detaches it from this run's VM if needed, then
/// attaches it to the OMA. Used by rollback and by the teardown's reattach step.
pub(crate) async fn give_back(cx: &Cx<'_>) -> Result<Value, ActionError> {
    const CODE: &str = "VOLUME_ATTACH_FAILED";
    let src = cx.vm.volume_id.clone();
    let oma = cx.vm.oma_vm_id.clone();
    let vol = cx.cloud().get_volume(&src).await.map_err(|e| fail(CODE, e))?;
    if vol.vm_id.as_deref() == Some(oma.as_str()) {
        return Ok(json!({"volume_id": src, "attached_to": oma, "adopted": true}));
    }
    if vol.vm_id.is_some() {
        detach(cx).await?;
    }
    let cmd = AsyncCommand::AttachVolume { volume_id: src.clone(), vm_id: oma.clone(), device_id: None };
    cx.job("attach_to_oma", cmd, CODE).await?;
    Ok(json!({"volume_id": src, "attached_to": oma}))
}
