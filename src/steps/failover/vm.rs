//! test-vm-creation / vm-creation, startup, stop and destroy.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::{fail, retryable, Attempt};
use crate::domain::inventory::NetworkKind;
use crate::engine::action::ActionError;
use crate::providers::{AsyncCommand, NicRequest, Vm, VmFilter, VmState};

/// The new VM's NICs, one per source NIC in the source's order, each on its mapped network:
/// the run's overrides, then the stored mappings for this failover kind, then (test only) the
/// configured test network. A live failover keeps each NIC's MAC and IP where known. A VM
/// without NICs gets one on the test network (test only).
pub(crate) async fn nic_plan(attempt: &Attempt<'_>) -> Result<Vec<PlannedNic>, ActionError> {
    let mappings = attempt.deps.store.network_mappings(&attempt.vm.vm_id).await?;
    let kind = attempt.input.network_kind();
    let mut out: Vec<PlannedNic> = Vec::new();
    for nic in &attempt.vm.nics {
        let mapped = attempt
            .input
            .network_mappings
            .get(&nic.source_network)
            .cloned()
            .or_else(|| {
                mappings
                    .iter()
                    .find(|m| m.kind == kind && m.source_network == nic.source_network)
                    .map(|m| m.destination_network_id.clone())
            });
        let network_id = match (mapped, kind, &attempt.deps.config.test_network_id) {
            (Some(n), _, _) => n,
            (None, NetworkKind::Test, Some(t)) => t.clone(),
            (None, _, _) => {
                return Err(ActionError::permanent(
                    "NETWORK_UNMAPPED",
                    format!(
                        "source network {:?} has no {} mapping",
                        nic.source_network,
                        kind.as_str()
                    ),
                ))
            }
        };
        let keep = kind == NetworkKind::Production;
        out.push(PlannedNic {
            source_network: nic.source_network.clone(),
            request: NicRequest {
                network_id,
                ip: nic.ip.clone().filter(|_| keep),
                mac: nic.mac.clone().filter(|_| keep),
            },
        });
    }
    if let Some(problem) = crate::domain::validation::kept_addresses_conflict(
        &out.iter()
            .map(|n| (n.request.network_id.as_str(), n.keeps_address()))
            .collect::<Vec<_>>(),
    ) {
        return Err(ActionError::permanent("NETWORK_CONFLICT", problem));
    }
    if out.is_empty() {
        match (&attempt.deps.config.test_network_id, kind) {
            (Some(t), NetworkKind::Test) => out.push(PlannedNic {
                source_network: String::new(),
                request: NicRequest {
                    network_id: t.clone(),
                    ip: None,
                    mac: None,
                },
            }),
            _ => {
                return Err(ActionError::permanent(
                    "NETWORK_UNMAPPED",
                    "the VM has no NIC with a mapped network",
                ))
            }
        }
    }
    Ok(out)
}

/// One NIC of the new VM and the source NIC it stands for.
pub(crate) struct PlannedNic {
    pub source_network: String,
    pub request: NicRequest,
}

impl PlannedNic {
    fn keeps_address(&self) -> bool {
        self.request.ip.is_some() || self.request.mac.is_some()
    }
}

/// Creates the VM stopped (so its disk can be swapped before first boot), adopting one this
/// run already created. Either way the output says how it was sized and the network mappings
/// it got, as CloudStack lists its NICs.
pub(crate) async fn create(attempt: &Attempt<'_>) -> Result<Value, ActionError> {
    let name = attempt.vm_name();
    let (service_offering_id, size, sizing) = sizing(attempt).await?;
    let nics = nic_plan(attempt).await?;
    if let Some(vm) = adopt_or_clear(attempt).await? {
        return Ok(created(&vm, true, sizing, &nics));
    }
    let cfg = &attempt.deps.config;
    let cmd = AsyncCommand::DeployVm {
        name: name.clone(),
        display_name: Some(attempt.input.vm_name.clone().unwrap_or_else(|| attempt.vm.name.clone())),
        service_offering_id,
        template_id: cfg.template_id.clone(),
        zone_id: cfg.zone_id.clone(),
        nics: nics.iter().map(|n| n.request.clone()).collect(),
        start_vm: false,
        extra: size,
    };
    let result = attempt.job("deploy", cmd, "VM_CREATE_FAILED").await;
    if let Err(e) = result {
        // The deploy may have gone through although we saw an error: adopt it if so; a VM the
        // failed deploy left in Error state is removed so the next attempt starts clean.
        return match adopt_or_clear(attempt).await? {
            Some(vm) => Ok(created(&vm, true, sizing, &nics)),
            None => Err(e),
        };
    }
    let vm = attempt.find_vm().await?.ok_or_else(|| {
        ActionError::retryable(
            "VM_CREATE_FAILED",
            format!("deploy of {name} finished but the VM is not listed"),
        )
    })?;
    Ok(created(&vm, false, sizing, &nics))
}

