//! `/api/v1/vms/*` (the inventory and each readiness check on its own) and
//! `/api/v1/network-mappings` (create, read, replace, delete, list all).

use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::envelope::{Body, Envelope, ErrorBody, Path, Query, Reply, RestError};
use super::failover::{readiness_of, ReadinessQuery, ReadinessReply};
use super::views::{CheckView, JobView, Page, ValidationResult};
use super::{Caller, Rest};
use crate::api::pb;

pub(super) fn routes() -> OpenApiRouter<Rest> {
    OpenApiRouter::new()
        .routes(routes!(list_vms))
        .routes(routes!(get_vm))
        .routes(routes!(failover_readiness))
        .routes(routes!(sync_status))
        .routes(routes!(network_mapping_status))
        .routes(routes!(volume_status))
        .routes(routes!(active_jobs))
        .routes(routes!(configuration_check))
        .routes(routes!(create_mapping, list_mappings))
        .routes(routes!(get_mappings, replace_mappings, delete_mappings))
}

/// A NIC of the source VM.
#[derive(Serialize, utoipa::ToSchema)]
pub struct NicView {
    pub source_network: String,
    pub mac: String,
    pub ip_address: String,
}

/// A replicated disk: the CloudStack volume it is replicated into.
#[derive(Serialize, utoipa::ToSchema)]
pub struct DiskView {
    pub volume_id: String,
    /// The source disk's size in bytes (0: not reported).
    pub size_bytes: u64,
    /// The disk the VM boots from (its root disk after failover).
    pub boot: bool,
    pub unit_number: u32,
}

/// A VM of the inventory.
#[derive(Serialize, utoipa::ToSchema)]
pub struct VmView {
    pub vm_id: String,
    pub vm_name: String,
    pub cpu_count: u32,
    pub memory_mb: u32,
    /// windows, linux or other.
    pub os_type: String,
    pub nics: Vec<NicView>,
    /// The boot disk first.
    pub disks: Vec<DiskView>,
    /// The boot disk's volume.
    pub volume_id: String,
    /// The appliance VM the disks are attached to between failovers.
    pub oma_vm_id: String,
    pub last_sync_change_id: String,
}

impl From<pb::Vm> for VmView {
    fn from(v: pb::Vm) -> VmView {
        VmView {
            nics: v
                .nics
                .into_iter()
                .map(|n| NicView {
                    source_network: n.source_network,
                    mac: n.mac,
                    ip_address: n.ip_address,
                })
                .collect(),
            disks: v
                .disks
                .into_iter()
                .map(|d| DiskView {
                    volume_id: d.volume_id,
                    size_bytes: d.size_bytes,
                    boot: d.boot,
                    unit_number: d.unit_number,
                })
                .collect(),
            vm_id: v.vm_id,
            vm_name: v.name,
            cpu_count: v.cpu_count,
            memory_mb: v.memory_mb,
            os_type: v.os_type,
            volume_id: v.volume_id,
            oma_vm_id: v.oma_vm_id,
            last_sync_change_id: v.last_sync_change_id,
        }
    }
}

/// A page query.
#[derive(Deserialize, Default, utoipa::IntoParams)]
#[serde(default, deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// At most 100; 0 or absent: 20.
    pub page_size: u32,
    /// The previous page's next_page_token.
    pub page_token: String,
}

/// The VM inventory by vm_id, a page at a time.
#[utoipa::path(get, path = "/api/v1/vms", tag = "vms", params(PageQuery),
    responses((status = 200, body = inline(Page<VmView>)), (status = 400, description = "INVALID_ARGUMENT", body = ErrorBody)))]
async fn list_vms(
    State(rest): State<Rest>,
    caller: Caller,
    Query(q): Query<PageQuery>,
) -> Result<Reply<Page<VmView>>, RestError> {
    let msg = pb::ListVmsRequest {
        page_size: q.page_size,
        page_token: q.page_token,
    };
    let response = rest.failover().list_vms(caller.request(msg)).await?;
    let meta = response.metadata().clone();
    let page = response.into_inner();
    let data = page.vms.into_iter().map(VmView::from).collect();
    Ok(Reply::of(Page::new(data, page.next_page_token), &meta))
}

async fn vm(rest: &Rest, caller: &Caller, vm_id: String) -> Result<(VmView, tonic::metadata::MetadataMap), RestError> {
    let response = rest
        .failover()
        .get_vm(caller.request(pb::GetVmRequest { vm_id }))
        .await?;
    let meta = response.metadata().clone();
    Ok((VmView::from(response.into_inner()), meta))
}

