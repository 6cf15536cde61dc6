//! The edges of the way back: cancel, and the compensations that undo forward steps in
//! reverse, each retried like a step; a compensation that cannot finish needs an operator.

use serde_json::Value;

use super::{due, finished, needs_operator, Action, Machine, Result, Transition};
use crate::domain::run::{undo_key, Cause, Phase, Record, RunState, RunStatus};
use crate::domain::{StepError, Timestamp};
use crate::workflow::Undo;

fn cancel_applied(reason: &str, by: &Option<String>) -> Record {
    Record::CancelRequested {
        reason: reason.to_string(),
        applied: true,
        by: by.clone(),
    }
}

impl Machine<'_> {
    /// Pending + Cancel: nothing happened yet, so the run is cancelled at once.
    pub(super) fn on_cancel_pending(&self, reason: &str, by: &Option<String>) -> Result<Transition> {
        Ok(Transition {
            state: RunState::Cancelled {
                reason: reason.to_string(),
            },
            records: vec![cancel_applied(reason, by), finished(RunStatus::Cancelled, None, vec![])],
            action: Action::Finish,
        })
    }

    /// Cancel while forward steps may have acted: roll back from forward step `from`.
    pub(super) fn on_cancel(&self, from: Option<usize>, reason: &str, by: &Option<String>) -> Result<Transition> {
        let cause = Cause::Cancelled {
            reason: reason.to_string(),
        };
        self.rollback_from(from, cause, vec![cancel_applied(reason, by)])
    }

    /// Cancel while a rollback or teardown is already under way, which is the way back: it
    /// changes nothing but the journal. An attempt in flight carries on; a run asleep sleeps on.
    pub(super) fn on_cancel_absorbed(&self, state: &RunState, reason: &str, by: &Option<String>) -> Result<Transition> {
        let asleep = matches!(state, RunState::Backoff { .. } | RunState::CompensationBackoff { .. });
        Ok(Transition {
            state: state.clone(),
            records: vec![Record::CancelRequested {
                reason: reason.to_string(),
                applied: false,
                by: by.clone(),
            }],
            action: if asleep { Action::Sleep } else { Action::Continue },
        })
    }

    /// Compensating + StepSucceeded: the step is undone; the rollback moves to the one before.
    pub(super) fn on_compensation_succeeded(&self, step: usize, attempt: u32, cause: &Cause) -> Result<Transition> {
        let succeeded = Record::CompensationSucceeded {
            step: self.step_name(Phase::Forward, step)?,
            attempt,
        };
        Ok(self
            .rollback_from(step.checked_sub(1), cause.clone(), vec![])?
            .with_leading(vec![succeeded]))
    }

    /// Compensating + StepFailed: back off for the next attempt while retries are left; then
    /// the run needs an operator, told what is left to undo.
    pub(super) fn on_compensation_failed(
        &self,
        step: usize,
        attempt: u32,
        cause: &Cause,
        error: &StepError,
        now: Timestamp,
    ) -> Result<Transition> {
        let def = self.step_def(Phase::Forward, step)?;
        let retry_at = self.retry_at(def, attempt, error, now);
        let failed = Record::CompensationFailed {
            step: def.name.clone(),
            attempt,
            error: error.clone(),
            retry_at,
        };
        match retry_at {
            Some(at) => Ok(Transition {
                state: RunState::CompensationBackoff {
                    step,
                    attempt: attempt + 1,
                    at,
                    cause: cause.clone(),
                },
                records: vec![failed],
                action: Action::Sleep,
            }),
            None => {
                let undone = self.rollback_remaining(Some(step));
                Ok(needs_operator(def.name.clone(), error.clone(), undone, vec![failed]))
            }
        }
    }

    /// Compensating + Progress: journaled; the attempt carries on.
    pub(super) fn on_compensation_progress(
        &self,
        step: usize,
        attempt: u32,
        cause: &Cause,
        data: &Value,
    ) -> Result<Transition> {
        Ok(Transition {
            state: RunState::Compensating {
                step,
                attempt,
                cause: cause.clone(),
            },
            records: vec![Record::CompensationProgress {
                step: self.step_name(Phase::Forward, step)?,
                attempt,
                data: data.clone(),
            }],
            action: Action::Continue,
        })
    }

    /// Compensating + Resume: the attempt in flight died with its worker; the next one starts.
    pub(super) fn on_compensation_resume(&self, step: usize, attempt: u32, cause: &Cause) -> Result<Transition> {
        self.begin_compensation(step, attempt + 1, cause.clone(), vec![])
    }

    /// CompensationBackoff + WakeUp: once due, the next attempt starts.
    pub(super) fn on_compensation_retry_due(
        &self,
        step: usize,
        attempt: u32,
        at: Timestamp,
        cause: &Cause,
        now: Timestamp,
    ) -> Result<Transition> {
        due(at, now)?;
        self.begin_compensation(step, attempt, cause.clone(), vec![])
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
            action: Action::Compensate {
                step,
                attempt,
                idempotency_key: key,
            },
        })
    }

    /// Rolls back forward steps `from, from-1, …, 0`: starts the first compensation that has
    /// work to do, stops at an irreversible step, or finishes the run when nothing is left.
    pub(super) fn rollback_from(
        &self,
        from: Option<usize>,
        cause: Cause,
        mut records: Vec<Record>,
    ) -> Result<Transition> {
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
                    return Ok(needs_operator(def.name.clone(), error, undone, records));
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
            action: Action::Finish,
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
