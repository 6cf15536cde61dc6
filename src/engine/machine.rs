//! The pure state machine of a run: `(state, event, now) -> (state, records, actions)`.
//!
//! No I/O, no clock, no randomness: `now` is passed in and retry jitter is derived from a
//! hash of (run, step, attempt). The driver commits the returned state and journal records
//! in one transaction, and only then carries out the actions ("commit first, then act").
//! Every (state, event) pair is matched explicitly; a pair that is not declared is a typed
//! [`TransitionError::Invalid`], and terminal states absorb late events explicitly.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::domain::run::{idempotency_key, undo_key, Cause, Phase, Record, RunState, RunStatus};
use crate::domain::{RunId, StepError, Timestamp};
use crate::workflow::{Definition, Undo};

/// Something that happened to a run, fed to [`Machine::transition`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A worker claimed a pending run.
    Begin,
    /// A worker claimed a run whose step or compensation was in flight when its previous
    /// worker died or lost its lease: start the next attempt.
    Resume,
    /// The running step (or compensation) returned successfully with this output.
    StepSucceeded { output: Value },
    /// The running step (or compensation) failed.
    StepFailed { error: StepError },
    /// The running step checkpointed progress (e.g. an external job id) in the middle.
    Progress { data: Value },
    /// The run's wake-up time arrived (retry backoff or hold timer).
    WakeUp,
    /// A named signal arrived (e.g. `end-test`).
    Signal { name: String },
    /// Cancellation was requested.
    Cancel { reason: String },
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::Begin => "begin",
            Event::Resume => "resume",
            Event::StepSucceeded { .. } => "step_succeeded",
            Event::StepFailed { .. } => "step_failed",
            Event::Progress { .. } => "progress",
            Event::WakeUp => "wake_up",
            Event::Signal { .. } => "signal",
            Event::Cancel { .. } => "cancel",
        }
    }
}

/// What the driver must do once the transition is committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run attempt `attempt` of a step's action.
    Execute {
        phase: Phase,
        step: usize,
        attempt: u32,
        idempotency_key: String,
    },
    /// Run attempt `attempt` of forward step `step`'s compensation.
    Compensate {
        step: usize,
        attempt: u32,
        idempotency_key: String,
    },
    /// Nothing to run now: release the run until its wake-up time (or a signal).
    Sleep,
    /// The run is terminal.
    Finish,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub state: RunState,
    pub records: Vec<Record>,
    pub actions: Vec<Action>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("event {event} is not allowed in state {state}")]
    Invalid { state: &'static str, event: &'static str },
    #[error("wake-up before the run is due (due at {due})")]
    NotDue { due: Timestamp },
    #[error("the definition has no {phase:?} step {step}: the run does not match its pinned definition")]
    NoSuchStep { phase: Phase, step: usize },
    #[error("input problem: {0}")]
    Input(String),
}

fn state_name(s: &RunState) -> &'static str {
    match s {
        RunState::Pending => "pending",
        RunState::Running { .. } => "running",
        RunState::Backoff { .. } => "backoff",
        RunState::Holding { .. } => "holding",
        RunState::Compensating { .. } => "compensating",
        RunState::CompensationBackoff { .. } => "compensation_backoff",
        RunState::Completed => "completed",
        RunState::Failed { .. } => "failed",
        RunState::Cancelled { .. } => "cancelled",
        RunState::NeedsOperator { .. } => "needs_operator",
    }
}

/// A definition and a run's input: everything the transition function reads besides the state.
pub struct Machine<'a> {
    pub run_id: RunId,
    pub def: &'a Definition,
    pub input: &'a Value,
}

type Result<T> = std::result::Result<T, TransitionError>;