/// The create step's output: the VM, how it was sized, and the mappings applied: each NIC as
/// CloudStack lists it, with the source NIC it stands for (`nics`), and each source network's
/// CloudStack network (`network_mappings`, projected into `failover_jobs.network_mappings`).
fn created(vm: &Vm, adopted: bool, sizing: Value, plan: &[PlannedNic]) -> Value {
    let mut nics = Vec::new();
    let mut mappings = serde_json::Map::new();
    for (i, planned) in plan.iter().enumerate() {
        let have = vm.nics.get(i);
        let network_id = have.map_or(planned.request.network_id.as_str(), |n| n.network_id.as_str());
        nics.push(json!({
            "source_network": planned.source_network,
            "network_id": network_id,
            "ip": have.and_then(|n| n.ip_address.as_ref()).or(planned.request.ip.as_ref()),
            "mac": have.and_then(|n| n.mac_address.as_ref()).or(planned.request.mac.as_ref()),
        }));
        if !planned.source_network.is_empty() {
            mappings.insert(planned.source_network.clone(), json!(network_id));
        }
    }
    json!({"destination_vm_id": vm.id, "vm_name": vm.name, "adopted": adopted, "sizing": sizing,
        "nics": nics, "network_mappings": mappings})
}

/// The deploy's offering and size parameters, and what the job says of them. The request may
/// name the offering (`custom_config[service_offering_id]`); otherwise a customized configured
/// offering is given the source's CPU count and memory, and among fixed ones the smallest
/// that fits is chosen (the largest when none does, and the output says it is smaller).
async fn sizing(attempt: &Attempt<'_>) -> Result<(String, BTreeMap<String, String>, Value), ActionError> {
    const CODE: &str = "VM_CREATE_FAILED";
    let (cpu_override, memory_override) = attempt.input.size_override();
    let overridden = cpu_override.is_some() || memory_override.is_some();
    let cpu = cpu_override.unwrap_or(attempt.vm.cpu_count);
    let memory_mb = memory_override.unwrap_or(attempt.vm.memory_mb);
    let (offerings, asked) = match attempt.input.offering_override() {
        Some(id) => (vec![id.to_string()], true),
        None => (attempt.deps.config.service_offering_ids.clone(), false),
    };
    let mut found = Vec::new();
    for id in &offerings {
        let offering = attempt
            .cloud()
            .find_service_offering(id)
            .await
            .map_err(|e| fail(CODE, e))?
            .ok_or_else(|| {
                let whose = if asked {
                    "custom_config[service_offering_id]: "
                } else {
                    ""
                };
                ActionError::permanent(CODE, format!("{whose}service offering {id} does not exist"))
            })?;
        found.push(offering);
    }
    if let Some(offering) = found.iter().find(|o| o.is_customized) {
        let size = BTreeMap::from([
            ("details[0].cpuNumber".to_string(), cpu.to_string()),
            ("details[0].memory".to_string(), memory_mb.to_string()),
        ]);
        let how = match overridden {
            true => "custom offering: the source's size as custom_config overrides it",
            false => "custom offering: the source's size",
        };
        let said = json!({"service_offering_id": offering.id, "service_offering": offering.name,
            "cpu_count": cpu, "memory_mb": memory_mb, "how": how});
        return Ok((offering.id.clone(), size, said));
    }
    let sizes: Vec<(u32, u64)> = found
        .iter()
        .map(|o| (o.cpu_number.unwrap_or(0), o.memory.unwrap_or(0)))
        .collect();
    let Some((i, fits)) = smallest_fit(&sizes, cpu, u64::from(memory_mb)) else {
        return Err(ActionError::permanent(
            CODE,
            "no service offering is configured (TERN_SERVICE_OFFERING_ID)",
        ));
    };
    let offering = &found[i];
    let how = match (asked, fits) {
        (true, true) => format!("the request's fixed offering (asked for {cpu} CPUs and {memory_mb} MB)"),
        (true, false) => {
            format!("the request's fixed offering, smaller than the {cpu} CPUs and {memory_mb} MB asked for")
        }
        (false, true) => format!("the smallest configured offering that fits {cpu} CPUs and {memory_mb} MB"),
        (false, false) => {
            format!("no configured offering fits {cpu} CPUs and {memory_mb} MB: the largest, smaller than the source")
        }
    };
    let said = json!({"service_offering_id": offering.id, "service_offering": offering.name,
        "cpu_count": offering.cpu_number, "memory_mb": offering.memory, "fits": fits, "how": how});
    Ok((offering.id.clone(), BTreeMap::new(), said))
}

