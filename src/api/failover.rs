//! `tern.v1.FailoverService`: starts test and live failovers as runs of the `test-failover`
//! and `live-failover` definitions, and shows them as the seeds' failover jobs.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;
use tonic::{Request, Response, Status};

use super::auth::caller;
use super::convert;
use super::error::{ApiError, ApiResult};
use super::page::Page;
use super::pb;
use super::pb::failover_service_server::FailoverService;
use super::validate::checked;
use super::watch::{watch, WatchStream};
use super::{correlation_of, reply, reply_own, respond, ApiState, LIVE_FAILOVER, TEST_FAILOVER};
use crate::domain::failover::{FailoverInput, JobType};
use crate::domain::inventory::NetworkKind;
use crate::domain::limits::shown;
use crate::domain::run::{Resolution, RunState, RunStatus};
use crate::domain::{RunId, Timestamp};
use crate::engine::{EngineError, SubmitRequest};
use crate::steps::failover::recover;
use crate::store::{FailoverJobRow, JobFilter, RunRow, SignalOutcome};

pub struct FailoverApi {
    state: ApiState,
}

/// The fields both start requests share.
pub(crate) struct Start<'a> {
    pub(crate) definition: &'static str,
    pub(crate) job_type: JobType,
    pub(crate) vm_id: &'a str,
    pub(crate) vm_name: &'a str,
    pub(crate) skip_validation: bool,
    pub(crate) skip_snapshot: bool,
    pub(crate) skip_virtio_injection: bool,
    pub(crate) network_mappings: &'a HashMap<String, String>,
    pub(crate) custom_config: &'a HashMap<String, String>,
    pub(crate) notification_config: &'a HashMap<String, String>,
    pub(crate) request_id: &'a str,
    /// Test failovers only: (auto_cleanup, test_duration).
    pub(crate) hold: Option<(bool, &'a str)>,
}

/// The [`Start`] of a start request: both requests carry the same fields but the hold's.
macro_rules! start_of {
    ($r:expr, $definition:expr, $job_type:expr, $hold:expr) => {
        Start {
            definition: $definition,
            job_type: $job_type,
            vm_id: &$r.vm_id,
            vm_name: &$r.vm_name,
            skip_validation: $r.skip_validation,
            skip_snapshot: $r.skip_snapshot,
            skip_virtio_injection: $r.skip_virtio_injection,
            network_mappings: &$r.network_mappings,
            custom_config: &$r.custom_config,
            notification_config: &$r.notification_config,
            request_id: &$r.request_id,
            hold: $hold,
        }
    };
}
#[cfg(test)]
pub(crate) use start_of;

pub(crate) fn run_id(field: &str, s: &str) -> ApiResult<RunId> {
    if s.trim().is_empty() {
        return Err(ApiError::field(field, "is required"));
    }
    s.trim()
        .parse()
        .map_err(|_| ApiError::field(field, format!("{} is not a job id (a UUID)", shown(s))))
}

impl Start<'_> {
    /// The run's input. `inventory_name` is the VM's name unless the request gives one.
    ///
    /// A start with a request id already used is the same request when it would store the same
    /// input (and definition); a request without `vm_name` takes the one recorded.
    pub(crate) fn input(&self, inventory_name: &str) -> FailoverInput {
        let vm_name = match self.vm_name.trim() {
            "" => inventory_name,
            name => name,
        };
        let mut input = FailoverInput::new(self.vm_id.trim(), self.job_type);
        input.vm_name = Some(vm_name.to_string());
        input.skip_validation = self.skip_validation;
        input.skip_snapshot = self.skip_snapshot;
        input.skip_virtio_injection = self.skip_virtio_injection;
        input.network_mappings = sorted(self.network_mappings);
        input.custom_config = sorted(self.custom_config);
        input.notification_config = sorted(self.notification_config);
        if let Some((auto_cleanup, duration)) = self.hold {
            input.auto_cleanup = Some(auto_cleanup);
            input.test_duration = Some(duration.trim().to_string()).filter(|d| !d.is_empty());
        }
        input
    }
}

