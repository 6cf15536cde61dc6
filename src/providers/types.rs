//! The CloudStack resources Tern reads and the commands it issues, as the wire names them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A VM's lifecycle state as CloudStack reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum VmState {
    Running,
    Stopped,
    Starting,
    Stopping,
    Destroyed,
    Expunging,
    Migrating,
    Error,
    Other(String),
}

impl From<String> for VmState {
    fn from(s: String) -> Self {
        match s.as_str() {
            "Running" => VmState::Running,
            "Stopped" => VmState::Stopped,
            "Starting" => VmState::Starting,
            "Stopping" => VmState::Stopping,
            "Destroyed" => VmState::Destroyed,
            "Expunging" => VmState::Expunging,
            "Migrating" => VmState::Migrating,
            "Error" => VmState::Error,
            _ => VmState::Other(s),
        }
    }
}

impl From<VmState> for String {
    fn from(s: VmState) -> Self {
        match s {
            VmState::Running => "Running".into(),
            VmState::Stopped => "Stopped".into(),
            VmState::Starting => "Starting".into(),
            VmState::Stopping => "Stopping".into(),
            VmState::Destroyed => "Destroyed".into(),
            VmState::Expunging => "Expunging".into(),
            VmState::Migrating => "Migrating".into(),
            VmState::Error => "Error".into(),
            VmState::Other(s) => s,
        }
    }
}

/// One NIC of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    pub id: String,
    #[serde(rename = "networkid")]
    pub network_id: String,
    #[serde(rename = "ipaddress", default)]
    pub ip_address: Option<String>,
    #[serde(rename = "isdefault", default)]
    pub is_default: bool,
    #[serde(rename = "macaddress", default)]
    pub mac_address: Option<String>,
}

/// A NIC a deploy asks for: its network, and the IP and MAC to keep where given (sent as
/// `iptonetworklist[n]`, which gives a VM one NIC per network; without any IP or MAC the NICs
/// go as `networkids`, which may name a network twice).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicRequest {
    pub network_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// A CloudStack virtual machine (field names as on the wire).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub id: String,
    pub name: String,
    #[serde(rename = "displayname", default)]
    pub display_name: Option<String>,
    pub state: VmState,
    #[serde(rename = "zoneid", default)]
    pub zone_id: Option<String>,
    #[serde(rename = "serviceofferingid", default)]
    pub service_offering_id: Option<String>,
    #[serde(rename = "templateid", default)]
    pub template_id: Option<String>,
    #[serde(rename = "cpunumber", default)]
    pub cpu_number: Option<u32>,
    /// MiB.
    #[serde(default)]
    pub memory: Option<u64>,
    #[serde(rename = "nic", default)]
    pub nics: Vec<Nic>,
}

/// ROOT or DATADISK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum VolumeType {
    Root,
    DataDisk,
    Other(String),
}

impl VolumeType {
    pub fn as_str(&self) -> &str {
        match self {
            VolumeType::Root => "ROOT",
            VolumeType::DataDisk => "DATADISK",
            VolumeType::Other(s) => s,
        }
    }
}

impl From<String> for VolumeType {
    fn from(s: String) -> Self {
        match s.as_str() {
            "ROOT" => VolumeType::Root,
            "DATADISK" => VolumeType::DataDisk,
            _ => VolumeType::Other(s),
        }
    }
}

impl From<VolumeType> for String {
    fn from(t: VolumeType) -> Self {
        t.as_str().to_string()
    }
}

/// A CloudStack volume. `vm_id`/`device_id` are set while it is attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub id: String,
    pub name: String,
    #[serde(rename = "virtualmachineid", default)]
    pub vm_id: Option<String>,
    #[serde(rename = "deviceid", default)]
    pub device_id: Option<u32>,
    #[serde(rename = "type")]
    pub volume_type: VolumeType,
    pub state: String,
    /// Bytes.
    #[serde(default)]
    pub size: Option<u64>,
}

/// A CloudStack guest network a failed-over VM's NICs join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub id: String,
    pub name: String,
    #[serde(rename = "zoneid", default)]
    pub zone_id: Option<String>,
    #[serde(default)]
    pub state: Option<String>,
    /// The guest CIDR, where the network has one.
    #[serde(default)]
    pub cidr: Option<String>,
}

/// A CloudStack compute offering. A customized one takes the VM's size at deploy
/// (`details[0].cpuNumber`, `details[0].memory`); a fixed one has its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceOffering {
    pub id: String,
    pub name: String,
    #[serde(rename = "iscustomized", default)]
    pub is_customized: bool,
    #[serde(rename = "cpunumber", default)]
    pub cpu_number: Option<u32>,
    /// MiB.
    #[serde(default)]
    pub memory: Option<u64>,
}

