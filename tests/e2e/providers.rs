//! The CloudStack and LINSTOR clients against the simulator, over real HTTP on port 0.
//!
//! `conformance_cloud` and `conformance_snapshots` are written against the traits and run
//! against every implementation; the other tests check wire details, rules and faults.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tern::providers::cloudstack::{sign, CloudStackClient, CloudStackConfig, VmSnapshots, VolumeSnapshots};
use tern::providers::linstor::{resource_name_for_volume, LinstorClient};
use tern::providers::{
    AsyncCommand, Cloud, JobStatus, NicRequest, ProviderError, SnapshotBackend, SnapshotFilter, VmFilter, VmState,
    VolumeFilter, VolumeType,
};
use tern::sim::{self, FaultPlan, FaultRates, InvariantReport, SampleInventory, SimConfig};

const POLL: Duration = Duration::from_millis(10);
const WAIT: Duration = Duration::from_secs(10);
const SECRET: &str = "s3cr3t/Key+With~Odd=Chars";
const API_KEY: &str = "test-api-key";

struct Sim {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    http: reqwest::Client,
}

fn config() -> SimConfig {
    SimConfig {
        api_key: API_KEY.into(),
        secret_key: SECRET.into(),
        state_file: None,
        async_latency: Duration::from_millis(20),
        fault_plan: None,
        seed: 42,
        sample: true,
    }
}

fn plan(command: &str, rates: FaultRates) -> FaultPlan {
    let mut p = FaultPlan::default();
    p.commands.insert(command.into(), rates);
    p
}

async fn start(config: SimConfig) -> Sim {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(sim::serve(listener, config, async move {
        let _ = rx.await;
    }));
    Sim {
        base: format!("http://{addr}"),
        stop: Some(tx),
        task,
        http: reqwest::Client::new(),
    }
}

impl Sim {
    fn cloud_config(&self) -> CloudStackConfig {
        let mut c = CloudStackConfig::new(format!("{}/client/api", self.base), API_KEY, SECRET);
        c.request_timeout = Duration::from_secs(5);
        c
    }

    fn cloud(&self) -> CloudStackClient {
        CloudStackClient::new(self.cloud_config()).unwrap()
    }

    fn linstor(&self) -> LinstorClient {
        LinstorClient::new(&self.base, Duration::from_secs(5))
            .unwrap()
            .with_waiting(POLL, WAIT)
    }

