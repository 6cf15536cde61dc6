//! `/api/v1/failover/*`: start, end, cancel and resolve failovers; their status, list, details
//! and readiness (the event stream is [`super::events`]).

use std::collections::{BTreeMap, HashMap};

use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::envelope::{Body, ErrorBody, Path, Query, Reply, RestError};
use super::views::{JobView, Page, ValidationResult};
use super::{Caller, Rest};
use crate::api::pb;

pub(super) fn routes() -> OpenApiRouter<Rest> {
    OpenApiRouter::new()
        .routes(routes!(start_test))
        .routes(routes!(start_live))
        .routes(routes!(end_test))
        .routes(routes!(status))
        .routes(routes!(cancel))
        .routes(routes!(resolve))
        .routes(routes!(readiness))
        .routes(routes!(list_jobs))
        .routes(routes!(job))
}

/// `POST /api/v1/failover/test`. Every field but `vm_id` may be left out.
#[derive(Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TestFailoverBody {
    /// The VMware VM UUID (not its name).
    pub vm_id: String,
    /// Empty: the inventory's name.
    pub vm_name: String,
    /// Tear down by itself after test_duration (then required).
    pub auto_cleanup: bool,
    /// How long the test runs, e.g. "30m", "2h"; at most 30 days.
    pub test_duration: String,
    pub skip_validation: bool,
    pub skip_snapshot: bool,
    pub skip_virtio_injection: bool,
    /// Source network name to CloudStack network id, overriding the stored mappings.
    pub network_mappings: BTreeMap<String, String>,
    /// "cpu_count", "memory_mb", "service_offering_id" (strings or numbers).
    #[schema(value_type = Object)]
    pub custom_config: BTreeMap<String, Value>,
    /// Stored with the job.
    #[schema(value_type = Object)]
    pub notification_config: BTreeMap<String, Value>,
    /// Idempotency key (or the `Idempotency-Key` header): the same key with the same fields
    /// returns the same job, never a second one.
    pub request_id: String,
}

/// `POST /api/v1/failover/live`.
#[derive(Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LiveFailoverBody {
    pub vm_id: String,
    pub vm_name: String,
    pub skip_validation: bool,
    pub skip_snapshot: bool,
    pub skip_virtio_injection: bool,
    pub network_mappings: BTreeMap<String, String>,
    #[schema(value_type = Object)]
    pub custom_config: BTreeMap<String, Value>,
    #[schema(value_type = Object)]
    pub notification_config: BTreeMap<String, Value>,
    pub request_id: String,
}

/// A map of JSON values as the gRPC request's strings: strings as they are, numbers and
/// booleans written out; anything else is refused naming `field[key]`.
fn strings(field: &str, map: BTreeMap<String, Value>) -> Result<HashMap<String, String>, RestError> {
    map.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            Value::Number(n) => Ok((k, n.to_string())),
            Value::Bool(b) => Ok((k, b.to_string())),
            _ => Err(RestError::field(
                &format!("{field}[{k}]"),
                "must be a string, a number or a boolean",
            )),
        })
        .collect()
}

/// The request id of the body, else of the `Idempotency-Key` header.
fn request_id(caller: &Caller, body: String) -> String {
    if !body.is_empty() {
        return body;
    }
    caller
        .headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// What a start answers.
#[derive(Serialize, utoipa::ToSchema)]
pub struct StartReply {
    pub success: bool,
    pub message: String,
    pub job_id: String,
    /// The test's duration (test failovers with one).
    pub estimated_duration: Option<String>,
    pub data: StartData,
}

/// The started job, with what the request asked for.
#[derive(Serialize, utoipa::ToSchema)]
pub struct StartData {
    #[serde(flatten)]
    pub job: JobView,
    /// False when the request id matched an existing job, which is returned.
    pub created: bool,
    /// Whether the disks are snapshotted first (not skip_snapshot).
    pub snapshot_protection: bool,
    /// Whether VirtIO drivers are injected (not skip_virtio_injection; Windows guests only).
    pub virtio_injection: bool,
    pub auto_cleanup: Option<bool>,
    pub test_duration: Option<String>,
}

fn started(
    response: tonic::Response<pb::FailoverJob>,
    message: &str,
    (skip_snapshot, skip_virtio): (bool, bool),
    test: Option<(bool, String)>,
) -> Reply<StartReply> {
    let meta = response.metadata().clone();
    let job = response.into_inner();
    let created = job.created;
    let job = JobView::from(job);
    let duration = test
        .as_ref()
        .map(|(_, d)| d.trim().to_string())
        .filter(|d| !d.is_empty());
    Reply::of(
        StartReply {
            success: true,
            message: message.to_string(),
            job_id: job.job_id.clone(),
            estimated_duration: duration.clone(),
            data: StartData {
                job,
                created,
                snapshot_protection: !skip_snapshot,
                virtio_injection: !skip_virtio,
                auto_cleanup: test.as_ref().map(|(a, _)| *a),
                test_duration: duration,
            },
        },
        &meta,
    )
}

/// Starts a reversible test failover.
#[utoipa::path(post, path = "/api/v1/failover/test", tag = "failover", request_body = TestFailoverBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "The request id, if the body has none")),
    responses(
        (status = 200, description = "Started, or the job the same request id started", body = StartReply),
        (status = 400, description = "A field is invalid (INVALID_ARGUMENT) or the VM is busy (VM_BUSY)", body = ErrorBody),
        (status = 404, description = "VM_NOT_FOUND", body = ErrorBody),
        (status = 409, description = "REQUEST_ID_REUSED with other fields", body = ErrorBody),
    ))]