/// Of fixed sizes `(cpus, MB)`, the smallest that holds `cpu` and `memory_mb` (fewest CPUs,
/// then least memory; the first listed of equals), or the largest when none does; with
/// whether it fits. None when there is none.
fn smallest_fit(sizes: &[(u32, u64)], cpu: u32, memory_mb: u64) -> Option<(usize, bool)> {
    let fitting = sizes
        .iter()
        .enumerate()
        .filter(|(_, (c, m))| *c >= cpu && *m >= memory_mb)
        .min_by_key(|(i, size)| (**size, *i));
    match fitting {
        Some((i, _)) => Some((i, true)),
        None => sizes
            .iter()
            .enumerate()
            .max_by_key(|(i, size)| (**size, std::cmp::Reverse(*i)))
            .map(|(i, _)| (i, false)),
    }
}

/// Adopts the VM this run already created; a VM a failed deploy left in Error state is
/// destroyed instead (and the caller deploys again, or fails).
async fn adopt_or_clear(attempt: &Attempt<'_>) -> Result<Option<Vm>, ActionError> {
    let Some(vm) = attempt.find_vm().await? else {
        return Ok(None);
    };
    if vm.state != VmState::Error {
        return Ok(Some(vm));
    }
    let cmd = AsyncCommand::DestroyVm {
        id: vm.id.clone(),
        expunge: true,
    };
    if let Err(e) = attempt
        .job(&format!("destroy_failed:{}", vm.id), cmd, "VM_CREATE_FAILED")
        .await
    {
        // An earlier attempt's destroy (its reply lost) may have removed it meanwhile.
        if attempt.find_vm().await?.is_some_and(|v| v.id == vm.id) {
            return Err(retryable(e));
        }
    }
    Err(ActionError::retryable(
        "VM_CREATE_FAILED",
        format!(
            "deploy of {} failed (VM {} was left in Error state and has been removed)",
            vm.name, vm.id
        ),
    ))
}

/// Starts the VM and waits until it is Running.
pub(crate) async fn start(attempt: &Attempt<'_>) -> Result<Value, ActionError> {
    let vm = attempt.find_vm().await?.ok_or_else(|| {
        ActionError::permanent(
            "VM_NOT_FOUND",
            format!("VM {} to start does not exist", attempt.vm_name()),
        )
    })?;
    let result = match vm.state {
        VmState::Running => Ok(Value::Null),
        _ => {
            attempt
                .job("start", AsyncCommand::StartVm { id: vm.id.clone() }, "VM_START_FAILED")
                .await
        }
    };
    // The world decides: an earlier attempt's start (its reply lost) may have won the race.
    let now = attempt
        .cloud()
        .get_vm(&vm.id)
        .await
        .map_err(|e| fail("VM_START_FAILED", e))?;
    if now.state != VmState::Running {
        return Err(match result {
            Err(e) => retryable(e),
            Ok(_) => ActionError::retryable(
                "VM_START_FAILED",
                format!("VM {} is {:?}, not Running", vm.id, now.state),
            ),
        });
    }
    Ok(json!({"vm_id": vm.id, "state": "Running"}))
}

