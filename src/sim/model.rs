//! The simulator's world: VMs, volumes, snapshots, async jobs and LINSTOR resource
//! definitions, with CloudStack's rules, persisted as one JSON document.

use std::collections::BTreeMap;
use std::path::Path;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::providers::cloudstack::sign::format_expires;

/// A sync or job error: CloudStack `errorcode` and `errortext`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsError {
    pub code: u16,
    pub text: String,
}

impl CsError {
    pub fn param(text: impl Into<String>) -> Self {
        CsError {
            code: 431,
            text: text.into(),
        }
    }
    pub fn internal(text: impl Into<String>) -> Self {
        CsError {
            code: 530,
            text: text.into(),
        }
    }
}

/// What a volume holds, reduced to what tests need: a write counter and whether VirtIO
/// drivers were injected. Snapshots capture it; reverts restore it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Content {
    pub generation: u64,
    pub virtio_injected: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimNetwork {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimNic {
    pub id: String,
    pub network_id: String,
    pub ip: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimVm {
    pub id: String,
    pub name: String,
    pub display_name: String,
    pub state: String,
    pub service_offering_id: String,
    pub template_id: String,
    pub nics: Vec<SimNic>,
    pub cpu: u32,
    pub memory_mb: u64,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimVolume {
    pub id: String,
    pub name: String,
    pub vm_id: Option<String>,
    pub device_id: Option<u32>,
    /// `ROOT` or `DATADISK`.
    pub volume_type: String,
    pub state: String,
    pub size: u64,
    pub content: Content,
    /// A replicated source volume: the safety invariant watches it.
    pub replicated: bool,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimSnapshot {
    pub id: String,
    pub name: String,
    pub volume_id: String,
    pub state: String,
    pub content: Content,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimVmSnapshot {
    pub id: String,
    pub name: String,
    pub vm_id: String,
    pub state: String,
    /// Content of each volume attached when the snapshot was taken.
    pub contents: BTreeMap<String, Content>,
    pub created_ms: i64,
}

/// What an async job does when it completes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum JobOp {
    Deploy {
        vm_id: String,
        start: bool,
    },
    Start {
        vm_id: String,
    },
    Stop {
        vm_id: String,
    },
    Destroy {
        vm_id: String,
        expunge: bool,
    },
    Attach {
        volume_id: String,
        vm_id: String,
        device_id: Option<u32>,
    },
    Detach {
        volume_id: String,
    },
    CreateSnapshot {
        snapshot_id: String,
    },
    RevertSnapshot {
        snapshot_id: String,
    },
    DeleteSnapshot {
        snapshot_id: String,
    },
    CreateVmSnapshot {
        vm_snapshot_id: String,
    },
    RevertVmSnapshot {
        vm_snapshot_id: String,
    },
    DeleteVmSnapshot {
        vm_snapshot_id: String,
    },
}

impl JobOp {
    fn instance(&self) -> (&'static str, &str) {
        match self {
            JobOp::Deploy { vm_id, .. }
            | JobOp::Start { vm_id }
            | JobOp::Stop { vm_id }
            | JobOp::Destroy { vm_id, .. } => ("VirtualMachine", vm_id),
            JobOp::Attach { volume_id, .. } | JobOp::Detach { volume_id } => ("Volume", volume_id),
            JobOp::CreateSnapshot { snapshot_id }
            | JobOp::RevertSnapshot { snapshot_id }
            | JobOp::DeleteSnapshot { snapshot_id } => ("Snapshot", snapshot_id),
            JobOp::CreateVmSnapshot { vm_snapshot_id }
            | JobOp::RevertVmSnapshot { vm_snapshot_id }
            | JobOp::DeleteVmSnapshot { vm_snapshot_id } => ("VMSnapshot", vm_snapshot_id),
        }
    }
}

/// An async job's lifecycle. It completes when a request (or the ticker) finds it due.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum JobState {
    /// Due at `due_ms`; `fail` is an injected failure decided when the job was accepted.
    Pending {
        due_ms: i64,
        fail: bool,
    },
    Succeeded {
        completed_ms: i64,
        result: Value,
    },
    Failed {
        completed_ms: i64,
        code: u16,
        text: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimJob {
    pub id: String,
    pub seq: u64,
    pub command: String,
    pub op: JobOp,
    pub created_ms: i64,
    pub state: JobState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinstorSnap {
    pub name: String,
    pub content: Content,
    pub created_ms: i64,
}

/// A LINSTOR resource definition backing one CloudStack volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceDefinition {
    pub name: String,
    pub volume_id: String,
    pub snapshots: BTreeMap<String, LinstorSnap>,
}

/// The sample data a `tern dev` setup loads: what was "replicated" and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleInventory {
    pub zone_id: String,
    pub service_offering_id: String,
    pub template_id: String,
    pub oma_vm_id: String,
    pub oma_vm_name: String,
    pub test_network_id: String,
    pub production_network_id: String,
    pub vms: Vec<SampleVm>,
}

/// One replicated source VM: its VMware spec and the CloudStack volume holding its disk,
/// attached to the OMA as a DATADISK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleVm {
    pub name: String,
    pub cpu: u32,
    pub memory_mb: u64,
    /// `windows` or `linux`.
    pub os_type: String,
    pub guest_os: String,
    /// VMware port groups of its NICs, in order.
    pub source_networks: Vec<String>,
    pub volume_id: String,
    pub volume_size: u64,
    /// The LINSTOR resource definition of the volume (`cs-<volume_id>`).
    pub linstor_resource: String,
    pub oma_vm_id: String,
    pub oma_device_id: u32,
}

/// Everything the simulator knows; persisted as JSON after each mutation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct World {
    pub zone_id: String,
    pub zone_name: String,
    pub service_offering_id: String,
    pub template_id: String,
    pub networks: BTreeMap<String, SimNetwork>,
    pub vms: BTreeMap<String, SimVm>,
    pub volumes: BTreeMap<String, SimVolume>,
    pub snapshots: BTreeMap<String, SimSnapshot>,
    pub vm_snapshots: BTreeMap<String, SimVmSnapshot>,
    pub jobs: BTreeMap<String, SimJob>,
    pub linstor: BTreeMap<String, ResourceDefinition>,
    pub inventory: Option<SampleInventory>,
    pub next_seq: u64,
    /// Ids of removed entities: CloudStack still resolves them in list filters (the list is
    /// empty) while a never-seen id is a 431.
    #[serde(default)]
    pub removed: std::collections::BTreeSet<String>,
    /// How many times each named resource was successfully created (`vm:<name>`,
    /// `snapshot:<name>`, `linstor:<name>`): a test's proof that nothing was created twice.
    #[serde(default)]
    pub created: BTreeMap<String, u32>,
}

/// Deterministic ids from the seed, for the catalog and the sample.
struct Ids(ChaCha8Rng);

impl Ids {
    fn next(&mut self) -> String {
        let mut b = [0u8; 16];
        self.0.fill_bytes(&mut b);
        uuid::Builder::from_random_bytes(b).into_uuid().to_string()
    }
}

pub const SAMPLE_VOLUME_SIZE: u64 = 50 * 1024 * 1024 * 1024;

/// The sample inventory the simulator creates for `seed` (same seed, same ids).
pub fn sample_inventory(seed: u64) -> SampleInventory {
    let mut ids = Ids(ChaCha8Rng::seed_from_u64(seed));
    let zone_id = ids.next();
    let service_offering_id = ids.next();
    let template_id = ids.next();
    let test_network_id = ids.next();
    let production_network_id = ids.next();
    let oma_vm_id = ids.next();
    let specs = [
        (
            "win-app-01",
            4,
            8192,
            "windows",
            "Windows Server 2019 (64-bit)",
            vec!["VM Network", "Backup"],
        ),
        ("lnx-web-01", 2, 4096, "linux", "Ubuntu 22.04 LTS", vec!["VM Network"]),
        ("lnx-db-01", 8, 16384, "linux", "Rocky Linux 9", vec!["VM Network"]),
    ];
    let vms = specs
        .into_iter()
        .enumerate()
        .map(|(i, (name, cpu, memory_mb, os, guest, nets))| {
            let volume_id = ids.next();
            SampleVm {
                name: name.to_string(),
                cpu,
                memory_mb,
                os_type: os.to_string(),
                guest_os: guest.to_string(),
                source_networks: nets.into_iter().map(String::from).collect(),
                linstor_resource: crate::providers::linstor::resource_name_for_volume(&volume_id),
                volume_id,
                volume_size: SAMPLE_VOLUME_SIZE,
                oma_vm_id: oma_vm_id.clone(),
                oma_device_id: i as u32 + 1,
            }
        })
        .collect();
    SampleInventory {
        zone_id,
        service_offering_id,
        template_id,
        oma_vm_id,
        oma_vm_name: "oma-appliance-01".into(),
        test_network_id,
        production_network_id,
        vms,
    }
}

impl World {
    /// The catalog (zone, offering, template, networks) and, with `sample`, the OMA and the
    /// replicated volumes attached to it.
    pub fn new(seed: u64, sample: bool, now_ms: i64) -> Self {
        let inv = sample_inventory(seed);
        let mut w = World {
            zone_id: inv.zone_id.clone(),
            zone_name: "sim-zone-1".into(),
            service_offering_id: inv.service_offering_id.clone(),
            template_id: inv.template_id.clone(),
            ..Default::default()
        };
        for (id, name) in [
            (&inv.test_network_id, "tern-test-network"),
            (&inv.production_network_id, "tern-production-network"),
        ] {
            w.networks.insert(
                id.clone(),
                SimNetwork {
                    id: id.clone(),
                    name: name.into(),
                },
            );
        }
        if !sample {
            return w;
        }
        let oma = SimVm {
            id: inv.oma_vm_id.clone(),
            name: inv.oma_vm_name.clone(),
            display_name: inv.oma_vm_name.clone(),
            state: "Running".into(),
            service_offering_id: inv.service_offering_id.clone(),
            template_id: inv.template_id.clone(),
            nics: vec![SimNic {
                id: uuid::Uuid::new_v4().to_string(),
                network_id: inv.production_network_id.clone(),
                ip: "10.0.0.10".into(),
            }],
            cpu: 4,
            memory_mb: 8192,
            created_ms: now_ms,
        };
        w.add_root_volume_for(&oma.id, now_ms);
        w.vms.insert(oma.id.clone(), oma);
        for vm in &inv.vms {
            w.volumes.insert(
                vm.volume_id.clone(),
                SimVolume {
                    id: vm.volume_id.clone(),
                    name: format!("{}-disk0", vm.name),
                    vm_id: Some(inv.oma_vm_id.clone()),
                    device_id: Some(vm.oma_device_id),
                    volume_type: "DATADISK".into(),
                    state: "Ready".into(),
                    size: vm.volume_size,
                    content: Content::default(),
                    replicated: true,
                    created_ms: now_ms,
                },
            );
            w.add_resource_definition(&vm.volume_id);
        }
        w.inventory = Some(inv);
        w
    }

    pub fn load(path: &Path) -> std::io::Result<Option<World>> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes atomically: a temporary file next to `path`, flushed, then renamed over it.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write as _;
        let bytes =
            serde_json::to_vec_pretty(self).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }

    pub fn add_root_volume_for(&mut self, vm_id: &str, now_ms: i64) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        self.next_seq += 1;
        self.volumes.insert(
            id.clone(),
            SimVolume {
                id: id.clone(),
                name: format!("ROOT-{}", self.next_seq),
                vm_id: Some(vm_id.to_string()),
                device_id: Some(0),
                volume_type: "ROOT".into(),
                state: "Ready".into(),
                size: 10 * 1024 * 1024 * 1024,
                content: Content::default(),
                replicated: false,
                created_ms: now_ms,
            },
        );
        self.add_resource_definition(&id);
        id
    }

    fn add_resource_definition(&mut self, volume_id: &str) {
        let name = crate::providers::linstor::resource_name_for_volume(volume_id);
        self.linstor.insert(
            name.clone(),
            ResourceDefinition {
                name,
                volume_id: volume_id.to_string(),
                snapshots: BTreeMap::new(),
            },
        );
    }

    pub fn vm_has_root(&self, vm_id: &str) -> bool {
        self.volumes
            .values()
            .any(|v| v.vm_id.as_deref() == Some(vm_id) && v.device_id == Some(0))
    }

    fn vm_state(&self, vm_id: &str) -> Option<&str> {
        self.vms.get(vm_id).map(|v| v.state.as_str())
    }

    pub fn new_job(&mut self, command: &str, op: JobOp, now_ms: i64, latency_ms: i64, fail: bool) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        self.next_seq += 1;
        self.jobs.insert(
            id.clone(),
            SimJob {
                id: id.clone(),
                seq: self.next_seq,
                command: command.to_string(),
                op,
                created_ms: now_ms,
                state: JobState::Pending {
                    due_ms: now_ms + latency_ms,
                    fail,
                },
            },
        );
        id
    }

    /// Completes every pending job that is due, oldest first. Returns whether anything
    /// changed.
    pub fn complete_due_jobs(&mut self, now_ms: i64) -> bool {
        let mut due: Vec<(u64, String)> = self
            .jobs
            .values()
            .filter(|j| matches!(j.state, JobState::Pending { due_ms, .. } if due_ms <= now_ms))
            .map(|j| (j.seq, j.id.clone()))
            .collect();
        due.sort();
        let changed = !due.is_empty();
        for (_, id) in due {
            let Some(job) = self.jobs.get(&id).cloned() else {
                continue;
            };
            let JobState::Pending { fail, .. } = job.state else {
                continue;
            };
            let outcome = if fail {
                self.fail_job(&job.op);
                Err(CsError::internal(format!(
                    "Failed to execute {}: simulated job failure",
                    job.command
                )))
            } else {
                self.execute(&job.op)
            };
            let state = match outcome {
                Ok(result) => JobState::Succeeded {
                    completed_ms: now_ms,
                    result,
                },
                Err(e) => JobState::Failed {
                    completed_ms: now_ms,
                    code: e.code,
                    text: e.text,
                },
            };
            if let Some(j) = self.jobs.get_mut(&id) {
                j.state = state;
            }
        }
        changed
    }

    /// What a failed job leaves behind, as CloudStack does: a VM in Error, a snapshot in
    /// Error.
    fn fail_job(&mut self, op: &JobOp) {
        match op {
            JobOp::Deploy { vm_id, .. } => {
                if let Some(vm) = self.vms.get_mut(vm_id) {
                    vm.state = "Error".into();
                }
            }
            JobOp::CreateSnapshot { snapshot_id } => {
                if let Some(s) = self.snapshots.get_mut(snapshot_id) {
                    s.state = "Error".into();
                }
            }
            JobOp::CreateVmSnapshot { vm_snapshot_id } => {
                if let Some(s) = self.vm_snapshots.get_mut(vm_snapshot_id) {
                    s.state = "Error".into();
                }
            }
            _ => {}
        }
    }

    fn execute(&mut self, op: &JobOp) -> Result<Value, CsError> {
        match op {
            JobOp::Deploy { vm_id, start } => {
                let vm = self.vms.get_mut(vm_id).ok_or_else(|| gone("VM", vm_id))?;
                vm.state = if *start { "Running" } else { "Stopped" }.into();
                let key = format!("vm:{}", vm.name);
                *self.created.entry(key).or_insert(0) += 1;
                Ok(json!({ "virtualmachine": self.render_vm(vm_id) }))
            }
            JobOp::Start { vm_id } => {
                match self.vm_state(vm_id) {
                    Some("Running") | Some("Stopped") => {}
                    Some(s) => return Err(CsError::param(format!("VM {vm_id} is {s} and cannot be started"))),
                    None => return Err(gone("VM", vm_id)),
                }
                if !self.vm_has_root(vm_id) {
                    return Err(CsError::internal(format!(
                        "Unable to start VM {vm_id}: it has no ROOT volume"
                    )));
                }
                self.set_vm_state(vm_id, "Running");
                Ok(json!({ "virtualmachine": self.render_vm(vm_id) }))
            }
            JobOp::Stop { vm_id } => {
                match self.vm_state(vm_id) {
                    Some("Running") | Some("Stopped") => {}
                    Some(s) => return Err(CsError::param(format!("VM {vm_id} is {s} and cannot be stopped"))),
                    None => return Err(gone("VM", vm_id)),
                }
                self.set_vm_state(vm_id, "Stopped");
                Ok(json!({ "virtualmachine": self.render_vm(vm_id) }))
            }
            JobOp::Destroy { vm_id, expunge } => {
                if !self.vms.contains_key(vm_id) {
                    return Err(gone("VM", vm_id));
                }
                if !*expunge {
                    self.set_vm_state(vm_id, "Destroyed");
                    return Ok(json!({ "virtualmachine": self.render_vm(vm_id) }));
                }
                self.set_vm_state(vm_id, "Expunging");
                let rendered = self.render_vm(vm_id);
                self.expunge_vm(vm_id);
                Ok(json!({ "virtualmachine": rendered }))
            }
            JobOp::Attach {
                volume_id,
                vm_id,
                device_id,
            } => self.attach(volume_id, vm_id, *device_id),
            JobOp::Detach { volume_id } => self.detach(volume_id),
            JobOp::CreateSnapshot { snapshot_id } => {
                let volume_id = self
                    .snapshots
                    .get(snapshot_id)
                    .map(|s| s.volume_id.clone())
                    .ok_or_else(|| gone("snapshot", snapshot_id))?;
                let content = self
                    .volumes
                    .get(&volume_id)
                    .map(|v| v.content)
                    .ok_or_else(|| gone("volume", &volume_id))?;
                if let Some(s) = self.snapshots.get_mut(snapshot_id) {
                    s.content = content;
                    s.state = "BackedUp".into();
                    let key = format!("snapshot:{}", s.name);
                    *self.created.entry(key).or_insert(0) += 1;
                }
                Ok(json!({ "snapshot": self.render_snapshot(snapshot_id) }))
            }
            JobOp::RevertSnapshot { snapshot_id } => {
                let snap = self
                    .snapshots
                    .get(snapshot_id)
                    .cloned()
                    .ok_or_else(|| gone("snapshot", snapshot_id))?;
                let vol = self
                    .volumes
                    .get(&snap.volume_id)
                    .cloned()
                    .ok_or_else(|| gone("volume", &snap.volume_id))?;
                if let Some(vm_id) = &vol.vm_id {
                    if self.vm_state(vm_id) != Some("Stopped") {
                        return Err(CsError::param(format!(
                            "The VM {vm_id} the volume {} is attached to must be Stopped to revert a snapshot",
                            vol.id
                        )));
                    }
                    if self.vm_snapshots.values().any(|s| &s.vm_id == vm_id) {
                        return Err(CsError::param(format!(
                            "Unable to revert snapshot {}: the VM {vm_id} has VM snapshots",
                            snap.id
                        )));
                    }
                }
                if let Some(v) = self.volumes.get_mut(&snap.volume_id) {
                    v.content = snap.content;
                }
                Ok(json!({ "snapshot": self.render_snapshot(snapshot_id) }))
            }
            JobOp::DeleteSnapshot { snapshot_id } => {
                self.snapshots
                    .remove(snapshot_id)
                    .ok_or_else(|| gone("snapshot", snapshot_id))?;
                self.removed.insert(snapshot_id.clone());
                Ok(json!({ "success": true }))
            }
            JobOp::CreateVmSnapshot { vm_snapshot_id } => {
                let vm_id = self
                    .vm_snapshots
                    .get(vm_snapshot_id)
                    .map(|s| s.vm_id.clone())
                    .ok_or_else(|| gone("VM snapshot", vm_snapshot_id))?;
                match self.vm_state(&vm_id) {
                    Some("Running") | Some("Stopped") => {}
                    _ => return Err(CsError::param(format!("VM {vm_id} is not Running or Stopped"))),
                }
                let contents = self
                    .volumes
                    .values()
                    .filter(|v| v.vm_id.as_deref() == Some(vm_id.as_str()))
                    .map(|v| (v.id.clone(), v.content))
                    .collect();
                if let Some(s) = self.vm_snapshots.get_mut(vm_snapshot_id) {
                    s.contents = contents;
                    s.state = "Ready".into();
                }
                Ok(json!({ "vmsnapshot": self.render_vm_snapshot(vm_snapshot_id) }))
            }
            JobOp::RevertVmSnapshot { vm_snapshot_id } => {
                let snap = self
                    .vm_snapshots
                    .get(vm_snapshot_id)
                    .cloned()
                    .ok_or_else(|| gone("VM snapshot", vm_snapshot_id))?;
                if self.vm_state(&snap.vm_id) != Some("Stopped") {
                    return Err(CsError::param(format!(
                        "VM {} must be Stopped to revert to a disk-only VM snapshot",
                        snap.vm_id
                    )));
                }
                for (volume_id, content) in &snap.contents {
                    if let Some(v) = self.volumes.get_mut(volume_id) {
                        if v.vm_id.as_deref() == Some(snap.vm_id.as_str()) {
                            v.content = *content;
                        }
                    }
                }
                Ok(json!({ "virtualmachine": self.render_vm(&snap.vm_id) }))
            }
            JobOp::DeleteVmSnapshot { vm_snapshot_id } => {
                self.vm_snapshots
                    .remove(vm_snapshot_id)
                    .ok_or_else(|| gone("VM snapshot", vm_snapshot_id))?;
                self.removed.insert(vm_snapshot_id.clone());
                Ok(json!({ "success": true }))
            }
        }
    }

    fn set_vm_state(&mut self, vm_id: &str, state: &str) {
        if let Some(vm) = self.vms.get_mut(vm_id) {
            vm.state = state.into();
        }
    }

    /// Expunge removes the VM, its VM snapshots and whatever volume is its ROOT disk (even a
    /// replicated volume attached at device 0: CloudStack deletes it too); data disks are
    /// detached and kept.
    fn expunge_vm(&mut self, vm_id: &str) {
        let attached: Vec<String> = self
            .volumes
            .values()
            .filter(|v| v.vm_id.as_deref() == Some(vm_id))
            .map(|v| v.id.clone())
            .collect();
        for id in attached {
            let is_root = self.volumes.get(&id).is_some_and(|v| v.device_id == Some(0));
            if is_root {
                self.remove_volume(&id);
            } else if let Some(v) = self.volumes.get_mut(&id) {
                v.vm_id = None;
                v.device_id = None;
                v.volume_type = "DATADISK".into();
            }
        }
        let snapshots: Vec<String> = self
            .vm_snapshots
            .values()
            .filter(|s| s.vm_id == vm_id)
            .map(|s| s.id.clone())
            .collect();
        for id in snapshots {
            self.vm_snapshots.remove(&id);
            self.removed.insert(id);
        }
        self.vms.remove(vm_id);
        self.removed.insert(vm_id.to_string());
    }

    pub fn remove_volume(&mut self, volume_id: &str) {
        self.volumes.remove(volume_id);
        self.removed.insert(volume_id.to_string());
        self.linstor.retain(|_, rd| rd.volume_id != volume_id);
    }

    fn attach(&mut self, volume_id: &str, vm_id: &str, device_id: Option<u32>) -> Result<Value, CsError> {
        let vol = self
            .volumes
            .get(volume_id)
            .cloned()
            .ok_or_else(|| gone("volume", volume_id))?;
        let vm_state = self.vm_state(vm_id).ok_or_else(|| gone("VM", vm_id))?.to_string();
        if let Some(other) = &vol.vm_id {
            return Err(CsError::param(format!(
                "Volume {volume_id} is already attached to VM {other}"
            )));
        }
        if vm_state != "Running" && vm_state != "Stopped" {
            return Err(CsError::param(format!(
                "Please specify a VM that is either running or stopped (VM {vm_id} is {vm_state})"
            )));
        }
        let used: Vec<u32> = self
            .volumes
            .values()
            .filter(|v| v.vm_id.as_deref() == Some(vm_id))
            .filter_map(|v| v.device_id)
            .collect();
        let device = match device_id {
            Some(0) => {
                if self.vm_has_root(vm_id) {
                    return Err(CsError::param(format!(
                        "VM {vm_id} already has a ROOT volume; detach it before attaching {volume_id} as device 0"
                    )));
                }
                if vm_state != "Stopped" {
                    return Err(CsError::param(format!(
                        "A ROOT volume can be attached only while VM {vm_id} is Stopped"
                    )));
                }
                0
            }
            Some(d) => {
                if used.contains(&d) {
                    return Err(CsError::param(format!("Device id {d} is in use on VM {vm_id}")));
                }
                d
            }
            None => (1..).find(|d| !used.contains(d)).unwrap_or(1),
        };
        if let Some(v) = self.volumes.get_mut(volume_id) {
            v.vm_id = Some(vm_id.to_string());
            v.device_id = Some(device);
            v.volume_type = if device == 0 { "ROOT" } else { "DATADISK" }.into();
        }
        Ok(json!({ "volume": self.render_volume(volume_id) }))
    }

    fn detach(&mut self, volume_id: &str) -> Result<Value, CsError> {
        let vol = self
            .volumes
            .get(volume_id)
            .cloned()
            .ok_or_else(|| gone("volume", volume_id))?;
        let Some(vm_id) = vol.vm_id.clone() else {
            return Err(CsError::param(format!("Volume {volume_id} is not attached to any VM")));
        };
        if vol.volume_type == "ROOT" && self.vm_state(&vm_id) != Some("Stopped") {
            return Err(CsError::param(format!(
                "A ROOT volume can be detached only while its VM {vm_id} is Stopped"
            )));
        }
        if let Some(v) = self.volumes.get_mut(volume_id) {
            v.vm_id = None;
            v.device_id = None;
            v.volume_type = "DATADISK".into();
        }
        Ok(json!({ "volume": self.render_volume(volume_id) }))
    }

    pub fn render_vm(&self, vm_id: &str) -> Option<Value> {
        let vm = self.vms.get(vm_id)?;
        let nics: Vec<Value> = vm
            .nics
            .iter()
            .enumerate()
            .map(|(i, n)| {
                json!({
                    "id": n.id,
                    "networkid": n.network_id,
                    "networkname": self.networks.get(&n.network_id).map(|x| x.name.as_str()).unwrap_or(""),
                    "ipaddress": n.ip,
                    "isdefault": i == 0,
                    "traffictype": "Guest",
                    "type": "Isolated",
                    "secondaryip": [],
                    "extradhcpoption": []
                })
            })
            .collect();
        let mut v = json!({
            "id": vm.id,
            "name": vm.name,
            "displayname": vm.display_name,
            "account": "admin",
            "domain": "ROOT",
            "created": format_ms(vm.created_ms),
            "state": vm.state,
            "haenable": false,
            "zoneid": self.zone_id,
            "zonename": self.zone_name,
            "templateid": vm.template_id,
            "serviceofferingid": vm.service_offering_id,
            "cpunumber": vm.cpu,
            "cpuspeed": 1000,
            "memory": vm.memory_mb,
            "rootdeviceid": 0,
            "rootdevicetype": "ROOT",
            "hypervisor": "KVM",
            "instancename": format!("i-2-{}-VM", vm.name),
            "nic": nics,
            "securitygroup": [],
            "affinitygroup": [],
            "details": {},
            "tags": [],
            "displayvm": true,
            "isdynamicallyscalable": false
        });
        if vm.state == "Running" {
            v["hostname"] = json!("sim-kvm-host-1");
        }
        Some(v)
    }

    pub fn render_volume(&self, volume_id: &str) -> Option<Value> {
        let vol = self.volumes.get(volume_id)?;
        let mut v = json!({
            "id": vol.id,
            "name": vol.name,
            "zoneid": self.zone_id,
            "zonename": self.zone_name,
            "type": vol.volume_type,
            "provisioningtype": "thin",
            "size": vol.size,
            "created": format_ms(vol.created_ms),
            "state": vol.state,
            "account": "admin",
            "domain": "ROOT",
            "storagetype": "shared",
            "hypervisor": "KVM",
            "storage": "linstor-pool",
            "destroyed": false,
            "isextractable": false,
            "displayvolume": true,
            "path": vol.id,
            "quiescevm": false,
            "supportsstoragesnapshot": true,
            "tags": []
        });
        if let (Some(vm_id), Some(dev)) = (&vol.vm_id, vol.device_id) {
            let vm = self.vms.get(vm_id);
            v["virtualmachineid"] = json!(vm_id);
            v["vmname"] = json!(vm.map(|m| m.name.as_str()).unwrap_or(""));
            v["vmdisplayname"] = json!(vm.map(|m| m.display_name.as_str()).unwrap_or(""));
            v["vmstate"] = json!(vm.map(|m| m.state.as_str()).unwrap_or(""));
            v["vmtype"] = json!("User");
            v["deviceid"] = json!(dev);
        }
        Some(v)
    }

    pub fn render_snapshot(&self, snapshot_id: &str) -> Option<Value> {
        let s = self.snapshots.get(snapshot_id)?;
        let vol = self.volumes.get(&s.volume_id);
        Some(json!({
            "id": s.id,
            "name": s.name,
            "account": "admin",
            "domain": "ROOT",
            "snapshottype": "MANUAL",
            "volumeid": s.volume_id,
            "volumename": vol.map(|v| v.name.as_str()).unwrap_or(""),
            "volumetype": vol.map(|v| v.volume_type.as_str()).unwrap_or(""),
            "created": format_ms(s.created_ms),
            "intervaltype": "MANUAL",
            "locationtype": "PRIMARY",
            "state": s.state,
            "physicalsize": 0,
            "zoneid": self.zone_id,
            "zonename": self.zone_name,
            "revertable": true,
            "virtualsize": vol.map(|v| v.size).unwrap_or(0),
            "datastoretype": "Primary",
            "tags": []
        }))
    }

    pub fn render_vm_snapshot(&self, id: &str) -> Option<Value> {
        let s = self.vm_snapshots.get(id)?;
        Some(json!({
            "id": s.id,
            "name": s.name,
            "displayname": s.name,
            "state": s.state,
            "type": "Disk",
            "current": true,
            "virtualmachineid": s.vm_id,
            "virtualmachinename": self.vms.get(&s.vm_id).map(|v| v.name.as_str()).unwrap_or(""),
            "zoneid": self.zone_id,
            "account": "admin",
            "domain": "ROOT",
            "created": format_ms(s.created_ms),
            "tags": []
        }))
    }

    /// The `queryAsyncJobResult` body of a job.
    pub fn render_job(&self, job: &SimJob) -> Value {
        let (itype, iid) = job.op.instance();
        let mut v = json!({
            "accountid": "27ef5ba2-5fe0-11ea-9a56-1e006800018c",
            "userid": "27f2484f-5fe0-11ea-9a56-1e006800018c",
            "cmd": format!("org.apache.cloudstack.api.command.user.{}", job.command),
            "jobprocstatus": 0,
            "jobinstancetype": itype,
            "jobinstanceid": iid,
            "created": format_ms(job.created_ms),
            "jobid": job.id
        });
        match &job.state {
            JobState::Pending { .. } => {
                v["jobstatus"] = json!(0);
                v["jobresultcode"] = json!(0);
            }
            JobState::Succeeded { completed_ms, result } => {
                v["jobstatus"] = json!(1);
                v["jobresultcode"] = json!(0);
                v["jobresulttype"] = json!("object");
                v["jobresult"] = result.clone();
                v["completed"] = json!(format_ms(*completed_ms));
            }
            JobState::Failed {
                completed_ms,
                code,
                text,
            } => {
                v["jobstatus"] = json!(2);
                v["jobresultcode"] = json!(530);
                v["jobresulttype"] = json!("object");
                v["jobresult"] = json!({ "errorcode": code, "errortext": text });
                v["completed"] = json!(format_ms(*completed_ms));
            }
        }
        v
    }
}

