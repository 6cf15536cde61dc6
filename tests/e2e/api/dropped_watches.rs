//! A client that is not ours against a real `tern server`, on one HTTP/2 connection for its
//! whole life: 50 workflows in flight, each submitted and watched, each watch dropped as soon as
//! the client has what it wants — right after the terminal event, or at a random earlier
//! moment. No call may fail.
//!
//! Every stream the client drops before it has read the stream's end is reset. Its HTTP/2
//! library (h2) remembers at most 50 reset streams, for 1 s; a frame that arrives later for one
//! it forgot counts as a protocol error, and after 1,024 of those in the connection's life it
//! closes the connection (GOAWAY ENHANCE_YOUR_CALM): every call in flight fails with
//! RESOURCE_EXHAUSTED. The server is a child process, as in production: with client and server
//! in one process on two cores, the client rarely reads a terminal event before the stream's
//! end, and the test would prove little.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tern::api::pb;
use tern::api::pb::watch_event::Event;
use tern::api::pb::workflow_service_client::WorkflowServiceClient;
use tonic::transport::Channel;

use super::restart::Server;
use crate::common::TestDb;

const IN_FLIGHT: usize = 50;
/// Eight thousand dropped streams, a third of them early. Before the server sent a watch's
/// terminal event together with the stream's end, the connection died after 4,000 to 5,500.
const WORKFLOWS: usize = 8_000;
/// noop-6's journal: submitted, six steps started and succeeded, finished.
const ENTRIES: usize = 14;

/// When the client lets go of one workflow's watch.
#[derive(Debug, Clone, Copy)]
enum LetGo {
    /// Right after the terminal event is read: what most clients do.
    AfterTerminal,
    /// While the watch call still waits for its response headers.
    WhileCalling,
    /// Once the response headers are in, before any event is read.
    BeforeFirstEvent,
    /// After this many journal entries.
    AfterEntries(usize),
}

/// Submits one noop-6 and watches it until `let_go` says to drop the stream.
async fn one(mut wf: WorkflowServiceClient<Channel>, let_go: LetGo) -> Result<(), String> {
    let run = wf
        .submit_workflow(pb::SubmitWorkflowRequest {
            definition: "noop-6".into(),
            input_json: String::new(),
            request_id: String::new(),
        })
        .await
        .map_err(|s| format!("submit: {s}"))?
        .into_inner();
    let call = wf.watch_workflow(pb::WatchWorkflowRequest {
        run_id: run.run_id.clone(),
        after_sequence: 0,
    });
    if let LetGo::WhileCalling = let_go {
        // Dropped mid-call if it has not answered by then, else right after its answer.
        let _ = tokio::time::timeout(Duration::from_micros(300), call).await;
        return Ok(());
    }
    let mut stream = call
        .await
        .map_err(|s| format!("watch {}: {s}", run.run_id))?
        .into_inner();
    let mut entries = 0;
    loop {
        match let_go {
            LetGo::BeforeFirstEvent => return Ok(()),
            LetGo::AfterEntries(n) if n == entries => return Ok(()),
            _ => {}
        }
        let event = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .map_err(|_| format!("watch {} stalled", run.run_id))?
            .map_err(|s| format!("watch {}: {s}", run.run_id))?
            .and_then(|e| e.event)
            .ok_or_else(|| format!("watch {} ended without a terminal event", run.run_id))?;
        match event {
            Event::Entry(_) => entries += 1,
            // Dropped here, without reading on to the end of the stream.
            Event::Terminal(t) if t.status == "completed" => return Ok(()),
            Event::Terminal(t) => return Err(format!("run {} ended {}", run.run_id, t.status)),
        }
    }
}

pub async fn dropped_watch_streams_never_cost_the_connection(db: TestDb) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let server = Server {
        args: [
            "server",
            "--insecure-no-auth",
            "--database",
            &db.url,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        log_dir: tempfile::tempdir().unwrap(),
        endpoint: format!("http://127.0.0.1:{port}"),
    };
    let _child = server.spawn("server");
    let wf = WorkflowServiceClient::new(server.channel().await);

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(16);
    let plan: Arc<Vec<LetGo>> = Arc::new(
        (0..WORKFLOWS)
            .map(|_| match rng.gen_range(0..12) {
                0 => LetGo::WhileCalling,
                1 => LetGo::BeforeFirstEvent,
                2 | 3 => LetGo::AfterEntries(rng.gen_range(1..ENTRIES)),
                _ => LetGo::AfterTerminal,
            })
            .collect(),
    );
    let early = plan.iter().filter(|p| !matches!(p, LetGo::AfterTerminal)).count();
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let clients: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let (wf, next, plan) = (wf.clone(), next.clone(), plan.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                while let Some(&let_go) = plan.get(next.fetch_add(1, Ordering::Relaxed)) {
                    if let Err(e) = one(wf.clone(), let_go).await {
                        failures.push(format!("{let_go:?}: {e}"));
                    }
                }
                failures
            })
        })
        .collect();
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.unwrap());
    }
    eprintln!(
        "{WORKFLOWS} watch streams dropped on one connection ({early} early) in {:.1}s; {} calls failed",
        t.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {WORKFLOWS} workflows failed; the first: {:#?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
}
