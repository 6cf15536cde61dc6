//! The step contract, owned by the engine: what an action is given for one attempt
//! ([`StepInput`]), how it checkpoints in the middle ([`Progress`]), how it fails
//! ([`ActionError`]), and the [`Registry`] the driver looks actions up in. `steps/` implements it.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::domain::run::Phase;
use crate::domain::{RunId, StepError};
use crate::store::StoreError;

/// Why an action did not succeed. Retry or rollback is decided by the variant's class, never by text.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("{0}")]
    Step(StepError),
    /// The run was taken over by another worker while this action checkpointed progress.
    #[error("lost the run's lease")]
    Fenced,
}

impl ActionError {
    pub fn retryable(code: &str, message: impl Into<String>) -> Self {
        ActionError::Step(StepError::retryable(code, message))
    }

    pub fn permanent(code: &str, message: impl Into<String>) -> Self {
        ActionError::Step(StepError::permanent(code, message))
    }
}

impl From<StoreError> for ActionError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Fenced { .. } => ActionError::Fenced,
            other if other.is_retryable() => ActionError::retryable("STORE_UNAVAILABLE", other.to_string()),
            other => ActionError::permanent("STORE_ERROR", other.to_string()),
        }
    }
}

/// A progress checkpoint request from a running action to its driver.
pub type ProgressRequest = (Value, oneshot::Sender<Result<(), ActionError>>);

/// Lets an action checkpoint progress (e.g. an external job id) durably in the middle of a step.
#[derive(Clone)]
pub struct Progress {
    tx: mpsc::Sender<ProgressRequest>,
}

impl Progress {
    pub fn new(tx: mpsc::Sender<ProgressRequest>) -> Self {
        Progress { tx }
    }

    /// Returns once `data` is committed to the journal; a restarted attempt sees it in `StepInput::progress`.
    pub async fn save(&self, data: Value) -> Result<(), ActionError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send((data, reply)).await.map_err(|_| ActionError::Fenced)?;
        rx.await.map_err(|_| ActionError::Fenced)?
    }
}

/// Everything an action gets for one attempt.
#[derive(Clone)]
pub struct StepInput {
    pub run_id: RunId,
    pub step: String,
    pub phase: Phase,
    /// True when this is the compensation of `step`.
    pub undo: bool,
    pub attempt: u32,
    /// The same for every attempt of this step (or of its compensation) in this run.
    pub idempotency_key: String,
    pub input: Arc<Value>,
    /// Outputs of the steps that succeeded so far, by step name.
    pub outputs: Arc<BTreeMap<String, Value>>,
    /// The last progress this step (or compensation) checkpointed, if any.
    pub progress: Option<Value>,
    /// For a compensation: the progress its forward step checkpointed (e.g. what it had
    /// started to create before it failed), so the undo can find it.
    pub forward_progress: Option<Value>,
    pub checkpoint: Progress,
}

impl StepInput {
    /// The recorded output of a step (what it created), for compensations and later steps.
    pub fn output_of(&self, step: &str) -> Option<&Value> {
        self.outputs.get(step)
    }
}

#[async_trait]
pub trait Action: Send + Sync {
    async fn run(&self, step: StepInput) -> Result<Value, ActionError>;
}

/// Actions by name.
#[derive(Clone, Default)]
pub struct Registry {
    actions: BTreeMap<String, Arc<dyn Action>>,
}

impl Registry {
    pub fn insert(&mut self, name: &str, action: Arc<dyn Action>) {
        self.actions.insert(name.to_string(), action);
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Action>> {
        self.actions.get(name).cloned()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.actions.contains_key(name)
    }
}