fn sorted(m: &HashMap<String, String>) -> BTreeMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

impl FailoverApi {
    pub fn new(state: ApiState) -> FailoverApi {
        FailoverApi { state }
    }

    /// A failover run, or JOB_NOT_FOUND (also for runs of other definitions).
    async fn run(&self, id: RunId) -> ApiResult<RunRow> {
        match self.state.engine.get_run(id).await? {
            Some(r) if r.definition == TEST_FAILOVER || r.definition == LIVE_FAILOVER => Ok(r),
            _ => Err(ApiError::NotFound {
                reason: "JOB_NOT_FOUND",
                message: format!("failover job {id} not found"),
            }),
        }
    }

    async fn job(&self, run: &RunRow, with_steps: bool) -> ApiResult<pb::FailoverJob> {
        let row = self.state.jobs.failover_job(run.id).await?;
        self.job_with(run, row.as_ref(), with_steps).await
    }

    /// The job from its run and (already fetched) `failover_jobs` row.
    async fn job_with(
        &self,
        run: &RunRow,
        job: Option<&FailoverJobRow>,
        with_steps: bool,
    ) -> ApiResult<pb::FailoverJob> {
        let def = self.state.engine.pinned(&run.definition_hash).await?;
        // Up to the row's last_seq: the steps match the row's state even if the run moved on since.
        let journal = self
            .state
            .engine
            .journal(run.id, 0, run.last_seq.clamp(0, u32::MAX as i64) as u32)
            .await?;
        Ok(convert::failover_job(run, job, &def, &journal, with_steps))
    }

    async fn start(&self, s: Start<'_>, correlation_id: String, by: Option<String>) -> ApiResult<pb::FailoverJob> {
        checked(&s)?;
        let request_id = Some(s.request_id.trim().to_string()).filter(|r| !r.is_empty());
        // A retried request returns its job even if the VM has since left the inventory.
        if let Some(r) = &request_id {
            if let Some(run) = self.state.engine.find_by_request_id(r).await? {
                return self.retried(&s, r, &run).await;
            }
        }
        let vm_id = s.vm_id.trim();
        let vm = self
            .state
            .inventory
            .vm_record(vm_id)
            .await?
            .ok_or_else(|| ApiError::vm_not_found(vm_id))?;
        let mut input = s.input(&vm.name);
        // The job works on the VM as it is now, whatever the inventory says later.
        input.source_vm_spec = Some(vm);
        let input = input.to_value();
        let submitted = self
            .state
            .engine
            .submit(SubmitRequest {
                definition: s.definition.into(),
                input,
                request_id: request_id.clone(),
                correlation_id: Some(correlation_id),
                by,
            })
            .await;
        let submitted = match submitted {
            Ok(s) => s,
            Err(EngineError::Busy { value, .. }) => {
                let active = self
                    .state
                    .jobs
                    .active_jobs_for_vm(&value, None)
                    .await
                    .unwrap_or_default();
                // A job that needs an operator holds the VM until it is resolved.
                let mut stuck = Vec::new();
                for job in &active {
                    if let Ok(id) = job.parse::<RunId>() {
                        if let Ok(Some(r)) = self.state.engine.get_run(id).await {
                            if r.status == RunStatus::NeedsOperator {
                                stuck.push(job.clone());
                            }
                        }
                    }
                }
                let message = match stuck.first() {
                    Some(job) => format!(
                        "VM {value} is held by job {job}, which needs an operator: put right what \
                         `tern admin recover {job}` lists, then `tern resolve {job} --reason TEXT`"
                    ),
                    None => format!(
                        "VM {value} already has an unfinished failover ({}); end or cancel it first",
                        active.join(", ")
                    ),
                };
                return Err(ApiError::Precondition {
                    reason: "VM_BUSY",
                    message,
                    metadata: HashMap::from([
                        ("vm_id".to_string(), value),
                        ("active_jobs".to_string(), active.join(",")),
                    ]),
                });
            }
            Err(e) => return Err(e.into()),
        };
        if let (false, Some(r)) = (submitted.created, &request_id) {
            // A start with the same request id committed first.
            return self.retried(&s, r, &submitted.run).await;
        }
        let mut job = self.job(&submitted.run, true).await?;
        job.created = true;
        Ok(job)
    }

