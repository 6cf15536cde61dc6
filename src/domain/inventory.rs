//! The VM inventory Tern fails over: replicated source VMs (their specs, NICs, the replicated
//! volume and the OMA it is attached to, the last replication sync) and network mappings.
//! A file loader fills it for now; the API adds RPCs.

use serde::{Deserialize, Serialize};

/// A NIC of the source VM and the VMware network it is on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    pub source_network: String,
    #[serde(default)]
    pub mac: Option<String>,
}

/// A replicated source VM as the replication system reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The VMware VM UUID (not its name).
    pub vm_id: String,
    pub name: String,
    pub cpu_count: u32,
    pub memory_mb: u32,
    /// e.g. "windows", "linux" (Windows guests get VirtIO drivers injected).
    pub os_type: String,
    #[serde(default)]
    pub nics: Vec<Nic>,
    /// The CloudStack volume holding the replicated disk.
    pub volume_id: String,
    /// The appliance VM (OMA) the volume is attached to between failovers.
    pub oma_vm_id: String,
    /// Change id of the last successful replication sync; None if it never synced.
    #[serde(default)]
    pub last_sync_change_id: Option<String>,
}

impl VmRecord {
    pub fn is_windows(&self) -> bool {
        self.os_type.to_ascii_lowercase().contains("windows")
    }

    /// Field problems, naming the field and why, for input from files and the API.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let mut need = |field: &str, ok: bool, why: &str| {
            if !ok {
                p.push((field.to_string(), why.to_string()));
            }
        };
        need("vm_id", !self.vm_id.trim().is_empty(), "must not be empty");
        need("name", !self.name.trim().is_empty(), "must not be empty");
        need("cpu_count", self.cpu_count > 0, "must be at least 1");
        need("memory_mb", self.memory_mb > 0, "must be at least 1");
        need("volume_id", !self.volume_id.trim().is_empty(), "must not be empty");
        need("oma_vm_id", !self.oma_vm_id.trim().is_empty(), "must not be empty");
        for (i, n) in self.nics.iter().enumerate() {
            if n.source_network.trim().is_empty() {
                p.push((format!("nics[{i}].source_network"), "must not be empty".into()));
            }
        }
        p
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
///           "os_type": "windows", "nics": [{"source_network": "VM Network"}],
///           "volume_id": "7e1c…", "oma_vm_id": "0c0f…", "last_sync_change_id": "52 3c …/5"}],
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
        let orphan = ok.replace("{\"vm_id\":\"a\",\"source", "{\"vm_id\":\"zz\",\"source");
        assert!(InventoryFile::parse(&orphan)
            .unwrap_err()
            .contains("network_mappings[0]"));
        assert!(InventoryFile::parse("{\"vmz\": []}").unwrap_err().contains("vmz"));
    }
}
