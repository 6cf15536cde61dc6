//! The safety invariant: every replicated volume on exactly one VM, nothing left behind.

use super::*;

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
            Some(inv) => inv
                .vms
                .iter()
                .flat_map(|v| v.volume_ids().map(str::to_string))
                .collect(),
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
