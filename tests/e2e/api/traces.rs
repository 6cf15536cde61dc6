//! One trace per run, across processes: a client's `traceparent` continues into the call that
//! starts a test failover; the server that took it (exporting over OTLP/HTTP) is SIGKILLed
//! while a step is in flight; a second server (exporting over OTLP/gRPC) resumes that step and
//! finishes the run; every step span of both joins the client's trace. The collector is this
//! test's own (both protocols).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tern::api::pb;
use tern::api::pb::failover_service_client::FailoverServiceClient;
use tern::domain::RunId;

use crate::common::{self, TestDb};

/// A span as received, with the `service.name` of the process that sent it.
#[derive(Clone, Debug)]
pub(super) struct Received {
    pub(super) service: String,
    /// `service.instance.id`, when the process names one.
    pub(super) instance: Option<String>,
    pub(super) span: Span,
}

impl Received {
    pub(super) fn attr(&self, key: &str) -> Option<String> {
        attr(&self.span.attributes, key)
    }
}

fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            AnyValue::StringValue(s) => s.clone(),
            AnyValue::IntValue(i) => i.to_string(),
            AnyValue::BoolValue(b) => b.to_string(),
            AnyValue::DoubleValue(d) => d.to_string(),
            other => format!("{other:?}"),
        })
}

#[derive(Clone, Default)]
pub(super) struct Collector(Arc<Mutex<Vec<Received>>>);

