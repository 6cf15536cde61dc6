//! Crash tests that really kill: `tern worker` runs as a child process on a real database and is
//! SIGKILLed at a named crash point (one after each kind of journal write, and inside steps) or
//! at random moments; a restarted worker must bring every run to its expected terminal state
//! with each side effect done exactly as often as its idempotency contract allows, a journal
//! without gaps or duplicates, and every timer fired exactly once. SQLite and PostgreSQL, plus
//! two workers sharing one PostgreSQL with one of them killed.

#[path = "../common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tern::domain::run::{Record, RunStatus};
use tern::domain::RunId;
use tern::engine::{Engine, EngineConfig, SubmitRequest};
use tern::store::Store;
use tokio::process::{Child, Command};

use common::{logs_in, terminate_in, worker_in, TestDb};

mod failover;
mod sweep;

/// One kind of run in the batch and what must be true once it is terminal.
struct Case {
    input: Value,
    expect: RunStatus,
    /// The test sends `end-test` once the run holds.
    signal: bool,
    /// The test cancels the run once it holds.
    cancel: bool,
    timer_fires: usize,
    /// (step, ledger kind) that must appear exactly once; anything else must not appear.
    effects: &'static [(&'static str, &'static str)],
}

const FORWARD: [(&str, &str); 4] = [
    ("validate", "effect"),
    ("snapshot", "effect"),
    ("create_vm", "job"),
    ("attach", "effect"),
];

fn cases() -> Vec<Case> {
    const ALL: &[(&str, &str)] = &[
        ("validate", "effect"),
        ("snapshot", "effect"),
        ("create_vm", "job"),
        ("attach", "effect"),
        ("stop", "effect"),
        ("revert", "effect"),
    ];
    const FAILED: &[(&str, &str)] = &[
        ("validate", "effect"),
        ("snapshot", "effect"),
        ("create_vm", "job"),
        ("attach", "undo"),
        ("create_vm", "undo"),
        ("snapshot", "undo"),
    ];
    vec![
        Case {
            input: json!({"hold": "300ms"}),
            expect: RunStatus::Completed,
            signal: false,
            cancel: false,
            timer_fires: 1,
            effects: ALL,
        },
        Case {
            input: json!({}),
            expect: RunStatus::Completed,
            signal: true,
            cancel: false,
            timer_fires: 0,
            effects: ALL,
        },
        Case {
            input: json!({"hold": "50ms", "test": {"fail": {"attach": {"times": 2}}}}),
            expect: RunStatus::Completed,
            signal: false,
            cancel: false,
            timer_fires: 1,
            effects: ALL,
        },
        Case {
            input: json!({"test": {"fail": {"attach": {"class": "permanent"}}}}),
            expect: RunStatus::Failed,
            signal: false,
            cancel: false,
            timer_fires: 0,
            effects: FAILED,
        },
        Case {
            input: json!({"test": {"fail": {"attach": {"class": "permanent"}}, "fail_undo": {"snapshot": {"times": 1}}}}),
            expect: RunStatus::Failed,
            signal: false,
            cancel: false,
            timer_fires: 0,
            effects: FAILED,
        },
        Case {
            input: json!({"test": {"fail": {"attach": {"class": "permanent"}}, "fail_undo": {"create_vm": {"class": "permanent"}}}}),
            expect: RunStatus::NeedsOperator,
            signal: false,
            cancel: false,
            timer_fires: 0,
            effects: &[
                ("validate", "effect"),
                ("snapshot", "effect"),
                ("create_vm", "job"),
                ("attach", "undo"),
            ],
        },
        Case {
            input: json!({"hold": "1h"}),
            expect: RunStatus::Cancelled,
            signal: false,
            cancel: true,
            timer_fires: 0,
            effects: &[
                ("validate", "effect"),
                ("snapshot", "effect"),
                ("create_vm", "job"),
                ("attach", "effect"),
                ("attach", "undo"),
                ("create_vm", "undo"),
                ("snapshot", "undo"),
            ],
        },
        Case {
            input: json!({"hold": "10ms", "skip_snapshot": true}),
            expect: RunStatus::Completed,
            signal: false,
            cancel: false,
            timer_fires: 1,
            effects: &[
                ("validate", "effect"),
                ("create_vm", "job"),
                ("attach", "effect"),
                ("stop", "effect"),
                ("revert", "effect"),
            ],
        },
    ]
}

struct Batch {
    store: Arc<dyn Store>,
    engine: Arc<Engine>,
    runs: Vec<(RunId, Case)>,
    log_dir: tempfile::TempDir,
}

