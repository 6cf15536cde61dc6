//! The edges of the hold between the forward steps and teardown: entering it, its timer, and
//! the signal that ends it early.

use super::{due, Action, Machine, Result, Transition, TransitionError};
use crate::domain::run::{Phase, Record, RunState};
use crate::domain::Timestamp;

impl Machine<'_> {
    /// The forward steps are done: wait for the hold's signal, or its timer when the input
    /// gives a duration.
    pub(super) fn enter_hold(&self, now: Timestamp) -> Result<Transition> {
        let until = self
            .def
            .hold_duration(self.input)
            .map_err(TransitionError::Input)?
            .map(|d| now.plus(d));
        Ok(Transition {
            state: RunState::Holding { until },
            records: until.map(|at| vec![Record::TimerSet { at }]).unwrap_or_default(),
            action: Action::Sleep,
        })
    }

    /// Holding + WakeUp: once the timer is due, teardown starts.
    pub(super) fn on_hold_timer(&self, at: Timestamp, now: Timestamp) -> Result<Transition> {
        due(at, now)?;
        self.start_from(Phase::Teardown, 0, vec![Record::TimerFired { at }], now)
    }

    /// Holding + Signal: the hold's signal starts teardown; any other is recorded and the run
    /// goes back to sleep.
    pub(super) fn on_signal(
        &self,
        state: &RunState,
        name: &str,
        by: &Option<String>,
        now: Timestamp,
    ) -> Result<Transition> {
        let applied = self.def.hold.as_ref().is_some_and(|h| h.signal == name);
        let received = Record::SignalReceived {
            name: name.to_string(),
            applied,
            by: by.clone(),
        };
        if !applied {
            return Ok(Transition {
                state: state.clone(),
                records: vec![received],
                action: Action::Sleep,
            });
        }
        self.start_from(Phase::Teardown, 0, vec![received], now)
    }
}
