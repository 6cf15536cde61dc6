//! The failover workflows end to end: the real CloudStack/LINSTOR clients over HTTP against the
//! simulator, driven by the engine. Happy paths, a failure injected at every step with the
//! rollback checked against the simulator's state, cancel, and the safety invariant.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tern::domain::inventory::InventoryFile;
use tern::domain::run::{RunState, RunStatus};
use tern::domain::RunId;
use tern::engine::{Engine, EngineConfig, SubmitRequest};
use tern::providers::SnapshotKind;
use tern::sim::SampleInventory;
use tern::steps::failover::setup::InjectorSettings;
use tern::store::Store;
use tokio_util::sync::CancellationToken;

use common::TestDb;

mod disks;
pub(crate) mod recover;
mod sweep;
mod vm_snapshot;

const KEY: &str = "test-key";
const SECRET: &str = "test-secret";

struct World {
    base: String,
    http: reqwest::Client,
    stop: CancellationToken,
    sample: SampleInventory,
    inv: InventoryFile,
    engine: Arc<Engine>,
    store: Arc<dyn Store>,
    /// The failover steps' dependencies, as the worker has them (what `tern recover` looks with).
    deps: Arc<tern::steps::failover::FailoverDeps>,
    _defs: tempfile::TempDir,
    _sim: common::Sim,
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn world(db: &TestDb, snapshots: SnapshotKind, faults: Option<Value>) -> World {
    world_with(db, snapshots, faults, 3).await
}

async fn world_with(db: &TestDb, snapshots: SnapshotKind, faults: Option<Value>, attempts: u32) -> World {
    world_full(db, snapshots, faults, attempts, None).await
}

/// How fast the simulated cloud answers and how patient the client and the retries are.
struct Tuning {
    latency_ms: u64,
    job_poll: Duration,
    request_timeout: Duration,
    max_delay: &'static str,
    concurrency: usize,
    /// Configure the sample's fixed offerings (comma-separated) instead of the custom one.
    fixed_offerings: bool,
}

const TUNING: Tuning = Tuning {
    latency_ms: 20,
    job_poll: Duration::from_millis(10),
    request_timeout: Duration::from_secs(2),
    max_delay: "100ms",
    concurrency: 8,
    fixed_offerings: false,
};

async fn world_full(
    db: &TestDb,
    snapshots: SnapshotKind,
    faults: Option<Value>,
    attempts: u32,
    injector: Option<InjectorSettings>,
) -> World {
    world_tuned(db, snapshots, faults, attempts, injector, &TUNING).await
}

async fn world_tuned(
    db: &TestDb,
    snapshots: SnapshotKind,
    faults: Option<Value>,
    attempts: u32,
    injector: Option<InjectorSettings>,
    tuning: &Tuning,
) -> World {
    let sim = common::start_sim(7, faults, KEY, SECRET, tuning.latency_ms).await;
    let sample = sim.sample.clone();
    let inv = sim.inventory.clone();
    let store = db.open().await;
    tern::store::load_inventory(store.as_ref(), &inv, tern::domain::Timestamp::now())
        .await
        .unwrap();
    let base = sim.base.clone();
    let mut settings = sim.cloud_settings(KEY, SECRET, snapshots, tuning.job_poll, tuning.request_timeout);
    if let Some(injector) = injector {
        settings.injector = injector;
    }
    if tuning.fixed_offerings {
        let ids: Vec<&str> = sample.fixed_offerings.iter().rev().map(|o| o.id.as_str()).collect();
        settings.service_offering_id = ids.join(",");
    }
    let defs = common::fast_failover_definitions(attempts, tuning.max_delay);
    let cfg = EngineConfig {
        worker_id: "failover-test".into(),
        concurrency: tuning.concurrency,
        lease_ttl: Duration::from_secs(5),
        poll_interval: Duration::from_millis(50),
        shutdown_grace: Duration::from_secs(1),
    };
    let stop = CancellationToken::new();
    let (engine, deps) = common::failover_engine(store.clone(), &settings, defs.path(), cfg, &stop);
    World {
        base,
        http: reqwest::Client::new(),
        stop,
        sample,
        inv,
        engine,
        store,
        deps,
        _defs: defs,
        _sim: sim,
    }
}

impl World {
    fn vm(&self, os: &str) -> &tern::domain::inventory::VmRecord {
        self.inv
            .vms
            .iter()
            .find(|v| v.os_type == os)
            .expect("sample VM of that OS")
    }

