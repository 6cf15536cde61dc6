//! Helpers shared by the integration test binaries: one store per backend, isolated per test.
#![allow(dead_code)]

pub mod pki;
pub mod postgres;

use std::sync::Arc;

use tern::store::{self, Store};

/// The PostgreSQL URL for tests. In CI (CI=true) a missing URL is an error, never a skip.
pub fn pg_url() -> Option<String> {
    match std::env::var("TERN_TEST_POSTGRES_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => {
            panic!("TERN_TEST_POSTGRES_URL is not set in CI: PostgreSQL tests must run, not skip (see .ci/run)")
        }
        _ => None,
    }
}

/// A database for one test: its URL (with an isolating schema for PostgreSQL) and whatever
/// must stay alive while it is used.
pub struct TestDb {
    pub url: String,
    pub backend: &'static str,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub async fn open(&self) -> Arc<dyn Store> {
        store::open(&self.url).await.expect("open test store")
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

pub fn sqlite_db() -> TestDb {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("tern.db").display());
    TestDb {
        url,
        backend: "sqlite",
        _dir: Some(dir),
    }
}

/// None when PostgreSQL is not configured (outside CI only).
pub fn postgres_db() -> Option<TestDb> {
    let base = pg_url()?;
    let sep = if base.contains('?') { '&' } else { '?' };
    Some(TestDb {
        url: format!("{base}{sep}tern_schema={}", unique("t")),
        backend: "postgres",
        _dir: None,
    })
}

pub fn db(backend: &str) -> Option<TestDb> {
    match backend {
        "sqlite" => Some(sqlite_db()),
        "postgres" => {
            let db = postgres_db();
            if db.is_none() {
                eprintln!("skipping: TERN_TEST_POSTGRES_URL not set (it is required in CI)");
            }
            db
        }
        other => panic!("unknown backend {other}"),
    }
}

/// Declares `#[tokio::test]`s running the async fn `$case(TestDb)` once per backend.
#[macro_export]
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    if let Some(db) = $crate::common::db("sqlite") { super::$case(db).await }
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    if let Some(db) = $crate::common::db("postgres") { super::$case(db).await }
                }
            }
        )*
    };
}

/// Declares `#[tokio::test]`s running the async fn `$case(TestDb)` on SQLite only (cases whose
/// outcome does not depend on the database).
#[macro_export]
macro_rules! on_sqlite {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$case($crate::common::sqlite_db()).await
                }
            }
        )*
    };
}

/// A TCP port free on 127.0.0.1 now (for a child process to listen on).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local address")
        .port()
}

