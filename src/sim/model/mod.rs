//! The simulator's world: VMs, volumes, snapshots, async jobs and LINSTOR resource
//! definitions, with CloudStack's rules, persisted as one JSON document. `jobs.rs` carries
//! out the async commands, `render.rs` answers in CloudStack's JSON, `invariant.rs` checks
//! the safety invariant, `sample.rs` builds the sample world.

mod invariant;
mod jobs;
mod render;
mod sample;

pub use invariant::{InvariantReport, VolumeCheck};
pub use sample::{sample_inventory, SAMPLE_VOLUME_SIZE};

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
    /// The guest CIDR its NICs get addresses from.
    #[serde(default)]
    pub cidr: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimNic {
    pub id: String,
    pub network_id: String,
    pub ip: String,
    #[serde(default)]
    pub mac: String,
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
    /// Production networks of the sample's other port groups ("DMZ", "Backup").
    #[serde(default)]
    pub dmz_network_id: String,
    #[serde(default)]
    pub backup_network_id: String,
    /// Fixed-size service offerings beside the custom one, smallest first.
    #[serde(default)]
    pub fixed_offerings: Vec<SampleOffering>,
    pub vms: Vec<SampleVm>,
}

/// A fixed-size service offering of the sample catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleOffering {
    pub id: String,
    pub name: String,
    pub cpu: u32,
    pub memory_mb: u64,
}

impl SampleInventory {
    /// The production network a source port group maps to.
    pub fn production_network_for(&self, source_network: &str) -> &str {
        match source_network {
            "DMZ" if !self.dmz_network_id.is_empty() => &self.dmz_network_id,
            "Backup" if !self.backup_network_id.is_empty() => &self.backup_network_id,
            _ => &self.production_network_id,
        }
    }

    /// The catalog's networks: id, name, CIDR.
    pub fn networks(&self) -> Vec<(&str, &'static str, &'static str)> {
        let mut nets = vec![
            (self.test_network_id.as_str(), "tern-test-network", "10.1.0.0/16"),
            (
                self.production_network_id.as_str(),
                "tern-production-network",
                "10.0.0.0/16",
            ),
        ];
        if !self.dmz_network_id.is_empty() {
            nets.push((self.dmz_network_id.as_str(), "tern-dmz-network", "10.2.0.0/16"));
        }
        if !self.backup_network_id.is_empty() {
            nets.push((self.backup_network_id.as_str(), "tern-backup-network", "10.3.0.0/16"));
        }
        nets
    }
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
    /// Its data disks, in the source's order (each a DATADISK volume on the OMA too).
    #[serde(default)]
    pub data_disks: Vec<SampleDisk>,
}

/// A data disk of a sample VM: its volume, size and slot on the OMA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleDisk {
    pub volume_id: String,
    pub size: u64,
    pub oma_device_id: u32,
}

impl SampleVm {
    /// Every replicated volume of the VM: the boot disk's, then the data disks'.
    pub fn volume_ids(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.volume_id.as_str()).chain(self.data_disks.iter().map(|d| d.volume_id.as_str()))
    }
}

/// Everything the simulator knows; persisted as JSON after each mutation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct World {
    pub zone_id: String,
    pub zone_name: String,
    pub service_offering_id: String,
    /// Fixed-size offerings (id → offering) beside the custom one.
    #[serde(default)]
    pub fixed_offerings: BTreeMap<String, SampleOffering>,
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
    /// `snapshot:<volume id>/<name>`, `vm_snapshot:<vm id>/<name>`,
    /// `linstor:<resource>/<name>`): a test's proof that nothing was created twice.
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
        for o in &inv.fixed_offerings {
            w.fixed_offerings.insert(o.id.clone(), o.clone());
        }
        for (id, name, cidr) in inv.networks() {
            w.networks.insert(
                id.to_string(),
                SimNetwork {
                    id: id.to_string(),
                    name: name.into(),
                    cidr: Some(cidr.into()),
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
                mac: "02:00:00:00:00:01".into(),
            }],
            cpu: 4,
            memory_mb: 8192,
            created_ms: now_ms,
        };
        w.add_root_volume_for(&oma.id, now_ms);
        w.vms.insert(oma.id.clone(), oma);
        for vm in &inv.vms {
            let disks = std::iter::once((0, &vm.volume_id, vm.volume_size, vm.oma_device_id)).chain(
                vm.data_disks
                    .iter()
                    .enumerate()
                    .map(|(i, d)| (i + 1, &d.volume_id, d.size, d.oma_device_id)),
            );
            for (n, id, size, slot) in disks {
                w.volumes.insert(
                    id.clone(),
                    SimVolume {
                        id: id.clone(),
                        name: format!("{}-disk{n}", vm.name),
                        vm_id: Some(inv.oma_vm_id.clone()),
                        device_id: Some(slot),
                        volume_type: "DATADISK".into(),
                        state: "Ready".into(),
                        size,
                        content: Content::default(),
                        replicated: true,
                        created_ms: now_ms,
                    },
                );
                w.add_resource_definition(id);
            }
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
}

fn gone(what: &str, id: &str) -> CsError {
    CsError::param(format!("Unable to find {what} with id {id}"))
}

pub fn format_ms(ms: i64) -> String {
    format_expires(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64))
}