async fn batch(db: &TestDb, copies: usize) -> Batch {
    let store = db.open().await;
    let engine = Engine::with_registry(
        store.clone(),
        None,
        tern::steps::builtins(store.clone()),
        EngineConfig::default(),
    )
    .unwrap();
    let mut runs = Vec::new();
    for _ in 0..copies {
        for case in cases() {
            let id = engine
                .submit(SubmitRequest {
                    definition: "crash-saga".into(),
                    input: case.input.clone(),
                    request_id: None,
                    correlation_id: None,
                    by: None,
                })
                .await
                .unwrap()
                .run
                .id;
            runs.push((id, case));
        }
    }
    Batch {
        store,
        engine,
        runs,
        log_dir: tempfile::tempdir().unwrap(),
    }
}

fn worker(db: &TestDb, b: &Batch, name: &str, crash_at: Option<&str>) -> Child {
    worker_in(db, b.log_dir.path(), name, crash_at, &[])
}

fn logs(b: &Batch) -> String {
    logs_in(b.log_dir.path())
}

/// Sends the signals and cancels the cases ask for once their runs hold (idempotent, so sending
/// again after a crash is harmless). Returns how many runs are terminal.
async fn nudge(b: &Batch) -> usize {
    let mut terminal = 0;
    for (id, case) in &b.runs {
        let row = b.store.get_run(*id).await.unwrap().unwrap();
        if row.status.is_terminal() {
            terminal += 1;
        } else if row.status == RunStatus::Holding {
            if case.signal {
                b.engine.signal(*id, "end-test").await.unwrap();
            }
            if case.cancel {
                b.engine.cancel(*id, "crash test").await.unwrap();
            }
        }
    }
    terminal
}

/// Waits for a worker that must die at its crash point; fails if it never gets there.
async fn until_killed(b: &Batch, child: &mut Child, point: &str) {
    for _ in 0..600 {
        nudge(b).await;
        if let Some(status) = child.try_wait().unwrap() {
            assert_eq!(
                status.signal(),
                Some(libc::SIGKILL),
                "worker exited without being killed at {point}: {status:?}\n{}",
                logs(b)
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("crash point {point} was never reached\n{}", logs(b));
}

async fn until_all_terminal(b: &Batch) {
    for _ in 0..1200 {
        if nudge(b).await == b.runs.len() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut stuck = Vec::new();
    for (id, _) in &b.runs {
        let row = b.store.get_run(*id).await.unwrap().unwrap();
        if !row.status.is_terminal() {
            stuck.push(format!("{id}: {:?} lease={:?}", row.state, row.lease_owner));
        }
    }
    panic!("runs not terminal after 60s:\n{}\n{}", stuck.join("\n"), logs(b));
}

/// SIGTERM: the worker must stop claiming, finish and exit cleanly, leaving no lease behind.
async fn terminate(b: &Batch, child: Child, name: &str) {
    terminate_in(b.log_dir.path(), child, name).await
}

async fn check(b: &Batch) {
    let ledger = b.store.ledger(None).await.unwrap();
    for (id, case) in &b.runs {
        let row = b.store.get_run(*id).await.unwrap().unwrap();
        assert_eq!(
            row.status,
            case.expect,
            "run {id} input {}: {:?}\n{}",
            case.input,
            row.state,
            logs(b)
        );
        assert_eq!(row.lease_owner, None, "terminal run {id} still leased");
        assert_eq!(row.wake_at, None);
        let j = b.store.journal(*id, 0, 100_000).await.unwrap();
        let seqs: Vec<i64> = j.iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            (1..=j.len() as i64).collect::<Vec<_>>(),
            "run {id}: journal gaps/duplicates"
        );
        assert_eq!(row.last_seq, j.len() as i64);
        let kinds = |k: &str| j.iter().filter(|e| e.record.kind() == k).count();
        assert_eq!(kinds("run_finished"), 1, "run {id}");
        assert_eq!(
            kinds("timer_fired"),
            case.timer_fires,
            "run {id}: timer fired wrong number of times"
        );
        assert!(kinds("timer_set") <= 1, "run {id}: timer set twice");
        // A resumed job attempt must poll the job it recorded, not issue another: at most one
        // progress checkpoint per attempt that found none, and exactly one job ledger row.
        let job_progress = j
            .iter()
            .filter(|e| matches!(&e.record, Record::StepProgress { step, .. } if step == "create_vm"))
            .count();
        assert!(
            job_progress <= 1 || kinds("step_started") > 6,
            "run {id}: job progress recorded {job_progress} times"
        );
        let mut seen: HashMap<(String, String), usize> = HashMap::new();
        for l in ledger.iter().filter(|l| l.run_id == *id) {
            *seen.entry((l.step.clone(), l.kind.clone())).or_insert(0) += 1;
        }
        for (step, kind) in case.effects {
            assert_eq!(
                seen.remove(&(step.to_string(), kind.to_string())),
                Some(1),
                "run {id} {}: {step}/{kind}",
                case.input
            );
        }
        assert!(
            seen.is_empty(),
            "run {id} {}: unexpected side effects {seen:?}",
            case.input
        );
        // Every forward step that succeeded has its output recorded for compensation.
        if case.expect == RunStatus::Completed {
            for (step, _) in FORWARD
                .iter()
                .filter(|(s, _)| !(*s == "snapshot" && case.input.get("skip_snapshot").is_some()))
            {
                assert!(
                    row.context.outputs.contains_key(*step),
                    "run {id}: no output for {step}"
                );
            }
        }
    }
}

/// Kill at the n-th pass of `point`, restart, and check everything.
async fn crash_at(backend: &str, point: &str) {
    let Some(db) = common::db(backend) else { return };
    let b = batch(&db, 1).await;
    let mut child = worker(&db, &b, "doomed", Some(point));
    until_killed(&b, &mut child, point).await;
    let heir = worker(&db, &b, "heir", None);
    until_all_terminal(&b).await;
    terminate(&b, heir, "heir").await;
    check(&b).await;
}

macro_rules! crash_points {
    ($($name:ident => $point:expr),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() { super::crash_at("sqlite", $point).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() { super::crash_at("postgres", $point).await }
            }
        )*
    };
}

crash_points!(
    after_step_started => "after:step_started:5",
    after_step_progress => "after:step_progress:2",
    after_step_succeeded => "after:step_succeeded:7",
    after_step_skipped => "after:step_skipped:1",
    after_retry_scheduled => "after:step_retry_scheduled:1",
    after_step_failed => "after:step_failed:2",
    after_compensation_started => "after:compensation_started:3",
    after_compensation_succeeded => "after:compensation_succeeded:2",
    after_compensation_failed => "after:compensation_failed:1",
    after_timer_set => "after:timer_set:2",
    after_timer_fired => "after:timer_fired:1",
    after_signal_received => "after:signal_received:1",
    after_cancel_requested => "after:cancel_requested:1",
    after_run_finished => "after:run_finished:2",
    after_side_effect_before_commit => "after_effect:4",
    after_job_progress => "after_job_progress:1",
);

/// `tern submit` killed right after its commit: the run exists and completes.
async fn killed_after_submit(backend: &str) {
    let Some(db) = common::db(backend) else { return };
    let b = batch(&db, 0).await;
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "admin",
            "submit",
            "crash-saga",
            "--database",
            &db.url,
            "--input",
            r#"{"hold":"10ms"}"#,
        ])
        .env("TERN_CRASH_AT", "after:run_submitted")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.signal(), Some(libc::SIGKILL));
    let runs = b
        .store
        .list_runs(&tern::store::RunFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(runs.len(), 1, "the submit was committed before the crash");
    let heir = worker(&db, &b, "heir", None);
    let row = b
        .engine
        .wait_terminal(runs[0].id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(row.status, RunStatus::Completed);
    terminate(&b, heir, "heir").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_submit_sqlite() {
    killed_after_submit("sqlite").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_submit_postgres() {
    killed_after_submit("postgres").await
}

/// A small deterministic generator for kill delays (the seed is printed on failure).
fn delays(seed: u64, n: usize) -> Vec<u64> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            80 + (x >> 33) % 500
        })
        .collect()
}