/// Stops the VM (nothing to do if it is gone or already stopped).
pub(crate) async fn stop(attempt: &Attempt<'_>) -> Result<Value, ActionError> {
    let Some(vm) = attempt.find_vm().await? else {
        return Ok(json!({"skipped": "no VM to stop"}));
    };
    stop_found(attempt, &vm).await
}

/// Stops `vm`, this run's VM as just looked up, unless it is stopped already.
pub(crate) async fn stop_found(attempt: &Attempt<'_>, vm: &Vm) -> Result<Value, ActionError> {
    if vm.state != VmState::Stopped {
        let cmd = AsyncCommand::StopVm {
            id: vm.id.clone(),
            forced: false,
        };
        if let Err(e) = attempt.job("stop", cmd, "VM_STOP_FAILED").await {
            // An earlier attempt's stop (its reply lost) may have won the race.
            let now = attempt
                .cloud()
                .get_vm(&vm.id)
                .await
                .map_err(|e| fail("VM_STOP_FAILED", e))?;
            if now.state != VmState::Stopped {
                return Err(retryable(e));
            }
        }
    }
    Ok(json!({"vm_id": vm.id, "state": "Stopped"}))
}

/// Destroys and expunges the VM this run created. Refuses while a replicated volume is
/// attached to it: expunging would delete the boot disk and leave a data disk on no VM.
pub(crate) async fn destroy(attempt: &Attempt<'_>) -> Result<Value, ActionError> {
    let Some(vm) = attempt.find_vm().await? else {
        return Ok(json!({"skipped": "no VM to destroy"}));
    };
    // Expunging deletes the VM's ROOT disk and detaches its data disks: no replicated disk
    // may be on it.
    for d in attempt.disks() {
        let vol = attempt
            .cloud()
            .get_volume(&d.volume_id)
            .await
            .map_err(|e| fail("VM_DESTROY_FAILED", e))?;
        if vol.vm_id.as_deref() == Some(vm.id.as_str()) {
            return Err(ActionError::permanent(
                "VOLUME_STILL_ATTACHED",
                format!(
                    "refusing to destroy VM {}: the replicated volume {} is attached to it",
                    vm.id, vol.id
                ),
            ));
        }
    }
    let cmd = AsyncCommand::DestroyVm {
        id: vm.id.clone(),
        expunge: true,
    };
    let result = attempt.job("destroy", cmd, "VM_DESTROY_FAILED").await;
    // Whatever the job said, the world decides: an earlier attempt's destroy (its reply lost)
    // may have removed the VM already, and then this job's "VM not found" is success.
    let left = attempt
        .cloud()
        .list_vms(VmFilter::id(vm.id.clone()))
        .await
        .map_err(|e| fail("VM_DESTROY_FAILED", e))?;
    if left
        .iter()
        .any(|v| !matches!(v.state, VmState::Destroyed | VmState::Expunging))
    {
        return Err(match result {
            Err(e) => retryable(e),
            Ok(_) => ActionError::retryable("VM_DESTROY_FAILED", format!("VM {} still exists", vm.id)),
        });
    }
    Ok(json!({"destroyed": vm.id}))
}

#[cfg(test)]
mod tests {
    use super::smallest_fit;

    #[test]
    fn the_smallest_offering_that_fits_else_the_largest() {
        let sizes = [(8, 16384), (2, 4096), (4, 8192), (4, 16384)];
        assert_eq!(smallest_fit(&sizes, 4, 8192), Some((2, true)));
        assert_eq!(smallest_fit(&sizes, 3, 9000), Some((3, true)));
        assert_eq!(smallest_fit(&sizes, 1, 512), Some((1, true)));
        assert_eq!(smallest_fit(&sizes, 16, 4096), Some((0, false)));
        assert_eq!(smallest_fit(&[], 1, 1), None);
    }
}
