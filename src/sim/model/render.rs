//! The world's objects as CloudStack's JSON answers them.

use super::*;

impl World {
    pub fn render_vm(&self, vm_id: &str) -> Option<Value> {
        let vm = self.vms.get(vm_id)?;
        let nics: Vec<Value> = vm
            .nics
            .iter()
            .enumerate()
            .map(|(i, n)| {
                json!({
                    "id": n.id,
                    "networkid": n.network_id,
                    "networkname": self.networks.get(&n.network_id).map(|x| x.name.as_str()).unwrap_or(""),
                    "ipaddress": n.ip,
                    "macaddress": n.mac,
                    "deviceid": i.to_string(),
                    "isdefault": i == 0,
                    "traffictype": "Guest",
                    "type": "Isolated",
                    "secondaryip": [],
                    "extradhcpoption": []
                })
            })
            .collect();
        let mut v = json!({
            "id": vm.id,
            "name": vm.name,
            "displayname": vm.display_name,
            "account": "admin",
            "domain": "ROOT",
            "created": format_ms(vm.created_ms),
            "state": vm.state,
            "haenable": false,
            "zoneid": self.zone_id,
            "zonename": self.zone_name,
            "templateid": vm.template_id,
            "serviceofferingid": vm.service_offering_id,
            "cpunumber": vm.cpu,
            "cpuspeed": 1000,
            "memory": vm.memory_mb,
            "rootdeviceid": 0,
            "rootdevicetype": "ROOT",
            "hypervisor": "KVM",
            "instancename": format!("i-2-{}-VM", vm.name),
            "nic": nics,
            "securitygroup": [],
            "affinitygroup": [],
            "details": {},
            "tags": [],
            "displayvm": true,
            "isdynamicallyscalable": false
        });
        if vm.state == "Running" {
            v["hostname"] = json!("sim-kvm-host-1");
        }
        Some(v)
    }

    pub fn render_volume(&self, volume_id: &str) -> Option<Value> {
        let vol = self.volumes.get(volume_id)?;
        let mut v = json!({
            "id": vol.id,
            "name": vol.name,
            "zoneid": self.zone_id,
            "zonename": self.zone_name,
            "type": vol.volume_type,
            "provisioningtype": "thin",
            "size": vol.size,
            "created": format_ms(vol.created_ms),
            "state": vol.state,
            "account": "admin",
            "domain": "ROOT",
            "storagetype": "shared",
            "hypervisor": "KVM",
            "storage": "linstor-pool",
            "destroyed": false,
            "isextractable": false,
            "displayvolume": true,
            "path": vol.id,
            "quiescevm": false,
            "supportsstoragesnapshot": true,
            "tags": []
        });
        if let (Some(vm_id), Some(dev)) = (&vol.vm_id, vol.device_id) {
            let vm = self.vms.get(vm_id);
            v["virtualmachineid"] = json!(vm_id);
            v["vmname"] = json!(vm.map(|m| m.name.as_str()).unwrap_or(""));
            v["vmdisplayname"] = json!(vm.map(|m| m.display_name.as_str()).unwrap_or(""));
            v["vmstate"] = json!(vm.map(|m| m.state.as_str()).unwrap_or(""));
            v["vmtype"] = json!("User");
            v["deviceid"] = json!(dev);
        }
        Some(v)
    }

    pub fn render_snapshot(&self, snapshot_id: &str) -> Option<Value> {
        let s = self.snapshots.get(snapshot_id)?;
        let vol = self.volumes.get(&s.volume_id);
        Some(json!({
            "id": s.id,
            "name": s.name,
            "account": "admin",
            "domain": "ROOT",
            "snapshottype": "MANUAL",
            "volumeid": s.volume_id,
            "volumename": vol.map(|v| v.name.as_str()).unwrap_or(""),
            "volumetype": vol.map(|v| v.volume_type.as_str()).unwrap_or(""),
            "created": format_ms(s.created_ms),
            "intervaltype": "MANUAL",
            "locationtype": "PRIMARY",
            "state": s.state,
            "physicalsize": 0,
            "zoneid": self.zone_id,
            "zonename": self.zone_name,
            "revertable": true,
            "virtualsize": vol.map(|v| v.size).unwrap_or(0),
            "datastoretype": "Primary",
            "tags": []
        }))
    }

    pub fn render_vm_snapshot(&self, id: &str) -> Option<Value> {
        let s = self.vm_snapshots.get(id)?;
        Some(json!({
            "id": s.id,
            "name": s.name,
            "displayname": s.name,
            "state": s.state,
            "type": "Disk",
            "current": true,
            "virtualmachineid": s.vm_id,
            "virtualmachinename": self.vms.get(&s.vm_id).map(|v| v.name.as_str()).unwrap_or(""),
            "zoneid": self.zone_id,
            "account": "admin",
            "domain": "ROOT",
            "created": format_ms(s.created_ms),
            "tags": []
        }))
    }

    /// The `queryAsyncJobResult` body of a job.
    pub fn render_job(&self, job: &SimJob) -> Value {
        let (itype, iid) = job.op.instance();
        let mut v = json!({
            "accountid": "27ef5ba2-5fe0-11ea-9a56-1e006800018c",
            "userid": "27f2484f-5fe0-11ea-9a56-1e006800018c",
            "cmd": format!("org.apache.cloudstack.api.command.user.{}", job.command),
            "jobprocstatus": 0,
            "jobinstancetype": itype,
            "jobinstanceid": iid,
            "created": format_ms(job.created_ms),
            "jobid": job.id
        });
        match &job.state {
            JobState::Pending { .. } => {
                v["jobstatus"] = json!(0);
                v["jobresultcode"] = json!(0);
            }
            JobState::Succeeded { completed_ms, result } => {
                v["jobstatus"] = json!(1);
                v["jobresultcode"] = json!(0);
                v["jobresulttype"] = json!("object");
                v["jobresult"] = result.clone();
                v["completed"] = json!(format_ms(*completed_ms));
            }
            JobState::Failed {
                completed_ms,
                code,
                text,
            } => {
                v["jobstatus"] = json!(2);
                v["jobresultcode"] = json!(530);
                v["jobresulttype"] = json!("object");
                v["jobresult"] = json!({ "errorcode": code, "errortext": text });
                v["completed"] = json!(format_ms(*completed_ms));
            }
        }
        v
    }
}