/// A CloudStack volume snapshot. `state` is `BackedUp` when usable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    #[serde(rename = "volumeid")]
    pub volume_id: String,
    pub state: String,
}

/// A CloudStack VM snapshot. `state` is `Ready` when usable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSnapshot {
    pub id: String,
    pub name: String,
    #[serde(rename = "virtualmachineid")]
    pub vm_id: String,
    pub state: String,
}

/// The CloudStack async commands a failover issues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum AsyncCommand {
    DeployVm {
        name: String,
        display_name: Option<String>,
        service_offering_id: String,
        template_id: String,
        zone_id: String,
        /// The VM's NICs in order (the first is the default NIC).
        nics: Vec<NicRequest>,
        /// false: the VM is created Stopped, so its disks can be swapped before first boot.
        start_vm: bool,
        /// Further deployVirtualMachine parameters passed as is (e.g. `details[0].cpuNumber`).
        extra: BTreeMap<String, String>,
    },
    StartVm {
        id: String,
    },
    StopVm {
        id: String,
        forced: bool,
    },
    DestroyVm {
        id: String,
        expunge: bool,
    },
    AttachVolume {
        volume_id: String,
        vm_id: String,
        /// `Some(0)` makes the volume the VM's ROOT disk (the VM must be Stopped and have none).
        device_id: Option<u32>,
    },
    DetachVolume {
        volume_id: String,
    },
    CreateSnapshot {
        volume_id: String,
        name: String,
    },
    RevertSnapshot {
        id: String,
    },
    DeleteSnapshot {
        id: String,
    },
    CreateVmSnapshot {
        vm_id: String,
        name: String,
    },
    RevertToVmSnapshot {
        id: String,
    },
    DeleteVmSnapshot {
        id: String,
    },
}

impl AsyncCommand {
    /// The CloudStack API command name.
    pub fn api_name(&self) -> &'static str {
        match self {
            AsyncCommand::DeployVm { .. } => "deployVirtualMachine",
            AsyncCommand::StartVm { .. } => "startVirtualMachine",
            AsyncCommand::StopVm { .. } => "stopVirtualMachine",
            AsyncCommand::DestroyVm { .. } => "destroyVirtualMachine",
            AsyncCommand::AttachVolume { .. } => "attachVolume",
            AsyncCommand::DetachVolume { .. } => "detachVolume",
            AsyncCommand::CreateSnapshot { .. } => "createSnapshot",
            AsyncCommand::RevertSnapshot { .. } => "revertSnapshot",
            AsyncCommand::DeleteSnapshot { .. } => "deleteSnapshot",
            AsyncCommand::CreateVmSnapshot { .. } => "createVMSnapshot",
            AsyncCommand::RevertToVmSnapshot { .. } => "revertToVMSnapshot",
            AsyncCommand::DeleteVmSnapshot { .. } => "deleteVMSnapshot",
        }
    }
}

/// What issuing an async command returned: the job to poll and, for create commands
/// (deployVirtualMachine, createSnapshot, createVMSnapshot), the new resource's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRef {
    pub job_id: String,
    pub resource_id: Option<String>,
}

/// An async job's state, judged by `jobstatus` (0/1/2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JobStatus {
    Pending,
    /// The `jobresult` object, e.g. `{"virtualmachine": {...}}` or `{"success": true}`.
    Succeeded(serde_json::Value),
    Failed {
        errorcode: u16,
        errortext: String,
    },
}

/// Which VMs to list. Name matching is exact (CloudStack matches substrings; the client
/// filters).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmFilter {
    pub id: Option<String>,
    pub name: Option<String>,
}

impl VmFilter {
    pub fn id(id: impl Into<String>) -> Self {
        VmFilter {
            id: Some(id.into()),
            name: None,
        }
    }
    pub fn name(name: impl Into<String>) -> Self {
        VmFilter {
            id: None,
            name: Some(name.into()),
        }
    }
}

/// Which volumes to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeFilter {
    pub id: Option<String>,
    pub vm_id: Option<String>,
    pub volume_type: Option<VolumeType>,
}

impl VolumeFilter {
    pub fn id(id: impl Into<String>) -> Self {
        VolumeFilter {
            id: Some(id.into()),
            ..Default::default()
        }
    }
    pub fn vm(vm_id: impl Into<String>) -> Self {
        VolumeFilter {
            vm_id: Some(vm_id.into()),
            ..Default::default()
        }
    }
}

/// Which volume snapshots to list. Name matching is exact.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotFilter {
    pub id: Option<String>,
    pub volume_id: Option<String>,
    pub name: Option<String>,
}
