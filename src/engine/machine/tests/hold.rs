//! The edges of the hold: entering it, its timer and its signal.

use super::*;

#[test]
fn last_forward_step_enters_the_hold_with_a_timer() {
    let d = def();
    let last = running(Phase::Forward, 2, 1);
    let t = step(&d, &json!({"test_duration": "30s"}), &last, ok()).unwrap();
    assert_eq!(
        t.state,
        RunState::Holding {
            until: Some(NOW.plus(std::time::Duration::from_secs(30)))
        }
    );
    assert_eq!(kinds(&t), vec!["step_succeeded", "timer_set"]);
    assert_eq!(t.action, Action::Sleep);
    // Without a duration the hold waits for the signal only.
    let t = step(&d, &json!({}), &last, ok()).unwrap();
    assert_eq!(t.state, RunState::Holding { until: None });
    assert_eq!(t.state.wake_at(NOW), None);
    // A bad duration is an input error, not a panic.
    let e = step(&d, &json!({"test_duration": "soon"}), &last, ok()).unwrap_err();
    assert!(matches!(e, TransitionError::Input(_)));
}

#[test]
fn hold_timer_fires_once_due_and_not_before() {
    let later = Timestamp(NOW.0 + 5);
    let e = on(&RunState::Holding { until: Some(later) }, Event::WakeUp).unwrap_err();
    assert_eq!(e, TransitionError::NotDue { due: later });
    let t = on(&RunState::Holding { until: Some(NOW) }, Event::WakeUp).unwrap();
    assert_eq!(kinds(&t), vec!["timer_fired", "step_started"]);
    assert_eq!(t.state, running(Phase::Teardown, 0, 1));
    assert_eq!(def().display_status(&t.state), "cleanup");
}

#[test]
fn the_hold_signal_starts_teardown_and_other_signals_are_recorded_only() {
    let hold = RunState::Holding { until: None };
    let t = on(&hold, signal("end-test")).unwrap();
    assert_eq!(kinds(&t), vec!["signal_received", "step_started"]);
    assert!(matches!(t.records[0], Record::SignalReceived { applied: true, .. }));
    let t = on(&hold, signal("other")).unwrap();
    assert_eq!(t.state, hold);
    assert!(matches!(t.records[0], Record::SignalReceived { applied: false, .. }));
    assert_eq!(t.action, Action::Sleep);
}
