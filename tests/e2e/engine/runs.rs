//! Workflow runs end to end, in-process, on both backends: happy path, hold timer and signal,
//! retries asleep in the database, rollback, needs-operator, cancel, pinning, lease takeover.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tern::domain::run::{Record, RunStatus};
use tern::domain::RunId;
use tern::engine::{worker, Engine, EngineConfig, EngineError, SubmitRequest};
use tern::store::{JournalEntry, SignalOutcome, Store};
use tokio_util::sync::CancellationToken;

use crate::common::TestDb;
use crate::on_both_backends;

struct Worker {
    engine: Arc<Engine>,
    store: Arc<dyn Store>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Worker {
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

fn config(name: &str) -> EngineConfig {
    EngineConfig {
        worker_id: name.to_string(),
        concurrency: 16,
        lease_ttl: Duration::from_secs(2),
        poll_interval: Duration::from_millis(100),
        shutdown_grace: Duration::from_secs(2),
    }
}

async fn engine(store: Arc<dyn Store>, defs: &[(&str, &str)], cfg: EngineConfig) -> Arc<Engine> {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in defs {
        std::fs::write(dir.path().join(format!("{name}.toml")), text).unwrap();
    }
    Engine::with_registry(store.clone(), Some(dir.path()), tern::steps::builtins(store), cfg).unwrap()
}

async fn start(store: Arc<dyn Store>, defs: &[(&str, &str)], name: &str) -> Worker {
    start_with(store, defs, config(name)).await
}

async fn start_with(store: Arc<dyn Store>, defs: &[(&str, &str)], cfg: EngineConfig) -> Worker {
    let engine = engine(store.clone(), defs, cfg).await;
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (e, s) = (engine.clone(), stop.clone());
        async move {
            worker::run_worker(e, s).await.unwrap();
        }
    });
    Worker {
        engine,
        store,
        stop,
        task,
    }
}

async fn submit(e: &Arc<Engine>, def: &str, input: Value) -> RunId {
    e.submit(SubmitRequest {
        definition: def.into(),
        input,
        request_id: None,
        correlation_id: None,
        by: None,
    })
    .await
    .unwrap()
    .run
    .id
}

async fn finish(e: &Engine, run: RunId) -> tern::store::RunRow {
    let row = e.wait_terminal(run, Duration::from_secs(30)).await.unwrap();
    assert!(row.status.is_terminal(), "run {run} stuck in {:?}", row.state);
    row
}

async fn wait_status(e: &Engine, run: RunId, status: RunStatus) {
    for _ in 0..1500 {
        if e.get_run(run).await.unwrap().unwrap().status == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("run {run} never reached {status:?}");
}

async fn journal(e: &Engine, run: RunId) -> Vec<JournalEntry> {
    let j = e.journal(run, 0, 10_000).await.unwrap();
    let seqs: Vec<i64> = j.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=j.len() as i64).collect::<Vec<_>>(),
        "journal has gaps or duplicates"
    );
    assert_eq!(e.get_run(run).await.unwrap().unwrap().last_seq, j.len() as i64);
    j
}

fn count(j: &[JournalEntry], kind: &str) -> usize {
    j.iter().filter(|e| e.record.kind() == kind).count()
}

/// Ledger rows of a run as (step, kind) -> count.
async fn ledger(store: &Arc<dyn Store>, run: RunId) -> HashMap<(String, String), usize> {
    let mut m = HashMap::new();
    for row in store.ledger(Some(run)).await.unwrap() {
        *m.entry((row.step, row.kind)).or_insert(0) += 1;
    }
    m
}

fn key(step: &str, kind: &str) -> (String, String) {
    (step.to_string(), kind.to_string())
}

