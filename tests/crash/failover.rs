//! The failover crash campaign: `tern worker` processes drive test and live failovers against
//! the CloudStack/LINSTOR simulator (real HTTP) while the simulator injects seeded faults (lost
//! replies, errors, hangs past the client's timeout, failed jobs) and the workers are SIGKILLed,
//! at random moments and at crash points inside CloudStack jobs. Afterwards: every run is
//! terminal, every replicated volume is attached to exactly the VM it should be, nothing the
//! runs created is left over, and no VM or snapshot was ever created twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tern::domain::run::{Record, RunStatus};
use tern::domain::RunId;
use tern::engine::{Engine, EngineConfig, SubmitRequest};
use tern::store::Store;

use super::{delays, logs_in, terminate_in, worker_in};
use crate::common::{self, TestDb};

pub(crate) struct Campaign {
    pub(crate) base: String,
    _sim: common::Sim,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) engine: Arc<Engine>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) logs: tempfile::TempDir,
    _defs: tempfile::TempDir,
    pub(crate) inv: tern::domain::inventory::InventoryFile,
    pub(crate) oma: String,
    pub(crate) runs: Vec<(RunId, String, bool)>, // (run, vm_id, live)
}

fn faults() -> Value {
    json!({
        "hang_ms": 1500,
        "commands": {
            "deployVirtualMachine": {"lost_reply_rate": 0.15, "job_failure_rate": 0.05},
            "attachVolume": {"lost_reply_rate": 0.15, "error_rate": 0.05},
            "detachVolume": {"lost_reply_rate": 0.1, "error_rate": 0.05, "hang_rate": 0.03},
            "createSnapshot": {"lost_reply_rate": 0.2},
            "revertSnapshot": {"error_rate": 0.1},
            "deleteSnapshot": {"lost_reply_rate": 0.1},
            "startVirtualMachine": {"error_rate": 0.1},
            "stopVirtualMachine": {"lost_reply_rate": 0.1},
            "destroyVirtualMachine": {"lost_reply_rate": 0.1},
            "listVolumes": {"error_rate": 0.03}
        }
    })
}

pub(crate) async fn campaign(db: &TestDb, faults: Option<Value>) -> Campaign {
    let sim = common::start_sim(11, faults, "k", "s", 30).await;
    let sample = sim.sample.clone();
    let inv = sim.inventory.clone();
    let store = db.open().await;
    tern::store::load_inventory(store.as_ref(), &inv, tern::domain::Timestamp::now())
        .await
        .unwrap();
    // Fast retries with a realistic budget, so faults cost milliseconds, not minutes.
    let defs = common::fast_failover_definitions(12, "200ms");
    let base = sim.base.clone();
    let env = common::failover_env(&base, &sample, defs.path());
    // The test process only submits (through an engine with the same definitions).
    let engine = Engine::with_registry(
        store.clone(),
        Some(defs.path()),
        tern::steps::builtins(store.clone()),
        EngineConfig::default(),
    )
    .unwrap();
    Campaign {
        base,
        _sim: sim,
        store,
        engine,
        env,
        logs: tempfile::tempdir().unwrap(),
        _defs: defs,
        oma: sample.oma_vm_id.clone(),
        inv,
        runs: vec![],
    }
}

impl Campaign {
    pub(crate) async fn submit(&mut self, vm: usize, live: bool) {
        let v = &self.inv.vms[vm];
        let (def, input) = if live {
            (
                "live-failover",
                json!({"vm_id": v.vm_id, "vm_name": v.name, "job_type": "live"}),
            )
        } else {
            (
                "test-failover",
                json!({"vm_id": v.vm_id, "vm_name": v.name, "auto_cleanup": true, "test_duration": "200ms"}),
            )
        };
        self.submit_input(vm, def, input, live).await;
    }

    /// A test failover of sample VM `vm` that holds until told.
    pub(crate) async fn submit_held(&mut self, vm: usize) -> RunId {
        let v = &self.inv.vms[vm];
        let input = json!({"vm_id": v.vm_id, "vm_name": v.name});
        self.submit_input(vm, "test-failover", input, false).await
    }

    async fn submit_input(&mut self, vm: usize, def: &str, input: Value, live: bool) -> RunId {
        let id = self
            .engine
            .submit(SubmitRequest {
                definition: def.into(),
                input,
                request_id: None,
                correlation_id: None,
                by: None,
            })
            .await
            .unwrap()
            .run
            .id;
        self.runs.push((id, self.inv.vms[vm].vm_id.clone(), live));
        id
    }

