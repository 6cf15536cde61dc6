//! The client commands of the `tern` binary: they talk gRPC to a `tern server` (or `tern dev`)
//! at `--endpoint`, print readable tables (or `--json`), and fail with a one-line reason.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::{json, Value};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;
use tonic_types::StatusExt;

use tern::api::pb;
use tern::api::pb::failover_service_client::FailoverServiceClient;
use tern::api::pb::watch_event::Event;
use tern::api::pb::workflow_service_client::WorkflowServiceClient;

/// The failover commands (gRPC clients of `tern server`).
#[derive(Subcommand, Debug, Clone)]
pub enum ClientCommand {
    /// Start a test failover of a VM (by its VMware UUID); print the job id.
    TestFailover {
        vm: String,
        /// How long the test runs before auto-cleanup, e.g. 30m, 2h.
        #[arg(long)]
        duration: Option<String>,
        /// Tear down by itself after --duration.
        #[arg(long)]
        auto_cleanup: bool,
        #[command(flatten)]
        opts: StartOpts,
    },
    /// Start a live (permanent) failover of a VM; print the job id.
    LiveFailover {
        vm: String,
        #[command(flatten)]
        opts: StartOpts,
    },
    /// End a test failover's test now: the teardown starts (idempotent).
    EndTest { job: String },
    /// Cancel a failover: stop and roll back (idempotent).
    Cancel {
        job: String,
        #[arg(long, default_value = "cancelled by operator")]
        reason: String,
    },
    /// Resolve a job that needs an operator, once `tern admin recover JOB` shows nothing left
    /// to do: the server checks the cloud first. Frees the VM for the next failover.
    Resolve {
        job: String,
        /// What was checked or done (journaled).
        #[arg(long)]
        reason: String,
        /// Who resolves it (journaled); defaults to $USER@host.
        #[arg(long)]
        by: Option<String>,
        /// Resolve although the cloud still differs from the starting point (journaled).
        #[arg(long)]
        force: bool,
    },
    /// Show a failover job and its steps.
    Get {
        job: String,
        #[arg(long)]
        json: bool,
    },
    /// List failover jobs, newest first.
    List {
        /// User-visible status, e.g. testing, completed, failed.
        #[arg(long)]
        status: Option<String>,
        /// test or live.
        #[arg(long = "type")]
        job_type: Option<String>,
        #[arg(long)]
        vm: Option<String>,
        /// The most jobs to list, newest first (paged from the server 100 at a time).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Follow a job (any run) step by step until it ends, then print a summary.
    Watch { job: String },
    /// Check whether a VM is ready to fail over.
    Readiness {
        vm: String,
        /// Check the production (live) network mappings instead of the test ones.
        #[arg(long)]
        live: bool,
        #[arg(long)]
        json: bool,
    },
    /// Ask a server's gRPC health: exit 0 when SERVING (for container and load-balancer
    /// checks). SERVICE: "" (the server: its database), tern.cloud, or a gRPC service name.
    Health {
        #[arg(default_value = "")]
        service: String,
    },
}

#[derive(clap::Args, Debug, Clone)]
pub struct StartOpts {
    /// VM display name (default: the inventory's name).
    #[arg(long)]
    vm_name: Option<String>,
    #[arg(long)]
    skip_validation: bool,
    #[arg(long)]
    skip_snapshot: bool,
    #[arg(long)]
    skip_virtio_injection: bool,
    /// Network override SOURCE=DESTINATION_NETWORK_ID (repeatable).
    #[arg(long = "network", value_name = "SOURCE=DEST")]
    networks: Vec<String>,
    /// Idempotency key: repeating a command with it returns the same job.
    #[arg(long)]
    request_id: Option<String>,
    /// Follow the job until it ends (see `tern watch`).
    #[arg(long)]
    watch: bool,
    #[arg(long)]
    json: bool,
}

/// How the client commands reach the server: TLS for an `https://` endpoint (checked against
/// the system's roots, or `--ca`), a client certificate for mutual TLS, and the bearer token
/// from `TERN_TOKEN` or `TERN_TOKEN_FILE` (never a flag: it would show in `ps`).
#[derive(clap::Args, Clone, Debug)]
pub struct Connection {
    /// CA certificate (PEM) the server's certificate must chain to; default: the system's.
    #[arg(long, global = true, env = "TERN_CA", help_heading = "Connection to a server")]
    ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mutual TLS, with --key.
    #[arg(long, global = true, env = "TERN_CERT", help_heading = "Connection to a server")]
    cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, env = "TERN_KEY", help_heading = "Connection to a server")]
    key: Option<std::path::PathBuf>,
}

