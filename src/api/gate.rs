//! The gate every call passes before a service sees it (one tower layer): authentication and
//! the role ([`super::auth`]), then the server's limits. A limit reached is RESOURCE_EXHAUSTED,
//! reason `LIMIT_EXCEEDED`, naming the limit and the flag that sets it:
//!
//! - calls per second of one principal (`--rate-limit`, a token bucket per principal; callers
//!   of a server without authentication are not limited);
//! - calls in flight on one connection (`--max-calls-per-connection`);
//! - the size of a request message (`--max-message-size`; tonic refuses a larger one while
//!   reading it, as OUT_OF_RANGE, which the gate answers as this limit instead).
//!
//! Watch streams open at once are counted where a stream lives ([`super::watch`]).
//!
//! Every call, refused or answered, ends with one access-log line (target `tern::access`:
//! method, code, duration, principal, correlation id, peer) and is counted in the RPC metrics
//! ([`crate::telemetry::metrics::rpc`]); a stream ends when its trailers are sent or it is
//! dropped (CANCELLED).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::auth::Authenticator;
use super::error::ApiError;
use crate::domain::auth::Principal;
use crate::telemetry::metrics;
use tracing::Instrument;

/// The server's limits (each documented in the README, each a flag of `tern server`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The largest request message, in bytes.
    pub max_message_bytes: usize,
    /// Calls in flight on one connection.
    pub calls_per_connection: usize,
    /// Watch streams open at once, all callers together.
    pub watches: usize,
    /// Calls per second of one principal (0: no limit), with bursts up to twice that.
    pub calls_per_second: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_message_bytes: 4 * 1024 * 1024,
            calls_per_connection: 256,
            watches: 1000,
            calls_per_second: 200,
        }
    }
}

/// The tower layer of the gate.
#[derive(Clone)]
pub struct GateLayer {
    shared: Arc<Shared>,
}

struct Shared {
    auth: Authenticator,
    limits: Limits,
    rate: Option<DefaultKeyedRateLimiter<String>>,
    /// Calls in flight by connection (the client's address and port).
    in_flight: Mutex<HashMap<SocketAddr, usize>>,
    /// The methods this server has (`package.Service/Method`): the only values the access log
    /// and the metrics give a method; any other path is `unknown`.
    methods: &'static HashSet<&'static str>,
}

impl GateLayer {
    pub fn new(auth: Authenticator, limits: Limits) -> GateLayer {
        let rate = NonZeroU32::new(limits.calls_per_second).map(|per_second| {
            let burst = per_second.saturating_mul(NonZeroU32::MIN.saturating_add(1));
            RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst))
        });
        GateLayer {
            shared: Arc::new(Shared {
                auth,
                limits,
                rate,
                in_flight: Mutex::new(HashMap::new()),
                methods: known_methods(),
            }),
        }
    }
}

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gate<S>;

    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// A service whose calls pass the gate first.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    shared: Arc<Shared>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// Gives back a connection's in-flight slot when the call ends, however it ends.
struct Slot {
    shared: Arc<Shared>,
    peer: SocketAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.shared.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.peer);
            }
        }
    }
}

impl Shared {
    fn take_slot(self: &Arc<Self>, peer: SocketAddr) -> Result<Slot, ApiError> {
        let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(peer).or_insert(0);
        if *n >= self.limits.calls_per_connection {
            return Err(ApiError::ResourceExhausted(format!(
                "more than {} calls in flight on this connection (--max-calls-per-connection)",
                self.limits.calls_per_connection
            )));
        }
        *n += 1;
        Ok(Slot {
            shared: self.clone(),
            peer,
        })
    }

    fn within_rate(&self, principal: &Principal) -> Result<(), ApiError> {
        match &self.rate {
            Some(rate) if rate.check_key(&principal.name).is_err() => Err(ApiError::ResourceExhausted(format!(
                "{} made more than {} calls a second (--rate-limit); retry shortly",
                principal.name, self.limits.calls_per_second
            ))),
            _ => Ok(()),
        }
    }
}