/// One VM of the inventory.
#[utoipa::path(get, path = "/api/v1/vms/{vm_id}", tag = "vms",
    params(("vm_id" = String, Path, description = "The VMware VM UUID")),
    responses((status = 200, body = inline(Envelope<VmView>)), (status = 404, description = "VM_NOT_FOUND", body = ErrorBody)))]
async fn get_vm(
    State(rest): State<Rest>,
    caller: Caller,
    Path(vm_id): Path<String>,
) -> Result<Reply<Envelope<VmView>>, RestError> {
    let (view, meta) = vm(&rest, &caller, vm_id).await?;
    Ok(Reply::of(Envelope::new("Retrieved VM", view), &meta))
}

/// Every readiness check of a VM.
#[utoipa::path(get, path = "/api/v1/vms/{vm_id}/failover-readiness", tag = "vms",
    params(("vm_id" = String, Path, description = "The VMware VM UUID"), ReadinessQuery),
    responses((status = 200, body = ReadinessReply), (status = 404, description = "VM_NOT_FOUND", body = ErrorBody)))]
async fn failover_readiness(
    State(rest): State<Rest>,
    caller: Caller,
    Path(vm_id): Path<String>,
    Query(q): Query<ReadinessQuery>,
) -> Result<Reply<ReadinessReply>, RestError> {
    readiness_of(&rest, &caller, vm_id, q.job_type).await
}

/// One readiness check, with what the inventory says about it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct CheckReply<T> {
    pub success: bool,
    pub message: String,
    pub vm_id: String,
    /// Whether the check passed.
    pub is_valid: bool,
    pub check: CheckView,
    pub data: T,
}

/// The named check of the VM's readiness report.
async fn check(
    rest: &Rest,
    caller: &Caller,
    vm_id: &str,
    job_type: String,
    name: &str,
) -> Result<(CheckView, tonic::metadata::MetadataMap), RestError> {
    let report = readiness_of(rest, caller, vm_id.to_string(), job_type).await?;
    let check = report
        .body
        .validation_result
        .checks
        .into_iter()
        .find(|c| c.check_name == name)
        .ok_or_else(|| RestError::not_found("CHECK_NOT_FOUND", &format!("the readiness report has no {name} check")))?;
    let mut meta = tonic::metadata::MetadataMap::new();
    if let Some(id) = report.correlation_id.and_then(|c| c.parse().ok()) {
        meta.insert(crate::api::CORRELATION_HEADER, id);
    }
    Ok((check, meta))
}

fn check_reply<T>(
    vm_id: String,
    check: CheckView,
    data: T,
    meta: &tonic::metadata::MetadataMap,
) -> Reply<CheckReply<T>> {
    Reply::of(
        CheckReply {
            success: true,
            message: check.message.clone(),
            is_valid: check.status == "pass",
            vm_id,
            check,
            data,
        },
        meta,
    )
}

/// What replication last synced.
#[derive(Serialize, utoipa::ToSchema)]
pub struct SyncData {
    /// The change id of the last successful sync (empty: never synced).
    pub last_sync_change_id: String,
}

/// The VM's sync status: the Sync Status check.
#[utoipa::path(get, path = "/api/v1/vms/{vm_id}/sync-status", tag = "vms",
    params(("vm_id" = String, Path, description = "The VMware VM UUID")),
    responses((status = 200, body = inline(CheckReply<SyncData>)), (status = 404, description = "VM_NOT_FOUND", body = ErrorBody)))]
async fn sync_status(
    State(rest): State<Rest>,
    caller: Caller,
    Path(vm_id): Path<String>,
) -> Result<Reply<CheckReply<SyncData>>, RestError> {
    let (check, meta) = check(&rest, &caller, &vm_id, String::new(), "Sync Status").await?;
    let (view, _) = vm(&rest, &caller, vm_id.clone()).await?;
    let data = SyncData {
        last_sync_change_id: view.last_sync_change_id,
    };
    Ok(check_reply(vm_id, check, data, &meta))
}

/// A VM's network mappings, and the check on them.
#[derive(Serialize, utoipa::ToSchema)]
pub struct MappingStatusData {
    pub mappings: Vec<MappingView>,
}

/// Whether every source network is mapped: the Network Mappings check, and the mappings.
#[utoipa::path(get, path = "/api/v1/vms/{vm_id}/network-mapping-status", tag = "vms",
    params(("vm_id" = String, Path, description = "The VMware VM UUID"), ReadinessQuery),
    responses((status = 200, body = inline(CheckReply<MappingStatusData>)), (status = 404, description = "VM_NOT_FOUND", body = ErrorBody)))]
