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

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::api::pb;
use crate::api::pb::failover_service_client::FailoverServiceClient;
use crate::api::pb::workflow_service_client::WorkflowServiceClient;
use crate::domain::RunId;
use crate::engine::{worker, Engine, EngineConfig, EngineError, SubmitRequest};
use crate::store::{self, Store};

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

/// CPU time the machine has spent busy so far (every process and the kernel, not idle, not
/// waiting for I/O, not stolen by a hypervisor), from /proc/stat.
pub fn machine_busy() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| ticks.get(i)).sum();
    clock_ticks(busy)
}

/// `ticks` of /proc's clock as a duration (None if the system does not say its rate).
fn clock_ticks(ticks: u64) -> Option<Duration> {
    // SAFETY: sysconf only reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// CPU time (user and system; with `reaped`, that of reaped children too) of the processes `pick`
/// selects by pid and command name, from /proc/<pid>/stat. PostgreSQL's exited backends are
/// counted in the postmaster's children time, so a phase's difference is whole.
fn processes_cpu(reaped: bool, pick: impl Fn(u32, &str) -> bool) -> Duration {
    let mut ticks = 0u64;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ... utime(14) stime(15) cutime(16) cstime(17)
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !pick(pid, &stat[open + 1..close]) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let own: &[usize] = if reaped { &[11, 12, 13, 14] } else { &[11, 12] };
        ticks += own
            .iter()
            .filter_map(|&i| fields.get(i).and_then(|t| t.parse::<u64>().ok()))
            .sum::<u64>();
    }
    clock_ticks(ticks).unwrap_or_default()
}

/// CPU spent so far by the given server processes, by PostgreSQL, and by this process (not
/// counting a server it reaped after a SIGKILL).
fn cpu_split(servers: &[u32]) -> [Duration; 3] {
    let me = std::process::id();
    [
        processes_cpu(false, |pid, _| servers.contains(&pid)),
        processes_cpu(true, |_, comm| comm == "postgres"),
        processes_cpu(false, |pid, _| pid == me),
    ]
}

/// Peak resident set size of this process (VmHWM), in MB.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Completion waiters fed by the engine's finished-run broadcast.
#[derive(Default)]
struct Waiters {
    pending: HashMap<RunId, oneshot::Sender<()>>,
    done: HashSet<RunId>,
}

struct Harness {
    engine: Arc<Engine>,
    waiters: Arc<Mutex<Waiters>>,
    stop: CancellationToken,
    /// Set for the end-to-end scenarios: the API served on a loopback port.
    api: Option<WorkflowServiceClient<tonic::transport::Channel>>,
    channel: Option<tonic::transport::Channel>,
}

impl Harness {
    async fn start(store: Arc<dyn Store>, concurrency: usize) -> Result<Harness, BenchError> {
        let config = EngineConfig {
            worker_id: format!("bench-{}", std::process::id()),
            concurrency,
            lease_ttl: Duration::from_secs(30),
            poll_interval: Duration::from_millis(500),
            shutdown_grace: Duration::from_secs(5),
        };
        let engine = Engine::with_registry(store.clone(), None, crate::steps::builtins(store.clone()), config)?;
        let stop = CancellationToken::new();
        let waiters = Arc::new(Mutex::new(Waiters::default()));
        let mut finished = engine.subscribe_finished();
        let w = waiters.clone();
        tokio::spawn(async move {
            while let Ok(id) = finished.recv().await {
                if let Ok(mut w) = w.lock() {
                    match w.pending.remove(&id) {
                        Some(tx) => {
                            let _ = tx.send(());
                        }
                        None => {
                            w.done.insert(id);
                        }
                    }
                }
            }
        });
        let (e, s) = (engine.clone(), stop.clone());
        tokio::spawn(async move { worker::run_worker(e, s).await });
        Ok(Harness {
            engine,
            waiters,
            stop,
            api: None,
            channel: None,
        })
    }

    /// Serves the API on a loopback port and connects a client to it.
    async fn serve_api(&mut self) -> Result<(), BenchError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| BenchError::Setup(format!("binding a loopback port: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| BenchError::Setup(format!("loopback port: {e}")))?;
        let state = crate::api::ApiState {
            engine: self.engine.clone(),
            failover: None,
        };
        let stop = self.stop.clone();
        tokio::spawn(crate::api::serve(
            listener,
            state,
            async move { stop.cancelled().await },
        ));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| BenchError::Setup(e.to_string()))?
            .connect()
            .await
            .map_err(|e| BenchError::Setup(format!("connecting to the API at {addr}: {e}")))?;
        self.api = Some(WorkflowServiceClient::new(channel.clone()));
        self.channel = Some(channel);
        Ok(())
    }

