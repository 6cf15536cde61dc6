//! The VM inventory Tern fails over: replicated source VMs (their specs, NICs, the replicated
//! volume and the OMA it is attached to, the last replication sync) and network mappings.
//! A file loader fills it for now; the API adds RPCs.

use serde::{Deserialize, Serialize};

use super::limits::{shown, Problems, MAX_DISKS, MAX_ENTRIES, MAX_ID, MAX_NAME};

/// The guest operating systems a VM record may name (any case); Windows guests get VirtIO
/// drivers injected.
pub const OS_TYPES: &[&str] = &["windows", "linux", "other"];
/// The most vCPUs a VM record (or a failover's `custom_config`) may ask for.
pub const MAX_CPU_COUNT: u32 = 512;
/// The most memory a VM record (or a failover's `custom_config`) may ask for: 16 TiB in MB.
pub const MAX_MEMORY_MB: u32 = 16 * 1024 * 1024;

/// A NIC of the source VM: the VMware network it is on, and its MAC and IP where known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    pub source_network: String,
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

/// A replicated disk of the source VM: the CloudStack volume it is replicated into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub volume_id: String,
    /// The source disk's size in bytes, where the replication reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// The source disk's unit number (its place on its controller): data disks keep this order.
    #[serde(default)]
    pub unit_number: u32,
}

impl Disk {
    /// A disk known only by its volume (size not reported, unit 0).
    pub fn of(volume_id: impl Into<String>) -> Disk {
        Disk {
            volume_id: volume_id.into(),
            size_bytes: None,
            unit_number: 0,
        }
    }
}

/// A replicated source VM as the replication system reported it. It has exactly one boot disk
/// by construction; files and stored records list every disk in `disks` with `boot: true` on
/// one of them (records written before disks existed name one `volume_id`, the boot disk).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "WireVm", into = "WireVm")]
pub struct VmRecord {
    /// The VMware VM UUID (not its name).
    pub vm_id: String,
    pub name: String,
    pub cpu_count: u32,
    pub memory_mb: u32,
    /// e.g. "windows", "linux" (Windows guests get VirtIO drivers injected).
    pub os_type: String,
    /// In the source's order.
    pub nics: Vec<Nic>,
    /// The disk the VM boots from: the new VM's root disk (`deviceid=0`).
    pub boot_disk: Disk,
    /// The other disks, by unit number.
    pub data_disks: Vec<Disk>,
    /// The appliance VM (OMA) the volumes are attached to between failovers.
    pub oma_vm_id: String,
    /// Change id of the last successful replication sync; None if it never synced.
    pub last_sync_change_id: Option<String>,
}

/// A disk as files, stored records and the API list it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedDisk {
    #[serde(flatten)]
    pub disk: Disk,
    #[serde(default)]
    pub boot: bool,
}

/// How a [`VmRecord`] is written: every disk in `disks`, and the boot disk's `volume_id` as
/// well, which records written before disks existed carry alone (and older readers read).
#[derive(Serialize, Deserialize)]
struct WireVm {
    vm_id: String,
    name: String,
    cpu_count: u32,
    memory_mb: u32,
    os_type: String,
    #[serde(default)]
    nics: Vec<Nic>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    disks: Vec<ListedDisk>,
    #[serde(default)]
    volume_id: Option<String>,
    oma_vm_id: String,
    #[serde(default)]
    last_sync_change_id: Option<String>,
}

impl TryFrom<WireVm> for VmRecord {
    type Error = String;

    fn try_from(w: WireVm) -> Result<VmRecord, String> {
        let (boot_disk, data_disks) =
            split_disks(w.disks, w.volume_id).map_err(|(field, why)| format!("{field} {why}"))?;
        Ok(VmRecord {
            vm_id: w.vm_id,
            name: w.name,
            cpu_count: w.cpu_count,
            memory_mb: w.memory_mb,
            os_type: w.os_type,
            nics: w.nics,
            boot_disk,
            data_disks,
            oma_vm_id: w.oma_vm_id,
            last_sync_change_id: w.last_sync_change_id,
        })
    }
}

impl From<VmRecord> for WireVm {
    fn from(v: VmRecord) -> WireVm {
        let disks = v.disks();
        WireVm {
            vm_id: v.vm_id,
            name: v.name,
            cpu_count: v.cpu_count,
            memory_mb: v.memory_mb,
            os_type: v.os_type,
            nics: v.nics,
            volume_id: Some(v.boot_disk.volume_id),
            disks,
            oma_vm_id: v.oma_vm_id,
            last_sync_change_id: v.last_sync_change_id,
        }
    }
}

