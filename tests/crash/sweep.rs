//! The crash-point sweep: every crash point a failover passes, found by running it once with
//! `TERN_CRASH_TRACE` (so a point added to the code later is swept without editing a list):
//! before and after each cloud call, after a job id is checkpointed, after a job finished
//! but before the step recorded it, and after every journal record; in every step and every
//! compensation (a test failover cancelled in its hold, a live failover that cannot start),
//! with each snapshot backend (CloudStack volume, CloudStack VM, LINSTOR). For each point a `tern worker` is
//! SIGKILLed there; then, with no worker running, a cancel or an end-test may arrive (so it
//! arrives exactly at that point); a new worker finishes the run. Afterwards the run ended as
//! its path says (or `cancelled` after a cancel), the replicated volume is where that end
//! says, nothing named after the run is left, nothing was created twice, and no cancel is
//! left pending. `TERN_SWEEP_FILTER=<text>` runs only the matching cases.

use std::collections::HashMap;

use futures::StreamExt;

use super::failover::{campaign, Campaign};
use super::*;
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Arrival {
    /// Only the kill.
    Nothing,
    /// A cancel while no worker runs.
    Cancel,
    /// The end-test signal while no worker runs (test failovers only).
    EndTest,
}

/// What one failover of the Windows sample VM goes through.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Path {
    /// A test failover that holds 200 ms, then tears down.
    TestCompleted,
    /// A test failover cancelled in its hold: every compensation runs.
    TestCancelled,
    /// A live failover.
    LiveCompleted,
    /// A live failover whose VM never starts (every start job fails): it rolls back.
    LiveRolledBack,
}

impl Path {
    fn live(self) -> bool {
        matches!(self, Path::LiveCompleted | Path::LiveRolledBack)
    }

    /// How the run ends when nothing else arrives.
    fn end(self) -> RunStatus {
        match self {
            Path::TestCompleted | Path::LiveCompleted => RunStatus::Completed,
            Path::TestCancelled => RunStatus::Cancelled,
            Path::LiveRolledBack => RunStatus::Failed,
        }
    }
}

#[derive(Debug, Clone)]
struct Case {
    backend: &'static str,
    path: Path,
    /// `TERN_CRASH_AT`: a point and which passage of it.
    point: String,
    arrival: Arrival,
}

/// A campaign on a fresh SQLite database with the given snapshot backend, and its run.
async fn prepared(db: &TestDb, backend: &str, path: Path) -> (Campaign, RunId) {
    let faults =
        (path == Path::LiveRolledBack).then(|| json!({"commands": {"startVirtualMachine": {"job_failure_rate": 1.0}}}));
    let mut c = campaign(db, faults).await;
    let base = c.base.clone();
    c.env.push(("TERN_SNAPSHOT_BACKEND".into(), backend.into()));
    c.env.push(("TERN_LINSTOR_URL".into(), base));
    let vm = c
        .inv
        .vms
        .iter()
        .position(|v| v.is_windows())
        .expect("a Windows sample VM");
    let run = if path == Path::TestCancelled {
        c.submit_held(vm).await
    } else {
        c.submit(vm, path.live()).await;
        c.runs[0].0
    };
    (c, run)
}

/// Cancels a run of the cancelled path once it holds (idempotent).
async fn nudge(c: &Campaign, run: RunId, path: Path) {
    if path == Path::TestCancelled && c.store.get_run(run).await.unwrap().unwrap().status == RunStatus::Holding {
        c.engine.cancel(run, "sweep").await.unwrap();
    }
}

