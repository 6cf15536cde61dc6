//! volume-attachment / volume-switch, and giving the volume back to the OMA.
//!
//! Safety invariant: the replicated volume is attached to exactly one VM, or the step's
//! progress holds an `intent` naming where it goes next, which the next attempt completes.
//! After a volume job fails, the world is looked at again: an earlier attempt's job (whose
//! reply was lost) may have done the work already, or may still be moving the volume, in which
//! case the failure is retryable rather than final.

use serde_json::{json, Value};

use super::{fail, Attempt};
use crate::engine::action::ActionError;
use crate::providers::{AsyncCommand, ProviderError, VmState, Volume, VolumeFilter, VolumeType};

/// Deletes the new VM's own ROOT volumes recorded in `progress` (and any still attached to
/// `vm`): detach if needed, then delete. The replicated volume is never touched.
async fn delete_own_roots(
    attempt: &Attempt<'_>,
    recorded: &[String],
    vm: Option<&str>,
    code: &str,
) -> Result<(), ActionError> {
    let src = attempt.vm.boot_disk.volume_id.as_str();
    let mut ids: Vec<String> = recorded.iter().filter(|id| id.as_str() != src).cloned().collect();
    if let Some(vm) = vm {
        let filter = VolumeFilter {
            vm_id: Some(vm.to_string()),
            volume_type: Some(VolumeType::Root),
            ..Default::default()
        };
        for v in attempt.cloud().list_volumes(filter).await.map_err(|e| fail(code, e))? {
            if v.id != src && !ids.contains(&v.id) {
                ids.push(v.id);
            }
        }
        // Recorded before anything is detached, so a crash cannot lose track of them.
        if ids.len() > recorded.len() {
            attempt.record("own_root", json!(ids)).await?;
        }
    }
    for id in ids {
        let vol = match attempt.cloud().get_volume(&id).await {
            Ok(v) => v,
            Err(ProviderError::NotFound { .. }) => continue,
            Err(e) => return Err(fail(code, e)),
        };
        if vol.vm_id.is_some() {
            let detached = attempt
                .job(
                    &format!("detach_own_root:{id}"),
                    AsyncCommand::DetachVolume { volume_id: id.clone() },
                    code,
                )
                .await;
            // The world decides: an earlier attempt's detach (its reply lost, its job still
            // running when this attempt looked) may have won, and then this job's "not
            // attached to any VM" is success.
            if let Err(e) = detached {
                match attempt.cloud().get_volume(&id).await {
                    Ok(now) if now.vm_id.is_some() => return Err(super::retryable(e)),
                    Ok(_) | Err(ProviderError::NotFound { .. }) => {}
                    Err(e) => return Err(fail(code, e)),
                }
            }
        }
        match attempt.cloud().delete_volume(&id).await {
            Ok(()) | Err(ProviderError::NotFound { .. }) => {}
            Err(e) => return Err(fail(code, e)),
        }
    }
    Ok(())
}