/// Kills at random moments, again and again, then lets a clean worker finish.
async fn random_kills(backend: &str) {
    let Some(db) = common::db(backend) else { return };
    let b = batch(&db, 2).await;
    let seed = std::env::var("TERN_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x7e51);
    eprintln!("random kill seed {seed} (set TERN_CRASH_SEED to replay)");
    for (i, ms) in delays(seed, 8).into_iter().enumerate() {
        let mut child = worker(&db, &b, &format!("victim-{i}"), None);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
        while tokio::time::Instant::now() < deadline {
            nudge(&b).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        child.kill().await.unwrap(); // SIGKILL
                                     // Let leases lapse now and then, so takeovers and on-time restarts both happen.
        if i % 3 == 2 {
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
    }
    let heir = worker(&db, &b, "heir", None);
    until_all_terminal(&b).await;
    terminate(&b, heir, "heir").await;
    check(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kills_sqlite() {
    random_kills("sqlite").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kills_postgres() {
    random_kills("postgres").await
}

/// Two workers share one PostgreSQL; one is SIGKILLed mid-batch; the survivor finishes it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_postgres_workers_one_killed() {
    let Some(db) = common::db("postgres") else { return };
    let b = batch(&db, 3).await;
    let mut doomed = worker(&db, &b, "doomed", None);
    let survivor = worker(&db, &b, "survivor", None);
    // Kill once the batch is well under way (some runs finished, some not).
    for _ in 0..400 {
        let done = nudge(&b).await;
        if done >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    doomed.kill().await.unwrap();
    until_all_terminal(&b).await;
    terminate(&b, survivor, "survivor").await;
    check(&b).await;
}