    /// Submits one noop-6 through the API and watches it to its end.
    async fn one_grpc(
        &self,
        mut client: WorkflowServiceClient<tonic::transport::Channel>,
    ) -> Result<Duration, BenchError> {
        let t = Instant::now();
        match submit_and_watch(&mut client, String::new()).await? {
            Some((_, status)) if status == "completed" => Ok(t.elapsed()),
            Some((run, status)) => Err(BenchError::Setup(format!("run {run} ended {status}"))),
            None => Err(BenchError::Setup("a watch ended without its terminal event".into())),
        }
    }

    /// Submits one noop-6 and waits for it to finish; returns the submit-to-completion time.
    async fn one(&self) -> Result<Duration, BenchError> {
        let t = Instant::now();
        let run = self
            .engine
            .submit(SubmitRequest {
                definition: "noop-6".into(),
                input: json!({}),
                request_id: None,
                correlation_id: None,
            })
            .await?
            .run
            .id;
        let rx = {
            let mut w = self
                .waiters
                .lock()
                .map_err(|_| BenchError::Setup("waiters poisoned".into()))?;
            if w.done.remove(&run) {
                None
            } else {
                let (tx, rx) = oneshot::channel();
                w.pending.insert(run, tx);
                Some(rx)
            }
        };
        if let Some(rx) = rx {
            if tokio::time::timeout(Duration::from_secs(10), rx).await.is_err() {
                // Missed announcement (broadcast lag): the database has the answer.
                self.engine.wait_terminal(run, Duration::from_secs(60)).await?;
            }
        }
        Ok(t.elapsed())
    }
}