async fn happy_path_with_hold_timer(db: TestDb) {
    let w = start(db.open().await, &[], "w1").await;
    let run = submit(&w.engine, "crash-saga", json!({"hold": "200ms", "vm_id": "vm-7"})).await;
    let row = finish(&w.engine, run).await;
    assert_eq!(row.status, RunStatus::Completed);
    assert_eq!(row.display_status, "completed");
    let j = journal(&w.engine, run).await;
    assert_eq!(count(&j, "timer_set"), 1);
    assert_eq!(count(&j, "timer_fired"), 1);
    assert_eq!(count(&j, "run_finished"), 1);
    assert_eq!(count(&j, "step_started"), 6);
    let l = ledger(&w.store, run).await;
    for s in ["validate", "snapshot", "attach", "stop", "revert"] {
        assert_eq!(l.get(&key(s, "effect")), Some(&1), "{s}: {l:?}");
    }
    assert_eq!(l.get(&key("create_vm", "job")), Some(&1));
    assert!(!l.keys().any(|(_, k)| k == "undo"));
    // Outputs are kept in the context (what each step created).
    assert!(row.context.output("create_vm")["job_id"].is_string());
    let job = w.store.failover_job(run).await.unwrap().unwrap();
    assert_eq!(
        (job.status.as_str(), job.vm_id.as_str(), job.job_type.as_str()),
        ("completed", "vm-7", "test")
    );
    let tracking = w.store.job_tracking(run).await.unwrap();
    assert_eq!(tracking.len(), 6);
    assert!(tracking.iter().all(|t| t.status == "completed"), "{tracking:?}");
    w.stop().await;
}

async fn retries_sleep_in_the_database_then_succeed(db: TestDb) {
    let w = start(db.open().await, &[], "w1").await;
    let input = json!({"hold": "1ms", "test": {"fail": {"attach": {"times": 2, "class": "retryable"}}}});
    let run = submit(&w.engine, "crash-saga", input).await;
    assert_eq!(finish(&w.engine, run).await.status, RunStatus::Completed);
    let j = journal(&w.engine, run).await;
    let retries: Vec<_> = j
        .iter()
        .filter_map(|e| match &e.record {
            Record::StepFailed {
                step,
                attempt,
                retry_at: Some(at),
                ..
            } if step == "attach" => Some((*attempt, *at, e.at)),
            _ => None,
        })
        .collect();
    assert_eq!(retries.len(), 2);
    assert!(
        retries.iter().all(|(_, at, committed)| at > committed),
        "retry time is persisted in the future"
    );
    let attempts: Vec<u32> = j
        .iter()
        .filter_map(|e| match &e.record {
            Record::StepStarted { step, attempt, .. } if step == "attach" => Some(*attempt),
            _ => None,
        })
        .collect();
    assert_eq!(attempts, vec![1, 2, 3]);
    // The next attempt starts no earlier than its persisted retry time.
    let third = j
        .iter()
        .find(|e| matches!(&e.record, Record::StepStarted { step, attempt: 3, .. } if step == "attach"))
        .unwrap();
    assert!(third.at >= retries[1].1);
    assert_eq!(ledger(&w.store, run).await.get(&key("attach", "effect")), Some(&1));
    w.stop().await;
}

async fn permanent_failure_rolls_back_in_reverse(db: TestDb) {
    let w = start(db.open().await, &[], "w1").await;
    let input = json!({"test": {"fail": {"attach": {"class": "permanent"}}}});
    let run = submit(&w.engine, "crash-saga", input).await;
    let row = finish(&w.engine, run).await;
    assert_eq!(row.status, RunStatus::Failed);
    let undone: Vec<String> = w
        .store
        .ledger(Some(run))
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == "undo")
        .map(|r| r.step)
        .collect();
    assert_eq!(
        undone,
        vec!["attach", "create_vm", "snapshot"],
        "reverse order, failed step included, validate has nothing to undo"
    );
    let j = journal(&w.engine, run).await;
    assert_eq!(count(&j, "step_failed"), 1);
    assert_eq!(count(&j, "compensation_succeeded"), 3);
    let job = w.store.failover_job(run).await.unwrap().unwrap();
    assert_eq!(job.status, "failed");
    assert!(job.error_message.unwrap().contains("INJECTED"));
    let tracking = w.store.job_tracking(run).await.unwrap();
    assert!(tracking
        .iter()
        .any(|t| t.operation == "rollback:create_vm" && t.status == "completed"));
    w.stop().await;
}

