//! The seeds' reply envelope and the one mapping from a gRPC status to a REST error.

use std::collections::BTreeMap;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tonic_types::StatusExt;

/// A success: `{"success": true, "message": ..., "data": ...}`, with the call's correlation id
/// as the `x-correlation-id` header.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Envelope<T> {
    /// Always true here (errors are [`ErrorBody`]).
    pub success: bool,
    pub message: String,
    pub data: T,
}

impl<T> Envelope<T> {
    pub fn new(message: impl Into<String>, data: T) -> Envelope<T> {
        Envelope {
            success: true,
            message: message.into(),
            data,
        }
    }
}

/// A JSON reply with the correlation id of the gRPC call that made it.
pub struct Reply<T> {
    pub body: T,
    pub correlation_id: Option<String>,
}

impl<T> Reply<T> {
    /// `body`, carrying the correlation id of `meta` (a gRPC response's metadata).
    pub fn of(body: T, meta: &tonic::metadata::MetadataMap) -> Reply<T> {
        Reply {
            body,
            correlation_id: correlation(meta),
        }
    }
}

impl<T: Serialize> IntoResponse for Reply<T> {
    fn into_response(self) -> Response {
        let mut response = axum::Json(self.body).into_response();
        if let Some(id) = self.correlation_id.and_then(|c| c.parse().ok()) {
            response.headers_mut().insert(super::super::CORRELATION_HEADER, id);
        }
        response
    }
}

fn correlation(meta: &tonic::metadata::MetadataMap) -> Option<String> {
    meta.get(super::super::CORRELATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// An error as the seeds send it, with the machine code twice (top level, and in `details` as
/// the older clients read it).
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Always false.
    pub success: bool,
    /// What went wrong, for a person.
    pub error: String,
    /// The machine code, e.g. VM_NOT_FOUND, VM_BUSY, INVALID_ARGUMENT, UNAUTHENTICATED.
    pub error_code: String,
    /// `error_code` again, `correlation_id`, what the code's metadata says (e.g. `job_id`), and
    /// for INVALID_ARGUMENT `field_violations`: `[{"field", "description"}]`.
    #[schema(value_type = Object)]
    pub details: BTreeMap<String, Value>,
}

/// A REST error: the HTTP status and the body.
#[derive(Debug)]
pub struct RestError {
    status: StatusCode,
    code: tonic::Code,
    error: String,
    error_code: String,
    details: BTreeMap<String, Value>,
}

impl RestError {
    pub fn not_found(error_code: &str, error: &str) -> RestError {
        RestError::new(tonic::Code::NotFound, error_code, error)
    }

    /// INVALID_ARGUMENT naming `field`.
    pub fn field(field: &str, why: impl Into<String>) -> RestError {
        let why = why.into();
        let mut e = RestError::new(
            tonic::Code::InvalidArgument,
            "INVALID_ARGUMENT",
            &format!("{field}: {why}"),
        );
        e.details.insert(
            "field_violations".into(),
            serde_json::json!([{"field": field, "description": why}]),
        );
        e
    }

    fn new(code: tonic::Code, error_code: &str, error: &str) -> RestError {
        RestError {
            status: http_status(code),
            code,
            error: error.to_string(),
            error_code: error_code.to_string(),
            details: BTreeMap::new(),
        }
    }

    /// The gRPC code this error stands for.
    pub fn code(&self) -> tonic::Code {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.error
    }

    pub fn error_code(&self) -> &str {
        &self.error_code
    }
}

/// The HTTP status of a gRPC code, as `google.rpc.Code` documents it.
pub fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code::*;
    match code {
        Ok => StatusCode::OK,
        Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        InvalidArgument | FailedPrecondition | OutOfRange => StatusCode::BAD_REQUEST,
        Unauthenticated => StatusCode::UNAUTHORIZED,
        PermissionDenied => StatusCode::FORBIDDEN,
        NotFound => StatusCode::NOT_FOUND,
        AlreadyExists | Aborted => StatusCode::CONFLICT,
        ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Unknown | Internal | DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<tonic::Status> for RestError {
    fn from(status: tonic::Status) -> RestError {
        let details = status.get_error_details();
        let info = details.error_info();
        let error_code = info
            .map(|i| i.reason.clone())
            .unwrap_or_else(|| super::super::gate::code_name(status.code()).to_string());
        let mut e = RestError::new(status.code(), &error_code, status.message());
        if let Some(info) = info {
            for (k, v) in &info.metadata {
                e.details.insert(k.clone(), Value::String(v.clone()));
            }
        }
        if let Some(bad) = details.bad_request() {
            let violations: Vec<Value> = bad
                .field_violations
                .iter()
                .map(|v| serde_json::json!({"field": v.field, "description": v.description}))
                .collect();
            e.details.insert("field_violations".into(), Value::Array(violations));
        }
        if let Some(id) = status
            .metadata()
            .get(super::super::CORRELATION_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            e.details.insert("correlation_id".into(), Value::String(id.to_string()));
        }
        e
    }
}

impl IntoResponse for RestError {
    fn into_response(mut self) -> Response {
        self.details
            .insert("error_code".into(), Value::String(self.error_code.clone()));
        let correlation = self
            .details
            .get("correlation_id")
            .and_then(Value::as_str)
            .and_then(|c| c.parse().ok());
        let body = ErrorBody {
            success: false,
            error: self.error,
            error_code: self.error_code,
            details: self.details,
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(id) = correlation {
            response.headers_mut().insert(super::super::CORRELATION_HEADER, id);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// A JSON body (none at all reads as `{}`) whose refusal (not JSON, a field of the wrong type, an unknown field) is an
/// INVALID_ARGUMENT in the envelope, naming the field where serde can.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = RestError;

    async fn from_request(req: Request, state: &S) -> Result<Body<T>, RestError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| RestError::field("body", e.body_text()))?;
        // No body at all is an empty object: every body's fields may be left out.
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        serde_path_to_error::deserialize(de).map(Body).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { "body".to_string() } else { path };
            RestError::field(&field, e.inner().to_string())
        })
    }
}

/// Query parameters, refused as INVALID_ARGUMENT in the envelope.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = RestError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Query<T>, RestError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e: QueryRejection| RestError::field("query", e.body_text()))
    }
}

/// Path parameters, refused as INVALID_ARGUMENT in the envelope.
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = RestError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Path<T>, RestError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|e: PathRejection| RestError::field("path", e.body_text()))
    }
}