async fn start_test(
    State(rest): State<Rest>,
    caller: Caller,
    Body(b): Body<TestFailoverBody>,
) -> Result<Reply<StartReply>, RestError> {
    let skips = (b.skip_snapshot, b.skip_virtio_injection);
    let test = (b.auto_cleanup, b.test_duration.clone());
    let msg = pb::StartTestFailoverRequest {
        custom_config: strings("custom_config", b.custom_config)?,
        notification_config: strings("notification_config", b.notification_config)?,
        request_id: request_id(&caller, b.request_id),
        vm_id: b.vm_id,
        vm_name: b.vm_name,
        auto_cleanup: b.auto_cleanup,
        test_duration: b.test_duration,
        skip_validation: b.skip_validation,
        skip_snapshot: b.skip_snapshot,
        skip_virtio_injection: b.skip_virtio_injection,
        network_mappings: b.network_mappings.into_iter().collect(),
    };
    let response = rest.failover().start_test_failover(caller.request(msg)).await?;
    Ok(started(response, "Test failover started", skips, Some(test)))
}

/// Starts a permanent live failover.
#[utoipa::path(post, path = "/api/v1/failover/live", tag = "failover", request_body = LiveFailoverBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "The request id, if the body has none")),
    responses(
        (status = 200, description = "Started, or the job the same request id started", body = StartReply),
        (status = 400, description = "INVALID_ARGUMENT, VM_BUSY", body = ErrorBody),
        (status = 404, description = "VM_NOT_FOUND", body = ErrorBody),
        (status = 409, description = "REQUEST_ID_REUSED", body = ErrorBody),
    ))]
async fn start_live(
    State(rest): State<Rest>,
    caller: Caller,
    Body(b): Body<LiveFailoverBody>,
) -> Result<Reply<StartReply>, RestError> {
    let skips = (b.skip_snapshot, b.skip_virtio_injection);
    let msg = pb::StartLiveFailoverRequest {
        custom_config: strings("custom_config", b.custom_config)?,
        notification_config: strings("notification_config", b.notification_config)?,
        request_id: request_id(&caller, b.request_id),
        vm_id: b.vm_id,
        vm_name: b.vm_name,
        skip_validation: b.skip_validation,
        skip_snapshot: b.skip_snapshot,
        skip_virtio_injection: b.skip_virtio_injection,
        network_mappings: b.network_mappings.into_iter().collect(),
    };
    let response = rest.failover().start_live_failover(caller.request(msg)).await?;
    Ok(started(response, "Live failover started", skips, None))
}

/// A job, with a message.
#[derive(Serialize, utoipa::ToSchema)]
pub struct JobReply {
    pub success: bool,
    pub message: String,
    pub job_id: String,
    pub data: JobView,
}

fn job_reply(response: tonic::Response<pb::FailoverJob>, message: &str) -> Reply<JobReply> {
    let meta = response.metadata().clone();
    let job = JobView::from(response.into_inner());
    Reply::of(
        JobReply {
            success: true,
            message: message.to_string(),
            job_id: job.job_id.clone(),
            data: job,
        },
        &meta,
    )
}

/// Ends a test failover's hold now: teardown starts. Idempotent.
#[utoipa::path(delete, path = "/api/v1/failover/test/{job_id}", tag = "failover",
    params(("job_id" = String, Path, description = "The job")),
    responses(
        (status = 200, description = "Teardown requested (or already)", body = JobReply),
        (status = 400, description = "JOB_FINISHED, NOT_A_TEST", body = ErrorBody),
        (status = 404, description = "JOB_NOT_FOUND", body = ErrorBody),
    ))]
