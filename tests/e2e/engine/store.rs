//! The Store conformance suite: the same cases against SQLite and PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tern::domain::failover::JobSubject;
use tern::domain::run::Phase;
use tern::domain::run::{Record, RunState, RunStatus};
use tern::domain::{RunId, StepError, Timestamp};
use tern::store::{
    projection, Checkpoint, JobFilter, Lease, LedgerRow, NewRun, RunFilter, RunStore, SignalOutcome, Start, Store,
    StoreError,
};

use crate::common::TestDb;
use crate::on_both_backends;

const TTL: Duration = Duration::from_secs(30);

fn new_run(request_id: Option<&str>, now: Timestamp) -> NewRun {
    let record = Record::RunSubmitted {
        definition: "demo".into(),
        definition_hash: "h1".into(),
        input: json!({"vm_id": "vm-1", "vm_name": "pgtest1"}),
        by: None,
    };
    NewRun {
        id: RunId::new(),
        definition: "demo".into(),
        definition_hash: "h1".into(),
        definition_source: "name = 'demo'".into(),
        job_type: "test".into(),
        request_id: request_id.map(str::to_string),
        correlation_id: "corr-1".into(),
        input: json!({"vm_id": "vm-1", "vm_name": "pgtest1"}),
        subject: JobSubject {
            vm_id: "vm-1".into(),
            vm_name: Some("pgtest1".into()),
            ..JobSubject::default()
        },
        lock_key: None,
        display_status: "pending".into(),
        projection: projection::project(std::slice::from_ref(&record), "pending", "corr-1"),
        record,
        now,
        start: None,
        trace_parent: Some(TRACE_PARENT.into()),
    }
}

const TRACE_PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn started(step: &str, attempt: u32) -> Record {
    Record::StepStarted {
        phase: Phase::Forward,
        step: step.into(),
        attempt,
        idempotency_key: format!("k/{step}"),
    }
}

/// A checkpoint moving a run from `from` (at `seq`) into `state` with `records`.
fn cp(
    run: RunId,
    lease: &Lease,
    seq: i64,
    from: RunStatus,
    state: RunState,
    records: Vec<Record>,
    now: Timestamp,
) -> Checkpoint {
    let live = matches!(state, RunState::Running { .. } | RunState::Compensating { .. });
    Checkpoint {
        run_id: run,
        lease: lease.clone(),
        expected_seq: seq,
        expected_status: from,
        current_step: None,
        context: None,
        wake_at: state.wake_at(now),
        wake_on_signal: state.accepts_signals(),
        release: !live,
        consumed_signals: vec![],
        consumed_cancel: false,
        projection: projection::project(&records, "executing", "corr-1"),
        display_status: "executing".into(),
        state,
        records,
        now,
    }
}

fn running(step: usize) -> RunState {
    RunState::Running {
        phase: Phase::Forward,
        step,
        attempt: 1,
    }
}

async fn claim_one(s: &Arc<dyn Store>, owner: &str, now: Timestamp) -> (tern::store::RunRow, Lease) {
    let mut got = s.claim(owner, 1, TTL, now).await.unwrap();
    assert_eq!(got.len(), 1, "{owner} expected to claim one run");
    got.remove(0)
}

async fn submit_is_idempotent_by_request_id(db: TestDb) {
    let s = db.open().await;
    let now = Timestamp::now();
    let a = s.submit(new_run(Some("req-1"), now)).await.unwrap();
    assert!(a.created);
    let b = s.submit(new_run(Some("req-1"), now)).await.unwrap();
    assert!(!b.created);
    assert_eq!(a.run.id, b.run.id);
    assert_eq!(a.run.trace_parent.as_deref(), Some(TRACE_PARENT));
    let (claimed, _) = claim_one(&s, "w", now).await;
    assert_eq!(claimed.trace_parent.as_deref(), Some(TRACE_PARENT), "kept with the run");
    assert_eq!(s.journal(a.run.id, 0, 100).await.unwrap().len(), 1);
    assert_eq!(
        s.list_runs(&RunFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .len(),
        1
    );
    assert_eq!(
        s.definition_source("h1").await.unwrap().as_deref(),
        Some("name = 'demo'")
    );
    let job = s.failover_job(a.run.id).await.unwrap().expect("failover_jobs row");
    assert_eq!(job.vm_id, "vm-1");
    assert_eq!(job.status, "pending");
    assert_eq!(job.correlation_id.as_deref(), Some("corr-1"));
}

async fn concurrent_submits_with_one_request_id_make_one_run(db: TestDb) {
    let s = db.open().await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.submit(new_run(Some("same"), Timestamp::now())).await
        }));
    }
    let mut ids = std::collections::HashSet::new();
    let mut created = 0;
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        created += usize::from(r.created);
        ids.insert(r.run.id);
    }
    assert_eq!(created, 1);
    assert_eq!(ids.len(), 1);
}

