//! The edges of the way back: cancel and compensations.

use super::*;

#[test]
fn exhausted_retries_and_permanent_errors_roll_back_in_reverse() {
    let d = def();
    // create (index 2) fails on its last attempt: undo create (it may have acted), then snap; validate has nothing to undo.
    let t = on(&running(Phase::Forward, 2, 3), fail(ErrorClass::Retryable)).unwrap();
    assert_eq!(kinds(&t), vec!["step_failed", "compensation_started"]);
    // The error that used up the retries is kept as it was (retryable class included).
    let error = StepError {
        class: ErrorClass::Retryable,
        code: "E".into(),
        message: "boom".into(),
    };
    let cause = Cause::Failed {
        step: "create".into(),
        error: error.clone(),
    };
    assert_eq!(t.state, compensating(2, 1, cause.clone()));
    assert_eq!(
        t.action,
        Action::Compensate {
            step: 2,
            attempt: 1,
            idempotency_key: format!("{}/create/undo", run())
        }
    );
    let t = on(&t.state, ok()).unwrap();
    assert_eq!(kinds(&t), vec!["compensation_succeeded", "compensation_started"]);
    assert_eq!(t.state, compensating(1, 1, cause));
    assert_eq!(d.display_status(&t.state), "reverting");
    let t = on(&t.state, ok()).unwrap();
    assert_eq!(kinds(&t), vec!["compensation_succeeded", "run_finished"]);
    assert_eq!(
        t.state,
        RunState::Failed {
            step: "create".into(),
            error
        }
    );
}

#[test]
fn skipped_steps_are_not_compensated() {
    let d = def();
    let input = json!({"skip_snapshot": true});
    let t = step(&d, &input, &running(Phase::Forward, 2, 1), fail(ErrorClass::Permanent)).unwrap();
    let t = step(&d, &input, &t.state, ok()).unwrap();
    assert_eq!(kinds(&t), vec!["compensation_succeeded", "run_finished"]);
    assert!(matches!(t.state, RunState::Failed { .. }));
}

#[test]
fn failure_with_nothing_to_undo_fails_at_once() {
    let t = on(&running(Phase::Forward, 0, 1), fail(ErrorClass::Permanent)).unwrap();
    assert_eq!(kinds(&t), vec!["step_failed", "run_finished"]);
    assert!(matches!(t.state, RunState::Failed { .. }));
}

#[test]
fn compensation_retries_then_needs_an_operator_naming_what_is_left() {
    let t = on(&compensating(2, 1, failed_cause()), fail(ErrorClass::Retryable)).unwrap();
    assert!(matches!(
        t.state,
        RunState::CompensationBackoff {
            step: 2,
            attempt: 2,
            ..
        }
    ));
    assert_eq!(kinds(&t), vec!["compensation_failed"]);
    let t = on(&compensation_backoff(2, 2, NOW), Event::WakeUp).unwrap();
    assert_eq!(t.state, compensating(2, 2, failed_cause()));
    let early = compensation_backoff(2, 2, Timestamp(NOW.0 + 1));
    assert!(matches!(on(&early, Event::WakeUp), Err(TransitionError::NotDue { .. })));
    let t = on(&compensating(2, 3, failed_cause()), fail(ErrorClass::Retryable)).unwrap();
    match &t.state {
        RunState::NeedsOperator { step, undone, .. } => {
            assert_eq!(step, "create");
            assert_eq!(undone, &vec!["create".to_string(), "snap".to_string()]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(kinds(&t), vec!["compensation_failed", "run_finished"]);
    assert_eq!(t.state.status(), RunStatus::NeedsOperator);
    assert_ne!(t.state.status(), RunStatus::Failed);
}

#[test]
fn cancel_rolls_back_from_wherever_forward_progress_is() {
    let cancelled = RunState::Cancelled {
        reason: "operator".into(),
    };
    // Pending: nothing happened, cancelled at once.
    let t = on(&RunState::Pending, cancel("operator")).unwrap();
    assert_eq!(t.state, cancelled);
    assert_eq!(kinds(&t), vec!["cancel_requested", "run_finished"]);
    // Asleep in backoff on step snap: undo snap (it ran at least once).
    let t = on(&backoff(Phase::Forward, 1, 2, NOW), cancel("operator")).unwrap();
    assert_eq!(kinds(&t), vec!["cancel_requested", "compensation_started"]);
    assert!(matches!(
        t.state,
        RunState::Compensating {
            step: 1,
            cause: Cause::Cancelled { .. },
            ..
        }
    ));
    // In the hold: undo everything from the last forward step.
    let t = on(&RunState::Holding { until: None }, cancel("operator")).unwrap();
    assert!(matches!(t.state, RunState::Compensating { step: 2, .. }));
    // The rollback ends Cancelled.
    let t = on(&compensating(1, 1, cancelled_cause("operator")), ok()).unwrap();
    assert_eq!(t.state, cancelled);
    // While running a forward step: that step is undone too.
    let t = on(&running(Phase::Forward, 2, 1), cancel("operator")).unwrap();
    assert!(matches!(t.state, RunState::Compensating { step: 2, .. }));
}

#[test]
fn cancel_during_rollback_or_teardown_is_recorded_and_changes_nothing() {
    for (s, action) in [
        (running(Phase::Teardown, 0, 1), Action::Continue),
        (backoff(Phase::Teardown, 0, 2, NOW), Action::Sleep),
        (compensating(1, 1, failed_cause()), Action::Continue),
        (compensation_backoff(1, 2, NOW), Action::Sleep),
    ] {
        let t = on(&s, cancel("again")).unwrap();
        assert_eq!(t.state, s);
        assert!(matches!(
            t.records[..],
            [Record::CancelRequested { applied: false, .. }]
        ));
        assert_eq!(t.action, action, "{s:?}");
    }
}

#[test]
fn irreversible_steps_stop_a_rollback_for_an_operator() {
    let d = def_src(
        r#"
name = "i"
[[step]]
name = "a"
action = "x"
compensate = "u"
[[step]]
name = "point-of-no-return"
action = "x"
irreversible = true
[[step]]
name = "c"
action = "x"
compensate = "none"
"#,
    );
    let fail_at = |i| {
        step(
            &d,
            &json!({}),
            &running(Phase::Forward, i, 1),
            fail(ErrorClass::Permanent),
        )
        .unwrap()
    };
    match &fail_at(2).state {
        RunState::NeedsOperator { step, undone, error } => {
            assert_eq!(step, "point-of-no-return");
            assert_eq!(undone, &vec!["point-of-no-return".to_string(), "a".to_string()]);
            assert_eq!(error.code, "IRREVERSIBLE");
        }
        other => panic!("{other:?}"),
    }
    // The irreversible step failing itself did not take effect: roll back what came before.
    assert!(matches!(fail_at(1).state, RunState::Compensating { step: 0, .. }));
}

#[test]
fn a_cancel_pending_when_the_run_ends_is_recorded_as_too_late_before_its_end() {
    let d = def_src(ONE_STEP);
    let t = step(&d, &json!({}), &running(Phase::Forward, 0, 1), ok()).unwrap();
    let t = with_late_cancel(t, "operator", Some("alice"));
    assert_eq!(t.state, RunState::Completed);
    assert_eq!(kinds(&t), vec!["step_succeeded", "cancel_requested", "run_finished"]);
    assert!(matches!(
        &t.records[1],
        Record::CancelRequested { reason, applied: false, by } if reason == "operator" && by.as_deref() == Some("alice")
    ));
    assert_eq!(t.action, Action::Finish);
}
