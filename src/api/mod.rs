//! The gRPC API: `tern.v1.FailoverService` and `tern.v1.WorkflowService` (tonic), health and
//! reflection. This module owns the wire: the generated code ([`pb`]), the conversions between
//! proto and domain types ([`convert`]), and the one mapping from errors to `tonic::Status`
//! ([`error`]). Domain types never derive prost.

// tonic's service traits return `Result<_, tonic::Status>` by value; our helpers match them.
#![allow(clippy::result_large_err)]

pub mod auth;
mod codec;
pub mod convert;
mod cork;
pub mod error;
mod failover;
pub mod gate;
pub mod health;
pub mod metrics;
mod page;
#[cfg(test)]
mod properties;
pub mod rest;
mod validate;
mod watch;
mod workflow;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use serde_json::Value;
use tokio::net::TcpListener;
use tonic::metadata::MetadataValue;

use crate::engine::Engine;
use crate::steps::failover::FailoverDeps;
use crate::store::{Diagnostics, InventoryStore, JobStore, RunRow, Store};
pub use failover::FailoverApi;
use pb::failover_service_server::FailoverServiceServer;
use pb::workflow_service_server::WorkflowServiceServer;
pub use workflow::WorkflowApi;

/// The code generated from `proto/tern/v1/*.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs, unused_qualifications)]
pub mod pb {
    tonic::include_proto!("tern.v1");

    /// The encoded descriptor set of the protos (what server reflection serves).
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tern_descriptor.bin"));
}

/// The metadata key every response (and error) carries the correlation id under. A client may
/// send one with a start request; it becomes the job's correlation id.
pub const CORRELATION_HEADER: &str = "x-correlation-id";

/// The definitions FailoverService starts and shows.
pub const TEST_FAILOVER: &str = "test-failover";
pub const LIVE_FAILOVER: &str = "live-failover";

/// What the services work with. `failover` is None when no cloud is configured: failovers can
/// still be started (their steps fail with NOT_CONFIGURED) but readiness cannot be checked.
#[derive(Clone)]
pub struct ApiState {
    /// Runs: submit, signal, cancel, read.
    pub engine: Arc<Engine>,
    /// The failover job read model.
    pub jobs: Arc<dyn JobStore>,
    /// The VM inventory and network mappings.
    pub inventory: Arc<dyn InventoryStore>,
    pub failover: Option<Arc<FailoverDeps>>,
    /// The database's health.
    pub diagnostics: Arc<dyn Diagnostics>,
    /// Watch streams open at once (`Limits::watches`).
    pub watches: watch::WatchSlots,
}

impl ApiState {
    pub fn new(engine: Arc<Engine>, store: Arc<dyn Store>, failover: Option<Arc<FailoverDeps>>) -> ApiState {
        ApiState {
            engine,
            jobs: store.clone(),
            inventory: store.clone(),
            diagnostics: store,
            failover,
            watches: watch::WatchSlots::new(gate::Limits::default().watches),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("REST API: {0}")]
    Http(#[from] std::io::Error),
}

/// How a server meets its callers: TLS (with client certificates when the config asks for
/// them) and authentication. The default is plaintext and no authentication (`tern dev`, tests).
#[derive(Clone)]
pub struct ServeOptions {
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// The REST listener's TLS (the same certificate, key and client CA as `tls`).
    pub http_tls: Option<Arc<rustls::ServerConfig>>,
    pub auth: auth::Authenticator,
    pub limits: gate::Limits,
}

impl Default for ServeOptions {
    fn default() -> ServeOptions {
        ServeOptions {
            tls: None,
            http_tls: None,
            auth: auth::Authenticator::Off,
            limits: gate::Limits::default(),
        }
    }
}

/// Serves the API on `listener`, plaintext and without authentication, until `shutdown`
/// completes (then drains in-flight calls).
pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve_with(listener, state, ServeOptions::default(), shutdown).await
}

/// [`serve`] with TLS, authentication and limits as `options` say.
pub async fn serve_with(
    listener: TcpListener,
    state: ApiState,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve_with_http(listener, None, state, options, shutdown).await
}

/// [`serve_with`], and the REST API ([`rest`]) on `http` when given: the same services behind
/// the same gate.
pub async fn serve_with_http(
    listener: TcpListener,
    http: Option<TcpListener>,
    mut state: ApiState,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    state.watches = watch::WatchSlots::new(options.limits.watches);
    let max = options.limits.max_message_bytes;
    let (reporter, health) = tonic_health::server::health_reporter();
    health::starting(&reporter).await;
    let probe = tokio::spawn(health::probe(
        reporter,
        state.diagnostics.clone(),
        state.failover.clone(),
    ));
    let _stop_probe = tokio_util::task::AbortOnDropHandle::new(probe);
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let routes = tonic::service::Routes::new(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(FailoverServiceServer::new(FailoverApi::new(state.clone())).max_decoding_message_size(max))
        .add_service(WorkflowServiceServer::new(WorkflowApi::new(state)).max_decoding_message_size(max))
        .prepare();
    let gate = gate::GateLayer::new(options.auth.clone(), options.limits.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let stopper = stop.clone();
    let _stop_on_shutdown = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        shutdown.await;
        stopper.cancel();
    }));
    let http_tls = options.http_tls.clone();
    let rest = http.map(|listener| {
        let grpc = tower::Layer::layer(&gate, routes.clone());
        let router = rest::router(grpc, options.auth.clone(), stop.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let served = rest::serve(listener, http_tls, router, stop.clone().cancelled_owned()).await;
            // A REST API that failed stops the server: its operators rely on it.
            stop.cancel();
            served
        })
    });
    // No Nagle: a watch stream's small messages would otherwise wait for delayed ACKs (~40 ms
    // each). Corked instead: what a connection queues in one turn leaves in one write.
    let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |s| {
        s.and_then(|s| s.set_nodelay(true).map(|_| cork::Corked::new(s)))
    });
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = options.tls {
        builder = builder.tls_config(tls)?;
    }
    let served = builder
        .layer(gate)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned())
        .await;
    // Whichever stopped first, both stop.
    stop.cancel();
    if let Some(rest) = rest {
        rest.await.map_err(std::io::Error::other)??;
    }
    served?;
    Ok(())
}

