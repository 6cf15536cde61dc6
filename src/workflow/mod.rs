//! Workflow definitions: the TOML files in `workflows/` that the engine runs.
//!
//! Definitions are data. They are embedded in the binary at build time (see build.rs),
//! a directory can override them at run time, and every run is pinned to the exact
//! text (and its SHA-256) it started with, so editing a file never changes a run in flight.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::domain::failover::{FailoverInput, JobSubject};
use crate::domain::limits::Problems;
use crate::domain::parse_duration;
use crate::domain::run::{Phase, RunState};

/// The definitions compiled into the binary: (file name, contents).
pub const EMBEDDED: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/embedded_workflows.rs"));

/// What undoes a forward step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Undo {
    /// Run this action (with the step's recorded output) to undo the step.
    Action(String),
    /// The step changes nothing that needs undoing (e.g. validation).
    Nothing,
    /// The step cannot be undone: a rollback that reaches it stops and needs an operator.
    Irreversible,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_delay: Duration,
    pub multiplier: f64,
    pub max_delay: Duration,
    /// Fraction in [0, 1]: each delay is scaled by a factor in [1 - jitter, 1 + jitter].
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_delay: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(60),
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// Delay before attempt `failed_attempt + 1`. `unit` is a number in [-1, 1] that the
    /// caller derives deterministically (the machine hashes run, step and attempt).
    pub fn delay(&self, failed_attempt: u32, unit: f64) -> Duration {
        let exp = failed_attempt.saturating_sub(1).min(64) as i32;
        let base = self.initial_delay.as_secs_f64() * self.multiplier.powi(exp);
        let capped = base.min(self.max_delay.as_secs_f64());
        let factor = 1.0 + self.jitter * unit.clamp(-1.0, 1.0);
        Duration::from_secs_f64((capped * factor).max(0.0))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepDef {
    pub name: String,
    pub action: String,
    pub undo: Undo,
    pub retry: RetryPolicy,
    pub timeout: Duration,
    /// Skip the step when this input field is `true`.
    pub skip_if: Option<String>,
    /// The user-visible status while this step runs (e.g. `snapshotting`).
    pub status: Option<String>,
}

/// Wait until a timer or a signal, whichever comes first.
#[derive(Debug, Clone, PartialEq)]
pub struct HoldDef {
    /// The signal that ends the hold (e.g. `end-test`).
    pub signal: String,
    /// Input field holding the hold's duration ("30m"); falls back to `default_duration`.
    pub duration_input: Option<String>,
    pub default_duration: Option<Duration>,
    /// Input field that must be `true` for the timer to be set (e.g. `auto_cleanup`).
    /// Without it the timer is set whenever a duration is known.
    pub enabled_input: Option<String>,
    pub status: Option<String>,
}

/// The type of a definition's input (`input = "failover"` in its file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    /// Any JSON object.
    Any,
    /// A [`FailoverInput`].
    Failover,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    pub name: String,
    pub description: String,
    /// `job_type` projected into `failover_jobs` (e.g. "test", "live"); defaults to the name.
    pub job_type: String,
    /// The type its runs' input must have (checked at submit, whoever submits).
    pub input: InputKind,
    /// Input field naming a resource (e.g. `vm_id`) that only one unfinished run of any
    /// exclusive definition may hold at a time; the database enforces it at submit.
    pub exclusive_on: Option<String>,
    pub steps: Vec<StepDef>,
    pub hold: Option<HoldDef>,
    pub teardown: Vec<StepDef>,
    /// The exact text this definition was parsed from; stored with every run.
    pub source: String,
    /// Lower-case hex SHA-256 of `source`.
    pub hash: String,
}

impl Definition {
    pub fn steps(&self, phase: Phase) -> &[StepDef] {
        match phase {
            Phase::Forward => &self.steps,
            Phase::Teardown => &self.teardown,
        }
    }

    pub fn step(&self, phase: Phase, index: usize) -> Option<&StepDef> {
        self.steps(phase).get(index)
    }