async fn network_mapping_status(
    State(rest): State<Rest>,
    caller: Caller,
    Path(vm_id): Path<String>,
    Query(q): Query<ReadinessQuery>,
) -> Result<Reply<CheckReply<MappingStatusData>>, RestError> {
    let (check, meta) = check(&rest, &caller, &vm_id, q.job_type, "Network Mappings").await?;
    let mappings = mappings_of(&rest, &caller, &vm_id).await?;
    Ok(check_reply(vm_id, check, MappingStatusData { mappings }, &meta))
}

/// A VM's disks, and the check on their volumes.
#[derive(Serialize, utoipa::ToSchema)]
pub struct VolumeData {
    /// The boot disk's volume.
    pub volume_id: String,
    pub disks: Vec<DiskView>,
}

/// Whether every disk's volume is where a failover expects it: the Volume State check.
#[utoipa::path(get, path = "/api/v1/vms/{vm_id}/volume-status", tag = "vms",
    params(("vm_id" = String, Path, description = "The VMware VM UUID")),
    responses((status = 200, body = inline(CheckReply<VolumeData>)), (status = 404, description = "VM_NOT_FOUND", body = ErrorBody)))]
async fn volume_status(
    State(rest): State<Rest>,
    caller: Caller,
    Path(vm_id): Path<String>,
) -> Result<Reply<CheckReply<VolumeData>>, RestError> {
    let (check, meta) = check(&rest, &caller, &vm_id, String::new(), "Volume State").await?;
    let (view, _) = vm(&rest, &caller, vm_id.clone()).await?;
    let data = VolumeData {
        volume_id: view.volume_id,
        disks: view.disks,
    };
    Ok(check_reply(vm_id, check, data, &meta))
}

/// The statuses of jobs that are over (a needs_operator job still holds its VM).
const FINISHED: [&str; 4] = ["completed", "failed", "cancelled", "resolved"];

/// A VM's jobs that are not finished.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ActiveJobsReply {
    pub success: bool,
    pub vm_id: String,
    pub has_active_jobs: bool,
    /// Running, holding, rolling back or needs_operator (which keeps the VM locked).
    pub data: Vec<JobView>,
    pub total: usize,
}

/// The VM's jobs that are not finished (a new failover of it is refused while there is one).
#[utoipa::path(get, path = "/api/v1/vms/{vm_id}/active-jobs", tag = "vms",
    params(("vm_id" = String, Path, description = "The VMware VM UUID")),
    responses((status = 200, body = ActiveJobsReply), (status = 400, description = "INVALID_ARGUMENT", body = ErrorBody)))]
async fn active_jobs(
    State(rest): State<Rest>,
    caller: Caller,
    Path(vm_id): Path<String>,
) -> Result<Reply<ActiveJobsReply>, RestError> {
    let mut data = Vec::new();
    let mut page_token = String::new();
    let meta = loop {
        let msg = pb::ListFailoversRequest {
            vm_id: vm_id.clone(),
            page_size: 100,
            page_token,
            ..Default::default()
        };
        let response = rest.failover().list_failovers(caller.request(msg)).await?;
        let meta = response.metadata().clone();
        let page = response.into_inner();
        data.extend(
            page.jobs
                .into_iter()
                .filter(|j| !FINISHED.contains(&j.status.as_str()))
                .map(JobView::from),
        );
        if page.next_page_token.is_empty() {
            break meta;
        }
        page_token = page.next_page_token;
    };
    Ok(Reply::of(
        ActiveJobsReply {
            success: true,
            has_active_jobs: !data.is_empty(),
            total: data.len(),
            vm_id,
            data,
        },
        &meta,
    ))
}

/// A VM's whole configuration as a failover would use it, and its readiness.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ConfigurationData {
    pub vm: VmView,
    pub network_mappings: Vec<MappingView>,
    pub validation_result: ValidationResult,
}

/// The VM's configuration (CPUs, memory, OS, NICs, disks, mappings) and every check.
#[utoipa::path(get, path = "/api/v1/vms/{vm_id}/configuration-check", tag = "vms",
    params(("vm_id" = String, Path, description = "The VMware VM UUID"), ReadinessQuery),
    responses((status = 200, body = inline(Envelope<ConfigurationData>)), (status = 404, description = "VM_NOT_FOUND", body = ErrorBody)))]