    async fn submit(&self, def: &str, input: Value) -> RunId {
        let s = self
            .engine
            .submit(SubmitRequest {
                definition: def.into(),
                input,
                request_id: None,
                correlation_id: None,
                by: None,
            })
            .await
            .unwrap();
        s.run.id
    }

    async fn finish(&self, run: RunId) -> tern::store::RunRow {
        let row = self.engine.wait_terminal(run, Duration::from_secs(60)).await.unwrap();
        assert!(row.status.is_terminal(), "run {run} stuck: {:?}", row.state);
        row
    }

    /// A test failover of `vm` held until told (no timer): its run, the run as it holds, and
    /// the test VM.
    async fn held_test(&self, vm: &tern::domain::inventory::VmRecord) -> (RunId, tern::store::RunRow, String) {
        let until_told = json!({"auto_cleanup": false, "test_duration": "1h"});
        let run = self.submit("test-failover", input(vm, until_told)).await;
        self.wait_status(run, RunStatus::Holding).await;
        let row = self.store.get_run(run).await.unwrap().unwrap();
        let test_vm = common::created_vm(&row, "test-vm-creation");
        (run, row, test_vm)
    }

    async fn wait_status(&self, run: RunId, status: RunStatus) {
        for _ in 0..1000 {
            let row = self.store.get_run(run).await.unwrap().unwrap();
            if row.status == status {
                return;
            }
            assert!(!row.status.is_terminal(), "run {run} ended early: {:?}", row.state);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("run {run} never reached {status:?}");
    }

    async fn get(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn post(&self, path: &str) {
        let r = self.http.post(format!("{}{path}", self.base)).send().await.unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }

    /// Every replicated volume on exactly one (expected) VM and nothing Tern named left over.
    async fn assert_clean(&self, expect_vm: &str) {
        let inv = self
            .get(&format!("/sim/invariant?prefix=tern-&expect_vm={expect_vm}"))
            .await;
        assert_eq!(inv["ok"], json!(true), "safety invariant: {inv:#}");
    }

    async fn generation(&self, volume: &str) -> (u64, bool) {
        let v = self.get(&format!("/sim/volumes/{volume}")).await;
        let c = &v["content"];
        (
            c["generation"].as_u64().expect("generation"),
            c["virtio_injected"].as_bool().unwrap_or(false),
        )
    }
}

fn input(vm: &tern::domain::inventory::VmRecord, extra: Value) -> Value {
    let mut v = json!({"vm_id": vm.vm_id, "vm_name": vm.name});
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in e {
            o.insert(k.clone(), x.clone());
        }
    }
    v
}

fn error_code(row: &tern::store::RunRow) -> String {
    match &row.state {
        RunState::Failed { error, .. } | RunState::NeedsOperator { error, .. } => error.code.clone(),
        other => format!("{other:?}"),
    }
}

async fn test_failover_with_auto_cleanup_puts_everything_back(db: TestDb) {
    let w = world(&db, SnapshotKind::CloudstackVolume, None).await;
    let vm = w.vm("linux").clone();
    let before = w.generation(&vm.boot_disk.volume_id).await;
    let run = w
        .submit(
            "test-failover",
            input(&vm, json!({"auto_cleanup": true, "test_duration": "1s"})),
        )
        .await;
    w.wait_status(run, RunStatus::Holding).await;
    // While the test VM runs, the volume is its ROOT disk and people write to it.
    let vol = w.get(&format!("/sim/volumes/{}", vm.boot_disk.volume_id)).await;
    assert!(vol.is_object());
    let state = w.get("/sim/state").await;
    let job = w.store.failover_job(run).await.unwrap().unwrap();
    let test_vm = job.destination_vm_id.clone().expect("destination VM recorded");
    assert_eq!(job.status, "testing");
    assert!(job
        .linstor_snapshot_name
        .as_deref()
        .is_some_and(|n| n.starts_with("tern-")));
    let vols = state["volumes"].to_string();
    assert!(vols.contains(&test_vm), "volume attached to the test VM");
    w.post(&format!("/sim/volumes/{}/write", vm.boot_disk.volume_id)).await;
    let row = w.finish(run).await;
    assert_eq!(row.status, RunStatus::Completed, "{:?}", row.state);
    w.assert_clean(&vm.oma_vm_id).await;
    assert_eq!(
        w.generation(&vm.boot_disk.volume_id).await,
        before,
        "the revert undid the test's writes"
    );
    let job = w.store.failover_job(run).await.unwrap().unwrap();
    assert_eq!(job.status, "completed");
    let tracking = w.store.job_tracking(run).await.unwrap();
    for step in [
        "validation",
        "snapshot",
        "virtio-injection",
        "test-vm-creation",
        "volume-attachment",
        "test-vm-startup",
    ] {
        assert!(
            tracking.iter().any(|t| t.operation == step && t.status == "completed"),
            "{step}: {tracking:?}"
        );
    }
    assert!(tracking
        .iter()
        .any(|t| t.operation == "teardown:delete-snapshot" && t.status == "completed"));
}

async fn a_windows_test_failover_injects_drivers_and_the_revert_removes_them(db: TestDb) {
    let w = world(&db, SnapshotKind::Linstor, None).await;
    let vm = w.vm("windows").clone();
    let run = w.submit("test-failover", input(&vm, json!({}))).await;
    w.wait_status(run, RunStatus::Holding).await;
    assert!(
        w.generation(&vm.boot_disk.volume_id).await.1,
        "drivers injected while the test runs"
    );
    let row = w.store.get_run(run).await.unwrap().unwrap();
    assert_eq!(row.context.output("virtio-injection")["injected"], json!(true));
    assert_eq!(
        w.engine.signal(run, "end-test").await.unwrap(),
        tern::store::SignalOutcome::Accepted
    );
    assert_eq!(w.finish(run).await.status, RunStatus::Completed);
    assert!(
        !w.generation(&vm.boot_disk.volume_id).await.1,
        "the LINSTOR rollback removed the drivers"
    );
    w.assert_clean(&vm.oma_vm_id).await;
}

async fn a_live_failover_moves_the_volume_for_good(db: TestDb) {
    let w = world(&db, SnapshotKind::CloudstackVolume, None).await;
    let vm = w.vm("linux").clone();
    let run = w.submit("live-failover", input(&vm, json!({"job_type": "live"}))).await;
    let row = w.finish(run).await;
    assert_eq!(row.status, RunStatus::Completed, "{:?}", row.state);
    let new_vm = common::created_vm(&row, "vm-creation");
    let inv = w
        .get(&format!("/sim/invariant?expect_vm={new_vm}&prefix=tern-t-"))
        .await;
    let mine = common::volume_check(&inv, &vm.boot_disk.volume_id);
    assert_eq!(mine["attached_to"], json!(new_vm));
    assert_eq!(
        mine["device_id"],
        json!(0),
        "the replicated disk is the new VM's ROOT disk"
    );
    let all = w.get("/sim/invariant?prefix=tern-").await;
    assert!(
        all["leaked_snapshots"].as_array().unwrap().is_empty(),
        "the protective snapshot is removed: {all}"
    );
    let state = w.get("/sim/state").await;
    assert!(state.to_string().contains(&w.sample.production_network_id));
}

async fn an_end_test_signal_ends_the_hold(db: TestDb) {
    let w = world(&db, SnapshotKind::CloudstackVolume, None).await;
    let vm = w.vm("linux").clone();
    let run = w
        .submit(
            "test-failover",
            input(&vm, json!({"auto_cleanup": false, "test_duration": "1h"})),
        )
        .await;
    w.wait_status(run, RunStatus::Holding).await;
    assert_eq!(
        w.store.get_run(run).await.unwrap().unwrap().wake_at,
        None,
        "no auto-cleanup: no timer"
    );
    w.engine.signal(run, "end-test").await.unwrap();
    assert_eq!(w.finish(run).await.status, RunStatus::Completed);
    w.assert_clean(&vm.oma_vm_id).await;
}

async fn cancel_during_the_hold_rolls_everything_back(db: TestDb) {
    let w = world(&db, SnapshotKind::CloudstackVolume, None).await;
    let vm = w.vm("windows").clone();
    let before = w.generation(&vm.boot_disk.volume_id).await;
    let run = w
        .submit(
            "test-failover",
            input(&vm, json!({"auto_cleanup": true, "test_duration": "1h"})),
        )
        .await;
    w.wait_status(run, RunStatus::Holding).await;
    w.engine.cancel(run, "operator").await.unwrap();
    let row = w.finish(run).await;
    assert_eq!(row.status, RunStatus::Cancelled, "{:?}", row.state);
    w.assert_clean(&vm.oma_vm_id).await;
    assert_eq!(
        w.generation(&vm.boot_disk.volume_id).await,
        before,
        "driver injection reverted"
    );
}

/// A failure injected at each step; the rollback must leave the world as it was.
async fn failure_at(db: TestDb, os: &str, faults: Option<Value>, extra: Value, code: &str, failed_step: &str) {
    let w = world(&db, SnapshotKind::CloudstackVolume, faults).await;
    let vm = w.vm(os).clone();
    let before = w.generation(&vm.boot_disk.volume_id).await;
    let run = w.submit("test-failover", input(&vm, extra)).await;
    let row = w.finish(run).await;
    assert_eq!(row.status, RunStatus::Failed, "{:?}", row.state);
    assert_eq!(error_code(&row), code);
    match &row.state {
        RunState::Failed { step, .. } => assert_eq!(step, failed_step),
        other => panic!("{other:?}"),
    }
    w.assert_clean(&vm.oma_vm_id).await;
    assert_eq!(
        w.generation(&vm.boot_disk.volume_id).await,
        before,
        "disk unchanged after rollback"
    );
}

async fn failure_at_validation(db: TestDb) {
    // A second failover of a VM that is already failing over is refused at submit (the
    // database allows one unfinished failover per VM); a VM that never synced fails validation.
    let w = world(&db, SnapshotKind::CloudstackVolume, None).await;
    let vm = w.vm("linux").clone();
    let first = w
        .submit(
            "test-failover",
            input(&vm, json!({"test_duration": "1h", "auto_cleanup": true})),
        )
        .await;
    w.wait_status(first, RunStatus::Holding).await;
    let busy = w
        .engine
        .submit(SubmitRequest {
            definition: "test-failover".into(),
            input: input(&vm, json!({})),
            request_id: None,
            correlation_id: None,
            by: None,
        })
        .await;
    assert!(
        matches!(&busy, Err(tern::engine::EngineError::Busy { value, .. }) if value == &vm.vm_id),
        "{busy:?}"
    );
    w.engine.cancel(first, "done").await.unwrap();
    assert_eq!(w.finish(first).await.status, RunStatus::Cancelled);

    let mut unsynced = vm.clone();
    unsynced.last_sync_change_id = None;
    w.store
        .upsert_vm_record(&unsynced, tern::domain::Timestamp::now())
        .await
        .unwrap();
    let second = w.submit("test-failover", input(&vm, json!({}))).await;
    let row = w.finish(second).await;
    assert_eq!(row.status, RunStatus::Failed);
    assert_eq!(error_code(&row), "VALIDATION_FAILED");
    let progress = &row.context.progress_of("validation")["report"];
    assert_eq!(
        progress["is_ready"],
        json!(false),
        "the report is stored with the run: {progress}"
    );
    w.assert_clean(&vm.oma_vm_id).await;
}

async fn failure_at_snapshot(db: TestDb) {
    let f = json!({"commands": {"createSnapshot": {"error_rate": 1.0}}});
    failure_at(db, "linux", Some(f), json!({}), "SNAPSHOT_FAILED", "snapshot").await
}

async fn failure_at_test_vm_creation(db: TestDb) {
    let f = json!({"commands": {"deployVirtualMachine": {"job_failure_rate": 1.0}}});
    failure_at(
        db,
        "windows",
        Some(f),
        json!({}),
        "VM_CREATE_FAILED",
        "test-vm-creation",
    )
    .await
}

async fn failure_at_volume_attachment(db: TestDb) {
    // The three attempts to attach the volume as the test VM's ROOT disk fail (attachVolume
    // requests 0-2); the rollback's attach back to the OMA (request 3) goes through.
    let f = json!({"scripted": {"attachVolume": {"0": "job_failure", "1": "job_failure", "2": "job_failure"}}});
    failure_at(
        db,
        "windows",
        Some(f),
        json!({}),
        "VOLUME_ATTACH_FAILED",
        "volume-attachment",
    )
    .await
}

async fn a_volume_that_cannot_be_deleted_needs_an_operator(db: TestDb) {
    // The test VM's own ROOT disk can never be deleted: the attach step fails, and its undo
    // cannot finish the deletion either. The run ends needing an operator, naming what is left,
    // and the replicated volume is still safely back on the OMA.
    let w = world(
        &db,
        SnapshotKind::CloudstackVolume,
        Some(json!({"commands": {"deleteVolume": {"error_rate": 1.0}}})),
    )
    .await;
    let vm = w.vm("linux").clone();
    let run = w.submit("test-failover", input(&vm, json!({}))).await;
    let row = w.finish(run).await;
    match &row.state {
        RunState::NeedsOperator { step, undone, .. } => {
            assert_eq!(step, "volume-attachment");
            assert_eq!(undone.first().map(String::as_str), Some("volume-attachment"));
        }
        other => panic!("{other:?}"),
    }
    let inv = w.get(&format!("/sim/invariant?expect_vm={}", vm.oma_vm_id)).await;
    let mine = common::volume_check(&inv, &vm.boot_disk.volume_id);
    assert_eq!(mine["ok"], json!(true), "{inv}");
    // `tern recover` spells out the manual recovery from what the run recorded.
    let job = w.store.failover_job(run).await.unwrap().unwrap();
    let text = tern::steps::failover::recover::plan(&row, Some(&vm), job.linstor_snapshot_name.as_deref(), None);
    for needle in [
        format!("cmk detach volume id={}", vm.boot_disk.volume_id),
        format!(
            "cmk attach volume id={} virtualmachineid={}",
            vm.boot_disk.volume_id, vm.oma_vm_id
        ),
        "not undone: volume-attachment".to_string(),
        "snapshot       tern-".to_string(),
    ] {
        assert!(text.contains(&needle), "missing {needle:?} in:\n{text}");
    }
}

async fn failure_at_test_vm_startup(db: TestDb) {
    let f = json!({"commands": {"startVirtualMachine": {"job_failure_rate": 1.0}}});
    failure_at(db, "windows", Some(f), json!({}), "VM_START_FAILED", "test-vm-startup").await
}

async fn an_unknown_vm_fails_with_vm_not_found(db: TestDb) {
    let w = world(&db, SnapshotKind::CloudstackVolume, None).await;
    let run = w.submit("test-failover", json!({"vm_id": "no-such-vm"})).await;
    let row = w.finish(run).await;
    assert_eq!(row.status, RunStatus::Failed);
    assert_eq!(error_code(&row), "VM_NOT_FOUND");
}

async fn lost_replies_and_flaky_calls_are_adopted_not_repeated(db: TestDb) {
    // Every deploy and attach "succeeds but the reply is lost" half the time, and calls fail
    // at random: the steps must look up and adopt instead of creating twice.
    let f = json!({"commands": {
        "deployVirtualMachine": {"lost_reply_rate": 0.5},
        "attachVolume": {"lost_reply_rate": 0.3},
        "detachVolume": {"lost_reply_rate": 0.3, "error_rate": 0.2},
        "createSnapshot": {"lost_reply_rate": 0.5},
        "startVirtualMachine": {"error_rate": 0.3}
    }});
    // A realistic retry budget (production has 6 attempts with backoff up to a minute).
    let w = world_with(&db, SnapshotKind::CloudstackVolume, Some(f), 10).await;
    for vm in w.inv.vms.clone() {
        let run = w
            .submit(
                "test-failover",
                input(&vm, json!({"auto_cleanup": true, "test_duration": "10ms"})),
            )
            .await;
        let row = w.finish(run).await;
        // With lost replies adopted, runs complete or roll back cleanly; never leak.
        assert!(
            matches!(row.status, RunStatus::Completed | RunStatus::Failed),
            "{:?}",
            row.state
        );
    }
    w.assert_clean(&w.sample.oma_vm_id).await;
}

async fn failure_at_virtio_injection(db: TestDb) {
    // The real command injector runs a tool that fails (exit 3): the rollback reverts the disk
    // from the snapshot (injection may have written to it) and puts everything back.
    let devices = tempfile::tempdir().unwrap();
    let vm = tern::sim::sample_inventory(7)
        .to_inventory()
        .vms
        .into_iter()
        .find(|v| v.os_type == "windows")
        .unwrap();
    let serial = tern::providers::virtio::serial_for(&vm.boot_disk.volume_id).unwrap();
    std::fs::write(devices.path().join(format!("virtio-{serial}")), b"").unwrap();
    let injector = InjectorSettings::Command(tern::providers::virtio::CommandInjectorConfig {
        inject_command: vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo converting {device}; echo viostor missing >&2; exit 3".into(),
        ],
        device_pattern: format!("{}/*{{serial}}", devices.path().display()),
        ..Default::default()
    });
    let w = world_full(&db, SnapshotKind::CloudstackVolume, None, 3, Some(injector)).await;
    let before = w.generation(&vm.boot_disk.volume_id).await;
    let run = w.submit("test-failover", input(&vm, json!({}))).await;
    let row = w.finish(run).await;
    assert_eq!(row.status, RunStatus::Failed, "{:?}", row.state);
    assert_eq!(error_code(&row), "VIRTIO_FAILED");
    match &row.state {
        RunState::Failed { step, error } => {
            assert_eq!(step, "virtio-injection");
            assert!(
                error.message.contains("viostor missing"),
                "stderr kept: {}",
                error.message
            );
        }
        other => panic!("{other:?}"),
    }
    w.assert_clean(&vm.oma_vm_id).await;
    assert_eq!(w.generation(&vm.boot_disk.volume_id).await, before);
}

async fn a_live_failover_that_cannot_start_rolls_back(db: TestDb) {
    let f = json!({"commands": {"startVirtualMachine": {"job_failure_rate": 1.0}}});
    let w = world(&db, SnapshotKind::Linstor, Some(f)).await;
    let vm = w.vm("windows").clone();
    let before = w.generation(&vm.boot_disk.volume_id).await;
    let run = w.submit("live-failover", input(&vm, json!({"job_type": "live"}))).await;
    let row = w.finish(run).await;
    assert_eq!(row.status, RunStatus::Failed, "{:?}", row.state);
    assert_eq!(error_code(&row), "VM_START_FAILED");
    w.assert_clean(&vm.oma_vm_id).await;
    assert_eq!(
        w.generation(&vm.boot_disk.volume_id).await,
        before,
        "drivers injected for the live VM were reverted"
    );
}

crate::on_both_backends!(
    test_failover_with_auto_cleanup_puts_everything_back,
    cancel_during_the_hold_rolls_everything_back
);

crate::on_sqlite!(
    a_windows_test_failover_injects_drivers_and_the_revert_removes_them,
    a_live_failover_moves_the_volume_for_good,
    an_end_test_signal_ends_the_hold,
    failure_at_validation,
    failure_at_snapshot,
    failure_at_test_vm_creation,
    failure_at_volume_attachment,
    failure_at_test_vm_startup,
    failure_at_virtio_injection,
    a_live_failover_that_cannot_start_rolls_back,
    a_volume_that_cannot_be_deleted_needs_an_operator,
    an_unknown_vm_fails_with_vm_not_found,
    lost_replies_and_flaky_calls_are_adopted_not_repeated,
);
