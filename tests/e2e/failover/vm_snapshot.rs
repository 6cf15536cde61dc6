//! The `cloudstack-vm` snapshot backend: one VM snapshot of the new VM, every disk on it,
//! before it starts; reverted on the stopped VM and deleted before the disks leave it
//! (CloudStack moves no volume of a VM that has VM snapshots). The OMA is never snapshotted.

use super::*;

/// Each of `vm`'s disks' content, boot disk first.
async fn contents(w: &World, vm: &tern::domain::inventory::VmRecord) -> Vec<(u64, bool)> {
    let mut out = Vec::new();
    for d in vm.all_disks() {
        out.push(w.generation(&d.volume_id).await);
    }
    out
}

/// The VM snapshots the simulator holds, as (VM, name).
async fn vm_snapshots(w: &World) -> Vec<(String, String)> {
    let state = w.get("/sim/state").await;
    state["vm_snapshots"]
        .as_object()
        .map(|all| {
            all.values()
                .map(|s| {
                    (
                        s["vm_id"].as_str().unwrap_or_default().to_string(),
                        s["name"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// After the test, every disk holds what it held when the VM snapshot was taken: the test's
/// writes are gone, the drivers injected before it stay on the boot disk.
fn assert_reverted(before: &[(u64, bool)], after: &[(u64, bool)]) {
    assert_eq!(
        after[0],
        (before[0].0 + 1, true),
        "the boot disk keeps the drivers only"
    );
    assert_eq!(after[1..], before[1..], "the data disks are as they were");
}

async fn a_three_disk_test_failover_snapshots_the_test_vm_and_reverts_it(db: TestDb) {
    let w = world(&db, SnapshotKind::CloudstackVm, None).await;
    let vm = w.vm("windows").clone();
    let before = contents(&w, &vm).await;
    let (run, row, test_vm) = w.held_test(&vm).await;
    let skipped = row.context.output("snapshot");
    assert!(
        skipped["skipped"].as_str().unwrap().contains("step vm-snapshot"),
        "{skipped}"
    );
    let snap = row.context.output("vm-snapshot");
    assert_eq!(snap["target"], json!(test_vm), "{snap}");
    assert_eq!(
        snap["consistent"],
        json!(true),
        "one VM snapshot covers every disk: {snap}"
    );
    assert_eq!(snap["snapshots"][0]["volume_ids"].as_array().map(Vec::len), Some(3));
    assert!(snap["note"].as_str().unwrap().contains("drivers stay"), "{snap}");
    let name = snap["snapshot_name"].as_str().unwrap().to_string();
    assert_eq!(
        vm_snapshots(&w).await,
        [(test_vm.clone(), name.clone())],
        "of the test VM only"
    );
    let job = w.store.failover_job(run).await.unwrap().unwrap();
    assert_eq!(job.linstor_snapshot_name.as_deref(), Some(name.as_str()));

    // People write to every disk while the test VM runs.
    for d in vm.all_disks() {
        w.post(&format!("/sim/volumes/{}/write", d.volume_id)).await;
    }
    w.engine.signal(run, "end-test").await.unwrap();
    let row = w.finish(run).await;
    assert_eq!(row.status, RunStatus::Completed, "{:?}", row.state);
    w.assert_clean(&vm.oma_vm_id).await;
    assert_reverted(&before, &contents(&w, &vm).await);
    let tracking = w.store.job_tracking(run).await.unwrap();
    for step in ["teardown:revert-vm-snapshot", "teardown:delete-vm-snapshot"] {
        assert!(
            tracking.iter().any(|t| t.operation == step && t.status == "completed"),
            "{step}: {tracking:?}"
        );
    }
}

async fn a_cancelled_hold_reverts_the_test_vm_and_gives_every_disk_back(db: TestDb) {
    let w = world(&db, SnapshotKind::CloudstackVm, None).await;
    let vm = w.vm("windows").clone();
    let before = contents(&w, &vm).await;
    let run = w.submit("test-failover", input(&vm, json!({}))).await;
    w.wait_status(run, RunStatus::Holding).await;
    for d in vm.all_disks() {
        w.post(&format!("/sim/volumes/{}/write", d.volume_id)).await;
    }
    w.engine.cancel(run, "drill").await.unwrap();
    let row = w.finish(run).await;
    assert_eq!(row.status, RunStatus::Cancelled, "{:?}", row.state);
    w.assert_clean(&vm.oma_vm_id).await;
    assert_reverted(&before, &contents(&w, &vm).await);
}

async fn a_live_failover_leaves_no_vm_snapshot(db: TestDb) {
    let w = world(&db, SnapshotKind::CloudstackVm, None).await;
    let vm = w.vm("windows").clone();
    let run = w.submit("live-failover", input(&vm, json!({"job_type": "live"}))).await;
    let row = w.finish(run).await;
    assert_eq!(row.status, RunStatus::Completed, "{:?}", row.state);
    let new_vm = common::created_vm(&row, "vm-creation");
    assert_eq!(row.context.output("vm-snapshot")["target"], json!(new_vm));
    assert_eq!(vm_snapshots(&w).await, [], "snapshot-cleanup deleted it");
    for d in vm.all_disks() {
        let v = w.get("/sim/state").await["volumes"][&d.volume_id].clone();
        assert_eq!(v["vm_id"], json!(new_vm), "{v}");
    }
}

async fn a_start_that_fails_rolls_back_through_the_vm_snapshot(db: TestDb) {
    let f = json!({"commands": {"startVirtualMachine": {"job_failure_rate": 1.0}}});
    let w = world(&db, SnapshotKind::CloudstackVm, Some(f)).await;
    let vm = w.vm("windows").clone();
    let before = contents(&w, &vm).await;
    let run = w.submit("test-failover", input(&vm, json!({}))).await;
    let row = w.finish(run).await;
    assert_eq!(row.status, RunStatus::Failed, "{:?}", row.state);
    assert_eq!(error_code(&row), "VM_START_FAILED");
    w.assert_clean(&vm.oma_vm_id).await;
    assert_reverted(&before, &contents(&w, &vm).await);
}

crate::on_both_backends!(a_three_disk_test_failover_snapshots_the_test_vm_and_reverts_it);

crate::on_sqlite!(
    a_cancelled_hold_reverts_the_test_vm_and_gives_every_disk_back,
    a_live_failover_leaves_no_vm_snapshot,
    a_start_that_fails_rolls_back_through_the_vm_snapshot,
);