impl Machine<'_> {
    pub fn transition(&self, state: &RunState, event: &Event, now: Timestamp) -> Result<Transition> {
        let invalid = || TransitionError::Invalid {
            state: state_name(state),
            event: event.name(),
        };
        match (state, event) {
            // ---- Pending ----
            (RunState::Pending, Event::Begin) => {
                let mut records = Vec::new();
                let t = self.start_from(Phase::Forward, 0, &mut records, now)?;
                Ok(t.with_leading(records))
            }
            (RunState::Pending, Event::Cancel { reason }) => Ok(Transition {
                state: RunState::Cancelled { reason: reason.clone() },
                records: vec![
                    Record::CancelRequested {
                        reason: reason.clone(),
                        applied: true,
                    },
                    finished(RunStatus::Cancelled, None, vec![]),
                ],
                actions: vec![Action::Finish],
            }),
            (
                RunState::Pending,
                Event::Resume
                | Event::StepSucceeded { .. }
                | Event::StepFailed { .. }
                | Event::Progress { .. }
                | Event::WakeUp
                | Event::Signal { .. },
            ) => Err(invalid()),

            // ---- Running ----
            (RunState::Running { phase, step, attempt }, Event::StepSucceeded { output }) => {
                let name = self.step_name(*phase, *step)?;
                let mut records = vec![Record::StepSucceeded {
                    phase: *phase,
                    step: name,
                    attempt: *attempt,
                    output: output.clone(),
                }];
                let t = self.start_from(*phase, step + 1, &mut records, now)?;
                Ok(t.with_leading(records))
            }
            (RunState::Running { phase, step, attempt }, Event::StepFailed { error }) => {
                self.step_failed(*phase, *step, *attempt, error, now)
            }
            (RunState::Running { phase, step, attempt }, Event::Progress { data }) => Ok(Transition {
                state: state.clone(),
                records: vec![Record::StepProgress {
                    phase: *phase,
                    step: self.step_name(*phase, *step)?,
                    attempt: *attempt,
                    data: data.clone(),
                }],
                actions: vec![],
            }),
            (RunState::Running { phase, step, attempt }, Event::Resume) => {
                self.begin_attempt(*phase, *step, attempt + 1, vec![])
            }
            (
                RunState::Running {
                    phase: Phase::Forward,
                    step,
                    ..
                },
                Event::Cancel { reason },
            ) => {
                // The step was started, so it may have acted: its own undo runs first.
                self.rollback_from(
                    Some(*step),
                    Cause::Cancelled { reason: reason.clone() },
                    cancel_applied(reason),
                )
            }
            (
                RunState::Running {
                    phase: Phase::Teardown, ..
                },
                Event::Cancel { reason },
            ) => Ok(absorb_cancel(state, reason)),
            (RunState::Running { .. }, Event::Begin | Event::WakeUp | Event::Signal { .. }) => Err(invalid()),

            // ---- Backoff ----
            (
                RunState::Backoff {
                    phase,
                    step,
                    attempt,
                    at,
                },
                Event::WakeUp,
            ) => {
                if now < *at {
                    return Err(TransitionError::NotDue { due: *at });
                }
                self.begin_attempt(*phase, *step, *attempt, vec![])
            }
            (
                RunState::Backoff {
                    phase: Phase::Forward,
                    step,
                    ..
                },
                Event::Cancel { reason },
            ) => self.rollback_from(
                Some(*step),
                Cause::Cancelled { reason: reason.clone() },
                cancel_applied(reason),
            ),
            (
                RunState::Backoff {
                    phase: Phase::Teardown, ..
                },
                Event::Cancel { reason },
            ) => Ok(absorb_cancel(state, reason)),
            (
                RunState::Backoff { .. },
                Event::Begin
                | Event::Resume
                | Event::StepSucceeded { .. }
                | Event::StepFailed { .. }
                | Event::Progress { .. }
                | Event::Signal { .. },
            ) => Err(invalid()),

            // ---- Holding ----
            (RunState::Holding { until }, Event::WakeUp) => match until {
                Some(at) if now >= *at => {
                    let mut records = vec![Record::TimerFired { at: *at }];
                    let t = self.start_from(Phase::Teardown, 0, &mut records, now)?;
                    Ok(t.with_leading(records))
                }
                Some(at) => Err(TransitionError::NotDue { due: *at }),
                None => Err(invalid()),
            },
            (RunState::Holding { .. }, Event::Signal { name }) => {
                let wanted = self.def.hold.as_ref().is_some_and(|h| &h.signal == name);
                if !wanted {
                    return Ok(Transition {
                        state: state.clone(),
                        records: vec![Record::SignalReceived {
                            name: name.clone(),
                            applied: false,
                        }],
                        actions: vec![Action::Sleep],
                    });
                }
                let mut records = vec![Record::SignalReceived {
                    name: name.clone(),
                    applied: true,
                }];
                let t = self.start_from(Phase::Teardown, 0, &mut records, now)?;
                Ok(t.with_leading(records))
            }
            (RunState::Holding { .. }, Event::Cancel { reason }) => {
                let last = self.def.steps.len().checked_sub(1);
                self.rollback_from(
                    last,
                    Cause::Cancelled { reason: reason.clone() },
                    cancel_applied(reason),
                )
            }
            (
                RunState::Holding { .. },
                Event::Begin
                | Event::Resume
                | Event::StepSucceeded { .. }
                | Event::StepFailed { .. }
                | Event::Progress { .. },
            ) => Err(invalid()),

            // ---- Compensating ----
            (RunState::Compensating { step, attempt, cause }, Event::StepSucceeded { .. }) => {
                let records = vec![Record::CompensationSucceeded {
                    step: self.step_name(Phase::Forward, *step)?,
                    attempt: *attempt,
                }];
                let next = step.checked_sub(1);
                let t = self.rollback_from(next, cause.clone(), vec![])?;
                Ok(t.with_leading(records))
            }
            (RunState::Compensating { step, attempt, cause }, Event::StepFailed { error }) => {
                let def = self.step_def(Phase::Forward, *step)?;
                let name = def.name.clone();
                if error.is_retryable() && *attempt < def.retry.max_attempts {
                    let at = now.plus(def.retry.delay(*attempt, self.jitter_unit(&name, *attempt)));
                    return Ok(Transition {
                        state: RunState::CompensationBackoff {
                            step: *step,
                            attempt: attempt + 1,
                            at,
                            cause: cause.clone(),
                        },
                        records: vec![Record::CompensationFailed {
                            step: name,
                            attempt: *attempt,
                            error: error.clone(),
                            retry_at: Some(at),
                        }],
                        actions: vec![Action::Sleep],
                    });
                }
                let undone = self.rollback_remaining(Some(*step));
                Ok(Transition {
                    state: RunState::NeedsOperator {
                        step: name.clone(),
                        error: error.clone(),
                        undone: undone.clone(),
                    },
                    records: vec![
                        Record::CompensationFailed {
                            step: name,
                            attempt: *attempt,
                            error: error.clone(),
                            retry_at: None,
                        },
                        finished(RunStatus::NeedsOperator, Some(error.clone()), undone),
                    ],
                    actions: vec![Action::Finish],
                })
            }
            (RunState::Compensating { step, attempt, .. }, Event::Progress { data }) => Ok(Transition {
                state: state.clone(),
                records: vec![Record::CompensationProgress {
                    step: self.step_name(Phase::Forward, *step)?,
                    attempt: *attempt,
                    data: data.clone(),
                }],
                actions: vec![],
            }),
            (RunState::Compensating { step, attempt, cause }, Event::Resume) => {
                self.begin_compensation(*step, attempt + 1, cause.clone(), vec![])
            }
            (RunState::Compensating { .. }, Event::Cancel { reason }) => Ok(absorb_cancel(state, reason)),
            (RunState::Compensating { .. }, Event::Begin | Event::WakeUp | Event::Signal { .. }) => Err(invalid()),

            // ---- CompensationBackoff ----
            (
                RunState::CompensationBackoff {
                    step,
                    attempt,
                    at,
                    cause,
                },
                Event::WakeUp,
            ) => {
                if now < *at {
                    return Err(TransitionError::NotDue { due: *at });
                }
                self.begin_compensation(*step, *attempt, cause.clone(), vec![])
            }
            (RunState::CompensationBackoff { .. }, Event::Cancel { reason }) => Ok(absorb_cancel(state, reason)),
            (
                RunState::CompensationBackoff { .. },
                Event::Begin
                | Event::Resume
                | Event::StepSucceeded { .. }
                | Event::StepFailed { .. }
                | Event::Progress { .. }
                | Event::Signal { .. },
            ) => Err(invalid()),

            // ---- Terminal states absorb every late event, explicitly ----
            (
                RunState::Completed
                | RunState::Failed { .. }
                | RunState::Cancelled { .. }
                | RunState::NeedsOperator { .. },
                Event::Begin
                | Event::Resume
                | Event::StepSucceeded { .. }
                | Event::StepFailed { .. }
                | Event::Progress { .. }
                | Event::WakeUp
                | Event::Signal { .. }
                | Event::Cancel { .. },
            ) => Ok(Transition {
                state: state.clone(),
                records: vec![],
                actions: vec![Action::Finish],
            }),
        }
    }

    fn step_def(&self, phase: Phase, step: usize) -> Result<&crate::workflow::StepDef> {
        self.def
            .step(phase, step)
            .ok_or(TransitionError::NoSuchStep { phase, step })
    }

    fn step_name(&self, phase: Phase, step: usize) -> Result<String> {
        Ok(self.step_def(phase, step)?.name.clone())
    }

    /// A number in [-1, 1] derived from (run, step, attempt): deterministic jitter.
    fn jitter_unit(&self, step: &str, attempt: u32) -> f64 {
        let h = Sha256::digest(format!("{}/{step}/{attempt}", self.run_id).as_bytes());
        let n = u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
        (n as f64 / u64::MAX as f64) * 2.0 - 1.0
    }

    fn begin_attempt(&self, phase: Phase, step: usize, attempt: u32, mut records: Vec<Record>) -> Result<Transition> {
        let name = self.step_name(phase, step)?;
        let key = idempotency_key(self.run_id, phase, &name);
        records.push(Record::StepStarted {
            phase,
            step: name,
            attempt,
            idempotency_key: key.clone(),
        });
        Ok(Transition {
            state: RunState::Running { phase, step, attempt },
            records,
            actions: vec![Action::Execute {
                phase,
                step,
                attempt,
                idempotency_key: key,
            }],
        })
    }

    fn begin_compensation(
        &self,
        step: usize,
        attempt: u32,
        cause: Cause,
        mut records: Vec<Record>,
    ) -> Result<Transition> {
        let name = self.step_name(Phase::Forward, step)?;
        let key = undo_key(self.run_id, &name);
        records.push(Record::CompensationStarted {
            step: name,
            attempt,
            idempotency_key: key.clone(),
        });
        Ok(Transition {
            state: RunState::Compensating { step, attempt, cause },
            records,
            actions: vec![Action::Compensate {
                step,
                attempt,
                idempotency_key: key,
            }],
        })
    }

    /// Starts the first step at or after `from` in `phase` that is not skipped; when the phase
    /// is exhausted, moves on (forward -> hold -> teardown -> completed).
    fn start_from(&self, phase: Phase, from: usize, records: &mut Vec<Record>, now: Timestamp) -> Result<Transition> {
        let steps = self.def.steps(phase);
        for (i, step) in steps.iter().enumerate().skip(from) {
            match self.def.skipped(phase, i, self.input) {
                Some(reason) => records.push(Record::StepSkipped {
                    phase,
                    step: step.name.clone(),
                    reason,
                }),
                None => return self.begin_attempt(phase, i, 1, vec![]),
            }
        }
        match (phase, &self.def.hold) {
            (Phase::Forward, Some(_)) => {
                let until = self
                    .def
                    .hold_duration(self.input)
                    .map_err(TransitionError::Input)?
                    .map(|d| now.plus(d));
                let records = until.map(|at| vec![Record::TimerSet { at }]).unwrap_or_default();
                Ok(Transition {
                    state: RunState::Holding { until },
                    records,
                    actions: vec![Action::Sleep],
                })
            }
            (Phase::Forward, None) | (Phase::Teardown, _) => Ok(Transition {
                state: RunState::Completed,
                records: vec![finished(RunStatus::Completed, None, vec![])],
                actions: vec![Action::Finish],
            }),
        }
    }

    fn step_failed(
        &self,
        phase: Phase,
        step: usize,
        attempt: u32,
        error: &StepError,
        now: Timestamp,
    ) -> Result<Transition> {
        let def = self.step_def(phase, step)?;
        let name = def.name.clone();
        if error.is_retryable() && attempt < def.retry.max_attempts {
            let at = now.plus(def.retry.delay(attempt, self.jitter_unit(&name, attempt)));
            return Ok(Transition {
                state: RunState::Backoff {
                    phase,
                    step,
                    attempt: attempt + 1,
                    at,
                },
                records: vec![Record::StepFailed {
                    phase,
                    step: name,
                    attempt,
                    error: error.clone(),
                    retry_at: Some(at),
                }],
                actions: vec![Action::Sleep],
            });
        }
        let failed = Record::StepFailed {
            phase,
            step: name.clone(),
            attempt,
            error: error.clone(),
            retry_at: None,
        };
        match phase {
            Phase::Forward => {
                let t = self.rollback_from(
                    Some(step),
                    Cause::Failed {
                        step: name,
                        error: error.clone(),
                    },
                    vec![],
                )?;
                Ok(t.with_leading(vec![failed]))
            }
            Phase::Teardown => {
                // A teardown step is itself the way back: when it cannot finish, a person must.
                let undone: Vec<String> = self.def.teardown[step..].iter().map(|s| s.name.clone()).collect();
                Ok(Transition {
                    state: RunState::NeedsOperator {
                        step: name,
                        error: error.clone(),
                        undone: undone.clone(),
                    },
                    records: vec![failed, finished(RunStatus::NeedsOperator, Some(error.clone()), undone)],
                    actions: vec![Action::Finish],
                })
            }
        }
    }

    /// Rolls back forward steps `from, from-1, …, 0`: starts the first compensation that has
    /// work to do, stops at an irreversible step, or finishes the run when nothing is left.
    fn rollback_from(&self, from: Option<usize>, cause: Cause, mut records: Vec<Record>) -> Result<Transition> {
        let mut next = from;
        while let Some(i) = next {
            let def = self.step_def(Phase::Forward, i)?;
            let failed_here = matches!(&cause, Cause::Failed { step, .. } if *step == def.name);
            let skipped = self.def.skipped(Phase::Forward, i, self.input).is_some();
            match (&def.undo, skipped) {
                (_, true) | (Undo::Nothing, false) => {}
                (Undo::Action(_), false) => return self.begin_compensation(i, 1, cause, records),
                // The failed step did not take effect, so there is nothing irreversible to face yet.
                (Undo::Irreversible, false) if failed_here => {}
                (Undo::Irreversible, false) => {
                    let error = StepError::permanent(
                        "IRREVERSIBLE",
                        format!("step {} cannot be undone; rollback stopped there", def.name),
                    );
                    let undone = self.rollback_remaining(Some(i));
                    records.push(finished(RunStatus::NeedsOperator, Some(error.clone()), undone.clone()));
                    return Ok(Transition {
                        state: RunState::NeedsOperator {
                            step: def.name.clone(),
                            error,
                            undone,
                        },
                        records,
                        actions: vec![Action::Finish],
                    });
                }
            }
            next = i.checked_sub(1);
        }
        let (state, status, error) = match cause {
            Cause::Failed { step, error } => (
                RunState::Failed {
                    step,
                    error: error.clone(),
                },
                RunStatus::Failed,
                Some(error),
            ),
            Cause::Cancelled { reason } => (RunState::Cancelled { reason }, RunStatus::Cancelled, None),
        };
        records.push(finished(status, error, vec![]));
        Ok(Transition {
            state,
            records,
            actions: vec![Action::Finish],
        })
    }

    /// The steps a rollback starting at `from` would still have to undo (for the operator).
    fn rollback_remaining(&self, from: Option<usize>) -> Vec<String> {
        let Some(from) = from else { return vec![] };
        (0..=from)
            .rev()
            .filter_map(|i| self.def.steps.get(i).map(|s| (i, s)))
            .filter(|(i, s)| {
                !matches!(s.undo, Undo::Nothing) && self.def.skipped(Phase::Forward, *i, self.input).is_none()
            })
            .map(|(_, s)| s.name.clone())
            .collect()
    }
}

