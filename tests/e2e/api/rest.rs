//! The REST API (`/api/v1`) driven by a client that is not ours: Python `requests`
//! (tests/e2e/api/rest/client.py) against a server without authentication and one with.

use std::time::Duration;

use tern::domain::auth::{Credential, Role};

use super::{api, api_serving, FAST_RETRY};
use crate::common;

/// A token of a new principal with `role` in the server's store.
async fn token(a: &super::Api, name: &str, role: Role) -> String {
    let (row, token) = tern::api::auth::new_principal(name, role, Credential::Token, tern::domain::Timestamp::now());
    a.store.add_principal(&row).await.unwrap();
    token.unwrap()
}

/// A server without authentication and one with, and tokens of a viewer and an operator of
/// the second.
pub(super) struct Pair {
    pub(super) open: super::Api,
    pub(super) secured: super::Api,
    pub(super) viewer: String,
    pub(super) operator: String,
    /// Kept while the servers run (their databases live in these directories).
    pub(super) dbs: (common::TestDb, common::TestDb),
}

impl Pair {
    pub(super) async fn new() -> Pair {
        let db = common::sqlite_db();
        let open = api(&db).await;
        let secured_db = common::sqlite_db();
        let secured = api_serving(&secured_db, None, FAST_RETRY, |store| tern::api::ServeOptions {
            auth: tern::api::auth::Authenticator::Principals {
                store,
                certificates: false,
            },
            ..Default::default()
        })
        .await;
        let viewer = token(&secured, "viewer", Role::Viewer).await;
        let operator = token(&secured, "operator", Role::Operator).await;
        Pair {
            open,
            secured,
            viewer,
            operator,
            dbs: (db, secured_db),
        }
    }
}

/// Readiness, mappings CRUD, a whole test failover over Server-Sent Events, a cancel, the error
/// envelope of each code, roles, and the OpenAPI document checked against the routes. Skipped
/// with `TERN_SKIP_PYTHON=1` (offline machines).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_drives_the_rest_api() {
    if std::env::var("TERN_SKIP_PYTHON").is_ok_and(|v| v == "1") {
        eprintln!("skipping: TERN_SKIP_PYTHON=1");
        return;
    }
    let Pair {
        open,
        secured,
        viewer,
        operator,
        dbs: _dbs,
    } = Pair::new().await;
    let vms = &open.inv.vms;
    assert!(vms.len() >= 3, "the sample inventory has three VMs to spare");
    let config = serde_json::json!({
        "base": open.rest,
        "auth_base": secured.rest,
        "tokens": {"viewer": viewer, "operator": operator},
        "vms": {"test": vms[0].vm_id, "cancel": vms[1].vm_id, "mappings": vms[2].vm_id},
    });
    let text = super::python_client("rest/run.sh", &[&config.to_string()]).await;
    assert!(text.contains("REST client: all checks passed"), "{text}");
}

/// A `tern server` process with `--http-listen`: its REST API answers, and `/debug/logs` holds
/// its recent log lines (the access lines of the calls just made, JSON), never the token a
/// caller sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_serves_rest_and_its_recent_logs() {
    let db = common::sqlite_db();
    let sim = common::start_sim(21, None, "k", "s", 5).await;
    common::store_with_inventory(&db, &sim).await;
    let defs = super::fast_definitions();
    let logs = tempfile::tempdir().unwrap();
    let (port, http) = (common::free_port(), common::free_port());
    let http_addr = format!("127.0.0.1:{http}");
    let mut server = common::server_process(
        &db.url,
        &sim,
        defs.path(),
        port,
        &logs.path().join("server.log"),
        &["--http-listen", &http_addr],
        &[],
    );
    let base = format!("http://{http_addr}");
    let client = reqwest::Client::new();
    let mut health = None;
    for _ in 0..300 {
        if let Ok(r) = client.get(format!("{base}/api/v1/debug/health")).send().await {
            health = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let health: serde_json::Value = health.expect("the REST API answers").json().await.unwrap();
    assert_eq!(health["status"], "healthy", "{health}");
    let secret = "tern_do-not-log-this-token-0123456789abcdefghijklmno";
    let vm = &sim.inventory.vms[0].vm_id;
    let get = |path: String| {
        let req = client.get(format!("{base}{path}")).bearer_auth(secret);
        async move { req.send().await.unwrap().json::<serde_json::Value>().await.unwrap() }
    };
    let jobs = get(format!("/api/v1/failover/jobs?vm_id={vm}")).await;
    assert_eq!(jobs["success"], true, "{jobs}");
    let lines = get("/api/v1/debug/logs?lines=100".into()).await;
    let text = lines.to_string();
    assert!(!text.contains(secret), "a token in the log ring: {text}");
    let access: Vec<&serde_json::Value> = lines["data"]
        .as_array()
        .expect("lines")
        .iter()
        .filter(|l| l["target"] == "tern::access")
        .collect();
    assert!(
        access
            .iter()
            .any(|l| l["fields"]["method"] == "tern.v1.FailoverService/ListFailovers" && l["fields"]["code"] == "OK"),
        "the ListFailovers call's access line: {text}"
    );
    let _ = server.start_kill();
    let _ = server.wait().await;
}