async fn configuration_check(
    State(rest): State<Rest>,
    caller: Caller,
    Path(vm_id): Path<String>,
    Query(q): Query<ReadinessQuery>,
) -> Result<Reply<Envelope<ConfigurationData>>, RestError> {
    let (vm, meta) = vm(&rest, &caller, vm_id.clone()).await?;
    let network_mappings = mappings_of(&rest, &caller, &vm_id).await?;
    let readiness = readiness_of(&rest, &caller, vm_id, q.job_type).await?;
    let data = ConfigurationData {
        vm,
        network_mappings,
        validation_result: readiness.body.validation_result,
    };
    Ok(Reply::of(
        Envelope::new("VM configuration check completed", data),
        &meta,
    ))
}

/// A network mapping as the seeds store it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct MappingView {
    pub vm_id: String,
    /// The source (VMware) network's name.
    pub source_network_name: String,
    /// The CloudStack network's id.
    pub destination_network_id: String,
    /// A test failover's mapping (else a live failover's).
    pub is_test_network: bool,
}

fn kind(is_test_network: bool) -> &'static str {
    if is_test_network {
        "test"
    } else {
        "production"
    }
}

async fn mappings_of(rest: &Rest, caller: &Caller, vm_id: &str) -> Result<Vec<MappingView>, RestError> {
    let msg = pb::GetNetworkMappingsRequest { vm_id: vm_id.into() };
    let got = rest
        .failover()
        .get_network_mappings(caller.request(msg))
        .await?
        .into_inner();
    Ok(got
        .mappings
        .into_iter()
        .map(|m| MappingView {
            vm_id: got.vm_id.clone(),
            is_test_network: m.kind == "test",
            source_network_name: m.source_network,
            destination_network_id: m.destination_network_id,
        })
        .collect())
}

/// Replaces the VM's mappings of one kind with `mappings` (those of that kind).
async fn set_kind(
    rest: &Rest,
    caller: &Caller,
    vm_id: &str,
    is_test_network: bool,
    mappings: &[MappingView],
) -> Result<(), RestError> {
    let kind = kind(is_test_network);
    let msg = pb::SetNetworkMappingsRequest {
        vm_id: vm_id.into(),
        kind: kind.into(),
        mappings: mappings
            .iter()
            .filter(|m| m.is_test_network == is_test_network)
            .map(|m| pb::NetworkMapping {
                source_network: m.source_network_name.clone(),
                destination_network_id: m.destination_network_id.clone(),
                kind: kind.into(),
            })
            .collect(),
    };
    rest.failover().set_network_mappings(caller.request(msg)).await?;
    Ok(())
}

/// One mapping of a request.
#[derive(Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct MappingBody {
    /// The VM (in the path for PUT).
    pub vm_id: String,
    pub source_network_name: String,
    pub destination_network_id: String,
    /// Accepted for the seeds' clients; not stored (CloudStack names the network by its id).
    pub destination_network_name: String,
    pub is_test_network: bool,
}

impl MappingBody {
    fn view(self, vm_id: &str) -> MappingView {
        MappingView {
            vm_id: vm_id.to_string(),
            source_network_name: self.source_network_name,
            destination_network_id: self.destination_network_id,
            is_test_network: self.is_test_network,
        }
    }
}

/// Adds a mapping (or replaces the VM's mapping of the same source network and kind).
#[utoipa::path(post, path = "/api/v1/network-mappings", tag = "network-mappings", request_body = MappingBody,
    responses(
        (status = 200, body = inline(Envelope<Vec<MappingView>>), description = "The VM's mappings now"),
        (status = 400, description = "INVALID_ARGUMENT", body = ErrorBody),
        (status = 404, description = "VM_NOT_FOUND", body = ErrorBody),
    ))]
async fn create_mapping(
    State(rest): State<Rest>,
    caller: Caller,
    Body(b): Body<MappingBody>,
) -> Result<Reply<Envelope<Vec<MappingView>>>, RestError> {
    let vm_id = b.vm_id.clone();
    if vm_id.trim().is_empty() {
        return Err(RestError::field("vm_id", "required"));
    }
    let new = b.view(&vm_id);
    let mut all = mappings_of(&rest, &caller, &vm_id).await?;
    all.retain(|m| !(m.source_network_name == new.source_network_name && m.is_test_network == new.is_test_network));
    let is_test = new.is_test_network;
    all.push(new);
    set_kind(&rest, &caller, &vm_id, is_test, &all).await?;
    let now = mappings_of(&rest, &caller, &vm_id).await?;
    Ok(Reply {
        body: Envelope::new("Network mapping created", now),
        correlation_id: None,
    })
}

/// Every VM's mappings.
#[utoipa::path(get, path = "/api/v1/network-mappings", tag = "network-mappings",
    responses((status = 200, body = inline(Envelope<Vec<MappingView>>))))]