    /// The job `run`, which `request_id` made before, if it was made with `s`'s parameters.
    async fn retried(&self, s: &Start<'_>, request_id: &str, run: &RunRow) -> ApiResult<pb::FailoverJob> {
        let recorded = run.input.get("vm_name").and_then(Value::as_str).unwrap_or_default();
        // The pinned source is what the inventory said then, not a parameter of the request.
        let given = s.input(recorded).to_value();
        super::same_request(request_id, run, s.definition, &given, "job", &["source_vm_spec"])?;
        let mut job = self.job(run, true).await?;
        job.created = false;
        Ok(job)
    }

    /// Sends `end-test` or a cancel, then returns the job.
    async fn stop(&self, job_id: &str, end_test: bool, reason: &str, by: Option<&str>) -> ApiResult<pb::FailoverJob> {
        let id = run_id("job_id", job_id)?;
        let run = self.run(id).await?;
        let outcome = if end_test {
            if run.definition != TEST_FAILOVER {
                return Err(ApiError::precondition(
                    "NOT_A_TEST_FAILOVER",
                    format!("job {id} is a live failover: only a test failover has a test to end"),
                ));
            }
            self.state.engine.signal_as(id, "end-test", by).await?
        } else {
            self.state.engine.cancel_as(id, reason, by).await?
        };
        if let SignalOutcome::Finished(status) = outcome {
            return Err(ApiError::precondition(
                "JOB_FINISHED",
                format!("job {id} is already {}", status.as_str()),
            ));
        }
        let run = self.run(id).await?;
        self.job(&run, true).await
    }

    /// Resolves a needs_operator job once the cloud shows nothing left to put right (or when
    /// forced), then frees its VM.
    /// `caller` is the authenticated principal: with one, the resolution is theirs and
    /// `resolved_by` may be left empty; without, `resolved_by` is required.
    async fn resolve(&self, r: &pb::ResolveFailoverRequest, caller: Option<String>) -> ApiResult<pb::FailoverJob> {
        checked(r)?;
        let id = run_id("job_id", &r.job_id)?;
        let reason = r.reason.trim();
        let by = match (caller, r.resolved_by.trim()) {
            (Some(principal), "") => principal,
            (Some(principal), said) if said == principal => principal,
            (Some(principal), said) => format!("{principal} (for {said})"),
            (None, "") => return Err(ApiError::field("resolved_by", "is required")),
            (None, said) => said.to_string(),
        };
        let run = self.run(id).await?;
        if !matches!(run.state, RunState::NeedsOperator { .. }) {
            return Err(ApiError::precondition(
                "JOB_NOT_NEEDS_OPERATOR",
                format!(
                    "job {id} is {}: only a job that needs an operator is resolved",
                    run.status.as_str()
                ),
            ));
        }
        let differences = self.differences(&run).await?;
        if !differences.is_empty() && !r.force {
            let list: Vec<String> = differences
                .iter()
                .enumerate()
                .map(|(n, d)| format!("{}. {d}", n + 1))
                .collect();
            return Err(ApiError::Precondition {
                reason: "NOT_RESOLVED",
                message: format!(
                    "job {id} is not resolved: the cloud still differs from the starting point. Left to do: {}. \
                     Do it (`tern admin recover {id}` prints it in full) and resolve again, or resolve with force",
                    list.join(" ")
                ),
                metadata: HashMap::from([("job_id".to_string(), id.to_string())]),
            });
        }
        let resolution = Resolution {
            by,
            reason: reason.to_string(),
            forced: !differences.is_empty(),
            differences,
            at: Timestamp::now(),
        };
        let run = self.state.engine.resolve(id, resolution).await?;
        self.job(&run, true).await
    }

