//! A real `tern server` with TLS, client certificates and tokens: a viewer cannot start a
//! failover (PERMISSION_DENIED), an operator can, a revoked token and a stranger's certificate
//! cannot (UNAUTHENTICATED); the journal names who did what; the server's log at
//! `RUST_LOG=trace`, through a whole failover, holds no token, secret key or password.

use std::process::Stdio;
use std::time::Duration;

use tern::api::pb;
use tern::api::pb::failover_service_client::FailoverServiceClient;
use tern::domain::run::Record;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

use crate::common::pki::Pki;
use crate::common::{self, TestDb};

/// Runs the `tern` binary with `args` and `env`; (exit code, stdout, stderr).
async fn tern(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .env_remove("TERN_TOKEN")
        .output()
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A TLS channel to `endpoint` trusting the test CA, with the client certificate `client`.
async fn tls_channel(pki: &Pki, endpoint: &str, client: Option<&str>) -> Channel {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pki.read("ca.pem")));
    if let Some(c) = client {
        tls = tls.identity(Identity::from_pem(
            pki.read(&format!("{c}.pem")),
            pki.read(&format!("{c}.key")),
        ));
    }
    let ep = Endpoint::from_shared(endpoint.to_string())
        .unwrap()
        .tls_config(tls)
        .unwrap();
    for _ in 0..300 {
        if let Ok(ch) = ep.connect().await {
            return ch;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no TLS connection to {endpoint}");
}

/// A FailoverService client that sends `token`.
fn client(
    channel: Channel,
    token: Option<&str>,
) -> FailoverServiceClient<tonic::service::interceptor::InterceptedService<Channel, impl tonic::service::Interceptor>> {
    let header = token.map(|t| {
        format!("Bearer {t}")
            .parse::<tonic::metadata::MetadataValue<_>>()
            .unwrap()
    });
    FailoverServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        if let Some(h) = &header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    })
}

fn code_of<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(e) => e.code(),
    }
}