/// Every method of the services a server serves, from their descriptor sets: read once per
/// process, and kept for its life (metric labels and log fields borrow them, never allocate).
fn known_methods() -> &'static HashSet<&'static str> {
    static METHODS: std::sync::OnceLock<HashSet<&'static str>> = std::sync::OnceLock::new();
    METHODS.get_or_init(|| read_methods().into_iter().map(|m| &*m.leak()).collect())
}

fn read_methods() -> HashSet<String> {
    use prost::Message as _;
    let sets = [
        super::pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let mut methods = HashSet::new();
    for bytes in sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(bytes) else {
            continue;
        };
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    methods.insert(format!(
                        "{}{}/{}",
                        file.package.as_deref().map(|p| format!("{p}.")).unwrap_or_default(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
    }
    methods
}

/// One call, from the gate to its end: told once to the access log and the metrics, and its
/// span (the caller's trace continued, when it sends one).
struct CallLog {
    span: tracing::Span,
    method: &'static str,
    principal: Option<String>,
    correlation: String,
    peer: Option<SocketAddr>,
    started: Instant,
    ended: bool,
}

impl CallLog {
    fn start(shared: &Shared, parts: &http::request::Parts) -> CallLog {
        let path = parts.uri.path().trim_start_matches('/');
        let method = shared.methods.get(path).copied().unwrap_or("unknown");
        let (service, name) = method.split_once('/').unwrap_or(("unknown", "unknown"));
        let span = tracing::info_span!(
            "rpc",
            otel.name = %method,
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %name,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        crate::telemetry::traces::continue_from_headers(&span, &parts.headers);
        CallLog {
            span,
            method,
            principal: None,
            correlation: correlation_of(parts),
            peer: peer(parts),
            started: Instant::now(),
            ended: false,
        }
    }

    fn end(&mut self, code: tonic::Code) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let took = self.started.elapsed();
        self.span.record("rpc.grpc.status_code", code as i32);
        if matches!(
            code,
            tonic::Code::Unknown
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unimplemented
                | tonic::Code::Internal
                | tonic::Code::Unavailable
                | tonic::Code::DataLoss
        ) {
            self.span.record("otel.status_code", "ERROR");
        }
        let code = code_name(code);
        metrics::rpc(self.method, code, took);
        tracing::info!(
            target: "tern::access",
            method = %self.method,
            code = %code,
            duration_ms = took.as_micros() as f64 / 1000.0,
            principal = %self.principal.as_deref().unwrap_or("-"),
            correlation_id = %self.correlation,
            peer = %self.peer.map_or_else(|| "-".to_string(), |p| p.to_string()),
            "rpc"
        );
    }

    /// Ends the call with the status in `h`, if `h` carries one.
    fn end_with(&mut self, h: &http::HeaderMap) {
        if let Some(code) = h
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
        {
            self.end(tonic::Code::from_i32(code));
        }
    }
}

impl Drop for CallLog {
    fn drop(&mut self) {
        // A stream the client went away from, or a body that ended without a status.
        self.end(tonic::Code::Cancelled);
    }
}

/// The gRPC name of a status code, as the access log and the metrics show it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

fn peer(req: &http::request::Parts) -> Option<SocketAddr> {
    let ext = &req.extensions;
    ext.get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
}

fn correlation_of(req: &http::request::Parts) -> String {
    let sent = req.headers.get(super::CORRELATION_HEADER).and_then(|v| v.to_str().ok());
    super::correlation_or_new(sent)
}

/// Whether a status (in headers or trailers) is tonic's refusal of a request over the size
/// limit: OUT_OF_RANGE while reading the message.
fn is_oversize(h: &http::HeaderMap) -> bool {
    h.get("grpc-status").is_some_and(|v| v == "11")
        && h.get("grpc-message")
            .and_then(|v| v.to_str().ok())
            // grpc-message is percent-encoded on the wire.
            .is_some_and(|m| m.replace("%20", " ").contains("decoded message length too large"))
}

/// Replaces tonic's oversize status in `h` with RESOURCE_EXHAUSTED naming this limit.
fn name_the_limit(h: &mut http::HeaderMap, limit: usize) {
    let status = ApiError::ResourceExhausted(format!(
        "the request message is larger than the limit of {limit} bytes (--max-message-size)"
    ))
    .into_status(&uuid::Uuid::new_v4().to_string());
    let replacement: http::Response<tonic::body::Body> = status.into_http();
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        h.remove(name);
    }
    for (name, value) in replacement.headers() {
        if name.as_str().starts_with("grpc-") || name.as_str() == super::CORRELATION_HEADER {
            h.insert(name, value.clone());
        }
    }
}

/// A response body whose trailers end the call's log, and say RESOURCE_EXHAUSTED naming the
/// limit where tonic's say the request was too large (tonic reads the request inside the call
/// and answers in trailers).
struct Observed {
    inner: tonic::body::Body,
    limit: usize,
    log: CallLog,
}

impl http_body::Body for Observed {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let limit = self.limit;
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_trailers() {
                Ok(mut trailers) => {
                    if is_oversize(&trailers) {
                        name_the_limit(&mut trailers, limit);
                    }
                    self.log.end_with(&trailers);
                    Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The service's response, observed: tonic's answer to a request over the size limit
/// (OUT_OF_RANGE) as this limit instead, and the call's log ended by the status, whether it
/// comes in the headers (an error answered at once) or the trailers.
fn observed(
    mut response: http::Response<tonic::body::Body>,
    limit: usize,
    mut log: CallLog,
) -> http::Response<tonic::body::Body> {
    if is_oversize(response.headers()) {
        name_the_limit(response.headers_mut(), limit);
    }
    if response.headers().contains_key("grpc-status") {
        log.end_with(response.headers());
        return response;
    }
    response.map(|inner| tonic::body::Body::new(Observed { inner, limit, log }))
}

impl<S, B> tower::Service<http::Request<B>> for Gate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // The clone that was made ready is the one called (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        // The request's head is checked; its body (not `Sync`) is not held across the check.
        let (mut parts, body) = req.into_parts();
        Box::pin(async move {
            let mut log = CallLog::start(&shared, &parts);
            // The handler answers with the correlation id the log names (a new one when the
            // client sent none).
            if let Ok(id) = http::HeaderValue::from_str(&log.correlation) {
                parts.headers.insert(super::CORRELATION_HEADER, id);
            }
            let passed = async {
                let principal = shared.auth.check(&parts).await?;
                if let Some(p) = &principal {
                    shared.within_rate(p)?;
                }
                let slot = peer(&parts).map(|p| shared.take_slot(p)).transpose()?;
                Ok::<_, ApiError>((principal, slot))
            }
            .await;
            match passed {
                Ok((principal, _slot)) => {
                    if let Some(p) = principal {
                        log.principal = Some(p.name.clone());
                        parts.extensions.insert(p);
                    }
                    let span = log.span.clone();
                    let response = inner
                        .call(http::Request::from_parts(parts, body))
                        .instrument(span)
                        .await?;
                    Ok(observed(response, shared.limits.max_message_bytes, log))
                }
                Err(e) => {
                    let status = e.into_status(&log.correlation);
                    log.end(status.code());
                    Ok(status.into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_gets_its_slots_back_however_calls_end() {
        let layer = GateLayer::new(
            Authenticator::Off,
            Limits {
                calls_per_connection: 2,
                ..Limits::default()
            },
        );
        let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let a = layer.shared.take_slot(peer).unwrap();
        let _b = layer.shared.take_slot(peer).unwrap();
        let refused = layer.shared.take_slot(peer).err().unwrap();
        let status = refused.into_status("c");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("--max-calls-per-connection"),
            "{}",
            status.message()
        );
        assert!(
            layer.shared.take_slot("127.0.0.1:4001".parse().unwrap()).is_ok(),
            "per connection"
        );
        drop(a);
        assert!(layer.shared.take_slot(peer).is_ok());
    }

    #[test]
    fn a_principal_over_its_rate_is_refused_naming_the_limit() {
        let layer = GateLayer::new(
            Authenticator::Off,
            Limits {
                calls_per_second: 1,
                ..Limits::default()
            },
        );
        let p = Principal {
            name: "ci".into(),
            role: crate::domain::auth::Role::Viewer,
        };
        assert!(layer.shared.within_rate(&p).is_ok());
        assert!(layer.shared.within_rate(&p).is_ok(), "a burst of twice the rate");
        let e = layer.shared.within_rate(&p).unwrap_err().into_status("c");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("--rate-limit"), "{}", e.message());
    }
}
