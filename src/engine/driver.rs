//! Drives one claimed run: feed an event to the pure machine, commit the result (journal +
//! compare-and-set) and only then carry out the action it asks for. A heartbeat keeps the
//! lease alive; losing it (`Fenced`) stops the driver from touching the run again.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::action::{ActionError, Progress, ProgressRequest, StepInput};
use super::machine::{self, Action, Event, Machine, Transition};
use super::{Engine, EngineError};
use crate::crash;
use crate::domain::run::Phase;
use crate::domain::run::{RunContext, RunState};
use crate::domain::{RunId, StepError, Timestamp};
use crate::store::{projection, Checkpoint, Lease, RunRow, StoreError};
use crate::telemetry::metrics;
use crate::workflow::{Definition, Undo};

/// Why a driver stopped before the run was asleep or finished.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// The run is asleep (backoff, hold) or terminal; the lease is released.
    Released,
    /// Shutdown: the lease was handed back so another worker can continue at once.
    Shutdown,
}

struct Driver {
    engine: Arc<Engine>,
    def: Arc<Definition>,
    run_id: RunId,
    correlation_id: String,
    input: Arc<Value>,
    lease: Lease,
    state: RunState,
    seq: i64,
    context: RunContext,
    signals_pending: i64,
    cancel_pending: bool,
    lost: CancellationToken,
    shutdown: CancellationToken,
}

/// Drives `run` (claimed under `lease`) until it sleeps, finishes, is fenced or shutdown stops it.
/// `first` is what the submit of a run submitted and started at once committed; without it the
/// driver decides the first event itself.
pub(crate) async fn drive(
    engine: Arc<Engine>,
    run: RunRow,
    lease: Lease,
    first: Option<Started>,
    shutdown: CancellationToken,
) -> Result<Stopped, EngineError> {
    let span = tracing::info_span!("run", run_id = %run.id, definition = %run.definition, correlation_id = %run.correlation_id, fence = lease.token);
    // One trace per run: every worker's spans join the call that submitted it.
    if let Some(parent) = &run.trace_parent {
        crate::telemetry::traces::continue_trace(&span, parent);
    }
    async move {
        let (first, _executing) = match first {
            Some(s) => (Some(s.action), s.executing),
            None => (None, engine.register_executing(&run, Vec::new())),
        };
        let def = engine.pinned(&run.definition_hash).await?;
        let lost = CancellationToken::new();
        let heartbeat = tokio::spawn(heartbeat(engine.clone(), run.id, lease.clone(), lost.clone()));
        let _stop_heartbeat = tokio_util::task::AbortOnDropHandle::new(heartbeat);
        let mut d = Driver {
            engine,
            def,
            run_id: run.id,
            correlation_id: run.correlation_id,
            input: Arc::new(run.input),
            lease,
            state: run.state,
            seq: run.last_seq,
            context: run.context,
            signals_pending: run.signals_pending,
            cancel_pending: run.cancel_pending,
            lost,
            shutdown,
        };
        let result = d.run(first).await;
        if let Err(EngineError::Store(StoreError::Fenced { .. })) = &result {
            metrics::fenced_write();
            tracing::warn!("lease lost to another worker; leaving the run to it");
        }
        result
    }
    .instrument(span)
    .await
}

/// A run submitted and started at once: the action of the transition its submit committed, and
/// its registration as executing here, made when the submit committed (with the journal entries
/// that submit stored, the run's whole journal so far).
pub(crate) struct Started {
    pub action: Action,
    pub executing: super::ExecutingGuard,
}

async fn heartbeat(engine: Arc<Engine>, run: RunId, lease: Lease, lost: CancellationToken) {
    let ttl = engine.config.lease_ttl;
    let every = (ttl / 3).max(Duration::from_millis(50));
    loop {
        tokio::time::sleep(every).await;
        match engine.store.heartbeat(run, &lease, Timestamp::now().plus(ttl)).await {
            Ok(()) => {}
            Err(StoreError::Fenced { .. }) => {
                lost.cancel();
                return;
            }
            Err(e) => {
                metrics::heartbeat_failure();
                tracing::warn!(error = %e, "heartbeat failed; retrying");
            }
        }
    }
}

