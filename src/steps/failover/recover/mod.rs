//! `tern admin recover <job>`: the exact manual recovery for a failover run, from what its journal and
//! context recorded (snapshot name and backend, volume, VM ids), like the seeds' emergency
//! procedure. [`look`] asks the cloud what is left; [`plan`] is pure: it formats what the run,
//! the inventory and (when looked up) the cloud say, so it lists exactly what is left to do.

use serde_json::Value;

use super::FailoverDeps;
use crate::domain::failover::FailoverInput;
use crate::domain::inventory::VmRecord;
use crate::domain::run::{RunContext, RunState};
use crate::providers::{ProviderError, SnapshotKind, VmFilter, VmState};
use crate::store::RunRow;

fn find_output<'a>(context: &'a RunContext, key: &str) -> Option<&'a str> {
    find_value(context, key).and_then(Value::as_str)
}

/// `key` in any step's output or progress.
fn find_value<'a>(context: &'a RunContext, key: &str) -> Option<&'a Value> {
    [&context.outputs, &context.progress, &context.undo_progress]
        .into_iter()
        .find_map(|table| table.values().find_map(|v| v.get(key)))
}

/// What a failover run's journal and context recorded about the resources it touched.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub snapshot_name: Option<String>,
    pub snapshot_id: Option<String>,
    /// Each snapshot target (a volume, a LINSTOR resource, a VM) with its snapshot's id where
    /// recorded; empty when the run recorded none (then the targets follow from the VM).
    pub snapshots: Vec<(String, Option<String>)>,
    pub backend: String,
    /// The VM the run created, if its id was recorded.
    pub new_vm: Option<String>,
    /// The new VM's own ROOT volumes the run set aside for the replicated one.
    pub own_roots: Vec<String>,
    pub skip_snapshot: bool,
    /// Whether the disk must be reverted: a revert (teardown, or the undo of the driver
    /// injection) was still to be done when the run stopped.
    pub revert_pending: bool,
}

impl Recorded {
    pub fn of(run: &RunRow, snapshot_name_projection: Option<&str>) -> Recorded {
        let ctx = &run.context;
        let undone: &[String] = match &run.state {
            RunState::NeedsOperator { undone, .. } | RunState::Resolved { undone, .. } => undone,
            _ => &[],
        };
        Recorded {
            snapshot_name: find_output(ctx, "snapshot_name")
                .or(snapshot_name_projection)
                .map(str::to_string),
            snapshot_id: find_output(ctx, "snapshot_id").map(str::to_string),
            snapshots: find_value(ctx, "snapshots")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|s| {
                            let target = s.get("target")?.as_str()?.to_string();
                            Some((target, s.get("snapshot_id").and_then(Value::as_str).map(str::to_string)))
                        })
                        .collect()
                })
                .unwrap_or_default(),
            backend: find_output(ctx, "backend").unwrap_or("cloudstack-volume").to_string(),
            new_vm: find_output(ctx, "destination_vm_id").map(str::to_string),
            own_roots: find_value(ctx, "own_root")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
                .unwrap_or_default(),
            skip_snapshot: FailoverInput::from_value(&run.input).is_ok_and(|i| i.skip_snapshot),
            // As the undo of virtio-injection, a revert is due only if drivers were injected
            // (the step's own rule).
            revert_pending: undone.iter().any(|s| match s.as_str() {
                "revert-snapshot" => true,
                "virtio-injection" => ctx.output("virtio-injection")["injected"] != Value::Bool(false),
                // The VM snapshot's teardown revert, or its undo (revert and delete).
                "revert-vm-snapshot" | "vm-snapshot" => true,
                _ => false,
            }),
        }
    }
}

