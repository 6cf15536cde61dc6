//! The held-runs scenario (many runs on their timers at once) and the recovery scenario (a worker
//! process SIGKILLed with runs in flight).

use super::*;

/// Held runs: `n` test-failover-shaped runs (`noop-hold`) brought up and left waiting on their
/// hold timers, all at once. Measures the server memory each costs while held (RSS growth over
/// the idle engine) and, once every timer fired and the runs finished, how late each timer
/// fired (the commit of `timer_fired` against the time `timer_set` asked for).
pub(super) async fn held(store: Arc<dyn Store>, args: &BenchArgs) -> Result<String, BenchError> {
    let n = args.held_runs;
    let h = Arc::new(Harness::start(store.clone(), args.concurrency).await?);
    let count = |status: tern::domain::run::RunStatus| {
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
                    by: None,
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
    use tern::domain::run::RunStatus;
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
            tern::domain::run::Record::TimerSet { at } => Some(at.0),
            _ => None,
        });
        let fired = j
            .iter()
            .find(|e| matches!(e.record, tern::domain::run::Record::TimerFired { .. }))
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
pub(super) async fn recovery(url: &str, store: Arc<dyn Store>, args: &BenchArgs) -> Result<String, BenchError> {
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
        tern::steps::builtins(store.clone()),
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
            by: None,
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
                            && matches!(r.state, tern::domain::run::RunState::Running { attempt: a, .. } if a >= attempt)
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
    let heir = Engine::with_registry(store.clone(), None, tern::steps::builtins(store.clone()), config)?;
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