/// A CloudStack/LINSTOR simulator running in this test process (stopped when dropped).
pub struct Sim {
    pub base: String,
    pub sample: tern::sim::SampleInventory,
    pub inventory: tern::domain::inventory::InventoryFile,
    stop: tokio_util::sync::CancellationToken,
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts the simulator with the sample world on 127.0.0.1:0 (keys `key`/`secret`).
pub async fn start_sim(seed: u64, faults: Option<serde_json::Value>, key: &str, secret: &str, latency_ms: u64) -> Sim {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind simulator");
    let addr = listener.local_addr().expect("simulator address");
    let stop = tokio_util::sync::CancellationToken::new();
    let config = tern::sim::SimConfig {
        api_key: key.into(),
        secret_key: secret.into(),
        state_file: None,
        async_latency: std::time::Duration::from_millis(latency_ms),
        fault_plan: faults.map(|f| tern::sim::FaultPlan::from_json(&f.to_string()).expect("fault plan")),
        seed,
        sample: true,
    };
    let s = stop.clone();
    tokio::spawn(async move { tern::sim::serve(listener, config, async move { s.cancelled().await }).await });
    let sample = tern::sim::sample_inventory(seed);
    let inventory = sample.to_inventory();
    Sim {
        base: format!("http://{addr}"),
        sample,
        inventory,
        stop,
    }
}

impl Sim {
    /// Cloud settings that point a worker at this simulator: the sample's ids, the
    /// simulator's VirtIO injector, and the given polling and patience.
    pub fn cloud_settings(
        &self,
        key: &str,
        secret: &str,
        snapshots: tern::providers::SnapshotKind,
        job_poll: std::time::Duration,
        request_timeout: std::time::Duration,
    ) -> tern::steps::failover::setup::CloudSettings {
        tern::steps::failover::setup::CloudSettings {
            cloudstack_url: format!("{}/client/api", self.base),
            api_key: key.into(),
            secret_key: secret.into(),
            linstor_url: Some(self.base.clone()),
            snapshot_backend: snapshots,
            zone_id: self.sample.zone_id.clone(),
            service_offering_id: self.sample.service_offering_id.clone(),
            template_id: self.sample.template_id.clone(),
            test_network_id: Some(self.sample.test_network_id.clone()),
            injector: tern::steps::failover::setup::InjectorSettings::Sim {
                base_url: self.base.clone(),
            },
            job_poll,
            job_timeout: std::time::Duration::from_secs(10),
            request_timeout,
            clock_skew: std::time::Duration::from_millis(100),
            cloudstack_ca_pem: None,
            linstor_ca_pem: None,
        }
    }
}

/// An engine with the built-in actions and the failover actions bound to `settings`, running
/// the definitions in `defs`, and its worker, which runs until `stop`.
pub fn failover_engine(
    store: Arc<dyn Store>,
    settings: &tern::steps::failover::setup::CloudSettings,
    defs: &std::path::Path,
    cfg: tern::engine::EngineConfig,
    stop: &tokio_util::sync::CancellationToken,
) -> (Arc<tern::engine::Engine>, Arc<tern::steps::failover::FailoverDeps>) {
    let deps = tern::steps::failover::setup::build(settings, store.clone()).expect("failover deps");
    let mut registry = tern::steps::builtins(store.clone());
    tern::steps::failover::register(&mut registry, deps.clone());
    let engine = tern::engine::Engine::with_registry(store, Some(defs), registry, cfg).expect("engine");
    let (e, s) = (engine.clone(), stop.clone());
    tokio::spawn(async move { tern::engine::worker::run_worker(e, s).await });
    (engine, deps)
}

/// The embedded failover definitions with fast retries (`attempts` per step, delays from 20ms
/// up to `max_delay`), so injected failures cost milliseconds.
pub fn fast_failover_definitions(attempts: u32, max_delay: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (file, text) in tern::workflow::EMBEDDED {
        if file.contains("failover") {
            let fast = text.replace(
                r#"retry = { max_attempts = 6, initial_delay = "2s", multiplier = 2.0, max_delay = "1m", jitter = 0.2 }"#,
                &format!(
                    r#"retry = {{ max_attempts = {attempts}, initial_delay = "20ms", multiplier = 2.0, max_delay = "{max_delay}", jitter = 0.0 }}"#
                ),
            );
            assert_ne!(
                &fast, text,
                "the failover retry defaults changed; update the tests' fast definitions"
            );
            std::fs::write(dir.path().join(file), fast).expect("write definition");
        }
    }
    dir
}

/// A `tern worker` child process on `db`, logging to `<log_dir>/<name>.log`, with a 1 s lease,
/// `TERN_CRASH_AT=crash_at` if given, and extra environment.
pub fn worker_in(
    db: &TestDb,
    log_dir: &std::path::Path,
    name: &str,
    crash_at: Option<&str>,
    env: &[(String, String)],
) -> tokio::process::Child {
    let log = std::fs::File::create(log_dir.join(format!("{name}.log"))).unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tern"));
    cmd.args([
        "worker",
        "--database",
        &db.url,
        "--concurrency",
        "8",
        "--lease-ttl",
        "1s",
    ])
    .args([
        "--poll-interval",
        "100ms",
        "--shutdown-grace",
        "3s",
        "--worker-id",
        name,
    ])
    .env("RUST_LOG", "info,sqlx=warn")
    .env_remove("TERN_CRASH_AT")
    .stdout(std::process::Stdio::null())
    .stderr(log)
    .kill_on_drop(true);
    if let Some(point) = crash_at {
        cmd.env("TERN_CRASH_AT", point);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn tern worker")
}

/// The last lines of every worker log in `dir`, for failure messages.
pub fn logs_in(dir: &std::path::Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let tail: Vec<&str> = text
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        out.push_str(&format!("--- {}\n{}\n", e.path().display(), tail.join("\n")));
    }
    out
}

/// SIGTERM once the worker is up; it must exit cleanly.
pub async fn terminate_in(log_dir: &std::path::Path, mut child: tokio::process::Child, name: &str) {
    // Wait until this worker is up (its handler installed, its loop running) before SIGTERM.
    let log = log_dir.join(format!("{name}.log"));
    for _ in 0..200 {
        if std::fs::read_to_string(&log).is_ok_and(|t| t.contains("worker started")) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let pid = child.id().expect("running child") as i32;
    // SAFETY: kill(2) with a child's pid and SIGTERM has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let status = tokio::time::timeout(std::time::Duration::from_secs(15), child.wait())
        .await
        .expect("worker stops on SIGTERM")
        .unwrap();
    assert!(
        status.success(),
        "worker exit after SIGTERM: {status:?}\n{}",
        logs_in(log_dir)
    );
}

/// The environment of a `tern worker` that fails over against the simulator at `base` (keys
/// `k`/`s`) with the definitions in `defs`: fast job polls, a 1 s request timeout.
pub fn failover_env(base: &str, sample: &tern::sim::SampleInventory, defs: &std::path::Path) -> Vec<(String, String)> {
    [
        ("TERN_CLOUDSTACK_URL", format!("{base}/client/api")),
        ("TERN_CLOUDSTACK_API_KEY", "k".into()),
        ("TERN_CLOUDSTACK_SECRET_KEY", "s".into()),
        ("TERN_ZONE_ID", sample.zone_id.clone()),
        ("TERN_SERVICE_OFFERING_ID", sample.service_offering_id.clone()),
        ("TERN_TEMPLATE_ID", sample.template_id.clone()),
        ("TERN_TEST_NETWORK_ID", sample.test_network_id.clone()),
        ("TERN_VIRTIO_SIM_URL", base.to_string()),
        ("TERN_JOB_POLL", "20ms".into()),
        ("TERN_JOB_TIMEOUT", "10s".into()),
        ("TERN_REQUEST_TIMEOUT", "1s".into()),
        ("TERN_CLOUDSTACK_CLOCK_SKEW", "200ms".into()),
        ("TERN_WORKFLOWS_DIR", defs.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The check of `volume` in a `/sim/invariant` report (Null when the report has none).
pub fn volume_check(report: &serde_json::Value, volume: &str) -> serde_json::Value {
    report["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["volume_id"] == volume).cloned())
        .unwrap_or_default()
}

/// The VM a failover run created, as its create step (`step`) recorded it.
pub fn created_vm(row: &tern::store::RunRow, step: &str) -> String {
    row.context.output(step)["destination_vm_id"]
        .as_str()
        .unwrap_or_else(|| panic!("step {step} recorded no VM: {:?}", row.context.output(step)))
        .to_string()
}

/// A simulator inspection endpoint's JSON (`path` like `/sim/state`).
pub async fn sim_get(base: &str, path: &str) -> serde_json::Value {
    reqwest::get(format!("{base}{path}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A `tern server` on `database` failing over against `sim`, logging to `log`; `extra` args
/// and environment added.
pub fn server_process(
    database: &str,
    sim: &Sim,
    defs: &std::path::Path,
    port: u16,
    log: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["server", "--insecure-no-auth", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--lease-ttl", "1s", "--poll-interval", "100ms"])
        .args(args)
        .envs(failover_env(&sim.base, &sim.sample, defs))
        .env("TERN_DATABASE_URL", database)
        .env("RUST_LOG", "info,sqlx=warn")
        .env_remove("TERN_CRASH_AT")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tern server")
}

pub async fn channel(port: u16) -> tonic::transport::Channel {
    let ep = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap();
    for _ in 0..300 {
        if let Ok(ch) = ep.connect().await {
            return ch;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("no tern server on port {port}");
}

/// Waits until the simulator has held up a request (its scripted hang).
pub async fn until_hung(sim: &Sim) {
    for _ in 0..600 {
        let hung = sim_get(&sim.base, "/sim/faults").await;
        if hung.as_array().is_some_and(|a| !a.is_empty()) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the simulator held up no request");
}

/// `db`'s store with `sim`'s inventory loaded.
pub async fn store_with_inventory(db: &TestDb, sim: &Sim) -> Arc<dyn Store> {
    let store = db.open().await;
    tern::store::load_inventory(store.as_ref(), &sim.inventory, tern::domain::Timestamp::now())
        .await
        .unwrap();
    store
}
