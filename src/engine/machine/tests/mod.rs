//! Edge coverage of the run state machine: every (state, event) pair is exercised, and the
//! behaviour of each declared edge is asserted (here for every pair, beside the handlers'
//! files for each edge).

mod hold;
mod rollback;
mod steps;

use super::*;
use crate::domain::run::Cause;
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

/// A definition with one forward step and no hold.
const ONE_STEP: &str = "name='n'\n[[step]]\nname='a'\naction='x'\ncompensate='none'\n";

fn def() -> Definition {
    def_src(DEF)
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

/// `e` in state `s`, for the test definition and an empty input.
fn on(s: &RunState, e: Event) -> Result<Transition> {
    step(&def(), &json!({}), s, e)
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
fn cancel(reason: &str) -> Event {
    Event::Cancel {
        reason: reason.into(),
        by: None,
    }
}
fn signal(name: &str) -> Event {
    Event::Signal {
        name: name.into(),
        by: None,
    }
}
fn kinds(t: &Transition) -> Vec<&'static str> {
    t.records.iter().map(Record::kind).collect()
}
fn running(phase: Phase, step: usize, attempt: u32) -> RunState {
    RunState::Running { phase, step, attempt }
}
fn backoff(phase: Phase, step: usize, attempt: u32, at: Timestamp) -> RunState {
    RunState::Backoff {
        phase,
        step,
        attempt,
        at,
    }
}
fn compensating(step: usize, attempt: u32, cause: Cause) -> RunState {
    RunState::Compensating { step, attempt, cause }
}
/// A compensation of the rollback after `create` failed, asleep until `at`.
fn compensation_backoff(step: usize, attempt: u32, at: Timestamp) -> RunState {
    RunState::CompensationBackoff {
        step,
        attempt,
        at,
        cause: failed_cause(),
    }
}
fn failed_cause() -> Cause {
    Cause::Failed {
        step: "create".into(),
        error: StepError::permanent("E", "boom"),
    }
}
fn cancelled_cause(reason: &str) -> Cause {
    Cause::Cancelled { reason: reason.into() }
}

fn all_states() -> Vec<RunState> {
    vec![
        RunState::Pending,
        running(Phase::Forward, 1, 1),
        running(Phase::Teardown, 0, 1),
        backoff(Phase::Forward, 1, 2, NOW),
        backoff(Phase::Teardown, 0, 2, NOW),
        RunState::Holding { until: Some(NOW) },
        RunState::Holding { until: None },
        compensating(1, 1, failed_cause()),
        compensation_backoff(1, 2, NOW),
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
        RunState::Resolved {
            step: "x".into(),
            error: StepError::permanent("E", "m"),
            undone: vec!["x".into()],
            resolution: resolution(),
        },
    ]
}

fn resolution() -> Resolution {
    Resolution {
        by: "ops@site".into(),
        reason: "volume reattached to the OMA by hand".into(),
        forced: false,
        differences: vec![],
        at: NOW,
    }
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
        signal("end-test"),
        signal("other"),
        cancel("operator"),
        Event::Resolve {
            resolution: resolution(),
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
        // Late events are absorbed; only a run that needs an operator is resolved.
        S::NeedsOperator { .. } => true,
        S::Completed | S::Failed { .. } | S::Cancelled { .. } | S::Resolved { .. } => !matches!(e, E::Resolve { .. }),
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
    for s in all_states().into_iter().filter(RunState::is_terminal) {
        for e in all_events().into_iter().filter(|e| !matches!(e, Event::Resolve { .. })) {
            let t = on(&s, e).unwrap();
            assert_eq!(t.state, s);
            assert!(t.records.is_empty());
            assert_eq!(t.action, Action::Finish);
        }
    }
}

#[test]
fn a_run_that_needs_an_operator_is_resolved_once_and_keeps_what_it_left() {
    let stuck = RunState::NeedsOperator {
        step: "delete".into(),
        error: StepError::permanent("VM_DESTROY_FAILED", "m"),
        undone: vec!["snap".into()],
    };
    let mut forced = resolution();
    forced.forced = true;
    forced.differences = vec!["destroy the new VM: cmk destroy virtualmachine id=v-1".into()];
    let t = on(
        &stuck,
        Event::Resolve {
            resolution: forced.clone(),
        },
    )
    .unwrap();
    assert_eq!(t.state.status(), RunStatus::Resolved);
    assert!(t.state.is_terminal());
    assert_eq!(t.action, Action::Finish);
    match &t.state {
        RunState::Resolved {
            step,
            undone,
            resolution,
            ..
        } => {
            assert_eq!(
                (step.as_str(), undone.as_slice()),
                ("delete", ["snap".to_string()].as_slice())
            );
            assert_eq!(resolution, &forced);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        t.records,
        vec![Record::Resolved {
            by: forced.by.clone(),
            reason: forced.reason.clone(),
            forced: true,
            differences: forced.differences.clone(),
        }]
    );
    // A second resolve is refused: nothing is left to resolve.
    let again = on(
        &t.state,
        Event::Resolve {
            resolution: resolution(),
        },
    );
    assert!(
        matches!(
            again,
            Err(TransitionError::Invalid {
                state: "resolved",
                event: "resolve"
            })
        ),
        "{again:?}"
    );
}

#[test]
fn every_record_and_state_round_trips_through_json() {
    for s in all_states() {
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<RunState>(&j).unwrap(), s);
        assert_eq!(RunStatus::parse(s.status().as_str()), Some(s.status()));
    }
    let t = on(&running(Phase::Forward, 2, 3), fail(ErrorClass::Retryable)).unwrap();
    for r in t.records {
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(serde_json::from_value::<Record>(j).unwrap(), r);
    }
}