fn gone(what: &str, id: &str) -> CsError {
    CsError::param(format!("Unable to find {what} with id {id}"))
}

pub fn format_ms(ms: i64) -> String {
    format_expires(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64))
}

/// One replicated volume's safety check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeCheck {
    pub volume_id: String,
    pub exists: bool,
    pub attached_to: Option<String>,
    pub device_id: Option<u32>,
    pub ok: bool,
    pub problem: Option<String>,
}

/// The answer of `GET /sim/invariant`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvariantReport {
    pub ok: bool,
    pub volumes: Vec<VolumeCheck>,
    pub leaked_vms: Vec<String>,
    pub leaked_volumes: Vec<String>,
    pub leaked_snapshots: Vec<String>,
    pub leaked_vm_snapshots: Vec<String>,
    pub leaked_linstor_snapshots: Vec<String>,
}

impl World {
    /// Every replicated volume exists and is attached to exactly one VM (to `expected_vm` if
    /// given); nothing named with `prefix` is left over.
    pub fn invariant(&self, prefix: Option<&str>, expected_vm: Option<&str>) -> InvariantReport {
        let mut volumes = Vec::new();
        let replicated: Vec<String> = match &self.inventory {
            Some(inv) => inv.vms.iter().map(|v| v.volume_id.clone()).collect(),
            None => self
                .volumes
                .values()
                .filter(|v| v.replicated)
                .map(|v| v.id.clone())
                .collect(),
        };
        for id in replicated {
            let vol = self.volumes.get(&id);
            let attached_to = vol.and_then(|v| v.vm_id.clone());
            let problem = match (vol, &attached_to) {
                (None, _) => Some("volume no longer exists".to_string()),
                (Some(_), None) => Some("volume is not attached to any VM".to_string()),
                (Some(_), Some(vm)) if !self.vms.contains_key(vm) => Some(format!("attached to missing VM {vm}")),
                (Some(_), Some(vm)) => match expected_vm {
                    Some(e) if e != vm => Some(format!("attached to {vm}, expected {e}")),
                    _ => None,
                },
            };
            volumes.push(VolumeCheck {
                volume_id: id,
                exists: vol.is_some(),
                device_id: vol.and_then(|v| v.device_id),
                attached_to,
                ok: problem.is_none(),
                problem,
            });
        }
        let named = |name: &str| prefix.is_some_and(|p| name.starts_with(p));
        let leaked_vms: Vec<String> = self
            .vms
            .values()
            .filter(|v| named(&v.name))
            .map(|v| format!("{} ({})", v.name, v.id))
            .collect();
        let leaked_volumes = self
            .volumes
            .values()
            .filter(|v| named(&v.name))
            .map(|v| format!("{} ({})", v.name, v.id))
            .collect::<Vec<_>>();
        let leaked_snapshots = self
            .snapshots
            .values()
            .filter(|s| named(&s.name))
            .map(|s| format!("{} ({})", s.name, s.id))
            .collect::<Vec<_>>();
        let leaked_vm_snapshots = self
            .vm_snapshots
            .values()
            .filter(|s| named(&s.name))
            .map(|s| format!("{} ({})", s.name, s.id))
            .collect::<Vec<_>>();
        let leaked_linstor_snapshots = self
            .linstor
            .values()
            .flat_map(|rd| rd.snapshots.keys().map(move |s| (rd, s)))
            .filter(|(_, s)| named(s))
            .map(|(rd, s)| format!("{}/{}", rd.name, s))
            .collect::<Vec<_>>();
        let ok = volumes.iter().all(|v| v.ok)
            && leaked_vms.is_empty()
            && leaked_volumes.is_empty()
            && leaked_snapshots.is_empty()
            && leaked_vm_snapshots.is_empty()
            && leaked_linstor_snapshots.is_empty();
        InvariantReport {
            ok,
            volumes,
            leaked_vms,
            leaked_volumes,
            leaked_snapshots,
            leaked_vm_snapshots,
            leaked_linstor_snapshots,
        }
    }
}