/// A worker that finishes the run, nudging it on its path.
async fn finish(db: &TestDb, c: &Campaign, run: RunId, path: Path) {
    let heir = worker_in(db, c.logs.path(), "heir", None, &c.env);
    for _ in 0..3000 {
        nudge(c, run, path).await;
        if c.store.get_run(run).await.unwrap().unwrap().status.is_terminal() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    terminate_in(c.logs.path(), heir, "heir").await;
}

/// The points one failover on `path` passes, each as `name:n` (its n-th passage), keeping the
/// first passage of each name within each step or compensation attempt.
async fn traced(backend: &'static str, path: Path) -> Vec<String> {
    let db = common::sqlite_db();
    let (mut c, run) = prepared(&db, backend, path).await;
    let trace = c.logs.path().join("trace");
    c.env.push(("TERN_CRASH_TRACE".into(), trace.display().to_string()));
    finish(&db, &c, run, path).await;
    let row = c.store.get_run(run).await.unwrap().unwrap();
    assert_eq!(row.status, path.end(), "traced run: {:?}", row.state);
    let text = std::fs::read_to_string(&trace).unwrap();
    if std::env::var_os("TERN_SWEEP_SHOW").is_some() {
        eprintln!("trace of {backend} {path:?}:\n{text}");
    }
    let mut passed: HashMap<&str, u64> = HashMap::new();
    let mut in_step: Vec<&str> = Vec::new();
    let mut points = Vec::new();
    for name in text.lines() {
        let n = passed.entry(name).or_insert(0);
        *n += 1;
        if matches!(name, "after:step_started" | "after:compensation_started") {
            in_step.clear();
        }
        if !in_step.contains(&name) {
            in_step.push(name);
            points.push(format!("{name}:{n}"));
        }
    }
    points
}

/// Runs one case; returns what went wrong, if anything.
async fn run_case(case: &Case) -> Result<(), String> {
    let db = common::sqlite_db();
    let (c, run) = prepared(&db, case.backend, case.path).await;
    let mut doomed = worker_in(&db, c.logs.path(), "doomed", Some(&case.point), &c.env);
    let mut killed = false;
    for _ in 0..1200 {
        nudge(&c, run, case.path).await;
        if let Some(status) = doomed.try_wait().unwrap() {
            if status.signal() != Some(libc::SIGKILL) {
                return Err(format!("worker exited {status:?}\n{}", logs_in(c.logs.path())));
            }
            killed = true;
            break;
        }
        if c.store.get_run(run).await.unwrap().unwrap().status.is_terminal() {
            // A point right after the run's last commit kills a moment after the run ends.
            let exit = tokio::time::timeout(Duration::from_secs(1), doomed.wait()).await;
            killed = matches!(exit, Ok(Ok(s)) if s.signal() == Some(libc::SIGKILL));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !killed {
        let _ = doomed.kill().await;
        let row = c.store.get_run(run).await.unwrap().unwrap();
        return Err(format!(
            "crash point not reached (run {:?})\n{}",
            row.status,
            logs_in(c.logs.path())
        ));
    }
    match case.arrival {
        Arrival::Nothing => {}
        Arrival::Cancel => {
            c.engine.cancel(run, "sweep").await.map_err(|e| e.to_string())?;
        }
        Arrival::EndTest => {
            c.engine.signal(run, "end-test").await.map_err(|e| e.to_string())?;
        }
    }
    finish(&db, &c, run, case.path).await;
    let row = c.store.get_run(run).await.unwrap().unwrap();
    let ends = match case.arrival {
        // A cancel rolls back, or comes too late (teardown, rollback, or the run's end).
        Arrival::Cancel => vec![case.path.end(), RunStatus::Cancelled],
        Arrival::Nothing | Arrival::EndTest => vec![case.path.end()],
    };
    if !ends.contains(&row.status) {
        return Err(format!("ended {:?}\n{}", row.state, logs_in(c.logs.path())));
    }
    let expect = match row.status {
        RunStatus::Completed if case.path.live() => row.context.output("vm-creation")["destination_vm_id"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        _ => c.oma.clone(),
    };
    if row.cancel_pending {
        return Err("a finished run keeps a pending cancel".into());
    }
    c.clean(&expect).await
}

/// Runs `cases` a few at a time; returns the failures.
async fn run_all(cases: Vec<Case>) -> Vec<String> {
    futures::stream::iter(cases)
        .map(|case| async move { run_case(&case).await.err().map(|e| format!("{case:?}: {e}")) })
        .buffer_unordered(6)
        .filter_map(|r| async move { r })
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_at_any_crash_point_loses_nothing() {
    let mut cases = Vec::new();
    let mut points = 0;
    for backend in ["cloudstack-volume", "cloudstack-vm", "linstor"] {
        for path in [
            Path::TestCompleted,
            Path::TestCancelled,
            Path::LiveCompleted,
            Path::LiveRolledBack,
        ] {
            let found = traced(backend, path).await;
            points += found.len();
            for point in found {
                let arrivals: &[Arrival] = match path {
                    // Cancels and end-tests at every point of both backends' bring-ups. On the
                    // other two paths the run is already rolling back at most points (the
                    // cancel is the path itself, or comes too late), and their forward points
                    // are those of the bring-ups.
                    Path::TestCompleted => &[Arrival::Nothing, Arrival::Cancel, Arrival::EndTest],
                    Path::LiveCompleted => &[Arrival::Nothing, Arrival::Cancel],
                    Path::TestCancelled | Path::LiveRolledBack => &[Arrival::Nothing],
                };
                for arrival in arrivals {
                    cases.push(Case {
                        backend,
                        path,
                        point: point.clone(),
                        arrival: *arrival,
                    });
                }
            }
        }
    }
    // TERN_SWEEP_FILTER=<text> runs only the cases whose description contains it.
    if let Ok(only) = std::env::var("TERN_SWEEP_FILTER") {
        cases.retain(|c| format!("{c:?}").contains(&only));
    }
    let total = cases.len();
    let failures = run_all(cases).await;
    eprintln!(
        "crash-point sweep: {points} points, {total} cases (kill; kill + cancel; kill + end-test), {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {total} cases failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