    async fn get(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn post(&self, path: &str) -> Value {
        self.http
            .post(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn inventory(&self) -> SampleInventory {
        serde_json::from_value(self.get("/sim/inventory").await).unwrap()
    }

    async fn invariant(&self, prefix: &str, expect_vm: Option<&str>) -> InvariantReport {
        let mut path = format!("/sim/invariant?prefix={prefix}");
        if let Some(vm) = expect_vm {
            path.push_str(&format!("&expect_vm={vm}"));
        }
        serde_json::from_value(self.get(&path).await).unwrap()
    }

    async fn generation(&self, volume_id: &str) -> u64 {
        self.get(&format!("/sim/volumes/{volume_id}")).await["content"]["generation"]
            .as_u64()
            .unwrap()
    }

    async fn write(&self, volume_id: &str) -> u64 {
        self.post(&format!("/sim/volumes/{volume_id}/write")).await["content"]["generation"]
            .as_u64()
            .unwrap()
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match tokio::time::timeout(Duration::from_secs(5), &mut self.task).await {
            Ok(r) => r.unwrap().unwrap(),
            Err(_) => self.task.abort(),
        }
    }
}

async fn run(c: &dyn Cloud, cmd: AsyncCommand) -> Result<Value, ProviderError> {
    let job = c.issue(cmd).await?;
    c.wait_job(&job.job_id, POLL, WAIT).await
}

fn deploy(name: &str, inv: &SampleInventory, start_vm: bool) -> AsyncCommand {
    AsyncCommand::DeployVm {
        name: name.into(),
        display_name: Some(format!("{name} (test)")),
        service_offering_id: inv.service_offering_id.clone(),
        template_id: inv.template_id.clone(),
        zone_id: inv.zone_id.clone(),
        nics: vec![NicRequest {
            network_id: inv.test_network_id.clone(),
            ip: None,
            mac: None,
        }],
        start_vm,
        extra: BTreeMap::from([
            ("details[0].cpuNumber".to_string(), "4".to_string()),
            ("details[0].memory".to_string(), "8192".to_string()),
        ]),
    }
}

async fn root_of(c: &dyn Cloud, vm_id: &str) -> String {
    c.list_volumes(VolumeFilter {
        vm_id: Some(vm_id.into()),
        volume_type: Some(VolumeType::Root),
        id: None,
    })
    .await
    .unwrap()
    .into_iter()
    .next()
    .unwrap()
    .id
}

/// The failover's CloudStack choreography and CloudStack's rules, against any [`Cloud`].
async fn conformance_cloud(c: &dyn Cloud, inv: &SampleInventory) {
    let source = &inv.vms[0];
    let oma = &inv.oma_vm_id;

    // A network is found by id; an id CloudStack does not know (431) is none.
    let net = c
        .find_network(&inv.test_network_id)
        .await
        .unwrap()
        .expect("the test network");
    assert_eq!(net.id, inv.test_network_id);
    assert!(!net.name.is_empty());
    assert_eq!(
        c.find_network("8f3c0000-0000-4000-8000-00000000dead").await.unwrap(),
        None
    );

    // The sample offering is a custom one; an unknown id is none.
    let offering = c
        .find_service_offering(&inv.service_offering_id)
        .await
        .unwrap()
        .expect("the offering");
    assert!(offering.is_customized);
    assert_eq!(
        c.find_service_offering("8f3c0000-0000-4000-8000-00000000dead")
            .await
            .unwrap(),
        None
    );
    // A custom offering without the VM's size is refused, as CloudStack does.
    let mut no_size = deploy("tern-unsized", inv, false);
    if let AsyncCommand::DeployVm { extra, .. } = &mut no_size {
        extra.clear();
    }
    let e = c.issue(no_size).await.unwrap_err();
    assert!(matches!(e, ProviderError::BadParameter { code: 431, .. }), "{e:?}");

    // Empty lists are empty vectors.
    assert!(c.list_vms(VmFilter::name("tern-none")).await.unwrap().is_empty());
    assert!(c
        .list_snapshots(SnapshotFilter {
            volume_id: Some(source.volume_id.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .is_empty());
    assert!(c.list_vm_snapshots(oma).await.unwrap().is_empty());
    assert!(matches!(
        c.get_vm("no-such-vm").await,
        Err(ProviderError::NotFound { .. })
    ));

    // The replicated volume sits on the OMA as a data disk.
    let vol = c.get_volume(&source.volume_id).await.unwrap();
    assert_eq!(vol.vm_id.as_deref(), Some(oma.as_str()));
    assert_eq!(vol.volume_type, VolumeType::DataDisk);

    // Deploy stopped: the create reply carries the VM id, the job its record.
    let name = "tern-job1-test-vm";
    let job = c.issue(deploy(name, inv, false)).await.unwrap();
    let vm_id = job.resource_id.clone().unwrap();
    let result = c.wait_job(&job.job_id, POLL, WAIT).await.unwrap();
    assert_eq!(result["virtualmachine"]["id"], vm_id.as_str());
    let vm = c.get_vm(&vm_id).await.unwrap();
    assert_eq!(vm.state, VmState::Stopped);
    assert_eq!(vm.cpu_number, Some(4));
    assert_eq!(vm.nics[0].network_id, inv.test_network_id);
    assert_eq!(c.list_vms(VmFilter::name(name)).await.unwrap().len(), 1);
    // Polling a finished job again gives the same answer.
    assert!(matches!(
        c.poll_job(&job.job_id).await.unwrap(),
        JobStatus::Succeeded(_)
    ));

    // Duplicate names are refused synchronously with 431.
    let dup = c.issue(deploy(name, inv, false)).await.unwrap_err();
    assert!(matches!(dup, ProviderError::BadParameter { code: 431, .. }), "{dup}");
    assert!(!dup.is_retryable());

    // deviceid=0 while the VM still has its own ROOT: the job fails with 431.
    let own_root = root_of(c, &vm_id).await;
    run(
        c,
        AsyncCommand::DetachVolume {
            volume_id: source.volume_id.clone(),
        },
    )
    .await
    .unwrap();
    let err = run(
        c,
        AsyncCommand::AttachVolume {
            volume_id: source.volume_id.clone(),
            vm_id: vm_id.clone(),
            device_id: Some(0),
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, ProviderError::AsyncJobFailed { errorcode: 431, .. }),
        "{err}"
    );
    assert!(!err.is_retryable());

    // Swap the ROOT disk: detach and delete the VM's own, attach the replica at device 0.
    run(
        c,
        AsyncCommand::DetachVolume {
            volume_id: own_root.clone(),
        },
    )
    .await
    .unwrap();
    c.delete_volume(&own_root).await.unwrap();
    assert!(matches!(
        c.get_volume(&own_root).await,
        Err(ProviderError::NotFound { .. })
    ));
    let attached = run(
        c,
        AsyncCommand::AttachVolume {
            volume_id: source.volume_id.clone(),
            vm_id: vm_id.clone(),
            device_id: Some(0),
        },
    )
    .await
    .unwrap();
    assert_eq!(attached["volume"]["type"], "ROOT");
    let vol = c.get_volume(&source.volume_id).await.unwrap();
    assert_eq!(vol.volume_type, VolumeType::Root);
    assert_eq!(vol.device_id, Some(0));

    // An attached volume cannot be attached elsewhere.
    let err = run(
        c,
        AsyncCommand::AttachVolume {
            volume_id: source.volume_id.clone(),
            vm_id: oma.clone(),
            device_id: None,
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ProviderError::AsyncJobFailed { errorcode: 431, .. }));

    // Start; a ROOT volume cannot be detached from a running VM.
    run(c, AsyncCommand::StartVm { id: vm_id.clone() }).await.unwrap();
    assert_eq!(c.get_vm(&vm_id).await.unwrap().state, VmState::Running);
    let err = run(
        c,
        AsyncCommand::DetachVolume {
            volume_id: source.volume_id.clone(),
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ProviderError::AsyncJobFailed { errorcode: 431, .. }));

    // A volume snapshot cannot be reverted while its VM runs.
    let snap_job = c
        .issue(AsyncCommand::CreateSnapshot {
            volume_id: source.volume_id.clone(),
            name: "tern-job1-snap".into(),
        })
        .await
        .unwrap();
    let snap_id = snap_job.resource_id.clone().unwrap();
    let snap = c.wait_job(&snap_job.job_id, POLL, WAIT).await.unwrap();
    assert_eq!(snap["snapshot"]["state"], "BackedUp");
    let err = run(c, AsyncCommand::RevertSnapshot { id: snap_id.clone() })
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::AsyncJobFailed { errorcode: 431, .. }));

    // Stop; then revert works, unless the VM has VM snapshots.
    run(
        c,
        AsyncCommand::StopVm {
            id: vm_id.clone(),
            forced: false,
        },
    )
    .await
    .unwrap();
    assert_eq!(c.get_vm(&vm_id).await.unwrap().state, VmState::Stopped);
    let vms_job = c
        .issue(AsyncCommand::CreateVmSnapshot {
            vm_id: vm_id.clone(),
            name: "tern-job1-vmsnap".into(),
        })
        .await
        .unwrap();
    let vm_snap_id = vms_job.resource_id.clone().unwrap();
    c.wait_job(&vms_job.job_id, POLL, WAIT).await.unwrap();
    assert_eq!(c.list_vm_snapshots(&vm_id).await.unwrap()[0].state, "Ready");
    let err = run(c, AsyncCommand::RevertSnapshot { id: snap_id.clone() })
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::AsyncJobFailed { errorcode: 431, .. }));
    run(c, AsyncCommand::RevertToVmSnapshot { id: vm_snap_id.clone() })
        .await
        .unwrap();
    run(c, AsyncCommand::DeleteVmSnapshot { id: vm_snap_id }).await.unwrap();
    let reverted = run(c, AsyncCommand::RevertSnapshot { id: snap_id.clone() })
        .await
        .unwrap();
    assert_eq!(reverted["snapshot"]["id"], snap_id.as_str());
    let deleted = run(c, AsyncCommand::DeleteSnapshot { id: snap_id }).await.unwrap();
    assert_eq!(deleted, serde_json::json!({"success": true}));

    // Give the volume back to the OMA: detach (stopped VM) makes it a data disk again.
    let detached = run(
        c,
        AsyncCommand::DetachVolume {
            volume_id: source.volume_id.clone(),
        },
    )
    .await
    .unwrap();
    assert_eq!(detached["volume"]["type"], "DATADISK");
    run(
        c,
        AsyncCommand::AttachVolume {
            volume_id: source.volume_id.clone(),
            vm_id: oma.clone(),
            device_id: None,
        },
    )
    .await
    .unwrap();
    let vol = c.get_volume(&source.volume_id).await.unwrap();
    assert_eq!(vol.vm_id.as_deref(), Some(oma.as_str()));
    assert_eq!(vol.volume_type, VolumeType::DataDisk);

    // Destroy with expunge: the VM is gone.
    run(
        c,
        AsyncCommand::DestroyVm {
            id: vm_id.clone(),
            expunge: true,
        },
    )
    .await
    .unwrap();
    assert!(c.list_vms(VmFilter::id(&vm_id)).await.unwrap().is_empty());
}

#[tokio::test]
async fn cloudstack_client_passes_the_cloud_conformance_suite() {
    let sim = start(config()).await;
    let inv = sim.inventory().await;
    assert_eq!(inv, sim::sample_inventory(42));
    conformance_cloud(&sim.cloud(), &inv).await;
    let report = sim.invariant("tern-job1", Some(&inv.oma_vm_id)).await;
    assert!(report.ok, "{report:?}");
    sim.stop().await;
}

#[tokio::test]
async fn post_requests_are_signed_the_same_way() {
    let sim = start(config()).await;
    let mut cfg = sim.cloud_config();
    cfg.post_threshold = 0;
    let c = CloudStackClient::new(cfg).unwrap();
    let inv = sim.inventory().await;
    let vols = c.list_volumes(VolumeFilter::vm(&inv.oma_vm_id)).await.unwrap();
    let replicated: usize = inv.vms.iter().map(|v| v.volume_ids().count()).sum();
    assert_eq!(vols.len(), 1 + replicated);
    let mut cmd = deploy("tern-post-vm", &inv, false);
    if let AsyncCommand::DeployVm { display_name, .. } = &mut cmd {
        *display_name = Some("x ~*+/é ".repeat(300));
    }
    run(&c, cmd).await.unwrap();
    sim.stop().await;
}

#[tokio::test]
async fn wrong_secret_is_unauthorized_and_never_leaks() {
    let sim = start(config()).await;
    let mut cfg = sim.cloud_config();
    cfg.secret_key = "wrong-secret-7f3a".into();
    let c = CloudStackClient::new(cfg.clone()).unwrap();
    let err = c.list_vms(VmFilter::default()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Unauthorized { .. }), "{err}");
    assert!(!err.is_retryable());
    for text in [err.to_string(), format!("{err:?}"), format!("{c:?}")] {
        assert!(!text.contains("wrong-secret-7f3a"), "{text}");
        assert!(!text.contains(API_KEY), "{text}");
        assert!(!text.contains("signature="), "{text}");
    }

    // Unknown API key, expired request: 401 too.
    let mut bad_key = sim.cloud_config();
    bad_key.api_key = "nobody".into();
    let err = CloudStackClient::new(bad_key)
        .unwrap()
        .list_vms(VmFilter::default())
        .await;
    assert!(matches!(err, Err(ProviderError::Unauthorized { .. })));
    let signed = |expires: std::time::SystemTime| {
        let params: Vec<(String, String)> = [
            ("command", "listZones".to_string()),
            ("apiKey", API_KEY.to_string()),
            ("response", "json".to_string()),
            ("signatureVersion", "3".to_string()),
            ("expires", sign::format_expires(expires)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let signature = sign::java_url_encode(&sign::signature(&params, SECRET));
        format!(
            "{}/client/api?{}&signature={signature}",
            sim.base,
            sign::canonical_query(&params)
        )
    };
    let now = std::time::SystemTime::now();
    let fresh = sim.http.get(signed(now + WAIT)).send().await.unwrap();
    assert_eq!(fresh.status().as_u16(), 200);
    let expired = sim.http.get(signed(now - WAIT)).send().await.unwrap();
    assert_eq!(expired.status().as_u16(), 401);
    sim.stop().await;
}

#[tokio::test]
async fn sync_errors_are_typed() {
    let sim = start(config()).await;
    let c = sim.cloud();
    // Missing parameter: 431 with CloudStack's text.
    let err = c
        .call("attachVolume", vec![("id".into(), "x".into())])
        .await
        .unwrap_err();
    match &err {
        ProviderError::BadParameter { code: 431, errortext } => {
            assert!(errortext.contains("missing parameter virtualmachineid"), "{errortext}")
        }
        other => panic!("{other}"),
    }
    // A list filtered by an id that never existed: 431 on the wire, an empty list (and
    // NotFound for a get) from the client.
    let err = c
        .call("listVirtualMachines", vec![("id".into(), "nope".into())])
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::BadParameter { code: 431, .. }));
    assert!(c.list_vms(VmFilter::id("nope")).await.unwrap().is_empty());
    assert!(c.list_vm_snapshots("nope").await.unwrap().is_empty());
    // Unknown id: 431.
    let err = c.issue(AsyncCommand::StartVm { id: "nope".into() }).await.unwrap_err();
    assert!(matches!(err, ProviderError::BadParameter { code: 431, .. }));
    // Unknown command: 401 (CloudStack cannot tell it from a bad signature).
    let err = c.call("frobnicate", vec![]).await.unwrap_err();
    assert!(matches!(err, ProviderError::Unauthorized { .. }));
    // Deleting an attached volume: 431.
    let inv = sim.inventory().await;
    let err = c.delete_volume(&inv.vms[1].volume_id).await.unwrap_err();
    assert!(matches!(err, ProviderError::BadParameter { code: 431, .. }));
    // A job that is still pending past the wait is a retryable JobTimeout.
    let job = c
        .issue(AsyncCommand::StopVm {
            id: inv.oma_vm_id.clone(),
            forced: false,
        })
        .await
        .unwrap();
    let err = c
        .wait_job(&job.job_id, Duration::from_millis(1), Duration::from_millis(1))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::JobTimeout { .. }) && err.is_retryable());
    sim.stop().await;
}

