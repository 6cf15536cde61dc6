//! The randomized fault campaign: three `tern worker` processes on one PostgreSQL drive test and
//! live failovers of the simulator's VMs while, at seeded random moments, workers are SIGKILLed
//! and restarted, PostgreSQL itself is restarted, the simulator injects faults (errors, lost
//! replies, hangs, failed jobs), and runs get a cancel or an end-test. Each VM is a lane: one
//! failover at a time, checked against the cloud as soon as it ends (the volume where the
//! run's end says, nothing it named left over), then the next. At the end nothing was created
//! twice and no run ended `failed` or `needs_operator`: every fault here is transient.
//!
//! Its own test binary, because it restarts the PostgreSQL server the other binaries use (cargo
//! runs test binaries one after another). `TERN_CAMPAIGN_SECS` sets how long failovers are
//! started on each snapshot backend (default 60), `TERN_CAMPAIGN_SEED` the seed. A PostgreSQL restart needs
//! `pg_ctlcluster` (root, as in CI); without it, every connection to the test database is
//! terminated instead, and the figures say so.

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use tern::domain::run::RunStatus;
use tern::domain::RunId;
use tern::engine::{Engine, EngineConfig, SubmitRequest};
use tern::providers::{AsyncCommand, Cloud};
use tern::store::Store;
use tokio::sync::Mutex;

use common::{logs_in, worker_in, TestDb};

const WORKERS: usize = 3;

/// Faults a few percent of the time on every command a failover issues.
/// How long a hung request waits in the simulator before it is acted on.
const HANG_MS: u64 = 1500;

fn faults() -> Value {
    let few = json!({"error_rate": 0.03, "lost_reply_rate": 0.03, "hang_rate": 0.01, "job_failure_rate": 0.02});
    json!({"hang_ms": HANG_MS, "default": few})
}

#[derive(Default)]
struct Figures {
    jobs: AtomicU64,
    test: AtomicU64,
    live: AtomicU64,
    kills: AtomicU64,
    pg_restarts: AtomicU64,
    cancels: AtomicU64,
    end_tests: AtomicU64,
    /// Jobs of the VM with the most disks (the sample's Windows VM: 3 disks, 2 NICs).
    multi_disk: AtomicU64,
}

struct Campaign {
    db: TestDb,
    base: String,
    store: Arc<dyn Store>,
    engine: Arc<Engine>,
    env: Vec<(String, String)>,
    logs: tempfile::TempDir,
    inv: tern::domain::inventory::InventoryFile,
    oma: String,
    cloud: tern::providers::cloudstack::CloudStackClient,
    http: reqwest::Client,
    figures: Figures,
    ends: Mutex<BTreeMap<&'static str, u64>>,
    violations: Mutex<Vec<String>>,
}

