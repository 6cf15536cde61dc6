//! The CloudStack API at `/client/api`: signature check, faults, and the commands.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde_json::{json, Value};

use super::faults::Fault;
use super::model::{CsError, JobOp, SimNic, SimSnapshot, SimVm, SimVmSnapshot, World};
use super::App;
use crate::providers::cloudstack::sign;

const ASYNC: &[&str] = &[
    "deployVirtualMachine",
    "startVirtualMachine",
    "stopVirtualMachine",
    "destroyVirtualMachine",
    "attachVolume",
    "detachVolume",
    "createSnapshot",
    "revertSnapshot",
    "deleteSnapshot",
    "createVMSnapshot",
    "revertToVMSnapshot",
    "deleteVMSnapshot",
];

const SYNC: &[&str] = &[
    "queryAsyncJobResult",
    "listVirtualMachines",
    "listVolumes",
    "listSnapshots",
    "listVMSnapshot",
    "listZones",
    "listNetworks",
    "listServiceOfferings",
    "deleteVolume",
];

const AUTH_TEXT: &str = "unable to verify user credentials and/or request signature";

/// Handles one API request; returns the HTTP status and the JSON body.
pub(crate) async fn handle(app: &App, params: Vec<(String, String)>) -> (u16, Value) {
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let command = get("command").unwrap_or("").to_string();
    let known = ASYNC.contains(&command.as_str()) || SYNC.contains(&command.as_str());
    let key = if known {
        format!("{}response", command.to_lowercase())
    } else {
        "errorresponse".to_string()
    };
    let unauthorized = || {
        (
            401,
            json!({ key.as_str(): { "uuidList": [], "errorcode": 401, "errortext": AUTH_TEXT } }),
        )
    };
    if !authenticated(app, &params) || !known {
        return unauthorized();
    }

    let is_async = ASYNC.contains(&command.as_str());
    let fault = app.roll(&command, is_async);
    match fault {
        Some(Fault::Error) => return error_reply(&key, &CsError::internal("Simulated internal error")),
        Some(Fault::Hang) => {
            // Held up on the way: the server sees the request only now, and checks its
            // `expires` then, as CloudStack does when a request reaches it.
            tokio::time::sleep(app.hang()).await;
            if !authenticated(app, &params) {
                return unauthorized();
            }
        }
        _ => {}
    }

    let args: BTreeMap<&str, &str> = params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let outcome = {
        let mut world = app.lock();
        let now = App::now_ms();
        let mut changed = world.complete_due_jobs(now);
        let job_fails = fault == Some(Fault::JobFailure);
        let outcome = dispatch(
            &mut world,
            &command,
            &args,
            now,
            app.latency_ms(),
            job_fails,
            &mut changed,
        );
        if changed {
            app.persist(&world);
        }
        outcome
    };
    match (outcome, fault) {
        (Ok(_), Some(Fault::LostReply)) => error_reply(&key, &CsError::internal("Simulated lost reply")),
        (Ok(body), _) => (200, json!({ key: body })),
        (Err(e), _) => error_reply(&key, &e),
    }
}

fn error_reply(key: &str, e: &CsError) -> (u16, Value) {
    let cserrorcode = if e.code == 431 { 4350 } else { 4250 };
    (
        e.code,
        json!({ key: { "uuidList": [], "errorcode": e.code, "cserrorcode": cserrorcode, "errortext": e.text } }),
    )
}

fn authenticated(app: &App, params: &[(String, String)]) -> bool {
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    if get("apiKey") != Some(app.config.api_key.as_str()) {
        return false;
    }
    let Some(given) = get("signature") else {
        return false;
    };
    if get("signatureVersion") == Some("3") {
        match get("expires").and_then(sign::parse_expires) {
            Some(t) if t > SystemTime::now() => {}
            _ => return false,
        }
    }
    let expected = sign::signature(params, &app.config.secret_key);
    sign::signatures_match(&expected, given)
}