async fn scenario(
    name: &str,
    store: Arc<dyn Store>,
    args: &BenchArgs,
    clients: usize,
    total: usize,
    grpc: bool,
) -> Result<Figures, BenchError> {
    let before = store.journal_rows().await?;
    let durability = store.durability().await?;
    let backend = store.backend();
    let mut h = Harness::start(store.clone(), args.concurrency).await?;
    if grpc {
        h.serve_api().await?;
    }
    let h = Arc::new(h);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let busy = machine_busy();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients.max(1) {
        let (h, next) = (h.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < total {
                lat.push(match &h.api {
                    Some(client) => h.one_grpc(client.clone()).await?,
                    None => h.one().await?,
                });
            }
            Ok::<_, BenchError>(lat)
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    for t in tasks {
        latencies.extend(t.await.map_err(|e| BenchError::Setup(e.to_string()))??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_per_wf = busy
        .zip(machine_busy())
        .filter(|_| total > 0)
        .map(|(before, after)| after.saturating_sub(before) / total as u32);
    h.stop.cancel();
    latencies.sort();
    let checkpoints = store.journal_rows().await? - before;
    let per_sec = total as f64 / elapsed;
    Ok(Figures {
        scenario: name.to_string(),
        backend,
        workflows: total,
        per_sec,
        steps_per_sec: per_sec * 6.0,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        peak_rss_mb: peak_rss_mb(),
        checkpoints,
        durability,
        cpu_per_wf,
    })
}

/// Resident set size of this process now (VmRSS), in MB.
fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Held runs: `n` test-failover-shaped runs (`noop-hold`) brought up and left waiting on their
/// hold timers, all at once. Measures the server memory each costs while held (RSS growth over
/// the idle engine) and, once every timer fired and the runs finished, how late each timer
/// fired (the commit of `timer_fired` against the time `timer_set` asked for).
async fn held(store: Arc<dyn Store>, args: &BenchArgs) -> Result<String, BenchError> {
    let n = args.held_runs;
    let h = Arc::new(Harness::start(store.clone(), args.concurrency).await?);
    let count = |status: crate::domain::run::RunStatus| {
        let store = store.clone();
        async move {
            Ok::<_, BenchError>(
                store
                    .count_by_status()
                    .await?
                    .into_iter()
                    .find(|(s, _)| *s == status)
                    .map_or(0, |(_, c)| c as usize),
            )
        }
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let base = rss_mb();
    let hold = format!("{}ms", args.held_for.as_millis());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.in_flight.max(1) {
        let (h, next, hold) = (h.clone(), next.clone(), hold.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < n {
                let req = SubmitRequest {
                    definition: "noop-hold".into(),
                    input: json!({ "hold": hold }),
                    request_id: None,
                    correlation_id: None,
                };
                ids.push(h.engine.submit(req).await?.run.id);
            }
            Ok::<_, BenchError>(ids)
        }));
    }
    let mut runs = Vec::with_capacity(n);
    for t in tasks {
        runs.extend(t.await.map_err(|e| BenchError::Setup(e.to_string()))??);
    }
    use crate::domain::run::RunStatus;
    while count(RunStatus::Holding).await? < n {
        if started.elapsed() >= args.held_for {
            return Err(BenchError::Setup(format!(
                "not all {n} runs were held before the first timers fired: raise --held-for"
            )));
        }
        // Counting scans every run: not so often that it slows what it measures.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let brought_up = started.elapsed();
    let held_rss = rss_mb();
    let per_run = (held_rss - base).max(0.0) * 1024.0 * 1024.0 / n as f64;
    // Wait for every timer, then every teardown.
    while count(RunStatus::Completed).await? < n {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    h.stop.cancel();
    let mut late: Vec<i64> = Vec::with_capacity(n);
    for id in runs {
        let j = store.journal(id, 0, 100).await?;
        let due = j.iter().find_map(|e| match e.record {
            crate::domain::run::Record::TimerSet { at } => Some(at.0),
            _ => None,
        });
        let fired = j
            .iter()
            .find(|e| matches!(e.record, crate::domain::run::Record::TimerFired { .. }))
            .map(|e| e.at.0);
        if let (Some(due), Some(fired)) = (due, fired) {
            late.push(fired - due);
        }
    }
    late.sort_unstable();
    let pct = |p: f64| {
        late.get(((late.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    Ok(format!(
        "{:<22} {:<8} {n:>6} runs held at once (brought up in {:.1} s): {:.0} bytes each (RSS {:.1} -> {:.1} MB; target < 2048); \
         timers late p50 {} ms, p99 {} ms, max {} ms over {} timers (target <= 1000 ms)",
        "held",
        store.backend(),
        brought_up.as_secs_f64(),
        per_run,
        base,
        held_rss,
        pct(0.5),
        pct(0.99),
        late.last().copied().unwrap_or(0),
        late.len()
    ))
}

/// Recovery: a `tern worker` child process drives `n` runs, each inside a long step, and is
/// SIGKILLed; a new worker starts at once. Measures the time from the kill until every run is
/// moving again (its interrupted step started anew as attempt 2). Target: lease TTL + 1 s.
async fn recovery(url: &str, store: Arc<dyn Store>, args: &BenchArgs) -> Result<String, BenchError> {
    let n = args.recovery_runs;
    let ttl = args.recovery_lease_ttl;
    let exe = std::env::current_exe().map_err(|e| BenchError::Setup(format!("own executable: {e}")))?;
    let mut child = std::process::Command::new(exe)
        .args(["worker", "--database", url, "--concurrency", &n.to_string()])
        .args([
            "--lease-ttl",
            &format!("{}ms", ttl.as_millis()),
            "--poll-interval",
            "100ms",
        ])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| BenchError::Setup(format!("starting a worker process: {e}")))?;
    let engine = Engine::with_registry(
        store.clone(),
        None,
        crate::steps::builtins(store.clone()),
        EngineConfig::default(),
    )?;
    // Each run sleeps ten minutes in `snapshot`: it is in flight when the worker dies.
    let input = json!({"hold": "1ms", "test": {"sleep_ms": {"snapshot": 600_000}}});
    let mut runs = Vec::with_capacity(n);
    for _ in 0..n {
        let req = SubmitRequest {
            definition: "crash-saga".into(),
            input: input.clone(),
            request_id: None,
            correlation_id: None,
        };
        runs.push(engine.submit(req).await?.run.id);
    }
    let in_step = |attempt: u32| {
        let store = store.clone();
        async move {
            let rows = store
                .list_runs(&store::RunFilter {
                    limit: n as u32,
                    ..Default::default()
                })
                .await?;
            Ok::<_, BenchError>(
                rows.iter()
                    .filter(|r| {
                        r.current_step.as_deref() == Some("snapshot")
                            && matches!(r.state, crate::domain::run::RunState::Running { attempt: a, .. } if a >= attempt)
                    })
                    .count(),
            )
        }
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while in_step(1).await? < n {
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(BenchError::Setup(
                "the worker process did not start every run within 120 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child
        .kill()
        .map_err(|e| BenchError::Setup(format!("SIGKILL of the worker process: {e}")))?;
    let _ = child.wait();
    let killed = Instant::now();
    let config = EngineConfig {
        worker_id: format!("bench-heir-{}", std::process::id()),
        concurrency: n.max(1),
        lease_ttl: ttl,
        poll_interval: Duration::from_millis(100),
        shutdown_grace: Duration::from_secs(1),
    };
    let heir = Engine::with_registry(store.clone(), None, crate::steps::builtins(store.clone()), config)?;
    let stop = CancellationToken::new();
    let (e, st) = (heir.clone(), stop.clone());
    let heir_task = tokio::spawn(async move { worker::run_worker(e, st).await });
    let deadline = killed + ttl + Duration::from_secs(60);
    let mut moving = 0;
    while moving < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        moving = in_step(2).await?;
    }
    let took = killed.elapsed();
    // Stop the heir: the runs' steps are cut off after the shutdown grace and handed back.
    stop.cancel();
    let _ = heir_task.await;
    Ok(format!(
        "{:<22} {:<8} {n:>6} runs in flight, worker SIGKILLed: {moving} moving again after {:.2} s (lease TTL {:.1} s; target <= TTL + 1 s: {})",
        "recovery",
        store.backend(),
        took.as_secs_f64(),
        ttl.as_secs_f64(),
        if moving == n && took <= ttl + Duration::from_secs(1) { "met" } else { "NOT met" }
    ))
}

/// `tern server` child processes on one database, each serving the API on its own loopback
/// port (and running its worker). Killed when dropped.
struct Servers {
    children: Vec<std::process::Child>,
    clients: Vec<WorkflowServiceClient<tonic::transport::Channel>>,
}

impl Servers {
    /// `slots` is each server's `--concurrency`.
    async fn start(url: &str, k: usize, lease_ttl: Duration, slots: usize) -> Result<Servers, BenchError> {
        let exe = std::env::current_exe().map_err(|e| BenchError::Setup(format!("own executable: {e}")))?;
        let mut servers = Servers {
            children: Vec::new(),
            clients: Vec::new(),
        };
        let mut addrs = Vec::new();
        for _ in 0..k {
            // A free loopback port: bound here, released, then given to the server.
            let addr = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| BenchError::Setup(format!("finding a free loopback port: {e}")))?;
            let child = std::process::Command::new(&exe)
                .args(["server", "--database", url, "--listen", &addr.to_string()])
                .args([
                    "--lease-ttl",
                    &format!("{}ms", lease_ttl.as_millis()),
                    "--poll-interval",
                    "200ms",
                    "--concurrency",
                    &slots.to_string(),
                ])
                .env("RUST_LOG", "error")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .map_err(|e| BenchError::Setup(format!("starting a server process: {e}")))?;
            servers.children.push(child);
            addrs.push(addr);
        }
        for addr in addrs {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| BenchError::Setup(e.to_string()))?;
            let deadline = Instant::now() + Duration::from_secs(60);
            let channel = loop {
                match endpoint.connect().await {
                    Ok(c) => break c,
                    Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
                    Err(e) => return Err(BenchError::Setup(format!("the server at {addr} did not come up: {e}"))),
                }
            };
            servers.clients.push(WorkflowServiceClient::new(channel));
        }
        Ok(servers)
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Submits one noop-6 through the API and watches it: its run id and final status, or None if
/// the stream ended before the terminal event.
async fn submit_and_watch(
    client: &mut WorkflowServiceClient<tonic::transport::Channel>,
    request_id: String,
) -> Result<Option<(String, String)>, tonic::Status> {
    let run = client
        .submit_workflow(pb::SubmitWorkflowRequest {
            definition: "noop-6".into(),
            input_json: String::new(),
            request_id,
        })
        .await?
        .into_inner()
        .run_id;
    let mut events = client
        .watch_workflow(pb::WatchWorkflowRequest {
            run_id: run.clone(),
            after_sequence: 0,
        })
        .await?
        .into_inner();
    while let Some(ev) = events.message().await? {
        if let Some(pb::watch_event::Event::Terminal(end)) = ev.event {
            // The server ends the stream right after its terminal event: read that end rather
            // than drop the stream. A dropped stream is reset, and once more reset streams are
            // open than the client's HTTP/2 library remembers, the server's closing frames for
            // the ones it forgot count as protocol errors; after 1,024 of them the library
            // closes the whole connection (GOAWAY "too_many_internal_resets"), failing every
            // request in flight on it.
            let _ = events.trailers().await;
            return Ok(Some((run, end.status)));
        }
    }
    Ok(None)
}

/// One workflow through a set of servers, starting with server `at`: submitted with
/// `request_id` (so a submit whose answer was lost is not doubled when retried elsewhere) and
/// watched to its end. On a dead server, the client moves to the next one and asks again
/// (counted in `retries`).
async fn one_somewhere(
    clients: &[WorkflowServiceClient<tonic::transport::Channel>],
    mut at: usize,
    request_id: String,
    retries: &std::sync::atomic::AtomicUsize,
) -> Result<Duration, BenchError> {
    let t = Instant::now();
    let deadline = t + Duration::from_secs(120);
    loop {
        let mut client = clients[at % clients.len()].clone();
        let attempt = submit_and_watch(&mut client, request_id.clone());
        match attempt.await {
            Ok(Some((_, status))) if status == "completed" => return Ok(t.elapsed()),
            Ok(Some((run, status))) => return Err(BenchError::Setup(format!("run {run} ended {status}"))),
            // A stream cut off or a server gone: ask the next server.
            Ok(None) | Err(_) if Instant::now() < deadline => {
                retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                at += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(None) => {
                return Err(BenchError::Setup(format!(
                    "request {request_id}: no server finished it"
                )))
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Scale-out (PostgreSQL): the gRPC closed loop through `tern server` processes sharing one
/// database, clients spread over them: one server, then `--servers`, then `--servers` with the
/// first SIGKILLed a third of the way in. Each phase on a fresh schema; after the kill, the
/// journal must show every run completed and no step started again after it had succeeded
/// (a step in flight at the kill may start again: its idempotency key is the contract).
async fn scale_out(args: &BenchArgs) -> Result<Vec<String>, BenchError> {
    let n = args.scale_out_runs;
    let k = args.servers.max(1);
    let ttl = args.recovery_lease_ttl;
    let mut lines = Vec::new();
    // Rounds of one server then `k`, then `k` with a SIGKILL. A SIGKILL needs a survivor to
    // take the runs over: with one server, no kill phase.
    let mut phases: Vec<(usize, bool)> = (0..args.scale_out_rounds.max(1))
        .flat_map(|_| [(1, false), (k, false)])
        .collect();
    phases.push((k, true));
    // Throughput of the comparison phases, in order: 1 server, `k`, 1, `k`... (whole phase,
    // steady state).
    let mut rates: Vec<(f64, f64)> = Vec::new();
    for (servers, kill) in phases.into_iter().filter(|&(servers, kill)| !kill || servers > 1) {
        let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
        // Created (and migrated) here first, so the servers start together on a ready schema;
        // then closed, so that the servers share the database's commits among themselves only.
        drop(store::postgres::PgStore::connect(&args.postgres_url, Some(&schema)).await?);
        let sep = if args.postgres_url.contains('?') { '&' } else { '?' };
        let url = format!("{}{sep}tern_schema={schema}", args.postgres_url);
        let result = async {
            // Each server may drive every workflow in flight at once: one server alone must not
            // be measured short of slots (its submits would then wait to be claimed).
            let slots = args.concurrency.max(args.in_flight);
            let fleet = Servers::start(&url, servers, ttl, slots).await?;
            let clients = Arc::new(fleet.clients.clone());
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let retries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let pg_before = pg_work(&args.postgres_url).await;
            let busy = machine_busy();
            let pids: Vec<u32> = fleet.children.iter().map(|c| c.id()).collect();
            let split_before = cpu_split(&pids);
            let started = Instant::now();
            let mut tasks = Vec::new();
            for c in 0..args.in_flight.max(1) {
                let (clients, next, retries) = (clients.clone(), next.clone(), retries.clone());
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if i >= n {
                            break;
                        }
                        let took = one_somewhere(&clients, c, format!("scale-out-{i}"), &retries).await?;
                        lat.push((took, started.elapsed()));
                    }
                    Ok::<_, BenchError>(lat)
                }));
            }
            let mut fleet = fleet;
            let mut killed_at = None;
            if kill {
                while next.load(std::sync::atomic::Ordering::SeqCst) < n / 3 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                fleet.children[0]
                    .kill()
                    .map_err(|e| BenchError::Setup(format!("SIGKILL of a server: {e}")))?;
                let _ = fleet.children[0].wait();
                killed_at = Some(started.elapsed());
            }
            let mut latencies = Vec::with_capacity(n);
            let mut finished = Vec::with_capacity(n);
            for t in tasks {
                for (took, at) in t.await.map_err(|e| BenchError::Setup(e.to_string()))?? {
                    latencies.push(took);
                    finished.push(at);
                }
            }
            let elapsed = started.elapsed().as_secs_f64();
            let steady = steady_rate(&mut finished);
            let cpu = busy.zip(machine_busy()).map(|(b, a)| a.saturating_sub(b));
            // A SIGKILLed server's time is lost with it: the split is of the survivors.
            let split_after = cpu_split(&pids);
            let per_wf = |i: usize| split_after[i].saturating_sub(split_before[i]).as_secs_f64() * 1e3 / n as f64;
            let split = format!(
                " (servers {:.2}, PostgreSQL {:.2}, bench {:.2})",
                per_wf(0),
                per_wf(1),
                per_wf(2)
            );
            drop(fleet);
            // Backends report their counters as they exit.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let pg = match (pg_before, pg_work(&args.postgres_url).await) {
                (Some(a), Some(b)) => format!(
                    ", PostgreSQL {:.1} transactions, {:.2} WAL flushes, {:.1} KB of WAL and {:.0} buffer reads/wf",
                    (b.commits - a.commits) as f64 / n as f64,
                    (b.wal_syncs - a.wal_syncs) as f64 / n as f64,
                    (b.wal_bytes - a.wal_bytes) as f64 / 1024.0 / n as f64,
                    (b.buffers - a.buffers) as f64 / n as f64
                ),
                _ => String::new(),
            };
            latencies.sort();
            let audit = audit_runs(&args.postgres_url, &schema, n).await?;
            let cpu = cpu_figures(cpu, n, elapsed) + &split + &pg;
            let audit = format!(
                "{audit}; {} requests retried elsewhere",
                retries.load(std::sync::atomic::Ordering::Relaxed)
            );
            Ok::<_, BenchError>((n as f64 / elapsed, steady, latencies, killed_at, audit, cpu))
        }
        .await;
        drop_schema(args, Some(&schema)).await;
        let (per_sec, steady, latencies, killed_at, audit, cpu) = result?;
        if !kill {
            rates.push((per_sec, steady.unwrap_or(per_sec)));
        }
        let steady = steady.map_or_else(String::new, |r| format!(" (steady {r:.1})"));
        let what = match killed_at {
            Some(t) => format!("{servers} servers, one SIGKILLed at {:.1} s", t.as_secs_f64()),
            None if servers == 1 => "1 server".to_string(),
            None => format!("{servers} servers"),
        };
        lines.push(format!(
            "{:<22} {:<8} {n:>6} wf {per_sec:>9.1} wf/s{steady}  p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  {cpu}  {what}: {audit}",
            "scale-out gRPC",
            "postgres",
            percentile(&latencies, 0.50).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3,
            latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
        ));
    }
    if let Some(line) = rounds_line(&rates, k) {
        lines.push(line);
    }
    Ok(lines)
}

/// Throughput once a phase is under way: the workflows that finished after the first fifth
/// had, over the time they took. It leaves out the phase's start (servers opening their
/// connections and preparing statements, counting their peers), the same for any number of
/// servers but a larger share of a short phase. `finished`: when each workflow finished, from
/// the phase's start (sorted here). None with too few workflows to tell.
fn steady_rate(finished: &mut [Duration]) -> Option<f64> {
    finished.sort();
    let first = finished.len() / 5;
    let span = finished.last()?.checked_sub(*finished.get(first)?)?.as_secs_f64();
    let counted = finished.len() - 1 - first;
    (counted >= 10 && span > 0.0).then(|| counted as f64 / span)
}

/// With more than one round: each round's throughput of `k` servers against one server just
/// before it, and their median (what the scale-out target compares, steadier than any one
/// round on a shared machine), for the steady state and for the whole phases. `rates`: each
/// phase's (whole phase, steady state) throughput.
fn rounds_line(rates: &[(f64, f64)], k: usize) -> Option<String> {
    let whole: Vec<f64> = rates.chunks_exact(2).map(|p| p[1].0 / p[0].0 - 1.0).collect();
    let steady: Vec<f64> = rates.chunks_exact(2).map(|p| p[1].1 / p[0].1 - 1.0).collect();
    if steady.len() < 2 || k == 1 {
        return None;
    }
    Some(format!(
        "{:<22} {:<8} {k} servers against 1 over {} rounds: steady state {}; whole phases {}",
        "scale-out rounds",
        "postgres",
        steady.len(),
        median_and_each(&steady),
        median_and_each(&whole),
    ))
}

/// `median +x% (+a%, +b%, ...)` of at least one ratio.
fn median_and_each(pairs: &[f64]) -> String {
    let mut sorted = pairs.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    let median = if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    };
    let each: Vec<String> = pairs.iter().map(|r| format!("{:+.0}%", r * 100.0)).collect();
    format!("median {:+.1}% ({})", median * 100.0, each.join(", "))
}

/// What a phase cost PostgreSQL so far, whatever else shares the machine: from
/// `pg_stat_database`, the database's committed transactions and buffer reads (hits and
/// misses); from `pg_stat_wal`, the server's WAL flushes (fsyncs) and WAL bytes.
#[derive(Clone, Copy, sqlx::FromRow)]
struct PgWork {
    commits: i64,
    buffers: i64,
    wal_syncs: i64,
    wal_bytes: i64,
}

async fn pg_work(url: &str) -> Option<PgWork> {
    let pool = sqlx::PgPool::connect(url).await.ok()?;
    let row: Option<PgWork> = sqlx::query_as(
        "SELECT d.xact_commit AS commits, d.blks_hit + d.blks_read AS buffers, w.wal_sync AS wal_syncs, \
         w.wal_bytes::bigint AS wal_bytes FROM pg_stat_database d, pg_stat_wal w WHERE d.datname = current_database()",
    )
    .fetch_optional(&pool)
    .await
    .ok()
    .flatten();
    pool.close().await;
    row
}

/// The machine's CPU time per workflow over a phase, and how much of its cores stayed idle (a
/// phase that leaves cores idle is held back by waiting, not by CPU).
fn cpu_figures(busy: Option<Duration>, workflows: usize, elapsed_secs: f64) -> String {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    match busy {
        Some(busy) if workflows > 0 && elapsed_secs > 0.0 => format!(
            "CPU {:.2} ms/wf, idle {:.0}%",
            busy.as_secs_f64() * 1e3 / workflows as f64,
            (100.0 * (1.0 - busy.as_secs_f64() / (elapsed_secs * cores))).max(0.0)
        ),
        _ => "CPU n/a".to_string(),
    }
}

/// What the journal of a scale-out phase shows: runs completed, runs another server took over,
/// steps started more than once, and steps started again after they had succeeded (must be 0).
async fn audit_runs(url: &str, schema: &str, n: usize) -> Result<String, BenchError> {
    let pool = sqlx::PgPool::connect(url)
        .await
        .map_err(|e| BenchError::Setup(format!("connecting for the audit: {e}")))?;
    let q = |sql: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&sql)
                .fetch_one(&pool)
                .await
                .map_err(|e| BenchError::Setup(format!("audit query: {e}")))
        }
    };
    let runs = q(format!("SELECT COUNT(*) FROM {schema}.runs")).await?;
    let completed = q(format!("SELECT COUNT(*) FROM {schema}.runs WHERE status = 'completed'")).await?;
    let taken_over = q(format!("SELECT COUNT(*) FROM {schema}.runs WHERE fencing_token > 1")).await?;
    let restarted = q(format!(
        "SELECT COUNT(*) FROM (SELECT run_id, record->>'step' FROM {schema}.journal WHERE kind = 'step_started' \
         GROUP BY 1, 2 HAVING COUNT(*) > 1) AS again"
    ))
    .await?;
    let after_success = q(format!(
        "SELECT COUNT(*) FROM {schema}.journal s JOIN {schema}.journal d ON d.run_id = s.run_id \
         AND d.kind = 'step_succeeded' AND d.record->>'step' = s.record->>'step' AND s.seq > d.seq \
         WHERE s.kind = 'step_started'"
    ))
    .await?;
    let orphans = q(format!(
        "SELECT COUNT(*) FROM {schema}.journal j WHERE NOT EXISTS (SELECT 1 FROM {schema}.runs r WHERE r.id = j.run_id)"
    ))
    .await?;
    pool.close().await;
    Ok(format!(
        "{completed}/{runs} runs completed, {taken_over} taken over, {restarted} steps started again \
         (in flight at a kill), {after_success} run again after success, {orphans} journal rows without a run{}",
        if runs == n as i64 && completed == runs && after_success == 0 && orphans == 0 {
            ""
        } else {
            " (NOT met)"
        }
    ))
}

/// Seeds `n` finished failover jobs (and their runs, pinned to the real failover definitions)
/// straight into the database: half test, half live; 1% testing, 10% failed, the rest
/// completed; spread over 1,000 VMs. Ids sort like UUIDv7 by creation (x in the leading digits).
async fn seed_jobs(
    backend: &str,
    url: &str,
    args: &BenchArgs,
    schema: Option<&str>,
    catalog: &crate::workflow::Catalog,
    n: usize,
) -> Result<(), BenchError> {
    let n = n as i64;
    let def = |name: &str| {
        catalog
            .get(name)
            .ok_or_else(|| BenchError::Setup(format!("no embedded definition {name}")))
    };
    let (test, live) = (def(crate::api::TEST_FAILOVER)?, def(crate::api::LIVE_FAILOVER)?);
    let defs_sql = "INSERT INTO definitions (hash, name, source, created_at) VALUES ($1, $2, $3, 0), ($4, $5, $6, 0) \
                    ON CONFLICT (hash) DO NOTHING";
    let (runs_sql, jobs_sql) = match backend {
        "sqlite" => (
            "WITH RECURSIVE c(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM c WHERE x < $1 - 1) \
             INSERT INTO runs (id, definition, definition_hash, correlation_id, status, display_status, state, input, \
             context, last_seq, created_at, updated_at, completed_at) \
             SELECT printf('%08x-0000-7000-8000-%012x', x, x), CASE x % 2 WHEN 0 THEN $2 ELSE $4 END, \
             CASE x % 2 WHEN 0 THEN $3 ELSE $5 END, 'seeded', 'completed', 'completed', '{\"state\":\"completed\"}', \
             '{}', '{}', 1, x, x, x FROM c",
            "INSERT INTO failover_jobs (job_id, vm_id, vm_name, job_type, status, correlation_id, created_at, \
             updated_at, completed_at) SELECT id, 'vm-' || (created_at % 1000), 'pgtest' || (created_at % 1000), \
             CASE created_at % 2 WHEN 0 THEN 'test' ELSE 'live' END, \
             CASE WHEN created_at % 100 = 0 THEN 'testing' WHEN created_at % 10 = 1 THEN 'failed' ELSE 'completed' END, \
             'seeded', '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z' \
             FROM runs WHERE correlation_id = 'seeded'",
        ),
        _ => (
            "INSERT INTO runs (id, definition, definition_hash, correlation_id, status, display_status, state, input, \
             context, last_seq, created_at, updated_at, completed_at) \
             SELECT (lpad(to_hex(x), 8, '0') || '-0000-7000-8000-' || lpad(to_hex(x), 12, '0'))::uuid, \
             CASE x % 2 WHEN 0 THEN $2 ELSE $4 END, CASE x % 2 WHEN 0 THEN $3 ELSE $5 END, 'seeded', 'completed', \
             'completed', '{\"state\":\"completed\"}'::jsonb, '{}'::jsonb, '{}'::jsonb, 1, x, x, x \
             FROM generate_series(0, $1 - 1) AS x",
            "INSERT INTO failover_jobs (job_id, vm_id, vm_name, job_type, status, correlation_id, created_at, \
             updated_at, completed_at) SELECT id::text, 'vm-' || (created_at % 1000), 'pgtest' || (created_at % 1000), \
             CASE created_at % 2 WHEN 0 THEN 'test' ELSE 'live' END, \
             CASE WHEN created_at % 100 = 0 THEN 'testing' WHEN created_at % 10 = 1 THEN 'failed' ELSE 'completed' END, \
             'seeded', now(), now(), now() FROM runs WHERE correlation_id = 'seeded'",
        ),
    };
    macro_rules! seed {
        ($pool:expr) => {{
            let pool = $pool;
            sqlx::query(defs_sql)
                .bind(&test.hash)
                .bind(&test.name)
                .bind(&test.source)
                .bind(&live.hash)
                .bind(&live.name)
                .bind(&live.source)
                .execute(&pool)
                .await
                .map_err(store::StoreError::from)?;
            sqlx::query(runs_sql)
                .bind(n)
                .bind(&test.name)
                .bind(&test.hash)
                .bind(&live.name)
                .bind(&live.hash)
                .execute(&pool)
                .await
                .map_err(store::StoreError::from)?;
            sqlx::query(jobs_sql)
                .execute(&pool)
                .await
                .map_err(store::StoreError::from)?;
            sqlx::query("ANALYZE")
                .execute(&pool)
                .await
                .map_err(store::StoreError::from)?;
        }};
    }
    match backend {
        "sqlite" => seed!(sqlx::SqlitePool::connect(url).await.map_err(store::StoreError::from)?),
        _ => {
            let opts: sqlx::postgres::PgConnectOptions = args
                .postgres_url
                .parse()
                .map_err(|e: sqlx::Error| BenchError::Setup(e.to_string()))?;
            let opts = opts.options([("search_path", schema.unwrap_or("public"))]);
            seed!(sqlx::PgPool::connect_with(opts)
                .await
                .map_err(store::StoreError::from)?)
        }
    }
    Ok(())
}

/// ListFailovers through the gRPC API over `n` seeded jobs: each filter a user would use, and
/// a page deep in the list by its page token; 100 calls each, p50 and p99.
async fn list_failovers(backend: &str, args: &BenchArgs, dir: &std::path::Path) -> Result<Vec<String>, BenchError> {
    let n = args.list_runs;
    let (store, schema, url) = backend_store(backend, args, dir).await?;
    let mut h = Harness::start(store.clone(), 4).await?;
    let seeded = Instant::now();
    seed_jobs(backend, &url, args, schema.as_deref(), &h.engine.catalog, n).await?;
    let seed_secs = seeded.elapsed().as_secs_f64();
    h.serve_api().await?;
    let channel = h
        .channel
        .clone()
        .ok_or_else(|| BenchError::Setup("no API channel".into()))?;
    let mut client = FailoverServiceClient::new(channel);
    let req = |status: &str, job_type: &str, vm: &str| pb::ListFailoversRequest {
        status: status.into(),
        job_type: job_type.into(),
        vm_id: vm.into(),
        page_size: 50,
        page_token: String::new(),
    };
    // A page token 100 pages into the whole list.
    let mut deep = req("", "", "");
    for _ in 0..100 {
        deep.page_token = client.list_failovers(deep.clone()).await?.into_inner().next_page_token;
    }
    let mut lines = Vec::new();
    for (name, r) in [
        ("no filter", req("", "", "")),
        ("status=failed", req("failed", "", "")),
        ("status=testing", req("testing", "", "")),
        ("job_type=live", req("", "live", "")),
        ("vm_id=vm-7", req("", "", "vm-7")),
        ("page 101", deep),
    ] {
        let mut lat = Vec::with_capacity(100);
        let mut got = 0;
        for _ in 0..100 {
            let t = Instant::now();
            got = client.list_failovers(r.clone()).await?.into_inner().jobs.len();
            lat.push(t.elapsed());
        }
        lat.sort();
        lines.push(format!(
            "{:<22} {:<8} {n:>7} jobs (seeded in {seed_secs:.1} s)  {name:<15} {got:>3} per page  p50 {:>6.2} ms  p99 {:>6.2} ms (target p99 < 50 ms)",
            "ListFailovers gRPC",
            backend,
            percentile(&lat, 0.5).as_secs_f64() * 1e3,
            percentile(&lat, 0.99).as_secs_f64() * 1e3,
        ));
    }
    h.stop.cancel();
    drop_schema(args, schema).await;
    Ok(lines)
}

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