/// Retries `f` while PostgreSQL is restarting (the test's own calls are not under test).
async fn patiently<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    f: impl Fn() -> F,
) -> T {
    let mut last = String::new();
    for _ in 0..300 {
        match f().await {
            Ok(v) => return v,
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: {last}");
}

impl Campaign {
    async fn run_row(&self, run: RunId) -> tern::store::RunRow {
        patiently("reading a run", || async { self.store.get_run(run).await })
            .await
            .expect("run exists")
    }

    async fn get(&self, path: &str) -> Value {
        let url = format!("{}{path}", self.base);
        self.http.get(url).send().await.unwrap().json().await.unwrap()
    }

    /// One lane: failovers of one VM, one after another, until `until`.
    async fn lane(&self, vm: usize, seed: u64, until: Instant) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let v = self.inv.vms[vm].clone();
        while Instant::now() < until {
            let live = rng.gen_bool(0.25);
            let (def, input) = if live {
                (
                    "live-failover",
                    json!({"vm_id": v.vm_id, "vm_name": v.name, "job_type": "live"}),
                )
            } else {
                let secs = rng.gen_range(0.2..2.0);
                (
                    "test-failover",
                    json!({"vm_id": v.vm_id, "vm_name": v.name, "auto_cleanup": true, "test_duration": format!("{secs:.1}s")}),
                )
            };
            let submit = || async {
                self.engine
                    .submit(SubmitRequest {
                        definition: def.into(),
                        input: input.clone(),
                        request_id: None,
                        correlation_id: None,
                        by: None,
                    })
                    .await
            };
            let run = patiently("submitting", submit).await.run.id;
            self.figures.jobs.fetch_add(1, Ordering::Relaxed);
            let kind = if live { &self.figures.live } else { &self.figures.test };
            kind.fetch_add(1, Ordering::Relaxed);
            if v.data_disks.len() == 2 && v.nics.len() == 2 {
                self.figures.multi_disk.fetch_add(1, Ordering::Relaxed);
            }
            // Now and then a cancel or an end-test at a random moment of the run.
            let nudge = rng.gen_range(0..10);
            let at = Instant::now() + Duration::from_millis(rng.gen_range(0..3000));
            let mut nudged = false;
            loop {
                let row = self.run_row(run).await;
                if row.status.is_terminal() {
                    break;
                }
                if !nudged && Instant::now() >= at {
                    nudged = true;
                    if nudge < 2 {
                        patiently("cancelling", || self.engine.cancel(run, "campaign")).await;
                        self.figures.cancels.fetch_add(1, Ordering::Relaxed);
                    } else if nudge < 4 && !live {
                        patiently("ending the test", || self.engine.signal(run, "end-test")).await;
                        self.figures.end_tests.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            self.judge(run, live, &v).await;
        }
    }

    /// The run's end against the cloud; a completed live failover is then failed back by hand.
    async fn judge(&self, run: RunId, live: bool, v: &tern::domain::inventory::VmRecord) {
        let row = self.run_row(run).await;
        *self.ends.lock().await.entry(row.status.as_str()).or_insert(0) += 1;
        let mut wrong = Vec::new();
        if !matches!(row.status, RunStatus::Completed | RunStatus::Cancelled) {
            wrong.push(format!("ended {:?}", row.state));
        }
        if row.cancel_pending {
            wrong.push("a finished run keeps a pending cancel".into());
        }
        let destination = row.context.output("vm-creation")["destination_vm_id"]
            .as_str()
            .map(str::to_string);
        let expect = match (live, row.status, &destination) {
            (true, RunStatus::Completed, Some(vm)) => vm.clone(),
            _ => self.oma.clone(),
        };
        for disk in v.all_disks() {
            let vol = patiently("reading the volume", || self.cloud.get_volume(&disk.volume_id)).await;
            if vol.vm_id.as_deref() != Some(expect.as_str()) {
                wrong.push(format!(
                    "volume {} on {:?}, expected {expect}",
                    disk.volume_id, vol.vm_id
                ));
            }
        }
        let tag = tern::steps::failover::run_tag(run);
        let left = self.get("/sim/state").await;
        for (kind, list) in [
            ("VM", "vms"),
            ("snapshot", "snapshots"),
            ("VM snapshot", "vm_snapshots"),
        ] {
            let named: Vec<String> = left[list]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|x| x["name"].as_str())
                        .filter(|n| n.contains(&tag) && !(live && n.starts_with("tern-l-")))
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            let alive: Vec<&String> = named
                .iter()
                .filter(|n| {
                    left[list].as_object().is_some_and(|m| {
                        m.values().any(|x| {
                            x["name"].as_str() == Some(n.as_str())
                                && !matches!(x["state"].as_str(), Some("Destroyed" | "Expunging"))
                        })
                    })
                })
                .collect();
            if !alive.is_empty() {
                wrong.push(format!("{kind} left: {alive:?}"));
            }
        }
        if !wrong.is_empty() {
            self.violations.lock().await.push(format!(
                "run {run} ({}): {}",
                if live { "live" } else { "test" },
                wrong.join("; ")
            ));
        }
        if let (true, RunStatus::Completed, Some(vm)) = (live, row.status, destination) {
            self.fail_back(&vm, v).await;
        }
    }

    /// What an operator does after a live failover before the next drill: the production VM
    /// goes, every disk goes back to the OMA.
    async fn fail_back(&self, vm: &str, v: &tern::domain::inventory::VmRecord) {
        let run = |cmd: AsyncCommand| async move {
            let job = self.cloud.issue(cmd).await?;
            self.cloud
                .wait_job(&job.job_id, Duration::from_millis(20), Duration::from_secs(30))
                .await
        };
        // The faults hit these calls too: each is retried until the world shows it done. A
        // request of ours that hung past our timeout may still land (the simulator acts on it
        // after `hang_ms`): after a pause longer than that the disks are looked at again, so a
        // late detach of ours is not blamed on the next run.
        for round in 0..3 {
            if round > 0 {
                tokio::time::sleep(Duration::from_millis(HANG_MS + 500)).await;
                let mut home = true;
                for disk in v.all_disks() {
                    let vol = patiently("reading the volume", || self.cloud.get_volume(&disk.volume_id)).await;
                    home &= vol.vm_id.as_deref() == Some(self.oma.as_str());
                }
                if home {
                    break;
                }
            }
            for disk in v.all_disks() {
                for _ in 0..50 {
                    let vol = patiently("reading the volume", || self.cloud.get_volume(&disk.volume_id)).await;
                    match vol.vm_id.as_deref() {
                        Some(on) if on == self.oma => break,
                        Some(_) => {
                            let _ = run(AsyncCommand::StopVm {
                                id: vm.into(),
                                forced: true,
                            })
                            .await;
                            let _ = run(AsyncCommand::DetachVolume {
                                volume_id: disk.volume_id.clone(),
                            })
                            .await;
                        }
                        None => {
                            let cmd = AsyncCommand::AttachVolume {
                                volume_id: disk.volume_id.clone(),
                                vm_id: self.oma.clone(),
                                device_id: None,
                            };
                            let _ = run(cmd).await;
                        }
                    }
                }
            }
        }
        for _ in 0..50 {
            let gone = self.cloud.list_vms(tern::providers::VmFilter::id(vm)).await.map(|l| {
                l.iter().all(|x| {
                    matches!(
                        x.state,
                        tern::providers::VmState::Destroyed | tern::providers::VmState::Expunging
                    )
                })
            });
            if gone.unwrap_or(false) {
                return;
            }
            let _ = run(AsyncCommand::DestroyVm {
                id: vm.into(),
                expunge: true,
            })
            .await;
        }
        panic!("could not fail {} back", v.name);
    }

    /// SIGKILLs and restarts workers, and restarts PostgreSQL, at random moments until `until`.
    async fn chaos(&self, seed: u64, until: Instant) -> Vec<tokio::process::Child> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut workers: Vec<tokio::process::Child> = (0..WORKERS)
            .map(|i| worker_in(&self.db, self.logs.path(), &format!("w{i}-0"), None, &self.env))
            .collect();
        let mut restarted = 0;
        let mut next_pg = Instant::now() + Duration::from_secs(rng.gen_range(15..40));
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(300..2500))).await;
            let i = rng.gen_range(0..WORKERS);
            let _ = workers[i].kill().await;
            self.figures.kills.fetch_add(1, Ordering::Relaxed);
            if rng.gen_bool(0.3) {
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..1500))).await;
            }
            restarted += 1;
            workers[i] = worker_in(
                &self.db,
                self.logs.path(),
                &format!("w{i}-{restarted}"),
                None,
                &self.env,
            );
            if Instant::now() >= next_pg {
                restart_postgres(&self.db).await;
                self.figures.pg_restarts.fetch_add(1, Ordering::Relaxed);
                next_pg = Instant::now() + Duration::from_secs(rng.gen_range(20..50));
            }
        }
        workers
    }
}

