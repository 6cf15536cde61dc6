//! The gRPC API end to end: a real tonic server on 127.0.0.1:0 in front of the engine, a worker
//! and the CloudStack simulator, driven by the generated Rust clients. Every RPC, its error
//! paths, the database-enforced one-failover-per-VM rule and the gap-free watch, on both backends
//! where the database matters.

use crate::common;
use crate::{on_both_backends, on_sqlite};
mod console;
mod dropped_watches;
mod limits;
mod observability;
mod pinned;
mod resolve;
mod rest;
mod restart;
mod security;
mod topology;
mod traces;

use std::sync::Arc;
use std::time::Duration;

use tern::api::pb;
use tern::api::pb::failover_service_client::FailoverServiceClient;
use tern::api::pb::watch_event::Event;
use tern::api::pb::workflow_service_client::WorkflowServiceClient;
use tern::domain::inventory::{InventoryFile, NetworkKind, VmRecord};
use tern::engine::EngineConfig;
use tern::steps::failover::FailoverDeps;
use tern::store::Store;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::Code;
use tonic_types::StatusExt;

use common::TestDb;

struct Api {
    stop: CancellationToken,
    inv: InventoryFile,
    store: Arc<dyn Store>,
    deps: Arc<FailoverDeps>,
    fo: FailoverServiceClient<Channel>,
    wf: WorkflowServiceClient<Channel>,
    channel: Channel,
    endpoint: String,
    /// The REST API's base URL (`http://127.0.0.1:PORT`).
    rest: String,
    _defs: tempfile::TempDir,
    _sim: common::Sim,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

const FAST_RETRY: &str =
    r#"retry = { max_attempts = 3, initial_delay = "20ms", multiplier = 2.0, max_delay = "100ms", jitter = 0.0 }"#;
/// Many slow retries: a failing step stays in its backoff long enough to be looked at.
const SLOW_RETRY: &str =
    r#"retry = { max_attempts = 50, initial_delay = "300ms", multiplier = 1.0, max_delay = "300ms", jitter = 0.0 }"#;

/// The embedded definitions with fast retries, so failures end quickly.
fn fast_definitions() -> tempfile::TempDir {
    definitions_with(FAST_RETRY)
}

fn definitions_with(retry: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (file, text) in tern::workflow::EMBEDDED {
        let fast = text.replace(
            r#"retry = { max_attempts = 6, initial_delay = "2s", multiplier = 2.0, max_delay = "1m", jitter = 0.2 }"#,
            retry,
        );
        if file.contains("failover") {
            assert_ne!(&fast, text, "retry defaults changed; update the test");
        }
        std::fs::write(dir.path().join(file), fast).unwrap();
    }
    dir
}

async fn api(db: &TestDb) -> Api {
    api_with(db, None, FAST_RETRY).await
}

async fn api_with(db: &TestDb, faults: Option<&str>, retry: &str) -> Api {
    api_serving(db, faults, retry, |_| tern::api::ServeOptions::default()).await
}

/// [`api_with`] served with the options `options` makes from the store (authentication, TLS,
/// limits).
async fn api_serving(
    db: &TestDb,
    faults: Option<&str>,
    retry: &str,
    options: impl FnOnce(Arc<dyn Store>) -> tern::api::ServeOptions,
) -> Api {
    let stop = CancellationToken::new();
    let faults = faults.map(|f| serde_json::from_str(f).expect("fault plan"));
    let sim = common::start_sim(7, faults, "k", "s", 20).await;
    let inv = sim.inventory.clone();
    let store = db.open().await;
    tern::store::load_inventory(store.as_ref(), &inv, tern::domain::Timestamp::now())
        .await
        .unwrap();
    let settings = sim.cloud_settings(
        "k",
        "s",
        tern::providers::SnapshotKind::CloudstackVolume,
        Duration::from_millis(10),
        Duration::from_secs(2),
    );
    let defs = definitions_with(retry);
    let cfg = EngineConfig {
        worker_id: "api-test".into(),
        concurrency: 8,
        lease_ttl: Duration::from_secs(5),
        poll_interval: Duration::from_millis(50),
        shutdown_grace: Duration::from_secs(1),
    };
    let (engine, deps) = common::failover_engine(store.clone(), &settings, defs.path(), cfg, &stop);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rest = format!("http://{}", http.local_addr().unwrap());
    let state = tern::api::ApiState::new(engine, store.clone(), Some(deps.clone()));
    let s = stop.clone();
    let options = options(store.clone());
    tokio::spawn(async move {
        tern::api::serve_with_http(listener, Some(http), state, options, async move { s.cancelled().await }).await
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Api {
        stop,
        inv,
        store,
        deps,
        fo: FailoverServiceClient::new(channel.clone()),
        wf: WorkflowServiceClient::new(channel.clone()),
        channel,
        endpoint: format!("http://{addr}"),
        rest,
        _defs: defs,
        _sim: sim,
    }
}

impl Api {
    fn vm(&self, os: &str) -> VmRecord {
        self.inv
            .vms
            .iter()
            .find(|v| v.os_type == os)
            .expect("sample VM")
            .clone()
    }

    fn test_request(&self, vm: &VmRecord) -> pb::StartTestFailoverRequest {
        pb::StartTestFailoverRequest {
            vm_id: vm.vm_id.clone(),
            ..Default::default()
        }
    }

    async fn get(&self, job: &str) -> pb::FailoverJob {
        self.fo
            .clone()
            .get_failover(pb::GetFailoverRequest { job_id: job.into() })
            .await
            .unwrap()
            .into_inner()
    }

    /// Polls GetFailover until `done` holds.
    async fn until(&self, job: &str, what: &str, done: impl Fn(&pb::FailoverJob) -> bool) -> pb::FailoverJob {
        for _ in 0..1500 {
            let j = self.get(job).await;
            if done(&j) {
                return j;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("job {job} never got {what}: {:?}", self.get(job).await);
    }

    async fn terminal(&self, job: &str) -> pb::FailoverJob {
        self.until(job, "terminal", |j| {
            ["completed", "failed", "cancelled", "needs_operator"].contains(&j.run_status.as_str())
        })
        .await
    }

    /// All events of a watch from `after` to the terminal event (or `max` entries).
    async fn watch(&self, job: &str, after: i64, max: usize) -> (Vec<pb::JournalEntry>, Option<pb::Terminal>) {
        let mut stream = self
            .fo
            .clone()
            .watch_failover(pb::WatchFailoverRequest {
                job_id: job.into(),
                after_sequence: after,
            })
            .await
            .unwrap()
            .into_inner();
        let mut entries = Vec::new();
        while let Some(ev) = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("watch stalled")
            .unwrap()
        {
            match ev.event.unwrap() {
                Event::Entry(e) => {
                    entries.push(e);
                    if entries.len() == max {
                        return (entries, None);
                    }
                }
                Event::Terminal(t) => return (entries, Some(t)),
            }
        }
        panic!("stream ended without a terminal event");
    }
}

fn reason(s: &tonic::Status) -> String {
    s.get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

fn bad_fields(s: &tonic::Status) -> Vec<String> {
    s.get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

fn correlation(md: &tonic::metadata::MetadataMap) -> String {
    md.get("x-correlation-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

// ---- FailoverService ----

async fn test_failover_with_auto_cleanup_through_the_api(db: TestDb) {
    let a = api(&db).await;
    let vm = a.vm("linux");
    let mut req = tonic::Request::new(pb::StartTestFailoverRequest {
        auto_cleanup: true,
        test_duration: "2s".into(),
        custom_config: [("memory_mb".to_string(), "6144".to_string())].into(),
        ..a.test_request(&vm)
    });
    req.metadata_mut()
        .insert("x-correlation-id", "corr-e2e-1".parse().unwrap());
    let resp = a.fo.clone().start_test_failover(req).await.unwrap();
    assert_eq!(correlation(resp.metadata()), "corr-e2e-1");
    let job = resp.into_inner();
    assert!(job.created);
    assert_eq!(
        (job.vm_id.as_str(), job.vm_name.as_str(), job.job_type.as_str()),
        (vm.vm_id.as_str(), vm.name.as_str(), "test")
    );
    assert_eq!(job.correlation_id, "corr-e2e-1");
    assert_eq!(job.steps.len(), 15, "7 forward + 8 teardown steps: {:?}", job.steps);
    // The local worker may have started the first step in the submit's own commit.
    assert!(
        ["pending", "running"].contains(&job.steps[0].status.as_str()),
        "{:?}",
        job.steps[0]
    );
    assert!(job.steps[1..].iter().all(|s| s.status == "pending"));

    // In the hold: testing, with the auto-cleanup time and what the bring-up created.
    let held = a.until(&job.job_id, "testing", |j| j.status == "testing").await;
    // custom_config's memory, the source's CPU count.
    let test_vm = a.deps.cloud.get_vm(&held.destination_vm_id).await.unwrap();
    assert_eq!((test_vm.cpu_number, test_vm.memory), (Some(vm.cpu_count), Some(6144)));
    let cleanup = held.cleanup_at.expect("cleanup_at while holding");
    let started = held.started_at.expect("started_at");
    assert!(cleanup.seconds > started.seconds, "{cleanup:?} vs {started:?}");
    assert!(held.snapshot_name.starts_with("tern-"), "{held:?}");
    assert!(!held.destination_vm_id.is_empty());
    assert_eq!(held.progress_percent, 46, "7 of 15 steps done");
    let forward: Vec<_> = held.steps.iter().filter(|s| s.phase == "forward").collect();
    assert!(forward
        .iter()
        .all(|s| s.status == "completed" && s.attempt >= 1 && s.completed_at.is_some()));

    let (entries, terminal) = a.watch(&job.job_id, 0, usize::MAX).await;
    let terminal = terminal.unwrap();
    assert_eq!(terminal.status, "completed");
    assert_eq!(entries.last().map(|e| e.sequence), Some(terminal.last_sequence));
    assert!(entries.iter().any(|e| e.kind == "timer_fired"));

    let done = a.get(&job.job_id).await;
    assert_eq!((done.status.as_str(), done.progress_percent), ("completed", 100));
    assert!(done.completed_at.is_some() && done.cleanup_at.is_none() && done.error.is_none());
    assert!(done
        .steps
        .iter()
        .all(|s| s.status == "completed" && s.phase != "rollback"));
    assert_eq!(done.steps.iter().filter(|s| s.phase == "teardown").count(), 8);

    // Listed, newest first, with filters.
    let list =
        a.fo.clone()
            .list_failovers(pb::ListFailoversRequest {
                vm_id: vm.vm_id.clone(),
                job_type: "test".into(),
                status: "completed".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(
        list.jobs.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(),
        vec![job.job_id.as_str()]
    );
    assert!(list.jobs[0].steps.is_empty() && list.next_page_token.is_empty());
    let none =
        a.fo.clone()
            .list_failovers(pb::ListFailoversRequest {
                job_type: "live".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    assert!(none.jobs.is_empty());
}

async fn bad_requests_are_rejected_with_field_details(db: TestDb) {
    let a = api(&db).await;
    let vm = a.vm("linux");
    let mut fo = a.fo.clone();
    let e = fo
        .start_test_failover(pb::StartTestFailoverRequest {
            test_duration: "soon".into(),
            auto_cleanup: true,
            ..a.test_request(&vm)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(bad_fields(&e), vec!["test_duration"]);
    assert_eq!(reason(&e), "INVALID_ARGUMENT");
    assert!(!correlation(e.metadata()).is_empty());

    // custom_config: only its documented keys, with their values checked.
    let e = fo
        .start_live_failover(pb::StartLiveFailoverRequest {
            vm_id: vm.vm_id.clone(),
            custom_config: [
                ("ticket".to_string(), "CHG-1".to_string()),
                ("cpu_count".to_string(), "many".to_string()),
            ]
            .into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        bad_fields(&e),
        vec!["custom_config[cpu_count]", "custom_config[ticket]"]
    );

    let e = fo
        .start_test_failover(pb::StartTestFailoverRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), bad_fields(&e)),
        (Code::InvalidArgument, vec!["vm_id".to_string()])
    );
    let e = fo
        .start_test_failover(pb::StartTestFailoverRequest {
            auto_cleanup: true,
            ..a.test_request(&vm)
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&e), vec!["test_duration"], "auto_cleanup needs a duration");

    let e = fo
        .start_live_failover(pb::StartLiveFailoverRequest {
            vm_id: "4205ffff-no-such-vm".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!((e.code(), reason(&e)), (Code::NotFound, "VM_NOT_FOUND".to_string()));

    let e = fo
        .get_failover(pb::GetFailoverRequest { job_id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), bad_fields(&e)),
        (Code::InvalidArgument, vec!["job_id".to_string()])
    );
    let e = fo
        .get_failover(pb::GetFailoverRequest {
            job_id: tern::domain::RunId::new().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!((e.code(), reason(&e)), (Code::NotFound, "JOB_NOT_FOUND".to_string()));
    let e = fo
        .cancel_failover(pb::CancelFailoverRequest {
            job_id: tern::domain::RunId::new().to_string(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = fo
        .list_failovers(pb::ListFailoversRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&e), vec!["page_token"]);
    // Issue 19: an unknown status filter, a hold past the maximum, readiness of an unknown VM.
    let e = fo
        .list_failovers(pb::ListFailoversRequest {
            status: "bogus".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), bad_fields(&e)),
        (Code::InvalidArgument, vec!["status".to_string()])
    );
    let e = fo
        .start_test_failover(pb::StartTestFailoverRequest {
            test_duration: "999999999h".into(),
            auto_cleanup: true,
            ..a.test_request(&vm)
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&e), vec!["test_duration"]);
    assert!(e.message().contains("30days"), "{}", e.message());
    let e = fo
        .check_readiness(pb::CheckReadinessRequest {
            vm_id: "4205ffff-no-such-vm".into(),
            job_type: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!((e.code(), reason(&e)), (Code::NotFound, "VM_NOT_FOUND".to_string()));
    let e = fo
        .watch_failover(pb::WatchFailoverRequest {
            job_id: tern::domain::RunId::new().to_string(),
            after_sequence: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

async fn duplicate_request_id_returns_the_same_job(db: TestDb) {
    let a = api(&db).await;
    let vm = a.vm("linux");
    let req = pb::StartTestFailoverRequest {
        request_id: "req-42".into(),
        ..a.test_request(&vm)
    };
    let (mut c1, mut c2) = (a.fo.clone(), a.fo.clone());
    let (x, y) = tokio::join!(c1.start_test_failover(req.clone()), c2.start_test_failover(req.clone()));
    let (x, y) = (x.unwrap().into_inner(), y.unwrap().into_inner());
    assert_eq!(x.job_id, y.job_id);
    assert_eq!(
        [x.created, y.created].iter().filter(|c| **c).count(),
        1,
        "one of them created it"
    );
    let again = a.fo.clone().start_test_failover(req).await.unwrap().into_inner();
    assert_eq!((again.job_id.as_str(), again.created), (x.job_id.as_str(), false));
    let all =
        a.fo.clone()
            .list_failovers(pb::ListFailoversRequest::default())
            .await
            .unwrap()
            .into_inner();
    assert_eq!(all.jobs.len(), 1, "never a second job");
}

/// ALREADY_EXISTS REQUEST_ID_REUSED naming `request_id`, the run it made and the fields that
/// differ.
fn assert_reused(e: &tonic::Status, request_id: &str, id_key: &str, id: &str, fields: &str) {
    assert_eq!(
        (e.code(), reason(e).as_str()),
        (Code::AlreadyExists, "REQUEST_ID_REUSED"),
        "{e:?}"
    );
    assert!(e.message().contains(&format!("{request_id:?}")), "{}", e.message());
    let info = e.get_error_details().error_info().cloned().expect("error info");
    assert_eq!(info.metadata.get("request_id").map(String::as_str), Some(request_id));
    assert_eq!(info.metadata.get(id_key).map(String::as_str), Some(id));
    assert_eq!(info.metadata.get("fields").map(String::as_str), Some(fields), "{e:?}");
}

/// A request id names one request. Used again with other parameters (another VM, another
/// option, the other kind of failover, another definition or input) it is ALREADY_EXISTS and
/// nothing is created, also when the two requests race; with the same parameters it is the same
/// job or run.
async fn reused_request_id_with_other_parameters_is_already_exists(db: TestDb) {
    let a = api(&db).await;
    let (vm, windows, db_vm) = (a.vm("linux"), a.vm("windows"), a.inv.vms[2].clone());
    assert!(vm.vm_id != db_vm.vm_id && db_vm.os_type == "linux");
    let first = pb::StartTestFailoverRequest {
        request_id: "req-7".into(),
        test_duration: "1h".into(),
        ..a.test_request(&vm)
    };
    let job =
        a.fo.clone()
            .start_test_failover(first.clone())
            .await
            .unwrap()
            .into_inner();
    assert!(job.created);
    // vm_name left out the first time records the inventory's name: giving it is the same request.
    let same =
        a.fo.clone()
            .start_test_failover(pb::StartTestFailoverRequest {
                vm_name: vm.name.clone(),
                ..first.clone()
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!((same.job_id.as_str(), same.created), (job.job_id.as_str(), false));
    let mappings = std::collections::HashMap::from([("VM Network".to_string(), "net-9".to_string())]);
    let others = [
        (
            pb::StartTestFailoverRequest {
                vm_id: windows.vm_id.clone(),
                ..first.clone()
            },
            "vm_id",
        ),
        (
            pb::StartTestFailoverRequest {
                skip_snapshot: true,
                ..first.clone()
            },
            "skip_snapshot",
        ),
        (
            pb::StartTestFailoverRequest {
                auto_cleanup: true,
                test_duration: "2h".into(),
                ..first.clone()
            },
            "auto_cleanup,test_duration",
        ),
        (
            pb::StartTestFailoverRequest {
                network_mappings: mappings,
                ..first.clone()
            },
            "network_mappings",
        ),
        (
            pb::StartTestFailoverRequest {
                vm_name: "renamed".into(),
                ..first.clone()
            },
            "vm_name",
        ),
    ];
    for (req, fields) in others {
        let e = a.fo.clone().start_test_failover(req).await.unwrap_err();
        assert_reused(&e, "req-7", "job_id", &job.job_id, fields);
    }
    let e =
        a.fo.clone()
            .start_live_failover(pb::StartLiveFailoverRequest {
                vm_id: vm.vm_id.clone(),
                request_id: "req-7".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
    assert_reused(
        &e,
        "req-7",
        "job_id",
        &job.job_id,
        "definition,auto_cleanup,job_type,test_duration",
    );
    let e =
        a.wf.clone()
            .submit_workflow(pb::SubmitWorkflowRequest {
                definition: "test-failover".into(),
                input_json: r#"{"vm_id": "other"}"#.into(),
                request_id: "req-7".into(),
            })
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let jobs =
        a.fo.clone()
            .list_failovers(pb::ListFailoversRequest::default())
            .await
            .unwrap()
            .into_inner()
            .jobs;
    assert_eq!(jobs.len(), 1, "never a second job");

    // Two different requests racing with one request id: one job, and ALREADY_EXISTS.
    let (mut c1, mut c2) = (a.fo.clone(), a.fo.clone());
    let race = |vm: &VmRecord| pb::StartTestFailoverRequest {
        request_id: "req-8".into(),
        ..a.test_request(vm)
    };
    let (x, y) = tokio::join!(
        c1.start_test_failover(race(&windows)),
        c2.start_test_failover(race(&db_vm))
    );
    let (won, lost) = match (x, y) {
        (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w.into_inner(), l),
        other => panic!("one start must win and the other be refused: {other:?}"),
    };
    assert!(won.created);
    assert_reused(&lost, "req-8", "job_id", &won.job_id, "vm_id");

    // SubmitWorkflow: the same definition and input (as JSON, not as text) is the same run.
    let mut wf = a.wf.clone();
    let submit = |definition: &str, input: &str| pb::SubmitWorkflowRequest {
        definition: definition.into(),
        input_json: input.into(),
        request_id: "wf-7".into(),
    };
    let run = wf
        .submit_workflow(submit("noop-6", r#"{"n":1}"#))
        .await
        .unwrap()
        .into_inner();
    assert!(run.created);
    let again = wf
        .submit_workflow(submit("noop-6", r#" { "n" : 1 } "#))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.run_id.as_str(), again.created), (run.run_id.as_str(), false));
    let e = wf.submit_workflow(submit("noop-6", r#"{"n":2}"#)).await.unwrap_err();
    assert_reused(&e, "wf-7", "run_id", &run.run_id, "n");
    let e = wf.submit_workflow(submit("noop-6", "")).await.unwrap_err();
    assert_reused(&e, "wf-7", "run_id", &run.run_id, "n");
    let e = wf
        .submit_workflow(submit("crash-saga", r#"{"n":1}"#))
        .await
        .unwrap_err();
    assert_reused(&e, "wf-7", "run_id", &run.run_id, "definition");
}

/// Two concurrent starts on one VM (different request ids): the database lets exactly one win.
async fn second_active_failover_on_a_vm_is_vm_busy(db: TestDb) {
    let a = api(&db).await;
    let vm = a.vm("linux");
    for round in 0..3 {
        let (mut c1, mut c2) = (a.fo.clone(), a.fo.clone());
        let (x, y) = tokio::join!(
            c1.start_test_failover(a.test_request(&vm)),
            c2.start_live_failover(pb::StartLiveFailoverRequest {
                vm_id: vm.vm_id.clone(),
                ..Default::default()
            })
        );
        let (won, lost) = match (x, y) {
            (Ok(j), Err(e)) => (j.into_inner(), e),
            (Err(e), Ok(j)) => (j.into_inner(), e),
            other => panic!("round {round}: exactly one must win: {other:?}"),
        };
        assert_eq!(lost.code(), Code::FailedPrecondition, "{lost:?}");
        assert_eq!(reason(&lost), "VM_BUSY");
        assert!(lost.message().contains(&won.job_id), "{}", lost.message());
        // Finishing the winner frees the VM.
        a.fo.clone()
            .cancel_failover(pb::CancelFailoverRequest {
                job_id: won.job_id.clone(),
                reason: "test".into(),
            })
            .await
            .unwrap();
        let done = a.terminal(&won.job_id).await;
        assert_eq!(done.run_status, "cancelled", "{done:?}");
        assert_eq!(done.error.map(|e| e.code), Some("CANCELLED".to_string()));
    }
    // Another VM is not affected by a busy one.
    let other = a.vm("windows");
    let j1 =
        a.fo.clone()
            .start_test_failover(a.test_request(&vm))
            .await
            .unwrap()
            .into_inner();
    let j2 =
        a.fo.clone()
            .start_test_failover(a.test_request(&other))
            .await
            .unwrap()
            .into_inner();
    assert_ne!(j1.job_id, j2.job_id);

    // ListFailovers pages: newest first, no overlap, all five jobs.
    let mut seen: Vec<String> = Vec::new();
    let mut token = String::new();
    loop {
        let page =
            a.fo.clone()
                .list_failovers(pb::ListFailoversRequest {
                    page_size: 2,
                    page_token: token.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
        assert!(page.jobs.len() <= 2);
        seen.extend(page.jobs.into_iter().map(|j| j.job_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0] > w[1]), "newest first: {seen:?}");
    assert_eq!(seen[0], j2.job_id);
}

async fn end_and_cancel_are_idempotent_and_refused_once_finished(db: TestDb) {
    let a = api(&db).await;
    let vm = a.vm("linux");
    let mut fo = a.fo.clone();
    let job = fo.start_test_failover(a.test_request(&vm)).await.unwrap().into_inner();
    let held = a.until(&job.job_id, "testing", |j| j.status == "testing").await;
    assert!(held.cleanup_at.is_none(), "no auto-cleanup asked for");
    let end = || pb::EndTestFailoverRequest {
        job_id: job.job_id.clone(),
    };
    fo.end_test_failover(end()).await.unwrap();
    fo.end_test_failover(end()).await.unwrap();
    let done = a.terminal(&job.job_id).await;
    assert_eq!(done.run_status, "completed");
    let e = fo.end_test_failover(end()).await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e)),
        (Code::FailedPrecondition, "JOB_FINISHED".to_string())
    );
    let e = fo
        .cancel_failover(pb::CancelFailoverRequest {
            job_id: job.job_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e)),
        (Code::FailedPrecondition, "JOB_FINISHED".to_string())
    );

    // Cancel in the hold rolls back; twice is the same as once.
    let job = fo.start_test_failover(a.test_request(&vm)).await.unwrap().into_inner();
    a.until(&job.job_id, "testing", |j| j.status == "testing").await;
    let cancel = pb::CancelFailoverRequest {
        job_id: job.job_id.clone(),
        reason: "change window closed".into(),
    };
    fo.cancel_failover(cancel.clone()).await.unwrap();
    fo.cancel_failover(cancel).await.unwrap();
    let done = a.terminal(&job.job_id).await;
    assert_eq!(done.run_status, "cancelled");
    assert!(done
        .steps
        .iter()
        .any(|s| s.phase == "rollback" && s.status == "completed"));
    // A live failover has no test to end.
    let live = fo
        .start_live_failover(pb::StartLiveFailoverRequest {
            vm_id: vm.vm_id.clone(),
            skip_validation: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let e = fo
        .end_test_failover(pb::EndTestFailoverRequest {
            job_id: live.job_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "NOT_A_TEST_FAILOVER");
    a.terminal(&live.job_id).await;
}

/// A step failing in CloudStack shows in the job: retrying with its error code, cancellable in
/// its backoff, and as the job's error once it fails for good.
async fn step_failures_show_in_the_job_and_cancel_works_while_retrying(db: TestDb) {
    let deploy_fails = r#"{"commands": {"deployVirtualMachine": {"error_rate": 1.0}}}"#;
    let a = api_with(&db, Some(deploy_fails), SLOW_RETRY).await;
    let vm = a.vm("linux");
    let mut fo = a.fo.clone();
    let job = fo.start_test_failover(a.test_request(&vm)).await.unwrap().into_inner();
    let retrying = a
        .until(&job.job_id, "a retrying step", |j| {
            j.steps.iter().any(|s| s.status == "retrying" && s.attempt >= 2)
        })
        .await;
    let step = retrying.steps.iter().find(|s| s.status == "retrying").unwrap();
    assert_eq!(step.name, "test-vm-creation");
    assert_eq!(step.error.as_ref().map(|e| e.code.as_str()), Some("VM_CREATE_FAILED"));
    assert_eq!(retrying.status, "creating_vm");
    fo.cancel_failover(pb::CancelFailoverRequest {
        job_id: job.job_id.clone(),
        reason: "gave up".into(),
    })
    .await
    .unwrap();
    let done = a.terminal(&job.job_id).await;
    assert_eq!(done.run_status, "cancelled", "{done:?}");
    assert_eq!(
        done.error.as_ref().map(|e| (e.code.as_str(), e.message.as_str())),
        Some(("CANCELLED", "gave up"))
    );
    assert!(done
        .steps
        .iter()
        .any(|s| s.phase == "rollback" && s.name == "snapshot" && s.status == "completed"));
    drop(a);

    let a = api_with(&db, Some(deploy_fails), FAST_RETRY).await;
    let job =
        a.fo.clone()
            .start_test_failover(a.test_request(&vm))
            .await
            .unwrap()
            .into_inner();
    let done = a.terminal(&job.job_id).await;
    assert_eq!(done.run_status, "failed");
    assert_eq!(done.error.as_ref().map(|e| e.code.as_str()), Some("VM_CREATE_FAILED"));
    let failed = done.steps.iter().find(|s| s.status == "failed").unwrap();
    assert_eq!((failed.name.as_str(), failed.attempt), ("test-vm-creation", 3));
}

/// Read some events, drop the stream, resume from the last sequence seen: the two parts are
/// the whole journal, with no gap and no duplicate.
async fn watch_resumes_without_gaps_or_duplicates(db: TestDb) {
    let a = api(&db).await;
    let vm = a.vm("linux");
    let job =
        a.fo.clone()
            .start_test_failover(pb::StartTestFailoverRequest {
                auto_cleanup: true,
                test_duration: "1s".into(),
                ..a.test_request(&vm)
            })
            .await
            .unwrap()
            .into_inner();
    let (first, t) = a.watch(&job.job_id, 0, 5).await;
    assert!(t.is_none());
    assert_eq!(first.len(), 5);
    let last = first.last().unwrap().sequence;
    tokio::time::sleep(Duration::from_millis(300)).await; // the run moves on while disconnected
    let (rest, t) = a.watch(&job.job_id, last, usize::MAX).await;
    let t = t.expect("terminal");
    let seqs: Vec<i64> = first.iter().chain(rest.iter()).map(|e| e.sequence).collect();
    assert_eq!(seqs, (1..=t.last_sequence).collect::<Vec<_>>());
    let run: tern::domain::RunId = job.job_id.parse().unwrap();
    let journal = a.store.journal(run, 0, 10_000).await.unwrap();
    let kinds: Vec<&str> = journal.iter().map(|e| e.record.kind()).collect();
    let watched: Vec<&str> = first.iter().chain(rest.iter()).map(|e| e.kind.as_str()).collect();
    assert_eq!(watched, kinds);
    // Resuming after the end gives just the terminal event.
    let (none, t2) = a.watch(&job.job_id, t.last_sequence, usize::MAX).await;
    assert!(none.is_empty());
    assert_eq!(t2.unwrap().status, "completed");
}

async fn readiness_and_inventory_rpcs(db: TestDb) {
    let a = api(&db).await;
    let vm = a.vm("linux");
    let mut fo = a.fo.clone();
    let r = fo
        .check_readiness(pb::CheckReadinessRequest {
            vm_id: vm.vm_id.clone(),
            job_type: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.is_ready, "{r:?}");
    assert!(r
        .checks
        .iter()
        .any(|c| c.check_name == "Active Jobs" && c.status == "pass"));
    // The library function the RPC uses, directly.
    let direct = tern::steps::failover::readiness_for(&a.deps, &vm.vm_id, NetworkKind::Test)
        .await
        .unwrap();
    assert_eq!(direct.readiness_score, r.readiness_score);
    let missing = tern::steps::failover::readiness_for(&a.deps, "no-such-vm", NetworkKind::Test)
        .await
        .unwrap();
    assert!(!missing.is_ready && missing.readiness_score == 0.0);
    let e = fo
        .check_readiness(pb::CheckReadinessRequest {
            vm_id: vm.vm_id.clone(),
            job_type: "sideways".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&e), vec!["job_type"]);

    // An unfinished failover makes the VM not ready.
    let job = fo.start_test_failover(a.test_request(&vm)).await.unwrap().into_inner();
    let busy = fo
        .check_readiness(pb::CheckReadinessRequest {
            vm_id: vm.vm_id.clone(),
            job_type: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!busy.is_ready);
    fo.cancel_failover(pb::CancelFailoverRequest {
        job_id: job.job_id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();

    // Inventory.
    let mut new_vm = pb::Vm {
        vm_id: "4205aaaa-0000-0000-0000-000000000001".into(),
        name: "api-vm".into(),
        cpu_count: 0,
        memory_mb: 2048,
        os_type: "linux".into(),
        nics: vec![pb::Nic {
            source_network: "VM Network".into(),
            mac: String::new(),
            ip_address: String::new(),
        }],
        volume_id: "vol-api".into(),
        oma_vm_id: "oma-api".into(),
        last_sync_change_id: String::new(),
        disks: vec![],
    };
    let e = fo
        .upsert_vm(pb::UpsertVmRequest {
            vm: Some(new_vm.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&e), vec!["vm.cpu_count"]);
    new_vm.cpu_count = 2;
    // A client from before disks names one volume: it is the boot disk.
    let saved = fo
        .upsert_vm(pb::UpsertVmRequest {
            vm: Some(new_vm.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    let disk = |id: &str, boot: bool, unit: u32| pb::Disk {
        volume_id: id.into(),
        size_bytes: 10 << 30,
        boot,
        unit_number: unit,
    };
    assert_eq!(
        saved.disks,
        vec![pb::Disk {
            size_bytes: 0,
            ..disk("vol-api", true, 0)
        }]
    );
    // Every disk and NIC, the boot disk first and data disks by unit number in replies.
    new_vm.disks = vec![
        disk("vol-api-d2", false, 2),
        disk("vol-api", true, 0),
        disk("vol-api-d1", false, 1),
    ];
    new_vm.nics.push(pb::Nic {
        source_network: "Backup".into(),
        mac: "00:50:56:aa:bb:cc".into(),
        ip_address: "10.0.9.7".into(),
    });
    let saved = fo
        .upsert_vm(pb::UpsertVmRequest {
            vm: Some(new_vm.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    new_vm.disks = vec![
        disk("vol-api", true, 0),
        disk("vol-api-d1", false, 1),
        disk("vol-api-d2", false, 2),
    ];
    assert_eq!(saved, new_vm);
    for (bad, field) in [
        (
            pb::Vm {
                volume_id: "vol-other".into(),
                ..new_vm.clone()
            },
            "vm.volume_id",
        ),
        (
            pb::Vm {
                disks: vec![disk("a", true, 0), disk("b", true, 1)],
                volume_id: String::new(),
                ..new_vm.clone()
            },
            "vm.disks[1].boot",
        ),
        (
            pb::Vm {
                disks: vec![disk("a", true, 0), disk("a", false, 1)],
                volume_id: String::new(),
                ..new_vm.clone()
            },
            "vm.disks[1].volume_id",
        ),
        (
            pb::Vm {
                vm_id: "4205aaaa-0000-0000-0000-000000000002".into(),
                disks: vec![disk("vol-api-d1", true, 0)],
                volume_id: String::new(),
                ..new_vm.clone()
            },
            "vm.disks[0].volume_id",
        ),
    ] {
        let e = fo.upsert_vm(pb::UpsertVmRequest { vm: Some(bad) }).await.unwrap_err();
        assert_eq!(bad_fields(&e), vec![field], "{e:?}");
    }
    let got = fo
        .get_vm(pb::GetVmRequest {
            vm_id: new_vm.vm_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, new_vm);
    let all = fo.list_vms(pb::ListVmsRequest::default()).await.unwrap().into_inner();
    assert_eq!(all.vms.len(), a.inv.vms.len() + 1);
    let e = fo.get_vm(pb::GetVmRequest { vm_id: "nope".into() }).await.unwrap_err();
    assert_eq!((e.code(), reason(&e)), (Code::NotFound, "VM_NOT_FOUND".to_string()));

    let set = fo
        .set_network_mappings(pb::SetNetworkMappingsRequest {
            vm_id: new_vm.vm_id.clone(),
            kind: "test".into(),
            mappings: vec![pb::NetworkMapping {
                source_network: "VM Network".into(),
                destination_network_id: "net-test-1".into(),
                kind: String::new(),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.mappings.len(), 1);
    assert_eq!(set.mappings[0].kind, "test");
    let got = fo
        .get_network_mappings(pb::GetNetworkMappingsRequest {
            vm_id: new_vm.vm_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, set);
    let e = fo
        .set_network_mappings(pb::SetNetworkMappingsRequest {
            vm_id: new_vm.vm_id.clone(),
            kind: "bogus".into(),
            mappings: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&e), vec!["kind"]);
    a.terminal(&job.job_id).await;
}

// ---- WorkflowService ----

async fn workflow_service_runs_any_definition(db: TestDb) {
    let a = api(&db).await;
    let mut wf = a.wf.clone();
    let defs = wf
        .list_definitions(pb::ListDefinitionsRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = defs.definitions.iter().map(|d| d.name.as_str()).collect();
    for n in ["noop-6", "crash-saga", "test-failover", "live-failover"] {
        assert!(names.contains(&n), "{names:?}");
    }
    let submit = pb::SubmitWorkflowRequest {
        definition: "noop-6".into(),
        input_json: String::new(),
        request_id: "noop-req".into(),
    };
    let resp = wf.submit_workflow(submit.clone()).await.unwrap();
    let corr = correlation(resp.metadata());
    let run = resp.into_inner();
    assert!(run.created);
    assert_eq!(run.correlation_id, corr);
    let again = wf.submit_workflow(submit).await.unwrap().into_inner();
    assert_eq!((again.run_id.as_str(), again.created), (run.run_id.as_str(), false));

    let mut stream = wf
        .watch_workflow(pb::WatchWorkflowRequest {
            run_id: run.run_id.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seqs = Vec::new();
    let terminal = loop {
        match stream.message().await.unwrap().expect("terminal event").event.unwrap() {
            Event::Entry(e) => seqs.push(e.sequence),
            Event::Terminal(t) => break t,
        }
    };
    assert_eq!(terminal.status, "completed");
    assert_eq!(seqs, (1..=terminal.last_sequence).collect::<Vec<_>>());
    let got = wf
        .get_workflow(pb::GetWorkflowRequest {
            run_id: run.run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.status, "completed");
    assert_eq!(got.steps.len(), 6);
    assert!(got.steps.iter().all(|s| s.status == "completed"));

    // Signal and cancel a run waiting in its hold.
    let held = wf
        .submit_workflow(pb::SubmitWorkflowRequest {
            definition: "crash-saga".into(),
            // The teardown's first step takes a while, so the run is still busy at the second signal.
            input_json: r#"{"hold": "1h", "test": {"sleep_ms": {"stop": 1000}}}"#.into(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let sig = pb::SignalWorkflowRequest {
        run_id: held.run_id.clone(),
        name: "end-test".into(),
    };
    assert_eq!(
        wf.signal_workflow(sig.clone()).await.unwrap().into_inner().outcome,
        "accepted"
    );
    assert_eq!(
        wf.signal_workflow(sig.clone()).await.unwrap().into_inner().outcome,
        "duplicate"
    );
    let id: tern::domain::RunId = held.run_id.parse().unwrap();
    for _ in 0..500 {
        if a.store.get_run(id).await.unwrap().unwrap().status.is_terminal() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = wf.signal_workflow(sig).await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e)),
        (Code::FailedPrecondition, "RUN_FINISHED".to_string())
    );
    let to_cancel = wf
        .submit_workflow(pb::SubmitWorkflowRequest {
            definition: "crash-saga".into(),
            // attach and its undo take a while, so the run is still busy at the second cancel.
            input_json: r#"{"hold": "1h", "test": {"sleep_ms": {"attach": 1000}}}"#.into(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    // Cancel while attach runs: its undo keeps the run busy past the second cancel.
    for _ in 0..500 {
        let now = wf
            .get_workflow(pb::GetWorkflowRequest {
                run_id: to_cancel.run_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if now.current_step == "attach" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let c = pb::CancelWorkflowRequest {
        run_id: to_cancel.run_id.clone(),
        reason: "no".into(),
    };
    assert_eq!(
        wf.cancel_workflow(c.clone()).await.unwrap().into_inner().outcome,
        "accepted"
    );
    assert_eq!(wf.cancel_workflow(c).await.unwrap().into_inner().outcome, "duplicate");

    // Pagination: newest first, keyset on the run id, no overlap.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = wf
            .list_workflows(pb::ListWorkflowsRequest {
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.workflows.iter().map(|w| w.run_id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        seen,
        vec![to_cancel.run_id.clone(), held.run_id.clone(), run.run_id.clone()]
    );
    let filtered = wf
        .list_workflows(pb::ListWorkflowsRequest {
            definition: "noop-6".into(),
            status: "completed".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(filtered.workflows.len(), 1);

    // Errors.
    let e = wf
        .submit_workflow(pb::SubmitWorkflowRequest {
            definition: "no-such".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e)),
        (Code::NotFound, "UNKNOWN_DEFINITION".to_string())
    );
    let e = wf
        .submit_workflow(pb::SubmitWorkflowRequest {
            definition: "noop-6".into(),
            input_json: "{not json".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&e), vec!["input_json"]);
    let e = wf
        .submit_workflow(pb::SubmitWorkflowRequest {
            definition: "crash-saga".into(),
            input_json: r#"{"hold": "whenever"}"#.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), bad_fields(&e)),
        (Code::InvalidArgument, vec!["input_json.hold".to_string()])
    );
    let e = wf
        .list_workflows(pb::ListWorkflowsRequest {
            status: "sideways".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&e), vec!["status"]);
}

/// A codec that sends its bytes as they are, and reads an answer as bytes.
#[derive(Default)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = prost::bytes::Buf::remaining(buf);
        Ok(Some(prost::bytes::Buf::copy_to_bytes(buf, n).to_vec()))
    }
}

/// A request body that is not the method's message, sent as a well-framed gRPC message: the
/// server answers INVALID_ARGUMENT with the usual details (not tonic's INTERNAL), for unary and
/// streaming methods alike, and creates nothing.
async fn undecodable_requests_are_invalid_argument(db: TestDb) {
    let a = api(&db).await;
    let mut grpc = tonic::client::Grpc::new(a.channel.clone());
    let path = tonic::codegen::http::uri::PathAndQuery::from_static;
    // The raw client works: an empty body is a valid ListDefinitionsRequest.
    grpc.ready().await.unwrap();
    let defs = grpc
        .unary(
            tonic::Request::new(Vec::new()),
            path("/tern.v1.WorkflowService/ListDefinitions"),
            Raw,
        )
        .await
        .unwrap()
        .into_inner();
    assert!(!defs.is_empty());
    let cases: [(&str, &[u8], &str); 3] = [
        // Field 1 (vm_id): a string whose two bytes are not UTF-8.
        (
            "/tern.v1.FailoverService/StartTestFailover",
            &[0x0a, 0x02, 0xff, 0xfe],
            "StartTestFailoverRequest",
        ),
        // A field key that is not a varint.
        (
            "/tern.v1.WorkflowService/SubmitWorkflow",
            &[0xff; 11],
            "SubmitWorkflowRequest",
        ),
        // Wire type 7, which does not exist (a server-streaming method).
        (
            "/tern.v1.WorkflowService/WatchWorkflow",
            &[0x0f],
            "WatchWorkflowRequest",
        ),
    ];
    for (method, body, message) in cases {
        grpc.ready().await.unwrap();
        let request = tonic::Request::new(body.to_vec());
        let e = if method.contains("/Watch") {
            match grpc.server_streaming(request, path(method), Raw).await {
                Ok(r) => r.into_inner().message().await.expect_err("no event for garbage"),
                Err(e) => e,
            }
        } else {
            grpc.unary(request, path(method), Raw)
                .await
                .expect_err("garbage accepted")
        };
        assert_eq!(
            (e.code(), reason(&e).as_str()),
            (Code::InvalidArgument, "INVALID_ARGUMENT"),
            "{method}: {e:?}"
        );
        assert_eq!(bad_fields(&e), ["request"], "{method}");
        assert!(
            e.message().contains(&format!("tern.v1.{message}")),
            "{method}: {}",
            e.message()
        );
        assert!(!correlation(e.metadata()).is_empty(), "{method}");
    }
    let runs =
        a.wf.clone()
            .list_workflows(pb::ListWorkflowsRequest::default())
            .await
            .unwrap()
            .into_inner();
    assert!(runs.workflows.is_empty(), "{runs:?}");
}

async fn health_and_reflection_are_served(db: TestDb) {
    let a = api(&db).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(a.channel.clone());
    for service in ["", "tern.v1.FailoverService", "tern.v1.WorkflowService"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut refl = ServerReflectionClient::new(a.channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(futures::stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer {resp:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for n in [
        "tern.v1.FailoverService",
        "tern.v1.WorkflowService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|x| x == n), "{names:?}");
    }
    // What grpcurl does next: the file defining a service, then each import by name.
    let ask = |m: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let reqs = vec![
        ask(MessageRequest::FileContainingSymbol("tern.v1.FailoverService".into())),
        ask(MessageRequest::FileByFilename("google/protobuf/timestamp.proto".into())),
        ask(MessageRequest::FileByFilename("tern/v1/common.proto".into())),
    ];
    let mut stream = refl
        .server_reflection_info(futures::stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        let resp = stream.message().await.unwrap().unwrap();
        match resp.message_response {
            Some(MessageResponse::FileDescriptorResponse(f)) => assert!(!f.file_descriptor_proto.is_empty()),
            other => panic!("reflection could not resolve a file: {other:?}"),
        }
    }
}

/// The terminal event a watcher gets as this process commits the end (from memory) is the one
/// a watcher gets from the stored row afterwards, for a failed run and a cancelled one.
async fn watch_terminal_event_matches_the_stored_run(db: TestDb) {
    let a = api(&db).await;
    let mut wf = a.wf.clone();
    let watch_all = |run_id: String, mut wf: WorkflowServiceClient<tonic::transport::Channel>| async move {
        let mut stream = wf
            .watch_workflow(pb::WatchWorkflowRequest {
                run_id,
                after_sequence: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let mut seqs = Vec::new();
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(60), stream.message())
                .await
                .expect("watch stalled")
                .unwrap()
                .expect("a terminal event");
            match ev.event.unwrap() {
                Event::Entry(e) => seqs.push(e.sequence),
                Event::Terminal(t) => break (seqs, t),
            }
        }
    };
    let cases = [
        // attach fails for good (after a while, so the watch is there before the end): the run
        // rolls back and ends failed, with attach's error.
        (
            r#"{"test": {"sleep_ms": {"attach": 300}, "fail": {"attach": {"times": 99, "class": "permanent"}}}}"#,
            false,
            "failed",
        ),
        // cancelled while attach runs.
        (
            r#"{"hold": "1h", "test": {"sleep_ms": {"attach": 500}}}"#,
            true,
            "cancelled",
        ),
    ];
    for (input, cancel, status) in cases {
        let run = wf
            .submit_workflow(pb::SubmitWorkflowRequest {
                definition: "crash-saga".into(),
                input_json: input.into(),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let live = tokio::spawn(watch_all(run.run_id.clone(), wf.clone()));
        if cancel {
            let id: tern::domain::RunId = run.run_id.parse().unwrap();
            for _ in 0..500 {
                if a.store.get_run(id).await.unwrap().unwrap().current_step.as_deref() == Some("attach") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            wf.cancel_workflow(pb::CancelWorkflowRequest {
                run_id: run.run_id.clone(),
                reason: "operator said no".into(),
            })
            .await
            .unwrap();
        }
        let (seqs, live_end) = live.await.unwrap();
        assert_eq!(live_end.status, status, "{live_end:?}");
        assert_eq!(seqs, (1..=live_end.last_sequence).collect::<Vec<_>>());
        let error = live_end.error.clone().expect("an error on a failed or cancelled run");
        assert!(!error.code.is_empty() && !error.message.is_empty(), "{error:?}");
        // Watched again after the end: from the row, the same event.
        let (again, stored_end) = watch_all(run.run_id.clone(), wf.clone()).await;
        assert_eq!(again, seqs);
        assert_eq!(stored_end, live_end);
        let got = wf
            .get_workflow(pb::GetWorkflowRequest {
                run_id: run.run_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (got.status.as_str(), got.error.as_ref(), got.last_sequence),
            (status, Some(&error), live_end.last_sequence)
        );
    }
}

on_both_backends!(
    test_failover_with_auto_cleanup_through_the_api,
    second_active_failover_on_a_vm_is_vm_busy,
    duplicate_request_id_returns_the_same_job,
    reused_request_id_with_other_parameters_is_already_exists,
    watch_resumes_without_gaps_or_duplicates,
    workflow_service_runs_any_definition,
    watch_terminal_event_matches_the_stored_run,
);

use restart::server_killed_mid_failovers_and_restarted;
on_both_backends!(server_killed_mid_failovers_and_restarted);

use resolve::{a_forced_resolve_journals_what_still_differed, needs_operator_keeps_the_vm_until_resolved};
on_both_backends!(needs_operator_keeps_the_vm_until_resolved);
on_sqlite!(a_forced_resolve_journals_what_still_differed);

use pinned::{
    a_job_keeps_the_vm_it_started_with, a_mapping_to_a_missing_network_is_refused_before_anything_is_created,
};
on_both_backends!(a_job_keeps_the_vm_it_started_with);
on_sqlite!(a_mapping_to_a_missing_network_is_refused_before_anything_is_created);

use limits::{hostile_inputs_are_refused_naming_the_field, limits_are_resource_exhausted_naming_the_limit};
on_both_backends!(hostile_inputs_are_refused_naming_the_field);
on_sqlite!(limits_are_resource_exhausted_naming_the_limit);

use security::tls_tokens_and_roles_end_to_end;
on_both_backends!(tls_tokens_and_roles_end_to_end);

use dropped_watches::dropped_watch_streams_never_cost_the_connection;
on_sqlite!(
    bad_requests_are_rejected_with_field_details,
    end_and_cancel_are_idempotent_and_refused_once_finished,
    readiness_and_inventory_rpcs,
    step_failures_show_in_the_job_and_cancel_works_while_retrying,
    health_and_reflection_are_served,
    undecodable_requests_are_invalid_argument,
    dropped_watch_streams_never_cost_the_connection,
);

/// A Python client generated from proto/ with grpcio-tools (installed from PyPI into
/// target/py-venv by tests/e2e/api/python/run.sh) runs a test failover with a 2-second
/// auto-cleanup. `TERN_SKIP_PYTHON=1` skips it (offline machines).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_runs_a_test_failover() {
    if std::env::var("TERN_SKIP_PYTHON").is_ok_and(|v| v == "1") {
        eprintln!("skipping: TERN_SKIP_PYTHON=1");
        return;
    }
    let db = common::sqlite_db();
    let a = api(&db).await;
    let vm = a.vm("linux");
    let endpoint = a.endpoint.trim_start_matches("http://").to_string();
    let text = python_client("python/run.sh", &[&endpoint, &vm.vm_id]).await;
    assert!(text.contains("completed"), "{text}");
}

/// Runs `tests/e2e/api/<script>` with `args` (a script that sets up its own Python venv) and
/// returns what it printed; fails the test if it fails or takes over 10 minutes.
async fn python_client(script: &str, args: &[&str]) -> String {
    let script = format!("{}/tests/e2e/api/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::time::timeout(
        Duration::from_secs(600),
        tokio::process::Command::new("bash")
            .arg(&script)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{script} timed out"))
    .expect("run bash");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "{script} failed:\n{text}");
    text
}

/// The failover commands of the `tern` binary against the server: exit codes, one-line
/// errors, tables and JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_commands_talk_to_the_server() {
    let db = common::sqlite_db();
    let a = api(&db).await;
    let vm = a.vm("linux");
    let tern = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tern"));
        cmd.arg("--endpoint")
            .arg(&a.endpoint)
            .args(args)
            .env("RUST_LOG", "warn");
        async move {
            let out = cmd.output().await.expect("run tern");
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).to_string(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            )
        }
    };
    let (code, out, err) = tern(&["readiness", &vm.vm_id]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("ready (score 100)"), "{out}");
    // A reader that has gone away before the command prints (`| true`): the command ends
    // quietly (SIGPIPE), no panic.
    let piped = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' --endpoint '{}' readiness '{}' --json | true",
            env!("CARGO_BIN_EXE_tern"),
            a.endpoint,
            vm.vm_id
        ))
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{stderr}"
    );

    let (code, out, err) = tern(&[
        "test-failover",
        &vm.vm_id,
        "--duration",
        "1s",
        "--auto-cleanup",
        "--watch",
    ])
    .await;
    assert_eq!(code, Some(0), "{out}{err}");
    let job = out.lines().next().unwrap().trim().to_string();
    assert!(
        out.contains("hold timer fired") && out.contains("finished: completed"),
        "{out}"
    );
    assert!(out.contains("status       completed (completed), 100%"), "{out}");

    let (code, out, _) = tern(&["get", &job, "--json"]).await;
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], "completed");
    assert_eq!(v["steps"].as_array().map(Vec::len), Some(15));

    let (code, out, _) = tern(&["list", "--vm", &vm.vm_id]).await;
    assert_eq!(code, Some(0));
    assert!(out.lines().nth(1).is_some_and(|l| l.starts_with(&job)), "{out}");

    let (code, _, err) = tern(&["end-test", &job]).await;
    assert_eq!(code, Some(1));
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("[JOB_FINISHED]"), "{err}");
    let (code, _, err) = tern(&["test-failover", &vm.vm_id, "--duration", "soon", "--auto-cleanup"]).await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("test_duration") && err.contains("[INVALID_ARGUMENT]"),
        "{err}"
    );
    let (code, _, err) = tern(&["live-failover", "no-such-vm"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("[VM_NOT_FOUND]"), "{err}");

    // More jobs than one page (100): `list --limit` pages through them.
    let mut wf = a.wf.clone();
    for i in 0..120 {
        wf.submit_workflow(pb::SubmitWorkflowRequest {
            definition: "live-failover".into(),
            input_json: format!(r#"{{"vm_id": "paging-{i}"}}"#),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let (code, out, err) = tern(&["list", "--limit", "500", "--json"]).await;
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let jobs = v["jobs"].as_array().unwrap();
    let mut ids: Vec<&str> = jobs.iter().filter_map(|j| j["job_id"].as_str()).collect();
    assert_eq!(ids.len(), 121, "every job, once");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 121);
    assert_eq!(v["next_page_token"], "");
    let (code, out, _) = tern(&["list", "--limit", "110"]).await;
    assert_eq!(code, Some(0));
    assert_eq!(out.lines().count(), 1 + 110 + 1, "header, 110 jobs, the note");
    assert!(out.ends_with("(more jobs: raise --limit)\n"), "{out}");
}

use observability::metrics_count_a_known_workload;
on_both_backends!(metrics_count_a_known_workload);

use traces::a_run_is_one_trace_across_a_kill;
on_both_backends!(a_run_is_one_trace_across_a_kill);