async fn list_mappings(
    State(rest): State<Rest>,
    caller: Caller,
) -> Result<Reply<Envelope<Vec<MappingView>>>, RestError> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let msg = pb::ListVmsRequest {
            page_size: 100,
            page_token,
        };
        let page = rest.failover().list_vms(caller.request(msg)).await?.into_inner();
        for vm in page.vms {
            all.extend(mappings_of(&rest, &caller, &vm.vm_id).await?);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    Ok(Reply {
        body: Envelope::new("Retrieved network mappings", all),
        correlation_id: None,
    })
}

/// A VM's mappings.
#[utoipa::path(get, path = "/api/v1/network-mappings/{vm_id}", tag = "network-mappings",
    params(("vm_id" = String, Path, description = "The VMware VM UUID")),
    responses((status = 200, body = inline(Envelope<Vec<MappingView>>)), (status = 404, description = "VM_NOT_FOUND", body = ErrorBody)))]
async fn get_mappings(
    State(rest): State<Rest>,
    caller: Caller,
    Path(vm_id): Path<String>,
) -> Result<Reply<Envelope<Vec<MappingView>>>, RestError> {
    let all = mappings_of(&rest, &caller, &vm_id).await?;
    Ok(Reply {
        body: Envelope::new("Retrieved network mappings", all),
        correlation_id: None,
    })
}

/// `PUT /api/v1/network-mappings/{vm_id}`: the VM's mappings, all of them.
#[derive(Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct MappingsBody {
    /// Each item's vm_id may be left out; given, it must be the path's.
    pub mappings: Vec<MappingBody>,
}

/// Replaces all the VM's mappings (test and production) with the ones given.
#[utoipa::path(put, path = "/api/v1/network-mappings/{vm_id}", tag = "network-mappings",
    params(("vm_id" = String, Path, description = "The VMware VM UUID")),
    request_body = MappingsBody,
    responses(
        (status = 200, body = inline(Envelope<Vec<MappingView>>)),
        (status = 400, description = "INVALID_ARGUMENT", body = ErrorBody),
        (status = 404, description = "VM_NOT_FOUND", body = ErrorBody),
    ))]
async fn replace_mappings(
    State(rest): State<Rest>,
    caller: Caller,
    Path(vm_id): Path<String>,
    Body(b): Body<MappingsBody>,
) -> Result<Reply<Envelope<Vec<MappingView>>>, RestError> {
    let mut all = Vec::with_capacity(b.mappings.len());
    for (i, m) in b.mappings.into_iter().enumerate() {
        if !m.vm_id.is_empty() && m.vm_id != vm_id {
            return Err(RestError::field(
                &format!("mappings[{i}].vm_id"),
                "must be the path's vm_id or left out",
            ));
        }
        all.push(m.view(&vm_id));
    }
    set_kind(&rest, &caller, &vm_id, true, &all).await?;
    set_kind(&rest, &caller, &vm_id, false, &all).await?;
    let now = mappings_of(&rest, &caller, &vm_id).await?;
    Ok(Reply {
        body: Envelope::new("Network mappings replaced", now),
        correlation_id: None,
    })
}

/// `?source_network_name=` of a delete.
#[derive(Deserialize, Default, utoipa::IntoParams)]
#[serde(default, deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Delete only this source network's mappings (absent: all the VM's).
    pub source_network_name: String,
}

/// Deletes the VM's mappings (all, or one source network's).
#[utoipa::path(delete, path = "/api/v1/network-mappings/{vm_id}", tag = "network-mappings",
    params(("vm_id" = String, Path, description = "The VMware VM UUID"), DeleteQuery),
    responses((status = 200, body = inline(Envelope<Vec<MappingView>>), description = "The mappings left"), (status = 404, description = "VM_NOT_FOUND", body = ErrorBody)))]
async fn delete_mappings(
    State(rest): State<Rest>,
    caller: Caller,
    Path(vm_id): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Result<Reply<Envelope<Vec<MappingView>>>, RestError> {
    let mut all = mappings_of(&rest, &caller, &vm_id).await?;
    if q.source_network_name.is_empty() {
        all.clear();
    } else {
        all.retain(|m| m.source_network_name != q.source_network_name);
    }
    set_kind(&rest, &caller, &vm_id, true, &all).await?;
    set_kind(&rest, &caller, &vm_id, false, &all).await?;
    Ok(Reply {
        body: Envelope::new("Network mappings deleted", all),
        correlation_id: None,
    })
}
