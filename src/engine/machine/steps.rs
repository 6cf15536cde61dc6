//! The edges of attempts of forward and teardown steps: begin, success and the next start,
//! failure (retry or give up), progress, resume after a crash, and the end of a retry backoff.

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{due, finished, needs_operator, Action, Machine, Result, Transition};
use crate::domain::run::{idempotency_key, Cause, Phase, Record, RunState, RunStatus};
use crate::domain::{StepError, Timestamp};
use crate::workflow::StepDef;

impl Machine<'_> {
    /// Pending + Begin: the first forward step that is not skipped starts.
    pub(super) fn on_begin(&self, now: Timestamp) -> Result<Transition> {
        self.start_from(Phase::Forward, 0, vec![], now)
    }

    /// Running + StepSucceeded: the success and the next step's start are one transition.
    pub(super) fn on_step_succeeded(
        &self,
        phase: Phase,
        step: usize,
        attempt: u32,
        output: &Value,
        now: Timestamp,
    ) -> Result<Transition> {
        let succeeded = Record::StepSucceeded {
            phase,
            step: self.step_name(phase, step)?,
            attempt,
            output: output.clone(),
        };
        self.start_from(phase, step + 1, vec![succeeded], now)
    }

    /// Running + StepFailed: back off for the next attempt while retries are left; then a
    /// forward step rolls back and a teardown step needs an operator.
    pub(super) fn on_step_failed(
        &self,
        phase: Phase,
        step: usize,
        attempt: u32,
        error: &StepError,
        now: Timestamp,
    ) -> Result<Transition> {
        let def = self.step_def(phase, step)?;
        let name = def.name.clone();
        let retry_at = self.retry_at(def, attempt, error, now);
        let failed = Record::StepFailed {
            phase,
            step: name.clone(),
            attempt,
            error: error.clone(),
            retry_at,
        };
        if let Some(at) = retry_at {
            return Ok(Transition {
                state: RunState::Backoff {
                    phase,
                    step,
                    attempt: attempt + 1,
                    at,
                },
                records: vec![failed],
                action: Action::Sleep,
            });
        }
        match phase {
            Phase::Forward => {
                let cause = Cause::Failed {
                    step: name,
                    error: error.clone(),
                };
                Ok(self
                    .rollback_from(Some(step), cause, vec![])?
                    .with_leading(vec![failed]))
            }
            Phase::Teardown => {
                // A teardown step is itself the way back: when it cannot finish, a person must.
                let undone = self.def.teardown[step..].iter().map(|s| s.name.clone()).collect();
                Ok(needs_operator(name, error.clone(), undone, vec![failed]))
            }
        }
    }

    /// Running + Progress: journaled; the attempt carries on.
    pub(super) fn on_step_progress(&self, phase: Phase, step: usize, attempt: u32, data: &Value) -> Result<Transition> {
        Ok(Transition {
            state: RunState::Running { phase, step, attempt },
            records: vec![Record::StepProgress {
                phase,
                step: self.step_name(phase, step)?,
                attempt,
                data: data.clone(),
            }],
            action: Action::Continue,
        })
    }

    /// Running + Resume: the attempt in flight died with its worker; the next one starts.
    pub(super) fn on_step_resume(&self, phase: Phase, step: usize, attempt: u32) -> Result<Transition> {
        self.begin_attempt(phase, step, attempt + 1)
    }

    /// Backoff + WakeUp: once due, the next attempt starts.
    pub(super) fn on_retry_due(
        &self,
        phase: Phase,
        step: usize,
        attempt: u32,
        at: Timestamp,
        now: Timestamp,
    ) -> Result<Transition> {
        due(at, now)?;
        self.begin_attempt(phase, step, attempt)
    }

    /// When attempt `attempt` of `def` failed with `error`, the time of the next attempt, or
    /// None when the error is permanent or the attempts are used up.
    pub(super) fn retry_at(&self, def: &StepDef, attempt: u32, error: &StepError, now: Timestamp) -> Option<Timestamp> {
        let retry = error.is_retryable() && attempt < def.retry.max_attempts;
        retry.then(|| now.plus(def.retry.delay(attempt, self.jitter_unit(&def.name, attempt))))
    }

    /// A number in [-1, 1] derived from (run, step, attempt): deterministic jitter.
    fn jitter_unit(&self, step: &str, attempt: u32) -> f64 {
        let h = Sha256::digest(format!("{}/{step}/{attempt}", self.run_id).as_bytes());
        let n = u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
        (n as f64 / u64::MAX as f64) * 2.0 - 1.0
    }

    fn begin_attempt(&self, phase: Phase, step: usize, attempt: u32) -> Result<Transition> {
        let name = self.step_name(phase, step)?;
        let key = idempotency_key(self.run_id, phase, &name);
        Ok(Transition {
            state: RunState::Running { phase, step, attempt },
            records: vec![Record::StepStarted {
                phase,
                step: name,
                attempt,
                idempotency_key: key.clone(),
            }],
            action: Action::Execute {
                phase,
                step,
                attempt,
                idempotency_key: key,
            },
        })
    }

    /// Starts the first step at or after `from` in `phase` that is not skipped; when the phase
    /// is exhausted, moves on (forward -> hold -> teardown -> completed). `records` come first.
    pub(super) fn start_from(
        &self,
        phase: Phase,
        from: usize,
        mut records: Vec<Record>,
        now: Timestamp,
    ) -> Result<Transition> {
        let steps = self.def.steps(phase);
        for (i, step) in steps.iter().enumerate().skip(from) {
            match self.def.skipped(phase, i, self.input) {
                Some(reason) => records.push(Record::StepSkipped {
                    phase,
                    step: step.name.clone(),
                    reason,
                }),
                None => return Ok(self.begin_attempt(phase, i, 1)?.with_leading(records)),
            }
        }
        let next = match (phase, &self.def.hold) {
            (Phase::Forward, Some(_)) => self.enter_hold(now)?,
            (Phase::Forward, None) | (Phase::Teardown, _) => Transition {
                state: RunState::Completed,
                records: vec![finished(RunStatus::Completed, None, vec![])],
                action: Action::Finish,
            },
        };
        Ok(next.with_leading(records))
    }
}
