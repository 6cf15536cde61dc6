//! The CloudStack/LINSTOR simulator: a real HTTP server speaking both wire protocols, so the
//! real clients (and the whole engine) can be tested end to end without a cloud.
//!
//! One listener serves everything:
//! - `GET|POST /client/api`: the CloudStack API (signature v3 checked with the same rule as
//!   the server, `expires` enforced; 401 on mismatch, unknown key, expired request or unknown
//!   command). Commands: deployVirtualMachine, start/stop/destroyVirtualMachine,
//!   attachVolume, detachVolume, createSnapshot, revertSnapshot, deleteSnapshot,
//!   createVMSnapshot, revertToVMSnapshot, deleteVMSnapshot (async), queryAsyncJobResult,
//!   listVirtualMachines, listVolumes, listSnapshots, listVMSnapshot, listZones,
//!   listNetworks, listServiceOfferings, deleteVolume (sync). The one service offering is a
//!   custom one: a deploy must give `details[0].cpuNumber` and `details[0].memory`.
//! - `/v1/resource-definitions/{rsc}/snapshots[/{snap}]`, `…/snapshot-rollback/{snap}`,
//!   `POST /v1/actions/snapshot/multi` (several resources at one instant, all or none):
//!   the LINSTOR controller subset (see [`linstor`]). Every volume has a resource definition
//!   `cs-<volume id>`.
//! - `/sim/…`: inspection and test hooks (below).
//!
//! Async jobs complete `async_latency` after they were accepted (the due time is stored, so
//! it survives a restart); they complete when any request or the background ticker finds
//! them due, oldest first. Parameter errors (missing parameter, unknown id, duplicate VM
//! name) are sync 431 replies; rule violations are found when the job runs and end it with
//! `jobstatus` 2 and errorcode 431, as CloudStack does.
//!
//! Rules enforced: a ROOT volume (device 0) can be detached only while its VM is Stopped,
//! and attaching with `deviceid=0` needs a Stopped VM without a ROOT volume (the volume
//! becomes ROOT); a detached volume is DATADISK again; an attached volume cannot be attached
//! elsewhere; no volume is attached to or detached from a VM that has VM snapshots;
//! deleteVolume needs a detached volume; revertSnapshot needs the volume detached
//! or its VM Stopped, and no VM snapshots on that VM; revertToVMSnapshot needs a Stopped VM;
//! startVirtualMachine needs a ROOT volume; deployVirtualMachine creates the VM's own ROOT
//! volume; VM names are unique (431). destroyVirtualMachine without expunge marks the VM
//! Destroyed; with expunge it removes the VM, its VM snapshots and its ROOT volume (whatever
//! volume is at device 0, a replicated one included, as CloudStack would) and detaches data
//! disks. A failed deploy leaves the VM in Error (its name stays taken until expunged).
//!
//! Volume content: each volume has a `Content { generation, virtio_injected }`.
//! `POST /sim/volumes/{id}/write` bumps the generation; `POST /sim/volumes/{id}/inject-virtio`
//! bumps it and sets `virtio_injected`. Volume snapshots, VM snapshots and LINSTOR snapshots
//! capture it; reverts and rollbacks restore it, so "revert undoes writes" is observable via
//! `GET /sim/volumes/{id}`.
//!
//! Inspection endpoints:
//! - `GET /sim/state`: the whole [`World`] as JSON.
//! - `GET /sim/inventory`: the [`SampleInventory`] (404 without `sample`).
//! - `GET /sim/invariant?prefix=P&expect_vm=ID`: an [`InvariantReport`]: every replicated
//!   volume exists and is attached to exactly one existing VM (to `expect_vm` if given), and
//!   no VM, volume, snapshot, VM snapshot or LINSTOR snapshot whose name starts with `P` is
//!   left. `ok` sums it up.
//! - `GET /sim/faults`: the faults injected so far ([`FaultRecord`]s); `DELETE /sim/faults`
//!   stops injecting (an operator fixed the cause; a recovery is then followed).
//! - `GET /sim/requests`: requests per command since start ([`RequestCount`]s), what a fault
//!   sweep enumerates.
//! - `GET /sim/volumes/{id}`: a volume's [`Content`].
//!
//! Faults: see [`FaultPlan`] for the JSON format and [`faults::decide`] for determinism.
//! State: with `state_file`, the world is loaded at start (created if absent) and written
//! atomically (temp file + rename) after every mutation. Fault counters are not persisted.