    /// What the job left that the cloud still shows (see [`recover::differences`]); what could
    /// not be checked counts as a difference.
    async fn differences(&self, run: &RunRow) -> ApiResult<Vec<String>> {
        let Some(deps) = &self.state.failover else {
            return Ok(vec![
                "the cloud was not checked: this server has no cloud configured".into()
            ]);
        };
        let input = FailoverInput::from_value(&run.input)
            .map_err(|e| ApiError::Internal(format!("job {}: stored input: {e}", run.id)))?;
        let pinned = input.source_vm_spec.clone();
        let vm = match pinned {
            Some(vm) => Some(vm),
            None => self.state.inventory.vm_record(&input.vm_id).await?,
        };
        let Some(vm) = vm else {
            return Ok(vec![format!(
                "the cloud was not checked: VM {} is no longer in the inventory",
                input.vm_id
            )]);
        };
        let job = self.state.jobs.failover_job(run.id).await?;
        let snapshot = job.as_ref().and_then(|j| j.linstor_snapshot_name.as_deref());
        match recover::differences(deps, run, &vm, snapshot).await {
            Ok(d) => Ok(d),
            Err(e) => Ok(vec![format!("the cloud could not be asked: {e}")]),
        }
    }
}

#[tonic::async_trait]
impl FailoverService for FailoverApi {
    async fn start_test_failover(
        &self,
        req: Request<pb::StartTestFailoverRequest>,
    ) -> Result<Response<pb::FailoverJob>, Status> {
        let c = correlation_of(&req);
        let by = caller(&req);
        let r = req.into_inner();
        let start = start_of!(
            r,
            TEST_FAILOVER,
            JobType::Test,
            Some((r.auto_cleanup, &r.test_duration))
        );
        reply_own(self.start(start, c.clone(), by).await, &c)
    }

    async fn start_live_failover(
        &self,
        req: Request<pb::StartLiveFailoverRequest>,
    ) -> Result<Response<pb::FailoverJob>, Status> {
        let c = correlation_of(&req);
        let by = caller(&req);
        let r = req.into_inner();
        let start = start_of!(r, LIVE_FAILOVER, JobType::Live, None);
        reply_own(self.start(start, c.clone(), by).await, &c)
    }

    async fn end_test_failover(
        &self,
        req: Request<pb::EndTestFailoverRequest>,
    ) -> Result<Response<pb::FailoverJob>, Status> {
        let c = correlation_of(&req);
        let result = match checked(req.get_ref()) {
            Ok(()) => {
                self.stop(&req.get_ref().job_id, true, "", caller(&req).as_deref())
                    .await
            }
            Err(e) => Err(e),
        };
        reply_own(result, &c)
    }

    async fn cancel_failover(
        &self,
        req: Request<pb::CancelFailoverRequest>,
    ) -> Result<Response<pb::FailoverJob>, Status> {
        let c = correlation_of(&req);
        let r = req.get_ref();
        let reason = if r.reason.trim().is_empty() {
            "cancelled through the API"
        } else {
            r.reason.trim()
        };
        let result = match checked(r) {
            Ok(()) => self.stop(&r.job_id, false, reason, caller(&req).as_deref()).await,
            Err(e) => Err(e),
        };
        reply_own(result, &c)
    }

    async fn resolve_failover(
        &self,
        req: Request<pb::ResolveFailoverRequest>,
    ) -> Result<Response<pb::FailoverJob>, Status> {
        let c = correlation_of(&req);
        reply_own(self.resolve(req.get_ref(), caller(&req)).await, &c)
    }

