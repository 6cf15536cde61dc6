//! volume-attachment / volume-switch, and giving the disks back to the OMA.
//!
//! Safety invariant: every replicated volume is attached to exactly one VM, or the step's
//! progress holds its intent (`intent` for the boot disk, `intent:<volume id>` for a data
//! disk) naming where it goes next, which the next attempt completes.
//! After a volume job fails, the world is looked at again: an earlier attempt's job (whose
//! reply was lost) may have done the work already, or may still be moving the volume, in which
//! case the failure is retryable rather than final.

use serde_json::{json, Value};

use super::{disk_key, fail, Attempt};
use crate::engine::action::ActionError;
use crate::providers::{AsyncCommand, ProviderError, Vm, VmState, Volume, VolumeFilter, VolumeType};

/// Deletes the new VM's own ROOT volumes recorded in `progress` (and any still attached to
/// `vm`): detach if needed, then delete. The replicated volume is never touched.
async fn delete_own_roots(
    attempt: &Attempt<'_>,
    recorded: &[String],
    vm: Option<&str>,
    code: &str,
) -> Result<(), ActionError> {
    let mut ids: Vec<String> = recorded
        .iter()
        .filter(|id| !attempt.is_replicated(id))
        .cloned()
        .collect();
    if let Some(vm) = vm {
        let filter = VolumeFilter {
            vm_id: Some(vm.to_string()),
            volume_type: Some(VolumeType::Root),
            ..Default::default()
        };
        for v in attempt.cloud().list_volumes(filter).await.map_err(|e| fail(code, e))? {
            if !attempt.is_replicated(&v.id) && !ids.contains(&v.id) {
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

/// Moves every replicated disk from the OMA to the new VM: the boot disk as its ROOT disk
/// (deviceid 0), after deleting the new VM's own ROOT volume, then the data disks in the
/// source's order. Each move records its intent before the disk leaves the OMA, so a resumed
/// attempt goes on with the disk it was moving.
pub(crate) async fn attach(attempt: &Attempt<'_>) -> Result<Value, ActionError> {
    const CODE: &str = "VOLUME_ATTACH_FAILED";
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
    // 1. The new VM's own ROOT disk goes (never a replicated volume).
    let recorded = recorded_roots(
        attempt
            .recorded("own_root")
            .await
            .map(|v| json!({"own_root": v}))
            .as_ref(),
    );
    delete_own_roots(attempt, &recorded, Some(&target.id), CODE).await?;
    // 2. The replicated disks move, the boot disk first.
    let mut disks = Vec::new();
    for (i, d) in attempt.disks().into_iter().enumerate() {
        let device_id = (i == 0).then_some(0);
        disks.push(move_to(attempt, &target.id, &d.volume_id, device_id, CODE).await?);
    }
    let mut out = disks[0].clone();
    out["disks"] = json!(disks);
    Ok(out)
}

/// Moves one replicated disk from the OMA to `target` (in slot `device_id`, or the one
/// CloudStack picks), with the intent recorded before it leaves the OMA.
async fn move_to(
    attempt: &Attempt<'_>,
    target: &str,
    src: &str,
    device_id: Option<u32>,
    code: &str,
) -> Result<Value, ActionError> {
    let key = |base: &str| disk_key(base, &attempt.vm, src);
    let vol = attempt.cloud().get_volume(src).await.map_err(|e| fail(code, e))?;
    let on_target = |v: &Volume| v.vm_id.as_deref() == Some(target);
    match vol.vm_id.as_deref() {
        Some(vm) if vm == target => {
            let oma_device_id = attempt
                .recorded(&key("intent"))
                .await
                .and_then(|i| i.get("oma_device_id").cloned())
                .unwrap_or(Value::Null);
            return Ok(
                json!({"volume_id": src, "attached_to": target, "device_id": vol.device_id, "adopted": true, "oma_device_id": oma_device_id}),
            );
        }
        Some(vm) if vm == attempt.vm.oma_vm_id => {
            // The OMA slot is kept with the intent, so every way back can offer it again.
            attempt
                .record(
                    &key("intent"),
                    json!({"attach_to": target, "oma_device_id": vol.device_id}),
                )
                .await?;
            let cmd = AsyncCommand::DetachVolume {
                volume_id: src.to_string(),
            };
            attempt
                .settle(&key("detach_from_oma"), cmd, code, src, |v| {
                    v.vm_id.is_none() || on_target(v)
                })
                .await?;
        }
        Some(other) => {
            return Err(ActionError::permanent(
                code,
                format!("volume {src} is attached to an unexpected VM {other}"),
            ));
        }
        None => {
            // Detached by an earlier attempt: its intent (with the OMA slot) stands.
            if attempt.recorded(&key("intent")).await.is_none() {
                attempt.record(&key("intent"), json!({"attach_to": target})).await?;
            }
        }
    }
    let cmd = AsyncCommand::AttachVolume {
        volume_id: src.to_string(),
        vm_id: target.to_string(),
        device_id,
    };
    let op = if device_id == Some(0) {
        "attach_as_root".to_string()
    } else {
        format!("attach_data:{src}")
    };
    let now = attempt.settle(&op, cmd, code, src, on_target).await?;
    let oma_device_id = attempt
        .recorded(&key("intent"))
        .await
        .and_then(|i| i.get("oma_device_id").cloned())
        .unwrap_or(Value::Null);
    Ok(
        json!({"volume_id": src, "attached_to": target, "device_id": now.device_id, "adopted": false, "oma_device_id": oma_device_id}),
    )
}

/// Detaches every replicated disk from this run's VM (stopping it first if needed), keeping
/// the intent to return each to the OMA. Nothing to do for a disk that is not on that VM.
pub(crate) async fn detach(attempt: &Attempt<'_>) -> Result<Value, ActionError> {
    let ours = attempt.find_vm().await?;
    let mut stopped = false;
    let mut disks = Vec::new();
    for d in attempt.disks() {
        disks.push(detach_disk(attempt, ours.as_ref(), &mut stopped, &d.volume_id).await?);
    }
    let mut out = disks[0].clone();
    out["disks"] = json!(disks);
    Ok(out)
}

/// Detaches one replicated disk from this run's VM, stopping the VM first unless `stopped`.
async fn detach_disk(
    attempt: &Attempt<'_>,
    ours: Option<&Vm>,
    stopped: &mut bool,
    src: &str,
) -> Result<Value, ActionError> {
    const CODE: &str = "VOLUME_DETACH_FAILED";
    let vol = attempt.cloud().get_volume(src).await.map_err(|e| fail(CODE, e))?;
    let Some(on) = vol.vm_id.clone() else {
        return Ok(json!({"volume_id": src, "detached": true}));
    };
    if on == attempt.vm.oma_vm_id {
        return Ok(json!({"volume_id": src, "attached_to": on, "note": "already back on the OMA"}));
    }
    if ours.map(|v| v.id.as_str()) != Some(on.as_str()) {
        return Err(ActionError::permanent(
            CODE,
            format!("volume {src} is attached to {on}, which this run did not create"),
        ));
    }
    if let Some(vm) = ours.filter(|v| v.state != VmState::Stopped && !*stopped) {
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
    *stopped = true;
    attempt
        .record(
            &disk_key("intent", &attempt.vm, src),
            json!({"attach_to": attempt.vm.oma_vm_id}),
        )
        .await?;
    let oma = attempt.vm.oma_vm_id.clone();
    let cmd = AsyncCommand::DetachVolume {
        volume_id: src.to_string(),
    };
    attempt
        .settle(&disk_key("detach", &attempt.vm, src), cmd, CODE, src, |v| {
            v.vm_id.is_none() || v.vm_id.as_deref() == Some(oma.as_str())
        })
        .await?;
    Ok(json!({"volume_id": src, "detached_from": on}))
}

/// Gives every replicated disk back to the OMA: detaches it from this run's VM if needed,
/// then attaches it to the OMA. As the compensation of volume-attachment it also finishes
/// deleting the new VM's own ROOT disk if the forward step had started to. Used by rollback
/// and by the teardown's reattach step.
pub(crate) async fn give_back(attempt: &Attempt<'_>) -> Result<Value, ActionError> {
    const CODE: &str = "VOLUME_ATTACH_FAILED";
    let oma = attempt.vm.oma_vm_id.clone();
    if attempt.step.undo {
        let roots = recorded_roots(attempt.step.forward_progress.as_ref());
        if !roots.is_empty() {
            delete_own_roots(attempt, &roots, None, CODE).await?;
        }
    }
    let mut ours: Option<Option<Vm>> = None;
    let mut stopped = false;
    let mut disks = Vec::new();
    for d in attempt.disks() {
        let src = d.volume_id.as_str();
        let vol = attempt.cloud().get_volume(src).await.map_err(|e| fail(CODE, e))?;
        if vol.vm_id.as_deref() == Some(oma.as_str()) {
            disks.push(json!({"volume_id": src, "attached_to": oma, "adopted": true}));
            continue;
        }
        if vol.vm_id.is_some() {
            if ours.is_none() {
                ours = Some(attempt.find_vm().await?);
            }
            detach_disk(attempt, ours.as_ref().and_then(Option::as_ref), &mut stopped, src).await?;
            let now = attempt.cloud().get_volume(src).await.map_err(|e| fail(CODE, e))?;
            if now.vm_id.as_deref() == Some(oma.as_str()) {
                disks.push(json!({"volume_id": src, "attached_to": oma, "adopted": true}));
                continue;
            }
        }
        let slot = oma_slot(attempt, src);
        let op = disk_key("attach_to_oma", &attempt.vm, src);
        put_back(attempt, src, &oma, slot, &op, CODE).await?;
        disks.push(json!({"volume_id": src, "attached_to": oma}));
    }
    let mut out = disks[0].clone();
    out["disks"] = json!(disks);
    Ok(out)
}

/// The slot `volume_id` had on the OMA before this run moved it, if known: from the volume
/// move's intent (its compensation) or its output (the teardown).
fn oma_slot(attempt: &Attempt<'_>, volume_id: &str) -> Option<u32> {
    let slot = |v: &Value| v.get("oma_device_id").and_then(Value::as_u64);
    let of_disk = |out: &Value| {
        out.get("disks")
            .and_then(Value::as_array)
            .and_then(|disks| disks.iter().find(|d| d["volume_id"] == volume_id))
            .and_then(slot)
    };
    let boot = attempt.vm.boot_disk.volume_id == volume_id;
    let from_outputs = attempt
        .step
        .outputs
        .values()
        .find_map(|out| of_disk(out).or_else(|| slot(out).filter(|_| boot && out["volume_id"] == volume_id)));
    let from_forward = attempt
        .step
        .forward_progress
        .as_ref()
        .and_then(|p| p.get(disk_key("intent", &attempt.vm, volume_id)))
        .and_then(slot);
    from_forward.or(from_outputs).and_then(|d| u32::try_from(d).ok())
}

/// The one way a replicated volume goes back onto a VM it came from (the OMA: teardown,
/// rollback, revert on a running OMA), so no two paths race for a slot: in `preferred` when
/// that slot is free, else in the slot CloudStack picks (the lowest free one). A slot taken
/// between the look and the attach (a concurrent job freed and took it) fails that job; the
/// volume is then still detached, and it is attached once more in CloudStack's slot instead of
/// failing the step. The disk is found by its volume id, not its slot.
pub(crate) async fn put_back(
    attempt: &Attempt<'_>,
    src: &str,
    vm_id: &str,
    preferred: Option<u32>,
    op: &str,
    code: &str,
) -> Result<(), ActionError> {
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
        volume_id: src.to_string(),
        vm_id: vm_id.to_string(),
        device_id,
    };
    if slot.is_some() {
        match attempt.settle(op, attach(slot), code, src, back_on).await {
            Ok(_) => return Ok(()),
            Err(e) => {
                let now = attempt.cloud().get_volume(src).await.map_err(|e| fail(code, e))?;
                if now.vm_id.is_some() {
                    return Err(e);
                }
                tracing::warn!(op, volume = %src, ?slot, "slot taken meanwhile; attaching in CloudStack's slot");
            }
        }
    }
    attempt
        .settle(&format!("{op}:any_slot"), attach(None), code, src, back_on)
        .await
        .map(drop)
}