impl Driver {
    fn machine(&self) -> Machine<'_> {
        Machine {
            run_id: self.run_id,
            def: &self.def,
            input: &self.input,
        }
    }

    async fn run(&mut self, first: Option<Action>) -> Result<Stopped, EngineError> {
        let mut next = match first {
            Some(action) => action,
            None => self.on_claim().await?,
        };
        loop {
            match next {
                // Continue: nothing is in flight here to carry on with.
                Action::Continue | Action::Sleep | Action::Finish => return Ok(Stopped::Released),
                ref action @ (Action::Execute { .. } | Action::Compensate { .. }) => {
                    if self.cancel_pending && !self.state.is_terminal() {
                        // A cancel that changes course replaces the action; an absorbed one leaves it.
                        match self.deliver_cancel().await? {
                            Action::Continue => {}
                            changed => {
                                next = changed;
                                continue;
                            }
                        }
                    }
                    if self.shutdown.is_cancelled() {
                        self.engine.store.release(self.run_id, &self.lease).await?;
                        return Ok(Stopped::Shutdown);
                    }
                    let event = match self.execute(action).await? {
                        Some(e) => e,
                        None => return Ok(Stopped::Shutdown),
                    };
                    next = self.apply(event, vec![], false).await?;
                }
            }
        }
    }

    /// Decides the first event after a claim: a pending cancel, then waiting signals, then
    /// whatever the state needs (begin, resume the interrupted attempt, or wake up).
    async fn on_claim(&mut self) -> Result<Action, EngineError> {
        if self.state.is_terminal() {
            self.engine.store.release(self.run_id, &self.lease).await?;
            return Ok(Action::Finish);
        }
        if self.cancel_pending {
            match self.deliver_cancel().await? {
                Action::Continue => {}
                changed => return Ok(changed),
            }
        }
        if self.state.accepts_signals() && self.signals_pending > 0 {
            for sig in self.engine.store.pending_signals(self.run_id).await? {
                let next = self
                    .apply(
                        Event::Signal {
                            name: sig.name,
                            by: sig.by,
                        },
                        vec![sig.id],
                        false,
                    )
                    .await?;
                // Either the hold ended, or the run went back to sleep (and gave up its lease):
                // any further signal or a due timer wakes it again at once.
                if !self.state.accepts_signals() || matches!(next, Action::Sleep) {
                    return Ok(next);
                }
            }
        }
        let now = Timestamp::now();
        let event = match &self.state {
            RunState::Pending => Event::Begin,
            RunState::Running { .. } | RunState::Compensating { .. } => {
                metrics::takeover(&self.def.name);
                Event::Resume
            }
            RunState::Backoff { at, .. } | RunState::CompensationBackoff { at, .. } if *at <= now => {
                metrics::timer_fired("backoff", at.until(now));
                Event::WakeUp
            }
            RunState::Holding { until: Some(at) } if *at <= now => {
                metrics::timer_fired("hold", at.until(now));
                Event::WakeUp
            }
            RunState::Backoff { .. } | RunState::CompensationBackoff { .. } | RunState::Holding { .. } => {
                // Claimed early (a race with a signal or a clock step): go back to sleep unchanged.
                self.resleep(now).await?;
                return Ok(Action::Sleep);
            }
            RunState::Completed
            | RunState::Failed { .. }
            | RunState::Cancelled { .. }
            | RunState::NeedsOperator { .. }
            | RunState::Resolved { .. } => return Ok(Action::Finish),
        };
        self.apply(event, vec![], false).await
    }

    /// Applies the stored cancel request. Returns the action it leads to: `Continue` when the
    /// cancel was absorbed and the in-flight work should carry on.
    async fn deliver_cancel(&mut self) -> Result<Action, EngineError> {
        let (reason, by) = self.cancel_reason().await?;
        self.apply(Event::Cancel { reason, by }, vec![], true).await
    }

    async fn resleep(&mut self, now: Timestamp) -> Result<(), EngineError> {
        let t = Transition {
            state: self.state.clone(),
            records: vec![],
            action: Action::Sleep,
        };
        self.commit(t, vec![], false, now).await.map(|_| ())
    }

    /// Feeds an event to the machine and commits the result. Returns the action to carry out.
    async fn apply(&mut self, event: Event, consumed: Vec<i64>, consumed_cancel: bool) -> Result<Action, EngineError> {
        let now = Timestamp::now();
        let t = self.machine().transition(&self.state, &event, now)?;
        let absorbed = t.records.is_empty() && t.state == self.state && consumed.is_empty() && !consumed_cancel;
        if absorbed {
            return Ok(t.action);
        }
        if !t.state.is_terminal() || consumed_cancel {
            return self.commit(t, consumed, consumed_cancel, now).await;
        }
        // The run ends here. A cancel accepted meanwhile (while its last step ran) is recorded
        // as too late rather than left pending on a finished run; the store refuses a terminal
        // checkpoint that would leave one, which is how a cancel that raced this commit is seen.
        if self.cancel_pending {
            let (reason, by) = self.cancel_reason().await?;
            return self
                .commit(
                    machine::with_late_cancel(t, &reason, by.as_deref()),
                    consumed,
                    true,
                    now,
                )
                .await;
        }
        match self.commit(t.clone(), consumed.clone(), false, now).await {
            Err(fenced @ EngineError::Store(StoreError::Fenced { .. })) => match self.cancel_arrived().await? {
                Some((reason, by)) => {
                    self.cancel_pending = true;
                    self.commit(
                        machine::with_late_cancel(t, &reason, by.as_deref()),
                        consumed,
                        true,
                        now,
                    )
                    .await
                }
                None => Err(fenced),
            },
            other => other,
        }
    }

    /// After a fenced terminal commit: the reason of a cancel that arrived (the lease and the
    /// journal position are still this driver's), or None if another worker took the run.
    async fn cancel_arrived(&self) -> Result<Option<(String, Option<String>)>, EngineError> {
        let Some(row) = self.engine.store.get_run(self.run_id).await? else {
            return Ok(None);
        };
        let ours = row.cancel_pending
            && row.last_seq == self.seq
            && row.fencing_token == self.lease.token
            && row.lease_owner.as_deref() == Some(self.lease.owner.as_str());
        Ok(ours.then(|| (row.cancel_reason.unwrap_or_else(|| "cancelled".into()), row.cancel_by)))
    }

    /// The stored cancel request: its reason and who asked.
    async fn cancel_reason(&self) -> Result<(String, Option<String>), EngineError> {
        let row = self.engine.store.get_run(self.run_id).await?;
        Ok(match row {
            Some(r) => (r.cancel_reason.unwrap_or_else(|| "cancelled".into()), r.cancel_by),
            None => ("cancelled".into(), None),
        })
    }

    /// One transaction: journal records + compare-and-set of the run + projections.
    async fn commit(
        &mut self,
        t: Transition,
        consumed: Vec<i64>,
        consumed_cancel: bool,
        now: Timestamp,
    ) -> Result<Action, EngineError> {
        let Transition { state, records, action } = t;
        let mut context = self.context.clone();
        let changed = context.apply(&records);
        let display = self.def.display_status(&state);
        let live = matches!(state, RunState::Running { .. } | RunState::Compensating { .. });
        let cp = Checkpoint {
            run_id: self.run_id,
            lease: self.lease.clone(),
            expected_seq: self.seq,
            expected_status: self.state.status(),
            current_step: current_step(&self.def, &state),
            context: changed.then(|| context.clone()),
            wake_at: state.wake_at(now),
            wake_on_signal: state.accepts_signals(),
            release: !live,
            consumed_signals: consumed,
            consumed_cancel,
            projection: projection::project(&records, &display, &self.correlation_id),
            display_status: display,
            state: state.clone(),
            records: records.clone(),
            now,
        };
        let out = self.engine.store.checkpoint(cp).await?;
        self.seq = out.last_seq;
        self.state = state;
        self.context = context;
        self.signals_pending = out.signals_pending;
        self.cancel_pending = out.cancel_pending;
        for r in &records {
            tracing::debug!(seq = self.seq, record = r.kind(), "committed");
            if crash::enabled() {
                crash::point(&format!("after:{}", r.kind()));
            }
        }
        if !live && !self.state.is_terminal() {
            // A run went to sleep: let the worker loop recompute its next wake-up.
            self.engine.store.wakeup().wake();
        }
        let first_seq = self.seq - records.len() as i64 + 1;
        let terminal = Some(&self.state).filter(|s| s.is_terminal());
        self.engine.committed(self.run_id, first_seq, &records, now, terminal);
        if self.state.is_terminal() {
            self.engine.announce_finished(self.run_id);
        }
        Ok(action)
    }

    /// Runs one attempt of a step or compensation; returns its result as an event, or None if
    /// shutdown's grace ran out first (the lease is then released for another worker).
    async fn execute(&mut self, action: &Action) -> Result<Option<Event>, EngineError> {
        let (phase, index, attempt, key, undo) = match action {
            Action::Execute {
                phase,
                step,
                attempt,
                idempotency_key,
            } => (*phase, *step, *attempt, idempotency_key.clone(), false),
            Action::Compensate {
                step,
                attempt,
                idempotency_key,
            } => (Phase::Forward, *step, *attempt, idempotency_key.clone(), true),
            Action::Continue | Action::Sleep | Action::Finish => return Ok(None),
        };
        let def = self.def.clone();
        let step = def
            .step(phase, index)
            .ok_or(super::machine::TransitionError::NoSuchStep { phase, step: index })?;
        let action_name = match (&step.undo, undo) {
            (_, false) => step.action.as_str(),
            (Undo::Action(a), true) => a.as_str(),
            (Undo::Nothing | Undo::Irreversible, true) => {
                return Ok(Some(Event::StepFailed {
                    error: StepError::permanent(
                        "NO_COMPENSATION",
                        format!("step {} has no compensation action", step.name),
                    ),
                }))
            }
        };
        let span = tracing::info_span!(
            "step",
            otel.name = %format!("{} {}", if undo { "compensate" } else { phase.as_str() }, step.name),
            otel.status_code = tracing::field::Empty,
            run_id = %self.run_id,
            definition = %def.name,
            step = %step.name,
            phase = phase.as_str(),
            attempt,
            undo,
            outcome = tracing::field::Empty,
            error.code = tracing::field::Empty,
        );
        let Some(handler) = self.engine.registry.get(action_name) else {
            return Ok(Some(Event::StepFailed {
                error: StepError::permanent(
                    "UNKNOWN_ACTION",
                    format!("no action named {action_name:?} in this build"),
                ),
            }));
        };
        let progress_table = if undo {
            &self.context.undo_progress
        } else {
            &self.context.progress
        };
        let (tx, mut rx) = mpsc::channel::<ProgressRequest>(1);
        let input = StepInput {
            run_id: self.run_id,
            step: step.name.clone(),
            phase,
            undo,
            attempt,
            idempotency_key: key,
            input: self.input.clone(),
            outputs: Arc::new(self.context.outputs.clone()),
            progress: progress_table.get(&step.name).cloned(),
            forward_progress: match undo {
                true => self.context.progress.get(&step.name).cloned(),
                false => None,
            },
            checkpoint: Progress::new(tx),
        };
        let timeout = step.timeout;
        let started = std::time::Instant::now();
        let fut = tokio::time::timeout(timeout, handler.run(input)).instrument(span.clone());
        tokio::pin!(fut);
        let lost = self.lost.clone();
        let shutdown = self.shutdown.clone();
        let grace = self.engine.config.shutdown_grace;
        let deadline = async move {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        tokio::pin!(deadline);
        let result = loop {
            tokio::select! {
                r = &mut fut => break r,
                Some((data, reply)) = rx.recv() => {
                    let r = match self.apply(Event::Progress { data }, vec![], false).await {
                        Ok(_) => Ok(()),
                        Err(EngineError::Store(StoreError::Fenced { .. })) => Err(ActionError::Fenced),
                        Err(e) => Err(ActionError::retryable("CHECKPOINT_FAILED", e.to_string())),
                    };
                    let _ = reply.send(r);
                }
                _ = lost.cancelled() => return Err(StoreError::Fenced { run: self.run_id }.into()),
                _ = &mut deadline => {
                    tracing::warn!(parent: &span, "shutdown grace over; releasing the run mid-step");
                    self.engine.store.release(self.run_id, &self.lease).await?;
                    return Ok(None);
                }
            }
        };
        let took = started.elapsed();
        let elapsed_ms = took.as_millis() as u64;
        let event = match result {
            Ok(Ok(output)) => {
                tracing::info!(parent: &span, elapsed_ms, "step succeeded");
                Event::StepSucceeded { output }
            }
            Ok(Err(ActionError::Step(error))) => {
                tracing::warn!(parent: &span, elapsed_ms, code = %error.code, retryable = error.is_retryable(), error = %error.message, "step failed");
                Event::StepFailed { error }
            }
            Ok(Err(ActionError::Fenced)) => return Err(StoreError::Fenced { run: self.run_id }.into()),
            Err(_) => {
                tracing::warn!(parent: &span, elapsed_ms, "step timed out");
                Event::StepFailed {
                    error: StepError::retryable("TIMEOUT", format!("step {} timed out after {timeout:?}", step.name)),
                }
            }
        };
        let outcome = match &event {
            Event::StepSucceeded { .. } => "succeeded",
            Event::StepFailed { error } if error.code == "TIMEOUT" => "timeout",
            Event::StepFailed { error } if error.is_retryable() => "retryable_error",
            _ => "permanent_error",
        };
        span.record("outcome", outcome);
        if let Event::StepFailed { error } = &event {
            span.record("error.code", error.code.as_str());
            span.record("otel.status_code", "ERROR");
        }
        let phase = if undo { "compensate" } else { phase.as_str() };
        metrics::step_attempt(&def.name, &step.name, phase, outcome, took);
        Ok(Some(event))
    }
}

pub(crate) fn current_step(def: &Definition, s: &RunState) -> Option<String> {
    let name = |phase: Phase, i: usize| def.step(phase, i).map(|s| s.name.clone());
    match s {
        RunState::Running { phase, step, .. } | RunState::Backoff { phase, step, .. } => name(*phase, *step),
        RunState::Compensating { step, .. } | RunState::CompensationBackoff { step, .. } => name(Phase::Forward, *step),
        RunState::Pending
        | RunState::Holding { .. }
        | RunState::Completed
        | RunState::Failed { .. }
        | RunState::Cancelled { .. }
        | RunState::NeedsOperator { .. }
        | RunState::Resolved { .. } => None,
    }
}
