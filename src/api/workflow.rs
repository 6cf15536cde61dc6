//! `tern.v1.WorkflowService`: the generic engine. Any definition the server carries can be
//! submitted, read, listed, watched, signalled and cancelled.

use tonic::{Request, Response, Status};

use super::auth::caller;
use super::convert;
use super::error::{ApiError, ApiResult};
use super::failover::run_id;
use super::page::Page;
use super::pb;
use super::pb::workflow_service_server::WorkflowService;
use super::validate::checked;
use super::watch::{watch, WatchStream};
use super::{correlation_of, reply, reply_own, respond, ApiState};
use crate::domain::run::RunStatus;
use crate::domain::RunId;
use crate::engine::{EngineError, SubmitRequest};
use crate::store::{RunFilter, RunRow, SignalOutcome, Submitted};

pub struct WorkflowApi {
    state: ApiState,
}

impl WorkflowApi {
    pub fn new(state: ApiState) -> WorkflowApi {
        WorkflowApi { state }
    }

    async fn run(&self, id: RunId) -> ApiResult<RunRow> {
        self.state.engine.get_run(id).await?.ok_or_else(|| ApiError::NotFound {
            reason: "RUN_NOT_FOUND",
            message: format!("run {id} not found"),
        })
    }

    async fn view(&self, run: &RunRow, created: bool) -> ApiResult<pb::Workflow> {
        let def = self.state.engine.pinned(&run.definition_hash).await?;
        // Up to the row's last_seq: the steps match the row's state even if the run moved on since.
        let journal = self
            .state
            .engine
            .journal(run.id, 0, run.last_seq.clamp(0, u32::MAX as i64) as u32)
            .await?;
        Ok(convert::workflow(run, &def, &journal, created))
    }

    /// The view of a submit's run: a run it created is shown from the entries the submit
    /// committed, with no read.
    async fn view_submitted(&self, s: &Submitted) -> ApiResult<pb::Workflow> {
        match s.journal.last() {
            Some(last) if s.created && last.seq == s.run.last_seq => {
                let def = self.state.engine.pinned(&s.run.definition_hash).await?;
                Ok(convert::workflow(&s.run, &def, &s.journal, true))
            }
            _ => self.view(&s.run, s.created).await,
        }
    }

    fn outcome(id: RunId, o: SignalOutcome) -> ApiResult<pb::SignalOutcome> {
        match o {
            SignalOutcome::Accepted => Ok(pb::SignalOutcome {
                outcome: "accepted".into(),
            }),
            SignalOutcome::Duplicate => Ok(pb::SignalOutcome {
                outcome: "duplicate".into(),
            }),
            SignalOutcome::Finished(s) => Err(ApiError::precondition(
                "RUN_FINISHED",
                format!("run {id} is already {}", s.as_str()),
            )),
        }
    }
}

#[tonic::async_trait]
impl WorkflowService for WorkflowApi {
    async fn submit_workflow(&self, req: Request<pb::SubmitWorkflowRequest>) -> Result<Response<pb::Workflow>, Status> {
        let c = correlation_of(&req);
        let r = req.get_ref();
        let result = async {
            checked(r)?;
            let input: serde_json::Value = match r.input_json.trim() {
                "" => serde_json::json!({}),
                text => serde_json::from_str(text)
                    .map_err(|e| ApiError::field("input_json", format!("not valid JSON: {e}")))?,
            };
            if !input.is_object() {
                return Err(ApiError::field("input_json", "must be a JSON object"));
            }
            let definition = r.definition.trim();
            let request_id = Some(r.request_id.trim().to_string()).filter(|s| !s.is_empty());
            let s = self
                .state
                .engine
                .submit(SubmitRequest {
                    definition: definition.to_string(),
                    input: input.clone(),
                    request_id: request_id.clone(),
                    correlation_id: Some(c.clone()),
                    by: caller(&req),
                })
                .await
                .map_err(|e| match e {
                    // The input's fields, as the request names them.
                    EngineError::InvalidInput(problems) => ApiError::InvalidArgument(
                        problems
                            .into_iter()
                            .map(|(f, why)| match f.strip_prefix("input") {
                                Some(rest) if rest.is_empty() || rest.starts_with(['.', '[']) => {
                                    (format!("input_json{rest}"), why)
                                }
                                _ => (format!("input_json.{f}"), why),
                            })
                            .collect(),
                    ),
                    e => e.into(),
                })?;
            if let (false, Some(request_id)) = (s.created, &request_id) {
                super::same_request(request_id, &s.run, definition, &input, "run", &[])?;
            }
            self.view_submitted(&s).await
        }
        .await;
        reply_own(result, &c)
    }

