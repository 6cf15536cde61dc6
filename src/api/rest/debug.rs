//! `/api/v1/debug/*`: health (anyone, as gRPC health), and for viewers the jobs in detail, the
//! endpoints and the process's recent log lines.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::envelope::{Envelope, ErrorBody, Query, Reply, RestError};
use super::views::JobView;
use super::{Caller, Rest};
use crate::api::pb;
use crate::domain::auth::Role;
use crate::telemetry::ring;

pub(super) fn routes() -> OpenApiRouter<Rest> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(failover_jobs))
        .routes(routes!(endpoints))
        .routes(routes!(logs))
        .routes(routes!(whoami))
}

/// Who the caller is, as the server sees it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Whoami {
    /// The principal's name (empty without authentication).
    pub name: String,
    /// viewer, operator or admin (admin without authentication: everyone may do everything).
    pub role: String,
    /// Whether the server authenticates its callers.
    pub authenticated: bool,
}

/// The caller's principal and role (what the console shows, and which actions it offers).
#[utoipa::path(get, path = "/api/v1/whoami", tag = "debug",
    responses((status = 200, body = inline(Envelope<Whoami>)), (status = 401, description = "UNAUTHENTICATED", body = ErrorBody)))]
async fn whoami(State(rest): State<Rest>, caller: Caller) -> Result<Reply<Envelope<Whoami>>, RestError> {
    let me = match caller.check(&rest.auth, Role::Viewer, "whoami").await? {
        Some(p) => Whoami {
            name: p.name,
            role: p.role.to_string(),
            authenticated: true,
        },
        None => Whoami {
            name: String::new(),
            role: Role::Admin.to_string(),
            authenticated: false,
        },
    };
    Ok(Reply {
        body: Envelope::new("The caller", me),
        correlation_id: None,
    })
}

/// The server's health.
#[derive(Serialize, utoipa::ToSchema)]
pub struct HealthReply {
    /// Whether the server can serve (its database answers).
    pub success: bool,
    /// healthy or unhealthy.
    pub status: String,
    /// Each gRPC health service: "" (the server, following the database), tern.cloud
    /// (CloudStack answers), tern.alive; SERVING, NOT_SERVING or UNKNOWN.
    pub services: BTreeMap<String, String>,
    pub version: String,
}

/// Health as gRPC health reports it: 200 while the database answers, else 503.
#[utoipa::path(get, path = "/api/v1/debug/health", tag = "debug", security(()),
    responses((status = 200, body = HealthReply), (status = 503, description = "The database does not answer", body = HealthReply)))]
async fn health(State(rest): State<Rest>, caller: Caller) -> axum::response::Response {
    let mut client = HealthClient::new(rest.grpc.clone());
    let mut services = BTreeMap::new();
    for service in ["", crate::api::health::CLOUD, crate::api::health::ALIVE] {
        let status = match client
            .check(caller.request(HealthCheckRequest {
                service: service.to_string(),
            }))
            .await
        {
            Ok(r) => ServingStatus::try_from(r.into_inner().status).unwrap_or(ServingStatus::Unknown),
            Err(_) => ServingStatus::Unknown,
        };
        services.insert(service.to_string(), status.as_str_name().to_string());
    }
    let serving = services
        .get("")
        .is_some_and(|s| s == ServingStatus::Serving.as_str_name());
    let reply = HealthReply {
        success: serving,
        status: if serving { "healthy" } else { "unhealthy" }.into(),
        services,
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let code = if serving {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(reply)).into_response()
}

/// The recent jobs, counted by status, and the unfinished ones in detail.
#[derive(Serialize, utoipa::ToSchema)]
pub struct JobsDebug {
    /// Over the newest `examined` jobs.
    pub by_status: BTreeMap<String, usize>,
    pub examined: usize,
    /// needs_operator first, then the others not finished, each with its steps.
    pub unfinished: Vec<JobView>,
}

/// How many recent jobs the debug view reads.
const EXAMINED: usize = 500;

/// The newest jobs counted by status; the unfinished ones (needs_operator first) with steps.
#[utoipa::path(get, path = "/api/v1/debug/failover-jobs", tag = "debug",
    responses((status = 200, body = inline(Envelope<JobsDebug>)), (status = 403, description = "PERMISSION_DENIED", body = ErrorBody)))]