    async fn all_terminal(&self) -> bool {
        for (id, _, _) in &self.runs {
            if !self.store.get_run(*id).await.unwrap().unwrap().status.is_terminal() {
                return false;
            }
        }
        true
    }

    /// Workers started and SIGKILLed at seeded random moments, one after another.
    async fn kill_randomly(&self, db: &TestDb, seed: u64, kills: usize) {
        for (i, ms) in delays(seed, kills).into_iter().enumerate() {
            let name = format!("victim-{seed}-{i}");
            let mut child = worker_in(db, self.logs.path(), &name, None, &self.env);
            tokio::time::sleep(Duration::from_millis(ms * 2)).await;
            child.kill().await.unwrap();
            if i % 3 == 2 {
                tokio::time::sleep(Duration::from_millis(1100)).await; // leases lapse
            }
        }
    }

    /// A worker that kills itself at `point`; returns whether it did (the runs may all finish first).
    async fn kill_at(&self, db: &TestDb, point: &str) -> bool {
        let name = format!("doomed-{}", point.replace(':', "-"));
        let mut child = worker_in(db, self.logs.path(), &name, Some(point), &self.env);
        self.until_killed_or(&mut child, point, true).await
    }

    pub(crate) async fn finish(&self, db: &TestDb) {
        let heir = worker_in(db, self.logs.path(), "heir", None, &self.env);
        for _ in 0..1800 {
            if self.all_terminal().await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            self.all_terminal().await,
            "runs not terminal after 90 s\n{}",
            logs_in(self.logs.path())
        );
        terminate_in(self.logs.path(), heir, "heir").await;
    }

    async fn check(&self) {
        let state: Value = self.sim_get("/sim/state").await;
        let created: BTreeMap<String, u64> = serde_json::from_value(state["created"].clone()).unwrap();
        for (name, n) in &created {
            assert_eq!(*n, 1, "{name} was created {n} times");
        }
        for (id, vm_id, live) in &self.runs {
            let row = self.store.get_run(*id).await.unwrap().unwrap();
            assert!(
                matches!(row.status, RunStatus::Completed | RunStatus::Failed),
                "run {id} ({}) ended {:?}\n{}",
                if *live { "live" } else { "test" },
                row.state,
                logs_in(self.logs.path())
            );
            let j = self.store.journal(*id, 0, 100_000).await.unwrap();
            let seqs: Vec<i64> = j.iter().map(|e| e.seq).collect();
            assert_eq!(seqs, (1..=j.len() as i64).collect::<Vec<_>>(), "run {id}: journal gaps");
            assert!(j.iter().filter(|e| e.record.kind() == "timer_fired").count() <= 1);
            // Only the last run on a VM decides where its volume must be now.
            let last = self.runs.iter().rev().find(|(_, v, _)| v == vm_id).map(|(r, _, _)| *r);
            if last != Some(*id) {
                continue;
            }
            let vm = self.inv.vms.iter().find(|v| &v.vm_id == vm_id).unwrap();
            let expect = match (live, row.status) {
                (true, RunStatus::Completed) => common::created_vm(&row, "vm-creation"),
                _ => self.oma.clone(),
            };
            let inv: Value = self.sim_get(&format!("/sim/invariant?expect_vm={expect}")).await;
            for disk in vm.all_disks() {
                let mine = common::volume_check(&inv, &disk.volume_id);
                assert_eq!(mine["ok"], json!(true), "run {id}: volume {}: {mine}", disk.volume_id);
            }
        }
        let inv: Value = self.sim_get("/sim/invariant?prefix=tern-t-").await;
        assert!(inv["leaked_vms"].as_array().unwrap().is_empty(), "test VMs left: {inv}");
        let snaps: Value = self.sim_get("/sim/invariant?prefix=tern-").await;
        for key in ["leaked_snapshots", "leaked_vm_snapshots", "leaked_linstor_snapshots"] {
            assert!(snaps[key].as_array().unwrap().is_empty(), "{key}: {snaps}");
        }
    }
}

