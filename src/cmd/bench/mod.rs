//! `tern bench`: the reference workload, measured in-process on a fresh database.
//!
//! The workload is `noop-6`, six sequential no-op steps, each checkpointed like any real step:
//! "started" and "succeeded" both durably committed. Two figures are taken per backend:
//! * **throughput**: N workflows in a closed loop with K in flight (K clients, each submits
//!   one, waits for its result, submits the next): workflows/s and steps/s;
//! * **latency**: M workflows one at a time, submit to completion: p50 and p99.
//!
//! Both run in-process (the engine's own submit) and end to end through the gRPC API (a client
//! on a loopback connection calls `SubmitWorkflow`, then `WatchWorkflow` until the terminal
//! event; the server and the client share this process and its cores).
//!
//! Each line also shows the peak RSS, the checkpoints actually stored (journal rows counted in
//! the database, so durability cannot be faked), and the durability settings the database
//! reports.

mod closed_loop;
mod list;
mod measure;
mod recovery;
mod scale_out;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use tern::api::pb;
use tern::api::pb::failover_service_client::FailoverServiceClient;
use tern::api::pb::workflow_service_client::WorkflowServiceClient;
use tern::domain::RunId;
use tern::engine::{worker, Engine, EngineConfig, EngineError, SubmitRequest};
use tern::store::{self, Store};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// sqlite, postgres or both.
    #[arg(long, default_value = "both")]
    pub backend: String,
    /// PostgreSQL for the postgres scenarios (a throwaway schema is created and dropped).
    #[arg(
        long,
        env = "TERN_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    pub postgres_url: String,
    /// Workflows in the throughput scenario.
    #[arg(long, default_value_t = 1000)]
    pub runs: usize,
    /// Clients in the closed loop (workflows in flight).
    #[arg(long, default_value_t = 50)]
    pub in_flight: usize,
    /// Workflows in the latency scenario, one at a time.
    #[arg(long, default_value_t = 100)]
    pub latency_runs: usize,
    /// Runs the worker drives at once (each scale-out server: at least `--in-flight`).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Runs in flight when the recovery scenario SIGKILLs a worker process (0 skips it).
    #[arg(long, default_value_t = 1000)]
    pub recovery_runs: usize,
    /// Lease TTL in the recovery scenario: a killed worker's runs move after it.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub recovery_lease_ttl: Duration,
    /// Runs held at once on their timers in the held scenario (0 skips it; the target is
    /// measured with 100000).
    #[arg(long, default_value_t = 0)]
    pub held_runs: usize,
    /// Failover jobs seeded for the ListFailovers scenario (0 skips it; the target is measured
    /// with 1000000).
    #[arg(long, default_value_t = 0)]
    pub list_runs: usize,
    /// Workflows per phase of the scale-out scenario (PostgreSQL only; 0 skips it): `tern server`
    /// processes on one database, one server then `--servers`, then `--servers` with one of
    /// them SIGKILLed under load.
    #[arg(long, default_value_t = 2000)]
    pub scale_out_runs: usize,
    /// `tern server` processes in the scale-out scenario.
    #[arg(long, default_value_t = 3)]
    pub servers: usize,
    /// Rounds of the scale-out comparison: each runs one server, then `--servers`, back to back,
    /// so the two meet the same state of a shared machine; with more than one, a last line gives
    /// each round's ratio and their median.
    #[arg(long, default_value_t = 1)]
    pub scale_out_rounds: usize,
    /// How long each held run waits on its timer: long enough that all are held at once.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub held_for: Duration,
    /// Record Prometheus metrics as a server with `--metrics-listen` does (to measure their
    /// cost; traces are measured by setting `OTEL_EXPORTER_OTLP_ENDPOINT`).
    #[arg(long)]
    pub metrics: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("{0}")]
    Setup(String),
    #[error("gRPC: {0}")]
    Grpc(Box<tonic::Status>),
}

impl From<tonic::Status> for BenchError {
    fn from(s: tonic::Status) -> Self {
        BenchError::Grpc(Box::new(s))
    }
}

/// One printed line.
#[derive(Debug, Clone)]
pub struct Figures {
    pub scenario: String,
    pub backend: &'static str,
    pub workflows: usize,
    pub per_sec: f64,
    pub steps_per_sec: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub peak_rss_mb: f64,
    pub checkpoints: i64,
    pub durability: String,
    /// CPU time the whole machine spent per workflow (this process, the database, everything):
    /// steadier than a rate on a shared, noisy machine. None where /proc/stat is not readable.
    pub cpu_per_wf: Option<Duration>,
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<22} {:<8} {:>6} wf  {:>8.1} wf/s  {:>9.1} steps/s  p50 {:>7.2} ms  p99 {:>7.2} ms  cpu {} ms/wf  rss {:>6.1} MB  checkpoints {:>7}  [{}]",
            self.scenario,
            self.backend,
            self.workflows,
            self.per_sec,
            self.steps_per_sec,
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.cpu_per_wf
                .map_or("-".to_string(), |c| format!("{:.2}", c.as_secs_f64() * 1e3)),
            self.peak_rss_mb,
            self.checkpoints,
            self.durability
        )
    }
}

use closed_loop::*;
use list::*;
use measure::*;
use recovery::*;
use scale_out::*;

