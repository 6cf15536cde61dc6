//! Edge coverage of the run state machine: every (state, event) pair is exercised, and the
//! behaviour of each declared edge is asserted.

use super::*;
use crate::domain::ErrorClass;
use crate::workflow::parse;
use serde_json::json;

const DEF: &str = r#"
name = "t"
[defaults]
retry = { max_attempts = 3, initial_delay = "1s", multiplier = 2.0, max_delay = "10s", jitter = 0.0 }
[[step]]
name = "validate"
action = "a"
compensate = "none"
status = "validating"
[[step]]
name = "snap"
action = "a"
compensate = "u"
skip_if = "skip_snapshot"
[[step]]
name = "create"
action = "a"
compensate = "u"
[hold]
signal = "end-test"
duration_input = "test_duration"
[[teardown]]
name = "stop"
action = "a"
[[teardown]]
name = "delete"
action = "a"
"#;

fn def() -> Definition {
    parse("t.toml", DEF, &|_| true).unwrap()
}

fn def_src(src: &str) -> Definition {
    parse("t.toml", src, &|_| true).unwrap()
}

const NOW: Timestamp = Timestamp(1_000_000);
fn run() -> RunId {
    RunId("0190a000-0000-7000-8000-000000000001".parse().unwrap())
}

fn step(def: &Definition, input: &Value, s: &RunState, e: Event) -> Result<Transition> {
    Machine {
        run_id: run(),
        def,
        input,
    }
    .transition(s, &e, NOW)
}

fn ok() -> Event {
    Event::StepSucceeded {
        output: json!({"id": "x"}),
    }
}
fn fail(class: ErrorClass) -> Event {
    Event::StepFailed {
        error: StepError {
            class,
            code: "E".into(),
            message: "boom".into(),
        },
    }
}
fn kinds(t: &Transition) -> Vec<&'static str> {
    t.records.iter().map(Record::kind).collect()
}
fn running(phase: Phase, step: usize, attempt: u32) -> RunState {
    RunState::Running { phase, step, attempt }
}
fn failed_cause() -> Cause {
    Cause::Failed {
        step: "create".into(),
        error: StepError::permanent("E", "boom"),
    }
}

fn all_states() -> Vec<RunState> {
    vec![
        RunState::Pending,
        running(Phase::Forward, 1, 1),
        running(Phase::Teardown, 0, 1),
        RunState::Backoff {
            phase: Phase::Forward,
            step: 1,
            attempt: 2,
            at: NOW,
        },
        RunState::Backoff {
            phase: Phase::Teardown,
            step: 0,
            attempt: 2,
            at: NOW,
        },
        RunState::Holding { until: Some(NOW) },
        RunState::Holding { until: None },
        RunState::Compensating {
            step: 1,
            attempt: 1,
            cause: failed_cause(),
        },
        RunState::CompensationBackoff {
            step: 1,
            attempt: 2,
            at: NOW,
            cause: failed_cause(),
        },
        RunState::Completed,
        RunState::Failed {
            step: "x".into(),
            error: StepError::permanent("E", "m"),
        },
        RunState::Cancelled { reason: "r".into() },
        RunState::NeedsOperator {
            step: "x".into(),
            error: StepError::permanent("E", "m"),
            undone: vec![],
        },
    ]
}

fn all_events() -> Vec<Event> {
    vec![
        Event::Begin,
        Event::Resume,
        ok(),
        fail(ErrorClass::Retryable),
        fail(ErrorClass::Permanent),
        Event::Progress {
            data: json!({"job": 1}),
        },
        Event::WakeUp,
        Event::Signal {
            name: "end-test".into(),
        },
        Event::Signal { name: "other".into() },
        Event::Cancel {
            reason: "operator".into(),
        },
    ]
}

/// The declared edges: which (state, event) pairs are allowed. Everything else must be `Invalid`.
fn declared(s: &RunState, e: &Event) -> bool {
    use Event as E;
    use RunState as S;
    match s {
        S::Pending => matches!(e, E::Begin | E::Cancel { .. }),
        S::Running { .. } | S::Compensating { .. } => {
            matches!(
                e,
                E::StepSucceeded { .. } | E::StepFailed { .. } | E::Progress { .. } | E::Resume | E::Cancel { .. }
            )
        }
        S::Backoff { .. } | S::CompensationBackoff { .. } => matches!(e, E::WakeUp | E::Cancel { .. }),
        S::Holding { until } => match e {
            E::WakeUp => until.is_some(),
            E::Signal { .. } | E::Cancel { .. } => true,
            _ => false,
        },
        S::Completed | S::Failed { .. } | S::Cancelled { .. } | S::NeedsOperator { .. } => true,
    }
}

