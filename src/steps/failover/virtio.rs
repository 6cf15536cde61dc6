//! virtio-injection: VirtIO drivers into a Windows guest's disk while it sits on the OMA.
//! A read-only check runs first, so a re-run after a crash does not inject twice.

use serde_json::{json, Value};

use super::{fail, Attempt};
use crate::engine::action::ActionError;

pub(crate) async fn inject(attempt: &Attempt<'_>) -> Result<Value, ActionError> {
    const CODE: &str = "VIRTIO_FAILED";
    if !attempt.vm.is_windows() {
        return Ok(json!({"injected": false, "reason": format!("guest OS {:?} is not Windows", attempt.vm.os_type)}));
    }
    let vol = attempt
        .cloud()
        .get_volume(&attempt.vm.boot_disk.volume_id)
        .await
        .map_err(|e| fail(CODE, e))?;
    if vol.vm_id.as_deref() != Some(attempt.vm.oma_vm_id.as_str()) {
        return Err(ActionError::permanent(
            CODE,
            format!(
                "volume {} must be attached to the OMA {} for injection (it is on {})",
                vol.id,
                attempt.vm.oma_vm_id,
                vol.vm_id.as_deref().unwrap_or("nothing")
            ),
        ));
    }
    let inj = &attempt.deps.injector;
    let device = inj
        .device_for(&attempt.vm.boot_disk.volume_id)
        .await
        .map_err(|e| fail(CODE, e))?;
    if inj
        .is_injected(&attempt.vm.boot_disk.volume_id, &device)
        .await
        .map_err(|e| fail(CODE, e))?
    {
        return Ok(json!({"injected": true, "already_present": true, "device": device}));
    }
    let report = inj
        .inject(&attempt.vm.boot_disk.volume_id, &device)
        .await
        .map_err(|e| fail(CODE, e))?;
    Ok(
        json!({"injected": true, "already_present": false, "device": device, "output": report.output, "duration_ms": report.duration_ms}),
    )
}