async fn backend_store(
    backend: &str,
    args: &BenchArgs,
    dir: &std::path::Path,
) -> Result<(Arc<dyn Store>, Option<String>, String), BenchError> {
    match backend {
        "sqlite" => {
            let url = format!(
                "sqlite://{}",
                dir.join(format!("bench-{}.db", uuid::Uuid::new_v4().simple()))
                    .display()
            );
            Ok((store::open(&url).await?, None, url))
        }
        "postgres" => {
            let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
            let store = store::postgres::PgStore::connect(&args.postgres_url, Some(&schema)).await?;
            let sep = if args.postgres_url.contains('?') { '&' } else { '?' };
            let url = format!("{}{sep}tern_schema={schema}", args.postgres_url);
            Ok((Arc::new(store), Some(schema), url))
        }
        other => Err(BenchError::Setup(format!(
            "unknown backend {other:?} (sqlite, postgres, both)"
        ))),
    }
}

/// Drops a scenario's PostgreSQL schema (None: a SQLite file in the temporary directory).
async fn drop_schema(args: &BenchArgs, schema: Option<impl AsRef<str>>) {
    let Some(schema) = schema else { return };
    let schema = schema.as_ref();
    if let Ok(pool) = sqlx::PgPool::connect(&args.postgres_url).await {
        let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .execute(&pool)
            .await;
    }
}

/// Runs every scenario and prints a line for each.
pub async fn run(args: &BenchArgs) -> Result<Vec<Figures>, BenchError> {
    let backends: Vec<&str> = match args.backend.as_str() {
        "both" => vec!["sqlite", "postgres"],
        b => vec![b],
    };
    let dir = tempfile::tempdir().map_err(|e| BenchError::Setup(format!("temp dir: {e}")))?;
    println!(
        "tern bench: noop-6 (6 checkpointed steps), {} workflows with {} in flight, {} one at a time; {} cores",
        args.runs,
        args.in_flight,
        args.latency_runs,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    let metrics = match args.metrics {
        true => Some(tern::telemetry::metrics::install().map_err(BenchError::Setup)?),
        false => None,
    };
    println!(
        "metrics {}, traces {}",
        if metrics.is_some() { "recorded" } else { "off" },
        if tern::telemetry::traces::exporting() {
            "exported"
        } else {
            "off"
        }
    );
    let mut out = Vec::new();
    for b in backends {
        for (name, clients, total, grpc) in [
            ("throughput in-process", args.in_flight, args.runs, false),
            ("latency in-process", 1, args.latency_runs, false),
            ("throughput gRPC", args.in_flight, args.runs, true),
            ("latency gRPC", 1, args.latency_runs, true),
        ] {
            let (store, schema, _) = backend_store(b, args, dir.path()).await?;
            let f = scenario(name, store, args, clients, total, grpc).await;
            drop_schema(args, schema).await;
            let f = f?;
            println!("{f}");
            out.push(f);
        }
        if args.list_runs > 0 {
            for line in list_failovers(b, args, dir.path()).await? {
                println!("{line}");
            }
        }
        if args.held_runs > 0 {
            let (store, schema, _) = backend_store(b, args, dir.path()).await?;
            let line = held(store, args).await;
            drop_schema(args, schema).await;
            println!("{}", line?);
        }
        if args.scale_out_runs > 0 && b == "postgres" {
            for line in scale_out(args).await? {
                println!("{line}");
            }
        }
        if args.recovery_runs > 0 {
            let (store, schema, url) = backend_store(b, args, dir.path()).await?;
            let line = recovery(&url, store, args).await;
            drop_schema(args, schema).await;
            println!("{}", line?);
        }
    }
    if let Some(handle) = metrics {
        let series = handle.render().lines().filter(|l| l.starts_with("tern_")).count();
        println!("metrics: {series} series recorded");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_steady_rate_leaves_out_the_first_fifth_of_a_phase() {
        // 100 workflows: the first 20 slow (one every 100 ms), then one every 10 ms.
        let mut finished: Vec<Duration> = (0..20)
            .map(|i| Duration::from_millis(100 * (i + 1)))
            .chain((1..=80).map(|i| Duration::from_millis(2_000 + 10 * i)))
            .rev()
            .collect();
        let rate = steady_rate(&mut finished).expect("enough workflows");
        // From the 21st (2.01 s) to the last (2.8 s): 79 workflows in 0.79 s.
        assert!((rate - 100.0).abs() < 1e-6, "{rate}");
        assert_eq!(steady_rate(&mut [Duration::from_secs(1); 5]), None);
    }

    #[test]
    fn rounds_compare_each_k_servers_phase_with_the_one_server_phase_before_it() {
        let steady = [100.0, 110.0, 100.0, 90.0, 100.0, 100.0];
        let whole = [100.0, 90.0, 100.0, 80.0, 100.0, 95.0];
        let rates: Vec<(f64, f64)> = whole.into_iter().zip(steady).collect();
        let line = rounds_line(&rates, 3).expect("three rounds");
        assert!(line.contains("steady state median +0.0% (+10%, -10%, +0%)"), "{line}");
        assert!(line.contains("whole phases median -10.0% (-10%, -20%, -5%)"), "{line}");
        assert_eq!(rounds_line(&[(100.0, 100.0), (110.0, 110.0)], 3), None);
        assert_eq!(rounds_line(&[], 3), None);
        assert_eq!(rounds_line(&rates[..4], 1), None);
    }
}