/// Restarts the PostgreSQL server (`pg_ctlcluster`, as `.ci/run` starts it); where that is not
/// possible, terminates every connection to the test database instead.
async fn restart_postgres(db: &TestDb) {
    let cluster = std::fs::read_dir("/etc/postgresql")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string());
    let restarted = match cluster {
        Some(version) => tokio::process::Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", &version, "main", "restart", "-m", "fast"])
            .status()
            .await
            .is_ok_and(|s| s.success()),
        None => false,
    };
    if !restarted {
        eprintln!("campaign: pg_ctlcluster restart not possible here; terminating connections instead");
        let url = common::pg_url().expect("PostgreSQL URL");
        let pool = sqlx::PgPool::connect(&url).await.expect("connect to terminate");
        let _ = sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .execute(&pool)
        .await;
        pool.close().await;
    }
    let _ = db;
}

/// One campaign round on `backend`: failovers started for `secs`, then every lane's last run
/// ended; the figures line and the violations found.
async fn round(db: TestDb, backend: &str, secs: u64, seed: u64) -> (String, Vec<String>) {
    let sim = common::start_sim(seed, Some(faults()), "k", "s", 30).await;
    let sample = sim.sample.clone();
    let store = db.open().await;
    tern::store::load_inventory(store.as_ref(), &sim.inventory, tern::domain::Timestamp::now())
        .await
        .unwrap();
    let defs = common::fast_failover_definitions(12, "500ms");
    let base = sim.base.clone();
    let mut env = common::failover_env(&base, &sample, defs.path());
    env.push(("TERN_SNAPSHOT_BACKEND".into(), backend.into()));
    env.push(("TERN_LINSTOR_URL".into(), base.clone()));
    let engine = Engine::with_registry(
        store.clone(),
        Some(defs.path()),
        tern::steps::builtins(store.clone()),
        EngineConfig::default(),
    )
    .unwrap();
    let mut cfg = tern::providers::cloudstack::CloudStackConfig::new(format!("{base}/client/api"), "k", "s");
    cfg.request_timeout = Duration::from_secs(1);
    let c = Arc::new(Campaign {
        db,
        base,
        store,
        engine,
        env,
        logs: tempfile::tempdir().unwrap(),
        inv: sim.inventory.clone(),
        oma: sample.oma_vm_id.clone(),
        cloud: tern::providers::cloudstack::CloudStackClient::new(cfg).unwrap(),
        http: reqwest::Client::new(),
        figures: Figures::default(),
        ends: Mutex::new(BTreeMap::new()),
        violations: Mutex::new(Vec::new()),
    });
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let lanes: Vec<_> = (0..c.inv.vms.len())
        .map(|vm| {
            let c = c.clone();
            tokio::spawn(async move { c.lane(vm, seed ^ (vm as u64 + 1), until).await })
        })
        .collect();
    let workers = c.chaos(seed, until).await;
    for lane in lanes {
        tokio::time::timeout(Duration::from_secs(180), lane)
            .await
            .unwrap_or_else(|_| panic!("a lane's last run did not end\n{}", logs_in(c.logs.path())))
            .unwrap();
    }
    for mut w in workers {
        let _ = w.kill().await;
    }
    let created = c.get("/sim/state").await["created"].clone();
    let mut violations = c.violations.lock().await.clone();
    if let Some(m) = created.as_object() {
        for (name, n) in m.iter().filter(|(_, n)| n.as_u64() != Some(1)) {
            violations.push(format!("{name} was created {n} times"));
        }
    }
    if !violations.is_empty() {
        violations.push(logs_in(c.logs.path()));
    }
    let faults = c.get("/sim/faults").await.as_array().map_or(0, Vec::len);
    let f = &c.figures;
    let line = format!(
        "campaign: {backend}: {} s, seed {seed}: {} jobs ({} test, {} live; {} of the 3-disk 2-NIC VM), ends {:?}, {} worker kills, {} PostgreSQL restarts, {faults} simulator faults, {} cancels, {} end-tests, {} violations",
        started.elapsed().as_secs(),
        f.jobs.load(Ordering::Relaxed),
        f.test.load(Ordering::Relaxed),
        f.live.load(Ordering::Relaxed),
        f.multi_disk.load(Ordering::Relaxed),
        c.ends.lock().await,
        f.kills.load(Ordering::Relaxed),
        f.pg_restarts.load(Ordering::Relaxed),
        f.cancels.load(Ordering::Relaxed),
        f.end_tests.load(Ordering::Relaxed),
        violations.len(),
    );
    (line, violations)
}

/// A round per snapshot backend, each on a fresh database and simulator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failovers_survive_a_randomized_fault_campaign() {
    if common::db("postgres").is_none() {
        return;
    }
    let secs: u64 = std::env::var("TERN_CAMPAIGN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed: u64 = std::env::var("TERN_CAMPAIGN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let mut all = Vec::new();
    for backend in ["cloudstack-volume", "cloudstack-vm", "linstor"] {
        let db = common::db("postgres").expect("checked above");
        let (line, violations) = round(db, backend, secs, seed).await;
        eprintln!("{line}");
        all.extend(violations.into_iter().map(|v| format!("{backend}: {v}")));
    }
    assert!(all.is_empty(), "{} violations:\n{}", all.len(), all.join("\n"));
}