    /// The user-visible status of the run (the seeds' vocabulary where the definition gives it).
    pub fn display_status(&self, state: &RunState) -> String {
        let step_status = |phase: Phase, step: usize| {
            self.step(phase, step)
                .and_then(|s| s.status.clone())
                .unwrap_or_else(|| match phase {
                    Phase::Forward => "executing".to_string(),
                    Phase::Teardown => "cleanup".to_string(),
                })
        };
        match state {
            RunState::Pending => "pending".into(),
            RunState::Running { phase, step, .. } | RunState::Backoff { phase, step, .. } => step_status(*phase, *step),
            RunState::Holding { .. } => self
                .hold
                .as_ref()
                .and_then(|h| h.status.clone())
                .unwrap_or_else(|| "holding".into()),
            RunState::Compensating { .. } | RunState::CompensationBackoff { .. } => "reverting".into(),
            RunState::Completed => "completed".into(),
            RunState::Failed { .. } => "failed".into(),
            RunState::Cancelled { .. } => "cancelled".into(),
            RunState::NeedsOperator { .. } => "needs_operator".into(),
            RunState::Resolved { .. } => "resolved".into(),
        }
    }

    /// Whether the run's input asks for this step to be skipped.
    pub fn skipped(&self, phase: Phase, index: usize, input: &Value) -> Option<String> {
        let step = self.step(phase, index)?;
        let field = step.skip_if.as_ref()?;
        match input.get(field) {
            Some(Value::Bool(true)) => Some(format!("input field {field} is true")),
            _ => None,
        }
    }

    /// The hold timer's deadline for this input, or None if the hold waits for the signal only.
    pub fn hold_duration(&self, input: &Value) -> Result<Option<Duration>, String> {
        let Some(hold) = &self.hold else {
            return Ok(None);
        };
        if let Some(flag) = &hold.enabled_input {
            if input.get(flag) != Some(&Value::Bool(true)) {
                return Ok(None);
            }
        }
        let from_input = match hold.duration_input.as_ref().and_then(|f| input.get(f)) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(parse_duration(s)?),
            Some(Value::Number(n)) => {
                Some(Duration::from_millis(n.as_u64().ok_or_else(|| {
                    format!("hold duration {n} must be a whole number of milliseconds")
                })?))
            }
            Some(other) => return Err(format!("hold duration must be a string like \"30m\", got {other}")),
        };
        Ok(from_input.or(hold.default_duration))
    }

    /// Checks a run's input against its type and what this definition reads from it; each
    /// problem names its field within the input.
    pub fn validate_input(&self, input: &Value) -> Result<(), Problems> {
        let mut p = Problems::new();
        if !input.is_object() {
            p.push("input", "must be a JSON object");
            return Err(p);
        }
        p.json_strings("input", input);
        if !p.is_empty() {
            return Err(p);
        }
        if self.input == InputKind::Failover {
            FailoverInput::check_new(input)?;
        }
        if let Err(why) = self.hold_duration(input) {
            let field = self.hold.as_ref().and_then(|h| h.duration_input.clone());
            p.push(field.unwrap_or_else(|| "input".into()), why);
            return Err(p);
        }
        Ok(())
    }

    /// What the job read model records of a run's subject (the failover's VM). Any other
    /// input is read as a failover's where it has that shape (the crash tests' definitions
    /// name a `vm_id`), and as no subject where it has not.
    pub fn job_subject(&self, input: &Value) -> JobSubject {
        FailoverInput::from_value(input)
            .map(|i| i.subject())
            .unwrap_or_default()
    }
}

/// A loading problem, naming the file, the step (when there is one) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}: {problem}", step.as_ref().map(|s| format!(", step {s:?}")).unwrap_or_default())]
pub struct DefinitionError {
    pub file: String,
    pub step: Option<String>,
    pub problem: String,
}

// ---- the TOML shape ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefinition {
    name: String,
    #[serde(default)]
    description: String,
    job_type: Option<String>,
    input: Option<InputKind>,
    exclusive_on: Option<String>,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default, rename = "step")]
    steps: Vec<RawStep>,
    hold: Option<RawHold>,
    #[serde(default)]
    teardown: Vec<RawStep>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    timeout: Option<String>,
    retry: Option<RawRetry>,
}

#[derive(Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<u32>,
    initial_delay: Option<String>,
    multiplier: Option<f64>,
    max_delay: Option<String>,
    jitter: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: String,
    action: String,
    /// An action name, or "none" when there is nothing to undo.
    compensate: Option<String>,
    #[serde(default)]
    irreversible: bool,
    timeout: Option<String>,
    retry: Option<RawRetry>,
    skip_if: Option<String>,
    status: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHold {
    signal: String,
    duration_input: Option<String>,
    default_duration: Option<String>,
    enabled_input: Option<String>,
    status: Option<String>,
}