pub mod cloudstack;
pub mod faults;
pub mod linstor;
pub mod model;
pub mod tls;

use anyhow::Context as _;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

pub use faults::{Fault, FaultPlan, FaultRates, FaultRecord};
pub use model::{
    sample_inventory, Content, InvariantReport, SampleInventory, SampleOffering, SampleVm, VolumeCheck, World,
};

/// How to run the simulator. `Debug` redacts the keys.
#[derive(Clone)]
pub struct SimConfig {
    pub api_key: String,
    pub secret_key: String,
    /// Where the world is persisted; `None` keeps it in memory only.
    pub state_file: Option<PathBuf>,
    /// How long async jobs stay pending.
    pub async_latency: Duration,
    pub fault_plan: Option<FaultPlan>,
    /// Seeds fault decisions and the ids of the catalog and the sample.
    pub seed: u64,
    /// Create the sample inventory when starting without a state file to load.
    pub sample: bool,
}

impl std::fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimConfig")
            .field("api_key", &"<redacted>")
            .field("secret_key", &"<redacted>")
            .field("state_file", &self.state_file)
            .field("async_latency", &self.async_latency)
            .field("fault_plan", &self.fault_plan)
            .field("seed", &self.seed)
            .field("sample", &self.sample)
            .finish()
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            api_key: "sim-api-key".into(),
            secret_key: "sim-secret-key".into(),
            state_file: None,
            async_latency: Duration::from_millis(200),
            fault_plan: None,
            seed: 1,
            sample: true,
        }
    }
}

pub(crate) struct App {
    config: SimConfig,
    world: Mutex<World>,
    /// Requests per command since start (what a fault sweep covers), counted with or without a plan.
    counters: Mutex<BTreeMap<String, RequestCount>>,
    fault_log: Mutex<Vec<FaultRecord>>,
    /// Set by `DELETE /sim/faults`: the plan injects nothing more (the cause was fixed).
    faults_off: std::sync::atomic::AtomicBool,
}

impl App {
    fn now_ms() -> i64 {
        crate::domain::Timestamp::now().millis()
    }

    fn lock(&self) -> MutexGuard<'_, World> {
        // A panic while holding the lock leaves a world that is still valid JSON-wise.
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn latency_ms(&self) -> i64 {
        i64::try_from(self.config.async_latency.as_millis()).unwrap_or(i64::MAX)
    }

    fn hang(&self) -> Duration {
        self.config
            .fault_plan
            .as_ref()
            .map(FaultPlan::hang)
            .unwrap_or(Duration::from_secs(30))
    }

    fn persist(&self, world: &World) {
        if let Some(path) = &self.config.state_file {
            if let Err(e) = world.save(path) {
                tracing::error!(error = %e, path = %path.display(), "simulator state not saved");
            }
        }
    }

    /// The fault for the next request of `command`, recorded if any.
    fn roll(&self, command: &str, is_async: bool) -> Option<Fault> {
        let n = {
            let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
            let slot = c
                .entry(command.to_string())
                .or_insert(RequestCount { count: 0, is_async });
            let n = slot.count;
            slot.count += 1;
            n
        };
        if self.faults_off.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let plan = self.config.fault_plan.as_ref()?;
        let fault = faults::decide(self.config.seed, plan, command, n, is_async)?;
        tracing::info!(command, n, ?fault, "simulator injects a fault");
        self.fault_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(FaultRecord {
                command: command.to_string(),
                n,
                fault,
            });
        Some(fault)
    }
}

/// How often one command was requested, as `GET /sim/requests` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct RequestCount {
    pub count: u64,
    /// An async CloudStack command (it can also fail as a job).
    pub is_async: bool,
}