    async fn get_failover(&self, req: Request<pb::GetFailoverRequest>) -> Result<Response<pb::FailoverJob>, Status> {
        let c = correlation_of(&req);
        let result = async {
            checked(req.get_ref())?;
            let run = self.run(run_id("job_id", &req.get_ref().job_id)?).await?;
            self.job(&run, true).await
        }
        .await;
        reply_own(result, &c)
    }

    async fn list_failovers(
        &self,
        req: Request<pb::ListFailoversRequest>,
    ) -> Result<Response<pb::ListFailoversResponse>, Status> {
        let c = correlation_of(&req);
        let r = req.get_ref();
        let result = async {
            checked(r)?;
            let page = Page::of(r.page_size, &r.page_token)?;
            let job_type = Some(r.job_type.trim().to_string()).filter(|s| !s.is_empty());
            let mut rows = self
                .state
                .jobs
                .list_failover_jobs(&JobFilter {
                    definitions: vec![TEST_FAILOVER.into(), LIVE_FAILOVER.into()],
                    status: Some(r.status.trim().to_string()).filter(|s| !s.is_empty()),
                    job_type,
                    vm_id: Some(r.vm_id.trim().to_string()).filter(|s| !s.is_empty()),
                    before: page.before,
                    limit: page.limit(),
                })
                .await?;
            let next_page_token = page.cut(&mut rows, |row| row.job_id.clone());
            let mut jobs = Vec::with_capacity(rows.len());
            for row in &rows {
                let id = run_id("job_id", &row.job_id)
                    .map_err(|_| ApiError::Internal(format!("bad job id {:?}", row.job_id)))?;
                if let Some(run) = self.state.engine.get_run(id).await? {
                    jobs.push(self.job_with(&run, Some(row), false).await?);
                }
            }
            Ok(pb::ListFailoversResponse { jobs, next_page_token })
        }
        .await;
        reply(result, &c)
    }

    type WatchFailoverStream = WatchStream;

    async fn watch_failover(&self, req: Request<pb::WatchFailoverRequest>) -> Result<Response<WatchStream>, Status> {
        let c = correlation_of(&req);
        let r = req.get_ref();
        let result = async {
            checked(r)?;
            let run = self.run(run_id("job_id", &r.job_id)?).await?;
            Ok::<_, ApiError>((run, self.state.watches.take()?))
        }
        .await;
        match result {
            Ok((run, slot)) => Ok(respond(
                watch(self.state.engine.clone(), run.id, r.after_sequence, c, slot),
                &run.correlation_id,
            )),
            Err(e) => Err(e.into_status(&c)),
        }
    }

    async fn check_readiness(
        &self,
        req: Request<pb::CheckReadinessRequest>,
    ) -> Result<Response<pb::ReadinessReport>, Status> {
        let c = correlation_of(&req);
        let r = req.get_ref();
        let result = async {
            checked(r)?;
            let kind = match r.job_type.trim() {
                "live" => NetworkKind::Production,
                _ => NetworkKind::Test,
            };
            let deps = self.state.failover.as_ref().ok_or_else(|| {
                ApiError::precondition(
                    "NOT_CONFIGURED",
                    "CloudStack is not configured on this server: readiness cannot be checked",
                )
            })?;
            if self.state.inventory.vm_record(r.vm_id.trim()).await?.is_none() {
                return Err(ApiError::vm_not_found(r.vm_id.trim()));
            }
            let report = crate::steps::failover::readiness_for(deps, r.vm_id.trim(), kind)
                .await
                .map_err(|e| ApiError::Unavailable(format!("readiness of {}: {e}", r.vm_id)))?;
            Ok(convert::readiness(&report))
        }
        .await;
        reply(result, &c)
    }