async fn end_test(
    State(rest): State<Rest>,
    caller: Caller,
    Path(job_id): Path<String>,
) -> Result<Reply<JobReply>, RestError> {
    let response = rest
        .failover()
        .end_test_failover(caller.request(pb::EndTestFailoverRequest { job_id }))
        .await?;
    Ok(job_reply(response, "Test failover ending: teardown started"))
}

/// `POST /api/v1/failover/{id}/cancel`.
#[derive(Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CancelBody {
    /// Journaled with the cancel.
    pub reason: String,
}

/// Stops forward progress and rolls back (also during retries and the hold). Idempotent.
#[utoipa::path(post, path = "/api/v1/failover/{id}/cancel", tag = "failover",
    params(("id" = String, Path, description = "The job id")),
    request_body(content = Option<CancelBody>),
    responses(
        (status = 200, description = "Cancel requested (or already)", body = JobReply),
        (status = 400, description = "JOB_FINISHED", body = ErrorBody),
        (status = 404, description = "JOB_NOT_FOUND", body = ErrorBody),
    ))]
async fn cancel(
    State(rest): State<Rest>,
    caller: Caller,
    Path(job_id): Path<String>,
    Body(b): Body<CancelBody>,
) -> Result<Reply<JobReply>, RestError> {
    let msg = pb::CancelFailoverRequest {
        job_id,
        reason: b.reason,
    };
    let response = rest.failover().cancel_failover(caller.request(msg)).await?;
    Ok(job_reply(response, "Failover cancelled: rolling back"))
}

/// `POST /api/v1/failover/{id}/resolve`.
#[derive(Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ResolveBody {
    /// What was checked or done (required; journaled).
    pub reason: String,
    /// Who resolved it; required on a server without authentication.
    pub resolved_by: String,
    /// Resolve although the cloud still differs from the starting point.
    pub force: bool,
}

/// Resolves a needs_operator job once the cloud is back at its starting point; frees the VM.
#[utoipa::path(post, path = "/api/v1/failover/{id}/resolve", tag = "failover",
    params(("id" = String, Path, description = "The job id")),
    request_body = ResolveBody,
    responses(
        (status = 200, description = "Resolved", body = JobReply),
        (status = 400, description = "NOT_RESOLVED (the differences listed), NOT_NEEDS_OPERATOR", body = ErrorBody),
        (status = 404, description = "JOB_NOT_FOUND", body = ErrorBody),
    ))]
async fn resolve(
    State(rest): State<Rest>,
    caller: Caller,
    Path(job_id): Path<String>,
    Body(b): Body<ResolveBody>,
) -> Result<Reply<JobReply>, RestError> {
    let msg = pb::ResolveFailoverRequest {
        job_id,
        reason: b.reason,
        resolved_by: b.resolved_by,
        force: b.force,
    };
    let response = rest.failover().resolve_failover(caller.request(msg)).await?;
    Ok(job_reply(response, "Failover job resolved"))
}

/// A job's status, as the seeds' status endpoint answers.
#[derive(Serialize, utoipa::ToSchema)]
pub struct StatusReply {
    pub success: bool,
    pub message: String,
    pub job_id: String,
    pub status: String,
    /// 0 to 100.
    pub progress: f64,
    pub start_time: Option<String>,
    /// Nanoseconds from start to completion (or to now, while it runs).
    pub duration: i64,
    pub job_details: JobView,
}

/// A job's status and progress.
#[utoipa::path(get, path = "/api/v1/failover/{id}/status", tag = "failover",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, body = StatusReply),
        (status = 404, description = "JOB_NOT_FOUND", body = ErrorBody),
    ))]
async fn status(
    State(rest): State<Rest>,
    caller: Caller,
    Path(job_id): Path<String>,
) -> Result<Reply<StatusReply>, RestError> {
    let response = rest
        .failover()
        .get_failover(caller.request(pb::GetFailoverRequest { job_id }))
        .await?;
    let meta = response.metadata().clone();
    let job = response.into_inner();
    let nanos =
        |t: &Option<prost_types::Timestamp>| t.as_ref().map(|t| t.seconds as i128 * 1_000_000_000 + t.nanos as i128);
    let now = crate::domain::Timestamp::now().0 as i128 * 1_000_000;
    let duration = match (nanos(&job.started_at), nanos(&job.completed_at)) {
        (Some(start), Some(end)) => end - start,
        (Some(start), None) => now - start,
        _ => 0,
    };
    let view = JobView::from(job);
    Ok(Reply::of(
        StatusReply {
            success: true,
            message: format!("Retrieved status for {} failover job", view.job_type),
            job_id: view.job_id.clone(),
            status: view.status.clone(),
            progress: view.progress,
            start_time: view.started_at.clone(),
            duration: duration.clamp(0, i64::MAX as i128) as i64,
            job_details: view,
        },
        &meta,
    ))
}