/// Serves the simulator on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: SimConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_on(listener, config, shutdown).await
}

/// [`serve`] over HTTPS with the certificate chain `cert_pem` and its key `key_pem`.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    config: SimConfig,
    cert_pem: &[u8],
    key_pem: &[u8],
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_on(tls::TlsListener::new(listener, cert_pem, key_pem)?, config, shutdown).await
}

async fn serve_on<L>(
    listener: L,
    config: SimConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let now = App::now_ms();
    let world = match &config.state_file {
        Some(path) => {
            let loaded = World::load(path).with_context(|| format!("loading the state file {}", path.display()))?;
            match loaded {
                Some(w) => w,
                None => {
                    let w = World::new(config.seed, config.sample, now);
                    w.save(path)
                        .with_context(|| format!("creating the state file {}", path.display()))?;
                    w
                }
            }
        }
        None => World::new(config.seed, config.sample, now),
    };
    let tick = (config.async_latency / 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let app = Arc::new(App {
        config,
        world: Mutex::new(world),
        counters: Mutex::new(BTreeMap::new()),
        fault_log: Mutex::new(Vec::new()),
        faults_off: std::sync::atomic::AtomicBool::new(false),
    });

    let stop = CancellationToken::new();
    let ticker = {
        let app = app.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(tick) => {}
                }
                let mut w = app.lock();
                if w.complete_due_jobs(App::now_ms()) {
                    app.persist(&w);
                }
            }
        })
    };

    let router = router(app);
    let stop_on_shutdown = stop.clone();
    let result = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown.await;
            stop_on_shutdown.cancel();
        })
        .await;
    stop.cancel();
    let _ = ticker.await;
    result.map_err(Into::into)
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/client/api", get(cloudstack_api).post(cloudstack_api))
        .route(
            "/v1/resource-definitions/{rsc}/snapshots",
            get(linstor_list).post(linstor_create),
        )
        .route(
            "/v1/resource-definitions/{rsc}/snapshots/{snap}",
            axum::routing::delete(linstor_delete),
        )
        .route(
            "/v1/resource-definitions/{rsc}/snapshot-rollback/{snap}",
            post(linstor_rollback),
        )
        .route("/v1/actions/snapshot/multi", post(linstor_create_multi))
        .route("/sim/state", get(sim_state))
        .route("/sim/inventory", get(sim_inventory))
        .route("/sim/invariant", get(sim_invariant))
        .route("/sim/faults", get(sim_faults).delete(sim_faults_off))
        .route("/sim/requests", get(sim_requests))
        .route("/sim/volumes/{id}", get(sim_volume))
        .route("/sim/volumes/{id}/write", post(sim_write))
        .route("/sim/volumes/{id}/inject-virtio", post(sim_inject))
        .with_state(app)
}

fn json_reply(status: u16, body: Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=UTF-8")],
        body.to_string(),
    )
        .into_response()
}

async fn cloudstack_api(State(app): State<Arc<App>>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    let mut params: Vec<(String, String)> = Vec::new();
    if let Some(q) = query {
        params.extend(form_urlencoded::parse(q.as_bytes()).into_owned());
    }
    params.extend(form_urlencoded::parse(&body).into_owned());
    // A server goes on with a request whose client gave up (CloudStack's servlets do): the
    // request is handled in a task of its own, which a client's disconnect does not cancel, so
    // a request held up past its client's timeout still lands (unless it has expired by then).
    let handled = tokio::spawn(async move { cloudstack::handle(&app, params).await });
    match handled.await {
        Ok((status, body)) => json_reply(status, body),
        Err(e) => json_reply(
            530,
            json!({ "errorresponse": { "errorcode": 530, "errortext": e.to_string() } }),
        ),
    }
}

#[derive(Deserialize)]
struct SnapshotName {
    name: String,
}

async fn linstor_list(State(app): State<Arc<App>>, Path(rsc): Path<String>) -> Response {
    let (s, b) = linstor::handle(&app, &rsc, linstor::Op::List).await;
    json_reply(s, b)
}