/// The boot disk and the data disks (by unit number) of a listed set: exactly one disk boots.
/// With no disks listed, `volume_id` (the form before disks existed) is the boot disk; with
/// both, they must agree. Errors name the field.
pub fn split_disks(disks: Vec<ListedDisk>, volume_id: Option<String>) -> Result<(Disk, Vec<Disk>), (String, String)> {
    let volume_id = volume_id.filter(|v| !v.trim().is_empty());
    if disks.is_empty() {
        return match volume_id {
            Some(volume_id) => Ok((
                Disk {
                    volume_id,
                    size_bytes: None,
                    unit_number: 0,
                },
                Vec::new(),
            )),
            None => Err((
                "disks".into(),
                "must list the VM's disks (or volume_id its one disk)".into(),
            )),
        };
    }
    let boots: Vec<usize> = disks
        .iter()
        .enumerate()
        .filter(|(_, d)| d.boot)
        .map(|(i, _)| i)
        .collect();
    let boot = match boots.as_slice() {
        [one] => *one,
        [] => return Err(("disks".into(), "must have one disk with boot: true".into())),
        [_, second, ..] => return Err((format!("disks[{second}].boot"), "a second boot disk".into())),
    };
    let mut data = Vec::with_capacity(disks.len() - 1);
    let mut boot_disk = None;
    for (i, d) in disks.into_iter().enumerate() {
        match i == boot {
            true => boot_disk = Some(d.disk),
            false => data.push(d.disk),
        }
    }
    let boot_disk = boot_disk.ok_or_else(|| ("disks".to_string(), "has no boot disk".to_string()))?;
    if let Some(v) = volume_id {
        if v != boot_disk.volume_id {
            return Err((
                "volume_id".into(),
                format!(
                    "{} is not the boot disk's volume {}",
                    shown(&v),
                    shown(&boot_disk.volume_id)
                ),
            ));
        }
    }
    data.sort_by_key(|d| d.unit_number);
    Ok((boot_disk, data))
}

impl VmRecord {
    pub fn is_windows(&self) -> bool {
        self.os_type.to_ascii_lowercase().contains("windows")
    }

    /// Every disk, the boot disk first.
    pub fn all_disks(&self) -> impl Iterator<Item = &Disk> {
        std::iter::once(&self.boot_disk).chain(&self.data_disks)
    }

    /// The disks as they are listed: the boot disk first, marked.
    pub fn disks(&self) -> Vec<ListedDisk> {
        self.all_disks()
            .enumerate()
            .map(|(i, d)| ListedDisk {
                disk: d.clone(),
                boot: i == 0,
            })
            .collect()
    }

    /// The first of this VM's disks whose volume is a disk of another VM among `others` (a
    /// volume replicates one disk): the field and why.
    pub fn shares_a_volume_with(&self, others: &[VmRecord]) -> Option<(String, String)> {
        self.all_disks().enumerate().find_map(|(i, d)| {
            others
                .iter()
                .filter(|o| o.vm_id != self.vm_id)
                .find(|o| o.all_disks().any(|e| e.volume_id == d.volume_id))
                .map(|o| {
                    (
                        format!("disks[{i}].volume_id"),
                        format!("is a disk of VM {} already", o.vm_id),
                    )
                })
        })
    }