#[tokio::test]
async fn injected_530_and_job_failure_are_retryable() {
    let mut cfg = config();
    let mut p = plan(
        "listVolumes",
        FaultRates {
            error_rate: 1.0,
            ..Default::default()
        },
    );
    p.commands.insert(
        "startVirtualMachine".into(),
        FaultRates {
            job_failure_rate: 1.0,
            ..Default::default()
        },
    );
    cfg.fault_plan = Some(p);
    let sim = start(cfg).await;
    let c = sim.cloud();
    let err = c.list_volumes(VolumeFilter::default()).await.unwrap_err();
    assert!(matches!(err, ProviderError::Internal { code: 530, .. }) && err.is_retryable());
    let inv = sim.inventory().await;
    let err = run(
        &c,
        AsyncCommand::StartVm {
            id: inv.oma_vm_id.clone(),
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, ProviderError::AsyncJobFailed { errorcode: 530, .. }) && err.is_retryable(),
        "{err}"
    );
    sim.stop().await;
}

#[tokio::test]
async fn hang_past_the_client_timeout_is_unavailable() {
    let mut cfg = config();
    let mut p = plan(
        "listZones",
        FaultRates {
            hang_rate: 1.0,
            ..Default::default()
        },
    );
    p.hang_ms = Some(2_000);
    cfg.fault_plan = Some(p);
    let sim = start(cfg).await;
    let mut cc = sim.cloud_config();
    cc.request_timeout = Duration::from_millis(200);
    let c = CloudStackClient::new(cc).unwrap();
    let err = c.call("listZones", vec![]).await.unwrap_err();
    assert!(matches!(err, ProviderError::Unavailable { .. }), "{err}");
    assert!(err.is_retryable() && err.may_have_applied());
    assert!(!err.to_string().contains("signature") && !err.to_string().contains(API_KEY));
    sim.stop().await;
}