#[test]
fn every_state_event_pair_is_declared_or_a_typed_error() {
    let d = def();
    let input = json!({"test_duration": "1m"});
    let mut edges = 0;
    for s in all_states() {
        for e in all_events() {
            let r = step(&d, &input, &s, e.clone());
            if declared(&s, &e) {
                assert!(r.is_ok(), "{s:?} + {e:?} should be allowed, got {r:?}");
                edges += 1;
            } else {
                assert!(
                    matches!(r, Err(TransitionError::Invalid { .. })),
                    "{s:?} + {e:?} should be Invalid, got {r:?}"
                );
            }
        }
    }
    assert!(edges > 60, "{edges}");
}

#[test]
fn terminal_states_absorb_late_events_without_journal_entries() {
    let d = def();
    for s in all_states().into_iter().filter(RunState::is_terminal) {
        for e in all_events() {
            let t = step(&d, &json!({}), &s, e).unwrap();
            assert_eq!(t.state, s);
            assert!(t.records.is_empty());
            assert_eq!(t.actions, vec![Action::Finish]);
        }
    }
}

#[test]
fn begin_starts_the_first_step_with_attempt_one() {
    let d = def();
    let t = step(&d, &json!({}), &RunState::Pending, Event::Begin).unwrap();
    assert_eq!(t.state, running(Phase::Forward, 0, 1));
    assert_eq!(kinds(&t), vec!["step_started"]);
    assert_eq!(
        t.actions,
        vec![Action::Execute {
            phase: Phase::Forward,
            step: 0,
            attempt: 1,
            idempotency_key: format!("{}/validate", run())
        }]
    );
    assert_eq!(d.display_status(&t.state), "validating");
}

#[test]
fn success_and_next_start_share_one_transition_and_skips_are_journaled() {
    let d = def();
    let input = json!({"skip_snapshot": true});
    let t = step(&d, &input, &running(Phase::Forward, 0, 1), ok()).unwrap();
    assert_eq!(kinds(&t), vec!["step_succeeded", "step_skipped", "step_started"]);
    assert_eq!(t.state, running(Phase::Forward, 2, 1));
}

#[test]
fn last_forward_step_enters_the_hold_with_a_timer() {
    let d = def();
    let t = step(
        &d,
        &json!({"test_duration": "30s"}),
        &running(Phase::Forward, 2, 1),
        ok(),
    )
    .unwrap();
    assert_eq!(
        t.state,
        RunState::Holding {
            until: Some(NOW.plus(std::time::Duration::from_secs(30)))
        }
    );
    assert_eq!(kinds(&t), vec!["step_succeeded", "timer_set"]);
    assert_eq!(t.actions, vec![Action::Sleep]);
    // Without a duration the hold waits for the signal only.
    let t = step(&d, &json!({}), &running(Phase::Forward, 2, 1), ok()).unwrap();
    assert_eq!(t.state, RunState::Holding { until: None });
    assert_eq!(t.state.wake_at(NOW), None);
    // A bad duration is an input error, not a panic.
    let e = step(
        &d,
        &json!({"test_duration": "soon"}),
        &running(Phase::Forward, 2, 1),
        ok(),
    )
    .unwrap_err();
    assert!(matches!(e, TransitionError::Input(_)));
}

#[test]
fn hold_timer_fires_once_due_and_not_before() {
    let d = def();
    let later = Timestamp(NOW.0 + 5);
    let e = step(&d, &json!({}), &RunState::Holding { until: Some(later) }, Event::WakeUp).unwrap_err();
    assert_eq!(e, TransitionError::NotDue { due: later });
    let t = step(&d, &json!({}), &RunState::Holding { until: Some(NOW) }, Event::WakeUp).unwrap();
    assert_eq!(kinds(&t), vec!["timer_fired", "step_started"]);
    assert_eq!(t.state, running(Phase::Teardown, 0, 1));
    assert_eq!(d.display_status(&t.state), "cleanup");
}