impl Recorded {
    /// The snapshot targets with their ids: as recorded, else derived from the VM's disks
    /// (the first one's id is the one single-disk runs recorded) and, for VM snapshots, the new
    /// VM.
    pub fn targets(&self, vm: &VmRecord) -> Vec<(String, Option<String>)> {
        if !self.snapshots.is_empty() {
            return self.snapshots.clone();
        }
        let Ok(kind) = self.backend.parse::<SnapshotKind>() else {
            return Vec::new();
        };
        let on = match kind {
            SnapshotKind::CloudstackVm => match &self.new_vm {
                Some(new_vm) => new_vm.as_str(),
                None => return Vec::new(),
            },
            SnapshotKind::CloudstackVolume | SnapshotKind::Linstor => vm.oma_vm_id.as_str(),
        };
        let mut targets: Vec<(String, Option<String>)> = Vec::new();
        for d in vm.all_disks() {
            let t = kind.target(&d.volume_id, on);
            if !targets.iter().any(|(known, _)| *known == t) {
                let id = targets.is_empty().then(|| self.snapshot_id.clone()).flatten();
                targets.push((t, id));
            }
        }
        targets
    }
}

/// What the cloud holds now of one run's resources (`tern admin recover` looks before it prints, so
/// it lists only what is left to do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    /// Every replicated disk's volume (the boot disk first) and the VM it is attached to;
    /// None while it is detached.
    pub disks_on: Vec<(String, Option<String>)>,
    /// VMs the run created that still exist: (id, running).
    pub vms: Vec<(String, bool)>,
    /// The new VM's own ROOT volumes still there and not on a VM listed in `vms` (expunging
    /// the VM deletes its ROOT volume).
    pub own_roots: Vec<String>,
    /// The recorded snapshot still exists on some target (None: its backend is not the
    /// configured one, so it was not looked up).
    pub snapshot: Option<bool>,
}

