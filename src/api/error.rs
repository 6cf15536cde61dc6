//! The one mapping from errors to `tonic::Status`: a gRPC code, the machine code in
//! `google.rpc.ErrorInfo.reason` (domain `tern.v1`), field problems in `google.rpc.BadRequest`,
//! and the correlation id as metadata. Database, SQL and provider details are logged here and
//! never sent: the client gets a generic message and the correlation id to look them up.

use std::collections::HashMap;

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::engine::EngineError;
use crate::store::StoreError;

/// `google.rpc.ErrorInfo.domain` of every Tern error.
pub const DOMAIN: &str = "tern.v1";

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// What went wrong in an API call, by kind; `into_status` is the only way out to the wire.
#[derive(Debug)]
pub enum ApiError {
    /// INVALID_ARGUMENT with one BadRequest violation per (field, why).
    InvalidArgument(Vec<(String, String)>),
    /// NOT_FOUND, e.g. VM_NOT_FOUND, JOB_NOT_FOUND, UNKNOWN_DEFINITION.
    NotFound { reason: &'static str, message: String },
    /// ALREADY_EXISTS: REQUEST_ID_REUSED, a request id already used for other parameters.
    AlreadyExists {
        reason: &'static str,
        message: String,
        metadata: HashMap<String, String>,
    },
    /// FAILED_PRECONDITION, e.g. VM_BUSY, JOB_FINISHED, NOT_CONFIGURED.
    Precondition {
        reason: &'static str,
        message: String,
        metadata: HashMap<String, String>,
    },
    /// UNAUTHENTICATED: no credentials, or a token unknown or revoked.
    Unauthenticated(String),
    /// PERMISSION_DENIED: the principal's role does not allow the method.
    PermissionDenied(String),
    /// RESOURCE_EXHAUSTED: a limit of the server, named in the message (reason `LIMIT_EXCEEDED`).
    ResourceExhausted(String),
    /// UNAVAILABLE: the database or the cloud could not be reached; retrying may help.
    Unavailable(String),
    /// INTERNAL: logged in full, sent as a generic message.
    Internal(String),
}

impl ApiError {
    pub fn field(field: &str, why: impl Into<String>) -> ApiError {
        ApiError::InvalidArgument(vec![(field.to_string(), why.into())])
    }

    /// NOT_FOUND `VM_NOT_FOUND`: `vm_id` is not in the inventory.
    pub fn vm_not_found(vm_id: &str) -> ApiError {
        ApiError::NotFound {
            reason: "VM_NOT_FOUND",
            message: format!("VM {vm_id} is not in the inventory (not replicated?)"),
        }
    }

    pub fn precondition(reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::Precondition {
            reason,
            message: message.into(),
            metadata: HashMap::new(),
        }
    }

    /// The status sent to the client. `correlation_id` goes into the ErrorInfo metadata and the
    /// `x-correlation-id` header so an operator can find the logged details.
    pub fn into_status(self, correlation_id: &str) -> Status {
        let mut details = ErrorDetails::new();
        let mut info = HashMap::from([("correlation_id".to_string(), correlation_id.to_string())]);
        let (code, message, reason) = match self {
            ApiError::InvalidArgument(fields) => {
                let message = fields
                    .iter()
                    .map(|(f, why)| format!("{f}: {why}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                for (f, why) in fields {
                    details.add_bad_request_violation(f, why);
                }
                (Code::InvalidArgument, message, "INVALID_ARGUMENT")
            }
            ApiError::NotFound { reason, message } => (Code::NotFound, message, reason),
            ApiError::AlreadyExists {
                reason,
                message,
                metadata,
            } => {
                info.extend(metadata);
                (Code::AlreadyExists, message, reason)
            }
            ApiError::Precondition {
                reason,
                message,
                metadata,
            } => {
                info.extend(metadata);
                (Code::FailedPrecondition, message, reason)
            }
            ApiError::Unauthenticated(message) => (Code::Unauthenticated, message, "UNAUTHENTICATED"),
            ApiError::PermissionDenied(message) => (Code::PermissionDenied, message, "PERMISSION_DENIED"),
            ApiError::ResourceExhausted(message) => (Code::ResourceExhausted, message, "LIMIT_EXCEEDED"),
            ApiError::Unavailable(detail) => {
                tracing::warn!(correlation_id, error = %detail, "API call failed: unavailable");
                (
                    Code::Unavailable,
                    format!("temporarily unavailable, retry (correlation id {correlation_id})"),
                    "UNAVAILABLE",
                )
            }
            ApiError::Internal(detail) => {
                tracing::error!(correlation_id, error = %detail, "API call failed: internal error");
                (
                    Code::Internal,
                    format!("internal error (correlation id {correlation_id})"),
                    "INTERNAL",
                )
            }
        };
        details.set_error_info(reason, DOMAIN, info);
        let mut status = Status::with_error_details(code, message, details);
        if let Ok(v) = MetadataValue::try_from(correlation_id) {
            status.metadata_mut().insert(super::CORRELATION_HEADER, v);
        }
        status
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NotFound(run) => ApiError::NotFound {
                reason: "JOB_NOT_FOUND",
                message: format!("job {run} not found"),
            },
            // INTERNAL, as before it had a variant of its own: UNAVAILABLE would change what
            // clients see (and how their retry policies react).
            e @ StoreError::ShuttingDown => ApiError::Internal(e.to_string()),
            e if e.is_retryable() => ApiError::Unavailable(e.to_string()),
            e => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        match e {
            EngineError::UnknownDefinition(name) => ApiError::NotFound {
                reason: "UNKNOWN_DEFINITION",
                message: format!("no workflow definition named {name:?}"),
            },
            EngineError::InvalidInput(problems) => ApiError::InvalidArgument(problems.0),
            EngineError::NotFound(run) => ApiError::NotFound {
                reason: "JOB_NOT_FOUND",
                message: format!("job {run} not found"),
            },
            EngineError::Finished { run, status } => {
                ApiError::precondition("JOB_FINISHED", format!("job {run} is already {status}"))
            }
            EngineError::Busy { field, value } => ApiError::Precondition {
                reason: "VM_BUSY",
                message: format!("{field} {value} already has an unfinished failover"),
                metadata: HashMap::from([(field, value)]),
            },
            EngineError::Store(e) => e.into(),
            e @ (EngineError::Definition(_) | EngineError::Transition(_)) => ApiError::Internal(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_carry_reason_fields_and_no_internals() {
        let s = ApiError::field("test_duration", "not a duration").into_status("c-1");
        assert_eq!(s.code(), Code::InvalidArgument);
        let d = s.get_error_details();
        assert_eq!(d.error_info().map(|i| i.reason.as_str()), Some("INVALID_ARGUMENT"));
        let v = &d.bad_request().expect("bad request").field_violations[0];
        assert_eq!(
            (v.field.as_str(), v.description.as_str()),
            ("test_duration", "not a duration")
        );
        assert_eq!(
            s.metadata()
                .get(crate::api::CORRELATION_HEADER)
                .and_then(|v| v.to_str().ok()),
            Some("c-1")
        );

        let s = ApiError::Internal("syntax error at or near SELECT password".into()).into_status("c-2");
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("SELECT"), "{}", s.message());
        assert!(s.message().contains("c-2"));
    }

    #[test]
    fn a_submit_cut_short_by_shutdown_is_retryable_and_answered_internal() {
        assert!(StoreError::ShuttingDown.is_retryable());
        let s = ApiError::from(EngineError::Store(StoreError::ShuttingDown)).into_status("c-3");
        assert_eq!(s.code(), Code::Internal);
    }
}
