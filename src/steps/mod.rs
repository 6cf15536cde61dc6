//! Step actions: what a step does (and what undoes it), looked up by the name a definition gives.
//!
//! Actions are at-least-once: an attempt may be re-run after a crash, so each action is written
//! to find and adopt what an earlier attempt did (via its stable idempotency key) instead of
//! doing it twice. The contract they implement is the engine's ([`crate::engine::action`]); this
//! module holds the built-in actions (`noop`, the `test.*` actions the crash tests use) and the
//! failover actions.

pub mod failover;
pub mod testing;

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::engine::action::{Action, ActionError, Registry, StepInput};
use crate::store::Store;

/// Names of the actions every build has (checked when loading definitions without a store).
const BUILTIN: &[&str] = &["noop", "test.effect", "test.job", "test.undo"];

/// The built-in names (including the failover actions), for validating definitions offline.
pub fn builtin_names() -> NameSet {
    NameSet(
        BUILTIN
            .iter()
            .copied()
            .chain(failover::action_names())
            .map(str::to_string)
            .collect(),
    )
}

/// The built-in actions wired to a store (the test actions keep their ledger there), and the
/// failover actions unconfigured (they fail saying what to configure) until
/// [`failover::register`] binds them to a cloud.
pub fn builtins(store: Arc<dyn Store>) -> Registry {
    let mut r = Registry::default();
    failover::register_unconfigured(&mut r);
    r.insert("noop", Arc::new(Noop));
    r.insert("test.effect", Arc::new(testing::Effect { store: store.clone() }));
    r.insert("test.job", Arc::new(testing::Job { store: store.clone() }));
    r.insert("test.undo", Arc::new(testing::Undo { store }));
    r
}

/// A set of action names.
pub struct NameSet(Vec<String>);

impl NameSet {
    pub fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|n| n == name)
    }
}

/// Does nothing and succeeds: the benchmark's step.
pub struct Noop;

#[async_trait]
impl Action for Noop {
    async fn run(&self, _step: StepInput) -> Result<Value, ActionError> {
        Ok(Value::Object(Default::default()))
    }
}