async fn failover_jobs(State(rest): State<Rest>, caller: Caller) -> Result<Reply<Envelope<JobsDebug>>, RestError> {
    let mut by_status = BTreeMap::new();
    let mut unfinished = Vec::new();
    let mut examined = 0;
    let mut page_token = String::new();
    while examined < EXAMINED {
        let msg = pb::ListFailoversRequest {
            page_size: 100,
            page_token,
            ..Default::default()
        };
        let page = rest.failover().list_failovers(caller.request(msg)).await?.into_inner();
        for job in page.jobs {
            examined += 1;
            *by_status.entry(job.status.clone()).or_insert(0) += 1;
            if !["completed", "failed", "cancelled", "resolved"].contains(&job.status.as_str()) {
                let full = rest
                    .failover()
                    .get_failover(caller.request(pb::GetFailoverRequest { job_id: job.job_id }))
                    .await?
                    .into_inner();
                unfinished.push(JobView::from(full));
            }
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    unfinished.sort_by_key(|j| j.status != "needs_operator");
    let data = JobsDebug {
        by_status,
        examined,
        unfinished,
    };
    Ok(Reply {
        body: Envelope::new("Failover jobs", data),
        correlation_id: None,
    })
}

/// One route of this API.
#[derive(Serialize, utoipa::ToSchema)]
pub struct EndpointView {
    pub method: String,
    pub path: String,
    pub summary: String,
}

/// Every route of this API (the OpenAPI document has them in full).
#[utoipa::path(get, path = "/api/v1/debug/endpoints", tag = "debug",
    responses((status = 200, body = inline(Envelope<Vec<EndpointView>>)), (status = 403, description = "PERMISSION_DENIED", body = ErrorBody)))]
async fn endpoints(State(rest): State<Rest>, caller: Caller) -> Result<Reply<Envelope<Vec<EndpointView>>>, RestError> {
    caller.check(&rest.auth, Role::Viewer, "the endpoint list").await?;
    let mut list = Vec::new();
    for (path, item) in &rest.openapi.paths.paths {
        let ops = [
            ("GET", &item.get),
            ("POST", &item.post),
            ("PUT", &item.put),
            ("DELETE", &item.delete),
            ("PATCH", &item.patch),
        ];
        for (method, op) in ops {
            if let Some(op) = op {
                list.push(EndpointView {
                    method: method.into(),
                    path: path.clone(),
                    summary: op.summary.clone().unwrap_or_default(),
                });
            }
        }
    }
    Ok(Reply {
        body: Envelope::new(format!("{} endpoints", list.len()), list),
        correlation_id: None,
    })
}

/// `?lines=` of the log view.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(default, deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// How many of the last lines (default 200, at most 2000).
    pub lines: usize,
}

impl Default for LogsQuery {
    fn default() -> LogsQuery {
        LogsQuery { lines: 200 }
    }
}

/// The process's last log lines (JSON objects, oldest first).
///
/// What `RUST_LOG` lets through (default: info), at most the last 2000 lines, kept in memory
/// only; secrets never reach the log.
#[utoipa::path(get, path = "/api/v1/debug/logs", tag = "debug", params(LogsQuery),
    responses((status = 200, body = inline(Envelope<Vec<Object>>)), (status = 403, description = "PERMISSION_DENIED", body = ErrorBody)))]
async fn logs(
    State(rest): State<Rest>,
    caller: Caller,
    Query(q): Query<LogsQuery>,
) -> Result<Reply<Envelope<Vec<Value>>>, RestError> {
    caller.check(&rest.auth, Role::Viewer, "the logs").await?;
    let lines: Vec<Value> = ring::Ring::global()
        .last(q.lines.min(ring::CAPACITY))
        .into_iter()
        .map(|l| serde_json::from_str(&l).unwrap_or(Value::String(l)))
        .collect();
    Ok(Reply {
        body: Envelope::new(format!("{} lines", lines.len()), lines),
        correlation_id: None,
    })
}