    async fn upsert_vm(&self, req: Request<pb::UpsertVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let c = correlation_of(&req);
        let result = async {
            checked(req.get_ref())?;
            let vm = req
                .get_ref()
                .vm
                .as_ref()
                .ok_or_else(|| ApiError::field("vm", "is required"))?;
            let record = convert::vm_record(vm).map_err(|(f, why)| ApiError::field(&format!("vm.{f}"), why))?;
            let others = self.state.inventory.vm_records().await?;
            if let Some((f, why)) = record.shares_a_volume_with(&others) {
                return Err(ApiError::field(&format!("vm.{f}"), why));
            }
            self.state.inventory.upsert_vm_record(&record, Timestamp::now()).await?;
            Ok(convert::vm(&record))
        }
        .await;
        reply(result, &c)
    }

    async fn get_vm(&self, req: Request<pb::GetVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let c = correlation_of(&req);
        let id = req.get_ref().vm_id.trim().to_string();
        let result = async {
            checked(req.get_ref())?;
            let vm = self
                .state
                .inventory
                .vm_record(&id)
                .await?
                .ok_or_else(|| ApiError::vm_not_found(&id))?;
            Ok(convert::vm(&vm))
        }
        .await;
        reply(result, &c)
    }

    async fn list_vms(&self, req: Request<pb::ListVmsRequest>) -> Result<Response<pb::ListVmsResponse>, Status> {
        let c = correlation_of(&req);
        let r = req.get_ref();
        let result = async {
            checked(r)?;
            let page = Page::of(r.page_size, "")?;
            let mut vms = self
                .state
                .inventory
                .vm_records_after(r.page_token.trim(), page.limit())
                .await?;
            let next_page_token = page.cut(&mut vms, |vm| vm.vm_id.clone());
            Ok(pb::ListVmsResponse {
                vms: vms.iter().map(convert::vm).collect(),
                next_page_token,
            })
        }
        .await;
        reply(result, &c)
    }

    async fn set_network_mappings(
        &self,
        req: Request<pb::SetNetworkMappingsRequest>,
    ) -> Result<Response<pb::NetworkMappings>, Status> {
        let c = correlation_of(&req);
        let r = req.get_ref();
        let result = async {
            checked(r)?;
            let vm_id = r.vm_id.trim();
            let kind = convert::network_kind(r.kind.trim()).ok_or_else(|| ApiError::field("kind", "is not known"))?;
            if self.state.inventory.vm_record(vm_id).await?.is_none() {
                return Err(ApiError::vm_not_found(vm_id));
            }
            let mappings: Vec<_> = r
                .mappings
                .iter()
                .map(|m| crate::domain::inventory::NetworkMapping {
                    vm_id: vm_id.to_string(),
                    source_network: m.source_network.trim().to_string(),
                    destination_network_id: m.destination_network_id.trim().to_string(),
                    kind,
                })
                .collect();
            self.state
                .inventory
                .set_network_mappings(vm_id, kind, &mappings)
                .await?;
            let all = self.state.inventory.network_mappings(vm_id).await?;
            Ok(pb::NetworkMappings {
                vm_id: vm_id.to_string(),
                mappings: all.iter().map(convert::mapping).collect(),
            })
        }
        .await;
        reply(result, &c)
    }

    async fn get_network_mappings(
        &self,
        req: Request<pb::GetNetworkMappingsRequest>,
    ) -> Result<Response<pb::NetworkMappings>, Status> {
        let c = correlation_of(&req);
        let vm_id = req.get_ref().vm_id.trim().to_string();
        let result = async {
            checked(req.get_ref())?;
            if self.state.inventory.vm_record(&vm_id).await?.is_none() {
                return Err(ApiError::vm_not_found(&vm_id));
            }
            let all = self.state.inventory.network_mappings(&vm_id).await?;
            Ok(pb::NetworkMappings {
                vm_id,
                mappings: all.iter().map(convert::mapping).collect(),
            })
        }
        .await;
        reply(result, &c)
    }
}