/// `GET /api/v1/failover/jobs` filters.
#[derive(Deserialize, Default, utoipa::IntoParams)]
#[serde(default, deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct JobsQuery {
    /// A job status, e.g. testing, completed, failed, needs_operator.
    pub status: String,
    /// test or live.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub job_type: String,
    pub vm_id: String,
    /// At most 100; 0 or absent: 20.
    pub page_size: u32,
    /// The previous page's next_page_token.
    pub page_token: String,
}

/// Failover jobs, newest first, a page at a time.
#[utoipa::path(get, path = "/api/v1/failover/jobs", tag = "failover", params(JobsQuery),
    responses((status = 200, body = inline(Page<JobView>), description = "The jobs, newest first, without their steps"), (status = 400, description = "INVALID_ARGUMENT", body = ErrorBody)))]
async fn list_jobs(
    State(rest): State<Rest>,
    caller: Caller,
    Query(q): Query<JobsQuery>,
) -> Result<Reply<Page<JobView>>, RestError> {
    let msg = pb::ListFailoversRequest {
        status: q.status,
        job_type: q.job_type,
        vm_id: q.vm_id,
        page_size: q.page_size,
        page_token: q.page_token,
    };
    let response = rest.failover().list_failovers(caller.request(msg)).await?;
    let meta = response.metadata().clone();
    let page = response.into_inner();
    let data = page.jobs.into_iter().map(JobView::from).collect();
    Ok(Reply::of(Page::new(data, page.next_page_token), &meta))
}

/// A job with its steps.
#[utoipa::path(get, path = "/api/v1/failover/jobs/{job_id}", tag = "failover",
    params(("job_id" = String, Path, description = "The job")),
    responses((status = 200, body = JobReply), (status = 404, description = "JOB_NOT_FOUND", body = ErrorBody)))]
async fn job(
    State(rest): State<Rest>,
    caller: Caller,
    Path(job_id): Path<String>,
) -> Result<Reply<JobReply>, RestError> {
    let response = rest
        .failover()
        .get_failover(caller.request(pb::GetFailoverRequest { job_id }))
        .await?;
    Ok(job_reply(response, "Retrieved failover job"))
}

/// The seeds' readiness reply.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ReadinessReply {
    pub success: bool,
    pub message: String,
    pub is_valid: bool,
    pub readiness_score: f64,
    pub validation_result: ValidationResult,
    /// What to do before a failover: the failed checks' messages.
    pub required_actions: Vec<String>,
}

/// `?job_type=` of the readiness routes.
#[derive(Deserialize, Default, utoipa::IntoParams)]
#[serde(default, deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReadinessQuery {
    /// test (default) or live: which network mappings count.
    pub job_type: String,
}

pub(super) async fn readiness_of(
    rest: &Rest,
    caller: &Caller,
    vm_id: String,
    job_type: String,
) -> Result<Reply<ReadinessReply>, RestError> {
    let response = rest
        .failover()
        .check_readiness(caller.request(pb::CheckReadinessRequest { vm_id, job_type }))
        .await?;
    let meta = response.metadata().clone();
    let result = ValidationResult::from(response.into_inner());
    let required_actions = result.errors.iter().chain(&result.warnings).cloned().collect();
    Ok(Reply::of(
        ReadinessReply {
            success: true,
            message: "VM failover readiness validation completed".into(),
            is_valid: result.is_ready,
            readiness_score: result.readiness_score,
            validation_result: result,
            required_actions,
        },
        &meta,
    ))
}

/// Whether a VM is ready to fail over: the checks, asked of the inventory and the cloud now.
#[utoipa::path(get, path = "/api/v1/failover/{id}/readiness", tag = "failover",
    params(("id" = String, Path, description = "The VM id (vm_id)"), ReadinessQuery),
    responses((status = 200, body = ReadinessReply), (status = 404, description = "VM_NOT_FOUND", body = ErrorBody)))]
async fn readiness(
    State(rest): State<Rest>,
    caller: Caller,
    Path(vm_id): Path<String>,
    Query(q): Query<ReadinessQuery>,
) -> Result<Reply<ReadinessReply>, RestError> {
    readiness_of(&rest, &caller, vm_id, q.job_type).await
}