fn required<'a>(args: &BTreeMap<&str, &'a str>, command: &str, name: &str) -> Result<&'a str, CsError> {
    args.get(name).copied().filter(|v| !v.is_empty()).ok_or_else(|| {
        CsError::param(format!(
            "Unable to execute API command {} due to missing parameter {name}",
            command.to_lowercase()
        ))
    })
}

fn invalid(command: &str, name: &str, value: &str) -> CsError {
    CsError::param(format!(
        "Unable to execute API command {} due to invalid value. Invalid parameter {name} value={value} due to incorrect long value format, or entity does not exist or due to incorrect parameter annotation for the field in api cmd class.",
        command.to_lowercase()
    ))
}

/// A uuid filter of a list command must name an entity that exists or existed (CloudStack
/// translates uuids before running the command); otherwise 431.
fn known_ref(
    w: &World,
    command: &str,
    args: &BTreeMap<&str, &str>,
    name: &str,
    exists: impl Fn(&World, &str) -> bool,
) -> Result<(), CsError> {
    match args.get(name) {
        Some(id) if !exists(w, id) && !w.removed.contains(*id) => Err(invalid(command, name, id)),
        _ => Ok(()),
    }
}

fn flag(args: &BTreeMap<&str, &str>, name: &str, default: bool) -> bool {
    args.get(name)
        .map(|v| v.eq_ignore_ascii_case("true"))
        .unwrap_or(default)
}

fn list_body(object: &str, items: Vec<Value>) -> Value {
    if items.is_empty() {
        json!({})
    } else {
        json!({ "count": items.len(), object: items })
    }
}

fn matches_opt(filter: Option<&&str>, value: &str) -> bool {
    filter.is_none_or(|f| *f == value)
}

fn contains_opt(filter: Option<&&str>, value: &str) -> bool {
    filter.is_none_or(|f| value.contains(*f))
}

/// CloudStack's `keyword`: a case-insensitive part of the name (or display name).
fn keyword(args: &BTreeMap<&str, &str>, names: &[&str]) -> bool {
    args.get("keyword").is_none_or(|k| {
        let k = k.to_lowercase();
        names.iter().any(|n| n.to_lowercase().contains(&k))
    })
}