/// A mutation held up on the way past the client's timeout (the server handles it when it
/// arrives, whether or not the client is still there): the client returns its error only once
/// the request has expired, and a server that sees the request after that refuses it. So what
/// the caller finds when it then looks at the world stays so: the request landed before the
/// look (held up 1.5 s, not yet expired) or never lands (held up 3 s, refused as expired).
#[tokio::test]
async fn a_mutation_held_up_past_its_timeout_lands_before_the_caller_looks_or_never() {
    for hang_ms in [1_500, 3_000] {
        let mut cfg = config();
        let mut p = plan(
            "detachVolume",
            FaultRates {
                hang_rate: 1.0,
                ..Default::default()
            },
        );
        p.hang_ms = Some(hang_ms);
        cfg.fault_plan = Some(p);
        let sim = start(cfg).await;
        let inv = sim.inventory().await;
        let mut cc = sim.cloud_config();
        cc.request_timeout = Duration::from_secs(1);
        cc.clock_skew = Duration::from_millis(300);
        let c = CloudStackClient::new(cc).unwrap();
        let volume = inv.vms[0].volume_id.clone();
        let cmd = AsyncCommand::DetachVolume {
            volume_id: volume.clone(),
        };
        let err = c.issue(cmd).await.unwrap_err();
        assert!(err.may_have_applied(), "{err}");
        // A job the late request started finishes within the simulator's latency.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let seen = c.get_volume(&volume).await.unwrap();
        tokio::time::sleep(Duration::from_millis(3_000)).await;
        let later = c.get_volume(&volume).await.unwrap();
        assert_eq!(
            later.vm_id, seen.vm_id,
            "held up {hang_ms} ms: nothing landed after the look"
        );
        if hang_ms == 3_000 {
            assert_eq!(
                later.vm_id.as_deref(),
                Some(inv.oma_vm_id.as_str()),
                "refused as expired"
            );
        }
        let faults = sim.get("/sim/faults").await;
        assert_eq!(faults.as_array().map(Vec::len), Some(1), "{faults}");
        sim.stop().await;
    }
}