    /// Field problems, naming the field and why, for input from files and the API.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Problems::new();
        p.required("vm_id", &self.vm_id, MAX_ID);
        p.required("name", &self.name, MAX_NAME);
        if !(1..=MAX_CPU_COUNT).contains(&self.cpu_count) {
            p.push("cpu_count", format!("must be from 1 to {MAX_CPU_COUNT}"));
        }
        if !(1..=MAX_MEMORY_MB).contains(&self.memory_mb) {
            p.push("memory_mb", format!("must be from 1 to {MAX_MEMORY_MB}"));
        }
        if !OS_TYPES.contains(&self.os_type.to_ascii_lowercase().as_str()) {
            p.push("os_type", format!("must be one of {}", OS_TYPES.join(", ")));
        }
        p.required("oma_vm_id", &self.oma_vm_id, MAX_ID);
        if let Some(change) = &self.last_sync_change_id {
            p.line("last_sync_change_id", change, MAX_ID);
        }
        let disks: Vec<&Disk> = self.all_disks().collect();
        let disks_ok = p.entries("disks", disks.len(), MAX_DISKS);
        let nics_ok = p.entries("nics", self.nics.len(), MAX_ENTRIES);
        if !(disks_ok && nics_ok) {
            return p.0;
        }
        for (i, d) in disks.iter().enumerate() {
            let field = format!("disks[{i}].volume_id");
            if !p.required(&field, &d.volume_id, MAX_ID) {
                continue;
            }
            if let Some(j) = disks[..i].iter().position(|e| e.volume_id == d.volume_id) {
                p.push(field, format!("is the volume of disks[{j}] as well"));
            }
            if d.size_bytes == Some(0) {
                p.push(format!("disks[{i}].size_bytes"), "must be at least 1 when given");
            }
        }
        for (i, n) in self.nics.iter().enumerate() {
            p.required(&format!("nics[{i}].source_network"), &n.source_network, MAX_NAME);
            if let Some(mac) = n.mac.as_deref() {
                p.line(&format!("nics[{i}].mac"), mac, MAX_NAME);
            }
            if let Some(ip) = n.ip.as_deref() {
                if ip.parse::<std::net::IpAddr>().is_err() {
                    p.push(format!("nics[{i}].ip"), format!("{} is not an IP address", shown(ip)));
                }
            }
        }
        p.0
    }
}

/// Which failover a mapping serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkKind {
    /// The isolated network a test failover's VM joins.
    Test,
    /// The network a live failover's VM joins.
    Production,
}

impl NetworkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkKind::Test => "test",
            NetworkKind::Production => "production",
        }
    }
}

/// Source network of a VM -> CloudStack network id, for test or live failovers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkMapping {
    pub vm_id: String,
    pub source_network: String,
    pub destination_network_id: String,
    pub kind: NetworkKind,
}

/// The inventory file format (JSON): what a replication system knows about its VMs.
///
/// ```json
/// {"vms": [{"vm_id": "4205…", "name": "pgtest1", "cpu_count": 2, "memory_mb": 4096,
///           "os_type": "windows",
///           "nics": [{"source_network": "VM Network", "mac": "00:50:56:…", "ip": "10.0.1.5"}],
///           "disks": [{"volume_id": "7e1c…", "size_bytes": 42949672960, "unit_number": 0, "boot": true},
///                     {"volume_id": "9a2d…", "size_bytes": 107374182400, "unit_number": 1}],
///           "oma_vm_id": "0c0f…", "last_sync_change_id": "52 3c …/5"}],
///  "network_mappings": [{"vm_id": "4205…", "source_network": "VM Network",
///                        "destination_network_id": "…", "kind": "test"}]}
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryFile {
    #[serde(default)]
    pub vms: Vec<VmRecord>,
    #[serde(default)]
    pub network_mappings: Vec<NetworkMapping>,
}

