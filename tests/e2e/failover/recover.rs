//! `tern recover` is exact. For each end that needs an operator by design (a fault that does
//! not go away, in a compensation or a teardown step), the operator fixes the cause and follows
//! the printed steps to the letter: every step succeeds, the cloud is back at the starting
//! point (the volume on the OMA, nothing named after the run left), and a second look finds
//! nothing left to do.

use tern::providers::cloudstack::{CloudStackClient, CloudStackConfig};
use tern::providers::Cloud;
use tern::steps::failover::{recover, FailoverDeps};

use super::*;

struct Case {
    snapshots: SnapshotKind,
    os: &'static str,
    live: bool,
    faults: Value,
    /// Where the run stops.
    step: &'static str,
    /// Whether the recovery reverts the disk (only where drivers or a test wrote to it).
    revert: bool,
}

/// The CloudStack command a `cmk <verb> <noun>` line names.
fn api_command(verb: &str, noun: &str) -> String {
    let noun = match noun {
        "virtualmachine" => "VirtualMachine",
        "volume" => "Volume",
        "snapshot" => "Snapshot",
        "tovmsnapshot" => "ToVMSnapshot",
        "vmsnapshot" => "VMSnapshot",
        other => panic!("unknown cmk noun {other}"),
    };
    format!("{verb}{noun}")
}

/// Carries out one printed step, as an operator would type it; fails if the call fails.
pub(crate) async fn follow(deps: &FailoverDeps, cloud: &CloudStackClient, line: &str) -> Result<(), String> {
    let command = line
        .split_once("cmk ")
        .or_else(|| line.split_once("linstor "))
        .map(|(_, rest)| rest.split("   (").next().unwrap_or(rest))
        .ok_or_else(|| format!("no command in {line:?}"))?;
    let words: Vec<&str> = command.split_whitespace().collect();
    if line.contains("linstor ") {
        // linstor snapshot rollback|delete <resource> <snapshot>
        let (rsc, name) = (words[2], words[3]);
        return match words[1] {
            "rollback" => deps.snapshots.revert(rsc, name).await,
            "delete" => deps.snapshots.delete(rsc, name).await,
            other => panic!("unknown linstor verb {other}"),
        }
        .map_err(|e| format!("{line}: {e}"));
    }
    let params: Vec<(String, String)> = words[2..]
        .iter()
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("key=value");
            (k.to_string(), v.to_string())
        })
        .collect();
    let reply = cloud
        .call(&api_command(words[0], words[1]), params)
        .await
        .map_err(|e| format!("{line}: {e}"))?;
    if let Some(job) = reply.get("jobid").and_then(Value::as_str) {
        cloud
            .wait_job(job, Duration::from_millis(10), Duration::from_secs(10))
            .await
            .map_err(|e| format!("{line}: job {job}: {e}"))?;
    }
    Ok(())
}

/// The numbered steps of a recovery text.
fn steps(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| l.split_once(". ").is_some_and(|(n, _)| n.parse::<u32>().is_ok()))
        .map(str::to_string)
        .collect()
}

async fn look_and_plan(w: &World, row: &tern::store::RunRow, vm: &tern::domain::inventory::VmRecord) -> String {
    let job = w.store.failover_job(row.id).await.unwrap().unwrap();
    let snap = job.linstor_snapshot_name.as_deref();
    let rec = recover::Recorded::of(row, snap);
    let found = recover::look(&w.deps, row, vm, &rec).await.unwrap();
    recover::plan(row, Some(vm), snap, Some(&found))
}