#[tokio::test]
async fn lost_reply_leaves_a_resource_the_client_can_adopt() {
    let mut cfg = config();
    let mut p = plan(
        "deployVirtualMachine",
        FaultRates {
            lost_reply_rate: 1.0,
            ..Default::default()
        },
    );
    p.commands.insert(
        "createSnapshot".into(),
        FaultRates {
            lost_reply_rate: 1.0,
            ..Default::default()
        },
    );
    cfg.fault_plan = Some(p);
    let sim = start(cfg).await;
    let c = Arc::new(sim.cloud());
    let inv = sim.inventory().await;
    let err = c.issue(deploy("tern-lost-vm", &inv, false)).await.unwrap_err();
    assert!(err.may_have_applied() && err.is_retryable(), "{err}");
    let found = c.list_vms(VmFilter::name("tern-lost-vm")).await.unwrap();
    assert_eq!(found.len(), 1);

    // The snapshot backend adopts the snapshot whose reply was lost.
    let backend = VolumeSnapshots::new(c.clone(), POLL, WAIT);
    let volume = &inv.vms[0].volume_id;
    let s = backend.create(volume, "tern-lost-snap").await.unwrap();
    assert!(s.ready);
    assert_eq!(backend.list(volume).await.unwrap().len(), 1);
    sim.stop().await;
}

#[tokio::test]
async fn same_seed_gives_the_same_faults() {
    async fn pattern(seed: u64) -> (Vec<bool>, Value) {
        let mut cfg = config();
        cfg.seed = seed;
        cfg.fault_plan = Some(plan(
            "listVolumes",
            FaultRates {
                error_rate: 0.5,
                ..Default::default()
            },
        ));
        let sim = start(cfg).await;
        let c = sim.cloud();
        let mut out = Vec::new();
        for _ in 0..24 {
            out.push(c.list_volumes(VolumeFilter::default()).await.is_ok());
        }
        let log = sim.get("/sim/faults").await;
        sim.stop().await;
        (out, log)
    }
    let (a, log_a) = pattern(9).await;
    let (b, log_b) = pattern(9).await;
    let (c, _) = pattern(10).await;
    assert_eq!(a, b);
    assert_eq!(log_a, log_b);
    assert!(a.contains(&true) && a.contains(&false));
    assert_ne!(a, c);
}

#[tokio::test]
async fn state_and_pending_jobs_survive_a_simulator_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config();
    cfg.state_file = Some(dir.path().join("sim.json"));
    cfg.async_latency = Duration::from_millis(150);

    let sim = start(cfg.clone()).await;
    let inv = sim.inventory().await;
    let c = sim.cloud();
    run(&c, deploy("tern-persist-vm", &inv, false)).await.unwrap();
    let gen = sim.write(&inv.vms[2].volume_id).await;
    // Issue a job and stop the simulator before it completes.
    let job = c.issue(deploy("tern-persist-vm2", &inv, false)).await.unwrap();
    sim.stop().await;

    let sim = start(cfg).await;
    let c = sim.cloud();
    assert_eq!(sim.inventory().await, inv);
    assert_eq!(c.list_vms(VmFilter::name("tern-persist-vm")).await.unwrap().len(), 1);
    assert_eq!(sim.generation(&inv.vms[2].volume_id).await, gen);
    let result = c.wait_job(&job.job_id, POLL, WAIT).await.unwrap();
    assert_eq!(result["virtualmachine"]["name"], "tern-persist-vm2");
    sim.stop().await;
}

/// Create / adopt / revert / delete against any [`SnapshotBackend`]. `volume_id` is the
/// volume whose content the target covers; its VM (if any) is stopped.
async fn conformance_snapshots(b: &dyn SnapshotBackend, sim: &Sim, target: &str, volume_id: &str) {
    let name = format!("tern-conf-{}", b.kind());
    assert!(b.find(target, &name).await.unwrap().is_none());
    let before = sim.generation(volume_id).await;

    let created = b.create(target, &name).await.unwrap();
    assert!(created.ready);
    assert_eq!(created.name, name);
    // Idempotent: the same name adopts the same snapshot.
    let again = b.create(target, &name).await.unwrap();
    assert_eq!(again.id, created.id);
    let listed = b.list(target).await.unwrap();
    assert_eq!(listed.iter().filter(|s| s.name == name).count(), 1);

    // Revert undoes writes.
    sim.write(volume_id).await;
    sim.write(volume_id).await;
    assert_eq!(sim.generation(volume_id).await, before + 2);
    b.revert(target, &name).await.unwrap();
    assert_eq!(sim.generation(volume_id).await, before);

    // Delete is idempotent; a deleted snapshot cannot be reverted to.
    b.delete(target, &name).await.unwrap();
    b.delete(target, &name).await.unwrap();
    assert!(b.find(target, &name).await.unwrap().is_none());
    let err = b.revert(target, &name).await.unwrap_err();
    assert!(matches!(err, ProviderError::NotFound { .. }), "{err}");
}

/// A stopped VM of its own with a ROOT volume, for the snapshot backends.
async fn stopped_vm(c: &dyn Cloud, inv: &SampleInventory, name: &str) -> (String, String) {
    let job = c.issue(deploy(name, inv, false)).await.unwrap();
    c.wait_job(&job.job_id, POLL, WAIT).await.unwrap();
    let vm_id = job.resource_id.unwrap();
    let root = root_of(c, &vm_id).await;
    (vm_id, root)
}

#[tokio::test]
async fn snapshot_backends_pass_the_conformance_suite() {
    let sim = start(config()).await;
    let inv = sim.inventory().await;
    let cloud: Arc<dyn Cloud> = Arc::new(sim.cloud());

    let (_, root) = stopped_vm(cloud.as_ref(), &inv, "tern-snap-vol").await;
    conformance_snapshots(&VolumeSnapshots::new(cloud.clone(), POLL, WAIT), &sim, &root, &root).await;

    let (vm, root) = stopped_vm(cloud.as_ref(), &inv, "tern-snap-vm").await;
    conformance_snapshots(&VmSnapshots::new(cloud.clone(), POLL, WAIT), &sim, &vm, &root).await;

    let (_, root) = stopped_vm(cloud.as_ref(), &inv, "tern-snap-linstor").await;
    conformance_snapshots(&sim.linstor(), &sim, &resource_name_for_volume(&root), &root).await;

    let report = sim.invariant("tern-conf", None).await;
    assert!(report.ok, "{report:?}");
    sim.stop().await;
}