async fn a_failed_compensation_needs_an_operator(db: TestDb) {
    let w = start(db.open().await, &[], "w1").await;
    let input = json!({"test": {"fail": {"attach": {"class": "permanent"}}, "fail_undo": {"create_vm": {"class": "permanent"}}}});
    let run = submit(&w.engine, "crash-saga", input).await;
    let row = finish(&w.engine, run).await;
    assert_eq!(row.status, RunStatus::NeedsOperator);
    assert_eq!(row.display_status, "needs_operator");
    let j = journal(&w.engine, run).await;
    let finished = j.iter().find_map(|e| match &e.record {
        Record::RunFinished { status, undone, .. } => Some((*status, undone.clone())),
        _ => None,
    });
    assert_eq!(
        finished,
        Some((
            RunStatus::NeedsOperator,
            vec!["create_vm".to_string(), "snapshot".to_string()]
        ))
    );
    let job = w.store.failover_job(run).await.unwrap().unwrap();
    assert!(job.error_message.unwrap().contains("not undone: create_vm, snapshot"));
    w.stop().await;
}

async fn the_end_signal_ends_the_hold_once(db: TestDb) {
    let w = start(db.open().await, &[], "w1").await;
    let run = submit(&w.engine, "crash-saga", json!({})).await;
    wait_status(&w.engine, run, RunStatus::Holding).await;
    assert_eq!(w.engine.get_run(run).await.unwrap().unwrap().wake_at, None);
    assert_eq!(w.engine.signal(run, "end-test").await.unwrap(), SignalOutcome::Accepted);
    let again = w.engine.signal(run, "end-test").await.unwrap();
    assert!(
        matches!(again, SignalOutcome::Duplicate | SignalOutcome::Finished(_)),
        "{again:?}"
    );
    assert_eq!(finish(&w.engine, run).await.status, RunStatus::Completed);
    let j = journal(&w.engine, run).await;
    assert_eq!(count(&j, "signal_received"), 1);
    assert_eq!(count(&j, "timer_fired"), 0);
    assert!(matches!(
        w.engine.signal(run, "end-test").await.unwrap(),
        SignalOutcome::Finished(RunStatus::Completed)
    ));
    w.stop().await;
}

async fn an_early_signal_waits_for_the_hold(db: TestDb) {
    // A signal sent before the run reaches its hold is kept and ends the hold at once.
    let w = start(db.open().await, &[], "w1").await;
    let run = submit(
        &w.engine,
        "crash-saga",
        json!({"test": {"sleep_ms": {"validate": 300}}}),
    )
    .await;
    assert_eq!(w.engine.signal(run, "end-test").await.unwrap(), SignalOutcome::Accepted);
    assert_eq!(finish(&w.engine, run).await.status, RunStatus::Completed);
    w.stop().await;
}

async fn cancel_in_the_hold_rolls_back(db: TestDb) {
    let w = start(db.open().await, &[], "w1").await;
    let run = submit(&w.engine, "crash-saga", json!({"hold": "1h"})).await;
    wait_status(&w.engine, run, RunStatus::Holding).await;
    assert_eq!(
        w.engine.cancel(run, "operator said so").await.unwrap(),
        SignalOutcome::Accepted
    );
    let row = finish(&w.engine, run).await;
    assert_eq!(row.status, RunStatus::Cancelled);
    let l = ledger(&w.store, run).await;
    for s in ["attach", "create_vm", "snapshot"] {
        assert_eq!(l.get(&key(s, "undo")), Some(&1), "{s}");
    }
    assert_eq!(count(&journal(&w.engine, run).await, "timer_fired"), 0);
    w.stop().await;
}

const SLOW_RETRY: &str = r#"
name = "slow-retry"
[[step]]
name = "a"
action = "test.effect"
compensate = "test.undo"
[[step]]
name = "b"
action = "test.effect"
compensate = "test.undo"
retry = { max_attempts = 5, initial_delay = "1h", max_delay = "2h", jitter = 0.0 }
"#;

async fn cancel_while_asleep_in_backoff(db: TestDb) {
    let w = start(db.open().await, &[("slow-retry", SLOW_RETRY)], "w1").await;
    let run = submit(
        &w.engine,
        "slow-retry",
        json!({"test": {"fail": {"b": {"class": "retryable"}}}}),
    )
    .await;
    wait_status(&w.engine, run, RunStatus::Sleeping).await;
    w.engine.cancel(run, "no time").await.unwrap();
    let row = finish(&w.engine, run).await;
    assert_eq!(row.status, RunStatus::Cancelled);
    let l = ledger(&w.store, run).await;
    assert_eq!(l.get(&key("a", "undo")), Some(&1));
    assert_eq!(
        l.get(&key("b", "undo")),
        Some(&1),
        "b ran once, so it is undone (idempotently)"
    );
    w.stop().await;
}

