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

use crate::domain::{RunId, StepError, Timestamp};
use crate::workflow::{Definition, Phase, Undo};

/// Why a run is rolling back; decides its terminal state once the rollback is done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Cause {
    Failed { step: String, error: StepError },
    Cancelled { reason: String },
}

/// The persisted state of a run. Each variant carries only its own data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RunState {
    /// Submitted; nothing started. Left by the first worker that claims it (`Begin`) or by `Cancel`.
    Pending,
    /// Attempt `attempt` of a step is committed as started; its side effect may be in flight.
    /// Left by the step's result, or by `Resume` when a worker re-claims it after a crash.
    Running { phase: Phase, step: usize, attempt: u32 },
    /// Attempt `attempt - 1` failed with a retryable error; asleep in the database until `at`,
    /// when a worker's `WakeUp` starts attempt `attempt`.
    Backoff {
        phase: Phase,
        step: usize,
        attempt: u32,
        at: Timestamp,
    },
    /// Forward steps done; waiting for the hold's signal or its timer (`until`), whichever is first.
    Holding { until: Option<Timestamp> },
    /// Undoing forward step `step` (its compensation, attempt `attempt`) because of `cause`.
    Compensating { step: usize, attempt: u32, cause: Cause },
    /// A compensation attempt failed with a retryable error; asleep until `at`.
    CompensationBackoff {
        step: usize,
        attempt: u32,
        at: Timestamp,
        cause: Cause,
    },
    /// Every step (and the teardown, if any) succeeded. Terminal.
    Completed,
    /// A step failed permanently and every completed step was undone. Terminal.
    Failed { step: String, error: StepError },
    /// Cancelled and every completed step was undone. Terminal.
    Cancelled { reason: String },
    /// Something could not be undone (a compensation or teardown step exhausted its retries,
    /// or an irreversible step was reached). `undone` lists what is left. Terminal.
    NeedsOperator {
        step: String,
        error: StepError,
        undone: Vec<String>,
    },
}

/// The coarse status column that workers and filters use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Pending,
    Running,
    Sleeping,
    Holding,
    Compensating,
    Completed,
    Failed,
    Cancelled,
    NeedsOperator,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Pending => "pending",
            RunStatus::Running => "running",
            RunStatus::Sleeping => "sleeping",
            RunStatus::Holding => "holding",
            RunStatus::Compensating => "compensating",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::NeedsOperator => "needs_operator",
        }
    }

    pub fn parse(s: &str) -> Option<RunStatus> {
        Some(match s {
            "pending" => RunStatus::Pending,
            "running" => RunStatus::Running,
            "sleeping" => RunStatus::Sleeping,
            "holding" => RunStatus::Holding,
            "compensating" => RunStatus::Compensating,
            "completed" => RunStatus::Completed,
            "failed" => RunStatus::Failed,
            "cancelled" => RunStatus::Cancelled,
            "needs_operator" => RunStatus::NeedsOperator,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled | RunStatus::NeedsOperator
        )
    }
}

impl RunState {
    pub fn status(&self) -> RunStatus {
        match self {
            RunState::Pending => RunStatus::Pending,
            RunState::Running { .. } => RunStatus::Running,
            RunState::Backoff { .. } => RunStatus::Sleeping,
            RunState::Holding { .. } => RunStatus::Holding,
            RunState::Compensating { .. } | RunState::CompensationBackoff { .. } => RunStatus::Compensating,
            RunState::Completed => RunStatus::Completed,
            RunState::Failed { .. } => RunStatus::Failed,
            RunState::Cancelled { .. } => RunStatus::Cancelled,
            RunState::NeedsOperator { .. } => RunStatus::NeedsOperator,
        }
    }

    pub fn is_terminal(&self) -> bool {
        self.status().is_terminal()
    }

    /// When a worker should next pick this run up. `None` means only a signal or cancel
    /// wakes it (a hold without a timer) or never (terminal). Running and compensating runs
    /// are due at once, which is what lets another worker take them over when a lease expires.
    pub fn wake_at(&self, now: Timestamp) -> Option<Timestamp> {
        match self {
            RunState::Pending | RunState::Running { .. } | RunState::Compensating { .. } => Some(now),
            RunState::Backoff { at, .. } | RunState::CompensationBackoff { at, .. } => Some(*at),
            RunState::Holding { until } => *until,
            RunState::Completed
            | RunState::Failed { .. }
            | RunState::Cancelled { .. }
            | RunState::NeedsOperator { .. } => None,
        }
    }

