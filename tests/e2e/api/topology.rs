//! The compose topology (deploy/compose.yaml) run as processes on this machine: PostgreSQL (a
//! server of the test's own), the migration, the simulator and its inventory, three `tern
//! server`s and an OTLP receiver, each started with the command and environment the compose
//! file gives it (host names and ports mapped to this machine). A test failover through one
//! server completes, every server is healthy and serves /metrics, and the spans reach the
//! receiver: the file's wiring works.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tern::api::pb;
use tern::api::pb::failover_service_client::FailoverServiceClient;

use super::traces::Collector;
use crate::common;

/// deploy/compose.yaml as JSON (PyYAML resolves its anchors and merge keys), None without it.
fn compose() -> Option<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/compose.yaml");
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
            path,
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).expect("compose.yaml as JSON"))
}

/// One service's command and environment, with `map` applied to every word and value.
fn service(compose: &Value, name: &str, map: &[(String, String)]) -> (Vec<String>, Vec<(String, String)>) {
    let svc = &compose["services"][name];
    let apply = |s: &str| map.iter().fold(s.to_string(), |s, (from, to)| s.replace(from, to));
    let command = svc["command"]
        .as_array()
        .unwrap_or_else(|| panic!("{name} has a command list"))
        .iter()
        .map(|w| apply(w.as_str().unwrap()))
        .collect();
    let env = svc["environment"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), apply(v.as_str().unwrap_or(&v.to_string()))))
                .collect()
        })
        .unwrap_or_default();
    (command, env)
}

fn spawn(name: &str, (command, env): &(Vec<String>, Vec<(String, String)>), logs: &Path) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tern"));
    for (k, _) in std::env::vars() {
        if k.starts_with("TERN_") || k.starts_with("OTEL_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(command)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdout(std::fs::File::create(logs.join(format!("{name}.out"))).unwrap())
        .stderr(std::fs::File::create(logs.join(format!("{name}.log"))).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {name}: {e}"))
}

async fn run_to_end(name: &str, svc: &(Vec<String>, Vec<(String, String)>), logs: &Path) {
    let status = tokio::time::timeout(Duration::from_secs(60), spawn(name, svc, logs).wait())
        .await
        .unwrap_or_else(|_| panic!("{name} did not end"))
        .unwrap();
    assert!(status.success(), "{name}: {status:?}\n{}", common::logs_in(logs));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_topology_runs_as_processes() {
    let Some(compose) = compose() else {
        assert!(
            std::env::var("CI").is_err(),
            "CI must have python3 with PyYAML (.ci/run installs it)"
        );
        eprintln!("skipping: python3 with PyYAML is missing");
        return;
    };
    let Some(bin) = common::postgres::server_binaries() else {
        return;
    };
    let pg = common::postgres::OwnPostgres::start(bin, None);
    let pool = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    sqlx::query("CREATE ROLE tern LOGIN").execute(&pool).await.unwrap();
    sqlx::query("CREATE DATABASE tern OWNER tern")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;

    let collector = Collector::default();
    let (_, http) = collector.serve().await;
    let logs = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let secret: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(compose["secrets"]["cloudstack_secret_key"]["file"].as_str().unwrap());
    let sim_port = common::free_port();
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (common::free_port(), common::free_port())).collect();
    // Compose's names and container paths, as this machine has them.
    let base_map = vec![
        ("postgres:5432".to_string(), format!("127.0.0.1:{}", pg.port)),
        ("sim:8080".to_string(), format!("127.0.0.1:{sim_port}")),
        ("0.0.0.0:8080".to_string(), format!("127.0.0.1:{sim_port}")),
        ("http://otel-collector:4318".to_string(), http.clone()),
        ("/var/lib/tern".to_string(), state.path().display().to_string()),
        (
            "/run/secrets/cloudstack_secret_key".to_string(),
            secret.display().to_string(),
        ),
    ];

    run_to_end("migrate", &service(&compose, "migrate", &base_map), logs.path()).await;
    let _sim = spawn("sim", &service(&compose, "sim", &base_map), logs.path());
    let inventory = service(&compose, "inventory", &base_map);
    let mut loaded = false;
    for _ in 0..100 {
        let status = spawn("inventory", &inventory, logs.path()).wait().await.unwrap();
        if status.success() {
            loaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(loaded, "the inventory never loaded\n{}", common::logs_in(logs.path()));
    let mut servers = Vec::new();
    for (i, (api, metrics)) in ports.iter().enumerate() {
        let name = format!("tern-{}", i + 1);
        let mut map = base_map.clone();
        map.push(("0.0.0.0:50051".into(), format!("127.0.0.1:{api}")));
        map.push(("0.0.0.0:9464".into(), format!("127.0.0.1:{metrics}")));
        servers.push(spawn(&name, &service(&compose, &name, &map), logs.path()));
    }

    // Every server is healthy and serves its metrics.
    let database_url = service(&compose, "tern-1", &base_map)
        .1
        .into_iter()
        .find(|(k, _)| k == "TERN_DATABASE_URL")
        .map(|(_, v)| v)
        .expect("the servers' TERN_DATABASE_URL");
    for (api, metrics) in &ports {
        let mut healthy = false;
        for _ in 0..200 {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tern"))
                .args(["--endpoint", &format!("http://127.0.0.1:{api}"), "health"])
                .output()
                .await
                .unwrap();
            if out.status.success() {
                healthy = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            healthy,
            "server on {api} never healthy\n{}",
            common::logs_in(logs.path())
        );
        let text = reqwest::get(format!("http://127.0.0.1:{metrics}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(text.contains("tern_store_up 1"), "{text}");
    }

    // A token (authentication is on, as compose runs it), then a test failover via tern-1.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["token", "create", "ci", "--role", "operator"])
        .env("TERN_DATABASE_URL", &database_url)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let channel = common::channel(ports[0].0).await;
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let mut fo = FailoverServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", bearer.clone());
        Ok(req)
    });
    let inv: Value =
        serde_json::from_str(&std::fs::read_to_string(state.path().join("inventory.json")).unwrap()).unwrap();
    let vm = inv["vms"][1]["vm_id"].as_str().unwrap().to_string();
    let job = fo
        .start_test_failover(pb::StartTestFailoverRequest {
            vm_id: vm,
            test_duration: "1s".into(),
            auto_cleanup: true,
            ..Default::default()
        })
        .await
        .expect("start through tern-1")
        .into_inner()
        .job_id;
    let mut status = String::new();
    for _ in 0..600 {
        status = fo
            .get_failover(pb::GetFailoverRequest { job_id: job.clone() })
            .await
            .unwrap()
            .into_inner()
            .status;
        if matches!(status.as_str(), "completed" | "failed" | "needs_operator") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, "completed", "{}", common::logs_in(logs.path()));
    // The spans reached the collector, named as compose names them.
    let start = collector
        .until("of the start call", |s| {
            s.span.name == "tern.v1.FailoverService/StartTestFailover"
        })
        .await;
    assert_eq!(start.service, "tern");
    let seen: HashMap<String, usize> = collector.spans().iter().fold(HashMap::new(), |mut m, s| {
        *m.entry(s.service.clone()).or_default() += 1;
        m
    });
    assert!(seen.get("tern").copied().unwrap_or(0) > 10, "{seen:?}");
    drop(servers);
}
