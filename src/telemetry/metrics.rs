//! Prometheus metrics: every name Tern exports, its help text and the one function that records
//! it. Recording is a no-op until a recorder is installed ([`install`], by `--metrics-listen`).
//!
//! Conventions: the `tern_` prefix, `_total` for counters, `_seconds` for durations; labels have
//! bounded values (method, definition, step, phase, outcome, command, code; never a run or VM id).

use std::time::Duration;

use ::metrics::{counter, describe_counter, describe_gauge, describe_histogram, histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const RPC_REQUESTS: &str = "tern_rpc_requests_total";
pub const RPC_DURATION: &str = "tern_rpc_duration_seconds";
pub const STEP_ATTEMPTS: &str = "tern_step_attempts_total";
pub const STEP_DURATION: &str = "tern_step_duration_seconds";
pub const LEASE_TAKEOVERS: &str = "tern_lease_takeovers_total";
pub const FENCED_WRITES: &str = "tern_fenced_writes_total";
pub const HEARTBEAT_FAILURES: &str = "tern_heartbeat_failures_total";
pub const TIMER_LATENESS: &str = "tern_timer_lateness_seconds";
pub const COMMIT_BATCH: &str = "tern_store_commit_batch_size";
pub const COMMIT_DURATION: &str = "tern_store_commit_duration_seconds";
pub const CLOUD_REQUESTS: &str = "tern_cloud_requests_total";
pub const CLOUD_DURATION: &str = "tern_cloud_request_duration_seconds";
pub const RUNS: &str = "tern_runs";
pub const RUNS_DUE: &str = "tern_runs_due";
pub const RUNS_DUE_OLDEST: &str = "tern_runs_due_oldest_age_seconds";
pub const NEEDS_OPERATOR: &str = "tern_failover_jobs_needs_operator";
pub const STORE_UP: &str = "tern_store_up";

/// Buckets of durations, 1 ms to 10 min (a step may wait on a CloudStack job for minutes).
const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// Buckets of a group commit's size (at most `MAX_BATCH`, 512).
const BATCH: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Installs the process's Prometheus recorder and describes every metric. Once per process;
/// the handle renders the text format.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(COMMIT_BATCH.into()), BATCH))
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| format!("installing the metrics recorder: {e}"))?;
    describe();
    Ok(handle)
}

fn describe() {
    describe_counter!(RPC_REQUESTS, "gRPC calls answered, by method and status code.");
    describe_histogram!(
        RPC_DURATION,
        Unit::Seconds,
        "Time to answer a gRPC call (a stream: its life), by method and code."
    );
    describe_counter!(
        STEP_ATTEMPTS,
        "Step attempts ended, by definition, step, phase (forward, compensate) and outcome."
    );
    describe_histogram!(
        STEP_DURATION,
        Unit::Seconds,
        "Duration of step attempts, by definition, step, phase and outcome."
    );
    describe_counter!(
        LEASE_TAKEOVERS,
        "Runs claimed with an attempt in flight: their worker died or stopped mid-step."
    );
    describe_counter!(
        FENCED_WRITES,
        "Writes refused because another worker holds the run's lease now."
    );
    describe_counter!(
        HEARTBEAT_FAILURES,
        "Lease renewals that failed (the database did not answer); each is retried."
    );
    describe_histogram!(
        TIMER_LATENESS,
        Unit::Seconds,
        "How late a timer fired: when it woke the run minus the time asked for, by kind (hold, backoff)."
    );
    describe_histogram!(
        COMMIT_BATCH,
        Unit::Count,
        "Jobs committed together in one group commit."
    );
    describe_histogram!(COMMIT_DURATION, Unit::Seconds, "Duration of one group commit.");
    describe_counter!(
        CLOUD_REQUESTS,
        "Requests to the cloud, by provider, command and outcome (ok or the error's kind)."
    );
    describe_histogram!(
        CLOUD_DURATION,
        Unit::Seconds,
        "Duration of cloud requests, by provider and command."
    );
    describe_gauge!(RUNS, "Runs in the store, by definition and status (read at scrape).");
    describe_gauge!(
        RUNS_DUE,
        "Runs due to run and not claimed by any worker: the queue (read at scrape)."
    );
    describe_gauge!(
        RUNS_DUE_OLDEST,
        Unit::Seconds,
        "How long the oldest unclaimed due run has waited (read at scrape)."
    );
    describe_gauge!(
        NEEDS_OPERATOR,
        "Failover jobs in needs_operator: each needs a person (read at scrape)."
    );
    describe_gauge!(STORE_UP, "1 when the last scrape could read the store, else 0.");
}

/// `s`, kept for the process's life: a label value is one of few (definition, step and command
/// names), so recording a metric borrows it rather than allocating a copy each time.
fn label(s: &str) -> &'static str {
    static KNOWN: std::sync::Mutex<std::collections::BTreeSet<&'static str>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    match known.get(s) {
        Some(kept) => kept,
        None => {
            let kept: &'static str = s.to_string().leak();
            known.insert(kept);
            kept
        }
    }
}

/// A gRPC call answered.
pub fn rpc(method: &'static str, code: &'static str, took: Duration) {
    counter!(RPC_REQUESTS, "method" => method, "code" => code).increment(1);
    histogram!(RPC_DURATION, "method" => method, "code" => code).record(took.as_secs_f64());
}

/// A step attempt ended (`phase`: forward or compensate; `outcome`: completed, retry, failed, …).
pub fn step_attempt(definition: &str, step: &str, phase: &str, outcome: &str, took: Duration) {
    let (definition, step, phase, outcome) = (label(definition), label(step), label(phase), label(outcome));
    counter!(STEP_ATTEMPTS, "definition" => definition, "step" => step, "phase" => phase, "outcome" => outcome)
        .increment(1);
    histogram!(STEP_DURATION, "definition" => definition, "step" => step, "phase" => phase, "outcome" => outcome)
        .record(took.as_secs_f64());
}

/// A run claimed with an attempt in flight.
pub fn takeover(definition: &str) {
    counter!(LEASE_TAKEOVERS, "definition" => label(definition)).increment(1);
}

/// A write refused by the fencing token.
pub fn fenced_write() {
    counter!(FENCED_WRITES).increment(1);
}

/// A lease renewal that failed.
pub fn heartbeat_failure() {
    counter!(HEARTBEAT_FAILURES).increment(1);
}

/// A timer of `kind` fired `late` after the time it was set for.
pub fn timer_fired(kind: &'static str, late: Duration) {
    histogram!(TIMER_LATENESS, "kind" => kind).record(late.as_secs_f64());
}

/// A group commit of `size` jobs on `backend` that took `took`.
pub fn group_commit(backend: &'static str, size: usize, took: Duration) {
    histogram!(COMMIT_BATCH, "backend" => backend).record(size as f64);
    histogram!(COMMIT_DURATION, "backend" => backend).record(took.as_secs_f64());
}

/// A cloud request answered (or not): `outcome` is `ok` or the error's kind.
pub fn cloud_request(provider: &'static str, command: &str, outcome: &'static str, took: Duration) {
    let command = label(command);
    counter!(CLOUD_REQUESTS, "provider" => provider, "command" => command, "outcome" => outcome).increment(1);
    histogram!(CLOUD_DURATION, "provider" => provider, "command" => command).record(took.as_secs_f64());
}
