//! Pre-failover validation: the seeds' checks and readiness score, as a pure function of what
//! the caller looked up (inventory, mappings, active runs, the volume as CloudStack reports it).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::inventory::{NetworkKind, NetworkMapping, VmRecord};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckType {
    /// A failure makes the VM not ready (score 0).
    Critical,
    /// A failure lowers the score.
    Warning,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    Pass,
    Fail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub check_name: String,
    pub check_type: CheckType,
    pub status: CheckStatus,
    pub message: String,
    #[serde(default)]
    pub details: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadinessReport {
    pub vm_id: String,
    pub is_ready: bool,
    pub readiness_score: f64,
    pub checks: Vec<Check>,
}

/// The replicated volume as the cloud reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeFacts {
    pub volume_id: String,
    /// e.g. "Ready".
    pub state: String,
    /// The VM it is attached to, if any.
    pub attached_to: Option<String>,
    pub size_gb: u64,
}

/// Everything the checks look at.
pub struct Facts<'a> {
    pub vm_id: &'a str,
    pub vm: Option<&'a VmRecord>,
    /// Other active (non-terminal) failover runs on this VM.
    pub active_runs: &'a [String],
    pub mappings: &'a [NetworkMapping],
    pub kind: NetworkKind,
    /// Every disk's volume (the boot disk first) as the cloud reports it, None where it does
    /// not exist; `Err(reason)` when the volumes could not be looked up.
    pub volumes: Result<Vec<(String, Option<VolumeFacts>)>, String>,
    /// The mapped destination networks (of `kind`) that CloudStack does not know;
    /// `Err(reason)` when they could not be looked up.
    pub missing_networks: Result<Vec<String>, String>,
    /// The known destination networks' CIDRs (network id → CIDR, where it has one), for the
    /// addresses a live failover keeps.
    pub cidrs: BTreeMap<String, String>,
}

impl Facts<'_> {
    /// The CloudStack network `source_network` is mapped to for this failover's kind.
    fn destination_of(&self, source_network: &str) -> Option<&str> {
        self.mappings
            .iter()
            .find(|m| m.kind == self.kind && m.source_network == source_network)
            .map(|m| m.destination_network_id.as_str())
    }
}

/// Why NICs that keep their IP or MAC cannot share a network: CloudStack's
/// `iptonetworklist` gives a VM one NIC per network (the later entry replaces the earlier).
/// `nics` are (destination network, keeps an address) in NIC order.
pub fn kept_addresses_conflict(nics: &[(&str, bool)]) -> Option<String> {
    for (i, (net, keeps)) in nics.iter().enumerate() {
        if let Some(j) = nics[i + 1..]
            .iter()
            .position(|(other, k)| other == net && (*keeps || *k))
        {
            return Some(format!(
                "nics[{i}] and nics[{}] both map to network {net}: keeping their IP or MAC, CloudStack gives a VM one NIC per network",
                i + 1 + j
            ));
        }
    }
    None
}

/// What stops a live failover from keeping its NICs' addresses: two NICs that keep one on one
/// network, an IP that is not in its destination network's CIDR.
fn kept_address_problems(f: &Facts) -> Vec<String> {
    let Some(vm) = f.vm.filter(|_| f.kind == NetworkKind::Production) else {
        return Vec::new();
    };
    let planned: Vec<(usize, &crate::domain::inventory::Nic, &str)> = vm
        .nics
        .iter()
        .enumerate()
        .filter_map(|(i, n)| Some((i, n, f.destination_of(&n.source_network)?)))
        .collect();
    let mut problems = Vec::new();
    let pairs: Vec<(&str, bool)> = planned
        .iter()
        .map(|(_, n, net)| (*net, n.ip.is_some() || n.mac.is_some()))
        .collect();
    problems.extend(kept_addresses_conflict(&pairs));
    for (i, nic, net) in &planned {
        let (Some(ip), Some(cidr)) = (&nic.ip, f.cidrs.get(*net)) else {
            continue;
        };
        let Ok(range) = cidr.parse::<ipnet::IpNet>() else {
            continue;
        };
        match ip.parse::<std::net::IpAddr>() {
            Ok(addr) if range.contains(&addr) => {}
            Ok(_) => problems.push(format!(
                "nics[{i}] ({}): IP {ip} is outside network {net} ({cidr})",
                nic.source_network
            )),
            Err(_) => problems.push(format!(
                "nics[{i}] ({}): {ip:?} is not an IP address",
                nic.source_network
            )),
        }
    }
    problems
}