#[test]
fn the_hold_signal_starts_teardown_and_other_signals_are_recorded_only() {
    let d = def();
    let hold = RunState::Holding { until: None };
    let t = step(
        &d,
        &json!({}),
        &hold,
        Event::Signal {
            name: "end-test".into(),
        },
    )
    .unwrap();
    assert_eq!(kinds(&t), vec!["signal_received", "step_started"]);
    assert!(matches!(t.records[0], Record::SignalReceived { applied: true, .. }));
    let t = step(&d, &json!({}), &hold, Event::Signal { name: "other".into() }).unwrap();
    assert_eq!(t.state, hold);
    assert!(matches!(t.records[0], Record::SignalReceived { applied: false, .. }));
}

#[test]
fn teardown_completes_the_run() {
    let d = def();
    let t = step(&d, &json!({}), &running(Phase::Teardown, 0, 1), ok()).unwrap();
    assert_eq!(t.state, running(Phase::Teardown, 1, 1));
    let t = step(&d, &json!({}), &running(Phase::Teardown, 1, 1), ok()).unwrap();
    assert_eq!(t.state, RunState::Completed);
    assert_eq!(kinds(&t), vec!["step_succeeded", "run_finished"]);
    assert_eq!(t.actions, vec![Action::Finish]);
}

#[test]
fn retryable_failure_sleeps_in_the_database_then_wakes_for_the_next_attempt() {
    let d = def();
    let t = step(
        &d,
        &json!({}),
        &running(Phase::Forward, 1, 1),
        fail(ErrorClass::Retryable),
    )
    .unwrap();
    let at = NOW.plus(std::time::Duration::from_secs(1));
    assert_eq!(
        t.state,
        RunState::Backoff {
            phase: Phase::Forward,
            step: 1,
            attempt: 2,
            at
        }
    );
    assert_eq!(t.state.wake_at(NOW), Some(at));
    assert_eq!(kinds(&t), vec!["step_retry_scheduled"]);
    // Second failure doubles the delay.
    let t2 = step(
        &d,
        &json!({}),
        &running(Phase::Forward, 1, 2),
        fail(ErrorClass::Retryable),
    )
    .unwrap();
    assert!(matches!(t2.state, RunState::Backoff { at, .. } if at == NOW.plus(std::time::Duration::from_secs(2))));
    // Waking early is refused; waking on time starts attempt 2.
    let early = RunState::Backoff {
        phase: Phase::Forward,
        step: 1,
        attempt: 2,
        at,
    };
    assert!(matches!(
        step(&d, &json!({}), &early, Event::WakeUp),
        Err(TransitionError::NotDue { .. })
    ));
    let due = RunState::Backoff {
        phase: Phase::Forward,
        step: 1,
        attempt: 2,
        at: NOW,
    };
    let t = step(&d, &json!({}), &due, Event::WakeUp).unwrap();
    assert_eq!(t.state, running(Phase::Forward, 1, 2));
    assert!(
        matches!(&t.records[0], Record::StepStarted { attempt: 2, idempotency_key, .. } if idempotency_key.ends_with("/snap"))
    );
}

#[test]
fn exhausted_retries_and_permanent_errors_roll_back_in_reverse() {
    let d = def();
    // create (index 2) fails on its last attempt: undo create (it may have acted), then snap; validate has nothing to undo.
    let t = step(
        &d,
        &json!({}),
        &running(Phase::Forward, 2, 3),
        fail(ErrorClass::Retryable),
    )
    .unwrap();
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
    assert_eq!(
        t.state,
        RunState::Compensating {
            step: 2,
            attempt: 1,
            cause: cause.clone()
        }
    );
    assert_eq!(
        t.actions,
        vec![Action::Compensate {
            step: 2,
            attempt: 1,
            idempotency_key: format!("{}/create/undo", run())
        }]
    );
    let t = step(&d, &json!({}), &t.state, ok()).unwrap();
    assert_eq!(kinds(&t), vec!["compensation_succeeded", "compensation_started"]);
    assert_eq!(
        t.state,
        RunState::Compensating {
            step: 1,
            attempt: 1,
            cause: cause.clone()
        }
    );
    assert_eq!(d.display_status(&t.state), "reverting");
    let t = step(&d, &json!({}), &t.state, ok()).unwrap();
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
    let d = def();
    let t = step(
        &d,
        &json!({}),
        &running(Phase::Forward, 0, 1),
        fail(ErrorClass::Permanent),
    )
    .unwrap();
    assert_eq!(kinds(&t), vec!["step_failed", "run_finished"]);
    assert!(matches!(t.state, RunState::Failed { .. }));
}

