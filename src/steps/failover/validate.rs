//! validation: the seeds' pre-failover checks and readiness score, stored with the run.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::{fail, Attempt, FailoverDeps};
use crate::domain::inventory::{NetworkKind, NetworkMapping, VmRecord};
use crate::domain::validation::{validate, CheckStatus, Facts, ReadinessReport, VolumeFacts};
use crate::domain::RunId;
use crate::engine::action::ActionError;
use crate::providers::ProviderError;

pub(crate) async fn run(attempt: &Attempt<'_>) -> Result<Value, ActionError> {
    let report = readiness(attempt).await?;
    let value = serde_json::to_value(&report).unwrap_or(Value::Null);
    if !report.is_ready {
        // Keep the report with the run (journal + context) before failing the step.
        attempt.record("report", value).await?;
        let failed: Vec<String> = report
            .checks
            .iter()
            .filter(|c| c.status == CheckStatus::Fail)
            .map(|c| format!("{}: {}", c.check_name, c.message))
            .collect();
        let code = if report.checks.first().is_some_and(|c| c.status == CheckStatus::Fail) {
            "VM_NOT_FOUND"
        } else {
            "VALIDATION_FAILED"
        };
        return Err(ActionError::permanent(
            code,
            format!("not ready (score {:.0}): {}", report.readiness_score, failed.join("; ")),
        ));
    }
    Ok(json!({"report": value, "readiness_score": report.readiness_score}))
}

/// Runs the checks for this run's VM (other runs on the VM count as active jobs).
pub(crate) async fn readiness(attempt: &Attempt<'_>) -> Result<ReadinessReport, ActionError> {
    // The run's overrides first: the first mapping of a source network is the one applied.
    let mut mappings: Vec<NetworkMapping> = attempt
        .input
        .network_mappings
        .iter()
        .map(|(source, dest)| NetworkMapping {
            vm_id: attempt.vm.vm_id.clone(),
            source_network: source.clone(),
            destination_network_id: dest.clone(),
            kind: attempt.input.network_kind(),
        })
        .collect();
    mappings.extend(attempt.deps.store.network_mappings(&attempt.vm.vm_id).await?);
    report(
        attempt.deps,
        &attempt.vm.vm_id,
        Some(&attempt.vm),
        Some(attempt.run_id()),
        attempt.input.network_kind(),
        &mappings,
    )
    .await
}

/// The readiness report for a VM outside any run (the API's CheckReadiness): every unfinished
/// failover of the VM counts as an active job, and the stored mappings of `kind` count.
pub async fn readiness_for(
    deps: &FailoverDeps,
    vm_id: &str,
    kind: NetworkKind,
) -> Result<ReadinessReport, ActionError> {
    let vm = deps.store.vm_record(vm_id).await?;
    let mappings = match &vm {
        Some(_) => deps.store.network_mappings(vm_id).await?,
        None => Vec::new(),
    };
    report(deps, vm_id, vm.as_ref(), None, kind, &mappings).await
}

async fn report(
    deps: &FailoverDeps,
    vm_id: &str,
    vm: Option<&VmRecord>,
    except: Option<RunId>,
    kind: NetworkKind,
    mappings: &[NetworkMapping],
) -> Result<ReadinessReport, ActionError> {
    let active = deps.store.active_jobs_for_vm(vm_id, except).await?;
    let volumes = match vm {
        None => Ok(Vec::new()),
        Some(vm) => volume_facts(deps, vm).await?,
    };
    let (missing_networks, cidrs) = match vm {
        None => (Ok(Vec::new()), BTreeMap::new()),
        Some(vm) => match destination_networks(deps, vm, kind, mappings).await? {
            Ok((missing, cidrs)) => (Ok(missing), cidrs),
            Err(e) => (Err(e), BTreeMap::new()),
        },
    };
    Ok(validate(&Facts {
        vm_id,
        vm,
        active_runs: &active,
        mappings,
        kind,
        volumes,
        missing_networks,
        cidrs,
    }))
}

/// Every disk's volume as CloudStack reports it (None: it does not exist). A transient
/// failure fails the step for a retry; another is reported.
async fn volume_facts(
    deps: &FailoverDeps,
    vm: &VmRecord,
) -> Result<Result<Vec<(String, Option<VolumeFacts>)>, String>, ActionError> {
    let mut facts = Vec::new();
    for d in vm.all_disks() {
        let found = match deps.cloud.get_volume(&d.volume_id).await {
            Ok(v) => Some(VolumeFacts {
                volume_id: v.id,
                state: v.state,
                attached_to: v.vm_id,
                size_gb: v.size.unwrap_or(0) / (1 << 30),
            }),
            Err(ProviderError::NotFound { .. }) => None,
            Err(e) if e.is_retryable() => return Err(fail("VALIDATION_FAILED", e)),
            Err(e) => return Ok(Err(e.to_string())),
        };
        facts.push((d.volume_id.clone(), found));
    }
    Ok(Ok(facts))
}

/// The destination networks the VM's NICs are mapped to (for `kind`) that CloudStack does
/// not know, and the CIDRs of those it knows. A transient failure fails the step for a retry;
/// another is reported.
async fn destination_networks(
    deps: &FailoverDeps,
    vm: &VmRecord,
    kind: NetworkKind,
    mappings: &[NetworkMapping],
) -> Result<Result<(Vec<String>, BTreeMap<String, String>), String>, ActionError> {
    let mut wanted: Vec<&str> = vm
        .nics
        .iter()
        .filter_map(|n| {
            mappings
                .iter()
                .find(|m| m.kind == kind && m.source_network == n.source_network)
                .map(|m| m.destination_network_id.as_str())
        })
        .collect();
    wanted.sort();
    wanted.dedup();
    let mut missing = Vec::new();
    let mut cidrs = BTreeMap::new();
    for id in wanted {
        match deps.cloud.find_network(id).await {
            Ok(Some(net)) => {
                if let Some(cidr) = net.cidr {
                    cidrs.insert(id.to_string(), cidr);
                }
            }
            Ok(None) => missing.push(id.to_string()),
            Err(e) if e.is_retryable() => return Err(fail("VALIDATION_FAILED", e)),
            Err(e) => return Ok(Err(e.to_string())),
        }
    }
    Ok(Ok((missing, cidrs)))
}
