//! OpenTelemetry traces over OTLP, configured the standard way: on when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, unless
//! `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`; `OTEL_EXPORTER_OTLP_PROTOCOL` is
//! `http/protobuf` (the default) or `grpc`; `OTEL_SERVICE_NAME` (default `tern`) and
//! `OTEL_RESOURCE_ATTRIBUTES` name the process; `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*` and the
//! exporter's timeout and headers variables apply as the SDK reads them.
//!
//! Context crosses processes as W3C trace context (`traceparent`): taken from a call's gRPC
//! metadata, stored with a run at submit, and restored by every worker that drives the run, so
//! a run is one trace however many processes and restarts it takes.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

fn env(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Whether the environment asks for traces.
fn wanted() -> bool {
    let endpoint = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let none = env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    endpoint.is_some() && !disabled && !none
}

/// The tracer provider the environment asks for (None: traces are off), its batches exported
/// from a thread of the SDK's own; must be called inside the Tokio runtime (the exporters'
/// connections live on it).
pub(super) fn provider() -> Result<Option<SdkTracerProvider>, String> {
    if !wanted() {
        return Ok(None);
    }
    let protocol = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "http/protobuf".into());
    let exporter = match protocol.as_str() {
        "grpc" => opentelemetry_otlp::SpanExporter::builder().with_tonic().build(),
        "http/protobuf" => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_http_client(OnRuntime::new()?)
            .build(),
        other => {
            return Err(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={other} is not supported (grpc or http/protobuf)"
            ))
        }
    }
    .map_err(|e| format!("the OTLP trace exporter: {e}"))?;
    let named = env("OTEL_SERVICE_NAME").is_some()
        || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
    let mut resource = opentelemetry_sdk::Resource::builder();
    if !named {
        resource = resource.with_service_name("tern");
    }
    let provider = SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_batch_exporter(exporter)
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(Some(provider))
}

/// Whether this process exports traces (its subscriber has the OpenTelemetry layer).
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The layer that turns `tracing` spans into OpenTelemetry spans of `provider`. A span carries
/// its own fields, not the exporter's bookkeeping (no busy/idle timers, which cost a clock read
/// at every poll of a future; no thread, source location or target). Entering a span does not
/// make its context OpenTelemetry's current one (a thread-local push at every poll): parents
/// and [`current_traceparent`] are found through `tracing`'s own current span. What it sees is
/// [`Exported`].
pub(super) fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    use tracing_subscriber::Layer as _;
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("tern"))
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_location(false)
        .with_target(false)
        .with_context_activation(false)
        .with_filter(Exported)
}

/// What is exported: Tern's spans at `info` and above, and its events at `warn` and above (as
/// events of their span). A step's `info` lines say what its span already does; exported, they
/// doubled the bytes sent. Decided by the callsite alone, once (no per-call evaluation).
pub(super) struct Exported;

impl Exported {
    fn wants(meta: &tracing::Metadata<'_>) -> bool {
        let ours = meta.target() == "tern" || meta.target().starts_with("tern::");
        let level = if meta.is_span() {
            tracing::Level::INFO
        } else {
            tracing::Level::WARN
        };
        ours && *meta.level() <= level
    }
}

impl<S> tracing_subscriber::layer::Filter<S> for Exported {
    fn enabled(&self, meta: &tracing::Metadata<'_>, _: &tracing_subscriber::layer::Context<'_, S>) -> bool {
        Exported::wants(meta)
    }

    fn callsite_enabled(&self, meta: &'static tracing::Metadata<'static>) -> tracing::subscriber::Interest {
        if Exported::wants(meta) {
            tracing::subscriber::Interest::always()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::INFO)
    }
}

/// The `traceparent` of the current span, when it is traced.
pub fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the span a `traceparent` names (ignored when it does not parse).
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Makes `span` a child of the caller's span, when the request's headers carry its
/// `traceparent` (and `tracestate`).
pub fn continue_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    if !headers.contains_key("traceparent") {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The OTLP/HTTP client: the process's reqwest, each request run on the Tokio runtime (the SDK
/// exports from a thread of its own, outside the runtime).
#[derive(Debug)]
struct OnRuntime {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

impl OnRuntime {
    fn new() -> Result<OnRuntime, String> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "traces must be set up inside the Tokio runtime".to_string())?;
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| format!("the OTLP HTTP client: {e}"))?;
        Ok(OnRuntime { client, runtime })
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OnRuntime {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let sent = self.runtime.spawn(async move {
            let request = reqwest::Request::try_from(request)?;
            let reply = client.execute(request).await?;
            let mut response = http::Response::builder().status(reply.status());
            for (name, value) in reply.headers() {
                response = response.header(name, value);
            }
            let body = reply.bytes().await?;
            Ok::<_, opentelemetry_http::HttpError>(response.body(body)?)
        });
        sent.await?
    }
}
