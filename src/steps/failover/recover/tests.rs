//! The recovery text, from recorded runs and looked-up clouds.

use super::*;
use crate::domain::{RunId, StepError, Timestamp};
use serde_json::json;

fn run(state: RunState, context: Value) -> RunRow {
    let context = RunContext::from_value(context).unwrap();
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
        cancel_by: None,
        cancel_pending: false,
        created_at: Timestamp(0),
        updated_at: Timestamp(0),
        started_at: None,
        completed_at: None,
        trace_parent: None,
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
        boot_disk: crate::domain::inventory::Disk::of("vol-1"),
        data_disks: vec![],
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
    let text = plan(&run(state, ctx), Some(&vm()), None, None);
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
    let text = plan(&run(state, json!({})), Some(&vm()), Some("tern-early"), None);
    assert!(text.contains("snapshot       tern-early (cloudstack-volume)"), "{text}");
    assert!(
        text.contains("cmk revert snapshot id=<id of the snapshot named it>   (snapshot tern-early of volume vol-1)")
    );
}

#[test]
fn a_clean_run_needs_nothing() {
    let text = plan(&run(RunState::Completed, json!({})), Some(&vm()), None, None);
    assert!(text.contains("nothing is left to recover"));
}

fn stuck_in_revert() -> RunRow {
    let state = RunState::NeedsOperator {
        step: "revert-snapshot".into(),
        error: StepError::permanent("SNAPSHOT_REVERT_FAILED", "job failed"),
        undone: vec![
            "revert-snapshot".into(),
            "reattach-volume".into(),
            "delete-test-vm".into(),
            "delete-snapshot".into(),
        ],
    };
    let ctx = json!({"outputs": {
        "snapshot": {"snapshot_name": "tern-abc", "snapshot_id": "snap-9", "backend": "cloudstack-volume"},
        "test-vm-creation": {"destination_vm_id": "tvm-1"}}});
    run(state, ctx)
}

#[test]
fn with_the_cloud_looked_at_only_what_is_left_is_listed() {
    let found = Found {
        disks_on: vec![("vol-1".into(), None)],
        vms: vec![("tvm-1".into(), false)],
        own_roots: vec![],
        snapshot: Some(true),
    };
    let text = plan(&stuck_in_revert(), Some(&vm()), None, Some(&found));
    assert_steps(
        &text,
        &[
            "cmk revert snapshot id=snap-9",
            "cmk attach volume id=vol-1 virtualmachineid=oma-1",
            "cmk destroy virtualmachine id=tvm-1 expunge=true",
            "cmk delete snapshot id=snap-9",
        ],
    );
    assert!(!text.contains("cmk detach"), "the volume is already detached:\n{text}");
    assert!(!text.contains("cmk stop"), "the VM is not running:\n{text}");
}

#[test]
fn a_cloud_at_the_starting_point_needs_nothing() {
    let found = Found {
        disks_on: vec![("vol-1".into(), Some("oma-1".into()))],
        ..Found::default()
    };
    let mut row = stuck_in_revert();
    row.state = RunState::NeedsOperator {
        step: "delete-snapshot".into(),
        error: StepError::permanent("E", "x"),
        undone: vec!["delete-snapshot".into()],
    };
    let found = Found {
        snapshot: Some(false),
        ..found
    };
    let text = plan(&row, Some(&vm()), None, Some(&found));
    assert!(text.contains("nothing is left to do"), "{text}");
}