/// The simulator's list commands honour CloudStack's filters (`id`, `name`, `keyword`,
/// `virtualmachineid`, `type`): a filter it ignored would hide a client that forgot one.
#[tokio::test]
async fn list_commands_honour_cloudstacks_filters() {
    let sim = start(config()).await;
    let inv = sim.inventory().await;
    let c = sim.cloud();
    let list = |command: &'static str, params: &[(&str, &str)]| {
        let params: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let c = &c;
        async move { c.call(command, params).await.unwrap() }
    };
    let count = |v: &Value, key: &str| v[key].as_array().map_or(0, Vec::len);
    let oma = inv.oma_vm_id.as_str();
    let replicated: usize = inv.vms.iter().map(|v| v.volume_ids().count()).sum();
    let all = list("listVolumes", &[("virtualmachineid", oma)]).await;
    assert_eq!(count(&all, "volume"), replicated + 1);
    let data = list("listVolumes", &[("virtualmachineid", oma), ("type", "DATADISK")]).await;
    assert_eq!(count(&data, "volume"), replicated);
    let root = list("listVolumes", &[("virtualmachineid", oma), ("type", "ROOT")]).await;
    assert_eq!(count(&root, "volume"), 1);
    let win = list("listVolumes", &[("keyword", "WIN-APP-01")]).await;
    assert_eq!(count(&win, "volume"), 3, "{win}");
    let by_keyword = list("listVirtualMachines", &[("keyword", "APPLIANCE")]).await;
    assert_eq!(count(&by_keyword, "virtualmachine"), 1);
    let none = list("listVirtualMachines", &[("keyword", "no-such-vm")]).await;
    assert_eq!(count(&none, "virtualmachine"), 0);
    let by_name = list("listVirtualMachines", &[("name", "oma-appliance-01")]).await;
    assert_eq!(count(&by_name, "virtualmachine"), 1);
    let nets = list("listNetworks", &[("keyword", "dmz")]).await;
    assert_eq!(count(&nets, "network"), 1);
    assert_eq!(nets["network"][0]["id"], json!(inv.dmz_network_id));
    sim.stop().await;
}

/// NICs as CloudStack reads them: `networkids` may name a network twice; `iptonetworklist`
/// keeps IPs and MACs in order, gives a VM one NIC per network, refuses an address outside the
/// network or taken, and is never combined with `networkids`.
#[tokio::test]
async fn a_deploy_keeps_each_nic_in_order_with_its_address() {
    let sim = start(config()).await;
    let inv = sim.inventory().await;
    let c = sim.cloud();
    let nic = |net: &str, ip: Option<&str>, mac: Option<&str>| NicRequest {
        network_id: net.to_string(),
        ip: ip.map(str::to_string),
        mac: mac.map(str::to_string),
    };
    let with_nics = |name: &str, nics: Vec<NicRequest>| {
        let mut cmd = deploy(name, &inv, false);
        if let AsyncCommand::DeployVm { nics: n, .. } = &mut cmd {
            *n = nics;
        }
        cmd
    };
    let nets = c.find_network(&inv.production_network_id).await.unwrap().unwrap();
    assert_eq!(nets.cidr.as_deref(), Some("10.0.0.0/16"));

    let twice = with_nics(
        "tern-nic-twice",
        vec![
            nic(&inv.test_network_id, None, None),
            nic(&inv.test_network_id, None, None),
        ],
    );
    let job = c.issue(twice).await.unwrap();
    c.wait_job(&job.job_id, POLL, WAIT).await.unwrap();
    let vm = c.get_vm(&job.resource_id.unwrap()).await.unwrap();
    assert_eq!(vm.nics.len(), 2, "networkids may name a network twice");

    let kept = with_nics(
        "tern-nic-kept",
        vec![
            nic(&inv.production_network_id, Some("10.0.1.77"), Some("00:50:56:aa:bb:01")),
            nic(&inv.dmz_network_id, Some("10.2.1.77"), Some("00:50:56:aa:bb:02")),
        ],
    );
    let job = c.issue(kept).await.unwrap();
    c.wait_job(&job.job_id, POLL, WAIT).await.unwrap();
    let vm = c.get_vm(&job.resource_id.unwrap()).await.unwrap();
    let got: Vec<(&str, Option<&str>, Option<&str>)> = vm
        .nics
        .iter()
        .map(|n| (n.network_id.as_str(), n.ip_address.as_deref(), n.mac_address.as_deref()))
        .collect();
    assert_eq!(
        got,
        [
            (
                inv.production_network_id.as_str(),
                Some("10.0.1.77"),
                Some("00:50:56:aa:bb:01")
            ),
            (
                inv.dmz_network_id.as_str(),
                Some("10.2.1.77"),
                Some("00:50:56:aa:bb:02")
            ),
        ]
    );
    assert!(vm.nics[0].is_default);

    let taken = with_nics(
        "tern-nic-taken",
        vec![nic(&inv.production_network_id, Some("10.0.1.77"), None)],
    );
    // IPs are allocated when the deploy is accepted (before its job), as CloudStack does.
    let err = c.issue(taken).await.unwrap_err();
    assert!(err.to_string().contains("Unable to acquire Guest IP address"), "{err}");
    let outside = with_nics(
        "tern-nic-out",
        vec![nic(&inv.production_network_id, Some("192.168.9.9"), None)],
    );
    let err = c.issue(outside).await.unwrap_err();
    assert!(err.to_string().contains("Unable to acquire Guest IP address"), "{err}");
    let bad_mac = with_nics(
        "tern-nic-mac",
        vec![nic(&inv.production_network_id, None, Some("01:00:5e:00:00:01"))],
    );
    let err = c.issue(bad_mac).await.unwrap_err();
    assert!(err.to_string().contains("Mac address is not unicast"), "{err}");
    sim.stop().await;
}