async fn failovers_survive_faults_and_kills(backend: &str) {
    let Some(db) = common::db(backend) else { return };
    let mut c = campaign(&db, Some(faults())).await;
    // Round 1: a test failover of every sample VM at once, workers killed at random.
    for vm in 0..3 {
        c.submit(vm, false).await;
    }
    c.kill_randomly(&db, 0xfa11, 6).await;
    c.finish(&db).await;
    // Round 2: two more test failovers and a live failover, with kills right after a
    // CloudStack job id was checkpointed, right after a job finished, and after progress.
    c.submit(0, false).await;
    c.submit(1, false).await;
    c.submit(2, true).await;
    let mut killed = 0;
    for point in [
        "failover_job_recorded:3",
        "failover_job_finished:4",
        "after:step_progress:6",
        "failover_job_recorded:2",
    ] {
        killed += usize::from(c.kill_at(&db, point).await);
    }
    assert!(killed >= 2, "only {killed} targeted kills happened");
    c.finish(&db).await;
    c.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failovers_survive_faults_and_kills_sqlite() {
    failovers_survive_faults_and_kills("sqlite").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failovers_survive_faults_and_kills_postgres() {
    failovers_survive_faults_and_kills("postgres").await
}

impl Campaign {
    fn cloud(&self) -> tern::providers::cloudstack::CloudStackClient {
        let cfg = tern::providers::cloudstack::CloudStackConfig::new(format!("{}/client/api", self.base), "k", "s");
        tern::providers::cloudstack::CloudStackClient::new(cfg).unwrap()
    }

    async fn wait_status(&self, run: RunId, status: RunStatus) {
        for _ in 0..1200 {
            if self.store.get_run(run).await.unwrap().unwrap().status == status {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("run {run} never reached {status:?}\n{}", logs_in(self.logs.path()));
    }

    /// Waits for a worker that must die at its crash point.
    async fn until_killed(&self, child: &mut tokio::process::Child, point: &str) {
        self.until_killed_or(child, point, false).await;
    }

    /// Waits for `child` to be SIGKILLed at `point`; with `may_pass`, runs that all end first
    /// stop the wait (the worker is killed) and it returns false.
    async fn until_killed_or(&self, child: &mut tokio::process::Child, point: &str, may_pass: bool) -> bool {
        for _ in 0..1200 {
            if let Some(status) = child.try_wait().unwrap() {
                use std::os::unix::process::ExitStatusExt;
                assert_eq!(
                    status.signal(),
                    Some(libc::SIGKILL),
                    "{point}: {status:?}\n{}",
                    logs_in(self.logs.path())
                );
                return true;
            }
            if may_pass && self.all_terminal().await {
                child.kill().await.unwrap();
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("crash point {point} was never reached\n{}", logs_in(self.logs.path()));
    }

    /// Where the simulator says `volume` is, and its device slot.
    async fn volume_at(&self, volume: &str) -> (Option<String>, Option<u32>) {
        use tern::providers::Cloud;
        let v = self.cloud().get_volume(volume).await.unwrap();
        (v.vm_id, v.device_id)
    }
}

fn windows_vm(c: &Campaign) -> usize {
    c.inv
        .vms
        .iter()
        .position(|v| v.is_windows())
        .expect("a Windows sample VM")
}

/// Issue 16, failure 1: a cancel's revert on the running OMA (detach, revert, reattach) killed
/// after its reattach job finished but before the job was cleared from its progress. The next
/// attempt detaches again and reverts; it must then attach the volume again, not take the
/// earlier attempt's finished job as its own result. Before the fix the run ended `cancelled`
/// with the volume on no VM.
async fn a_revert_killed_after_its_reattach_puts_the_disk_back_on_the_oma(backend: &str) {
    let Some(db) = common::db(backend) else { return };
    let mut c = campaign(&db, None).await;
    let vm = windows_vm(&c);
    let volume = c.inv.vms[vm].boot_disk.volume_id.clone();
    let run = c.submit_held(vm).await;
    let point = "job_finished/reattach_after_revert";
    let mut doomed = worker_in(&db, c.logs.path(), "doomed", Some(point), &c.env);
    c.wait_status(run, RunStatus::Holding).await;
    c.engine.cancel(run, "fault drill").await.unwrap();
    c.until_killed(&mut doomed, point).await;
    c.finish(&db).await;
    let row = c.store.get_run(run).await.unwrap().unwrap();
    assert_eq!(
        row.status,
        RunStatus::Cancelled,
        "{:?}\n{}",
        row.state,
        logs_in(c.logs.path())
    );
    assert_eq!(c.volume_at(&volume).await.0.as_deref(), Some(c.oma.as_str()));
    c.check_cleanup().await;
}

/// Issue 16, failure 2: the slot a revert recorded on the OMA is taken (another disk given back
/// to the OMA while this one was off it) before the revert reattaches. The one slot policy
/// attaches it in CloudStack's slot instead; before the fix the reattach failed "431 Device id
/// N is in use" on every attempt and the run ended `needs_operator` with the volume detached.
async fn a_taken_oma_slot_does_not_strand_the_disk(backend: &str) {
    use tern::providers::{AsyncCommand, Cloud};
    let Some(db) = common::db(backend) else { return };
    let mut c = campaign(&db, None).await;
    let vm = windows_vm(&c);
    let volume = c.inv.vms[vm].boot_disk.volume_id.clone();
    let other = c
        .inv
        .vms
        .iter()
        .find(|v| v.boot_disk.volume_id != volume)
        .unwrap()
        .boot_disk
        .volume_id
        .clone();
    let run = c.submit_held(vm).await;
    let point = "job_finished/detach_for_revert";
    let mut doomed = worker_in(&db, c.logs.path(), "doomed", Some(point), &c.env);
    c.wait_status(run, RunStatus::Holding).await;
    c.engine.cancel(run, "fault drill").await.unwrap();
    c.until_killed(&mut doomed, point).await;
    // The revert recorded the slot the volume had on the OMA; another disk takes it now.
    let progress = c.store.journal(run, 0, 100_000).await.unwrap();
    let slot = progress
        .iter()
        .rev()
        .find_map(|e| match &e.record {
            Record::CompensationProgress { data, .. } => data["restore_to"]["device_id"].as_u64(),
            _ => None,
        })
        .expect("the revert recorded where the volume goes back") as u32;
    assert_eq!(c.volume_at(&volume).await.0, None, "the revert detached the volume");
    let cloud = c.cloud();
    let move_to = |device_id| AsyncCommand::AttachVolume {
        volume_id: other.clone(),
        vm_id: c.oma.clone(),
        device_id,
    };
    let detach = cloud
        .issue(AsyncCommand::DetachVolume {
            volume_id: other.clone(),
        })
        .await
        .unwrap();
    cloud
        .wait_job(&detach.job_id, Duration::from_millis(10), Duration::from_secs(10))
        .await
        .unwrap();
    let attach = cloud.issue(move_to(Some(slot))).await.unwrap();
    cloud
        .wait_job(&attach.job_id, Duration::from_millis(10), Duration::from_secs(10))
        .await
        .unwrap();
    c.finish(&db).await;
    let row = c.store.get_run(run).await.unwrap().unwrap();
    assert_eq!(
        row.status,
        RunStatus::Cancelled,
        "{:?}\n{}",
        row.state,
        logs_in(c.logs.path())
    );
    let (on, device) = c.volume_at(&volume).await;
    assert_eq!(on.as_deref(), Some(c.oma.as_str()));
    assert_ne!(device, Some(slot), "the taken slot was not given twice");
    assert_eq!(c.volume_at(&other).await, (Some(c.oma.clone()), Some(slot)));
    c.check_cleanup().await;
}

/// Issue 18: the cloudstack-vm backend snapshots the test VM once its disks are on it. A
/// worker killed between that VM snapshot and the start (right before the start request)
/// leaves a stopped test VM with its VM snapshot; the next worker starts it without taking
/// another, and the teardown reverts the test's writes and gives every disk back.
async fn a_kill_between_the_vm_snapshot_and_the_start_resumes(backend: &str) {
    let Some(db) = common::db(backend) else { return };
    let mut c = campaign(&db, None).await;
    let base = c.base.clone();
    c.env.push(("TERN_SNAPSHOT_BACKEND".into(), "cloudstack-vm".into()));
    c.env.push(("TERN_LINSTOR_URL".into(), base));
    let vm = windows_vm(&c);
    let disks: Vec<String> = c.inv.vms[vm].all_disks().map(|d| d.volume_id.clone()).collect();
    let run = c.submit_held(vm).await;
    let point = "cloud_call/startVirtualMachine";
    let mut doomed = worker_in(&db, c.logs.path(), "doomed", Some(point), &c.env);
    c.until_killed(&mut doomed, point).await;
    let state = c.sim_get("/sim/state").await;
    let row = c.store.get_run(run).await.unwrap().unwrap();
    let test_vm = common::created_vm(&row, "test-vm-creation");
    assert_eq!(row.context.output("vm-snapshot")["target"], json!(test_vm));
    assert_eq!(state["vms"][&test_vm]["state"], json!("Stopped"));
    let snaps: Vec<&Value> = state["vm_snapshots"].as_object().unwrap().values().collect();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0]["vm_id"], json!(test_vm));
    let before: Vec<Value> = disks.iter().map(|d| state["volumes"][d]["content"].clone()).collect();

    let resumer = worker_in(&db, c.logs.path(), "resumer", None, &c.env);
    c.wait_status(run, RunStatus::Holding).await;
    let http = reqwest::Client::new();
    for d in &disks {
        let r = http
            .post(format!("{}/sim/volumes/{d}/write", c.base))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    c.engine.signal(run, "end-test").await.unwrap();
    c.finish(&db).await;
    terminate_in(c.logs.path(), resumer, "resumer").await;
    let row = c.store.get_run(run).await.unwrap().unwrap();
    assert_eq!(
        row.status,
        RunStatus::Completed,
        "{:?}\n{}",
        row.state,
        logs_in(c.logs.path())
    );
    let state = c.sim_get("/sim/state").await;
    let after: Vec<Value> = disks.iter().map(|d| state["volumes"][d]["content"].clone()).collect();
    assert_eq!(after, before, "the teardown reverted what the test VM wrote");
    for d in &disks {
        assert_eq!(c.volume_at(d).await.0.as_deref(), Some(c.oma.as_str()));
    }
    c.check_cleanup().await;
}

impl Campaign {
    async fn sim_get(&self, path: &str) -> Value {
        common::sim_get(&self.base, path).await
    }

    /// The (single) run's volume is on `expect`, no test VM or snapshot is left, and nothing
    /// was created twice; what is wrong otherwise.
    pub(crate) async fn clean(&self, expect: &str) -> Result<(), String> {
        let volumes: Vec<String> = self
            .inv
            .vms
            .iter()
            .find(|v| Some(&v.vm_id) == self.runs.first().map(|r| &r.1))
            .map(|v| v.all_disks().map(|d| d.volume_id.clone()).collect())
            .unwrap_or_default();
        let inv = self
            .sim_get(&format!("/sim/invariant?prefix=tern-t-&expect_vm={expect}"))
            .await;
        for volume in &volumes {
            let mine = common::volume_check(&inv, volume);
            if mine["ok"] != json!(true) {
                return Err(format!("volume {volume}: {mine}"));
            }
        }
        if inv["leaked_vms"].as_array().is_none_or(|a| !a.is_empty()) {
            return Err(format!("test VMs left: {}", inv["leaked_vms"]));
        }
        let snaps = self.sim_get("/sim/invariant?prefix=tern-").await;
        for key in ["leaked_snapshots", "leaked_vm_snapshots", "leaked_linstor_snapshots"] {
            if snaps[key].as_array().is_none_or(|a| !a.is_empty()) {
                return Err(format!("{key}: {}", snaps[key]));
            }
        }
        let state = self.sim_get("/sim/state").await;
        if let Some((name, n)) = state["created"]
            .as_object()
            .and_then(|c| c.iter().find(|(_, n)| n.as_u64() != Some(1)))
        {
            return Err(format!("{name} was created {n} times"));
        }
        Ok(())
    }

    /// Nothing named after the runs is left, and nothing was created twice.
    async fn check_cleanup(&self) {
        let state = self.sim_get("/sim/state").await;
        let created: BTreeMap<String, u64> = serde_json::from_value(state["created"].clone()).unwrap();
        for (name, n) in &created {
            assert_eq!(*n, 1, "{name} was created {n} times");
        }
        let inv = self.sim_get("/sim/invariant?prefix=tern-").await;
        for key in [
            "leaked_vms",
            "leaked_snapshots",
            "leaked_vm_snapshots",
            "leaked_linstor_snapshots",
        ] {
            assert!(inv[key].as_array().unwrap().is_empty(), "{key}: {inv}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_killed_after_its_reattach_puts_the_disk_back_on_the_oma_sqlite() {
    a_revert_killed_after_its_reattach_puts_the_disk_back_on_the_oma("sqlite").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_killed_after_its_reattach_puts_the_disk_back_on_the_oma_postgres() {
    a_revert_killed_after_its_reattach_puts_the_disk_back_on_the_oma("postgres").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_oma_slot_does_not_strand_the_disk_sqlite() {
    a_taken_oma_slot_does_not_strand_the_disk("sqlite").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_oma_slot_does_not_strand_the_disk_postgres() {
    a_taken_oma_slot_does_not_strand_the_disk("postgres").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_the_vm_snapshot_and_the_start_resumes_sqlite() {
    a_kill_between_the_vm_snapshot_and_the_start_resumes("sqlite").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_the_vm_snapshot_and_the_start_resumes_postgres() {
    a_kill_between_the_vm_snapshot_and_the_start_resumes("postgres").await
}
