//! A VM with several disks and NICs: every disk is snapshotted, moved in the source's order,
//! and given back to its own slot on the OMA, whatever ends the run; every NIC is on its
//! mapped network in the source's order, a live failover keeping its MAC and IP.

use super::*;

/// Where each of `vm`'s disks is: (the VM it is attached to, its slot), boot disk first.
async fn placement(w: &World, vm: &tern::domain::inventory::VmRecord) -> Vec<(Value, Value)> {
    let state = w.get("/sim/state").await;
    vm.all_disks()
        .map(|d| {
            let v = &state["volumes"][&d.volume_id];
            (v["vm_id"].clone(), v["device_id"].clone())
        })
        .collect()
}

/// The boot disk is the new VM's ROOT disk; the data disks follow it in the source's order.
fn assert_on(placed: &[(Value, Value)], vm_id: &str) {
    for (on, _) in placed {
        assert_eq!(on, &json!(vm_id), "{placed:?}");
    }
    assert_eq!(placed[0].1, json!(0), "the boot disk is the ROOT disk: {placed:?}");
    let slots: Vec<u64> = placed.iter().filter_map(|(_, d)| d.as_u64()).collect();
    assert_eq!(slots.len(), placed.len(), "{placed:?}");
    assert!(
        slots.windows(2).all(|p| p[0] < p[1]),
        "data disks in the source's order: {placed:?}"
    );
}

