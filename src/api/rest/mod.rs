//! The REST/JSON API with the seeds' endpoints and shapes (`/api/v1/failover/*`,
//! `/api/v1/vms/*`, `/api/v1/network-mappings`, `/api/v1/debug/*`), served beside gRPC on
//! `--http-listen`, and the OpenAPI 3 document generated from these routes
//! (`/api/v1/openapi.json`).
//!
//! A route that reads or changes a job, a VM or a mapping makes its gRPC call in-process,
//! through the same gate as a call from the network ([`super::gate`]): the same authentication
//! and roles, limits, validation, access log and metrics; no rule is implemented twice. The
//! caller's `authorization`, `x-correlation-id` and `traceparent` go with the call, and its
//! address is the peer the access log names.
//!
//! Replies keep the seeds' envelope (`success`, `message`, `job_id`, `data`); where Tern knows
//! more it adds fields. Errors are `{"success": false, "error", "error_code", "details":
//! {"error_code", "correlation_id", ...}}` with the HTTP status of the gRPC code (the mapping
//! of `google.rpc.Code`), and the `x-correlation-id` header.

mod console;
mod debug;
mod envelope;
mod events;
mod failover;
pub mod tls;
mod views;
mod vms;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpConnectInfo;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;

pub use envelope::RestError;

use super::auth::Authenticator;
use super::pb::failover_service_client::FailoverServiceClient;

/// The gRPC services behind their gate, called in-process.
pub type Grpc = super::gate::Gate<tonic::service::Routes>;

/// What the routes share.
#[derive(Clone)]
pub struct Rest {
    grpc: Grpc,
    /// For the routes that make no gRPC call (the log ring): the same principals and roles.
    auth: Authenticator,
    /// The routes' own description (what `/api/v1/debug/endpoints` lists).
    openapi: Arc<utoipa::openapi::OpenApi>,
    /// Cancelled when the server stops: event streams end then.
    stop: CancellationToken,
}

impl Rest {
    fn failover(&self) -> FailoverServiceClient<Grpc> {
        FailoverServiceClient::new(self.grpc.clone())
    }
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Tern REST API",
        description = "The failover API of the seed documents, served by `tern server --http-listen` and `tern dev`. \
                       Every route is also a gRPC call (tern.v1.FailoverService); job ids are Tern's (UUIDs).",
        license(name = "Apache-2.0")
    ),
    components(schemas(envelope::ErrorBody)),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "failover", description = "Test and live failovers and their jobs"),
        (name = "vms", description = "The VM inventory and readiness"),
        (name = "network-mappings", description = "Source networks to CloudStack networks"),
        (name = "debug", description = "Health, endpoints and recent logs"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token of `tern token create` (not needed on `tern dev` or --insecure-no-auth)",
                    ))
                    .build(),
            ),
        );
    }
}

/// Every route with its description, and the OpenAPI document they make.
fn routes() -> (axum::Router<Rest>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(failover::routes())
        .merge(events::routes())
        .merge(vms::routes())
        .merge(debug::routes())
        .split_for_parts()
}

/// The REST API's router, calling `grpc` (the gated services) for its work; its event streams
/// end when `stop` is cancelled.
pub fn router(grpc: Grpc, auth: Authenticator, stop: CancellationToken) -> axum::Router {
    let (router, openapi) = routes();
    let openapi = Arc::new(openapi);
    let doc = openapi.clone();
    let state = Rest {
        grpc,
        auth,
        openapi,
        stop,
    };
    router
        .route(
            "/api/v1/openapi.json",
            axum::routing::get(move || async move { axum::Json(doc.as_ref().clone()) }),
        )
        .merge(console::routes())
        .fallback(|| async { RestError::not_found("ROUTE_NOT_FOUND", "no such route (see /api/v1/openapi.json)") })
        .with_state(state)
}

/// Serves `router` on `listener` (HTTPS with `tls`) until `shutdown` completes, then lets the
/// requests in flight finish (an event stream ends with the server).
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router.into_make_service_with_connect_info::<tls::Peer>();
    match tls {
        Some(config) => {
            axum::serve(tls::TlsListener::new(listener, config), app)
                .with_graceful_shutdown(shutdown)
                .await
        }
        None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await,
    }
}

/// Who is calling: the headers a gRPC call takes over, the client's address, and the name of
/// the client certificate its TLS handshake verified.
pub(crate) struct Caller {
    headers: http::HeaderMap,
    peer: Option<SocketAddr>,
    certificate: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Caller, Self::Rejection> {
        let peer = parts.extensions.get::<ConnectInfo<tls::Peer>>().map(|c| c.0.clone());
        Ok(Caller {
            headers: parts.headers.clone(),
            peer: peer.as_ref().map(|p| p.addr),
            certificate: peer.and_then(|p| p.certificate),
        })
    }
}

/// The headers a REST request passes on to its gRPC call.
const PASSED_ON: [&str; 4] = ["authorization", super::CORRELATION_HEADER, "traceparent", "tracestate"];

impl Caller {
    /// `msg` as a gRPC request of this caller.
    pub(crate) fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        for name in PASSED_ON {
            if let Some(value) = self.headers.get(name).and_then(|v| v.to_str().ok()) {
                if let Ok(value) = value.parse() {
                    req.metadata_mut().insert(name, value);
                }
            }
        }
        req.extensions_mut().insert(TcpConnectInfo {
            local_addr: None,
            remote_addr: self.peer,
        });
        if let Some(name) = &self.certificate {
            req.extensions_mut()
                .insert(super::auth::VerifiedCertificate(name.clone()));
        }
        req
    }

    /// The caller's principal for a route that makes no gRPC call, allowed if its role is
    /// `needed` or above (`what` names the route in a refusal); None without authentication.
    pub(crate) async fn check(
        &self,
        auth: &Authenticator,
        needed: crate::domain::auth::Role,
        what: &str,
    ) -> Result<Option<crate::domain::auth::Principal>, RestError> {
        auth.check_role(&self.headers, self.certificate.as_deref(), needed, what)
            .await
            .map_err(|e| RestError::from(e.into_status(&super::correlation_or_new(self.correlation()))))
    }

    fn correlation(&self) -> Option<&str> {
        self.headers
            .get(super::CORRELATION_HEADER)
            .and_then(|v| v.to_str().ok())
    }
}
