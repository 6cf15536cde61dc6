//! The LINSTOR controller REST API subset at `/v1/resource-definitions/{rsc}/…`.
//!
//! Replies follow LINSTOR: mutating calls answer an array of ApiCallRc objects; an unknown
//! resource definition or snapshot is HTTP 404 with an error ret_code; "already exists" and
//! "in use" are HTTP 500 with an error ret_code; an injected `error_rate` fault answers
//! HTTP 200 with an error ret_code (clients must check the bits, not only the status).
//!
//! The low bits of the ret_codes used here (`301` resource definition not found, `312`
//! snapshot not found, `411` snapshot exists, `601` in use, `999` unknown error) follow
//! LINSTOR's ranges (3xx not found, 4xx exists, 6xx in use); the exact constants of a given
//! LINSTOR release may differ.

use serde_json::{json, Value};

use super::faults::Fault;
use super::model::{Content, LinstorSnap};
use super::App;

const MASK_ERROR: u64 = 0xC000_0000_0000_0000;
const MASK_INFO: u64 = 0x4000_0000_0000_0000;
const MASK_CRT: u64 = 0x0100_0000;
const MASK_MOD: u64 = 0x0200_0000;
const MASK_DEL: u64 = 0x0300_0000;
const MASK_SNAPSHOT: u64 = 0x0034_0000;

const NOT_FOUND_RSC_DFN: u64 = 301;
const NOT_FOUND_SNAPSHOT: u64 = 312;
const EXISTS_SNAPSHOT: u64 = 411;
const IN_USE: u64 = 601;
const UNKNOWN_ERROR: u64 = 999;

fn rc(bits: u64, message: String) -> Value {
    json!({ "ret_code": bits as i64, "message": message, "obj_refs": {}, "error_report_ids": [] })
}

fn error(status: u16, code: u64, message: String) -> (u16, Value) {
    (status, json!([rc(MASK_ERROR | MASK_SNAPSHOT | code, message)]))
}

pub(crate) enum Op {
    Create { snap: String },
    Rollback { snap: String },
    Delete { snap: String },
    List,
}

impl Op {
    fn command(&self) -> &'static str {
        match self {
            Op::Create { .. } => "linstor.createSnapshot",
            Op::Rollback { .. } => "linstor.rollbackSnapshot",
            Op::Delete { .. } => "linstor.deleteSnapshot",
            Op::List => "linstor.listSnapshots",
        }
    }
}

pub(crate) async fn handle(app: &App, rsc: &str, op: Op) -> (u16, Value) {
    let command = op.command();
    faulty(app, command, |w, now, changed| apply(w, rsc, op, now, changed)).await
}

/// `POST /v1/actions/snapshot/multi`: every `(resource, snapshot)` at one instant, or none
/// (an unknown resource or an existing snapshot refuses the whole request).
pub(crate) async fn handle_multi(app: &App, entries: Vec<(String, String)>) -> (u16, Value) {
    faulty(app, "linstor.createMultiSnapshot", |w, now, changed| {
        let refused = if entries.is_empty() {
            Some(error(400, UNKNOWN_ERROR, "No snapshots requested".into()))
        } else {
            entries.iter().find_map(|(rsc, snap)| match w.linstor.get(rsc) {
                None => Some(error(
                    404,
                    NOT_FOUND_RSC_DFN,
                    format!("Resource definition '{rsc}' not found."),
                )),
                Some(rd) if rd.snapshots.contains_key(snap) => Some(error(
                    500,
                    EXISTS_SNAPSHOT,
                    format!("A snapshot with the name '{snap}' of resource '{rsc}' already exists."),
                )),
                Some(_) if snap.is_empty() => Some(error(400, UNKNOWN_ERROR, "Snapshot name must not be empty".into())),
                Some(_) => None,
            })
        };
        if let Some(r) = refused {
            return r;
        }
        let mut rcs = Vec::new();
        for (rsc, snap) in entries {
            let (_, b) = apply(w, &rsc, Op::Create { snap }, now, changed);
            rcs.extend(b.as_array().cloned().unwrap_or_default());
        }
        (201, Value::Array(rcs))
    })
    .await
}