async fn a_three_disk_vm_is_tested_with_every_disk_and_given_back_slot_for_slot(db: TestDb) {
    let w = world(&db, SnapshotKind::CloudstackVolume, None).await;
    let vm = w.vm("windows").clone();
    assert_eq!(vm.data_disks.len(), 2, "the sample's Windows VM has two data disks");
    let before = placement(&w, &vm).await;
    let (run, row, test_vm) = w.held_test(&vm).await;
    assert_on(&placement(&w, &vm).await, &test_vm);
    let snap = row.context.output("snapshot");
    assert_eq!(snap["snapshots"].as_array().map(Vec::len), Some(3), "{snap}");
    assert_eq!(snap["consistent"], json!(false), "{snap}");
    assert!(snap["note"].as_str().unwrap().contains("one after the other"), "{snap}");
    assert_eq!(
        row.context.output("volume-attachment")["disks"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );
    // The job row holds the spec used and the mappings applied (one per source network).
    let job = w.store.failover_job(run).await.unwrap().unwrap();
    let applied = job.network_mappings.expect("the applied mappings");
    assert_eq!(
        json!(applied),
        row.context.output("test-vm-creation")["network_mappings"],
        "{applied:?}"
    );
    let sources: std::collections::BTreeSet<&str> = vm.nics.iter().map(|n| n.source_network.as_str()).collect();
    assert_eq!(
        applied
            .keys()
            .map(String::as_str)
            .collect::<std::collections::BTreeSet<_>>(),
        sources
    );
    w.engine.signal(run, "end-test").await.unwrap();
    let row = w.finish(run).await;
    assert_eq!(row.status, RunStatus::Completed, "{:?}", row.state);
    w.assert_clean(&vm.oma_vm_id).await;
    assert_eq!(placement(&w, &vm).await, before, "every disk back in its own OMA slot");
    // Every tracking row carries the run's correlation id.
    let tracking = w.store.job_tracking(run).await.unwrap();
    assert!(tracking.len() > 10, "{tracking:?}");
    for t in &tracking {
        assert_eq!(t.correlation_id.as_deref(), Some(row.correlation_id.as_str()), "{t:?}");
    }
}

async fn a_live_failover_moves_every_disk(db: TestDb) {
    let w = world(&db, SnapshotKind::Linstor, None).await;
    let vm = w.vm("windows").clone();
    let run = w.submit("live-failover", input(&vm, json!({"job_type": "live"}))).await;
    let row = w.finish(run).await;
    assert_eq!(row.status, RunStatus::Completed, "{:?}", row.state);
    let new_vm = common::created_vm(&row, "vm-creation");
    assert_on(&placement(&w, &vm).await, &new_vm);
    let inv = w
        .get(&format!("/sim/invariant?expect_vm={new_vm}&prefix=tern-t-"))
        .await;
    for d in vm.all_disks() {
        let check = common::volume_check(&inv, &d.volume_id);
        assert_eq!(check["ok"], json!(true), "{check}");
    }
    // Every NIC in the source's order, on its mapped production network, with its MAC and IP.
    let state = w.get("/sim/state").await;
    let got: Vec<(Value, Value, Value)> = state["vms"][&new_vm]["nics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["network_id"].clone(), n["ip"].clone(), n["mac"].clone()))
        .collect();
    let want: Vec<(Value, Value, Value)> = vm
        .nics
        .iter()
        .map(|n| {
            let net = w.sample.production_network_for(&n.source_network);
            (json!(net), json!(n.ip), json!(n.mac))
        })
        .collect();
    assert_eq!(got, want);
    let job = w.store.failover_job(run).await.unwrap().unwrap();
    let mapped: std::collections::BTreeMap<String, String> = vm
        .nics
        .iter()
        .map(|n| {
            let net = w.sample.production_network_for(&n.source_network);
            (n.source_network.clone(), net.to_string())
        })
        .collect();
    assert_eq!(job.network_mappings, Some(mapped), "the production mappings applied");
    assert_eq!(
        row.context.output("network-configuration")["nics"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    assert_eq!(
        row.context.output("vm-creation")["nics"][1]["source_network"],
        json!("Backup")
    );
    let snap = row.context.output("snapshot");
    assert_eq!(
        snap["consistent"],
        json!(true),
        "LINSTOR takes every disk at one instant: {snap}"
    );
    assert_eq!(snap["snapshots"].as_array().map(Vec::len), Some(3), "{snap}");
    let all = w.get("/sim/invariant?prefix=tern-").await;
    assert!(
        all["leaked_linstor_snapshots"].as_array().unwrap().is_empty(),
        "every disk's snapshot is removed: {all}"
    );
}

async fn a_data_disk_that_cannot_move_rolls_every_disk_back(db: TestDb) {
    // attachVolume 0 is the boot disk, 1 the first data disk; the second data disk's three
    // attempts (2-4) fail, and the rollback gives all three back to the OMA.
    let f = json!({"scripted": {"attachVolume": {"2": "job_failure", "3": "job_failure", "4": "job_failure"}}});
    let w = world(&db, SnapshotKind::CloudstackVolume, Some(f)).await;
    let vm = w.vm("windows").clone();
    let before = placement(&w, &vm).await;
    let run = w.submit("test-failover", input(&vm, json!({}))).await;
    let row = w.finish(run).await;
    assert_eq!(row.status, RunStatus::Failed, "{:?}", row.state);
    assert_eq!(error_code(&row), "VOLUME_ATTACH_FAILED");
    w.assert_clean(&vm.oma_vm_id).await;
    assert_eq!(placement(&w, &vm).await, before, "every disk back in its own OMA slot");
}

async fn a_live_failover_that_cannot_keep_an_address_stops_before_creating_anything(db: TestDb) {
    let w = world(&db, SnapshotKind::CloudstackVolume, None).await;
    let vm = w.vm("windows").clone();
    // Both NICs onto one production network, keeping their addresses: CloudStack would give
    // the VM one NIC there. Validation says so; nothing is created.
    let both = json!({"job_type": "live", "network_mappings": {"Backup": w.sample.production_network_id}});
    let run = w.submit("live-failover", input(&vm, both)).await;
    let row = w.finish(run).await;
    assert_eq!(row.status, RunStatus::Failed, "{:?}", row.state);
    assert_eq!(error_code(&row), "VALIDATION_FAILED");
    let RunState::Failed { error, .. } = &row.state else {
        unreachable!()
    };
    assert!(
        error.message.contains("nics[0] and nics[1] both map to network"),
        "{}",
        error.message
    );
    w.assert_clean(&vm.oma_vm_id).await;
    let state = w.get("/sim/state").await;
    assert_eq!(
        state["created"].as_object().map(|c| c.len()),
        Some(0),
        "nothing created: {}",
        state["created"]
    );
}

/// Fixed offerings configured (largest first, to show order does not matter): the Windows VM
/// (4 CPUs, 8 GB) gets the smallest that fits; a request may name another; one that does not
/// exist fails the step naming the key.
async fn fixed_offerings_give_the_smallest_that_fits(db: TestDb) {
    let tuning = Tuning {
        fixed_offerings: true,
        ..TUNING
    };
    let w = world_tuned(&db, SnapshotKind::CloudstackVolume, None, 3, None, &tuning).await;
    let vm = w.vm("windows").clone();
    let medium = w
        .sample
        .fixed_offerings
        .iter()
        .find(|o| o.name == "Medium")
        .unwrap()
        .clone();
    let large = w
        .sample
        .fixed_offerings
        .iter()
        .find(|o| o.name == "Large")
        .unwrap()
        .clone();
    let vm_of = |row: &tern::store::RunRow| common::created_vm(row, "vm-creation");
    let run = w.submit("live-failover", input(&vm, json!({"job_type": "live"}))).await;
    let row = w.finish(run).await;
    assert_eq!(row.status, RunStatus::Completed, "{:?}", row.state);
    let sizing = &row.context.output("vm-creation")["sizing"];
    assert_eq!(sizing["service_offering_id"], json!(medium.id), "{sizing}");
    assert_eq!(sizing["fits"], json!(true));
    assert!(sizing["how"]
        .as_str()
        .unwrap()
        .contains("smallest configured offering that fits"));
    let state = w.get("/sim/state").await;
    let new_vm = &state["vms"][&vm_of(&row)];
    assert_eq!(
        (new_vm["cpu"].clone(), new_vm["memory_mb"].clone()),
        (json!(4), json!(8192))
    );

    // The next failover of the same VM needs it back on the OMA: a test failover (torn down)
    // of another VM names the large offering instead.
    let lnx = w.vm("linux").clone();
    let named =
        json!({"auto_cleanup": true, "test_duration": "10ms", "custom_config": {"service_offering_id": large.id}});
    let run = w.submit("test-failover", input(&lnx, named)).await;
    let row = w.finish(run).await;
    assert_eq!(row.status, RunStatus::Completed, "{:?}", row.state);
    let sizing = &row.context.output("test-vm-creation")["sizing"];
    assert_eq!(sizing["service_offering_id"], json!(large.id), "{sizing}");
    assert!(sizing["how"].as_str().unwrap().contains("the request's fixed offering"));

    let db_vm = w.inv.vms.iter().find(|v| v.name == "lnx-db-01").unwrap().clone();
    let missing = json!({"custom_config": {"service_offering_id": "no-such-offering"}});
    let run = w.submit("test-failover", input(&db_vm, missing)).await;
    let row = w.finish(run).await;
    assert_eq!(row.status, RunStatus::Failed, "{:?}", row.state);
    assert_eq!(error_code(&row), "VM_CREATE_FAILED");
    let RunState::Failed { error, .. } = &row.state else {
        unreachable!()
    };
    assert!(
        error.message.contains("custom_config[service_offering_id]"),
        "{}",
        error.message
    );
    let left = w.get("/sim/invariant?prefix=tern-t-").await;
    assert_eq!(left["leaked_vms"], json!([]), "{left}");
}

crate::on_both_backends!(a_three_disk_vm_is_tested_with_every_disk_and_given_back_slot_for_slot);

crate::on_sqlite!(
    a_live_failover_moves_every_disk,
    a_live_failover_that_cannot_keep_an_address_stops_before_creating_anything,
    fixed_offerings_give_the_smallest_that_fits,
    a_data_disk_that_cannot_move_rolls_every_disk_back,
);