pub(super) async fn tls_tokens_and_roles_end_to_end(db: TestDb) {
    const SECRET_KEY: &str = "sim-secret-7d1c55e2b9";
    let sim = common::start_sim(7, None, "k", SECRET_KEY, 20).await;
    // The database URL carries a password (PostgreSQL's trust authentication ignores it) that
    // must never reach the log.
    let password = "db-pass-4f2a9c";
    let url = if db.url.starts_with("postgres://") {
        db.url
            .replacen("postgres://postgres@", &format!("postgres://postgres:{password}@"), 1)
    } else {
        db.url.clone()
    };
    let store = db.open().await;
    let inv = sim.inventory.clone();
    tern::store::load_inventory(store.as_ref(), &inv, tern::domain::Timestamp::now())
        .await
        .unwrap();

    // Principals, made with the CLI on the database.
    let db_env = [("TERN_DATABASE_URL", url.as_str())];
    let create = |name: &'static str, role: &'static str| async move {
        let (code, out, err) = tern(&["token", "create", name, "--role", role], &db_env).await;
        assert_eq!(code, Some(0), "{err}");
        out.trim().to_string()
    };
    let alice = create("alice", "operator").await;
    let victor = create("victor", "viewer").await;
    let (code, _, err) = tern(
        &["token", "create", "ci-viewer", "--role", "viewer", "--certificate"],
        &db_env,
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = tern(&["token", "create", "alice", "--role", "admin"], &db_env).await;
    assert_eq!(code, Some(1), "a second alice: {err}");
    let (_, list, _) = tern(&["token", "list"], &db_env).await;
    assert!(list.contains("alice") && list.contains("operator"), "{list}");
    assert!(!list.contains(&alice), "a token is never listed");

    let mut pki = Pki::new();
    pki.client("ci-viewer");
    pki.client("stranger");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let defs = super::fast_definitions();
    let logs = tempfile::tempdir().unwrap();
    let log_path = logs.path().join("server.log");
    let secret_file = logs.path().join("secret");
    std::fs::write(&secret_file, SECRET_KEY).unwrap();
    let mut env = common::failover_env(&sim.base, &sim.sample, defs.path());
    env.retain(|(k, _)| k != "TERN_CLOUDSTACK_SECRET_KEY");
    let p = |n: &str| pki.path(n).display().to_string();
    let http_port = common::free_port();
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["server", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
        .args(["--tls-cert", &p("server.pem"), "--tls-key", &p("server.key")])
        .args(["--tls-client-ca", &p("ca.pem")])
        .envs(env)
        .env("TERN_DATABASE_URL", &url)
        .env("TERN_CLOUDSTACK_SECRET_KEY_FILE", &secret_file)
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let endpoint = format!("https://127.0.0.1:{port}");

    // Plaintext to the TLS port fails; TLS without credentials is UNAUTHENTICATED, but health
    // answers anyone (probes).
    let plain = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = plain {
        assert_ne!(
            code_of(
                client(ch, None)
                    .list_failovers(pb::ListFailoversRequest::default())
                    .await
            ),
            Code::Ok
        );
    }
    let anonymous = tls_channel(&pki, &endpoint, None).await;
    let e = client(anonymous.clone(), None)
        .list_failovers(pb::ListFailoversRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
    let health = tonic_health::pb::health_client::HealthClient::new(anonymous.clone())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await;
    assert!(health.is_ok(), "{health:?}");
    assert_eq!(
        code_of(
            client(anonymous.clone(), Some("tern_not-a-token"))
                .list_failovers(pb::ListFailoversRequest::default())
                .await
        ),
        Code::Unauthenticated
    );

    // A viewer reads but does not start; an operator starts.
    let vm = &inv.vms[1];
    let start = || pb::StartTestFailoverRequest {
        vm_id: vm.vm_id.clone(),
        ..Default::default()
    };
    let mut viewer = client(anonymous.clone(), Some(&victor));
    assert_eq!(
        code_of(viewer.list_failovers(pb::ListFailoversRequest::default()).await),
        Code::Ok
    );
    let e = viewer.start_test_failover(start()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    assert!(e.message().contains("operator"), "{}", e.message());
    let by_cert = tls_channel(&pki, &endpoint, Some("ci-viewer")).await;
    let mut cert_viewer = client(by_cert, None);
    assert_eq!(
        code_of(cert_viewer.list_failovers(pb::ListFailoversRequest::default()).await),
        Code::Ok
    );
    assert_eq!(
        code_of(cert_viewer.start_test_failover(start()).await),
        Code::PermissionDenied
    );
    let stranger = tls_channel(&pki, &endpoint, Some("stranger")).await;
    assert_eq!(
        code_of(
            client(stranger, None)
                .list_failovers(pb::ListFailoversRequest::default())
                .await
        ),
        Code::Unauthenticated
    );

    rest_over_tls(&pki, http_port, &victor, &vm.vm_id).await;

    let mut operator = client(anonymous.clone(), Some(&alice));
    let job = operator.start_test_failover(start()).await.unwrap().into_inner();
    // The CLI over TLS, with the token from a file, ends the test.
    let token_file = logs.path().join("alice.token");
    std::fs::write(&token_file, format!("{alice}\n")).unwrap();
    let ca = p("ca.pem");
    let cli_env = [("TERN_TOKEN_FILE", token_file.to_str().unwrap())];
    let mut held = false;
    for _ in 0..600 {
        let j = operator
            .get_failover(pb::GetFailoverRequest {
                job_id: job.job_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if j.status == "testing" {
            held = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(held, "the test failover reached testing");
    let (code_end, out, err) = tern(
        &["--endpoint", &endpoint, "--ca", &ca, "end-test", &job.job_id],
        &cli_env,
    )
    .await;
    assert_eq!(code_end, Some(0), "{out}{err}");
    let (code_end, out, err) = tern(&["--endpoint", &endpoint, "--ca", &ca, "watch", &job.job_id], &cli_env).await;
    assert_eq!(code_end, Some(0), "{out}{err}");
    assert!(out.contains("finished: completed"), "{out}");
    let (code_end, _, err) = tern(&["--endpoint", &endpoint, "end-test", &job.job_id], &cli_env).await;
    assert_ne!(code_end, Some(0));
    assert!(
        err.contains("https") || err.contains("reach"),
        "no TLS without --ca is refused: {err}"
    );

    // Revoked: the token stops working at once.
    let (code_rev, _, err) = tern(&["token", "revoke", "victor"], &db_env).await;
    assert_eq!(code_rev, Some(0), "{err}");
    assert_eq!(
        code_of(viewer.list_failovers(pb::ListFailoversRequest::default()).await),
        Code::Unauthenticated
    );

    // The journal names who started it and who ended the test.
    let id: tern::domain::RunId = job.job_id.parse().unwrap();
    let journal = store.journal(id, 0, 1000).await.unwrap();
    let submitted_by = journal.iter().find_map(|e| match &e.record {
        Record::RunSubmitted { by, .. } => Some(by.clone()),
        _ => None,
    });
    assert_eq!(submitted_by, Some(Some("alice".to_string())));
    let signalled_by = journal.iter().find_map(|e| match &e.record {
        Record::SignalReceived { by, .. } => Some(by.clone()),
        _ => None,
    });
    assert_eq!(signalled_by, Some(Some("alice".to_string())));

    // Nothing secret in a whole failover's trace log.
    terminate(&mut server).await;
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.len() > 10_000 && log.contains("TRACE"),
        "a trace log was written ({} bytes)",
        log.len()
    );
    for (what, secret) in [
        ("alice's token", alice.as_str()),
        ("victor's token", victor.as_str()),
        ("the CloudStack secret key", SECRET_KEY),
        ("the database password", password),
    ] {
        assert!(!log.contains(secret), "{what} is in the server's log");
    }
}

/// SIGTERM, then wait for the server to exit.
async fn terminate(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SAFETY: signalling a child process this test started.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
}

/// The REST listener of a server with TLS and a client CA: HTTPS with the same certificate;
/// plaintext refused; tokens and client certificates authenticate as on gRPC, with the same
/// roles.
async fn rest_over_tls(pki: &Pki, port: u16, viewer_token: &str, vm_id: &str) {
    let base = format!("https://127.0.0.1:{port}");
    let ca = reqwest::Certificate::from_pem(&pki.read("ca.pem")).unwrap();
    let https = |identity: Option<&str>| {
        let mut b = reqwest::Client::builder().add_root_certificate(ca.clone());
        if let Some(name) = identity {
            let pem = [pki.read(&format!("{name}.pem")), pki.read(&format!("{name}.key"))].concat();
            b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
        }
        b.build().unwrap()
    };
    let get = |client: reqwest::Client, path: &str, token: Option<&str>| {
        let mut req = client.get(format!("{base}{path}"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move {
            let r = req.send().await.expect("an HTTPS reply");
            (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/api/v1/debug/health")).await;
    assert!(
        plain.map_or(true, |r| !r.status().is_success()),
        "plaintext to the HTTPS listener is refused"
    );
    let (code, body) = get(https(None), "/api/v1/debug/health", None).await;
    assert_eq!((code, &body["status"]), (200, &serde_json::json!("healthy")), "{body}");
    let (code, body) = get(https(None), "/api/v1/failover/jobs", None).await;
    assert_eq!(
        (code, &body["error_code"]),
        (401, &serde_json::json!("UNAUTHENTICATED")),
        "{body}"
    );
    let (code, _) = get(https(None), "/api/v1/failover/jobs", Some(viewer_token)).await;
    assert_eq!(code, 200, "a viewer's token");
    let (code, body) = get(https(Some("ci-viewer")), "/api/v1/whoami", None).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        (&body["data"]["name"], &body["data"]["role"]),
        (&serde_json::json!("ci-viewer"), &serde_json::json!("viewer")),
        "{body}"
    );
    let (code, _) = get(https(Some("ci-viewer")), "/api/v1/failover/jobs", None).await;
    assert_eq!(code, 200, "a viewer's certificate lists");
    let refused = https(Some("ci-viewer"))
        .post(format!("{base}/api/v1/failover/test"))
        .json(&serde_json::json!({"vm_id": vm_id}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 403, "a viewer's certificate may not start");
    let (code, body) = get(https(Some("stranger")), "/api/v1/failover/jobs", None).await;
    assert_eq!(
        (code, &body["error_code"]),
        (401, &serde_json::json!("UNAUTHENTICATED")),
        "{body}"
    );
}
