//! The edges of attempts of forward and teardown steps.

use super::*;

#[test]
fn begin_starts_the_first_step_with_attempt_one() {
    let d = def();
    let t = on(&RunState::Pending, Event::Begin).unwrap();
    assert_eq!(t.state, running(Phase::Forward, 0, 1));
    assert_eq!(kinds(&t), vec!["step_started"]);
    assert_eq!(
        t.action,
        Action::Execute {
            phase: Phase::Forward,
            step: 0,
            attempt: 1,
            idempotency_key: format!("{}/validate", run())
        }
    );
    assert_eq!(d.display_status(&t.state), "validating");
}

#[test]
fn success_and_next_start_share_one_transition_and_skips_are_journaled() {
    let input = json!({"skip_snapshot": true});
    let t = step(&def(), &input, &running(Phase::Forward, 0, 1), ok()).unwrap();
    assert_eq!(kinds(&t), vec!["step_succeeded", "step_skipped", "step_started"]);
    assert_eq!(t.state, running(Phase::Forward, 2, 1));
}

#[test]
fn teardown_completes_the_run() {
    let t = on(&running(Phase::Teardown, 0, 1), ok()).unwrap();
    assert_eq!(t.state, running(Phase::Teardown, 1, 1));
    let t = on(&running(Phase::Teardown, 1, 1), ok()).unwrap();
    assert_eq!(t.state, RunState::Completed);
    assert_eq!(kinds(&t), vec!["step_succeeded", "run_finished"]);
    assert_eq!(t.action, Action::Finish);
}

#[test]
fn retryable_failure_sleeps_in_the_database_then_wakes_for_the_next_attempt() {
    let t = on(&running(Phase::Forward, 1, 1), fail(ErrorClass::Retryable)).unwrap();
    let at = NOW.plus(std::time::Duration::from_secs(1));
    assert_eq!(t.state, backoff(Phase::Forward, 1, 2, at));
    assert_eq!(t.state.wake_at(NOW), Some(at));
    assert_eq!(kinds(&t), vec!["step_retry_scheduled"]);
    // Second failure doubles the delay.
    let t2 = on(&running(Phase::Forward, 1, 2), fail(ErrorClass::Retryable)).unwrap();
    assert!(matches!(t2.state, RunState::Backoff { at, .. } if at == NOW.plus(std::time::Duration::from_secs(2))));
    // Waking early is refused; waking on time starts attempt 2.
    assert!(matches!(
        on(&backoff(Phase::Forward, 1, 2, at), Event::WakeUp),
        Err(TransitionError::NotDue { .. })
    ));
    let t = on(&backoff(Phase::Forward, 1, 2, NOW), Event::WakeUp).unwrap();
    assert_eq!(t.state, running(Phase::Forward, 1, 2));
    assert!(
        matches!(&t.records[0], Record::StepStarted { attempt: 2, idempotency_key, .. } if idempotency_key.ends_with("/snap"))
    );
}

#[test]
fn teardown_failure_needs_an_operator() {
    let t = on(&running(Phase::Teardown, 0, 1), fail(ErrorClass::Permanent)).unwrap();
    match t.state {
        RunState::NeedsOperator { undone, .. } => assert_eq!(undone, vec!["stop", "delete"]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn resume_after_a_crash_starts_the_next_attempt_with_the_same_key() {
    let t = on(&running(Phase::Forward, 1, 1), Event::Resume).unwrap();
    assert_eq!(t.state, running(Phase::Forward, 1, 2));
    match &t.records[0] {
        Record::StepStarted {
            attempt,
            idempotency_key,
            ..
        } => {
            assert_eq!(*attempt, 2);
            assert_eq!(idempotency_key, &format!("{}/snap", run()));
        }
        other => panic!("{other:?}"),
    }
    let t = on(&compensating(1, 1, failed_cause()), Event::Resume).unwrap();
    assert_eq!(t.state, compensating(1, 2, failed_cause()));
    assert_eq!(kinds(&t), vec!["compensation_started"]);
}

#[test]
fn progress_is_journaled_without_changing_state() {
    let s = running(Phase::Forward, 1, 1);
    let t = on(
        &s,
        Event::Progress {
            data: json!({"jobid": "j-1"}),
        },
    )
    .unwrap();
    assert_eq!(t.state, s);
    assert_eq!(kinds(&t), vec!["step_progress"]);
    assert_eq!(t.action, Action::Continue);
    let t = on(&compensating(1, 1, failed_cause()), Event::Progress { data: json!(1) }).unwrap();
    assert_eq!(kinds(&t), vec!["compensation_progress"]);
    assert_eq!(t.action, Action::Continue);
}

#[test]
fn a_definition_without_hold_completes_after_the_last_step() {
    let d = def_src(ONE_STEP);
    let t = step(&d, &json!({}), &running(Phase::Forward, 0, 1), ok()).unwrap();
    assert_eq!(t.state, RunState::Completed);
    // A step index the pinned definition does not have is a typed error.
    let e = step(&d, &json!({}), &running(Phase::Forward, 7, 1), ok()).unwrap_err();
    assert!(matches!(e, TransitionError::NoSuchStep { .. }));
}