/// Parses and validates one definition. `known_action` says whether an action name exists.
pub fn parse(file: &str, source: &str, known_action: &dyn Fn(&str) -> bool) -> Result<Definition, DefinitionError> {
    let err = |step: Option<&str>, problem: String| DefinitionError {
        file: file.to_string(),
        step: step.map(str::to_string),
        problem,
    };
    let raw: RawDefinition = toml::from_str(source).map_err(|e| err(None, format!("invalid TOML: {}", e.message())))?;
    if raw.name.trim().is_empty() {
        return Err(err(None, "name is empty".into()));
    }
    let dur = |step: Option<&str>, field: &str, v: &str| -> Result<Duration, DefinitionError> {
        parse_duration(v).map_err(|e| err(step, format!("bad duration in {field}: {e}")))
    };
    let default_timeout = match &raw.defaults.timeout {
        Some(t) => dur(None, "defaults.timeout", t)?,
        None => Duration::from_secs(300),
    };
    let default_retry = resolve_retry(&RetryPolicy::default(), raw.defaults.retry.as_ref(), &|f, v| {
        dur(None, &format!("defaults.retry.{f}"), v)
    })
    .map_err(|p| match p {
        RetryProblem::Duration(e) => e,
        RetryProblem::Invalid(m) => err(None, format!("defaults.retry: {m}")),
    })?;

    let mut seen = HashSet::new();
    let mut build = |raw_steps: Vec<RawStep>, phase: Phase| -> Result<Vec<StepDef>, DefinitionError> {
        let mut out = Vec::with_capacity(raw_steps.len());
        for s in raw_steps {
            let name = s.name.clone();
            let at = Some(name.as_str());
            if name.trim().is_empty() {
                return Err(err(None, format!("a {} step has an empty name", phase.as_str())));
            }
            if !seen.insert(name.clone()) {
                return Err(err(at, "duplicate step name".into()));
            }
            if !known_action(&s.action) {
                return Err(err(at, format!("unknown action {:?}", s.action)));
            }
            let undo = match (phase, s.compensate.as_deref(), s.irreversible) {
                (_, Some(_), true) => {
                    return Err(err(at, "declares both `compensate` and `irreversible = true`".into()))
                }
                (_, Some("none"), false) => Undo::Nothing,
                (_, Some(a), false) => {
                    if !known_action(a) {
                        return Err(err(at, format!("unknown compensation action {a:?}")));
                    }
                    Undo::Action(a.to_string())
                }
                (_, None, true) => Undo::Irreversible,
                (Phase::Teardown, None, false) => Undo::Nothing,
                (Phase::Forward, None, false) => {
                    return Err(err(
                        at,
                        "missing compensation: set `compensate = \"<action>\"`, `compensate = \"none\"` or `irreversible = true`"
                            .into(),
                    ))
                }
            };
            let timeout = match &s.timeout {
                Some(t) => dur(at, "timeout", t)?,
                None => default_timeout,
            };
            if timeout.is_zero() {
                return Err(err(at, "timeout must be greater than zero".into()));
            }
            let retry = resolve_retry(&default_retry, s.retry.as_ref(), &|f, v| {
                dur(at, &format!("retry.{f}"), v)
            })
            .map_err(|p| match p {
                RetryProblem::Duration(e) => e,
                RetryProblem::Invalid(m) => err(at, format!("retry: {m}")),
            })?;
            out.push(StepDef {
                name,
                action: s.action,
                undo,
                retry,
                timeout,
                skip_if: s.skip_if,
                status: s.status,
            });
        }
        Ok(out)
    };
    let steps = build(raw.steps, Phase::Forward)?;
    let teardown = build(raw.teardown, Phase::Teardown)?;
    if steps.is_empty() {
        return Err(err(None, "a definition needs at least one [[step]]".into()));
    }
    if !teardown.is_empty() && raw.hold.is_none() {
        return Err(err(None, "[[teardown]] steps need a [hold] before them".into()));
    }
    let hold = match raw.hold {
        None => None,
        Some(h) => {
            if h.signal.trim().is_empty() {
                return Err(err(None, "hold.signal is empty".into()));
            }
            let default_duration = match &h.default_duration {
                Some(d) => Some(dur(None, "hold.default_duration", d)?),
                None => None,
            };
            Some(HoldDef {
                signal: h.signal,
                duration_input: h.duration_input,
                default_duration,
                enabled_input: h.enabled_input,
                status: h.status,
            })
        }
    };
    let hash = hex::encode(Sha256::digest(source.as_bytes()));
    Ok(Definition {
        job_type: raw.job_type.unwrap_or_else(|| raw.name.clone()),
        input: raw.input.unwrap_or(InputKind::Any),
        exclusive_on: raw.exclusive_on,
        name: raw.name,
        description: raw.description,
        steps,
        hold,
        teardown,
        source: source.to_string(),
        hash,
    })
}