/// A group of targets: LINSTOR takes them at one instant (its multi-snapshot action, one
/// request) and adopts a group an earlier attempt took; a backend without that takes them one
/// after the other and says so.
#[tokio::test]
async fn a_group_snapshot_is_taken_at_one_instant_where_the_backend_can() {
    let sim = start(config()).await;
    let inv = sim.inventory().await;
    let cloud: Arc<dyn Cloud> = Arc::new(sim.cloud());
    let (_, a) = stopped_vm(cloud.as_ref(), &inv, "tern-grp-a").await;
    let (_, b) = stopped_vm(cloud.as_ref(), &inv, "tern-grp-b").await;

    let linstor = sim.linstor();
    let rscs = [resource_name_for_volume(&a), resource_name_for_volume(&b)];
    let group = linstor.create_group(&rscs, "tern-grp").await.unwrap();
    assert!(group.consistent);
    let targets: Vec<&str> = group.snapshots.iter().map(|s| s.target.as_str()).collect();
    assert_eq!(targets, [rscs[0].as_str(), rscs[1].as_str()]);
    assert!(group.snapshots.iter().all(|s| s.ready));
    let requests = sim.get("/sim/requests").await;
    assert_eq!(requests["linstor.createMultiSnapshot"]["count"], json!(1), "{requests}");
    assert!(requests.get("linstor.createSnapshot").is_none(), "{requests}");
    // Adopted, not taken again.
    let again = linstor.create_group(&rscs, "tern-grp").await.unwrap();
    assert!(again.consistent);
    assert_eq!(
        sim.get("/sim/requests").await["linstor.createMultiSnapshot"]["count"],
        json!(1)
    );
    // One already there (not from a group): the rest one at a time, and it says so.
    linstor.create(&rscs[0], "tern-grp2").await.unwrap();
    let partial = linstor.create_group(&rscs, "tern-grp2").await.unwrap();
    assert!(!partial.consistent);
    assert_eq!(partial.snapshots.len(), 2);

    let volumes = VolumeSnapshots::new(cloud.clone(), POLL, WAIT);
    let group = volumes.create_group(&[a.clone(), b.clone()], "tern-grp").await.unwrap();
    assert!(!group.consistent, "volume snapshots are taken one by one");
    assert_eq!(group.snapshots.len(), 2);
    let one = volumes
        .create_group(std::slice::from_ref(&a), "tern-grp-one")
        .await
        .unwrap();
    assert!(one.consistent, "a single disk is consistent with itself");

    let state = sim.get("/sim/state").await;
    let created = &state["created"];
    for key in [
        format!("linstor:{}/tern-grp", rscs[0]),
        format!("linstor:{}/tern-grp", rscs[1]),
    ] {
        assert_eq!(created[&key], json!(1), "{key}: {created}");
    }
    sim.stop().await;
}

#[tokio::test]
async fn linstor_errors_are_typed() {
    let mut cfg = config();
    cfg.fault_plan = Some(plan(
        "linstor.deleteSnapshot",
        FaultRates {
            error_rate: 1.0,
            ..Default::default()
        },
    ));
    let sim = start(cfg).await;
    let inv = sim.inventory().await;
    let l = sim.linstor();
    let rsc = &inv.vms[0].linstor_resource;

    assert!(matches!(
        l.list_snapshots("cs-unknown").await,
        Err(ProviderError::NotFound { .. })
    ));
    assert!(matches!(
        l.rollback_snapshot(rsc, "missing").await,
        Err(ProviderError::NotFound { .. })
    ));
    l.create_snapshot(rsc, "tern-ls-1").await.unwrap();
    assert!(l.list_snapshots(rsc).await.unwrap()[0].is_successful());
    // Exists: an error ret_code (HTTP 500) mapped to InvalidState.
    assert!(matches!(
        l.create_snapshot(rsc, "tern-ls-1").await,
        Err(ProviderError::InvalidState { .. })
    ));
    // In use: the volume is attached to the running OMA.
    assert!(matches!(
        l.rollback_snapshot(rsc, "tern-ls-1").await,
        Err(ProviderError::InvalidState { .. })
    ));
    // An error ret_code on HTTP 200 is an error.
    let err = l.delete_snapshot(rsc, "tern-ls-1").await.unwrap_err();
    assert!(
        matches!(err, ProviderError::Internal { code: 200, .. }) && err.is_retryable(),
        "{err}"
    );
    let report = sim.invariant("tern-ls", None).await;
    assert_eq!(report.leaked_linstor_snapshots.len(), 1);
    assert!(!report.ok);
    sim.stop().await;
}

