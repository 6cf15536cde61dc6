//! `tern recover <job>`: the exact manual recovery for a failover run, from what its journal and
//! context recorded (snapshot name and backend, volume, VM ids), like the seeds' emergency
//! procedure. Pure: it only formats what the run and the inventory say.

use serde_json::Value;

use crate::domain::inventory::VmRecord;
use crate::engine::machine::RunState;
use crate::providers::linstor::resource_name_for_volume;
use crate::store::RunRow;

fn find_output<'a>(context: &'a Value, key: &str) -> Option<&'a str> {
    ["outputs", "progress", "undo_progress"].iter().find_map(|table| {
        context
            .get(*table)
            .and_then(Value::as_object)
            .and_then(|o| o.values().find_map(|v| v.get(key).and_then(Value::as_str)))
    })
}

/// The recovery text for `run` (`vm` is its inventory record, if still known).
pub fn plan(run: &RunRow, vm: Option<&VmRecord>, snapshot_name_projection: Option<&str>) -> String {
    let mut out = Vec::new();
    let status = run.status.as_str();
    out.push(format!(
        "run {} ({}) is {} ({})",
        run.id, run.definition, status, run.display_status
    ));
    match &run.state {
        RunState::NeedsOperator { step, error, undone } => {
            out.push(format!("stopped at step {step}: {error}"));
            out.push(format!("not undone: {}", if undone.is_empty() { "-".to_string() } else { undone.join(", ") }));
        }
        RunState::Completed | RunState::Failed { .. } | RunState::Cancelled { .. } => {
            out.push("the run finished cleanly; nothing is left to recover.".into());
            return out.join("\n");
        }
        other => out.push(format!(
            "the run is still in progress ({}); Tern will resume or roll it back. Recover by hand only if no worker can run it.",
            serde_json::to_string(other).unwrap_or_default()
        )),
    }
    let Some(vm) = vm else {
        out.push(format!(
            "the VM {} is no longer in the inventory: look up its volume and OMA before acting.",
            run.input.get("vm_id").and_then(Value::as_str).unwrap_or("?")
        ));
        return out.join("\n");
    };
    let ctx = &run.context;
    let snapshot = find_output(ctx, "snapshot_name").or(snapshot_name_projection);
    let snapshot_id = find_output(ctx, "snapshot_id");
    let backend = find_output(ctx, "backend").unwrap_or("cloudstack-volume");
    let test_vm = find_output(ctx, "destination_vm_id");
    let skip_snapshot = run.input.get("skip_snapshot") == Some(&Value::Bool(true));
    out.push(String::new());
    out.push("what Tern recorded:".into());
    out.push(format!("  source VM      {} ({})", vm.name, vm.vm_id));
    out.push(format!("  volume         {}", vm.volume_id));
    out.push(format!("  OMA VM         {}", vm.oma_vm_id));
    out.push(format!(
        "  new VM         {}",
        test_vm.unwrap_or("(none recorded; look for a VM named tern-*-<run tag>-*)")
    ));
    match (snapshot, skip_snapshot) {
        (_, true) => out.push("  snapshot       none (skip_snapshot): the disk cannot be reverted".into()),
        (Some(name), false) => out.push(format!(
            "  snapshot       {name} ({backend}{})",
            snapshot_id.map(|i| format!(", id {i}")).unwrap_or_default()
        )),
        (None, false) => out.push("  snapshot       none recorded (the run failed before taking it)".into()),
    }
    out.push(String::new());
    out.push("to return to the starting point (CloudStack calls as cmk commands; skip a step whose effect is already there):".into());
    let mut n = 0;
    let mut step = |text: String| {
        n += 1;
        out.push(format!("  {n}. {text}"));
    };
    if let Some(t) = test_vm {
        step(format!("stop the new VM:        cmk stop virtualmachine id={t}"));
    }
    step(format!("detach the volume:      cmk detach volume id={}", vm.volume_id));
    if let (Some(name), false) = (snapshot, skip_snapshot) {
        match backend {
            "linstor" => step(format!(
                "revert the disk:        linstor snapshot rollback {} {name}",
                resource_name_for_volume(&vm.volume_id)
            )),
            "cloudstack-vm" => step(format!(
                "revert the disk:        cmk revert tovmsnapshot vmsnapshotid={}   (VM snapshot {name})",
                snapshot_id.unwrap_or("<id of VM snapshot named it>")
            )),
            _ => step(format!(
                "revert the disk:        cmk revert snapshot id={}   (snapshot {name})",
                snapshot_id.unwrap_or("<id of the snapshot named it>")
            )),
        }
    }
    step(format!(
        "reattach to the OMA:    cmk attach volume id={} virtualmachineid={}",
        vm.volume_id, vm.oma_vm_id
    ));
    if let Some(t) = test_vm {
        step(format!(
            "destroy the new VM:     cmk destroy virtualmachine id={t} expunge=true"
        ));
    }
    if let (Some(name), false) = (snapshot, skip_snapshot) {
        match backend {
            "linstor" => step(format!(
                "delete the snapshot:    linstor snapshot delete {} {name}",
                resource_name_for_volume(&vm.volume_id)
            )),
            "cloudstack-vm" => step(format!(
                "delete the snapshot:    cmk delete vmsnapshot vmsnapshotid={}",
                snapshot_id.unwrap_or("<id>")
            )),
            _ => step(format!(
                "delete the snapshot:    cmk delete snapshot id={}",
                snapshot_id.unwrap_or("<id>")
            )),
        }
    }
    out.push(String::new());
    out.push(format!(
        "check: cmk list volumes id={}  -> virtualmachineid must be {} (the OMA)",
        vm.volume_id, vm.oma_vm_id
    ));
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{RunId, StepError, Timestamp};
    use serde_json::json;

    fn run(state: RunState, context: Value) -> RunRow {
        RunRow {
            id: RunId::new(),
            definition: "test-failover".into(),
            definition_hash: "h".into(),
            request_id: None,
            correlation_id: "c".into(),
            status: state.status(),
            state,
            display_status: "needs_operator".into(),
            current_step: None,
            input: json!({"vm_id": "vm-1"}),
            context,
            last_seq: 1,
            fencing_token: 1,
            lease_owner: None,
            lease_expires_at: None,
            wake_at: None,
            signals_pending: 0,
            cancel_reason: None,
            cancel_pending: false,
            created_at: Timestamp(0),
            updated_at: Timestamp(0),
            started_at: None,
            completed_at: None,
        }
    }

    fn vm() -> VmRecord {
        VmRecord {
            vm_id: "vm-1".into(),
            name: "pgtest1".into(),
            cpu_count: 2,
            memory_mb: 2048,
            os_type: "windows".into(),
            nics: vec![],
            volume_id: "vol-1".into(),
            oma_vm_id: "oma-1".into(),
            last_sync_change_id: None,
        }
    }

    #[test]
    fn a_stuck_run_gets_every_call_with_the_recorded_ids() {
        let state = RunState::NeedsOperator {
            step: "delete-test-vm".into(),
            error: StepError::permanent("VM_DESTROY_FAILED", "boom"),
            undone: vec!["delete-test-vm".into(), "delete-snapshot".into()],
        };
        let ctx = json!({"outputs": {
            "snapshot": {"snapshot_name": "tern-abc", "snapshot_id": "snap-9", "backend": "linstor"},
            "test-vm-creation": {"destination_vm_id": "tvm-1"}}});
        let text = plan(&run(state, ctx), Some(&vm()), None);
        for needle in [
            "not undone: delete-test-vm, delete-snapshot",
            "cmk stop virtualmachine id=tvm-1",
            "cmk detach volume id=vol-1",
            "linstor snapshot rollback cs-vol-1 tern-abc",
            "cmk attach volume id=vol-1 virtualmachineid=oma-1",
            "cmk destroy virtualmachine id=tvm-1 expunge=true",
            "linstor snapshot delete cs-vol-1 tern-abc",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
    }

    #[test]
    fn the_projection_supplies_a_snapshot_name_recorded_before_a_crash() {
        let state = RunState::NeedsOperator {
            step: "snapshot".into(),
            error: StepError::permanent("E", "x"),
            undone: vec!["snapshot".into()],
        };
        let text = plan(&run(state, json!({})), Some(&vm()), Some("tern-early"));
        assert!(text.contains("snapshot       tern-early (cloudstack-volume)"), "{text}");
        assert!(text.contains("cmk revert snapshot id=<id of the snapshot named it>   (snapshot tern-early)"));
    }

    #[test]
    fn a_clean_run_needs_nothing() {
        let text = plan(&run(RunState::Completed, json!({})), Some(&vm()), None);
        assert!(text.contains("nothing is left to recover"));
    }
}