/// The correlation id a request carries (a printable `x-correlation-id` of at most 128
/// characters), or a new one.
pub(crate) fn correlation_of<T>(req: &tonic::Request<T>) -> String {
    correlation_or_new(req.metadata().get(CORRELATION_HEADER).and_then(|v| v.to_str().ok()))
}

/// `sent`, the `x-correlation-id` a request carries, if it is a printable id of at most 128
/// characters; otherwise a new one.
pub(crate) fn correlation_or_new(sent: Option<&str>) -> String {
    sent.map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Ok when `run`, the run a request's `request_id` already made, was made with this `definition`
/// and `input` (a JSON object); otherwise ALREADY_EXISTS REQUEST_ID_REUSED, naming the request id,
/// the run (as `noun`: "job" or "run") and the input fields that differ.
pub(crate) fn same_request(
    request_id: &str,
    run: &RunRow,
    definition: &str,
    input: &Value,
    noun: &str,
    derived: &[&str],
) -> Result<(), error::ApiError> {
    let mut differ = Vec::new();
    if run.definition != definition {
        differ.push("definition".to_string());
    }
    let empty = serde_json::Map::new();
    let (given, stored) = (
        input.as_object().unwrap_or(&empty),
        run.input.as_object().unwrap_or(&empty),
    );
    let mut keys: Vec<&String> = given.keys().chain(stored.keys()).collect();
    keys.sort();
    keys.dedup();
    differ.extend(
        keys.into_iter()
            .filter(|k| !derived.contains(&k.as_str()) && given.get(*k) != stored.get(*k))
            .cloned(),
    );
    if differ.is_empty() {
        return Ok(());
    }
    Err(error::ApiError::AlreadyExists {
        reason: "REQUEST_ID_REUSED",
        message: format!(
            "request_id {request_id:?} was already used for {noun} {} with other parameters (differs in: {})",
            run.id,
            differ.join(", ")
        ),
        metadata: HashMap::from([
            ("request_id".to_string(), request_id.to_string()),
            (format!("{noun}_id"), run.id.to_string()),
            ("fields".to_string(), differ.join(",")),
        ]),
    })
}

/// A response carrying `correlation_id` as `x-correlation-id` metadata.
/// The reply to a unary RPC: the value, or the error as a status; either way with the
/// request's correlation id.
pub(crate) fn reply<T>(result: error::ApiResult<T>, correlation_id: &str) -> Result<tonic::Response<T>, tonic::Status> {
    result
        .map(|v| respond(v, correlation_id))
        .map_err(|e| e.into_status(correlation_id))
}

/// A reply that carries a run's own correlation id (the one it was started with), so a retried
/// start answers with the id of the request that made the run.
pub(crate) trait Correlated {
    fn correlation_id(&self) -> &str;
}

impl Correlated for pb::FailoverJob {
    fn correlation_id(&self) -> &str {
        &self.correlation_id
    }
}

impl Correlated for pb::Workflow {
    fn correlation_id(&self) -> &str {
        &self.correlation_id
    }
}

/// [`reply`] with the run's correlation id on success (the request's on an error).
pub(crate) fn reply_own<T: Correlated>(
    result: error::ApiResult<T>,
    correlation_id: &str,
) -> Result<tonic::Response<T>, tonic::Status> {
    match result {
        Ok(v) => {
            let c = v.correlation_id().to_string();
            Ok(respond(v, &c))
        }
        Err(e) => Err(e.into_status(correlation_id)),
    }
}

pub(crate) fn respond<T>(msg: T, correlation_id: &str) -> tonic::Response<T> {
    let mut r = tonic::Response::new(msg);
    if let Ok(v) = MetadataValue::try_from(correlation_id) {
        r.metadata_mut().insert(CORRELATION_HEADER, v);
    }
    r
}
