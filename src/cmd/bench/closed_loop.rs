//! The closed-loop throughput and latency scenarios, in-process and through the gRPC API.

use super::*;

/// Completion waiters fed by the engine's finished-run broadcast.
#[derive(Default)]
pub(super) struct Waiters {
    pub(super) pending: HashMap<RunId, oneshot::Sender<()>>,
    pub(super) done: HashSet<RunId>,
}

pub(super) struct Harness {
    pub(super) engine: Arc<Engine>,
    pub(super) store: Arc<dyn Store>,
    pub(super) waiters: Arc<Mutex<Waiters>>,
    pub(super) stop: CancellationToken,
    /// Set for the end-to-end scenarios: the API served on a loopback port.
    pub(super) api: Option<WorkflowServiceClient<tonic::transport::Channel>>,
    pub(super) channel: Option<tonic::transport::Channel>,
}

impl Harness {
    pub(super) async fn start(store: Arc<dyn Store>, concurrency: usize) -> Result<Harness, BenchError> {
        let config = EngineConfig {
            worker_id: format!("bench-{}", std::process::id()),
            concurrency,
            lease_ttl: Duration::from_secs(30),
            poll_interval: Duration::from_millis(500),
            shutdown_grace: Duration::from_secs(5),
        };
        let engine = Engine::with_registry(store.clone(), None, tern::steps::builtins(store.clone()), config)?;
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
            store,
            waiters,
            stop,
            api: None,
            channel: None,
        })
    }

    /// Serves the API on a loopback port and connects a client to it.
    pub(super) async fn serve_api(&mut self) -> Result<(), BenchError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| BenchError::Setup(format!("binding a loopback port: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| BenchError::Setup(format!("loopback port: {e}")))?;
        let state = tern::api::ApiState::new(self.engine.clone(), self.store.clone(), None);
        let stop = self.stop.clone();
        tokio::spawn(tern::api::serve(listener, state, async move { stop.cancelled().await }));
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
                by: None,
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

pub(super) async fn scenario(
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