impl SampleInventory {
    /// The sample as Tern's inventory: each sample VM with a stable VMware-style id (derived
    /// from its name), its NICs, its volume on the OMA and a last sync, plus test and
    /// production network mappings for every source network.
    pub fn to_inventory(&self) -> crate::domain::inventory::InventoryFile {
        use crate::domain::inventory::{InventoryFile, NetworkKind, NetworkMapping, Nic, VmRecord};
        let mut inv = InventoryFile::default();
        for vm in &self.vms {
            let vm_id = uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_URL,
                format!("tern-sample:{}", vm.name).as_bytes(),
            )
            .to_string();
            for net in &vm.source_networks {
                for (kind, dest) in [
                    (NetworkKind::Test, &self.test_network_id),
                    (NetworkKind::Production, &self.production_network_id),
                ] {
                    inv.network_mappings.push(NetworkMapping {
                        vm_id: vm_id.clone(),
                        source_network: net.clone(),
                        destination_network_id: dest.clone(),
                        kind,
                    });
                }
            }
            inv.vms.push(VmRecord {
                vm_id,
                name: vm.name.clone(),
                cpu_count: vm.cpu,
                memory_mb: u32::try_from(vm.memory_mb).unwrap_or(u32::MAX),
                os_type: vm.os_type.clone(),
                nics: vm
                    .source_networks
                    .iter()
                    .map(|n| Nic {
                        source_network: n.clone(),
                        mac: None,
                    })
                    .collect(),
                volume_id: vm.volume_id.clone(),
                oma_vm_id: vm.oma_vm_id.clone(),
                last_sync_change_id: Some(format!("52 3c ec 11 9e 2c 4c 3d-87 4a c3 4e 85 f2 ea 95/{}", vm.cpu)),
            });
        }
        inv
    }
}