/// A channel to the server that sends the bearer token with every call.
pub(crate) type Conn = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <token>` to every request, when there is a token.
#[derive(Clone)]
pub(crate) struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Connects to `endpoint` as `c` says.
pub(crate) async fn connect(endpoint: &str, c: &Connection) -> Result<Conn> {
    let mut ep = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .with_context(|| format!("bad --endpoint {endpoint:?}"))?
        .connect_timeout(Duration::from_secs(5));
    let read =
        |flag: &str, p: &std::path::Path| std::fs::read(p).with_context(|| format!("reading {flag} {}", p.display()));
    if endpoint.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        tls = match &c.ca {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(read("--ca", ca)?)),
            None => tls.with_native_roots(),
        };
        match (&c.cert, &c.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(read("--cert", cert)?, read("--key", key)?))
            }
            (None, None) => {}
            _ => bail!("--cert and --key go together"),
        }
        ep = ep.tls_config(tls).context("the TLS settings (--ca, --cert, --key)")?;
    } else if c.ca.is_some() || c.cert.is_some() || c.key.is_some() {
        bail!("--ca, --cert and --key need an https:// endpoint (--endpoint {endpoint})");
    }
    let token = super::secret("TERN_TOKEN")?
        .map(|t| MetadataValue::try_from(format!("Bearer {}", t.trim())))
        .transpose()
        .map_err(|_| anyhow::anyhow!("TERN_TOKEN is not a token (it holds characters a header cannot)"))?;
    let channel = ep
        .connect()
        .await
        .with_context(|| format!("cannot reach the Tern server at {endpoint} (is `tern server` running?)"))?;
    Ok(InterceptedService::new(channel, Bearer(token)))
}

/// Runs a client command against `endpoint`.
pub async fn run(endpoint: &str, connection: &Connection, cmd: ClientCommand) -> Result<()> {
    super::quiet_on_broken_pipe();
    let channel = connect(endpoint, connection).await?;
    let mut fo = FailoverServiceClient::new(channel.clone());
    match cmd {
        ClientCommand::TestFailover {
            vm,
            duration,
            auto_cleanup,
            opts,
        } => {
            let req = pb::StartTestFailoverRequest {
                auto_cleanup,
                test_duration: duration.unwrap_or_default(),
                ..start_request(vm, &opts)?
            };
            let job = fo.start_test_failover(req).await.map_err(status_error)?.into_inner();
            started(&job, &opts, channel).await?;
        }
        ClientCommand::LiveFailover { vm, opts } => {
            let t = start_request(vm, &opts)?;
            let req = pb::StartLiveFailoverRequest {
                vm_id: t.vm_id,
                vm_name: t.vm_name,
                skip_validation: t.skip_validation,
                skip_snapshot: t.skip_snapshot,
                skip_virtio_injection: t.skip_virtio_injection,
                network_mappings: t.network_mappings,
                request_id: t.request_id,
                ..Default::default()
            };
            let job = fo.start_live_failover(req).await.map_err(status_error)?.into_inner();
            started(&job, &opts, channel).await?;
        }
        ClientCommand::EndTest { job } => {
            let j = fo
                .end_test_failover(pb::EndTestFailoverRequest { job_id: job })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("end-test sent: job {} is {}", j.job_id, j.status);
        }
        ClientCommand::Cancel { job, reason } => {
            let j = fo
                .cancel_failover(pb::CancelFailoverRequest { job_id: job, reason })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("cancel sent: job {} is {}", j.job_id, j.status);
        }
        ClientCommand::Resolve { job, reason, by, force } => {
            let j = fo
                .resolve_failover(pb::ResolveFailoverRequest {
                    job_id: job,
                    reason,
                    resolved_by: by.unwrap_or_else(operator_name),
                    force,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let forced = j.resolution.as_ref().is_some_and(|r| r.forced);
            println!(
                "resolved{}: job {} is {}; its VM is free",
                if forced { " (forced)" } else { "" },
                j.job_id,
                j.status
            );
        }
        ClientCommand::Get { job, json } => {
            let j = fo
                .get_failover(pb::GetFailoverRequest { job_id: job })
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                println!("{}", serde_json::to_string_pretty(&job_json(&j))?);
            } else {
                print_job(&j);
            }
        }
        ClientCommand::List {
            status,
            job_type,
            vm,
            limit,
            json,
        } => {
            // The server answers at most 100 a page: ask page after page up to the limit.
            let mut r = pb::ListFailoversResponse::default();
            loop {
                let want = limit.saturating_sub(r.jobs.len() as u32);
                let page = fo
                    .list_failovers(pb::ListFailoversRequest {
                        status: status.clone().unwrap_or_default(),
                        job_type: job_type.clone().unwrap_or_default(),
                        vm_id: vm.clone().unwrap_or_default(),
                        page_size: want.min(100),
                        page_token: r.next_page_token.clone(),
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                r.jobs.extend(page.jobs);
                r.next_page_token = page.next_page_token;
                if r.next_page_token.is_empty() || r.jobs.len() as u32 >= limit {
                    break;
                }
            }
            if json {
                let jobs: Vec<Value> = r.jobs.iter().map(job_json).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({"jobs": jobs, "next_page_token": r.next_page_token}))?
                );
            } else {
                super::print_table(
                    &["job", "type", "vm", "status", "%", "step", "created"],
                    &[4],
                    r.jobs.iter().map(|j| {
                        vec![
                            j.job_id.clone(),
                            j.job_type.clone(),
                            if j.vm_name.is_empty() { &j.vm_id } else { &j.vm_name }.clone(),
                            j.status.clone(),
                            format!("{}%", j.progress_percent),
                            dash(&j.current_step).to_string(),
                            time(&j.created_at),
                        ]
                    }),
                );
                if !r.next_page_token.is_empty() {
                    println!("(more jobs: raise --limit)");
                }
            }
        }
        ClientCommand::Watch { job } => watch(channel, &job).await?,
        ClientCommand::Health { service } => {
            use tonic_health::pb::health_check_response::ServingStatus;
            let r = tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let status = ServingStatus::try_from(r.status).unwrap_or(ServingStatus::Unknown);
            println!("{}", status.as_str_name());
            if status != ServingStatus::Serving {
                bail!(
                    "{} is {}",
                    if service.is_empty() { "the server" } else { &service },
                    status.as_str_name()
                );
            }
        }
        ClientCommand::Readiness { vm, live, json } => {
            let r = fo
                .check_readiness(pb::CheckReadinessRequest {
                    vm_id: vm,
                    job_type: if live { "live" } else { "test" }.into(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                let checks: Vec<Value> = r
                    .checks
                    .iter()
                    .map(|c| {
                        json!({"check_name": c.check_name, "check_type": c.check_type, "status": c.status,
                               "message": c.message,
                               "details": serde_json::from_str::<Value>(&c.details_json).unwrap_or(Value::Null)})
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({"vm_id": r.vm_id, "is_ready": r.is_ready,
                        "readiness_score": r.readiness_score, "checks": checks}))?
                );
            } else {
                println!(
                    "VM {}: {} (score {:.0})",
                    r.vm_id,
                    if r.is_ready { "ready" } else { "NOT ready" },
                    r.readiness_score
                );
                super::print_table(
                    &["check", "type", "", "message"],
                    &[],
                    r.checks.iter().map(|c| {
                        vec![
                            c.check_name.clone(),
                            c.check_type.clone(),
                            c.status.clone(),
                            c.message.clone(),
                        ]
                    }),
                );
                if !r.is_ready {
                    bail!("VM {} is not ready to fail over", r.vm_id);
                }
            }
        }
    }
    Ok(())
}

/// The fields a test and a live failover request share, as a test request.
fn start_request(vm: String, opts: &StartOpts) -> Result<pb::StartTestFailoverRequest> {
    Ok(pb::StartTestFailoverRequest {
        vm_id: vm,
        vm_name: opts.vm_name.clone().unwrap_or_default(),
        skip_validation: opts.skip_validation,
        skip_snapshot: opts.skip_snapshot,
        skip_virtio_injection: opts.skip_virtio_injection,
        network_mappings: networks(&opts.networks)?,
        request_id: opts.request_id.clone().unwrap_or_default(),
        ..Default::default()
    })
}

fn networks(pairs: &[String]) -> Result<std::collections::HashMap<String, String>> {
    pairs
        .iter()
        .map(|p| match p.split_once('=') {
            Some((s, d)) if !s.trim().is_empty() && !d.trim().is_empty() => {
                Ok((s.trim().to_string(), d.trim().to_string()))
            }
            _ => bail!("--network {p:?}: expected SOURCE=DESTINATION_NETWORK_ID"),
        })
        .collect()
}

async fn started(job: &pb::FailoverJob, opts: &StartOpts, channel: Conn) -> Result<()> {
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&job_json(job))?);
    } else if job.created {
        println!("{}", job.job_id);
        eprintln!(
            "{} failover of {} started (correlation id {})",
            job.job_type, job.vm_name, job.correlation_id
        );
    } else {
        println!("{}", job.job_id);
        eprintln!("existing job for this request id: {}", job.status);
    }
    if opts.watch {
        watch(channel, &job.job_id).await?;
    }
    Ok(())
}

/// Who runs this command, for the journal: $USER@host.
fn operator_name() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{user}@{host}")
}

/// A gRPC error as one line: the message, the machine code and any field problems.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    let d = s.get_error_details();
    let reason = d.error_info().map(|i| i.reason.clone()).unwrap_or_default();
    let fields: Vec<String> = d
        .bad_request()
        .map(|b| {
            b.field_violations
                .iter()
                .map(|v| format!("{}: {}", v.field, v.description))
                .collect()
        })
        .unwrap_or_default();
    let mut line = match s.code() {
        Code::Unavailable if reason.is_empty() => format!("server unavailable: {}", s.message()),
        _ => s.message().to_string(),
    };
    if !fields.is_empty() && !line.contains(&fields[0]) {
        line = format!("{line} ({})", fields.join("; "));
    }
    if !reason.is_empty() {
        line = format!("{line} [{reason}]");
    }
    anyhow::anyhow!(line)
}

fn dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

fn time(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .map(|t| tern::api::convert::from_timestamp(t).to_rfc3339())
        .unwrap_or_else(|| "-".into())
}

fn job_json(j: &pb::FailoverJob) -> Value {
    let steps: Vec<Value> = j
        .steps
        .iter()
        .map(|s| {
            json!({"name": s.name, "phase": s.phase, "status": s.status, "attempt": s.attempt,
                   "started_at": s.started_at.as_ref().map(|_| time(&s.started_at)),
                   "completed_at": s.completed_at.as_ref().map(|_| time(&s.completed_at)),
                   "error": s.error.as_ref().map(|e| json!({"code": e.code, "message": e.message}))})
        })
        .collect();
    let opt = |t: &Option<prost_types::Timestamp>| t.as_ref().map(|_| time(t));
    json!({
        "job_id": j.job_id, "vm_id": j.vm_id, "vm_name": j.vm_name, "job_type": j.job_type,
        "status": j.status, "run_status": j.run_status, "progress_percent": j.progress_percent,
        "current_step": j.current_step, "steps": steps, "snapshot_name": j.snapshot_name,
        "destination_vm_id": j.destination_vm_id, "correlation_id": j.correlation_id,
        "created_at": opt(&j.created_at), "started_at": opt(&j.started_at),
        "completed_at": opt(&j.completed_at), "cleanup_at": opt(&j.cleanup_at),
        "error": j.error.as_ref().map(|e| json!({"code": e.code, "message": e.message})),
    })
}

fn print_job(j: &pb::FailoverJob) {
    println!("job          {}", j.job_id);
    println!("vm           {} ({})", dash(&j.vm_name), j.vm_id);
    println!("type         {}", j.job_type);
    println!("status       {} ({}), {}%", j.status, j.run_status, j.progress_percent);
    println!("step         {}", dash(&j.current_step));
    println!("snapshot     {}", dash(&j.snapshot_name));
    println!("target VM    {}", dash(&j.destination_vm_id));
    println!("correlation  {}", j.correlation_id);
    println!("created      {}", time(&j.created_at));
    println!("started      {}", time(&j.started_at));
    println!("completed    {}", time(&j.completed_at));
    if j.cleanup_at.is_some() {
        println!("cleanup at   {}", time(&j.cleanup_at));
    }
    if let Some(e) = &j.error {
        println!("error        {}: {}", e.code, e.message);
    }
    println!();
    super::print_table(
        &["step", "phase", "status", "attempt", "started", "completed", "error"],
        &[3],
        j.steps.iter().map(|s| {
            vec![
                s.name.clone(),
                s.phase.clone(),
                s.status.clone(),
                s.attempt.to_string(),
                time(&s.started_at),
                time(&s.completed_at),
                s.error
                    .as_ref()
                    .map(|e| format!("{}: {}", e.code, e.message))
                    .unwrap_or_default(),
            ]
        }),
    );
}

/// One line per journal entry worth showing.
fn describe(e: &pb::JournalEntry) -> Option<String> {
    let rec: Value = serde_json::from_str(&e.record_json).unwrap_or(Value::Null);
    let err = || {
        rec.get("error")
            .map(|x| {
                format!(
                    "{}: {}",
                    x.get("code").and_then(Value::as_str).unwrap_or(""),
                    x.get("message").and_then(Value::as_str).unwrap_or("")
                )
            })
            .unwrap_or_default()
    };
    let what = match e.kind.as_str() {
        "run_submitted" => "submitted".to_string(),
        "step_started" if e.attempt > 1 => format!("{} ({}) started, attempt {}", e.step, e.phase, e.attempt),
        "step_started" => format!("{} ({}) started", e.step, e.phase),
        "step_succeeded" => format!("{} done", e.step),
        "step_skipped" => format!("{} skipped", e.step),
        "step_retry_scheduled" => format!("{} attempt {} failed, will retry: {}", e.step, e.attempt, err()),
        "step_failed" => format!("{} FAILED: {}", e.step, err()),
        "compensation_started" => format!("undoing {} (attempt {})", e.step, e.attempt),
        "compensation_succeeded" => format!("undid {}", e.step),
        "compensation_failed" => format!("undo of {} failed: {}", e.step, err()),
        "timer_set" => format!(
            "holding; auto-cleanup at {}",
            rec.get("at")
                .and_then(Value::as_i64)
                .map(|ms| tern::domain::Timestamp(ms).to_rfc3339())
                .unwrap_or_default()
        ),
        "timer_fired" => "hold timer fired".into(),
        "signal_received" => format!(
            "signal {} received",
            rec.get("name").and_then(Value::as_str).unwrap_or("")
        ),
        "cancel_requested" => format!(
            "cancel requested: {}",
            rec.get("reason").and_then(Value::as_str).unwrap_or("")
        ),
        "run_finished" => format!("finished: {}", rec.get("status").and_then(Value::as_str).unwrap_or("")),
        _ => return None,
    };
    Some(format!("{}  #{:<4} {what}", time(&e.at), e.sequence))
}

/// Follows a run to its end, reconnecting (from the last sequence seen) if the stream breaks.
async fn watch(channel: Conn, job: &str) -> Result<()> {
    let mut wf = WorkflowServiceClient::new(channel.clone());
    let mut last = 0i64;
    let mut failures = 0;
    let terminal = loop {
        let stream = wf
            .watch_workflow(pb::WatchWorkflowRequest {
                run_id: job.to_string(),
                after_sequence: last,
            })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == Code::Unavailable && failures < 10 => {
                failures += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(s) => return Err(status_error(s)),
        };
        let mut done = None;
        loop {
            match stream.message().await {
                Ok(Some(ev)) => match ev.event {
                    Some(Event::Entry(e)) => {
                        last = e.sequence;
                        failures = 0;
                        if let Some(line) = describe(&e) {
                            println!("{line}");
                        }
                    }
                    Some(Event::Terminal(t)) => {
                        done = Some(t);
                        break;
                    }
                    None => {}
                },
                Ok(None) => break,
                Err(s) if failures < 10 => {
                    failures += 1;
                    eprintln!("(stream interrupted: {}; resuming after #{last})", s.message());
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
                Err(s) => return Err(status_error(s)),
            }
        }
        if let Some(t) = done {
            break t;
        }
    };
    println!();
    let mut fo = FailoverServiceClient::new(channel);
    match fo
        .get_failover(pb::GetFailoverRequest {
            job_id: job.to_string(),
        })
        .await
    {
        Ok(j) => print_job(&j.into_inner()),
        Err(_) => {
            let w = wf
                .get_workflow(pb::GetWorkflowRequest {
                    run_id: job.to_string(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("run {} ({}) {}", w.run_id, w.definition, w.status);
        }
    }
    match (terminal.status.as_str(), terminal.error) {
        ("completed", _) => Ok(()),
        (status, Some(e)) => bail!("job {job} ended {status}: {}: {}", e.code, e.message),
        (status, None) => bail!("job {job} ended {status}"),
    }
}