#[tokio::test]
async fn invariant_catches_an_expunged_replica() {
    let sim = start(config()).await;
    let inv = sim.inventory().await;
    let c = sim.cloud();
    let source = &inv.vms[1];
    let (vm, root) = stopped_vm(&c, &inv, "tern-bad-vm").await;
    run(
        &c,
        AsyncCommand::DetachVolume {
            volume_id: root.clone(),
        },
    )
    .await
    .unwrap();
    c.delete_volume(&root).await.unwrap();
    run(
        &c,
        AsyncCommand::DetachVolume {
            volume_id: source.volume_id.clone(),
        },
    )
    .await
    .unwrap();
    let report = sim.invariant("tern-bad", None).await;
    assert!(
        !report.ok
            && !report
                .volumes
                .iter()
                .find(|v| v.volume_id == source.volume_id)
                .unwrap()
                .ok
    );
    run(
        &c,
        AsyncCommand::AttachVolume {
            volume_id: source.volume_id.clone(),
            vm_id: vm.clone(),
            device_id: Some(0),
        },
    )
    .await
    .unwrap();
    // Expunging a VM whose ROOT is the replica deletes the replica, as CloudStack would.
    run(&c, AsyncCommand::DestroyVm { id: vm, expunge: true })
        .await
        .unwrap();
    let report = sim.invariant("tern-bad", None).await;
    let check = report.volumes.iter().find(|v| v.volume_id == source.volume_id).unwrap();
    assert!(!check.exists && !report.ok);
    assert!(report.leaked_vms.is_empty());
    sim.stop().await;
}

#[tokio::test]
async fn wait_job_polls_through_transient_errors() {
    let mut cfg = config();
    let p = plan(
        "queryAsyncJobResult",
        FaultRates {
            error_rate: 0.5,
            ..Default::default()
        },
    );
    // A seed whose first two polls fail: however fast the job ends, the client must poll
    // through errors (with a fixed seed, a job done at the first poll could see none).
    cfg.seed = (0..)
        .find(|seed| (0..2).all(|n| sim::faults::decide(*seed, &p, "queryAsyncJobResult", n, false).is_some()))
        .unwrap();
    cfg.fault_plan = Some(p);
    let sim = start(cfg).await;
    let inv = sim.inventory().await;
    let c = sim.cloud();
    let result = run(&c, deploy("tern-poll-vm", &inv, true)).await.unwrap();
    assert_eq!(result["virtualmachine"]["state"], "Running");
    let faults = sim.get("/sim/faults").await;
    let polls_failed = faults
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["command"] == "queryAsyncJobResult")
        .count();
    assert!(polls_failed >= 2, "{faults}");
    sim.stop().await;
}

#[tokio::test]
async fn a_failed_snapshot_is_replaced_on_retry() {
    let mut cfg = config();
    let p = plan(
        "createSnapshot",
        FaultRates {
            job_failure_rate: 0.5,
            ..Default::default()
        },
    );
    // A seed whose first createSnapshot job fails and whose second succeeds.
    cfg.seed = (0..)
        .find(|seed| {
            sim::faults::decide(*seed, &p, "createSnapshot", 0, true).is_some()
                && sim::faults::decide(*seed, &p, "createSnapshot", 1, true).is_none()
        })
        .unwrap();
    cfg.fault_plan = Some(p);
    let sim = start(cfg).await;
    let inv = sim.inventory().await;
    let cloud: Arc<dyn Cloud> = Arc::new(sim.cloud());
    let backend = VolumeSnapshots::new(cloud.clone(), POLL, WAIT);
    let volume = &inv.vms[0].volume_id;
    let mut failures = 0;
    let snap = loop {
        match backend.create(volume, "tern-retry-snap").await {
            Ok(s) => break s,
            Err(e) => {
                assert!(
                    matches!(e, ProviderError::AsyncJobFailed { errorcode: 530, .. }) && e.is_retryable(),
                    "{e}"
                );
                failures += 1;
                assert!(failures < 20);
            }
        }
    };
    assert!(failures > 0, "the seed should make at least one attempt fail");
    assert!(snap.ready);
    let all = backend.list(volume).await.unwrap();
    assert_eq!(all.len(), 1, "{all:?}");
    sim.stop().await;
}

/// CloudStack and LINSTOR behind a private CA: the clients talk HTTPS to the simulator when
/// given the CA (`TERN_CLOUDSTACK_CA_FILE`, `TERN_LINSTOR_CA_FILE`), and refuse a server whose
/// certificate they cannot verify.
#[tokio::test]
async fn cloudstack_and_linstor_over_https_with_a_private_ca() {
    let pki = crate::common::pki::Pki::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("https://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (cert, key) = (pki.read("server.pem"), pki.read("server.key"));
    tokio::spawn(async move {
        sim::serve_tls(listener, config(), &cert, &key, async move {
            let _ = rx.await;
        })
        .await
    });
    let ca = pki.read("ca.pem");
    let mut cfg = CloudStackConfig::new(format!("{base}/client/api"), API_KEY, SECRET);
    cfg.request_timeout = Duration::from_secs(5);
    cfg.ca_pem = Some(ca.clone());
    let cloud = CloudStackClient::new(cfg.clone()).unwrap();
    let vms = cloud.list_vms(VmFilter::name("tern-none")).await.unwrap();
    assert!(vms.is_empty());
    let inv = sim::sample_inventory(42);
    let linstor = LinstorClient::with_ca(&base, Duration::from_secs(5), Some(&ca)).unwrap();
    let rsc = resource_name_for_volume(&inv.vms[0].volume_id);
    assert!(linstor.find(&rsc, "tern-none").await.unwrap().is_none());

    // Without the CA the server's certificate is not trusted: a transport error, not an answer.
    cfg.ca_pem = None;
    let untrusted = CloudStackClient::new(cfg.clone())
        .unwrap()
        .list_vms(VmFilter::name("x"))
        .await;
    assert!(
        matches!(untrusted, Err(ProviderError::Unavailable { .. })),
        "{untrusted:?}"
    );
    let unverified = LinstorClient::new(&base, Duration::from_secs(5))
        .unwrap()
        .find(&rsc, "x")
        .await;
    assert!(unverified.is_err());
    // A CA file that is not PEM is refused when the client is made.
    cfg.ca_pem = Some(b"not a certificate".to_vec());
    assert!(CloudStackClient::new(cfg).is_err());
    let _ = tx.send(());
}