/// The seeds' score: any failed critical check gives 0; otherwise the share of passed checks.
/// Ready means no failed critical check and a score of at least 80.
pub fn readiness_score(checks: &[Check]) -> f64 {
    if checks.is_empty() {
        return 0.0;
    }
    let mut passed = 0usize;
    for c in checks {
        match (c.status, c.check_type) {
            (CheckStatus::Pass, _) => passed += 1,
            (CheckStatus::Fail, CheckType::Critical) => return 0.0,
            (CheckStatus::Fail, CheckType::Warning) => {}
        }
    }
    passed as f64 * 100.0 / checks.len() as f64
}

fn check(name: &str, t: CheckType, ok: bool, pass: &str, fail: String, details: serde_json::Value) -> Check {
    Check {
        check_name: name.into(),
        check_type: t,
        status: if ok { CheckStatus::Pass } else { CheckStatus::Fail },
        message: if ok { pass.into() } else { fail },
        details,
    }
}

pub fn validate(f: &Facts<'_>) -> ReadinessReport {
    use serde_json::json;
    let mut checks = Vec::new();
    checks.push(match f.vm {
        Some(vm) => {
            let problems = vm.problems();
            check(
                "VM Existence",
                CheckType::Critical,
                problems.is_empty(),
                "VM exists and its specifications are known",
                format!("VM specifications incomplete: {problems:?}"),
                json!({"cpu_count": vm.cpu_count, "memory_mb": vm.memory_mb, "os_type": vm.os_type}),
            )
        }
        None => check(
            "VM Existence",
            CheckType::Critical,
            false,
            "",
            format!("VM {} not found in the inventory (not replicated?)", f.vm_id),
            json!({}),
        ),
    });
    checks.push(check(
        "Active Jobs",
        CheckType::Critical,
        f.active_runs.is_empty(),
        "No active jobs found for VM",
        format!("VM has active failover jobs: {}", f.active_runs.join(", ")),
        json!({"active_jobs": f.active_runs}),
    ));
    let change =
        f.vm.and_then(|v| v.last_sync_change_id.as_deref())
            .filter(|c| !c.trim().is_empty());
    checks.push(check(
        "Sync Status",
        CheckType::Critical,
        change.is_some(),
        "VM has valid ChangeID from successful sync",
        "no successful replication sync with a change id".into(),
        json!({"change_id": change}),
    ));
    let networks: Vec<&str> =
        f.vm.map(|v| v.nics.iter().map(|n| n.source_network.as_str()).collect())
            .unwrap_or_default();
    let unmapped: Vec<&str> = networks
        .iter()
        .copied()
        .filter(|n| !f.mappings.iter().any(|m| m.kind == f.kind && m.source_network == *n))
        .collect();
    let details = json!({"mapped_networks": networks.len() - unmapped.len(), "unmapped_networks": unmapped.len(), "kind": f.kind.as_str()});
    let kept = kept_address_problems(f);
    checks.push(match &f.missing_networks {
        // A live failover keeps the NICs' addresses: one it cannot keep stops it before
        // anything is created.
        Ok(_) if !kept.is_empty() => check(
            "Network Mappings",
            CheckType::Critical,
            false,
            "",
            kept.join("; "),
            json!({"address_problems": kept, "kind": f.kind.as_str()}),
        ),
        // A NIC mapped to a network that does not exist stops the failover before anything is
        // created: CloudStack would refuse the VM's deploy.
        Ok(missing) if !missing.is_empty() => {
            let nics: Vec<String> =
                f.vm.map(|v| {
                    v.nics
                        .iter()
                        .enumerate()
                        .filter_map(|(i, n)| {
                            let dest = f.destination_of(&n.source_network)?;
                            missing
                                .iter()
                                .any(|m| m == dest)
                                .then(|| format!("nics[{i}] ({}) -> {dest}", n.source_network))
                        })
                        .collect()
                })
                .unwrap_or_default();
            check(
                "Network Mappings",
                CheckType::Critical,
                false,
                "",
                format!("mapped to networks CloudStack does not have: {}", nics.join(", ")),
                json!({"missing_networks": missing, "kind": f.kind.as_str()}),
            )
        }
        Err(e) => check(
            "Network Mappings",
            CheckType::Critical,
            false,
            "",
            format!("destination network look-up failed: {e}"),
            details,
        ),
        Ok(_) => check(
            "Network Mappings",
            CheckType::Warning,
            unmapped.is_empty(),
            "All source networks mapped to CloudStack networks",
            format!("unmapped {} networks: {}", f.kind.as_str(), unmapped.join(", ")),
            details,
        ),
    });
    let oma = f.vm.map(|v| v.oma_vm_id.as_str());
    checks.push(match &f.volumes {
        Ok(volumes) if volumes.is_empty() => check(
            "Volume State",
            CheckType::Critical,
            false,
            "",
            "replicated volume not found in CloudStack".into(),
            json!({}),
        ),
        Ok(volumes) => {
            let mut problems = Vec::new();
            let mut disks = Vec::new();
            for (i, (id, found)) in volumes.iter().enumerate() {
                let problem = match found {
                    None => Some(format!("disks[{i}]: volume {id} not found in CloudStack")),
                    Some(v) => {
                        let on_oma = oma.is_some() && v.attached_to.as_deref() == oma;
                        (!(on_oma && v.state.eq_ignore_ascii_case("ready"))).then(|| {
                            format!(
                                "disks[{i}]: volume {id} is {} and attached to {}, expected Ready and attached to the OMA {}",
                                v.state,
                                v.attached_to.as_deref().unwrap_or("nothing"),
                                oma.unwrap_or("?")
                            )
                        })
                    }
                };
                disks.push(json!({
                    "volume_id": id,
                    "volume_state": found.as_ref().map(|v| v.state.clone()),
                    "attached_to": found.as_ref().and_then(|v| v.attached_to.clone()),
                    "volume_size_gb": found.as_ref().map(|v| v.size_gb),
                    "problem": problem,
                }));
                problems.extend(problem);
            }
            // The boot disk's fields stay where single-disk readers look for them.
            let mut details = json!({
                "volume_id": disks[0]["volume_id"],
                "volume_state": disks[0]["volume_state"],
                "attached_to": disks[0]["attached_to"],
                "volume_size_gb": disks[0]["volume_size_gb"],
            });
            details["disks"] = json!(disks);
            check(
                "Volume State",
                CheckType::Critical,
                problems.is_empty(),
                if volumes.len() == 1 {
                    "Volume available and attached to the OMA"
                } else {
                    "Every volume available and attached to the OMA"
                },
                problems.join("; "),
                details,
            )
        }
        Err(e) => check("Volume State", CheckType::Critical, false, "", format!("volume look-up failed: {e}"), json!({})),
    });
    let score = readiness_score(&checks);
    let critical_failed = checks
        .iter()
        .any(|c| c.status == CheckStatus::Fail && c.check_type == CheckType::Critical);
    ReadinessReport {
        vm_id: f.vm_id.to_string(),
        is_ready: !critical_failed && score >= 80.0,
        readiness_score: score,
        checks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::inventory::{Disk, Nic};

    fn vm() -> VmRecord {
        VmRecord {
            vm_id: "420570c7".into(),
            name: "pgtest1".into(),
            cpu_count: 2,
            memory_mb: 4096,
            os_type: "linux".into(),
            nics: vec![Nic {
                source_network: "VM Network".into(),
                mac: None,
                ip: None,
            }],
            boot_disk: Disk::of("vol-1"),
            data_disks: vec![],
            oma_vm_id: "oma-1".into(),
            last_sync_change_id: Some("52 3c/5".into()),
        }
    }

    fn mapping(kind: NetworkKind) -> NetworkMapping {
        NetworkMapping {
            vm_id: "420570c7".into(),
            source_network: "VM Network".into(),
            destination_network_id: "net-t".into(),
            kind,
        }
    }

    /// The facts of a VM ready for a test failover; each test changes what it is about.
    fn ready<'a>(vm: &'a VmRecord, mappings: &'a [NetworkMapping]) -> Facts<'a> {
        Facts {
            vm_id: "420570c7",
            vm: Some(vm),
            active_runs: &[],
            mappings,
            kind: NetworkKind::Test,
            volumes: volume("oma-1"),
            missing_networks: Ok(vec![]),
            cidrs: BTreeMap::new(),
        }
    }

    fn facts(id: &str, attached: &str) -> (String, Option<VolumeFacts>) {
        let v = VolumeFacts {
            volume_id: id.into(),
            state: "Ready".into(),
            attached_to: Some(attached.into()),
            size_gb: 54,
        };
        (id.into(), Some(v))
    }

    fn volume(attached: &str) -> Result<Vec<(String, Option<VolumeFacts>)>, String> {
        Ok(vec![facts("vol-1", attached)])
    }

    #[test]
    fn a_ready_vm_scores_100() {
        let v = vm();
        let m = [mapping(NetworkKind::Test)];
        let r = validate(&ready(&v, &m));
        assert!(r.is_ready);
        assert_eq!(r.readiness_score, 100.0);
        assert_eq!(r.checks.len(), 5);
    }

    #[test]
    fn an_unmapped_network_is_a_warning_that_lowers_the_score() {
        let v = vm();
        let m = [mapping(NetworkKind::Production)];
        let r = validate(&ready(&v, &m));
        assert_eq!(r.readiness_score, 80.0);
        assert!(r.is_ready);
        assert!(r.checks[3].message.contains("VM Network"));
    }

    #[test]
    fn critical_failures_score_zero() {
        let v = vm();
        let m = [mapping(NetworkKind::Test)];
        let busy = ["other-run".to_string()];
        let r = validate(&Facts {
            active_runs: &busy,
            ..ready(&v, &m)
        });
        assert_eq!((r.is_ready, r.readiness_score), (false, 0.0));
        let r = validate(&Facts {
            volumes: volume("test-vm"),
            ..ready(&v, &m)
        });
        assert!(!r.is_ready);
        assert!(r.checks[4].message.contains("test-vm"));
        let r = validate(&Facts {
            vm_id: "nope",
            vm: None,
            active_runs: &[],
            mappings: &[],
            kind: NetworkKind::Test,
            volumes: Ok(vec![]),
            missing_networks: Ok(vec![]),
            cidrs: BTreeMap::new(),
        });
        assert!(!r.is_ready);
        assert!(r.checks[0].message.contains("not found"));
        let mut unsynced = vm();
        unsynced.last_sync_change_id = None;
        let r = validate(&ready(&unsynced, &m));
        assert_eq!(r.checks[2].status, CheckStatus::Fail);
        assert!(!r.is_ready);
    }

    #[test]
    fn a_nic_mapped_to_a_network_cloudstack_lacks_is_critical_and_named() {
        let v = vm();
        let m = [mapping(NetworkKind::Test)];
        let r = validate(&Facts {
            missing_networks: Ok(vec!["net-t".into()]),
            ..ready(&v, &m)
        });
        assert!(!r.is_ready);
        assert_eq!(r.readiness_score, 0.0);
        let c = &r.checks[3];
        assert_eq!((c.check_type, c.status), (CheckType::Critical, CheckStatus::Fail));
        assert!(c.message.contains("nics[0] (VM Network) -> net-t"), "{}", c.message);
    }

    #[test]
    fn every_disk_is_checked_and_the_failing_one_named() {
        let mut v = vm();
        v.data_disks.push(Disk::of("vol-2"));
        v.data_disks.push(Disk::of("vol-3"));
        let m = [mapping(NetworkKind::Test)];
        let all = Ok(vec![
            facts("vol-1", "oma-1"),
            facts("vol-2", "oma-1"),
            facts("vol-3", "oma-1"),
        ]);
        let r = validate(&Facts {
            volumes: all,
            ..ready(&v, &m)
        });
        assert!(r.is_ready, "{:?}", r.checks[4]);
        assert_eq!(r.checks[4].details["disks"].as_array().map(Vec::len), Some(3));
        let one_elsewhere = Ok(vec![
            facts("vol-1", "oma-1"),
            facts("vol-2", "test-vm"),
            ("vol-3".into(), None),
        ]);
        let r = validate(&Facts {
            volumes: one_elsewhere,
            ..ready(&v, &m)
        });
        assert!(!r.is_ready);
        let msg = &r.checks[4].message;
        assert!(
            msg.contains("disks[1]: volume vol-2 is Ready and attached to test-vm"),
            "{msg}"
        );
        assert!(msg.contains("disks[2]: volume vol-3 not found"), "{msg}");
        assert!(!msg.contains("vol-1"), "{msg}");
    }

    #[test]
    fn record_problems_name_the_field() {
        let mut v = vm();
        v.cpu_count = 0;
        v.nics.push(Nic {
            source_network: " ".into(),
            mac: None,
            ip: None,
        });
        let p = v.problems();
        assert_eq!(p[0].0, "cpu_count");
        assert_eq!(p[1].0, "nics[1].source_network");
    }

    #[test]
    fn a_live_failover_names_the_addresses_it_cannot_keep() {
        let mut v = vm();
        v.nics = vec![
            Nic {
                source_network: "VM Network".into(),
                mac: Some("00:50:56:00:00:01".into()),
                ip: Some("10.0.1.5".into()),
            },
            Nic {
                source_network: "Backup".into(),
                mac: None,
                ip: Some("10.9.1.5".into()),
            },
        ];
        let map = |source: &str, dest: &str, kind| NetworkMapping {
            vm_id: "420570c7".into(),
            source_network: source.into(),
            destination_network_id: dest.into(),
            kind,
        };
        let cidrs = BTreeMap::from([("net-p".to_string(), "10.0.0.0/16".to_string())]);
        let one_net = [
            map("VM Network", "net-p", NetworkKind::Production),
            map("Backup", "net-p", NetworkKind::Production),
        ];
        let r = validate(&Facts {
            kind: NetworkKind::Production,
            cidrs: cidrs.clone(),
            ..ready(&v, &one_net)
        });
        assert!(!r.is_ready);
        let msg = &r.checks[3].message;
        assert!(msg.contains("nics[0] and nics[1] both map to network net-p"), "{msg}");
        assert!(
            msg.contains("nics[1] (Backup): IP 10.9.1.5 is outside network net-p (10.0.0.0/16)"),
            "{msg}"
        );
        // A test failover keeps no address: two NICs on one network are fine.
        let test = [
            map("VM Network", "net-t", NetworkKind::Test),
            map("Backup", "net-t", NetworkKind::Test),
        ];
        assert!(validate(&ready(&v, &test)).is_ready);
        // Two networks, each address in its range.
        let two_nets = [
            map("VM Network", "net-p", NetworkKind::Production),
            map("Backup", "net-b", NetworkKind::Production),
        ];
        let mut cidrs = cidrs;
        cidrs.insert("net-b".into(), "10.9.0.0/16".into());
        let r = validate(&Facts {
            kind: NetworkKind::Production,
            cidrs,
            ..ready(&v, &two_nets)
        });
        assert!(r.is_ready, "{:?}", r.checks[3]);
    }
}
