//! The worker loop: claim due runs up to the configured concurrency, drive each in its own task,
//! and sleep until a wake-up (submit, signal, a run put to sleep), the next timer, or the
//! fallback poll. On shutdown it stops claiming and lets in-flight steps finish up to the grace
//! deadline; drivers hand their leases back.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::driver::{drive, Stopped};
use super::{Dispatched, Engine, EngineError, LocalWorker};
use crate::domain::Timestamp;
use crate::store::StoreError;

/// Runs the worker until `shutdown` is cancelled and in-flight runs have stopped.
pub async fn run_worker(engine: Arc<Engine>, shutdown: CancellationToken) -> Result<(), EngineError> {
    let cfg = engine.config.clone();
    let wake = engine.store.wakeup();
    let mut drivers: JoinSet<Result<Stopped, EngineError>> = JoinSet::new();
    // One slot per run driven at once, shared with submits that start runs here directly.
    let slots = Arc::new(Semaphore::new(cfg.concurrency));
    let (local_tx, mut local) = mpsc::unbounded_channel::<Dispatched>();
    engine.set_local_worker(Some(LocalWorker {
        owner: cfg.worker_id.clone(),
        slots: slots.clone(),
        runs: local_tx,
    }));
    engine.store.set_executing_count(Some({
        let (slots, concurrency) = (slots.clone(), cfg.concurrency);
        Arc::new(move || concurrency.saturating_sub(slots.available_permits()))
    }));
    let spawn = |drivers: &mut JoinSet<_>, run, lease, first, slot: OwnedSemaphorePermit| {
        let (engine, shutdown) = (engine.clone(), shutdown.clone());
        drivers.spawn(async move {
            let _slot = slot;
            drive(engine, run, lease, first, shutdown).await
        });
    };
    tracing::info!(worker = %cfg.worker_id, backend = engine.store.backend(), concurrency = cfg.concurrency, "worker started");
    let mut store_errors = 0u32;
    // Whether a run may be waiting to be claimed: set by a wake-up (submit, signal, a run put
    // to sleep, another process's notification), the timer and a full claim; cleared by a claim
    // that found fewer runs than it asked for. A driver ending alone only frees a slot, so it
    // does not send the loop to the database unless work is known to be waiting.
    let mut claimable = true;
    // When to look again without a wake-up: the next stored wake-up time or the fallback poll.
    let mut next_look = tokio::time::Instant::now();
    while !shutdown.is_cancelled() {
        while let Some(done) = drivers.try_join_next() {
            log_driver_end(done);
        }
        while let Ok(d) = local.try_recv() {
            spawn(&mut drivers, d.run, d.lease, Some(d.first), d.slot);
        }
        let free = slots.available_permits();
        if free > 0 && claimable {
            match engine
                .store
                .claim(&cfg.worker_id, free as u32, cfg.lease_ttl, Timestamp::now())
                .await
            {
                Ok(runs) => {
                    store_errors = 0;
                    claimable = runs.len() == free;
                    for (run, lease) in runs {
                        match slots.clone().try_acquire_owned() {
                            Ok(slot) => spawn(&mut drivers, run, lease, None, slot),
                            // A submit took the slot meanwhile: give the run back at once.
                            Err(_) => {
                                claimable = true;
                                if let Err(e) = engine.store.release(run.id, &lease).await {
                                    tracing::warn!(run_id = %run.id, error = %e, "could not give back a claimed run; it moves when its lease expires");
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    store_errors += 1;
                    log_store_error(&e, store_errors);
                    backoff_after_error(store_errors, &shutdown).await;
                    continue;
                }
            }
            if claimable && slots.available_permits() > 0 {
                continue;
            }
            let now = Timestamp::now();
            let mut wait = cfg.poll_interval;
            match engine.store.next_wake_after(now).await {
                Ok(Some(next)) => wait = wait.min(now.until(next)),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "could not read the next wake-up time"),
            }
            next_look = tokio::time::Instant::now() + wait;
        }
        tokio::select! {
            _ = wake.wait() => claimable = true,
            Some(d) = local.recv() => spawn(&mut drivers, d.run, d.lease, Some(d.first), d.slot),
            Some(done) = drivers.join_next(), if !drivers.is_empty() => log_driver_end(done),
            _ = tokio::time::sleep_until(next_look) => {
                claimable = true;
                // Due work with every slot busy: look again once a slot frees, not before.
                next_look = tokio::time::Instant::now() + cfg.poll_interval;
            }
            _ = shutdown.cancelled() => {}
        }
    }
    engine.set_local_worker(None);
    engine.store.set_executing_count(None);
    // Runs handed over while stopping: their drivers see the shutdown and give the lease back.
    local.close();
    while let Some(d) = local.recv().await {
        spawn(&mut drivers, d.run, d.lease, Some(d.first), d.slot);
    }
    tracing::info!(in_flight = drivers.len(), grace = ?cfg.shutdown_grace, "worker stopping: no new claims");
    let drain = async {
        while let Some(done) = drivers.join_next().await {
            log_driver_end(done);
        }
    };
    if tokio::time::timeout(cfg.shutdown_grace + Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        drivers.abort_all();
    }
    tracing::info!("worker stopped");
    Ok(())
}

fn log_driver_end(done: Result<Result<Stopped, EngineError>, tokio::task::JoinError>) {
    match done {
        Ok(Ok(_)) => {}
        Ok(Err(EngineError::Store(StoreError::Fenced { run }))) => {
            tracing::info!(run_id = %run, "run taken over by another worker")
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "driver stopped with an error; the run will be retried after its lease expires")
        }
        Err(e) if e.is_cancelled() => {}
        Err(e) => tracing::error!(error = %e, "driver task panicked"),
    }
}

fn log_store_error(e: &StoreError, n: u32) {
    if n == 1 || n.is_multiple_of(30) {
        tracing::warn!(error = %e, consecutive = n, "claim failed; database unavailable?");
    }
}

async fn backoff_after_error(n: u32, shutdown: &CancellationToken) {
    let d = Duration::from_millis(100u64.saturating_mul(1 << n.min(6)));
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = shutdown.cancelled() => {}
    }
}