    async fn get_workflow(&self, req: Request<pb::GetWorkflowRequest>) -> Result<Response<pb::Workflow>, Status> {
        let c = correlation_of(&req);
        let result = async {
            checked(req.get_ref())?;
            let run = self.run(run_id("run_id", &req.get_ref().run_id)?).await?;
            self.view(&run, true).await
        }
        .await;
        reply_own(result, &c)
    }

    async fn list_workflows(
        &self,
        req: Request<pb::ListWorkflowsRequest>,
    ) -> Result<Response<pb::ListWorkflowsResponse>, Status> {
        let c = correlation_of(&req);
        let r = req.get_ref();
        let result = async {
            checked(r)?;
            let page = Page::of(r.page_size, &r.page_token)?;
            let status = RunStatus::parse(r.status.trim());
            let mut rows = self
                .state
                .engine
                .list_runs(&RunFilter {
                    status,
                    definition: Some(r.definition.trim().to_string()).filter(|s| !s.is_empty()),
                    before: page.before,
                    limit: page.limit(),
                })
                .await?;
            let next_page_token = page.cut(&mut rows, |run| run.id.to_string());
            let mut workflows = Vec::with_capacity(rows.len());
            for run in &rows {
                let mut w = self.view(run, true).await?;
                w.steps.clear();
                w.context_json.clear();
                workflows.push(w);
            }
            Ok(pb::ListWorkflowsResponse {
                workflows,
                next_page_token,
            })
        }
        .await;
        reply(result, &c)
    }

    type WatchWorkflowStream = WatchStream;

    async fn watch_workflow(&self, req: Request<pb::WatchWorkflowRequest>) -> Result<Response<WatchStream>, Status> {
        let c = correlation_of(&req);
        let r = req.get_ref();
        let result = async {
            checked(r)?;
            let id = run_id("run_id", &r.run_id)?;
            // A run executing here exists: its correlation id is known without a read.
            let correlation_id = match self.state.engine.executing_correlation_id(id) {
                Some(correlation_id) => correlation_id.to_string(),
                None => self.run(id).await?.correlation_id,
            };
            Ok::<_, ApiError>((id, correlation_id, self.state.watches.take()?))
        }
        .await;
        match result {
            Ok((id, correlation_id, slot)) => Ok(respond(
                watch(self.state.engine.clone(), id, r.after_sequence, c, slot),
                &correlation_id,
            )),
            Err(e) => Err(e.into_status(&c)),
        }
    }

    async fn signal_workflow(
        &self,
        req: Request<pb::SignalWorkflowRequest>,
    ) -> Result<Response<pb::SignalOutcome>, Status> {
        let c = correlation_of(&req);
        let r = req.get_ref();
        let result = async {
            checked(r)?;
            let id = run_id("run_id", &r.run_id)?;
            let o = self
                .state
                .engine
                .signal_as(id, r.name.trim(), caller(&req).as_deref())
                .await?;
            Self::outcome(id, o)
        }
        .await;
        reply(result, &c)
    }

    async fn cancel_workflow(
        &self,
        req: Request<pb::CancelWorkflowRequest>,
    ) -> Result<Response<pb::SignalOutcome>, Status> {
        let c = correlation_of(&req);
        let r = req.get_ref();
        let result = async {
            checked(r)?;
            let id = run_id("run_id", &r.run_id)?;
            let reason = match r.reason.trim() {
                "" => "cancelled through the API",
                s => s,
            };
            let o = self.state.engine.cancel_as(id, reason, caller(&req).as_deref()).await?;
            Self::outcome(id, o)
        }
        .await;
        reply(result, &c)
    }

    async fn list_definitions(
        &self,
        req: Request<pb::ListDefinitionsRequest>,
    ) -> Result<Response<pb::ListDefinitionsResponse>, Status> {
        let c = correlation_of(&req);
        let definitions = self
            .state
            .engine
            .catalog
            .all()
            .map(|d| pb::Definition {
                name: d.name.clone(),
                description: d.description.clone(),
                job_type: d.job_type.clone(),
                hash: d.hash.clone(),
                steps: d.steps.iter().map(|s| s.name.clone()).collect(),
                has_hold: d.hold.is_some(),
                teardown: d.teardown.iter().map(|s| s.name.clone()).collect(),
            })
            .collect();
        Ok(respond(pb::ListDefinitionsResponse { definitions }, &c))
    }
}
