//! A job that ends needs_operator keeps its VM locked until an operator resolves it: a second
//! start is VM_BUSY naming the job, a resolve is refused while the cloud still differs (listing
//! what), and after the operator follows `recover` the resolve succeeds, is journaled with who
//! and why, and the VM is free again. A forced resolve journals what still differed.

use super::*;
use crate::failover::recover::follow;
use tern::domain::failover::FailoverInput;
use tern::providers::cloudstack::{CloudStackClient, CloudStackConfig};
use tern::steps::failover::recover;

/// The VM cannot be destroyed in the teardown: the job ends needs_operator with its test VM left.
const STUCK: &str = r#"{"commands": {"destroyVirtualMachine": {"job_failure_rate": 1.0}}}"#;

async fn stuck_job(a: &Api, vm: &VmRecord) -> pb::FailoverJob {
    let job =
        a.fo.clone()
            .start_test_failover(pb::StartTestFailoverRequest {
                vm_id: vm.vm_id.clone(),
                auto_cleanup: true,
                test_duration: "10ms".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    let done = a.terminal(&job.job_id).await;
    assert_eq!(done.run_status, "needs_operator", "{done:?}");
    done
}

async fn resolve(a: &Api, job: &str, force: bool) -> Result<pb::FailoverJob, tonic::Status> {
    a.fo.clone()
        .resolve_failover(pb::ResolveFailoverRequest {
            job_id: job.into(),
            reason: "test VM destroyed by hand, volume back on the OMA".into(),
            resolved_by: "ops@site".into(),
            force,
        })
        .await
        .map(|r| r.into_inner())
}

async fn start_again(a: &Api, vm: &VmRecord) -> Result<pb::FailoverJob, tonic::Status> {
    a.fo.clone()
        .start_test_failover(a.test_request(vm))
        .await
        .map(|r| r.into_inner())
}

async fn last_record(a: &Api, job: &str) -> tern::domain::run::Record {
    let id = job.parse().unwrap();
    let journal = a.store.journal(id, 0, 10_000).await.unwrap();
    journal.last().unwrap().record.clone()
}

pub async fn needs_operator_keeps_the_vm_until_resolved(db: TestDb) {
    let a = api_with(&db, Some(STUCK), FAST_RETRY).await;
    let vm = a.vm("linux");
    let stuck = stuck_job(&a, &vm).await;

    // The VM stays locked: a second start names the job and the way out.
    let busy = start_again(&a, &vm).await.unwrap_err();
    assert_eq!(
        (busy.code(), reason(&busy).as_str()),
        (Code::FailedPrecondition, "VM_BUSY")
    );
    assert!(busy.message().contains(&stuck.job_id), "{}", busy.message());
    assert!(busy.message().contains("tern resolve"), "{}", busy.message());
    let ready =
        a.fo.clone()
            .check_readiness(pb::CheckReadinessRequest {
                vm_id: vm.vm_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    assert!(
        !ready.is_ready,
        "a VM held by a job that needs an operator is not ready: {ready:?}"
    );

    // A resolve needs a reason and who.
    let mut bad = pb::ResolveFailoverRequest {
        job_id: stuck.job_id.clone(),
        resolved_by: "ops@site".into(),
        ..Default::default()
    };
    let e = a.fo.clone().resolve_failover(bad.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("reason"), "{}", e.message());
    bad.reason = "x".into();
    bad.resolved_by = " ".into();
    let e = a.fo.clone().resolve_failover(bad).await.unwrap_err();
    assert!(e.message().contains("resolved_by"), "{}", e.message());

    // Refused while the cloud still differs, naming what.
    let e = resolve(&a, &stuck.job_id, false).await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::FailedPrecondition, "NOT_RESOLVED")
    );
    assert!(e.message().contains("destroy the new VM"), "{}", e.message());
    assert_eq!(a.get(&stuck.job_id).await.run_status, "needs_operator");

    // The operator lifts the fault and does what recover lists, then resolves.
    let r = reqwest::Client::new()
        .delete(format!("{}/sim/faults", a._sim.base))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let row = a.store.get_run(stuck.job_id.parse().unwrap()).await.unwrap().unwrap();
    let snap = a
        .store
        .failover_job(row.id)
        .await
        .unwrap()
        .unwrap()
        .linstor_snapshot_name;
    let todo = recover::differences(&a.deps, &row, &vm, snap.as_deref()).await.unwrap();
    assert!(!todo.is_empty());
    let cloud = CloudStackClient::new(CloudStackConfig::new(format!("{}/client/api", a._sim.base), "k", "s")).unwrap();
    for line in &todo {
        follow(&a.deps, &cloud, line).await.unwrap_or_else(|e| panic!("{e}"));
    }
    let done = resolve(&a, &stuck.job_id, false).await.unwrap();
    assert_eq!(
        (done.run_status.as_str(), done.status.as_str()),
        ("resolved", "resolved")
    );
    let res = done.resolution.clone().expect("resolution");
    assert_eq!((res.resolved_by.as_str(), res.forced), ("ops@site", false));
    assert!(res.differences.is_empty() && res.resolved_at.is_some(), "{res:?}");
    assert_eq!(
        done.completed_at, stuck.completed_at,
        "the job completed when it stopped, not when it was resolved"
    );
    match last_record(&a, &stuck.job_id).await {
        tern::domain::run::Record::Resolved { by, forced, .. } => {
            assert_eq!((by.as_str(), forced), ("ops@site", false))
        }
        other => panic!("{other:?}"),
    }

    // Resolved once: a second resolve is refused; the VM is free.
    let e = resolve(&a, &stuck.job_id, false).await.unwrap_err();
    assert_eq!(reason(&e), "JOB_NOT_NEEDS_OPERATOR", "{e:?}");
    let next = start_again(&a, &vm).await.unwrap();
    assert!(next.created);
}

pub async fn a_forced_resolve_journals_what_still_differed(db: TestDb) {
    let a = api_with(&db, Some(STUCK), FAST_RETRY).await;
    let vm = a.vm("linux");
    let stuck = stuck_job(&a, &vm).await;
    // Through the CLI: refused without --force (one line, the code), resolved with it.
    let tern = |extra: &[&str]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tern"));
        cmd.args([
            "--endpoint",
            &a.endpoint,
            "resolve",
            &stuck.job_id,
            "--reason",
            "accepted as is",
        ])
        .args(extra)
        .env("RUST_LOG", "warn");
        async move {
            let out = cmd.output().await.expect("run tern");
            let text = |b: Vec<u8>| String::from_utf8_lossy(&b).to_string();
            (out.status.code(), text(out.stdout), text(out.stderr))
        }
    };
    let (code, _, err) = tern(&[]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("[NOT_RESOLVED]") && err.contains("destroy the new VM"),
        "{err}"
    );
    let (code, out, err) = tern(&["--force", "--by", "ops@site"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("resolved (forced)"), "{out}");
    let done = a.get(&stuck.job_id).await;
    assert_eq!(done.status, "resolved");
    let res = done.resolution.expect("resolution");
    assert!(res.forced);
    assert!(
        res.differences.iter().any(|d| d.contains("destroy the new VM")),
        "{:?}",
        res.differences
    );
    match last_record(&a, &stuck.job_id).await {
        tern::domain::run::Record::Resolved {
            forced, differences, ..
        } => assert!(forced && differences == res.differences),
        other => panic!("{other:?}"),
    }
    // `tern admin recover` still tells what was left, and who resolved it.
    let row = a.store.get_run(stuck.job_id.parse().unwrap()).await.unwrap().unwrap();
    let text = recover::plan(&row, Some(&vm), None, None);
    assert!(
        text.contains("resolved by ops@site") && text.contains("(forced)"),
        "{text}"
    );
    assert_eq!(FailoverInput::from_value(&row.input).unwrap().vm_id, vm.vm_id);
    let next = start_again(&a, &vm).await.unwrap();
    assert!(next.created);
}