enum RetryProblem {
    Duration(DefinitionError),
    Invalid(String),
}

fn resolve_retry(
    base: &RetryPolicy,
    raw: Option<&RawRetry>,
    dur: &dyn Fn(&str, &str) -> Result<Duration, DefinitionError>,
) -> Result<RetryPolicy, RetryProblem> {
    let Some(raw) = raw else {
        return Ok(base.clone());
    };
    let mut p = base.clone();
    if let Some(n) = raw.max_attempts {
        p.max_attempts = n;
    }
    if let Some(d) = &raw.initial_delay {
        p.initial_delay = dur("initial_delay", d).map_err(RetryProblem::Duration)?;
    }
    if let Some(m) = raw.multiplier {
        p.multiplier = m;
    }
    if let Some(d) = &raw.max_delay {
        p.max_delay = dur("max_delay", d).map_err(RetryProblem::Duration)?;
    }
    if let Some(j) = raw.jitter {
        p.jitter = j;
    }
    if p.max_attempts == 0 {
        return Err(RetryProblem::Invalid("max_attempts must be at least 1".into()));
    }
    if !(p.multiplier.is_finite() && p.multiplier >= 1.0) {
        return Err(RetryProblem::Invalid(format!(
            "multiplier must be >= 1.0, got {}",
            p.multiplier
        )));
    }
    if !(0.0..=1.0).contains(&p.jitter) {
        return Err(RetryProblem::Invalid(format!(
            "jitter must be between 0 and 1, got {}",
            p.jitter
        )));
    }
    if p.max_delay < p.initial_delay {
        return Err(RetryProblem::Invalid("max_delay is shorter than initial_delay".into()));
    }
    Ok(p)
}

/// The set of definitions a process runs: the embedded ones, overridden by a directory.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    by_name: BTreeMap<String, std::sync::Arc<Definition>>,
}

impl Catalog {
    /// Loads the embedded definitions, then every `*.toml` in `dir` (which replaces an
    /// embedded one of the same name). A file's `name` must match its file stem.
    pub fn load(dir: Option<&Path>, known_action: &dyn Fn(&str) -> bool) -> Result<Catalog, DefinitionError> {
        let mut files: BTreeMap<String, (String, String)> = BTreeMap::new();
        for (file, text) in EMBEDDED {
            files.insert(stem(file), (format!("workflows/{file} (embedded)"), text.to_string()));
        }
        if let Some(dir) = dir {
            let entries = std::fs::read_dir(dir).map_err(|e| DefinitionError {
                file: dir.display().to_string(),
                step: None,
                problem: format!("cannot read the workflows directory: {e}"),
            })?;
            let mut paths: Vec<_> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().and_then(|x| x.to_str()) == Some("toml"))
                .collect();
            paths.sort();
            for p in paths {
                let text = std::fs::read_to_string(&p).map_err(|e| DefinitionError {
                    file: p.display().to_string(),
                    step: None,
                    problem: format!("cannot read: {e}"),
                })?;
                let name = p.file_name().and_then(|f| f.to_str()).unwrap_or_default();
                files.insert(stem(name), (p.display().to_string(), text));
            }
        }
        let mut by_name = BTreeMap::new();
        for (stem, (file, text)) in files {
            let def = parse(&file, &text, known_action)?;
            if def.name != stem {
                return Err(DefinitionError {
                    file,
                    step: None,
                    problem: format!("name {:?} does not match the file name {stem:?}", def.name),
                });
            }
            by_name.insert(def.name.clone(), std::sync::Arc::new(def));
        }
        Ok(Catalog { by_name })
    }

    pub fn get(&self, name: &str) -> Option<std::sync::Arc<Definition>> {
        self.by_name.get(name).cloned()
    }

    pub fn all(&self) -> impl Iterator<Item = &std::sync::Arc<Definition>> {
        self.by_name.values()
    }
}

fn stem(file: &str) -> String {
    file.strip_suffix(".toml").unwrap_or(file).to_string()
}

#[cfg(test)]
mod tests;