/// Answers one controller request with `act` on the world, under the fault plan's roll for
/// `command`: an error answered without acting, a hang before acting, or a reply lost after.
async fn faulty(
    app: &App,
    command: &str,
    act: impl FnOnce(&mut super::model::World, i64, &mut bool) -> (u16, Value),
) -> (u16, Value) {
    let fault = app.roll(command, false);
    match fault {
        Some(Fault::Error) => {
            return (
                200,
                json!([rc(
                    MASK_ERROR | MASK_SNAPSHOT | UNKNOWN_ERROR,
                    "Simulated controller error".into()
                )]),
            )
        }
        Some(Fault::Hang) => tokio::time::sleep(app.hang()).await,
        _ => {}
    }
    let reply = {
        let mut w = app.lock();
        let now = App::now_ms();
        let mut changed = w.complete_due_jobs(now);
        let reply = act(&mut w, now, &mut changed);
        if changed {
            app.persist(&w);
        }
        reply
    };
    if fault == Some(Fault::LostReply) && (200..300).contains(&reply.0) {
        return error(500, UNKNOWN_ERROR, "Simulated lost reply".into());
    }
    reply
}

fn apply(w: &mut super::model::World, rsc: &str, op: Op, now: i64, changed: &mut bool) -> (u16, Value) {
    let Some(rd) = w.linstor.get(rsc).cloned() else {
        return error(
            404,
            NOT_FOUND_RSC_DFN,
            format!("Resource definition '{rsc}' not found."),
        );
    };
    let volume = w.volumes.get(&rd.volume_id).cloned();
    match op {
        Op::List => {
            let items: Vec<Value> = rd
                .snapshots
                .values()
                .map(|s| {
                    json!({
                        "name": s.name,
                        "resource_name": rd.name,
                        "nodes": ["sim-node-1"],
                        "flags": ["SUCCESSFUL"],
                        "props": {},
                        "volume_definitions": [{"volume_number": 0, "size_kib": volume.as_ref().map(|v| v.size / 1024).unwrap_or(0)}],
                    })
                })
                .collect();
            (200, Value::Array(items))
        }
        Op::Create { snap } => {
            if snap.is_empty() {
                return error(400, UNKNOWN_ERROR, "Snapshot name must not be empty".into());
            }
            if rd.snapshots.contains_key(&snap) {
                return error(
                    500,
                    EXISTS_SNAPSHOT,
                    format!("A snapshot with the name '{snap}' of resource '{rsc}' already exists."),
                );
            }
            let content = volume.map(|v| v.content).unwrap_or(Content::default());
            if let Some(rd) = w.linstor.get_mut(rsc) {
                rd.snapshots.insert(
                    snap.clone(),
                    LinstorSnap {
                        name: snap.clone(),
                        content,
                        created_ms: now,
                    },
                );
            }
            *w.created.entry(format!("linstor:{rsc}/{snap}")).or_insert(0) += 1;
            *changed = true;
            (
                201,
                json!([
                    rc(
                        MASK_INFO | MASK_CRT | MASK_SNAPSHOT | 1,
                        format!("New snapshot '{snap}' of resource '{rsc}' registered.")
                    ),
                    rc(
                        MASK_INFO | MASK_CRT | MASK_SNAPSHOT | 1,
                        format!("Snapshot '{snap}' of resource '{rsc}' successfully taken.")
                    )
                ]),
            )
        }
        Op::Rollback { snap } => {
            let Some(s) = rd.snapshots.get(&snap) else {
                return error(
                    404,
                    NOT_FOUND_SNAPSHOT,
                    format!("Snapshot '{snap}' of resource '{rsc}' not found."),
                );
            };
            if let Some(vm_id) = volume.as_ref().and_then(|v| v.vm_id.as_ref()) {
                if w.vms.get(vm_id).is_some_and(|vm| vm.state == "Running") {
                    return error(
                        500,
                        IN_USE,
                        format!("Resource '{rsc}' is in use (attached to running VM {vm_id}); cannot roll back."),
                    );
                }
            }
            if let Some(v) = w.volumes.get_mut(&rd.volume_id) {
                v.content = s.content;
            }
            *changed = true;
            (
                200,
                json!([rc(
                    MASK_INFO | MASK_MOD | MASK_SNAPSHOT | 3,
                    format!("Resource '{rsc}' rolled back to snapshot '{snap}'.")
                )]),
            )
        }
        Op::Delete { snap } => {
            if !rd.snapshots.contains_key(&snap) {
                return error(
                    404,
                    NOT_FOUND_SNAPSHOT,
                    format!("Snapshot '{snap}' of resource '{rsc}' not found."),
                );
            }
            if let Some(rd) = w.linstor.get_mut(rsc) {
                rd.snapshots.remove(&snap);
            }
            *changed = true;
            (
                200,
                json!([rc(
                    MASK_INFO | MASK_DEL | MASK_SNAPSHOT | 2,
                    format!("Snapshot '{snap}' of resource '{rsc}' deleted.")
                )]),
            )
        }
    }
}