fn recorded_roots(progress: Option<&Value>) -> Vec<String> {
    progress
        .and_then(|p| p.get("own_root"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// Moves the replicated volume from the OMA to the new VM as its ROOT disk (deviceid 0),
/// after deleting the new VM's own ROOT volume.
pub(crate) async fn attach(attempt: &Attempt<'_>) -> Result<Value, ActionError> {
    const CODE: &str = "VOLUME_ATTACH_FAILED";
    let src = attempt.vm.boot_disk.volume_id.clone();
    let target = attempt
        .find_vm()
        .await?
        .ok_or_else(|| ActionError::permanent(CODE, format!("VM {} does not exist", attempt.vm_name())))?;
    if target.state != VmState::Stopped {
        return Err(ActionError::retryable(
            CODE,
            format!("VM {} must be Stopped to swap its ROOT disk", target.id),
        ));
    }
    // 1. The new VM's own ROOT disk goes (never the replicated volume).
    let recorded = recorded_roots(
        attempt
            .recorded("own_root")
            .await
            .map(|v| json!({"own_root": v}))
            .as_ref(),
    );
    delete_own_roots(attempt, &recorded, Some(&target.id), CODE).await?;
    // 2. The replicated volume moves, with the intent recorded before it leaves the OMA.
    let vol = attempt.cloud().get_volume(&src).await.map_err(|e| fail(CODE, e))?;
    let on_target = |v: &Volume| v.vm_id.as_deref() == Some(target.id.as_str());
    match vol.vm_id.as_deref() {
        Some(vm) if vm == target.id => {
            return Ok(json!({"volume_id": src, "attached_to": target.id, "device_id": vol.device_id, "adopted": true}))
        }
        Some(vm) if vm == attempt.vm.oma_vm_id => {
            // The OMA slot is kept with the intent, so every way back can offer it again.
            attempt
                .record(
                    "intent",
                    json!({"attach_to": target.id, "oma_device_id": vol.device_id}),
                )
                .await?;
            let cmd = AsyncCommand::DetachVolume { volume_id: src.clone() };
            attempt
                .settle("detach_from_oma", cmd, CODE, |v| v.vm_id.is_none() || on_target(v))
                .await?;
        }
        Some(other) => {
            return Err(ActionError::permanent(
                CODE,
                format!("volume {src} is attached to an unexpected VM {other}"),
            ));
        }
        None => attempt.record("intent", json!({"attach_to": target.id})).await?,
    }
    let cmd = AsyncCommand::AttachVolume {
        volume_id: src.clone(),
        vm_id: target.id.clone(),
        device_id: Some(0),
    };
    attempt.settle("attach_as_root", cmd, CODE, on_target).await?;
    let oma_device_id = attempt
        .recorded("intent")
        .await
        .and_then(|i| i.get("oma_device_id").cloned())
        .unwrap_or(Value::Null);
    Ok(
        json!({"volume_id": src, "attached_to": target.id, "device_id": 0, "adopted": false, "oma_device_id": oma_device_id}),
    )
}

/// Detaches the replicated volume from this run's VM (stopping it first if needed), keeping
/// the intent to return it to the OMA. Nothing to do if it is not on that VM.
pub(crate) async fn detach(attempt: &Attempt<'_>) -> Result<Value, ActionError> {
    const CODE: &str = "VOLUME_DETACH_FAILED";
    let src = attempt.vm.boot_disk.volume_id.clone();
    let vol = attempt.cloud().get_volume(&src).await.map_err(|e| fail(CODE, e))?;
    let Some(on) = vol.vm_id.clone() else {
        return Ok(json!({"volume_id": src, "detached": true}));
    };
    if on == attempt.vm.oma_vm_id {
        return Ok(json!({"volume_id": src, "attached_to": on, "note": "already back on the OMA"}));
    }
    let ours = attempt.find_vm().await?;
    if ours.as_ref().map(|v| v.id.as_str()) != Some(on.as_str()) {
        return Err(ActionError::permanent(
            CODE,
            format!("volume {src} is attached to {on}, which this run did not create"),
        ));
    }
    if let Some(vm) = ours.filter(|v| v.state != VmState::Stopped) {
        attempt
            .job(
                "stop_before_detach",
                AsyncCommand::StopVm {
                    id: vm.id.clone(),
                    forced: false,
                },
                CODE,
            )
            .await?;
    }
    attempt
        .record("intent", json!({"attach_to": attempt.vm.oma_vm_id}))
        .await?;
    let oma = attempt.vm.oma_vm_id.clone();
    let cmd = AsyncCommand::DetachVolume { volume_id: src.clone() };
    attempt
        .settle("detach", cmd, CODE, |v| {
            v.vm_id.is_none() || v.vm_id.as_deref() == Some(oma.as_str())
        })
        .await?;
    Ok(json!({"volume_id": src, "detached_from": on}))
}

/// Gives the replicated volume back to the OMA: detaches it from this run's VM if needed, then
/// attaches it to the OMA. As the compensation of volume-attachment it also finishes deleting
/// the new VM's own ROOT disk if the forward step had started to. Used by rollback and by the
/// teardown's reattach step.
pub(crate) async fn give_back(attempt: &Attempt<'_>) -> Result<Value, ActionError> {
    const CODE: &str = "VOLUME_ATTACH_FAILED";
    let src = attempt.vm.boot_disk.volume_id.clone();
    let oma = attempt.vm.oma_vm_id.clone();
    if attempt.step.undo {
        let roots = recorded_roots(attempt.step.forward_progress.as_ref());
        if !roots.is_empty() {
            delete_own_roots(attempt, &roots, None, CODE).await?;
        }
    }
    let vol = attempt.cloud().get_volume(&src).await.map_err(|e| fail(CODE, e))?;
    if vol.vm_id.as_deref() == Some(oma.as_str()) {
        return Ok(json!({"volume_id": src, "attached_to": oma, "adopted": true}));
    }
    if vol.vm_id.is_some() {
        detach(attempt).await?;
        let now = attempt.cloud().get_volume(&src).await.map_err(|e| fail(CODE, e))?;
        if now.vm_id.as_deref() == Some(oma.as_str()) {
            return Ok(json!({"volume_id": src, "attached_to": oma, "adopted": true}));
        }
    }
    let slot = oma_slot(attempt).await;
    put_back(attempt, &oma, slot, "attach_to_oma", CODE).await?;
    Ok(json!({"volume_id": src, "attached_to": oma}))
}

/// The slot the volume had on the OMA before this run moved it, if known: from the revert's
/// own record, the volume move's intent (its compensation), or its output (the teardown).
async fn oma_slot(attempt: &Attempt<'_>) -> Option<u32> {
    let slot = |v: &Value| v.get("oma_device_id").and_then(Value::as_u64);
    let from_outputs = attempt.step.outputs.values().find_map(slot);
    let from_forward = attempt
        .step
        .forward_progress
        .as_ref()
        .and_then(|p| p.get("intent"))
        .and_then(slot);
    from_forward.or(from_outputs).and_then(|d| u32::try_from(d).ok())
}

/// The one way the replicated volume goes back onto a VM it came from (the OMA: teardown,
/// rollback, revert on a running OMA), so no two paths race for a slot: in `preferred` when
/// that slot is free, else in the slot CloudStack picks (the lowest free one). A slot taken
/// between the look and the attach (a concurrent job freed and took it) fails that job; the
/// volume is then still detached, and it is attached once more in CloudStack's slot instead of
/// failing the step. The disk is found by its volume id, not its slot.
pub(crate) async fn put_back(
    attempt: &Attempt<'_>,
    vm_id: &str,
    preferred: Option<u32>,
    op: &str,
    code: &str,
) -> Result<(), ActionError> {
    let src = attempt.vm.boot_disk.volume_id.clone();
    let back_on = |v: &Volume| v.vm_id.as_deref() == Some(vm_id);
    let used: Vec<u32> = attempt
        .cloud()
        .list_volumes(VolumeFilter::vm(vm_id))
        .await
        .map_err(|e| fail(code, e))?
        .into_iter()
        .filter(|v| v.id != src)
        .filter_map(|v| v.device_id)
        .collect();
    let slot = preferred.filter(|d| *d != 0 && !used.contains(d));
    let attach = |device_id| AsyncCommand::AttachVolume {
        volume_id: src.clone(),
        vm_id: vm_id.to_string(),
        device_id,
    };
    if slot.is_some() {
        match attempt.settle(op, attach(slot), code, back_on).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                let now = attempt.cloud().get_volume(&src).await.map_err(|e| fail(code, e))?;
                if now.vm_id.is_some() {
                    return Err(e);
                }
                tracing::warn!(op, volume = %src, ?slot, "slot taken meanwhile; attaching in CloudStack's slot");
            }
        }
    }
    attempt
        .settle(&format!("{op}:any_slot"), attach(None), code, back_on)
        .await
}