fn finished(status: RunStatus, error: Option<StepError>, undone: Vec<String>) -> Record {
    Record::RunFinished { status, error, undone }
}

fn cancel_applied(reason: &str) -> Vec<Record> {
    vec![Record::CancelRequested {
        reason: reason.to_string(),
        applied: true,
    }]
}

fn absorb_cancel(state: &RunState, reason: &str) -> Transition {
    // A rollback or teardown already under way is the way back; cancel changes nothing.
    // An in-flight attempt carries on (no action); a sleeping one goes back to sleep.
    let actions = match state {
        RunState::Backoff { .. } | RunState::CompensationBackoff { .. } => vec![Action::Sleep],
        RunState::Running { .. } | RunState::Compensating { .. } => vec![],
        RunState::Pending
        | RunState::Holding { .. }
        | RunState::Completed
        | RunState::Failed { .. }
        | RunState::Cancelled { .. }
        | RunState::NeedsOperator { .. } => vec![],
    };
    Transition {
        state: state.clone(),
        records: vec![Record::CancelRequested {
            reason: reason.to_string(),
            applied: false,
        }],
        actions,
    }
}

/// `t` finishes the run while a cancel was pending that it does not deliver (it arrived while
/// the last step ran): the cancel is recorded as not applied, just before the run's end.
pub fn with_late_cancel(mut t: Transition, reason: &str) -> Transition {
    let at = t
        .records
        .iter()
        .rposition(|r| matches!(r, Record::RunFinished { .. }))
        .unwrap_or(t.records.len());
    t.records.insert(
        at,
        Record::CancelRequested {
            reason: reason.to_string(),
            applied: false,
        },
    );
    t
}

impl Transition {
    fn with_leading(mut self, mut leading: Vec<Record>) -> Self {
        leading.append(&mut self.records);
        self.records = leading;
        self
    }
}

#[cfg(test)]
mod tests;