const LAST_STEP_SLOW: &str = r#"
name = "last-step-slow"
[[step]]
name = "a"
action = "test.effect"
compensate = "test.undo"
[[step]]
name = "cleanup"
action = "test.effect"
compensate = "none"
"#;

/// Issue 16, failure 3: a cancel accepted while the run's last step runs was dropped (the run
/// completed, its journal had no `cancel_requested`, and the completed run kept the cancel
/// pending). The cancel arrives after the driver last read the run, so the run's terminal
/// commit is what meets it: the end records it as too late, and nothing stays pending.
async fn a_cancel_during_the_last_step_is_recorded_as_too_late(db: TestDb) {
    let w = start(db.open().await, &[("last-step-slow", LAST_STEP_SLOW)], "w1").await;
    let run = submit(
        &w.engine,
        "last-step-slow",
        json!({"test": {"sleep_ms": {"cleanup": 600}}}),
    )
    .await;
    for _ in 0..200 {
        let row = w.engine.get_run(run).await.unwrap().unwrap();
        if row.current_step.as_deref() == Some("cleanup") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(w.engine.cancel(run, "too late").await.unwrap(), SignalOutcome::Accepted);
    let row = finish(&w.engine, run).await;
    assert_eq!(row.status, RunStatus::Completed);
    assert!(!row.cancel_pending, "a finished run keeps no pending cancel");
    let kinds: Vec<&str> = journal(&w.engine, run).await.iter().map(|e| e.record.kind()).collect();
    assert_eq!(
        kinds[kinds.len() - 2..],
        ["cancel_requested", "run_finished"],
        "{kinds:?}"
    );
    let j = journal(&w.engine, run).await;
    assert!(j.iter().any(|e| matches!(
        &e.record,
        Record::CancelRequested { reason, applied: false, .. } if reason == "too late"
    )));
    // A cancel after the end is refused as finished, as before.
    assert!(matches!(
        w.engine.cancel(run, "later").await.unwrap(),
        SignalOutcome::Finished(RunStatus::Completed)
    ));
    w.stop().await;
}

const TIMEOUTS: &str = r#"
name = "timeouts"
[[step]]
name = "slow"
action = "test.effect"
compensate = "none"
timeout = "100ms"
retry = { max_attempts = 2, initial_delay = "10ms", jitter = 0.0 }
"#;

async fn a_step_that_times_out_is_retried_then_fails(db: TestDb) {
    let w = start(db.open().await, &[("timeouts", TIMEOUTS)], "w1").await;
    let run = submit(&w.engine, "timeouts", json!({"test": {"sleep_ms": {"slow": 2000}}})).await;
    let row = finish(&w.engine, run).await;
    match row.state {
        tern::domain::run::RunState::Failed { error, .. } => assert_eq!(error.code, "TIMEOUT"),
        other => panic!("{other:?}"),
    }
    assert_eq!(count(&journal(&w.engine, run).await, "step_started"), 2);
    w.stop().await;
}

const ONE_STEP: &str = r#"
name = "crash-saga"
[[step]]
name = "only"
action = "test.effect"
compensate = "none"
"#;

async fn runs_are_pinned_to_the_definition_they_started_with(db: TestDb) {
    let store = db.open().await;
    // Submitted under the embedded crash-saga, while no worker runs.
    let old = engine(store.clone(), &[], config("submitter")).await;
    let run = submit(&old, "crash-saga", json!({"hold": "1ms"})).await;
    // The file changes: a worker now has a one-step crash-saga.
    let w = start(store.clone(), &[("crash-saga", ONE_STEP)], "w-new").await;
    assert_eq!(finish(&w.engine, run).await.status, RunStatus::Completed);
    let l = ledger(&w.store, run).await;
    assert_eq!(
        l.get(&key("attach", "effect")),
        Some(&1),
        "the run kept its original steps: {l:?}"
    );
    assert!(!l.contains_key(&key("only", "effect")));
    // New runs get the new definition.
    let fresh = submit(&w.engine, "crash-saga", json!({})).await;
    assert_eq!(finish(&w.engine, fresh).await.status, RunStatus::Completed);
    assert_eq!(ledger(&w.store, fresh).await.get(&key("only", "effect")), Some(&1));
    w.stop().await;
}

async fn submit_errors_are_typed_and_request_ids_idempotent(db: TestDb) {
    let e = engine(db.open().await, &[], config("x")).await;
    let unknown = e
        .submit(SubmitRequest {
            definition: "nope".into(),
            input: json!({}),
            request_id: None,
            correlation_id: None,
            by: None,
        })
        .await;
    assert!(matches!(unknown, Err(EngineError::UnknownDefinition(_))));
    let bad = e
        .submit(SubmitRequest {
            definition: "crash-saga".into(),
            input: json!({"hold": "soonish"}),
            request_id: None,
            correlation_id: None,
            by: None,
        })
        .await;
    match bad {
        Err(EngineError::InvalidInput(problems)) => {
            let (field, reason) = &problems.0[0];
            assert_eq!(field, "hold");
            assert!(reason.contains("soonish"));
        }
        other => panic!("{other:?}"),
    }
    let req = || SubmitRequest {
        definition: "crash-saga".into(),
        input: json!({}),
        request_id: Some("r-1".into()),
        correlation_id: None,
        by: None,
    };
    let a = e.submit(req()).await.unwrap();
    let b = e.submit(req()).await.unwrap();
    assert_eq!(a.run.id, b.run.id);
    assert!(a.created && !b.created);
    assert!(matches!(
        e.signal(RunId::new(), "end-test").await,
        Err(EngineError::NotFound(_))
    ));
}

async fn two_workers_share_runs_and_each_effect_happens_once(db: TestDb) {
    let a = start(db.open().await, &[], "wa").await;
    let b = start(db.open().await, &[], "wb").await;
    let mut runs = Vec::new();
    for i in 0..20 {
        let e = if i % 2 == 0 { &a.engine } else { &b.engine };
        runs.push(submit(e, "crash-saga", json!({"hold": "10ms"})).await);
    }
    for r in &runs {
        assert_eq!(finish(&a.engine, *r).await.status, RunStatus::Completed);
    }
    let rows = a.store.ledger(None).await.unwrap();
    let mut per_key = HashMap::new();
    for r in rows {
        *per_key.entry(r.key).or_insert(0) += 1;
    }
    assert_eq!(per_key.len(), 20 * 6);
    assert!(per_key.values().all(|n| *n == 1));
    a.stop().await;
    b.stop().await;
}

async fn a_dead_workers_run_moves_to_another_after_its_lease(db: TestDb) {
    let store = db.open().await;
    let mut cfg = config("doomed");
    cfg.lease_ttl = Duration::from_millis(600);
    let doomed = start_with(store.clone(), &[], cfg).await;
    let run = submit(
        &doomed.engine,
        "crash-saga",
        json!({"hold": "1ms", "test": {"sleep_ms": {"snapshot": 1500}}}),
    )
    .await;
    // Wait until the doomed worker is inside `snapshot`, then kill it (its tasks are dropped).
    loop {
        let row = doomed.engine.get_run(run).await.unwrap().unwrap();
        if row.current_step.as_deref() == Some("snapshot") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    doomed.task.abort();
    let _ = doomed.task.await;
    let mut cfg = config("heir");
    cfg.lease_ttl = Duration::from_millis(600);
    let heir = start_with(store, &[], cfg).await;
    assert_eq!(finish(&heir.engine, run).await.status, RunStatus::Completed);
    let j = journal(&heir.engine, run).await;
    let attempts: Vec<u32> = j
        .iter()
        .filter_map(|e| match &e.record {
            Record::StepStarted { step, attempt, .. } if step == "snapshot" => Some(*attempt),
            _ => None,
        })
        .collect();
    assert_eq!(attempts, vec![1, 2], "the interrupted attempt is resumed as attempt 2");
    assert_eq!(ledger(&heir.store, run).await.get(&key("snapshot", "effect")), Some(&1));
    heir.stop().await;
}

/// A worker with one driving slot, registered with its engine (so submits start on it).
async fn start_one_slot(db: &TestDb, name: &str) -> Worker {
    let mut cfg = config(name);
    cfg.concurrency = 1;
    registered(start_with(db.open().await, &[], cfg).await).await
}

/// `w` once its worker is registered with its engine (so submits start on it).
async fn registered(w: Worker) -> Worker {
    for _ in 0..500 {
        if w.engine.has_local_worker() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    w
}

/// With a worker in the process and a free slot, a submit commits the run already started
/// (first step started, leased to that worker) and the worker drives it from there; without a
/// free slot the run waits, pending, to be claimed.
async fn a_submit_starts_on_the_local_worker_when_it_has_a_slot(db: TestDb) {
    let w = start_one_slot(&db, "local").await;
    let slow = json!({"hold": "1ms", "test": {"sleep_ms": {"snapshot": 800}}});
    let first = w
        .engine
        .submit(SubmitRequest {
            definition: "crash-saga".into(),
            input: slow,
            request_id: None,
            correlation_id: None,
            by: None,
        })
        .await
        .unwrap()
        .run;
    assert_eq!(first.status, RunStatus::Running, "started in the submit's own commit");
    assert_eq!(first.lease_owner.as_deref(), Some("local"));
    assert_eq!(first.last_seq, 2);
    let second = w
        .engine
        .submit(SubmitRequest {
            definition: "crash-saga".into(),
            input: json!({"hold": "1ms"}),
            request_id: None,
            correlation_id: None,
            by: None,
        })
        .await
        .unwrap()
        .run;
    assert_eq!(second.status, RunStatus::Pending, "no free slot: claimed later");
    for run in [first.id, second.id] {
        assert_eq!(finish(&w.engine, run).await.status, RunStatus::Completed);
        let j = journal(&w.engine, run).await;
        let starts: Vec<(String, u32)> = j
            .iter()
            .filter_map(|e| match &e.record {
                Record::StepStarted { step, attempt, .. } => Some((step.clone(), *attempt)),
                _ => None,
            })
            .collect();
        assert!(starts.iter().all(|(_, a)| *a == 1), "one attempt per step: {starts:?}");
        let steps: std::collections::HashSet<&str> = starts.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(steps.len(), starts.len(), "no step started twice: {starts:?}");
        assert!(ledger(&w.store, run).await.values().all(|n| *n == 1));
    }
    w.stop().await;
}

/// While a driver of this process holds a run, the engine knows it (and its correlation id)
/// without a read, and the run's watch feeds say so; when the driver lets go (the run goes to
/// sleep in its hold), the feeds learn it. A repeated request id is answered by the store with
/// the existing run, and the worker slot the repeat had reserved is given back.
async fn a_run_driven_here_is_known_to_its_watchers(db: TestDb) {
    let w = start_one_slot(&db, "here").await;
    let req = |request_id: &str, input: Value| SubmitRequest {
        definition: "crash-saga".into(),
        input,
        request_id: Some(request_id.into()),
        correlation_id: Some(format!("corr-{request_id}")),
        by: None,
    };
    let slow = json!({"hold": "60s", "test": {"sleep_ms": {"snapshot": 600}}});
    let first = w.engine.submit(req("a", slow.clone())).await.unwrap();
    assert!(first.created);
    let run = first.run.id;
    // Known as driven here from the moment its submit answers, whether or not the worker's
    // driver has started yet: a watch the client opens next reads nothing from the store.
    assert_eq!(w.engine.executing_correlation_id(run).as_deref(), Some("corr-a"));
    let feed = w.engine.watch_run(run);
    assert!(feed.executing_here());
    let fed = feed.take_after(0);
    assert!(!first.journal.is_empty() && fed.len() >= first.journal.len(), "{fed:?}");
    for (held, committed) in fed.iter().zip(&first.journal) {
        assert_eq!((held.seq, &held.record), (committed.seq, &committed.record));
    }
    wait_step(&w.engine, run, "snapshot").await;
    assert_eq!(w.engine.executing_correlation_id(run).as_deref(), Some("corr-a"));
    assert!(feed.executing_here());
    // A watch that starts now gets the run's whole journal from memory, as stored.
    let stored = journal(&w.engine, run).await;
    let late = w.engine.watch_run(run).take_after(0);
    assert_eq!(late.first().map(|e| e.seq), Some(1), "{late:?}");
    assert!(late.len() >= stored.len(), "{late:?}");
    for (held, read) in late.iter().zip(&stored) {
        assert_eq!((held.seq, &held.record, held.at), (read.seq, &read.record, read.at));
    }
    // The run is asleep in its hold: no driver holds it, and its feed was told.
    wait_status(&w.engine, run, RunStatus::Holding).await;
    for _ in 0..2500 {
        if !feed.executing_here() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(!feed.executing_here());
    assert_eq!(w.engine.executing_correlation_id(run), None);
    // A repeat of request "a" while the only slot is free: the same run, not started again.
    let again = w.engine.submit(req("a", slow)).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.run.id, run);
    assert_eq!(count(&journal(&w.engine, run).await, "run_submitted"), 1);
    // The slot the repeat had reserved is free again: a new run starts in its submit.
    let next = w.engine.submit(req("b", json!({"hold": "1ms"}))).await.unwrap();
    assert!(next.created);
    assert_eq!(
        next.run.status,
        RunStatus::Running,
        "started in the submit's own commit"
    );
    assert_eq!(finish(&w.engine, next.run.id).await.status, RunStatus::Completed);
    // Its driver lets go just after the terminal commit that `finish` saw.
    for _ in 0..2500 {
        if w.engine.executing_correlation_id(next.run.id).is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(w.engine.executing_correlation_id(next.run.id), None);
    w.stop().await;
}

/// A submit whose caller goes away while it commits (a client that disconnects mid-request)
/// still hands the run it started to the worker: the run is not left leased and undriven until
/// its lease expires (a minute here, beyond the whole wait).
async fn a_submit_dropped_while_it_commits_still_hands_its_run_to_the_worker(db: TestDb) {
    let mut cfg = config("local");
    cfg.lease_ttl = Duration::from_secs(60);
    let w = registered(start_with(db.open().await, &[], cfg).await).await;
    let mut submit = Box::pin(w.engine.submit(SubmitRequest {
        // Its second step takes 800 ms: time to see the run leased to this worker.
        definition: "crash-saga".into(),
        input: json!({"hold": "1ms", "test": {"sleep_ms": {"snapshot": 800}}}),
        request_id: Some("dropped-while-committing".into()),
        correlation_id: None,
        by: None,
    }));
    // One poll queues the run's commit; then the caller is gone. (On a loaded machine the
    // writer may answer within that one poll: then nothing was cut short, and the rest holds.)
    if futures::poll!(submit.as_mut()).is_ready() {
        eprintln!("the commit finished within the first poll: the submit was not cut short");
    }
    drop(submit);
    let mut row = None;
    for _ in 0..2000 {
        row = w.store.find_by_request_id("dropped-while-committing").await.unwrap();
        if row.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let row = row.expect("the submit committed although its caller went away");
    assert_eq!(
        row.lease_owner.as_deref(),
        Some("local"),
        "started in the submit's own commit"
    );
    // 20 s: a third of the lease. (After its hold the run is claimed again, like any run woken
    // by its timer.)
    let done = w.engine.wait_terminal(row.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(
        done.status,
        RunStatus::Completed,
        "driven at once, not after the lease expired: {:?}",
        done.state
    );
    w.stop().await;
}

on_both_backends!(
    a_run_driven_here_is_known_to_its_watchers,
    a_submit_starts_on_the_local_worker_when_it_has_a_slot,
    a_submit_dropped_while_it_commits_still_hands_its_run_to_the_worker,
    happy_path_with_hold_timer,
    retries_sleep_in_the_database_then_succeed,
    permanent_failure_rolls_back_in_reverse,
    a_failed_compensation_needs_an_operator,
    the_end_signal_ends_the_hold_once,
    an_early_signal_waits_for_the_hold,
    cancel_in_the_hold_rolls_back,
    cancel_while_asleep_in_backoff,
    a_cancel_during_the_last_step_is_recorded_as_too_late,
    a_step_that_times_out_is_retried_then_fails,
    runs_are_pinned_to_the_definition_they_started_with,
    submit_errors_are_typed_and_request_ids_idempotent,
    two_workers_share_runs_and_each_effect_happens_once,
    a_dead_workers_run_moves_to_another_after_its_lease,
);

async fn an_unexpected_signal_is_recorded_and_the_hold_goes_on(db: TestDb) {
    let w = start(db.open().await, &[], "w1").await;
    let run = submit(&w.engine, "crash-saga", json!({"hold": "400ms"})).await;
    wait_status(&w.engine, run, RunStatus::Holding).await;
    assert_eq!(w.engine.signal(run, "poke").await.unwrap(), SignalOutcome::Accepted);
    // The hold goes on and its timer still fires exactly once.
    assert_eq!(finish(&w.engine, run).await.status, RunStatus::Completed);
    let j = journal(&w.engine, run).await;
    let signals: Vec<_> = j
        .iter()
        .filter_map(|e| match &e.record {
            Record::SignalReceived { name, applied, .. } => Some((name.clone(), *applied)),
            _ => None,
        })
        .collect();
    assert_eq!(signals, vec![("poke".to_string(), false)]);
    assert_eq!(count(&j, "timer_fired"), 1);
    w.stop().await;
}

on_both_backends!(an_unexpected_signal_is_recorded_and_the_hold_goes_on);

async fn wait_step(e: &Engine, run: RunId, step: &str) {
    for _ in 0..1500 {
        if e.get_run(run).await.unwrap().unwrap().current_step.as_deref() == Some(step) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("run {run} never reached step {step}");
}

async fn shutdown_lets_the_step_finish_and_hands_the_run_back(db: TestDb) {
    let store = db.open().await;
    let w = start(store.clone(), &[], "leaving").await;
    let run = submit(
        &w.engine,
        "crash-saga",
        json!({"hold": "1ms", "test": {"sleep_ms": {"snapshot": 400}}}),
    )
    .await;
    wait_step(&w.engine, run, "snapshot").await;
    // Let the action begin (it sleeps 400 ms): a step whose start is committed but whose action
    // has not begun yet is handed back at once on shutdown and resumes elsewhere as attempt 2,
    // which is another case.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let stopped = tokio::time::Instant::now();
    let engine = w.engine.clone();
    w.stop().await; // in-flight step finishes within the 2s grace, then the lease is handed back
    assert!(
        stopped.elapsed() < Duration::from_secs(2),
        "waited for the step, not the grace"
    );
    let row = store.get_run(run).await.unwrap().unwrap();
    assert!(!row.status.is_terminal());
    assert_eq!(row.lease_owner, None, "lease handed back on shutdown");
    let j = journal(&engine, run).await;
    assert!(j
        .iter()
        .any(|e| matches!(&e.record, Record::StepSucceeded { step, .. } if step == "snapshot")));
    // Another worker carries on at once (no lease to wait out).
    let next = start(store, &[], "next").await;
    assert_eq!(finish(&next.engine, run).await.status, RunStatus::Completed);
    assert_eq!(ledger(&next.store, run).await.get(&key("snapshot", "effect")), Some(&1));
    next.stop().await;
}

async fn shutdown_grace_over_releases_the_run_mid_step(db: TestDb) {
    let store = db.open().await;
    let mut cfg = config("leaving");
    cfg.shutdown_grace = Duration::from_millis(200);
    let w = start_with(store.clone(), &[], cfg).await;
    let run = submit(
        &w.engine,
        "crash-saga",
        json!({"hold": "1ms", "test": {"sleep_ms": {"snapshot": 3000}}}),
    )
    .await;
    wait_step(&w.engine, run, "snapshot").await;
    let stopped = tokio::time::Instant::now();
    w.stop().await;
    assert!(
        stopped.elapsed() < Duration::from_secs(2),
        "the grace deadline ended the wait"
    );
    let row = store.get_run(run).await.unwrap().unwrap();
    assert_eq!(row.lease_owner, None);
    assert_eq!(row.current_step.as_deref(), Some("snapshot"));
    let next = start(store, &[], "next").await;
    assert_eq!(finish(&next.engine, run).await.status, RunStatus::Completed);
    let attempts = journal(&next.engine, run)
        .await
        .iter()
        .filter(|e| matches!(&e.record, Record::StepStarted { step, .. } if step == "snapshot"))
        .count();
    assert_eq!(attempts, 2, "the abandoned attempt is resumed as the next one");
    next.stop().await;
}

on_both_backends!(
    shutdown_lets_the_step_finish_and_hands_the_run_back,
    shutdown_grace_over_releases_the_run_mid_step
);