async fn linstor_create(State(app): State<Arc<App>>, Path(rsc): Path<String>, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<SnapshotName>(&body) else {
        return json_reply(
            400,
            json!([{ "ret_code": (0xC000_0000_0000_0000u64 | 999) as i64, "message": "Request body must be {\"name\": <snapshot name>}" }]),
        );
    };
    let (s, b) = linstor::handle(&app, &rsc, linstor::Op::Create { snap: req.name }).await;
    json_reply(s, b)
}

#[derive(Deserialize)]
struct MultiSnapshot {
    snapshots: Vec<MultiSnapshotEntry>,
}

#[derive(Deserialize)]
struct MultiSnapshotEntry {
    resource_name: String,
    name: String,
}

async fn linstor_create_multi(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<MultiSnapshot>(&body) else {
        return json_reply(
            400,
            json!([{ "ret_code": (0xC000_0000_0000_0000u64 | 999) as i64, "message": "Request body must be {\"snapshots\": [{\"resource_name\": …, \"name\": …}]}" }]),
        );
    };
    let entries = req.snapshots.into_iter().map(|e| (e.resource_name, e.name)).collect();
    let (s, b) = linstor::handle_multi(&app, entries).await;
    json_reply(s, b)
}

async fn linstor_delete(State(app): State<Arc<App>>, Path((rsc, snap)): Path<(String, String)>) -> Response {
    let (s, b) = linstor::handle(&app, &rsc, linstor::Op::Delete { snap }).await;
    json_reply(s, b)
}

async fn linstor_rollback(State(app): State<Arc<App>>, Path((rsc, snap)): Path<(String, String)>) -> Response {
    let (s, b) = linstor::handle(&app, &rsc, linstor::Op::Rollback { snap }).await;
    json_reply(s, b)
}

async fn sim_state(State(app): State<Arc<App>>) -> Response {
    let mut w = app.lock();
    if w.complete_due_jobs(App::now_ms()) {
        app.persist(&w);
    }
    Json(w.clone()).into_response()
}

async fn sim_inventory(State(app): State<Arc<App>>) -> Response {
    match app.lock().inventory.clone() {
        Some(inv) => Json(inv).into_response(),
        None => json_reply(404, json!({ "error": "started without the sample inventory" })),
    }
}

#[derive(Deserialize)]
struct InvariantQuery {
    prefix: Option<String>,
    expect_vm: Option<String>,
}

async fn sim_invariant(State(app): State<Arc<App>>, Query(q): Query<InvariantQuery>) -> Response {
    let mut w = app.lock();
    if w.complete_due_jobs(App::now_ms()) {
        app.persist(&w);
    }
    Json(w.invariant(q.prefix.as_deref(), q.expect_vm.as_deref())).into_response()
}

async fn sim_faults(State(app): State<Arc<App>>) -> Response {
    let log = app.fault_log.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Json(log).into_response()
}

/// Stops injecting faults, as an operator who fixed the cause would (the log is kept).
async fn sim_faults_off(State(app): State<Arc<App>>) -> Response {
    app.faults_off.store(true, std::sync::atomic::Ordering::Relaxed);
    StatusCode::NO_CONTENT.into_response()
}

async fn sim_requests(State(app): State<Arc<App>>) -> Response {
    let counts = app.counters.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Json(counts).into_response()
}

fn volume_content(app: &App, id: &str, change: impl FnOnce(&mut Content)) -> Response {
    let mut w = app.lock();
    let Some(v) = w.volumes.get_mut(id) else {
        return json_reply(404, json!({ "error": format!("no volume {id}") }));
    };
    let before = v.content;
    change(&mut v.content);
    let content = v.content;
    if content != before {
        app.persist(&w);
    }
    Json(json!({ "volume_id": id, "content": content })).into_response()
}

async fn sim_volume(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    volume_content(&app, &id, |_| {})
}

async fn sim_write(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    volume_content(&app, &id, |c| c.generation += 1)
}

async fn sim_inject(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    volume_content(&app, &id, |c| {
        c.generation += 1;
        c.virtio_injected = true;
    })
}
