//! The async commands: queued as jobs, completed when due, applied to the world with CloudStack's rules.

use super::*;

impl World {
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
                    let key = format!("snapshot:{}/{}", s.volume_id, s.name);
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
                    let key = format!("vm_snapshot:{}/{}", s.vm_id, s.name);
                    *self.created.entry(key).or_insert(0) += 1;
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
        self.refuse_with_vm_snapshots(vm_id, "attach")?;
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

    /// CloudStack moves no volume onto or off a VM that has VM snapshots (its
    /// VolumeApiServiceImpl, with the same message).
    fn refuse_with_vm_snapshots(&self, vm_id: &str, verb: &str) -> Result<(), CsError> {
        if self.vm_snapshots.values().any(|s| s.vm_id == vm_id) {
            return Err(CsError::param(format!(
                "Unable to {verb} volume, please specify a VM that does not have VM snapshots"
            )));
        }
        Ok(())
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
        self.refuse_with_vm_snapshots(&vm_id, "detach")?;
        if let Some(v) = self.volumes.get_mut(volume_id) {
            v.vm_id = None;
            v.device_id = None;
            v.volume_type = "DATADISK".into();
        }
        Ok(json!({ "volume": self.render_volume(volume_id) }))
    }
}