/// One unfinished run per lock key, whoever wins the race: the database decides.
async fn concurrent_submits_with_one_lock_key_make_one_run(db: TestDb) {
    let s = db.open().await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = new_run(None, Timestamp::now());
            r.lock_key = Some("vm-1".into());
            s.submit(r).await
        }));
    }
    let mut won = Vec::new();
    let mut conflicts = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => won.push(r.run.id),
            Err(StoreError::Conflict { key }) => {
                assert_eq!(key, "vm-1");
                conflicts += 1;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!((won.len(), conflicts), (1, 7));
    // Other keys and runs without a key are not affected.
    let mut other = new_run(None, Timestamp::now());
    other.lock_key = Some("vm-2".into());
    s.submit(other).await.unwrap();
    s.submit(new_run(None, Timestamp::now())).await.unwrap();
    // The failover_jobs listing: filters and keyset pagination, newest first.
    let all = s
        .list_failover_jobs(&JobFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 3);
    assert!(all.windows(2).all(|w| w[0].job_id > w[1].job_id));
    let page2 = s
        .list_failover_jobs(&JobFilter {
            before: Some(all[0].job_id.parse().unwrap()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page2, all[1..].to_vec());
    let none = s
        .list_failover_jobs(&JobFilter {
            definitions: vec!["other".into()],
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(none.is_empty());
    let demo = s
        .list_failover_jobs(&JobFilter {
            definitions: vec!["demo".into(), "x".into()],
            vm_id: Some("vm-1".into()),
            job_type: Some("test".into()),
            status: Some("pending".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(demo.len(), 3);
}

async fn claims_lease_and_fence_stale_workers(db: TestDb) {
    let s = db.open().await;
    let now = Timestamp::now();
    let run = s.submit(new_run(None, now)).await.unwrap().run;
    let (row, a) = claim_one(&s, "A", now).await;
    assert_eq!(row.id, run.id);
    assert_eq!(row.lease_owner.as_deref(), Some("A"));
    // Leased: nobody else gets it.
    assert!(s.claim("B", 5, TTL, now).await.unwrap().is_empty());
    // A commits step 0 started.
    s.checkpoint(cp(
        run.id,
        &a,
        1,
        RunStatus::Pending,
        running(0),
        vec![started("s0", 1)],
        now,
    ))
    .await
    .unwrap();
    s.heartbeat(run.id, &a, now.plus(TTL)).await.unwrap();
    // The lease expires (A is presumed dead); B re-claims with a higher fencing token.
    let later = now.plus(TTL + TTL);
    let (row, b) = claim_one(&s, "B", later).await;
    assert!(b.token > a.token, "{b:?} vs {a:?}");
    assert_eq!(row.state, running(0));
    // A comes back: every write is refused with the typed error.
    let stale = s
        .checkpoint(cp(
            run.id,
            &a,
            2,
            RunStatus::Running,
            running(1),
            vec![started("s1", 1)],
            later,
        ))
        .await;
    assert!(matches!(stale, Err(StoreError::Fenced { .. })), "{stale:?}");
    assert!(matches!(
        s.heartbeat(run.id, &a, later.plus(TTL)).await,
        Err(StoreError::Fenced { .. })
    ));
    // B carries on.
    let out = s
        .checkpoint(cp(
            run.id,
            &b,
            2,
            RunStatus::Running,
            running(0),
            vec![started("s0", 2)],
            later,
        ))
        .await
        .unwrap();
    assert_eq!(out.last_seq, 3);
}

async fn checkpoint_is_a_compare_and_set_on_the_journal_position(db: TestDb) {
    let s = db.open().await;
    let now = Timestamp::now();
    let run = s.submit(new_run(None, now)).await.unwrap().run;
    let (_, l) = claim_one(&s, "A", now).await;
    let two = vec![
        started("s0", 1),
        Record::StepSucceeded {
            phase: Phase::Forward,
            step: "s0".into(),
            attempt: 1,
            output: json!({"id": 1}),
        },
    ];
    let out = s
        .checkpoint(cp(run.id, &l, 1, RunStatus::Pending, running(1), two.clone(), now))
        .await
        .unwrap();
    assert_eq!(out.last_seq, 3);
    // Replaying the same expected position fails: the state moved on.
    let again = s
        .checkpoint(cp(run.id, &l, 1, RunStatus::Pending, running(1), two, now))
        .await;
    assert!(matches!(again, Err(StoreError::Fenced { .. })));
    // Wrong expected status fails too.
    let wrong = s
        .checkpoint(cp(
            run.id,
            &l,
            3,
            RunStatus::Holding,
            running(2),
            vec![started("s2", 1)],
            now,
        ))
        .await;
    assert!(matches!(wrong, Err(StoreError::Fenced { .. })));
    let j = s.journal(run.id, 0, 100).await.unwrap();
    assert_eq!(j.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(
        j[2].record,
        Record::StepSucceeded {
            phase: Phase::Forward,
            step: "s0".into(),
            attempt: 1,
            output: json!({"id": 1})
        }
    );
    assert_eq!(s.journal(run.id, 2, 100).await.unwrap().len(), 1);
}

async fn sleeping_runs_wake_at_their_time_only(db: TestDb) {
    let s = db.open().await;
    let now = Timestamp::now();
    let run = s.submit(new_run(None, now)).await.unwrap().run;
    let (_, l) = claim_one(&s, "A", now).await;
    let at = now.plus(Duration::from_secs(60));
    let backoff = RunState::Backoff {
        phase: Phase::Forward,
        step: 0,
        attempt: 2,
        at,
    };
    let failed = Record::StepFailed {
        phase: Phase::Forward,
        step: "s0".into(),
        attempt: 1,
        error: StepError::retryable("E", "x"),
        retry_at: Some(at),
    };
    s.checkpoint(cp(run.id, &l, 1, RunStatus::Pending, backoff, vec![failed], now))
        .await
        .unwrap();
    let row = s.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(row.lease_owner, None, "sleeping releases the lease");
    assert_eq!(row.wake_at, Some(at));
    assert_eq!(row.status, RunStatus::Sleeping);
    assert!(s.claim("B", 5, TTL, now).await.unwrap().is_empty());
    assert_eq!(s.next_wake_after(now).await.unwrap(), Some(at));
    let (_, _) = claim_one(&s, "B", at).await;
}

async fn signals_are_durable_idempotent_and_wake_a_holding_run(db: TestDb) {
    let s = db.open().await;
    let now = Timestamp::now();
    let run = s.submit(new_run(None, now)).await.unwrap().run;
    let (_, l) = claim_one(&s, "A", now).await;
    s.checkpoint(cp(
        run.id,
        &l,
        1,
        RunStatus::Pending,
        RunState::Holding { until: None },
        vec![],
        now,
    ))
    .await
    .unwrap();
    let row = s.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(row.wake_at, None, "a hold without a timer waits for a signal only");
    assert!(s.claim("B", 5, TTL, now).await.unwrap().is_empty());
    assert_eq!(
        s.signal(run.id, "end-test", Some("bob"), now).await.unwrap(),
        SignalOutcome::Accepted
    );
    assert_eq!(
        s.signal(run.id, "end-test", None, now).await.unwrap(),
        SignalOutcome::Duplicate
    );
    let pending = s.pending_signals(run.id).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].by.as_deref(), Some("bob"), "the first sender's name is kept");
    let (row, b) = claim_one(&s, "B", now).await;
    assert_eq!(row.signals_pending, 1);
    let mut c = cp(
        run.id,
        &b,
        1,
        RunStatus::Holding,
        running(0),
        vec![Record::SignalReceived {
            name: "end-test".into(),
            applied: true,
            by: Some("bob".into()),
        }],
        now,
    );
    c.consumed_signals = vec![pending[0].id];
    let out = s.checkpoint(c).await.unwrap();
    assert_eq!(out.signals_pending, 0);
    assert!(s.pending_signals(run.id).await.unwrap().is_empty());
    let missing = s.signal(RunId::new(), "end-test", None, now).await;
    assert!(matches!(missing, Err(StoreError::NotFound(_))));
}

async fn a_signal_racing_a_run_going_to_sleep_is_not_lost(db: TestDb) {
    let s = db.open().await;
    let now = Timestamp::now();
    let run = s.submit(new_run(None, now)).await.unwrap().run;
    let (_, l) = claim_one(&s, "A", now).await;
    s.checkpoint(cp(
        run.id,
        &l,
        1,
        RunStatus::Pending,
        running(0),
        vec![started("s0", 1)],
        now,
    ))
    .await
    .unwrap();
    // The signal lands while the run is still running (not yet holding)...
    assert_eq!(
        s.signal(run.id, "end-test", None, now).await.unwrap(),
        SignalOutcome::Accepted
    );
    // ...and the worker then puts it into a far-off hold: it must wake at once instead.
    let far = now.plus(Duration::from_secs(3600));
    let hold = RunState::Holding { until: Some(far) };
    s.checkpoint(cp(
        run.id,
        &l,
        2,
        RunStatus::Running,
        hold,
        vec![Record::TimerSet { at: far }],
        now,
    ))
    .await
    .unwrap();
    let row = s.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(row.wake_at, Some(now));
    claim_one(&s, "B", now).await;
}

async fn cancel_is_durable_and_idempotent(db: TestDb) {
    let s = db.open().await;
    let now = Timestamp::now();
    let run = s.submit(new_run(None, now)).await.unwrap().run;
    let (_, l) = claim_one(&s, "A", now).await;
    let at = now.plus(Duration::from_secs(600));
    let b = RunState::Backoff {
        phase: Phase::Forward,
        step: 0,
        attempt: 2,
        at,
    };
    s.checkpoint(cp(run.id, &l, 1, RunStatus::Pending, b, vec![], now))
        .await
        .unwrap();
    assert_eq!(
        s.cancel(run.id, "operator", Some("alice"), now).await.unwrap(),
        SignalOutcome::Accepted
    );
    assert_eq!(
        s.cancel(run.id, "again", None, now).await.unwrap(),
        SignalOutcome::Duplicate
    );
    let row = s.get_run(run.id).await.unwrap().unwrap();
    assert!(row.cancel_pending);
    assert_eq!(row.cancel_reason.as_deref(), Some("operator"));
    assert_eq!(
        row.cancel_by.as_deref(),
        Some("alice"),
        "who asked is kept for the journal"
    );
    assert_eq!(row.wake_at, Some(now), "cancel wakes a run asleep in backoff");
    let (_, l2) = claim_one(&s, "B", now).await;
    let mut c = cp(
        run.id,
        &l2,
        1,
        RunStatus::Sleeping,
        RunState::Cancelled {
            reason: "operator".into(),
        },
        vec![],
        now,
    );
    c.consumed_cancel = true;
    let out = s.checkpoint(c).await.unwrap();
    assert!(!out.cancel_pending);
    assert_eq!(
        s.cancel(run.id, "late", None, now).await.unwrap(),
        SignalOutcome::Finished(RunStatus::Cancelled)
    );
    assert_eq!(
        s.signal(run.id, "end-test", None, now).await.unwrap(),
        SignalOutcome::Finished(RunStatus::Cancelled)
    );
    assert_eq!(s.get_run(run.id).await.unwrap().unwrap().wake_at, None);
}

async fn list_is_newest_first_with_keyset_pages_and_filters(db: TestDb) {
    let s = db.open().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(s.submit(new_run(None, Timestamp::now())).await.unwrap().run.id);
    }
    let page1 = s
        .list_runs(&RunFilter {
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page1.iter().map(|r| r.id).collect::<Vec<_>>(), vec![ids[4], ids[3]]);
    let page2 = s
        .list_runs(&RunFilter {
            limit: 2,
            before: Some(ids[3]),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page2.iter().map(|r| r.id).collect::<Vec<_>>(), vec![ids[2], ids[1]]);
    let pending = RunFilter {
        limit: 10,
        status: Some(RunStatus::Pending),
        ..Default::default()
    };
    assert_eq!(s.list_runs(&pending).await.unwrap().len(), 5);
    let done = RunFilter {
        limit: 10,
        status: Some(RunStatus::Completed),
        ..Default::default()
    };
    assert!(s.list_runs(&done).await.unwrap().is_empty());
    let other = RunFilter {
        limit: 10,
        definition: Some("other".into()),
        ..Default::default()
    };
    assert!(s.list_runs(&other).await.unwrap().is_empty());
    assert_eq!(s.count_by_status().await.unwrap(), vec![(RunStatus::Pending, 5)]);
}

async fn projections_follow_the_journal_in_the_same_transaction(db: TestDb) {
    let s = db.open().await;
    let now = Timestamp::now();
    let run = s.submit(new_run(None, now)).await.unwrap().run;
    let (_, l) = claim_one(&s, "A", now).await;
    let recs = vec![
        started("snapshot", 1),
        Record::StepProgress {
            phase: Phase::Forward,
            step: "snapshot".into(),
            attempt: 1,
            data: json!({"snapshot_name": "tern-snap-1"}),
        },
    ];
    let mut c = cp(run.id, &l, 1, RunStatus::Pending, running(0), recs, now);
    c.projection = projection::project(&c.records, "snapshotting", "corr-1");
    c.display_status = "snapshotting".into();
    s.checkpoint(c).await.unwrap();
    let job = s.failover_job(run.id).await.unwrap().unwrap();
    assert_eq!(job.status, "snapshotting");
    assert_eq!(
        job.linstor_snapshot_name.as_deref(),
        Some("tern-snap-1"),
        "recorded before the step finished"
    );
    assert!(job.started_at.is_some());
    let fin = vec![
        Record::StepSucceeded {
            phase: Phase::Forward,
            step: "snapshot".into(),
            attempt: 1,
            output: json!({"destination_vm_id": "vm-9", "network_mappings": {"VM Network": "net-1"}}),
        },
        Record::RunFinished {
            status: RunStatus::Completed,
            error: None,
            undone: vec![],
        },
    ];
    let mut c = cp(run.id, &l, 3, RunStatus::Running, RunState::Completed, fin, now);
    c.projection = projection::project(&c.records, "completed", "corr-1");
    s.checkpoint(c).await.unwrap();
    let job = s.failover_job(run.id).await.unwrap().unwrap();
    assert_eq!(job.status, "completed");
    assert_eq!(job.destination_vm_id.as_deref(), Some("vm-9"));
    assert_eq!(job.linstor_snapshot_name.as_deref(), Some("tern-snap-1"));
    let applied = [("VM Network".to_string(), "net-1".to_string())];
    assert_eq!(job.network_mappings, Some(applied.into_iter().collect()));
    assert!(job.completed_at.is_some());
    let tracking = s.job_tracking(run.id).await.unwrap();
    assert_eq!(tracking.len(), 1);
    assert_eq!(tracking[0].correlation_id.as_deref(), Some("corr-1"));
    assert_eq!(tracking[0].operation, "snapshot");
    assert_eq!(tracking[0].status, "completed");
    assert_eq!(tracking[0].parent_job_id, run.id.to_string());
}

async fn ledger_adopts_by_key(db: TestDb) {
    let s = db.open().await;
    let run = RunId::new();
    let row = LedgerRow {
        key: "k1".into(),
        run_id: run,
        step: "a".into(),
        attempt: 1,
        kind: "effect".into(),
    };
    assert!(s.ledger_record(&row, true).await.unwrap());
    assert!(!s
        .ledger_record(
            &LedgerRow {
                attempt: 2,
                ..row.clone()
            },
            true
        )
        .await
        .unwrap());
    assert_eq!(s.ledger(Some(run)).await.unwrap().len(), 1);
    assert!(s.ledger_record(&row, false).await.unwrap());
    assert_eq!(s.ledger(None).await.unwrap().len(), 2);
}

async fn releasing_a_lease_makes_the_run_claimable_at_once(db: TestDb) {
    let s = db.open().await;
    let now = Timestamp::now();
    s.submit(new_run(None, now)).await.unwrap();
    let (row, l) = claim_one(&s, "A", now).await;
    s.release(row.id, &l).await.unwrap();
    let (_, l2) = claim_one(&s, "B", now).await;
    assert!(l2.token > l.token);
}

async fn inventory_and_network_mappings(db: TestDb) {
    use tern::domain::inventory::{Disk, NetworkKind, NetworkMapping, Nic, VmRecord};
    let s = db.open().await;
    let vm = VmRecord {
        vm_id: "420570c7".into(),
        name: "pgtest1".into(),
        cpu_count: 2,
        memory_mb: 4096,
        os_type: "windows".into(),
        nics: vec![
            Nic {
                source_network: "VM Network".into(),
                mac: None,
                ip: None,
            },
            Nic {
                source_network: "Backup".into(),
                mac: Some("00:50:56:aa:bb:cc".into()),
                ip: Some("10.0.9.7".into()),
            },
        ],
        boot_disk: Disk {
            size_bytes: Some(40 << 30),
            ..Disk::of("vol-1")
        },
        data_disks: vec![
            Disk {
                volume_id: "vol-2".into(),
                size_bytes: Some(100 << 30),
                unit_number: 1,
            },
            Disk {
                volume_id: "vol-3".into(),
                size_bytes: None,
                unit_number: 2,
            },
        ],
        oma_vm_id: "oma-1".into(),
        last_sync_change_id: Some("52 3c/5".into()),
    };
    let now = Timestamp::now();
    s.upsert_vm_record(&vm, now).await.unwrap();
    let mut renamed = vm.clone();
    renamed.memory_mb = 8192;
    s.upsert_vm_record(&renamed, now).await.unwrap();
    assert_eq!(s.vm_record("420570c7").await.unwrap(), Some(renamed.clone()));
    assert_eq!(s.find_vm_record("pgtest1").await.unwrap(), Some(renamed.clone()));
    assert_eq!(s.find_vm_record("nope").await.unwrap(), None);
    assert_eq!(s.vm_records().await.unwrap().len(), 1);
    let m = |net: &str, kind| NetworkMapping {
        vm_id: vm.vm_id.clone(),
        source_network: "VM Network".into(),
        destination_network_id: net.into(),
        kind,
    };
    s.set_network_mappings(&vm.vm_id, NetworkKind::Test, &[m("net-t", NetworkKind::Test)])
        .await
        .unwrap();
    s.set_network_mappings(
        &vm.vm_id,
        NetworkKind::Production,
        &[m("net-p", NetworkKind::Production)],
    )
    .await
    .unwrap();
    s.set_network_mappings(&vm.vm_id, NetworkKind::Test, &[m("net-t2", NetworkKind::Test)])
        .await
        .unwrap();
    let got = s.network_mappings(&vm.vm_id).await.unwrap();
    assert_eq!(
        got,
        vec![m("net-p", NetworkKind::Production), m("net-t2", NetworkKind::Test)]
    );
    // Active jobs come from the failover_jobs projection (completed_at still empty).
    let mut r = new_run(None, now);
    r.input = json!({"vm_id": "420570c7"});
    r.subject.vm_id = "420570c7".into();
    let run = s.submit(r).await.unwrap().run;
    assert_eq!(
        s.active_jobs_for_vm("420570c7", None).await.unwrap(),
        vec![run.id.to_string()]
    );
    assert!(s.active_jobs_for_vm("420570c7", Some(run.id)).await.unwrap().is_empty());
    assert!(s.active_jobs_for_vm("other", None).await.unwrap().is_empty());
}

async fn submit_and_start_commits_the_first_step_leased_to_the_submitter(db: TestDb) {
    let s = db.open().await;
    let now = Timestamp::now();
    let mut run = new_run(None, now);
    run.start = Some(Start {
        lease: Lease {
            owner: "local".into(),
            token: 1,
        },
        lease_expires_at: now.plus(TTL),
        state: running(0),
        records: vec![started("s0", 1)],
        current_step: Some("s0".into()),
    });
    let all = vec![run.record.clone(), started("s0", 1)];
    run.projection = projection::project(&all, "executing", "corr-1");
    run.display_status = "executing".into();
    let submitted = s.submit(run).await.unwrap();
    let row = submitted.run;
    assert_eq!(row.status, RunStatus::Running);
    assert_eq!((row.last_seq, row.fencing_token), (2, 1));
    assert_eq!(row.lease_owner.as_deref(), Some("local"));
    assert_eq!(row.current_step.as_deref(), Some("s0"));
    assert!(row.started_at.is_some());
    assert_eq!(row.wake_at, Some(now), "running: due at once for a taker-over");
    let j = s.journal(row.id, 0, 10).await.unwrap();
    assert_eq!(j.len(), 2);
    assert_eq!(j[1].record, started("s0", 1));
    // The submit answers with exactly what it stored.
    assert_eq!(submitted.journal, j);
    // Leased: nobody else claims it while the lease lasts...
    assert!(s.claim("other", 10, TTL, now).await.unwrap().is_empty());
    // ...the submitter checkpoints under it...
    let lease = Lease {
        owner: "local".into(),
        token: 1,
    };
    let out = s
        .checkpoint(cp(
            row.id,
            &lease,
            2,
            RunStatus::Running,
            running(1),
            vec![started("s1", 1)],
            now.plus(Duration::from_secs(1)),
        ))
        .await
        .unwrap();
    assert_eq!(out.last_seq, 3);
    // Still due: it keeps its earlier wake-up time (the row is then updated in place).
    assert_eq!(s.get_run(row.id).await.unwrap().unwrap().wake_at, Some(now));
    // ...and if it dies, the run is claimed after the lease with a higher token.
    let later = now.plus(TTL + Duration::from_secs(1));
    let (again, l2) = claim_one(&s, "other", later).await;
    assert_eq!((again.id, l2.token, again.status), (row.id, 2, RunStatus::Running));
    let job = s.failover_job(row.id).await.unwrap().unwrap();
    assert_eq!(job.status, "executing");
    assert!(job.started_at.is_some());
    let tracking = s.job_tracking(row.id).await.unwrap();
    assert_eq!(
        tracking.iter().map(|t| t.operation.as_str()).collect::<Vec<_>>(),
        vec!["s0", "s1"]
    );
}

/// Spawns the checkpoint "step s0 started" of `run`, expected at `seq` (still pending).
fn spawn_start(
    s: &Arc<dyn Store>,
    run: RunId,
    lease: Lease,
    seq: i64,
    now: Timestamp,
) -> tokio::task::JoinHandle<Result<tern::store::CheckpointOutcome, StoreError>> {
    let s = s.clone();
    tokio::spawn(async move {
        s.checkpoint(cp(
            run,
            &lease,
            seq,
            RunStatus::Pending,
            running(0),
            vec![started("s0", 1)],
            now,
        ))
        .await
    })
}

/// Many checkpoints at once (one group commit on SQLite), some of them stale: each is its own
/// compare-and-set, the stale ones write nothing and the others all land.
async fn concurrent_checkpoints_each_compare_and_set_alone(db: TestDb) {
    let s = db.open().await;
    let now = Timestamp::now();
    let mut runs = Vec::new();
    for _ in 0..40 {
        runs.push(s.submit(new_run(None, now)).await.unwrap().run.id);
    }
    let claimed = s.claim("A", 40, TTL, now).await.unwrap();
    assert_eq!(claimed.len(), 40);
    let mut tasks = Vec::new();
    // Checkpoints of runs that do not exist, in the same batches: refused, and nothing of them
    // is written (PostgreSQL has no foreign key on the journal: the statement itself writes
    // journal rows only for runs it just updated).
    let lease = claimed[0].1.clone();
    for _ in 0..8 {
        let unknown = RunId::new();
        tasks.push((usize::MAX, unknown, spawn_start(&s, unknown, lease.clone(), 1, now)));
    }
    for (i, (run, lease)) in claimed.into_iter().enumerate() {
        // Every third checkpoint expects a position the run is not at.
        let seq = if i % 3 == 0 { 7 } else { run.last_seq };
        tasks.push((i, run.id, spawn_start(&s, run.id, lease, seq, now)));
    }
    for (i, id, t) in tasks {
        let r = t.await.unwrap();
        let j = s.journal(id, 0, 10).await.unwrap();
        if i == usize::MAX {
            assert!(matches!(r, Err(StoreError::Fenced { .. })), "unknown run: {r:?}");
            assert!(j.is_empty(), "a checkpoint of an unknown run wrote {j:?}");
            assert!(s.job_tracking(id).await.unwrap().is_empty());
            continue;
        }
        if i % 3 == 0 {
            assert!(matches!(r, Err(StoreError::Fenced { .. })), "{i}: {r:?}");
            assert_eq!(j.len(), 1, "a fenced checkpoint wrote nothing");
            assert_eq!(s.get_run(id).await.unwrap().unwrap().status, RunStatus::Pending);
        } else {
            assert_eq!(r.unwrap().last_seq, 2);
            assert_eq!(j.len(), 2);
            assert_eq!(s.get_run(id).await.unwrap().unwrap().status, RunStatus::Running);
            assert_eq!(s.job_tracking(id).await.unwrap().len(), 1);
        }
    }
    assert_eq!(runs.len(), 40);
}

/// Submits and checkpoints queued together (one statement on PostgreSQL, one transaction on
/// SQLite): each submit creates its run with its job row and first journal row, a reused request
/// id is answered with its run, and each checkpoint lands or is fenced on its own.
async fn submits_and_checkpoints_in_one_batch_each_land_alone(db: TestDb) {
    let s = db.open().await;
    let now = Timestamp::now();
    let first = s.submit(new_run(Some("taken"), now)).await.unwrap().run.id;
    for _ in 0..19 {
        s.submit(new_run(None, now)).await.unwrap();
    }
    let claimed = s.claim("A", 20, TTL, now).await.unwrap();
    assert_eq!(claimed.len(), 20);
    let mut checkpoints = Vec::new();
    let mut submits = Vec::new();
    for (i, (run, lease)) in claimed.into_iter().enumerate() {
        // Every fourth checkpoint expects a position the run is not at.
        let seq = if i % 4 == 0 { 9 } else { run.last_seq };
        checkpoints.push((i, run.id, spawn_start(&s, run.id, lease, seq, now)));
        // Every fifth submit reuses the request id of the first run.
        let request = (i % 5 == 0).then_some("taken");
        let s = s.clone();
        submits.push(tokio::spawn(
            async move { (request, s.submit(new_run(request, now)).await) },
        ));
    }
    for (i, id, t) in checkpoints {
        let r = t.await.unwrap();
        let j = s.journal(id, 0, 10).await.unwrap();
        if i % 4 == 0 {
            assert!(matches!(r, Err(StoreError::Fenced { .. })), "{i}: {r:?}");
            assert_eq!(j.len(), 1, "a fenced checkpoint wrote nothing");
        } else {
            assert_eq!(r.unwrap().last_seq, 2);
            assert_eq!(j.len(), 2);
            assert_eq!(s.get_run(id).await.unwrap().unwrap().status, RunStatus::Running);
        }
    }
    let mut created = 0;
    for t in submits {
        let (request, r) = t.await.unwrap();
        let r = r.unwrap();
        if request.is_some() {
            assert!(!r.created, "a taken request id makes no run");
            assert_eq!(r.run.id, first);
            assert!(r.journal.is_empty());
            continue;
        }
        created += 1;
        assert!(r.created);
        assert_eq!(r.run.status, RunStatus::Pending);
        assert_eq!(r.run.last_seq, 1);
        assert_eq!(s.journal(r.run.id, 0, 10).await.unwrap(), r.journal);
        assert_eq!(r.journal.len(), 1);
        let job = s.failover_job(r.run.id).await.unwrap().expect("failover_jobs row");
        assert_eq!((job.vm_id.as_str(), job.status.as_str()), ("vm-1", "pending"));
        let stored = s.get_run(r.run.id).await.unwrap().unwrap();
        assert_eq!(
            (stored.status, stored.last_seq, stored.created_at, stored.correlation_id),
            (r.run.status, r.run.last_seq, r.run.created_at, r.run.correlation_id)
        );
    }
    assert_eq!(created, 16);
    assert_eq!(count_runs(&*s).await, 36);
}

on_both_backends!(
    submits_and_checkpoints_in_one_batch_each_land_alone,
    submit_and_start_commits_the_first_step_leased_to_the_submitter,
    concurrent_checkpoints_each_compare_and_set_alone,
    inventory_and_network_mappings,
    submit_is_idempotent_by_request_id,
    concurrent_submits_with_one_request_id_make_one_run,
    concurrent_submits_with_one_lock_key_make_one_run,
    claims_lease_and_fence_stale_workers,
    checkpoint_is_a_compare_and_set_on_the_journal_position,
    sleeping_runs_wake_at_their_time_only,
    signals_are_durable_idempotent_and_wake_a_holding_run,
    a_signal_racing_a_run_going_to_sleep_is_not_lost,
    cancel_is_durable_and_idempotent,
    list_is_newest_first_with_keyset_pages_and_filters,
    projections_follow_the_journal_in_the_same_transaction,
    ledger_adopts_by_key,
    releasing_a_lease_makes_the_run_claimable_at_once,
);

/// Waits up to 15 s for `what` of `store` to be `want` (the share is counted every second, and
/// sooner just after the store connected).
async fn commit_loops_become(store: &tern::store::postgres::PgStore, want: usize, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while store.commit_loops() != want {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {} writer loops, expected {want}",
            store.commit_loops()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Processes writing to one PostgreSQL schema share its commits in flight: alone, a process
/// commits with 3 writer loops; with two more on the schema, each with 1; a process on another
/// schema is not counted; when the others are gone, the one left takes all 3 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_on_one_postgres_schema_share_the_writer_loops() {
    use tern::store::postgres::PgStore;
    let Some(url) = crate::common::pg_url() else {
        eprintln!("skipping: TERN_TEST_POSTGRES_URL not set (it is required in CI)");
        return;
    };
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let elsewhere = format!("t_{}", uuid::Uuid::new_v4().simple());
    let a = PgStore::connect(&url, Some(&schema)).await.unwrap();
    let other = PgStore::connect(&url, Some(&elsewhere)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    commit_loops_become(&a, 3, "alone on its schema").await;
    let b = PgStore::connect(&url, Some(&schema)).await.unwrap();
    let c = PgStore::connect(&url, Some(&schema)).await.unwrap();
    for (store, name) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        commit_loops_become(store, 1, &format!("{name}, one of three")).await;
    }
    commit_loops_become(&other, 3, "alone on another schema").await;
    // The loops each may use still commit.
    let now = Timestamp::now();
    for store in [&a, &b, &c] {
        let run = store.submit(new_run(None, now)).await.unwrap();
        assert!(run.created);
    }
    drop((b, c));
    commit_loops_become(&a, 3, "alone again").await;
    assert!(a.submit(new_run(None, now)).await.unwrap().created);
    assert_eq!(count_runs(&a).await, 4, "one run by each store, and one more by a");
}

/// Runs in the store (up to 100).
async fn count_runs(s: &dyn Store) -> usize {
    s.list_runs(&RunFilter {
        limit: 100,
        ..Default::default()
    })
    .await
    .unwrap()
    .len()
}