impl InventoryFile {
    /// Parses and checks an inventory; errors name the entry and the field.
    pub fn parse(text: &str) -> Result<InventoryFile, String> {
        let inv: InventoryFile = serde_json::from_str(text).map_err(|e| format!("invalid inventory JSON: {e}"))?;
        for (i, vm) in inv.vms.iter().enumerate() {
            if let Some((field, why)) = vm.problems().into_iter().next() {
                return Err(format!("vms[{i}] ({}): {field} {why}", vm.vm_id));
            }
            if let Some((field, why)) = vm.shares_a_volume_with(&inv.vms[..i]) {
                return Err(format!("vms[{i}] ({}): {field} {why}", vm.vm_id));
            }
        }
        for (i, m) in inv.network_mappings.iter().enumerate() {
            if m.destination_network_id.trim().is_empty() {
                return Err(format!(
                    "network_mappings[{i}]: destination_network_id must not be empty"
                ));
            }
            if !inv.vms.iter().any(|v| v.vm_id == m.vm_id) {
                return Err(format!(
                    "network_mappings[{i}]: vm_id {:?} is not among the file's vms",
                    m.vm_id
                ));
            }
        }
        Ok(inv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inventory_files_are_checked_with_named_fields() {
        let ok = r#"{"vms":[{"vm_id":"a","name":"n","cpu_count":1,"memory_mb":512,"os_type":"linux",
            "volume_id":"v","oma_vm_id":"o"}],
            "network_mappings":[{"vm_id":"a","source_network":"s","destination_network_id":"d","kind":"test"}]}"#;
        let inv = InventoryFile::parse(ok).unwrap();
        assert_eq!(inv.vms[0].nics, vec![]);
        let bad = ok.replace("\"cpu_count\":1", "\"cpu_count\":0");
        assert!(InventoryFile::parse(&bad)
            .unwrap_err()
            .contains("vms[0] (a): cpu_count"));
        let shared = ok.replace(
            r#""oma_vm_id":"o"}]"#,
            r#""oma_vm_id":"o"},{"vm_id":"b","name":"m","cpu_count":1,"memory_mb":512,"os_type":"linux","volume_id":"v","oma_vm_id":"o"}]"#,
        );
        let e = InventoryFile::parse(&shared).unwrap_err();
        assert!(e.contains("vms[1] (b): disks[0].volume_id is a disk of VM a"), "{e}");
        let orphan = ok.replace("{\"vm_id\":\"a\",\"source", "{\"vm_id\":\"zz\",\"source");
        assert!(InventoryFile::parse(&orphan)
            .unwrap_err()
            .contains("network_mappings[0]"));
        assert!(InventoryFile::parse("{\"vmz\": []}").unwrap_err().contains("vmz"));
    }

    const LEGACY: &str = r#"{"vm_id":"a","name":"n","cpu_count":1,"memory_mb":512,"os_type":"linux",
        "nics":[{"source_network":"s","mac":null}],"volume_id":"v","oma_vm_id":"o","last_sync_change_id":"c"}"#;

    #[test]
    fn a_record_from_before_disks_is_one_boot_disk() {
        let vm: VmRecord = serde_json::from_str(LEGACY).unwrap();
        assert_eq!(vm.boot_disk.volume_id, "v");
        assert!(vm.data_disks.is_empty());
        // Written back, it lists its disks and still names its volume for older readers.
        let v = serde_json::to_value(&vm).unwrap();
        assert_eq!(v["volume_id"], "v");
        assert_eq!(v["disks"][0]["boot"], true);
        let again: VmRecord = serde_json::from_value(v).unwrap();
        assert_eq!(again, vm);
    }

    #[test]
    fn disks_are_split_into_the_boot_disk_and_data_disks_in_unit_order() {
        let text = LEGACY.replace(
            r#""volume_id":"v","#,
            r#""disks":[{"volume_id":"d2","unit_number":2,"size_bytes":10},{"volume_id":"b","boot":true},
                {"volume_id":"d1","unit_number":1}],"#,
        );
        let vm: VmRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(vm.boot_disk.volume_id, "b");
        let data: Vec<&str> = vm.data_disks.iter().map(|d| d.volume_id.as_str()).collect();
        assert_eq!(data, ["d1", "d2"]);
        assert_eq!(vm.data_disks[1].size_bytes, Some(10));
        let again: VmRecord = serde_json::from_value(serde_json::to_value(&vm).unwrap()).unwrap();
        assert_eq!(again, vm);
    }

    #[test]
    fn disk_problems_name_the_field() {
        let two_boots = LEGACY.replace(
            r#""volume_id":"v","#,
            r#""disks":[{"volume_id":"b","boot":true},{"volume_id":"c","boot":true}],"#,
        );
        let e = serde_json::from_str::<VmRecord>(&two_boots).unwrap_err().to_string();
        assert!(e.contains("disks[1].boot"), "{e}");
        let no_boot = LEGACY.replace(r#""volume_id":"v","#, r#""disks":[{"volume_id":"b"}],"#);
        let e = serde_json::from_str::<VmRecord>(&no_boot).unwrap_err().to_string();
        assert!(e.contains("boot: true"), "{e}");
        let disagree = LEGACY.replace(
            r#""volume_id":"v","#,
            r#""volume_id":"v","disks":[{"volume_id":"b","boot":true}],"#,
        );
        let e = serde_json::from_str::<VmRecord>(&disagree).unwrap_err().to_string();
        assert!(e.contains("volume_id"), "{e}");
        let none = LEGACY.replace(r#""volume_id":"v","#, "");
        assert!(serde_json::from_str::<VmRecord>(&none).is_err());

        let mut vm: VmRecord = serde_json::from_str(LEGACY).unwrap();
        vm.data_disks.push(Disk {
            volume_id: "v".into(),
            size_bytes: Some(0),
            unit_number: 1,
        });
        vm.nics[0].ip = Some("10.0.0.300".into());
        let p: Vec<String> = vm.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(p, ["disks[1].volume_id", "disks[1].size_bytes", "nics[0].ip"]);
    }
}
