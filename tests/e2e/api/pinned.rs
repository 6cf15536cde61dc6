//! A job works on the VM as the inventory described it when the job started: an inventory
//! edit while the test holds does not change which disk the teardown gives back, and a retried
//! start with the same request id is still the same request.

use super::*;

pub async fn a_job_keeps_the_vm_it_started_with(db: TestDb) {
    let a = api(&db).await;
    let vm = a.vm("linux");
    let start = pb::StartTestFailoverRequest {
        request_id: "chg-pinned".into(),
        ..a.test_request(&vm)
    };
    let job =
        a.fo.clone()
            .start_test_failover(start.clone())
            .await
            .unwrap()
            .into_inner();
    let held = a.until(&job.job_id, "testing", |j| j.status == "testing").await;
    // The test VM has the source's size (the offering is a custom one), and the job says so.
    let test_vm = a.deps.cloud.get_vm(&held.destination_vm_id).await.unwrap();
    assert_eq!(
        (test_vm.cpu_number, test_vm.memory),
        (Some(vm.cpu_count), Some(u64::from(vm.memory_mb)))
    );
    let run = a.store.get_run(job.job_id.parse().unwrap()).await.unwrap().unwrap();
    let sizing = &run.context.output("test-vm-creation")["sizing"];
    assert_eq!(sizing["how"], "custom offering: the source's size", "{sizing}");

    // The replication system re-describes the VM while it is tested: another volume.
    let mut edited = tern::api::convert::vm(&vm);
    edited.volume_id = "vol-reseeded".into();
    edited.disks.clear();
    edited.memory_mb *= 2;
    a.fo.clone()
        .upsert_vm(pb::UpsertVmRequest { vm: Some(edited) })
        .await
        .unwrap();

    // A retry of the start is the same request: the same job, not a second one.
    let again = a.fo.clone().start_test_failover(start).await.unwrap().into_inner();
    assert_eq!((again.job_id.as_str(), again.created), (job.job_id.as_str(), false));

    // The teardown gives back the volume the job moved, to the OMA.
    a.fo.clone()
        .end_test_failover(pb::EndTestFailoverRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap();
    let done = a.terminal(&job.job_id).await;
    assert_eq!(done.run_status, "completed", "{done:?}");
    let volume = a.deps.cloud.get_volume(&vm.boot_disk.volume_id).await.unwrap();
    assert_eq!(volume.vm_id.as_deref(), Some(vm.oma_vm_id.as_str()));

    // The job's input holds the VM as it was.
    let row = a.store.get_run(job.job_id.parse().unwrap()).await.unwrap().unwrap();
    let input = tern::domain::failover::FailoverInput::from_value(&row.input).unwrap();
    assert_eq!(input.source_vm_spec.as_ref(), Some(&vm));
}

/// A NIC mapped to a network CloudStack does not have stops the failover in validation, before
/// anything is created, and the report names the NIC.
pub async fn a_mapping_to_a_missing_network_is_refused_before_anything_is_created(db: TestDb) {
    let a = api(&db).await;
    let vm = a.vm("linux");
    let source = vm.nics[0].source_network.clone();
    a.fo.clone()
        .set_network_mappings(pb::SetNetworkMappingsRequest {
            vm_id: vm.vm_id.clone(),
            kind: "test".into(),
            mappings: vec![pb::NetworkMapping {
                source_network: source.clone(),
                destination_network_id: "8f3c0000-0000-4000-8000-00000000dead".into(),
                kind: String::new(),
            }],
        })
        .await
        .unwrap();
    let report =
        a.fo.clone()
            .check_readiness(pb::CheckReadinessRequest {
                vm_id: vm.vm_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    assert!(!report.is_ready);
    let check = report
        .checks
        .iter()
        .find(|c| c.check_name == "Network Mappings")
        .unwrap();
    assert_eq!((check.check_type.as_str(), check.status.as_str()), ("critical", "fail"));
    assert!(
        check.message.contains(&format!("nics[0] ({source})")),
        "{}",
        check.message
    );

    let job =
        a.fo.clone()
            .start_test_failover(a.test_request(&vm))
            .await
            .unwrap()
            .into_inner();
    let done = a.terminal(&job.job_id).await;
    assert_eq!(done.run_status, "failed", "{done:?}");
    assert_eq!(done.error.as_ref().map(|e| e.code.as_str()), Some("VALIDATION_FAILED"));
    assert!(done.destination_vm_id.is_empty(), "nothing was created: {done:?}");
    let vms = a.deps.cloud.list_vms(Default::default()).await.unwrap();
    assert!(vms.iter().all(|v| !v.name.starts_with("tern-")), "{vms:?}");
}