    /// Whether the run is waiting for a named signal now (signals wait in the database otherwise).
    pub fn accepts_signals(&self) -> bool {
        matches!(self, RunState::Holding { .. })
    }

    /// The user-visible status of the run (the seeds' vocabulary where the definition gives it).
    pub fn display_status(&self, def: &Definition) -> String {
        let step_status = |phase: Phase, step: usize| {
            def.step(phase, step)
                .and_then(|s| s.status.clone())
                .unwrap_or_else(|| match phase {
                    Phase::Forward => "executing".to_string(),
                    Phase::Teardown => "cleanup".to_string(),
                })
        };
        match self {
            RunState::Pending => "pending".into(),
            RunState::Running { phase, step, .. } | RunState::Backoff { phase, step, .. } => step_status(*phase, *step),
            RunState::Holding { .. } => def
                .hold
                .as_ref()
                .and_then(|h| h.status.clone())
                .unwrap_or_else(|| "holding".into()),
            RunState::Compensating { .. } | RunState::CompensationBackoff { .. } => "reverting".into(),
            RunState::Completed => "completed".into(),
            RunState::Failed { .. } => "failed".into(),
            RunState::Cancelled { .. } => "cancelled".into(),
            RunState::NeedsOperator { .. } => "needs_operator".into(),
        }
    }
}

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

/// One journal entry: the append-only audit trail of a run. Every transition writes at least one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    RunSubmitted {
        definition: String,
        definition_hash: String,
        input: Value,
    },
    StepSkipped {
        phase: Phase,
        step: String,
        reason: String,
    },
    StepStarted {
        phase: Phase,
        step: String,
        attempt: u32,
        idempotency_key: String,
    },
    StepProgress {
        phase: Phase,
        step: String,
        attempt: u32,
        data: Value,
    },
    StepSucceeded {
        phase: Phase,
        step: String,
        attempt: u32,
        output: Value,
    },
    /// `retry_at` is set when another attempt is scheduled; `None` means the step failed permanently.
    StepFailed {
        phase: Phase,
        step: String,
        attempt: u32,
        error: StepError,
        retry_at: Option<Timestamp>,
    },
    CompensationStarted {
        step: String,
        attempt: u32,
        idempotency_key: String,
    },
    CompensationProgress {
        step: String,
        attempt: u32,
        data: Value,
    },
    CompensationSucceeded {
        step: String,
        attempt: u32,
    },
    CompensationFailed {
        step: String,
        attempt: u32,
        error: StepError,
        retry_at: Option<Timestamp>,
    },
    TimerSet {
        at: Timestamp,
    },
    TimerFired {
        at: Timestamp,
    },
    /// `applied` is false when the run was not waiting for that signal.
    SignalReceived {
        name: String,
        applied: bool,
    },
    /// `applied` is false when the run was already rolling back or tearing down.
    CancelRequested {
        reason: String,
        applied: bool,
    },
    RunFinished {
        status: RunStatus,
        error: Option<StepError>,
        undone: Vec<String>,
    },
}

impl Record {
    pub fn kind(&self) -> &'static str {
        match self {
            Record::RunSubmitted { .. } => "run_submitted",
            Record::StepSkipped { .. } => "step_skipped",
            Record::StepStarted { .. } => "step_started",
            Record::StepProgress { .. } => "step_progress",
            Record::StepSucceeded { .. } => "step_succeeded",
            Record::StepFailed { retry_at: Some(_), .. } => "step_retry_scheduled",
            Record::StepFailed { retry_at: None, .. } => "step_failed",
            Record::CompensationStarted { .. } => "compensation_started",
            Record::CompensationProgress { .. } => "compensation_progress",
            Record::CompensationSucceeded { .. } => "compensation_succeeded",
            Record::CompensationFailed { .. } => "compensation_failed",
            Record::TimerSet { .. } => "timer_set",
            Record::TimerFired { .. } => "timer_fired",
            Record::SignalReceived { .. } => "signal_received",
            Record::CancelRequested { .. } => "cancel_requested",
            Record::RunFinished { .. } => "run_finished",
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

/// The stable idempotency key of a step: the same for every attempt of that step in that run.
pub fn idempotency_key(run_id: RunId, phase: Phase, step: &str) -> String {
    match phase {
        Phase::Forward => format!("{run_id}/{step}"),
        Phase::Teardown => format!("{run_id}/teardown/{step}"),
    }
}

/// The stable idempotency key of a step's compensation.
pub fn undo_key(run_id: RunId, step: &str) -> String {
    format!("{run_id}/{step}/undo")
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
