//! What an operator sees of a running Tern: `/metrics` after a known workload (a failover
//! resumed by a second server after the first was SIGKILLed mid-step, its hold timer, RPCs that
//! fail with known codes), the JSON access log, and gRPC health following the database and the
//! cloud.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use tern::api::pb;
use tern::api::pb::failover_service_client::FailoverServiceClient;
use tern::domain::run::Record;
use tern::domain::RunId;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::common::{self, TestDb};

/// The samples of a Prometheus text exposition: `name{labels}` → value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of the samples of `name` whose labels include every one of `labels`.
fn sum(samples: &HashMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(k, _)| {
            let (n, rest) = k.split_once('{').unwrap_or((k.as_str(), ""));
            n == name && labels.iter().all(|(l, v)| rest.contains(&format!("{l}=\"{v}\"")))
        })
        .map(|(_, v)| v)
        .sum()
}

async fn scrape(port: u16) -> HashMap<String, f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("scrape /metrics")
        .text()
        .await
        .unwrap();
    samples(&text)
}

pub(super) async fn metrics_count_a_known_workload(db: TestDb) {
    // The first deployVirtualMachine hangs: the first server is SIGKILLed with that step in
    // flight; the second takes the run over.
    let faults = serde_json::json!({"hang_ms": 120000, "scripted": {"deployVirtualMachine": {"0": "hang"}}});
    let sim = common::start_sim(11, Some(faults), "k", "s", 20).await;
    let store = common::store_with_inventory(&db, &sim).await;
    let defs = super::fast_definitions();
    let logs = tempfile::tempdir().unwrap();

    let first_port = common::free_port();
    let mut first = common::server_process(
        &db.url,
        &sim,
        defs.path(),
        first_port,
        &logs.path().join("first.log"),
        &[],
        &[("TERN_REQUEST_TIMEOUT", "60s")],
    );
    let vm = &sim.inventory.vms[1];
    let job = FailoverServiceClient::new(common::channel(first_port).await)
        .start_test_failover(pb::StartTestFailoverRequest {
            vm_id: vm.vm_id.clone(),
            test_duration: "1s".into(),
            auto_cleanup: true,
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner()
        .job_id;
    common::until_hung(&sim).await;
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let run: RunId = job.parse().unwrap();
    let before = store.get_run(run).await.unwrap().unwrap();
    assert!(!before.status.is_terminal(), "{:?}", before.status);

    // The second takes the run over once the dead one's lease runs out.
    let port = common::free_port();
    let metrics_port = common::free_port();
    let log = logs.path().join("second.log");
    let _second = common::server_process(
        &db.url,
        &sim,
        defs.path(),
        port,
        &log,
        &["--metrics-listen", &format!("127.0.0.1:{metrics_port}")],
        &[("TERN_LOG_FORMAT", "json")],
    );
    let mut fo = FailoverServiceClient::new(common::channel(port).await);
    let mut finished = None;
    for _ in 0..600 {
        let j = fo
            .get_failover(pb::GetFailoverRequest { job_id: job.clone() })
            .await
            .unwrap()
            .into_inner();
        if j.status == "completed" || j.status == "failed" || j.status == "needs_operator" {
            finished = Some(j.status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        finished.as_deref(),
        Some("completed"),
        "{}",
        common::logs_in(logs.path())
    );

    // RPCs with known codes, one with the client's correlation id.
    let unknown = uuid::Uuid::now_v7().to_string();
    for _ in 0..2 {
        let e = fo
            .get_failover(pb::GetFailoverRequest {
                job_id: unknown.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    }
    let mut bad = tonic::Request::new(pb::StartTestFailoverRequest::default());
    bad.metadata_mut()
        .insert("x-correlation-id", "obs-corr-7f3a".parse().unwrap());
    let e = fo.start_test_failover(bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let m = scrape(metrics_port).await;
    let rpc = |method: &str, code: &str| {
        sum(
            &m,
            "tern_rpc_requests_total",
            &[("method", &format!("tern.v1.FailoverService/{method}")), ("code", code)],
        )
    };
    assert_eq!(rpc("GetFailover", "NOT_FOUND"), 2.0);
    assert_eq!(rpc("StartTestFailover", "INVALID_ARGUMENT"), 1.0);
    assert!(rpc("GetFailover", "OK") >= 1.0);
    assert_eq!(
        sum(&m, "tern_rpc_duration_seconds_count", &[("code", "NOT_FOUND")]),
        2.0
    );
    let takeovers = sum(&m, "tern_lease_takeovers_total", &[("definition", "test-failover")]);
    assert_eq!(takeovers, 1.0, "the dead server's run, taken over once");
    assert_eq!(sum(&m, "tern_timer_lateness_seconds_count", &[("kind", "hold")]), 1.0);
    // Every step this server saw through is one succeeded attempt.
    let journal = store.journal(run, before.last_seq, 10_000).await.unwrap();
    let succeeded = journal
        .iter()
        .filter(|e| matches!(e.record, Record::StepSucceeded { .. }))
        .count();
    assert!(succeeded >= 10, "{succeeded}");
    assert_eq!(
        sum(
            &m,
            "tern_step_attempts_total",
            &[("definition", "test-failover"), ("outcome", "succeeded")]
        ),
        succeeded as f64
    );
    assert_eq!(
        sum(
            &m,
            "tern_step_attempts_total",
            &[
                ("step", "delete-snapshot"),
                ("phase", "teardown"),
                ("outcome", "succeeded")
            ]
        ),
        1.0
    );
    assert_eq!(
        sum(
            &m,
            "tern_cloud_requests_total",
            &[
                ("provider", "cloudstack"),
                ("command", "deployVirtualMachine"),
                ("outcome", "ok")
            ]
        ),
        1.0
    );
    assert!(sum(&m, "tern_cloud_requests_total", &[("command", "queryAsyncJobResult")]) >= 1.0);
    assert!(sum(&m, "tern_store_commit_batch_size_count", &[]) >= 1.0);
    // The store's figures, read at the scrape.
    assert_eq!(
        sum(
            &m,
            "tern_runs",
            &[("definition", "test-failover"), ("status", "completed")]
        ),
        1.0
    );
    assert_eq!(sum(&m, "tern_runs_due", &[]), 0.0);
    assert_eq!(sum(&m, "tern_failover_jobs_needs_operator", &[]), 0.0);
    assert_eq!(sum(&m, "tern_store_up", &[]), 1.0);
    assert_eq!(sum(&m, "tern_fenced_writes_total", &[]), 0.0);

    // The access log: one JSON line per call, with the client's correlation id.
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "tern::access")
        .collect();
    let refused = lines
        .iter()
        .find(|v| v["fields"]["correlation_id"] == "obs-corr-7f3a")
        .unwrap_or_else(|| panic!("no access line with the correlation id:\n{text}"));
    assert_eq!(refused["fields"]["method"], "tern.v1.FailoverService/StartTestFailover");
    assert_eq!(refused["fields"]["code"], "INVALID_ARGUMENT");
    assert!(refused["fields"]["duration_ms"].as_f64().is_some(), "{refused}");
    let not_found = lines.iter().filter(|v| v["fields"]["code"] == "NOT_FOUND").count();
    assert_eq!(not_found, 2, "{text}");
}

async fn status_of(health: &mut HealthClient<Channel>, service: &str) -> Option<ServingStatus> {
    let r = health
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(r.into_inner().status).ok()
}

/// Waits until `service` reports `want` (the probe asks every five seconds).
async fn until_status(health: &mut HealthClient<Channel>, service: &str, want: ServingStatus, logs: &Path) {
    for _ in 0..300 {
        if status_of(health, service).await == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{service:?} never became {want:?} (is {:?})\n{}",
        status_of(health, service).await,
        common::logs_in(logs)
    );
}

/// Health on a PostgreSQL server of the test's own, stopped and started under a running Tern:
/// NOT_SERVING while the database is down (and `tern_store_up` 0), SERVING again once it is
/// back; `tern.cloud` follows the simulator on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_database_and_the_cloud() {
    let Some(bin) = common::postgres::server_binaries() else {
        return;
    };
    let pg = common::postgres::OwnPostgres::start(bin, None);
    let sim = common::start_sim(12, None, "k", "s", 20).await;
    let defs = super::fast_definitions();
    let logs = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let metrics_port = common::free_port();
    let _server = common::server_process(
        &pg.url(),
        &sim,
        defs.path(),
        port,
        &logs.path().join("server.log"),
        &["--metrics-listen", &format!("127.0.0.1:{metrics_port}")],
        &[],
    );
    let mut health = HealthClient::new(common::channel(port).await);
    until_status(&mut health, "", ServingStatus::Serving, logs.path()).await;
    until_status(&mut health, "tern.cloud", ServingStatus::Serving, logs.path()).await;
    assert_eq!(
        status_of(&mut health, "tern.v1.FailoverService").await,
        Some(ServingStatus::Serving)
    );

    let probe = |service: &'static str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["--endpoint", &format!("http://127.0.0.1:{port}"), "health", service])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    };
    assert_eq!(probe(""), (Some(0), "SERVING".to_string()), "tern health");

    pg.down();
    until_status(&mut health, "", ServingStatus::NotServing, logs.path()).await;
    assert_eq!(probe(""), (Some(1), "NOT_SERVING".to_string()), "tern health");
    assert_eq!(probe("tern.cloud"), (Some(0), "SERVING".to_string()));
    assert_eq!(
        status_of(&mut health, "tern.v1.WorkflowService").await,
        Some(ServingStatus::NotServing)
    );
    assert_eq!(
        status_of(&mut health, "tern.cloud").await,
        Some(ServingStatus::Serving),
        "the cloud is named on its own"
    );
    assert_eq!(
        status_of(&mut health, "tern.alive").await,
        Some(ServingStatus::Serving),
        "liveness does not follow the database"
    );
    assert_eq!(sum(&scrape(metrics_port).await, "tern_store_up", &[]), 0.0);

    pg.up();
    until_status(&mut health, "", ServingStatus::Serving, logs.path()).await;
    assert_eq!(sum(&scrape(metrics_port).await, "tern_store_up", &[]), 1.0);

    drop(sim);
    until_status(&mut health, "tern.cloud", ServingStatus::NotServing, logs.path()).await;
    assert_eq!(status_of(&mut health, "").await, Some(ServingStatus::Serving));
}