#[allow(clippy::too_many_arguments)]
fn dispatch(
    w: &mut World,
    command: &str,
    args: &BTreeMap<&str, &str>,
    now: i64,
    latency_ms: i64,
    job_fails: bool,
    changed: &mut bool,
) -> Result<Value, CsError> {
    let mut job = |w: &mut World, op: JobOp, id: Option<String>| {
        *changed = true;
        let job_id = w.new_job(command, op, now, latency_ms, job_fails);
        match id {
            Some(id) => json!({ "id": id, "jobid": job_id }),
            None => json!({ "jobid": job_id }),
        }
    };
    let vm_arg = |w: &World, name: &str| -> Result<String, CsError> {
        let id = required(args, command, name)?;
        if w.vms.contains_key(id) {
            Ok(id.to_string())
        } else {
            Err(invalid(command, name, id))
        }
    };
    let volume_arg = |w: &World, name: &str| -> Result<String, CsError> {
        let id = required(args, command, name)?;
        if w.volumes.contains_key(id) {
            Ok(id.to_string())
        } else {
            Err(invalid(command, name, id))
        }
    };
    match command {
        "deployVirtualMachine" => {
            let offering = required(args, command, "serviceofferingid")?;
            let template = required(args, command, "templateid")?;
            let zone = required(args, command, "zoneid")?;
            let fixed = w.fixed_offerings.get(offering).cloned();
            if offering != w.service_offering_id && fixed.is_none() {
                return Err(invalid(command, "serviceofferingid", offering));
            }
            if template != w.template_id {
                return Err(invalid(command, "templateid", template));
            }
            if zone != w.zone_id {
                return Err(invalid(command, "zoneid", zone));
            }
            let vm_id = uuid::Uuid::new_v4().to_string();
            let name = args
                .get("name")
                .map(|s| s.to_string())
                .unwrap_or_else(|| format!("VM-{vm_id}"));
            if w.vms.values().any(|v| v.name == name) {
                return Err(CsError::param(format!(
                    "The vm with hostName {name} already exists in the network domain: cs2cloud.internal; network=default"
                )));
            }
            let nics = requested_nics(w, command, args)?;
            // The sample offering is a custom (constrained) one: the deploy names the size.
            let size = |name: &str| args.get(name).and_then(|v| v.parse::<u32>().ok()).filter(|v| *v > 0);
            let (cpu, memory_mb) = match &fixed {
                // A fixed offering has its own size.
                Some(o) => (o.cpu, u32::try_from(o.memory_mb).unwrap_or(u32::MAX)),
                None => match (size("details[0].cpuNumber"), size("details[0].memory")) {
                    (Some(cpu), Some(memory_mb)) => (cpu, memory_mb),
                    _ => {
                        return Err(CsError::param(
                            "Need to specify custom parameter values cpu and memory when using custom offering",
                        ))
                    }
                },
            };
            let start = flag(args, "startvm", true);
            let vm = SimVm {
                id: vm_id.clone(),
                display_name: args
                    .get("displayname")
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| name.clone()),
                name,
                state: if start { "Starting" } else { "Stopped" }.into(),
                service_offering_id: offering.into(),
                template_id: template.into(),
                nics,
                cpu,
                memory_mb: u64::from(memory_mb),
                created_ms: now,
            };
            w.vms.insert(vm_id.clone(), vm);
            w.add_root_volume_for(&vm_id, now);
            Ok(job(
                w,
                JobOp::Deploy {
                    vm_id: vm_id.clone(),
                    start,
                },
                Some(vm_id),
            ))
        }
        "startVirtualMachine" => {
            let vm_id = vm_arg(w, "id")?;
            Ok(job(w, JobOp::Start { vm_id }, None))
        }
        "stopVirtualMachine" => {
            let vm_id = vm_arg(w, "id")?;
            Ok(job(w, JobOp::Stop { vm_id }, None))
        }
        "destroyVirtualMachine" => {
            let vm_id = vm_arg(w, "id")?;
            let expunge = flag(args, "expunge", false);
            Ok(job(w, JobOp::Destroy { vm_id, expunge }, None))
        }
        "attachVolume" => {
            // Missing parameters are reported before unknown ids, as CloudStack's
            // parameter processing does.
            required(args, command, "id")?;
            required(args, command, "virtualmachineid")?;
            let volume_id = volume_arg(w, "id")?;
            let vm_id = vm_arg(w, "virtualmachineid")?;
            let device_id = match args.get("deviceid") {
                Some(d) => Some(d.parse::<u32>().map_err(|_| invalid(command, "deviceid", d))?),
                None => None,
            };
            Ok(job(
                w,
                JobOp::Attach {
                    volume_id,
                    vm_id,
                    device_id,
                },
                None,
            ))
        }
        "detachVolume" => {
            if !args.contains_key("id") {
                return Err(CsError::param(
                    "Please provide either a volume id, or a tuple(device id, instance id)",
                ));
            }
            let volume_id = volume_arg(w, "id")?;
            Ok(job(w, JobOp::Detach { volume_id }, None))
        }
        "createSnapshot" => {
            let volume_id = volume_arg(w, "volumeid")?;
            let id = uuid::Uuid::new_v4().to_string();
            let name = args.get("name").map(|s| s.to_string()).unwrap_or_else(|| {
                let vol = w.volumes.get(&volume_id).map(|v| v.name.as_str()).unwrap_or("volume");
                format!("{vol}_{now}")
            });
            w.snapshots.insert(
                id.clone(),
                SimSnapshot {
                    id: id.clone(),
                    name,
                    volume_id,
                    state: "Creating".into(),
                    content: Default::default(),
                    created_ms: now,
                },
            );
            Ok(job(
                w,
                JobOp::CreateSnapshot {
                    snapshot_id: id.clone(),
                },
                Some(id),
            ))
        }
        "revertSnapshot" | "deleteSnapshot" => {
            let id = required(args, command, "id")?;
            if !w.snapshots.contains_key(id) {
                return Err(invalid(command, "id", id));
            }
            let snapshot_id = id.to_string();
            let op = if command == "revertSnapshot" {
                JobOp::RevertSnapshot { snapshot_id }
            } else {
                JobOp::DeleteSnapshot { snapshot_id }
            };
            Ok(job(w, op, None))
        }
        "createVMSnapshot" => {
            let vm_id = vm_arg(w, "virtualmachineid")?;
            if flag(args, "snapshotmemory", false) {
                return Err(CsError::param("The simulator only takes disk-only VM snapshots"));
            }
            let id = uuid::Uuid::new_v4().to_string();
            let name = args
                .get("name")
                .map(|s| s.to_string())
                .unwrap_or_else(|| format!("i-2-{vm_id}-VM_VS_{now}"));
            w.vm_snapshots.insert(
                id.clone(),
                SimVmSnapshot {
                    id: id.clone(),
                    name,
                    vm_id,
                    state: "Allocated".into(),
                    contents: BTreeMap::new(),
                    created_ms: now,
                },
            );
            Ok(job(
                w,
                JobOp::CreateVmSnapshot {
                    vm_snapshot_id: id.clone(),
                },
                Some(id),
            ))
        }
        "revertToVMSnapshot" | "deleteVMSnapshot" => {
            let id = required(args, command, "vmsnapshotid")?;
            if !w.vm_snapshots.contains_key(id) {
                return Err(invalid(command, "vmsnapshotid", id));
            }
            let vm_snapshot_id = id.to_string();
            let op = if command == "revertToVMSnapshot" {
                JobOp::RevertVmSnapshot { vm_snapshot_id }
            } else {
                JobOp::DeleteVmSnapshot { vm_snapshot_id }
            };
            Ok(job(w, op, None))
        }
        "queryAsyncJobResult" => {
            let id = required(args, command, "jobid")?;
            match w.jobs.get(id) {
                Some(j) => Ok(w.render_job(j)),
                None => Err(invalid(command, "jobid", id)),
            }
        }
        "deleteVolume" => {
            let id = volume_arg(w, "id")?;
            if w.volumes.get(&id).is_some_and(|v| v.vm_id.is_some()) {
                return Err(CsError::param(
                    "Please specify a volume that is not attached to any VM.",
                ));
            }
            w.remove_volume(&id);
            *changed = true;
            Ok(json!({ "success": true }))
        }
        "listVirtualMachines" => {
            known_ref(w, command, args, "id", |w, id| w.vms.contains_key(id))?;
            let items = w
                .vms
                .values()
                .filter(|v| matches_opt(args.get("id"), &v.id))
                .filter(|v| contains_opt(args.get("name"), &v.name))
                .filter(|v| keyword(args, &[&v.name, &v.display_name]))
                .filter(|v| matches_opt(args.get("state"), &v.state))
                .filter_map(|v| w.render_vm(&v.id))
                .collect();
            Ok(list_body("virtualmachine", items))
        }
        "listVolumes" => {
            known_ref(w, command, args, "id", |w, id| w.volumes.contains_key(id))?;
            known_ref(w, command, args, "virtualmachineid", |w, id| w.vms.contains_key(id))?;
            let items = w
                .volumes
                .values()
                .filter(|v| matches_opt(args.get("id"), &v.id))
                .filter(|v| match args.get("virtualmachineid") {
                    Some(vm) => v.vm_id.as_deref() == Some(*vm),
                    None => true,
                })
                .filter(|v| matches_opt(args.get("type"), &v.volume_type))
                .filter(|v| contains_opt(args.get("name"), &v.name))
                .filter(|v| keyword(args, &[&v.name]))
                .filter_map(|v| w.render_volume(&v.id))
                .collect();
            Ok(list_body("volume", items))
        }
        "listSnapshots" => {
            known_ref(w, command, args, "id", |w, id| w.snapshots.contains_key(id))?;
            known_ref(w, command, args, "volumeid", |w, id| w.volumes.contains_key(id))?;
            let items = w
                .snapshots
                .values()
                .filter(|s| matches_opt(args.get("id"), &s.id))
                .filter(|s| matches_opt(args.get("volumeid"), &s.volume_id))
                .filter(|s| contains_opt(args.get("name"), &s.name))
                .filter(|s| keyword(args, &[&s.name]))
                .filter_map(|s| w.render_snapshot(&s.id))
                .collect();
            Ok(list_body("snapshot", items))
        }
        "listVMSnapshot" => {
            known_ref(w, command, args, "vmsnapshotid", |w, id| {
                w.vm_snapshots.contains_key(id)
            })?;
            known_ref(w, command, args, "virtualmachineid", |w, id| w.vms.contains_key(id))?;
            let items = w
                .vm_snapshots
                .values()
                .filter(|s| matches_opt(args.get("vmsnapshotid"), &s.id))
                .filter(|s| matches_opt(args.get("virtualmachineid"), &s.vm_id))
                .filter(|s| contains_opt(args.get("name"), &s.name))
                .filter(|s| keyword(args, &[&s.name]))
                .filter_map(|s| w.render_vm_snapshot(&s.id))
                .collect();
            Ok(list_body("vmSnapshot", items))
        }
        "listZones" => Ok(list_body(
            "zone",
            vec![
                json!({ "id": w.zone_id, "name": w.zone_name, "networktype": "Advanced", "allocationstate": "Enabled" }),
            ],
        )),
        "listServiceOfferings" => {
            known_ref(w, command, args, "id", |w, id| {
                *id == w.service_offering_id || w.fixed_offerings.contains_key(id)
            })?;
            let custom = json!({ "id": w.service_offering_id, "name": "Custom (constrained)", "iscustomized": true, "cpuspeed": 1000, "offerha": false });
            let fixed = w.fixed_offerings.values().map(|o| {
                json!({ "id": o.id, "name": o.name, "iscustomized": false, "cpunumber": o.cpu, "cpuspeed": 1000, "memory": o.memory_mb, "offerha": false })
            });
            let items = std::iter::once(custom)
                .chain(fixed)
                .filter(|o| matches_opt(args.get("id"), o["id"].as_str().unwrap_or_default()))
                .filter(|o| keyword(args, &[o["name"].as_str().unwrap_or_default()]))
                .collect();
            Ok(list_body("serviceoffering", items))
        }
        "listNetworks" => {
            known_ref(w, command, args, "id", |w, id| w.networks.contains_key(id))?;
            let items = w
                .networks
                .values()
                .filter(|n| matches_opt(args.get("id"), &n.id))
                .filter(|n| keyword(args, &[&n.name]))
                .map(|n| {
                    let mut v = json!({ "id": n.id, "name": n.name, "displaytext": n.name, "zoneid": w.zone_id, "state": "Implemented", "traffictype": "Guest", "type": "Isolated" });
                    if let Some(net) = n.cidr.as_deref().and_then(|c| c.parse::<ipnet::Ipv4Net>().ok()) {
                        v["cidr"] = json!(net.to_string());
                        v["netmask"] = json!(net.netmask().to_string());
                        v["gateway"] = json!(net.hosts().next().map(|g| g.to_string()));
                    }
                    v
                })
                .collect();
            Ok(list_body("network", items))
        }
        _ => Err(CsError {
            code: 401,
            text: AUTH_TEXT.into(),
        }),
    }
}