#[test]
fn every_disk_is_named_with_where_it_is_and_where_it_goes() {
    let mut vm = vm();
    vm.data_disks = vec![
        crate::domain::inventory::Disk::of("vol-2"),
        crate::domain::inventory::Disk::of("vol-3"),
    ];
    let ctx = json!({"outputs": {
        "snapshot": {"snapshot_name": "tern-abc", "snapshot_id": "s-1", "backend": "cloudstack-volume",
            "snapshots": [
                {"target": "vol-1", "snapshot_id": "s-1"},
                {"target": "vol-2", "snapshot_id": "s-2"},
                {"target": "vol-3", "snapshot_id": "s-3"}]},
        "test-vm-creation": {"destination_vm_id": "tvm-1"}}});
    let mut row = stuck_in_revert();
    row.context = RunContext::from_value(ctx).unwrap();
    let found = Found {
        disks_on: vec![
            ("vol-1".into(), None),
            ("vol-2".into(), Some("tvm-1".into())),
            ("vol-3".into(), Some("oma-1".into())),
        ],
        vms: vec![("tvm-1".into(), false)],
        own_roots: vec![],
        snapshot: Some(true),
    };
    let text = plan(&row, Some(&vm), None, Some(&found));
    let want = [
        "cmk detach volume id=vol-2",
        "cmk detach volume id=vol-3",
        "cmk revert snapshot id=s-1",
        "cmk revert snapshot id=s-2",
        "cmk revert snapshot id=s-3",
        "cmk attach volume id=vol-1 virtualmachineid=oma-1",
        "cmk attach volume id=vol-2 virtualmachineid=oma-1",
        "cmk attach volume id=vol-3 virtualmachineid=oma-1",
        "cmk destroy virtualmachine id=tvm-1 expunge=true",
        "cmk delete snapshot id=s-1",
        "cmk delete snapshot id=s-2",
        "cmk delete snapshot id=s-3",
    ];
    assert_steps(&text, &want);
    for needle in [
        "disk 1         vol-2",
        "vol-2 on tvm-1",
        "vol-3 on oma-1 (the OMA)",
        "check: cmk list volumes id=vol-3",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

/// The steps of `text`'s numbered list.
fn steps_of(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.starts_with("  ") && l.contains(". "))
        .collect()
}

fn assert_steps(text: &str, want: &[&str]) {
    let steps = steps_of(text);
    assert_eq!(steps.len(), want.len(), "{text}");
    for (step, needle) in steps.iter().zip(want) {
        assert!(step.contains(needle), "{step:?} is not {needle:?} in:\n{text}");
    }
}

/// A cloudstack-vm run stopped before its teardown reverted the test VM: the VM snapshot is
/// reverted on the stopped test VM and deleted before any disk leaves it.
#[test]
fn a_vm_snapshot_is_reverted_and_deleted_before_the_disks_move() {
    let mut row = stuck_in_revert();
    row.state = RunState::NeedsOperator {
        step: "revert-vm-snapshot".into(),
        error: StepError::permanent("SNAPSHOT_REVERT_FAILED", "x"),
        undone: vec![
            "revert-vm-snapshot".into(),
            "delete-vm-snapshot".into(),
            "detach-volume".into(),
        ],
    };
    let ctx = json!({"outputs": {
        "snapshot": {"skipped": "…", "backend": "cloudstack-vm"},
        "test-vm-creation": {"destination_vm_id": "tvm-1"},
        "vm-snapshot": {"snapshot_name": "tern-abc", "snapshot_id": "vms-1", "backend": "cloudstack-vm",
            "snapshots": [{"target": "tvm-1", "snapshot_id": "vms-1", "volume_ids": ["vol-1"]}]}}});
    row.context = RunContext::from_value(ctx).unwrap();
    let found = Found {
        disks_on: vec![("vol-1".into(), Some("tvm-1".into()))],
        vms: vec![("tvm-1".into(), true)],
        own_roots: vec![],
        snapshot: Some(true),
    };
    let want = [
        "cmk stop virtualmachine id=tvm-1",
        "cmk revert tovmsnapshot vmsnapshotid=vms-1",
        "cmk delete vmsnapshot vmsnapshotid=vms-1",
        "cmk detach volume id=vol-1",
        "cmk attach volume id=vol-1 virtualmachineid=oma-1",
        "cmk destroy virtualmachine id=tvm-1 expunge=true",
    ];
    assert_steps(&plan(&row, Some(&vm()), None, Some(&found)), &want);
    // From the journal alone, the same order.
    assert_steps(&plan(&row, Some(&vm()), None, None), &want);
}

/// A run of an older Tern took its VM snapshot of the OMA: the plan deletes it and never
/// tells the operator to revert it.
#[test]
fn a_vm_snapshot_of_the_oma_is_never_reverted() {
    let mut row = stuck_in_revert();
    let ctx = json!({"outputs": {
        "snapshot": {"snapshot_name": "tern-abc", "snapshot_id": "vms-oma", "backend": "cloudstack-vm",
            "target": "oma-1"},
        "test-vm-creation": {"destination_vm_id": "tvm-1"}}});
    row.context = RunContext::from_value(ctx).unwrap();
    row.state = RunState::NeedsOperator {
        step: "revert-snapshot".into(),
        error: StepError::permanent("SNAPSHOT_REVERT_FAILED", "VM must be Stopped"),
        undone: vec!["revert-snapshot".into()],
    };
    // Recorded before snapshots were listed per target: derived from the OMA then.
    let mut rec = Recorded::of(&row, None);
    rec.new_vm = None;
    rec.snapshots = vec![("oma-1".into(), Some("vms-oma".into()))];
    let found = Found {
        disks_on: vec![("vol-1".into(), None)],
        vms: vec![],
        own_roots: vec![],
        snapshot: Some(true),
    };
    let steps = exact_steps(&vm(), &rec, &found);
    assert!(!steps.iter().any(|s| s.contains("cmk revert")), "{steps:?}");
    assert!(
        steps[0].contains("never revert it") && steps[0].contains("vmsnapshotid=vms-oma"),
        "{steps:?}"
    );
    assert!(
        steps[1].contains("cmk attach volume id=vol-1 virtualmachineid=oma-1"),
        "{steps:?}"
    );
}