impl Collector {
    fn add(&self, req: ExportTraceServiceRequest) {
        let mut all = self.0.lock().unwrap();
        for rs in req.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| attr(&r.attributes, "service.name"))
                .unwrap_or_default();
            let instance = rs
                .resource
                .as_ref()
                .and_then(|r| attr(&r.attributes, "service.instance.id"));
            for ss in rs.scope_spans {
                for span in ss.spans {
                    all.push(Received {
                        service: service.clone(),
                        instance: instance.clone(),
                        span,
                    });
                }
            }
        }
    }

    pub(super) fn spans(&self) -> Vec<Received> {
        self.0.lock().unwrap().clone()
    }

    /// Waits until a span matching `want` has arrived.
    pub(super) async fn until(&self, what: &str, want: impl Fn(&Received) -> bool) -> Received {
        for _ in 0..600 {
            if let Some(s) = self.spans().into_iter().find(|s| want(s)) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let names: Vec<String> = self
            .spans()
            .iter()
            .map(|s| format!("{}/{}:{}", s.service, s.instance.as_deref().unwrap_or("-"), s.span.name))
            .collect();
        panic!("no span {what} arrived; received: {names:?}");
    }

    /// Serves OTLP/gRPC and OTLP/HTTP on 127.0.0.1; their base URLs.
    pub(super) async fn serve(&self) -> (String, String) {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_addr = grpc.local_addr().unwrap();
        let svc = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc)),
        );
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_addr = http.local_addr().unwrap();
        let me = self.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let me = me.clone();
                async move {
                    match ExportTraceServiceRequest::decode(body) {
                        Ok(req) => {
                            me.add(req);
                            (
                                axum::http::StatusCode::OK,
                                [("content-type", "application/x-protobuf")],
                                ExportTraceServiceResponse::default().encode_to_vec(),
                            )
                        }
                        Err(_) => (
                            axum::http::StatusCode::BAD_REQUEST,
                            [("content-type", "text/plain")],
                            b"not an ExportTraceServiceRequest".to_vec(),
                        ),
                    }
                }
            }),
        );
        tokio::spawn(async move { axum::serve(http, app).await });
        (format!("http://{grpc_addr}"), format!("http://{http_addr}"))
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.add(req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

const SECRET_KEY: &str = "sim-secret-for-traces-9c41";

/// A server whose hung cloud request is waited out, not timed out (the step stays in flight
/// until the kill), exporting its spans as `otel` says.
fn server(
    db: &TestDb,
    sim: &common::Sim,
    defs: &std::path::Path,
    port: u16,
    log: &std::path::Path,
    otel: &[(&str, &str)],
) -> tokio::process::Child {
    let env = [
        ("TERN_CLOUDSTACK_SECRET_KEY", SECRET_KEY),
        ("TERN_REQUEST_TIMEOUT", "60s"),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
    ];
    let env: Vec<(&str, &str)> = env.iter().chain(otel).copied().collect();
    common::server_process(&db.url, sim, defs, port, log, &[], &env)
}

fn hex(b: &[u8]) -> String {
    hex::encode(b)
}

pub(super) async fn a_run_is_one_trace_across_a_kill(db: TestDb) {
    let collector = Collector::default();
    let (grpc, http) = collector.serve().await;
    // The first deployVirtualMachine hangs (the step stays in flight); the next one answers.
    let faults = serde_json::json!({"hang_ms": 120000, "scripted": {"deployVirtualMachine": {"0": "hang"}}});
    let sim = common::start_sim(13, Some(faults), "k", SECRET_KEY, 20).await;
    let store = common::store_with_inventory(&db, &sim).await;
    let defs = super::fast_definitions();
    let logs = tempfile::tempdir().unwrap();

    let first_port = common::free_port();
    let mut first = server(
        &db,
        &sim,
        defs.path(),
        first_port,
        &logs.path().join("first.log"),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &http),
            ("OTEL_SERVICE_NAME", "tern-first"),
        ],
    );
    let channel = common::channel(first_port).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let mut start = tonic::Request::new(pb::StartTestFailoverRequest {
        vm_id: sim.inventory.vms[1].vm_id.clone(),
        test_duration: "1s".into(),
        auto_cleanup: true,
        ..Default::default()
    });
    start.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{client_span}-01").parse().unwrap(),
    );
    let job = FailoverServiceClient::new(channel)
        .start_test_failover(start)
        .await
        .expect("start")
        .into_inner()
        .job_id;

    // The call's span continues the client's trace.
    let rpc = collector
        .until("of the start call", |s| {
            s.span.name == "tern.v1.FailoverService/StartTestFailover"
        })
        .await;
    assert_eq!(rpc.service, "tern-first");
    assert_eq!(hex(&rpc.span.trace_id), trace_id);
    assert_eq!(hex(&rpc.span.parent_span_id), client_span);
    assert_eq!(rpc.attr("rpc.grpc.status_code").as_deref(), Some("0"));
    // The first server finishes a step, then hangs in test-vm-creation and is killed there.
    collector
        .until("of validation from the first server", |s| {
            s.service == "tern-first" && s.span.name == "forward validation"
        })
        .await;
    common::until_hung(&sim).await;
    first.start_kill().unwrap();
    first.wait().await.unwrap();

    let port = common::free_port();
    let _second = server(
        &db,
        &sim,
        defs.path(),
        port,
        &logs.path().join("second.log"),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &grpc),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_SERVICE_NAME", "tern-second"),
        ],
    );
    let run: RunId = job.parse().unwrap();
    for _ in 0..600 {
        let row = store.get_run(run).await.unwrap().unwrap();
        if row.status.is_terminal() {
            assert_eq!(row.display_status, "completed", "{}", common::logs_in(logs.path()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    collector
        .until("of the last teardown step", |s| {
            s.service == "tern-second" && s.span.name == "teardown delete-snapshot"
        })
        .await;

    let spans = collector.spans();
    let steps: Vec<&Received> = spans
        .iter()
        .filter(|s| s.attr("step").is_some() && s.attr("outcome").is_some())
        .collect();
    for s in &steps {
        assert_eq!(hex(&s.span.trace_id), trace_id, "{} from {}", s.span.name, s.service);
        assert_eq!(s.attr("run_id").as_deref(), Some(job.as_str()));
        assert_eq!(s.attr("definition").as_deref(), Some("test-failover"));
        assert!(s.attr("attempt").is_some() && s.attr("phase").is_some(), "{s:?}");
    }
    // The step the kill interrupted, resumed and finished by the second server.
    let resumed = steps
        .iter()
        .find(|s| s.service == "tern-second" && s.span.name == "forward test-vm-creation")
        .expect("the resumed step's span");
    assert_eq!(resumed.attr("outcome").as_deref(), Some("succeeded"));
    // Its parent is the second server's run span, itself a child of the start call.
    let run_span = spans
        .iter()
        .find(|s| s.span.span_id == resumed.span.parent_span_id)
        .expect("the second server's run span");
    assert_eq!(run_span.service, "tern-second");
    assert_eq!(run_span.span.parent_span_id, rpc.span.span_id);
    // Cloud calls are children of their step, with no secret in them.
    let deploy = spans
        .iter()
        .find(|s| s.service == "tern-second" && s.attr("command").as_deref() == Some("deployVirtualMachine"))
        .expect("the deploy call's span");
    assert_eq!(deploy.span.parent_span_id, resumed.span.span_id);
    assert_eq!(deploy.attr("provider").as_deref(), Some("cloudstack"));
    assert!(deploy.attr("job_id").is_some_and(|j| !j.is_empty()), "{deploy:?}");
    let everything = format!("{spans:?}");
    assert!(!everything.contains(SECRET_KEY), "a span holds the secret key");
    assert!(!everything.contains("signature="), "a span holds a signed URL");
}