/// Looks up in the cloud everything a failover run may have left: the replicated volume's
/// place, the VMs the run created (by recorded id and by the name the run derives), their
/// own ROOT volumes, the snapshot.
pub async fn look(deps: &FailoverDeps, run: &RunRow, vm: &VmRecord, rec: &Recorded) -> Result<Found, ProviderError> {
    let cloud = deps.cloud.as_ref();
    let mut disks_on = Vec::new();
    for d in vm.all_disks() {
        disks_on.push((d.volume_id.clone(), cloud.get_volume(&d.volume_id).await?.vm_id));
    }
    let prefix = if run.definition.starts_with("live") {
        "tern-l"
    } else {
        "tern-t"
    };
    let mut vms: Vec<(String, bool)> = Vec::new();
    let mut filters = vec![VmFilter::name(super::vm_name(prefix, run.id, &vm.name))];
    if let Some(id) = &rec.new_vm {
        filters.insert(0, VmFilter::id(id.clone()));
    }
    for filter in filters {
        for v in cloud.list_vms(filter).await? {
            let gone = matches!(v.state, VmState::Destroyed | VmState::Expunging);
            if !gone && v.id != vm.oma_vm_id && !vms.iter().any(|(id, _)| *id == v.id) {
                vms.push((v.id, v.state == VmState::Running));
            }
        }
    }
    let mut own_roots = Vec::new();
    for id in rec
        .own_roots
        .iter()
        .filter(|id| !vm.all_disks().any(|d| d.volume_id == **id))
    {
        match cloud.get_volume(id).await {
            Ok(v) if !v.vm_id.as_ref().is_some_and(|on| vms.iter().any(|(id, _)| id == on)) => own_roots.push(v.id),
            Ok(_) | Err(ProviderError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    let snapshot = match (&rec.snapshot_name, rec.skip_snapshot) {
        (Some(name), false) if deps.snapshots.kind() == rec.backend => {
            let mut any = false;
            for (target, _) in rec.targets(vm) {
                any |= deps.snapshots.find(&target, name).await?.is_some();
            }
            Some(any)
        }
        (Some(_), false) => None,
        _ => Some(false),
    };
    Ok(Found {
        disks_on,
        vms,
        own_roots,
        snapshot,
    })
}

/// What `run` left that still differs from its starting point, as the steps that would put it
/// right (empty: every disk is on the OMA and nothing the run created is left). The cloud is
/// asked, not the journal: an operator may have done any of it by hand.
pub async fn differences(
    deps: &FailoverDeps,
    run: &RunRow,
    vm: &VmRecord,
    snapshot_name_projection: Option<&str>,
) -> Result<Vec<String>, ProviderError> {
    let rec = Recorded::of(run, snapshot_name_projection);
    let found = look(deps, run, vm, &rec).await?;
    Ok(exact_steps(vm, &rec, &found))
}

/// The recovery text for `run` (`vm` is its inventory record, if still known). With `found`
/// (what the cloud holds now), only what is left to do is listed; without, every step the run
/// may have left undone, to be skipped where its effect is already there.
pub fn plan(
    run: &RunRow,
    vm: Option<&VmRecord>,
    snapshot_name_projection: Option<&str>,
    found: Option<&Found>,
) -> String {
    let mut out = Vec::new();
    let status = run.status.as_str();
    out.push(format!(
        "run {} ({}) is {} ({})",
        run.id, run.definition, status, run.display_status
    ));
    match &run.state {
        RunState::NeedsOperator { step, error, undone } => {
            out.push(format!("stopped at step {step}: {error}"));
            out.push(format!("not undone: {}", if undone.is_empty() { "-".to_string() } else { undone.join(", ") }));
        }
        RunState::Resolved {
            step,
            error,
            undone,
            resolution,
        } => {
            out.push(format!("stopped at step {step}: {error}"));
            out.push(format!("not undone: {}", if undone.is_empty() { "-".to_string() } else { undone.join(", ") }));
            out.push(format!(
                "resolved by {} at {}{}: {}",
                resolution.by,
                resolution.at,
                if resolution.forced { " (forced)" } else { "" },
                resolution.reason
            ));
            for d in &resolution.differences {
                out.push(format!("  still differed then: {d}"));
            }
        }
        RunState::Completed | RunState::Failed { .. } | RunState::Cancelled { .. } => {
            out.push("the run finished cleanly; nothing is left to recover.".into());
            return out.join("\n");
        }
        other => out.push(format!(
            "the run is still in progress ({}); Tern will resume or roll it back. Recover by hand only if no worker can run it.",
            serde_json::to_string(other).unwrap_or_default()
        )),
    }
    let Some(vm) = vm else {
        out.push(format!(
            "the VM {} is no longer in the inventory: look up its volume and OMA before acting.",
            FailoverInput::from_value(&run.input)
                .map(|i| i.vm_id)
                .unwrap_or_else(|_| "?".into())
        ));
        return out.join("\n");
    };
    let rec = Recorded::of(run, snapshot_name_projection);
    out.push(String::new());
    out.push("what Tern recorded:".into());
    out.push(format!("  source VM      {} ({})", vm.name, vm.vm_id));
    for (i, d) in vm.all_disks().enumerate() {
        out.push(format!(
            "  disk {i}         {}{}",
            d.volume_id,
            if i == 0 { " (boot)" } else { "" }
        ));
    }
    out.push(format!("  OMA VM         {}", vm.oma_vm_id));
    out.push(format!(
        "  new VM         {}",
        rec.new_vm
            .as_deref()
            .unwrap_or("(none recorded; look for a VM named tern-*-<run tag>-*)")
    ));
    match (&rec.snapshot_name, rec.skip_snapshot) {
        (_, true) => out.push("  snapshot       none (skip_snapshot): the disks cannot be reverted".into()),
        (Some(name), false) => {
            out.push(format!(
                "  snapshot       {name} ({}{})",
                rec.backend,
                rec.snapshot_id
                    .as_ref()
                    .map(|i| format!(", id {i}"))
                    .unwrap_or_default()
            ));
            let targets = rec.targets(vm);
            if targets.len() > 1 {
                for (target, id) in &targets {
                    let id = id.as_ref().map(|i| format!(" (id {i})")).unwrap_or_default();
                    out.push(format!("    of           {target}{id}"));
                }
            }
        }
        (None, false) => out.push("  snapshot       none recorded (the run failed before taking it)".into()),
    }
    let steps = match found {
        Some(found) => {
            out.push(String::new());
            out.push("what the cloud holds now:".into());
            for (volume, on) in &found.disks_on {
                out.push(format!(
                    "  {volume} on {}",
                    match on {
                        Some(on) if *on == vm.oma_vm_id => format!("{on} (the OMA)"),
                        Some(on) => on.clone(),
                        None => "no VM (detached)".into(),
                    }
                ));
            }
            let vms: Vec<String> = found
                .vms
                .iter()
                .map(|(id, running)| format!("{id} ({})", if *running { "running" } else { "not running" }))
                .collect();
            out.push(format!(
                "  run's VMs      {}",
                if vms.is_empty() { "none".into() } else { vms.join(", ") }
            ));
            if !found.own_roots.is_empty() {
                out.push(format!("  set-aside ROOT {}", found.own_roots.join(", ")));
            }
            out.push(format!(
                "  snapshot       {}",
                match found.snapshot {
                    Some(true) => "still there",
                    Some(false) => "none",
                    None => "not looked up (another backend is configured)",
                }
            ));
            exact_steps(vm, &rec, found)
        }
        None => all_steps(vm, &rec),
    };
    out.push(String::new());
    if steps.is_empty() {
        out.push("nothing is left to do: every disk is on the OMA and nothing the run created is left.".into());
    } else {
        out.push(match found {
            Some(_) => "to return to the starting point, in this order (CloudStack calls as cmk commands):".into(),
            None => "to return to the starting point (CloudStack calls as cmk commands; the cloud was not asked, so skip a step whose effect is already there):".into(),
        });
        for (n, text) in steps.iter().enumerate() {
            out.push(format!("  {}. {text}", n + 1));
        }
    }
    out.push(String::new());
    for d in vm.all_disks() {
        out.push(format!(
            "check: cmk list volumes id={}  -> virtualmachineid must be {} (the OMA)",
            d.volume_id, vm.oma_vm_id
        ));
    }
    out.join("\n")
}

fn revert_step(rec: &Recorded, target: &str, id: Option<&str>, name: &str) -> String {
    match rec.backend.as_str() {
        "linstor" => format!("revert the disk:        linstor snapshot rollback {target} {name}"),
        "cloudstack-vm" => format!(
            "revert the disks:       cmk revert tovmsnapshot vmsnapshotid={}   (VM snapshot {name} of {target})",
            id.unwrap_or("<id of VM snapshot named it>")
        ),
        _ => format!(
            "revert the disk:        cmk revert snapshot id={}   (snapshot {name} of volume {target})",
            id.unwrap_or("<id of the snapshot named it>")
        ),
    }
}

fn delete_snapshot_step(rec: &Recorded, target: &str, id: Option<&str>, name: &str) -> String {
    let id = id.unwrap_or("<id>");
    match rec.backend.as_str() {
        "linstor" => format!("delete the snapshot:    linstor snapshot delete {target} {name}"),
        "cloudstack-vm" => format!("delete the snapshot:    cmk delete vmsnapshot vmsnapshotid={id}"),
        _ => format!("delete the snapshot:    cmk delete snapshot id={id}   (of volume {target})"),
    }
}

fn stop_step(id: &str) -> String {
    format!("stop the new VM:        cmk stop virtualmachine id={id}")
}

fn destroy_step(id: &str) -> String {
    format!("destroy the new VM:     cmk destroy virtualmachine id={id} expunge=true")
}

fn detach_step(volume_id: &str) -> String {
    format!("detach the volume:      cmk detach volume id={volume_id}")
}

fn attach_step(vm: &VmRecord, volume_id: &str) -> String {
    format!(
        "reattach to the OMA:    cmk attach volume id={volume_id} virtualmachineid={}",
        vm.oma_vm_id
    )
}

/// A VM snapshot's steps, before any disk may leave its VM (CloudStack moves no volume of a
/// VM that has VM snapshots): revert it on the stopped VM where a revert is due, then delete
/// it. One of the OMA (taken by an older Tern) is deleted, never reverted: it would roll back
/// every disk on the OMA, other VMs' included.
fn vm_snapshot_steps(vm: &VmRecord, rec: &Recorded, name: &str, revert: bool) -> Vec<String> {
    let mut steps = Vec::new();
    for (target, id) in rec.targets(vm) {
        if target == vm.oma_vm_id {
            steps.push(format!(
                "delete the OMA's VM snapshot {name}, never revert it (that would roll back every disk on the OMA): cmk delete vmsnapshot vmsnapshotid={}",
                id.as_deref().unwrap_or("<id>")
            ));
            continue;
        }
        if revert {
            steps.push(revert_step(rec, &target, id.as_deref(), name));
        }
        steps.push(delete_snapshot_step(rec, &target, id.as_deref(), name));
    }
    steps
}

fn of_new_vm(rec: &Recorded) -> bool {
    rec.backend
        .parse::<SnapshotKind>()
        .is_ok_and(|k| k == SnapshotKind::CloudstackVm)
}

/// Every step the run may have left, from what it recorded alone.
fn all_steps(vm: &VmRecord, rec: &Recorded) -> Vec<String> {
    let snapshot = rec.snapshot_name.as_deref().filter(|_| !rec.skip_snapshot);
    let mut steps = Vec::new();
    if let Some(t) = &rec.new_vm {
        steps.push(stop_step(t));
    }
    if let (Some(name), true) = (snapshot, of_new_vm(rec)) {
        steps.extend(vm_snapshot_steps(vm, rec, name, true));
    }
    for d in vm.all_disks() {
        steps.push(detach_step(&d.volume_id));
    }
    if let (Some(name), false) = (snapshot, of_new_vm(rec)) {
        for (target, id) in rec.targets(vm) {
            steps.push(revert_step(rec, &target, id.as_deref(), name));
        }
    }
    for d in vm.all_disks() {
        steps.push(attach_step(vm, &d.volume_id));
    }
    let own_roots = rec
        .own_roots
        .iter()
        .filter(|id| !vm.all_disks().any(|d| d.volume_id == **id));
    steps.extend(remove_created(rec.new_vm.iter(), own_roots));
    if let (Some(name), false) = (snapshot, of_new_vm(rec)) {
        for (target, id) in rec.targets(vm) {
            steps.push(delete_snapshot_step(rec, &target, id.as_deref(), name));
        }
    }
    steps
}

/// Destroying the VMs the run created and deleting the ROOT volumes it set aside.
fn remove_created<'a>(
    vms: impl Iterator<Item = &'a String>,
    own_roots: impl Iterator<Item = &'a String>,
) -> Vec<String> {
    let mut steps: Vec<String> = vms.map(|id| destroy_step(id)).collect();
    steps.extend(own_roots.map(|id| format!("delete set-aside ROOT: cmk delete volume id={id}")));
    steps
}

/// Exactly what is left, from what the run recorded and what the cloud holds now.
fn exact_steps(vm: &VmRecord, rec: &Recorded, found: &Found) -> Vec<String> {
    let snapshot = rec.snapshot_name.as_deref().filter(|_| !rec.skip_snapshot);
    // Unknown (not looked up) counts as there: the step then says what to do if it is.
    let snapshot_there = found.snapshot != Some(false);
    let mut steps = Vec::new();
    for (id, running) in &found.vms {
        if *running {
            steps.push(stop_step(id));
        }
    }
    let on_oma = |on: &Option<String>| on.as_deref() == Some(vm.oma_vm_id.as_str());
    let move_back = |steps: &mut Vec<String>| {
        for (volume, on) in found.disks_on.iter().filter(|(_, on)| !on_oma(on)) {
            if on.is_some() {
                steps.push(detach_step(volume));
            }
            steps.push(attach_step(vm, volume));
        }
    };
    match snapshot {
        Some(name) if of_new_vm(rec) => {
            if snapshot_there {
                steps.extend(vm_snapshot_steps(vm, rec, name, rec.revert_pending));
            }
            move_back(&mut steps);
        }
        Some(name) if rec.revert_pending && snapshot_there => {
            for (volume, on) in &found.disks_on {
                if on.is_some() {
                    steps.push(detach_step(volume));
                }
            }
            for (target, id) in rec.targets(vm) {
                steps.push(revert_step(rec, &target, id.as_deref(), name));
            }
            for (volume, _) in &found.disks_on {
                steps.push(attach_step(vm, volume));
            }
        }
        _ => move_back(&mut steps),
    }
    steps.extend(remove_created(
        found.vms.iter().map(|(id, _)| id),
        found.own_roots.iter(),
    ));
    if let (Some(name), true, false) = (snapshot, snapshot_there, of_new_vm(rec)) {
        for (target, id) in rec.targets(vm) {
            steps.push(delete_snapshot_step(rec, &target, id.as_deref(), name));
        }
    }
    steps
}

#[cfg(test)]
mod tests;
