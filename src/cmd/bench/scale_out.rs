//! The scale-out scenario: `tern server` processes on one PostgreSQL, one then several, then one
//! SIGKILLed under load; the journal audited afterwards.

use super::*;

/// `tern server` child processes on one database, each serving the API on its own loopback
/// port (and running its worker). Killed when dropped.
pub(super) struct Servers {
    pub(super) children: Vec<std::process::Child>,
    pub(super) clients: Vec<WorkflowServiceClient<tonic::transport::Channel>>,
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
                .args([
                    "server",
                    "--insecure-no-auth",
                    "--database",
                    url,
                    "--listen",
                    &addr.to_string(),
                ])
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
pub(super) async fn submit_and_watch(
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
pub(super) async fn one_somewhere(
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
pub(super) async fn scale_out(args: &BenchArgs) -> Result<Vec<String>, BenchError> {
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

/// What the journal of a scale-out phase shows: runs completed, runs another server took over,
/// steps started more than once, and steps started again after they had succeeded (must be 0).
pub(super) async fn audit_runs(url: &str, schema: &str, n: usize) -> Result<String, BenchError> {
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