#[test]
fn compensation_retries_then_needs_an_operator_naming_what_is_left() {
    let d = def();
    let comp = RunState::Compensating {
        step: 2,
        attempt: 1,
        cause: failed_cause(),
    };
    let t = step(&d, &json!({}), &comp, fail(ErrorClass::Retryable)).unwrap();
    assert!(matches!(
        t.state,
        RunState::CompensationBackoff {
            step: 2,
            attempt: 2,
            ..
        }
    ));
    assert_eq!(kinds(&t), vec!["compensation_failed"]);
    let due = RunState::CompensationBackoff {
        step: 2,
        attempt: 2,
        at: NOW,
        cause: failed_cause(),
    };
    let t = step(&d, &json!({}), &due, Event::WakeUp).unwrap();
    assert_eq!(
        t.state,
        RunState::Compensating {
            step: 2,
            attempt: 2,
            cause: failed_cause()
        }
    );
    let early = RunState::CompensationBackoff {
        step: 2,
        attempt: 2,
        at: Timestamp(NOW.0 + 1),
        cause: failed_cause(),
    };
    assert!(matches!(
        step(&d, &json!({}), &early, Event::WakeUp),
        Err(TransitionError::NotDue { .. })
    ));
    let last = RunState::Compensating {
        step: 2,
        attempt: 3,
        cause: failed_cause(),
    };
    let t = step(&d, &json!({}), &last, fail(ErrorClass::Retryable)).unwrap();
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
fn teardown_failure_needs_an_operator() {
    let d = def();
    let t = step(
        &d,
        &json!({}),
        &running(Phase::Teardown, 0, 1),
        fail(ErrorClass::Permanent),
    )
    .unwrap();
    match t.state {
        RunState::NeedsOperator { undone, .. } => assert_eq!(undone, vec!["stop", "delete"]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn cancel_rolls_back_from_wherever_forward_progress_is() {
    let d = def();
    let cancel = Event::Cancel {
        reason: "operator".into(),
    };
    // Pending: nothing happened, cancelled at once.
    let t = step(&d, &json!({}), &RunState::Pending, cancel.clone()).unwrap();
    assert_eq!(
        t.state,
        RunState::Cancelled {
            reason: "operator".into()
        }
    );
    assert_eq!(kinds(&t), vec!["cancel_requested", "run_finished"]);
    // Asleep in backoff on step snap: undo snap (it ran at least once).
    let b = RunState::Backoff {
        phase: Phase::Forward,
        step: 1,
        attempt: 2,
        at: NOW,
    };
    let t = step(&d, &json!({}), &b, cancel.clone()).unwrap();
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
    let t = step(&d, &json!({}), &RunState::Holding { until: None }, cancel.clone()).unwrap();
    assert!(matches!(t.state, RunState::Compensating { step: 2, .. }));
    // The rollback ends Cancelled.
    let c = RunState::Compensating {
        step: 1,
        attempt: 1,
        cause: Cause::Cancelled {
            reason: "operator".into(),
        },
    };
    let t = step(&d, &json!({}), &c, ok()).unwrap();
    assert_eq!(
        t.state,
        RunState::Cancelled {
            reason: "operator".into()
        }
    );
    // While running a forward step: that step is undone too.
    let t = step(&d, &json!({}), &running(Phase::Forward, 2, 1), cancel.clone()).unwrap();
    assert!(matches!(t.state, RunState::Compensating { step: 2, .. }));
}

#[test]
fn cancel_during_rollback_or_teardown_is_recorded_and_changes_nothing() {
    let d = def();
    let cancel = Event::Cancel { reason: "again".into() };
    for s in [
        running(Phase::Teardown, 0, 1),
        RunState::Backoff {
            phase: Phase::Teardown,
            step: 0,
            attempt: 2,
            at: NOW,
        },
        RunState::Compensating {
            step: 1,
            attempt: 1,
            cause: failed_cause(),
        },
        RunState::CompensationBackoff {
            step: 1,
            attempt: 2,
            at: NOW,
            cause: failed_cause(),
        },
    ] {
        let t = step(&d, &json!({}), &s, cancel.clone()).unwrap();
        assert_eq!(t.state, s);
        assert!(matches!(
            t.records[..],
            [Record::CancelRequested { applied: false, .. }]
        ));
    }
}

#[test]
fn resume_after_a_crash_starts_the_next_attempt_with_the_same_key() {
    let d = def();
    let t = step(&d, &json!({}), &running(Phase::Forward, 1, 1), Event::Resume).unwrap();
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
    let c = RunState::Compensating {
        step: 1,
        attempt: 1,
        cause: failed_cause(),
    };
    let t = step(&d, &json!({}), &c, Event::Resume).unwrap();
    assert_eq!(
        t.state,
        RunState::Compensating {
            step: 1,
            attempt: 2,
            cause: failed_cause()
        }
    );
    assert_eq!(kinds(&t), vec!["compensation_started"]);
}

#[test]
fn progress_is_journaled_without_changing_state() {
    let d = def();
    let s = running(Phase::Forward, 1, 1);
    let t = step(
        &d,
        &json!({}),
        &s,
        Event::Progress {
            data: json!({"jobid": "j-1"}),
        },
    )
    .unwrap();
    assert_eq!(t.state, s);
    assert_eq!(kinds(&t), vec!["step_progress"]);
    assert!(t.actions.is_empty());
    let c = RunState::Compensating {
        step: 1,
        attempt: 1,
        cause: failed_cause(),
    };
    let t = step(&d, &json!({}), &c, Event::Progress { data: json!(1) }).unwrap();
    assert_eq!(kinds(&t), vec!["compensation_progress"]);
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
    let t = step(
        &d,
        &json!({}),
        &running(Phase::Forward, 2, 1),
        fail(ErrorClass::Permanent),
    )
    .unwrap();
    match &t.state {
        RunState::NeedsOperator { step, undone, error } => {
            assert_eq!(step, "point-of-no-return");
            assert_eq!(undone, &vec!["point-of-no-return".to_string(), "a".to_string()]);
            assert_eq!(error.code, "IRREVERSIBLE");
        }
        other => panic!("{other:?}"),
    }
    // The irreversible step failing itself did not take effect: roll back what came before.
    let t = step(
        &d,
        &json!({}),
        &running(Phase::Forward, 1, 1),
        fail(ErrorClass::Permanent),
    )
    .unwrap();
    assert!(matches!(t.state, RunState::Compensating { step: 0, .. }));
}

#[test]
fn a_definition_without_hold_completes_after_the_last_step() {
    let d = def_src("name='n'\n[[step]]\nname='a'\naction='x'\ncompensate='none'\n");
    let t = step(&d, &json!({}), &running(Phase::Forward, 0, 1), ok()).unwrap();
    assert_eq!(t.state, RunState::Completed);
    // A step index the pinned definition does not have is a typed error.
    let e = step(&d, &json!({}), &running(Phase::Forward, 7, 1), ok()).unwrap_err();
    assert!(matches!(e, TransitionError::NoSuchStep { .. }));
}

#[test]
fn a_cancel_pending_when_the_run_ends_is_recorded_as_too_late_before_its_end() {
    let d = def_src("name='n'\n[[step]]\nname='a'\naction='x'\ncompensate='none'\n");
    let t = step(&d, &json!({}), &running(Phase::Forward, 0, 1), ok()).unwrap();
    let t = with_late_cancel(t, "operator");
    assert_eq!(t.state, RunState::Completed);
    assert_eq!(kinds(&t), vec!["step_succeeded", "cancel_requested", "run_finished"]);
    assert!(matches!(
        &t.records[1],
        Record::CancelRequested { reason, applied: false } if reason == "operator"
    ));
    assert_eq!(t.actions, vec![Action::Finish]);
}

#[test]
fn every_record_and_state_round_trips_through_json() {
    for s in all_states() {
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<RunState>(&j).unwrap(), s);
        assert_eq!(RunStatus::parse(s.status().as_str()), Some(s.status()));
    }
    let d = def();
    let t = step(
        &d,
        &json!({}),
        &running(Phase::Forward, 2, 3),
        fail(ErrorClass::Retryable),
    )
    .unwrap();
    for r in t.records {
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(serde_json::from_value::<Record>(j).unwrap(), r);
    }
}