async fn run_case(db: &TestDb, case: Case) {
    let w = world(db, case.snapshots, Some(case.faults)).await;
    let vm = w.vm(case.os).clone();
    let run = if case.live {
        w.submit("live-failover", input(&vm, json!({"job_type": "live"}))).await
    } else {
        w.submit(
            "test-failover",
            input(&vm, json!({"auto_cleanup": true, "test_duration": "10ms"})),
        )
        .await
    };
    let row = w.finish(run).await;
    match &row.state {
        RunState::NeedsOperator { step, .. } => assert_eq!(step, case.step, "{:?}", row.state),
        other => panic!("expected needs_operator, got {other:?}"),
    }
    // The operator fixes the cause, then follows the printed steps.
    let r = w.http.delete(format!("{}/sim/faults", w.base)).send().await.unwrap();
    assert!(r.status().is_success());
    let text = look_and_plan(&w, &row, &vm).await;
    let todo = steps(&text);
    assert_eq!(
        todo.iter().any(|s| s.contains("revert the disk")),
        case.revert,
        "a revert where one is due, none where it is not:\n{text}"
    );
    assert!(!todo.is_empty(), "something is left to do:\n{text}");
    let cloud = CloudStackClient::new(CloudStackConfig::new(format!("{}/client/api", w.base), KEY, SECRET)).unwrap();
    for line in &todo {
        if let Err(e) = follow(&w.deps, &cloud, line).await {
            panic!("step failed: {e}\nrecovery was:\n{text}");
        }
    }
    w.assert_clean(&vm.oma_vm_id).await;
    let again = look_and_plan(&w, &row, &vm).await;
    assert!(
        again.contains("nothing is left to do"),
        "after the recovery:\n{again}\nrecovery was:\n{text}"
    );
    if case.os == "windows" {
        let (_, injected) = w.generation(&vm.boot_disk.volume_id).await;
        assert!(!injected, "the revert took the drivers out:\n{text}");
    }
}

async fn recover_when_the_set_aside_root_cannot_be_deleted(db: TestDb) {
    let faults = json!({"commands": {"deleteVolume": {"error_rate": 1.0}}});
    let case = Case {
        snapshots: SnapshotKind::CloudstackVolume,
        os: "linux",
        live: false,
        faults,
        step: "volume-attachment",
        revert: false,
    };
    run_case(&db, case).await
}

async fn recover_when_the_teardown_revert_fails(db: TestDb) {
    let faults = json!({"commands": {"revertSnapshot": {"job_failure_rate": 1.0}}});
    let case = Case {
        snapshots: SnapshotKind::CloudstackVolume,
        os: "windows",
        live: false,
        faults,
        step: "revert-snapshot",
        revert: true,
    };
    run_case(&db, case).await
}

async fn recover_when_the_test_vm_cannot_be_destroyed(db: TestDb) {
    let faults = json!({"commands": {"destroyVirtualMachine": {"job_failure_rate": 1.0}}});
    let case = Case {
        snapshots: SnapshotKind::CloudstackVolume,
        os: "linux",
        live: false,
        faults,
        step: "delete-test-vm",
        revert: false,
    };
    run_case(&db, case).await
}

async fn recover_when_the_snapshot_cannot_be_deleted(db: TestDb) {
    let faults = json!({"commands": {"deleteSnapshot": {"job_failure_rate": 1.0}}});
    let case = Case {
        snapshots: SnapshotKind::CloudstackVolume,
        os: "linux",
        live: false,
        faults,
        step: "delete-snapshot",
        revert: false,
    };
    run_case(&db, case).await
}

async fn recover_when_the_linstor_rollback_fails(db: TestDb) {
    let faults = json!({"commands": {"linstor.rollbackSnapshot": {"error_rate": 1.0}}});
    let case = Case {
        snapshots: SnapshotKind::Linstor,
        os: "windows",
        live: false,
        faults,
        step: "revert-snapshot",
        revert: true,
    };
    run_case(&db, case).await
}

async fn recover_when_a_live_rollback_cannot_revert(db: TestDb) {
    let faults = json!({"commands": {
        "startVirtualMachine": {"job_failure_rate": 1.0},
        "revertSnapshot": {"job_failure_rate": 1.0}
    }});
    let case = Case {
        snapshots: SnapshotKind::CloudstackVolume,
        os: "windows",
        live: true,
        faults,
        step: "virtio-injection",
        revert: true,
    };
    run_case(&db, case).await
}

crate::on_sqlite!(
    recover_when_the_set_aside_root_cannot_be_deleted,
    recover_when_the_teardown_revert_fails,
    recover_when_the_test_vm_cannot_be_destroyed,
    recover_when_the_snapshot_cannot_be_deleted,
    recover_when_the_linstor_rollback_fails,
    recover_when_a_live_rollback_cannot_revert,
);