/// The NICs a deploy asks for, as CloudStack reads them: `iptonetworklist[n].networkid/ip/mac`
/// (one NIC per network: a network named again keeps its first place and takes the later
/// entry's values) or `networkids` (a network may come twice); never both. A requested IP
/// must be a free address of the network's CIDR, a MAC a free unicast address.
fn requested_nics(w: &World, command: &str, args: &BTreeMap<&str, &str>) -> Result<Vec<SimNic>, CsError> {
    let mut listed: BTreeMap<usize, BTreeMap<&str, &str>> = BTreeMap::new();
    for (k, v) in args {
        let Some(rest) = k.strip_prefix("iptonetworklist[") else {
            continue;
        };
        let Some((n, field)) = rest.split_once("].") else {
            continue;
        };
        let Ok(n) = n.parse::<usize>() else { continue };
        listed.entry(n).or_default().insert(field, v);
    }
    let mut wanted: Vec<(String, Option<String>, Option<String>)> = Vec::new();
    if listed.is_empty() {
        for net in args
            .get("networkids")
            .map(|s| s.split(',').filter(|n| !n.is_empty()))
            .into_iter()
            .flatten()
        {
            wanted.push((net.to_string(), None, None));
        }
    } else {
        if args.contains_key("networkids") || args.contains_key("ipaddress") {
            return Err(CsError::param(
                "ipToNetworkMap can't be specified along with networkIds or ipAddress",
            ));
        }
        for fields in listed.values() {
            let Some(net) = fields.get("networkid") else { continue };
            let entry = (
                net.to_string(),
                fields.get("ip").map(|s| s.to_string()),
                fields.get("mac").map(|s| s.to_string()),
            );
            match wanted.iter_mut().find(|(n, _, _)| n == net) {
                Some(known) => *known = entry,
                None => wanted.push(entry),
            }
        }
    }
    let mut nics: Vec<SimNic> = Vec::new();
    for (i, (net, ip, mac)) in wanted.into_iter().enumerate() {
        let Some(network) = w.networks.get(&net) else {
            return Err(invalid(command, "networkids", &net));
        };
        let in_use = |addr: &str| {
            w.vms
                .values()
                .flat_map(|v| &v.nics)
                .chain(&nics)
                .any(|n| n.network_id == net && (n.ip == addr || n.mac == addr))
        };
        let cidr = network.cidr.as_deref().and_then(|c| c.parse::<ipnet::Ipv4Net>().ok());
        let ip = match ip {
            Some(ip) => {
                let addr: std::net::Ipv4Addr = ip
                    .parse()
                    .map_err(|_| CsError::param(format!("Invalid specified IPv4 address {ip}")))?;
                let usable = cidr.is_none_or(|c| c.contains(&addr) && addr != c.network() && addr != c.broadcast());
                if !usable || in_use(&ip) {
                    return Err(CsError::internal(format!(
                        "Unable to acquire Guest IP address for network Ntwk[{}|Guest|{}]",
                        network.id, network.name
                    )));
                }
                ip
            }
            None => match cidr {
                Some(c) => c
                    .hosts()
                    .skip(9)
                    .map(|a| a.to_string())
                    .find(|a| !in_use(a))
                    .ok_or_else(|| CsError::internal("Insufficient address capacity"))?,
                None => format!("10.1.{}.{}", i + 1, 10 + w.vms.len()),
            },
        };
        let mac = match mac {
            Some(mac) => {
                let octets: Vec<u8> = mac.split(':').filter_map(|o| u8::from_str_radix(o, 16).ok()).collect();
                if octets.len() != 6 || mac.len() != 17 {
                    return Err(CsError::param(format!("Mac address is not valid: {mac}")));
                }
                if octets[0] & 1 == 1 {
                    return Err(CsError::param(format!("Mac address is not unicast: {mac}")));
                }
                if in_use(&mac) {
                    return Err(CsError::param(format!(
                        "The requested Mac address is already taken! {mac}"
                    )));
                }
                mac
            }
            None => {
                let b = uuid::Uuid::new_v4().into_bytes();
                format!("02:00:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
            }
        };
        nics.push(SimNic {
            id: uuid::Uuid::new_v4().to_string(),
            network_id: net,
            ip,
            mac,
        });
    }
    Ok(nics)
}
